"""Mirror cost: snapshot + drift + restore, as a multiple of one copy of the adapter parameters.

    python benchmarks/perf/mirror_cost.py            # MiniLM and Llama-1B adapter sets (q, v at r16)
    python benchmarks/perf/mirror_cost.py --quick
    python benchmarks/perf/mirror_cost.py --device cuda --dtype bfloat16   # GPU -> results/perf_gpu.md
    python benchmarks/perf/mirror_cost.py --with-compile   # + torch.compile's fused drift in the profile
    python benchmarks/perf/mirror_cost.py --with-cpp       # + the library's MirrorConfig(kernel="fused") cycle
                                                            #   and its C++ kernels' primitives (csrc/mirror_fused.cpp)

The parameter set is exactly what the controller hands to MirrorSnapshot: every
nested block (ranks 4 + 4 + 8 = 16) of A (r × in) and B (out × r) for each
adapted layer. The baseline is one copy of the same tensors, one allocation
each as a model holds them, into separate tensors: one `torch._foreach_copy_`
into preallocated buffers, under no_grad, with no Python list built per call.
The profile also times the other form of one copy, every tensor into one flat
buffer with a single `torch.cat(out=)`, and the report gives the cycle against
it too. A Mirror cycle = `save` (copy into the flat pool) + `drift` (relative
distance, one sync) + `restore` (copy back). Arms, interleaved per repeat: the
default `MirrorSnapshot()` (eager, its parameters packed into one buffer at its
first save), `MirrorConfig(pack=False)` (eager, per tensor, on a second set of
the same values), and with `--with-cpp` `MirrorConfig(kernel="fused")`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import (LoadMonitor, add_device_args, check_device, command_line, contention_note,  # noqa: E402
                     count_aten_ops, environment, fmt_range, publish, summarize, sync, torch_dtype)

# name: (layers, [(in, out) per adapted module])
SETS = {
    "minilm": (6, [(384, 384), (384, 384)]),  # query, value
    "llama1b": (16, [(2048, 2048), (2048, 512)]),  # q_proj, v_proj (GQA: 8 KV heads × 64)
    "tiny": (2, [(32, 32), (32, 32)]),
}
BLOCKS = (4, 4, 8)  # nested levels 4 / 8 / 16
FLAT_COPY = "one copy into a flat buffer (torch.cat)"


def adapter_params(name: str, device="cpu", dtype=torch.float32) -> list[torch.Tensor]:
    layers, mods = SETS[name]
    g = torch.Generator().manual_seed(0)
    ps = []
    for _ in range(layers):
        for i, o in mods:
            ps += [torch.randn(b, i, generator=g) for b in BLOCKS] + [torch.randn(o, b, generator=g) * 0.01 for b in BLOCKS]
    return [torch.nn.Parameter(p.to(device=device, dtype=dtype)) for p in ps]


def timed(fn, inner: int, device="cpu") -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / inner


def compiled_drift(params, snaps):
    """torch.compile (inductor) of the drift over the tensors as they lie: Σ‖W − W_snap‖ and Σ‖W_snap‖, per
    tensor, read in place (no gather, no scratch). The generic compiler's answer to "fuse the drift"."""

    def terms(ps, ss):
        num = torch.stack([torch.linalg.vector_norm(p - s, dtype=torch.float32) for p, s in zip(ps, ss)]).sum()
        den = torch.stack([torch.linalg.vector_norm(s, dtype=torch.float32) for s in ss]).sum()
        return torch.stack([num, den])

    fn = torch.compile(terms, dynamic=False, fullgraph=True)
    return lambda: fn(params, snaps)


CPP_COPY = "one copy with memcpy in one parallel region (C++)"
CPP_DRIFT = "fused drift terms, W and W_snap read in place (C++)"
CPP_CYCLE = "cycle with the C++ kernels (copy + fused drift + copy)"


def fused_kernels():
    """The library's fused CPU kernels (csrc/mirror_fused.cpp; built by load_inline at first use, then cached)."""
    from unified_lora._fused import mirror_kernels

    return mirror_kernels()


