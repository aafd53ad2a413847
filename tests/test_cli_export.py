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


def test_an_export_into_the_runs_base_model_folder_is_refused(tiny, wide, tmp_path, capsys):
    """`export --merged --out BASE --overwrite` replaced the base model's weights with the merged ones, after which
    predict, export and --resume loaded the run's adapter onto the merged model (the delta twice), silently; the
    adapter export put adapter files beside the base's weights. Refused, naming the folder, with nothing written."""
    base = tmp_path / "base"
    shutil.copytree(wide, base)
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    run = tmp_path / "run"
    assert main(test_cli._train_args({**tiny, "bert": str(base)}, run, "--steps", "1")) == 0
    for extra in (["--merged"], []):
        capsys.readouterr()
        assert main(["export", str(run), *extra, "--out", str(base), "--overwrite"]) == 2
        assert f"--out {base}: the run's base model folder; writing the " in _error(capsys)
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before


def test_a_run_on_the_bundled_model_exports_and_its_folder_is_refused_as_out(tiny, wide, tmp_path, capsys,
                                                                             monkeypatch):
    """A run without --model (the bundled MiniLM, the CLI's default) stores `model: None`: its `export` and `export
    --merged` failed with an internal error (`TypeError: expected str, bytes or os.PathLike object, not NoneType`,
    from the check of --out against the base model's folder). The bundled model is a copy of the tiny BERT here."""
    import unified_lora.data

    bundled = tmp_path / "bundled"
    shutil.copytree(wide, bundled)
    monkeypatch.setattr(unified_lora.data, "default_model_path", lambda: str(bundled))
    run = tmp_path / "run"
    args = test_cli._train_args(tiny, run, "--steps", "2", "--lrs", "1e-2", "1e-2", "1e-2")
    assert main(args[:1] + args[3:]) == 0  # no --model
    assert main(["export", str(run)]) == 0
    adapter = run / "peft_adapter-step-2"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(bundled)
    assert main(["export", str(run), "--merged"]) == 0
    from unified_lora.inference import load_trained
    from unified_lora.training import encode_rows, load_table

    tr = load_trained(run, "step-2", device="cpu")
    ids = encode_rows(tr.tokenizer, load_table(tiny["csv"], ["text"], "label"), "seq-cls", 16)["input_ids"][:8]
    with torch.no_grad():
        ours = tr.model(input_ids=ids).logits
    merged, = _plain((run / "merged-step-2", "AutoModelForSequenceClassification", ids.tolist(), 0))
    assert torch.allclose(torch.tensor(merged["logits"]), ours, atol=1e-5)
    assert torch.allclose(_peft_logits(str(bundled), adapter, {"input_ids": ids}, 2), ours, atol=1e-5)
    # the bundled model's folder is the run's base: refused as --out, as a --model folder is, with nothing written
    before = {p.name: p.read_bytes() for p in bundled.iterdir()}
    capsys.readouterr()
    assert main(["export", str(run), "--merged", "--out", str(bundled), "--overwrite"]) == 2
    assert f"--out {bundled}: the run's base model folder; writing the " in _error(capsys)
    assert {p.name: p.read_bytes() for p in bundled.iterdir()} == before


