"""Injection of nested LoRA layers into a model (PEFT's target conventions)."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import inspect
import os
import re
import sys
import warnings
from typing import Iterable

import torch
import torch.nn as nn

from .config import NestedLoRAConfig, parse_names
from .distributed import local_tensor
from .layer import Conv1D, NestedLoRALayer, packed_weight
from .mirror import watch_state_dict

# Output heads are never targeted by "all-linear". PEFT leaves out only the output layer (`get_output_embeddings()`,
# which is left out here too: `_output_layers`), so this list also leaves out what PEFT's would take: BERT's
# pooler.dense and, under `cls`, a masked LM's cls.predictions.transform.dense (README).
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "pooler.dense")


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or bool(Conv1D and isinstance(m, Conv1D))


def _matches(name: str, target: Iterable[str] | str) -> bool:
    if isinstance(target, str):
        if target == "all-linear":
            return not any(name == h or name.endswith("." + h) or name.startswith(h + ".") for h in _HEAD_NAMES)
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def default_target_modules(model: nn.Module) -> list[str] | str:
    """PEFT's default LoRA targets for `model`'s `config.model_type` (what `LoraConfig(target_modules=None)` adapts:
    query and value for BERT, c_attn for GPT-2, q_proj and v_proj for Llama): a list of name suffixes, or the regex
    PEFT gives for some types (Gemma 4's: the q_proj and v_proj of its language model, not of its vision or audio
    towers), matched against whole module names as PEFT matches it. A model without a config, or of a type PEFT has
    no default for, is a ValueError naming the Linear modules it has, as PEFT refuses it too."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in defaults:
        targets = defaults[model_type]
        # (a regex stays one: list() made it its characters, which matched nothing)
        return targets if isinstance(targets, str) else list(targets)
    seen = sorted({n.split(".")[-1] for n, m in model.named_modules() if n and _is_linear(m)})
    what = f"model type {model_type!r}" if model_type else "a model without a transformers config"
    raise ValueError(f"target_modules: not given, and PEFT has no default targets for {what}; name the Linear layers "
                     f"to adapt (this model's Linear-like module names end with: {seen}), or pass 'all-linear'")


def inject_nested_lora(model: nn.Module, config: NestedLoRAConfig) -> dict[str, NestedLoRALayer]:
    """Replace every targeted Linear/Conv1D by a `NestedLoRALayer`, freeze the rest
    of the model except `modules_to_save`, and return {module name: adapter}.
    `config.target_modules` None: PEFT's default for the model type (`default_target_modules`).
    With `config.autocast_adapter_dtype` (the default) the blocks on a bf16/fp16
    base are fp32, as PEFT's `get_peft_model` makes them."""
    if config.target_modules is None:
        config = dataclasses.replace(config, target_modules=default_target_modules(model))
    _refuse_ddp_wrapped(model)
    refuse_repacked_4bit(model, "setup")
    refuse_unquantized_bnb_layers(model)
    candidates = [(n, m) for n, m in model.named_modules() if _is_linear(m) and n]
    aliases = module_names(model)  # a Linear shared by two parents is one module with two names
    if any(isinstance(m, NestedLoRALayer) for m in model.modules()):
        raise ValueError("model: already has nested LoRA layers; inject once")
    _refuse_peft_layers(model)
    if config.target_modules != "all-linear":
        # PEFT refuses a target it cannot wrap; skipping it would leave a named module silently unadapted
        odd = [(n, type(m).__name__) for n, m in model.named_modules()
               if n and not _is_linear(m) and _matches(n, config.target_modules)]
        if odd:
            shown = ", ".join(f"{n!r} ({t})" for n, t in odd[:5]) + f", ... ({len(odd) - 5} more)" * (len(odd) > 5)
            seen = sorted({n.split(".")[-1] for n, _ in candidates})
            raise ValueError(
                f"target_modules: {config.target_modules!r} matches {shown}, which a NestedLoRALayer cannot wrap: it "
                f"wraps nn.Linear and transformers' Conv1D only (PEFT refuses a norm or a whole block too; its LoRA "
                f"adapts an nn.Embedding or a convolution, which nested LoRA does not). Name the Linear layers "
                f"themselves; Linear-like module names in this model end with: {seen}")
    chosen = [(n, m) for n, m in candidates if _matches_any(aliases[id(m)], config.target_modules)]
    # nn.MultiheadAttention reads its out_proj's weight and bias itself and never calls the module, so a wrapped
    # out_proj would run there without its delta (its `.weight` is the base weight): "all-linear" leaves it out, a
    # name that targets it is an error.
    unwrappable = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    not_linear = [(n, m) for n, m in chosen if _not_a_linear_map(m)]  # (Llama 4's and PhiMoE's routers)
    if config.target_modules == "all-linear":
        unwrappable |= _output_layers(model)  # (a model's output layer whatever its name, as PEFT leaves it out)
        unwrappable |= {id(m) for _, m in not_linear}
        chosen = [(n, m) for n, m in chosen if id(m) not in unwrappable]
    elif not_linear:
        shown = ", ".join(f"{n!r} ({type(m).__name__})" for n, m in not_linear[:5])
        raise ValueError(f"target_modules: {shown} subclass nn.Linear with a forward that does not return x Wᵀ + b "
                         "(Llama 4's and PhiMoE's routers return a tuple), so a LoRA delta cannot be added to what "
                         "they return; target other modules (\"all-linear\" leaves them out)")
    elif any(id(m) in unwrappable for _, m in chosen):
        names = [n for n, m in chosen if id(m) in unwrappable]
        raise ValueError(f"target_modules: {names} are the out_proj of an nn.MultiheadAttention, which uses that "
                         "Linear's weight directly rather than calling it, so a LoRA layer there cannot take part; "
                         "target other modules")
    if not chosen:
        seen = sorted({n.split(".")[-1] for n, _ in candidates})
        raise ValueError(
            f"target_modules: {config.target_modules!r} matched no Linear/Conv1D module. "
            f"Linear-like module names in this model end with: {seen}"
        )
    adapters: dict[str, NestedLoRALayer] = {}
    with undone_on_error(model):  # e.g. a misspelt modules_to_save: the model is left as it was, ready for a retry
        for p in model.parameters():
            p.requires_grad_(False)
        for name, base in chosen:
            layer = NestedLoRALayer(
                base,
                rank_levels=config.rank_levels,
                max_rank=config.max_rank,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                scaling=config.scaling,
                initial_rank=config.initial_rank,
                kernel=config.kernel,
                autocast_adapter_dtype=config.autocast_adapter_dtype,
            )
            _replace(model, name, layer)
            adapters[name] = layer
        mark_modules_to_save(model, config.modules_to_save)
        keep_off_fast_paths(model)
    _warn_ranks_above_layer_rank(model, adapters)
    resize_wrapped_heads(model)
    keep_4bit_layers_differentiable(model)
    for m in model.modules():
        if hasattr(m, "init_8bit_state") and not getattr(m, "_unified_lora_scb_hook", False):
            m._register_load_state_dict_pre_hook(_scb_back_on_the_weight, with_module=True)
            m._unified_lora_scb_hook = True
    watch_state_dict(model)  # Mirror packs these parameters into one buffer: state_dict() copies them out
    return adapters


