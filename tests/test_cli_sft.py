"""`unified-lora train` on prompt/completion pairs (supervised fine-tuning of a causal LM, the loss on the completion
only): a tiny GPT-2 with a GPT-2 tokenizer (adds no special token) and a tiny Llama with a Llama tokenizer (adds BOS),
both tokenizers built offline on a character vocabulary."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import test_cli
from conftest import tiny_gpt2, tiny_llama
from unified_lora.cli import _fmt_metrics, main
from unified_lora.trace import read_trace

CHARS = list("abcdefghijklmnopqrstuvwxyz?:.,")
PAIRS = [("what is up?", " the sky"), ("say hi:", " hello there"), ("color of grass?", " green"),
         ("opposite of hot?", " cold"), ("a b c", " d e f g"), ("name a fruit:", " apple"),
         ("what barks?", " a dog"), ("sum:", " total")]

tiny = test_cli.tiny  # test_cli.py's tiny GPT-2 with a BERT tokenizer (a module-scoped fixture)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Two causal LMs (hidden 32) saved with their tokenizers: "gpt2" (GPT2Tokenizer: no special tokens added, eos
    <|endoftext|>, no pad) and "llama" (LlamaTokenizer: BOS <s> added to a text, eos </s>, no pad)."""
    from transformers import GPT2Tokenizer, LlamaTokenizer

    root = tmp_path_factory.mktemp("sft")
    gpt2_tok = GPT2Tokenizer(vocab={w: i for i, w in enumerate(["<|endoftext|>", "Ġ", *CHARS])}, merges=[])
    llama_tok = LlamaTokenizer(vocab={w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "▁", *CHARS])}, merges=[],
                               add_bos_token=True)
    for name, model, tok in (("gpt2", tiny_gpt2(), gpt2_tok), ("llama", tiny_llama(), llama_tok)):
        model.config.architectures = [type(model).__name__]
        model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return {"gpt2": str(root / "gpt2"), "llama": str(root / "llama")}


def _jsonl(path: Path, pairs, keys=("prompt", "completion")) -> Path:
    path.write_text("".join(json.dumps(dict(zip(keys, p))) + "\n" for p in pairs))
    return path


def _tok(path: str):
    from unified_lora.training import load_tokenizer

    return load_tokenizer(path)  # as a run loads it: pad = eos where the tokenizer has no pad token


def _train(model: str, data: Path, out: Path, *extra) -> list[str]:
    targets = "c_attn" if Path(model).name == "gpt2" else "q_proj,v_proj"
    return ["train", "--model", model, "--data", str(data), "--target-modules", targets,
            "--batch-size", "4", "--max-length", "48", "--log-every", "0", "--output-dir", str(out), *extra]


# ----------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_the_labels_are_exactly_the_completion_and_eos_and_a_bos_is_added_once(models, which):
    from unified_lora.training import encode_rows

    tok = _tok(models[which])
    enc = encode_rows(tok, PAIRS, "causal-lm", 64)
    assert tok.pad_token_id == tok.eos_token_id  # padding is the eos id too: the labels must not be read off the ids
    for i, (prompt, completion) in enumerate(PAIRS):
        ids, mask, labels = enc["input_ids"][i], enc["attention_mask"][i], enc["labels"][i]
        n = int(mask.sum())
        assert bool(mask[:n].all()) and not bool(mask[n:].any())  # padded on the right
        target = labels != -100
        assert bool((labels[target] == ids[target]).all())
        # the targets: exactly the completion's tokens and the eos, the last tokens of the row
        completion_ids = tok(completion, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids[target]) == tok.decode(completion_ids) + tok.eos_token
        assert target.nonzero().flatten().tolist() == list(range(n - int(target.sum()), n))
        assert int(ids[n - 1]) == tok.eos_token_id
        context = ids[:n][~target[:n]].tolist()
        if which == "gpt2":  # no special token: the row opens with the prompt
            assert tok.decode(context) == prompt and tok.decode(ids[:n]) == prompt + completion + tok.eos_token
        else:  # the BOS once, at the start, then the prompt
            assert context[0] == tok.bos_token_id and ids[:n].tolist().count(tok.bos_token_id) == 1
            assert context[1:] == tok(prompt, add_special_tokens=False)["input_ids"]
            assert tok(prompt)["input_ids"] == context  # what the tokenizer gives the prompt alone: the inference input


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_a_completion_that_already_ends_with_the_eos_gets_no_second_one(models, which):
    """TRL adds the eos to a completion only where it does not end with it: the row is the same either way."""
    from unified_lora.training import encode_rows

    tok = _tok(models[which])
    enc = encode_rows(tok, [("say hi:", " hello" + tok.eos_token), ("say hi:", " hello")], "causal-lm", 64)
    with_eos, without = (enc["input_ids"][i, :int(enc["attention_mask"][i].sum())].tolist() for i in (0, 1))
    assert with_eos == without and with_eos.count(tok.eos_token_id) == 1 and with_eos[-1] == tok.eos_token_id
    assert enc["labels"][0].equal(enc["labels"][1])


