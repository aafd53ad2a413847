"""Did it help? Two groups of `unified-lora train` runs (say the controller and `--no-controller`, each over a few
seeds) compared on their final dev evaluation (or, `--at best`, each run's best): each group's mean ± std, the
difference with its standard error and Student's t test (paired on the seeds both groups ran, else Welch), and the
majority class beside them.
`unified-lora compare A... --vs B...` prints it; `compare_runs` returns it as a dict.

The runs must have trained and been scored on the same data (same model, data, dev data, columns, max length; a
dev split of --data, --dev-fraction, depends on the seed, so only the runs of one seed score the same dev rows); a
group is one setting run over several seeds, so the runs of a group may differ in their seed alone (and in what does
not change training: output folder, threads, device, logging, checkpointing; a setting a --resume changed counts).
The settings the two groups differ in are what is compared, and are named. One run a side cannot show the
seed-to-seed spread, which is often larger than the difference between two methods: where both runs recorded their
predictions on the same dev rows, the rows are tested (which rows were drawn), and the verdict says what that leaves
out; otherwise there is no test.
"""

from __future__ import annotations

import math
from pathlib import Path

from .stats import LEVEL, mcnemar, seed_difference
from .training import not_learning

# what the runs train on and are scored on: the same in every run, or there is nothing to compare
SAME_DATA = ("model", "data", "dev_data", "task_names", "task_type", "text_columns", "label_column", "dev_fraction",
             "dev_size", "max_length", "assistant_only_loss", "text_eos")
# the budget: a difference here is named as one (the groups did not train for as long, or on as many rows a step)
BUDGET = ("steps", "epochs", "batch_size", "grad_accum", "early_stopping_patience", "early_stopping_threshold")


class CompareError(ValueError):
    """Runs that cannot be compared, with what to do about it."""


def _run(path) -> dict:
    """One finished train run's summary.json, with its folder (`_path`)."""
    from .cli import _read_run_summary, _unfinished_train_summary

    d = Path(path)
    if not d.is_dir():
        raise CompareError(f"{d}: no such run folder; pass the --output-dir of `unified-lora train` runs")
    summary = _read_run_summary(d)
    unfinished = _unfinished_train_summary(d, summary)
    if unfinished is not None:
        done, planned = unfinished.get("steps"), unfinished.get("planned_steps")
        of = f" of {planned}" if planned else ""
        raise CompareError(f"{d}: no current summary.json (the run stopped at step {done}{of}, or its summary.json "
                           f"was removed); compare finished runs: `unified-lora train --output-dir {d} --resume` "
                           "finishes it")
    if summary is None:
        raise CompareError(f"{d}: no summary.json; pass the --output-dir of finished `unified-lora train` runs")
    if summary.get("command") != "train":
        hint = " (a demo compares its own two arms: `unified-lora report`)" if summary.get("command") == "demo" else ""
        raise CompareError(f"{d}: not a `unified-lora train` run{hint}")
    arm = (summary.get("arms") or {}).get("run") or {}
    if not summary.get("eval_points") or not arm.get("eval"):
        raise CompareError(f"{d}: no dev evaluation recorded; compare runs that evaluated on dev data")
    return dict(summary, _path=str(d))


AT = ("final", "best")  # which of a run's dev evaluations compare reads (`--at`)


def _point(run: dict, at: str = "final") -> str:
    """The evaluation point compare reads: the run's last, or (`at="best"`) the one its --metric-for-best ranked
    best (summary `best`, as --save-best keeps it)."""
    ev = run["arms"]["run"]["eval"]
    if at == "final":
        return list(ev)[-1]
    best = run.get("best") or {}
    if best.get("point") not in ev:
        metric = (run.get("config") or {}).get("metric_for_best")
        scores = [e.get(metric) for e in ev.values()]
        why = (f"none of its dev {metric} scores is a number: a diverged run" if metric and not any(
            isinstance(v, (int, float)) and math.isfinite(v) for v in scores) else "a run saved before the best was")
        raise CompareError(f"{run['_path']}: no best evaluation recorded ({why}); compare its final evaluation "
                           "(leave out --at best)")
    return best["point"]


