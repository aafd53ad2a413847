"""CUDA checks: the same maths on a GPU as on the CPU, for every code path that only a GPU runs (device-side
guards, autocast on "cuda", non-blocking copies to and from a CPU-offloaded snapshot, nccl collectives, bitsandbytes'
CUDA kernels). Skipped where torch sees no GPU (CI); run them on a GPU machine with `pytest tests/test_cuda.py`
(benchmarks/gpu_sitting.sh `check` does, first).

Dry run anywhere: `UNIFIED_LORA_TEST_DEVICE=cpu pytest tests/test_cuda.py` runs every test with the CPU as its "GPU"
(nccl becomes gloo, autocast runs on "cpu", bitsandbytes its CPU backend), so each test's logic, shapes and
assertions are checked before a GPU sitting spends device time on them. The few whose point is CUDA-only behaviour
skip there with a reason. The process-group tests run `_cuda_dist_worker.py` in a subprocess under a hard timeout
(a world-size-1 group: nccl runs its collectives on one GPU too), so a hang cannot eat the sitting."""

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import (VOCAB, can_build_cpp, classification_batch, grads_after_in_place_ops, quantized_linear,
                      snapshot_then_train, tiny_bert, tiny_gpt2, tiny_llama)
from unified_lora import (ActuatorConfig, MachineConfig, MirrorConfig, MirrorSnapshot, NestedLoRAConfig,
                          NestedLoRALayer, SignalConfig, inject_nested_lora, lora_layers, merge_adapters, set_rank,
                          setup_unified_lora, unmerge_adapters)
from unified_lora.cli import main
from unified_lora.peft_io import export_peft_adapter

import test_cli  # the command line's tests: their tiny BERT and data files (the fixture `tiny`) and arguments
from test_cli import _train_args

DEVICE_ENV = "UNIFIED_LORA_TEST_DEVICE"
_forced = os.environ.get(DEVICE_ENV, "")
if _forced not in ("", "cpu", "cuda"):
    raise ValueError(f"{DEVICE_ENV}: 'cpu' (a dry run of these tests on the CPU) or 'cuda', got {_forced!r}")
DEV = torch.device(_forced or "cuda")
ON_GPU = DEV.type == "cuda"
pytestmark = pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(),
                                reason=f"needs a CUDA GPU ({DEVICE_ENV}=cpu runs them on the CPU as a dry run)")
gpu_only = pytest.mark.skipif(not ON_GPU, reason="CUDA-only behaviour: nothing to check in the CPU dry run")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


KERNELS = ["python", pytest.param("cpp", marks=pytest.mark.skipif(not can_build_cpp(), reason="needs g++ and ninja"))]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rank", [4, 8, 16])
def test_nested_layer_on_gpu_matches_the_cpu_values_and_gradients(rank, kernel):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(rank)
    cpu = NestedLoRALayer(torch.nn.Linear(48, 40), rank_levels=(4, 8, 16), lora_alpha=16, initial_rank=rank,
                          kernel=kernel)
    with torch.no_grad():
        for b in cpu.lora_B:
            b.normal_(0, 0.1)
    gpu = copy.deepcopy(cpu).to(DEV)
    x = torch.randn(3, 7, 48, requires_grad=True)
    xg = x.detach().to(DEV).requires_grad_(True)
    gy = torch.randn(3, 7, 40)
    y, yg = cpu(x), gpu(xg)
    y.backward(gy)
    yg.backward(gy.to(DEV))
    assert _rel(yg.cpu(), y) < 1e-5
    assert _rel(xg.grad.cpu(), x.grad) < 1e-5
    for (n, p), (_, q) in zip(cpu.named_parameters(), gpu.named_parameters()):
        if p.grad is None:
            assert q.grad is None, n  # paused blocks stay without gradient on both devices
        else:
            assert _rel(q.grad.cpu(), p.grad) < 1e-5, n


@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_layer_on_gpu_tracks_the_fp32_reference(kernel):
    torch.manual_seed(0)
    ref = NestedLoRALayer(torch.nn.Linear(256, 256), rank_levels=(4, 8, 16), lora_alpha=16, initial_rank=16,
                          kernel=kernel)
    with torch.no_grad():
        for b in ref.lora_B:
            b.normal_(0, 0.05)
    ref = ref.to(DEV)
    bf = copy.deepcopy(ref).to(torch.bfloat16)
    x = torch.randn(4, 64, 256, device=DEV)
    y_ref, y_bf = ref(x), bf(x.to(torch.bfloat16))
    assert y_bf.dtype == torch.bfloat16 and torch.isfinite(y_bf).all()
    assert _rel(y_bf.float(), y_ref) < 2e-2
    # bf16 base with fp32 adapters (PEFT's autocast_adapter_dtype layout) goes through the cast-add path
    mixed = copy.deepcopy(ref)
    mixed.base_layer.to(torch.bfloat16)
    y_mixed = mixed(x.to(torch.bfloat16))
    assert _rel(y_mixed.float(), y_ref) < 2e-2