def _user_stacklevel() -> int:
    """The `stacklevel` for a `warnings.warn` in the function calling this one that points at the first frame outside
    this package: the user's line, whichever of the package's entry points (setup_unified_lora, setup_multitask_lora,
    inject_nested_lora, a CLI run) led there."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _warn_ranks_above_layer_rank(model: nn.Module, adapters: dict[str, NestedLoRALayer]) -> None:
    """A warning naming the layers whose top rank level is above min(in_features, out_features): there the product
    B·A (out × r times r × in) has rank at most min(in, out), so the levels above it add parameters (and, under the
    alpha / r scaling, shrink the update) without adding a direction. PEFT accepts such a rank without a word.
    Output heads are left out: a classifier's number of classes bounds its delta by design, and a multi-task run
    targets its head for each task's own head delta (a head named as "all-linear" leaves it out, the model's output
    layer, a layer trained in full by modules_to_save, or the head a multi-task `train` run adds to the targets,
    which marks it `_unified_lora_task_head`: BART's `classification_head.out_proj`)."""
    outputs = _output_layers(model)
    over = {n: min(a.in_features, a.out_features) for n, a in adapters.items()
            if a.max_rank > min(a.in_features, a.out_features) and _matches(n, "all-linear") and id(a) not in outputs
            and not getattr(getattr(a.base_layer, "weight", None), "requires_grad", False)
            and not getattr(a.base_layer, "_unified_lora_task_head", False)}
    if over:
        top = next(iter(adapters.values())).max_rank
        shown = ", ".join(f"{n!r} (min(in, out) = {k})" for n, k in list(over.items())[:5])
        shown += f", ... ({len(over) - 5} more)" * (len(over) > 5)
        warnings.warn(f"rank_levels: the top level {top} is above the rank a delta can have in {len(over)} of "
                      f"{len(adapters)} adapted layer(s): {shown}; there the levels above min(in, out) add "
                      "parameters but no direction. Use lower rank levels, or leave those layers out of "
                      "target_modules", UserWarning, stacklevel=_user_stacklevel())


