"""The controller: actuators (rank, LR, Mirror), state, trace, and end-to-end stress cycles."""

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import VOCAB, can_build_cpp, classification_batch, snapshot_then_train, tiny_bert, tiny_llama
from unified_lora import (ActuatorConfig, MirrorConfig, MirrorSnapshot, NonFiniteLossError, SignalConfig,
                          NestedLoRALayer, UnifiedController, lora_state_dict, read_trace, setup_unified_lora)


def _train_step(model, ctrl, opt, x, labels):
    loss = model(input_ids=x, labels=labels).loss
    loss.backward()
    ctrl.step(loss=loss.item())
    opt.step()
    opt.zero_grad()
    return loss.item()


@pytest.mark.parametrize("reduce", [lambda v: np.mean([v]), lambda v: torch.tensor([v]).mean()],
                         ids=["numpy", "tensor"])
def test_a_reduce_loss_giving_a_numpy_float_or_a_tensor_keeps_the_state_loadable_with_weights_only(bert, tmp_path,
                                                                                                  reduce):
    """A `reduce_loss` written with numpy (np.mean of gathered losses) gives an np.float64: it went into loss_ema and
    ctrl.state_dict() as such, and torch.load's default, weights_only=True, refused the saved state ("Unsupported
    global: numpy ... scalar"), as the Trainer callback's resume now does. A tensor went in as a tensor. Both are a
    float now, as a loss passed to ctrl.step is."""
    _, ctrl = setup_unified_lora(bert, target_modules=["query", "value"], signal="loss", print_fn=None,
                                 reduce_loss=reduce)
    opt = torch.optim.AdamW([p for p in bert.parameters() if p.requires_grad], lr=1e-3)
    ctrl.attach_optimizer(opt)
    x, y = classification_batch(n=4)
    for _ in range(2):
        _train_step(bert, ctrl, opt, x, y)
    assert type(ctrl.loss_ema) is float and type(ctrl.trace[-1].loss) is float
    torch.save(ctrl.state_dict(), tmp_path / "ctrl.pt")
    loaded = torch.load(tmp_path / "ctrl.pt", weights_only=True)
    assert loaded["loss_ema"] == ctrl.loss_ema


def test_setup_returns_named_adapters_at_the_multi_rank(llama):
    adapters, ctrl = setup_unified_lora(llama, target_modules=["q_proj", "v_proj"], print_fn=None)
    assert len(adapters) == 4 and ctrl.mode == 1 and all(a.rank == 8 for a in adapters.values())


def test_step_before_any_backward_is_a_clear_error(llama):
    _, ctrl = setup_unified_lora(llama, target_modules=["q_proj"], signal="loss", print_fn=None)
    with pytest.raises(ValueError, match="call loss.backward"):
        ctrl.step(loss=1.0)


def test_a_step_after_training_on_merged_adapters_says_they_are_merged(bert):
    """Merging for an evaluation and training on without unmerging: the head's backward runs, the merged layers
    take no part, and ctrl.step used to say "call loss.backward()", which the loop had just done."""
    from unified_lora import merge_adapters, unmerge_adapters
    _, ctrl = setup_unified_lora(bert, target_modules=["query", "value"], modules_to_save=["classifier"],
                                 print_fn=None)
    x, y = classification_batch(n=8)
    merge_adapters(bert)
    bert(input_ids=x, labels=y).loss.backward()
    with pytest.raises(ValueError, match=r"4 of 4 are merged .*call unmerge_adapters\(model\)"):
        ctrl.step(loss=1.0)
    unmerge_adapters(bert)
    bert.zero_grad()
    bert(input_ids=x, labels=y).loss.backward()
    ctrl.step(loss=1.0)  # unmerged: the adapters have their gradients again


def test_the_backward_check_and_loss_reading_keep_their_meaning_on_the_lean_step(llama):
    """ctrl.step reads block 0's gradient first (it is active at every rank) and a float loss without type
    checks; what it accepts and refuses must not change."""
    x = classification_batch(n=4)[0]
    labels = x
    seen = []
    adapters, ctrl = setup_unified_lora(llama, target_modules=["q_proj"], signal="loss", print_fn=None,
                                        reduce_loss=lambda v: seen.append(v) or 2 * v)
    opt = torch.optim.AdamW([p for p in llama.parameters() if p.requires_grad], lr=1e-3)
    ctrl.attach_optimizer(opt)
    _train_step(llama, ctrl, opt, x, labels)
    assert len(seen) == 1 and ctrl.trace[-1].loss == 2 * seen[0]  # the float path still reduces across processes
    opt.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="call loss.backward"):  # a later step without backward is refused too
        ctrl.step(loss=1.0)
    # block 0 frozen, the other active block trained: gradients are there, so the step goes through
    for a in adapters.values():
        a.lora_A[0].requires_grad_(False)
        a.lora_B[0].requires_grad_(False)
    llama(input_ids=x, labels=labels).loss.backward()
    first = next(iter(adapters.values()))
    assert first.first_block_grad() is None and first.lora_A[1].grad is not None
    ctrl.step(loss=torch.tensor(1.5))  # a tensor and an int take the checked path
    ctrl.step(loss=3)
    assert [r.loss for r in ctrl.trace[-2:]] == [3.0, 6.0]
    with pytest.raises(ValueError, match="^loss: expected a number"):
        ctrl.step(loss="1.0")


def test_composite_signal_without_adapters_is_rejected():
    with pytest.raises(ValueError, match="^signal:"):
        UnifiedController(signal="composite")


def test_an_optimizer_built_before_setup_is_refused_and_names_what_it_lacks(llama):
    """The usual mistake: the optimizer was built from the base model, so it holds no adapter block and the
    adapters would never train. Attaching it is a clear error; one built after setup passes."""
    early = torch.optim.AdamW([p for p in llama.parameters() if p.requires_grad], lr=1e-3)
    adapters, ctrl = setup_unified_lora(llama, target_modules=["q_proj", "v_proj"], print_fn=None)
    n = sum(len(a.lora_parameters()) for a in adapters.values())
    with pytest.raises(ValueError, match=rf"^optimizer: it holds 0 of the {n} parameters") as e:
        ctrl.attach_optimizer(early)
    first = next(iter(adapters))
    assert f"{first}.lora_A.0" in str(e.value) and "requires_grad" in str(e.value)
    assert ctrl.optimizer is None and not ctrl._hooks  # nothing half-attached
    with pytest.raises(ValueError, match="^optimizer:"):
        setup_unified_lora(tiny_llama(), target_modules=["q_proj"], optimizer=torch.optim.SGD([torch.nn.Parameter(
            torch.zeros(1))], lr=0.1), print_fn=None)
    ctrl.attach_optimizer(torch.optim.AdamW([p for p in llama.parameters() if p.requires_grad], lr=1e-3))


@pytest.mark.parametrize("mode_ranks,message", [
    ((4,), r"^mode_ranks: needs one rank per mode \(SINGLE, MULTI, MIRROR\), got \(4,\)$"),
    ((4, 6, 16), r"^mode_ranks: MULTI's rank 6 is the layers' initial rank and must be one of rank_levels "
                 r"\(4, 8, 16\), got \(4, 6, 16\)$"),
])
def test_setup_names_mode_ranks_in_its_error_for_a_bad_multi_rank_or_length(llama, mode_ranks, message):
    """setup_unified_lora took the layers' initial rank from mode_ranks[1] before it checked mode_ranks: (4,) was an
    IndexError ("tuple index out of range") and (4, 6, 16) was "initial_rank: must be one of rank_levels", an
    argument the user never passed. The model is left unwrapped. setup_multitask_lora had the same order."""
    _refused_by_both_setups(llama, message, mode_ranks=mode_ranks)


def _refused_by_both_setups(llama, message: str, **kw) -> None:
    """setup_unified_lora and setup_multitask_lora both refuse `kw` with `message`, leaving the model unwrapped."""
    from unified_lora.multitask import setup_multitask_lora

    modules = dict(llama.named_modules())
    with pytest.raises(ValueError, match=message):
        setup_unified_lora(llama, target_modules=["q_proj"], print_fn=None, **kw)
    assert dict(llama.named_modules()) == modules
    with pytest.raises(ValueError, match=message):
        setup_multitask_lora(llama, ["a", "b"], ["q_proj"], print_fn=None, **kw)
    assert dict(llama.named_modules()) == modules


@pytest.mark.parametrize("rank_levels,message", [
    ((8, 4, 16), r"^rank_levels: must be strictly increasing so the slices nest .*, got \(8, 4, 16\)$"),
    ((16, 8, 4), r"^rank_levels: must be strictly increasing"),
    ((0, 8, 16), r"^rank_levels: every rank must be positive, got \(0, 8, 16\)$"),
    ((), r"^rank_levels: must hold at least one rank"),
    (None, r"^rank_levels: must be a list of integers"),
    ((4, 8.5, 16), r"^rank_levels: must be an integer, got 8.5$"),
])
def test_setup_names_rank_levels_in_its_error_for_levels_that_do_not_nest(llama, rank_levels, message):
    """setup_unified_lora drew the default mode ranks from rank_levels and checked them before the levels: levels
    that do not nest ((8, 4, 16), (0, 8, 16)) were refused as "mode_ranks: must be positive and non-decreasing", an
    argument the user never passed, (4, 8.5, 16) as "mode_ranks: must be an integer", and () was an IndexError,
    None a TypeError. setup_multitask_lora had the same order, and a NestedLoRALayer built by hand took
    (4, 8.5, 16) for (4, 8, 16). The model is left unwrapped."""
    _refused_by_both_setups(llama, message, rank_levels=rank_levels)
    with pytest.raises(ValueError, match=message):
        NestedLoRALayer(torch.nn.Linear(8, 8), rank_levels=rank_levels)


def test_rank_levels_given_as_an_array_a_range_or_an_iterator_are_read_as_their_values(llama):
    """(found by the review) check_rank_levels, now called first, took a list or tuple alone: np.array([4, 8, 16]) and
    range(4, 17, 4), which setup_unified_lora, setup_multitask_lora and a NestedLoRALayer built by hand took before,
    were refused as "rank_levels: must be a list of integers", and so were a torch tensor and a generator. Their values
    are checked as a list's are: a float array's 8.5 and a bool array are refused, and so is a 0-d array (no list)."""
    import numpy as np

    from unified_lora import check_rank_levels
    from unified_lora.multitask import setup_multitask_lora

    for given, levels in ((np.array([4, 8, 16]), (4, 8, 16)), (np.arange(4, 17, 4), (4, 8, 12, 16)),
                          (torch.tensor([2, 4]), (2, 4)), (range(4, 17, 4), (4, 8, 12, 16))):
        assert check_rank_levels(given) == levels and all(type(r) is int for r in check_rank_levels(given))
        layer = NestedLoRALayer(torch.nn.Linear(16, 16), rank_levels=given)
        assert layer.rank_levels == levels and layer.boundaries == levels
    adapters, _ = setup_unified_lora(llama, target_modules=["q_proj"], rank_levels=(r for r in (4, 8, 16)),
                                     print_fn=None)
    assert {a.rank_levels for a in adapters.values()} == {(4, 8, 16)}
    adapters, _ = setup_multitask_lora(tiny_llama(), ["a", "b"], ["q_proj"], rank_levels=np.array([2, 4, 8]),
                                       print_fn=None)
    assert {a.rank_levels for a in adapters.values()} == {(2, 4, 8)}
    for bad, message in ((np.array([4.0, 8.5]), r"^rank_levels: must be an integer, got 8.5$"),
                         (np.array([True, False]), r"^rank_levels: must be an integer, got True \(bool\)$"),
                         (np.array(4), r"^rank_levels: must be a list of integers, e.g. \(4, 8, 16\), got 4 \(int\)$"),
                         ({4, 8, 16}, r"^rank_levels: must be a list of integers, e.g. \(4, 8, 16\), got \{")):
        with pytest.raises(ValueError, match=message):
            check_rank_levels(bad)


@pytest.mark.parametrize("bad,message", [
    (dict(modules_to_save=["classifer"]), "^modules_to_save: 'classifer' matched no module"),
    (dict(mode_ranks=(4, 8, 32)), r"^mode_ranks: \[32\] are not nested levels"),
    (dict(signal="composit"), "^kind: must be 'loss', 'composite' or 'multitask'"),
    (dict(optimizer="early"), "^optimizer: it holds 0 of the"),
])
def test_a_setup_that_fails_leaves_the_model_as_it_was_so_a_retry_works(bert, bad, message):
    """setup_unified_lora wrapped the targets and froze the model before it checked modules_to_save and built the
    controller. Any error there (a misspelt head, a mode rank that is no level, a bad signal, an optimizer built
    too early) left the model half set up, and the corrected call then failed with "model: already has nested
    LoRA layers; inject once", so the model had to be loaded again. Now the model is put back as it was."""
    if bad.get("optimizer") == "early":
        bad = dict(optimizer=torch.optim.AdamW(bert.parameters(), lr=1e-3))
    modules = dict(bert.named_modules())
    flags = {n: p.requires_grad for n, p in bert.named_parameters()}
    bert.bert.encoder.layer[0].attention.self.query.weight.requires_grad_(False)  # a flag the user set stays
    flags["bert.encoder.layer.0.attention.self.query.weight"] = False
    with pytest.raises(ValueError, match=message):
        setup_unified_lora(bert, target_modules=["query", "value"], print_fn=None, **bad)
    assert dict(bert.named_modules()) == modules  # the same module objects under the same names
    assert {n: p.requires_grad for n, p in bert.named_parameters()} == flags
    adapters, _ = setup_unified_lora(bert, target_modules=["query", "value"], modules_to_save=["classifier"],
                                     print_fn=None)
    assert len(adapters) == 4 and bert.classifier.weight.requires_grad


def test_a_second_setup_on_a_wrapped_model_is_refused_and_keeps_the_first_setups_layers(bert):
    """In a notebook the setup cell runs twice. The second call was refused ("already has nested LoRA layers"), but
    the undo of that failed call then replaced every nested layer, the first call's too, by its base Linear and left
    the model with nothing trainable: the first controller and optimizer held adapters the model no longer ran.
    The refused call now leaves the first setup's layers, flags and training in place."""
    from unified_lora.multitask import setup_multitask_lora
    adapters, ctrl = setup_unified_lora(bert, target_modules=["query", "value"], print_fn=None)
    modules = dict(bert.named_modules())
    flags = {n: p.requires_grad for n, p in bert.named_parameters()}
    for again in (setup_unified_lora, lambda m, **kw: setup_multitask_lora(m, ["a", "b"], **kw)):
        with pytest.raises(ValueError, match="already has nested LoRA layers"):
            again(bert, target_modules=["query", "value"], print_fn=None)
        assert dict(bert.named_modules()) == modules
        assert {n: p.requires_grad for n, p in bert.named_parameters()} == flags
    opt = torch.optim.AdamW([p for p in bert.parameters() if p.requires_grad], lr=1e-2)
    ctrl.attach_optimizer(opt)
    x, y = classification_batch(n=4)
    bert(input_ids=x, labels=y).loss.backward()
    assert all(any(p.grad is not None for p in a.lora_parameters()) for a in adapters.values())  # the model runs them


def test_an_argument_that_a_config_object_overrides_is_not_ignored_silently(bert):
    """UnifiedController(theta0=0.2, machine=MachineConfig(warmup_steps=10)) ran at the config's theta0=0.3, and
    setup_unified_lora(lr_mode="off", actuators=ActuatorConfig(mode_lrs=...)) wrote ActuatorConfig's absolute LRs
    into the optimizer, and alpha= beside a SignalConfig was dropped: each is now a ValueError naming the argument.
    The same value in both places, or the argument left at its default, is fine."""
    from unified_lora import MachineConfig
    with pytest.raises(ValueError, match=r"^theta0: 0\.2 would be ignored: machine= is given .*theta0=0\.3"):
        UnifiedController(theta0=0.2, machine=MachineConfig(warmup_steps=10), print_fn=None)
    with pytest.raises(ValueError, match="^warmup_steps: 5 would be ignored"):
        UnifiedController(warmup_steps=5, machine=MachineConfig(theta0=0.2), print_fn=None)
    with pytest.raises(ValueError, match="^alpha: 0.5 would be ignored: signal= is given"):
        UnifiedController(alpha=0.5, signal=SignalConfig(kind="loss"), print_fn=None)
    ctrl = UnifiedController(theta0=0.2, machine=MachineConfig(theta0=0.2, warmup_steps=10), print_fn=None)
    assert ctrl.machine.config.theta0 == 0.2
    with pytest.raises(ValueError, match="^lr_mode: 'off' would be ignored: actuators= is given"):
        setup_unified_lora(bert, ["query"], lr_mode="off", actuators=ActuatorConfig(), print_fn=None)
    with pytest.raises(ValueError, match=r"^mode_ranks: \(4, 4, 8\) would be ignored"):
        setup_unified_lora(bert, ["query"], mode_ranks=[4, 4, 8], actuators=ActuatorConfig(), print_fn=None)
    _, ctrl = setup_unified_lora(bert, ["query"], mode_ranks=[4, 8, 16], actuators=ActuatorConfig(lr_mode="off"),
                                 print_fn=None)
    assert ctrl.actuators.lr_mode == "off"