@pytest.mark.skipif(not can_build_cpp(), reason="kernel='cpp' needs g++ and ninja")
@pytest.mark.parametrize("rank", [8, 16])
def test_cpp_kernel_on_gpu_under_bf16_autocast_matches_the_python_kernel(rank):
    torch.manual_seed(rank)
    py = NestedLoRALayer(torch.nn.Linear(96, 80), rank_levels=(4, 8, 16), lora_alpha=16, initial_rank=rank).to(DEV)
    with torch.no_grad():
        for b in py.lora_B:
            b.normal_(0, 0.05)
    cpp = copy.deepcopy(py)
    cpp.kernel = "cpp"
    x = torch.randn(4, 32, 96, device=DEV)
    gy = torch.randn(4, 32, 80, device=DEV)
    outs = []
    for layer in (py, cpp):
        xx = x.clone().requires_grad_()
        with torch.autocast(DEV.type, dtype=torch.bfloat16):
            y = layer(xx)
        y.float().backward(gy)
        outs.append([y.float(), xx.grad] + [p.grad for p in layer.active_parameters()])
    assert "CppNode" in y.grad_fn.name() and outs[1][0].dtype == torch.float32
    for a, b in zip(*outs):
        assert b.dtype == a.dtype and _rel(b, a) < 1e-3


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("offload", [False, True])
def test_mirror_on_gpu_restores_bit_exactly_including_a_cpu_offloaded_snapshot(offload, pack):
    # packed + offloaded: the parameters' buffer stays on the GPU, the snapshot on the CPU (one copy each way)
    g = torch.Generator(device="cpu").manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(8, 32, generator=g).to(DEV)) for _ in range(6)]
    opt = torch.optim.AdamW(ps, lr=0.1)
    sum(p.sum() for p in ps).backward()
    opt.step()
    snap = MirrorSnapshot(MirrorConfig(snapshot_optimizer=True, offload_to_cpu=offload, pack=pack))
    w, m = snapshot_then_train(snap, ps, opt)
    assert snap.weights[0].device.type == ("cpu" if offload else DEV.type)
    assert len({p.untyped_storage().data_ptr() for p in ps}) == (1 if pack else 6)
    d = snap.drift(ps)
    expect = sum((p.detach() - q).norm().item() for p, q in zip(ps, w)) / sum(q.norm().item() for q in w)
    assert d == pytest.approx(expect, rel=1e-4) and d > 0
    snap.restore(ps, optimizer=opt)
    assert all(torch.equal(p, q) for p, q in zip(ps, w)) and torch.equal(opt.state[ps[0]]["exp_avg"], m)
    assert all(p.device.type == DEV.type for p in ps)


def test_controller_stress_cycle_on_gpu_and_peft_export_from_gpu_weights(tmp_path):
    """Corrupted labels drive MIRROR (v3 composite signal reads the GPU gradients), clean data brings
    the machine back, and the adapter exported from the GPU model loads in PEFT with the same logits."""
    from peft import PeftModel

    model = tiny_bert().to(DEV)
    base = copy.deepcopy(model).cpu()
    adapters, ctrl = setup_unified_lora(model, target_modules=["query", "value"], modules_to_save=["classifier"],
                                        signal=SignalConfig(kind="loss", loss_scale=0.5), print_fn=None,
                                        actuators=ActuatorConfig(lr_mode="absolute", mode_lrs=(1e-2, 1e-2, 5e-4)))
    assert all(a.lora_A[0].device.type == DEV.type for a in adapters.values())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctrl.attach_optimizer(opt)
    x, y = classification_batch(64)
    x, y = x.to(DEV), y.to(DEV)
    model.train()
    for step in range(190):
        labels = 1 - y if 90 <= step < 130 else y
        loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        ctrl.step(loss=loss.item())
        opt.step()
        opt.zero_grad()
    saved = [r for r in ctrl.trace if r.snapshot == "saved"]
    assert saved and 90 <= saved[0].step < 130
    assert any(r.transition == "MIRROR->MULTI" and r.drift is not None for r in ctrl.trace)
    assert ctrl.trace[-1].mode <= 1
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=x).logits.cpu()
    export_peft_adapter(model, adapters, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=x.cpu()).logits
    assert _rel(theirs, ours) < 1e-4


def test_composite_signal_on_gpu_gives_the_cpu_phi():
    torch.backends.cuda.matmul.allow_tf32 = False
    phis = {}
    for dev in ("cpu", DEV.type):
        model = tiny_bert().to(dev)
        _, ctrl = setup_unified_lora(model, target_modules=["query", "value"], modules_to_save=["classifier"],
                                     signal="composite", print_fn=None)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        x, y = classification_batch(32)
        model.train()
        out = []
        for step in range(12):
            loss = model(input_ids=x.to(dev), labels=(1 - y if step >= 6 else y).to(dev)).loss
            loss.backward()
            ctrl.step(loss=loss.item())
            opt.step()
            opt.zero_grad()
            out.append(ctrl.phi)
        phis[dev] = out
    assert phis[DEV.type] == pytest.approx(phis["cpu"], abs=1e-4)


