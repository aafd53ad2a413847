"""`unified-lora`: demo, train, plot, report, compare, predict, export.

    unified-lora demo                       # MiniLM + shipped MRPC, a label shock, unified vs fixed-rank LoRA
    unified-lora train --config run.yaml    # any HF model on your CSV/TSV/JSONL (or GLUE) data
    unified-lora plot RUN/trace.jsonl -o phi.png
    unified-lora report RUN
    unified-lora predict RUN --data test.csv   # the run's newest checkpoint on new rows (or --prompts for a causal LM)
    unified-lora export RUN --checkpoint step-40   # a checkpoint's adapter in PEFT format
    unified-lora export RUN --merged               # the base model with the adapter folded in (no PEFT needed)

Errors in the input (missing file, unknown column, bad option value, ...) print one
line `unified-lora: error: ...` and exit with code 2; `--debug` shows the traceback.
What argparse rejects (an unknown flag, a value outside a flag's choices) also exits
with code 2, after argparse's usage lines.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable

from ._files import read_json_file, write_text_atomically
from .config import MODES, RESPLIT_WINDOW
from .stats import mcnemar

PROG = "unified-lora"
DEMO_LRS = (5e-3, 2e-3, 1e-3)  # SINGLE, MULTI, MIRROR: MiniLM+LoRA r8 only leaves the majority class on MRPC at ~2e-3
# (5e-4 and 1e-3 stay at it for 60 steps; 5e-3 and a 10x head LR are worse); MIRROR at half the LR still relearns
# after the shock so φ can fall back below θ1 (at 4e-4 it stayed in MIRROR to the end).
DEMO_SHOCK = (60, 100, 160)  # the demo's default shock window, and the default --steps it was set for
DEV_SUBSAMPLE_SEED = 0  # --dev-size picks the same dev rows for every --seed, so seeds compare on one set
DEMO_CALIBRATION = (20, 2.2)  # demo: loss_scale from the first 20 steps (see --calibration-target)
VERDICT_ALPHA = 0.05  # the demo's verdict calls a paired difference beyond the noise at McNemar p < 0.05
DEMO_LOSS_SCALE = 0.3  # see the --loss-scale help and the README: MRPC's flip shock only raises the loss ~1.3-1.6x


class _Console:
    """Prints above the tqdm bar and keeps a copy of every line (written to console.txt). `quiet`: neither (a
    train process other than torchrun's process 0). `earlier`: text that `save` writes before the lines (a resumed
    run's earlier sessions, `continue_file`)."""

    def __init__(self, quiet: bool = False) -> None:
        self.lines: list[str] = []
        self.quiet = quiet
        self.earlier = ""

    def continue_file(self, path: Path, separator: str) -> None:
        """`save` keeps what `path` holds (a resumed run's earlier sessions; a file that is not there: nothing),
        then `separator`, before this session's lines: as the trace keeps the steps before a --resume, console.txt
        keeps their lines (it held the last session's alone)."""
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            text = ""
        self.earlier = (text if not text or text.endswith("\n") else text + "\n") + separator + "\n"

    def __call__(self, line: str = "") -> None:
        from tqdm import tqdm

        if self.quiet:
            return
        self.lines.append(line)
        tqdm.write(line, file=sys.stdout)

    def save(self, path: Path) -> None:
        write_text_atomically(path, self.earlier + "\n".join(self.lines) + "\n")


def _bar(total: int, initial: int = 0, desc: str = "", disable: bool = False):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=False,
                file=sys.stderr, disable=True if disable else None)  # None: no bar when stderr is not a terminal


# ----------------------------------------------------------------------------- formatting


def _fmt_metrics(m: dict | None) -> str:
    if not m:
        return "-"
    return " ".join(f"{k}={v:.3f}" for k, v in m.items() if isinstance(v, (int, float)))


def _fmt_field(v) -> str:
    """A summary value for `report`: a mapping as `k=v, ...` (a multi-task run's data, {task: path}), a list as its
    items, anything else as itself."""
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt_field(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt_field(x) for x in v)
    return str(v)


def format_summary(summary: dict) -> str:
    """The run's table (used by `demo` at the end and by `report`)."""
    lines = []
    kind = summary.get("command", "run")
    # (a multi-task run's data, {task: path}, on a line of its own: it was printed as a Python dict; a field the
    # summary lacks, as one built from trace.jsonl alone, is left out: it read model=None data=None)
    fields = {k: summary.get(k) for k in ("model", "data", "steps") if summary.get(k) is not None}
    apart = {k: v for k, v in fields.items() if isinstance(v, (dict, list, tuple))}
    # an unfinished run's steps done, of the steps it was set to train (it read as the run's length)
    planned = summary.get("planned_steps")
    if isinstance(fields.get("steps"), int) and isinstance(planned, int) and planned > fields["steps"]:
        fields["steps"] = f"{fields['steps']} of {planned}"
    lines.append(" ".join([f"{kind}:", *(f"{k}={v}" for k, v in fields.items() if k not in apart)]))
    lines += [f"{k}: {_fmt_field(v)}" for k, v in apart.items()]
    if summary.get("shock"):
        s = summary["shock"]
        lines.append(f"shock: {s['type']} labels on steps [{s['start']}, {s['end']})")
    if (summary.get("lr_schedule") or {}).get("lr_scheduler", "constant") != "constant":
        from .training import describe_schedule

        lines.append(f"LR schedule: {describe_schedule(summary['lr_schedule'])}")
    if isinstance(summary.get("loss_scale"), dict):  # (a train run on the loss signal; not in older summaries)
        lines.append(_loss_scale_line(summary["loss_scale"]))
    if summary.get("dev_note"):
        lines.append(summary["dev_note"])
    arms = summary.get("arms", {})
    points = summary.get("eval_points") or sorted({k for a in arms.values() for k in a.get("eval", {})})
    if arms and not points:  # (a run stopped before its first evaluation: the table had no column, and no word)
        at = [f"{a.get('label', n)} at its last step: {MODES[a['phi']['final_mode']]}, rank "
              f"{a['phi'].get('final_rank', '?')}, φ={a['phi']['final']:.3f}" for n, a in arms.items()
              if a.get("phi") and a.get("controller", True)]
        lines.append(f"no evaluation yet: {summary.get('steps', 0)} training step(s) done, no dev evaluation"
                     + (f"; {'; '.join(at)}" if at else ""))
    if arms and points:
        rows = [("method", list(points))]
        if summary.get("majority"):
            rows.append(("majority class", [_fmt_metrics(summary["majority"])] * len(points)))
        for name, arm in arms.items():
            rows.append((arm.get("label", name), [_fmt_metrics(arm.get("eval", {}).get(p)) for p in points]))
        if len(points) > 3:  # (--eval-steps, many epochs): a row per point, not a column: the table stays readable
            rows = [(r0, list(r)) for r0, *r in zip(*[(r[0], *r[1]) for r in rows])]
            rows[0] = ("dev evaluation", rows[0][1])
        w0 = max(len(r[0]) for r in rows)
        ws = [max(len(r[1][i]) for r in rows) for i in range(len(rows[0][1]))]
        table = [f"{r[0]:<{w0}} | " + " | ".join(f"{c:<{w}}" for c, w in zip(r[1], ws)) for r in rows]
        lines += ["", table[0], "-" * len(table[0]), *table[1:], ""]
    if summary.get("tasks"):  # a multi-task train run: each task's data, classes, last dev scores and majority class
        from .multitask_train import task_lines

        lines += task_lines(summary)
    if summary.get("best"):
        b = summary["best"]
        saved = f"; its checkpoint: {b['checkpoint']}" if b.get("checkpoint") else ""
        lines.append(f"best dev {b['metric']} ({'higher' if b.get('greater_is_better', True) else 'lower'} is better): "
                     f"{b['value']:.4f} at {b['point']}{saved}")
    if summary.get("stopped_early"):
        c = summary.get("config") or {}
        n = c.get("early_stopping_patience")
        lines.append(f"stopped early at step {summary.get('steps')}: {n} evaluation{'' if n == 1 else 's'} in "
                     f"a row without improving the best by more than {c.get('early_stopping_threshold', 0):g} "
                     "(--early-stopping-patience, --early-stopping-threshold)")
    for name, arm in arms.items():
        phi = arm.get("phi") or {}
        if phi and arm.get("controller", True):
            # without a shock, phi_summary's "pre_shock" is the first step's φ: it was labelled pre-shock all the same
            first = "pre-shock" if summary.get("shock") else "first"
            # (the mode by name, and the steps per mode as words: it printed "final mode=1" and a Python dict)
            per_mode = ", ".join(f"{m} {n}" for m, n in phi["steps_in_mode"].items())
            lines.append(f"{arm.get('label', name)}: φ {first}={phi['pre_shock']:.3f}  peak={phi['peak']:.3f} "
                         f"(step {phi['peak_step']})  final={phi['final']:.3f}  final mode="
                         f"{MODES[phi['final_mode']]}  mean rank={phi['mean_rank']:.2f}  steps per mode: {per_mode}")
        lines += _conflict_lines(arm.get("label", name), arm.get("conflict"))
        lines += _held_merge_lines(arm.get("label", name), arm.get("held_merges"), summary)
        if arm.get("skipped_steps"):
            lines.append(f"  {arm.get('label', name)}: {arm['skipped_steps']} optimizer step(s) skipped for a "
                         "non-finite loss or gradient")
        for m in arm.get("mirror", []):
            what = "restored the entry snapshot" if m["snapshot"] == "restored" else "kept the new weights"
            lines.append(f"  Mirror exit @ step {m['step']}: {what} ({_mirror_reason(m, summary)})")
        if arm.get("wall_s") is not None:
            cpu = f", {arm['cpu_s']:.1f} CPU-s" if "cpu_s" in arm else ""
            lines.append(f"  {arm.get('label', name)}: {arm['wall_s']:.1f} s wall{cpu}, "
                         f"{arm.get('train_step_s', arm.get('step_s', float('nan'))):.3f} s per training step")
    if summary.get("wall_s") is not None:
        cpu = f", {summary['cpu_s']:.1f} CPU-s on {summary.get('threads', '?')} thread(s)" if "cpu_s" in summary else ""
        resumed = (f" ({summary['wall_s_session']:.1f} s of it since the last --resume)"
                   if summary.get("wall_s_session") is not None else "")
        lines.append(f"total wall time: {summary['wall_s']:.1f} s{cpu}{resumed}")
    lines += _demo_verdict(summary)
    return "\n".join(lines)


def _loss_scale_record(cfg, trace: list[dict]) -> dict | None:
    """The loss signal's scale in a train run's summary (`report`'s `loss scale` line): `value`, the scale φ read the
    loss on at the run's last step (for a multi-task run, its E term's); `source`, where it came from: "calibrated"
    (`calibration_steps`, given or set for a causal LM by `_calibrate_lm_loss`: the mean loss of those first steps
    maps to `calibration_target`, --calibration-target), "given" (`--loss-scale`, or YAML `loss_scale`, other than
    1) or "default" (1).
    A calibration the run ended inside has `calibrated` False: φ was held, and `value` is the scale it started on.
    None on the composite signal, which reads no scale."""
    if cfg.signal != "loss":
        return None
    if not cfg.calibration_steps:
        return {"value": cfg.loss_scale, "source": "given" if cfg.loss_scale != 1.0 else "default"}
    last = (trace[-1].get("components") or {}) if trace else {}
    return {"value": last.get("loss_scale", cfg.loss_scale), "source": "calibrated", "steps": cfg.calibration_steps,
            "target": cfg.calibration_target, "calibrated": "loss_scale" in last and not last.get("calibrating")}


def _loss_scale_line(r: dict) -> str:
    """`report`'s line on the loss signal's scale (`_loss_scale_record`)."""
    if r.get("source") == "calibrated":
        if not r.get("calibrated"):
            return (f"loss scale: {r['value']:.4g}, not calibrated: the run ended inside its calibration on the first "
                    f"{r['steps']} steps (--calibration-steps), φ held throughout")
        return (f"loss scale: {r['value']:.4g}, calibrated on the first {r['steps']} steps (their mean loss reads as "
                f"{r['target']:g}; --calibration-steps, --calibration-target)")
    return f"loss scale: {r['value']:g}, " + ("given (--loss-scale)" if r.get("source") == "given" else "the default")


def _conflict_lines(label: str, c: dict | None) -> list[str]:
    """`report`'s lines on a multi-task run's gradient conflict (`conflict_summary`): a line for each mode the signal
    read it in (SINGLE, at the shared adapter; MULTI/MIRROR, at each task's own adapter, and at how many of those
    steps φ read the weight conflict instead), with C_grad's and C_grad_raw's mean and largest value over the steps
    that recorded it; then a line for each mode with each task's mean gradient reliability ρ, over its steps there
    that recorded it. A summary.json written before the modes (the conflict over every step), or before ρ by mode
    (`_conflict_by_mode`), where no trace.jsonl is there to read them from: its lines, said to be over every mode."""
    if not c:
        return []

    def parts(m: dict, of: int) -> str:
        return ", ".join(f"{key} mean={m[key]['mean']:.3f} max={m[key]['max']:.3f} at step {m[key]['max_step']} "
                         f"({m[key]['steps']} of {of} steps)" for key in ("C_grad", "C_grad_raw") if key in m)

    def adapter(mode: str) -> str:
        return "at the shared adapter" if mode == "SINGLE" else "at each task's own adapter"

    out = []
    modes = c.get("modes") or {}
    for mode, m in modes.items():
        if parts(m, m["steps"]):
            where = adapter(mode) + (f"; φ read the weight conflict C_weight at {m['C_weight']} of them"
                                     if mode != "SINGLE" and m.get("C_weight") else "")
            out.append(f"  {label}: gradient conflict read in {mode} ({m['steps']} of {c['of']} steps, {where}): "
                       f"{parts(m, m['steps'])}")
    if "modes" not in c and parts(c, c["of"]):
        out.append(f"  {label}: gradient conflict over every mode {parts(c, c['of'])}")
    for mode, m in modes.items():
        if m.get("rho"):
            out.append(f"  {label}: gradient reliability ρ read in {mode} ({m['steps']} of {c['of']} steps, "
                       f"{adapter(mode)}): " + ", ".join(f"ρ[{task}] mean={r['mean']:.3f} ({r['steps']} of "
                                                         f"{m['steps']} steps)" for task, r in m["rho"].items()))
    if c.get("rho"):  # (the older layout: each task's mean over every step)
        out.append(f"  {label}: mean gradient reliability ρ of each task over every mode: "
                   + " ".join(f"{task}={v:.3f}" for task, v in c["rho"].items()))
    return out


def _conflict_by_mode(c: dict | None) -> bool:
    """Whether a summary.json's `conflict` (`conflict_summary`) is in its present layout: C_grad and ρ by the mode
    the signal read them in. Older ones had C_grad (and then ρ) over every step: `report` reads them again from
    trace.jsonl where it is there."""
    return bool(c) and "modes" in c and "rho" not in c


def _held_merge_lines(label: str, held: list | None, summary: dict) -> list[str]:
    """`report`'s line for each `held_merges` entry of a multi-task run: the merges φ called for in the run's last
    --resplit-window steps, which the controller held (the console said so at the first of them)."""
    window = (summary.get("config") or {}).get("resplit_window")
    its = f" (its last {window} steps, --resplit-window)" if isinstance(window, int) and window else ""
    return [f"  {label}: merge held: none from step {h['closed_from']} on, too close to the run's end to be "
            f"tested{its}; φ called for one at {h['steps']} step{'' if h['steps'] == 1 else 's'}, the first at step "
            f"{h['first_step']}" for h in held or ()]


def _mirror_reason(m: dict, summary: dict) -> str:
    """What a Mirror exit's rule decided on. The drift threshold is the `drift` rule's alone: beside a `loss_worse`
    decision it read as the reason (a restore at drift 56 %, "threshold 5%"), so the rule and its numbers are named."""
    policy = m.get("policy") or (summary.get("config") or {}).get("mirror_policy") or "drift"
    drift = f"drift={m['drift']:.2%}" if m.get("drift") is not None else "drift -"
    if policy == "drift":
        return f"{drift}, threshold {summary.get('drift_threshold', 0.05) * 100:g}%"
    if policy == "loss_worse":
        entry, exit_ = m.get("loss_at_entry"), m.get("loss_at_exit")
        if entry is not None and exit_ is not None:
            return f"rule loss_worse: loss EMA {exit_:.4g} at exit vs {entry:.4g} at entry; {drift}"
    return f"rule {policy}; {drift}"


def _correct_rows(preds, labels) -> str:
    """One character per dev row, in row order: "1" where the prediction is the label, "0" where not."""
    return "".join("1" if int(p) == int(y) else "0" for p, y in zip(preds, labels))


def _label_string(ids) -> str:
    """Class ids, one per dev row, in row order, as one JSON string: a digit per row where every id is below 10 (a
    binary task: "0110..."), else the ids separated by spaces. `_label_ids` reads it back."""
    ids = [int(i) for i in ids]
    return "".join(map(str, ids)) if all(0 <= i < 10 for i in ids) else " ".join(map(str, ids))


def _label_ids(s, n) -> list[int] | None:
    """The `n` class ids of a `_label_string`, or None where `s` is not one of `n` rows (absent, or cut short)."""
    if not isinstance(s, str) or not isinstance(n, int) or n < 1:
        return None
    parts = list(s) if len(s) == n and " " not in s else s.split(" ")
    if len(parts) != n or not all(x.isascii() and x.isdigit() for x in parts):
        return None
    return [int(x) for x in parts]


def _paired_verdict(summary: dict) -> dict | None:
    """The demo's paired tests, from the per-row correctness it stores (`final_correct` of each arm,
    `majority_correct`): unified vs the fixed-rank arm, and each arm vs the majority class (a constant prediction,
    right exactly on the rows of that class). None for a summary without them (a demo before they were stored)."""
    n = summary.get("dev_rows")
    rows = {k: a.get("final_correct") for k, a in summary.get("arms", {}).items()}
    maj = summary.get("majority_correct")
    if not isinstance(rows.get("unified"), str) or len(rows["unified"]) != n:
        return None
    out: dict = {"test": "exact McNemar (two-sided) on the rows one model gets right and the other wrong"}
    if isinstance(rows.get("baseline"), str) and len(rows["baseline"]) == n:
        out["unified_vs_baseline"] = mcnemar(rows["unified"], rows["baseline"])
    if isinstance(maj, str) and len(maj) == n:
        out["vs_majority"] = {k: mcnemar(r, maj) for k, r in rows.items() if isinstance(r, str) and len(r) == n}
    return out


