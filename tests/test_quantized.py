"""Nested LoRA on quantized base layers (QLoRA): bitsandbytes' Linear4bit (nf4 / fp4) and Linear8bitLt, on CPU.

The quantized tiny Llama comes from transformers' own `from_pretrained(..., quantization_config=BitsAndBytesConfig)`
of a saved tiny folder. Its hidden size is 64 (not conftest's 32): bitsandbytes' CPU path repacks a 4-bit weight for
inference in eval mode and cannot do that for rows narrower than its 64-wide quant blocks (a wrapped layer turns that
repacking off; the unwrapped reference models here still do it).
"""

import pytest
import torch
import torch.nn as nn

# No skip without bitsandbytes: the [test] extra (constraints.txt pins it) installs it, and a CI run without it
# must fail here rather than pass without these tests.
import bitsandbytes as bnb
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from unified_lora import (MirrorConfig, NestedLoRALayer, SignalConfig, lora_state_dict, merge_adapters,
                          setup_unified_lora)
from unified_lora.peft_io import export_peft_adapter, import_peft_adapter, merge_and_unload

KINDS = {  # name: quantization config
    "nf4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "nf4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4-fp32": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "fp4-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16),
    "int8": dict(load_in_8bit=True),
}
QUANTIZED = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _load(path, kind="nf4-bf16"):
    q = None if kind is None else BitsAndBytesConfig(**KINDS[kind])
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu").train()


def _packed_state(model) -> dict:
    """{module name without `.base_layer`: every packed tensor of its quantized weight (the codes and the quant state /
    the 8-bit row scales, wherever bitsandbytes keeps them)}."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, QUANTIZED):
            w = m.weight
            qs = getattr(w, "quant_state", None)
            if qs is not None:
                extra = [t for t in qs.as_dict(packed=True).values() if torch.is_tensor(t)]
            else:  # Linear8bitLt moves its scales from the weight into its state at the first forward
                extra = [w.SCB if w.SCB is not None else m.state.SCB]
            out[n.replace(".base_layer", "")] = [w.detach().clone()] + [t.clone() for t in extra]
    return out


def _same_packed(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        len(a[n]) == len(b[n]) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a[n], b[n])) for n in a)


def _randomise_B(adapters, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapters.values():
            for b in layer.lora_B:
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "down_proj"], "all-linear"], ids=["names", "all-linear"])
def test_setup_on_a_quantized_base_builds_fp32_blocks_shaped_by_the_layer(llama_dir, kind, targets):
    """A 4-bit or 8-bit base: the old code refused the 4-bit targets as "not a linear map" (its probe fed the
    layer a row in the weight's uint8 dtype) and crashed in the 8-bit ones' block creation ("Only Tensors of
    floating point and complex dtype can require gradients": the blocks took the int8 weight's dtype). The blocks
    now are (r × in_features) / (out_features × r) in fp32 on the weight's device, and "all-linear" takes every
    quantized Linear (7 per decoder layer), not the float lm_head."""
    model = _load(llama_dir, kind)
    adapters, _ = setup_unified_lora(model, targets, print_fn=None)
    assert len(adapters) == (6 if targets != "all-linear" else 14)
    for name, layer in adapters.items():
        base = layer.base_layer
        assert isinstance(base, QUANTIZED) and not base.weight.is_floating_point(), name
        for a, b, (s, e) in zip(layer.lora_A, layer.lora_B, zip((0, 4, 8), (4, 8, 16))):
            assert a.shape == (e - s, base.in_features) and b.shape == (base.out_features, e - s)
            assert a.dtype == b.dtype == torch.float32 and a.device == base.weight.device and a.requires_grad
        assert not any(p.requires_grad for p in base.parameters())
    x = torch.randint(0, 64, (2, 8))
    model(x, labels=x).loss.backward()
    assert all(layer.lora_A[0].grad is not None for layer in adapters.values())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("rank", [4, 16])  # one block (plain ops) and several (the nested Function)
def test_the_forward_adds_the_delta_to_the_quantized_layers_output(quant_type, rank):
    """y = q(x) + scaling · x Aᵀ Bᵀ with q the quantized layer's own output, for an fp32 and a bf16 input (the
    bf16 output is the fp32 sum rounded once, as PEFT's bnb layers add their fp32 delta)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    if quant_type == "int8":
        q = bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=False, threshold=0.0)
    else:
        q = bnb.nn.Linear4bit(64, 48, compute_dtype=torch.bfloat16, quant_type=quant_type)
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu")  # quantizes
    layer = NestedLoRALayer(q, rank_levels=(4, 8, 16), initial_rank=rank)
    assert layer.lora_A[0].dtype == torch.float32
    _randomise_B({"q": layer})
    A, B = layer.active_A(), layer.active_B()
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 5, 64).to(dtype)
        with torch.no_grad():
            want = (q(x).float() + layer.scaling * (x.float() @ A.T @ B.T)).to(dtype)
            got = layer(x)
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0 if dtype == torch.float32 else 1e-2)
        if dtype == torch.float32:
            assert (got - q(x)).abs().max() > 0.01  # the delta is there