# ------------------------------------------------------------------- Mirror: the complete optimizer snapshot
@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_the_complete_optimizer_snapshot_on_gpu_restores_every_state_entry_on_its_device(name, offload, pack):
    """MirrorConfig(snapshot_optimizer=True) through the controller on a model on the device: a restore puts back the
    weights and every entry of every parameter's optimizer state (Adafactor's Python-scalar step included) bit for
    bit, each tensor on the device it was on, also from a snapshot offloaded to the CPU (copies both ways)."""
    from test_mirror_robustness import OPTIMIZERS, _assert_same_state, _drive, _mcfg, _model

    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)).to(DEV)
    seen = {}

    def watch(i, model, opt, ctrl, x):
        if ctrl.mirror.held:
            seen["snap_device"] = ctrl.mirror.weights[0].device.type
        return x

    rec = _drive(_model().to(DEV), _mcfg("eager" if pack else "eager_unpacked", policy="always",
                                         snapshot_optimizer=True, offload_to_cpu=offload),
                 OPTIMIZERS[name], x, before_step=watch)
    assert rec["decision"].restore and seen["snap_device"] == ("cpu" if offload else DEV.type)
    assert all(torch.equal(p, s) for p, s in zip(rec["restored"], rec["snap"]))
    for got, want in zip(rec["restored_opt"], rec["snap_opt"]):
        _assert_same_state(got, want)  # (dtype, device, shape and values of each tensor entry)
    params = rec["ctrl"].managed_parameters()
    assert all(p.device.type == DEV.type for p in params)
    assert all(v.device.type == DEV.type for st in rec["opt"].state.values() for v in st.values()
               if torch.is_tensor(v) and v.dim() > 0)


# ---------------------------------------------------------------------- multi-task: routing and device guards
def _multitask_on(dev, initial_mode, phi_init):
    from test_multitask import TARGETS

    from unified_lora import trainable_parameters
    from unified_lora.multitask import MultiTaskSignalConfig, setup_multitask_lora

    torch.manual_seed(0)
    model = tiny_bert().to(dev)
    adapters, ctrl = setup_multitask_lora(model, ["a", "b"], TARGETS, lr_mode="off", print_fn=None,
                                          signal=MultiTaskSignalConfig(phi_init=phi_init),
                                          machine=MachineConfig(initial_mode=initial_mode))
    opt = torch.optim.AdamW(trainable_parameters(model), lr=2e-2, weight_decay=0.01)
    ctrl.attach_optimizer(opt)
    return model, adapters, ctrl, opt


def test_multitask_on_gpu_routes_a_mixed_batch_and_reads_the_gradient_conflict_as_on_the_cpu():
    """SINGLE with per-sample task ids (the routing's row index built on the device, the shared blocks' per-task
    gradient hooks), the split to MULTI (per-task adapters, index_add of each task's rows): the same modes and the
    same φ and conflict as on the CPU, and the same per-task outputs after training."""
    from test_multitask import conflict_data, train

    from unified_lora import SINGLE
    from unified_lora.multitask import task_context

    torch.backends.cuda.matmul.allow_tf32 = False
    runs = {}
    for dev in ("cpu", DEV.type):
        model, _, ctrl, opt = _multitask_on(dev, SINGLE, 0.0)
        data = tuple(t.to(dev) for t in conflict_data())
        train(model, ctrl, opt, 8, data)
        with torch.no_grad(), task_context(model, ["a", "b"] * 4):
            logits = model(input_ids=data[0][:8]).logits.cpu()
        runs[dev] = ([(r.mode, r.rank, r.transition) for r in ctrl.trace],
                     [r.phi for r in ctrl.trace], [r.components.get("C_grad") for r in ctrl.trace], logits)
    cpu, dev = runs["cpu"], runs[DEV.type]
    assert dev[0] == cpu[0] and any(t == "SINGLE->MULTI" for _, _, t in dev[0])
    assert dev[1] == pytest.approx(cpu[1], abs=1e-4)
    assert dev[2][0] is not None and dev[2][0] > 0.9  # the tasks' labels are inverted: their gradients oppose
    assert [c for c in dev[2] if c is not None] == pytest.approx([c for c in cpu[2] if c is not None], abs=1e-4)
    torch.testing.assert_close(dev[3], cpu[3], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_non_finite_task_gradient_on_gpu_is_skipped_on_the_device_as_if_it_never_happened(bad):
    """The finite-gradient guard of the gradient conflict is decided on the device (torch.where, no sync): a step
    with an inf/NaN task gradient is flagged non-finite and leaves every signal state as a run without that step."""
    import torch.nn.functional as F
    from test_multitask import conflict_data, mixed_batch

    from unified_lora import MULTI
    from unified_lora.multitask import per_task_losses, task_context

    ids, y, tids = mixed_batch(*(t.to(DEV) for t in conflict_data()))

    def step(model, ctrl, opt, poison=None):
        with task_context(model, tids):
            per = F.cross_entropy(model(input_ids=ids).logits, y, reduction="none")
        per.mean().backward()
        if poison is not None:
            ctrl.adapters[0].lora_tasks[ctrl._slots()[0]].lora_A[0].grad[0, 0] = poison
        ctrl.step(per.mean(), task_losses=per_task_losses(per, tids))
        if poison is None:
            opt.step()
        opt.zero_grad()

    traces = []
    for insert in (False, True):
        model, _, ctrl, opt = _multitask_on(DEV, MULTI, 0.5)
        for i in range(8):
            if insert and i == 4:
                step(model, ctrl, opt, poison=bad)
                assert ctrl.trace[-1].nonfinite and ctrl.nonfinite_steps == 1
            step(model, ctrl, opt)
        assert all(e.device.type == DEV.type and torch.isfinite(e).all() for e in ctrl.grad_ema.values())
        assert all(e.device.type == DEV.type and torch.isfinite(e).all() for e in ctrl.grad_sq.values())
        traces.append([r for r in ctrl.trace if not r.nonfinite])
    clean, skipped = traces
    assert len(clean) == len(skipped) == 8
    for a, b in zip(clean, skipped):
        assert (a.mode, a.phi, a.rank) == (b.mode, b.phi, b.rank)
        assert {k: v for k, v in a.components.items() if k != "event"} == \
               {k: v for k, v in b.components.items() if k != "event"}
    assert len({r.phi for r in clean}) > 3


# ------------------------------------------------------------------------------- the layer's dtype paths
def _random_B(layer, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in layer.lora_B:
            b.copy_(torch.randn(b.shape, generator=g) * scale)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rank", [4, 16])
def test_fp32_blocks_on_a_bf16_base_on_gpu_add_their_delta_in_fp32_and_round_once(rank, kernel):
    """PEFT's layout (autocast_adapter_dtype): fp32 blocks on a bf16 base. The delta is summed with the base output in
    fp32 and rounded once to bf16 (`_add_delta`), without autocast and under torch.autocast(device, bf16) (where the
    delta is computed in bf16, as F.linear would); the gradients of the blocks are fp32 either way."""
    torch.manual_seed(rank)
    layer = NestedLoRALayer(nn.Linear(64, 48).to(torch.bfloat16), rank_levels=(4, 8, 16), initial_rank=rank,
                            autocast_adapter_dtype=True, kernel=kernel)
    assert layer.lora_A[0].dtype == torch.float32
    _random_B(layer)
    layer.to(DEV)
    x = torch.randn(3, 5, 64).to(torch.bfloat16).to(DEV)
    A, B = layer.active_A(), layer.active_B()
    with torch.no_grad():
        want = (layer.base_layer(x).float() + layer.scaling * (x.float() @ A.T @ B.T)).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, rtol=0, atol=1e-2)
    assert ((y.float() - want.float()).abs() > 0).float().mean() < 0.02  # rounded once: (almost) all bits equal
    y.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.active_parameters())
    layer.zero_grad()
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        ya = layer(x)
        with torch.no_grad():
            ref = layer.base_layer(x).float() + layer.scaling * (x @ A.T.bfloat16() @ B.T.bfloat16()).float()
    assert ya.dtype == torch.bfloat16
    torch.testing.assert_close(ya.float(), ref, rtol=2e-2, atol=2e-2)
    ya.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.active_parameters())


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rank", [4, 8, 16])
def test_an_fp64_layer_under_autocast_on_gpu_computes_in_fp64_as_f_linear_does(rank, kernel):
    """Autocast leaves fp64 alone on the GPU as on the CPU: an fp64 layer under torch.autocast(device, bf16) gives
    the fp64 result at every rank, and its gradients are plain autograd's."""
    torch.manual_seed(0)
    layer = NestedLoRALayer(nn.Linear(32, 16).double(), initial_rank=rank, kernel=kernel)
    _random_B(layer, scale=1.0)
    layer.to(DEV)
    x = torch.randn(2, 5, 32, dtype=torch.float64, device=DEV, requires_grad=True)
    ref = layer.base_layer(x) + layer.scaling * (x @ layer.active_A().T) @ layer.active_B().T
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, ref)
    got = torch.autograd.grad(y.square().sum(), [x, *layer.active_parameters()])
    for a, b in zip(got, torch.autograd.grad(ref.square().sum(), [x, *layer.active_parameters()])):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rank", [8, 16])
