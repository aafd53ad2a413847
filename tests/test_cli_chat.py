"""`unified-lora train` / `predict` on chat data (a `messages` column of role/content lists, TRL's conversational
format): each row rendered with the tokenizer's chat template, the loss on the whole conversation or, with
`--assistant-only-loss`, on the assistant turns. test_cli_sft.py's tiny GPT-2 and Llama with a small template that
marks the assistant turns with `{% generation %}`, so transformers' own `assistant_masks` (what TRL's
`assistant_only_loss` trains on) is the independent reference for the labels."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import test_cli_sft
from unified_lora.cli import main
from unified_lora.trace import read_trace

models = test_cli_sft.models  # (a module-scoped fixture: the tiny GPT-2 and Llama folders, no chat template)

# an assistant turn is "a:" (the generation prompt), then " content" and the eos; other turns "u: content."
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}a:{% generation %} {{ m['content'] }}"
            "{{ eos_token }}{% endgeneration %}{% else %}{{ m['role'][0] }}: {{ m['content'] }}.{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}a:{% endif %}")


def _m(role: str, content: str) -> dict:
    return {"role": role, "content": content}


CONVS = [[_m("user", "hi there"), _m("assistant", "hello")],
         [_m("system", "be brief"), _m("user", "why"), _m("assistant", "because"), _m("user", "ok?"),
          _m("assistant", "yes")],
         [_m("user", "name a fruit"), _m("assistant", "apple")],
         [_m("user", "color of grass?"), _m("assistant", "green"), _m("user", "sky?"), _m("assistant", "blue")]]


@pytest.fixture(scope="module")
def chat_models(models, tmp_path_factory) -> dict:
    """test_cli_sft's two models, their tokenizers given TEMPLATE."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("chat")
    out = {}
    for name, path in models.items():
        shutil.copytree(path, root / name)
        tok = AutoTokenizer.from_pretrained(path)
        tok.chat_template = TEMPLATE
        tok.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _reference(tok, messages) -> tuple[list[int], list[int]]:
    """transformers' own rendering of a conversation and its assistant mask (the `{% generation %}` spans)."""
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_chat_labels_are_the_whole_rendering_the_assistant_turns_or_the_completion_token_by_token(chat_models, which,
                                                                                                  tmp_path):
    from unified_lora.training import _load_texts, encode_rows, load_tokenizer

    tok = load_tokenizer(chat_models[which])
    rows, columns = _load_texts(_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVS]), ["text"],
                                detect=True)
    assert columns == ["messages"]
    for assistant_only in (False, True):
        enc = encode_rows(tok, rows, "causal-lm", 64, assistant_only=assistant_only)
        for i, conv in enumerate(CONVS):
            ids, mask = _reference(tok, conv)
            n = int(enc["attention_mask"][i].sum())
            assert n == len(ids) and enc["input_ids"][i, :n].tolist() == ids  # as apply_chat_template renders it
            want = [t if (m or not assistant_only) else -100 for t, m in zip(ids, mask)]
            assert enc["labels"][i].tolist() == want + [-100] * (enc["labels"].shape[1] - n)
    said = []  # cut at max_length: the start kept; a row with no assistant token left is left out
    enc = encode_rows(tok, rows, "causal-lm", 20, assistant_only=True, note=said.append)
    assert said == ["2 of 4 chat rows have no assistant token within max_length 20 (the messages before it fill it) "
                    "and are left out", "2 of 4 chat rows are longer than max_length 20 and cut at its end: the rest "
                    "of their conversation is not trained on"]
    assert enc["input_ids"][0].tolist() == _reference(tok, CONVS[0])[0][:20]
    # conversational prompt/completion (TRL's layout): the completion's tokens after the prompt's generation prompt
    pairs = [{"prompt": c[:-1], "completion": c[-1:]} for c in CONVS]
    rows, _ = _load_texts(_jsonl(tmp_path / "pairs.jsonl", pairs), ["text"], detect=True)
    enc = encode_rows(tok, rows, "causal-lm", 64)
    for i, conv in enumerate(CONVS):
        ids, mask = _reference(tok, conv)
        last = max(j for j, m in enumerate(mask) if not m) + 1  # the last assistant turn's span
        assert enc["labels"][i, :len(ids)].tolist() == [-100] * last + ids[last:]
        assert tok.apply_chat_template(conv[:-1], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] == ids[:last]