def cpp_prims(k, params, pool, snap) -> dict:
    """The C++ copy, fused drift and fused cycle over the library's own snapshot pool, each checked first."""
    ws, views = [p.detach() for p in params], pool.snap_views
    bufs = [torch.zeros_like(w) for w in ws]
    k.copy_all(bufs, ws)
    if not all(torch.equal(a, b) for a, b in zip(bufs, ws)):
        raise SystemExit("C++ copy_all did not copy every tensor: not timing a wrong copy")

    def drift():
        sq = k.drift_sq(ws, views).sqrt_().sum(1).tolist()
        return sq[0] / sq[1]

    with torch.no_grad():
        torch._foreach_add_(ws, 1e-3)  # some drift to measure, then the snapshot back
        got, want = drift(), snap.drift(params)
        torch._foreach_copy_(ws, views)
    if not math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-9):
        raise SystemExit(f"C++ fused drift {got!r} != library drift {want!r}: not timing a wrong kernel")

    def cycle():
        k.copy_all(views, ws)
        drift()
        k.copy_all(ws, views)

    return {CPP_COPY: lambda: k.copy_all(bufs, ws), CPP_DRIFT: lambda: k.drift_sq(ws, views), CPP_CYCLE: cycle}


GATHER = "gather (copy into the pool)"
PACKED_DRIFT = "packed drift terms (sub + row norms, no gather)"
UNPACKED_DRIFT = "drift terms (gather + sub_ + row norms)"
ONE_NORM = "sub, then one row-norm call over both halves (the packed drift before stop 32)"
SPLIT_NORM = "sub, then one row-norm call per half (the packed drift on the CPU since stop 32)"


def sub_then_norms(pool, v, split: bool):
    """The packed drift's subtraction, then the library's row norms (`_FlatPool.squared_row_norms`) in one
    of its two forms: one call over [2, rows, width], or one call per half (the CPU path). Both are checked
    to give the same norms before timing."""
    def run():
        torch.sub(v.live_rows, v.snap, out=v.scratch)
        return pool.squared_row_norms(v, per_half=split)

    got = run().clone()
    torch.sub(v.live_rows, v.snap, out=v.scratch)
    if not torch.equal(got, pool.squared_row_norms(v, per_half=not split)):
        raise SystemExit("sub + row norms: the two forms give different norms: not timing a wrong kernel")
    return run


