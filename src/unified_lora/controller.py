"""The controller: signal → state machine → actuators (rank, learning rate, Mirror).

Shaped like a torch LR scheduler and an OLMo-core callback: `step()`,
`get_last_lr()`, `state_dict()` / `load_state_dict()`.

Call order in a training step (v3 model card):

    loss.backward()
    ctrl.step(loss=loss.item())   # reads gradients, may switch rank / LR / Mirror
    optimizer.step()
    optimizer.zero_grad()

Actuators act *before* `optimizer.step()`: after a rank drop the paused blocks'
gradients are cleared, so this very step leaves them untouched; after a Mirror
restore every managed gradient is cleared, so the restored weights stay exact.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import itertools
import sys
import warnings
import weakref
from collections import deque
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import (MIRROR, MODES, ActuatorConfig, MachineConfig, MirrorConfig, NestedLoRAConfig, SignalConfig,
                     _scalar, check_rank_levels)
from .distributed import (_device, _dtensor_type, check_blocks_sharded, check_sharding, is_first_process, local_tensor,
                          lockstep_mean, print_on_main_process, shard_group, sharding_of, to_sharded)
from .layer import NestedLoRALayer, blocks_of
from .machine import ModeMachine, Transition
from .mirror import MirrorDecision, MirrorSnapshot, watch_state_dict
from .model import _user_stacklevel, inject_nested_lora, undone_on_error, warn_frozen_head
from .signals import CompositeSignal, GradientStats, LossSignal
from .trace import StepRecord, TraceWriter, format_console

_DIST = dist.is_available()
# `ctrl.step` calls over which `_watch_accumulation` looks for steps with no optimizer step between them, and how many
# of them (at least) make the warning: half, as gradient accumulation over 2 micro-batches gives, while a GradScaler
# that skips a few overflowing fp16 steps at the start stays under it
_ACCUMULATION_WINDOW, _ACCUMULATION_UNSTEPPED = 32, 16


def _unwrap_optimizer(opt):
    # accelerate's AcceleratedOptimizer subclasses torch.optim.Optimizer but delegates step() to
    # `.optimizer`, so hooks and state must go on the inner one.
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def distributed_mean(value: float, device=None, group=None) -> float:
    """All-reduce a scalar so every process decides on the same number (SPEC §7), over `group` (None: the whole
    world). A no-op outside an initialised process group.

    As a controller's `reduce_loss` (its default), the controller does not call it: it calls `lockstep_mean`
    (unified_lora.distributed), which all-reduces the same mean over the controller's processes (its FSDP2 device
    mesh's group when sharded) and, in the same all-reduce, checks that every process's controller is at the same
    step, mode and rank with the same settings (a clear error on every process at once where not)."""
    if not (_DIST and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device() if device is None else device)
    dist.all_reduce(t, group=group)
    return t.item() / dist.get_world_size(group)


def _add_note(error: BaseException, note: str) -> None:
    """`error.add_note(note)` (Python 3.11+); on 3.10 the note is printed to stderr instead."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # pragma: no cover - Python 3.10
        print(note, file=sys.stderr)


