"""`unified-lora predict`: a `train` run's checkpoint on new data. A classifier's predictions score what the run's dev
evaluation reported on the same rows; class names, GLUE test.tsv files, `--checkpoint`, a causal LM's greedy
generation (the prompt encoded as training encoded it) and perplexity, and the errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

import test_cli
import test_cli_sft
from unified_lora.cli import _fmt_metrics, main
from unified_lora.data import glue_metrics

tiny = test_cli.tiny  # test_cli.py's tiny BERT / GPT-2 and data files (module-scoped fixtures)
models = test_cli_sft.models  # a tiny GPT-2 and Llama with their own tokenizers
_train_args = test_cli._train_args


def _read(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))


def _evals(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())["arms"]["run"]["eval"]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("unified-lora: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def wide(tiny, tmp_path_factory) -> str:
    """test_cli's tiny BERT with a 2-class head, its weights drawn 25x wider (initializer_range 0.5): the tiny BERT's
    own [CLS] output hardly depends on the text, so its head predicted one class for every row and any constant
    prediction would have matched the dev scores. With this one the predicted classes and probabilities vary by row."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    cfg = BertConfig.from_pretrained(tiny["bert"], num_labels=2, initializer_range=0.5)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    model.config.architectures = ["BertForSequenceClassification"]
    path = tmp_path_factory.mktemp("wide") / "bert"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny["bert"]).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def named_run(tiny, wide, tmp_path_factory) -> dict:
    """A BERT classifier trained 2 epochs (16 steps) on string labels ("neg"/"pos"), scored on a dev .jsonl with an id
    column: checkpoints epoch-1 and epoch-2."""
    root = tmp_path_factory.mktemp("named")
    dev = root / "dev.jsonl"
    dev.write_text("".join(json.dumps({"id": f"r{i}", "review": t, "sentiment": ["neg", "pos"][y]}) + "\n"
                           for i, (t, y) in enumerate(test_cli._rows(20, seed=5))))
    out = root / "run"
    assert main(["train", "--model", wide, "--data", tiny["jsonl"], "--dev-data", str(dev),
                 "--text-columns", "review", "--label-column", "sentiment", "--epochs", "2", "--batch-size", "8",
                 "--max-length", "16", "--lrs", "1e-2", "1e-2", "1e-2", "--log-every", "0",
                 "--output-dir", str(out)]) == 0
    evals = _evals(out)
    assert evals["epoch 1"] != evals["epoch 2"]  # (the two checkpoints predict differently)
    return {"run": out, "dev": dev}


def test_predictions_score_what_the_dev_evaluation_reported_and_name_the_classes(named_run, capsys):
    run, dev = named_run["run"], named_run["dev"]
    capsys.readouterr()
    assert main(["predict", str(run), "--data", str(dev)]) == 0
    said = capsys.readouterr().out
    evals = _evals(run)
    final = evals["epoch 2"]
    assert "checkpoints/epoch-2 (step 16): seq-cls, rank 8 (MULTI" in said  # the newest, as --resume picks it
    assert f"labelled rows (20, task train): {_fmt_metrics(final)}" in said
    rows = _read(run / "predictions.jsonl")  # the input's format, in the run folder
    gold = [json.loads(line) for line in dev.read_text().splitlines()]
    assert [r["id"] for r in rows] == [g["id"] for g in gold]  # the id column, found by name, in row order
    assert {r["prediction"] for r in rows} <= {"neg", "pos"}
    for r in rows:
        assert set(r) == {"id", "prediction", "prob_neg", "prob_pos"}
        assert r["prob_neg"] + r["prob_pos"] == pytest.approx(1, abs=2e-6)
        assert r["prediction"] == ("pos" if r["prob_pos"] > r["prob_neg"] else "neg")
    ids = {"neg": 0, "pos": 1}
    metrics = glue_metrics("train", [ids[r["prediction"]] for r in rows], [ids[g["sentiment"]] for g in gold])
    assert metrics == final  # exactly the dev evaluation's numbers, from the file's class names

    # --checkpoint: the older epoch, its own dev score, other probabilities
    out1 = run / "epoch1.csv"
    assert main(["predict", str(run), "--data", str(dev), "--checkpoint", "epoch-1", "--output", str(out1)]) == 0
    said = capsys.readouterr().out
    assert "checkpoints/epoch-1 (step 8)" in said and _fmt_metrics(evals["epoch 1"]) in said
    older = _read(out1)
    assert [r["id"] for r in older] == [r["id"] for r in rows]
    assert [float(r["prob_pos"]) for r in older] != pytest.approx([r["prob_pos"] for r in rows], abs=1e-3)
    # the same checkpoint as a folder path
    assert main(["predict", str(run), "--data", str(dev), "--checkpoint", str(run / "checkpoints" / "epoch-1"),
                 "--output", str(run / "again.csv")]) == 0
    assert _read(run / "again.csv") == older


