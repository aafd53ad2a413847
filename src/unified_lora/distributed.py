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

FSDP2 (`torch.distributed.fsdp.fully_shard`, verified with torch 2.13 / gloo): each
managed parameter becomes a DTensor sharded on one mesh dimension, and each process
holds a shard. The composite signal's per-block squared gradient norms and dot products
are summed over the local shards and then all-reduced over the mesh (`shard_group`), so
every process sees the norms and cosines of the full gradients. Mirror snapshots,
restores and drifts act on the local shards (never packed: FSDP owns that storage), and
the drift's per-tensor squared sums are all-reduced before their roots. A paused block
is not in the graph, so FSDP2 reduce-scatters no gradient into it: `.grad` stays None.
`ctrl.state_dict()` holds this process's shards and records where they lie (`sharding_of`):
`load_state_dict` refuses another process's or sharding's. `save_sharded_checkpoint` / `load_sharded_checkpoint`
put those shards into the torch.distributed.checkpoint files as DTensors, so a run resumes over another number of
processes.
Refused with a clear error: FSDP1 (`FullyShardedDataParallel`), DTensors that are not
sharded on a 1-D mesh (HSDP, tensor parallel), a mix of sharded and plain managed
parameters, and LoRA layers injected after `fully_shard` (`check_blocks_sharded`). Between steps, an evaluation's
forward leaves unsharded parameters registered; the controller's `state_dict`, `load_state_dict` and
`attach_optimizer` register the sharded ones again first (`to_sharded`). DeepSpeed ZeRO: not supported or tested.
"""

from __future__ import annotations

import sys
import zlib
from typing import Iterable

import torch
import torch.distributed as dist

from .layer import NestedLoRALayer


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def is_first_process(group=None) -> bool:
    """This process is process 0 of the world, or the first of the process group `group()` returns (`group`: a
    callable, called only off process 0, or None: the world). True outside an initialised process group."""
    if is_main_process():
        return True
    g = group() if group is not None else None
    return g is not None and dist.get_rank(g) == 0


def print_on_main_process(line: str) -> None:
    """`print(line)` on process 0 only when torch.distributed is initialised (decided at each call, so a controller
    built before `init_process_group` prints once too); `print(line)` outside a process group. The controllers'
    default `print_fn`: under DDP, torchrun or accelerate each process printed every console line. A controller
    given it prints on the first process of its own process group (`UnifiedController._record`); pass
    `print_fn=print` to print on every process, `print_fn=None` for no console line."""
    if is_main_process():
        print(line)


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
    """Raise if a DDP-wrapped model cannot survive a rank switch, or a sharded one is sharded in a way unified-lora
    does not support (FSDP1; see `check_sharding`)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not isinstance(model, DDP):
        check_sharding((p for p in model.parameters() if p.requires_grad), "model")  # FSDP1 refused, FSDP2 checked
        check_blocks_sharded((n, m) for n, m in model.named_modules() if isinstance(m, NestedLoRALayer))
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


def _dtensor_type():
    """torch's DTensor class, or None while no tensor can be a DTensor: no process group is initialised (a DTensor's
    device mesh needs one; transformers imports DTensor into every process, so the type alone says nothing), or no
    module that defines it is loaded. Read from sys.modules so that a run without FSDP imports none of it. The
    process-group check first: one process's Mirror cycle (MiniLM, 72 tensors) calls `shard_group` three times,
    and its isinstance scan took 5 µs a call there, against a 0.10 ms cycle."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        dt = getattr(sys.modules.get(name), "DTensor", None)
        if dt is not None:
            return dt
    return None


def _fsdp2_types() -> tuple:
    """FSDP2's `FSDPModule` class (what `fully_shard` makes a module an instance of), if loaded; else ()."""
    return tuple(c for c in (getattr(sys.modules.get(n), "FSDPModule", None) for n in (
        "torch.distributed.fsdp", "torch.distributed._composable.fsdp")) if c is not None)