def test_a_template_whose_renderings_do_not_nest_is_refused_for_assistant_only_loss(chat_models, tmp_path):
    """A template that drops an earlier assistant turn's content once more turns follow (as reasoning templates drop
    earlier thoughts): the tokens of the first assistant turn cannot be found, so --assistant-only-loss is a
    DataError naming the row and the template; the whole conversation still trains."""
    from unified_lora.data import DataError
    from unified_lora.training import _load_texts, encode_rows, load_tokenizer

    tok = load_tokenizer(chat_models["gpt2"])
    tok.chat_template = TEMPLATE.replace("a:{% generation %} {{ m['content'] }}",
                                         "a:{% generation %}{% if loop.last %} {{ m['content'] }}{% endif %}")
    rows, _ = _load_texts(_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVS]), ["messages"])
    with pytest.raises(DataError, match=rf"^{tmp_path / 'chat.jsonl'}: record 2 \(line 2\): the tokenizer's chat "
                                        r"template renders the first 3 message\(s\) as other tokens than the start "
                                        r"of the whole conversation \(the renderings do not nest\), so the "
                                        r"assistant's turn cannot be told apart; train on the whole conversation"):
        encode_rows(tok, rows, "causal-lm", 64, assistant_only=True)
    assert len(encode_rows(tok, rows, "causal-lm", 64)["labels"]) == 4


def test_malformed_chat_rows_are_one_line_errors_naming_the_record_and_its_line(chat_models, tmp_path):
    """Each error names the record and the line of the file it is on (blank lines counted as lines, as an editor
    counts them): it named the record alone, which a file with blank lines put on another line."""
    from unified_lora.data import DataError
    from unified_lora.training import _load_texts

    good = {"messages": CONVS[0]}
    for bad, problem in (
            ({"messages": "hi"}, "column 'messages' holds a str, not a list of messages"),
            ({"messages": []}, "column 'messages' is an empty conversation (no message)"),
            ({"messages": [_m("user", "hi"), _m("robot", "beep")]},
             "column 'messages': message 2 has the role 'robot', not one of ['system', 'developer', 'user', "
             "'assistant', 'tool']"),
            ({"messages": [{"role": "user", "text": "hi"}]},
             "column 'messages': message 1 is {'role': 'user', 'text': 'hi'}, not a {\"role\": ..., \"content\": ...} "
             "object"),
            ({"messages": [{"role": "user", "content": [{"type": "image"}]}]},
             "column 'messages': message 1 has a list as its content, not a string")):
        path = tmp_path / "bad.jsonl"
        path.write_text(f"{json.dumps(good)}\n\n{json.dumps(good)}\n  \n{json.dumps(bad)}\n")  # two blank lines
        with pytest.raises(DataError) as e:
            _load_texts(path, ["text"], detect=True)
        assert str(e.value).startswith(f"{path}: record 3 (line 5): {problem}") and "\n" not in str(e.value)
    csv = tmp_path / "chat.csv"
    csv.write_text('messages\n"[{""role"": ""user"", ""content"": ""hi""}]"\n')
    with pytest.raises(DataError, match=r"column 'messages' looks like chat data, which a \.csv cell cannot hold"):
        _load_texts(csv, ["text"], detect=True)