class UnifiedController:
    """Closed-loop controller for nested LoRA adapters.

    Without adapters it is the v1 README's pure LR controller:
    `UnifiedController(alpha=0.1, beta=0.9, theta0=0.3, theta1=0.7).update(loss) -> lr`.

    Each transition, and every `log_every`-th step (0: none), is a console line (`format_console`) given to
    `print_fn`. The default, `print_on_main_process`, prints it once under torch.distributed (DDP, torchrun,
    accelerate): on process 0, or on the first process of the controller's own group (its FSDP2 mesh, or the group
    of a `functools.partial(distributed_mean, group=...)`), decided at each line. A `print_fn` passed is called on
    every process (`print`: every process prints); None: no console line.
    """

    # the loss the last step fed to the signal (all-reduced under DDP); a class default, so a controller pickled
    # before it existed has it too
    last_loss: float | None = None

    def __init__(
        self,
        alpha: float = 0.1,
        beta: float = 0.9,
        theta0: float = 0.3,
        theta1: float = 0.7,
        *,
        adapters: dict[str, NestedLoRALayer] | Sequence[NestedLoRALayer] | None = None,
        optimizer=None,
        signal: str | SignalConfig = "loss",
        machine: MachineConfig | None = None,
        actuators: ActuatorConfig | None = None,
        mirror: MirrorConfig | None = None,
        extra_params: Sequence[nn.Parameter] = (),
        warmup_steps: int = 0,
        eval_interval: int = 1,
        min_dwell: int = 0,
        trace_path: str | None = None,
        keep_trace: bool = True,
        log_every: int = 0,
        print_fn: Callable[[str], None] | None = print_on_main_process,
        reduce_loss: Callable[[float], float] | None = distributed_mean,
    ):
        keep_trace = _scalar("keep_trace", keep_trace, bool)  # ("no" is truthy: the trace was kept, silently)
        for name, value, cls in (("machine", machine, MachineConfig), ("actuators", actuators, ActuatorConfig),
                                 ("mirror", mirror, MirrorConfig)):
            check_config_arg(name, value, cls)
        # (checked before anything is attached: refused after attach_optimizer, it left the optimizer with this
        # half-built controller's LR hooks, and a retry with the same optimizer was refused as a second controller)
        log_every = _scalar("log_every", log_every, int)
        if log_every < 0:  # (-1 printed every step; 2.5 was read as 2, silently)
            raise ValueError(f"log_every: a console line every N steps, an int >= 0 (0: transitions only), got {log_every!r}")
        _refuse_ignored(UnifiedController.__init__, "signal", signal if isinstance(signal, SignalConfig) else None,
                        alpha=alpha, beta=beta)
        _refuse_ignored(UnifiedController.__init__, "machine", machine, theta0=theta0, theta1=theta1,
                        warmup_steps=warmup_steps, eval_interval=eval_interval, min_dwell=min_dwell)
        sig = signal if isinstance(signal, SignalConfig) else SignalConfig(kind=signal, alpha=alpha, beta=beta)
        self.signal_config = sig
        self.machine = ModeMachine(machine or MachineConfig(theta0=theta0, theta1=theta1, warmup_steps=warmup_steps,
                                                            eval_interval=eval_interval, min_dwell=min_dwell))
        self.actuators = actuators or ActuatorConfig()
        self.mirror = MirrorSnapshot(mirror or MirrorConfig())
        if sig.kind == "loss":
            self.signal = LossSignal(sig.alpha, sig.beta, sig.loss_scale, sig.calibration_steps, sig.calibration_target,
                                     sig.nonfinite)
        elif sig.kind == "composite":
            self.signal = CompositeSignal(sig.weights, rate=sig.alpha, history=sig.history,
                                          min_history=sig.min_history, nonfinite=sig.nonfinite)
        else:
            raise ValueError("signal: kind 'multitask' needs the multi-task controller (unified_lora.multitask)")
        self.grad_stats = GradientStats()
        names = list(adapters) if isinstance(adapters, dict) else None
        if isinstance(adapters, dict):
            adapters = list(adapters.values())
        self.adapters: list[NestedLoRALayer] = list(adapters or [])
        self._adapter_names = names or _default_adapter_names(self.adapters)
        for a in self.adapters:
            bad = [r for r in self.actuators.mode_ranks if r not in a.boundaries]
            if bad:
                raise ValueError(f"mode_ranks: {bad} are not nested levels of the adapters {a.boundaries}")
        for a in self.adapters:  # (inject_nested_lora watches the whole model, with its modules_to_save)
            if isinstance(a, nn.Module):
                watch_state_dict(a)
        if sig.kind == "composite" and not self.adapters:
            raise ValueError("signal: 'composite' reads adapter gradients; pass adapters= (or use signal='loss')")
        self.extra_params = list(extra_params)  # (the property's setter: no owners)
        self.optimizer = None
        self._hooks: list = []
        self._base_lrs: list[float] | None = None
        self._optimizer_steps = 0  # the attached optimizer's steps, counted by a post-step hook
        self._steps_at_last_call: int | None = None  # ... as they were at the last ctrl.step
        self._unstepped: deque = deque(maxlen=_ACCUMULATION_WINDOW)  # per call: no optimizer step since the last one
        self._accumulation_warned = False
        self._last_nonfinite = False  # the last call's step was non-finite: its optimizer step is skipped, rightly
        self._called = False  # a ctrl.step has run (`_watch_order`)
        self._used_grad: tuple | None = None  # before it: (weakref, version) of the gradient the last optimizer step used
        self.reduce_loss = reduce_loss
        # under DDP one file from process 0 (the records are the same everywhere), unless each process records its own.
        # Opened before the optimizer is attached, as log_every is checked: a trace_path that cannot be opened left
        # the refused controller's LR hooks on the optimizer, and a retry with it was refused as a second controller
        self.writer = TraceWriter(trace_path, main_process_only=reduce_loss is not None,
                                  group=self._trace_group) if trace_path else None
        if optimizer is not None:
            try:
                self.attach_optimizer(optimizer)
            except BaseException:
                if self.writer is not None:
                    self.writer.close()
                raise
        self.global_step = 0
        self.loss_ema: float | None = None
        self.nonfinite_steps = 0
        self.last_decision: MirrorDecision | None = None
        self._exit_decision: MirrorDecision | None = None  # a Mirror exit's decision until its transition commits
        self.trace: list[StepRecord] = []
        self.keep_trace = keep_trace
        self.log_every, self.print_fn = log_every, print_fn
        self._apply_rank()

    # -- wiring -----------------------------------------------------------------
    @property
    def mode(self) -> int:
        return self.machine.mode

    @property
    def phi(self) -> float:
        return self.signal.phi

    @property
    def rank(self) -> int:
        return self.actuators.mode_ranks[self.mode]

    @property
    def extra_params(self) -> list[nn.Parameter]:
        """The extra (modules_to_save) parameters. Where their modules are known (`setup_unified_lora`,
        `setup_multitask_lora`), read from them: a wrapper that replaces a module's Parameter objects after the
        setup (FSDP2's `fully_shard`, which registers a sharded DTensor in its place; `to_empty`) left the
        controller with parameters no longer in the model, which the optimizer did not hold and Mirror
        snapshotted and restored to no effect."""
        owners = self.__dict__.get("_extra_owners")
        if owners:
            live = [m._parameters.get(n) for m, n in owners]
            if all(p is not None for p in live):
                self._extra_params = live
        return self._extra_params

    @extra_params.setter
    def extra_params(self, params: Sequence[nn.Parameter]) -> None:
        self._extra_params, self._extra_owners = list(params), None

    def managed_parameters(self) -> list[nn.Parameter]:
        """Every LoRA block (active or paused), then the extra (modules_to_save) params."""
        return [p for a in self.adapters for p in a.lora_parameters()] + self.extra_params

    def _reshard(self) -> None:
        """FSDP2: put the sharded managed parameters back on their modules where a forward without backward (an
        evaluation between steps) left the unsharded ones, plain tensors (see `to_sharded`). The calls made between
        steps read the parameters after it: `state_dict`, `load_state_dict` and `attach_optimizer` refused them as
        a mix of sharded and plain tensors, or saved shards recorded as not sharded. (`step` needs none: the
        backward before it reshards.)"""
        blocks = (getattr(a, n) for a in self.adapters if isinstance(a, nn.Module) for n in ("lora_A", "lora_B"))
        to_sharded(itertools.chain(blocks, (m for m, _ in self.__dict__.get("_extra_owners") or ())))

    def attach_optimizer(self, optimizer) -> None:
        """Link the user's optimizer for LR control. In "multiplier" mode a pre-step
        hook scales each group's LR and a post-step hook puts the scheduled value
        back, so any scheduler (cosine, warmup, chainable) keeps working."""
        self._reshard()
        inner = _unwrap_optimizer(optimizer)
        if inner is not None:
            check_sharding(self.managed_parameters())  # FSDP1 refused here, before the first step
            check_blocks_sharded(zip(self._adapter_names, self.adapters))  # FSDP2 applied before setup
            self._check_no_other_controller(inner)
            self._check_optimizer_holds_managed(inner)
            self._warn_unmanaged_trainable(inner)
            if self.actuators.lr_mode != "off":
                self._check_optimizer_lr(inner)
        if self.mirror.held and [w.shape for w in self.mirror.weights] != [
                local_tensor(p).shape for p in self.managed_parameters()]:
            # parameters reshaped since the MIRROR entry (resize_token_embeddings grew a wrapped lm_head's B blocks;
            # the README says to attach a new optimizer then): the exit could neither compare nor restore, and every
            # ctrl.step from the exit on raised a shape error, so the run never left MIRROR
            self.mirror.clear()
            warnings.warn("attach_optimizer: the Mirror snapshot holds parameters of other shapes than the model's "
                          "now (resized since MIRROR began); it is dropped, and the next ctrl.step takes a new one, "
                          "to which this MIRROR's exit can roll back", stacklevel=2)
        previous = _unwrap_optimizer(self.optimizer)
        if previous is not None:  # a step of it raised: its scheduled LRs go back to it, not into the new one
            self._post_step(previous, None, None)
        if previous is not None and inner is not previous and self.mirror.opt_state is not None:
            # the Mirror snapshot holds the old optimizer's state: a restore wrote it into the new one (SGD's
            # momentum_buffer into AdamW, whose next step then failed with KeyError: 'exp_avg')
            self.mirror.opt_state = self.mirror._opt_home = None
            warnings.warn("attach_optimizer: the Mirror snapshot held the previous optimizer's state, which does not "
                          "belong to the new one; it is dropped, and a restore at this MIRROR's exit rolls back the "
                          "weights only", stacklevel=2)
        self._base_lrs = None
        for h in self._hooks:
            h.remove()
        self.optimizer = optimizer
        self._steps_at_last_call = None
        self._unstepped.clear()
        self._register_hooks(inner)

    def _register_hooks(self, inner) -> None:
        """The hooks on the attached (inner) optimizer: a post-step hook counts its steps, for
        `_watch_accumulation`; in "multiplier" mode a pre-step hook scales each group's LR, a post-step hook puts
        the scheduled value back, and a state_dict pre-hook does so for a checkpoint saved after a step that
        raised."""
        self._hooks = []
        if inner is None:
            return
        self._hooks.append(inner.register_step_post_hook(self._count_optimizer_step))
        if self.actuators.lr_mode == "multiplier":
            self._hooks += [inner.register_step_pre_hook(self._pre_step), inner.register_step_post_hook(self._post_step),
                            inner.register_state_dict_pre_hook(self._restore_lrs)]

    def _count_optimizer_step(self, opt, args, kwargs) -> None:
        self._optimizer_steps += 1
        if not self._called:  # (until the first ctrl.step: `_watch_order`)
            g = self.adapters[0].first_block_grad() if self.adapters else None
            self._used_grad = None if g is None else (weakref.ref(g), _grad_versions(g))

    def _watch_order(self) -> None:
        """Warn, at the first `ctrl.step`, where it reads the very gradient the attached optimizer's last step used
        (block 0's gradient tensor, at the version that step left it): the loop calls ctrl.step after
        `optimizer.step()`. Then the LR and rank the controller sets apply one step late, a Mirror snapshot is taken
        after that step's update, and the composite signal reads gradients the update has already used. Both orders
        alternate the two calls, so the first call tells them apart: in the right order a backward comes between an
        optimizer step and the next ctrl.step (optimizer steps without the controller first, a warm-up, included),
        which gives block 0 a new gradient or adds to it in place; a zero_grad between them leaves none or a zeroed
        one (and a call with no gradient is refused). Reads no tensor's data, only its identity and version counters
        (`_grad_versions`; as `_watch_accumulation`: v1's ctrl.step issues no op). Not an error: the run goes on,
        one step late."""
        if self._called:
            return
        self._called = True
        used, self._used_grad = self._used_grad, None
        g = self.adapters[0].first_block_grad() if used is not None else None
        if g is None or used[0]() is not g or _grad_versions(g) != used[1]:
            return
        warnings.warn("ctrl.step: it reads the gradients the optimizer's last step already applied: it runs after "
                      "optimizer.step(), so the LR and rank it sets apply one step late, and the composite signal "
                      "reads gradients the update has already used. Call it after the backward and before the "
                      "update: loss.backward() -> ctrl.step(loss) -> optimizer.step() -> optimizer.zero_grad()",
                      stacklevel=_user_stacklevel())

    def _watch_accumulation(self) -> None:
        """Warn, once, when `ctrl.step` runs on most micro-batches of an accumulation. The controller counts
        optimizer steps: called on each of k micro-batches, its warm-up, dwell and eval interval run k times too
        fast, and the signal reads one micro-batch's loss and partly summed gradients. Accelerate's accumulation is
        refused outright (`_check_sync_step`); in a hand-written loop only the attached optimizer can tell, by
        not stepping between two calls. Over the last `_ACCUMULATION_WINDOW` calls, at least
        `_ACCUMULATION_UNSTEPPED` without an optimizer step since the call before make the warning; a call after
        one whose step the signal read as non-finite (`nonfinite`) is not one of them, as a loop skips that step's
        update (the CLI does), nor is a call after a step the loop skipped for non-finite gradients, its loss finite
        (`_skipped_optimizer_step`: the CLI's `Run.train_step` says so; the loss signal reads no gradient, and such
        steps, every other one, made the warning say that ctrl.step ran on each micro-batch). Nothing here reads a
        tensor: v1's ctrl.step issues no op (a check of the gradients at each call cost 54 on MiniLM, a kernel each
        on a GPU, for a warning's sake). Not an error: a GradScaler's skipped steps (an fp16 overflow) are calls
        without an optimizer step too."""
        if not self._hooks or self._accumulation_warned:  # no optimizer attached (or another controller's hooks
            return  # drive it): nothing to count; or warned already: once is enough
        if self._steps_at_last_call is not None:  # (after a non-finite step the loop skips optimizer.step, rightly)
            self._unstepped.append(self._optimizer_steps == self._steps_at_last_call and not self._last_nonfinite)
        self._steps_at_last_call = self._optimizer_steps
        unstepped = sum(self._unstepped)
        if (self._accumulation_warned or len(self._unstepped) < _ACCUMULATION_WINDOW
                or unstepped < _ACCUMULATION_UNSTEPPED):
            return
        self._accumulation_warned = True
        if unstepped == len(self._unstepped):
            what = ("the attached optimizer has not stepped in the last "
                    f"{len(self._unstepped) + 1} calls: ctrl.step feeds the controller one optimizer step each, and "
                    "attach_optimizer must be given the optimizer that steps (a new optimizer needs "
                    "ctrl.attach_optimizer(new))")
        else:
            what = (f"{unstepped} of the last {len(self._unstepped)} calls came with no optimizer.step() since the "
                    "call before, as when it runs on each micro-batch of a gradient accumulation. The controller "
                    "counts optimizer steps (warm-up, dwell and eval interval would run that many times too fast, "
                    "on one micro-batch's loss): call ctrl.step once per optimizer step, after the last "
                    "micro-batch's backward, with the mean loss of the step's micro-batches")
        warnings.warn(f"ctrl.step: {what}", stacklevel=_user_stacklevel())

    def _skipped_optimizer_step(self) -> None:
        """The loop that called ctrl.step last skips that step's optimizer update, as it found the gradients
        non-finite (its loss finite): the next call is not counted as one with no optimizer step since
        (`_watch_accumulation`), as one after a non-finite loss is not."""
        self._last_nonfinite = True

    def _check_no_other_controller(self, inner) -> None:
        """Refuse an optimizer whose LR another controller's hooks already scale (two models in one optimizer, each
        with its own controller, or a second controller for one model): each multiplier scales every group, and the
        second post-step hook put back the LR the first had multiplied, so the scheduled LR grew every step."""
        hooks = getattr(inner, "_optimizer_step_pre_hooks", {})
        others = [h.__self__ for h in hooks.values()
                  if isinstance(getattr(h, "__self__", None), UnifiedController) and h.__self__ is not self]
        if others and self.actuators.lr_mode != "off":
            raise ValueError(
                f"optimizer: another {type(others[0]).__name__} already drives its learning rate (lr_mode="
                f"'multiplier'); two would scale every param group twice and compound the LR each step. Give each "
                f"model its own optimizer, build one controller over both models' adapters "
                f"(UnifiedController(adapters={{**adapters_1, **adapters_2}}, ...)), call close() on the other "
                f"controller first (one you no longer hold, from a re-run cell, keeps its hooks: build a new "
                f"optimizer), or use lr_mode='off' for this one")

    def _check_optimizer_holds_managed(self, inner) -> None:
        """Refuse an optimizer that leaves out managed parameters. A block it lacks never trains, silently:
        paused blocks come back when the controller raises the rank, and the head is in Mirror's snapshot."""
        groups = getattr(inner, "param_groups", None)
        if groups is None:
            return  # not a torch-style optimizer: nothing to check against
        held = {id(p) for g in groups for p in g["params"]}
        missing, total = [], 0
        for name, a in zip(self._adapter_names, self.adapters):
            ps = a.lora_parameters()
            total += len(ps)
            names = {id(p): n for n, p in a.named_parameters()} if isinstance(a, nn.Module) else {}
            missing += [f"{name}.{names.get(id(p), f'lora parameter {i}')}" for i, p in enumerate(ps) if id(p) not in held]
        total += len(self.extra_params)
        missing += [f"extra parameter {i} {tuple(p.shape)}" for i, p in enumerate(self.extra_params) if id(p) not in held]
        if missing:
            shown = ", ".join(missing[:4]) + (f", ... ({len(missing) - 4} more)" if len(missing) > 4 else "")
            raise ValueError(
                f"optimizer: it holds {total - len(missing)} of the {total} parameters this controller manages; "
                f"missing: {shown}. A parameter the optimizer lacks never trains (paused rank blocks included, which "
                f"the controller re-activates). Build it after setup, from every parameter that requires grad, e.g. "
                f"torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])" + (
                    ". Under FSDP2, build it after fully_shard and not after a forward without backward (an "
                    "evaluation): model.parameters() then gives unsharded parameters (the root's; every module's with "
                    "reshard_after_forward=False), plain tensors that FSDP2 replaces by its sharded ones at the next "
                    "backward"
                    if any(local_tensor(p) is not p for p in self.managed_parameters()) else ""))

    def _warn_unmanaged_trainable(self, inner) -> None:
        """Warn about parameters the optimizer trains that Mirror does not snapshot (made trainable after setup:
        biases, LayerNorms): a restore puts the adapters and `modules_to_save` back and would leave these at their
        values from the end of MIRROR, a model that never existed, without a word."""
        groups = getattr(inner, "param_groups", None)
        if groups is None or not (self.adapters or self.extra_params):  # the v1 LR controller has no Mirror
            return
        managed = {id(p) for p in self.managed_parameters()}
        seen, other = set(), []
        for g in groups:
            for p in g["params"]:
                if getattr(p, "requires_grad", False) and id(p) not in managed and id(p) not in seen:
                    seen.add(id(p))
                    other.append(p)
        if other:
            shapes = ", ".join(str(tuple(p.shape)) for p in other[:4]) + (f", ... ({len(other) - 4} more)"
                                                                         if len(other) > 4 else "")
            warnings.warn(
                f"optimizer: it trains {len(other)} parameters this controller does not manage (shapes {shapes}). "
                f"Mirror does not snapshot them: a restore puts the LoRA blocks and modules_to_save back and leaves "
                f"these at their values from the end of MIRROR. To have them rolled back too, name their modules in "
                f"modules_to_save at setup, or build the controller with UnifiedController(adapters=..., "
                f"extra_params=[...]) listing them", stacklevel=_user_stacklevel())

    def _check_optimizer_lr(self, inner) -> None:
        """Refuse param groups whose learning rate the controller cannot set: transformers' Adafactor with
        `relative_step=True` has lr=None and computes its own step size, which would ignore an absolute LR
        and make the multiplier's `None * m` fail inside `optimizer.step()`."""
        for i, g in enumerate(getattr(inner, "param_groups", ())):
            lr = g.get("lr")
            numeric = torch.is_tensor(lr) or (isinstance(lr, numbers.Real) and not isinstance(lr, bool))
            if g.get("relative_step") or not numeric:
                how = " and relative_step=True" if g.get("relative_step") else ""
                raise ValueError(
                    f"optimizer: param group {i} has lr={lr!r}{how}, so the optimizer sets its own step size and "
                    f"lr_mode={self.actuators.lr_mode!r} cannot act on it. Use lr_mode='off' (the controller then "
                    f"drives the rank and Mirror only), or give the optimizer a learning rate (transformers' "
                    f"Adafactor: relative_step=False, lr=...)")

    def _pre_step(self, opt, args, kwargs):
        if self._base_lrs is not None:  # the last step raised (Ctrl-C in a notebook): put its LRs back first
            self._post_step(opt, args, kwargs)
        self._base_lrs = [g["lr"] for g in opt.param_groups]
        m = self.lr_multiplier
        for g in opt.param_groups:
            g["lr"] = g["lr"] * m

    def _post_step(self, opt, args, kwargs):
        if self._base_lrs is not None:
            for g, lr in zip(opt.param_groups, self._base_lrs):
                g["lr"] = lr
            self._base_lrs = None

    def _restore_lrs(self, opt) -> None:
        """optimizer.state_dict() pre-hook: a checkpoint saved after a step that raised holds the scheduled LRs."""
        self._post_step(opt, None, None)

    @property
    def lr_multiplier(self) -> float:
        return self.actuators.mode_multipliers[self.mode] if self.actuators.lr_mode == "multiplier" else 1.0

    def get_last_lr(self) -> float | None:
        """The LR this mode trains with (first param group's effective LR). None where the controller does not know
        it: `lr_mode="off"`, or no optimizer attached (in "multiplier" mode this returned the multiplier, which the
        trace and the console then showed as the LR: `lr=1e0` for a run training at 2e-4, whose LR it never scaled)."""
        a = self.actuators
        if a.lr_mode == "absolute":
            return a.mode_lrs[self.mode]
        inner = _unwrap_optimizer(self.optimizer)
        if inner is None:
            return None
        lr = inner.param_groups[0]["lr"]
        if torch.is_tensor(lr):  # lr=torch.tensor(...), as for a compiled optimizer: the trace needs a number
            lr = lr.item()
        return None if lr is None else lr * self.lr_multiplier

    def _apply_lr(self) -> None:
        if self.actuators.lr_mode != "absolute":
            return
        inner = _unwrap_optimizer(self.optimizer)
        if inner is not None:
            for g in inner.param_groups:
                g["lr"] = self.actuators.mode_lrs[self.mode]

    def _apply_rank(self) -> None:
        for a in self.adapters:
            a.set_rank(self.rank)

    # -- the step -----------------------------------------------------------------
    @staticmethod
    def _loss_value(loss) -> float:
        """This process's loss as a float (no all-reduce)."""
        if type(loss) is not float:  # a float is what a loop passes (loss.item()); checks cost host time every step
            if torch.is_tensor(loss):
                loss = loss.detach().float().item()
            elif getattr(loss, "ndim", None) == 0 and hasattr(loss, "item"):  # a 0-d numpy array
                loss = loss.item()
            if not isinstance(loss, numbers.Real):  # int, float, numpy scalars
                raise ValueError(f"loss: expected a number or a scalar tensor, got {type(loss).__name__}")
            loss = float(loss)
        return loss

    def _reduce_group(self):
        """(the `reduce_loss` is the default, `distributed_mean`, the process group the controller's own reductions
        run over): the group of a `functools.partial(distributed_mean, group=...)`, else the FSDP2 device mesh's
        when the managed parameters are sharded (a mesh over some processes only: two models sharded apart in one
        world), else None, the whole world (DDP). Needs an initialised process group."""
        reduce, group = self.reduce_loss, None
        if isinstance(reduce, functools.partial) and reduce.func is distributed_mean and not reduce.args and \
                set(reduce.keywords) <= {"device", "group"}:
            reduce, group = distributed_mean, reduce.keywords.get("group")
        dt = _dtensor_type()
        # per step, so the first block settles it (17 µs for managed_parameters() of two adapters): sharded or not,
        # all of them are (a mix is refused at attach_optimizer)
        if group is None and dt is not None and (not self.adapters or isinstance(self.adapters[0].lora_A[0], dt)):
            group = shard_group(self.managed_parameters())
        return reduce is distributed_mean, group

    def _trace_group(self):
        """The process group whose steps this controller's trace file records (its first process writes it)."""
        return self._reduce_group()[1] if _DIST and dist.is_initialized() else None

    def _lockstep_group(self):
        """(whether `step` reduces the loss in lockstep, the process group): the default `reduce_loss` over more
        than one process (see `_reduce_group`)."""
        if not (_DIST and dist.is_initialized()):
            return False, None
        default, group = self._reduce_group()
        return default and dist.get_world_size(group) > 1, group

    def _lockstep_fields(self) -> dict[str, int]:
        """What every process's controller must agree on before a step, as integers (`lockstep_mean` compares them):
        the step count, the mode, the rank, the Mirror snapshot, the last transition and a digest of the settings."""
        digest = self.__dict__.get("_settings_digest")
        if digest is None:
            import dataclasses
            import json
            import zlib

            configs = [self.signal_config, self.machine.config, self.actuators, self.mirror.config]
            text = json.dumps([dataclasses.asdict(c) if dataclasses.is_dataclass(c) else repr(c) for c in configs],
                              sort_keys=True, default=repr)
            digest = self._settings_digest = zlib.crc32(text.encode())
        last = self.machine.last_transition_step
        return {"steps": self.global_step, "modes": self.mode, "ranks": self.rank,
                "Mirror snapshots held": int(self.mirror.held), "last transition steps": -1 if last is None else last,
                "settings digests (signal, machine, actuator and Mirror configs)": digest}

    def _read_loss(self, loss, refusal: BaseException | None = None) -> float:
        """The loss the signal reads: this process's, reduced by `reduce_loss`. `refusal`: the error this process's
        checks raised before the step; under the default reduction every process raises together (see `step`)."""
        lockstep, group = self._lockstep_group()
        if lockstep:
            value = 0.0
            if refusal is None:
                try:
                    value = self._loss_value(loss)
                except ValueError as e:
                    refusal = e
            return lockstep_mean(value, self._lockstep_fields(), refusal, group)
        if refusal is not None:
            raise refusal
        loss = self._loss_value(loss)
        if self.reduce_loss is not None:
            # a float again: a reduce_loss giving a numpy float (np.mean) or a tensor put that type into loss_ema and
            # ctrl.state_dict(), which torch.load(weights_only=True) (torch's default) then refused to load
            loss = self._loss_value(self.reduce_loss(loss))
        return loss

    def _check_sync_step(self) -> None:
        """Refuse a step on one of accelerate's gradient-accumulation micro-batches: its optimizer step will not run
        (`accelerator.sync_gradients` is False), yet the controller counted it as a step (warm-up, dwell and
        eval_interval ran N times too fast) and fed the signal one micro-batch's loss and half-summed gradients.
        The attached AcceleratedOptimizer's gradient state says so, and the step is refused. With the torch
        optimizer attached before `prepare` (or none attached), only accelerate's process-wide state can tell, and
        it outlives its Accelerator: a loop that stopped on a micro-batch leaves `sync_gradients` False for any
        later loop in the process. There the step is warned about, not refused."""
        state = getattr(self.optimizer, "gradient_state", None)  # accelerate's AcceleratedOptimizer
        if state is not None and getattr(state, "sync_gradients", True) is False:
            raise ValueError("ctrl.step: called on a gradient-accumulation micro-batch (accelerator.sync_gradients "
                             "is False), whose optimizer.step() accelerate skips; the controller counts optimizer "
                             "steps. Call ctrl.step only when accelerator.sync_gradients is true, with the mean loss "
                             "of that step's micro-batches")
        if state is None and "accelerate.state" in sys.modules:
            shared = sys.modules["accelerate.state"].GradientState
            if shared._shared_state != {} and shared().num_steps > 1 and shared().sync_gradients is False:
                warnings.warn(
                    "ctrl.step: accelerate's gradient state says this is a gradient-accumulation micro-batch "
                    "(sync_gradients is False, gradient_accumulation_steps > 1), whose optimizer.step() accelerate "
                    "skips; the controller counts optimizer steps. Call ctrl.step only when "
                    "accelerator.sync_gradients is true, and attach accelerate's optimizer "
                    "(ctrl.attach_optimizer(accelerator.prepare(opt))) to have such a step refused. If no "
                    "Accelerator accumulates now, the state is an earlier one's, left on a micro-batch", stacklevel=4)

    def _check_before_step(self) -> None:
        """The checks that refuse a step before anything moves, with a ValueError; they read this process's state
        only, so under DDP `step` hands their error to the lockstep all-reduce (every process raises together)."""
        self._check_sync_step()
        self._check_rank()
        self._check_backward_ran()  # (under FSDP2 one process without gradients hung the others in the signal's
        # all-reduce, which it never reached)

    def _check_rank(self) -> None:
        """Refuse a step while an adapter runs at another rank than the controller's mode gives it, before anything
        moves: the rank is in the model's state dict (`_extra_state`), so a `model.load_state_dict` of a model
        saved at rank 4 under a controller in MULTI (8), or a `set_rank` by hand, left the layers at 4 while the
        controller trained at MULTI's LR, recorded rank 8 and changed nothing until its next transition, silently."""
        r = self.rank
        if any(a.rank != r for a in self.adapters):
            ranks = sorted({a.rank for a in self.adapters})
            raise ValueError(
                f"ctrl.step: the adapters run at rank {ranks[0] if len(ranks) == 1 else ranks}, but this controller "
                f"is in {MODES[self.mode]}, whose rank is {r}: the model's rank was set outside the controller (a "
                f"model.load_state_dict, which restores the rank it was saved at, or set_rank). Resume the "
                f"controller too (ctrl.load_state_dict of the state saved with the model), or go on at the "
                f"controller's rank with unified_lora.set_rank(ctrl.adapters, ctrl.rank)")

    def _check_backward_ran(self) -> None:
        # block 0 is active at every rank, so one attribute read settles the usual case. Otherwise any adapter's
        # gradient will do, or a trained head's: a layer that took no part in this forward (LayerDrop) has none.
        if self.adapters and self.adapters[0].first_block_grad() is None and all(
                p.grad is None for a in self.adapters for p in a.active_parameters()):
            self._refuse_merged()
            check_sharding(self.managed_parameters())  # FSDP1: a process whose slice of the blocks is empty
            if all(p.grad is None for p in self.extra_params):
                self._refuse_unsharded_after_backward()
                raise ValueError("ctrl.step: no gradient on the adapters; call loss.backward() before "
                                 "ctrl.step(loss=...)")

    def _refuse_unsharded_after_backward(self) -> None:
        """With no gradient on the adapters: a ValueError if FSDP2's backward left its unsharded parameters on the
        modules (`set_reshard_after_backward(False)`) while the gradients went to the sharded ones the optimizer
        holds. "call loss.backward()" was the message, and the user had called it."""
        inner = _unwrap_optimizer(self.optimizer)
        groups = getattr(inner, "param_groups", None) or ()
        sharded_grads = any(local_tensor(p) is not p and p.grad is not None for g in groups for p in g["params"])
        if sharded_grads and any(local_tensor(p) is p for p in self.managed_parameters()):
            raise ValueError(
                "ctrl.step: the adapters on the model are FSDP2's unsharded parameters, which hold no gradient: the "
                "backward left them unsharded (model.set_reshard_after_backward(False), e.g. for gradient "
                "accumulation), and it put the gradients on the sharded parameters the optimizer holds. Call "
                "model.set_reshard_after_backward(True) before the backward that ctrl.step follows (the last "
                "micro-batch's; set it False for the others only), or leave it at its default (True). "
                "fully_shard(..., reshard_after_forward=False) is fine: the backward reshards")

    _MERGE_CALLS = ("merge_adapters", "unmerge_adapters(model)")  # (what merged them, what undoes it)

    def _refuse_merged(self) -> None:
        """With no gradient on the adapters: a ValueError if some are merged (the likelier cause than no backward)."""
        merged = [a for a in self.adapters if getattr(a, "merged_rank", 0)]
        if merged:  # a merged layer runs its base weight alone: backward ran, and the adapters took no part
            raise ValueError(f"ctrl.step: no gradient on the adapters: {len(merged)} of {len(self.adapters)} "
                             f"are merged into their base weights ({self._MERGE_CALLS[0]}), so the forward ran without "
                             f"them; call {self._MERGE_CALLS[1]} before training again")

    def _update_signal(self, loss: float) -> float:
        """Feed the signal; subclasses take extra step inputs here (e.g. per-task losses)."""
        if isinstance(self.signal, CompositeSignal):
            finite = math.isfinite(loss)
            norms, cos = self.grad_stats(self.adapters) if finite else ([float("nan")], [None])
            return self.signal.update(loss, norms, cos)
        return self.signal.update(loss)

    def step(self, loss, **inputs) -> list[Transition]:
        """Feed one optimizer step's loss; returns the transitions made (0 or 1).

        A transition is all or nothing. If anything in it raises (the Mirror save, drift or restore, a
        rank change, a subclass's split or merge), the controller is put back as it was before the
        transition: the machine's mode and dwell counter, every adapter's rank, the learning rate and
        the Mirror snapshot (one taken by the failed entry is dropped; the one held at a failed exit
        stays held). Then the error is raised again. The step itself stays counted: the signal has
        already read this step's loss and gradients (φ, its EMAs, the stored gradient, `loss_ema`),
        `global_step` advances, and the trace records the step in the old mode with
        `components["transition_error"]`. So the controller is exactly where it would be had the
        machine held its mode at this step; a caller that catches the error, fixes its cause and goes
        on with `optimizer.step()` and the next batch gets the transition at the next decision step
        where φ still calls for it. Do not call `ctrl.step` again for the same batch: the signal would
        count it twice. Not undone: what the transition already wrote into the weights (a Mirror
        restore is the last write of an exit, so a failure before it leaves the weights alone; a
        restore that completed stays, with this step's gradients cleared), gradients of blocks a
        partial rank drop paused, and a multi-task split or merge that raised partway."""
        refusal = None
        try:  # per-process checks: under DDP one process alone may fail them (a model.load_state_dict on process 0
            self._check_before_step()  # only); the lockstep all-reduce then stops every process, not that one
        except ValueError as e:  # alone while the others wait in the collective
            refusal = e
        loss = self._read_loss(loss, refusal)
        self._watch_order()
        self._watch_accumulation()
        self.last_loss = loss
        phi = self._update_signal(loss, **inputs)
        comps = dict(self.signal.components)
        nonfinite = bool(comps.pop("nonfinite", False))
        self._last_nonfinite = nonfinite
        if nonfinite:
            self.nonfinite_steps += 1
        else:
            self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss
        machine = self.machine
        last_transition_step = machine.last_transition_step
        transition = machine.step(phi, self.global_step)
        snap_event, drift, error = None, None, None
        if transition is None:
            if machine.mode == MIRROR and not self.mirror.held and (self.adapters or self.extra_params):
                # in MIRROR with no snapshot: a run that starts there (initial_mode=2) never entered it by a
                # transition, and its exit would skip the rollback rule. Take the entry snapshot now.
                try:
                    self._save_snapshot(self.global_step)
                    snap_event = "saved"
                except BaseException as e:
                    self.mirror.clear()
                    comps["snapshot_error"] = f"MIRROR snapshot: {type(e).__name__}: {e}"
                    error = e
            self._annotate(None, comps)
        else:
            held = self.mirror.held
            try:
                snap_event, drift = self._on_transition(transition)
                decision = self._exit_decision
                self._apply_rank()
                self._annotate(transition, comps)
                self._commit_transition()
                if decision is not None:  # what the rule decided on, beside the drift: loss_worse compares the losses
                    comps.update(mirror_policy=decision.policy, mirror_loss_entry=decision.loss_at_entry,
                                 mirror_loss_exit=decision.loss_at_exit)
            except BaseException as e:  # KeyboardInterrupt too: the controller must not stay half-switched
                self._undo_transition(transition, last_transition_step, held, e)
                comps["transition_error"] = (f"{MODES[transition.old]}->{MODES[transition.new]}: "
                                             f"{type(e).__name__}: {e}")
                transition, snap_event, drift, error = None, None, None, e
                try:
                    self._annotate(None, comps)  # as for a step without a transition
                except Exception as again:
                    _add_note(e, f"unified-lora: annotating the step failed too: {type(again).__name__}: {again}")
        self._apply_lr()
        mode = machine.mode
        rec = StepRecord(step=self.global_step, loss=loss, phi=phi, mode=mode, rank=self.actuators.mode_ranks[mode],
                         lr=self.get_last_lr(), components=comps, nonfinite=nonfinite, snapshot=snap_event, drift=drift,
                         transition=None if transition is None else f"{MODES[transition.old]}->{MODES[transition.new]}")
        self.global_step += 1
        if error is not None:
            try:
                self._record(rec)
            except Exception as again:
                _add_note(error, f"unified-lora: recording the step failed too: {type(again).__name__}: {again}")
            raise error
        self._record(rec)
        return [transition] if transition is not None else []

    def _commit_transition(self) -> None:
        """The last part of a transition, once every actuator has run: a Mirror exit drops its snapshot."""
        decision, self._exit_decision = self._exit_decision, None
        if decision is not None:
            self.mirror.clear()
            self.last_decision = decision

    def _undo_transition(self, t: Transition, last_transition_step: int | None, held: bool,
                         error: BaseException) -> None:
        """Put the machine, the ranks, the LR and the Mirror snapshot back as they were before `t`."""
        self.machine.mode, self.machine.last_transition_step = t.old, last_transition_step
        self._exit_decision = None  # an exit that failed keeps its snapshot
        if self.mirror.held and not held:  # taken by the failed entry
            self.mirror.clear()
        try:
            self._apply_rank()
        except Exception as again:  # the rank change itself failed; report both, raise the first
            _add_note(error, f"unified-lora: putting the adapters back at rank {self.rank} failed too: "
                           f"{type(again).__name__}: {again}")

    def _annotate(self, transition: Transition | None, comps: dict) -> None:
        """Hook for subclasses to add trace components after the actuators ran."""

    def update(self, loss) -> float | None:
        """v1 README API: feed the loss, get the mode's learning rate."""
        self.step(loss)
        return self.get_last_lr()

    def _on_transition(self, t: Transition) -> tuple[str | None, float | None]:
        params = self.managed_parameters()
        if not params:  # a pure LR controller (v1 API) has nothing to snapshot
            return None, None
        if t.new == MIRROR:
            self._save_snapshot(t.step, params)
            return "saved", None
        if t.old == MIRROR and self.mirror.held:
            decision = self._mirror_decision()
            if decision.restore:
                self._restore_snapshot(params)
                for p in params:  # this step's gradients belong to the discarded weights
                    p.grad = None
            self._exit_decision = decision  # the snapshot is dropped when the whole transition has run
            return ("restored" if decision.restore else "kept"), decision.drift
        return None, None

    def _restore_snapshot(self, params: list[nn.Parameter]) -> None:
        """Write the Mirror snapshot back (with the optimizer state, if saved). A merged layer's base weight holds
        the delta of the blocks being replaced: it is unmerged first and merged again with the restored blocks, as a
        rank change does. Before, the restore wrote the blocks under it, and its unmerge then took the restored
        delta out of a weight that held the discarded one, leaving their difference in the base weight."""
        merged = [a for a in self.adapters if getattr(a, "merged_rank", 0)]
        for a in merged:
            a.unmerge()
        try:
            self.mirror.restore(params, _unwrap_optimizer(self.optimizer))
        finally:  # (a refused restore wrote nothing: the layers merge the blocks they had)
            for a in merged:
                a.merge()

    def _mirror_decision(self) -> MirrorDecision:
        """Mirror's exit rule, with the drift over every LoRA block (not the `modules_to_save`)."""
        lora = [p for a in self.adapters for p in a.lora_parameters()]
        return self.mirror.decide(lora, loss_at_exit=self.loss_ema)

    def _save_snapshot(self, step: int, params: list[nn.Parameter] | None = None) -> None:
        """Mirror's entry snapshot of the managed parameters (and, if configured, their optimizer state)."""
        params = self.managed_parameters() if params is None else params
        labels = self._managed_labels()  # so a Mirror error names the parameter
        self.mirror.save(params, self.optimizer and _unwrap_optimizer(self.optimizer), self.loss_ema, step,
                         names=labels if len(labels) == len(params) else None)

    def _record(self, rec: StepRecord) -> None:
        if self.keep_trace:
            self.trace.append(rec)
        if self.writer is not None:
            self.writer.write(rec)
        if self.print_fn is not None and self._console_due(rec):
            if self.print_fn is not print_on_main_process:  # given: it prints wherever it is called
                self.print_fn(format_console(rec))
            elif is_first_process(self._trace_group):  # the default: once (process 0, or the first of its group)
                print(format_console(rec))

    def _console_due(self, rec: StepRecord) -> bool:
        """Whether the step gets a console line: a transition, and every `log_every`-th step."""
        return bool(rec.transition or (self.log_every and rec.step % self.log_every == 0))

    # -- state ----------------------------------------------------------------------
    _STATE_KEYS = ("global_step", "loss_ema", "nonfinite_steps", "signal", "grad_stats", "machine", "mirror")
    # the keys each part's load reads (the signal's are compared with this controller's signal below); "opt_home"
    # and "layout" are optional: states saved before them have none
    _PART_KEYS = {"machine": ("mode", "last_transition_step"), "grad_stats": ("prev",),
                  "mirror": ("weights", "opt_state", "loss_at_entry", "step_saved"),
                  "layout": ("adapters", "rank_levels", "lora_shapes", "extra_shapes")}
    _ELEMENTWISE_MOMENTS = ("exp_avg", "exp_avg_sq", "momentum_buffer", "max_exp_avg_sq")  # shaped like the parameter

    def state_dict(self) -> dict:
        self._reshard()
        return {
            "global_step": self.global_step,
            "loss_ema": self.loss_ema,
            "nonfinite_steps": self.nonfinite_steps,
            "signal": self.signal.state_dict(),
            "grad_stats": self.grad_stats.state_dict(),
            "machine": self.machine.state_dict(),
            "mirror": self.mirror.state_dict(),
            "layout": self._layout(),
            # FSDP2: the Mirror snapshot, its optimizer moments and the stored gradients are this process's shards;
            # where they lie, so that only a process holding the same shards loads them (None: not sharded)
            "sharding": sharding_of(self.managed_parameters()),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Load a `state_dict()`. It must come from a controller over the same adapters: the same number
        of adapters (and names, rank levels and parameter shapes, which states saved since this check
        record under "layout") and of extra parameters, and every tensor in it (the Mirror snapshot and
        its optimizer moments, the stored gradients, the signal's per-adapter EMAs) shaped like the
        parameter it belongs to. Anything else raises a `ValueError` that lists what differs, before
        anything is loaded: such a state would restore one layer's snapshot into another.

        Under FSDP2 (`fully_shard`) a state holds the saving process's shards: each process saves its own and loads
        it back in a run sharded the same way (the same number of processes, the same rank, placements and shapes,
        which the state records under "sharding"). A state with shards of another process or sharding, or whole
        tensors loaded into a sharded run (and shards into an unsharded one), raises the ValueError.
        (`unified_lora.distributed.save_sharded_checkpoint` / `load_sharded_checkpoint` resume over another number
        of processes: they reshard the state's tensors through torch.distributed.checkpoint.) A state that
        holds no tensors (no Mirror snapshot held, no stored gradients) is the same on every process and loads
        into any run."""
        self._reshard()
        self._check_state(sd)
        # the trace file read and checked now (a damaged one raises here), rewritten once the state has loaded
        trace = self.writer.resume_plan(sd["global_step"]) if self.writer is not None else None
        before = self.state_dict()
        try:
            self._load_parts(sd)
        except BaseException as e:
            # all or nothing: a part that raised midway (what the checks above cannot see, a Ctrl-C) left the parts
            # before it loaded and the rest as they were
            try:
                self._load_parts(before)
            except BaseException as again:  # noqa: BLE001 - said in the note; the first error is the one raised
                _add_note(e, f"ctrl.load_state_dict: putting the controller's previous state back failed too "
                             f"({type(again).__name__}: {again}); the controller is partly loaded: build it again")
            raise
        if self.writer is not None:  # a resumed run's trace_path keeps the lines of the steps before it
            self.writer.apply_resume(trace)
        self._warn_snapshot_config_differs()

    def _warn_snapshot_config_differs(self) -> None:
        """After a load: a warning where the Mirror snapshot held holds the optimizer state and this controller's
        `MirrorConfig` has `snapshot_optimizer=False`, or the other way round. The snapshot applies as it was taken
        (a restore puts back what it holds, as the saved run's would have); the config, from the next entry on.
        Before, this went unsaid: a config of False still restored the optimizer state at this exit."""
        mirror = self.mirror
        if not mirror.held or (mirror.opt_state is not None) == mirror.config.snapshot_optimizer:
            return
        if mirror.opt_state is not None:
            held, config = ("holds the optimizer state (taken with snapshot_optimizer=True)",
                            "this MIRROR's exit restores it with the weights, as the saved run's would")
        else:
            held, config = ("holds the weights only (taken with snapshot_optimizer=False, or with no optimizer "
                            "attached)", "this MIRROR's exit restores the weights only: no optimizer state was saved")
        warnings.warn(f"ctrl.load_state_dict: the loaded Mirror snapshot {held}, and this controller's MirrorConfig "
                      f"has snapshot_optimizer={mirror.config.snapshot_optimizer}. The snapshot applies as it was "
                      f"taken: {config}; the config applies from the next MIRROR entry on", stacklevel=_user_stacklevel())

    def _load_parts(self, sd: dict) -> None:
        """`load_state_dict`'s loads, on a state `_check_state` passed (or this controller's own, to put it back)."""
        device = self.adapters[0].lora_A[0].device if self.adapters else None
        # first: the one part that can still fail (a kernel)
        self.mirror.load_state_dict(sd["mirror"], device, params=self.managed_parameters())
        self._exit_decision = None
        self.global_step, self.loss_ema = sd["global_step"], sd["loss_ema"]
        self.nonfinite_steps = sd["nonfinite_steps"]
        self.signal.load_state_dict(sd["signal"])
        self.grad_stats.load_state_dict(sd["grad_stats"], device)
        self.machine.load_state_dict(sd["machine"])
        self._apply_rank()
        self._apply_lr()

    def _check_state(self, sd: dict) -> None:
        """Raise the ValueError of `load_state_dict` if `sd` does not fit this controller; load nothing."""
        problems = self._state_problems(sd)
        if problems:
            shown = problems[:8] + ([f"... ({len(problems) - 8} more)"] if len(problems) > 8 else [])
            raise ValueError("ctrl.load_state_dict: the state was not saved from a controller like this one; "
                             "nothing was loaded:\n  - " + "\n  - ".join(shown))

    def _managed_labels(self) -> list[str]:
        """A readable name for each of `managed_parameters()`, in the same order."""
        out = []
        for name, a in zip(self._adapter_names, self.adapters):
            names = {id(p): n for n, p in a.named_parameters()} if isinstance(a, nn.Module) else {}
            out += [f"{name}.{names.get(id(p), f'lora parameter {i}')}" for i, p in enumerate(a.lora_parameters())]
        return out + [f"extra parameter {i}" for i in range(len(self.extra_params))]

    def _layout(self) -> dict:
        """What a saved state must fit: the adapters (names, rank levels) and the managed parameters' shapes."""
        return {"adapters": [str(n) for n in self._adapter_names],
                "rank_levels": [[int(b) for b in a.boundaries] for a in self.adapters],
                "lora_shapes": [[list(p.shape) for p in a.lora_parameters()] for a in self.adapters],
                "extra_shapes": [list(p.shape) for p in self.extra_params]}

    def _state_problems(self, sd) -> list[str]:
        """Every way `sd` does not fit this controller (empty: it fits)."""
        if not isinstance(sd, dict):
            return [f"expected a dict from ctrl.state_dict(), got {type(sd).__name__}"]
        missing = [k for k in self._STATE_KEYS if k not in sd]
        if missing:
            return [f"missing keys {missing} (not a ctrl.state_dict())"]
        out: list[str] = []
        for part, keys in self._PART_KEYS.items():  # a truncated part's load raised a KeyError halfway, after the
            got = sd.get(part)                     # parts before it were loaded
            if got is None and part == "layout":
                continue
            if not isinstance(got, dict):
                out.append(f"sd[{part!r}] is a {type(got).__name__}, not a dict")
            elif any(k not in got for k in keys):
                out.append(f"sd[{part!r}] is missing keys {[k for k in keys if k not in got]} (a truncated or "
                           "edited state)")
        if out:
            return out
        here = self._layout()
        n_ad = len(self.adapters)
        managed = self.managed_parameters()
        labels = self._managed_labels()
        n_lora = len(managed) - len(self.extra_params)
        this = (f"this controller has {n_ad} adapter{'s' * (n_ad != 1)} ({_names(here['adapters'])}) with "
                f"{n_lora} LoRA parameters, and {len(self.extra_params)} extra parameters")

        def shape_of(t):
            return list(t.shape) if torch.is_tensor(t) else None

        saved = sd.get("layout")
        if saved is not None:  # states saved before this check have none: the tensors below are checked anyway
            s_ad, s_lora, s_extra = saved["adapters"], saved["lora_shapes"], saved["extra_shapes"]
            s_n_lora = sum(map(len, s_lora))
            if len(s_ad) != n_ad or s_n_lora != n_lora or len(s_extra) != len(self.extra_params):
                out.append(f"saved for {len(s_ad)} adapter{'s' * (len(s_ad) != 1)} ({_names(s_ad)}) with "
                           f"{s_n_lora} LoRA parameters, and {len(s_extra)} extra parameters; {this}")
            else:
                for i, (sn, hn) in enumerate(zip(s_ad, here["adapters"])):
                    if sn != hn:
                        out.append(f"adapter {i} is {sn!r} in the saved state and {hn!r} here")
                    elif saved["rank_levels"][i] != here["rank_levels"][i]:
                        out.append(f"adapter {hn!r}: saved with rank levels {tuple(saved['rank_levels'][i])}, "
                                   f"this one has {tuple(here['rank_levels'][i])}")
                    elif s_lora[i] != here["lora_shapes"][i]:
                        out.append(f"adapter {hn!r}: saved block shapes {s_lora[i]}, this one has "
                                   f"{here['lora_shapes'][i]}")
                for i, (a, b) in enumerate(zip(s_extra, here["extra_shapes"])):
                    if a != b:
                        out.append(f"extra parameter {i}: saved shape {tuple(a)}, this one is {tuple(b)}")

        mirror = sd["mirror"]
        weights = mirror.get("weights")
        opt_state = mirror.get("opt_state")
        prev = sd["grad_stats"].get("prev", [])
        # FSDP2: the tensors are the saving process's shards, which only a process holding the same shards can load
        saved_sh, here_sh = sd.get("sharding"), sharding_of(managed)
        if (weights is not None or opt_state is not None or any(prev)) and saved_sh != here_sh:
            return out + [_sharding_problem(saved_sh, here_sh)]
        # the tensors are shaped like this process's shards (the parameters themselves when not sharded)
        local = [tuple(local_tensor(p).shape) for p in managed]
        what = "the parameter is" if here_sh is None else "this process's shard of the parameter is"
        if weights is not None:
            if len(weights) != len(managed):
                out.append(f"the Mirror snapshot holds {len(weights)} tensors; {this} ({len(managed)} in all)")
            else:
                out += [f"Mirror snapshot of {lab}: saved {tuple(w.shape)}, {what} {sh}"
                        for lab, w, sh in zip(labels, weights, local) if shape_of(w) != list(sh)]
        if opt_state is not None:
            if len(opt_state) != len(managed):
                out.append(f"the Mirror snapshot's optimizer state has {len(opt_state)} entries; {this} "
                           f"({len(managed)} in all)")
            else:
                for lab, st, sh in zip(labels, opt_state, local):
                    for k, v in (st or {}).items():
                        if k in self._ELEMENTWISE_MOMENTS and torch.is_tensor(v) and tuple(v.shape) != sh:
                            out.append(f"Mirror snapshot's {k} of {lab}: saved {tuple(v.shape)}, {what} {sh}")

        if prev:
            if len(prev) != n_ad:
                out.append(f"the stored gradients are for {len(prev)} adapters; {this}")
            else:
                for name, a, gs in zip(here["adapters"], self.adapters, prev):
                    A, B = blocks_of(a.lora_A), blocks_of(a.lora_B)
                    k = len(gs) // 2
                    if len(gs) % 2 or k > len(A):
                        out.append(f"adapter {name!r}: {len(gs)} stored gradient blocks, not A and B blocks of a "
                                   f"rank level ({len(A)} blocks each)")
                        continue
                    want = [list(local_tensor(p).shape) for p in A[:k] + B[:k]]
                    got = [shape_of(g) for g in gs]
                    if got != want:
                        out.append(f"adapter {name!r}: stored gradient shapes {got}, its blocks are {want}")

        sig, mine = sd["signal"], self.signal.state_dict()
        if not isinstance(sig, dict) or set(sig) != set(mine):
            out.append(f"the signal state has keys {sorted(sig) if isinstance(sig, dict) else type(sig).__name__}; "
                       f"this controller's {type(self.signal).__name__} has {sorted(mine)}")
        elif isinstance(self.signal, CompositeSignal):
            for key in ("S", "E"):
                if len(sig[key]) not in (0, n_ad):
                    out.append(f"the composite signal's {key} EMAs are for {len(sig[key])} adapters; {this}")
        mode = sd["machine"].get("mode")
        if mode not in range(len(MODES)):
            out.append(f"machine mode {mode!r} is not one of 0, 1, 2 ({', '.join(MODES)})")
        hold = sd["machine"].get("hold_down", {})  # (none in older files)
        if not isinstance(hold, dict) or not all(_is_int(k) and int(k) in range(len(MODES)) and _is_int(v)
                                                 for k, v in hold.items()):
            out.append(f"sd['machine']['hold_down'] is {hold!r}, not a mapping of a mode (0, 1, 2) to a step")
        return out

    def __getstate__(self) -> dict:
        # A deep copy (or pickle) keeps everything but the open trace file: two controllers appending to one
        # JSONL file would interleave their steps. `ctrl.trace` is copied; the copy writes no file.
        state = self.__dict__.copy()
        state["writer"] = None
        # the hook handles would carry the optimizer's whole hook dict (a user's lambda hook made the controller
        # unpicklable); `__setstate__` registers the hooks again
        state["_hooks"] = [None] * len(self._hooks)
        state["_used_grad"] = None  # (a weak reference: not picklable; the copy's tensors are others anyway)
        return state

    def __setstate__(self, state: dict) -> None:
        """A controller pickled by an earlier version (`pickle`, `torch.load(weights_only=False)` of a whole
        controller) lacks the attributes `__init__` sets that were added since: each comes back as a new controller
        starts it (a pickle without `_exit_decision` raised AttributeError at its first transition)."""
        if "extra_params" in state:  # pickled before `extra_params` became a property
            state["_extra_params"] = state.pop("extra_params")
        for key, value in (("_exit_decision", None), ("_extra_owners", None), ("_optimizer_steps", 0),
                           ("_steps_at_last_call", None), ("_accumulation_warned", False),
                           ("_last_nonfinite", False), ("_called", False), ("_used_grad", None)):
            state.setdefault(key, value)
        if "_unstepped" not in state:
            state["_unstepped"] = deque(maxlen=_ACCUMULATION_WINDOW)
        if "_adapter_names" not in state:  # (attach_optimizer and load_state_dict name the adapters)
            state["_adapter_names"] = _default_adapter_names(state["adapters"])
        self.__dict__.update(state)
        # torch's Optimizer.__setstate__ drops the optimizer's hooks, so the optimizer of a deep copy (or of an
        # unpickled controller) had none of lr_mode="multiplier"'s: the copy trained at the unscaled LR while its
        # trace reported the scaled one. Its own hooks go on that optimizer again, but not on one that another
        # controller's hooks still drive (a shallow copy shares the original's optimizer; two would compound the LR).
        inner = _unwrap_optimizer(self.optimizer)
        if self._hooks and inner is not None:
            pre = getattr(inner, "_optimizer_step_pre_hooks", {})
            if any(isinstance(getattr(h, "__self__", None), UnifiedController) for h in pre.values()):
                self._hooks = []
            else:
                self._register_hooks(inner)
        elif not self._hooks:
            self._steps_at_last_call = None  # (no hooks: no count; a later attach_optimizer starts one)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        inner = _unwrap_optimizer(self.optimizer)
        if inner is not None:  # a step that raised left its LRs multiplied: put them back before the hooks go
            self._post_step(inner, None, None)
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _setup_ranks(fn, rank_levels, mode_ranks, lr_mode, controller_kwargs: dict) -> tuple:
    """A setup's (rank levels, mode ranks, ActuatorConfig), `actuators` popped from `controller_kwargs`. The
    ActuatorConfig is built before the layers' config, whose initial rank is MULTI's: a `mode_ranks` of the wrong
    length, or whose MULTI rank is not a level, is refused as `mode_ranks` (it was an IndexError, or
    "initial_rank: ...", an argument the caller never passed). The levels are checked first, so levels that do not
    nest are refused as `rank_levels` (the mode ranks drawn from them were refused as `mode_ranks`, and no levels
    at all raised an IndexError)."""
    levels, given_ranks = check_rank_levels(rank_levels), mode_ranks
    mode_ranks = tuple(mode_ranks) if mode_ranks is not None else (levels[0], levels[min(1, len(levels) - 1)], levels[-1])
    actuators = controller_kwargs.pop("actuators", None)
    check_config_arg("actuators", actuators, ActuatorConfig)
    # lr_mode / mode_ranks beside an ActuatorConfig that sets them otherwise are refused
    _refuse_ignored(fn, "actuators", actuators, mode_ranks=given_ranks, lr_mode=lr_mode)
    actuators = actuators or ActuatorConfig(mode_ranks=mode_ranks, lr_mode=lr_mode or "multiplier")
    if given_ranks is not None:
        mode_ranks = actuators.mode_ranks  # as ints
    if mode_ranks[1] not in levels:
        raise ValueError(f"mode_ranks: MULTI's rank {mode_ranks[1]} is the layers' initial rank and must be one of "
                         f"rank_levels {levels}, got {mode_ranks}")
    return levels, mode_ranks, actuators


def _default_adapter_names(adapters: Sequence) -> list[str]:
    """The names of adapters given as a list: each layer's `name`, else "adapter i"."""
    return [getattr(a, "name", f"adapter {i}") for i, a in enumerate(adapters)]


def _is_int(v) -> bool:
    """An int, or a string of one (a state's keys after a trip through JSON); not a bool."""
    if isinstance(v, str):
        return v.lstrip("-").isdigit()
    return isinstance(v, int) and not isinstance(v, bool)


def _grad_versions(g: torch.Tensor) -> tuple[int, int]:
    """The version counters an in-place write into the gradient `g` bumps (`_watch_order`): its own, and under FSDP2
    (a DTensor) its local shard's as well. FSDP2 adds a backward into an existing gradient in the shard
    (`_local_tensor +=`), which leaves the DTensor's counter as it was (a warm-up optimizer step without zero_grad
    was warned about), while `zero_grad(set_to_none=False)` bumps the DTensor's counter alone."""
    dt = _dtensor_type()
    return g._version, (g.to_local() if dt is not None and isinstance(g, dt) else g)._version


def check_config_arg(name: str, value, cls: type) -> None:
    """`value`, given as the `name=` argument, must be None or a `cls` (a config dataclass). Anything else (a policy's
    name for `mirror=`, a dict for `machine=`, a signal's name for the multi-task `signal=`) is a ValueError naming
    the argument; it was an AttributeError from deep in the setup."""
    if value is not None and not isinstance(value, cls):
        raise ValueError(f"{name}: pass {name}={cls.__name__}(...) or leave it out, got {value!r} "
                         f"({type(value).__name__})")


def _refuse_ignored(fn: Callable, arg: str, config, **given) -> None:
    """A keyword of `fn` that the config object passed as `arg`= replaces must not be given with another value:
    it was ignored silently (theta0=0.2 with machine=MachineConfig(warmup_steps=10) ran at the config's 0.3)."""
    if config is None:
        return
    params = inspect.signature(fn).parameters
    for name, value in given.items():
        value = tuple(value) if isinstance(value, (list, tuple)) else value
        if value != params[name].default and value != getattr(config, name):
            raise ValueError(f"{name}: {value!r} would be ignored: {arg}= is given ({type(config).__name__} with "
                             f"{name}={getattr(config, name)!r}) and sets it; set {name} in that "
                             f"{type(config).__name__} instead, or drop one of the two")


def _sharding_problem(saved: dict | None, here: dict | None) -> str:
    """Why a state holding FSDP2 shards (or whole tensors) cannot be loaded by this process (see `sharding_of`)."""
    held = "the Mirror snapshot, its optimizer moments or the stored gradients"
    same = ("Each process saves its own state and loads it back in a run sharded the same way: "
            "torch.save(ctrl.state_dict(), f'ctrl_rank{rank}.pt') on every process, and on resume "
            "ctrl.load_state_dict(torch.load(f'ctrl_rank{rank}.pt')) on each, with as many "
            "processes. (accelerate's save_state writes a registered object from the main process only, so every "
            "process would load process 0's state: save the controller per process as above instead of "
            "accelerator.register_for_checkpointing.) To resume over another number of processes, checkpoint with "
            "unified_lora.distributed.save_sharded_checkpoint and load_sharded_checkpoint: they reshard the "
            "controller's tensors as torch.distributed.checkpoint reshards the model's.")
    if saved is None:
        return (f"the state holds whole tensors ({held}) saved by a controller whose parameters were not sharded "
                f"(one process or DDP; or by a version that did not record FSDP2's sharding); this is process "
                f"{here['rank']} of {here['world_size']} of a run sharded by FSDP2, which holds a shard of each. "
                f"Resume a run under the sharding it was saved with")
    if here is None:
        return (f"the state holds process {saved['rank']} of {saved['world_size']}'s shards ({held}) of a run "
                f"sharded by FSDP2; this controller's parameters are not sharded. Resume it under FSDP2 over "
                f"{saved['world_size']} processes, each loading the state it saved. " + same)
    if (saved["world_size"], saved["rank"]) != (here["world_size"], here["rank"]):
        return (f"the state holds the shards ({held}) of process {saved['rank']} of {saved['world_size']} of a run "
                f"sharded by FSDP2; this is process {here['rank']} of {here['world_size']}. " + same)
    for key, what in (("placements", "placements"), ("shapes", "shapes"), ("local_shapes", "shard shapes")):
        a, b = saved.get(key), here.get(key)
        if a != b:
            i = next((i for i, (x, y) in enumerate(zip(a or [], b or [])) if x != y), None)
            diff = (f" (managed parameter {i}: saved {a[i]}, here {b[i]})" if i is not None else
                    f" ({len(a or [])} saved, {len(b or [])} here)")
            return (f"the state holds the shards ({held}) of process {saved['rank']} of {saved['world_size']}, sharded "
                    f"with other {what} than this run's{diff}. " + same)
    return f"the state's sharding {saved} is not this run's {here}. " + same


def _names(names: Sequence[str], most: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f", ... ({len(names) - most} more)" if len(names) > most else "") if names else "none"


def setup_unified_lora(
    model: nn.Module,
    target_modules: Sequence[str] | str | None = None,
    *,
    rank_levels: Sequence[int] = (4, 8, 16),
    max_rank: int | None = None,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    scaling: str = "alpha_over_r",
    modules_to_save: Sequence[str] | None = None,
    signal: str | SignalConfig = "composite",
    optimizer=None,
    lr_mode: str | None = None,
    mode_ranks: Sequence[int] | None = None,
    layer_kernel: str = "python",
    autocast_adapter_dtype: bool = True,
    **controller_kwargs,
) -> tuple[dict[str, NestedLoRALayer], UnifiedController]:
    """v3 model card API: inject nested LoRA and build the controller.

    `target_modules` None (the default): PEFT's default targets for the model type, as `LoraConfig` picks them
    (`model.default_target_modules`). Defaults follow the v3 card: the composite signal, ranks 4/8/16 for
    SINGLE/MULTI/MIRROR, and (since the user keeps their own optimizer and
    schedule) LR as a per-mode multiplier (`lr_mode` None: "multiplier", or the `actuators=` config's; an
    `lr_mode` that differs from that config's is a ValueError). `layer_kernel="cpp"` runs the layers'
    nested path as a C++ autograd Function (`NestedLoRAConfig.kernel`).
    `autocast_adapter_dtype` (PEFT's, default True): fp32 LoRA blocks on a
    bf16/fp16 base (`NestedLoRAConfig.autocast_adapter_dtype`). Returns
    ({name: adapter}, controller).
    """
    levels, mode_ranks, actuators = _setup_ranks(setup_unified_lora, rank_levels, mode_ranks, lr_mode, controller_kwargs)
    cfg = NestedLoRAConfig(target_modules=target_modules, rank_levels=levels, max_rank=max_rank, lora_alpha=lora_alpha,
                           lora_dropout=lora_dropout, scaling=scaling, modules_to_save=modules_to_save,
                           initial_rank=mode_ranks[1], kernel=layer_kernel,
                           autocast_adapter_dtype=autocast_adapter_dtype)
    with undone_on_error(model):  # a bad controller argument leaves the model unwrapped, so a retry can run
        adapters = inject_nested_lora(model, cfg)
        extra, owners = extra_parameters(model)
        ctrl = UnifiedController(adapters=adapters, optimizer=optimizer, signal=signal, actuators=actuators,
                                 extra_params=extra, **controller_kwargs)
        ctrl._extra_owners = owners
    warn_frozen_head(model)
    return adapters, ctrl


def extra_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[tuple[nn.Module, str]]]:
    """The trainable parameters of `model` outside the LoRA blocks (modules_to_save, a trained bias), each with
    (its module, its name there), from which the controller reads it again (see `extra_params`)."""
    params, owners = [], []
    for n, p in model.named_parameters():
        if p.requires_grad and ".lora_A." not in n and ".lora_B." not in n:
            mod, _, leaf = n.rpartition(".")
            params.append(p)
            owners.append((model.get_submodule(mod), leaf))
    return params, owners
