"""Shared plumbing for the benchmark scripts: environment record, JSON + Markdown output.

Every script writes `benchmarks/results/<name>.json` and replaces its own section
of `benchmarks/results/perf.md` (between `<!-- name -->` markers), so each
number on the page sits next to the command that produced it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CONTENTION_LOAD = 1.5  # 1-minute load average above which numbers are flagged "taken under contention"


def command_line() -> str:
    """The command that reproduces this run, relative to the repo root."""
    argv = [os.path.relpath(sys.argv[0], REPO) if os.path.isabs(sys.argv[0]) else sys.argv[0], *sys.argv[1:]]
    return "python " + " ".join(shlex.quote(a) for a in argv)


def git_commit(repo: Path = REPO) -> dict:
    """The code a run ran: {"commit": the short hash of the checkout's HEAD, "dirty": whether the checkout differs
    from it (a tracked file changed, or a file git does not ignore added; benchmarks/results/, where the runs write,
    left out)}. Both None where git cannot tell (no git, a copy without its .git). `repo`: the checkout's root."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "status", "--porcelain", "--", ".", ":(exclude)benchmarks/results"],
                                cwd=repo, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


# The files from_pretrained reads for the model and its tokenizer (weights whole or sharded, config, vocabularies).
MODEL_FILES = ("config.json", "*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json",
               "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def model_fingerprint(path: str) -> str | None:
    """sha256 over the names and bytes of a local model folder's MODEL_FILES: a run records a model by its folder's
    name (quality/_grid.py's `model_id`, multitask_quality.py's settings), and two folders of one name ("model",
    "checkpoint-500") may hold different models, which this tells apart. None for a hub id (no local folder). It
    reads every weight file once per command."""
    import hashlib

    root = Path(path)
    if not root.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted({f for pat in MODEL_FILES for f in root.glob(pat) if f.is_file()}):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:16]


def environment() -> dict:
    import torch

    info = {
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda_version"] = torch.version.cuda
    # the installed peft's version without importing it where the benchmark did not (peft pulls in transformers and
    # bitsandbytes: seconds of a short run's start-up)
    peft = sys.modules.get("peft")
    try:
        info["peft"] = peft.__version__ if peft is not None else importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        pass
    return info


class LoadMonitor:
    """Samples the 1-minute load average. A benchmark's own busy threads count in it, so the run is
    flagged `under_contention` when the load ever exceeds max(1.5, own threads + 0.5): that is, when
    something besides the benchmark was running."""

    def __init__(self, own_threads: int | None = None):
        if own_threads is None:
            import torch

            own_threads = torch.get_num_threads()
        self.threshold = max(CONTENTION_LOAD, own_threads + 0.5)
        self.own_threads = own_threads
        self.samples: list[float] = []
        self.sample()

    def sample(self) -> None:
        try:
            self.samples.append(os.getloadavg()[0])
        except OSError:  # pragma: no cover - no getloadavg on this platform
            pass

    def record(self) -> dict:
        self.sample()
        return load_record(self.samples, self.own_threads)


def load_record(samples: list[float], own_threads: int) -> dict:
    threshold = max(CONTENTION_LOAD, own_threads + 0.5)
    peak = max(samples) if samples else None
    return {
        "loadavg_1m_samples": [round(s, 2) for s in samples],
        "loadavg_1m_max": peak,
        "own_threads": own_threads,
        "threshold": threshold,
        "under_contention": bool(peak is not None and peak > threshold),
        "contention_rule": f"os.getloadavg()[0] > max({CONTENTION_LOAD}, own threads + 0.5) = {threshold} at any sample",
    }


def summarize(values) -> dict:
    v = [float(x) for x in values]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def fmt_range(s: dict, digits: int = 3, scale: float = 1.0, unit: str = "") -> str:
    return f"{s['median'] * scale:.{digits}f}{unit} ({s['min'] * scale:.{digits}f}–{s['max'] * scale:.{digits}f})"


def write_json(name: str, payload: dict, results_dir: Path | None = None) -> Path:
    d = Path(results_dir or RESULTS)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


PERF_HEADER = """# Performance benchmarks (CPU)

Generated by the scripts in `benchmarks/perf/`; each section is replaced when its
script runs again. Ratios are ours ÷ PEFT (or ÷ the no-controller step) measured
in the same process, interleaved repeat by repeat: median (min–max) over repeats.
No GPU was available for these runs.
"""


def update_markdown(section: str, body: str, results_dir: Path | None = None, filename: str = "perf.md") -> Path:
    """Replace (or append) the `section` block of results/perf.md."""
    d = Path(results_dir or RESULTS)
    d.mkdir(parents=True, exist_ok=True)
    path = d / filename
    text = path.read_text() if path.exists() else (GPU_HEADER if filename == "perf_gpu.md" else PERF_HEADER)
    start, end = f"<!-- {section} -->", f"<!-- /{section} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        pre, rest = text.split(start, 1)
        _, post = rest.split(end, 1)
        text = pre + block + post
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    return path


GPU_HEADER = """# Performance benchmarks (GPU)

Generated by the scripts in `benchmarks/perf/` with `--device cuda`, on a GPU lent for
one sitting; each section names the device, dtype and library versions it ran with.
Ratios are ours ÷ PEFT (or ÷ the no-controller step) measured in the same process,
interleaved repeat by repeat, with the device synchronised around every timed region:
median (min–max) over repeats. The CPU results are in `perf.md`.
"""


def add_device_args(ap, dtypes=("float32", "bfloat16")) -> None:
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]; GPU results go to perf_gpu.md / *_cuda_*.json")
    ap.add_argument("--dtype", default="float32", choices=dtypes,
                    help="compute dtype (bfloat16: bf16 weights and activations, or bf16 autocast for full steps)")


