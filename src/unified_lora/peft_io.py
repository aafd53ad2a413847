"""PEFT interop: export nested adapters as PEFT LoRA checkpoints, import PEFT
checkpoints into nested layers, merge-and-unload, and a fixed-rank controller
for an existing PEFT model.

The on-disk format is written by PEFT itself: `export_peft_adapter` builds a
real `LoraConfig`, wraps a weightless (meta-device) skeleton of the model with
`get_peft_model`, and calls PEFT's `save_pretrained` with our tensors as the
state dict. Key names (`base_model.model.<module>.lora_A.weight`, head weights
of `modules_to_save`), `adapter_config.json` fields and the safetensors file
therefore are exactly what `PeftModel.from_pretrained` expects, in whatever
PEFT version is installed. `import_peft_adapter` reads with PEFT's own
`LoraConfig.from_pretrained` and `load_peft_weights`.

Scaling. PEFT's scaling is `lora_alpha / r` (or `lora_alpha / sqrt(r)` with
`use_rslora`). At an exported rank r ours maps exactly:

    alpha_over_r      alpha / r        -> lora_alpha = alpha
    max_rank_over_r   max_rank / r     -> lora_alpha = max_rank
    rslora            alpha / sqrt(r)  -> lora_alpha = alpha, use_rslora = True
    alpha_over_max_rank  alpha / max_rank -> lora_alpha = alpha * r / max_rank
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import itertools
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from ._files import folder_written_atomically
from .config import ActuatorConfig, NestedLoRAConfig, check_rank_levels
from .controller import UnifiedController, _refuse_ignored
from .layer import NestedLoRALayer, packed_weight
from .model import (_replace, inject_nested_lora, keep_4bit_layers_differentiable, lora_layers, module_names,
                    parameter_names, refuse_repacked_4bit, tied_base_weights)
from .mirror import watch_state_dict

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_UNSUPPORTED_KEYS = ("lora_embedding_", "lora_magnitude_vector", "lora_B.bias", "lora_A.bias")
DEFAULT_RANK_LEVELS = (4, 8, 16)
# init_lora_weights values whose initialisation rewrites the base weights (PEFT's pissa_init, olora_init, ...)
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


# ----------------------------------------------------------------------------- helpers
def infer_task_type(model: nn.Module) -> str | None:
    """PEFT task type from a transformers class name (None: plain `PeftModel`). A class in transformers' causal-LM
    or seq2seq-LM auto mapping takes that task, as PEFT's `AutoPeftModelForCausalLM` / `...ForSeq2SeqLM` check it
    (`Gemma3ForConditionalGeneration` is a causal LM, `MarianMTModel` a seq2seq one); another
    `...ForConditionalGeneration` is a seq2seq LM only if its config says it is an encoder-decoder (a decoder-only
    vision-language model such as `LlavaForConditionalGeneration` is a causal LM)."""
    name = type(model).__name__
    from transformers.models.auto import modeling_auto

    for mapping, task in ((modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "CAUSAL_LM"),
                          (modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, "SEQ_2_SEQ_LM")):
        if any(name == v or (isinstance(v, (tuple, list)) and name in v) for v in mapping.values()):
            return task
    if name.endswith("ForConditionalGeneration"):
        config = getattr(model, "config", None)
        get_text = getattr(config, "get_text_config", None)
        try:
            text = get_text(decoder=True) if callable(get_text) else config
        except TypeError:  # a transformers whose get_text_config takes no `decoder` (not checked offline at 4.45)
            text = get_text()
        encdec = getattr(config, "is_encoder_decoder", False) or getattr(text, "is_encoder_decoder", False)
        return "SEQ_2_SEQ_LM" if encdec else "CAUSAL_LM"
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM")):
        if name.endswith(suffix):
            return task
    if name.endswith("Model"):
        return "FEATURE_EXTRACTION"
    return None


def _select_layers(model: nn.Module, adapters) -> dict[str, NestedLoRALayer]:
    """{module name in `model`: layer}; names always come from `model` itself."""
    found = lora_layers(model)
    if not found:
        raise ValueError("model: has no NestedLoRALayer; inject adapters first "
                         "(inject_nested_lora / setup_unified_lora)")
    if adapters is None:
        return found
    wanted = {id(a) for a in (adapters.values() if isinstance(adapters, dict) else adapters)}
    chosen = {n: m for n, m in found.items() if id(m) in wanted}
    if len(chosen) != len(wanted):
        raise ValueError("adapters: some of the given layers are not inside `model`")
    return chosen


def _dropout_p(layer: NestedLoRALayer) -> float:
    return float(layer.lora_dropout.p) if isinstance(layer.lora_dropout, nn.Dropout) else 0.0


def _peft_alpha(layer: NestedLoRALayer, rank: int) -> tuple[float, bool]:
    """(lora_alpha, use_rslora) giving PEFT's scaling == ours at `rank`."""
    if layer.scaling_kind == "alpha_over_r":
        return layer.lora_alpha, False
    if layer.scaling_kind == "max_rank_over_r":
        return float(layer.max_rank), False
    if layer.scaling_kind == "rslora":
        return layer.lora_alpha, True
    if layer.scaling_kind == "alpha_over_max_rank":
        return layer.lora_alpha * rank / layer.max_rank, False
    raise ValueError(f"scaling: unknown kind {layer.scaling_kind!r}")