def check_blocks_sharded(layers: Iterable[tuple[str, torch.nn.Module]]) -> None:
    """Raise a ValueError if a nested layer's base layer is sharded by FSDP2 and its LoRA blocks are not: the layers
    were injected after `fully_shard` (`setup_unified_lora` after it), so FSDP2 does not manage the blocks, and each
    process would train its own copy of them on its own data. Takes (name, layer) pairs; no collective."""
    dt = _dtensor_type()
    if dt is None:
        return
    fsdp2 = _fsdp2_types()
    late = []
    for name, layer in layers:
        base = getattr(layer, "base_layer", None)
        blocks = layer.lora_parameters() if hasattr(layer, "lora_parameters") else []
        if base is None or not blocks or any(isinstance(p, dt) for p in blocks):
            continue
        if isinstance(getattr(base, "weight", None), dt) or (fsdp2 and isinstance(base, fsdp2)):
            late.append(str(name))
    if late:
        shown = ", ".join(late[:4]) + (f", ... ({len(late) - 4} more)" if len(late) > 4 else "")
        raise ValueError(f"adapters: the base layers of {shown} are sharded by FSDP2 (fully_shard), but their LoRA "
                         f"blocks are not: the nested layers were injected after fully_shard, so FSDP2 neither "
                         f"shards nor synchronises the blocks, and each process would train its own copy on its own "
                         f"data. Call setup_unified_lora(model, ...) before fully_shard (on each block, then on the "
                         f"root), then build the optimizer")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a tensor sharing its storage, outside autograd), or `t` itself."""
    dt = _dtensor_type()
    if dt is not None and isinstance(t, dt):
        return t.detach().to_local()
    return t


def shard_group(tensors: Iterable[torch.Tensor], what: str = "managed parameters"):
    """The process group that sums per-shard quantities of `tensors` into whole-tensor ones: None when none of them
    is a DTensor (plain tensors, DDP), else the group of the 1-D device mesh every one of them is sharded on (FSDP2's
    `fully_shard`: `Shard(dim)` placements). Anything else is refused with a ValueError: a mix of DTensors and plain
    tensors (their squared sums cannot be added up the same way), several meshes, a mesh of more than one dimension
    (HSDP, tensor parallel) or a replicated/partial placement."""
    dt = _dtensor_type()
    if dt is None:
        return None
    tensors = list(tensors)
    sharded = [t for t in tensors if isinstance(t, dt)]
    if not sharded:
        return None
    if len(sharded) != len(tensors):
        raise ValueError(f"{what}: {len(sharded)} of {len(tensors)} are DTensors (sharded by FSDP2's fully_shard) and "
                         f"the rest plain tensors. Apply fully_shard to the root model too (after the blocks), so that "
                         f"every LoRA block and modules_to_save parameter is sharded")
    mesh = sharded[0].device_mesh
    try:
        from torch.distributed.tensor import Shard
    except ImportError:  # torch 2.4
        from torch.distributed._tensor import Shard

    for t in sharded:
        if t.device_mesh != mesh or mesh.ndim != 1 or not all(isinstance(p, Shard) for p in t.placements):
            raise ValueError(f"{what}: a DTensor with placements {tuple(t.placements)} on {t.device_mesh}; unified-lora "
                             f"supports FSDP2's fully_shard over one 1-D device mesh (Shard placements) only, not "
                             f"HSDP, tensor parallelism or several meshes")
    return mesh.get_group()


def check_sharding(params: Iterable[torch.Tensor], what: str = "managed parameters") -> None:
    """Raise a ValueError if `params` are sharded in a way unified-lora does not support: by FSDP1
    (`FullyShardedDataParallel`, whose flat parameters leave each process a 1-D piece of a block, or none), or by
    DTensors that `shard_group` refuses. Plain tensors (one process, DDP) and FSDP2's `fully_shard` pass."""
    params = list(params)
    if any(getattr(p, "_fsdp_flattened", False) for p in params):
        raise ValueError(f"{what}: flattened by FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel), which keeps "
                         f"a 1-D slice of its flat parameter on each process (a LoRA block can be empty on one), so "
                         f"the rank blocks, their gradients and the Mirror snapshot are not there to read. Use FSDP2 "
                         f"instead (torch.distributed.fsdp.fully_shard on each decoder block, then on the root model, "
                         f"after setup_unified_lora), or DDP(model, **ddp_kwargs())")
    shard_group(params, what)


