"""Multi-task mode (SPEC §5): shared + per-task nested adapters, routing, split/merge, C/E/S signal."""

import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, can_build_cpp, tiny_bert, tiny_gpt2, tiny_llama

from unified_lora import MIRROR, MULTI, SINGLE, MachineConfig, trainable_parameters
from unified_lora.trace import TraceWriter, format_console
from unified_lora.multitask import (MultiTaskModel, MultiTaskNestedLoRALayer, MultiTaskSignal, MultiTaskSignalConfig,
                                    load_task_adapters, per_task_losses, save_task_adapters, setup_multitask_lora,
                                    task_context)

TARGETS = ["query", "value", "classifier"]  # the classifier's task adapter lets each task flip the decision
N = 16


def conflict_data(seed=1):
    """Two tasks on the same inputs; task "b"'s labels are task "a"'s inverted."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, VOCAB, (N, 8), generator=g)
    ya = torch.cat([torch.zeros(N // 2), torch.ones(N // 2)]).long()[torch.randperm(N, generator=g)]
    return x, ya, 1 - ya


def build(initial_mode=SINGLE, phi_init=0.0, tasks=("a", "b"), grad_noise=None, **kw):
    model = tiny_bert()
    noise = {} if grad_noise is None else {"grad_noise": grad_noise}  # (None: the default)
    adapters, ctrl = setup_multitask_lora(model, list(tasks), TARGETS, lr_mode="off", print_fn=None,
                                          signal=MultiTaskSignalConfig(phi_init=phi_init, **noise),
                                          machine=MachineConfig(initial_mode=initial_mode), **kw)
    opt = torch.optim.AdamW(trainable_parameters(model), lr=2e-2, weight_decay=0.01)
    ctrl.attach_optimizer(opt)
    return model, adapters, ctrl, opt


def mixed_batch(x, ya, yb):
    return torch.cat([x, x]), torch.cat([ya, yb]), ["a"] * len(x) + ["b"] * len(x)


def train(model, ctrl, opt, steps, data, use_ctrl=True):
    ids, y, tids = mixed_batch(*data)
    for _ in range(steps):
        with task_context(model, tids):
            per = F.cross_entropy(model(input_ids=ids).logits, y, reduction="none")
        loss = per.mean()
        loss.backward()
        if use_ctrl:
            ctrl.step(loss, task_losses=per_task_losses(per, tids))
        opt.step()
        opt.zero_grad()


@torch.no_grad()
def task_acc(model, x, y, task):
    with task_context(model, task):
        return (model(input_ids=x).logits.argmax(-1) == y).float().mean().item()


def test_conflict_enters_multi_and_task_adapters_beat_shared():
    data = conflict_data()
    x, ya, yb = data
    # Shared adapter only (the controller never steps, topology stays SINGLE).
    m0, _, c0, o0 = build()
    train(m0, c0, o0, 40, data, use_ctrl=False)
    shared = (task_acc(m0, x, ya, "a"), task_acc(m0, x, yb, "b"))
    assert sum(shared) / 2 == pytest.approx(0.5)  # identical inputs, inverted labels: exactly 50 % on average
    # Unified: starts in SINGLE, the gradient conflict drives it into MULTI.
    m1, ad, c1, o1 = build()
    train(m1, c1, o1, 40, data)
    tr = c1.trace
    # opposite per-task gradients; read from the second step (at the first, no task's reliability ρ can be told)
    assert tr[0].mode == SINGLE and tr[0].components["C_grad_raw"] > 0.9 and tr[1].components["C"] > 0.9
    split = [r for r in tr if r.transition == "SINGLE->MULTI"]
    assert split and split[0].components["event"] == "split"
    assert all(k in tr[-1].components for k in ("C", "E", "S", "dC", "dE", "dS", "E[a]", "E[b]"))
    assert c1.mode >= MULTI
    cls = ad["classifier"]
    assert not torch.allclose(cls.delta_weight(task="a"), cls.delta_weight(task="b"), atol=1e-3)  # diverged
    acc = (task_acc(m1, x, ya, "a"), task_acc(m1, x, yb, "b"))
    assert min(acc) >= 0.9, (acc, shared)
    assert sum(acc) / 2 > sum(shared) / 2 + 0.3


@pytest.mark.skipif(not can_build_cpp(), reason="layer_kernel='cpp' needs g++ and ninja")
def test_the_shared_adapter_runs_the_cpp_layer_kernel_like_the_python_one():
    data = conflict_data()
    weights = {}
    for kernel in ("python", "cpp"):
        model, ad, ctrl, opt = build(layer_kernel=kernel)
        for a in ad.values():
            a.set_rank(16)  # three active blocks
        assert {a.kernel for a in ad.values()} == {kernel} and ctrl.router.topology == "shared"
        ctrl.router.track_grads = False  # the shared topology's plain NestedLoRALayer forward
        q = next(a for n, a in ad.items() if n.endswith("query"))
        node = q(torch.randn(2, q.in_features)).grad_fn.name()
        assert ("CppNode" in node) is (kernel == "cpp"), node
        train(model, ctrl, opt, 5, data, use_ctrl=False)
        weights[kernel] = [p.detach().clone() for p in trainable_parameters(model)]
    assert all(torch.equal(p, q) for p, q in zip(weights["python"], weights["cpp"]))


def test_outputs_unchanged_at_split():
    x, ya, yb = conflict_data()
    model, ad, ctrl, opt = build(phi_init=0.0)
    ctrl.router.track_grads = False
    train(model, ctrl, opt, 3, (x, ya, yb), use_ctrl=False)  # shared adapter non-zero
    ids, _, tids = mixed_batch(x, ya, yb)
    with torch.no_grad(), task_context(model, tids):
        before = model(input_ids=ids).logits
    with torch.no_grad(), task_context(model, "a"):
        before_a = model(input_ids=x).logits
    ctrl.split()
    assert ctrl.router.topology == "task"
    with torch.no_grad(), task_context(model, tids):
        after = model(input_ids=ids).logits
    with torch.no_grad(), task_context(model, "a"):
        after_a = model(input_ids=x).logits
    assert torch.equal(before_a, after_a)  # one task per batch: bit-identical
    torch.testing.assert_close(before, after, rtol=0, atol=1e-6)  # mixed: per-subset matmuls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_gets_fp32_shared_and_task_blocks_and_splits_bit_for_bit(dtype):
    # setup_multitask_lora follows NestedLoRAConfig.autocast_adapter_dtype (PEFT's default): fp32 shared and task
    # blocks on a bf16/fp16 model; they were made in the base's dtype. Every path (the shared forward, SINGLE's
    # gradient-tracking one, the per-task one) adds the fp32 delta to the base output and rounds once, so the
    # outputs are in the base's dtype and a split still leaves them bit for bit.
    x, ya, yb = conflict_data()
    model = tiny_bert().to(dtype)
    ad, ctrl = setup_multitask_lora(model, ["a", "b"], TARGETS, lr_mode="off", print_fn=None,
                                    signal=MultiTaskSignalConfig(phi_init=0.0),
                                    machine=MachineConfig(initial_mode=SINGLE))
    assert {p.dtype for a in ad.values() for p in a.lora_parameters()} == {torch.float32}
    assert all(a.base_layer.weight.dtype == dtype for a in ad.values())
    opt = torch.optim.AdamW(trainable_parameters(model), lr=2e-2)
    ctrl.attach_optimizer(opt)
    train(model, ctrl, opt, 3, (x, ya, yb), use_ctrl=False)  # through SINGLE's gradient-tracking path
    assert all(p.dtype == torch.float32 for a in ad.values() for p in a.shared_parameters())
    ctrl.router.track_grads = False
    ids, _, tids = mixed_batch(x, ya, yb)
    with torch.no_grad(), task_context(model, "a"):
        before = model(input_ids=x).logits
    ctrl.router.track_grads = True
    with task_context(model, "a"):  # (grad enabled: SINGLE tracks the task gradients)
        tracked = model(input_ids=x).logits.detach()
    ctrl.split()
    with torch.no_grad(), task_context(model, "a"):
        after = model(input_ids=x).logits
    assert before.dtype == after.dtype == dtype
    assert torch.equal(before, tracked) and torch.equal(before, after)
    with task_context(model, tids):
        F.cross_entropy(model(input_ids=ids).logits.float(), torch.cat([ya, yb])).backward()
    slot = ctrl.router.slots["a"]
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for a in ad.values() for p in a.task_parameters(slot)[:1])
    kept = tiny_bert().to(dtype)
    ad, _ = setup_multitask_lora(kept, ["a"], TARGETS, print_fn=None, autocast_adapter_dtype=False)
    assert {p.dtype for a in ad.values() for p in a.lora_parameters()} == {dtype}


def test_unknown_task_id_is_a_clear_error():
    model, _, _, _ = build()
    with pytest.raises(ValueError, match=r"task id 'c' is not registered; known task ids: \['a', 'b'\]"):
        with task_context(model, ["a", "c"]):
            pass
    m2, ad2, c2, _ = build(register_new_tasks=True, spare_slots=1)
    with task_context(m2, "c"):
        pass
    assert c2.router.slots == {"a": 0, "b": 1, "c": 2}
    with pytest.raises(ValueError, match="no free task slot"):
        with task_context(m2, "d"):
            pass
    with pytest.raises(ValueError, match="no task ids set"):
        c2.split()
        m2(input_ids=torch.ones(2, 4, dtype=torch.long))


def test_tasks_given_as_one_string_is_refused_not_read_as_its_letters():
    """tasks="mrpc" registered the four tasks 'm', 'r', 'p' and 'c' (a string is a sequence of its letters)."""
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"tasks: a list of task ids, got the string 'mrpc'; for one task pass \['mrpc'\]"):
        setup_multitask_lora(model, "mrpc", TARGETS, print_fn=None)
    setup_multitask_lora(model, ["mrpc"], TARGETS, print_fn=None)  # the model is left as it was: a retry runs


def test_a_one_task_signal_or_a_spare_slot_count_that_is_no_integer_is_refused_by_name():
    """setup_multitask_lora(signal="composite") (the v3 signal, which multi-task mode lacks) raised
    "AttributeError: 'str' object has no attribute 'phi_init'"; spare_slots=1.5 allocated one spare slot silently
    and spare_slots="x" was a TypeError from a comparison. Each is a ValueError naming the argument, before the
    model changes."""
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"^signal: pass a MultiTaskSignalConfig .*got 'composite'; the one-task "
                                         r"signals .* are not available in multi-task mode"):
        setup_multitask_lora(model, ["a", "b"], TARGETS, signal="composite", print_fn=None)
    with pytest.raises(ValueError, match=r"^spare_slots: must be an integer, got 1\.5"):
        setup_multitask_lora(model, ["a", "b"], TARGETS, spare_slots=1.5, print_fn=None)
    with pytest.raises(ValueError, match=r"^spare_slots: must be an integer, got 'x' \(str\)"):
        setup_multitask_lora(model, ["a", "b"], TARGETS, spare_slots="x", print_fn=None)
    _, ctrl = setup_multitask_lora(model, ["a", "b"], TARGETS, spare_slots=1, signal=MultiTaskSignalConfig(),
                                   print_fn=None)  # the model is left as it was: a retry runs
    assert ctrl.router.n_slots == 3


def test_register_new_tasks_given_as_anything_but_true_or_false_is_refused_by_name():
    """register_new_tasks="no" is truthy: a mistyped task id then took a spare slot, silently. It takes True or False
    only (as a config dataclass's bool field), before the model changes."""
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"^register_new_tasks: must be true or false, got 'no' \(str\)"):
        setup_multitask_lora(model, ["a", "b"], TARGETS, spare_slots=1, register_new_tasks="no", print_fn=None)
    _, ctrl = setup_multitask_lora(model, ["a", "b"], TARGETS, spare_slots=1, register_new_tasks=False,
                                   print_fn=None)  # the model is left as it was: a retry runs
    with pytest.raises(ValueError, match=r"task id 'c' is not registered"):
        ctrl.router.slot("c")


def test_a_target_in_modules_to_save_trains_in_full_as_in_one_task_mode():
    """A head that is a LoRA target (a delta per task) and in modules_to_save: its base weights train too, as
    inject_nested_lora leaves them. The task layer that replaced the plain one froze them again, for good, silently."""
    model = tiny_bert()
    _, ctrl = setup_multitask_lora(model, ["a", "b"], ["query", "value", "classifier"],
                                   modules_to_save=["classifier"], print_fn=None)
    head = model.classifier.base_layer
    assert head.weight.requires_grad and head.bias.requires_grad
    assert {id(head.weight), id(head.bias)} <= {id(p) for p in ctrl.extra_params}


def test_a_step_on_a_merged_multitask_model_says_the_layers_are_merged():
    """After merge_adapters the forward runs the base weights alone, so no adapter gets a gradient: the multi-task
    controller said "call loss.backward()" (backward had run), where the single-task one names the merge."""
    from unified_lora import merge_adapters, unmerge_adapters

    model = tiny_bert()  # a trained head (modules_to_save), so that the merged model's loss has a gradient
    _, ctrl = setup_multitask_lora(model, ["a", "b"], ["query", "value"], modules_to_save=["classifier"],
                                   lr_mode="off", print_fn=None, machine=MachineConfig(initial_mode=SINGLE))
    x, ya, yb = conflict_data()
    merge_adapters(model)
    with task_context(model, ["a"] * len(x)):
        loss = F.cross_entropy(model(input_ids=x).logits, ya)
    loss.backward()
    with pytest.raises(ValueError, match=r"of \d+ are merged into their base weights .*call unmerge_adapters"):
        ctrl.step(loss, task_id="a")
    unmerge_adapters(model)
    model.zero_grad()
    with task_context(model, ["a"] * len(x)):
        loss = F.cross_entropy(model(input_ids=x).logits, ya)
    loss.backward()
    ctrl.step(loss, task_id="a")


def test_mixed_batch_routes_each_sample_to_its_task():
    x, ya, yb = conflict_data()
    model, ad, ctrl, opt = build(initial_mode=MULTI)
    ctrl.router.track_grads = False
    train(model, ctrl, opt, 3, (x, ya, yb), use_ctrl=False)
    wrapped = MultiTaskModel(model)
    tids = ["a", "b"] * (N // 2)
    with torch.no_grad():
        mixed = wrapped(input_ids=x, task_ids=tids).logits
        only_a = wrapped(input_ids=x, task_ids="a").logits
        only_b = wrapped(input_ids=x, task_ids="b").logits
    expect = torch.where(torch.tensor([t == "a" for t in tids])[:, None], only_a, only_b)
    torch.testing.assert_close(mixed, expect, rtol=0, atol=1e-6)
    assert not torch.allclose(only_a, only_b)


def test_optimizer_holds_task_params_and_single_leaves_them_untouched():
    x, ya, yb = conflict_data()
    model, ad, ctrl, opt = build(phi_init=0.0)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in held for a in ad.values() for p in a.task_parameters())
    before = [p.detach().clone() for a in ad.values() for p in a.task_parameters()]
    train(model, ctrl, opt, 3, (x, ya, yb))  # AdamW with weight decay
    assert ctrl.mode == SINGLE
    assert all(torch.equal(b, p) for b, p in zip(before, [p for a in ad.values() for p in a.task_parameters()]))


def _set_task_factors(layer, slot, gen, rank):
    with torch.no_grad():
        for blocks in (layer.lora_tasks[slot].lora_A, layer.lora_tasks[slot].lora_B):
            for p in blocks:
                p.copy_(torch.randn(p.shape, generator=gen))
        # make the task delta at `rank` have rank 2: zero all but the first 2 B columns of the prefix
        B = layer.lora_tasks[slot].lora_B[0]
        B[:, 2:] = 0


def test_merge_back_rules():
    gen = torch.Generator().manual_seed(0)
    model, ad, ctrl, _ = build(initial_mode=MULTI)
    layer = ad["classifier"]
    r = ctrl.actuators.mode_ranks[SINGLE]  # 4: block 0
    for s in (0, 1):
        _set_task_factors(layer, s, gen, r)
    A0, A1 = (layer.lora_tasks[s].lora_A[1].detach().clone() for s in (0, 1))
    mean_delta = (layer.delta_weight(r, task="a") + layer.delta_weight(r, task="b")) / 2
    # mean_factors: every block is the factor mean; this is not the mean of the deltas
    ctrl.merge_rule = "mean_factors"
    res = ctrl.merge_back(rank=r)
    torch.testing.assert_close(layer.lora_A[1], (A0 + A1) / 2)
    assert res > 0.1 and ctrl.merge_log[-1]["residual"] == res
    assert not torch.allclose(layer.delta_weight(r), mean_delta, atol=1e-4)
    # svd: the shared prefix is refitted to the mean delta (exact here: rank(mean) = 4 <= r)
    ctrl.split()
    for s in (0, 1):
        _set_task_factors(layer, s, gen, r)
    mean_delta = (layer.delta_weight(r, task="a") + layer.delta_weight(r, task="b")) / 2
    ctrl.merge_rule = "svd"
    res = ctrl.merge_back(rank=r)
    torch.testing.assert_close(layer.delta_weight(r), mean_delta, rtol=1e-4, atol=1e-4)
    assert res < 1e-4
    assert ctrl.router.topology == "shared"


def test_merge_of_identical_task_adapters_is_exact():
    model, ad, ctrl, opt = build(initial_mode=MULTI)
    before = [p.detach().clone() for a in ad.values() for p in a.shared_parameters()]
    ctrl.merge_back()  # the task adapters are untouched copies of the shared one
    assert all(torch.equal(b, p) for b, p in zip(before, [p for a in ad.values() for p in a.shared_parameters()]))


def test_mirror_snapshots_shared_and_every_task_adapter():
    model = tiny_bert()
    ad, ctrl = setup_multitask_lora(model, ["a", "b"], TARGETS, lr_mode="off", print_fn=None,
                                    machine=MachineConfig(theta0=0.01, theta1=0.02, initial_mode=MULTI))
    x, ya, yb = conflict_data()
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    train(model, ctrl, opt, 1, (x, ya, yb))
    assert ctrl.mode == 2 and ctrl.mirror.held
    n = sum(len(a.lora_parameters()) for a in ad.values())
    assert len(ctrl.mirror.weights) == n == 3 * sum(len(a.shared_parameters()) for a in ad.values())


def test_numpy_task_ids_give_a_state_dict_that_loads_with_weights_only(tmp_path):
    """Task ids taken from a numpy array (np.unique(df.task) gives np.str_, a str subclass) were kept as numpy
    scalars, in the router's slots and the signal's per-task losses: ctrl.state_dict() then held numpy objects,
    which torch.load's default, weights_only=True, refused ("Unsupported global: numpy ... scalar"). The ids are
    plain str / int now, and the saved state loads and continues like the one from a list of str."""
    import numpy as np

    data = conflict_data()
    ids, y, tids = mixed_batch(*data)
    runs = []
    for tasks, batch_ids in ((np.array(["a", "b"]), np.array(tids)), (["a", "b"], tids)):
        m, _, c, o = build(tasks=tasks)
        for _ in range(6):
            with task_context(m, list(batch_ids)):
                per = F.cross_entropy(m(input_ids=ids).logits, y, reduction="none")
            loss = per.mean()
            loss.backward()
            c.step(loss, task_losses=per_task_losses(per, list(batch_ids)))
            o.step()
            o.zero_grad()
        assert all(type(t) is str for t in c.router.task_ids) and all(type(t) is str for t in c.signal.E)
        torch.save(c.state_dict(), tmp_path / "ctrl.pt")
        runs.append(torch.load(tmp_path / "ctrl.pt", weights_only=True))
    assert runs[0]["multitask"]["router"] == runs[1]["multitask"]["router"]
    assert runs[0]["signal"] == runs[1]["signal"] and runs[0]["machine"] == runs[1]["machine"]


def test_state_dict_round_trip_continues_the_same_trajectory(tmp_path):
    data = conflict_data()
    m1, _, c1, o1 = build()
    train(m1, c1, o1, 10, data)
    assert c1.mode == MULTI
    torch.save({"model": m1.state_dict(), "ctrl": c1.state_dict(), "opt": o1.state_dict()}, tmp_path / "ck.pt")
    m2, _, c2, o2 = build()
    ck = torch.load(tmp_path / "ck.pt", weights_only=False)
    m2.load_state_dict(ck["model"])
    c2.load_state_dict(ck["ctrl"])
    o2.load_state_dict(ck["opt"])
    assert c2.router.topology == "task" and c2.mode == MULTI
    train(m1, c1, o1, 4, data)
    train(m2, c2, o2, 4, data)
    for a, b in zip(c1.trace[-4:], c2.trace):
        assert (a.step, a.mode) == (b.step, b.mode) and math.isclose(a.phi, b.phi, rel_tol=1e-6)