def bench_set(name: str, repeats: int, min_time: float, device="cpu", dtype=torch.float32,
              with_compile=False, kernels=None) -> dict:
    from unified_lora import MirrorConfig, MirrorSnapshot

    # The default arm packs its parameters into one buffer at the first save (MirrorConfig.pack). The
    # baseline copy, the pack=False arm and the fused arm use a second set with the same values, one
    # allocation per tensor: the parameters as a model holds them before any packing.
    params = adapter_params(name, device, dtype)
    params_u = adapter_params(name, device, dtype)
    nbytes = sum(p.numel() * p.element_size() for p in params)
    bufs = [p.detach().clone() for p in params_u]
    snap = MirrorSnapshot(MirrorConfig())
    snap_u = MirrorSnapshot(MirrorConfig(pack=False))
    check_same_snapshot(snap_u, params_u, snap, params, "the packed eager snapshot")
    if len({p.untyped_storage().data_ptr() for p in params}) != 1:
        raise SystemExit("MirrorConfig(pack=True) did not pack the parameters: not timing the packed path")
    # the library's fused CPU kernels: a third arm, checked against the eager snapshot before any timing
    snap_f = MirrorSnapshot(MirrorConfig(kernel="fused")) if kernels is not None else None
    if snap_f is not None:
        check_same_snapshot(snap_u, params_u, snap_f, params_u, "MirrorConfig(kernel='fused')")

    @torch.no_grad()
    def copy_once():
        torch._foreach_copy_(bufs, params_u)

    phase = {}

    def make_cycle(sn, ps, arm):
        def cycle():  # drift ends in a host read (.tolist), so the phases are device-synchronised
            t0 = time.perf_counter()
            sn.save(ps)
            sync(device)
            t1 = time.perf_counter()
            sn.drift(ps)
            t2 = time.perf_counter()
            sn.restore(ps)
            sync(device)
            t3 = time.perf_counter()
            sn.clear()
            for k, v in (("save", t1 - t0), ("drift", t2 - t1), ("restore", t3 - t2)):
                phase.setdefault((arm, k), []).append(v)
        return cycle

    arms = {"copy": copy_once, "cycle": make_cycle(snap, params, "cycle"),
            "cycle_unpacked": make_cycle(snap_u, params_u, "cycle_unpacked")}
    if snap_f is not None:
        arms["cycle_fused"] = make_cycle(snap_f, params_u, "cycle_fused")
    for _ in range(3):
        for fn in arms.values():
            fn()
    phase.clear()
    one = timed(copy_once, 3, device)
    inner = max(1, math.ceil(min_time / max(one, 1e-7)))
    got_all = {arm: [] for arm in arms}
    per_phase = {(arm, k): [] for arm in arms if arm != "copy" for k in ("save", "drift", "restore")}
    for rep in range(repeats):
        order = list(arms.items())
        if rep % 2:
            order.reverse()
        for arm, fn in order:
            phase.clear()
            got_all[arm].append(timed(fn, inner, device))
            for key in per_phase:
                if key[0] == arm:
                    per_phase[key].append(sum(phase[key]) / len(phase[key]))
    copies = got_all["copy"]
    ops = {arm: count_aten_ops(fn) for arm, fn in arms.items()}  # what each issues; on a GPU, launches

    def arm_result(arm):
        return {"cycle_s": summarize(got_all[arm]), "aten_ops": ops[arm],
                "ratio": summarize([c / b for c, b in zip(got_all[arm], copies)]),
                "phase_multiples": {k: summarize([v / c for v, c in zip(vals, copies)])
                                    for (a, k), vals in per_phase.items() if a == arm}}

    # Profile: the eager primitives a cycle is built from, each ÷ the same copy (interleaved again).
    snap.save(params)
    snap_u.save(params_u)
    pool, pool_p, live = snap_u._pools[0][0], snap._pools[0][0], snap._live[0]
    # The other form "one copy" can take: every tensor into one flat buffer with a single cat (views built
    # here, outside the timing). Timed to check whether the foreach baseline is the cheapest copy.
    sizes = [p.numel() for p in params_u]
    flat = torch.empty(sum(sizes), device=device, dtype=dtype)
    flat_views = [p.detach().view(-1) for p in params_u]
    with torch.no_grad():
        torch.cat(flat_views, out=flat)
        if not all(torch.equal(a, b) for a, b in zip(flat.split(sizes), flat_views)):
            raise SystemExit("torch.cat into the flat buffer did not copy every tensor: not timing a wrong copy")
    prims = {FLAT_COPY: lambda: torch.cat(flat_views, out=flat),
             GATHER: lambda: torch._foreach_copy_(pool.scratch_views, params_u),
             "flat sub_ (W − S)": lambda: pool.scratch.sub_(pool.snap),
             UNPACKED_DRIFT: lambda: pool.drift_terms(params_u),
             "packed save (one copy between two buffers)": lambda: pool_p.snap.copy_(live),
             PACKED_DRIFT: lambda: pool_p.drift_terms(params, live),
             "foreach_norm per tensor (replaced)": lambda: torch._foreach_norm(pool.scratch_views, 2)}
    if torch.device(device).type == "cpu":  # the split is the CPU path; a GPU reduction need not agree bit for bit
        prims[ONE_NORM] = sub_then_norms(pool_p, pool_p.prefix(len(params), live), split=False)
        prims[SPLIT_NORM] = sub_then_norms(pool_p, pool_p.prefix(len(params), live), split=True)
    compile_s = None
    if with_compile:
        with torch.no_grad():
            t0 = time.perf_counter()
            fused = compiled_drift(params_u, snap_u.weights)
            num, den = fused().tolist()  # the first call compiles
            compile_s = time.perf_counter() - t0
            for _ in range(3):
                fused()
            want = snap_u.drift(params_u)
        got = num / den
        if not math.isclose(got, want, rel_tol=1e-3, abs_tol=1e-6):
            raise SystemExit(f"compiled drift {got!r} != library drift {want!r}: not timing a wrong kernel")
        prims["torch.compile drift (inductor, in place)"] = fused
    if kernels is not None:
        prims.update(cpp_prims(kernels, params_u, pool, snap_u))
    prim = {k: [] for k in prims}
    with torch.no_grad():
        for rep in range(max(3, repeats // 3)):
            c = timed(copy_once, inner, device)
            for k, fn in prims.items():
                prim[k].append(timed(fn, inner, device) / c)
    snap.clear()
    snap_u.clear()
    out = {"set": name, "n_tensors": len(params), "bytes": nbytes, "inner_iters": inner,
           "primitive_multiples": {k: summarize(v) for k, v in prim.items()}, "compile_s": compile_s,
           "copy_s": summarize(copies), "copy_aten_ops": ops["copy"], **arm_result("cycle"), "unpacked": arm_result("cycle_unpacked")}
    if snap_f is not None:
        out["fused"] = arm_result("cycle_fused")
    return out


def check_same_snapshot(ref, ref_params, other, other_params, what: str) -> None:
    """`other` must save, measure drift and restore as `ref` (the per-tensor eager snapshot) does, on
    parameters with the same values, before it is timed."""
    with torch.no_grad():
        if not all(torch.equal(a, b) for a, b in zip(ref_params, other_params)):
            raise SystemExit(f"{what}: the two parameter sets differ before the check")
        keep = [p.detach().clone() for p in other_params]
        ref.save(ref_params)
        other.save(other_params)
        for ps in {id(ref_params): ref_params, id(other_params): other_params}.values():
            torch._foreach_add_(ps, 1e-3)
        got, want = other.drift(other_params), ref.drift(ref_params)
        other.restore(other_params)
        ok = all(torch.equal(p, k) for p, k in zip(other_params, keep))
        if ref_params is not other_params:
            ref.restore(ref_params)
        ref.clear()
        other.clear()
    if not math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-9) or not ok:
        raise SystemExit(f"{what}: drift {got!r} vs eager {want!r}, restore exact: {ok}; not timing a wrong kernel")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="minilm,llama1b", help=f"comma list of {sorted(SETS)}")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--min-time", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--with-compile", action="store_true",
                    help="also time torch.compile's fused drift (inductor; needs a C++ compiler, ~1 min to compile)")
    ap.add_argument("--with-cpp", action="store_true",
                    help="also time the library's kernel='fused' cycle and its C++ primitives (CPU only; needs g++ "
                         "and ninja)")
    add_device_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.sets, args.repeats, args.min_time, args.threads = "tiny", 3, 0.005, 1
    torch.set_num_threads(args.threads)
    dev = check_device(args.device)
    kernels = None
    if args.with_cpp:
        if dev.type != "cpu":
            raise SystemExit("--with-cpp: kernel='fused' is a CPU kernel; run it without --device cuda")
        t0 = time.perf_counter()
        kernels = fused_kernels()
        print(f"built mirror_fused.cpp in {time.perf_counter() - t0:.0f} s", flush=True)
    load = LoadMonitor()
    cases = []
    for s in args.sets.split(","):
        c = bench_set(s, args.repeats, args.min_time, dev, torch_dtype(args.dtype), args.with_compile, kernels)
        load.sample()
        cases.append(c)
        print(f"{s}: cycle/copy {fmt_range(c['ratio'], 2)} (pack=False {fmt_range(c['unpacked']['ratio'], 2)})  "
              f"copy {c['copy_s']['median'] * 1e3:.3f} ms", flush=True)
    payload = {"benchmark": "mirror_cost", "command": command_line(), "env": environment(), "load": load.record(),
               "target": "save + drift + restore <= 3 x one foreach copy", "cases": cases,
               "kernels": ["eager", "eager_unpacked"] + (["fused"] if kernels is not None else []),
               "device": str(dev), "dtype": args.dtype}
    return publish("perf_mirror_cost", payload, render, args.quick, args.results_dir)