def test_a_table_without_labels_gets_the_same_predictions_and_no_score(named_run, tmp_path, capsys):
    run, dev = named_run["run"], named_run["dev"]
    gold = [json.loads(line) for line in dev.read_text().splitlines()]
    unlabelled = tmp_path / "new.csv"
    with open(unlabelled, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ID", "review"])
        w.writerows([g["id"], g["review"]] for g in gold)
    assert main(["predict", str(run), "--data", str(dev), "--output", str(tmp_path / "labelled.jsonl")]) == 0
    capsys.readouterr()
    assert main(["predict", str(run), "--data", str(unlabelled), "--output", str(tmp_path / "p.csv")]) == 0
    assert "labelled rows" not in capsys.readouterr().out
    rows, labelled = _read(tmp_path / "p.csv"), _read(tmp_path / "labelled.jsonl")
    assert [r["ID"] for r in rows] == [r["id"] for r in labelled]
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in labelled]
    assert [float(r["prob_pos"]) for r in rows] == [r["prob_pos"] for r in labelled]


def test_rows_without_a_label_are_predicted_and_the_labelled_ones_scored(named_run, tmp_path, capsys):
    """A table with some labels missing was refused: an empty cell ("record 1 has no label ... fill it in or drop the
    record"), a .jsonl record without the key ("unknown column 'sentiment' ... (record 2)"); a .jsonl whose first record
    lacked the key left every label unread. Now every row is predicted and the labelled ones scored, as said."""
    run, dev = named_run["run"], named_run["dev"]
    gold = [json.loads(line) for line in dev.read_text().splitlines()]
    assert main(["predict", str(run), "--data", str(dev), "--output", str(tmp_path / "all.jsonl")]) == 0
    full = _read(tmp_path / "all.jsonl")
    keep = [i for i in range(len(gold)) if i % 3 != 0]  # the first record lacks its label, and every third one
    ids = {"neg": 0, "pos": 1}
    expected = glue_metrics("train", [ids[full[i]["prediction"]] for i in keep],
                            [ids[gold[i]["sentiment"]] for i in keep])

    def unlabelled(i: int, g: dict) -> dict:  # the key left out (the first record so), or a null
        return g if i in keep else {"id": g["id"], "review": g["review"]} if i % 2 == 0 else {**g, "sentiment": None}

    partial_jsonl = tmp_path / "partial.jsonl"
    partial_jsonl.write_text("".join(json.dumps(unlabelled(i, g)) + "\n" for i, g in enumerate(gold)))
    partial_csv = tmp_path / "partial.csv"
    with open(partial_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "review", "sentiment"])
        w.writerows([g["id"], g["review"], g["sentiment"] if i in keep else ""] for i, g in enumerate(gold))
    for given in (partial_jsonl, partial_csv):
        capsys.readouterr()
        out = tmp_path / f"p_{given.suffix[1:]}.jsonl"
        assert main(["predict", str(run), "--data", str(given), "--output", str(out)]) == 0
        said = capsys.readouterr().out
        assert f"labelled rows ({len(keep)} of {len(gold)}, task train): {_fmt_metrics(expected)}" in said
        assert f"{len(gold) - len(keep)} row(s) without a label in column 'sentiment': predicted, not scored" in said
        assert _read(out) == full  # every row, as predicted with all its labels


