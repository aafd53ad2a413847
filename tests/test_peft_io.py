"""PEFT interop: export to / import from real PEFT checkpoints, merge-and-unload,
and the fixed-rank PeftController (LR + Mirror over a PEFT model)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import peft
from packaging.version import Version
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (BertConfig, BertForSequenceClassification, BertModel, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM, RobertaConfig, RobertaForSequenceClassification, RobertaModel)

from unified_lora import (MIRROR, MirrorConfig, NestedLoRAConfig, NestedLoRALayer, inject_nested_lora, lora_layers,
                          set_rank, setup_unified_lora)
from unified_lora.peft_io import (PeftController, attach_to_peft_model, export_peft_adapter, import_peft_adapter,
                                  merge_and_unload)

VOCAB = 64
TOL = 1e-5

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def tiny(kind: str):
    """(fresh base model in eval mode, target_modules, modules_to_save), seeded."""
    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return LlamaForCausalLM(cfg).eval(), ["q_proj", "v_proj"], None
    if kind == "bert":
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=37, num_labels=3, max_position_embeddings=64)
        return BertForSequenceClassification(cfg).eval(), ["query", "value"], ["classifier"]
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval(), ["c_attn"], None


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x) -> torch.Tensor:
    return model(input_ids=x).logits


def nested(kind: str, scaling: str = "alpha_over_r"):
    """(model with non-trivial nested adapters, adapters, untouched copy of the base)."""
    base, targets, mts = tiny(kind)
    fresh = copy.deepcopy(base)
    adapters = inject_nested_lora(base, NestedLoRAConfig(target_modules=targets, modules_to_save=mts,
                                                         scaling=scaling, lora_alpha=8.0))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in adapters.values():
            for b in layer.lora_B:  # B = 0 at init: make every block non-zero so each rank differs
                b.normal_(0.0, 0.2, generator=g)
        if mts:
            base.classifier.weight.add_(torch.randn(base.classifier.weight.shape, generator=g))
    return base, adapters, fresh


def peft_load(fresh, path):
    return PeftModel.from_pretrained(copy.deepcopy(fresh), str(path)).eval()


# ------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
def test_export_at_each_nested_rank_loads_in_peft_with_same_logits(kind, tmp_path):
    model, adapters, fresh = nested(kind)
    x = inputs()
    base_out = logits(fresh, x)
    for r in (4, 8, 16):
        set_rank(adapters, r)
        ours = logits(model, x)
        assert (ours - base_out).abs().max() > 1e-2  # the adapter is not trivial: the check can fail
        export_peft_adapter(model, adapters, tmp_path / f"r{r}")
        theirs = logits(peft_load(fresh, tmp_path / f"r{r}"), x)
        assert (ours - theirs).abs().max().item() <= TOL, (kind, r)
        assert torch.equal(logits(model, x), ours)  # export leaves our model untouched


def test_exported_files_use_peft_key_names_and_config(tmp_path):
    from safetensors.torch import load_file

    model, adapters, _ = nested("gpt2")
    cfg = export_peft_adapter(model, None, tmp_path, rank=4, base_model_name_or_path="tiny-gpt2")
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg == on_disk
    assert on_disk["r"] == 4 and on_disk["lora_alpha"] == 8 and on_disk["peft_type"] == "LORA"
    assert on_disk["fan_in_fan_out"] is True and on_disk["task_type"] == "CAUSAL_LM"
    assert on_disk["base_model_name_or_path"] == "tiny-gpt2"
    assert sorted(on_disk["target_modules"]) == sorted(adapters)
    sd = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    assert sd[key].shape == (4, 32)
    assert torch.equal(sd[key], adapters["transformer.h.0.attn.c_attn"].full_A()[:4])


def test_an_export_draws_no_random_number_from_the_run(tmp_path):
    """PEFT initialises the LoRA weights of the skeleton it builds from torch's generator: an export during
    training (`train --save-best`, `peft_every_checkpoint`) moved the run's random numbers on, so its dropout drew
    other masks after it than a run without the export."""
    model, _, _ = nested("bert")
    before = torch.get_rng_state()
    export_peft_adapter(model, None, tmp_path, rank=8)
    assert torch.equal(torch.get_rng_state(), before)


def test_export_through_a_data_parallel_wrapper_names_the_bare_models_modules(tmp_path):
    """A model wrapped for data parallelism (DDP, DataParallel, accelerate's prepare) names its modules
    `module.<name>`; the export wrote those names, which match nothing in a freshly loaded base model."""
    model, _, fresh = nested("bert")
    export_peft_adapter(torch.nn.DataParallel(model), None, tmp_path, rank=8)
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert on_disk["task_type"] == "SEQ_CLS" and not any("module." in t for t in on_disk["target_modules"])
    torch.testing.assert_close(logits(peft_load(fresh, tmp_path), inputs()), logits(model, inputs()), atol=TOL,
                               rtol=TOL)


def test_export_of_a_compiled_model_names_the_bare_models_modules(tmp_path):
    """torch.compile (and accelerate's prepare with a dynamo backend) wraps the model in an OptimizedModule whose
    module names start with `_orig_mod.`; the export wrote those, which match nothing in a fresh base model."""
    model, _, fresh = nested("bert")
    export_peft_adapter(torch.nn.DataParallel(torch.compile(model)), None, tmp_path, rank=8)
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert on_disk["task_type"] == "SEQ_CLS" and not any("_orig_mod" in t for t in on_disk["target_modules"])
    torch.testing.assert_close(logits(peft_load(fresh, tmp_path), inputs()), logits(model, inputs()), atol=TOL,
                               rtol=TOL)


def _folder_bytes(path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _write_half_then(exc):
    """safetensors' save_file that writes half of the real file, then raises `exc` (a full disk, a Ctrl-C)."""
    from safetensors.torch import save_file

    def failing(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(len(f.read()) // 2)
        raise exc
    return failing


@pytest.mark.parametrize("where", ["weights-disk-full", "weights-ctrl-c", "config"])
def test_an_export_interrupted_while_writing_leaves_the_previous_export_loadable_and_unchanged(where, tmp_path,
                                                                                              monkeypatch):
    """PEFT writes README.md, the weights, then the config into the folder: an export interrupted in the weights
    left a half-written adapter_model.safetensors; one interrupted in the config (a full disk) left the new weights
    beside the previous export's config, at the same rank: PEFT loaded that mix silently."""
    import peft.peft_model
    from peft.config import PeftConfigMixin

    model, adapters, fresh = nested("bert")
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "tokenizer.json").write_text('{"the user": "file"}')
    (out / "README.md").write_text("# My adapter\n\nNotes of mine.\n")
    export_peft_adapter(model, adapters, out, rank=8)
    before, x = _folder_bytes(out), inputs()
    expected = logits(model, x)
    assert "library_name: peft" in before["README.md"].decode() and "Notes of mine." in before["README.md"].decode()
    with torch.no_grad():  # training went on: the same rank and modules, other weights
        for layer in adapters.values():
            layer.lora_B[0].add_(1.0)
    assert (logits(model, x) - expected).abs().max() > 1e-2
    if where == "config":
        def refuse(self, *a, **k):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(PeftConfigMixin, "save_pretrained", refuse)
    else:
        exc = OSError(28, "No space left on device") if where == "weights-disk-full" else KeyboardInterrupt()
        monkeypatch.setattr(peft.peft_model, "safe_save_file", _write_half_then(exc))
    with pytest.raises((OSError, KeyboardInterrupt)):
        export_peft_adapter(model, adapters, out, rank=8)
    assert _folder_bytes(out) == before  # bit-identical, the user's files too
    assert [p.name for p in out.iterdir() if p.is_dir()] == []  # no temporary folder left
    torch.testing.assert_close(logits(peft_load(fresh, out), x), expected, atol=TOL, rtol=TOL)


def test_an_export_over_a_previous_one_keeps_the_users_files_and_never_mixes_the_two(tmp_path, monkeypatch):
    """A finished export replaces the previous export's files (README.md amended, not replaced); one killed during
    its renames leaves no adapter_config.json (PEFT refuses the folder, loudly), never new weights under the old
    config."""
    import os

    model, adapters, fresh = nested("gpt2")
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "README.md").write_text("# My adapter\n\nNotes of mine.\n")
    (out / "vocab.txt").write_text("a\nb\n")
    export_peft_adapter(model, adapters, out, rank=4)
    export_peft_adapter(model, adapters, out, rank=8)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                      "vocab.txt"]
    assert (out / "vocab.txt").read_text() == "a\nb\n" and "Notes of mine." in (out / "README.md").read_text()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    torch.testing.assert_close(logits(peft_load(fresh, out), inputs()), logits(model, inputs()), atol=TOL, rtol=TOL)

    real = os.replace

    def killed_before_the_config(src, dst):  # the process dies with the new weights in place, before the config
        if os.path.basename(dst) == "adapter_config.json":
            raise KeyboardInterrupt
        real(src, dst)
    monkeypatch.setattr(os, "replace", killed_before_the_config)
    with pytest.raises(KeyboardInterrupt):
        export_peft_adapter(model, adapters, out, rank=16)
    monkeypatch.undo()
    assert not (out / "adapter_config.json").exists() and [p for p in out.iterdir() if p.is_dir()] == []
    with pytest.raises(ValueError, match="adapter_config.json"):
        peft_load(fresh, out)


def test_bert_head_is_saved_as_modules_to_save(tmp_path):
    model, _, fresh = nested("bert")
    cfg = export_peft_adapter(model, None, tmp_path)
    assert "classifier" in cfg["modules_to_save"] and cfg["task_type"] == "SEQ_CLS"
    peft_model = peft_load(fresh, tmp_path)
    head = peft_model.base_model.model.classifier.modules_to_save["default"]
    assert torch.equal(head.weight, model.classifier.weight)


@pytest.mark.parametrize("rank", [4, 8])
@pytest.mark.parametrize("scaling", ["max_rank_over_r", "rslora", "alpha_over_max_rank"])
def test_export_maps_every_scaling_kind_to_peft(scaling, rank, tmp_path):
    model, adapters, fresh = nested("llama", scaling=scaling)
    set_rank(adapters, rank)
    cfg = export_peft_adapter(model, None, tmp_path)
    assert cfg["use_rslora"] is (scaling == "rslora")
    if scaling == "alpha_over_max_rank":  # PEFT's alpha / r must equal our alpha / max_rank at this rank
        layer = next(iter(adapters.values()))
        assert cfg["lora_alpha"] / rank == pytest.approx(layer.lora_alpha / layer.max_rank)
    x = inputs()
    assert (logits(model, x) - logits(peft_load(fresh, tmp_path), x)).abs().max().item() <= TOL


def test_export_of_merged_model_writes_the_unmerged_adapter(tmp_path):
    model, adapters, fresh = nested("llama")
    x = inputs()
    ours = logits(model, x)
    for layer in adapters.values():
        layer.merge()
    export_peft_adapter(model, None, tmp_path)
    assert (ours - logits(peft_load(fresh, tmp_path), x)).abs().max().item() <= TOL


def test_export_rejects_a_rank_that_is_not_a_nested_level(tmp_path):
    model, _, _ = nested("llama")
    with pytest.raises(ValueError, match="not a nested level"):
        export_peft_adapter(model, None, tmp_path, rank=6)


@pytest.mark.parametrize("scaling", ["alpha_over_r", "rslora", "alpha_over_max_rank"])
def test_layers_at_different_ranks_export_with_peft_rank_and_alpha_patterns(scaling, tmp_path):
    """Layers at different ranks were refused ("pass rank= explicitly"), and rank= exported every layer at that one
    rank, i.e. other outputs than the model's; now each layer goes at its own rank through PEFT's rank_pattern."""
    model, adapters, fresh = nested("llama", scaling=scaling)
    names = sorted(adapters)
    adapters[names[0]].set_rank(4)
    adapters[names[1]].set_rank(16)
    cfg = export_peft_adapter(model, None, tmp_path)
    assert cfg["r"] == 8 and cfg["rank_pattern"] == {names[0]: 4, names[1]: 16}
    if scaling == "alpha_over_max_rank":  # lora_alpha = alpha * r / max_rank differs with r
        assert cfg["lora_alpha"] == 4 and cfg["alpha_pattern"] == {names[0]: 2, names[1]: 8}
    else:
        assert cfg["alpha_pattern"] == {}
    x = inputs()
    assert (logits(model, x) - logits(peft_load(fresh, tmp_path), x)).abs().max().item() <= TOL
    cfg = export_peft_adapter(model, None, tmp_path / "r8", rank=8)  # an explicit rank still cuts every layer there
    assert cfg["r"] == 8 and cfg["rank_pattern"] == {}


# ------------------------------------------------------------------------------------------ export: heads
def headless_checkpoint(kind: str, path) -> None:
    """A tiny encoder saved without a head, as a pretrained checkpoint is: `from_pretrained` of its
    ...ForSequenceClassification initialises the head afresh from the torch seed."""
    torch.manual_seed(0)
    if kind == "roberta":
        RobertaModel(RobertaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=VOCAB + 2, pad_token_id=1,
                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).save_pretrained(path)
    else:
        BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=64, hidden_dropout_prob=0.0,
                             attention_probs_dropout_prob=0.0)).save_pretrained(path)


