"""The SINGLE/MULTI/MIRROR state machine (v1 README FSM). Pure: φ in, mode out.

    φ < θ0        → SINGLE (0)
    θ0 ≤ φ < θ1   → MULTI  (1)
    φ ≥ θ1        → MIRROR (2)

Transitions move one mode per decision (SINGLE ↔ MULTI ↔ MIRROR). Options:
`warmup_steps` (no decision before), `eval_interval` (decide only on multiples)
and `min_dwell` (hysteresis: stay at least that many steps after a transition). `hold_down[mode] = step`
keeps the machine from moving down out of `mode` before `step` (the multi-task controller's merge back-off), and
`no_down_from[mode] = step` from `step` on (the multi-task controller's last `resplit_window` steps of a run: a merge
there could not be tested before the run ends).
With all three at their defaults (0, 1, 0) the seed's v1 trace reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import MIRROR, MODES, MULTI, SINGLE, MachineConfig


def zone(phi: float, theta0: float, theta1: float) -> int:
    if phi >= theta1:
        return MIRROR
    return MULTI if phi >= theta0 else SINGLE


@dataclass(frozen=True)
class Transition:
    step: int
    old: int
    new: int
    phi: float

    def __str__(self) -> str:
        return f"[{self.step}] {MODES[self.old]} -> {MODES[self.new]} (φ={self.phi:.3f})"


class ModeMachine:
    def __init__(self, config: MachineConfig | None = None, **kwargs):
        self.config = config or MachineConfig(**kwargs)
        self.mode = self.config.initial_mode
        self.last_transition_step: int | None = None
        self.hold_down: dict[int, int] = {}  # mode -> the first step at which it may move down
        # mode -> the first step from which it may no longer move down; not part of the state: the multi-task
        # controller sets it at each step from its own `total_steps`
        self.no_down_from: dict[int, int] = {}

    def __setstate__(self, state: dict) -> None:
        state.setdefault("hold_down", {})  # a machine pickled before the merge back-off: none held
        state.setdefault("no_down_from", {})
        self.__dict__.update(state)

    def step(self, phi: float, step: int) -> Transition | None:
        if phi != phi:  # NaN fails every comparison, so zone() would read it as SINGLE and walk the machine down
            raise ValueError(f"phi: got NaN at step {step}; the machine needs a number (the library's signals "
                             f"never give NaN: they skip non-finite losses and gradients)")
        c = self.config
        if step < c.warmup_steps or step % c.eval_interval:
            return None
        if self.last_transition_step is not None and step - self.last_transition_step < c.min_dwell:
            return None
        target = zone(phi, c.theta0, c.theta1)
        if target == self.mode:
            return None
        new = self.mode + (1 if target > self.mode else -1)  # one step at a time
        if new < self.mode and not self.hold_down.get(self.mode, step) <= step < self.no_down_from.get(self.mode, step + 1):
            return None
        t = Transition(step, self.mode, new, float(phi))
        self.mode, self.last_transition_step = new, step
        return t

    def state_dict(self) -> dict:
        return {"mode": self.mode, "last_transition_step": self.last_transition_step,
                "hold_down": dict(self.hold_down)}

    def load_state_dict(self, sd: dict) -> None:
        self.mode, self.last_transition_step = sd["mode"], sd["last_transition_step"]
        self.hold_down = {int(k): int(v) for k, v in sd.get("hold_down", {}).items()}  # (none in older files)


__all__ = ["ModeMachine", "Transition", "zone", "SINGLE", "MULTI", "MIRROR", "MODES"]
