"""The stress signal φ(t) ∈ [0, 1]. Numbers in, numbers out.

* `LossSignal`: the v1 README loss signal (SPEC §2a).
* `CompositeSignal`: the v3 model card's φ = f(Convergence, Entropy, Stress)
  (SPEC §2b). It takes per-adapter gradient statistics (numbers) that
  `gradient_stats` reads from the adapters after backward.

Every `update` returns φ and fills `components` with what the trace records.

Non-finite losses (NaN/inf) never enter an EMA. What happens instead is the
`nonfinite` option: "skip" (φ and all state unchanged, the step is flagged in
the trace), "max_stress" (this one step pushes φ towards 1 as if D = 1, the
EMAs stay untouched, so one bad step cannot poison φ forever) or "raise".
"""

from __future__ import annotations

import math
from collections import deque
from typing import Sequence

import torch
import torch.distributed as dist

from .distributed import local_tensor, shard_group
from .layer import blocks_of


class NonFiniteLossError(FloatingPointError):
    pass


def _check_not_negative(loss: float, what: str = "loss") -> None:
    """The v1 normalisation D = E/(1+E) maps [0, ∞) to [0, 1) only: a negative loss drives E below 0, then D and φ
    leave [0, 1] (below 0 at a loss of -1). Refused instead. (-inf is
    left to the `nonfinite` policy, as NaN and +inf are.)"""
    if -math.inf < loss < 0.0:
        raise ValueError(f"{what}: the v1 loss signal needs a loss >= 0 (D = E_s/(1+E_s) maps [0, inf) to [0, 1)); "
                         f"got {loss!r}. For an objective that can go negative use signal='composite', or add a "
                         f"constant to the loss you pass to ctrl.step")


def _check_finite(loss: float, policy: str, what: str = "loss") -> bool:
    if math.isfinite(loss):
        return True
    if policy == "raise":
        raise NonFiniteLossError(f"{what}: got {loss!r}; fix the training step or use nonfinite='skip'")
    return False


class LossSignal:
    """v1 README loss signal: E_s ← βE_s + (1−β)L;  D = E_s/(1+E_s);  φ ← (1−α)φ + αD.

    `loss_scale` divides the loss first, so LM losses (2-3 nats) are usable.
    With `calibration_steps = n`, φ is held at its initial value for n steps and
    then `loss_scale` is set so the mean warmup loss maps to `calibration_target`
    (0.5 → φ ≈ 0.333, MULTI, the seed trace's baseline). A warm-up mean of 0 leaves
    `loss_scale` as configured.
    """

    def __init__(self, alpha=0.1, beta=0.9, loss_scale=1.0, calibration_steps=0, calibration_target=0.5,
                 nonfinite="skip", E_init=1.0, phi_init=0.5):
        self.alpha, self.beta = float(alpha), float(beta)
        self.loss_scale = float(loss_scale)
        self.calibration_steps = int(calibration_steps)
        self.calibration_target = float(calibration_target)
        self.nonfinite = nonfinite
        self.E_s, self.phi = float(E_init), float(phi_init)
        self._calib: list[float] = []
        self.components: dict = {}

    @property
    def calibrating(self) -> bool:
        return len(self._calib) < self.calibration_steps

    def update(self, loss: float) -> float:
        loss = float(loss)
        finite = _check_finite(loss, self.nonfinite)
        _check_not_negative(loss)
        if not finite:
            if self.nonfinite == "max_stress":
                self.phi = (1 - self.alpha) * self.phi + self.alpha * 1.0
        elif self.calibrating:
            self._calib.append(loss)
            if not self.calibrating:  # just finished: fix the scale
                scale = sum(self._calib) / len(self._calib) / self.calibration_target
                # A warm-up mean of 0 (a perfect fit) maps to no scale: the configured loss_scale stays. (A floor
                # of 1e-8 used to pin φ near 1, MIRROR, for any later loss, and mis-scaled means below 1e-8.)
                if scale > 0:
                    self.loss_scale = scale
        else:
            # capped: a finite loss over a tiny scale overflowed to inf, and E_s = inf made D = inf/inf = NaN
            # for good. Any L above the cap gives D = 1.0 in floating point anyway.
            L = min(loss / self.loss_scale, 1e300)
            self.E_s = self.beta * self.E_s + (1 - self.beta) * L
            D = self.E_s / (1 + self.E_s)
            self.phi = (1 - self.alpha) * self.phi + self.alpha * D
        self.components = {"E_s": self.E_s, "D": self.E_s / (1 + self.E_s), "loss_scale": self.loss_scale,
                           "nonfinite": not finite, "calibrating": self.calibrating}
        return self.phi

    def state_dict(self) -> dict:
        return {"E_s": self.E_s, "phi": self.phi, "loss_scale": self.loss_scale, "calib": list(self._calib)}

    def load_state_dict(self, sd: dict) -> None:
        self.E_s, self.phi, self.loss_scale = sd["E_s"], sd["phi"], sd["loss_scale"]
        self._calib = list(sd["calib"])


