"""The nested LoRA layer: math, nesting, exact preservation of paused dimensions, merge."""

import copy
import subprocess

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from conftest import can_build_cpp, grads_after_in_place_ops, tiny_bert, tiny_gpt2, tiny_llama
from unified_lora import (NestedLoRAConfig, NestedLoRALayer, inject_nested_lora, lora_layers, lora_state_dict,
                          merge_adapters, unmerge_adapters)

CPP = pytest.param("cpp", marks=pytest.mark.skipif(
    not can_build_cpp(), reason="kernel='cpp' builds csrc/nested_path.cpp: needs g++ and ninja"))


@pytest.fixture(params=["python", CPP])
def kernel(request):
    """How the layer runs two or more active blocks: the Python autograd.Function, or the C++ one."""
    return request.param


def _randomize_B(layer: NestedLoRALayer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in layer.lora_B:
            b.copy_(torch.randn(b.shape, generator=g))


def test_delta_is_zero_at_start_so_outputs_equal_the_base():
    base = nn.Linear(16, 8)
    x = torch.randn(3, 16)
    ref = base(x)
    layer = NestedLoRALayer(copy.deepcopy(base))
    assert torch.equal(layer(x), ref)


@pytest.mark.parametrize("rank", [4, 8, 16])
def test_forward_equals_the_equation_at_every_rank(rank, kernel):
    layer = NestedLoRALayer(nn.Linear(16, 8), lora_alpha=16, kernel=kernel)
    _randomize_B(layer)
    layer.set_rank(rank)
    x = torch.randn(5, 16)
    A, B = layer.full_A()[:rank], layer.full_B()[:, :rank]
    expected = layer.base_layer(x) + (16 / rank) * x @ A.T @ B.T
    torch.testing.assert_close(layer(x), expected)


def test_conv1d_is_wrapped_with_in_out_from_its_transposed_weight():
    conv = Conv1D(8, 16)  # nf=8 outputs, nx=16 inputs; weight is (16, 8)
    layer = NestedLoRALayer(conv)
    _randomize_B(layer)
    x = torch.randn(2, 3, 16)
    A, B = layer.active_A(), layer.active_B()
    expected = conv(x) + layer.scaling * x @ A.T @ B.T
    assert (layer.in_features, layer.out_features) == (16, 8)
    torch.testing.assert_close(layer(x), expected)


def test_switching_rank_reallocates_nothing():
    layer = NestedLoRALayer(nn.Linear(16, 8))
    ids = [(id(p), p.data_ptr()) for p in layer.parameters()]
    for r in (16, 4, 8, 16, 4):
        layer.set_rank(r)
        assert [(id(p), p.data_ptr()) for p in layer.parameters()] == ids


def test_lower_ranks_are_prefix_slices_of_higher_ranks():
    layer = NestedLoRALayer(nn.Linear(16, 8))
    layer.set_rank(16)
    A16 = layer.active_A().detach().clone()
    layer.set_rank(4)
    assert torch.equal(layer.active_A(), A16[:4])
    layer.set_rank(8)
    assert torch.equal(layer.active_B(), layer.full_B()[:, :8])


@pytest.mark.parametrize(
    "make_opt",
    [lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01),
     lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.01)],
    ids=["adamw_wd", "sgd_momentum"],
)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_paused_dimensions_are_bit_identical_after_50_steps_at_lower_rank(make_opt, set_to_none):
    torch.manual_seed(0)
    layer = NestedLoRALayer(nn.Linear(16, 8))
    opt = make_opt(list(layer.parameters()))
    x, target = torch.randn(32, 16), torch.randn(32, 8)

    def train(steps):
        for _ in range(steps):
            nn.functional.mse_loss(layer(x), target).backward()
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)

    layer.set_rank(16)
    train(20)  # every dimension now carries momentum and non-zero values
    A_paused = layer.full_A()[4:].detach().clone()
    B_paused = layer.full_B()[:, 4:].detach().clone()
    assert B_paused.abs().sum() > 0
    state_before = {k: v.clone() for k, v in opt.state[layer.lora_B[2]].items() if torch.is_tensor(v)}

    layer.set_rank(4)
    train(50)
    assert torch.equal(layer.full_A()[4:], A_paused)
    assert torch.equal(layer.full_B()[:, 4:], B_paused)
    for k, v in opt.state[layer.lora_B[2]].items():  # optimizer moments untouched too
        if torch.is_tensor(v):
            assert torch.equal(v, state_before[k])

    layer.set_rank(16)  # climbing back resumes from the preserved values
    assert torch.equal(layer.active_B()[:, 4:], B_paused)
    train(1)
    assert not torch.equal(layer.full_B()[:, 4:], B_paused)


def test_plain_slicing_would_not_preserve_paused_dimensions():
    """Why the block design exists: one tensor sliced to [:4] still moves under AdamW."""
    torch.manual_seed(0)
    A = nn.Parameter(torch.randn(16, 16))
    opt = torch.optim.AdamW([A], lr=1e-2, weight_decay=0.01)
    x = torch.randn(8, 16)
    (x @ A.T).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    paused = A[4:].detach().clone()
    (x @ A[:4].T).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(A[4:], paused)


@pytest.mark.parametrize("kind,expected", [("alpha_over_r", 32 / 8), ("max_rank_over_r", 16 / 8),
                                           ("rslora", 32 / 8 ** 0.5), ("alpha_over_max_rank", 32 / 16)])
def test_scaling_options(kind, expected):
    layer = NestedLoRALayer(nn.Linear(4, 4), lora_alpha=32, scaling=kind, initial_rank=8)
    assert layer.scaling == pytest.approx(expected)


@pytest.mark.parametrize("kind", ["alpha_over_max_rank", "alpha_over_r", "rslora", "max_rank_over_r"])
def test_only_alpha_over_max_rank_keeps_the_kept_blocks_contribution_across_a_switch(kind):
    """Down 8 -> 4 and back up: the output changes by exactly blocks 5-8's part under alpha_over_max_rank; every
    other rule also rescales blocks 1-4's part, so the same identity must fail for them."""
    torch.manual_seed(0)
    layer = NestedLoRALayer(nn.Linear(16, 12), lora_alpha=16, scaling=kind, initial_rank=8)
    _randomize_B(layer)
    x = torch.randn(5, 16)
    with torch.no_grad():
        y8 = layer(x)
        s8 = layer.scaling
        A, B = layer.full_A(), layer.full_B()
        upper = s8 * (x @ A[4:8].T) @ B[:, 4:8].T  # blocks 5-8 at the scale in force at rank 8
        layer.set_rank(4)
        y4 = layer(x)
        layer.set_rank(8)
        y8_again = layer(x)
    assert torch.equal(y8, y8_again)
    kept = torch.allclose(y4, y8 - upper, atol=1e-5)
    assert kept is (kind == "alpha_over_max_rank")


def test_dropout_only_touches_the_lora_path_in_training():
    layer = NestedLoRALayer(nn.Linear(16, 8), lora_dropout=0.5)
    _randomize_B(layer)
    x = torch.randn(4, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    y1 = layer(x)
    torch.manual_seed(1)
    y2 = layer(x)
    assert not torch.equal(y1, y2)


def test_merge_gives_the_same_outputs_and_unmerge_restores_the_base():
    for base in (nn.Linear(16, 8), Conv1D(8, 16)):
        layer = NestedLoRALayer(base)
        _randomize_B(layer)
        w0 = base.weight.detach().clone()
        x = torch.randn(3, 16)
        y = layer(x)
        layer.merge()
        assert not torch.equal(base.weight, w0)
        torch.testing.assert_close(layer(x), y)
        layer.set_rank(16)  # re-rank while merged: unmerge, switch, merge again
        layer.set_rank(8)
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)


def test_a_merge_under_autocast_folds_the_full_precision_delta_and_unmerge_restores_the_base():
    """merge() under bf16 autocast (inference code wrapped in autocast) used to fold the delta rounded to bf16:
    the merged outputs were off by ~2e-3 and an unmerge outside autocast left that rounding in the base weight
    for good (~5e-3 here, on every merge/unmerge cycle)."""
    for base in (nn.Linear(16, 8), Conv1D(8, 16)):
        layer = NestedLoRALayer(base)
        _randomize_B(layer)
        w0 = base.weight.detach().clone()
        x = torch.randn(3, 16)
        with torch.no_grad():
            y = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer.merge()
            layer.set_rank(16)  # a re-rank while merged, under autocast: unmerge and merge again
            layer.set_rank(8)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)


def _wrapped_gpt2(seed: int) -> nn.Module:
    from conftest import tiny_gpt2
    model = tiny_gpt2()
    adapters = inject_nested_lora(model, NestedLoRAConfig(target_modules=["c_attn", "c_proj"]))
    for i, layer in enumerate(adapters.values()):
        _randomize_B(layer, seed=seed + i)
    return model


def test_a_merged_model_saves_its_base_unmerged_and_loads_into_a_fresh_wrapped_model():
    """A merged layer's state dict held its base weight with the delta folded in, beside the A/B blocks of that
    same delta: loaded (strict=True) into a freshly wrapped model, the delta counted twice (logits off by ~0.1)."""
    model, fresh = _wrapped_gpt2(seed=0), _wrapped_gpt2(seed=100)
    x = torch.randint(1, 64, (2, 6))
    with torch.no_grad():
        ref = model(x).logits
        for layer in lora_layers(model).values():
            layer.merge()
        torch.testing.assert_close(model(x).logits, ref)
        fresh.load_state_dict(model.state_dict(), strict=True)
        assert not any(layer.merged_rank for layer in lora_layers(fresh).values())
        torch.testing.assert_close(fresh(x).logits, ref)
    assert torch.equal(fresh.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0),
                       model.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0))


