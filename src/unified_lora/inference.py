"""`unified-lora predict`: a `unified-lora train` run's checkpoint used on new data.

A run's checkpoint (`RUN/checkpoints/epoch-N` or `step-N`: every nested LoRA block, the head, `state.pt` with the
run's config and controller state) is loaded into the run's base model as `--resume` loads it, through the same `Run`
setup, at the rank the controller had at that checkpoint. A classifier then predicts the class of each row of a table
(or of a GLUE dev.tsv / test.tsv), with per-class probabilities, scoring the rows that have labels as `train`'s dev
evaluation does; a causal LM generates a completion for each prompt (`model.generate`, greedy by default), the prompt
encoded as training put a text's start, or scores a labelled text file (loss, perplexity).
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .config import MODES
from .data import DataError, TextDataset, glue_metrics, load_table, normalize_task
from .data.loaders import (_GLUE, _check_no_null_text, _read_records, check_columns, glue_label_value,
                           load_glue_rows, missing_key_error, no_rows_error, read_text, record_at, record_lines)
from .training import (BEST, TEXT_SUFFIXES, Run, TrainConfig, UsageError, _load_texts, _messages, autocast,
                       check_precision, check_row_length, detect_task_type, encode_rows, evaluate, hub_snapshot,
                       latest_checkpoint, load_model, model_context, model_device, predict_logits, read_state,
                       render_chat, resolve_device, resolve_model, seed_everything, special_prefix, unused_label_note)

FORMATS = ("csv", "tsv", "jsonl")  # what predictions are written as (the output name's extension)
ID_COLUMNS = ("id", "idx", "index", "guid")  # a table's id column, found by name (any case) without --id-column


@dataclass
class Trained:
    """A run's checkpoint loaded to predict with: the `Run` (model with nested LoRA, controller at the checkpoint's
    mode and rank), its tokenizer, and what the run was."""

    run: Run
    tokenizer: object
    checkpoint: Path
    step: int
    task_type: str  # seq-cls | causal-lm
    task: str  # what `train` scored its dev set as (glue_metrics' task): a GLUE key, the data file's stem, or "lm"
    glue: str | None  # the GLUE task key of a run trained on a GLUE task folder (or the shipped MRPC)
    classes: list[str] | None  # class names in label-id order
    route: str | None = None  # a multi-task run's task whose adapter and classes predict (`predict --task`)

    @property
    def cfg(self) -> TrainConfig:
        return self.run.cfg

    @property
    def model(self):
        return self.run.model

    @property
    def chat(self) -> bool:
        """Whether the run trained on chat data (its checkpoints record it; False for a run saved before they did)."""
        return self.run.chat

    @property
    def rank(self) -> int:
        return self.run.ctrl.rank

    @property
    def mode(self) -> str:
        return MODES[self.run.ctrl.mode]


# ----------------------------------------------------------------------------- the run's checkpoint


def _adapter_only_error(folder: Path, given: str) -> UsageError:
    from .callbacks import ADAPTER_ONLY_NAME

    return UsageError(f"{given}: an adapter-only checkpoint of the Trainer callback ({folder} holds "
                      f"{ADAPTER_ONLY_NAME}), not a `unified-lora train` run; predict reads a train run's "
                      "--output-dir (RUN/checkpoints/*/state.pt). Load that checkpoint with "
                      "unified_lora.callbacks.load_adapter_only")


LATEST = "latest"  # --checkpoint latest: the run's newest under checkpoints/, as no --checkpoint


def find_checkpoint(run_dir: str | os.PathLike, checkpoint: str | None = None) -> Path:
    """The checkpoint folder to predict with: `checkpoint` (a name under `run_dir/checkpoints`, `best` for the run's
    `best/` of `train --save-best`, or a checkpoint folder's path), else (None, or `latest`) the run's newest under
    `checkpoints/` (`latest_checkpoint`, read only; `--resume` also takes `best/` where that is newer). A folder that is not a
    `unified-lora train` run (an adapter-only Trainer checkpoint, a demo's folder, a checkpoint folder itself) is a
    UsageError saying what to pass."""
    from .callbacks import is_adapter_only_folder

    run = Path(run_dir)
    if not run.is_dir():
        raise UsageError(f"{run_dir}: no such run folder; pass the --output-dir of a `unified-lora train` run")
    folders = [run, *sorted(run.glob("checkpoint-*"))]  # a Trainer's output_dir, and its checkpoints
    adapter_only = next((p for p in folders if p.is_dir() and is_adapter_only_folder(p)), None)
    if adapter_only is not None:
        raise _adapter_only_error(adapter_only, str(run_dir))
    if (run / "state.pt").is_file():
        raise UsageError(f"{run_dir}: a checkpoint folder, not a run folder; pass the run's --output-dir and "
                         f"--checkpoint {run.name}")
    root = run / "checkpoints"
    if checkpoint is None or checkpoint == LATEST:
        found = latest_checkpoint(root, settle=False)  # read only: the run may be saving into it now
        if found is None:
            demo = " (a demo's folder has none: only `unified-lora train` writes checkpoints)" if (
                run / "trace.jsonl").is_file() else ""
            raise UsageError(f"{run_dir}: not a `unified-lora train` run: no checkpoint under {root}{demo}; pass the "
                             "--output-dir of a train run")
        return found
    # a name: a checkpoint under checkpoints/, or the run's best/ (train --save-best)
    plain = "/" not in checkpoint and os.sep not in checkpoint
    named = next((p for p in (root / checkpoint, run / checkpoint) if plain and (p / "state.pt").is_file()),
                 root / checkpoint)
    path = named if (plain and named.is_dir()) else Path(checkpoint).expanduser()
    if not path.is_dir():
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if root.is_dir() else []
        names += [BEST] if (run / BEST / "state.pt").is_file() else []
        close = difflib.get_close_matches(checkpoint, names, n=1) if plain else []  # (--checkpoint bset: best)
        if checkpoint == BEST and not (run / BEST).exists():  # (it said "no such checkpoint ... and no such folder")
            raise UsageError(f"--checkpoint best: {run_dir} has no best/, which only a run trained with --save-best "
                             f"writes; its checkpoints are {', '.join(names) if names else 'none'}")
        raise UsageError(f"--checkpoint {checkpoint}: no such checkpoint in {root} "
                         f"({', '.join(names) if names else 'it holds none'}) and no such folder"
                         + (f" (did you mean {close[0]}?)" if close else ""))
    if is_adapter_only_folder(path):
        raise _adapter_only_error(path, f"--checkpoint {checkpoint}")
    if not (path / "state.pt").is_file():
        raise UsageError(f"--checkpoint {checkpoint}: {path} holds no state.pt; pass a checkpoint that "
                         "`unified-lora train` wrote (RUN/checkpoints/epoch-N or step-N)")
    return path


def run_task(cfg: TrainConfig, task_type: str) -> tuple[str, str | None]:
    """(task, glue): the task name `train`'s dev evaluation scored the run as (`load_data`'s: a GLUE key, a table's
    stem, "lm" for a causal LM) and the GLUE key where the run trained on a GLUE task folder (None: a table)."""
    if task_type == "causal-lm":
        return "lm", None
    if cfg.data is None:
        return "mrpc", "mrpc"  # the shipped MRPC
    p = Path(cfg.data)
    key = normalize_task(p.name)
    if key in _GLUE and (p.is_dir() or p.suffix.lower().lstrip(".") not in FORMATS):
        return key, key
    return p.stem, None


def load_trained(run_dir: str | os.PathLike, checkpoint: str | None = None, device: str = "auto",
                 precision: str | None = None, trust_checkpoint: bool = False,
                 task_check: Callable[[str], None] | None = None, task: str | None = None,
                 config_check: Callable[[TrainConfig], None] | None = None, all_tasks: bool = False,
                 command: str = "predict") -> Trained:
    """Load a run's checkpoint to predict with (`find_checkpoint` picks it). The run's config comes from the
    checkpoint's `state.pt`; the base model is loaded and wrapped as `train` does (`load_model`, `Run`), and the
    checkpoint's tensors (`Run.load_weights`) and controller state go in, so the layers run at the controller's rank at
    that checkpoint. `device` (default auto) and `precision` (default: the run's) are checked before any model is
    loaded, and so are `task` and then the run's task type, by `task_check`, and its config, by `config_check` (the
    command's own flags against them). A multi-task run (several --data sets) predicts for one of its tasks, `task`
    (required there unless `all_tasks`, refused on a one-task run): with that task's adapter, classes and data layout;
    with `all_tasks` and no `task` it is loaded for none in particular (`unified-lora export` writes every task's).
    `command`: what the errors about the checkpoint's tensors name."""
    ckpt = find_checkpoint(run_dir, checkpoint)
    st = read_state(ckpt, trust_checkpoint)
    stored = dict(st["config"])
    precision = precision or stored.get("precision") or "fp32"
    check_precision(resolve_device(device), precision)
    # on the device asked for now (as a resume), eager Mirror copies (predict makes none; the fused kernels would need
    # a compiler)
    cfg = TrainConfig.from_dict({**stored, "device": device, "precision": precision, "mirror_kernel": "eager"})
    model_path = resolve_model(cfg.model, recorded=True)
    task_type = st.get("task_type") or detect_task_type(model_path, cfg.task_type)
    specs = st.get("tasks")  # a multi-task run's: --task is checked first, before the command's other checks
    if specs and task is None and not all_tasks:
        raise UsageError(f"{run_dir} is a multi-task run (tasks {', '.join(t['name'] for t in specs)}): pass --task "
                         "NAME, the task whose adapter and classes predict")
    names = [t["name"] for t in specs or ()]
    if specs and task is not None and task not in names:
        # (case aside: --task MRPC for the task mrpc)
        close = [n for n in names if n.lower() == task.lower()] or difflib.get_close_matches(task, names, n=1)
        raise UsageError(f"--task {task}: not a task of {run_dir}; its tasks are {', '.join(names)}"
                         + (f" (did you mean {close[0]}?)" if close else ""))
    if not specs and task is not None:
        raise UsageError(f"--task {task}: for a multi-task run (several --data sets); {run_dir} trained on one data "
                         "set")
    if task_check is not None:
        task_check(task_type)
    if config_check is not None:
        config_check(cfg)
    num_labels = int(st.get("num_labels") or 0)
    classes = st.get("classes") or ([str(i) for i in range(num_labels)] if num_labels else None)
    seed_everything(cfg.seed)
    model, tok = load_model(model_path, task_type, max(num_labels, 2))
    if specs:
        from .multitask_train import MultiTaskRun, TaskSpec

        spec = next((TaskSpec(**t) for t in specs if t["name"] == task), None)
        run = MultiTaskRun(cfg, model, [TaskSpec(**t) for t in specs], None, print_fn=None,
                           total_steps=st["lr_schedule"]["total_steps"])
    else:
        run = Run(cfg, model, task_type, num_labels, None, print_fn=None, classes=classes, chat=bool(st.get("chat")),
                  total_steps=st["lr_schedule"]["total_steps"])  # (the run's schedule is built, never stepped)
    run.load_weights(ckpt, flag=command)
    run.ctrl.load_state_dict(st["controller"])
    model.eval()
    if specs and task is None:  # (all_tasks) every task: no one task's layout, metrics or classes
        return Trained(run, tok, ckpt, int(st["run"]["global_step"]), task_type, ", ".join(names), None, None)
    if specs:  # the task's own data layout, metrics and classes
        return Trained(run, tok, ckpt, int(st["run"]["global_step"]), task_type, spec.metric_task, spec.glue,
                       list(spec.classes) or None, route=task)
    task, glue = run_task(cfg, task_type)
    return Trained(run, tok, ckpt, int(st["run"]["global_step"]), task_type, task, glue,
                   list(classes) if classes else None)


# ----------------------------------------------------------------------------- merged model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # export --dtype
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
# the files a model folder's weights (or an adapter) are read from: a previous export's that a new one does not write
# would be read instead of the new weights (a model.safetensors beside new shards) or beside them (an adapter's config
# makes transformers load the folder as a PEFT adapter)
_MODEL_FILE = re.compile(r"(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?"
                         r"|adapter_config\.json|tf_model\.h5|flax_model\.msgpack")


def stored_dtype(model_path: str) -> torch.dtype:
    """The dtype a base model's weights are stored in, as transformers' dtype="auto" reads it: its config's (`dtype`,
    transformers 4's `torch_dtype`), else that of the first floating-point tensor of its safetensors weights (a local
    folder's, or a hub id's in the Hugging Face cache: `hub_snapshot`, which holds them once the model has loaded),
    else of its `pytorch_model.bin` weights (or their first shard), where it has no safetensors, as transformers then
    loads those (`_bin_dtype`: the tensors are not read); fp32 where none says. (`load_model` loads every model in
    fp32, whatever this is.)"""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    from safetensors import safe_open

    folder = Path(model_path) if Path(model_path).is_dir() else hub_snapshot(model_path)
    safetensors = sorted(folder.glob("*.safetensors")) if folder is not None else []
    for f in safetensors:
        with safe_open(f, "pt") as st:
            for key in st.keys():
                found = _SAFETENSORS_DTYPES.get(st.get_slice(key).get_dtype())
                if found is not None:
                    return found
    bins = sorted(f for f in folder.glob("pytorch_model*.bin") if _BIN_WEIGHTS.fullmatch(f.name)) \
        if folder is not None and not safetensors else []
    return (_bin_dtype(bins[0]) if bins else None) or torch.float32


_BIN_WEIGHTS = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin")  # transformers' WEIGHTS_NAME and its shards


def _bin_dtype(path: Path) -> torch.dtype | None:
    """The dtype of the first floating-point tensor (one `_SAFETENSORS_DTYPES` has) of a `torch.save`d state dict, as
    transformers' `get_state_dict_dtype` takes it; None where it has none. Read onto the meta device, memory-mapped:
    no tensor's data is read (a file of torch's old, pre-zip format, which cannot be mapped, is read through)."""
    import zipfile

    state = torch.load(path, map_location="meta", weights_only=True, mmap=zipfile.is_zipfile(path))
    floats = set(_SAFETENSORS_DTYPES.values())
    return next((t.dtype for t in state.values() if isinstance(t, torch.Tensor) and t.dtype in floats), None)


def quantization_of(model_path: str) -> str | None:
    """How a base model's weights are quantized, from its config's `quantization_config` (bitsandbytes 4-bit or
    8-bit, GPTQ, AWQ, ...), or None."""
    from transformers import AutoConfig

    q = getattr(AutoConfig.from_pretrained(model_path), "quantization_config", None)
    if not q:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    bits = "4-bit" if q.get("load_in_4bit") else "8-bit" if q.get("load_in_8bit") else None
    return " ".join(str(x) for x in (q.get("quant_method"), bits) if x) or "quantized"


def write_merged(trained: Trained, out: Path, rank: int, dtype: torch.dtype) -> int:
    """Write `trained`'s model with the adapter's delta at `rank` folded in (`Run.merged_model`, on the fp32 weights
    the run loaded; a multi-task run's for its task, `trained.route`) as a plain transformers model folder `out`:
    the weights cast to `dtype` (each rounded once, after the merge), the config (a classifier's labels named by the
    run's classes), the generation config and the tokenizer, by `save_pretrained`. It loads with
    `AutoModelFor...from_pretrained(out)`, without unified-lora or PEFT. Written as the adapter export is (into a
    temporary folder in `out`, then renamed in, `config.json` last: `folder_written_atomically`); a previous export's
    weight or adapter files that this one does not write are deleted (from_pretrained would read them). The run's
    model is consumed. Returns the bytes of the weight files written."""
    from ._files import folder_written_atomically

    model = trained.run.merged_model(rank, trained.route)
    if trained.task_type == "seq-cls" and trained.classes:
        model.config.id2label = dict(enumerate(trained.classes))
        model.config.label2id = {c: i for i, c in enumerate(trained.classes)}
    model.to(dtype)
    with folder_written_atomically(str(out), "config.json", drop=_MODEL_FILE.fullmatch) as tmp:
        model.save_pretrained(tmp)
        trained.tokenizer.save_pretrained(tmp)
        return sum(p.stat().st_size for p in Path(tmp).iterdir() if _MODEL_FILE.fullmatch(p.name))


# ----------------------------------------------------------------------------- files


def output_path(run_dir: str | os.PathLike, given: str | None, source: Path, fmt: str, task: str | None = None) -> Path:
    """Where the predictions go: `given`, else RUN/predictions.<fmt>, or for a multi-task run's `task`
    RUN/predictions-<task>.<fmt> (one file for every task, the next task's predictions replaced the previous one's).
    Its extension names the format (.csv, .tsv, .jsonl). The input file itself is refused (predictions never replace
    their input), and so is a folder."""
    out = Path(given).expanduser() if given else Path(run_dir) / f"predictions{f'-{task}' if task else ''}.{fmt}"
    flag = f"--output {given}" if given else f"the default output {out}"
    if out.suffix.lower().lstrip(".") not in FORMATS:
        raise UsageError(f"{flag}: name a .csv, .tsv or .jsonl file (the format is taken from the extension)")
    if out.is_dir():
        raise UsageError(f"{flag}: is a folder; name the file to write")
    if out.resolve() == source.resolve() or (out.exists() and os.path.samefile(out, source)):
        raise UsageError(f"{flag}: is the input file {source}; predictions never replace their input: pass another "
                         "--output")
    return out


def write_rows(path: Path, rows: Sequence[dict]) -> None:
    """`rows` (dicts with the same keys) as a .csv/.tsv (a header, then a line a row) or .jsonl (an object a line) file,
    by its extension, written under a temporary name and renamed (`written_atomically`): a reader never sees half a
    file, and a failed write leaves the previous one."""
    import json

    from ._files import written_atomically

    fmt = path.suffix.lower().lstrip(".")
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_atomically(str(path)) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        else:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [], delimiter="\t" if fmt == "tsv" else ",",
                               lineterminator="\n")
            w.writeheader()
            w.writerows({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, tuple, dict)) else v
                         for k, v in r.items()} for r in rows)  # a chat prompt (its messages) as JSON text


