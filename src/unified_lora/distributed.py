"""Data-parallel training (DDP via torchrun or `accelerate launch`) with nested LoRA.

Every process must switch rank, learning rate and Mirror state on the same
step. `UnifiedController.step` all-reduces the loss (`distributed_mean`), so all
processes feed the state machine the same number; the composite signal reads
gradients that DDP has already averaged; Mirror snapshots, drift and restores
are computed from replicated weights. So the decisions agree by construction,
and `assert_lockstep(ctrl)` checks it at run time (one small all-gather).

What DDP needs (verified with torch 2.13 / gloo, see tests/test_distributed.py):

* A paused LoRA block is not in the autograd graph. With
  `find_unused_parameters=False` DDP raises at the next forward ("Expected to have
  finished reduction in the prior iteration"); with `static_graph=True` it raises
  after the first rank switch. Use `DDP(model, **ddp_kwargs())`, i.e.
  `find_unused_parameters=True` (the HF Trainer's default unless activation
  checkpointing is on; set `ddp_find_unused_parameters=True` then). Checkpointing must
  then be non-reentrant: DDP raises "Expected to mark a variable ready only once" with
  the reentrant one (transformers' default is `use_reentrant=False`).
* With `find_unused_parameters=True`, a parameter unused on every process keeps
  `.grad = None`: DDP writes no zeros into it (also with
  `gradient_as_bucket_view=True`), so AdamW skips it and paused blocks stay bit
  for bit as they were. `clear_paused_grads` exists for wrappers that do fill
  zeros; plain DDP does not need it.

FSDP and DeepSpeed ZeRO: not yet supported or tested. (Unverified concern: they
flatten and shard parameters, so the per-block `.grad = None` guarantee and the
per-block Mirror snapshot may not hold there.)
"""

from __future__ import annotations

import sys
from typing import Iterable

import torch
import torch.distributed as dist

from .layer import NestedLoRALayer


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def ddp_kwargs(**overrides) -> dict:
    """Keyword arguments for `DistributedDataParallel` that rank switching needs."""
    kw = {"find_unused_parameters": True}
    kw.update(overrides)
    if not kw["find_unused_parameters"] or kw.get("static_graph"):
        raise ValueError("find_unused_parameters: must be True (and static_graph off): a rank switch changes which "
                         "LoRA blocks take part in the forward pass")
    return kw


def unwrap_optimizer(opt):
    """The torch optimizer inside accelerate's `AcceleratedOptimizer`. That wrapper is
    itself a `torch.optim.Optimizer` subclass, but it delegates `step()` to the inner
    optimizer, so step hooks (the controller's LR multiplier) must go on the inner one:
    `ctrl.attach_optimizer(unwrap_optimizer(accelerator.prepare(opt)))`."""
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside `DistributedDataParallel` / `DataParallel` and `torch.compile` (what `accelerator.prepare`
    returns too, with a dynamo backend), in any nesting, so that files written from it name its modules as the
    bare model does (`q_proj`, not `module.q_proj` or `_orig_mod.q_proj`)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # loaded once anything was compiled; not imported here
    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif dynamo is not None and isinstance(model, dynamo.OptimizedModule):
            model = model._orig_mod
        else:
            return model


def _reentrant_checkpointing(model: torch.nn.Module) -> bool:
    """Whether transformers' activation checkpointing on `model` runs torch's reentrant checkpoint
    (`use_reentrant=True`, or not given: torch's default)."""
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            kw = getattr(getattr(m, "_gradient_checkpointing_func", None), "keywords", None)  # a functools.partial
            if isinstance(kw, dict) and kw.get("use_reentrant", True):
                return True
    return False


def _check_checkpointing(model: torch.nn.Module) -> None:
    if _reentrant_checkpointing(model):
        raise ValueError("activation_checkpointing_kwargs: use_reentrant must be False under DDP (transformers' "
                         "default when no kwargs are given). Rank switching needs find_unused_parameters=True, and "
                         "DDP cannot combine it with torch's reentrant checkpoint: it raises 'Expected to mark a "
                         "variable ready only once' at the first backward (pytorch/pytorch#24005)")


