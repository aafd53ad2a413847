"""UnifiedLoRACallback inside the stock Hugging Face Trainer (tiny models, CPU)."""

import json
import logging
import math
import os
import pickle
import re

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, Trainer,
                          TrainerCallback, TrainingArguments)

from conftest import RunsCode
from unified_lora import MirrorConfig, SignalConfig, setup_unified_lora
from unified_lora.callbacks import CONTROLLER_STATE_NAME, UnifiedLoRACallback, model_normalises_loss, unwrap_optimizer
from unified_lora.config import V1_MULTIPLIERS


class TokenDataset(torch.utils.data.Dataset):
    """Fixed-length random token sequences; class labels or causal-LM labels."""

    def __init__(self, n=10, length=8, causal=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(5, 100, (n, length), generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)
        self.causal = causal

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i] if self.causal else self.y[i]}


def tiny_bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=32,
                     num_labels=2)
    return BertForSequenceClassification(cfg)


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg)


def build(kind="bert", signal=None):
    model = tiny_bert() if kind == "bert" else tiny_llama()
    targets = ["query", "value"] if kind == "bert" else ["q_proj", "v_proj"]
    extra = {"modules_to_save": ["classifier"]} if kind == "bert" else {}
    adapters, ctrl = setup_unified_lora(model, target_modules=targets, signal=signal or "loss", print_fn=None, **extra)
    return model, adapters, ctrl


def targs(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=2, report_to="none", use_cpu=True,
                disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0, data_seed=0)
    base.update(kw)
    return TrainingArguments(**base)


# A loss scale that drives φ from MULTI into MIRROR within a few steps (loss ≈ 0.69 / 0.1).
STRESS = SignalConfig(kind="loss", alpha=0.5, loss_scale=0.1)


class MicroBatchRecorder(TrainerCallback):
    """Records every training micro-batch's inputs (a forward pre-hook of its own)."""

    def __init__(self):
        self.inputs = []

    def on_train_begin(self, args, state, control, model=None, **kw):
        def pre(module, a, kwargs):
            if module.training:
                self.inputs.append({k: kwargs[k].clone() for k in ("input_ids", "labels") if k in kwargs})
        model.register_forward_pre_hook(pre, with_kwargs=True)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_controller_gets_each_optimizer_steps_loss_averaged_over_accumulation(tmp_path, kind):
    model, _, ctrl = build(kind)
    cb, rec = UnifiedLoRACallback(ctrl), MicroBatchRecorder()
    # 10 examples, batch 2, accumulation 2: micro-batches per step 2, 2, 1 (a short last step).
    # learning_rate=0 keeps the weights fixed, so every loss can be recomputed afterwards.
    args = targs(tmp_path, gradient_accumulation_steps=2, num_train_epochs=1, learning_rate=0.0)
    Trainer(model=model, args=args, train_dataset=TokenDataset(causal=kind == "llama"), callbacks=[cb, rec]).train()

    model.eval()
    with torch.no_grad():
        micro = [model(**b).loss.item() for b in rec.inputs]
    expected = [sum(micro[0:2]) / 2, sum(micro[2:4]) / 2, micro[4]]
    assert len(micro) == 5
    assert [r.loss for r in ctrl.trace] == pytest.approx(expected, abs=1e-6)


def test_a_bert_classifier_trains_at_accumulation_4_as_at_4x_the_batch_once_the_trainer_divides(tmp_path):
    """README "Per-step loss": the Trainer sums a BERT classifier's micro-batch means (huggingface/transformers#47688),
    so at accumulation 4 its gradient and logged loss are 4x those at 4x the batch; the controller is fed the mean
    either way. `trainer.model_accepts_loss_kwargs = False` makes the Trainer divide by the accumulation: the run is
    then the one at 4x the batch (SGD without clipping, so the 4x gradient shows in the weights)."""

    def run(batch, accum, divide=False):
        model, _, ctrl = build()
        args = targs(tmp_path / f"{batch}-{divide}", per_device_train_batch_size=batch,
                     gradient_accumulation_steps=accum, max_steps=3, optim="sgd", learning_rate=0.5, max_grad_norm=0)
        trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=48), callbacks=[UnifiedLoRACallback(ctrl)])
        if divide:
            trainer.model_accepts_loss_kwargs = False
        trainer.train()
        logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return [r.loss for r in ctrl.trace], logged, _final_lora(model)

    ref_losses, ref_logged, ref_weights = run(16, 1)
    assert ref_logged == pytest.approx(ref_losses, abs=1e-4)  # (the Trainer logs rounded values)
    sums, sums_logged, sums_weights = run(4, 4)
    assert sums[0] == pytest.approx(ref_losses[0], abs=1e-6)  # the controller: the mean of the same 16 rows
    assert sums_logged[0] == pytest.approx(4 * sums[0], rel=1e-3)  # the Trainer: the sum of the 4 micro-batch means
    assert max(abs(a - b) for a, b in zip(sums, ref_losses)) > 1e-3  # trained on the 4x gradient
    losses, logged, weights = run(4, 4, divide=True)
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    assert logged == pytest.approx(ref_logged, abs=1e-4)
    assert all(torch.allclose(weights[k], ref_weights[k], atol=1e-6) for k in ref_weights)
    assert not all(torch.allclose(sums_weights[k], ref_weights[k], atol=1e-6) for k in ref_weights)


def test_a_peft_models_loss_is_read_through_to_its_base_model(tmp_path):
    """attach_to_peft_model under the Trainer: PeftModelForCausalLM.forward only passes num_items_in_batch on to the
    Llama, which divides its loss by it. The callback read the PEFT wrapper's forward source, took the loss for a
    plain mean and averaged the shares: with accumulation 2 the controller saw half the loss on full steps and the
    whole loss on the short last one (2.31, 2.32, 4.64 for 4.62, 4.64, 4.64)."""
    from peft import LoraConfig, get_peft_model

    from unified_lora.peft_io import attach_to_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert model_normalises_loss(model) is True  # as the Trainer, which unwraps the PEFT model to decide
    ctrl = attach_to_peft_model(model, print_fn=None)
    cb, rec = UnifiedLoRACallback(ctrl), MicroBatchRecorder()
    args = targs(tmp_path, gradient_accumulation_steps=2, num_train_epochs=1, learning_rate=0.0)
    Trainer(model=model, args=args, train_dataset=TokenDataset(causal=True), callbacks=[cb, rec]).train()

    model.eval()
    with torch.no_grad():
        micro = [model(**b).loss.item() for b in rec.inputs]
    assert len(micro) == 5
    assert [r.loss for r in ctrl.trace] == pytest.approx([sum(micro[0:2]) / 2, sum(micro[2:4]) / 2, micro[4]],
                                                         abs=1e-6)


def test_a_peft_model_under_the_trainer_saves_checkpoints_and_resumes_the_same_trajectory(tmp_path):
    """attach_to_peft_model under the Trainer with checkpoints: the first save failed in the callback's `on_save`
    ("'_PeftLoRAView' object has no attribute 'base_layer'", found by the user trial), so no PEFT model driven by
    the callback could checkpoint. Now a run resumed from checkpoint-3 in a fresh model makes the uninterrupted
    run's decisions (a Mirror entry included) and ends at its weights, and PEFT loads the final checkpoint."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from unified_lora.peft_io import attach_to_peft_model

    def run(out, resume=None):
        model = get_peft_model(tiny_bert(), LoraConfig(r=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
        ctrl = attach_to_peft_model(model, signal=SignalConfig(kind="loss", alpha=0.3, loss_scale=0.1),
                                    print_fn=None)
        Trainer(model=model, args=_resume_args(out, 8), train_dataset=TokenDataset(n=16),
                callbacks=[UnifiedLoRACallback(ctrl, resume_from=resume)]).train(resume_from_checkpoint=resume)
        return model, [(r.step, r.phi, r.mode, r.lr) for r in ctrl.trace]

    model, trace = run(tmp_path / "a")
    assert os.path.isfile(tmp_path / "a" / "checkpoint-3" / CONTROLLER_STATE_NAME)
    assert len({m for _, _, m, _ in trace[3:]}) > 1, "a transition after the resume point"
    model2, trace2 = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert trace2 == trace[3:]
    full, resumed = _final_lora(model), _final_lora(model2)
    assert resumed.keys() == full.keys() and all(torch.equal(resumed[k], full[k]) for k in full)

    x = TokenDataset(n=4).x
    loaded = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "a" / "checkpoint-8")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model.eval()(input_ids=x).logits)


def test_a_multitask_controller_is_refused_with_the_loop_to_use():
    """The Trainer gives the callback no task ids and no per-task losses. A MultiTaskController driven by it used to
    run silently with no task gradient captured in SINGLE, so the gradient conflict never rose and the split into
    task adapters never came."""
    from unified_lora.multitask import setup_multitask_lora

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=37))
    _, ctrl = setup_multitask_lora(model, ["a", "b"], ["query", "value"], print_fn=None)
    with pytest.raises(TypeError, match="does not drive a MultiTaskController.*task_context"):
        UnifiedLoRACallback(ctrl)


def test_loss_normalisation_is_read_from_the_model():
    from transformers import LlamaForSequenceClassification

    assert model_normalises_loss(tiny_llama()) is True  # self.loss_function(..., **kwargs) gets num_items_in_batch
    assert model_normalises_loss(tiny_bert()) is False  # a plain CrossEntropyLoss mean
    # calls self.loss_function but drops the kwargs (huggingface/transformers#47688)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0)
    assert model_normalises_loss(LlamaForSequenceClassification(cfg)) is False
    # a model compiled before it is given to the Trainer: the wrapper's class has no forward of its own (it read
    # False, and with accumulation 2 the controller got half the loss on full steps)
    assert model_normalises_loss(torch.compile(tiny_llama(), backend="eager")) is True
    assert model_normalises_loss(torch.compile(tiny_bert(), backend="eager")) is False


class LrRecorder(TrainerCallback):
    """An optimizer pre-step hook registered after the controller's: sees the LR actually used."""

    def __init__(self):
        self.lrs = []

    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        unwrap_optimizer(optimizer).register_step_pre_hook(lambda o, a, k: self.lrs.append(o.param_groups[0]["lr"]))


def test_lr_used_is_scheduled_lr_times_mode_multiplier(tmp_path):
    model, _, ctrl = build("bert", signal=STRESS)
    cb, rec = UnifiedLoRACallback(ctrl), LrRecorder()
    lr0, warmup, total = 1e-3, 2, 8
    args = targs(tmp_path, max_steps=total, learning_rate=lr0, lr_scheduler_type="linear", warmup_steps=warmup)
    Trainer(model=model, args=args, train_dataset=TokenDataset(n=16), callbacks=[cb, rec]).train()

    modes = [r.mode for r in ctrl.trace]
    assert len(set(modes)) > 1, "the run must switch mode for this test to mean anything"
    # transformers' linear schedule with warmup, written out independently.
    sched = [lr0 * (t / warmup if t < warmup else (total - t) / (total - warmup)) for t in range(total)]
    # The mode decided at step t (ctrl.step, before optimizer.step) already sets step t's LR.
    expected = [s * V1_MULTIPLIERS[m] for s, m in zip(sched, modes)]
    assert rec.lrs == pytest.approx(expected, rel=1e-12, abs=0)


