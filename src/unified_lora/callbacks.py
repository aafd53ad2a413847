"""Hugging Face `Trainer` integration: `UnifiedLoRACallback(ctrl)`.

Works with the stock `Trainer` / `TrainingArguments` (no subclass):

    adapters, ctrl = setup_unified_lora(model, target_modules=["query", "value"], signal="loss")
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[UnifiedLoRACallback(ctrl)])
    trainer.train()

Where each piece plugs into the training loop (transformers 5.x `Trainer._run_epoch`):

    on_step_begin                     reset the per-step loss accumulator
      forward  ×GA micro-batches     a forward hook on the model records `outputs.loss`
      backward ×GA
      clip_grad_norm
    on_pre_optimizer_step             ctrl.step(loss)  - after backward, before the update,
                                      so rank / Mirror actuators act on *this* step
      optimizer.step()                the controller's pre/post step hooks scale the
                                      scheduled LR by the mode multiplier, then put it back
    on_optimizer_step, scheduler.step(), on_step_end, on_log, on_save

**The per-step loss.** `logs["loss"]` is averaged over the logging window and
rounded, so it is not used. The callback registers a forward hook on the model
and reads `outputs.loss` of every training micro-batch (eval forwards, with
`model.training == False`, are ignored), then reduces them to the loss of the
optimizer step, averaged over the gradient-accumulation micro-steps:

* the model normalises its loss by the `num_items_in_batch` the Trainer passes
  (models that call `self.loss_function`, e.g. `*ForCausalLM`): each output is a
  share of the token mean over the whole accumulated batch, so the shares are
  summed (and multiplied by the world size when the Trainer counts tokens across
  processes, `average_tokens_across_devices`, as `Trainer.compute_loss` does);
* TRL's `SFTTrainer` calls the model without `num_items_in_batch` (its fused LM
  head returns each micro-batch's token mean and a `label_mask`) and divides the
  token sums by it itself: the callback weights each micro-batch's loss by its
  label tokens, so it sees the token mean over the step that the Trainer trains
  and logs (under DDP with `average_tokens_across_devices`, the Trainer's default,
  the token mean over every process's rows: it divides by the step's label tokens
  of every process, one all-reduce of the count; without it, each process's token
  mean, averaged over processes, as the Trainer then trains); with
  `SFTConfig(loss_type="dft")` it computes the DFT loss from the output's
  `log_probs`, as the trainer does (the output's `loss` is the plain NLL);
* otherwise (e.g. `BertForSequenceClassification`, whose loss is a plain
  `CrossEntropyLoss` mean): the mean of the micro-batch losses. The short last
  step of an epoch averages over the micro-batches it has.

Which case applies is read from the model's `forward` source (does it pass
`**kwargs` to `self.loss_function`, or name `num_items_in_batch`?; for a PEFT
model, its base model's, as the Trainer reads it; a compiled model's, its
original's); override it with
`model_normalises_loss=True/False`. The Trainer itself cannot tell: in
transformers 5 it assumes every model whose `forward` takes `**kwargs` normalises
by `num_items_in_batch`, so for BERT-style classifiers with gradient accumulation
its own `logs["loss"]` (and gradient) is the *sum* of the micro-batch means
(huggingface/transformers#47688).

Under DDP every process feeds its own number and the controller all-reduces it
(`distributed_mean`), so every process makes the same decision on the same step.

Not covered by the forward hook: `compute_loss_func` and `label_smoothing_factor`
(the model then returns no loss; TRL's SFTTrainer then also runs its fused LM head
under `no_grad` for its metrics, a forward the hook ignores, as every forward without
gradient). `callback.add_to(trainer)` wraps the trainer's `compute_loss_func` or
label smoother (when called and again when training begins, so one assigned to the
trainer after `add_to` is wrapped too), so the callback records the loss they return,
the one the Trainer trains and logs; `callback.wrap_compute_loss_func(fn)` does the same for a
`compute_loss_func` passed to the Trainer's constructor. Without either the callback
fails loudly at the first step rather than feeding the controller nothing (or, in
SFTTrainer, the plain NLL it used to read there).

**Gradients.** `on_pre_optimizer_step` comes after the Trainer's gradient clipping
(`max_grad_norm`, default 1.0), so the composite signal's stress term reads
clipped gradients; set `max_grad_norm=0` if it should see raw norms. Rank drops
and Mirror restores clear the affected `.grad`s there, so this step's update
already respects them. Then, where no GradScaler is present, a step the controller read
as non-finite, or whose optimizer gradients hold an inf or NaN (`_grads_finite`, whatever
the signal), has its update skipped (`_skip_update`).

**Learning rate.** The callback attaches the Trainer's optimizer (unwrapping
accelerate's `AcceleratedOptimizer`) in `on_train_begin`. With
`lr_mode="multiplier"` (the `setup_unified_lora` default) the LR used at each step
is `scheduled LR × mode multiplier`, so linear/cosine warmup schedules keep
working. `lr_mode="absolute"` overrides the schedule (a warning says so). The
Trainer's own `learning_rate` log is the scheduled value; `unified_lora/lr` is the
one actually used.

**Checkpoints.** `on_save` writes `ctrl.state_dict()` to
`checkpoint-N/unified_lora_controller.pt` (the adapter blocks are model
parameters, so the Trainer saves them; it also saves optimizer, scheduler and
RNG states). With `save_base=False` (the default on a quantized base) the
Trainer's weights file holds only what trains (`adapter_only_saves`). The file
also records the base's quantization; a resume on a base quantized otherwise raises. An adapter-only checkpoint's file
also records a fingerprint of the base it leaves out (`_base_fingerprint`); a resume or best-model load on another
base (the instruct model instead of the base, another fine-tune, another dtype) raises (warns with
`strict_resume=False`). On `trainer.train(resume_from_checkpoint=...)` the Trainer restores
`state.global_step` before `on_train_begin`; the callback then loads the file
from `output_dir/checkpoint-{global_step}`. Resuming from a folder outside
`output_dir` needs `UnifiedLoRACallback(ctrl, resume_from=path)`. A resumed run
without controller state raises (`strict_resume=True`) instead of silently
restarting the controller; with `strict_resume=False` it warns and restarts it,
setting the adapters to the controller's rank (the Trainer's weights load set
the rank they were saved at). A resume in the same process (a `train()` interrupted, then
`train(resume_from_checkpoint=...)` with the same controller) replays the steps after the checkpoint: their
first records are dropped from `ctrl.trace`, `trace_path` and `step_losses`. The file also holds a SHA-256 digest of the managed
weights at that step; a loaded state whose digest differs from the weights the
Trainer loaded (another run's checkpoint of the same step in `output_dir`, when
resuming from a folder outside it) raises a `ValueError` before anything is loaded
(a warning, and no load, with `strict_resume=False`). The file is read with
`torch.load(weights_only=True)`: one holding anything but tensors and plain Python values (a
pickle that would run code, from a checkpoint folder someone sent you) raises a
`pickle.UnpicklingError` and nothing of it runs; `trust_checkpoint=True` loads a file you
trust in full.

**Best model at the end.** With `load_best_model_at_end=True` the Trainer loads
the best checkpoint's weights after training, just before `on_train_end`. The
callback then loads that checkpoint's `unified_lora_controller.pt` (in
`on_train_end`), so the model is the one that was evaluated: the adapters' rank,
the mode and its LR, the Mirror snapshot held then (if any), the signal and its
stored gradients, and the controller's counters (`ctrl.global_step` goes back to
that checkpoint's step) are all as they were at that checkpoint. `ctrl.trace`
keeps the whole run. A best checkpoint without that file raises
`FileNotFoundError` at the end of `train()` (`strict_resume=True`), or warns
(`strict_resume=False`): the best weights come with the rank saved with them
(each layer's `_extra_state`), but the controller keeps its final mode, LR,
signal and snapshot (and its next `ctrl.step` refuses the rank mismatch). Where the checkpoint has no weights on this machine
(the Trainer warned and kept the final weights), the controller keeps its final
state too. Callbacks whose `on_train_end` runs before this one's see the final
rank: `callback.add_to(trainer)` puts it first.

**Logging.** On every training log the keys `unified_lora/{phi,mode,rank,lr,loss}`
(values at the logged step; the loss is the one the controller used, under DDP the
mean over processes, as the Trainer's own `loss`) are added to `logs` and to the
matching `state.log_history` entry. Integrations (`report_to`) run before user callbacks;
to have them log the keys too, add the callback first:
`callback.add_to(trainer)` (inserts it at the head of the callback list).

**TRL's SFTTrainer.** At the start of training the callback refuses a model that PEFT wrapped after
setup (`SFTTrainer(peft_config=...)`: PEFT's layers beside nested ones, whose blocks `get_peft_model` froze), and
at the first step a nested output layer that no training forward called (SFTTrainer's fused LM head computes
with `lm_head.weight` directly, so that layer's delta would never train).

**Distributed.** DDP (torchrun / accelerate launch) is supported and tested on CPU
(gloo). Paused rank blocks are outside the autograd graph, so DDP needs
`find_unused_parameters=True` (the Trainer's default unless activation
checkpointing is on) and must not use `static_graph`; the callback checks this.
FSDP2 (`fully_shard`) is supported and tested in a hand-written loop (README "Multi-GPU"); under the Trainer's own
FSDP2 settings (GPUs only in accelerate 1.16) each process saves its own shards of the controller state
(`unified_lora_controller_rank{r}.pt`), and on a resume the processes agree on how their reads went before any of them
goes on (`_agreed`: one missing or unreadable file raises the same error on every process). With torch's Adam/AdamW,
each save of the optimizer first gives every parameter without state the state its first step would create
(`_fill_lazy_state`), so that accelerate's dcp checkpoint resumes; see README. FSDP1 is refused; DeepSpeed is not
supported or tested.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import math
import os
import warnings
import weakref
from collections.abc import Mapping
from typing import Callable

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ._files import load_state_file, write_text_atomically, written_atomically
from .config import MODES, _scalar
from .controller import UnifiedController
from .distributed import check_trainer_ddp_args, local_tensor, shard_group, unwrap_model, unwrap_optimizer
from .layer import NestedLoRALayer
from .model import trained_state_keys
from .trace import ResumePlan

CONTROLLER_STATE_NAME = "unified_lora_controller.pt"
# Saved with the controller state: a digest of the managed weights the checkpoint holds (see `_weights_digest`).
WEIGHTS_DIGEST_KEY = "callback_weights_sha256"
# Saved with the controller state: how the wrapped base layers are quantized (see `base_quantization`).
QUANTIZATION_KEY = "callback_base_quantization"
# Saved with the controller state of an adapter-only checkpoint (and in its marker, "base_fingerprint"): a sample of
# the frozen base weights it leaves out (see `_base_fingerprint`).
BASE_FINGERPRINT_KEY = "callback_base_fingerprint"
# Saved with the controller state: the callback's count of non-finite steps in a row (`max_nonfinite_steps`), so a
# resume goes on counting, as the CLI's checkpoints keep `nonfinite_in_a_row` (a state saved before: 0).
NONFINITE_KEY = "callback_nonfinite_in_row"
# Written into every folder that `adapter_only_saves` leaves the base weights out of.
ADAPTER_ONLY_NAME = "unified_lora_adapter_only.json"
LOG_PREFIX = "unified_lora/"
LOG_KEYS = ("phi", "mode", "rank", "lr", "loss")  # what `log_keys` can name (each is logged as LOG_PREFIX + key)


def _call_args(src: str, name: str) -> list[str]:
    """The argument text of every `name(...)` call in `src` (balanced parentheses)."""
    out, i = [], src.find(name + "(")
    while i != -1:
        j, depth = i + len(name), 0
        for k in range(j, len(src)):
            depth += {"(": 1, ")": -1}.get(src[k], 0)
            if depth == 0:
                out.append(src[j + 1:k])
                break
        i = src.find(name + "(", i + 1)
    return out


def model_normalises_loss(model) -> bool:
    """Whether `model.forward` divides its loss by the Trainer's `num_items_in_batch`:
    it names `num_items_in_batch`, or passes `**kwargs` on to `self.loss_function`
    (as `*ForCausalLM` do). Heads with a plain `CrossEntropyLoss()` mean, or that call
    `self.loss_function` without the kwargs (huggingface/transformers#47688), don't.
    A PEFT model (`attach_to_peft_model`) is read through to its base model, whose loss it returns (as the
    Trainer does: its `PeftModelForCausalLM.forward` only passes the kwargs on); so is a `torch.compile`d
    (or DDP-wrapped) model, whose wrapper's class has no forward of its own."""
    model = unwrap_model(model)
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        model = get_base()
    try:
        src = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return True  # no source: follow the Trainer's own assumption
    if "num_items_in_batch" in src:
        return True
    return any("**" in a for a in _call_args(src, "loss_function"))


def _output_loss(output, kwargs):
    if isinstance(output, Mapping):
        return output.get("loss")
    if isinstance(output, (tuple, list)) and output and "labels" in kwargs and torch.is_tensor(output[0]):
        return output[0] if output[0].dim() == 0 else None
    return getattr(output, "loss", None)


class UnifiedLoRACallback(TrainerCallback):
    """Drives a `UnifiedController` from a Hugging Face `Trainer`.

    Args:
        ctrl: the controller (e.g. from `setup_unified_lora`).
        resume_from: checkpoint folder to read the controller state from on resume;
            default: `output_dir/checkpoint-{global_step}` of the resumed state.
        strict_resume: raise if a resumed run finds no controller state, or if the best checkpoint that
            `load_best_model_at_end` loads has none (False: a warning, and the controller goes on as it is).
        model_normalises_loss: whether the model divides its loss by `num_items_in_batch`: True or False
            (None: read it from the model's forward source).
        log_keys: which controller values go into the Trainer's logs (some of `LOG_KEYS`; an unknown key raises).
        trust_checkpoint: load `unified_lora_controller.pt` with `torch.load(weights_only=False)`. By default it
            is loaded with `weights_only=True`, which refuses a file holding anything but tensors and plain Python
            values (unpickling other objects can run code the file carries); only for a file you trust.
        save_base: whether the Trainer's checkpoints and `save_model` hold the frozen base weights. False: only
            what trains (`adapter_only_saves(model)`: every LoRA block, each layer's rank, `modules_to_save`
            heads, any other parameter that requires grad), as PEFT saves; resume and `load_best_model_at_end`
            load that into the model, which keeps its own base. True: the whole model, as `save_pretrained`
            writes it. None (default): False for a quantized base (as PEFT's QLoRA), True otherwise. Set on the
            model when the Trainer is built (callbacks=[...]), by `add_to`, or at the latest at `on_train_begin`.
        max_nonfinite_steps: a step the controller reads as non-finite (a NaN or inf loss; on the composite signal
            a gradient norm too), or whose optimizer gradients hold an inf or NaN, has its update skipped (its
            gradients dropped); this many such steps in a row stop the training, with the weights of the last finite
            step (default 10; 0: never stop). Under fp16's GradScaler the scaler skips such a step itself, and the
            count follows the CLI's rule (`on_optimizer_step`).
            The count is saved with the controller state, so a resume goes on with it.
    """

    def __init__(self, ctrl: UnifiedController, *, resume_from: str | None = None, strict_resume: bool = True,
                 model_normalises_loss: bool | None = None, log_keys=LOG_KEYS, trust_checkpoint: bool = False,
                 save_base: bool | None = None, max_nonfinite_steps: int = 10):
        if not isinstance(ctrl, UnifiedController):
            raise TypeError(f"ctrl: expected a UnifiedController, got {type(ctrl).__name__}")
        from .multitask import MultiTaskController

        if isinstance(ctrl, MultiTaskController):
            # It would run: the Trainer's forward sets no task ids and its loss is one number, so in SINGLE no task
            # gradient is captured, the gradient conflict that triggers the split is never seen, and φ never
            # splits (in MULTI the forward would need task ids it never gets).
            raise TypeError("ctrl: UnifiedLoRACallback does not drive a MultiTaskController: the Trainer gives it "
                            "neither task ids for the forward nor per-task losses, so the split into task adapters "
                            "would never come. Train multi-task mode in your own loop (README 'Multi-task mode': "
                            "task_context, then ctrl.step(loss, task_losses=per_task_losses(per, task_ids)))")
        self.ctrl = ctrl
        self.resume_from = resume_from
        # (bool("no") is True: strict_resume="no" stayed strict, trust_checkpoint="no" trusted the file)
        self.strict_resume = _scalar("strict_resume", strict_resume, bool)
        if isinstance(log_keys, str):  # tuple("phi") would be ('p', 'h', 'i'): no key logged, silently
            raise TypeError(f"log_keys: expected a tuple of keys, e.g. ({log_keys!r},), got the string {log_keys!r}")
        self.trust_checkpoint = _scalar("trust_checkpoint", trust_checkpoint, bool)
        self.log_keys = tuple(log_keys)
        unknown = [k for k in self.log_keys if k not in LOG_KEYS]
        if unknown:
            raise ValueError(f"log_keys: unknown {unknown}; the controller values that can be logged are {LOG_KEYS}")
        # (a string is truthy too: "no" read the loss as normalised; None: read from the model at on_train_begin)
        self.model_normalises_loss = (None if model_normalises_loss is None
                                      else _scalar("model_normalises_loss", model_normalises_loss, bool))
        if save_base not in (None, True, False):
            raise TypeError(f"save_base: expected True, False or None, got {save_base!r}")
        self.save_base = save_base
        if not (isinstance(max_nonfinite_steps, int) and not isinstance(max_nonfinite_steps, bool)) \
                or max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps: non-finite steps in a row that stop the training, an int >= 0 "
                             f"(0: never stop), got {max_nonfinite_steps!r}")
        self.max_nonfinite_steps = max_nonfinite_steps
        self._nonfinite_in_row = 0  # non-finite optimizer steps in a row (`_skip_update`, `on_optimizer_step`)
        self._scale_before = None  # fp16: the GradScaler's scale before this step's update (`on_optimizer_step`)
        self._hook = None
        self._fill_hook = None  # FSDP2, Adam/AdamW: the optimizer's state_dict pre-hook `_fill_lazy_state`
        self._wraps_loss_func = False
        self._trainer = None  # add_to's trainer (a weak reference): its loss functions are wrapped again at train()
        self._args = None
        self._in_step = False
        self._ctrl_step = 0  # ctrl.global_step when this optimizer step began
        self._loss_sum: torch.Tensor | float = 0.0
        self._n_micro = 0
        self._n_tokens: torch.Tensor | int = 0  # label tokens of the micro-batches recorded by token count
        self._normalised = False
        self._head_hook = None  # on the output layer, when it is a nested layer, until the first step has run
        self._head_called = False
        self.last: dict = {}
        self.best_loaded_from: str | None = None  # the checkpoint whose controller state on_train_end loaded
        # the (local, pre-all-reduce) loss fed at each step; kept only while ctrl.keep_trace (as ctrl.trace)
        self.step_losses: list[float] = []

    # -- installation -----------------------------------------------------------------
    def add_to(self, trainer) -> "UnifiedLoRACallback":
        """Insert this callback at the head of `trainer`'s callbacks, so that the
        reporting integrations (wandb, tensorboard, ...) also see its log keys.
        If it is already there (`Trainer(callbacks=[cb])`), it is moved, not added twice.
        Wraps the trainer's `compute_loss_func` or label smoother (`_wrap_trainer_losses`), now and again when
        training begins, so one assigned to the trainer after this call is recorded too."""
        callbacks = trainer.callback_handler.callbacks
        callbacks[:] = [self] + [cb for cb in callbacks if cb is not self]
        self._trainer = weakref.ref(trainer)
        self._set_save_mode(trainer.model)
        self._wrap_trainer_losses(trainer)
        return self

    def _set_save_mode(self, model) -> None:
        """Apply `save_base` to the model the Trainer saves (before its resume load, where the callback can)."""
        if model is None:
            return
        model = unwrap_model(model)
        if self.save_base is not None:  # True on a model made adapter-only before: back to whole saves
            adapter_only_saves(model, not self.save_base)
        elif getattr(model, "is_quantized", False):  # (a float model keeps what the user chose for it)
            adapter_only_saves(model)

    # -- loss capture -------------------------------------------------------------------
    def _record(self, loss: torch.Tensor, normalised: bool, token_share: bool, tokens=None) -> None:
        if not self._in_step:
            return
        v = loss.detach().float()
        args = self._args
        if token_share and args is not None and getattr(args, "average_tokens_across_devices", False) \
                and args.world_size > 1:
            v = v * args.world_size  # as Trainer.compute_loss: the share of the global token mean
        if tokens is not None:  # a micro-batch's token mean: summed back to its token sum
            v = v * tokens
            self._n_tokens = self._n_tokens + tokens
        self._normalised = self._normalised or normalised
        self._loss_sum = self._loss_sum + v
        self._n_micro += 1

    def _forward_hook(self, module, args, kwargs, output):
        # A forward without gradient is not the one trained: SFTTrainer runs its fused LM head under no_grad for the
        # metrics alone after a compute_loss_func or label smoother computed the loss (its plain NLL was read)
        if not module.training or not torch.is_grad_enabled():
            return
        loss = _output_loss(output, kwargs)
        if torch.is_tensor(loss) and loss.dim() == 0:
            share = kwargs.get("num_items_in_batch") is not None and self.model_normalises_loss is not False
            # TRL's fused LM head output (SFTTrainer): the micro-batch's token mean over its `label_mask`; the
            # trainer divides the step's token sums by the step's token count, so weight it by its tokens
            mask = None if share else getattr(output, "label_mask", None)
            tokens = mask.sum() if torch.is_tensor(mask) and mask.dtype == torch.bool else None
            log_probs = getattr(output, "log_probs", None)
            if tokens is not None and getattr(self._args, "loss_type", None) == "dft" and torch.is_tensor(log_probs):
                # SFTConfig(loss_type="dft") trains each token's NLL weighted by its probability (DFT), from these
                # log-probabilities; the output's `loss` is the plain NLL
                log_probs = log_probs.detach().float()
                loss = -(log_probs * log_probs.exp()).sum() / tokens.clamp(min=1)
            self._record(loss, normalised=share, token_share=share, tokens=tokens)

    def wrap_compute_loss_func(self, fn: Callable) -> Callable:
        """For `Trainer(compute_loss_func=...)` (and TRL's `SFTTrainer`'s): records the loss `fn` returns.
        The Trainer treats that loss as already scaled for gradient accumulation,
        so the recorded shares are summed per optimizer step. `add_to(trainer)` wraps the trainer's
        `compute_loss_func` itself (once)."""
        self._wraps_loss_func = True  # the model's own loss (if any) must not be counted too
        return fn if getattr(fn, "callback", None) is self else _RecordedLoss(fn, self, scaled=True)

    def _wrap_trainer_losses(self, trainer) -> None:
        """`add_to`: record what the trainer's `compute_loss_func` or label smoother (`label_smoothing_factor > 0`)
        returns, the loss it trains, where the model's forward returns none (the Trainer pops the labels) or, in
        TRL's SFTTrainer, only the plain NLL of a fused forward run for the metrics."""
        fn = getattr(trainer, "compute_loss_func", None)
        if callable(fn):
            trainer.compute_loss_func = self.wrap_compute_loss_func(fn)
        smoother = getattr(trainer, "label_smoother", None)
        # The Trainer uses it only without a compute_loss_func; SFTTrainer only with loss_type="nll" (with "dft" it
        # trains the fused head's DFT loss, which the forward hook reads)
        uses_smoother = fn is None and getattr(getattr(trainer, "args", None), "loss_type", None) in (None, "nll")
        if callable(smoother) and uses_smoother:
            if getattr(smoother, "callback", None) is not self:
                # a share of the step's token mean when the Trainer passes num_items_in_batch, else a micro-batch mean
                trainer.label_smoother = _RecordedLoss(smoother, self, scaled=False)
            self._wraps_loss_func = True

    def _pop_step_loss(self) -> torch.Tensor | float:
        if self._n_micro == 0:
            raise RuntimeError(
                "UnifiedLoRACallback: no training loss was seen in this step. The model must return `loss` "
                "(pass labels). With a compute_loss_func or label_smoothing_factor > 0 the loss is computed outside "
                "the model: add the callback with callback.add_to(trainer), which records it, or wrap your "
                "compute_loss_func with callback.wrap_compute_loss_func(fn)."
            )
        if self._normalised:
            loss = self._loss_sum
        elif torch.is_tensor(self._n_tokens):  # micro-batches recorded by token count: the step's token mean
            loss = self._loss_sum / self._token_divisor(self._n_tokens)
        else:
            loss = self._loss_sum / self._n_micro
        self._loss_sum, self._n_micro, self._n_tokens, self._normalised = 0.0, 0, 0, False
        return loss

    def _token_divisor(self, n: torch.Tensor) -> torch.Tensor:
        """What the step's token sums are divided by, per process. Under DDP with `average_tokens_across_devices`
        (the Trainer's default), TRL's SFTTrainer divides each process's token sum by the label tokens of every
        process (the Trainer's `num_items_in_batch`, counted across processes) and multiplies it by the world size,
        as `Trainer.compute_loss` does: the loss it trains and logs (the mean over processes) is the token mean over
        every process's rows. So this process's tokens count as all of them over the world size (one all-reduce of
        the count), and the controller's mean over processes is that token mean; each process's own token mean,
        averaged, weighed a token by how few its process had."""
        args = self._args
        if args is None or not getattr(args, "average_tokens_across_devices", False) or args.world_size <= 1 \
                or not (dist.is_available() and dist.is_initialized()):
            return n.clamp(min=1)
        total = n.detach().clone()
        dist.all_reduce(total)  # every process gets here at the same step (on_pre_optimizer_step)
        return total.clamp(min=1) / args.world_size  # (SFTTrainer clamps the count of all processes)

    # -- events ----------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._set_save_mode(model)  # before `train(resume_from_checkpoint=...)` loads the weights

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._args = args
        self._set_save_mode(model)
        check_trainer_ddp_args(args, model)
        if model is not None:
            _refuse_peft_over_nested(model)
            self._watch_output_layer(model)
        if optimizer is not None:
            self.ctrl.attach_optimizer(unwrap_optimizer(optimizer))
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is not None:  # a compute_loss_func (or label smoother) set on the trainer after add_to
            self._wrap_trainer_losses(trainer)
        self._fill_before_saves(unwrap_optimizer(optimizer) if optimizer is not None else None)
        if self.ctrl.actuators.lr_mode == "absolute":
            warnings.warn("UnifiedLoRACallback: lr_mode='absolute' overrides the Trainer's LR schedule at every step; "
                          "use lr_mode='multiplier' to scale the schedule instead", stacklevel=2)
        if self._hook is None and model is not None and not self._wraps_loss_func:
            if self.model_normalises_loss is None:
                self.model_normalises_loss = model_normalises_loss(model)
            self._hook = model.register_forward_hook(self._forward_hook, with_kwargs=True)
        self._nonfinite_in_row = 0  # (a resume: the checkpoint's count, `_load`)
        if state.global_step > 0:
            self._load(args, state, model)

    def on_step_begin(self, args, state, control, **kwargs):
        self._loss_sum, self._n_micro, self._n_tokens, self._normalised = 0.0, 0, 0, False
        self._head_called = False
        self._in_step = True
        self._ctrl_step = self.ctrl.global_step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self._in_step or self.ctrl.global_step != self._ctrl_step:
            raise RuntimeError(
                "UnifiedLoRACallback: the controller would step twice in one optimizer step: this callback is "
                "registered twice with the Trainer, or another UnifiedLoRACallback (or code) steps the same "
                "controller. Register one callback per controller, once: Trainer(callbacks=[cb]) or "
                "cb.add_to(trainer) (which moves it to the head of the list if it is already there)")
        self._in_step = False
        loss = self._pop_step_loss()
        if self._head_hook is not None:  # the first step: was the output layer called, as a forward calls it?
            self._head_hook.remove()
            self._head_hook = None
            if not self._head_called:
                raise RuntimeError(
                    f"UnifiedLoRACallback: the model's output layer {self._head_name!r} is a nested LoRA layer, but "
                    "no training forward of this step called it: the loss was computed from its weight directly "
                    "(TRL's SFTTrainer scores tokens with a fused LM head that reads lm_head.weight; so does a fused "
                    "linear cross-entropy such as Liger's), so its LoRA delta would never train. Leave it out of "
                    "target_modules (\"all-linear\" leaves the output layer out), or train it whole with "
                    f"modules_to_save=[{self._head_name.rsplit('.', 1)[-1]!r}]")
        loss = float(loss.item()) if torch.is_tensor(loss) else float(loss)
        if self.ctrl.keep_trace:  # a per-step list, kept as ctrl.trace is: not at all in a run that keeps no trace
            self.step_losses.append(loss)
        self.ctrl.step(loss)
        optimizer = kwargs.get("optimizer")
        scaler = getattr(optimizer, "scaler", None)
        # under a GradScaler the scaler decides the skip: counted once it has stepped and updated (`on_optimizer_step`)
        self._scale_before = scaler.get_scale() if scaler is not None else None
        # (read on every step, also one the controller read as non-finite: under FSDP2 the read is a collective, and
        # with reduce_loss=None one process may read a NaN loss where another reads a finite one)
        grads_finite = scaler is not None or self._grads_finite(optimizer)
        if scaler is None and (self.ctrl._last_nonfinite or not grads_finite):
            if not self.ctrl._last_nonfinite:  # a finite loss, its gradients not finite: as the CLI tells it
                self.ctrl._skipped_optimizer_step()
            self._skip_update(optimizer, state.global_step + 1, control)
        elif scaler is None:
            self._nonfinite_in_row = 0
        # the loss the controller used (the trace's): under DDP the mean over processes, as the Trainer's own log
        self.last = {"phi": self.ctrl.phi, "mode": self.ctrl.mode, "rank": self.ctrl.rank,
                     "lr": self.ctrl.get_last_lr(), "loss": self.ctrl.last_loss}

    @torch.no_grad()
    def _grads_finite(self, optimizer) -> bool:
        """Whether every gradient the optimizer holds is finite, read as `unified-lora train` reads it
        (`Run.train_step`, after the controller's step). On the loss signal the controller never sees a gradient,
        and on the composite one it reads the adapters' active blocks alone (a `modules_to_save` head's NaN gradient
        passed it), so a finite loss whose gradients held an inf or NaN (a `sqrt` or `log` at 0 in a custom loss, a
        hook) was stepped on and turned the weights NaN. Read on every step (a collective under FSDP2); a step the
        controller read as non-finite is counted once. One fused reduction (the max-abs norm: NaN or inf
        exactly where an entry is, where an L2 norm overflows on large finite values) and one host sync.
        Under FSDP2 each process holds a shard of every gradient, and the Trainer's clipping does not make the shards
        agree (transformers 5.25 with accelerate 1.16: `max_grad_norm=0` clips nothing, so a NaN stays where it is;
        a finite `max_grad_norm` turns an inf entry into NaN and the rest into 0), so the verdict is summed over the
        shards' group (`shard_group`), one all-reduce: every process skips alike. Under DDP the gradients are the
        same on every process (averaged by the backward), and so is the verdict, with no collective."""
        from .training import total_norm

        if optimizer is None:
            return True
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        shards = shard_group(grads, "the optimizer's gradients")
        if shards is not None:
            grads = [local_tensor(g) for g in grads]
        bad = torch.isfinite(total_norm(grads, float("inf"))).logical_not().float()
        if shards is not None:
            dist.all_reduce(bad, group=shards)
        return not bad.item()

    def _skip_update(self, optimizer, step: int, control) -> None:
        """A step whose loss (or, on the composite signal, gradient) the controller read as non-finite, or whose
        optimizer's gradients hold an inf or NaN (`_grads_finite`): the Trainer steps its optimizer on it all the
        same (it only leaves the loss out of its log), and the NaN gradients (clipping scales every gradient by a NaN
        norm) turned every trained weight NaN for good; every later loss was NaN and the checkpoints held NaN
        adapters (a tiny BERT, one NaN batch of ten). So the gradients of the optimizer's parameters are dropped
        (`grad = None`), which torch's optimizers read as "no update" (Adam's moments and step count are left as they
        were), as `unified-lora train` skips such a step. (Not under fp16's GradScaler: `on_optimizer_step`.)
        The step's scheduled LR still advances, as the Trainer's scheduler steps."""
        if optimizer is None:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self._count_nonfinite(step, control, "optimizer update skipped (its gradients dropped)")

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        """Under fp16's GradScaler (accelerate's optimizer has a `scaler`): the scaler skips a step whose gradients
        hold an inf or NaN itself (its update asserts on a step with no gradient, so `_skip_update` leaves it be),
        and the step is counted here, after the scaler's step and update, by the CLI's rule (`Run._count_nonfinite`):
        a step with a finite loss whose gradients were finite sets the count to 0; one with a finite loss whose
        gradients overflowed while the scale (after its update) is still >= 1 is the scaler finding its scale and
        leaves the count as it is (a line through `ctrl.print_fn` says so, as the CLI's does); any other (a non-finite
        loss, or an overflow at a scale below 1) counts. The scaler found an inf or NaN gradient where its update
        lowered the scale (it lowers it then alone; accelerate's `step_was_skipped` is False under a fused optimizer,
        the Trainer's default, which takes the scaler's verdict into its own step). (The controller's reading is not
        used: on the loss signal it never sees a gradient.)"""
        if self._scale_before is None:
            return
        before, self._scale_before = self._scale_before, None
        scale = optimizer.scaler.get_scale()
        loss_finite = math.isfinite(self.ctrl.last_loss)
        if loss_finite and not scale < before:
            self._nonfinite_in_row = 0
        elif not loss_finite or scale < 1.0:
            self._count_nonfinite(state.global_step + 1, control, "GradScaler skips its update")
        elif self.ctrl.print_fn is not None:  # not counted, but said (as the CLI says it), so the skip is seen
            self.ctrl.print_fn(f"UnifiedLoRACallback: step {state.global_step + 1}: non-finite gradient (loss finite; "
                               f"GradScaler's scale lowered to {scale:g}); GradScaler skips its update (GradScaler "
                               "finding its scale: not counted toward max_nonfinite_steps)")

    def _count_nonfinite(self, step: int, control, what: str) -> None:
        """One more non-finite step in a row: said, and `max_nonfinite_steps` of them stop the training
        (`control.should_training_stop`) with the last finite weights, as the CLI's `--max-nonfinite-steps` stops a
        run."""
        self._nonfinite_in_row += 1
        stop = 0 < self.max_nonfinite_steps <= self._nonfinite_in_row
        if stop:
            control.should_training_stop = True
        if self.ctrl.print_fn is not None:
            self.ctrl.print_fn(f"UnifiedLoRACallback: step {step}: non-finite loss or gradient (loss "
                               f"{self.ctrl.last_loss:g}); {what}"
                               + (f"; {self._nonfinite_in_row} such steps in a row (max_nonfinite_steps): training "
                                  "stops, with the weights of the last finite step" if stop else ""))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or not self.last:
            return
        extra = {LOG_PREFIX + k: self.last[k] for k in self.log_keys if self.last.get(k) is not None}
        logs.update(extra)
        # Trainer.log appended a copy of `logs` to log_history just before this event.
        if state.log_history and state.log_history[-1].get("step") == state.global_step \
                and "loss" in state.log_history[-1]:
            state.log_history[-1].update(extra)

    def _state_name(self) -> str:
        """The controller state's file in a checkpoint folder. One process or DDP: CONTROLLER_STATE_NAME, written by
        process 0 (the state is the same on every process). FSDP2: each process holds its own shards of the Mirror
        snapshot and stored gradients, so each writes and reads its own file (process 0's alone, read by every
        process, was refused on the others, and its digest of DTensors failed on process 0 while the others went on)."""
        group = self._shard_group()
        if group is None:
            return CONTROLLER_STATE_NAME
        return CONTROLLER_STATE_NAME.replace(".pt", f"_rank{dist.get_rank(group)}.pt")

    def _shard_group(self):
        """FSDP2: the process group of the managed parameters' device mesh; else None."""
        self.ctrl._reshard()  # (an evaluation's unsharded parameters: read the sharded ones, as state_dict does)
        return shard_group(self.ctrl.managed_parameters())

    def _fill_before_saves(self, opt) -> None:
        """FSDP2 with torch's Adam or AdamW: have every save of `opt`'s state hold a state for every parameter that
        requires grad (`_fill_lazy_state`, an `Optimizer.state_dict` pre-hook), so that accelerate's
        `load_fsdp_optimizer` finds one for each (see `_warn_stateless_blocks`). Removed at the end of training."""
        if self._fill_hook is not None:
            self._fill_hook.remove()
            self._fill_hook = None
        if type(opt) in _LAZY_STATE_OPTIMIZERS and self._shard_group() is not None:
            self._fill_hook = opt.register_state_dict_pre_hook(_fill_lazy_state)

    def on_save(self, args, state, control, **kwargs):
        name = self._state_name()
        if name == CONTROLLER_STATE_NAME and not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        sd = self.ctrl.state_dict()
        sd[WEIGHTS_DIGEST_KEY] = _weights_digest(self.ctrl)  # ctrl.load_state_dict ignores it
        sd[QUANTIZATION_KEY] = base_quantization(self.ctrl.adapters)  # and this
        sd[NONFINITE_KEY] = self._nonfinite_in_row  # and this (the callback's own: `_load` reads it)
        model = kwargs.get("model")
        if model is not None and is_adapter_only_folder(folder):  # (a whole-model checkpoint holds its base)
            # and this: the one the save just put into the marker (taken of the same weights), not taken again
            sd[BASE_FINGERPRINT_KEY] = _marker(folder).get("base_fingerprint") or _base_fingerprint(model)
        # under a temporary name, then renamed: a process killed while writing leaves no torn file under the name
        # a resume reads (the resume then says the file is missing, and what to do)
        with written_atomically(os.path.join(folder, name)) as tmp:
            torch.save(sd, tmp)
        if name != CONTROLLER_STATE_NAME and name.endswith("_rank0.pt"):
            self._warn_stateless_blocks(folder)

    def _warn_stateless_blocks(self, folder: str) -> None:
        """FSDP2: the Trainer saved the optimizer through accelerate (dcp), which writes no state for a parameter
        the optimizer has not stepped yet (a rank block paused since the start, or rolled back by a Mirror restore
        with `snapshot_optimizer=True` to before it trained). On `resume_from_checkpoint`
        accelerate's `load_fsdp_optimizer` asks for a state of every parameter that requires grad (torch's
        `get_optimizer_state_dict` of the fresh optimizer makes one up for each) and fails (measured, accelerate
        1.16: "Missing key in checkpoint state_dict: optimizer.state.<block>.step"), before any callback runs.
        torch's Adam and AdamW get the state their first step would create before every save (`_fill_before_saves`),
        so this warns only for other optimizers, whose first state cannot be made up exactly. The load's template is
        what a fresh optimizer holds after `_init_optim_state` (one step of zero gradients at LR 0): an optimizer whose
        steps kept no state for any parameter (torch's SGD without momentum) makes none there either, its load asks
        for none, and its checkpoints resume: no warning. (Param groups that keep state and others that keep none, in
        one optimizer, still warn for the latter's parameters.)"""
        opt = unwrap_optimizer(self.ctrl.optimizer) if self.ctrl.optimizer is not None else None
        if opt is None or not any(opt.state.values()):
            return
        labels = self.ctrl._managed_labels()
        missing = [lab for lab, p in zip(labels, self.ctrl.managed_parameters()) if p.requires_grad
                   and not opt.state.get(p)]
        if missing:
            shown = ", ".join(missing[:3]) + (f", ... ({len(missing) - 3} more)" if len(missing) > 3 else "")
            warnings.warn(f"UnifiedLoRACallback: {folder} will not resume under FSDP2: the optimizer "
                          f"({type(opt).__name__}) has no state yet for {shown} (not trained yet, or a Mirror restore "
                          "rolled it back to before they trained), so accelerate saved none, and "
                          "resume_from_checkpoint fails in load_fsdp_optimizer (\"Missing key in checkpoint "
                          "state_dict\"). Resume from a checkpoint saved without this warning (one saved in MIRROR, "
                          "at rank 16), or train with torch's Adam or AdamW, whose first state the callback gives "
                          "such blocks before each save", stacklevel=2)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        try:
            # The Trainer runs `_load_best_model()` just before this event (transformers 5 `_finalize_training`),
            # on the same condition: the model now has the best checkpoint's weights; give it that
            # checkpoint's controller state, so that its rank (and the rest) is the one that was evaluated.
            if getattr(args, "load_best_model_at_end", False) and state.best_model_checkpoint is not None:
                self._load_best(args, state.best_model_checkpoint, model)
        finally:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            if self._fill_hook is not None:
                self._fill_hook.remove()
                self._fill_hook = None
            if self._head_hook is not None:
                self._head_hook.remove()
                self._head_hook = None

    # -- helpers ---------------------------------------------------------------------------
    def _watch_output_layer(self, model) -> None:
        """A nested output layer (`lm_head` in target_modules) is called by every forward of the model's own; a
        trainer that scores tokens from its weight (TRL's fused LM head) leaves its delta out of the loss, and its
        blocks never get a gradient. Watched over the first optimizer step, which raises if it was not called."""
        from .model import lora_layers

        if self._head_hook is not None:  # from a train() that raised before its first step
            self._head_hook.remove()
            self._head_hook = None
        model = unwrap_model(model)
        try:
            head = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            return
        if not isinstance(head, NestedLoRALayer) or not any(p.requires_grad for p in head.lora_parameters()):
            return
        self._head_name = next((n for n, m in lora_layers(model).items() if m is head), "lm_head")

        def called(module, args):
            self._head_called = True

        self._head_hook = head.register_forward_pre_hook(called)

    def _load(self, args, state, model=None) -> None:
        folder = self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(folder, self._state_name())

        def read():
            if not os.path.isfile(path):
                if self.strict_resume:
                    raise FileNotFoundError(
                        f"UnifiedLoRACallback: resuming at step {state.global_step} but {path} does not exist. "
                        "Pass UnifiedLoRACallback(ctrl, resume_from=<checkpoint folder>), or strict_resume=False "
                        "to restart the controller from its current state."
                    )
                warnings.warn(f"UnifiedLoRACallback: no controller state at {path}; the controller restarts, its "
                              f"adapters at its rank {self.ctrl.rank}", stacklevel=2)
                return None, f"no controller state at {path}"
            return self._read_state_file(path, "the Trainer resumed from", model)

        sd = self._agreed(read, f"resuming at step {state.global_step}")
        if sd is None:
            # the Trainer's weights load restored the rank they were saved at (each layer's `_extra_state`); a
            # controller that goes on from its own state sets its own (its first step refused the mismatch)
            self.ctrl._apply_rank()
            return
        # the trace file's rewind read and checked before the load (a damaged file raises here, the controller
        # untouched): in a same-process resume the writer has written, so ctrl.load_state_dict's own check skips it,
        # and the rewind raised after the controller had loaded. A writer that has not written (a new process) is
        # ctrl.load_state_dict's to resume: rewound here as well, its lines were kept twice (a gap warned twice)
        writer = self.ctrl.writer
        plan = writer.resume_plan(sd["global_step"], rewind=True) if writer is not None and writer._written else None
        self.ctrl.load_state_dict(sd)
        self._rewind_trace(plan)
        self._nonfinite_in_row = int(sd.get(NONFINITE_KEY, 0))  # (a state saved before the key: 0)

    def _read_state_file(self, path: str, loaded_by: str, model) -> tuple[dict | None, str | None]:
        """(the controller state saved at `path`, None), or (None, why) where it was saved with other adapter weights
        than those `loaded_by` put in place (`_weights_match` warned): `_load`'s and `_load_best`'s read of a file."""
        sd = load_state_file(path, self.trust_checkpoint, "UnifiedLoRACallback(ctrl, trust_checkpoint=True)")
        if not self._weights_match(sd, path, loaded_by, model):
            return None, f"{path} was saved with other adapter weights"
        return sd, None

    def _agreed(self, read: Callable, what: str):
        """This process's part of a controller-state load, `read()`: (the state to load, None), or (None, why) where
        the controller goes on as it is (`read` warned), or it raises. Returns the state to load, or None.

        FSDP2: each process reads its own file (`_state_name`), so one process could fail (its file missing,
        unreadable, or of other weights) while the others went on into the training's collectives and waited for it
        until the process group's timeout. Here the processes first tell each other how their read went (one
        all-gather over the mesh's group): if any raised, every process raises the same error (the type of the
        failing processes' error where it is a builtin one and the same on each, else a RuntimeError), naming the
        processes and their errors; if any goes on without its state, so does every process (a warning says why),
        so that the controllers stay alike."""
        try:
            sd, why = read()
            err = None
        except Exception as e:  # (anything: the point is that no process leaves alone)
            sd, why, err = None, None, e
        group = self._shard_group()
        if group is None:
            if err is not None:
                raise err
            return sd
        prefix = "UnifiedLoRACallback: "
        mine = (("error", type(err).__name__, str(err).removeprefix(prefix).rstrip(". ")) if err is not None
                else ("keep", why) if sd is None else ("load",))
        every = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, mine, group=group)
        failed = [(r, m) for r, m in enumerate(every) if m[0] == "error"]
        if failed:
            import builtins

            kinds = {m[1] for _, m in failed}
            cls = getattr(builtins, kinds.pop(), None) if len(kinds) == 1 else None
            if not (isinstance(cls, type) and issubclass(cls, Exception)):
                cls = RuntimeError
            raise cls(f"{prefix}{what} under FSDP2, where each of the {len(every)} processes loads its own "
                      f"controller state, " + "; ".join(f"process {r} could not: {m[1]}: {m[2]}" for r, m in failed)
                      + ". Every process stops here (the others would have gone on and waited for it)") from err
        kept = [(r, m[1]) for r, m in enumerate(every) if m[0] == "keep"]
        if kept and sd is not None:
            warnings.warn(f"{prefix}{what} under FSDP2: process {kept[0][0]} goes on without its controller state "
                          f"({kept[0][1]}), so this process does not load its own either: the controllers of all "
                          "processes must stay alike", stacklevel=3)
            return None
        return sd

    def _rewind_trace(self, plan: ResumePlan | None) -> None:
        """After a resume: drop what this process recorded for the steps from the resumed one on. A run interrupted
        in this process (Ctrl-C, an exception) and resumed here with the same controller replays those steps; their
        first records would otherwise stay in `ctrl.trace`, `trace_path` and `step_losses` (steps 3, 4, 3, 4, ...).
        `plan`: the trace file's lines to keep, `writer.resume_plan(step, rewind=True)` read before the load (None:
        the file is left as it is)."""
        step = self.ctrl.global_step
        dropped = sum(r.step >= step for r in self.ctrl.trace)
        self.ctrl.trace[:] = [r for r in self.ctrl.trace if r.step < step]
        del self.step_losses[max(0, len(self.step_losses) - dropped):]  # this callback's records are the last ones
        if self.ctrl.writer is not None:
            self.ctrl.writer.apply_resume(plan)

    def _load_best(self, args, folder: str, model=None) -> None:
        """After `load_best_model_at_end`: load `folder`'s controller state (see the module docstring)."""
        if not _has_trainer_weights(args, folder):  # the Trainer warned and kept the final weights: keep ours too
            warnings.warn(f"UnifiedLoRACallback: the best checkpoint {folder} has no model weights here, so the "
                          "Trainer kept the final weights; the controller keeps its final state too", stacklevel=2)
            return
        path = os.path.join(folder, self._state_name())

        def read():
            if not os.path.isfile(path):
                ranks = sorted({a.rank for a in self.ctrl.adapters})
                msg = (f"UnifiedLoRACallback: load_best_model_at_end loaded the weights of {folder}, but {path} does "
                       f"not exist, so the controller keeps its final state ({MODES[self.ctrl.mode]}, rank "
                       f"{self.ctrl.rank}) while the adapters run at the rank saved with those weights "
                       f"({ranks[0] if len(ranks) == 1 else ranks}): its mode, LR, signal and snapshot are not that "
                       "checkpoint's, and ctrl.step refuses the rank mismatch. Load that checkpoint's controller "
                       "state into ctrl (ctrl.load_state_dict) if you have it")
                if self.strict_resume:
                    raise FileNotFoundError(msg + "; strict_resume=False makes this a warning")
                warnings.warn(msg, stacklevel=2)
                return None, f"no controller state at {path}"
            return self._read_state_file(path, "load_best_model_at_end loaded", model)

        sd = self._agreed(read, "load_best_model_at_end")
        if sd is None:
            return
        self.ctrl.load_state_dict(sd)
        self.best_loaded_from = folder

    def _weights_match(self, sd, path: str, loaded: str, model=None) -> bool:
        """Whether the managed weights the model holds now are the ones saved with `sd` (states saved before this
        check have no digest: True). The Trainer never tells callbacks which checkpoint it resumed from, so the
        callback reads `output_dir/checkpoint-{step}`; when that folder is another run's, this is where it shows.
        A mismatch raises (`strict_resume=True`) or warns and leaves the controller as it is. A state saved on a
        base quantized otherwise (`base_quantization`) raises either way. A state saved with an adapter-only
        checkpoint records its base (`BASE_FINGERPRINT_KEY`): `model` on another base raises (`strict_resume=True`),
        or warns and goes on (the controller is loaded: it fits the adapters, which came from the checkpoint)."""
        saved_q = sd.get(QUANTIZATION_KEY) if isinstance(sd, dict) else None  # (states saved before: no key)
        now_q = base_quantization(self.ctrl.adapters)
        if saved_q is not None and not _same_quantization(list(saved_q), now_q):
            raise ValueError(
                f"UnifiedLoRACallback: {path} was saved on a base quantized as {_quant_text(saved_q)}, but this "
                f"model's is {_quant_text(now_q)}: the adapters were trained against the other base's outputs, "
                "and would go on against these. Load the base as it was loaded for that run "
                "(the same BitsAndBytesConfig: quant type, 4-bit or 8-bit, compute dtype, double quantization)")
        saved_base = sd.get(BASE_FINGERPRINT_KEY) if isinstance(sd, dict) else None  # (whole-model saves: none)
        if isinstance(saved_base, dict) and model is not None:
            msg = _base_mismatch_message(saved_base, model, f"UnifiedLoRACallback: the checkpoint {loaded} "
                                                            f"({os.path.dirname(path)})")
            if msg is not None and self.strict_resume:
                raise ValueError(msg + "; strict_resume=False makes this a warning")
            if msg is not None:
                warnings.warn(msg + "; strict_resume=False: going on with this base", stacklevel=3)
        saved = sd.get(WEIGHTS_DIGEST_KEY) if isinstance(sd, dict) else None
        if saved is None or saved == _weights_digest(self.ctrl):
            return True
        msg = (f"UnifiedLoRACallback: {path} was saved with other adapter weights than the ones {loaded} (their "
               "digests differ), so it is another run's or another step's controller state. When resuming from a "
               "folder outside output_dir, or with output_dir holding another run's checkpoint of the same step, "
               "pass UnifiedLoRACallback(ctrl, resume_from=<the checkpoint folder you resume from>)")
        if self.strict_resume:
            raise ValueError(msg + "; strict_resume=False makes this a warning (the controller is then not loaded)")
        warnings.warn(msg + "; the controller state was not loaded", stacklevel=3)
        return False


