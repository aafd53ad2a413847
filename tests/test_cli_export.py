"""`unified-lora export`: a `train` run's checkpoint written as a PEFT adapter (as `train` writes `peft_adapter/` at its
end), loaded as `predict` loads it. The adapter in PEFT gives `predict`'s outputs on that checkpoint; the errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import test_cli
import test_cli_multitask
import test_cli_predict
from unified_lora.cli import main

tiny = test_cli.tiny  # test_cli.py's tiny BERT and data (module-scoped fixtures)
wide = test_cli_predict.wide  # the same BERT with wider weights: its predictions vary by row
data = test_cli_multitask.data  # pos.csv (0/1) and tri.csv (three named classes)
_read, _error = test_cli_predict._read, test_cli_predict._error


@pytest.fixture(scope="module")
def run(tiny, wide, tmp_path_factory):
    """A BERT classifier trained 6 steps, checkpoints step-3 and step-6, then stopped as if interrupted: no
    peft_adapter/ (a run killed before its end has none until it is resumed to the end)."""
    out = tmp_path_factory.mktemp("export") / "run"
    assert main(test_cli._train_args({**tiny, "bert": wide}, out, "--steps", "6", "--save-steps", "3", "--lrs",
                                     "1e-2", "1e-2", "1e-2")) == 0
    shutil.rmtree(out / "peft_adapter")
    return out


def _peft_logits(base_path: str, adapter, enc: dict, num_labels: int) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=num_labels,
                                                              ignore_mismatched_sizes=True)  # (a 3-class head)
    peft = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        return peft(**{k: v for k, v in enc.items() if k != "labels"}).logits


def test_an_exported_checkpoint_gives_predicts_outputs_in_peft(run, tiny, wide, tmp_path, capsys):
    from transformers import AutoTokenizer

    from unified_lora.training import encode_rows, load_table

    capsys.readouterr()
    assert main(["export", str(run), "--checkpoint", "step-3"]) == 0
    out = run / "peft_adapter-step-3"  # the default folder, named for the checkpoint
    said = capsys.readouterr().out
    assert "checkpoints/step-3 (step 3): seq-cls, the controller at rank 8 (MULTI)" in said
    assert f"PEFT adapter (rank 8): {out} (loads with peft.PeftModel.from_pretrained(base_model, path))" in said
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp")]  # written whole: no temporary folder left
    assert main(["predict", str(run), "--data", tiny["csv"], "--checkpoint", "step-3", "--output",
                 str(tmp_path / "p.jsonl")]) == 0
    rows = _read(tmp_path / "p.jsonl")
    enc = encode_rows(AutoTokenizer.from_pretrained(wide), load_table(tiny["csv"], ["text"], "label"), "seq-cls", 16)
    probs = _peft_logits(wide, out, enc, 2).softmax(-1)
    theirs = torch.tensor([[r["prob_0"], r["prob_1"]] for r in rows])
    assert torch.allclose(probs, theirs, atol=1e-6)
    assert theirs[:, 1].std() > 1e-3  # (the rows' probabilities differ: a constant output would match anything)
    # the newest checkpoint is the default (as predict's), and `latest` names it; another checkpoint, other outputs
    assert main(["export", str(run), "--checkpoint", "latest"]) == 0
    assert main(["export", str(run)]) == 2
    err = _error(capsys)
    assert "peft_adapter-step-6: exists and holds " in err and "adapter_config.json" in err and "--overwrite" in err
    assert main(["export", str(run), "--overwrite"]) == 0
    newest = _peft_logits(wide, run / "peft_adapter-step-6", enc, 2).softmax(-1)
    assert not torch.allclose(newest, probs, atol=1e-3)
    # --rank: another nested level, written at that rank
    assert main(["export", str(run), "--checkpoint", "step-3", "--rank", "4", "--out", str(tmp_path / "r4")]) == 0
    assert "exported at --rank 4" in capsys.readouterr().out
    assert json.loads((tmp_path / "r4" / "adapter_config.json").read_text())["r"] == 4


def test_export_errors_are_one_line_naming_what_is_wrong(run, tmp_path, capsys):
    def refused(argv: list[str], *expected: str) -> None:
        capsys.readouterr()
        assert main(["export", *argv]) == 2
        line = _error(capsys)
        for e in expected:
            assert e in line, line

    bare = tmp_path / "bare"
    bare.mkdir()
    refused([str(bare)], "not a `unified-lora train` run: no checkpoint under")
    refused([str(tmp_path / "nothing")], "no such run folder")
    refused([str(run), "--checkpoint", "step-9"], "--checkpoint step-9: no such checkpoint", "(step-3, step-6)")
    fresh = ["--out", str(tmp_path / "out")]
    refused([str(run), "--task", "pos", *fresh], "--task pos: for a multi-task run (several --data sets)")
    refused([str(run), "--rank", "5", *fresh], "--rank 5: not one of the run's nested ranks (4, 8, 16)")
    refused([str(run), "--out", str(run / "checkpoints" / "x")], "inside the run's own folders")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    refused([str(run), "--out", str(a_file)], "a file, not a folder")
    # a damaged checkpoint: the file named, as train --resume and predict name it, and the run's other checkpoints
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("peft_adapter-*"))
    for name in ("state.pt", "adapter_blocks.safetensors"):
        path = copy / "checkpoints" / "step-6" / name
        intact = path.read_bytes()
        path.write_bytes(intact[:len(intact) // 2])
        refused([str(copy)], f"{path}: cannot read it", "damaged or incomplete", "other checkpoints: step-3")
        path.write_bytes(intact)
    assert not any(p.name.startswith("peft_adapter-") for p in copy.iterdir())  # nothing written
    assert not (tmp_path / "out").exists()


def test_a_multitask_run_exports_a_folder_per_task_or_the_one_asked_for(wide, data, tmp_path, capsys):
    from unified_lora.inference import load_trained
    from unified_lora.training import encode_rows, load_table

    out = tmp_path / "run"
    assert main(test_cli_multitask._mt_args(wide, out, data["pos"], data["tri"], extra=(
        "--task-names", "pos,tri", "--no-controller", "--steps", "4", "--save-steps", "2"))) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--checkpoint", "step-2"]) == 0
    assert f"PEFT adapter of each task, in a folder each (rank 8): {out / 'peft_adapter-step-2'} " in capsys.readouterr().out
    folder = out / "peft_adapter-step-2"
    for task, path, n in (("pos", data["pos"], 2), ("tri", data["tri"], 3)):
        tr = load_trained(out, "step-2", task=task, device="cpu")  # predict's loading
        enc = encode_rows(tr.tokenizer, load_table(path, ["text"], "label"), "seq-cls", 16)
        theirs = _peft_logits(wide, folder / task, enc, 3)[:, :n]
        assert torch.allclose(tr.run.logits(task, enc), theirs, atol=1e-5)
    assert main(["export", str(out), "--task", "tri", "--out", str(tmp_path / "tri_only")]) == 0
    assert sorted(p.name for p in (tmp_path / "tri_only").iterdir()) == ["peft_tasks.json", "tri"]
    assert main(["export", str(out), "--task", "tir"]) == 2
    assert _error(capsys).endswith("its tasks are pos, tri (did you mean tri?)")
    # the export in the run folder is the run's: a new run there is refused, naming it, and --overwrite deletes it
    # (a new run's step-2 beside the old run's peft_adapter-step-2 would pass for its export)
    again = test_cli_multitask._mt_args(wide, out, data["pos"], data["tri"], extra=("--task-names", "pos,tri",
                                                                                     "--steps", "2"))
    assert main(again) == 2
    assert "peft_adapter-step-2); pass --resume" in _error(capsys)
    assert main([*again, "--overwrite"]) == 0
    assert not folder.exists() and (tmp_path / "tri_only" / "tri").is_dir()


def test_an_export_peft_cannot_express_is_one_line_and_exit_code_1(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    # LoRA on the head only: PEFT saves the head whole and cannot hold a LoRA layer inside it (train exits 3)
    assert main(test_cli._train_args(tiny, out, "--steps", "2", "--target-modules", "classifier")) == 3
    capsys.readouterr()
    assert main(["export", str(out)]) == 1
    assert "unified-lora: error: PEFT export failed: ValueError: adapters: every nested layer" in _error(capsys)
    assert not (out / "peft_adapter-step-2").exists()