def _trained_through_a_rank_drop(arch: str, seed: int = 0):
    """(model, adapters, input_ids, build, targets): a tiny model wrapped by setup_unified_lora, trained two AdamW
    steps at rank 16 and two at rank 4, so that it ends at rank 4 with blocks 5..16 holding trained values."""
    from conftest import VOCAB, tiny_bert, tiny_gpt2

    from unified_lora import set_rank, setup_unified_lora

    build, targets = {"llama": (tiny_llama, ["q_proj", "v_proj"]), "bert": (tiny_bert, ["query", "value"]),
                      "gpt2": (tiny_gpt2, ["c_attn", "lm_head"])}[arch]
    model = build(seed)
    adapters, _ = setup_unified_lora(model, targets, signal="loss")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0, 1]) if arch == "bert" else x
    model.train()
    for rank in (16, 16, 4, 4):
        set_rank(adapters, rank)
        model(input_ids=x, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), adapters, x, build, targets


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_a_model_saved_at_a_lower_rank_reloads_at_that_rank_with_the_same_outputs(arch, tmp_path):
    """The active rank was not in the model's state dict: a model trained at rank 16 and then at rank 4, saved with
    torch.save(model.state_dict()) (or safetensors' save_model, or save_pretrained) and loaded into a freshly wrapped
    model, ran there at the initial rank 8, with the trained blocks 5..8 in its delta: other logits, silently (max
    abs diff 0.2 on Llama and GPT-2). A merged model saves its rank too."""
    from safetensors.torch import load_file, load_model, save_model

    from unified_lora import setup_unified_lora
    from unified_lora.model import tied_base_weights

    model, adapters, x, build, targets = _trained_through_a_rank_drop(arch)
    with torch.no_grad():
        ref = model(input_ids=x).logits
    torch.save(model.state_dict(), tmp_path / "model.pt")
    save_model(model, str(tmp_path / "model.safetensors"))
    model.save_pretrained(tmp_path / "hf")
    for load in ("torch", "safetensors", "save_pretrained", "merged"):
        fresh = build(seed=1)
        fresh_adapters, _ = setup_unified_lora(fresh, targets, signal="loss")
        assert {layer.rank for layer in fresh_adapters.values()} == {8}
        if load == "torch":
            fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
        elif load == "safetensors":
            assert load_model(fresh, str(tmp_path / "model.safetensors"), strict=True) == (set(), [])
        elif load == "save_pretrained":  # the tied base weight is left out of the file, as for the bare model
            missing, unexpected = fresh.load_state_dict(load_file(tmp_path / "hf" / "model.safetensors"), strict=False)
            assert unexpected == [] and missing == (["lm_head.base_layer.weight"] if arch == "gpt2" else [])
        else:  # merged at rank 4, saved, loaded into a fresh merged model (GPT-2's tied lm_head stays unmerged)
            merged = copy.deepcopy(model)
            for m in (merged, fresh):
                tied = tied_base_weights(m)
                for name, layer in lora_layers(m).items():
                    if name not in tied:
                        layer.merge()
            fresh.load_state_dict(merged.state_dict(), strict=True)
            assert {layer.merged_rank for n, layer in fresh_adapters.items() if n != "lm_head"} == {4}
        assert {layer.rank for layer in fresh_adapters.values()} == {4}, load
        with torch.no_grad():
            out = fresh.eval()(input_ids=x).logits
        if load == "merged":  # the delta folded into the base weight: equal to float rounding
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        else:
            assert torch.equal(out, ref), load


def test_a_state_dict_without_the_rank_loads_strictly_and_leaves_the_rank_as_it_is():
    """A state dict saved before the rank was kept in it (no `<layer>._extra_state`), or the blocks alone
    (`lora_state_dict` of an older version), still loads with strict=True / strict=False, and leaves each layer's rank alone."""
    model, fresh = _wrapped_gpt2(seed=0), _wrapped_gpt2(seed=100)
    x = torch.randint(1, 64, (2, 6))
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
    assert len(old) < len(model.state_dict())
    for layer in lora_layers(fresh).values():
        layer.set_rank(16)
    fresh.load_state_dict(old, strict=True)
    assert {layer.rank for layer in lora_layers(fresh).values()} == {16}
    blocks = {k: v for k, v in lora_state_dict(model).items() if not k.endswith("._extra_state")}
    fresh.load_state_dict(blocks, strict=False)
    assert {layer.rank for layer in lora_layers(fresh).values()} == {16}
    for layer in lora_layers(fresh).values():
        layer.set_rank(8)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits, rtol=0, atol=0)


def test_lora_state_dict_carries_the_rank_so_the_adapters_reload_at_it():
    """`lora_state_dict` is the adapters-only checkpoint: it held the blocks but not the rank, so blocks saved at
    rank 4 loaded (strict=False) into a fresh model ran at its rank 8, with trained blocks 5..8 in the delta."""
    model, fresh = _wrapped_gpt2(seed=0), _wrapped_gpt2(seed=100)
    for layer in lora_layers(model).values():
        layer.set_rank(4)
    sd = lora_state_dict(model)
    assert sum(k.endswith("._extra_state") for k in sd) == len(lora_layers(model))
    result = fresh.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys
    assert {layer.rank for layer in lora_layers(fresh).values()} == {4}
    x = torch.randint(1, 64, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits, rtol=0, atol=0)


def _train_two_steps(model, ctrl, opt, **batch) -> None:
    """Two optimizer steps on `batch`, `ctrl.step` before each, as a hand-written loop runs them."""
    for _ in range(2):
        loss = model(**batch).loss
        loss.backward()
        ctrl.step(loss=loss.item())
        opt.step()
        opt.zero_grad()


def test_lora_state_dict_of_a_trained_tied_lm_head_saves_with_safetensors_and_reloads(tmp_path):
    """GPT-2's lm_head is tied to its wte. Trained as `modules_to_save`, it is under two names in the state dict, and
    `lora_state_dict` kept both: safetensors refuses tensors that share memory, so `train --modules-to-save lm_head`
    on GPT-2 failed at its first checkpoint. Now it is kept once, under the name `named_parameters()` gives it,
    and a fresh model loads it into both."""
    from safetensors.torch import load_file, save_file

    from unified_lora import setup_unified_lora

    model, fresh = tiny_gpt2(seed=0), tiny_gpt2(seed=0)
    adapters, ctrl = setup_unified_lora(model, ["c_attn"], modules_to_save=["lm_head"], print_fn=None)
    setup_unified_lora(fresh, ["c_attn"], modules_to_save=["lm_head"], print_fn=None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctrl.attach_optimizer(opt)
    x = torch.randint(1, 64, (2, 6))
    _train_two_steps(model, ctrl, opt, input_ids=x, labels=x)
    sd = lora_state_dict(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "transformer.wte.weight" in sd and "lm_head.weight" not in sd
    save_file(sd, str(tmp_path / "adapter.safetensors"))
    result = fresh.load_state_dict(load_file(str(tmp_path / "adapter.safetensors")), strict=False)
    assert not result.unexpected_keys
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)


def test_lora_state_dict_carries_a_modules_to_save_head_so_a_fresh_model_reloads_with_the_same_logits(tmp_path):
    """`lora_state_dict` held the blocks and ranks but not a `modules_to_save` head, which trains too: a hand-written
    loop that saved it with safetensors and resumed in a fresh process (whose head is newly initialised) went on
    with another head, other logits and another trajectory, silently (MiniLM on RTE: max logit difference 0.064
    after a resume, 0.0 with the head)."""
    from safetensors.torch import load_file, save_file

    from unified_lora import setup_unified_lora

    model, fresh = tiny_bert(seed=0), tiny_bert(seed=0)
    with torch.no_grad():  # the same base, with its head initialised afresh, as from_pretrained does in a new process
        fresh.classifier.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(1))
    adapters, ctrl = setup_unified_lora(model, ["query", "value"], modules_to_save=["classifier"], print_fn=None)
    setup_unified_lora(fresh, ["query", "value"], modules_to_save=["classifier"], print_fn=None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctrl.attach_optimizer(opt)
    x, y = torch.randint(1, 64, (4, 6)), torch.tensor([0, 1, 1, 0])
    _train_two_steps(model, ctrl, opt, input_ids=x, labels=y)
    save_file(lora_state_dict(model), str(tmp_path / "adapter.safetensors"))
    result = fresh.load_state_dict(load_file(str(tmp_path / "adapter.safetensors")), strict=False)
    assert not result.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)
    assert {"classifier.weight", "classifier.bias"} <= set(lora_state_dict(model))


def test_a_saved_rank_the_layer_has_no_level_for_is_an_error_of_the_load_naming_the_key():
    """A model saved at rank 16 loaded (lora_state_dict, strict=False) into one built with rank_levels=(4, 8): the
    layer's set_extra_state raised "rank: 16 is not a nested level of this layer; choose one of (4, 8)" from inside
    load_state_dict, naming no layer nor file, as if the caller had chosen rank 16. It is now an error of the load,
    listed with the other mismatches under the layer's key, and the layers keep their rank."""
    model = tiny_llama()
    inject_nested_lora(model, NestedLoRAConfig(target_modules=["q_proj", "v_proj"]))
    for layer in lora_layers(model).values():
        layer.set_rank(16)
    small = tiny_llama()
    inject_nested_lora(small, NestedLoRAConfig(target_modules=["q_proj", "v_proj"], rank_levels=(4, 8), max_rank=8))
    for sd, strict in ((lora_state_dict(model), False), (model.state_dict(), True)):
        with pytest.raises(RuntimeError, match=r"model\.layers\.0\.self_attn\.q_proj\._extra_state: saved at rank 16, "
                                               r"which is not a nested level of this layer \(4, 8\); build the model "
                                               r"with the rank_levels and max_rank it was saved with"):
            small.load_state_dict(sd, strict=strict)
        assert {layer.rank for layer in lora_layers(small).values()} == {8}


@pytest.mark.parametrize("what", ["whole", "lora_only"])
def test_weights_loaded_into_a_merged_model_are_merged_and_unmerge_leaves_the_right_base(what):
    """Loading into a merged model used to leave the old delta in the base weight: a whole state dict replaced
    the base weight while the layer still counted itself merged (the new delta never applied), and A/B blocks
    alone (`lora_state_dict`, as a resume loads them) met a base holding the old delta, which the next unmerge
    left behind while it took the new one away."""
    source, model = _wrapped_gpt2(seed=0), _wrapped_gpt2(seed=100)
    base = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model).items()}
    x = torch.randint(1, 64, (2, 6))
    sd = source.state_dict() if what == "whole" else lora_state_dict(source)
    with torch.no_grad():
        ref = source(x).logits
        for layer in lora_layers(model).values():
            layer.merge()
        model.load_state_dict(sd, strict=what == "whole")
        assert all(layer.merged_rank == 8 for layer in lora_layers(model).values())  # still merged
        torch.testing.assert_close(model(x).logits, ref)
        for name, layer in lora_layers(model).items():
            layer.unmerge()
            torch.testing.assert_close(layer.base_layer.weight, base[name], rtol=0, atol=1e-6)  # the same base
        torch.testing.assert_close(model(x).logits, ref)