def load_classifier(kind: str, path, seed: int):
    torch.manual_seed(seed)  # the head's init
    cls = RobertaForSequenceClassification if kind == "roberta" else BertForSequenceClassification
    return cls.from_pretrained(str(path), num_labels=2).eval()


def perturb(model, adapters) -> None:
    """Non-zero B in every block and moved trainable head weights: what training does."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in adapters.values():
            for b in layer.lora_B:
                b.normal_(0.0, 0.3, generator=g)
        for n, p in model.named_parameters():
            if p.requires_grad and ".lora_" not in n:
                p.add_(torch.randn(p.shape, generator=g))


def fresh_head_reload(kind, base_dir, out_dir):
    """The export loaded by plain PEFT onto a base whose head from_pretrained initialised afresh (another seed)."""
    return PeftModel.from_pretrained(load_classifier(kind, base_dir, seed=7), str(out_dir)).eval()


@pytest.mark.parametrize("targets,mts", [(["query", "value"], ["classifier"]),  # the README's setup
                                         (["query", "value"], ["out_proj"]),  # part of the head trained
                                         (["query", "value", "dense"], ["classifier"])])  # LoRA inside the head
def test_roberta_head_of_submodules_exports_as_one_module_that_peft_loads(targets, mts, tmp_path):
    # RoBERTa's head is a module of modules (classifier.dense, classifier.out_proj). Listing its children next to
    # the `classifier` that PEFT's SEQ_CLS adds made nested ModulesToSaveWrappers, whose keys PEFT cannot load
    # (KeyError 'base_model.model.classifier.dense.weight').
    from safetensors.torch import load_file

    headless_checkpoint("roberta", tmp_path / "base")
    model = load_classifier("roberta", tmp_path / "base", seed=1)
    adapters, _ = setup_unified_lora(model, target_modules=targets, modules_to_save=mts, signal="loss",
                                     print_fn=None)
    perturb(model, adapters)
    cfg = export_peft_adapter(model, adapters, tmp_path / "out")
    assert not any(m.startswith("classifier.") for m in cfg["modules_to_save"]) and "classifier" in cfg["modules_to_save"]
    assert not any(t.startswith("classifier") for t in cfg["target_modules"])
    sd = load_file(tmp_path / "out" / "adapter_model.safetensors")
    head = {k for k in sd if ".classifier." in k}
    assert head == {f"base_model.model.classifier.{m}.{p}" for m in ("dense", "out_proj") for p in ("weight", "bias")}
    if "dense" not in targets:  # saved as they are
        assert torch.equal(sd["base_model.model.classifier.out_proj.weight"], model.classifier.out_proj.weight)
        assert torch.equal(sd["base_model.model.classifier.dense.weight"], model.classifier.dense.weight)
    x = inputs()
    ours = logits(model, x)
    fresh = load_classifier("roberta", tmp_path / "base", seed=7)
    assert (logits(fresh, x) - ours).abs().max() > 1e-2  # a fresh head and base: the check can fail
    theirs = logits(fresh_head_reload("roberta", tmp_path / "base", tmp_path / "out"), x)
    if "dense" in targets:  # classifier.dense's delta is merged into its saved weight: float rounding only
        torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(theirs, ours)


def bert_with_lora_head(tmp_path, targets=("query", "value", "classifier")):
    """The README's multi-task targets in single-task form: the classifier is a LoRA target, its base frozen
    as from_pretrained initialised it (the checkpoint has no head)."""
    headless_checkpoint("bert", tmp_path / "base")
    model = load_classifier("bert", tmp_path / "base", seed=1)
    adapters, _ = setup_unified_lora(model, target_modules=list(targets), signal="loss", print_fn=None)
    perturb(model, adapters)
    return model, adapters


@pytest.mark.parametrize("task_type", ["auto", None])
@pytest.mark.parametrize("merged", [False, True])
def test_classifier_as_lora_target_exports_with_its_base_weights(task_type, merged, tmp_path):
    # Was: ValueError "modules_to_save: 'classifier.weight' has no counterpart in the model" (SEQ_CLS); with
    # task_type=None the adapter lacked the frozen head, so a fresh base gave other logits.
    model, adapters = bert_with_lora_head(tmp_path)
    x = inputs()
    ours = logits(model, x)
    if merged:
        for layer in adapters.values():
            layer.merge()
    cfg = export_peft_adapter(model, adapters, tmp_path / "out", task_type=task_type)
    assert "classifier" in cfg["modules_to_save"] and "classifier" not in cfg["target_modules"]
    assert len(cfg["target_modules"]) == 4  # query and value of both layers stay LoRA
    fresh = load_classifier("bert", tmp_path / "base", seed=7)
    assert not torch.equal(fresh.classifier.weight, model.classifier.base_layer.weight)  # another head init
    pm = fresh_head_reload("bert", tmp_path / "base", tmp_path / "out")
    torch.testing.assert_close(logits(pm, x), ours, rtol=1e-6, atol=1e-6)
    head = adapters["classifier"]
    want = head.base_layer.weight if merged else head.base_layer.weight + head.delta_weight()
    saved = pm.base_model.model.classifier.modules_to_save["default"].weight
    torch.testing.assert_close(saved, want, rtol=0, atol=1e-6)


def test_classifier_as_lora_target_without_its_base_weights_is_said(tmp_path):
    model, adapters = bert_with_lora_head(tmp_path)
    with pytest.warns(UserWarning, match=r"task head \['classifier'\] is not saved whole"):
        cfg = export_peft_adapter(model, adapters, tmp_path / "out", task_type=None, modules_to_save=None)
    assert "classifier" in cfg["target_modules"] and cfg["modules_to_save"] is None
    x = inputs()
    same_head = PeftModel.from_pretrained(load_classifier("bert", tmp_path / "base", seed=1), str(tmp_path / "out"))
    assert torch.equal(logits(same_head.eval(), x), logits(model, x))  # exact, on the head it was trained on


def test_export_of_only_a_saved_head_is_a_clear_error(tmp_path):
    model, adapters = bert_with_lora_head(tmp_path, targets=("classifier",))
    with pytest.raises(ValueError, match=r"saves whole .*merge_and_unload"):
        export_peft_adapter(model, adapters, tmp_path / "out")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_adapters_of_a_half_precision_model_round_trip_through_peft_bit_for_bit(dtype, tmp_path):
    # Under PEFT's default (autocast_adapter_dtype=True) a bf16/fp16 model holds fp32 LoRA weights, and so do
    # nested layers now: the export writes them in fp32, PEFT loads them into its fp32 adapters on a fresh
    # half-precision base and gives our logits bit for bit; a checkpoint PEFT trained on such a base imports
    # into fp32 blocks unrounded (they used to be rounded to the base's dtype) and gives PEFT's logits.
    from safetensors.torch import load_file

    model, adapters, fresh = nested("llama")
    model.to(dtype)
    fresh.to(dtype)
    for layer in adapters.values():
        for p in layer.lora_parameters():
            p.data = p.data.float()  # (fp32 blocks, as inject_nested_lora makes on a half-precision model)
    x = inputs()
    ours = logits(model, x)
    export_peft_adapter(model, adapters, tmp_path / "out")
    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    pm = peft_load(fresh, tmp_path / "out")
    assert {p.dtype for n, p in pm.named_parameters() if ".lora_" in n} == {torch.float32}
    theirs = logits(pm, x)
    assert theirs.dtype == dtype and torch.equal(ours, theirs)

    base, targets, _ = tiny("llama")
    base.to(dtype)
    fresh = copy.deepcopy(base)
    trained = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if ".lora_B." in n:
                assert p.dtype == torch.float32  # PEFT's own default on a half-precision base
                p.normal_(0, 0.2, generator=g)
    trained.save_pretrained(tmp_path / "peft")
    imp = import_peft_adapter(fresh, tmp_path / "peft")
    for name, layer in imp.adapters.items():
        twin = trained.base_model.model.get_submodule(name)
        assert layer.lora_A[0].dtype == torch.float32 and layer.base_layer.weight.dtype == dtype
        assert torch.equal(layer.active_A(), twin.lora_A["default"].weight)
        assert torch.equal(layer.active_B(), twin.lora_B["default"].weight)
    assert torch.equal(logits(fresh, x), logits(trained, x))
    kept = tiny("llama")[0].to(dtype)  # autocast_adapter_dtype=False: blocks in the base's dtype, as PEFT's
    imp = import_peft_adapter(kept, tmp_path / "peft", autocast_adapter_dtype=False)
    assert {p.dtype for a in imp.adapters.values() for p in a.lora_parameters()} == {dtype}


# ------------------------------------------------------------------------------------------ import
def trained_peft(kind: str, r: int, tmp_path, steps: int = 3, **lora_kw):
    """A PEFT LoRA model trained a few steps with AdamW, saved to tmp_path/'peft'; (peft_model, fresh, dir)."""
    base, targets, mts = tiny(kind)
    fresh = copy.deepcopy(base)
    pm = get_peft_model(base, LoraConfig(r=r, lora_alpha=16, target_modules=targets, modules_to_save=mts,
                                         **lora_kw))
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    x = inputs(3)
    for _ in range(steps):
        out = pm(input_ids=x, labels=x if kind != "bert" else torch.tensor([0, 2]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    return pm, fresh, tmp_path / "peft"


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_import_peft_checkpoint_into_plain_model_reproduces_peft_logits(kind, tmp_path):
    pm, fresh, path = trained_peft(kind, 8, tmp_path)
    x = inputs()
    theirs = logits(pm, x)
    assert (theirs - logits(fresh, x)).abs().max() > 1e-3  # training moved the adapter
    model = copy.deepcopy(fresh)
    imp = import_peft_adapter(model, path)
    assert imp.rank == 8 and all(isinstance(a, NestedLoRALayer) and a.rank == 8 for a in imp.adapters.values())
    assert (logits(model, x) - theirs).abs().max().item() <= TOL
    if kind == "bert":
        assert imp.modules_to_save == ["classifier"] and all(p.requires_grad for p in imp.extra_params)


def test_import_into_an_eval_model_applies_no_lora_dropout(tmp_path):
    """The injected layers were in training mode inside an eval model (as from_pretrained returns it), so a
    checkpoint with lora_dropout gave random logits, off from PEFT's by ~0.1, until the user called eval()."""
    pm, fresh, path = trained_peft("llama", 8, tmp_path, lora_dropout=0.3)
    x = inputs()
    model = copy.deepcopy(fresh)
    assert not model.training
    imp = import_peft_adapter(model, path)
    assert all(a.lora_dropout.p == 0.3 and not a.training for a in imp.adapters.values())
    assert (logits(model, x) - logits(pm, x)).abs().max().item() <= TOL
    trainable = copy.deepcopy(fresh).train()
    imp = import_peft_adapter(trainable, path)
    assert all(a.training for a in imp.adapters.values())  # a model in training mode trains with dropout


