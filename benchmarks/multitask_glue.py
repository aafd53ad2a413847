"""Benchmark: shared vs multi vs unified on two GLUE tasks, several seeds (CPU-sized).

Runs `examples/multitask_glue.py`'s `run()` for every (seed, arm), writes one JSON per run to
benchmarks/results/multitask_<arm>_s<seed>.json (a run whose file exists is skipped, so an
interrupted benchmark resumes), then benchmarks/results/multitask.md: mean ± std over the
seeds that finished, with the majority baseline beside it.

    nice -n 10 python benchmarks/multitask_glue.py --seeds 0 1 2
    python benchmarks/multitask_glue.py --report-only        # rebuild multitask.md from the JSONs
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _example():
    spec = importlib.util.spec_from_file_location("multitask_glue_example", ROOT / "examples" / "multitask_glue.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fmt(vals):
    if not vals:
        return "-"
    m = statistics.mean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{m:.3f} ± {s:.3f}"


def _read(f: Path) -> dict:
    try:
        return json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"{f}: not a readable run JSON ({type(e).__name__}: {e}); delete it to run it again") from None


def check_config(results: Path, tasks, steps: int, dev_max: int) -> None:
    """Refuse a request whose tasks, steps or dev subset differ from a run already in `results`: that run's file
    would be skipped as done and the table would pool both settings under the first run's header."""
    for f in sorted(results.glob("multitask_*_s*.json")):
        r = _read(f)
        old = {"tasks": r["tasks"], "steps": r["steps"], "dev": {t: d["n"] for t, d in r["dev"].items()}}
        want = {"tasks": list(tasks), "steps": steps,
                "dev": {t: min(dev_max, d["n_total"]) for t, d in r["dev"].items()}}
        diff = {k: (old[k], want[k]) for k in old if old[k] != want[k]}
        if diff:
            raise SystemExit(f"{f.name} was run with other settings {diff} (its value, this command's); "
                             "use another --results-dir, or delete the old runs")


def report(arms=("shared", "multi", "unified"), results: Path = RESULTS) -> str:
    runs = []
    for f in sorted(results.glob("multitask_*_s*.json")):
        runs.append(_read(f))
    if not runs:
        return "no results yet\n"
    tasks = runs[0]["tasks"]
    metrics = {t: list(runs[0]["metrics"][t]) for t in tasks}
    r0 = runs[0]
    lines = [
        "# Multi-task mode: shared vs multi vs unified (GLUE, MiniLM-L6, CPU)",
        "",
        f"Tasks {' + '.join(tasks)}; {r0['steps']} steps (tasks in turn{', mixed batches' if r0.get('mixed_batches') else ''}), "
        f"batch {r0['batch']}, AdamW lr {r0['lr']}, max_length {r0['max_length']}; LoRA on `{r0['targets']}`. "
        f"Dev sets: fixed random subsets of " + ", ".join(f"{r0['dev'][t]['n']}/{r0['dev'][t]['n_total']} ({t})" for t in tasks)
        + ". Mean ± std over seeds (n = number of seeds that finished).",
        "",
        "| arm | n | " + " | ".join(f"{t} {m}" for t in tasks for m in metrics[t]) + " | final mode | transitions (per seed) |",
        "|---|---|" + "---|" * sum(len(metrics[t]) for t in tasks) + "---|---|",
    ]
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        if not rs:
            lines.append(f"| {arm} | 0 |" + " - |" * sum(len(metrics[t]) for t in tasks) + " - | not run |")
            continue
        cells = [_fmt([r["metrics"][t][m] for r in rs]) for t in tasks for m in metrics[t]]
        modes = ", ".join(str(r["final_mode"]) for r in rs)
        if arm == "unified":
            tl = "; ".join(f"s{r['seed']}: " + (", ".join(f"{e['step']}:{e['transition']}" for e in r["timeline"]) or "none")
                           for r in rs)
        else:
            tl = "none (fixed topology)"
        lines.append(f"| {arm} | {len(rs)} | " + " | ".join(cells) + f" | {modes} | {tl} |")
    maj = r0["majority"]
    lines.append("| majority class | - | " + " | ".join(f"{maj[t][m]:.3f}" for t in tasks for m in metrics[t]) + " | - | - |")
    lines += ["", "Mode 0 = SINGLE (shared adapter), 1 = MULTI (task adapters), 2 = MIRROR. "
              "Seeds change the LoRA init, classifier init and data order; the dev subsets are the same for all runs.",
              "",
              "Arms: *shared* = one adapter for both tasks (rank 8, never split); *multi* = one adapter per task from "
              "step 0 (rank 8, never merged); *unified* = MultiTaskController (starts SINGLE at rank 4, no decision "
              "during a 20-step warmup, min dwell 10, MULTI rank 8, default C/E/S weights, LR not changed by mode). "
              "The classifier is a LoRA target, so in MULTI each task also has its own head delta. "
              "This is a short CPU budget (each task sees 35 batches of 16): it compares topologies at an equal "
              "budget; the scores are far from converged GLUE numbers. An MRPC F1 at 0.809 is the always-"
              "'equivalent' majority predictor.", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=["shared", "multi", "unified"])
    ap.add_argument("--tasks", nargs="+", default=["sst2", "mrpc"])
    ap.add_argument("--steps", type=int, default=70, help="70 = what fits 9 runs on a shared 2-core CPU")
    ap.add_argument("--dev-max", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--results-dir", default=str(RESULTS), help="folder for the run JSONs and multitask.md")
    a = ap.parse_args(argv)
    results = Path(a.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    if not a.report_only:
        check_config(results, a.tasks, a.steps, a.dev_max)
        torch.set_num_threads(a.threads)
        from transformers import AutoTokenizer

        from unified_lora.data import default_model_path

        ex = _example()
        path = default_model_path()
        tok = AutoTokenizer.from_pretrained(path)
        data = ex.load_tasks(a.tasks, tok, 48, a.dev_max, None, 0)
        for seed in a.seeds:
            for arm in a.arms:
                out = results / f"multitask_{arm}_s{seed}.json"
                if out.exists():  # same settings: check_config
                    print(f"skip {out.name} (done)", flush=True)
                    continue
                t0 = time.time()
                r = ex.run(arm, a.tasks, seed, a.steps, data=data, tokenizer=tok, model_path=path, dev_max=a.dev_max)
                tmp = out.with_suffix(".tmp")  # an interrupted write leaves no JSON that reads as done
                tmp.write_text(json.dumps(r, indent=2))
                tmp.replace(out)
                print(f"{arm} seed={seed}: {r['metrics']} ({time.time() - t0:.0f}s)", flush=True)
                (results / "multitask.md").write_text(report(a.arms, results))
    md = report(a.arms, results)
    (results / "multitask.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
