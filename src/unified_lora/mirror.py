"""Mirror: snapshot adapter weights on entry, decide on exit whether to roll back.

v3 model card rule (the default policy): relative drift
    drift = Σ‖W − W_snap‖ / Σ‖W_snap‖   over every A and B block
below 5 % means the stress was transient noise → restore the snapshot; above
it the change was a real signal → keep the new weights. Other policies:
"never", "always", and "loss_worse" (restore if the loss EMA at exit is higher
than at entry).
"""

from __future__ import annotations

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


def _norm_sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ‖t‖₂ as a 0-d fp32 tensor (foreach kernel, no sync)."""
    if not tensors:
        return torch.zeros(())
    return torch.stack(torch._foreach_norm(list(tensors), 2, dtype=torch.float32)).sum()


class MirrorSnapshot:
    """Holds one snapshot of a list of parameters (and optionally their optimizer state)."""

    def __init__(self, config: MirrorConfig | None = None):
        self.config = config or MirrorConfig()
        self.weights: list[torch.Tensor] | None = None
        self.opt_state: list[dict | None] | None = None
        self.loss_at_entry: float | None = None
        self.step_saved: int | None = None
        # Kept across Mirror cycles: re-copying into warm buffers avoids fresh allocations
        # (page faults) at every entry. Costs one adapter-sized copy outside Mirror.
        self._buffers: list[torch.Tensor] | None = None
        # Scratch for W − W_snap at exit, same shapes/device as the buffers and equally
        # reused, plus Σ‖W_snap‖ computed once at save (a tensor: no sync until the drift).
        self._scratch: list[torch.Tensor] | None = None
        self._snap_norm: torch.Tensor | None = None

    @property
    def held(self) -> bool:
        return self.weights is not None

    @torch.no_grad()
    def save(self, params: Sequence[torch.Tensor], optimizer=None, loss_ema=None, step=None) -> None:
        src = [p.detach() for p in params]
        dev = "cpu" if self.config.offload_to_cpu else None
        buf = self._buffers
        if buf is None or len(buf) != len(src) or any(b.shape != s.shape or b.dtype != s.dtype for b, s in zip(buf, src)):
            buf = self._buffers = [torch.empty_like(s, device=dev or s.device) for s in src]
            self._scratch = None
        torch._foreach_copy_(buf, src)
        self.weights = buf
        self._snap_norm = _norm_sum(buf)
        self.opt_state = None
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
        """Relative drift Σ‖W − W_snap‖ / Σ‖W_snap‖ over `params` (a prefix of the
        snapshot). W − W_snap is formed in reused scratch buffers on the snapshot's
        device (no allocation, no device copy of the snapshot); norms accumulate in
        fp32 whatever the parameter dtype; one sync for the whole set."""
        params = [p.detach() for p in params]
        n = len(params)
        snap = self.weights[:n]
        if self._scratch is None or len(self._scratch) != len(self.weights):
            self._scratch = [torch.empty_like(w) for w in self.weights]
        scr = self._scratch[:n]
        torch._foreach_copy_(scr, params)
        torch._foreach_sub_(scr, snap)
        num = _norm_sum(scr)
        den = self._snap_norm if (n == len(self.weights) and self._snap_norm is not None) else _norm_sum(snap)
        num, den = torch.stack([num, den.to(num.device)]).tolist()
        return num / den if den > 0 else (0.0 if num == 0 else float("inf"))

    @torch.no_grad()
    def restore(self, params: Sequence[torch.Tensor], optimizer=None) -> None:
        # copy_ handles a snapshot offloaded to the CPU (per-tensor host→device copies)
        torch._foreach_copy_([p.data for p in params], self.weights[:len(params)])
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
        self.weights = self.opt_state = None  # the buffers stay allocated for the next entry
        self._snap_norm = None
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
        dev = "cpu" if self.config.offload_to_cpu else device
        self.weights = None if sd["weights"] is None else [w.to(dev) if dev else w.clone() for w in sd["weights"]]
        self._buffers = self.weights
        self._scratch = None
        self._snap_norm = None if self.weights is None else _norm_sum(self.weights)
        self.opt_state = sd["opt_state"]
        self.loss_at_entry, self.step_saved = sd["loss_at_entry"], sd["step_saved"]