def test_imported_adapter_keeps_training_under_the_controller(tmp_path):
    _, fresh, path = trained_peft("llama", 8, tmp_path)
    model = copy.deepcopy(fresh).train()
    imp = import_peft_adapter(model, path)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ctrl = imp.controller(opt, signal="loss", print_fn=None)
    assert ctrl.rank == 8
    before = [p.detach().clone() for p in params]
    x = inputs(4)
    losses = []
    for _ in range(4):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        ctrl.step(loss=loss.item())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert len(ctrl.trace) == 4 and losses[-1] < losses[0]
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_a_checkpoint_with_trained_biases_imports_trains_and_exports_them(bias, tmp_path):
    pm, fresh, path = trained_peft("bert", 8, tmp_path, bias=bias, task_type="SEQ_CLS")
    x = inputs()
    model = copy.deepcopy(fresh)
    imp = import_peft_adapter(model, path)  # bias="all" also saves the head's inner copies' biases
    assert (logits(model, x) - logits(pm, x)).abs().max().item() <= TOL
    assert imp.modules_to_save == ["classifier"]
    biases = [p for n, p in model.named_parameters() if n.endswith("base_layer.bias")]
    assert len(biases) == 4 and all(p.requires_grad for p in biases)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctrl = imp.controller(opt, signal="loss", print_fn=None)
    before = [p.detach().clone() for p in biases]
    for _ in range(2):
        loss = model(input_ids=x, labels=torch.tensor([0, 2])).loss
        loss.backward()
        ctrl.step(loss=loss.item())
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(a, p) for a, p in zip(before, biases))
    model.eval()
    cfg = export_peft_adapter(model, None, tmp_path / "out", rank=imp.rank)  # was: every layer saved whole, refused
    # PEFT's own heads for SEQ_CLS (0.22 added DistilBERT's pre_classifier): the config names what PEFT extends it with
    heads = ["classifier", "score"] + (["pre_classifier"] if Version(peft.__version__) >= Version("0.22") else [])
    assert cfg["bias"] == bias and cfg["target_modules"] and cfg["modules_to_save"] == heads
    assert (logits(peft_load(fresh, tmp_path / "out"), x) - logits(model, x)).abs().max().item() <= TOL


