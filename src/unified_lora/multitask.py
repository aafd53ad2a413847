"""Multi-task mode (v1 README, SPEC §5): a shared nested adapter plus one adapter per task.

Topology follows the machine:

* SINGLE: every task trains the *shared* adapter (the plain `NestedLoRALayer` path).
* entering MULTI ("split"): every task adapter becomes an exact copy of the shared one,
  every nested block included, so the model's outputs for every task are bit-identical
  at the moment of the switch. From then on each sample is routed to its task's adapter.
  Within `resplit_window` steps of a merge, the task adapters come back instead (the merge did
  not hold; `MultiTaskController`).
* MIRROR: as MULTI; the Mirror snapshot covers the shared adapter *and* every task adapter (the spare
  slots made copies of the shared one first); the exit drift runs over the registered tasks' adapters.
* returning to SINGLE ("merge"): the task adapters are merged back into the shared one
  (rule below) and the shared adapter trains again.

Parameters for every task are allocated at construction (`spare_slots` extra for tasks
registered later), so an optimizer built once from `trainable_parameters(model)` holds
all of them. Parameters a mode does not use never enter the graph, so their `.grad`
stays None and torch optimizers skip them (the nested-block trick of `layer.py`).

Routing: the active task ids are set by `task_context(model, task_ids)` (or by
`MultiTaskModel`, which pops `task_ids` from the batch dict). A batch may mix tasks:
each layer computes the LoRA path per task subset of the rows and scatters it back
(`index_add`); a batch of one task takes a gather-free path. An unknown task id is a
`ValueError` naming the id and the known ids, unless `register_new_tasks=True`.

Merge rule (`merge_rule`):

* "mean_factors" (default): for every nested block, shared A_b = mean_t A_{t,b} and
  shared B_b = mean_t B_{t,b}. This is *not* the mean of the deltas:
  mean_t(B_t A_t) = B̄ Ā + (1/T) Σ_t (B_t − B̄)(A_t − Ā); the covariance term is lost.
  It is chosen as default because (1) every task adapter starts as a copy of the shared
  one, so the factors stay in one common basis and the lost term is second order in the
  task divergence; (2) it keeps the nested block structure (every prefix rank is the
  mean of the same prefixes) and leaves blocks that no task changed bit-identical;
  (3) the shared adapter's optimizer moments stay meaningful (same coordinates).
  The lost part is measured: `merge_residual` = ‖mean_t ΔW_t − ΔW_merged‖ / ‖mean_t ΔW_t‖
  at the rank SINGLE uses, is recorded in the trace.
* "svd" (the exact-delta choice): the first r dims (r = SINGLE's rank) of the shared
  adapter are refitted to M = mean_t B_t[:, :r] A_t[:r] by truncated SVD, balanced
  factors B = U√S, A = √S Vᵀ (computed through QR of the stacked factors, never forming
  M). This is the best rank-r approximation of the mean delta (Eckart-Young), exact when
  rank(M) ≤ r; blocks above r (paused in SINGLE) take the factor mean. A dim M lacks (rank(M) < r,
  e.g. tasks whose B is still zero) gets a zero B column and keeps the factor-mean A row, so it can
  still learn (A and B both zero would stay zero for good). The basis
  changes, so the shared adapter's optimizer state is reset.

The signal (`MultiTaskSignal`, numbers in, numbers out) is the v1 README
φ = f(C, E, S, ΔC, ΔE, ΔS), see its docstring.

DDP: each process sees its own batches, so its own tasks. The controller combines them
into the same numbers on every process: a task's loss is the mean over the processes
that saw it, and in SINGLE a task's gradient (read by hooks before DDP's all-reduce) is
summed over the processes and divided by the world size, as DDP averages the gradient
(task adapters in MULTI read `.grad`, which DDP has averaged already). That is one
all-reduce of the task losses a step and, in SINGLE, one of the task gradients (the
adapters' size), the same on every process. `register_new_tasks` cannot
register a task in the forward under DDP (processes would give different tasks the same
slot): register every task on every process, in the same order, first.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._files import (fsync_dir, fsync_tree, left_by_dead_process, make_folder, missing_folders, remove_dead_leftovers,
                     remove_made_folders, temp_prefix, written_atomically)
from .config import MODES, MULTI, RESPLIT_WINDOW, SINGLE, ActuatorConfig, MachineConfig, MirrorConfig, NestedLoRAConfig
from .config import SignalConfig, _scalar, check_field_types
from .controller import UnifiedController, _is_int, _names, _setup_ranks, _unwrap_optimizer, extra_parameters
from .distributed import _device as _collective_device
from .distributed import is_distributed, shard_group, unwrap_model
from .layer import NestedLoRALayer, blocks_of
from .machine import Transition
from .mirror import MirrorDecision
from .model import (_replace, inject_nested_lora, keep_off_fast_paths, mark_modules_to_save, undone_on_error,
                    warn_frozen_head)
from .signals import Ema, _check_finite, _check_not_negative

MERGE_RULES = ("mean_factors", "svd")
CONFLICTS = ("auto", "grad", "weight")
GRAD_NOISE = ("debias", "none")  # MultiTaskSignalConfig.grad_noise


# ---------------------------------------------------------------------------------------- tasks / routing


def _check_task_id(tid: Any) -> int | str:
    if isinstance(tid, bool) or not isinstance(tid, (int, str)):
        if hasattr(tid, "item") and not isinstance(tid, str):  # numpy / torch scalar
            tid = tid.item()
        if isinstance(tid, bool) or not isinstance(tid, (int, str)):
            raise ValueError(f"task id: must be an int or a str, got {tid!r} ({type(tid).__name__})")
    # a plain int or str: numpy's str_ (the ids of np.array(["rte", "mrpc"])) is a str, and was kept as it was, so
    # ctrl.state_dict() held numpy scalars, which torch.load(weights_only=True) (torch's default) refuses to load
    return tid if type(tid) in (int, str) else (str(tid) if isinstance(tid, str) else int(tid))


class TaskRouter:
    """Task registry (id → slot) and the task ids of the batch being run, shared by every
    multi-task layer of one model. `topology` is "shared" (SINGLE) or "task" (MULTI/MIRROR)."""

    # how many times `load_task_adapters` has written into this model's adapters (a class default: a router pickled
    # before it has none); a `MultiTaskController` drops its kept merge after one (`_drop_kept_after_a_load`)
    task_loads = 0
    # the slots of every task id set (`set_task_ids`: a `task_context`) since the controller's last step, which its
    # step reads and empties (`MultiTaskController._check_routed_tasks`); a class default for a router pickled before
    routed_since_step: frozenset = frozenset()

    def __init__(self, tasks: Sequence[int | str], spare_slots: int = 0, register_new_tasks: bool = False):
        if isinstance(tasks, (str, bytes)):  # tasks="mrpc" was the four tasks 'm', 'r', 'p', 'c'
            raise ValueError(f"tasks: a list of task ids, got the string {tasks!r}; for one task pass [{tasks!r}]")
        tasks = [_check_task_id(t) for t in tasks]
        if not tasks:
            raise ValueError("tasks: need at least one task id, e.g. tasks=['rte', 'mrpc']")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks: ids must be unique, got {tasks}")
        spare_slots = _scalar("spare_slots", spare_slots, int)  # (1.5 was taken as 1, "1" a TypeError)
        if spare_slots < 0:
            raise ValueError(f"spare_slots: must be >= 0, got {spare_slots}")
        self.slots: dict[int | str, int] = {t: i for i, t in enumerate(tasks)}
        self.n_slots = len(tasks) + spare_slots
        # fixed for the router's life (see `record_bytes`): the task ids given at setup, and the bytes a spare slot's
        # entry in the saved registry may take (the old padding's share of a slot, or the longest setup entry)
        self._setup_entries = [_slot_entry(t, i) for i, t in enumerate(tasks)]
        self._spare_entry_bytes = max([_SLOT_BYTES] + [len(e) for e in self._setup_entries])
        # (bool("no") is True: a typo in a task id then took a spare slot, silently)
        self.register_new_tasks = _scalar("register_new_tasks", register_new_tasks, bool)
        self.topology = "shared"
        self.track_grads = False
        self.layers: list[MultiTaskNestedLoRALayer] = []
        self._ids: list | int | str | None = None
        self._slot_list: list[int] | None = None
        self._per_sample = False
        self._groups_cache: dict = {}
        self._routed = False  # task ids have been set at least once (see MultiTaskNestedLoRALayer.forward)

    @property
    def task_ids(self) -> list[int | str]:
        return list(self.slots)

    def register_task(self, tid) -> int:
        """Give `tid` a free pre-allocated slot (initialised from the shared adapter)."""
        tid = _check_task_id(tid)
        if tid in self.slots:
            return self.slots[tid]
        if len(self.slots) >= self.n_slots:
            raise ValueError(f"task id {tid!r}: no free task slot (known task ids: {self.task_ids}); pre-allocate "
                             f"slots with spare_slots= so the optimizer holds their parameters from the start")
        slot = len(self.slots)
        self.slots[tid] = slot
        for layer in self.layers:
            layer.copy_shared_to_tasks([slot])
        return slot

    def known_slot(self, tid) -> int:
        """The slot of a registered task; an unknown id is a ValueError even with register_new_tasks=True (for
        reads such as exports, where a typo must not take a spare slot)."""
        tid = _check_task_id(tid)
        if tid not in self.slots:
            raise ValueError(f"task id {tid!r} is not registered; known task ids: {self.task_ids}")
        return self.slots[tid]

    def slot(self, tid) -> int:
        tid = _check_task_id(tid)
        s = self.slots.get(tid)
        if s is None:
            if not self.register_new_tasks:
                raise ValueError(f"task id {tid!r} is not registered; known task ids: {self.task_ids} "
                                 f"(register it with register_task(), or build with register_new_tasks=True)")
            if is_distributed():
                raise ValueError(f"task id {tid!r} is not registered, and register_new_tasks cannot register it "
                                 f"under DDP: each process sees its own batches, so processes would give different "
                                 f"tasks the same slot and DDP would average their adapters. Call "
                                 f"router.register_task({tid!r}) on every process, in the same order, before the "
                                 f"forward (known task ids: {self.task_ids})")
            s = self.register_task(tid)
        return s

    def set_task_ids(self, task_ids) -> None:
        """`task_ids`: one id for the whole batch, or one id per sample (list/tuple/tensor)."""
        self._groups_cache = {}
        if task_ids is None:
            self._ids, self._slot_list = None, None
            return
        if hasattr(task_ids, "tolist") and not isinstance(task_ids, (int, str)):  # tensor / numpy array or scalar
            task_ids = task_ids.tolist()
        if not isinstance(task_ids, (list, tuple)):  # one id for the whole batch
            s = self.slot(task_ids)
            self._ids, self._slot_list = _check_task_id(task_ids), [s]
            self._per_sample = False
            self._routed = True
            self.routed_since_step = self.routed_since_step | {s}
            return
        ids = list(task_ids)
        if not ids:
            raise ValueError("task_ids: empty; give one id per sample or one id for the batch")
        self._ids = ids
        self._slot_list = [self.slot(t) for t in ids]
        self._per_sample = True
        self._routed = True
        self.routed_since_step = self.routed_since_step.union(self._slot_list)

    def get_state(self):
        return self._ids, self._slot_list, self._per_sample, self._groups_cache

    def set_state(self, st) -> None:
        self._ids, self._slot_list, self._per_sample, self._groups_cache = st

    def groups(self, batch: int, device) -> list[tuple[int, torch.Tensor | None]] | None:
        """[(slot, row index or None for all rows)] for a batch of `batch` rows; None if no ids set."""
        if self._slot_list is None:
            return None
        key = (batch, str(device))
        g = self._groups_cache.get(key)
        if g is not None:
            return g
        if not self._per_sample:
            g = [(self._slot_list[0], None)]
        else:
            if len(self._slot_list) != batch:
                n = len(self._slot_list)
                hint = (f". A batch of {batch // n}x the rows is what `generate` runs with num_beams or "
                        f"num_return_sequences = {batch // n}: it repeats each row that many times in place "
                        f"(repeat_interleave), so repeat each id the same way, e.g. "
                        f"task_context(model, [t for t in ids for _ in range({batch // n})])"
                        if batch % n == 0 else "")
                raise ValueError(f"task_ids: got {n} ids for a batch of {batch} rows; "
                                 f"give one id per sample (or a single id for the whole batch){hint}")
            uniq = sorted(set(self._slot_list))
            if len(uniq) == 1:
                g = [(uniq[0], None)]
            else:
                s = torch.tensor(self._slot_list, device=device)
                g = [(u, (s == u).nonzero().flatten()) for u in uniq]
        self._groups_cache[key] = g
        return g

    def present_slots(self) -> list[int]:
        return sorted(set(self._slot_list)) if self._slot_list else []

    def state_dict(self) -> dict:
        return {"slots": [[t, s] for t, s in self.slots.items()], "n_slots": self.n_slots, "topology": self.topology}

    def record_bytes(self, max_rank: int) -> int:
        """An upper bound on the length of `json.dumps({"rank": r, "router": self.state_dict()})` for every state
        this router can be in (r <= max_rank): the setup ids' entries, a spare slot's share for each other slot and
        the longest topology. Fixed for the router's life. A task registered later into a spare slot with an id
        longer than its share makes the record outgrow it: `torch.distributed.checkpoint` then refuses a load between
        that state and an earlier one with a size mismatch (not silently), and every other save loads as before."""
        head = json.dumps({"rank": max_rank, "router": {"slots": [], "n_slots": self.n_slots, "topology": "shared"}})
        setup = self.__dict__.get("_setup_entries")  # (a router pickled before it was kept: its registry now)
        setup = [_slot_entry(t, s) for t, s in self.slots.items()] if setup is None else setup
        per_spare = self.__dict__.get("_spare_entry_bytes", _SLOT_BYTES)
        spare = self.n_slots - len(setup)
        return len(head) + sum(len(e) + 2 for e in setup) + spare * (per_spare + 2)

    def load_state_dict(self, sd: dict) -> None:
        if sd["n_slots"] != self.n_slots:
            raise ValueError(f"router: checkpoint has {sd['n_slots']} task slots, this model {self.n_slots}")
        self.slots = {t: s for t, s in sd["slots"]}
        self.set_topology(sd["topology"])

    def set_topology(self, topology: str) -> None:
        if topology not in ("shared", "task"):
            raise ValueError(f"topology: 'shared' or 'task', got {topology!r}")
        self.topology = topology


def find_router(obj) -> TaskRouter:
    if isinstance(obj, TaskRouter):
        return obj
    r = getattr(obj, "task_router", None) or getattr(obj, "_unified_lora_router", None)
    if isinstance(r, TaskRouter):
        return r
    if isinstance(obj, nn.Module):
        for m in obj.modules():
            if isinstance(m, MultiTaskNestedLoRALayer):
                return m.router
    raise ValueError("no multi-task adapters found; build them with inject_multitask_lora / setup_multitask_lora")


@contextlib.contextmanager
def task_context(model_or_router, task_ids):
    """`with task_context(model, task_ids): out = model(**batch)` routes each sample to its task."""
    router = find_router(model_or_router)
    prev = router.get_state()
    router.set_task_ids(task_ids)
    try:
        yield router
    finally:
        router.set_state(prev)


class MultiTaskModel(nn.Module):
    """Wrapper whose forward pops `task_ids` from the keyword arguments and routes by them."""

    def __init__(self, model: nn.Module, router: TaskRouter | None = None):
        super().__init__()
        self.model = model
        self._router = router or find_router(model)

    @property
    def task_router(self) -> TaskRouter:
        return self._router

    def forward(self, *args, task_ids=None, **kwargs):
        if task_ids is None:
            raise ValueError(f"MultiTaskModel: pass task_ids= (one id, or one per sample); known: {self._router.task_ids}")
        with task_context(self._router, task_ids):
            return self.model(*args, **kwargs)


def per_task_losses(per_sample_loss: torch.Tensor, task_ids, mask: torch.Tensor | None = None) -> dict:
    """Mean loss per task from per-sample losses (e.g. cross_entropy(..., reduction='none')): one row of
    `per_sample_loss` per id (a row may hold several values, e.g. per-token losses), or one id for all.

    `mask` (same shape as `per_sample_loss`, true where a value counts) leaves values out: a causal LM's per-token
    losses hold a 0.0 at every padding or -100 label (`cross_entropy(..., ignore_index=-100, reduction='none')`), so
    pass `mask=shifted_labels != -100`. Each task's loss is then the mean over its counted tokens; without the mask
    the padding's zeros pulled the loss of a task with short rows towards 0. A task with no counted value in this
    batch is left out of the dict."""
    if hasattr(task_ids, "tolist") and not isinstance(task_ids, (int, str)):  # tensor / numpy array or scalar
        task_ids = task_ids.reshape(-1).tolist() if getattr(task_ids, "ndim", 0) else task_ids.tolist()
    loss = per_sample_loss.detach().float()
    if mask is not None:
        if tuple(mask.shape) != tuple(loss.shape):
            raise ValueError(f"per_task_losses: mask has shape {tuple(mask.shape)} and the losses "
                             f"{tuple(loss.shape)}; give one mask value per loss value (for a causal LM's shifted "
                             f"per-token losses, labels[:, 1:] != -100)")
        counted = mask.detach().to(loss.device).bool()
        if not bool(counted.any()):
            raise ValueError("per_task_losses: the mask counts no loss value (every label is padding or -100); "
                             "a batch without a target token has no task loss")
        loss = torch.where(counted, loss, torch.zeros_like(loss))  # a NaN at an ignored position stays out too
    if isinstance(task_ids, (int, str)):
        if mask is None:
            return {task_ids: float(loss.mean())}
        return {task_ids: float(loss.sum()) / float(counted.sum())}
    n, numel = len(task_ids), loss.numel()
    if n == 0 or numel == 0 or numel % n:
        raise ValueError(f"per_task_losses: {numel} loss values for {n} task ids; pass the per-sample losses "
                         f"(e.g. cross_entropy(..., reduction='none')), one row per task id, or one id for the batch")
    if mask is None:
        sums, counts = loss.reshape(n, -1).mean(1).tolist(), [1.0] * n
    else:
        sums, counts = loss.reshape(n, -1).sum(1).tolist(), counted.reshape(n, -1).sum(1).tolist()
    out: dict = {}
    for t, v, c in zip(task_ids, sums, counts):
        acc = out.setdefault(t, [0.0, 0.0])
        acc[0] += v
        acc[1] += c
    return {t: v / c for t, (v, c) in out.items() if c}


# ---------------------------------------------------------------------------------------- the layer


class _TaskAdapter(nn.Module):
    """One task's nested blocks (same shapes as the shared ones)."""

    def __init__(self, shared: NestedLoRALayer):
        super().__init__()
        self.lora_A = nn.ParameterList(nn.Parameter(p.detach().clone()) for p in shared.lora_A)
        self.lora_B = nn.ParameterList(nn.Parameter(p.detach().clone()) for p in shared.lora_B)