def to_sharded(modules: Iterable[torch.nn.Module]) -> None:
    """Register FSDP2's sharded parameters on `modules` again where a forward without backward left the unsharded
    ones (plain tensors, the full weights in the MixedPrecisionPolicy's param_dtype): an evaluation under
    `torch.no_grad()` leaves the root's parameters unsharded until the next backward, and every module's with
    `reshard_after_forward=False`. It runs each module's state-dict pre-hooks by `state_dict()`, as
    `model.state_dict()` does: FSDP2 reshards there (its whole parameter group; no collective). Call it only between
    steps (the controller does in `state_dict`, `load_state_dict` and `attach_optimizer`), never inside a forward."""
    if _dtensor_type() is None:
        return
    for m in modules:
        m.state_dict()


def sharding_of(tensors: Iterable[torch.Tensor]) -> dict | None:
    """Where this process's shards of `tensors` lie (None: they are not DTensors): the mesh's size and this process's
    rank in it, and per tensor its placements, global shape and local shard's shape. Two processes hold the same
    shards of the same tensors exactly when these agree, so a state of shards saved by one can be loaded by the other.
    No collective."""
    tensors = list(tensors)
    group = shard_group(tensors)
    if group is None:
        return None
    return {"world_size": dist.get_world_size(group), "rank": dist.get_rank(group),
            "placements": [[repr(p) for p in t.placements] for t in tensors],
            "shapes": [list(t.shape) for t in tensors],
            "local_shapes": [list(local_tensor(t).shape) for t in tensors]}


def like_sharded(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`local`, a shard shaped like this process's shard of the DTensor `param`, as a DTensor sharded as `param` is
    (sharing `local`'s storage; no collective). Anything else is returned as it is."""
    dt = _dtensor_type()
    if dt is None or not isinstance(param, dt) or isinstance(local, dt) or not torch.is_tensor(local) \
            or local.dim() == 0 or local.shape != param.to_local().shape:
        return local
    return dt.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                         stride=param.stride())


_CTRL_FILE = "ctrl.pt"  # the controller's state in a sharded checkpoint, once (its shards are in the dcp files)


def _ctrl_param(ctrl, state: dict, path) -> torch.Tensor:
    """The managed parameter whose shard the controller state's tensor at `path` holds: a Mirror snapshot entry or
    optimizer moment ("mirror", "weights"|"opt_state", i, ...) belongs to managed parameter i; a stored gradient
    ("grad_stats", "prev", a, j) to adapter a's A block j, or B block j - k (the list is A blocks 0..k-1, then B)."""
    from .layer import blocks_of

    if path[0] == "mirror":
        return ctrl.managed_parameters()[path[2]]
    a, j = path[2], path[3]
    k = len(state["grad_stats"]["prev"][a]) // 2
    layer = ctrl.adapters[a]
    return blocks_of(layer.lora_A)[j] if j < k else blocks_of(layer.lora_B)[j - k]


def _split_ctrl_state(ctrl, sd: dict) -> tuple[dict, dict, list]:
    """`ctrl.state_dict()` of this process as (the state with every shard-shaped tensor set to None, {dcp key: that
    tensor as a DTensor sharded as its parameter}, [the paths set to None]). Shard-shaped: the Mirror snapshot, the
    optimizer moments shaped like their parameter's shard and the stored gradients; the rest (step counts, the
    signal, the machine, the snapshot's optimizer step counts) is the same on every process."""
    rep = {k: v for k, v in sd.items() if k not in ("mirror", "grad_stats")}
    mirror = dict(sd["mirror"])
    rep["mirror"], rep["grad_stats"] = mirror, {"prev": [[None] * len(gs) for gs in sd["grad_stats"]["prev"]]}
    paths = []
    if mirror["weights"] is not None:
        paths += [("mirror", "weights", i) for i in range(len(mirror["weights"]))]
        mirror["weights"] = [None] * len(mirror["weights"])
    if mirror["opt_state"] is not None:
        managed = ctrl.managed_parameters()
        mirror["opt_state"] = [None if st is None else dict(st) for st in mirror["opt_state"]]
        for i, st in enumerate(mirror["opt_state"]):
            shard = tuple(local_tensor(managed[i]).shape) if i < len(managed) else None
            for k, v in (st or {}).items():
                if torch.is_tensor(v) and v.dim() > 0 and tuple(v.shape) == shard:
                    paths.append(("mirror", "opt_state", i, k))
                    st[k] = None
    paths += [("grad_stats", "prev", a, j) for a, gs in enumerate(sd["grad_stats"]["prev"]) for j in range(len(gs))]
    shards = {}
    for path in paths:
        t = sd[path[0]][path[1]][path[2]]
        for key in path[3:]:
            t = t[key]
        shards[".".join(map(str, path))] = like_sharded(t, _ctrl_param(ctrl, rep, path))
    return rep, shards, paths


def _first_difference(a, b, where: str = "") -> str | None:
    """Where two states differ (a path such as "signal['history'][3]"), or None: tensors by value, dtype and shape,
    floats with NaN equal to NaN."""
    if isinstance(a, dict) and isinstance(b, dict):
        if list(a) != list(b):
            return f"{where} (keys {sorted(map(str, a))} against {sorted(map(str, b))})"
        return next((d for k in a if (d := _first_difference(a[k], b[k], f"{where}[{k!r}]")) is not None), None)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where} (lengths {len(a)} and {len(b)})"
        return next((d for i, (x, y) in enumerate(zip(a, b))
                     if (d := _first_difference(x, y, f"{where}[{i}]")) is not None), None)
    if torch.is_tensor(a) and torch.is_tensor(b):
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
        return None if same else f"{where} ({a.tolist() if a.numel() < 5 else tuple(a.shape)} and " \
                                 f"{b.tolist() if b.numel() < 5 else tuple(b.shape)})"
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return None
    return None if type(a) is type(b) and a == b else f"{where} ({a!r} and {b!r})"