@pytest.mark.parametrize("kind, lora_kw, match", [
    ("llama", dict(target_modules=["q_proj"], alora_invocation_tokens=[5, 6]), "alora_invocation_tokens"),
    ("gpt2", dict(target_modules=[], target_parameters=["c_attn.weight"]), "target_parameters"),
    ("llama", dict(target_modules=["q_proj"], trainable_token_indices=[1, 2]), "trainable_token_indices"),
])
def test_import_refuses_peft_options_that_nested_layers_cannot_reproduce(kind, lora_kw, match, tmp_path):
    base, _, _ = tiny(kind)
    fresh = copy.deepcopy(base)
    get_peft_model(base, LoraConfig(r=8, lora_alpha=16, init_lora_weights="gaussian", **lora_kw)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):  # aLoRA imported silently, applying the adapter on every token
        import_peft_adapter(fresh, tmp_path)


def test_import_refuses_a_base_rewriting_init_and_takes_its_plain_lora_conversion(tmp_path):
    base, _, _ = tiny("llama")
    fresh = copy.deepcopy(base)
    pm = get_peft_model(base, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="olora"))
    pm.peft_config["default"].init_lora_weights = True  # PEFT's recipe: keep the initial adapter for the conversion
    pm.save_pretrained(tmp_path / "init")
    pm.peft_config["default"].init_lora_weights = "olora"
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    x = inputs()
    trained = logits(pm, x)  # on the residual base weights OLoRA left behind
    pm.save_pretrained(tmp_path / "olora")
    assert (logits(peft_load(fresh, tmp_path / "olora"), x) - trained).abs().max().item() <= TOL  # PEFT redoes the init
    with pytest.raises(ValueError, match="init_lora_weights='olora'.*path_initial_model_for_weight_conversion"):
        import_peft_adapter(copy.deepcopy(fresh), tmp_path / "olora")  # was: imported, logits off by ~0.2
    pm.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    model = copy.deepcopy(fresh)
    assert import_peft_adapter(model, tmp_path / "plain").rank == 16
    assert (logits(model, x) - trained).abs().max().item() <= TOL


def test_import_of_a_missing_or_damaged_weights_file_says_so_without_going_to_the_hub(tmp_path, monkeypatch):
    """A folder with adapter_config.json and no weights file went to PEFT's loader, which takes it for a Hub repo
    id: 'Repo id must be in the form ...' for an absolute path, a download attempt for a relative one ('out/r8').
    A damaged file gave safetensors' bare 'header too small', naming no file."""
    base, _, _ = tiny("llama")
    fresh = copy.deepcopy(base)
    get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj"])).save_pretrained(tmp_path / "out" / "r8")
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "out" / "r8" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read '.*adapter_model\.safetensors'.*damaged or incomplete"):
        import_peft_adapter(copy.deepcopy(fresh), "out/r8")
    weights.unlink()
    with pytest.raises(ValueError, match=r"'out/r8' has adapter_config\.json but no adapter_model\.safetensors or "
                                         r"adapter_model\.bin"):
        import_peft_adapter(copy.deepcopy(fresh), "out/r8")
    weights.write_bytes(data)
    assert import_peft_adapter(fresh, "out/r8").rank == 8