def test_a_row_cut_at_max_length_keeps_its_start_and_one_with_no_completion_left_is_left_out(models):
    from unified_lora.data import DataError
    from unified_lora.training import encode_rows

    tok = _tok(models["llama"])
    long_prompt = ("x" * 30, " yes")  # BOS + 30 prompt tokens: nothing of the completion within 24 tokens
    pairs = [("ab?", " cd"), long_prompt, ("abcdefghijklmnop?", " qrstuvwxyz")]
    said = []
    enc = encode_rows(tok, pairs, "causal-lm", 24, note=said.append)
    assert said == ["1 of 3 prompt/completion rows have no completion token within max_length 24 (the prompt fills "
                    "it) and are left out",
                    "1 of 3 prompt/completion rows are longer than max_length 24 and cut at its end: the rest of "
                    "their completion (and the eos) is not trained on"]
    assert len(enc["labels"]) == 2
    cut_ids, cut_labels = enc["input_ids"][1], enc["labels"][1]
    whole = [tok.bos_token_id, *tok(pairs[2][0], add_special_tokens=False)["input_ids"],
             *tok(pairs[2][1], add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert cut_ids.tolist() == whole[:24] and len(whole) > 24  # the start kept, the completion's end cut
    assert int((cut_labels != -100).sum()) == 24 - 1 - len(tok(pairs[2][0], add_special_tokens=False)["input_ids"])
    with pytest.raises(DataError, match="no prompt/completion row has a completion token within max_length 24"):
        encode_rows(tok, [long_prompt], "causal-lm", 24)


# ----------------------------------------------------------------------------- text rows (one text column)


TEXTS = ["say hi: hello there", "ab", "what barks? a dog", "abcdefghijklmnopqrstuvwxyz"]


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_text_rows_end_with_the_eos_as_a_target_unless_they_have_it_and_a_cut_row_loses_it(models, which):
    """TRL's SFTTrainer appends the eos to a text row that does not end with it; here its id, after tokenising. Every
    token and the eos are targets; the padding, the eos id too (pad == eos), is not. A row cut at max_length keeps its
    start and loses its eos (TRL cuts after adding it), and the note counts it."""
    from unified_lora.training import encode_rows

    tok = _tok(models[which])
    assert tok.pad_token_id == tok.eos_token_id
    rows = [*TEXTS, "a dog" + tok.eos_token]
    said = []
    enc = encode_rows(tok, rows, "causal-lm", 24, note=said.append)
    assert said == ["1 of 5 text rows are longer than max_length 24 and cut at its end: the rest of their text (and "
                    "the eos) is not trained on"]
    width = enc["input_ids"].shape[1]
    for i, text in enumerate(rows):
        ids, mask, labels = (enc[k][i].tolist() for k in ("input_ids", "attention_mask", "labels"))
        n = sum(mask)
        assert mask == [1] * n + [0] * (width - n)  # padded on the right
        own = tok(text)["input_ids"]
        expected = (own if own[-1] == tok.eos_token_id else own + [tok.eos_token_id])[:24]
        trl = text if text.endswith(tok.eos_token) else text + tok.eos_token  # TRL's text: the same tokens here
        assert tok(trl)["input_ids"][:24] == expected
        assert ids[:n] == expected and labels[:n] == expected  # every token a target, the eos included
        assert ids[n:] == [tok.pad_token_id] * (width - n) and labels[n:] == [-100] * (width - n)
        assert ids[:n].count(tok.eos_token_id) == (0 if len(own) >= 24 else 1)  # one eos; none once cut
        if which == "llama":
            assert ids[0] == tok.bos_token_id and ids[:n].count(tok.bos_token_id) == 1
    assert width == 24 and int(enc["attention_mask"][3].sum()) == 24  # the cut row fills it


def test_text_eos_off_is_the_tokenizers_own_encoding_and_a_row_of_the_eos_alone_is_left_out(models, tiny):
    """text_eos off: each row is the tokenizer's encoding truncated to max_length, as before the setting existed;
    so is every row of a tokenizer without an eos (test_cli's BERT one: [CLS] ... [SEP]), whatever the setting."""
    import re

    from transformers import AutoTokenizer

    from unified_lora.data import DataError
    from unified_lora.training import SINGLE_TOKEN_TEXTS, TrainConfig, encode_rows

    tok, bert = _tok(models["gpt2"]), AutoTokenizer.from_pretrained(tiny["gpt2"])
    assert bert.eos_token_id is None
    for t, eos in ((tok, False), (bert, True)):
        got = encode_rows(t, TEXTS, "causal-lm", 16, text_eos=eos)
        plain = t(TEXTS, truncation=True, max_length=16, padding="longest", return_tensors="pt")
        assert got["input_ids"].equal(plain["input_ids"]) and got["attention_mask"].equal(plain["attention_mask"])
        assert got["labels"].equal(plain["input_ids"].masked_fill(plain["attention_mask"] == 0, -100))
    said = []
    enc = encode_rows(tok, ["ab", tok.eos_token], "causal-lm", 16, note=said.append)  # the eos alone: one token
    assert len(enc["labels"]) == 1 and said == ["1 of 2 text rows have no token to predict within max_length 16 (a "
                                                "single token) and are left out"]
    with pytest.raises(DataError, match=re.escape(SINGLE_TOKEN_TEXTS)):
        encode_rows(tok, [tok.eos_token], "causal-lm", 16)
    with pytest.raises(ValueError, match="text_eos: must be true or false, got 'no'"):
        TrainConfig(text_eos="no")  # YAML's `text_eos: "no"`


def test_text_eos_off_counts_its_cut_and_left_out_rows_as_the_eos_path_does(models):
    """text_eos off: the rows cut at max_length and the one-token rows left out are counted to `note` in the eos
    path's words (they were cut and dropped silently), and the encoding is still the tokenizer's own, truncated, as
    before (old runs resume on it)."""
    from unified_lora.training import encode_rows

    tok = _tok(models["gpt2"])
    rows = ["ab", "a", "abcdefghijklmnop", "abcdefghijklmnopq", TEXTS[3]]  # (a token a character) 1, 16, 17, 26
    assert [len(tok(r)["input_ids"]) for r in rows] == [2, 1, 16, 17, 26]
    said = []
    got = encode_rows(tok, rows, "causal-lm", 16, note=said.append, text_eos=False)
    assert said == ["1 of 5 text rows have no token to predict within max_length 16 (a single token) and are left "
                    "out", "2 of 5 text rows are longer than max_length 16 and cut at its end: the rest of their text "
                    "is not trained on"]
    kept = [r for r in rows if r != "a"]
    plain = tok(kept, truncation=True, max_length=16, padding="longest", return_tensors="pt")
    assert got["input_ids"].equal(plain["input_ids"]) and got["attention_mask"].equal(plain["attention_mask"])
    assert got["labels"].equal(plain["input_ids"].masked_fill(plain["attention_mask"] == 0, -100))
    assert int(got["attention_mask"].sum(1).max()) == 16
    said.clear()
    assert encode_rows(tok, rows[2:3], "causal-lm", 16, note=said.append, text_eos=False)["input_ids"].shape[1] == 16
    assert said == []  # a row of exactly max_length is not cut: nothing said


def test_a_text_run_trains_on_the_eos_and_an_old_run_resumes_and_predicts_without_it(models, tmp_path, capsys):
    """An eos run, scored by `predict --data` as train scored it; a resume that would drop the eos is refused. Its
    checkpoints then lose the `text_eos` key, as a run saved before the key existed: the resume goes on without the
    eos (the data it trained on), and `predict --data` on such a checkpoint scores as that run's evaluation did."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": p + c}) + "\n" for p, c in PAIRS * 2))
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"text": p + c}) + "\n" for p, c in PAIRS))
    out = tmp_path / "run"
    assert main(_train(models["gpt2"], data, out, "--dev-data", str(dev), "--steps", "2", "--threads", "1")) == 0
    assert ("text rows ('text'): the loss is on every token and the eos that ends each row (as TRL's SFTTrainer adds "
            "it)") in capsys.readouterr().out
    states = lambda: sorted((out / "checkpoints").glob("*/state.pt"))  # noqa: E731
    assert [torch.load(s, weights_only=True)["config"]["text_eos"] for s in states()] == [True]
    final = list(json.loads((out / "summary.json").read_text())["arms"]["run"]["eval"].values())[-1]
    assert main(["predict", str(out), "--data", str(dev)]) == 0
    assert f"{dev}: {_fmt_metrics(final)}" in capsys.readouterr().out

    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "4", "--no-text-eos"]) == 2
    err = capsys.readouterr().err
    assert "the run was trained with text_eos=True (now False)" in err and err.count("\n") == 1

    def old_style():  # the checkpoints of a run saved before text_eos existed
        for path in states():
            st = torch.load(path, weights_only=True)
            st["config"].pop("text_eos", None)
            torch.save(st, path)

    old_style()
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "4", "--text-eos"]) == 2
    assert "the run was trained with text_eos=False (now True)" in capsys.readouterr().err
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "4"]) == 0
    assert "no eos is added to a row (text_eos off)" in capsys.readouterr().out
    assert [r["step"] for r in read_trace(out / "trace.jsonl")] == [0, 1, 2, 3]
    assert torch.load(out / "checkpoints" / "epoch-1" / "state.pt", weights_only=True)["config"]["text_eos"] is False
    old_final = list(json.loads((out / "summary.json").read_text())["arms"]["run"]["eval"].values())[-1]
    old_style()
    assert main(["predict", str(out), "--data", str(dev)]) == 0  # epoch-1 (step 4), without the key
    assert f"{dev}: {_fmt_metrics(old_final)}" in capsys.readouterr().out

    # the flag where it does nothing is refused: prompt/completion pairs end with the eos anyway
    assert main(_train(models["gpt2"], _jsonl(tmp_path / "sft.jsonl", PAIRS), tmp_path / "sft", "--no-text-eos")) == 2
    assert capsys.readouterr().err == ("unified-lora: error: --no-text-eos: for a causal LM's text rows (one text "
                                       "column of a .csv/.tsv/.jsonl table); this run trains on prompt/completion "
                                       "pairs, which an eos ends\n")


# ----------------------------------------------------------------------------- training and evaluation


def test_a_run_learns_a_repeated_pair_and_its_dev_perplexity_is_the_completions(models, tmp_path, capsys):
    """Columns with other names (`--text-columns q,a`); the dev loss in summary.json is the mean cross-entropy of
    the completion tokens (and eos) of the dev rows, recomputed here from the exported adapter: not that of every
    token of the row."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = _jsonl(tmp_path / "train.jsonl", [PAIRS[1]] * 16, keys=("q", "a"))
    dev = _jsonl(tmp_path / "dev.jsonl", PAIRS, keys=("q", "a"))
    out = tmp_path / "run"
    assert main(_train(models["gpt2"], data, out, "--dev-data", str(dev), "--text-columns", "q,a", "--steps", "16",
                       "--no-controller", "--lrs", "3e-2", "3e-2", "3e-2", "--modules-to-save", "lm_head",
                       "--threads", "1")) == 0
    console = capsys.readouterr().out
    assert "prompt/completion rows ('q', 'a'): the loss is on the completion's tokens and the eos" in console
    assert "16 train / 8 dev rows" in console
    losses = [r["loss"] for r in read_trace(out / "trace.jsonl")]
    assert len(losses) == 16 and losses[-1] < 0.3 * losses[0]
    summary = json.loads((out / "summary.json").read_text())
    final = list(summary["arms"]["run"]["eval"].values())[-1]  # at step 16, the last

    tok = _tok(models["gpt2"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["gpt2"]), out / "peft_adapter")
    total = {"completion": [0.0, 0], "all": [0.0, 0]}
    with torch.no_grad():
        for prompt, completion in PAIRS:
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p + tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
            nll = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="none")
            total["completion"][0] += float(nll[len(p) - 1:].sum())
            total["completion"][1] += len(nll) - (len(p) - 1)
            total["all"][0] += float(nll.sum())
            total["all"][1] += len(nll)
    completion_loss = total["completion"][0] / total["completion"][1]
    assert final["loss"] == pytest.approx(completion_loss, rel=1e-4)
    assert final["perplexity"] == pytest.approx(math.exp(completion_loss), rel=1e-4)
    assert abs(total["all"][0] / total["all"][1] - completion_loss) > 0.05  # the prompt tokens' loss is another


def test_a_prompt_completion_jsonl_is_found_without_text_columns_and_an_empty_completion_is_refused(models, tmp_path, capsys):
    data = _jsonl(tmp_path / "sft.jsonl", PAIRS * 2)
    out = tmp_path / "run"
    assert main(_train(models["llama"], data, out, "--steps", "2")) == 0
    console = capsys.readouterr().out
    assert (f"--data {data}: no 'text' column but 'prompt' and 'completion': trained as prompt/completion pairs, the "
            "loss on the completion only") in console
    assert "prompt/completion rows ('prompt', 'completion')" in console
    st = torch.load(out / "checkpoints" / "step-2" / "state.pt", weights_only=True)
    assert st["config"]["text_columns"] == ["prompt", "completion"]  # recorded: a resume keeps the layout
    assert json.loads((out / "summary.json").read_text())["config"]["text_columns"] == ["prompt", "completion"]

    # an empty completion has nothing to learn but the eos: refused, naming the record
    empty = _jsonl(tmp_path / "empty.jsonl", [PAIRS[0], ("what?", " ")])
    assert main(_train(models["llama"], empty, tmp_path / "empty_run", "--steps", "2")) == 2
    assert (f"unified-lora: error: {empty}: record 2 (line 2) has an empty completion (column 'completion')"
            in capsys.readouterr().err)


def test_a_resume_that_would_change_the_prompt_completion_layout_is_refused(models, tmp_path, capsys):
    data = _jsonl(tmp_path / "sft.jsonl", PAIRS * 2)
    out = tmp_path / "run"
    assert main(_train(models["gpt2"], data, out, "--steps", "2")) == 0  # found: prompt, completion
    capsys.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "4", "--text-columns", "completion"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unified-lora: error: --resume {out / 'checkpoints' / 'step-2'}: the run was trained with "
                          "text_columns=['prompt', 'completion'] (now ['completion'])") and err.count("\n") == 1
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "4"]) == 0  # its own layout: goes on
    assert [r["step"] for r in read_trace(out / "trace.jsonl")] == [0, 1, 2, 3]

    # a run on one text column is not turned into a prompt/completion run by a data file that lost that column
    single = tmp_path / "single.jsonl"
    single.write_text("".join(json.dumps({"text": p + c}) + "\n" for p, c in PAIRS * 2))
    out1 = tmp_path / "run1"
    assert main(_train(models["gpt2"], single, out1, "--steps", "2")) == 0
    assert main(["train", "--output-dir", str(out1), "--resume", "--steps", "4", "--text-columns",
                 "prompt,completion"]) == 2
    assert "text_columns=('text',) (now ['prompt', 'completion'])" in capsys.readouterr().err
    _jsonl(single, PAIRS * 2)
    assert main(["train", "--output-dir", str(out1), "--resume", "--steps", "4"]) == 2
    assert f"unknown column 'text' in {single}" in capsys.readouterr().err
    assert [r["step"] for r in read_trace(out1 / "trace.jsonl")] == [0, 1]


