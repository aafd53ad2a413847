"""Mirror: snapshot adapter weights on entry, decide on exit whether to roll back.

v3 model card rule (the default policy): relative drift
    drift = Σ‖W − W_snap‖ / Σ‖W_snap‖   over every A and B block
below 5 % means the stress was transient noise → restore the snapshot; above
it the change was a real signal → keep the new weights. Other policies:
"never", "always", and "loss_worse" (restore if the loss EMA at exit is higher
than at entry).

Two kernels do the copies and the drift (`MirrorConfig.kernel`). "eager" (the
default) uses torch ops on any device. "fused" uses C++ kernels for contiguous
fp32/bf16/fp16 CPU tensors (`csrc/mirror_fused.cpp`, built when the snapshot
object is created, i.e. with the controller): memcpy for save and restore, and one pass that reads W and W_snap in
place for the drift. Both give the same snapshot and the same rollback, bit for
bit; the drift agrees to fp32 rounding.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .config import MirrorConfig


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


_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "momentum_buffer", "max_exp_avg_sq", "step")
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MIN_ROW = 64  # narrowest row of a flat pool; smaller tensors are zero-padded to one row


class _FlatPool:
    """The snapshot of the tensors of one (device, dtype), in one contiguous buffer with a scratch twin.

    `both` is a [2, rows, width] buffer: `scratch` = both[0] takes W − W_snap at the drift, `snap` =
    both[1] holds W_snap. Every tensor starts on a row boundary and fills ceil(numel / width)
    rows; the rest of its last row is zero padding, which stays zero in both halves and so adds
    nothing to a norm. `width` is the gcd of the tensor sizes (at least 64), so nested LoRA blocks
    pack without padding (MiniLM: 1536). The per-tensor norms of W − W_snap and of W_snap then come
    from one contiguous subtraction and one row-norm kernel over both halves, not from one kernel per
    tensor, and a prefix of the tensors (the controller measures drift over the LoRA blocks only)
    is a prefix of the rows.
    """

    def __init__(self, shapes: list[torch.Size], device, dtype, scratch: bool = True):
        numels = [math.prod(s) for s in shapes]
        big = [n for n in numels if n >= _MIN_ROW]
        self.width = max(_MIN_ROW, math.gcd(*big)) if big else _MIN_ROW
        rows = [max(1, -(-n // self.width)) for n in numels]
        self.row_end = list(itertools.accumulate(rows))
        # without scratch (the fused kernels read W in place) the pool is the snapshot alone
        self.both = torch.zeros(1 + scratch, self.row_end[-1], self.width, device=device, dtype=dtype)
        self.scratch, self.snap = (self.both[0], self.both[1]) if scratch else (None, self.both[0])
        # row norms come out as [‖W − W_snap‖, ‖W_snap‖]
        starts = [(e - r) * self.width for e, r in zip(self.row_end, rows)]
        self.snap_views = [self.snap.view(-1)[s:s + n].view(sh) for s, n, sh in zip(starts, numels, shapes)]
        self.scratch_views = [] if not scratch else [
            self.scratch.view(-1)[s:s + n].view(sh) for s, n, sh in zip(starts, numels, shapes)]
        if scratch:  # eager drift only: the owning tensor of each row (squared row norms sum per tensor)
            self.row_owner = torch.repeat_interleave(torch.arange(len(rows), device=device),
                                                     torch.tensor(rows, device=device))
            self.norms = torch.zeros(2, len(rows), device=device)

    def drift_terms(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """[Σ‖W − W_snap‖, Σ‖W_snap‖] over `params`, the first tensors of this pool: fp32
        accumulation whatever the dtype, no allocation beyond the row norms, no sync."""
        c = len(params)
        rows = self.row_end[c - 1]
        torch._foreach_copy_(self.scratch_views[:c], params)
        self.scratch[:rows].sub_(self.snap[:rows])
        sq = torch.linalg.vector_norm(self.both[:, :rows], dim=2, dtype=torch.float32).square_()
        return self.norms[:, :c].zero_().index_add_(1, self.row_owner[:rows], sq).sqrt_().sum(1)


class MirrorSnapshot:
    """Holds one snapshot of a list of parameters (and optionally their optimizer state).

    The weights live in flat pools (`_FlatPool`, one per device and dtype), allocated at the first
    entry and reused by every later entry while the parameter shapes stay the same: re-copying
    into warm buffers avoids fresh allocations (page faults) at every entry, at the cost of keeping
    two adapter-sized buffers outside Mirror (one with kernel="fused", which needs no scratch).
    `weights` are views into the pools, in the order of the parameters given to `save`.
    """

    def __init__(self, config: MirrorConfig | None = None):
        self.config = config or MirrorConfig()
        self.weights: list[torch.Tensor] | None = None
        self.opt_state: list[dict | None] | None = None
        self.loss_at_entry: float | None = None
        self.step_saved: int | None = None
        self._layout: tuple | None = None  # (shape, dtype, device) per tensor, what the pools were built for
        self._layout_key: list[int] | None = None  # the parameters' data pointers when the layout was checked
        self._pools: list[tuple[_FlatPool, list[int]]] = []  # each pool with the tensor indices it holds
        self._views: list[torch.Tensor] = []  # the pools' snapshot views, in parameter order
        self._kernels = None  # the compiled fused kernels, for kernel="fused"
        if self.config.kernel == "fused":  # built (or loaded from the cache) now, not at the first stress episode
            from ._fused import mirror_kernels

            self._kernels = mirror_kernels()

    @property
    def held(self) -> bool:
        return self.weights is not None

    def _ensure_pools(self, params: Sequence[torch.Tensor]) -> None:
        # Fast path: the same storages as at the last check means the same shapes, dtypes and devices
        # (a parameter moved, cast or reloaded gets new storage and so a full check).
        key = [p.data_ptr() for p in params]
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
        self._layout_key = key

    def _check_fused(self, params: Sequence[torch.Tensor]) -> None:
        """kernel="fused" takes contiguous fp32/bf16/fp16 CPU tensors."""
        for i, p in enumerate(params):
            if p.device.type != "cpu" or p.dtype not in _FUSED_DTYPES or not p.is_contiguous():
                raise ValueError(
                    f"Mirror: kernel='fused' takes contiguous fp32/bf16/fp16 CPU tensors; parameter {i} is "
                    f"{p.dtype} on {p.device}{'' if p.is_contiguous() else ', not contiguous'}. "
                    "Use MirrorConfig(kernel='eager') for it")

    def _pool_parts(self, params: Sequence[torch.Tensor]):
        """(pool, that pool's share of `params`) for `params`, a prefix of the snapshot."""
        n = len(params)
        if self._layout is None or n > len(self._layout):
            raise ValueError(f"Mirror: {n} parameters given, but the snapshot holds "
                             f"{0 if self._layout is None else len(self._layout)}")
        if len(self._pools) == 1:
            return [(self._pools[0][0], params)] if n else []
        parts = [(pool, [params[i] for i in idx if i < n]) for pool, idx in self._pools]
        return [(pool, mine) for pool, mine in parts if mine]

    @torch.no_grad()
    def save(self, params: Sequence[torch.Tensor], optimizer=None, loss_ema=None, step=None) -> None:
        params = list(params)
        self._ensure_pools(params)
        for pool, mine in self._pool_parts(params):
            if self._kernels is not None:
                self._kernels.copy_all(pool.snap_views, mine)
            else:
                torch._foreach_copy_(pool.snap_views, mine)
        self.weights = self._views
        self.opt_state = None
        dev = "cpu" if self.config.offload_to_cpu else None
        if self.config.snapshot_optimizer and optimizer is not None:
            self.opt_state = []
            for p in params:
                st = optimizer.state.get(p)
                self.opt_state.append(
                    None if not st else {k: (v.detach().to(dev or v.device, copy=True) if torch.is_tensor(v) else v)
                                         for k, v in st.items() if k in _MOMENT_KEYS}
                )
        self.loss_at_entry, self.step_saved = loss_ema, step

    @torch.no_grad()
    def drift(self, params: Sequence[torch.Tensor]) -> float:
        """Relative drift Σ‖W − W_snap‖ / Σ‖W_snap‖ over `params` (a prefix of the snapshot).

        W is gathered into the pool's scratch (one foreach copy); W − W_snap is one contiguous
        subtraction, and the per-tensor norms of W − W_snap and of W_snap are one row-norm kernel per
        pool, accumulated in fp32 whatever the parameter dtype. A prefix uses its own denominator.
        One sync for the whole set; the snapshot is never written. With kernel="fused" one C++ pass
        per pool reads W and W_snap in place (fp32 within 64 Ki-element chunks, fp64 across them).

        On CUDA the eager per-tensor sum is an `index_add_`, whose float additions may run in any order,
        so the drift can differ in its last bits between runs; under
        `torch.use_deterministic_algorithms(True)` torch runs it deterministically. On the CPU both
        kernels are deterministic (the fused one also across thread counts)."""
        if not self.held:
            raise ValueError("Mirror: drift() needs a snapshot; call save() first")
        if self._kernels is not None:  # fp64 [Σ(W − W_snap)², ΣW_snap²] per tensor, W and W_snap read in place
            terms = [self._kernels.drift_sq(mine, pool.snap_views[:len(mine)]).sqrt_().sum(1)
                     for pool, mine in self._pool_parts(params)]
        else:
            terms = [pool.drift_terms(mine) for pool, mine in self._pool_parts(params)]
        if not terms:
            return 0.0
        # several pools (devices, dtypes): add up on the first pool's device
        num, den = (torch.stack([t.to(terms[0].device) for t in terms]).sum(0) if len(terms) > 1 else terms[0]).tolist()
        return num / den if den > 0 else (0.0 if num == 0 else float("inf"))

    @torch.no_grad()
    def restore(self, params: Sequence[torch.Tensor], optimizer=None) -> None:
        if not self.held:
            raise ValueError("Mirror: restore() needs a snapshot; call save() first")
        if self._kernels is not None:
            self._kernels.copy_all(params, self.weights[:len(params)])
        else:  # copy_ handles a snapshot offloaded to the CPU (per-tensor host→device copies)
            torch._foreach_copy_(list(params), self.weights[:len(params)])
        if self.opt_state is not None and optimizer is not None:
            for p, st in zip(params, self.opt_state):
                if st is None:
                    optimizer.state.pop(p, None)
                    continue
                cur = optimizer.state.setdefault(p, {})
                for k, v in st.items():
                    cur[k] = v.to(p.device if k != "step" else v.device).clone() if torch.is_tensor(v) else v

    def decide(self, params, loss_at_exit=None) -> MirrorDecision:
        c = self.config
        d = self.drift(params)
        restore = should_restore(c.policy, d, c.drift_threshold, self.loss_at_entry, loss_at_exit)
        return MirrorDecision(restore, d, self.loss_at_entry, loss_at_exit, c.policy)

    def clear(self) -> None:
        self.weights = self.opt_state = None  # the pools stay allocated for the next entry
        self.loss_at_entry = self.step_saved = None

    def state_dict(self) -> dict:
        return {
            # copies: the live buffers are reused by the next Mirror entry
            "weights": None if self.weights is None else [w.detach().to("cpu", copy=True) for w in self.weights],
            "opt_state": None if self.opt_state is None else [
                None if st is None else {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in st.items()}
                for st in self.opt_state],
            "loss_at_entry": self.loss_at_entry,
            "step_saved": self.step_saved,
        }

    def load_state_dict(self, sd: dict, device=None) -> None:
        self.clear()
        if sd["weights"] is not None:
            dev = "cpu" if self.config.offload_to_cpu else device
            self.save([w.to(dev) if dev else w for w in sd["weights"]])  # copies into the pools
        self.opt_state = sd["opt_state"]
        self.loss_at_entry, self.step_saved = sd["loss_at_entry"], sd["step_saved"]