class _RecordedLoss:
    """A loss function the Trainer calls (`compute_loss_func`, its `LabelSmoother`), whose every scalar result
    `callback` records as the micro-batch's loss. `scaled`: the Trainer takes the result as already scaled for
    gradient accumulation (a compute_loss_func's), else only when it passed `num_items_in_batch`."""

    def __init__(self, fn: Callable, callback: "UnifiedLoRACallback", scaled: bool):
        self.fn, self.callback, self.scaled = fn, callback, scaled
        functools.update_wrapper(self, fn, updated=())

    def __call__(self, *args, **kwargs):
        loss = self.fn(*args, **kwargs)
        if torch.is_tensor(loss) and loss.dim() == 0:
            share = kwargs.get("num_items_in_batch") is not None
            self.callback._record(loss, normalised=self.scaled or share, token_share=share)
        return loss

    def __getattr__(self, name):  # the wrapped one's attributes (a LabelSmoother's epsilon, ...)
        if name == "fn":
            raise AttributeError(name)
        return getattr(self.fn, name)


def _refuse_peft_over_nested(model) -> None:
    """The Trainer's model holds PEFT adapter layers beside nested ones: TRL's `SFTTrainer(peft_config=...)` (or
    `get_peft_model`) wrapped a model that `setup_unified_lora` had already given its adapters."""
    from .model import lora_layers, peft_layer_names

    peft = peft_layer_names(model)
    if peft and lora_layers(model):
        raise ValueError(
            f"UnifiedLoRACallback: the model holds {len(peft)} PEFT adapter layers (e.g. {peft[0]!r}) beside its "
            "nested LoRA layers: it was wrapped with PEFT after setup_unified_lora (TRL's SFTTrainer(..., "
            "peft_config=...) calls get_peft_model), which froze the nested blocks, so the controller would drive "
            "adapters that do not train while PEFT's fixed-rank LoRA trains instead. Pass no peft_config: "
            "setup_unified_lora already gave the model its adapters (to train PEFT's own LoRA, drive it with "
            "unified_lora.peft_io.attach_to_peft_model instead)")