def test_a_config_argument_of_the_wrong_kind_and_a_bad_log_every_are_refused_by_name(bert):
    """setup_unified_lora(model, mirror="always") (a policy's name where a MirrorConfig belongs) and machine= given
    as a dict raised an AttributeError from deep in the setup ('str' object has no attribute 'kernel'). log_every=-1
    printed a console line at every step and log_every=2.5 ran as 2, silently. Each is now a ValueError naming the
    argument, and the model is left unwrapped, so a retry runs."""
    for kwargs, match in [({"mirror": "always"}, r"^mirror: pass mirror=MirrorConfig\(\.\.\.\) or leave it out, got 'always' \(str\)"),
                          ({"machine": {"theta0": 0.2}}, r"^machine: pass machine=MachineConfig\(.*\(dict\)"),
                          ({"actuators": "multiplier"}, r"^actuators: pass actuators=ActuatorConfig\("),
                          ({"log_every": -1}, r"^log_every: a console line every N steps, an int >= 0"),
                          ({"log_every": 2.5}, r"^log_every: must be an integer, got 2\.5")]:
        with pytest.raises(ValueError, match=match):
            setup_unified_lora(bert, ["query"], print_fn=None, **kwargs)
    with pytest.raises(ValueError, match=r"^mirror: pass mirror=MirrorConfig\("):
        UnifiedController(mirror="never", print_fn=None)
    _, ctrl = setup_unified_lora(bert, ["query"], mirror=MirrorConfig(policy="always"), log_every="5",
                                 modules_to_save=["classifier"], print_fn=None)
    assert ctrl.log_every == 5 and ctrl.mirror.config.policy == "always"  # (a number as a string, as YAML gives)


def test_a_boolean_argument_given_as_anything_but_true_or_false_is_refused_by_name(bert):
    """keep_trace="no" is truthy, so the trace was kept, silently. A bool argument takes True or False only, as a
    bool field of the config dataclasses does (`_scalar`: the string "false" would count as true), and the model is
    left unwrapped, so a retry runs."""
    for value in ("no", "false", 0, None):
        with pytest.raises(ValueError, match=rf"^keep_trace: must be true or false, got {re.escape(repr(value))}"):
            UnifiedController(keep_trace=value, print_fn=None)
    with pytest.raises(ValueError, match=r"^keep_trace: must be true or false, got 'no' \(str\)"):
        setup_unified_lora(bert, ["query"], keep_trace="no", print_fn=None)
    with pytest.raises(ValueError, match=r"^snapshot_optimizer: must be true or false, got 'yes' \(str\)"):
        setup_unified_lora(bert, ["query"], mirror=MirrorConfig(snapshot_optimizer="yes"), print_fn=None)
    _, ctrl = setup_unified_lora(bert, ["query"], keep_trace=False, modules_to_save=["classifier"], print_fn=None)
    assert ctrl.keep_trace is False


def test_a_bad_log_every_is_refused_before_the_optimizer_is_attached(bert):
    """log_every was checked after attach_optimizer had put the controller's LR hooks on the optimizer: the refused
    controller's hooks stayed there, and the retry with a good log_every and the same optimizer was refused as "another
    UnifiedController already drives its learning rate". The refusal leaves the optimizer as it was."""
    adapters, _ = setup_unified_lora(bert, ["query", "value"], modules_to_save=["classifier"], print_fn=None)
    opt = torch.optim.AdamW([p for a in adapters.values() for p in a.parameters() if p.requires_grad], lr=1e-3)
    hooks = len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)
    kw = {"adapters": adapters, "optimizer": opt, "actuators": ActuatorConfig(lr_mode="multiplier"), "print_fn": None}
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match=r"^log_every: "):
            UnifiedController(log_every=bad, **kw)
        assert (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)) == hooks
    assert UnifiedController(log_every=5, **kw).log_every == 5  # the retry


def test_a_trace_path_that_cannot_be_opened_is_refused_before_the_optimizer_is_attached(bert, tmp_path):
    """The trace file was opened after attach_optimizer had put the controller's LR hooks on the optimizer, as
    log_every was checked: a trace_path under a file (or in a folder without write permission) left the refused
    controller's hooks there, and the retry with a good path and the same optimizer was refused as "another
    UnifiedController already drives its learning rate". The refusal leaves the optimizer as it was."""
    adapters, _ = setup_unified_lora(bert, ["query", "value"], modules_to_save=["classifier"], print_fn=None)
    opt = torch.optim.AdamW([p for a in adapters.values() for p in a.parameters() if p.requires_grad], lr=1e-3)
    hooks = len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)
    kw = {"adapters": adapters, "optimizer": opt, "actuators": ActuatorConfig(lr_mode="multiplier"), "print_fn": None}
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OSError):
        UnifiedController(trace_path=str(tmp_path / "a_file" / "trace.jsonl"), **kw)
    assert (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)) == hooks
    ctrl = UnifiedController(trace_path=str(tmp_path / "trace.jsonl"), **kw)  # the retry
    assert ctrl.optimizer is opt and ctrl.writer is not None


def test_lr_multipliers_are_not_dropped_for_actuator_config_s_absolute_default(bert):
    """ActuatorConfig's lr_mode defaults to "absolute", setup_unified_lora's to "multiplier". So
    setup_unified_lora(lr_mode="multiplier", actuators=ActuatorConfig(mode_multipliers=...)) ran in absolute mode:
    the multipliers and the explicit lr_mode were ignored, and the v1 LRs (3e-5 in MULTI) replaced the optimizer's
    LR and its schedule, silently (setup could not tell lr_mode="multiplier" from its default). Both are refused."""
    from unified_lora.multitask import setup_multitask_lora

    with pytest.raises(ValueError, match=r"^mode_multipliers: \(2\.0, 1\.0, 0\.5\) would be ignored: lr_mode is "
                                         r"'absolute'.*pass lr_mode='multiplier'"):
        ActuatorConfig(mode_multipliers=(2.0, 1.0, 0.5))
    with pytest.raises(ValueError, match="^mode_multipliers: .* would be ignored: lr_mode is 'off'"):
        ActuatorConfig(lr_mode="off", mode_multipliers=(2.0, 1.0, 0.5))
    for setup, args in ((setup_unified_lora, ()), (setup_multitask_lora, (["a", "b"],))):
        with pytest.raises(ValueError, match="^lr_mode: 'multiplier' would be ignored: actuators= is given "
                                             r"\(ActuatorConfig with lr_mode='absolute'\)"):
            setup(tiny_bert(), *args, target_modules=["query"], lr_mode="multiplier",
                  actuators=ActuatorConfig(mode_ranks=(4, 8, 16)), print_fn=None)
        with pytest.raises(ValueError, match=r"^mode_ranks: \(4, 4, 8\) would be ignored"):
            setup(tiny_bert(), *args, target_modules=["query"], mode_ranks=[4, 4, 8],
                  actuators=ActuatorConfig(), print_fn=None)
        # agreeing, or lr_mode left out: the config's lr_mode; neither given: "multiplier"
        for kw, want in ((dict(lr_mode="multiplier", actuators=ActuatorConfig(lr_mode="multiplier",
                                                                               mode_multipliers=(2.0, 1.0, 0.5))),
                          "multiplier"), (dict(actuators=ActuatorConfig()), "absolute"), ({}, "multiplier")):
            _, ctrl = setup(tiny_bert(), *args, target_modules=["query"], print_fn=None, **kw)
            assert ctrl.actuators.lr_mode == want
    _, ctrl = setup_unified_lora(bert, ["query"], signal="loss", lr_mode="multiplier", print_fn=None,
                                 actuators=ActuatorConfig(lr_mode="multiplier", mode_multipliers=(2.0, 1.0, 0.5)))
    opt = torch.optim.AdamW([p for p in bert.parameters() if p.requires_grad], lr=1e-3)
    ctrl.attach_optimizer(opt)
    assert ctrl.get_last_lr() == 1e-3  # MULTI: the optimizer's LR × 1.0


def test_an_optimizer_without_the_paused_blocks_or_the_head_is_refused(bert):
    """Holding only the active blocks looks fine until the controller raises the rank: the re-activated
    blocks get gradients and never move. A head (modules_to_save) left out is refused the same way."""
    adapters, ctrl = setup_unified_lora(bert, target_modules=["query", "value"], modules_to_save=["classifier"],
                                        print_fn=None)
    active = [p for a in adapters.values() for p in a.active_parameters()]
    head = list(bert.classifier.parameters())
    with pytest.raises(ValueError, match=r"missing: .*lora_A\.2") as e:
        ctrl.attach_optimizer(torch.optim.AdamW(active + head, lr=1e-3))
    n_paused = sum(len(a.lora_parameters()) - len(a.active_parameters()) for a in adapters.values())
    total = sum(len(a.lora_parameters()) for a in adapters.values()) + len(head)
    assert f"holds {total - n_paused} of the {total}" in str(e.value) and f"({n_paused - 4} more)" in str(e.value)
    with pytest.raises(ValueError, match="extra parameter 0"):
        ctrl.attach_optimizer(torch.optim.AdamW([p for a in adapters.values() for p in a.lora_parameters()], lr=1e-3))
    ctrl.attach_optimizer(torch.optim.AdamW([p for p in bert.parameters() if p.requires_grad], lr=1e-3))
    assert ctrl.optimizer is not None


def test_mode_change_sets_the_rank_on_every_adapter(llama):
    adapters, ctrl = setup_unified_lora(llama, target_modules=["q_proj", "v_proj"], signal="loss", print_fn=None)
    x = torch.randint(0, VOCAB, (2, 8))
    while ctrl.mode != 2:
        llama(input_ids=x, labels=x).loss.backward()
        ctrl.step(loss=50.0)
    assert ctrl.rank == 16 and all(a.rank == 16 for a in adapters.values())
    assert [r.transition for r in ctrl.trace if r.transition] == ["MULTI->MIRROR"]


def test_absolute_lr_mode_writes_the_mode_lr_into_every_group(llama):
    _, ctrl = setup_unified_lora(llama, target_modules=["q_proj"], signal="loss", print_fn=None,
                                 actuators=ActuatorConfig(lr_mode="absolute", mode_lrs=(1e-3, 5e-4, 1e-4)))
    params = [p for p in llama.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}], lr=9.0)
    ctrl.attach_optimizer(opt)
    x = torch.randint(0, VOCAB, (2, 8))
    _train_step(llama, ctrl, opt, x, x)
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 5e-4]