def test_import_of_a_named_adapters_parent_folder_names_the_subfolder(tmp_path):
    base, _, _ = tiny("llama")
    fresh = copy.deepcopy(base)
    get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj"]), adapter_name="mine").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"subfolder: pass one of \['mine'\]"):
        import_peft_adapter(copy.deepcopy(fresh), tmp_path)
    assert import_peft_adapter(fresh, tmp_path / "mine").rank == 8


@pytest.mark.parametrize("tied", [False, True])
def test_a_targeted_lm_heads_saved_base_weight_loads_frozen(tied, tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    base = LlamaForCausalLM(cfg).eval()
    fresh = copy.deepcopy(base)
    pm = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")  # save_embedding_layers="auto" also writes lm_head.base_layer.weight
    x = inputs()
    model = copy.deepcopy(fresh)
    imp = import_peft_adapter(model, tmp_path / "peft")  # was: tied, "no parameter in the model"; untied, unfrozen
    assert (logits(model, x) - logits(pm, x)).abs().max().item() <= TOL
    assert imp.extra_params == [] and imp.modules_to_save == []
    assert not model.lm_head.base_layer.weight.requires_grad
    cfg = export_peft_adapter(model, None, tmp_path / "out")
    assert "lm_head" in cfg["target_modules"] and cfg["modules_to_save"] is None  # still a LoRA target
    assert (logits(peft_load(fresh, tmp_path / "out"), x) - logits(pm, x)).abs().max().item() <= TOL


def tied_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("ensure_weight_tying", [False, True])
def test_a_saved_embedding_tied_to_the_lm_head_imports_as_peft_loads_it(ensure_weight_tying, tmp_path):
    """modules_to_save=["embed_tokens"] on a tied model (new tokens): PEFT trains a copy of the embedding and its
    lm_head keeps the base weight (unless ensure_weight_tying=True ties the copies). The import wrote the trained
    embedding into the tied weight, so the lm_head changed too: logits off by ~19, silently."""
    base = tied_llama()
    fresh = copy.deepcopy(base)
    pm = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                         ensure_weight_tying=ensure_weight_tying))
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    x = inputs()
    for _ in range(3):
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval().save_pretrained(tmp_path / "peft")
    trained = logits(pm, x)
    model = copy.deepcopy(fresh)
    if ensure_weight_tying:
        imp = import_peft_adapter(model, tmp_path / "peft")
        assert model.lm_head.weight is model.model.embed_tokens.weight  # PEFT ties the copies: so do we
    else:
        with pytest.warns(UserWarning, match=r"\['model.embed_tokens.weight'\] .* tied to \['lm_head.weight'\].*"
                                             r"tie_word_embeddings is now False"):
            imp = import_peft_adapter(model, tmp_path / "peft")
        assert torch.equal(model.lm_head.weight, fresh.lm_head.weight) and not model.lm_head.weight.requires_grad
        assert model.config.tie_word_embeddings is False  # save_pretrained / from_pretrained keep them apart
    assert (logits(model, x) - trained).abs().max().item() <= TOL
    assert imp.modules_to_save == ["model.embed_tokens"] and model.model.embed_tokens.weight.requires_grad
    cfg = export_peft_adapter(model, None, tmp_path / "out")
    assert (logits(peft_load(fresh, tmp_path / "out"), x) - trained).abs().max().item() <= TOL
    assert cfg["modules_to_save"] == ["model.embed_tokens"] + (["lm_head"] if ensure_weight_tying else [])


@pytest.mark.parametrize("kind, name, head", [("gpt2", "wte", "lm_head"), ("llama_tied", "embed_tokens", "lm_head")])
def test_a_saved_embedding_tied_to_the_lm_head_exports_a_copy_for_each(kind, name, head, tmp_path):
    """Our trained, tied embedding moves the lm_head with it; PEFT saves a separate copy of a modules_to_save
    module and leaves the tied lm_head at the base weight, so the export reloaded with logits off by ~3."""
    if kind == "gpt2":
        base, targets, _ = tiny("gpt2")
    else:
        base, targets = tied_llama(), ["q_proj", "v_proj"]
    fresh = copy.deepcopy(base)
    adapters = inject_nested_lora(base, NestedLoRAConfig(target_modules=targets, modules_to_save=[name]))
    emb = base.get_input_embeddings().weight
    with torch.no_grad():
        for layer in adapters.values():
            layer.lora_B[0].normal_(0.0, 0.2, generator=torch.Generator().manual_seed(2))
        emb.add_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(3)))
    assert base.eval().get_output_embeddings().weight is emb
    x = inputs()
    cfg = export_peft_adapter(base, None, tmp_path / "out")
    assert cfg["modules_to_save"][-1] == head
    assert (logits(peft_load(fresh, tmp_path / "out"), x) - logits(base, x)).abs().max().item() <= TOL


def test_import_into_injected_model_with_other_scaling_folds_the_ratio(tmp_path):
    pm, fresh, path = trained_peft("llama", 4, tmp_path, use_rslora=True)
    model = copy.deepcopy(fresh)
    inject_nested_lora(model, NestedLoRAConfig(target_modules=["q_proj", "v_proj"], scaling="max_rank_over_r"))
    import_peft_adapter(model, path)
    x = inputs()
    assert (logits(model, x) - logits(pm, x)).abs().max().item() <= TOL


def test_import_honours_peft_rank_and_alpha_patterns(tmp_path):
    pm, fresh, path = trained_peft("llama", 8, tmp_path, rank_pattern={"v_proj": 4}, alpha_pattern={"q_proj": 4})
    model = copy.deepcopy(fresh)
    imp = import_peft_adapter(model, path)
    assert {a.rank for n, a in imp.adapters.items() if n.endswith("v_proj")} == {4}
    x = inputs()
    assert (logits(model, x) - logits(pm, x)).abs().max().item() <= TOL


def test_import_of_a_rank_off_the_nested_levels_explains_rank_levels(tmp_path):
    pm, fresh, path = trained_peft("llama", 12, tmp_path, steps=1)
    with pytest.raises(ValueError, match=r"rank_levels containing 12"):
        import_peft_adapter(copy.deepcopy(fresh), path)
    model = copy.deepcopy(fresh)
    imp = import_peft_adapter(model, path, rank_levels=(4, 12, 16))
    assert imp.rank == 12
    x = inputs()
    assert (logits(model, x) - logits(pm, x)).abs().max().item() <= TOL


