"""Benchmark: does the multi-task conflict C tell conflicting tasks from tasks that do not conflict?

Three task pairs, MiniLM-L6, mixed batches (half of each task, per-sample routing, as `unified-lora train --data A B`):

* same     : two random halves of MRPC train (no conflict at all: any difference is minibatch noise);
* flipped  : MRPC half A vs MRPC half B with every label flipped (the strongest conflict there is);
* rte_mrpc : RTE vs MRPC (a real pair).

Two phases per run (`--phases`):

* forced  : SINGLE for `--split-at` steps, then a forced split (theta0 = 0, so the machine goes to MULTI at its first
            decision and never comes back; theta1 = 1, so never MIRROR), MULTI for the rest. Logs C, C_grad, C_weight,
            E, S, φ each step: the measure in both modes, with the controller out of the loop.
* natural : the default machine (θ0 = 0.3, θ1 = 0.7) with a 20-step warmup and min dwell 10: what the controller does
            with these numbers (when it splits, whether it merges back).

`--grad-noise debias none` runs each with both readings of SINGLE's gradient conflict (`MultiTaskSignalConfig(
grad_noise=)`: debiased for minibatch noise, the default, or the plain cosine); each run records which.

Writes benchmarks/results/multitask_conflict.json (every step of every run) and multitask_conflict.md (mean C_grad,
C_weight and C per pair and mode, per seed; the natural runs' transitions and the loss around their first merge).
RTE needs the GLUE folder: UNIFIED_LORA_GLUE_DIR=/path/to/glue (this project's: ../shared/data/glue). A run of 140
to 240 steps took 1 to 7 min on this project's 2-core CPU, depending on what ran beside it. The committed results
came from the commands their .md files name, e.g.

    UNIFIED_LORA_GLUE_DIR=../shared/data/glue python benchmarks/multitask_conflict.py --seeds 0 1 2 \
        --pairs same flipped rte_mrpc --phases natural --steps 240 --out benchmarks/results/multitask_conflict_natural
    python benchmarks/multitask_conflict.py --seeds 0 --phases forced --steps 120 --pairs same flipped  # a quick look
    python benchmarks/multitask_conflict.py --seeds 0 --phases natural --pairs same --grad-noise debias none  # both
    python benchmarks/multitask_conflict.py --render benchmarks/results/multitask_conflict_natural  # .md from .json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAIRS = ("same", "flipped", "rte_mrpc")
KEYS = ("C", "C_grad", "C_grad_raw", "C_weight", "E", "S", "phi_raw")


def halves(task: str, train_max: int | None = None) -> tuple[list, list]:
    """Two disjoint halves of `task`'s GLUE train rows: a fixed random split (seed 1234), of the shuffle's first
    `train_max` rows where given (SST-2 has 67k)."""
    from unified_lora.data import load_glue

    rows = list(load_glue(task, "train").examples)
    random.Random(1234).shuffle(rows)
    rows = rows[:train_max] if train_max else rows
    half = len(rows) // 2
    return rows[:half], rows[half:2 * half]


def encode_rows(tokenizer, rows, max_length: int, flip: bool = False) -> dict:
    """`rows` encoded to `max_length` columns; `flip`: every (binary) label flipped."""
    from unified_lora.data import encode

    d = encode(tokenizer, rows, max_length=max_length, padding="max_length")
    if flip:
        d["labels"] = 1 - d["labels"]
    return d


def load_pairs(tokenizer, max_length: int) -> dict:
    """{pair: {task: encoded train rows}}; the MRPC halves are a fixed random split of MRPC train."""
    from unified_lora.data import load_glue

    a, b = halves("mrpc")
    ea, eb = encode_rows(tokenizer, a, max_length), encode_rows(tokenizer, b, max_length)
    rte = encode_rows(tokenizer, list(load_glue("rte", "train").examples), max_length)
    return {"same": {"mrpc_a": ea, "mrpc_b": eb},
            "flipped": {"mrpc_a": ea, "mrpc_b_flipped": encode_rows(tokenizer, b, max_length, flip=True)},
            "rte_mrpc": {"rte": rte, "mrpc": ea}}


def _trim(b: dict) -> dict:
    L = int(b["attention_mask"].sum(1).max())
    return {k: (v[:, :L] if v.dim() == 2 else v) for k, v in b.items()}


def check_bert(model_path: str) -> None:
    """A ValueError (one line) unless `model_path` holds a BERT model (MiniLM is one): `build` adapts BERT's module
    names, and `BertForSequenceClassification.from_pretrained` makes a random BERT of another model's config (GPT-2's,
    Llama's, RoBERTa's) with a note only, which would train as if it were that model."""
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(model_path).model_type
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {model_path}: cannot load its config ({str(e).strip().splitlines()[0]})") from None
    if model_type != "bert":
        raise ValueError(f"--model {model_path}: model type {model_type!r}; this benchmark adapts a BERT model's "
                         "bert.encoder.layer.N.attention.self.query/value, bert.pooler.dense and classifier, so it "
                         "takes a BERT model (MiniLM is one)")


def build(model_path: str, tasks: list, seed: int, machine, lr: float, resplit_window: int = 25,
          grad_noise: str = "debias", mode_ranks=(4, 8, 16)):
    """(model, adapters, controller, optimizer): the classifier at `model_path` (seeded: its head's init), multi-task
    LoRA on query/value of its top two layers, the pooler and the head (CPU budget), the LR not changed by mode, AdamW
    at `lr`."""
    from transformers import BertForSequenceClassification

    from unified_lora import trainable_parameters
    from unified_lora.multitask import MultiTaskSignalConfig, setup_multitask_lora

    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(model_path, num_labels=2)
    n = model.config.num_hidden_layers
    layers = "|".join(str(i) for i in range(n - 2, n))
    tgt = rf"bert\.encoder\.layer\.({layers})\.attention\.self\.(query|value)|bert\.pooler\.dense|classifier"
    adapters, ctrl = setup_multitask_lora(model, tasks, tgt, lr_mode="off", mode_ranks=mode_ranks, machine=machine,
                                          keep_trace=True, resplit_window=resplit_window,
                                          signal=MultiTaskSignalConfig(grad_noise=grad_noise))
    opt = torch.optim.AdamW(trainable_parameters(model), lr=lr, weight_decay=0.01)
    ctrl.attach_optimizer(opt)
    return model, adapters, ctrl, opt


def train(model, ctrl, opt, data: dict, steps: int, batch: int, seed: int, step_controller: bool = True,
          before_step=None, losses: list | None = None) -> float:
    """`steps` mixed batches (half of each task's rows, in an order fixed by `seed`; per-sample routing, as
    `unified-lora train --data A B`), `ctrl.step` after each backward unless `step_controller` is False (then the
    topology stays as built). `before_step(step)` runs before each forward; `losses` gets each step's mean loss.
    Returns the seconds taken."""
    from unified_lora.multitask import per_task_losses, task_context

    tasks = list(data)
    if not step_controller:
        ctrl.router.track_grads = False  # no controller step: no per-task gradient capture
    g = torch.Generator().manual_seed(seed)
    per = batch // len(tasks)
    perms = {t: torch.randperm(len(data[t]["labels"]), generator=g) for t in tasks}
    cursor = {t: 0 for t in tasks}
    model.train()
    t0 = time.time()
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        parts, tids = [], []
        for t in tasks:
            if cursor[t] + per > len(perms[t]):
                perms[t], cursor[t] = torch.randperm(len(perms[t]), generator=g), 0
            idx = perms[t][cursor[t]:cursor[t] + per]
            cursor[t] += per
            parts.append({k: v[idx] for k, v in data[t].items()})
            tids += [t] * per
        b = _trim({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
        labels = b.pop("labels")
        with task_context(model, tids):
            per_sample = F.cross_entropy(model(**b).logits, labels, reduction="none")
        loss = per_sample.mean()
        loss.backward()
        if losses is not None:
            losses.append(loss.item())
        if step_controller:
            ctrl.step(loss, task_losses=per_task_losses(per_sample, tids))
        opt.step()
        opt.zero_grad()
    return time.time() - t0


def run(pair: str, data: dict, phase: str, seed: int, steps: int, split_at: int, batch: int, lr: float,
        model_path: str, resplit_window: int = 25, grad_noise: str = "debias") -> dict:
    from unified_lora import SINGLE, MachineConfig

    tasks = list(data)
    if phase == "forced":
        machine = MachineConfig(theta0=0.0, theta1=1.0, initial_mode=SINGLE, warmup_steps=split_at)
    else:
        machine = MachineConfig(initial_mode=SINGLE, warmup_steps=20, min_dwell=10)
    model, _, ctrl, opt = build(model_path, tasks, seed, machine, lr, resplit_window, grad_noise)
    seconds = train(model, ctrl, opt, data, steps, batch, seed)
    trace = [dict(step=r.step, mode=r.mode, phi=r.phi, loss=r.loss, event=r.components.get("event"),
                  **{k: r.components.get(k) for k in KEYS},
                  rho={k[4:-1]: v for k, v in r.components.items() if k.startswith("rho[")}) for r in ctrl.trace]
    return {"pair": pair, "phase": phase, "seed": seed, "tasks": tasks, "steps": steps,
            "split_at": split_at if phase == "forced" else None, "batch": batch, "lr": lr,
            "resplit_window": resplit_window, "grad_noise": grad_noise, "failed_merges": ctrl.failed_merges,
            "transitions": [{"step": r.step, "transition": r.transition} for r in ctrl.trace if r.transition],
            "final_mode": ctrl.mode, "seconds": round(seconds, 1), "trace": trace}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def _f(x):
    return "-" if x is None else f"{x:.3f}"


def report(runs: list, settings: dict) -> str:
    lines = ["# Multi-task conflict signal: same vs flipped vs real task pairs (MiniLM-L6, CPU)", "",
             f"`{settings['command']}`", "",
             f"Mixed batches of {settings['batch']} (half each task), max_length {settings['max_length']}, AdamW lr "
             f"{settings['lr']}, LoRA on query/value of the top two layers, the pooler and the classifier, ranks "
             f"4/8/16 (SINGLE/MULTI/MIRROR). Pairs: *same* = two random halves of MRPC train; *flipped* = the same "
             f"halves, the second with every label flipped; *rte_mrpc* = RTE vs MRPC half A.", ""]
    forced = [r for r in runs if r["phase"] == "forced"]
    if forced:
        s = forced[0]["split_at"]
        lines += [f"## Forced split (SINGLE steps 20..{s - 1}, then MULTI from step {s}; mean over the steps)", "",
                  "Columns: SINGLE C_grad; MULTI C_grad, C_weight, C (what φ uses), over MULTI's last half too. "
                  "One row per seed.", "",
                  "| pair | seed | SINGLE C_grad | MULTI C_grad | MULTI C_weight | MULTI C | MULTI C (last half) | "
                  "MULTI φ (last half) | MULTI C_weight, first / last 20 steps |", "|---|---|---|---|---|---|---|---|---|"]
        for r in forced:
            tr = r["trace"]
            single = [x for x in tr if x["mode"] == 0 and x["step"] >= 20]
            multi = [x for x in tr if x["mode"] == 1]
            late = multi[len(multi) // 2:]
            lines.append(f"| {r['pair']} | {r['seed']} | {_f(_mean(x['C_grad'] for x in single))} | "
                         f"{_f(_mean(x['C_grad'] for x in multi))} | {_f(_mean(x['C_weight'] for x in multi))} | "
                         f"{_f(_mean(x['C'] for x in multi))} | {_f(_mean(x['C'] for x in late))} | "
                         f"{_f(_mean(x['phi'] for x in late))} | {_f(_mean(x['C_weight'] for x in multi[:20]))} / "
                         f"{_f(_mean(x['C_weight'] for x in multi[-20:]))} |")
        lines.append("")
    natural = [r for r in runs if r["phase"] == "natural"]
    if natural:
        lines += ["## Natural (default machine: θ0 = 0.3, θ1 = 0.7, warmup 20, min dwell 10)", "",
                  "Re-splits within `resplit_window` of their merge bring the task adapters back (a window of 0: "
                  "every split copies the merged adapter). Loss: the mixed batch's mean training loss over the "
                  "last 50 steps. grad_noise: `MultiTaskSignalConfig(grad_noise=)`, debias = each task pair's "
                  "gradient conflict weighted by the tasks' reliability ρ, none = the plain cosine (runs from before "
                  "the setting: none). C_grad in SINGLE (steps from 20, the warmup's end): the conflict the run read "
                  "(mean / max), the plain cosine's (the same with none), and the mean ρ over the tasks (recorded since "
                  "grad_noise).", "",
                  "| pair | seed | resplit_window | grad_noise | transitions | final mode | "
                  "steps in SINGLE / MULTI / MIRROR | merges | re-splits in the window | loss, last 50 steps | "
                  "SINGLE C_grad mean / max | SINGLE plain C_grad mean / max | SINGLE ρ mean |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in natural:
            tl = ", ".join(f"{t['step']}:{t['transition']}" for t in r["transitions"]) or "none"
            counts = " / ".join(str(sum(x["mode"] == m for x in r["trace"])) for m in range(3))
            ev = [(x["step"], x.get("event")) for x in r["trace"] if x.get("event")]
            merges = [st for st, e in ev if e == "merge"]
            w = r.get("resplit_window", 0)
            back = sum(1 for st, e in ev if e == "split" and w and any(0 <= st - m <= w for m in merges))
            last = [x["loss"] for x in r["trace"][-50:]]
            single = [x for x in r["trace"] if x["mode"] == 0 and x["step"] >= 20]

            def mean_max(key):
                xs = [x.get(key) for x in single if x.get(key) is not None]
                return f"{_f(_mean(xs))} / {_f(max(xs))}" if xs else "-"

            rho = _mean(_mean(x["rho"].values()) for x in single if x.get("rho"))
            lines.append(f"| {r['pair']} | {r['seed']} | {w} | {r.get('grad_noise', 'none')} | {tl} | "
                         f"{r['final_mode']} | {counts} | {len(merges)} | {back} | {_f(_mean(last))} | "
                         f"{mean_max('C_grad')} | {mean_max('C_grad' if r.get('grad_noise', 'none') == 'none' else 'C_grad_raw')} | "
                         f"{_f(rho)} |")
        around = [(r, [x["step"] for x in r["trace"] if x.get("event") == "merge"]) for r in natural]
        around = [(r, m[0]) for r, m in around if m]
        if around:
            lines += ["", "Loss around each run's first merge (mean training loss of the mixed batch): the 20 steps "
                      "before it, the merged steps until the next split, and the 20 steps after that split (and the "
                      "30 after those). A split within `resplit_window` brings the task adapters back; with 0 the "
                      "tasks start over from the merged adapter.", "",
                      "| pair | seed | resplit_window | merge at | before | merged | 20 steps after the split | "
                      "the 30 after those |", "|---|---|---|---|---|---|---|---|"]
            for r, m in around:
                tr = r["trace"]
                nxt = next((x["step"] for x in tr if x["step"] > m and x.get("event") == "split"), None)

                def span(a, b):
                    return _f(_mean(x["loss"] for x in tr if a <= x["step"] < b))

                end = nxt if nxt is not None else r["steps"]
                tail = ("-", "-") if nxt is None else (span(nxt, nxt + 20), span(nxt + 20, nxt + 50))
                lines.append(f"| {r['pair']} | {r['seed']} | {r.get('resplit_window', 0)} | {m} | {span(m - 20, m)} | "
                             f"{span(m, end)} | {tail[0]} | {tail[1]} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=PAIRS)
    ap.add_argument("--phases", nargs="+", default=["forced", "natural"], choices=("forced", "natural"))
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--split-at", type=int, default=60, help="forced phase: the step of the forced split")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resplit-windows", type=int, nargs="+", default=[25],
                    help="natural phase: one run per value of MultiTaskController(resplit_window=) (0 = a split always "
                         "copies the shared adapter, as before it existed); the forced phase never merges, so it "
                         "runs with the first")
    ap.add_argument("--grad-noise", nargs="+", default=["debias"], choices=("debias", "none"),
                    help="MultiTaskSignalConfig(grad_noise=): one run per value (debias: each task pair's gradient "
                         "conflict weighted by the tasks' gradient reliability; none: the plain cosine, as before)")
    ap.add_argument("--out", default=str(RESULTS / "multitask_conflict"),
                    help="writes OUT.json and OUT.md")
    ap.add_argument("--render", metavar="OUT", help="write OUT.md from OUT.json (no run)")
    a = ap.parse_args(argv)
    if a.render:
        saved = json.loads(Path(a.render).with_suffix(".json").read_text())
        Path(a.render).with_suffix(".md").write_text(report(saved["runs"], saved["settings"]))
        return
    if a.batch % 2:
        ap.error(f"--batch: a mixed batch takes half its rows from each task, so it must be even, got {a.batch}")
    if not 0 < a.split_at < a.steps:
        ap.error(f"--split-at must be in (0, --steps), got {a.split_at}")
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    from unified_lora.data import default_model_path

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    data = load_pairs(tok, a.max_length)
    settings = {"command": "python benchmarks/multitask_conflict.py " + " ".join(argv if argv is not None else
                                                                                  __import__("sys").argv[1:]),
                "batch": a.batch, "max_length": a.max_length, "lr": a.lr}
    runs = []
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for phase in a.phases:
        for pair in a.pairs:
            for seed in a.seeds:
              for w in (a.resplit_windows if phase == "natural" else a.resplit_windows[:1]):
               for gn in a.grad_noise:
                r = run(pair, data[pair], phase, seed, a.steps, a.split_at, a.batch, a.lr, path, w, gn)
                runs.append(r)
                tl = ", ".join(f"{t['step']}:{t['transition']}" for t in r["transitions"]) or "none"
                print(f"{phase} {pair} seed={seed} resplit_window={w} grad_noise={gn}: {tl} ({r['seconds']}s)",
                      flush=True)
                tmp = out.with_suffix(".json.tmp")
                tmp.write_text(json.dumps({"settings": settings, "runs": runs}))
                tmp.replace(out.with_suffix(".json"))
    md = report(runs, settings)
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