def test_an_in_place_op_on_the_gpu_output_trains_with_plain_autograd_gradients(rank, kernel):
    """The nested path returns its output through `_unsafe_view` (no view of the Function's output): `y += residual`
    and `relu_()` on it work on the GPU and give plain autograd's gradients, under bf16 autocast too."""
    torch.manual_seed(0)
    layer = NestedLoRALayer(nn.Linear(12, 6).double(), lora_alpha=8, initial_rank=rank, kernel=kernel)
    _random_B(layer, scale=1.0)
    layer.to(DEV)
    x = torch.randn(3, 5, 12, dtype=torch.float64, device=DEV, requires_grad=True)
    res = torch.randn(3, 5, 6, dtype=torch.float64, device=DEV)

    ours = grads_after_in_place_ops(layer, x, res, layer(x))
    ref = layer.base_layer(x) + layer.scaling * (x @ layer.active_A().T) @ layer.active_B().T
    for a, b in zip(ours, grads_after_in_place_ops(layer, x, res, ref)):
        torch.testing.assert_close(a, b)
    layer.float()
    xf = x.detach().float().requires_grad_(True)
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        y = layer(xf)
        y += res.to(y.dtype)
        y.relu_()
    y.float().square().sum().backward()
    assert xf.grad is not None and all(p.grad.dtype == torch.float32 for p in layer.active_parameters())


@gpu_only
@pytest.mark.parametrize("rank", [4, 16])
def test_a_training_step_of_the_nested_layer_on_gpu_makes_no_host_sync(rank):
    """The layer's forward and backward (plain ops at r4, the nested Function at r16) queue GPU work only: under
    torch.cuda.set_sync_debug_mode("error") any op that waits for the GPU (an .item(), a nonzero, a blocking copy)
    raises. Host time is most of a small layer's step on a GPU, and a sync per layer would serialise it."""
    torch.manual_seed(0)
    layer = NestedLoRALayer(nn.Linear(64, 48), rank_levels=(4, 8, 16), initial_rank=rank).to(DEV)
    _random_B(layer)
    x = torch.randn(4, 9, 64, device=DEV, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x).square().sum().backward()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(p.grad is not None for p in layer.active_parameters()) and x.grad is not None