def test_rank_switch_acts_before_the_same_steps_update(tmp_path):
    model, adapters, ctrl = build("bert", signal=STRESS)
    layer = next(iter(adapters.values()))
    seen = []

    class RankAtStep(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kw):
            seen.append((layer.rank, layer.lora_B[2].grad is not None))

    args = targs(tmp_path, max_steps=6, learning_rate=1e-3)
    Trainer(model=model, args=args, train_dataset=TokenDataset(n=12),
            callbacks=[UnifiedLoRACallback(ctrl), RankAtStep()]).train()
    ranks = [r.rank for r in ctrl.trace]
    assert 16 in ranks
    assert [r for r, _ in seen] == ranks
    # the step that enters MIRROR (rank 16) has no gradient yet for the newly woken block
    first = ranks.index(16)
    assert seen[first] == (16, False) and seen[first + 1] == (16, True)


def test_controller_values_reach_log_history(tmp_path):
    model, _, ctrl = build("bert", signal=STRESS)
    args = targs(tmp_path, max_steps=4, learning_rate=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=8), callbacks=[UnifiedLoRACallback(ctrl)])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    for h, r in zip(logs, ctrl.trace):
        assert h["unified_lora/phi"] == r.phi and h["unified_lora/mode"] == r.mode
        assert h["unified_lora/rank"] == r.rank and h["unified_lora/lr"] == r.lr and h["unified_lora/loss"] == r.loss


def test_log_keys_are_checked(tmp_path):
    """A misspelt key, or one string (tuple("phi") is ('p', 'h', 'i')), used to log nothing, silently."""
    _, _, ctrl = build("bert")
    with pytest.raises(ValueError, match=r"log_keys: unknown \['rnk'\]; .* are \('phi', 'mode', 'rank', 'lr', 'loss'\)"):
        UnifiedLoRACallback(ctrl, log_keys=("phi", "rnk"))
    with pytest.raises(TypeError, match=r"log_keys: expected a tuple of keys, e.g. \('phi',\), got the string"):
        UnifiedLoRACallback(ctrl, log_keys="phi")
    model, _, ctrl = build("bert")
    trainer = Trainer(model=model, args=targs(tmp_path, max_steps=2), train_dataset=TokenDataset(n=4),
                      callbacks=[UnifiedLoRACallback(ctrl, log_keys=["rank"])])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all([k for k in h if k.startswith("unified_lora/")] == ["unified_lora/rank"]
                                  for h in logs)


def test_add_to_lets_earlier_callbacks_see_the_keys(tmp_path):
    seen = []

    class Integration(TrainerCallback):  # stands in for a report_to integration (registered before user callbacks)
        def on_log(self, args, state, control, logs=None, **kw):
            seen.append(dict(logs))

    model, _, ctrl = build("bert")
    trainer = Trainer(model=model, args=targs(tmp_path, max_steps=2), train_dataset=TokenDataset(n=4),
                      callbacks=[Integration()])
    UnifiedLoRACallback(ctrl).add_to(trainer)
    trainer.train()
    assert all("unified_lora/phi" in s for s in seen if "loss" in s) and len(seen) >= 2


def _final_lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _resume_args(out, steps):
    return targs(out, max_steps=steps, learning_rate=2e-3, save_strategy="steps", save_steps=3,
                 lr_scheduler_type="cosine", warmup_steps=1)


def test_resume_from_checkpoint_continues_the_same_trajectory(tmp_path):
    signal = SignalConfig(kind="loss", alpha=0.3, loss_scale=0.1)  # enters MIRROR at step ~5
    model, _, ctrl = build("bert", signal=signal)
    Trainer(model=model, args=_resume_args(tmp_path, 8), train_dataset=TokenDataset(n=16),
            callbacks=[UnifiedLoRACallback(ctrl)]).train()
    full_trace = [(r.step, r.phi, r.mode, r.rank, r.lr) for r in ctrl.trace]
    full_weights = _final_lora(model)
    assert os.path.isfile(tmp_path / "checkpoint-3" / CONTROLLER_STATE_NAME)
    assert len({m for _, _, m, _, _ in full_trace[3:]}) > 1, "a transition after the resume point proves φ came back"

    # a fresh process's view: new model, new controller, resume at step 3
    model2, _, ctrl2 = build("bert", signal=signal)
    with torch.no_grad():  # make sure the weights really come from the checkpoint
        for p in model2.parameters():
            p.add_(0.01)
    Trainer(model=model2, args=_resume_args(tmp_path, 8), train_dataset=TokenDataset(n=16),
            callbacks=[UnifiedLoRACallback(ctrl2)]).train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert [(r.step, r.phi, r.mode, r.rank, r.lr) for r in ctrl2.trace] == full_trace[3:]
    resumed = _final_lora(model2)
    assert resumed.keys() == full_weights.keys()
    assert all(torch.equal(resumed[k], full_weights[k]) for k in full_weights)


def test_resume_without_controller_state_raises(tmp_path):
    model, _, ctrl = build("bert")
    Trainer(model=model, args=_resume_args(tmp_path, 3), train_dataset=TokenDataset(n=6),
            callbacks=[UnifiedLoRACallback(ctrl)]).train()
    os.remove(tmp_path / "checkpoint-3" / CONTROLLER_STATE_NAME)
    model2, _, ctrl2 = build("bert")
    trainer = Trainer(model=model2, args=_resume_args(tmp_path, 4), train_dataset=TokenDataset(n=6),
                      callbacks=[UnifiedLoRACallback(ctrl2)])
    with pytest.raises(FileNotFoundError, match="resume_from"):
        trainer.train(resume_from_checkpoint=True)


_SAVE_FOREVER = """
import sys, torch, torch.nn as nn
from transformers import TrainerControl, TrainerState, TrainingArguments
from unified_lora import setup_unified_lora
from unified_lora.callbacks import UnifiedLoRACallback
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(2048, 2048), nn.Linear(2048, 2048))  # a state of ~8 MB: its write takes a while
_, ctrl = setup_unified_lora(model, target_modules=["0", "1"], rank_levels=(64, 128, 256), print_fn=None)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
ctrl.attach_optimizer(opt)
model(torch.randn(4, 2048)).pow(2).mean().backward()
ctrl.step(1.0)
opt.step()
cb, args = UnifiedLoRACallback(ctrl), TrainingArguments(output_dir=sys.argv[1], report_to=[])
print("ready", flush=True)
for step in range(1, 10**6):
    cb.on_save(args, TrainerState(global_step=step), TrainerControl())
"""


def test_a_process_killed_while_saving_the_controller_state_leaves_no_torn_file(tmp_path):
    """on_save wrote the controller state straight under its final name: a process killed (SIGKILL, OOM) while
    writing it left a torn `unified_lora_controller.pt`, and the resume from that checkpoint failed in torch.load
    ('failed finding central directory' / 'Ran out of input'), not with the callback's own 'the file is missing'
    advice. Now it is written under a temporary name and renamed: a file under the final name is always whole."""
    import signal
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", _SAVE_FOREVER, str(tmp_path)], env=env, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        third = tmp_path / "checkpoint-3" / CONTROLLER_STATE_NAME
        while not third.exists():  # kill it the moment the third state's file appears
            assert proc.poll() is None, "the saving process stopped on its own"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    states = sorted(tmp_path.glob(f"checkpoint-*/{CONTROLLER_STATE_NAME}"))
    assert third in states
    for path in states:
        assert torch.load(path, weights_only=True)["global_step"] == 1  # each one whole


def test_wrapped_compute_loss_func_feeds_the_controller(tmp_path):
    model, _, ctrl = build("bert")
    cb = UnifiedLoRACallback(ctrl)

    labels_seen = []

    def ce_sum_over_items(outputs, labels, num_items_in_batch=None):
        labels_seen.append(labels.clone())
        return torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch

    rec = MicroBatchRecorder()
    args = targs(tmp_path, gradient_accumulation_steps=2, max_steps=2, learning_rate=0.0)
    Trainer(model=model, args=args, train_dataset=TokenDataset(n=8), callbacks=[cb, rec],
            compute_loss_func=cb.wrap_compute_loss_func(ce_sum_over_items)).train()
    model.eval()
    with torch.no_grad():
        micro = [model(input_ids=b["input_ids"], labels=y).loss.item() for b, y in zip(rec.inputs, labels_seen)]
        # equal-size micro-batches: token mean = mean of means
    assert [r.loss for r in ctrl.trace] == pytest.approx([sum(micro[:2]) / 2, sum(micro[2:4]) / 2], abs=1e-6)


def test_missing_loss_fails_loudly(tmp_path):
    model, _, ctrl = build("bert")
    args = targs(tmp_path, max_steps=1, label_smoothing_factor=0.1)  # the Trainer pops labels: no outputs.loss
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=2), callbacks=[UnifiedLoRACallback(ctrl)])
    with pytest.raises(RuntimeError, match="no training loss"):
        trainer.train()


