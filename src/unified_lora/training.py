"""A short train/eval loop shared by `unified-lora demo` and `unified-lora train` (nanoGPT style).

One training step, in the order the controller needs (v3 model card):

    loss = model(**batch).loss
    loss.backward()
    ctrl.step(loss=loss.item())      # may switch rank / LR / snapshot or restore (Mirror)
    clip_grad_norm_(...); optimizer.step(); optimizer.zero_grad()

A *baseline* run uses the very same code with the state machine pinned in
MULTI (theta0=0, theta1=1: φ ∈ [0, 1) is always MULTI), i.e. plain LoRA at a
fixed rank and the MULTI learning rate, so data order, seed, shock and
initialisation are identical.

A *shock* is a window of steps [start, end) whose labels are corrupted:
"flip" maps y -> (y+1) % K (1-y for binary), "random" draws uniform labels
(for a causal LM, uniform random next tokens; "flip" has no meaning there and is refused).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import itertools
import json
import math
import os
import pickle
import random
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import torch

from ._files import damaged_file_error, fsync_dir, fsync_tree, load_state_file
from .config import (KERNELS, MODES, RESPLIT_WINDOW, ActuatorConfig, MachineConfig, MirrorConfig, NestedLoRAConfig,
                     SignalConfig, _scalar, check_field_types, parse_names)
from .controller import setup_unified_lora
from .data import (DataError, TextDataset, flip_labels, glue_metrics, load_glue, load_table, majority_baseline,
                   primary_metric)
from .data.loaders import (_GLUE, _check_no_null_text, _load_glue_file, _read_records, check_columns,
                           no_rows_error, normalize_task, read_text, record_at, record_lines)
from .distributed import print_on_main_process
from .model import default_target_modules, lora_state_dict, trainable_parameters
from .trace import TraceWriter, transition_note

TASK_TYPES = ("auto", "seq-cls", "causal-lm")
TEXT_SUFFIXES = ("txt", "raw")  # plain-text corpora for a causal LM (tinyshakespeare's input.txt, wikitext's *.raw)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --precision: the autocast dtype
DEVICE_FORM = r"auto|cpu|cuda(:\d+)?|mps"  # --device
_POSITIVE = (lambda v: v > 0 and math.isfinite(v), "must be a number > 0")
_AT_LEAST_1 = (lambda v: v >= 1, "must be >= 1")
_STEPS = (lambda v: v >= 0, "must be >= 0")
_SHARE = (lambda v: 0 <= v <= 1, "must be in [0, 1]")
_LR = (lambda v: v >= 0 and math.isfinite(v), "must be an LR >= 0")
# Hugging Face TrainingArguments, run_glue and PEFT LoraConfig names of this config's keys: a Trainer user's config
# typo that difflib cannot place (`learning_rate` is not close to `lr`)
_HF_KEY_NAMES = {"learning_rate": "lr", "num_train_epochs": "epochs", "max_steps": "steps",
                 "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
                 "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "lr_scheduler",
                 "metric_for_best_model": "metric_for_best", "max_grad_norm": "grad_clip", "max_seq_length": "max_length",
                 "model_name_or_path": "model", "train_file": "data", "validation_file": "dev_data",
                 "r": "rank_levels", "lora_r": "rank_levels", "bf16": "precision", "fp16": "precision"}
_SHAPES = ("linear", "cosine", "1-sqrt")  # warmup_stable_decay's warm-up and decay shapes
_SHAPE = (lambda v: v in _SHAPES, f"must be one of {_SHAPES}")
_MIN_LR = {"num_cycles": (float, *_POSITIVE), "min_lr": (float, *_LR), "min_lr_rate": (float, *_SHARE)}
# --lr-scheduler: transformers' `get_scheduler` names, and each one's own settings, --lr-scheduler-kwargs (the
# Trainer's `lr_scheduler_kwargs`: the keyword arguments of the schedule's function in transformers.optimization
# beside the warm-up and the run's length, as transformers names them): {name: {kwarg: (type, check, what it needs)}}.
# reduce_lr_on_plateau is not offered: it reads a dev metric and sets the optimizer's LR itself, not a factor of the
# step that the mode's LR is scaled by (and that a resume recomputes); nor is greedy (the same)
SCHEDULER_KWARGS: dict[str, dict[str, tuple]] = {
    "constant": {}, "constant_with_warmup": {}, "linear": {},
    "cosine": {"num_cycles": (float, *_POSITIVE)},
    "cosine_with_restarts": {"num_cycles": (int, *_AT_LEAST_1)},
    "inverse_sqrt": {"timescale": (int, *_AT_LEAST_1)},
    "polynomial": {"lr_end": (float, *_LR), "power": (float, *_POSITIVE)},
    "cosine_with_min_lr": _MIN_LR,
    "cosine_warmup_with_min_lr": {**_MIN_LR, "warmup_lr_rate": (float, *_SHARE)},
    "warmup_stable_decay": {"num_decay_steps": (int, *_STEPS), "num_stable_steps": (int, *_STEPS),
                            "warmup_type": (str, *_SHAPE), "decay_type": (str, *_SHAPE),
                            "min_lr_ratio": (float, *_SHARE), "num_cycles": (float, *_POSITIVE)},
}
LR_SCHEDULERS = tuple(SCHEDULER_KWARGS)
# their factor at a step depends on the run's total steps (warmup_stable_decay's unless num_stable_steps is given)
DECAYING = ("linear", "cosine", "cosine_with_restarts", "polynomial", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
            "warmup_stable_decay")
# settings that are absolute LRs in transformers: the schedule's factor of --lr here (`check_scheduler_kwargs`)
ABSOLUTE_LR_KWARGS = {"polynomial": "lr_end", "cosine_with_min_lr": "min_lr", "cosine_warmup_with_min_lr": "min_lr"}


class DivergedError(RuntimeError):
    """`TrainConfig.max_nonfinite_steps` optimizer steps in a row had a non-finite loss or gradient: every one was
    skipped (the weights and the optimizer state are those of the last finite step), and the run stops."""


class UsageError(ValueError):
    """Bad user input (file, column, model path, option): reported as one line, exit code 2."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, no permission): reported as one line, exit code 1."""


