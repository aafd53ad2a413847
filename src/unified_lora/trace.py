"""Per-step trace records, a JSONL writer, and the seed's console line."""

from __future__ import annotations

import codecs
import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

from ._files import written_atomically
from .distributed import is_first_process
from .model import _user_stacklevel


@dataclass
class StepRecord:
    step: int
    loss: float
    phi: float
    mode: int
    rank: int
    lr: float | None
    components: dict = field(default_factory=dict)
    transition: str | None = None  # e.g. "MULTI->MIRROR"
    snapshot: str | None = None  # "saved" | "restored" | "kept"
    drift: float | None = None
    nonfinite: bool = False

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(_finite_or_str(d), ensure_ascii=False)


def _finite_or_str(x):
    # JSON has no NaN/inf: write them as strings so the file stays valid JSON.
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite_or_str(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_str(v) for v in x]
    return x


def format_lr(lr: float | None) -> str:
    """1e-4, 5e-4, 3e-5, 1.5e-4: the seed's compact style."""
    if lr is None:
        return "-"
    mant, exp = f"{lr:.3e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


def transition_note(c: dict) -> str:
    """What a multi-task transition did, from its record's components (`event`, `tasks_back`, `merge_held_until`), for
    the console's line of that step and `report`'s: the task adapters merged, copied from the shared one, or brought
    back (a split within `resplit_window` of the merge); "" for any other transition."""
    if c.get("event") == "merge":
        return ", task adapters merged into the shared one"
    if c.get("tasks_back"):
        return f", task adapters back, no merge before step {c['merge_held_until']}"
    if c.get("event") == "split":
        return ", task adapters copied from the shared one"
    return ""


def format_console(rec: StepRecord) -> str:
    """`[350] Mode=2 φ=0.827 E_s=4.979 lr=1e-4` (v1 README trace format); a transition's line says what it did
    (`transition_note`), and a multi-task step whose merge was held at the run's end says so."""
    c = rec.components
    if "E_s" in c:
        sig = f"E_s={c['E_s']:.3f}"
    elif "C" in c:
        sig = f"C={c['C']:.3f} E={c['E']:.3f} S={c['S']:.3f}"
    else:
        sig = f"loss={rec.loss:.3f}"
    line = f"[{rec.step}] Mode={rec.mode} φ={rec.phi:.3f} {sig} lr={format_lr(rec.lr)}"
    if rec.transition:
        line += f"  ({rec.transition}"
        if rec.snapshot:
            line += f", snapshot {rec.snapshot}"
            if rec.drift is not None:
                line += f", drift={rec.drift:.2%}"
        line += transition_note(c) + ")"
    elif c.get("merge_closed_from") is not None:  # φ called for a merge in the run's last resplit_window steps
        line += (f"  (merge held: none from step {c['merge_closed_from']} on, too close to the run's end to be "
                 "tested)")
    return line


class ResumePlan(NamedTuple):
    """What `TraceWriter.resume_plan` read: the lines to keep (the steps before `step`), the step the run resumes
    at, and the steps before it that those lines lack, from the first one kept on (a file older than the state)."""

    lines: list[str]
    step: int
    missing: list[int]


def _step_ranges(steps: list[int], most: int = 4) -> str:
    """Sorted steps as ranges: [4, 5, 6, 9] → "4-6, 9"; after `most` ranges, how many more."""
    runs: list[list[int]] = []
    for s in steps:
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:most])
    return text + (f" and {len(runs) - most} more ranges" if len(runs) > most else "")