def test_multiplier_mode_composes_with_a_cosine_schedule(llama):
    _, ctrl = setup_unified_lora(llama, target_modules=["q_proj"], signal="loss", print_fn=None,
                                 actuators=ActuatorConfig(lr_mode="multiplier", mode_multipliers=(2.0, 0.5, 0.25)))
    params = [p for p in llama.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    ctrl.attach_optimizer(opt)
    used = []
    opt.register_step_pre_hook(lambda o, a, k: used.append(o.param_groups[0]["lr"]))  # runs after ours
    expected = []
    x = torch.randint(0, VOCAB, (2, 8))
    for _ in range(5):
        expected.append(sched.get_last_lr()[0] * 0.5)  # MULTI multiplier
        _train_step(llama, ctrl, opt, x, x)
        sched.step()
    assert used == pytest.approx(expected)
    assert opt.param_groups[0]["lr"] == pytest.approx(sched.get_last_lr()[0])  # schedule not overwritten



def test_an_optimizer_step_that_raises_does_not_leave_the_multiplied_lr_behind(llama):
    """The multiplier's post-step hook never runs when optimizer.step() raises (Ctrl-C in a notebook). The
    groups kept base × m: the next step multiplied it again, and the rerun trained at m² × the LR for good,
    and a checkpoint saved then held base × m. Both now see the scheduled LR."""
    _, ctrl = setup_unified_lora(llama, target_modules=["q_proj"], signal="loss", print_fn=None,
                                 actuators=ActuatorConfig(lr_mode="multiplier", mode_multipliers=(2.0, 0.5, 0.25)))
    opt = torch.optim.SGD([p for p in llama.parameters() if p.requires_grad], lr=0.1)
    ctrl.attach_optimizer(opt)
    used, fail = [], [True]

    def interrupt(o, a, k):  # runs after the controller's pre-step hook, inside optimizer.step()
        used.append(o.param_groups[0]["lr"])
        if fail[0]:
            fail[0] = False
            raise KeyboardInterrupt

    opt.register_step_pre_hook(interrupt)
    x = torch.randint(0, VOCAB, (2, 8))
    with pytest.raises(KeyboardInterrupt):
        _train_step(llama, ctrl, opt, x, x)
    assert opt.state_dict()["param_groups"][0]["lr"] == 0.1
    opt.zero_grad()
    _train_step(llama, ctrl, opt, x, x)
    assert used == [0.05, 0.05] and opt.param_groups[0]["lr"] == 0.1
def test_an_optimizer_attached_after_a_step_that_raised_trains_at_its_own_lr(llama):
    """After optimizer.step() raised (an out-of-memory error in AdamW's first step, Ctrl-C), the controller held the
    failed step's scheduled LRs to put back at the next step. Attaching another optimizer then (the usual answer to
    that OOM: one that needs less memory, often with another LR) wrote those old LRs into the new optimizer's
    groups at its first step, where they stayed without a scheduler; the old optimizer kept base × m (as one did
    after ctrl.close()). Each now keeps its own LR."""
    _, ctrl = setup_unified_lora(llama, target_modules=["q_proj"], signal="loss", print_fn=None,
                                 actuators=ActuatorConfig(lr_mode="multiplier", mode_multipliers=(2.0, 0.5, 0.25)))
    params = [p for p in llama.parameters() if p.requires_grad]
    old = torch.optim.AdamW(params, lr=0.1)
    ctrl.attach_optimizer(old)

    def oom(o, a, k):  # inside optimizer.step(), after the controller's pre-step hook
        raise torch.OutOfMemoryError("CUDA out of memory")

    old.register_step_pre_hook(oom)
    x = torch.randint(0, VOCAB, (2, 8))
    with pytest.raises(torch.OutOfMemoryError):
        _train_step(llama, ctrl, old, x, x)
    old.zero_grad()
    new = torch.optim.AdamW(params, lr=0.01, foreach=False)
    ctrl.attach_optimizer(new)
    used = []
    new.register_step_pre_hook(lambda o, a, k: used.append(o.param_groups[0]["lr"]))
    for _ in range(2):
        _train_step(llama, ctrl, new, x, x)
    assert used == [0.005, 0.005] and new.param_groups[0]["lr"] == 0.01
    assert old.param_groups[0]["lr"] == 0.1
    new.register_step_pre_hook(oom)  # ctrl.close() after a step that raised: the LR goes back too
    with pytest.raises(torch.OutOfMemoryError):
        _train_step(llama, ctrl, new, x, x)
    ctrl.close()
    assert new.param_groups[0]["lr"] == 0.01


@pytest.mark.parametrize("lr_mode", ["multiplier", "absolute"])
def test_an_lr_given_as_a_tensor_is_traced_as_a_number(tmp_path, llama, lr_mode):
    """torch's recipe for a compiled optimizer with a scheduler wraps the LR in a tensor. The trace (and its
    JSONL file) records the effective LR as a float; it used to raise "Tensor is not JSON serializable"."""
    _, ctrl = setup_unified_lora(llama, target_modules=["q_proj"], signal="loss", print_fn=None, lr_mode=lr_mode,
                                 trace_path=tmp_path / "trace.jsonl")
    opt = torch.optim.AdamW([p for p in llama.parameters() if p.requires_grad], lr=torch.tensor(1e-3), fused=True)
    ctrl.attach_optimizer(opt)
    x = torch.randint(0, VOCAB, (2, 8))
    _train_step(llama, ctrl, opt, x, x)
    ctrl.close()
    want = 1e-3 * ctrl.lr_multiplier if lr_mode == "multiplier" else ctrl.actuators.mode_lrs[1]
    assert type(ctrl.trace[-1].lr) is float and ctrl.trace[-1].lr == pytest.approx(want)
    assert read_trace(tmp_path / "trace.jsonl")[-1]["lr"] == pytest.approx(want)


def test_a_second_controller_on_one_optimizer_is_refused_so_the_lr_does_not_compound():
    """Two models in one optimizer (a sweep in a notebook), each with its own controller in multiplier mode: both
    pre-step hooks scaled every group (0.01 trained at 0.01 × m²) and the second post-step hook put back the LR
    the first had already multiplied, so the scheduled LR grew by m at every step, silently. The second attach is
    now refused; after close() on the first, or with one controller over both models' adapters, it trains at
    base × m and the LR stays put."""
    m1, m2 = tiny_llama(1), tiny_llama(2)
    acts = ActuatorConfig(lr_mode="multiplier", mode_multipliers=(2.0, 0.5, 0.25))
    a1, c1 = setup_unified_lora(m1, target_modules=["q_proj"], signal="loss", print_fn=None, actuators=acts)
    a2, c2 = setup_unified_lora(m2, target_modules=["q_proj"], signal="loss", print_fn=None, actuators=acts)
    opt = torch.optim.SGD([{"params": [p for p in m.parameters() if p.requires_grad]} for m in (m1, m2)], lr=0.01)
    with pytest.warns(UserWarning, match="does not manage"):  # the other model's parameters
        c1.attach_optimizer(opt)
    with pytest.raises(ValueError, match="^optimizer: another UnifiedController already drives its learning rate"):
        c2.attach_optimizer(opt)
    assert c2.optimizer is None and not c2._hooks
    with pytest.warns(UserWarning, match="does not manage"):
        c1.attach_optimizer(opt)  # the controller already attached may attach again
    both = UnifiedController(adapters={**{f"a.{n}": a for n, a in a1.items()}, **{f"b.{n}": a for n, a in a2.items()}},
                             signal="loss", actuators=acts, print_fn=None)
    c1.close()
    both.attach_optimizer(opt)
    used = []
    opt.register_step_pre_hook(lambda o, a, k: used.append([g["lr"] for g in o.param_groups]))
    for _ in range(2):
        opt.step()
    assert used == [[0.005, 0.005]] * 2 and [g["lr"] for g in opt.param_groups] == [0.01, 0.01]


def test_without_an_attached_optimizer_the_multiplier_is_not_traced_as_the_lr(tmp_path, llama):
    """`setup_unified_lora` runs lr_mode="multiplier"; attaching the optimizer is optional. Without it, the trace and
    the console line recorded the mode's multiplier as the LR: "lr=1e0" in MULTI (1.667 in SINGLE) for a run that
    trains at its optimizer's 2e-4, which the controller never scaled. The LR is unknown then: None, "lr=-"."""
    printed = []
    _, ctrl = setup_unified_lora(llama, target_modules=["q_proj"], signal="loss", print_fn=printed.append,
                                 log_every=1, trace_path=tmp_path / "trace.jsonl")
    opt = torch.optim.AdamW([p for p in llama.parameters() if p.requires_grad], lr=2e-4)
    x = torch.randint(0, VOCAB, (2, 8))
    _train_step(llama, ctrl, opt, x, x)
    assert ctrl.get_last_lr() is None and ctrl.trace[-1].lr is None
    assert printed[-1].endswith(" lr=-")
    ctrl.attach_optimizer(opt)  # attached: the LR the optimizer trains at, the scheduled LR × the multiplier
    _train_step(llama, ctrl, opt, x, x)
    ctrl.close()
    assert ctrl.trace[-1].lr == pytest.approx(2e-4 * ctrl.lr_multiplier) and printed[-1].endswith(" lr=2e-4")
    assert [r["lr"] for r in read_trace(tmp_path / "trace.jsonl")] == [None, pytest.approx(2e-4)]


def test_the_default_print_fn_prints_the_console_lines_in_a_single_process(capsys):
    """Outside a process group the default `print_fn` (`print_on_main_process`) prints as `print` did: each
    `log_every`-th step's line (the processes of a process group: test_distributed.py)."""
    ctrl = UnifiedController(signal="loss", log_every=2)
    for v in (0.5, 0.6, 0.7):
        ctrl.step(v)
    assert [line.split(" ")[0] for line in capsys.readouterr().out.splitlines()] == ["[0]", "[2]"]


def test_an_optimizer_that_sets_its_own_step_size_is_refused_unless_lr_mode_is_off(llama):
    """transformers' Adafactor with relative_step=True has lr=None: the multiplier's hook failed inside
    optimizer.step() and ctrl.step raised a TypeError (None * float); an absolute LR would be ignored."""
    from transformers.optimization import Adafactor

    for lr_mode in ("multiplier", "absolute"):
        _, ctrl = setup_unified_lora(tiny_llama(), target_modules=["q_proj"], signal="loss", print_fn=None,
                                     lr_mode=lr_mode)
        params = ctrl.managed_parameters()
        with pytest.raises(ValueError, match=r"^optimizer: param group 0 has lr=None and relative_step=True.*"
                                             r"lr_mode='off'"):
            ctrl.attach_optimizer(Adafactor(params, lr=None, relative_step=True, warmup_init=True))
        assert ctrl.optimizer is None and not ctrl._hooks
    _, ctrl = setup_unified_lora(llama, target_modules=["q_proj"], signal="loss", print_fn=None, lr_mode="off")
    opt = Adafactor([p for p in llama.parameters() if p.requires_grad], lr=None, relative_step=True)
    ctrl.attach_optimizer(opt)
    x = torch.randint(0, VOCAB, (2, 8))
    _train_step(llama, ctrl, opt, x, x)
    assert ctrl.trace[-1].lr is None


@pytest.fixture(params=["eager", "eager_unpacked", pytest.param("fused", marks=pytest.mark.skipif(
    not can_build_cpp(), reason="kernel='fused' builds csrc/mirror_fused.cpp: needs g++ and ninja"))])
def kernel(request):
    """Every Mirror test runs on each path: the torch ops over packed parameters (the default), the
    torch ops per tensor (pack=False), and the fused CPU kernels."""
    return request.param


def _mcfg(name: str, **kw) -> MirrorConfig:
    if name == "eager_unpacked":
        return MirrorConfig(kernel="eager", pack=False, **kw)
    return MirrorConfig(kernel=name, **kw)


def _mirror_params(seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.randn(8, 4))]


def test_drift_is_the_relative_norm_change_summed_over_tensors(kernel):
    ps = _mirror_params()
    snap = MirrorSnapshot(_mcfg(kernel))
    snap.save(ps)
    with torch.no_grad():
        ps[0].add_(0.01)
    expected = (ps[0] - snap.weights[0]).norm() / (snap.weights[0].norm() + snap.weights[1].norm())
    assert snap.drift(ps) == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("policy,delta,entry,exit_,restore", [
    ("drift", 0.001, None, None, True), ("drift", 1.0, None, None, False), ("never", 0.001, None, None, False),
    ("always", 1.0, None, None, True), ("loss_worse", 1.0, 1.0, 2.0, True), ("loss_worse", 1.0, 2.0, 1.0, False)])
def test_mirror_policies(policy, delta, entry, exit_, restore, kernel):
    ps = _mirror_params()
    snap = MirrorSnapshot(_mcfg(kernel, policy=policy))
    snap.save(ps, loss_ema=entry)
    with torch.no_grad():
        ps[1].add_(delta)
    assert snap.decide(ps, loss_at_exit=exit_).restore is restore


def test_restore_is_exact_and_includes_optimizer_moments_from_a_cpu_copy(kernel):
    ps = _mirror_params()
    opt = torch.optim.AdamW(ps, lr=0.1)
    sum(p.sum() for p in ps).backward()
    opt.step()
    snap = MirrorSnapshot(_mcfg(kernel, snapshot_optimizer=True, offload_to_cpu=True))
    w, m = snapshot_then_train(snap, ps, opt)
    snap.restore(ps, optimizer=opt)
    assert all(torch.equal(p, q) for p, q in zip(ps, w)) and torch.equal(opt.state[ps[0]]["exp_avg"], m)


def test_nan_loss_mid_training_leaves_weights_and_phi_usable(llama):
    _, ctrl = setup_unified_lora(llama, target_modules=["q_proj"], signal="composite", print_fn=None)
    opt = torch.optim.AdamW([p for p in llama.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randint(0, VOCAB, (2, 8))
    _train_step(llama, ctrl, opt, x, x)
    llama(input_ids=x, labels=x).loss.backward()
    ctrl.step(loss=float("nan"))
    assert ctrl.trace[-1].nonfinite and 0 <= ctrl.phi <= 1


def _poisoned_backward(model, adapters, x, poison):
    """Backward on `x`, then the step's damage: a loss of `poison` ("nan_loss"), or one gradient entry set to
    `poison` while the loss stays finite (what an fp16 overflow under GradScaler looks like). Returns the loss."""
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    if poison == "nan_loss":
        return float("nan")
    next(iter(adapters.values())).lora_A[0].grad[0, 0] = poison
    return loss.item()


def _composite_run(bad_at=None, poison=None, steps=24, nonfinite="skip"):
    """A composite-signal run on a tiny Llama with AdamW and a new batch every step. With `bad_at`, one extra
    non-finite step comes before step `bad_at`, and the optimizer skips it as GradScaler would. Returns (per
    clean step: φ, mode, rank, LR and every signal component), the controller, and (model, adapters, optimizer)."""
    model = tiny_llama()
    adapters, ctrl = setup_unified_lora(model, target_modules=["q_proj", "v_proj"], print_fn=None,
                                        signal=SignalConfig(kind="composite", nonfinite=nonfinite))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctrl.attach_optimizer(opt)
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(steps):
        x = torch.randint(0, VOCAB, (2, 8), generator=g)
        if i == bad_at:
            ctrl.step(loss=_poisoned_backward(model, adapters, x, poison))
            assert ctrl.trace[-1].nonfinite
            opt.zero_grad()  # no optimizer step, as GradScaler skips one with inf/NaN gradients
        _train_step(model, ctrl, opt, x, x)
        r = ctrl.trace[-1]
        assert not r.nonfinite
        out.append((r.phi, r.mode, r.rank, r.lr, r.components))
    return out, ctrl, (model, adapters, opt)


def _stored_gradients(ctrl) -> list[torch.Tensor]:
    return [t.clone() for gs in ctrl.grad_stats.prev for t in gs]


@pytest.mark.parametrize("bad_at,poison", [(12, float("inf")), (12, float("nan")), (12, float("-inf")),
                                           (0, float("inf")), (12, "nan_loss")])
def test_a_non_finite_step_leaves_the_composite_trajectory_as_if_it_never_happened(bad_at, poison):
    # An inf/NaN gradient entry with a finite loss used to be stored as the "previous" gradient: the next cosine
    # was NaN, max(0, NaN) = 0 made E jump, and φ surged. Now every later step is bit-identical to a run without it.
    clean, c_ctrl, _ = _composite_run()
    bad, b_ctrl, _ = _composite_run(bad_at, poison)
    assert len({round(r[0], 6) for r in clean}) > 5  # φ really moves: the comparison is not of constants
    assert bad == clean
    assert b_ctrl.signal.state_dict() == c_ctrl.signal.state_dict() and b_ctrl.loss_ema == c_ctrl.loss_ema
    assert all(torch.equal(p, q) for p, q in zip(_stored_gradients(b_ctrl), _stored_gradients(c_ctrl)))
    assert all(torch.equal(p, q) for p, q in zip(b_ctrl.managed_parameters(), c_ctrl.managed_parameters()))
    assert b_ctrl.nonfinite_steps == 1 and c_ctrl.nonfinite_steps == 0


@pytest.mark.parametrize("policy", ["skip", "max_stress", "raise"])
@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
def test_a_non_finite_gradient_changes_no_signal_state_under_any_policy(policy, poison):
    _, ctrl, (model, adapters, opt) = _composite_run(steps=12, nonfinite=policy)
    sig, prev, phi = ctrl.signal.state_dict(), _stored_gradients(ctrl), ctrl.phi
    x = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(7))
    value = _poisoned_backward(model, adapters, x, poison)
    if policy == "raise":
        with pytest.raises(NonFiniteLossError, match="gradient norm"):
            ctrl.step(loss=value)
    else:
        ctrl.step(loss=value)
        assert ctrl.trace[-1].nonfinite and (ctrl.phi > phi if policy == "max_stress" else ctrl.phi == phi)
    after = ctrl.signal.state_dict()
    after["phi"] = sig["phi"]  # "max_stress" moves φ itself for this one step, and nothing else
    assert after == sig
    assert all(torch.equal(p, q) for p, q in zip(_stored_gradients(ctrl), prev))


def test_trace_jsonl_and_console_line(tmp_path, llama):
    lines = []
    _, ctrl = setup_unified_lora(llama, target_modules=["q_proj"], signal="loss", print_fn=lines.append, log_every=2,
                                 trace_path=tmp_path / "trace.jsonl")
    x = torch.randint(0, VOCAB, (2, 8))
    for _ in range(4):
        llama(input_ids=x, labels=x).loss.backward()
        ctrl.step(loss=0.5)
    ctrl.close()
    recs = read_trace(tmp_path / "trace.jsonl")
    assert [r["step"] for r in recs] == [0, 1, 2, 3]
    assert set(recs[0]) >= {"loss", "phi", "mode", "rank", "lr", "components", "snapshot"}
    assert lines[0].startswith("[0] Mode=1 φ=0.") and "E_s=" in lines[0] and len(lines) == 2


def _traced_llama(path):
    """A tiny Llama with a loss-signal controller writing its trace to `path`: (model, ctrl)."""
    model = tiny_llama()
    _, ctrl = setup_unified_lora(model, target_modules=["q_proj"], signal="loss", print_fn=None, trace_path=path)
    return model, ctrl


def test_a_resumed_controller_keeps_the_trace_file_of_the_steps_before_its_checkpoint(tmp_path):
    """A controller built with the run's trace_path to resume it used to empty the file when it was built, so
    the JSONL kept only the steps after the resume. Loading the state now keeps the lines of earlier steps
    and drops the ones written after the checkpoint (and a line cut off by a crash); a new run still starts
    the file afresh."""
    path = tmp_path / "trace.jsonl"
    x = torch.randint(0, VOCAB, (2, 8))

    def make():
        return _traced_llama(path)

    def steps(model, ctrl, losses):
        for loss in losses:
            model(input_ids=x, labels=x).loss.backward()
            ctrl.step(loss=loss)

    losses = [0.5, 0.6, 5.0, 0.7, 0.8, 0.9]
    model, ctrl = make()
    steps(model, ctrl, losses[:3])
    sd = copy.deepcopy(ctrl.state_dict())
    steps(model, ctrl, [9.0, 9.0])  # written after the checkpoint, then the process dies mid-line
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"step": 5, "lo')
    ctrl.close()

    model, ctrl = make()
    assert len(path.read_text().splitlines()) == 6  # building the controller alone leaves the file as it was
    ctrl.load_state_dict(sd)
    steps(model, ctrl, losses[3:])
    ctrl.close()
    got = read_trace(path)
    assert [r["step"] for r in got] == list(range(6)) and [r["loss"] for r in got] == losses

    model, ctrl = make()  # a new run: the file starts afresh at its first step
    steps(model, ctrl, [0.5])
    ctrl.close()
    assert [r["step"] for r in read_trace(path)] == [0]


def test_a_trace_file_older_than_the_resumed_state_warns_naming_the_steps_it_lacks(tmp_path):
    """A trace file older than the checkpoint (its last step 1, the state at step 5) was resumed into a file reading
    steps 0, 1, 5, ... with no word, though a resume keeps "one whole trace". As a file ahead of the state (its
    later lines dropped) goes on, so does this one, with a warning naming the steps it lacks. A whole file, one ahead
    of the state and a new (empty) one say nothing."""
    import warnings

    path = tmp_path / "trace.jsonl"
    x = torch.randint(0, VOCAB, (2, 8))
    model, ctrl = _traced_llama(path)
    for i in range(7):
        if i == 2:
            old = path.read_text()  # steps 0 and 1
        if i == 5:
            sd = copy.deepcopy(ctrl.state_dict())
        model(input_ids=x, labels=x).loss.backward()
        ctrl.step(loss=0.5)
    ctrl.close()
    ahead = path.read_text()  # steps 0-6

    def resume(text):
        path.write_text(text)
        model, ctrl = _traced_llama(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ctrl.load_state_dict(sd)
        model(input_ids=x, labels=x).loss.backward()
        ctrl.step(loss=0.5)
        ctrl.close()
        return [str(w.message) for w in caught if "trace" in str(w.message)], [r["step"] for r in read_trace(path)]

    said, steps = resume(old)
    assert steps == [0, 1, 5]  # the gap stays (the file is what it is), and is said
    assert len(said) == 1 and "\n" not in said[0], said
    assert said[0] == (f"{path}: resuming at step 5, the trace file lacks steps 2-4 (its last record before step 5 is "
                       "step 1: the file is older than the state loaded), so the trace has a gap there; its lines are "
                       "kept and the run appends from step 5. Put back the trace file saved with the state for a "
                       "whole trace")
    gappy = "".join(line + "\n" for line in ahead.splitlines() if json.loads(line)["step"] not in (1, 3))
    said, steps = resume(gappy)
    assert steps == [0, 2, 4, 5] and len(said) == 1
    assert "lacks steps 1, 3 (its last record before step 5 is step 4: lines of those steps were taken out" in said[0]
    for text in (ahead, ""):
        said, steps = resume(text)
        assert not said and steps == ([0, 1, 2, 3, 4, 5] if text else [5])


def test_a_controller_with_a_trace_file_deep_copies_and_the_copy_writes_no_file(tmp_path, llama):
    """copy.deepcopy(ctrl) raised "cannot pickle '_io.TextIOWrapper' object" when trace_path= was given. The
    copy now has everything but the file: it steps on its own, and only the original writes the JSONL."""
    path = tmp_path / "trace.jsonl"
    _, ctrl = setup_unified_lora(llama, target_modules=["q_proj"], signal="loss", print_fn=None, trace_path=path)
    x = torch.randint(0, VOCAB, (2, 8))
    llama(input_ids=x, labels=x).loss.backward()
    ctrl.step(loss=0.5)
    model2, twin = copy.deepcopy((llama, ctrl))
    assert twin.writer is None and ctrl.writer is not None and len(twin.trace) == 1
    model2(input_ids=x, labels=x).loss.backward()
    twin.step(loss=5.0)
    ctrl.step(loss=0.6)
    ctrl.close()
    assert [r["loss"] for r in read_trace(path)] == [0.5, 0.6] and [r.loss for r in twin.trace] == [0.5, 5.0]


def test_a_deep_copy_or_pickle_of_a_multiplier_controller_scales_its_own_optimizers_lr():
    """torch's Optimizer.__setstate__ drops the optimizer's hooks, so the copied optimizer of
    copy.deepcopy((model, ctrl, opt)) (or of a pickle round trip) had none of lr_mode="multiplier"'s: the copy trained
    SINGLE at the scheduled 1e-2, not 1e-2 × 5/3, while its trace said 1.67e-2, and its weights left the original's at
    the first step. Now the copy's hooks scale the copy's optimizer, and both run the same steps bit for bit. A
    shallow copy shares the original's optimizer and adds no second set of hooks (the LR would compound)."""
    import pickle

    from unified_lora import MachineConfig

    model = tiny_bert()
    _, ctrl = setup_unified_lora(model, target_modules=["query", "value"], signal="loss", print_fn=None,
                                 machine=MachineConfig(initial_mode=0, warmup_steps=100))  # SINGLE: multiplier 5/3
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctrl.attach_optimizer(opt)
    x, y = classification_batch(8, 8)
    _train_step(model, ctrl, opt, x, y)
    opt.register_step_post_hook(lambda *args: None)  # a user's hook (a lambda does not pickle) is not carried along
    copies = [copy.deepcopy((model, ctrl, opt)), pickle.loads(pickle.dumps((model, ctrl, opt)))]
    for _ in range(2):
        for m, c, o in [(model, ctrl, opt)] + copies:
            seen = []
            h = o.register_step_pre_hook(lambda o_, a, k: seen.append(o_.param_groups[0]["lr"]))  # after ctrl's hook
            _train_step(m, c, o, x, y)
            h.remove()
            assert seen == [pytest.approx(1e-2 * 5 / 3, rel=1e-12)] and c.trace[-1].lr == seen[0]
            assert o.param_groups[0]["lr"] == 1e-2  # the schedule's LR put back after the step
    for m, _, _ in copies:
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m.state_dict().values()))
    shallow = copy.copy(ctrl)
    assert shallow.optimizer is opt and len(opt._optimizer_step_pre_hooks) == 1
    _train_step(model, ctrl, opt, x, y)
    assert ctrl.trace[-1].lr == pytest.approx(1e-2 * 5 / 3, rel=1e-12)