# --------------------------------------------------------------- state dicts: merged layers, the saved rank
def _wrapped_gpt2(seed):
    model = tiny_gpt2()
    adapters = inject_nested_lora(model, NestedLoRAConfig(target_modules=["c_attn", "c_proj"]))
    for i, layer in enumerate(adapters.values()):
        _random_B(layer, seed=seed + i, scale=1.0)
    return model.to(DEV)


def test_a_merged_model_on_gpu_saves_its_base_unmerged_and_loads_into_a_fresh_and_into_a_merged_model():
    """The merged layer's state-dict hooks on the GPU: a merged model's state dict holds the base weight without the
    delta (loaded into a fresh wrapped model, the delta counts once), and a state dict loaded into a merged model
    is merged again (still merged, the new delta in the output, unmerge gives back its own base)."""
    model, fresh, other = _wrapped_gpt2(0), _wrapped_gpt2(100), _wrapped_gpt2(100)
    base = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model).items()}
    x = torch.randint(1, VOCAB, (2, 6)).to(DEV)
    with torch.no_grad():
        ref = model(x).logits
        merge_adapters(model)
        torch.testing.assert_close(model(x).logits, ref, rtol=1e-4, atol=1e-4)
        sd = model.state_dict()
        for n, w in base.items():
            assert sd[f"{n}.base_layer.weight"].device.type == DEV.type
            torch.testing.assert_close(sd[f"{n}.base_layer.weight"], w, rtol=0, atol=1e-6, msg=n)  # fp32: w + d - d
        fresh.load_state_dict(sd, strict=True)
        assert not any(layer.merged_rank for layer in lora_layers(fresh).values())
        torch.testing.assert_close(fresh(x).logits, ref, rtol=1e-4, atol=1e-4)
        own = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(other).items()}
        merge_adapters(other)
        other.load_state_dict(sd, strict=True)
        assert all(layer.merged_rank == 8 for layer in lora_layers(other).values())
        torch.testing.assert_close(other(x).logits, ref, rtol=1e-4, atol=1e-4)
        unmerge_adapters(other)
        for n, layer in lora_layers(other).items():
            torch.testing.assert_close(layer.base_layer.weight, base[n], rtol=0, atol=1e-5)
            assert not torch.equal(layer.base_layer.weight, own[n])
        unmerge_adapters(model)
        for n, w in base.items():
            torch.testing.assert_close(lora_layers(model)[n].base_layer.weight, w, rtol=0, atol=1e-6, msg=n)


def test_a_merged_bf16_model_on_gpu_keeps_its_base_weight_bit_for_bit_through_state_dict_and_unmerge():
    model = tiny_llama().to(torch.bfloat16)
    adapters = inject_nested_lora(model, NestedLoRAConfig(target_modules=["q_proj", "down_proj"]))
    for layer in adapters.values():
        _random_B(layer, scale=1.0)
    model.to(DEV)
    base = {n: layer.base_layer.weight.detach().clone() for n, layer in adapters.items()}
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        merge_adapters(model)
    assert not all(torch.equal(adapters[n].base_layer.weight, w) for n, w in base.items())
    sd = model.state_dict()
    assert all(torch.equal(sd[f"{n}.base_layer.weight"], w) for n, w in base.items())
    unmerge_adapters(model)
    assert all(torch.equal(adapters[n].base_layer.weight, w) for n, w in base.items())


