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

from conftest import quantized_linear

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
    q, _ = quantized_linear(bnb, quant_type, "cpu")  # (the move quantizes)
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


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, seed=0):
        self.x = torch.randint(0, 64, (n, 8), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _trainer(model, out, **kw):
    from transformers import Trainer, TrainingArguments

    from unified_lora.callbacks import quantized_model_for_trainer

    args = dict(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=6,
                learning_rate=1e-2, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, seed=0, data_seed=0)
    args.update(kw)
    with quantized_model_for_trainer(model):
        trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=_Tokens(),
                          eval_dataset=_Tokens(4, seed=1))
    return trainer


def _saved_blocks(folder) -> dict:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if ".lora_" in k}


@pytest.mark.parametrize("kind", ["nf4-bf16", "int8"])
def test_the_stock_trainer_trains_a_quantized_model_with_nested_layers_and_reloads_its_checkpoints(llama_dir,
                                                                                                  tmp_path, kind):
    """transformers' Trainer refuses a quantized model that is not a PEFT model ("purely quantized"), nested layers
    or not. Built inside `quantized_model_for_trainer(model)` it takes it, and the mark it reads is gone after, so
    `save_pretrained` and the checkpoints are as without it (adapter-only: the callback's default on a quantized base). A run with accumulation 2, evaluations, checkpoints
    every 2 steps and a Mirror entry (a rank switch 8 -> 16 at the second step) trains every block and leaves every
    packed weight and quant state bit-identical; `load_best_model_at_end` gives the model the best checkpoint's
    blocks and the controller its state; a fresh model resumed from checkpoint-2 comes back at rank 16 with the
    snapshot held and reaches checkpoint-4's blocks bit for bit. On an 8-bit base the best-model load used to fail
    after the whole run (bitsandbytes' Linear8bitLt refuses its own state dict once a forward has moved its row
    scales: "Loading a quantized checkpoint into non-quantized Linear8bitLt is not supported")."""
    from transformers import Trainer, TrainingArguments

    from unified_lora.callbacks import UnifiedLoRACallback

    def build():
        model = _load(llama_dir, kind)
        adapters, ctrl = setup_unified_lora(model, ["q_proj", "v_proj", "down_proj"], print_fn=None,
                                            signal=SignalConfig(kind="loss", alpha=0.5, loss_scale=0.1))
        return model, adapters, ctrl

    model, adapters, ctrl = build()
    with pytest.raises(ValueError, match="purely quantized"):  # what the helper is for
        Trainer(model=model, args=TrainingArguments(str(tmp_path / "x"), report_to="none", use_cpu=True))
    packed = _packed_state(model)
    blocks = {n: [p.detach().clone() for p in layer.lora_parameters()] for n, layer in adapters.items()}
    out = tmp_path / "out"
    trainer = _trainer(model, out, load_best_model_at_end=True, metric_for_best_model="loss")
    assert "_hf_peft_config_loaded" not in vars(model) and model._hf_peft_config_loaded is False
    cb = UnifiedLoRACallback(ctrl).add_to(trainer)
    trainer.train()

    assert [r.rank for r in ctrl.trace] == [8] + [16] * 5 and ctrl.trace[1].transition == "MULTI->MIRROR"
    assert len([h for h in trainer.state.log_history if "eval_loss" in h]) == 3
    assert _same_packed(packed, _packed_state(model))
    for n, layer in adapters.items():
        assert not all(torch.equal(a, b) for a, b in zip(blocks[n], layer.lora_parameters())), n
    best = trainer.state.best_model_checkpoint
    assert best is not None and cb.best_loaded_from == best
    now = model.state_dict()
    assert all(torch.equal(v, now[k]) for k, v in _saved_blocks(tmp_path / best).items())

    model2, adapters2, ctrl2 = build()
    assert {layer.rank for layer in adapters2.values()} == {8}
    trainer2 = _trainer(model2, out, max_steps=4)
    UnifiedLoRACallback(ctrl2).add_to(trainer2)
    trainer2.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert ctrl2.rank == 16 and ctrl2.mirror.held and {layer.rank for layer in adapters2.values()} == {16}
    now = model2.state_dict()
    saved = _saved_blocks(out / "checkpoint-4")
    assert len(saved) == 36 and all(torch.equal(v, now[k]) for k, v in saved.items())
    assert _same_packed(packed, _packed_state(model2))


