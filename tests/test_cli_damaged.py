"""A run folder whose files are damaged (junk, cut short, empty, another tool's): each command that reads them, `predict`,
`report`, `plot` and `train --resume`, on a one-task and a multi-task run, says in one line which file cannot be read
and what to do (exit 2), and leaves the run folder as it was. The cases are those that were an internal error, a
misleading message or a silent loss, or that now also name the run's other checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import test_cli
import test_cli_predict
from unified_lora.cli import main
from unified_lora.trace import read_trace

tiny = test_cli.tiny  # test_cli.py's tiny BERT and data (module-scoped fixture)
_error = test_cli_predict._error

JUNK = "this is not a checkpoint\n" * 20
BYTES = (bytes(range(130, 256)) + b"\n") * 3  # not UTF-8, and no pickle opcode torch's weights_only reader accepts
OTHERS = "this run's other checkpoints: step-2 (train --resume reads the newest once the damaged one is deleted; predict --checkpoint NAME reads any)"


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory) -> dict:
    """A one-task run and a multi-task one (two tables), 4 steps each, checkpoints step-2 and step-4."""
    root = tmp_path_factory.mktemp("damaged")
    assert main(test_cli._train_args(tiny, root / "one", "--steps", "4", "--save-steps", "2")) == 0
    rows = test_cli._rows(24, seed=1)
    for name, flip in (("pos", 0), ("neg", 1)):
        (root / f"{name}.csv").write_text("text,label\n" + "".join(f"{t},{y ^ flip}\n" for t, y in rows))
    assert main(["train", "--model", tiny["bert"], "--data", str(root / "pos.csv"), str(root / "neg.csv"),
                 "--batch-size", "8", "--max-length", "16", "--steps", "4", "--save-steps", "2", "--log-every", "0",
                 "--output-dir", str(root / "multi")]) == 0
    return {"one": root / "one", "multi": root / "multi", "pos": str(root / "pos.csv"), "csv": tiny["csv"]}


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "junk":
        path.write_text(JUNK)
    elif how == "cut":  # cut short mid-line (a copy interrupted, a kill while writing)
        path.write_bytes(data[:len(data) // 2 + 7])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "bytes":
        path.write_bytes(BYTES)
    elif how == "dict":
        torch.save({"weights": torch.zeros(2)}, path)
    elif how == "list":
        torch.save([1, 2], path)
    elif how == "json-list":
        path.write_text("[1, 2]\n" + data.decode())
    else:
        raise AssertionError(how)


def _command(cmd: str, run: Path, runs: dict) -> list[str]:
    return {"predict": ["predict", str(run), "--data", runs["csv"], "--output", str(run.parent / "p.csv")],
            "predict-task": ["predict", str(run), "--task", "pos", "--data", runs["pos"],
                             "--output", str(run.parent / "p.csv")],
            "report": ["report", str(run)],
            "plot": ["plot", str(run), "-o", str(run.parent / "p.png")],
            "resume": ["train", "--output-dir", str(run), "--resume", "--steps", "6"]}[cmd]


STEP4 = "checkpoints/step-4/"
CASES = [  # (run, command, file, damage, what the error says besides the file)
    ("one", "predict", STEP4 + "state.pt", "junk", ["cannot read it (IndexError: ", "damaged or incomplete", OTHERS]),
    ("one", "predict", STEP4 + "state.pt", "bytes", ["cannot read it (UnpicklingError: Unsupported operand", OTHERS]),
    ("one", "predict", STEP4 + "state.pt", "cut", ["cannot read it (", "damaged or incomplete", OTHERS]),
    ("one", "predict", STEP4 + "state.pt", "empty", ["cannot read it (EOFError", OTHERS]),
    ("one", "predict", STEP4 + "state.pt", "dict", ["not a unified-lora checkpoint state (it lacks the keys", OTHERS]),
    ("one", "predict", STEP4 + "state.pt", "list", ["not a unified-lora checkpoint state (it holds a list", OTHERS]),
    ("one", "predict", STEP4 + "adapter_blocks.safetensors", "cut", ["cannot read it (SafetensorError", OTHERS]),
    ("one", "report", STEP4 + "state.pt", "junk", ["cannot read it (IndexError: ", OTHERS]),
    ("one", "plot", STEP4 + "state.pt", "junk", ["cannot read it (IndexError: ", OTHERS]),
    ("one", "resume", STEP4 + "state.pt", "junk", ["cannot read it (IndexError: ", OTHERS]),
    ("one", "resume", STEP4 + "state.pt", "bytes", ["cannot read it (UnpicklingError: Unsupported operand", OTHERS]),
    ("one", "resume", STEP4 + "adapter_blocks.safetensors", "empty", ["cannot read it (SafetensorError", OTHERS]),
    ("one", "report", "summary.json", "bytes", ["cannot read it (not UTF-8 text", "delete it"]),
    ("one", "report", "summary.json", "cut", ["cannot read it (not valid JSON: ", "re-run the command"]),
    ("one", "plot", "summary.json", "empty", ["cannot read it (it is empty)", "delete it"]),
    ("one", "resume", "trace.jsonl", "junk", ["line 1 is not a step's record", "move it aside"]),
    ("one", "resume", "trace.jsonl", "bytes", ["line 1 is not a step's record", "move it aside"]),
    ("one", "resume", "trace.jsonl", "json-list", ["line 1 is not a step's record", "from step 4 on"]),
    ("multi", "predict-task", STEP4 + "state.pt", "junk", ["cannot read it (IndexError: ", OTHERS]),
    ("multi", "resume", STEP4 + "adapter_blocks.safetensors", "junk", ["cannot read it (SafetensorError", OTHERS]),
    ("multi", "resume", "trace.jsonl", "bytes", ["line 1 is not a step's record", "move it aside"]),
]


@pytest.mark.parametrize("which, cmd, name, how, says", CASES, ids=[f"{c[0]}-{c[1]}-{c[2].split('/')[-1]}-{c[3]}"
                                                                     for c in CASES])
def test_a_damaged_file_is_a_one_line_error_naming_it_and_nothing_in_the_run_changes(runs, which, cmd, name, how,
                                                                                     says, tmp_path, capsys):
    """It was: junk in state.pt "IndexError: pop from empty list (internal error)" (or "KeyError: 174812789"); random
    bytes in it "refused to load it ... load it with --trust-checkpoint", which would not load it either; a summary.json
    or trace.jsonl not UTF-8 a bare "'utf-8' codec can't decode byte" naming no file; a trace.jsonl of junk lines
    dropped by --resume, silently, and the run trained on. None named the run's other checkpoints."""
    run = tmp_path / "run"
    shutil.copytree(runs[which], run)
    _damage(run / name, how)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(_command(cmd, run, runs)) == 2
    err = _error(capsys)
    assert f"{run / name}: " in err and "internal error" not in err and "Traceback" not in err, err
    assert all(s in err for s in says), err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing written, nothing deleted
    assert not (tmp_path / "p.csv").exists()