@pytest.mark.parametrize("kernel", ["eager", pytest.param("fused", marks=pytest.mark.skipif(
    not can_build_cpp(), reason="needs g++ and ninja"))])
def test_a_controller_holding_a_mirror_snapshot_pickles_and_deep_copies_and_the_copy_restores_it(kernel):
    """A controller that had entered MIRROR could not be pickled: the snapshot's layout cache held the parameters'
    UntypedStorages, so pickle.loads failed ("UntypedStorage has no attribute 'dtype'") and torch.save refused it
    ("Cannot save multiple tensors or storages that view the same data as different types"); with
    kernel="fused", deepcopy and pickle failed with "cannot pickle 'module' object". And plain pickle writes each
    tensor's storage on its own, so an unpickled snapshot's views no longer shared memory with its pool: the copy's
    drift read an unwritten scratch, 1.0 for any weights, and it kept what the original rolled back. Now every
    copy holds the snapshot, measures the original's drift and restores the snapshot bit for bit."""
    import io
    import pickle

    from unified_lora import MachineConfig

    model = tiny_bert()
    _, ctrl = setup_unified_lora(model, target_modules=["query", "value"], signal="loss", print_fn=None,
                                 machine=MachineConfig(initial_mode=2, warmup_steps=3),
                                 mirror=MirrorConfig(kernel=kernel))  # the drift rule: restore below 5 %
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ctrl.attach_optimizer(opt)
    x, y = classification_batch(8, 8)
    _train_step(model, ctrl, opt, x, y)
    assert ctrl.trace[-1].snapshot == "saved"
    buf = io.BytesIO()
    torch.save((model, ctrl, opt), buf)
    buf.seek(0)
    copies = [copy.deepcopy((model, ctrl, opt)), pickle.loads(pickle.dumps((model, ctrl, opt))),
              torch.load(buf, weights_only=False)]
    for m, c, o in [(model, ctrl, opt)] + copies:
        snap = [w.clone() for w in c.mirror.weights]
        for _ in range(3):  # the third step (step 3) leaves MIRROR and restores the snapshot
            loss = m(input_ids=x, labels=y).loss
            loss.backward()
            c.step(loss=0.01)
            o.step()
            o.zero_grad()
        assert c.trace[-1].snapshot == "restored" and not c.mirror.held
        assert 0 < c.trace[-1].drift < 0.05 and c.trace[-1].drift == ctrl.trace[-1].drift
        assert all(torch.equal(p, w) for p, w in zip(c.managed_parameters(), snap))
    for m, _, _ in copies:
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m.state_dict().values()))


def test_a_controller_pickled_before_the_exit_decision_runs_through_a_mirror_entry_and_exit():
    """A controller comes back without `__init__` when unpickled. One pickled before `_exit_decision` (a Mirror
    exit's decision, held until its transition commits) raised AttributeError at its first transition, here the
    MULTI -> MIRROR entry; one pickled before `_adapter_names` raised it at `attach_optimizer`. Each comes back as a
    new controller starts it, and the controller enters MIRROR and restores the snapshot at the exit."""
    import pickle

    model, _, ctrl, opt = _seq_controller("02")
    for name in ("_exit_decision", "_adapter_names"):
        delattr(ctrl, name)  # as an earlier version pickled it
    model, ctrl, opt = pickle.loads(pickle.dumps((model, ctrl, opt)))
    _seq_steps(model, ctrl, opt, [10.0])  # MULTI -> MIRROR: the snapshot
    snap = [w.clone() for w in ctrl.mirror.weights]
    _seq_steps(model, ctrl, opt, [1.0], seed=1)  # MIRROR -> MULTI: policy "always" restores it
    assert [(r.transition, r.snapshot) for r in ctrl.trace] == [("MULTI->MIRROR", "saved"),
                                                                ("MIRROR->MULTI", "restored")]
    assert not ctrl.mirror.held and ctrl._exit_decision is None and ctrl.last_decision.restore
    assert all(torch.equal(p, w) for p, w in zip(ctrl.managed_parameters(), snap))
    ctrl.attach_optimizer(opt)
    # (the keys of the dict of adapters are not in that pickle: they are named as adapters given as a list are)
    assert ctrl._adapter_names == ["adapter 0", "adapter 1"]


def test_every_attribute_a_controller_gained_since_the_first_version_is_given_back_to_an_older_pickle():
    """Enumerates `vars()` of a new controller (and of a PEFT one): an attribute `__init__` sets that the first
    version did not (conftest's FIRST_CONTROLLER_ATTRIBUTES) must come back from `__setstate__` when a pickle lacks
    it, with the value a new controller starts with. `_exit_decision` and `_adapter_names` did not."""
    from conftest import FIRST_CONTROLLER_ATTRIBUTES, unpickled_as_first_version
    from peft import LoraConfig, get_peft_model

    from unified_lora.peft_io import attach_to_peft_model

    model, _, ctrl, opt = _seq_controller("02", head=True)
    ctrl, model, opt = unpickled_as_first_version(ctrl, model, opt)
    _seq_steps(model, ctrl, opt, [10.0, 1.0])  # and it runs a Mirror cycle
    assert [r.snapshot for r in ctrl.trace] == ["saved", "restored"]
    peft_model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)),
                                LoraConfig(r=4, target_modules=["0"], modules_to_save=["1"]))
    unpickled_as_first_version(attach_to_peft_model(peft_model, signal="loss", print_fn=None), peft_model,
                               first=FIRST_CONTROLLER_ATTRIBUTES | {"peft_model"})  # (PeftController's first had it)