def check_trainer_ddp_args(args, model: torch.nn.Module | None = None) -> None:
    """Raise if the HF Trainer's DDP settings (`TrainingArguments`, and the checkpointing enabled on `model`)
    break rank switches."""
    if not is_distributed():
        return
    if getattr(args, "ddp_static_graph", None):
        raise ValueError("ddp_static_graph: must be off; a rank switch changes which LoRA blocks are in the graph")
    ckpt = getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False)
    if model is not None:  # enabled on the model itself: the Trainer's DDP default follows it too
        ckpt = ckpt or getattr(model, "is_activation_checkpointing", False) or \
            getattr(model, "is_gradient_checkpointing", False)
    fu = getattr(args, "ddp_find_unused_parameters", None)
    if fu is False or (fu is None and ckpt):
        why = (" The Trainer turns it off when activation checkpointing is on: pass ddp_find_unused_parameters=True."
               if fu is None else "")
        raise ValueError("ddp_find_unused_parameters: must be True; paused LoRA blocks take no part in the "
                         "forward pass, so DDP has to skip them (their .grad then stays None)." + why)
    if model is not None:
        _check_checkpointing(model)


def check_ddp(model: torch.nn.Module) -> None:
    """Raise if a DDP-wrapped model cannot survive a rank switch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not isinstance(model, DDP):
        return
    if getattr(model, "static_graph", False):
        raise ValueError("static_graph: must be off; a rank switch changes the set of parameters used")
    if not getattr(model, "find_unused_parameters", True):
        raise ValueError("find_unused_parameters: must be True; paused LoRA blocks take no part in the forward pass")
    wrapped = getattr(model, "_module_parameters", None)  # what DDP took to synchronise when it wrapped the model
    if wrapped is not None:
        known = {id(p) for p in wrapped}
        late = [n for n, p in model.module.named_parameters() if p.requires_grad and id(p) not in known]
        if late:
            shown = ", ".join(late[:3]) + (f", ... ({len(late) - 3} more)" if len(late) > 3 else "")
            raise ValueError(f"model: {len(late)} trainable parameters were added after DDP wrapped the model "
                             f"({shown}), so DDP does not all-reduce their gradients and each process would train "
                             f"its own copy. Inject the LoRA layers first (setup_unified_lora(model, ...)), then "
                             f"wrap the model (accelerator.prepare(model) or DDP(model, **ddp_kwargs()))")
    _check_checkpointing(model.module)


def clear_paused_grads(adapters: dict[str, NestedLoRALayer] | Iterable[NestedLoRALayer]) -> int:
    """Set `.grad = None` on every paused block (above the active rank); returns
    how many had one. Call between backward and `optimizer.step()` if a wrapper
    fills gradients of unused parameters with zeros."""
    layers = adapters.values() if isinstance(adapters, dict) else adapters
    n = 0
    for a in layers:
        for i in range(a.n_active_blocks, len(a.boundaries)):
            for p in (a.lora_A[i], a.lora_B[i]):
                if p.grad is not None:
                    p.grad = None
                    n += 1
    return n


def _device():
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def lockstep_state(ctrl) -> list[float]:
    """The numbers every process must agree on: step, mode, rank, φ, Mirror held."""
    return [float(ctrl.global_step), float(ctrl.mode), float(ctrl.rank), float(ctrl.phi), float(ctrl.mirror.held)]


def assert_lockstep(ctrl) -> None:
    """All-gather `lockstep_state(ctrl)` and raise if any process differs from rank 0.
    A no-op outside an initialised process group."""
    if not is_distributed():
        return
    mine = torch.tensor(lockstep_state(ctrl), dtype=torch.float64, device=_device())
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    for r, other in enumerate(every):
        if not torch.equal(other, every[0]):
            raise RuntimeError(f"controller out of lockstep: rank 0 has (step, mode, rank, phi, mirror) = "
                               f"{every[0].tolist()}, rank {r} has {other.tolist()}")


__all__ = ["is_distributed", "is_main_process", "ddp_kwargs", "check_ddp", "check_trainer_ddp_args", "clear_paused_grads",
           "unwrap_optimizer", "unwrap_model", "lockstep_state", "assert_lockstep"]
