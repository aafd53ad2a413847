"""Writing a file so that a reader never sees it half-written; reading back the state files this library wrote."""

from __future__ import annotations

import contextlib
import os
import pickle
import re


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


def load_state_file(path, trust_checkpoint: bool = False, opt_in: str = "trust_checkpoint=True"):
    """`torch.load` (on the CPU) of a state file this library wrote: a CLI checkpoint's `state.pt`, the Trainer
    callback's `unified_lora_controller.pt`. With `weights_only=True`: those files hold only tensors and plain Python
    values (dicts, lists, tuples, str, numbers, bools, None), and unpickling anything else can run code the file
    carries, e.g. in a checkpoint folder someone sent you. A file holding other objects raises a
    `pickle.UnpicklingError` (the type torch raises) that names the object and `opt_in`, the caller's way to load a
    file it trusts in full; `trust_checkpoint=True` is that (`weights_only=False`). A file that cannot be read (cut
    short) is a ValueError that names it."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as e:
        if trust_checkpoint:
            raise damaged_file_error(path, e) from e
        # torch's message says to re-run torch.load with weights_only=False: not something a caller of this library
        # does; keep the object it names, and say how to opt in here
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        what = (f"it holds {found.group(1)}, which is not a tensor or a plain Python value" if found else
                "it holds something other than tensors and plain Python values, or it is not a file torch.save wrote")
        raise pickle.UnpicklingError(
            f"{path}: refused to load it: {what}. unified-lora loads its state files with torch.load(weights_only="
            "True), because unpickling other objects can run code the file carries; the files it writes hold only "
            "tensors and plain Python values. If you trust this file (you wrote it yourself, e.g. with an optimizer "
            f"whose state holds other objects), load it with {opt_in}"
        ) from None
    except (RuntimeError, OSError, EOFError) as e:  # a file cut short: "failed finding central directory", ...
        if isinstance(e, (PermissionError, FileNotFoundError, IsADirectoryError)):  # says what it is itself
            raise
        raise damaged_file_error(path, e) from e


def damaged_file_error(path, e: BaseException) -> ValueError:
    said = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return ValueError(f"{path}: cannot read it ({type(e).__name__}: {said}); the file is damaged or incomplete (a "
                      "copy cut short?): copy the checkpoint folder again, or delete it to go on from another one")