class Ema:
    """Exponential moving average whose first value initialises it."""

    def __init__(self, rate: float):
        self.rate, self.value = float(rate), None

    def update(self, x: float) -> float:
        self.value = x if self.value is None else (1 - self.rate) * self.value + self.rate * x
        return self.value


class HistoryNormalizer:
    """v3: z-score against the last `history` raw values, clamp ±3, map (z+3)/6;
    0.5 until `min_history` values exist."""

    def __init__(self, history=500, min_history=10):
        self.values: deque[float] = deque(maxlen=int(history))
        self.min_history = int(min_history)

    def __call__(self, x: float) -> float:
        self.values.append(float(x))
        n = len(self.values)
        if n < self.min_history:
            return 0.5
        mean = sum(self.values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in self.values) / n)
        # Constant history: z = 0. The test is relative, so the z-score is the same at any scale: an absolute
        # 1e-12 read the mean's rounding error as spread for values of ~1e4 (z = ±1, 1/3 or 2/3 for a constant),
        # and every history of values below ~1e-12 as constant.
        z = 0.0 if std <= 1e-12 * abs(mean) else (x - mean) / std
        z = max(-3.0, min(3.0, z))
        return (z + 3.0) / 6.0


class CompositeSignal:
    """v3 model card: φ_raw = wC·C + wE·E + wS·S, normalised against its own history,
    then EMA(0.1). Per adapter i:
      S_i = EMA(0.1) of the gradient norm √(‖∇A‖² + ‖∇B‖²)
      E_i = EMA(0.1) of 1 − max(0, cos(g_t, g_{t−1}))   (direction churn)
    and globally C = max(0, (loss_EMA(0.1) − loss_EMA(0.02)) / |loss_EMA(0.02)|).
    φ_raw uses the mean of the per-adapter S_i and E_i.

    Known weakness kept visible: being self-normalised, φ ≈ 0.5 (MULTI) in
    steady state; only *relative* surges reach MIRROR.
    """

    def __init__(self, weights=(0.3, 0.3, 0.4), rate=0.1, slow_rate=0.02, history=500, min_history=10,
                 nonfinite="skip", phi_init=0.5):
        self.wC, self.wE, self.wS = (float(w) for w in weights)
        self.rate = float(rate)
        self.fast, self.slow = Ema(rate), Ema(slow_rate)
        self.norm = HistoryNormalizer(history, min_history)
        self.S: list[Ema] = []
        self.E: list[Ema] = []
        self.phi = float(phi_init)
        self.nonfinite = nonfinite
        self.components: dict = {}

    def update(self, loss: float, grad_norms: Sequence[float], cosines: Sequence[float | None]) -> float:
        """`cosines[i]` is None when adapter i has no previous gradient yet; `grad_norms[i]` (and its cosine)
        is None when adapter i had no gradient this step (a layer LayerDrop skipped): its S and E hold, and
        the means run over the adapters that have an S (an E): held values count, adapters never measured do not."""
        loss = float(loss)
        if not _check_finite(loss, self.nonfinite) or not all(g is None or math.isfinite(g) for g in grad_norms) or not all(
                c is None or math.isfinite(c) for c in cosines):
            if self.nonfinite == "raise":
                raise NonFiniteLossError(f"gradient norm or cosine: got a non-finite value in {list(grad_norms)[:4]}, "
                                         f"{list(cosines)[:4]}...")
            if self.nonfinite == "max_stress":
                self.phi = (1 - self.rate) * self.phi + self.rate * 1.0
            self.components = dict(self.components, nonfinite=True)
            return self.phi
        if len(self.S) != len(grad_norms):
            self.S = [Ema(self.rate) for _ in grad_norms]
            self.E = [Ema(self.rate) for _ in grad_norms]
        fast, slow = self.fast.update(loss), self.slow.update(loss)
        # The rise of the loss relative to its slow level, at any scale and sign: a floor of slow > 1e-12 kept C at 0
        # for losses below 1e-12 (near a perfect fit) and for any negative objective. Capped so C stays finite.
        C = min(max(0.0, (fast - slow) / abs(slow)), 1e12) if slow else 0.0
        S = [v for v in (ema.update(g) if g is not None else ema.value for ema, g in zip(self.S, grad_norms))
             if v is not None] or [0.0]
        # E as S: over the adapters that have one. An adapter with no cosine yet (never reached by the loss, or
        # back from LayerDrop with its first gradient) counted as E = 0 ("no churn"), which diluted the mean.
        E = [v for v in (ema.update(1.0 - max(0.0, c)) if c is not None else ema.value
                         for ema, c in zip(self.E, cosines)) if v is not None] or [0.0]
        S_mean, E_mean = sum(S) / len(S), sum(E) / len(E)
        raw = self.wC * C + self.wE * E_mean + self.wS * S_mean
        normed = self.norm(raw)
        self.phi = (1 - self.rate) * self.phi + self.rate * normed
        self.components = {"C": C, "E": E_mean, "S": S_mean, "phi_raw": raw, "phi_norm": normed,
                           "S_max": max(S), "E_max": max(E), "nonfinite": False}
        return self.phi

    def state_dict(self) -> dict:
        return {"phi": self.phi, "fast": self.fast.value, "slow": self.slow.value,
                "S": [e.value for e in self.S], "E": [e.value for e in self.E], "history": list(self.norm.values)}

    def load_state_dict(self, sd: dict) -> None:
        self.phi, self.fast.value, self.slow.value = sd["phi"], sd["fast"], sd["slow"]
        self.S = [Ema(self.rate) for _ in sd["S"]]
        self.E = [Ema(self.rate) for _ in sd["E"]]
        for e, v in zip(self.S, sd["S"]):
            e.value = v
        for e, v in zip(self.E, sd["E"]):
            e.value = v
        self.norm.values.clear()
        self.norm.values.extend(sd["history"])