def test_a_label_column_empty_in_every_row_or_absent_is_said_and_the_rows_predicted(named_run, tmp_path, capsys):
    """A test split whose label column is there but blank in every row printed no score and no word about it (and
    neither did a table without the run's label column, such as one whose column is named otherwise)."""
    run, dev = named_run["run"], named_run["dev"]
    gold = [json.loads(line) for line in dev.read_text().splitlines()]
    assert main(["predict", str(run), "--data", str(dev), "--output", str(tmp_path / "all.jsonl")]) == 0
    blank, renamed = tmp_path / "blank.csv", tmp_path / "renamed.jsonl"
    with open(blank, "w", newline="") as f:
        csv.writer(f).writerows([["id", "review", "sentiment"], *([g["id"], g["review"], ""] for g in gold)])
    renamed.write_text("".join(json.dumps({"id": g["id"], "review": g["review"], "Sentiment": g["sentiment"]}) + "\n"
                               for g in gold))
    for given, note in ((blank, "no score: column 'sentiment' is empty in every row (no label to score against); the "
                                "rows are predicted only"),
                        (renamed, f"no score: {renamed} has no column 'sentiment' (the run's label column); the rows "
                                  "are predicted only")):
        capsys.readouterr()
        out = tmp_path / f"p_{given.stem}.jsonl"
        assert main(["predict", str(run), "--data", str(given), "--output", str(out)]) == 0
        said = capsys.readouterr().out.splitlines()
        assert said[-2:] == [f"20 row(s) of {given} classified into neg, pos: {out}", note]
        assert _read(out) == _read(tmp_path / "all.jsonl")  # every row predicted, as with its labels


def test_an_id_column_missing_from_a_jsonl_record_names_the_record_and_its_line(named_run, tmp_path, capsys):
    """--id-column: it said "unknown column" of a column the other records have. Found by its name (`idx`): the
    record's id was written as null, silently. Both name the record and its line (blank lines are no record)."""
    run = named_run["run"]
    rows = [{"key": "a", "idx": 1, "review": "good film"}, {"key": "b", "idx": 2, "review": "bad film"},
            {"review": "fine film"}, {"key": "d", "idx": 4, "review": "great film"}]
    gap = tmp_path / "gap.jsonl"
    gap.write_text(json.dumps(rows[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in rows[1:]))
    for argv, col, what in ((["--id-column", "key"], "key", "the id column"),
                            ([], "idx", "the id column found by its name")):
        capsys.readouterr()
        assert main(["predict", str(run), "--data", str(gap), "--output", str(tmp_path / "p.csv"), *argv]) == 2
        flag = f"--id-column {col}: " if argv else ""
        assert _error(capsys) == (f"unified-lora: error: {flag}{gap}: record 3 (line 4) has no {col!r}, {what} (its "
                                  f"columns are ['review'], other records have {col!r}); add it or drop the record")
    assert not (tmp_path / "p.csv").exists()


def test_a_label_outside_the_runs_classes_says_how_to_fix_it_for_predict(named_run, tmp_path, capsys):
    """It said "...not one of the classes ['neg', 'pos'] (label_names); add it or fix the data": `label_names` is the
    library's argument, and no class can be added to a trained run."""
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"review": "good", "sentiment": "pos"}) + "\n\n" +
                       json.dumps({"review": "fine", "sentiment": "meh"}) + "\n")
    assert main(["predict", str(named_run["run"]), "--data", str(unknown)]) == 2
    assert _error(capsys) == (f"unified-lora: error: {unknown}: record 2 (line 3) has label 'meh', which is not one of "
                              "the classes ['neg', 'pos'] the run trained on ('sentiment'); fix the label, or leave it "
                              "empty to predict the row without scoring it")


