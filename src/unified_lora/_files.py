"""Writing a file so that a reader never sees it half-written; reading back the state files this library wrote."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import shutil
import socket
import tempfile
from collections.abc import Sequence


def fsync_file(path) -> None:
    """Flush a written file's data to the disk (`os.fsync`): a file renamed into place without it can be empty or
    cut short after a power loss (ext4's and xfs's delayed allocation write the rename before the data)."""
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows' fsync (_commit) needs write access
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path) -> None:
    """Flush a folder's entries (a rename into it, a new file) to the disk. A no-op on Windows, which cannot open a
    folder for fsync (NTFS journals the rename itself), and where a file system refuses to fsync a folder (some
    network and FUSE mounts: EINVAL, ENOTSUP)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a folder that cannot be opened for reading (mode -r): its entries are the OS's to flush
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def fsync_tree(folder) -> None:
    """`fsync_file` every file under `folder`, then `fsync_dir` each folder in it, innermost first."""
    for here, _, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_file(os.path.join(here, name))
        fsync_dir(here)


def _host_tag() -> str:
    """This machine, for the temporary names below: its host name (characters other than letters, digits and `_.-`
    replaced), and on Linux its pid namespace (`/proc/self/ns/pid`'s inode), so that a process id in a temporary name
    is only ever looked up where it means that process: not on another machine sharing the file system, not in
    another container with the same host name."""
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64] or "host"
    with contextlib.suppress(OSError):
        tag += f"~{os.stat('/proc/self/ns/pid').st_ino}"
    return tag


def temp_prefix(kind: str = ".tmp") -> str:
    """`<kind>-<host>-<pid>-`: the start of the name of a temporary folder this process writes (`tempfile.mkdtemp`
    adds a random part without `-`), which `remove_dead_leftovers` can tell apart once this process is gone."""
    return f"{kind}-{_host_tag()}-{os.getpid()}-"


def _process_gone(pid: int) -> bool:
    """Whether no process `pid` runs here (`os.kill(pid, 0)`: ProcessLookupError). A live one, also another user's
    (PermissionError) or an unrelated process that reuses the id, counts as running: its files are left alone. Never
    on Windows, where `os.kill(pid, 0)` terminates the process."""
    if os.name == "nt" or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return False


def left_by_dead_process(name: str, kind: str = ".tmp") -> bool:
    """Whether `name` is a temporary folder's (`temp_prefix(kind)` + a random part) of a process of this host (and
    pid namespace) that no longer runs."""
    m = re.fullmatch(re.escape(kind) + r"-(.+)-(\d+)-[^-]*", name)
    return bool(m) and m.group(1) == _host_tag() and _process_gone(int(m.group(2)))


