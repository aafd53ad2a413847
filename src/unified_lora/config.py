"""Configuration dataclasses, validated at construction (PEFT's `config.py` style).

A bad value fails when the object is built, with a `ValueError` that names the
field and says why. Number, bool and number-list fields are brought to their
types first (`check_field_types`): a number written as a string, as PyYAML
loads `1e-3`, is read as that number; anything else of the wrong kind fails.
"""

from __future__ import annotations

import math
import numbers
import re
import types
import typing
from collections.abc import Iterator as _AbcIterator
from collections.abc import Sequence as _AbcSequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Sequence

SCALINGS = ("alpha_over_r", "max_rank_over_r", "rslora", "alpha_over_max_rank")
KERNELS = ("python", "cpp")  # how NestedLoRALayer runs two or more active blocks (see NestedLoRAConfig)
MODES = ("SINGLE", "MULTI", "MIRROR")
SINGLE, MULTI, MIRROR = 0, 1, 2
# MultiTaskController's default `resplit_window`: the steps after a merge within which a split brings the task
# adapters back
RESPLIT_WINDOW = 25


def _fail(field_name: str, why: str) -> None:
    raise ValueError(f"{field_name}: {why}")


def _scalar(name: str, v, kind: type):
    """v as `kind` (int, float or bool), or a ValueError that names the field. A number written as a string is read
    as that number: YAML 1.1 (PyYAML) loads `lr: 1e-3` as the string '1e-3'. A bool is never a number here, and a
    bool field takes only true or false (the string "false" would otherwise count as true)."""
    if kind is bool:
        if not isinstance(v, bool):
            _fail(name, f"must be true or false, got {v!r} ({type(v).__name__})")
        return v
    what = "an integer" if kind is int else "a number"
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            _fail(name, f"must be {what}, got {v!r} (str)")
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        _fail(name, f"must be {what}, got {v!r} ({type(v).__name__})")
    if kind is float:
        return float(v)
    if isinstance(v, numbers.Integral):
        return int(v)
    if not (math.isfinite(v) and float(v).is_integer()):
        _fail(name, f"must be {what}, got {v!r}")
    return int(v)


REGEX_CHARS = frozenset("*+?[](){}|^$\\")


def check_target_regex(value: str) -> str:
    """A target_modules string other than "all-linear" is a regex: one that does not compile fails here, naming the
    field, rather than as a bare re.error when the model is wrapped."""
    if value != "all-linear":
        try:
            re.compile(value)
        except re.error as e:
            _fail("target_modules", f"a string is a regex (matched against whole module names, as in PEFT), and "
                                    f"{value!r} is not a valid one: {e}; give a list for plain names")
    return value


def parse_names(value, field_name: str = "target_modules") -> list[str] | str:
    """The command-line / YAML form of a module list. `target_modules`: "all-linear"; a regex, i.e. a value with any
    of * + ? [ ] ( ) { } | ^ $ \\ (matched against whole module names, as PEFT matches a string); or name suffixes
    separated by commas ("query,value"). Other fields (modules_to_save): comma-separated names. A list stays a list."""
    if isinstance(value, str):
        v = value.strip()
        if field_name == "target_modules" and (v == "all-linear" or any(c in REGEX_CHARS for c in v)):
            return check_target_regex(v)
        value = v.split(",")
    names = [n.strip() for n in value if n.strip()]
    if not names:
        example = "query,value" if field_name == "target_modules" else "classifier"  # (not target_modules' example)
        _fail(field_name, f"give at least one module name, e.g. {example}; got {value!r}")
    return names


def _union_args(hint) -> tuple | None:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else None


