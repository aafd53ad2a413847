"""`unified-lora train` on several data sets at once: one task each, in multi-task mode (a classifier, or a causal LM on
tables of text rows or prompt/completion pairs).

Each data set is read as a one-task run reads it (`load_data`: a GLUE task folder or a .csv/.tsv/.jsonl table, its
dev set or a split of it, its classes in label-id order) and is a task of `setup_multitask_lora`: the tasks share one
nested adapter in SINGLE and each trains its own after the controller's split (MULTI, MIRROR). The classifier head
is a LoRA target too, so each task has its own head delta in MULTI, and it stays in `modules_to_save` as in a
one-task run, trained in full and shared by every task. The head has as many outputs as the task with the most
classes; a task's loss and predictions see its own classes alone (the others' logits are masked out, -inf).

Batches mix the tasks: the rows of every task are concatenated and shuffled per epoch by the seed, as one data set's
rows are (`batches`), each row routed to its task's adapter (`task_context`), and `ctrl.step` gets the step's
per-task losses (`per_task_losses`), from every micro-batch of a `--grad-accum` step together.

Under torchrun (DDP) each process trains its share of the global batches as a one-task run does (`Run.train_step`),
and passes `ctrl.step` every task of the step's global batches, each at N x its rows' summed loss on this process /
the task's rows over every process (0 where it has none): the controller averages a task's loss over the processes
that pass it, all N of them, which gives each task's mean loss over the step's rows, as one process on all of them.
The dev evaluation is sharded as a one-task run's (`gather_rows`).

A causal LM (`TaskSpec.task_type` "causal-lm") reads each data set as a one-task causal-LM run reads a table (text
rows, with the eos as such a run adds it, or prompt/completion pairs, the loss on the completion), every task in one
layout (`--text-columns`). It has no head to target and no classes: the loss is the per-token cross-entropy, the
step's mean over its target tokens (as the model's own loss and `Run._weight` count them), `ctrl.step` gets each task's
mean over its own target tokens (`per_task_losses` with the mask of the targets), under DDP weighted by target tokens
where a classifier weights by rows. Each task's dev loss and perplexity are over its target tokens (`evaluate_run`
under `task_context`), and their `average_loss` ranks the evaluations, lower is better.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .config import SINGLE
from .data import DataError, TextDataset, glue_metrics, primary_metric
from .data.metrics import PRIMARY_METRIC, normalize_task
from .distributed import print_on_main_process
from .model import _is_linear, _matches, default_target_modules
from .multitask import MultiTaskSignalConfig, export_task_peft_adapters, per_task_losses, setup_multitask_lora, task_context
from .training import (Run, TextCorpus, TrainConfig, UsageError, corrupt, dev_metric_names, encode_rows,
                       evaluate_run, gather_rows, is_chat, load_data, predict_logits)
from .training import majority as task_majority  # (a task's: this module's `majority` is the run's, over its tasks)

AVERAGE = "average"  # the dev metric of a multi-task run: the mean of the tasks' primary metrics (GLUE's score)
AVERAGE_LOSS = "average_loss"  # a causal LM's: the mean of the tasks' dev losses (lower is better, `LOWER_IS_BETTER`)


@dataclass
class TaskSpec:
    """A task of a multi-task run as its checkpoints record it (`state["tasks"]`)."""

    name: str
    data: str
    dev_data: str | None
    metric_task: str  # what its dev set is scored as (`glue_metrics`): a GLUE key, or the table's stem
    glue: str | None  # the GLUE task key where its data is a GLUE task folder
    classes: list[str]  # in label-id order (none for a causal LM)
    task_type: str = "seq-cls"  # or "causal-lm" (checkpoints written before it was recorded: a classifier's)


@dataclass
class TaskData:
    spec: TaskSpec
    train: TextDataset | list  # a causal LM's: its text rows or (prompt, completion) pairs
    dev: TextDataset | list


def load_tasks(cfg: TrainConfig, task_type: str = "seq-cls", note: Callable[[str], None] | None = None,
               detect: bool = True) -> list[TaskData]:
    """Each task's train and dev sets, read as a one-task run reads its data set (`load_data`; `detect`: a causal
    LM's prompt/completion columns found without --text-columns, off on a resume). A causal LM's tasks are tables of
    text rows or prompt/completion pairs, all in one layout, which `cfg.text_columns` records; a plain-text corpus or
    chat data is refused."""
    from .inference import run_task

    out, layouts = [], {}
    for name, path in cfg.data.items():
        one = replace(cfg, data=path, dev_data=(cfg.dev_data or {}).get(name))
        try:
            train, dev, _ = load_data(one, task_type, note=note, detect=detect)
        except (DataError, UsageError) as e:  # which task's data (a missing --dev-data file did not say)
            # (check_columns' error: one table's columns named otherwise, which no per-task option can fix)
            same = ("; --text-columns and --label-column name the columns of every task's table: rename this "
                    "table's to match") if str(e).startswith("unknown column ") else ""
            raise type(e)(f"task {name}: {e}{same}") from None
        metric_task, glue = run_task(one, task_type)
        if task_type == "causal-lm":
            what = ("a plain-text corpus" if isinstance(train, TextCorpus) else "chat data" if is_chat(train) else
                    None)
            if what:
                raise UsageError(f"--data {path}: {what}; several data sets for a causal LM are tables of text rows "
                                 "or prompt/completion pairs (.csv/.tsv/.jsonl); train it on its own")
            layouts[name] = list(one.text_columns)
            classes: Sequence[str] = []
        else:
            classes = train.label_names or [str(i) for i in range(train.num_labels)]
        out.append(TaskData(TaskSpec(name, path, one.dev_data, metric_task, glue, list(classes), task_type), train,
                            dev))
    if len({tuple(c) for c in layouts.values()}) > 1:
        raise UsageError("--data: the tasks' tables are read in different layouts (" + ", ".join(
            f"{n}: {c}" for n, c in layouts.items()) + "); give every task the same columns (--text-columns)")
    if layouts:  # (found without --text-columns: recorded, as a one-task run records it)
        cfg.text_columns = next(iter(layouts.values()))
    return out


def refuse_unsupported(cfg: TrainConfig, task_type: str) -> None:
    """One line for what multi-task `train` does not do, before anything is loaded."""
    if cfg.signal != "loss":
        raise UsageError(f"--signal {cfg.signal}: not available in multi-task mode (several --data sets), which "
                         "reads its own signal (task conflict, per-task losses, drift); drop --signal")
    if cfg.target_modules == "all-linear" and task_type == "seq-cls":
        raise UsageError("--target-modules all-linear leaves the classifier head out, and several --data sets need "
                         "it as a LoRA target (each task's own head delta); name the modules (query,value) or a regex")


def encode_tasks(tokenizer, tasks: Sequence[TaskData], max_length: int, task_type: str = "seq-cls",
                 text_eos: bool = True, note: Callable[[str], None] | None = None) -> tuple[dict, list[dict]]:
    """(the train rows of every task, encoded and concatenated in task order with a `task` index per row, each
    task's encoded dev rows), each encoded as a one-task run encodes it (`encode_rows`: a causal LM's text rows with
    the eos where `text_eos`; `note` gets a task's rows left out or cut). The tasks' rows are padded to one width, on
    the tokenizer's padding side (a causal LM's on the right, as `encode_rows` pads them, its labels with -100)."""
    lm = task_type == "causal-lm"

    def enc(t: TaskData, rows, what: str) -> dict:
        return encode_rows(tokenizer, rows, task_type, max_length, text_eos=text_eos,
                           note=(lambda m: note(f"task {t.spec.name} {what} data: {m}")) if note and lm else None)

    parts = []
    for i, t in enumerate(tasks):
        e = enc(t, t.train, "train")
        parts.append(dict(e, task=torch.full((len(e["labels"]),), i, dtype=torch.long)))
    width = max(p["input_ids"].shape[1] for p in parts)
    left = not lm and getattr(tokenizer, "padding_side", "right") == "left"
    for p in parts:
        pad = width - p["input_ids"].shape[1]
        for k, v in p.items():
            if v.dim() == 2 and pad:
                fill = tokenizer.pad_token_id if k == "input_ids" else -100 if k == "labels" else 0
                p[k] = F.pad(v, (pad, 0) if left else (0, pad), value=fill)
    train = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return train, [enc(t, t.dev, "dev") for t in tasks]


def average_name(specs: Sequence[TaskSpec]) -> str:
    """The metric that averages the tasks: `average` (a classifier's), `average_loss` (a causal LM's)."""
    return AVERAGE_LOSS if specs and specs[0].task_type == "causal-lm" else AVERAGE


def metric_names(specs: Sequence[TaskSpec]) -> list[str]:
    """The dev metrics a multi-task run reports: each task's (`NAME/accuracy`, ...; a causal LM's `NAME/loss`,
    `NAME/perplexity`), then `average` (a causal LM: `average_loss`)."""
    return [f"{s.name}/{m}" for s in specs for m in dev_metric_names(s.task_type, s.metric_task)] + [
        average_name(specs)]


def scoring(spec: TaskSpec) -> str:
    """How a task's dev set is scored, for the console: its metrics, the primary one (the one in `average`) first,
    and the GLUE task whose metrics they are (a GLUE folder, or a table named like one: `mrpc.csv`)."""
    names = list(glue_metrics(spec.metric_task, [0, 1], [0, 1]))
    glue = normalize_task(spec.metric_task)
    return (f"{names[0]} (primary), {', '.join(names[1:])}".rstrip(", ") if len(names) > 1 else f"{names[0]}") + (
        f", as GLUE {glue}" if glue in PRIMARY_METRIC else "")


def flat(per_task: dict[str, dict], specs: Sequence[TaskSpec]) -> dict:
    """{task: metrics} as one run's metrics: `NAME/metric` keys, and `average`, the mean of the tasks' primary
    metrics (GLUE's average score); a causal LM's `average_loss`, the mean of the tasks' dev losses."""
    out = {f"{s.name}/{k}": v for s in specs for k, v in per_task[s.name].items()}
    lm = average_name(specs) == AVERAGE_LOSS
    out[average_name(specs)] = sum(per_task[s.name]["loss" if lm else primary_metric(s.metric_task)]
                                   for s in specs) / len(specs)
    return out


def majority(tasks: Sequence[TaskData]) -> tuple[dict | None, dict[str, dict | None]]:
    """(each task's majority class scored on its dev rows, as `flat` metrics (a causal LM: None); {task: those
    metrics}, as a one-task run scores it, `training.majority`)."""
    per = {t.spec.name: task_majority(t.train, t.dev, t.spec.metric_task) for t in tasks}
    specs = [t.spec for t in tasks]
    return (None if average_name(specs) == AVERAGE_LOSS else flat(per, specs)), per


def head_output_layer(model, num_labels: int) -> tuple[str | None, str | None]:
    """(the module path of the classifier head, that of its output layer: the LoRA target that gives each task its
    own head delta). The head itself where it is a Linear (BERT's `classifier`, GPT-2's and Llama's `score`), else its
    Linear with `num_labels` outputs (RoBERTa's and ELECTRA's `classifier.out_proj`: their head is a block, which a
    nested layer cannot wrap). A head of another name (XLNet's `logits_proj`, BART's and T5's
    `classification_head`): the last Linear with `num_labels` outputs, inside the outermost module initialised afresh
    that holds it (`fresh_modules`, the head `from_pretrained` added) where there is one; (None, None) for a model
    without such a layer."""
    modules = dict(model.named_modules())
    path = next((m for n in ("classifier", "score") for m in modules if m == n or m.endswith("." + n)), None)
    if path is None:
        outs = [n for n, m in modules.items() if n and _is_linear(m) and getattr(m, "out_features", None) == num_labels]
        if not outs:
            return None, None
        fresh = [f for f in getattr(model, "_unified_lora_fresh_modules", ()) if outs[-1] == f
                 or outs[-1].startswith(f + ".")]
        return min(fresh, key=len, default=outs[-1]), outs[-1]
    if _is_linear(modules[path]):
        return path, path
    inner = [n for n, m in modules.items() if n.startswith(path + ".") and _is_linear(m)]
    return path, next((n for n in reversed(inner) if getattr(modules[n], "out_features", None) == num_labels),
                      inner[-1] if inner else None)


class MultiTaskRun(Run):
    """`Run` over several tasks (`setup_multitask_lora`), a classifier's or a causal LM's (the specs' `task_type`);
    see the module docstring."""

    def __init__(self, cfg: TrainConfig, model, specs: Sequence[TaskSpec], trace_path: str | None,
                 print_fn: Callable[[str], None] | None = print_on_main_process, append_trace: bool = False,
                 total_steps: int | None = None):
        self.specs = list(specs)
        self.tasks = [s.name for s in self.specs]
        self.lm = self.specs[0].task_type == "causal-lm"
        self.n_classes = torch.tensor([len(s.classes) for s in self.specs])
        # this step's per-sample losses (a causal LM: per-token, with the mask of its targets) and task ids, for
        # ctrl.step's task losses
        self._parts: list = []
        # DDP: each global micro-batch's task ids, each row's weight (1; a causal LM: its target tokens), and whether
        # this process's share is empty
        self._global: list = []
        super().__init__(cfg, model, self.specs[0].task_type, 0 if self.lm else int(self.n_classes.max()),
                         trace_path, print_fn=print_fn, append_trace=append_trace, total_steps=total_steps)
        # no merge in the run's last resplit_window steps: it would end untested (MultiTaskController.total_steps)
        self.ctrl.total_steps = self.schedule["total_steps"]
        # each task's, in label-id order (a causal LM has none)
        self.classes = None if self.lm else {s.name: list(s.classes) for s in self.specs}

    def _setup_adapters(self, model, modules_to_save, print_fn, keep_trace: bool):
        cfg = self.cfg
        root, head = (None, None) if self.lm else head_output_layer(model, self.num_labels)
        self.head_target = head
        if cfg.target_modules is None:  # PEFT's default for the model type, recorded as resolved (as one data set's)
            cfg.target_modules = default_target_modules(model)
        targets = cfg.target_modules
        modules = dict(model.named_modules())
        # the head is added to the targets below: the ones given must still match the model's body, or a model whose
        # layers are named otherwise (GPT-2's c_attn, Llama's q_proj: not query,value) trained its head
        # alone, where one data set is refused with "matched no Linear/Conv1D module"
        if not any(_is_linear(m) and _matches(n, targets) and not (root and (n == root or n.startswith(root + ".")))
                   for n, m in modules.items() if n):
            seen = sorted({n.split(".")[-1] for n, m in modules.items() if n and _is_linear(m)})
            where = "" if self.lm else (f" outside the classifier head{f' ({root})' if root else ''}, which several "
                                        "--data sets target on their own")
            raise ValueError(f"target_modules: {targets!r} matched no Linear/Conv1D module{where}. Linear-like module "
                             f"names in this model end with: {seen}")
        if head is not None and isinstance(targets, str):  # a regex, matched against whole module names
            targets = rf"(?:{targets})|{re.escape(head)}"
        elif head is not None and not _matches(head, targets):
            targets = [*targets, head]
        if head is not None:  # (its few outputs are below the top rank by design: no warning on it)
            model.get_submodule(head)._unified_lora_task_head = True
        actuators = cfg.actuator_config()
        machine = cfg.machine_config()
        if cfg.controller:  # the tasks start on one shared adapter; the controller splits them
            machine = replace(machine, initial_mode=SINGLE)
        return setup_multitask_lora(
            model, self.tasks, targets, rank_levels=cfg.rank_levels, lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout, modules_to_save=modules_to_save,
            signal=MultiTaskSignalConfig(loss_scale=cfg.loss_scale, calibration_steps=cfg.calibration_steps,
                                         calibration_target=cfg.calibration_target),
            lr_mode=actuators.lr_mode, machine=machine,
            actuators=actuators, mirror=cfg.mirror_config(), layer_kernel=cfg.layer_kernel, trace_path=None,
            log_every=cfg.log_every, print_fn=print_fn, keep_trace=keep_trace, resplit_window=cfg.resplit_window)

    def masked(self, logits: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """`logits` with each row's classes beyond its task's set to -inf."""
        n = self.n_classes.to(logits.device)[task.to(logits.device)]
        keep = torch.arange(logits.shape[-1], device=logits.device)[None, :] < n[:, None]
        return logits.masked_fill(~keep, float("-inf"))

    def _corrupt(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each row's label corrupted within its own task's classes (`corrupt`), task by task."""
        y, task = batch["labels"].cpu().clone(), batch["task"].cpu()
        for i, n in enumerate(self.n_classes.tolist()):
            rows = (task == i).nonzero().flatten()
            if len(rows):
                y[rows] = corrupt(y[rows], self.cfg.shock_type, n, self.shock_gen)
        return y

    def _forward_loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The micro-batch's mean loss, each row routed to its task: a classifier's over its rows (its own classes),
        a causal LM's over its target tokens (the next-token cross-entropy at `labels[:, 1:] != -100`, in fp32, as the
        model's own loss)."""
        b = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        labels, task = b.pop("labels"), b.pop("task")
        ids = [self.tasks[i] for i in batch["task"].tolist()]
        with task_context(model, ids):
            logits = model(**b).logits
        if self.lm:
            y = labels[:, 1:]
            mask = y != -100
            per = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
            # (the targets' mask for the task losses from the batch on the host: no device sync in the step)
            self._parts.append((per.detach(), ids, batch["task"], batch["labels"][:, 1:] != -100))
            return per.sum() / mask.sum().clamp(min=1)
        per = F.cross_entropy(self.masked(logits, task), labels, reduction="none")
        self._parts.append((per.detach(), ids, batch["task"], None))
        return per.mean()

    def _shares(self, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor] | None]:
        shares = super()._shares(batch)
        y = batch["labels"]
        weight = (y[:, 1:] != -100).sum(1) if self.lm else torch.ones(len(y), dtype=torch.long)
        self._global.append((batch["task"], weight, shares[self.rank] is None))
        return shares

    def _controller_step(self, loss: float) -> None:
        parts, self._parts = self._parts, []
        shares, self._global = self._global, []
        if self.ddp is None:
            ids = [t for _, ts, _, _ in parts for t in ts]
            if not self.lm:
                self.ctrl.step(loss=loss, task_losses=per_task_losses(torch.cat([p for p, _, _, _ in parts]), ids))
                return
            # the micro-batches' per-token losses padded to one width, the padding not counted
            width = max(p.shape[1] for p, _, _, _ in parts)
            per = torch.cat([F.pad(p, (0, width - p.shape[1])) for p, _, _, _ in parts])
            mask = torch.cat([F.pad(m, (0, width - m.shape[1]), value=False) for _, _, _, m in parts])
            self.ctrl.step(loss=loss, task_losses=per_task_losses(per, ids, mask=mask.to(per.device)))
            return
        # DDP: the controller averages each task's loss over the processes that pass it. Every process passes every
        # task of the step's global batches (its rows counted on the host: each process holds them all), weighted as
        # the step's loss is: N x this process's summed loss on the task's rows / the task's rows on all processes
        # (a causal LM: its target tokens; 0 without one of them here), so that average is the task's mean over
        # every row (target token) of the step. A forward of a process left without a row (weighted 0 by
        # train_step) counts for no task.
        n = len(self.tasks)
        rows = torch.zeros(n, dtype=torch.float64)
        for t, w, _ in shares:
            rows.index_add_(0, t, w.double())
        rows = rows.tolist()
        sums = torch.zeros(n, dtype=torch.float64)
        for (per, _, task, mask), (_, _, empty) in zip(parts, shares):
            if not empty:
                per = per.double().cpu()
                sums.index_add_(0, task, per if mask is None else (per * mask).sum(1))
        self.ctrl.step(loss=loss, task_losses={name: self.world * s / c for name, s, c in
                                               zip(self.tasks, sums.tolist(), rows) if c})

    def train_step(self, batch) -> float:
        self._parts, self._global = [], []  # (a step that raised before ctrl.step left its parts)
        return super().train_step(batch)

    def export_peft_to(self, out_dir: Path, rank: int | None = None, tasks: Sequence[str] | None = None) -> str | None:
        """One PEFT adapter per task in `out_dir/<task>/` (`export_task_peft_adapters`, at `rank`, default the
        controller's; `tasks`: those tasks' alone, default every one): the adapter each task runs. In SINGLE that is the shared one, and the task slots, which the export writes, hold
        what the last split or merge left there: they are the shared adapter's copies while it runs, then put back
        as they were (nothing trained changes, and no random number is drawn)."""
        layers = list(self.adapters.values())
        held = None
        try:
            if self.ctrl.router.topology == "shared":
                held = [[p.detach().clone() for p in a.task_parameters()] for a in layers]
                for a in layers:
                    a.copy_shared_to_tasks()
            export_task_peft_adapters(self.model, out_dir, rank=self.ctrl.rank if rank is None else rank,
                                      tasks=tasks, include_shared=False)
        except Exception as e:  # an export problem must not lose the training checkpoint
            return f"PEFT export failed: {type(e).__name__}: {e}"
        finally:
            if held is not None:
                with torch.no_grad():
                    for a, kept in zip(layers, held):
                        for p, v in zip(a.task_parameters(), kept):
                            p.copy_(v)
        return None

    def merged_model(self, rank: int | None = None, task: str | None = None):
        """Task `task`'s model: the adapter it runs (its own in MULTI/MIRROR, put in the shared blocks as its PEFT
        export puts it; in SINGLE the shared one) folded in as a one-task run's is (`Run.merged_model`). A classifier's
        head keeps the task's own classes alone (its first outputs, the ones the task's logits are), and the config's
        label count follows."""
        from contextlib import nullcontext

        from .model import _replace
        from .multitask import _task_as_shared

        if task not in self.tasks:
            raise ValueError(f"task: {task!r} is not one of this run's tasks {self.tasks}")
        layers = list(self.adapters.values())
        own = self.ctrl.router.topology == "task"
        with _task_as_shared(layers, self.ctrl.router.known_slot(task)) if own else nullcontext():
            model = super().merged_model(rank)
        n = len(self.specs[self.tasks.index(task)].classes)
        head = model.get_submodule(self.head_target) if self.head_target else None
        if isinstance(head, torch.nn.Linear) and n and head.out_features > n:
            cut = torch.nn.Linear(head.in_features, n, bias=head.bias is not None, device=head.weight.device,
                                  dtype=head.weight.dtype)
            with torch.no_grad():
                cut.weight.copy_(head.weight[:n])
                if head.bias is not None:
                    cut.bias.copy_(head.bias[:n])
            _replace(model, self.head_target, cut)
            model.config.num_labels = n
        return model

    def _state_extra(self) -> dict:
        return {"tasks": [asdict(s) for s in self.specs]}

    def _check_state(self, st: dict, path: Path) -> None:
        saved = [t["name"] for t in st.get("tasks") or []]
        if saved != self.tasks:
            had = f"the tasks {saved}" if saved else "one data set"
            raise UsageError(f"--resume {path}: the run was trained on {had} and this one has the tasks "
                             f"{self.tasks} (in this order); resume with the run's data sets and task names, in "
                             "their order, or start a new run in another --output-dir")

    @torch.no_grad()
    def evaluate(self, devs: Sequence[dict]) -> tuple[dict, dict[str, dict]]:
        """Each task's dev rows scored with its own metrics (`glue_metrics` of its task, as a one-task run scores
        its dev set), its predictions among its own classes: (`flat` metrics, {task: metrics}). Under DDP each process
        predicts its share of each task's rows and every process scores them all (`gather_rows`): the same metrics
        on every process. A causal LM: each task's loss and perplexity over its dev rows' target tokens, with its
        adapter (`evaluate_run`, sharded as a one-task run's)."""
        if self.lm:
            per = {}
            for s, enc in zip(self.specs, devs):
                with task_context(self.model, s.name):
                    per[s.name] = evaluate_run(self, enc, "lm")
            return flat(per, self.specs), per
        per = {s.name: glue_metrics(s.metric_task, gather_rows(self, enc, lambda part, t=s.name: self.predict(
            t, part).numpy()), enc["labels"].numpy()) for s, enc in zip(self.specs, devs)}
        return flat(per, self.specs), per

    def logits(self, task: str, enc: dict, batch_size: int = 64) -> torch.Tensor:
        """Task `task`'s logits for the rows of `enc` over its own classes (fp32, on the CPU)."""
        with task_context(self.model, task):
            out = predict_logits(self.model, enc, batch_size, self.cfg.precision)
        return out[:, :len(self.specs[self.tasks.index(task)].classes)]

    def predict(self, task: str, enc: dict, batch_size: int = 64) -> torch.Tensor:
        return self.logits(task, enc, batch_size).argmax(-1)


def task_lines(summary: dict) -> list[str]:
    """`report`'s lines on a multi-task run's tasks: each one's data, classes, majority class and last dev scores."""
    out = []
    points = (summary.get("arms", {}).get("run") or {}).get("eval") or {}
    last = points[list(points)[-1]] if points else {}
    for t in summary.get("tasks") or []:
        name = t["name"]
        own = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith(name + "/")}
        maj = t.get("majority") or {}
        fmt = " ".join(f"{k}={v:.3f}" for k, v in own.items() if isinstance(v, (int, float))) or "-"
        dev = f"last dev {fmt}" if points else "no dev evaluation yet"
        data = t.get("data") if not t.get("dev_data") else f"{t.get('data')}, dev {t['dev_data']}"  # (a given dev file)
        if t.get("task_type") == "causal-lm":
            out.append(f"task {name} ({data}): {dev}")
            continue
        # (the majority class is scored at the run's end: a run not finished has none)
        classes = t.get("classes") or []  # (as report prints a list: its items; it printed ['0', '1'])
        out.append(f"task {name} ({data}; {len(classes)} classes {', '.join(map(str, classes))}): {dev}"
                   + ("; majority class " + " ".join(f"{k}={v:.3f}" for k, v in maj.items()) if maj else ""))
    if summary.get("tasks") and isinstance(last.get(AVERAGE), (int, float)):
        out.append(f"average of the tasks' primary metrics: {last[AVERAGE]:.3f}")
    if summary.get("tasks") and isinstance(last.get(AVERAGE_LOSS), (int, float)):
        out.append(f"average of the tasks' dev losses: {last[AVERAGE_LOSS]:.3f}")
    return out


