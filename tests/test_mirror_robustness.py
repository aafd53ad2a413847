"""Mirror under conditions a training run meets: fp64 models, a dtype cast between MIRROR entry and exit
(eager and fused kernels), and `snapshot_optimizer=True` with optimizers beyond Adam/SGD.

Every test drives real tiny models and real optimizers through the public controller API: a loss signal with
alpha=1 makes φ = L / (1 + L), so a fed loss of 10 enters MIRROR and 1 brings the machine back to MULTI."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers.optimization import Adafactor

from conftest import can_build_cpp
from unified_lora import MirrorConfig, SignalConfig, setup_unified_lora
from unified_lora.mirror import MirrorSnapshot

MIRROR, MULTI = 2, 1
FAST = SignalConfig(kind="loss", alpha=1.0, beta=0.01)
PLAN = [1.0, 10.0, 10.0, 10.0, 1.0, 1.0]  # MULTI, enter MIRROR at step 1, stay, leave at step 4, MULTI
FUSED = pytest.param("fused", marks=pytest.mark.skipif(not can_build_cpp(),
                                                        reason="kernel='fused' needs g++ and ninja"))


def _mcfg(kernel: str, **kw) -> MirrorConfig:
    if kernel == "eager_unpacked":
        return MirrorConfig(kernel="eager", pack=False, **kw)
    return MirrorConfig(kernel=kernel, **kw)


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 3)).to(dtype)


def _state_copy(opt, params):
    """Each parameter's complete optimizer state (None where it has none), tensors cloned."""
    return [None if not opt.state.get(p) else
            {k: (v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in opt.state[p].items()}
            for p in params]


def _assert_same_state(got, want):
    assert (got is None) == (want is None)
    if want is None:
        return
    assert list(got) == list(want)  # the same keys, in the same order
    for k, w in want.items():
        g = got[k]
        if torch.is_tensor(w):
            assert torch.is_tensor(g) and g.dtype == w.dtype and g.device == w.device and g.shape == w.shape, k
            assert torch.equal(g, w), k
        else:
            assert type(g) is type(w) and g == w, k


def _lora(ctrl):
    return [p for a in ctrl.adapters for p in a.lora_parameters()]


def _ref_drift(ws, snaps):
    """Σ‖W − W_snap‖ / Σ‖W_snap‖ in fp64, W − W_snap formed in the wider of the two dtypes."""
    num = sum((w.double() - s.double()).norm().item() for w, s in zip(ws, snaps))
    return num / sum(s.double().norm().item() for s in snaps)


def _drive(model, mirror, make_opt, x, plan=PLAN, before_step=None):
    """Train `model` through `plan` (one fed loss per step). Records: the weights and optimizer state right after
    the snapshot, the weights just before the exit step's ctrl.step, the weights and state right after it."""
    # the blocks in the model's own dtype (not PEFT's fp32 upcast of a half-precision base): the dtype under test
    adapters, ctrl = setup_unified_lora(model, target_modules=["0", "2"], print_fn=None, signal=FAST, mirror=mirror,
                                        autocast_adapter_dtype=False)
    opt = make_opt([p for p in model.parameters() if p.requires_grad])
    ctrl.attach_optimizer(opt)
    rec = {}
    for i, fed in enumerate(plan):
        if before_step is not None:
            x = before_step(i, model, opt, ctrl, x)
        out = model(x)
        (out.float() - 0.5).pow(2).mean().backward()
        params = ctrl.managed_parameters()
        if ctrl.mode == MIRROR and fed < 10:
            rec["at_exit"] = [p.detach().clone() for p in _lora(ctrl)]
        tr = ctrl.step(fed)
        if tr and tr[0].new == MIRROR:
            rec["snap"] = [p.detach().clone() for p in params]
            rec["snap_opt"] = _state_copy(opt, params)
        if tr and tr[0].old == MIRROR:
            rec["decision"] = ctrl.last_decision
            rec["restored"] = [p.detach().clone() for p in params]
            rec["restored_opt"] = _state_copy(opt, params)
            rec["exit_record"] = ctrl.trace[-1]
        opt.step()
        opt.zero_grad()
    assert "snap" in rec and "decision" in rec, "the plan must enter and leave MIRROR"
    rec["ctrl"], rec["opt"] = ctrl, opt
    return rec


# ---------------------------------------------------------------------------------------------- fp64 models
@pytest.mark.parametrize("kernel", ["eager", "eager_unpacked"])
@pytest.mark.parametrize("policy", ["drift", "never", "always", "loss_worse"])
def test_an_fp64_model_goes_through_mirror_with_every_policy_and_an_fp64_drift(policy, kernel):
    # the adapter follows the base layer's dtype: an fp64 model has fp64 LoRA blocks and an fp64 snapshot
    x = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rec = _drive(_model(torch.float64), _mcfg(kernel, policy=policy), lambda ps: torch.optim.AdamW(ps, lr=1e-2), x)
    ctrl, d = rec["ctrl"], rec["decision"]
    assert all(p.dtype == torch.float64 for p in ctrl.managed_parameters())
    assert rec["exit_record"].transition == "MIRROR->MULTI" and ctrl.mode == MULTI
    # accumulated in fp64: the drift matches the fp64 formula far below fp32 rounding
    want = _ref_drift(rec["at_exit"], rec["snap"][:len(rec["at_exit"])])
    assert 0 < d.drift and math.isclose(d.drift, want, rel_tol=1e-12)
    assert rec["exit_record"].drift == d.drift
    if d.restore:
        assert all(torch.equal(p, s) for p, s in zip(rec["restored"], rec["snap"]))
    else:
        assert not all(torch.equal(p, s) for p, s in zip(rec["restored"], rec["snap"]))
    assert d.restore is {"always": True, "never": False, "drift": d.drift < 0.05,
                         "loss_worse": d.loss_at_exit > d.loss_at_entry}[policy]


@pytest.mark.parametrize("kernel", ["eager", "eager_unpacked"])
def test_a_model_cast_to_fp64_just_before_mirror_entry_is_measured_and_restored(kernel):
    # the tester's sequence: train in fp32, cast to fp64, enter MIRROR at once, leave, restore
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))

    def cast(i, model, opt, ctrl, x):
        if i == 1:
            model.to(torch.float64)
        return x.to(next(model.parameters()).dtype)

    rec = _drive(_model(), _mcfg(kernel, policy="always"), lambda ps: torch.optim.SGD(ps, lr=0.5), x,
                 before_step=cast)
    assert rec["snap"][0].dtype == torch.float64
    assert math.isclose(rec["decision"].drift, _ref_drift(rec["at_exit"], rec["snap"]), rel_tol=1e-12)
    assert all(torch.equal(p, s) for p, s in zip(rec["restored"], rec["snap"]))


