"""Mirror: snapshot adapter weights on entry, decide on exit whether to roll back.

v3 model card rule (the default policy): relative drift
    drift = Σ‖W − W_snap‖ / Σ‖W_snap‖   over every A and B block
below 5 % means the stress was transient noise → restore the snapshot; above
it the change was a real signal → keep the new weights. Other policies:
"never", "always", and "loss_worse" (restore if the loss EMA at exit is higher
than at entry).

Two kernels do the copies and the drift (`MirrorConfig.kernel`). "eager" (the
default) uses torch ops on any device, over parameters packed into one buffer
at the first snapshot (`MirrorConfig.pack`; see `MirrorSnapshot`), so that
save, drift and restore are one op each. "fused" uses C++ kernels for contiguous
fp32/bf16/fp16 CPU tensors (`csrc/mirror_fused.cpp`, built when the snapshot
object is created, i.e. with the controller): memcpy for save and restore, and one pass that reads W and W_snap in
place for the drift. Both give the same snapshot and the same rollback, bit for
bit; the drift agrees to fp32 rounding. Where the kernels cannot take the tensors at
drift or restore (a parameter cast, moved or re-viewed since the snapshot), that call
runs the eager computation instead, with the eager result.

The drift accumulates in fp32 for fp32/bf16/fp16 weights and in fp64 for fp64 ones; a
parameter cast to a wider dtype since the snapshot is compared in the wider dtype.
With `snapshot_optimizer=True` every entry of each parameter's optimizer state is saved
(tensors copied, other values deep-copied) and a restore makes that state equal the saved
one exactly, for any optimizer.

Errors: drift and restore raise `ValueError` naming the parameter for a parameter list
longer than the snapshot or a parameter whose shape changed since the save, before
anything is written.
"""

from __future__ import annotations

import copy
import itertools
import math
import operator
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist

from .config import MirrorConfig
from .distributed import like_sharded, local_tensor, shard_group


_PACKED_ATTR = "_unified_lora_packed"  # set on a parameter that `MirrorSnapshot` moved into a packed buffer


def unshare_packed_state(module: torch.nn.Module, state_dict, prefix: str, local_metadata) -> None:
    """`state_dict` post-hook: an entry of a packed parameter (a view of the buffer it shares with the other
    packed parameters) becomes a copy of its own. Serialisers that find tied weights by their storage would
    otherwise take every packed tensor for one weight: accelerate's `save_state` and `save_model` kept one of
    them and dropped the rest. `keep_vars=True` entries (the Parameters themselves) are left as they are."""
    for name, p in module.named_parameters():
        if getattr(p, _PACKED_ATTR, False):
            v = state_dict.get(prefix + name)
            if type(v) is torch.Tensor and v.untyped_storage().nbytes() != v.numel() * v.element_size():
                state_dict[prefix + name] = v.clone()


def watch_state_dict(module: torch.nn.Module) -> None:
    """Register `unshare_packed_state` on `module` (once). Through the private API, which torch 2.4 has too: the
    public `register_state_dict_post_hook` came in 2.5; a hook that returns None means the same under both."""
    if unshare_packed_state not in module._state_dict_hooks.values():
        module._register_state_dict_hook(unshare_packed_state)


@dataclass
class MirrorDecision:
    restore: bool
    drift: float
    loss_at_entry: float | None
    loss_at_exit: float | None
    policy: str


def should_restore(policy: str, drift: float, threshold: float, loss_at_entry, loss_at_exit) -> bool:
    if policy == "drift":
        return drift < threshold
    if policy == "never":
        return False
    if policy == "always":
        return True
    if policy == "loss_worse":
        return loss_at_entry is not None and loss_at_exit is not None and loss_at_exit > loss_at_entry
    raise ValueError(f"policy: unknown Mirror policy {policy!r}")


_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MIN_ROW = 64  # narrowest row of a flat pool; smaller tensors are zero-padded to one row
_MAX_OWNER = 1 << 20  # the largest ownership matrix (rows × tensors, fp32: 4 MiB) the eager drift builds
_SIG = operator.attrgetter("shape", "dtype")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The drift's accumulation dtype: fp32 for fp32/bf16/fp16 weights, fp64 for fp64 ones (at least the
    weights' own precision; linalg.vector_norm refuses to narrow fp64 to fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bump_versions(tensors: list[torch.Tensor]) -> None:
    """Count a write through a shared buffer as an in-place op on each tensor (what
    torch.autograd.graph.increment_version does); one call for the list where torch takes one."""
    try:
        torch._C._increment_version(tensors)
    except TypeError:  # torch before list support: one tensor a call
        for t in tensors:
            torch._C._increment_version(t)


def _copy_opt_state(states: list[dict | None] | None, device=None) -> list[dict | None] | None:
    """A copy of a snapshot's optimizer state: tensors copied (to `device`, if given; an FSDP2 moment, a DTensor, as
    this process's shard), other values deep-copied."""
    return None if states is None else [
        None if st is None else {k: (local_tensor(v).detach().to(device=device, copy=True) if torch.is_tensor(v)
                                     else copy.deepcopy(v))
                                 for k, v in st.items()}
        for st in states]