def _unpacked(case: dict) -> dict:
    """The per-tensor eager arm: `unpacked` since packing came in; the top level of older JSONs."""
    return case.get("unpacked", case)


def _copies_floor(case: dict) -> float:
    """save + gather + restore of the per-tensor eager cycle, each ÷ one copy (medians): what it costs
    before any arithmetic."""
    ph, prim = _unpacked(case)["phase_multiples"], case["primitive_multiples"]
    return ph["save"]["median"] + prim[GATHER]["median"] + ph["restore"]["median"]


def render(p: dict) -> str:
    gpu = not p.get("device", "cpu").startswith("cpu")
    where = f"{p['env'].get('gpu', p['device'])}, {p['dtype']}" if gpu else f"{p['env']['torch_threads']} threads"
    packed = all("unpacked" in c for c in p["cases"])
    lines = [f"## Mirror cost (snapshot + drift + restore){' — ' + where if gpu else ''}", "",
             f"Command: `{p['command']}` — {p['env']['utc']}, {where}.",
             contention_note(p["load"]), "",
             "| adapter set | MirrorConfig | tensors | MiB | one copy ms | cycle ms | cycle ÷ copy, median (min–max) | "
             "save / drift / restore (× copy) | aten ops, cycle / copy | target ≤ 3× |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in p["cases"]:
        arms = ((("eager, packed (default)", c), ("eager, pack=False", c["unpacked"])) if packed
                else (("eager (default; per tensor, before packing)", c),)) + (("fused", c.get("fused")),)
        for kernel, r in arms:
            if r is None:
                continue
            ph = r["phase_multiples"]
            lines.append(f"| {c['set']} | {kernel} | {c['n_tensors']} | {c['bytes'] / 2**20:.2f} | "
                         f"{c['copy_s']['median'] * 1e3:.3f} | {r['cycle_s']['median'] * 1e3:.3f} | "
                         f"{fmt_range(r['ratio'], 2)} | {ph['save']['median']:.2f} / {ph['drift']['median']:.2f} / "
                         f"{ph['restore']['median']:.2f} | "
                         f"{r.get('aten_ops', '–')} / {c.get('copy_aten_ops', '–')} | "
                         f"{'met' if r['ratio']['median'] <= 3 else 'missed'} |")
    lines += ["", "Where the time goes: each primitive ÷ one copy, median (same run):", "",
              "| adapter set | " + " | ".join(p["cases"][0]["primitive_multiples"]) + " |",
              "|---|" + "---|" * len(p["cases"][0]["primitive_multiples"])]
    for c in p["cases"]:
        lines.append(f"| {c['set']} | " + " | ".join(f"{v['median']:.2f}" for v in c["primitive_multiples"].values())
                     + " |")
    per_tensor = ("A per-tensor eager cycle (`pack=False`) is save (one foreach copy into the flat pool) + drift "
                  "(gather W into the pool's scratch, one flat sub_, one row-norm kernel for ‖W − W_snap‖ and "
                  "‖W_snap‖ per tensor) + restore (foreach copy back).")
    if all(GATHER in c["primitive_multiples"] for c in p["cases"]):  # (stop 8's GPU JSON predates the primitive)
        per_tensor += (" Its three copies alone, with their host overhead, cost save + gather + restore = " + ", ".join(
            f"{c['set']} {_copies_floor(c):.2f}×" for c in p["cases"]) + " in this run, before any arithmetic.")
    if packed:
        lines += ["", "The baseline is one `_foreach_copy_` of the adapter parameters as a model holds them, one "
                  "allocation per tensor. The default arm (`MirrorConfig(pack=True)`) moved its parameters into one "
                  "buffer with the snapshot pool's layout at its first save (each `.data` a view of it), so save and "
                  "restore are each one copy between two buffers and the drift one subtraction, the row norms (one "
                  "kernel on a GPU; on the CPU one call per half since stop 32, so that each thread reads the rows "
                  "it has just written) and one GEMM that sums the rows per tensor, with no gather. Both arms were checked against each "
                  "other (same drift, exact restore) before timing. " + per_tensor]
    else:
        lines += ["", per_tensor + " ≤ 3× needs a kernel that reads W and W_snap in place: "
                  "`MirrorConfig(kernel=\"fused\")` (CPU; `--with-cpp` times it)."]
    flat = [c for c in p["cases"] if FLAT_COPY in c["primitive_multiples"]]
    if flat:
        lines += ["", "The baseline copies into separate tensors (one `_foreach_copy_`), the form a snapshot of separate "
                  "parameters takes. A copy of the same bytes into one flat buffer (`torch.cat(..., out=)` over flat "
                  "views built beforehand) measured " + ", ".join(
                      f"{c['set']} {c['primitive_multiples'][FLAT_COPY]['median']:.2f}×" for c in flat) + " of it"
                  + ("; against that copy the cycle is " + ", ".join(
                      f"{c['set']} {c['ratio']['median'] / c['primitive_multiples'][FLAT_COPY]['median']:.2f}×"
                      for c in flat) + "." if any(c["primitive_multiples"][FLAT_COPY]["median"] < 1 for c in flat)
                     else ": the foreach copy is the cheaper of the two copies torch's ops give.")]
    split = [c for c in p["cases"] if SPLIT_NORM in c["primitive_multiples"]]
    if split:
        lines += ["", "The packed drift's subtraction followed by its row norms, ÷ one copy: " + ", ".join(
            f"{c['set']} {c['primitive_multiples'][ONE_NORM]['median']:.2f}× with one norm call over both halves, "
            f"{c['primitive_multiples'][SPLIT_NORM]['median']:.2f}× with one call per half" for c in split)
            + ". A CPU op splits its output among its threads; one call over both halves hands the whole "
            "scratch half to one thread, which then reads rows the other thread has just written. The library "
            "makes one call per half on the CPU, one call on a GPU."]
    key = "torch.compile drift (inductor, in place)"
    comp = [c for c in p["cases"] if key in c["primitive_multiples"]]
    if comp:
        lines += ["", "`--with-compile`: torch.compile (inductor) fuses the drift over the tensors as they lie, reading W "
                  "and W_snap in place; checked against the library's drift before timing. It measured " + ", ".join(
                      f"{c['set']} {c['primitive_multiples'][key]['median']:.2f}× (compile {c['compile_s']:.0f} s) "
                      f"against the library's {c['primitive_multiples'][UNPACKED_DRIFT]['median']:.2f}×"
                      for c in comp) + ": " + ("slower than the eager flat-pool drift, so the generic compiler is not "
                  "the missing kernel." if all(c["primitive_multiples"][key]["median"] >
                                                c["primitive_multiples"][UNPACKED_DRIFT]["median"]
                                                for c in comp) else "faster than the eager drift in at least one set.")]
    cpp = [c for c in p["cases"] if CPP_CYCLE in c["primitive_multiples"]]
    if cpp:
        def vs_cheapest(c, multiple):  # a multiple of the foreach copy, re-expressed against the cheapest copy
            m = c["primitive_multiples"]
            return multiple / min(1.0, *(m[k]["median"] for k in (FLAT_COPY, CPP_COPY) if k in m))

        lines += ["", "`--with-cpp`: the kernels behind `MirrorConfig(kernel=\"fused\")` (`src/unified_lora/csrc/"
                  "mirror_fused.cpp`, built with load_inline when the snapshot is created), checked against the library's "
                  "eager copy and drift before timing. The fused row above is the library's own cycle with them (Python "
                  "and checks included); the primitives here call them directly. They work on the library's "
                  "own snapshot pool: save and restore are memcpy, and the drift reads W and W_snap in place, writes "
                  "nothing and reduces per tensor; both split the tensors into 64 Ki-element chunks shared by the "
                  "threads in one parallel region. ÷ the foreach copy: " + "; ".join(
                      f"{c['set']}: C++ copy {c['primitive_multiples'][CPP_COPY]['median']:.2f}×, fused drift "
                      f"{c['primitive_multiples'][CPP_DRIFT]['median']:.2f}× (eager "
                      f"{c['primitive_multiples'][UNPACKED_DRIFT]['median']:.2f}×), cycle "
                      f"{c['primitive_multiples'][CPP_CYCLE]['median']:.2f}×" for c in cpp) + ". A cycle moves the "
                  "adapter bytes three times (save, the drift's read of W and W_snap, restore), so three of the "
                  "cheapest copy is the floor of this design. Against the cheapest copy measured here (foreach, flat "
                  "cat or C++ memcpy) the raw fused cycle is " + ", ".join(
                      f"{c['set']} {x:.2f}× ({'met' if x <= 3 else 'missed'})" for c, x in
                      ((c, vs_cheapest(c, c['primitive_multiples'][CPP_CYCLE]['median'])) for c in cpp))
                  + ", the library's kernel='fused' cycle " + ", ".join(
                      f"{c['set']} {x:.2f}× ({'met' if x <= 3 else 'missed'})" for c, x in
                      ((c, vs_cheapest(c, c['fused']['ratio']['median'])) for c in cpp if 'fused' in c))
                  + ", and the library's eager cycle is " + ", ".join(
                      f"{c['set']} {vs_cheapest(c, c['ratio']['median']):.1f}×" for c in cpp)
                  + (" (packed; per tensor " + ", ".join(
                      f"{c['set']} {vs_cheapest(c, c['unpacked']['ratio']['median']):.1f}×" for c in cpp) + ")"
                     if packed else "") + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