def _typed(name: str, v, hint, example):
    """v checked against (and, for numbers, brought to) the type `hint`: int, float, bool, str, a sequence of one of
    them, or a union of those with None or str."""
    union = _union_args(hint)
    if union is not None:
        if v is None and type(None) in union:
            return None
        options = [a for a in union if a is not type(None)]
        if str in options and isinstance(v, str):  # e.g. target_modules: a regex, or a list of suffixes
            return v
        sequences = [a for a in options if typing.get_origin(a) is _AbcSequence]
        if len(options) == 1 or sequences:
            return _typed(name, v, options[0] if len(options) == 1 else sequences[0], example)
        return v
    if hint in (int, float, bool):
        return _scalar(name, v, hint)
    if hint is str:
        if not isinstance(v, str):
            _fail(name, f"must be a string, got {v!r} ({type(v).__name__})")
        return v
    args = typing.get_args(hint)
    if typing.get_origin(hint) is _AbcSequence and args and args[0] in (int, float, str):
        elem = args[0]
        if isinstance(v, str):
            if elem is str:  # one name, or a comma-separated list: the class's own rule decides
                return v
            v = v.strip()
            if v[:1] + v[-1:] in ("()", "[]"):  # "(4, 8, 16)": a tuple written in YAML is a string; it was read as
                v = v[1:-1]  # the numbers "(4", "8" and "16)", and refused with "must be an integer, got '(4'"
            v = v.replace(",", " ").split()  # "4,8,16" or "4 8 16"
        if not isinstance(v, (list, tuple)):
            kind = {int: "integers", float: "numbers", str: "strings"}[elem]
            _fail(name, f"must be a list of {kind}, e.g. {example!r}, got {v!r} ({type(v).__name__})")
        if elem is str:
            bad = [x for x in v if not isinstance(x, str)]
            if bad:
                _fail(name, f"must be a list of strings, got {v!r} ({bad[0]!r} is a {type(bad[0]).__name__})")
            return v
        return tuple(_scalar(name, x, elem) for x in v)
    return v