# ---------------------------------------------------------------------------- a cast between entry and exit
@pytest.mark.parametrize("kernel", ["eager", "eager_unpacked", FUSED])
@pytest.mark.parametrize("start,cast_to", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                           (torch.float32, torch.float64), (torch.float32, torch.float16)])
def test_a_cast_between_mirror_entry_and_exit_is_measured_in_the_wider_dtype_and_restored(kernel, start, cast_to):
    # the model is cast at the second MIRROR step and trains one step in the new dtype before the exit
    x0 = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))

    def cast(i, model, opt, ctrl, x):
        if i == 3:
            model.to(cast_to)
        return x0.to(next(model.parameters()).dtype)

    runs = {}
    for k in ([kernel, "eager_unpacked"] if kernel != "eager_unpacked" else [kernel]):
        runs[k] = _drive(_model(start), _mcfg(k, policy="always"), lambda ps: torch.optim.SGD(ps, lr=1e-3), x0,
                         before_step=cast)
    rec = runs[kernel]
    assert rec["snap"][0].dtype == start and rec["at_exit"][0].dtype == cast_to
    # W − W_snap in the wider dtype: a bf16 snapshot against fp32 weights keeps the fp32 step's digits
    assert rec["decision"].drift == pytest.approx(_ref_drift(rec["at_exit"], rec["snap"]), rel=1e-5)
    # every kernel gives what the per-tensor eager computation gives, bit for bit
    assert rec["decision"].drift == runs["eager_unpacked"]["decision"].drift
    # the rollback is the snapshot, cast to the parameters' new dtype, and the run goes on
    assert all(p.dtype == cast_to and torch.equal(p, s.to(cast_to)) for p, s in zip(rec["restored"], rec["snap"]))
    assert rec["ctrl"].mode == MULTI and rec["ctrl"].trace[-1].transition is None