def _shard_group_of(ctrl):
    """The process group the checkpoint's collectives run on: the controller's device mesh (FSDP2), else None
    (torch.distributed.checkpoint's default, the whole world)."""
    return shard_group(ctrl.managed_parameters()) if ctrl is not None else None


def save_sharded_checkpoint(checkpoint_dir, model: torch.nn.Module, optimizer, ctrl=None) -> None:
    """Save an FSDP2 (`fully_shard`) run, on every process: the model and the optimizer through
    `torch.distributed.checkpoint` (dcp; each process writes its shards), and the controller: its tensors that are
    shaped like a parameter's shard (a held Mirror snapshot, its optimizer moments, the composite signal's stored
    gradients) go into the same dcp checkpoint as DTensors sharded as their parameters, and the rest of its state,
    which is the same on every process (step count, mode, signal, ...), into `ctrl.pt`, written once. So
    `load_sharded_checkpoint` can resume it over another number of processes: dcp reshards the controller's tensors
    as it does the parameters. A controller whose per-process state differs between the processes (a
    `reduce_loss=None` controller feeds each process its own loss) is refused with a ValueError before anything is
    written. A collective: every process must call it."""
    import os

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    group = _shard_group_of(ctrl)
    if ctrl is not None:
        rep, shards, paths = _split_ctrl_state(ctrl, ctrl.state_dict())
        every = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, {k: v for k, v in rep.items() if k != "sharding"}, group=group)
        for r, other in enumerate(every[1:], 1):
            diff = _first_difference(every[0], other, "state")
            if diff is not None:
                raise ValueError(f"save_sharded_checkpoint: the controller's state differs between process 0 and "
                                 f"process {r} at {diff}, so no one state resumes both; nothing was written. The "
                                 f"controller's decisions must agree on every process: keep reduce_loss at its "
                                 f"default (distributed_mean) and call ctrl.step with each process's loss on every "
                                 f"step (assert_lockstep(ctrl) checks it)")
        state["ctrl"] = shards
        if dist.get_rank(group) == 0:  # before the save's collectives, so that every process returns after it
            from ._files import written_atomically

            os.makedirs(str(checkpoint_dir), exist_ok=True)
            with written_atomically(os.path.join(str(checkpoint_dir), _CTRL_FILE)) as tmp:
                torch.save({"state": rep, "shards": [list(p) for p in paths],
                            "world_size": dist.get_world_size(group)}, tmp)
    dcp.save(state, checkpoint_id=str(checkpoint_dir), process_group=group)


def _read_ctrl_file(path: str):
    """A sharded checkpoint's controller file (`ctrl.pt`, or an older `ctrl_rank{rank}.pt`), read with
    `torch.load(weights_only=True)`, each tensor where it was saved (as before), through `load_state_file`: a file cut
    short or of junk is a ValueError naming it (it was torch's own error, naming no file)."""
    from ._files import load_state_file

    return load_state_file(path, map_location=None, opt_in="torch.load(weights_only=False) yourself "
                           "(load_sharded_checkpoint loads tensors and plain Python values only)")


