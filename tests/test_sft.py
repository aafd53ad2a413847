"""TRL's `SFTTrainer` (a `Trainer` subclass) with nested LoRA and `UnifiedLoRACallback`, on CPU.

The model is conftest's tiny Llama (vocabulary 64), or test_quantized's 4-bit tiny Llama; the tokenizer is a
character-level one built here (no hub download), with a chat template of its own; the data are small in-memory
`datasets.Dataset`s of text, of prompt/completion pairs or of conversations. What SFTTrainer does differently from
the stock Trainer, and what each test checks:

- it scores tokens with a fused LM head (trl's `add_fused_lm_head`): the model is called without
  `num_items_in_batch` and returns each micro-batch's token mean, which the trainer turns back into token sums over
  the step's token count (the controller must see that token mean, not the mean of the micro-batch means), and it
  reads `lm_head.weight` directly (a nested `lm_head` would never train); with `loss_type="dft"`, a
  `compute_loss_func` or `label_smoothing_factor` it trains another loss than that output's (the latter two run the
  fused head again under no_grad, for the metrics);
- on a quantized model it casts every trainable parameter to bf16 in its constructor;
- `peft_config=` wraps the model with PEFT's `get_peft_model`.
"""

import pytest
import torch

# No skip without trl: the [test] extra (constraints.txt pins it) installs it, and a CI run without it must fail here
# rather than pass without these tests.
import trl
from datasets import Dataset
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import tiny_llama
from unified_lora import SignalConfig, setup_unified_lora
from unified_lora.callbacks import UnifiedLoRACallback, quantized_model_for_trainer

CHARS = "abcdefghijklmnopqrstuvwxyz .,"
WORDS = "the cat sat on a mat while dogs ran far away from home and then back again".split()


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (ids 3..31 of the tiny models' 64), with [PAD] 0, [UNK] 1 and [EOS] 2."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def _texts(n: int, seed: int, lo: int = 2, hi: int = 8) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(k),), generator=g))
            for k in torch.randint(lo, hi + 1, (n,), generator=g)]


def text_data(n: int = 32, seed: int = 0) -> Dataset:
    return Dataset.from_dict({"text": _texts(n, seed)})


def prompt_completion_data(n: int = 32, seed: int = 0) -> Dataset:
    """Completions of 1 to 5 words after prompts of 2 to 6: the micro-batches hold very different numbers of
    completion tokens (a row fits in 64 tokens, `max_length=64`)."""
    return Dataset.from_dict({"prompt": _texts(n, seed, 2, 6),
                              "completion": [" " + t for t in _texts(n, seed + 1, 1, 5)]})


# A chat template with `{% generation %}` markers around each assistant turn and its [EOS] (what trl's
# `assistant_only_loss` needs: the tokenizer's `return_assistant_tokens_mask`); a user turn ends with ".".
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
                 "{{ eos_token }}{% endgeneration %}{% else %}{{ m['content'] }}.{% endif %}{% endfor %}")


def chat_tokenizer() -> PreTrainedTokenizerFast:
    tok = char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def chat_data(n: int = 32, seed: int = 0) -> Dataset:
    """Conversations of a user turn (2 to 6 words) and an assistant turn (1 to 5 words)."""
    return Dataset.from_dict({"messages": [[{"role": "user", "content": u}, {"role": "assistant", "content": a}]
                                           for u, a in zip(_texts(n, seed, 2, 6), _texts(n, seed + 1, 1, 5))]})


DATA = {"text": text_data, "prompt_completion": prompt_completion_data, "chat": chat_data}


def sft(model, out, train=None, **kw):
    args = dict(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4,
                learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                disable_tqdm=True, max_length=32, seed=0, data_seed=0)
    extra = {k: kw.pop(k, None) for k in ("peft_config", "eval_dataset", "compute_loss_func")}
    args.update(kw)
    return trl.SFTTrainer(model=model, args=trl.SFTConfig(**args), train_dataset=train or text_data(),
                          processing_class=chat_tokenizer(), **extra)


def setup(model, targets=("q_proj", "v_proj")):
    # loss_scale 0.1: the first steps' loss (about log 64) drives φ over the Mirror threshold at the second step
    return setup_unified_lora(model, list(targets), print_fn=None,
                              signal=SignalConfig(kind="loss", alpha=0.5, loss_scale=0.1))