# The model classes that put a task head on their base model, and the names of those heads' modules: what
# `from_pretrained(..., num_labels=...)` initialises afresh from a checkpoint without them. BERT's `classifier`,
# GPT-2's and Llama's `score`, DistilBERT's `pre_classifier` before its `classifier`, BART's and T5's
# `classification_head`, a question-answering model's `qa_outputs`, XLNet's `sequence_summary` and `logits_proj`.
_TASK_HEAD_CLASSES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                      "ForMultipleChoice", "ForImageClassification")
_TASK_HEAD_NAMES = ("pre_classifier", "classifier", "score", "classification_head", "qa_outputs", "sequence_summary",
                    "logits_proj")


def warn_frozen_head(model: nn.Module) -> None:
    """A warning where a task head (`_TASK_HEAD_NAMES` on a `_TASK_HEAD_CLASSES` model) is left frozen: neither
    adapted nor in modules_to_save. `from_pretrained(path, num_labels=2)` initialises that head afresh (at random),
    and frozen it never trains: the adapters then learn to feed a random projection (the README's own Quick start
    block did so on MiniLM). PEFT's `task_type="SEQ_CLS"` adds `classifier`, `score` and `pre_classifier` to
    modules_to_save (BART's `classification_head` it leaves frozen); without a task type PEFT, too, leaves the head
    frozen, and so does this package, which cannot tell a fresh head from a trained one (`unified-lora train` can:
    it trains the head, `training.seq_cls_head`). A head of several layers (RoBERTa's `classifier`: `dense`, then
    `out_proj`) is warned of where one of them is so left, the others adapted or trained; so is a head of several
    modules (DistilBERT's `pre_classifier`, then `classifier`) where one of them is. One warning names every such
    part. A model `training.load_model` loaded (train, predict, export) records which modules from_pretrained made
    afresh (`_unified_lora_fresh_modules`), and its `Run` says itself which of them stay frozen: no warning there (it
    was printed beside that note, of a head a checkpoint had trained, and again by predict and export)."""
    if not type(model).__name__.endswith(_TASK_HEAD_CLASSES) or hasattr(model, "_unified_lora_fresh_modules"):
        return
    heads, parts = [], []  # the heads with a frozen part, and those parts ("classifier", or "classifier.out_proj")
    for name in _TASK_HEAD_NAMES:
        head = getattr(model, name, None)
        if not isinstance(head, nn.Module):
            continue
        # the head's layers holding parameters of their own, each frozen and not inside a nested LoRA layer (whose
        # base layer is frozen by design): with `dense` a LoRA target, RoBERTa's fresh `out_proj` was left frozen
        # without a word, as any trainable parameter in the head counted as the head trained
        adapted = [n for n, m in head.named_modules() if isinstance(m, NestedLoRALayer)]
        frozen = [n for n, m in head.named_modules()
                  if not any(a == "" or n == a or n.startswith(a + ".") for a in adapted)
                  and (own := list(m.parameters(recurse=False))) and not any(p.requires_grad for p in own)]
        if frozen:
            heads.append(name)
            parts += [name] if not any(p.requires_grad for p in head.parameters()) else \
                [f"{name}.{n}" for n in frozen]
    if not parts:
        return
    kind = type(model).__name__
    shown = ", ".join(repr(p) for p in parts)
    what = (f"the task head {shown} of this {kind} stays frozen" if len(parts) == 1 and parts == heads else
            f"{shown} of the task head{'s' * (len(heads) > 1)} {', '.join(map(repr, heads))} of this {kind} "
            f"stay{'s' * (len(parts) == 1)} frozen")
    warnings.warn(f"{what} (neither adapted nor in modules_to_save): a head from_pretrained initialised afresh "
                  f"(num_labels=...) then never trains. Pass modules_to_save={heads!r} to train it in full, as "
                  "PEFT's task_type='SEQ_CLS' does for a classifier; if the head is trained already, leave it frozen "
                  "and ignore this", UserWarning, stacklevel=_user_stacklevel())


def keep_4bit_layers_differentiable(model: nn.Module) -> None:
    """bitsandbytes' Linear4bit on a CPU with AVX512-BF16 repacks its weight in place at its first eval-mode forward
    on an input needing no gradient, for an inference kernel with no autograd support, and runs every later forward,
    training ones too, through that kernel: a backward after an eval then gave wrong gradients through every such
    layer, wrapped or not (q_proj's A gradients all 0 with k_proj/o_proj unwrapped). A model that trains adapters
    (nested layers, or PEFT's under `attach_to_peft_model`) keeps the repacking off (README "Quantized")."""
    for m in model.modules():
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False