# ----------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Everything a run needs. `unified-lora train --config run.yaml` fills it from YAML keys of the same names."""

    model: str | None = None  # HF path or hub id; None = bundled all-MiniLM-L6-v2
    data: str | list | dict | None = None  # GLUE task dir (MRPC/train.tsv + dev.tsv), a .csv/.tsv/.jsonl file, or
    # (causal-lm) a .txt file cut into max_length-token blocks; None = shipped MRPC. Several (a list, or a mapping
    # {task name: path}): a classifier's multi-task run, one task each (`task_data`); stored as the mapping
    dev_data: str | list | dict | None = None  # file for evaluation; None = GLUE dev.tsv, or a split of `data` (a .txt:
    # its tail). Several data sets: one per task (a list in their order, or a mapping by task name), or None
    task_names: Sequence[str] | None = None  # several data sets as a list: their task names (default: each one's GLUE
    # folder or file stem, lower-case); folded into `data`'s mapping
    task_type: str = "auto"  # auto | seq-cls | causal-lm
    text_columns: Sequence[str] = ("text",)
    label_column: str = "label"
    assistant_only_loss: bool = False  # chat data (a causal LM): the loss on the assistant turns only (TRL's flag)
    text_eos: bool = True  # a causal LM's rows of one text column: the tokenizer's eos appended to each, as TRL does
    dev_fraction: float = 0.1  # held out from `data` when there is no dev set
    dev_size: int = 0  # >0: evaluate on a fixed-seed subsample of this many dev rows
    max_length: int = 64
    batch_size: int = 16  # rows per batch; under torchrun (DDP), on each process
    epochs: int = 1
    steps: int = 0  # >0: stop after this many optimizer steps (overrides epochs)
    seed: int = 0
    # None: PEFT's default targets for the model type (query,value for BERT, c_attn for GPT-2, q_proj,v_proj for
    # Llama), resolved when the model is wrapped and recorded then (`Run._setup_adapters`)
    target_modules: Sequence[str] | str | None = field(default=None, metadata={"example": ("query", "value")})
    modules_to_save: Sequence[str] | None = None  # None = the classifier head for seq-cls
    rank_levels: Sequence[int] = (4, 8, 16)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    layer_kernel: str = "python"  # python | cpp (the nested path as a C++ autograd Function; NestedLoRAConfig.kernel)
    # Controller
    controller: bool = True  # False: plain LoRA at the MULTI rank and LR (the baseline)
    signal: str = "loss"  # loss | composite
    lr_mode: str = "absolute"  # absolute | multiplier
    mode_lrs: Sequence[float] = (2e-3, 5e-4, 1e-4)  # SINGLE, MULTI, MIRROR (the seed's Llama-run table)
    lr: float = 5e-4  # base LR for lr_mode="multiplier"
    # the LR schedule (`lr_schedule`): its factor at each optimizer step scales the mode's LR, in either lr_mode
    lr_scheduler: str = "constant"  # one of LR_SCHEDULERS (transformers' get_scheduler)
    warmup_steps: int = 0  # optimizer steps of warm-up (not with "constant")
    warmup_ratio: float = 0.0  # or the warm-up as a share of the run's steps, rounded up (transformers' Trainer)
    # the schedule's own settings (the Trainer's lr_scheduler_kwargs; a mapping, or its JSON text): SCHEDULER_KWARGS
    lr_scheduler_kwargs: dict | str | None = None
    loss_scale: float = 1.0
    calibration_steps: int = 0
    calibration_target: float = 0.5
    theta0: float = 0.3
    theta1: float = 0.7
    min_dwell: int = 0
    controller_warmup: int = 0  # steps before the controller's first transition (MachineConfig.warmup_steps)
    # several data sets: a split within this many steps of a merge brings the task adapters back (0 = off;
    # MultiTaskController's resplit_window)
    resplit_window: int = RESPLIT_WINDOW
    mirror_policy: str = "drift"
    drift_threshold: float = 0.05
    mirror_kernel: str = "eager"  # eager | fused (C++ CPU kernels, built with the controller; MirrorConfig.kernel)
    mirror_pack: bool = True  # eager: snapshotted parameters packed into one buffer (MirrorConfig.pack)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # Shock (label corruption window), 0/0 = none
    shock_start: int = 0
    shock_end: int = 0
    shock_type: str = "flip"  # flip | random
    # Output
    output_dir: str = "unified-lora-run"
    log_every: int = 25
    threads: int = 0  # >0: torch.set_num_threads
    peft_every_checkpoint: bool = False  # also export PEFT format into every checkpoint (always at the end)
    save_steps: int = 0  # >0: also write checkpoints/step-N every N optimizer steps (inside an epoch too)
    save_total_limit: int = 0  # >0: keep only the newest K step-N checkpoints (epoch-N ones are all kept)
    eval_steps: int = 0  # >0: also evaluate on the dev set every N optimizer steps (inside an epoch too)
    # Best evaluation and early stopping (Hugging Face Trainer's metric_for_best_model, EarlyStoppingCallback)
    metric_for_best: str | None = None  # the dev metric that ranks evaluations; None = the task's primary one
    save_best: bool = False  # write OUTPUT_DIR/best/ (a checkpoint, with peft/) at each evaluation that is a new best
    early_stopping_patience: int = 0  # >0: stop after this many evaluations in a row without an improvement
    early_stopping_threshold: float = 0.0  # an improvement is one by more than this (in the metric's units)
    # Device and arithmetic
    device: str = "auto"  # auto (cuda when torch sees a GPU, else cpu) | cpu | cuda | cuda:N | mps
    precision: str = "fp32"  # fp32 | bf16 | fp16: torch.autocast around forward and loss; fp16 adds a GradScaler
    grad_accum: int = 1  # micro-batches of batch_size per optimizer step
    # a step whose loss or gradient is NaN/inf is skipped (the weights stay); this many in a row stop the run (0 = never)
    max_nonfinite_steps: int = 10

    def __post_init__(self) -> None:
        check_field_types(self)  # numbers (YAML's `lr: 1e-3` is a string), bools and rank/LR lists, by field name
        self._fold_tasks()
        if isinstance(self.text_columns, str):
            self.text_columns = [c.strip() for c in self.text_columns.split(",") if c.strip()]
        # target_modules: "all-linear", a regex, or comma-separated suffixes (`parse_names`), as on the command line
        if self.target_modules is not None:
            self.target_modules = parse_names(self.target_modules, "target_modules")
        if self.modules_to_save is not None:
            self.modules_to_save = parse_names(self.modules_to_save, "modules_to_save")
        checks = [
            ("task_type", self.task_type in TASK_TYPES, f"must be one of {TASK_TYPES}"),
            ("signal", self.signal in ("loss", "composite"), "must be 'loss' or 'composite'"),
            ("lr_mode", self.lr_mode in ("absolute", "multiplier"), "must be 'absolute' or 'multiplier'"),
            ("shock_type", self.shock_type in ("flip", "random"), "must be 'flip' or 'random'"),
            ("layer_kernel", self.layer_kernel in KERNELS, f"must be one of {KERNELS}"),
            ("max_length", self.max_length >= 8, "must be >= 8"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("grad_accum", self.grad_accum >= 1, "must be >= 1 (1 = one batch per optimizer step)"),
            ("max_nonfinite_steps", self.max_nonfinite_steps >= 0, "must be >= 0 (0 = never stop)"),
            ("device", bool(re.fullmatch(DEVICE_FORM, self.device)), "must be auto, cpu, cuda, cuda:N or mps"),
            ("precision", self.precision in PRECISIONS, f"must be one of {tuple(PRECISIONS)}"),
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("steps", self.steps >= 0, "must be >= 0 (0 = run whole epochs)"),
            ("dev_size", self.dev_size >= 0, "must be >= 0 (0 = the whole dev set)"),
            ("dev_fraction", 0.0 < self.dev_fraction < 1.0, "must be in (0, 1)"),
            ("lr", self.lr > 0 and math.isfinite(self.lr), "must be a positive number"),
            ("lr_scheduler", self.lr_scheduler in LR_SCHEDULERS, f"must be one of {LR_SCHEDULERS}"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0 (0 = no warm-up)"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "must be in [0, 1) (0 = no warm-up)"),
            ("resplit_window", self.resplit_window >= 0, "must be >= 0 (steps after a merge within which a split "
             "brings the task adapters back; 0 = every split copies the shared adapter)"),
            ("controller_warmup", self.controller_warmup >= 0, "must be >= 0 (0 = the controller may switch from the "
             "first step)"),
            ("log_every", self.log_every >= 0, "must be >= 0"),
            ("threads", self.threads >= 0, "must be >= 0 (0 = torch's default)"),
            ("save_steps", self.save_steps >= 0, "must be >= 0 (0 = no checkpoint inside an epoch)"),
            ("save_total_limit", self.save_total_limit >= 0, "must be >= 0 (0 = keep every step-N checkpoint)"),
            ("eval_steps", self.eval_steps >= 0, "must be >= 0 (0 = evaluate only at each epoch's end)"),
            ("metric_for_best", self.metric_for_best is None or bool(self.metric_for_best.strip()),
             "must name a dev metric, e.g. accuracy, f1 or loss"),
            ("early_stopping_patience", self.early_stopping_patience >= 0, "must be >= 0 (0 = never stop early)"),
            ("early_stopping_threshold", self.early_stopping_threshold >= 0
             and math.isfinite(self.early_stopping_threshold), "must be a number >= 0"),
            ("weight_decay", self.weight_decay >= 0 and math.isfinite(self.weight_decay), "must be a number >= 0"),
            ("grad_clip", self.grad_clip >= 0 and math.isfinite(self.grad_clip), "must be >= 0 (0 = no clipping)"),
            ("shock_end", 0 <= self.shock_start <= self.shock_end, "need 0 <= shock_start <= shock_end"),
            ("text_columns", 1 <= len(self.text_columns) <= 2, "give one or two column names, e.g. sentence1,sentence2"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name}: {why}, got {getattr(self, name)!r}")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError(f"warmup_steps and warmup_ratio: give one of the two, got {self.warmup_steps} and "
                             f"{self.warmup_ratio}")
        if self.lr_scheduler == "constant" and (self.warmup_steps or self.warmup_ratio):
            given = f"warmup_steps {self.warmup_steps}" if self.warmup_steps else f"warmup_ratio {self.warmup_ratio}"
            raise ValueError(f"lr_scheduler: 'constant' has no warm-up ({given}); use constant_with_warmup, or a "
                             "decaying schedule (linear, cosine, ...)")
        self.lr_scheduler_kwargs = check_scheduler_kwargs(self)
        if self.steps and self.shock_end > self.steps:
            raise ValueError(f"shock_end: must be <= steps ({self.steps}), got {self.shock_end}")
        # The config dataclasses of the core validate the rest (thresholds, LRs, policy, ...), here: the LoRA layout
        # (lora_alpha, lora_dropout) was checked only when the model was wrapped, after the model and data had loaded,
        # the --output-dir was made and --overwrite had deleted the previous run; and the thresholds are checked
        # without the controller too (the run records them, and the plot draws them)
        NestedLoRAConfig(target_modules=self.target_modules, rank_levels=self.rank_levels, lora_alpha=self.lora_alpha,
                         lora_dropout=self.lora_dropout)
        self.signal_config()
        MachineConfig(theta0=self.theta0, theta1=self.theta1, min_dwell=self.min_dwell)
        self.actuator_config()
        self.mirror_config()

    def _fold_tasks(self) -> None:
        """`data` and `dev_data` as one run reads them: one data set (a string, or a list or mapping of one) as a
        path; several as a mapping {task name: path} in the given order, `dev_data` then None or a mapping with the
        names, in that order (some of them: a task left out takes its default dev set), and `task_names` folded in
        (None). A task's default name is its GLUE folder's task key or its file's stem, lower-case. Repeated names, a
        name that is not a plain word, a `dev_data` list that does not give one file per task and a `dev_data` key
        that is no task are ValueErrors naming the key."""
        data, dev, names = self.data, self.dev_data, self.task_names
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        for key, v in (("data", data), ("dev_data", dev)):
            items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, (list, tuple)) else ()
            bad = next((x for _, x in items if not isinstance(x, str) or not x.strip()), None)
            if bad is not None or (isinstance(v, (list, tuple, dict)) and not v):
                raise ValueError(f"{key}: give a path, a list of paths or a mapping {{task name: path}}, got {v!r}")
        if isinstance(data, dict) and len(data) == 1 and names is None:  # one task: the path (its name is not used)
            data = next(iter(data.values()))
        if isinstance(data, (list, tuple)) and len(data) == 1:
            data = data[0]
        if isinstance(dev, (list, tuple)) and len(dev) == 1:
            dev = dev[0]
        if not isinstance(data, (list, tuple, dict)):
            if isinstance(dev, dict) and len(dev) == 1:
                dev = next(iter(dev.values()))
            if isinstance(dev, (list, tuple, dict)):
                raise ValueError(f"dev_data: {len(dev)} data sets for one --data; give one dev file (or none)")
            if names is not None:
                raise ValueError(f"task_names: {list(names)} names the tasks of several --data sets; this run has "
                                 "one")
            self.data, self.dev_data, self.task_names = data, dev, None
            return
        paths = list(data.values()) if isinstance(data, dict) else list(data)
        given = [str(k) for k in data] if isinstance(data, dict) else None
        if names is not None and given is not None and list(names) != given:
            raise ValueError(f"task_names: {list(names)}, but data is a mapping that names its tasks {given}; drop "
                             "task_names, or give data as a list")
        if names is not None and len(names) != len(paths):
            raise ValueError(f"task_names: {len(names)} names ({', '.join(names)}) for {len(paths)} data sets; give "
                             "one name per --data, in its order")
        source = ("task_names: the name(s) {} repeat ({}); give each task its own name" if names is not None else
                  "data: the task name(s) {} repeat ({}, from the data sets' GLUE folder or file names); pass "
                  "--task-names (YAML task_names, or data as a mapping) to name each task")
        names = list(names or given or [default_task_name(p) for p in paths])
        bad = next((n for n in names if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", n)), None)
        if bad is not None:
            raise ValueError(f"task_names: {bad!r} is not a task name; use letters, digits and _ . - (it names the "
                             "task's metrics, 'NAME/accuracy', and its folder under peft_adapter/)")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(source.format(twice, ", ".join(names)))
        if isinstance(dev, str):
            raise ValueError(f"dev_data: one file for {len(names)} data sets; give one per task ({', '.join(names)}), "
                             "in the order of --data")
        if isinstance(dev, (list, tuple)):
            if len(dev) != len(names):
                raise ValueError(f"dev_data: {len(dev)} files for {len(names)} data sets; give one per task "
                                 f"({', '.join(names)}), in the order of --data")
            dev = dict(zip(names, dev))
        elif isinstance(dev, dict):
            # a mapping may name some tasks only: the others take their default dev set (a GLUE folder's dev.tsv, a
            # table's held-out split), as one data set without --dev-data (it had to name every task, so a GLUE
            # folder's task could not keep its dev.tsv beside a table's dev file)
            dev = {str(k): v for k, v in dev.items()}
            unknown = [k for k in dev if k not in names]
            if unknown:
                missing = [n for n in names if n not in dev]
                close = {k: difflib.get_close_matches(k, missing or names, n=1) for k in unknown}
                said = [f"{k!r} is not a task of data" + (f" (did you mean {m[0]!r}?)" if m else "")
                        for k, m in close.items()]
                raise ValueError(f"dev_data: {'; '.join(said)}; its keys are task names ({', '.join(names)}), each "
                                 "with its dev file (a task left out takes its default dev set)")
            dev = {n: dev[n] for n in names if n in dev}
        self.data, self.dev_data, self.task_names = dict(zip(names, paths)), dev, None

    @property
    def tasks(self) -> list[str] | None:
        """The task names of a multi-task run (several data sets), in order; None for one data set."""
        return list(self.data) if isinstance(self.data, dict) else None

    def mirror_config(self) -> MirrorConfig:
        try:
            return MirrorConfig(policy=self.mirror_policy, drift_threshold=self.drift_threshold,
                                kernel=self.mirror_kernel, pack=self.mirror_pack)
        except ValueError as e:  # MirrorConfig names its own fields; the error names this config's key (the YAML key)
            name, _, why = str(e).partition(": ")
            key = {"policy": "mirror_policy", "kernel": "mirror_kernel", "pack": "mirror_pack"}.get(name)
            if key is None:
                raise
            raise ValueError(f"{key}: {why}") from None

    @classmethod
    def from_dict(cls, d: dict, key_names: dict | None = None) -> "TrainConfig":
        """A TrainConfig of mapping `d`. A key it lacks is a ValueError naming the key it most likely meant: a
        `TrainingArguments` or PEFT name's (`_HF_KEY_NAMES`), one of `key_names` ({spelling: key}: `train` gives
        its flags whose key is another name, `lrs` for --lrs: mode_lrs, `no_controller`: `controller: false`; None:
        a flag with no key, `resume`), else the closest key by spelling."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known, key=str)  # key=str: a YAML key may be a number (`5: x`)
        if unknown:
            # a typo, or a flag's spelling (batch-size): name the key it most likely meant
            names = {**_HF_KEY_NAMES, **(key_names or {})}
            close = {str(k): [names[str(k).replace("-", "_")]] if str(k).replace("-", "_") in names
                     else difflib.get_close_matches(str(k).replace("-", "_"), known, n=1) for k in unknown}
            hint = "; ".join(f"{k!r}: did you mean {m[0]!r}?" if m[0] is not None else
                             f"{k!r} is a command-line flag (--{k.replace('_', '-')}), not a config key"
                             for k, m in close.items() if m)
            raise ValueError(f"config: unknown key(s) {unknown}{f' ({hint})' if hint else ''}; valid keys are "
                             f"{sorted(known)}")
        return cls(**d)

    def signal_config(self) -> SignalConfig:
        return SignalConfig(kind=self.signal, loss_scale=self.loss_scale, calibration_steps=self.calibration_steps,
                            calibration_target=self.calibration_target)

    def actuator_config(self) -> ActuatorConfig:
        """What the controller sets in each mode: the rank, and the LR as a multiplier of the optimizer's scheduled LR
        (`Run.base_lr` × the schedule's factor). lr_mode "absolute": each mode's LR is its multiplier of a base LR
        of 1, so the schedule scales it as it scales `lr` in "multiplier" mode; at a factor of 1 (a constant
        schedule) the LR used is 1 × 1 × the mode's LR, bit for bit the mode's LR."""
        levels = tuple(self.rank_levels)
        ranks = (levels[0], levels[min(1, len(levels) - 1)], levels[-1])
        checked = ActuatorConfig(mode_ranks=ranks, lr_mode=self.lr_mode, mode_lrs=tuple(self.mode_lrs))  # names mode_lrs
        if self.lr_mode == "absolute":
            return ActuatorConfig(mode_ranks=ranks, lr_mode="multiplier", mode_multipliers=checked.mode_lrs)
        return checked

    def machine_config(self) -> MachineConfig:
        if not self.controller:  # pinned: every φ in [0, 1) is MULTI
            return MachineConfig(theta0=0.0, theta1=1.0)
        return MachineConfig(theta0=self.theta0, theta1=self.theta1, min_dwell=self.min_dwell,
                             warmup_steps=self.controller_warmup)

    @property
    def has_shock(self) -> bool:
        return self.shock_end > self.shock_start


def default_task_name(path: str) -> str:
    """A data set's task name where none is given: a GLUE folder's task key (`glue/SST-2`: sst2), else the folder's
    or file's stem, lower-case (`rte_small.csv`: rte_small)."""
    p = Path(str(path).rstrip("/\\"))
    key = normalize_task(p.name)
    return key if key in _GLUE and not p.suffix else (p.stem or p.name).lower()


LEGACY_SCHEDULE = {"lr_scheduler": "constant", "warmup_steps": 0, "warmup_ratio": 0.0, "lr_scheduler_kwargs": {},
                   "total_steps": None}
# get_scheduler's own arguments, which the run sets: not settings of a schedule's --lr-scheduler-kwargs
_SET_BY_THE_RUN = {"num_warmup_steps": "the warm-up: --warmup-steps or --warmup-ratio (warmup_steps, warmup_ratio)",
                   "num_training_steps": "the run's length: --steps, or --epochs", "last_epoch": "the run (a resume)",
                   "optimizer": "the run"}


def _installed_schedule(name: str) -> dict:
    """The keyword arguments of schedule `name`'s function in the installed transformers: {name: its default, or
    inspect.Parameter.empty where it has none}, less get_scheduler's own (`_SET_BY_THE_RUN`). A schedule this
    transformers lacks is a ValueError."""
    import transformers
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    try:
        func = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    except (ValueError, KeyError):
        raise ValueError(f"lr_scheduler: {name!r} is not in the installed transformers {transformers.__version__}; "
                         "upgrade transformers, or pick another schedule") from None
    return {k: p.default for k, p in inspect.signature(func).parameters.items()
            if k not in _SET_BY_THE_RUN and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_scheduler_kwargs(cfg: TrainConfig) -> dict:
    """`cfg.lr_scheduler_kwargs` (a mapping, or its JSON text; None: none) checked against the schedule
    `cfg.lr_scheduler`: each setting one of its own (`SCHEDULER_KWARGS`, found in the installed transformers), of its
    type and range; the required ones given (those without a default in transformers, and one of min_lr / min_lr_rate
    for the cosine_*min_lr schedules). Returns them typed, in the table's order; else a ValueError naming the schedule
    and the setting. A setting that is an absolute LR in transformers (`ABSOLUTE_LR_KWARGS`: polynomial's lr_end,
    min_lr) becomes the factor value / base LR there, and the controller scales the factor by the mode's multiplier:
    in lr_mode "multiplier" it is the LR of a mode at multiplier 1 (MULTI), as --lr is, and must be below --lr; in
    "absolute" (a base LR of 1, each mode its own LR) it cannot be honoured and is refused."""
    name, given, field_ = cfg.lr_scheduler, cfg.lr_scheduler_kwargs, "lr_scheduler_kwargs"
    example = '{"min_lr_rate": 0.1}'
    if given is None:
        given = {}
    if isinstance(given, str):
        try:
            given = json.loads(given) if given.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{field_}: not JSON ({e.msg} at column {e.colno}) in {given!r}; give a JSON object of "
                             f"the schedule's settings, e.g. '{example}'") from None
    if not isinstance(given, dict):
        raise ValueError(f"{field_}: must be a mapping of the schedule's settings to values, e.g. {example}, got "
                         f"{given!r} ({type(given).__name__})")
    table = SCHEDULER_KWARGS[name]
    if not table:
        if given:
            raise ValueError(f"{field_}: lr_scheduler {name!r} takes none (its only settings are the warm-up and the "
                             f"run's length), got {given}")
        return {}
    installed = _installed_schedule(name)
    own = [k for k in table if k in installed]
    out = {}
    for key, v in given.items():
        if key in _SET_BY_THE_RUN:
            raise ValueError(f"{field_}: {key!r} is not a setting of {name} here: it is {_SET_BY_THE_RUN[key]}")
        if key not in own:  # (a close name suggested, as for a config key: min_lr_ratio is warmup_stable_decay's)
            close = difflib.get_close_matches(str(key), own, n=1)
            raise ValueError(f"{field_}: {key!r} is not a setting of lr_scheduler {name!r}"
                             + (f" (did you mean {close[0]!r}?)" if close else "") + f"; its settings are {own}")
        kind, ok, why = table[key]
        where = f"{field_}.{key} ({name})"
        if kind is str:
            if not isinstance(v, str):
                raise ValueError(f"{where}: must be a string, got {v!r} ({type(v).__name__})")
        else:
            v = _scalar(where, v, kind)
        if not ok(v):
            raise ValueError(f"{where}: {why}, got {v!r}")
        out[key] = v
    missing = [k for k in own if installed[k] is inspect.Parameter.empty and k not in out]
    if missing:
        raise ValueError(f"{field_}: lr_scheduler {name!r} needs {missing[0]} (transformers has no default for it), "
                         f"e.g. --lr-scheduler-kwargs '{{\"{missing[0]}\": ...}}'")
    if "min_lr_rate" in own and ("min_lr" in out) == ("min_lr_rate" in out):
        raise ValueError(f"{field_}: lr_scheduler {name!r} needs one of min_lr_rate (the LR it decays to, as a "
                         "share of the mode's LR) and min_lr (an LR), got "
                         + ("both" if "min_lr" in out else "neither"))
    for key in ("warmup_lr_rate", "warmup_type"):
        if key in out and not (cfg.warmup_steps or cfg.warmup_ratio):
            raise ValueError(f"{field_}.{key} ({name}): shapes the warm-up, and this run has none; give --warmup-steps "
                             "or --warmup-ratio, or drop it")
    key = ABSOLUTE_LR_KWARGS.get(name)
    if key is not None and cfg.lr_mode == "absolute" and key in out:
        instead = ("min_lr_rate, the LR it decays to as a share of the mode's LR" if key == "min_lr" else
                   f"none (it then decays to {installed[key]:g} x the mode's LR)")
        raise ValueError(f"{field_}.{key} ({name}): an absolute LR, which --lr-mode absolute cannot honour (each mode "
                         f"has its own LR, --lrs, which the schedule's factor scales); give {instead}, or use "
                         "--lr-mode multiplier, where it is the LR of MULTI (x the mode's multiplier, as --lr is)")
    if key is not None and cfg.lr_mode == "multiplier" and out.get(key, installed[key]) is not None:
        v = out.get(key, installed[key])
        if v > cfg.lr or (key == "lr_end" and v == cfg.lr):  # (transformers requires lr_end < the base LR)
            given_as = "" if key in out else " (transformers' default)"
            raise ValueError(f"{field_}.{key} ({name}): {v:g}{given_as}, the LR the schedule decays to, must be below "
                             f"--lr {cfg.lr:g} (the base LR that it is a share of)")
    return {k: out[k] for k in own if k in out}


def needs_total(s: dict) -> bool:
    """Whether the schedule `s` (an `lr_schedule`, or a TrainConfig's fields) spans the run's total steps: a decaying
    one's factor at a step depends on it (warmup_stable_decay's, unless num_stable_steps fixes its stable phase)."""
    return s["lr_scheduler"] in DECAYING and "num_stable_steps" not in (s.get("lr_scheduler_kwargs") or {})


def lr_schedule(cfg: TrainConfig, total_steps: int | None) -> dict:
    """The LR schedule of a run of `total_steps` optimizer steps: `cfg.lr_scheduler`, its warm-up in steps
    (`warmup_steps`, or `warmup_ratio` of the total rounded up, as transformers' Trainer resolves a ratio), its own
    settings (`lr_scheduler_kwargs`) and the total, which a decaying schedule (`DECAYING`) decays over. A warm-up
    longer than the run, a warmup_stable_decay whose phases do not fit in it, and a schedule that needs the total
    where none is known, are UsageErrors."""
    kwargs = dict(cfg.lr_scheduler_kwargs or {})
    warmup = cfg.warmup_steps or (math.ceil(cfg.warmup_ratio * total_steps) if cfg.warmup_ratio and total_steps else 0)
    out = {"lr_scheduler": cfg.lr_scheduler, "warmup_steps": warmup, "warmup_ratio": cfg.warmup_ratio,
           "lr_scheduler_kwargs": kwargs, "total_steps": total_steps}
    if not total_steps and (needs_total(out) or cfg.warmup_ratio):
        raise UsageError(f"lr_scheduler {cfg.lr_scheduler!r}" + (f" with warmup_ratio {cfg.warmup_ratio}"
                                                                 if cfg.warmup_ratio else "")
                         + ": needs the run's number of optimizer steps (steps, or total_steps)")
    if total_steps and warmup > total_steps:
        raise UsageError(f"warmup_steps: {warmup} steps of warm-up, but the run has {total_steps} optimizer steps: its "
                         "LR would never reach the mode's LR; give fewer warm-up steps (or more --steps / --epochs)")
    if cfg.lr_scheduler == "warmup_stable_decay" and total_steps and "num_decay_steps" in kwargs:
        stable = kwargs.get("num_stable_steps")
        phases = warmup + (stable or 0) + kwargs["num_decay_steps"]
        if phases > total_steps:
            said = (f"{warmup} warm-up + {stable} stable (num_stable_steps) + " if stable is not None
                    else f"{warmup} warm-up + ")
            raise UsageError(f"lr_scheduler_kwargs.num_decay_steps (warmup_stable_decay): {said}"
                             f"{kwargs['num_decay_steps']} decay steps are {phases}, but the run has {total_steps} "
                             "optimizer steps: its decay would " + ("not end" if stable is not None or not warmup
                                                                   else "start before its warm-up ends")
                             + "; give fewer steps (or more --steps / --epochs)")
    return out


def describe_schedule(s: dict) -> str:
    """`cosine, 10 warm-up steps, decaying over 100 steps`; `cosine_with_min_lr (min_lr_rate=0.1), ...`;
    `constant`: an `lr_schedule` in words."""
    kwargs = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in
              (s.get("lr_scheduler_kwargs") or {}).items()]
    words = [s["lr_scheduler"] + (f" ({', '.join(kwargs)})" if kwargs else "")]
    if s.get("warmup_steps"):
        ratio = f" (warmup_ratio {s['warmup_ratio']:g})" if s.get("warmup_ratio") else ""
        words.append(f"{s['warmup_steps']} warm-up step{'s' if s['warmup_steps'] != 1 else ''}{ratio}")
    if needs_total(s):
        words.append(f"{'over a run of' if s['lr_scheduler'] == 'warmup_stable_decay' else 'decaying over'} "
                     f"{s['total_steps']} steps")
    return ", ".join(words)


# ----------------------------------------------------------------------------- model and data


def hub_snapshot(repo_id: str) -> Path | None:
    """The folder of the Hugging Face cache (`HF_HUB_CACHE`, under `HF_HOME`) that holds the hub id `repo_id` at its
    main revision, as `from_pretrained(repo_id)` reads it offline (`models--org--name/snapshots/<the commit of
    refs/main>`), or None where the cache has no config.json of it there. It holds the files downloaded so far (the
    weights too, once the model has been loaded); nothing is fetched."""
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(repo_id, "config.json")
    except (ImportError, ValueError, OSError):  # (an id the hub's own checks refuse: not in the cache)
        return None
    return Path(config).parent if isinstance(config, str) and Path(config).is_file() else None


def resolve_model(path: str | None, recorded: bool = False) -> str:
    """The model to load for `path` (a `--model`, or None: the bundled all-MiniLM-L6-v2): a local model folder, or a
    hub id for from_pretrained to fetch or read from the Hugging Face cache. A path that is no folder and reads as
    a hub id `org/name` where `org` is a local folder of saved models is refused as a typo of one of them, unless the
    Hugging Face cache holds that hub id (`hub_snapshot`). `recorded`: the model a run recorded, which its `train`
    took (local paths are stored absolute, so a relative one is the hub id it trained on), not checked for a typo."""
    if path is None:
        from .data import default_model_path

        return default_model_path()
    p = Path(path).expanduser()
    if p.exists():
        from .callbacks import ADAPTER_ONLY_NAME, is_adapter_only_folder

        if is_adapter_only_folder(p):
            raise UsageError(f"--model {path}: an adapter-only checkpoint (it holds {ADAPTER_ONLY_NAME}: the trained "
                             "LoRA blocks without the base weights); pass the base model it was trained on")
        if p.is_file():  # (it said "folder has no config.json" of a file: a model's config.json or weights file)
            hint = f": pass its folder, {p.parent}" if (p.parent / "config.json").is_file() else \
                "; pass the model's folder, saved with save_pretrained() (config.json and the weights)"
            raise UsageError(f"--model {path}: a file, not a model folder{hint}")
        if not (p / "config.json").is_file():
            raise UsageError(f"--model {path}: folder has no config.json; pass a folder saved with save_pretrained()")
        return str(p)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) or path.startswith((".", "~")):
        raise UsageError(f"--model {path}: no such folder; pass a local model folder or a Hugging Face id like org/name")
    # `models/gpt22` reads as a hub id, org `models`: where `models/` is a local folder of saved models, it is a typo
    # of one of them (it went to the hub, with retries offline, and failed as a network error, naming no folder).
    # A hub id the Hugging Face cache holds is no typo (org/name was refused beside a local org/ though cached), nor
    # is the hub id a run recorded (its predict, export and --resume were refused there)
    try:
        local = sorted(d.name for d in p.parent.iterdir() if (d / "config.json").is_file()) \
            if "/" in path and not recorded and p.parent.is_dir() else []
    except OSError:  # (a folder this user cannot list: taken for the hub id, as before)
        local = []
    if local and hub_snapshot(path) is None:
        import difflib

        close = difflib.get_close_matches(p.name, local, n=1)
        hint = f" (did you mean {p.parent / close[0]}?)" if close else ""
        raise UsageError(f"--model {path}: no such folder{hint}; the local folder {p.parent} holds the models "
                         f"{', '.join(local[:5])}{' ...' if len(local) > 5 else ''}, not {p.name}, and the Hugging "
                         f"Face cache has no {path} (for that hub id, run where {p.parent} is no local folder, or "
                         "download it into the cache first)")
    return path  # a hub id; from_pretrained will say if it cannot be fetched


def _hf_quiet():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "classifier newly initialised" report is expected here
    hf_logging.disable_progress_bar()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def resolve_device(spec: str) -> torch.device:
    """The torch device `--device` names: "auto" is cuda where torch sees a GPU, else the CPU. A device this machine
    lacks (cuda without a GPU or a CUDA build of torch, cuda:N past the last GPU, mps off Apple silicon) and a
    malformed name are UsageErrors that name it."""
    if not isinstance(spec, str) or not re.fullmatch(DEVICE_FORM, spec):
        raise UsageError(f"--device {spec}: not a device; use auto, cpu, cuda, cuda:N or mps")
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type == "cuda" and dev.index is None and world_size() > 1:  # under torchrun: LOCAL_RANK's GPU
        return torch.device("cuda", torch.cuda.current_device())  # (`init_distributed` set it)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"--device {spec}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"--device {spec}: MPS is not available on this machine")
    return dev


def device_label(device: torch.device) -> str:
    """`cuda:0 (NVIDIA H100 80GB HBM3)`, `cpu`: where a run trains, as its console and summary say it."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


# ----------------------------------------------------------------------------- several processes (torchrun)


def world_size() -> int:
    """The number of processes of the initialised process group (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def process_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def launched_processes() -> int:
    """WORLD_SIZE as torchrun (or accelerate launch) sets it; 1 outside such a launcher."""
    world = os.environ.get("WORLD_SIZE", "").strip()
    return int(world) if world.isdigit() and int(world) > 0 else 1


def init_distributed(spec: str) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1): this process's device and its process group, from the launcher's environment
    (RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `--device auto` or `cuda` is the GPU of LOCAL_RANK, with NCCL; `cpu`
    (or auto without a GPU) takes gloo. A device torchrun's processes cannot share (cuda:N: every process on one GPU;
    mps) is a UsageError, before the process group is built."""
    import torch.distributed as dist

    # imported before the group exists: its 10 functions take `group=group.WORLD` as a default, evaluated at import,
    # so imported later (DDP's constructor imports torch._dynamo, which imports it) they hold the group for good, and
    # destroy_process_group() leaves it and gloo's threads running into the interpreter's shutdown, where a gloo
    # thread that takes the GIL aborts the process ("terminate called without an active exception", SIGABRT)
    import torch.distributed.nn.functional  # noqa: F401

    dev = resolve_device(spec)
    if dev.type == "mps":
        raise UsageError(f"--device {spec}: several processes (torchrun) train on cuda or cpu only; pass --device "
                         "cpu, or run one process")
    if dev.type == "cuda":
        if spec not in ("auto", "cuda"):
            raise UsageError(f"--device {spec}: under torchrun each process trains on the GPU of its LOCAL_RANK; pass "
                             "--device cuda (or auto), and choose the GPUs with CUDA_VISIBLE_DEVICES")
        local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= count:
            raise UsageError(f"--device {spec}: LOCAL_RANK {local}, but this machine has {count} CUDA device(s); "
                             f"start at most {count} processes per machine (--nproc-per-node)")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dist.init_process_group("gloo")
    return dev


def on_rank0(fn: Callable[[], object]):
    """`fn()` on process 0 alone, its result (or its exception) handed to every process: what writes the run's files
    (a checkpoint, the summary) or reads a folder that process 0 may change (`latest_checkpoint` settles an interrupted
    save). Every process returns the same value or raises the same error, so they go on, or stop, together. Without
    a process group, `fn()`."""
    import torch.distributed as dist

    if world_size() == 1:
        return fn()
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (True, fn())
        except Exception as e:
            try:
                pickle.dumps(e)
            except Exception:  # noqa: BLE001 - an exception that does not pickle goes as its words
                e = RuntimeError(f"{type(e).__name__}: {e}")
            box[0] = (False, e)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def agree_max(value: int) -> int:
    """The largest of every process's `value` (one all-reduce), `value` itself in one process."""
    import torch.distributed as dist

    if world_size() == 1:
        return value
    from .distributed import _device

    t = torch.tensor([value], dtype=torch.int64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def check_precision(device: torch.device, precision: str) -> None:
    """A UsageError where torch cannot run `precision` on `device`: autocast with that dtype (bf16 on a GPU without
    it, a dtype the device's autocast lacks, which torch only warns about and then runs in fp32) or, for fp16, a
    GradScaler there. torch 2.13's CPU autocast takes both bf16 and fp16, and its GradScaler runs on the CPU."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return
    why = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.autocast(device.type, dtype=dtype):
                pass
            if precision == "fp16" and not torch.amp.GradScaler(device.type).is_enabled():
                why = f"torch has no GradScaler on {device.type}"
        except (RuntimeError, ValueError, AssertionError) as e:
            why = _first_line(e)
    why = why or next((_first_line(w.message) for w in caught if "autocast" in str(w.message).lower()), None)
    if why:
        raise UsageError(f"--precision {precision}: not available on {device} ({why}); use --precision fp32"
                         f"{' or bf16' if precision == 'fp16' else ' or fp16'}")


def autocast(device: torch.device, precision: str):
    """The context a forward and its loss run in: torch.autocast to `precision`'s dtype, or none for fp32."""
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def model_device(model) -> torch.device:
    """Where `model`'s parameters are (the first one's device), the CPU for a model without parameters."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def detect_task_type(path: str, task_type: str = "auto") -> str:
    """'auto' -> 'causal-lm' for decoder-only architectures (…ForCausalLM / …LMHeadModel), else 'seq-cls'."""
    if task_type != "auto":
        return task_type
    from transformers import AutoConfig

    _hf_quiet()
    try:
        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {path}: cannot load its config ({_first_line(e)}); check the path or hub id") from None
    archs = cfg.architectures or []
    causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs)
    return "causal-lm" if causal else "seq-cls"


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    _hf_quiet()
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {path}: cannot load its tokenizer ({_first_line(e)}); check the path or hub id") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _in_fp32() -> dict:
    """from_pretrained's keyword for fp32 weights. transformers 5 loads a checkpoint in the dtype it was saved in
    (dtype="auto"), so a bf16 checkpoint would train in bf16 throughout here: base, LoRA blocks, head and AdamW's
    moments, on the CPU. transformers 4 loaded fp32 by default and names the keyword torch_dtype."""
    import transformers

    return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}


def load_model(path: str, task_type: str, num_labels: int = 2, note: Callable[[str], None] | None = None):
    """(model, tokenizer) for 'seq-cls' or 'causal-lm'. A seq-cls model gets a classifier head with `num_labels`
    outputs: a new one for a base model; for a checkpoint that already has a head, its own head when the label counts
    agree, else a new head (the checkpoint's is left unused, and `note` says so). The modules initialised afresh
    (`fresh_modules`) are recorded on the model, and `Run` trains them with the head. The weights are fp32, whatever
    dtype the checkpoint was saved in (a bf16 one included)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    _hf_quiet()
    try:
        tok = AutoTokenizer.from_pretrained(path)
        if task_type == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(path, **_in_fp32())
        else:
            cfg = AutoConfig.from_pretrained(path)
            has_head = any(a.endswith("ForSequenceClassification") for a in (cfg.architectures or []))
            if has_head and cfg.num_labels != num_labels and note is not None:
                note(f"--model {path}: its classification head has {cfg.num_labels} outputs and the data has "
                     f"{num_labels} classes, so a new {num_labels}-class head is trained in its place")
            # a head of another size is re-initialised instead of failing to load (transformers' size check)
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, ignore_mismatched_sizes=True, output_loading_info=True, **_in_fp32())
            model._unified_lora_fresh_modules = fresh_modules(model, info)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {path}: cannot load it ({_first_line(e)}); check the path or hub id") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def fresh_modules(model, loading_info: dict) -> list[str]:
    """The outermost modules whose every parameter `from_pretrained` initialised afresh (missing from the checkpoint,
    or re-initialised for a size mismatch): the parts of a new task head. DistilBERT's head is `pre_classifier` and
    `classifier`, DeBERTa's `pooler` and `classifier`, BART's `classification_head`, XLNet's `sequence_summary` and
    `logits_proj`; frozen, they would stay at their random initialisation, and no checkpoint would hold them."""
    new = set(loading_info.get("missing_keys") or ())
    new |= {k[0] if isinstance(k, (tuple, list)) else k for k in loading_info.get("mismatched_keys") or ()}
    out: list[str] = []
    for name, module in model.named_modules():  # parents come before their children
        if not name or any(name.startswith(o + ".") for o in out):
            continue
        params = [f"{name}.{n}" for n, _ in module.named_parameters()]
        if params and all(p in new for p in params):
            out.append(name)
    return out


def total_norm(tensors: Sequence[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of `tensors` taken together, a 0-d tensor on the first one's device (NaN where one holds a NaN; 0 for
    none): `torch.nn.utils.get_total_norm`, which came in torch 2.6, or on torch 2.4 and 2.5 (pyproject's oldest), which
    lack it, the same norm of the tensors' norms (without it `train_step` raised AttributeError there)."""
    get = getattr(torch.nn.utils, "get_total_norm", None)
    if get is not None:
        return get(tensors, norm_type=norm_type)
    if not tensors:
        return torch.tensor(0.0)
    first = tensors[0].device
    norms = [torch.linalg.vector_norm(t.detach(), norm_type).to(first) for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def seq_cls_head(model) -> list[str]:
    """modules_to_save for a sequence classifier from `load_model`: its head (BERT's `classifier`, GPT-2's and Llama's
    `score`), and every other module `from_pretrained` initialised afresh (`fresh_modules`), which would otherwise stay
    frozen at its random initialisation."""
    mts = [n for n in ("classifier", "score") if any(m == n or m.endswith("." + n) for m, _ in model.named_modules())][:1]
    return mts + [m for m in getattr(model, "_unified_lora_fresh_modules", ()) if not _covered(m, mts)]


def _covered(path: str, names: Sequence[str]) -> bool:
    """`path` is, or sits inside, a module that modules_to_save `names` (name suffixes) select."""
    parts = path.split(".")
    return any(p == n or p.endswith("." + n) for p in (".".join(parts[:i + 1]) for i in range(len(parts)))
               for n in names)


class TextCorpus(list):
    """Causal-LM text from a plain-text file (.txt or .raw: tinyshakespeare, a wiki dump): a list of documents that
    `encode_rows` tokenises as one stream, with EOS between documents, and cuts into `max_length`-token blocks
    (the last, shorter part is dropped, as Hugging Face's run_clm does). A table's rows are separate samples.
    `source` is what an error calls it (`_load_texts`: its file; `split_corpus`: the train or dev split of it), and
    `split`, on a part that `split_corpus` made, is (the dev fraction, "train" or "dev", the other part)."""

    source = "the text corpus"
    split: tuple[float, str, TextCorpus] | None = None


PROMPT_COMPLETION = ("prompt", "completion")  # a causal LM's table read as pairs without --text-columns
CHAT_COLUMN = "messages"  # a causal LM's table read as conversations without --text-columns (TRL's conversational LM)
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class Chat:
    """One row of chat data for a causal LM, rendered with the tokenizer's chat template (`encode_chat`): a
    conversation (a `messages` column; `prompt` 0) or a conversational prompt/completion pair (two `--text-columns`
    holding lists of messages; `prompt` is how many of `messages` are the prompt's). `source` names the row in errors
    ("data.jsonl: record 3 (line 4)")."""

    messages: tuple
    prompt: int
    source: str


def _message_problem(m, i: int) -> str | None:
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        return f"message {i} is {m!r:.60}, not a {{\"role\": ..., \"content\": ...}} object"
    if m["role"] not in CHAT_ROLES:
        return f"message {i} has the role {m['role']!r}, not one of {list(CHAT_ROLES)}"
    if not isinstance(m["content"], str):
        return (f"message {i} has a {type(m['content']).__name__} as its content, not a string (content parts, such "
                "as images, are not read)")
    return None


def _messages(value, source: str, column: str) -> tuple:
    """A cell of chat data, checked: a non-empty list of {"role": one of CHAT_ROLES, "content": a string} objects
    (other keys, such as a tool call's, go to the template as they are). Anything else is a DataError naming the row,
    the column and the problem."""
    if not isinstance(value, list):
        problem = f"holds {'null' if value is None else 'a ' + type(value).__name__}, not a list of messages"
    elif not value:
        problem = "is an empty conversation (no message)"
    else:
        problem = next((": " + p for p in map(_message_problem, value, itertools.count(1)) if p), None)
    if problem:
        raise DataError(f"{source}: column {column!r}{'' if problem[0] == ':' else ' '}{problem}; chat data is a "
                        "list of {\"role\": ..., \"content\": \"...\"} messages a record")
    return tuple(value)


def unused_label_note(records: list[dict], columns: Sequence[str], label_column: str | None, path: Path,
                      note: Callable[[str], None] | None) -> None:
    """A `note` that a causal LM's table has the column `label_column` (a classifier's labels), not one of the
    `columns` it reads: a classification table went to a causal LM without a word."""
    if note is not None and label_column is not None and label_column not in columns and any(
            label_column in r for r in records):
        note(f"{path}: column {label_column!r} is not used: a causal LM reads the text "
             f"({', '.join(map(repr, columns))}), not labels")


def _load_texts(path: Path, columns: Sequence[str], detect: bool = False, label_column: str | None = None,
                note: Callable[[str], None] | None = None) -> tuple[list, list[str]]:
    """Causal-LM data and the columns it was read from: one text column of a .csv/.tsv/.jsonl table (a list of texts),
    two (prompt, completion: a list of (prompt, completion) pairs), or a whole .txt file (a TextCorpus). A .jsonl
    column of lists of messages is chat data (a list of `Chat`): one column a conversation each row, two a
    conversational prompt and completion. With `detect`, a table read for the column "text" that has no such column
    but "prompt" and "completion" columns is read as those pairs, and one with a "messages" column as chat data.
    A table that has the column `label_column` (a classifier's labels), not read as text, gets a `note` saying that
    it is not used (a classification table went to a causal LM without a word)."""
    columns = list(columns)
    fmt = path.suffix.lstrip(".").lower()
    if fmt in TEXT_SUFFIXES:
        if len(columns) > 1:
            raise DataError(f"{path}: a plain-text corpus has no columns; prompt/completion pairs (--text-columns "
                            f"{','.join(columns)}) are read from a .csv, .tsv or .jsonl table")
        if not path.is_file():
            raise DataError(f"data file not found: {path}; check the path")
        text = read_text(path)
        if not text.strip():
            raise DataError(f"{path} is empty; a .txt corpus needs some text")
        corpus = TextCorpus([text])
        corpus.source = str(path)
        return corpus, columns
    if fmt not in ("csv", "tsv", "jsonl"):
        raise DataError(f"unsupported data format {fmt!r} for {path}; use a .csv, .tsv, .jsonl or (causal-lm) plain-text .txt/.raw file")
    found = (*PROMPT_COMPLETION, CHAT_COLUMN) if detect and columns == ["text"] else ()
    records = _read_records(path, fmt, [*columns, *found])
    if not records:
        raise no_rows_error(path)
    if detect and columns == ["text"] and "text" not in records[0]:
        if all(c in records[0] for c in PROMPT_COMPLETION):
            columns = list(PROMPT_COMPLETION)
        elif CHAT_COLUMN in records[0]:
            if fmt != "jsonl":
                raise DataError(f"{path}: column {CHAT_COLUMN!r} looks like chat data, which a .{fmt} cell cannot hold "
                                "(a cell is a text); write it as .jsonl, a list of {\"role\", \"content\"} messages a "
                                "record")
            columns = [CHAT_COLUMN]
    check_columns(records, columns, path)  # as load_table: a JSONL record without it was dropped silently
    unused_label_note(records, columns, label_column, path, note)
    if any(isinstance(r[c], list) for r in records for c in columns):  # chat data: every cell a list of messages
        chats, lines = [], record_lines(path)  # (each row's name in errors: its record and line)
        for n, record in enumerate(records, start=1):
            source = f"{path}: {record_at(path, n, lines)}"
            parts = [_messages(record[c], source, c) for c in columns]
            chats.append(Chat(sum(parts, ()), len(parts[0]) if len(parts) == 2 else 0, source))
        return chats, columns
    for column in columns:
        _check_no_null_text(records, column, path)
    if len(columns) == 1:
        return [str(r[columns[0]]) for r in records], columns
    prompt, completion = columns
    for n, record in enumerate(records, start=1):  # an empty completion has nothing to train on but the eos
        if not str(record[completion]).strip():
            raise DataError(f"{path}: {record_at(path, n)} has an empty completion (column {completion!r}); fill it "
                            "in or drop the record")
    return [(str(r[prompt]), str(r[completion])) for r in records], columns


def split_corpus(corpus: TextCorpus, fraction: float) -> tuple[TextCorpus, TextCorpus]:
    """(train, dev): the dev text is the last `fraction` of the corpus, cut at a line start, as nanoGPT holds
    out the end of tinyshakespeare. A contiguous tail keeps dev blocks from sharing text with train blocks."""
    text = "\n".join(corpus)
    cut = int(len(text) * (1.0 - fraction))
    line = text.rfind("\n", 0, cut) + 1
    cut = line if line > 0 else cut
    train, dev = text[:cut], text[cut:]
    if not train.strip() or not dev.strip():
        raise DataError(f"the corpus is too short to hold out {fraction:.0%} of it as dev text (--dev-fraction "
                        f"{fraction:g}); pass another --dev-fraction, or a --dev-data file")
    parts = TextCorpus([train]), TextCorpus([dev])
    for part, other, name, where in zip(parts, parts[::-1], ("train", "dev"), ("all but the last", "the last")):
        part.source = (f"the {name} split of {corpus.source} ({where} {fraction:.0%} of it, by --dev-fraction "
                       f"{fraction:g})")
        part.split = (fraction, name, other)
    return parts


def load_data(cfg: TrainConfig, task_type: str, note: Callable[[str], None] | None = None,
              detect: bool = True) -> tuple[object, object, str]:
    """(train, dev, task_name). seq-cls: TextDatasets; causal-lm: lists of strings, of (prompt, completion) pairs
    (two `text_columns`), of `Chat` rows (columns of lists of messages), or TextCorpus. With `detect` (leave it off on
    a resume: the run's stored columns are the layout it trained on), a causal LM's table with no "text" column but
    "prompt" and "completion" ones, or a "messages" one, read for the default `text_columns`, is read as those:
    `cfg.text_columns` is set to them (the checkpoints record it), and `note` says so."""
    if cfg.assistant_only_loss and task_type != "causal-lm":
        raise UsageError("--assistant-only-loss: for a causal LM's chat data; this run trains a classifier (seq-cls)")
    lm_data = ("a causal LM trains on a .txt corpus or a .csv/.tsv/.jsonl table (a text column, prompt/completion "
               "columns, or a .jsonl messages column)")
    if cfg.data is None and task_type == "causal-lm":  # the bundled MRPC pairs reached the causal-LM encoder
        raise UsageError(f"no --data: the bundled MRPC sentence pairs are for a classifier, and {lm_data}; pass "
                         "one with --data")
    path = Path(cfg.data).expanduser() if cfg.data is not None else None
    if path is not None and not path.exists():
        # (a causal LM's: it named the classifier's data alone, to a user who had given a .txt corpus)
        what = lm_data.replace("a causal LM trains on ", "") if task_type == "causal-lm" else \
            "a GLUE task folder or a .csv/.tsv/.jsonl file"
        raise DataError(f"--data {cfg.data}: no such file or folder; pass {what}")
    if cfg.dev_data and not Path(cfg.dev_data).expanduser().exists():  # (it was "data file not found", or a GLUE
        # folder's reader's error, which did not say it was the dev file)
        raise DataError(f"--dev-data {cfg.dev_data}: no such file; check the path")
    if cfg.data is None:  # the bundled MRPC; --dev-data, in MRPC's layout, replaces its dev.tsv (it was ignored)
        dev = _load_glue_file("mrpc", Path(cfg.dev_data).expanduser()) if cfg.dev_data else load_glue("mrpc", "dev")
        return load_glue("mrpc", "train"), dev, "mrpc"
    if path.is_dir() and task_type == "causal-lm":
        raise UsageError(f"--data {cfg.data}: a folder is read as a GLUE task, data for a classifier; {lm_data}")
    if path.is_dir():
        key = normalize_task(path.name)
        if key not in _GLUE:
            raise DataError(f"--data {cfg.data}: folder name must be a GLUE task ({sorted(_GLUE)}) holding train.tsv/dev.tsv")
        # --dev-data (a file in the task's own layout) replaces the folder's dev.tsv
        dev = _load_glue_file(key, Path(cfg.dev_data).expanduser()) if cfg.dev_data else load_glue(key, "dev", path)
        return load_glue(key, "train", path), dev, key
    if task_type == "causal-lm":
        # two columns are (prompt, completion) pairs, trained on the completion only (`encode_pairs`); lists of
        # messages are chat data (`encode_chat`)
        texts, columns = _load_texts(path, cfg.text_columns, detect=detect, label_column=cfg.label_column, note=note)
        if columns != list(cfg.text_columns):
            # found without --text-columns: recorded, so the run's checkpoints (and a --resume) keep this layout
            cfg.text_columns = columns
            if note is not None:
                note(f"--data {cfg.data}: no 'text' column but " + (
                    "'prompt' and 'completion': trained as prompt/completion pairs, the loss on the completion only"
                    if len(columns) == 2 else f"{CHAT_COLUMN!r}: trained as chat data, each conversation rendered with "
                    "the tokenizer's chat template") + " (--text-columns names other columns)")
        dev = _load_texts(Path(cfg.dev_data).expanduser(), cfg.text_columns, label_column=cfg.label_column,
                          note=note)[0] if cfg.dev_data else None
        if dev is not None and is_chat(dev) != is_chat(texts):
            raise DataError(f"--dev-data {cfg.dev_data}: its column(s) {list(cfg.text_columns)} hold "
                            f"{'chat' if is_chat(dev) else 'text'} data, and --data's "
                            f"{'chat' if is_chat(texts) else 'text'} data; give both the same layout")
        if cfg.assistant_only_loss and not is_chat(texts):
            raise UsageError(f"--assistant-only-loss: for chat data (lists of role/content messages, as a 'messages' "
                             f"column of a .jsonl table); --data {cfg.data} holds text")
        if dev is None:
            split = split_corpus if isinstance(texts, TextCorpus) else (lambda t, f: _split(t, f, cfg.seed))
            texts, dev = split(texts, cfg.dev_fraction)
        return texts, dev, "lm"
    if path.suffix.lstrip(".").lower() in TEXT_SUFFIXES:
        raise DataError(f"--data {cfg.data}: a plain-text file trains a causal LM (a ...ForCausalLM model, or "
                        f"--task-type causal-lm); a classifier needs a .csv/.tsv/.jsonl table with a label column")
    for flag, given in (("--data", cfg.data), ("--dev-data", cfg.dev_data)):
        # here, not load_table's hint ("or pass fmt="): a library argument, which the command line does not have
        fmt = Path(given).suffix.lstrip(".").lower() if given else "csv"
        if fmt not in ("csv", "tsv", "jsonl"):
            raise DataError(f"{flag} {given}: unsupported data format {fmt!r}; a classifier takes a .csv, .tsv or "
                            ".jsonl table with a label column (or, for --data, a GLUE task folder)")
    train = load_table(path, list(cfg.text_columns), cfg.label_column)
    # one class is nothing to learn. It was refused only when it made a 1-output head: an integer label (all 1s)
    # makes a 2-class head, and that trained on rows of one class; the demo took a 1-output head too, which
    # transformers reads as regression (an MSE loss on the class id)
    classes = sorted(set(train.labels))
    if len(classes) < 2:
        name = train.label_names[classes[0]] if train.label_names else classes[0]
        raise DataError(f"--data {cfg.data}: every row has the label {name!r} in column {cfg.label_column!r}; a "
                        "classifier needs rows of at least 2 classes")
    if cfg.dev_data:
        # the train set's classes: its label names, or for integer labels the ids 0 .. num_labels - 1, so a dev label
        # the train set lacks is a DataError now, not an index error at the first evaluation after training. By name
        # only: an integer dev label is no id into the train set's sorted names (with train labels -1/0/1, a dev 2
        # was read as id 2, the class "1"; with names, MNLI's 0 = entailment became the sorted "contradiction")
        names = train.label_names or [str(i) for i in range(train.num_labels)]
        dev = load_table(cfg.dev_data, list(cfg.text_columns), cfg.label_column, label_names=names, names_only=True,
                         classes_hint=f"of the train set ({cfg.data}); fix the label, or add rows of that class to "
                                      "--data")
        dev = TextDataset(dev.examples, train.num_labels, train.label_names, dev.name)
    else:
        tr, dv = _split(train.examples, cfg.dev_fraction, cfg.seed)
        train, dev = (TextDataset(tr, train.num_labels, train.label_names, train.name),
                      TextDataset(dv, train.num_labels, train.label_names, train.name + "/dev"))
    return train, dev, path.stem


def is_chat(rows) -> bool:
    """Whether `rows` (`load_data`'s) are chat data (`Chat` rows)."""
    return isinstance(rows, list) and bool(rows) and isinstance(rows[0], Chat)


def _split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    if len(items) < 2:
        raise DataError(f"need at least 2 rows to hold out a dev set, got {len(items)}; add rows or pass --dev-data")
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n_dev = min(len(items) - 1, max(1, int(round(len(items) * fraction))))  # a row each at least
    dev_idx = set(idx[:n_dev])
    return [x for i, x in enumerate(items) if i not in dev_idx], [items[i] for i in sorted(dev_idx)]


def _kept(count: int, n: int, seed: int) -> list[int] | None:
    """Sorted fixed-seed sample of n of range(count); None (keep all) when n is 0 or >= count."""
    return None if not n or n >= count else sorted(random.Random(seed).sample(range(count), n))


def subsample(items, n: int, seed: int):
    """A fixed-seed subsample of n items (order kept); all of them when n is 0 or >= len."""
    seq = items.examples if isinstance(items, TextDataset) else items
    keep = _kept(len(seq), n, seed)
    if keep is None:
        return items
    picked = [seq[i] for i in keep]
    if isinstance(items, TextDataset):
        return TextDataset(picked, items.num_labels, items.label_names, items.name)
    return picked


def encode_rows(tokenizer, rows, task_type: str, max_length: int, note: Callable[[str], None] | None = None,
                assistant_only: bool = False, text_eos: bool = True) -> dict[str, torch.Tensor]:
    """Tokenise every row once (padded to the longest); batches are row slices of these tensors. A causal LM's
    (prompt, completion) pairs go to `encode_pairs`, its chat rows to `encode_chat` (with `assistant_only`, the loss
    on the assistant turns only), its text rows to `encode_texts` (with `text_eos` and a tokenizer that has an eos
    token: the eos ends each row, as TRL's SFTTrainer adds it; else each row is the tokenizer's own encoding, cut at
    `max_length`); `note` gets their counts of rows left out or cut (either way for text rows)."""
    if task_type == "causal-lm" and isinstance(rows, TextCorpus):
        return encode_corpus(tokenizer, rows, max_length)
    if task_type == "causal-lm" and rows and isinstance(rows[0], Chat):
        return encode_chat(tokenizer, rows, max_length, assistant_only, note)
    if task_type == "causal-lm" and rows and isinstance(rows[0], tuple):
        return encode_pairs(tokenizer, rows, max_length, note)
    if task_type == "causal-lm":
        given = len(rows)
        rows = [r for r in rows if r.strip()]
        if not rows:
            raise DataError("no non-empty texts to train on; check --text-columns")
        if note is not None and len(rows) < given:  # (left out without a word: the run's row counts fell short)
            note(f"{given - len(rows)} of {given} text rows are empty and left out")
        if text_eos and tokenizer.eos_token_id is not None:
            return encode_texts(tokenizer, rows, max_length, note)
        # padded on the right whatever the tokenizer's padding_side: a decoder reads positions 0, 1, ... from the
        # row's first column (GPT-2's absolute position embeddings), so left padding moved every token of a short row
        # to later positions than generation gives it, and a dev row's perplexity depended on the rows it was
        # batched with
        side, tokenizer.padding_side = tokenizer.padding_side, "right"
        try:
            enc = tokenizer(rows, truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
        finally:
            tokenizer.padding_side = side
        # a row of one token has no next token to predict: a batch of such rows has a loss of 0/0 (NaN), and one
        # such row alone in evaluate's last batch made the dev loss and perplexity NaN
        keep = enc["attention_mask"].sum(1) >= 2
        if not bool(keep.any()):
            raise DataError(SINGLE_TOKEN_TEXTS)
        if note is not None:  # counted as the eos path counts them (the ids above are the tokenizer's, as before)
            full = [r for r, n in zip(rows, enc["attention_mask"].sum(1).tolist()) if n == max_length]  # (or cut)
            cut = sum(len(ids) > max_length for ids in tokenizer(full, verbose=False)["input_ids"]) if full else 0
            _note_rows(note, len(rows), len(rows) - int(keep.sum()), cut, max_length, "text rows", "token to predict",
                       "a single token", "their text")
        out = {"input_ids": enc["input_ids"][keep], "attention_mask": enc["attention_mask"][keep]}
        out["labels"] = out["input_ids"].masked_fill(out["attention_mask"] == 0, -100)
        return out
    from .data import encode

    return encode(tokenizer, rows.examples if isinstance(rows, TextDataset) else rows, max_length=max_length)


SINGLE_TOKEN_TEXTS = ("every text is a single token; a causal LM needs rows of at least 2 tokens (a token and the next "
                      "one to predict)")


def encode_texts(tokenizer, texts: Sequence[str], max_length: int,
                 note: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """A causal LM's text rows, each ended by the tokenizer's eos, as TRL's SFTTrainer ends a non-conversational text
    (`add_eos`): each text is tokenised whole (with the special tokens the tokenizer adds to a text: Llama's BOS), and
    the eos id is appended unless its tokens already end with it. The id, not the eos string appended to the text
    (TRL's way), which a tokenizer may read otherwise next to the text's last characters. Every token, the eos
    included, is a target; the padding is not (the labels follow the lengths, not the ids: GPT-2's padding is its
    eos). A row longer than `max_length` is cut at its end, as TRL cuts it after adding the eos (so a cut row has
    none), and a row of a single token, with no next token to predict, is left out; `note` gets both counts. Padded
    on the right."""
    eos = tokenizer.eos_token_id
    rows = []
    for ids in tokenizer(list(texts), verbose=False)["input_ids"]:
        ids = list(ids) + ([eos] if list(ids[-1:]) != [eos] else [])
        rows.append((ids, [True] * len(ids)))
    return _target_rows(tokenizer, rows, max_length, note, "text rows", "token to predict", "a single token",
                        "their text (and the eos)", SINGLE_TOKEN_TEXTS)


def special_prefix(tokenizer) -> list[int]:
    """The special tokens `tokenizer` puts before a single text's own tokens: Llama's BOS, BERT's [CLS]; none for
    GPT-2. Read off a probe text tokenised with and without them."""
    full = tokenizer("a", verbose=False)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return list(full[:i])
    specials = set(tokenizer.all_special_ids)  # (the probe tokenised otherwise next to them): the leading specials
    return list(itertools.takewhile(lambda t: t in specials, full))


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], max_length: int,
                 note: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """(prompt, completion) pairs for supervised fine-tuning of a causal LM, the loss on the completion only (TRL's
    `completion_only_loss`). Each row is the tokenizer's leading special tokens (`special_prefix`: Llama's BOS once;
    none for GPT-2), the prompt's tokens, the completion's tokens and the tokenizer's eos token (none where it has
    none, or where the completion's tokens already end with it, as TRL adds it only then), the prompt and the
    completion tokenised apart (no special tokens), so the boundary between them is exact: a space between them
    belongs to one of the texts (prompt "2+2=" and completion " 4"), and the prompt's tokens are those `predict` gives
    the model. Labels are -100 on the leading specials, the prompt and the padding; the completion's tokens and the
    eos are the targets. A row longer than `max_length` is cut at its end (TRL's default, truncation_mode=
    "keep_start"); a row with no completion token left within it (a prompt of `max_length` tokens or more) is left
    out, and `note` gets the counts of rows left out and cut. No row left is a DataError. Padded on the right."""
    if not pairs:
        raise DataError("no prompt/completion rows to train on")
    prefix, eos = special_prefix(tokenizer), tokenizer.eos_token_id
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False, verbose=False)["input_ids"]
    completions = tokenizer([c for _, c in pairs], add_special_tokens=False, verbose=False)["input_ids"]
    rows = []
    for p, c in zip(prompts, completions):
        ids = prefix + list(p) + list(c) + ([eos] if eos is not None and list(c[-1:]) != [eos] else [])
        start = len(prefix) + len(p)
        rows.append((ids, [i >= start for i in range(len(ids))]))
    return _target_rows(tokenizer, rows, max_length, note, "prompt/completion rows", "completion token",
                        "the prompt fills it", "their completion (and the eos)",
                        f"no prompt/completion row has a completion token within max_length {max_length} (every "
                        "prompt fills it); pass a larger --max-length or shorter prompts")


def _note_rows(note: Callable[[str], None], total: int, dropped: int, cut: int, max_length: int, what: str,
               target: str, why: str, rest: str) -> None:
    """Tell `note` how many of the `total` rows were left out (`dropped`: no `target`, because of `why`) and how many
    were cut at `max_length` (`cut`: the rest of `rest` not trained on); nothing for a count of 0."""
    if dropped:
        note(f"{dropped} of {total} {what} have no {target} within max_length {max_length} ({why}) and are left out")
    if cut:
        note(f"{cut} of {total} {what} are longer than max_length {max_length} and cut at its end: the rest of "
             f"{rest} is not trained on")


def _target_rows(tokenizer, rows: Sequence[tuple[list[int], list[bool]]], max_length: int,
                 note: Callable[[str], None] | None, what: str, target: str, why: str, rest: str,
                 none_left: str) -> dict[str, torch.Tensor]:
    """Rows of (token ids, which of them are targets) as padded tensors, the labels -100 but on the targets. A row
    longer than `max_length` is cut at its end; one left with no target after its first token (which no token
    predicts) is left out. `note` gets the counts of rows left out and cut (`what` the rows are, `target` what
    they lack, `why` they lack it, `rest` what a cut loses); none left is a DataError saying `none_left`."""
    kept, cut = [], 0
    for ids, targets in rows:
        if any(targets[1:max_length]):
            cut += len(ids) > max_length
            kept.append((ids[:max_length], targets[:max_length]))
    if not kept:
        raise DataError(none_left)
    if note is not None:
        _note_rows(note, len(rows), len(rows) - len(kept), cut, max_length, what, target, why, rest)
    width = max(len(ids) for ids, _ in kept)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(kept), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(kept), width), dtype=torch.long)
    labels = torch.full((len(kept), width), -100, dtype=torch.long)
    for i, (ids, targets) in enumerate(kept):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        labels[i, :len(ids)] = input_ids[i, :len(ids)].masked_fill(~torch.tensor(targets), -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def render_chat(tokenizer, messages: Sequence[dict], source: str, generation: bool = False) -> list[int]:
    """`messages` rendered with the tokenizer's chat template (with the assistant's generation prompt after them if
    `generation`) and tokenised as `apply_chat_template(tokenize=True)` does: no special tokens added, the template
    writes them. A template that fails on the row (one that raises "roles must alternate") is a DataError naming
    it."""
    from jinja2 import TemplateError  # (a torch dependency; transformers renders templates with it)

    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the model's tokenizer has no chat template, which chat data (lists of role/content messages) "
                        "is rendered with; use a model whose tokenizer has one (a chat or instruct checkpoint), or "
                        "set chat_template in its tokenizer_config.json")
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation)
    except (TemplateError, ValueError, TypeError, KeyError) as e:
        raise DataError(f"{source}: the tokenizer's chat template fails on it ({_first_line(e)})") from None
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _chat_prefix(tokenizer, row: Chat, k: int, ids: list[int], generation: bool, part: str, remedy: str) -> int:
    """How many of the conversation's tokens `ids` its first `k` messages take (with the generation prompt if
    `generation`): rendered alone, they must be a start of `ids`, else the template renders a turn otherwise when
    more follow, and where `part` begins cannot be told (a DataError naming the row)."""
    head = render_chat(tokenizer, row.messages[:k], row.source, generation) if k else []
    if ids[:len(head)] != head:
        raise DataError(f"{row.source}: the tokenizer's chat template renders the first {k} message(s)"
                        f"{' with the generation prompt' if generation else ''} as other tokens than the start of the "
                        f"whole conversation (the renderings do not nest), so {part} cannot be told apart; {remedy}")
    return len(head)


def encode_chat(tokenizer, rows: Sequence[Chat], max_length: int, assistant_only: bool = False,
                note: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """Chat data for a causal LM, each row rendered whole with the tokenizer's chat template (`render_chat`, as
    TRL's SFTTrainer renders conversational data; no eos added: the template ends each turn). The targets, as
    TRL's defaults: a conversation's every token; a conversational prompt/completion row's completion, from the end
    of the prompt rendered with the generation prompt. With `assistant_only` (TRL's `assistant_only_loss`) only the
    assistant turns' tokens are targets: for each assistant message, from the end of the messages before it rendered
    with the generation prompt to the end of the messages up to it rendered, so its content and the template's end of
    its turn, not the role header that the generation prompt gives at inference. This needs no `{% generation %}`
    markers in the template, but a template whose renderings of a conversation's first messages are not the start
    of its whole rendering (one that drops earlier turns' reasoning) is a DataError naming the row; so is a row with
    no assistant turn to train on. Cut and padded as `encode_pairs` rows."""
    if not rows:
        raise DataError("no chat rows to train on")
    remedy = ("train on the whole conversation (without --assistant-only-loss)" if assistant_only else
              "give the prompt and completion as one 'messages' conversation, trained whole")
    out = []
    for row in rows:
        ids = render_chat(tokenizer, row.messages, row.source)
        start = (_chat_prefix(tokenizer, row, row.prompt, ids, True, "the completion", remedy) if row.prompt else 0)
        targets = [i >= start for i in range(len(ids))]
        if assistant_only:
            turns = [False] * len(ids)
            for k, m in enumerate(row.messages):
                if m["role"] == "assistant":
                    lo = _chat_prefix(tokenizer, row, k, ids, True, "the assistant's turn", remedy)
                    hi = _chat_prefix(tokenizer, row, k + 1, ids, False, "the assistant's turn", remedy)
                    turns[lo:hi] = [True] * (hi - lo)
            targets = [a and b for a, b in zip(targets, turns)]
            if not any(targets):
                raise DataError(f"{row.source} has no assistant message{' in its completion' if row.prompt else ''}: "
                                "with --assistant-only-loss it has nothing to train on; drop it, or train on the "
                                "whole conversation")
        out.append((ids, targets))
    target = ("assistant token" if assistant_only else "completion token" if rows[0].prompt else
              "token to predict")
    return _target_rows(tokenizer, out, max_length, note, "chat rows", target,
                        "the messages before it fill it" if target != "token to predict" else "a single token",
                        "their conversation", f"no chat row has a {target} within max_length {max_length}; pass a "
                        "larger --max-length")


def _corpus_stream(tokenizer, corpus: TextCorpus) -> list[int]:
    """A TextCorpus's token ids as `encode_corpus` reads them: every document whole, EOS between documents."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in corpus:
        if stream and eos is not None:
            stream.append(eos)
        stream += tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
    return stream


def _corpus_fix(tokenizer, corpus: TextCorpus) -> str:
    """The advice for a corpus that gives fewer than 2 tokens: more text; for a split of one (`split_corpus`), the
    --dev-fraction nearest its own, in steps of 0.01 (larger for a short dev split, smaller for a short train
    split), that splits the text into two parts of at least 2 tokens each, or a --dev-data file where none does."""
    if corpus.split is None:
        return "add text to it"
    fraction, name, other = corpus.split
    text = "".join(corpus + other if name == "train" else other + corpus)  # (the parts of the text, in order)
    pcts = range(math.floor(fraction * 100) + 1, 100) if name == "dev" else range(math.ceil(fraction * 100) - 1, 0, -1)
    cuts = set()
    for pct in pcts:
        try:
            parts = split_corpus(TextCorpus([text]), pct / 100)
        except DataError:
            continue
        if len(parts[0][0]) not in cuts:  # (fractions that cut at the same line start split it alike)
            cuts.add(len(parts[0][0]))
            if all(len(_corpus_stream(tokenizer, p)) >= 2 for p in parts):
                return f"pass --dev-fraction {pct / 100:g} (or a --dev-data file)"
    return (f"no --dev-fraction splits it into two parts of 2 tokens or more (the whole text gives "
            f"{len(_corpus_stream(tokenizer, TextCorpus([text])))}); pass a --dev-data file, or a longer corpus")


def encode_corpus(tokenizer, corpus: TextCorpus, max_length: int) -> dict[str, torch.Tensor]:
    """A TextCorpus as rows of `max_length` tokens: every document tokenised whole (no truncation), EOS
    between documents, the stream cut into blocks and the remainder dropped; a corpus shorter than one
    block is one shorter row. Every token is a label."""
    stream = _corpus_stream(tokenizer, corpus)
    if len(stream) < 2:
        raise DataError(f"{corpus.source} gives {len(stream)} token{'' if len(stream) == 1 else 's'}; a causal LM "
                        f"needs at least 2 (a token, and the next one to predict), whatever --max-length is (a corpus "
                        f"shorter than a block is one shorter row); {_corpus_fix(tokenizer, corpus)}")
    n = len(stream) // max_length
    ids = torch.tensor(stream[:n * max_length] if n else stream, dtype=torch.long).view(max(n, 1), -1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class Context(NamedTuple):
    """How many positions a model takes (`model_context`): `positions` (None: its config names no limit), whether
    they are rotary (`rotary`: computed, not looked up in a table), and where the number comes from (`source`, for a
    message: "max_position_embeddings 64", "max_position_embeddings 64 × linear rope scaling factor 2")."""

    positions: int | None
    rotary: bool
    source: str


def _rope_parameters(cfg) -> list[dict]:
    """A config's rope parameters (transformers 5's `rope_parameters`, older configs' `rope_scaling`), one dict per
    layer type where they are nested by it (Gemma 3's full and sliding attention); [] where it has none."""
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
    if not isinstance(params, dict):
        return []
    nested = [p for p in params.values() if isinstance(p, dict)]
    return nested or [params]


def model_context(model) -> Context:
    """The most positions `model` takes, from its (text) config: max_position_embeddings (GPT-2's n_positions). A
    rotary model (rope parameters in its config: Llama, Qwen, GPT-NeoX; GPT-J's rotary_dim) computes its positions,
    so it runs past that without an error, on positions it was not trained on; a rope scaling in the config (a
    `rope_type` other than "default" with a `factor`) extends it to original_max_position_embeddings (else
    max_position_embeddings) × factor, where that is more. A model with a position table (BERT, GPT-2) fails past it;
    Falcon with ALiBi (`alibi`) has no limit."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if not isinstance(limit, int) or limit <= 0 or getattr(cfg, "alibi", False):
        return Context(None, False, "")
    key = (getattr(cfg, "attribute_map", None) or {}).get("max_position_embeddings", "max_position_embeddings")
    source = f"{key} {limit}"
    ropes = _rope_parameters(cfg)
    rotary = bool(ropes) or getattr(cfg, "rope_theta", None) is not None or getattr(cfg, "rotary_dim", None) is not None
    positions = limit
    for p in ropes:
        kind = p.get("rope_type", p.get("type", "default"))
        original = p.get("original_max_position_embeddings") or limit
        factor = p.get("factor") or limit / original  # (yarn, longrope without a factor: the ratio, as transformers)
        if kind != "default" and isinstance(factor, (int, float)) and int(original * factor) > positions:
            positions = int(original * factor)
            source = (f"{key} {limit}" if original == limit else f"original_max_position_embeddings {original}") + \
                f" × {kind} rope scaling factor {factor:g}"
    return Context(positions, rotary, source)


@torch.no_grad()
def check_row_length(model, max_length: int, *encs: dict[str, torch.Tensor]) -> None:
    """Run the model once on the longest encoded row, so that a row it cannot take (more tokens than its position
    embeddings hold: BERT's or GPT-2's max_position_embeddings / n_positions) is a UsageError now, not an
    IndexError at the first batch that holds such a row, possibly hours into training. A rotary model (Llama) runs
    on past its context without an error, on positions it was never trained on: a row longer than its context
    (`model_context`: rope scaling in its config extends it) is refused before it runs."""
    widths = [(int(e["attention_mask"].sum(1).max()), e) for e in encs if len(e["labels"])]
    if not widths:
        return
    context = model_context(model)
    width = max(widths, key=lambda t: t[0])[0]
    if context.rotary and context.positions and width > context.positions:
        raise UsageError(f"--max-length {max_length}: the data's longest row is {width} tokens, past the model's "
                         f"context of {context.positions} positions ({context.source}); its rotary positions run on "
                         "past it without an error, on positions it was never trained on; pass --max-length "
                         f"{context.positions} or less")
    dev = model_device(model)

    def run(pick) -> int:  # run once on the longest (pick=max) or the shortest (min) row; its length
        lengths = [(int(pick(e["attention_mask"].sum(1))), e) for e in encs if len(e["labels"])]
        width, enc = pick(lengths, key=lambda t: t[0])
        i = int(torch.where(enc["attention_mask"].sum(1) == width)[0][0])
        model(**{k: v[i:i + 1, :width].to(dev) for k, v in enc.items() if k != "labels" and v.dim() == 2})
        return width

    was_training = model.training
    model.eval()
    try:
        run(max)
    except (IndexError, RuntimeError, ValueError) as e:
        limit = context.positions
        short = min(int(e_["attention_mask"].sum(1).min()) for _, e_ in widths)
        if short < width and (limit is None or short <= limit):
            try:  # a row of any length fails (a tokenizer that does not fit the model: T5's classifier finds no eos)
                run(min)
            except (IndexError, RuntimeError, ValueError) as e2:
                raise UsageError(f"the model fails on the data's longest row ({width} tokens) and on its shortest "
                                 f"({short}), so the length is not the cause: {_first_line(e2)}; check that the "
                                 "model's folder holds its own tokenizer") from None
        hint = f" (its config has {limit} positions)" if limit else ""
        raise UsageError(f"--max-length {max_length}: the model fails on the data's longest row, {width} tokens"
                         f"{hint}: {_first_line(e)}; pass a smaller --max-length") from None
    finally:
        model.train(was_training)


def take_rows(enc: dict[str, torch.Tensor], n: int, seed: int) -> dict[str, torch.Tensor]:
    """A fixed-seed subsample of n encoded rows (order kept); all of them when n is 0 or >= the row count."""
    keep = _kept(len(enc["labels"]), n, seed)
    if keep is None:
        return enc
    idx = torch.tensor(keep)
    return {k: v[idx] for k, v in enc.items()}


def batches(enc: dict[str, torch.Tensor], batch_size: int, seed: int, epoch: int) -> list[dict[str, torch.Tensor]]:
    """One epoch of shuffled batches; the order depends only on (seed, epoch), so a resumed run sees the same data."""
    n = len(enc["labels"])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))
    return [{k: v[idx] for k, v in enc.items()} for idx in perm.split(batch_size)]


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut columns that are padding in every row of this batch (cheaper forward on CPU), on either side: a
    tokenizer with padding_side="left" (many decoder checkpoints set it) pads at the start of a row."""
    kept = batch["attention_mask"].any(0).nonzero()
    if not len(kept):
        return batch
    lo, hi = int(kept[0]), int(kept[-1]) + 1
    return {k: (v[:, lo:hi] if v.dim() == 2 else v) for k, v in batch.items()}


def corrupt(labels: torch.Tensor, kind: str, num_labels: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "flip":
        return flip_labels(labels, num_labels)
    return torch.randint(0, num_labels, labels.shape, generator=gen)


# ----------------------------------------------------------------------------- evaluation


def _on(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, enc: dict[str, torch.Tensor], task_type: str, task: str, batch_size: int = 64,
             precision: str = "fp32") -> dict:
    """seq-cls: GLUE metrics (f1/accuracy/...); causal-lm: mean loss and perplexity. Each batch runs on the model's
    device, under the autocast of `precision` (as the run trains)."""
    if task_type != "causal-lm":
        return glue_metrics(task, predict(model, enc, batch_size, precision), enc["labels"].numpy())
    return _lm_metrics(*_lm_loss_sum(model, enc, batch_size, precision))


@torch.no_grad()
def _lm_loss_sum(model, enc: dict[str, torch.Tensor], batch_size: int = 64,
                 precision: str = "fp32") -> tuple[float, int]:
    """A causal LM's summed loss over the target tokens of `enc`, and their count."""
    was_training = model.training
    model.eval()
    losses, count = 0.0, 0
    dev = model_device(model)
    for i in range(0, len(enc["labels"]), batch_size):
        b = trim_padding({k: v[i:i + batch_size] for k, v in enc.items()})
        with autocast(dev, precision):
            out = model(**_on(b, dev))
        tokens = int((b["labels"][:, 1:] != -100).sum())
        if tokens:  # (a batch without a target token has the loss 0/0, NaN)
            losses += float(out.loss) * tokens
        count += tokens
    model.train(was_training)
    return losses, count


def _lm_metrics(total: float, count: int) -> dict:
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def evaluate_run(run: "Run", enc: dict[str, torch.Tensor], task: str) -> dict:
    """`evaluate` of the run's model on `enc`. Under DDP each process evaluates its share of the rows (contiguous,
    as `Run._shares` cuts them) with the bare model, and the shares are combined: a classifier's predictions are
    gathered in row order and scored once, a causal LM's losses summed by target tokens. Every process gets the same
    metrics, as one process evaluating every row gives (to float rounding: the rows go through the model in other
    batches)."""
    cfg = run.cfg
    if run.world == 1:
        return evaluate(run.model, enc, run.task_type, task, precision=cfg.precision)
    import torch.distributed as dist

    if run.task_type != "causal-lm":
        return glue_metrics(task, predict_run(run, enc), enc["labels"].numpy())
    n = len(enc["labels"])
    lo, hi = n * run.rank // run.world, n * (run.rank + 1) // run.world
    part = {k: v[lo:hi] for k, v in enc.items()}
    from .distributed import _device

    t = torch.tensor(_lm_loss_sum(run.model, part, precision=cfg.precision) if hi > lo else (0.0, 0),
                     dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return _lm_metrics(*t.tolist())


def predict_run(run: "Run", enc: dict[str, torch.Tensor]):
    """A classifier run's predicted class of each row of `enc`, in row order (a numpy array), as `evaluate_run` scores
    them: under DDP each process predicts its share of the rows and every process gets them all (`gather_rows`)."""
    if run.world == 1:
        return predict(run.model, enc, precision=run.cfg.precision)
    return gather_rows(run, enc, lambda part: predict(run.model, part, precision=run.cfg.precision))


def gather_rows(run: "Run", enc: dict[str, torch.Tensor], fn: Callable[[dict], object]):
    """`fn(rows)`, a value per row of `rows` (a numpy array: a classifier's predicted classes), for every row of
    `enc`, in row order. Under DDP each process runs `fn` on its contiguous share of the rows (as `Run._shares`
    cuts them; a process left without a row runs nothing) and the shares are gathered: every process gets them all."""
    if run.world == 1:
        return fn(enc)
    import numpy as np
    import torch.distributed as dist

    n = len(enc["labels"])
    lo, hi = n * run.rank // run.world, n * (run.rank + 1) // run.world
    mine = fn({k: v[lo:hi] for k, v in enc.items()}) if hi > lo else np.zeros(0, dtype=np.int64)
    every: list = [None] * run.world
    dist.all_gather_object(every, mine)
    return np.concatenate(every)


@torch.no_grad()
def predict(model, enc: dict[str, torch.Tensor], batch_size: int = 64, precision: str = "fp32"):
    """A seq-cls model's predicted class of each row of `enc`, in row order (a numpy array): what `evaluate` scores,
    kept for a per-row comparison of two models on the same rows (the demo's paired verdict). On the model's device,
    under the autocast of `precision`."""
    return predict_logits(model, enc, batch_size, precision).argmax(-1).numpy()


@torch.no_grad()
def predict_logits(model, enc: dict[str, torch.Tensor], batch_size: int = 64, precision: str = "fp32") -> torch.Tensor:
    """A seq-cls model's logits for each row of `enc`, in row order (fp32, on the CPU): `predict` takes their argmax,
    `unified-lora predict` their softmax too. The labels of `enc` are not passed to the model (rows without a label,
    a GLUE test.tsv's, are encoded with the label -1)."""
    was_training = model.training
    model.eval()
    out = []
    dev = model_device(model)
    for i in range(0, len(enc["input_ids"]), batch_size):
        b = trim_padding({k: v[i:i + batch_size] for k, v in enc.items() if k != "labels"})
        with autocast(dev, precision):
            out.append(model(**_on(b, dev)).logits.float())
    model.train(was_training)
    return torch.cat(out).cpu()


def majority(train, dev, task: str) -> dict | None:
    if not isinstance(train, TextDataset):
        return None
    return majority_baseline(train.labels, dev.labels, task)


# ----------------------------------------------------------------------------- best evaluation, early stopping


# the dev metrics a smaller value of is better (a causal LM's; a multi-task LM's `average_loss`); others: higher
LOWER_IS_BETTER = ("loss", "perplexity", "average_loss")


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of the dev metric `metric` is better: one of `LOWER_IS_BETTER`, or a task's of a
    multi-task run (`NAME/loss`, `NAME/perplexity`)."""
    return metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER


def dev_metric_names(task_type: str, task: str) -> list[str]:
    """The names of the metrics a run's dev evaluation reports (`evaluate`): the GLUE metrics of `task` (MRPC: f1,
    accuracy; CoLA: mcc, accuracy; RTE, SST-2: accuracy; a table: accuracy, macro_f1), a causal LM's loss and
    perplexity. Read off the scoring functions themselves, so they cannot disagree with what an evaluation holds."""
    if task_type == "causal-lm":
        return list(_lm_metrics(0.0, 1))
    return list(glue_metrics(task, [0, 1], [0, 1]))


def best_metric(cfg: TrainConfig, task_type: str, task: str) -> str:
    """The dev metric that ranks a run's evaluations: `cfg.metric_for_best`, else the task's primary one (GLUE's:
    MRPC F1, CoLA MCC, accuracy otherwise; a causal LM's loss). A name the evaluation does not report is a
    UsageError listing those it does, before anything is trained."""
    return pick_metric(cfg.metric_for_best, dev_metric_names(task_type, task),
                       "loss" if task_type == "causal-lm" else primary_metric(task))


def pick_metric(name: str | None, names: Sequence[str], default: str) -> str:
    """`name`, one of the dev metrics `names` a run's evaluation reports, or `default` for None; another name is a
    UsageError listing them."""
    if name is None:
        return default
    if name not in names:
        raise UsageError(f"--metric-for-best {name}: not a dev metric of this run; its evaluation reports "
                         f"{', '.join(names)}")
    return name


def record_best(state: "RunState", e: dict, metric: str, threshold: float = 0.0) -> bool:
    """Rank the dev evaluation `e` (a `RunState.evals` entry) against the best so far (`state.best`) by `metric`
    (lower is better for `LOWER_IS_BETTER`, a task's too: `lower_is_better`; higher for the others) and update the state. A better value (strictly)
    becomes the best; `state.evals_without_improvement` goes back to 0 where it improves on the best by more than
    `threshold`, else counts one more (Hugging Face's EarlyStoppingCallback: a gain of `threshold` or less counts as
    none, though it is a new best). A NaN value is never better. Returns whether `e` is a new best."""
    v = e.get(metric)
    if not isinstance(v, (int, float)) or math.isnan(v):
        gain = -math.inf
    elif state.best is None:
        gain = math.inf
    else:
        gain = (state.best["value"] - v) if lower_is_better(metric) else (v - state.best["value"])
    if gain > 0:
        state.best = {"epoch": e["epoch"], "step": e["step"], "metric": metric, "value": float(v)}
    state.evals_without_improvement = 0 if gain > threshold else state.evals_without_improvement + 1
    return gain > 0


def replay_best(evals: Sequence[dict], metric: str, threshold: float = 0.0) -> "RunState":
    """A RunState whose `best` and `evals_without_improvement` are those `record_best` leaves after `evals`, in
    order: a checkpoint written before they were stored, and `report` of any run."""
    st = RunState()
    for e in evals:
        record_best(st, e, metric, threshold)
    return st


# ----------------------------------------------------------------------------- the run


@dataclass
class RunState:
    """What a checkpoint must hold besides the tensors."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    evals: list = field(default_factory=list)  # [{"step":..., "epoch":..., "tag":..., metrics...}]
    wall_s: float = 0.0  # wall time of the run up to this checkpoint, over every session (`Run.wall_s`)
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient (`Run.train_step`)
    nonfinite_in_a_row: int = 0  # of them, the latest ones in a row (0 after a finite step)
    best: dict | None = None  # the best dev evaluation so far: {"epoch", "step", "metric", "value"} (`record_best`)
    evals_without_improvement: int = 0  # the latest evaluations in a row that did not improve on it (early stopping)
    # each resume that went on with settings that change what the run learns other than the checkpoint's: {"step":
    # the step it went on from, "changed": {setting: [before, after]}} (`resume_changes`), so the settings the run
    # ends with are not taken for the ones it trained with throughout (`unified-lora compare`)
    resumes: list = field(default_factory=list)


# TrainConfig fields that do not change what a run learns: where it writes, how often it logs and saves, its seed's
# name aside (`unified-lora compare` compares runs over seeds), the device, and kernels that compute the same.
# `eval_steps` changes it where early stopping reads those evaluations
NOT_LEARNING = ("seed", "output_dir", "threads", "device", "log_every", "save_steps", "save_total_limit",
                "peft_every_checkpoint", "save_best", "eval_steps", "max_nonfinite_steps", "layer_kernel",
                "mirror_kernel", "mirror_pack")


def not_learning(*configs: dict) -> set[str]:
    """`NOT_LEARNING` for runs of these settings (TrainConfig fields as dicts): `eval_steps` left out where one of
    them stops early, as early stopping reads those evaluations."""
    stops = any(c.get("early_stopping_patience") for c in configs)
    return {k for k in NOT_LEARNING if not (k == "eval_steps" and stops)}


def resume_changes(before: dict, after: dict) -> dict:
    """{setting: [before's, after's]} for the TrainConfig fields (as dicts, `asdict`) of one run, a checkpoint's and
    its resume's, that differ and change what the run learns: not its length (`steps`, `epochs`: a run resumed for
    more trains as one run of them all) nor `NOT_LEARNING`. A field one of them lacks (a checkpoint written before it
    existed) is left out; a list and a tuple of the same values are the same, and so is a local path given another
    way."""
    def norm(key: str, v):
        if key in ("model", "data", "dev_data") and isinstance(v, str) and Path(v).expanduser().exists():
            return str(Path(v).expanduser().resolve())
        return list(v) if isinstance(v, (list, tuple)) else v

    skip = {"steps", "epochs", *not_learning(before, after)}
    return {k: [before[k], after[k]] for k in after
            if k in before and k not in skip and norm(k, before[k]) != norm(k, after[k])}


class Run:
    """A model with nested LoRA, its optimizer and controller, and the loop that trains it."""

    def __init__(self, cfg: TrainConfig, model, task_type: str, num_labels: int, trace_path: str | None,
                 print_fn: Callable[[str], None] | None = print_on_main_process, append_trace: bool = False,
                 classes: Sequence[str] | None = None, chat: bool = False, total_steps: int | None = None):
        """`total_steps`: the run's optimizer steps, which a decaying LR schedule decays over (default `cfg.steps`)."""
        self.cfg, self.model, self.task_type, self.num_labels = cfg, model, task_type, num_labels
        self.print_fn = print_fn
        # the run trains on chat data (a causal LM's conversations, rendered with the chat template): checkpoints
        # record it, so `predict` renders plain-text prompts as user turns, whatever column the data had
        self.chat = chat
        # the class of each label id (string labels get ids in sorted order): checkpoints record it, and a resumed run
        # must get the same ids
        self.classes = list(classes) if classes is not None else None
        if task_type == "causal-lm" and cfg.has_shock and cfg.shock_type != "random":
            raise UsageError(f"shock_type: '{cfg.shock_type}' maps class labels; a causal LM's shock is "
                             f"--shock-type random (uniform random next tokens in the window)")
        # on `cfg.device` before the LoRA blocks are built (they are made on their base layer's device) and the
        # optimizer holds them
        self.device = resolve_device(cfg.device)
        check_precision(self.device, cfg.precision)
        model.to(self.device)
        # in training mode, dropout on: transformers' from_pretrained returns a model in eval mode, and the loop never
        # switched it, so `train` and `demo` trained without the model's dropout and lora_dropout (evaluate and
        # predict switch to eval mode and back)
        model.train()
        self.vocab_size = model.get_output_embeddings().weight.shape[0] if task_type == "causal-lm" else 0
        mts = cfg.modules_to_save
        fresh = list(getattr(model, "_unified_lora_fresh_modules", ()))
        if mts is None and task_type == "seq-cls":
            mts = seq_cls_head(model)
        left = [m for m in fresh if not _covered(m, mts or ())]  # said after the wrapping, which refuses a misspelt
        # modules_to_save: the note on them came first, then the error
        self.adapters, self.ctrl = self._setup_adapters(model, mts, print_fn, keep_trace=not trace_path)
        if left and print_fn is not None:
            print_fn(f"note: {left} were initialised afresh (the checkpoint lacks them) and are not in "
                     f"modules_to_save {list(mts or [])}: they stay frozen at their random initialisation")
        if trace_path:
            self.ctrl.writer = TraceWriter(trace_path, append=append_trace)  # (process 0 writes it, under DDP)
        # under torchrun: DDP around the model with its LoRA blocks in place (DDP takes the parameters it all-reduces
        # when it wraps), find_unused_parameters=True for the paused blocks (`ddp_kwargs`). `self.model` stays the
        # bare model (checkpoints, evaluation, export); the training forward runs through `self.ddp`
        self.world, self.rank, self.ddp = world_size(), process_rank(), None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            from .distributed import check_ddp, ddp_kwargs

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(model, device_ids=ids, **ddp_kwargs())
            check_ddp(self.ddp)
        # the LR of an optimizer step: the base LR × the schedule's factor at that step (a LambdaLR on the optimizer,
        # stepped after each optimizer step) × the mode's multiplier (the controller's hooks, in optimizer.step)
        self.optimizer = torch.optim.AdamW(trainable_parameters(model), lr=self.base_lr, weight_decay=cfg.weight_decay)
        self.ctrl.attach_optimizer(self.optimizer)
        from transformers import get_scheduler

        self.schedule = lr_schedule(cfg, total_steps or cfg.steps or None)
        kwargs = self.schedule["lr_scheduler_kwargs"]
        # (warmup_stable_decay with num_stable_steps: its phases are given, and transformers warns where the total is
        # given too)
        self.scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer, num_warmup_steps=self.schedule["warmup_steps"],
                                       num_training_steps=self.schedule["total_steps"] if needs_total(self.schedule)
                                       or cfg.lr_scheduler != "warmup_stable_decay" else None,
                                       scheduler_specific_kwargs=dict(kwargs) if kwargs else None)
        # fp16's narrow range: the loss is scaled up before backward and the gradients unscaled before ctrl.step (the
        # README's GradScaler recipe); a step whose gradients overflowed is skipped by scaler.step
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        self.state = RunState()
        self.shock_gen = torch.Generator().manual_seed(cfg.seed + 17)
        self.started = time.perf_counter()  # this session's start (`cmd_train` sets it to before the model loaded)
        self._wall_before = 0.0  # the wall time of the sessions before a resume

    def _setup_adapters(self, model, modules_to_save, print_fn, keep_trace: bool):
        """Wrap `model` in nested LoRA and build its controller (`setup_unified_lora`): (adapters, controller)."""
        cfg = self.cfg
        if cfg.target_modules is None:  # recorded as resolved: the checkpoints, summary and a resume read the names
            cfg.target_modules = default_target_modules(model)
        actuators = cfg.actuator_config()
        return setup_unified_lora(
            model, target_modules=cfg.target_modules, rank_levels=cfg.rank_levels, lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout, modules_to_save=modules_to_save, signal=cfg.signal_config(),
            lr_mode=actuators.lr_mode, machine=cfg.machine_config(), actuators=actuators,
            mirror=cfg.mirror_config(), layer_kernel=cfg.layer_kernel,
            trace_path=None, log_every=cfg.log_every, print_fn=print_fn,
            # with a trace file the run reads its trace from there (summary, plot): ctrl.trace, a record per step
            # held for the whole run, would only grow
            keep_trace=keep_trace)

    @property
    def base_lr(self) -> float:
        """The optimizer's LR before the schedule and the mode: `--lr` in lr_mode "multiplier"; 1 in "absolute",
        whose mode LRs are the controller's multipliers (`TrainConfig.actuator_config`)."""
        return self.cfg.lr if self.cfg.lr_mode == "multiplier" else 1.0

    def _step_schedule(self) -> None:
        """The schedule's next step. Every optimizer step counts, a skipped one too (non-finite, an fp16 overflow), as
        it counts for --steps: the LR at step t is the schedule's factor at t. (torch warns where the first one
        follows no optimizer.step(): a skipped first step.)"""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before",
                                    category=UserWarning)
            self.scheduler.step()

    def wall_s(self) -> float:
        """The run's wall time so far: the sessions before a resume, plus this one."""
        return self._wall_before + time.perf_counter() - self.started

    def n_trainable(self) -> int:
        """Parameters that train at the current rank (active LoRA slices + saved modules)."""
        lora = sum(p.numel() for a in self.adapters.values() for p in a.active_parameters())
        return lora + sum(p.numel() for p in self.ctrl.extra_params)

    def _prepared(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """A batch with its all-padding columns cut and its targets corrupted inside the shock window (drawn on the
        CPU from the run's shock generator, so a run draws the same labels on any device)."""
        cfg = self.cfg
        batch = trim_padding(batch)
        if cfg.has_shock and cfg.shock_start <= step < cfg.shock_end:
            if self.task_type == "seq-cls":
                batch = dict(batch, labels=self._corrupt(batch))
            else:  # random next tokens where there are targets; padding (-100) stays ignored
                y = batch["labels"].cpu()
                noise = torch.randint(0, self.vocab_size, y.shape, generator=self.shock_gen)
                batch = dict(batch, labels=torch.where(y == -100, y, noise))
        return batch

    def _corrupt(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A classifier batch's labels, corrupted as the shock window does (`corrupt`)."""
        return corrupt(batch["labels"].cpu(), self.cfg.shock_type, self.num_labels, self.shock_gen)

    def _forward_loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean loss of a micro-batch (on the CPU: moved to the run's device here), by the model's own loss."""
        return model(**_on(batch, self.device)).loss

    def _controller_step(self, loss: float) -> None:
        """`ctrl.step` with the step's mean loss (after backward, before optimizer.step())."""
        self.ctrl.step(loss=loss)

    def export_peft_to(self, out_dir: Path, rank: int | None = None, tasks: Sequence[str] | None = None) -> str | None:
        """The adapter in PEFT format in `out_dir` (`export_peft`), at `rank` (default: the controller's): None, or a
        note on why it was not written. (`tasks`: a multi-task run's, `MultiTaskRun.export_peft_to`.)"""
        return export_peft(self.model, self.adapters, self.ctrl.rank if rank is None else rank, out_dir)

    def merged_model(self, rank: int | None = None, task: str | None = None):
        """The model with the adapter's delta at `rank` (default: the controller's) folded into the base weights and
        each nested layer replaced by its base layer (`peft_io.merge_and_unload`, which sums in the weights' dtype,
        fp32 in a run, and unties a tied weight it merges into): a plain transformers model, the trained
        `modules_to_save` in it as they are. The run's model is consumed (its adapters are gone). (`task`: a
        multi-task run's, `MultiTaskRun.merged_model`.)"""
        from .peft_io import merge_and_unload

        if task is not None:
            raise ValueError(f"task: {task!r} given for a run of one task")
        return merge_and_unload(self.model, self.ctrl.rank if rank is None else rank)

    def _state_extra(self) -> dict:
        """What a checkpoint's state holds besides `STATE_KEYS` and the run's own keys (a multi-task run: its tasks)."""
        return {}

    def _check_state(self, st: dict, path: Path) -> None:
        """Refuse (UsageError) a checkpoint state `st` this run cannot go on from (before anything is loaded)."""

    def _weight(self, batch: dict[str, torch.Tensor]) -> int:
        """What the model's mean loss on `batch` averages over: its rows (seq-cls), its target tokens (causal LM)."""
        y = batch["labels"]
        return len(y) if self.task_type != "causal-lm" else int((y[:, 1:] != -100).sum())

    def _shares(self, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Under DDP, a global micro-batch cut into each process's rows: process r takes rows [n·r/N, n·(r+1)/N)
        (batch_size rows each, but for the epoch's last, shorter batch), each share with its own padding trimmed. A
        process left without a row (a last batch of fewer rows than processes) gets the batch's first row, which
        `train_step` weights 0: DDP needs a forward and backward on every process."""
        n, world = len(batch["labels"]), self.world
        bounds = [n * r // world for r in range(world + 1)]
        return [trim_padding({k: v[lo:hi] for k, v in batch.items()}) if hi > lo else None
                for lo, hi in zip(bounds, bounds[1:])]

    def train_step(self, batch: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]]) -> float:
        """One optimizer step on `batch`, or on a list of micro-batches (`grad_accum`), each forward and loss under
        `cfg.precision`'s autocast. A micro-batch's loss is weighted by its share of the step's rows (a causal LM: of
        its target tokens) before its backward, so the summed gradients are those of the mean loss over the step's
        rows (tokens), as one batch of all of them would give, whatever the sizes (the epoch's last, shorter batch).
        Then, once: ctrl.step with that mean loss, clipping, optimizer.step (fp16: unscale first, and
        GradScaler's step, which skips a step whose gradients overflowed). Returns the step's mean loss.

        Under DDP (`self.ddp`) each batch is a global micro-batch, the same on every process: its targets are
        corrupted in the shock window as one process would (the same draws), then each process trains on its own
        rows (`_shares`), its loss weighted by N × its share of the step's rows (tokens) over all processes (counted
        on the host: every process holds the whole batch), so DDP's mean of the gradients is the gradient of the
        step's mean loss, as one process on all the rows gives. DDP all-reduces once, at the last micro-batch's
        backward (`no_sync` before it). `ctrl.step` gets this process's weighted loss and all-reduces it: every
        process reads the step's mean loss (`ctrl.last_loss`), the same number."""
        cfg, step = self.cfg, self.state.global_step
        micro = [self._prepared(b, step) for b in ([batch] if isinstance(batch, dict) else batch)]
        if self.ddp is not None:
            shares = [self._shares(b) for b in micro]
            counts = [[self._weight(x) if x is not None else 0 for x in s] for s in shares]
            total = sum(map(sum, counts)) or 1
            scales = [self.world * c[self.rank] / total for c in counts]
            micro = [s[self.rank] if s[self.rank] is not None else {k: v[:1] for k, v in b.items()}
                     for s, b in zip(shares, micro)]
        else:
            weights = [self._weight(b) for b in micro] if len(micro) > 1 else [1]  # (counted on the host: no sync)
            scales = [w / sum(weights) for w in weights]
        model = self.ddp if self.ddp is not None else self.model
        mean = None
        for i, (b, scale) in enumerate(zip(micro, scales)):
            last = i == len(micro) - 1
            with (self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()):
                with autocast(self.device, cfg.precision):
                    loss = self._forward_loss(model, b)
                if len(micro) > 1 or self.ddp is not None:
                    loss = loss * scale
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            mean = loss.detach() if mean is None else mean + loss.detach()
        value = mean.item()  # the step's host sync (a second one reads the gradient norm: below)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # ctrl.step reads true gradients, and a restore leaves none to check
        self._controller_step(value)  # after backward, before optimizer.step()
        if self.ddp is not None:
            # the mean over the processes, the same everywhere: with the norm of DDP's averaged gradients (the same
            # on every process) it decides the skip below alike on every process, with no further collective
            value = self.ctrl.last_loss
        norm = None
        if cfg.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(self.model), cfg.grad_clip)
        finite = math.isfinite(value)
        if finite:  # the norm of the (fp16: unscaled) gradients; the step's second host sync
            if norm is None:
                norm = total_norm([p.grad for p in trainable_parameters(self.model) if p.grad is not None])
            finite = bool(torch.isfinite(norm))
        if self.scaler is not None:
            # skipped by GradScaler itself when unscale_ found an inf/NaN gradient, the steps `finite` calls so
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif finite:  # a NaN/inf gradient would make every weight it reaches (and AdamW's moments) NaN for good
            self.optimizer.step()
        if not finite and math.isfinite(value):  # (its accumulation watch: a skip, not a micro-batch's call)
            self.ctrl._skipped_optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        self._step_schedule()
        self.state.global_step += 1
        self._count_nonfinite(finite, value, step)
        return value

    def _count_nonfinite(self, finite: bool, loss: float, step: int) -> None:
        """Count a step skipped for a non-finite loss or gradient, say so, and stop the run (DivergedError) at
        `cfg.max_nonfinite_steps` such steps in a row. An fp16 step GradScaler skipped for a gradient that overflowed
        while its scale is still >= 1 is counted but not toward that limit: that is how GradScaler finds its scale
        (from 65536, halving at each overflow), not a sign of divergence; a gradient that still overflows at a scale
        below 1 is larger than fp16 holds unscaled, and counts."""
        st = self.state
        if finite:
            st.nonfinite_in_a_row = 0
            return
        st.skipped_steps += 1
        scale = self.scaler.get_scale() if self.scaler is not None else None
        calibrating = math.isfinite(loss) and scale is not None and scale >= 1.0
        if not calibrating:
            st.nonfinite_in_a_row += 1
        what = (f"loss {loss}" if not math.isfinite(loss) else "gradient norm (loss finite)" if scale is None
                else f"gradient (loss finite; GradScaler's scale lowered to {scale:g})")
        count = ("GradScaler finding its scale: not counted toward --max-nonfinite-steps" if calibrating
                 else f"{st.nonfinite_in_a_row} in a row")
        if self.print_fn is not None:
            self.print_fn(f"step {step}: non-finite {what}; optimizer step skipped, weights unchanged "
                          f"({count}, {st.skipped_steps} in the run)")
        limit = self.cfg.max_nonfinite_steps
        if limit and st.nonfinite_in_a_row >= limit:
            raise DivergedError(f"{st.nonfinite_in_a_row} steps in a row (to step {step}) had a non-finite loss or "
                                f"gradient and were skipped, so the run stops: the weights are those of step "
                                f"{step + 1 - st.nonfinite_in_a_row}. Resume with a lower learning rate ("
                                f"{'--lr' if self.cfg.lr_mode == 'multiplier' else '--lrs'}), "
                                f"check the data, or raise --max-nonfinite-steps (max_nonfinite_steps; 0 = never "
                                f"stop)")

    # -- checkpoints ------------------------------------------------------------------
    def save_checkpoint(self, root: str | os.PathLike, tag: str, peft_export: bool | None = None) -> Path:
        """Atomically write `root/<tag>/`: a temp folder first (its files flushed to the disk, `fsync_tree`), then
        os.replace, so an interrupt or a power loss never leaves a half-written checkpoint under the final name; the temp folders of saves killed before
        their rename are removed once this one is in place. `peft_export` (default: the config's
        `peft_every_checkpoint`) also writes the adapter in PEFT format into `<tag>/peft/`. A write that fails (disk
        full, no permission) removes the temp folder and raises `CheckpointWriteError`, naming the folder and the
        cause; the checkpoints already under root stay as they were.

        Under DDP it is a collective: every process's RNG states are gathered into it (`process_rng`; each process
        resumes with its own), process 0 writes it, and every process returns its path or raises its error."""
        rngs = None
        if self.world > 1:
            import torch.distributed as dist

            rngs = [None] * self.world
            mine = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
            dist.all_gather_object(rngs, mine)
        return on_rank0(lambda: self._write_checkpoint(root, tag, peft_export, rngs))

    def _write_checkpoint(self, root, tag: str, peft_export: bool | None, rngs: list | None) -> Path:
        from safetensors.torch import save_file

        root = Path(root)
        tmp, final = root / f".tmp-{tag}-{os.getpid()}", root / tag
        self.state.wall_s = self.wall_s()
        # (the blocks, ranks and every parameter that trains: the controller's extra_params, a modules_to_save head)
        tensors = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(self.model).items()}
        state = {"optimizer": self.optimizer.state_dict(), "controller": self.ctrl.state_dict(),
                 "run": asdict(self.state), "config": asdict(self.cfg), "task_type": self.task_type,
                 "num_labels": self.num_labels, "classes": self.classes, "chat": self.chat,
                 "shock_gen": self.shock_gen.get_state(), "torch_rng": torch.get_rng_state(),
                 "lr_schedule": dict(self.schedule), "lr_scheduler": self.scheduler.state_dict(), **self._state_extra()}
        if self.scaler is not None:  # fp16: the loss scale and its growth count, as the run goes on with them
            state["grad_scaler"] = self.scaler.state_dict()
        if self.device.type == "cuda":  # the GPU's generator (dropout on the GPU draws from it)
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        state["world_size"] = self.world  # the processes that trained it: their number fixes each step's rows
        if rngs is not None:
            state["process_rng"] = [cpu for cpu, _ in rngs]
            if self.device.type == "cuda":
                state["process_cuda_rng"] = [gpu for _, gpu in rngs]
        try:  # only file writes in here: whatever fails is the disk's or the folder's
            root.mkdir(parents=True, exist_ok=True)
            settle_interrupted_saves(root)  # before the sweep below, which would delete a killed save's complete copy
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            save_file(tensors, str(tmp / "adapter_blocks.safetensors"))
            torch.save(state, tmp / "state.pt")
            # the step, beside state.pt: latest_checkpoint reads this small file, not every checkpoint's state.pt
            (tmp / CHECKPOINT_INFO).write_text(json.dumps({"global_step": self.state.global_step}) + "\n")
            if self.cfg.peft_every_checkpoint if peft_export is None else peft_export:
                note = self.export_peft_to(tmp / "peft")
                if note:
                    (tmp / "PEFT_EXPORT.txt").write_text(note + "\n")
            fsync_tree(tmp)  # on the disk before the rename: after a power loss, the old checkpoint or this one whole
        except BaseException as e:
            # a full disk or a folder without write permission was an "internal error" (safetensors' "I/O error",
            # torch's "unexpected pos 576 vs 534") that named no folder, and left the partial temp folder, holding
            # the space a full disk lacks, until a later save
            shutil.rmtree(tmp, ignore_errors=True)
            if not isinstance(e, Exception):  # KeyboardInterrupt (a second Ctrl-C): no longer saving
                raise
            free = f"; {shutil.disk_usage(root).free / 2**20:.1f} MiB free on that disk" if root.is_dir() else ""
            raise CheckpointWriteError(
                f"{final}: cannot write this checkpoint ({type(e).__name__}: {_first_line(e)}{free}); the "
                f"checkpoints already in {root} are kept and the partial one is removed. Free space or make the "
                "folder writable, then resume from the newest checkpoint") from e
        if final.exists():  # os.replace cannot replace a non-empty folder: move the old one aside first (a kill
            # between the two renames leaves no `tag`: `settle_interrupted_saves` puts the new copy in place)
            old = root / f".old-{tag}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
        # a save killed before its rename left its temp folder (a whole checkpoint's size, and never read): with a
        # checkpoint complete, those go (a run's checkpoint folder has one writer, so none of them is still in use)
        for left in root.glob(".tmp-*"):
            if left.is_dir():
                shutil.rmtree(left, ignore_errors=True)
        return final

    def load_checkpoint(self, path: str | os.PathLike, trust_checkpoint: bool = False) -> None:
        """Load `path/` (a `save_checkpoint` folder). Its `state.pt` is read with `torch.load(weights_only=True)`
        (see `load_state_file`); `trust_checkpoint=True` loads a file you trust in full."""
        path = Path(path)
        st = read_state(path, trust_checkpoint)
        check_world_size(st, path, self.world)
        self._check_state(st, path)
        # the data's classes, in id order, must be the run's: a label added to or renamed in the --data file changed
        # the sorted ids (a head of another size failed in load_state_dict; one of the same size resumed on swapped
        # labels, silently). Checkpoints written before classes were recorded are not checked
        stored = st.get("classes")
        if stored is not None and self.classes is not None and stored != self.classes:
            raise UsageError(f"--resume {path}: the run was trained on the classes {stored} (label ids 0, 1, ... in "
                             f"that order) and the data now has {self.classes}; resume with the run's data, or start "
                             "a new run in another --output-dir")
        self.load_weights(path)
        self.optimizer.load_state_dict(st["optimizer"])
        # the loaded param groups hold the stored run's lr and weight_decay; a resumed run trains at the ones it is
        # given now (the lr: `_resume_schedule`, below)
        for g in self.optimizer.param_groups:
            g["weight_decay"] = self.cfg.weight_decay
        self.ctrl.load_state_dict(st["controller"])
        self.state = RunState(**st["run"])
        changed = resume_changes(st["config"], asdict(self.cfg))
        if changed:  # (another --lrs, --theta0, ...: the summary says from which step the run trained with them)
            self.state.resumes.append({"step": self.state.global_step, "changed": changed})
        self._resume_schedule(st, path)
        if "best" not in st["run"] and self.cfg.metric_for_best:  # written before the best was stored: from its evals
            was = replay_best(self.state.evals, self.cfg.metric_for_best, self.cfg.early_stopping_threshold)
            self.state.best, self.state.evals_without_improvement = was.best, was.evals_without_improvement
        self._wall_before = self.state.wall_s
        self.shock_gen.set_state(st["shock_gen"])
        torch.set_rng_state(st["process_rng"][self.rank] if "process_rng" in st else st["torch_rng"])
        # a run resumed in fp16 from an fp32/bf16 checkpoint starts with a fresh GradScaler
        if self.scaler is not None and st.get("grad_scaler"):
            self.scaler.load_state_dict(st["grad_scaler"])
        # (a checkpoint written on the CPU has none: the GPU's generator stays as the seed left it)
        if self.device.type == "cuda" and st.get("cuda_rng") is not None:
            gpu = st["process_cuda_rng"][self.rank] if "process_cuda_rng" in st else st["cuda_rng"]
            torch.cuda.set_rng_state(gpu, self.device)

    def _resume_schedule(self, st: dict, path: Path) -> None:
        """Continue the checkpoint's LR schedule at its step, from the base LR given now (`--lr` may change on a
        resume). A schedule whose warm-up or decay would now span other steps than the run's (another --steps or
        --epochs, with a decaying schedule or a warmup_ratio) is a UsageError: the LR would jump at the resume."""
        saved, now = {**LEGACY_SCHEDULE, **st["lr_schedule"]}, self.schedule  # (saved before their settings: none)
        keys = ("lr_scheduler", "warmup_steps", "lr_scheduler_kwargs") + (("total_steps",) if needs_total(now) else ())
        if any(saved[k] != now[k] for k in keys):
            length = all(saved[k] == now[k] for k in keys[:3])
            why, fix = (("--steps or --epochs changed the run's length", "Resume with the run's length (--steps "
                         f"{saved['total_steps']})") if length else
                        ("its settings changed", "Resume with the run's schedule settings"))
            raise UsageError(f"--resume {path}: the run's LR schedule is {describe_schedule(saved)}, and this run's "
                             f"would be {describe_schedule(now)} ({why}): the LR would jump at the resume. {fix}, or "
                             "start a new run in another --output-dir")
        sched, step = self.scheduler, self.state.global_step
        if st.get("lr_scheduler") is not None:  # (a checkpoint saved before schedules has none: constant)
            sched.load_state_dict(st["lr_scheduler"])
        # the groups' LR at the run's step, as the LambdaLR's step sets it: base LR x the schedule's factor
        sched.last_epoch, sched.base_lrs = step, [self.base_lr for _ in self.optimizer.param_groups]
        sched._last_lr = [base * factor(step) for base, factor in zip(sched.base_lrs, sched.lr_lambdas)]
        for g, lr in zip(self.optimizer.param_groups, sched._last_lr):
            g["lr"], g["initial_lr"] = lr, self.base_lr

    def load_weights(self, path: str | os.PathLike, flag: str = "--resume") -> None:
        """Put the LoRA blocks and saved modules (the head) of checkpoint `path` into the model; nothing else (the
        optimizer, the controller, the RNG states): `load_checkpoint`'s first part, and `unified-lora predict`'s
        (`flag`: what the errors name). A file cut short, and tensors this model lacks or has at other shapes (the
        folder `cfg.model` names holds another model now) are UsageErrors."""
        from safetensors.torch import load_file

        path = Path(path)
        redo = ("resume with the same --model and LoRA settings" if flag == "--resume" else
                "the run's model and LoRA settings (stored in the checkpoint) must be the ones it was trained with")
        try:
            tensors = load_file(str(path / "adapter_blocks.safetensors"))
        except Exception as e:  # safetensors' own error on a file cut short: "header too small", naming no file
            raise UsageError(f"{damaged_file_error(path / 'adapter_blocks.safetensors', e)}"
                             f"{other_checkpoints(path)}") from e
        own_sd = self.model.state_dict()  # (parameters, and the layers' _extra_state)
        missing = [k for k in tensors if k not in own_sd]
        if missing:
            raise UsageError(f"{flag} {path}: checkpoint has tensors this model lacks ({missing[:2]}); {redo}")
        # the same names at other sizes: the folder --model names was replaced by another model since (a wider one,
        # another config). load_state_dict's "size mismatch" was an internal error
        resized = [f"{k} {tuple(v.shape)} (this model's: {tuple(own_sd[k].shape)})" for k, v in tensors.items()
                   if isinstance(own_sd.get(k), torch.Tensor) and own_sd[k].shape != v.shape]
        if resized:
            raise UsageError(f"{flag} {path}: checkpoint tensors have other shapes than this model's ({resized[0]}"
                             f"{f' and {len(resized) - 1} more' if len(resized) > 1 else ''}): the model at "
                             f"{self.cfg.model} is not the one the run was trained on; " +
                             ("resume with that model, or start a new run in another --output-dir"
                              if flag == "--resume" else "put that model back there"))
        self.model.load_state_dict(tensors, strict=False)


def export_peft(model, adapters, rank: int, out_dir: Path) -> str | None:
    """PEFT-format export (adapter_config.json + adapter_model.safetensors) at the current rank, through
    unified_lora.peft_io; loads with PeftModel.from_pretrained. Returns None, or a note on why it was skipped."""
    try:
        from . import peft_io  # written separately; optional here
    except ImportError:
        return "PEFT export skipped: unified_lora.peft_io is not available in this install"
    try:
        peft_io.export_peft_adapter(model, adapters, save_dir=str(out_dir), rank=rank)
    except Exception as e:  # an export problem must not lose the training checkpoint
        return f"PEFT export failed: {type(e).__name__}: {e}"
    return None


CHECKPOINT_INFO = "checkpoint.json"  # {"global_step": N}, written beside state.pt (checkpoints written before it lack it)
STATE_KEYS = ("optimizer", "controller", "run", "config", "shock_gen", "torch_rng")  # what every state.pt holds
# TrainConfig keys whose default is not what a run saved before the key existed did: such a run's stored config
# lacks the key, and reads as this value (its resume, predict and summary keep the data as it trained on it)
LEGACY_CONFIG = {"text_eos": False}  # their text rows had no eos


def read_state(ckpt: str | os.PathLike, trust_checkpoint: bool = False) -> dict:
    """A checkpoint folder's `state.pt`, read with `torch.load(weights_only=True)` unless `trust_checkpoint`: a
    file holding anything else (a pickle that would run code) is a UsageError that says how to load a trusted one.
    So is one that lacks keys every `save_checkpoint` writes (`STATE_KEYS`, and the run's `global_step`): a file
    written by another tool or edited; it was a KeyError (an internal error) wherever a key was first read."""
    path = Path(ckpt) / "state.pt"
    try:
        st = load_state_file(path, trust_checkpoint, "--trust-checkpoint (Python: trust_checkpoint=True)")
    except pickle.UnpicklingError as e:
        raise UsageError(str(e)) from None
    except ValueError as e:  # damaged: cut short, empty, junk
        raise UsageError(f"{e}{other_checkpoints(ckpt)}") from e
    missing = [k for k in STATE_KEYS if k not in st] if isinstance(st, dict) else list(STATE_KEYS)
    if not missing and not (isinstance(st["run"], dict) and "global_step" in st["run"]):
        missing = ["run.global_step"]
    if missing:
        what = f"it lacks the keys {missing}" if isinstance(st, dict) else f"it holds a {type(st).__name__}"
        raise UsageError(f"{path}: not a unified-lora checkpoint state ({what}; every checkpoint this library "
                         f"writes holds {list(STATE_KEYS)}): written by another tool, or edited. Delete that "
                         "checkpoint folder to resume from an older one, or start a new run in another --output-dir"
                         f"{other_checkpoints(ckpt)}")
    if isinstance(st["config"], dict):
        st["config"] = {**LEGACY_CONFIG, **st["config"]}
    st.setdefault("lr_schedule", dict(LEGACY_SCHEDULE))  # saved before LR schedules: a constant LR
    return st


def other_checkpoints(ckpt: str | os.PathLike) -> str:
    """For an error about checkpoint folder `ckpt` of a run (`RUN/checkpoints/NAME` or `RUN/best`): "; this run's
    other checkpoints: step-2, best", the run's other complete checkpoints (folders with a `state.pt`; none
    is read), or that it has none. Nothing is said of a folder elsewhere (`predict --checkpoint PATH`)."""
    ckpt = Path(ckpt)
    if ckpt.parent.name == "checkpoints":
        run = ckpt.parent.parent
    elif ckpt.name == BEST and (ckpt.parent / "checkpoints").is_dir():
        run = ckpt.parent
    else:
        return ""
    root = run / "checkpoints"
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
    found = sorted(found, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])
    found += [run / BEST]
    names = [p.name for p in found if (p / "state.pt").is_file() and p.resolve() != ckpt.resolve()]
    if not names:
        return "; this run has no other checkpoint"
    return f"; this run's other checkpoints: {', '.join(names)} (train --resume reads the newest once the damaged one is deleted; predict --checkpoint NAME reads any)"


def check_world_size(st: dict, ckpt, world: int) -> None:
    """A UsageError where the checkpoint state `st` was written by another number of processes than `world`: each
    optimizer step's global batch is batch_size × processes rows, so another number would train on other batches from
    the saved position on (and one process' checkpoints hold no RNG state for the others). Checkpoints written before
    the number was recorded are a single process's."""
    saved = st.get("world_size", 1)
    if saved != world:
        how = "without torchrun (one process)" if saved == 1 else f"with torchrun --nproc-per-node {saved} (or " \
              f"{saved} processes over several machines)"
        raise UsageError(f"--resume {ckpt}: the run was trained by {saved} process(es), and this one has {world}: "
                         f"each step's rows are split over the processes (the global batch is batch_size x "
                         f"processes), so another number would train on other batches. Resume it {how}, or start a "
                         "new run in another --output-dir")


def _checkpoint_step(ckpt: Path, trust_checkpoint: bool) -> int:
    """The global step of a checkpoint folder: from its `checkpoint.json` where it has a readable one, else (a
    checkpoint written before that file was) from its `state.pt`."""
    try:
        step = json.loads((ckpt / CHECKPOINT_INFO).read_text(encoding="utf-8"))["global_step"]
        if isinstance(step, int) and not isinstance(step, bool):
            return step
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return read_state(ckpt, trust_checkpoint)["run"]["global_step"]


def settle_interrupted_saves(root: str | os.PathLike) -> list[str]:
    """Finish what a save killed while it replaced a checkpoint left. `save_checkpoint` over an existing `<tag>`
    renames it to `.old-<tag>-<pid>`, then its complete temp folder `.tmp-<tag>-<pid>` to `<tag>`, then deletes
    the old copy. A kill between the two renames left no `<tag>` (a resume then went on from an older checkpoint, or
    found none) and the next save's sweep of `.tmp-*` deleted the new copy, the old one staying for good: the new
    copy (written whole before the first rename) now goes back under `<tag>`, or the old one where the new one is
    gone. An `.old-` copy whose `<tag>` is in place (a kill before its removal) is removed. Returns the tags put
    back. A run's checkpoint folder has one writer: call this only where no save is under way in `root`."""
    root = Path(root)
    restored = []
    for old in sorted(root.glob(".old-*")) if root.is_dir() else ():
        m = re.fullmatch(r"\.old-(.+)-(\d+)", old.name)
        if not m or not old.is_dir():
            continue
        tag, pid = m.groups()
        final, new = root / tag, root / f".tmp-{tag}-{pid}"
        if not final.exists():
            os.replace(new if new.is_dir() else old, final)
            restored.append(tag)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    return restored


def latest_checkpoint(root: str | os.PathLike, trust_checkpoint: bool = False, settle: bool = True) -> Path | None:
    """The newest complete checkpoint (a folder with a `state.pt`) under root (temp folders of an interrupted save
    are ignored), by the global step in each one's small `checkpoint.json`: no `state.pt` is read here, so many
    checkpoints of a big model cost no time or memory (a checkpoint written before that file was has its `state.pt`
    read, as `read_state` reads it). The caller reads the one returned, and a damaged or foreign one is an error
    there that names it; an older one is not read. With `settle` (the default; leave it off where a run may be saving
    into root), a checkpoint that a save killed while replacing it left under a temporary name is first put back
    (`settle_interrupted_saves`)."""
    root = Path(root)
    if not root.is_dir():
        return None
    if settle:
        settle_interrupted_saves(root)
    done = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "state.pt").is_file()]
    if not done:
        return None
    return max(done, key=lambda p: _checkpoint_step(p, trust_checkpoint))


BEST = "best"  # OUTPUT_DIR/best/: the checkpoint of the run's best dev evaluation (train --save-best)


def resume_checkpoint(out_dir: str | os.PathLike, trust_checkpoint: bool = False, settle: bool = True) -> Path | None:
    """The checkpoint `train --resume` goes on from: the newest under `out_dir/checkpoints` (`latest_checkpoint`),
    or `out_dir/best/` where that is newer. `best/` is a whole checkpoint, written at the evaluation it holds; it is
    newer only where the run was killed (SIGKILL, a crash) after a new best and before its next checkpoint. Going on
    from an older one would leave in `best/` the weights of steps the resumed run trains again (and, with other
    settings, not to them), while its state names an older best. `settle`: as for `latest_checkpoint` (off: read
    only, where a run may be saving)."""
    found = latest_checkpoint(Path(out_dir) / "checkpoints", trust_checkpoint, settle=settle)
    best = Path(out_dir) / BEST
    if settle and Path(out_dir).is_dir():
        settle_interrupted_saves(out_dir)  # a save of best/ killed between its two renames
    if (best / "state.pt").is_file() and (
            found is None or _checkpoint_step(best, trust_checkpoint) > _checkpoint_step(found, trust_checkpoint)):
        return best
    return found


def prune_step_checkpoints(root: str | os.PathLike, keep: int) -> list[str]:
    """Delete the `step-N` checkpoints under root but the newest `keep` (by N, the global step they hold); keep=0
    keeps all. `epoch-N` checkpoints are never deleted. Call it after a save has completed, so the newest complete
    checkpoint always stays. Each goes by a rename to a `.tmp-` name first, then is removed: a kill in between leaves
    no half-deleted folder under a checkpoint's name (the next save's sweep removes it). Returns the deleted names."""
    root = Path(root)
    if keep <= 0 or not root.is_dir():
        return []
    steps = sorted((int(m.group(1)), p) for p in root.iterdir()
                   if p.is_dir() and (m := re.fullmatch(r"step-(\d+)", p.name)))
    gone = []
    for _, p in steps[:max(len(steps) - keep, 0)]:
        doomed = root / f".tmp-pruned-{p.name}-{os.getpid()}"
        os.replace(p, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        gone.append(p.name)
    return gone


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def phi_summary(trace: list[dict], shock_start: int, shock_end: int) -> dict:
    """Pre-shock φ (last step before the shock), peak φ (shock window and after), final φ."""
    if not trace:
        return {}
    phis = [float(r["phi"]) for r in trace]
    # a trace that ends before the shock (a run interrupted before it, or a window past the last epoch) is all
    # pre-shock: its last φ, and the peak over all of it (it was step 0's φ, "peak" at step 0, whatever φ did)
    pre = phis[min(shock_start, len(phis)) - 1] if shock_start > 0 else phis[0]
    peak_i = max(range(shock_start if shock_start < len(phis) else 0, len(phis)), key=lambda i: phis[i])
    modes = [int(r["mode"]) for r in trace]
    ranks = [int(r["rank"]) for r in trace]
    return {"pre_shock": pre, "peak": phis[peak_i], "peak_step": trace[peak_i].get("step", peak_i), "final": phis[-1],
            "final_mode": modes[-1], "final_rank": ranks[-1], "mean_rank": sum(ranks) / len(ranks),
            "steps_in_mode": {m: modes.count(i) for i, m in enumerate(("SINGLE", "MULTI", "MIRROR"))}}


CONFLICT_MODES = ("SINGLE", "MULTI/MIRROR")  # `conflict_summary`'s groups: where the task gradients were read


def conflict_summary(trace: list[dict]) -> dict:
    """A multi-task trace's gradient-conflict diagnostics (the multi-task controller's components), by the mode the
    signal read them in (`CONFLICT_MODES`; a transition's step in the mode it left: the signal reads before the
    transition): in SINGLE the task gradients are read at the shared adapter, and C_grad is the conflict φ reads; in
    MULTI/MIRROR at each task's own adapter, where φ reads the weight conflict C_weight once the task adapters have
    moved (`MultiTaskSignalConfig.conflict`: the gradient conflict there reads as low for flipped labels as for two
    halves of one data set once the adapters fit their tasks). Averaged over every step, C_grad mixed the two.
    `modes`: for each group the trace has steps in, `steps` (its steps), `C_weight` (its steps that recorded one,
    which φ read) and, for `C_grad` (the gradient conflict the signal computed) and `C_grad_raw` (the plain cosine
    conflict), the mean and the largest value with its step, over its steps that recorded a finite number
    (`steps`), and `rho`: each task's mean gradient reliability `rho[TASK]` over its steps that recorded a finite one
    (`{"mean", "steps"}`; the reliability of the gradients read at the shared adapter, or at the task's own one, as
    C_grad is: averaged over every step it mixed the two). `of`: the trace's steps. {} for a trace without them (a
    single-task run's). (A summary.json written before the modes had `rho` beside `of`, each task's mean over every
    step.)"""
    out: dict = {}
    comps = [(r.get("step"), _read_in(r), r.get("components") or {}) for r in trace]
    modes: dict = {}
    for group in CONFLICT_MODES:
        steps = [(step, c) for step, m, c in comps if m == group]
        one: dict = {}
        for key in ("C_grad", "C_grad_raw"):
            vals = [(step, v) for step, c in steps if (v := _finite(c.get(key))) is not None]
            if vals:
                top = max(vals, key=lambda sv: sv[1])
                one[key] = {"mean": sum(v for _, v in vals) / len(vals), "max": top[1], "max_step": top[0],
                            "steps": len(vals)}
        rho: dict[str, list[float]] = {}
        for _, c in steps:
            for k, v in c.items():
                if k.startswith("rho[") and k.endswith("]") and (v := _finite(v)) is not None:
                    rho.setdefault(k[4:-1], []).append(v)
        if rho:
            one["rho"] = {task: {"mean": sum(vs) / len(vs), "steps": len(vs)} for task, vs in rho.items()}
        if one:
            modes[group] = {"steps": len(steps), "C_weight": sum(_finite(c.get("C_weight")) is not None
                                                                 for _, c in steps), **one}
    if modes:
        out["modes"] = modes
        out["of"] = len(trace)
    return out


def _read_in(r: dict) -> str | None:
    """The `CONFLICT_MODES` group of the mode a step's signal read its gradients in: the record's mode, or for a
    transition's step the mode it left (`"SINGLE->MULTI"`: SINGLE); None for a record without a mode it names."""
    t = r.get("transition")
    name = t.split("->")[0] if isinstance(t, str) and "->" in t else None
    if name is None:
        m = r.get("mode")
        name = MODES[m] if isinstance(m, int) and not isinstance(m, bool) and 0 <= m < len(MODES) else None
    return None if name not in MODES else "SINGLE" if name == "SINGLE" else "MULTI/MIRROR"


def held_merges(trace: list[dict]) -> list[dict]:
    """A multi-task trace's merges held at the run's end: the steps that recorded `merge_closed_from` (φ called for a
    merge in MULTI from that step on, in the run's last `resplit_window` steps, too close to its end to be tested),
    one entry per `merge_closed_from` (a run resumed with a longer --steps held its first session's at another
    step), in the trace's order: {"closed_from", "first_step", "steps"}. [] where none was held."""
    out: dict = {}
    for r in trace:
        closed = (r.get("components") or {}).get("merge_closed_from")
        if isinstance(closed, int) and not isinstance(closed, bool):
            held = out.setdefault(closed, {"closed_from": closed, "first_step": r.get("step"), "steps": 0})
            held["steps"] += 1
    return list(out.values())


def _finite(v) -> float | None:
    """A trace value as a finite float, else None (not recorded, None, or a non-finite step's NaN, which the trace
    writes as the string "nan")."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def transitions(trace: list[dict]) -> list[dict]:
    """Each transition's record; a Mirror exit's also with the rule that decided it (`policy`) and the loss EMAs
    that rule compared (`loss_at_entry`, `loss_at_exit`), which the controller records in its components; a
    multi-task one's with its `event` (`split` or `merge`), a merge's `merge_residual`, and, for a split within
    `resplit_window` of its merge, `tasks_back` (the task adapters brought back) and `merge_held_until` (the first
    step at which the next merge may come)."""
    out = []
    for r in trace:
        if r.get("transition"):
            t = {k: r.get(k) for k in ("step", "transition", "phi", "rank", "lr", "snapshot", "drift")}
            comps = r.get("components") or {}
            if "mirror_policy" in comps:
                t.update(policy=comps["mirror_policy"], loss_at_entry=comps.get("mirror_loss_entry"),
                         loss_at_exit=comps.get("mirror_loss_exit"))
            t.update({k: comps[k] for k in ("event", "merge_residual", "tasks_back", "merge_held_until")
                      if comps.get(k) is not None})
            out.append(t)
    return out


def transition_line(t: dict) -> str:
    """`report`'s line for one of `transitions`' records: its step, modes, φ, rank and LR, then what it did (a Mirror
    snapshot; a multi-task split or merge, and a split's task adapters brought back and the merge held until)."""
    line = f"[{t['step']}] {t['transition']} φ={t['phi']:.3f} rank={t['rank']} lr={t['lr']}"
    if t.get("snapshot"):
        line += f", snapshot {t['snapshot']}"
    if t.get("drift") is not None:
        line += f", drift={t['drift']:.2%}"
    return line + transition_note(t)  # (a multi-task split or merge: as the console's line at that step)


def iterate(run: Run, enc: dict, steps_total: int, epochs: int, steps_per_epoch: int) -> Iterator[tuple[int, dict]]:
    """Yield (epoch, micro-batches of one optimizer step) from the run's current position to the end (resume-aware),
    and (epoch, None) at each epoch's end. A step takes `cfg.grad_accum` consecutive batches of the epoch; the last
    step of an epoch whose batch count is no multiple of it takes the batches left (as Hugging Face's Trainer does).
    `run.state.step_in_epoch` counts optimizer steps. Under DDP a batch holds batch_size × `run.world` rows: the
    global micro-batch, the same on every process, which `Run.train_step` cuts into each process's rows."""
    cfg = run.cfg
    while run.state.global_step < steps_total and run.state.epoch < epochs:
        epoch_batches = batches(enc, cfg.batch_size * run.world, cfg.seed, run.state.epoch)  # DDP: global batches
        groups = [epoch_batches[i:i + cfg.grad_accum] for i in range(0, len(epoch_batches), cfg.grad_accum)]
        while run.state.step_in_epoch < len(groups) and run.state.global_step < steps_total:
            group = groups[run.state.step_in_epoch]
            run.state.step_in_epoch += 1  # before the step: a checkpoint taken after it must not repeat these batches
            yield run.state.epoch, group
        if run.state.step_in_epoch >= len(groups):
            run.state.epoch += 1
            run.state.step_in_epoch = 0
            yield run.state.epoch - 1, None  # end-of-epoch marker


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t