def test_an_export_peft_cannot_express_is_one_line_and_exit_code_1(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    # LoRA on the head only: PEFT saves the head whole and cannot hold a LoRA layer inside it (train exits 3)
    assert main(test_cli._train_args(tiny, out, "--steps", "2", "--target-modules", "classifier")) == 3
    capsys.readouterr()
    assert main(["export", str(out)]) == 1
    assert "unified-lora: error: PEFT export failed: ValueError: adapters: every nested layer" in _error(capsys)
    assert not (out / "peft_adapter-step-2").exists()


# A Python that runs `main` on each argv of its argument with writes past 512 bytes failing (RLIMIT_FSIZE: EFBIG, as
# a full disk fails them) and prints the exit codes as JSON. torch, transformers and peft are imported first.
_FULL_DISK = """
import json, resource, signal, sys
import peft, torch, transformers
from unified_lora.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, (512, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
print(json.dumps([main(argv) for argv in json.loads(sys.argv[1])]))
"""


def _files(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_export_whose_write_fails_leaves_no_folder_it_made_and_a_previous_export_as_it_was(run, tmp_path):
    """An export (the adapter, or --merged) whose files could not be written (a full disk) removed its temporary
    folder but left the --out folder it had made, empty. It is removed now, with the missing folders above it; a
    folder that was there, holding a previous export, is left as it was."""
    import subprocess
    import sys

    assert main(["export", str(run), "--out", str(tmp_path / "old")]) == 0
    assert main(["export", str(run), "--merged", "--out", str(tmp_path / "old_merged")]) == 0
    before = {d: _files(tmp_path / d) for d in ("old", "old_merged")}
    assert "adapter_config.json" in before["old"] and "model.safetensors" in before["old_merged"]
    jobs = [["export", str(run), "--out", str(tmp_path / "new" / "adapter")],
            ["export", str(run), "--merged", "--out", str(tmp_path / "new_merged")],
            ["export", str(run), "--overwrite", "--out", str(tmp_path / "old")],
            ["export", str(run), "--merged", "--overwrite", "--out", str(tmp_path / "old_merged")]]
    done = subprocess.run([sys.executable, "-c", _FULL_DISK, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [1, 1, 1, 1]  # each export failed
    assert "File too large" in done.stderr
    # the OS's message, named as a file-system error (exit 1), not an "internal error" with --debug for a traceback
    assert "internal error" not in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "new").exists() and not (tmp_path / "new_merged").exists()
    assert {d: _files(tmp_path / d) for d in ("old", "old_merged")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "old_merged"]


# ----------------------------------------------------------------------------- --merged

# A Python that cannot import unified_lora or peft (None in sys.modules: `import` fails, and transformers'
# `is_peft_available` says False) loads each model folder with transformers' Auto class and prints, as JSON, the
# logits of the given token ids, their greedy continuations (a causal LM) and the dtype of the weights.
_PLAIN = """
import json, sys
sys.modules.update({"peft": None, "unified_lora": None})
import torch
import transformers
from transformers.utils import is_peft_available
assert not is_peft_available()
for name in ("unified_lora", "peft"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} could be imported")
done = []
for folder, auto, ids, new in json.loads(sys.argv[1]):
    model = getattr(transformers, auto).from_pretrained(folder).eval()
    x = torch.tensor(ids)
    with torch.no_grad():
        logits = model(input_ids=x).logits.float()
        tokens = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                                min_new_tokens=new, do_sample=False, pad_token_id=0).tolist() if new else []
    done.append({"logits": logits.tolist(), "tokens": tokens, "dtype": str(model.dtype),
                 "labels": model.config.id2label})
print(json.dumps(done))
"""


def _plain(*jobs) -> list[dict]:
    """What plain transformers computes with each job's model folder (`_PLAIN`, in one fresh Python). A job: (folder,
    Auto class name, token ids (a list of rows), tokens to generate (0: none))."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _PLAIN, json.dumps([[str(f), a, i, n] for f, a, i, n in jobs])],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_a_merged_export_loads_without_peft_and_gives_predicts_logits(run, tiny, wide, tmp_path, capsys):
    from unified_lora.inference import load_trained
    from unified_lora.training import encode_rows, load_table

    capsys.readouterr()
    assert main(["export", str(run), "--checkpoint", "step-3", "--merged"]) == 0
    out = run / "merged-step-3"  # the default folder, named for the checkpoint
    said = capsys.readouterr().out
    assert ("merged model (rank 8, float32, " in said and f" of weights) with its tokenizer: {out} (loads with "
            "transformers' AutoModelForSequenceClassification.from_pretrained(path), without PEFT)" in said)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= names
    assert not {n for n in names if n.startswith(".tmp") or n.startswith("adapter")}  # whole, and no PEFT file
    tr = load_trained(run, "step-3", device="cpu")  # predict's loading
    enc = encode_rows(tr.tokenizer, load_table(tiny["csv"], ["text"], "label"), "seq-cls", 16)
    ids = enc["input_ids"][:8]
    # --rank: the model at that rank, as the adapter exported at that rank computes it
    assert main(["export", str(run), "--checkpoint", "step-3", "--merged", "--rank", "4", "--out",
                 str(tmp_path / "r4")]) == 0
    assert "exported at --rank 4: the merged model is the model at that rank" in capsys.readouterr().out
    with torch.no_grad():
        ours = tr.model(input_ids=ids).logits
        for layer in tr.run.adapters.values():
            layer.set_rank(4)
        at4 = tr.model(input_ids=ids).logits
    auto = "AutoModelForSequenceClassification"
    theirs, r4, base = _plain((out, auto, ids.tolist(), 0), (tmp_path / "r4", auto, ids.tolist(), 0),
                              (wide, auto, ids.tolist(), 0))
    assert torch.allclose(torch.tensor(theirs["logits"]), ours, atol=1e-5)
    assert ours[:, 1].std() > 1e-3  # (the rows' logits differ: a constant output would match anything)
    assert theirs["dtype"] == "torch.float32" and theirs["labels"] == {"0": "0", "1": "1"}  # the run's classes
    assert torch.allclose(torch.tensor(r4["logits"]), at4, atol=1e-5)
    assert not torch.allclose(at4, ours, atol=1e-3)
    # the delta is in it: the base model alone gives other logits
    assert not torch.allclose(torch.tensor(base["logits"]), ours, atol=1e-3)
    # an existing folder: refused without --overwrite, as the adapter export; with it, a previous export's weight and
    # adapter files that would be read instead of (or beside) the new ones go, the user's files stay
    assert main(["export", str(run), "--checkpoint", "step-3", "--merged"]) == 2
    err = _error(capsys)
    assert "merged-step-3: exists and holds config.json, model.safetensors" in err and "--overwrite" in err
    for stale in ("adapter_config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json"):
        (out / stale).write_text("{}")
    (out / "NOTES.md").write_text("mine")
    assert main(["export", str(run), "--checkpoint", "step-3", "--merged", "--overwrite"]) == 0
    assert sorted(names | {"NOTES.md"}) == sorted(p.name for p in out.iterdir())
    # the default folders are the run's outputs: a new run there is refused, naming it (as peft_adapter-NAME)
    assert main(test_cli._train_args({**tiny, "bert": wide}, run, "--steps", "1")) == 2
    assert "merged-step-3" in _error(capsys)


def test_merged_flags_are_one_line_errors(run, tmp_path, capsys):
    assert main(["export", str(run), "--dtype", "bfloat16", "--out", str(tmp_path / "x")]) == 2
    assert "--dtype bfloat16: the dtype of a --merged model's weights" in _error(capsys)
    assert main(["export", str(run), "--merged", "--dtype", "int8"]) == 2  # argparse's choices
    assert "invalid choice: 'int8'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (run / "merged-step-6").exists()


@pytest.fixture(scope="module")
def bf16_gpt2(tiny, tmp_path_factory) -> str:
    """test_cli's tiny GPT-2 (its WordPiece tokenizer) saved in bf16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("bf16") / "gpt2"
    AutoModelForCausalLM.from_pretrained(tiny["gpt2"], dtype=torch.float32).to(torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny["gpt2"]).save_pretrained(path)
    return str(path)


def test_a_bf16_causal_lm_merges_in_fp32_is_written_in_bf16_and_generates_as_the_run(bf16_gpt2, tiny, tmp_path,
                                                                                      capsys):
    """A bf16 base: the merged weights are written in bf16 (half the fp32 size), each the fp32 merge rounded once;
    --dtype float32 writes the fp32 merge, whose logits and greedy tokens are unified-lora's own. The run trained
    with lora_dropout 0.1: its adapter export records it (PEFT builds its dropout from it for is_trainable=True)."""
    from unified_lora.inference import load_trained

    run = tmp_path / "run"
    (tmp_path / "cfg.yaml").write_text("lora_dropout: 0.1\n")
    assert main(["train", "--model", bf16_gpt2, "--data", tiny["csv"], "--text-columns", "text", "--target-modules",
                 "c_attn", "--steps", "4", "--batch-size", "8", "--max-length", "16", "--lrs", "3e-2", "3e-2", "3e-2",
                 "--output-dir", str(run), "--log-every", "0", "--config", str(tmp_path / "cfg.yaml")]) == 0
    assert json.loads((run / "peft_adapter" / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    assert main(["export", str(run), "--out", str(tmp_path / "adapter")]) == 0
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    capsys.readouterr()
    assert main(["export", str(run), "--merged"]) == 0  # auto: the base's bf16
    assert "merged model (rank 8, bfloat16, " in capsys.readouterr().out
    assert main(["export", str(run), "--merged", "--dtype", "float32", "--out", str(tmp_path / "fp32")]) == 0
    half, full = _weights(run / "merged-step-4"), _weights(tmp_path / "fp32")
    assert half.keys() == full.keys() and {t.dtype for t in half.values()} == {torch.bfloat16}
    assert json.loads((run / "merged-step-4" / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(torch.equal(half[k], full[k].to(torch.bfloat16)) for k in half)  # rounded once, from the fp32 merge
    size = lambda p: (p / "model.safetensors").stat().st_size  # noqa: E731
    assert size(run / "merged-step-4") < 0.55 * size(tmp_path / "fp32")
    tr = load_trained(run, device="cpu")
    ids = [[2, 5, 6, 7, 8, 9], [2, 10, 11, 12, 13, 14]]
    with torch.no_grad():
        x = torch.tensor(ids)
        ours = tr.model(input_ids=x).logits
        tokens = tr.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=12,
                                   min_new_tokens=12, do_sample=False, pad_token_id=0).tolist()
    auto = "AutoModelForCausalLM"
    fp32, bf16, base = _plain((tmp_path / "fp32", auto, ids, 12), (run / "merged-step-4", auto, ids, 0),
                              (bf16_gpt2, auto, ids, 12))
    assert torch.allclose(torch.tensor(fp32["logits"]), ours, atol=1e-5) and fp32["tokens"] == tokens
    assert bf16["dtype"] == "torch.bfloat16"
    assert torch.allclose(torch.tensor(bf16["logits"]), ours, atol=0.1, rtol=0.05)
    # the delta moved the logits by more than that, and reaches the generation: the base model continues otherwise
    assert (torch.tensor(base["logits"]) - ours).abs().max() > 0.3 and base["tokens"] != tokens


def test_a_multitask_run_merges_the_task_asked_for_with_its_own_classes(wide, data, tmp_path, capsys):
    from unified_lora.inference import load_trained
    from unified_lora.training import encode_rows, load_table

    out = tmp_path / "run"
    assert main(test_cli_multitask._mt_args(wide, out, data["pos"], data["tri"], extra=(
        "--task-names", "pos,tri", "--no-controller", "--steps", "4", "--log-every", "0"))) == 0
    capsys.readouterr()
    assert main(["export", str(out), "--merged"]) == 2  # each task's adapter gives its own model
    assert _error(capsys).endswith(f"--merged: {out} is a multi-task run (tasks pos, tri), and each task's adapter "
                                   "gives its own model; pass --task NAME for the task to merge")
    assert main(["export", str(out), "--merged", "--task", "tir"]) == 2
    assert _error(capsys).endswith("its tasks are pos, tri (did you mean tri?)")
    assert not [p for p in out.iterdir() if p.name.startswith("merged-")]
    logits, jobs = {}, []
    for task, path in (("pos", data["pos"]), ("tri", data["tri"])):
        assert main(["export", str(out), "--merged", "--task", task]) == 0
        assert f"merged model of task {task} (rank 8, float32, " in capsys.readouterr().out
        tr = load_trained(out, task=task, device="cpu")  # predict's loading
        ids = encode_rows(tr.tokenizer, load_table(path, ["text"], "label"), "seq-cls", 16)["input_ids"][:8]
        logits[task] = tr.run.logits(task, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        jobs.append((out / f"merged-step-4-{task}", "AutoModelForSequenceClassification", ids.tolist(), 0))
    pos, tri = _plain(*jobs)
    # each task's own classes: a head of that many outputs, its logits the task's
    assert pos["labels"] == {"0": "0", "1": "1"} and tri["labels"] == {"0": "neg", "1": "pos", "2": "zzz"}
    assert torch.allclose(torch.tensor(pos["logits"]), logits["pos"], atol=1e-5)
    assert torch.allclose(torch.tensor(tri["logits"]), logits["tri"], atol=1e-5)
    assert logits["pos"].shape[1] == 2 and logits["pos"][:, 1].std() > 1e-3
    assert not torch.allclose(logits["pos"], logits["tri"][:, :2], atol=1e-3)  # (each task's own adapter)


def test_a_quantized_base_is_refused_with_merged(tiny, tmp_path, capsys):
    """A run on a bitsandbytes 8-bit base (a pre-quantized folder, which `train` loads and trains on the CPU):
    --merged is refused before the model loads, naming the quantization; nothing is written."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    full, q8 = tmp_path / "llama", tmp_path / "llama-8bit"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
                     ).save_pretrained(full)
    AutoModelForCausalLM.from_pretrained(full, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                         device_map="cpu").save_pretrained(q8)
    AutoTokenizer.from_pretrained(tiny["gpt2"]).save_pretrained(q8)
    run = tmp_path / "run"
    assert main(["train", "--model", str(q8), "--data", tiny["csv"], "--text-columns", "text", "--target-modules",
                 "q_proj,v_proj", "--steps", "1", "--batch-size", "8", "--max-length", "16", "--output-dir", str(run),
                 "--log-every", "0"]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--merged"]) == 2
    said = capsys.readouterr()
    assert said.out == "" and len(said.err.strip().splitlines()) == 1  # (refused before the checkpoint loads)
    assert f"unified-lora: error: --merged: the run's base model {q8} is quantized (bitsandbytes 8-bit)" in said.err
    assert "Export the adapter (without --merged)" in said.err
    assert not (run / "merged-step-1").exists()


@pytest.mark.parametrize("sharded", [False, True], ids=["one_file", "sharded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_stored_dtype_of_a_base_saved_as_pytorch_model_bin_is_its_weights(dtype, sharded, tmp_path):
    """A base whose weights are `pytorch_model.bin` (or its shards, with their index) and whose config names no dtype:
    stored_dtype read safetensors files alone and said fp32, so `export --merged` (--dtype auto) wrote a bf16 base's
    merge in fp32, at twice its size, where transformers' dtype="auto" loads that base in bf16. The files are written
    with torch.save, as transformers 5's save_pretrained writes safetensors whatever safe_serialization says."""
    from conftest import tiny_bert
    from transformers import AutoModelForSequenceClassification

    from unified_lora.inference import stored_dtype

    model = tiny_bert().to(dtype)
    model.config.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        config.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = model.state_dict()
    if sharded:
        keys = list(state)
        shards = {f"pytorch_model-0000{i + 1}-of-00002.bin": part for i, part in
                  enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:]))}
        for name, part in shards.items():
            torch.save({k: state[k] for k in part}, tmp_path / name)
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}))
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype="auto").dtype == dtype
    assert stored_dtype(str(tmp_path)) == dtype
    torch.save(tiny_bert().state_dict(), tmp_path / ("pytorch_model-00001-of-00002.bin" if sharded else
                                                     "pytorch_model.bin"))
    assert stored_dtype(str(tmp_path)) == torch.float32  # (the first tensor's dtype: the test can fail)