def refuse_unquantized_bnb_layers(model: nn.Module) -> None:
    """A ValueError naming the bitsandbytes `Linear4bit` / `Linear8bitLt` layers of `model` whose weight is a plain
    `nn.Parameter` instead of their `Params4bit` / `Int8Params`. transformers (5.25) leaves a quantized model's layer
    so when the checkpoint lacks its weights (a new classifier head: MiniLM loaded with `num_labels=2`), and such a
    layer cannot run a forward (an empty AssertionError in 4-bit, "'Parameter' object has no attribute 'CB'" in 8-bit)
    whether it is a target, a `modules_to_save` head or neither; setup went through and the first forward failed."""
    names = [n for n, m in model.named_modules()
             if any(c.__name__ in ("Linear4bit", "Linear8bitLt") and c.__module__.startswith("bitsandbytes.")
                    for c in type(m).__mro__) and type(m.weight) is nn.Parameter]
    if names:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(
            f"setup: {names[:3]} are bitsandbytes quantized layers whose weight was never quantized (a plain "
            f"Parameter: transformers leaves a layer so when the checkpoint lacks its weights, e.g. a new "
            f"classifier head), and they cannot run a forward. Load the model with that layer in full precision: "
            f"BitsAndBytesConfig(..., llm_int8_skip_modules={leaves})")


def refuse_repacked_4bit(model: nn.Module, what: str) -> None:
    """A ValueError naming the bitsandbytes 4-bit layers of `model` whose weight an evaluation before `what` already
    repacked for the CPU inference kernel (`keep_4bit_layers_differentiable`): a backward through them gives wrong
    gradients (every A gradient of the tiny Llama's q_proj/v_proj was 0 or off by its whole size), and bitsandbytes'
    own inverse of the repacking does not give the weights back (their absmax was rounded to bf16, and put back in
    the wrong order for layers wider than one 64-value block)."""
    names = [n for n, m in model.named_modules() if "support_avx512bf16_for_cpu" in vars(m)  # (not the wrappers)
             and getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)]
    if names:
        shown = ", ".join(repr(n) for n in names[:3]) + f", ... ({len(names) - 3} more)" * (len(names) > 3)
        raise ValueError(
            f"{what}: bitsandbytes has repacked the 4-bit weights of {shown} for its CPU inference kernel (an "
            "eval-mode forward without gradients ran before, on a CPU with AVX512-BF16). A backward through that "
            "kernel gives wrong gradients, and the repacking cannot be undone exactly. Load the model again and "
            f"call {what} before evaluating it ({what} turns the repacking off), or set "
            "`support_avx512bf16_for_cpu = False` on every bitsandbytes Linear4bit right after loading")