def logged_losses(trainer) -> list[float]:
    """The loss the Trainer logged at each step (logging_steps=1: each step's own, as it was backpropagated)."""
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def saved_blocks(folder) -> dict:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if ".lora_" in k}


def test_sft_trainer_trains_nested_layers_through_a_mirror_entry_with_evaluations_checkpoints_and_a_resume(tmp_path):
    """SFTTrainer on a text dataset, accumulation 2, evaluations and checkpoints every 2 steps: the controller steps
    once per optimizer step (a MULTI -> MIRROR switch to rank 16 at the second), every block trains, the controller
    state lands in each checkpoint, and a fresh model resumed from checkpoint-2 comes back at rank 16 with the
    snapshot held, gives the same records for steps 2 and 3 and reaches checkpoint-4's blocks bit for bit."""
    model = tiny_llama().train()
    adapters, ctrl = setup(model)
    before = {n: [p.detach().clone() for p in layer.lora_parameters()] for n, layer in adapters.items()}
    out = tmp_path / "out"
    kw = dict(eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, eval_dataset=text_data(8, 1))
    trainer = sft(model, out, **kw)
    cb = UnifiedLoRACallback(ctrl).add_to(trainer)
    trainer.train()

    assert [r.rank for r in ctrl.trace] == [8, 16, 16, 16] and ctrl.trace[1].transition == "MULTI->MIRROR"
    assert len([h for h in trainer.state.log_history if "eval_loss" in h]) == 2
    assert cb.step_losses == pytest.approx(logged_losses(trainer), abs=2e-6)
    for n, layer in adapters.items():
        assert not all(torch.equal(a, b) for a, b in zip(before[n], layer.lora_parameters())), n
    assert all((out / f"checkpoint-{s}" / "unified_lora_controller.pt").is_file() for s in (2, 4))

    model2 = tiny_llama().train()
    adapters2, ctrl2 = setup(model2)
    trainer2 = sft(model2, out, **kw)
    UnifiedLoRACallback(ctrl2).add_to(trainer2)
    trainer2.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert ctrl2.rank == 16 and ctrl2.mirror.held and {layer.rank for layer in adapters2.values()} == {16}
    assert [(r.step, r.phi, r.mode) for r in ctrl2.trace] == [(r.step, r.phi, r.mode) for r in ctrl.trace[2:]]
    now = model2.state_dict()
    saved = saved_blocks(out / "checkpoint-4")
    assert len(saved) == 24 and all(torch.equal(v, now[k]) for k, v in saved.items())