def _input_file(path: str, flag: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        raise DataError(f"{flag} {path}: is a folder; pass a file (for a GLUE task folder: its dev.tsv or test.tsv)")
    if not p.is_file():
        raise DataError(f"{flag} {path}: no such file; check the path")
    return p


def _id_column(records: list[dict], given: str | None, skip: Sequence[str], path: Path,
               output: Sequence[str] = ()) -> str | None:
    """The id column of a table: `given`, else the first column of the first record named id, idx, index or guid
    (any case) that the run does not read as text or label, else None. The column must be in every record: a .jsonl
    record without it is a DataError naming the record and its line (a found column's ids were null there, silently;
    a given one's error said "unknown column", of a column the other records have). A `given` that is one of the
    `output` columns predict writes is a DataError: an output row is a dict, and that column replaced the ids."""
    if given is not None and given in output:
        raise DataError(f"--id-column {given}: predict writes its own {given!r} column, which would replace the ids "
                        f"(its output columns: {', '.join(output)}); rename that column of {path}")
    if given is not None and not any(given in r for r in records):
        raise DataError(f"--id-column {given}: unknown column in {path}; columns are {list(records[0])}")
    name = given if given is not None else next(
        (k for k in records[0] if str(k).lower() in ID_COLUMNS and k not in skip), None)
    missing = next((n for n, r in enumerate(records, start=1) if name is not None and name not in r), None)
    if missing is not None:
        how = f"--id-column {given}: " if given is not None else ""
        what = ", the id column" if given is not None else ", the id column found by its name"
        raise DataError(f"{how}{missing_key_error(records, missing, name, path, what)}")
    return name


# ----------------------------------------------------------------------------- classification


@dataclass
class Rows:
    """Rows to classify: a TextDataset (label -1 where the file has none) and the id of each row (the file's id
    column, `id_name`) where it has one."""

    data: TextDataset
    ids: list | None
    id_name: str | None
    fmt: str  # the input's format, the default output's
    label_column: str | None = None  # the run's label column where the file has it (empty cells or not), else None

    @property
    def scored(self) -> int:
        """How many rows have a label (`classify` scores those)."""
        return sum(e.label >= 0 for e in self.data)

    @property
    def labelled(self) -> bool:
        """Whether any row has a label (then `classify` scores)."""
        return self.scored > 0


def read_rows(trained: Trained, path: str, id_column: str | None = None) -> Rows:
    """The rows of `path` to classify, read as `train` reads a --dev-data file: a run trained on a table reads a
    .csv/.tsv/.jsonl table with its `text_columns`, and its `label_column` where the file has one (the labels by the
    run's class names, as a dev set's; a row without one, an empty cell or a .jsonl record without the key, is
    predicted, not scored); a run trained on a GLUE task reads that task's dev.tsv (labelled) or test.tsv (index and
    texts, no labels). A missing file or column is a DataError."""
    cfg = trained.cfg
    p = _input_file(path, "--data")
    fmt = p.suffix.lower().lstrip(".")
    if trained.glue is not None:
        spec = _GLUE[trained.glue]
        if fmt != "tsv" or id_column is not None:
            what = "--id-column: a GLUE file's ids are its index column" if id_column is not None else \
                f"--data {path}: not a .tsv file"
            raise DataError(f"{what}; the run trained on GLUE {spec.folder}: pass a file in that task's layout, its "
                            "dev.tsv (labelled) or its test.tsv (index, then the texts)")
        data, labelled, ids = load_glue_rows(trained.glue, p)
        return Rows(data, ids, "index" if ids is not None else None, fmt, "label" if labelled else None)
    if fmt not in FORMATS:
        raise DataError(f"--data {path}: unsupported data format {fmt!r}; a classifier takes a .csv, .tsv or .jsonl "
                        "table")
    records = _read_records(p, fmt, [*cfg.text_columns, cfg.label_column])
    if not records:
        raise no_rows_error(p)
    # the labelled rows are scored, the others predicted only: a label column with empty cells, .jsonl records with
    # and without the key (they were refused; a first record without it left every label unread)
    data = load_table(p, list(cfg.text_columns), cfg.label_column, label_names=trained.classes, names_only=True,
                      unlabelled_rows=True, classes_hint=f"the run trained on ({cfg.label_column!r}); fix the label, "
                                                         "or leave it empty to predict the row without scoring it")
    id_name = _id_column(records, id_column, [*cfg.text_columns, cfg.label_column], p,
                         ["prediction", *(f"prob_{c}" for c in trained.classes or [])])
    ids = [r[id_name] for r in records] if id_name is not None else None
    has_labels = any(cfg.label_column in r for r in records)
    return Rows(data, ids, id_name, fmt, cfg.label_column if has_labels else None)


def classify(trained: Trained, rows: Rows, batch_size: int = 64) -> tuple[list[dict], dict | None]:
    """(one output row per input row, the metrics of the labelled rows or None). The rows are encoded and run as
    `train`'s dev evaluation runs them (`encode_rows`, `predict_logits` in batches of `batch_size`, under the run's
    autocast), so labelled rows score what `train` reported for the same checkpoint and rows (`glue_metrics` of the
    run's task). An output row: the id (where the input has one), `prediction` (the class name), for a GLUE task
    `glue_label` (the class as that task's files write it, the GLUE submission's value), and `prob_<class>` each."""
    cfg, classes = trained.cfg, trained.classes or []
    enc = encode_rows(trained.tokenizer, rows.data, "seq-cls", cfg.max_length)
    if trained.route is not None:  # a multi-task run's task: its adapter, its own classes (the train's dev scoring)
        from .multitask import task_context

        with task_context(trained.model, trained.route):
            check_row_length(trained.model, cfg.max_length, enc)
        logits = trained.run.logits(trained.route, enc, batch_size)
    else:
        check_row_length(trained.model, cfg.max_length, enc)
        logits = predict_logits(trained.model, enc, batch_size, cfg.precision)
    probs, preds = logits.softmax(-1), logits.argmax(-1)
    labels = enc["labels"].numpy()
    scored = labels >= 0  # (rows without a label are predicted, not scored)
    metrics = glue_metrics(trained.task, preds.numpy()[scored], labels[scored]) if rows.labelled else None
    out = []
    for i, c in enumerate(preds.tolist()):
        r: dict = {rows.id_name: rows.ids[i]} if rows.ids is not None else {}
        r["prediction"] = classes[c] if c < len(classes) else str(c)
        if trained.glue is not None:
            r["glue_label"] = glue_label_value(trained.glue, c)
        r.update({f"prob_{name}": round(float(probs[i, k]), 6) for k, name in enumerate(classes)})
        out.append(r)
    return out, metrics


# ----------------------------------------------------------------------------- causal LM


@dataclass
class Prompts:
    texts: list  # strings, or conversations (tuples of role/content messages) of a chat prompt column
    ids: list | None
    id_name: str | None
    fmt: str  # the default output's format: a .txt file's is jsonl
    skipped: int = 0  # blank lines of a .txt file


def read_prompts(trained: Trained, path: str, column: str | None = None, id_column: str | None = None,
                 note: Callable[[str], None] | None = None) -> Prompts:
    """Prompts: the lines of a .txt file (blank lines skipped and counted), or a column of a .csv/.tsv/.jsonl table:
    `column`, default the run's first text column (a prompt/completion run's prompt column, a chat run's
    `messages`). A .jsonl column of lists of role/content messages holds conversations (`encode_prompts` renders
    them with the chat template), checked as training checks chat data. A table with the run's label column gets a
    `note` that it is not used, as `perplexity`'s --data does."""
    p = _input_file(path, "--prompts")
    fmt = p.suffix.lower().lstrip(".")
    if fmt in TEXT_SUFFIXES:
        if column is not None or id_column is not None:
            raise DataError(f"--prompts {path}: a plain-text file has one prompt a line and no columns; "
                            "--prompt-column and --id-column name a table's columns")
        lines = read_text(p).splitlines()
        texts = [t for t in lines if t.strip()]
        if not texts:
            raise DataError(f"--prompts {path}: no prompt in it (a prompt a line)")
        return Prompts(texts, None, None, "jsonl", len(lines) - len(texts))
    if fmt not in FORMATS:
        raise DataError(f"--prompts {path}: unsupported format {fmt!r}; use a .txt file (a prompt a line) or a .csv, "
                        ".tsv or .jsonl table")
    column = column or trained.cfg.text_columns[0]
    records = _read_records(p, fmt, [column])
    if not records:
        raise no_rows_error(p)
    check_columns(records, [column], p, " (--prompt-column names another)")
    unused_label_note(records, [column], trained.cfg.label_column, p, note)
    if any(isinstance(r[column], list) for r in records):
        lines = record_lines(p)
        texts = [_messages(r[column], f"--prompts {path}: {record_at(p, n, lines)}", column)
                 for n, r in enumerate(records, 1)]
    else:
        _check_no_null_text(records, column, p)
        texts = [str(r[column]) for r in records]
    id_name = _id_column(records, id_column, [column], p, ["prompt", "completion", "stop"])
    return Prompts(texts, [r.get(id_name) for r in records] if id_name else None, id_name, fmt)


def encode_prompts(tokenizer, prompts: Sequence, corpus: bool = False, chat: bool = False) -> list[list[int]]:
    """Each prompt's token ids as training put the start of a text: the tokenizer's leading special tokens
    (`special_prefix`: Llama's BOS; none for GPT-2), then the prompt tokenised alone with no special tokens (no eos),
    as `encode_pairs` puts a prompt before its completion. A run trained on a plain-text corpus (`encode_corpus`, which
    adds no special token) gets no prefix (`corpus`). A conversation (a tuple of messages) is rendered with the chat
    template and the assistant's generation prompt (`render_chat`), as `encode_chat` renders a conversational
    prompt; so is a text prompt of a chat run (`chat`), as one user message."""
    if chat:
        prompts = [({"role": "user", "content": t},) if isinstance(t, str) else t for t in prompts]
    texts = [(i, t) for i, t in enumerate(prompts) if isinstance(t, str)]
    prefix = [] if corpus else special_prefix(tokenizer)
    bare = tokenizer([t for _, t in texts], add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    out = {i: prefix + list(ids) for (i, _), ids in zip(texts, bare)}
    return [out[i] if i in out else render_chat(tokenizer, t, f"prompt {i + 1}", generation=True)
            for i, t in enumerate(prompts)]


_PROBE = "unifiedloraendofturnprobe"  # an assistant message's content, found in the template's rendering


def end_of_turn(tokenizer) -> list[int]:
    """The token the tokenizer's chat template ends an assistant turn with, read off the template itself: a user
    message and an assistant message whose content is a probe word are rendered, and the first token the template
    writes after the probe, whitespace skipped (ChatML's "<|im_end|>\n"), is it if it is a special or added token
    (ChatML's <|im_end|>, Gemma's <end_of_turn>, Llama 2's </s>). [] where the template writes nothing after the
    content, or plain text (no token to stop at but one that also occurs inside a reply), where the tokenizer has
    no template, and where the template fails on that conversation and on it after a system message (a template may
    require one first; generation then stops as for a text prompt)."""
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        return []
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    text = None
    for messages in (probe, [{"role": "system", "content": "hi"}, *probe]):  # some templates require a system one
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            break
        except (TemplateError, ValueError, TypeError, KeyError):
            continue
    at = text.rfind(_PROBE) if isinstance(text, str) else -1
    if at < 0:
        return []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", None) or ())
    for t in tokenizer(text[at + len(_PROBE):], add_special_tokens=False, verbose=False)["input_ids"]:
        if not tokenizer.decode([t]).strip():  # whitespace first: a tokenizer may list "\n" among its added tokens
            continue
        return [int(t)] if t in special else []
    return []


def stop_tokens(model, tokenizer, chat: bool = False) -> list[int]:
    """The token ids generation stops at: the tokenizer's eos, then those of the model's generation config
    (`generation_config.eos_token_id`, an id or a list, as `generate` reads it), then for chat prompts (`chat`) the
    chat template's end of turn (`end_of_turn`), each once. A chat model's config lists its end-of-turn token
    (Llama 3 Instruct's <|eot_id|>), which its tokenizer's eos need not be; giving `generate` the tokenizer's alone
    overrode that list, and a chat run's completions ran on past the end of the assistant's turn to
    --max-new-tokens. A base model fine-tuned into chat (a ChatML template's <|im_end|>, the eos <|endoftext|>)
    lists none, hence the template's own."""
    config = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [tokenizer.eos_token_id, *(config if isinstance(config, (list, tuple)) else [config]),
           *(end_of_turn(tokenizer) if chat else [])]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


@torch.no_grad()
def generate(trained: Trained, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int = 64, batch_size: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             chat: bool | None = None) -> list[tuple[str, str]]:
    """(completion, stop) for each prompt: `model.generate` from the prompt's ids, greedy (temperature 0) or sampled
    (`temperature`, `top_p`; torch's generator seeded with `seed` first), at most `max_new_tokens` new tokens, stopping
    at an eos (stop "eos"; else "length"): the tokenizer's, one of the model's generation config (`stop_tokens`:
    a chat model's end of turn, Llama 3's <|eot_id|>), or for chat prompts (`chat`, default: whether the run trained
    on chat data) the chat template's end of turn (`end_of_turn`: ChatML's <|im_end|>). The completion is the new
    tokens up to it, decoded without special tokens. Prompts go in batches of up to `batch_size` prompts of the same
    token count, so no prompt is padded and a prompt's greedy completion does not depend on the others. A prompt
    with no token, one that fills the model's context alone (too long, whatever `max_new_tokens` is), or one that
    with `max_new_tokens` exceeds it, is a UsageError naming it."""
    from transformers import GenerationConfig

    model, tok = trained.model, trained.tokenizer
    limit = model_context(model).positions  # (as train's rows: a rope scaling in the config extends the context)
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise UsageError(f"prompt {i + 1} is empty and the tokenizer puts no token before a text: nothing to "
                             "generate from")
        if limit and len(ids) >= limit:  # no new token fits, whatever --max-new-tokens is
            raise UsageError(f"prompt {i + 1} is too long: {len(ids)} tokens, and the model's context is {limit} "
                             f"positions, which leaves no room for a new token; shorten it to at most {limit - 1} "
                             "tokens")
        if limit and len(ids) + max_new_tokens > limit:
            raise UsageError(f"prompt {i + 1}: {len(ids)} tokens and --max-new-tokens {max_new_tokens} exceed the "
                             f"model's {limit} positions; pass a smaller --max-new-tokens or a shorter prompt")
    stops = stop_tokens(model, tok, trained.chat if chat is None else chat)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stops[0] if stops else 0)
    sample = temperature > 0
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, num_beams=1,
                           **({"temperature": temperature, "top_p": top_p, "top_k": 0} if sample else {}),
                           eos_token_id=stops or None, pad_token_id=pad)
    dev = model_device(model)
    torch.manual_seed(seed)
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(prompt_ids):
        groups.setdefault(len(ids), []).append(i)
    out: list[tuple[str, str] | None] = [None] * len(prompt_ids)
    for length in sorted(groups):
        rows = groups[length]
        for s in range(0, len(rows), batch_size):
            batch = rows[s:s + batch_size]
            ids = torch.tensor([list(prompt_ids[i]) for i in batch], dtype=torch.long, device=dev)
            with autocast(trained.run.device, trained.cfg.precision), routed(trained):
                new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
            for i, row in zip(batch, new[:, length:].tolist()):
                stop = "length"
                end = next((j for j, t in enumerate(row) if t in stops), None)
                if end is not None:
                    row, stop = row[:end], "eos"
                out[i] = (tok.decode(row, skip_special_tokens=True), stop)
    return out  # type: ignore[return-value]


