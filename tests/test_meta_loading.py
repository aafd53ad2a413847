"""Big-model loading flows: layers injected on the meta device (accelerate.init_empty_weights) and materialised with
`to_empty`, adapters still on meta at the first forward, and a base model with accelerate-offloaded layers."""

import pytest
import torch
import torch.nn as nn
from accelerate import init_empty_weights
from conftest import tiny_llama
from transformers import LlamaForCausalLM

from unified_lora import NestedLoRALayer, lora_layers, setup_unified_lora


def _meta_layer(in_f=32, out_f=48):
    with torch.device("meta"):
        base = nn.Linear(in_f, out_f)
    return NestedLoRALayer(base, rank_levels=(4, 8, 16))


def test_to_empty_initialises_the_blocks_as_construction_does():
    """`to_empty` gives uninitialised memory; the blocks must come out as a fresh layer's (A drawn, B = 0)."""
    layer = _meta_layer()
    assert layer.lora_A[0].is_meta
    torch.manual_seed(3)
    layer.to_empty(device="cpu")
    base = nn.Linear(32, 48)
    torch.manual_seed(3)
    ref = NestedLoRALayer(base, rank_levels=(4, 8, 16))
    for got, want in zip(layer.lora_parameters(), ref.lora_parameters()):
        assert torch.equal(got, want)
    assert all(torch.count_nonzero(b) == 0 for b in layer.lora_B)


def test_to_empty_of_an_injected_meta_model_gives_zero_deltas():
    """init_empty_weights → setup_unified_lora → model.to_empty: every block is initialised, none is garbage."""
    with init_empty_weights():
        model = LlamaForCausalLM(tiny_llama().config)
    adapters, _ = setup_unified_lora(model, ("q_proj", "v_proj"))
    model.to_empty(device="cpu")
    bound = 1 / 32 ** 0.5  # kaiming_uniform(a=√5) on in_features=32
    for layer in lora_layers(model).values():
        assert all(torch.count_nonzero(b) == 0 for b in layer.lora_B)
        for a in layer.lora_A:
            assert torch.isfinite(a).all() and a.abs().max() <= bound and torch.count_nonzero(a) > 0


def test_reset_parameters_reinitialises_every_block_and_refuses_a_merged_layer():
    layer = NestedLoRALayer(nn.Linear(32, 48), rank_levels=(4, 8, 16))
    with torch.no_grad():
        for p in layer.lora_parameters():
            p.fill_(0.5)
    torch.manual_seed(5)
    layer.reset_parameters()
    torch.manual_seed(5)
    ref = NestedLoRALayer(nn.Linear(32, 48), rank_levels=(4, 8, 16))
    torch.manual_seed(5)
    ref.reset_parameters()
    for got, want in zip(layer.lora_parameters(), ref.lora_parameters()):
        assert torch.equal(got, want)
    layer.merge()
    with pytest.raises(ValueError, match="unmerge"):
        layer.reset_parameters()


def test_forward_with_adapters_still_on_meta_says_so():
    """Adapters injected into a meta model and never materialised: a clear error at the first forward, not a
    meta output or an autograd device error at backward."""
    layer = _meta_layer()
    layer.base_layer.to_empty(device="cpu")  # the base loaded, the adapters left behind
    with pytest.raises(RuntimeError, match="still on the meta device"):
        layer(torch.randn(2, 32))