def test_a_glue_run_reads_its_test_tsv_without_labels_and_its_dev_tsv_with_them(wide, tmp_path, capsys):
    task = tmp_path / "SST-2"
    task.mkdir()
    rows = test_cli._rows(48)
    (task / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows[:32]))
    (task / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows[32:]))
    test = task / "test.tsv"
    test.write_text("index\tsentence\n" + "".join(f"{i}\t{t}\n" for i, (t, _) in enumerate(rows[32:])))
    run = tmp_path / "run"
    # thresholds that put the controller in MIRROR at once: the checkpoint's rank is 16, not the layers' initial 8
    assert main(["train", "--model", wide, "--data", str(task), "--steps", "3", "--batch-size", "8",
                 "--max-length", "16", "--theta0", "0.01", "--theta1", "0.02", "--lrs", "3e-2", "3e-2", "3e-2",
                 "--log-every", "0", "--output-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["predict", str(run), "--data", str(test)]) == 0
    said = capsys.readouterr().out
    assert "checkpoints/step-3 (step 3): seq-cls, rank 16 (MIRROR" in said and "labelled rows" not in said
    assert "no score: a GLUE test.tsv has no labels; the rows are predicted only" in said
    pred = _read(run / "predictions.tsv")
    assert [r["index"] for r in pred] == [str(i) for i in range(16)]
    for r in pred:  # the class name, and its value in GLUE's files (what GLUE's server takes)
        assert (r["prediction"], r["glue_label"]) in {("negative", "0"), ("positive", "1")}
        assert set(r) == {"index", "prediction", "glue_label", "prob_negative", "prob_positive"}
    assert main(["predict", str(run), "--data", str(task / "dev.tsv"), "--output", str(tmp_path / "dev.csv")]) == 0
    final = list(_evals(run).values())[-1]
    assert f"labelled rows (16, task sst2): {_fmt_metrics(final)}" in capsys.readouterr().out
    dev = _read(tmp_path / "dev.csv")
    assert [r["prediction"] for r in dev] == [r["prediction"] for r in pred]  # the same sentences
    assert glue_metrics("sst2", [int(r["glue_label"]) for r in dev], [y for _, y in rows[32:]]) == final
    # another task's test.tsv (RTE's: two sentences) is neither layout of SST-2's
    other = tmp_path / "rte_test.tsv"
    other.write_text("index\tsentence1\tsentence2\n0\tgood film\tbad plot\n")
    assert main(["predict", str(run), "--data", str(other)]) == 2
    line = _error(capsys)
    assert "line 2 has label 'good film'" in line and "nor is it a GLUE SST-2 test.tsv: a header row, then index, " \
                                                      "sentence" in line
    # the dev layout with its label column left empty (a test set exported so): a GLUE file's labels are all
    # required, and the error says how to give unlabelled rows (it said "has label ''; expected one of 0 (negative),
    # 1 (positive) (nor is it a GLUE SST-2 test.tsv: ...)")
    blank = tmp_path / "blank.tsv"
    blank.write_text("sentence\tlabel\n" + "".join(f"{t}\t\n" for t, _ in rows[32:36]))
    assert main(["predict", str(run), "--data", str(blank)]) == 2
    assert _error(capsys) == (f"unified-lora: error: {blank}: line 2 has no label (column 2 is empty); every row of a "
                              "GLUE SST-2 train/dev file has one (to predict rows without labels, give them in the "
                              "layout of the GLUE SST-2 test.tsv: a header row, then index, sentence, no label column)")


def _sft_run(models, tmp_path, which: str, steps: int = 16) -> tuple[Path, Path]:
    data = test_cli_sft._jsonl(tmp_path / "train.jsonl", [test_cli_sft.PAIRS[1]] * 16)
    dev = test_cli_sft._jsonl(tmp_path / "dev.jsonl", test_cli_sft.PAIRS)
    run = tmp_path / "run"
    targets = "c_attn" if which == "gpt2" else "q_proj,v_proj"
    head = "lm_head"
    assert main(["train", "--model", models[which], "--data", str(data), "--dev-data", str(dev), "--target-modules",
                 targets, "--modules-to-save", head, "--batch-size", "4", "--max-length", "48", "--steps", str(steps),
                 "--no-controller", "--lrs", "3e-2", "3e-2", "3e-2", "--log-every", "0", "--threads", "1",
                 "--output-dir", str(run)]) == 0
    return run, dev


def _greedy(model, ids: list[int], eos: int, n: int) -> list[int]:
    """Greedy decoding by hand: the whole sequence through the model at every step (no cache, no generate)."""
    import torch

    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax()))
            if out[-1] == eos:
                break
    return out[len(ids):]


