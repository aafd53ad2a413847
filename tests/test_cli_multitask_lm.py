"""`unified-lora train` on several data sets for a causal LM (multi-task mode): text rows and prompt/completion tables
on test_cli_sft.py's tiny GPT-2 and Llama (character tokenizers with an eos), the per-task losses, dev losses and
their average, grad-accum, resume, and `predict --task` (scoring and generation)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import test_cli_predict
import test_cli_sft
from unified_lora.cli import _fmt_metrics, main
from unified_lora.trace import read_trace

models = test_cli_sft.models  # a tiny GPT-2 and Llama saved with character tokenizers (a module-scoped fixture)
_error = test_cli_predict._error


def _texts(path: Path, rows) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return str(path)


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory) -> dict:
    """Two tasks of text rows of different lengths (up: a..m words, down: n..z words), each with a dev file."""
    root = tmp_path_factory.mktemp("mtlm")
    up = ["abc " * (1 + i % 4) + "def" for i in range(12)]
    down = ["zyx wv" * (1 + i % 3) + "." for i in range(10)]
    return {"up": _texts(root / "up.jsonl", up), "down": _texts(root / "down.jsonl", down),
            "up_dev": _texts(root / "up_dev.jsonl", up[:5]), "down_dev": _texts(root / "down_dev.jsonl", down[:4])}


def _args(model: str, out: Path, data: dict, *extra) -> list[str]:
    return ["train", "--model", model, "--data", data["up"], data["down"], "--dev-data", data["up_dev"],
            data["down_dev"], "--target-modules", "c_attn", "--batch-size", "4", "--max-length", "48", "--lrs",
            "1e-2", "1e-2", "1e-2", "--log-every", "1", "--threads", "1", "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def lm_run(models, lm_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mtlm_run") / "run"
    assert main(_args(models["gpt2"], out, lm_data, "--steps", "6", "--eval-steps", "3", "--save-steps", "3")) == 0
    return out


def test_a_causal_lm_trains_on_several_tables_its_step_and_task_losses_are_over_target_tokens(models, lm_data, lm_run,
                                                                                              capsys):
    """The step's loss is the mean over its target tokens (the model's own loss on the step's rows: step 0 runs the
    base model), each task's `E[task]` its own rows' mean; each task's dev loss and perplexity are what `predict --task
    NAME --data` scores for its dev rows, `average_loss` their mean, ranked lower-is-better."""
    from transformers import AutoModelForCausalLM

    from unified_lora.multitask_train import encode_tasks, load_tasks
    from unified_lora.training import TrainConfig, batches, load_tokenizer, trim_padding

    trace = read_trace(lm_run / "trace.jsonl")
    assert [r["step"] for r in trace] == list(range(6))
    assert all({"E[up]", "E[down]"} <= set(r["components"]) for r in trace)
    cfg = TrainConfig(data={"up": lm_data["up"], "down": lm_data["down"]}, task_type="causal-lm",
                      dev_data={"up": lm_data["up_dev"], "down": lm_data["down_dev"]})
    tok = load_tokenizer(models["gpt2"])
    enc, _ = encode_tasks(tok, load_tasks(cfg, "causal-lm"), 48, "causal-lm")
    first = trim_padding(batches(enc, 4, cfg.seed, 0)[0])
    base = AutoModelForCausalLM.from_pretrained(models["gpt2"]).eval()

    def own_loss(rows) -> float:
        with torch.no_grad():
            return float(base(**{k: first[k][rows] for k in ("input_ids", "attention_mask", "labels")}).loss)

    assert trace[0]["loss"] == pytest.approx(own_loss(slice(None)), rel=1e-5)
    for i, name in enumerate(("up", "down")):
        rows = first["task"] == i
        if bool(rows.any()):  # (the EMA starts at the first loss)
            assert trace[0]["components"][f"E[{name}]"] == pytest.approx(own_loss(rows), rel=1e-5)
    s = json.loads((lm_run / "summary.json").read_text())
    assert s["task_type"] == "causal-lm" and s["majority"] is None and s["classes"] is None
    assert [(t["name"], t["task_type"]) for t in s["tasks"]] == [("up", "causal-lm"), ("down", "causal-lm")]
    evals = s["arms"]["run"]["eval"]
    for e in evals.values():
        assert set(e) >= {"up/loss", "up/perplexity", "down/loss", "down/perplexity", "average_loss"}
        assert e["average_loss"] == pytest.approx((e["up/loss"] + e["down/loss"]) / 2)
        assert e["up/perplexity"] == pytest.approx(math.exp(e["up/loss"]))
    low = min(evals, key=lambda p: evals[p]["average_loss"])
    assert {k: s["best"][k] for k in ("point", "metric", "value", "greater_is_better")} == \
        {"point": low, "metric": "average_loss", "value": evals[low]["average_loss"], "greater_is_better": False}
    final = list(evals.values())[-1]
    capsys.readouterr()
    for name in ("up", "down"):
        assert main(["predict", str(lm_run), "--task", name, "--data", lm_data[f"{name}_dev"]]) == 0
        out = capsys.readouterr().out
        assert f"{lm_data[f'{name}_dev']}: " + _fmt_metrics(
            {"loss": final[f"{name}/loss"], "perplexity": final[f"{name}/perplexity"]}) in out
    assert final["up/loss"] != pytest.approx(final["down/loss"])
    console = (lm_run / "console.txt").read_text()
    assert "text rows ('text'): the loss is on every token and the eos" in console
    assert "each task's loss is its mean over its target tokens" in console
    assert main(["report", str(lm_run)]) == 0
    assert "task up (" in capsys.readouterr().out
    # each task's PEFT adapter gives the run's logits for that task (split: an adapter each)
    assert trace[-1]["mode"] != 0
    from peft import PeftModel

    from unified_lora.inference import load_trained, routed

    tr = load_trained(lm_run, task="down", device="cpu")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["gpt2"]),
                                     str(lm_run / "peft_adapter" / "down")).eval()
    with torch.no_grad(), routed(tr):
        ours = tr.model(input_ids=first["input_ids"]).logits
    with torch.no_grad():
        assert torch.allclose(ours, peft(input_ids=first["input_ids"]).logits, atol=1e-5)
    # the shock (--shock-type random) draws random next tokens where the step's rows have targets, as one data set's
    tr.run.cfg.shock_start, tr.run.cfg.shock_end = 0, 1
    shocked, targets = tr.run._prepared(first, 0)["labels"], first["labels"] != -100
    assert torch.equal(shocked == -100, ~targets)
    assert (shocked[targets] != first["labels"][targets]).float().mean() > 0.5


def test_each_tasks_train_rows_are_the_rows_it_trains_on(models, lm_data, tmp_path, capsys):
    """Encoding leaves out rows with nothing to predict (a single token, with --no-text-eos) and empty ones: the
    console's line per task and summary.json's `train_rows` counted the rows read (9, of which 6 are trained on),
    and the empty rows were left out without a word."""
    short = _texts(tmp_path / "short.jsonl", ["abc def"] * 6 + ["a", "z", ""])
    out = tmp_path / "run"
    assert main(["train", "--model", models["gpt2"], "--data", lm_data["up"], short, "--dev-data", lm_data["up_dev"],
                 lm_data["down_dev"], "--no-text-eos", "--target-modules", "c_attn", "--batch-size", "4",
                 "--max-length", "48", "--steps", "1", "--log-every", "0", "--threads", "1", "--output-dir",
                 str(out)]) == 0
    said = capsys.readouterr().out
    assert "task short train data: 1 of 9 text rows are empty and left out\n" in said
    assert ("task short train data: 2 of 8 text rows have no token to predict within max_length 48 (a single token) "
            "and are left out\n") in said
    assert f"task short: {short} (dev {lm_data['down_dev']}), 6 train (of its 9: 3 left out, as said above) / 4 dev " \
           "rows, " in said
    assert f"task up: {lm_data['up']} (dev {lm_data['up_dev']}), 12 train / 5 dev rows, " in said
    assert " on up, short: 18 train / 9 dev " in said
    assert [t["train_rows"] for t in json.loads((out / "summary.json").read_text())["tasks"]] == [12, 6]


def test_a_causal_lms_tasks_are_read_on_the_scale_of_their_first_steps_unless_given_one(models, lm_data, lm_run,
                                                                                         tmp_path, capsys):
    """The multi-task signal's E term reads the tasks' loss level: on the default scale of 1 a causal LM's (2.6 nats:
    E = 0.72) alone nearly filled θ0 = 0.3, and a tiny GPT-2 on two halves of one corpus, with no conflict (C = 0),
    stayed split in MULTI for all of its 100 steps. As one data set's run, a causal LM's several data sets given
    neither --loss-scale nor --calibration-steps calibrate on the first 20 steps (E held at 1/3 until then), say so
    and record it; --calibration-steps (it was refused: "the multi-task signal has no calibration") sets the steps,
    and a resume goes on with the calibrated scale; --loss-scale keeps the scale given."""
    from unified_lora.cli import LM_CALIBRATION_STEPS

    config = json.loads((lm_run / "summary.json").read_text())["config"]
    assert config["calibration_steps"] == LM_CALIBRATION_STEPS == 20 and config["loss_scale"] == 1.0
    assert ("multi-task signal: the tasks' loss level (its E term) is read on the scale of the first 20 steps' loss "
            "(E held at 0.333 until then; --calibration-steps 20)") in (lm_run / "console.txt").read_text()
    assert all(r["components"]["E"] == pytest.approx(1 / 3) and r["components"]["calibrating"]
               for r in read_trace(lm_run / "trace.jsonl"))  # (6 steps)

    def d(comps) -> float:  # E: the mean over the tasks of E_t / (1 + E_t)
        return sum(comps[k] / (1 + comps[k]) for k in ("E[up]", "E[down]")) / 2

    out = tmp_path / "cal"
    assert main(_args(models["gpt2"], out, lm_data, "--steps", "6", "--calibration-steps", "3", "--save-steps",
                      "4")) == 0
    assert "read on the scale" not in capsys.readouterr().out  # (the user's own setting)
    trace = read_trace(out / "trace.jsonl")
    scale = sum(r["loss"] for r in trace[:3]) / 3 / 0.5
    assert [r["components"]["calibrating"] for r in trace] == [True] * 3 + [False] * 3
    assert all(r["components"]["E"] == pytest.approx(1 / 3) for r in trace[:3])
    assert all(r["components"]["loss_scale"] == pytest.approx(scale) for r in trace[2:])
    assert all(r["components"]["E"] == pytest.approx(d(r["components"])) for r in trace[3:])
    assert 0.15 < trace[3]["components"]["E"] < 0.5  # about 1/3, where the loss level gave 0.7 or more
    for p in ("checkpoints/epoch-1", "summary.json", "peft_adapter"):  # resumed from step-4, after the calibration
        shutil.rmtree(out / p) if (out / p).is_dir() else (out / p).unlink()
    shutil.copyfile(out / "trace.jsonl", tmp_path / "trace.jsonl")
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    assert read_trace(out / "trace.jsonl") == read_trace(tmp_path / "trace.jsonl")

    assert main(_args(models["gpt2"], tmp_path / "given", lm_data, "--steps", "2", "--loss-scale", "1")) == 0
    assert "read on the scale" not in capsys.readouterr().out
    assert json.loads((tmp_path / "given" / "summary.json").read_text())["config"]["calibration_steps"] == 0
    trace = read_trace(tmp_path / "given" / "trace.jsonl")
    assert all(r["components"]["E"] == pytest.approx(d(r["components"])) and "calibrating" not in r["components"]
               for r in trace)
    assert min(r["components"]["E"] for r in trace) > 0.7


def test_a_resumed_causal_lm_run_ends_bit_for_bit_where_the_uninterrupted_one_ends(lm_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(lm_run, copy)
    for p in ("checkpoints/epoch-1", "summary.json", "peft_adapter"):  # (22 rows: 6 steps of 4, an epoch)
        shutil.rmtree(copy / p) if (copy / p).is_dir() else (copy / p).unlink()
    assert main(["train", "--output-dir", str(copy), "--resume"]) == 0
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "checkpoints" / "epoch-1" / "adapter_blocks.safetensors")) for d in (lm_run, copy))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_trace(copy / "trace.jsonl") == read_trace(lm_run / "trace.jsonl")
    evals = [json.loads((d / "summary.json").read_text())["arms"]["run"]["eval"] for d in (lm_run, copy)]
    assert evals[0] == evals[1]


def test_grad_accum_on_rows_of_different_lengths_steps_as_one_big_batch(models, lm_data, tmp_path):
    """Each micro-batch weighted by its target tokens: the step's loss, each task's and the weights are those of one
    batch of all the rows (to float rounding: Adam's first steps divide by the gradients' size)."""
    runs = {}
    for name, extra in (("big", ("--batch-size", "8")), ("accum", ("--batch-size", "4", "--grad-accum", "2"))):
        runs[name] = tmp_path / name
        assert main([*_args(models["gpt2"], runs[name], lm_data, "--steps", "2", "--theta0", "0.9", "--theta1",
                            "0.95"), *extra]) == 0
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "checkpoints" / "step-2" / "adapter_blocks.safetensors")) for d in runs.values())
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) if a[k].is_floating_point() else torch.equal(a[k], b[k])
               for k in a)
    ta, tb = (read_trace(d / "trace.jsonl") for d in runs.values())
    assert len(ta) == len(tb) == 2
    for ra, rb in zip(ta, tb):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)
        for k in ("E[up]", "E[down]"):  # the per-task losses of the step, from both micro-batches
            assert ra["components"][k] == pytest.approx(rb["components"][k], rel=1e-6)


def test_predict_task_prompts_generates_with_that_tasks_adapter(models, tmp_path, capsys):
    """Prompt/completion tables on a tiny Llama, the same prompts and each task its own completion, an adapter per
    task from the start (--no-controller): `predict --task NAME --prompts` completes a prompt as that task learnt."""
    prompts = ["what is up?", "say hi:"]
    data = {name: str(test_cli_sft._jsonl(tmp_path / f"{name}.jsonl", [(p, c) for p in prompts] * 4))
            for name, c in (("ab", " abab"), ("xy", " xyxy"))}
    out = tmp_path / "run"
    assert main(["train", "--model", models["llama"], "--data", data["ab"], data["xy"], "--target-modules",
                 "q_proj,v_proj,o_proj", "--batch-size", "8", "--max-length", "48", "--steps", "40", "--no-controller",
                 "--lrs", "5e-2", "5e-2", "5e-2", "--log-every", "0", "--threads", "1", "--output-dir", str(out)]) == 0
    assert "prompt/completion rows ('prompt', 'completion')" in capsys.readouterr().out
    (tmp_path / "prompts.txt").write_text(prompts[0] + "\n")
    got = {}
    for name in data:
        assert main(["predict", str(out), "--task", name, "--prompts", str(tmp_path / "prompts.txt"),
                     "--max-new-tokens", "6"]) == 0
        got[name] = json.loads((out / f"predictions-{name}.jsonl").read_text())["completion"]  # (a file per task)
    # (a few steps: each task's letters, not yet its whole completion)
    assert got["ab"] != got["xy"] and set(got["ab"]) <= set(" ab") and set(got["xy"]) <= set(" xy"), got
    assert main(["predict", str(out), "--prompts", str(tmp_path / "prompts.txt")]) == 2
    assert "is a multi-task run (tasks ab, xy): pass --task NAME" in _error(capsys)


def test_what_several_data_sets_for_a_causal_lm_refuse_is_one_line(models, lm_data, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("abc def\n" * 40)
    chat = tmp_path / "chat.jsonl"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    chat.write_text("".join(json.dumps({"messages": turns}) + "\n" for _ in range(8)))
    pairs = str(test_cli_sft._jsonl(tmp_path / "pairs.jsonl", test_cli_sft.PAIRS))
    base = ["train", "--model", models["gpt2"], "--target-modules", "c_attn", "--output-dir", str(tmp_path / "r")]
    for data, says in ((str(corpus), f"--data {corpus}: a plain-text corpus; several data sets for a causal LM are "
                                     "tables"),
                       (str(chat), f"--data {chat}: chat data; several data sets for a causal LM are tables"),
                       (pairs, "--data: the tasks' tables are read in different layouts (up: ['text'], pairs: "
                               "['prompt', 'completion'])")):
        assert main([*base, "--data", lm_data["up"], data]) == 2
        assert says in _error(capsys)


def test_two_processes_train_a_causal_lms_tasks_to_the_weights_and_task_losses_of_one(models, lm_data, tmp_path):
    """Under torchrun (2 processes, gloo) with --batch-size 4 against one process with --batch-size 8: a process's
    share of a global batch holds other rows, of other lengths, than the other's; each task's loss is weighted by its
    target tokens over both processes, so the step's loss, each task's (`E[task]`), the weights and the sharded dev
    losses are those of one process."""
    from test_cli_ddp import _torchrun

    one, two = tmp_path / "one", tmp_path / "two"
    common = ("--steps", "3", "--eval-steps", "2")
    assert main([*_args(models["gpt2"], one, lm_data, *common), "--batch-size", "8"]) == 0
    p = _torchrun(*_args(models["gpt2"], two, lm_data, *common), "--batch-size", "4")
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = read_trace(one / "trace.jsonl"), read_trace(two / "trace.jsonl")
    assert [r["step"] for r in b] == [0, 1, 2] and [r["mode"] for r in b] == [r["mode"] for r in a]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
        for k in ("E[up]", "E[down]"):
            assert rb["components"][k] == pytest.approx(ra["components"][k], rel=1e-5)
    from safetensors.torch import load_file

    wa, wb = (load_file(str(d / "checkpoints" / "epoch-1" / "adapter_blocks.safetensors")) for d in (one, two))
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-5) for k in wa if wa[k].is_floating_point())
    ea, eb = (json.loads((d / "summary.json").read_text())["arms"]["run"]["eval"] for d in (one, two))
    assert ea.keys() == eb.keys()
    for point, m in ea.items():
        assert eb[point] == pytest.approx(m, rel=1e-5), point


def test_a_rotary_model_is_refused_rows_past_its_context_in_multi_task_mode_too(models, tmp_path, capsys):
    """The tiny Llama (rotary, max_position_embeddings 64) on two tables, one of rows longer than 64 tokens: refused
    as a one-task run refuses them, before training (it trained on positions past its context without a word)."""
    long = _texts(tmp_path / "long.jsonl", ["abc def " * 12] * 10)  # <s>, "▁" and the 96 characters, </s>
    short = _texts(tmp_path / "short.jsonl", ["abc"] * 10)
    out = tmp_path / "run"
    assert main(["train", "--model", models["llama"], "--data", long, short, "--target-modules", "q_proj,v_proj",
                 "--batch-size", "4", "--max-length", "128", "--steps", "1", "--log-every", "0", "--threads", "1",
                 "--output-dir", str(out)]) == 2
    assert _error(capsys) == (
        "unified-lora: error: --max-length 128: the data's longest row is 99 tokens, past the model's context of 64 "
        "positions (max_position_embeddings 64); its rotary positions run on past it without an error, on positions "
        "it was never trained on; pass --max-length 64 or less")
    assert not (out / "trace.jsonl").exists()
