"""Nested LoRA layer vs PEFT's LoRA Linear: forward+backward time and memory.

    python benchmarks/perf/layer.py              # full run (MiniLM and Llama-1B shapes, r = 4, 8, 16)
    python benchmarks/perf/layer.py --shapes minilm,llama1b,tiny   # + the host-overhead proxy row
    python benchmarks/perf/layer.py --quick      # smoke run (tiny shape, few repeats)
    python benchmarks/perf/layer.py --device cuda --dtype bfloat16   # on a GPU -> results/perf_gpu.md
    python benchmarks/perf/layer.py --with-cpp   # + NestedLoRALayer(kernel="cpp") as a third arm of the same run

Same base weights, same rank, same alpha, dropout 0. The input requires grad
(an interior layer), the base weight is frozen. Each repeat times both arms
back to back (order alternates), so the per-repeat ratio ours/PEFT cancels most
of the machine's background load. Memory is what autograd saves for backward
(saved_tensors_hooks; unique storages that are neither parameters nor the
input = activation memory the layer adds) and the adapter parameter bytes; on a
GPU also the peak allocated bytes one forward+backward adds (allocator statistics).
With --dtype bfloat16 both layers (base and adapters) and the input are bf16.

The `tiny` shape (32 tokens, 32→32) does almost no arithmetic, so its time is the
per-call host cost (Python, dispatcher, autograd bookkeeping, one launch per
op): on a CPU it stands in for what dominated the GPU runs, where a layer's
kernels take microseconds and the host takes a millisecond. No target applies
to it; it is there to be watched.

`--with-cpp` adds the library's layer with `kernel="cpp"` (the nested path as a
C++ autograd Function, `csrc/nested_path.cpp`) as a third arm, interleaved with
the other two and timed against the same PEFT measurements. At rank 4 (one
active block) both of our arms run the same plain ops, so there the two ratios
show how far identical code drifts between arms.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from _common import (LoadMonitor, add_device_args, check_device, command_line, contention_note, environment,  # noqa: E402
                     fmt_range, publish, summarize, sync, torch_dtype)

SHAPES = {  # name: (batch, seq, in_features, out_features)
    "minilm": (16, 128, 384, 384),
    "llama1b": (4, 512, 2048, 2048),
    "tiny": (2, 16, 32, 32),  # host-overhead proxy: no target
}
NO_TARGET = {"tiny"}


class _OneLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def build_pair(in_f: int, out_f: int, rank: int, alpha: float = 16.0, device="cpu", dtype=torch.float32):
    """(ours, peft) wrapping identical copies of one frozen Linear, moved to `device` / `dtype`."""
    from peft import LoraConfig, get_peft_model

    from unified_lora.layer import NestedLoRALayer

    base = nn.Linear(in_f, out_f)
    ours = NestedLoRALayer(copy.deepcopy(base), rank_levels=(4, 8, 16), lora_alpha=alpha, initial_rank=rank)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"])
    peft_layer = get_peft_model(_OneLinear(copy.deepcopy(base)), cfg).base_model.model.proj
    # Non-zero B so both arms compute a real delta (zero-init B would not change the cost, but be explicit).
    with torch.no_grad():
        for p in ours.lora_B:
            p.normal_(0, 0.01)
        peft_layer.lora_B["default"].weight.normal_(0, 0.01)
    return ours.to(device=device, dtype=dtype), peft_layer.to(device=device, dtype=dtype)


def lora_params(layer) -> list[torch.Tensor]:
    return [p for n, p in layer.named_parameters() if "lora_" in n]


def fwd_bwd(layer, x, gy):
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    y = layer(x)
    y.backward(gy)


def saved_tensor_bytes(layer, x, gy) -> dict:
    """Bytes autograd keeps for backward during one forward."""
    raw, storages = 0, {}
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    params.add(x.untyped_storage().data_ptr())

    def pack(t):
        nonlocal raw
        raw += t.numel() * t.element_size()
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.backward(gy)
    extra = sum(b for ptr, b in storages.items() if ptr not in params)
    return {"saved_raw_bytes": raw, "saved_unique_bytes": sum(storages.values()), "activation_bytes": extra}


def peak_bytes(layer, x, gy) -> int | None:
    """CUDA only: peak allocated bytes above the starting point during one forward+backward."""
    if x.device.type != "cuda":
        return None
    fwd_bwd(layer, x, gy)  # grads exist once, as in the timed loop
    sync(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    start = torch.cuda.memory_allocated(x.device)
    fwd_bwd(layer, x, gy)
    sync(x.device)
    return torch.cuda.max_memory_allocated(x.device) - start


def param_bytes(layer, active_only: bool = False) -> int:
    if active_only and hasattr(layer, "active_parameters"):
        ps = layer.active_parameters()
    else:
        ps = lora_params(layer)
    return sum(p.numel() * p.element_size() for p in ps)


def time_arms(arms: dict, x, gy, repeats: int, min_time: float) -> tuple[int, dict[str, list[float]]]:
    """Forward+backward seconds per call of every arm, once per repeat in rotating order (the inner
    loop sized on the "peft" arm to `min_time`): (inner iterations, {arm: [seconds per repeat]})."""
    dev = x.device
    for _ in range(3):  # warm up
        for layer in arms.values():
            fwd_bwd(layer, x, gy)
    sync(dev)
    t0 = time.perf_counter()
    fwd_bwd(arms["peft"], x, gy)
    sync(dev)
    one = time.perf_counter() - t0
    inner = max(1, math.ceil(min_time / max(one, 1e-6)))
    names = list(arms)
    times = {n: [] for n in names}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(inner):
                fwd_bwd(arms[name], x, gy)
            sync(dev)
            times[name].append((time.perf_counter() - t0) / inner)
    return inner, times


def time_case(arms: dict, x, gy, repeats: int, min_time: float) -> dict:
    """Time "ours" and "peft" (and "ours_cpp" when given) interleaved; ratios are ours / peft within the repeat."""
    inner, times = time_arms(arms, x, gy, repeats, min_time)
    out = {"inner_iters": inner, "ours_s": summarize(times["ours"]), "peft_s": summarize(times["peft"]),
           "ratio": summarize([a / b for a, b in zip(times["ours"], times["peft"])])}
    if "ours_cpp" in times:
        out["cpp"] = {"ours_s": summarize(times["ours_cpp"]),
                      "ratio": summarize([a / b for a, b in zip(times["ours_cpp"], times["peft"])])}
    return out


def same_tol(x) -> dict:
    """How close a reformulated layer must come to the library's: exact on the CPU (the same ops in the
    same order), within the dtype's rounding on a GPU (where a GEMM may pick another algorithm)."""
    if x.device.type == "cpu":
        return dict(rtol=0, atol=0)
    return dict(rtol=1e-3, atol=1e-4) if x.dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)