def test_quantized_model_for_trainer_needs_nested_layers_and_leaves_a_float_model_alone(llama_dir):
    from unified_lora.callbacks import quantized_model_for_trainer

    with pytest.raises(ValueError, match="no nested LoRA layer with trainable blocks.*setup_unified_lora"):
        with quantized_model_for_trainer(_load(llama_dir)):
            pass
    model = _load(llama_dir, None)
    setup_unified_lora(model, ["q_proj"], print_fn=None)
    with quantized_model_for_trainer(model):
        assert "_hf_peft_config_loaded" not in vars(model)
    model = _load(llama_dir)
    setup_unified_lora(model, ["q_proj"], print_fn=None)
    with pytest.raises(RuntimeError, match="boom"):
        with quantized_model_for_trainer(model):
            assert model._hf_peft_config_loaded is True
            raise RuntimeError("boom")
    assert "_hf_peft_config_loaded" not in vars(model)


def test_an_8bit_layer_loads_its_own_state_dict_after_a_forward(llama_dir, tmp_path):
    """bitsandbytes' Linear8bitLt moves its row scales from the weight into its state at its first forward and
    then refused to load a state dict ("non-quantized Linear8bitLt"), wrapped or not: setup gives every 8-bit layer
    of the model a pre-hook that puts them back on the weight, so a trained model loads its own state dict, or
    another 8-bit model's (and then computes that model's outputs)."""
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64)).save_pretrained(tmp_path)
    a, b = _load(llama_dir, "int8"), _load(tmp_path, "int8")
    for m in (a, b):
        setup_unified_lora(m, ["q_proj", "v_proj"], print_fn=None)
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        ya, yb = a(x).logits, b(x).logits
    assert not torch.equal(ya, yb)
    assert a.load_state_dict(a.state_dict(), strict=True) == ([], [])
    with torch.no_grad():
        assert torch.equal(a(x).logits, ya)
    assert a.load_state_dict(b.state_dict(), strict=True) == ([], [])
    with torch.no_grad():
        assert torch.equal(a(x).logits, yb)


