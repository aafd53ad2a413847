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

Two diagnostic arms, interleaved with the others, split the default's cost
(they compute no LoRA branch, so they are not variants):

  base       the frozen base Linear alone
  noop_fn    the library layer's forward with the arithmetic taken out: its own
             Python (submodules, active blocks, scaling), then an autograd.Function
             that takes the library's arguments (base output, h, scaling, k, the
             active blocks), saves as many tensors, is called the way the library
             calls its Function (the C++ apply), and whose backward passes the
             gradient through

noop_fn − base is what this layer costs per call before it does any arithmetic
(the "Python floor"), function − noop_fn what its arithmetic adds (the ops,
their Python bindings, and the autograd engine's work on their results), and
function − PEFT how far the default is behind PEFT.

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


class _NoOpPath(torch.autograd.Function):
    """The library's Function with no arithmetic: same arguments, as many saved tensors (h twice, standing in for h
    and u, then the blocks), the gradient of the base output passed through and None for the rest."""

    @staticmethod
    def forward(ctx, base_out, h, scaling, k, *blocks):
        ctx.save_for_backward(h, h, *blocks)
        ctx.scaling, ctx.k = scaling, k
        return base_out.view(base_out.shape)

    @staticmethod
    def backward(ctx, gy):
        _h, _u, *blocks = ctx.saved_tensors
        return (gy, None, None, None) + (None,) * len(blocks)


def _noop_apply():
    from unified_lora.layer import _c_apply

    return _c_apply.__get__(None, _NoOpPath) if _c_apply is not None else _NoOpPath.apply


def forward_base(self, x):
    return self.base_layer(x)


def make_forward_noop_fn():
    from unified_lora.layer import blocks_of

    apply = _noop_apply()

    def forward_noop_fn(self, x):  # NestedLoRALayer.forward's own Python, the Function called without arithmetic
        mods = self._modules
        result = mods["base_layer"](x)
        k = self.n_active_blocks
        A, B = blocks_of(mods["lora_A"]), blocks_of(mods["lora_B"])
        return apply(result, x, self.scaling, k, *A[:k], *B[:k])

    return forward_noop_fn


DIAGNOSTICS = {"base": forward_base, "noop_fn": make_forward_noop_fn}

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
    for name, fwd in DIAGNOSTICS.items():
        twin, _ = build_pair(i, o, rank, device=dev, dtype=dt)
        twin.load_state_dict(ours.state_dict())
        twin.forward = types.MethodType(fwd if name == "base" else fwd(), twin)
        arms[name] = twin
    inner, times = time_arms(arms, x, gy, repeats, min_time)
    peft_act = saved_tensor_bytes(peft, x, gy)["activation_bytes"]
    out = {"shape": shape, "rank": rank, "inner_iters": inner, "peft_s": summarize(times["peft"]),
           "peft_activation_bytes": peft_act, "variants": {},
           "diagnostics": _diagnostics(times)}
    for name in variants:
        out["variants"][name] = {
            "s": summarize(times[name]),
            "ratio": summarize([a / p for a, p in zip(times[name], times["peft"])]),
            "activation_bytes": saved_tensor_bytes(arms[name], x, gy)["activation_bytes"],
        }
    return out


def _diagnostics(times: dict) -> dict:
    """µs per forward+backward, per repeat then median (min–max): the branch each arm adds to the frozen base, and
    the default's branch split into its Python floor (noop_fn − base) and the rest, its arithmetic (function −
    noop_fn)."""
    def diff(a: str, b: str) -> dict:
        return summarize([(x - y) * 1e6 for x, y in zip(times[a], times[b])])

    out = {"base_s": summarize(times["base"]), "noop_fn_s": summarize(times["noop_fn"]),
           "peft_branch_us": diff("peft", "base"), "default_branch_us": diff("function", "base"),
           "python_floor_us": diff("noop_fn", "base"), "default_arithmetic_us": diff("function", "noop_fn"),
           "default_gap_us": diff("function", "peft")}
    if "cpp" in times:
        out["cpp_branch_us"] = diff("cpp", "base")
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
    if all("diagnostics" in c for c in p["cases"]):
        lines += ["", "Where the time goes: what each arm adds to the frozen base Linear, in µs per forward + backward, "
                  "median (min–max) of the per-repeat differences. `noop_fn` is the library layer's forward with the "
                  "arithmetic taken out (its own Python, and a Python autograd.Function that takes the same arguments, "
                  "saves as many tensors and computes nothing), so the default's branch = its Python floor "
                  "(noop_fn − base) + its arithmetic (function − noop_fn).", "",
                  "| shape | rank | PEFT's branch | default's branch | = Python floor | + arithmetic "
                  "| default − PEFT | kernel=\"cpp\" branch |", "|---|---|---|---|---|---|---|---|"]
        for c in p["cases"]:
            d = c["diagnostics"]
            cpp = fmt_range(d["cpp_branch_us"], 1) if "cpp_branch_us" in d else "–"
            lines.append(f"| {c['shape']} | {c['rank']} | {fmt_range(d['peft_branch_us'], 1)} | "
                         f"{fmt_range(d['default_branch_us'], 1)} | {fmt_range(d['python_floor_us'], 1)} | "
                         f"{fmt_range(d['default_arithmetic_us'], 1)} | {fmt_range(d['default_gap_us'], 1)} | {cpp} |")
    lines += ["", "`tiny` (32 tokens, 32→32) measures per-call host cost, the regime of the H100 runs; `minilm` "
              "(2048 tokens, 384→384) is arithmetic-bound on this CPU. Each variant was checked against the library's "
              "outputs and gradients before timing."]
    if p.get("cpp_unavailable"):
        lines += ["", f"The cpp variant was left out: {p['cpp_unavailable']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