def test_save_and_load_task_adapters(tmp_path):
    data = conflict_data()
    m1, ad1, c1, o1 = build(initial_mode=MULTI)
    train(m1, c1, o1, 3, data)
    paths = save_task_adapters(m1, tmp_path)
    assert set(paths) == {"shared", "a", "b"} and (tmp_path / "tasks.json").is_file()
    m2, ad2, c2, _ = build(initial_mode=MULTI)
    load_task_adapters(m2, tmp_path)
    x = data[0]
    for t in ("a", "b"):
        with torch.no_grad(), task_context(m1, t), task_context(m2, t):
            torch.testing.assert_close(m1(input_ids=x).logits, m2(input_ids=x).logits)


def _trained_through_a_split(arch, tasks=("a", "b"), seed=0):
    """(model, ctrl, x, make): a tiny BERT classifier or Llama LM with multi-task adapters (tasks a, b and one spare
    slot, register_new_tasks=True), trained two steps in SINGLE, split by the controller (theta0=0 after a warm-up
    of two steps), then three steps in MULTI, where task "c" comes in and takes the spare slot. `make(tasks)` builds
    a fresh model wrapped with the same arguments (and a controller in SINGLE, as built)."""
    def make(tasks=tasks):
        model = tiny_bert(seed) if arch == "bert" else tiny_llama(seed)
        targets = TARGETS if arch == "bert" else ["q_proj", "v_proj", "lm_head"]
        _, ctrl = setup_multitask_lora(model, list(tasks), targets, lr_mode="off", print_fn=None, spare_slots=1,
                                       register_new_tasks=True, signal=MultiTaskSignalConfig(phi_init=0.5),
                                       machine=MachineConfig(initial_mode=SINGLE, theta0=0.0, warmup_steps=2))
        return model, ctrl

    model, ctrl = make()
    opt = torch.optim.AdamW(trainable_parameters(model), lr=2e-2)
    ctrl.attach_optimizer(opt)
    x = torch.randint(1, VOCAB, (6, 8), generator=torch.Generator().manual_seed(0))
    for step in range(5):
        tids = ["a", "a", "b", "b"] + (["c", "c"] if step >= 3 else ["a", "b"])
        with task_context(model, tids):
            logits = model(input_ids=x).logits
        if arch == "bert":
            y = torch.tensor([0, 1, 1, 0, 1, 1])
            per = F.cross_entropy(logits, y, reduction="none")
        else:  # each task its own next tokens: a the input, b and c shifted by one and two
            y = (x + torch.tensor([0 if t == "a" else 1 if t == "b" else 2 for t in tids])[:, None]) % VOCAB
            per = F.cross_entropy(logits[:, :-1].flatten(0, 1), y[:, 1:].flatten(), reduction="none").view(6, -1)
        per.mean().backward()
        ctrl.step(per.mean(), task_losses=per_task_losses(per, tids))
        opt.step()
        opt.zero_grad()
    assert [r.transition for r in ctrl.trace].count("SINGLE->MULTI") == 1 and ctrl.mode == MULTI
    assert ctrl.router.slots == {"a": 0, "b": 1, "c": 2} and ctrl.router.topology == "task"
    return model.eval(), ctrl, x, make


@torch.no_grad()
def _per_task_outputs(model, x):
    """Each task's logits on `x` (one task per batch), and a batch that mixes the three tasks."""
    out = {}
    for t in ("a", "b", "c"):
        with task_context(model, t):
            out[t] = model(input_ids=x).logits
    with task_context(model, ["a", "b", "c", "c", "b", "a"]):
        out["mixed"] = model(input_ids=x).logits
    return out


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_a_model_saved_in_multi_reloads_with_strict_true_on_its_task_adapters(arch, tmp_path):
    """The model's state dict held every task adapter's blocks, but not the topology nor the task registry (they live
    in the router, a plain object): a model saved after the split, loaded with strict=True into a freshly built one
    ("All keys matched successfully"), ran the shared adapter for every task, its task adapters loaded into slots no
    sample used (max abs diff 0.08 on BERT), and task "c", registered after the split, was unknown. Each layer's
    `_extra_state` now holds the router's state beside the rank: the reload gives every task's outputs bit for bit,
    through torch.save and safetensors, and into a model built with the tasks in another order too (the registry
    follows the weights)."""
    from safetensors.torch import load_model, save_model

    model, ctrl, x, make = _trained_through_a_split(arch)
    ref = _per_task_outputs(model, x)
    assert not torch.equal(ref["a"], ref["b"]) and not torch.equal(ref["a"], ref["c"])
    torch.save(model.state_dict(), tmp_path / "model.pt")
    save_model(model, str(tmp_path / "model.safetensors"))
    for load, tasks in (("torch", ("a", "b")), ("safetensors", ("a", "b")), ("torch", ("b", "a"))):
        fresh, fresh_ctrl = make(tasks)
        assert fresh_ctrl.router.topology == "shared" and fresh_ctrl.router.task_ids == list(tasks)
        if load == "torch":
            fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
        else:
            assert load_model(fresh, str(tmp_path / "model.safetensors"), strict=True) == (set(), [])
        assert fresh_ctrl.router.topology == "task" and fresh_ctrl.router.slots == {"a": 0, "b": 1, "c": 2}
        out = _per_task_outputs(fresh.eval(), x)
        assert all(torch.equal(out[k], ref[k]) for k in ref), (load, tasks)
        # the controller built before the load is in SINGLE: it refuses to train the loaded task adapters
        with pytest.raises(ValueError, match=r"topology 'task'\), but this controller is in SINGLE.*load_state_dict"):
            fresh_ctrl.step(1.0, task_id="a")
    # resumed with the controller's state, the run goes on as the original one
    fresh, fresh_ctrl = make()
    fresh.load_state_dict(model.state_dict())
    fresh_ctrl.load_state_dict(ctrl.state_dict())
    assert fresh_ctrl.mode == MULTI and fresh_ctrl.router.slots == ctrl.router.slots


def test_a_model_saved_in_multi_reloads_through_torch_distributed_checkpoint(tmp_path):
    """torch.distributed.checkpoint loads into the tensors of the state dict it is given, in place, so each saved
    tensor must be as long as the fresh model's. A multi-task layer's `_extra_state` (JSON of its rank and router) was
    as long as its text: 90 bytes in a freshly built model, 98 after a split with a task registered since, and
    `dcp.load` refused the whole checkpoint ("Size mismatch between saved torch.Size([98]) and current:
    torch.Size([90]) for ..._extra_state"). The JSON is now padded to a length fixed by the number of task slots:
    the reload gives the saved topology, registry and outputs bit for bit."""
    import torch.distributed.checkpoint as dcp

    model, ctrl, x, make = _trained_through_a_split("bert")
    ref = _per_task_outputs(model, x)
    saved = model.state_dict()
    dcp.save(saved, checkpoint_id=str(tmp_path / "dcp"))
    fresh, fresh_ctrl = make()
    sd = fresh.state_dict()
    dcp.load(sd, checkpoint_id=str(tmp_path / "dcp"))
    fresh.load_state_dict(sd, strict=True)
    assert fresh_ctrl.router.topology == "task" and fresh_ctrl.router.slots == {"a": 0, "b": 1, "c": 2}
    out = _per_task_outputs(fresh.eval(), x)
    assert all(torch.equal(out[k], ref[k]) for k in ref)
    # a state saved before the padding (the JSON's own length) still loads
    layer = next(m for m in model.modules() if isinstance(m, MultiTaskNestedLoRALayer))
    unpadded = torch.tensor(list(bytes(layer.get_extra_state().tolist()).rstrip()), dtype=torch.uint8)
    fresh, fresh_ctrl = make()
    fresh.load_state_dict({k: (unpadded if k.endswith("._extra_state") else v) for k, v in saved.items()})
    assert fresh_ctrl.router.topology == "task" and fresh_ctrl.router.slots == {"a": 0, "b": 1, "c": 2}


def test_long_task_ids_reload_through_torch_distributed_checkpoint_between_single_and_multi(tmp_path):
    """The `_extra_state` padding was a multiple of `128 + 64 * n_slots` bytes over the JSON's own length, so with
    task ids of about 50 characters or more the JSON of a model in MULTI (a task registered into the spare slot
    since) outgrew the block a model in SINGLE fits in: 320 bytes against 640 here, and `dcp.load` of one into the
    other refused the checkpoint with a size mismatch. The length is now fixed for the layer's life (every rank,
    topology and registry it can hold), so a model saved in SINGLE loads into one in MULTI, and the other way round.
    A spare-slot id longer than its share is registered (a model never saved with dcp loses nothing); its record
    outgrows the bound, and dcp says so with a size mismatch, not silently."""
    import torch.distributed.checkpoint as dcp

    ids = [f"task-{i}-" + "x" * 73 for i in range(3)]  # 80 characters each

    def make(multi: bool, rank: int):
        model = tiny_bert()
        _, ctrl = setup_multitask_lora(model, ids[:2], TARGETS, spare_slots=1, register_new_tasks=True,
                                       lr_mode="off", print_fn=None)
        if multi:
            ctrl.router.register_task(ids[2])
            ctrl.router.set_topology("task")
        for a in ctrl.adapters:
            a.set_rank(rank)
        return model, ctrl

    for i, (src_multi, dst_multi) in enumerate([(False, True), (True, False)]):
        src, src_ctrl = make(src_multi, 16 if src_multi else 4)
        dcp.save(src.state_dict(), checkpoint_id=str(tmp_path / f"dcp{i}"))
        dst, dst_ctrl = make(dst_multi, 4 if src_multi else 16)
        sd = dst.state_dict()
        dcp.load(sd, checkpoint_id=str(tmp_path / f"dcp{i}"))
        dst.load_state_dict(sd, strict=True)
        assert dst_ctrl.router.topology == src_ctrl.router.topology and dst_ctrl.router.slots == src_ctrl.router.slots
        assert [a.rank for a in dst_ctrl.adapters] == [a.rank for a in src_ctrl.adapters]
    long, long_ctrl = make(False, 8)
    long_ctrl.router.register_task("y" * 400)
    long_ctrl.router.set_topology("task")
    assert long_ctrl.router.slots == {ids[0]: 0, ids[1]: 1, "y" * 400: 2}
    dcp.save(long.state_dict(), checkpoint_id=str(tmp_path / "long"))
    dst, _ = make(False, 8)
    with pytest.raises(dcp.api.CheckpointException) as failed:
        dcp.load(dst.state_dict(), checkpoint_id=str(tmp_path / "long"))
    assert "Size mismatch" in repr(failed.value.failures)
    fresh, fresh_ctrl = make(False, 8)
    fresh.load_state_dict(long.state_dict(), strict=True)  # a plain state dict: any length loads
    assert fresh_ctrl.router.slots == long_ctrl.router.slots and fresh_ctrl.router.topology == "task"


def test_a_state_dict_cast_whole_to_half_precision_loads_the_topology_and_the_registry():
    """`{k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}`, the usual way to halve a checkpoint, casts
    the multi-task layers' `_extra_state` (the JSON's bytes) to floats too; the load raised "TypeError: 'float' object
    cannot be interpreted as an integer". bf16 holds every byte value exactly: the load restores the topology, the
    registry and the rank."""
    model, ctrl, x, make = _trained_through_a_split("bert")
    fresh, fresh_ctrl = make()
    fresh.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    assert fresh_ctrl.router.topology == "task" and fresh_ctrl.router.slots == {"a": 0, "b": 1, "c": 2}
    assert {a.rank for a in fresh_ctrl.adapters} == {ctrl.rank}


def test_a_merged_model_loading_a_state_dict_saved_in_multi_stays_unmerged_on_the_task_adapters():
    """A fresh model merged in SINGLE (its shared delta folded into the base weights) that loads a state dict saved in
    MULTI: it unmerges for the load, and merged the shared delta in again after it, so every task ran the shared
    adapter. Task adapters cannot be folded into one base weight: it stays unmerged, on the task adapters, and gives
    the saved model's outputs bit for bit (the base weight is the state dict's). A state dict saved in SINGLE merges
    again as before."""
    from unified_lora import merge_adapters

    model, ctrl, x, make = _trained_through_a_split("bert")
    ref = _per_task_outputs(model, x)
    fresh, fresh_ctrl = make()
    merge_adapters(fresh)
    fresh.load_state_dict(model.state_dict(), strict=True)
    layers = [m for m in fresh.modules() if isinstance(m, MultiTaskNestedLoRALayer)]
    assert fresh_ctrl.router.topology == "task" and not any(layer.merged_rank for layer in layers)
    out = _per_task_outputs(fresh.eval(), x)
    assert all(torch.equal(out[k], ref[k]) for k in ref)
    ctrl.merge_back()  # back to the shared adapter, saved in SINGLE: loads into the merged model merged
    single = {k: v.clone() for k, v in model.state_dict().items()}
    fresh, fresh_ctrl = make()
    merge_adapters(fresh)
    fresh.load_state_dict(single, strict=True)
    layers = [m for m in fresh.modules() if isinstance(m, MultiTaskNestedLoRALayer)]
    assert fresh_ctrl.router.topology == "shared" and {layer.merged_rank for layer in layers} == {8}
    with torch.no_grad(), task_context(model, "a"), task_context(fresh, "a"):
        torch.testing.assert_close(fresh(input_ids=x).logits, model(input_ids=x).logits)


def test_a_state_dict_with_other_task_slots_is_an_error_of_the_load_and_a_rank_alone_loads():
    """A state dict saved with another number of task slots (here without the spare slot) names slots this model does
    not have, or leaves some of its own unnamed: load_state_dict lists it as an error, strict or not, with what to
    do. A state dict whose `_extra_state` is the rank alone (a plain NestedLoRALayer's, or a multi-task model saved
    before the router was kept) sets the rank and leaves the topology and the registry as they are."""
    model, ctrl, x, make = _trained_through_a_split("bert")
    other = tiny_bert()
    setup_multitask_lora(other, ["a", "b"], TARGETS, print_fn=None)  # no spare slot: 2 slots, the saved model 3
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"_extra_state: saved with 3 task slots \(tasks \+ spare_slots\), "
                                               r"this model has 2; build it with the same tasks and spare_slots"):
            other.load_state_dict(model.state_dict(), strict=strict)
    rank_only = {k: (torch.tensor(4) if k.endswith("._extra_state") else v) for k, v in model.state_dict().items()}
    fresh, fresh_ctrl = make()
    fresh.load_state_dict(rank_only, strict=True)
    layers = [m for m in fresh.modules() if isinstance(m, MultiTaskNestedLoRALayer)]
    assert {layer.rank for layer in layers} == {4} and fresh_ctrl.router.topology == "shared"
    assert fresh_ctrl.router.slots == {"a": 0, "b": 1}


def test_a_multi_task_state_dict_loaded_into_a_single_task_model_is_an_error_naming_the_key():
    """A multi-task model's adapters (lora_state_dict) loaded with strict=False into a model wrapped with
    inject_nested_lora: the plain layer's set_extra_state took int() of the router's JSON and raised "only one
    element tensors can be converted to Python scalars", naming no layer. It is an error of the load now, which names
    the key and the builder to use."""
    from unified_lora import NestedLoRAConfig, inject_nested_lora, lora_state_dict

    model, _, _, _ = build()
    plain = tiny_bert()
    inject_nested_lora(plain, NestedLoRAConfig(target_modules=TARGETS))
    with pytest.raises(RuntimeError, match=r"attention\.self\.query\._extra_state: saved by a multi-task layer \(its "
                                           r"rank and task router\); load it into a model built with "
                                           r"inject_multitask_lora / setup_multitask_lora"):
        plain.load_state_dict(lora_state_dict(model), strict=False)


def test_a_controller_state_in_multi_is_refused_by_a_merged_model_before_anything_loads():
    """ctrl.load_state_dict of a state saved in MULTI into the controller of a model merged in SINGLE (merge_adapters,
    for an evaluation) set the router on the task adapters, the machine in MULTI, then failed in the rank change:
    the first layer's re-merge raised "merge: in MULTI/MIRROR ...", leaving that layer unmerged and every other one
    merged at the old rank, the shared delta in its base weight for every task. It is refused now, with what to do,
    before anything changes; unmerged, the same state loads."""
    from unified_lora import merge_adapters, unmerge_adapters

    model, ctrl, x, make = _trained_through_a_split("bert")
    fresh, fresh_ctrl = make()
    layers = [m for m in fresh.modules() if isinstance(m, MultiTaskNestedLoRALayer)]
    merge_adapters(fresh)
    weights = [w.clone() for w in fresh.state_dict(keep_vars=True).values() if torch.is_tensor(w)]
    with pytest.raises(ValueError, match=r"state is in MULTI/MIRROR, on the task adapters, and 5 of this model's 5 "
                                         r"adapters are merged .*Call unmerge_adapters\(model\) first; nothing was"):
        fresh_ctrl.load_state_dict(ctrl.state_dict())
    assert (fresh_ctrl.mode, fresh_ctrl.rank, fresh_ctrl.global_step, fresh_ctrl.router.topology) == (
        SINGLE, 4, 0, "shared")
    assert {layer.merged_rank for layer in layers} == {4}
    after = [w for w in fresh.state_dict(keep_vars=True).values() if torch.is_tensor(w)]
    assert all(torch.equal(a, b) for a, b in zip(weights, after))
    unmerge_adapters(fresh)
    fresh_ctrl.load_state_dict(ctrl.state_dict())
    assert (fresh_ctrl.mode, fresh_ctrl.rank, fresh_ctrl.router.topology) == (MULTI, 8, "task")