def test_a_merged_half_precision_model_cast_to_fp32_unmerges_and_saves_its_base_weight_bit_for_bit():
    """A bf16 model with fp32 blocks, merged (the layer keeps the bf16 base weight) and then cast with model.float(),
    as one does to evaluate or export in fp32: unmerge and the state dict took the delta away by subtraction, since
    the kept copy was bf16 and the weight fp32 now, and left the merge's bf16 rounding in the base weight (up to
    6e-3 here), in the model and in every state dict saved from it."""
    model = tiny_llama().to(torch.bfloat16)
    inject_nested_lora(model, NestedLoRAConfig(target_modules=["q_proj", "down_proj"]))
    for layer in lora_layers(model).values():
        _randomize_B(layer)
    base = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model).items()}
    merge_adapters(model)
    model.float()
    sd = model.state_dict()
    unmerge_adapters(model)
    for n, layer in lora_layers(model).items():
        assert sd[f"{n}.base_layer.weight"].dtype == torch.float32
        assert torch.equal(sd[f"{n}.base_layer.weight"], base[n].float()), n
        assert torch.equal(layer.base_layer.weight, base[n].float()), n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_then_unmerge_gives_a_half_precision_base_weight_back_bit_for_bit(dtype):
    # Unmerge used to subtract the delta again in bf16/fp16: about one base weight element in ten moved by an ulp per
    # merge and unmerge, and each re-rank while merged (unmerge, merge) moved more: the frozen base drifted for good.
    for base in (nn.Linear(64, 48), Conv1D(48, 64)):
        base.to(dtype)
        layer = NestedLoRALayer(base, rank_levels=(4, 8, 16), initial_rank=8)
        with torch.no_grad():
            for b in layer.lora_B:
                b.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
        w0 = base.weight.detach().clone()
        for _ in range(5):
            layer.merge()
            assert not torch.equal(base.weight, w0)
            layer.set_rank(16)
            layer.set_rank(4)
            layer.unmerge()
            assert torch.equal(base.weight, w0)
            layer.set_rank(8)
    model = tiny_llama().to(dtype)  # through merge_adapters / unmerge_adapters too, with fp32 blocks (the default)
    inject_nested_lora(model, NestedLoRAConfig(target_modules=["q_proj", "down_proj"]))
    assert {p.dtype for layer in lora_layers(model).values() for p in layer.lora_parameters()} == {torch.float32}
    for layer in model.modules():
        if isinstance(layer, NestedLoRALayer):
            _randomize_B(layer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merge_adapters(model)
    unmerge_adapters(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_unmerge_keeps_a_base_weight_written_while_merged():
    # The copy kept by merge is put back only while the weight is exactly what merging it gave: a base weight
    # loaded or edited while merged gets the delta subtracted, as before, and is not replaced by the stale copy.
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = NestedLoRALayer(base)
    _randomize_B(layer)
    layer.merge()
    other = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        base.weight.copy_(other)
    layer.unmerge()
    assert not torch.equal(base.weight, other)
    delta = layer.scaling * (layer.active_B().double() @ layer.active_A().double())
    torch.testing.assert_close(base.weight, (other.double() - delta).to(torch.bfloat16), rtol=2 ** -8, atol=0)
    assert (base.weight != other).float().mean() > 0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapters", ["same", "fp32"])
def test_merge_rounds_a_half_precision_weight_once(dtype, adapters):
    # The merged weight is base + delta summed in fp32 and rounded once to the base's dtype. The delta used to be formed
    # and then added in bf16/fp16 (three roundings): about one element in twelve was an ulp or more off the correctly
    # rounded sum. Summed in fp32, an element is off only where the fp32 sum lands on a bf16/fp16 tie (rare).
    torch.manual_seed(0)
    base = nn.Linear(64, 96).to(dtype)
    layer = NestedLoRALayer(base, rank_levels=(4, 8, 16), initial_rank=8)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    if adapters == "fp32":  # fp32 master adapters on a half-precision base
        for p in layer.lora_parameters():
            p.data = p.data.float()
    with torch.no_grad():
        ref = (base.weight.double() + layer.scaling * (layer.active_B().double() @ layer.active_A().double())).to(dtype)
    layer.merge()
    off = (base.weight != ref).sum().item()
    assert off <= ref.numel() // 1000, f"{off} of {ref.numel()} merged elements are not the correctly rounded sum"


def test_layer_follows_the_base_dtype_and_device():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = NestedLoRALayer(base)
    assert all(p.dtype == torch.bfloat16 for p in layer.lora_parameters())
    assert layer(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.to(torch.float32)(torch.randn(2, 16)).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype,fp32_blocks", [(torch.bfloat16, True), (torch.float16, True),
                                                (torch.float32, False), (torch.float64, False)])
def test_injected_blocks_are_fp32_on_a_half_precision_base_as_peft_makes_them(dtype, fp32_blocks):
    # PEFT's get_peft_model(autocast_adapter_dtype=True), its default, keeps LoRA weights in fp32 on a bf16/fp16
    # base; inject_nested_lora made them in the base's dtype, so a bf16 model trained bf16 adapters (and AdamW
    # moments). The option has PEFT's name and default; fp32 and fp64 bases keep their dtype, as under PEFT.
    model = tiny_llama().to(dtype)
    layers = inject_nested_lora(model, NestedLoRAConfig(target_modules=["q_proj", "down_proj"]))
    want = torch.float32 if fp32_blocks else dtype
    assert {p.dtype for layer in layers.values() for p in layer.lora_parameters()} == {want}  # paused blocks too
    assert all(layer.base_layer.weight.dtype == dtype for layer in layers.values())  # the frozen base stays
    off = tiny_llama().to(dtype)
    layers = inject_nested_lora(off, NestedLoRAConfig(target_modules=["q_proj"], autocast_adapter_dtype=False))
    assert {p.dtype for layer in layers.values() for p in layer.lora_parameters()} == {dtype}
    x = torch.randint(0, 32, (2, 5))
    assert model(x).logits.dtype == off(x).logits.dtype == dtype
    # a bare layer keeps the base's dtype (as PEFT's own LoRA layer, before get_peft_model upcasts it)
    assert {p.dtype for p in NestedLoRALayer(nn.Linear(8, 4).to(dtype)).lora_parameters()} == {dtype}
    assert {p.dtype for p in NestedLoRALayer(nn.Linear(8, 4).to(dtype), autocast_adapter_dtype=True)
            .lora_parameters()} == {want}


def _peft_twin(model, layers, rank):
    """A PEFT LoRA model (get_peft_model, its defaults) on a copy of `model`'s base weights, holding the nested
    layers' active blocks at `rank`."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as PeftLinear

    base = copy.deepcopy(model)
    for name, layer in lora_layers(base).items():
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, layer.base_layer)
    pm = get_peft_model(base, LoraConfig(r=rank, lora_alpha=16, target_modules=sorted(layers)))
    for name, layer in layers.items():
        twin = pm.base_model.model.get_submodule(name)
        assert isinstance(twin, PeftLinear)
        with torch.no_grad():
            twin.lora_A["default"].weight.copy_(layer.active_A())
            twin.lora_B["default"].weight.copy_(layer.active_B())
    return pm


@pytest.mark.parametrize("rank", [4, 8, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_blocks_on_a_half_precision_model_give_peft_outputs_bit_for_bit_and_its_gradients(dtype, rank, kernel):
    # fp32 blocks on a bf16/fp16 base compute the delta in fp32, add it to the base output in fp32 and round once
    # to the base's dtype, as PEFT's `(result + lora_B(lora_A(x)) * scaling).to(result.dtype)` does. The layer
    # used to round the delta to the base's dtype first and then add in it (two roundings): some logits were an
    # ulp or more off PEFT's. Gradients are PEFT's too, in fp32; paused blocks stay out of the graph.
    model = tiny_llama().to(dtype)
    targets = ["q_proj", "v_proj", "down_proj"]
    layers = inject_nested_lora(model, NestedLoRAConfig(target_modules=targets, initial_rank=rank, kernel=kernel))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers.values():
            for b in layer.lora_B:
                b.normal_(0, 0.5, generator=g)
    pm = _peft_twin(model, layers, rank)
    x = torch.randint(0, 32, (4, 16), generator=torch.Generator().manual_seed(1))
    ours, theirs = model(x).logits, pm(x).logits
    assert ours.dtype == theirs.dtype == dtype
    assert (ours - tiny_llama().to(dtype)(x).logits).abs().max() > 1e-2  # the adapters count
    assert torch.equal(ours, theirs)
    ours.float().square().mean().backward()
    theirs.float().square().mean().backward()
    for name, layer in layers.items():
        twin = pm.base_model.model.get_submodule(name)
        gA = torch.cat([a.grad for a in layer.lora_A[:layer.n_active_blocks]], 0)
        gB = torch.cat([b.grad for b in layer.lora_B[:layer.n_active_blocks]], 1)
        assert gA.dtype == gB.dtype == torch.float32
        torch.testing.assert_close(gA, twin.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gB, twin.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)
        active = {id(p) for p in layer.active_parameters()}
        assert all(p.grad is None for p in layer.lora_parameters() if id(p) not in active)
    # under autocast the path computes in the autocast dtype: the base's output dtype, fp32 gradients
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x).logits
    assert y.dtype == torch.bfloat16
    layer = layers["model.layers.0.self_attn.q_proj"]
    layer.zero_grad()
    y.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.active_parameters())


@pytest.mark.parametrize("levels,msg", [((8, 4, 16), "strictly increasing"), ((4, 4), "strictly increasing"),
                                        ((0, 4), "positive"), ((4, 32), "exceeds max_rank")])
def test_rank_levels_that_do_not_nest_are_rejected(levels, msg):
    with pytest.raises(ValueError, match=f"rank_levels.*{msg}"):
        NestedLoRAConfig(rank_levels=levels, max_rank=16)


def test_a_top_rank_above_a_layers_min_in_out_warns_naming_the_layers_and_fitting_ranks_do_not():
    """B·A has rank at most min(in, out): rank levels above that add parameters but no direction, which PEFT
    accepts without a word. The warning names the layers it concerns; a model every level fits gets none."""
    import warnings

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    with pytest.warns(UserWarning, match=r"top level 16 is above the rank a delta can have in 1 of 2 adapted "
                                         r"layer\(s\): '2' \(min\(in, out\) = 8\)"):
        inject_nested_lora(model, NestedLoRAConfig(target_modules=["0", "2"]))
    fits = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject_nested_lora(fits, NestedLoRAConfig(target_modules=["0", "2"]))
    from unified_lora import setup_unified_lora

    for setup in (lambda m: inject_nested_lora(m, NestedLoRAConfig(target_modules=["0", "2"])),
                  lambda m: setup_unified_lora(m, target_modules=["0", "2"], signal="loss", print_fn=None)):
        with pytest.warns(UserWarning, match="rank_levels: the top level 16") as said:
            setup(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)))
        assert said[0].filename == __file__  # the user's line, not the package's (stacklevel=3 named controller.py)


def test_a_classifier_head_targeted_below_the_top_rank_is_not_warned_about():
    """A multi-task run targets its classifier head (each task's own head delta: README's setup_multitask_lora recipe,
    and `train` with several --data sets adds it itself); its out_features, the number of classes, is below the top
    rank level 16 by design. Every such setup (and every predict or export of such a run) warned, telling the user to
    leave out a target the run needs. A head of another name trained in full (modules_to_save) is one too."""
    import warnings

    from unified_lora.multitask import setup_multitask_lora

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        setup_multitask_lora(tiny_bert(num_labels=3), ["sst2", "mrpc"], ["query", "value", "classifier"],
                             print_fn=None)
        head = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 3)))
        inject_nested_lora(head, NestedLoRAConfig(target_modules=["0", "2.1"], modules_to_save=["2"]))


@pytest.mark.parametrize("build,expected", [(tiny_bert, {"query", "value"}), (tiny_gpt2, {"c_attn"}),
                                            (tiny_llama, {"q_proj", "v_proj"})], ids=["bert", "gpt2", "llama"])
def test_target_modules_left_out_are_pefts_default_for_the_model_type(build, expected):
    """PEFT's LoraConfig(target_modules=None) adapts each model type's default layers; setup_unified_lora's default
    was ("q_proj", "v_proj") whatever the model, so a BERT or a GPT-2 without target_modules was an error. Now the
    same layers as PEFT's get_peft_model wraps are wrapped."""
    from peft import LoraConfig, get_peft_model

    from unified_lora import default_target_modules, setup_unified_lora

    model = build()
    assert set(default_target_modules(model)) == expected
    adapters, _ = setup_unified_lora(model, signal="loss", print_fn=None)
    peft_model = get_peft_model(build(), LoraConfig(r=8))
    peft_wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert set(adapters) == peft_wrapped and {n.split(".")[-1] for n in adapters} == expected


def tiny_gemma4():
    """A tiny Gemma 4 (model type gemma4: a language model and a vision tower, both with q_proj and v_proj)."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4TextConfig, Gemma4VisionConfig

    torch.manual_seed(0)
    text = Gemma4TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    vision = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=16)
    return Gemma4ForConditionalGeneration(Gemma4Config(text_config=text, vision_config=vision, audio_config=None))


def test_target_modules_left_out_of_a_model_whose_peft_default_is_a_regex_adapt_what_peft_adapts():
    """PEFT's default for Gemma 4 is a regex (its language model's q_proj and v_proj, not the vision tower's):
    list() made it its characters ['.', '*', 'l', ...], and setup failed with "matched no Linear/Conv1D module"."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    from unified_lora import default_target_modules, setup_unified_lora

    model = tiny_gemma4()
    assert default_target_modules(model) == TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["gemma4"]
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=8))
    peft_wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    adapters, _ = setup_unified_lora(model, signal="loss", print_fn=None)
    assert set(adapters) == peft_wrapped and len(adapters) == 4
    assert all(".language_model." in n for n in adapters)