def test_the_shock_draws_the_completion_targets_and_leaves_the_prompt_alone(models):
    from transformers import AutoModelForCausalLM

    from unified_lora.training import Run, TrainConfig, encode_rows

    tok = _tok(models["llama"])
    enc = encode_rows(tok, PAIRS, "causal-lm", 64)
    cfg = TrainConfig(task_type="causal-lm", target_modules="q_proj", shock_start=0, shock_end=2,
                      shock_type="random", log_every=0)
    run = Run(cfg, AutoModelForCausalLM.from_pretrained(models["llama"]), "causal-lm", 0, None, print_fn=None)
    shocked = run._prepared(enc, 0)
    targets = enc["labels"] != -100
    assert shocked["input_ids"].equal(enc["input_ids"])  # the model reads the same prompt and completion
    assert bool((shocked["labels"][~targets] == -100).all())  # the prompt, the BOS and the padding: no target
    assert bool((shocked["labels"][targets] != enc["labels"][targets]).float().mean() > 0.8)  # random tokens
    assert run._prepared(enc, 2)["labels"].equal(enc["labels"])  # after the window: the data's own


def test_grad_accum_weights_a_micro_batch_by_its_completion_tokens(models, tmp_path):
    """`Run._weight` counts the targets the model's loss averages over: the completion tokens and eos, not the
    prompt's; so N=2 × B=4 trains to the weights of B=8 on rows with prompts and completions of different lengths."""
    from transformers import AutoModelForCausalLM

    from test_cli_precision import _losses, _same_weights
    from unified_lora.training import Run, TrainConfig, encode_rows

    tok = _tok(models["gpt2"])
    enc = encode_rows(tok, PAIRS, "causal-lm", 64)
    cfg = TrainConfig(task_type="causal-lm", target_modules="c_attn", log_every=0)
    run = Run(cfg, AutoModelForCausalLM.from_pretrained(models["gpt2"]), "causal-lm", 0, None, print_fn=None)
    assert run._weight(enc) == sum(len(tok(c, add_special_tokens=False)["input_ids"]) + 1 for _, c in PAIRS)

    data = _jsonl(tmp_path / "sft.jsonl", [(p * (1 + i % 3), c * (1 + i % 2)) for i, (p, c) in enumerate(PAIRS * 5)])
    one, acc = tmp_path / "one", tmp_path / "acc"
    common = ("--dev-data", str(data), "--no-controller", "--epochs", "1", "--threads", "1", "--lrs", "1e-2", "1e-2",
              "1e-2", "--max-length", "64")
    assert main([*_train(models["gpt2"], data, one, *common), "--batch-size", "8"]) == 0
    assert main([*_train(models["gpt2"], data, acc, *common), "--batch-size", "4", "--grad-accum", "2"]) == 0
    a, b = _losses(one), _losses(acc)
    assert len(a) == len(b) == 5 and b == pytest.approx(a, rel=1e-5)
    _same_weights(one, acc)