class TraceWriter:
    """Appends one JSON object per step; flushes so a crash keeps what was written.

    A new writer (`append=False`) empties an existing file at its first write, not when it is opened, so
    that a run resumed from a checkpoint can keep the lines of the steps before it: `resume(step)`, called
    by `ctrl.load_state_dict`, keeps the lines of earlier steps, drops the later ones (written after that
    checkpoint, and a line cut off by a crash) and appends from there.

    `main_process_only` (the default): in an initialised process group (DDP, the Trainer under torchrun) only
    process 0 writes or rewrites the file. Every process records the same steps (the controller all-reduces the
    loss); every process writing one `trace_path` put each step into it once per process, and a resume's rewrite
    on one process left another appending to the replaced file, so the steps after the resume went missing. A
    controller that does not all-reduce (`reduce_loss=None`) records this process's own steps: its writer writes
    on every process. `group`, if given, returns the process group whose steps the file records (the
    controller's: its FSDP2 device mesh's, or the group its `reduce_loss` names); its first process writes, so
    each of two runs sharded over meshes of different processes in one world writes its own file.
    """

    def __init__(self, path: str | os.PathLike, append: bool = False, main_process_only: bool = True,
                 group=None):
        self.path = os.fspath(path)
        self.main_process_only = main_process_only
        self.group = group
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")  # opened now, so a bad path fails here
        self._fresh = not append  # empty the file at the first write
        self._written = False

    def _writes_here(self) -> bool:
        # (a writer pickled before `group` existed has none: process 0 writes)
        return not self.main_process_only or is_first_process(getattr(self, "group", None))

    def write(self, rec: StepRecord) -> None:
        if not self._writes_here():
            return
        if self._fresh:
            self._f.truncate(0)
            self._fresh = False
        self._f.write(rec.to_json() + "\n")
        self._f.flush()
        self._written = True

    def resume(self, step: int, rewind: bool = False) -> None:
        """Continue the trace of a run resumed at `step`: keep the lines of steps before it. A no-op once
        this writer has written (a state loaded mid-run, e.g. the best checkpoint's at the end of training,
        leaves the run's trace whole), unless `rewind`: a resume in the same process, whose steps from `step`
        on are replayed, drops their lines from the first attempt. A last line cut off by a crash is dropped: one
        with no newline that is the start of a step's record cut short (`torn_json`); any other line that is not a
        step's record (not UTF-8 JSON with a step: a damaged file) is a ValueError naming the file and the line,
        and the file is left as it is (such lines were dropped, and the records around them kept, silently; a file
        not UTF-8 was a bare UnicodeDecodeError; a last line of junk with no newline was dropped as a cut-off one).
        `resume_plan` then `apply_resume` is the same in two parts: the first reads and checks, and changes
        nothing (`ctrl.load_state_dict` runs it before it loads anything)."""
        self.apply_resume(self.resume_plan(step, rewind))

    def resume_plan(self, step: int, rewind: bool = False) -> ResumePlan | None:
        """What `resume(step, rewind)` does (a `ResumePlan`: the lines it keeps, and the steps they lack; None: it
        does nothing), or its ValueError; nothing is changed."""
        if (self._written and not rewind) or not self._writes_here():
            return None
        keep, kept_steps = [], set()
        with open(self.path, "rb") as f:
            lines = f.readlines()
        for n, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
                r = json.loads(line)
            except ValueError:
                r = None
            if not (isinstance(r, dict) and isinstance(r.get("step"), int)):
                if n == len(lines) and not raw.endswith(b"\n") and torn_json(raw):  # a line cut off by a crash
                    continue
                raise ValueError(f"{self.path}: line {n} is not a step's record (UTF-8 JSON with a step): the trace "
                                 "is damaged; restore it, or move it aside to resume with a new trace file from step "
                                 f"{step} on (the steps before it are then not in it)")
            if r["step"] < step:
                keep.append(line if line.endswith("\n") else line + "\n")
                kept_steps.add(r["step"])
        missing = sorted(set(range(min(kept_steps), step)) - kept_steps) if kept_steps else []
        return ResumePlan(keep, step, missing)

    def apply_resume(self, plan: ResumePlan | None) -> None:
        """Rewrite the file with the lines `resume_plan` kept, and append from there (None: nothing to do). Where
        they lack steps before the resumed one (the file is older than the state: its last record step 3, the state
        at step 10), a warning names them: the trace has a gap there. (A file with no record before the resumed step
        starts a trace from there, as a new file does, and says nothing.)"""
        if plan is None:
            return
        keep, step, missing = plan
        if missing:
            gone = set(missing)  # (between the first kept step and `step`: the last step not gone is kept)
            last = next(r for r in range(step - 1, -1, -1) if r not in gone)
            why = ("the file is older than the state loaded" if missing[-1] == step - 1 else
                   "lines of those steps were taken out of it")
            warnings.warn(f"{self.path}: resuming at step {step}, the trace file lacks step"
                          f"{'s' if len(missing) > 1 else ''} {_step_ranges(missing)} (its last record before step "
                          f"{step} is step {last}: {why}), so the trace has a gap there; its lines are kept and the "
                          f"run appends from step {step}. Put back the trace file saved with the state for a whole "
                          "trace", stacklevel=_user_stacklevel())
        self._f.close()
        try:
            with written_atomically(self.path) as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.writelines(keep)
        finally:
            self._f = open(self.path, "a", encoding="utf-8")
        self._fresh = False

    def close(self) -> None:
        if not self._f.closed and self._written:  # the run's lines on the disk (once: not per step, it costs ms)
            self._f.flush()
            os.fsync(self._f.fileno())
        self._f.close()


def torn_json(raw: bytes | str) -> bool:
    """Whether `raw`, a last line with no newline, is a step's record cut short, as a kill during its write leaves
    it: what `StepRecord.to_json` writes always starts `{"step": ` (the dataclass's first field), so a cut-off record
    is a start of that, or starts with it and holds no whole JSON object (the UTF-8 bytes of a character cut off
    included). A line of junk is not, nor a whole record, nor one with something after its end."""
    if isinstance(raw, bytes):
        try:  # a character cut off at the end is left out; bytes that are not UTF-8 elsewhere are no record
            raw = codecs.getincrementaldecoder("utf-8")().decode(raw, final=False)
        except UnicodeDecodeError:
            return False
    if not (raw.startswith(_RECORD_START) or (raw and _RECORD_START.startswith(raw))):
        return False
    try:
        json.JSONDecoder().raw_decode(raw)  # a whole object (junk after it or not): no write cut this one
    except ValueError:
        return True
    return False


_RECORD_START = '{"step": '


def read_trace(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