@pytest.mark.parametrize("rank_levels,message", [
    ((), r"^rank_levels: must hold at least one rank"),
    ((4, 8.5, 16), r"^rank_levels: must be an integer, got 8.5$"),
    ((16, 8, 4), r"^rank_levels: must be strictly increasing"),
])
def test_import_names_rank_levels_that_do_not_nest(tmp_path, rank_levels, message):
    """import_peft_adapter read rank_levels as given: () failed in max() ("arg is an empty sequence"), and
    (4, 8.5, 16) with an r=8 checkpoint was told to pass rank_levels=(4, 8, 8.5, 16). The model is left unwrapped."""
    _, fresh, path = trained_peft("llama", 8, tmp_path, steps=1)
    model = copy.deepcopy(fresh)
    with pytest.raises(ValueError, match=message):
        import_peft_adapter(model, path, rank_levels=rank_levels)
    assert not lora_layers(model)
    assert import_peft_adapter(model, path, rank_levels="4, 8, 16").rank == 8  # as a YAML value is read


def test_import_rejects_rank_above_max_rank(tmp_path):
    _, fresh, path = trained_peft("llama", 32, tmp_path, steps=1)
    with pytest.raises(ValueError, match=r"r=32 > max_rank=16"):
        import_peft_adapter(copy.deepcopy(fresh), path)
    model = copy.deepcopy(fresh)
    inject_nested_lora(model, NestedLoRAConfig(target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match=r"r=32 .*> max_rank=16"):
        import_peft_adapter(model, path)


def test_a_rank_and_alpha_pattern_checkpoint_round_trips_through_import_and_export(tmp_path):
    """Importing a rank_pattern checkpoint leaves layers at different ranks; its export was refused, and with
    rank=imp.rank the layers imported at r=4 were written at r=8 with half their scaling (logits off by ~0.05)."""
    pm, fresh, path = trained_peft("llama", 8, tmp_path, rank_pattern={"v_proj": 4}, alpha_pattern={"q_proj": 4})
    model = copy.deepcopy(fresh)
    import_peft_adapter(model, path)
    cfg = export_peft_adapter(model, None, tmp_path / "out")
    assert set(cfg["rank_pattern"].values()) == {4} and len(cfg["rank_pattern"]) == 2
    x = inputs()
    assert (logits(peft_load(fresh, tmp_path / "out"), x) - logits(pm, x)).abs().max().item() <= TOL


def test_export_then_import_round_trip_is_exact(tmp_path):
    model, adapters, fresh = nested("bert")
    set_rank(adapters, 16)
    export_peft_adapter(model, None, tmp_path)
    other = copy.deepcopy(fresh)
    import_peft_adapter(other, tmp_path)
    x = inputs()
    assert (logits(model, x) - logits(other, x)).abs().max().item() <= TOL


# ------------------------------------------------------------------------------------------ merge
def test_merge_and_unload_gives_a_plain_model_that_reloads_identically(tmp_path):
    model, adapters, fresh = nested("gpt2")
    set_rank(adapters, 8)
    x = inputs()
    ours = logits(model, x)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, NestedLoRALayer) for m in plain.modules())
    assert (logits(plain, x) - ours).abs().max().item() <= TOL
    assert (logits(plain, x) - logits(fresh, x)).abs().max() > 1e-2
    plain.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert (logits(reloaded, x) - ours).abs().max().item() <= TOL


def gpt2_with_its_tied_lm_head_targeted():
    """A tiny GPT-2 with nested LoRA on c_attn and on its lm_head, whose base weight is transformer.wte's; every B
    block non-zero."""
    base, _, _ = tiny("gpt2")
    adapters = inject_nested_lora(base, NestedLoRAConfig(target_modules=["c_attn", "lm_head"]))
    assert adapters["lm_head"].base_layer.weight is base.transformer.wte.weight
    with torch.no_grad():
        for layer in adapters.values():
            for b in layer.lora_B:
                b.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(2))
    return base, adapters


@pytest.mark.parametrize("premerged", [False, True])
def test_a_tied_lm_head_merges_into_its_own_weight_and_leaves_the_embedding_alone(tmp_path, premerged):
    """GPT-2's lm_head shares its weight with transformer.wte. Merging its delta in place added it to the input
    embedding too (logits off by ~30 here, before and after save/reload). merge_and_unload now gives lm_head its
    own merged weight and unties the config; merge_adapters (in place, for inference) refuses with a ValueError."""
    from unified_lora import merge_adapters

    base, adapters = gpt2_with_its_tied_lm_head_targeted()
    wte = base.transformer.wte.weight.detach().clone()
    x = inputs()
    ours = logits(base, x)
    with pytest.raises(ValueError, match=r"tied base weights .*'lm_head' is also 'transformer\.wte\.weight'"):
        merge_adapters(base)
    assert all(layer.merged_rank == 0 for layer in adapters.values())  # refused before merging anything
    if premerged:  # a layer merged in place by hand has already changed the embedding: merge_and_unload undoes it
        adapters["lm_head"].merge()
    with pytest.warns(UserWarning, match="tie_word_embeddings is now False"):
        plain = merge_and_unload(base, rank=16)
    # untouched, or (merged by hand first) back to it up to the unmerge's float rounding
    torch.testing.assert_close(plain.transformer.wte.weight, wte, rtol=0, atol=1e-6 if premerged else 0)
    assert not plain.config.tie_word_embeddings
    assert (logits(plain, x) - ours).abs().max().item() > 1e-2  # rank 16, not the rank-8 outputs
    set_ref = logits(plain, x)
    plain.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded.transformer.wte.weight, plain.transformer.wte.weight)
    assert (logits(reloaded, x) - set_ref).abs().max().item() <= TOL


def test_a_wrapped_model_with_a_tied_targeted_lm_head_saves_with_save_pretrained(tmp_path):
    """A wrapped model whose targeted lm_head shares its base weight with transformer.wte: save_pretrained (what
    the Trainer's checkpoints call) raised "contained shared tensors [{'lm_head.base_layer.weight',
    'transformer.wte.weight'}] which are not properly defined", as it does for PEFT's wrapped model. The tied
    base weight is now declared, so it is left out as the bare model's lm_head.weight is, and the file loads back
    into a freshly wrapped model (the tie carries the values) with the same logits."""
    from safetensors.torch import load_file

    base, adapters = gpt2_with_its_tied_lm_head_targeted()
    x = inputs()
    ours = logits(base, x)
    base.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert "transformer.wte.weight" in saved and "lm_head.base_layer.weight" not in saved
    assert all(f"lm_head.lora_{f}.{i}" in saved for f in "AB" for i in range(3))
    fresh, _, _ = tiny("gpt2")
    torch.manual_seed(7)
    torch.nn.init.normal_(fresh.transformer.wte.weight)  # other values, so that the load must bring them
    inject_nested_lora(fresh, NestedLoRAConfig(target_modules=["c_attn", "lm_head"]))
    missing, unexpected = fresh.load_state_dict(saved, strict=False)
    assert missing == ["lm_head.base_layer.weight"] and unexpected == []
    assert fresh.lm_head.base_layer.weight is fresh.transformer.wte.weight
    assert torch.equal(logits(fresh, x), ours)


def test_a_tied_lm_head_merges_to_the_unmerged_logits():
    base, _, _ = tiny("gpt2")
    adapters = inject_nested_lora(base, NestedLoRAConfig(target_modules=["lm_head"]))
    with torch.no_grad():
        for b in adapters["lm_head"].lora_B:
            b.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(2))
    x = inputs()
    ours = logits(base, x)
    with pytest.warns(UserWarning, match="tied"):
        plain = merge_and_unload(base)
    torch.testing.assert_close(logits(plain, x), ours, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------ PeftController
def bert_peft_model():
    base, targets, mts = tiny("bert")
    pm = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, modules_to_save=mts,
                                         task_type="SEQ_CLS"))
    with torch.no_grad():  # a non-zero B so the drift denominator covers both factors
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(5))
    return pm.train()


