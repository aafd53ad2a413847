"""`unified-lora train` on several data sets: one task each, in multi-task mode (a tiny BERT, two or three small tables
whose labels conflict), its checkpoints and resume, its outputs, and `predict --task`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import test_cli
import test_cli_precision
import test_cli_predict
from unified_lora.cli import _fmt_metrics, main
from unified_lora.config import MODES
from unified_lora.trace import read_trace

tiny = test_cli.tiny  # test_cli.py's tiny BERT and data (module-scoped fixtures)
wide = test_cli_predict.wide  # the same BERT with wider weights: its predictions vary by row
without_dropout = test_cli_precision.without_dropout  # the same BERT without dropout
_read, _error = test_cli_predict._read, test_cli_predict._error


def _table(path: Path, rows, names=None) -> str:
    path.write_text("text,label\n" + "".join(f"{t},{names[y] if names else y}\n" for t, y in rows))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """pos.csv (0/1), neg.csv (the same kind of rows, the labels inverted: the tasks conflict) and tri.csv (three named
    classes, every fifth row the third)."""
    root = tmp_path_factory.mktemp("mt")
    rows = test_cli._rows(40, seed=1)
    tri = [(t, 2 if i % 5 == 4 else y) for i, (t, y) in enumerate(test_cli._rows(40, seed=3))]
    return {"pos": _table(root / "pos.csv", rows),
            "neg": _table(root / "neg.csv", [(t, 1 - y) for t, y in test_cli._rows(40, seed=2)]),
            "tri": _table(root / "tri.csv", tri, ["neg", "pos", "zzz"]), "root": root}


def _mt_args(model, out, *data, extra=()) -> list[str]:
    return ["train", "--model", model, "--data", *data, "--batch-size", "8", "--max-length", "16", "--lrs", "1e-2",
            "1e-2", "1e-2", "--log-every", "1", "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def pinned(wide, data, tmp_path_factory) -> dict:
    """--no-controller on a binary task and a three-class one (named pos and tri by --task-names), evaluated every 4
    steps, the best saved."""
    out = tmp_path_factory.mktemp("pinned") / "run"
    assert main(_mt_args(wide, out, data["pos"], data["tri"], extra=(
        "--task-names", "pos,tri", "--no-controller", "--steps", "8", "--eval-steps", "4", "--save-best",
        "--shock-start", "5", "--shock-end", "6"))) == 0
    return {"run": out, "summary": json.loads((out / "summary.json").read_text())}


def test_no_controller_pins_multi_an_adapter_per_task_and_each_task_keeps_its_classes(pinned, capsys):
    run, s = pinned["run"], pinned["summary"]
    trace = read_trace(run / "trace.jsonl")
    assert [r["mode"] for r in trace] == [1] * 8 and {r["components"]["topology"] for r in trace} == {"task"}
    assert {"E[pos]", "E[tri]", "C", "S"} <= set(trace[-1]["components"])  # the multi-task signal's components
    assert s["tasks"][0]["classes"] == ["0", "1"] and s["tasks"][1]["classes"] == ["neg", "pos", "zzz"]
    assert [t["name"] for t in s["tasks"]] == ["pos", "tri"] and s["config"]["data"]["tri"].endswith("tri.csv")
    # each task's dev set scored with its metrics, flat, and the average of the primary ones
    final = list(s["arms"]["run"]["eval"].values())[-1]
    assert {"pos/accuracy", "pos/macro_f1", "tri/accuracy", "tri/macro_f1", "average"} <= set(final)
    assert final["average"] == pytest.approx((final["pos/accuracy"] + final["tri/accuracy"]) / 2)
    assert s["best"]["metric"] == "average" and (run / "best" / "peft" / "tri").is_dir()
    assert set(s["majority"]) >= {"pos/accuracy", "tri/accuracy", "average"}
    assert s["tasks"][1]["majority"]["accuracy"] == s["majority"]["tri/accuracy"]
    # the head: 3 outputs trained in full (shared), and a LoRA delta per task, which differ
    from safetensors.torch import load_file

    blocks = load_file(str(run / "checkpoints" / "step-8" / "adapter_blocks.safetensors"))
    head = [k for k in blocks if k.startswith("classifier.lora_tasks.")]
    assert head and blocks["classifier.base_layer.weight"].shape[0] == 3
    assert not torch.equal(blocks["classifier.lora_tasks.0.lora_B.0"], blocks["classifier.lora_tasks.1.lora_B.0"])
    assert main(["report", str(run)]) == 0
    said = capsys.readouterr().out
    assert "task tri (" in said and "3 classes neg, pos, zzz): last dev " in said and "average of the tasks'" in said
    # the tasks' data readable, on a line of its own (the top line printed data={'pos': '...', ...}, a Python dict)
    assert said.startswith(f"train: model={s['model']} steps=8\ndata: pos={s['config']['data']['pos']}, "
                           f"tri={s['config']['data']['tri']}\n")


def test_predict_task_scores_what_the_dev_evaluation_reported_and_each_task_loads_in_peft(pinned, data, capsys):
    run, s = pinned["run"], pinned["summary"]
    final = list(s["arms"]["run"]["eval"].values())[-1]
    for task, path, classes in (("pos", data["pos"], ["0", "1"]), ("tri", data["tri"], ["neg", "pos", "zzz"])):
        dev = data["root"] / f"{task}_dev.csv"
        from unified_lora.training import TrainConfig, load_data

        _, held, _ = load_data(TrainConfig(data=path), "seq-cls")  # the dev rows the run held out of that table
        _table(dev, [(e.text_a, e.label) for e in held.examples], classes)
        capsys.readouterr()
        assert main(["predict", str(run), "--task", task, "--data", str(dev), "--output", str(dev) + ".out.csv"]) == 0
        said = capsys.readouterr().out
        own = {k.split("/")[1]: v for k, v in final.items() if k.startswith(task + "/")}
        assert f"task {task}): {_fmt_metrics(own)}" in said
        rows = _read(Path(str(dev) + ".out.csv"))
        assert set(rows[0]) == {"prediction", *(f"prob_{c}" for c in classes)}  # its own classes only
    # without --output, each task's predictions go to a file of their own: predictions-<task>.<format> (one
    # predictions.csv for every task, each task's replacing the previous one's)
    for task in ("pos", "tri"):
        assert main(["predict", str(run), "--task", task, "--data", data["pos" if task == "pos" else "tri"]]) == 0
        assert capsys.readouterr().out.split("\n")[1].endswith(f": {run / f'predictions-{task}.csv'}")
    assert {c for c in _read(run / "predictions-pos.csv")[0] if c.startswith("prob_")} == {"prob_0", "prob_1"}
    assert "prob_zzz" in _read(run / "predictions-tri.csv")[0] and not (run / "predictions.csv").exists()
    # a missing or unknown task, and --task on a one-task run: one line each
    assert main(["predict", str(run), "--data", data["pos"]]) == 2
    assert "is a multi-task run (tasks pos, tri): pass --task NAME" in _error(capsys)
    assert main(["predict", str(run), "--data", data["pos"], "--task", "rte"]) == 2
    err = _error(capsys)
    assert "--task rte: not a task of" in err and err.endswith("its tasks are pos, tri")
    for typo in ("tr", "TRI", "tir"):  # a close name is suggested (it was not)
        assert main(["predict", str(run), "--data", data["pos"], "--task", typo]) == 2
        assert _error(capsys).endswith(f"not a task of {run}; its tasks are pos, tri (did you mean tri?)")
    # peft_adapter/<task>/: PEFT's own loader gives the run's logits for that task
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from unified_lora.inference import load_trained
    from unified_lora.training import encode_rows, load_table

    tr = load_trained(run, task="tri", device="cpu")
    enc = encode_rows(tr.tokenizer, load_table(data["tri"], ["text"], "label"), "seq-cls", 16)
    base = AutoModelForSequenceClassification.from_pretrained(tr.cfg.model, num_labels=3, ignore_mismatched_sizes=True)
    peft = PeftModel.from_pretrained(base, str(run / "peft_adapter" / "tri")).eval()
    with torch.no_grad():
        theirs = peft(**{k: v for k, v in enc.items() if k != "labels"}).logits
    assert torch.allclose(tr.run.logits("tri", enc), theirs, atol=1e-5)


def test_export_checks_its_task_before_its_output_folder_and_checkpoint_best_needs_save_best(pinned, data, tmp_path,
                                                                                               capsys):
    """`export --task` with a name not in the run, where an earlier export holds the default output folder, said that
    the folder exists and to pass --overwrite, not that the task is wrong. And `--checkpoint best` on a run trained
    without --save-best said "no such checkpoint in RUN/checkpoints (...) and no such folder", not why."""
    run = tmp_path / "run"
    shutil.copytree(pinned["run"], run)
    assert main(["export", str(run), "--task", "tri"]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--task", "trj"]) == 2
    assert _error(capsys).endswith(f"--task trj: not a task of {run}; its tasks are pos, tri (did you mean tri?)")
    assert main(["export", str(run), "--task", "pos"]) == 2  # a task of the run: the folder is still refused
    assert "peft_adapter-step-8: exists and holds peft_tasks.json, tri; pass --overwrite" in _error(capsys)
    shutil.rmtree(run / "best")  # as a run without --save-best
    names = ", ".join(sorted(p.name for p in (run / "checkpoints").iterdir()))
    for cmd in (["export", str(run), "--task", "tri", "--checkpoint", "best", "--out", str(tmp_path / "o")],
                ["predict", str(run), "--task", "tri", "--checkpoint", "best", "--data", data["tri"]]):
        assert main(cmd) == 2
        assert _error(capsys).endswith(f"--checkpoint best: {run} has no best/, which only a run trained with "
                                       f"--save-best writes; its checkpoints are {names}")


def test_a_resumed_run_goes_through_the_split_to_the_weights_and_trace_of_the_uninterrupted_one(tiny, data, tmp_path,
                                                                                                  capsys):
    # tiny BERT, conflicting labels: SINGLE, then the controller splits at step 4 (after the step-4 checkpoint), when
    # its warmup ends: φ starts at 0.476 and, with the loss scaled up, is still above θ0 = 0.43 there (0.438), and MULTI
    # holds for its min dwell. (The gradient conflict of these 4-row task batches is mostly noise: the plain cosine
    # reads 0.4-0.9 from step 3, the debiased one about 0, as each task's reliability ρ does. With the plain one, φ rose
    # and split at step 4 with θ0 = 0.48 and no warmup.)
    out, config = tmp_path / "run", tmp_path / "run.yaml"
    config.write_text(f"data:\n  pos: {data['pos']}\n  neg: {data['neg']}\n")  # YAML: a mapping {task name: path}
    args = _mt_args(tiny["bert"], out, extra=("--config", str(config), "--steps", "8", "--save-steps", "4",
                                              "--theta0", "0.43", "--theta1", "0.9", "--loss-scale", "0.1",
                                              "--controller-warmup", "4", "--min-dwell", "4"))
    args.remove("--data")
    assert main(args) == 0
    trace = read_trace(out / "trace.jsonl")
    assert [r["mode"] for r in trace[:4]] == [0] * 4 and trace[4]["transition"] == "SINGLE->MULTI"
    assert [r["mode"] for r in trace[4:]] == [1] * 4
    assert trace[4]["components"]["event"] == "split"
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for p in ("checkpoints/step-8", "summary.json", "peft_adapter"):
        shutil.rmtree(copy / p) if (copy / p).is_dir() else (copy / p).unlink()
    # `report` of a run stopped before its first evaluation (step-4 holds none: the first is at step 8) says so, with
    # the controller's state, and so does one stopped before its first checkpoint (trace.jsonl alone): it printed an
    # empty table (and "model=None data=None" for the latter), and a line per task with "last dev -"
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(copy / "trace.jsonl", bare)
    capsys.readouterr()
    for run in (copy, bare):
        assert main(["report", str(run)]) == 0
        said = capsys.readouterr().out
        label = "Unified LoRA" if run == copy else "run"
        assert (f"no evaluation yet: 8 training step(s) done, no dev evaluation; {label} at its last step: "
                f"{MODES[trace[-1]['mode']]}, rank {trace[-1]['rank']}, φ={trace[-1]['phi']:.3f}\n") in said
        assert "\nmethod " not in said
    assert said.startswith("run (no summary.json; from trace.jsonl): steps=8\n") and "None" not in said
    assert main(["report", str(copy)]) == 0
    said = capsys.readouterr().out
    assert f"task pos ({data['pos']}; 2 classes 0, 1): no dev evaluation yet\n" in said
    assert f"\ndata: pos={data['pos']}, neg={data['neg']}\n" in said and "data={" not in said
    assert main(["train", "--output-dir", str(copy), "--resume"]) == 0
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "checkpoints" / "step-8" / "adapter_blocks.safetensors")) for d in (out, copy))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_trace(copy / "trace.jsonl") == trace
    evals = [json.loads((d / "summary.json").read_text())["arms"]["run"]["eval"] for d in (out, copy)]
    assert evals[0] == evals[1]
    # another task order (or set) is refused, naming both
    capsys.readouterr()
    assert main(["train", "--output-dir", str(copy), "--resume", "--data", data["neg"], data["pos"]]) == 2
    err = _error(capsys)
    assert "'pos':" in err and "'neg':" in err and "(now " in err
    # report of the interrupted copy (its summary.json gone) names its tasks from the checkpoint
    (copy / "summary.json").unlink()
    assert main(["report", str(copy)]) == 0
    assert "task pos (" in capsys.readouterr().out


def _axes_drawn(monkeypatch) -> list[int]:
    """The number of panels of each figure `plot_trace` draws from now on (the real plot runs)."""
    import unified_lora.plotting as plotting

    drawn, real = [], plotting.plt.subplots

    def spy(*args, **kw):
        fig, axes = real(*args, **kw)
        drawn.append(len(axes))
        return fig, axes

    monkeypatch.setattr(plotting.plt, "subplots", spy)
    return drawn


def test_report_and_plot_show_a_multi_task_runs_gradient_conflict(tiny, data, tmp_path, capsys, monkeypatch):
    """A multi-task trace records, each step, the gradient conflict the signal read (C_grad), the plain cosine one
    (C_grad_raw) and each task's gradient reliability ρ; `report` and `plot` showed none of them. `report` now gives
    each's mean and largest value (with its step) over the steps that recorded it, for each mode the signal read it
    in: SINGLE (at the shared adapter, what φ reads) and MULTI/MIRROR (at each task's own adapter, where φ reads the
    weight conflict C_weight); a step that changed the mode counts in the one it left. It averaged C_grad over every
    step, the two mixed. Then each task's mean ρ, by mode as well (it was averaged over every step), with its steps
    (also for a summary.json written before it had them, or had them over every step, and for a trace alone); `plot`
    draws them in a fifth panel. No merge was held, so neither says one was."""
    import matplotlib

    out = tmp_path / "run"
    assert main(_mt_args(tiny["bert"], out, data["pos"], data["neg"],
                         extra=("--steps", "6", "--controller-warmup", "3"))) == 0
    trace = read_trace(out / "trace.jsonl")
    assert [r["transition"] for r in trace] == [None] * 3 + ["SINGLE->MULTI", None, None]  # split after the warm-up
    lines, rho_lines, pos = [], [], []
    for mode, rows in (("SINGLE", trace[:4]), ("MULTI/MIRROR", trace[4:])):
        comps = [r["components"] for r in rows]
        want = []
        for key in ("C_grad", "C_grad_raw"):
            v = [c[key] for c in comps]
            top = max(range(len(v)), key=lambda i: v[i])
            want.append(f"{key} mean={sum(v) / len(v):.3f} max={v[top]:.3f} at step {rows[top]['step']} "
                        f"({len(v)} of {len(v)} steps)")
        weight = [c for c in comps if c["C_weight"] is not None]
        assert all(c["C"] == c["C_weight"] for c in weight)  # what φ read there
        where = ("at the shared adapter" if mode == "SINGLE" else
                 f"at each task's own adapter; φ read the weight conflict C_weight at {len(weight)} of them")
        assert (mode == "SINGLE") == (not weight)
        lines.append(f"gradient conflict read in {mode} ({len(rows)} of 6 steps, {where}): {', '.join(want)}\n")
        rho = ", ".join(f"ρ[{t}] mean={sum(c[f'rho[{t}]'] for c in comps) / len(comps):.3f} ({len(comps)} of "
                        f"{len(comps)} steps)" for t in ("pos", "neg"))
        rho_lines.append(f"gradient reliability ρ read in {mode} ({len(rows)} of 6 steps, "
                         f"{where.split(';')[0]}): {rho}\n")
        pos.append(f"{sum(c['rho[pos]'] for c in comps) / len(comps):.3f}")
    assert max(r["components"]["C_grad"] for r in trace) > 0  # (a conflict was read)
    assert pos[0] != pos[1]  # ρ differs between the modes (one mean over every step hid that)
    lines += rho_lines
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    said = capsys.readouterr().out
    assert all(f"\n  Unified LoRA: {line}" in said for line in lines), said
    assert said.index("Unified LoRA: φ first=") < said.index("gradient conflict read in SINGLE") < \
        said.index("gradient conflict read in MULTI/MIRROR") < said.index("gradient reliability ρ read in SINGLE") < \
        said.index("gradient reliability ρ read in MULTI/MIRROR") < said.index("transitions (")
    assert "merge held" not in said and "over every mode" not in said
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arms"]["run"]["conflict"]["of"] == 6 and "held_merges" not in summary["arms"]["run"]
    run = summary["arms"]["run"]
    every = {"pos": 0.5, "neg": 0.25}  # ρ over every step, as summary.json had it
    old = {"C_grad": {"mean": 0.5, "max": 0.75, "max_step": 2, "steps": 6}, "rho": every, "of": 6}
    by_mode = {**run["conflict"], "rho": every,  # C_grad by mode, ρ over every step
               "modes": {k: {key: v for key, v in m.items() if key != "rho"} for k, m in run["conflict"]["modes"].items()}}
    for conflict in (None, old, by_mode):  # as written before it had them, or over every step: read from trace.jsonl
        run.pop("conflict", None)
        if conflict is not None:
            run["conflict"] = conflict
        (out / "summary.json").write_text(json.dumps(summary))
        assert main(["report", str(out)]) == 0
        assert capsys.readouterr().out == said
    (out / "trace.jsonl").rename(tmp_path / "trace.jsonl")  # the old ones, with no trace to read: said to be so
    every_line = "\n  Unified LoRA: mean gradient reliability ρ of each task over every mode: pos=0.500 neg=0.250\n"
    assert main(["report", str(out)]) == 0
    said_old = capsys.readouterr().out
    assert "gradient reliability ρ read in" not in said_old and every_line in said_old
    run["conflict"] = old
    (out / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(out)]) == 0
    said_old = capsys.readouterr().out
    assert ("\n  Unified LoRA: gradient conflict over every mode C_grad mean=0.500 max=0.750 at step 2 (6 of 6 "
            "steps)\n") in said_old and every_line in said_old, said_old
    bare = tmp_path / "bare"  # a trace alone
    bare.mkdir()
    shutil.copy(tmp_path / "trace.jsonl", bare)
    assert main(["report", str(bare)]) == 0
    said = capsys.readouterr().out
    assert all(f"\n  run: {line}" in said for line in lines), said
    # plot: a fifth panel, with C_grad and each task's ρ (C_grad_raw is C_grad with the default grad_noise="none")
    drawn = _axes_drawn(monkeypatch)
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        assert main(["plot", str(bare), "-o", str(tmp_path / "p.svg")]) == 0
    svg = (tmp_path / "p.svg").read_text()
    assert drawn == [5] and "C_grad" in svg and "ρ[pos]" in svg and "ρ[neg]" in svg
    assert "C_grad_raw" not in svg and "merge held" not in svg


def test_report_and_plot_say_that_a_merge_was_held_at_the_runs_end(tiny, data, tmp_path, capsys):
    """A merge φ calls for in the run's last --resplit-window steps is held (too close to the end to be tested): the
    trace marks those steps `merge_closed_from` and the console said so at the first of them, but `report` did not
    mention it and `plot` did not mark it, so a run that stayed in MULTI with φ below θ0 there was unexplained.
    `report` now says from which step, at how many steps φ called for a merge and the first; `plot` marks that step.
    (θ0 = 0 splits at the first step; resumed with θ0 = 0.98, φ calls for a merge at every step, and the last 6 of
    10, from step 4, hold it.)"""
    import matplotlib

    out = tmp_path / "run"
    assert main(_mt_args(tiny["bert"], out, data["pos"], data["neg"],
                         extra=("--steps", "4", "--theta0", "0", "--theta1", "0.99", "--resplit-window", "6"))) == 0
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "10", "--theta0", "0.98"]) == 0
    trace = read_trace(out / "trace.jsonl")
    assert [r["transition"] for r in trace] == ["SINGLE->MULTI"] + [None] * 9
    assert [r["step"] for r in trace if r["components"].get("merge_closed_from") == 4] == [4, 5, 6, 7, 8, 9]
    assert all(r["phi"] < 0.98 and MODES[r["mode"]] == "MULTI" for r in trace[4:])
    line = ("\n  Unified LoRA: merge held: none from step 4 on, too close to the run's end to be tested (its last 6 "
            "steps, --resplit-window); φ called for one at 6 steps, the first at step 4\n")
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    said = capsys.readouterr().out
    assert line in said and said.count("merge held") == 1, said
    assert said.index("gradient conflict read in MULTI/MIRROR") < said.index(line) < said.index("total wall time")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arms"]["run"]["held_merges"] == [{"closed_from": 4, "first_step": 4, "steps": 6}]
    del summary["arms"]["run"]["held_merges"], summary["arms"]["run"]["conflict"]  # as written before them
    (out / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out == said
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        assert main(["plot", str(out), "-o", str(tmp_path / "p.svg")]) == 0
    assert (tmp_path / "p.svg").read_text().count("merge held: none from step 4 on, too close to the run's end") == 1


def test_grad_accum_steps_as_one_big_batch_and_a_single_run_exports_each_task_as_it_runs(without_dropout, data,
                                                                                           tmp_path):
    runs = {}
    for name, extra in (("big", ("--batch-size", "8")), ("accum", ("--batch-size", "4", "--grad-accum", "2"))):
        runs[name] = tmp_path / name
        assert main(_mt_args(without_dropout["bert"], runs[name], data["pos"], data["tri"], extra=(
            "--steps", "1", "--theta0", "0.9", "--theta1", "0.95", *extra))) == 0
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "checkpoints" / "step-1" / "adapter_blocks.safetensors")) for d in runs.values())
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) if a[k].is_floating_point() else torch.equal(a[k], b[k])
               for k in a)
    (ta,), (tb,) = (read_trace(d / "trace.jsonl") for d in runs.values())
    assert ta["loss"] == pytest.approx(tb["loss"], abs=1e-6)
    for k in ("E[pos]", "E[tri]"):  # the per-task losses of the step, from both micro-batches
        assert ta["components"][k] == pytest.approx(tb["components"][k], abs=1e-6)
    assert ta["mode"] == 0  # SINGLE: every task runs the shared adapter, and its PEFT folder holds that one
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from unified_lora.inference import load_trained
    from unified_lora.training import encode_rows, load_table

    tr = load_trained(runs["big"], task="pos", device="cpu")
    enc = encode_rows(tr.tokenizer, load_table(data["pos"], ["text"], "label"), "seq-cls", 16)
    base = AutoModelForSequenceClassification.from_pretrained(tr.cfg.model, num_labels=3)
    peft = PeftModel.from_pretrained(base, str(runs["big"] / "peft_adapter" / "pos")).eval()
    with torch.no_grad():
        theirs = peft(**{k: v for k, v in enc.items() if k != "labels"}).logits[:, :2]
    assert torch.allclose(tr.run.logits("pos", enc), theirs, atol=1e-5)


def test_a_tasks_own_metric_ranks_the_evaluations_and_stops_the_run_early(wide, data, tmp_path):
    out = tmp_path / "run"
    assert main(_mt_args(wide, out, data["pos"], data["tri"], extra=(
        "--task-names", "pos,tri", "--steps", "12", "--eval-steps", "2", "--early-stopping-patience", "1",
        "--metric-for-best", "tri/accuracy"))) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["stopped_early"] and s["steps"] < 12 and s["best"]["metric"] == "tri/accuracy"
    values = [e["tri/accuracy"] for e in s["arms"]["run"]["eval"].values()]
    assert s["best"]["value"] == max(values) and values[-1] <= max(values[:-1])


def test_the_shock_corrupts_each_label_within_its_own_tasks_classes():
    from unified_lora.multitask_train import MultiTaskRun

    run = MultiTaskRun.__new__(MultiTaskRun)  # (only what _corrupt reads)
    run.n_classes, run.shock_gen = torch.tensor([2, 3]), torch.Generator().manual_seed(0)
    labels, task = torch.tensor([0, 1, 0, 1, 2, 2]), torch.tensor([0, 0, 1, 1, 1, 0])
    labels[5] = 1
    for kind in ("flip", "random"):
        run.cfg = type("C", (), {"shock_type": kind})()
        y = run._corrupt({"labels": labels, "task": task})
        assert all(int(v) < (2, 3)[int(t)] for v, t in zip(y, task))
        if kind == "flip":
            assert y.tolist() == [1, 0, 1, 2, 0, 0]


@pytest.mark.parametrize("extra, says", [
    ((), "data: the task name(s) ['pos'] repeat (pos, pos, from the data sets' GLUE folder or file names)"),
    # names given twice are the user's, not the files' (it said they came from the file names, and to pass them)
    (("--task-names", "a,a"), "task_names: the name(s) ['a'] repeat (a, a); give each task its own name"),
    (("--task-names", "a,b", "--dev-data", "x.csv"), "dev_data: one file for 2 data sets"),
    (("--task-names", "a,b", "--dev-data", "x.csv", "y.csv", "z.csv"), "dev_data: 3 files for 2 data sets"),
    (("--task-names", "a,b", "--signal", "composite"), "--signal composite: not available in multi-task mode"),
    (("--task-names", "a,b", "--metric-for-best", "f1"), "its evaluation reports a/accuracy, a/macro_f1, "
                                                         "b/accuracy, b/macro_f1, average"),
])
def test_what_multi_task_train_refuses_is_one_line(tiny, data, tmp_path, capsys, extra, says):
    assert main(_mt_args(tiny["bert"], tmp_path / "r", data["pos"], data["pos"], extra=extra)) == 2
    assert says in _error(capsys)


def test_calibration_steps_set_the_multi_task_signals_loss_scale_a_classifier_keeps_the_default(tiny, data, tmp_path):
    """--calibration-steps N sets the multi-task signal's loss scale from the mean loss of the first N steps (it was
    refused: "the multi-task signal has no calibration"), E held at 1/3 until then; a classifier given neither it nor
    --loss-scale reads its losses on the scale of 1, as with one data set (a causal LM calibrates by itself:
    test_cli_multitask_lm.py)."""
    assert main(_mt_args(tiny["bert"], tmp_path / "cal", data["pos"], data["neg"], extra=(
        "--steps", "4", "--calibration-steps", "2"))) == 0
    trace = read_trace(tmp_path / "cal" / "trace.jsonl")
    assert [r["components"]["E"] for r in trace[:2]] == [pytest.approx(1 / 3)] * 2
    assert trace[-1]["components"]["loss_scale"] == pytest.approx((trace[0]["loss"] + trace[1]["loss"]) / 2 / 0.5)
    assert main(_mt_args(tiny["bert"], tmp_path / "plain", data["pos"], data["neg"], extra=("--steps", "1"))) == 0
    assert json.loads((tmp_path / "plain" / "summary.json").read_text())["config"]["calibration_steps"] == 0
    assert "loss_scale" not in read_trace(tmp_path / "plain" / "trace.jsonl")[0]["components"]


def test_each_tasks_classes_without_a_training_row_and_a_label_column_of_ids_get_the_note_naming_the_task(
        tiny, data, tmp_path, capsys):
    """The notes a one-task run gives on its training rows' classes (a class id no training row has; more classes
    than half the rows, an id per row) were not given for several --data sets: a task whose 0/1 file holds one stray
    4 trained a 5-class task with classes 2 and 3 never taught, and a task whose label column held an id per row
    trained, without a word. Each task now gets them, naming the task; a task with its usual 0/1 labels (and a GLUE
    folder's, its own labels) gets none."""
    rows = test_cli._rows(40, seed=5)
    gap = _table(tmp_path / "gap.csv", [*rows, (rows[0][0], 4)])
    ids = _table(tmp_path / "ids.csv", [(t, i) for i, (t, _) in enumerate(test_cli._rows(40, seed=6))])
    sst = tmp_path / "SST-2"  # a GLUE folder: its own labels, no column named
    sst.mkdir()
    (sst / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows[:24]))
    (sst / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows[24:]))
    dev = [_table(tmp_path / f"{name}_dev.csv", test_cli._rows(6, seed=7)) for name in ("pos", "gap", "ids")]
    capsys.readouterr()
    assert main(_mt_args(tiny["bert"], tmp_path / "run", data["pos"], gap, ids, str(sst), extra=(
        "--dev-data", *dev, str(sst / "dev.tsv"), "--steps", "1"))) == 0
    assert [x for x in capsys.readouterr().err.splitlines() if "note:" in x] == [
        f"unified-lora: note: task gap: --data {gap}, column 'label': 2 of the 5 classes have no training row: 2, 3 "
        "(integer labels are class ids, so the task has 5 classes, 0 to 4); the model is never taught to predict them",
        f"unified-lora: note: task ids: --data {ids}, column 'label': 40 classes for 40 training rows (fewer than 2 "
        "rows a class): is it the label column, and not an id per row? (--label-column names the label column)"]


