"""Writing a file so that a reader never sees it half-written."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def written_atomically(path: str):
    """Yield a temporary name next to `path` (per process), then rename it to `path`: the file appears whole or not
    at all, also when several processes (DDP) write the same file or one reads it while another writes. The
    temporary file is removed if the write fails."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