def test_a_prompt_completion_run_completes_its_prompts_greedily_and_scores_its_dev_perplexity(models, tmp_path,
                                                                                               capsys):
    """GPT-2's tokenizer adds no special token: the prompt's own tokens go in. The completions are those of greedy
    decoding by hand with the run's exported PEFT adapter on the base model (another path to the same weights)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, dev = _sft_run(models, tmp_path, "gpt2")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("say hi:\n\nwhat is up?\nsay hi:\n")
    capsys.readouterr()
    assert main(["predict", str(run), "--prompts", str(prompts), "--max-new-tokens", "12"]) == 0
    said = capsys.readouterr().out
    assert "3 completion(s)" in said and "1 blank line(s) skipped" in said and "greedy" in said
    assert "is not used" not in said
    rows = _read(run / "predictions.jsonl")
    assert [r["prompt"] for r in rows] == ["say hi:", "what is up?", "say hi:"]
    tok = test_cli_sft._tok(models["gpt2"])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["gpt2"]), run / "peft_adapter").eval()
    for r in rows:
        new = _greedy(peft, tok(r["prompt"], add_special_tokens=False)["input_ids"], tok.eos_token_id, 12)
        stop = "eos" if new[-1] == tok.eos_token_id else "length"
        assert (r["completion"], r["stop"]) == (tok.decode(new[:-1] if stop == "eos" else new), stop)
    assert rows[0]["completion"].startswith(" he")  # (it is learning the one pair it trained on)
    assert rows[0] == rows[2]
    # deterministic, whatever the batch
    assert main(["predict", str(run), "--prompts", str(prompts), "--max-new-tokens", "12", "--batch-size", "1",
                 "--output", str(tmp_path / "again.jsonl")]) == 0
    assert _read(tmp_path / "again.jsonl") == rows
    # a table of prompts: the run's prompt column, its id column; its label column named as not used, as --data's is
    # (it was ignored unsaid)
    table = tmp_path / "prompts.jsonl"
    table.write_text(json.dumps({"id": 7, "prompt": "say hi:", "completion": "ignored", "label": "pos"}) + "\n")
    capsys.readouterr()
    assert main(["predict", str(run), "--prompts", str(table), "--max-new-tokens", "12"]) == 0
    assert _read(run / "predictions.jsonl") == [{"id": 7, **rows[0]}]
    assert (f"--prompts: {table}: column 'label' is not used: a causal LM reads the text ('prompt'), not labels\n"
            in capsys.readouterr().out)
    # the dev loss and perplexity, as train's evaluation gives them
    capsys.readouterr()
    assert main(["predict", str(run), "--data", str(dev)]) == 0
    final = list(_evals(run).values())[-1]
    said = capsys.readouterr().out
    assert f"{dev}: {_fmt_metrics(final)}" in said and "is not used" not in said
    # a labelled table: the same rows and score, and the label column named as not used (it was ignored unsaid)
    labelled = tmp_path / "labelled.csv"
    with open(labelled, "w", newline="") as f:
        csv.writer(f).writerows([["label", "prompt", "completion"],
                                 *(["pos", *json.loads(line).values()] for line in dev.read_text().splitlines())])
    assert main(["predict", str(run), "--data", str(labelled)]) == 0
    said = capsys.readouterr().out
    assert f"--data: {labelled}: column 'label' is not used: a causal LM reads the text ('prompt', 'completion'), " \
           "not labels\n" in said and f"{labelled}: {_fmt_metrics(final)}" in said


def test_a_prompt_is_encoded_as_training_put_it_before_its_completion(models):
    """Llama's tokenizer adds a BOS: training's rows open with it once, then the prompt's own tokens; the prompt given
    to generate is exactly that context (no eos after it), for a prompt/completion run and a text run alike. A corpus
    run (no special tokens in training) gets none."""
    from unified_lora.inference import encode_prompts
    from unified_lora.training import encode_rows

    tok = test_cli_sft._tok(models["llama"])
    pairs = test_cli_sft.PAIRS
    enc = encode_rows(tok, pairs, "causal-lm", 64)
    got = encode_prompts(tok, [p for p, _ in pairs])
    for i, ids in enumerate(got):
        context = enc["input_ids"][i][enc["attention_mask"][i].bool() & (enc["labels"][i] == -100)].tolist()
        assert ids == context and ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert tok.eos_token_id not in ids
    texts = encode_rows(tok, ["say hi: hello"], "causal-lm", 64)["input_ids"][0].tolist()
    assert texts[:len(got[1])] == got[1]  # a text run's row opens the same way
    assert encode_prompts(tok, ["say hi:"], corpus=True) == [tok("say hi:", add_special_tokens=False)["input_ids"]]


def test_a_llama_run_generates_from_the_bos_and_prompt_it_trained_on(models, tmp_path):
    run, _ = _sft_run(models, tmp_path, "llama", steps=32)
    prompts = tmp_path / "p.txt"
    prompts.write_text("say hi:\n")
    assert main(["predict", str(run), "--prompts", str(prompts), "--max-new-tokens", "16"]) == 0
    [row] = _read(run / "predictions.jsonl")
    assert row["stop"] == "eos" and row["completion"].strip() == "hello there"


def test_sampling_is_reproducible_with_its_seed(models, tmp_path):
    run, _ = _sft_run(models, tmp_path, "gpt2", steps=2)
    prompts = tmp_path / "p.txt"
    prompts.write_text("say hi:\nwhat is up?\n")
    outs = []
    for seed, name in ((1, "a"), (1, "b"), (2, "c")):
        out = tmp_path / f"{name}.jsonl"
        assert main(["predict", str(run), "--prompts", str(prompts), "--temperature", "1.5", "--seed", str(seed),
                     "--max-new-tokens", "12", "--output", str(out)]) == 0
        outs.append(_read(out))
    assert outs[0] == outs[1] and outs[0] != outs[2]


# ----------------------------------------------------------------------------- errors


def test_bad_input_is_one_line_naming_what_is_wrong(named_run, tiny, tmp_path, capsys):
    run, dev = named_run["run"], named_run["dev"]
    listing = sorted(p.name for p in run.iterdir())

    def refused(argv: list[str], *expected: str) -> None:
        capsys.readouterr()
        assert main(["predict", *argv]) == 2
        line = _error(capsys)
        for e in expected:
            assert e in line, line

    refused([str(run), "--data", str(tmp_path / "missing.csv")], "--data", "missing.csv: no such file")
    no_text = tmp_path / "no_text.csv"
    no_text.write_text("text,sentiment\nhello,pos\n")
    refused([str(run), "--data", str(no_text)], "unknown column 'review'", "no_text.csv")
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"review": "good", "sentiment": "meh"}) + "\n")
    refused([str(run), "--data", str(unknown)], "label 'meh'", "not one of the classes ['neg', 'pos']")
    refused([str(run), "--data", str(dev), "--output", str(dev)], "is the input file", "dev.jsonl")
    refused([str(run), "--data", str(dev), "--output", str(tmp_path / "p.txt")], "--output", ".csv, .tsv or .jsonl")
    refused([str(run), "--data", str(dev), "--id-column", "nope"], "--id-column nope: unknown column")
    # an id column named like an output column: the output row's own value replaced the ids, silently
    named_ids = tmp_path / "named_ids.csv"
    named_ids.write_text("prediction,review\nA,good\nB,bad\n")
    refused([str(run), "--data", str(named_ids), "--id-column", "prediction"],
            "--id-column prediction: predict writes its own 'prediction' column, which would replace the ids "
            "(its output columns: prediction, prob_neg, prob_pos); rename that column of ", "named_ids.csv")
    refused([str(run), "--data", str(dev), "--checkpoint", "epoch-9"], "--checkpoint epoch-9: no such checkpoint",
            "epoch-1, epoch-2")
    refused([str(run), "--prompts", str(dev)], "classifier (seq-cls) run: pass --data")
    refused([str(run), "--data", str(dev), "--batch-size", "0"], "--batch-size 0: must be >= 1")
    # generation's flags on a classifier were ignored silently
    refused([str(run), "--data", str(dev), "--max-new-tokens", "8", "--seed", "3"],
            "--max-new-tokens, --seed: generation settings, for a causal LM's --prompts", "classifier (seq-cls) run")
    refused([str(tmp_path / "nothing"), "--data", str(dev)], "no such run folder")
    refused([str(run / "checkpoints" / "epoch-1"), "--data", str(dev)], "a checkpoint folder, not a run folder",
            "--checkpoint epoch-1")
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "trace.jsonl").write_text("{}\n")
    refused([str(demo), "--data", str(dev)], "not a `unified-lora train` run", "demo")
    # an adapter-only Trainer checkpoint (the callback's marker beside its weights)
    from unified_lora.callbacks import ADAPTER_ONLY_NAME

    trainer = tmp_path / "trainer_out"
    (trainer / "checkpoint-10").mkdir(parents=True)
    (trainer / "checkpoint-10" / ADAPTER_ONLY_NAME).write_text(json.dumps({"saved_keys": []}))
    refused([str(trainer), "--data", str(dev)], "adapter-only checkpoint of the Trainer callback")
    refused([str(run), "--data", str(dev), "--checkpoint", str(trainer / "checkpoint-10")], "adapter-only")
    # nothing was written into the run, the input is untouched
    assert sorted(p.name for p in run.iterdir()) == listing
    assert not (tmp_path / "p.txt").exists()


def test_a_folder_as_input_is_refused_before_the_checkpoint_loads(tmp_path, capsys):
    """`--data FOLDER` was refused only after the run's checkpoint and base model had loaded (minutes, on a large
    model). It is refused first: here the run's checkpoint is not even one."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step-1").mkdir(parents=True)
    (run / "checkpoints" / "step-1" / "state.pt").write_text("not a checkpoint\n")
    folder = tmp_path / "SST-2"
    folder.mkdir()
    for flag in ("--data", "--prompts"):
        assert main(["predict", str(run), flag, str(folder)]) == 2
        assert _error(capsys) == (f"unified-lora: error: {flag} {folder}: is a folder; pass a file (for a GLUE task "
                                  "folder: its dev.tsv or test.tsv)")