# --------------------------------------------------------------------- the complete optimizer state, restored
OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5, centered=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    "adafactor": lambda ps: Adafactor(ps, lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False,
                                      beta1=0.9),
}


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_restore_puts_back_the_weights_and_the_complete_optimizer_state(name, offload):
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    touched = {}

    def tamper(i, model, opt, ctrl, x):
        if i == 1:  # the state as the snapshot at this step's entry will see it
            touched["had"] = [p for p in ctrl.managed_parameters() if opt.state.get(p)]
        # after the last MIRROR step: a key appears on one parameter's state and one disappears from another's
        # (a user's hook, an optimizer that grows state lazily); the rollback must undo both
        if i == 4:
            first, second = touched["had"][0], touched["had"][-1]
            opt.state[first]["added_after_the_snapshot"] = torch.ones(2)
            gone = next(k for k, v in opt.state[second].items() if torch.is_tensor(v) and v.dim() > 0)
            del opt.state[second][gone]
            touched.update(first=first, second=second, gone=gone)
        return x

    rec = _drive(_model(), MirrorConfig(policy="always", snapshot_optimizer=True, offload_to_cpu=offload),
                 OPTIMIZERS[name], x, before_step=tamper)
    params = rec["ctrl"].managed_parameters()
    assert rec["decision"].restore
    assert all(torch.equal(p, s) for p, s in zip(rec["restored"], rec["snap"]))
    # every entry of every parameter's state, Python scalars (Adafactor's step) included
    for got, want in zip(rec["restored_opt"], rec["snap_opt"]):
        _assert_same_state(got, want)
    # blocks paused at the entry had no state then; the state they gained in MIRROR is gone again
    assert any(s is None for s in rec["snap_opt"]) or name == "adagrad"  # Adagrad fills its state at construction
    snap = rec["ctrl"].mirror
    assert not snap.held  # the controller cleared it after the exit
    # the optimizer kept working on the restored state
    assert all(torch.isfinite(p).all() for p in params)
    assert "added_after_the_snapshot" not in rec["opt"].state[touched["first"]]


@pytest.mark.parametrize("kernel", ["eager", "eager_unpacked", FUSED])
@pytest.mark.parametrize("offload", [False, True])
def test_the_optimizer_snapshot_survives_state_dict_and_keeps_each_tensor_in_place(kernel, offload):
    # MirrorSnapshot directly: save with Adafactor's state, reload the snapshot into a fresh object, train on,
    # restore. A state tensor the optimizer still holds is written in place (same object, same device).
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in [(8, 16), (16, 8), (5,)]]
    opt = OPTIMIZERS["adafactor"](ps)

    def train(n):
        for _ in range(n):
            sum(((p - 0.3) ** 2).sum() for p in ps).backward()
            opt.step()
            opt.zero_grad()

    train(2)
    snap = MirrorSnapshot(_mcfg(kernel, snapshot_optimizer=True, offload_to_cpu=offload))
    snap.save(ps, optimizer=opt)
    want_w, want_opt = [p.detach().clone() for p in ps], _state_copy(opt, ps)
    other = MirrorSnapshot(_mcfg(kernel, snapshot_optimizer=True, offload_to_cpu=offload))
    other.load_state_dict(snap.state_dict())
    train(3)
    held = {k: v for k, v in opt.state[ps[0]].items() if torch.is_tensor(v)}
    other.restore(ps, optimizer=opt)
    assert all(torch.equal(p, w) for p, w in zip(ps, want_w))
    for p, want in zip(ps, want_opt):
        _assert_same_state(opt.state[p], want)
    assert all(opt.state[ps[0]][k] is v for k, v in held.items())
    train(1)  # and Adafactor carries on from it