def remove_dead_leftovers(folder, file_name: str | None = None) -> list[str]:
    """Delete what writers killed outright (SIGKILL, a power loss) left in `folder`: the temporary folders of
    `folder_written_atomically` (`.tmp-<host>-<pid>-*`), or with `file_name` the temporary files of
    `written_atomically(folder/file_name)` (`<file_name>.tmp-<host>-<pid>`), whose process (the pid in the name)
    is gone from this host. A live process's (a concurrent writer), another host's and another pid namespace's are
    kept; so is a temporary folder beside an `.old-` one of the same name (a set swap that
    `export_task_peft_adapters` finishes). Returns the names deleted."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    gone = []
    for name in names:
        path = os.path.join(folder, name)
        if file_name is None:
            dead = (left_by_dead_process(name) and os.path.isdir(path) and not os.path.islink(path)
                    and not os.path.lexists(os.path.join(folder, ".old-" + name[len(".tmp-"):])))
        else:
            m = re.fullmatch(re.escape(file_name) + r"\.tmp-(.+)-(\d+)", name)
            dead = (bool(m) and m.group(1) == _host_tag() and _process_gone(int(m.group(2)))
                    and os.path.isfile(path) and not os.path.islink(path))
        if dead:
            shutil.rmtree(path, ignore_errors=True) if file_name is None else os.remove(path)
            gone.append(name)
    return gone


@contextlib.contextmanager
def written_atomically(path: str):
    """Yield a temporary name next to `path` (per process: `<path>.tmp-<host>-<pid>`), then rename it to `path`: the
    file appears whole or not at all, also when several processes (DDP) write the same file or one reads it while
    another writes. The temporary file is flushed to the disk before the rename and the folder after it
    (`fsync_file`, `fsync_dir`), so a power loss leaves the old file or the new one, not an empty one. The temporary
    file is removed if the write fails; one a killed process left (SIGKILL) is removed by the next write of `path`
    on this host (`remove_dead_leftovers`)."""
    folder, name = os.path.split(os.path.abspath(path))
    remove_dead_leftovers(folder, name)
    tmp = f"{path}.tmp-{_host_tag()}-{os.getpid()}"
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomically(path, text: str) -> None:
    """`Path.write_text(text, encoding="utf-8")` through `written_atomically`."""
    with written_atomically(os.fspath(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def make_folder(save_dir) -> None:
    """`os.makedirs(save_dir, exist_ok=True)`; a `save_dir` that is a file (or a link to nothing) is a ValueError
    saying so (`os.makedirs`' own was "File exists")."""
    if os.path.lexists(save_dir) and not os.path.isdir(save_dir):
        what = "a link to nothing" if os.path.islink(save_dir) else "a file"
        raise ValueError(f"{save_dir} is {what}, not a folder; pass the folder to write into (it is made if missing)")
    os.makedirs(save_dir, exist_ok=True)


def missing_folders(save_dir) -> list[str]:
    """`save_dir` and the folders above it that do not exist, the deepest first: those `make_folder` makes."""
    made, path = [], os.path.abspath(os.fspath(save_dir))
    while not os.path.lexists(path):
        made.append(path)
        path = os.path.dirname(path)
    return made


def remove_made_folders(made: Sequence[str]) -> None:
    """Remove the folders `missing_folders` listed before a write that failed, the deepest first, each only if it is
    empty (one that holds something, another writer's files, stays, and so do those above it): a failed export left
    the empty folder it had made."""
    for path in made:
        try:
            os.rmdir(path)
        except OSError:
            return


@contextlib.contextmanager
def folder_written_atomically(save_dir, last: str, keep: Sequence[str] = (), drop=None):
    """Write a set of files into `save_dir` as one: yield a temporary folder inside it (`.tmp-<host>-<pid>-...`) to write
    them into; once the body returns, each goes into `save_dir` by `os.replace` (replacing the file of that name,
    flushed to the disk first), `last` last, after the old `last` was deleted. So a failure or interrupt while
    writing leaves `save_dir` as it was (the temporary folder is removed), and a kill during the renames
    (microseconds) leaves a folder without `last`, whose reader refuses it, never new files beside an old `last`.
    Other files in `save_dir` (the user's) are left alone; those named in `keep` that exist are first copied into
    the temporary folder, for the writer to update (a README the writer amends). A `save_dir` that is a file (or a
    link to nothing) is a ValueError saying so (`os.makedirs`' own was "File exists"). The temporary folders of
    writers killed outright (SIGKILL) on this host are removed first (`remove_dead_leftovers`). `drop` (a function of
    a file name): files of `save_dir` that this write does not replace and that a reader would take for part of the
    new set (a previous model's weight shards beside new weights in one file) are deleted once the old `last` is
    gone, before the new files go in. A `save_dir` this made (it did not exist) is removed again where the write
    fails, with the folders above it it made: a failed export leaves no empty folder behind."""
    made = missing_folders(save_dir)
    make_folder(save_dir)
    try:
        remove_dead_leftovers(save_dir)
        tmp = tempfile.mkdtemp(prefix=temp_prefix(), dir=save_dir)
        try:
            for name in keep:
                if os.path.isfile(os.path.join(save_dir, name)):
                    shutil.copy2(os.path.join(save_dir, name), os.path.join(tmp, name))
            yield tmp
            names = sorted(n for n in os.listdir(tmp) if os.path.isfile(os.path.join(tmp, n)))
            if last not in names:
                raise RuntimeError(f"{save_dir}: the export wrote no {last}")
            fsync_tree(tmp)
            with contextlib.suppress(FileNotFoundError):  # (another process writing the same folder removed it)
                os.remove(os.path.join(save_dir, last))
            fsync_dir(save_dir)  # the old `last` is gone before a new file is in place
            if drop is not None:
                for name in os.listdir(save_dir):
                    path = os.path.join(save_dir, name)
                    if name not in names and drop(name) and (os.path.islink(path) or os.path.isfile(path)):
                        os.remove(path)
            for name in [n for n in names if n != last] + [last]:
                os.replace(os.path.join(tmp, name), os.path.join(save_dir, name))
            fsync_dir(save_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        remove_made_folders(made)
        raise


def load_state_file(path, trust_checkpoint: bool = False, opt_in: str = "trust_checkpoint=True",
                    map_location="cpu"):
    """`torch.load` (on the CPU) of a state file this library wrote: a CLI checkpoint's `state.pt`, the Trainer
    callback's `unified_lora_controller.pt`. With `weights_only=True`: those files hold only tensors and plain Python
    values (dicts, lists, tuples, str, numbers, bools, None), and unpickling anything else can run code the file
    carries, e.g. in a checkpoint folder someone sent you. A file holding other objects raises a
    `pickle.UnpicklingError` (the type torch raises) that names the object and `opt_in`, the caller's way to load a
    file it trusts in full; `trust_checkpoint=True` is that (`weights_only=False`). A file that cannot be read (cut
    short, empty, or not a pickle at all: text, random bytes, which the unpickler reads as opcodes and failed on with
    a KeyError or IndexError) is a ValueError that names it (`damaged_file_error`). A MemoryError is raised as it is,
    and an ImportError (a trusted file's object whose module is not installed) as one that names the file: neither
    says the file is damaged (they were read as damaged, and the error said to delete the checkpoint).
    `map_location`: torch.load's (None: each tensor where it was saved)."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=not trust_checkpoint)
    except (PermissionError, FileNotFoundError, IsADirectoryError):  # each says what it is itself
        raise
    except pickle.UnpicklingError as e:
        # torch's message says to re-run torch.load with weights_only=False: not something a caller of this library
        # does; keep the object it names, and say how to opt in here. Where it names none ("Unsupported operand
        # 123": bytes that are no pickle torch.save writes), the file is damaged: opting in would not load it
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        if trust_checkpoint or not found:
            raise damaged_file_error(path, e) from e
        raise pickle.UnpicklingError(
            f"{path}: refused to load it: it holds {found.group(1)}, which is not a tensor or a plain Python value. "
            "unified-lora loads its state files with torch.load(weights_only=True), because unpickling other objects "
            "can run code the file carries; the files it writes hold only tensors and plain Python values. If you "
            "trust this file (you wrote it yourself, e.g. with an optimizer whose state holds other objects), load "
            f"it with {opt_in}"
        ) from None
    except MemoryError:  # the file may be whole: not "damaged, delete it"
        raise
    except ImportError as e:  # a file loaded in full (trusted) holds objects of a module this Python does not have
        raise type(e)(f"{path}: cannot load it here: {e}; the file holds objects of that module (it is not damaged): "
                      "install the module, then load it again", name=e.name) from e
    except Exception as e:  # noqa: BLE001 - a file cut short ("failed finding central directory", EOFError), or junk
        raise damaged_file_error(path, e) from e


def damaged_file_error(path, e: BaseException) -> ValueError:
    """A ValueError naming `path`, a file this library wrote that cannot be read (`e`: the reader's error, whose
    first line is quoted; torch's weights_only refusal by the part that says what it found)."""
    text = str(e).strip()
    found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\s*\n|$)", text, re.S)
    said = " ".join(found.group(1).split()) if found else (text.splitlines()[0] if text else "")
    said = said.split(". This is an internal miniz error")[0]  # (torch's zip reader: the rest adds nothing)
    return ValueError(f"{path}: cannot read it ({type(e).__name__}: {said}); the file is damaged or incomplete (a "
                      "copy cut short?): copy the checkpoint folder again, or delete it to go on from another one")


def read_json_file(path, fix: str):
    """The JSON value in the file `path`, which this library wrote (a run's summary.json); a file that cannot be read
    as JSON (not UTF-8 text, not JSON, cut short, empty) is a ValueError naming it and saying why, then `fix` (what to
    do). A missing file, a folder, or one without read permission raise the OS's error, which names the path."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        why = f"not UTF-8 text (byte {e.start})"
    except json.JSONDecodeError as e:
        why = f"not valid JSON: {e.msg} at line {e.lineno}" if e.doc.strip() else "it is empty"
    raise ValueError(f"{path}: cannot read it ({why}); the file is damaged or cut short: {fix}")