def test_a_causal_lm_run_needs_prompts_or_data(models, tmp_path, capsys):
    run, dev = _sft_run(models, tmp_path, "gpt2", steps=1)
    capsys.readouterr()
    assert main(["predict", str(run)]) == 2
    assert "causal-LM run: pass --prompts FILE" in _error(capsys)
    empty = tmp_path / "p.jsonl"
    empty.write_text(json.dumps({"prompt": ""}) + "\n")
    assert main(["predict", str(run), "--prompts", str(empty)]) == 2  # GPT-2 puts no token before a text
    assert "prompt 1 is empty" in _error(capsys)
    prompts = tmp_path / "p.txt"
    prompts.write_text("say hi:\n")
    assert main(["predict", str(run), "--prompts", str(prompts), "--max-new-tokens", "64"]) == 2
    assert "exceed the model's 64 positions" in _error(capsys)
    assert main(["predict", str(run), "--data", str(dev), "--temperature", "0.7"]) == 2
    assert "--temperature: generation settings, for a causal LM's --prompts; --data is scored" in _error(capsys)
    assert main(["predict", str(run), "--prompts", str(prompts), "--prompt-column", "q"]) == 2
    assert "plain-text file has one prompt a line" in _error(capsys)
    table = tmp_path / "q.jsonl"
    table.write_text(json.dumps({"prompt": "say hi:", "completion": "x"}) + "\n")
    assert main(["predict", str(run), "--prompts", str(table), "--id-column", "completion", "--max-new-tokens",
                 "2"]) == 2
    assert "--id-column completion: predict writes its own 'completion' column" in _error(capsys)
    assert not (run / "predictions.jsonl").exists()
    assert math.isfinite(list(_evals(run).values())[-1]["loss"])