@contextlib.contextmanager
def quantized_model_for_trainer(model):
    """Build a `Trainer` (or a subclass, e.g. TRL's `SFTTrainer`) on a bitsandbytes-quantized model that trains
    nested LoRA layers:

        adapters, ctrl = setup_unified_lora(model, "all-linear", signal="loss")
        with quantized_model_for_trainer(model):
            trainer = Trainer(model=model, args=args, train_dataset=ds)
        UnifiedLoRACallback(ctrl).add_to(trainer)

    The Trainer's constructor refuses a quantized model that is not a PEFT model ("You cannot perform fine-tuning
    on purely quantized models", `transformers.trainer_utils.validate_quantization_for_training`): it looks for
    `model._hf_peft_config_loaded`, the mark transformers' own `add_adapter` sets. This sets that mark while the
    Trainer is built, and only then: it is taken away on leaving, so nothing later reads it. With the mark,
    `save_pretrained` would save through transformers' own adapter code (`get_adapter_state_dict`, which knows
    nothing of nested layers); without it, the Trainer's checkpoints and `save_model` are what `save_pretrained`
    writes: with `UnifiedLoRACallback`'s default on a quantized base, every LoRA block and each layer's rank without
    the packed base weights (`adapter_only_saves`), which `resume_from_checkpoint` and `load_best_model_at_end` load
    back. A model that is not quantized, or already
    carries the mark, is left as it is. A model without nested LoRA layers that train is a `ValueError` (the
    Trainer would train nothing).

    Every trainable parameter leaves the `with` in the dtype it had on entering it (the blocks fp32, a
    `modules_to_save` head as loaded): TRL's `SFTTrainer` casts every trainable parameter of a quantized model to
    bf16 in its constructor (the QLoRA paper's choice for PEFT's adapters); such a parameter gets its own tensor
    back, its values untouched."""
    from .model import lora_layers

    if not any(p.requires_grad for layer in lora_layers(model).values() for p in layer.parameters()):
        raise ValueError("quantized_model_for_trainer: the model has no nested LoRA layer with trainable blocks, so "
                         "the Trainer would have nothing to train; call setup_unified_lora(model, ...) first")
    if not getattr(model, "is_quantized", False) or getattr(model, "_hf_peft_config_loaded", False):
        yield model
        return
    trained = [(p, p.data) for p in model.parameters() if p.requires_grad]
    model._hf_peft_config_loaded = True  # an instance attribute over PeftAdapterMixin's class attribute (False)
    try:
        yield model
    finally:
        del model._hf_peft_config_loaded
        for p, data in trained:
            if p.dtype != data.dtype:  # cast (SFTTrainer): the tensor it had, or (moved since) a cast back
                p.data = data if p.device == data.device else p.data.to(data.dtype)