def test_the_saved_rank_of_gpu_blocks_loads_on_the_cpu_and_back(tmp_path):
    """`<layer>._extra_state` (the active rank) of a model on the GPU: saved with torch.save, loaded with
    map_location="cpu" into a CPU model and with map_location=device into a model on the device, and a state dict
    of device tensors loaded straight into a CPU model: each takes the saved rank and gives the same logits."""
    model = tiny_llama().to(DEV)
    adapters, _ = setup_unified_lora(model, ["q_proj", "v_proj"], print_fn=None)
    for layer in adapters.values():
        _random_B(layer, scale=0.5)
    set_rank(adapters, 16)
    sd = model.state_dict()
    extra = [k for k in sd if k.endswith("_extra_state")]
    assert extra and all(int(sd[k]) == 16 for k in extra)
    torch.save(sd, tmp_path / "sd.pt")
    x = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        ref = model(x.to(DEV)).logits.cpu()
    for where, source in (("cpu", torch.load(tmp_path / "sd.pt", map_location="cpu", weights_only=True)),
                          (DEV.type, torch.load(tmp_path / "sd.pt", map_location=DEV, weights_only=True)),
                          ("cpu", sd)):
        fresh = tiny_llama(seed=5).to(where)
        fa, _ = setup_unified_lora(fresh, ["q_proj", "v_proj"], print_fn=None)
        assert {a.rank for a in fa.values()} == {8}
        fresh.load_state_dict(source, strict=True)
        assert {a.rank for a in fa.values()} == {16}
        assert all(a.lora_A[2].device.type == where for a in fa.values())
        with torch.no_grad():
            torch.testing.assert_close(fresh(x.to(where)).logits.cpu(), ref, rtol=1e-4, atol=1e-4)
        if where == "cpu":  # and back to the device
            fresh.to(DEV)
            back = tiny_llama(seed=6).to(DEV)
            ba, _ = setup_unified_lora(back, ["q_proj", "v_proj"], print_fn=None)
            back.load_state_dict(fresh.state_dict(), strict=True)
            assert {a.rank for a in ba.values()} == {16}
            with torch.no_grad():
                torch.testing.assert_close(back(x.to(DEV)).logits.cpu(), ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ Mamba
def test_mamba_on_gpu_under_the_weight_watch():
    """transformers' Mamba on the device: with "all-linear" its mixer computes with dt_proj's weight directly, which
    the weight watch turns into a RuntimeError naming it (eval and training forward). Without dt_proj, a training
    forward either runs with every delta in it (the torch path, mamba-ssm's kernels absent: the same output and
    gradients as on the CPU) or, where the fused kernels are installed (they take x_proj's and out_proj's weights
    directly), is refused by the same watch rather than trained without those deltas."""
    from transformers import MambaConfig, MambaForCausalLM

    cfg = MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=4, num_hidden_layers=1, intermediate_size=64,
                      time_step_rank=4)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    mamba = MambaForCausalLM(cfg).to(DEV)
    setup_unified_lora(mamba, target_modules="all-linear", print_fn=None)
    for train in (False, True):
        mamba.train(train)
        with pytest.raises(RuntimeError, match=r"MambaMixer.forward computed with its '(dt|x|out)_proj.weight'"):
            mamba(input_ids=ids.to(DEV))
    runs = {}
    for dev in ("cpu", DEV.type):
        torch.manual_seed(0)
        m = MambaForCausalLM(cfg).to(dev)
        adapters, _ = setup_unified_lora(m, target_modules=["in_proj", "x_proj", "out_proj"], print_fn=None)
        for i, layer in enumerate(adapters.values()):
            _random_B(layer, seed=i)
        m.train()
        try:
            loss = m(input_ids=ids.to(dev), labels=ids.to(dev)).loss
        except RuntimeError as e:
            assert dev != "cpu" and "computed with its" in str(e) and "dt_proj" not in str(e), e
            pytest.skip(f"mamba-ssm's fused kernels run here; the watch refused them as it should: {e}")
        loss.backward()
        runs[dev] = (loss.item(), {n: layer.lora_A[0].grad.cpu() for n, layer in adapters.items()})
    assert runs[DEV.type][0] == pytest.approx(runs["cpu"][0], rel=1e-4)
    for n, g in runs["cpu"][1].items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(runs[DEV.type][1][n], g, rtol=1e-3, atol=1e-5, msg=n)


# -------------------------------------------------------------------------------------- bitsandbytes
def _bnb():
    try:
        import bitsandbytes
    except Exception as e:  # not installed, or no backend for this machine
        pytest.skip(f"bitsandbytes does not import here: {type(e).__name__}: {e}")
    return bitsandbytes


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("rank", [4, 16])
def test_the_forward_on_gpu_adds_the_delta_to_the_quantized_layers_output(quant_type, rank):
    """bitsandbytes' kernels (CUDA on the GPU, its CPU backend in the dry run) under a nested layer: y = q(x) +
    scaling · x Aᵀ Bᵀ with q the quantized layer's own output, fp32 blocks, for fp32 and bf16 inputs."""
    bnb = _bnb()
    torch.manual_seed(0)
    q, _ = quantized_linear(bnb, quant_type, DEV)  # (the move quantizes)
    layer = NestedLoRALayer(q, rank_levels=(4, 8, 16), initial_rank=rank)
    assert layer.lora_A[0].dtype == torch.float32 and layer.lora_A[0].device.type == DEV.type
    _random_B(layer)
    A, B = layer.active_A(), layer.active_B()
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 5, 64).to(dtype).to(DEV)
        with torch.no_grad():
            want = (q(x).float() + layer.scaling * (x.float() @ A.T @ B.T)).to(dtype)
            got = layer(x)
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-2)
        if dtype == torch.float32:
            assert (got - q(x)).abs().max() > 0.01


@pytest.mark.parametrize("kind", ["nf4-bf16", "int8"])
def test_training_a_quantized_model_on_gpu_through_a_mirror_cycle_changes_only_the_blocks(tmp_path, kind):
    """A tiny Llama quantized by from_pretrained on the device, all-linear nested layers, the controller through rank
    switches and a Mirror cycle: every block trains, every packed weight and its quant state stays bit-identical."""
    _bnb()
    from test_quantized import KINDS, _packed_state, _same_packed
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64)).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(**KINDS[kind]),
                                                 device_map={"": 0 if ON_GPU else "cpu"}).train()
    packed = _packed_state(model)
    assert packed and all(t.device.type == DEV.type for ts in packed.values() for t in ts[:1])
    adapters, ctrl = setup_unified_lora(model, "all-linear", print_fn=None,
                                        signal=SignalConfig(kind="loss", alpha=1.0, beta=0.01),
                                        mirror=MirrorConfig(policy="always", snapshot_optimizer=True))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctrl.attach_optimizer(opt)
    blocks = {n: [p.detach().clone() for p in layer.lora_parameters()] for n, layer in adapters.items()}
    x = torch.randint(0, 64, (2, 8)).to(DEV)
    for fake in (None, 10.0, 10.0, 1.0, 1.0, None):
        loss = model(x, labels=x).loss
        loss.backward()
        ctrl.step(loss.item() if fake is None else fake)
        opt.step()
        opt.zero_grad()
    assert [r.transition for r in ctrl.trace if r.transition][:2] == ["MULTI->MIRROR", "MIRROR->MULTI"]
    assert any(r.snapshot == "restored" for r in ctrl.trace)
    assert _same_packed(packed, _packed_state(model))
    for n, layer in adapters.items():
        assert layer.lora_A[0].device.type == DEV.type
        assert not all(torch.equal(a, b) for a, b in zip(blocks[n], layer.lora_parameters())), n