def _f1_verdict(summary: dict) -> dict | None:
    """The demo's paired F1 tests, from the predicted class of each dev row (`final_preds` of each arm), the gold
    labels (`dev_labels`) and the majority class (`majority_label`): unified vs the fixed-rank arm and each arm vs the
    majority class, by `paired_f1_test`. A binary task is scored by the F1 of class 1 (GLUE's positive class: MRPC's
    "equivalent"), a task of more classes by macro-F1. None for a summary without the per-row labels."""
    from .data.metrics import paired_f1_test

    n = summary.get("dev_rows")
    labels = _label_ids(summary.get("dev_labels"), n)
    preds = {k: _label_ids(a.get("final_preds"), n) for k, a in summary.get("arms", {}).items()}
    if labels is None or preds.get("unified") is None:
        return None
    classes = summary.get("num_labels")
    if not isinstance(classes, int):  # not recorded: the ids seen
        classes = max(max(labels), *(max(p) for p in preds.values() if p is not None)) + 1
    binary = classes <= 2
    positive = 1 if binary else None
    out: dict = {"metric": "f1" if binary else "macro_f1", "positive": positive,
                 "test": "paired permutation test: the two predictions of each row swapped at random"}
    if preds.get("baseline") is not None:
        out["unified_vs_baseline"] = paired_f1_test(preds["unified"], preds["baseline"], labels, positive)
    maj = summary.get("majority_label")
    if isinstance(maj, int):
        out["vs_majority"] = {k: paired_f1_test(p, [maj] * n, labels, positive) for k, p in preds.items()
                              if p is not None}
    return out


def _vs_majority_tail(at: list[str], near: list[str], metric: str = "") -> str:
    """The end of a verdict's line against the majority class: the arms `at` it or below, those `near` it (above,
    within the noise); `metric` ("F1 of class 1 ") names what they score, where it is not accuracy."""
    tail = ""
    if at:
        tail += (f"; {' and '.join(at)} score{'' if len(at) > 1 else 's'} no better {metric}than always predicting "
                 "the majority class")
    if near:
        tail += f"; {' and '.join(near)} {'are' if len(near) > 1 else 'is'} above it within noise only"
    return tail


def _f1_verdict_lines(summary: dict, label: dict) -> list[str]:
    """The F1 half of the demo's verdict (`_f1_verdict`), or a line saying an older summary.json cannot have it."""
    t = _f1_verdict(summary)
    if t is None and "dev_labels" in summary:
        return [f"  F1: this summary.json's per-row labels (dev_labels, the arms' final_preds) do not hold one class "
                f"id for each of its {summary.get('dev_rows')} dev rows, so the F1 difference is not tested; re-run "
                "the demo."]
    if t is None:
        return ["  F1: this summary.json holds no per-row predicted labels (a demo before they were stored), so the "
                "F1 difference is not tested; re-run the demo for the paired F1 permutation test."]
    if t["metric"] == "f1":
        names = summary.get("classes") or []
        name = f" ({names[1]})" if len(names) > 1 and str(names[1]) != "1" else ""
        short = f"F1 of class 1{name}"
        what = short + (", GLUE's MRPC F1" if str(summary.get("task", "")).lower() == "mrpc" else "")
    else:
        short = what = f"macro-F1 over the {summary.get('num_labels', '?')} classes"

    def how(r: dict) -> str:
        k = r["rows_differ"]
        if k == 0:
            return "they predict every row alike, so no swap changes anything"
        rows = f"the {k} row{'' if k == 1 else 's'} they predict differently"
        return (f"exact: all 2^{k} = {2**k:,} swaps of {rows}" if r["exact"] else
                f"{r['permutations']:,} random swaps, seed {r['seed']}, of {rows}")

    def word(r: dict) -> str:
        if r["diff"] == 0:
            return "no difference"
        if r["p"] >= VERDICT_ALPHA:
            return "within noise"
        return "ahead, beyond the noise" if r["diff"] > 0 else "behind, beyond the noise"

    out = []
    if "unified_vs_baseline" in t:
        r = t["unified_vs_baseline"]
        out.append(f"  Final dev {what}: {label['unified']} {r['f1_a']:.3f} vs {label['baseline']} {r['f1_b']:.3f}: "
                   f"{r['diff']:+.3f}, {word(r)}; paired permutation test on the same rows (each row's two "
                   f"predictions swapped at random; {how(r)}): p={r['p']:.3g} (beyond the noise only at "
                   f"p < {VERDICT_ALPHA:g}).")
    if "vs_majority" in t:
        vm = t["vs_majority"]
        maj = next(iter(vm.values()))["f1_b"]
        vs = ", ".join(f"{label[k]} {r['diff']:+.3f} ({r['rows_differ']} row{'' if r['rows_differ'] == 1 else 's'} "
                       f"predicted differently, p={r['p']:.3g})" for k, r in vm.items())
        tail = _vs_majority_tail([label[k] for k, r in vm.items() if r["diff"] <= 0],
                                 [label[k] for k, r in vm.items() if r["diff"] > 0 and r["p"] >= VERDICT_ALPHA],
                                 f"{short} ")
        out.append(f"  {short} vs the majority class ({maj:.3f}), by the same test: {vs}{tail}.")
    return out


def _demo_verdict(summary: dict) -> list[str]:
    """A demo's answer to "did the controller help?", computed from its final dev predictions: the difference with
    the fixed-rank arm and with the majority class, in rows, and an exact McNemar test of it. Both arms (and the
    majority class) are scored on the same dev rows, so the comparison is paired: only the rows one gets right and
    the other wrong (b and c) count. An unpaired two-proportion standard error ignores that two fine-tunes of one
    model agree on most rows, and is far too wide: it called a 12-to-0 split of 200 rows (p = 0.0005) noise.
    A summary.json from before the per-row data was stored gets the old unpaired estimate, said to be one. Neither
    covers seed-to-seed training variance, which one seed cannot show. Then the same for F1 (`_f1_verdict_lines`): MRPC
    is scored by F1 and accuracy, and on an imbalanced task the two can disagree."""
    arms, n = summary.get("arms", {}), summary.get("dev_rows")
    acc = {k: ((a.get("eval") or {}).get("final") or {}).get("accuracy") for k, a in arms.items()}
    if summary.get("command") != "demo" or acc.get("unified") is None or not n:
        return []
    label = {k: a.get("label", k) for k, a in arms.items()}
    u, b = acc["unified"], acc.get("baseline")
    maj = (summary.get("majority") or {}).get("accuracy")
    paired = _paired_verdict(summary) or {}

    def two_se(p: float, q: float) -> float:
        return 2 * math.sqrt((p * (1 - p) + q * (1 - q)) / n)

    def rows(d: float) -> str:
        return f"{round(d * n):+d} of {n} rows"

    def word(t: dict) -> str:
        if t["b"] == t["c"]:
            return "no difference"
        if t["p"] >= VERDICT_ALPHA:
            return "within noise"
        return "ahead, beyond the noise" if t["b"] > t["c"] else "behind, beyond the noise"

    seeds = "one seed cannot show training variance (compare several --seed values)"
    out = ["", f"Did the controller help? Final dev accuracy, one seed, {n} dev rows:"]
    if b is None:
        out.append(f"  {label['unified']} {u:.3f}; no fixed-rank arm was run (--no-baseline), so this run cannot "
                   "tell whether the controller helped.")
    elif "unified_vs_baseline" in paired:
        t = paired["unified_vs_baseline"]
        out.append(f"  {label['unified']} {u:.3f} vs {label['baseline']} {b:.3f}: {u - b:+.3f} "
                   f"({t['b'] - t['c']:+d} of {n} rows), {word(t)}; paired on the same rows: {t['b']} right only by "
                   f"{label['unified']}, {t['c']} only by {label['baseline']}, exact McNemar p={t['p']:.3g} "
                   f"(beyond the noise only at p < {VERDICT_ALPHA:g}). "
                   f"The test covers which dev rows were drawn; {seeds}.")
    else:
        d, noise = u - b, two_se(u, b)
        if round(d * n) == 0:
            w = "no difference"
        elif abs(d) <= noise:
            w = "within noise"
        else:
            w = "ahead, beyond the noise" if d > 0 else "behind, beyond the noise"
        out.append(f"  {label['unified']} {u:.3f} vs {label['baseline']} {b:.3f}: {d:+.3f} ({rows(d)}), {w}; this "
                   f"summary.json holds no per-row predictions (a run before they were stored), so the noise is the "
                   f"unpaired binomial estimate, 2 standard errors of a difference = ±{noise:.3f}, which ignores that "
                   f"both arms are scored on the same rows and is usually too wide (re-run for the paired McNemar "
                   f"test); {seeds}.")
    if maj is not None and "vs_majority" in paired:
        vm = paired["vs_majority"]
        vs = ", ".join(f"{label[k]} {t['b'] - t['c']:+d} of {n} rows ({t['b']} right only by it, {t['c']} only by "
                       f"the majority class, p={t['p']:.3g})" for k, t in vm.items())
        tail = _vs_majority_tail([label[k] for k, t in vm.items() if t["b"] <= t["c"]],
                                 [label[k] for k, t in vm.items() if t["b"] > t["c"] and t["p"] >= VERDICT_ALPHA])
        out.append(f"  vs the majority class ({maj:.3f}): {vs}{tail}.")
    elif maj is not None:
        at = [label[k] for k, a in acc.items() if a is not None and round((a - maj) * n) <= 0]
        vs = ", ".join(f"{label[k]} {rows(a - maj)}" for k, a in acc.items() if a is not None)
        out.append(f"  vs the majority class ({maj:.3f}): {vs}{_vs_majority_tail(at, [])}.")
    return out + _f1_verdict_lines(summary, label)


# ----------------------------------------------------------------------------- demo


def _arm_summary(run, trace: list[dict], cfg, evals: dict, wall: float, steps_run: int, label: str) -> dict:
    from .training import phi_summary, transitions

    trans = transitions(trace)
    return {
        "label": label,
        "controller": cfg.controller,
        "eval": evals,
        "phi": phi_summary(trace, cfg.shock_start, cfg.shock_end),
        "transitions": trans,
        "mirror": [t for t in trans if t.get("snapshot") in ("restored", "kept")],
        "loss_scale": trace[-1]["components"].get("loss_scale") if trace else None,
        "wall_s": wall,
        "step_s": wall / max(steps_run, 1),
    }


def _train_arm(cfg, model_path: str, num_labels: int, enc_train: dict, enc_dev: dict, task: str, trace_path: Path,
               say: Callable[[str], None], label: str) -> tuple[dict, list[dict]]:
    """One demo arm: fresh model (same seed), `cfg.steps` steps with the shock, three dev evaluations."""
    from .trace import read_trace
    from .data import glue_metrics
    from .training import (DivergedError, Run, check_row_length, evaluate, iterate, load_model, predict, resolve_device,
                           seed_everything)

    t0, cpu0 = time.perf_counter(), time.process_time()
    seed_everything(cfg.seed)
    model, _ = load_model(model_path, "seq-cls", num_labels, note=say)
    model.to(resolve_device(cfg.device))
    check_row_length(model, cfg.max_length, enc_train, enc_dev)
    run = Run(cfg, model, "seq-cls", num_labels, str(trace_path), print_fn=say if cfg.controller else None)
    say(f"--- {label}: {run.n_trainable():,} trainable parameters at rank {run.ctrl.rank}, "
        f"lr={run.ctrl.get_last_lr():g}")
    eval_at = {cfg.shock_start: "pre_shock", cfg.shock_end: "post_shock"} if cfg.has_shock else {}
    evals: dict = {}
    train_s, bar = 0.0, _bar(cfg.steps, desc=label)
    for _, batch in iterate(run, enc_train, cfg.steps, 10**9, 0):
        if batch is None:
            continue
        step = run.state.global_step
        if step in eval_at:
            evals[eval_at[step]] = evaluate(model, enc_dev, "seq-cls", task, precision=cfg.precision)
            say(f"    dev @ step {step} ({eval_at[step].replace('_', '-')}): {_fmt_metrics(evals[eval_at[step]])}")
        if cfg.has_shock and step == cfg.shock_start:
            say(f">>> SHOCK @ step {step} ({cfg.shock_type} labels until step {cfg.shock_end})")
        if cfg.has_shock and step == cfg.shock_end:
            say(f">>> RECOVERY @ step {step}")
        t = time.perf_counter()
        try:
            loss = run.train_step(batch)
        except DivergedError:  # (its advice is train's: --resume, --max-nonfinite-steps, which the demo has not)
            bar.close()
            run.ctrl.close()
            raise DivergedError(f"{label}: {run.state.nonfinite_in_a_row} steps in a row (to step {step}) had a "
                                "non-finite loss or gradient and were skipped, so the demo stops; run it again with "
                                "lower learning rates (--lrs)") from None
        train_s += time.perf_counter() - t
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", phi=f"{run.ctrl.phi:.3f}", mode=run.ctrl.mode, refresh=False)
    bar.close()
    preds = predict(model, enc_dev, precision=cfg.precision)
    evals["final"] = glue_metrics(task, preds, enc_dev["labels"].numpy())
    say(f"    dev @ step {run.state.global_step} (final): {_fmt_metrics(evals['final'])}")
    if cfg.has_shock and cfg.shock_end == run.state.global_step:  # a shock to the last step: right after it is the end
        evals["post_shock"] = evals["final"]
    run.ctrl.close()
    trace = read_trace(trace_path)
    arm = _arm_summary(run, trace, cfg, evals, time.perf_counter() - t0, run.state.global_step, label)
    arm["train_step_s"] = train_s / max(run.state.global_step, 1)
    arm["cpu_s"] = time.process_time() - cpu0  # CPU seconds of this process: a load-independent cost measure
    arm["trainable_params_final"] = run.n_trainable()
    arm["skipped_steps"] = run.state.skipped_steps  # non-finite loss or gradient: optimizer step skipped
    arm["final_correct"] = _correct_rows(preds, enc_dev["labels"].numpy())  # the paired verdict's per-row data
    arm["final_preds"] = _label_string(preds)  # and the F1 test's: the predicted class of each dev row
    if cfg.controller and run.ctrl.last_decision is not None:
        d = run.ctrl.last_decision
        arm["last_decision"] = {"restore": d.restore, "drift": d.drift, "policy": d.policy,
                                "loss_at_entry": d.loss_at_entry, "loss_at_exit": d.loss_at_exit}
    return arm, trace


def _refuse_multiprocess_launch(command: str) -> None:
    """`demo` trains in one process. Launched by torchrun or `accelerate launch` with several processes
    (WORLD_SIZE > 1), each process ran the whole run on all the data into the same --output-dir at once: the runs
    tripped over each other's files (one refused the other's checkpoints as a previous run) and N processes did one
    process's work. (`train` runs under torchrun: DDP, `cmd_train`.)"""
    from .training import UsageError

    world = os.environ.get("WORLD_SIZE", "1")
    if world.strip() not in ("", "0", "1"):
        raise UsageError(f"{command}: launched as one of {world} processes (WORLD_SIZE={world}, set by torchrun or "
                         f"accelerate launch), but `{PROG} {command}` trains in one process: each process would run "
                         "the whole run on all the data and write the same --output-dir. Run it without the launcher "
                         "(or with --nproc_per_node 1, or WORLD_SIZE unset); for data-parallel training use `torchrun "
                         f"--nproc-per-node N $(which {PROG}) train ...`, the Python API with DDP or the Hugging Face "
                         "Trainer (README 'Multi-GPU', examples/ddp_torchrun.py)")