def base_quantization(layers) -> list[str]:
    """How the base layers of nested `layers` (e.g. `ctrl.adapters`) are quantized, one line per distinct setting
    (sorted): bitsandbytes' 4-bit quant type, block size, double quantization and compute dtype, or 8-bit with its
    outlier threshold and weight kind, or "not quantized". Each changes the base outputs the adapters train against,
    so a Trainer resume or best-model load on a base quantized otherwise is refused (`QUANTIZATION_KEY`)."""
    out = set()
    for layer in layers:
        base = layer.base_layer
        qs = getattr(base.weight, "quant_state", None)
        if type(base).__name__ == "Linear4bit" or qs is not None:
            kind = f"4-bit {qs.quant_type}, blocksize {qs.blocksize}, double quant {qs.nested}" if qs is not None \
                else f"4-bit {getattr(base.weight, 'quant_type', '?')} (not packed yet)"
            # a layer built without a compute dtype takes its first input's (bitsandbytes' `set_compute_type`): a
            # fresh model being resumed has none yet, the run it resumes had it set by its first forward
            dtype = getattr(base, "compute_dtype", None) if getattr(base, "compute_type_is_set", True) else \
                _FIRST_INPUT_DTYPE
            out.add(f"{kind}, compute dtype {dtype}")
        elif type(base).__name__ == "Linear8bitLt":
            st = base.state
            out.add(f"8-bit int8, threshold {st.threshold:g}, fp16 weights {st.has_fp16_weights}")
        else:
            out.add("not quantized")
    return sorted(out)