def test_a_table_whose_columns_are_named_otherwise_is_told_that_the_column_options_name_every_tasks(tiny, data,
                                                                                                  tmp_path, capsys):
    """A table whose text or label column is named otherwise than the other tasks' was refused as "unknown column", and
    a user looked for a per-task option; the error now says that --text-columns and --label-column are every task's."""
    rows = test_cli._rows(12, seed=4)
    for header, what in (("review,label", "'text'"), ("text,sentiment", "'label'")):
        other = tmp_path / f"{header.replace(',', '_')}.csv"
        other.write_text(f"{header}\n" + "".join(f"{t},{y}\n" for t, y in rows))
        assert main(_mt_args(tiny["bert"], tmp_path / "r", data["pos"], str(other), extra=("--steps", "1"))) == 2
        assert _error(capsys).endswith(
            f"task {other.stem}: unknown column {what} in {other}; columns are {header.split(',')}; --text-columns and "
            "--label-column name the columns of every task's table: rename this table's to match")


def test_a_dev_data_mapping_may_name_some_tasks_and_a_missing_dev_file_names_its_task(tiny, data, tmp_path, capsys):
    """YAML `dev_data` naming one task: the others take their default dev set, here a GLUE folder's dev.tsv beside a
    table's own dev file (a mapping had to name every task: "no file for 'sst2'"); a resume keeps the mapping. A dev
    file that does not exist is one line naming its task and path (it said "data file not found: nope.csv; check the
    path (or data_dir)", not which task's, nor that it was a dev file)."""
    sst = tmp_path / "SST-2"
    sst.mkdir()
    rows = test_cli._rows(24)
    (sst / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows[:16]))
    (sst / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows[16:]))
    dev, config, out = _table(tmp_path / "pos_dev.csv", test_cli._rows(6, seed=9)), tmp_path / "c.yaml", tmp_path / "r"
    config.write_text(f"dev_data:\n  pos: {dev}\n")
    assert main(_mt_args(tiny["bert"], out, str(sst), data["pos"], extra=("--config", str(config), "--steps", "1"))) == 0
    said = capsys.readouterr().out
    # the task given a dev file names it, in the console and in `report` (neither did: only its count of rows told)
    assert f"task sst2: {sst}, 16 train / 8 dev rows" in said
    assert f"task pos: {data['pos']} (dev {dev}), 40 train / 6 dev rows" in said
    assert main(["report", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"task sst2 ({sst}; 2 classes" in said and f"task pos ({data['pos']}, dev {dev}; 2 classes" in said
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["dev_data"] == {"pos": dev} and [t["dev_data"] for t in s["tasks"]] == [None, dev]
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "2"]) == 0
    assert [t["dev_rows"] for t in json.loads((out / "summary.json").read_text())["tasks"]] == [8, 6]
    capsys.readouterr()
    for given, says in (([str(sst / "dev.tsv"), "nope.csv"], "task pos: --dev-data nope.csv: no such file"),
                        (["nope.tsv", dev], "task sst2: --dev-data nope.tsv: no such file")):
        assert main(_mt_args(tiny["bert"], tmp_path / "x", str(sst), data["pos"], extra=("--dev-data", *given))) == 2
        assert says in _error(capsys)


