"""Controller overhead: a full MiniLM training step with `ctrl.step` vs the same step without it.

    python benchmarks/perf/controller_overhead.py               # MiniLM, batch 16 × 128 tokens
    python benchmarks/perf/controller_overhead.py --quick       # tiny random BERT, smoke test
    python benchmarks/perf/controller_overhead.py --device cuda --dtype bfloat16   # GPU, bf16 autocast

Three identical models (same seed, nested LoRA r8 on query/value, classifier
trained, AdamW): "none" runs forward/backward/optimizer.step only; "v1" adds
the controller with the v1 loss signal, "v3" with the v3 composite signal
(gradient norms, cosine with the previous gradient, Mirror snapshots). The
controllers keep mode_ranks = (8, 8, 8) so all three arms do identical maths and
the difference is the controller's own work (signal, machine, LR hooks, Mirror);
what a rank switch costs or saves is measured by layer.py. The three arms run
in rotating order inside each repeat.

Two estimates: (a) ratio of whole-step times per repeat (arm / none), (b) the
time spent inside ctrl.step (timed directly) over the median "none" step;
(b) is far less noisy on a shared machine. On a GPU every step ends with a
device sync (the loss is read with .item() in every arm, as a training loop
logging its loss does), and --dtype bfloat16 runs forward and loss under bf16
autocast with fp32 master weights.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from _common import (LoadMonitor, adapter_targets, add_device_args, check_device, command_line, contention_note,  # noqa: E402
                     count_aten_ops, environment, fmt_range, load_classifier, publish, summarize, sync, torch_dtype)

ARMS = ("none", "v1", "v3")


def build_arms(model_arg, targets, lr, device="cpu"):
    """({arm: (model, optimizer, controller or None)}, the targets adapted); `targets` None: PEFT's default for the
    model type."""
    from unified_lora import ActuatorConfig, setup_unified_lora

    torch.manual_seed(0)
    base = load_classifier(model_arg).to(device)
    default, head = adapter_targets(base)
    targets = targets or default
    arms = {}
    for name in ARMS:
        model = copy.deepcopy(base)
        signal = "composite" if name == "v3" else "loss"
        _, ctrl = setup_unified_lora(model, target_modules=targets, modules_to_save=head, signal=signal,
                                     actuators=ActuatorConfig(mode_ranks=(8, 8, 8), lr_mode="multiplier"),
                                     print_fn=None, keep_trace=True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        if name != "none":
            ctrl.attach_optimizer(opt)
        model.train()
        arms[name] = (model, opt, ctrl if name != "none" else None)
    return arms, targets


def forward_backward(model, batch, autocast_dtype=None) -> float:
    """Forward (under bf16 autocast when asked) and backward; the loss read with .item(), a device sync on a
    GPU, as a training loop that logs its loss does."""
    dev = batch["input_ids"].device
    with torch.autocast(dev.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = model(**batch).loss
    loss.backward()
    return loss.item()


def timed_ctrl_step(ctrl, value: float, dev) -> float:
    """Seconds one ctrl.step takes, its device work included."""
    sync(dev)
    c0 = time.perf_counter()
    ctrl.step(loss=value)
    sync(dev)
    return time.perf_counter() - c0


def one_step(model, opt, ctrl, batch, autocast_dtype=None) -> tuple[float, float]:
    dev = batch["input_ids"].device
    sync(dev)
    t0 = time.perf_counter()
    value = forward_backward(model, batch, autocast_dtype)  # every arm reads its loss
    t_ctrl = 0.0 if ctrl is None else timed_ctrl_step(ctrl, value, dev)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(dev)
    return time.perf_counter() - t0, t_ctrl


def back_to_back(model, opt, ctrl, batch, autocast_dtype=None, calls: int = 200) -> dict:
    """ctrl.step called `calls` times in a row on one backward's gradients, each timed: the controller's cost
    with the interpreter, caches and branch predictors warm. In the training loop every call comes right after
    a forward and backward that evicted them, which is what the in-loop column times."""
    value = forward_backward(model, batch, autocast_dtype)
    with warnings.catch_warnings():  # calls with no optimizer step between them, on purpose: not an accumulation
        warnings.filterwarnings("ignore", message="ctrl.step: ", category=UserWarning)
        times = [timed_ctrl_step(ctrl, value, batch["input_ids"].device) for _ in range(calls)]
    opt.zero_grad(set_to_none=True)
    return summarize(times[calls // 10:])


def ops_per_ctrl_step(model, opt, ctrl, batch, autocast_dtype=None) -> int:
    """Top-level non-view aten ops one ctrl.step issues (on a GPU, each is at least one kernel launch)."""
    value = forward_backward(model, batch, autocast_dtype)
    n = count_aten_ops(lambda: ctrl.step(loss=value))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return n


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF path (default bundled MiniLM; --quick: 'tiny'); 'tiny' = "
                    "random 2-layer BERT")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20, help="steps per arm (after warmup)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--targets", default=None, help="comma list (default: PEFT's targets for the model type: "
                    "query,value on BERT and MiniLM, c_attn on GPT-2, q_proj,v_proj on Llama)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--results-dir", default=None)
    add_device_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.batch_size, args.seq_len, args.repeats, args.warmup, args.threads = (args.model or "tiny", 4,
                                                                                               16, 4, 1, 1)
    torch.set_num_threads(args.threads)
    dev = check_device(args.device)
    amp = None if args.dtype == "float32" else torch_dtype(args.dtype)
    load = LoadMonitor()
    arms, targets = build_arms(args.model, args.targets.split(",") if args.targets else None, 5e-4, dev)
    args.targets = targets if isinstance(targets, str) else ",".join(targets)  # (recorded as resolved)
    g = torch.Generator().manual_seed(0)
    # Random tokens, fixed per step index and shared by the arms (the cost does not depend on the text), within the
    # model's vocabulary (MiniLM's: 1000-30000, as before the bound)
    vocab = arms["none"][0].get_input_embeddings().num_embeddings
    hi = min(30000, vocab)
    batches = [{"input_ids": torch.randint(min(1000, hi // 2), hi, (args.batch_size, args.seq_len), generator=g),
                "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long),
                "labels": torch.randint(0, 2, (args.batch_size,), generator=g)} for _ in range(4)]
    batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
    for i in range(args.warmup):
        for name in ARMS:
            one_step(*arms[name], batches[i % 4], amp)
    step_t = {a: [] for a in ARMS}
    ctrl_t = {a: [] for a in ARMS}
    for rep in range(args.repeats):
        order = ARMS[rep % 3:] + ARMS[:rep % 3]
        for name in order:
            t, c = one_step(*arms[name], batches[rep % 4], amp)
            step_t[name].append(t)
            ctrl_t[name].append(c)
        if rep % 5 == 0:
            load.sample()
        print(f"rep {rep}: " + "  ".join(f"{a} {step_t[a][-1]:.3f}s" for a in ARMS), flush=True)
    none_med = summarize(step_t["none"])["median"]
    results = {}
    for name in ("v1", "v3"):
        ratios = [a / b for a, b in zip(step_t[name], step_t["none"])]
        ctrl = arms[name][2]
        results[name] = {
            "step_s": summarize(step_t[name]),
            "ratio_vs_none": summarize(ratios),
            "ctrl_step_s": summarize(ctrl_t[name]),
            "ctrl_share_of_none_step": summarize([c / none_med for c in ctrl_t[name]]),
            "modes_visited": sorted({r.mode for r in ctrl.trace}),
            "aten_ops_per_ctrl_step": ops_per_ctrl_step(*arms[name], batches[0], amp),
            "snapshots": sum(1 for r in ctrl.trace if r.snapshot),
        }
        # after everything above has read the trace: these calls add records of their own
        results[name]["ctrl_step_back_to_back_s"] = back_to_back(*arms[name], batches[0], amp)
    payload = {"benchmark": "controller_overhead", "command": command_line(), "env": environment(),
               "load": load.record(), "target": {"v1": 0.01, "v3": 0.05}, "device": str(dev), "dtype": args.dtype,
               "setup": {"model": args.model or "all-MiniLM-L6-v2", "batch_size": args.batch_size,
                         "seq_len": args.seq_len, "repeats": args.repeats, "warmup": args.warmup,
                         "targets": args.targets, "mode_ranks": [8, 8, 8]},
               "none_step_s": summarize(step_t["none"]), "arms": results}
    return publish("perf_controller_overhead", payload, render, args.quick, args.results_dir)


def render(p: dict) -> str:
    s = p["setup"]
    gpu = not p.get("device", "cpu").startswith("cpu")
    where = (f"{p['env'].get('gpu', p['device'])}, {'bf16 autocast' if p['dtype'] == 'bfloat16' else p['dtype']}, "
             f"torch {p['env']['torch']}" if gpu else f"{p['env']['torch_threads']} threads")
    lines = [f"## Controller overhead (full training step){' — ' + where if gpu else ''}", "",
             f"Command: `{p['command']}` — {p['env']['utc']}, {where}. "
             f"{s['model']}, batch {s['batch_size']} × {s['seq_len']} tokens, {s['repeats']} interleaved steps per arm.",
             contention_note(p["load"]), "",
             f"Step without controller: {fmt_range(p['none_step_s'], 3, 1, ' s')}.", "",
             "| signal | step s | step ratio vs none, median (min–max) | ctrl.step ms | ctrl.step / step | aten ops per ctrl.step "
             "| ctrl.step back to back ms | target | met |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in p["arms"].items():
        share = r["ctrl_share_of_none_step"]["median"]
        tgt = p["target"][name]
        lines.append(f"| {name} | {fmt_range(r['step_s'])} | {fmt_range(r['ratio_vs_none'], 4)} | "
                     f"{fmt_range(r['ctrl_step_s'], 2, 1e3)} | {share * 100:.3f} % | {r.get('aten_ops_per_ctrl_step', '–')} | "
                     f"{fmt_range(r['ctrl_step_back_to_back_s'], 3, 1e3) if 'ctrl_step_back_to_back_s' in r else '–'} | "
                     f"≤ {tgt * 100:.0f} % | "
                     f"{'yes' if share <= tgt else 'no'} |")
    lines += ["", "'met' judges the directly timed ctrl.step share; the whole-step ratio is shown beside it and "
              "carries the machine's noise. aten ops = top-level non-view ops one ctrl.step issues (torch.profiler); on a GPU each "
              "is at least one kernel launch. Back to back = the same call repeated on one backward's gradients (warm "
              "interpreter and caches); the gap to the in-loop time is what a call costs right after a training step "
              "has evicted the interpreter's code and data."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