def test_target_modules_left_out_for_a_model_peft_has_no_default_for_is_an_error_naming_its_layers():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"target_modules: not given, and PEFT has no default targets for a model "
                                         r"without a transformers config; .* end with: \['0', '2'\]"):
        inject_nested_lora(model, NestedLoRAConfig(rank_levels=(2, 4), max_rank=4))
    assert not any(isinstance(m, NestedLoRALayer) for m in model.modules())


def test_set_rank_outside_the_levels_is_an_error():
    with pytest.raises(ValueError, match="rank: 5 is not a nested level"):
        NestedLoRALayer(nn.Linear(4, 4)).set_rank(5)


def test_a_rank_that_is_no_level_is_refused_everywhere_it_is_taken_and_bad_layer_settings_too():
    """set_rank(8.7) was truncated to 8 silently, delta_weight(rank=5) failed inside with "tuple.index(x): x not in
    tuple", and a layer built directly took lora_dropout=-0.1 as no dropout (NestedLoRAConfig checks both)."""
    import numpy as np

    layer = NestedLoRALayer(nn.Linear(4, 4))
    for bad in (8.7, 5, True, "8"):
        with pytest.raises(ValueError, match=f"rank: {bad!r} is not a nested level of this layer"):
            layer.set_rank(bad)
        with pytest.raises(ValueError, match=f"rank: {bad!r} is not a nested level of this layer"):
            layer.delta_weight(rank=bad)
    assert layer.rank == 8
    for good in (16.0, np.int64(4), torch.tensor(16)):
        layer.set_rank(good)
        assert type(layer.rank) is int and layer.rank == int(good)
    assert layer.delta_weight(rank=np.int64(16)).shape == (4, 4)
    with pytest.raises(ValueError, match=r"lora_dropout: must be in \[0, 1\), got -0.1"):
        NestedLoRALayer(nn.Linear(4, 4), lora_dropout=-0.1)
    with pytest.raises(ValueError, match="lora_alpha: must be a positive finite number, got nan"):
        NestedLoRALayer(nn.Linear(4, 4), lora_alpha=float("nan"))


def test_a_layer_built_by_hand_checks_its_max_rank_as_nested_lora_config_does():
    """(found by the review) NestedLoRALayer took int(max_rank or the top level): max_rank=24.5 was truncated to 24, a
    block boundary at 24 that nothing asked for, 12.5 was told "largest level 16 exceeds max_rank=12", True was max
    rank 1, and 0 read as no max_rank at all."""
    import numpy as np

    for bad, message in ((24.5, r"^max_rank: must be an integer, got 24.5$"),
                         (12.5, r"^max_rank: must be an integer, got 12.5$"),
                         (True, r"^max_rank: must be an integer, got True \(bool\)$"),
                         (0, r"^max_rank: must be positive, got 0$"),
                         (8, r"^rank_levels: largest level 16 exceeds max_rank=8$")):
        with pytest.raises(ValueError, match=message):
            NestedLoRALayer(nn.Linear(32, 32), max_rank=bad)
    for good in (24, 24.0, np.int64(24), "24"):
        layer = NestedLoRALayer(nn.Linear(32, 32), max_rank=good)
        assert type(layer.max_rank) is int and layer.boundaries == (4, 8, 16, 24)
    assert NestedLoRALayer(nn.Linear(32, 32)).max_rank == 16


def test_injection_by_suffix_freezes_the_base(llama):
    adapters = inject_nested_lora(llama, NestedLoRAConfig(target_modules=["q_proj", "v_proj"]))
    assert sorted(n.split(".")[-1] for n in adapters) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(lora_state_dict(llama)) == 4 * (2 * 3 + 1)  # 4 layers × ((A, B) × 3 blocks + the rank)


def test_injection_by_regex_and_all_linear(bert, gpt2):
    a = inject_nested_lora(bert, NestedLoRAConfig(target_modules=r".*layer\.0\.attention\.self\.(query|key)"))
    assert sorted(a) == ["bert.encoder.layer.0.attention.self.key", "bert.encoder.layer.0.attention.self.query"]
    g = inject_nested_lora(gpt2, NestedLoRAConfig(target_modules="all-linear"))
    assert "lm_head" not in g and any(n.endswith("c_attn") for n in g) and any(n.endswith("c_fc") for n in g)


def test_all_linear_leaves_out_exactly_the_head_names_the_readme_lists(bert):
    """"all-linear" leaves out more than PEFT's (which takes BERT's pooler.dense): the README said "as in PEFT" and the
    config docstring "except the output head". Each left-out name must be listed where the README explains it."""
    from pathlib import Path

    from unified_lora.model import _HEAD_NAMES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    marker = '`"all-linear"` takes every Linear/Conv1D'
    assert marker in readme, "the README no longer says what all-linear leaves out"
    para = readme.split(marker, 1)[1].split("\n- ", 1)[0]
    assert all(f"`{h}`" in para for h in _HEAD_NAMES), (_HEAD_NAMES, para)
    linears = {n for n, m in bert.named_modules() if isinstance(m, nn.Linear)}
    adapters = inject_nested_lora(bert, NestedLoRAConfig(target_modules="all-linear"))
    assert "bert.pooler.dense" in linears and "classifier" in linears
    assert set(adapters) == linears - {"bert.pooler.dense", "classifier"}


@pytest.mark.parametrize("target,refused", [
    (["embed_tokens", "q_proj"], "'model.embed_tokens' (Embedding)"),
    (["q_proj", "input_layernorm"], "'model.layers.0.input_layernorm' (LlamaRMSNorm)"),
    (["self_attn"], "'model.layers.0.self_attn' (LlamaAttention)"),
    (r".*layers\.0\.self_attn.*", "'model.layers.0.self_attn' (LlamaAttention)"),
])
def test_a_target_that_names_a_module_other_than_a_linear_is_an_error(llama, target, refused):
    """A named target that is not a Linear/Conv1D (an Embedding, a norm, a whole attention block) was skipped
    silently whenever another name matched a Linear: ["embed_tokens", "q_proj"] adapted q_proj only, and the user
    believed the embeddings trained. PEFT refuses a norm or a block; its LoRA adapts an Embedding, which nested LoRA
    does not, so the message says so. This refuses all three, naming the module and its type."""
    with pytest.raises(ValueError, match="NestedLoRALayer cannot wrap") as info:
        inject_nested_lora(llama, NestedLoRAConfig(target_modules=target))
    assert str(info.value).startswith("target_modules: ") and refused in str(info.value), str(info.value)
    assert "adapts an nn.Embedding or a convolution, which nested LoRA does not" in str(info.value)
    assert not any(isinstance(m, NestedLoRALayer) for m in llama.modules())  # nothing was wrapped
    assert all(p.requires_grad for p in llama.parameters())  # nor frozen


