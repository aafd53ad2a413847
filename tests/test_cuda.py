"""CUDA checks: the same maths on a GPU as on the CPU. Skipped where torch sees no GPU (CI);
run them on a GPU machine with `pytest tests/test_cuda.py`."""

import copy

import pytest
import torch

from conftest import can_build_cpp, classification_batch, snapshot_then_train, tiny_bert
from unified_lora import (ActuatorConfig, MirrorConfig, MirrorSnapshot, NestedLoRALayer, SignalConfig,
                          setup_unified_lora)
from unified_lora.peft_io import export_peft_adapter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


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
    gpu = copy.deepcopy(cpu).to(CUDA)
    x = torch.randn(3, 7, 48, requires_grad=True)
    xg = x.detach().to(CUDA).requires_grad_(True)
    gy = torch.randn(3, 7, 40)
    y, yg = cpu(x), gpu(xg)
    y.backward(gy)
    yg.backward(gy.to(CUDA))
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
    ref = ref.to(CUDA)
    bf = copy.deepcopy(ref).to(torch.bfloat16)
    x = torch.randn(4, 64, 256, device=CUDA)
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
    py = NestedLoRALayer(torch.nn.Linear(96, 80), rank_levels=(4, 8, 16), lora_alpha=16, initial_rank=rank).to(CUDA)
    with torch.no_grad():
        for b in py.lora_B:
            b.normal_(0, 0.05)
    cpp = copy.deepcopy(py)
    cpp.kernel = "cpp"
    x = torch.randn(4, 32, 96, device=CUDA)
    gy = torch.randn(4, 32, 80, device=CUDA)
    outs = []
    for layer in (py, cpp):
        xx = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
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
    ps = [torch.nn.Parameter(torch.randn(8, 32, generator=g).to(CUDA)) for _ in range(6)]
    opt = torch.optim.AdamW(ps, lr=0.1)
    sum(p.sum() for p in ps).backward()
    opt.step()
    snap = MirrorSnapshot(MirrorConfig(snapshot_optimizer=True, offload_to_cpu=offload, pack=pack))
    w, m = snapshot_then_train(snap, ps, opt)
    assert snap.weights[0].device.type == ("cpu" if offload else "cuda")
    assert len({p.untyped_storage().data_ptr() for p in ps}) == (1 if pack else 6)
    d = snap.drift(ps)
    expect = sum((p.detach() - q).norm().item() for p, q in zip(ps, w)) / sum(q.norm().item() for q in w)
    assert d == pytest.approx(expect, rel=1e-4) and d > 0
    snap.restore(ps, optimizer=opt)
    assert all(torch.equal(p, q) for p, q in zip(ps, w)) and torch.equal(opt.state[ps[0]]["exp_avg"], m)
    assert all(p.device.type == "cuda" for p in ps)


def test_controller_stress_cycle_on_gpu_and_peft_export_from_gpu_weights(tmp_path):
    """Corrupted labels drive MIRROR (v3 composite signal reads the GPU gradients), clean data brings
    the machine back, and the adapter exported from the GPU model loads in PEFT with the same logits."""
    from peft import PeftModel

    model = tiny_bert().to(CUDA)
    base = copy.deepcopy(model).cpu()
    adapters, ctrl = setup_unified_lora(model, target_modules=["query", "value"], modules_to_save=["classifier"],
                                        signal=SignalConfig(kind="loss", loss_scale=0.5), print_fn=None,
                                        actuators=ActuatorConfig(lr_mode="absolute", mode_lrs=(1e-2, 1e-2, 5e-4)))
    assert all(a.lora_A[0].device.type == "cuda" for a in adapters.values())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctrl.attach_optimizer(opt)
    x, y = classification_batch(64)
    x, y = x.to(CUDA), y.to(CUDA)
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
    for dev in ("cpu", "cuda"):
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
    assert phis["cuda"] == pytest.approx(phis["cpu"], abs=1e-4)