def cpp_twin(ours, x, gy, tol=None):
    """`ours` with kernel="cpp", checked first: the same outputs and gradients (within `tol`, default
    `same_tol(x)`), else its timing means nothing."""
    from unified_lora._fused import layer_kernels

    layer_kernels()  # build before timing
    twin = copy.deepcopy(ours)
    twin.kernel = "cpp"
    got = []
    for layer in (ours, twin):
        fwd_bwd(layer, x, gy)
        with torch.no_grad():
            y = layer(x)
        got.append([y, x.grad.clone()] + [p.grad.clone() for p in layer.active_parameters()])
    for a, b in zip(*got):
        torch.testing.assert_close(b, a, **(tol or same_tol(x)))
    return twin


def profile_case(ours, theirs, x, gy, iters: int = 5, rows: int = 12) -> dict:
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    cuda = x.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for name, layer in (("ours", ours), ("peft", theirs)):
        fwd_bwd(layer, x, gy)
        with profile(activities=acts) as prof:
            for _ in range(iters):
                fwd_bwd(layer, x, gy)
            sync(x.device)
        avg = prof.key_averages()
        try:
            tables[name] = avg.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=rows)
        except (AttributeError, KeyError):  # newer torch names it device time
            tables[name] = avg.table(sort_by="self_device_time_total", row_limit=rows)
    return tables


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="minilm,llama1b", help=f"comma list of {sorted(SHAPES)}")
    ap.add_argument("--ranks", default="4,8,16")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per measurement (inner loop sized to it)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="profile every case (default: only cases that miss)")
    ap.add_argument("--quick", action="store_true", help="tiny shape, 3 repeats (smoke test)")
    ap.add_argument("--with-cpp", action="store_true",
                    help='also time NestedLoRALayer(kernel="cpp") in the same run (builds csrc/nested_path.cpp)')
    ap.add_argument("--results-dir", default=None)
    add_device_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.repeats, args.min_time, args.threads = "tiny", 3, 0.01, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev, dt = check_device(args.device), torch_dtype(args.dtype)
    load = LoadMonitor()
    cases = []
    for shape in args.shapes.split(","):
        b, s, i, o = SHAPES[shape]
        x = torch.randn(b, s, i, device=dev, dtype=dt, requires_grad=True)
        gy = torch.randn(b, s, o, device=dev, dtype=dt)
        for r in (int(v) for v in args.ranks.split(",")):
            ours, theirs = build_pair(i, o, r, device=dev, dtype=dt)
            arms = {"ours": ours, "peft": theirs}
            if args.with_cpp:
                arms["ours_cpp"] = cpp_twin(ours, x, gy)
            case = {"shape": shape, "tokens": b * s, "in": i, "out": o, "rank": r}
            case.update(time_case(arms, x, gy, args.repeats, args.min_time))
            if args.with_cpp:
                case["cpp"]["memory"] = saved_tensor_bytes(arms["ours_cpp"], x, gy)
                case["cpp"]["peak_bytes"] = peak_bytes(arms["ours_cpp"], x, gy)
            case["memory"] = {
                "ours": {**saved_tensor_bytes(ours, x, gy), "param_bytes_allocated": param_bytes(ours),
                         "param_bytes_active": param_bytes(ours, active_only=True), "peak_bytes": peak_bytes(ours, x, gy)},
                "peft": {**saved_tensor_bytes(theirs, x, gy), "param_bytes_allocated": param_bytes(theirs),
                         "param_bytes_active": param_bytes(theirs), "peak_bytes": peak_bytes(theirs, x, gy)},
            }
            if args.profile or (case["ratio"]["median"] > 1.0 and shape not in NO_TARGET):
                case["profile"] = profile_case(ours, theirs, x, gy)
            load.sample()
            cases.append(case)
            print(f"{shape} r{r}: ratio {fmt_range(case['ratio'])}  ours {case['ours_s']['median'] * 1e3:.2f} ms  "
                  f"peft {case['peft_s']['median'] * 1e3:.2f} ms"
                  + (f"  cpp ratio {fmt_range(case['cpp']['ratio'])}" if args.with_cpp else ""), flush=True)
    payload = {"benchmark": "layer", "command": command_line(), "env": environment(), "load": load.record(),
               "device": str(dev), "dtype": args.dtype,
               "target": "ratio <= 1.00 at every rank; same or less memory", "cases": cases}
    return publish("perf_layer", payload, render, args.quick, args.results_dir)