def _final(run: dict, at: str = "final") -> dict:
    """The run's dev evaluation that compare reads (`_point`): {metric: value}."""
    return {k: v for k, v in run["arms"]["run"]["eval"][_point(run, at)].items() if isinstance(v, (int, float))}


def _cfg(run: dict) -> dict:
    """The run's settings that change what it learns. `eval_steps` among them where early stopping reads those
    evaluations: then they decide when the run stops. A run resumed with other settings (`resumes` in its summary) has
    trained with the checkpoint's before the resume and its `config` after: `changed_on_resume` says from which step,
    and what (`training.resume_changes`)."""
    cfg = run.get("config") or {}
    skip = not_learning(cfg)
    out = {k: v for k, v in cfg.items() if k not in skip}
    said = [f"at step {r.get('step')}: " + ", ".join(f"{k} {_show(v[0], k)} → {_show(v[1], k)}"
                                                     for k, v in (r.get("changed") or {}).items())
            for r in run.get("resumes") or [] if r.get("changed")]
    if said:
        out["changed_on_resume"] = "; ".join(said)
    return out


def _show(v, key: str = "") -> str:
    if v is None:
        return "the bundled MiniLM" if key == "model" else "none"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def _check_group(name: str, runs: list[dict]) -> None:
    first = _cfg(runs[0])
    for r in runs[1:]:
        other = _cfg(r)
        diff = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if diff:
            k = diff[0]
            more = f" (and {len(diff) - 1} more)" if diff[1:] else ""
            raise CompareError(f"group {name} mixes settings: {k} is {_show(first.get(k), k)} in {runs[0]['_path']} "
                               f"and {_show(other.get(k), k)} in {r['_path']}{more}; a group is one setting over "
                               "several seeds: compare settings as A --vs B")
    seeds: dict = {}
    for r in runs:
        s = _seed(r)
        if s in seeds:
            raise CompareError(f"group {name}: {seeds[s]} and {r['_path']} both ran seed {s}; a group is one setting "
                               "over different seeds (pass each run once)")
        seeds[s] = r["_path"]