@pytest.mark.parametrize("reentrant", [False, True])
def test_prepare_model_for_kbit_training_and_gradient_checkpointing_give_the_blocks_the_same_gradients(llama_dir,
                                                                                                      reentrant):
    """PEFT's `prepare_model_for_kbit_training` (frozen base, fp32 norms, input gradients, gradient checkpointing)
    before setup: the nested layers train under checkpointing, and their gradients, at rank 8 and after a switch
    to 16, are those of the same model without checkpointing (the recomputed forward runs the same blocks)."""
    from peft import prepare_model_for_kbit_training

    from unified_lora import set_rank

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))

    def grads(checkpointing: bool):
        model = prepare_model_for_kbit_training(_load(llama_dir), use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        assert model.is_gradient_checkpointing == checkpointing
        torch.manual_seed(0)
        adapters, _ = setup_unified_lora(model, ["q_proj", "v_proj", "down_proj"], print_fn=None)
        _randomise_B(adapters)
        out = []
        for rank in (8, 16):
            set_rank(adapters, rank)
            model(input_ids=ids, labels=ids).loss.backward()
            out.append({n: [p.grad.clone() for p in layer.active_parameters()] for n, layer in adapters.items()})
            model.zero_grad()
        return out

    plain, checkpointed = grads(False), grads(True)
    for p, c in zip(plain, checkpointed):
        assert p.keys() == c.keys() and len(p) == 6
        for n in p:
            assert len(p[n]) == len(c[n])
            for g, h in zip(p[n], c[n]):
                assert g.abs().sum() > 0, n
                torch.testing.assert_close(h, g, rtol=0, atol=0)


def test_a_4bit_base_stored_as_bf16_is_packed_whatever_its_storage_dtype(llama_dir):
    """`bnb_4bit_quant_storage=torch.bfloat16` (the FSDP-QLoRA setting), with double quantization: the packed codes
    are a [N, 1] bf16 tensor, which the old `packed_weight` took for a float weight. Setup then ran its linear-map
    probe (an eval forward without grad) on every 4-bit layer, and on a CPU with AVX512-BF16 that repacked each
    weight in place for bitsandbytes' inference kernel ([N, 1] bf16 became [out, in/2] uint8), whose backward has
    no autograd: the block gradients differed from the uint8-stored model's by up to ~30 %. The blocks were bf16
    with autocast_adapter_dtype=False, and a merge failed with a bare shape error. Now such a layer is packed like
    a uint8 one: the weight is left as it was, the blocks are fp32, outputs and gradients equal the uint8-stored
    model's bit for bit, and merging is refused."""
    cfg = dict(KINDS["nf4-fp32"], bnb_4bit_use_double_quant=True)
    grads, logits = [], []
    for storage in (torch.uint8, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(
            llama_dir, device_map="cpu",
            quantization_config=BitsAndBytesConfig(**cfg, bnb_4bit_quant_storage=storage)).train()
        bases = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        codes = {n: m.weight.detach().view(torch.uint8).clone() for n, m in bases.items()}  # (bf16 codes: NaNs)
        assert all(m.weight.dtype == storage and m.weight.shape[1] == 1 for m in bases.values())
        torch.manual_seed(0)
        adapters, _ = setup_unified_lora(model, "all-linear", print_fn=None, autocast_adapter_dtype=False)
        assert len(adapters) == 14
        assert all(m.weight.dtype == storage and torch.equal(m.weight.detach().view(torch.uint8), codes[n])
                   for n, m in bases.items())
        assert all(p.dtype == torch.float32 for layer in adapters.values() for p in layer.lora_parameters())
        _randomise_B(adapters)
        x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
        out = model(x, labels=x)
        out.loss.backward()
        logits.append(out.logits.detach())
        grads.append({n: layer.lora_A[0].grad.clone() for n, layer in adapters.items()})
        with pytest.raises(ValueError, match=r"quantized \(Linear4bit \(Params4bit, packed torch\.(uint8|bfloat16)"):
            merge_adapters(model)
        assert not any(layer.merged_rank for layer in adapters.values())
    assert torch.equal(logits[0], logits[1])
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def _peft_lora_grads(llama_dir, evaluate_first: bool, attach: bool) -> dict:
    from peft import LoraConfig, get_peft_model

    from unified_lora.peft_io import attach_to_peft_model

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    model = _load(llama_dir, "nf4-fp32")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    if attach:
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
        attach_to_peft_model(peft_model, opt)
    if evaluate_first:
        peft_model.eval()
        with torch.no_grad():
            peft_model(input_ids=ids)
        peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in peft_model.named_parameters() if "lora_" in n}


def test_attach_to_peft_model_keeps_a_4bit_peft_models_gradients_through_an_evaluation(llama_dir):
    """A PEFT QLoRA model under `attach_to_peft_model`: the repacking for bitsandbytes' CPU inference kernel (see
    `test_an_eval_forward_before_training_leaves_the_gradients_as_they_were`) was turned off only by our own setup,
    so after one evaluation every LoRA gradient of the tiny Llama's q_proj/v_proj was None (the backward stopped at
    the repacked o_proj and MLP layers) and training under the controller went on without them. The controller
    now turns it off on the PEFT model too: the gradients after an eval are those of a run without it. (Without
    AVX512-BF16 bitsandbytes never repacks, and the runs agree either way.)"""
    plain = _peft_lora_grads(llama_dir, evaluate_first=False, attach=True)
    after_eval = _peft_lora_grads(llama_dir, evaluate_first=True, attach=True)
    assert len(plain) == 8 and plain.keys() == after_eval.keys()
    for n in plain:
        assert plain[n] is not None and after_eval[n] is not None and torch.equal(plain[n], after_eval[n]), n


def test_setup_refuses_4bit_layers_that_an_evaluation_already_repacked(llama_dir):
    """An evaluation of the 4-bit base before setup (a baseline) repacked its weights for bitsandbytes' CPU inference
    kernel on a CPU with AVX512-BF16, and setup, which turns the repacking off for later forwards, left them so:
    training then backpropagated through a kernel without autograd (the block gradients were 0 or off by their
    whole size), and bitsandbytes' own inverse does not give the weights back exactly. Setup and
    `attach_to_peft_model` now refuse such a model with a ValueError that says to set up before evaluating, and
    leave it unwrapped; set up first, the same evaluation changes nothing."""
    from peft import LoraConfig, get_peft_model

    from unified_lora.peft_io import attach_to_peft_model

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    model = _load(llama_dir, "nf4-fp32").eval()
    with torch.no_grad():
        model(input_ids=ids)
    if not bnb.functional.has_avx512bf16():  # bitsandbytes never repacks here: nothing to refuse
        setup_unified_lora(model, ["q_proj", "v_proj"], print_fn=None)
        return
    assert all(m.weight.quant_state.packing_format_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    with pytest.raises(ValueError, match=r"setup: bitsandbytes has repacked the 4-bit weights of "
                                         r"'model\.layers\.0\.self_attn\.q_proj'.*\(11 more\).*call setup before"):
        setup_unified_lora(model, ["q_proj", "v_proj"], print_fn=None)
    assert not any(isinstance(m, NestedLoRALayer) for m in model.modules())
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match=r"attach_to_peft_model: bitsandbytes has repacked"):
        attach_to_peft_model(peft_model)

    model = _load(llama_dir, "nf4-fp32")
    setup_unified_lora(model, ["q_proj", "v_proj"], print_fn=None)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in model.modules()
                   if isinstance(m, bnb.nn.Linear4bit))