def test_a_reader_never_sees_a_task_adapter_file_half_written(tmp_path, monkeypatch):
    """Under DDP every process may save the replicated adapters into one folder while another reads it. A file was
    rewritten in place (truncated first), so a reader could find it half-written: a torn `tasks.json` read as a
    JSONDecodeError in a 2-process run. Now each file is written under a temporary name and renamed. A read while
    the save is under way, once the new shared file is in place beside the old task files, is refused (the files'
    digests in tasks.json): it used to load the mixed set as if whole."""
    import safetensors.torch

    data = conflict_data()
    m1, _, c1, o1 = build(initial_mode=MULTI)
    save_task_adapters(m1, tmp_path)  # a complete earlier save
    from safetensors.torch import load_file

    old_shared = load_file(str(tmp_path / "shared.safetensors"))
    train(m1, c1, o1, 2, data)  # (the first step goes to SINGLE, the second moves the shared adapter)
    save_task_adapters(m1, tmp_path / "after")
    new_shared = load_file(str(tmp_path / "after" / "shared.safetensors"))
    assert not all(torch.equal(v, new_shared[k]) for k, v in old_shared.items())  # the new save's shared differs
    m2, _, _, _ = build(initial_mode=MULTI)
    real_save, seen = safetensors.torch.save_file, []

    def save_while_another_process_reads(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:  # the writer is halfway through this file
            f.truncate(os.path.getsize(path) // 2)
        try:
            load_task_adapters(m2, tmp_path)
            seen.append("whole")
        except Exception as e:
            seen.append(f"{type(e).__name__}: {e}")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_while_another_process_reads)
    save_task_adapters(m1, tmp_path)
    assert seen[0] == "whole" and len(seen) == 3  # before any file of the new save is in place
    assert all(e.startswith(f"ValueError: {tmp_path / 'shared.safetensors'}: not the file tasks.json was saved with")
               for e in seen[1:]), seen
    assert sorted(os.listdir(tmp_path)) == sorted(["after", "tasks.json", "shared.safetensors", "task-0-a.safetensors",
                                                   "task-1-b.safetensors"])  # no temporary file left
    load_task_adapters(m2, tmp_path)
    assert all(torch.equal(p, m1.get_parameter(n)) for n, p in m2.named_parameters() if ".lora_" in n)


def test_a_folder_left_by_a_save_killed_between_two_files_is_refused_not_loaded_mixed(tmp_path):
    """A save into a folder that holds an earlier save, killed after it renamed `shared.safetensors` and before
    the task files and `tasks.json`, leaves the new shared adapter beside the old task adapters. Every file is whole
    and of the right shape, so load_task_adapters loaded the mix silently: weights no model ever had. Now tasks.json
    holds each file's digest, and the load refuses the mix before it changes the model."""
    import shutil

    data = conflict_data()
    m1, _, c1, o1 = build(initial_mode=MULTI)
    train(m1, c1, o1, 2, data)
    save_task_adapters(m1, tmp_path / "run")  # the earlier save
    train(m1, c1, o1, 2, data)
    save_task_adapters(m1, tmp_path / "next")  # the later save, which the kill stopped after its first file
    shutil.copyfile(tmp_path / "next" / "shared.safetensors", tmp_path / "run" / "shared.safetensors")
    m2, _, _, _ = build(initial_mode=MULTI)
    before = {n: p.detach().clone() for n, p in m2.named_parameters()}
    with pytest.raises(ValueError, match=r"shared\.safetensors: not the file tasks\.json was saved with .* different "
                                         r"saves.*Save the adapters again"):
        load_task_adapters(m2, tmp_path / "run")
    assert all(torch.equal(p, before[n]) for n, p in m2.named_parameters())  # refused before anything changed
    load_task_adapters(m2, tmp_path / "next")  # a whole save still loads
    assert all(torch.equal(p, m1.get_parameter(n)) for n, p in m2.named_parameters() if ".lora_" in n)


def test_a_file_of_another_save_of_the_same_weights_loads(tmp_path):
    """Every process of a DDP run saves the same weights into one folder, so the files left are a mix of the
    processes' saves. safetensors writes its metadata in a different order in each save (a Rust HashMap), so the
    bytes differ and a digest of the bytes refused that folder at random; the digest covers the tensors."""
    import shutil
    import struct

    m1, _, c1, o1 = build(initial_mode=MULTI)
    train(m1, c1, o1, 2, conflict_data())
    headers = set()
    for i in range(6):  # six saves of the same weights: their files' bytes differ, their tensors do not
        save_task_adapters(m1, tmp_path / f"s{i}")
        raw = (tmp_path / f"s{i}" / "shared.safetensors").read_bytes()
        headers.add(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    assert len(headers) > 1  # the premise: the same weights saved twice are not the same bytes
    for i in range(1, 6):
        shutil.copyfile(tmp_path / f"s{i}" / "shared.safetensors", tmp_path / "s0" / "shared.safetensors")
        m2, _, _, _ = build(initial_mode=MULTI)
        load_task_adapters(m2, tmp_path / "s0")
        assert all(torch.equal(p, m1.get_parameter(n)) for n, p in m2.named_parameters() if ".lora_" in n)


def _pool(flipped: bool, machine: MachineConfig):
    """Tasks a and b draw independent minibatches of 8 from one pool of 64 labelled sequences; with `flipped`, b's
    labels are a's inverted. Mixed batches, default signal. Returns the controller and a function that trains n
    steps."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, VOCAB, (64, 8), generator=g)
    y = torch.randint(0, 2, (64,), generator=g)
    model = tiny_bert()
    _, ctrl = setup_multitask_lora(model, ["a", "b"], TARGETS, lr_mode="off", print_fn=None, machine=machine)
    opt = torch.optim.AdamW(trainable_parameters(model), lr=2e-2, weight_decay=0.01)
    ctrl.attach_optimizer(opt)
    tids = ["a"] * 8 + ["b"] * 8

    def steps(n):
        for _ in range(n):
            ia, ib = torch.randint(0, 64, (8,), generator=g), torch.randint(0, 64, (8,), generator=g)
            labels = torch.cat([y[ia], 1 - y[ib] if flipped else y[ib]])
            with task_context(model, tids):
                per = F.cross_entropy(model(input_ids=torch.cat([x[ia], x[ib]])).logits, labels, reduction="none")
            per.mean().backward()
            ctrl.step(per.mean(), task_losses=per_task_losses(per, tids))
            opt.step()
            opt.zero_grad()
    return ctrl, steps


def _pool_run(flipped: bool, initial_mode: int, steps: int = 60):
    """`_pool`, warmup 10, min dwell 5, `steps` steps."""
    ctrl, train_steps = _pool(flipped, MachineConfig(initial_mode=initial_mode, warmup_steps=10, min_dwell=5))
    train_steps(steps)
    return ctrl


def test_tasks_from_one_distribution_merge_back_to_single():
    """Two tasks drawn from the same data: their task adapters move apart by minibatch noise only. The weight conflict
    reads independent moves as 0 (it was 1: v / (1 − 1/T) is 1 for independent moves), so C falls and MULTI merges
    back. Before, C_weight sat at ~1 from the first steps after the split, φ stayed above θ0, and the run never left
    MULTI (MiniLM on two halves of MRPC did the same: benchmarks/multitask_conflict.py)."""
    ctrl = _pool_run(flipped=False, initial_mode=MULTI)
    multi = [r for r in ctrl.trace if r.mode == MULTI and r.step >= 3]
    assert multi and max(r.components["C_weight"] for r in multi) < 0.5
    assert "MULTI->SINGLE" in [r.transition for r in ctrl.trace]
    assert ctrl.mode == SINGLE


def test_tasks_with_flipped_labels_split_and_stay_split():
    """The strongest conflict: b's labels are a's inverted. The gradient conflict splits SINGLE; after the split the
    task heads move apart in opposite directions, which the weight conflict (per layer, the largest) reads as
    conflict, so MULTI holds after the gradients stop fighting (each task adapter fits its own labels)."""
    ctrl = _pool_run(flipped=True, initial_mode=SINGLE)
    tl = [r.transition for r in ctrl.trace if r.transition]
    assert tl == ["SINGLE->MULTI"], tl
    late = ctrl.trace[-20:]
    assert all(r.mode == MULTI for r in late)
    assert min(r.components["C_weight"] for r in late) > 0.6
    assert sum(r.components["C_grad"] for r in late) / len(late) < 0.3  # the gradients alone would merge it back


def test_after_a_split_that_brings_the_task_adapters_back_the_weight_conflict_goes_on_from_the_merge():
    """A split within resplit_window undoes the merge: the weight conflict goes on reading each task's moves as it did
    before the merge. Before, it measured them from the shared adapter, the merge's mean, from which the task adapters
    brought back move in opposite directions by construction, so it read any two tasks as conflicting: two tasks
    drawn from one pool read 0.28 before the merge and 0.83 at the step after such a split, and with b's labels
    flipped 0.65 and 0.84 (now 0.27 and 0.66)."""
    first = {}
    for flipped in (False, True):
        ctrl, steps = _pool(flipped, MachineConfig(initial_mode=MULTI))
        _force(ctrl, 0.0)
        steps(30)
        before = ctrl.trace[-1].components["C_weight"]
        _force(ctrl, 0.98)
        steps(3)  # the merge, 2 steps in SINGLE
        _force(ctrl, 0.0)
        steps(2)  # the split, then a step in MULTI
        assert [r.components.get("event") for r in ctrl.trace[-5:]] == ["merge", None, None, "split", None]
        assert ctrl.trace[-2].components["tasks_back"] == 2
        first[flipped] = ctrl.trace[-1].components["C_weight"]
        assert abs(first[flipped] - before) < 0.15, (flipped, before, first[flipped])
    assert first[False] < 0.4 and first[True] > 0.5


def _train_lm_tasks(model, ctrl, x, steps):
    """`steps` language-model steps of tasks "a" and "b" (a row each of `x`), with a new AdamW attached (after a
    resize, the README's way)."""
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    ctrl.attach_optimizer(opt)
    for _ in range(steps):
        with task_context(model, ["a", "b"]):
            logits = model(input_ids=x).logits
        per = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(2, -1)
        per.mean().backward()
        ctrl.step(per.mean(), task_losses=per_task_losses(per.mean(1), ["a", "b"]))
        opt.step()
        opt.zero_grad()


def _force(ctrl, theta0):
    """The machine's next decision: θ0 = 0.98 merges (φ < θ0), θ0 = 0 splits."""
    ctrl.machine.config = MachineConfig(theta0=theta0, theta1=0.99)


def _split_after_merge(gap, **kw):
    """MULTI for 15 steps on flipped labels (each task adapter fits its labels), a forced merge, `gap` SINGLE steps,
    a forced split. Returns the controller, the task adapters as the merge left them, the shared adapter as the merge
    left it and as the split found it, and the split's step."""
    data = conflict_data()
    model, ad, ctrl, opt = build(initial_mode=MULTI, **kw)
    _force(ctrl, 0.0)
    train(model, ctrl, opt, 15, data)
    _force(ctrl, 0.98)
    train(model, ctrl, opt, 1, data)
    assert ctrl.mode == SINGLE and ctrl.trace[-1].components["event"] == "merge"
    tasks = [[p.detach().clone() for s in (0, 1) for p in a.task_parameters(s)] for a in ad.values()]
    point = [[p.detach().clone() for p in a.shared_parameters()] for a in ad.values()]  # (the merge step drops grads)
    train(model, ctrl, opt, gap, data)
    shared = [[p.detach().clone() for p in a.shared_parameters()] for a in ad.values()]
    _force(ctrl, 0.0)
    train(model, ctrl, opt, 1, data)
    assert ctrl.mode == MULTI and ctrl.trace[-1].components["event"] == "split"
    return model, ad, ctrl, opt, data, tasks, point, shared, ctrl.global_step - 1


def test_a_split_soon_after_a_merge_brings_the_task_adapters_back():
    """Flipped labels: a merge throws away what the task adapters learned apart (their means cancel), and SINGLE's
    gradient conflict soon splits again. Before, that split copied the merged adapter into every task, so each task
    started over from it (a cold start, every merge that did not hold). Within resplit_window steps of the merge, each
    task adapter comes back as the merge left it, plus the shared adapter's move since."""
    model, ad, ctrl, opt, data, tasks, point, shared, at = _split_after_merge(3)
    assert any(not torch.equal(s, p) for layer_s, layer_p in zip(shared, point) for s, p in zip(layer_s, layer_p))
    for a, kept, pt, now in zip(ad.values(), tasks, point, shared):
        n = len(pt)
        for s in (0, 1):
            for got, t, p0, p1 in zip(a.task_parameters(s), kept[s * n:(s + 1) * n], pt, now):
                torch.testing.assert_close(got.detach(), t + (p1 - p0), rtol=0, atol=1e-6)
    assert ctrl.failed_merges == 1 and ctrl.machine.hold_down[MULTI] == at + 25 * 2
    assert format_console(ctrl.trace[-1]).endswith(f"(SINGLE->MULTI, task adapters back, no merge before step {at + 50})")
    x, ya, yb = data  # each task is served again by its own adapter (both fit their labels before the merge)
    assert task_acc(model, x, ya, "a") > 0.9 and task_acc(model, x, yb, "b") > 0.9
    # off (resplit_window=0): the split copies the shared adapter, as before, and one task is served the other's labels
    model, ad, ctrl, opt, data, tasks, point, shared, at = _split_after_merge(3, resplit_window=0)
    for a in ad.values():
        for s in (0, 1):
            assert all(torch.equal(t, p) for t, p in zip(a.task_parameters(s), a.shared_parameters()))
    assert ctrl.failed_merges == 0 and MULTI not in ctrl.machine.hold_down
    assert min(task_acc(model, x, ya, "a"), task_acc(model, x, yb, "b")) < 0.5


def test_after_a_merge_that_did_not_hold_the_next_merge_waits_and_a_late_split_copies():
    model, ad, ctrl, opt, data, *_, at = _split_after_merge(2)
    _force(ctrl, 0.98)  # φ < θ0 at every decision, but the machine holds MULTI until the back-off ends
    train(model, ctrl, opt, at + 50 - ctrl.global_step, data)
    assert ctrl.mode == MULTI and ctrl.trace[-1].transition is None
    train(model, ctrl, opt, 1, data)
    assert ctrl.mode == SINGLE and ctrl.trace[-1].step == at + 50
    train(model, ctrl, opt, 26, data)  # past the window: a split as before, the back-off reset
    _force(ctrl, 0.0)
    train(model, ctrl, opt, 1, data)
    assert ctrl.mode == MULTI and ctrl.failed_merges == 0 and MULTI not in ctrl.machine.hold_down
    for a in ad.values():
        for s in (0, 1):
            assert all(torch.equal(t, p) for t, p in zip(a.task_parameters(s), a.shared_parameters()))


def test_report_and_plot_name_a_split_that_brought_the_task_adapters_back(tmp_path, capsys):
    """`report RUN` lists the transitions: a multi-task run's say what each did, and a split within resplit_window of
    its merge says, as the console did at that step, that the task adapters came back and until when the next merge
    waits; `plot` marks that split with the same words. Before, every line was modes, φ, rank and LR alone, and the
    plot showed a mode change alone, so a run held in MULTI with φ below θ0 (the back-off) was unexplained there."""
    from unified_lora.cli import main

    *_, ctrl, _opt, _data, _tasks, _point, _shared, at = _split_after_merge(3)
    (tmp_path / "trace.jsonl").write_text("".join(r.to_json() + "\n" for r in ctrl.trace))
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 0
    lines = [ln.strip() for ln in capsys.readouterr().out.splitlines() if "->" in ln]
    assert [ln.split(", ", 1)[1] for ln in lines] == [
        "task adapters merged into the shared one", f"task adapters back, no merge before step {at + 50}"]
    assert lines[1].startswith(f"[{at}] SINGLE->MULTI")
    # and `plot` marks that split, with the same words (an SVG that keeps its text as text)
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none"}):
        assert main(["plot", str(tmp_path), "-o", str(tmp_path / "phi.svg")]) == 0
    assert f"task adapters back, no merge before step {at + 50}" in (tmp_path / "phi.svg").read_text()


def _merged_after_six_multi_steps(single_steps: int):
    """6 MULTI steps on flipped labels, a forced merge, then `single_steps` more SINGLE steps."""
    data = conflict_data()
    model, ad, ctrl, opt = build(initial_mode=MULTI)
    _force(ctrl, 0.0)
    train(model, ctrl, opt, 6, data)
    _force(ctrl, 0.98)
    train(model, ctrl, opt, 1 + single_steps, data)
    return model, ad, ctrl, opt, data


def test_a_resumed_run_splits_after_a_merge_as_the_run_it_resumes(tmp_path):
    """The kept merge (the merge point, its step, its tasks, their weight-conflict references) and the back-off are in
    ctrl.state_dict(), so a run resumed between a merge and its split brings the same task adapters back (the task
    adapters are in the model's state) and reads the same weight conflict after it; so does a run resumed after
    that split (the references it brought back are in the state too)."""
    model, ad, ctrl, opt, data = _merged_after_six_multi_steps(single_steps=1)
    runs = []
    for resumed in (False, True, "after the split"):
        if resumed is False:
            torch.save({"model": model.state_dict(), "ctrl": ctrl.state_dict(), "opt": opt.state_dict()},
                       tmp_path / "c.pt")
        if resumed:
            model, ad, ctrl, opt = build(initial_mode=MULTI)
            st = torch.load(tmp_path / ("c.pt" if resumed is True else "s.pt"), weights_only=True)
            model.load_state_dict(st["model"])
            ctrl.load_state_dict(st["ctrl"])
            opt.load_state_dict(st["opt"])
            assert ctrl.mode == (SINGLE if resumed is True else MULTI)
            assert (ctrl._parked if resumed is True else ctrl._conflict_ref) is not None
        _force(ctrl, 0.0)
        if resumed != "after the split":
            train(model, ctrl, opt, 1, data)
        if resumed is False:
            torch.save({"model": model.state_dict(), "ctrl": ctrl.state_dict(), "opt": opt.state_dict()},
                       tmp_path / "s.pt")
        train(model, ctrl, opt, 2, data)
        runs.append(([p.detach().clone() for p in trainable_parameters(model)], dict(ctrl.machine.hold_down),
                     [r.components["C_weight"] for r in ctrl.trace[-2:]]))
    assert runs[2][1] == runs[1][1] == runs[0][1] == {MULTI: 8 + 50}
    assert runs[2][2] == runs[1][2] == runs[0][2] and runs[0][2][0] is not None
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0][0], other[0]))


def _interrupt_next_rank_change(ctrl, monkeypatch):
    """The controller's next rank change (the last part of a transition) raises KeyboardInterrupt, once."""
    real, calls = ctrl._apply_rank, []

    def interrupted_once():
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real()

    monkeypatch.setattr(ctrl, "_apply_rank", interrupted_once)


def test_a_split_interrupted_after_bringing_the_task_adapters_back_is_undone(monkeypatch):
    """The warm split changes the task adapters, the kept merge and the back-off; a failure later in the transition
    (the rank change; a Ctrl-C here) puts all three back, so the split that follows brings the same adapters back."""
    model, ad, ctrl, opt, data = _merged_after_six_multi_steps(single_steps=0)
    kept = [p.detach().clone() for a in ad.values() for s in (0, 1) for p in a.task_parameters(s)]
    parked = ctrl._parked
    _interrupt_next_rank_change(ctrl, monkeypatch)
    _force(ctrl, 0.0)
    with pytest.raises(KeyboardInterrupt):
        train(model, ctrl, opt, 1, data)
    assert ctrl.mode == SINGLE and ctrl._parked is parked and ctrl.failed_merges == 0 and not ctrl.machine.hold_down
    assert all(torch.equal(k, p) for k, p in zip(kept, [p for a in ad.values() for s in (0, 1)
                                                          for p in a.task_parameters(s)]))


def test_a_split_soon_after_a_merge_across_a_resize_of_the_lm_head_brings_the_task_adapters_back():
    """`resize_token_embeddings` between a merge and its split (the README's way: build the optimizer again, attach
    it) grew every B block of the lm_head, the kept merge point's not: the split failed ("The size of tensor a (70)
    must match the size of tensor b (64)"), was undone, and so did every split in the window, the error raised at
    each. The point grows as the blocks did (new rows 0), so each task's new rows get the shared adapter's move."""
    model = tiny_llama()
    _, ctrl = setup_multitask_lora(model, ["a", "b"], ["q_proj", "lm_head"], print_fn=None,
                                   machine=MachineConfig(initial_mode=MULTI))
    head = model.lm_head

    def run(x, steps, theta0):
        _force(ctrl, theta0)
        _train_lm_tasks(model, ctrl, x, steps)

    run(torch.randint(0, VOCAB, (2, 6)), 3, 0.0)
    run(torch.randint(0, VOCAB, (2, 6)), 1, 0.98)  # the merge
    kept = [p.detach().clone() for s in (0, 1) for p in head.lora_tasks[s].lora_B]
    point = [p.detach().clone() for p in head.lora_B]
    model.resize_token_embeddings(VOCAB + 6, mean_resizing=False)
    new = torch.tensor([[VOCAB + 5, 1, 2, VOCAB + 1]] * 2)
    run(new, 2, 0.98)
    moved = [p.detach()[:VOCAB] - p0 for p, p0 in zip(head.lora_B, point)]
    shared_new = [p.detach()[VOCAB:].clone() for p in head.lora_B]
    run(new, 1, 0.0)  # the split, 3 steps after the merge
    assert ctrl.mode == MULTI and ctrl.trace[-1].components["tasks_back"] == 2
    n = len(point)
    for s in (0, 1):
        for got, k, m, sn in zip(head.lora_tasks[s].lora_B, kept[s * n:(s + 1) * n], moved, shared_new):
            torch.testing.assert_close(got.detach()[:VOCAB], k + m, rtol=0, atol=1e-6)
            torch.testing.assert_close(got.detach()[VOCAB:], sn, rtol=0, atol=0)  # 0 at the resize, + the move
    assert shared_new[0].abs().sum() > 0