def cmd_demo(args) -> int:
    _refuse_multiprocess_launch("demo")
    from .data import TextDataset, majority_class
    from .plotting import plot_trace
    from .training import (TrainConfig, UsageError, check_precision, describe_schedule, device_label, encode_rows,
                           load_data, load_tokenizer, lr_schedule, majority, resolve_device, resolve_model, subsample)

    t_start, cpu_start = time.perf_counter(), time.process_time()
    if args.steps < 1:  # TrainConfig's steps=0 means "whole epochs"; the demo runs --steps steps, and 0 trained none
        raise UsageError(f"steps: must be >= 1 (the demo trains this many steps), got {args.steps}")
    _check_demo_shock(args)
    out = Path(_check_output_dir(args.output_dir))
    lrs = tuple(args.lrs) if args.lrs else DEMO_LRS
    loss_scale, calibration_steps = args.loss_scale, args.calibration_steps
    calibration_target = args.calibration_target
    given = {k: getattr(args, k) for k in _LOSS_SIGNAL_ONLY if getattr(args, k) is not None}
    _refuse_unread_by_composite(args.signal, given, given)
    if args.signal == "loss":  # the demo's scale and calibration are the loss signal's (the composite reads neither)
        loss_scale = DEMO_LOSS_SCALE if loss_scale is None else loss_scale
        if calibration_steps is None:  # an explicit --loss-scale means "use this scale", not "calibrate"
            calibration_steps = DEMO_CALIBRATION[0] if args.loss_scale is None else 0
        if calibration_target is None:
            calibration_target = DEMO_CALIBRATION[1]
    loss_scale = 1.0 if loss_scale is None else loss_scale  # composite: given ones are refused above
    calibration_steps = 0 if calibration_steps is None else calibration_steps
    calibration_target = 0.5 if calibration_target is None else calibration_target
    cfg = TrainConfig(model=args.model, data=args.data, text_columns=args.text_columns, label_column=args.label_column,
                      dev_size=args.dev_size, max_length=args.max_length, batch_size=args.batch_size, steps=args.steps,
                      seed=args.seed, signal=args.signal, mode_lrs=lrs, loss_scale=loss_scale,
                      calibration_steps=calibration_steps, calibration_target=calibration_target,
                      shock_start=args.shock_start, shock_end=args.shock_end, shock_type=args.shock_type,
                      output_dir=str(out), log_every=args.log_every, target_modules=args.target_modules,
                      modules_to_save=args.modules_to_save, min_dwell=args.min_dwell, threads=args.threads,
                      device=args.device, precision=args.precision, lr_scheduler=args.lr_scheduler,
                      warmup_steps=args.warmup_steps, warmup_ratio=args.warmup_ratio,
                      lr_scheduler_kwargs=args.lr_scheduler_kwargs)
    schedule = lr_schedule(cfg, cfg.steps)  # (a warm-up longer than the run: refused before anything loads)
    _note_calibration_target_unread(cfg, given, True)
    device = resolve_device(cfg.device)  # a device this machine lacks fails here, before anything is loaded
    check_precision(device, cfg.precision)
    if cfg.threads:  # checked first: torch.set_num_threads(-1) was an internal error (RuntimeError, exit 1)
        import torch

        torch.set_num_threads(cfg.threads)
    say = _Console()
    model_path = resolve_model(cfg.model)
    train, dev, task = load_data(cfg, "seq-cls")
    dev_eval = subsample(dev, cfg.dev_size, DEV_SUBSAMPLE_SEED)  # same rows whatever --seed is
    assert isinstance(train, TextDataset)
    n_dev, n_all = len(dev_eval), len(dev)
    dev_note = (f"dev: {n_dev} of {n_all} rows (fixed subsample, seed {DEV_SUBSAMPLE_SEED}, to keep the demo short)"
                if n_dev < n_all else f"dev: all {n_all} rows")
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(model_path)
    enc_train = encode_rows(tok, train, "seq-cls", cfg.max_length)
    enc_dev = encode_rows(tok, dev_eval, "seq-cls", cfg.max_length)
    maj = majority(train, dev_eval, task)
    maj_correct = _correct_rows([majority_class(train.labels)] * n_dev, enc_dev["labels"].numpy())
    sig = cfg.signal_config()
    say(f"unified-lora demo: {_model_name(cfg.model, model_path)} on {task} ({len(train)} train rows, batch {cfg.batch_size}, "
        f"max_length {cfg.max_length}), {cfg.steps} steps, {cfg.shock_type} shock on [{cfg.shock_start}, "
        f"{cfg.shock_end})")
    scale = ("" if cfg.signal != "loss" else  # the composite signal reads no loss scale
             f"loss_scale=mean of the first {sig.calibration_steps} losses / {sig.calibration_target:g} "
             if sig.calibration_steps else f"loss_scale={sig.loss_scale:g} ")
    say(f"signal={cfg.signal} {scale}"
        f"θ0={cfg.theta0} θ1={cfg.theta1}; LR SINGLE/MULTI/MIRROR = {'/'.join(f'{x:g}' for x in lrs)}; "
        f"ranks 4/8/16")
    say(_demo_legend(cfg.signal))
    if (device.type, cfg.precision) != ("cpu", "fp32"):  # (the default: the demo's documented output, unchanged)
        say(f"device: {device_label(device)}, precision {cfg.precision}")
    if schedule["lr_scheduler"] != "constant":  # (so is a constant LR's)
        say(f"LR schedule: {describe_schedule(schedule)}; the mode's LR x its factor at each optimizer step, in both "
            "arms")
    say(dev_note)
    say(f"majority class baseline on dev: {_fmt_metrics(maj)}")

    arms, traces = {}, {}
    arms["unified"], traces["unified"] = _train_arm(cfg, model_path, train.num_labels, enc_train, enc_dev, task,
                                                    out / "trace.jsonl", say, "Unified LoRA")
    if not args.no_baseline:
        base_cfg = TrainConfig(**{**cfg.__dict__, "controller": False})
        arms["baseline"], traces["baseline"] = _train_arm(base_cfg, model_path, train.num_labels, enc_train, enc_dev,
                                                          task, out / "baseline_trace.jsonl", say,
                                                          "Baseline LoRA r8")
    u = arms["unified"]
    summary = {
        "command": "demo", "model": model_path, "data": cfg.data or "shipped GLUE MRPC", "task": task,
        "steps": cfg.steps, "seed": cfg.seed, "batch_size": cfg.batch_size, "max_length": cfg.max_length,
        "shock": {"type": cfg.shock_type, "start": cfg.shock_start, "end": cfg.shock_end},
        "signal": {"kind": cfg.signal, "loss_scale": sig.loss_scale, "calibration_steps": sig.calibration_steps,
                   "calibration_target": sig.calibration_target, "loss_scale_used": u.get("loss_scale")},
        "theta0": cfg.theta0, "theta1": cfg.theta1, "mode_lrs": list(lrs), "mode_ranks": [4, 8, 16],
        "drift_threshold": cfg.drift_threshold, "dev_rows": n_dev, "dev_rows_total": n_all, "dev_note": dev_note,
        "eval_points": ["pre_shock", "post_shock", "final"], "majority": maj, "majority_correct": maj_correct,
        "num_labels": train.num_labels, "classes": train.label_names,
        "dev_labels": _label_string(enc_dev["labels"].numpy()), "majority_label": majority_class(train.labels),
        "arms": arms, "threads": _threads(), "device": device_label(device), "precision": cfg.precision,
        "lr_schedule": schedule,
    }
    summary["verdict"] = _paired_verdict(summary)
    summary["verdict_f1"] = _f1_verdict(summary)
    plot_path = plot_trace(traces["unified"], out / "plot.png", theta0=cfg.theta0, theta1=cfg.theta1,
                           shock=(cfg.shock_start, cfg.shock_end), baseline=traces.get("baseline"),
                           title=f"unified-lora demo: {_model_name(cfg.model, model_path)} on {task}, "
                                 f"{cfg.shock_type} shock")
    summary["wall_s"] = time.perf_counter() - t_start
    summary["cpu_s"] = time.process_time() - cpu_start
    write_text_atomically(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    say("")
    say(format_summary(summary))
    baseline = f", {out / 'baseline_trace.jsonl'}" if "baseline" in traces else ""
    say(f"outputs: {out / 'trace.jsonl'}{baseline}, {out / 'summary.json'}, {plot_path}, {out / 'console.txt'}")
    say.save(out / "console.txt")
    return 0


def _demo_legend(signal: str) -> str:
    """The demo's key to its console lines, for a reader who has not met φ or the modes: what φ is read from, what
    each Mode number is, and that θ1 is the line into MIRROR."""
    source = ("the smoothed, scaled loss E_s" if signal == "loss" else
              "the loss trend C, the gradients' change E and their size S")
    return (f"reading the lines below: φ is the training stress in [0, 1], from {source}; Mode=0 is SINGLE (rank 4, "
            "φ < θ0), Mode=1 MULTI (rank 8), Mode=2 MIRROR (rank 16, entered at φ >= θ1 with a snapshot of the "
            "weights, which its exit keeps or restores)")


def _check_demo_shock(args) -> None:
    """The demo's shock window (--shock-start, --shock-end) inside its --steps. Neither flag given: the default window
    (60-100 of the default 160 steps) scaled to --steps (`demo --steps 30` shocks steps 11-17; it kept 60-100 and was
    refused). One or both given, the other at its default: a window outside the run is a UsageError that says which
    values were the defaults and gives a window that fits."""
    from .training import UsageError

    steps = args.steps
    if args.shock_start is None and args.shock_end is None:
        args.shock_start, args.shock_end = steps * DEMO_SHOCK[0] // DEMO_SHOCK[2], steps * DEMO_SHOCK[1] // DEMO_SHOCK[2]
        return
    defaults = [f"--shock-{k}" for k in ("start", "end") if getattr(args, f"shock_{k}") is None]
    args.shock_start = DEMO_SHOCK[0] if args.shock_start is None else args.shock_start
    args.shock_end = DEMO_SHOCK[1] if args.shock_end is None else args.shock_end
    start, end = args.shock_start, args.shock_end
    if 0 <= start <= end <= steps:
        return
    said = f" ({defaults[0]} is the default, set for the default {DEMO_SHOCK[2]} steps)" if defaults else ""
    fit_start, fit_end = steps * DEMO_SHOCK[0] // DEMO_SHOCK[2], steps * DEMO_SHOCK[1] // DEMO_SHOCK[2]
    raise UsageError(f"--shock-start {start} --shock-end {end}{said}: the shock window must lie inside the run, "
                     f"0 <= --shock-start <= --shock-end <= --steps {steps}; give both, e.g. --shock-start {fit_start} "
                     f"--shock-end {fit_end} (the default window scaled to {steps} steps)")


def _model_name(given: str | None, path: str) -> str:
    return "all-MiniLM-L6-v2 (bundled)" if given is None else Path(path).name


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# ----------------------------------------------------------------------------- train


_TRAIN_FLAGS = {  # flag dest -> TrainConfig field (only flags the user actually gave override the config)
    **{k: k for k in (
        "model", "data", "dev_data", "task_type", "text_columns", "label_column", "epochs", "steps", "batch_size",
        "max_length", "lr", "lr_mode", "signal", "loss_scale", "calibration_steps", "calibration_target",
        "target_modules",
        "modules_to_save", "seed", "output_dir", "dev_size", "dev_fraction", "log_every", "threads", "shock_start",
        "shock_end", "shock_type", "min_dwell", "controller_warmup", "theta0", "theta1", "mirror_policy",
        "mirror_kernel", "mirror_pack", "layer_kernel", "save_steps", "save_total_limit", "eval_steps", "device",
        "precision", "grad_accum", "max_nonfinite_steps", "assistant_only_loss", "text_eos", "lr_scheduler",
        "warmup_steps", "warmup_ratio", "lr_scheduler_kwargs", "metric_for_best", "save_best",
        "early_stopping_patience", "early_stopping_threshold",
        "task_names", "resplit_window")},
    "lrs": "mode_lrs",
}
# a YAML key spelt as a flag whose TrainConfig field is another name (`lrs:`) is told the key it sets (`mode_lrs`), not
# the nearest key by spelling (`lr`); `--no-controller`'s is `controller: false` (told `controller` by spelling,
# `no_controller: true` became `controller: true`, the opposite); a flag with no key at all (None) is told it is a
# flag (`trust_checkpoint:` was told `peft_every_checkpoint` by spelling)
_FLAG_KEY_NAMES = {**{k: f for k, f in _TRAIN_FLAGS.items() if k != f}, "no_controller": "controller: false",
                   **dict.fromkeys(("resume", "overwrite", "trust_checkpoint", "config", "debug"))}


def _check_output_dir(out) -> str:
    """`out`, a --output-dir (or YAML `output_dir`) that `demo` or `train` can write into, checked before anything
    loads; else a UsageError."""
    from .training import UsageError

    if not isinstance(out, str):  # `output_dir: null` in the YAML: --resume failed on Path(None), an internal error
        raise UsageError(f"output_dir: must be a string, got {out!r} ({type(out).__name__})")
    if not out.strip():  # Path("") is the current folder: the run's files were written there, among the user's own
        raise UsageError(f"--output-dir {out!r}: empty, which would write into the current folder; pass a folder "
                         "(it is made if it does not exist)")
    if Path(out).expanduser().exists() and not Path(out).expanduser().is_dir():  # (it was "[Errno 17] File exists",
        # after the model and data had loaded)
        raise UsageError(f"--output-dir {out}: a file, not a folder; pass a folder (it is made if it does not exist)")
    return out


def _train_config(args) -> tuple:
    """(TrainConfig, the checkpoint a --resume continues or None, the settings this command gives: YAML and flags)."""
    from .training import TrainConfig, UsageError, check_world_size, on_rank0, read_state, resume_checkpoint, world_size

    d: dict = {}
    if args.config:
        d.update(_read_config(args.config))
    flags = {f: getattr(args, k) for k, f in _TRAIN_FLAGS.items() if getattr(args, k, None) is not None}
    if args.no_controller:
        flags["controller"] = False
    out = _check_output_dir(flags.get("output_dir", d.get("output_dir", "unified-lora-run")))
    user = {**d, **flags}  # what this command gives (the YAML file and flags), not a resumed run's stored settings
    ckpt = None
    if args.resume:
        # (under torchrun: process 0 looks, as it puts back a save a kill interrupted; every process reads that one)
        # (the newest under checkpoints/, or best/ where a run killed after a new best wrote it later)
        ckpt = on_rank0(lambda: resume_checkpoint(out, args.trust_checkpoint))
        if ckpt is None:
            raise UsageError(f"--resume: no checkpoint under {Path(out) / 'checkpoints'}; "
                             "start without --resume (or pass the run's --output-dir)")
        st = read_state(ckpt, args.trust_checkpoint)
        check_world_size(st, ckpt, world_size())  # before the model loads
        stored = st["config"]
        # the stored run's settings, then whatever is given now; but not its device: a run saved on a GPU resumes on
        # the CPU of a machine without one (and the reverse) with --device auto, the default
        given = {**d, **flags}  # what this command sets: the task options of a multi-task run among them
        d = {**{k: v for k, v in stored.items() if k != "device"}, **d}
        if given.get("lr_scheduler", stored.get("lr_scheduler")) != stored.get("lr_scheduler") and \
                "lr_scheduler_kwargs" not in given:  # (a schedule's settings are its own: another --lr-scheduler,
            d.pop("lr_scheduler_kwargs", None)  # which the resume refuses below, naming it, does not take them)
    d.update(flags)
    _refuse_unread_by_composite(d.get("signal", "loss"), user, flags)
    try:
        cfg = TrainConfig.from_dict(d, _FLAG_KEY_NAMES)
    except ValueError as e:
        # a multi-task run resumed with --data, --dev-data or --task-names that fit neither each other nor the stored
        # ones (another task set): the error named dev_data or task_names, keys this command may not have given
        keys = [k for k in ("data", "dev_data", "task_names") if ckpt is not None and k in given]
        if not keys or not isinstance(stored.get("data"), dict):
            raise
        flags_now = ", ".join(f"--{k.replace('_', '-')}" for k in keys)
        raise UsageError(f"--resume {ckpt}: the run was trained on the tasks {stored['data']!r} (dev_data "
                         f"{stored.get('dev_data')!r}); with {flags_now} as given now: {e}; a resumed run keeps its "
                         f"tasks: drop {flags_now}, or start a new run in another --output-dir") from None
    if cfg.resplit_window != RESPLIT_WINDOW and not cfg.tasks:  # (a task's own config, one data set each, has it)
        raise UsageError(f"--resplit-window {cfg.resplit_window}: for several --data sets (multi-task mode: a split "
                         "soon after a merge brings the task adapters back); this run has one data set")
    _check_lr_read(cfg, user)
    _note_lrs_unread(cfg, user, "mode_lrs" in flags)
    if ckpt is not None:
        changed = _resume_changes(TrainConfig.from_dict(stored), cfg)
        if changed:
            raise UsageError(f"--resume {ckpt}: the run was trained with {'; '.join(changed)}; a resumed run keeps its "
                             "model, data, batches, LoRA layout, signal and best-evaluation settings "
                             f"({', '.join(_RESUME_FIXED)}): drop those options, or start a new run in another "
                             "--output-dir")
    _note_controller_unread(cfg, flags)
    # local paths are stored absolute (checkpoints, summary.json): a relative --data or --model was read again from
    # the cwd of the --resume, where it named another file (trained on silently) or nothing (then a hub id)
    def absolute(v):
        if isinstance(v, dict):  # several data sets: {task name: path}
            return {k: absolute(p) for k, p in v.items()}
        return os.path.abspath(Path(v).expanduser()) if v is not None and Path(v).expanduser().exists() else v

    for key in ("model", "data", "dev_data"):
        setattr(cfg, key, absolute(getattr(cfg, key)))
    return cfg, ckpt, user


LM_CALIBRATION_STEPS = 20  # train: a causal LM's loss signal sets its scale from its first 20 steps, unless given one


def _calibrate_lm_loss(cfg, user: dict, task_type: str, say, total: int) -> None:
    """A causal LM's loss (2-5 nats; ln of the vocabulary size at the start) on the loss signal's default scale of 1
    puts φ above θ1 for the whole run: MIRROR, at its lowest LR and top rank, whatever the training does (a tiny
    GPT-2 on tinyshakespeare: MIRROR from step 16 of 60 to the end, φ 0.80). A new causal-LM run on the loss
    signal, given neither --loss-scale nor --calibration-steps (flag or YAML), calibrates instead: the mean loss of
    its first `LM_CALIBRATION_STEPS` steps maps to `calibration_target` (0.5: φ ≈ 0.33; a --calibration-target given
    alone keeps this calibration, on that target), as the README tells API users to. So does a multi-task one
    (several --data sets), whose signal reads the tasks' loss level as its E term: on the scale of 1 that term
    alone (0.3 × 0.72 for a 2.6-nat loss) nearly filled θ0 = 0.3, and a tiny GPT-2 on two halves of one corpus,
    with no conflict (C = 0), stayed split in MULTI for all of its 100 steps. The run
    records it, so a --resume keeps it. A run of `total` <= 20 steps ends inside the calibration (φ held, MULTI
    throughout): the line says so. A --no-controller run calibrates the same way: its φ is recorded, not acted on (it
    trains as before), and on the scale of 1 its trace sat in the MIRROR band beside a controller run's φ of 0.33."""
    if task_type != "causal-lm" or cfg.signal != "loss" or {"loss_scale", "calibration_steps"} & user.keys():
        return
    cfg.calibration_steps = LM_CALIBRATION_STEPS
    if not cfg.controller:  # (a baseline: its φ, recorded alone, read as a controller run reads it)
        short = ("; without the controller (--no-controller) φ is recorded, not acted on, so this changes no training, "
                 "and the trace compares with a controller run's")
    elif total <= LM_CALIBRATION_STEPS:
        short = f"; this run's {total} steps end inside it, so the controller holds MULTI throughout"
    else:
        short = ""
    if cfg.tasks:
        say(f"multi-task signal: the tasks' loss level (its E term) is read on the scale of the first "
            f"{LM_CALIBRATION_STEPS} steps' loss (E held at {cfg.calibration_target / (1 + cfg.calibration_target):.3f} "
            f"until then; --calibration-steps {LM_CALIBRATION_STEPS}), not on the default scale of 1, where a causal "
            f"LM's loss level alone keeps the tasks split; --loss-scale or --calibration-steps sets it{short}")
        return
    say(f"loss signal: a causal LM's loss is read on the scale of its first {LM_CALIBRATION_STEPS} steps (φ held "
        f"until then; --calibration-steps {LM_CALIBRATION_STEPS}), not on the default scale of 1, where its loss "
        f"level alone reads as MIRROR; --loss-scale or --calibration-steps sets it{short}")


def _note_shock_in_calibration(cfg, say) -> None:
    """A note where the shock window starts inside the loss signal's calibration steps: the scale is set from the
    shocked losses too (a tiny GPT-2 shocked on steps 10-30: the scale about doubled, φ held through the shock, and
    SINGLE after it, the shock never read as stress), as README says of `demo`; it went without a word."""
    if not (cfg.controller and cfg.signal == "loss" and cfg.calibration_steps and cfg.has_shock
            and cfg.shock_start < cfg.calibration_steps):
        return
    held = "the E term is" if cfg.tasks else "φ is"
    say(f"note: the shock (steps [{cfg.shock_start}, {cfg.shock_end})) starts inside the loss signal's calibration "
        f"(its first {cfg.calibration_steps} steps): the scale is set from shocked losses too and {held} held through "
        f"them, so the shock reads as less stress; start it at step {cfg.calibration_steps} or later, or give "
        "--loss-scale")


def _check_lr_read(cfg, user: dict) -> None:
    """A UsageError for `--lr` (YAML `lr`) given to a run in --lr-mode absolute (the default), which does not read it:
    each mode trains at its `--lrs`. `--lr 1e6` trained at the default --lrs, silently (found by the user trial; a
    Trainer user takes --lr for the learning rate). (`--lrs` with --lr-mode multiplier is not read either, and is
    not refused: it is the default LR table, given with the mode in many recorded commands; `_note_lrs_unread`.)"""
    from .training import UsageError

    if cfg.lr_mode != "absolute" or "lr" not in user:
        return
    raise UsageError(f"--lr {cfg.lr:g} (YAML lr): the base LR of --lr-mode multiplier, not read with --lr-mode "
                     f"absolute (the default), which trains each mode at its --lrs SINGLE MULTI MIRROR (now "
                     f"{' '.join(f'{v:g}' for v in cfg.mode_lrs)}); pass --lrs instead, or --lr-mode multiplier")


# the settings only the loss signal reads (SignalConfig refuses a value other than its default for the composite one)
_LOSS_SIGNAL_ONLY = ("loss_scale", "calibration_steps", "calibration_target")


def _refuse_unread_by_composite(signal: str, user: dict, flags) -> None:
    """A UsageError where a setting only the loss signal reads (`_LOSS_SIGNAL_ONLY`) is given to a run on the composite
    signal, which reads no loss scale: given at all, as a flag (`flags`: the names given so) or a YAML key (`user`:
    the settings this command gives), its default value included. SignalConfig compares a value with its default, so
    `--signal composite --calibration-target 0.5` (the default) was accepted without a word where 2 was refused."""
    from .training import UsageError

    given = [k for k in _LOSS_SIGNAL_ONLY if k in user]
    if signal != "composite" or not given:
        return
    k = given[0]
    where = f"--{k.replace('_', '-')}" if k in flags else f"{k} (--config)"
    raise UsageError(f"{k}: {user[k]!r} would be ignored: the 'composite' signal does not read it (only --signal loss "
                     f"does), whatever its value; drop {where}, or pass --signal loss")


def _note_lrs_unread(cfg, user: dict, flag: bool) -> None:
    """A one-line note on stderr (process 0 alone, under torchrun) where `--lrs` (`flag`) or YAML `mode_lrs` is given to
    a run in --lr-mode multiplier, which does not read it: each mode trains at --lr x its multiplier. Not refused,
    as `--lr` in absolute mode is (`_check_lr_read`): many recorded commands give the default LR table with that
    mode. Nothing is said of the default --lrs, given by no one."""
    from .training import process_rank

    if cfg.lr_mode != "multiplier" or "mode_lrs" not in user or process_rank() != 0:
        return
    given = " ".join(f"{v:g}" for v in cfg.mode_lrs)
    lrs = ", ".join(f"{m} {cfg.lr * x:.3g}" for m, x in zip(("SINGLE", "MULTI", "MIRROR"),
                                                          cfg.actuator_config().mode_multipliers))
    print(f"{PROG}: note: {f'--lrs {given}' if flag else f'mode_lrs [{given}] (--config)'} is not read with --lr-mode "
          f"multiplier: each mode trains at --lr {cfg.lr:g} x its multiplier ({lrs}); drop it, or pass --lr-mode "
          "absolute to train each mode at its --lrs", file=sys.stderr)


_ID_COLUMN_MIN_ROWS = 20  # `_note_label_classes`: fewer training rows than this never read as an id column


def _note_label_classes(data: str | None, label_column: str, train, task: str | None = None) -> None:
    """One-line notes on stderr (process 0 alone) on a classifier's training rows (`train`, a TextDataset, after the
    dev split, read from `data` with its `label_column`): the classes that no training row has (integer labels are
    class ids, so a stray 5 among 0/1 makes a 6-class head whose classes 2-4 never train; or a class whose every row
    went to the dev split), and where the classes number more than half the training rows (fewer than two rows a
    class: a label column that holds an id per row; from `_ID_COLUMN_MIN_ROWS` training rows on: a file of a few rows
    has many classes a row rightly, and a smoke test of 3 rows and 2 classes got the note beside its own error, which
    a one-line error must stand alone). `task`: the name of a multi-task run's task whose data this is, which each
    note names (each task has its own classes: the notes were a one-task run's alone). Notes, not refusals: integers
    are class ids as documented (a head with an unused output trains)."""
    from .training import process_rank

    if process_rank() != 0 or not train.num_labels:
        return
    seen = set(train.labels)
    missing = [train.label_names[i] if train.label_names else i for i in range(train.num_labels) if i not in seen]
    # (a GLUE folder names its own labels; no --data: the shipped MRPC, whose Path(None) was a TypeError)
    table = data is not None and Path(data).suffix.lower() in (".csv", ".tsv", ".jsonl")
    what = (f"task {task}: " if task is not None else "") + \
        (f"--data {data}" if data is not None else "the shipped MRPC") + (f", column {label_column!r}" if table else "")
    if missing:
        shown = ", ".join(map(repr if train.label_names else str, missing[:5])) + (
            f", ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
        # (a multi-task run's head has the most classes of any task: each task's loss is on its own classes)
        has = f"the task has {train.num_labels} classes" if task is not None else \
            f"the head has {train.num_labels} outputs"
        why = "" if train.label_names else f" (integer labels are class ids, so {has}, 0 to {train.num_labels - 1})"
        print(f"{PROG}: note: {what}: {len(missing)} of the {train.num_labels} classes have no training row: "
              f"{shown}{why}; the model is never taught to predict them", file=sys.stderr)
    if 2 * train.num_labels > len(train) >= _ID_COLUMN_MIN_ROWS:
        print(f"{PROG}: note: {what}: {train.num_labels} classes for {len(train)} training rows (fewer than 2 rows a "
              "class): is it the label column, and not an id per row? (--label-column names the label column)",
              file=sys.stderr)


def _note_calibration_target_unread(cfg, user: dict, flag: bool) -> None:
    """A one-line note on stderr (process 0 alone) where `--calibration-target` (`flag`) or YAML `calibration_target`
    is given to a new run on the loss signal that does not calibrate (no --calibration-steps, or --loss-scale given;
    a causal LM calibrates of its own, `_calibrate_lm_loss`): the target is read by nothing. `user`: the settings
    given (train's flags and YAML keys; the demo's flags). A note, as for --lrs in
    multiplier mode: the run is otherwise what was asked. (The composite signal refuses it, given at all: it reads no
    scale; `_refuse_unread_by_composite`.)"""
    from .training import process_rank

    if "calibration_target" not in user or cfg.signal != "loss" or cfg.calibration_steps or process_rank() != 0:
        return
    given = f"--calibration-target {cfg.calibration_target:g}" if flag else \
        f"calibration_target {cfg.calibration_target:g} (--config)"
    why = ("--loss-scale sets the scale" if "loss_scale" in user else
           "--calibration-steps 0" if "calibration_steps" in user else "it has no --calibration-steps")
    print(f"{PROG}: note: {given} is not read: this run does not calibrate its loss scale ({why}); give "
          "--calibration-steps N to set the scale from the mean loss of its first N steps", file=sys.stderr)


# TrainConfig fields only the controller reads: without it (`controller` False) `machine_config` pins MULTI and drops
# the thresholds, dwell and warm-up; the signal's φ is still recorded but drives nothing; with no transition there is
# no Mirror, and in multi-task mode no merge and so no split after one (`resplit_window`)
_CONTROLLER_ONLY = ("signal", "loss_scale", "calibration_steps", "calibration_target", "theta0", "theta1", "min_dwell",
                    "controller_warmup", "resplit_window", "mirror_policy", "mirror_kernel", "mirror_pack")


def _note_controller_unread(cfg, flags: dict) -> None:
    """A one-line note on stderr (process 0 alone, under torchrun) where flags only the controller reads
    (`_CONTROLLER_ONLY`) are given on the command line to a run without it (--no-controller): they were accepted and
    ignored without a word. Not for YAML keys: one file may serve a controller run and its --no-controller baseline.
    Likewise a note where `--lrs` is typed for such a run with a SINGLE or MIRROR LR other than its MULTI one: the run
    trains at the MULTI LR alone, and the other two were ignored without a word (not refused: recorded commands give
    it; with --lr-mode multiplier `_note_lrs_unread` says that none of it is read)."""
    from .training import process_rank

    if cfg.controller or process_rank() != 0:
        return
    lrs = cfg.mode_lrs
    if "mode_lrs" in flags and cfg.lr_mode == "absolute" and (lrs[0], lrs[2]) != (lrs[1], lrs[1]):
        print(f"{PROG}: note: --lrs {' '.join(f'{v:g}' for v in lrs)} is read for its MULTI value {lrs[1]:g} alone "
              "without the controller (--no-controller), which trains plain LoRA at the MULTI rank and LR "
              f"throughout: not at SINGLE's {lrs[0]:g} or MIRROR's {lrs[2]:g}; train with the controller to use them",
              file=sys.stderr)
    given = [k for k in _CONTROLLER_ONLY if k in flags]
    if not given:
        return

    def flag(k: str) -> str:
        v = flags[k]
        if isinstance(v, bool):  # --mirror-pack / --no-mirror-pack
            return f"--{'' if v else 'no-'}{k.replace('_', '-')}"
        return f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"

    it = "it" if len(given) == 1 else "them"
    # (the signal's flags do set the φ such a run records in its trace, read by nothing: say so, or the two disagree;
    # the calibration target only where a calibration reads it: without --calibration-steps a classifier's is read by
    # nothing at all, as `_note_calibration_target_unread` says next)
    recorded = [f"--{k.replace('_', '-')}" for k in ("signal", "loss_scale", "calibration_steps",
                                                     "calibration_target")
                if k in given and (k != "calibration_target" or cfg.calibration_steps)]
    also = (f" ({', '.join(recorded)} only set{'s' if len(recorded) == 1 else ''} the φ its trace records, which "
            "nothing acts on)") if recorded else ""
    print(f"{PROG}: note: {', '.join(map(flag, given))} {'is' if len(given) == 1 else 'are'} not read without the "
          "controller (--no-controller), which trains plain LoRA at the MULTI rank and LR throughout; drop "
          f"{it}, or train with the controller{also}", file=sys.stderr)


def _read_config(path: str) -> dict:
    """The YAML (or JSON) mapping of a --config file. A key given twice is an error naming it: PyYAML keeps the last
    one silently, so `lr: 1e-3` further down a file replaced an earlier `lr:` without a word."""
    import yaml

    from .training import UsageError

    class Twice(Exception):
        pass

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise Twice(f"key {key!r} is given twice (again on line {key_node.start_mark.line + 1}); "
                                    "keep one")
                    seen.add(key)
                except TypeError:  # an unhashable key: SafeLoader's own error says so
                    pass
            return super().construct_mapping(node, deep=deep)

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file; pass a YAML file with TrainConfig keys")
    try:
        loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=Loader) or {}
    except Twice as e:
        raise UsageError(f"--config {path}: {e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"--config {path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"--config {path}: not valid YAML ({what}{where})") from None
    if not isinstance(loaded, dict):
        raise UsageError(f"--config {path}: must be a mapping of keys to values, e.g. `epochs: 3`")
    return loaded


# What a resumed run must keep: the model and its LoRA layout, the data, its split and the batches (the checkpoint
# stores a position in the epoch's batch order, which these fields define, grad_accum's batches per step included).
# And the LR schedule: the checkpoint is a position in it (a decaying one's length is checked in `Run.load_checkpoint`).
# LRs, thresholds, the Mirror policy, the shock window, epochs, steps, the precision and the device may change. The
# loss signal's scale settings may not: the controller state holds the scale they gave (`LossSignal.load_state_dict`
# puts it back), so a changed --loss-scale was recorded in the run's config and ignored, silently, and a changed
# --calibration-steps calibrated again in the middle of the run. The metric that ranks the evaluations (the best so
# far is stored in its units) and --save-best (best/ must hold the best the state names) stay too; the early-stopping
# patience and threshold may change (the count so far is kept).
_RESUME_FIXED = ("model", "task_type", "data", "dev_data", "dev_fraction", "text_columns", "assistant_only_loss",
                 "text_eos", "label_column", "max_length", "batch_size", "grad_accum", "seed", "target_modules",
                 "modules_to_save", "rank_levels", "lora_alpha", "lora_dropout", "controller", "signal", "loss_scale",
                 "calibration_steps", "calibration_target", "lr_scheduler", "warmup_steps", "warmup_ratio",
                 "lr_scheduler_kwargs",
                 "metric_for_best", "save_best")
# What a train run writes into its --output-dir (a fresh run refuses a folder that holds a run: its checkpoints
# would mix with the new ones, and --resume would pick the old run's newest step).
_RUN_OUTPUTS = ("checkpoints", "peft_adapter", "best", "summary.json", "trace.jsonl", "plot.png", "console.txt")
EXPORT_PREFIX = "peft_adapter-"  # `unified-lora export`'s default folder in the run: peft_adapter-<checkpoint name>
MERGED_PREFIX = "merged-"  # `export --merged`'s: merged-<checkpoint name> (a multi-task run's: -<task> after it)


def _run_outputs(out: Path) -> list[str]:
    from .training import settle_interrupted_saves

    ckpts = out / "checkpoints"
    # a checkpoint that a kill left under a temporary name is the previous run's too (the new run's first save put it
    # back beside its own); so is a best/ (in `out` itself), which a later --resume put back and went on from
    settle_interrupted_saves(ckpts)
    settle_interrupted_saves(out)
    held = [f"checkpoints/{p.name}" for p in sorted(ckpts.iterdir()) if not p.name.startswith(".")] \
        if ckpts.is_dir() else []
    return held + [n for n in ("summary.json", "peft_adapter", "best") if (out / n).exists()] + _exports(out)


def _exports(out: Path) -> list[str]:
    """The folders `unified-lora export` wrote into run folder `out` under their default names (peft_adapter-NAME,
    and merged-NAME of --merged): the previous run's, which `train --overwrite` deletes with its checkpoints."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith((EXPORT_PREFIX, MERGED_PREFIX)) and p.is_dir()
                  and not p.is_symlink()) if out.is_dir() else []


def _resume_changes(old, new) -> list[str]:
    def norm(key: str, v):
        if isinstance(v, dict):  # several data sets: their names and paths, in their order
            return [(k, norm(key, p)) for k, p in v.items()]
        if key in ("model", "data", "dev_data") and v is not None and Path(v).expanduser().exists():
            return str(Path(v).expanduser().resolve())
        return list(v) if isinstance(v, (list, tuple)) else v

    # metric_for_best: a run saved before it existed stored none; its best is ranked from its evaluations in the
    # metric given now (`Run.load_checkpoint`)
    return [f"{k}={getattr(old, k)!r} (now {getattr(new, k)!r})" for k in _RESUME_FIXED
            if norm(k, getattr(old, k)) != norm(k, getattr(new, k))
            and not (k == "metric_for_best" and getattr(old, k) is None)]


def _device_spec(args) -> object:
    """The --device a train run asks for (the flag, else its --config's `device`, else auto), before the config is
    read in full: under torchrun the process group, which a resume's checkpoint lookup needs, is built for it."""
    if args.device is not None:
        return args.device
    return _read_config(args.config).get("device", "auto") if args.config else "auto"


def cmd_train(args) -> int:
    """`unified-lora train`; under torchrun (WORLD_SIZE > 1) one of its processes (`_train`'s DDP)."""
    from .training import init_distributed, launched_processes

    if launched_processes() == 1:
        return _train(args, {})
    import gc

    import torch.distributed as dist

    init_distributed(_device_spec(args))
    held: dict = {}
    try:
        return _train(args, held)
    finally:
        # torchrun stops the other processes with SIGTERM once one has exited with an error (or 130/143 after a
        # signal): this one has done its part (its checkpoint is written), and goes on to exit with its own code
        if _main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # DDP's reducer must go before the process group: gloo's destructor under the last reference it holds can
        # deadlock at exit (README, Multi-GPU)
        if held.get("run") is not None:
            held["run"].ddp = None
        held.clear()
        gc.collect()
        dist.destroy_process_group()


def _train(args, held: dict) -> int:
    import torch

    from .data import TextDataset, glue_metrics
    from .plotting import plot_trace
    from .trace import read_trace
    from .training import (BEST, DivergedError, Run, TextCorpus, TrainConfig, UsageError, agree_max, best_metric,
                           check_precision, check_row_length, describe_schedule, detect_task_type, device_label,
                           encode_rows, evaluate_run, is_chat, iterate, load_data, load_model, lr_schedule, majority,
                           on_rank0, pick_metric, predict_run, process_rank, prune_step_checkpoints, record_best,
                           resolve_device, resolve_model, seed_everything, subsample, take_rows, world_size)

    t_start = time.perf_counter()
    world, main_process = world_size(), process_rank() == 0
    cfg, ckpt, user = _train_config(args)
    device = resolve_device(cfg.device)  # a device this machine lacks fails here, before anything is loaded
    check_precision(device, cfg.precision)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    say = _Console(quiet=not main_process)  # under torchrun process 0 alone prints (and writes console.txt)
    out = Path(cfg.output_dir)
    model_path = resolve_model(cfg.model, recorded=ckpt is not None)  # (a --resume: the run's own)
    task_type = detect_task_type(model_path, cfg.task_type)
    if task_type == "causal-lm" and cfg.label_column != TrainConfig.label_column and ckpt is None:
        # a label column named for a causal LM, which reads none: the labels were ignored without a word
        why = "--task-type causal-lm" if cfg.task_type == "causal-lm" else "the model is a causal LM"
        raise UsageError(f"--label-column {cfg.label_column}: labels are for a classifier, and this run trains a "
                         f"causal LM ({why}), which reads no labels; drop --label-column, or pass --task-type seq-cls "
                         "to train a classifier")
    tasks = None  # several data sets: a multi-task run (`multitask_train`), a TaskData each
    if cfg.tasks:
        from . import multitask_train as mt

        mt.refuse_unsupported(cfg, task_type)
        # (a resumed causal LM reads the columns it stored, as one data set does)
        tasks = mt.load_tasks(cfg, task_type, note=say, detect=ckpt is None)
        for t in tasks:  # (once every task has loaded: a task's error stands alone, as a one-task run's does)
            if isinstance(t.train, TextDataset):
                _note_label_classes(t.spec.data, cfg.label_column, t.train, t.spec.name)
        train = dev = None
        task = ", ".join(cfg.tasks)
        specs = [t.spec for t in tasks]
        cfg.metric_for_best = pick_metric(cfg.metric_for_best, mt.metric_names(specs), mt.average_name(specs))
    else:
        # a resumed run reads the columns it stored (a prompt/completion layout found at its start included)
        train, dev, task = load_data(cfg, task_type, note=say, detect=ckpt is None)
        if isinstance(train, TextDataset):  # (a classifier's rows)
            _note_label_classes(cfg.data, cfg.label_column, train)
        # the metric that ranks the dev evaluations, by name (the checkpoints record it): an unknown one fails here,
        # not at the first evaluation
        cfg.metric_for_best = best_metric(cfg, task_type, task)
    chat = is_chat(train)  # lists of messages, rendered with the tokenizer's chat template
    pairs = task_type == "causal-lm" and len(cfg.text_columns) == 2  # (prompt, completion): loss on the completion
    rows = tasks[0].train if tasks else train  # (a causal LM's tasks: every one in the same layout)
    # one text column of a table; a .txt corpus (a TextCorpus: a list of str too) is one stream cut into blocks, which
    # text_eos does not read (it was taken for text rows: --no-text-eos passed, ignored, and the console said an eos
    # ended each row)
    texts = (task_type == "causal-lm" and isinstance(rows, list) and bool(rows) and isinstance(rows[0], str)
             and not isinstance(rows, TextCorpus))
    # text_eos off where it does nothing is refused, but not on a resume: a run saved before the key existed reads as
    # off whatever its data (`LEGACY_CONFIG`), and a resume that changes it is refused anyway
    if not cfg.text_eos and not texts and ckpt is None:
        what = ("a classifier (seq-cls)" if task_type != "causal-lm" else
                "a plain-text corpus, which has an eos between documents" if isinstance(train, TextCorpus) else
                "chat data, which the chat template ends" if chat else
                "prompt/completion pairs, which an eos ends" if pairs else "data other than text rows")
        raise UsageError(f"--no-text-eos: for a causal LM's text rows (one text column of a .csv/.tsv/.jsonl table); "
                         f"this run trains on {what}")
    corpus_dev = isinstance(dev, TextCorpus)  # --dev-size counts its blocks, once it is cut into them
    dev = dev if corpus_dev or tasks else subsample(dev, cfg.dev_size, DEV_SUBSAMPLE_SEED)
    num_labels = train.num_labels if isinstance(train, TextDataset) else 0
    if tasks:  # each task's dev rows subsampled apart (--dev-size each); the head has the most classes of any task
        for t in tasks:  # (evaluated and the majority class scored on these rows: the full dev sets were evaluated)
            t.dev = subsample(t.dev, cfg.dev_size, DEV_SUBSAMPLE_SEED)
        num_labels = max((t.train.num_labels for t in tasks if isinstance(t.train, TextDataset)), default=0)
    seed_everything(cfg.seed)
    model, tok = load_model(model_path, task_type, max(num_labels, 2), note=say)
    model.to(device)
    if chat:
        if cfg.assistant_only_loss:
            on = ("the completion's" if pairs else "the") + " assistant turns only (--assistant-only-loss)"
        else:
            on = "the completion" if pairs else "every token of the conversation"
        say(f"chat rows ({', '.join(map(repr, cfg.text_columns))}), rendered with the tokenizer's chat template: the "
            f"loss is on {on}")
    elif pairs:
        prompt, completion = cfg.text_columns
        say(f"prompt/completion rows ({prompt!r}, {completion!r}): the loss is on the completion's tokens"
            + (" and the eos" if tok.eos_token_id is not None else
               "; the tokenizer has no eos token, so none ends a completion (the model is not taught to stop)"))
    elif isinstance(train, TextCorpus):
        say(f"a plain-text corpus: tokenised as one stream and cut into {cfg.max_length}-token blocks; the loss is on "
            "every token")
    elif texts:
        say(f"text rows ({cfg.text_columns[0]!r}): the loss is on every token" + (
            "; the tokenizer has no eos token, so none ends a row (the model is not taught to stop)"
            if tok.eos_token_id is None else " and the eos that ends each row (as TRL's SFTTrainer adds it)"
            if cfg.text_eos else "; no eos is added to a row (text_eos off), so the model is not taught to stop"))
    if tasks:
        enc_train, enc_devs = mt.encode_tasks(tok, tasks, cfg.max_length, task_type, cfg.text_eos, note=say)
        check_row_length(model, cfg.max_length, enc_train, *enc_devs)
    else:
        enc_train = encode_rows(tok, train, task_type, cfg.max_length, note=lambda m: say(f"train data: {m}"),
                                assistant_only=cfg.assistant_only_loss, text_eos=cfg.text_eos)
        enc_dev = encode_rows(tok, dev, task_type, cfg.max_length, note=lambda m: say(f"dev data: {m}"),
                              assistant_only=cfg.assistant_only_loss, text_eos=cfg.text_eos)
        check_row_length(model, cfg.max_length, enc_train, enc_dev)
    if corpus_dev:
        enc_dev = take_rows(enc_dev, cfg.dev_size, DEV_SUBSAMPLE_SEED)
    n_dev = sum(len(e["labels"]) for e in enc_devs) if tasks else len(enc_dev["labels"])
    n_rows = len(enc_train["labels"])
    # optimizer steps; under torchrun each step's global batch is batch_size rows on each of the processes
    per_epoch = math.ceil(math.ceil(n_rows / (cfg.batch_size * world)) / cfg.grad_accum)
    total = cfg.steps or cfg.epochs * per_epoch
    if ckpt is None:
        _calibrate_lm_loss(cfg, user, task_type, say, total)
        _note_calibration_target_unread(cfg, user, args.calibration_target is not None)
        _note_shock_in_calibration(cfg, say)
    if cfg.has_shock and cfg.shock_end > total:  # (with --steps TrainConfig checks it; with epochs only now)
        raise UsageError(f"shock_end: must be <= the run's {total} steps ({cfg.epochs} epoch(s) of {per_epoch}), got "
                         f"{cfg.shock_end}; the summary reported a shock on steps that never ran")
    lr_schedule(cfg, total)  # a warm-up longer than the run: refused now, before anything is written
    patience = cfg.early_stopping_patience
    if patience and not (per_epoch < total or 0 < cfg.eval_steps < total):
        raise UsageError(f"early_stopping_patience: {patience}, but this run evaluates on dev only at its end (step "
                         f"{total}), so it can never stop early; evaluate during it with --eval-steps N (N < {total}) "
                         "or train more than one epoch")
    held_outputs = on_rank0(lambda: _run_outputs(out)) if ckpt is None else []
    if held_outputs and not args.overwrite:
        raise UsageError(f"--output-dir {out}: holds a previous run ({', '.join(held_outputs)}); pass --resume to "
                         "continue it, --overwrite to replace it, or another --output-dir")
    trace_path = out / "trace.jsonl"
    # on resume the trace file keeps the steps before the checkpoint: ctrl.load_state_dict (in load_checkpoint)
    # drops the lines written after it, and a line cut off by a crash (TraceWriter.resume)
    if tasks:
        run = held["run"] = mt.MultiTaskRun(cfg, model, [t.spec for t in tasks], str(trace_path), print_fn=say,
                                            append_trace=ckpt is not None, total_steps=total)
        classes = run.classes
    else:
        classes = (train.label_names or [str(i) for i in range(num_labels)]) if num_labels else None
        run = held["run"] = Run(cfg, model, task_type, num_labels, str(trace_path), print_fn=say,
                                append_trace=ckpt is not None, classes=classes, chat=chat, total_steps=total)
    run.started = t_start

    def _clear_previous_run() -> None:
        # --overwrite, and every input checked (the model wrapped: target_modules and modules_to_save found): now the
        # previous run's outputs go. They went before Run, and a --target-modules that matched nothing deleted the
        # previous run and then failed. The trace stays: the new run's writer empties it at its first step.
        for name in (*_RUN_OUTPUTS, *(_exports(out) if held_outputs else ())):
            p = out / name
            if name != "trace.jsonl" and held_outputs:
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)

    on_rank0(_clear_previous_run)
    if ckpt is not None:
        run.load_checkpoint(ckpt, args.trust_checkpoint)
        finished = _finished_run(cfg, run, total, per_epoch, out, world)
        if finished:  # nothing to train: every file is left as it is (they were written again, wall_s grown)
            run.ctrl.close()
            say(finished)
            return 0
        on_rank0(lambda: say.continue_file(out / "console.txt",
                                           f"----- --resume at step {run.state.global_step} -----"))
        say(f"resumed from {ckpt} (step {run.state.global_step}, epoch {run.state.epoch})")
    say(f"unified-lora train: {_model_name(cfg.model, model_path)} ({task_type}) on {task}: {n_rows} train / {n_dev}"
        f" dev rows, {total} steps ({per_epoch}/epoch), controller={'on' if cfg.controller else 'off (fixed rank)'}"
        f", {run.n_trainable():,} trainable parameters at rank {run.ctrl.rank} ({MODES[run.ctrl.mode]})")  # (they
    # change with the mode: a resume in MULTI counted every task's blocks, unexplained beside the run's first line)
    # each task's rows trained on: encoding leaves out rows with nothing to predict (a causal LM's single-token text,
    # a prompt that fills --max-length), which the line counted (its note says how many, and why)
    trained = torch.bincount(enc_train["task"], minlength=len(tasks)).tolist() if tasks else []
    for t, e, n in zip(tasks or (), enc_devs if tasks else (), trained):
        left = f" (of its {len(t.train)}: {len(t.train) - n} left out, as said above)" if n != len(t.train) else ""
        own_dev = f" (dev {t.spec.dev_data})" if t.spec.dev_data else ""  # (a dev file given for it, e.g. in a mapping)
        say(f"task {t.spec.name}: {t.spec.data}{own_dev}, {n} train{left} / {len(e['labels'])} dev rows, " + (
            "its dev loss and perplexity over its target tokens" if task_type == "causal-lm" else
            f"{len(t.spec.classes)} classes {', '.join(t.spec.classes)}, scored by {mt.scoring(t.spec)}"))
    if tasks:
        say("multi-task mode: " + ("the tasks start on one shared adapter (SINGLE) and the controller splits them "
                                   "into an adapter each" if cfg.controller else "the controller is pinned in MULTI: "
                                   "an adapter per task from the start, never merged") + (
            "; each task's loss is its mean over its target tokens" if task_type == "causal-lm" else
            f"; the head ({run.num_labels} outputs, each task's loss on its own classes) " +
            ("has a LoRA delta per task" if run.head_target else "was not found (no Linear with that many outputs): "
             "no LoRA delta per task on it")
            + (" and trains in full (modules_to_save)" if run.head_target and run.model.get_submodule(
                run.head_target).base_layer.weight.requires_grad else "")))
    accum = (f", {cfg.grad_accum} batches of {cfg.batch_size} per step ({cfg.grad_accum * cfg.batch_size} rows)"
             if cfg.grad_accum > 1 else "")
    say(f"device: {device_label(device)}, precision {cfg.precision}{accum}")
    if run.schedule["lr_scheduler"] != "constant":  # (a constant LR: the console as before schedules)
        say(f"LR schedule: {describe_schedule(run.schedule)}; the mode's LR x its factor at each optimizer step")
    if world > 1:
        import torch.distributed as dist

        say(f"DDP: {world} processes ({dist.get_backend()}), --batch-size {cfg.batch_size} rows on each: "
            f"{world * cfg.batch_size * cfg.grad_accum} rows per optimizer step")
    ckpt_root = out / "checkpoints"
    stop: dict = {"signal": None}
    last_save: dict = {"step": None, "path": None}

    def _on_signal(signum, frame):
        if stop["signal"] is not None:
            if signum == signal.SIGINT and not stop.get("aborted"):  # a second Ctrl-C: stop now (a third, while the
                stop["aborted"] = True  # abort writes console.txt, is not another: it cut that write off)
                raise KeyboardInterrupt
            return  # SIGTERM again (a scheduler may send it more than once): the checkpoint under way is written
        stop["signal"] = signum
        if signum == signal.SIGINT:
            say("interrupt: finishing this step, then saving a resumable checkpoint (Ctrl-C again to abort)")
        else:  # a scheduler's notice before SIGKILL (Slurm --signal, a Kubernetes grace period, preemption)
            say("SIGTERM: finishing this step, then saving a resumable checkpoint")

    def _save(tag: str) -> Path:
        path = run.save_checkpoint(ckpt_root, tag)  # + PEFT format if cfg.peft_every_checkpoint (DDP: process 0)
        last_save.update(step=run.state.global_step, path=path)
        if tag.startswith("step-"):  # only now, with the new one complete, do the oldest step-N ones beyond K go
            on_rank0(lambda: prune_step_checkpoints(ckpt_root, cfg.save_total_limit))
        return path

    def _mid_epoch() -> float:  # the run's position in epochs, inside one
        return run.state.epoch + run.state.step_in_epoch / per_epoch

    final_preds: dict = {}  # the last evaluation's predicted class of each dev row, and its step (a classifier's)

    def _evaluate(epoch_at: float, label: str) -> None:
        """A dev evaluation now (under torchrun: every process, each on its share of the rows, `evaluate_run`),
        recorded in the run's state (checkpoints, summary) and printed. The model goes back to training mode, and no
        random number is drawn: a run trains to the same weights with or without evaluations in between. It is
        ranked against the best so far (`record_best`), and with --save-best a new best is saved as best/, a whole
        checkpoint (a collective, as every save: the metrics are the same on every process, `evaluate_run`, so every
        process decides alike)."""
        if tasks:
            m, per_task = run.evaluate(enc_devs)
        elif task_type == "seq-cls":  # (its predictions kept for the summary's per-row record: `compare`'s row tests)
            preds = predict_run(run, enc_dev)
            m = glue_metrics(task, preds, enc_dev["labels"].numpy())
            final_preds.update(step=run.state.global_step, preds=preds)
        else:
            m = evaluate_run(run, enc_dev, task)
        e = {"epoch": epoch_at, "step": run.state.global_step, **m}
        run.state.evals.append(e)
        better = record_best(run.state, e, cfg.metric_for_best, cfg.early_stopping_threshold)
        if tasks:
            for name, tm in per_task.items():
                say(f"{label} @ step {run.state.global_step}: dev {name}: {_fmt_metrics(tm)}")
            avg = mt.average_name(run.specs)
            say(f"{label} @ step {run.state.global_step}: dev average of the tasks' "
                f"{'losses' if avg == mt.AVERAGE_LOSS else 'primary metrics'} ({avg}): {m[avg]:.3f}")
        else:
            say(f"{label} @ step {run.state.global_step}: dev {_fmt_metrics(m)}")
        if better and cfg.save_best:
            path = run.save_checkpoint(out, BEST, peft_export=True)
            say(f"new best dev {cfg.metric_for_best}={e[cfg.metric_for_best]:.4g}: saved {path}")
        if patience and run.state.evals_without_improvement:
            b = run.state.best
            on = f" on the best, {_eval_point(b)}'s {b['value']:.4g}" if b else ""
            say(f"no improvement of dev {cfg.metric_for_best} by more than {cfg.early_stopping_threshold:g}{on}: "
                f"{run.state.evals_without_improvement} of {patience} evaluation{'' if patience == 1 else 's'} in a row "
                "(--early-stopping-patience)")

    def _patience_spent() -> bool:
        return bool(patience) and run.state.evals_without_improvement >= patience

    handled = (signal.SIGINT, signal.SIGTERM)
    old_handlers = {s: signal.signal(s, _on_signal) for s in handled} if _main_thread() else {}
    bar = _bar(total, run.state.global_step, desc="train", disable=not main_process)
    epochs_limit = cfg.epochs if not cfg.steps else 10**9
    resumed_at = run.state.global_step if ckpt is not None else None
    # a run resumed from the checkpoint where it stopped early (its patience unchanged) trains no further
    stop_early = _patience_spent()
    try:
        for epoch, batch in (() if stop_early else iterate(run, enc_train, total, epochs_limit, per_epoch)):
            if batch is None:  # end of an epoch: evaluate, checkpoint
                _evaluate(epoch + 1, f"epoch {epoch + 1}")
                _save(f"epoch-{epoch + 1}")
            else:
                loss = run.train_step(batch)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", phi=f"{run.ctrl.phi:.3f}", mode=run.ctrl.mode, refresh=False)
                # --eval-steps, then --save-steps (its checkpoint holds this step's evaluation: a resume neither
                # repeats nor loses it); a step that ends an epoch or the run is evaluated and saved after the loop
                # or at the epoch's end, once
                inside = run.state.step_in_epoch < per_epoch and run.state.global_step < total
                if cfg.eval_steps and run.state.global_step % cfg.eval_steps == 0 and inside:
                    at = _mid_epoch()
                    _evaluate(at, f"epoch {_epoch_fraction(at)}")
                if cfg.save_steps and run.state.global_step % cfg.save_steps == 0 and inside:
                    _save(f"step-{run.state.global_step}")
            if _patience_spent():  # (the same on every process: the metrics are)
                stop_early = True
                break
            # under torchrun each process gets the signal (torchrun passes it on) at its own point in a step: they
            # stop together, after the first step that ended with it on any process (SIGTERM's number, if both). (A
            # signal that lands during this all-reduce is in the next one: the handler's flag is never overwritten.)
            agreed = agree_max(stop["signal"] or 0)
            if agreed:
                if stop["signal"] is None:
                    say(f"{signal.Signals(agreed).name} on another process: saving a resumable checkpoint")
                stop["signal"] = agreed
                break
        bar.close()
        if stop["signal"] is not None:  # (the handlers stay: a repeated SIGTERM must not kill this save)
            path = (last_save["path"] if last_save["step"] == run.state.global_step else
                    _save(f"step-{run.state.global_step}"))
            run.ctrl.close()
            # quoted: a folder name with a space made the printed command resume another (missing) folder
            say(f"saved {path}; continue with: {_resume_command(out, world)}")
            on_rank0(lambda: say.save(out / "console.txt"))
            return 128 + stop["signal"]  # 130 after Ctrl-C, 143 after SIGTERM, as a shell reports those signals
    except KeyboardInterrupt:  # (a checkpoint save it cut off removed its temporary folder: `Run.save_checkpoint`)
        stop["aborted"] = True
        bar.close()
        run.ctrl.close()
        say(f"aborted; the last complete checkpoint is kept under {ckpt_root}")
        # this session's lines too (it left no console.txt, or the earlier sessions' alone); not `on_rank0`, a
        # collective: under torchrun the other processes are anywhere in their step
        if main_process:
            say.save(out / "console.txt")
        return 130
    except DivergedError:  # the skipped steps left the weights as they were: worth a checkpoint to resume from
        bar.close()
        path = _save(f"step-{run.state.global_step}")
        run.ctrl.close()
        say(f"stopped at step {run.state.global_step}: {run.state.nonfinite_in_a_row} steps in a row with a non-finite "
            f"loss or gradient; saved {path}; once the cause is fixed, continue with: {_resume_command(out, world)} "
            "--lrs ...")
        on_rank0(lambda: say.save(out / "console.txt"))
        raise  # main: the one-line error, exit code 1
    finally:
        for s, h in old_handlers.items():
            if h is not None:  # None: a handler not installed from Python, which cannot be put back
                signal.signal(s, h)
    # early stopping ends a run that had steps left (patience spent at its last evaluation ends it as planned)
    stopped_early = stop_early and run.state.global_step < total and run.state.epoch < epochs_limit
    if stopped_early:
        b = run.state.best
        on = f" on the best, {_eval_point(b)}'s {b['value']:.4g}," if b else ""  # (None: every value was NaN)
        say(f"early stopping at step {run.state.global_step} of {total}: dev {cfg.metric_for_best} has not improved"
            f"{on} by more than {cfg.early_stopping_threshold:g} in {run.state.evals_without_improvement} "
            f"evaluation{'' if run.state.evals_without_improvement == 1 else 's'} in a row (--early-stopping-patience "
            f"{patience})")
        if run.state.global_step not in (last_save["step"], resumed_at):  # evaluated inside an epoch: saved now
            _save(f"step-{run.state.global_step}")
    elif not run.state.evals or run.state.evals[-1]["step"] != run.state.global_step:  # --steps ended mid-epoch
        _evaluate(_mid_epoch(), "final")
        _save(f"step-{run.state.global_step}")
    run.ctrl.close()

    def _outputs() -> int:  # (under torchrun: process 0 alone)
        from dataclasses import asdict

        peft_note = run.export_peft_to(out / "peft_adapter")
        say(peft_note or f"PEFT adapter{' of each task, in a folder each' if tasks else ''} (rank {run.ctrl.rank}): "
                         f"{out / 'peft_adapter'} (loads with peft.PeftModel.from_pretrained(base_model, path"
                         f"{'/TASK' if tasks else ''}))")
        trace = read_trace(trace_path)
        # the majority class on the dev rows: flat over the tasks of a multi-task run, and each task's own
        maj, maj_task = mt.majority(tasks) if tasks else (majority(train, dev, task), {})
        summary = {
            **_train_summary(cfg, trace, run.state.evals, run.state.global_step, run.schedule, out),
            "stopped_early": stopped_early,
            "model": model_path, "task_type": task_type, "task": task, "classes": classes,
            "device": device_label(device), "precision": cfg.precision, "skipped_steps": run.state.skipped_steps,
            "world_size": world, "rows_per_step": world * cfg.batch_size * cfg.grad_accum,
            "majority": maj,
            **({"tasks": [{**asdict(t.spec), "num_labels": len(t.spec.classes), "train_rows": n,
                           "dev_rows": len(e["labels"]), "majority": maj_task[t.spec.name]}
                          for t, e, n in zip(tasks, enc_devs, trained)]} if tasks else {}),
            "checkpoints": sorted(p.name for p in ckpt_root.iterdir() if not p.name.startswith(".")),
            "peft_adapter": None if peft_note else str(out / "peft_adapter"),
            # a resumed run's total, over every session (it was this session's alone: "total wall time: 3 s" for a
            # run of hours resumed near its end)
            "wall_s": run.wall_s(),
            **({"wall_s_session": time.perf_counter() - t_start} if ckpt is not None else {}),
            # the settings a --resume changed, from the step it went on from (`RunState.resumes`): `config` holds the
            # last ones, which the steps before that did not train with
            **({"resumes": run.state.resumes} if run.state.resumes else {}),
        }
        summary["arms"]["run"]["skipped_steps"] = run.state.skipped_steps  # (report prints it per arm, as for a demo)
        if final_preds.get("step") == run.state.global_step:  # the final evaluation ran in this session: its rows
            # (as the demo records them: `compare` tests two single runs on the rows they predict differently)
            summary.update(dev_rows=len(enc_dev["labels"]), dev_labels=_label_string(enc_dev["labels"].numpy()))
            summary["arms"]["run"]["final_preds"] = _label_string(final_preds["preds"])
        write_text_atomically(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        # no plot without a step to draw: a --resume that trained none, its trace moved aside (as the error on a
        # damaged one advises); the outputs line named plot.png all the same (or the previous session's)
        plot = plot_trace(trace, out / "plot.png", theta0=cfg.theta0, theta1=cfg.theta1,
                          shock=(cfg.shock_start, cfg.shock_end) if cfg.has_shock else None) if trace else None
        say(format_summary(summary))
        if plot is None:
            say(f"no plot: {trace_path} holds no step (this session trained none)")
        say("outputs: " + ", ".join(map(str, (trace_path, out / "summary.json", *([plot] if plot else []), ckpt_root,
                                              out / "console.txt"))))
        say.save(out / "console.txt")
        if peft_note and peft_note.startswith("PEFT export failed"):  # trained and saved, but no PEFT adapter: say it
            print(f"{PROG}: {peft_note} (the run and its checkpoints are complete; exit code 3)", file=sys.stderr)
            return 3
        return 0

    return on_rank0(_outputs)


def _finished_run(cfg, run, total: int, per_epoch: int, out: Path, world: int) -> str | None:
    """The line a `--resume` prints where the run it loaded (`run`, at its checkpoint) has nothing left to do: no step
    left to train (its `total` steps or its epochs done, or its early-stopping patience spent), its last evaluation
    at its last step and its summary.json written for that step. Such a resume trained nothing, but wrote the
    adapter, the plot and summary.json again, added its own time to the run's wall time (each no-op resume grew it)
    and dropped the summary's per-row dev predictions (recorded only where the final evaluation ran in the session);
    now it leaves every file as it is and says how to train further. None: something to do (steps
    left; the final evaluation, which a Ctrl-C in the last step left undone; or the outputs, which a kill after the
    last checkpoint left unwritten), which the resume does as before."""
    st = run.state
    epochs_limit = cfg.epochs if not cfg.steps else 10**9
    patience = cfg.early_stopping_patience
    length_done = st.global_step >= total or st.epoch >= epochs_limit
    spent = bool(patience) and st.evals_without_improvement >= patience
    if not (length_done or spent) or not st.evals or st.evals[-1]["step"] != st.global_step:
        return None

    def summarised() -> bool:
        try:
            summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none, or damaged: the resume writes it
            return False
        return isinstance(summary, dict) and summary.get("command") == "train" and \
            summary.get("steps") == st.global_step

    from .training import needs_total, on_rank0

    if not on_rank0(summarised):
        return None
    resume = _resume_command(out, world)
    if length_done:
        length = f"--steps {cfg.steps}" if cfg.steps else \
            f"{cfg.epochs} epoch{'' if cfg.epochs == 1 else 's'} of {per_epoch} steps"
        why = f"step {st.global_step} ({length})"
        if needs_total(run.schedule) or cfg.warmup_ratio:  # (`Run._resume_schedule` refuses another length)
            how = (f"its LR schedule ({cfg.lr_scheduler}" + (f", --warmup-ratio {cfg.warmup_ratio:g}" if
                                                             cfg.warmup_ratio else "")
                   + f") spans its {total} steps, so a resume cannot lengthen it (the LR would jump): to train "
                   "further, start a new run in another --output-dir")
        elif cfg.steps:
            how = f"to train further, give it more steps: {resume} --steps M (M > {st.global_step})"
        else:
            how = f"to train further, give it more epochs: {resume} --epochs {cfg.epochs + 1}"
    else:
        n = st.evals_without_improvement
        why = (f"step {st.global_step}, stopped early: {n} evaluation{'' if n == 1 else 's'} in a row without "
               f"improving dev {cfg.metric_for_best} (--early-stopping-patience {patience})")
        how = f"to train on: {resume} --early-stopping-patience 0 (no early stopping), or a larger patience"
    return (f"{PROG} train: the run in {out} is finished at {why}, evaluated, saved and summarised; this --resume "
            f"has nothing to train and leaves its files as they are; {how}")


def _resume_command(out: Path, world: int) -> str:
    """The command that continues a run in `out` (quoted: a folder name with a space made the printed command resume
    another, missing, folder); under torchrun, with as many processes."""
    per_node = os.environ.get("LOCAL_WORLD_SIZE", str(world))
    launch = PROG if world == 1 else (f"torchrun --nproc-per-node {world} $(which {PROG})" if per_node == str(world)
                                      else f"torchrun ({world} processes, as now) $(which {PROG})")
    return f"{launch} train --output-dir {shlex.quote(str(out))} --resume"


def _train_summary(cfg, trace: list[dict], evals: list[dict], steps: int, schedule: dict, run_dir: Path) -> dict:
    """What a train run's summary says about its settings, its LR schedule (`lr_schedule`), dev evaluations and trace
    (`cmd_train`, and `report` / `plot` of a run that has not written one for its last steps, from the checkpoint
    `--resume` goes on from). `run_dir`: the run's folder as given now (its best/; `cfg.output_dir` is as the run was
    given it, relative to that run's working directory, or moved since)."""
    from .training import (BEST, conflict_summary, held_merges, lower_is_better, phi_summary, replay_best,
                           transitions)

    trans = transitions(trace)
    conflict = conflict_summary(trace)  # (a multi-task run's; none for one task)
    held = held_merges(trace)  # (the same)
    points = {_eval_point(e): {k: v for k, v in e.items() if k not in ("epoch", "step")} for e in evals}
    # the best evaluation, as the run ranked it (`record_best`; a run saved before metric_for_best existed has none)
    b = replay_best(evals, cfg.metric_for_best).best if cfg.metric_for_best else None
    folder = Path(run_dir) / BEST
    best = None if b is None else {
        "point": _eval_point(b), "step": b["step"], "metric": b["metric"], "value": b["value"],
        "greater_is_better": not lower_is_better(b["metric"]),
        "checkpoint": str(folder) if cfg.save_best and (folder / "state.pt").is_file() else None}
    return {
        "command": "train", "model": cfg.model, "data": cfg.data or "shipped GLUE MRPC", "steps": steps,
        "epochs": cfg.epochs, "config": _jsonable(cfg.__dict__), "lr_schedule": schedule, "best": best,
        "shock": ({"type": cfg.shock_type, "start": cfg.shock_start, "end": cfg.shock_end} if cfg.has_shock else None),
        "loss_scale": _loss_scale_record(cfg, trace), "eval_points": list(points),
        "drift_threshold": cfg.drift_threshold, "theta0": cfg.theta0, "theta1": cfg.theta1,
        "arms": {"run": {"label": "Unified LoRA" if cfg.controller else "LoRA (fixed rank)",
                         "controller": cfg.controller, "eval": points,
                         "phi": phi_summary(trace, cfg.shock_start, cfg.shock_end) if trace else {},
                         "transitions": trans,
                         "mirror": [t for t in trans if t.get("snapshot") in ("restored", "kept")],
                         **({"conflict": conflict} if conflict else {}),
                         **({"held_merges": held} if held else {})}},
    }


def _epoch_fraction(epoch: float) -> str:
    """A position inside an epoch, in epochs, cut (not rounded) to 2 decimals, or more where 2 would read as a whole
    epoch: 0.995 reads 0.99 and 1.0007 (step 1500 of 1499-step epochs) 1.0007, never the `1` of the epoch's end."""
    for d in range(2, 10):
        cut = math.floor(epoch * 10 ** d + 1e-9) / 10 ** d
        if not cut.is_integer():
            break
    return f"{cut:.{d}f}".rstrip("0").rstrip(".")


def _eval_point(e: dict) -> str:
    """A dev evaluation's name in the summary: `epoch 2` at an epoch's end; inside an epoch (--eval-steps, a --steps
    run's end) its position and its step, which makes it unique however many steps an epoch has:
    `epoch 0.75 (step 6)`. (It was `epoch 0.333333` with 6 digits, which two steps of a long epoch could share.)"""
    x = float(e["epoch"])
    return f"epoch {int(x)}" if x.is_integer() else f"epoch {_epoch_fraction(x)} (step {e['step']})"


def _unfinished_train_summary(run_dir: Path, summary: dict | None) -> dict | None:
    """The summary of a train run whose summary.json is missing or older than its newest checkpoint: a run
    interrupted by Ctrl-C, or resumed (`--resume --epochs 3`) and not finished. Built from that checkpoint's
    settings and dev evaluations and from trace.jsonl. Without it, `report` showed no model, data, shock or dev
    scores ("φ pre-shock" was step 0's φ), or the finished first part's summary as if it were the whole run, and
    `plot` drew the v1 thresholds and no shock window instead of the run's. None: summary.json is current, or the
    folder holds no checkpoint (a demo)."""
    from .training import TrainConfig, read_state, resume_checkpoint

    # the checkpoint --resume goes on from: best/ where a kill after a new best left it newer than checkpoints/'s
    # newest (the summary of that older one named an older best, and "its checkpoint" best/, which holds another)
    ckpt = resume_checkpoint(run_dir, settle=False)  # read only: the run may be saving now
    if ckpt is None:
        return None
    st = read_state(ckpt)  # weights_only, as every other read of a checkpoint: a run folder may come from elsewhere
    step = st["run"]["global_step"]
    if summary is not None and (summary.get("command") != "train" or summary.get("steps", 0) >= step):
        return None
    trace = _load_trace(run_dir / "trace.jsonl") if (run_dir / "trace.jsonl").is_file() else []
    steps = max(step, len(trace))
    cfg = TrainConfig.from_dict(st["config"])
    out = _train_summary(cfg, trace, st["run"]["evals"], steps, st["lr_schedule"], run_dir)
    out["command"] = "train (unfinished)"
    # the steps it was set to train (its LR schedule's length; a checkpoint saved before that was recorded: --steps)
    out["planned_steps"] = st["lr_schedule"].get("total_steps") or cfg.steps or None
    if cfg.model is None:  # the bundled MiniLM: named by its path, as a finished run's summary names it (not None)
        from .data import default_model_path

        out["model"] = default_model_path()
    out["classes"] = st.get("classes")
    if st.get("tasks"):  # a multi-task run: its tasks' lines
        out["tasks"] = st["tasks"]
    out["dev_note"] = (f"no summary.json for step {summary['steps']} on: " if summary is not None else
                       "no summary.json: ") + (
        f"summarised from the newest checkpoint, {ckpt.name} (step {step}), and trace.jsonl ({len(trace)} steps); "
        f"continue with: {PROG} train --output-dir {shlex.quote(str(run_dir))} --resume")
    return out


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


# ----------------------------------------------------------------------------- plot / report


def _read_run_summary(directory: Path) -> dict | None:
    p = directory / "summary.json"
    if not p.is_file():
        return None
    from .training import UsageError

    # (a ValueError naming the file where it is not UTF-8 JSON: it was a bare "'utf-8' codec can't decode byte")
    summary = read_json_file(p, "re-run the command that wrote it, or delete it (report and plot then summarise a "
                                "train run from its newest checkpoint and trace.jsonl, a demo from its trace)")
    if not isinstance(summary, dict) or "command" not in summary or not isinstance(summary.get("arms", {}), dict):
        raise UsageError(f"{p}: not the summary.json of a unified-lora demo or train run")
    return summary


def _load_trace(path: Path) -> list[dict]:
    from .trace import torn_json
    from .training import UsageError

    if not path.is_file():
        raise UsageError(f"{path}: no such trace file; pass the trace.jsonl a run wrote (or the run folder)")
    trace = []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            trace.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) and not line.endswith("\n") and torn_json(line):  # the last line, cut off by a kill
                continue  # (as --resume drops it)
            raise UsageError(f"{path}: line {n} is not JSON; is this a unified-lora trace.jsonl?") from None
    if not trace:
        raise UsageError(f"{path}: trace is empty; the run recorded no steps")
    if not all(isinstance(r, dict) and {"step", "phi", "mode", "rank"} <= set(r) for r in trace):
        raise UsageError(f"{path}: records lack step/phi/mode/rank; is this a unified-lora trace.jsonl?")
    return trace


def cmd_plot(args) -> int:
    from .plotting import plot_trace

    path = Path(args.trace)
    if path.is_dir():
        path = path / "trace.jsonl"
    trace = _load_trace(path)
    summary = _read_run_summary(path.parent)
    summary = _unfinished_train_summary(path.parent, summary) or summary or {}
    shock = tuple(args.shock) if args.shock else None
    if shock is None and summary.get("shock"):
        shock = (summary["shock"]["start"], summary["shock"]["end"])
    base_path = path.parent / "baseline_trace.jsonl"
    baseline = _load_trace(base_path) if base_path.is_file() and path.name == "trace.jsonl" else None
    out = args.output or str(path.with_suffix(".png"))
    # a flag given on the command line wins, as --shock does; else the run's own thresholds, else the v1 ones
    theta0 = args.theta0 if args.theta0 is not None else summary.get("theta0", 0.3)
    theta1 = args.theta1 if args.theta1 is not None else summary.get("theta1", 0.7)
    print(plot_trace(trace, out, theta0=theta0, theta1=theta1, shock=shock, baseline=baseline))  # "-o phi": phi.png
    return 0


def cmd_report(args) -> int:
    from .training import conflict_summary, held_merges, phi_summary, transition_line, transitions

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        from .training import UsageError

        raise UsageError(f"{run_dir}: no such run folder; pass the --output-dir of a demo or train run")
    summary = _read_run_summary(run_dir)
    summary = _unfinished_train_summary(run_dir, summary) or summary
    if summary is None:  # an interrupted demo: summarise from the trace alone
        trace = _load_trace(run_dir / "trace.jsonl")
        summary = {"command": "run (no summary.json; from trace.jsonl)", "steps": len(trace),
                   "arms": {"run": {"label": "run", "phi": phi_summary(trace, 0, 0), "transitions": transitions(trace),
                                    "mirror": [t for t in transitions(trace)
                                               if t.get("snapshot") in ("restored", "kept")], "eval": {},
                                    "conflict": conflict_summary(trace), "held_merges": held_merges(trace)}}}
    elif summary.get("tasks") and "run" in summary.get("arms", {}) and \
            not _conflict_by_mode(summary["arms"]["run"].get("conflict")) and (run_dir / "trace.jsonl").is_file():
        # a multi-task run's summary.json written before it had its conflict (and ρ) by mode and its held merges
        trace = _load_trace(run_dir / "trace.jsonl")
        summary["arms"]["run"].update(conflict=conflict_summary(trace), held_merges=held_merges(trace))
    print(format_summary(summary))
    for name, arm in summary.get("arms", {}).items():
        if arm.get("transitions"):
            print(f"transitions ({arm.get('label', name)}):")
            for t in arm["transitions"]:
                print(f"  {transition_line(t)}")
    return 0


def cmd_compare(args) -> int:
    from ._files import make_folder
    from .compare import compare_runs, format_comparison, jsonable
    from .training import UsageError

    out = Path(args.json) if args.json else None
    if out is not None and out.is_dir():  # (refused first: the table was printed, then the write failed)
        raise UsageError(f"--json {args.json}: is a folder; name the file to write")
    res = compare_runs(args.runs, args.vs, at=args.at)
    print(format_comparison(res))
    if out is not None:
        make_folder(out.parent)  # (as predict's --output: its folder is made if missing)
        write_text_atomically(out, json.dumps(jsonable(res), indent=1, allow_nan=False) + "\n")
        print(f"written: {args.json}")
    return 0


# ----------------------------------------------------------------------------- predict


def cmd_predict(args) -> int:
    from . import inference
    from .training import UsageError, device_label

    # generation's flags, as given (None: not given), then their defaults: a classifier run, or a causal LM's --data
    # scoring, refuses them rather than ignoring them
    generation = {flag: value for flag, value in (("--max-new-tokens", args.max_new_tokens),
                                                  ("--temperature", args.temperature), ("--top-p", args.top_p),
                                                  ("--seed", args.seed)) if value is not None}
    for name, default in (("max_new_tokens", 64), ("temperature", 0.0), ("top_p", 1.0), ("seed", 0)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    for flag, value, ok, why in (
            ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
            ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, ">= 1"),
            ("--temperature", args.temperature, math.isfinite(args.temperature) and args.temperature >= 0,
             ">= 0 (0 = greedy)"),
            ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]")):
        if not ok:
            raise UsageError(f"{flag} {value}: must be {why}")
    if args.data is not None and args.prompts is not None:
        raise UsageError("--data and --prompts: pass one (--data: rows to classify, or a causal LM's text to score; "
                         "--prompts: prompts to complete)")
    for flag, given in (("--data", args.data), ("--prompts", args.prompts)):  # a folder, or no such file: refused
        if given is not None:                                                 # before the checkpoint loads
            inference._input_file(given, flag)

    def check(task_type: str) -> None:  # the run's task type against the flags, before its model is loaded
        if task_type != "causal-lm" and args.data is None:
            raise UsageError(f"{args.run_dir} is a classifier (seq-cls) run: pass --data FILE, the rows to classify"
                             + (" (--prompts is for a causal LM)" if args.prompts is not None else ""))
        if task_type == "causal-lm" and args.data is None and args.prompts is None:
            raise UsageError(f"{args.run_dir} is a causal-LM run: pass --prompts FILE to generate completions, or "
                             "--data FILE to score a text (loss, perplexity)")
        if task_type == "causal-lm" and args.data is not None and args.output is not None:
            raise UsageError("--output: scoring a causal LM's --data writes no file (it prints the loss and "
                             "perplexity); --output is for --prompts")
        if generation and args.prompts is None:  # (a classifier, or a causal LM scoring --data: nothing generated)
            raise UsageError(f"{', '.join(generation)}: generation settings, for a causal LM's --prompts; "
                             + (f"{args.run_dir} is a classifier (seq-cls) run" if task_type != "causal-lm"
                                else "--data is scored, not completed"))
        if task_type != "causal-lm" and args.prompt_column is not None:
            raise UsageError("--prompt-column: a classifier reads the run's text columns; it is for a causal LM's "
                             "--prompts table")

    trained = inference.load_trained(args.run_dir, args.checkpoint, args.device, args.precision,
                                     args.trust_checkpoint, task_check=check, task=args.task)
    print(f"checkpoint {trained.checkpoint} (step {trained.step}): {trained.task_type}, rank {trained.rank} "
          f"({trained.mode}, the controller's at that checkpoint), on {device_label(trained.run.device)}, precision "
          f"{trained.cfg.precision}")
    if trained.task_type == "causal-lm" and args.data is not None:
        m = inference.perplexity(trained, args.data, args.batch_size, note=lambda msg: print(f"--data: {msg}"))
        print(f"{args.data}: {_fmt_metrics(m)}")
        return 0
    if trained.task_type == "causal-lm":
        prompts = inference.read_prompts(trained, args.prompts, args.prompt_column, args.id_column,
                                         note=lambda msg: print(f"--prompts: {msg}"))
        source = Path(args.prompts).expanduser()
        out = inference.output_path(args.run_dir, args.output, source, prompts.fmt, trained.route)
        ids = inference.encode_prompts(trained.tokenizer, prompts.texts, corpus=inference.corpus_run(trained.cfg),
                                       chat=trained.chat)
        # chat prompts: a run's on chat data (a text prompt sent as a user message), or conversations
        chat = trained.chat or not all(isinstance(t, str) for t in prompts.texts)
        if chat:
            wrapped = trained.chat and any(isinstance(t, str) for t in prompts.texts)
            tok = trained.tokenizer
            eot = inference.end_of_turn(tok)
            if not eot:
                stops = "no end-of-turn token was found in the chat template (generation stops as for a text prompt)"
            elif eot[0] in inference.stop_tokens(trained.model, tok):  # (the eos ends the turn: no other stop)
                which = ("the tokenizer's eos" if eot[0] == tok.eos_token_id else
                         "an eos of the model's generation config")
                stops = (f"the template's end of turn {tok.convert_ids_to_tokens(eot[0])} is {which}, where "
                         "generation stops for any prompt")
            else:
                stops = f"generation also stops at the template's end of turn {tok.convert_ids_to_tokens(eot[0])}"
            print(f"chat prompts: {'a chat run: a text prompt is sent as a user message, ' if wrapped else ''}rendered "
                  f"with the tokenizer's chat template and the generation prompt; {stops}")
        done = inference.generate(trained, ids, args.max_new_tokens, args.batch_size, args.temperature, args.top_p,
                                  args.seed, chat=chat)
        rows = [{**({prompts.id_name: prompts.ids[i]} if prompts.ids is not None else {}), "prompt": text,
                 "completion": completion, "stop": stop} for i, (text, (completion, stop)) in
                enumerate(zip(prompts.texts, done))]
        inference.write_rows(out, rows)
        how = (f"sampled at temperature {args.temperature:g}, top-p {args.top_p:g}, seed {args.seed}"
               if args.temperature > 0 else "greedy")
        skipped = f" ({prompts.skipped} blank line(s) skipped)" if prompts.skipped else ""
        print(f"{len(rows)} completion(s) of {args.prompts}{skipped}, {how}, at most {args.max_new_tokens} new "
              f"tokens: {out}")
        return 0
    rows = inference.read_rows(trained, args.data, args.id_column)
    source = Path(args.data).expanduser()
    out = inference.output_path(args.run_dir, args.output, source, rows.fmt, trained.route)
    preds, metrics = inference.classify(trained, rows, args.batch_size)
    inference.write_rows(out, preds)
    # the classes as items, as report prints them (it printed a Python list: ['neg', 'pos'])
    print(f"{len(preds)} row(s) of {args.data} classified into {', '.join(map(str, trained.classes or []))}: {out}")
    label = trained.cfg.label_column
    if metrics is not None:
        n = rows.scored
        print(f"labelled rows ({n if n == len(preds) else f'{n} of {len(preds)}'}, task {trained.route or trained.task}): "
              f"{_fmt_metrics(metrics)}")
        if n < len(preds):
            print(f"{len(preds) - n} row(s) without a label in column {label!r}: predicted, not scored")
    elif rows.label_column is not None:  # the column is there, and empty in every row (a test split's blank labels)
        print(f"no score: column {label!r} is empty in every row (no label to score against); the rows are predicted "
              "only")
    else:
        what = "a GLUE test.tsv has no labels" if trained.glue is not None else \
            f"{args.data} has no column {label!r} (the run's label column)"
        print(f"no score: {what}; the rows are predicted only")
    return 0


# ----------------------------------------------------------------------------- export


def _run_and_checkpoint_args(p: argparse.ArgumentParser, default_note: str) -> None:
    """`predict`'s and `export`'s RUN and --checkpoint."""
    p.add_argument("run_dir", help="the --output-dir of a train run")
    p.add_argument("--checkpoint", help="a checkpoint of the run by name (epoch-1, step-40, best: the best "
                   "evaluation's, of train --save-best; latest: the newest) or a checkpoint folder (default: the "
                   f"newest under checkpoints/{default_note})")


def cmd_export(args) -> int:
    """`unified-lora export RUN`: a checkpoint's adapter in PEFT format, as `train` writes `peft_adapter/` at its end
    (`export_peft_to`), from the checkpoint loaded as `predict` loads it (`inference.load_trained`). With --merged: the
    base model with the adapter folded in, a plain transformers model folder (`inference.write_merged`)."""
    from . import inference
    from ._files import left_by_dead_process
    from .training import BEST, UsageError, resolve_model

    merged = args.merged
    if args.dtype is not None and not merged:
        raise UsageError(f"--dtype {args.dtype}: the dtype of a --merged model's weights; an adapter is written in the "
                         "dtype it trained in. Pass --merged, or leave --dtype out")
    run = Path(args.run_dir)
    ckpt = inference.find_checkpoint(run, args.checkpoint)  # (its errors: not a run, no such checkpoint, and which are)
    default = f"{MERGED_PREFIX}{ckpt.name}{f'-{args.task}' if args.task else ''}" if merged \
        else f"{EXPORT_PREFIX}{ckpt.name}"
    out = Path(args.out).expanduser() if args.out else run / default
    flag = f"--out {args.out}" if args.out else f"the default output {out}"
    what = "the merged model" if merged else "the adapter"
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag}: a file, not a folder; pass the folder to write {what} into")
    # the run folder itself, its checkpoints/ and best/: the adapter's files (a task's folder) would mix with the run's
    inside = [p.resolve() for p in (run / "checkpoints", run / BEST)]
    if out.resolve() == run.resolve() or any(p == out.resolve() or p in out.resolve().parents for p in inside):
        raise UsageError(f"{flag}: inside the run's own folders ({run}, its checkpoints/ or best/); pass another "
                         "--out")
    base: dict = {}

    def check(cfg) -> None:  # before the model loads, after --task (a task not in the run was refused as a full --out)
        base["path"] = resolve_model(cfg.model, recorded=True)  # (model None, the bundled MiniLM: its folder)
        base_dir = Path(base["path"])
        if base_dir.is_dir() and out.resolve() == base_dir.resolve():  # (--overwrite replaced the base's weights)
            raise UsageError(f"{flag}: the run's base model folder; writing {what} into it changes the model that "
                             "predict, export and --resume load the run's adapter onto (a merged model there gets "
                             "the delta added twice); pass another --out")
        if args.rank is not None and args.rank not in tuple(cfg.rank_levels):
            raise UsageError(f"--rank {args.rank}: not one of the run's nested ranks "
                             f"({', '.join(map(str, cfg.rank_levels))}); pass one of them, or leave it out for the "
                             "controller's rank at the checkpoint")
        if merged and args.task is None and isinstance(cfg.data, dict):  # (a multi-task run's data: {task: path})
            raise UsageError(f"--merged: {run} is a multi-task run (tasks {', '.join(cfg.data)}), and each task's "
                             "adapter gives its own model; pass --task NAME for the task to merge")
        if merged:
            quantized = inference.quantization_of(base["path"])
            if quantized:
                raise UsageError(f"--merged: the run's base model {cfg.model} is quantized ({quantized}); folding the "
                                 "delta into its quantized weights would round every weight again, not only add the "
                                 "delta. Export the adapter (without --merged) and load it with PEFT on that base, or "
                                 "merge it into the base loaded unquantized (bf16/fp32)")
        held = [p.name for p in out.iterdir() if not left_by_dead_process(p.name)] if out.is_dir() else []
        if held and not args.overwrite:
            replaced = "its model, weight and adapter files are replaced" if merged else \
                "its adapter files are replaced"
            raise UsageError(f"{flag}: exists and holds {', '.join(sorted(held)[:3])}{' ...' if len(held) > 3 else ''}"
                             f"; pass --overwrite to write {what} into it ({replaced}, other files kept), or another "
                             "--out")

    # on the CPU in fp32: nothing runs forward, and the weights are written as they are stored (a merge sums in fp32)
    trained = inference.load_trained(run, str(ckpt), "cpu", "fp32", args.trust_checkpoint, task=args.task,
                                     config_check=check, all_tasks=True, command="export")
    rank = trained.rank if args.rank is None else args.rank
    multi = bool(getattr(trained.run, "specs", None))
    tasks = [args.task] if args.task else None
    print(f"checkpoint {trained.checkpoint} (step {trained.step}): {trained.task_type}, the controller at rank "
          f"{trained.rank} ({trained.mode})" + (f"; exported at --rank {rank}: the "
                                                f"{'merged model is' if merged else 'adapter computes'} the model at "
                                                "that rank, not what predict computes with this checkpoint"
                                                if rank != trained.rank else ""))
    if merged:
        # after the load: a hub id's weights are then in the Hugging Face cache, where stored_dtype reads their dtype
        base["dtype"] = inference.DTYPES[args.dtype] if args.dtype not in (None, "auto") \
            else inference.stored_dtype(base["path"])
        try:
            size = inference.write_merged(trained, out, rank, base["dtype"])
        except ValueError as e:  # a merge that cannot be done (a base weight computed at each forward)
            print(f"{PROG}: error: --merged: {e}", file=sys.stderr)
            return 1
        auto = _AUTO_CLASS.get(trained.task_type, "AutoModel")
        print(f"merged model{f' of task {args.task}' if multi else ''} (rank {rank}, "
              f"{str(base['dtype']).removeprefix('torch.')}, {_size(size)} of weights) with its tokenizer: {out} "
              f"(loads with transformers' {auto}.from_pretrained(path), without PEFT)")
        return 0
    note = trained.run.export_peft_to(out, rank=rank, tasks=tasks)
    if note:
        print(f"{PROG}: error: {note}", file=sys.stderr)
        return 1
    what = "" if not multi else f" of task {args.task}" if args.task else " of each task, in a folder each"
    where = out / args.task if args.task else out
    print(f"PEFT adapter{what} (rank {rank}): {where} (loads with peft.PeftModel.from_pretrained(base_model, "
          f"path{'/TASK' if multi and not args.task else ''}))")
    return 0


_AUTO_CLASS = {"causal-lm": "AutoModelForCausalLM", "seq-cls": "AutoModelForSequenceClassification"}


def _size(n: int) -> str:
    """A byte count as the console prints it: 1.5 GiB, 12.3 MiB, 840 KiB."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


# ----------------------------------------------------------------------------- parser


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after each option's help, except where the help already says what the default is
    (an option whose argparse default is None because the real one is decided later: "(default: None)" would be
    wrong)."""

    def _get_help_string(self, action):
        return action.help if "(default" in (action.help or "") else super()._get_help_string(action)


def _csv_list(example: str):
    """An argparse type: a comma-separated list of names, at least one; `example` is the error's (the flag's own)."""
    def names(s: str) -> list[str]:
        items = [x.strip() for x in s.split(",") if x.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, e.g. {example}")
        return items
    return names


def _schedule_flags(p: argparse.ArgumentParser, demo: bool = False) -> None:
    """--lr-scheduler, --warmup-steps, --warmup-ratio and --lr-scheduler-kwargs: train's (None unless given, as a flag
    given overrides the YAML) and demo's (with their defaults, which its help formatter states)."""
    from .training import LR_SCHEDULERS

    defaults = {"lr_scheduler": "constant", "warmup_steps": 0, "warmup_ratio": 0.0}

    def said(dest: str) -> str:  # train's help states the default itself (demo's formatter: those not None)
        return "" if demo and dest in defaults else f" (default {defaults.get(dest, 'none'):g})" \
            if dest == "warmup_ratio" else f" (default {defaults.get(dest, 'none')})"

    p.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default=defaults["lr_scheduler"] if demo else None,
                   help="the LR schedule (transformers' get_scheduler): the LR of an optimizer step is the mode's LR x "
                   "the schedule's factor at that step; linear and cosine decay to 0 over the run's steps"
                   + said("lr_scheduler"))
    p.add_argument("--warmup-steps", type=int, default=defaults["warmup_steps"] if demo else None,
                   help="optimizer steps of warm-up from 0 to the mode's LR, with a schedule other than constant"
                   + said("warmup_steps"))
    p.add_argument("--warmup-ratio", type=float, default=defaults["warmup_ratio"] if demo else None,
                   help="the warm-up as a share of the run's optimizer steps, rounded up, instead of --warmup-steps"
                   + said("warmup_ratio"))
    p.add_argument("--lr-scheduler-kwargs", metavar="JSON", help="the schedule's own settings as a JSON object, as "
                   "the Trainer's lr_scheduler_kwargs, e.g. '{\"min_lr_rate\": 0.1}' for cosine_with_min_lr or "
                   "'{\"num_decay_steps\": 100}' for warmup_stable_decay" + said("lr_scheduler_kwargs"))


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")

    p = argparse.ArgumentParser(prog=PROG, parents=[common], description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run `unified-lora COMMAND --help` for the options of each command.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", parents=[common], formatter_class=_DefaultsHelp,
                       help="stress→recovery demo: MiniLM on MRPC with a label shock",
                       description="Fine-tune MiniLM (or --model) on MRPC (or --data) with unified-lora, inject a "
                                   "label shock, and compare with fixed-rank LoRA and the majority class.")
    d.add_argument("--model", help="HF model folder or hub id (default: bundled all-MiniLM-L6-v2)")
    d.add_argument("--data", help="GLUE task folder or a .csv/.tsv/.jsonl file (default: shipped MRPC)")
    d.add_argument("--text-columns", type=_csv_list("sentence1,sentence2"), default=["text"],
                   help="table text column(s), e.g. s1,s2 (default: text; a GLUE folder's are its own)")
    d.add_argument("--label-column", default="label", help="table label column")
    d.add_argument("--steps", type=int, default=DEMO_SHOCK[2], help="optimizer steps")
    d.add_argument("--shock-start", type=int, help="first step of the label shock (default 60 of the default 160 "
                   "steps; without either shock flag, the window 60-100 scaled to --steps)")
    d.add_argument("--shock-end", type=int, help="the step after the shock (default 100, scaled as --shock-start)")
    d.add_argument("--shock-type", choices=("flip", "random"), default="flip", help="flipped or random labels")
    d.add_argument("--seed", type=int, default=0, help="random seed (weights, batch order, shock)")
    d.add_argument("--output-dir", default="unified-lora-demo", help="trace, summary, plot and console output")
    d.add_argument("--max-length", type=int, default=64, help="tokens per row")
    d.add_argument("--batch-size", type=int, default=16, help="rows per step")
    d.add_argument("--signal", choices=("loss", "composite"), default="loss",
                   help="φ(t): the v1 loss signal or the v3 composite signal (reads gradients)")
    d.add_argument("--lrs", type=float, nargs=3, metavar=("SINGLE", "MULTI", "MIRROR"),
                   help=f"absolute LR per mode (default {' '.join(map(str, DEMO_LRS))})")
    _schedule_flags(d, demo=True)
    d.add_argument("--loss-scale", type=float,
                   help=f"loss signal: divide the loss by this first; giving it turns calibration off unless "
                        f"--calibration-steps is also given (default: set by calibration; {DEMO_LOSS_SCALE} with "
                        f"--calibration-steps 0, which puts MRPC's ~0.62 training loss at φ≈0.67, MULTI; 1 = the "
                        "seed's scale)")
    d.add_argument("--calibration-steps", type=int,
                   help=f"loss signal: hold φ for these warmup steps, then set loss_scale = mean warmup loss / "
                        f"--calibration-target (default {DEMO_CALIBRATION[0]}, or 0 when --loss-scale is given)")
    d.add_argument("--calibration-target", type=float,
                   help=f"loss signal (default {DEMO_CALIBRATION[1]}): scaled warmup loss: φ settles at target/(1+target), 2.2 -> 0.69, just under θ1=0.7, so a "
                        "smoothed loss ~6%% above the warmup level enters MIRROR. MRPC's flip shock raises the loss "
                        "only ~1.3x before the model adapts, and with 2.0 (φ≈0.67) it never crossed θ1")
    d.add_argument("--min-dwell", type=int, default=0, help="hysteresis: steps to stay in a mode a transition entered")
    d.add_argument("--target-modules",
                   help="modules to adapt: comma-separated name suffixes, a regex, or all-linear (default: PEFT's "
                        "default for the model type: query,value for the bundled BERT)")
    d.add_argument("--modules-to-save", type=_csv_list("classifier"),
                   help="fully trained modules (default: the classifier head)")
    d.add_argument("--dev-size", type=int, default=200, help="dev rows to evaluate (fixed-seed subsample; 0 = all)")
    d.add_argument("--log-every", type=int, default=20, help="console line every N steps (and at transitions)")
    d.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    d.add_argument("--no-baseline", action="store_true", help="skip the fixed-rank LoRA comparison run")
    d.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (a GPU where torch sees one); the "
                   "documented demo output is the CPU's")
    d.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast dtype of forward and loss (fp16 adds a GradScaler); the weights stay fp32")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", parents=[common], help="fine-tune any HF model on your data with the controller",
                       description="Fine-tune a sequence-classification or causal-LM model. Options come from "
                                   "--config (YAML with TrainConfig keys) and are overridden by flags. Ctrl-C or "
                                   "SIGTERM (a scheduler's preemption notice) finishes the step, saves a resumable "
                                   "checkpoints/step-N and exits with code 130 or 143; continue with --resume. "
                                   "Under torchrun (torchrun --nproc-per-node N $(which unified-lora) train ...) it "
                                   "trains with DDP, --batch-size rows on each process.")
    t.add_argument("--config", help="YAML file with TrainConfig keys (model, data, epochs, ...)")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir "
                       "(the model, data, batches and LoRA layout must stay as they were)")
    t.add_argument("--trust-checkpoint", action="store_true", help="with --resume: load the checkpoint's state.pt "
                   "with torch.load(weights_only=False), for a file you trust that holds more than tensors and plain "
                   "values (by default it is refused: unpickling other objects can run code the file carries)")
    again.add_argument("--overwrite", action="store_true", help="start afresh in an --output-dir that holds a "
                       "previous run, deleting its checkpoints, peft_adapter/ (and the peft_adapter-NAME/ and "
                       "merged-NAME/ of unified-lora export), "
                       "trace and summary")
    t.add_argument("--no-controller", action="store_true", help="plain LoRA at the MULTI rank and LR (several "
                   "--data sets: an adapter per task from the start, never merged)")
    t.add_argument("--model", help="HF model folder or hub id (default: bundled all-MiniLM-L6-v2)")
    t.add_argument("--data", nargs="+", help="GLUE task folder, a .csv/.tsv/.jsonl table, or (causal LM) a "
                   "plain-text .txt/.raw corpus cut into --max-length token blocks (default: shipped MRPC); several "
                   "(tables, for a causal LM): a task each, trained in multi-task mode")
    t.add_argument("--dev-data", nargs="+", help="evaluation file (default: GLUE dev.tsv, else 10%% of --data held "
                   "out; for a text corpus, its tail); several --data sets: one per task, in their order (YAML dev_data: a "
                   "mapping {task: file} that may leave tasks to their default)")
    t.add_argument("--dev-fraction", type=float, help="without --dev-data (a GLUE folder has its dev.tsv): the share "
                   "of --data held out as dev rows; of a text corpus, its tail, cut at a line start (default 0.1)")
    t.add_argument("--task-names", type=_csv_list("mrpc,rte"), help="several --data sets: their task names, "
                   "comma-separated, in their order (default: each one's GLUE folder or file stem, lower-case)")
    t.add_argument("--task-type", choices=("auto", "seq-cls", "causal-lm"),
                   help="auto (default): causal-lm for ...ForCausalLM / ...LMHeadModel checkpoints, else seq-cls")
    t.add_argument("--text-columns", type=_csv_list("sentence1,sentence2"),
                   help="table text column(s), e.g. sentence1,sentence2; a causal "
                   "LM: one text, or prompt,completion (the loss on the completion only; found without this flag in a "
                   "table with those columns and no text column); a .jsonl column of role/content message lists is "
                   "chat data, rendered with the tokenizer's chat template (a 'messages' column is found without this "
                   "flag) (default: text)")
    t.add_argument("--assistant-only-loss", action="store_true", default=None, help="chat data: the loss on the "
                   "assistant turns only (TRL's assistant_only_loss; default: the whole conversation)")
    t.add_argument("--text-eos", action=argparse.BooleanOptionalAction, default=None, help="a causal LM's text rows "
                   "(one text column): the tokenizer's eos appended to each and trained on, as TRL's SFTTrainer adds "
                   "it (default on; --no-text-eos adds none, for text that carries its own end marks)")
    t.add_argument("--label-column", help="table label column (default: label)")
    t.add_argument("--epochs", type=int, help="epochs (default 1); each ends with a dev evaluation and a checkpoint")
    t.add_argument("--steps", type=int, help="stop after this many optimizer steps (overrides --epochs; default 0 = whole epochs)")
    t.add_argument("--batch-size", type=int, help="rows per batch; under torchrun, on each process (default 16)")
    t.add_argument("--grad-accum", type=int, help="micro-batches of --batch-size per optimizer step: a step sees "
                   "grad-accum x batch-size rows (default 1)")
    t.add_argument("--device", help="auto (default: cuda where torch sees a GPU, else cpu), cpu, cuda, cuda:N or mps")
    t.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="fp32 (default); bf16 or fp16: forward and "
                   "loss under torch.autocast, the weights and LoRA blocks staying fp32; fp16 adds a GradScaler")
    t.add_argument("--max-length", type=int, help="tokens per row (default 64)")
    t.add_argument("--max-nonfinite-steps", type=int, help="a step whose loss or gradient is NaN/inf is skipped, the "
                   "weights unchanged; this many such steps in a row save a checkpoint and stop the run with exit "
                   "code 1 (default 10; 0 = never stop)")
    t.add_argument("--lr", type=float, help="base LR for --lr-mode multiplier (default 5e-4)")
    t.add_argument("--lrs", type=float, nargs=3, metavar=("SINGLE", "MULTI", "MIRROR"),
                   help="per-mode LRs for --lr-mode absolute (default 2e-3 5e-4 1e-4)")
    t.add_argument("--lr-mode", choices=("absolute", "multiplier"),
                   help="absolute (default): the mode sets the LR; multiplier: the mode scales --lr")
    _schedule_flags(t)
    t.add_argument("--signal", choices=("loss", "composite"),
                   help="φ(t): the v1 loss signal (default) or the v3 composite signal (reads gradients)")
    t.add_argument("--loss-scale", type=float,
                   help="loss signal (several --data sets: the multi-task signal's E term): the loss is divided by "
                   "this before φ (default 1.0; a causal LM given no --calibration-steps calibrates it instead)")
    t.add_argument("--calibration-steps", type=int,
                   help="loss signal (several --data sets: the multi-task signal's E term): set the scale so the mean "
                   "of the first N losses maps to --calibration-target (default 0 = off, or 20 for a causal LM given "
                   "no --loss-scale)")
    t.add_argument("--calibration-target", type=float,
                   help="loss signal, with a calibration: the value the mean of the calibration's losses maps to, "
                   "φ settling near target/(1+target) (default 0.5: φ≈0.33, MULTI)")
    t.add_argument("--min-dwell", type=int, help="hysteresis: steps to stay in a mode a transition entered (default 0)")
    t.add_argument("--controller-warmup", type=int, help="no transition before this optimizer step: the run stays in "
                   "its start mode (MULTI; SINGLE for several --data sets) while the signal gathers its statistics "
                   "(default 0)")
    t.add_argument("--theta0", type=float, help="SINGLE/MULTI threshold on φ (default 0.3)")
    t.add_argument("--theta1", type=float, help="MULTI/MIRROR threshold on φ (default 0.7)")
    t.add_argument("--resplit-window", type=int, metavar="N", help="several --data sets: a split within N steps of "
                   "a merge brings each task's adapter back as the merge left it, and the next merge waits (default "
                   "25; 0 = every split copies the shared adapter)")
    t.add_argument("--mirror-policy", help="on leaving MIRROR: drift (default, the v3 card's rule: restore the "
                   "snapshot if the weights moved less than 5%%), loss_worse (restore if the loss is higher than "
                   "at entry), always or never")
    t.add_argument("--mirror-kernel", choices=("eager", "fused"),
                   help="Mirror copies and drift: torch ops (default) or fused C++ CPU kernels (needs g++ and ninja)")
    t.add_argument("--layer-kernel", choices=("python", "cpp"),
                   help="how layers run two or more active blocks: a Python autograd.Function (default) or the same "
                        "computation as a C++ autograd Function, built at first use (needs g++ and ninja)")
    t.add_argument("--mirror-pack", action=argparse.BooleanOptionalAction, default=None,
                   help="eager Mirror: pack the snapshotted parameters into one buffer at the first snapshot "
                        "(default on; --no-mirror-pack leaves every parameter's storage alone)")
    t.add_argument("--target-modules",
                   help="modules to adapt: comma-separated name suffixes (query,value), a regex (a value with any of "
                        "*+?[](){}|^$\\, matched against whole module names), or all-linear (default: PEFT's default "
                        "for the model type, as LoraConfig picks it: query,value for BERT, c_attn for GPT-2, "
                        "q_proj,v_proj for Llama)")
    t.add_argument("--modules-to-save", type=_csv_list("classifier"),
                   help="fully trained modules (default: the classifier head)")
    t.add_argument("--seed", type=int, help="default 0")
    t.add_argument("--save-steps", type=int, help="also write a resumable checkpoints/step-N every N optimizer "
                   "steps, inside an epoch too (default 0 = only at each epoch's end)")
    t.add_argument("--save-total-limit", type=int, help="keep only the newest K step-N checkpoints, deleting "
                   "older ones once a new one is complete; epoch-N checkpoints are all kept (default 0 = keep all)")
    t.add_argument("--eval-steps", type=int, help="also evaluate on the dev set every N optimizer steps, inside an "
                   "epoch too (default 0 = only at each epoch's end and the run's)")
    t.add_argument("--metric-for-best", help="the dev metric that ranks evaluations, higher is better but for loss "
                   "and perplexity (default: the task's primary one: MRPC f1, CoLA mcc, accuracy for other "
                   "classifiers, loss for a causal LM)")
    t.add_argument("--save-best", action="store_true", default=None, help="write OUTPUT_DIR/best/ (a checkpoint, "
                   "with peft/) at each evaluation that beats every earlier one; predict --checkpoint best uses it "
                   "(default: off; peft_adapter/ stays the final weights)")
    t.add_argument("--early-stopping-patience", type=int, help="stop after this many evaluations in a row that do "
                   "not improve the best by more than --early-stopping-threshold (default 0 = never)")
    t.add_argument("--early-stopping-threshold", type=float, help="the improvement on the best that counts, in the "
                   "metric's units (default 0)")
    t.add_argument("--output-dir", help="trace, plot, summary and checkpoints (default: unified-lora-run)")
    t.add_argument("--dev-size", type=int, help="dev rows (blocks, for a text corpus) to evaluate: a "
                   "fixed-seed subsample; 0 (default) = all")
    t.add_argument("--log-every", type=int, help="console line every N steps and at transitions (default 25)")
    t.add_argument("--threads", type=int, help="torch threads (default 0 = torch's default)")
    t.add_argument("--shock-start", type=int, help="first step of a corrupted-target window (a stress test; default 0)")
    t.add_argument("--shock-end", type=int, help="the step after the window (default 0 = no shock)")
    t.add_argument("--shock-type", choices=("flip", "random"), help="flip (default) or random labels; a causal "
                   "LM takes random next tokens only")
    t.set_defaults(func=cmd_train)

    pl = sub.add_parser("plot", parents=[common], help="plot a trace.jsonl (loss, φ, mode/rank, LR)")
    pl.add_argument("trace", help="trace.jsonl (or its run folder)")
    pl.add_argument("-o", "--output", help="PNG path (default: next to the trace)")
    pl.add_argument("--shock", type=int, nargs=2, metavar=("START", "END"),
                    help="shade this step window (default: the run's shock, from its summary.json)")
    pl.add_argument("--theta0", type=float, help="SINGLE/MULTI line on φ (default: the run's, else 0.3)")
    pl.add_argument("--theta1", type=float, help="MULTI/MIRROR line on φ (default: the run's, else 0.7)")
    pl.set_defaults(func=cmd_plot)

    r = sub.add_parser("report", parents=[common], help="print a run's summary table")
    r.add_argument("run_dir", help="the --output-dir of a demo or train run")
    r.set_defaults(func=cmd_report)

    c = sub.add_parser("compare", parents=[common], help="did it help? two groups of train runs (e.g. the "
                       "controller and --no-controller over seeds) on their final (or --at best, best) dev scores, "
                       "with a t test",
                       description="Compare two groups of `unified-lora train` runs on their final dev evaluation "
                       "(--at best: each run's best): "
                       "each group's mean ± std over its seeds, the difference A − B with its standard error and "
                       "Student's t test (paired on the seeds both groups ran, else Welch; one run a side: a test "
                       "on the dev rows; two-sided at 95 %), and the majority class beside them. The runs must share "
                       "their model and data; the runs of a group may differ in their seed only.")
    c.add_argument("runs", nargs="+", metavar="RUN", help="group A: train run folders (--output-dir), one per seed")
    c.add_argument("--vs", nargs="+", required=True, metavar="RUN", help="group B: the runs to compare A with")
    c.add_argument("--at", choices=("final", "best"), default="final",
                   help="which dev evaluation of each run: its final one (default), or the best one its "
                        "--metric-for-best ranked (the checkpoint --save-best keeps; picked on the same dev rows, so "
                        "optimistic, as the report says)")
    c.add_argument("--json", metavar="FILE", help="also write the comparison as JSON to FILE")
    c.set_defaults(func=cmd_compare)

    pr = sub.add_parser("predict", parents=[common],
                        help="use a train run's checkpoint: classify a table, or generate from prompts",
                        description="Load a `unified-lora train` run's checkpoint (its config, base model, LoRA "
                                    "blocks and head, at the controller's rank then) and classify the rows of --data "
                                    "(scoring those with labels as the run's dev evaluation does) or, for a causal "
                                    "LM, complete each of --prompts (or score --data: loss, perplexity).")
    _run_and_checkpoint_args(pr, "")
    pr.add_argument("--data", help="a classifier: a .csv/.tsv/.jsonl table with the run's text columns (its label "
                    "column optional), or for a run trained on a GLUE task that task's dev.tsv or test.tsv; a causal "
                    "LM: a text file or table to score, read as --dev-data is")
    pr.add_argument("--task", help="a multi-task run (train on several --data sets): the task whose adapter and "
                    "classes predict (required there); --data is read in that task's layout")
    pr.add_argument("--prompts", help="a causal LM: a .txt file (a prompt a line) or a .csv/.tsv/.jsonl table with "
                    "the run's prompt column (its first text column; --prompt-column names another)")
    pr.add_argument("--output", help="the .csv, .tsv or .jsonl file to write (default: RUN/predictions.<the input's "
                    "format>, RUN/predictions-TASK.<format> for a multi-task run; .jsonl for a .txt input)")
    pr.add_argument("--id-column", help="a table's id column, written beside each prediction (default: a column "
                    "named id, idx, index or guid, if any)")
    pr.add_argument("--prompt-column", help="a causal LM's prompts table: the column to read (default: the run's "
                    "first text column)")
    pr.add_argument("--batch-size", type=int, default=64, help="rows (prompts) per forward pass (default 64, as train's dev evaluation)")
    pr.add_argument("--max-new-tokens", type=int, help="a causal LM: tokens to generate at most (default 64)")
    pr.add_argument("--temperature", type=float, help="a causal LM: 0 (default) = greedy; above, sampled")
    pr.add_argument("--top-p", type=float, help="a causal LM, with --temperature: nucleus sampling (default 1 = off)")
    pr.add_argument("--seed", type=int, help="a causal LM, with --temperature: the sampling seed (default 0)")
    pr.add_argument("--device", default="auto", help="auto (default: cuda where torch sees a GPU, else cpu), "
                    "cpu, cuda, cuda:N or mps")
    pr.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="autocast dtype of the forward (default: "
                    "the run's)")
    pr.add_argument("--trust-checkpoint", action="store_true", help="load the checkpoint's state.pt with "
                    "torch.load(weights_only=False), for a file you trust (as train --resume)")
    pr.set_defaults(func=cmd_predict)

    ex = sub.add_parser("export", parents=[common], help="write a train run's checkpoint as a PEFT adapter (or, "
                        "--merged, as a merged model)",
                        description="Load a `unified-lora train` run's checkpoint as predict does and write its adapter "
                                    "in PEFT format (adapter_config.json, adapter_model.safetensors), as train writes "
                                    "peft_adapter/ at its end; it loads with peft.PeftModel.from_pretrained(base_model, "
                                    "path). A multi-task run: a folder per task. With --merged: the base model "
                                    "with the adapter folded in, a plain transformers model folder with the "
                                    "tokenizer.")
    _run_and_checkpoint_args(ex, ", as predict")
    ex.add_argument("--out", help="the folder to write (default: RUN/peft_adapter-<checkpoint name>, with --merged "
                    "RUN/merged-<checkpoint name>); one that holds files is refused without --overwrite")
    ex.add_argument("--overwrite", action="store_true", help="write into an --out that holds files: the adapter's "
                    "files are replaced (--merged: the model's, and a previous export's weight and adapter files "
                    "go), others kept")
    ex.add_argument("--rank", type=int, help="the nested rank to export (one of the run's rank levels; default: the "
                    "controller's rank at the checkpoint, the one predict runs at)")
    ex.add_argument("--task", help="a multi-task run: export this task's adapter alone (default: every task's, in a "
                    "folder each); with --merged, required: the task whose model to write")
    ex.add_argument("--merged", action="store_true", help="write the base model with the adapter folded in "
                    "instead: a plain transformers model folder with the tokenizer, which AutoModelForCausalLM / "
                    "AutoModelForSequenceClassification.from_pretrained loads without PEFT (default folder: "
                    "RUN/merged-<checkpoint name>; a multi-task run needs --task: RUN/merged-<checkpoint name>-<task>)")
    ex.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), help="--merged: the dtype of "
                    "the weights written (default auto: the base model's own, as its config.json records it; the "
                    "merge itself is summed in fp32 and rounded once)")
    ex.add_argument("--trust-checkpoint", action="store_true", help="load the checkpoint's state.pt with "
                    "torch.load(weights_only=False), for a file you trust (as train --resume)")
    ex.set_defaults(func=cmd_export)
    return p


