"""Multi-task mode on two GLUE tasks at once (default SST-2 + MRPC) with MiniLM-L6, on CPU.

Three arms, same model, data order, steps and learning rate:

* shared  : one shared nested adapter for both tasks (SINGLE topology, rank 8), never split.
* multi   : separate task adapters from step 0 (MULTI topology, rank 8), never merged.
* unified : the MultiTaskController decides (starts in SINGLE, no decision during a 20-step
            warmup, min dwell 10; ranks 4/8/16 for SINGLE/MULTI/MIRROR as in the v1 README;
            LR is *not* changed by mode here, lr_mode="off", so the arms differ only in
            topology and rank).

LoRA targets: query/value of the top `--top-layers` encoder layers (default 2, to keep the
CPU backward short), pooler.dense and classifier - the classifier's task adapter gives each
task its own decision layer in MULTI (a shared head has to serve both label sets).
By default the tasks take turns, one task per batch (`task_id=`), which keeps the short
SST-2 batches short; `--mix` uses mixed batches (half each, per-sample routing).

Sized for a 2-core CPU: max_length 48, batch 16, 100 steps (50 per task), dev sets
subsampled to a fixed random 256 examples per task (`--dev-max 0` for the full dev sets).

    python examples/multitask_glue.py --arm all                  # the three arms, one seed
    python examples/multitask_glue.py --arm unified --seed 1 --tasks rte mrpc --out r.json

GLUE tasks other than MRPC are not shipped with the package: the data helper looks in
../shared/data/glue or $UNIFIED_LORA_GLUE_DIR (pass --data-dir to override).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch
import torch.nn.functional as F

from unified_lora import MULTI, SINGLE, MachineConfig, trainable_parameters
from unified_lora.data import (DataError, default_model_path, encode, glue_metrics, load_glue, majority_baseline,
                               primary_metric)
from unified_lora.multitask import MultiTaskSignalConfig, per_task_losses, setup_multitask_lora, task_context

ARMS = ("shared", "multi", "unified")


def targets(n_layers: int, top_layers: int) -> str:
    """Regex: query/value of the top `top_layers` encoder layers, the pooler and the classifier.
    Adapting only the top layers keeps the backward pass short (CPU budget)."""
    layers = "|".join(str(i) for i in range(max(0, n_layers - top_layers), n_layers))
    return rf"bert\.encoder\.layer\.({layers})\.attention\.self\.(query|value)|bert\.pooler\.dense|classifier"


def _trim(b: dict) -> dict:
    """Drop padding columns that no row of this batch uses."""
    L = int(b["attention_mask"].sum(1).max())
    return {k: (v[:, :L] if v.dim() == 2 else v) for k, v in b.items()}


def _subsample(ds_examples, n, seed):
    ex = list(ds_examples)
    if n and n < len(ex):
        rng = random.Random(seed)
        ex = rng.sample(ex, n)
    return ex


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def load_tasks(tasks, tokenizer, max_length, dev_max, data_dir, seed, train_max=4000):
    data = {}
    for t in tasks:
        tr, dv = load_glue(t, "train", data_dir), load_glue(t, "dev", data_dir)
        dev_ex = _subsample(dv.examples, dev_max, 1234)  # fixed dev subset, same for every seed/arm
        train_ex = _subsample(tr.examples, train_max, 1234)  # SST-2 has 67k; 100 steps use < 2k
        data[t] = {
            "train": encode(tokenizer, train_ex, max_length=max_length, padding="max_length"),
            "dev": encode(tokenizer, dev_ex, max_length=max_length, padding="max_length"),
            "majority": majority_baseline(tr.labels, [e.label for e in dev_ex], t),
            "n_train": len(train_ex), "n_train_total": len(tr), "n_dev": len(dev_ex), "n_dev_total": len(dv),
        }
    return data


@torch.no_grad()
def evaluate(model, data, tasks, batch=64):
    model.eval()
    out = {}
    for t in tasks:
        d = data[t]["dev"]
        preds = []
        with task_context(model, t):
            for i in range(0, len(d["labels"]), batch):
                kw = _trim({k: v[i:i + batch] for k, v in d.items() if k != "labels"})
                preds.append(model(**kw).logits.argmax(-1))
        out[t] = glue_metrics(t, torch.cat(preds).tolist(), d["labels"].tolist())
    model.train()
    return out


def run(arm, tasks=("sst2", "mrpc"), seed=0, steps=100, batch=16, lr=2e-3, max_length=48, dev_max=256,
        data_dir=None, warmup=20, min_dwell=10, merge_rule="mean_factors", data=None, tokenizer=None,
        model_path=None, top_layers=2, mix=False, log=print):
    from transformers import AutoTokenizer, BertForSequenceClassification

    if arm not in ARMS:
        raise ValueError(f"arm: one of {ARMS}, got {arm!r}")
    tasks = tuple(tasks)
    if mix and batch % len(tasks):
        raise ValueError(f"batch: a mixed batch takes the same number of rows from each task, so batch must be a "
                         f"multiple of the {len(tasks)} tasks, got {batch}")
    model_path = model_path or default_model_path()
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path)
    data = data or load_tasks(tasks, tokenizer, max_length, dev_max, data_dir, seed)
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(model_path, num_labels=2)
    if arm == "unified":
        machine = MachineConfig(initial_mode=SINGLE, warmup_steps=warmup, min_dwell=min_dwell)
        mode_ranks = (4, 8, 16)
    else:
        machine = MachineConfig(initial_mode=SINGLE if arm == "shared" else MULTI)
        mode_ranks = (8, 8, 16)
    tgt = targets(model.config.num_hidden_layers, top_layers)
    adapters, ctrl = setup_multitask_lora(model, list(tasks), tgt, lr_mode="off", mode_ranks=mode_ranks,
                                          machine=machine, signal=MultiTaskSignalConfig(), merge_rule=merge_rule,
                                          print_fn=log if arm == "unified" else None,
                                          total_steps=steps)  # no merge in the last resplit_window steps: untested
    opt = torch.optim.AdamW(trainable_parameters(model), lr=lr, weight_decay=0.01)
    ctrl.attach_optimizer(opt)
    if arm != "unified":
        ctrl.router.track_grads = False  # no controller step: no per-task gradient capture
    g = torch.Generator().manual_seed(seed)
    per = batch // len(tasks) if mix else batch
    perms = {t: torch.randperm(len(data[t]["train"]["labels"]), generator=g) for t in tasks}
    cursor = {t: 0 for t in tasks}
    model.train()
    t0 = time.time()
    losses = []
    for step in range(steps):
        parts, tids = [], []
        for t in (tasks if mix else (tasks[step % len(tasks)],)):  # mixed batch, or tasks in turn
            if cursor[t] + per > len(perms[t]):
                perms[t], cursor[t] = torch.randperm(len(perms[t]), generator=g), 0
            idx = perms[t][cursor[t]:cursor[t] + per]
            cursor[t] += per
            parts.append({k: v[idx] for k, v in data[t]["train"].items()})
            tids += [t] * per
        b = _trim({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
        labels = b.pop("labels")
        with task_context(model, tids if mix else tids[0]):
            per_sample = F.cross_entropy(model(**b).logits, labels, reduction="none")
        loss = per_sample.mean()
        loss.backward()
        if arm == "unified":
            if mix:
                ctrl.step(loss, task_losses=per_task_losses(per_sample, tids))
            else:
                ctrl.step(loss, task_id=tids[0])
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            log(f"  [{arm} seed={seed}] step {step + 1}/{steps} loss(last 50)={sum(losses[-50:]) / 50:.4f} "
                f"mode={ctrl.mode} topology={ctrl.router.topology} ({time.time() - t0:.0f}s)")
    train_s = time.time() - t0
    metrics = evaluate(model, data, tasks)
    res = {
        "arm": arm, "seed": seed, "tasks": list(tasks), "steps": steps, "batch": batch, "lr": lr,
        "max_length": max_length, "mixed_batches": mix, "targets": tgt, "n_adapted_layers": len(adapters), "merge_rule": merge_rule if arm == "unified" else None,
        "dev": {t: {"n": data[t]["n_dev"], "n_total": data[t]["n_dev_total"]} for t in tasks},
        "metrics": metrics, "majority": {t: data[t]["majority"] for t in tasks},
        "primary": {t: primary_metric(t) for t in tasks},
        "final_mode": ctrl.mode, "final_topology": ctrl.router.topology, "train_seconds": round(train_s, 1),
        "loss_first10": _mean(losses[:10]), "loss_last10": _mean(losses[-10:]),
    }
    if arm == "unified":
        tr = ctrl.trace
        res["timeline"] = [{"step": r.step, "transition": r.transition, "event": r.components.get("event"),
                            "phi": round(r.phi, 4), "merge_residual": r.components.get("merge_residual")}
                           for r in tr if r.transition]
        res["mode_steps"] = {m: sum(r.mode == i for r in tr) for i, m in enumerate(("SINGLE", "MULTI", "MIRROR"))}
        keys = ("C", "C_grad", "C_weight", "E", "S", "phi_raw")
        res["trace_every10"] = [dict(step=r.step, mode=r.mode, phi=round(r.phi, 4),
                                     **{k: (round(r.components[k], 4) if isinstance(r.components.get(k), float)
                                            else r.components.get(k)) for k in keys})
                                for r in tr[::10]]
    return res


def timeline_str(res) -> str:
    if res["arm"] != "unified":
        return "SINGLE throughout" if res["arm"] == "shared" else "MULTI throughout"
    ev = [f"{e['step']}:{e['transition']}" for e in res["timeline"]]
    return "start SINGLE; " + (", ".join(ev) if ev else "no transition")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", default="all", choices=ARMS + ("all",))
    ap.add_argument("--tasks", nargs="+", default=["sst2", "mrpc"])
    ap.add_argument("--mix", action="store_true", help="mixed-task batches (per-sample routing) instead of tasks in turn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--dev-max", type=int, default=256, help="fixed random dev subset per task (0 = full dev)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--merge-rule", default="mean_factors", choices=("mean_factors", "svd"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top-layers", type=int, default=2, help="adapt query/value of the top N encoder layers")
    ap.add_argument("--out", default=None, help="write the result(s) as JSON here")
    a = ap.parse_args(argv)
    for flag, value, low in (("--steps", a.steps, 1), ("--batch", a.batch, 1), ("--dev-max", a.dev_max, 0),
                             ("--threads", a.threads, 1), ("--top-layers", a.top_layers, 0)):
        if value < low:
            ap.error(f"{flag} must be at least {low}, got {value}")
    if not a.lr > 0:
        ap.error(f"--lr must be positive, got {a.lr}")
    if len(set(a.tasks)) != len(a.tasks):
        ap.error(f"--tasks: each task once, got {' '.join(a.tasks)}")
    if a.mix and a.batch % len(a.tasks):
        ap.error(f"--batch: a mixed batch takes the same number of rows from each task, so --mix needs a multiple "
                 f"of the {len(a.tasks)} tasks, got {a.batch}")
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    try:
        data = load_tasks(a.tasks, tok, a.max_length, a.dev_max, a.data_dir, a.seed)
    except DataError as e:  # an unknown task, a missing GLUE folder: one line, not a traceback
        ap.error(str(e))
    results = []
    for arm in (ARMS if a.arm == "all" else (a.arm,)):
        r = run(arm, a.tasks, a.seed, a.steps, a.batch, a.lr, a.max_length, a.dev_max, a.data_dir,
                merge_rule=a.merge_rule, data=data, tokenizer=tok, model_path=path, top_layers=a.top_layers, mix=a.mix)
        results.append(r)
        print(f"{arm:8s} " + "  ".join(f"{t}: " + " ".join(f"{k}={v:.3f}" for k, v in r["metrics"][t].items())
                                       for t in a.tasks) + f"  | {timeline_str(r)}  ({r['train_seconds']}s)")
    print("majority " + "  ".join(f"{t}: " + " ".join(f"{k}={v:.3f}" for k, v in results[0]["majority"][t].items())
                                  for t in a.tasks))
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(results if len(results) > 1 else results[0], f, indent=2)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