def render(p: dict) -> str:
    kib = 1024.0
    gpu = not p.get("device", "cpu").startswith("cpu")
    where = (f"{p['env'].get('gpu', p['device'])}, {p['dtype']}, CUDA {p['env'].get('cuda_version')}" if gpu
             else f"{p['env']['torch_threads']} threads")
    lines = [f"## Layer: nested LoRA vs PEFT LoRA Linear (forward + backward){' — ' + where if gpu else ''}", "",
             f"Command: `{p['command']}` — {p['env']['utc']}, torch {p['env']['torch']}, peft {p['env'].get('peft')}, "
             f"{where}.", contention_note(p["load"]), "",
             "| shape | tokens × in→out | rank | ours ms | PEFT ms | ratio median (min–max) | activation KiB ours / PEFT "
             + ("| peak KiB ours / PEFT " if gpu else "")
             + "| adapter param KiB ours active (allocated) / PEFT | target |",
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    for c in p["cases"]:
        mo, mp = c["memory"]["ours"], c["memory"]["peft"]
        ok = c["ratio"]["median"] <= 1.0 and mo["activation_bytes"] <= mp["activation_bytes"]
        peak = ""
        if gpu and mo.get("peak_bytes") is not None:
            ok = ok and mo["peak_bytes"] <= mp["peak_bytes"]
            peak = f"{mo['peak_bytes'] / kib:.0f} / {mp['peak_bytes'] / kib:.0f} | "
        lines.append(
            f"| {c['shape']} | {c['tokens']} × {c['in']}→{c['out']} | {c['rank']} | {c['ours_s']['median'] * 1e3:.2f} | "
            f"{c['peft_s']['median'] * 1e3:.2f} | {fmt_range(c['ratio'])} | "
            f"{mo['activation_bytes'] / kib:.0f} / {mp['activation_bytes'] / kib:.0f} | {peak}"
            f"{mo['param_bytes_active'] / kib:.0f} ({mo['param_bytes_allocated'] / kib:.0f}) / "
            f"{mp['param_bytes_allocated'] / kib:.0f} | "
            f"{'host-overhead proxy, no target' if c['shape'] in NO_TARGET else 'met' if ok else 'missed'} |")
    lines += ["", "Activation = unique storages autograd saves that are neither parameters nor the input. "
              "Allocated adapter bytes include the paused nested blocks (all ranks up to 16)."]
    if any("cpp" in c for c in p["cases"]):
        lines += ["", '`--with-cpp`: `NestedLoRALayer(kernel="cpp")`, the nested path as a C++ autograd Function, '
                  "a third arm of the same interleaved run, ratio to the same PEFT times (rank 4 runs the same plain "
                  "ops in both of our arms):", "",
                  "| shape | rank | default (Python Function) ratio | kernel=\"cpp\" ms | kernel=\"cpp\" ratio median "
                  "(min–max) | activation KiB cpp / PEFT | target |", "|---|---|---|---|---|---|---|"]
        for c in p["cases"]:
            if "cpp" not in c:
                continue
            k, mp = c["cpp"], c["memory"]["peft"]
            ok = k["ratio"]["median"] <= 1.0 and k["memory"]["activation_bytes"] <= mp["activation_bytes"]
            if gpu and k.get("peak_bytes") is not None:
                ok = ok and k["peak_bytes"] <= mp["peak_bytes"]
            lines.append(f"| {c['shape']} | {c['rank']} | {c['ratio']['median']:.3f} | {k['ours_s']['median'] * 1e3:.2f} | "
                         f"{fmt_range(k['ratio'])} | {k['memory']['activation_bytes'] / kib:.0f} / "
                         f"{mp['activation_bytes'] / kib:.0f} | "
                         f"{'host-overhead proxy, no target' if c['shape'] in NO_TARGET else 'met' if ok else 'missed'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