_FIRST_INPUT_DTYPE = "(its first input's)"


def _same_quantization(saved: list, now: list) -> bool:
    """`base_quantization` lists that match; where either holds a layer whose compute dtype its first input sets
    (`_FIRST_INPUT_DTYPE`), compared without the compute dtypes (the resumed run's first forward sets it as the saved
    run's did)."""
    if saved == now:
        return True
    if not any(q.endswith(_FIRST_INPUT_DTYPE) for q in [*saved, *now]):
        return False
    return {q.rsplit(", compute dtype ", 1)[0] for q in saved} == {q.rsplit(", compute dtype ", 1)[0] for q in now}


def _quant_text(q) -> str:
    return "; ".join(map(str, q)) if q else "(no layers)"


def _left_out_of_a_save(model) -> set[str]:
    """The parameter and persistent-buffer names an adapter-only save leaves out: what a load of such a checkpoint
    reports missing."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        names += [f"{mod_name}.{b}" if mod_name else b for b in mod._buffers
                  if mod._buffers[b] is not None and b not in mod._non_persistent_buffers_set]
    return set(names) - trained_state_keys(model, names)


def _quiet_left_out_keys(model, incompatible) -> None:
    """load_state_dict post-hook of a model under `adapter_only_saves`: a state dict that holds none of the base
    weights (an adapter-only checkpoint: every one of them is missing) leaves the model's own base as it is, so
    those are not reported missing (the Trainer's resume and best-model loads would list every base weight). Any
    other missing key (a block, a head) still is; so is the base of a state dict that holds part of it."""
    left = _left_out_of_a_save(model)
    if left and left <= set(incompatible.missing_keys):
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in left]


def _save_pretrained_adapter_only(model, save_directory, *args, **kwargs):
    """`model.save_pretrained` under `adapter_only_saves`: the class's own, with every key but the trainable state
    in `_keys_to_ignore_on_save` (transformers' own filter, which it applies after the quantizer's state dict:
    `state_dict=` is dropped for a bitsandbytes model), then `ADAPTER_ONLY_NAME` beside the weights (naming the
    weights files this save wrote, and the base's fingerprint). `push_to_hub=True` is refused: transformers uploads
    inside the class's save, before the marker exists."""
    import json

    from .model import lora_layers

    layers = lora_layers(model)
    if not layers:
        raise ValueError(
            "save_pretrained: the model is under adapter_only_saves but has no nested LoRA layer (merge_and_unload "
            "unwrapped them?), so only what trains would be saved and the merged weights left out. Save the whole "
            "model: adapter_only_saves(model, False) first")
    merged = [n for n, layer in layers.items() if layer.merged_rank]
    if merged:
        raise ValueError(
            f"save_pretrained: {len(merged)} nested layer(s) ({merged[0]!r}, ...) have their LoRA delta merged into "
            "the frozen base weight, which an adapter-only save (adapter_only_saves, UnifiedLoRACallback's "
            "save_base=False, the default on a quantized base) leaves out: the checkpoint would reload without the "
            "delta. unmerge_adapters(model) first, or save the whole model: adapter_only_saves(model, False)")
    bound = inspect.signature(type(model).save_pretrained).bind(model, save_directory, *args, **kwargs).arguments
    if bound.get("push_to_hub") or (bound.get("kwargs") or {}).get("push_to_hub"):
        # transformers uploads the files its save modified, inside that save: the marker, written after it (or
        # before it, and so not modified by it), would not be in the repo, whose weights `from_pretrained(repo)`
        # then builds a model around with random base weights
        raise ValueError(
            "save_pretrained(..., push_to_hub=True): the model is under adapter_only_saves, and transformers uploads "
            f"inside its save, before {ADAPTER_ONLY_NAME} (which says the folder is no model by itself, its base and "
            "how to load it) is written: the repo would get the weights without it. Save locally, then upload the "
            "folder (huggingface_hub.upload_folder(repo_id=..., folder_path=<the folder>)), or call "
            "model.push_to_hub(repo_id), which saves through this save into a folder it then uploads whole "
            "(so does the Trainer's push_to_hub=True)")
    names = list(model.state_dict(keep_vars=True))
    keep = trained_state_keys(model, names)
    before = model._keys_to_ignore_on_save
    stamps = _file_stamps(save_directory)
    model._keys_to_ignore_on_save = set(before or ()) | (set(names) - keep)
    try:
        out = type(model).save_pretrained(model, save_directory, *args, **kwargs)
    finally:
        model._keys_to_ignore_on_save = before
    if model.should_save_on_this_rank(bound.get("is_main_process", True)):
        files, index = _weights_files_written(save_directory, bound.get("variant"), stamps)
        if index is None:
            load = (f"model.load_state_dict(safetensors.torch.load_file(<this folder>/{files[0] if files else '?'}), "
                    "strict=False)")
        else:
            load = (f"for each shard that {index} lists ({', '.join(files)}): model.load_state_dict("
                    "safetensors.torch.load_file(<this folder>/<shard>), strict=False)")
        # config.json stays: without it, `LlamaForCausalLM.from_pretrained(folder)` builds the class's default
        # config (a 7B model) around these keys rather than failing
        info = {"format": "unified_lora adapter-only checkpoint", "base_model": model.config._name_or_path,
                "quantization": base_quantization(layers.values()), "saved_keys": sorted(keep),
                "weights_files": files, "weights_index": index,
                "how_to_load": "Load the base model (from_pretrained, with the same torch_dtype and "
                               "quantization_config), set it up as for training (setup_unified_lora with the same "
                               "targets and modules_to_save), then unified_lora.callbacks.load_adapter_only(model, "
                               "<this folder>), which checks that the base is the one of base_fingerprint; or "
                               f"{load}; or resume the Trainer from this folder",
                "base_fingerprint": _base_fingerprint(model),
                "config": model.config.to_dict()}
        write_text_atomically(os.path.join(save_directory, ADAPTER_ONLY_NAME), json.dumps(info, indent=2, default=str))
    return out


def _file_stamps(folder) -> dict:
    """{file name: modification time (ns)} of what `folder` holds (nothing, if it does not exist)."""
    try:
        return {e.name: e.stat().st_mtime_ns for e in os.scandir(folder) if e.is_file()}
    except OSError:
        return {}


def _weights_files_written(folder, variant, stamps: dict) -> tuple[list[str], str | None]:
    """The safetensors files a `save_pretrained(folder, variant=variant)` wrote (`stamps`: `_file_stamps` before it),
    and the index naming its shards (None: one file). transformers' names: `model.safetensors`, with a variant
    `model.<variant>.safetensors`; sharded, `model.safetensors.index.json` (`model.safetensors.index.<variant>.json`)
    and the shards it lists. An index left by an earlier sharded save into the folder is not this save's."""
    import json

    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    def add_variant(name):  # as transformers.modeling_utils._add_variant
        if not variant:
            return name
        path, ext = name.rsplit(".", 1)
        return f"{path}.{variant}.{ext}"

    now = _file_stamps(folder)
    index = add_variant(SAFE_WEIGHTS_INDEX_NAME)
    if index in now and now[index] != stamps.get(index):
        try:
            with open(os.path.join(folder, index), encoding="utf-8") as f:
                return sorted(set(json.load(f)["weight_map"].values())), index
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    return [add_variant(SAFE_WEIGHTS_NAME)], None


def load_adapter_only(model, folder, *, check_base: bool = True):
    """Load an adapter-only checkpoint (`adapter_only_saves`; the Trainer's checkpoints and `save_model` under
    `UnifiedLoRACallback(save_base=False)`) into `model`: the base loaded again (the same checkpoint, torch_dtype
    and quantization) and set up as for training. First checks that this base is the one the checkpoint was
    trained on (its marker's "base_fingerprint", a sample of the frozen weights the save left out): another base
    (the instruct model instead of the base, another fine-tune, another dtype) is a ValueError naming what differs,
    before anything is loaded; `check_base=False` loads it anyway. Reads the weights files the save wrote (one
    file, a `variant=`'s, or the shards of a sharded save) and returns `model.load_state_dict(..., strict=False)`'s
    result (its missing keys: the base the save left out). A marker written before these records has no
    fingerprint (nothing is checked) and names no files (`model.safetensors`, or the shards of its index)."""
    from safetensors.torch import load_file

    folder = os.fspath(folder)
    if not is_adapter_only_folder(folder):
        raise ValueError(f"load_adapter_only: {folder} holds no adapter-only checkpoint (no {ADAPTER_ONLY_NAME}, or a "
                         "whole model saved over it): a whole model loads with from_pretrained(folder)")
    info = _marker(folder)
    saved = info.get("base_fingerprint")
    if check_base and isinstance(saved, dict):
        msg = _base_mismatch_message(saved, model, f"load_adapter_only: {folder}")
        if msg is not None:
            raise ValueError(msg + "; load_adapter_only(..., check_base=False) loads it anyway")
    files = info.get("weights_files")
    if not files:  # a marker from before "weights_files"
        files, _ = _weights_files_written(folder, None, {})  # (every file counts as written)
    sd = {}
    for name in files:
        sd.update(load_file(os.path.join(folder, name)))
    return unwrap_model(model).load_state_dict(sd, strict=False)


def _marker(folder) -> dict:
    """The `ADAPTER_ONLY_NAME` record of an adapter-only folder."""
    import json

    with open(os.path.join(folder, ADAPTER_ONLY_NAME), encoding="utf-8") as f:
        return json.load(f)


def is_adapter_only_folder(folder) -> bool:
    """Whether `folder` holds an adapter-only save: its `ADAPTER_ONLY_NAME`, beside weights that hold no more than the
    keys it lists. A whole-model `save_pretrained` into the same folder later (another run's `save_model`, or
    `save_base=True`) replaces the weights but leaves the marker of the earlier save: weights with keys the marker
    does not list, and more of them, are that whole model's. Weights it cannot read (a variant's file name) count as
    the marker says."""
    import json

    from safetensors import safe_open
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME

    marker = os.path.join(folder, ADAPTER_ONLY_NAME)
    if not os.path.isfile(marker):
        return False
    try:
        listed = set(_marker(folder)["saved_keys"])
        keys = None
        for index in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME):
            if os.path.isfile(os.path.join(folder, index)):
                with open(os.path.join(folder, index), encoding="utf-8") as f:
                    keys = set(json.load(f)["weight_map"])
                break
        else:
            if os.path.isfile(os.path.join(folder, SAFE_WEIGHTS_NAME)):
                with safe_open(os.path.join(folder, SAFE_WEIGHTS_NAME), framework="pt") as f:
                    keys = set(f.keys())
    except (OSError, ValueError, KeyError, TypeError):  # a marker or weights not as this library writes them
        return True
    return keys is None or keys <= listed or len(keys) <= len(listed)


def adapter_only_saves(model, enable: bool = True):
    """Make `model.save_pretrained` (so the Trainer's checkpoints and `save_model`) write only what trains, as PEFT's
    `PeftModel.save_pretrained` does: every nested block (active or paused), each layer's rank (`_extra_state`),
    the `modules_to_save` heads and any other parameter that requires grad, the running statistics of every batch
    norm (which training updates in a frozen one), and the embeddings and output layer of a vocabulary resized after
    setup; not the frozen base weights (a 7B bf16 base is 14 GB a checkpoint; a 4-bit one
    its packed copy). The folder also gets `ADAPTER_ONLY_NAME` (what it holds, its base, how to load it): it is not
    a model by itself, `from_pretrained(folder)` alone builds the model around random base weights (transformers'
    load report lists them all as MISSING), and the CLI's `--model` refuses it. A model with merged layers (or none
    left) is refused at the save, before anything is written.

    Such a checkpoint loads into the model it came from, or into the base loaded again and set up the same way:
    `load_adapter_only(model, folder)` (which first checks that the base is the one the checkpoint was trained on),
    or `model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)`, which is what the Trainer's
    `resume_from_checkpoint` and `load_best_model_at_end` do (the callback checks the base too). While this is on,
    a load that lacks every base weight does not report them missing (the Trainer would list them all); one that
    lacks only some still does.
    `enable=False` puts the class's own `save_pretrained` back. Returns the model."""
    hooks = model._load_state_dict_post_hooks
    for k in [k for k, h in hooks.items() if h is _quiet_left_out_keys]:
        del hooks[k]
    vars(model).pop("save_pretrained", None)
    if enable:
        model.save_pretrained = functools.partial(_save_pretrained_adapter_only, model)
        model.register_load_state_dict_post_hook(_quiet_left_out_keys)
    return model


# Elements read from each frozen base tensor for its fingerprint (evenly spaced over it, the first one included).
_FINGERPRINT_SAMPLE = 256


def _base_tensors(model) -> dict:
    """{state-dict name: (module, attribute name, tensor)} for every parameter and persistent buffer of `model`."""
    out = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for attr, t in [*mod._parameters.items(), *((b, t) for b, t in mod._buffers.items()
                                                     if b not in mod._non_persistent_buffers_set)]:
            if t is not None:
                out[f"{mod_name}.{attr}" if mod_name else attr] = (mod, attr, t)
    return out


def _sample_bytes(t) -> bytes | None:
    """The raw bytes of `_FINGERPRINT_SAMPLE` evenly spaced elements of `t` (in its own order, whatever its strides),
    read where `t` lives and only they moved to the CPU: the same on CPU and CUDA. None where the values are not
    here to read (a meta tensor; a DTensor shard, which differs from process to process)."""
    if t is None:
        return b""
    t = t.detach()
    if t.device.type == "meta" or type(t).__name__ == "DTensor":
        return None
    if type(t) is not torch.Tensor:  # bitsandbytes' Params4bit / Int8Params: their data as a plain tensor
        t = t.as_subclass(torch.Tensor)
    n = t.numel()
    if n == 0:
        return b""
    k = min(n, _FINGERPRINT_SAMPLE)
    idx = torch.arange(k, device=t.device, dtype=torch.int64) * n // k
    sample = t.reshape(-1)[idx] if t.is_contiguous() else t[torch.unravel_index(idx, t.shape)]
    try:
        return sample.contiguous().view(torch.uint8).cpu().numpy().tobytes()
    except (RuntimeError, TypeError):  # a dtype with no byte view (sub-byte types)
        return None


@torch.no_grad()
def _base_fingerprint(model, names=None) -> dict:
    """A cheap fingerprint of the frozen base weights an adapter-only save leaves out (`_left_out_of_a_save`), or of
    those of `names` that `model` holds: {"sha256": over all of it, "base_model": config._name_or_path, "tensors":
    {name: "shape dtype hash"}}, the hash (16 hex digits) over a fixed sample of the tensor's raw bytes (see
    `_sample_bytes`) and, for a bitsandbytes weight, of its quant state (the 4-bit absmax, the 8-bit row scales,
    wherever the layer keeps them). Independent of the device, the process and where the model was loaded from;
    a base that differs in a few values only (not in a sampled one) passes. Its cost is a few small reads per
    tensor, whatever its size (benchmarks/perf/checkpoint_io.py's adapter-only arm includes it)."""
    model = unwrap_model(model)
    tensors = _base_tensors(model)
    names = sorted(_left_out_of_a_save(model) if names is None else set(names) & set(tensors))
    out = {}
    for name in names:
        mod, attr, t = tensors[name]
        parts = [_sample_bytes(t)]
        qs = getattr(t, "quant_state", None)
        if qs is not None:  # 4-bit: the packed codes above, their block scales here
            parts += [_sample_bytes(qs.absmax), _sample_bytes(getattr(getattr(qs, "state2", None), "absmax", None))]
        elif attr == "weight" and hasattr(mod, "init_8bit_state"):  # 8-bit: the row scales, on the weight until
            scb = getattr(t, "SCB", None)                            # the first forward moves them to the state
            parts.append(_sample_bytes(scb if scb is not None else getattr(mod.state, "SCB", None)))
        if any(p is None for p in parts):
            digest = "-"  # not readable here: compared by shape and dtype
        else:
            h = hashlib.sha256()
            for p in parts:
                h.update(len(p).to_bytes(8, "little") + p)
            digest = h.hexdigest()[:16]
        out[name] = f"{list(t.shape)} {t.dtype} {digest}"
    whole = hashlib.sha256("\n".join(f"{n} {e}" for n, e in out.items()).encode()).hexdigest()
    return {"sha256": whole, "base_model": str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""),
            "tensors": out}


