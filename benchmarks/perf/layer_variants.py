"""Ways to compute the nested LoRA branch, each against PEFT: the speed / memory trade-off, measured.

    python benchmarks/perf/layer_variants.py             # tiny (host-overhead proxy) and MiniLM shapes, r 8 and 16
    python benchmarks/perf/layer_variants.py --quick
    python benchmarks/perf/layer_variants.py --device cuda --dtype bfloat16 --shapes minilm,llama1b   # -> perf_gpu.md

`layer.py` times the library's layer. This script times the formulations that
were considered for two or more active blocks (r8 and r16; one block runs as
plain ops in the library already), so the choice the library makes is backed
by numbers:

  function   the library's default: one autograd.Function that concatenates the
             active blocks, saves only h and u = h Aᵀ, and re-concatenates in backward
  cpp        the library with kernel="cpp": the same computation as a C++
             autograd Function (csrc/nested_path.cpp), no Python per call;
             left out, with the reason printed, where it cannot be built
  cat        plain autograd through torch.cat: no Python Function, but autograd
             saves the concatenated A and B (r·(in+out) values per layer)
  perblock   plain autograd, one GEMM pair per block accumulated into the output:
             no Function and no cat, but k GEMM pairs and k − 1 extra adds of
             the input gradient (tokens × in each)

Every variant is checked against the library's output and gradients before it
is timed. Time is forward+backward, interleaved with PEFT per repeat (median
and min–max of the per-repeat ratio); memory is the activation bytes autograd
saves beyond parameters and the input (the `layer.py` measure).
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import (LoadMonitor, add_device_args, check_device, command_line, contention_note, environment,  # noqa: E402
                     fmt_range, publish, summarize, torch_dtype)
from layer import SHAPES, build_pair, cpp_twin, saved_tensor_bytes, time_arms  # noqa: E402


def _branch_inputs(layer, x):
    from unified_lora.layer import blocks_of

    result = layer.base_layer(x)
    k = layer.n_active_blocks
    return result, x.reshape(-1, x.shape[-1]), blocks_of(layer.lora_A)[:k], blocks_of(layer.lora_B)[:k]


def forward_cat(self, x):
    result, h2, A, B = _branch_inputs(self, x)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h2 @ torch.cat(A).T, torch.cat(B, 1).T, alpha=self.scaling)
    return out.view(result.shape)


def forward_perblock(self, x):
    result, h2, A, B = _branch_inputs(self, x)
    out = result.reshape(-1, result.shape[-1])
    for a, b in zip(A, B):
        out = torch.addmm(out, h2 @ a.T, b.T, alpha=self.scaling)
    return out.view(result.shape)


VARIANTS = {"function": None, "cpp": None, "cat": forward_cat, "perblock": forward_perblock}  # None: the library's


def cpp_unavailable() -> str | None:
    """Why kernel="cpp" cannot run here (None when it can)."""
    from unified_lora._fused import FusedKernelsUnavailable, layer_kernels

    try:
        layer_kernels()
    except FusedKernelsUnavailable as e:
        return str(e)
    return None


def check_variant(layer, fwd, x, gy, tol) -> None:
    """The variant must give the library's output and gradients (else its timing means nothing)."""
    def run(f):
        for p in layer.parameters():
            p.grad = None
        xx = x.detach().clone().requires_grad_()
        y = (f(xx) if f else layer(xx))
        y.backward(gy)
        return [y.detach(), xx.grad] + [p.grad for p in layer.active_parameters()]

    ref, got = run(None), run(lambda xx: fwd(layer, xx))
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, **tol)