def test_injection_into_an_offloaded_model_puts_the_adapters_on_the_execution_device(tmp_path):
    """from_pretrained with a device_map that offloads a decoder layer to disk: that layer's weights are on meta and
    accelerate's AlignDevicesHook brings them in per forward. Its adapters must live where the forward runs and
    train there (they were created on meta: backward failed with 'expected device meta but got cpu')."""
    tiny_llama().save_pretrained(tmp_path / "base")
    dmap = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base", device_map=dmap, offload_folder=str(tmp_path / "off"))
    assert model.model.layers[1].self_attn.q_proj.weight.is_meta
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        base_loss = model(x, labels=x).loss
    adapters, ctrl = setup_unified_lora(model, ("q_proj", "v_proj"))
    off = adapters["model.layers.1.self_attn.q_proj"]
    assert all(p.device.type == "cpu" for p in off.lora_parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctrl.attach_optimizer(opt)
    loss = model(x, labels=x).loss
    assert torch.allclose(loss, base_loss)  # B = 0: the delta starts at 0
    loss.backward()
    assert off.lora_B[0].grad is not None and torch.count_nonzero(off.lora_B[0].grad) > 0
    ctrl.step(loss.item())
    opt.step()
    assert torch.count_nonzero(off.lora_B[0]) > 0


def test_import_peft_adapter_into_an_offloaded_model_matches_peft(tmp_path):
    """import_peft_adapter on a base loaded with a disk-offloaded layer: the adapter's weights must land there (they
    were copied into meta blocks, a no-op, and the logits came out NaN without an error)."""
    from peft import LoraConfig, get_peft_model

    from unified_lora.peft_io import import_peft_adapter

    tiny_llama().save_pretrained(tmp_path / "base")
    pm = get_peft_model(tiny_llama(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        want = pm(x).logits
    dmap = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base", device_map=dmap, offload_folder=str(tmp_path / "off"))
    import_peft_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        got = model(x).logits
    torch.testing.assert_close(got, want)


def test_merging_an_offloaded_model_is_refused_before_any_layer_changes(tmp_path):
    """merge_adapters / merge_and_unload on a base with a disk-offloaded decoder layer: that layer's weight is on
    meta (accelerate brings it in per forward), so no delta can be folded into it. Both raised torch's "Tensor on
    device cpu is not on the expected device meta!" from that layer, after the layers before it were merged (and,
    for merge_and_unload, unwrapped), so the model was left half merged. Now a ValueError says why, first."""
    from unified_lora import merge_adapters
    from unified_lora.peft_io import merge_and_unload

    tiny_llama().save_pretrained(tmp_path / "base")
    dmap = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base", device_map=dmap, offload_folder=str(tmp_path / "off"))
    adapters, _ = setup_unified_lora(model, ("q_proj", "v_proj"), print_fn=None)
    assert list(adapters)[0].startswith("model.layers.0.")  # a layer that could merge comes first
    with torch.no_grad():
        for layer in adapters.values():
            for b in layer.lora_B:
                b.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        want = model(x).logits
    weights = {n: a.base_layer.weight.detach().clone() for n, a in adapters.items() if not a.base_layer.weight.is_meta}
    assert 0 < len(weights) < len(adapters)
    for merge in (merge_adapters, merge_and_unload):
        with pytest.raises(ValueError, match=r"meta device .* accelerate offloaded it"):
            merge(model)
        assert lora_layers(model) == adapters and not any(a.merged_rank for a in adapters.values())
        assert all(torch.equal(adapters[n].base_layer.weight, w) for n, w in weights.items())
        with torch.no_grad():
            assert torch.equal(model(x).logits, want)


def test_to_empty_of_a_meta_multitask_model_makes_every_task_slot_a_copy_of_the_shared_blocks():
    # The task slots are copies of the shared blocks at construction; after to_empty from meta they were uninitialised
    # memory (only the shared blocks were drawn again), so a split to MULTI started each task from garbage.
    from unified_lora.multitask import setup_multitask_lora

    with init_empty_weights():
        model = LlamaForCausalLM(tiny_llama().config)
    setup_multitask_lora(model, ["a", "b"], ("q_proj", "v_proj"), spare_slots=1, print_fn=None)
    model.to_empty(device="cpu")
    for layer in lora_layers(model).values():
        assert torch.isfinite(layer.lora_A[0]).all() and all((b == 0).all() for b in layer.lora_B)
        for t in layer.lora_tasks:
            assert all(torch.equal(x, y) for x, y in zip(list(t.lora_A) + list(t.lora_B),
                                                         list(layer.lora_A) + list(layer.lora_B)))