def test_a_failed_transition_after_a_split_called_by_hand_leaves_the_task_adapters_as_trained(monkeypatch):
    """`ctrl.merge_back()` and `ctrl.split()` called by hand (as tests and notebooks do): the split kept what it
    changed, for an undo, and nothing dropped it outside a transition. So the next transition that failed, a
    MULTI->MIRROR whose rank change raised, put the task adapters back as that split found them: MULTI's training
    since was lost, silently (and the kept merge and the back-off came back too). Only a split in the transition
    being undone is undone."""
    data = conflict_data()
    model, ad, ctrl, opt = build(initial_mode=MULTI)
    ctrl.machine.config = MachineConfig(initial_mode=MULTI, warmup_steps=7)
    train(model, ctrl, opt, 4, data)
    ctrl.merge_back()
    ctrl.split()  # within the window: the task adapters come back
    train(model, ctrl, opt, 3, data)  # MULTI trains the task adapters (no decision before step 7)
    trained = [p.detach().clone() for a in ad.values() for s in (0, 1) for p in a.task_parameters(s)]
    hold, failed = dict(ctrl.machine.hold_down), ctrl.failed_merges
    _interrupt_next_rank_change(ctrl, monkeypatch)
    ctrl.machine.config = MachineConfig(theta0=0.0, theta1=0.01)  # MULTI->MIRROR at step 7
    with pytest.raises(KeyboardInterrupt):
        train(model, ctrl, opt, 1, data)
    assert ctrl.mode == MULTI and "MULTI->MIRROR" in ctrl.trace[-1].components["transition_error"]
    assert all(torch.equal(t, p) for t, p in zip(trained, [p for a in ad.values() for s in (0, 1)
                                                           for p in a.task_parameters(s)]))
    assert ctrl.machine.hold_down == hold and ctrl.failed_merges == failed and ctrl._parked is None


def test_the_kept_merge_point_goes_once_no_split_can_use_it(monkeypatch):
    """The merge point (a copy of the shared adapter, every block) was kept for all of SINGLE, however long, and saved
    in every checkpoint's controller state; and a merge undone (its rank change failed) left it in MULTI. It goes once
    the window has passed, and with the undone merge; a split after the window copies, as before."""
    data = conflict_data()
    model, ad, ctrl, opt = build(initial_mode=MULTI, resplit_window=4)
    _force(ctrl, 0.0)
    train(model, ctrl, opt, 3, data)
    _force(ctrl, 0.98)
    train(model, ctrl, opt, 1, data)
    at = ctrl.trace[-1].step
    assert ctrl.mode == SINGLE and ctrl._parked["step"] == at
    train(model, ctrl, opt, 4, data)  # steps at+1 .. at+4: a split at step at+4 would still bring them back
    assert ctrl._parked is not None
    train(model, ctrl, opt, 1, data)  # step at+5: past the window
    assert ctrl._parked is None and ctrl.state_dict()["multitask"]["parked"] is None
    _force(ctrl, 0.0)
    train(model, ctrl, opt, 1, data)
    assert ctrl.mode == MULTI and "tasks_back" not in ctrl.trace[-1].components
    # a merge whose transition fails is undone: MULTI, and no merge point kept
    _interrupt_next_rank_change(ctrl, monkeypatch)
    _force(ctrl, 0.98)
    with pytest.raises(KeyboardInterrupt):
        train(model, ctrl, opt, 1, data)
    assert ctrl.mode == MULTI and ctrl.router.topology == "task" and ctrl._parked is None


def test_the_weight_conflict_reads_small_moves_from_a_large_shared_adapter():
    """The conflict is a difference of Gram entries of the size of ‖ΔW_shared‖²; for task moves of 1e-5 of the shared
    adapter (the steps after a split, or a small learning rate) float32's rounding of those entries was larger than
    the moves: task adapters that moved exactly apart (b = −a: full conflict) read 0. In float64 they read 1,
    independent moves (disjoint rows) 0 and moves alike 0."""
    model, ad, ctrl, _ = build(initial_mode=MULTI)
    g = torch.Generator().manual_seed(0)
    got = {}
    for how in ("alike", "opposite", "independent"):
        with torch.no_grad():
            for a in ad.values():
                for p in a.shared_parameters():
                    p.copy_(torch.randn(p.shape, generator=g))
                a.copy_shared_to_tasks()
                h = a.out_features // 2
                for pa, pb in zip(a.lora_tasks[0].lora_B, a.lora_tasks[1].lora_B):
                    e = 1e-5 * torch.randn(pa.shape, generator=g)
                    pa[:h] += e[:h]
                    if how == "independent":
                        pb[h:2 * h] += e[h:2 * h]
                    else:
                        pb[:h] += e[:h] if how == "alike" else -e[:h]
        got[how] = ctrl._weight_conflict()
    assert got["opposite"] == pytest.approx(1.0, abs=1e-3)
    assert got["alike"] == pytest.approx(0.0, abs=1e-3) and got["independent"] == pytest.approx(0.0, abs=1e-3)


def test_no_merge_in_the_last_resplit_window_steps_of_a_run_of_total_steps():
    """With `total_steps`, a merge φ calls for in the run's last `resplit_window` steps is held: the run would end
    before the merge could be tested (merges there left flipped labels at chance on MiniLM's dev sets). The task
    adapters stay as they were; the trace marks the held merge; MIRROR → MULTI is not held; without total_steps (or
    with resplit_window 0) the merge is made as before."""
    data = conflict_data()
    outcomes = {}
    for total, window in ((30, 10), (None, 10), (30, 0), (40, 10)):
        model, ad, ctrl, opt = build(initial_mode=MULTI, resplit_window=window, total_steps=total)
        _force(ctrl, 0.0)
        train(model, ctrl, opt, 20, data)
        tasks = [[p.detach().clone() for p in a.task_parameters()] for a in ad.values()]
        _force(ctrl, 0.98)  # φ < θ0 from step 20 on: a merge at once, unless held
        train(model, ctrl, opt, 5, data)
        merges = [r.step for r in ctrl.trace if r.transition == "MULTI->SINGLE"]
        outcomes[(total, window)] = merges
        if merges:
            continue
        assert ctrl.mode == MULTI and ctrl.router.topology == "task"
        assert all(r.components.get("merge_closed_from") == total - window for r in ctrl.trace[20:])
        assert not any("merge_closed_from" in r.components for r in ctrl.trace[:20])
        # the task adapters trained on (they were not merged), each on its own labels
        assert not all(torch.equal(t, p) for a, ts in zip(ad.values(), tasks) for t, p in zip(ts, a.task_parameters()))
        # MIRROR -> MULTI is not held in the closing steps, and neither is MULTI -> MIRROR
        ctrl.machine.config = MachineConfig(theta0=0.0, theta1=1e-9)
        train(model, ctrl, opt, 1, data)
        assert ctrl.mode == MIRROR
        ctrl.machine.config = MachineConfig(theta0=0.98, theta1=0.99)
        train(model, ctrl, opt, 1, data)
        assert ctrl.mode == MULTI
    # 30 steps, window 10: no merge from step 20 on; without total_steps or the window, or in a longer run: at once
    assert outcomes == {(30, 10): [], (None, 10): [20], (30, 0): [20], (40, 10): [20]}


def test_console_lines_say_what_a_split_or_merge_did_and_once_that_the_runs_end_held_a_merge():
    """The console's line of a split or merge said `(SINGLE->MULTI)` or `(MULTI->SINGLE)` alone (`report` said what
    each did), and a merge held in the run's last `resplit_window` steps was in the trace only: a log line read φ
    below θ0 in MULTI with no merge, unexplained. Now each transition's line says what it did, and the first held
    step gets a line (once, with log_every off) that says why no merge came."""
    from unified_lora.trace import format_console

    data = conflict_data()
    model, ad, ctrl, opt = build(resplit_window=10, total_steps=30)
    said = []
    ctrl.print_fn, ctrl.log_every = said.append, 0
    for theta0, steps in ((0.0, 10), (0.98, 1), (0.0, 1), (0.98, 18)):  # split, merge, split back, merges held
        _force(ctrl, theta0)
        train(model, ctrl, opt, steps, data)
    trace = ctrl.trace
    assert [r.transition for r in trace if r.transition] == ["SINGLE->MULTI", "MULTI->SINGLE", "SINGLE->MULTI"]
    held = [r for r in trace if "merge_closed_from" in r.components]
    assert held and held[0].step == 20 and all(r.mode == MULTI for r in held)
    assert said == [format_console(r) for r in trace if r.transition or r is held[0]]
    assert said[0].endswith("  (SINGLE->MULTI, task adapters copied from the shared one)")
    assert said[1].endswith("  (MULTI->SINGLE, task adapters merged into the shared one)")
    assert said[2].endswith("  (SINGLE->MULTI, task adapters back, no merge before step 31)")  # (10 x 2)
    assert said[3].startswith("[20] Mode=1 ") and said[3].endswith(
        "  (merge held: none from step 20 on, too close to the run's end to be tested)")


def test_total_steps_is_checked():
    for bad in (0, -3, 2.5, True, "100"):
        with pytest.raises(ValueError, match=r"total_steps: .*an int >= 1"):
            build(total_steps=bad)
    *_, ctrl, _ = build(total_steps=10)
    ctrl.total_steps = "10"  # set after construction: refused at the next step, before anything moves
    with pytest.raises(ValueError, match="total_steps"):
        ctrl.merges_closed_from


def test_resplit_window_is_checked():
    for bad in (-1, 2.5, True, "25"):
        with pytest.raises(ValueError, match=r"resplit_window: .*an int >= 0"):
            build(resplit_window=bad)


def test_signal_numbers_in_numbers_out():
    sig = MultiTaskSignal(MultiTaskSignalConfig(phi_init=0.5))
    phi = sig.update(0.7, {"a": 0.7, "b": 0.7}, conflict_grad=1.0, conflict_weight=None, drift=0.05)
    c = sig.components
    assert c["C"] == 1.0 and c["S"] == pytest.approx(0.5) and c["E"] == pytest.approx(0.7 / 1.7)
    w = sig.config.weights
    assert c["phi_raw"] == pytest.approx(w[0] * 1.0 + w[1] * 0.7 / 1.7 + w[2] * 0.5)
    assert phi == pytest.approx(0.9 * 0.5 + 0.1 * c["phi_raw"])
    for _ in range(40):  # steady, then rising conflict → ΔC > 0 (only rises count)
        sig.update(0.7, {"a": 0.7, "b": 0.7}, conflict_grad=0.2, drift=0.0)
    sig.update(0.7, {"a": 0.7, "b": 0.7}, conflict_grad=0.9, drift=0.0)
    assert sig.components["dC"] > 0.5 and sig.components["dE"] == 0.0
    sig.update(0.7, {"a": 0.7, "b": 0.7}, conflict_grad=0.0, drift=0.0)
    assert sig.components["dC"] == 0.0  # falling conflict is not stress
    with pytest.raises(ValueError, match="sum to 1"):
        MultiTaskSignalConfig(weights=(0.5, 0.5, 0.5, 0, 0, 0))
    with pytest.raises(ValueError, match="conflict"):
        MultiTaskSignalConfig(conflict="bogus")


def test_the_signal_calibrates_its_loss_scale_on_its_first_steps_as_the_one_task_loss_signal():
    """On the default scale of 1 a causal LM's loss level (2.6 nats: E = 0.72) alone nearly fills θ0 = 0.3 (0.3 × E),
    so tasks with no conflict stayed split. With calibration_steps = n the mean loss of the first n steps maps to
    calibration_target, as `LossSignal` calibrates; until then E reads target / (1 + target) while C and S are read
    as usual, and each task's E_t, kept on the configured scale meanwhile, is rescaled to the calibrated one."""
    losses = [(2.8, {"a": 3.0, "b": 2.6}), (2.4, {"a": 2.5, "b": 2.3}), (2.2, {"a": 2.4, "b": 2.0})]
    cal = MultiTaskSignal(MultiTaskSignalConfig(calibration_steps=3, calibration_target=0.5))
    plain = MultiTaskSignal(MultiTaskSignalConfig(calibration_steps=3, weights=(1, 0, 0, 0, 0, 0)))
    for i, (loss, tl) in enumerate(losses):
        cal.update(loss, tl, conflict_grad=0.2 * i, drift=0.01 * i)
        plain.update(loss, tl, conflict_grad=0.2 * i, drift=0.01 * i)
        c = cal.components
        assert c["E"] == pytest.approx(1 / 3) and c["calibrating"] is True  # held at what the mean will read as
        assert c["C"] == pytest.approx(0.2 * i) and c["S"] == pytest.approx(0.01 * i / (0.01 * i + 0.05))
    scale = (2.8 + 2.4 + 2.2) / 3 / 0.5
    assert cal.loss_scale == pytest.approx(scale) and cal.components["loss_scale"] == pytest.approx(scale)
    # the tasks' EMAs, kept of loss / 1 meanwhile, are those of loss / the calibrated scale
    ema = {t: losses[0][1][t] for t in "ab"}
    for _, tl in losses[1:]:
        ema = {t: 0.9 * ema[t] + 0.1 * tl[t] for t in "ab"}
    assert {t: cal.E[t] for t in "ab"} == pytest.approx({t: ema[t] / scale for t in "ab"})
    sd = cal.state_dict()
    cal.update(2.1, {"a": 2.2, "b": 2.0}, conflict_grad=0.0, drift=0.0)
    e = {t: 0.9 * ema[t] / scale + 0.1 * v / scale for t, v in {"a": 2.2, "b": 2.0}.items()}
    assert cal.components["E"] == pytest.approx(sum(v / (1 + v) for v in e.values()) / 2)
    assert cal.components["calibrating"] is False
    # its state holds the scale: a signal loaded from it goes on where it went on
    again = MultiTaskSignal(MultiTaskSignalConfig(calibration_steps=3, calibration_target=0.5))
    again.load_state_dict(sd)
    assert again.update(2.1, {"a": 2.2, "b": 2.0}, conflict_grad=0.0, drift=0.0) == pytest.approx(cal.phi)
    # only C weighted: the held E moves nothing, φ is the same as without calibration
    uncal = MultiTaskSignal(MultiTaskSignalConfig(weights=(1, 0, 0, 0, 0, 0)))
    for i, (loss, tl) in enumerate(losses):
        uncal.update(loss, tl, conflict_grad=0.2 * i, drift=0.01 * i)
    assert plain.phi == pytest.approx(uncal.phi)
    # without calibration the state has the keys it always had (a checkpoint saved before it existed loads)
    assert set(uncal.state_dict()) == {"phi", "E", "last", "diff"}
    old = MultiTaskSignal(MultiTaskSignalConfig(loss_scale=2.0))
    old.load_state_dict(uncal.state_dict())
    assert old.loss_scale == 2.0 and not old.calibrating
    state = copy.deepcopy(old.__dict__)  # a signal pickled before the calibration existed reads on its configured scale
    del state["loss_scale"], state["_calib"]
    unpickled = MultiTaskSignal.__new__(MultiTaskSignal)
    unpickled.__setstate__(state)
    assert unpickled.update(0.5, {"a": 0.5}) == pytest.approx(copy.deepcopy(old).update(0.5, {"a": 0.5}))
    # a warm-up mean of 0 (a perfect fit) keeps the configured scale
    zero = MultiTaskSignal(MultiTaskSignalConfig(calibration_steps=2, loss_scale=3.0))
    for _ in range(2):
        zero.update(0.0, {"a": 0.0})
    assert zero.loss_scale == 3.0
    with pytest.raises(ValueError, match="calibration_steps: must be >= 0"):
        MultiTaskSignalConfig(calibration_steps=-1)
    with pytest.raises(ValueError, match="calibration_target: must be a positive finite number"):
        MultiTaskSignalConfig(calibration_target=0.0)


def test_layer_type_and_merge_guard():
    model, ad, ctrl, _ = build(initial_mode=MULTI)
    assert all(isinstance(a, MultiTaskNestedLoRALayer) for a in ad.values())
    with pytest.raises(ValueError, match="cannot be folded"):
        ad["classifier"].merge()


def split_gpt2(**kw):
    """A tiny GPT-2 (Conv1D layers) in MULTI, its two task adapters apart from each other and from the shared one."""
    model = tiny_gpt2()
    ad, _ = setup_multitask_lora(model, ["a", "b"], ["c_attn", "c_fc"], print_fn=None,
                                 machine=MachineConfig(initial_mode=MULTI), **kw)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in ad.values():
            for p in layer.task_parameters():
                p.normal_(std=0.2)
    assert model.task_router.topology == "task"
    return model, ad