def _ctrl_from_checkpoint(checkpoint_dir, ctrl, saved: dict):
    """The controller part of a sharded checkpoint, checked against `ctrl` (a ValueError, before anything is
    loaded): (the state to complete, [(path, DTensor target to load the path's tensor into)]), or None where the
    checkpoint has the older per-process files only (`ctrl_rank{rank}.pt`: same number of processes only)."""
    import os

    path = os.path.join(str(checkpoint_dir), _CTRL_FILE)
    if not os.path.isfile(path):
        return None
    got = _read_ctrl_file(path)
    state = got["state"]
    here = sharding_of(ctrl.managed_parameters())
    bare = dict(state, sharding=here, grad_stats={"prev": []},
                mirror=dict(state["mirror"], weights=None, opt_state=None))
    ctrl._check_state(bare)  # the layout (adapters, rank levels, shapes), the signal's keys, the mode
    targets = []
    for p in got["shards"]:
        p = tuple(p)
        key = "ctrl." + ".".join(map(str, p))
        param = _ctrl_param(ctrl, state, p)
        meta = saved.get(key)
        size = list(getattr(meta, "size", []) or [])
        if meta is None or size != list(param.shape):
            raise ValueError(f"load_sharded_checkpoint: {checkpoint_dir} has "
                             f"{'no ' + key if meta is None else f'{key} of shape {tuple(size)}'}, which the "
                             f"controller's state there needs shaped like its parameter {tuple(param.shape)}; the "
                             f"checkpoint is incomplete or not from this run's model; nothing was loaded")
        local = local_tensor(param)
        targets.append((p, like_sharded(torch.empty(local.shape, dtype=meta.properties.dtype, device=local.device),
                                        param)))
    return state, targets


def load_sharded_checkpoint(checkpoint_dir, model: torch.nn.Module, optimizer, ctrl=None) -> None:
    """Load what `save_sharded_checkpoint` wrote into a run set up as the saved one was (`setup_unified_lora`,
    `fully_shard`, the optimizer, `ctrl.attach_optimizer`), on every process. The number of processes may differ
    from the saved run's: torch.distributed.checkpoint reshards the model, the optimizer and the controller's
    tensors (its Mirror snapshot, the snapshot's optimizer moments, its stored gradients) to this run's shards.
    A checkpoint with the per-process controller files of earlier versions (`ctrl_rank{rank}.pt`) loads over as
    many processes as saved it. The controller's state is checked before anything is loaded.

    A rank block paused since the start of the run (rank 16's until the first MIRROR) has no optimizer state, and
    the checkpoint none for it. torch's `get_state_dict` of a fresh optimizer makes one up for every parameter (a
    zero-gradient step at LR 0), so the plain recipe (`get_state_dict`, `dcp.load`, `set_state_dict`) failed:
    `dcp.load` found no such key in the checkpoint ("Missing key in checkpoint state_dict: optim.state.
    q_proj.lora_A.2.step"). Here the made-up states of the parameters the checkpoint has no state for are dropped
    before the load, so the optimizer holds exactly the saved states: a paused block gets its first moments and step
    count at its first real step, as in the uninterrupted run."""
    import os

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    saved = dcp.FileSystemReader(str(checkpoint_dir)).read_metadata().state_dict_metadata
    group = _shard_group_of(ctrl)
    legacy = ctrl_part = None
    if ctrl is not None:
        ctrl._reshard()  # (an evaluation's unsharded parameters: read the sharded ones, as load_state_dict does)
        ctrl_part = _ctrl_from_checkpoint(checkpoint_dir, ctrl, saved)
        if ctrl_part is None:
            legacy = _read_ctrl_file(os.path.join(str(checkpoint_dir), f"ctrl_rank{dist.get_rank(group)}.pt"))
            try:  # another number of processes: refused before the model is loaded
                ctrl._check_state(legacy)
            except ValueError as e:
                raise ValueError(f"load_sharded_checkpoint: {checkpoint_dir} holds the controller's state per process "
                                 f"(ctrl_rank{{rank}}.pt, as earlier versions wrote it), which loads over the number of "
                                 f"processes that saved it only: resume it there and save_sharded_checkpoint again, "
                                 f"then resume that over another number. {e}") from None
    stated = {k[len("optim.state."):].rsplit(".", 1)[0] for k in saved if k.startswith("optim.state.")}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    optim_sd["state"] = {k: v for k, v in optim_sd["state"].items() if k in stated}
    state = {"model": model_sd, "optim": optim_sd}
    if ctrl_part is not None:
        state["ctrl"] = {".".join(map(str, p)): t for p, t in ctrl_part[1]}
    dcp.load(state, checkpoint_id=str(checkpoint_dir), process_group=group)
    # strict=False: the parameters without a saved state are meant to have none (the model's keys are all there)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(strict=False))
    if legacy is not None:
        ctrl.load_state_dict(legacy)
    elif ctrl_part is not None:
        sd, targets = ctrl_part
        sd = dict(sd, sharding=sharding_of(ctrl.managed_parameters()), grad_stats={
            "prev": [list(gs) for gs in sd["grad_stats"]["prev"]]})
        sd["mirror"] = dict(sd["mirror"])
        for key in ("weights", "opt_state"):
            if sd["mirror"][key] is not None:
                sd["mirror"][key] = [dict(x) if isinstance(x, dict) else x for x in sd["mirror"][key]]
        for p, t in targets:
            holder = sd[p[0]][p[1]]
            for key in p[2:-1]:
                holder = holder[key]
            holder[p[-1]] = local_tensor(t)
        ctrl.load_state_dict(sd)