# ------------------------------------------------------------------- process groups: nccl at world size 1
GROUP_PHASES = ("ddp", "multitask", "fsdp")


@pytest.fixture(scope="module")
def group_runs(tmp_path_factory):
    """`_cuda_dist_worker.py ddp,multitask,fsdp` once, in one subprocess under a hard timeout (one interpreter start-up
    and one process group for the three tests below): its folder, and what each test reports if its phase left no
    record (the worker's exit status and stderr, or the timeout)."""
    out = tmp_path_factory.mktemp("group")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                       os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    timeout = 150 * len(GROUP_PHASES)
    try:
        p = subprocess.run([sys.executable, str(Path(__file__).with_name("_cuda_dist_worker.py")),
                            ",".join(GROUP_PHASES), DEV.type, str(out)], capture_output=True, text=True,
                           timeout=timeout, env=env)
        why = f"the worker exited {p.returncode}:\n{p.stderr[-4000:]}"
    except subprocess.TimeoutExpired as e:
        why = f"the process group did not finish in {timeout} s (a hang?)\n{_text(e.stderr)[-3000:]}"
    return out, why


def _text(out) -> str:
    """A subprocess's captured output as text: TimeoutExpired keeps bytes on POSIX even under text=True."""
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def _group_run(phase, group_runs):
    """What the worker recorded for `phase` (each phase's record is written as soon as it ends)."""
    out, why = group_runs
    if not (out / f"{phase}.pt").is_file():
        pytest.fail(f"{phase}: no record; {why}")
    rec = torch.load(out / f"{phase}.pt", weights_only=False)
    assert rec["backend"] == ("nccl" if ON_GPU else "gloo")
    # no torch.cuda.set_device in the worker: the collectives' device is the current one (cuda:0 on one GPU)
    assert rec["collective_device"] == ("cuda:0" if ON_GPU else "cpu")
    assert rec["all_reduce"] == 1.5 and rec["distributed_mean"] == 0.25
    assert rec["models_imported"] == []  # TinyClassifier's process: no transformers model imported (conftest's lazy)
    return rec


def _same_run(a, b, phi_rel=1e-6, atol=1e-6):
    """The same decisions on the same steps, φ (and drift) to float rounding, the same weights to `atol`."""
    assert [t[2:6] for t in a["trace"]] == [t[2:6] for t in b["trace"]]
    assert [t[1] for t in a["trace"]] == pytest.approx([t[1] for t in b["trace"]], rel=phi_rel)
    assert a["weights"].keys() == b["weights"].keys()
    for n, w in b["weights"].items():
        torch.testing.assert_close(a["weights"][n], w, rtol=0, atol=atol, msg=n)


def test_ddp_over_nccl_on_one_gpu_follows_the_bare_model_through_a_mirror_restore(group_runs):
    rec = _group_run("ddp", group_runs)
    assert rec["ddp"]["block_device"].startswith(DEV.type)
    assert any(t[4] == "restored" for t in rec["ddp"]["trace"]) and {t[3] for t in rec["ddp"]["trace"]} >= {8, 16}
    assert all(rec["ddp"]["paused_grad_none"])
    _same_run(rec["ddp"], rec["plain"], atol=1e-5)


def test_multitask_ddp_over_nccl_on_one_gpu_follows_the_bare_model_and_its_collectives_run(group_runs):
    rec = _group_run("multitask", group_runs)
    assert any(t[5] == "SINGLE->MULTI" for t in rec["ddp"]["trace"])
    _same_run(rec["ddp"], rec["plain"], phi_rel=1e-5, atol=1e-5)
    assert rec["task_losses"] == {"a": 0.5, "b": 0.25}  # in slot order, each the mean over the one process
    assert list(rec["task_grads"]) == [1] and torch.equal(rec["task_grads"][1], rec["task_grads_want"][1])
    assert rec["task_grads_device"] == [str(DEV) if not ON_GPU else "cuda:0"]


def test_fsdp2_over_nccl_on_one_gpu_trains_through_mirror_and_resumes_from_a_sharded_checkpoint(group_runs):
    rec = _group_run("fsdp", group_runs)
    assert rec["sharded"] == ["DTensor"] and rec["param_device"] == (["cuda:0"] if ON_GPU else ["cpu"])
    assert rec["held_at_save"] and rec["resumed_at"] == (17, True)
    assert any(t[4] == "saved" for t in rec["fsdp"]["trace"]) and any(t[6] is not None for t in rec["fsdp"]["trace"])
    _same_run(rec["fsdp"], rec["plain"], phi_rel=1e-5, atol=1e-5)
    resumed = rec["resumed"]  # steps 17.. of the run resumed from the checkpoint of step 16: the uninterrupted run's
    assert resumed["trace"][0][0] == 17
    _same_run(resumed, {"trace": rec["fsdp"]["trace"][17:], "weights": rec["fsdp"]["weights"]})


# ------------------------------------------------------------------- `unified-lora train` on the GPU
# (the tiny BERT classifier and data files of test_cli.py)
tiny = test_cli.tiny  # (a module-scoped fixture)