def test_plain_peft_export_of_a_split_model_is_refused_for_the_per_task_export(tmp_path):
    # In MULTI/MIRROR the shared adapter rests: export_peft_adapter wrote it silently, and the checkpoint gave
    # neither task's logits (max abs diff ~0.5 on tiny GPT-2). It now points to export_task_peft_adapters.
    peft = pytest.importorskip("peft")
    from unified_lora.multitask import export_task_peft_adapters
    from unified_lora.peft_io import export_peft_adapter

    model, ad = split_gpt2()
    with pytest.raises(ValueError, match="export_task_peft_adapters"):
        export_peft_adapter(model, None, tmp_path / "plain")
    assert not (tmp_path / "plain").exists()
    assert model.task_router.topology == "task"
    export_task_peft_adapters(model, tmp_path / "tasks")  # the per-task export still runs through it
    x = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    for t in ("a", "b"):
        pm = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "tasks" / t).eval()
        with torch.no_grad(), task_context(model, t):
            torch.testing.assert_close(pm(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_of_a_split_model_is_refused_before_any_layer_changes():
    # merge_and_unload(model, rank=16) re-ranked the first layer and only then refused, at that layer's merge
    from unified_lora.peft_io import merge_and_unload

    model, ad = split_gpt2()
    before = {n: (layer.rank, layer.merged_rank) for n, layer in ad.items()}
    weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot be folded"):
        merge_and_unload(model, rank=16)
    assert {n: (layer.rank, layer.merged_rank) for n, layer in ad.items()} == before
    assert all(isinstance(model.get_submodule(n), MultiTaskNestedLoRALayer) for n in ad)
    assert all(torch.equal(p, weights[n]) for n, p in model.state_dict().items())


def test_beam_search_generation_under_task_context_says_how_to_repeat_the_ids():
    # generate(num_beams=3) runs 3 rows per prompt: one id per prompt was refused with "give one id per sample",
    # which the caller had done. The error now says how to repeat the ids, and so repeated they route each beam to
    # its prompt's task: the same tokens as generating each task's prompt alone.
    model, _ = split_gpt2()
    prompts = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, num_beams=3, num_return_sequences=3, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match=r"2 ids for a batch of 6 rows.*repeat_interleave"):
        with task_context(model, ["a", "b"]):
            model.generate(prompts, **kw)
    with task_context(model, [t for t in ["a", "b"] for _ in range(3)]):
        both = model.generate(prompts, **kw)
    alone = []
    for i, t in enumerate(["a", "b"]):
        with task_context(model, t):
            alone.append(model.generate(prompts[i:i + 1], **kw))
    assert torch.equal(both, torch.cat(alone))
    with task_context(model, "b"):
        assert not torch.equal(model.generate(prompts[:1], **kw), alone[0])  # the tasks do generate differently


def test_per_task_peft_export_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from unified_lora.multitask import export_task_peft_adapters

    data = conflict_data()
    model, ad, ctrl, opt = build(initial_mode=MULTI)
    ctrl.router.track_grads = False
    train(model, ctrl, opt, 3, data, use_ctrl=False)
    model.eval()
    # task_type=None: a plain PeftModel; the classifier (a LoRA target) is still saved whole, delta merged
    out = export_task_peft_adapters(model, tmp_path, task_type=None)
    assert set(out) == {"shared", "a", "b"}
    x = data[0]
    for t in ("a", "b"):
        pm = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / t).eval()
        with torch.no_grad(), task_context(model, t):
            torch.testing.assert_close(pm(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def headless_bert(path):
    """Save tiny_bert's encoder without a head, as a pretrained checkpoint is; returns load(seed), whose
    from_pretrained initialises the classifier afresh from that torch seed."""
    from transformers import BertForSequenceClassification

    tiny_bert().bert.save_pretrained(path)

    def load(seed):
        torch.manual_seed(seed)
        return BertForSequenceClassification.from_pretrained(str(path), num_labels=2).eval()
    return load


def test_readme_multitask_export_loads_in_peft_onto_a_fresh_head(tmp_path):
    # The README's setup: the classifier is a LoRA target (each task its own head delta) and its base is the head
    # from_pretrained initialised (the checkpoint has none). export_task_peft_adapters(model, dir) with its
    # defaults raised "modules_to_save: 'classifier.weight' has no counterpart in the model"; each task's adapter
    # must now load with plain PEFT onto a freshly loaded base (another head init) and give that task's logits.
    from peft import PeftModel

    from unified_lora.multitask import export_task_peft_adapters

    load = headless_bert(tmp_path / "base")
    model = load(1)
    _, ctrl = setup_multitask_lora(model, tasks=["sst2", "mrpc"], target_modules=TARGETS, lr_mode="off",
                                   print_fn=None, machine=MachineConfig(initial_mode=SINGLE))
    opt = torch.optim.AdamW(trainable_parameters(model), lr=2e-2)
    ctrl.attach_optimizer(opt)
    ctrl.split()  # MULTI: one adapter per task, trained apart below
    ctrl.router.track_grads = False
    x, ya, yb = conflict_data()
    ids, y, tids = torch.cat([x, x]), torch.cat([ya, yb]), ["sst2"] * N + ["mrpc"] * N
    for _ in range(3):
        with task_context(model, tids):
            F.cross_entropy(model(input_ids=ids).logits, y).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    out = export_task_peft_adapters(model, tmp_path / "out")
    assert set(out) == {"shared", "sst2", "mrpc"}
    ours = {}
    for t in ("sst2", "mrpc"):
        cfg = out[t]
        assert cfg["task_type"] == "SEQ_CLS" and "classifier" in cfg["modules_to_save"]
        assert "classifier" not in cfg["target_modules"]
        with torch.no_grad(), task_context(model, t):
            ours[t] = model(input_ids=x).logits
        fresh = load(7)
        assert not torch.equal(fresh.classifier.weight, model.classifier.base_layer.weight)  # another head init
        pm = PeftModel.from_pretrained(fresh, str(tmp_path / "out" / t)).eval()
        with torch.no_grad():
            torch.testing.assert_close(pm(input_ids=x).logits, ours[t], rtol=1e-6, atol=1e-6)
    assert (ours["sst2"] - ours["mrpc"]).abs().max() > 1e-2  # the tasks' adapters differ: each file is its own


def test_a_task_export_leaves_a_merged_bf16_model_that_unmerges_bit_for_bit(tmp_path):
    # The export unmerges the shared delta for a while and puts the merged weight back; the base weight as it was
    # before the merge (kept for bf16, see NestedLoRALayer.merge) must come back with it, or the later unmerge
    # subtracts in bf16 and moves the frozen base.
    from unified_lora.multitask import export_task_peft_adapters

    model = tiny_bert().to(torch.bfloat16)
    ad, ctrl = setup_multitask_lora(model, ["a", "b"], ["query", "value"], lr_mode="off", print_fn=None,
                                    machine=MachineConfig(initial_mode=SINGLE))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in ad.values():
            for p in layer.shared_parameters() + layer.task_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    w0 = {n: layer.base_layer.weight.detach().clone() for n, layer in ad.items()}
    for layer in ad.values():
        layer.merge()
    export_task_peft_adapters(model, tmp_path, include_shared=False, task_type=None)
    for layer in ad.values():
        layer.unmerge()
    assert all(torch.equal(layer.base_layer.weight, w0[n]) for n, layer in ad.items())


def test_task_export_of_a_merged_shared_model_writes_each_tasks_head(tmp_path):
    # A merged base weight holds the shared delta; a task's head, saved whole, must hold the base + that task's delta.
    from peft import PeftModel

    from unified_lora.multitask import export_task_peft_adapters

    load = headless_bert(tmp_path / "base")
    model = load(1)
    ad, ctrl = setup_multitask_lora(model, tasks=["a", "b"], target_modules=TARGETS, print_fn=None,
                                    machine=MachineConfig(initial_mode=SINGLE))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in ad.values():
            for p in layer.shared_parameters() + layer.task_parameters():
                p.normal_(0.0, 0.2, generator=g)
    x = conflict_data()[0]
    ctrl.router.set_topology("task")
    want = {}
    for t in ("a", "b"):
        with torch.no_grad(), task_context(model, t):
            want[t] = model(input_ids=x).logits
    ctrl.router.set_topology("shared")
    for layer in ad.values():
        layer.merge()
    merged = {n: layer.base_layer.weight.clone() for n, layer in ad.items()}
    export_task_peft_adapters(model, tmp_path / "out", include_shared=False)
    assert all(layer.merged_rank and torch.equal(layer.base_layer.weight, merged[n]) for n, layer in ad.items())
    assert (want["a"] - want["b"]).abs().max() > 1e-2
    for t in ("a", "b"):
        pm = PeftModel.from_pretrained(load(7), str(tmp_path / "out" / t)).eval()
        with torch.no_grad():
            torch.testing.assert_close(pm(input_ids=x).logits, want[t], rtol=1e-6, atol=1e-6)


def _tree(path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _train_on(adapters) -> None:
    """Training went on: the same ranks and modules, other weights."""
    with torch.no_grad():
        for layer in adapters.values():
            for p in layer.shared_parameters() + layer.task_parameters():
                p.add_(0.5)


def test_a_task_export_that_fails_part_way_leaves_the_previous_set_whole_and_no_temp_folder(tmp_path, monkeypatch):
    # export_task_peft_adapters wrote each task's folder in turn, each whole: an error at the third (a full disk) left
    # shared/ and a/ of the new export beside b/ of the previous one, a mix that loads with PEFT. The folders now go
    # into one temporary folder and are swapped in once all are whole. The set is what peft_tasks.json lists: the
    # user's files beside it, and inside a task folder, stay; so does a folder of the previous set not written again.
    import json

    import peft.peft_model

    from unified_lora.multitask import export_task_peft_adapters

    model, ad, ctrl, _ = build(initial_mode=MULTI)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    export_task_peft_adapters(model, out, task_type=None)
    (out / "a" / "vocab.txt").write_text("mine too")
    before = _tree(out)
    _train_on(ad)
    real, calls = peft.peft_model.safe_save_file, []

    def third_fails(*a, **k):  # shared, a, then b: the disk is full
        calls.append(a[1])
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*a, **k)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", third_fails)
    with pytest.raises(OSError, match="No space left"):
        export_task_peft_adapters(model, out, task_type=None)
    monkeypatch.undo()
    assert len(calls) == 3 and _tree(out) == before  # the previous set, bit for bit, and no temporary folder
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "notes.txt", "peft_tasks.json", "shared"]
    calls.clear()  # into a folder that did not exist: the failed export made it and left it behind, empty
    monkeypatch.setattr(peft.peft_model, "safe_save_file", third_fails)
    with pytest.raises(OSError, match="No space left"):
        export_task_peft_adapters(model, tmp_path / "new" / "out", task_type=None)
    monkeypatch.undo()
    assert len(calls) == 3 and not (tmp_path / "new").exists()
    export_task_peft_adapters(model, out, task_type=None)
    after = _tree(out)
    assert after["notes.txt"] == b"mine" and after["a/vocab.txt"] == b"mine too"
    assert all(after[f"{t}/adapter_model.safetensors"] != before[f"{t}/adapter_model.safetensors"]
               for t in ("shared", "a", "b"))
    assert json.loads((out / "peft_tasks.json").read_text())["folders"] == ["shared", "a", "b"]
    _train_on(ad)  # a subset: the folders of the set it does not write stay, bit for bit, and stay listed
    export_task_peft_adapters(model, out, tasks=["b"], include_shared=False, task_type=None)
    subset = _tree(out)
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "notes.txt", "peft_tasks.json", "shared"]
    assert all(subset[k] == after[k] for k in after if k.split("/")[0] in ("shared", "a"))
    assert subset["b/adapter_model.safetensors"] != after["b/adapter_model.safetensors"]
    assert json.loads((out / "peft_tasks.json").read_text())["folders"] == ["b", "shared", "a"]
    assert json.loads((out / "peft_tasks.json").read_text())["tasks"] == {"a": "a", "b": "b"}
    (out / "peft_tasks.json").write_text('{"folders": ["../elsewhere"]}')
    with pytest.raises(ValueError, match="peft_tasks.json: not the manifest export_task_peft_adapters writes"):
        export_task_peft_adapters(model, out, task_type=None)