@pytest.mark.parametrize("kind", ["nf4-fp32", "int8"])
def test_a_quantized_classifier_head_in_modules_to_save_is_refused_with_the_skip_modules_recipe(tmp_path, kind):
    """A 4-bit or 8-bit BertForSequenceClassification: transformers quantizes its `classifier` (it leaves only the
    output embeddings in full precision), and `modules_to_save=["classifier"]` raised a bare RuntimeError ("only
    Tensors of floating point dtype can require gradients"). Now a ValueError names the head and gives
    bitsandbytes' `llm_int8_skip_modules`, the model is left unwrapped, and with that setting the head trains in
    fp32 beside the blocks while the packed weights stay as they were."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=128, max_position_embeddings=64,
                                             num_labels=3)).save_pretrained(tmp_path)

    def load(**skip):
        return AutoModelForSequenceClassification.from_pretrained(
            tmp_path, device_map="cpu", quantization_config=BitsAndBytesConfig(**KINDS[kind], **skip)).train()

    model = load()
    assert isinstance(model.classifier, QUANTIZED)
    with pytest.raises(ValueError, match=r"modules_to_save: 'classifier' has a quantized weight \(Linear(4bit|8bitLt)"
                                         r".*BitsAndBytesConfig\(\.\.\., llm_int8_skip_modules=\['classifier'\]\)"):
        setup_unified_lora(model, ["query", "value"], modules_to_save=["classifier"], print_fn=None)
    assert not any(isinstance(m, NestedLoRALayer) for m in model.modules())

    model = load(llm_int8_skip_modules=["classifier"])
    assert type(model.classifier) is nn.Linear and model.classifier.weight.dtype == torch.float32
    packed = _packed_state(model)
    adapters, ctrl = setup_unified_lora(model, ["query", "value"], modules_to_save=["classifier"], signal="loss",
                                        print_fn=None)
    head = model.classifier.weight.detach().clone()
    opt = torch.optim.AdamW(ctrl.managed_parameters(), lr=1e-2)
    ctrl.attach_optimizer(opt)
    x, y = torch.randint(1, 64, (4, 8)), torch.tensor([0, 1, 2, 1])
    for _ in range(2):
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        ctrl.step(loss.item())
        opt.step()
        opt.zero_grad()
    assert not torch.equal(head, model.classifier.weight)
    assert _same_packed(packed, _packed_state(model))


def test_merging_an_8bit_layer_with_a_float_weight_is_refused(llama_dir, tmp_path):
    """`load_in_8bit=True, llm_int8_has_fp16_weight=True`: the Linear8bitLt keeps a float weight (so `packed_weight`
    is empty), but its forward runs on an int8 copy of it that eval mode keeps from the first forward. The old merge
    added every delta to the float weights and the merged model's logits were the base model's (the deltas moved
    them by up to 0.58 unmerged): a merge that dropped the adapter, silently. Every way to merge is now refused
    before any layer changes, and the full-precision recipe (export, import into a float base, merge) gives the
    unmerged outputs to float rounding."""
    model = AutoModelForCausalLM.from_pretrained(llama_dir, device_map="cpu", quantization_config=BitsAndBytesConfig(
        load_in_8bit=True, llm_int8_has_fp16_weight=True)).eval()
    x = torch.randint(0, 64, (2, 8))
    adapters, _ = setup_unified_lora(model, ["q_proj", "v_proj"], print_fn=None)
    assert all(layer.base_layer.weight.is_floating_point() for layer in adapters.values())
    _randomise_B(adapters)
    with torch.no_grad():
        before = model(x).logits
    for merge in (merge_adapters, merge_and_unload, lambda m: next(iter(adapters.values())).merge()):
        with pytest.raises(ValueError, match=r"int8 for its forward .*has_fp16_weights=True.*export_peft_adapter"):
            merge(model)
        assert not any(layer.merged_rank for layer in adapters.values())
        with torch.no_grad():
            assert torch.equal(model(x).logits, before)
    export_peft_adapter(model, None, tmp_path / "adapter")
    base = _load(llama_dir, None).eval()
    import_peft_adapter(base, tmp_path / "adapter")
    with torch.no_grad():
        merged = merge_and_unload(base)(x).logits
    torch.testing.assert_close(merged, before, rtol=0, atol=0.05)


def test_setup_before_a_4bit_layer_is_quantized_wraps_it_as_a_quantized_layer():
    """A Linear4bit built on the CPU holds a float `Params4bit` (bnb_quantized=False) until its first
    `.to(device)`/`.cuda()` packs it, so setup can run before that move. The old `packed_weight` took it for a float
    weight: the "is it a linear map" probe ran its forward, which fails before quantization, so "all-linear" left
    the 4-bit layer out silently (only the float head got blocks) and an explicit target was refused as a router
    ("a forward that does not return x Wᵀ + b"). It is now wrapped as the quantized layer it becomes: fp32 blocks
    shaped by in/out_features, trained through the move, and merging it is refused."""
    def build():
        torch.manual_seed(0)
        q = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.bfloat16, quant_type="nf4")
        q.load_state_dict(nn.Linear(64, 64).state_dict())
        return nn.Sequential(q, nn.ReLU(), nn.Linear(64, 8))

    model = build()
    assert not model[0].weight.bnb_quantized and model[0].weight.is_floating_point()
    adapters, _ = setup_unified_lora(model, "all-linear", print_fn=None)
    assert list(adapters) == ["0", "2"]
    adapters, _ = setup_unified_lora(build(), ["0"], print_fn=None)
    layer = adapters["0"]
    assert all(a.dtype == torch.float32 and a.shape[1] == 64 for a in layer.lora_A)
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(64, 8)).to("cpu")
    assert layer.base_layer.weight.bnb_quantized and not layer.base_layer.weight.is_floating_point()
    _randomise_B(adapters)
    model(torch.randn(4, 64)).square().mean().backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in layer.active_parameters())
    with pytest.raises(ValueError, match=r"quantized \(Linear4bit \(Params4bit"):
        merge_adapters(model)


def test_setup_before_an_8bit_layer_is_quantized_leaves_its_weight_for_the_move_to_quantize():
    """bitsandbytes' flow for a Linear8bitLt built by hand: load the float weights, then `.to(device)` quantizes them.
    Setup can come before that load (inject the adapters into the architecture, then load the pretrained base). The
    old setup ran the "is it a linear map" probe's forward on the layer, which quantized its initial float weight in
    place (weight.data = its int8 copy): the float weights loaded after it were cast to int8 as they stood, and the
    model's outputs were off by as much as their own size, silently. Setup now leaves the layer as it was."""
    torch.manual_seed(0)
    pretrained = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))

    def build():
        torch.manual_seed(5)
        return nn.Sequential(bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False, threshold=0.0), nn.ReLU(),
                             nn.Linear(64, 8))

    ref = build()
    ref.load_state_dict(pretrained.state_dict())
    ref.to("cpu")
    model = build()
    adapters, _ = setup_unified_lora(model, ["0"], print_fn=None)
    base = adapters["0"].base_layer
    assert base.weight.dtype == torch.float32 and base.state.CB is None
    sd = {(k.replace("0.", "0.base_layer.", 1) if k.startswith("0.") else k): v for k, v in pretrained.state_dict().items()}
    assert not model.load_state_dict(sd, strict=False).unexpected_keys
    model.to("cpu")
    assert base.weight.dtype == torch.int8
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))  # (B = 0: the delta is 0)