def _scb_back_on_the_weight(module, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook of a bitsandbytes `Linear8bitLt`: its first forward moves the row scales from the
    weight (`weight.SCB`) into its state (`state.SCB`), and its `_load_from_state_dict` then refused its own state
    dict ("Loading a quantized checkpoint into non-quantized Linear8bitLt is not supported"): the Trainer's
    `load_best_model_at_end` and a resume in the same process failed on an 8-bit base after training. The weight
    gets the state's tensor back, so the load copies the scales into it (and the codes into `weight`, which is
    `state.CB`), as before the first forward."""
    if prefix + "SCB" in state_dict and getattr(module.weight, "SCB", None) is None \
            and getattr(module.state, "SCB", None) is not None:
        module.weight.SCB = module.state.SCB


def _output_layers(model: nn.Module) -> set[int]:
    """ids of the output layers of `model` and of the transformers models inside it (`get_output_embeddings()`),
    which "all-linear" leaves out whatever their name, as PEFT's does: Whisper's `proj_out`, ELECTRA's
    `generator_lm_head`, XLM's `pred_layer.proj`, RWKV's `head` (named so, they used to be wrapped)."""
    from transformers import PreTrainedModel

    out = set()
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            try:
                head = m.get_output_embeddings()
            except (AttributeError, NotImplementedError):  # a model class that declares no output layer
                continue
            if isinstance(head, nn.Module):
                out.add(id(head))
    return out


def resize_wrapped_heads(model: nn.Module) -> None:
    """Give each transformers model inside `model` whose output layer (`get_output_embeddings()`) is a nested layer
    its own `resize_token_embeddings` (`_resize_token_embeddings_of_wrapped_head`): transformers' resizes only a
    plain `nn.Linear` head. Untied, it raised a TypeError after it had resized the input embedding; tied, it resized
    the shared base weight and left the B blocks at the old vocabulary, and the next forward failed with a bare
    shape error."""
    from transformers import PreTrainedModel

    for m in model.modules():
        if isinstance(m, PreTrainedModel) and "resize_token_embeddings" not in m.__dict__:
            try:
                head = m.get_output_embeddings()
            except (AttributeError, NotImplementedError):
                continue
            if isinstance(head, NestedLoRALayer):
                m.resize_token_embeddings = functools.partial(_resize_token_embeddings_of_wrapped_head, m)


def _resize_token_embeddings_of_wrapped_head(model, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
    """transformers' `resize_token_embeddings` for a model whose output layer is a nested layer: the head's base
    layer is put in its place while transformers resizes (and re-ties) the embeddings as for the bare model, and
    then the nested layer wraps the resized base layer again with B blocks of the new size (`NestedLoRALayer.
    _resize_out`: rows of new tokens are 0, the old tokens' logits are unchanged, A is unchanged). An optimizer that
    has stepped holds moments of the old shape: build it again (and `ctrl.attach_optimizer` it)."""
    resize = type(model).resize_token_embeddings
    head = model.get_output_embeddings()
    if not isinstance(head, NestedLoRALayer) or new_num_tokens is None and pad_to_multiple_of is None:
        return resize(model, new_num_tokens, pad_to_multiple_of, mean_resizing)
    if head.merged_rank:
        raise ValueError("resize_token_embeddings: the output layer's LoRA delta is merged into its base weight; "
                         "unmerge it first (unmerge_adapters(model)), or resize before setup")
    model.set_output_embeddings(head.base_layer)
    try:
        return resize(model, new_num_tokens, pad_to_multiple_of, mean_resizing)
    finally:
        head._resize_out(model.get_output_embeddings())
        model.set_output_embeddings(head)
        # the frozen embeddings and head now differ from the base checkpoint's (new rows): an adapter-only save
        # (`unified_lora.callbacks.adapter_only_saves`) keeps them
        model._unified_lora_resized_vocab = True


def _not_a_linear_map(m: nn.Module) -> bool:
    """True for an nn.Linear subclass whose own forward does not return a Linear's output, x Wᵀ + b shaped
    (rows, out_features): Llama 4's and PhiMoE's routers return a tuple (a nested layer wrapping one raised
    "'tuple' object has no attribute 'reshape'" in every forward), DeepSeek-V4's grouped `o_a_proj` a block-diagonal
    product of another width. Such a forward runs once, in eval mode and without grad, on one zero row. Subclasses
    that compute a Linear's output their own way (Falcon's FalconLinear) stay wrappable."""
    if not isinstance(m, nn.Linear) or type(m).forward is nn.Linear.forward:
        return False
    w, training = m.weight, m.training
    packed = packed_weight(m)
    if type(m).forward.__module__.startswith("bitsandbytes."):
        # bitsandbytes' own Linear4bit / Linear8bitLt forward: the probe would set a 4-bit compute dtype, and on a
        # Linear8bitLt not yet quantized (a float Int8Params until its first `.to(device)`) it quantized the weight
        # in place: pretrained weights loaded after setup were then cast to int8 as they were, not quantized
        return False
    try:
        m.training = False  # (PhiMoE's router draws jitter noise in training mode: no draw from the global RNG here)
        with torch.no_grad():  # (a quantized weight's integer dtype is no input dtype: such a layer takes fp32)
            out = m(torch.zeros(1, m.in_features, dtype=torch.float32 if packed else w.dtype, device=w.device))
    except Exception:  # e.g. DeepSeek-V4's grouped projection cannot take a row of in_features
        return True
    finally:
        m.training = training
    return not (isinstance(out, torch.Tensor) and tuple(out.shape) == (1, m.out_features))


def _refuse_ddp_wrapped(model: nn.Module) -> None:
    """Refuse a model inside DistributedDataParallel (what `accelerator.prepare` returns under several processes).
    DDP takes the parameters it all-reduces and broadcasts when it wraps the model: LoRA blocks injected later are
    not among them, so every process trained its own adapters from its own data and the runs drifted apart
    without an error."""
    from torch.nn.parallel import DistributedDataParallel

    if any(isinstance(m, DistributedDataParallel) for m in model.modules()):
        raise ValueError(
            "model: it is wrapped in DistributedDataParallel (what accelerator.prepare or DDP(...) returns), which "
            "took its list of parameters to synchronise when it wrapped the model. LoRA blocks injected now would "
            "not be in it: their gradients would not be all-reduced, and each process would train different "
            "adapters without an error. Inject into the bare model first, then wrap it: setup_unified_lora(model, "
            "...) before accelerator.prepare(model) or DDP(model, **ddp_kwargs())")


def _matches_any(names: list[str], target: Iterable[str] | str) -> bool:
    """Whether a module registered under `names` is a target: one of its names matches (for "all-linear": none of
    them is, or is inside, an output head)."""
    hits = [_matches(n, target) for n in names]
    return all(hits) if target == "all-linear" else any(hits)


def _names_by_id(named) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for n, x in named:
        if n:  # (the root module's name is "")
            names.setdefault(id(x), []).append(n)
    return names


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """{id(module): every name it is registered under}, first (the name `named_modules` gives) first."""
    return _names_by_id(model.named_modules(remove_duplicate=False))


def parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """{id(parameter): every name it has} (a tied weight has one per module that holds it), first name first."""
    return _names_by_id(model.named_parameters(remove_duplicate=False))


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` in place of the module at `name`, under every name it has: a Linear registered in two parents
    (shared between them) is one module, so a forward through either runs `module`; replaced at one name only, the
    other would silently run the bare base layer."""
    old = model.get_submodule(name)
    for parent in list(model.modules()):  # (listed first: the new module holds the old one as its base_layer)
        for child, m in list(parent._modules.items()):
            if m is old:
                setattr(parent, child, module)