def check_field_types(obj) -> None:
    """Check every field of a config dataclass against its annotation, in place: int, float and bool fields and
    sequences of numbers are brought to those types, str fields and lists of names must be strings, and None only
    goes where the annotation allows it. A value of the wrong kind (a YAML null, a number for a column name, the
    string "ten" for a count) raises a ValueError naming the field, here, not a TypeError later in a comparison.
    Other fields (dicts, free-form values) are left to the class's own checks."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        if f.name in hints:
            # (a field whose default, None, says nothing of its kind names its example in its metadata)
            example = f.metadata.get("example", f.default if f.default is not MISSING else None)
            setattr(obj, f.name, _typed(f.name, getattr(obj, f.name), hints[f.name], example))


def check_rank_levels(rank_levels: Sequence[int], max_rank: int | None = None) -> tuple[int, ...]:
    """Rank levels must nest: positive, strictly increasing, each <= max_rank (itself positive, checked first). They
    must be integers: (4, 8.5, 16) is refused (it was truncated to (4, 8, 16) by a layer built by hand), and so is a
    value that is no list (None). An array (numpy, torch), a range or an iterator is read as the list of its values."""
    if max_rank is not None and max_rank <= 0:
        _fail("max_rank", f"must be positive, got {max_rank}")
    # (`_typed` takes a list or tuple, as YAML gives: np.array([4, 8, 16]) and range(4, 17, 4), which setup and a layer
    # built by hand took, were refused as "must be a list of integers")
    if hasattr(rank_levels, "tolist") and not isinstance(rank_levels, (list, tuple, str)):
        rank_levels = rank_levels.tolist()  # (a 0-d array's is a number, refused as no list)
    elif isinstance(rank_levels, (range, _AbcIterator)):
        rank_levels = list(rank_levels)
    levels = tuple(_typed("rank_levels", rank_levels, Sequence[int], (4, 8, 16)))
    if not levels:
        _fail("rank_levels", "must hold at least one rank, e.g. (4, 8, 16)")
    if any(r <= 0 for r in levels):
        _fail("rank_levels", f"every rank must be positive, got {levels}")
    if any(b <= a for a, b in zip(levels, levels[1:])):
        _fail("rank_levels", f"must be strictly increasing so the slices nest (r4 ⊂ r8 ⊂ r16), got {levels}")
    if max_rank is not None and levels[-1] > max_rank:
        _fail("rank_levels", f"largest level {levels[-1]} exceeds max_rank={max_rank}")
    return levels


@dataclass
class NestedLoRAConfig:
    """How adapters are built and injected.

    `target_modules`: None (the default: PEFT's default targets for the model's
    `config.model_type`, as `LoraConfig(target_modules=None)` picks them: query and
    value for BERT, c_attn for GPT-2, q_proj and v_proj for Llama; a model type PEFT
    has none for is an error), a list of name suffixes (PEFT convention), a regex string
    (full match on the module name), or "all-linear" (every Linear/Conv1D except
    the output head: modules named, or inside one named, lm_head, classifier,
    score, qa_outputs, cls or pooler.dense, and a transformers model's output
    layer (`get_output_embeddings()`, e.g. Whisper's proj_out) whatever its name;
    unlike PEFT's, this leaves BERT's pooler.dense out).
    `scaling`: "alpha_over_r" (PEFT default, alpha / r), "max_rank_over_r" (the
    seed's), "rslora" (alpha / sqrt(r)), or "alpha_over_max_rank" (alpha /
    max_rank at every rank, so a rank switch leaves the kept blocks'
    contribution unchanged; the other three rescale it at every switch).
    `kernel`: how a layer runs two or more active blocks. "python" (default):
    a torch `autograd.Function`, no build step, traceable by torch.compile.
    "cpp": the same computation as a C++ autograd Function
    (`csrc/nested_path.cpp`, built at first use with g++ and ninja), which
    takes the Python host time out of every forward and backward: the cost
    that dominates on a GPU, where these small GEMMs take microseconds. Both
    save the same tensors, PEFT's; one active block runs as plain torch ops
    with either. While torch.compile traces, a "cpp" layer runs the Python
    Function (bit-identical), so the compiled graph does not break there.
    `autocast_adapter_dtype` (PEFT's option of `get_peft_model`, same
    default): True makes the LoRA blocks fp32 on a bf16/fp16 base layer, so
    the adapters and their optimizer state train in fp32 while the frozen
    base stays in half precision (the layer's output keeps the base's dtype);
    an fp32 or fp64 base is left as it is. False: the blocks take the base
    layer's dtype.
    """

    target_modules: Sequence[str] | str | None = field(default=None, metadata={"example": ("query", "value")})
    rank_levels: Sequence[int] = (4, 8, 16)
    max_rank: int | None = None
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    scaling: str = "alpha_over_r"
    modules_to_save: Sequence[str] | None = None
    initial_rank: int | None = None
    kernel: str = "python"
    autocast_adapter_dtype: bool = True

    def __post_init__(self) -> None:
        check_field_types(self)
        self.rank_levels = check_rank_levels(self.rank_levels, self.max_rank)
        if self.max_rank is None:
            self.max_rank = self.rank_levels[-1]
        if isinstance(self.modules_to_save, str):  # one name, or a comma-separated list (never its characters)
            self.modules_to_save = parse_names(self.modules_to_save, "modules_to_save")
        if self.target_modules is not None and not (isinstance(self.target_modules, str)
                                                    or len(self.target_modules) > 0):
            _fail("target_modules", "must be a non-empty list of name suffixes, a regex, or 'all-linear'")
        if isinstance(self.target_modules, str):
            check_target_regex(self.target_modules)
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            _fail("lora_alpha", f"must be a positive finite number, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            _fail("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if self.scaling not in SCALINGS:
            _fail("scaling", f"must be one of {SCALINGS}, got {self.scaling!r}")
        if self.kernel not in KERNELS:
            _fail("kernel", f"must be one of {KERNELS}, got {self.kernel!r}")
        if self.initial_rank is None:
            self.initial_rank = self.rank_levels[min(1, len(self.rank_levels) - 1)]
        if self.initial_rank not in self.rank_levels:
            _fail("initial_rank", f"must be one of rank_levels {self.rank_levels}, got {self.initial_rank}")


@dataclass
class MachineConfig:
    """The SINGLE/MULTI/MIRROR machine (v1 README thresholds)."""

    theta0: float = 0.3
    theta1: float = 0.7
    initial_mode: int = MULTI  # v1/v3: MULTI is the start state
    warmup_steps: int = 0  # no transitions before this step
    eval_interval: int = 1  # only decide on steps that are multiples of this
    min_dwell: int = 0  # hysteresis: steps to stay in a mode entered by a transition (warmup_steps holds the first)

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("theta0", "theta1"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                _fail(name, f"must be a number in [0, 1], got {v!r}")
        if self.theta0 >= self.theta1:
            _fail("theta0", f"must be < theta1, got theta0={self.theta0} >= theta1={self.theta1}")
        if self.initial_mode not in (SINGLE, MULTI, MIRROR):
            _fail("initial_mode", f"must be 0 (SINGLE), 1 (MULTI) or 2 (MIRROR), got {self.initial_mode!r}")
        if self.warmup_steps < 0:
            _fail("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.eval_interval < 1:
            _fail("eval_interval", f"must be >= 1, got {self.eval_interval}")
        if self.min_dwell < 0:
            _fail("min_dwell", f"must be >= 0, got {self.min_dwell}")


# v1 README defaults; the Llama run used (2e-3, 5e-4, 1e-4).
V1_LRS = (5e-5, 3e-5, 1e-5)
LLAMA_RUN_LRS = (2e-3, 5e-4, 1e-4)
# Multipliers on the user's schedule keep the v1 ratios, relative to MULTI = 1.
V1_MULTIPLIERS = (5.0 / 3.0, 1.0, 1.0 / 3.0)


@dataclass
class ActuatorConfig:
    """What each mode sets: rank, and learning rate (absolute or multiplier)."""

    mode_ranks: Sequence[int] = (4, 8, 16)
    lr_mode: str = "absolute"  # "absolute" | "multiplier" | "off"
    mode_lrs: Sequence[float] = V1_LRS
    mode_multipliers: Sequence[float] = V1_MULTIPLIERS

    def __post_init__(self) -> None:
        check_field_types(self)
        self.mode_ranks = tuple(int(r) for r in self.mode_ranks)
        if len(self.mode_ranks) != 3:
            _fail("mode_ranks", f"needs one rank per mode (SINGLE, MULTI, MIRROR), got {self.mode_ranks}")
        if any(b < a for a, b in zip(self.mode_ranks, self.mode_ranks[1:])) or min(self.mode_ranks) <= 0:
            _fail("mode_ranks", f"must be positive and non-decreasing SINGLE <= MULTI <= MIRROR, got {self.mode_ranks}")
        if self.lr_mode not in ("absolute", "multiplier", "off"):
            _fail("lr_mode", f"must be 'absolute', 'multiplier' or 'off', got {self.lr_mode!r}")
        for name in ("mode_lrs", "mode_multipliers"):
            vals = tuple(float(v) for v in getattr(self, name))
            if len(vals) != 3 or not all(v > 0 and math.isfinite(v) for v in vals):
                _fail(name, f"needs three positive finite values (SINGLE, MULTI, MIRROR), got {vals}")
            setattr(self, name, vals)
        if self.lr_mode != "multiplier" and self.mode_multipliers != V1_MULTIPLIERS:
            # ActuatorConfig(mode_multipliers=...) alone ran in the default absolute mode: the multipliers were
            # ignored, and the v1 LRs (5e-5, 3e-5, 1e-5) replaced the optimizer's LR and its schedule, silently
            _fail("mode_multipliers", f"{self.mode_multipliers} would be ignored: lr_mode is {self.lr_mode!r}, and "
                                      f"only lr_mode='multiplier' reads them; pass lr_mode='multiplier' as well "
                                      f"(ActuatorConfig's default is 'absolute', which writes mode_lrs)")


@dataclass
class MirrorConfig:
    """Mirror snapshot and the rollback rule applied on exit."""

    policy: str = "drift"  # "drift" | "never" | "always" | "loss_worse"
    drift_threshold: float = 0.05  # v3 model card: restore if drift < 5 %
    snapshot_optimizer: bool = False
    offload_to_cpu: bool = False
    # "eager": torch ops (any device). "fused": CPU kernels that read W and W_snap in place (csrc/mirror_fused.cpp,
    # built with the controller; needs g++ and ninja). For contiguous fp32/bf16/fp16 CPU parameters only.
    kernel: str = "eager"
    # kernel="eager": at the first snapshot, move the snapshotted parameters into one flat buffer per device and
    # dtype (each parameter's .data becomes a view of it; the Parameter objects, values and optimizer state stay),
    # so save, drift and restore are one op each over the buffer, not one per tensor. Parameters that share or
    # do not own their storage (tied weights, FSDP's flat views) are never moved. False: leave every storage alone.
    pack: bool = True

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.policy not in ("drift", "never", "always", "loss_worse"):
            _fail("policy", f"must be 'drift', 'never', 'always' or 'loss_worse', got {self.policy!r}")
        if self.kernel not in ("eager", "fused"):
            _fail("kernel", f"must be 'eager' or 'fused', got {self.kernel!r}")
        if not (self.drift_threshold > 0 and math.isfinite(self.drift_threshold)):
            _fail("drift_threshold", f"must be a positive number, got {self.drift_threshold}")


@dataclass
class SignalConfig:
    """Which φ(t) signal drives the machine and its parameters."""

    kind: str = "loss"  # "loss" (v1 README) | "composite" (v3 model card) | "multitask" (v1 C/E/S)
    alpha: float = 0.1
    beta: float = 0.9
    loss_scale: float = 1.0
    calibration_steps: int = 0  # >0: set loss_scale from the mean warmup loss
    calibration_target: float = 0.5  # the calibrated mean loss maps to this (φ≈0.333, MULTI)
    nonfinite: str = "skip"  # "skip" | "max_stress" | "raise"
    history: int = 500
    min_history: int = 10
    weights: Sequence[float] = (0.3, 0.3, 0.4)  # v3: C, E, S
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.kind not in ("loss", "composite", "multitask"):
            _fail("kind", f"must be 'loss', 'composite' or 'multitask', got {self.kind!r}")
        for name in ("alpha", "beta"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 < v <= 1.0):
                _fail(name, f"must be in (0, 1], got {v!r}")
        if not (self.loss_scale > 0 and math.isfinite(self.loss_scale)):
            _fail("loss_scale", f"must be a positive finite number, got {self.loss_scale}")
        if self.calibration_steps < 0:
            _fail("calibration_steps", f"must be >= 0, got {self.calibration_steps}")
        if not (self.calibration_target > 0 and math.isfinite(self.calibration_target)):
            _fail("calibration_target", f"must be a positive finite number, got {self.calibration_target}")
        if self.nonfinite not in ("skip", "max_stress", "raise"):
            _fail("nonfinite", f"must be 'skip', 'max_stress' or 'raise', got {self.nonfinite!r}")
        w = self.weights
        if len(w) != 3 or not all(v >= 0 and math.isfinite(v) for v in w) or abs(sum(w) - 1.0) > 1e-6:
            _fail("weights", f"need three finite weights >= 0 for (C, E, S) that sum to 1, so φ stays in [0, 1]; got {w}")
        if self.history < 2 or self.min_history < 2 or self.min_history > self.history:
            _fail("history", f"need 2 <= min_history <= history, got {self.min_history}, {self.history}")
        # A setting the chosen signal does not read fails rather than being ignored silently:
        # SignalConfig(kind="composite", calibration_steps=50) ran uncalibrated (the composite signal is scale-free).
        unread = {"loss": ("weights", "history", "min_history"),
                  "composite": ("beta", "loss_scale", "calibration_steps", "calibration_target")}.get(self.kind, ())
        defaults = {f.name: f.default for f in fields(self)}
        for name in unread:
            value = getattr(self, name)
            if (tuple(value) if name == "weights" else value) != defaults[name]:
                other = "composite" if self.kind == "loss" else "loss"
                _fail(name, f"{value!r} would be ignored: the {self.kind!r} signal does not read it (only "
                            f"kind={other!r} does); leave it at its default {defaults[name]!r}, or use kind={other!r}")