def compare_runs(a_dirs, b_dirs, level: float = LEVEL, at: str = "final") -> dict:
    """Compare two groups of train runs (their folders) on their final dev evaluation, or (`at="best"`) on each run's
    best one as its --metric-for-best ranked it (picked on the same dev rows: optimistic, and the report says so).
    Returns {"a", "b" (each: runs, seeds, label, points), "differ" ({setting: (a's, b's)}), "budget_differs",
    "metrics" ([{"metric", "lower_is_better", "a", "b", "majority", ...`seed_difference`, "verdict"}], the primary
    metric first), "primary", "cost" ({"a", "b"}: mean wall s, mean rank, steps per mode), "level", "at",
    "rows_at_final_only" (one run a side at best: the primary metric's dev rows, tested at the runs' final
    evaluations, are not at a best one)}. Raises
    CompareError for runs that do not compare (unfinished, another command, other data, a group that mixes settings
    or repeats a seed; at best, groups whose best evaluations another metric ranked)."""
    from .training import lower_is_better

    if at not in AT:
        raise CompareError(f"at={at!r}: must be one of {', '.join(AT)}")
    if not a_dirs or not b_dirs:
        raise CompareError("compare needs at least one run on each side: compare RUN [RUN ...] --vs RUN [RUN ...]")
    paths = [str(Path(p).resolve()) for p in [*a_dirs, *b_dirs]]
    dup = next((p for p in paths if paths.count(p) > 1), None)
    if dup:
        raise CompareError(f"{dup} is passed twice; each run belongs to one group once")
    a, b = [_run(p) for p in a_dirs], [_run(p) for p in b_dirs]
    _check_group("A", a)
    _check_group("B", b)
    ca, cb = _cfg(a[0]), _cfg(b[0])
    for k in SAME_DATA:
        if ca.get(k) != cb.get(k):
            what = "base models" if k == "model" else "data"
            raise CompareError(f"the groups ran on different {what}: {k} is {_show(ca.get(k), k)} in A "
                               f"({a[0]['_path']}) and {_show(cb.get(k), k)} in B ({b[0]['_path']}); compare runs "
                               f"trained and scored on the same {'base model and data' if k == 'model' else 'data'}")
    differ = {k: (ca.get(k), cb.get(k)) for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)}
    if at == "best" and "metric_for_best" in differ:  # (each run's best is the best by its own metric)
        raise CompareError(f"--at best: A's runs picked their best evaluation by {differ['metric_for_best'][0]} and "
                           f"B's by {differ['metric_for_best'][1]}; compare their final evaluations (leave out --at "
                           "best), or runs trained with one --metric-for-best")
    fa, fb = [_final(r, at) for r in a], [_final(r, at) for r in b]
    common = [m for m in fa[0] if all(m in f for f in fa + fb)]
    if not common:
        raise CompareError(f"the runs' {at} dev evaluations share no metric")
    for r, f in zip(a + b, fa + fb):  # (a diverged evaluation: a mean and a t test of NaN say nothing)
        bad = next((m for m in common if not math.isfinite(f[m])), None)
        if bad is not None:
            raise CompareError(f"{r['_path']}: its {at} dev {bad} is {f[bad]} (a diverged run or evaluation); "
                               "compare runs whose dev scores are numbers, or leave this one out and say so")
    wanted = [c.get("metric_for_best") for c in (ca, cb)]
    primary = next((m for m in wanted if m in common), common[0])
    if wanted[0] == wanted[1] == primary:
        why = "the runs' --metric-for-best"
    elif primary in wanted:
        why = f"{'A' if wanted[0] == primary else 'B'}'s --metric-for-best (the groups name different ones)"
    else:
        why = (f"the first metric every run's final evaluation holds (their --metric-for-best, "
               f"{' / '.join(sorted({str(w) for w in wanted}))}, is not in every one)")
    order = [primary] + [m for m in common if m != primary]
    majority = _majority(a + b)
    same_rows = _fixed_dev(ca) or _seed(a[0]) == _seed(b[0])  # (a --dev-fraction split: by seed)
    # (the recorded predictions are the final evaluation's: at best, only where that is the best one in both runs)
    finals = at == "final" or all(_point(r, at) == _point(r) for r in (a[0], b[0]))
    recorded = _rows(a[0], b[0]) if len(a) == len(b) == 1 and same_rows else None
    rows = recorded if finals else None
    metrics = []
    sa, sb = [_seed(r) for r in a], [_seed(r) for r in b]
    for m in order:
        d = seed_difference(dict(zip(sa, (f[m] for f in fa))), dict(zip(sb, (f[m] for f in fb))), level)
        if rows is not None:
            d = _row_test(d, m, *rows)
        lower = lower_is_better(m)
        d["level"] = level
        metrics.append(dict(d, metric=m, lower_is_better=lower, majority=majority.get(m),
                            a_values=[f[m] for f in fa], b_values=[f[m] for f in fb],
                            verdict=_verdict(d, lower)))
    return {"a": _group(a, at), "b": _group(b, at), "differ": differ, "budget_differs": [k for k in BUDGET if k in differ],
            "metrics": metrics, "primary": primary, "primary_why": why, "level": level,
            "cost": {"a": _cost(a), "b": _cost(b)}, "at": at,
            # the primary metric's row test, which the runs' final evaluations would have had and their best has not
            "rows_at_final_only": recorded is not None and not finals and primary in ROW_TESTED}