def test_dev_size_subsamples_each_tasks_dev_rows_and_controller_warmup_holds_the_shared_adapter(wide, data, tmp_path,
                                                                                                 capsys):
    """--dev-size N: each task is evaluated (and its majority class scored) on N of its dev rows; it was ignored there
    (every dev row evaluated) while the majority class was scored on N. --controller-warmup 3: no transition before
    step 3, so the tasks train on the shared adapter (SINGLE) first; without it this run splits at step 0."""
    runs = {}
    for warm in (0, 3):
        out = tmp_path / f"w{warm}"
        assert main(_mt_args(wide, out, data["pos"], data["neg"], extra=(
            "--dev-data", data["pos"], data["neg"], "--dev-size", "10", "--steps", "5",
            "--controller-warmup", str(warm)))) == 0
        runs[warm] = (read_trace(out / "trace.jsonl"), json.loads((out / "summary.json").read_text()))
    said = capsys.readouterr().out
    assert "task pos: " in said and said.count("40 train / 10 dev rows") == 4
    # how each task is scored: its metrics, the primary one first (it said "scored as pos", the file's stem)
    assert "2 classes 0, 1, scored by accuracy (primary), macro_f1\n" in said  # (the items: it printed ['0', '1'])
    trace, s = runs[3]
    assert [t["dev_rows"] for t in s["tasks"]] == [10, 10]
    final = list(s["arms"]["run"]["eval"].values())[-1]
    for name in ("pos", "neg"):  # scored on 10 rows: a multiple of 1/10 (40 rows gave multiples of 1/40)
        assert round(final[f"{name}/accuracy"] * 10, 6) == round(final[f"{name}/accuracy"] * 10)
        assert round(s["majority"][f"{name}/accuracy"] * 10, 6) == round(s["majority"][f"{name}/accuracy"] * 10)
    assert [r["mode"] for r in runs[0][0]][:1] == [1]  # splits at once without the warm-up
    assert [r["mode"] for r in trace[:3]] == [0, 0, 0] and {r["components"]["topology"] for r in trace[:3]} == {"shared"}
    assert s["config"]["controller_warmup"] == 3
    # a resume with another task set, where the run has dev files: the stored dev_data no longer fits the tasks, and
    # the error named dev_data, which this command did not give (the same tasks again resume as before)
    assert main(["train", "--output-dir", str(tmp_path / "w3"), "--resume", "--data", data["pos"], data["tri"]]) == 2
    err = _error(capsys)
    assert err.startswith("unified-lora: error: --resume ") and "the run was trained on the tasks {'pos': " in err
    assert "with --data as given now: dev_data: " in err and "a resumed run keeps its tasks: drop --data," in err
    assert main(["train", "--output-dir", str(tmp_path / "w3"), "--resume", "--data", data["pos"], data["neg"],
                 "--dev-data", data["pos"], data["neg"]]) == 0
    assert main(_mt_args(wide, tmp_path / "bad", data["pos"], data["neg"], extra=("--controller-warmup", "-1"))) == 2
    assert "controller_warmup: must be >= 0" in _error(capsys)