def test_a_bf16_model_trains_fp32_adapters_through_a_mirror_save_and_restore():
    # setup_unified_lora on a bf16 model makes the LoRA blocks fp32 (PEFT's autocast_adapter_dtype=True); the head
    # in modules_to_save stays bf16. AdamW's moments follow the fp32 blocks, the outputs stay bf16, and a Mirror
    # restore puts every managed parameter (two dtypes) and the optimizer state back bit for bit.
    model = tiny_bert().to(torch.bfloat16)
    adapters, ctrl = setup_unified_lora(model, target_modules=["query", "value"], modules_to_save=["classifier"],
                                        signal="loss", print_fn=None,
                                        mirror=MirrorConfig(policy="always", snapshot_optimizer=True))
    params = ctrl.managed_parameters()
    assert {p.dtype for a in adapters.values() for p in a.lora_parameters()} == {torch.float32}
    assert model.classifier.weight.dtype == torch.bfloat16 and model.classifier.weight in set(params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    ctrl.attach_optimizer(opt)
    x, y = classification_batch(8, 8)
    model(input_ids=x, labels=y).loss.backward()  # one plain step first, so AdamW has moments to snapshot
    opt.step()
    opt.zero_grad()
    snap = None
    for step in range(120):
        out = model(input_ids=x, labels=y)
        assert out.logits.dtype == torch.bfloat16
        out.loss.backward()
        ctrl.step(loss=50.0 if snap is None and ctrl.mode != 2 else 0.01)
        if ctrl.trace[-1].snapshot == "saved":
            snap = [p.detach().clone() for p in params]
            moments = [(p, opt.state[p]["exp_avg"].clone()) for p in params if "exp_avg" in opt.state[p]]
        opt.step()
        opt.zero_grad()
        if ctrl.trace[-1].snapshot == "restored":
            assert all(p.dtype == s.dtype and torch.equal(p, s) for p, s in zip(params, snap))
            assert moments and all(torch.equal(opt.state[p]["exp_avg"], m) for p, m in moments)
            q = adapters["bert.encoder.layer.0.attention.self.query"].lora_A[0]
            assert opt.state[q]["exp_avg"].dtype == torch.float32
            return
    raise AssertionError("no Mirror restore")


def test_a_grad_scaler_loop_that_unscales_first_goes_through_a_mirror_restore():
    """The README's AMP recipe: scaler.unscale_(opt) before ctrl.step. A restore clears every gradient, and
    scaler.step (which would otherwise find no gradient to check for inf and assert) leaves the restored
    weights exact."""
    model = tiny_bert()
    _, ctrl = setup_unified_lora(model, target_modules=["query", "value"], modules_to_save=["classifier"],
                                 signal="loss", print_fn=None, mirror=MirrorConfig(policy="always"))
    params = ctrl.managed_parameters()
    opt = torch.optim.AdamW(params, lr=1e-2)
    ctrl.attach_optimizer(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x, y = classification_batch(8, 8)
    snap = None
    for step in range(120):
        scaler.scale(model(input_ids=x, labels=y).loss).backward()
        scaler.unscale_(opt)
        ctrl.step(loss=50.0 if snap is None and ctrl.mode != 2 else 0.01)
        if ctrl.trace[-1].snapshot == "saved":
            snap = [p.detach().clone() for p in params]
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if ctrl.trace[-1].snapshot == "restored":
            assert all(torch.equal(p, s) for p, s in zip(params, snap))
            return
    raise AssertionError("no Mirror restore")


def test_resume_in_a_fresh_process_continues_the_same_trajectory(tmp_path):
    worker = str(Path(__file__).with_name("_resume_worker.py"))
    full, a, b = tmp_path / "full", tmp_path / "a", tmp_path / "b"
    for d in (full, a, b):
        d.mkdir()
    run = lambda *args: subprocess.run([sys.executable, worker, *map(str, args)], check=True)  # noqa: E731
    # the uninterrupted run also saves what a run of steps 0-29 saves, as it stands before step 30 (one start-up
    # fewer than a third process); k = 30 sits inside the corrupted stretch (steps 25-39)
    run(0, 60, full, "--save-at", 30, a)
    run(30, 60, b, a)  # the resume, in a fresh process
    held = []
    for sig in ("composite", "loss"):
        t_full = json.loads((full / f"{sig}.json").read_text())
        t_resumed = json.loads((a / f"{sig}.json").read_text()) + json.loads((b / f"{sig}.json").read_text())
        assert t_resumed == t_full, sig
        assert len({r[2] for r in t_full}) > 1, sig  # the trajectory really switches modes
        w_full = torch.load(full / f"{sig}.pt", weights_only=False)["params"]
        w_res = torch.load(b / f"{sig}.pt", weights_only=False)["params"]
        assert all(torch.equal(p, q) for p, q in zip(w_full, w_res)), sig
        held.append(torch.load(a / f"{sig}.pt", weights_only=False)["mirror_held"])
    assert any(held), "one of the runs must carry a held Mirror snapshot across the resume"


def _stress_cycle(model, make_batch, corrupt, steps=(90, 40, 60), loss_scale=0.5, **kw):
    """Clean steps, a stretch of corrupted labels, clean again; returns the trace."""
    adapters, ctrl = setup_unified_lora(model, print_fn=None, signal=SignalConfig(kind="loss", loss_scale=loss_scale),
                                        actuators=ActuatorConfig(lr_mode="absolute", mode_lrs=(1e-2, 1e-2, 5e-4)),
                                        **kw)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    ctrl.attach_optimizer(opt)
    model.train()
    pre, shock, post = steps
    for step in range(pre + shock + post):
        x, y = make_batch(step)
        _train_step(model, ctrl, opt, x, corrupt(y, step) if pre <= step < pre + shock else y)
    return ctrl


def _assert_mirror_during_shock_then_multi(ctrl, pre, shock):
    trace = ctrl.trace
    saved = [r for r in trace if r.snapshot == "saved"]
    assert saved and pre <= saved[0].step < pre + shock, "corrupted labels must drive MIRROR with a snapshot"
    assert max(r.phi for r in trace[pre:pre + shock]) >= 0.7
    exits = [r for r in trace if r.transition == "MIRROR->MULTI"]
    assert exits and exits[0].snapshot in ("restored", "kept") and exits[0].drift is not None
    assert trace[-1].mode <= 1 and trace[-1].rank <= 8


def test_end_to_end_bert_corrupted_labels_drive_mirror_and_clean_data_returns_to_multi():
    x, y = classification_batch(64)
    ctrl = _stress_cycle(tiny_bert(), lambda s: (x, y), lambda y, s: 1 - y,
                         target_modules=["query", "value"], modules_to_save=["classifier"])
    _assert_mirror_during_shock_then_multi(ctrl, 90, 40)


@pytest.mark.parametrize("other", ["eager_unpacked", pytest.param("fused", marks=pytest.mark.skipif(
    not can_build_cpp(), reason="kernel='fused' needs g++ and ninja"))])
def test_end_to_end_every_mirror_path_follows_the_packed_eager_trajectory(other):
    # same stress cycle twice: the rollback is bit-exact on every path, and packing the parameters
    # mid-training (at the first Mirror entry) changes no value the optimizer or the model sees
    traces = {}
    for kernel in ("eager", other):
        x, y = classification_batch(64)
        ctrl = _stress_cycle(tiny_bert(), lambda s: (x, y), lambda y, s: 1 - y, target_modules=["query", "value"],
                             modules_to_save=["classifier"], mirror=_mcfg(kernel))
        _assert_mirror_during_shock_then_multi(ctrl, 90, 40)
        traces[kernel] = ctrl.trace
        params = ctrl.managed_parameters()
        packed = {p.untyped_storage().data_ptr() for p in params}
        assert (len(packed) == 1) is (kernel == "eager")  # one buffer holds every snapshotted parameter
    a, b = traces["eager"], traces[other]
    assert [(r.mode, r.rank, r.snapshot, r.transition) for r in a] == [(r.mode, r.rank, r.snapshot, r.transition) for r in b]
    assert [r.loss for r in a] == [r.loss for r in b]
    drifts = [(r.drift, q.drift) for r, q in zip(a, b) if r.drift is not None]
    assert drifts and all(q == pytest.approx(r, rel=1e-5) for r, q in drifts)


@pytest.mark.skipif(not can_build_cpp(), reason="layer_kernel='cpp' builds csrc/nested_path.cpp: needs g++ and ninja")
def test_end_to_end_the_cpp_layer_kernel_follows_the_python_kernel_bit_for_bit():
    # a whole stress cycle (ranks 8 -> 16 -> 8, Mirror save and rollback) with the layers' nested path in C++:
    # every loss, mode, rank and final weight is the Python kernel's, to the bit
    runs = {}
    for layer_kernel in ("python", "cpp"):
        x, y = classification_batch(64)
        model = tiny_bert()
        ctrl = _stress_cycle(model, lambda s: (x, y), lambda y, s: 1 - y, target_modules=["query", "value"],
                             modules_to_save=["classifier"], layer_kernel=layer_kernel)
        _assert_mirror_during_shock_then_multi(ctrl, 90, 40)
        assert {a.kernel for a in ctrl.adapters} == {layer_kernel}
        assert max(r.rank for r in ctrl.trace) == 16  # two and three active blocks both ran
        runs[layer_kernel] = ctrl.trace, [p.detach().clone() for p in ctrl.managed_parameters()]
    (a, wa), (b, wb) = runs["python"], runs["cpp"]
    assert [(r.mode, r.rank, r.snapshot, r.transition, r.loss) for r in a] == \
        [(r.mode, r.rank, r.snapshot, r.transition, r.loss) for r in b]
    assert all(torch.equal(p, q) for p, q in zip(wa, wb))


def test_end_to_end_llama_corrupted_labels_drive_mirror_and_clean_data_returns_to_multi():
    pattern = torch.arange(16) % 5 + 3

    def batch(step):
        g = torch.Generator().manual_seed(step)
        x = (pattern + torch.randint(0, 2, (16, 16), generator=g)) % VOCAB
        return x, x

    def corrupt(y, step):
        return torch.randint(0, VOCAB, y.shape, generator=torch.Generator().manual_seed(10_000 + step))

    # An LM starts at ln(64) ≈ 4.2 nats, deep in MIRROR on the absolute v1 scale (SPEC §2 weakness):
    # warmup keeps the machine still until the loss has come down.
    ctrl = _stress_cycle(tiny_llama(), batch, corrupt, loss_scale=1.0, warmup_steps=60,
                         target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    _assert_mirror_during_shock_then_multi(ctrl, 90, 40)


def test_snapshot_buffers_are_reused_across_cycles_and_state_dict_is_a_copy(kernel):
    ps = _mirror_params()
    snap = MirrorSnapshot(_mcfg(kernel))
    snap.save(ps)
    ptrs = [w.data_ptr() for w in snap.weights]
    sd = snap.state_dict()
    with torch.no_grad():
        ps[0].add_(1.0)
    snap.clear()
    snap.save(ps)
    assert [w.data_ptr() for w in snap.weights] == ptrs  # no fresh allocation at the second entry
    assert torch.equal(snap.weights[0], ps[0]) and not torch.equal(sd["weights"][0], ps[0])


def _ref_drift(ps, snap_ws):
    num = sum((p.detach() - w).norm() for p, w in zip(ps, snap_ws))
    return (num / sum(w.norm() for w in snap_ws)).item()


def test_drift_stays_exact_across_cycles_prefixes_and_a_reloaded_snapshot(kernel):
    # the scratch buffers and the Σ‖W_snap‖ cached at save must never leak a stale value
    ps = _mirror_params()
    snap = MirrorSnapshot(_mcfg(kernel))
    for cycle in range(3):
        snap.save(ps)
        ref_ws = [p.detach().clone() for p in ps]
        with torch.no_grad():
            ps[0].add_(0.1 * (cycle + 1))
            ps[1].mul_(1.5)
        assert snap.drift(ps) == pytest.approx(_ref_drift(ps, ref_ws), rel=1e-5)
        # a prefix of the snapshot (the active blocks only) uses its own denominator
        assert snap.drift(ps[:1]) == pytest.approx(_ref_drift(ps[:1], ref_ws[:1]), rel=1e-5)
        assert torch.equal(snap.weights[0], ref_ws[0])  # drift never touches the snapshot
        snap.restore(ps)
        assert all(torch.equal(p, w) for p, w in zip(ps, ref_ws))  # bit-exact rollback
        with torch.no_grad():
            ps[1].add_(1.0)
        snap.clear()
    snap.save(ps)
    sd = snap.state_dict()
    other = MirrorSnapshot(_mcfg(kernel))
    other.load_state_dict(sd)
    with torch.no_grad():
        ps[0].sub_(0.3)
    assert other.drift(ps) == pytest.approx(_ref_drift(ps, sd["weights"]), rel=1e-5)


def test_snapshot_pools_mixed_dtypes_odd_sizes_and_a_changed_layout(kernel):
    # fp32 LoRA-like blocks (sizes whose gcd packs rows), a bf16 tensor (its own pool), a 2-element
    # bias and a 0-d scalar (zero-padded rows): drift over the whole set and over a prefix matches
    # the per-tensor formula, the rollback is bit-exact, and new shapes rebuild the pools
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 96), (96, 4), (8, 96), (96, 8), (2,), ()]
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ps.insert(2, torch.nn.Parameter(torch.randn(5, 7, generator=g).bfloat16()))
    snap = MirrorSnapshot(_mcfg(kernel))
    snap.save(ps)
    assert [w.dtype for w in snap.weights] == [p.dtype for p in ps]
    ref_ws = [p.detach().clone() for p in ps]
    with torch.no_grad():
        for i, p in enumerate(ps):
            p.add_(0.05 * (i + 1))
    ref = [p.detach().float() for p in ps], [w.float() for w in ref_ws]
    for n in (len(ps), 3, 1):
        assert snap.drift(ps[:n]) == pytest.approx(_ref_drift(ref[0][:n], ref[1][:n]), rel=1e-3)
    with pytest.raises(ValueError, match="snapshot holds 7"):
        snap.drift(ps + ps[:1])
    snap.restore(ps)
    assert all(torch.equal(p, w) for p, w in zip(ps, ref_ws))
    snap.clear()
    with pytest.raises(ValueError, match="call save"):
        snap.drift(ps)
    wider = [torch.nn.Parameter(torch.randn(16, 96, generator=g)) for _ in range(2)]
    snap.save(wider)
    assert snap.drift([]) == 0.0  # an empty prefix has no drift
    with torch.no_grad():
        wider[1].mul_(2.0)
    assert snap.drift(wider) == pytest.approx(wider[1].norm().item() / 2 / (wider[0].norm().item() + wider[1].norm().item() / 2), rel=1e-5)


def test_a_restore_bumps_the_version_so_autograd_catches_a_pending_backward(kernel):
    # the fused copy writes through data pointers; it must still count as an in-place write
    ps = _mirror_params()
    snap = MirrorSnapshot(_mcfg(kernel))
    snap.save(ps)
    loss = (ps[0] * ps[0]).sum()  # saves ps[0] for backward
    snap.restore(ps)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def _storages(ps):
    return [p.untyped_storage().data_ptr() for p in ps]


def test_packing_moves_parameters_into_one_buffer_and_changes_nothing_else():
    # the same model and optimizer trained twice, once with the parameters packed at the first
    # snapshot: the Parameter objects stay, and every value, gradient and optimizer step stays equal
    runs = {}
    for pack in (False, True):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s)) for s in [(4, 96), (96, 4), (8, 96), (96, 8), (2,), ()]]
        ids = [id(p) for p in ps]
        opt = torch.optim.AdamW(ps, lr=0.05, weight_decay=0.01)
        snap = MirrorSnapshot(MirrorConfig(pack=pack))
        losses = []
        for step in range(6):
            loss = sum(((p - 0.3) ** 2).sum() for p in ps)
            loss.backward()
            if step == 2:  # mid-training, with gradients and moments in place
                snap.save(ps)
            if step == 4:
                snap.restore(ps)
                snap.clear()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert [id(p) for p in ps] == ids and all(type(p) is torch.nn.Parameter and p.requires_grad for p in ps)
        runs[pack] = (losses, [p.detach().clone() for p in ps], _storages(ps))
    assert runs[True][0] == runs[False][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[True][1], runs[False][1]))
    assert len(set(runs[True][2])) == 1 and len(set(runs[False][2])) == 6


def test_packing_leaves_tied_and_foreign_views_alone():
    # a parameter that views someone else's buffer (FSDP's flat parameter, a user's arena) or shares
    # a storage with another (tied weights) must keep that link: its group is snapshotted per tensor
    arena = torch.zeros(64)
    view = torch.nn.Parameter(arena[:32].view(4, 8))
    free = torch.nn.Parameter(torch.randn(8, 4))
    tied = torch.nn.Parameter(torch.randn(3, 5))
    for ps in ([view, free], [free, tied, tied]):
        before = _storages(ps)
        snap = MirrorSnapshot()
        snap.save(ps)
        assert _storages(ps) == before  # nothing moved
        with torch.no_grad():
            for p in ps:
                p.add_(1.0)
        assert snap.drift(ps) > 0
        snap.restore(ps)
        assert all(torch.equal(p, w) for p, w in zip(ps, snap.weights))
    assert torch.equal(arena[:32].view(4, 8), view) and arena[32:].eq(0).all()  # the arena saw the restore


def test_a_parameter_moved_after_save_is_still_measured_and_restored_then_repacked():
    # .to(), load_state_dict(assign=True) and the like give a parameter new storage between save and
    # restore: the packed buffer no longer holds it, so drift and restore must not read or write there
    ps = _mirror_params()
    snap = MirrorSnapshot()
    snap.save(ps)
    ref_ws = [p.detach().clone() for p in ps]
    assert len(set(_storages(ps))) == 1
    ps[0].data = ps[0].data.clone()  # moved out of the packed buffer
    with torch.no_grad():
        ps[0].mul_(2.0)
    assert snap.drift(ps) == pytest.approx(_ref_drift(ps, ref_ws), rel=1e-5)
    snap.restore(ps)
    assert all(torch.equal(p, w) for p, w in zip(ps, ref_ws))
    snap.clear()
    snap.save(ps)  # the next entry packs them again, the one still in the old buffer included
    assert len(set(_storages(ps))) == 1
    grown = ps + [torch.nn.Parameter(torch.randn(2, 8))]  # a new layout (a task added) re-packs all
    snap.save(grown)
    assert len(set(_storages(grown))) == 1 and snap.drift(grown) == 0.0


def test_packed_parameters_save_and_load_with_safetensors_transformers_and_torch(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_bert()
    _, ctrl = setup_unified_lora(model, target_modules=["query", "value"], modules_to_save=["classifier"],
                                 print_fn=None)
    params = ctrl.managed_parameters()
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))
    ctrl.mirror.save(params)
    assert len(set(_storages(params))) == 1
    want = {k: v.clone() for k, v in lora_state_dict(model).items()}
    save_file(dict(lora_state_dict(model)), str(tmp_path / "lora.safetensors"))
    assert all(torch.equal(v, want[k]) for k, v in load_file(str(tmp_path / "lora.safetensors")).items())
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    other = tiny_bert()
    setup_unified_lora(other, target_modules=["query", "value"], modules_to_save=["classifier"], print_fn=None)
    other.load_state_dict(torch.load(tmp_path / "sd.pt"))
    assert all(torch.equal(v, want[k]) for k, v in lora_state_dict(other).items())
    model.save_pretrained(tmp_path / "hf")  # transformers' safetensors path, which checks for shared storage
    assert (tmp_path / "hf" / "model.safetensors").exists()
    got = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in want.items() if k in got) and any(k in got for k in want)


def test_a_packed_restore_bumps_versions_one_by_one_where_torch_takes_no_list(monkeypatch):
    # torch before ~2.4 took one tensor per _increment_version call; the restore must still count as a write
    real = torch._C._increment_version

    def one_at_a_time(t):
        if not isinstance(t, torch.Tensor):
            raise TypeError("_increment_version(): argument 'tensor' must be Tensor, not list")
        real(t)

    monkeypatch.setattr(torch._C, "_increment_version", one_at_a_time)
    ps = _mirror_params()
    snap = MirrorSnapshot()
    snap.save(ps)
    loss = (ps[1] * ps[1]).sum()
    before = ps[1]._version
    snap.restore(ps)
    assert ps[1]._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_mirror_pack_must_be_a_bool():
    with pytest.raises(ValueError, match="pack: must be true or false, got 'yes'"):
        MirrorConfig(pack="yes")


@pytest.mark.skipif(not can_build_cpp(), reason="kernel='fused' needs g++ and ninja")
def test_fused_kernel_matches_eager_over_chunks_and_any_thread_count():
    # 70 001 elements span two 64 Ki-element chunks; the fused sums are added in a fixed order
    g = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (70_001, 1536, 3)]
    eager, fused = MirrorSnapshot(), MirrorSnapshot(MirrorConfig(kernel="fused"))
    eager.save(ps)
    fused.save(ps)
    with torch.no_grad():
        for p in ps:
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    threads = torch.get_num_threads()
    try:
        got = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got.append(fused.drift(ps))
    finally:
        torch.set_num_threads(threads)
    assert got[0] == got[1] == got[2]
    assert got[0] == pytest.approx(eager.drift(ps), rel=1e-5)
    assert got[0] == pytest.approx(_ref_drift(ps, eager.weights), rel=1e-5)
    fused.restore(ps)
    assert all(torch.equal(p, w) for p, w in zip(ps, eager.weights))


def test_fused_kernel_config_and_a_missing_compiler_are_clear_errors(monkeypatch, tmp_path):
    # needs no compiler: the missing one is the case under test
    with pytest.raises(ValueError, match="kernel: must be 'eager' or 'fused', got 'cuda'"):
        MirrorConfig(kernel="cuda")
    from unified_lora._fused import FusedKernelsUnavailable, mirror_kernels

    mirror_kernels.cache_clear()
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler and no ninja on this PATH
    try:
        with pytest.raises(FusedKernelsUnavailable, match=r"needs a C\+\+ compiler \(g\+\+\) and ninja"):
            MirrorSnapshot(MirrorConfig(kernel="fused")).save([torch.randn(4, 4)])
    finally:
        mirror_kernels.cache_clear()