@pytest.mark.parametrize("data,kw", [
    ("prompt_completion", {}),  # completion-only loss: the prompt tokens are labelled -100
    ("prompt_completion", {"completion_only_loss": True}),  # the same, asked for (the default reads the columns)
    ("prompt_completion", {"packing": True}),  # packed (best-fit decreasing, padding-free), completion-only
    ("prompt_completion", {"padding_free": True, "max_length": None}),  # one row, position_ids, no attention mask
    ("chat", {"assistant_only_loss": True}),  # the user turns labelled -100 (the template's generation markers)
    ("text", {}),  # padded rows of different lengths
    ("text", {"packing": True, "packing_strategy": "wrapped"}),
    ("text", {"padding_free": True, "packing": True}),
    ("text", {"loss_type": "dft"}),  # DFT: each token's NLL weighted by its probability (about 1/64 of the NLL)
    # SFTTrainer ignores label smoothing with DFT: add_to wrapped the unused smoother, and the first step failed
    ("text", {"loss_type": "dft", "label_smoothing_factor": 0.1}),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={w}" for k, w in v.items()) or "default")
def test_the_controller_sees_the_token_mean_that_sft_trainer_trains_on(tmp_path, data, kw):
    """SFTTrainer's fused LM head is called without `num_items_in_batch` and returns each micro-batch's token mean;
    the trainer divides the step's token sums by the step's token count. The callback used to average the two
    micro-batch means, which is off wherever they hold different numbers of label tokens (completion-only or
    assistant-only loss, padding, packing, padding-free rows): the controller saw another loss than the one trained
    and logged. It now weights each by its label tokens, and matches the Trainer's own per-step loss. With
    `loss_type="dft"` it read the fused output's plain NLL (4.1 for a DFT loss of 0.066); it now computes the DFT
    loss from the output's log-probabilities. The MULTI -> MIRROR switch at the second step puts every nested layer
    at rank 16 (not with DFT's small loss: φ stays in MULTI)."""
    model = tiny_llama().train()
    adapters, ctrl = setup(model)
    trainer = sft(model, tmp_path, DATA[data](), **{"max_steps": 3, "max_length": 64, **kw})
    if data in ("prompt_completion", "chat") and not kw.get("packing"):
        labels = trainer.train_dataset[0]["labels"]
        assert labels[0] == -100 and labels[-1] == 2  # a loss on the completion (answer) only, up to its [EOS]
    if kw.get("padding_free"):
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1 and "position_ids" in batch
    cb = UnifiedLoRACallback(ctrl).add_to(trainer)
    trainer.train()
    assert cb.step_losses == pytest.approx(logged_losses(trainer), abs=2e-6)
    assert [r.loss for r in ctrl.trace] == pytest.approx(logged_losses(trainer), abs=2e-6)
    if kw.get("loss_type") == "dft":
        assert all(loss < 0.1 for loss in cb.step_losses) and [r.rank for r in ctrl.trace] == [8, 8, 8]
    else:
        assert [r.rank for r in ctrl.trace] == [8, 16, 16] and {layer.rank for layer in adapters.values()} == {16}


def test_padding_free_rows_give_the_padded_runs_losses_and_gradient_signal(tmp_path):
    """`padding_free=True` (without packing) concatenates a micro-batch's sequences into one row with `position_ids`
    and no attention mask. trl 1.16 asks for no flash-attention there: the tiny Llama runs it with SDPA on CPU, and
    transformers keeps each sequence to itself (a block-causal mask read from the position_ids; the same row read
    as one sequence, positions 0..N, gives a loss 2e-3 off). So the same data padded and padding-free train the
    same way: the same loss at each step and the same composite signal, whose raw components read the adapters'
    gradients (stress S, churn E). In float32: SFTConfig's default bf16 autocast rounds the two layouts'
    gradients differently (about 2e-3 apart)."""
    runs = []
    for kw in ({}, {"padding_free": True, "max_length": None}):
        model = tiny_llama().train()
        adapters, ctrl = setup_unified_lora(model, ["q_proj", "v_proj"], print_fn=None)  # the composite signal
        trainer = sft(model, tmp_path / str(len(runs)), prompt_completion_data(), **{"max_length": 64, "bf16": False,
                                                                                       **kw})
        cb = UnifiedLoRACallback(ctrl).add_to(trainer)
        trainer.train()
        assert cb.step_losses == pytest.approx(logged_losses(trainer), abs=2e-6)
        runs.append(ctrl.trace)
    padded, free = runs
    assert len(free) == 4 and all(r.components["S"] > 0 for r in free) and free[-1].loss < free[0].loss
    assert sum(r.components["E"] > 0 for r in free) == 3  # a churn from the second step on (a previous gradient)
    assert [r.loss for r in free] == pytest.approx([r.loss for r in padded], abs=1e-6)
    for a, b in zip(free, padded):
        assert a.phi == pytest.approx(b.phi, abs=1e-6) and a.components == pytest.approx(b.components, rel=1e-5)


def _doubled_token_mean(outputs, labels, num_items_in_batch=None):
    """A custom loss (`compute_loss_func`): twice the token-summed cross-entropy over the step's label tokens."""
    logits = outputs.logits[:, :-1].float()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                           ignore_index=-100, reduction="sum")
    return 2.0 * ce / num_items_in_batch


@pytest.mark.filterwarnings("ignore:.*is deprecated in `SFTTrainer`:FutureWarning")
@pytest.mark.filterwarnings("ignore:`compute_loss_func` is deprecated:FutureWarning")
@pytest.mark.parametrize("kw", [{"compute_loss_func": _doubled_token_mean}, {"label_smoothing_factor": 0.1}],
                         ids=["compute_loss_func", "label_smoothing"])
def test_the_controller_reads_the_loss_of_a_compute_loss_func_or_label_smoothing(tmp_path, kw):
    """With the deprecated `compute_loss_func` or `label_smoothing_factor > 0`, SFTTrainer trains on the loss that
    function (or the Trainer's label smoother) returns, from a forward without labels, then runs its fused LM head
    under no_grad for the metrics alone. The callback read that fused forward's plain NLL: the controller saw
    another loss than the one trained (half of it here), silently. It now ignores forwards without gradient, and
    `add_to(trainer)` wraps the trainer's compute_loss_func or label smoother so that the controller reads their
    value, which the Trainer logs; a callback only passed in `callbacks=` fails at the first step, naming both.
    The run saves, and a fresh model resumed from checkpoint-2 reaches checkpoint-4's blocks bit for bit."""
    out = tmp_path / "out"
    runs = dict(save_strategy="steps", save_steps=2, **kw)
    model = tiny_llama().train()
    adapters, ctrl = setup(model)
    trainer = sft(model, out, **runs)
    cb = UnifiedLoRACallback(ctrl).add_to(trainer)
    trainer.train()
    assert ctrl.global_step == 4 and cb.step_losses == pytest.approx(logged_losses(trainer), abs=2e-6)
    assert [r.loss for r in ctrl.trace] == pytest.approx(logged_losses(trainer), abs=2e-6)
    if "compute_loss_func" in kw:  # twice the token mean: far from the plain NLL (about log 64) the callback read
        assert all(loss > 8 for loss in cb.step_losses)

    model2 = tiny_llama().train()
    adapters2, ctrl2 = setup(model2)
    trainer2 = sft(model2, out, **runs)
    UnifiedLoRACallback(ctrl2).add_to(trainer2)
    trainer2.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert [(r.step, r.loss, r.rank) for r in ctrl2.trace] == [(r.step, r.loss, r.rank) for r in ctrl.trace[2:]]
    now = model2.state_dict()
    saved = saved_blocks(out / "checkpoint-4")
    assert len(saved) == 24 and all(torch.equal(v, now[k]) for k, v in saved.items())

    model3 = tiny_llama().train()
    _, ctrl3 = setup(model3)
    trainer3 = sft(model3, tmp_path / "plain", **kw)
    trainer3.add_callback(UnifiedLoRACallback(ctrl3))  # not add_to: nothing records the loss trained
    with pytest.raises(RuntimeError, match="no training loss was seen.*compute_loss_func or label_smoothing_factor"):
        trainer3.train()
    assert ctrl3.global_step == 0


def test_sft_trainer_on_a_4bit_model_keeps_the_fp32_blocks_and_its_packed_weights(tmp_path):
    """SFTTrainer casts every trainable parameter of a quantized model to bf16 in its constructor (as the QLoRA
    paper trains PEFT's adapters). Built inside `quantized_model_for_trainer`, the nested blocks used to come out of
    it in bf16, against what setup gives a quantized base (fp32 blocks, as PEFT's bnb layers). The helper now hands
    each its own fp32 tensor back, values untouched. Then a run with accumulation 2, an evaluation, a Mirror entry
    and checkpoints trains every block, leaves every packed weight bit-identical, and resumes from checkpoint-2 into
    a freshly loaded 4-bit model to checkpoint-4's blocks bit for bit."""
    from test_quantized import _load, _packed_state

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    base = tmp_path / "tiny_llama"
    LlamaForCausalLM(cfg).save_pretrained(base)

    def build(out, **kw):
        model = _load(base, "nf4-bf16")
        adapters, ctrl = setup(model, ["q_proj", "v_proj", "down_proj"])
        blocks = {n: [p.detach().clone() for p in layer.lora_parameters()] for n, layer in adapters.items()}
        with quantized_model_for_trainer(model):
            trainer = sft(model, out, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                          eval_dataset=text_data(8, 1), **kw)
        for n, layer in adapters.items():
            assert all(p.dtype == torch.float32 and torch.equal(p, b) for p, b in zip(layer.lora_parameters(),
                                                                                     blocks[n])), n
        return model, adapters, ctrl, trainer, blocks

    out = tmp_path / "out"
    model, adapters, ctrl, trainer, blocks = build(out)
    packed = _packed_state(model)
    cb = UnifiedLoRACallback(ctrl).add_to(trainer)
    trainer.train()
    assert [r.rank for r in ctrl.trace] == [8, 16, 16, 16] and ctrl.trace[1].transition == "MULTI->MIRROR"
    assert cb.step_losses == pytest.approx(logged_losses(trainer), abs=2e-6)
    assert _packed_state(model).keys() == packed.keys()
    assert all(torch.equal(x, y) for n in packed for x, y in zip(packed[n], _packed_state(model)[n]))
    for n, layer in adapters.items():
        assert not all(torch.equal(a, b) for a, b in zip(blocks[n], layer.lora_parameters())), n

    model2, adapters2, ctrl2, trainer2, _ = build(out)
    UnifiedLoRACallback(ctrl2).add_to(trainer2)
    trainer2.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert ctrl2.rank == 16 and ctrl2.mirror.held
    now = model2.state_dict()
    saved = saved_blocks(out / "checkpoint-4")
    assert len(saved) == 36 and all(torch.equal(v, now[k]) for k, v in saved.items())


@pytest.mark.parametrize("targets", [["k_proj"], "all-linear"])
def test_a_peft_config_over_a_model_with_nested_layers_is_refused(tmp_path, targets):
    """`SFTTrainer(peft_config=LoraConfig(...))` wraps the model with `get_peft_model`, which freezes every nested
    block and adds PEFT's own fixed-rank LoRA (with "all-linear", on the nested layers' base layers too: LoRA under
    LoRA). The run then failed at its start with the controller's "optimizer: it holds 0 of the 24 parameters ...
    Build it after setup", which named neither cause nor remedy. The callback now refuses such a model at the start
    of training and says to pass no peft_config. (A peft_config that targets a nested layer itself is refused by
    PEFT: "Target module NestedLoRALayer(...) is not supported".)"""
    from peft import LoraConfig

    model = tiny_llama().train()
    adapters, ctrl = setup(model)
    trainer = sft(model, tmp_path, peft_config=LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
    assert not any(p.requires_grad for layer in adapters.values() for p in layer.lora_parameters())  # PEFT froze them
    UnifiedLoRACallback(ctrl).add_to(trainer)
    with pytest.raises(ValueError, match=r"PEFT adapter layers .* beside its nested LoRA layers.*Pass no peft_config"):
        trainer.train()
    assert ctrl.global_step == 0

    model = tiny_llama().train()
    setup(model)
    with pytest.raises(ValueError, match="(?s)Target module NestedLoRALayer.*is not supported"):
        sft(model, tmp_path, peft_config=LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))


def test_a_nested_lm_head_that_sft_trainers_fused_head_bypasses_is_refused(tmp_path):
    """SFTTrainer's fused LM head computes the log-probabilities from `lm_head.weight` and never calls `lm_head`, so
    a nested `lm_head`'s delta was left out of the loss: its blocks got no gradient and stayed at B = 0 through the
    whole run, silently (TRL refuses the same for a PEFT adapter on `lm_head`). The callback now raises at the first
    step. Under the stock Trainer, whose forward calls `lm_head`, the same model trains its `lm_head` blocks."""
    from transformers import Trainer, TrainingArguments

    model = tiny_llama().train()
    adapters, ctrl = setup(model, ["q_proj", "lm_head"])
    trainer = sft(model, tmp_path)
    UnifiedLoRACallback(ctrl).add_to(trainer)
    with pytest.raises(RuntimeError, match="output layer 'lm_head' is a nested LoRA layer.*fused LM head"):
        trainer.train()
    assert ctrl.global_step == 0

    model = tiny_llama().train()
    adapters, ctrl = setup(model, ["q_proj", "lm_head"])
    rows = torch.randint(3, 32, (8, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": x, "labels": x} for x in rows]
    trainer = Trainer(model=model, train_dataset=data, args=TrainingArguments(
        str(tmp_path / "stock"), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2, report_to="none",
        use_cpu=True, disable_tqdm=True, save_strategy="no"))
    UnifiedLoRACallback(ctrl).add_to(trainer)
    trainer.train()
    assert ctrl.global_step == 2 and any(b.abs().sum() > 0 for b in adapters["lm_head"].lora_B)