def test_a_tokenizer_without_eos_adds_none_and_the_run_says_so_once(tiny, tmp_path, capsys):
    """test_cli.py's tiny GPT-2 has a BERT tokenizer: [CLS] before a text and [SEP] after it, no eos token. A row opens
    with [CLS] once and ends with the completion (no [SEP], no eos); the console says so once, not per data set."""
    from transformers import AutoTokenizer

    from unified_lora.training import encode_rows

    tok = AutoTokenizer.from_pretrained(tiny["gpt2"])
    assert tok.eos_token_id is None and tok("good")["input_ids"] == [tok.cls_token_id, 5, tok.sep_token_id]
    pairs = [("good movie", " bad film"), ("the plot", " was very nice")]
    enc = encode_rows(tok, pairs, "causal-lm", 16)
    for i, (prompt, completion) in enumerate(pairs):
        p, c = (tok(t, add_special_tokens=False)["input_ids"] for t in (prompt, completion))
        n = int(enc["attention_mask"][i].sum())
        assert enc["input_ids"][i, :n].tolist() == [tok.cls_token_id, *p, *c]
        assert enc["labels"][i, :n].tolist() == [-100] * (1 + len(p)) + c
    data = _jsonl(tmp_path / "sft.jsonl", pairs * 8)
    assert main(["train", "--model", tiny["gpt2"], "--data", str(data), "--target-modules", "c_attn", "--steps", "2",
                 "--batch-size", "4", "--max-length", "16", "--log-every", "0", "--output-dir",
                 str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.count("the tokenizer has no eos token, so none ends a completion") == 1


# ----------------------------------------------------------------------------- the model's context


def rope_scaled(models: dict, path: Path, rope: dict) -> str:
    """The tiny Llama (max_position_embeddings 64) saved again with `rope` as its config's rope parameters."""
    shutil.copytree(models["llama"], path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_theta": 10000.0, **rope}}))
    return str(path)


def test_a_rotary_model_is_refused_rows_past_its_context_unless_its_rope_scaling_extends_it(models, tmp_path,
                                                                                             capsys):
    """GPT-2 (a position table) fails on a row past its 64 positions and is refused; the tiny Llama (rotary positions,
    max_position_embeddings 64) trained on 128-token blocks without a word, its positions run past those it was
    trained on. It is refused too, naming its context; a linear rope scaling of factor 2 extends it to 128."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abc def ghi " * 40 + "\n")

    def train(model: str, max_length: int, out: str) -> int:
        return main(["train", "--model", model, "--data", str(corpus), "--target-modules", "q_proj,v_proj", "--steps",
                     "1", "--batch-size", "4", "--max-length", str(max_length), "--log-every", "0", "--threads", "1",
                     "--output-dir", str(tmp_path / out)])

    assert train(models["llama"], 128, "past") == 2
    assert capsys.readouterr().err == (
        "unified-lora: error: --max-length 128: the data's longest row is 128 tokens, past the model's context of 64 "
        "positions (max_position_embeddings 64); its rotary positions run on past it without an error, on positions "
        "it was never trained on; pass --max-length 64 or less\n")
    assert not (tmp_path / "past" / "trace.jsonl").exists()
    assert train(models["llama"], 64, "at") == 0  # a block as long as its context
    scaled = rope_scaled(models, tmp_path / "linear", {"rope_type": "linear", "factor": 2.0})
    capsys.readouterr()
    assert train(scaled, 128, "scaled") == 0
    assert capsys.readouterr().err == ""
    assert train(scaled, 160, "past_scaled") == 2
    assert capsys.readouterr().err == (
        "unified-lora: error: --max-length 160: the data's longest row is 160 tokens, past the model's context of 128 "
        "positions (max_position_embeddings 64 × linear rope scaling factor 2); its rotary positions run on past it "
        "without an error, on positions it was never trained on; pass --max-length 128 or less\n")


def test_the_context_of_a_model_is_read_from_its_config_per_kind_of_positions():
    """`model_context`: a position table's size (GPT-2's n_positions, BERT's max_position_embeddings); a rotary
    model's max_position_embeddings, extended by a rope scaling (transformers 5's rope_parameters or an older
    config's rope_scaling) to original_max_position_embeddings (else max_position_embeddings) × factor where that is
    more (Llama 3.1's max_position_embeddings is already the extended context); no limit for ALiBi or T5."""
    from types import SimpleNamespace

    from transformers import BertConfig, FalconConfig, GPT2Config, GPTJConfig, LlamaConfig, T5Config

    from unified_lora.training import Context, model_context

    def context(cfg) -> Context:
        return model_context(SimpleNamespace(config=cfg))

    assert context(GPT2Config(n_positions=64)) == Context(64, False, "n_positions 64")
    assert context(BertConfig(max_position_embeddings=40)) == Context(40, False, "max_position_embeddings 40")
    assert context(LlamaConfig(max_position_embeddings=64)) == Context(64, True, "max_position_embeddings 64")
    assert context(GPTJConfig(n_positions=32)) == Context(32, True, "n_positions 32")  # rotary_dim, no rope params
    assert context(LlamaConfig(max_position_embeddings=64, rope_scaling={"type": "dynamic", "factor": 3.0})) == \
        Context(192, True, "max_position_embeddings 64 × dynamic rope scaling factor 3")
    assert context(LlamaConfig(max_position_embeddings=64, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 1e4})) == \
        Context(128, True, "original_max_position_embeddings 32 × yarn rope scaling factor 4")
    llama31 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "rope_theta": 5e5}
    assert context(LlamaConfig(max_position_embeddings=131072, rope_parameters=llama31)) == \
        Context(131072, True, "max_position_embeddings 131072")
    assert context(FalconConfig(alibi=True)).positions is None and context(T5Config()).positions is None