@pytest.mark.parametrize("kind", ["nf4-bf16", "fp4-fp32", "int8"])
def test_training_with_rank_switches_and_a_mirror_cycle_changes_only_the_blocks(llama_dir, kind):
    """A run under the controller with rank switches and a forced Mirror cycle (the loss signal: a loss of 10 enters
    MIRROR, 1 leaves it): every LoRA block trains, and every packed base weight and its quant state (4-bit absmax
    and code map, 8-bit row scales) stays bit-identical, as do the float parameters (norms, embeddings, lm_head)."""
    model = _load(llama_dir, kind)
    floats = {n: p.detach().clone() for n, p in model.named_parameters() if p.is_floating_point()}
    packed = _packed_state(model)
    adapters, ctrl = setup_unified_lora(model, "all-linear", print_fn=None,
                                        signal=SignalConfig(kind="loss", alpha=1.0, beta=0.01),
                                        mirror=MirrorConfig(policy="never"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctrl.attach_optimizer(opt)
    blocks = {n: [p.detach().clone() for p in layer.lora_parameters()] for n, layer in adapters.items()}
    x = torch.randint(0, 64, (2, 8))
    for fake in (None, 10.0, 10.0, 1.0, 1.0, None):
        loss = model(x, labels=x).loss
        loss.backward()
        ctrl.step(loss.item() if fake is None else fake)
        opt.step()
        opt.zero_grad()
    assert [r.transition for r in ctrl.trace if r.transition][:2] == ["MULTI->MIRROR", "MIRROR->MULTI"]
    assert {r.rank for r in ctrl.trace} >= {8, 16}
    assert _same_packed(packed, _packed_state(model))
    now = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if ".lora_" not in n}
    assert all(torch.equal(now[n], w) for n, w in floats.items())
    for n, layer in adapters.items():
        assert not all(torch.equal(a, b) for a, b in zip(blocks[n], layer.lora_parameters())), n


def test_the_composite_signal_reads_the_block_gradients_of_a_quantized_model(llama_dir):
    model = _load(llama_dir, "nf4-bf16")
    adapters, ctrl = setup_unified_lora(model, "all-linear", print_fn=None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ctrl.attach_optimizer(opt)
    x = torch.randint(0, 64, (2, 8))
    for _ in range(3):
        loss = model(x, labels=x).loss
        loss.backward()
        ctrl.step(loss.item())
        opt.step()
        opt.zero_grad()
    S = ctrl.signal.state_dict()["S"]
    assert len(S) == len(adapters) == 14 and all(s is not None and 0 < s < float("inf") for s in S)
    assert ctrl.trace[-1].components["S"] > 0 and ctrl.trace[-1].components["E"] > 0


@pytest.mark.parametrize("kind", ["nf4-bf16", "int8"])
def test_merging_a_quantized_layer_is_refused_before_any_layer_changes(llama_dir, kind):
    """The old `merge` added the delta to the packed integer codes (`_folded` on the uint8/int8 weight). Every way
    to merge now raises a ValueError that gives the full-precision recipe, and the model is left as it was: no
    layer merged, the same output, the nested layers still in place."""
    model = _load(llama_dir, kind)
    adapters, _ = setup_unified_lora(model, ["q_proj", "v_proj"], print_fn=None)
    _randomise_B(adapters)
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        before = model(x).logits
    packed = _packed_state(model)
    for merge in (merge_adapters, merge_and_unload, lambda m: next(iter(adapters.values())).merge()):
        with pytest.raises(ValueError, match=r"quantized .*export_peft_adapter.*without quantization_config.*"
                                             r"import_peft_adapter.*merge_and_unload"):
            merge(model)
        assert not any(layer.merged_rank for layer in adapters.values())
        assert all(isinstance(model.get_submodule(n), NestedLoRALayer) for n in adapters)
        assert _same_packed(packed, _packed_state(model))
        with torch.no_grad():
            assert torch.equal(model(x).logits, before)


def test_a_peft_export_from_a_quantized_model_loads_into_quantized_and_full_precision_bases(llama_dir, tmp_path):
    """export_peft_adapter from a 4-bit model (it built PEFT's own bnb layer on a meta copy of the packed weight and
    failed: 'Parameter' object has no attribute 'compress_statistics'); the export loads with import_peft_adapter
    into a 4-bit base (same outputs) and into the fp32 base (the same adapter tensors), and with PEFT's own
    PeftModel.from_pretrained on a 4-bit base (same outputs)."""
    from peft import PeftModel

    model = _load(llama_dir, "nf4-fp32")
    adapters, _ = setup_unified_lora(model, ["q_proj", "v_proj", "down_proj"], print_fn=None)
    _randomise_B(adapters)
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        ref = model(x).logits
    export_peft_adapter(model, None, tmp_path)

    def same_tensors(imported):
        return all(torch.equal(adapters[n].full_A()[:8], layer.full_A()[:8])
                   and torch.equal(adapters[n].full_B()[:, :8], layer.full_B()[:, :8])
                   for n, layer in imported.adapters.items()) and sorted(imported.adapters) == sorted(adapters)

    q = _load(llama_dir, "nf4-fp32")
    imported = import_peft_adapter(q, tmp_path)
    assert same_tensors(imported) and imported.rank == 8
    assert all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in imported.adapters.values())
    with torch.no_grad():
        assert torch.equal(q(x).logits, ref)
    full = _load(llama_dir, None)
    assert same_tensors(import_peft_adapter(full, tmp_path))
    peft_model = PeftModel.from_pretrained(_load(llama_dir, "nf4-fp32"), tmp_path).train()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, ref, rtol=1e-5, atol=1e-5)