def _most_common(values):
    """The most frequent value (the largest among equally frequent ones)."""
    counts = collections.Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def _nice(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _trainable_modules(model: nn.Module) -> tuple[list[str], list[str]]:
    """(outermost modules owning trainable non-LoRA parameters other than a lone bias (e.g. a classifier head):
    PEFT's modules_to_save; modules whose only trainable parameter is their bias: PEFT's `bias` option).

    A module inside another listed one is left out: PEFT saves a module whole (`ModulesToSaveWrapper`), and a
    wrapper inside a wrapper writes keys that `PeftModel.from_pretrained` cannot load (RoBERTa's head is
    `classifier.dense` + `classifier.out_proj`, saved as `classifier`). A nested layer's trained base bias (an
    imported `bias="lora_only"` or `"all"` checkpoint) is listed under its layer's name."""
    layers = lora_layers(model)
    factors = {id(p) for m in layers.values() for p in m.lora_parameters()}
    # a trainable base weight of a nested layer: that layer is saved whole (its delta merged in)
    owner = {id(p): ln for ln, m in layers.items() for p in m.base_layer.parameters()}
    leaves: dict[str, set[str]] = {}
    for n, p in model.named_parameters():
        if p.requires_grad and id(p) not in factors:
            mod = owner.get(id(p), n.rpartition(".")[0])
            if not mod:
                raise ValueError(f"modules_to_save: trainable parameter {n!r} sits on the model root; "
                                 "PEFT can only save whole submodules")
            leaves.setdefault(mod, set()).add(n.rpartition(".")[2])
    whole = _outermost([m for m, ls in leaves.items() if ls != {"bias"}])
    return whole, [m for m, ls in leaves.items() if ls == {"bias"} and not any(_inside(m, w) for w in whole)]


def _inside(path: str, outer: str) -> bool:
    """`path` is the module `outer` or one of its descendants."""
    return path == outer or path.startswith(outer + ".")


def _tied_outside(model: nn.Module, saved: Sequence[str]) -> list[str]:
    """Modules outside `saved` that hold a parameter of a module in `saved` (a tied lm_head of a saved embedding)."""
    out = []
    for group in parameter_names(model).values():
        if len(group) > 1 and any(any(_inside(n, s) for s in saved) for n in group):
            out += [n.rpartition(".")[0] for n in group if not any(_inside(n, s) for s in saved)]
    return list(dict.fromkeys(out))


def _registered_twice(model: nn.Module, names) -> str:
    """For those of `names` whose module is registered in two parents (one module under two names, which PEFT wraps
    under its first name only): "'a' is also 'b'; ...", or "" when there is none."""
    aliases = module_names(model)
    by_name = {a: i for i, ns in aliases.items() for a in ns}
    shared = {n: [a for a in aliases[by_name[n]] if a != n] for n in names
              if n in by_name and len(aliases[by_name[n]]) > 1}
    return "; ".join(f"{n!r} is also {', '.join(map(repr, o))}" for n, o in sorted(shared.items()))


def _outermost(paths: Sequence[str]) -> list[str]:
    """`paths` (in order, without repeats) less those inside another one."""
    uniq = list(dict.fromkeys(paths))
    return [p for p in uniq if not any(q != p and _inside(p, q) for q in uniq)]


# Heads that PEFT's task types put into modules_to_save on their own (PeftModelForSequenceClassification,
# ...ForTokenClassification, ...ForQuestionAnswering extend the config's list with these names). They are
# also the heads `from_pretrained` initialises afresh when the base checkpoint has none.
def _peft_classifier_heads() -> tuple[str, ...]:
    """PEFT's own list for sequence and token classification (`peft.peft_model.CLASSIFIER_MODULE_NAMES`, from PEFT
    0.22, which added DistilBERT's `pre_classifier`); before 0.22 PEFT named ("classifier", "score") inline."""
    try:
        from peft.peft_model import CLASSIFIER_MODULE_NAMES
    except ImportError:
        return ("classifier", "score")
    return tuple(CLASSIFIER_MODULE_NAMES)


_PEFT_TASK_HEADS = {"SEQ_CLS": _peft_classifier_heads(), "TOKEN_CLS": _peft_classifier_heads(),
                    "QUESTION_ANS": ("qa_outputs",)}


def _peft_matches(model: nn.Module, names: Sequence[str]) -> list[str]:
    """The module paths PEFT wraps for modules_to_save `names` (its rule: the path ends with the name)."""
    paths = [p for p, _ in model.named_modules(remove_duplicate=False) if p and any(p.endswith(n) for n in names)]
    return list(dict.fromkeys(paths))


def _task_heads(model: nn.Module) -> list[str]:
    """Paths of the model's task head(s) (`classifier`, `score`, `qa_outputs` by its class), outermost only. An
    image classifier (ViT, Swin, ConvNeXt, ...: no PEFT task type) has its `classifier` head, which
    `from_pretrained` initialises afresh for new labels, as a text classifier's."""
    heads = _PEFT_TASK_HEADS.get(infer_task_type(model), ())
    if not heads and type(model).__name__.endswith("ForImageClassification"):
        heads = ("classifier",)
    return _outermost([p for p, _ in model.named_modules() if p and any(p == h or p.endswith("." + h) for h in heads)])


def _plan_modules_to_save(model: nn.Module, requested: Sequence[str], task_type: str | None,
                          lora_names: Sequence[str]) -> tuple[list[str] | None, list[str], list[str]]:
    """(names for LoraConfig.modules_to_save, module paths PEFT will save whole, nested layers inside them).

    PEFT adds its task type's heads to modules_to_save itself, matches every name as a path suffix, and
    never puts LoRA on a module inside one it saves whole. Here every name becomes the paths it matches;
    paths inside another saved path are dropped (their weights are in the outer module's), as are the
    ones PEFT adds itself. A nested layer inside a saved module is saved there with its delta merged.
    """
    added = list(_PEFT_TASK_HEADS.get(task_type, ())) if task_type else []
    saved = _outermost(_peft_matches(model, list(requested) + added))
    by_peft = set(_peft_matches(model, added))
    inner = sorted(by_peft - set(saved))
    if inner:
        raise ValueError(f"modules_to_save: task_type={task_type!r} makes PEFT save {inner} whole, but they sit inside "
                         "other modules_to_save, and PEFT cannot save a module inside another; save the outer module "
                         "only, or pass task_type=None")
    names = [p for p in saved if p not in by_peft]
    extra = sorted(set(_peft_matches(model, names + added)) - set(saved))
    if extra:  # a full path that is also the suffix of another module's path
        raise ValueError(f"modules_to_save: PEFT matches names as path suffixes, so saving {names} would also save "
                         f"{extra}; PEFT cannot express this set of modules")
    absorbed = [n for n in lora_names if any(_inside(n, s) for s in saved)]
    return names or None, saved, absorbed


@torch.no_grad()
def _merged_weight(layer: NestedLoRALayer, rank: int) -> torch.Tensor:
    """The base weight with the delta at `rank` folded in, in the weight's dtype (summed in float64)."""
    w = layer.base_layer.weight
    packed = packed_weight(layer.base_layer)
    if packed:
        raise ValueError(f"modules_to_save: a nested layer on a quantized base ({packed}) sits inside a module the "
                         "PEFT checkpoint saves whole, which would need the delta folded into its packed weight; "
                         "pass modules_to_save without that module, or export from the base loaded in bf16/fp32")
    if layer.merged_rank == rank:  # exactly the weight the merged layer computes with
        return w.detach().clone()

    def delta(r: int) -> torch.Tensor:
        d = _scaling_at(layer, r) * (layer.full_B()[:, :r].double() @ layer.full_A()[:r].double())
        return d.T if layer.fan_in_fan_out else d

    W = w.detach().double()
    if layer.merged_rank:
        W = W - delta(layer.merged_rank)
    return (W + delta(rank)).to(w.dtype)


def _meta_skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers live on the meta device (no memory)."""
    memo: dict = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) not in memo:
            mt = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(mt, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else mt
    skel = copy.deepcopy(model, memo)
    for name, layer in lora_layers(skel).items():  # PEFT must see the plain base layers
        base = layer.base_layer
        if packed_weight(base):  # a quantized base (bitsandbytes 4/8-bit), whose packed weight and quant state the
            # skeleton does not keep: PEFT's bnb LoRA layer would read them; its keys are a Linear's, so a Linear
            base = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        _replace(skel, name, base)
    return skel


# ----------------------------------------------------------------------------- export
@torch.no_grad()
def export_peft_adapter(
    model: nn.Module,
    adapters,
    save_dir: str | os.PathLike,
    rank: int | None = None,
    base_model_name_or_path: str | None = None,
    *,
    task_type: str | None = "auto",
    modules_to_save: Sequence[str] | str | None = "auto",
) -> dict:
    """Write the nested adapters at rank `rank` as a PEFT LoRA checkpoint.

    `adapters`: None (every NestedLoRALayer in `model`), or a dict/list of layers.
    `rank`: a nested level of every layer (default: each layer's current rank;
    layers at different ranks, as after importing a checkpoint with PEFT's
    `rank_pattern`, are written with a `rank_pattern`, and layers whose PEFT
    `lora_alpha` differs with an `alpha_pattern`, keyed by full module name).
    `task_type`: PEFT task type ("CAUSAL_LM", "SEQ_CLS", ...); "auto" infers it
    from the model class. `modules_to_save`: module names saved whole; "auto"
    takes the outermost modules with trainable non-LoRA parameters (e.g.
    `classifier`) and the model's task head (`classifier`, `score` or
    `qa_outputs`, as PEFT's task types do), so the adapter carries a head that
    `from_pretrained` initialises afresh. Returns the adapter config as a dict.
    The result loads with `PeftModel.from_pretrained(base_model, save_dir)` and
    reproduces our outputs.

    PEFT never puts LoRA on a module it saves whole. A nested layer inside one
    (a classifier that is a LoRA target, whose frozen base weights a fresh base
    model would not have) is written as that module's weight with the delta at
    `rank` merged in: same outputs, to float rounding of the merged sum.

    The export appears whole or not at all: the files are written into a
    temporary folder inside `save_dir`, flushed to the disk, then renamed over
    the previous export's, `adapter_config.json` last. An error or interrupt
    while writing leaves a previous export in `save_dir` as it was; other files
    there (tokenizer files, your README.md, which PEFT amends with its
    model-card fields) are kept.
    """
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import AuxiliaryTrainingWrapper

    from .distributed import refuse_sharded, unwrap_model

    model = unwrap_model(model)  # a DDP wrapper's names (`module.q_proj`) would match nothing in a fresh base model
    refuse_sharded(model, "export_peft_adapter")
    layers = _select_layers(model, adapters)
    split = sorted(n for n, m in layers.items() if getattr(m, "topology", "shared") == "task")
    if split:  # the shared blocks rest in MULTI/MIRROR: exported, they would reproduce no task's outputs
        raise ValueError(f"export_peft_adapter: the multi-task layers ({split[:3]}{' ...' if len(split) > 3 else ''}) "
                         "run each task's own adapter (MULTI/MIRROR), and the shared adapter they hold is not what "
                         "the model computes for any task. Use unified_lora.multitask.export_task_peft_adapters("
                         "model, save_dir): one PEFT checkpoint per task (and the shared one)")
    ranks = {n: int(m.rank if rank is None else rank) for n, m in layers.items()}  # each layer's exported rank
    for n, m in layers.items():
        if ranks[n] not in m.boundaries:
            raise ValueError(f"rank: {ranks[n]} is not a nested level of {n!r} (levels {m.boundaries}); "
                             f"a PEFT export must cut at a block boundary")
    if task_type == "auto":
        task_type = infer_task_type(model)
    skel = _meta_skeleton(model)  # the modules as PEFT sees them (nested layers replaced by their base layers)
    heads = _task_heads(skel)
    explicit = not (isinstance(modules_to_save, str) and modules_to_save == "auto")
    trainable, biased = _trainable_modules(model)
    if not explicit:
        requested = trainable + heads
    else:
        requested = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save or [])
    mts_names, saved, absorbed = _plan_modules_to_save(skel, requested, task_type, list(layers))
    tied = _tied_outside(skel, saved)
    if tied:  # PEFT saves (and trains) a copy of each module: a module tied to a saved one needs its own copy
        mts_names, saved, absorbed = _plan_modules_to_save(skel, list(requested) + tied, task_type, list(layers))
    targets = {n: m for n, m in layers.items() if n not in absorbed}
    if not targets:
        raise ValueError(f"adapters: every nested layer ({sorted(layers)}) sits inside a module that the PEFT "
                         f"checkpoint saves whole ({saved}: PEFT puts no LoRA on such a module), so no LoRA weight "
                         "would be left to write. Use merge_and_unload(model) and save the model instead")
    shared = _registered_twice(model, targets)
    if shared:
        raise ValueError(f"adapters: a nested layer is one module registered in two parents ({shared}). PEFT wraps "
                         "a module under its first name only, so the loaded PEFT model would run the others "
                         "without the delta and give other outputs. Use merge_and_unload(model) and save the "
                         "model instead, or save model.state_dict() of the wrapped model")
    uncarried = [h for h in heads if not any(_inside(h, s) for s in saved)]
    if uncarried:
        warnings.warn(
            f"export_peft_adapter: the task head {uncarried} is not saved whole (task_type={task_type!r}, "
            f"modules_to_save={modules_to_save!r}), so the adapter reproduces this model's outputs only on a base "
            "model whose head weights equal these, not on one whose head from_pretrained initialises afresh; "
            "leave modules_to_save='auto' to carry it", UserWarning, stacklevel=2)
    # trained biases outside the modules saved whole: PEFT's bias="lora_only" if all sit on LoRA targets, else "all"
    biased = [m for m in biased if not any(_inside(m, s) for s in saved)]
    bias = "none" if not biased else "lora_only" if set(biased) <= set(targets) else "all"
    alphas = {n: _peft_alpha(m, ranks[n]) for n, m in targets.items()}
    rslora = {u for _, u in alphas.values()}
    drops = {_dropout_p(m) for m in targets.values()}
    if len(rslora) != 1 or len(drops) != 1:
        raise ValueError(f"adapters: layers differ in rsLoRA scaling or dropout {drops}; "
                         "one PEFT config cannot express that - export them separately")
    (use_rslora,), (dropout,) = rslora, drops
    # the most common rank and alpha are the config's r and lora_alpha; the others go into PEFT's patterns
    r_top = _most_common(ranks[n] for n in targets)
    alpha_top = _most_common(a for a, _ in alphas.values())
    rank_pattern = {n: ranks[n] for n in sorted(targets) if ranks[n] != r_top}
    alpha_pattern = {n: _nice(alphas[n][0]) for n in sorted(targets) if alphas[n][0] != alpha_top}
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None

    config = LoraConfig(
        r=r_top,
        lora_alpha=_nice(alpha_top),
        use_rslora=use_rslora,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        lora_dropout=dropout,
        target_modules=sorted(targets),  # exact module names
        fan_in_fan_out=any(m.fan_in_fan_out for m in targets.values()),
        modules_to_save=mts_names,
        task_type=task_type,
        bias=bias,
        base_model_name_or_path=base_model_name_or_path,
    )
    # PEFT initialises the LoRA weights of the skeleton from torch's CPU generator: forked, so that an export during
    # training (train --save-best, peft_every_checkpoint) leaves the run's random numbers (dropout) as they were
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")  # PEFT warns about fan_in_fan_out per Conv1D / Linear mix and meta weights
        peft_skel = get_peft_model(skel, config)
    peft_skel.peft_config["default"].base_model_name_or_path = base_model_name_or_path
    wrapped = {n[len(_PREFIX):] for n, m in peft_skel.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)}
    if wrapped != set(saved):
        raise RuntimeError(f"PEFT saves {sorted(wrapped)} whole, expected {sorted(saved)}")

    # Our tensors under PEFT's own state-dict keys; PEFT's save_pretrained renames and filters them.
    ours = dict(model.state_dict())
    nested = lora_layers(model)
    from peft.tuners.lora import LoraLayer

    for name, m in peft_skel.named_modules():  # PEFT's r and scaling for each module: exactly ours
        mod = name[len(_PREFIX):]
        if isinstance(m, LoraLayer) and mod in targets and (
                m.r.get("default") != ranks[mod]
                or not math.isclose(m.scaling["default"], _scaling_at(targets[mod], ranks[mod]), rel_tol=1e-12)):
            raise RuntimeError(f"PEFT gives {mod!r} r={m.r.get('default')}, scaling={m.scaling.get('default')}; "
                               f"ours: r={ranks[mod]}, scaling={_scaling_at(targets[mod], ranks[mod])}")
    A = {n: m.full_A()[:ranks[n]].detach().clone() for n, m in targets.items()}
    B = {n: m.full_B()[:, :ranks[n]].detach().clone() for n, m in targets.items()}
    sd = {}
    for key in peft_skel.state_dict():
        path = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if ".lora_A." in path or ".lora_B." in path:
            mod, ab = (path.split(".lora_A.")[0], A) if ".lora_A." in path else (path.split(".lora_B.")[0], B)
            if mod not in ab:
                raise RuntimeError(f"PEFT created a LoRA layer {mod!r} that is not one of ours")
            sd[key] = ab[mod]
        elif ".modules_to_save." in path:
            wrapper, _, rest = path.partition(".modules_to_save.")
            full = f"{wrapper}.{rest.partition('.')[2]}"  # without the adapter name
            mod, _, leaf = full.rpartition(".")
            layer = nested.get(mod)
            if layer is not None:  # a nested layer inside a module saved whole: its delta merged in
                if leaf == "weight":
                    sd[key] = _merged_weight(layer, ranks.get(mod, layer.rank))
                else:
                    sd[key] = getattr(layer.base_layer, leaf).detach().clone()
            elif full in ours:
                sd[key] = ours[full].detach().clone()
            else:
                raise ValueError(f"modules_to_save: {full!r} has no counterpart in the model")
        elif bias != "none" and path.rpartition(".")[2] == "bias" and ".original_module." not in path:
            # PEFT's bias option keeps the biases it wants; a saved module's original copy keeps the base's
            mod = path.rpartition(".")[0]
            value = ours.get(path, ours.get(f"{mod}.base_layer.bias"))  # a nested layer PEFT does not target
            if value is None:
                raise ValueError(f"bias: {path!r} has no counterpart in the model")
            sd[key] = value.detach().clone()
    missing = set(targets) - {k.split(".lora_A.")[0][len(_PREFIX):] for k in sd if ".lora_A." in k}
    if missing:
        raise RuntimeError(f"PEFT did not target {sorted(missing)}")
    # PEFT writes README.md, then the weights, then the config, in place: an interrupt (Ctrl-C, a full disk) left a
    # half-written adapter_model.safetensors, or new weights beside the previous export's config, which PEFT loaded
    # silently. Written into a temporary folder first, the files replace the old ones only once all are whole, the
    # config last (a kill during those renames leaves no config: PEFT refuses the folder); the user's own files stay
    with folder_written_atomically(save_dir, "adapter_config.json", keep=["README.md"]) as tmp:
        peft_skel.save_pretrained(tmp, state_dict=sd, save_embedding_layers=False)
        with open(os.path.join(tmp, "adapter_config.json")) as f:
            return json.load(f)


# ----------------------------------------------------------------------------- import
@dataclass
class ImportedAdapter:
    """What `import_peft_adapter` loaded."""

    adapters: dict[str, NestedLoRALayer]
    rank: int
    modules_to_save: list[str]
    extra_params: list[nn.Parameter]
    peft_config: object = field(repr=False)

    def controller(self, optimizer=None, mode_ranks: Sequence[int] | None = None, **kwargs) -> UnifiedController:
        """A `UnifiedController` over the imported layers that starts (MULTI) at the imported rank."""
        levels = next(iter(self.adapters.values())).boundaries
        if mode_ranks is None:
            mode_ranks = (levels[0], self.rank, levels[-1])
        lr_mode = kwargs.pop("lr_mode", "multiplier")
        actuators = kwargs.pop("actuators", None) or ActuatorConfig(mode_ranks=mode_ranks, lr_mode=lr_mode)
        return UnifiedController(adapters=self.adapters, optimizer=optimizer, actuators=actuators,
                                 extra_params=self.extra_params, **kwargs)


def _peft_scaling(config, name: str, r: int) -> float:
    from peft.utils.other import get_pattern_key

    alpha = config.lora_alpha
    if getattr(config, "alpha_pattern", None):
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), alpha)
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def _check_supported(config) -> None:
    if str(getattr(config, "peft_type", "")).split(".")[-1] != "LORA":
        raise ValueError(f"peft_dir: not a LoRA checkpoint (peft_type={config.peft_type})")
    for flag in ("use_dora", "lora_bias", "use_qalora"):
        if getattr(config, flag, False):
            raise ValueError(f"peft_dir: {flag}=True is not supported by nested LoRA layers")
    init = getattr(config, "init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise ValueError(
            f"peft_dir: init_lora_weights={init!r} subtracts its initial adapter from the base weights, and PEFT redoes "
            "that on the base model when it loads this checkpoint; nested layers add lora_A/lora_B to the base weights "
            "as they are, which gives other outputs. Save the adapter as plain LoRA with PEFT first: "
            "save_pretrained(dir, path_initial_model_for_weight_conversion=<the adapter saved before training>)")
    # LoRA variants (aLoRA, KaSA, BD-LoRA, Arrow, ...) compute something else with the same lora_A/lora_B keys
    for f in dataclasses.fields(config):
        value = getattr(config, f.name, None)
        if f.metadata.get("is_lora_variant") and value:
            raise ValueError(f"peft_dir: {f.name}={value!r} selects a LoRA variant whose outputs plain nested LoRA "
                             "layers do not reproduce; it is not supported")
    for name, what in (("target_parameters", "LoRA on raw parameters, as for MoE experts"),
                       ("trainable_token_indices", "trainable embedding tokens"),
                       ("layer_replication", "replicated layers")):
        if getattr(config, name, None):
            raise ValueError(f"peft_dir: {name}={getattr(config, name)!r} ({what}) is not supported; nested layers "
                             "take LoRA on Linear/Conv1D modules named in target_modules only")


@torch.no_grad()
def import_peft_adapter(
    model: nn.Module,
    peft_dir: str | os.PathLike,
    *,
    rank_levels: Sequence[int] | None = None,
    max_rank: int | None = None,
    strict: bool = True,
    autocast_adapter_dtype: bool = True,
) -> ImportedAdapter:
    """Load a PEFT LoRA checkpoint into nested layers, so training continues under the controller.

    `model` is either a plain base model (nested layers are injected on the
    checkpoint's modules with `rank_levels`, default (4, 8, 16), and a scaling
    that equals PEFT's) or a model that already has nested layers (the
    checkpoint's modules must be among them). The checkpoint's r must be a
    nested level: nested blocks can hold a prefix of size r only at a block
    boundary. Where a layer's scaling differs from PEFT's, the ratio is folded
    into B so outputs still match. Blocks above r keep A and get B = 0.
    `modules_to_save` weights (e.g. a classifier head) and biases trained under
    PEFT's `bias` option are loaded and unfrozen; embedding weights written by
    PEFT's `save_embedding_layers` (a targeted `lm_head`'s base weight) are loaded
    and stay frozen, as `PeftModel.from_pretrained` leaves them.
    With `strict`, nested layers the checkpoint does not cover are an error.
    A checkpoint with per-module ranks (`rank_pattern`) loads each layer at its
    own r; `ImportedAdapter.rank` is then the largest, and a controller built on
    it sets one rank for all layers (which changes their scaling, as any rank
    switch does). `autocast_adapter_dtype` (PEFT's `from_pretrained` option, same
    default) applies to injected layers: fp32 blocks on a bf16/fp16 base, so an
    fp32 checkpoint loads without rounding; existing layers keep their dtype.
    Injected layers take the train/eval mode of the modules they replace, so a
    model in eval mode (as `from_pretrained` returns it) applies no LoRA dropout.
    """
    from peft import LoraConfig
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, load_peft_weights

    peft_dir = str(peft_dir)
    if not os.path.isfile(os.path.join(peft_dir, "adapter_config.json")):
        subs = sorted(d for d in os.listdir(peft_dir) if os.path.isfile(os.path.join(peft_dir, d, "adapter_config.json"))) \
            if os.path.isdir(peft_dir) else []
        raise ValueError(f"peft_dir: {peft_dir!r} has no adapter_config.json" + (
            f"; PEFT saves an adapter not named 'default' in a subfolder: pass one of {subs}" if subs else ""))
    config = LoraConfig.from_pretrained(peft_dir)
    _check_supported(config)
    # PEFT's loader takes a folder without a weights file for a Hub repo id and goes online for it
    files = [f for f in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME) if os.path.isfile(os.path.join(peft_dir, f))]
    if not files:
        raise ValueError(f"peft_dir: {peft_dir!r} has adapter_config.json but no {SAFETENSORS_WEIGHTS_NAME} or "
                         f"{WEIGHTS_NAME}; copy the adapter's weights file beside its config")
    try:
        weights = load_peft_weights(peft_dir, device="cpu")
    except Exception as e:  # a truncated or corrupted file: safetensors says only "header too small"
        raise ValueError(f"peft_dir: cannot read {os.path.join(peft_dir, files[0])!r} ({type(e).__name__}: {e}); "
                         "the file is damaged or incomplete: save or download the adapter again") from e

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, t in weights.items():
        if any(u in key for u in _UNSUPPORTED_KEYS):
            raise ValueError(f"peft_dir: {key!r} is not a plain Linear LoRA weight (embedding LoRA, DoRA and "
                             "LoRA biases are not supported)")
        m = _LORA_KEY.match(key)
        if m:
            pairs.setdefault(m["mod"], {})[m["ab"]] = t
        elif key.startswith(_PREFIX):
            others[key[len(_PREFIX):]] = t
        else:
            raise ValueError(f"peft_dir: unexpected key {key!r}")
    if not pairs:
        raise ValueError(f"peft_dir: {peft_dir!r} holds no lora_A/lora_B weights")
    for mod, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"peft_dir: module {mod!r} lacks lora_{'B' if 'A' in ab else 'A'}")
    ranks = {mod: ab["A"].shape[0] for mod, ab in pairs.items()}
    shared = _registered_twice(model, pairs)
    if shared:
        raise ValueError(f"model: a module the checkpoint adapts is one module registered in two parents ({shared}). "
                         "PEFT put its LoRA on the first name only, while a nested layer runs under every name of its "
                         "module, so this model would give other outputs than PEFT's. Give each parent its own copy "
                         "of the module (copy.deepcopy) before importing")

    existing = lora_layers(model)
    if not existing:
        # (checked first: () was max()'s "arg is an empty sequence", "4,8,16" a TypeError, and (4, 8.5, 16) was told to
        # add 8 as (4, 8, 8.5, 16))
        levels = check_rank_levels(rank_levels) if rank_levels is not None else DEFAULT_RANK_LEVELS
        top = max_rank or max(levels)
        for r in sorted(set(ranks.values())):
            if r > top:
                raise ValueError(f"rank: the checkpoint has r={r} > max_rank={top}; pass rank_levels (and max_rank) "
                                 f"reaching {r}, e.g. rank_levels={tuple(sorted(set(levels) | {r}))}")
            if r not in levels and r != top:
                raise ValueError(
                    f"rank_levels: the checkpoint has r={r}, which is not a nested level of {levels}. Nested blocks "
                    f"hold a PEFT adapter only at a block boundary: pass rank_levels containing {r}, "
                    f"e.g. rank_levels={tuple(sorted(set(levels) | {r}))}")
        cfg = NestedLoRAConfig(target_modules=sorted(pairs), rank_levels=levels, max_rank=max_rank,
                               lora_alpha=float(config.lora_alpha), lora_dropout=float(config.lora_dropout),
                               scaling="rslora" if config.use_rslora else "alpha_over_r",
                               autocast_adapter_dtype=autocast_adapter_dtype)
        # exact names: inject on precisely the checkpoint's modules
        training = {n: m.training for n, m in model.named_modules()}
        layers = inject_nested_lora(model, cfg)
        for n, layer in layers.items():  # a new layer is in training mode: its dropout would act in an eval model
            layer.train(training.get(n, layer.training))
        unexpected, missing = set(layers) - set(pairs), set(pairs) - set(layers)
        if unexpected or missing:
            raise ValueError(f"model: the checkpoint's modules do not match the model's Linear/Conv1D layers "
                             f"(not in the model or not Linear/Conv1D: {sorted(missing)}; extra: {sorted(unexpected)})")
    else:
        layers = existing
        absent = sorted(set(pairs) - set(layers))
        if absent:
            raise ValueError(f"model: the checkpoint adapts {absent}, which have no nested layer in the model")
        uncovered = sorted(set(layers) - set(pairs))
        if uncovered and strict:
            raise ValueError(f"model: nested layers {uncovered} are not in the checkpoint (strict=False keeps "
                             "their current weights, which changes the outputs)")
    for mod, ab in pairs.items():
        layer, r = layers[mod], ranks[mod]
        if r > layer.max_rank:
            raise ValueError(f"rank: the checkpoint has r={r} for {mod!r} > max_rank={layer.max_rank} of its nested "
                             f"layer; inject with rank_levels/max_rank reaching {r}")
        if r not in layer.boundaries:
            raise ValueError(
                f"rank: the checkpoint has r={r} for {mod!r}, which is not a nested level {layer.boundaries}. "
                f"Nested blocks hold a PEFT adapter only at a block boundary: inject with rank_levels containing {r}")
        A, B = ab["A"], ab["B"]
        layer.unmerge()
        dtype = layer.lora_A[0].dtype
        ratio = _peft_scaling(config, mod, r) / _scaling_at(layer, r)
        B = B if ratio == 1.0 else B.double() * ratio
        layer.load_full(A.to(dtype), B.to(dtype))
        layer.set_rank(r)

    # Besides lora_A/lora_B PEFT writes the modules it saves whole (modules_to_save and its task type's head) and
    # the biases of its `bias` option, both trained, and with save_embedding_layers (on by itself when lm_head or
    # embed_tokens is a target, or the vocabulary was resized) the embedding layers' weights, which
    # `from_pretrained` loads and leaves frozen: those are loaded here too, and stay frozen.
    extra, mts = [], []
    ours_params = dict(model.named_parameters(remove_duplicate=False))  # a tied weight under each of its names
    for path in list(others):  # bias="all" also writes each saved module's inner copies' biases
        wrapper, _, rest = path.partition(".modules_to_save.")
        if not rest:
            wrapper, _, rest = path.partition(".original_module.")
        if rest and f"{wrapper}.{rest}" in others:  # PEFT's active forward uses `<module>.<leaf>` only
            del others[path]
    task_type = getattr(config.task_type, "value", config.task_type)
    whole = _peft_matches(model, list(config.modules_to_save or []) + list(_PEFT_TASK_HEADS.get(task_type, ())))
    names_of = parameter_names(model)  # (ours_params' names, by parameter)
    untied: dict[str, list[str]] = {}
    for path, t in others.items():
        name = path if path in ours_params else f"{path.rpartition('.')[0]}.base_layer.{path.rpartition('.')[2]}"
        target = ours_params.get(name)
        mod, _, leaf = path.rpartition(".")
        if target is None:
            raise ValueError(f"peft_dir: saved module weight {path!r} has no parameter in the model")
        if target.shape != t.shape:
            raise ValueError(f"peft_dir: {path!r} has shape {tuple(t.shape)}, the model's is {tuple(target.shape)}")
        saved_whole = any(_inside(mod, w) for w in whole)
        partners = [n for n in names_of[id(target)] if n != name]
        if saved_whole and partners and not (getattr(config, "ensure_weight_tying", False) and all(
                torch.equal(others.get(n.replace(".base_layer.", "."), t.new_empty(0)), t) for n in partners)):
            # PEFT's modules_to_save trains a copy of the module, and the module tied to it (a tied lm_head) keeps
            # the base weight (unless ensure_weight_tying ties the copies, which then hold equal values): untie
            owner, _, pleaf = name.rpartition(".")
            new = nn.Parameter(target.detach().clone(), requires_grad=target.requires_grad)
            setattr(model.get_submodule(owner) if owner else model, pleaf, new)
            names_of[id(target)].remove(name)
            names_of[id(new)] = [name]
            ours_params[name] = target = new
            untied[name] = partners
        target.copy_(t.to(target.dtype))
        if saved_whole or (leaf == "bias" and config.bias != "none"):
            target.requires_grad_(True)
            extra.append(target)
        if saved_whole and mod not in mts:
            mts.append(mod)
    if untied:
        _untie_config(model, f"import_peft_adapter: {sorted(untied)} of the checkpoint's modules_to_save were tied "
                             f"to {sorted(set(sum(untied.values(), [])))}; PEFT trains its own copy of such a module "
                             "and leaves the tied one as it was, so each now has its own weight, as in PEFT")
    rank_set = set(ranks.values())
    return ImportedAdapter(adapters={n: layers[n] for n in sorted(pairs)}, rank=max(rank_set) if len(rank_set) > 1
                           else rank_set.pop(), modules_to_save=mts, extra_params=extra, peft_config=config)


def _scaling_at(layer: NestedLoRALayer, r: int) -> float:
    from .layer import scaling_for

    return scaling_for(r, layer.lora_alpha, layer.max_rank, layer.scaling_kind)


# ----------------------------------------------------------------------------- merge
@torch.no_grad()
def merge_and_unload(model: nn.Module, rank: int | None = None) -> nn.Module:
    """Fold each nested layer's delta (at `rank`, default its current rank) into
    its base weight and put the plain base layer back in its place. The result
    is an ordinary transformers model (`save_pretrained` / `from_pretrained`).

    A base weight tied to another module's parameter (GPT-2's `lm_head` and `transformer.wte`) gets its own
    merged copy, so the tied module keeps its weights; the model's `config.tie_word_embeddings` is then set to
    False (with a warning), so that `save_pretrained` / `from_pretrained` keep the two apart."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model: has no NestedLoRALayer to merge")
    for layer in layers.values():  # every layer first, so that a refusal leaves the model as it was
        layer.check_mergeable()
    tied = tied_base_weights(model, layers)
    for name, layer in layers.items():
        if rank is not None:
            layer.set_rank(rank)
        if name in tied:  # untie: fold into a copy (a layer merged in place already is unmerged first)
            layer.unmerge()
            w = layer.base_layer.weight
            layer.base_layer.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
        layer.merge(keep_base=False)  # the layer goes: no copy of the weight for an unmerge
        _replace(model, name, layer.base_layer)
    if tied:
        _untie_config(model, f"merge_and_unload: {sorted(tied)} had base weights tied to "
                             f"{sorted(sum(tied.values(), []))}; each now has its own merged weight and the tied "
                             "modules keep theirs")
    return model