def _fixed_dev(cfg: dict) -> bool:
    """Whether the runs' dev rows are the same whatever their seed: a --dev-data file, the shipped MRPC's dev.tsv (no
    --data), or a GLUE task folder's. A dev split of a --data file (--dev-fraction) is drawn by seed; so is one of a
    folder no longer there (it cannot be told from a file)."""
    data = cfg.get("data")
    return cfg.get("dev_data") is not None or data is None or \
        (isinstance(data, str) and Path(data).expanduser().is_dir())


def _rows(a: dict, b: dict):
    """(a's, b's predicted class of each dev row, the gold labels) where both runs recorded them (`train` records its
    final evaluation's, for a classifier) on the same dev rows, in the same order; else None."""
    from .cli import _label_ids

    n = a.get("dev_rows")
    labels = _label_ids(a.get("dev_labels"), n)
    pa, pb = (_label_ids(r["arms"]["run"].get("final_preds"), n) for r in (a, b))
    if labels is None or pa is None or pb is None or b.get("dev_labels") != a.get("dev_labels"):
        return None
    return pa, pb, labels


ROW_TESTED = ("accuracy", "f1", "macro_f1")  # the metrics `_row_test` tests on the dev rows


def _row_test(d: dict, metric: str, pa: list, pb: list, labels: list) -> dict:
    """One run a side: the difference tested on the dev rows the two predict differently (the demo's tests): accuracy
    by the exact McNemar test, F1 (of class 1) and macro-F1 by the paired permutation test (each row's two
    predictions swapped at random). It covers which dev rows were drawn, not the seed-to-seed spread of training,
    which one run a side cannot show. Other metrics (MCC): no test."""
    from .cli import _correct_rows
    from .data.metrics import paired_f1_test

    if metric == "accuracy":
        r = mcnemar(_correct_rows(pa, labels), _correct_rows(pb, labels))
        return dict(d, test="McNemar", p=r["p"], rows_differ=r["b"] + r["c"], only_a=r["b"], only_b=r["c"])
    if metric in ("f1", "macro_f1"):
        r = paired_f1_test(pa, pb, labels, 1 if metric == "f1" else None)
        return dict(d, test="permutation", p=r["p"], rows_differ=r["rows_differ"])
    return d


def _seed(run: dict):
    return (run.get("config") or {}).get("seed")


def _majority(runs: list[dict]) -> dict:
    """The majority class's dev scores, by the runs' metric names (a multi-task run's: TASK/metric), the mean over the
    runs that recorded one (a dev split of --data, drawn by seed, has its own majority score in each run)."""
    seen: dict = {}
    for run in runs:
        own = dict(run.get("majority") or {})
        for t in run.get("tasks") or []:
            own.update({f"{t['name']}/{k}": v for k, v in (t.get("majority") or {}).items()})
        for k, v in own.items():
            if isinstance(v, (int, float)):
                seen.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in seen.items()}


def _group(runs: list[dict], at: str = "final") -> dict:
    """The group's runs, seeds, label and the point of each run's evaluation compare reads (`points`: its final, or
    at best its best); `point`: theirs where they are all one, else None (runs early stopping stopped at different
    steps, or best at different evaluations)."""
    points = [_point(r, at) for r in runs]
    return {"runs": [r["_path"] for r in runs], "seeds": [_seed(r) for r in runs],
            "label": runs[0]["arms"]["run"].get("label", "run"), "points": points,
            "point": points[0] if len(set(points)) == 1 else None}


def _points(g: dict) -> str:
    """Where a group's runs were last evaluated: one point, or each point with the seeds of the runs ending there."""
    if g["point"] is not None:
        return g["point"]
    at: dict = {}
    for p, s in zip(g["points"], g["seeds"]):
        at.setdefault(p, []).append(str(s))
    return ", ".join(f"{p} (seed{'' if len(s) == 1 else 's'} {', '.join(s)})" for p, s in at.items())