def test_a_4bit_trainer_run_saves_only_what_trains_and_refuses_a_resume_on_another_quantization(llama_dir, tmp_path):
    """On a quantized base the callback's checkpoints hold only what trains by default (`save_base=None`), as PEFT's
    QLoRA saves (the old ones were `save_pretrained`'s: the packed base and its quant state, every checkpoint): no
    packed weight, no quant state. A fresh 4-bit model resumed from one ends bit-identical to a run whose checkpoints
    held everything. The controller state records the base's quantization: a resume on the base loaded as fp4, in
    another compute dtype or in 8-bit is a ValueError naming both (it used to go on against the other base)."""
    import json

    from unified_lora.callbacks import ADAPTER_ONLY_NAME, CONTROLLER_STATE_NAME, UnifiedLoRACallback

    def run(out, kind="nf4-fp32", resume=None, **cb):
        model = _load(llama_dir, kind)
        torch.manual_seed(0)  # the same A blocks in every run
        adapters, ctrl = setup_unified_lora(model, ["q_proj", "v_proj"], print_fn=None,
                                            signal=SignalConfig(kind="loss", alpha=0.5, loss_scale=0.1))
        trainer = _trainer(model, out, max_steps=4, eval_strategy="no")
        UnifiedLoRACallback(ctrl, **cb).add_to(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return model, adapters

    full, _ = run(tmp_path / "full", save_base=True)
    slim, adapters = run(tmp_path / "slim")
    ckpt = tmp_path / "slim" / "checkpoint-2"
    saved = _saved_blocks(ckpt)
    from safetensors.torch import load_file

    keys = set(load_file(str(ckpt / "model.safetensors")))
    assert keys == set(lora_state_dict(slim)) and len(saved) == 24
    assert not any("base_layer" in k or "absmax" in k or "quant" in k or "embed_tokens" in k for k in keys)
    assert (ckpt / "model.safetensors").stat().st_size * 3 < (tmp_path / "full" / "checkpoint-2" /
                                                              "model.safetensors").stat().st_size
    marker = json.loads((ckpt / ADAPTER_ONLY_NAME).read_text())
    assert marker["quantization"] == ["4-bit nf4, blocksize 64, double quant False, compute dtype torch.float32"]
    assert torch.load(ckpt / CONTROLLER_STATE_NAME, weights_only=True)["callback_base_quantization"] == \
        marker["quantization"]

    resumed, _ = run(tmp_path / "slim", resume=str(ckpt))
    a, b, c = (lora_state_dict(m) for m in (full, slim, resumed))
    assert a.keys() == b.keys() == c.keys() and all(torch.equal(a[k], c[k]) and torch.equal(a[k], b[k]) for k in a)

    for other, now in [("fp4-fp32", "4-bit fp4, blocksize 64, double quant False, compute dtype torch.float32"),
                       ("nf4-bf16", "4-bit nf4, blocksize 64, double quant False, compute dtype torch.bfloat16"),
                       ("int8", "8-bit int8, threshold 6, fp16 weights False")]:
        with pytest.raises(ValueError, match=r"saved on a base quantized as 4-bit nf4, blocksize 64, double quant "
                                             rf"False, compute dtype torch\.float32, but this model's is {now}"):
            run(tmp_path / "slim", other, resume=str(ckpt))


class _HandBuilt4bit(nn.Module):
    """A model of the user's own around a `Linear4bit` built without a compute dtype (its first input sets it)."""

    def __init__(self, quant_type="nf4"):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, 64)
        q = bnb.nn.Linear4bit(64, 64, compute_dtype=None, quant_type=quant_type)
        q.load_state_dict(nn.Linear(64, 64).state_dict())
        self.proj = q.to("cpu")
        self.head = nn.Linear(64, 64)

    def forward(self, input_ids, labels):
        logits = self.head(torch.relu(self.proj(self.embed(input_ids))))
        return {"loss": nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())}