def test_a_model_with_peft_layers_is_refused(llama):
    """On a model already wrapped by PEFT, "all-linear" (or a regex) put nested layers on PEFT's own lora_A/lora_B
    Linears and its base_layer, LoRA on LoRA; a named target silently stacked a second adapter. Now refused."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(llama, LoraConfig(target_modules=["q_proj"], r=4))
    for target in ("all-linear", ["v_proj"]):
        with pytest.raises(ValueError, match=r"model: already has 2 PEFT adapter layers .*merge_and_unload"):
            inject_nested_lora(peft_model, NestedLoRAConfig(target_modules=target))
    assert not any(isinstance(m, NestedLoRALayer) for m in peft_model.modules())
    merged = peft_model.merge_and_unload()  # what the message says to do
    assert len(inject_nested_lora(merged, NestedLoRAConfig(target_modules=["q_proj"]))) == 2


def test_torch_transformer_layers_run_in_eval_with_their_linears_wrapped():
    """torch's nn.TransformerEncoder: nn.MultiheadAttention uses out_proj's weight without calling the module, and
    the encoder layer's inference fast path reads linear1/linear2's `.weight`. Wrapped by "all-linear", eval under
    no_grad raised "'NestedLoRALayer' object has no attribute 'weight'". Now "all-linear" leaves out_proj out (naming
    it is a ValueError) and the wrapped linears keep the layer off its fast path, so the LoRA delta is applied."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(enc, 2, enable_nested_tensor=False), nn.Linear(16, 2)).eval()
    with pytest.raises(ValueError, match=r"out_proj of an nn\.MultiheadAttention"):
        inject_nested_lora(copy.deepcopy(model), NestedLoRAConfig(target_modules=["out_proj", "linear1"]))
    plain = copy.deepcopy(model)
    adapters = inject_nested_lora(model, NestedLoRAConfig(target_modules="all-linear"))
    assert sorted(n.split(".")[-1] for n in adapters) == ["1", "linear1", "linear1", "linear2", "linear2"]
    for i, layer in enumerate(adapters.values()):
        _randomize_B(layer, seed=i)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        got = model(x)
        for name, layer in adapters.items():  # the same model with each delta merged into a plain Linear
            w = plain.get_submodule(name).weight
            w += layer.delta_weight()
        ref = plain(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert (got - model.train()(x)).abs().max() < 1e-4  # eval (fast-path candidate) = train (dropout 0)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")  # (the unwrapped model's path)
@pytest.mark.parametrize("target", ["all-linear", r"0\.layers\.1\.linear2"])
def test_a_torch_transformer_encoder_with_a_padding_mask_runs_its_wrapped_layers_in_eval(target):
    """nn.TransformerEncoder (enable_nested_tensor=True, torch's default) has an inference path of its own: in eval
    under no_grad with a src_key_padding_mask it read the first layer's linear1.weight (AttributeError on a wrapped
    layer), and with only a later layer wrapped it fed that layer a nested tensor ("NestedTensorImpl doesn't support
    sizes"). The encoder now stays off that path, and the padded batch gives the deltas' outputs. Multi-task layers
    (which replace the plain ones) kept no fast-path hook, so their encoder layer read `.weight` too."""
    from unified_lora.multitask import inject_multitask_lora, task_context

    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(enc, 2), nn.Linear(16, 2)).eval()
    plain, multi = copy.deepcopy(model), copy.deepcopy(model)
    adapters = inject_nested_lora(model, NestedLoRAConfig(target_modules=target))
    for i, layer in enumerate(adapters.values()):
        _randomize_B(layer, seed=i)
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        got = model[0](x, src_key_padding_mask=mask)
        for name, layer in adapters.items():
            plain.get_submodule(name).weight += layer.delta_weight()
        plain[0].use_nested_tensor = False  # the reference: torch's unfused path on the merged weights
        ref = plain[0](x, src_key_padding_mask=mask)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1, :3], ref[1, :3], rtol=1e-4, atol=1e-4)

    with torch.no_grad():
        base = multi[0](x, src_key_padding_mask=mask)
    _, router = inject_multitask_lora(multi, NestedLoRAConfig(target_modules=target), tasks=["a"])
    with torch.no_grad(), task_context(router, ["a", "a"]):
        got = multi[0](x, src_key_padding_mask=mask)  # B = 0: the base model's outputs
    torch.testing.assert_close(got[0], base[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, :3], base[1, :3], rtol=1e-5, atol=1e-5)


def _weight_computed_by(kind: str) -> nn.Module:
    """A Linear whose `.weight` is computed at each forward: a parametrization, or torch's old weight_norm hook."""
    lin = nn.Linear(8, 6)
    if kind == "old_weight_norm":
        return torch.nn.utils.weight_norm(lin)
    return getattr(torch.nn.utils.parametrizations, kind)(lin)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated:FutureWarning")
@pytest.mark.parametrize("kind", ["orthogonal", "weight_norm", "spectral_norm", "old_weight_norm"])
def test_a_parametrized_linear_trains_and_refuses_a_merge_that_would_drop_its_delta(kind):
    """A Linear under torch.nn.utils.parametrize (weight_norm, spectral_norm, orthogonal) computes `.weight` from its
    parametrization at every forward. merge_adapters wrote the delta into that temporary, marked the layer merged,
    and the merged model then ran without any delta (outputs off by ~10 here); merge_and_unload returned the plain
    base. Under torch's old weight_norm, injection failed with "you can only change requires_grad flags of leaf
    variables". Now the layer trains, its parametrization's parameters stay frozen, and a merge is refused before
    any layer changes."""
    from unified_lora.peft_io import merge_and_unload

    torch.manual_seed(0)
    model = nn.Sequential(_weight_computed_by(kind), nn.ReLU(), nn.Linear(6, 4))
    adapters = inject_nested_lora(model, NestedLoRAConfig(target_modules="all-linear"))
    assert list(adapters) == ["0", "2"]
    assert [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n] == []
    for i, layer in enumerate(adapters.values()):
        _randomize_B(layer, seed=i)
    model.eval()  # (spectral_norm's power iteration updates its estimate at each forward in training mode)
    x = torch.randn(3, 8)
    with torch.no_grad():
        unmerged = model(x)
        ref = model[2](torch.relu(model[0].base_layer(x) + x @ adapters["0"].delta_weight().T))
    torch.testing.assert_close(unmerged, ref)
    model(x).sum().backward()
    assert all(p.grad is not None for p in adapters["0"].active_parameters())
    for merge in (merge_adapters, merge_and_unload):
        with pytest.raises(ValueError, match=r"computed at each forward by .*remove_parametrizations"):
            merge(model)
        assert all(not layer.merged_rank for layer in adapters.values())
        assert all(isinstance(model[i], NestedLoRALayer) for i in (0, 2))
        with torch.no_grad():
            assert torch.equal(model(x), unmerged)


