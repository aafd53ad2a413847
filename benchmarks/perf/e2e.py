"""End to end: MiniLM fine-tuning on MRPC, unified-lora vs PEFT LoRA r8 and r16 - wall time and peak RSS.

    python benchmarks/perf/e2e.py                  # 40 steps per arm, 2 rounds
    python benchmarks/perf/e2e.py --steps 229      # one full MRPC epoch (3668 / 16)
    python benchmarks/perf/e2e.py --quick

Every arm runs in its own fresh Python process (so peak RSS is that arm's
alone): load MiniLM (or `--model`), add adapters (PEFT's default targets for
the model type: query, value on MiniLM; the classifier head trained), AdamW,
then `--steps` steps of batch 16 from the MRPC train set (max_length 128,
padding trimmed per batch, the same shuffled order in every arm). The child
reports the training-loop wall time, the process peak RSS (VmHWM from
/proc/self/status; ru_maxrss as a cross-check) and the total process time.
Arms run in rotating order, round after round.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import (LoadMonitor, command_line, contention_note, environment, fmt_range, summarize,  # noqa: E402
                     publish)

ARMS = ("unified", "peft_r8", "peft_r16")


def vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        return None
    return None


def build_arm(arm: str, model_arg, steps: int, max_length: int, threads: int):
    """(model, optimizer, controller or None, loader) for one arm, exactly as its e2e child builds them."""
    import torch

    from _common import adapter_targets, load_classifier
    from unified_lora.data import default_model_path, encode, load_glue, make_loader
    from unified_lora.training import load_tokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = load_classifier(model_arg)
    targets, head = adapter_targets(model)
    ctrl = None
    if arm.startswith("unified"):
        from unified_lora import setup_unified_lora

        base = arm.removesuffix("_cpp")  # "<arm>_cpp": the same arm with NestedLoRALayer(kernel="cpp")
        signal = "loss" if base == "unified_v1" else "composite"
        _, ctrl = setup_unified_lora(model, target_modules=targets, modules_to_save=head, signal=signal,
                                     print_fn=None, layer_kernel="cpp" if arm.endswith("_cpp") else "python")
    else:
        from peft import LoraConfig, get_peft_model

        r = int(arm.split("_r")[1])
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=16, target_modules=targets))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    if ctrl is not None:
        ctrl.attach_optimizer(opt)
    # the model's own tokenizer; "tiny" (random BERT, MiniLM's vocabulary size) and the default use MiniLM's
    tok = load_tokenizer(default_model_path() if model_arg in (None, "tiny") else model_arg)
    ex = load_glue("mrpc", "train").examples
    ex = ex[: steps * 16] if steps * 16 < len(ex) else ex
    enc = encode(tok, ex, max_length=max_length, padding="max_length")
    loader = make_loader(enc, 16, shuffle=True, seed=0, drop_last=True)
    model.train()
    return model, opt, ctrl, loader


def batches(loader, steps: int):
    """`steps` batches in loader order (epochs repeat), padding trimmed to the longest row of each batch (on either
    side: Llama's tokenizer pads on the left)."""
    from unified_lora.training import trim_padding

    done = 0
    while done < steps:
        for batch in loader:
            yield trim_padding(batch)
            done += 1
            if done >= steps:
                return


def child(args) -> None:
    t_start = time.perf_counter()
    model, opt, ctrl, loader = build_arm(args.child, args.model, args.steps, args.max_length, args.threads)
    t0 = time.perf_counter()
    done, ranks = 0, []
    for batch in batches(loader, args.steps):
        loss = model(**batch).loss
        loss.backward()
        if ctrl is not None:
            ctrl.step(loss=loss.item())
            ranks.append(ctrl.rank)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done += 1
    loop = time.perf_counter() - t0
    print(json.dumps({"arm": args.child, "loop_s": loop, "process_s": time.perf_counter() - t_start,
                      "vm_hwm_bytes": vm_hwm_bytes(),
                      "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "steps": done, "mean_rank": (sum(ranks) / len(ranks)) if ranks else None}))


def run_rounds(script, arms: list[str], rounds: int, child_args: list[str], load, describe) -> dict:
    """Each arm in its own fresh process (`script --child ARM *child_args`, which prints its result as the last line
    of JSON), arms in rotating order round after round. Returns {arm: [result per round]}; `load` is sampled after
    every child and `describe(result)` printed."""
    runs = {a: [] for a in arms}
    for rnd in range(rounds):
        for arm in arms[rnd % len(arms):] + arms[:rnd % len(arms)]:
            cmd = [sys.executable, str(Path(script).resolve()), "--child", arm, *child_args]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"arm {arm} failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[arm].append(res)
            load.sample()
            print(f"round {rnd} {arm}: {describe(res)}", flush=True)
    return runs


def add_common_args(ap) -> None:
    """The options e2e.py and profile_e2e.py share; `--child ARM` is how run_rounds starts one arm's process."""
    ap.add_argument("--model", default=None, help="HF path (default bundled MiniLM; --quick: 'tiny'); 'tiny' = "
                    "random 2-layer BERT. Adapters on PEFT's default targets for the model type")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)


def common_child_args(args) -> list[str]:
    """add_common_args' options that a child process must see, as run_rounds passes them."""
    return ["--max-length", str(args.max_length), "--threads", str(args.threads)] + (
        ["--model", args.model] if args.model else [])


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="training steps per arm (229 = one MRPC epoch)")
    ap.add_argument("--rounds", type=int, default=2, help="times each arm runs (rotating order)")
    ap.add_argument("--arms", default=",".join(ARMS), help="unified (v3 composite), unified_v1, "
                    "either with _cpp (the layers' C++ kernel), peft_r<N>")
    add_common_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.steps, args.rounds, args.max_length, args.threads = args.model or "tiny", 3, 1, 32, 1
    if args.child:
        child(args)
        return None
    load = LoadMonitor(own_threads=args.threads)  # each child runs alone with this many threads
    arms = args.arms.split(",")
    runs = run_rounds(__file__, arms, args.rounds, ["--steps", str(args.steps), *common_child_args(args)], load,
                      lambda r: f"loop {r['loop_s']:.1f}s  peak RSS {r['vm_hwm_bytes'] / 2**20:.0f} MiB")
    summary = {a: {"loop_s": summarize([r["loop_s"] for r in rs]),
                   "peak_rss_bytes": summarize([r["vm_hwm_bytes"] for r in rs]),
                   "mean_rank": rs[0]["mean_rank"]} for a, rs in runs.items()}
    ours_all = [a for a in arms if a.startswith("unified")]
    ours = ours_all[0] if ours_all else None
    by_arm = {}
    for a in ours_all:
        by_arm[a] = {}
        if "peft_r8" in runs:
            by_arm[a]["time_vs_peft_r8"] = summarize([x["loop_s"] / y["loop_s"] for x, y in zip(runs[a], runs["peft_r8"])])
        if "peft_r16" in runs:
            by_arm[a]["rss_vs_peft_r16"] = summarize([x["vm_hwm_bytes"] / y["vm_hwm_bytes"]
                                                      for x, y in zip(runs[a], runs["peft_r16"])])
    ratios = by_arm.get(ours, {})
    payload = {"benchmark": "e2e", "command": command_line(), "env": environment(), "load": load.record(),
               "target": {"time_vs_peft_r8": 1.05, "rss_vs_peft_r16": 1.05},
               "setup": {"model": args.model or "all-MiniLM-L6-v2", "task": "mrpc", "steps": args.steps,
                         "batch_size": 16, "max_length": args.max_length, "rounds": args.rounds, "ours": ours},
               "runs": runs, "summary": summary, "ratios": ratios, "ratios_by_arm": by_arm}
    return publish("perf_e2e", payload, render, args.quick, args.results_dir)


def render(p: dict) -> str:
    s = p["setup"]
    lines = ["## End to end (MRPC fine-tuning, one process per arm)", "",
             f"Command: `{p['command']}` — {p['env']['utc']}. {s['model']}, {s['steps']} steps × batch "
             f"{s['batch_size']}, max_length {s['max_length']}, {s['rounds']} rounds; `{s['ours']}` = "
             "setup_unified_lora defaults (v3 composite signal, ranks 4/8/16, LR multipliers).",
             contention_note(p["load"]), "", "| arm | loop s, median (min–max) | peak RSS MiB | mean rank |",
             "|---|---|---|---|"]
    for a, r in p["summary"].items():
        rank = "–" if r["mean_rank"] is None else f"{r['mean_rank']:.2f}"
        lines.append(f"| {a} | {fmt_range(r['loop_s'], 1)} | {fmt_range(r['peak_rss_bytes'], 0, 2**-20)} | {rank} |")
    lines.append("")
    for k, v in p["ratios"].items():
        tgt = p["target"][k]
        lines.append(f"- {k.replace('_', ' ')}: {fmt_range(v)} (target ≤ {tgt}: "
                     f"{'met' if v['median'] <= tgt else 'missed'})")
    for a, rs in p.get("ratios_by_arm", {}).items():
        if a != s["ours"]:
            lines += [f"- `{a}`, {k.replace('_', ' ')}: {fmt_range(v)} (target ≤ {p['target'][k]}: "
                      f"{'met' if v['median'] <= p['target'][k] else 'missed'})" for k, v in rs.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