def run_mirror_cycle(pm, lr):
    """Drive φ into MIRROR with loss 5.0 and back out with 0.5 (v1 loss signal); train with AdamW(lr).
    Returns (controller, trainable params, weights at the snapshot, record of the exit step, weights before exit)."""
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    ctrl = attach_to_peft_model(pm, opt, signal="loss", lr_mode="off", print_fn=None,
                                mirror=MirrorConfig(policy="drift", drift_threshold=0.05))
    x, y = inputs(6), torch.tensor([0, 2])
    at_snapshot = None
    for step in range(200):
        fed = 5.0 if ctrl.mode != MIRROR and at_snapshot is None else 0.5
        pm(input_ids=x, labels=y).loss.backward()
        pre = [p.detach().clone() for p in params]
        ctrl.step(loss=fed)
        rec = ctrl.trace[-1]
        if rec.snapshot == "saved":
            at_snapshot = [p.detach().clone() for p in params]
        if rec.snapshot in ("restored", "kept"):
            return ctrl, params, at_snapshot, rec, pre
        opt.step()
        opt.zero_grad()
    raise AssertionError("Mirror cycle did not complete")


def test_a_peft_models_state_dict_after_a_mirror_entry_shares_no_storage():
    """Mirror packs PEFT's lora_A/lora_B and the saved head into one buffer. Their state_dict entries were views
    of it, which accelerate's save_state/save_model take for one tied weight (keeping one of them)."""
    pm = bert_peft_model()
    ctrl = attach_to_peft_model(pm, torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad]),
                                signal="loss", print_fn=None)
    ctrl._save_snapshot(0)
    assert len({p.untyped_storage().data_ptr() for p in ctrl.managed_parameters()}) == 1  # packed
    sd = pm.state_dict()
    trained = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert len(trained) == 10 and len({sd[n].untyped_storage().data_ptr() for n in trained}) == 10
    assert all(torch.equal(sd[n], p) for n, p in pm.named_parameters())


def test_peft_controller_runs_at_the_fixed_peft_rank():
    pm = bert_peft_model()
    ctrl = PeftController(pm, None, signal="loss", print_fn=None)
    assert ctrl.rank == 8
    n_lora = sum(1 for n, p in pm.named_parameters() if p.requires_grad and "lora_" in n)
    assert len(ctrl.lora_parameters()) == n_lora == 8
    assert len(ctrl.extra_params) == 2  # the classifier copy in modules_to_save
    with pytest.raises(ValueError, match="fixed r=8"):
        from unified_lora import ActuatorConfig

        PeftController(pm, None, actuators=ActuatorConfig(mode_ranks=(4, 8, 16)), print_fn=None)
    # lr_mode="multiplier" (the default) beside an ActuatorConfig of the absolute default ran absolute, silently
    with pytest.raises(ValueError, match="^lr_mode: 'multiplier' would be ignored: actuators= is given"):
        PeftController(pm, None, lr_mode="multiplier", actuators=ActuatorConfig(mode_ranks=(8, 8, 8)), print_fn=None)
    assert PeftController(pm, None, print_fn=None).actuators.lr_mode == "multiplier"


def test_peft_controller_steps_a_peft_model_with_a_rank_pattern():
    """A PEFT model whose rank_pattern gives some layers another r than the config's: the controller's check that the
    adapters run at its mode's rank (which a nested model's load_state_dict can move) refused every ctrl.step ("the
    adapters run at rank [8, 16]"), and the set_rank it advised does nothing to a PEFT layer. PEFT's layers train at
    their own fixed r: the steps run, through a Mirror cycle, and each layer keeps its r."""
    base, targets, mts = tiny("bert")
    pm = get_peft_model(base, LoraConfig(r=8, target_modules=targets, rank_pattern={targets[0]: 16},
                                         modules_to_save=mts, task_type="SEQ_CLS"))
    ranks = {n: m.r["default"] for n, m in pm.named_modules() if hasattr(m, "r") and isinstance(m.r, dict)}
    assert set(ranks.values()) == {8, 16}
    ctrl, params, at_snapshot, rec, pre = run_mirror_cycle(pm.train(), lr=5e-2)
    assert rec.snapshot == "kept" and {r.rank for r in ctrl.trace} == {8}
    assert ranks == {n: m.r["default"] for n, m in pm.named_modules() if hasattr(m, "r") and isinstance(m.r, dict)}


def test_peft_controller_refuses_an_inactive_or_frozen_adapter(tmp_path):
    pm = bert_peft_model().eval()
    pm.save_pretrained(tmp_path)
    fresh, _, _ = tiny("bert")
    frozen = PeftModel.from_pretrained(copy.deepcopy(fresh), str(tmp_path))  # is_trainable=False: nothing trains
    with pytest.raises(ValueError, match="frozen.*is_trainable=True"):
        attach_to_peft_model(frozen, None, print_fn=None)
    two = PeftModel.from_pretrained(copy.deepcopy(fresh), str(tmp_path), adapter_name="a", is_trainable=True)
    two.load_adapter(str(tmp_path), adapter_name="b", is_trainable=True)
    opt = torch.optim.AdamW([p for p in two.parameters() if p.requires_grad], lr=1e-3)
    with pytest.raises(ValueError, match=r"'b' is not an active adapter .*\['a'\].*set_adapter\('b'\)"):
        attach_to_peft_model(two, opt, adapter_name="b", print_fn=None)  # was: "call loss.backward()" at each step
    two.set_adapter("b")
    ctrl = attach_to_peft_model(two, torch.optim.AdamW([p for p in two.parameters() if p.requires_grad]), print_fn=None)
    driven = {id(p) for p in ctrl.lora_parameters()}
    assert len(driven) == 8 and all(".b." in n for n, p in two.named_parameters() if id(p) in driven)