def test_a_trainer_resume_of_a_4bit_layer_without_a_compute_dtype_is_not_refused(tmp_path):
    """A `Linear4bit` built with `compute_dtype=None` takes its first input's dtype (bitsandbytes'
    `set_compute_type`), so the run's checkpoints recorded "compute dtype torch.float32" while the fresh model being
    resumed (no forward yet) said "compute dtype None": every resume was refused as "saved on a base quantized
    otherwise". Such a layer is now compared without its compute dtype; another quant type is still refused."""
    from transformers import Trainer, TrainingArguments

    from unified_lora.callbacks import UnifiedLoRACallback, base_quantization

    def run(resume=None, quant_type="nf4"):
        model = _HandBuilt4bit(quant_type)
        adapters, ctrl = setup_unified_lora(model, ["proj"], print_fn=None)
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                                 save_strategy="steps", save_steps=2, report_to="none", use_cpu=True,
                                 disable_tqdm=True, seed=0, data_seed=0)
        Trainer(model=model, args=args, train_dataset=_Tokens(),
                callbacks=[UnifiedLoRACallback(ctrl)]).train(resume_from_checkpoint=resume)
        return model, ctrl

    model, ctrl = run()
    assert model.proj.base_layer.compute_dtype == torch.float32 and ctrl.global_step == 4
    model, ctrl = run(resume=str(tmp_path / "checkpoint-2"))
    assert ctrl.global_step == 4 and len(ctrl.trace) == 2
    fresh = _HandBuilt4bit()
    adapters, _ = setup_unified_lora(fresh, ["proj"], print_fn=None)
    assert base_quantization(adapters.values()) == ["4-bit nf4, blocksize 64, double quant True, compute dtype "
                                                    "(its first input's)"]
    with pytest.raises(ValueError, match=r"saved on a base quantized as 4-bit nf4.*but this model's is 4-bit fp4"):
        run(resume=str(tmp_path / "checkpoint-2"), quant_type="fp4")