@pytest.mark.skipif(not can_build_cpp(), reason="kernel='fused' needs g++ and ninja")
def test_fused_kernel_rejects_what_it_cannot_read_and_names_the_fix():
    snap = MirrorSnapshot(MirrorConfig(kernel="fused"))
    with pytest.raises(ValueError, match=r"parameter 1 is torch.float32 on cpu, not contiguous\. Use MirrorConfig\(kernel='eager'\)"):
        snap.save([torch.randn(4, 4), torch.randn(4, 6).t()])
    with pytest.raises(ValueError, match="parameter 0 is torch.float64"):
        snap.save([torch.randn(4, 4, dtype=torch.float64)])
    assert not snap.held  # a refused save leaves no half-written snapshot behind


def test_drift_of_bf16_weights_accumulates_in_fp32(kernel):
    ps = [torch.nn.Parameter(torch.randn(16, 64).bfloat16()) for _ in range(3)]
    snap = MirrorSnapshot(_mcfg(kernel))
    snap.save(ps)
    ref_ws = [p.detach().float().clone() for p in ps]
    with torch.no_grad():
        ps[2].add_(0.25)
    ref = _ref_drift([p.float() for p in ps], ref_ws)
    assert snap.drift(ps) == pytest.approx(ref, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threads", [1, 2])
def test_the_two_forms_of_the_drift_row_norms_give_the_same_values(dtype, threads):
    """The eager drift reduces its rows per half on the CPU and in one call on a GPU: the CPU's choice is
    about which thread reads which row, and must not change a value."""
    from unified_lora.mirror import _FlatPool

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        for shapes in ([(8, 384)] * 6, [(7, 3), (5, 64), (2, 100)], [(16, 2048), (2048, 16)]):
            pool = _FlatPool([torch.Size(s) for s in shapes], "cpu", dtype)
            pool.both.copy_(torch.randn(pool.both.shape, generator=g))
            for count in (len(shapes), 1):  # the whole pool and a prefix
                v = pool.prefix(count, None)
                one = pool.squared_row_norms(v, per_half=False).clone()
                assert torch.equal(pool.squared_row_norms(v, per_half=True), one)
                assert one.dtype == torch.float32 and one.shape == (2, pool.row_end[count - 1])
    finally:
        torch.set_num_threads(before)


# -- load_state_dict refuses a state saved for other adapters ------------------------------------------------------
def _seq_controller(targets, widths=(16, 16, 16, 16), signal="loss", rank_levels=(4, 8, 16), head=False,
                    mirror=None, dtype=torch.float32, **kw):
    """A Sequential of Linears with nested LoRA on `targets` (layer indices), its AdamW optimizer, and the
    controller. With signal="loss", phi = L/(1+L) step by step: a loss of 10 enters MIRROR, 1 returns to MULTI."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16 if i == 0 else widths[i - 1], w) for i, w in enumerate(widths)])
    model.to(dtype)
    sig = SignalConfig(kind="loss", alpha=1.0, beta=0.01) if signal == "loss" else signal
    adapters, ctrl = setup_unified_lora(model, target_modules=list(targets), print_fn=None, signal=sig,
                                        rank_levels=rank_levels, modules_to_save=[str(len(widths) - 1)] if head else None,
                                        mirror=mirror or MirrorConfig(policy="always", snapshot_optimizer=True), **kw)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctrl.attach_optimizer(opt)
    return model, adapters, ctrl, opt


def _seq_steps(model, ctrl, opt, losses, seed=0):
    """One training step per entry: a real backward, then ctrl.step with that loss (None: the real loss)."""
    g = torch.Generator().manual_seed(seed)
    for fake in losses:
        x = torch.randn(8, 16, generator=g).to(next(model.parameters()).dtype)
        loss = model(x).pow(2).mean()
        loss.backward()
        ctrl.step(loss.item() if fake is None else fake)
        opt.step()
        opt.zero_grad()


def test_another_optimizer_attached_during_mirror_does_not_get_the_old_ones_state_at_the_restore():
    """A controller re-attached mid-run to a new optimizer (SGD with momentum swapped for AdamW) while in MIRROR with
    snapshot_optimizer=True: the restore at MIRROR's exit wrote the old optimizer's saved state (momentum_buffer)
    into the new one, whose next step then failed with KeyError: 'exp_avg'. The snapshot's optimizer state belongs
    to the optimizer it was taken from: attaching another drops it (with a warning), and the restore rolls back
    the weights only, leaving the new optimizer's own state."""
    model, _, ctrl, _ = _seq_controller("01")
    params = ctrl.managed_parameters()
    sgd = torch.optim.SGD(params, lr=1e-2, momentum=0.9)
    ctrl.attach_optimizer(sgd)
    _seq_steps(model, ctrl, sgd, [1.0, 10.0])
    assert ctrl.mode == 2 and ctrl.mirror.opt_state is not None
    saved = [w.clone() for w in ctrl.mirror.weights]
    adamw = torch.optim.AdamW(params, lr=1e-2)
    with pytest.warns(UserWarning, match="previous optimizer's state"):
        ctrl.attach_optimizer(adamw)
    ctrl.attach_optimizer(adamw)  # the same optimizer again: nothing more to drop, no warning
    _seq_steps(model, ctrl, adamw, [10.0])
    moments = {p: adamw.state[p]["exp_avg"].clone() for p in params if p in adamw.state}
    _seq_steps(model, ctrl, adamw, [1.0], seed=1)
    assert ctrl.trace[-1].snapshot == "restored" and all(torch.equal(p, w) for p, w in zip(params, saved))
    assert moments and all(torch.equal(adamw.state[p]["exp_avg"], m) for p, m in moments.items())  # its own state
    _seq_steps(model, ctrl, adamw, [None, None], seed=2)  # and it trains on


_LOAD_CASES = {  # what differs: (saved controller, loaded controller, error with the layout, error without it)
    "fewer adapters": (dict(targets="0123"), dict(targets="02"),
                       r"saved for 4 adapters \('0', '1', '2', '3'\) with 24 LoRA parameters, and 0 extra parameters; "
                       r"this controller has 2 adapters \('0', '2'\) with 12 LoRA parameters",
                       r"the Mirror snapshot holds 24 tensors; this controller has 2 adapters \('0', '2'\)"),
    "other adapters, same shapes": (dict(targets="01"), dict(targets="23"),
                                    r"adapter 0 is '0' in the saved state and '2' here", None),  # (None: no test)
    "other rank levels": (dict(targets="01"), dict(targets="01", rank_levels=(4, 8, 12)),
                          r"adapter '0': saved with rank levels \(4, 8, 16\), this one has \(4, 8, 12\)",
                          r"Mirror snapshot of 0.lora_A.2: saved \(8, 16\), the parameter is \(4, 16\)"),
    "other widths": (dict(targets="01"), dict(targets="01", widths=(16, 24, 16, 16)),
                     r"adapter '1': saved block shapes \[\[4, 16\], \[4, 16\], \[8, 16\], \[16, 4\], \[16, 4\], "
                     r"\[16, 8\]\], this one has \[\[4, 16\], \[4, 16\], \[8, 16\], \[24, 4\], \[24, 4\], \[24, 8\]\]",
                     r"Mirror snapshot of 1.lora_B.0: saved \(16, 4\), the parameter is \(24, 4\)"),
    "a head more": (dict(targets="01"), dict(targets="01", head=True),
                    r"and 0 extra parameters; this controller has .* and 2 extra parameters",
                    r"the Mirror snapshot holds 12 tensors; .* and 2 extra parameters \(14 in all\)"),
    "other signal": (dict(targets="01"), dict(targets="01", signal="composite"),
                     r"the signal state has keys \['E_s', 'calib', 'loss_scale', 'phi'\]; this controller's "
                     r"CompositeSignal has", r"the signal state has keys"),
}


@pytest.mark.parametrize("case,with_layout", [
    pytest.param(case, with_layout, id=f"{case}-{'layout' if with_layout else 'state-without-layout'}")
    for case, (_, _, _, without) in _LOAD_CASES.items() for with_layout in (True, False)
    if with_layout or without is not None])  # same count and shapes: only the recorded layout tells them apart
def test_load_state_dict_refuses_a_state_saved_for_other_adapters_and_loads_nothing(case, with_layout):
    """A state holds per-adapter tensors in adapter order (the Mirror snapshot and its optimizer moments, the stored
    gradients, the signal's EMAs): loaded into a controller over other adapters, a later restore would write one
    layer's snapshot into another (4 adapters saved, 2 loaded: layer '2' got layer '1''s weights). It is refused,
    naming what differs, and the controller is left as it was. A state saved before the layout was recorded is
    checked by its tensors' shapes: all that can tell two layers of the same shape apart."""
    saved_kw, loaded_kw, with_msg, without_msg = _LOAD_CASES[case]
    model, _, ctrl, opt = _seq_controller(**saved_kw)
    _seq_steps(model, ctrl, opt, [10.0, 10.0])  # MIRROR, snapshot held with its Adam moments
    assert ctrl.mode == 2 and ctrl.mirror.held
    sd = ctrl.state_dict()
    message = with_msg
    if not with_layout:
        sd.pop("layout", None)
        message = without_msg
    _, adapters2, ctrl2, _ = _seq_controller(**loaded_kw)
    before = (ctrl2.global_step, ctrl2.mode, ctrl2.mirror.held, ctrl2.signal.state_dict(),
              [a.rank for a in adapters2.values()])
    with pytest.raises(ValueError, match=message):
        ctrl2.load_state_dict(sd)
    assert (ctrl2.global_step, ctrl2.mode, ctrl2.mirror.held, ctrl2.signal.state_dict(),
            [a.rank for a in adapters2.values()]) == before


def test_load_state_dict_checks_stored_gradients_and_optimizer_moments_and_still_loads_what_fits():
    """The composite signal's stored gradients and the snapshot's Adam moments are checked tensor by tensor (here in a
    state without the layout record, which would catch neither); a state that fits, with or without the layout
    record, loads and continues the same trajectory bit for bit."""
    model, _, ctrl, opt = _seq_controller(targets="01", signal="composite")
    _seq_steps(model, ctrl, opt, [None] * 4)
    ctrl.mirror.save(ctrl.managed_parameters(), opt)  # a held snapshot with moments, as a MIRROR entry leaves it
    sd = ctrl.state_dict()
    assert len(sd["grad_stats"]["prev"]) == 2 and sd["mirror"]["opt_state"][0]["exp_avg"].shape == (4, 16)
    bad = {k: v for k, v in sd.items() if k != "layout"}
    bad["grad_stats"] = {"prev": [sd["grad_stats"]["prev"][0], [g.t() for g in sd["grad_stats"]["prev"][1]]]}
    _, _, other, _ = _seq_controller(targets="01", signal="composite")
    with pytest.raises(ValueError, match=r"adapter '1': stored gradient shapes \[\[16, 4\], \[16, 4\], \[4, 16\], "
                                         r"\[4, 16\]\], its blocks are \[\[4, 16\], \[4, 16\], \[16, 4\], \[16, 4\]\]"):
        other.load_state_dict(bad)
    moments = [None if st is None else dict(st) for st in sd["mirror"]["opt_state"]]
    moments[3]["exp_avg_sq"] = moments[3]["exp_avg_sq"][:2]
    bad = {k: v for k, v in sd.items() if k != "layout"}
    bad["mirror"] = dict(sd["mirror"], opt_state=moments)
    with pytest.raises(ValueError, match=r"Mirror snapshot's exp_avg_sq of 0.lora_B.0: saved \(2, 4\), the "
                                         r"parameter is \(16, 4\)"):
        other.load_state_dict(bad)
    assert not other.mirror.held and other.grad_stats.prev == []

    weights = {k: v.clone() for k, v in model.state_dict().items()}
    opt_sd = copy.deepcopy(opt.state_dict())
    _seq_steps(model, ctrl, opt, [None] * 3, seed=1)
    for fits in (sd, {k: v for k, v in sd.items() if k != "layout"}):
        m2, _, c2, o2 = _seq_controller(targets="01", signal="composite")
        m2.load_state_dict(weights)
        o2.load_state_dict(copy.deepcopy(opt_sd))
        c2.load_state_dict(fits)
        assert c2.mirror.held and c2.global_step == 4
        _seq_steps(m2, c2, o2, [None] * 3, seed=1)
        assert [(r.phi, r.mode, r.rank) for r in c2.trace] == [(r.phi, r.mode, r.rank) for r in ctrl.trace[-3:]]
        assert all(torch.equal(p, q) for p, q in zip(m2.parameters(), model.parameters()))


def _same(a, b) -> bool:
    """Equal, tensor by tensor (shape, dtype and values), through nested dicts and lists."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _held_composite_state():
    """A composite-signal controller 4 steps in, holding a Mirror snapshot with its Adam moments, and its state."""
    model, _, ctrl, opt = _seq_controller(targets="01", signal="composite")
    _seq_steps(model, ctrl, opt, [None] * 4)
    ctrl.mirror.save(ctrl.managed_parameters(), opt)
    return model, ctrl, opt, ctrl.state_dict()


@pytest.mark.parametrize("part,key", [("machine", "last_transition_step"), ("mirror", "loss_at_entry"),
                                      ("mirror", "opt_state"), ("grad_stats", "prev"), ("layout", "extra_shapes"),
                                      ("machine", None)])
def test_load_state_dict_refuses_a_truncated_part_before_loading_anything(part, key):
    """A state whose parts lack a key (a truncated or hand-edited file) raised a KeyError halfway through the load:
    the Mirror snapshot, the signal and the stored gradients were already replaced (or the snapshot cleared), so the
    controller was left half-way between its own state and the file's. Now a ValueError names the missing key and
    nothing is loaded."""
    sd = _held_composite_state()[3]
    if key is None:
        sd[part] = [sd[part]["mode"]]  # not a dict at all
    else:
        del sd[part][key]
    model, _, ctrl, opt = _seq_controller(targets="01", signal="composite")
    _seq_steps(model, ctrl, opt, [None] * 2, seed=5)  # a controller with a state of its own
    before = ctrl.state_dict()
    msg = rf"sd\['{part}'\] is missing keys \['{key}'\]" if key else rf"sd\['{part}'\] is a list, not a dict"
    with pytest.raises(ValueError, match=msg):
        ctrl.load_state_dict(sd)
    assert _same(ctrl.state_dict(), before)


def test_state_dict_returns_copies_and_load_state_dict_keeps_none_of_the_callers_tensors():
    """On the CPU, `.cpu()` / `.to(device)` return the tensor itself: `state_dict()` handed out the snapshot's Adam
    moments (editing the returned state edited the controller's snapshot), and `load_state_dict` kept the given
    stored gradients as its buffers, which the next steps overwrite in place: training a loaded controller changed
    the state it was loaded from, so loading that state again (a retry, a second run from one checkpoint) did not
    give the saved state."""
    _, ctrl, _, sd = _held_composite_state()
    ref = copy.deepcopy(sd)
    with torch.no_grad():
        for st in filter(None, sd["mirror"]["opt_state"]):
            for v in st.values():
                v.add_(1.0)
        for gs in sd["grad_stats"]["prev"]:
            for g in gs:
                g.add_(1.0)
    assert _same(ctrl.state_dict(), ref)

    sd = copy.deepcopy(ref)
    model, _, c2, opt2 = _seq_controller(targets="01", signal="composite")
    c2.load_state_dict(sd)
    _seq_steps(model, c2, opt2, [None] * 2, seed=3)
    assert _same(sd, ref)


def test_a_snapshot_loaded_into_a_bf16_model_restores_its_adam_moments_in_bf16():
    """A state saved mid-MIRROR from fp32 blocks, resumed on bf16 blocks: the restore casts the weights to bf16
    (documented) but put the fp32 Adam moments back as they were, and the next `optimizer.step()` failed
    ("expected dtype float ... but got BFloat16"). The moments now follow their parameter's dtype, as the weights do
    and as torch's `Optimizer.load_state_dict` casts them; the scalar "step" keeps its own."""
    sd = _held_composite_state()[3]
    model, _, ctrl, opt = _seq_controller(targets="01", signal="composite", dtype=torch.bfloat16,
                                          autocast_adapter_dtype=False)
    ps = ctrl.managed_parameters()
    assert ps[0].dtype == torch.bfloat16
    ctrl.load_state_dict(sd)
    _seq_steps(model, ctrl, opt, [None] * 2, seed=3)  # the optimizer has bf16 moments of its own now
    ctrl.mirror.restore(ps, opt)
    for p, st in zip(ps, sd["mirror"]["opt_state"]):
        if st is None:
            continue
        got = opt.state[p]
        assert got["exp_avg"].dtype == got["exp_avg_sq"].dtype == torch.bfloat16
        assert torch.equal(got["exp_avg"], st["exp_avg"].to(torch.bfloat16))
        assert got["step"].dtype == st["step"].dtype and torch.equal(got["step"], st["step"])
    opt.state.clear()  # and with no live moments to write into
    ctrl.mirror.restore(ps, opt)
    assert all(opt.state[p]["exp_avg"].dtype == torch.bfloat16 for p, st in zip(ps, sd["mirror"]["opt_state"]) if st)
    _seq_steps(model, ctrl, opt, [None] * 2, seed=4)  # failed here
    assert all(torch.isfinite(p).all() for p in ps)


# -- a transition is all or nothing ------------------------------------------------------------------------------
def _run_state(model, ctrl, opt):
    """Everything a step can change: weights, optimizer moments, the controller's state and its trace."""
    sd = ctrl.state_dict()
    sd["mirror"] = {k: v for k, v in sd["mirror"].items() if k != "opt_home"}
    return ([p.detach().clone() for p in model.parameters()],
            [{k: v.clone() for k, v in st.items()} for st in opt.state.values()],
            sd, [(r.step, r.loss, r.phi, r.mode, r.rank, r.lr, r.transition, r.snapshot, r.drift) for r in ctrl.trace],
            [a.rank for a in ctrl.adapters], ctrl.get_last_lr())


def _same_run_state(a, b) -> bool:
    def eq(x, y):
        if torch.is_tensor(x):
            return torch.is_tensor(y) and x.shape == y.shape and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return isinstance(y, (list, tuple)) and len(x) == len(y) and all(map(eq, x, y))
        return x == y
    return eq(a, b)


@pytest.mark.skipif(not can_build_cpp(), reason="kernel='fused' needs g++ and ninja")
def test_a_failed_mirror_entry_leaves_the_controller_as_if_the_machine_had_held_and_the_run_goes_on():
    """An fp64 model under MirrorConfig(kernel='fused'), whose kernels take fp32/bf16/fp16 only: the MULTI -> MIRROR
    entry raises at the snapshot. The machine had already moved (the old code left it reading MIRROR, with the layers at
    rank 8, no snapshot, and the MIRROR LR). Now the error still reaches the caller, and the controller is exactly where
    a run whose machine held MULTI at that step is (warmup_steps=2 holds it there): mode, dwell counter, ranks, LR,
    no snapshot; the step is counted and traced with the error. Once the caller swaps in the eager kernel, the run goes
    on as that reference run does: the same trace and bit-identical weights."""
    lrs = ActuatorConfig(lr_mode="absolute", mode_lrs=(1e-2, 5e-3, 1e-3))
    losses = [1.0, 10.0, 10.0, 10.0, 1.0, 1.0]
    model, adapters, ctrl, opt = _seq_controller(targets="02", dtype=torch.float64, actuators=lrs,
                                                 mirror=MirrorConfig(kernel="fused", policy="always"))
    ref_model, _, ref, ref_opt = _seq_controller(targets="02", dtype=torch.float64, actuators=lrs, warmup_steps=2,
                                                 mirror=MirrorConfig(policy="always"))
    _seq_steps(model, ctrl, opt, losses[:1])
    g = torch.Generator().manual_seed(0)
    torch.randn(8, 16, generator=g)  # the first step's batch
    x = torch.randn(8, 16, generator=g).double()
    model(x).pow(2).mean().backward()
    with pytest.raises(ValueError, match=r"kernel='fused' takes contiguous fp32/bf16/fp16 CPU tensors"):
        ctrl.step(losses[1])
    assert ctrl.mode == 1 and ctrl.machine.last_transition_step is None and not ctrl.mirror.held
    assert [a.rank for a in adapters.values()] == [8, 8] and ctrl.get_last_lr() == 5e-3
    assert ctrl.global_step == 2 and ctrl.trace[-1].mode == 1 and ctrl.trace[-1].transition is None
    assert ctrl.trace[-1].components["transition_error"].startswith("MULTI->MIRROR: ValueError: Mirror: kernel='fused'")
    opt.step()
    opt.zero_grad()
    _seq_steps(ref_model, ref, ref_opt, losses[:2])
    assert _same_run_state(_run_state(model, ctrl, opt), _run_state(ref_model, ref, ref_opt))

    ctrl.mirror = MirrorSnapshot(MirrorConfig(policy="always"))  # the fix: the eager kernel takes fp64
    g_state = g.get_state()
    for m, c, o in ((model, ctrl, opt), (ref_model, ref, ref_opt)):
        g.set_state(g_state)
        for fake in losses[2:]:
            m(torch.randn(8, 16, generator=g).double()).pow(2).mean().backward()
            c.step(fake)
            o.step()
            o.zero_grad()
    assert [r.transition for r in ref.trace if r.transition] == ["MULTI->MIRROR", "MIRROR->MULTI"]
    assert _same_run_state(_run_state(model, ctrl, opt), _run_state(ref_model, ref, ref_opt))


def test_a_failed_mirror_exit_keeps_mode_rank_and_snapshot_and_the_run_goes_on():
    """A managed block whose shape changed while in MIRROR (here the top block of a max_rank=32 layer, which no mode
    activates, so forward and backward still run): the MIRROR -> MULTI exit raises at the drift, before any write. The
    old code left the machine reading MULTI with the layers at rank 16 and the snapshot held. Now the machine is back
    in MIRROR with its dwell counter, the layers at 16, the snapshot held and untouched: exactly a run whose machine
    held MIRROR at that step (min_dwell=3 holds it there). With the block put back, the next step's exit restores the
    snapshot, and the run equals that reference run bit for bit."""
    losses = [1.0, 10.0, 10.0, 1.0, 1.0, 1.0]
    kw = dict(targets="02", max_rank=32, mirror=MirrorConfig(policy="always", snapshot_optimizer=True))
    model, adapters, ctrl, opt = _seq_controller(**kw)
    ref_model, _, ref, ref_opt = _seq_controller(min_dwell=3, **kw)
    assert adapters["0"].boundaries == (4, 8, 16, 32)
    _seq_steps(model, ctrl, opt, losses[:3])
    assert ctrl.mode == 2 and ctrl.mirror.held and ctrl.machine.last_transition_step == 1
    snapshot = [w.clone() for w in ctrl.mirror.weights]
    top = adapters["2"].lora_A[3]
    kept = top.data
    top.data = torch.zeros(8, 16)  # was (16, 16)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):  # the fourth step's batch, as _seq_steps draws them
        x = torch.randn(8, 16, generator=g)
    model(x).pow(2).mean().backward()
    with pytest.raises(ValueError, match=r"\(2\.lora_A\.3\) has shape"):  # the error names the parameter
        ctrl.step(losses[3])
    assert ctrl.mode == 2 and ctrl.machine.last_transition_step == 1 and ctrl.rank == 16
    assert [a.rank for a in adapters.values()] == [16, 16] and ctrl.mirror.held and ctrl.last_decision is None
    assert all(torch.equal(w, s) for w, s in zip(ctrl.mirror.weights, snapshot))
    assert ctrl.global_step == 4 and ctrl.trace[-1].mode == 2 and ctrl.trace[-1].transition is None
    assert ctrl.trace[-1].components["transition_error"].startswith("MIRROR->MULTI: ")
    assert all(p.grad is not None for a in adapters.values() for p in a.active_parameters())  # nothing was cleared
    opt.step()
    opt.zero_grad()
    top.data = kept  # the fix
    _seq_steps(ref_model, ref, ref_opt, losses[:4])
    assert _same_run_state(_run_state(model, ctrl, opt), _run_state(ref_model, ref, ref_opt))

    g_state = g.get_state()
    for m, c, o in ((model, ctrl, opt), (ref_model, ref, ref_opt)):
        g.set_state(g_state)
        for fake in losses[4:]:
            m(torch.randn(8, 16, generator=g)).pow(2).mean().backward()
            c.step(fake)
            o.step()
            o.zero_grad()
    assert [(r.transition, r.snapshot) for r in ctrl.trace if r.transition] == [
        ("MULTI->MIRROR", "saved"), ("MIRROR->MULTI", "restored")]
    assert not ctrl.mirror.held and ctrl.last_decision.restore
    assert _same_run_state(_run_state(model, ctrl, opt), _run_state(ref_model, ref, ref_opt))


def test_a_numpy_scalar_or_0d_array_loss_is_a_number():
    np = pytest.importorskip("numpy")
    model, adapters, ctrl, opt = _seq_controller(targets="02")
    x = torch.randn(8, 16)
    for loss in (np.float32(0.5), np.float64(0.5), np.array(0.5), 0.5):
        model(x).pow(2).mean().backward()
        ctrl.step(loss)
        opt.zero_grad()
    assert [r.loss for r in ctrl.trace] == [0.5] * 4
    model(x).pow(2).mean().backward()
    with pytest.raises(ValueError, match="loss: expected a number"):
        ctrl.step(np.array([0.5, 0.5]))


def test_a_run_that_starts_in_mirror_snapshots_at_its_first_step_and_applies_the_rollback_rule(llama):
    """MachineConfig(initial_mode=2) starts in MIRROR without entering it by a transition. No snapshot was taken,
    so the exit skipped the rollback rule (trace snapshot None) and the MIRROR steps' updates stayed, whatever the
    drift. Now the first step takes the entry snapshot, and the exit decides as after any entry."""
    from unified_lora import MachineConfig
    x = classification_batch(n=4)[0]
    adapters, ctrl = setup_unified_lora(llama, target_modules=["q_proj", "v_proj"], signal="loss", print_fn=None,
                                        machine=MachineConfig(initial_mode=2, warmup_steps=5),
                                        mirror=MirrorConfig(policy="always"))
    opt = torch.optim.AdamW([p for p in llama.parameters() if p.requires_grad], lr=1e-2)
    ctrl.attach_optimizer(opt)
    start = {k: v.clone() for k, v in lora_state_dict(llama).items() if not k.endswith("._extra_state")}
    assert all(a.rank == 16 for a in adapters.values())
    for _ in range(6):  # φ = 0.5 < θ1: the machine leaves MIRROR at its first decision, step 5
        _train_step(llama, ctrl, opt, x, x)
    assert [(r.step, r.transition, r.snapshot) for r in ctrl.trace if r.transition or r.snapshot] == [
        (0, None, "saved"), (5, "MIRROR->MULTI", "restored")]
    after = lora_state_dict(llama)
    assert all(torch.equal(after[k], v) for k, v in start.items()) and not ctrl.mirror.held
    # a machine that leaves MIRROR at step 0 trained nothing there: no snapshot, as before
    _, ctrl0 = setup_unified_lora(tiny_llama(), target_modules=["q_proj"], signal="loss", print_fn=None,
                                  machine=MachineConfig(initial_mode=2))
    ctrl0.adapters[0].lora_A[0].grad = torch.zeros_like(ctrl0.adapters[0].lora_A[0])
    ctrl0.step(loss=0.5)
    assert ctrl0.trace[0].transition == "MIRROR->MULTI" and ctrl0.trace[0].snapshot is None


@pytest.mark.parametrize("signal", ["composite", "loss"])
def test_layers_that_layerdrop_skips_have_no_gradient_and_the_step_goes_on(signal):
    """BART's encoder_layerdrop / decoder_layerdrop (wav2vec2's layerdrop is 0.1 by default) skip whole layers
    in training, so their adapters have no gradient on that step. ctrl.step said "call loss.backward()", which
    the loop had just done: with the composite signal whenever any layer was skipped, with the loss signal
    whenever the first adapter's was. Now a skipped adapter's S, E and stored gradient hold for that step; the
    others' are read as usual. Forgetting backward is still refused."""
    from transformers import BartConfig, BartForSequenceClassification

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                     encoder_layerdrop=0.5, decoder_layerdrop=0.5, num_labels=2, dropout=0.0, attention_dropout=0.0)
    model = BartForSequenceClassification(cfg).train()
    adapters, ctrl = setup_unified_lora(model, ["q_proj", "v_proj"], modules_to_save=["classification_head"],
                                        signal=signal, print_fn=None)
    layers = list(adapters.values())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ctrl.attach_optimizer(opt)
    x = torch.randint(3, VOCAB, (4, 10))
    x[:, -1] = cfg.eos_token_id
    y = torch.randint(0, 2, (4,))
    some_skipped = all_skipped = mixed = 0
    for step in range(40):
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        had = [a.first_block_grad() is not None for a in layers]
        some_skipped += not had[0]
        all_skipped += not any(had)
        mixed += any(had) and not all(had)
        before_S = [e.value for e in getattr(ctrl.signal, "S", [])]
        before_prev = [[t.clone() for t in gs] for gs in ctrl.grad_stats.prev]
        ctrl.step(loss=loss.item())
        if signal == "composite" and before_S:
            for i, h in enumerate(had):
                if not h:  # a skipped adapter's S and stored gradient are as they were
                    assert ctrl.signal.S[i].value == before_S[i]
                    if i < len(before_prev):
                        assert all(torch.equal(a, b) for a, b in zip(ctrl.grad_stats.prev[i], before_prev[i]))
        assert 0.0 <= ctrl.phi <= 1.0
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert some_skipped and all_skipped and mixed  # the run met each case
    assert len(ctrl.trace) == 40 and not any(r.nonfinite for r in ctrl.trace)
    if signal == "composite":
        assert len(ctrl.grad_stats._index) <= 64  # one layout per skip pattern: the cache stays bounded
    with pytest.raises(ValueError, match="call loss.backward"):
        ctrl.step(loss=1.0)


@pytest.mark.parametrize("first_loss,restore", [(0.2, True), (2.0, False)])
def test_a_mirror_exit_records_the_losses_the_loss_worse_rule_compared(llama, first_loss, restore):
    # The exit's record held the drift alone, which loss_worse does not read: a restore at a large drift (or a
    # keep at a tiny one) could not be explained from the trace. The run starts in MIRROR (snapshot at step 0, at
    # the loss EMA of the first loss) and leaves it at step 3, the first decision after the warmup, on losses of 0.5.
    from unified_lora import MachineConfig

    _, ctrl = setup_unified_lora(llama, target_modules=["q_proj"], signal="loss", print_fn=None,
                                 mirror=MirrorConfig(policy="loss_worse"),
                                 machine=MachineConfig(initial_mode=2, warmup_steps=3))
    x = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    for loss in [first_loss, 0.5, 0.5, 0.5]:
        llama(input_ids=x, labels=x).loss.backward()
        ctrl.step(loss=loss)
        llama.zero_grad()
    rec, d = ctrl.trace[-1], ctrl.last_decision
    assert ctrl.trace[0].snapshot == "saved" and rec.transition == "MIRROR->MULTI"
    assert rec.snapshot == ("restored" if restore else "kept") and d.restore is restore
    assert rec.components["mirror_policy"] == "loss_worse"
    assert rec.components["mirror_loss_entry"] == d.loss_at_entry == first_loss
    assert rec.components["mirror_loss_exit"] == d.loss_at_exit == pytest.approx(ctrl.loss_ema)
    assert not any("mirror_policy" in r.components for r in ctrl.trace[:-1])  # only an exit applies the rule


def test_a_step_after_the_model_state_moved_the_rank_is_refused_before_anything_moves():
    """The model's state dict holds each layer's rank: `model.load_state_dict` of a model saved in SINGLE (rank 4)
    under a fresh controller in MULTI (rank 8) left the layers at 4 while the controller trained at MULTI's LR and
    recorded rank 8, silently, until its next transition. ctrl.step now refuses, before the signal reads the step."""
    from unified_lora import MachineConfig, set_rank

    model = tiny_llama()
    adapters, ctrl = setup_unified_lora(model, target_modules=["q_proj", "v_proj"], print_fn=None,
                                        machine=MachineConfig(initial_mode=1))
    # what a state dict saved at rank 4 carries beside the blocks
    model.load_state_dict({f"{n}._extra_state": torch.tensor(4) for n in adapters}, strict=False)
    assert {a.rank for a in adapters.values()} == {4} and ctrl.rank == 8
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ctrl.attach_optimizer(opt)
    x = torch.randint(1, VOCAB, (2, 6))
    before = copy.deepcopy(ctrl.state_dict())
    with pytest.raises(ValueError, match=r"adapters run at rank 4, but this controller is in MULTI, whose rank is 8"):
        _train_step(model, ctrl, opt, x, x)
    assert ctrl.global_step == 0 and not ctrl.trace
    assert ctrl.state_dict()["signal"] == before["signal"]
    opt.zero_grad()
    set_rank(adapters, ctrl.rank)  # the way on that the message names
    _train_step(model, ctrl, opt, x, x)
    assert ctrl.global_step == 1


def test_a_last_trace_line_of_junk_without_a_newline_is_refused_on_resume_and_a_record_cut_short_is_dropped(tmp_path):
    """A resume dropped any last line without a newline as one a crash cut off: a line of junk, or whole JSON that is
    no step's record, went silently. Now only a step's record cut short (a record a kill interrupted) is
    dropped; anything else is the damaged-trace error naming the line, and nothing is loaded."""
    path = tmp_path / "trace.jsonl"
    x = torch.randint(0, VOCAB, (2, 8))

    def make():
        return _traced_llama(path)

    model, ctrl = make()
    for loss in (0.5, 0.6, 0.7):
        model(input_ids=x, labels=x).loss.backward()
        ctrl.step(loss=loss)
    sd = copy.deepcopy(ctrl.state_dict())
    ctrl.close()
    whole = path.read_bytes()
    for last, dropped in ((b"oops, not a record", False), (b'{"note": "no step"}', False), (b"[1, 2", False),
                          (b'{"step": 3} junk', False), (b'{"step": 3, "loss": 0.8, "phi": 0.', True),
                          (b'{"step": 3, "lo\xc3', True), (b"{", True)):  # (the last but one: "\xc3\xa9" cut)
        path.write_bytes(whole + last)
        model, ctrl = make()
        if not dropped:
            with pytest.raises(ValueError, match=r"trace.jsonl: line 4 is not a step's record"):
                ctrl.load_state_dict(sd)
            assert ctrl.global_step == 0 and path.read_bytes() == whole + last
        else:
            ctrl.load_state_dict(sd)
            assert ctrl.global_step == 3 and path.read_bytes() == whole
        ctrl.close()
    # a record cut anywhere is the start of JSON cut short (a character's UTF-8 bytes cut too); a whole one is not
    from unified_lora.trace import StepRecord, torn_json

    line = StepRecord(step=3, loss=0.5, phi=0.3, mode=1, rank=8, lr=1e-4, transition="SINGLE->MULTI",
                      components={"E[é]": -1.5e-3, "x": [True, None]}).to_json()
    line = line.encode()
    assert all(torn_json(line[:i]) for i in range(1, len(line))) and not torn_json(line)


def _accumulation_loop(model, ctrl, opt, calls, optimizer_steps_on, scaler=None, overflow_on=()):
    """`calls` ctrl.step calls, each after one micro-batch's backward; `optimizer_steps_on(i)` says whether call i is
    followed by the optimizer's step (and zero_grad). With `scaler` (a real GradScaler), the loss of the calls in
    `overflow_on` is made to overflow, so the scaler skips that optimizer step."""
    x, y = classification_batch(n=4)
    for i in range(calls):
        loss = model(input_ids=x, labels=y).loss
        scaled = loss * (3e38 if i in overflow_on else 1.0)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        ctrl.step(loss=loss.item())
        if optimizer_steps_on(i):
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad()


def _accumulation_warnings(record) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("ctrl.step: ")]