_FILE_SYSTEM_ERRNOS = {getattr(errno, n) for n in ("EACCES", "EPERM", "ENOTDIR", "EISDIR", "EEXIST", "EROFS", "ENOSPC",
                                                    "EFBIG", "EDQUOT") if hasattr(errno, n)}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed `unified-lora ...: error: ...` (code 2) or --help (0)
        return int(e.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, so that a reader that left (`| head`) is a BrokenPipeError below, not at exit
        return code
    except BrokenPipeError:
        # `unified-lora report RUN | head`: the reader closed the pipe; no traceback, and nothing more written
        # (Python's recipe: point stdout at devnull, or its flush at exit raises again). 141 = 128 + SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback with --debug
        if debug:
            raise
        from .data import DataError
        from .training import CheckpointWriteError, DivergedError, UsageError

        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, (UsageError, DataError, ValueError, FileNotFoundError, ImportError)):
            print(f"{PROG}: error: {msg}", file=sys.stderr)
            return 2
        # disk full, no permission, an --output-dir under a file or on a read-only disk: the OS's message names the
        # path and the cause (it was an "internal error")
        if isinstance(e, (CheckpointWriteError, DivergedError)) or (isinstance(e, OSError)
                                                                    and e.errno in _FILE_SYSTEM_ERRNOS):
            print(f"{PROG}: error: {msg}", file=sys.stderr)
            return 1
        print(f"{PROG}: error: {type(e).__name__}: {msg} (internal error; rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