def test_a_prompt_that_fills_the_context_is_said_to_be_too_long(models, tmp_path, capsys):
    """A prompt longer than the model's 64 positions was told to pass a smaller --max-new-tokens, which cannot help:
    it is said to be too long, with its token count and the context. One that a smaller --max-new-tokens lets through
    keeps that advice."""
    run, _ = _sft_run(models, tmp_path, "gpt2", steps=1)
    prompts = tmp_path / "p.txt"
    for prompt, err in (("a" * 70, "prompt 2 is too long: 70 tokens, and the model's context is 64 positions, which "
                                   "leaves no room for a new token; shorten it to at most 63 tokens"),
                        ("a" * 64, "prompt 2 is too long: 64 tokens, and the model's context is 64 positions, which "
                                   "leaves no room for a new token; shorten it to at most 63 tokens"),
                        ("a" * 60, "prompt 2: 60 tokens and --max-new-tokens 8 exceed the model's 64 positions; pass a "
                                   "smaller --max-new-tokens or a shorter prompt")):
        prompts.write_text("say hi:\n" + prompt + "\n")  # (GPT-2's character tokenizer: a token a character)
        capsys.readouterr()
        assert main(["predict", str(run), "--prompts", str(prompts), "--max-new-tokens", "8"]) == 2
        assert _error(capsys) == "unified-lora: error: " + err
    assert not (run / "predictions.jsonl").exists()