def _save_classifier(model, tokenizer_dir: str, path: Path) -> str:
    from transformers import AutoTokenizer

    model.config.architectures = [type(model).__name__]
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return str(path)


def test_a_head_that_is_a_block_gets_a_delta_per_task_on_its_output_layer_and_the_targets_must_match_the_body(
        tiny, data, tmp_path, capsys):
    """RoBERTa's head `classifier` is a block (dense, out_proj): it was added to the LoRA targets whole, which a
    nested layer cannot wrap, so every RoBERTa-like model was refused. And GPT-2's body has no query/value (the default
    targets): with the head added they matched `score` alone, so the run trained the head only, silently (one data
    set is refused there), and then its PEFT export failed (exit 3)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    roberta = _save_classifier(RobertaForSequenceClassification(RobertaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=40, pad_token_id=0)), tiny["bert"], tmp_path / "roberta")
    out = tmp_path / "run"
    assert main(_mt_args(roberta, out, data["pos"], data["tri"], extra=("--task-names", "pos,tri", "--steps", "2"))) == 0
    from safetensors.torch import load_file

    blocks = load_file(str(out / "checkpoints" / "step-2" / "adapter_blocks.safetensors"))
    assert "classifier.out_proj.lora_tasks.1.lora_B.0" in blocks and "classifier.dense.base_layer.weight" not in blocks
    assert (out / "peft_adapter" / "tri" / "adapter_config.json").is_file()
    assert "has a LoRA delta per task and trains in full" in capsys.readouterr().out
    gpt2 = _save_classifier(GPT2ForSequenceClassification(GPT2Config(
        vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=40, pad_token_id=0)), tiny["bert"],
        tmp_path / "gpt2")
    assert main(_mt_args(gpt2, tmp_path / "g", data["pos"], data["tri"],
                         extra=("--task-names", "pos,tri", "--target-modules", "query,value"))) == 2
    err = _error(capsys)
    assert "['query', 'value'] matched no Linear/Conv1D module outside the classifier head (score)" in err
    assert "'c_attn'" in err
    # without --target-modules: PEFT's default for GPT-2, c_attn, in the body, recorded as resolved
    assert main(_mt_args(gpt2, tmp_path / "d", data["pos"], data["tri"],
                         extra=("--task-names", "pos,tri", "--steps", "2"))) == 0
    blocks = load_file(str(tmp_path / "d" / "checkpoints" / "step-2" / "adapter_blocks.safetensors"))
    assert any(".c_attn.lora_tasks." in k for k in blocks) and any(k.startswith("score.lora_tasks.") for k in blocks)
    assert json.loads((tmp_path / "d" / "summary.json").read_text())["config"]["target_modules"] == ["c_attn"]


# the head the run adds to the targets has 3 outputs, below the top rank 16: no rank warning on it (there was one)
@pytest.mark.filterwarnings("error:rank_levels:UserWarning")
def test_a_head_of_another_name_is_found_by_its_outputs(tiny, data, tmp_path, capsys):
    """BART's head is `classification_head` (dense, out_proj), neither `classifier` nor `score`: no head target was
    found, so its tasks shared the head with no delta of their own, while the console said each had one."""
    from transformers import AutoTokenizer, BartConfig, BartForSequenceClassification

    sep = AutoTokenizer.from_pretrained(tiny["bert"]).sep_token_id  # BART pools at the eos: one per row, the [SEP]
    torch.manual_seed(0)
    bart = _save_classifier(BartForSequenceClassification(BartConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=40, pad_token_id=0,
        eos_token_id=sep, bos_token_id=sep, decoder_start_token_id=sep)), tiny["bert"], tmp_path / "bart")
    out = tmp_path / "run"
    assert main(_mt_args(bart, out, data["pos"], data["tri"], extra=(
        "--task-names", "pos,tri", "--steps", "2", "--target-modules", "q_proj,v_proj"))) == 0
    from safetensors.torch import load_file

    blocks = load_file(str(out / "checkpoints" / "step-2" / "adapter_blocks.safetensors"))
    assert "classification_head.out_proj.lora_tasks.1.lora_B.0" in blocks
    assert "has a LoRA delta per task" in capsys.readouterr().out
    from unified_lora.multitask_train import head_output_layer

    assert head_output_layer(torch.nn.Sequential(torch.nn.Linear(4, 5)), 3) == (None, None)


def test_resplit_window_is_a_flag_and_a_yaml_key_recorded_in_the_run_and_kept_on_resume(tiny, data, tmp_path, capsys,
                                                                                        monkeypatch):
    """`--resplit-window N` (YAML `resplit_window`) sets the multi-task controller's resplit_window: the run's
    config and summary record it, and --resume goes on with it. There was no way to set it from the command line (every
    run had 25). Below 0, or other than the default for one data set (no split there), is one line naming it."""
    import unified_lora.multitask_train as mt

    built, real = [], mt.setup_multitask_lora

    def recording(*args, **kwargs):  # the real setup; the controller it built kept for the checks below
        adapters, ctrl = real(*args, **kwargs)
        built.append(ctrl)
        return adapters, ctrl

    monkeypatch.setattr(mt, "setup_multitask_lora", recording)
    out = tmp_path / "r"
    assert main(_mt_args(tiny["bert"], out, data["pos"], data["neg"], extra=("--resplit-window", "7", "--steps",
                                                                             "1"))) == 0
    # the controller knows the run's length, so no merge starts in its last resplit_window steps (untested)
    assert built[-1].resplit_window == 7 and built[-1].total_steps == 1 and built[-1].merges_closed_from == 0
    assert json.loads((out / "summary.json").read_text())["config"]["resplit_window"] == 7
    state = torch.load(out / "checkpoints" / "step-1" / "state.pt", weights_only=True)
    assert state["config"]["resplit_window"] == 7
    said = capsys.readouterr().out
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "2"]) == 0
    assert built[-1].resplit_window == 7 and built[-1].global_step == 2 and built[-1].total_steps == 2
    # the first line's count of trainable parameters is the mode's, and says so: the run starts in SINGLE (the shared
    # adapter) and resumes in MULTI (every task's blocks), where the count, unexplained, was 4 times the first
    counts = [re.search(r"controller=on, ([\d,]+) trainable parameters at rank (\d) \((\w+)\)\n", text).groups()
              for text in (said, capsys.readouterr().out)]
    assert [c[1:] for c in counts] == [("4", "SINGLE"), ("8", "MULTI")] and counts[0][0] != counts[1][0]
    assert json.loads((out / "summary.json").read_text())["config"]["resplit_window"] == 7
    config = tmp_path / "c.yaml"
    config.write_text("resplit_window: 0\n")
    assert main(_mt_args(tiny["bert"], tmp_path / "y", data["pos"], data["neg"], extra=("--config", str(config),
                                                                                        "--steps", "1"))) == 0
    assert built[-1].resplit_window == 0 and len(built) == 3
    capsys.readouterr()
    assert main(_mt_args(tiny["bert"], tmp_path / "x", data["pos"], data["neg"], extra=("--resplit-window", "-1"))) == 2
    assert "resplit_window: must be >= 0" in _error(capsys)
    assert main(_mt_args(tiny["bert"], tmp_path / "x", data["pos"], extra=("--resplit-window", "5"))) == 2
    assert "--resplit-window 5: for several --data sets" in _error(capsys)
    assert len(built) == 3