def _base_differences(saved: dict, model) -> str | None:
    """What differs between the base `saved` (a `_base_fingerprint`) was taken of and `model`'s, read over the same
    tensors (None: nothing). Only the tensors the save left out are compared: whatever it kept (a resized
    vocabulary, batch-norm statistics, `modules_to_save` heads) came back from the checkpoint."""
    then = dict(saved.get("tensors") or {})
    now = _base_fingerprint(model, then)["tensors"]
    missing = [n for n in then if n not in now]
    shape, values = [], []
    for n, entry in now.items():
        s_shape, _, s_rest = then[n].rpartition("] ")
        n_shape, _, n_rest = entry.rpartition("] ")
        s_dtype, s_hash = s_rest.rsplit(" ", 1)
        n_dtype, n_hash = n_rest.rsplit(" ", 1)
        if (s_shape, s_dtype) != (n_shape, n_dtype):
            shape.append(f"{n!r}: saved {then[n].rsplit(' ', 1)[0]}, here {entry.rsplit(' ', 1)[0]}")
        elif s_hash != n_hash and "-" not in (s_hash, n_hash):
            values.append(n)
    def count(items, one, many):
        return f"{len(items)} {one if len(items) == 1 else many}"

    out = []
    if missing:
        out.append(f"{count(missing, 'is', 'are')} not in this model (e.g. {missing[0]!r}): another architecture, "
                   "or set up otherwise (target_modules)")
    if shape:
        out.append(f"{count(shape, 'has', 'have')} another shape or dtype (e.g. {shape[0]}): another model, or "
                   "loaded in another torch_dtype (or prepared otherwise: prepare_model_for_kbit_training casts the "
                   "unquantized weights to float32)")
    if values:
        out.append(f"{count(values, 'has', 'have')} other values (e.g. {values[0]!r}): another checkpoint of this "
                   "architecture (e.g. the instruct model of that base, or another fine-tune of it)")
    return "; ".join(out) or None