def refuse_sharded(model: torch.nn.Module, what: str) -> None:
    """Raise a ValueError if `model` has DTensor (FSDP2) or FSDP1-flattened parameters: `what` would write this
    process's shard of each, which no single-process model can load. A module that `fully_shard` wrapped counts
    too: after a forward without backward its parameters are the unsharded ones, plain tensors (in the
    MixedPrecisionPolicy's param_dtype), until the next backward or `state_dict()`."""
    dt = _dtensor_type()
    fsdp2 = _fsdp2_types()
    if any((dt is not None and isinstance(p, dt)) or getattr(p, "_fsdp_flattened", False) for p in model.parameters()) \
            or (fsdp2 and any(isinstance(m, fsdp2) for m in model.modules())):
        raise ValueError(f"{what}: the model is sharded by FSDP (its parameters are DTensors or flat shards), so this "
                         f"would write one process's shard of each tensor. Gather the full weights first: "
                         f"unified_lora.lora_state_dict(model) on every process (it all-gathers the LoRA blocks), or "
                         f"torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options="
                         f"StateDictOptions(full_state_dict=True, cpu_offload=True)) on every process, then on process "
                         f"0 load that into the same model built without fully_shard and call {what} on it")


def _device():
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_LIKELY = ("Likely causes: a state loaded on some processes only (ctrl.load_state_dict, model.load_state_dict or a "
           "checkpoint load run on process 0 alone: every process must load the same state, ctrl's included); a "
           "ctrl.step skipped on some processes (an exception caught on one process, a `continue` on a bad batch "
           "there); or controllers built with different settings. Nothing moved at this step. Restart every process "
           "from one checkpoint, loaded on every process, and call ctrl.step on every process at every step")