def _run_summary(out: Path) -> dict:
    import json

    return json.loads((out / "summary.json").read_text())


def test_the_cli_trains_on_the_gpu_in_bf16_with_grad_accum_and_says_where(tiny, tmp_path, capsys):
    from unified_lora.trace import read_trace

    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--device", str(DEV), "--precision", "bf16", "--grad-accum", "2", "--steps",
                            "3", "--threads", "1")) == 0
    summary = _run_summary(out)
    if ON_GPU:
        index = torch.cuda.current_device()
        assert summary["device"] == f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    else:
        assert summary["device"] == "cpu"
    assert summary["precision"] == "bf16" and summary["steps"] == 3
    assert f"device: {summary['device']}, precision bf16, 2 batches of 8 per step (16 rows)" in capsys.readouterr().out
    losses = [r["loss"] for r in read_trace(out / "trace.jsonl")]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    st = torch.load(out / "checkpoints" / "step-3" / "state.pt", weights_only=True)
    assert ("cuda_rng" in st) == ON_GPU  # the GPU's generator (dropout there draws from it)


def test_a_cli_run_saved_on_the_gpu_resumes_on_the_cpu_and_back(tiny, tmp_path):
    """The device is the machine's, not the run's: a checkpoint written on the GPU resumes on the CPU (state.pt is read
    onto the CPU, the optimizer's moments follow the parameters), and one written on the CPU resumes on the GPU. A
    Run on the GPU that loads a GPU checkpoint gets its optimizer state there and the GPU's RNG back."""
    from unified_lora.trace import read_trace
    from unified_lora.training import Run, TrainConfig, latest_checkpoint, load_model, read_state

    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--device", str(DEV), "--precision", "bf16", "--steps", "2", "--threads",
                            "1")) == 0
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "4", "--device", "cpu"]) == 0
    assert _run_summary(out)["device"] == "cpu"
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "6", "--device", str(DEV)]) == 0
    assert _run_summary(out)["device"].startswith(DEV.type) and _run_summary(out)["precision"] == "bf16"
    trace = read_trace(out / "trace.jsonl")
    assert [r["step"] for r in trace] == list(range(6)) and all(math.isfinite(r["loss"]) for r in trace)

    ckpt = latest_checkpoint(out / "checkpoints")
    st = read_state(ckpt)
    assert st["run"]["global_step"] == 6 and ("cuda_rng" in st) == ON_GPU
    cfg = TrainConfig.from_dict({**st["config"], "device": str(DEV)})
    model, _ = load_model(cfg.model, "seq-cls", 2)
    run = Run(cfg, model, "seq-cls", 2, None, print_fn=None, classes=st["classes"])
    run.load_checkpoint(ckpt)
    moments = [v for s in run.optimizer.state.values() for k, v in s.items() if k != "step" and torch.is_tensor(v)]
    assert moments and all(v.device.type == DEV.type for v in moments)
    assert all(p.device.type == DEV.type for p in run.model.parameters())
    if ON_GPU:
        assert torch.equal(torch.cuda.get_rng_state(run.device), st["cuda_rng"])


def test_predict_runs_on_the_gpu_in_bf16_and_scores_what_train_reported_there(tiny, tmp_path, capsys):
    """`unified-lora predict` on the device: a classifier trained there in bf16 predicts its dev rows there with the
    dev scores train printed (the same batches under the same autocast), and on the CPU in fp32 close to them; a tiny
    GPT-2 (test_cli's, with its BERT tokenizer) trained there generates there."""
    import csv
    import json

    out = tmp_path / "run"
    dev = tmp_path / "dev.csv"
    dev.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in test_cli._rows(12, seed=3)))
    assert main(_train_args(tiny, out, "--dev-data", str(dev), "--device", str(DEV), "--precision", "bf16",
                            "--steps", "2", "--threads", "1")) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("final @ step 2: dev ")]
    assert main(["predict", str(out), "--data", str(dev), "--device", str(DEV)]) == 0
    said = capsys.readouterr().out
    assert f"on {_run_summary(out)['device']}, precision bf16" in said
    assert printed and f"labelled rows (12, task train): {printed[0].split(': dev ')[1]}" in said
    assert main(["predict", str(out), "--data", str(dev), "--device", "cpu", "--precision", "fp32",
                 "--output", str(tmp_path / "cpu.csv")]) == 0
    with open(out / "predictions.csv") as f, open(tmp_path / "cpu.csv") as g:
        on_dev, on_cpu = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert [float(r["prob_1"]) for r in on_dev] == pytest.approx([float(r["prob_1"]) for r in on_cpu], abs=3e-2)

    lm = tmp_path / "lm"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(t for t, _ in test_cli._rows(64)) + "\n")
    assert main(["train", "--model", tiny["gpt2"], "--data", str(corpus), "--target-modules", "c_attn", "--steps",
                 "2", "--batch-size", "4", "--max-length", "16", "--device", str(DEV), "--precision", "bf16",
                 "--log-every", "0", "--output-dir", str(lm)]) == 0
    prompts = tmp_path / "p.txt"
    prompts.write_text("good movie\nthe plot was\n")
    assert main(["predict", str(lm), "--prompts", str(prompts), "--device", str(DEV), "--max-new-tokens", "5"]) == 0
    rows = [json.loads(line) for line in (lm / "predictions.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["good movie", "the plot was"] and all(r["stop"] for r in rows)