def test_lora_state_dict_and_the_controller_state_round_trip_on_a_quantized_model(llama_dir):
    """lora_state_dict of a 4-bit model holds the fp32 blocks and ranks (no packed weight); loaded into a fresh
    4-bit model it gives the same outputs, and the controller's state (with a Mirror snapshot) loads too."""
    model = _load(llama_dir, "nf4-bf16")
    adapters, ctrl = setup_unified_lora(model, ["q_proj", "v_proj"], print_fn=None,
                                        signal=SignalConfig(kind="loss", alpha=1.0, beta=0.01))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctrl.attach_optimizer(opt)
    x = torch.randint(0, 64, (2, 8))
    for fake in (None, 10.0):
        model(x, labels=x).loss.backward()
        ctrl.step(fake or 1.0)
        opt.step()
        opt.zero_grad()
    assert ctrl.mirror.held
    sd = lora_state_dict(model)
    assert all(v.is_floating_point() for k, v in sd.items() if ".lora_" in k)
    assert not any("base_layer" in k for k in sd)
    model2 = _load(llama_dir, "nf4-bf16")
    adapters2, ctrl2 = setup_unified_lora(model2, ["q_proj", "v_proj"], print_fn=None,
                                          signal=SignalConfig(kind="loss", alpha=1.0, beta=0.01))
    missing, unexpected = model2.load_state_dict(sd, strict=False)
    assert not unexpected
    ctrl2.attach_optimizer(torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad], lr=1e-2))
    ctrl2.load_state_dict(ctrl.state_dict())
    with torch.no_grad():
        assert torch.equal(model2(x).logits, model(x).logits)