def routed(trained: Trained):
    """The context a trained model runs in: a multi-task run's task (`trained.route`) routes every row to its adapter
    (`task_context`); a one-task run's, none."""
    if trained.route is None:
        return contextlib.nullcontext()
    from .multitask import task_context

    return task_context(trained.model, trained.route)


def corpus_run(cfg: TrainConfig) -> bool:
    """Whether the run trained on a plain-text corpus (.txt/.raw: `encode_corpus`, no special tokens)."""
    # (a multi-task run's data, a mapping of tables, holds no corpus)
    return isinstance(cfg.data, str) and Path(cfg.data).suffix.lower().lstrip(".") in TEXT_SUFFIXES


def perplexity(trained: Trained, path: str, batch_size: int = 64, note: Callable[[str], None] | None = None) -> dict:
    """A causal LM's loss and perplexity on `path`, read and scored as `train` scores its --dev-data (`_load_texts` with
    the run's columns, `encode_rows`, `evaluate`)."""
    p = _input_file(path, "--data")
    texts, _ = _load_texts(p, trained.cfg.text_columns, label_column=trained.cfg.label_column, note=note)
    enc = encode_rows(trained.tokenizer, texts, "causal-lm", trained.cfg.max_length, note=note,
                      assistant_only=trained.cfg.assistant_only_loss, text_eos=trained.cfg.text_eos)
    with routed(trained):  # (a multi-task run: the task's adapter, as its dev evaluation runs it)
        check_row_length(trained.model, trained.cfg.max_length, enc)
        return evaluate(trained.model, enc, "causal-lm", "lm", batch_size, trained.cfg.precision)
