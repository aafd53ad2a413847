"""Build and load the optional C++ extensions at first use, with torch's `load_inline` (g++ and ninja):

- `csrc/mirror_fused.cpp` for `MirrorConfig(kernel="fused")`: the fused CPU Mirror kernels;
- `csrc/nested_path.cpp` for `NestedLoRALayer(kernel="cpp")`: the nested path as a C++ autograd Function.

The first call compiles the file (about half a minute to a minute on 2 cores). Later calls in the same process
return the loaded module. Later processes reuse torch's extension cache (`TORCH_EXTENSIONS_DIR`, by default
`~/.cache/torch_extensions`). The extension's name carries a digest of its source, its flags, the torch version
and the ninja version: two installs of different versions (two virtual environments, two checkouts, two torch
versions) share that cache, and under one name they would rebuild each other's build folder and, when they ran at
once, load each other's library. Two ninja versions (the system's and pip's, one first on PATH in an activated
virtual environment, the other not) record a build's command under different hashes, so each took the other's build
for stale and rebuilt it (30-80 s on 2 cores) at every switch.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import subprocess
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE = CSRC / "mirror_fused.cpp"
LAYER_SOURCE = CSRC / "nested_path.cpp"
FLAGS = ["-O3", "-fopenmp"]  # no -march=native: the cached build must run on every host that shares the cache


class FusedKernelsUnavailable(RuntimeError):
    """A C++ extension could not be built here (no C++ compiler or ninja, or the build failed)."""


def _build(name: str, source: Path, functions: list[str], option: str, default: str, **flags):
    from torch.utils.cpp_extension import is_ninja_available, load_inline

    missing = [what for what, ok in (("a C++ compiler (g++)", shutil.which("g++") or shutil.which("c++")),
                                     ("ninja (pip install ninja)", is_ninja_available())) if not ok]
    if missing:
        raise FusedKernelsUnavailable(
            f"{option} builds {source.name} at first use and needs {' and '.join(missing)}; "
            f"install it, or use {default} (the default)")
    text = source.read_text()
    try:
        return load_inline(extension_name(name, text, flags), cpp_sources=text, functions=functions, **flags)
    except Exception as e:  # compiler errors surface as RuntimeError / CalledProcessError with the build log
        raise FusedKernelsUnavailable(
            f"{option}: building {source.name} failed ({type(e).__name__}: {e}); use {default} (the default)") from e


def extension_name(name: str, text: str, flags: dict, torch_version: str | None = None,
                   ninja_version: str | None = None) -> str:
    """`name` plus a digest of the source text, the build flags, the torch version and the ninja version: one build
    folder per version of the source, of torch (torch's cache folder names the Python version and the device, not
    torch's own: a library built against one torch, loaded by another, can fail to load or crash) and of the ninja
    that torch runs (the one on PATH: ninja 1.11 and 1.13 hash a command differently, so each rebuilt the other's)."""
    if torch_version is None:
        import torch

        torch_version = torch.__version__
    if ninja_version is None:
        ninja_version = _ninja_version()
    key = text + repr(sorted(flags.items())) + torch_version + "\nninja " + ninja_version
    return f"{name}_{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _ninja_version() -> str:
    """`ninja --version` of the ninja on PATH, the one torch's load_inline runs ("" where there is none)."""
    try:
        return subprocess.run(["ninja", "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


@functools.lru_cache(maxsize=None)
def mirror_kernels():
    """The compiled module, with `drift_sq(w, s)` and `copy_all(dst, src)`; see `csrc/mirror_fused.cpp`."""
    return _build("unified_lora_mirror_fused", SOURCE, ["drift_sq", "copy_all"], "MirrorConfig(kernel='fused')",
                  "kernel='eager'", extra_cflags=FLAGS, extra_ldflags=["-fopenmp"])


@functools.lru_cache(maxsize=None)
def layer_kernels():
    """The compiled module, with `nested_path(base_out, h, scaling, k, blocks)`; see `csrc/nested_path.cpp`."""
    return _build("unified_lora_nested_path", LAYER_SOURCE, ["nested_path"], "NestedLoRALayer(kernel='cpp')",
                  "kernel='python'", extra_cflags=["-O2"])