def test_multitask_layers_on_a_quantized_base_train_their_task_blocks(llama_dir):
    from unified_lora.multitask import setup_multitask_lora, task_context

    model = _load(llama_dir, "nf4-bf16")
    packed = _packed_state(model)
    adapters, ctrl = setup_multitask_lora(model, tasks=["a", "b"], target_modules=["q_proj", "v_proj"],
                                          print_fn=None)
    layer = next(iter(adapters.values()))
    assert all(p.dtype == torch.float32 for p in layer.lora_parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctrl.attach_optimizer(opt)
    x = torch.randint(0, 64, (2, 8))
    with task_context(model, ["a", "b"]):
        model(x, labels=x).loss.backward()
    opt.step()
    assert _same_packed(packed, _packed_state(model))
    assert all(layer.lora_tasks[0].lora_A[0].grad is not None for layer in adapters.values())
    model.task_router.set_topology("shared")  # (in MULTI/MIRROR a merge is refused for the task adapters already)
    with pytest.raises(ValueError, match="quantized"):
        merge_adapters(model)


def test_all_linear_leaves_a_4bit_layers_compute_dtype_to_its_first_input():
    """Linear4bit built without a compute dtype takes its first input's dtype. Injection does not run the layer
    (the old "is it a linear map" probe ran it on a zero row, in uint8, and refused it), so a bf16 model's first
    forward still sets bf16."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    q = bnb.nn.Linear4bit(64, 64, compute_dtype=None, quant_type="nf4")
    q.load_state_dict(lin.state_dict())
    model = nn.Sequential(q.to("cpu"), nn.ReLU(), nn.Linear(64, 8, dtype=torch.bfloat16))
    adapters, _ = setup_unified_lora(model, "all-linear", print_fn=None)
    assert list(adapters) == ["0", "2"] and not q.compute_type_is_set
    assert model(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert q.compute_dtype == torch.bfloat16


def _q4(n_in, n_out, seed=0):
    torch.manual_seed(seed)
    q = bnb.nn.Linear4bit(n_in, n_out, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(nn.Linear(n_in, n_out).state_dict())
    return q.to("cpu")


class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = _q4(64, 8, seed=1)

    def forward(self, x):
        return self.dense(x)


def test_a_peft_export_that_would_fold_a_delta_into_a_saved_quantized_module_is_refused(tmp_path):
    """A nested layer inside a module that PEFT saves whole is exported as that module's weight with the delta
    folded in; on a quantized base that fold would act on the packed codes, so it is a ValueError saying what to do,
    and nothing is written."""
    model = nn.Sequential(_q4(64, 64), nn.ReLU(), _Head())
    setup_unified_lora(model, "all-linear", print_fn=None)
    with pytest.raises(ValueError, match=r"modules_to_save: a nested layer on a quantized base \(Linear4bit"):
        export_peft_adapter(model, None, tmp_path / "out", modules_to_save=["2"], task_type=None)
    assert not (tmp_path / "out").exists()


def test_why_merge_is_refused_a_requantized_merge_moves_the_outputs_by_a_large_part_of_the_delta(llama_dir):
    """The merge a quantized layer would need (PEFT's: dequantize with bitsandbytes, add the delta in fp32, quantize
    again), done by hand on every 4-bit layer of the tiny Llama with small deltas: the merged model's logits differ
    from the unmerged ones by about 45% of what the deltas themselves change (measured 0.015 against 0.032, mean
    absolute logit differences), so such a merge is no stand-in for the trained adapter; the README quotes this."""
    import bitsandbytes.functional as bnbF

    model = _load(llama_dir, "nf4-fp32")
    adapters, _ = setup_unified_lora(model, "all-linear", print_fn=None)
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(x).logits  # B = 0: no delta
        g = torch.Generator().manual_seed(0)
        for layer in adapters.values():
            for b in layer.lora_B:
                b.copy_(torch.randn(b.shape, generator=g) * 0.01)
        unmerged = model(x).logits
        for layer in adapters.values():
            w = layer.base_layer.weight
            W = bnbF.dequantize_4bit(w.data, w.quant_state).float() + layer.delta_weight(dtype=torch.float32)
            layer.base_layer.weight = bnb.nn.Params4bit(
                W, requires_grad=False, quant_type=w.quant_type, blocksize=w.blocksize,
                compress_statistics=w.compress_statistics, quant_storage=w.quant_storage).to("cpu")
            layer.merged_rank = layer.rank  # (the forward then runs the base alone, as a merged layer does)
        merged = model(x).logits
    effect, error = (unmerged - plain).abs().mean().item(), (merged - unmerged).abs().mean().item()
    assert 0.2 * effect < error < effect, (error, effect)


@pytest.mark.parametrize("kind", ["nf4-fp32", "nf4-bf16"])
def test_an_eval_forward_before_training_leaves_the_gradients_as_they_were(llama_dir, kind):
    """bitsandbytes 0.50.2 on a CPU with AVX512-BF16 (this machine's kind): a Linear4bit's first forward in eval mode,
    on an input that needs no gradient, repacked its weight in place for a CPU inference kernel, and a backward
    after it went through a kernel with no autograd support: the gradients through the base layers came out wrong
    (the first layers' block gradients about 95% off). An evaluation in the middle of training is routine, so the
    nested layer turns that repacking off on the 4-bit base it wraps (`support_avx512bf16_for_cpu = False`), and
    the gradients after an eval are those of a run without it. (On a CPU without AVX512-BF16 bitsandbytes never
    repacks, and both runs agree either way.)"""
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))

    def grads(evaluate_first: bool):
        model = _load(llama_dir, kind)
        torch.manual_seed(0)  # the same A blocks in both runs
        adapters, _ = setup_unified_lora(model, ["q_proj", "v_proj", "down_proj"], print_fn=None)
        _randomise_B(adapters)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
            model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: [p.grad.clone() for p in layer.active_parameters()] for n, layer in adapters.items()}

    plain, after_eval = grads(False), grads(True)
    assert plain.keys() == after_eval.keys()
    for n in plain:
        for g, h in zip(plain[n], after_eval[n]):
            assert torch.equal(g, h), n
