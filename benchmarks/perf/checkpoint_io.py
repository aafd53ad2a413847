"""Saving: what writing the adapter costs, against PEFT's own `save_pretrained` of the same adapter, and what an
adapter-only Trainer checkpoint saves on disk against a whole-model one.

    python benchmarks/perf/checkpoint_io.py              # MiniLM (query, value at r16; classifier), 15 repeats
    python benchmarks/perf/checkpoint_io.py --quick

One process, arms interleaved repeat by repeat, each writing into a fresh folder under `--dir` (default: a temporary
folder in the system's temp directory; the JSON records its file system):
- `peft`: PEFT LoRA r16 on the same base and targets, `PeftModel.save_pretrained(dir)`: the baseline. It writes its
  files in place, with no fsync.
- `export`: `export_peft_adapter(model, adapters, dir, rank=16)`: the same PEFT format from nested layers. It is
  atomic (a temporary folder, then renames) and durable (every file and folder fsynced).
- `export_no_fsync`: the same, with the library's fsync helpers made no-ops for this arm. This is the profile arm
  that shows the fsync share.
- `whole` / `adapter_only`: the Trainer's checkpoint write, `model.save_pretrained(dir)` of the nested model as it
  is, and under `adapter_only_saves(model)` (`UnifiedLoRACallback(save_base=False)`, the default on a quantized base).
  Its folder size is compared, as well as its time.

Ratios are per repeat (arm ÷ baseline, same repeat), then median (min–max) over repeats.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import (LoadMonitor, adapter_targets, command_line, contention_note, environment, fmt_range,  # noqa: E402
                     load_classifier, publish, summarize)

ARMS = ("peft", "export", "export_no_fsync", "whole", "adapter_only")


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def file_system(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, timeout=10).stdout.split("\n")
        return out[1].split()[1]
    except (OSError, IndexError, subprocess.SubprocessError):  # pragma: no cover - no df
        return "unknown"


def build(model_arg):
    """(the nested model, its adapters, the PEFT model, the targets): the same base weights, targets (PEFT's default
    for the model type: query and value on MiniLM) and rank (16)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from unified_lora import setup_unified_lora

    torch.manual_seed(0)
    nested = load_classifier(model_arg)
    targets, head = adapter_targets(nested)
    adapters, _ = setup_unified_lora(nested, target_modules=targets, modules_to_save=head, print_fn=None)
    torch.manual_seed(0)
    peft = get_peft_model(load_classifier(model_arg),
                          LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=16, target_modules=targets))
    return nested, adapters, peft, targets


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF path (default bundled MiniLM); 'tiny' = random 2-layer BERT")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--dir", default=None, help="where the arms write (default: a fresh temporary folder)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.model = 2, args.model or "tiny"

    import torch
    from transformers.utils import logging as hf_logging

    from unified_lora import _files
    from unified_lora.callbacks import adapter_only_saves
    from unified_lora.peft_io import export_peft_adapter

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # ("Writing model shards" at every save)
    root = Path(tempfile.mkdtemp(prefix="ckpt_io_", dir=args.dir))
    load = LoadMonitor()
    nested, adapters, peft, targets = build(args.model)
    real_fsync = (_files.fsync_file, _files.fsync_dir)

    def no_fsync(*_a, **_k):
        return None

    def write(arm: str, out: Path) -> None:
        if arm == "peft":
            peft.save_pretrained(str(out))
        elif arm in ("export", "export_no_fsync"):
            if arm == "export_no_fsync":
                _files.fsync_file = _files.fsync_dir = no_fsync
            try:
                export_peft_adapter(nested, adapters, out, rank=16)
            finally:
                _files.fsync_file, _files.fsync_dir = real_fsync
        elif arm == "whole":
            adapter_only_saves(nested, False)
            nested.save_pretrained(str(out))
        else:
            adapter_only_saves(nested)
            try:
                nested.save_pretrained(str(out))
            finally:
                adapter_only_saves(nested, False)

    times: dict[str, list[float]] = {a: [] for a in ARMS}
    sizes: dict[str, int] = {}
    try:
        for i in range(args.repeats + 1):  # repeat 0 warms every path up (imports, PEFT's skeleton) and is dropped
            order = ARMS[i % len(ARMS):] + ARMS[:i % len(ARMS)]
            for arm in order:
                out = root / f"{arm}_{i}"
                t0 = time.perf_counter()
                write(arm, out)
                dt = time.perf_counter() - t0
                sizes[arm] = folder_bytes(out)
                shutil.rmtree(out)
                if i:
                    times[arm].append(dt)
            load.sample()
    finally:
        fs = file_system(root)
        shutil.rmtree(root, ignore_errors=True)

    def ratio(a: str, b: str) -> dict:
        return summarize([x / y for x, y in zip(times[a], times[b])])

    payload = {
        "benchmark": "checkpoint_io", "command": command_line(), "env": environment(), "load": load.record(),
        "device": "cpu", "model": args.model or "all-MiniLM-L6-v2 (bundled)", "targets": targets, "rank": 16,
        "repeats": args.repeats, "file_system": fs,
        "time_s": {a: summarize(v) for a, v in times.items()},
        "bytes": sizes,
        "ratios": {
            "export_vs_peft": ratio("export", "peft"),
            "export_no_fsync_vs_peft": ratio("export_no_fsync", "peft"),
            "fsync_share_of_export": summarize([1 - n / e for n, e in zip(times["export_no_fsync"],
                                                                          times["export"])]),
            "adapter_only_vs_whole_time": ratio("adapter_only", "whole"),
            "adapter_only_vs_whole_bytes": sizes["adapter_only"] / sizes["whole"],
            "adapter_only_vs_peft_bytes": sizes["adapter_only"] / sizes["peft"],
        },
    }
    return publish("perf_checkpoint_io", payload, render, quick=args.quick, results_dir=args.results_dir)