@pytest.mark.parametrize("kind", ["nf4-bf16", "int8"])
def test_an_adapter_only_checkpoint_of_a_quantized_base_loads_only_into_that_base(llama_dir, tmp_path, kind):
    """An adapter-only checkpoint leaves the packed base out, and loaded into any base of the same architecture and
    quantization (another checkpoint quantized the same way), silently. Its marker (and the callback's controller
    file) records a fingerprint of the packed codes and of their scales (the 4-bit absmax; the 8-bit row scales,
    which the first forward moves from the weight into the layer's state): the base it was saved on, loaded again,
    loads it; another one, or the same codes with other scales, is a ValueError naming what differs."""
    import json

    from unified_lora.callbacks import ADAPTER_ONLY_NAME, adapter_only_saves, load_adapter_only

    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64)).save_pretrained(tmp_path / "other")

    def build(path):
        model = _load(path, kind)
        adapters, _ = setup_unified_lora(model, ["q_proj", "v_proj"], print_fn=None)
        return model, adapters

    model, adapters = build(llama_dir)
    _randomise_B(adapters)
    x = torch.randint(0, 64, (2, 8))
    model(input_ids=x, labels=x).loss.backward()  # a training forward (8-bit: the row scales move to the state)
    adapter_only_saves(model).save_pretrained(tmp_path / "ckpt")
    marker = json.loads((tmp_path / "ckpt" / ADAPTER_ONLY_NAME).read_text())
    q = marker["base_fingerprint"]["tensors"]["model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert ("torch.uint8" if kind != "int8" else "torch.int8") in q and not q.endswith(" -")

    fresh, _ = build(llama_dir)
    load_adapter_only(fresh, tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x).logits, model.eval()(x).logits)
    with pytest.raises(ValueError, match=r"trained on another base model.* Of the 21 frozen base tensors .* 16 have "
                                         r"other values \(e\.g\. 'lm_head\.weight'\)"):
        load_adapter_only(build(tmp_path / "other")[0], tmp_path / "ckpt")
    scaled, _ = build(llama_dir)
    layer = scaled.model.layers[1].self_attn.k_proj
    with torch.no_grad():  # the same codes, other scales
        scales = layer.weight.quant_state.absmax if kind != "int8" else layer.weight.SCB
        scales.mul_(1.5)
    with pytest.raises(ValueError, match=r"1 has other values \(e\.g\. "
                                         r"'model\.layers\.1\.self_attn\.k_proj\.weight'\)"):
        load_adapter_only(scaled, tmp_path / "ckpt")