def _fingerprint_bits(world: int) -> tuple[int, int]:
    """(b, K) for `world` processes: fingerprints s in [0, 2**b] packed as s·2**K + s², so that the sum over the
    processes holds Σs above bit K and Σs² below it, exactly in float64: Σs² < world·2**(2b) <= 2**K, and the whole
    sum < 2**(2w+3b+2) <= 2**53 (w: world's bit length). b is 15 for 2 processes, 9 for 1024, 3 for a million."""
    w = world.bit_length()
    b = max(1, (51 - 2 * w) // 3)
    return b, w + 2 * b + 1


def _fingerprint(fields: dict[str, int], refused: bool, world: int) -> int:
    """One process's lockstep fingerprint: a hash of `fields` in [0, 2**b), or 2**b (outside every hash) for a
    process that refused the step (b from `_fingerprint_bits`)."""
    b = _fingerprint_bits(world)[0]
    if refused:
        return 1 << b
    return zlib.crc32(repr(tuple(int(v) for v in fields.values())).encode()) & ((1 << b) - 1)


def _packed(s: int, world: int) -> float:
    """s·2**K + s²: what one process adds to the lockstep all-reduce (exact in float64)."""
    return float((s << _fingerprint_bits(world)[1]) + s * s)


def _in_lockstep(total: float, world: int) -> bool:
    """Whether the fingerprints s summed over `world` processes (`total`, the sum of their `_packed`) are all equal:
    a variance of 0, world · Σs² == (Σs)², on exact integers. Every process tests the same sum, so every process
    decides the same."""
    k = _fingerprint_bits(world)[1]
    total = int(total)
    return world * (total & ((1 << k) - 1)) == (total >> k) ** 2


def lockstep_mean(value: float, fields: dict[str, int], refusal: BaseException | None = None, group=None) -> float:
    """`distributed_mean` that also checks the processes are in lockstep, in the same single all-reduce of two
    float64 numbers [value, s·2**K + s²] summed over `group` (None: the whole world), where s is a hash of `fields`
    (the step count, the mode, ...: integers every process's controller must agree on), or a value outside every
    hash where this process brings a `refusal` (the error its own checks raised before the collective). (Two
    numbers, not [value, s, s²]: on gloo with 2 CPU processes three added about 70-100 µs to a ctrl.step, two add
    about 35 µs.) If the fingerprints differ, every process raises the same RuntimeError at this step, after one
    more collective (an all-gather, on this error path only) that says which processes differ and how. Different
    fields share a hash by chance (1 in 2**b: 32768 for 2 processes, 512 for 1024): the desync then passes that
    step, and a later step's hash, which holds the step count, names it. If every process refused, each raises its
    own `refusal`. Else the mean of `value` over the processes."""
    world = dist.get_world_size(group)
    t = torch.tensor([value, _packed(_fingerprint(fields, refusal is not None, world), world)], dtype=torch.float64,
                     device=_device())
    dist.all_reduce(t, group=group)
    sums = t.tolist()
    if _in_lockstep(sums[1], world):
        if refusal is not None:
            raise refusal
        return sums[0] / world
    every = [None] * world
    mine = (dict(fields), None if refusal is None else f"{type(refusal).__name__}: {refusal}")
    dist.all_gather_object(every, mine, group=group)
    parts = []
    for name in fields:
        values = [f[name] for f, _ in every]
        if len(set(values)) > 1:
            lo, hi = min(values), max(values)
            parts.append(f"process {name} differ: min {lo} (process {values.index(lo)}), max {hi} "
                         f"(process {values.index(hi)})")
    parts += [f"process {r} refused the step: {why}" for r, (_, why) in enumerate(every) if why is not None]
    where = "" if group is None else " of the controller's device mesh (FSDP2's group; process numbers in it)"
    error = RuntimeError(f"ctrl.step: the controllers on the {world} processes{where} are out of lockstep, so they "
                         f"would decide apart: " + "; ".join(parts) + ". " + _LIKELY)
    raise error from refusal


def lockstep_state(ctrl) -> list[float]:
    """The numbers every process must agree on: step, mode, rank, φ, Mirror held."""
    return [float(ctrl.global_step), float(ctrl.mode), float(ctrl.rank), float(ctrl.phi), float(ctrl.mirror.held)]


def assert_lockstep(ctrl) -> None:
    """All-gather `lockstep_state(ctrl)` over the controller's processes (its FSDP2 device mesh's group when its
    parameters are sharded, else the whole world) and raise if any process differs from the first.
    A no-op outside an initialised process group."""
    if not is_distributed():
        return
    group = _shard_group_of(ctrl)
    mine = torch.tensor(lockstep_state(ctrl), dtype=torch.float64, device=_device())
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    for r, other in enumerate(every):
        if not torch.equal(other, every[0]):
            raise RuntimeError(f"controller out of lockstep: rank 0 has (step, mode, rank, phi, mirror) = "
                               f"{every[0].tolist()}, rank {r} has {other.tolist()}")


__all__ = ["is_distributed", "is_main_process", "is_first_process", "print_on_main_process", "ddp_kwargs", "check_ddp",
           "check_trainer_ddp_args", "clear_paused_grads", "unwrap_optimizer", "unwrap_model", "lockstep_state",
           "assert_lockstep", "lockstep_mean", "local_tensor", "shard_group", "check_sharding", "check_blocks_sharded", "to_sharded", "sharding_of", "like_sharded",
           "refuse_sharded", "save_sharded_checkpoint", "load_sharded_checkpoint"]