def _base_mismatch_message(saved: dict, model, where: str) -> str | None:
    """The error text for a model whose base is not the one `saved` (a `_base_fingerprint`) was taken of, or None."""
    diff = _base_differences(saved, model)
    if diff is None:
        return None
    here = str(getattr(getattr(unwrap_model(model), "config", None), "_name_or_path", "") or "(unnamed)")
    return (f"{where} was trained on another base model than this one. Of the {len(saved.get('tensors') or {})} "
            f"frozen base tensors the adapter-only checkpoint leaves out (each compared by a sample of its values), "
            f"{diff}. The saved base: {saved.get('base_model') or '(unnamed)'!r}; this model's: {here!r}. The adapters "
            "were trained against that base's outputs and would go on against this one's: load the base that run "
            "trained on (the same checkpoint, torch_dtype and quantization, set up with the same target_modules "
            "and modules_to_save)")


# The optimizers whose first state `_lazy_state` makes up as their own first step creates it (these classes exactly:
# a subclass may create its state otherwise)
_LAZY_STATE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)


def _lazy_state(group: dict, p: torch.Tensor) -> dict:
    """The state torch's Adam and AdamW create for `p` (in `group`) at its first step (`Adam._init_group`, as of torch
    2.13): `step` 0, a float32 tensor on p's device with `fused` or `capturable`, else a CPU tensor of torch's scalar
    dtype (float64 under a float64 default dtype); `exp_avg` and `exp_avg_sq` (and `max_exp_avg_sq` with `amsgrad`)
    zeros like `p` (under FSDP2, DTensors sharded as `p`). That step then counts it to 1 and moves the moments from 0,
    as from the state it would have created: the same values, bit for bit."""
    from torch.optim.optimizer import _get_scalar_dtype

    fused = bool(group.get("fused"))
    state = {"step": torch.zeros((), dtype=_get_scalar_dtype(is_fused=fused), device=p.device)
             if group.get("capturable") or fused else torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")}
    for key in ("exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if group.get("amsgrad") else ())):
        state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def _fill_lazy_state(opt) -> None:
    """`Optimizer.state_dict` pre-hook for torch's Adam/AdamW under the Trainer's FSDP2 (`_fill_before_saves`): give
    every parameter that requires grad and has no state yet (a rank block paused since the start of the run, or one a
    Mirror restore with `snapshot_optimizer=True` rolled back to before it trained) the state its first step would
    create (`_lazy_state`), so that the saved optimizer holds one for every parameter, as accelerate's
    `load_fsdp_optimizer` asks on resume. Training goes on bit for bit as without it: Adam skips a parameter without
    a gradient (a paused block has none), state or not, and starts one from this state as from the one it would have
    created. It costs the memory of those moments from the first save on, instead of from their first step."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.requires_grad and not opt.state.get(p):
                opt.state[p] = _lazy_state(group, p)


@torch.no_grad()
def _weights_digest(ctrl: UnifiedController) -> str:
    """SHA-256 of the controller's managed parameters (every LoRA block and extra parameter, in order), as stored:
    bit-exact weights, which a Trainer checkpoint saves and reloads, give the same digest."""
    h = hashlib.sha256()
    for p in ctrl.managed_parameters():
        p = local_tensor(p)  # FSDP2: this process's shard (its file holds its shards)
        h.update(str((p.dtype, tuple(p.shape))).encode())
        h.update(p.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def _has_trainer_weights(args, folder: str) -> bool:
    """Whether `folder` holds weights that `Trainer._load_best_model` loads (DeepSpeed and FSDP have their own
    layouts, neither supported here: assumed loaded)."""
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        return True
    from transformers.utils import (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME,
                                    SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME)

    return any(os.path.isfile(os.path.join(folder, n)) for n in (
        WEIGHTS_NAME, SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME, ADAPTER_SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME,
        WEIGHTS_INDEX_NAME))


__all__ = ["UnifiedLoRACallback", "CONTROLLER_STATE_NAME", "ADAPTER_ONLY_NAME", "adapter_only_saves",
           "base_quantization", "is_adapter_only_folder", "load_adapter_only", "model_normalises_loss",
           "quantized_model_for_trainer", "unwrap_optimizer"]