@pytest.mark.parametrize("kind", ["nf4-fp32", "int8"])
def test_a_new_head_that_transformers_left_unquantized_in_a_quantized_layer_is_refused_at_setup(tmp_path, kind):
    """A BERT checkpoint without a classifier loaded as a 4-bit or 8-bit BertForSequenceClassification (MiniLM with
    `num_labels=2`): transformers makes the new `classifier` a bitsandbytes layer whose weight is a plain fp32
    Parameter, which cannot run a forward (an empty AssertionError in 4-bit, "'Parameter' object has no attribute
    'CB'" in 8-bit). Setup went through, with the head as a target, in `modules_to_save` or neither, and the first
    forward failed. Now it is a ValueError with the `llm_int8_skip_modules` recipe, which then trains."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=64)).save_pretrained(tmp_path)

    def load(**skip):
        return AutoModelForSequenceClassification.from_pretrained(
            tmp_path, num_labels=2, device_map="cpu", quantization_config=BitsAndBytesConfig(**KINDS[kind], **skip))

    x, y = torch.randint(1, 64, (4, 8)), torch.tensor([0, 1, 1, 0])
    for targets, heads in ((["query", "value"], None), (["query", "value"], ["classifier"]),
                           (["query", "classifier"], None)):
        model = load()
        assert isinstance(model.classifier, QUANTIZED) and type(model.classifier.weight) is nn.Parameter
        with pytest.raises(ValueError, match=r"^setup: \['classifier'\] are bitsandbytes quantized layers whose weight "
                                             r"was never quantized .*llm_int8_skip_modules=\['classifier'\]\)$"):
            setup_unified_lora(model, targets, modules_to_save=heads, print_fn=None)
        assert not any(isinstance(m, NestedLoRALayer) for m in model.modules())
    model = load(llm_int8_skip_modules=["classifier"])
    setup_unified_lora(model, ["query", "value"], modules_to_save=["classifier"], print_fn=None)
    model(input_ids=x, labels=y).loss.backward()
    query = model.bert.encoder.layer[0].attention.self.query
    assert model.classifier.weight.grad.abs().sum() > 0 and query.lora_B[0].grad.abs().sum() > 0  # (B = 0: A's are 0)