# --------------------------------------------------------------------------------- clear errors at the exit
@pytest.mark.parametrize("kernel", ["eager", "eager_unpacked", FUSED])
def test_a_parameter_reshaped_since_the_save_is_a_value_error_naming_it_and_nothing_is_written(kernel):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.randn(8, 4))]
    snap = MirrorSnapshot(_mcfg(kernel))
    snap.save(ps)
    with torch.no_grad():
        ps[0].add_(1.0)
    ps[1].data = torch.randn(1, 4)  # broadcastable into the snapshot's (8, 4): must not be read as if it fit
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match=r"parameter 1 has shape \(1, 4\), but its snapshot has \(8, 4\)"):
        snap.drift(ps)
    with pytest.raises(ValueError, match=r"parameter 1 has shape \(1, 4\)"):
        snap.restore(ps)
    assert all(torch.equal(p, b) for p, b in zip(ps, before))  # the refused restore wrote nothing
    snap.save(ps, names=["q.lora_A.0", "q.lora_B.0"])  # a new save takes the new shape
    ps[0].data = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"parameter 0 \(q.lora_A.0\) has shape \(2, 8\)"):
        snap.drift(ps)


# ------------------------------------------------------------------------------ a merged layer at the restore
@pytest.mark.parametrize("kernel", ["eager", "eager_unpacked"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_restore_into_a_merged_layer_folds_the_restored_delta_and_its_unmerge_gives_the_base_weight_back(dtype,
                                                                                                          kernel):
    # the user merges one layer in MIRROR (layer "0" trains on, so ctrl.step still runs); the exit rolls the blocks
    # back. The merged base weight held the delta of the discarded blocks: a restore under it, then an unmerge (or
    # the exit's rank change, which unmerges and merges again), left their difference in the base weight for good.
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    held = {}

    def merge_in_mirror(i, model, opt, ctrl, x):
        if i == 3:
            layer = ctrl.adapters[-1]
            held["layer"], held["base"] = layer, layer.base_layer.weight.detach().clone()
            layer.merge()
        return x

    rec = _drive(_model(dtype), _mcfg(kernel, policy="always"), lambda ps: torch.optim.AdamW(ps, lr=1e-2), x,
                 before_step=merge_in_mirror)
    layer, base = held["layer"], held["base"]
    assert rec["decision"].restore and layer.merged_rank == layer.rank == 8  # still merged, at the exit's rank
    assert all(torch.equal(p, s) for p, s in zip(rec["restored"], rec["snap"]))
    # the merged weight is the base weight plus the restored blocks' delta, not the discarded blocks' delta
    want = layer._folded(base, layer.rank, +1)
    if dtype == torch.bfloat16:  # merge keeps a bf16 base weight, so every fold starts from the same base: bit for bit
        assert torch.equal(layer.base_layer.weight, want)
    else:  # fp32: unmerge subtracts, one ulp off at most
        torch.testing.assert_close(layer.base_layer.weight, want, rtol=0, atol=1e-6)
    layer.unmerge()
    if dtype == torch.bfloat16:
        assert torch.equal(layer.base_layer.weight, base)
    else:
        torch.testing.assert_close(layer.base_layer.weight, base, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- trainable parameters Mirror skips
def test_an_optimizer_that_trains_parameters_mirror_does_not_snapshot_warns_and_they_are_not_rolled_back():
    # BitFit + LoRA: biases made trainable after setup train in the optimizer, but the controller manages only the
    # LoRA blocks and modules_to_save. A restore then rolled the adapters back and left the biases where MIRROR took
    # them, silently; attaching such an optimizer now says so.
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    model = _model()
    adapters, ctrl = setup_unified_lora(model, target_modules=["0"], print_fn=None, signal=FAST,
                                        mirror=MirrorConfig(policy="always"))
    bias = model[2].bias
    bias.requires_grad_(True)  # layer "2" is not a target: a plain frozen Linear until this line
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with pytest.warns(UserWarning, match=r"trains 1 parameters this controller does not manage \(shapes \(3,\)\)"
                                         r".*leaves these at their values from the end of MIRROR"):
        ctrl.attach_optimizer(opt)
    snap = {}
    for fed in PLAN:
        (model(x) - 0.5).pow(2).mean().backward()
        tr = ctrl.step(fed)
        if tr and tr[0].new == MIRROR:
            snap["bias"], snap["lora"] = bias.detach().clone(), [p.detach().clone() for p in _lora(ctrl)]
        if tr and tr[0].old == MIRROR:  # what the warning says: the adapters are back, the bias is not
            assert all(torch.equal(p, s) for p, s in zip(_lora(ctrl), snap["lora"]))
            assert not torch.equal(bias, snap["bias"])
        opt.step()
        opt.zero_grad()
    # the usual set-up (every trainable parameter managed) attaches without a warning, and so does the v1 LR
    # controller, which has no Mirror
    import warnings

    from unified_lora import UnifiedController

    model = _model()
    adapters, ctrl = setup_unified_lora(model, target_modules=["0"], modules_to_save=["2"], print_fn=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ctrl.attach_optimizer(torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))
        UnifiedController(optimizer=torch.optim.SGD(_model().parameters(), lr=0.1), print_fn=None)


# ----------------------------------------------------------------------- what a default restore leaves as it was
@pytest.mark.parametrize("snapshot_optimizer", [False, True])
def test_a_restore_puts_back_every_block_and_the_head_and_the_optimizer_state_only_when_asked(snapshot_optimizer):
    # the README's account, against hand-made deep copies: every block (the r16 blocks too, which train in MIRROR
    # only) and the modules_to_save head come back bit for bit, with no gradient; the optimizer state comes back with
    # snapshot_optimizer=True, and is otherwise the state MIRROR left; the signal and the loss EMA are not reset
    from conftest import classification_batch, tiny_bert

    model = tiny_bert()
    adapters, ctrl = setup_unified_lora(model, target_modules=["query", "value"], modules_to_save=["classifier"],
                                        print_fn=None, signal=FAST,
                                        mirror=MirrorConfig(policy="always", snapshot_optimizer=snapshot_optimizer))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    ctrl.attach_optimizer(opt)
    x, y = classification_batch()
    params = ctrl.managed_parameters()
    for fed in [1.0, 1.0, 10.0, 10.0, 10.0, 1.0]:
        model(input_ids=x, labels=y).loss.backward()
        if ctrl.mode == MIRROR and fed < 10:
            before_exit = {"w": [p.detach().clone() for p in params], "opt": _state_copy(opt, params),
                           "phi": ctrl.phi, "sig": copy.deepcopy(ctrl.signal.state_dict())}
        tr = ctrl.step(fed)
        if tr and tr[0].new == MIRROR:
            entry = {"w": [p.detach().clone() for p in params], "opt": _state_copy(opt, params)}
        opt.step()
        opt.zero_grad(set_to_none=False)
    assert tr and tr[0].old == MIRROR and ctrl.trace[-1].snapshot == "restored"
    # MIRROR moved every block, the r16 ones (paused before it) and the head included
    assert not any(torch.equal(b, w) for b, w in zip(before_exit["w"], entry["w"]))
    # the weights: all of them, the paused r16 blocks and the head included, bit for bit; no gradient to apply
    assert all(torch.equal(p, w) for p, w in zip(params, entry["w"]))
    assert all(p.grad is None for p in params)
    # the optimizer state
    want = entry["opt"] if snapshot_optimizer else before_exit["opt"]
    for p, got, w in zip(params, _state_copy(opt, params), want):
        _assert_same_state(got, w)
    if not snapshot_optimizer:  # MIRROR's steps are still in it
        assert any(s is not None and (e is None or s["step"] != e["step"])
                   for s, e in zip(before_exit["opt"], entry["opt"]))
    # the signal went on from the exit step: it read this step's loss after the MIRROR steps, no reset
    assert ctrl.signal.state_dict() != before_exit["sig"] and ctrl.phi < before_exit["phi"]


# ------------------------------------------------------------------ a snapshot loaded under another snapshot_optimizer
@pytest.mark.parametrize("saved, loaded", [(True, False), (False, True), (True, True)])
def test_a_snapshot_loaded_under_another_snapshot_optimizer_warns_and_restores_what_it_holds(saved, loaded):
    # A state saved mid-MIRROR with the optimizer snapshot, loaded into a controller built with
    # snapshot_optimizer=False, still restored the optimizer state at the exit (and the reverse restored the weights
    # only), and nothing said so. The rule: the snapshot applies as it was taken (the run goes on as the saved one
    # would have), the config from the next entry on; a mismatch warns at the load, naming both.
    import warnings

    def build(snapshot_optimizer):
        model = _model()
        _, ctrl = setup_unified_lora(model, target_modules=["0", "2"], print_fn=None, signal=FAST,
                                     mirror=MirrorConfig(policy="always", snapshot_optimizer=snapshot_optimizer))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ctrl.attach_optimizer(opt)
        return model, ctrl, opt

    def train(model, ctrl, opt, plan):
        for fed in plan:
            (model(x) - 0.5).pow(2).mean().backward()
            tr = ctrl.step(fed)
            if tr and tr[0].new == MIRROR:
                entry.append(_state_copy(opt, ctrl.managed_parameters()))
            if tr and tr[0].old == MIRROR:
                exit_.append(_state_copy(opt, ctrl.managed_parameters()))
            opt.step()
            opt.zero_grad()

    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    entry, exit_ = [], []
    model, ctrl, opt = build(saved)
    train(model, ctrl, opt, PLAN[:3])  # MIRROR entered at step 1, still in it
    assert ctrl.mode == MIRROR and (ctrl.mirror.opt_state is not None) == saved
    states = copy.deepcopy((model.state_dict(), opt.state_dict(), ctrl.state_dict()))
    model2, ctrl2, opt2 = build(loaded)
    model2.load_state_dict(states[0])
    opt2.load_state_dict(states[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctrl2.load_state_dict(states[2])
    said = [str(w.message) for w in caught if "Mirror snapshot" in str(w.message)]
    if saved == loaded:
        assert not said
    else:
        held = "holds the optimizer state" if saved else "holds the weights only"
        assert len(said) == 1 and "\n" not in said[0], said
        assert said[0].startswith(f"ctrl.load_state_dict: the loaded Mirror snapshot {held}") and \
            f"this controller's MirrorConfig has snapshot_optimizer={loaded}. The snapshot applies as it was " \
            "taken" in said[0] and said[0].endswith("the config applies from the next MIRROR entry on"), said[0]
    train(model2, ctrl2, opt2, PLAN[3:])
    assert ctrl2.trace[-2].snapshot == "restored"
    # the optimizer state at the exit: the entry's where the snapshot holds it, MIRROR's own steps' where it does not
    for got, want in zip(exit_[0], entry[0]):
        if saved:
            _assert_same_state(got, want)
        elif want is not None:
            assert got["step"] != want["step"]