_SLOT_BYTES = 64  # a spare slot's share of the padded `_extra_state` (`128 + 64 * n_slots`): ids up to ~54 characters


def _slot_entry(tid, slot: int) -> str:
    """A registry entry as `get_extra_state`'s JSON writes it."""
    return json.dumps([tid, slot])


def _decode_extra_state(state: torch.Tensor) -> dict:
    """A multi-task layer's `_extra_state` (`get_extra_state`) as the dict it was encoded from; also from a state dict
    cast whole to half precision (`{k: v.half() ...}`), whose floats hold every byte value exactly."""
    return json.loads(bytes(state.to(torch.uint8).tolist()).decode("utf-8"))


class MultiTaskNestedLoRALayer(NestedLoRALayer):
    """`NestedLoRALayer` with `router.n_slots` pre-allocated task adapters (`lora_tasks[slot]`).

    In the "shared" topology it *is* a `NestedLoRALayer` (the shared adapter). In the
    "task" topology each sample uses its task's adapter at the same active rank.
    `lora_parameters()` returns shared + every task block (so Mirror snapshots them all);
    `active_parameters()` returns what the current topology trains.
    """

    def __init__(self, base_layer: nn.Module, router: TaskRouter, **kwargs):
        super().__init__(base_layer, **kwargs)
        self.lora_tasks = nn.ModuleList(_TaskAdapter(self) for _ in range(router.n_slots))
        self.router = router
        router.layers.append(self)
        self._task_grads: dict[int, list[torch.Tensor]] = {}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The shared blocks as `NestedLoRALayer.reset_parameters` draws them, and every task slot a copy of them,
        as construction makes it (so `to_empty` from the meta device leaves no task slot of uninitialised memory)."""
        super().reset_parameters()
        shared = list(self.lora_A) + list(self.lora_B)
        for t in getattr(self, "lora_tasks", ()):  # (none yet while the base class builds the shared blocks)
            for dst, src in zip(list(t.lora_A) + list(t.lora_B), shared):
                dst.copy_(src)

    # nn.Module would register the router as an attribute; it is a plain object, so keep it out of state_dict.
    @property
    def topology(self) -> str:
        return self.router.topology

    # -- the state dict -------------------------------------------------------------
    def get_extra_state(self) -> torch.Tensor:
        """The active rank and the task router's state: the topology (the shared adapter, or the task adapters
        after a split), the slot each task id holds and the number of slots, as UTF-8 JSON in a 1-D uint8 tensor
        (`<layer>._extra_state`; safetensors and `save_pretrained` store it as they store the weights). With the
        rank alone, a model saved in MULTI and loaded with `strict=True` into a freshly built one ran the shared
        adapter for every task, its task adapters loaded into slots no sample used: other outputs, silently.

        The JSON is padded with spaces to a length fixed for the layer's life: the bound `TaskRouter.record_bytes`
        puts on every state the layer can be in (any rank, topology and registry of its slots), rounded up to a
        multiple of `128 + 64 * n_slots` bytes (with task ids up to about 50 characters that is one such block, the
        length files saved before had). `torch.distributed.checkpoint` loads into the state dict's own tensors, in
        place, and refused a model saved after a split ("Size mismatch between saved torch.Size([98]) and current:
        torch.Size([90])"), and, with longer task ids, one saved in SINGLE and loaded into a model in MULTI or the
        other way round, whose JSON had outgrown one block and not the other. A registry this layer was not built
        for (loaded from a model built with other tasks) is padded to the next block, as before."""
        state = {"rank": self.rank, "router": self.router.state_dict()}
        raw = json.dumps(state).encode("utf-8")
        block = 128 + 64 * self.router.n_slots
        size = max(self.router.record_bytes(max(self.boundaries)), len(raw))
        return torch.tensor(list(raw.ljust(-(-size // block) * block)), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if state.ndim == 0:  # a plain NestedLoRALayer's, or saved before the router was kept: the rank alone
            return super().set_extra_state(state)
        st = _decode_extra_state(state)
        self.router.load_state_dict(st["router"])  # (n_slots checked by _load_from_state_dict)
        if self.router.topology == "task":  # task adapters cannot be folded into one base weight: stay unmerged
            self.__dict__.pop("_merge_after_load", None)
        self.set_rank(st["rank"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """A saved router with another number of task slots is an error of the load (listed with the other
        mismatches); its registry would name slots this model does not have, or leave some of its own unnamed."""
        key = prefix + torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX
        saved = state_dict.get(key)
        if torch.is_tensor(saved) and saved.ndim == 1:
            n = _decode_extra_state(saved)["router"]["n_slots"]
            if n != self.router.n_slots:
                error_msgs.append(f"{key}: saved with {n} task slots (tasks + spare_slots), this model has "
                                  f"{self.router.n_slots}; build it with the same tasks and spare_slots as the saved "
                                  f"one")
                state_dict = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _saved_rank(self, state: torch.Tensor):
        return super()._saved_rank(state) if state.ndim == 0 else _decode_extra_state(state)["rank"]

    # -- blocks -----------------------------------------------------------------
    def task_A(self, slot: int) -> torch.Tensor:
        k, blocks = self.n_active_blocks, self.lora_tasks[slot].lora_A
        return blocks[0] if k == 1 else torch.cat(list(blocks[:k]), 0)

    def task_B(self, slot: int) -> torch.Tensor:
        k, blocks = self.n_active_blocks, self.lora_tasks[slot].lora_B
        return blocks[0] if k == 1 else torch.cat(list(blocks[:k]), 1)

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.lora_A) + list(self.lora_B)

    def task_parameters(self, slot: int | None = None) -> list[nn.Parameter]:
        slots = range(len(self.lora_tasks)) if slot is None else [slot]
        return [p for s in slots for p in list(self.lora_tasks[s].lora_A) + list(self.lora_tasks[s].lora_B)]

    def lora_parameters(self) -> list[nn.Parameter]:
        return self.shared_parameters() + self.task_parameters()

    def active_parameters(self) -> list[nn.Parameter]:
        if self.router.topology == "shared":
            return super().active_parameters()
        k = self.n_active_blocks
        return [p for s in sorted(self.router.slots.values())
                for p in blocks_of(self.lora_tasks[s].lora_A)[:k] + blocks_of(self.lora_tasks[s].lora_B)[:k]]

    def set_rank(self, rank: int) -> None:
        super().set_rank(rank)
        tasks = getattr(self, "lora_tasks", None)
        if tasks is None:  # called from NestedLoRALayer.__init__
            return
        for t in tasks:  # paused task blocks: no grad, so the optimizer leaves them alone
            for i in range(self.n_active_blocks, len(self.boundaries)):
                t.lora_A[i].grad = None
                t.lora_B[i].grad = None

    def delta_weight(self, rank: int | None = None, task=None) -> torch.Tensor:
        """Shared delta, or task `task`'s (an id) delta: scaling · B[:, :r] A[:r]."""
        if task is None:
            return super().delta_weight(rank)
        slot = self.router.known_slot(task)
        old = self.rank
        if rank is not None:
            self.rank = self._level(rank)
        try:
            return self.scaling * (self.task_B(slot) @ self.task_A(slot))
        finally:
            self.rank = old

    def check_mergeable(self) -> None:
        """As `NestedLoRALayer.check_mergeable`, and a ValueError in MULTI/MIRROR (the task topology): run first by
        `merge_adapters` and `merge_and_unload` for every layer, so that the refusal comes before any layer changes
        (`merge_and_unload(model, rank=...)` re-ranked the first layer, then refused at its merge)."""
        if self.router.topology == "task":
            raise ValueError("merge: in MULTI/MIRROR each task has its own adapter, which cannot be folded into one "
                             "base weight; merge in SINGLE, or export each task (save_task_adapters)")
        super().check_mergeable()

    # -- forward ------------------------------------------------------------------
    def _hook(self, slot: int, which: int):
        def fn(g):
            acc = self._task_grads.setdefault(slot, [None, None])
            acc[which] = g.detach().clone() if acc[which] is None else acc[which] + g.detach()
        return fn

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        r = self.router
        shared = r.topology == "shared"
        track = shared and r.track_grads and torch.is_grad_enabled()
        if shared and not track:
            return super().forward(x, *args, **kwargs)
        groups = r.groups(x.shape[0], x.device)
        if groups is None:
            if torch._C._current_graph_task_id() != -1 and (not shared or r._routed):
                # a forward re-run inside loss.backward(): activation checkpointing recomputes it there, after the
                # task_context has closed, and would route (or, in SINGLE, track the task gradients) differently
                raise ValueError("multi-task forward: re-run during backward with no task ids set. Activation "
                                 "checkpointing recomputes the forward inside loss.backward(); call loss.backward() "
                                 "inside the same `with task_context(model, task_ids):` as the forward")
            if shared:
                return super().forward(x, *args, **kwargs)
            raise ValueError("multi-task forward: no task ids set; run the model inside "
                             "`with task_context(model, task_ids):` or through MultiTaskModel(model)(task_ids=..., ...)")
        result = self.base_layer(x, *args, **kwargs)
        if self.merged_rank:
            return result
        scaling = self.scaling
        if shared:
            A0, B0 = self.active_A(), self.active_B()
        # the deltas are added in the wider of the two dtypes and the sum rounded once (fp32 blocks on a bf16 base)
        acc = result.dtype if torch.is_autocast_enabled(x.device.type) else torch.promote_types(
            result.dtype, self.lora_A[0].dtype)
        out = result.to(acc)
        for slot, idx in groups:
            if shared:
                A, B = A0.view_as(A0), B0.view_as(B0)
                A.register_hook(self._hook(slot, 0))
                B.register_hook(self._hook(slot, 1))
            else:
                A, B = self.task_A(slot), self.task_B(slot)
            h = x if idx is None else x.index_select(0, idx)
            h = self.lora_dropout(h.to(A.dtype))
            d = (F.linear(F.linear(h, A), B) * scaling).to(acc)
            out = out + d if idx is None else out.index_add(0, idx, d)
        return out.to(result.dtype)

    # -- topology changes -------------------------------------------------------------
    @torch.no_grad()
    def copy_shared_to_tasks(self, slots: Iterable[int] | None = None) -> None:
        slots = list(range(len(self.lora_tasks)) if slots is None else slots)
        for s in slots:
            t = self.lora_tasks[s]
            for dst, src in zip(list(t.lora_A) + list(t.lora_B), self.shared_parameters()):
                dst.copy_(src)

    @torch.no_grad()
    def merge_tasks_into_shared(self, slots: Sequence[int], rule: str = "mean_factors", rank: int | None = None) -> float:
        """Merge the task adapters `slots` into the shared one; returns the relative residual
        ‖mean ΔW_t − ΔW_merged‖_F / ‖mean ΔW_t‖_F at `rank` (unscaled products; 0 if the mean is 0)."""
        if rule not in MERGE_RULES:
            raise ValueError(f"merge_rule: must be one of {MERGE_RULES}, got {rule!r}")
        slots = list(slots)
        rank = int(rank or self.rank)
        if rank not in self.boundaries:
            raise ValueError(f"rank: {rank} is not a nested level of this layer {self.boundaries}")
        starts = (0,) + self.boundaries[:-1]
        for i in range(len(self.boundaries)):  # factor mean, block by block
            for name in ("lora_A", "lora_B"):
                vals = [getattr(self.lora_tasks[s], name)[i] for s in slots]
                dst = getattr(self, name)[i]
                if all(torch.equal(vals[0], v) for v in vals[1:]):
                    dst.copy_(vals[0])
                else:
                    dst.copy_(torch.stack([v.float() for v in vals]).mean(0).to(dst.dtype))
        Bc = torch.cat([torch.cat(list(self.lora_tasks[s].lora_B), 1)[:, :rank].float() for s in slots], 1) / len(slots)
        Ac = torch.cat([torch.cat(list(self.lora_tasks[s].lora_A), 0)[:rank].float() for s in slots], 0)
        if rule == "svd":
            # M = Bc @ Ac (inner dim T·r). QR both sides, SVD of the small core.
            Qb, Rb = torch.linalg.qr(Bc)
            Qa, Ra = torch.linalg.qr(Ac.T)
            U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
            k = min(rank, S.numel())
            # A direction the mean delta lacks (a singular value at rounding level, or none at all when
            # rank(M) < r, e.g. task B factors still at their zero init) gets B's column 0 and keeps A's
            # factor-mean row, as LoRA's own init does: the merged delta is the same, and the direction can
            # still learn. Balanced factors √S·0 = 0 in both A and B would be a saddle whose gradients are
            # exactly 0 for good (grad A ∝ B, grad B ∝ A): each such merge would kill rank dims for the rest
            # of the run, and a shared adapter with every dim dead gives every later step a NaN conflict.
            tol = S.max() * max(Rb.shape[0], Ra.shape[0]) * torch.finfo(S.dtype).eps if S.numel() else S.new_zeros(())
            live = S[:k] > tol
            sq = S[:k].sqrt() * live
            newB = torch.zeros(self.out_features, rank, dtype=torch.float32, device=Bc.device)
            newA = torch.cat(list(self.lora_A), 0)[:rank].float()  # the factor mean, written above
            newB[:, :k] = (Qb @ U[:, :k]) * sq
            newA[:k] = torch.where(live[:, None], sq[:, None] * (Vh[:k] @ Qa.T), newA[:k])
            for i, (s, e) in enumerate(zip(starts, self.boundaries)):
                if e <= rank:
                    self.lora_A[i].copy_(newA[s:e])
                    self.lora_B[i].copy_(newB[:, s:e])
        # residual of the merged delta against the mean delta, via Gram traces (no out×in matrices)
        # (float64: the expansion ‖M‖² − 2⟨M, S⟩ + ‖S‖² cancels)
        Bs = _f64(torch.cat(list(self.lora_B), 1)[:, :rank])
        As = _f64(torch.cat(list(self.lora_A), 0)[:rank])
        Bc, Ac = _f64(Bc), _f64(Ac)
        mm = _frob_inner(Bc, Ac, Bc, Ac)
        ms = _frob_inner(Bc, Ac, Bs, As)
        ss = _frob_inner(Bs, As, Bs, As)
        num = max(mm - 2 * ms + ss, 0.0)
        return math.sqrt(num / mm) if mm > 0 else 0.0


def _f64(t: torch.Tensor) -> torch.Tensor:
    """`t` in float64, on the CPU where its device has no float64 (Apple's mps; not run here: no such device)."""
    return (t.cpu() if t.device.type == "mps" else t).double()


def _frob_inner(B1, A1, B2, A2) -> float:
    """⟨B1 A1, B2 A2⟩_F = tr((B1ᵀB2)(A2 A1ᵀ)) without forming the products."""
    return float(((B1.T @ B2) * (A1 @ A2.T)).sum())


def inject_multitask_lora(model: nn.Module, config: NestedLoRAConfig, tasks: Sequence[int | str], spare_slots: int = 0,
                          register_new_tasks: bool = False) -> tuple[dict[str, MultiTaskNestedLoRALayer], TaskRouter]:
    """`inject_nested_lora` (same targets, freezing and modules_to_save), then each layer
    becomes a `MultiTaskNestedLoRALayer` with the same shared weights and one pre-allocated
    adapter per task (+ `spare_slots`). Returns ({name: layer}, router); the router is also
    stored as `model.task_router`."""
    router = TaskRouter(tasks, spare_slots, register_new_tasks)
    plain = inject_nested_lora(model, config)
    adapters: dict[str, MultiTaskNestedLoRALayer] = {}
    for name, old in plain.items():
        layer = MultiTaskNestedLoRALayer(old.base_layer, router, rank_levels=config.rank_levels,
                                         max_rank=config.max_rank, lora_alpha=config.lora_alpha,
                                         lora_dropout=config.lora_dropout, scaling=config.scaling,
                                         initial_rank=config.initial_rank, kernel=config.kernel,
                                         autocast_adapter_dtype=config.autocast_adapter_dtype)
        with torch.no_grad():
            for dst, src in zip(layer.shared_parameters(), old.lora_parameters()):
                dst.copy_(src)
        layer.copy_shared_to_tasks()
        _replace(model, name, layer)
        adapters[name] = layer
    # a target that is also in modules_to_save (a head with a delta per task that trains in full too): the task layer
    # froze its base layer again, as every layer freezes its own; it was frozen for good, silently
    mark_modules_to_save(model, config.modules_to_save)
    keep_off_fast_paths(model)  # the task layers replaced the plain ones, and their hooks
    object.__setattr__(model, "task_router", router)  # plain attribute, not a submodule
    return adapters, router


# ---------------------------------------------------------------------------------------- the signal


@dataclass
class MultiTaskSignalConfig:
    """φ = f(C, E, S, ΔC, ΔE, ΔS): a weighted sum (weights ≥ 0, summing to 1), then the
    v1 EMA φ ← (1−α)φ + α·φ_raw.

    conflict: "grad" (gradient cosine conflict), "weight" (the task adapters' moves since the split that
    cancel, MULTI only) or "auto" (the gradient conflict in SINGLE, where task adapters do not exist; the
    weight conflict in MULTI/MIRROR, where each task's gradient is read at its own adapter: measured on
    MiniLM, it is as low for flipped labels as for two halves of one data set once the adapters fit
    their tasks, while the weight conflict tells them apart. Before, "auto" took the larger of the two,
    and the gradient's noise raised C for tasks that do not conflict).
    """

    weights: Sequence[float] = (0.4, 0.3, 0.1, 0.1, 0.05, 0.05)  # C, E, S, ΔC, ΔE, ΔS
    alpha: float = 0.1  # φ EMA rate (v1)
    beta: float = 0.9  # per-task loss EMA (v1 E_s)
    loss_scale: float = 1.0  # E_t = EMA(loss_t / loss_scale); D_t = E_t / (1 + E_t)
    # >0: set loss_scale from the mean loss of the first n steps, which maps to calibration_target (as the one-task
    # loss signal's); until then E reads calibration_target / (1 + calibration_target), the value that mean maps to
    calibration_steps: int = 0
    calibration_target: float = 0.5
    drift_scale: float = 0.05  # S = drift / (drift + drift_scale): 0.5 at the Mirror 5 % threshold
    delta_rate: float = 0.1  # EMA rate of the per-step differences
    delta_gain: float = 20.0  # Δx = max(0, tanh(gain · EMA(x_t − x_{t−1}))): only rising stress counts
    grad_ema: float = 0.3  # EMA rate of each task's gradient (for the cosine)
    # "debias": each task pair's gradient conflict weighted by the tasks' gradient reliability ρ (the share of a task's
    # gradient EMA that is not minibatch noise; see `MultiTaskSignal`); "none" (the default): the plain cosine conflict.
    # Measured on MiniLM's dev sets (benchmarks/results/multitask_quality.md), "debias" kept two halves of one data set
    # from splitting but missed flipped labels: with a 20-step warm-up they never split in 3 seeds (at chance), while
    # the plain cosine split them and scored near separate adapters; so "debias" is opt-in
    grad_noise: str = "none"
    conflict: str = "auto"
    phi_init: float = 0.5
    nonfinite: str = "skip"

    def __post_init__(self) -> None:
        check_field_types(self)
        w = tuple(float(v) for v in self.weights)
        if len(w) != 6 or any(v < 0 or not math.isfinite(v) for v in w):
            raise ValueError(f"weights: need six finite weights >= 0 for (C, E, S, ΔC, ΔE, ΔS), got {w}")
        if abs(sum(w) - 1.0) > 1e-6:
            raise ValueError(f"weights: must sum to 1 so φ stays in [0, 1], got sum {sum(w):.6g} for {w}")
        self.weights = w
        for name in ("alpha", "beta", "delta_rate", "grad_ema"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"{name}: must be in (0, 1], got {v!r}")
        if self.calibration_steps < 0:
            raise ValueError(f"calibration_steps: must be >= 0, got {self.calibration_steps}")
        for name in ("loss_scale", "calibration_target", "drift_scale", "delta_gain"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name}: must be a positive finite number, got {v!r}")
        if self.grad_noise not in GRAD_NOISE:
            raise ValueError(f"grad_noise: must be one of {GRAD_NOISE}, got {self.grad_noise!r}")
        if self.conflict not in CONFLICTS:
            raise ValueError(f"conflict: must be one of {CONFLICTS}, got {self.conflict!r}")
        if not 0.0 <= self.phi_init <= 1.0:
            raise ValueError(f"phi_init: must be in [0, 1], got {self.phi_init}")
        if self.nonfinite not in ("skip", "max_stress", "raise"):
            raise ValueError(f"nonfinite: must be 'skip', 'max_stress' or 'raise', got {self.nonfinite!r}")


class MultiTaskSignal:
    """The v1 C/E/S signal. Numbers in, numbers out: `update(loss, task_losses, conflict_grad,
    conflict_weight, drift) -> φ`. Every input is already a number in its natural range:

    * C ∈ [0, 1]: `conflict_grad` = mean over task pairs of max(0, −cos(ḡ_s, ḡ_t)) · √(ρ_s ρ_t) (ḡ a task's
      gradient EMA; 0 = aligned or orthogonal, 1 = opposite, as PCGrad defines conflict). ρ_t ∈ [0, 1], the
      task's gradient reliability (`grad_noise="debias"`; "none", the default: ρ = 1, the plain cosine):
      the share of ḡ_t that is signal, not minibatch noise, ‖μ‖² / (‖μ‖² + σ²) for gradients of mean μ and noise
      power σ² (the gradient signal-to-noise ratio of McCandlish et al. 2018, SNR / (1 + SNR)). Beside ḡ_t the
      controller keeps an EMA (same rate, same start) of ‖g_t‖²; with w_j the EMA's weights of the steps so far,
      W1 = Σ w_j, W2 = Σ w_j², the ratio R = ‖ḡ_t‖² / (W1 · EMA‖g_t‖²) is 1 for a constant gradient and
      β = W2 / W1² in expectation for independent zero-mean ones (β → r/(2−r), 0.18 at rate r = 0.3; 1 at the
      first step, so a fresh task reads ρ = 0), and ρ_t = clamp((R − β) / (1 − β), 0, 1). Near an optimum each
      task's gradient is mostly noise, and the cosine of two noise vectors is often negative: two random halves
      of one data set read a plain C_grad of 0.12–0.24 on average in SINGLE with spikes to 0.83–0.87, and split
      (`benchmarks/multitask_conflict.py`); tasks that pull apart consistently should keep ρ high, but flipped
      labels read ρ 0.23–0.35 on MiniLM with 8 rows a task a step, and the debiased reading missed them on the dev
      sets (`benchmarks/multitask_quality.py`): hence opt-in;
      `conflict_weight` = the largest over layers of 1 − ‖Σ_t x_t‖² / Σ_t‖x_t‖², clamped to [0, 1],
      x_t = ΔW_t − ΔW_shared (active rank): the share of the task adapters' moves since the split that
      cancel in their sum, −Σ_{s≠t} x_s·x_t / Σ_t‖x_t‖² (two tasks, equal moves: max(0, −cos(x_a, x_b)),
      the gradient conflict's scale). 0 = independent moves (minibatch noise: two halves of one data
      set) or moves alike, 1 = moves that cancel (Σ_t x_t = 0, what a mean-merge undoes). Per layer,
      because a conflict can sit in a few layers (flipped labels: the heads move apart, the body alike).
      Before, this was v / (1 − 1/T) with v = Σ_t‖x_t − x̄‖² / Σ_t‖x_t‖² over all layers, which is
      1 for independent moves: noise alone read as full conflict and MULTI never merged back
      (`benchmarks/multitask_conflict.py`). Computed from the factors (r × r Gram products),
      never forming ΔW. C = the one `conflict` names; "auto": the weight conflict where there is one
      (MULTI/MIRROR), else the gradient conflict (held from the last step when none is available).
    * E ∈ [0, 1): mean over tasks of D_t = E_t/(1+E_t), E_t the EMA(β) of task t's loss / loss_scale
      (first value initialises it). Without task losses the overall loss is one pseudo-task. With
      `calibration_steps` = n, `loss_scale` is set after n steps with a finite loss so that their mean `loss` maps
      to `calibration_target` (as `LossSignal` calibrates; a mean of 0 keeps the configured scale); until then E
      is the value that mean maps to, target / (1 + target) (1/3 for 0.5), and C and S are read as usual. The
      E_t run on the configured scale meanwhile and are rescaled to the calibrated one at its end. On the
      default scale of 1 a causal LM's loss (2-5 nats) gives E ≈ 0.7-0.85, whose share 0.3·E alone nearly fills
      θ0 = 0.3: two halves of one corpus, with no conflict (C = 0), stayed split for a whole run.
    * S ∈ [0, 1): relative weight drift since the last transition/snapshot, d/(d + drift_scale), over the adapters
      the topology trains (the controller's `_drift`: shared in SINGLE, the registered tasks' in MULTI/MIRROR).
    * ΔX = max(0, tanh(delta_gain · EMA(X_t − X_{t−1}))) for X in C, E, S.
    """

    def __init__(self, config: MultiTaskSignalConfig | None = None):
        self.config = c = config or MultiTaskSignalConfig()
        self.phi = float(c.phi_init)
        self.loss_scale = float(c.loss_scale)  # the scale in use: the configured one, or the calibrated one
        self._calib: list[float] = []
        self.E: dict = {}
        self.last = {"C": None, "E": None, "S": None}
        self.diff = {k: Ema(c.delta_rate) for k in ("C", "E", "S")}
        self.components: dict = {}

    def update(self, loss: float, task_losses: dict | None = None, conflict_grad: float | None = None,
               conflict_weight: float | None = None, drift: float | None = None) -> float:
        c = self.config
        vals = [float(loss)] + [float(v) for v in (task_losses or {}).values()]
        # a NaN conflict or drift means a non-finite gradient or weight this step: skipped as a non-finite loss is
        extra = [(v, what) for v, what in ((conflict_grad, "gradient conflict"), (conflict_weight, "weight conflict"),
                                           (drift, "drift")) if v is not None]
        for i, v in enumerate(vals):  # E_t/(1+E_t) needs losses >= 0, as the v1 signal does
            _check_not_negative(v, "task loss" if i else "loss")
        if not (all(_check_finite(v, c.nonfinite) for v in vals)
                and all(_check_finite(float(v), c.nonfinite, what) for v, what in extra)):
            if c.nonfinite == "max_stress":
                self.phi = (1 - c.alpha) * self.phi + c.alpha * 1.0
            self.components = dict(self.components, nonfinite=True)
            return self.phi
        for t, v in (task_losses or {"all": float(loss)}).items():
            L = min(float(v) / self.loss_scale, 1e300)  # capped as LossSignal's: inf would make D = inf/inf = NaN
            self.E[t] = L if t not in self.E else c.beta * self.E[t] + (1 - c.beta) * L
        calibrating = self.calibrating
        if calibrating:
            self._calib.append(float(loss))
            E = c.calibration_target / (1 + c.calibration_target)  # what the calibrated mean loss will read as
            if not self.calibrating:  # just finished: fix the scale (a mean of 0, a perfect fit, keeps the given one)
                scale = sum(self._calib) / len(self._calib) / c.calibration_target
                if scale > 0:  # the EMAs, of loss / the old scale, become those of loss / the new one
                    self.E = {t: e * self.loss_scale / scale for t, e in self.E.items()}
                    self.loss_scale = scale
        else:
            E = sum(e / (1 + e) for e in self.E.values()) / len(self.E)  # every task seen so far
        if c.conflict == "auto":  # the weight conflict where there is one (MULTI/MIRROR), else the gradient's
            avail = [conflict_weight] if conflict_weight is not None else [conflict_grad] * (conflict_grad is not None)
        else:
            avail = [v for k, v in (("grad", conflict_grad), ("weight", conflict_weight))
                     if v is not None and c.conflict == k]
        C = min(1.0, max(0.0, avail[0])) if avail else (self.last["C"] or 0.0)
        S = 0.0 if drift is None else max(0.0, drift) / (max(0.0, drift) + c.drift_scale)
        cur = {"C": C, "E": E, "S": S}
        dx = {}
        for k, v in cur.items():
            prev = self.last[k]
            ema = self.diff[k]
            if prev is not None:
                ema.update(v - prev)
            dx[k] = max(0.0, math.tanh(c.delta_gain * (ema.value or 0.0)))
        self.last = dict(cur)
        w = c.weights
        raw = w[0] * C + w[1] * E + w[2] * S + w[3] * dx["C"] + w[4] * dx["E"] + w[5] * dx["S"]
        self.phi = (1 - c.alpha) * self.phi + c.alpha * raw
        comps = {"C": C, "E": E, "S": S, "dC": dx["C"], "dE": dx["E"], "dS": dx["S"], "phi_raw": raw,
                 "C_grad": conflict_grad, "C_weight": conflict_weight, "drift": drift, "nonfinite": False}
        if c.calibration_steps:
            comps.update(loss_scale=self.loss_scale, calibrating=calibrating)
        comps.update({f"E[{t}]": self.E[t] for t in self.E})
        self.components = comps
        return self.phi

    @property
    def calibrating(self) -> bool:
        return len(self._calib) < self.config.calibration_steps

    def state_dict(self) -> dict:
        sd = {"phi": self.phi, "E": [[t, v] for t, v in self.E.items()], "last": dict(self.last),
              "diff": {k: e.value for k, e in self.diff.items()}}
        if self.config.calibration_steps:  # (without it, the keys of a state saved before calibration existed)
            sd.update(loss_scale=self.loss_scale, calib=list(self._calib))
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.phi = sd["phi"]
        self.loss_scale = float(sd.get("loss_scale", self.config.loss_scale))
        self._calib = list(sd.get("calib", ()))
        self.E = {t: v for t, v in sd["E"]}
        self.last = dict(sd["last"])
        for k, v in sd["diff"].items():
            self.diff[k].value = v

    def __setstate__(self, state: dict) -> None:
        """A signal pickled before the calibration existed reads on its configured scale, with nothing to calibrate."""
        state.setdefault("loss_scale", float(state["config"].loss_scale))
        state.setdefault("_calib", [])
        self.__dict__.update(state)


# ---------------------------------------------------------------------------------------- the controller


def _rows_as(r: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`r`, a copy of block `p` taken before `p` changed its number of rows (`resize_token_embeddings` grew a wrapped
    lm_head's B blocks, `NestedLoRALayer._resize_out`), with `p`'s rows as the resize gave them: the kept rows as
    they were, new rows 0. `r` itself where only that does not differ."""
    if r.shape == p.shape or r.shape[1:] != p.shape[1:]:
        return r
    new = r.new_zeros(p.shape)
    keep = min(r.shape[0], p.shape[0])
    new[:keep] = r[:keep]
    return new


class MultiTaskController(UnifiedController):
    """`UnifiedController` over multi-task layers, driven by `MultiTaskSignal`.

        loss.backward()
        ctrl.step(loss, task_losses={"rte": 0.61, "mrpc": 0.55})   # or task_id="rte"
        optimizer.step(); optimizer.zero_grad()

    Transitions: SINGLE→MULTI splits (task adapters ← exact copies of the shared one,
    their optimizer state reset); MULTI→SINGLE merges (`merge_rule`); MIRROR snapshots
    the shared and every task adapter (the base class's Mirror, over `lora_parameters()`).

    A merge is a test. `resplit_window` (steps, default 25; 0 = off): a split that comes within that many steps
    of a merge says the tasks still conflict (SINGLE's gradient conflict, read at the merged adapter, raised φ
    again), so it does not start the tasks over from copies of the merged adapter. Each task adapter, kept as
    it was at the merge (SINGLE leaves them alone), comes back with the shared adapter's move since the merge
    added (block by block: A_t += A_shared − A_shared@merge, and B alike). And the next merge waits:
    no MULTI→SINGLE for `resplit_window` × 2^k steps after the k-th such split in a row (k ≤ 6). A split after
    the window is a split as before (copies; k back to 0).

    `total_steps` (the run's optimizer steps; `unified-lora train` sets it): no merge in the run's last
    `resplit_window` steps, from step `total_steps − resplit_window` on, because the run would end before the
    merge could be tested, and an untested merge of tasks that conflict leaves them one adapter that serves
    neither (measured: `benchmarks/multitask_quality.py`, where merges in the last 14 steps of 120 left flipped
    labels at chance and MRPC's F1 at 0.45). The task adapters stay as they are; MIRROR → MULTI is not held. The
    trace marks a held merge `merge_closed_from`. None (the default) or `resplit_window=0`: no such hold.
    """

    def __init__(self, adapters, router: TaskRouter | None = None, *, optimizer=None,
                 signal: MultiTaskSignalConfig | None = None, merge_rule: str = "mean_factors",
                 machine: MachineConfig | None = None, actuators: ActuatorConfig | None = None,
                 mirror: MirrorConfig | None = None, resplit_window: int = RESPLIT_WINDOW,
                 total_steps: int | None = None, **kwargs):
        if merge_rule not in MERGE_RULES:
            raise ValueError(f"merge_rule: must be one of {MERGE_RULES}, got {merge_rule!r}")
        if isinstance(resplit_window, bool) or not isinstance(resplit_window, int) or resplit_window < 0:
            raise ValueError(f"resplit_window: steps after a merge within which a split brings the task adapters "
                             f"back, an int >= 0 (0 = every split copies the shared adapter), got {resplit_window!r}")
        _check_total_steps(total_steps)
        layers = list(adapters.values()) if isinstance(adapters, dict) else list(adapters)
        if not layers or not all(isinstance(a, MultiTaskNestedLoRALayer) for a in layers):
            raise ValueError("adapters: MultiTaskController needs MultiTaskNestedLoRALayer adapters "
                             "(inject_multitask_lora / setup_multitask_lora)")
        self.router = router or layers[0].router
        if signal is not None and not isinstance(signal, MultiTaskSignalConfig):  # ("composite" was an AttributeError)
            got = repr(signal) if isinstance(signal, str) else f"a {type(signal).__name__}"
            raise ValueError(f"signal: pass a MultiTaskSignalConfig (six weights for C, E, S, ΔC, ΔE, ΔS), got {got}; "
                             f"the one-task signals ('loss', 'composite') are not available in multi-task mode")
        super().__init__(adapters=layers, optimizer=optimizer, signal=SignalConfig(kind="loss"), machine=machine,
                         actuators=actuators, mirror=mirror, **kwargs)
        self.signal = MultiTaskSignal(signal)
        self.signal_config = self.signal.config
        self.merge_rule = merge_rule
        self.resplit_window = resplit_window
        self.total_steps = total_steps  # the run's length: no merge in its last resplit_window steps
        self._held_said = False  # a console line said that a merge was held at the run's end (`_console_due`)
        # the last merge, while a split may still bring the task adapters back: {"step", "slots", "point": per layer,
        # the shared blocks as the merge left them (`shared_parameters()` order)}
        self._parked: dict | None = None
        # after a split within resplit_window, until the next merge or split: {"slots": the tasks brought back,
        # "point": per layer, their weight-conflict reference (`shared_parameters()` order)}; else None (every task is
        # measured from the resting shared adapter, its copy at the split)
        self._conflict_ref: dict | None = None
        self.failed_merges = 0  # splits in a row that came within resplit_window of their merge
        self._split_undo: dict | None = None  # what a split changed, until its transition commits
        self.router.track_grads = self.signal.config.conflict in ("auto", "grad")
        self.grad_ema: dict[int, torch.Tensor] = {}
        # beside each ḡ, its noise statistics (float32 as ḡ, on the device): [EMA of ‖g‖², W1 = Σ w_j, W2 = Σ w_j²] over
        # the same steps with the same weights w_j (`MultiTaskSignal`, C: the reliability ρ)
        self.grad_sq: dict[int, torch.Tensor] = {}
        self._grad_info: dict = {}  # this step's plain gradient conflict and reliabilities ρ, for the trace
        self._task_info = False  # this step was given task losses or a task id (set by step)
        self._local_loss: float | None = None  # this process's loss of this step, before any all-reduce
        self.merge_log: list[dict] = []  # one entry per merge with keep_trace=True (as ctrl.trace); else the last only
        # a router already on the task adapters holds trained ones (load_task_adapters of a folder saved in MULTI or
        # MIRROR, or an earlier controller's split): a controller starting in MULTI/MIRROR keeps them. Only from the
        # shared topology does it start as a split does, every task a copy of the shared adapter (before, the copy
        # ran always, and overwrote the task adapters just loaded)
        split = self.mode >= MULTI and self.router.topology == "shared"
        self.router.set_topology("task" if self.mode >= MULTI else "shared")
        if split:
            for a in self.adapters:
                a.copy_shared_to_tasks()
        self._reset_ref()

    # -- helpers ------------------------------------------------------------------------
    def _slots(self) -> list[int]:
        return sorted(self.router.slots.values())

    def _drop_kept_after_a_load(self) -> None:
        """`load_task_adapters` since the merge was kept (or since the split that brought the task adapters back): the
        adapters loaded are the user's choice, so the kept merge goes (a split within resplit_window added the shared
        adapter's move since the merge to them, and brought back task adapters the load had replaced), and so does the
        tasks' weight-conflict reference (the loaded shared adapter is it, as after any split). Each records the
        router's `task_loads` when it was made."""
        n = self.router.task_loads
        if self._parked is not None and self._parked.get("loads", n) != n:
            self._parked = None
        if self._conflict_ref is not None and self._conflict_ref.get("loads", n) != n:
            self._conflict_ref = None

    def _task_adapter_parameters(self) -> list[nn.Parameter]:
        """Every block of the registered tasks' adapters (no spare slot), layer by layer."""
        return [p for a in self.adapters for s in self._slots() for p in a.task_parameters(s)]

    def _reset_ref(self) -> None:
        """S's reference: a copy of every LoRA block (`lora_parameters()` order), taken at each transition."""
        self._ref = [p.detach().clone() for a in self.adapters for p in a.lora_parameters()]
        self._ref_slots = set(self._slots())  # the task slots whose reference is their value at the last rebuild

    def _grow_ref(self, every: list[nn.Parameter], where: dict[int, int]) -> bool:
        """Give each reference block whose parameter changed its number of rows since (`resize_token_embeddings`
        grew a wrapped lm_head's B blocks, `NestedLoRALayer._resize_out`) that many rows, as the resize did: the kept
        rows as they were, new rows 0 (their value when first seen). True if any was."""
        grown = False
        for p in every:
            i = where[id(p)]
            r = self._ref[i]
            self._ref[i] = _rows_as(r, p)
            grown = grown or self._ref[i] is not r
        return grown

    @torch.no_grad()
    def _drift(self) -> float:
        """S's relative drift Σ‖W − W_ref‖ / Σ‖W_ref‖ over the adapters the topology trains, every block: the shared
        adapter in SINGLE, the registered tasks' adapters in MULTI/MIRROR. Frozen task copies (SINGLE), the resting
        shared adapter (MULTI/MIRROR) and the spare slots stay out: in the sum they shrank S with the number of
        tasks and of `spare_slots`, so pre-allocating slots changed φ and the whole mode trajectory. A task
        registered since the last transition is measured from its value when first seen here (its registration
        copy of the shared adapter, or the weights loaded into it)."""
        every = [p for a in self.adapters for p in a.lora_parameters()]
        where = {id(p): i for i, p in enumerate(every)}  # the reference's order
        new = [s for s in self._slots() if s not in self._ref_slots]
        for p in (p for a in self.adapters for s in new for p in a.task_parameters(s)):
            self._ref[where[id(p)]] = p.detach().clone()
        self._ref_slots.update(new)
        trained = ([p for a in self.adapters for p in a.shared_parameters()] if self.router.topology == "shared"
                   else self._task_adapter_parameters())
        params, ref = [p.detach() for p in trained], [self._ref[where[id(p)]] for p in trained]
        try:
            diff = torch._foreach_sub(params, ref)
        except RuntimeError:  # (caught, not checked each step)
            if not self._grow_ref(every, where):
                raise
            return self._drift()
        num = torch.stack(torch._foreach_norm(diff)).float().sum()
        den = torch.stack(torch._foreach_norm(ref)).float().sum()
        num, den = torch.stack([num, den]).tolist()
        return num / den if den > 0 else 0.0

    def _ddp(self) -> bool:
        """Whether per-process numbers must be combined (an initialised group of > 1 processes, and the
        controller reduces at all: `reduce_loss` not None), over `_reduce_group()`'s processes: the group of a
        `functools.partial(distributed_mean, group=...)` (a DDP over a subgroup), else the whole world. (They were
        combined over the whole world whatever the loss was reduced over: a run on a subgroup mixed in the task
        losses and gradients of the processes outside it, or waited for them.)"""
        if self.reduce_loss is None or not is_distributed():
            return False
        import torch.distributed as dist

        return dist.get_world_size(self._reduce_group()[1]) > 1

    def _read_loss(self, loss, refusal: BaseException | None = None) -> float:
        self._local_loss = self._loss_value(loss)  # `task_id=` credits this process's loss to its task
        return super()._read_loss(self._local_loss, refusal)

    def _check_backward_ran(self) -> None:
        if all(p.grad is None for a in self.adapters for p in a.active_parameters()) and not any(
                a._task_grads for a in self.adapters):
            self._refuse_merged()
            raise ValueError("ctrl.step: no gradient on the adapters; call loss.backward() before ctrl.step(loss=...)")

    @torch.no_grad()
    def _task_gradients(self) -> dict[int, torch.Tensor]:
        """Flattened gradient per task slot present this step (same layout in both topologies)."""
        out: dict[int, list[torch.Tensor]] = {}
        if self.router.topology == "shared":
            slots = set().union(*(a._task_grads.keys() for a in self.adapters))
            if not slots and self._task_info:
                # task losses, but the forward ran with no task ids: the conflict that triggers the split is unseen
                raise ValueError("ctrl.step: task losses were given, but no per-task gradients were captured: the "
                                 "forward ran outside `with task_context(model, task_ids):`. In SINGLE the "
                                 "gradient conflict, which triggers the split into task adapters, needs it")
            for s in slots:
                parts = []
                for a in self.adapters:
                    g = a._task_grads.get(s)
                    if g is None or g[0] is None or g[1] is None:
                        parts = None
                        break
                    parts += [g[0].flatten(), g[1].flatten()]
                if parts:
                    out[s] = parts
            if self._ddp():  # local gradients: combine them across processes (every process, every step)
                return self._all_reduce_task_gradients(out)
        else:  # task adapters' .grad: DDP has averaged them already
            for s in self._slots():
                parts = []
                for a in self.adapters:
                    k = a.n_active_blocks
                    gA = [p.grad for p in blocks_of(a.lora_tasks[s].lora_A)[:k]]
                    gB = [p.grad for p in blocks_of(a.lora_tasks[s].lora_B)[:k]]
                    if any(g is None for g in gA + gB):
                        parts = None
                        break
                    parts += [torch.cat(gA, 0).flatten(), torch.cat(gB, 1).flatten()]
                if parts:
                    out[s] = parts
        for a in self.adapters:
            a._task_grads = {}
        return {s: torch.cat(p).float() for s, p in out.items()}

    @torch.no_grad()
    def _all_reduce_task_gradients(self, local: dict[int, list[torch.Tensor]]) -> dict[int, torch.Tensor]:
        """SINGLE under DDP: the hooks read this process's gradients, before DDP averages them. Every process
        all-reduces one (slots × (numel + 1)) buffer, its absent tasks as zeros and the last column counting the
        processes that saw each task; a task's gradient is then its sum over the processes / world size (its
        share of DDP's averaged gradient), the same on every process."""
        import torch.distributed as dist

        for a in self.adapters:
            a._task_grads = {}
        numel = sum(a.rank * (a.in_features + a.out_features) for a in self.adapters)  # A (r × in), B (out × r)
        buf = torch.zeros(self.router.n_slots, numel + 1, dtype=torch.float32, device=_collective_device())
        for s, parts in local.items():
            buf[s, :numel] = torch.cat([p.float() for p in parts]).to(buf.device)
            buf[s, numel] = 1.0
        group = self._reduce_group()[1]
        dist.all_reduce(buf, group=group)
        buf[:, :numel] /= dist.get_world_size(group)
        seen = (buf[:, numel] > 0).tolist()
        dev = self.adapters[0].lora_A[0].device
        return {s: buf[s, :numel].to(dev) for s in range(self.router.n_slots) if seen[s]}

    @torch.no_grad()
    def _grad_conflict(self) -> float | None:
        rate = self.signal.config.grad_ema
        grads = self._task_gradients()
        # A step whose task gradients hold an inf/NaN entry (one GradScaler skips) must not enter the EMAs: an inf
        # would stay there for good and make every later conflict NaN. Decided on the device, so no sync: every EMA
        # stays as it was (a task seen for the first time holds zeros: no direction yet, the cosine reads none), and
        # the conflict read below comes back NaN, which the signal skips as a non-finite step.
        finite = None
        for g in grads.values():
            ok = torch.isfinite(g).all()
            finite = ok if finite is None else finite & ok
        for s, g in grads.items():
            prev = self.grad_ema.get(s)
            fresh = prev is None or prev.shape != g.shape
            new = g if fresh else (1 - rate) * prev + rate * g
            # An all-zero gradient is a task absent from the batch whose .grad was zeroed rather than set to None
            # (zero_grad(set_to_none=False)): it leaves the EMA as it was, as an absent task's None does. (Before, it
            # entered as a real gradient: the EMA decayed, and C depended on how the loop zeroed its gradients.)
            use = finite & g.ne(0).any()
            self.grad_ema[s] = torch.where(use, new, torch.zeros_like(g) if fresh else prev)
            # the noise statistics take the steps ḡ takes, with its weights: a start (fresh ḡ, or a state saved before
            # them: they start here) puts ‖g‖², W1 = W2 = 1; a fresh ḡ of zeros (no usable step) puts zeros, and its
            # later steps then weigh r, r(1 − r), ... in both, as in ḡ
            sq = g.square().sum()
            held = self.grad_sq.get(s)
            if fresh or held is None:
                st, held = torch.stack([sq, sq.new_ones(()), sq.new_ones(())]), sq.new_zeros(3)
            else:
                st = torch.stack([(1 - rate) * held[0] + rate * sq, (1 - rate) * held[1] + rate,
                                  (1 - rate) ** 2 * held[2] + rate ** 2])
            self.grad_sq[s] = torch.where(use, st, held)
        # An EMA of another shape is from a former rank (a task absent since the last rank change): it cannot be
        # compared with this step's, so it goes, and the task starts afresh when it comes back. Kept (as before),
        # it made every later conflict None while that task stayed away: C froze, and a split never came however
        # much the remaining tasks fought (three tasks, one whose data had ended before a merge).
        shape = next(iter(grads.values())).shape if grads else None
        for s in [s for s, e in self.grad_ema.items() if shape is not None and e.shape != shape]:
            del self.grad_ema[s]
            self.grad_sq.pop(s, None)
        slots = [s for s in self._slots() if s in self.grad_ema]
        shapes = {self.grad_ema[s].shape for s in slots}
        if len(slots) < 2 or len(shapes) != 1:
            return None
        G = torch.stack([self.grad_ema[s] for s in slots])
        n = G.norm(dim=1).clamp_min(1e-30)
        # the product clamped too: two zero gradients (n = 1e-30 each) would give 0 / (1e-60 → 0 in fp32) = NaN, a
        # step the signal skips as non-finite, for good if those tasks' gradients stay zero; 0 is "no conflict"
        cos = (G @ G.T) / (n[:, None] * n[None, :]).clamp_min(1e-30)
        iu = torch.triu_indices(len(slots), len(slots), 1)
        # an EMA of zeros (a task with no usable gradient yet) has no direction: its pairs stay out of the mean, on
        # the device (no sync). Before, each counted as a conflict of 0, and with three tasks C was a third of the
        # conflict of the two that had gradients; with no pair left the conflict is 0, as before.
        has = G.ne(0).any(1)
        valid = (has[:, None] & has[None, :])[iu[0], iu[1]].float()
        pair = (-cos[iu[0], iu[1]]).clamp_min(0) * valid
        raw = pair.sum() / valid.sum().clamp_min(1)
        rho, known = self._grad_reliability(slots, G)
        # debiased: a pair whose ρ cannot be told yet (a task's first step: after a rank change, every task's) stays out
        # of the mean, as a task with no gradient does; with no pair left for that reason, no conflict is read (the
        # signal holds C). (With no pair of tasks that have a gradient, the conflict is 0, as in the plain reading.)
        told = valid * (known[iu[0]] & known[iu[1]]).float()
        debiased = (pair * (rho[iu[0]] * rho[iu[1]]).sqrt() * told).sum() / told.sum().clamp_min(1)
        both = torch.stack([debiased, raw])
        if finite is not None:  # this step's gradients had an inf/NaN: say so through the one read (NaN), no extra sync
            both = torch.where(finite, both, torch.full_like(both, math.nan))
        vals = torch.cat([both, torch.stack([told.sum(), valid.sum()]), rho]).tolist()  # the one host read of the step
        ids = {s: tid for tid, s in self.router.slots.items()}
        self._grad_info = {"C_grad_raw": vals[1], **{f"rho[{ids[s]}]": v for s, v in zip(slots, vals[4:])}}
        if self.signal.config.grad_noise == "none":
            return vals[1]
        unread = vals[2] == 0 and vals[3] > 0 and vals[1] == vals[1]  # (NaN: a non-finite step, said as such)
        return None if unread else vals[0]

    def _grad_reliability(self, slots: list[int], G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ρ per slot (on the device, no sync): the share of the gradient EMA that is signal (`MultiTaskSignal`, C),
        and whether it can be told yet (not before a task's second usable step; ρ = 0 there)."""
        none = G.new_zeros(3)  # (a task absent since a state saved before them was loaded: no statistics yet)
        st = torch.stack([self.grad_sq.get(s, none) for s in slots])
        sq, w1, w2 = st[:, 0], st[:, 1], st[:, 2]
        den = w1 * sq
        r = G.square().sum(1) / den.clamp_min(1e-30)
        beta = w2 / w1.square().clamp_min(1e-30)
        ok = (den > 0) & (1 - beta > 1e-6)
        rho = ((r - beta) / (1 - beta).clamp_min(1e-6)).clamp(0, 1)
        return torch.where(ok, rho, torch.zeros_like(rho)), ok

    @torch.no_grad()
    def _weight_conflict(self) -> float | None:
        """The largest over layers of 1 − ‖Σ_t x_t‖² / Σ_t‖x_t‖², clamped to [0, 1], x_t = ΔW_t − ΔW_ref(t) (active
        rank; the reference is the resting shared adapter, or, for a task a split within resplit_window brought back,
        `_conflict_ref`): the share of the task adapters' moves since the split that cancel in their sum (see
        `MultiTaskSignal`). None while no task adapter has moved since the split. Computed from the factors (r × r
        Gram products), never forming ΔW; every layer's Gram comes to the host in one transfer."""
        slots = self._slots()
        if self.router.topology != "task" or len(slots) < 2:
            return None
        worst = None  # no layer moved yet (the step after a split): no reading, and "auto" takes the gradient's
        cref = self._conflict_ref
        # each task's reference: 0 the resting shared adapter, 1 the reference a split within resplit_window brought
        # back with the task (measured from the shared adapter, the merge's mean, the tasks brought back move apart by
        # construction: two tasks that do not conflict read C_weight ~0.8 after such a split)
        ref = torch.tensor([int(cref is not None and s in cref["slots"]) for s in slots])
        grams = []
        for i, a in enumerate(self.adapters):
            refB, refA = [a.active_B()], [a.active_A()]
            if cref is not None:
                k, n, own = a.n_active_blocks, len(a.lora_A), a.shared_parameters()
                blocks = [_rows_as(r, p) for r, p in zip(cref["point"][i], own)]  # (a resize since: rows as it made)
                refA.append(torch.cat(blocks[:k], 0))
                refB.append(torch.cat(blocks[n:n + k], 1))
            # float64: X below is H's entries less each other, ~‖ΔW_shared‖² each, for moves that may be 1e-4 of that
            # (the steps after a split, or a small learning rate): in float32 their rounding read as moves, and a
            # layer's share came out anywhere in [0, 1] (or the layer was left out), the largest of them taken
            Bs = _f64(torch.stack(refB + [a.task_B(s) for s in slots]))  # (R+T, out, r)
            As = _f64(torch.stack(refA + [a.task_A(s) for s in slots]))  # (R+T, r, in)
            P = torch.einsum("iob,joc->ijbc", Bs, Bs)
            Q = torch.einsum("ibx,jcx->ijbc", As, As)
            grams.append((P * Q).sum((2, 3)))
        t = torch.arange(len(grams[0]) - len(slots), len(grams[0]))  # the tasks' rows, after the references'
        for H in torch.stack(grams).cpu():  # (one device-to-host copy a step, not one a layer)
            g_ss = H[ref, ref].max()
            X = H[t][:, t] - H[t][:, ref] - H[ref][:, t] + H[ref][:, ref]  # Gram of x_t = ΔW_t − ΔW_ref(t)
            total = float(torch.diagonal(X).sum())
            if total <= 1e-12 * max(float(g_ss), 1e-30) or total <= 0:
                continue  # no task moved this layer (yet)
            # −Σ_{s≠t} x_s·x_t / Σ_t‖x_t‖²: 0 for independent moves (minibatch noise alone), < 0 (→ 0) for moves
            # alike, 1 when the moves cancel (Σ_t x_t = 0)
            worst = max(worst or 0.0, 1.0 - float(X.sum()) / total)
        return None if worst is None else min(1.0, max(0.0, worst))

    def _read_task_losses(self, task_losses, task_id) -> dict | None:
        if task_losses is not None and task_id is not None:
            raise ValueError("ctrl.step: pass task_losses= or task_id=, not both")
        if task_id is not None:
            task_losses = {task_id: self._local_loss}  # this process's loss, not the mean
        out = {}
        for t, v in (task_losses or {}).items():
            self.router.slot(t)  # unknown id → ValueError (or registration)
            out[_check_task_id(t)] = v.detach().float().item() if torch.is_tensor(v) else float(v)
        if self._ddp():  # every process, with or without task losses of its own: one all-reduce
            return self._all_reduce_task_losses(out)
        return out if task_losses is not None else None

    def _all_reduce_task_losses(self, local: dict) -> dict | None:
        """Each task's loss, averaged over the processes that saw it, in slot order: the same dict on every
        process, whatever tasks each one had (a process without a task adds nothing to its mean)."""
        import torch.distributed as dist

        n = self.router.n_slots
        buf = [0.0] * (2 * n)
        for t, v in local.items():
            s = self.router.slots[t]
            buf[s] += v
            buf[n + s] += 1.0
        t = torch.tensor(buf, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t, group=self._reduce_group()[1])
        sums, counts = t[:n].tolist(), t[n:].tolist()
        ids = {s: tid for tid, s in self.router.slots.items()}
        out = {ids[s]: sums[s] / counts[s] for s in range(n) if counts[s] > 0}
        return out or None

    # -- the step ---------------------------------------------------------------------------
    def step(self, loss, task_losses: dict | None = None, task_id=None) -> list[Transition]:
        if task_id is not None and (isinstance(task_id, (list, tuple)) or getattr(task_id, "ndim", 0) > 0):
            raise ValueError(f"ctrl.step: task_id= is one id for the whole batch, got {type(task_id).__name__} "
                             f"{task_id!r}; for one id per sample pass task_losses=per_task_losses(per_sample_loss, "
                             f"task_ids)")
        if not self.__dict__.get("_not_sharded"):
            self._refuse_sharded()
        self._drop_kept_after_a_load()
        parked = self._parked
        if parked is not None and self.global_step - parked["step"] > self.resplit_window:
            self._parked = None  # no split can bring the task adapters back now: the merge point's copy goes
        self._task_info = task_losses is not None or task_id is not None
        self._given_tasks = [task_id] if task_id is not None else list(task_losses or ())
        closed = self.merges_closed_from
        self.machine.no_down_from = {} if closed is None else {MULTI: closed}
        return super().step(loss, task_losses=task_losses, task_id=task_id)

    @property
    def merges_closed_from(self) -> int | None:
        """The first step at which no merge may start (`total_steps − resplit_window`), or None (no `total_steps`,
        or `resplit_window` 0)."""
        total = _check_total_steps(self.total_steps)  # (an attribute a user may set after construction)
        return None if total is None or not self.resplit_window else max(0, total - self.resplit_window)

    def _check_before_step(self) -> None:
        """As the base class's, and the topology first: under DDP a topology restored on one process only (its
        load_task_adapters or model.load_state_dict) is raised on every process, at the lockstep all-reduce."""
        want = "task" if self.mode >= MULTI else "shared"
        if self.router.topology != want:  # before anything moves: a refused step leaves the run as it was
            raise ValueError(
                f"ctrl.step: the model runs the {'task adapters' if want == 'shared' else 'shared adapter'} "
                f"(topology {self.router.topology!r}), but this controller is in {MODES[self.mode]}, which trains "
                f"the {'task adapters' if want == 'task' else 'shared adapter'}. load_task_adapters and the model's "
                f"load_state_dict restore the topology they were saved in; training on would overwrite the adapter "
                f"that trains now at the next {'merge' if want == 'task' else 'split'}. Build the controller in the "
                f"mode the model was saved in (machine=MachineConfig(initial_mode="
                f"{'SINGLE' if want == 'task' else 'MULTI'})), or resume with ctrl.load_state_dict(...), which "
                f"restores the mode and the topology together")
        self._check_routed_tasks()
        self._check_sync_step()
        self._check_rank()  # (the backward check stays in _update_signal, after the task ids': those fail first)

    def _check_routed_tasks(self) -> None:
        """Refuse a task loss (`task_id=`, a key of `task_losses=`) for a task that no forward since the last step was
        routed as (`task_context`): its error term would read a loss whose gradient went to another task's adapter
        (or, in SINGLE, whose per-task gradient was captured as another task's). Before, `task_id="b"` after a forward
        routed as "a" was accepted. The router records the slots its `task_context`s set since the last step, and this
        step takes them (no tensor op). Not checked where no forward was routed since (in SINGLE, a forward outside
        `task_context`, which `_task_gradients` refuses with task losses), for an id not registered (the router's
        error says so), nor under DDP, where a process passes the losses of tasks other processes saw (`train`
        passes every task of the step's global batch on every process)."""
        routed, self.router.routed_since_step = self.router.routed_since_step, frozenset()
        given = self.__dict__.get("_given_tasks") or []
        if not routed or not given or self._ddp():
            return
        slots, stray = self.router.slots, []
        for t in given:
            tid = _check_task_id(t)
            if slots.get(tid) not in routed and (tid in slots or self.router.register_new_tasks):
                stray.append(tid)
        if stray:
            ran = [t for t, s in slots.items() if s in routed]
            raise ValueError(
                f"ctrl.step: a loss is given for task {_names(stray)}, but the forwards since the last ctrl.step were "
                f"routed as task {_names(ran)} (task_context), whose gradients this step reads: {_names(stray)}'s "
                f"error term would get another task's loss. Pass the ids the forward ran with: task_id= the batch's "
                f"one id, or task_losses=per_task_losses(per_sample_loss, task_ids)")

    def _console_due(self, rec) -> bool:
        """As the base class, and the first step of this session whose merge the run's end held
        (`merge_closed_from`), which a `log_every` line may not show: φ below θ0 in MULTI, with no merge to follow."""
        held = rec.components.get("merge_closed_from") is not None
        due = super()._console_due(rec) or (held and not self._held_said)
        self._held_said = self._held_said or (due and held)
        return due

    def _refuse_sharded(self) -> None:
        """Refuse FSDP2-sharded adapters (checked at the first step): the task-conflict statistics (C_grad,
        C_weight) and the split/merge would read each process's shards, and the processes would decide apart."""
        if shard_group(self.managed_parameters(), "multi-task mode") is not None:
            raise ValueError("multi-task mode: the adapters are sharded by FSDP2 (fully_shard), which multi-task mode "
                             "does not support: its task-conflict statistics and the split/merge would read each "
                             "process's shards, and the processes would decide apart. Use DDP(model, "
                             "**ddp_kwargs()), or setup_unified_lora (one adapter), which supports fully_shard")
        self._not_sharded = True

    def _undo_transition(self, t: Transition, last_transition_step: int | None, held: bool,
                         error: BaseException) -> None:
        """As the base class, and the topology back to the old mode's: a split or merge that completed before a
        later part of the transition raised (the rank change) left the model on the new mode's adapters while the
        machine went back to the old mode."""
        super()._undo_transition(t, last_transition_step, held, error)
        if (t.old == SINGLE) != (t.new == SINGLE):
            self.router.set_topology("task" if t.old >= MULTI else "shared")
        if t.old == MULTI and t.new == SINGLE:  # a merge undone: MULTI again, with no merge to come back to
            self._parked = None
        undo, self._split_undo = self._split_undo, None
        if undo is not None:  # a split that ran: its task adapters, its merge and its back-off as they were
            with torch.no_grad():
                for a, saved in zip(self.adapters, undo["slots"]):
                    for p, v in zip([p for s in undo["back"] for p in a.task_parameters(s)], saved):
                        p.copy_(v)
            self._parked, self.failed_merges, self._conflict_ref = undo["parked"], undo["failed"], undo["cref"]
            if undo["hold"] is None:
                self.machine.hold_down.pop(MULTI, None)
            else:
                self.machine.hold_down[MULTI] = undo["hold"]

    def _update_signal(self, loss: float, task_losses: dict | None = None, task_id=None) -> float:
        tl = self._read_task_losses(task_losses, task_id)  # bad task ids fail first
        self._check_backward_ran()
        _check_not_negative(loss)  # here too, before the gradient EMAs below take this step in
        for v in (tl or {}).values():
            _check_not_negative(v, "task loss")
        finite = math.isfinite(loss) and all(math.isfinite(v) for v in (tl or {}).values())
        conflict = self.signal.config.conflict
        # Under DDP both read numbers every process shares: task gradients combined across processes (SINGLE)
        # or averaged by DDP (MULTI), and the replicated weights. So neither needs a reduce of its own.
        self._grad_info = {}
        cg = self._grad_conflict() if conflict in ("auto", "grad") and finite else None
        cw = self._weight_conflict() if conflict in ("auto", "weight") and finite else None
        if not finite:
            for a in self.adapters:
                a._task_grads = {}
        phi = self.signal.update(loss, tl, cg, cw, self._drift())
        # the trace's: the plain cosine conflict (what grad_noise="none" reads) and each task's reliability ρ
        self.signal.components.update(self._grad_info)
        return phi

    def _annotate(self, transition: Transition | None, comps: dict) -> None:
        comps["topology"] = self.router.topology
        if transition is None:
            closed = self.machine.no_down_from.get(MULTI)
            if (closed is not None and self.mode == MULTI and self.global_step >= closed
                    and self.signal.phi < self.machine.config.theta0):  # a merge φ called for, held
                comps["merge_closed_from"] = closed
            return
        self._reset_ref()
        if self.merge_log and self.merge_log[-1]["step"] == self.global_step:
            comps["event"] = "merge"
            comps["merge_residual"] = self.merge_log[-1]["residual"]
        elif transition.old == SINGLE:
            comps["event"] = "split"
            if self._split_undo and self._split_undo["back"]:  # within resplit_window of the merge
                comps["tasks_back"] = len(self._split_undo["back"])
                comps["merge_held_until"] = self.machine.hold_down[MULTI]

    def _reset_opt_state(self, params) -> None:
        inner = _unwrap_optimizer(self.optimizer)
        if inner is not None:
            for p in params:
                inner.state.pop(p, None)

    def _save_snapshot(self, step: int, params: list[nn.Parameter] | None = None) -> None:
        """Mirror's entry snapshot, after every spare slot becomes a copy of the shared adapter. A task registered
        during MIRROR starts as that copy (`register_task`), and the shared adapter rests in MIRROR, so a rollback
        puts back the adapter the task started with. Before, the snapshot held the spare slot's value from
        construction (B = 0), and a rollback reset such a task to a cold, zero delta."""
        used = set(self.router.slots.values())
        spare = [s for s in range(self.router.n_slots) if s not in used]
        if spare:
            for a in self.adapters:
                a.copy_shared_to_tasks(spare)
        super()._save_snapshot(step, params)

    def _mirror_decision(self) -> MirrorDecision:
        """Mirror's exit rule in multi-task mode, with the drift over the adapters MIRROR trains: every block of
        the registered tasks' adapters. The shared adapter rests in MIRROR and a spare slot belongs to no task, so
        with them in the sum (as before) the drift shrank with the number of tasks and of `spare_slots` (two tasks
        and three spare slots: to a third of it), and a pre-allocated slot changed the rollback decision."""
        where = {id(p): i for i, p in enumerate(self.managed_parameters())}  # the snapshot's order
        params = self._task_adapter_parameters()
        return self.mirror.decide(params, loss_at_exit=self.loss_ema, indices=[where[id(p)] for p in params])

    def _on_transition(self, t: Transition):
        # what `_undo_transition` puts back is this transition's split only (a `ctrl.split()` called by hand left
        # its own, and a later transition that failed put the task adapters back as that split found them)
        self._split_undo = None
        if t.old == SINGLE and t.new == MULTI:
            self.split()
            return None, None
        if t.old == MULTI and t.new == SINGLE:
            self.merge_back(rank=self.actuators.mode_ranks[SINGLE], step=t.step)
            return None, None
        return super()._on_transition(t)

    @torch.no_grad()
    def split(self) -> None:
        """Task adapters ← exact copies of the shared one, or, within `resplit_window` steps of a merge, the task
        adapters as the merge left them plus the shared adapter's move since (see the class docstring); their
        optimizer state is reset and this step's shared gradients are dropped (the shared adapter rests, as the
        split point)."""
        self._drop_kept_after_a_load()
        step, parked = self.global_step, self._parked
        warm = parked is not None and 0 < self.resplit_window and step - parked["step"] <= self.resplit_window
        back = [s for s in self._slots() if warm and s in parked["slots"]]  # (a task registered since: a copy)
        refs: list[list[torch.Tensor]] = []
        self._split_undo = {"parked": parked, "failed": self.failed_merges, "hold": self.machine.hold_down.get(MULTI),
                            "cref": self._conflict_ref, "back": back, "slots": [[p.detach().clone() for s in back for p in a.task_parameters(s)]
                                      for a in self.adapters]}
        for i, a in enumerate(self.adapters):
            a.copy_shared_to_tasks([s for s in self._slots() if s not in back])
            if back:
                shared = [p.detach() for p in a.shared_parameters()]
                # (a resize since the merge grew the B blocks: the point's new rows are 0, as the resize made them)
                moved = torch._foreach_sub(shared, [_rows_as(r, p) for r, p in zip(parked["point"][i], shared)])
                for s in back:
                    torch._foreach_add_([p.detach() for p in a.task_parameters(s)], moved)
                if parked.get("ref") is not None:  # the tasks' weight-conflict reference moves with them
                    refs.append(torch._foreach_add([_rows_as(r, p) for r, p in zip(parked["ref"][i], shared)], moved))
            for p in a.shared_parameters() + a.task_parameters():
                p.grad = None
            self._reset_opt_state(a.task_parameters())
        self.router.set_topology("task")
        self._parked = None
        self._conflict_ref = {"slots": back, "point": refs, "loads": self.router.task_loads} if refs else None
        # (a file from before "ref": no reference)
        if warm:  # the merge did not hold: the next one waits, twice as long each time in a row
            self.failed_merges += 1
            self.machine.hold_down[MULTI] = step + self.resplit_window * 2 ** min(self.failed_merges, 6)
        else:
            self.failed_merges = 0
            self.machine.hold_down.pop(MULTI, None)

    def _commit_transition(self) -> None:
        super()._commit_transition()
        self._split_undo = None

    @torch.no_grad()
    def merge_back(self, rank: int | None = None, step: int | None = None) -> float:
        """Merge every registered task adapter into the shared one (`merge_rule`); returns the
        mean relative residual vs the mean task delta over layers (see the module docstring)."""
        rank = rank or self.actuators.mode_ranks[SINGLE]
        self._drop_kept_after_a_load()
        # the tasks' weight-conflict reference before the merge overwrites the resting shared adapter (the same for
        # every task: each brought back by a split took the one it had): a split within resplit_window brings it back
        cref = self._conflict_ref
        ref = None if not self.resplit_window else [
            [p.detach().clone() for p in (cref["point"][i] if cref is not None else a.shared_parameters())]
            for i, a in enumerate(self.adapters)]
        res = []
        for a in self.adapters:
            res.append(a.merge_tasks_into_shared(self._slots(), self.merge_rule, rank))
            for p in a.shared_parameters() + a.task_parameters():
                p.grad = None
            if self.merge_rule == "svd":
                self._reset_opt_state(a.shared_parameters())
        self.router.set_topology("shared")
        # the task adapters stay as they are in SINGLE: a split within resplit_window brings them back
        self._conflict_ref = None
        self._parked = None if not self.resplit_window else {
            "step": self.global_step if step is None else step, "slots": self._slots(),
            "point": [[p.detach().clone() for p in a.shared_parameters()] for a in self.adapters], "ref": ref,
            "loads": self.router.task_loads}
        r = sum(res) / len(res)
        entry = {"step": self.global_step if step is None else step, "rule": self.merge_rule, "rank": rank,
                 "residual": r}
        if self.keep_trace:
            self.merge_log.append(entry)
        else:  # a run without a kept trace keeps the last merge only (the trace file has each one): no per-cycle growth
            self.merge_log[:] = [entry]
        return r

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        self._drop_kept_after_a_load()
        sd = super().state_dict()
        sd["multitask"] = {
            "router": self.router.state_dict(),
            # copies (`.cpu()` of a CPU tensor is the tensor itself: editing the state edited the controller)
            "grad_ema": {s: g.to("cpu", copy=True) for s, g in self.grad_ema.items()},
            "grad_sq": {s: g.to("cpu", copy=True) for s, g in self.grad_sq.items()},
            "ref": [r.to("cpu", copy=True) for r in self._ref],
            "ref_slots": sorted(self._ref_slots),
            "merge_rule": self.merge_rule,
            "merge_log": [dict(e) for e in self.merge_log],
            "failed_merges": self.failed_merges,
            "parked": None if self._parked is None else {
                "step": self._parked["step"], "slots": list(self._parked["slots"]),
                "point": [[t.to("cpu", copy=True) for t in layer] for layer in self._parked["point"]],
                "ref": None if self._parked.get("ref") is None else [
                    [t.to("cpu", copy=True) for t in layer] for layer in self._parked["ref"]]},
            "conflict_ref": None if self._conflict_ref is None else {
                "slots": list(self._conflict_ref["slots"]),
                "point": [[t.to("cpu", copy=True) for t in layer] for layer in self._conflict_ref["point"]]},
        }
        return sd

    _MULTITASK_KEYS = ("router", "grad_ema", "ref", "merge_rule", "merge_log")  # "ref_slots": optional (older files)

    def _state_problems(self, sd) -> list[str]:
        out = super()._state_problems(sd)
        mt = sd.get("multitask") if isinstance(sd, dict) else None
        if isinstance(sd, dict) and "multitask" not in sd:
            out.append("the state has no 'multitask' part: it was saved by a single-task UnifiedController; a "
                       "MultiTaskController loads states saved by a MultiTaskController")
        elif not isinstance(mt, dict) or any(k not in mt for k in self._MULTITASK_KEYS) or not isinstance(
                mt["router"], dict) or any(k not in mt["router"] for k in ("slots", "n_slots", "topology")):
            out.append("sd['multitask'] is not a MultiTaskController's state (missing keys: a truncated or edited "
                       "state)")
        elif isinstance(sd, dict):
            out += self._multitask_problems(mt)
        return out

    def _multitask_problems(self, mt: dict) -> list[str]:
        """Every way the parts of `sd['multitask']` do not fit this controller's model (its keys are there). Each
        of them was read only by the load, after the router and the base state had loaded (a KeyError or TypeError
        there left the controller partly loaded), or later, at a split (a kept merge point of another model's
        shapes)."""
        out: list[str] = []
        where = "sd['multitask']"
        r = mt["router"]
        n = r["n_slots"]
        if n != self.router.n_slots:
            out.append(f"{where}['router']: saved with {n!r} task slots (tasks + spare_slots), this model has "
                       f"{self.router.n_slots}; build it with the same tasks and spare_slots as the saved one")
            return out
        pairs = r["slots"]
        ok = isinstance(pairs, (list, tuple)) and all(
            isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], (int, str))
            and not isinstance(e[0], bool) and type(e[1]) is int and e[1] in range(n) for e in pairs)
        if not ok or len({e[0] for e in pairs}) != len(pairs) or len({e[1] for e in pairs}) != len(pairs):
            return out + [f"{where}['router']['slots'] is not a list of [task id, slot] pairs, each id and slot "
                          f"once, slots 0..{n - 1}: {pairs!r:.200}"]
        if r["topology"] not in ("shared", "task"):
            out.append(f"{where}['router']['topology'] is {r['topology']!r}, not 'shared' or 'task'")
        registered = {e[1] for e in pairs}

        def slots_problem(what: str, slots) -> str | None:
            if not isinstance(slots, (list, tuple, set)) or not all(_is_int(s) for s in slots):
                return f"{what} is {slots!r:.200}, not a list of task slots"
            bad = sorted(int(s) for s in slots if int(s) not in registered)
            return f"{what} names task slot(s) {bad} that the state registers no task in " \
                   f"(registered: {sorted(registered)})" if bad else None

        ge = mt["grad_ema"]
        if not isinstance(ge, dict):
            out.append(f"{where}['grad_ema'] is a {type(ge).__name__}, not a mapping of task slots to tensors")
        else:
            out += [p for p in [slots_problem(f"{where}['grad_ema']", list(ge))] if p]
            out += [f"{where}['grad_ema'][{s!r}] is a {type(g).__name__}, not a tensor" for s, g in ge.items()
                    if not torch.is_tensor(g)]
        gs = mt.get("grad_sq", {})  # (optional: states from before it have none)
        if not isinstance(gs, dict):
            out.append(f"{where}['grad_sq'] is a {type(gs).__name__}, not a mapping of task slots to tensors")
        else:
            out += [p for p in [slots_problem(f"{where}['grad_sq']", list(gs))] if p]
            out += [f"{where}['grad_sq'][{s!r}] is {type(g).__name__ if not torch.is_tensor(g) else tuple(g.shape)}, "
                    f"not a tensor of 3 numbers (the EMA of the squared gradient norm, W1, W2)" for s, g in gs.items()
                    if not (torch.is_tensor(g) and tuple(g.shape) == (3,))]
        every = [(name, p, b) for name, a in zip(self._adapter_names, self.adapters)
                 for b in [{id(q) for q in a.lora_B} | {id(q) for t in a.lora_tasks for q in t.lora_B}]
                 for p in a.lora_parameters()]
        ref = mt["ref"]
        if not isinstance(ref, (list, tuple)) or len(ref) != len(every):
            out.append(f"{where}['ref'] holds {len(ref) if isinstance(ref, (list, tuple)) else type(ref).__name__} "
                       f"tensors; this model's adapters have {len(every)} LoRA blocks (shared and task)")
        else:
            out += [p for p in (self._block_problem(f"{where}['ref'][{i}]", t, name, q, id(q) in b)
                                for i, (t, (name, q, b)) in enumerate(zip(ref, every))) if p][:3]
        if "ref_slots" in mt:
            out += [p for p in [slots_problem(f"{where}['ref_slots']", mt["ref_slots"])] if p]
        if mt["merge_rule"] not in MERGE_RULES:
            out.append(f"{where}['merge_rule'] is {mt['merge_rule']!r}, not one of {MERGE_RULES}")
        if not isinstance(mt["merge_log"], (list, tuple)) or not all(isinstance(e, dict) for e in mt["merge_log"]):
            out.append(f"{where}['merge_log'] is not a list of merges (dicts)")
        if "failed_merges" in mt and not (_is_int(mt["failed_merges"]) and int(mt["failed_merges"]) >= 0):
            out.append(f"{where}['failed_merges'] is {mt['failed_merges']!r}, not a count")
        for part, keys in (("parked", ("step", "slots", "point")), ("conflict_ref", ("slots", "point"))):
            got = mt.get(part)
            what = f"{where}[{part!r}]"
            if got is None:
                continue
            if not isinstance(got, dict) or any(k not in got for k in keys):
                out.append(f"{what} is not None or a dict with {list(keys)}: a truncated or edited state")
                continue
            if part == "parked" and not _is_int(got["step"]):
                out.append(f"{what}['step'] is {got['step']!r}, not a step")
            out += [p for p in [slots_problem(f"{what}['slots']", got["slots"])] if p]
            for key in ("point", "ref"):
                if got.get(key) is not None or key == "point":
                    p = self._layers_problem(f"{what}[{key!r}]", got.get(key))
                    out += [p] if p else []
        return out

    @staticmethod
    def _block_problem(what: str, t, name: str, p: torch.Tensor, rows_may_differ: bool) -> str | None:
        """`t`, a copy of block `p` (of adapter `name`) in a state: a floating tensor of `p`'s shape, or, for a B
        block, with other rows (a copy taken before `resize_token_embeddings` grew them: `_rows_as`)."""
        if not torch.is_tensor(t) or not t.is_floating_point():
            return f"{what} ({name}) is a {type(t).__name__ if not torch.is_tensor(t) else t.dtype}, " \
                   f"not a floating tensor"
        if t.ndim != p.ndim or (t.shape[1:] if rows_may_differ else t.shape) != (p.shape[1:] if rows_may_differ
                                                                                   else p.shape):
            return f"{what} ({name}) has shape {tuple(t.shape)}; its block is {tuple(p.shape)}"
        return None

    def _layers_problem(self, what: str, layers) -> str | None:
        """`layers`, a copy of every layer's shared blocks in a state (the kept merge point, a weight-conflict
        reference: `shared_parameters()` order per adapter), does not fit this model's adapters: why, else None."""
        if not isinstance(layers, (list, tuple)) or len(layers) != len(self.adapters):
            got = len(layers) if isinstance(layers, (list, tuple)) else type(layers).__name__
            return f"{what} is for {got} adapters; this model has {len(self.adapters)}"
        for i, (name, a, blocks) in enumerate(zip(self._adapter_names, self.adapters, layers)):
            own = a.shared_parameters()
            if not isinstance(blocks, (list, tuple)) or len(blocks) != len(own):
                got = len(blocks) if isinstance(blocks, (list, tuple)) else type(blocks).__name__
                return f"{what}[{i}] ({name}) holds {got} blocks; its shared A and B blocks are {len(own)}"
            nA = len(a.lora_A)
            for j, (t, p) in enumerate(zip(blocks, own)):
                bad = self._block_problem(f"{what}[{i}][{j}]", t, name, p, j >= nA)
                if bad:
                    return bad
        return None

    def load_state_dict(self, sd: dict) -> None:
        self._check_state(sd)  # before the router changes: a refused state leaves everything as it was
        mt = sd["multitask"]
        merged = [a for a in self.adapters if a.merged_rank]
        if mt["router"]["topology"] == "task" and merged:
            # (loaded, the rank change merged each layer again in the task topology: a ValueError from the first
            # layer's check_mergeable, with the controller in MULTI and every other layer still merged, the shared
            # delta in its base weight for every task)
            raise ValueError(f"ctrl.load_state_dict: the state is in MULTI/MIRROR, on the task adapters, and "
                             f"{len(merged)} of this model's {len(self.adapters)} adapters are merged "
                             f"into their base weights (merge_adapters); task adapters cannot be folded into one base "
                             f"weight. Call unmerge_adapters(model) first; nothing was loaded")
        super().load_state_dict(sd)  # (all or nothing: a load that fails midway puts the previous state back)

    def _load_parts(self, sd: dict) -> None:
        mt = sd["multitask"]
        self.router.load_state_dict(mt["router"])
        super()._load_parts(sd)
        dev = self.adapters[0].lora_A[0].device
        self.grad_ema = {int(s): g.to(dev, copy=True) for s, g in mt["grad_ema"].items()}  # not the caller's tensors
        # (a state saved before "grad_sq": the noise statistics start afresh at each task's next step, ρ = 0 there, as
        # for a new task; ḡ keeps its history, so ρ reads a little off for the few steps the EMA takes to turn over)
        self.grad_sq = {int(s): g.to(dev, copy=True) for s, g in mt.get("grad_sq", {}).items()}
        self._ref = [r.to(dev, copy=True) for r in mt["ref"]]
        # a file from before "ref_slots": its reference covers the tasks registered when it was saved
        self._ref_slots = {int(s) for s in mt.get("ref_slots", self._slots())}
        self.merge_rule = mt["merge_rule"]
        self.merge_log = [dict(e) for e in mt["merge_log"]]
        # (files from before the re-split: no merge held, no back-off)
        self.failed_merges = int(mt.get("failed_merges", 0))
        loads = self.router.task_loads  # the task adapters of this state: what a later load_task_adapters replaces
        pk = mt.get("parked")
        self._parked = None if pk is None else {
            "step": int(pk["step"]), "slots": [int(s) for s in pk["slots"]],
            "point": [[t.to(dev, copy=True) for t in layer] for layer in pk["point"]],
            "ref": None if pk.get("ref") is None else [[t.to(dev, copy=True) for t in layer] for layer in pk["ref"]],
            "loads": loads}
        cr = mt.get("conflict_ref")  # (files from before it: the tasks measured from the shared adapter)
        self._conflict_ref = None if cr is None else {
            "slots": [int(s) for s in cr["slots"]], "point": [[t.to(dev, copy=True) for t in layer]
                                                              for layer in cr["point"]], "loads": loads}

    def __setstate__(self, state: dict) -> None:
        """A controller pickled by an earlier version (`pickle`, `torch.load(weights_only=False)` of a whole
        controller) lacks the parts added since: each as a new controller starts it (no merge kept, no back-off,
        the default `resplit_window`); the base class adds its own."""
        for key, value in (("resplit_window", RESPLIT_WINDOW), ("_parked", None), ("_conflict_ref", None),
                           ("failed_merges", 0), ("_split_undo", None), ("_task_info", False), ("_local_loss", None),
                           ("grad_sq", {}), ("_grad_info", {}), ("total_steps", None),
                           ("_held_said", False)):
            state.setdefault(key, value)
        super().__setstate__(state)
        if "_ref_slots" not in self.__dict__:  # (its reference covers the tasks registered now)
            self._ref_slots = set(self._slots())


def _check_total_steps(total_steps):
    if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                    or total_steps < 1):
        raise ValueError(f"total_steps: the run's number of optimizer steps, an int >= 1 (or None: no merge is held "
                         f"back at the run's end), got {total_steps!r}")
    return total_steps


def setup_multitask_lora(
    model: nn.Module,
    tasks: Sequence[int | str],
    target_modules: Sequence[str] | str | None = None,
    *,
    rank_levels: Sequence[int] = (4, 8, 16),
    max_rank: int | None = None,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    scaling: str = "alpha_over_r",
    modules_to_save: Sequence[str] | None = None,
    spare_slots: int = 0,
    register_new_tasks: bool = False,
    signal: MultiTaskSignalConfig | None = None,
    merge_rule: str = "mean_factors",
    optimizer=None,
    lr_mode: str | None = None,
    mode_ranks: Sequence[int] | None = None,
    layer_kernel: str = "python",
    autocast_adapter_dtype: bool = True,
    **controller_kwargs,
) -> tuple[dict[str, MultiTaskNestedLoRALayer], MultiTaskController]:
    """Inject multi-task nested LoRA and build the `MultiTaskController` (the v3 setup's shape).
    `autocast_adapter_dtype`: as `setup_unified_lora`'s (fp32 shared and task blocks on a bf16/fp16 base)."""
    levels, mode_ranks, actuators = _setup_ranks(setup_multitask_lora, rank_levels, mode_ranks, lr_mode,
                                                 controller_kwargs)  # (as setup_unified_lora)
    cfg = NestedLoRAConfig(target_modules=target_modules, rank_levels=levels, max_rank=max_rank, lora_alpha=lora_alpha,
                           lora_dropout=lora_dropout, scaling=scaling, modules_to_save=modules_to_save,
                           initial_rank=mode_ranks[1], kernel=layer_kernel,
                           autocast_adapter_dtype=autocast_adapter_dtype)
    with undone_on_error(model):  # a bad controller argument leaves the model unwrapped, so a retry can run
        adapters, router = inject_multitask_lora(model, cfg, tasks, spare_slots, register_new_tasks)
        extra, owners = extra_parameters(model)
        ctrl = MultiTaskController(adapters, router, optimizer=optimizer, signal=signal, merge_rule=merge_rule,
                                   actuators=actuators, extra_params=extra, **controller_kwargs)
        ctrl._extra_owners = owners
    warn_frozen_head(model)
    return adapters, ctrl


# ---------------------------------------------------------------------------------------- saving


def _safe(tid) -> str:
    """A file or folder name for task `tid`: every character but letters, digits and `_.-` replaced by `_`, and a
    name of dots alone (or none) by underscores, so that an id "..", "." or "" never names the parent folder or
    the folder itself (an export of task ".." was written beside `save_dir`, "." and "" into it)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(tid))[:64]
    return name if name.strip(".") else "_" * max(len(name), 1)


def _bare(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel and `MultiTaskModel` wrappers: files name its modules as the bare model
    does, so a file saved from a wrapped model loads into a bare one (and a PEFT export matches a fresh base)."""
    while True:
        inner = unwrap_model(model)
        inner = inner.model if isinstance(inner, MultiTaskModel) else inner
        if inner is model:
            return model
        model = inner


def _layers(model) -> dict[str, MultiTaskNestedLoRALayer]:
    model = _bare(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MultiTaskNestedLoRALayer)}
    if not layers:
        raise ValueError("model: has no multi-task adapters")
    return layers


@torch.no_grad()
def save_task_adapters(model: nn.Module, save_dir: str | os.PathLike) -> dict[str, str]:
    """Write `shared.safetensors` and one `task-<slot>-<id>.safetensors` per registered task
    (full nested factors: `<layer>.lora_A` (max_rank × in), `<layer>.lora_B` (out × max_rank)),
    plus `tasks.json` (ids, files, rank levels, scaling). Returns {task id or 'shared': path}.
    `model` may be wrapped (DDP, `MultiTaskModel`): names are the bare model's. It runs no collective; under DDP
    call it on one process, or on every one into one folder (each file is written under a temporary name and
    renamed, so a reader never sees a half-written file). `tasks.json`, written last, holds a SHA-256 of each
    file's tensors: `load_task_adapters` refuses a folder whose files come from different saves (one interrupted,
    or under way)."""
    from safetensors.torch import save_file

    layers = _layers(model)
    router = next(iter(layers.values())).router
    os.makedirs(save_dir, exist_ok=True)
    any_layer = next(iter(layers.values()))
    meta = {"boundaries": list(any_layer.boundaries), "rank": any_layer.rank, "lora_alpha": any_layer.lora_alpha,
            "scaling": any_layer.scaling_kind, "topology": router.topology, "n_slots": router.n_slots}

    def dump(fname, getA, getB, extra):
        tensors = {}
        for n, l in layers.items():
            tensors[f"{n}.lora_A"] = getA(l).detach().contiguous().cpu()
            tensors[f"{n}.lora_B"] = getB(l).detach().contiguous().cpu()
        path = os.path.join(save_dir, fname)
        with written_atomically(path) as tmp:
            save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in dict(meta, **extra).items()})
        digests[fname] = _tensors_digest(tensors)
        return path

    digests: dict[str, str] = {}
    paths = {"shared": dump("shared.safetensors", lambda l: l.full_A(), lambda l: l.full_B(), {"task": None})}
    index = {"meta": meta, "shared": "shared.safetensors", "tasks": []}
    for tid, slot in router.slots.items():
        fname = f"task-{slot}-{_safe(tid)}.safetensors"
        paths[str(tid)] = dump(fname, lambda l, s=slot: torch.cat(list(l.lora_tasks[s].lora_A), 0),
                               lambda l, s=slot: torch.cat(list(l.lora_tasks[s].lora_B), 1), {"task": tid})
        index["tasks"].append({"id": tid, "slot": slot, "file": fname})
    index["tensors_sha256"] = digests  # written last, with the index: which tensors belong to this save
    with written_atomically(os.path.join(save_dir, "tasks.json")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    return paths


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors (names, dtypes, shapes, bytes), not of the file: safetensors writes its metadata in
    an order that differs from process to process, so two processes saving the same weights (DDP, each into one
    folder) write different bytes."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def load_task_adapters(model: nn.Module, save_dir: str | os.PathLike) -> None:
    """Inverse of `save_task_adapters` (same model architecture and targets); also restores the
    saved topology and active rank, so outputs match the saved model's (a `MultiTaskController` in the other kind
    of mode then refuses to step). Everything is checked before anything is written: the rank levels, `lora_alpha`
    and scaling (other values would give other outputs), every layer's tensors and shapes, no tensors for a layer
    the model does not adapt, and the task ids (an unknown one is a ValueError, or
    takes a spare slot with `register_new_tasks=True`). A layer merged into its base weight is
    unmerged first, and merged again after the load when the saved topology is the shared one."""
    from safetensors.torch import load

    layers = _layers(model)
    router = next(iter(layers.values())).router
    with open(os.path.join(save_dir, "tasks.json"), encoding="utf-8") as f:
        index = json.load(f)
    digests = index.get("tensors_sha256", {})  # folders saved before the digests were kept have none
    meta = index["meta"]
    for n, l in layers.items():
        saved = (tuple(meta["boundaries"]), float(meta["lora_alpha"]), meta["scaling"])
        here = (l.boundaries, l.lora_alpha, l.scaling_kind)
        if saved != here:
            raise ValueError(f"{save_dir}: saved with rank levels {saved[0]}, lora_alpha={saved[1]:g}, scaling="
                             f"{saved[2]!r}; layer {n!r} has {here[0]}, lora_alpha={here[1]:g}, scaling={here[2]!r}")
    new = [e["id"] for e in index["tasks"] if e["id"] not in router.slots]
    if new and not router.register_new_tasks:
        raise ValueError(f"task id {new[0]!r} in {save_dir} is not registered; known task ids: {router.task_ids}")
    if len(router.slots) + len(new) > router.n_slots:
        raise ValueError(f"{save_dir}: task ids {new} are not registered and only {router.n_slots - len(router.slots)} "
                         f"spare slots are free (known task ids: {router.task_ids})")

    def read(fname):
        with open(os.path.join(save_dir, fname), "rb") as f:
            data = f.read()
        t = load(data)
        if fname in digests and _tensors_digest(t) != digests[fname]:
            raise ValueError(f"{os.path.join(save_dir, fname)}: not the file tasks.json was saved with (its tensors' "
                             "SHA-256 differs): the folder mixes files of different saves, from a save that was "
                             "interrupted or is still under way. Save the adapters again (or wait for the save to "
                             "finish)")
        for n, l in layers.items():
            want = {f"{n}.lora_A": (l.max_rank, l.in_features), f"{n}.lora_B": (l.out_features, l.max_rank)}
            for k, shape in want.items():
                if k not in t:
                    raise ValueError(f"{fname}: no tensor {k!r}; saved from another model?")
                if tuple(t[k].shape) != shape:
                    raise ValueError(f"{fname}: {k} is {tuple(t[k].shape)}, the layer needs {shape}")
        # a layer of the file that this model has no adapter on: its trained delta would be dropped, silently
        extra = sorted({k.rsplit(".", 1)[0] for k in t} - set(layers))
        if extra:
            raise ValueError(f"{fname}: adapters for {len(extra)} layer(s) this model has no multi-task adapter on: "
                             f"{extra[:5]}{' ...' if len(extra) > 5 else ''}; it was saved from a model with other "
                             f"target modules. Build this model with the same target_modules as the saved one")
        return t

    files = {None: read(index["shared"])}
    files.update({e["id"]: read(e["file"]) for e in index["tasks"]})

    def put(t, blocksA, blocksB):
        for n, l in layers.items():
            A, B = t[f"{n}.lora_A"], t[f"{n}.lora_B"]
            starts = (0,) + l.boundaries[:-1]
            for i, (s, e) in enumerate(zip(starts, l.boundaries)):
                blocksA(l)[i].copy_(A[s:e])
                blocksB(l)[i].copy_(B[:, s:e])

    # the adapters are the user's choice from here: a controller's kept merge goes (`_drop_kept_after_a_load`)
    router.task_loads += 1
    merged = [l for l in layers.values() if l.merged_rank]
    for l in merged:  # the base weight holds the old shared delta; take it out before the blocks change
        l.unmerge()
    put(files[None], lambda l: l.lora_A, lambda l: l.lora_B)
    for e in index["tasks"]:
        slot = router.slot(e["id"])
        put(files[e["id"]], lambda l, s=slot: l.lora_tasks[s].lora_A, lambda l, s=slot: l.lora_tasks[s].lora_B)
    router.set_topology(meta["topology"])
    for l in layers.values():
        l.set_rank(meta["rank"])
    if router.topology == "shared":
        for l in merged:
            l.merge()


@contextlib.contextmanager
def _task_as_shared(layers: Iterable[MultiTaskNestedLoRALayer], slot: int):
    """Temporarily put task `slot`'s blocks in the shared blocks (restored exactly on exit)."""
    layers = list(layers)
    saved = [[p.detach().clone() for p in l.shared_parameters()] for l in layers]
    topo = layers[0].router.topology
    try:
        with torch.no_grad():
            for l in layers:
                for dst, src in zip(l.shared_parameters(), l.task_parameters(slot)):
                    dst.copy_(src)
        layers[0].router.set_topology("shared")
        yield
    finally:
        with torch.no_grad():
            for l, sv in zip(layers, saved):
                for dst, src in zip(l.shared_parameters(), sv):
                    dst.copy_(src)
        layers[0].router.set_topology(topo)


TASK_EXPORT_MANIFEST = "peft_tasks.json"
# the files each PEFT export writes anew: not copied from the previous task folder into the new one
_PEFT_WRITTEN = ("adapter_config.json", "adapter_model.safetensors")
_SHARED = object()  # the shared adapter, where a task folder holds a task id


def _held(holder) -> str:
    return "the shared adapter" if holder is _SHARED else f"the adapter of task {holder!r}"


def export_task_peft_adapters(model: nn.Module, save_dir: str | os.PathLike, rank: int | None = None,
                              tasks: Sequence[int | str] | None = None, include_shared: bool = True,
                              **kwargs) -> dict[str, dict]:
    """One PEFT LoRA checkpoint per task, in `save_dir/<task id>/` (and `save_dir/shared/`), via
    `unified_lora.peft_io.export_peft_adapter`; each loads with `PeftModel.from_pretrained(base, dir)`
    and gives that task's outputs. The folder name is the id with every character but letters, digits
    and `_.-` replaced by `_` (and an id of dots alone, or empty, by underscores: `..` is `__`, never the
    parent folder); ids that would share a folder (with each other, with `shared` or with the manifest) are a
    ValueError, before anything is written. Returns {folder name: adapter config}. `kwargs` go to
    `export_peft_adapter`. A classifier that is itself a LoRA target (each task's own head delta)
    is saved whole in each task's checkpoint (`modules_to_save`), its base weights with that task's
    delta merged in: PEFT puts no LoRA on a head it saves whole, and a base model loaded afresh
    would not have the frozen head weights this model was trained on. `model` may be wrapped (DDP,
    `MultiTaskModel`): the checkpoints name the bare model's modules. It runs no collective: under DDP,
    call it on one process (rank 0).

    The folders are written as one set: all of them into a temporary folder in `save_dir` first (flushed to the
    disk), then swapped in, each previous folder moved aside before its new one is renamed in, and the manifest
    `save_dir/peft_tasks.json` (the set's folder names and task ids) last. The set is the folders that manifest
    lists: the folders an export writes replace theirs as one, and a folder of the previous set that this one does
    not write (a task left out with `tasks=`) stays as it was (a link to a folder too), and stays listed; one the
    manifest lists with another adapter than this export would write (task `shared`'s and the shared adapter, ids
    `a b` and `a_b`) is a ValueError, before anything is written; a folder named like a new one that no
    manifest listed (yours, or an export from before the manifest) is replaced. Anything else in `save_dir` is yours and stays, and so do
    your files inside a task folder (a `README.md` there is amended, as PEFT does). An error or interrupt while
    writing, or while swapping (a rename that fails), leaves the previous set as it was (the swap undone) and no
    temporary folder, and a `save_dir` (or folder above it) this export made is removed; a process killed (SIGKILL, a
    power loss) during the swap leaves it part way, and the next export into `save_dir` on this host finishes it
    first. One export into a `save_dir` at a time."""
    from .peft_io import export_peft_adapter

    model = _bare(model)
    layers = _layers(model)
    router = next(iter(layers.values())).router
    tasks = router.task_ids if tasks is None else list(dict.fromkeys(_check_task_id(t) for t in tasks))
    slots = {t: router.known_slot(t) for t in tasks}  # before writing anything; never registers a new task
    folders: dict[str, list] = {"shared": ["the shared adapter"]} if include_shared else {}
    folders.setdefault(TASK_EXPORT_MANIFEST, [])
    for t in tasks:
        folders.setdefault(_safe(t), []).append(t)
    clashes = [f"{', '.join(map(repr, ts))} -> {name!r}" for name, ts in folders.items()
               if len(ts) > 1 or (ts and name == TASK_EXPORT_MANIFEST)]
    if clashes:
        raise ValueError(f"export_task_peft_adapters: these would be written to the same folder of {save_dir}, one "
                         f"overwriting the other (or over the manifest {TASK_EXPORT_MANIFEST}): {'; '.join(clashes)}. "
                         f"Export them apart, e.g. export_task_peft_adapters(model, other_dir, tasks=[...], "
                         f"include_shared=False)")
    del folders[TASK_EXPORT_MANIFEST]
    if not folders:  # nothing to write: the folder, and the set in it, stay as they are
        return {}
    save_dir = os.fspath(save_dir)
    for name in folders:
        here = os.path.join(save_dir, name)
        if os.path.lexists(here) and not os.path.isdir(here):
            raise ValueError(f"{here}: is a file, not a folder; the export writes a folder of that name there. Move "
                             "the file, or export into another folder")
    made = missing_folders(save_dir)
    tmp = None
    try:  # (a failure anywhere below: no folder this export made, no temporary folder, the previous set whole)
        make_folder(save_dir)
        _settle_task_exports(save_dir)  # a swap killed part way: finished, before the previous set is read
        remove_dead_leftovers(save_dir)
        # the previous set (one that cannot be read is refused before anything is written): its folders this export
        # does not write (tasks left out with `tasks=`, or `shared` with include_shared=False) stay in the set,
        # untouched (a link to a folder, where you moved one, too: the swap leaves it, and what it points to, alone)
        prev_tasks: dict = {}
        listed = _read_task_manifest(save_dir, prev_tasks)
        kept = [n for n in listed if n not in folders and os.path.isdir(os.path.join(save_dir, n))]
        # a folder of the previous set that this export would fill with another adapter (task "shared"'s and the
        # shared adapter, or two ids of one folder name, exported by different calls) is refused, as it is in one call
        what = {n: _SHARED if include_shared and n == "shared" else ts[0] for n, ts in folders.items()}
        held = {n: prev_tasks.get(n, _SHARED) for n in listed
                if n in what and os.path.isdir(os.path.join(save_dir, n))}
        clashes = [f"{n!r} holds {_held(held[n])}, this export writes {_held(what[n])}" for n in held
                   if held[n] != what[n]]
        if clashes:
            raise ValueError(f"export_task_peft_adapters: a folder of the set in {save_dir} (peft_tasks.json) holds "
                             f"another adapter than this export would write there: {'; '.join(clashes)}. Export into "
                             "another folder, or move that folder away first")
        tmp = tempfile.mkdtemp(prefix=temp_prefix(), dir=save_dir)

        def into(name):
            """The new folder of `name`: your files in its previous one first (not PEFT's own, written anew)."""
            mine, new = os.path.join(save_dir, name), os.path.join(tmp, name)
            if os.path.isdir(mine):
                shutil.copytree(mine, new, symlinks=True, ignore=lambda d, names: [
                    n for n in names
                    if os.path.samefile(d, mine) and (n in _PEFT_WRITTEN or n.startswith(".tmp-"))])
            return new

        out = {}
        if include_shared:
            topo = router.topology
            router.set_topology("shared")
            try:
                out["shared"] = export_peft_adapter(model, layers, into("shared"), rank, **kwargs)
            finally:
                router.set_topology(topo)
        with _unmerged(layers.values()):  # a merged base weight holds the shared delta, not a task's
            for t in tasks:
                name = _safe(t)
                with _task_as_shared(layers.values(), slots[t]):
                    out[name] = export_peft_adapter(model, layers, into(name), rank, **kwargs)
        manifest = {"written_by": "unified_lora.multitask.export_task_peft_adapters", "folders": [*folders, *kept],
                    "tasks": {**{n: t for n, t in prev_tasks.items() if n in kept}, **{_safe(t): t for t in tasks}}}
        with open(os.path.join(tmp, TASK_EXPORT_MANIFEST), "w", encoding="utf-8") as f:  # last: the set is whole
            json.dump(manifest, f, indent=2)
        fsync_tree(tmp)
        _swap_in_task_set(save_dir, tmp)
    except BaseException:
        if tmp is not None:
            _undo_task_swap(save_dir, tmp, folders)
        remove_made_folders(made)  # (a folder this export made: a failed one leaves none behind)
        raise
    return out


def _read_task_manifest(folder, tasks: dict | None = None) -> list[str]:
    """The folder names `folder/peft_tasks.json` lists ([] without one); `tasks`, if given, is filled with its
    {folder: task id}. One that is not an export's manifest, or names something other than a plain folder name, is a
    ValueError: the swap moves the folders it names aside."""
    path = os.path.join(folder, TASK_EXPORT_MANIFEST)
    if not os.path.lexists(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        names = manifest["folders"]
        if tasks is not None:
            tasks.update({n: t for n, t in dict(manifest.get("tasks", {})).items() if n in names})
        if not isinstance(names, list) or not all(isinstance(n, str) and n == _safe(n) and n != TASK_EXPORT_MANIFEST
                                                  and not n.startswith((".tmp-", ".old-")) for n in names):
            raise ValueError("its folders are not a list of task folder names")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not the manifest export_task_peft_adapters writes ({type(e).__name__}: {e}); "
                         "move or delete it, or export into another folder") from None
    return names


def _swap_paths(save_dir: str, tmp: str) -> tuple[str, str, str, str]:
    """A set swap's folder for the previous set's copies (`.old-<tmp's suffix>`), and the manifest in `save_dir`, in
    `tmp` (the new set's) and in that folder (the previous set's)."""
    old = os.path.join(save_dir, ".old-" + os.path.basename(tmp)[len(".tmp-"):])
    return (old, *(os.path.join(d, TASK_EXPORT_MANIFEST) for d in (save_dir, tmp, old)))


def _swap_in_task_set(save_dir: str, tmp: str) -> None:
    """Move the complete set in `tmp` (its manifest in it) into `save_dir`: the previous set's manifest and each
    folder of the previous set or of a new folder's name into `.old-<tmp's suffix>` first, each new folder in after
    the old one of its name went, the manifest last; then the old copies go. Every step checks what is done, so a
    call killed part way is finished by calling it again (`_settle_task_exports`)."""
    old, man, man_new, man_old = _swap_paths(save_dir, tmp)
    os.makedirs(old, exist_ok=True)
    fsync_dir(save_dir)
    if os.path.lexists(man) and not os.path.lexists(man_old):
        os.replace(man, man_old)  # the previous set's list, read again by a call that finishes this one
    new = _read_task_manifest(tmp)
    for name in dict.fromkeys(_read_task_manifest(old) + new):
        here, fresh, aside = (os.path.join(d, name) for d in (save_dir, tmp, old))
        if (os.path.isdir(here) and not os.path.islink(here) and not os.path.lexists(aside)
                and (name not in new or os.path.lexists(fresh))):  # (else `here` is the new one, already in)
            os.replace(here, aside)
        elif os.path.islink(here) and (name not in new or os.path.lexists(fresh)):
            os.replace(here, aside)  # a link where a task folder goes: the link goes, never what it points to
        if os.path.lexists(fresh):
            os.replace(fresh, here)
    fsync_dir(save_dir)
    os.replace(man_new, man)
    fsync_dir(save_dir)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


def _undo_task_swap(save_dir: str, tmp: str, written) -> None:
    """After an export failed while writing `tmp` or while `_swap_in_task_set(save_dir, tmp)` ran (a rename that
    failed, an interrupt): put the previous set back, each new folder (of the names `written`; not those of the
    previous set the export kept, which the swap leaves where they are) it moved in back out, each folder it moved
    aside back in, the previous manifest last, then delete `tmp` and the `.old-` folder. Where the new manifest is in
    place, the swap was done: those two alone go. A step of this that fails too leaves both folders as they are, for
    the next export on this host to finish the swap once this process is gone (`_settle_task_exports`)."""
    old, man, man_new, man_old = _swap_paths(save_dir, tmp)
    if os.path.isdir(old) and os.path.lexists(man_new):
        try:
            for name in dict.fromkeys([*_read_task_manifest(old), *written]):
                here, fresh, aside = (os.path.join(d, name) for d in (save_dir, tmp, old))
                if name in written and not os.path.lexists(fresh) and os.path.lexists(here):
                    os.replace(here, fresh)  # the new folder, moved in: out again
                if os.path.lexists(aside):
                    os.replace(aside, here)
            if os.path.lexists(man_old):
                os.replace(man_old, man)
            fsync_dir(save_dir)
        except (OSError, ValueError):
            return
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


def _settle_task_exports(save_dir: str) -> None:
    """Finish the set swaps that processes of this host, now gone, were killed in (`.old-<host>-<pid>-*` beside its
    `.tmp-` folder): the new set is complete (written whole before the swap began), so it goes in."""
    for name in sorted(os.listdir(save_dir)):
        if not left_by_dead_process(name, ".old"):
            continue
        tmp = os.path.join(save_dir, ".tmp-" + name[len(".old-"):])
        if os.path.isfile(os.path.join(tmp, TASK_EXPORT_MANIFEST)):
            _swap_in_task_set(save_dir, tmp)
        else:  # the new manifest is in place: only the old copies were left to delete
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _unmerged(layers: Iterable[MultiTaskNestedLoRALayer]):
    """Temporarily unmerge merged layers; their base weights are restored bit for bit on exit."""
    merged = [(lay, lay.merged_rank, lay.base_layer.weight.detach().clone(), lay._premerge)
              for lay in layers if lay.merged_rank]
    try:
        for lay, *_ in merged:
            lay.unmerge()
        yield
    finally:
        with torch.no_grad():
            for lay, r, w, kept in merged:
                lay.base_layer.weight.copy_(w)
                lay.merged_rank, lay._premerge = r, kept


__all__ = [
    "export_task_peft_adapters",
    "TaskRouter", "task_context", "MultiTaskModel", "per_task_losses", "find_router",
    "MultiTaskNestedLoRALayer", "inject_multitask_lora", "setup_multitask_lora",
    "MultiTaskSignalConfig", "MultiTaskSignal", "MultiTaskController",
    "save_task_adapters", "load_task_adapters", "MERGE_RULES",
]