def test_a_rope_scaled_context_is_the_limit_of_a_prompt_and_its_new_tokens(models, tmp_path, capsys):
    """The tiny Llama with a linear rope scaling of factor 2 in its config has a context of 128 positions, as `train`
    reads it (it trains on rows up to 128 tokens): a prompt of 72 tokens and 8 new ones were refused for its
    max_position_embeddings, 64."""
    scaled = test_cli_sft.rope_scaled(models, tmp_path / "linear", {"rope_type": "linear", "factor": 2.0})
    run, _ = _sft_run({"llama": scaled}, tmp_path, "llama", steps=1)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a" * 70 + "\n")  # <s>, "▁" and 70 characters
    assert main(["predict", str(run), "--prompts", str(prompts), "--max-new-tokens", "8"]) == 0
    [row] = _read(run / "predictions.jsonl")
    assert row["prompt"] == "a" * 70
    prompts.write_text("a" * 126 + "\n")
    capsys.readouterr()
    assert main(["predict", str(run), "--prompts", str(prompts), "--max-new-tokens", "8"]) == 2
    assert _error(capsys) == ("unified-lora: error: prompt 1 is too long: 128 tokens, and the model's context is 128 "
                              "positions, which leaves no room for a new token; shorten it to at most 127 tokens")


def test_generation_also_stops_at_the_end_of_turn_tokens_of_the_models_generation_config(models, tmp_path):
    """A chat model's generation config lists its end-of-turn token (Llama 3 Instruct's <|eot_id|>), which need not
    be its tokenizer's eos. `generate` used to pass the tokenizer's eos alone, overriding that list, so a completion
    ran on past the end of the turn to --max-new-tokens."""
    from unified_lora.inference import encode_prompts, generate, load_trained

    run, _ = _sft_run(models, tmp_path, "gpt2")
    trained = load_trained(run, device="cpu")
    tok = trained.tokenizer
    [ids] = encode_prompts(tok, ["say hi:"])
    new = _greedy(trained.model.eval(), ids, tok.eos_token_id, 12)  # " hello there" and the eos, as it learned
    assert len(new) >= 3 and tok.eos_token_id not in new[:2]
    stop = new[1]  # as if it were the model's end of turn: the completion ends before its first occurrence
    trained.model.generation_config.eos_token_id = [stop]
    [(text, why)] = generate(trained, [ids], max_new_tokens=12)
    assert (text, why) == (tok.decode(new[:new.index(stop)], skip_special_tokens=True), "eos")
    trained.model.generation_config.eos_token_id = None  # the tokenizer's eos alone: the tokens by hand
    full = tok.decode(new[:-1] if new[-1] == tok.eos_token_id else new, skip_special_tokens=True)
    assert generate(trained, [ids], max_new_tokens=12) == [(full, "eos" if new[-1] == tok.eos_token_id else "length")]