def test_the_cli_refuses_chat_data_without_a_template_and_assistant_only_loss_without_chat(models, chat_models, tmp_path,
                                                                                           capsys):
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVS * 2])
    args = ["--target-modules", "c_attn", "--steps", "1", "--batch-size", "4", "--log-every", "0"]
    assert main(["train", "--model", models["gpt2"], "--data", str(chat), "--output-dir", str(tmp_path / "a"),
                 *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unified-lora: error: the model's tokenizer has no chat template, which chat data")
    assert err.count("\n") == 1 and not (tmp_path / "a").exists()
    text = _jsonl(tmp_path / "text.jsonl", [{"text": "a b c d"}] * 8)
    assert main(["train", "--model", chat_models["gpt2"], "--data", str(text), "--output-dir", str(tmp_path / "b"),
                 "--assistant-only-loss", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unified-lora: error: --assistant-only-loss: for chat data") and err.count("\n") == 1
    flat = _jsonl(tmp_path / "flat.jsonl", [{"messages": "u: hi.a: hello"}] * 2)  # a text, not a conversation
    assert main(["train", "--model", chat_models["gpt2"], "--data", str(chat), "--dev-data", str(flat),
                 "--output-dir", str(tmp_path / "b"), *args]) == 2
    assert (f"unified-lora: error: --dev-data {flat}: its column(s) ['messages'] hold text data, and --data's chat "
            "data") in capsys.readouterr().err
    no_reply = _jsonl(tmp_path / "no_reply.jsonl", [{"messages": c} for c in CONVS * 2] + [{"messages": [
        _m("user", "hello?")]}])
    assert main(["train", "--model", chat_models["gpt2"], "--data", str(no_reply), "--dev-data", str(chat),
                 "--output-dir", str(tmp_path / "c"), "--assistant-only-loss", *args]) == 2
    assert (f"unified-lora: error: {no_reply}: record 9 (line 9) has no assistant message: with "
            "--assistant-only-loss it has nothing to train on") in capsys.readouterr().err


def test_a_chat_run_trains_evaluates_on_the_assistant_tokens_resumes_and_predicts_from_the_template(
        chat_models, tmp_path, capsys):
    """`train` finds the `messages` column, trains with --assistant-only-loss, and its dev loss is the mean
    cross-entropy of the dev conversations' assistant tokens (transformers' assistant mask), recomputed here from
    the exported adapter; `predict --data` scores the dev file the same; a resume goes on (and refuses to drop the
    flag); `predict --prompts` renders a `messages` prompt with the generation prompt."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from unified_lora.inference import encode_prompts
    from unified_lora.training import load_tokenizer

    data = _jsonl(tmp_path / "train.jsonl", [{"messages": c} for c in CONVS * 4])
    dev = _jsonl(tmp_path / "dev.jsonl", [{"messages": c} for c in CONVS])
    out = tmp_path / "run"
    common = ["--target-modules", "c_attn", "--batch-size", "4", "--log-every", "0", "--threads", "1",
              "--output-dir", str(out)]
    assert main(["train", "--model", chat_models["gpt2"], "--data", str(data), "--dev-data", str(dev), "--steps", "2",
                 "--assistant-only-loss", "--save-steps", "1", *common]) == 0
    console = capsys.readouterr().out
    assert f"--data {data}: no 'text' column but 'messages': trained as chat data" in console
    assert ("chat rows ('messages'), rendered with the tokenizer's chat template: the loss is on the assistant turns "
            "only (--assistant-only-loss)") in console
    assert (out / "checkpoints" / "step-2" / "state.pt").is_file()
    st = torch.load(out / "checkpoints" / "step-2" / "state.pt", weights_only=True)
    assert st["config"]["text_columns"] == ["messages"] and st["config"]["assistant_only_loss"] is True
    assert st["chat"] is True  # recorded: `predict` sends a text prompt as a user message

    tok = load_tokenizer(chat_models["gpt2"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chat_models["gpt2"]), out / "peft_adapter")
    total, count = 0.0, 0
    with torch.no_grad():
        for conv in CONVS:
            ids, mask = _reference(tok, conv)
            nll = torch.nn.functional.cross_entropy(model(input_ids=torch.tensor([ids])).logits[0, :-1],
                                                    torch.tensor(ids[1:]), reduction="none")
            keep = torch.tensor(mask[1:], dtype=torch.bool)
            total, count = total + float(nll[keep].sum()), count + int(keep.sum())
    final = list(json.loads((out / "summary.json").read_text())["arms"]["run"]["eval"].values())[-1]
    assert final["loss"] == pytest.approx(total / count, rel=1e-4)
    assert main(["predict", str(out), "--data", str(dev)]) == 0
    assert f"loss={final['loss']:.3f}" in capsys.readouterr().out

    # resumed from step-1: steps 1 and 2 again, and on to 3; the layout (the flag) cannot change
    shutil.rmtree(out / "checkpoints" / "step-2")
    off = tmp_path / "off.yaml"
    off.write_text("assistant_only_loss: false\n")
    assert main(["train", "--output-dir", str(out), "--resume", "--config", str(off)]) == 2
    assert "the run was trained with assistant_only_loss=True (now False)" in capsys.readouterr().err
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "3"]) == 0
    assert [r["step"] for r in read_trace(out / "trace.jsonl")] == [0, 1, 2]
    capsys.readouterr()

    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"id": 7, "messages": CONVS[1][:-1]}])
    assert main(["predict", str(out), "--prompts", str(prompts), "--max-new-tokens", "3"]) == 0
    # TEMPLATE ends a turn with the eos: nothing is added to the stops (the line said generation "also" stopped there)
    assert ("chat prompts: rendered with the tokenizer's chat template and the generation prompt; the template's end "
            "of turn <|endoftext|> is the tokenizer's eos, where generation stops for any prompt"
            ) in capsys.readouterr().out
    row = json.loads((out / "predictions.jsonl").read_text())
    assert row["id"] == 7 and row["prompt"] == CONVS[1][:-1] and row["stop"] in ("eos", "length")
    rendered = tok.apply_chat_template(CONVS[1][:-1], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"]
    assert encode_prompts(tok, [tuple(CONVS[1][:-1]), "u: hi"]) == [rendered, tok("u: hi")["input_ids"]]
    assert tok.decode(rendered).endswith(".a:")
    assert math.isfinite(final["perplexity"])


# ----------------------------------------------------------------------------- a ChatML-style template

# ChatML's layout: the end of a turn is <|im_end|>, an added special token that is not the eos (<|endoftext|>) and that
# the model's generation config does not list, as for a base model fine-tuned into chat; a space follows it
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}:{{ m['content'] }}<|im_end|> {% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant:{% endif %}")


@pytest.fixture(scope="module")
def chatml_run(models, tmp_path_factory) -> dict:
    """The tiny GPT-2, its tokenizer given <|im_start|> and <|im_end|> (ids 32 and 33, within the model's 64
    embeddings) and CHATML, trained 2 steps on CONVS in a column named "dialog" (--text-columns: a name that does
    not say the run is chat)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("chatml")
    shutil.copytree(models["gpt2"], root / "model")
    tok = AutoTokenizer.from_pretrained(models["gpt2"])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(root / "model")
    data = _jsonl(root / "train.jsonl", [{"dialog": c} for c in CONVS * 2])
    run = root / "run"
    assert main(["train", "--model", str(root / "model"), "--data", str(data), "--text-columns", "dialog", "--steps",
                 "2", "--target-modules", "c_attn", "--batch-size", "4", "--log-every", "0", "--threads", "1",
                 "--output-dir", str(run)]) == 0
    return {"model": str(root / "model"), "run": run}


def test_the_end_of_turn_is_read_off_the_chat_template(chatml_run):
    """The first token the template writes after an assistant message's content, whitespace skipped, where it is a
    special or added token; nothing where the template writes nothing or plain text there, has no template, or
    fails. `stop_tokens` adds it for chat prompts only."""
    from transformers import AutoModelForCausalLM

    from unified_lora.inference import end_of_turn, stop_tokens
    from unified_lora.training import load_tokenizer

    tok = load_tokenizer(chatml_run["model"])
    im_end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id
    assert im_end != eos and end_of_turn(tok) == [im_end]
    for template, want in ((CHATML.replace("}}<|im_end|> ", "}} <|im_end|>\n"), [im_end]),  # whitespace around it
                           (TEMPLATE, [eos]),  # the eos itself
                           ("{% for m in messages %}{{ m['content'] }}{% endfor %}", []),  # nothing after it
                           ("{% for m in messages %}{{ m['content'] }}. {% endfor %}", []),  # plain text
                           ("{{ raise_exception('roles must alternate') }}", []),  # the template fails
                           (None, [])):  # no template
        tok.chat_template = template
        assert end_of_turn(tok) == want, template
    # whitespace that the tokenizer lists among its added tokens (as Gemma's and Phi-2's do) is skipped too: it was
    # taken for the end of turn, and generation stopped at the first newline
    tok.add_tokens(["\n"])
    assert tok.decode(tok("\n", add_special_tokens=False)["input_ids"]) == "\n"
    tok.chat_template = CHATML.replace("}}<|im_end|> ", "}}\n<|im_end|>\n")
    assert end_of_turn(tok) == [im_end]
    tok.chat_template = CHATML
    model = AutoModelForCausalLM.from_pretrained(chatml_run["model"])
    plain = stop_tokens(model, tok)  # the eos, and the generation config's
    assert plain[0] == eos and im_end not in plain and stop_tokens(model, tok, chat=True) == [*plain, im_end]


def test_the_end_of_turn_of_a_template_that_requires_a_system_message(chatml_run):
    """A template that raises unless the conversation opens with a system message: the probe is rendered again after
    one, and the end of turn is read off that (it used to be none, and generation ran on past the turn). A template
    that fails either way still gives none."""
    from unified_lora.inference import end_of_turn
    from unified_lora.training import load_tokenizer

    tok = load_tokenizer(chatml_run["model"])
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('System message required') }}"
                         "{% endif %}" + CHATML)
    assert end_of_turn(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    tok.chat_template = "{{ raise_exception('System message required') }}" + CHATML
    assert end_of_turn(tok) == []


def test_a_chat_run_stops_at_the_templates_end_of_turn(chatml_run):
    """The model made to emit <|im_end|> as its third new token: the completion is the two tokens before it, stop
    "eos". Without the template's end of turn it ran on to --max-new-tokens (stop "length")."""
    import torch

    from unified_lora.inference import encode_prompts, generate, load_trained

    trained = load_trained(chatml_run["run"], device="cpu")
    st = torch.load(trained.checkpoint / "state.pt", weights_only=True)
    assert trained.chat and st["chat"] is True and st["config"]["text_columns"] == ["dialog"]
    tok, model = trained.tokenizer, trained.model.eval()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    [ids] = encode_prompts(tok, [tuple(CONVS[0][:1])])
    first = []
    with torch.no_grad():  # the first two greedy tokens, by hand
        for _ in range(2):
            first.append(int(model(input_ids=torch.tensor([ids + first])).logits[0, -1].argmax()))
    assert not {tok.eos_token_id, im_end} & set(first)
    calls = []

    def force(module, inputs, logits):  # from the third new token on, <|im_end|> wins
        calls.append(1)
        if len(calls) >= 3:
            logits[:, -1, im_end] += 1e4
        return logits

    hook = model.get_output_embeddings().register_forward_hook(force)
    try:
        assert generate(trained, [ids], max_new_tokens=8) == [(tok.decode(first, skip_special_tokens=True), "eos")]
    finally:
        hook.remove()


def test_a_chat_runs_text_prompts_are_sent_as_user_messages(chatml_run, tmp_path, capsys):
    """A .txt line (or a table's text column) given to a chat run's `predict` is one user message rendered with the
    template and the generation prompt, as a conversational prompt; a run saved before checkpoints recorded chat
    (no "chat" key) sends the line as it is, as before, and a conversation to it still stops at <|im_end|>."""
    import torch

    from unified_lora.inference import encode_prompts, generate, load_trained
    from unified_lora.training import render_chat

    run = chatml_run["run"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi there\n\nname a fruit\n")
    capsys.readouterr()
    assert main(["predict", str(run), "--prompts", str(prompts), "--max-new-tokens", "6",
                 "--output", str(tmp_path / "p.jsonl")]) == 0
    assert ("chat prompts: a chat run: a text prompt is sent as a user message, rendered with the tokenizer's chat "
            "template and the generation prompt; generation also stops at the template's end of turn <|im_end|>"
            ) in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    trained = load_trained(run, device="cpu")
    tok = trained.tokenizer
    lines = ["hi there", "name a fruit"]
    rendered = [render_chat(tok, [_m("user", t)], "test", generation=True) for t in lines]
    assert encode_prompts(tok, lines, chat=True) == rendered
    want = generate(trained, rendered, max_new_tokens=6)
    assert [(r["prompt"], r["completion"], r["stop"]) for r in rows] == [(t, *w) for t, w in zip(lines, want)]
    raw = generate(trained, encode_prompts(tok, lines), max_new_tokens=6, chat=False)
    assert raw != want  # (the raw lines complete otherwise)
    table = _jsonl(tmp_path / "p_table.jsonl", [{"id": i, "dialog": t} for i, t in enumerate(lines)])
    assert main(["predict", str(run), "--prompts", str(table), "--max-new-tokens", "6",
                 "--output", str(tmp_path / "t.jsonl")]) == 0
    assert [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()] == [
        {"id": i, **r} for i, r in enumerate(rows)]

    old = tmp_path / "old_run"  # a run saved before checkpoints recorded "chat"
    shutil.copytree(run, old)
    state = next((old / "checkpoints").iterdir()) / "state.pt"
    st = torch.load(state, weights_only=True)
    del st["chat"]
    torch.save(st, state)
    capsys.readouterr()
    assert main(["predict", str(old), "--prompts", str(prompts), "--max-new-tokens", "6",
                 "--output", str(tmp_path / "old.jsonl")]) == 0
    assert "chat prompts" not in capsys.readouterr().out
    assert [(r["completion"], r["stop"]) for r in
            map(json.loads, (tmp_path / "old.jsonl").read_text().splitlines())] == raw
    conv = _jsonl(tmp_path / "conv.jsonl", [{"dialog": [_m("user", t)]} for t in lines])
    assert main(["predict", str(old), "--prompts", str(conv), "--max-new-tokens", "6",
                 "--output", str(tmp_path / "conv_out.jsonl")]) == 0
    assert ("chat prompts: rendered with the tokenizer's chat template and the generation prompt; generation also "
            "stops at the template's end of turn <|im_end|>") in capsys.readouterr().out
    assert [(r["completion"], r["stop"]) for r in
            map(json.loads, (tmp_path / "conv_out.jsonl").read_text().splitlines())] == want