@contextlib.contextmanager
def undone_on_error(model: nn.Module):
    """Run a block that injects nested layers into `model` (which has none) and builds on them. If it raises, every
    nested layer is replaced by its base layer again and every parameter gets its `requires_grad` back, so the
    model is as it was: a retry with corrected arguments does not meet "already has nested LoRA layers". Layers the
    model held before the block stay: a second setup call on a wrapped model is refused and leaves the first one's
    layers (which its controller and optimizer hold) in place."""
    kept = set(lora_layers(model).values())
    flags = [(p, p.requires_grad) for p in model.parameters()]
    encoders = [(m, m.use_nested_tensor) for m in model.modules() if hasattr(m, "use_nested_tensor")]
    try:
        yield
    except BaseException:
        for name, layer in lora_layers(model).items():
            if layer not in kept:
                _replace(model, name, layer.base_layer)
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, flag in encoders:
            m.use_nested_tensor = flag
        raise


def peft_layer_names(model: nn.Module) -> list[str]:
    """The names of the PEFT adapter layers (`BaseTunerLayer`s) in `model`. PEFT is imported only if the caller has:
    without it no module can be one of its layers."""
    base = getattr(sys.modules.get("peft.tuners.tuners_utils"), "BaseTunerLayer", None)
    return [] if base is None else [n for n, m in model.named_modules() if isinstance(m, base)]


def _refuse_peft_layers(model: nn.Module) -> None:
    """A model that already holds PEFT adapter layers: every target would be PEFT's wrapper, and "all-linear" or a
    regex would put nested LoRA on PEFT's own lora_A/lora_B Linears (LoRA on LoRA)."""
    peft_layers = peft_layer_names(model)
    if peft_layers:
        raise ValueError(
            f"model: already has {len(peft_layers)} PEFT adapter layers (e.g. {peft_layers[0]!r}); nested LoRA cannot "
            "be injected on top of them. Fold them in first (model = model.merge_and_unload()), load the saved PEFT "
            "adapter into the plain base model with unified_lora.peft_io.import_peft_adapter(base_model, peft_dir), "
            "or drive the PEFT model at its fixed rank with "
            "unified_lora.peft_io.attach_to_peft_model(peft_model, optimizer)")


def _off_the_fast_path(module, args) -> None:
    """A no-op hook: its presence keeps nn.TransformerEncoderLayer off its fused inference path (`keep_off_fast_paths`)."""


def keep_off_fast_paths(model: nn.Module) -> None:
    """Keep torch's fused transformer inference paths away from nested layers, which they would bypass.
    nn.TransformerEncoderLayer's fast path reads linear1/linear2's `.weight` itself (a wrapped layer's is the base
    weight: no LoRA); torch skips it when a submodule has a hook, so each nested layer inside one gets a no-op hook.
    nn.TransformerEncoder's own path (eval, no grad, a src_key_padding_mask) reads the first layer's weights the same
    way, with no hook check, and then feeds nested tensors to every layer; its `use_nested_tensor` (torch's own
    switch, which it sets False for layers that cannot take that path) is set False when it holds a nested layer."""
    for enc in model.modules():
        if isinstance(enc, nn.TransformerEncoderLayer):
            for m in enc.modules():
                if isinstance(m, NestedLoRALayer) and _off_the_fast_path not in m._forward_pre_hooks.values():
                    m.register_forward_pre_hook(_off_the_fast_path)
        elif isinstance(enc, nn.TransformerEncoder) and getattr(enc, "use_nested_tensor", False):
            if any(isinstance(m, NestedLoRALayer) for m in enc.modules()):
                enc.use_nested_tensor = False
    watch_direct_weight_use(model)


_SOURCES: dict[type, str] = {}


def _class_source(cls: type) -> str:
    if cls not in _SOURCES:
        try:
            _SOURCES[cls] = inspect.getsource(cls)
        except (OSError, TypeError):  # a class defined without a source file
            _SOURCES[cls] = ""
    return _SOURCES[cls]


def _watch_start(parent, args) -> None:
    for child in parent.__dict__["_weight_readers"]:  # (after merge_and_unload a reader is a plain Linear again)
        m = parent._modules.get(child)
        if isinstance(m, NestedLoRALayer):
            m.__dict__["_weight_watch"] = [0, 0]


