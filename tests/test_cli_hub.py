"""The CLI on a Hugging Face hub id (`--model org/name`), read offline from a Hugging Face cache built here in the
layout huggingface_hub downloads into (`models--org--name/refs/main`, `snapshots/<commit>/` links to `blobs/`): the
tiny models of test_cli.py. No network: the cache is the hub."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import test_cli
import test_cli_predict
from unified_lora.cli import main

tiny = test_cli.tiny  # test_cli.py's tiny BERT / GPT-2 and data files (module-scoped fixtures)
wide = test_cli_predict.wide  # the same BERT with wider weights: its predictions vary by row
_read, _error = test_cli_predict._read, test_cli_predict._error


def _cache(hub: Path, repo: str, folder) -> None:
    """`folder`'s files as the hub id `repo` at its main revision in the Hugging Face cache `hub`."""
    top = hub / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = top / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (top / "blobs").mkdir()
    (top / "refs").mkdir()
    (top / "refs" / "main").write_text(commit)
    for f in Path(folder).iterdir():
        blob = top / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))


@pytest.fixture(scope="module")
def cache(tiny, wide, tmp_path_factory) -> Path:
    """org/bert (test_cli_predict's wide BERT classifier) and org/gpt2-bf16 (test_cli's tiny GPT-2 saved in bf16, its
    config without a dtype: transformers' dtype="auto" reads bf16 from its safetensors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("hf")
    bf16 = root / "gpt2-bf16"
    AutoModelForCausalLM.from_pretrained(tiny["gpt2"], dtype=torch.float32).to(torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(tiny["gpt2"]).save_pretrained(bf16)
    config = json.loads((bf16 / "config.json").read_text())
    assert config.pop("dtype", None) == "bfloat16"
    config.pop("torch_dtype", None)
    (bf16 / "config.json").write_text(json.dumps(config))
    _cache(root / "hub", "org/bert", wide)
    _cache(root / "hub", "org/gpt2-bf16", bf16)
    return root / "hub"


@pytest.fixture
def offline(cache, monkeypatch) -> Path:
    """HF_HUB_CACHE is the cache, offline (HF_HUB_OFFLINE=1). huggingface_hub reads both when it is imported, so its
    constants are set too, as a process started with that environment has them."""
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return cache


def _args(model: str, data: str, out, *extra) -> list[str]:
    return ["train", "--model", model, "--data", data, "--batch-size", "8", "--max-length", "16", "--output-dir",
            str(out), "--log-every", "0", *extra]


def test_a_cached_hub_id_is_not_taken_for_a_typo_beside_a_local_folder_named_like_its_org(offline, tiny, wide,
                                                                                         tmp_path, monkeypatch,
                                                                                         capsys):
    """In a folder holding `org/other-model/` (a saved model), `--model org/bert` read as a typo of it: `train`,
    `predict` and `export --merged` of a run on the hub id org/bert were refused ("no such folder ... run where org
    is no local folder"), though the Hugging Face cache holds org/bert. A hub id the cache lacks is still one, and
    so is a close misspelling of the local model. The run's own hub id is not checked for a typo: `predict` and
    `export` load it even where the cache has lost it (from_pretrained fetches it, or says it cannot)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from unified_lora.training import encode_rows, load_table, resolve_model

    monkeypatch.chdir(tmp_path)
    shutil.copytree(wide, tmp_path / "org" / "other-model")
    run = tmp_path / "run"
    assert main(_args("org/bert", tiny["csv"], run, "--steps", "3", "--lrs", "1e-2", "1e-2", "1e-2")) == 0
    assert main(_args("org/bert", tiny["csv"], run, "--steps", "4", "--resume")) == 0
    assert main(["predict", str(run), "--data", tiny["csv"], "--output", str(tmp_path / "p.csv")]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "adapter")]) == 0
    assert main(["export", str(run), "--merged", "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    # the adapter names the hub id as its base, and loads onto it in PEFT: predict's probabilities
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "org/bert"
    enc = encode_rows(AutoTokenizer.from_pretrained("org/bert"), load_table(tiny["csv"], ["text"], "label"),
                      "seq-cls", 16)
    peft = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained("org/bert"),
                                     str(tmp_path / "adapter")).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    probs = torch.tensor([[float(r["prob_0"]), float(r["prob_1"])] for r in _read(tmp_path / "p.csv")])
    with torch.no_grad():
        for model in (peft, merged):
            assert torch.allclose(model(**{k: v for k, v in enc.items() if k != "labels"}).logits.softmax(-1), probs,
                                  atol=1e-5)
    assert probs[:, 1].std() > 1e-3  # (the rows' probabilities differ: a constant output would match anything)
    # not in the cache: a misspelt local model (named), or a hub id to fetch elsewhere
    for given, hint in (("org/other-modl", " (did you mean org/other-model?)"), ("org/bertt", "")):
        assert main(_args(given, tiny["csv"], tmp_path / "typo")) == 2
        assert _error(capsys) == (
            f"unified-lora: error: --model {given}: no such folder{hint}; the local folder org holds the models "
            f"other-model, not {given[4:]}, and the Hugging Face cache has no {given} (for that hub id, run where org "
            "is no local folder, or download it into the cache first)")
    assert not (tmp_path / "typo").exists()
    assert resolve_model("org/bertt", recorded=True) == "org/bertt"  # a run's recorded hub id


def test_a_merged_hub_base_whose_config_has_no_dtype_is_written_in_its_safetensors_dtype(offline, tiny, tmp_path,
                                                                                       capsys):
    """`export --merged` (--dtype auto) of a run on the hub id org/gpt2-bf16, whose config names no dtype and whose
    safetensors weights are bf16: stored_dtype looked for the weights of a local folder alone, and wrote the hub
    base's merge in fp32, at twice its size."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    assert main(_args("org/gpt2-bf16", tiny["csv"], run, "--steps", "2", "--text-columns", "text",
                      "--target-modules", "c_attn")) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--merged"]) == 0
    assert "merged model (rank 8, bfloat16, " in capsys.readouterr().out
    assert json.loads((run / "merged-step-2" / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(run / "merged-step-2" / "model.safetensors").values()} == {torch.bfloat16}