class _SharedLinear(nn.Module):
    """One Linear registered in two parents (`enc.0` and `dec.proj`) and run through both."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(8, 8))
        self.dec = nn.ModuleDict({"proj": self.enc[0]})
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.dec["proj"](torch.relu(self.enc(x)))))


@pytest.mark.parametrize("target", [["0"], ["proj"], r"dec\.proj", "all-linear"])
def test_a_linear_shared_by_two_parents_gets_its_delta_under_both_names(target, tmp_path):
    """named_modules() lists a shared module once, under its first name, and the nested layer was put in that
    parent only: a forward through the other name silently ran the bare Linear (a target naming only the second
    name matched nothing). Now one nested layer sits under every name, as when a whole block is shared; a merge
    and merge_and_unload keep the sharing, the state dict loads into a fresh wrapped model, and the PEFT export
    and import, which PEFT applies under the first name only, are refused."""
    from unified_lora.peft_io import export_peft_adapter, import_peft_adapter, merge_and_unload

    torch.manual_seed(0)
    model, plain = _SharedLinear(), _SharedLinear()
    plain.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="modules_to_save"):  # a failed injection is undone under both names
        inject_nested_lora(model, NestedLoRAConfig(target_modules=target, modules_to_save=["heda"]))
    assert type(model.dec["proj"]) is nn.Linear and model.dec["proj"] is model.enc[0]
    adapters = inject_nested_lora(model, NestedLoRAConfig(target_modules=target))
    assert list(adapters)[0] == "enc.0" and model.dec["proj"] is model.enc[0] is adapters["enc.0"]
    for i, layer in enumerate(adapters.values()):
        _randomize_B(layer, seed=i)
    x = torch.randn(3, 8)
    with torch.no_grad():
        got = model(x)
        for name, layer in adapters.items():
            plain.get_submodule(name).weight += layer.delta_weight()
        ref = plain(x)
    torch.testing.assert_close(got, ref)
    fresh = _SharedLinear()
    inject_nested_lora(fresh, NestedLoRAConfig(target_modules=target))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), got)
        merge_adapters(model)  # not refused as a tied weight: both names are the one layer's
        torch.testing.assert_close(model(x), got)
        unmerge_adapters(model)
    with pytest.raises(ValueError, match=r"registered in two parents \('enc\.0' is also 'dec\.proj'\).*merge_and_unload"):
        export_peft_adapter(model, None, tmp_path / "peft")
    from peft import LoraConfig, get_peft_model
    get_peft_model(_SharedLinear(), LoraConfig(target_modules=["enc.0"], r=8)).save_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match=r"registered in two parents .*copy\.deepcopy"):
        import_peft_adapter(_SharedLinear(), tmp_path / "p")
    unwrapped = merge_and_unload(model)
    assert type(unwrapped.dec["proj"]) is nn.Linear and unwrapped.dec["proj"] is unwrapped.enc[0]
    with torch.no_grad():
        torch.testing.assert_close(unwrapped(x), got)


def test_modules_to_save_are_trainable(bert):
    inject_nested_lora(bert, NestedLoRAConfig(target_modules=["query"], modules_to_save=["classifier"]))
    assert bert.classifier.weight.requires_grad and not bert.bert.embeddings.word_embeddings.weight.requires_grad


def test_a_target_that_matches_nothing_lists_the_names_it_saw(bert):
    with pytest.raises(ValueError, match=r"matched no Linear.*'query'"):
        inject_nested_lora(bert, NestedLoRAConfig(target_modules=["q_proj"]))


def _reference_delta(layer, x):
    """The equation through plain autograd: scaling · x Aᵀ Bᵀ over the active prefix."""
    return layer.scaling * (x @ layer.active_A().T) @ layer.active_B().T


@pytest.mark.parametrize("rank", [4, 8, 16])
def test_gradients_of_every_active_block_match_plain_autograd(rank, kernel):
    torch.manual_seed(0)
    layer = NestedLoRALayer(nn.Linear(12, 6).double(), lora_alpha=8, initial_rank=rank, kernel=kernel)
    _randomize_B(layer)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 6, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    ours = [p.grad.clone() for p in layer.active_parameters()] + [x.grad.clone()]
    layer.zero_grad()
    x.grad = None
    ((layer.base_layer(x) + _reference_delta(layer, x)) * g).sum().backward()
    ref = [p.grad for p in layer.active_parameters()] + [x.grad]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    active = {id(p) for p in layer.active_parameters()}
    assert all(p.grad is None for p in layer.lora_parameters() if id(p) not in active)


@pytest.mark.parametrize("shape", [(4, 12), (3, 5, 12), (12,)])
@pytest.mark.parametrize("rank", [4, 8, 16])
def test_an_in_place_op_on_the_output_trains_at_every_rank_with_plain_autograd_gradients(rank, shape, kernel):
    """`y += residual`, `nn.ReLU(inplace=True)`: allowed on a Linear's output, and on the layer's at r4 (plain ops). At
    r8 and r16 the nested path returned its output as a view made inside the autograd Function, and torch refuses an
    in-place op on such a view ("a view ... created inside a custom Function"), so a model training fine at r4 failed
    as soon as the controller climbed. The output is no view now, and the gradients are plain autograd's."""
    torch.manual_seed(0)
    layer = NestedLoRALayer(nn.Linear(12, 6).double(), lora_alpha=8, initial_rank=rank, kernel=kernel)
    _randomize_B(layer)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    res = torch.randn(*shape[:-1], 6, dtype=torch.float64)

    ours = grads_after_in_place_ops(layer, x, res, layer(x))
    for a, b in zip(ours, grads_after_in_place_ops(layer, x, res, layer.base_layer(x) + _reference_delta(layer, x))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("layout", ["rows", "batch", "strided_batch", "strided_rows"])
def test_autograd_saves_only_the_input_and_the_rank_wide_intermediate(kernel, layout):
    """Same activation memory as PEFT: no concatenated copy of A or B is kept for backward, and no copy of
    the input either, whatever its layout (a strided input is saved as it is, as PEFT's Linear saves it)."""
    layer = NestedLoRALayer(nn.Linear(32, 16), initial_rank=16, kernel=kernel)
    x = {"rows": lambda: torch.randn(64, 32), "batch": lambda: torch.randn(4, 16, 32),
         "strided_batch": lambda: torch.randn(16, 4, 32).transpose(0, 1),
         "strided_rows": lambda: torch.randn(32, 64).t()}[layout]()
    assert x.is_contiguous() is (not layout.startswith("strided"))
    params = {p.data_ptr() for p in layer.parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    extra = {t.data_ptr(): t.shape for t in saved if t.data_ptr() not in params and t.data_ptr() != x.data_ptr()}
    assert [s.numel() for s in extra.values()] == [64 * 16]  # u = h Aᵀ only
    _randomize_B(layer)
    x.requires_grad_(True)
    gy = torch.randn(y.shape)
    y = layer(x)
    y.backward(gy)  # backward from what was saved gives what a contiguous copy of the input gives
    got = [p.grad.clone() for p in layer.active_parameters()] + [x.grad]
    layer.zero_grad()
    xc = x.detach().contiguous().requires_grad_(True)
    layer(xc).backward(gy)
    for a, b in zip(got, [p.grad for p in layer.active_parameters()] + [xc.grad]):
        torch.testing.assert_close(a, b)


def test_bf16_autocast_backward_gives_fp32_gradients(kernel):
    layer = NestedLoRALayer(nn.Linear(16, 8), initial_rank=8, kernel=kernel)
    _randomize_B(layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(4, 16))
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.active_parameters())


@pytest.mark.parametrize("rank", [4, 8, 16])
def test_an_fp64_layer_under_autocast_computes_in_fp64_at_every_rank_as_f_linear_does(rank, kernel):
    """Autocast leaves fp64 alone: F.linear (the base layer) and the one-block path compute an fp64 layer in fp64.
    The nested path (r8, r16) computed it in the autocast dtype (bf16 here, errors ~5e-2), so the same layer was
    exact at r4 and rounded at r8. fp32 blocks on an fp64 base: r8 adds a bf16 delta (autocast casts fp32), and r4
    raised a dtype mismatch (an fp64 base output in an addmm with the bf16 u); it now adds the delta as r8 does."""
    torch.manual_seed(0)
    layer = NestedLoRALayer(nn.Linear(32, 16).double(), initial_rank=rank, kernel=kernel)
    _randomize_B(layer)
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    ref = layer.base_layer(x) + _reference_delta(layer, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, ref)
    got = torch.autograd.grad(y.square().sum(), [x, *layer.active_parameters()])
    for a, b in zip(got, torch.autograd.grad(ref.square().sum(), [x, *layer.active_parameters()])):
        torch.testing.assert_close(a, b)

    for p in layer.lora_parameters():  # fp32 blocks on the fp64 base
        p.data = p.data.float()
    ref = layer.base_layer(x) + _reference_delta(layer, x.float()).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("rank", [2, 4])  # one active block (plain ops) and two (the custom Function)
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_fused_residual_path_matches_the_unfused_equation_and_its_gradients(base_dtype, rank, kernel):
    # the LoRA up-projection accumulates into the base output with one addmm (for a base output of another
    # dtype, in the wider dtype and rounded once): values and every gradient must equal the plain maths
    torch.manual_seed(0)
    base = nn.Linear(12, 10).to(base_dtype)
    layer = NestedLoRALayer(base, rank_levels=(2, 4, 8), lora_alpha=6.0, kernel=kernel)
    _randomize_B(layer)
    for q in list(layer.lora_A) + list(layer.lora_B):  # fp32 adapters: bf16 exercises the cast-add path
        q.data = q.data.float()
    layer.set_rank(rank)
    k = layer.n_active_blocks
    x = torch.randn(3, 5, 12).to(base_dtype).requires_grad_()
    y = layer(x)
    assert y.dtype == base_dtype and y.shape == (3, 5, 10)
    y.float().pow(2).sum().backward()
    gx, gA, gB = x.grad.clone(), [a.grad.clone() for a in layer.lora_A[:k]], [b.grad.clone() for b in layer.lora_B[:k]]
    for p in list(layer.parameters()) + [x]:
        p.grad = None
    A = torch.cat(list(layer.lora_A[:k]), 0)
    B = torch.cat(list(layer.lora_B[:k]), 1)
    ref = (base(x).float() + layer.scaling * (x.float() @ A.T) @ B.T).to(base_dtype)  # summed in fp32, rounded once
    tol = dict(rtol=1e-5, atol=1e-5) if base_dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, ref.detach(), **tol)
    ref.float().pow(2).sum().backward()
    torch.testing.assert_close(x.grad, gx, **tol)
    torch.testing.assert_close(torch.cat([a.grad for a in layer.lora_A[:k]], 0), torch.cat(gA, 0), **tol)
    torch.testing.assert_close(torch.cat([b.grad for b in layer.lora_B[:k]], 1), torch.cat(gB, 1), **tol)
    assert layer.lora_A[2].grad is None  # the paused block stays out of the graph


# -- kernel="cpp": the nested path as a C++ autograd Function --------------------------------------------------


def _run_layer(layer, x, gy, autocast=None):
    for p in list(layer.parameters()) + [x]:
        p.grad = None
    if autocast:
        with torch.autocast("cpu", dtype=autocast):
            y = layer(x)
    else:
        y = layer(x)
    y.backward(gy.to(y.dtype))
    return [y.detach(), x.grad] + [p.grad for p in layer.lora_parameters()]


@pytest.mark.skipif(not can_build_cpp(), reason="kernel='cpp' needs g++ and ninja")
@pytest.mark.parametrize("rank", [8, 16])
@pytest.mark.parametrize("case", ["fp32", "bf16_autocast", "bf16_base_fp32_adapters", "x_without_grad"])
def test_cpp_kernel_gives_bit_identical_outputs_and_gradients_to_the_python_kernel(case, rank):
    torch.manual_seed(rank)
    py = NestedLoRALayer(nn.Linear(24, 20), initial_rank=rank)
    _randomize_B(py)
    if case == "bf16_base_fp32_adapters":
        py.base_layer.to(torch.bfloat16)
    cpp = copy.deepcopy(py)
    cpp.kernel = "cpp"
    dtype = torch.bfloat16 if case == "bf16_base_fp32_adapters" else torch.float32
    x = torch.randn(3, 7, 24, dtype=dtype, requires_grad=case != "x_without_grad")
    gy = torch.randn(3, 7, 20)
    ac = torch.bfloat16 if case == "bf16_autocast" else None
    ref, got = _run_layer(py, x, gy, ac), _run_layer(cpp, x, gy, ac)
    assert "CppNode" in cpp(x).grad_fn.name() and "CppNode" not in py(x).grad_fn.name()
    assert ref[0].dtype == got[0].dtype and (ref[1] is None) == (case == "x_without_grad")
    for a, b in zip(ref, got):
        assert (a is None and b is None) or torch.equal(a, b)
    assert sum(g is not None for g in got[2:]) == 2 * py.n_active_blocks  # paused blocks stay out of the graph