@pytest.mark.parametrize("kind", ["label_smoothing", "compute_loss_func"])
def test_add_to_records_the_loss_of_the_label_smoother_or_a_compute_loss_func(tmp_path, kind):
    """`label_smoothing_factor > 0` (the Trainer pops the labels and smooths the logits' loss itself) used to be
    refused at the first step ("no training loss"), and an unwrapped compute_loss_func too. `add_to(trainer)` now
    wraps the trainer's label smoother or compute_loss_func, so the controller reads the loss the Trainer trains and
    logs (with accumulation 2: the sum of the shares of the step's mean, which the Trainer passes
    num_items_in_batch for)."""
    model, _, ctrl = build("bert")

    def ce_sum_over_items(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch

    kw = {"label_smoothing_factor": 0.1} if kind == "label_smoothing" else {}
    trainer = Trainer(model=model, args=targs(tmp_path, gradient_accumulation_steps=2, max_steps=3, **kw),
                      train_dataset=TokenDataset(n=12),
                      compute_loss_func=ce_sum_over_items if kind == "compute_loss_func" else None)
    cb = UnifiedLoRACallback(ctrl).add_to(trainer)
    cb.add_to(trainer)  # again: wrapped once
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and [r.loss for r in ctrl.trace] == pytest.approx(logged, abs=1e-6)
    assert cb.step_losses == pytest.approx(logged, abs=1e-6)


@pytest.mark.parametrize("kind", ["label_smoothing", "compute_loss_func"])
def test_a_loss_function_set_on_the_trainer_after_add_to_is_recorded(tmp_path, kind):
    """A compute_loss_func assigned to the trainer after `add_to` (or a label smoother set up after it) was not
    wrapped, and the first step raised "no training loss". The callback wraps the trainer's loss functions again
    when training begins: the controller reads the loss the Trainer logs, and the function is wrapped once."""
    model, _, ctrl = build("bert")

    def ce_sum_over_items(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch

    trainer = Trainer(model=model, args=targs(tmp_path, gradient_accumulation_steps=2, max_steps=3),
                      train_dataset=TokenDataset(n=12))
    cb = UnifiedLoRACallback(ctrl).add_to(trainer)
    if kind == "compute_loss_func":
        trainer.compute_loss_func = ce_sum_over_items
    else:
        from transformers.trainer_pt_utils import LabelSmoother

        trainer.label_smoother = LabelSmoother(epsilon=0.1)
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and [r.loss for r in ctrl.trace] == pytest.approx(logged, abs=1e-6)
    wrapped = trainer.compute_loss_func if kind == "compute_loss_func" else trainer.label_smoother
    assert wrapped.callback is cb and not hasattr(wrapped.fn, "callback")  # wrapped, once
    trainer.train()  # a second train(): still wrapped once, still recorded
    assert (trainer.compute_loss_func if kind == "compute_loss_func" else trainer.label_smoother) is wrapped
    assert len(ctrl.trace) == 6


def test_composite_signal_reads_gradients_inside_the_trainer(tmp_path):
    model = tiny_bert()
    _, ctrl = setup_unified_lora(model, target_modules=["query", "value"], modules_to_save=["classifier"],
                                 print_fn=None)  # v3 default: the composite signal
    args = targs(tmp_path, max_steps=3, learning_rate=1e-3, max_grad_norm=0.0)
    Trainer(model=model, args=args, train_dataset=TokenDataset(n=6), callbacks=[UnifiedLoRACallback(ctrl)]).train()
    assert len(ctrl.trace) == 3
    assert all(r.components["S"] > 0 for r in ctrl.trace)  # stress = EMA of adapter gradient norms


# load_best_model_at_end: MULTI (rank 8) for steps 0-2, MIRROR (rank 16) from step 3 on; the random labels make
# checkpoint-2 (rank 8) the best by eval_loss.
BEST_SIGNAL = SignalConfig(kind="loss", alpha=0.5, loss_scale=0.1)


def _best_args(out, **kw):
    return targs(out, max_steps=8, learning_rate=5e-2, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                 save_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss", **kw)


def _best_trainer(out, ctrl_model, *callbacks):
    return Trainer(model=ctrl_model, args=_best_args(out), train_dataset=TokenDataset(n=16),
                   eval_dataset=TokenDataset(n=8, seed=1), callbacks=list(callbacks))


def test_load_best_model_at_end_also_loads_the_best_checkpoints_controller_state(tmp_path):
    """The Trainer loads the best checkpoint's weights at the end; the adapters must also get the rank (and the rest
    of the controller state) of that checkpoint, else the "best model" is its weights at the final rank, a model that
    was never evaluated (the old code: rank 16 on checkpoint-2's rank-8 weights, and another eval_loss)."""
    model, adapters, ctrl = build("bert", signal=BEST_SIGNAL)
    trainer = _best_trainer(tmp_path, model, UnifiedLoRACallback(ctrl))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    best_step = int(best.rsplit("-", 1)[1])
    ranks = [r.rank for r in ctrl.trace]
    assert len(ranks) == 8 and ranks[best_step - 1] != ranks[-1], "the best checkpoint must have another rank"
    saved = torch.load(os.path.join(best, CONTROLLER_STATE_NAME), weights_only=True)
    assert ctrl.rank == ranks[best_step - 1] and all(a.rank == ctrl.rank for a in adapters.values())
    assert (ctrl.mode, ctrl.global_step, ctrl.phi) == (saved["machine"]["mode"], best_step, saved["signal"]["phi"])
    assert ctrl.mirror.held == (saved["mirror"]["weights"] is not None)  # no snapshot then; the final one is dropped
    assert trainer.evaluate()["eval_loss"] == trainer.state.best_metric  # exactly the model that was evaluated


class DropControllerState(TrainerCallback):
    """Removes checkpoint-2's controller state right after it is written (a checkpoint saved without the callback)."""

    def on_save(self, args, state, control, **kw):
        if state.global_step == 2:
            os.remove(os.path.join(args.output_dir, "checkpoint-2", CONTROLLER_STATE_NAME))


@pytest.mark.parametrize("strict", [True, False])
def test_a_best_checkpoint_without_controller_state_raises_or_warns(tmp_path, strict):
    """The best weights come back at the rank saved with them (each layer's `_extra_state`), but the controller's
    mode, LR, signal and snapshot cannot: an error at the end of train() by default, a warning with
    strict_resume=False; either way the controller keeps its final state, and the message says which rank the
    adapters run (it used to say they kept the controller's final rank, which the weights' rank now replaces)."""
    model, _, ctrl = build("bert", signal=BEST_SIGNAL)
    trainer = _best_trainer(tmp_path, model, UnifiedLoRACallback(ctrl, strict_resume=strict), DropControllerState())
    message = (r"loaded the weights of .*checkpoint-2, but .*unified_lora_controller.pt does not exist, so"
               r" the controller keeps its final state \(MIRROR, rank 16\) while the adapters run at the rank saved"
               r" with those weights \((\d+)\)")
    if strict:
        with pytest.raises(FileNotFoundError, match=message + r".*strict_resume=False makes this a warning"):
            trainer.train()
    else:
        with pytest.warns(UserWarning, match=message):
            trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    assert ctrl.rank == 16 and ctrl.global_step == 8  # the controller keeps its final state


def test_a_callback_registered_twice_is_moved_or_refused(tmp_path):
    """`Trainer(callbacks=[cb])` and then `cb.add_to(trainer)` (the README's call for report_to) listed the callback
    twice: its second on_pre_optimizer_step failed with "no training loss was seen", as if the model returned none.
    Two callbacks on one controller stepped it twice per optimizer step, silently (6 trace records for 3 steps)."""
    model, _, ctrl = build("bert", signal=STRESS)
    cb = UnifiedLoRACallback(ctrl)
    trainer = Trainer(model=model, args=targs(tmp_path, max_steps=3, learning_rate=1e-3),
                      train_dataset=TokenDataset(n=8), callbacks=[cb])
    cb.add_to(trainer)  # moved to the head, not added again
    callbacks = trainer.callback_handler.callbacks
    assert callbacks[0] is cb and sum(c is cb for c in callbacks) == 1
    trainer.train()
    assert [r.step for r in ctrl.trace] == [0, 1, 2]

    twice = "the controller would step twice in one optimizer step: this callback is registered twice"
    model, _, ctrl = build("bert", signal=STRESS)
    trainer = Trainer(model=model, args=targs(tmp_path, max_steps=3, learning_rate=1e-3),
                      train_dataset=TokenDataset(n=8), callbacks=[UnifiedLoRACallback(ctrl), UnifiedLoRACallback(ctrl)])
    with pytest.raises(RuntimeError, match=twice):
        trainer.train()
    assert ctrl.global_step == 1  # stopped at the first step

    model, _, ctrl = build("bert", signal=STRESS)
    cb = UnifiedLoRACallback(ctrl)
    trainer = Trainer(model=model, args=targs(tmp_path, max_steps=3, learning_rate=1e-3),
                      train_dataset=TokenDataset(n=8), callbacks=[cb])
    trainer.add_callback(cb)  # the same instance, listed twice
    with pytest.raises(RuntimeError, match=twice):
        trainer.train()


def test_a_controller_state_saved_with_other_weights_is_refused_on_resume(tmp_path):
    """The Trainer resumes from a folder outside output_dir, whose checkpoint-3 belongs to another run: the callback
    reads output_dir/checkpoint-3 (the Trainer does not say where it resumed from). The weights' digest shows it."""
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    model, _, ctrl = build("bert", signal=STRESS)
    Trainer(model=model, args=_resume_args(run_a, 3), train_dataset=TokenDataset(n=6, seed=1),
            callbacks=[UnifiedLoRACallback(ctrl)]).train()
    model, _, ctrl = build("bert", signal=STRESS)
    Trainer(model=model, args=_resume_args(run_b, 3), train_dataset=TokenDataset(n=6, seed=2),
            callbacks=[UnifiedLoRACallback(ctrl)]).train()
    saved_b = torch.load(run_b / "checkpoint-3" / CONTROLLER_STATE_NAME, weights_only=True)

    for strict in (True, False):
        model2, _, ctrl2 = build("bert", signal=STRESS)
        before = ctrl2.state_dict()
        trainer = Trainer(model=model2, args=_resume_args(run_b, 3), train_dataset=TokenDataset(n=6, seed=1),
                          callbacks=[UnifiedLoRACallback(ctrl2, strict_resume=strict)])
        if strict:
            with pytest.raises(ValueError, match="other adapter weights.*resume_from="):
                trainer.train(resume_from_checkpoint=str(run_a / "checkpoint-3"))
        else:
            with pytest.warns(UserWarning, match="not loaded"):
                trainer.train(resume_from_checkpoint=str(run_a / "checkpoint-3"))
        # nothing of run b's state went in (before, run b's φ, step count and Mirror were loaded silently)
        assert ctrl2.global_step == before["global_step"] != saved_b["global_step"]

    # the right folder, named with resume_from=, loads; and so does a state saved without a digest (older runs)
    model3, _, ctrl3 = build("bert", signal=STRESS)
    Trainer(model=model3, args=_resume_args(run_b, 3), train_dataset=TokenDataset(n=6, seed=1),
            callbacks=[UnifiedLoRACallback(ctrl3, resume_from=str(run_a / "checkpoint-3"))]
            ).train(resume_from_checkpoint=str(run_a / "checkpoint-3"))
    assert ctrl3.global_step == 3
    old_style = {k: v for k, v in saved_b.items() if k != "callback_weights_sha256"}
    torch.save(old_style, run_b / "checkpoint-3" / CONTROLLER_STATE_NAME)
    model4, _, ctrl4 = build("bert", signal=STRESS)
    Trainer(model=model4, args=_resume_args(run_b, 3), train_dataset=TokenDataset(n=6, seed=1),
            callbacks=[UnifiedLoRACallback(ctrl4)]).train(resume_from_checkpoint=str(run_a / "checkpoint-3"))
    assert ctrl4.global_step == 3


class PoisonControllerState(TrainerCallback):
    """Adds a pickled call to checkpoint-`step`'s controller state right after it is written: the file of a checkpoint
    folder someone sent you."""

    def __init__(self, step, marker):
        self.step, self.marker = step, marker

    def on_save(self, args, state, control, **kw):
        if state.global_step == self.step:
            path = os.path.join(args.output_dir, f"checkpoint-{self.step}", CONTROLLER_STATE_NAME)
            sd = torch.load(path, weights_only=True)  # what the callback writes is tensors and plain values
            torch.save(dict(sd, note=RunsCode(self.marker)), path)


def test_a_controller_state_that_would_run_code_is_refused_on_resume_and_trust_checkpoint_loads_it(tmp_path):
    """The callback read unified_lora_controller.pt with torch.load(weights_only=False): a Trainer checkpoint someone
    sent you, whose file pickles a call, ran that call on resume. It is now read with weights_only=True: a
    pickle.UnpicklingError naming trust_checkpoint=True, and nothing of it runs. The state the callback writes
    (here: in MIRROR, with the optimizer's moments in the snapshot) loads that way and resumes bit for bit;
    trust_checkpoint=True loads a trusted file in full."""
    marker = tmp_path / "ran.txt"

    def run(out, steps, *callbacks, resume=None, **kw):
        model = tiny_bert()
        _, ctrl = setup_unified_lora(model, target_modules=["query", "value"], modules_to_save=["classifier"],
                                     signal=STRESS, mirror=MirrorConfig(snapshot_optimizer=True), print_fn=None)
        Trainer(model=model, args=targs(out, max_steps=steps, learning_rate=2e-3, save_strategy="steps",
                                        save_steps=4), train_dataset=TokenDataset(n=16),
                callbacks=[UnifiedLoRACallback(ctrl, **kw), *callbacks]).train(resume_from_checkpoint=resume)
        return ctrl, _final_lora(model)

    full, full_weights = run(tmp_path / "a", 8)
    saved = torch.load(tmp_path / "a" / "checkpoint-4" / CONTROLLER_STATE_NAME, weights_only=True)
    assert saved["mirror"]["weights"] is not None and saved["mirror"]["opt_state"][0]["exp_avg"] is not None
    resumed, weights = run(tmp_path / "a", 8, resume=str(tmp_path / "a" / "checkpoint-4"))
    assert [(r.step, r.phi, r.mode, r.rank) for r in resumed.trace] == [
        (r.step, r.phi, r.mode, r.rank) for r in full.trace[4:]]
    assert all(torch.equal(weights[k], full_weights[k]) for k in full_weights)

    run(tmp_path / "b", 8, PoisonControllerState(4, marker))
    with pytest.raises(pickle.UnpicklingError, match="refused to load it: it holds exec.*trust_checkpoint=True"):
        run(tmp_path / "b", 8, resume=str(tmp_path / "b" / "checkpoint-4"))
    assert not marker.exists()
    resumed, _ = run(tmp_path / "b", 8, resume=str(tmp_path / "b" / "checkpoint-4"), trust_checkpoint=True)
    assert marker.exists() and resumed.global_step == 8  # a trusted file is unpickled in full (so its code ran)


def test_a_best_checkpoint_whose_controller_state_would_run_code_is_refused(tmp_path):
    """load_best_model_at_end read the best checkpoint's controller state with weights_only=False too."""
    marker = tmp_path / "ran.txt"
    model, _, ctrl = build("bert", signal=BEST_SIGNAL)
    trainer = _best_trainer(tmp_path, model, UnifiedLoRACallback(ctrl), PoisonControllerState(2, marker))
    with pytest.raises(pickle.UnpicklingError, match="refused to load it.*trust_checkpoint=True"):
        trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2") and not marker.exists()


def test_a_controller_state_cut_short_is_a_value_error_naming_the_file(tmp_path):
    """A checkpoint copied with its controller file cut short: the resume failed in torch.load with a bare
    "OSError: [Errno 22] Invalid argument" or "PytorchStreamReader failed reading zip archive", naming no file."""
    model, _, ctrl = build("bert")
    Trainer(model=model, args=_resume_args(tmp_path, 3), train_dataset=TokenDataset(n=6),
            callbacks=[UnifiedLoRACallback(ctrl)]).train()
    path = tmp_path / "checkpoint-3" / CONTROLLER_STATE_NAME
    path.write_bytes(path.read_bytes()[:200])
    model2, _, ctrl2 = build("bert")
    trainer = Trainer(model=model2, args=_resume_args(tmp_path, 4), train_dataset=TokenDataset(n=6),
                      callbacks=[UnifiedLoRACallback(ctrl2)])
    with pytest.raises(ValueError, match=f"{path}: cannot read it .*damaged or incomplete"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


class Interrupt(TrainerCallback):
    """Raises at the end of step `at` (a Ctrl-C, an OOM), once."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.at:
            self.at = None
            raise KeyboardInterrupt


def test_a_resume_in_the_same_process_replays_the_steps_once_in_the_trace(tmp_path):
    """train() interrupted at step 5 (last checkpoint: 3), then train(resume_from_checkpoint=True) with the same
    controller and callback: the Trainer replays steps 3 and 4. Their records from the first attempt stayed in
    ctrl.trace, the trace_path file and step_losses (steps 0 1 2 3 4 3 4 5 6 7), so a plot of the run zigzagged.
    Now the resume drops them: the trace equals the uninterrupted run's (GA 2, a cosine schedule), as do the weights."""
    signal = SignalConfig(kind="loss", alpha=0.3, loss_scale=0.1)  # enters MIRROR at step 5

    def run(out, *callbacks, resume=False):
        model = tiny_bert()
        _, ctrl = setup_unified_lora(model, target_modules=["query", "value"], modules_to_save=["classifier"],
                                     signal=signal, print_fn=None, trace_path=str(out / "trace.jsonl"))
        cb = UnifiedLoRACallback(ctrl)
        args = targs(out, max_steps=8, learning_rate=2e-3, save_strategy="steps", save_steps=3,
                     lr_scheduler_type="cosine", warmup_steps=1, gradient_accumulation_steps=2)
        trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(n=24), callbacks=[cb, *callbacks])
        return model, ctrl, cb, trainer

    model, ctrl, cb, trainer = run(tmp_path / "full")
    trainer.train()
    full = [(r.step, r.phi, r.mode, r.rank, r.lr, r.loss) for r in ctrl.trace]
    assert len({r[2] for r in full}) > 1

    model2, ctrl2, cb2, trainer2 = run(tmp_path / "cut", Interrupt(at=5))
    with pytest.raises(KeyboardInterrupt):
        trainer2.train()
    assert ctrl2.global_step == 5
    trainer2.train(resume_from_checkpoint=True)  # the same Trainer, controller and callback
    assert [(r.step, r.phi, r.mode, r.rank, r.lr, r.loss) for r in ctrl2.trace] == full
    from unified_lora.trace import read_trace

    assert [r["step"] for r in read_trace(tmp_path / "cut" / "trace.jsonl")] == list(range(8))
    assert cb2.step_losses == cb.step_losses
    w, w2 = _final_lora(model), _final_lora(model2)
    assert all(torch.equal(w[k], w2[k]) for k in w)


def _same(a, b) -> bool:
    """Two controller states (nested dicts, lists, tensors) hold the same values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_a_same_process_resume_with_a_damaged_trace_raises_before_the_controller_loads(tmp_path):
    """A resume in the same process (the writer has written) rewinds the trace file after `ctrl.load_state_dict`,
    whose own check of the file skips a writer that has written: a damaged file raised there, after the controller
    had loaded the checkpoint's state (step 3 of a controller at step 5). The rewind is now read and checked first:
    the error names the file and line, and the controller, its records and the file are as they were."""
    model = tiny_bert()
    _, ctrl = setup_unified_lora(model, target_modules=["query", "value"], modules_to_save=["classifier"],
                                 print_fn=None, trace_path=str(tmp_path / "trace.jsonl"))
    trainer = Trainer(model=model, args=targs(tmp_path, max_steps=6, save_strategy="steps", save_steps=3),
                      train_dataset=TokenDataset(n=16), callbacks=[UnifiedLoRACallback(ctrl), Interrupt(at=5)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    path = tmp_path / "trace.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    damaged = "".join(lines[:2] + ["not a record\n"] + lines[2:])
    path.write_text(damaged)
    before, records = ctrl.state_dict(), list(ctrl.trace)
    assert before["global_step"] == 5
    with pytest.raises(ValueError, match=f"{path}: line 3 is not a step's record"):
        trainer.train(resume_from_checkpoint=True)
    assert _same(ctrl.state_dict(), before) and ctrl.trace == records
    assert path.read_text() == damaged


def test_a_trace_file_older_than_the_checkpoint_warns_once_at_a_trainer_resume_in_a_new_process(tmp_path):
    """A resume in a new process: `ctrl.load_state_dict` keeps the trace file's lines before the checkpoint, and the
    callback's rewind of the same file (read before the load) applied them a second time. A file older than the
    checkpoint (steps 0 and 1, the state at step 3) then gave its warning twice, and the file was rewritten twice.
    The rewind is the same-process resume's (a writer that has written), so the warning comes once."""
    import warnings

    from unified_lora.trace import read_trace

    path = tmp_path / "trace.jsonl"

    def trainer():
        model = tiny_bert()
        _, ctrl = setup_unified_lora(model, target_modules=["query", "value"], modules_to_save=["classifier"],
                                     print_fn=None, trace_path=str(path))
        return Trainer(model=model, args=targs(tmp_path, max_steps=5, save_strategy="steps", save_steps=3),
                       train_dataset=TokenDataset(n=16), callbacks=[UnifiedLoRACallback(ctrl)])

    trainer().train()
    path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                            if json.loads(line)["step"] < 2))  # the file as it was at step 2, the state at 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer().train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    said = [str(w.message) for w in caught if "the trace file lacks" in str(w.message)]
    assert len(said) == 1 and "resuming at step 3, the trace file lacks step 2 " in said[0], said
    assert [r["step"] for r in read_trace(path)] == [0, 1, 3, 4]


def test_a_resume_without_controller_state_and_strict_resume_false_goes_on_at_the_controllers_rank(tmp_path):
    """The Trainer's weights load restores the rank saved with them (each layer's `_extra_state`; not MULTI's 8 here),
    and a controller that restarts from its own state (no file, strict_resume=False) is in MULTI (8): its first
    step refused the mismatch. The restart now puts its adapters at its own rank, as the warning says."""
    signal = SignalConfig(kind="loss", alpha=0.3, loss_scale=0.1)  # MIRROR from step ~5
    model, _, ctrl = build("bert", signal=signal)
    Trainer(model=model, args=_resume_args(tmp_path, 6), train_dataset=TokenDataset(n=16),
            callbacks=[UnifiedLoRACallback(ctrl)]).train()
    saved_rank = ctrl.rank
    assert saved_rank != 8, "the run must end away from MULTI for the weights' rank to differ from a fresh one's"
    os.remove(tmp_path / "checkpoint-6" / CONTROLLER_STATE_NAME)
    model2, _, ctrl2 = build("bert", signal=signal)
    trainer = Trainer(model=model2, args=_resume_args(tmp_path, 8), train_dataset=TokenDataset(n=16),
                      callbacks=[UnifiedLoRACallback(ctrl2, strict_resume=False)])
    with pytest.warns(UserWarning, match=r"the controller restarts, its adapters at its rank 8"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
    assert ctrl2.global_step == 2 and [r.rank for r in ctrl2.trace][0] == 8
    assert {a.rank for a in ctrl2.adapters} == {ctrl2.rank}


class _TrainerWarnings(logging.Handler):
    """Collects what transformers' Trainer logs (its logger does not propagate to pytest's caplog)."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("transformers.trainer").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("transformers.trainer").removeHandler(self)


def test_adapter_only_checkpoints_hold_no_base_weights_and_resume_bit_identically(tmp_path):
    """`save_base=False`: every checkpoint holds what trains (every block, each layer's rank), not the frozen base
    (the old callback had no such switch: each checkpoint was the whole model). A fresh model resumed from such a
    checkpoint continues exactly as the run whose checkpoints held everything (same trace, same rank, bit-identical
    blocks), and the Trainer reports no missing keys for the base it deliberately left out."""
    from safetensors.torch import load_file

    from unified_lora import lora_state_dict
    from unified_lora.callbacks import ADAPTER_ONLY_NAME

    signal = SignalConfig(kind="loss", alpha=0.3, loss_scale=0.1)

    def run(out, save_base, resume=None):
        model, adapters, ctrl = build("llama", signal=signal)
        if resume:
            with torch.no_grad():  # the blocks must come from the checkpoint
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(0.01)
        with _TrainerWarnings() as logged:
            Trainer(model=model, args=_resume_args(out, 8), train_dataset=TokenDataset(n=16, causal=True),
                    callbacks=[UnifiedLoRACallback(ctrl, save_base=save_base)]).train(resume_from_checkpoint=resume)
        return model, adapters, ctrl, logged.messages

    full_model, _, full_ctrl, _ = run(tmp_path / "full", save_base=True)
    slim_model, _, slim_ctrl, _ = run(tmp_path / "slim", save_base=False)
    trace = [(r.step, r.phi, r.mode, r.rank, r.lr) for r in full_ctrl.trace]
    assert [(r.step, r.phi, r.mode, r.rank, r.lr) for r in slim_ctrl.trace] == trace
    assert trace[2][3] == 16 and slim_ctrl.mirror.held is not None  # checkpoint-3 is at rank 16, a fresh model at 8

    slim, full = tmp_path / "slim" / "checkpoint-3", tmp_path / "full" / "checkpoint-3"
    saved = load_file(str(slim / "model.safetensors"))
    assert set(saved) == set(lora_state_dict(slim_model))  # blocks and ranks, no base weight
    assert not any(".base_layer." in k or "embed_tokens" in k or "norm" in k for k in saved)
    assert (slim / "model.safetensors").stat().st_size * 5 < (full / "model.safetensors").stat().st_size
    assert (slim / ADAPTER_ONLY_NAME).is_file()

    model2, adapters2, ctrl2, logged = run(tmp_path / "slim", save_base=False, resume=str(slim))
    assert [(r.step, r.phi, r.mode, r.rank, r.lr) for r in ctrl2.trace] == trace[3:]
    assert {a.rank for a in adapters2.values()} == {full_ctrl.rank}
    final, resumed = _final_lora(full_model), _final_lora(model2)
    assert final.keys() == resumed.keys() and all(torch.equal(final[k], resumed[k]) for k in final)
    assert not [m for m in logged if "missing keys" in m or "unexpected keys" in m], logged


def test_load_best_model_at_end_loads_an_adapter_only_checkpoint(tmp_path):
    """The best checkpoint holds no base weights: the Trainer loads its blocks and ranks into the model (whose base
    is the same), the callback its controller state, and the model gives exactly the best metric, without "missing
    keys" warnings for the base."""
    from unified_lora.callbacks import ADAPTER_ONLY_NAME

    model, adapters, ctrl = build("bert", signal=BEST_SIGNAL)
    trainer = _best_trainer(tmp_path, model, UnifiedLoRACallback(ctrl, save_base=False))
    with _TrainerWarnings() as logged:
        trainer.train()
    best = trainer.state.best_model_checkpoint
    assert os.path.isfile(os.path.join(best, ADAPTER_ONLY_NAME))
    ranks = [r.rank for r in ctrl.trace]
    best_step = int(best.rsplit("-", 1)[1])
    assert ranks[best_step - 1] != ranks[-1] and ctrl.rank == ranks[best_step - 1]
    assert all(a.rank == ctrl.rank for a in adapters.values())
    assert trainer.evaluate()["eval_loss"] == trainer.state.best_metric
    assert not [m for m in logged.messages if "missing keys" in m], logged.messages


def test_an_adapter_only_save_is_marked_refuses_merged_layers_and_keeps_a_resized_vocabulary(tmp_path):
    """`adapter_only_saves(model)`: the folder has the marker (`from_pretrained` alone would build the model around
    random base weights, which its load report lists as missing), and the CLI's --model says what it is. A model
    whose deltas are merged into the base weights (which the save leaves out) is refused before anything is written.
    A vocabulary resized after setup (new embedding and head rows, which exist nowhere else) is kept, and the
    checkpoint reloads into the base resized the same way with the same logits."""
    from safetensors.torch import load_file

    from unified_lora import merge_adapters, unmerge_adapters
    from unified_lora.callbacks import ADAPTER_ONLY_NAME, adapter_only_saves
    from unified_lora.training import UsageError, resolve_model

    def fresh():
        model = tiny_llama()
        adapters, _ = setup_unified_lora(model, ["q_proj", "lm_head"], print_fn=None)
        return model, adapters

    model, adapters = fresh()
    adapter_only_saves(model)
    merge_adapters(model)
    with pytest.raises(ValueError, match="merged into the frozen base weight.*unmerge_adapters"):
        model.save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged" / "model.safetensors").exists()
    unmerge_adapters(model)

    model.resize_token_embeddings(108)
    with torch.no_grad():
        for layer in adapters.values():
            for b in layer.lora_B:
                b.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "slim")
    assert (tmp_path / "slim" / ADAPTER_ONLY_NAME).is_file()
    saved = load_file(str(tmp_path / "slim" / "model.safetensors"))
    assert "model.embed_tokens.weight" in saved and not any("q_proj.base_layer" in k for k in saved)
    with pytest.raises(UsageError, match="adapter-only checkpoint"):
        resolve_model(str(tmp_path / "slim"))

    model2, _ = fresh()
    model2.resize_token_embeddings(108)
    assert model2.load_state_dict(saved, strict=False).missing_keys  # not under adapter_only_saves: reported
    x = torch.randint(0, 108, (2, 6))
    with torch.no_grad():
        assert torch.equal(model.eval()(x).logits, model2.eval()(x).logits)
    adapter_only_saves(model, False)
    model.save_pretrained(tmp_path / "whole")
    assert not (tmp_path / "whole" / ADAPTER_ONLY_NAME).exists()
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in whole


def test_a_whole_save_over_an_adapter_only_one_is_not_refused_as_adapter_only(tmp_path):
    """A whole-model save into a folder that held an adapter-only save (the same `output_dir` for `save_model` of a
    QLoRA run, then of a run with `save_base=True`) replaces the weights but left the earlier save's marker: the
    CLI's --model refused the whole model as "an adapter-only checkpoint", and the marker told how to load it into a
    base. The folder counts as adapter-only only while its weights are what the marker lists (sharded too)."""
    from unified_lora.callbacks import ADAPTER_ONLY_NAME, adapter_only_saves
    from unified_lora.training import UsageError, resolve_model

    model, _, ctrl = build("llama")
    adapter_only_saves(model)
    model.save_pretrained(tmp_path / "out")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="4KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    for folder in ("out", "sharded"):
        with pytest.raises(UsageError, match="adapter-only checkpoint"):
            resolve_model(str(tmp_path / folder))

    trainer = Trainer(model=model, args=targs(tmp_path / "out"),
                      callbacks=[UnifiedLoRACallback(ctrl, save_base=True)])
    trainer.save_model()  # the whole model, over the adapter-only save
    assert (tmp_path / "out" / ADAPTER_ONLY_NAME).is_file()  # (the earlier save's, left there)
    assert resolve_model(str(tmp_path / "out")) == str(tmp_path / "out")


def test_an_adapter_only_checkpoint_keeps_the_running_statistics_of_a_frozen_batch_norm(tmp_path):
    """A frozen batch norm's forward in training mode still updates its running mean and variance, which its eval
    mode computes with. The adapter-only save left them out with the rest of the frozen base: the checkpoint
    reloaded (README's recipe, the Trainer's resume or `load_best_model_at_end`) into the fresh base's statistics,
    other outputs than the model that was saved, silently. They are kept now (a few numbers per channel)."""
    from safetensors.torch import load_file
    from transformers import ResNetConfig, ResNetForImageClassification

    def fresh():
        torch.manual_seed(0)
        model = ResNetForImageClassification(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                                          depths=[1, 1], num_labels=2))
        _, ctrl = setup_unified_lora(model, ["classifier.1"], signal="loss", print_fn=None)
        return model, ctrl

    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 16, 16, generator=g) * 3 + 1, "labels": torch.tensor(i % 2)}
            for i in range(8)]
    model, ctrl = fresh()
    Trainer(model=model, args=targs(tmp_path, max_steps=2, save_strategy="steps", save_steps=2), train_dataset=data,
            callbacks=[UnifiedLoRACallback(ctrl, save_base=False)]).train()
    saved = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert "resnet.embedder.embedder.normalization.running_mean" in saved
    assert not any(k.endswith("normalization.weight") or "convolution" in k for k in saved)  # the frozen base
    model2, _ = fresh()
    model2.load_state_dict(saved, strict=False)
    x = torch.randn(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        assert torch.equal(model.eval()(pixel_values=x).logits, model2.eval()(pixel_values=x).logits)
    # the statistics moved in training, but the checkpoint holds them: not taken for another base
    from unified_lora.callbacks import BASE_FINGERPRINT_KEY, load_adapter_only

    model3, _ = fresh()
    load_adapter_only(model3, tmp_path / "checkpoint-2")
    with torch.no_grad():
        assert torch.equal(model.eval()(pixel_values=x).logits, model3.eval()(pixel_values=x).logits)
    recorded = torch.load(tmp_path / "checkpoint-2" / CONTROLLER_STATE_NAME, weights_only=True)[BASE_FINGERPRINT_KEY]
    assert "resnet.embedder.embedder.convolution.weight" in recorded["tensors"]
    assert not any("running" in k for k in recorded["tensors"])


def test_an_adapter_only_resume_on_another_base_is_refused_and_a_moved_copy_of_the_base_is_not(tmp_path):
    """An adapter-only checkpoint holds no base: a resume onto another base of the same architecture (the instruct
    model instead of the base, another fine-tune of it) loaded the blocks and trained on, silently, against other
    outputs than the ones they were trained against. The controller file (and the folder's marker) now records a
    fingerprint of the frozen weights the save left out: another base raises a ValueError naming the saved base and
    what differs (a warning with strict_resume=False, and the run goes on); the same base copied to another folder
    resumes. A whole-model checkpoint (save_base=True) holds its base, which the resume loads: nothing recorded.
    A controller file without the fingerprint (saved before it) loads as before."""
    import json
    import shutil

    signal = SignalConfig(kind="loss", alpha=0.3, loss_scale=0.1)
    tiny_llama().save_pretrained(tmp_path / "base")
    shutil.copytree(tmp_path / "base", tmp_path / "moved")
    other = tiny_llama()
    with torch.no_grad():  # a fine-tune of the same base: every weight moved a little
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    other.save_pretrained(tmp_path / "instruct")

    def trainer(base, out, steps, save_base=False, **kw):
        model = LlamaForCausalLM.from_pretrained(tmp_path / base)
        _, ctrl = setup_unified_lora(model, ["q_proj", "v_proj"], signal=signal, print_fn=None)
        return Trainer(model=model, args=_resume_args(out, steps), train_dataset=TokenDataset(n=16, causal=True),
                       callbacks=[UnifiedLoRACallback(ctrl, save_base=save_base, **kw)]), ctrl

    trainer("base", tmp_path / "run", 3)[0].train()
    ckpt = tmp_path / "run" / "checkpoint-3"
    saved_base = re.escape(repr(str(tmp_path / "base")))
    with pytest.raises(ValueError, match=r"trained on another base model than this one\. Of the 21 frozen base "
                                         r"tensors .* 21 have other values \(e\.g\. 'lm_head\.weight'\).* The saved "
                                         rf"base: {saved_base}; .*strict_resume=False makes this a warning"):
        trainer("instruct", tmp_path / "run", 4)[0].train(resume_from_checkpoint=str(ckpt))
    t, ctrl = trainer("instruct", tmp_path / "run", 4, strict_resume=False)
    with pytest.warns(UserWarning, match="trained on another base model.*going on with this base"):
        t.train(resume_from_checkpoint=str(ckpt))
    assert ctrl.global_step == 4  # the controller state was loaded (step 3), then one step
    t, ctrl = trainer("moved", tmp_path / "run", 4)
    t.train(resume_from_checkpoint=str(ckpt))  # the same base from another folder: no refusal
    assert ctrl.global_step == 4

    from unified_lora.callbacks import ADAPTER_ONLY_NAME, BASE_FINGERPRINT_KEY

    state = torch.load(ckpt / CONTROLLER_STATE_NAME, weights_only=True)
    marker = json.loads((ckpt / ADAPTER_ONLY_NAME).read_text())
    assert state[BASE_FINGERPRINT_KEY] == marker["base_fingerprint"]
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in marker["base_fingerprint"]["tensors"]
    del state[BASE_FINGERPRINT_KEY]  # a file saved before the fingerprint: resumes as before
    torch.save(state, ckpt / CONTROLLER_STATE_NAME)
    t, ctrl = trainer("instruct", tmp_path / "run", 4)
    t.train(resume_from_checkpoint=str(ckpt))
    assert ctrl.global_step == 4

    trainer("base", tmp_path / "whole", 3, save_base=True)[0].train()
    assert BASE_FINGERPRINT_KEY not in torch.load(tmp_path / "whole" / "checkpoint-3" / CONTROLLER_STATE_NAME,
                                                  weights_only=True)


def test_the_marker_names_the_files_written_and_load_adapter_only_checks_the_base(tmp_path):
    """The marker's `how_to_load` always said `model.safetensors`, which a `variant=` save (`model.fp16.safetensors`)
    or a sharded one (an index and its shards) does not write: it now names the files the save wrote
    ("weights_files"), which `load_adapter_only` reads, after checking the base against the marker's fingerprint
    (the README's manual recipe had no check). A vocabulary resized after setup is in the checkpoint, so a fresh
    base resized the same way (new rows drawn anew) is not taken for another base. `push_to_hub=True` uploaded
    inside transformers' save, before the marker was written: it is refused before anything is written."""
    import json

    from unified_lora.callbacks import ADAPTER_ONLY_NAME, adapter_only_saves, load_adapter_only

    def fresh(tweak=False):
        model = tiny_llama()
        adapters, _ = setup_unified_lora(model, ["q_proj", "lm_head"], print_fn=None)
        if tweak:  # another fine-tune of the same base: one frozen weight moved
            with torch.no_grad():
                model.model.layers[1].mlp.down_proj.weight.mul_(1.01)
        model.resize_token_embeddings(108)  # its new rows are drawn at random
        return model, adapters

    model, adapters = fresh()
    with torch.no_grad():
        for layer in adapters.values():
            for b in layer.lora_B:
                b.normal_(0, 0.1)
    adapter_only_saves(model)
    x = torch.randint(0, 108, (2, 6))
    with torch.no_grad():
        want = model.eval()(x).logits
    saves = {"plain": ({}, ["model.safetensors"], None),
             "variant": ({"variant": "fp16"}, ["model.fp16.safetensors"], None),
             "sharded": ({"max_shard_size": "4KB"}, None, "model.safetensors.index.json")}
    for name, (kw, files, index) in saves.items():
        model.save_pretrained(tmp_path / name, **kw)
        marker = json.loads((tmp_path / name / ADAPTER_ONLY_NAME).read_text())
        assert marker["weights_index"] == index
        if files is None:
            files = sorted(set(json.loads((tmp_path / name / index).read_text())["weight_map"].values()))
            assert len(files) > 1
        assert marker["weights_files"] == files and all((tmp_path / name / f).is_file() for f in files)
        assert all(f in marker["how_to_load"] for f in files) and (index or "") in marker["how_to_load"]
        if name != "plain":
            assert "/model.safetensors)" not in marker["how_to_load"]
        model2, _ = fresh()
        assert not any(".lora_" in k for k in load_adapter_only(model2, tmp_path / name).missing_keys)
        with torch.no_grad():
            assert torch.equal(model2.eval()(x).logits, want), name

    other, _ = fresh(tweak=True)
    with pytest.raises(ValueError, match=r"load_adapter_only: .*sharded was trained on another base model.*1 has "
                                         r"other values \(e\.g\. 'model\.layers\.1\.mlp\.down_proj\.weight'\)"
                                         r".*check_base=False\) loads it anyway"):
        load_adapter_only(other, tmp_path / "sharded")
    load_adapter_only(other, tmp_path / "sharded", check_base=False)
    from unified_lora.callbacks import _base_fingerprint

    before = _base_fingerprint(other)
    w = other.model.layers[0].mlp.up_proj.weight
    w.data = w.data.t().contiguous().t()  # the same values under other strides: the same fingerprint
    assert not w.is_contiguous() and _base_fingerprint(other) == before
    with torch.no_grad():
        assert not torch.equal(other.eval()(x).logits, want)  # loaded, on its own base

    with pytest.raises(ValueError, match=r"push_to_hub=True.*before unified_lora_adapter_only\.json.*upload_folder"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    assert not (tmp_path / "hub").exists()


@pytest.fixture(scope="module")
def fsdp_trainer_run(tmp_path_factory):
    """_fsdp_trainer_worker.py over 2 torchrun processes, once for the tests that read its records."""
    from test_cli_ddp import _torchrun

    out = tmp_path_factory.mktemp("fsdp_trainer")
    worker = os.path.join(os.path.dirname(__file__), "_fsdp_trainer_worker.py")
    p = _torchrun(str(out), entry=(worker,))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_trainer_fsdp2_callback_mirror_cycle_checkpoints_per_process_and_resumes_mid_mirror(fsdp_trainer_run):
    """The Trainer's own FSDP2 path (accelerate's fully_shard inside train(), after setup_unified_lora; dcp
    checkpoints) over 2 torchrun processes on gloo, with accelerate's GPU-only FSDP selection set by hand
    (_fsdp_trainer_worker.py says how). Both processes make the same decisions (a MULTI->MIRROR snapshot, the LR
    multiplier, a restore); each writes its own controller state (its shards: process 0's file alone was read by
    every process, and its digest of DTensors raised on process 0 while process 1 waited); a resume mid-MIRROR
    continues the run bit for bit, and so does one saved before the first MIRROR, where the rank-16 blocks have no
    optimizer state yet (accelerate saved none for them, and its load_fsdp_optimizer failed: "Missing key in
    checkpoint state_dict"); a resume where one process's controller file is missing, or another's damaged, raises the
    same error on both processes (the other one went on into the training's collectives and waited), and with
    strict_resume=False both processes restart their controllers."""
    r0, r1 = fsdp_trainer_run
    full = r0["full"]
    assert full["sharded"] and r1["full"]["sharded"]  # the blocks are DTensors: FSDP2 did shard them
    assert full["trace"] == r1["full"]["trace"]  # lockstep
    modes = [t[3] for t in full["trace"]]
    assert modes == [1, 1, 1, 2, 2, 2, 2, 1] and full["trace"][3][6] == "saved" and full["trace"][7][6] == "restored"
    assert full["trace"][3][5] < full["trace"][2][5]  # MIRROR's LR multiplier
    assert {"unified_lora_controller_rank0.pt", "unified_lora_controller_rank1.pt"} <= set(r0["files"])
    assert CONTROLLER_STATE_NAME not in r0["files"]
    for r in (r0, r1):  # resumed from checkpoint-6, with the snapshot and its optimizer moments held
        assert r["resumed"]["trace"] == r["full"]["trace"][6:]
        assert all(torch.equal(a, b) for a, b in zip(r["resumed"]["shards"], r["full"]["shards"]))
    assert r0["full"]["shards"][0].shape[0] == 2  # each process holds half of a rank-4 block's rows
    for r in (r0, r1):  # resumed from checkpoint-3, saved before the rank-16 blocks ever stepped
        assert r["resumed3"]["trace"] == r["full"]["trace"][3:]
        assert all(torch.equal(a, b) for a, b in zip(r["resumed3"]["shards"], r["full"]["shards"]))
        assert not r["full"]["warnings"] and not r["resumed3"]["warnings"]  # no "will not resume" any more
    missing, damaged = r0["missing"], r0["damaged"]
    assert missing == r1["missing"] and damaged == r1["damaged"]  # the same error on both processes
    assert missing[0] == "FileNotFoundError" and "process 1 could not" in missing[1]
    assert "unified_lora_controller_rank1.pt does not exist" in missing[1] and "process 0" not in missing[1]
    assert damaged[0] == "ValueError" and "process 0 could not" in damaged[1] and "damaged" in damaged[1]
    # strict_resume=False: process 1 restarts its controller, and so does process 0 (which loaded its state before,
    # and the two then decided apart: ctrl.step's lockstep check raised)
    restarted = [r["restarted"] for r in (r0, r1)]
    assert restarted[0]["trace"] == restarted[1]["trace"] and restarted[0]["trace"][0][0] == 0
    assert "process 1 goes on without its controller state" in restarted[0]["warnings"][0]
    assert "no controller state at" in restarted[1]["warnings"][0]


def test_trainer_fsdp2_a_non_finite_gradient_in_one_process_shard_is_skipped_on_every_process(fsdp_trainer_run):
    """Under the Trainer's FSDP2 each process holds a shard of every gradient, and with max_grad_norm=0 accelerate
    does not clip (a NaN stays in the entries it is in; a finite max_grad_norm clips an inf entry to NaN and the rest
    to 0): a NaN in process 1's shard alone, its loss finite, was stepped on by both processes (the controller on the
    loss signal reads no gradient), and read on process 1 alone it would have been skipped there and stepped on by
    process 0. The callback's verdict is all-reduced over the shards: both processes skip step 3, say so once, and
    keep their shards as they were."""
    r0, r1 = (r["nan_grad"] for r in fsdp_trainer_run)
    for r in (r0, r1):
        assert r["said"] == ["UnifiedLoRACallback: step 3: non-finite loss or gradient (loss "
                             f"{r0['trace'][2][1]:g}); optimizer update skipped (its gradients dropped)"], r["said"]
        assert len(r["before"]) == len(r["after"]) > 0
        assert all(torch.equal(a, b) for a, b in zip(r["before"], r["after"]))
        assert all(torch.isfinite(t).all() for t in r["final"])
    assert r0["steps"] == r1["steps"] == 5 and r0["trace"] == r1["trace"]


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("make,dev", [
    (lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1), "cpu"),
    (lambda ps: torch.optim.AdamW(ps, lr=0.1, fused=True), "cpu"),
    (lambda ps: torch.optim.Adam(ps, lr=0.1, amsgrad=True, foreach=True, weight_decay=0.1), "cpu"),
    pytest.param(lambda ps: torch.optim.AdamW(ps, lr=0.1, capturable=True), "cuda", marks=_CUDA),
    pytest.param(lambda ps: torch.optim.Adam(ps, lr=0.1, fused=True), "cuda", marks=_CUDA),
], ids=["adamw", "adamw-fused", "adam-amsgrad-foreach", "capturable-cuda", "fused-cuda"])
@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_made_up_first_optimizer_state_is_adams_own_and_trains_bit_for_bit(make, dev, default_dtype):
    """The state `_fill_lazy_state` gives the parameters without one before a save under the Trainer's FSDP2 (so that
    accelerate's load finds one for each) is the one Adam's first step creates (a CPU `step` of torch's scalar dtype,
    or a float32 one on the parameter's device with fused/capturable), and training goes on bit for bit: a parameter
    without a gradient (a paused block) keeps it untouched, weight decay included, and starts from it as from its own."""
    from unified_lora.callbacks import _fill_lazy_state

    before = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        g = torch.Generator().manual_seed(0)
        w = [torch.randn(4, 3, generator=g, dtype=torch.float32) for _ in range(2)]
        grads = [[torch.randn(4, 3, generator=g, dtype=torch.float32) for _ in range(2)] for _ in range(3)]
        runs = []
        for fill in (False, True):
            ps = [torch.nn.Parameter(t.clone().to(dev)) for t in w]
            opt = make(ps)
            if fill:
                opt.register_state_dict_pre_hook(_fill_lazy_state)
            for step, gs in enumerate(grads):
                if fill:
                    opt.state_dict()  # (a save) the hook fills what has no state: both parameters before step 0
                    if step == 0:
                        made = {k: (v.dtype, v.device, v.shape, type(v)) for k, v in opt.state[ps[1]].items()}
                        assert all(not v.any() for v in opt.state[ps[1]].values())
                for p, gr in zip(ps, gs):
                    p.grad = gr.to(dev) if (p is ps[0] or step == 2) else None  # ps[1] paused for two steps
                opt.step()
                if step == 0 and not fill:
                    assert not opt.state.get(ps[1])  # Adam made none for the paused one
                if step == 1 and fill:
                    assert float(opt.state[ps[1]]["step"]) == 0 and torch.equal(ps[1].detach().cpu(), w[1])
            runs.append((ps, opt, made if fill else None))
        (ps_a, opt_a, _), (ps_b, opt_b, made) = runs
        # the made-up state is the one Adam's own first step created for ps[0] (and later for ps[1])
        assert made == {k: (v.dtype, v.device, v.shape, type(v)) for k, v in opt_a.state[ps_a[0]].items()}
        for pa, pb in zip(ps_a, ps_b):
            assert torch.equal(pa, pb)
            sa, sb = opt_a.state[pa], opt_b.state[pb]
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype
                                                  and sa[k].device == sb[k].device for k in sa)
        assert float(opt_b.state[ps_b[1]]["step"]) == 1  # ps[1]'s first real step
    finally:
        torch.set_default_dtype(before)


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["sgd", "sgd-momentum"])
def test_stateless_block_warning_only_where_fsdp_load_would_ask_for_a_missing_state(momentum, recwarn):
    """`on_save`'s "will not resume under FSDP2" warning (other optimizers than Adam/AdamW) is given exactly where
    accelerate's `load_fsdp_optimizer` would miss a state: its template is a fresh optimizer's after dcp's own
    `_init_optim_state`. SGD without momentum keeps no state for any parameter, so its load asks for none."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    model, _, ctrl = build()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1, momentum=momentum)
    ctrl.attach_optimizer(opt)
    data = TokenDataset(n=4)
    model(input_ids=data.x, labels=data.y).loss.backward()  # rank 8: rank 16's blocks get none
    opt.step()
    opt.zero_grad()
    fresh = torch.optim.SGD([torch.nn.Parameter(p.detach().clone()) for p in trainable], lr=0.1, momentum=momentum)
    _init_optim_state(fresh)  # what the load asks for, parameter by parameter
    asked = [bool(fresh.state.get(q)) for q in fresh.param_groups[0]["params"]]
    missing = [a and not opt.state.get(p) for a, p in zip(asked, trainable)]
    assert any(missing) == (momentum > 0)  # (the case is real: rank 16's blocks did not step)
    UnifiedLoRACallback(ctrl)._warn_stateless_blocks("checkpoint-1")
    warned = [str(w.message) for w in recwarn if "will not resume" in str(w.message)]
    assert len(warned) == any(missing)
    if warned:
        assert "lora_A.2" in warned[0] and "(SGD)" in warned[0]


class _NaNOnce(TrainerCallback):
    """Makes the training forward of optimizer step `at` (1-based; "all": every step) NaN, through its input
    embeddings, and records the trained parameters before and after that step."""

    def __init__(self, model, at):
        self.model, self.at, self.step, self.before, self.after = model, at, 0, None, None
        model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _trained(self):
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def _pre(self, module, args, kwargs):
        if module.training and self.at in (self.step, "all"):
            kwargs = dict(kwargs)
            kwargs["inputs_embeds"] = module.bert.embeddings.word_embeddings(kwargs.pop("input_ids")) * float("nan")
            return args, kwargs

    def on_step_begin(self, args, state, control, **kw):
        self.step = state.global_step + 1
        if self.step == self.at:
            self.before = self._trained()

    def on_step_end(self, args, state, control, **kw):
        if self.step == self.at:
            self.after = self._trained()


def test_a_non_finite_step_under_the_trainer_skips_its_update_and_the_run_goes_on(tmp_path):
    """The Trainer steps its optimizer on a NaN loss (it only leaves it out of its log): one NaN batch of ten turned
    every adapter and the head NaN for good, and every later loss was NaN. The callback drops that step's gradients,
    so the optimizer leaves every weight and its Adam state as they were; the run goes on with finite losses."""
    model, _, ctrl = build("bert")
    lines = []
    ctrl.print_fn = lines.append
    nan = _NaNOnce(model, at=3)
    trainer = Trainer(model=model, args=targs(tmp_path, num_train_epochs=2, learning_rate=1e-3),
                      train_dataset=TokenDataset(), callbacks=[UnifiedLoRACallback(ctrl), nan])
    trainer.train()
    losses = [r.loss for r in ctrl.trace]
    assert len(losses) == 10 and not math.isfinite(losses[2])
    assert all(math.isfinite(v) for i, v in enumerate(losses) if i != 2)
    assert ctrl.nonfinite_steps == 1
    assert nan.before.keys() == nan.after.keys() and all(torch.equal(nan.before[n], nan.after[n]) for n in nan.before)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    steps = {int(s["step"]) for s in trainer.optimizer.state.values() if "step" in s}
    assert steps == {9}  # each trained parameter took the nine finite steps' updates, not the NaN one's
    assert [x for x in lines if "UnifiedLoRACallback" in x] == ["UnifiedLoRACallback: step 3: non-finite loss or gradient (loss nan); optimizer update skipped "
                     "(its gradients dropped)"]


def test_non_finite_steps_in_a_row_stop_the_training_with_the_last_finite_weights(tmp_path):
    """`max_nonfinite_steps` (default 10, as the CLI's) non-finite steps in a row stop the Trainer, its weights
    those of the last finite step (here the initial ones); 0 never stops; a negative count is refused."""
    for limit, steps in ((3, 3), (0, 10)):
        model, _, ctrl = build("bert")
        first = {n: p.detach().clone() for n, p in model.named_parameters()}
        lines = []
        ctrl.print_fn = lines.append
        trainer = Trainer(model=model, args=targs(tmp_path, num_train_epochs=2, learning_rate=1e-3),
                          train_dataset=TokenDataset(),
                          callbacks=[UnifiedLoRACallback(ctrl, max_nonfinite_steps=limit), _NaNOnce(model, "all")])
        trainer.train()
        assert trainer.state.global_step == steps and ctrl.nonfinite_steps == steps
        assert all(torch.equal(first[n], p) for n, p in model.named_parameters())
        said = [x for x in lines if "UnifiedLoRACallback" in x]
        assert len(said) == steps and all("optimizer update skipped" in x for x in said)
        assert [x for x in said if "training stops" in x] == ([said[-1]] if limit else [])
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match=r"^max_nonfinite_steps: .*got"):
            UnifiedLoRACallback(build("bert")[2], max_nonfinite_steps=bad)


def test_non_finite_steps_under_a_grad_scaler_are_left_to_it_and_count_toward_max_nonfinite_steps(tmp_path):
    """Under fp16's GradScaler (accelerate's optimizer has a `scaler`) the callback leaves a non-finite step to the
    scaler, which skips it; it did not count the step either, so max_nonfinite_steps never stopped an fp16 run whose
    every loss was NaN (the CLI's --max-nonfinite-steps counts such steps). The Trainer makes no GradScaler on the
    CPU, so the test gives its accelerator one, a real torch GradScaler on accelerate's own path (scaled backward,
    unscale, the scaler's step). A NaN loss counts (the CLI's rule: a finite loss whose gradient overflowed while
    the scale is >= 1 is the scaler finding its scale, and does not)."""
    for at, limit, steps in ((3, 3, 10), ("all", 3, 3)):
        model, _, ctrl = build("bert")
        first = {n: p.detach().clone() for n, p in model.named_parameters()}
        lines = []
        ctrl.print_fn = lines.append
        nan = _NaNOnce(model, at)
        trainer = Trainer(model=model, args=targs(tmp_path, num_train_epochs=2, learning_rate=1e-3),
                          train_dataset=TokenDataset(),
                          callbacks=[UnifiedLoRACallback(ctrl, max_nonfinite_steps=limit), nan])
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
        trainer.train()
        assert trainer.state.global_step == steps and ctrl.nonfinite_steps == (1 if at == 3 else steps)
        if at == 3:  # the scaler skipped the NaN step's update
            assert all(torch.equal(nan.before[n], nan.after[n]) for n in nan.before)
            assert all(torch.isfinite(p).all() for p in model.parameters())
        else:
            assert all(torch.equal(first[n], p) for n, p in model.named_parameters())
        said = [x for x in lines if "UnifiedLoRACallback" in x]
        assert len(said) == ctrl.nonfinite_steps and all("GradScaler skips its update" in x for x in said), said
        assert [x for x in said if "training stops" in x] == ([said[-1]] if at == "all" else [])
    # a finite loss whose gradients overflow (inf from the head back) at the scale's start (65536): the scaler finding
    # its scale, skipped by it and not counted, but said (nothing was, where the CLI says each such step); the
    # composite signal reads it as non-finite
    model, _, ctrl = build("bert", signal="composite")
    lines = []
    ctrl.print_fn = lines.append
    blow_up = {"step": 0}

    def count(module, args):
        blow_up["step"] += module.training

    def overflow(module, args, output):
        if module.training and blow_up["step"] <= 3:
            output.register_hook(lambda g: g * float("inf"))

    model.register_forward_pre_hook(count)
    model.classifier.register_forward_hook(overflow)
    trainer = Trainer(model=model, args=targs(tmp_path, num_train_epochs=2, learning_rate=1e-3),
                      train_dataset=TokenDataset(), callbacks=[UnifiedLoRACallback(ctrl, max_nonfinite_steps=2)])
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    trainer.train()
    assert trainer.state.global_step == 10 and ctrl.nonfinite_steps == 3
    assert trainer.accelerator.scaler.get_scale() == 65536 / 8
    assert [x for x in lines if "UnifiedLoRACallback" in x] == [
        f"UnifiedLoRACallback: step {step}: non-finite gradient (loss finite; GradScaler's scale lowered to "
        f"{scale:g}); GradScaler skips its update (GradScaler finding its scale: not counted toward "
        "max_nonfinite_steps)"
        for step, scale in ((1, 32768), (2, 16384), (3, 8192))]


class _BadSteps(TrainerCallback):
    """Makes chosen optimizer steps (1-based, counted from the Trainer's global step, so across a resume) non-finite
    at the classifier: `nan` steps get a NaN loss, `overflow` steps a finite loss whose gradient is inf from the head
    back (an fp16 overflow)."""

    def __init__(self, model, nan=(), overflow=()):
        self.nan, self.overflow, self.step = set(nan), set(overflow), 0
        model.classifier.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if not module.training:
            return None
        if self.step in self.overflow:
            output.register_hook(lambda g: g * float("inf"))
        return output * float("nan") if self.step in self.nan else None

    def on_step_begin(self, args, state, control, **kw):
        self.step = state.global_step + 1


@pytest.mark.parametrize("signal", ["loss", "composite"])
def test_the_callback_counts_grad_scaler_steps_by_the_cli_rule(tmp_path, signal):
    """Under a GradScaler the callback counts a skipped step as the CLI's `_count_nonfinite` does, reading the scale
    after the scaler's update: it read it before, so an overflow at a scale of exactly 1 (0.5 after the update: the
    CLI counts it) was not counted; and on the loss signal a finite-loss overflow never reached the count and set it
    to 0, where the CLI leaves it as it is while the scale is >= 1 (the scaler finding its scale)."""
    def run(init_scale, bad, limit):
        model, _, ctrl = build("bert", signal=signal)
        lines = []
        ctrl.print_fn = lines.append
        trainer = Trainer(model=model, args=targs(tmp_path, num_train_epochs=2, learning_rate=1e-3),
                          train_dataset=TokenDataset(),
                          callbacks=[UnifiedLoRACallback(ctrl, max_nonfinite_steps=limit), _BadSteps(model, **bad)])
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        trainer.train()
        return trainer.state.global_step, [x for x in lines if "UnifiedLoRACallback" in x]

    # an overflow at scale 1: the update lowers it to 0.5, below 1, so it counts (and one such step stops the run)
    steps, said = run(1.0, {"overflow": [3]}, 1)
    assert steps == 3, said
    assert said == ["UnifiedLoRACallback: step 3: non-finite loss or gradient (loss " + said[0].split("(loss ")[1]]
    assert "GradScaler skips its update; 1 such steps in a row (max_nonfinite_steps): training stops" in said[0]
    # NaN, overflow while the scale is >= 1 (not counted, the count kept, but said), NaN: two in a row stop the run
    # at step 4
    steps, said = run(65536.0, {"nan": [2, 4], "overflow": [3]}, 2)
    assert steps == 4 and [x.split(":")[1] for x in said] == [" step 2", " step 3", " step 4"], said
    assert "not counted toward max_nonfinite_steps" in said[1] and "2 such steps in a row" in said[-1]
    # a finite step in between sets the count to 0: the run goes on
    steps, said = run(65536.0, {"nan": [2, 4]}, 2)
    assert steps == 10 and len(said) == 2 and not any("training stops" in x for x in said), said


def test_the_non_finite_count_is_saved_with_the_controller_state_and_resumes(tmp_path):
    """The callback's count of non-finite steps in a row is saved in its checkpoint file and read back on a resume
    (it restarted at 0, so a resume let max_nonfinite_steps more steps run; the CLI keeps its count); a file saved
    before the key resumes at 0."""
    from unified_lora.callbacks import NONFINITE_KEY

    model, _, ctrl = build("bert")
    Trainer(model=model, args=_resume_args(tmp_path, 3), train_dataset=TokenDataset(n=16),
            callbacks=[UnifiedLoRACallback(ctrl, max_nonfinite_steps=3), _BadSteps(model, nan=[2, 3])]).train()
    path = tmp_path / "checkpoint-3" / CONTROLLER_STATE_NAME
    sd = torch.load(path, weights_only=True)
    assert sd[NONFINITE_KEY] == 2

    def resume():
        model2, _, ctrl2 = build("bert")
        lines = []
        ctrl2.print_fn = lines.append
        trainer = Trainer(model=model2, args=_resume_args(tmp_path, 8), train_dataset=TokenDataset(n=16),
                          callbacks=[UnifiedLoRACallback(ctrl2, max_nonfinite_steps=3), _BadSteps(model2, nan=[4])])
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
        return trainer.state.global_step, [x for x in lines if "UnifiedLoRACallback" in x]

    steps, said = resume()  # steps 2, 3 and 4 in a row: the run stops at step 4
    assert steps == 4 and len(said) == 1 and "3 such steps in a row" in said[0], said
    del sd[NONFINITE_KEY]
    torch.save(sd, path)
    steps, said = resume()  # saved before the key: the count starts at 0, step 4 alone
    assert steps == 8 and len(said) == 1 and "training stops" not in said[0], said


def test_the_callbacks_bool_arguments_take_true_or_false_only():
    """`trust_checkpoint="no"` is truthy: the controller file was then loaded with `weights_only=False`, which can run
    code the file carries, and `strict_resume="no"` stayed strict. Both take True or False only, as a config's bool
    field does (`_scalar`); the refusal names the argument."""
    ctrl = build("bert")[2]
    for name in ("strict_resume", "trust_checkpoint"):
        for bad in ("no", "false", 0, None):
            with pytest.raises(ValueError, match=rf"^{name}: must be true or false, got {re.escape(repr(bad))}"):
                UnifiedLoRACallback(ctrl, **{name: bad})
    cb = UnifiedLoRACallback(ctrl, strict_resume=False, trust_checkpoint=True)
    assert cb.strict_resume is False and cb.trust_checkpoint is True


def test_model_normalises_loss_takes_true_false_or_none_only():
    """`model_normalises_loss="no"` is truthy: the loss of every micro-batch the Trainer passed num_items_in_batch
    for was read as a share of the step's mean, silently. It takes True, False or None (read from the model) only,
    refused by name as the callback's bool arguments are."""
    ctrl = build("bert")[2]
    for bad in ("no", "false", 0, 1):
        message = rf"^model_normalises_loss: must be true or false, got {re.escape(repr(bad))} \("
        with pytest.raises(ValueError, match=message):
            UnifiedLoRACallback(ctrl, model_normalises_loss=bad)
    for ok in (None, True, False):
        assert UnifiedLoRACallback(ctrl, model_normalises_loss=ok).model_normalises_loss is ok