def _mean(v: list) -> float | None:
    v = [x for x in v if isinstance(x, (int, float))]
    return sum(v) / len(v) if v else None


def _cost(runs: list[dict]) -> dict:
    phis = [r["arms"]["run"].get("phi") or {} for r in runs]
    modes: dict = {}
    for p in phis:
        for mode, n in (p.get("steps_in_mode") or {}).items():
            modes.setdefault(mode, []).append(n)
    fixed = not runs[0]["arms"]["run"].get("controller", True)  # (--no-controller: its φ is recorded, not acted on)
    return {"wall_s": _mean([r.get("wall_s") for r in runs]), "mean_rank": _mean([p.get("mean_rank") for p in phis]),
            "steps_in_mode": {m: sum(v) / len(v) for m, v in modes.items()} if modes and not fixed else None,
            "transitions": _mean([len(r["arms"]["run"].get("transitions") or []) for r in runs])}


def _verdict(d: dict, lower: bool) -> str:
    """'A better' / 'B better' beyond the noise (|Δ| > t·SE, or a row test's p below 1 − level), 'no difference
    beyond the noise', or why no test."""
    if d["test"] == "none":
        return "no test: one run on a side"
    if d["diff"] == 0:
        return "no difference"
    if d.get("no_spread"):  # (t = Δ/0: no t test; it read as an infinite t, "better", from two seeds)
        return "no test: no spread"
    if (abs(d["t"]) <= d["crit"]) if d["test"] in ("paired", "Welch") else d["p"] >= 1 - d["level"]:
        return "no difference beyond the noise"
    a_ahead = (d["diff"] < 0) if lower else (d["diff"] > 0)
    return "A better" if a_ahead else "B better"


def _settings(differ: dict, side: int) -> str:
    return ", ".join(f"{k} {_show(v[side], k)}" for k, v in differ.items()) or "the same settings"