def bench(shape: str, rank: int, repeats: int, min_time: float, dev=torch.device("cpu"), dt=torch.float32) -> dict:
    b, s, i, o = SHAPES[shape]
    torch.manual_seed(0)
    x = torch.randn(b, s, i, device=dev, dtype=dt, requires_grad=True)
    gy = torch.randn(b, s, o, device=dev, dtype=dt)
    ours, peft = build_pair(i, o, rank, device=dev, dtype=dt)
    tol = dict(rtol=1e-3, atol=1e-4) if dt == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    arms = {"peft": peft}
    variants = [n for n in VARIANTS if n != "cpp" or not cpp_unavailable()]
    for name in variants:
        fwd = VARIANTS[name]
        if name == "cpp":
            arms[name] = cpp_twin(ours, x, gy, tol)
            continue
        if fwd is None:
            arms[name] = ours
            continue
        check_variant(ours, fwd, x, gy, tol)
        twin, _ = build_pair(i, o, rank, device=dev, dtype=dt)
        twin.load_state_dict(ours.state_dict())
        twin.forward = types.MethodType(fwd, twin)
        arms[name] = twin
    inner, times = time_arms(arms, x, gy, repeats, min_time)
    peft_act = saved_tensor_bytes(peft, x, gy)["activation_bytes"]
    out = {"shape": shape, "rank": rank, "inner_iters": inner, "peft_s": summarize(times["peft"]),
           "peft_activation_bytes": peft_act, "variants": {}}
    for name in variants:
        out["variants"][name] = {
            "s": summarize(times[name]),
            "ratio": summarize([a / p for a, p in zip(times[name], times["peft"])]),
            "activation_bytes": saved_tensor_bytes(arms[name], x, gy)["activation_bytes"],
        }
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny,minilm")
    ap.add_argument("--ranks", default="8,16")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--min-time", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--results-dir", default=None)
    add_device_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.repeats, args.min_time, args.threads = "tiny", 3, 0.01, 1
    torch.set_num_threads(args.threads)
    dev, dt = check_device(args.device), torch_dtype(args.dtype)
    load = LoadMonitor()
    cases = []
    for shape in args.shapes.split(","):
        for r in (int(v) for v in args.ranks.split(",")):
            case = bench(shape, r, args.repeats, args.min_time, dev, dt)
            load.sample()
            cases.append(case)
            print(f"{shape} r{r}: " + "  ".join(f"{n} {fmt_range(v['ratio'])}" for n, v in case["variants"].items()),
                  flush=True)
    payload = {"benchmark": "layer_variants", "command": command_line(), "env": environment(), "load": load.record(),
               "device": str(dev), "dtype": args.dtype, "cases": cases}
    why = cpp_unavailable()
    if why:
        print(f"cpp variant left out: {why}", flush=True)
        payload["cpp_unavailable"] = why
    return publish("perf_layer_variants", payload, render, args.quick, args.results_dir)


def render(p: dict) -> str:
    kib = 1024.0
    gpu = not p.get("device", "cpu").startswith("cpu")
    where = f"{p['env'].get('gpu', p['device'])}, {p['dtype']}" if gpu else f"{p['env']['torch_threads']} threads"
    lines = [f"## Layer formulations for k ≥ 2 active blocks, each vs PEFT (forward + backward){' — ' + where if gpu else ''}",
             "", f"Command: `{p['command']}` — {p['env']['utc']}, torch {p['env']['torch']}, {where}.",
             contention_note(p["load"]), "",
             "| shape | rank | variant | time ratio vs PEFT, median (min–max) | activation KiB (PEFT) |",
             "|---|---|---|---|---|"]
    for c in p["cases"]:
        for name, v in c["variants"].items():
            label = {"function": " (library default)", "cpp": ' (library, kernel="cpp")'}.get(name, "")
            lines.append(f"| {c['shape']} | {c['rank']} | {name}{label} | "
                         f"{fmt_range(v['ratio'])} | {v['activation_bytes'] / kib:.0f} "
                         f"({c['peft_activation_bytes'] / kib:.0f}) |")
    lines += ["", "`tiny` (32 tokens, 32→32) measures per-call host cost, the regime of the H100 runs; `minilm` "
              "(2048 tokens, 384→384) is arithmetic-bound on this CPU. Each variant was checked against the library's "
              "outputs and gradients before timing."]
    if p.get("cpp_unavailable"):
        lines += ["", f"The cpp variant was left out: {p['cpp_unavailable']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