class _NaNGradOnce(_NaNOnce):
    """Makes the gradient of the classifier's weight NaN at optimizer step `at` (1-based), its loss finite: a tensor
    hook on the weight, as a loss with a `sqrt` at 0 or a hook on the head gives (nothing else's gradient is touched,
    so neither the loss nor the adapters' gradients say so). Records the trained parameters before and after that
    step, as `_NaNOnce` does (whose forward stays as it is)."""

    def __init__(self, model, at):
        super().__init__(model, at)
        model.classifier.weight.register_hook(lambda g: g * float("nan") if self.step == self.at else g)

    def _pre(self, module, args, kwargs):
        return None


@pytest.mark.parametrize("signal,max_grad_norm", [("loss", 1.0), ("loss", 0.0), ("composite", 0.0),
                                                   ("composite", 1.0)])
def test_a_finite_loss_with_a_non_finite_gradient_skips_its_update(tmp_path, signal, max_grad_norm):
    """A step whose loss is finite but whose gradients hold a NaN: on the loss signal the controller reads no gradient,
    and the Trainer stepped its optimizer on it, which turned the classifier NaN (with clipping, the NaN total norm
    turned every trained weight NaN) and every later loss NaN. On the composite signal with max_grad_norm=0 (no
    clipping to spread the NaN) the controller reads the adapters' gradients only, finite here. The callback now
    checks the optimizer's gradients and skips the update, as `unified-lora train` does (counted and said once, also
    where the composite signal read the NaN itself, as it does where clipping spread it to the adapters)."""
    model, _, ctrl = build("bert", signal=signal)
    lines = []
    ctrl.print_fn = lines.append
    bad = _NaNGradOnce(model, at=3)
    trainer = Trainer(model=model, args=targs(tmp_path, num_train_epochs=2, learning_rate=1e-3,
                                              max_grad_norm=max_grad_norm),
                      train_dataset=TokenDataset(), callbacks=[UnifiedLoRACallback(ctrl), bad])
    trainer.train()
    losses = [r.loss for r in ctrl.trace]
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    assert bad.before.keys() == bad.after.keys() and all(torch.equal(bad.before[n], bad.after[n]) for n in bad.before)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert {int(s["step"]) for s in trainer.optimizer.state.values() if "step" in s} == {9}
    said = [x for x in lines if "UnifiedLoRACallback" in x]
    assert len(said) == 1 and said[0].startswith("UnifiedLoRACallback: step 3: non-finite loss or gradient (loss ")
    assert said[0].endswith("optimizer update skipped (its gradients dropped)"), said