def render(p: dict) -> str:
    t, r, b = p["time_s"], p["ratios"], p["bytes"]
    ms = dict(scale=1e3, digits=1, unit=" ms")
    lines = [
        f"## Saving the adapter (`checkpoint_io.py`) on {p['device']}",
        "",
        f"`{p['command']}`; {p['model']}, {', '.join(p['targets'])} at r{p['rank']} with the classifier; "
        f"{p['repeats']} repeats, arms interleaved, each into a fresh folder on {p['file_system']}. "
        "Ratios per repeat, median (min–max).",
        "",
        "| arm | time | ÷ PEFT `save_pretrained` | folder |",
        "|---|---|---|---|",
        f"| PEFT LoRA r16 `save_pretrained` (in place, no fsync) | {fmt_range(t['peft'], **ms)} | 1 | "
        f"{b['peft'] / 2**20:.2f} MiB |",
        f"| `export_peft_adapter` (atomic, fsynced) | {fmt_range(t['export'], **ms)} | "
        f"{fmt_range(r['export_vs_peft'], 2)} | {b['export'] / 2**20:.2f} MiB |",
        f"| the same without fsync (profile arm) | {fmt_range(t['export_no_fsync'], **ms)} | "
        f"{fmt_range(r['export_no_fsync_vs_peft'], 2)} | |",
        "",
        f"fsync's share of the export: {fmt_range(r['fsync_share_of_export'], 2)}.",
        "",
        "| Trainer checkpoint weights (`model.save_pretrained`) | time | folder |",
        "|---|---|---|",
        f"| whole model (`save_base=True`) | {fmt_range(t['whole'], **ms)} | {b['whole'] / 2**20:.2f} MiB |",
        f"| adapter-only (`save_base=False`) | {fmt_range(t['adapter_only'], **ms)} "
        f"(÷ whole {fmt_range(r['adapter_only_vs_whole_time'], 2)}) | {b['adapter_only'] / 2**20:.2f} MiB "
        f"(÷ whole {r['adapter_only_vs_whole_bytes']:.3f}; ÷ PEFT's folder {r['adapter_only_vs_peft_bytes']:.2f}) |",
        "",
        contention_note(p["load"]),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
