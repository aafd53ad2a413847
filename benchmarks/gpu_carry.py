"""Build the folder that travels to a lent GPU machine (`.gpucarry/` by default).

    python benchmarks/gpu_carry.py                 # .gpucarry/{minilm16,glue}, git-ignored locally
    python benchmarks/gpu_carry.py --out /tmp/carry --model some/hf-folder

The device tool carries at most 64 MiB of working tree, and the GPU machine
cannot reach a hub. all-MiniLM-L6-v2 is 87 MB in fp32, so its weights travel
stored as fp16 (about 45 MB) with its tokenizer and config; `run.py` loads any
checkpoint as fp32, so every method starts from the same slightly rounded
weights (the largest relative rounding is printed). The GLUE folders the grid
needs (`<Task>/{train,dev}.tsv`) are copied beside it, and a ninja wheel goes into
`wheels/`: torch's `load_inline` needs ninja to build the C++ extensions
(`NestedLoRALayer(kernel="cpp")`, `MirrorConfig(kernel="fused")`), and the GPU
machine cannot reach the package registry (`gpu_sitting.sh check` installs it
from there when the machine lacks it).

Then, in a device call: `carry=[".gpucarry"]`, and
`MODEL=.gpucarry/minilm16 GLUE=.gpucarry/glue bash benchmarks/gpu_sitting.sh ...`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

TASK_FOLDERS = ("MRPC", "RTE", "CoLA", "SST-2")
LIMIT = 64 * 2**20  # what one device call carries, working tree included


def build(out: Path, model: str, glue: Path, tasks=TASK_FOLDERS) -> dict:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoTokenizer

    src = Path(model)
    weights = src / "model.safetensors"
    if not weights.is_file():
        raise SystemExit(f"{weights} not found: --model must be a local HF folder with model.safetensors")
    dst = out / "minilm16"
    dst.mkdir(parents=True, exist_ok=True)
    sd = load_file(str(weights))
    half = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    worst = 0.0  # largest elementwise |fp16 - fp32| / |fp32| over values in fp16's normal range
    for k, v in sd.items():
        if v.is_floating_point():
            v32, big = v.float(), v.float().abs() >= 2.0 ** -14
            if big.any():
                worst = max(worst, ((half[k].float() - v32).abs()[big] / v32.abs()[big]).max().item())
    save_file(half, str(dst / "model.safetensors"), metadata={"format": "pt"})
    AutoConfig.from_pretrained(src).save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    for task in tasks:
        if not (glue / task / "train.tsv").is_file():
            raise SystemExit(f"{glue / task}/train.tsv not found: --glue must be the GLUE root")
        shutil.copytree(glue / task, out / "glue" / task, dirs_exist_ok=True)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"out": str(out), "bytes": size, "max_rel_rounding": worst}


def carry_ninja(out: Path) -> Path:
    """A ninja wheel in `out/wheels` (downloaded once from the package registry)."""
    wheels = out / "wheels"
    if not any(wheels.glob("ninja-*.whl")):  # py3-none-manylinux: any CPython on an x86-64 Linux host
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--platform", "manylinux2014_x86_64", "-d", str(wheels), "ninja>=1.11"], check=True)
    return next(wheels.glob("ninja-*.whl"))


def main(argv=None) -> int:
    from unified_lora.data import default_model_path
    from unified_lora.data.loaders import resolve_glue_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / ".gpucarry"))
    ap.add_argument("--model", default=None, help="local HF folder (default: the bundled all-MiniLM-L6-v2)")
    ap.add_argument("--glue", default=None, help="GLUE root (default: unified_lora's resolution for RTE)")
    ap.add_argument("--tasks", default=",".join(TASK_FOLDERS))
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    glue = Path(args.glue) if args.glue else resolve_glue_dir("rte")
    res = build(out, args.model or default_model_path(), glue, tuple(args.tasks.split(",")))
    carry_ninja(out)
    res["bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    if out.is_relative_to(REPO):  # keep it out of commits, but let it travel when named in `carry`
        exclude = Path(subprocess.run(["git", "rev-parse", "--git-common-dir"], cwd=REPO, capture_output=True,
                                      text=True, check=True).stdout.strip())
        exclude = (exclude if exclude.is_absolute() else REPO / exclude) / "info" / "exclude"
        rel = f"/{out.relative_to(REPO).as_posix()}/"
        lines = exclude.read_text().splitlines() if exclude.exists() else []
        if rel not in lines:
            exclude.parent.mkdir(parents=True, exist_ok=True)
            exclude.write_text("\n".join(lines + [rel]) + "\n")
    print(f"{res['out']}: {res['bytes'] / 2**20:.1f} MiB (device calls carry ≤ 64 MiB with the working tree); "
          f"fp16 weights, largest relative rounding {res['max_rel_rounding']:.1e}")
    if res["bytes"] > LIMIT:
        print("warning: larger than one device call carries", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