def _watch_call(layer, args) -> None:
    watch = layer.__dict__.get("_weight_watch")
    if watch is not None:
        watch[1] += 1


def _watch_end(parent, args, output) -> None:
    for child in parent.__dict__["_weight_readers"]:
        watch = getattr(parent._modules.get(child), "__dict__", {}).pop("_weight_watch", None)
        if watch is not None and watch[0] and not watch[1]:
            raise RuntimeError(
                f"{type(parent).__name__}.forward computed with its '{child}.weight' directly instead of calling "
                f"'{child}', so that layer's LoRA delta was left out of its output (as in WavLM's attention, which "
                "passes q/k/v/out_proj's weights to F.multi_head_attention_forward, or Mamba's dt_proj). Leave this "
                "layer out of target_modules (name the others instead of \"all-linear\")")


def watch_direct_weight_use(model: nn.Module) -> None:
    """Make a forward that computes with a nested layer's `.weight` (its base weight) without calling the layer a
    RuntimeError, rather than outputs without its delta. Only parents whose class source reads `self.<child>.weight`
    are watched (hooks on the parent and the layer; T5's feed-forward reads `wo.weight.dtype` and then calls `wo`,
    which passes); the others run with no hook."""
    for parent in model.modules():
        src = None
        for child, m in parent._modules.items():
            if not isinstance(m, NestedLoRALayer):
                continue
            src = _class_source(type(parent)) if src is None else src
            if not re.search(rf"self\.{re.escape(child)}\.weight\b", src):
                continue
            readers = parent.__dict__.setdefault("_weight_readers", set())
            readers.add(child)
            if _watch_start not in parent._forward_pre_hooks.values():
                parent.register_forward_pre_hook(_watch_start)
                parent.register_forward_hook(_watch_end)
            if _watch_call not in m._forward_pre_hooks.values():
                m.register_forward_pre_hook(_watch_call)


def mark_modules_to_save(model: nn.Module, modules_to_save: Iterable[str] | None) -> list[str]:
    """Unfreeze whole modules (e.g. a classifier head) named by suffix; a string is one name (or a comma list)."""
    if isinstance(modules_to_save, str):
        modules_to_save = parse_names(modules_to_save, "modules_to_save")
    found = []
    for suffix in modules_to_save or ():
        hits = [n for n, _ in model.named_modules() if n == suffix or n.endswith("." + suffix)]
        if not hits:
            # the model's own module names: not a NestedLoRALayer's parts (base_layer, lora_A, lora_B, lora_dropout)
            inner = {f"{n}.{sub}" for n, m in model.named_modules() if isinstance(m, NestedLoRALayer)
                     for sub, _ in m.named_modules() if sub}
            names = sorted({n.split(".")[-1] for n, _ in model.named_modules() if n and n not in inner})
            close = difflib.get_close_matches(suffix.split(".")[-1], names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"modules_to_save: {suffix!r} matched no module{hint}; module names end with "
                             f"{names[:40]}")
        for n in hits:
            packed = [(f"{n}.{sn}" if sn else n, why) for sn, sm in model.get_submodule(n).named_modules()
                      if isinstance(getattr(sm, "weight", None), torch.Tensor) and (why := packed_weight(sm))]
            if packed:  # (requires_grad_ raised a bare "only Tensors of floating point dtype can require gradients")
                raise ValueError(
                    f"modules_to_save: {packed[0][0]!r} has a quantized weight ({packed[0][1]}), whose packed "
                    f"integers cannot train. Load the model with the head in full precision: BitsAndBytesConfig(..., "
                    f"llm_int8_skip_modules=[{suffix!r}]) (transformers keeps only the output embeddings out of "
                    f"quantization by itself, not a classifier head)")
            for p in model.get_submodule(n).parameters():
                p.requires_grad_(True)
        found += hits
    return found


def lora_layers(model: nn.Module) -> dict[str, NestedLoRALayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, NestedLoRALayer)}


def set_rank(adapters: dict[str, NestedLoRALayer] | Iterable[NestedLoRALayer], rank: int) -> None:
    for layer in adapters.values() if isinstance(adapters, dict) else adapters:
        layer.set_rank(rank)