def test_a_trace_whose_last_line_a_kill_cut_off_still_plots_and_resumes(runs, tmp_path, capsys):
    """A run killed while it wrote a trace line: plot refused the whole trace ("line 5 is not JSON; is this a
    unified-lora trace.jsonl?"); --resume dropped that line (and keeps doing so: its step is trained again)."""
    run = tmp_path / "run"
    shutil.copytree(runs["one"], run)
    lines = (run / "trace.jsonl").read_text().splitlines(keepends=True)
    (run / "trace.jsonl").write_text("".join(lines) + lines[-1][:40])  # a 5th line, cut off
    assert main(_command("plot", run, runs)) == 0
    assert (tmp_path / "p.png").is_file()
    assert main(_command("resume", run, runs)) == 0
    assert [r["step"] for r in read_trace(run / "trace.jsonl")] == list(range(6))
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


def test_a_last_trace_line_of_junk_without_a_newline_is_not_taken_for_one_a_kill_cut_off(runs, tmp_path, capsys):
    """plot and --resume dropped any last line without a newline as a record a kill cut off: a line of junk went
    silently. Only the start of a record cut short is dropped now; junk is the damaged-trace error, as elsewhere."""
    run = tmp_path / "run"
    shutil.copytree(runs["one"], run)
    with open(run / "trace.jsonl", "a", encoding="utf-8") as f:
        f.write("appended by hand, not a record")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(_command("plot", run, runs)) == 2
    assert f"{run / 'trace.jsonl'}: line 5 is not JSON" in _error(capsys)
    assert main(_command("resume", run, runs)) == 2
    assert f"{run / 'trace.jsonl'}: line 5 is not a step's record" in _error(capsys)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_whole_state_file_that_cannot_be_loaded_here_is_not_called_damaged(tmp_path, monkeypatch):
    """`load_state_file` read every Exception as a damaged file ("copy the checkpoint folder again, or delete it"):
    a trusted file (`trust_checkpoint=True`) holding an object of a module this Python does not have (a real
    ModuleNotFoundError) and a MemoryError while loading a whole file. The first is an ImportError naming the file
    and the module, the second goes up as it is. (The MemoryError is torch.load's, raised by a stand-in: a real one
    would need the memory gone.)"""
    import sys

    from unified_lora._files import load_state_file

    (tmp_path / "gone_module_48.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import gone_module_48

    torch.save({"opt": gone_module_48.Thing()}, tmp_path / "state.pt")
    del sys.modules["gone_module_48"]
    (tmp_path / "gone_module_48.py").unlink()
    with pytest.raises(ImportError, match=r"state.pt: cannot load it here: No module named 'gone_module_48'; the "
                                          r"file holds objects of that module \(it is not damaged\)") as e:
        load_state_file(tmp_path / "state.pt", trust_checkpoint=True)
    assert "damaged or incomplete" not in str(e.value)

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(torch, "load", out_of_memory)
    with pytest.raises(MemoryError):
        load_state_file(tmp_path / "state.pt")
