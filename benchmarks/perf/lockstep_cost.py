"""Lockstep check: what `ctrl.step`'s loss reduction costs with the lockstep fingerprint in it, against the plain
1-number all-reduce (`distributed_mean`, what the default reduction was before), on gloo with 2 CPU processes.

    python benchmarks/perf/lockstep_cost.py          # 20 repeats of 100 steps per arm
    python benchmarks/perf/lockstep_cost.py --quick

Both arms run in the same 2 processes, interleaved step by step (the order alternates):
- `lockstep`: a `UnifiedController()` with the default `reduce_loss`, so `ctrl.step` calls `lockstep_mean`
  (one all-reduce of [loss, packed fingerprint] and the check).
- `plain`: the same controller with `reduce_loss=lambda v: distributed_mean(v)` (one all-reduce of [loss], no check:
  a `reduce_loss` of your own is called as given).
Timed: the reduction alone (`ctrl._read_loss`) and the whole `ctrl.step` (the v1 loss signal, no adapters, so the
reduction is most of it). Per repeat, the median of its steps per arm and their ratio; then median (min–max) over
repeats. On NCCL (a GPU) this was not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import LoadMonitor, command_line, contention_note, environment, fmt_range, publish, summarize  # noqa: E402

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, repeats: int, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    from unified_lora import UnifiedController, distributed_mean

    arms = {"lockstep": UnifiedController(print_fn=None, keep_trace=False),
            "plain": UnifiedController(print_fn=None, keep_trace=False, reduce_loss=lambda v: distributed_mean(v))}
    res = {what: {a: [] for a in arms} for what in ("reduction", "step")}
    for what, call in (("reduction", lambda c: c._read_loss(1.0 + rank)), ("step", lambda c: c.step(1.0 + rank))):
        for _ in range(50):  # warm-up, both arms
            for c in arms.values():
                call(c)
        for _ in range(repeats):
            times = {a: [] for a in arms}
            for i in range(steps):
                for a in (("lockstep", "plain") if i % 2 else ("plain", "lockstep")):
                    t0 = time.perf_counter()
                    call(arms[a])
                    times[a].append(time.perf_counter() - t0)
            for a in arms:
                res[what][a].append(statistics.median(times[a]))
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--steps", type=int, default=100, help="steps per arm in one repeat")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.steps = 3, 20

    import torch.multiprocessing as mp

    load = LoadMonitor(own_threads=WORLD)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res.json")
        mp.spawn(worker, args=(_free_port(), args.repeats, args.steps, out), nprocs=WORLD)
        res = json.loads(Path(out).read_text())
    payload = {"benchmark": "lockstep_cost", "command": command_line(), "env": environment(), "load": load.record(),
               "device": "cpu", "backend": "gloo", "world_size": WORLD, "repeats": args.repeats, "steps": args.steps}
    for what in ("reduction", "step"):
        lock, plain = res[what]["lockstep"], res[what]["plain"]
        payload[what] = {"lockstep_s": summarize(lock), "plain_s": summarize(plain),
                         "ratio": summarize([x / y for x, y in zip(lock, plain)]),
                         "added_s": summarize([x - y for x, y in zip(lock, plain)])}
    return publish("perf_lockstep_cost", payload, render, quick=args.quick, results_dir=args.results_dir)


def render(p: dict) -> str:
    us = dict(scale=1e6, digits=0, unit=" µs")
    rows = []
    for what, label in (("reduction", "the loss reduction (`ctrl._read_loss`)"),
                        ("step", "the whole `ctrl.step` (v1 loss signal, no adapters)")):
        r = p[what]
        rows.append(f"| {label} | {fmt_range(r['plain_s'], **us)} | {fmt_range(r['lockstep_s'], **us)} | "
                    f"{fmt_range(r['added_s'], **us)} | {fmt_range(r['ratio'], 2)} |")
    return "\n".join([
        f"## Lockstep check (`lockstep_cost.py`) on {p['device']}, {p['backend']}, {p['world_size']} processes",
        "",
        f"`{p['command']}`; {p['repeats']} repeats of {p['steps']} steps per arm, interleaved step by step; per "
        "repeat the median step, then median (min–max) over repeats. Not measured on NCCL.",
        "",
        "| timed | plain all-reduce of [loss] | with the lockstep check | added | ratio |",
        "|---|---|---|---|---|",
        *rows,
        "",
        contention_note(p["load"]),
    ])


if __name__ == "__main__":
    main()
