"""The φ(t) signals and the state machine: seed trace, bounds, bad input, properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unified_lora import (ActuatorConfig, CompositeSignal, LossSignal, MachineConfig, ModeMachine, NonFiniteLossError,
                          SignalConfig, UnifiedController, format_console)
from unified_lora.config import LLAMA_RUN_LRS
from unified_lora.signals import HistoryNormalizer

SEED_TRACE = {  # v1 README, Llama-3.2-1B run (shock at 300, recovery at 500)
    250: "[250] Mode=1 φ=0.333 E_s=0.500 lr=5e-4",
    350: "[350] Mode=2 φ=0.827 E_s=4.979 lr=1e-4",
    550: "[550] Mode=1 φ=0.371 E_s=0.521 lr=5e-4",
    700: "[700] Mode=1 φ=0.333 E_s=0.500 lr=5e-4",
}


def test_v1_controller_reproduces_the_seed_llama_trace_exactly():
    ctrl = UnifiedController(alpha=0.1, beta=0.9, theta0=0.3, theta1=0.7,
                             actuators=ActuatorConfig(mode_lrs=LLAMA_RUN_LRS), print_fn=None)
    lines = {}
    for step in range(701):
        ctrl.update(5.0 if 300 <= step < 500 else 0.5)
        if step in SEED_TRACE:
            lines[step] = format_console(ctrl.trace[-1]).split("  (")[0]
    assert lines == SEED_TRACE


def test_v1_update_returns_the_mode_learning_rate():
    ctrl = UnifiedController(print_fn=None)
    assert ctrl.update(0.5) == 3e-5  # MULTI, the start state
    for _ in range(200):
        lr = ctrl.update(0.05)
    assert ctrl.mode == 0 and lr == 5e-5
    for _ in range(200):
        lr = ctrl.update(9.0)
    assert ctrl.mode == 2 and lr == 1e-5


@pytest.mark.parametrize("L", [0.1, 0.43, 2.33, 7.0])
def test_constant_loss_drives_phi_to_L_over_1_plus_L(L):
    s = LossSignal()
    for _ in range(400):
        phi = s.update(L)
    assert phi == pytest.approx(L / (1 + L), abs=1e-6)


def test_loss_scale_makes_lm_sized_losses_usable():
    raw, scaled = LossSignal(), LossSignal(loss_scale=5.0)
    for _ in range(300):
        raw.update(2.5), scaled.update(2.5)
    assert raw.phi > 0.7 and 0.3 <= scaled.phi < 0.7


def test_calibration_maps_the_warmup_mean_loss_to_the_target():
    s = LossSignal(calibration_steps=20, calibration_target=0.5)
    for _ in range(20):
        assert s.update(3.0) == 0.5  # held while calibrating
    assert s.loss_scale == pytest.approx(6.0)
    for _ in range(400):
        s.update(3.0)
    assert s.phi == pytest.approx(1 / 3, abs=1e-6)


def test_nan_loss_is_skipped_and_flagged_without_poisoning_phi():
    ctrl = UnifiedController(print_fn=None)
    for _ in range(50):
        ctrl.update(0.5)
    phi = ctrl.phi
    ctrl.update(float("nan"))
    assert ctrl.phi == phi and ctrl.trace[-1].nonfinite and ctrl.nonfinite_steps == 1
    ctrl.update(float("inf"))
    ctrl.update(0.5)
    assert math.isfinite(ctrl.phi) and ctrl.nonfinite_steps == 2


def test_max_stress_policy_pushes_phi_up_for_that_step_only():
    s = LossSignal(nonfinite="max_stress")
    for _ in range(50):
        s.update(0.5)
    before, E = s.phi, s.E_s
    s.update(float("nan"))
    assert s.phi > before and s.E_s == E
    for _ in range(300):
        s.update(0.5)
    assert s.phi == pytest.approx(1 / 3, abs=1e-4)


def test_raise_policy_raises_a_clear_error():
    with pytest.raises(NonFiniteLossError, match="loss: got nan"):
        LossSignal(nonfinite="raise").update(float("nan"))


def test_composite_signal_is_half_until_ten_values_then_normalised():
    s = CompositeSignal()
    for i in range(9):
        s.update(1.0, [0.1 * (i + 1)], [0.5])
        assert s.components["phi_norm"] == 0.5
    s.update(1.0, [10.0], [0.5])
    assert s.components["phi_norm"] > 0.5
    assert set(s.components) >= {"C", "E", "S", "phi_raw", "phi_norm"}


def test_composite_convergence_term_rises_when_loss_jumps():
    s = CompositeSignal()
    for _ in range(100):
        s.update(1.0, [1.0], [1.0])
    assert s.components["C"] == 0.0
    s.update(5.0, [1.0], [1.0])
    assert s.components["C"] > 0.1


def test_gradient_surge_drives_composite_phi_towards_mirror():
    s = CompositeSignal()
    for _ in range(200):
        s.update(1.0, [1.0], [0.9])
    for _ in range(30):
        s.update(3.0, [20.0], [-0.5])
    assert s.phi >= 0.7


@pytest.mark.parametrize("kwargs,field", [
    (dict(theta0=0.7, theta1=0.3), "theta0"), (dict(theta0=0.5, theta1=0.5), "theta0"),
    (dict(theta1=1.5), "theta1"), (dict(min_dwell=-1), "min_dwell"), (dict(eval_interval=0), "eval_interval")])
def test_impossible_machine_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        MachineConfig(**kwargs)


@pytest.mark.parametrize("kwargs,field", [(dict(alpha=0.0), "alpha"), (dict(beta=1.5), "beta"),
                                          (dict(loss_scale=-1), "loss_scale"), (dict(kind="x"), "kind")])
def test_bad_signal_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SignalConfig(**kwargs)


def test_v1_constructor_validates_its_arguments():
    with pytest.raises(ValueError, match="^theta0:"):
        UnifiedController(theta0=0.8, theta1=0.7)
    with pytest.raises(ValueError, match="^alpha:"):
        UnifiedController(alpha=2.0)


def test_transitions_move_one_mode_at_a_time():
    m = ModeMachine(initial_mode=0)
    t = m.step(0.95, 0)
    assert (t.old, t.new) == (0, 1)
    t = m.step(0.95, 1)
    assert (t.old, t.new) == (1, 2)


def test_warmup_and_eval_interval_gate_decisions():
    m = ModeMachine(warmup_steps=5, eval_interval=3)
    assert [m.step(0.99, s) for s in range(6)] == [None] * 6  # 0..5: warmup or off-interval
    assert m.step(0.99, 6) is not None


finite_losses = st.lists(st.floats(min_value=0, max_value=1e30, allow_nan=False), min_size=1, max_size=300)


@settings(max_examples=200, deadline=None)
@given(finite_losses)
def test_property_v1_phi_stays_finite_in_unit_interval(losses):
    s = LossSignal()
    for L in losses:
        phi = s.update(L)
        assert 0.0 <= phi <= 1.0 and math.isfinite(phi)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e6), st.floats(0, 1e6), st.floats(-1, 1)), min_size=1, max_size=200))
def test_property_composite_phi_stays_finite_in_unit_interval(seq):
    s = CompositeSignal()
    for loss, g, c in seq:
        phi = s.update(loss, [g, g / 2], [c, None])
        assert 0.0 <= phi <= 1.0 and math.isfinite(phi)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=300), st.integers(0, 20))
def test_property_transitions_never_skip_and_respect_dwell(phis, dwell):
    m = ModeMachine(min_dwell=dwell)
    last = None
    for step, phi in enumerate(phis):
        t = m.step(phi, step)
        if t is None:
            continue
        assert abs(t.new - t.old) == 1
        if last is not None:
            assert t.step - last >= dwell
        last = t.step


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=600))
def test_property_history_normaliser_maps_into_unit_interval(xs):
    n = HistoryNormalizer()
    assert all(0.0 <= n(x) <= 1.0 for x in xs)


def _reference_stats(grads, prev):
    """float64 norm and cosine per adapter; cosine over the blocks present in both steps."""
    norms, cos = [], []
    for a, gs in enumerate(grads):
        norms.append(math.sqrt(sum(float((g.double() ** 2).sum()) for g in gs)))
        if prev is None:
            cos.append(None)
            continue
        pv = prev[a]
        k = min(len(gs), len(pv)) // 2
        cur = gs[:k] + gs[len(gs) // 2:len(gs) // 2 + k]
        prv = pv[:k] + pv[len(pv) // 2:len(pv) // 2 + k]
        dot = sum(float((c.double() * p.double()).sum()) for c, p in zip(cur, prv))
        cn = sum(float((c.double() ** 2).sum()) for c in cur)
        pn = sum(float((p.double() ** 2).sum()) for p in prv)
        cos.append(dot / math.sqrt(cn * pn))
    return norms, cos


def test_gradient_stats_match_a_float64_reference_across_a_rank_change():
    from unified_lora import NestedLoRALayer
    from unified_lora.signals import GradientStats

    torch.manual_seed(0)
    layers = [NestedLoRALayer(torch.nn.Linear(12, 10), rank_levels=(4, 8, 16), initial_rank=8) for _ in range(3)]
    stats, prev = GradientStats(), None

    def fill(correlated_with=None):
        grads = []
        for i, layer in enumerate(layers):
            ps = layer.active_parameters()
            for j, p in enumerate(ps):
                g = torch.randn_like(p)
                if correlated_with is not None and j < len(correlated_with[i]) // 2 and \
                        correlated_with[i][j].shape == p.shape:
                    g = 0.8 * correlated_with[i][j] + 0.2 * g  # a real, non-trivial cosine
                p.grad = g
            grads.append([p.grad.clone() for p in ps])
        return grads

    for step in range(4):
        if step == 2:
            for layer in layers:
                layer.set_rank(16)  # the cosine must pair only the blocks active in both steps
        grads = fill(prev)
        norms, cos = stats(layers)
        ref_n, ref_c = _reference_stats(grads, prev)
        assert norms == pytest.approx(ref_n, rel=1e-5)
        if prev is None:
            assert cos == [None] * 3
        else:
            assert cos == pytest.approx(ref_c, abs=1e-5)
            assert all(abs(c) > 0.05 for c in cos)
        prev = grads
    kept = [t.data_ptr() for gs in stats.prev for t in gs]
    fill(prev)
    stats(layers)
    assert [t.data_ptr() for gs in stats.prev for t in gs] == kept  # same shapes: buffers reused
    for layer in layers:
        layer.active_parameters()[0].grad.add_(1.0)  # the stored copy must not alias the live gradient
    assert not torch.equal(stats.prev[0][0], layers[0].active_parameters()[0].grad)


@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_gradient_stats_keep_the_last_finite_gradient_across_a_non_finite_step(bad, first):
    # the "previous" gradient of the next cosine is the last finite one: an inf/NaN step stores nothing
    from unified_lora import NestedLoRALayer
    from unified_lora.signals import GradientStats

    torch.manual_seed(0)
    layers = [NestedLoRALayer(torch.nn.Linear(12, 10), rank_levels=(4, 8, 16), initial_rank=8) for _ in range(2)]
    stats = GradientStats()

    def fill(like=None):
        for i, layer in enumerate(layers):
            for j, p in enumerate(layer.active_parameters()):
                p.grad = torch.randn_like(p) if like is None else 0.7 * like[i][j] + 0.3 * torch.randn_like(p)
        return [[p.grad.clone() for p in layer.active_parameters()] for layer in layers]

    g1 = None if first else fill()
    if not first:
        stats(layers)
    kept = [t.clone() for gs in stats.prev for t in gs]
    fill()
    layers[1].active_parameters()[0].grad[0, 0] = bad
    norms, cos = stats(layers)
    assert math.isfinite(norms[0]) and not math.isfinite(norms[1])
    stored = [t for gs in stats.prev for t in gs]
    assert len(stored) == len(kept) and all(torch.equal(a, b) for a, b in zip(stored, kept))
    g2 = fill(g1)
    norms, cos = stats(layers)
    ref_n, ref_c = _reference_stats(g2, g1)
    assert norms == pytest.approx(ref_n, rel=1e-5)
    if first:
        assert cos == [None, None]  # still no previous gradient, as on a first step
    else:
        assert cos == pytest.approx(ref_c, abs=1e-5) and all(c > 0.3 for c in cos)


@pytest.mark.parametrize("cos", [float("nan"), float("inf")])
def test_composite_signal_skips_a_non_finite_cosine_like_a_non_finite_norm(cos):
    s = CompositeSignal()
    for i in range(20):
        s.update(1.0 + 0.01 * i, [1.0, 2.0], [0.5, None if i == 0 else 0.4])
    before = s.state_dict()
    s.update(1.0, [1.0, 2.0], [0.5, cos])  # max(0, nan) is 0 in Python: it used to count as full churn
    assert s.state_dict() == before and s.components["nonfinite"]
    with pytest.raises(NonFiniteLossError, match="cosine"):
        CompositeSignal(nonfinite="raise").update(1.0, [1.0], [cos])


def test_a_negative_loss_is_refused_by_the_v1_signal_before_it_corrupts_phi():
    """D = E_s/(1+E_s) maps [0, inf) to [0, 1) only. A loss of -1 used to drive E_s to -1 and φ to about -1e13
    (SINGLE, and hundreds of steps to come back); a loss of -0.5 gave φ ≈ -1. Now a clear ValueError, before any
    state moves (calibration included); -inf stays with the nonfinite policy."""
    ctrl = UnifiedController(print_fn=None)
    ctrl.update(0.5)
    before = (ctrl.signal.state_dict(), ctrl.global_step, ctrl.loss_ema, ctrl.mode)
    with pytest.raises(ValueError, match=r"^loss: the v1 loss signal needs a loss >= 0.*got -1\.0"):
        ctrl.update(-1.0)
    assert (ctrl.signal.state_dict(), ctrl.global_step, ctrl.loss_ema, ctrl.mode) == before
    with pytest.raises(ValueError, match="needs a loss >= 0"):
        LossSignal(calibration_steps=5).update(-0.5)
    s = LossSignal()
    assert s.update(0.0) == pytest.approx(0.9 * 0.5 + 0.1 * 0.9 / 1.9) and s.update(-math.inf) == s.phi  # skipped


def test_the_machine_refuses_a_nan_phi_instead_of_reading_it_as_single():
    """NaN fails every comparison, so zone() took it for SINGLE and stepped the machine down."""
    m = ModeMachine()
    with pytest.raises(ValueError, match="^phi: got NaN at step 3"):
        m.step(float("nan"), 3)
    assert m.mode == 1 and m.last_transition_step is None


@pytest.mark.parametrize("scale", [1e-15, 1e-12, 1e-9, 1.0, 1e6, 1e9, 1e12])
def test_gradient_cosines_match_a_float64_reference_at_any_gradient_scale(scale):
    """The cosine's denominator was sqrt(‖c‖²·‖p‖²) in fp32: the product of squares underflows below gradient
    norms of ~1e-10 (near a perfect fit) and overflows above ~4e9. Norms of ~1e-12 gave a cosine of 1.8e6, so
    E = 1 − cos was hugely negative; norms of ~1e10 gave 0 (full churn) for gradients that barely turned."""
    from unified_lora import NestedLoRALayer
    from unified_lora.signals import GradientStats

    torch.manual_seed(0)
    layers = [NestedLoRALayer(torch.nn.Linear(12, 10), rank_levels=(4, 8, 16), initial_rank=8) for _ in range(2)]
    stats, prev = GradientStats(), None
    for step in range(3):
        grads = []
        for i, layer in enumerate(layers):
            gs = []
            for j, p in enumerate(layer.active_parameters()):
                g = torch.randn_like(p)
                if prev is not None:
                    g = 0.7 * prev[i][j] / scale + 0.3 * g
                p.grad = g * scale
                gs.append(p.grad.clone())
            grads.append(gs)
        norms, cos = stats(layers)
        ref_n, ref_c = _reference_stats(grads, prev)
        assert norms == pytest.approx(ref_n, rel=1e-5)
        if prev is not None:
            assert all(-1.0 <= c <= 1.0 for c in cos) and cos == pytest.approx(ref_c, abs=1e-4)
        prev = grads


def test_a_zero_gradient_has_no_cosine_and_leaves_direction_churn_where_it_was():
    """cos(0, g) is undefined. It used to come out as 0/1e-30 = 0, i.e. full churn (E → 1) at a perfect fit
    whose loss and gradients are exactly 0, and again on the step after it. Now it is None, as on a first
    step: E holds, and the zero gradient is stored (it is finite), not skipped as non-finite."""
    from unified_lora import NestedLoRALayer
    from unified_lora.signals import GradientStats

    torch.manual_seed(0)
    layers = [NestedLoRALayer(torch.nn.Linear(12, 10), rank_levels=(4, 8, 16), initial_rank=8) for _ in range(2)]
    stats, sig = GradientStats(), CompositeSignal()

    def step(zero_first):
        for i, layer in enumerate(layers):
            for p in layer.active_parameters():
                p.grad = torch.zeros_like(p) if (zero_first and i == 0) else torch.ones_like(p)
        norms, cos = stats(layers)
        sig.update(1.0, norms, cos)
        return norms, cos

    step(False)
    step(False)
    E0 = [e.value for e in sig.E]
    assert E0[0] == pytest.approx(0.0, abs=1e-6)  # same direction twice: no churn
    norms, cos = step(True)
    assert norms[0] == 0.0 and cos[0] is None and cos[1] == pytest.approx(1.0)
    assert not sig.components["nonfinite"] and sig.E[0].value == E0[0]
    assert all(torch.equal(g, torch.zeros_like(g)) for g in stats.prev[0])  # stored, not skipped
    norms, cos = step(False)  # against a zero previous gradient: still no cosine
    assert cos[0] is None and sig.E[0].value == E0[0]
    norms, cos = step(False)
    assert cos[0] == pytest.approx(1.0)


def test_the_history_normaliser_is_scale_free_and_gives_one_half_for_a_constant():
    """The z-score used an absolute 'std < 1e-12 means constant' test. A constant history of 12345.678 (a
    gradient norm of that size) has a mean with a rounding error of ~1e-12, which was read as spread: z = ±1,
    so the normalised value was 1/3 or 2/3 instead of 0.5. And any history whose spread was below 1e-12 (tiny
    gradients) counted as constant, so φ never moved. The z-score is now the same at every scale."""
    import random

    for x in [0.0, 1e-20, 0.1, 1.7, 12345.678, 100000.3, 3.3e7, 1e30]:
        n = HistoryNormalizer()
        assert {n(x) for _ in range(600)} == {0.5}, x
    rng = random.Random(0)
    for trial in range(20):
        xs = [rng.random() * (10 if rng.random() < 0.1 else 1) for _ in range(rng.randint(10, 700))]
        ref = HistoryNormalizer()
        want = [ref(x) for x in xs]
        for scale in (1e-15, 1e-9, 1e4, 1e15):
            n = HistoryNormalizer()
            assert [n(x * scale) for x in xs] == pytest.approx(want, abs=1e-9), (trial, scale)


def test_calibration_on_a_zero_or_tiny_warmup_loss_and_a_huge_loss_keep_phi_meaningful():
    """The calibrated scale was max(mean, 1e-8) / target. A warm-up of exact zeros (a perfect fit) gave a scale of
    2e-8, so any later loss, 0.01 say, read as 5e5 and pinned φ near 1 (MIRROR); a warm-up mean of 1e-9 was mapped
    to 0.05, not to the target. And a finite loss over a tiny scale overflowed to inf: E_s = inf, D = inf/inf, and
    φ was NaN for the rest of the run."""
    s = LossSignal(calibration_steps=5)
    for _ in range(5):
        s.update(0.0)
    assert s.loss_scale == 1.0  # no scale maps 0 to 0.5: the configured one stays
    for _ in range(400):
        s.update(0.43)
    assert s.phi == pytest.approx(0.43 / 1.43, abs=1e-6)
    s = LossSignal(calibration_steps=5, loss_scale=4.0)
    for _ in range(5):
        s.update(0.0)
    assert s.loss_scale == 4.0
    for tiny in (1e-9, 1e-30, 5e-324):
        s = LossSignal(calibration_steps=5)
        for _ in range(5):
            s.update(tiny)
        for _ in range(400):
            s.update(tiny)
        assert s.phi == pytest.approx(1 / 3, abs=1e-6), tiny
    s = LossSignal(calibration_steps=3)
    for _ in range(3):
        s.update(1e-300)
    for loss in (1e-300, 1e300, 1e308, 1e-300):
        phi = s.update(loss)
        assert math.isfinite(phi) and 0.0 <= phi <= 1.0 and math.isfinite(s.components["D"])
    for _ in range(20000):
        phi = s.update(1e-300)
    assert phi < 0.35  # and the run comes back from the shock


def test_gradient_stats_give_none_for_an_adapter_without_gradient_and_refuse_a_half_frozen_one():
    from unified_lora import NestedLoRALayer
    from unified_lora.signals import GradientStats

    torch.manual_seed(0)
    layers = [NestedLoRALayer(torch.nn.Linear(12, 10), rank_levels=(4, 8, 16), initial_rank=8) for _ in range(3)]
    stats, sig = GradientStats(), CompositeSignal()

    def fill(skip=()):
        for i, layer in enumerate(layers):
            for p in layer.active_parameters():
                p.grad = None if i in skip else torch.randn_like(p)

    fill(skip=(1,))  # adapter 1 skipped on the very first step: nothing stored for it yet
    norms, cos = stats(layers)
    assert norms[1] is None and norms[0] > 0 and cos == [None] * 3 and stats.prev[1] == []
    sig.update(1.0, norms, cos)
    assert sig.S[1].value is None and sig.components["S"] == pytest.approx((norms[0] + norms[2]) / 2)
    fill()
    stats(layers)
    kept = [t.clone() for t in stats.prev[2]]
    fill(skip=(2,))
    norms, cos = stats(layers)
    assert norms[2] is None and cos[2] is None and cos[0] is not None
    assert all(torch.equal(a, b) for a, b in zip(stats.prev[2], kept))
    fill(skip=(0, 1, 2))
    assert stats(layers) == ([None] * 3, [None] * 3)
    fill()
    layers[0].lora_A[0].requires_grad_(False)  # a frozen block beside trained ones
    layers[0].lora_A[0].grad = None
    with pytest.raises(ValueError, match="adapter 0 has a gradient on some of its active blocks"):
        stats(layers)


def test_a_layer_skipped_after_a_rank_raise_under_zero_grad_set_to_none_false_is_read_as_skipped():
    """With optimizer.zero_grad(set_to_none=False), a layer that LayerDrop skips keeps zero gradients on the blocks
    that had one, and None on the blocks a rank raise just activated. The composite signal took that for a
    half-frozen adapter and ctrl.step raised "adapter 2 has a gradient on some of its active blocks and none on
    others", ending the run. A trainable block with no gradient means the layer took no part in this forward: it
    is now read as skipped (its S, E and stored gradient held), as README promises for a LayerDrop-skipped layer."""
    from conftest import classification_batch, tiny_bert
    from unified_lora import setup_unified_lora

    model = tiny_bert()
    adapters, ctrl = setup_unified_lora(model, target_modules=["query", "value"], signal="composite", print_fn=None,
                                        machine=MachineConfig(theta0=0.0, theta1=1.0, initial_mode=0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctrl.attach_optimizer(opt)
    x, y = classification_batch(8, 8)
    encoder, layers = model.bert.encoder, model.bert.encoder.layer
    for step in range(3):
        if step == 1:  # LayerDrop: layer 1 skipped, right after the SINGLE -> MULTI raise (rank 4 -> 8)
            encoder.layer = torch.nn.ModuleList([layers[0]])
        model(input_ids=x, labels=y).loss.backward()
        encoder.layer = layers
        held = [e.value for e in ctrl.signal.S]
        ctrl.step(loss=1.0)
        if step == 0:
            assert ctrl.rank == 8
        if step == 1:
            skipped = [i for i, n in enumerate(adapters) if n.startswith("bert.encoder.layer.1.")]
            assert skipped == [2, 3] and all(ctrl.signal.S[i].value == held[i] for i in skipped)
            assert all(ctrl.signal.S[i].value != held[i] for i in (0, 1))
        opt.step()
        opt.zero_grad(set_to_none=False)


def test_the_convergence_term_sees_a_loss_rise_at_any_scale_and_sign():
    """C = max(0, (fast − slow)/slow) was forced to 0 unless slow > 1e-12: a loss near a perfect fit (1e-13) that
    jumped 10× gave C = 0, and so did any objective below 0, for which the README recommends this signal."""
    def C_after_jump(base, jump):
        s = CompositeSignal()
        for i in range(50):
            s.update(base, [1.0], [None if i == 0 else 0.5])
        for _ in range(5):
            s.update(base + jump, [1.0], [0.5])
        return s.components["C"]

    ref = C_after_jump(1.0, 9.0)
    assert ref > 0.5
    for scale in (1e-13, 1e-30, 1e20):
        assert C_after_jump(scale, 9.0 * scale) == pytest.approx(ref, rel=1e-9), scale
    assert C_after_jump(-2.0, 1.0) > 0.1  # a negative objective that rises
    assert C_after_jump(-2.0, -1.0) == 0.0 and C_after_jump(1.0, -0.5) == 0.0  # falling losses: no stress
    assert math.isfinite(C_after_jump(1e-300, 1e300)) and C_after_jump(0.0, 0.0) == 0.0


def test_the_composite_signal_runs_on_a_float64_model_and_with_float64_as_the_default_dtype():
    # GradientStats asked torch for fp32 norms, which torch refuses for fp64 input ("should be convertible without
    # narrowing"): a float64 model (a numerics check, a gradcheck-style run) failed at its first ctrl.step with the
    # composite signal, while the loss signal and Mirror (fp64 drift) ran. Its segment sums were also built in
    # torch's default dtype, so torch.set_default_dtype(torch.float64) broke an fp32 model the same way. Now the sums
    # run in fp64 for fp64 gradients, fp32 otherwise; the fp64 result matches an fp64 reference to 1e-12.
    from unified_lora import NestedLoRALayer
    from unified_lora.signals import GradientStats

    torch.manual_seed(0)
    layers = [NestedLoRALayer(torch.nn.Linear(12, 10).double(), rank_levels=(4, 8, 16), initial_rank=8)
              for _ in range(2)]
    stats, prev = GradientStats(), None
    for step in range(3):
        grads = []
        for layer in layers:
            for p in layer.active_parameters():
                p.grad = torch.randn_like(p) * 1e-3 + (prev[0][0].mean() if prev else 0.0)
            grads.append([p.grad.clone() for p in layer.active_parameters()])
        assert grads[0][0].dtype == torch.float64
        norms, cos = stats(layers)
        ref_n, ref_c = _reference_stats(grads, prev)
        assert norms == pytest.approx(ref_n, rel=1e-12)
        if prev is not None:
            assert cos == pytest.approx(ref_c, abs=1e-12)
        prev = grads

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        layer = NestedLoRALayer(torch.nn.Linear(12, 10).float(), rank_levels=(4, 8, 16), initial_rank=8)
        stats = GradientStats()
        for step in range(2):
            for p in layer.active_parameters():
                p.grad = torch.randn_like(p)
            norms, cos = stats([layer])
            assert math.isfinite(norms[0]) and (cos[0] is None) == (step == 0)
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("kwargs,field", [
    (dict(kind="composite", calibration_steps=50), "calibration_steps"),
    (dict(kind="composite", loss_scale=0.1), "loss_scale"),
    (dict(kind="composite", calibration_target=2.0), "calibration_target"),
    (dict(kind="composite", beta=0.5), "beta"),
    (dict(kind="loss", weights=(0.5, 0.5, 0.0)), "weights"),
    (dict(kind="loss", history=100), "history"),
    (dict(kind="loss", min_history=20), "min_history")])
def test_a_signal_setting_the_chosen_kind_does_not_read_is_refused_not_ignored(kwargs, field):
    # SignalConfig(kind="composite", calibration_steps=50) built, and the run went on uncalibrated: the composite
    # signal reads neither beta, a loss scale nor a calibration (and the loss signal reads no weights or history).
    # The codebase refuses settings that would be ignored (ActuatorConfig's mode_multipliers); these are too.
    with pytest.raises(ValueError, match=f"^{field}: .* would be ignored: the '{kwargs['kind']}' signal does not read"):
        SignalConfig(**kwargs)
    if field == "beta":  # the v1 keyword on the controller goes through the same check
        with pytest.raises(ValueError, match="^beta: .* would be ignored"):
            UnifiedController(signal="composite", beta=0.5, print_fn=None)
    # what each kind does read is still free, and defaults given explicitly are fine
    SignalConfig(kind="composite", alpha=0.2, weights=(0.2, 0.3, 0.5), history=100, min_history=5, beta=0.9,
                 loss_scale=1.0, nonfinite="raise")
    SignalConfig(kind="loss", alpha=0.2, beta=0.5, loss_scale=0.1, calibration_steps=5, calibration_target=2.0,
                 weights=[0.3, 0.3, 0.4], history=500)


def test_direction_churn_is_averaged_over_the_adapters_that_have_one_as_the_stress_term_is():
    # An adapter with no cosine yet (one the loss never reaches, or one LayerDrop skipped until now) counted as
    # E = 0 in the mean, while S left an adapter with no norm out: with one of two adapters never reached, E was
    # half the reached adapter's churn for the whole run, and φ_raw weighed E at 0.15 instead of SPEC's 0.3.
    from unified_lora import NestedLoRALayer
    from unified_lora.signals import GradientStats

    torch.manual_seed(0)
    layers = [NestedLoRALayer(torch.nn.Linear(12, 10), rank_levels=(4, 8, 16), initial_rank=8) for _ in range(2)]
    stats, sig = GradientStats(), CompositeSignal()
    churn = None
    for step in range(4):
        for p in layers[0].active_parameters():
            p.grad = torch.randn_like(p)  # adapter 1 never gets a gradient
        norms, cos = stats(layers)
        assert norms[1] is None and cos[1] is None
        sig.update(1.0, norms, cos)
        if cos[0] is not None:
            x = 1.0 - max(0.0, cos[0])
            churn = x if churn is None else 0.9 * churn + 0.1 * x
        assert sig.components["S"] == pytest.approx(sig.S[0].value)
        assert sig.components["E"] == pytest.approx(churn if churn is not None else 0.0)
    assert churn > 0.5  # random gradients: a real churn, which the old mean halved