def _untie_config(model: nn.Module, message: str) -> None:
    """Warn `message` about weights just untied, after setting the model's `config.tie_word_embeddings` False (so
    that `save_pretrained` / `from_pretrained` keep them apart), and say so."""
    config = getattr(model, "config", None)
    untie = bool(getattr(config, "tie_word_embeddings", False))
    if untie:
        config.tie_word_embeddings = False
    # stacklevel: this function, the caller, the caller's no_grad wrapper, the user's line
    warnings.warn(message + (", and config.tie_word_embeddings is now False" if untie else ""), stacklevel=4)


# ----------------------------------------------------------------------------- PEFT controller
class _PeftLoRAView:
    """One PEFT LoRA layer seen through the small part of the NestedLoRALayer
    interface the controller uses: a single block at a fixed rank."""

    def __init__(self, name: str, layer, adapter_name: str, nominal_rank: int):
        self.name = name
        self._layer, self._adapter, self._remerge = layer, adapter_name, []
        self.lora_A = [layer.lora_A[adapter_name].weight]
        self.lora_B = [layer.lora_B[adapter_name].weight]
        self.rank = self.max_rank = int(self.lora_A[0].shape[0])
        self.boundaries = tuple(sorted({self.rank, int(nominal_rank)}))
        self.n_active_blocks = 1

    def set_rank(self, rank: int) -> None:  # fixed rank: the controller never changes it
        pass

    @property
    def base_layer(self) -> nn.Module:
        """PEFT's wrapped base layer (what the Trainer callback's checkpoints record the quantization of)."""
        return self._layer.get_base_layer()

    @property
    def merged_rank(self) -> int:
        """The rank if PEFT's `merge_adapter()` merged this adapter into the base weight, else 0."""
        return self.rank if self._adapter in getattr(self._layer, "merged_adapters", ()) else 0

    def unmerge(self) -> None:  # PEFT unmerges every merged adapter of the layer: merge() merges them all again
        self._remerge = list(self._layer.merged_adapters)
        self._layer.unmerge()

    def merge(self) -> None:
        self._layer.merge(adapter_names=self._remerge)

    def active_parameters(self) -> list[nn.Parameter]:
        return self.lora_A + self.lora_B

    lora_parameters = active_parameters

    def first_block_grad(self) -> torch.Tensor | None:
        return self.lora_A[0].grad

    def active_A(self) -> torch.Tensor:
        return self.lora_A[0]

    def active_B(self) -> torch.Tensor:
        return self.lora_B[0]

    full_A, full_B = active_A, active_B