@pytest.mark.parametrize("every", [2, 4])
def test_ctrl_step_on_each_micro_batch_of_a_hand_written_accumulation_is_warned_about_once(bert, every):
    """A loop accumulating gradients over k micro-batches that calls ctrl.step on each of them fed the controller
    k steps per optimizer step, silently (only accelerate's accumulation was caught): its warm-up, dwell and eval
    interval ran k times too fast on one micro-batch's loss. The attached optimizer's step count tells."""
    import warnings

    _, ctrl = setup_unified_lora(bert, target_modules=["query", "value"], signal="loss", print_fn=None)
    opt = torch.optim.AdamW([p for p in bert.parameters() if p.requires_grad], lr=1e-3)
    ctrl.attach_optimizer(opt)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _accumulation_loop(bert, ctrl, opt, 80, lambda i: i % every == every - 1)
    said = _accumulation_warnings(record)
    assert len(said) == 1, said
    assert f"{32 - 32 // every} of the last 32 calls came with no optimizer.step()" in said[0]
    assert "call ctrl.step once per optimizer step" in said[0]
    assert record[[str(w.message) for w in record].index(said[0])].filename == __file__  # points at the loop


def test_ctrl_step_once_per_optimizer_step_and_a_grad_scalers_skipped_steps_are_not_warned_about(bert):
    """Accumulation done right (ctrl.step once per optimizer step, after the last micro-batch) gets no warning, nor
    does a real GradScaler skipping the optimizer step on overflowing losses (5 of the first 8 steps here)."""
    import warnings

    _, ctrl = setup_unified_lora(bert, target_modules=["query", "value"], signal="loss", print_fn=None)
    opt = torch.optim.AdamW([p for p in bert.parameters() if p.requires_grad], lr=1e-3)
    ctrl.attach_optimizer(opt)
    scaler = torch.amp.GradScaler("cpu")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _accumulation_loop(bert, ctrl, opt, 70, lambda i: True, scaler=scaler, overflow_on={0, 1, 3, 5, 7})
    assert ctrl._optimizer_steps == 65  # the scaler did skip the 5 overflowing steps
    assert _accumulation_warnings(record) == []