def trained_state_keys(model: nn.Module, names: Iterable[str]) -> set[str]:
    """Of the state-dict `names` of `model`, those training changes, which an adapter-only checkpoint keeps
    (`lora_state_dict`, `adapter_only_saves`): every nested block (active or paused) and every `_extra_state` (each
    layer's rank), every parameter that requires grad (`modules_to_save` heads and anything else that trains) and
    the buffers of the modules such parameters sit on, the running statistics of every batch norm (a frozen one's
    forward in training mode updates them), and the embeddings and output layer of a model whose vocabulary
    `resize_token_embeddings` changed after setup (their new rows exist nowhere else)."""
    suffix = "." + nn.modules.module._EXTRA_STATE_KEY_SUFFIX
    keep_ids = set()
    owners = set()  # names of modules holding a parameter that trains: their buffers go too
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        if any(p.requires_grad for p in mod.parameters(recurse=False)):
            owners.add(mod_name)
        if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.track_running_stats:
            owners.add(mod_name)  # its running mean and variance move in training, its weights frozen or not
        if isinstance(mod, NestedLoRALayer):
            keep_ids.update(id(p) for p in mod.lora_parameters())
        if getattr(mod, "_unified_lora_resized_vocab", False):
            for emb in (mod.get_input_embeddings(), mod.get_output_embeddings()):
                if emb is not None:
                    keep_ids.update(id(p) for p in emb.parameters())
    params = dict(model.named_parameters(remove_duplicate=False))
    keep = {n for n, p in params.items() if p.requires_grad or id(p) in keep_ids}
    return {k for k in names if k in keep or k.endswith(suffix) or ".lora_A." in k or ".lora_B." in k
            or (k not in params and k.rpartition(".")[0] in owners)}


def lora_state_dict(model: nn.Module) -> dict:
    """What training changes, which a checkpoint must keep (`trained_state_keys`): every nested block (active or
    paused), each nested layer's `_extra_state` (its active rank; a multi-task layer's task topology and registry
    too) and every other parameter that trains (a `modules_to_save` head, with its module's buffers).
    `model.load_state_dict(sd, strict=False)` puts them back as they were saved: without the extra state, an
    adapter saved at rank 4 (or after a multi-task split) reloaded at the fresh model's rank (on the shared
    adapter), and without the head a fresh model's newly initialised one, with other outputs, silently.
    Under FSDP2 (`fully_shard`) the sharded tensors are all-gathered into full ones: a collective, so call it on
    every process (as torch's `get_model_state_dict(full_state_dict=True)`)."""
    suffix = "." + nn.modules.module._EXTRA_STATE_KEY_SUFFIX
    layers = {n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, NestedLoRALayer)}
    full = model.state_dict(keep_vars=True)
    keep = trained_state_keys(model, full)
    # other modules' extra state (any object, which safetensors cannot save) stays out; the layers' is their rank.
    # A tensor under several names (GPT-2's lm_head tied to its wte, a trained `modules_to_save` lm_head) is kept
    # under its first, as `named_parameters()` names it: safetensors refuses tensors that share memory, and a load
    # of that name fills the tied ones too
    sd, seen = {}, set()
    for k, v in full.items():
        if k in keep and (not k.endswith(suffix) or k[:-len(suffix)] in layers) and id(v) not in seen:
            seen.add(id(v))
            sd[k] = v.detach() if isinstance(v, torch.Tensor) else v
    # FSDP2: each process holds a shard of each block and head; saved as it is, a shard would load as a whole one
    return {k: (v.full_tensor() if local_tensor(v) is not v else v) for k, v in sd.items()}


def tied_base_weights(model: nn.Module, layers: dict[str, NestedLoRALayer] | None = None) -> dict[str, list[str]]:
    """{adapter name: the other names of its base weight} for every nested layer whose frozen base weight is
    tied to another module's parameter (GPT-2's `lm_head` and `transformer.wte`). Folding a delta into such a
    weight in place changes the other module as well."""
    names = parameter_names(model)
    layer_names = module_names(model)  # a layer shared by two parents: its weight's names under both are its own
    tied = {}
    for name, layer in (lora_layers(model) if layers is None else layers).items():
        own = {f"{a}.base_layer.weight" if a else "base_layer.weight" for a in layer_names.get(id(layer)) or [name]}
        others = [n for n in names.get(id(layer.base_layer.weight), ()) if n not in own]
        if others:
            tied[name] = others
    return tied


def merge_adapters(model: nn.Module) -> None:
    """Fold every nested layer's active delta into its base weight, in place (`unmerge_adapters` undoes it). A
    base weight tied to another module's parameter is refused: the in-place fold would change that module too."""
    layers = lora_layers(model)
    tied = tied_base_weights(model, layers)
    if tied:
        shown = "; ".join(f"{n!r} is also {', '.join(map(repr, o))}" for n, o in tied.items())
        raise ValueError(f"merge_adapters: tied base weights ({shown}): merging in place would add the delta to "
                         "the tied module too. Use unified_lora.peft_io.merge_and_unload(model), which gives such "
                         "a layer its own merged weight, or untie the weights before merging")
    for layer in layers.values():  # every layer first, so that a refusal leaves none merged
        layer.check_mergeable()
    for layer in layers.values():
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All parameters the optimizer must hold: every LoRA block (paused ones
    included, so they train again when their rank returns) and modules_to_save."""
    return [p for p in model.parameters() if p.requires_grad]