def check_device(device: str):
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available on this machine")
    return dev


def sync(device) -> None:
    """Wait for queued device work, so a host clock read after it times the work itself."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


_VIEW_OPS = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::slice", "aten::select", "aten::t",
             "aten::transpose", "aten::expand", "aten::as_strided", "aten::unsqueeze", "aten::squeeze", "aten::alias",
             "aten::detach", "aten::lift_fresh"}


def count_aten_ops(fn) -> int:
    """Top-level non-view aten ops one call of `fn` issues (torch.profiler, CPU activity). On a GPU each is at
    least one kernel launch, so on a host-bound device this counts what a call costs better than a CPU clock."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.name not in _VIEW_OPS and e.cpu_parent is None)


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def publish(name: str, payload: dict, render, quick: bool = False, results_dir: Path | None = None) -> dict:
    """Write `<name>.json` (or `<name>_quick.json`) and its section of perf.md; print the command.
    A GPU run (payload["device"] not cpu) is kept apart: `<name>_cuda_<dtype>.json` in perf_gpu.md."""
    device = str(payload.get("device", "cpu"))
    page = "perf.md"
    if not device.startswith("cpu"):
        name, page = f"{name}_{device.split(':')[0]}_{payload.get('dtype', 'float32')}", "perf_gpu.md"
    name = f"{name}_quick" if quick else name
    write_json(name, payload, results_dir)
    body = render(payload)
    update_markdown(name, body, results_dir, filename=page)
    print(body)
    print(f"command: {payload['command']}")
    return payload

def contention_note(load: dict) -> str:
    if load["under_contention"]:
        return (f"**Taken under contention** (1-min load average up to {load['loadavg_1m_max']:.2f} on "
                f"{os.cpu_count()} cores shared with other jobs); re-run on a quiet machine for final numbers.")
    thr = load.get("threshold", CONTENTION_LOAD)
    own = load.get("own_threads")
    mine = f", its own {own} busy thread(s) included" if own else ""
    return f"Load average stayed ≤ {thr} (max {load['loadavg_1m_max']:.2f}{mine}): nothing else was running."


def load_classifier(model: str | None, num_labels: int = 2, dtype=None):
    """A sequence classifier: the bundled MiniLM (None), any HF path, or "tiny" (random 2-layer BERT
    from a config, hidden 32, MiniLM's vocabulary size) for smoke runs. A model whose config has no pad token id
    (GPT-2's, Llama's) gets its tokenizer's, as `unified-lora train` gives it (`load_tokenizer`: the eos token where
    the tokenizer has no pad token): their heads refuse a batch of several rows without one."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if model == "tiny":
        cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128, num_labels=num_labels)
        return BertForSequenceClassification(cfg)
    if model is None:
        from unified_lora.data import default_model_path

        model = default_model_path()
    # dtype explicit: weights stored in half precision (e.g. carried to a GPU machine) load as float32
    import torch

    m = AutoModelForSequenceClassification.from_pretrained(model, num_labels=num_labels, dtype=dtype or torch.float32)
    if m.config.pad_token_id is None:
        from unified_lora.training import load_tokenizer

        m.config.pad_token_id = load_tokenizer(model).pad_token_id
    return m


def adapter_targets(model) -> tuple[list[str] | str, list[str]]:
    """(target_modules, modules_to_save) the perf benchmarks adapt on a sequence classifier: PEFT's default targets for
    its model type (query and value on BERT and MiniLM, c_attn on GPT-2, q_proj and v_proj on Llama) and its head
    (`classifier`, or GPT-2's and Llama's `score`), as `unified-lora train` picks them."""
    from unified_lora.model import default_target_modules
    from unified_lora.training import seq_cls_head

    return default_target_modules(model), seq_cls_head(model)