class _Prefix(NamedTuple):
    """Views of a pool over the rows of its first tensors (see `_FlatPool.prefix`)."""

    live: torch.Tensor | None  # the packed buffer these views were taken from (None: unpacked)
    live_rows: torch.Tensor | None
    snap: torch.Tensor
    scratch: torch.Tensor | None
    both: torch.Tensor | None
    owner: torch.Tensor | None
    norms: torch.Tensor | None
    row_owner: torch.Tensor | None
    row_sq: torch.Tensor | None  # [2, rows] fp32: the squared row norms of scratch and snap


class _FlatPool:
    """The snapshot of the tensors of one (device, dtype), in one contiguous buffer with a scratch twin.

    `both` is a [2, rows, width] buffer: `scratch` = both[0] takes W − W_snap at the drift, `snap` =
    both[1] holds W_snap. Every tensor starts on a row boundary and fills ceil(numel / width)
    rows; the rest of its last row is zero padding, which stays zero in both halves and so adds
    nothing to a norm. `width` is the gcd of the tensor sizes (at least 64), so nested LoRA blocks
    pack without padding (MiniLM: 1536). The per-tensor norms of W − W_snap and of W_snap then come
    from one contiguous subtraction and the row norms of both halves (one kernel on a GPU, one call per
    half on the CPU), not from one kernel per tensor, and a prefix of the tensors (the controller
    measures drift over the LoRA blocks only) is a prefix of the rows.
    """

    def __init__(self, shapes: list[torch.Size], device, dtype, scratch: bool = True):
        self.shapes = [torch.Size(s) for s in shapes]
        self.dtype = dtype
        self.sig = [(s, dtype) for s in self.shapes]  # what a tensor laid out here looks like (see `matches`)
        numels = [math.prod(s) for s in shapes]
        big = [n for n in numels if n >= _MIN_ROW]
        self.width = max(_MIN_ROW, math.gcd(*big)) if big else _MIN_ROW
        rows = [max(1, -(-n // self.width)) for n in numels]
        self.row_end = list(itertools.accumulate(rows))
        # without scratch (the fused kernels read W in place) the pool is the snapshot alone
        self.both = torch.zeros(1 + scratch, self.row_end[-1], self.width, device=device, dtype=dtype)
        self.scratch, self.snap = (self.both[0], self.both[1]) if scratch else (None, self.both[0])
        # row norms come out as [‖W − W_snap‖, ‖W_snap‖]
        self._places = [((e - r) * self.width, n, sh) for e, r, n, sh in zip(self.row_end, rows, numels, shapes)]
        self.snap_views = self.views_of(self.snap)
        self.scratch_views = self.views_of(self.scratch) if scratch else []
        self._prefixes: dict[int, _Prefix] = {}
        if scratch:  # eager drift only: the owning tensor of each row (squared row norms sum per tensor)
            acc = _acc_dtype(dtype)
            self.row_owner = torch.repeat_interleave(torch.arange(len(rows), device=device),
                                                     torch.tensor(rows, device=device))
            self.norms = torch.zeros(2, len(rows), device=device, dtype=acc)
            self.row_sq = torch.zeros(2, self.row_end[-1], device=device, dtype=acc)
            # The per-tensor sums as one GEMM with the 0/1 [rows, tensors] ownership matrix where it is small
            # (one kernel, where zero_ + index_add_ are two); index_add_ otherwise.
            self.owner = None
            if self.row_end[-1] * len(rows) <= _MAX_OWNER:
                self.owner = torch.zeros(self.row_end[-1], len(rows), device=device, dtype=acc)
                self.owner[torch.arange(self.row_end[-1], device=device), self.row_owner] = 1.0

    def matches(self, params: Sequence[torch.Tensor]) -> bool:
        """Every tensor of `params` (a prefix) has the shape and dtype it has in this pool."""
        n = len(params)
        return list(map(_SIG, params)) == (self.sig if n == len(self.sig) else self.sig[:n])

    def views_of(self, buf: torch.Tensor) -> list[torch.Tensor]:
        """One view per tensor of a [rows, width] buffer laid out like this pool."""
        flat = buf.view(-1)
        return [flat[s:s + n].view(sh) for s, n, sh in self._places]

    def prefix(self, count: int, live: torch.Tensor | None) -> _Prefix:
        """The views of this pool (and of `live`) that the first `count` tensors use, built once and
        cached: at adapter sizes a Mirror cycle costs about as much in per-op host time as in bytes."""
        got = self._prefixes.get(count)
        if got is None or got.live is not live:
            rows = self.row_end[count - 1]
            eager = self.scratch is not None
            got = _Prefix(live, None if live is None else live[:rows], self.snap[:rows],
                          self.scratch[:rows] if eager else None, self.both[:, :rows] if eager else None,
                          self.owner[:rows, :count] if eager and self.owner is not None else None,
                          self.norms[:, :count] if eager else None, self.row_owner[:rows] if eager else None,
                          self.row_sq[:, :rows] if eager else None)
            self._prefixes[count] = got
        return got

    @staticmethod
    def squared_row_norms(v: _Prefix, per_half: bool) -> torch.Tensor:
        """[2, rows] squared row norms of scratch (W − W_snap) and snap, in the pool's accumulation dtype
        (fp32, or fp64 for an fp64 pool).

        per_half (the CPU): one norm call per half. A CPU op splits its output among its threads, so one
        call over [2, rows, width] hands all of scratch to one thread, half of it just written by the other
        thread's subtraction, and those cross-core reads cost (BENCHMARKS, Performance 11.). Each row is
        reduced the same way in both forms, so the values are the same. Otherwise (a GPU, launch-bound at
        adapter sizes) one kernel over both halves."""
        acc = v.row_sq.dtype
        if not per_half:
            return torch.linalg.vector_norm(v.both, dim=2, dtype=acc).square_()
        torch.linalg.vector_norm(v.scratch, dim=1, dtype=acc, out=v.row_sq[0])
        torch.linalg.vector_norm(v.snap, dim=1, dtype=acc, out=v.row_sq[1])
        return v.row_sq.square_()

    def drift_terms(self, params: Sequence[torch.Tensor], live: torch.Tensor | None = None) -> torch.Tensor:
        """[Σ‖W − W_snap‖, Σ‖W_snap‖] over `params`, the first tensors of this pool: fp32
        accumulation (fp64 for an fp64 pool), no allocation beyond the row norms, no sync. `live`: the
        packed buffer that `params` are views of (then W − W_snap is one subtraction, no gather);
        otherwise W is gathered into the scratch, cast to the pool's dtype."""
        v = self.prefix(len(params), live)
        if live is None:
            torch._foreach_copy_(self.scratch_views[:len(params)], params)
            v.scratch.sub_(v.snap)
        elif live.device == self.scratch.device:
            torch.sub(v.live_rows, v.snap, out=v.scratch)
        else:  # snapshot offloaded to the CPU: one device-to-host copy of the packed buffer
            v.scratch.copy_(v.live_rows)
            v.scratch.sub_(v.snap)
        sq = self.squared_row_norms(v, per_half=v.scratch.device.type == "cpu")
        if v.owner is not None:
            return torch.mm(sq, v.owner, out=v.norms).sqrt_().sum(1)
        return v.norms.zero_().index_add_(1, v.row_owner, sq).sqrt_().sum(1)

    def terms_in(self, dtype: torch.dtype, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """`drift_terms(params)` computed in a temporary eager pool of `dtype` with this pool's layout and
        snapshot: for parameters cast to a wider dtype since the save (W − W_snap in that dtype), and for
        the fused kernels' fallback (a fused pool has no scratch). With `dtype` = this pool's dtype the
        result is the one an eager pool of this layout gives, bit for bit."""
        tmp = _FlatPool(self.shapes, self.snap.device, dtype)
        tmp.snap.copy_(self.snap)  # same layout (zero padding included); a widening cast is exact
        return tmp.drift_terms(params)


class MirrorSnapshot:
    """Holds one snapshot of a list of parameters (and optionally their optimizer state).

    The weights live in flat pools (`_FlatPool`, one per device and dtype), allocated at the first
    entry and reused by every later entry while the parameter shapes stay the same: re-copying
    into warm buffers avoids fresh allocations (page faults) at every entry, at the cost of keeping
    two adapter-sized buffers outside Mirror (one with kernel="fused", which needs no scratch).
    `weights` are views into the pools, in the order of the parameters given to `save`.

    Packing (kernel="eager", `MirrorConfig.pack`, on by default): at the first `save`, the parameters
    of each pool move into one live buffer with the pool's layout; each `p.data` becomes a view of
    it. The Parameter objects, their values, gradients and optimizer state stay as they were. Save
    and restore are then one copy between two buffers and the drift one subtraction, where they
    were one op per tensor. A group is packed only if every parameter in it is a plain contiguous
    tensor on one device that owns its whole storage (or already lives in a buffer of ours), and no
    two share one; otherwise (tied weights, FSDP's flat views, tensor subclasses) nothing in that
    group moves and its copies stay per tensor. Every call checks the parameters' data pointers
    first, so a parameter moved or replaced since (`.to()`, `load_state_dict(assign=True)`) takes
    the per-tensor path and is re-packed at the next `save`. A restore bumps the parameters'
    version counters, as an in-place op would, so autograd still catches a pending backward.
    """

    def __init__(self, config: MirrorConfig | None = None):
        self.config = config or MirrorConfig()
        self.weights: list[torch.Tensor] | None = None
        self.opt_state: list[dict | None] | None = None
        # per parameter, for each tensor in opt_state: None if it lived on the parameter's device at the save, else
        # that device (Adam's CPU `step` beside device moments); used where the optimizer has no tensor to copy into
        self._opt_home: list[dict | None] | None = None
        self.loss_at_entry: float | None = None
        self.step_saved: int | None = None
        self.names: list[str] | None = None  # optional parameter names (`save(names=...)`), for error messages
        self._layout: tuple | None = None  # (shape, dtype, device) per tensor, what the pools were built for
        self._layout_key: list[int] | None = None  # the parameters' data pointers when the layout was checked
        # ... and their storages, held so that no pointer in the key can be reused by another tensor while it is
        # the key: the same pointers then mean the same tensors (normally these are the parameters' own storages)
        self._key_storages: list | None = None
        self._pools: list[tuple[_FlatPool, list[int]]] = []  # each pool with the tensor indices it holds
        self._live: list[torch.Tensor | None] = []  # per pool: the packed buffer its parameters are views of
        self._lives: list[torch.Tensor] = []  # every packed buffer still in use (held, so no pointer is reused)
        self._views: list[torch.Tensor] = []  # the pools' snapshot views, in parameter order
        self._kernels = None  # the compiled fused kernels, for kernel="fused"
        if self.config.kernel == "fused":  # built (or loaded from the cache) now, not at the first stress episode
            from ._fused import mirror_kernels

            self._kernels = mirror_kernels()

    def __getstate__(self) -> dict:
        # A pickle or deep copy takes the snapshot (weights as tensors of their own, optimizer state, entry loss and
        # step), not the flat pools and the views into them: plain pickle writes each tensor's storage on its own,
        # so the unpickled snapshot views, scratch and packed buffer no longer shared memory, and the copy's drift
        # read a scratch that nothing wrote (1.0 for any weights: it kept what it should have rolled back). Left out
        # too: the layout check's cache, which held UntypedStorages beside the parameters' typed tensors (pickle.loads
        # failed with "UntypedStorage has no attribute 'dtype'", torch.save refused them), and the compiled kernels
        # (a module, which neither pickles nor deep-copies). `__setstate__` builds the pools again, as
        # `load_state_dict` does; the copy checks its parameters in full at its next call.
        state = self.__dict__.copy()
        state.update(_layout=None, _layout_key=None, _key_storages=None, _pools=[], _live=[], _views=[], _kernels=None,
                     weights=None if self.weights is None else [w.detach().clone() for w in self.weights])
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.config.kernel == "fused":
            from ._fused import mirror_kernels

            self._kernels = mirror_kernels()
        if self.weights is not None:
            kept = self.opt_state, self._opt_home, self.loss_at_entry, self.step_saved
            self._save(self.weights, None, None, None, pack=False)  # copies into the copy's own pools
            self._layout_key = self._key_storages = None
            self.opt_state, self._opt_home, self.loss_at_entry, self.step_saved = kept

    @property
    def held(self) -> bool:
        return self.weights is not None

    def _label(self, i: int) -> str:
        name = self.names[i] if self.names is not None and i < len(self.names) else None
        return f"parameter {i}" + (f" ({name})" if name else "")

    def _ensure_pools(self, params: Sequence[torch.Tensor], pack: bool = True) -> None:
        # Fast path: the same storages as at the last check means the same shapes, dtypes and devices
        # (a parameter moved, cast or reloaded gets new storage and so a full check; the storages of the
        # last check are held, so their addresses cannot be handed to a new tensor meanwhile).
        key = list(map(torch.Tensor.data_ptr, params))
        if key == self._layout_key:
            return
        if self.config.kernel == "fused":  # (the C++ kernels check contiguity and sizes again at every call)
            self._check_fused(params)
        dev = torch.device("cpu") if self.config.offload_to_cpu else None
        layout = tuple((p.shape, p.dtype, dev or p.device) for p in params)
        if layout != self._layout:
            groups: dict[tuple, list[int]] = {}
            for i, (_, dtype, device) in enumerate(layout):
                groups.setdefault((device, dtype), []).append(i)
            scratch = self.config.kernel == "eager"
            self._pools = [(_FlatPool([layout[i][0] for i in idx], device, dtype, scratch), idx)
                           for (device, dtype), idx in groups.items()]
            self._views = [None] * len(layout)
            for pool, idx in self._pools:
                for i, v in zip(idx, pool.snap_views):
                    self._views[i] = v
            self._layout = layout
        self._live = [None] * len(self._pools)
        if pack and self.config.kernel == "eager" and self.config.pack:
            with torch.no_grad():
                self._live = [self._pack(pool, [params[i] for i in idx]) for pool, idx in self._pools]
            for pool, _ in self._pools:
                pool._prefixes.clear()  # views of an earlier buffer
            in_use = {p.untyped_storage().data_ptr() for p in params}
            self._lives = [b for b in self._lives if b.untyped_storage().data_ptr() in in_use]
        self._layout_key = list(map(torch.Tensor.data_ptr, params))
        self._key_storages = [p.untyped_storage() for p in params]

    def _pack(self, pool: _FlatPool, params: list[torch.Tensor]) -> torch.Tensor | None:
        """Move `params` into one buffer laid out like `pool` (see the class docstring); None if any
        of them may not move."""
        ours = {b.untyped_storage().data_ptr() for b in self._lives}
        seen = set()
        for p in params:
            if type(p) not in (torch.Tensor, torch.nn.Parameter) or not p.is_contiguous() or p.is_meta:
                return None
            st = p.untyped_storage()
            sp = st.data_ptr()
            if sp not in ours:
                if p.storage_offset() != 0 or st.nbytes() != p.numel() * p.element_size():
                    return None  # a view into someone else's storage: moving it would cut that link
                if p.numel() and sp in seen:
                    return None  # two parameters on one storage (tied)
                seen.add(sp)
        if len({p.device for p in params}) != 1:
            return None
        live = torch.zeros(pool.snap.shape, device=params[0].device, dtype=params[0].dtype)
        views = pool.views_of(live)
        torch._foreach_copy_(views, [p.detach() for p in params])
        for p, v in zip(params, views):
            p.data = v
            setattr(p, _PACKED_ATTR, True)
        self._lives.append(live)
        return live

    def _check_fused(self, params: Sequence[torch.Tensor]) -> None:
        """kernel="fused" takes contiguous fp32/bf16/fp16 CPU tensors."""
        for i, p in enumerate(params):
            if p.device.type != "cpu" or p.dtype not in _FUSED_DTYPES or not p.is_contiguous():
                raise ValueError(
                    f"Mirror: kernel='fused' takes contiguous fp32/bf16/fp16 CPU tensors; {self._label(i)} is "
                    f"{p.dtype} on {p.device}{'' if p.is_contiguous() else ', not contiguous'}. "
                    "Use MirrorConfig(kernel='eager') for it")

    def _pool_parts(self, params: Sequence[torch.Tensor], checked: bool = False):
        """([(pool, that pool's share of `params`, the packed buffer they are views of or None, their indices
        in `params`)], same) for `params`, a prefix of the snapshot. `same`: every parameter still has the
        data pointer it had at the last check (`checked`: `_ensure_pools` just ran), so the pools' shapes
        and dtypes are theirs; only then is the packed buffer given. With the fused kernels, which check
        the tensors themselves, the pointers are not compared (same=False)."""
        n = len(params)
        if self._layout is None or n > len(self._layout):
            raise ValueError(f"Mirror: {n} parameters given, but the snapshot holds "
                             f"{0 if self._layout is None else len(self._layout)}")
        same = checked or (self._kernels is None and self._layout_key is not None
                           and list(map(torch.Tensor.data_ptr, params)) == self._layout_key[:n])
        packed = same and any(b is not None for b in self._live)
        if len(self._pools) == 1:
            return ([(self._pools[0][0], params, self._live[0] if packed else None, range(n))] if n else []), same
        parts = []
        for (pool, idx), live in zip(self._pools, self._live):
            mine = [i for i in idx if i < n]
            if mine:
                parts.append((pool, [params[i] for i in mine], live if packed else None, mine))
        return parts, same

    def _check_shapes(self, pool: _FlatPool, mine: Sequence[torch.Tensor], idx: Sequence[int]) -> torch.dtype:
        """Raise a ValueError naming the first of `mine` whose shape is not its snapshot's; else the dtype to
        compare them with their snapshot in: the pool's, promoted by any parameter cast to a wider dtype."""
        dtype = pool.dtype
        for i, p, shape in zip(idx, mine, pool.shapes):
            if p.shape != shape:
                raise ValueError(f"Mirror: {self._label(i)} has shape {tuple(p.shape)}, but its snapshot has "
                                 f"{tuple(shape)}; a snapshot can only be compared with or restored into the "
                                 "parameters it was taken from")
            dtype = torch.promote_types(dtype, p.dtype)
        return dtype

    def _unpacked_terms(self, pool: _FlatPool, mine: Sequence[torch.Tensor], idx: Sequence[int]) -> torch.Tensor:
        """The eager drift terms of parameters that are not views of a packed buffer (gathered per tensor).
        A pool's dtype holds a parameter cast to a narrower dtype exactly; one cast wider is compared in the
        wider dtype. kernel="fused" comes here for tensors its kernel refused, and gets the eager result."""
        if pool.scratch is not None and pool.matches(mine):
            return pool.drift_terms(mine)
        dtype = self._check_shapes(pool, mine, idx)
        if pool.scratch is not None and dtype == pool.dtype:
            return pool.drift_terms(mine)
        return pool.terms_in(dtype, mine)

    # save, drift and restore take no autograd context on the packed path, which touches only buffers
    # that do not require grad; the per-tensor paths read or write the parameters under no_grad.
    def save(self, params: Sequence[torch.Tensor], optimizer=None, loss_ema=None, step=None,
             names: Sequence[str] | None = None) -> None:
        """Snapshot `params` (and, with `snapshot_optimizer`, `optimizer`'s state of each). `names`
        (optional, one per parameter) label the parameters in later error messages."""
        self.names = None if names is None else list(names)
        self._save(list(params), optimizer, loss_ema, step, pack=True)

    def _save(self, params: list[torch.Tensor], optimizer, loss_ema, step, pack: bool) -> None:
        # FSDP2's DTensors: the snapshot holds this process's shards, copied per tensor (never packed: the storage
        # is FSDP's, and moving it would cut the link to the buffer its all-gather reads); the optimizer state
        # stays keyed by the DTensor parameters
        if shard_group(params, "Mirror: the parameters") is not None:
            weights, pack = [local_tensor(p) for p in params], False
        else:
            weights = params
        self._ensure_pools(weights, pack)
        self._copy_in(weights)
        self.weights = self._views
        self.opt_state = self._opt_home = None
        if self.config.snapshot_optimizer and optimizer is not None:
            self.opt_state, self._opt_home = self._save_opt(params, optimizer)
        self.loss_at_entry, self.step_saved = loss_ema, step

    def _copy_in(self, params: list[torch.Tensor]) -> None:
        for pool, mine, live, _ in self._pool_parts(params, checked=True)[0]:
            if live is not None:
                v = pool.prefix(len(mine), live)
                v.snap.copy_(v.live_rows)
                continue
            with torch.no_grad():
                if self._kernels is not None:
                    self._kernels.copy_all(pool.snap_views, mine)
                else:
                    torch._foreach_copy_(pool.snap_views, mine)

    def _save_opt(self, params: list[torch.Tensor], optimizer):
        """Every entry of each parameter's optimizer state: tensors copied (to the CPU with offload_to_cpu),
        other values deep-copied. With each tensor, where it lived (None: on its parameter's device)."""
        dev = torch.device("cpu") if self.config.offload_to_cpu else None
        states, homes = [], []
        for p in params:
            st = optimizer.state.get(p)
            if not st:
                states.append(None)
                homes.append(None)
                continue
            saved, home, at = {}, {}, p.device
            for k, v in st.items():
                if torch.is_tensor(v):
                    vd = v.device
                    saved[k] = v.detach().to(dev or vd, copy=True)
                    home[k] = None if vd == at else vd
                else:
                    saved[k] = copy.deepcopy(v)
            states.append(saved)
            homes.append(home)
        return states, homes

    def drift(self, params: Sequence[torch.Tensor]) -> float:
        """Relative drift Σ‖W − W_snap‖ / Σ‖W_snap‖ over `params` (a prefix of the snapshot).

        W − W_snap is one subtraction from the packed buffer (or, unpacked, a gather of W into the
        pool's scratch by one foreach copy, then one contiguous subtraction), and the per-tensor norms
        of W − W_snap and of W_snap come from the pool's row norms (one kernel on a GPU, one call per half
        on the CPU), accumulated in fp32 (fp64 for fp64 weights). A prefix uses its own denominator.
        One sync for the whole set; the snapshot is never written. With kernel="fused" one C++ pass
        per pool reads W and W_snap in place (fp32 within 64 Ki-element chunks, fp64 across them); a pool
        whose tensors the kernel cannot take (cast, moved or re-viewed since the save) is measured by the
        eager computation instead, with its result. A parameter whose shape changed raises a ValueError.

        The eager per-tensor sum is a GEMM with a 0/1 ownership matrix, or, for a pool with more than
        2^20 rows × tensors, an `index_add_`; on CUDA the latter's float additions may run in any order,
        so the drift can differ in its last bits between runs (under
        `torch.use_deterministic_algorithms(True)` torch runs it deterministically). On the CPU both
        kernels are deterministic (the fused one also across thread counts)."""
        if not self.held:
            raise ValueError("Mirror: drift() needs a snapshot; call save() first")
        group = shard_group(params, "Mirror: the parameters")
        if group is not None:
            return self._sharded_drift(list(params), range(len(params)), group)
        parts, same = self._pool_parts(params)
        if self._kernels is not None:  # fp64 [Σ(W − W_snap)², ΣW_snap²] per tensor, W and W_snap read in place
            terms = []
            with torch.no_grad():
                for pool, mine, _, idx in parts:
                    try:
                        terms.append(self._kernels.drift_sq(mine, pool.snap_views[:len(mine)]).sqrt_().sum(1))
                    except RuntimeError:  # the kernel's checks refused these tensors; nothing was written
                        terms.append(self._unpacked_terms(pool, mine, idx))
        elif all(live is not None for _, _, live, _ in parts):
            terms = [pool.drift_terms(mine, live) for pool, mine, live, _ in parts]
        else:
            with torch.no_grad():  # the gather reads the parameters
                terms = [pool.drift_terms(mine, live) if live is not None or same
                         else self._unpacked_terms(pool, mine, idx) for pool, mine, live, idx in parts]
        if not terms:
            return 0.0
        if len(terms) > 1:  # several pools (devices, dtypes): add up on the first pool's device
            dt = torch.float64 if any(t.dtype == torch.float64 for t in terms) else terms[0].dtype
            num, den = torch.stack([t.to(terms[0].device, dt) for t in terms]).sum(0).tolist()
        else:
            num, den = terms[0].tolist()
        return num / den if den > 0 else (0.0 if num == 0 else float("inf"))

    def restore(self, params: Sequence[torch.Tensor], optimizer=None) -> None:
        """Write the snapshot back into `params` (a prefix of the snapshot) and, if it was saved, the
        optimizer state of each. Everything that can be refused (a parameter list longer than the snapshot,
        a shape changed since the save) raises a ValueError before anything is written. A parameter cast
        since the save gets the snapshot cast to its dtype (and its optimizer moments too); one moved gets it on
        its device. With kernel="fused", tensors the kernel cannot take are copied by the eager path instead."""
        if not self.held:
            raise ValueError("Mirror: restore() needs a snapshot; call save() first")
        params = list(params)
        # FSDP2: the weights written are this process's shards; the optimizer state is keyed by the DTensors
        weights = params if shard_group(params, "Mirror: the parameters") is None else [local_tensor(p) for p in params]
        parts = None if self._kernels is not None else self._checked_parts(weights)
        opt_plan = None
        if self.opt_state is not None and optimizer is not None:
            opt_plan = self._plan_opt_restore(params, optimizer)
        if self._kernels is not None:
            try:  # the kernel checks every pair before it writes anything
                with torch.no_grad():
                    self._kernels.copy_all(weights, self.weights[:len(weights)])
            except RuntimeError:  # a tensor it cannot take (cast, moved, re-viewed): the eager copies below
                parts = self._checked_parts(weights)
        if parts is not None:
            for pool, mine, live, _ in parts:
                if live is not None:  # one copy; the views' own version counters are bumped here
                    v = pool.prefix(len(mine), live)
                    v.live_rows.copy_(v.snap)
                    _bump_versions(mine)
                else:  # copy_ handles a snapshot offloaded to the CPU (per-tensor host→device copies) and casts
                    with torch.no_grad():
                        torch._foreach_copy_(mine, pool.snap_views[:len(mine)])
        if opt_plan is not None:
            self._apply_opt_restore(optimizer, opt_plan)

    def _checked_parts(self, params: list[torch.Tensor]):
        """`_pool_parts(params)`, after a ValueError for any unpacked parameter whose shape changed."""
        parts, same = self._pool_parts(params)
        if not same:
            for pool, mine, live, idx in parts:
                if not pool.matches(mine):
                    self._check_shapes(pool, mine, idx)
        return parts

    def _plan_opt_restore(self, params: list[torch.Tensor], optimizer):
        """The optimizer state to put back, prepared before any weight is written: per parameter, the new
        state dict (None: the parameter had no state at the save), plus the (live tensor, saved copy)
        pairs to copy in place. A live state tensor of the saved shape and dtype is written in place (it
        keeps its identity and device); a missing or reshaped one is re-created as the saved copy, on the
        device of the tensor it replaces, else where it lived at the save. A parameter cast since the save (a state
        loaded into a bf16 model) gets its moments (the state tensors shaped like it, saved in its dtype) in its
        dtype now, as its weights, and as torch's `Optimizer.load_state_dict` casts them: fp32 Adam moments
        put back for a bf16 parameter made the next `optimizer.step()` fail."""
        homes = self._opt_home or [None] * len(self.opt_state)
        plan, dst, src = [], [], []
        for i, (p, st, home) in enumerate(zip(params, self.opt_state, homes)):
            if st is None:
                plan.append((p, None))
                continue
            cur = optimizer.state.get(p) or {}
            new = {}
            was = self.weights[i].dtype  # the parameter's dtype at the save
            for k, v in st.items():
                if not torch.is_tensor(v):
                    new[k] = copy.deepcopy(v)
                    continue
                if v.dtype == was != p.dtype and v.shape == p.shape and p.is_floating_point():
                    v = v.to(p.dtype)
                c = cur.get(k)
                if torch.is_tensor(c) and c.shape == v.shape and c.dtype == v.dtype:
                    new[k] = c
                    dst.append(c)
                    src.append(v)
                    continue
                if torch.is_tensor(c):
                    where = c.device
                else:
                    h = home.get(k) if home is not None else (None if k != "step" else v.device)  # pre-home sd
                    where = p.device if h is None else h
                new[k] = v.to(where, copy=True)
            plan.append((p, new))
        return plan, dst, src

    @staticmethod
    def _apply_opt_restore(optimizer, opt_plan) -> None:
        plan, dst, src = opt_plan
        if dst:
            with torch.no_grad():  # (FSDP2's moments are DTensors, which _foreach_copy_ does not take: their shards)
                torch._foreach_copy_(list(map(local_tensor, dst)), list(map(local_tensor, src)))
        for p, new in plan:
            if new is None:
                optimizer.state.pop(p, None)
                continue
            cur = optimizer.state.setdefault(p, {})
            cur.clear()  # keys that appeared since the save go; the dict keeps its identity
            cur.update(new)

    def drift_at(self, params: Sequence[torch.Tensor], indices: Sequence[int]) -> float:
        """Relative drift Σ‖W − W_snap‖ / Σ‖W_snap‖ of `params` against the snapshot's entries `indices` (one
        per parameter: any subset of the snapshot, where `drift` takes a prefix). Per tensor, in fp32 (fp64 where
        the parameter or its snapshot is fp64), with one sync; the snapshot is never written. A parameter whose
        shape is not its entry's raises a ValueError naming it."""
        if not self.held:
            raise ValueError("Mirror: drift_at() needs a snapshot; call save() first")
        params, indices = list(params), list(indices)
        if len(params) != len(indices):
            raise ValueError(f"Mirror: drift_at() got {len(params)} parameters and {len(indices)} indices")
        group = shard_group(params, "Mirror: the parameters")
        if group is not None:
            return self._sharded_drift(params, indices, group)
        norms = []
        with torch.no_grad():
            for i, p in zip(indices, params):
                if not 0 <= i < len(self.weights):
                    raise ValueError(f"Mirror: index {i} is outside the snapshot ({len(self.weights)} tensors)")
                w = self.weights[i]
                if p.shape != w.shape:
                    raise ValueError(f"Mirror: {self._label(i)} has shape {tuple(p.shape)}, but its snapshot has "
                                     f"{tuple(w.shape)}")
                acc = _acc_dtype(torch.promote_types(p.dtype, w.dtype))
                w = w.to(p.device, acc)
                norms.append(torch.stack([torch.linalg.vector_norm(p.detach().to(acc) - w),
                                          torch.linalg.vector_norm(w)]))
        if not norms:
            return 0.0
        dev = norms[0].device
        num, den = torch.stack([n.to(dev, torch.float64) for n in norms]).sum(0).tolist()
        return num / den if den > 0 else (0.0 if num == 0 else float("inf"))

    def _sharded_drift(self, params: list[torch.Tensor], indices: Sequence[int], group) -> float:
        """The drift of FSDP2-sharded `params` (DTensors) against the snapshot's entries `indices`, which hold this
        process's shards: per tensor, the squared sums of W − W_snap and W_snap over the local shard (fp32, fp64
        for fp64 weights), all-reduced over the mesh's `group` in fp64, then the roots, summed over the tensors.
        Every process gets the drift of the full tensors (a norm per shard would be each process's own number, and
        the processes would restore or keep apart). One collective, which every process must reach."""
        if len(params) > len(self.weights):
            raise ValueError(f"Mirror: {len(params)} parameters given, but the snapshot holds {len(self.weights)}")
        sq = []
        with torch.no_grad():
            for i, p in zip(indices, params):
                if not 0 <= i < len(self.weights):
                    raise ValueError(f"Mirror: index {i} is outside the snapshot ({len(self.weights)} tensors)")
                mine, w = local_tensor(p), self.weights[i]
                if mine.shape != w.shape:
                    raise ValueError(f"Mirror: {self._label(i)} has a local shard of shape {tuple(mine.shape)}, but "
                                     f"its snapshot has {tuple(w.shape)}; a snapshot can only be compared with the "
                                     f"shards it was taken from")
                acc = _acc_dtype(torch.promote_types(mine.dtype, w.dtype))
                w = w.to(mine.device, acc)
                sq.append(torch.stack([(mine.to(acc) - w).square().sum(), w.square().sum()]))
        if not sq:
            return 0.0
        total = torch.stack([t.to(torch.float64) for t in sq])
        dist.all_reduce(total, group=group)
        num, den = total.sqrt_().sum(0).tolist()
        return num / den if den > 0 else (0.0 if num == 0 else float("inf"))

    def decide(self, params, loss_at_exit=None, indices: Sequence[int] | None = None) -> MirrorDecision:
        """The policy's decision at exit; the drift over `params`, a prefix of the snapshot, or with `indices`
        (one per parameter) over those entries (`drift_at`)."""
        c = self.config
        d = self.drift(params) if indices is None else self.drift_at(params, indices)
        restore = should_restore(c.policy, d, c.drift_threshold, self.loss_at_entry, loss_at_exit)
        return MirrorDecision(restore, d, self.loss_at_entry, loss_at_exit, c.policy)

    def clear(self) -> None:
        self.weights = self.opt_state = self._opt_home = None  # the pools stay allocated for the next entry
        self.loss_at_entry = self.step_saved = None

    def state_dict(self) -> dict:
        return {
            # copies: the live buffers are reused by the next Mirror entry
            "weights": None if self.weights is None else [w.detach().to("cpu", copy=True) for w in self.weights],
            "opt_state": _copy_opt_state(self.opt_state, "cpu"),  # copies (`.cpu()` of a CPU tensor is the tensor)
            "opt_home": None if self._opt_home is None else [
                None if h is None else {k: (None if d is None else str(d)) for k, d in h.items()}
                for h in self._opt_home],
            "loss_at_entry": self.loss_at_entry,
            "step_saved": self.step_saved,
        }

    def load_state_dict(self, sd: dict, device=None, params: Sequence[torch.Tensor] | None = None) -> None:
        """Load a `state_dict()`. `params`, the parameters the snapshot belongs to (in its order), are needed under
        FSDP2 only: the state holds this process's shards of their optimizer moments, which are made DTensors
        sharded as their parameters again (as a snapshot taken in this run holds them)."""
        self.clear()
        if sd["weights"] is not None:
            dev = "cpu" if self.config.offload_to_cpu else device
            # copies into the pools; these tensors are not the parameters, so nothing is packed
            self._save([w.to(dev) if dev else w for w in sd["weights"]], None, None, None, pack=False)
            self._layout_key = self._key_storages = None  # the next call checks the parameters in full
        self.opt_state = _copy_opt_state(sd["opt_state"])  # not the caller's tensors: they may change after the load
        if self.opt_state is not None and params is not None:
            self.opt_state = [st if st is None else {k: like_sharded(v, p) for k, v in st.items()}
                              for st, p in zip(self.opt_state, params)]
        homes = sd.get("opt_home")  # absent in state dicts written before it (see _plan_opt_restore)
        self._opt_home = None if homes is None else [
            None if h is None else {k: (None if d is None else torch.device(d)) for k, d in h.items()}
            for h in homes]
        self.loss_at_entry, self.step_saved = sd["loss_at_entry"], sd["step_saved"]