def format_comparison(res: dict) -> str:
    """`unified-lora compare`'s report of `compare_runs`."""
    a, b = res["a"], res["b"]
    lines = []

    def seeds(g):
        return f"{len(g['runs'])} run{'' if len(g['runs']) == 1 else 's'}, seed{'' if len(g['seeds']) == 1 else 's'} " \
               + ", ".join(map(str, g["seeds"]))

    lines.append(f"A: {a['label']}, {seeds(a)}: {_settings(res['differ'], 0)}")
    lines.append(f"B: {b['label']}, {seeds(b)}: {_settings(res['differ'], 1)}")
    if not res["differ"]:
        lines.append("The two groups ran the same settings: any difference between them is seed-to-seed noise.")
    if res["budget_differs"]:
        lines.append("Note: the groups' training budgets differ (" + ", ".join(res["budget_differs"]) + "), so a "
                     "difference is not the method's alone.")
    point = a["point"] if a["point"] == b["point"] is not None else f"A {_points(a)}; B {_points(b)}"
    which = "final dev evaluation" if res.get("at", "final") == "final" else \
        f"best dev evaluation of each run (by {res['primary']})"
    lines.append(f"\n{which}, at {point}; mean ± std over seeds:")
    rows = [("metric", "A", "B", "majority class", "A − B", "test", "verdict")]
    for m in res["metrics"]:
        def ms(mean, sd, n):
            return f"{mean:.4f}" + (f" ± {sd:.4f}" if n > 1 else "") + f" (n={n})"
        if m["test"] == "none":
            delta, test = f"{m['diff']:+.4f}", "-"
        elif m["test"] in ("McNemar", "permutation"):
            delta = f"{m['diff']:+.4f}"
            rows_are = "discordant" if m["test"] == "McNemar" else "differing"
            test = f"{m['test']}, {m['rows_differ']} {rows_are} rows, p = {m['p']:.3g}"
        else:
            delta = f"{m['diff']:+.4f} ± {m['se']:.4f} SE"
            test = (f"{m['test']}, SE 0: no t" if m.get("no_spread") else
                    f"{m['test']} t({m['df']:.3g}) = {m['t']:.2f}, p = {m['p']:.3g}")
        maj = f"{m['majority']:.4f}" if isinstance(m.get("majority"), (int, float)) else "-"
        name = m["metric"] + (" (lower is better)" if m["lower_is_better"] else "")
        rows.append((name, ms(m["mean_a"], m["sd_a"], m["n_a"]), ms(m["mean_b"], m["sd_b"], m["n_b"]), maj, delta,
                     test, m["verdict"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [table[0], "-" * len(table[0]), *table[1:]]
    lines += ["", *_reading(res)]
    ca, cb = res["cost"]["a"], res["cost"]["b"]
    lines.append("")
    for name, c in (("A", ca), ("B", cb)):
        parts = []
        if c["wall_s"] is not None:
            parts.append(f"{c['wall_s']:.1f} s wall a run")
        if c["mean_rank"] is not None:
            parts.append(f"mean rank {c['mean_rank']:.2f}")
        if c["steps_in_mode"]:
            parts.append("mean steps per mode " + ", ".join(f"{m} {_num(n)}" for m, n in c["steps_in_mode"].items()))
        if c["transitions"]:
            parts.append(f"{_num(c['transitions'])} transition{'' if c['transitions'] == 1 else 's'} a run")
        if parts:
            lines.append(f"cost {name}: " + "; ".join(parts))
    return "\n".join(lines)


def _discordant(m: dict) -> str:
    """The dev rows a row test reads: those one run gets right and the other wrong (McNemar: A's and B's counts), or
    those they predict differently (the permutation test)."""
    k = m["rows_differ"]
    if m["test"] == "McNemar":
        return f"the {k} dev rows one run gets right and the other wrong ({m['only_a']} A, {m['only_b']} B)"
    return f"the {k} dev rows the runs predict differently"


def _num(x: float) -> str:
    return f"{x:g}" if float(x).is_integer() else f"{x:.1f}"


def _reading(res: dict) -> list[str]:
    """The verdict in words, on the primary metric (the runs' metric_for_best): the others are for reference."""
    m = res["metrics"][0]
    level = res["level"]
    name = m["metric"]
    out = []
    if m["test"] in ("McNemar", "permutation"):
        sign = "lower" if m["lower_is_better"] else "higher"
        what = (f"{'B' if m['verdict'] == 'B better' else 'A'} is better, beyond the noise of the dev rows"
                if m["verdict"] in ("A better", "B better") else "no difference beyond the noise of the dev rows")
        out.append(f"Verdict on {name} ({sign} is better): {what}: A − B = {m['diff']:+.4f}, "
                   f"{'the exact McNemar test' if m['test'] == 'McNemar' else 'a paired permutation test'} on "
                   f"{_discordant(m)}, p = {m['p']:.3g} (a difference "
                   f"counts at p < {1 - level:g}). This covers which dev rows were drawn, not the seed-to-seed spread "
                   "of training, which one run a side cannot show and which is often larger: train each side with "
                   "two or more further --seed values and compare again.")
    elif m["test"] == "none":
        out.append(f"Verdict on {name}: no test. With one run on a side the seed-to-seed spread is unknown, and it is "
                   "often larger than the difference between two methods: train each side with two or more further "
                   "--seed values and compare again (the same seeds on both sides pair the test).")
    else:
        how = ("paired by seed" if m["test"] == "paired" else "Welch's test: the groups share fewer than two seeds, "
               "so they do not pair")
        sign = "lower" if m["lower_is_better"] else "higher"
        if m.get("no_spread"):
            same = ("every seed differs by the same amount" if m["test"] == "paired" else
                    "each group's runs all scored the same")
            out.append(f"Verdict on {name} ({sign} is better): no test: A − B = {m['diff']:+.4f}, {how}, and "
                       f"{same}: no spread to test against ({m['n_a']} and {m['n_b']} runs); train each side with "
                       "further --seed values and compare again.")
        elif m["verdict"] in ("A better", "B better"):
            who = m["verdict"].split()[0]
            out.append(f"Verdict on {name} ({sign} is better): {who} is better, beyond the noise: A − B = "
                       f"{m['diff']:+.4f} ± {m['se']:.4f} SE, {how}, p = {m['p']:.3g} < {1 - level:g}.")
        else:
            none = "no difference" if m["verdict"] == "no difference" else "no difference beyond the noise"
            out.append(f"Verdict on {name} ({sign} is better): {none}: A − B = "
                       f"{m['diff']:+.4f} ± {m['se']:.4f} SE, {how}, p = {m['p']:.3g} (a difference counts at "
                       f"p < {1 - level:g}; {m['n_a']} and {m['n_b']} runs).")
    left = m.get("left_out") or {}
    if left.get("a") or left.get("b"):
        def seeds(k: str) -> str:
            one = len(left[k]) == 1
            return f"seed{'' if one else 's'} {', '.join(map(str, left[k]))} {'is' if one else 'are'}"

        out.append("Paired on the seeds both groups ran: " + "; ".join(
            f"{g}'s {seeds(k)} in its mean, not in the test" for g, k in (("A", "a"), ("B", "b")) if left.get(k)) + ".")
    if res.get("at") == "best":
        # (said only where the final evaluations' rows would have been tested: not for a causal LM, a metric with no
        # row test (MCC) or runs scored on other dev rows, which are not tested at their final evaluation either)
        rows = (" The dev rows are not tested: a run records its predictions at its final evaluation only."
                if res.get("rows_at_final_only") else "")
        out.append("Each run's best evaluation was picked on these same dev rows, so both groups' scores are "
                   "optimistic, the more so the more a run's evaluations vary: the final evaluation (without --at "
                   f"best) carries no such selection.{rows}")
    why = res.get("primary_why", "the runs' --metric-for-best")
    if len(res["metrics"]) > 1:
        out.append(f"{name} is {why}; the other metrics are shown for reference, and testing each of them as well "
                   "would find a difference by chance more often.")
    elif why != "the runs' --metric-for-best":
        out.append(f"{name} is {why}.")
    # a controller that never moved trained what --no-controller trains: said where the other group is that baseline
    # (the groups differ in `controller`), not beside another controller group (two LRs, say), where it is no point
    for g in ("a", "b") if "controller" in res["differ"] else ():
        c = res["cost"][g]
        modes = c.get("steps_in_mode") or {}
        if modes and not c.get("transitions") and not any(modes.get(k) for k in ("SINGLE", "MIRROR")):
            out.append(f"{g.upper()}'s controller made no transition in any of its runs: it trained in MULTI "
                       "throughout, at its rank and LR, as a --no-controller run does, so a difference from such a "
                       "baseline is not the controller's doing.")
    maj = m.get("majority")
    if isinstance(maj, (int, float)) and not m["lower_is_better"]:
        at = [g for g, mean in (("A", m["mean_a"]), ("B", m["mean_b"])) if mean <= maj + 1e-12]
        if at:
            out.append(f"{' and '.join(at)} score{'' if len(at) > 1 else 's'} no better on {name} than always "
                       f"predicting the majority class ({maj:.4f}): {'neither has' if len(at) > 1 else 'it has not'} "
                       "learned the task yet, so the comparison says little about the method.")
    return out


def jsonable(res):
    """`compare_runs`'s result with NaN and infinities as None (null), for strict JSON readers: a group of one run has
    no standard deviation, and one run a side no standard error."""
    if isinstance(res, dict):
        return {k: jsonable(v) for k, v in res.items()}
    if isinstance(res, (list, tuple)):
        return [jsonable(v) for v in res]
    return None if isinstance(res, float) and not math.isfinite(res) else res


__all__ = ["CompareError", "compare_runs", "format_comparison", "jsonable"]