def test_a_task_export_whose_temp_folder_or_swap_fails_leaves_no_folder_it_made_and_the_previous_set_whole(
        tmp_path, monkeypatch):
    # `tempfile.mkdtemp` and the swap of the new set into place ran outside the export's clean-up: a failure there
    # left the folder the export had made (with a .tmp- and an .old- folder in it), and a rename that failed part way
    # through the swap left the previous set half moved aside (shared/ and a/ new, b/ in .old-, no manifest). A disk
    # failure cannot be made portably, so the OS call alone is patched to raise OSError (mkdtemp; os.replace where it
    # moves one new folder in); the export's own code runs as it does.
    import tempfile

    from unified_lora.multitask import export_task_peft_adapters

    model, ad, ctrl, _ = build(initial_mode=MULTI)

    def no_temp(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(tempfile, "mkdtemp", no_temp)
    with pytest.raises(OSError, match="No space left"):
        export_task_peft_adapters(model, tmp_path / "new" / "out", task_type=None)
    monkeypatch.undo()
    assert not (tmp_path / "new").exists()

    real = os.replace

    def fails_moving_in(name: str):
        def replace(src, dst):
            if os.path.basename(os.path.dirname(src)).startswith(".tmp-") and os.path.basename(dst) == name:
                raise OSError(5, "Input/output error")
            return real(src, dst)
        return replace

    monkeypatch.setattr(os, "replace", fails_moving_in("a"))  # (shared/ went in first)
    with pytest.raises(OSError, match="Input/output error"):
        export_task_peft_adapters(model, tmp_path / "new" / "out", task_type=None)
    monkeypatch.undo()
    assert not (tmp_path / "new").exists()
    # a previous set: a failed swap (at b/, after shared/ and a/ of the new set went in) puts it back, bit for bit
    out = tmp_path / "out"
    export_task_peft_adapters(model, out, task_type=None)
    (out / "notes.txt").write_text("mine")
    before, names = _tree(out), sorted(p.name for p in out.iterdir())
    _train_on(ad)
    for subset in ({}, {"tasks": ["b"], "include_shared": False}):  # (the second keeps shared/ and a/ in the set)
        monkeypatch.setattr(os, "replace", fails_moving_in("b"))
        with pytest.raises(OSError, match="Input/output error"):
            export_task_peft_adapters(model, out, task_type=None, **subset)
        monkeypatch.undo()
        assert _tree(out) == before and sorted(p.name for p in out.iterdir()) == names, subset
    export_task_peft_adapters(model, out, task_type=None)  # and the next export goes in whole
    after = _tree(out)
    assert sorted(p.name for p in out.iterdir()) == names and after["notes.txt"] == b"mine"
    assert all(after[f"{t}/adapter_model.safetensors"] != before[f"{t}/adapter_model.safetensors"]
               for t in ("shared", "a", "b"))


def test_a_task_export_refuses_a_file_where_a_task_folder_goes_and_a_task_named_like_its_manifest(tmp_path):
    # The set swap moves what is under a task folder's name aside and deletes it: a file of the user's there is
    # refused before anything is written, and so is a task id whose folder would be the manifest.
    from unified_lora.multitask import export_task_peft_adapters

    model, ad, ctrl, _ = build(initial_mode=MULTI)
    (tmp_path / "b").write_text("mine")
    with pytest.raises(ValueError, match=r"/b: is a file, not a folder"):
        export_task_peft_adapters(model, tmp_path, task_type=None)
    assert [p.name for p in tmp_path.iterdir()] == ["b"] and (tmp_path / "b").read_text() == "mine"
    model, ad, ctrl, _ = build(initial_mode=MULTI, tasks=("a", "peft_tasks.json"))
    with pytest.raises(ValueError, match="over the manifest peft_tasks.json"):
        export_task_peft_adapters(model, tmp_path / "out", task_type=None)
    assert not (tmp_path / "out").exists()


def test_a_task_export_killed_during_its_swap_is_finished_by_the_next_export(tmp_path):
    # The swap moves each folder of the previous set aside, then the new one in, the manifest last. A SIGKILL in
    # between (here right after the new a/ went in: shared/ and a/ new, b/ old) leaves a mix; the next export into the
    # folder on this host finishes the swap first (the new set was written whole before it began), then writes its
    # own. The kill is real: the child process kills itself (SIGKILL) right after that rename.
    import json
    import signal
    import subprocess
    import sys

    from unified_lora.multitask import _settle_task_exports, export_task_peft_adapters

    out = tmp_path / "out"
    child = tmp_path / "killed_mid_swap.py"
    child.write_text(
        "import os, signal, sys\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "from test_multitask import MULTI, _train_on, build\n"
        "from unified_lora.multitask import export_task_peft_adapters\n"
        "model, ad, ctrl, _ = build(initial_mode=MULTI)\n"
        "export_task_peft_adapters(model, sys.argv[1], task_type=None)\n"
        "open(os.path.join(sys.argv[1], 'notes.txt'), 'w').write('mine')\n"
        "_train_on(ad)\n"
        "real = os.replace\n"
        "def replace(src, dst):\n"
        "    real(src, dst)\n"
        "    if os.path.basename(os.path.dirname(src)).startswith('.tmp-') and os.path.basename(dst) == 'a':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.replace = replace\n"
        "export_task_peft_adapters(model, sys.argv[1], task_type=None)\n")
    p = subprocess.run([sys.executable, str(child), str(out)], stderr=subprocess.PIPE, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    tmp = next(out.glob(".tmp-*"))
    assert sorted(n.name.split("-")[0] for n in out.iterdir() if n.name.startswith(".")) == [".old", ".tmp"]
    assert not (out / "peft_tasks.json").exists() and sorted(n.name for n in tmp.iterdir()) == ["b", "peft_tasks.json"]
    new = {**{k: v for k, v in _tree(out).items() if k.split("/")[0] in ("shared", "a", "notes.txt")}, **_tree(tmp)}
    _settle_task_exports(str(out))  # what the next export does first
    assert _tree(out) == new and not [n for n in out.iterdir() if n.name.startswith(".")]
    model, ad, ctrl, _ = build(initial_mode=MULTI)
    export_task_peft_adapters(model, out, tasks=["a"], task_type=None)
    assert sorted(n.name for n in out.iterdir()) == ["a", "b", "notes.txt", "peft_tasks.json", "shared"]
    assert json.loads((out / "peft_tasks.json").read_text())["tasks"] == {"a": "a", "b": "b"}


def test_one_task_per_batch_uses_task_id_and_still_sees_the_conflict():
    x, ya, yb = conflict_data()
    model, ad, ctrl, opt = build(grad_noise="debias")  # (its first-step reads are the debiased reading's)
    for group in opt.param_groups:
        # (at build's 2e-2 each task's gradient turns a lot between its own steps, every other one, on this tiny model:
        # its reliability ρ reads 0.2-0.4, and so does C)
        group["lr"] = 2e-3
    for step in range(12):
        t, y = ("a", ya) if step % 2 == 0 else ("b", yb)
        with task_context(model, t):
            loss = F.cross_entropy(model(input_ids=x).logits, y)
        loss.backward()
        ctrl.step(loss, task_id=t)
        opt.step()
        opt.zero_grad()
    assert ctrl.trace[0].components["C_grad"] is None  # one task seen so far
    assert ctrl.trace[1].components["C_grad_raw"] > 0.9  # per-task gradient EMAs point against each other
    assert ctrl.trace[2].components["C_grad"] is None  # b's reliability ρ is told from its second step on
    assert ctrl.trace[3].components["C_grad"] > 0.9
    assert set(ctrl.signal.E) == {"a", "b"}
    assert any(r.transition == "SINGLE->MULTI" for r in ctrl.trace)
    with pytest.raises(ValueError, match="task id 'zz' is not registered"):
        ctrl.step(loss, task_losses={"zz": 1.0})


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_non_finite_task_gradient_is_skipped_as_if_it_never_happened(bad):
    """A step whose task gradient holds an inf/NaN (one GradScaler skips) is flagged non-finite and changes no signal
    state: the gradient EMAs, E, the differences and φ go on exactly as in a run without that step. (Before, the
    inf entered the task's gradient EMA for good, every later conflict was NaN and C fell to 0.)"""
    data = conflict_data()
    ids, y, tids = mixed_batch(*data)

    def step(model, ctrl, opt, poison=None):
        with task_context(model, tids):
            per = F.cross_entropy(model(input_ids=ids).logits, y, reduction="none")
        per.mean().backward()
        if poison is not None:
            layer, slot = ctrl.adapters[0], ctrl._slots()[0]
            layer.lora_tasks[slot].lora_A[0].grad[0, 0] = poison
        ctrl.step(per.mean(), task_losses=per_task_losses(per, tids))
        if poison is None:
            opt.step()
        opt.zero_grad()

    traces = []
    for insert in (False, True):
        torch.manual_seed(0)
        model, _, ctrl, opt = build(initial_mode=MULTI, phi_init=0.5)
        assert ctrl.router.topology == "task"
        for i in range(10):
            if insert and i == 5:
                with torch.random.fork_rng():  # the skipped step's dropout draws leave the other steps' alone
                    step(model, ctrl, opt, poison=bad)
                assert ctrl.trace[-1].nonfinite and ctrl.nonfinite_steps == 1
            step(model, ctrl, opt)
        assert all(math.isfinite(v) for r in ctrl.trace for k, v in r.components.items()
                   if k in ("C", "E", "S", "phi_raw") and v is not None)
        traces.append([r for r in ctrl.trace if not r.nonfinite])
    clean, skipped = traces
    assert len(clean) == len(skipped) == 10
    for a, b in zip(clean, skipped):
        assert (a.mode, a.phi, a.rank) == (b.mode, b.phi, b.rank)
        assert {k: v for k, v in a.components.items() if k != "event"} == \
               {k: v for k, v in b.components.items() if k != "event"}
    assert len({r.phi for r in clean}) > 3  # φ moved: the comparison means something


def test_a_refused_state_leaves_the_task_router_as_it_was():
    data = conflict_data()
    m1, _, c1, o1 = build(initial_mode=MULTI, phi_init=0.5)
    train(m1, c1, o1, 2, data)
    assert c1.router.topology == "task"
    model = tiny_bert()  # the same tasks, other targets: the state does not fit
    _, c2 = setup_multitask_lora(model, ["a", "b"], ["query"], lr_mode="off", print_fn=None,
                                 machine=MachineConfig(initial_mode=SINGLE))
    before = (c2.router.topology, dict(c2.router.slots))
    with pytest.raises(ValueError, match="nothing was loaded"):
        c2.load_state_dict(c1.state_dict())
    assert (c2.router.topology, dict(c2.router.slots)) == before == ("shared", before[1])


def test_a_single_task_state_is_refused_by_name_and_the_state_dict_is_a_copy():
    """A single-task `ctrl.state_dict()` (no "multitask" part) given to a MultiTaskController raised a bare
    KeyError('multitask'); now a ValueError says which controller saved it, and nothing is loaded. The state's
    per-task gradient EMAs and drift reference were the controller's own tensors on the CPU (`.cpu()` returns the
    tensor): editing the returned state edited the controller."""
    from unified_lora import setup_unified_lora
    _, single = setup_unified_lora(tiny_bert(), ["query"], print_fn=None)
    m1, _, c1, o1 = build(initial_mode=MULTI, phi_init=0.5)
    train(m1, c1, o1, 2, conflict_data())
    assert c1.grad_ema and c1._ref
    before = copy.deepcopy(c1.state_dict())
    with pytest.raises(ValueError, match="no 'multitask' part: it was saved by a single-task UnifiedController"):
        c1.load_state_dict(single.state_dict())
    sd = c1.state_dict()
    with torch.no_grad():
        for t in [*sd["multitask"]["grad_ema"].values(), *sd["multitask"]["ref"]]:
            t.add_(1.0)
    sd["multitask"]["merge_log"].append({"step": -1})
    after = c1.state_dict()["multitask"]
    assert all(torch.equal(after["grad_ema"][s], g) for s, g in before["multitask"]["grad_ema"].items())
    assert all(torch.equal(a, b) for a, b in zip(after["ref"], before["multitask"]["ref"]))
    assert after["merge_log"] == before["multitask"]["merge_log"]


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_forward_with_the_task_ids(reentrant):
    # Checkpointing re-runs each layer's forward inside loss.backward(). With backward outside the task_context
    # (the README's loop), MULTI raised "no task ids set" (as if the user had forgotten the context) and SINGLE
    # either failed in torch's checkpoint (non-reentrant) or silently lost the per-task gradients that drive the
    # split (reentrant). Now that is a ValueError naming the cause; with backward inside the context, the
    # gradients and the per-task gradients match a run without checkpointing.
    x, tids = torch.randint(1, VOCAB, (4, 6)), ["a", "b", "a", "b"]
    for mode in (SINGLE, MULTI):
        model = tiny_llama().train()
        ad, ctrl = setup_multitask_lora(model, ["a", "b"], ["q_proj", "v_proj"], print_fn=None, lr_mode="off",
                                        machine=MachineConfig(initial_mode=mode))
        assert ctrl.router.topology == ("shared" if mode == SINGLE else "task") and ctrl.router.track_grads
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in ad.values():
                for p in layer.shared_parameters() + layer.task_parameters():
                    p.normal_(0.0, 0.1, generator=g)

        def grads(checkpointing, backward_inside=True):
            if not checkpointing:
                getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
            elif hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.zero_grad(set_to_none=True)
            for layer in ad.values():
                layer._task_grads = {}
            with task_context(model, tids):
                loss = model(input_ids=x, labels=x).loss
                if backward_inside:
                    loss.backward()
            if not backward_inside:
                loss.backward()
            return ([p.grad for p in trainable_parameters(model)],
                    [layer._task_grads.get(s, [None, None]) for layer in ad.values() for s in (0, 1)])

        with pytest.raises(ValueError, match="re-run during backward.*inside the same `with task_context"):
            grads(True, backward_inside=False)
        plain, plain_tasks = grads(False)
        ckpt, ckpt_tasks = grads(True)
        assert sum(g is not None for g in plain) > 0
        for a, b in zip(plain + [g for pair in plain_tasks for g in pair], ckpt + [g for pair in ckpt_tasks for g in pair]):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert all(g is not None for pair in plain_tasks for g in pair) is (mode == SINGLE)


@pytest.mark.parametrize("tasks", [["shared", "x"], ["a b", "a_b"], [1, "1"]])
def test_task_export_refuses_ids_that_share_a_folder(tmp_path, tasks):
    # Each task's PEFT checkpoint goes to save_dir/<id with odd characters replaced>. A task named "shared", or two
    # ids that map to one name, used to be written one over the other, silently: a task's adapter was lost.
    from unified_lora.multitask import export_task_peft_adapters

    model, ad, ctrl, _ = build(initial_mode=MULTI, tasks=tasks)
    with pytest.raises(ValueError, match="same folder"):
        export_task_peft_adapters(model, tmp_path / "out", task_type=None)
    assert not (tmp_path / "out").exists()  # refused before anything was written
    out = export_task_peft_adapters(model, tmp_path / "one", tasks=[tasks[0]], include_shared=False, task_type=None)
    assert list(out) == [str(tasks[0]).replace(" ", "_")]
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted([*out, "peft_tasks.json"])


def test_exports_and_task_deltas_never_register_an_unknown_task(tmp_path):
    # With register_new_tasks=True, export_task_peft_adapters(tasks=["typo"]) and delta_weight(task="typo") took a
    # spare slot for the typo and exported or returned a copy of the shared adapter.
    from unified_lora.multitask import export_task_peft_adapters

    model, ad, ctrl, _ = build(initial_mode=MULTI, register_new_tasks=True, spare_slots=1)
    with pytest.raises(ValueError, match=r"task id 'typo' is not registered; known task ids: \['a', 'b'\]"):
        export_task_peft_adapters(model, tmp_path, tasks=["a", "typo"], task_type=None)
    with pytest.raises(ValueError, match="task id 'typo' is not registered"):
        ad["classifier"].delta_weight(task="typo")
    assert ctrl.router.slots == {"a": 0, "b": 1} and not any(tmp_path.iterdir())


def _randomize(adapters, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapters.values():
            for p in layer.shared_parameters() + layer.task_parameters():
                p.normal_(0.0, 0.2, generator=g)


def test_load_task_adapters_into_a_merged_model_gives_the_saved_outputs_and_keeps_the_base(tmp_path):
    # The loaded blocks were written under a base weight that still held the old shared delta: the outputs were the
    # old adapter's, and a later unmerge subtracted the new delta from it, corrupting the base weight for good.
    x = conflict_data()[0]
    m1, ad1, _, _ = build(initial_mode=SINGLE)
    _randomize(ad1, 1)
    save_task_adapters(m1, tmp_path)
    m2, ad2, _, _ = build(initial_mode=SINGLE)
    _randomize(ad2, 2)
    base = {n: layer.base_layer.weight.clone() for n, layer in ad2.items()}
    for layer in ad2.values():
        layer.merge()
    load_task_adapters(m2, tmp_path)
    assert all(layer.merged_rank for layer in ad2.values())  # merged again: the saved topology is the shared one
    with torch.no_grad():
        torch.testing.assert_close(m2(input_ids=x).logits, m1(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    for n, layer in ad2.items():
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, base[n], rtol=0, atol=1e-6)


def test_load_task_adapters_checks_everything_before_writing(tmp_path):
    # A file saved with another lora_alpha loaded silently (other outputs), one with a larger max_rank was silently
    # cut to this layer's blocks, and an unknown task id failed after the shared adapter had been overwritten.
    m1, ad1, _, _ = build(initial_mode=MULTI, tasks=("a", "b", "c"))
    _randomize(ad1, 1)
    save_task_adapters(m1, tmp_path / "abc")
    m2, ad2, _, _ = build(initial_mode=MULTI, lora_alpha=32.0)
    save_task_adapters(m2, tmp_path / "alpha32")
    m3, ad3, _, _ = build(initial_mode=MULTI, rank_levels=(4, 8, 16, 32))
    save_task_adapters(m3, tmp_path / "r32")
    model, ad, ctrl, _ = build(initial_mode=MULTI)
    _randomize(ad, 3)
    before = [p.detach().clone() for p in trainable_parameters(model)]
    for d, msg in (("alpha32", "lora_alpha=32"), ("r32", r"rank levels \(4, 8, 16, 32\)"),
                   ("abc", r"task id 'c' .* is not registered")):
        with pytest.raises(ValueError, match=msg):
            load_task_adapters(model, tmp_path / d)
    assert all(torch.equal(b, p) for b, p in zip(before, trainable_parameters(model)))
    assert ctrl.router.slots == {"a": 0, "b": 1}


def test_per_task_losses_and_step_refuse_per_sample_shapes_they_cannot_read():
    # A mean-reduced loss, or fewer losses than ids, was a bare torch RuntimeError ("shape '[16, -1]' is invalid
    # for input of size 1"); ctrl.step(loss, task_id=<one id per sample>) was "unhashable type: 'list'".
    per, ids = torch.arange(8.0), ["a", "b"] * 4
    assert per_task_losses(per, ids) == {"a": 3.0, "b": 4.0}
    assert per_task_losses(per.reshape(4, 2), ["a", "b", "b", "a"]) == {"a": 3.5, "b": 3.5}  # rows of per-token losses
    assert per_task_losses(per, torch.tensor([[0], [1]] * 4)) == {0: 3.0, 1: 4.0}
    assert per_task_losses(per, torch.tensor(1)) == {1: 3.5}
    for loss, tids in ((per.mean(), ids), (per[:5], ids), (per, [])):
        with pytest.raises(ValueError, match=r"per_task_losses: \d+ loss values for \d+ task ids"):
            per_task_losses(loss, tids)
    x, ya, yb = conflict_data()
    model, ad, ctrl, opt = build(initial_mode=MULTI, phi_init=0.5)
    with task_context(model, ["a", "b"] * (N // 2)):
        loss = F.cross_entropy(model(input_ids=x).logits, ya)
    loss.backward()
    for bad in (["a", "b"] * (N // 2), torch.zeros(N, dtype=torch.long)):
        with pytest.raises(ValueError, match="task_id= is one id for the whole batch"):
            ctrl.step(loss, task_id=bad)
    assert ctrl.global_step == 0
    ctrl.step(loss, task_id="a")
    assert ctrl.global_step == 1


def test_a_forward_outside_task_context_in_single_is_an_error_not_a_silent_missing_conflict():
    # In MULTI a forward without task ids raises; in SINGLE it ran the shared adapter, no per-task gradient was
    # captured, and with task losses given the gradient conflict stayed None for good: the controller never split
    # (40 steps of opposite labels stayed in SINGLE). It is now a ValueError, before the step counts.
    x, ya, yb = conflict_data()
    ids, y, tids = torch.cat([x, x]), torch.cat([ya, yb]), ["a"] * N + ["b"] * N
    model, ad, ctrl, opt = build()
    assert ctrl.router.topology == "shared"
    per = F.cross_entropy(model(input_ids=ids).logits, y, reduction="none")  # no task_context
    per.mean().backward()
    for kw in ({"task_losses": per_task_losses(per, tids)}, {"task_id": "a"}):
        with pytest.raises(ValueError, match="forward ran outside `with task_context"):
            ctrl.step(per.mean(), **kw)
    assert ctrl.global_step == 0 and not ctrl.trace
    ctrl.step(per.mean())  # no task information at all: one pseudo-task, as before
    assert ctrl.global_step == 1


@pytest.mark.parametrize("mode", [SINGLE, MULTI])
def test_a_task_loss_for_a_task_the_forward_was_not_routed_as_is_refused_naming_both(mode):
    """ctrl.step(loss, task_id="b") after a forward routed as task "a" was accepted: b's error term got the loss
    while a's gradient was captured (SINGLE) or trained a's adapter (MULTI). The ids the router routed since the last
    step are checked against those given, before the step counts. Legitimate uses pass: per-task losses of a mixed
    batch, several task contexts before one step, a task with no loss given, an evaluation routed as another task."""
    x, ya, yb = conflict_data()
    model, ad, ctrl, opt = build(initial_mode=mode, phi_init=0.5)

    def backward(task_ids, y):
        with task_context(model, task_ids):
            per = F.cross_entropy(model(input_ids=x).logits, y, reduction="none")
        per.mean().backward()
        return per

    per = backward("a", ya)
    for kw, given in (({"task_id": "b"}, "'b'"), ({"task_losses": {"b": per.mean()}}, "'b'"),
                      ({"task_losses": {"a": per.mean(), "b": per.mean()}}, "'b'")):
        with pytest.raises(ValueError, match=rf"^ctrl\.step: a loss is given for task {given}, but the forwards "
                                             r"since the last ctrl\.step were routed as task 'a' \(task_context\)"
                                             r"[^\n]*per_task_losses\(per_sample_loss, task_ids\)$"):
            ctrl.step(per.mean(), **kw)
        per = backward("a", ya)  # (a refused step took the routed ids: a retry routes again)
    assert ctrl.global_step == 0 and not ctrl.trace
    ctrl.step(per.mean(), task_id="a")
    opt.zero_grad()
    # one mixed batch: per-task losses of the ids it was routed with (a task with no loss given is fine)
    per = backward(["a", "b"] * (N // 2), ya)
    ctrl.step(per.mean(), task_losses=per_task_losses(per, ["a", "b"] * (N // 2)))
    opt.zero_grad()
    backward(["a"] * N, ya)
    ctrl.step(per.mean(), task_losses={"a": 0.7})
    opt.zero_grad()
    # two task contexts (gradient accumulation) before one step, and an evaluation of b in between
    pa = backward("a", ya)
    with torch.no_grad(), task_context(model, "b"):
        model(input_ids=x)
    pb = backward("b", yb)
    ctrl.step((pa.mean() + pb.mean()) / 2, task_losses={"a": pa.mean(), "b": pb.mean()})
    opt.zero_grad()
    # ... and the ids routed by the last step are not this step's: b routed then, a alone now
    backward("a", ya)
    with pytest.raises(ValueError, match=r"^ctrl\.step: a loss is given for task 'b', .* routed as task 'a' "):
        ctrl.step(pa.mean(), task_id="b")
    assert ctrl.global_step == 4


def test_a_negative_task_loss_is_refused_before_any_signal_state_moves():
    """E_t/(1+E_t) leaves [0, 1] for a negative loss (as the v1 signal's D does), so φ could go far below 0."""
    sig = MultiTaskSignal()
    sig.update(0.5, {"a": 0.4, "b": 0.6}, 0.1, None, 0.0)
    before = sig.state_dict()
    with pytest.raises(ValueError, match=r"^task loss: the v1 loss signal needs a loss >= 0.*got -0\.2"):
        sig.update(0.5, {"a": -0.2, "b": 0.6}, 0.1, None, 0.0)
    with pytest.raises(ValueError, match=r"^loss: the v1 loss signal needs a loss >= 0"):
        sig.update(-0.5, None, 0.1, None, 0.0)
    assert sig.state_dict() == before
    model, _, ctrl, opt = build()
    x, ya, yb = conflict_data()
    train(model, ctrl, opt, 1, (x, ya, yb))
    ema = {s: g.clone() for s, g in ctrl.grad_ema.items()}
    ids, y, tids = mixed_batch(x, ya, yb)
    with task_context(model, tids):
        per = F.cross_entropy(model(input_ids=ids).logits, y, reduction="none")
    per.mean().backward()
    with pytest.raises(ValueError, match="^task loss: "):
        ctrl.step(per.mean(), task_losses={"a": -1.0, "b": 0.5})
    assert all(torch.equal(ema[s], g) for s, g in ctrl.grad_ema.items()) and ctrl.global_step == 1


def test_a_multitask_setup_that_fails_leaves_the_model_as_it_was():
    """As setup_unified_lora: an error after injection (here the controller refusing its merge rule) used to
    leave the layers wrapped, and the corrected call failed with "already has nested LoRA layers"."""
    model = tiny_bert()
    modules = dict(model.named_modules())
    with pytest.raises(ValueError, match="^merge_rule: must be one of"):
        setup_multitask_lora(model, ["a", "b"], TARGETS, merge_rule="average", lr_mode="off", print_fn=None)
    assert dict(model.named_modules()) == modules and all(p.requires_grad for p in model.parameters())
    adapters, _ = setup_multitask_lora(model, ["a", "b"], TARGETS, lr_mode="off", print_fn=None)
    assert all(isinstance(a, MultiTaskNestedLoRALayer) for a in adapters.values())


def test_a_huge_task_loss_over_a_small_loss_scale_keeps_phi_finite():
    # loss / loss_scale overflowed to inf: E = inf, D = inf/inf = NaN, and the NaN φ stopped the run at the
    # machine. It is capped as the v1 signal's is, so φ stays a number and comes back down.
    sig = MultiTaskSignal(MultiTaskSignalConfig(loss_scale=1e-10))
    phis = [sig.update(1e300, {"a": 1e300, "b": 0.5})] + [sig.update(0.5, {"a": 0.5, "b": 0.5}) for _ in range(5)]
    assert all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in phis)


def _run_to_mirror_exit(model, ctrl, opt, tasks_at, steps=40):
    """Train on `conflict_data` with the controller until its first MIRROR->MULTI exit; `tasks_at(i)` lists the
    tasks of step i (one copy of the inputs each, task "c" with "a"'s labels). Returns {step: (transition, task
    adapters' weights after ctrl.step)} for the steps with a transition or a new task, and the exit record."""
    x, ya, yb = conflict_data()
    labels = {"a": ya, "b": yb, "c": ya}
    seen, out = set(), {}
    for i in range(steps):
        tasks = tasks_at(i)
        ids, y = torch.cat([x] * len(tasks)), torch.cat([labels[t] for t in tasks])
        tids = [t for t in tasks for _ in range(len(x))]
        with task_context(model, tids):
            per = F.cross_entropy(model(input_ids=ids).logits, y, reduction="none")
        per.mean().backward()
        ctrl.step(per.mean(), task_losses=per_task_losses(per, tids))
        rec = ctrl.trace[-1]
        if rec.transition or set(tasks) - seen:
            out[i] = (rec.transition, {t: [p.detach().clone() for a in ctrl.adapters
                                            for p in a.task_parameters(ctrl.router.slots[t])] for t in tasks})
        seen |= set(tasks)
        if rec.transition == "MIRROR->MULTI":
            return out, rec
        opt.step()
        opt.zero_grad()
    raise AssertionError("no Mirror exit")


@pytest.mark.parametrize("spare_slots", [0, 3])
def test_mirror_exit_drift_runs_over_the_registered_task_adapters_whatever_the_spare_slots(spare_slots):
    # The drift summed over the shared adapter (which rests in MIRROR) and the spare slots (no task's) too: with
    # two tasks it came out at 2/3 of the task adapters' drift, and at 1/3 with three spare slots, so a slot
    # pre-allocated for later tasks changed the rollback decision.
    from unified_lora import MirrorConfig

    model, ad, ctrl, opt = build(initial_mode=MULTI, phi_init=0.9, spare_slots=spare_slots,
                                 mirror=MirrorConfig(policy="never"))
    events, rec = _run_to_mirror_exit(model, ctrl, opt, lambda i: ["a", "b"])
    assert events[0][0] == "MULTI->MIRROR" and ctrl.trace[0].snapshot == "saved"
    entry = [w for t in ("a", "b") for w in events[0][1][t]]  # the task adapters as the snapshot took them
    now = [p for s in (0, 1) for a in ad.values() for p in a.task_parameters(s)]  # (same order)
    expected = sum((p - w).norm().item() for p, w in zip(now, entry)) / sum(w.norm().item() for w in entry)
    assert rec.snapshot == "kept" and rec.drift == pytest.approx(expected, rel=1e-5)


def test_a_task_registered_during_mirror_comes_back_from_a_rollback_as_the_copy_it_started_as():
    # The snapshot held a spare slot as it was built (a copy of the initial shared adapter: B = 0). A task that
    # registered in MIRROR took that slot as a copy of the trained shared adapter, and a rollback then reset it to
    # the zero delta: a cold start, while the shared adapter and the other tasks kept what they had learned.
    from unified_lora import MirrorConfig

    model, ad, ctrl, opt = build(initial_mode=SINGLE, phi_init=0.9, spare_slots=1, register_new_tasks=True,
                                 mirror=MirrorConfig(policy="always", snapshot_optimizer=True))
    train(model, ctrl, opt, 5, conflict_data(), use_ctrl=False)  # the shared adapter learns (SINGLE topology)
    events, rec = _run_to_mirror_exit(model, ctrl, opt, lambda i: ["a", "b", "c"] if i >= 3 else ["a", "b"])
    assert [events[i][0] for i in (0, 1)] == ["SINGLE->MULTI", "MULTI->MIRROR"] and 3 in events
    assert rec.snapshot == "restored"
    c = ctrl.router.slots["c"]
    started = events[3][1]["c"]  # its adapter right after it registered: the shared one's copy
    assert all(torch.equal(s, p) for s, p in zip(started, [p for a in ad.values() for p in a.shared_parameters()]))
    assert any(s.abs().sum() > 0 for s in started[3::6])  # a trained shared B: not the initial zero delta
    back = [p for a in ad.values() for p in a.task_parameters(c)]
    assert all(torch.equal(s, p) for s, p in zip(started, back))
    assert all(p not in opt.state for p in back)  # no optimizer state, as at its registration


@pytest.mark.parametrize("scenario", ["conflict", "agree"])
def test_spare_slots_leave_the_signal_and_the_mode_trajectory_unchanged(scenario):
    # S's drift summed every LoRA block: the shared adapter, each task's and the spare slots', though in SINGLE
    # only the shared adapter trains, in MULTI/MIRROR only the registered tasks' adapters, and a spare slot never.
    # Pre-allocated slots shrank S, and with it φ: on the conflict data the first MIRROR exit came at step 11
    # without spare slots and at step 10 with three. "agree" (both tasks on one labelling) stays in SINGLE.
    x, ya, yb = conflict_data()
    data = (x, ya, yb) if scenario == "conflict" else (x, ya, ya)
    init = MULTI if scenario == "conflict" else SINGLE
    runs = {}
    for spare in (0, 3):
        model, ad, ctrl, opt = build(initial_mode=init, phi_init=0.9 if scenario == "conflict" else 0.0,
                                     spare_slots=spare)
        shared0 = [p.detach().clone() for a in ad.values() for p in a.shared_parameters()]
        train(model, ctrl, opt, 25, data)
        runs[spare] = [(r.mode, r.transition, r.phi, r.components["S"]) for r in ctrl.trace]
    assert runs[0] == runs[3]  # bit-identical: same weights, and S reads none of the spare slots
    modes = {m for m, *_ in runs[0]}
    if scenario == "conflict":
        # (it left MIRROR at step 11 too while the weight conflict read the adapters' independent moves as full
        # conflict; the flipped labels' cancelling moves now hold C up in MIRROR. S and φ, compared above, still
        # differ with the spare slots in S's sum)
        assert [t for _, t, *_ in runs[0] if t][:1] == ["MULTI->MIRROR"] and MIRROR in modes
    else:  # in SINGLE, S is the shared adapter's drift (the task slots are frozen copies there)
        assert modes == {SINGLE} and ctrl.router.topology == "shared"
        # no transition, so S's reference is still the shared adapter as built
        now = [p for a in ad.values() for p in a.shared_parameters()]
        want = sum((p - w).norm().item() for p, w in zip(now, shared0)) / sum(w.norm().item() for w in shared0)
        assert want > 0.05 and ctrl._drift() == pytest.approx(want, rel=1e-5)


def test_a_task_registered_in_multi_is_measured_from_the_copy_it_started_as():
    # A task registered between two transitions joins S's drift from its registration copy of the shared adapter;
    # S's reference held the spare slot's value at the last transition (here its initial B = 0), so the new
    # task counted as a jump in drift it never made. A state saved between a registration and the next step
    # resumes with the same reference.
    x, ya, yb = conflict_data()
    labels = {"a": ya, "b": yb, "c": ya}

    def step(model, ctrl, tasks):
        ids, y = torch.cat([x] * len(tasks)), torch.cat([labels[t] for t in tasks])
        tids = [t for t in tasks for _ in range(len(x))]
        with task_context(model, tids):  # registers "c" (register_new_tasks=True)
            per = F.cross_entropy(model(input_ids=ids).logits, y, reduction="none")
        per.mean().backward()
        ctrl.step(per.mean(), task_losses=per_task_losses(per, tids))

    model, ad, ctrl, opt = build(initial_mode=SINGLE, phi_init=0.5, spare_slots=1, register_new_tasks=True)
    train(model, ctrl, opt, 5, conflict_data(), use_ctrl=False)  # the shared adapter learns (SINGLE topology)
    for i in range(3):
        step(model, ctrl, ["a", "b"])
        if i == 0:  # the split: S's reference is taken now
            assert ctrl.trace[-1].transition == "SINGLE->MULTI"
            ref = [p.detach().clone() for a in ad.values() for s in (0, 1) for p in a.task_parameters(s)]
        opt.step()
        opt.zero_grad()
    m2, _, c2, o2 = build(initial_mode=SINGLE, phi_init=0.5, spare_slots=1, register_new_tasks=True)
    for dst, src in ((m2, model), (c2, ctrl), (o2, opt)):
        dst.load_state_dict(src.state_dict())
    c2.router.register_task("c")  # by hand, then saved and resumed before the next step
    m3, _, c3, o3 = build(initial_mode=SINGLE, phi_init=0.5, spare_slots=1, register_new_tasks=True)
    for dst, src in ((m3, m2), (c3, c2), (o3, o2)):
        dst.load_state_dict(src.state_dict())
    step(model, ctrl, ["a", "b", "c"])
    step(m3, c3, ["a", "b", "c"])
    assert [r.transition for r in ctrl.trace[1:]] == [None] * 3 and ctrl.router.slots["c"] == 2
    now = [p for a in ad.values() for s in (0, 1) for p in a.task_parameters(s)]
    c_now = [p for a in ad.values() for p in a.task_parameters(2)]
    shared = [p for a in ad.values() for p in a.shared_parameters()]  # rests in MULTI: c's registration copy
    assert all(torch.equal(p, w) for p, w in zip(c_now, shared))
    assert any(w.abs().sum() > 0 for w in shared[3::6])  # a trained shared B, not the spare slot's zero
    num = sum((p - w).norm().item() for p, w in zip(now, ref))
    den = sum(w.norm().item() for w in ref) + sum(w.norm().item() for w in c_now)
    assert num > 0 and ctrl.trace[-1].components["drift"] == pytest.approx(num / den, rel=1e-5)
    assert (c3.trace[-1].phi, c3.trace[-1].components["drift"]) == (ctrl.trace[-1].phi,
                                                                    ctrl.trace[-1].components["drift"])


def test_load_task_adapters_refuses_a_folder_with_layers_this_model_does_not_adapt(tmp_path):
    # A folder saved from a model with more target modules (here "key" too) loaded into one without them: the extra
    # layers' tensors were skipped silently, so the model ran without part of every trained adapter.
    model = tiny_bert()
    ad1, _ = setup_multitask_lora(model, ["a", "b"], TARGETS + ["key"], print_fn=None,
                                  machine=MachineConfig(initial_mode=MULTI))
    _randomize(ad1, 1)
    save_task_adapters(model, tmp_path)
    m2, ad2, ctrl, _ = build(initial_mode=MULTI)
    before = [p.detach().clone() for p in trainable_parameters(m2)]
    with pytest.raises(ValueError, match=r"shared.safetensors: adapters for 2 layer\(s\) this model has no multi-task "
                                         r"adapter on: \['bert.encoder.layer.0.attention.self.key', .*same "
                                         r"target_modules"):
        load_task_adapters(m2, tmp_path)
    assert all(torch.equal(b, p) for b, p in zip(before, trainable_parameters(m2)))  # refused before any write


@pytest.mark.parametrize("tid", ["..", ".", ""])
def test_task_export_never_writes_a_task_named_with_dots_outside_its_own_folder(tmp_path, tid):
    # The folder of task ".." was save_dir/.., so its checkpoint landed beside save_dir; "." and "" wrote theirs
    # into save_dir itself, beside the other tasks' folders.
    from unified_lora.multitask import export_task_peft_adapters

    model, ad, ctrl, _ = build(initial_mode=MULTI, tasks=("a", tid))
    out = export_task_peft_adapters(model, tmp_path / "out", task_type=None)
    name = "_" * max(len(tid), 1)
    assert os.listdir(tmp_path) == ["out"] and sorted(os.listdir(tmp_path / "out")) == sorted(["shared", "a", name,
                                                                                               "peft_tasks.json"])
    assert list(out) == ["shared", "a", name]
    assert (tmp_path / "out" / name / "adapter_model.safetensors").is_file()
    save_task_adapters(model, tmp_path / "saved")  # task-<slot>-<name>: a file of its own, loaded back by its id
    m2, _, _, _ = build(initial_mode=MULTI, tasks=("a", tid))
    load_task_adapters(m2, tmp_path / "saved")


def test_a_controller_refuses_to_train_adapters_of_another_topology_than_its_mode(tmp_path):
    # load_task_adapters restores the saved topology. A folder saved in SINGLE loaded under a controller in MULTI (the
    # default initial mode) ran the shared adapter while the controller trained "task adapters"; its next merge
    # overwrote the loaded shared adapter with the mean of the untouched task copies: the loaded weights were gone.
    x, ya, yb = conflict_data()
    ids, y, tids = mixed_batch(x, ya, yb)
    m1, ad1, _, _ = build(initial_mode=SINGLE)
    _randomize(ad1, 1)
    save_task_adapters(m1, tmp_path)
    model, ad, ctrl, opt = build(initial_mode=MULTI)
    load_task_adapters(model, tmp_path)
    assert ctrl.mode == MULTI and ctrl.router.topology == "shared"
    with task_context(model, tids):
        per = F.cross_entropy(model(input_ids=ids).logits, y, reduction="none")
    per.mean().backward()
    before = [p.detach().clone() for p in trainable_parameters(model)]
    with pytest.raises(ValueError, match=r"topology 'shared'\), but this controller is in MULTI.*"
                                         r"initial_mode=SINGLE"):
        ctrl.step(per.mean(), task_losses=per_task_losses(per, tids))
    assert ctrl.global_step == 0 and not ctrl.trace and ctrl.mode == MULTI  # refused before anything moved
    assert all(torch.equal(b, p) for b, p in zip(before, trainable_parameters(model)))
    # under a controller in the folder's mode, the loaded adapter trains on
    model, ad, ctrl, opt = build(initial_mode=SINGLE)
    load_task_adapters(model, tmp_path)
    train(model, ctrl, opt, 2, (x, ya, yb))
    assert ctrl.global_step == 2


def test_a_split_interrupted_after_its_copy_leaves_the_model_on_the_shared_adapter(monkeypatch):
    # A split copies the shared adapter into the task adapters and switches the topology; a failure later in the
    # transition (the rank change, here a Ctrl-C) put the machine back in SINGLE, but the model stayed on the task
    # adapters: SINGLE trained them, and the next split overwrote them with the resting shared adapter.
    data = conflict_data()
    model, ad, ctrl, opt = build(initial_mode=SINGLE)
    _interrupt_next_rank_change(ctrl, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(model, ctrl, opt, 10, data)
    assert ctrl.mode == SINGLE and ctrl.router.topology == "shared"
    assert ctrl.trace[-1].components["transition_error"].startswith("SINGLE->MULTI: KeyboardInterrupt")
    opt.zero_grad()
    train(model, ctrl, opt, 10, data)  # the run goes on, and splits at the next decision that calls for it
    assert ctrl.mode == MULTI and ctrl.router.topology == "task"


@pytest.mark.parametrize("initial_mode", [MULTI, MIRROR])
def test_a_controller_built_after_load_task_adapters_keeps_the_loaded_task_adapters(tmp_path, initial_mode):
    # inject_multitask_lora, load_task_adapters (a folder saved in MULTI), then MultiTaskController(initial_mode=MULTI):
    # the controller made every task adapter a copy of the shared one, so the loaded task adapters were overwritten
    # and every task gave the shared adapter's outputs.
    from unified_lora import NestedLoRAConfig
    from unified_lora.multitask import MultiTaskController, inject_multitask_lora

    x = conflict_data()[0]
    m1, ad1, _, _ = build(initial_mode=MULTI)
    _randomize(ad1, 1)
    save_task_adapters(m1, tmp_path)
    model = tiny_bert()
    ad, router = inject_multitask_lora(model, NestedLoRAConfig(target_modules=TARGETS), ["a", "b"])
    load_task_adapters(model, tmp_path)
    ctrl = MultiTaskController(ad, router, machine=MachineConfig(initial_mode=initial_mode), print_fn=None)
    assert ctrl.router.topology == "task"
    for layer in ad1.values():  # the controller runs its mode's rank (MIRROR's is 16)
        layer.set_rank(ctrl.rank)
    for t in ("a", "b"):
        with torch.no_grad(), task_context(m1, t), task_context(model, t):
            torch.testing.assert_close(model(input_ids=x).logits, m1(input_ids=x).logits)
    # from the shared topology (a fresh model, or a folder saved in SINGLE) it still starts as a split does
    fresh = tiny_bert()
    ad2, router2 = inject_multitask_lora(fresh, NestedLoRAConfig(target_modules=TARGETS), ["a", "b"])
    _randomize(ad2, 2)
    MultiTaskController(ad2, router2, machine=MachineConfig(initial_mode=initial_mode), print_fn=None)
    assert all(torch.equal(p, q) for layer in ad2.values() for s in (0, 1)
               for p, q in zip(layer.task_parameters(s), layer.shared_parameters()))


def test_per_task_losses_of_a_causal_lm_count_only_its_target_tokens():
    """A causal LM's per-token losses (cross_entropy(..., ignore_index=-100, reduction='none')) hold 0.0 at every
    padding label, and per_task_losses averaged those zeros in: task "b", whose rows are short, got a loss a fraction
    of its real one, and the E signal compared the tasks on padding. With `mask=` each task's loss is the mean NLL
    over its own target tokens, as the rows give unpadded."""
    model = tiny_llama().train()
    ad, ctrl = setup_multitask_lora(model, ["a", "b"], ["q_proj", "v_proj"], print_fn=None, lr_mode="off",
                                    machine=MachineConfig(initial_mode=MULTI))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B factors: each task's adapter changes the logits
        for layer in ad.values():
            for p in layer.task_parameters():
                p.normal_(0.0, 0.1, generator=g)
    lengths, tids = [12, 3, 10, 2, 12, 4], ["a", "b", "a", "b", "a", "b"]
    ids = torch.randint(1, VOCAB, (len(lengths), 12), generator=g)
    mask = torch.arange(12)[None] < torch.tensor(lengths)[:, None]
    ids, labels = ids.masked_fill(~mask, 0), ids.masked_fill(~mask, -100)  # right padding, labels -100 there
    with task_context(model, tids):
        logits = model(input_ids=ids, attention_mask=mask.long()).logits
    per = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none").view(len(tids), -1)
    got = per_task_losses(per, tids, mask=labels[:, 1:] != -100)

    want = {}
    with torch.no_grad():  # each row alone, unpadded: the sum of its token NLLs and their number, per task
        for row, n, t in zip(ids, lengths, tids):
            with task_context(model, t):
                lg = model(input_ids=row[None, :n]).logits[0]
            s, c = want.get(t, (0.0, 0))
            want[t] = (s + float(F.cross_entropy(lg[:-1], row[1:n], reduction="sum")), c + n - 1)
    assert got == pytest.approx({t: s / c for t, (s, c) in want.items()}, abs=1e-5)
    assert per_task_losses(per, tids)["b"] < 0.5 * got["b"]  # without the mask: padding's zeros averaged in
    assert per_task_losses(per, "a", mask=labels[:, 1:] != -100)["a"] == pytest.approx(
        float(per.detach().sum()) / int((labels[:, 1:] != -100).sum()))  # one id for the batch
    only_a = (labels[:, 1:] != -100) & torch.tensor([t == "a" for t in tids])[:, None]
    assert set(per_task_losses(per, tids, mask=only_a)) == {"a"}  # a task without a target token is left out
    with pytest.raises(ValueError, match=r"mask has shape \(6, 12\) and the losses \(6, 11\)"):
        per_task_losses(per, tids, mask=mask)
    with pytest.raises(ValueError, match="the mask counts no loss value"):
        per_task_losses(per, tids, mask=torch.zeros_like(per, dtype=torch.bool))
    per.mean().backward()
    ctrl.step(per.sum() / (labels[:, 1:] != -100).sum(), task_losses=got)
    assert ctrl.signal.components["E[b]"] == pytest.approx(got["b"] / ctrl.signal.config.loss_scale)


def test_a_task_absent_since_a_rank_change_does_not_freeze_the_conflict_of_the_others():
    """Three tasks; task "c"'s data ends in MULTI (rank 8), then the run merges into SINGLE (rank 4) and "a" and "b"
    keep fighting. c's gradient EMA is of the former rank and cannot be compared: it is dropped, and the conflict of
    a and b drives C. (Before, its stale shape made every later gradient conflict None while c stayed away: C froze
    at its last value and a split could never come from the conflict between the remaining tasks.)"""
    x, ya, yb = conflict_data()
    model = tiny_bert()
    _, ctrl = setup_multitask_lora(model, ["a", "b", "c"], TARGETS, lr_mode="off", print_fn=None,
                                   signal=MultiTaskSignalConfig(grad_noise="debias"),  # (its noise statistics pruned)
                                   machine=MachineConfig(initial_mode=MULTI, theta0=0.95, theta1=0.99))
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    ctrl.attach_optimizer(opt)
    batches = [(torch.cat([x, x, x]), torch.cat([ya, yb, ya]), ["a"] * N + ["b"] * N + ["c"] * N)]
    batches += [mixed_batch(x, ya, yb)] * 4  # c's data has ended
    for ids, y, tids in batches:
        with task_context(model, tids):
            per = F.cross_entropy(model(input_ids=ids).logits, y, reduction="none")
        per.mean().backward()
        ctrl.step(per.mean(), task_losses=per_task_losses(per, tids))
        opt.step()
        opt.zero_grad()
    assert [r.mode for r in ctrl.trace] == [SINGLE] * 5  # merged at the first step: rank 8 → 4
    # a fresh EMA's first step (each task's first, then the first after the rank change): no reliability ρ yet
    assert ctrl.trace[0].components["C_grad_raw"] is not None and ctrl.trace[1].components["C_grad"] is None
    for r in ctrl.trace[2:]:  # a's and b's labels are inverted: their gradients point against each other
        assert r.components["C_grad"] is not None and r.components["C_grad"] > 0.9
        assert r.components["C"] == r.components["C_grad"]
    assert set(ctrl.grad_ema) == set(ctrl.grad_sq) == {ctrl.router.slots["a"], ctrl.router.slots["b"]}


def _multi_run(zero_grad_to_none, tids_per_step, poison_first=None):
    x, ya, yb = conflict_data()
    model = tiny_bert()
    tasks = ["a", "b", "c"]
    _, ctrl = setup_multitask_lora(model, tasks, TARGETS, lr_mode="off", print_fn=None,
                                   signal=MultiTaskSignalConfig(grad_noise="debias"),  # (the first-step reads: None)
                                   machine=MachineConfig(initial_mode=MULTI, theta0=0.01, theta1=0.99))
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    ctrl.attach_optimizer(opt)
    for i, present in enumerate(tids_per_step):
        ids = torch.cat([x] * len(present))
        y = torch.cat([yb if t == "b" else ya for t in present])
        tids = [t for t in present for _ in range(N)]
        with task_context(model, tids):
            per = F.cross_entropy(model(input_ids=ids).logits, y, reduction="none")
        per.mean().backward()
        if i == 0 and poison_first is not None:
            ctrl.adapters[0].lora_tasks[ctrl.router.slots[poison_first]].lora_A[0].grad[0, 0] = math.inf
        ctrl.step(per.mean(), task_losses=per_task_losses(per, tids))
        if not (i == 0 and poison_first is not None):
            opt.step()
        opt.zero_grad(set_to_none=zero_grad_to_none)
    return [r.components.get("C_grad") for r in ctrl.trace]  # None on a step skipped as non-finite


def test_the_gradient_conflict_does_not_depend_on_how_the_loop_zeroes_its_gradients():
    """In MULTI a task absent from a batch has no gradient. With zero_grad(set_to_none=False) its .grad is a zero
    tensor rather than None; it must leave its gradient EMA as it was, as None does. (Before, the zeros entered the EMA
    as a real gradient, and the conflict, hence φ and the mode trajectory, changed with the zero_grad style.)"""
    steps = [("a", "b", "c"), ("c",), ("a", "b"), ("a", "c"), ("b", "c"), ("a", "b", "c")]
    assert _multi_run(False, steps) == _multi_run(True, steps)


def test_a_task_with_no_usable_gradient_yet_stays_out_of_the_conflict_mean():
    """Task "c"'s first gradient is non-finite, so its EMA holds zeros (no direction) until it trains. Its pairs with
    "a" and "b" stay out of the mean: C is the conflict of a and b, whose labels are inverted. (Before, each counted
    as a conflict of 0, and C was a third of it.)"""
    steps = [("a", "b", "c")] + [("a", "b")] * 4
    conflict = _multi_run(True, steps, poison_first="c")
    assert conflict[0] is None  # the poisoned step: skipped as non-finite
    assert conflict[1] is None  # the first usable step: no reliability ρ yet
    two = _multi_run(True, [("a", "b")] * 4)
    assert two[0] is None and len(conflict[2:]) == len(two[1:]) == 3
    for c3, c2 in zip(conflict[2:], two[1:]):
        assert c3 > 0.9 and c3 == pytest.approx(c2, abs=0.05)


@pytest.mark.parametrize("mode", [SINGLE, MULTI])
def test_resize_token_embeddings_of_a_multitask_lm_head_in_the_middle_of_a_run_trains_on(mode):
    """`resize_token_embeddings` after multi-task training steps (the README's way: build the optimizer again, attach
    it) grew every B block of the lm_head, the task adapters' too, but S's reference kept the old shapes and the next
    ctrl.step failed ("The size of tensor a (70) must match the size of tensor b (64)"). The reference grows as the
    blocks did (new rows 0), so the drift of the kept rows goes on and the run trains the new tokens."""
    model = tiny_llama()
    _, ctrl = setup_multitask_lora(model, ["a", "b"], ["q_proj", "lm_head"], print_fn=None,
                                   machine=MachineConfig(initial_mode=mode, warmup_steps=100))
    head = model.lm_head

    def run(x, steps=3):
        _train_lm_tasks(model, ctrl, x, steps)

    run(torch.randint(0, VOCAB, (2, 6)))
    model.resize_token_embeddings(VOCAB + 6, mean_resizing=False)
    assert all(p.shape[0] == VOCAB + 6 for n, p in head.named_parameters() if "lora_B" in n)
    before = ctrl._drift()
    run(torch.tensor([[VOCAB + 5, 1, 2, VOCAB + 1]] * 2))
    trained = head.active_B() if mode == SINGLE else head.task_B(0)
    assert trained[VOCAB:].abs().sum() > 0 and ctrl.mode == mode
    assert math.isfinite(before) and before > 0


def test_a_subset_task_export_keeps_a_link_of_the_set_and_refuses_a_folder_holding_another_adapter(tmp_path):
    # A folder of the previous set that a subset export does not write stays, and stays listed: one the user moved
    # elsewhere and linked back was dropped from the manifest and the link deleted. A folder the manifest lists as
    # another adapter than the export would write there (task "shared"'s and the shared adapter, ids "a b" and "a_b")
    # was replaced silently, where the same two in one call are refused.
    import json

    from unified_lora.multitask import export_task_peft_adapters

    model, ad, ctrl, _ = build(initial_mode=MULTI)
    out = tmp_path / "out"
    export_task_peft_adapters(model, out, task_type=None)
    (out / "a").rename(tmp_path / "big_a")
    (out / "a").symlink_to(tmp_path / "big_a")
    moved = _tree(tmp_path / "big_a")
    export_task_peft_adapters(model, out, tasks=["b"], include_shared=False, task_type=None)
    assert (out / "a").is_symlink() and _tree(tmp_path / "big_a") == moved
    assert json.loads((out / "peft_tasks.json").read_text())["tasks"] == {"a": "a", "b": "b"}

    for tasks, first, then in [(("shared", "b"), dict(tasks=["shared"], include_shared=False), dict(tasks=["b"])),
                               (("shared", "b"), dict(tasks=["b"]), dict(tasks=["shared"], include_shared=False)),
                               (("a b", "a_b"), dict(tasks=["a b"]), dict(tasks=["a_b"], include_shared=False))]:
        model, ad, ctrl, _ = build(initial_mode=MULTI, tasks=tasks)
        out = tmp_path / f"{tasks}{first}"
        export_task_peft_adapters(model, out, task_type=None, **first)
        before = _tree(out)
        with pytest.raises(ValueError, match=r"holds another adapter.*'(shared|a_b)' holds (the shared adapter|the "
                                             r"adapter of task '(shared|a b)'), this export writes"):
            export_task_peft_adapters(model, out, task_type=None, **then)
        assert _tree(out) == before and not [p for p in out.iterdir() if p.name.startswith(".")]


def _fed_gradients(grad_noise, grads, steps, state=None, start=0):
    """A MULTI controller (no transition: warmup past the run; C = the gradient conflict) fed `grads(ctrl, step, task)`
    ({param: tensor}) as its task adapters' .grad at steps start..start+steps-1: the gradients a task's batches give,
    set where the backward puts them. Returns the controller (its trace holds C_grad, C_grad_raw and each task's ρ)."""
    model = tiny_bert()
    _, ctrl = setup_multitask_lora(model, ["a", "b"], TARGETS, lr_mode="off", print_fn=None,
                                   signal=MultiTaskSignalConfig(conflict="grad", grad_noise=grad_noise),
                                   machine=MachineConfig(initial_mode=MULTI, warmup_steps=10_000))
    if state is not None:
        ctrl.load_state_dict(state)
    for i in range(start, start + steps):
        for t in ("a", "b"):
            for p, g in grads(ctrl, i, t).items():
                p.grad = g
        ctrl.step(1.0, task_losses={"a": 1.0, "b": 1.0})
    return ctrl


def _gradients(sign_a, sign_b, noise):
    """grads(ctrl, step, task): each task block's gradient = sign_t · m + noise · (c1 d1 + c2 d2), with m, d1, d2 fixed
    random directions (the same for both tasks) and c ~ N(0, 1) drawn per task and step: minibatch noise of a low
    effective dimension, as a LoRA gradient's is (the cosine of two such noise vectors is often negative)."""
    def grads(ctrl, step, task):
        g = torch.Generator().manual_seed(7)
        out = {}
        c = torch.randn(2, generator=torch.Generator().manual_seed(2 * step + (task == "b")))
        sign = sign_a if task == "a" else sign_b
        for p in (p for a in ctrl.adapters for p in a.task_parameters(ctrl.router.slots[task])):
            m, d1, d2 = (torch.randn(p.shape, generator=g) for _ in range(3))
            out[p] = sign * m + noise * (c[0] * d1 + c[1] * d2)
        return out
    return grads


def test_the_gradient_conflict_does_not_read_minibatch_noise_as_conflict():
    """Two tasks whose gradients share one mean and differ by minibatch noise alone (two halves of one data set) do not
    conflict. The plain cosine of their gradient EMAs (grad_noise="none", the reading before) is often negative and
    read a conflict; weighted by each task's reliability ρ (the share of its gradient EMA that is not noise), it reads
    far less. Tasks with opposite, consistent gradients (flipped labels) read a conflict near 1 with either."""
    raw = _fed_gradients("none", _gradients(1.0, 1.0, noise=3.0), 60).trace
    new = _fed_gradients("debias", _gradients(1.0, 1.0, noise=3.0), 60).trace
    assert [r.components["C_grad_raw"] for r in raw] == [r.components["C_grad_raw"] for r in new]  # same gradients
    old_c = [r.components["C_grad"] for r in raw[2:]]
    new_c = [r.components["C_grad"] for r in new[2:]]
    assert sum(old_c) / len(old_c) > 0.08 and max(old_c) > 0.5  # noise read as conflict (0.11, 0.79)
    assert sum(new_c) / len(new_c) < sum(old_c) / len(old_c) / 4 and max(new_c) < max(old_c) / 2  # (0.01, 0.23)
    rho = [r.components["rho[a]"] for r in new[10:]]
    assert sum(rho) / len(rho) < 0.25  # (0.10: ‖m‖² / (‖m‖² + 2 · 9 · ‖d‖²) = 1/19, raised by the clamp at 0)
    flipped = _fed_gradients("debias", _gradients(1.0, -1.0, noise=0.1), 20).trace
    assert flipped[0].components["C_grad"] is None  # one step: no task's ρ can be told yet (the signal holds C)
    assert flipped[0].components["C_grad_raw"] > 0.95 and flipped[0].components["rho[a]"] == 0.0
    assert all(r.components["C_grad"] > 0.9 and r.components["rho[b]"] > 0.9 for r in flipped[1:])
    assert all(r.components["C"] == r.components["C_grad"] for r in flipped[1:])


def test_the_gradient_noise_statistics_resume_bit_for_bit_and_a_state_from_before_them_loads():
    """The noise statistics beside each gradient EMA are in ctrl.state_dict(): a resume reads the same conflict and ρ
    as the run that went on. A state saved before them (no "grad_sq") loads; they start afresh at the next step (no
    ρ there, so no conflict read: C held), then read again."""
    grads = _gradients(1.0, -1.0, noise=0.3)
    saved = _fed_gradients("debias", grads, 6).state_dict()
    mt = saved["multitask"]
    assert set(mt["grad_sq"]) == set(mt["grad_ema"]) and len(mt["grad_sq"]) == 2
    whole = _fed_gradients("debias", grads, 10).trace
    resumed = _fed_gradients("debias", grads, 4, state=copy.deepcopy(saved), start=6).trace
    keys = ("C", "C_grad", "C_grad_raw", "rho[a]", "rho[b]")
    assert [[r.components[k] for k in keys] for r in resumed] == [[r.components[k] for k in keys] for r in whole[6:]]
    old = copy.deepcopy(saved)
    del old["multitask"]["grad_sq"]
    after = _fed_gradients("debias", grads, 3, state=old, start=6).trace
    assert after[0].components["C_grad"] is None and after[0].components["rho[a]"] == 0.0
    assert after[0].components["C"] == whole[5].components["C"]  # held from the saved step
    assert after[2].components["C_grad"] > 0.5 and after[2].components["rho[a]"] > 0.5


def test_grad_noise_is_checked():
    with pytest.raises(ValueError, match="grad_noise: must be one of"):
        MultiTaskSignalConfig(grad_noise="off")


def _same(a, b) -> bool:
    """Two states (ctrl.state_dict()) hold the same values: tensors equal, with their dtypes, floats equal (or both
    NaN), containers alike."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _as_loaded(ctrl, ad) -> tuple:
    """All a load changes: the controller's state, the router's registry and topology, the layers' ranks."""
    return ctrl.state_dict(), dict(ctrl.router.slots), ctrl.router.topology, [a.rank for a in ad.values()]


def _edited(sd: dict, *path, value=None, drop=False) -> dict:
    sd = copy.deepcopy(sd)
    holder = sd
    for k in path[:-1]:
        holder = holder[k]
    if drop:
        del holder[path[-1]]
    else:
        holder[path[-1]] = value
    return sd


def test_a_state_with_damaged_multitask_parts_is_refused_in_one_line_before_anything_changes():
    """`_state_problems` checked the multi-task part's top keys only. A kept merge (`parked`), a weight-conflict
    reference (`conflict_ref`) or gradient EMAs that do not fit this model were loaded (the router, the base state)
    and then failed halfway (a KeyError, "'str' object has no attribute 'to'"), or loaded and failed at the next
    split ("The size of tensor a (32) must match ...") or named slots no task holds. Each is now a line of the
    ValueError, raised before anything is loaded."""
    model, ad, ctrl, opt, data = _merged_after_six_multi_steps(single_steps=1)
    parked = ctrl.state_dict()  # (a merge kept)
    _force(ctrl, 0.0)
    train(model, ctrl, opt, 1, data)  # the split brings the task adapters back: a weight-conflict reference
    split = ctrl.state_dict()
    assert parked["multitask"]["parked"] is not None and split["multitask"]["conflict_ref"] is not None
    point = parked["multitask"]["parked"]["point"]
    cases = [
        (parked, ("multitask", "parked", "point"), point[:-1], r"\['point'\] is for 4 adapters; this model has 5"),
        (parked, ("multitask", "parked", "point", 0, 0), torch.zeros(3, 3), r"has shape \(3, 3\); its block is"),
        (parked, ("multitask", "parked", "point", 1, 4), "x", r"\[1\]\[4\] \(adapter 1\) is a str, not a floating"),
        (parked, ("multitask", "parked", "slots"), [0, 5], r"names task slot\(s\) \[5\] that the state registers no"),
        (parked, ("multitask", "parked", "step"), None, r"\['parked'\]\['step'\] is None, not a step"),
        (parked, ("multitask", "parked"), {"step": 3}, r"\['parked'\] is not None or a dict with \['step', 'slots'"),
        (parked, ("multitask", "parked", "ref", 0), [], r"\['ref'\]\[0\] \(adapter 0\) holds 0 blocks; its"),
        (split, ("multitask", "conflict_ref", "point", 2), [torch.zeros(1)] * 6,
         r"\['conflict_ref'\]\['point'\]\[2\]\[0\] \(adapter 2\) has shape \(1,\); its"),
        (split, ("multitask", "conflict_ref", "slots"), "ab", r"\['conflict_ref'\]\['slots'\] is 'ab', not a list"),
        (split, ("multitask", "grad_ema"), {0: torch.zeros(3), 9: torch.zeros(3)}, r"\['grad_ema'\] names task slot"),
        (split, ("multitask", "grad_ema"), {0: [0.5]}, r"\['grad_ema'\]\[0\] is a list, not a tensor"),
        (split, ("multitask", "grad_sq"), {0: torch.zeros(5)}, r"\['grad_sq'\]\[0\] is \(5,\), not a tensor of 3"),
        (split, ("multitask", "grad_sq"), {7: torch.zeros(3)}, r"\['grad_sq'\] names task slot\(s\) \[7\]"),
        (split, ("multitask", "ref"), split["multitask"]["ref"][:-2], r"\['ref'\] holds \d+ tensors; this model"),
        (split, ("multitask", "router", "slots"), [["a", 0], ["b", 0]], r"not a list of \[task id, slot\] pairs"),
        (split, ("machine", "hold_down"), {1: "soon"}, r"\['hold_down'\] is \{1: 'soon'\}, not a mapping"),
    ]
    model2, ad2, fresh, opt2 = build(initial_mode=SINGLE)
    train(model2, fresh, opt2, 2, conflict_data(seed=3))
    before = _as_loaded(fresh, ad2)
    for good, path, value, says in cases:
        with pytest.raises(ValueError, match=says) as e:
            fresh.load_state_dict(_edited(good, *path, value=value))
        assert "nothing was loaded" in str(e.value) and len(str(e.value).splitlines()) == 2, str(e.value)
        assert _same(_as_loaded(fresh, ad2), before), path
    fresh.load_state_dict(split)  # the states as saved load
    assert fresh.mode == MULTI and _same(fresh.state_dict(), split)


def test_a_load_that_fails_midway_leaves_the_controller_as_it_was(tmp_path, monkeypatch):
    """ctrl.load_state_dict loaded the router, then the base state, then the rest, and checked the trace file last:
    a damaged trace_path (a line of junk), a part its checks do not see (a signal state of the right keys and wrong
    values) or a Ctrl-C during the rank change left the controller partly loaded: another step count, mode, router
    topology and rank, and the multi-task parts of the controller it was. A load is now all or nothing: the trace file
    is checked before anything loads, and a load that raises midway puts the previous state back."""
    model, ad, ctrl, opt, data = _merged_after_six_multi_steps(single_steps=1)
    _force(ctrl, 0.0)
    train(model, ctrl, opt, 1, data)  # MULTI, the task adapters back: every multi-task part held
    sd = ctrl.state_dict()
    path = tmp_path / "trace.jsonl"
    model2 = tiny_bert()
    ad2, fresh = setup_multitask_lora(model2, ["a", "b"], TARGETS, lr_mode="off", print_fn=None, trace_path=path,
                                      signal=MultiTaskSignalConfig(phi_init=0.0))
    train(model2, fresh, torch.optim.AdamW(trainable_parameters(model2), lr=1e-2), 2, conflict_data(seed=3))
    fresh.close()
    text = path.read_text()
    path.write_text(text.replace("\n", "\nnot a record\n", 1))
    fresh.writer = TraceWriter(path, append=True)  # (the resumed run's writer: it has written nothing yet)
    before = _as_loaded(fresh, ad2)
    assert before[2] == "shared" and sd["multitask"]["router"]["topology"] == "task"
    with pytest.raises(ValueError, match=r"trace.jsonl: line 2 is not a step's record"):
        fresh.load_state_dict(sd)
    assert _same(_as_loaded(fresh, ad2), before)
    path.write_text(text)  # the trace whole again; the signal's state of the right keys, wrong values
    with pytest.raises(TypeError):
        fresh.load_state_dict(_edited(sd, "signal", "E", value=5))
    assert _same(_as_loaded(fresh, ad2), before)
    _interrupt_next_rank_change(fresh, monkeypatch)  # (the rank change comes after every part but the multi-task's)
    with pytest.raises(KeyboardInterrupt):
        fresh.load_state_dict(sd)
    assert _same(_as_loaded(fresh, ad2), before)
    with pytest.warns(UserWarning, match=r"trace\.jsonl: resuming at step \d+, the trace file lacks steps 2-") as got:
        fresh.load_state_dict(sd)  # (a state of a longer run over this 2-step trace: a gap, said)
    # the user's line, not multitask.py's (MultiTaskController.load_state_dict calls the base class's)
    assert [w.filename for w in got if "lacks step" in str(w.message)] == [__file__]
    assert _same(fresh.state_dict(), sd) and fresh.router.topology == "task"
    assert [r["step"] for r in map(json.loads, path.read_text().splitlines())] == [0, 1]


def test_a_controller_pickled_before_the_merge_test_unpickles_with_its_defaults_and_splits_back():
    """A controller comes back without `__init__` when unpickled (pickle, torch.load(weights_only=False) of a whole
    controller, as the README says it pickles at any step). One pickled before the merge test (resplit_window, the
    kept merge, the back-off, the weight-conflict reference) had none of them, and its first step raised
    AttributeError '_parked'. Each comes back as a new controller starts it."""
    import pickle

    data = conflict_data()
    model, ad, ctrl, opt = build(initial_mode=MULTI)
    _force(ctrl, 0.0)
    train(model, ctrl, opt, 4, data)
    for name in ("resplit_window", "_parked", "_conflict_ref", "failed_merges", "_split_undo", "_ref_slots"):
        delattr(ctrl, name)  # as an earlier version pickled it
    del ctrl.machine.hold_down
    model, ctrl, opt = pickle.loads(pickle.dumps((model, ctrl, opt)))
    assert (ctrl.resplit_window, ctrl._parked, ctrl._conflict_ref, ctrl.failed_merges) == (25, None, None, 0)
    assert ctrl.machine.hold_down == {} and ctrl._ref_slots == {0, 1}
    _force(ctrl, 0.98)
    train(model, ctrl, opt, 1, data)
    assert ctrl.mode == SINGLE and ctrl._parked is not None
    _force(ctrl, 0.0)
    train(model, ctrl, opt, 1, data)
    assert ctrl.mode == MULTI and ctrl.trace[-1].components["tasks_back"] == 2 and ctrl.failed_merges == 1
    assert ctrl.machine.hold_down == {MULTI: ctrl.global_step - 1 + 50}


def test_every_attribute_the_multitask_controller_gained_since_its_first_version_is_given_back_to_an_older_pickle():
    """Enumerates `vars()` of a new multi-task controller: each attribute its first version (and the base class's
    first, conftest's FIRST_CONTROLLER_ATTRIBUTES) did not set comes back from `__setstate__` with the value a new
    controller starts with; then the copy trains through a split."""
    from conftest import FIRST_CONTROLLER_ATTRIBUTES, unpickled_as_first_version

    model, _, ctrl, opt = build()
    first = FIRST_CONTROLLER_ATTRIBUTES | {"router", "merge_rule", "grad_ema", "merge_log", "_ref"}
    ctrl, model, opt = unpickled_as_first_version(ctrl, model, opt, first=first)
    _force(ctrl, 0.0)
    train(model, ctrl, opt, 2, conflict_data())
    assert ctrl.mode == MULTI and ctrl.trace[0].components["event"] == "split"


def test_task_adapters_loaded_after_a_merge_are_the_users_and_the_next_split_copies(tmp_path):
    """load_task_adapters within resplit_window of a merge: the controller kept the merge, so the next split added
    the shared adapter's move since the merge to the adapters the user had loaded (and brought back the tasks the load
    had replaced), and held the next merge back. The loaded adapters are the user's choice: the kept merge goes
    (not in the state either), and the split copies the shared adapter, as after the window. So does the weight
    conflict's reference of the tasks a split brought back."""
    other, _, octrl, oopt, odata = _merged_after_six_multi_steps(single_steps=0)
    save_task_adapters(other, tmp_path / "theirs")  # another run's, saved in SINGLE (the shared topology)
    model, ad, ctrl, opt, data = _merged_after_six_multi_steps(single_steps=1)
    assert ctrl._parked is not None and ctrl.router.topology == "shared"
    load_task_adapters(model, tmp_path / "theirs")
    assert ctrl.state_dict()["multitask"]["parked"] is None
    train(model, ctrl, opt, 1, data)
    _force(ctrl, 0.0)
    train(model, ctrl, opt, 1, data)  # a split 3 steps after the merge
    assert ctrl.mode == MULTI and ctrl.trace[-1].components["event"] == "split"
    assert "tasks_back" not in ctrl.trace[-1].components and ctrl.failed_merges == 0 and not ctrl.machine.hold_down
    for a in ad.values():
        for s in (0, 1):
            assert all(torch.equal(t, p) for t, p in zip(a.task_parameters(s), a.shared_parameters()))
    # after a split that brought the task adapters back, a load drops their weight-conflict reference
    model, ad, ctrl, opt, data, *_ = _split_after_merge(2)
    assert ctrl._conflict_ref is not None
    save_task_adapters(model, tmp_path / "mine")
    load_task_adapters(model, tmp_path / "mine")
    assert ctrl.state_dict()["multitask"]["conflict_ref"] is None