def _nested_path_of(kernel):
    """(base_out, h, scaling, k, *blocks) -> output, through the kernel's autograd Function as the layer calls it."""
    if kernel == "cpp":
        from unified_lora._fused import layer_kernels

        return lambda base, x, s, k, *bl: layer_kernels().nested_path(base, x, s, k, list(bl))
    from unified_lora.layer import _apply_nested_path

    return _apply_nested_path


@pytest.mark.parametrize("rank", [8, 16])
def test_both_kernels_pass_gradcheck(rank, kernel):
    layer = NestedLoRALayer(nn.Linear(6, 5).double(), rank_levels=(2, 4, 8), initial_rank=rank // 2, kernel=kernel)
    _randomize_B(layer)
    blocks = [p for p in layer.active_parameters()]  # A blocks, then B blocks
    k = layer.n_active_blocks
    assert k >= 2
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    base = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    path = _nested_path_of(kernel)
    assert torch.autograd.gradcheck(lambda base, x, *bl: path(base, x, layer.scaling, k, *bl), (base, x, *blocks))


@pytest.mark.parametrize("layout", ["rows", "batch", "strided_batch"])
@pytest.mark.parametrize("rank", [8, 16])
def test_a_double_backward_through_either_kernel_gives_plain_autograd_second_derivatives(rank, layout, kernel):
    """create_graph=True (a gradient penalty on the parameters' gradients, MAML): the nested path saves u = h Aᵀ
    without a graph, and its backward used it for grad B, so d(grad B)/dA and the input's terms were silently lost
    (errors of 1e3-1e5 here). Both kernels must give the plain ops' second derivatives, and pass gradgradcheck."""
    torch.manual_seed(0)
    layer = NestedLoRALayer(nn.Linear(6, 5).double(), rank_levels=(2, 4, 8), initial_rank=rank // 2, kernel=kernel)
    _randomize_B(layer)
    x = {"rows": lambda: torch.randn(4, 6), "batch": lambda: torch.randn(2, 3, 6),
         "strided_batch": lambda: torch.randn(3, 2, 6).transpose(0, 1)}[layout]().double().requires_grad_(True)

    def second_order(y):
        gs = torch.autograd.grad(y.square().sum(), layer.active_parameters(), create_graph=True)
        sum(g.square().sum() for g in gs).backward()
        got = [x.grad] + [p.grad for p in layer.active_parameters()]
        x.grad = None
        layer.zero_grad(set_to_none=True)
        return got

    got = second_order(layer(x))
    ref = second_order(layer.base_layer(x) + _reference_delta(layer, x))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    blocks, k, path = layer.active_parameters(), layer.n_active_blocks, _nested_path_of(kernel)
    base = torch.randn(*x.shape[:-1], 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda base, x, *bl: path(base, x, layer.scaling, k, *bl), (base, x, *blocks))


def test_a_double_backward_through_an_input_cast_in_the_layer_is_an_error(kernel):
    """Under autocast the path saves a cast copy of the input with no graph to it: its second-order terms cannot
    be formed, so create_graph=True says so instead of returning a wrong gradient. A first-order backward and an
    input that needs no gradient are unaffected."""
    layer = NestedLoRALayer(nn.Linear(8, 8), initial_rank=16, kernel=kernel)
    _randomize_B(layer)
    x = torch.randn(3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.float().square().sum(), layer.active_parameters(), create_graph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.detach())
    gs = torch.autograd.grad(y.float().square().sum(), layer.active_parameters(), create_graph=True)
    assert all(g.requires_grad for g in gs)


def test_both_kernels_catch_a_block_changed_in_place_before_backward(kernel):
    layer = NestedLoRALayer(nn.Linear(8, 8), initial_rank=16, kernel=kernel)
    y = layer(torch.randn(4, 8, requires_grad=True))
    with torch.no_grad():
        layer.lora_B[1].add_(1.0)  # e.g. a restore between forward and backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("rank", [8, 16])
def test_the_python_kernel_calls_the_c_apply_and_gets_what_function_apply_gives(rank, monkeypatch):
    # The layer skips Function.apply's Python wrapper (host time on small layers); the result must not change.
    import unified_lora.layer as L

    assert L._nested_apply is not L._NestedLoRAPath.apply  # this torch has the C apply, so the fast path runs
    real, calls = L._nested_apply, []
    torch.manual_seed(rank)
    layer = NestedLoRALayer(nn.Linear(24, 20), initial_rank=rank)
    _randomize_B(layer)
    x, gy = torch.randn(3, 7, 24, requires_grad=True), torch.randn(3, 7, 20)
    for ac in (None, torch.bfloat16):
        monkeypatch.setattr(L, "_nested_apply", lambda *a: calls.append(1) or real(*a))
        fast = _run_layer(layer, x, gy, ac)
        monkeypatch.setattr(L, "_nested_apply", L._NestedLoRAPath.apply)
        slow = _run_layer(layer, x, gy, ac)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(fast, slow))
    assert len(calls) == 2
    assert layer(x).grad_fn.name() == "_NestedLoRAPathBackward"  # the same Function's backward node


def test_kernel_must_be_python_or_cpp_and_a_missing_compiler_fails_at_construction(monkeypatch, tmp_path):
    # needs no compiler: the missing one is the case under test
    with pytest.raises(ValueError, match=r"kernel: must be one of \('python', 'cpp'\), got 'triton'"):
        NestedLoRAConfig(kernel="triton")
    with pytest.raises(ValueError, match="kernel: must be one of"):
        NestedLoRALayer(nn.Linear(4, 4), kernel="cuda")
    from unified_lora import FusedKernelsUnavailable  # public: a user catches it there
    from unified_lora._fused import layer_kernels

    layer_kernels.cache_clear()
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler and no ninja on this PATH
    try:
        with pytest.raises(FusedKernelsUnavailable, match=r"kernel='cpp'\) builds nested_path.cpp .* needs a C\+\+ "
                                                          r"compiler \(g\+\+\) and ninja.*kernel='python' \(the default\)"):
            NestedLoRALayer(nn.Linear(4, 4), kernel="cpp")
    finally:
        layer_kernels.cache_clear()


@pytest.mark.skipif(not can_build_cpp(), reason="kernel='cpp' needs g++ and ninja")
def test_a_cpp_kernel_model_saves_loads_and_copies_like_any_other(tmp_path, bert):
    import io

    adapters = inject_nested_lora(bert, NestedLoRAConfig(target_modules=["query", "value"], initial_rank=16,
                                                         kernel="cpp"))
    assert all(a.kernel == "cpp" for a in adapters.values())
    assert "kernel=cpp" in repr(next(iter(adapters.values())))
    buf = io.BytesIO()
    torch.save(bert, buf)  # the layer holds the kernel's name, not the compiled module
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    twin = copy.deepcopy(bert)
    ids = torch.randint(0, 64, (2, 9))
    ref = bert(input_ids=ids).logits
    for m in (again, twin):
        torch.testing.assert_close(m(input_ids=ids).logits, ref, rtol=0, atol=0)
    assert set(lora_state_dict(bert)) == set(lora_state_dict(again))


@pytest.mark.parametrize("kernel_name", ["python", CPP])
def test_torch_compile_traces_either_kernel_whole(kernel_name):
    # Dynamo cannot trace into the C++ extension, so under torch.compile kernel="cpp" runs the Python Function
    # (bit-identical); calling the extension while compiling breaks the graph and fails this test.
    import torch._dynamo as dynamo

    layer = NestedLoRALayer(nn.Linear(16, 16), initial_rank=16, kernel=kernel_name)
    _randomize_B(layer)
    x = torch.randn(4, 16, requires_grad=True)
    explained = dynamo.explain(layer)(x)
    assert explained.break_reasons == [] and explained.graph_count == 1
    dynamo.reset()
    compiled = torch.compile(layer, backend="eager")
    got, ref = compiled(x), layer(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    gx_got, *g_got = torch.autograd.grad(got.square().sum(), [x, *layer.active_parameters()])
    gx_ref, *g_ref = torch.autograd.grad(ref.square().sum(), [x, *layer.active_parameters()])
    for a, b in zip([gx_got, *g_got], [gx_ref, *g_ref]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    dynamo.reset()


def test_torch_compile_traces_a_wrapped_transformers_model_with_no_graph_break(llama):
    """A layer compiled alone traced whole, but inside a model every nested layer broke the graph: dynamo cannot
    trace `torch._C._current_graph_task_id()` (the activation-checkpointing rank check) in the model's frame, so
    a Llama with q/v wrapped compiled into 15 graphs (14 breaks) where the bare model compiles into one. The check
    is skipped while compiling."""
    import torch._dynamo as dynamo

    adapters = inject_nested_lora(llama, NestedLoRAConfig(target_modules=["q_proj", "v_proj"], initial_rank=16))
    for layer in adapters.values():
        _randomize_B(layer)
    ids = torch.randint(0, 64, (2, 8))
    dynamo.reset()
    explained = dynamo.explain(llama)(input_ids=ids)
    assert explained.break_reasons == [] and explained.graph_count == 1
    dynamo.reset()
    got = torch.compile(llama, backend="eager")(input_ids=ids).logits
    torch.testing.assert_close(got, llama(input_ids=ids).logits, rtol=0, atol=0)
    dynamo.reset()


@pytest.mark.parametrize("rank", [4, 8, 16])
def test_torch_func_grad_and_per_sample_vmap_grads_match_autograd(rank, kernel):
    """torch.func (functional_call + grad, and vmap over grad for per-sample gradients) works at every rank and gives
    autograd's gradients; paused blocks get zero gradients there, as any parameter a function does not use."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    layer = NestedLoRALayer(nn.Linear(16, 8), initial_rank=rank, kernel=kernel)
    _randomize_B(layer)
    params = {n: p.detach() for n, p in layer.named_parameters() if p.requires_grad}
    xs, ys = torch.randn(5, 3, 16), torch.randn(5, 3, 8)

    def loss(p, x, y):
        return ((functional_call(layer, p, (x,)) - y) ** 2).sum()

    def autograd_grads(x, y):
        layer.zero_grad(set_to_none=True)
        loss(dict(layer.named_parameters()), x, y).backward()
        return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                for n, p in layer.named_parameters() if p.requires_grad}

    got, ref = grad(loss)(params, xs, ys), autograd_grads(xs, ys)
    assert set(got) == set(ref) and any(bool(g.abs().sum() > 0) for g in ref.values())
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-5)
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, xs, ys)
    for i in range(len(xs)):
        ref_i = autograd_grads(xs[i], ys[i])
        for n in ref_i:
            torch.testing.assert_close(per_sample[n][i], ref_i[n], rtol=1e-5, atol=1e-4)
    if rank > 4:  # documented: forward-mode AD through the custom Function is not defined, and torch says so
        from torch.func import jvp

        with pytest.raises(NotImplementedError, match="jvp"):
            jvp(layer, (xs[0],), (torch.ones_like(xs[0]),))


@pytest.mark.parametrize("rank", [8, 16])
def test_torch_func_grad_under_bf16_autocast_matches_autograd(rank, kernel):
    """Under torch.func the layer's Function saves the input as given (fp32), and backward multiplied it with the
    bf16 gradient: `grad` under bf16 autocast raised 'expected m1 and m2 to have the same dtype' at r8 and r16."""
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    layer = NestedLoRALayer(nn.Linear(16, 8), initial_rank=rank, kernel=kernel)
    _randomize_B(layer)
    params = {n: p.detach() for n, p in layer.named_parameters() if p.requires_grad}
    x = torch.randn(5, 3, 16)

    def loss(p, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return functional_call(layer, p, (x,)).float().square().sum()

    got = grad(loss)(params, x)
    loss(dict(layer.named_parameters()), x).backward()
    for n, p in layer.named_parameters():
        if p.requires_grad:
            assert got[n].dtype == p.dtype
            torch.testing.assert_close(got[n], torch.zeros_like(p) if p.grad is None else p.grad, rtol=0, atol=0)


def test_a_layer_pickled_before_the_kernel_option_still_runs():
    layer = NestedLoRALayer(nn.Linear(8, 8), initial_rank=16)
    del layer.__dict__["kernel"]  # what torch.load gives for a whole layer saved by an older version
    assert layer.kernel == "python"
    layer(torch.randn(2, 8)).sum().backward()


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("rank", [4, 8, 16])
def test_gradient_checkpointing_gives_the_same_gradients_and_leaves_paused_blocks_alone(rank, reentrant, kernel):
    """model.gradient_checkpointing_enable() recomputes each decoder layer in backward (torch.utils.checkpoint):
    the nested path must give the same loss and block gradients as without it, and paused blocks keep .grad None."""
    from conftest import tiny_llama

    from unified_lora import setup_unified_lora

    plain = tiny_llama().train()
    adapters, _ = setup_unified_lora(plain, target_modules=["q_proj", "v_proj"], layer_kernel=kernel, print_fn=None)
    for i, a in enumerate(adapters.values()):
        _randomize_B(a, seed=i)
        a.set_rank(rank)
    ckpt = copy.deepcopy(plain)
    # transformers 5 renamed gradient_checkpointing_enable (still there, deprecated) to activation_checkpointing_enable
    if hasattr(ckpt, "activation_checkpointing_enable"):
        ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert getattr(ckpt, "is_activation_checkpointing", None) or ckpt.is_gradient_checkpointing
    x = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for m in (plain, ckpt):
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if "lora_" not in name:
            continue
        block = int(name.rsplit(".", 1)[1])
        if block >= (4, 8, 16).index(rank) + 1:  # paused
            assert p.grad is None and q.grad is None, name
        else:
            assert q.grad is not None and torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("ranks", [(16, 8), (8, 16), (8, 4)])
def test_a_backward_after_a_rank_switch_gives_the_gradients_of_the_rank_the_forward_ran_at(ranks, kernel):
    """Without checkpointing the graph holds what the forward used (its blocks and scaling): a set_rank before the
    backward changes nothing in it, nor does it give gradients to blocks the forward did not use."""
    fwd, new = ranks
    torch.manual_seed(0)
    layer = NestedLoRALayer(nn.Linear(12, 6).double(), initial_rank=fwd, kernel=kernel)
    _randomize_B(layer)
    x = torch.randn(3, 12, dtype=torch.float64)
    ref = [g.clone() for g in torch.autograd.grad(layer(x).square().sum(), layer.active_parameters())]
    used = layer.active_parameters()
    loss = layer(x).square().sum()
    layer.set_rank(new)
    loss.backward()
    for p, g in zip(used, ref):
        assert torch.equal(p.grad, g)
    assert all(p.grad is None for p in layer.lora_parameters() if all(p is not q for q in used))


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_rank_switch_between_a_checkpointed_forward_and_its_backward_is_an_error_not_mixed_gradients(reentrant,
                                                                                                        kernel):
    """Activation checkpointing recomputes each layer's forward inside backward at the layer's rank then. After a
    set_rank between a forward (r16) and its backward, reentrant checkpointing silently gave the r8 graph's gradients
    (other blocks, another scaling) for the r16 loss, and non-reentrant raised torch's note on mismatched saved
    tensors. Both raise a clear error now; a switch after backward (the controller's order) still trains as without
    checkpointing."""
    from conftest import tiny_llama

    from unified_lora import setup_unified_lora

    plain = tiny_llama().train()
    adapters, _ = setup_unified_lora(plain, target_modules=["q_proj", "v_proj"], layer_kernel=kernel, print_fn=None)
    for i, a in enumerate(adapters.values()):
        _randomize_B(a, seed=i)
        a.set_rank(16)
    ckpt = copy.deepcopy(plain)
    if hasattr(ckpt, "activation_checkpointing_enable"):
        ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    x = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))

    def set_rank(model, r):
        for a in lora_layers(model).values():
            a.set_rank(r)

    loss = ckpt(input_ids=x, labels=x).loss
    set_rank(ckpt, 8)
    with pytest.raises(RuntimeError, match="recomputed inside backward .* at rank 8, but the forward it replays ran "
                                           "at rank 16"):
        loss.backward()
    ckpt.zero_grad(set_to_none=True)
    set_rank(ckpt, 16)
    for r in (16, 8):  # the controller's order: backward, then switch
        set_rank(ckpt, r)
        set_rank(plain, r)
        for m in (plain, ckpt):
            m.zero_grad(set_to_none=True)
            m(input_ids=x, labels=x).loss.backward()
        for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
            if "lora_" in name:
                assert (p.grad is None) == (q.grad is None), name
                if p.grad is not None:
                    torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_a_block_of_another_dtype_gets_its_gradient_in_its_own_dtype(kernel):
    """Blocks of mixed dtypes (a bf16 block among fp32 ones): the path computes in the first block's dtype, and
    each block's gradient comes back in that block's dtype with the values of an all-fp32 layer's gradient."""
    layer = NestedLoRALayer(nn.Linear(16, 8), initial_rank=16, kernel=kernel)
    _randomize_B(layer)
    with torch.no_grad():
        for p in (layer.lora_A[1], layer.lora_B[1]):
            p.copy_(p.to(torch.bfloat16))  # values a bf16 block can hold, so both layers compute the same
    ref = copy.deepcopy(layer)
    layer.lora_A[1].data, layer.lora_B[1].data = layer.lora_A[1].data.bfloat16(), layer.lora_B[1].data.bfloat16()
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)
    layer(x).square().sum().backward()
    ref(x).square().sum().backward()
    for p, q in zip(layer.lora_parameters(), ref.lora_parameters()):
        assert p.grad.dtype == p.dtype
        assert torch.equal(p.grad, q.grad.to(p.dtype))


def test_a_merged_half_precision_layer_saves_its_kept_base_bit_for_bit_even_under_autocast():
    # The state dict of a merged bf16 layer holds the base weight merge kept (not base + delta - delta, which rounds
    # off an ulp in about one element in ten), and a merge under autocast still sums in fp32.
    base = nn.Linear(64, 48).to(torch.bfloat16)
    layer = NestedLoRALayer(base, rank_levels=(4, 8, 16), initial_rank=8)
    _randomize_B(layer)
    w0 = base.weight.detach().clone()
    with torch.no_grad():
        ref = (w0.double() + layer.scaling * (layer.active_B().double() @ layer.active_A().double())).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer.merge()
    assert (base.weight != ref).sum().item() <= ref.numel() // 1000
    assert torch.equal(layer.state_dict()["base_layer.weight"], w0) and not torch.equal(base.weight, w0)
    layer.unmerge()
    assert torch.equal(base.weight, w0)


@pytest.mark.skipif(not can_build_cpp(), reason="kernel='cpp' needs g++ and ninja")
def test_the_cpp_extension_is_named_by_its_source_so_two_versions_never_share_a_build():
    # Two installs (two venvs or checkouts) share ~/.cache/torch_extensions. Under one fixed name, a process of one
    # version loaded the library the other had just built from its own source, and the bit-identity test above
    # failed while a second checkout with an edited csrc/nested_path.cpp ran beside it.
    from unified_lora import _fused

    text, flags = _fused.LAYER_SOURCE.read_text(), {"extra_cflags": ["-O2"]}
    name = _fused.extension_name("unified_lora_nested_path", text, flags)
    assert name == _fused.extension_name("unified_lora_nested_path", text, flags)
    assert name != _fused.extension_name("unified_lora_nested_path", text + "\n// edited", flags)
    assert name != _fused.extension_name("unified_lora_nested_path", text, {"extra_cflags": ["-O3"]})
    # two venvs with different torch versions share the cache folder too (it names Python and the device only)
    assert name == _fused.extension_name("unified_lora_nested_path", text, flags, torch.__version__)
    assert name != _fused.extension_name("unified_lora_nested_path", text, flags, "2.4.0")
    # and the ninja on PATH: ninja 1.11 (a system package) and 1.13 (pip's, first on PATH in an activated venv) hash a
    # build command differently, so under one name each took the other's build for stale and rebuilt it
    ninja = subprocess.run(["ninja", "--version"], capture_output=True, text=True).stdout.strip()
    assert ninja and name == _fused.extension_name("unified_lora_nested_path", text, flags, torch.__version__, ninja)
    assert name != _fused.extension_name("unified_lora_nested_path", text, flags, torch.__version__, "1.11.1.other")
    assert _fused.layer_kernels().__name__ == name
