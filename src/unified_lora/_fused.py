"""Build and load the fused CPU Mirror kernels (`csrc/mirror_fused.cpp`) for `MirrorConfig(kernel="fused")`.

The first call compiles the file with torch's `load_inline` (g++ and ninja; about a minute on 2 cores). Later
calls in the same process return the loaded module. Later processes reuse torch's extension cache
(`TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`), which load_inline rebuilds when the source
or the torch version changes.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "csrc" / "mirror_fused.cpp"
FLAGS = ["-O3", "-fopenmp"]  # no -march=native: the cached build must run on every host that shares the cache


class FusedKernelsUnavailable(RuntimeError):
    """The fused Mirror kernels could not be built here (no C++ compiler or ninja, or the build failed)."""


@functools.lru_cache(maxsize=None)
def mirror_kernels():
    """The compiled module, with `drift_sq(w, s)` and `copy_all(dst, src)`; see `csrc/mirror_fused.cpp`."""
    from torch.utils.cpp_extension import is_ninja_available, load_inline

    missing = [what for what, ok in (("a C++ compiler (g++)", shutil.which("g++") or shutil.which("c++")),
                                     ("ninja (pip install ninja)", is_ninja_available())) if not ok]
    if missing:
        raise FusedKernelsUnavailable(
            f"MirrorConfig(kernel='fused') builds {SOURCE.name} at first use and needs {' and '.join(missing)}; "
            "install it, or use kernel='eager' (the default)")
    try:
        return load_inline("unified_lora_mirror_fused", cpp_sources=SOURCE.read_text(),
                           functions=["drift_sq", "copy_all"], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"])
    except Exception as e:  # compiler errors surface as RuntimeError / CalledProcessError with the build log
        raise FusedKernelsUnavailable(
            f"MirrorConfig(kernel='fused'): building {SOURCE.name} failed ({type(e).__name__}: {e}); "
            "use kernel='eager' (the default)") from e