def test_an_attached_optimizer_that_never_steps_is_warned_about_and_a_copy_keeps_counting(bert):
    """ctrl.step with an attached optimizer that does not step (the loop steps another one) is warned about with
    its own message; a deep copy of the controller (its hooks registered again on the copied optimizer) counts on."""
    import warnings

    _, ctrl = setup_unified_lora(bert, target_modules=["query", "value"], signal="loss", print_fn=None)
    opt = torch.optim.AdamW([p for p in bert.parameters() if p.requires_grad], lr=1e-3)
    ctrl.attach_optimizer(opt)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _accumulation_loop(bert, ctrl, opt, 40, lambda i: False)
    said = _accumulation_warnings(record)
    assert len(said) == 1 and "the attached optimizer has not stepped in the last 33 calls" in said[0], said
    twin_model, twin = copy.deepcopy((bert, ctrl))
    assert twin._accumulation_warned and len(twin._unstepped) == 32
    twin._accumulation_warned = False
    twin._unstepped.clear()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _accumulation_loop(twin_model, twin, twin.optimizer, 70, lambda i: i % 2 == 1)
    assert ctrl._optimizer_steps == 0 and twin._optimizer_steps == 35
    assert len(_accumulation_warnings(record)) == 1


def test_optimizer_steps_skipped_after_non_finite_losses_are_not_taken_for_an_accumulation(bert):
    """A loop that skips optimizer.step() when the loss is not finite (as `train` does) made, on a run with NaN
    losses on every other step, the accumulation warning ("16 of the last 32 calls came with no optimizer.step() ...,
    as when it runs on each micro-batch of a gradient accumulation"), which misnamed the cause."""
    import warnings

    _, ctrl = setup_unified_lora(bert, target_modules=["query", "value"], signal="loss", print_fn=None)
    opt = torch.optim.AdamW([p for p in bert.parameters() if p.requires_grad], lr=1e-3)
    ctrl.attach_optimizer(opt)
    x, y = classification_batch(n=4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for i in range(70):
            loss = bert(input_ids=x, labels=y).loss
            loss.backward()
            value = float("nan") if i % 2 else loss.item()
            ctrl.step(loss=value)
            if value == value:  # (not NaN)
                opt.step()
            opt.zero_grad()
    assert ctrl.nonfinite_steps == 35 and ctrl._optimizer_steps == 35
    assert _accumulation_warnings(record) == []


@pytest.mark.parametrize("signal", ["loss", "composite"])
def test_ctrl_step_after_optimizer_step_is_warned_about_once_and_the_right_order_is_not(bert, signal):
    """A loop calling ctrl.step after optimizer.step() (before zero_grad, so a gradient is there to read) ran without
    a word: the LR and rank the controller set applied one step late, and the composite signal read gradients the
    update had already used. Both orders alternate the two calls; the first ctrl.step tells them apart, as it reads
    the very gradient the optimizer's step before it used. The right order gets no warning, nor do the loops that
    step the optimizer before their first ctrl.step too: steps without the controller first (a warm-up, or one
    plain step so that AdamW has moments), or a first step whose NaN loss the loop skips; nor does a new optimizer
    attached between ctrl.step and its step."""
    import warnings

    x, y = classification_batch(n=4)

    def run(order: str, steps: int = 6) -> list:
        model = copy.deepcopy(bert)
        _, ctrl = setup_unified_lora(model, target_modules=["query", "value"], modules_to_save=["classifier"],
                                     signal=signal, print_fn=None)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        ctrl.attach_optimizer(opt)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            for _ in range(3 if order == "warm_up" else 1 if order == "plain_first" else 0):
                model(input_ids=x, labels=y).loss.backward()
                opt.step()
                if order == "warm_up":
                    opt.zero_grad()
            for i in range(steps):
                loss = model(input_ids=x, labels=y).loss
                loss.backward()
                if order == "late":
                    opt.step()
                    ctrl.step(loss=loss.item())
                else:
                    value = float("nan") if order == "nan_first" and i == 0 else loss.item()
                    ctrl.step(loss=value)
                    if order == "reattach" and i == 2:
                        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
                        ctrl.attach_optimizer(opt)
                    if value == value:  # (not NaN)
                        opt.step()
                opt.zero_grad()
        return [str(w.message) for w in record if str(w.message).startswith("ctrl.step: ")], record

    said, record = run("late")
    assert said == ["ctrl.step: it reads the gradients the optimizer's last step already applied: it runs after "
                    "optimizer.step(), so the LR and rank it sets apply one step late, and the composite signal reads "
                    "gradients the update has already used. Call it after the backward and before the update: "
                    "loss.backward() -> ctrl.step(loss) -> optimizer.step() -> optimizer.zero_grad()"]
    assert next(w for w in record if str(w.message) == said[0]).filename == __file__  # the loop's ctrl.step
    for order in ("right", "warm_up", "plain_first", "nan_first", "reattach"):
        assert run(order)[0] == [], order


def test_setup_warns_where_a_classifiers_head_stays_frozen():
    """(found by the README trial) the Quick start's v3 block set up MiniLM `from_pretrained(path, num_labels=2)`
    without modules_to_save: its fresh, random classifier stayed frozen, and the adapters trained against it without
    a word. A warning names the head and the fix; a head in modules_to_save, a head that is a LoRA target, a model
    with no classification head, and a GPT-2 `...ForSequenceClassification` head in modules_to_save have none."""
    import warnings

    from transformers import GPT2Config, GPT2ForSequenceClassification

    with pytest.warns(UserWarning, match=r"the task head 'classifier' of this "
                      r"BertForSequenceClassification stays frozen .*Pass modules_to_save=\['classifier'\]") as got:
        setup_unified_lora(tiny_bert(), ["query", "value"])
    assert len([w for w in got if "stays frozen" in str(w.message)]) == 1
    assert got[0].filename == __file__  # (the user's line: stacklevel)
    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32))
    with pytest.warns(UserWarning, match="the task head 'score' of this GPT2ForSequenceClassification"):
        setup_unified_lora(gpt2, ["c_attn"])
    for model, kw in ((tiny_bert(), {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}),
                      (tiny_bert(), {"target_modules": ["query", "value", "classifier"]}),
                      (tiny_llama(), {})):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            setup_unified_lora(model, **kw)


def test_setup_warns_where_one_layer_of_a_classifiers_head_of_several_stays_frozen():
    """(found by the review) RoBERTa's head `classifier` is two layers, `dense` then `out_proj`, both initialised
    afresh by from_pretrained(num_labels=...): with `dense` a LoRA target (every layer named dense), or `out_proj`
    alone in modules_to_save, the other stayed frozen at random without a warning, as any parameter in the head that
    trains counted as the head trained. Both adapted, or the head in modules_to_save, have none."""
    import warnings

    from transformers import RobertaConfig, RobertaForSequenceClassification

    def roberta():
        torch.manual_seed(0)
        return RobertaForSequenceClassification(RobertaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=40))

    for kw, frozen in (({"target_modules": ["query", "value", "dense"]}, "out_proj"),
                       ({"target_modules": ["query", "value"], "modules_to_save": ["out_proj"]}, "dense")):
        with pytest.warns(UserWarning, match=rf"^'classifier\.{frozen}' of the task head 'classifier' of "
                                             r"this RobertaForSequenceClassification stays frozen \(neither adapted "
                                             r"nor in modules_to_save\).*Pass modules_to_save=\['classifier'\]"):
            setup_unified_lora(roberta(), print_fn=None, **kw)
        # a model training.load_model loaded records its fresh modules, and train's Run names those left frozen
        # itself: no warning there, in this form either (a message filter had let it through to the CLI)
        model = roberta()
        model._unified_lora_fresh_modules = ["classifier.dense", "classifier.out_proj"]
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            setup_unified_lora(model, print_fn=None, **kw)
    for kw in ({"target_modules": ["query", "value", "dense", "out_proj"]},
               {"target_modules": ["query", "value", "dense"], "modules_to_save": ["out_proj"]},
               {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]}):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            setup_unified_lora(roberta(), print_fn=None, **kw)
    with pytest.warns(UserWarning, match=r"^the task head 'classifier' of this "
                                         r"RobertaForSequenceClassification stays frozen"):
        setup_unified_lora(roberta(), "all-linear", print_fn=None)


def test_setup_warns_where_any_task_head_stays_frozen():
    """The frozen-head warning looked at `classifier` and `score` only, and only in setup_unified_lora: DistilBERT's
    fresh `pre_classifier` (before its `classifier`), BART's `classification_head`, a question-answering model's
    `qa_outputs` and a multi-task setup's head stayed frozen at random without a word. One warning names every
    frozen part, and the names to pass; a head wholly trained or adapted has none."""
    import warnings

    from transformers import (BartConfig, BartForSequenceClassification, BertForQuestionAnswering, DistilBertConfig,
                              DistilBertForSequenceClassification)

    from unified_lora.multitask import setup_multitask_lora

    def distilbert():
        return DistilBertForSequenceClassification(DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_position_embeddings=40))

    with pytest.warns(UserWarning, match=r"^'pre_classifier', 'classifier' of the task heads 'pre_classifier', "
                                         r"'classifier' of this DistilBertForSequenceClassification stay frozen .*"
                                         r"Pass modules_to_save=\['pre_classifier', 'classifier'\]") as got:
        setup_unified_lora(distilbert(), ["q_lin", "v_lin"], print_fn=None)
    assert len([w for w in got if "frozen" in str(w.message)]) == 1
    with pytest.warns(UserWarning, match=r"^the task head 'pre_classifier' of this DistilBertForSequenceClassification "
                                         r"stays frozen .*modules_to_save=\['pre_classifier'\]"):
        setup_unified_lora(distilbert(), ["q_lin", "v_lin"], modules_to_save=["classifier"], print_fn=None)
    bart = BartForSequenceClassification(BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=40))
    with pytest.warns(UserWarning, match=r"^the task head 'classification_head' of this BartForSequenceClassification"):
        setup_unified_lora(bart, ["q_proj", "v_proj"], print_fn=None)
    qa = BertForQuestionAnswering(tiny_bert().config)
    with pytest.warns(UserWarning, match=r"^the task head 'qa_outputs' of this BertForQuestionAnswering"):
        setup_unified_lora(qa, ["query", "value"], print_fn=None)
    with pytest.warns(UserWarning, match=r"^the task head 'classifier' of this BertForSequenceClassification"):
        setup_multitask_lora(tiny_bert(), ["a", "b"], ["query", "value"], print_fn=None)
    for setup in (lambda m, **kw: setup_unified_lora(m, print_fn=None, **kw),
                  lambda m, **kw: setup_multitask_lora(m, ["a", "b"], print_fn=None, **kw)):
        for model, kw in ((distilbert(), {"target_modules": ["q_lin", "v_lin"],
                                          "modules_to_save": ["pre_classifier", "classifier"]}),
                          (distilbert(), {"target_modules": ["q_lin", "v_lin", "pre_classifier", "classifier"]}),
                          (BertForQuestionAnswering(tiny_bert().config),
                           {"target_modules": ["query", "value"], "modules_to_save": ["qa_outputs"]}),
                          (tiny_bert(), {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]})):
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)
                setup(model, **kw)