class PeftController(UnifiedController):
    """Drives an existing PEFT LoRA model at its fixed rank with the LR and Mirror
    actuators only. Mirror snapshots every trainable parameter of the PEFT model
    (lora_A/lora_B and modules_to_save); the drift rule is computed over lora_A
    and lora_B, as for nested adapters. The trace's `rank` is the config's r.
    """

    _MERGE_CALLS = ("peft_model.merge_adapter()", "peft_model.unmerge_adapter()")

    def __init__(self, peft_model: nn.Module, optimizer=None, *, adapter_name: str | None = None,
                 signal="loss", lr_mode: str | None = None, actuators: ActuatorConfig | None = None, **kwargs):
        from peft.tuners.lora import LoraLayer

        if adapter_name is None:
            active = getattr(peft_model, "active_adapter", "default")
            adapter_name = active[0] if isinstance(active, (list, tuple)) else active
        cfg = getattr(peft_model, "peft_config", {}).get(adapter_name)
        if cfg is None:
            raise ValueError(f"peft_model: needs a PEFT LoRA model with adapter {adapter_name!r} (adapters: "
                             f"{sorted(getattr(peft_model, 'peft_config', {}))})")
        kind = str(getattr(cfg, "peft_type", "")).split(".")[-1]
        if kind != "LORA":  # AdaLoRA (a LoraLayer too) prunes its own ranks and trains lora_E beside lora_A/lora_B
            raise ValueError(f"peft_model: adapter {adapter_name!r} has peft_type={kind}; attach_to_peft_model drives "
                             "plain PEFT LoRA adapters only (LoraConfig)")
        views = [_PeftLoRAView(n, m, adapter_name, cfg.r) for n, m in peft_model.named_modules()
                 if isinstance(m, LoraLayer) and adapter_name in getattr(m, "lora_A", {})]
        if not views:
            raise ValueError(f"peft_model: no LoRA layer carries adapter {adapter_name!r}")
        active = getattr(peft_model, "active_adapters", None)
        if active is not None and adapter_name not in active:  # its weights never see a gradient
            raise ValueError(f"adapter_name: {adapter_name!r} is not an active adapter of the PEFT model (active: "
                             f"{list(active)}); call peft_model.set_adapter({adapter_name!r}) first")
        if not any(p.requires_grad for v in views for p in v.lora_parameters()):
            raise ValueError(f"peft_model: adapter {adapter_name!r} is frozen; load it with "
                             "PeftModel.from_pretrained(base, dir, is_trainable=True) to train it")
        lora_ids = {id(p) for v in views for p in v.lora_parameters()}
        extra = [p for p in peft_model.parameters() if p.requires_grad and id(p) not in lora_ids]
        _refuse_ignored(PeftController.__init__, "actuators", actuators, lr_mode=lr_mode)  # None: "multiplier"
        actuators = actuators or ActuatorConfig(mode_ranks=(cfg.r,) * 3, lr_mode=lr_mode or "multiplier")
        if set(actuators.mode_ranks) != {cfg.r}:
            raise ValueError(f"mode_ranks: a PEFT model trains at its fixed r={cfg.r}; got {actuators.mode_ranks}")
        refuse_repacked_4bit(peft_model, "attach_to_peft_model")
        self.peft_model = peft_model
        keep_4bit_layers_differentiable(peft_model)  # a QLoRA model: no autograd-less CPU kernel after an eval
        watch_state_dict(peft_model)  # Mirror packs PEFT's lora_A/lora_B and the saved modules into one buffer
        super().__init__(adapters=views, optimizer=optimizer, signal=signal, actuators=actuators,
                         extra_params=extra, **kwargs)

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for v in self.adapters for p in v.lora_parameters()]

    def _check_rank(self) -> None:
        """Nothing to check: each PEFT layer trains at its own fixed r, which the controller never sets (a
        `rank_pattern` gives some layers another r than the config's, the controller's rank). The nested layers'
        check refused every step of such a model ("the adapters run at rank [8, 16]")."""


def attach_to_peft_model(peft_model: nn.Module, optimizer=None, **kwargs) -> PeftController:
    """`PeftController(peft_model, optimizer, **kwargs)`: LR + Mirror control of a PEFT LoRA model."""
    return PeftController(peft_model, optimizer, **kwargs)


__all__ = ["export_peft_adapter", "import_peft_adapter", "merge_and_unload", "ImportedAdapter", "PeftController",
           "attach_to_peft_model", "infer_task_type"]