class GradientStats:
    """Reads per-adapter gradient norm and cosine to the previous step's gradient.

    Costs one stored gradient copy per adapter (the v3 design's price). Every
    reduction runs as a multi-tensor (`torch._foreach_*`) op over all adapters at
    once (all the squared norms of a step, ‖c‖², ‖c + p‖², ‖c − p‖² and ‖p‖², in
    one `_foreach_norm`), so a step issues the same 23 aten ops whatever the number
    of layers (fewer on the first step, which has no previous gradient), and the
    only device sync is one `.tolist()`. A step whose norms or cosines are not all
    finite (an inf/NaN gradient entry, e.g. a step GradScaler skips) leaves the
    stored gradients as they were, so the next cosine compares with the last
    finite step's gradient, as if the bad step had never happened. The dot product of the
    current and previous gradient comes from the polarisation identity
    <c, p> = (‖c + p‖² − ‖c − p‖²) / 4 on fp32 norms. Across a rank change the
    cosine uses the blocks active in both steps.
    """

    def __init__(self):
        self.prev: list[list[torch.Tensor]] = []
        # Index tensors for the per-adapter segment sums, kept on the device per block layout:
        # building them every step would be a host->device copy (a sync) per step.
        self._index: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def _indices(self, dev, owner: list[int], pair_pos: list[int], pair_owner: list[int], with_prev: list[int]):
        key = (str(dev), tuple(owner), tuple(pair_pos), tuple(pair_owner), tuple(with_prev))
        if key not in self._index:
            if len(self._index) >= 64:  # layouts vary from step to step under LayerDrop: keep the cache bounded
                self._index.clear()
            self._index[key] = tuple(torch.tensor(v, dtype=torch.long, device=dev)
                                     for v in (owner, pair_pos, pair_owner, with_prev))
        return self._index[key]

    @torch.no_grad()
    def __call__(self, adapters: Sequence) -> tuple[list[float | None], list[float | None]]:
        """Per adapter: the gradient norm and the cosine to the previous gradient (None: none yet). An
        adapter whose active blocks all have no gradient took no part in this step's forward (a layer
        LayerDrop skipped, a module the loss does not reach): its norm and cosine are None and its stored
        gradient stays. So is one where any trainable active block has no gradient: a forward through the layer
        gives each of them one, so the other blocks' gradients are the zeros `zero_grad(set_to_none=False)` left.
        (The controller checks that backward ran at all.)"""
        grads: list[list[torch.Tensor]] = []
        for i, layer in enumerate(adapters):
            k = layer.n_active_blocks
            ps = blocks_of(layer.lora_A)[:k] + blocks_of(layer.lora_B)[:k]
            gs = [p.grad for p in ps]
            if any(g is None for g in gs):
                # Frozen blocks beside trained ones are refused. A trainable block with no gradient beside blocks
                # with one: the layer took no part in this forward, and theirs are the zeros that
                # zero_grad(set_to_none=False) left (that raised this error, e.g. for a layer skipped just after a
                # rank raise, whose new blocks have had no gradient yet)
                if any(g is None and not p.requires_grad for p, g in zip(ps, gs)) and not all(g is None for g in gs):
                    raise ValueError(
                        f"ctrl.step: adapter {i} has a gradient on some of its active blocks and none on others "
                        f"(a block set to requires_grad=False?); the composite signal reads every active block")
                gs = []  # not in this step's graph
            grads.append(gs)
        flat = [g for gs in grads for g in gs]
        L = len(grads)
        if not flat:  # every adapter's layer was skipped; only other parameters (a head) trained
            return [None] * L, [None] * L
        # FSDP2: each process holds a shard of every gradient. Its squared sums (‖c‖², ‖c ± p‖², ‖p‖²) add up over
        # the shards, so they are computed on the local shards and all-reduced below, before any root or ratio:
        # every process then has the full gradients' norms and cosines (a norm per shard decided differently on
        # each process). The stored previous gradients are local shards too.
        group = shard_group(flat, "the adapters' gradients")
        if group is not None:
            grads = [[local_tensor(g) for g in gs] for gs in grads]
            flat = [g for gs in grads for g in gs]
        dev = flat[0].device
        # Pair the blocks present in both steps (lists are A blocks then B blocks); pair_pos indexes `flat`.
        cur, prv, pair_pos, pair_owner, has_prev, start = [], [], [], [], [], 0
        for a, gs in enumerate(grads):
            prev = self.prev[a] if a < len(self.prev) else []
            has_prev.append(bool(prev) and bool(gs))
            if has_prev[-1]:
                k, h, hp = min(len(gs), len(prev)) // 2, len(gs) // 2, len(prev) // 2
                cur += gs[:k] + gs[h:h + k]
                prv += prev[:k] + prev[hp:hp + k]
                pair_pos += [start + i for i in range(k)] + [start + h + i for i in range(k)]
                pair_owner += [a] * (2 * k)
            start += len(gs)
        owner = [a for a, gs in enumerate(grads) for _ in gs]
        owner_t, pos_t, pair_t, sel_t = self._indices(dev, owner, pair_pos, pair_owner,
                                                      [a for a, hp in enumerate(has_prev) if hp])
        # Every squared norm of the step in one multi-tensor op: the current blocks, then (for the blocks
        # paired with last step's) c + p, c − p and p. One stack and one square follow, and the four groups
        # are views of the result.
        n, m = len(flat), len(cur)
        try:
            listed = flat + ([*torch._foreach_add(cur, prv), *torch._foreach_sub(cur, prv), *prv] if cur else [])
        except RuntimeError:
            # a block that changed shape since the last step (`resize_token_embeddings` grew a wrapped lm_head's B):
            # its adapter's stored gradient is dropped, and its cosine is None this step, as on a first step
            # (caught here, not checked each step: shape checks would cost every step host time)
            if not self._drop_reshaped(grads):
                raise
            return self(adapters)
        # fp32 sums for fp32/bf16/fp16 gradients, fp64 for fp64 ones (as Mirror's drift): a norm in fp32 refuses
        # fp64 input, so a float64 model failed at its first ctrl.step; the sums take that dtype, not torch's default
        acc = torch.float64 if any(t.dtype == torch.float64 for t in listed) else torch.float32
        sq_all = torch.stack(torch._foreach_norm(listed, 2, dtype=acc)).square_()
        if group is not None:
            dist.all_reduce(sq_all, group=group)
        sq = sq_all[:n]
        norms = torch.zeros(L, device=dev, dtype=acc).index_add_(0, owner_t, sq)
        parts = [norms.sqrt_()]
        if cur:
            plus, minus, pn = sq_all[n:n + m], sq_all[n + m:n + 2 * m], sq_all[n + 2 * m:]
            # [<c, p>, ‖c‖², ‖p‖²] per pair, summed per adapter by one index_add_ (‖c‖² is already in sq)
            terms = torch.stack([(plus - minus).mul_(0.25), sq[pos_t], pn])
            seg = torch.zeros(3, L, device=dev, dtype=acc).index_add_(1, pair_t, terms)
            # ‖c‖·‖p‖ as a product of square roots: the product of the squares underflows fp32 below norms
            # of ~1e-10 (and overflows above ~4e9), which gave cosines of 1e6 or 0. Clamped to [-1, 1] against
            # rounding; a zero gradient on either side gives 0/0 = NaN, read below as "no cosine". (One sqrt over
            # both norm rows: an op fewer than one per row.)
            norms = seg[1:].sqrt()
            cos = (seg[0] / (norms[0] * norms[1])).clamp_(-1.0, 1.0)
            parts.append(cos[sel_t])
        vals = torch.cat(parts).tolist()  # the one device sync of this step
        # Keep this step's gradients as the next step's "previous" only when every norm is finite.
        # A gradient with an inf/NaN entry has a non-finite norm; the signal skips that step, and storing it
        # would make the next cosine NaN (and E jump). The test runs on the host values already read, so it
        # adds no op and no sync; the copy is issued after the sync instead of before it (same op count).
        grad_norms = [v if gs else None for v, gs in zip(vals[:L], grads)]
        finite = all(map(math.isfinite, vals[:L]))
        if finite:
            self._store(grads, flat)
        # With finite norms a NaN cosine is 0/0: this or the previous gradient is zero (a perfect fit, say), so
        # the direction is undefined; None leaves E where it was, as on a first step.
        cos_iter = iter(vals[L:])
        cosines = [next(cos_iter) if hp else None for hp in has_prev]
        if finite:
            cosines = [None if c != c else c for c in cosines]
        return grad_norms, cosines

    def _drop_reshaped(self, grads) -> bool:
        """Forget the stored gradient of each adapter whose blocks changed shape since it was stored (paired as
        `__call__` pairs them). True if any was."""
        dropped = False
        for a, (gs, prev) in enumerate(zip(grads, self.prev)):
            k, h, hp = min(len(gs), len(prev)) // 2, len(gs) // 2, len(prev) // 2
            if gs and prev and any(g.shape != q.shape for g, q in zip(gs[:k] + gs[h:h + k], prev[:k] + prev[hp:hp + k])):
                self.prev[a], dropped = [], True
        return dropped

    def _store(self, grads, flat) -> None:
        """Keep this step's gradients for the next cosine: copied into last step's buffers when the
        shapes match (no allocation), else fresh copies."""
        old = [t for gs in self.prev for t in gs]
        same_layout = [len(gs) for gs in self.prev] == [len(gs) for gs in grads] and all(
            o.shape == g.shape and o.dtype == g.dtype and o.device == g.device for o, g in zip(old, flat))
        if same_layout:
            torch._foreach_copy_(old, flat)
            return
        kept = self.prev + [[]] * (len(grads) - len(self.prev))  # an adapter with no gradient keeps its own
        self.prev = [[g.detach().clone() for g in gs] if gs else p for gs, p in zip(grads, kept)]

    def state_dict(self) -> dict:
        return {"prev": [[g.detach().cpu().clone() for g in gs] for gs in self.prev]}

    def load_state_dict(self, sd: dict, device=None) -> None:
        # copies: the next step writes into these buffers (`_store`), which must not be the caller's tensors (on
        # the CPU, `.to()` returned them: training a loaded controller changed the state dict it was loaded from)
        self.prev = [[g.detach().to(device=device, copy=True) for g in gs] for gs in sd["prev"]]
