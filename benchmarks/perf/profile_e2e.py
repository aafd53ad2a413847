"""Where the end-to-end time goes: the e2e training step, split into phases and profiled op by op.

    python benchmarks/perf/profile_e2e.py                          # unified_v1 vs peft_r8, 3 rounds
    python benchmarks/perf/profile_e2e.py --arms unified,unified_v1,peft_r8 --warmup 0 --steps 229 --profile-steps 5
                                                      # one MRPC epoch per arm, as e2e.py, phase by phase
    python benchmarks/perf/profile_e2e.py --arms unified,unified_v1,peft_r8 --interleaved --warmup 5 --steps 229
                                                      # the arms in one process, taking turns step by step
    python benchmarks/perf/profile_e2e.py --quick                  # tiny random BERT, smoke test

`e2e.py` measures the whole loop; this script says which part of the step differs.
Every arm runs in its own fresh process, built exactly as `e2e.py` builds it
(`e2e.build_arm`: MiniLM, query/value adapters, classifier trained, AdamW, MRPC
batches of 16 in the same order). After `--warmup` steps it times `--steps`
steps phase by phase (forward, backward, loss.item + ctrl.step, opt.step,
zero_grad; host clock, nothing else running in the process) and counts the
process's minor page faults and context switches over them; then it runs
`--profile-steps` more steps under torch.profiler (CPU, input shapes recorded).
Arms run in rotating order, round after round. The report gives each phase's
median per-step time and each arm's ratio to the baseline arm (the last), the profiler's self-CPU
total per step, and the ops (by name, and by name + input shapes) whose self-CPU
time differs most between the arms.

`--interleaved` builds every arm in one process instead and lets them take
turns step by step on the same batch (rotating which goes first). What differs
between processes or over minutes (memory placement, the machine's state) then
falls on all arms alike, and every step gives a paired ratio: this isolates
what our code costs per step from the run-to-run spread of `e2e.py`.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import LoadMonitor, command_line, contention_note, environment, fmt_range, publish, summarize  # noqa: E402
from e2e import add_common_args, batches, build_arm, common_child_args, run_rounds  # noqa: E402

PHASES = ("forward", "backward", "controller", "optimizer", "zero_grad")


def make_step(model, opt, ctrl, ranks: list):
    """One training step as e2e.py runs it, optionally timed phase by phase into `times`."""

    def step(batch, times=None):
        t0 = time.perf_counter()
        loss = model(**batch).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        value = loss.item()  # every arm reads its loss, as a logging loop does
        if ctrl is not None:
            ctrl.step(loss=value)
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        if times is not None:
            ranks.append(None if ctrl is None else ctrl.rank)
            for name, a, b in zip(PHASES, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5)):
                times[name].append(b - a)

    return step


def child(args) -> None:
    from torch.profiler import ProfilerActivity, profile

    n_total = args.warmup + args.steps + args.profile_steps
    model, opt, ctrl, loader = build_arm(args.child.split("#")[0], args.model, n_total, args.max_length, args.threads)
    it = batches(loader, n_total)
    ranks = []
    gc_time, gc_count = [0.0], [0, 0, 0]

    def gc_clock(phase, info, _t=[0.0]):  # Python's garbage collector: collections and their time
        if phase == "start":
            _t[0] = time.perf_counter()
        else:
            gc_time[0] += time.perf_counter() - _t[0]
            gc_count[info["generation"]] += 1

    step = make_step(model, opt, ctrl, ranks)

    for _ in range(args.warmup):
        step(next(it))
    times = {p: [] for p in PHASES}
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    gc.callbacks.append(gc_clock)
    w0 = time.perf_counter()
    for _ in range(args.steps):
        step(next(it), times)
    wall = time.perf_counter() - w0
    gc.callbacks.remove(gc_clock)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        p0 = time.perf_counter()
        for _ in range(args.profile_steps):
            step(next(it))
        prof_wall = time.perf_counter() - p0
    per = max(args.profile_steps, 1)
    by_name, by_shape = {}, {}
    for ev in prof.key_averages(group_by_input_shape=True):
        self_us = ev.self_cpu_time_total / per
        by_name.setdefault(ev.key, [0.0, 0])
        by_name[ev.key][0] += self_us
        by_name[ev.key][1] += ev.count / per
        by_shape[f"{ev.key} {ev.input_shapes}"] = [self_us, ev.count / per]
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    print(json.dumps({
        "arm": args.child, "steps": args.steps, "wall_s": wall,
        "phase_s": {p: statistics.median(v) for p, v in times.items()},
        "phase_total_s": {p: sum(v) for p, v in times.items()},
        "minor_faults_per_step": (ru1.ru_minflt - ru0.ru_minflt) / args.steps,
        "major_faults": ru1.ru_majflt - ru0.ru_majflt,
        "gc_ms_per_step": gc_time[0] * 1e3 / args.steps, "gc_collections_by_generation": gc_count,
        "vol_ctx_switches_per_step": (ru1.ru_nvcsw - ru0.ru_nvcsw) / args.steps,
        "invol_ctx_switches_per_step": (ru1.ru_nivcsw - ru0.ru_nivcsw) / args.steps,
        "profiled_wall_per_step_s": prof_wall / per,
        "self_cpu_per_step_us": sum(v[0] for v in by_name.values()),
        "ops_by_name": by_name, "ops_by_shape": by_shape,
        "trainable_tensors": n_trainable,
        "mean_rank": None if ctrl is None else sum(ranks) / len(ranks)}))


def interleaved(args) -> dict:
    """All arms in this one process, step by step on the same batch, in rotating order: a
    process-level difference (memory placement, the machine's state over minutes) then falls on
    every arm alike, and each step gives one paired ratio per arm."""
    arms = args.arms.split(",")
    n_total = args.warmup + args.steps
    built = {a: build_arm(a.split("#")[0], args.model, n_total, args.max_length, args.threads) for a in arms}
    its = {a: batches(b[3], n_total) for a, b in built.items()}
    ranks = {a: [] for a in arms}
    steps = {a: make_step(*built[a][:3], ranks[a]) for a in arms}
    times = {a: {p: [] for p in PHASES} for a in arms}
    for i in range(n_total):
        order = arms[i % len(arms):] + arms[:i % len(arms)]
        for a in order:
            steps[a](next(its[a]), times[a] if i >= args.warmup else None)
    base = arms[-1]
    step_ms = {a: [sum(ph) * 1e3 for ph in zip(*times[a].values())] for a in arms}
    summary, ratios = {}, {}
    for a in arms:
        summary[a] = {"step_ms": summarize(step_ms[a]),
                      "total_s": sum(step_ms[a]) / 1e3,
                      "phase_ms": {p: summarize([t * 1e3 for t in times[a][p]]) for p in PHASES},
                      "trainable_tensors": sum(1 for p in built[a][0].parameters() if p.requires_grad),
                      "mean_rank": None if built[a][2] is None else sum(ranks[a]) / len(ranks[a])}
    for a in arms[:-1]:
        ratios[a] = {"step": summarize([x / y for x, y in zip(step_ms[a], step_ms[base])]),
                     "total": summary[a]["total_s"] / summary[base]["total_s"]}
        for p in PHASES:
            ratios[a][p] = sum(times[a][p]) / max(sum(times[base][p]), 1e-12)
    return {"summary": summary, "ratios": ratios}


def render_interleaved(p: dict) -> str:
    s = p["setup"]
    b = s["baseline"]
    lines = ["## End-to-end step, all arms interleaved in one process", "",
             f"Command: `{p['command']}` — {p['env']['utc']}. {s['model']}, MRPC batches of {s['batch_size']}, "
             f"max_length {s['max_length']}, {s['threads']} threads; {s['warmup']} warm-up and {s['steps']} timed "
             f"steps per arm, the arms taking turns on the same batch in rotating order, in one process.",
             contention_note(p["load"]), "",
             f"| arm | tensors | mean rank | step ms, median (min–max) | step ratio to {b}, median (min–max) "
             f"| total time ratio | forward | backward | controller | optimizer | zero_grad |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a, sa in p["summary"].items():
        r = p["ratios"].get(a)
        rank = "–" if sa["mean_rank"] is None else f"{sa['mean_rank']:.2f}"
        cells = ["–"] * 7 if r is None else [fmt_range(r["step"]), f"{r['total']:.3f}"] + [
            f"{r[ph]:.3f}" for ph in PHASES]
        lines.append(f"| {a} | {sa['trainable_tensors']} | {rank} | {fmt_range(sa['step_ms'], 1)} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Phase columns: that phase's total time over the timed steps ÷ the baseline's. Per-step phase "
              "medians (ms): " + "; ".join(
                  f"{a} " + ", ".join(f"{ph} {sa['phase_ms'][ph]['median']:.2f}" for ph in PHASES)
                  for a, sa in p["summary"].items()) + "."]
    return "\n".join(lines)


def _median_dict(dicts: list[dict]) -> dict:
    keys = set().union(*dicts)
    return {k: statistics.median([d.get(k, [0.0, 0])[0] for d in dicts]) for k in keys}


def _diff_table(ours: list[dict], base: list[dict], top: int) -> list[dict]:
    mo, mb = _median_dict(ours), _median_dict(base)
    cnt_o = {k: statistics.median([d.get(k, [0.0, 0])[1] for d in ours]) for k in mo}
    cnt_b = {k: statistics.median([d.get(k, [0.0, 0])[1] for d in base]) for k in mb}
    rows = [{"op": k, "ours_us": mo.get(k, 0.0), "base_us": mb.get(k, 0.0), "diff_us": mo.get(k, 0.0) - mb.get(k, 0.0),
             "ours_calls": cnt_o.get(k, 0), "base_calls": cnt_b.get(k, 0)} for k in set(mo) | set(mb)]
    rows.sort(key=lambda r: -abs(r["diff_us"]))
    return rows[:top]


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default="unified_v1,peft_r8",
                    help="the last arm is the baseline; the op diff is the first arm against it. A suffix '#x' "
                         "(peft_r8#b) runs the same arm again under another name: an A/A control")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40, help="phase-timed steps per arm and round")
    ap.add_argument("--profile-steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--interleaved", action="store_true",
                    help="all arms in one process, taking turns step by step (no profiler; paired step ratios)")
    add_common_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.rounds, args.warmup, args.steps, args.profile_steps = args.model or "tiny", 1, 1, 3, 2
        args.max_length, args.threads = 32, 1
    if args.child:
        child(args)
        return None
    arms = args.arms.split(",")
    if len(arms) < 2:
        raise SystemExit("--arms: give at least two arms (ours first, the baseline last)")
    load = LoadMonitor(own_threads=args.threads)
    if args.interleaved:
        res = interleaved(args)
        payload = {"benchmark": "profile_e2e_interleaved", "command": command_line(), "env": environment(),
                   "load": load.record(),
                   "setup": {"model": args.model or "all-MiniLM-L6-v2", "task": "mrpc", "batch_size": 16,
                             "max_length": args.max_length, "threads": args.threads, "warmup": args.warmup,
                             "steps": args.steps, "arms": arms, "baseline": arms[-1]}, **res}
        return publish("perf_profile_e2e_interleaved", payload, render_interleaved, args.quick, args.results_dir)
    child_args = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--profile-steps", str(args.profile_steps),
                  *common_child_args(args)]
    runs = run_rounds(__file__, arms, args.rounds, child_args, load,
                      lambda r: f"{r['wall_s'] / args.steps * 1e3:.1f} ms/step")
    ours, base = arms[0], arms[-1]
    summary = {}
    for a, rs in runs.items():
        summary[a] = {
            "step_ms": summarize([r["wall_s"] / r["steps"] * 1e3 for r in rs]),
            "phase_ms": {p: summarize([r["phase_s"][p] * 1e3 for r in rs]) for p in PHASES},
            "self_cpu_ms": summarize([r["self_cpu_per_step_us"] / 1e3 for r in rs]),
            "profiled_wall_ms": summarize([r["profiled_wall_per_step_s"] * 1e3 for r in rs]),
            "minor_faults_per_step": summarize([r["minor_faults_per_step"] for r in rs]),
            "gc_ms_per_step": summarize([r["gc_ms_per_step"] for r in rs]),
            "invol_ctx_switches_per_step": summarize([r["invol_ctx_switches_per_step"] for r in rs]),
            "trainable_tensors": rs[0]["trainable_tensors"],
            "mean_rank": None if rs[0]["mean_rank"] is None else statistics.median(r["mean_rank"] for r in rs)}
    ratios = {}  # every arm but the baseline, against the baseline, round by round
    for a in arms[:-1]:
        ratios[a] = {"step": summarize([o["wall_s"] / b["wall_s"] for o, b in zip(runs[a], runs[base])])}
        for p in PHASES:
            ratios[a][p] = summarize([o["phase_total_s"][p] / max(b["phase_total_s"][p], 1e-12)
                                      for o, b in zip(runs[a], runs[base])])
    payload = {"benchmark": "profile_e2e", "command": command_line(), "env": environment(), "load": load.record(),
               "setup": {"model": args.model or "all-MiniLM-L6-v2", "task": "mrpc", "batch_size": 16,
                         "max_length": args.max_length, "threads": args.threads, "warmup": args.warmup,
                         "steps": args.steps, "profile_steps": args.profile_steps, "rounds": args.rounds,
                         "ours": ours, "baseline": base},
               "summary": summary, "ratios": ratios,
               "ops_diff_by_name": _diff_table([r["ops_by_name"] for r in runs[ours]],
                                               [r["ops_by_name"] for r in runs[base]], args.top),
               "ops_diff_by_shape": _diff_table([r["ops_by_shape"] for r in runs[ours]],
                                                [r["ops_by_shape"] for r in runs[base]], args.top),
               "runs": [{k: v for k, v in r.items() if not k.startswith("ops_")} for a in arms for r in runs[a]]}
    return publish("perf_profile_e2e", payload, render, args.quick, args.results_dir)


def render(p: dict) -> str:
    s = p["setup"]
    o, b = s["ours"], s["baseline"]
    so, sb = p["summary"][o], p["summary"][b]
    lines = ["## Profile of the end-to-end step (where the time goes)", "",
             f"Command: `{p['command']}` — {p['env']['utc']}. {s['model']}, MRPC batches of {s['batch_size']}, "
             f"max_length {s['max_length']}, {s['threads']} threads; per arm and round {s['warmup']} warm-up, "
             f"{s['steps']} phase-timed and {s['profile_steps']} profiled steps; {s['rounds']} rounds, one process "
             f"per arm. `{o}` ({so['trainable_tensors']} trainable tensors"
             + ("" if so["mean_rank"] is None else f", mean rank {so['mean_rank']:.2f} over the timed steps")
             + f") against `{b}` "
             f"({sb['trainable_tensors']}).", contention_note(p["load"]), "",
             "| arm | phase | ms/step | ratio to " + b + " |", "|---|---|---|---|"]
    for a, sa in p["summary"].items():
        for ph in ("step",) + PHASES:
            ms = sa["step_ms"] if ph == "step" else sa["phase_ms"][ph]
            ratio = fmt_range(p["ratios"][a][ph]) if a in p["ratios"] else "–"
            lines.append(f"| {a} | {'whole step' if ph == 'step' else ph} | {fmt_range(ms, 2)} | {ratio} |")
    lines += ["", f"Phase times are medians over the timed steps (ratio: phase total over the timed steps, "
              f"per round). Profiled steps: self CPU {so['self_cpu_ms']['median']:.1f} ms/step ({o}) against "
              f"{sb['self_cpu_ms']['median']:.1f} ({b}); wall under the profiler {so['profiled_wall_ms']['median']:.1f} "
              f"against {sb['profiled_wall_ms']['median']:.1f}. Minor page faults per step "
              f"{so['minor_faults_per_step']['median']:.0f} against {sb['minor_faults_per_step']['median']:.0f}; "
              f"involuntary context switches per step {so['invol_ctx_switches_per_step']['median']:.1f} against "
              f"{sb['invol_ctx_switches_per_step']['median']:.1f}." + (
                  "" if "gc_ms_per_step" not in so else
                  f" Python garbage collection per step {so['gc_ms_per_step']['median']:.3f} ms against "
                  f"{sb['gc_ms_per_step']['median']:.3f}."), "",
              "Ops whose self-CPU time per step differs most (median over rounds; µs and calls per step):", "",
              f"| op | {o} µs | {b} µs | diff µs | calls {o} / {b} |", "|---|---|---|---|---|"]
    for r in p["ops_diff_by_name"]:
        lines.append(f"| `{r['op']}` | {r['ours_us']:.0f} | {r['base_us']:.0f} | {r['diff_us']:+.0f} | "
                     f"{r['ours_calls']:.0f} / {r['base_calls']:.0f} |")
    lines += ["", "By op and input shapes (top rows):", "",
              f"| op, input shapes | {o} µs | {b} µs | diff µs | calls {o} / {b} |", "|---|---|---|---|---|"]
    for r in p["ops_diff_by_shape"][:10]:
        lines.append(f"| `{r['op']}` | {r['ours_us']:.0f} | {r['base_us']:.0f} | {r['diff_us']:+.0f} | "
                     f"{r['ours_calls']:.0f} / {r['base_calls']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