def test_peft_controller_names_what_it_refuses_in_an_adalora_model():
    from peft import AdaLoraConfig

    base, targets, _ = tiny("bert")
    ada = get_peft_model(base, AdaLoraConfig(r=8, target_modules=targets, total_step=10, task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="'default' has peft_type=ADALORA; .* plain PEFT LoRA adapters only"):
        attach_to_peft_model(ada, None, print_fn=None)  # was: "needs a PEFT LoRA model with adapter 'default'"
    with pytest.raises(ValueError, match=r"adapter 'other' \(adapters: \['default'\]\)"):
        attach_to_peft_model(ada, None, adapter_name="other", print_fn=None)


def test_peft_controller_mirror_restores_peft_weights_when_drift_is_small():
    pm = bert_peft_model()
    ctrl, params, at_snapshot, rec, pre = run_mirror_cycle(pm, lr=1e-7)
    assert rec.snapshot == "restored" and rec.drift < 0.05 and rec.transition == "MIRROR->MULTI"
    assert any(not torch.equal(q, s) for q, s in zip(pre, at_snapshot))  # Mirror training had moved them
    assert all(torch.equal(p, s) for p, s in zip(params, at_snapshot))  # lora A/B and classifier, bit for bit
    assert all(p.grad is None for p in params)  # the next optimizer step cannot move them


def test_peft_controller_mirror_keeps_peft_weights_when_drift_is_large():
    pm = bert_peft_model()
    ctrl, params, at_snapshot, rec, pre = run_mirror_cycle(pm, lr=5e-2)
    assert rec.snapshot == "kept" and rec.drift >= 0.05
    assert all(torch.equal(p, q) for p, q in zip(params, pre))
    assert any(not torch.equal(p, s) for p, s in zip(params, at_snapshot))


def test_peft_controller_reads_peft_gradients_for_the_composite_signal():
    pm = bert_peft_model()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    ctrl = attach_to_peft_model(pm, opt, signal="composite", print_fn=None)
    x, y = inputs(6), torch.tensor([0, 2])
    for _ in range(3):
        loss = pm(input_ids=x, labels=y).loss
        loss.backward()
        ctrl.step(loss=loss.item())
        opt.step()
        opt.zero_grad()
    comps = ctrl.trace[-1].components
    assert comps["S"] > 0 and comps["E"] > 0  # gradient norm and direction churn of the PEFT lora_A/lora_B
    with pytest.raises(ValueError, match="no gradient"):
        ctrl.step(loss=1.0)  # no backward since the last zero_grad


def test_peft_controller_restore_under_peft_merge_adapter_keeps_the_base_weights():
    """A Mirror restore while PEFT's merge_adapter() had the adapter merged (an eval in the middle of Mirror) wrote
    lora_A/lora_B under a base weight that held the discarded delta; unmerge_adapter() then took the restored delta
    out of it, leaving their difference in the frozen base weights (0.08 here). The restore now unmerges first and
    merges the restored blocks again."""
    pm = bert_peft_model()
    base0 = {n: p.detach().clone() for n, p in pm.named_parameters() if "base_layer" in n}
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ctrl = attach_to_peft_model(pm, opt, signal="loss", print_fn=None)
    ctrl._save_snapshot(0)
    snap = [p.detach().clone() for p in params]
    x, y = inputs(6), torch.tensor([0, 2])
    for _ in range(3):
        pm(input_ids=x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.merge_adapter()
    ctrl._restore_snapshot(params)
    assert all(m.merged for m in pm.modules() if "default" in getattr(m, "lora_A", {}))
    merged_out = logits(pm.eval(), x)
    pm.unmerge_adapter()
    assert all(torch.equal(p, s) for p, s in zip(params, snap))
    assert max((p - base0[n]).abs().max().item() for n, p in pm.named_parameters() if "base_layer" in n) < 1e-6
    assert torch.allclose(merged_out, logits(pm, x), atol=1e-5)  # merged: the restored adapter, not the old one


def test_peft_controller_refuses_a_step_while_peft_merged_the_adapter():
    """With merge_adapter() the forward runs the base weight alone: lora_A/lora_B get no gradient and only the
    saved head trained, while the controller stepped on silently. It now names PEFT's calls."""
    pm = bert_peft_model()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ctrl = attach_to_peft_model(pm, opt, signal="loss", print_fn=None)
    pm.merge_adapter()
    pm(input_ids=inputs(6), labels=torch.tensor([0, 2])).loss.backward()
    with pytest.raises(ValueError, match=r"4 of 4 are merged .*merge_adapter\(\).*call peft_model.unmerge_adapter\(\)"):
        ctrl.step(loss=1.0)
    pm.unmerge_adapter()
    opt.zero_grad()
    pm(input_ids=inputs(6), labels=torch.tensor([0, 2])).loss.backward()
    ctrl.step(loss=1.0)


def test_an_export_to_a_file_or_a_link_to_nothing_says_so(tmp_path):
    """The atomic export made its folder with os.makedirs first: a save_dir that is a file (a typo for the folder
    beside it) or a link to nothing was "FileExistsError: [Errno 17] File exists", which reads as a refusal to
    overwrite (PEFT's own save had said "should be a directory, not a file"). Both are a ValueError saying what the
    path is; the file is left as it was."""
    model, adapters, _ = nested("bert")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"notes.txt is a file, not a folder; pass the folder"):
        export_peft_adapter(model, adapters, tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"link is a link to nothing, not a folder"):
        export_peft_adapter(model, adapters, tmp_path / "link")
    (tmp_path / "there").mkdir()
    (tmp_path / "to_there").symlink_to(tmp_path / "there")  # a link to a folder is that folder
    export_peft_adapter(model, adapters, tmp_path / "to_there")
    assert (tmp_path / "there" / "adapter_config.json").is_file() and (tmp_path / "to_there").is_symlink()


def _exited_pid() -> int:
    """The id of a process that ran here and has exited (its id is free, as a SIGKILLed exporter's is)."""
    import subprocess
    import sys

    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def test_an_export_removes_the_temp_folders_of_killed_exports_and_keeps_those_of_live_ones(tmp_path):
    """An export killed outright (SIGKILL) while writing left its hidden `.tmp-<pid>-*` folder (a whole adapter's
    size) in the folder for good; the README told the user to delete it. The next export into the folder now removes
    those of processes that no longer run on this host; a live process's (a concurrent export), another host's
    and one without a host (an older version's) stay. The kill is real: a child process exports and SIGKILLs itself
    right after PEFT wrote the weights into the temporary folder."""
    import os
    import signal
    import subprocess
    import sys

    from unified_lora._files import _host_tag

    out = tmp_path / "adapter"
    child = tmp_path / "killed_mid_export.py"
    child.write_text(
        "import os, signal, sys\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "import peft.peft_model\n"
        "from test_peft_io import nested\n"
        "from unified_lora.peft_io import export_peft_adapter\n"
        "real = peft.peft_model.safe_save_file\n"
        "def save_file(*a, **k):\n"
        "    real(*a, **k)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "model, adapters, _ = nested('gpt2')\n"
        "export_peft_adapter(model, adapters, sys.argv[1], rank=4)\n"
        "peft.peft_model.safe_save_file = save_file\n"
        "export_peft_adapter(model, adapters, sys.argv[1], rank=8)\n")
    p = subprocess.run([sys.executable, str(child), str(out)], stderr=subprocess.PIPE, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    killed = [d.name for d in out.iterdir() if d.is_dir()]
    assert len(killed) == 1 and killed[0].startswith(".tmp-")  # the killed export's, with the weights inside
    assert (out / killed[0] / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4  # the previous export, whole

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _exited_pid()
        kept = [f".tmp-{_host_tag()}-{live.pid}-abc123", f".tmp-otherhost-{dead}-abc123", f".tmp-{dead}-abc123",
                f".tmp-{_host_tag()}-{os.getpid()}-abc123"]
        gone = [f".tmp-{_host_tag()}-{dead}-abc123"]
        for name in kept + gone:
            (out / name).mkdir()
            (out / name / "adapter_model.safetensors").write_bytes(b"partial")
        model, adapters, fresh = nested("gpt2")
        export_peft_adapter(model, adapters, out, rank=8)
        assert sorted(d.name for d in out.iterdir() if d.is_dir()) == sorted(kept)
        assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
        torch.testing.assert_close(logits(peft_load(fresh, out), inputs()), logits(model, inputs()), atol=TOL,
                                   rtol=TOL)
    finally:
        live.kill()
        live.wait()
