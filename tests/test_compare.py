"""`unified-lora compare`: two groups of train runs on their final dev scores, with Student's t test."""

from __future__ import annotations

import json
import math
import shutil
import statistics

import pytest
import test_cli
from test_cli import _train_args

from unified_lora.cli import main
from unified_lora.compare import compare_runs
from unified_lora.stats import seed_difference

tiny = test_cli.tiny  # the tiny BERT and data files of test_cli.py (a module-scoped fixture)


def test_seed_difference_matches_scipys_paired_and_welch_t_tests():
    # references: scipy.stats.ttest_rel / ttest_ind(equal_var=False) on these numbers (scipy is not a dependency)
    d = seed_difference({0: 0.81, 1: 0.84, 2: 0.80}, {0: 0.80, 1: 0.82, 2: 0.79})
    assert d["test"] == "paired" and d["df"] == 2
    assert d["t"] == pytest.approx(4.0) and d["p"] == pytest.approx(0.05719095841793663, rel=1e-9)
    assert d["diff"] == pytest.approx(0.04 / 3) and d["crit"] == pytest.approx(4.302652729749, rel=1e-9)
    w = seed_difference({0: 0.81, 1: 0.84, 2: 0.80, 3: 0.83}, {5: 0.78, 6: 0.80, 7: 0.79})
    assert w["test"] == "Welch" and w["df"] == pytest.approx(4.741935483870975, rel=1e-12)
    assert w["t"] == pytest.approx(2.777460299317661) and w["p"] == pytest.approx(0.04134736635451786, rel=1e-9)
    # the same seeds on both sides pair; other seeds do not, even with as many runs
    assert seed_difference({0: 1, 1: 2}, {0: 1, 1: 3})["test"] == "paired"
    assert seed_difference({0: 1, 1: 2}, {2: 1, 3: 3})["test"] == "Welch"
    with pytest.raises(ValueError, match="the values must be finite"):  # (not statistics.stdev's AttributeError)
        seed_difference({0: 0.8, 1: float("nan")}, {0: 0.7, 1: 0.6})
    one = seed_difference({0: 0.9}, {0: 0.5})
    assert one["test"] == "none" and one["diff"] == pytest.approx(0.4) and math.isnan(one["p"])


def test_differences_with_no_spread_get_no_t_test_not_an_infinite_t():
    """Per-seed differences all the same (and not 0) have SE 0: t = Δ/0 was inf, p 0, and two seeds read as a certain
    difference. With no spread there is nothing to test against: t and p are NaN and `no_spread` says why; a spread
    at the values' float rounding (0.9 − 0.8 and 0.8 − 0.7 differ in their last bits: t was 1.6e15) is none. A
    difference of 0 in every seed stays t 0, p 1."""
    for a, b, test in (({0: 0.9, 1: 0.8}, {0: 0.8, 1: 0.7}, "paired"),  # rounding: 0.09999999999999998, 0.1000...09
                       ({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.5, 1: 1.5, 2: 2.5}, "paired"),  # exactly 0.5 each
                       ({0: 0.5, 1: 0.5}, {2: 0.4, 3: 0.4}, "Welch")):  # no spread within either group
        d = seed_difference(a, b)
        assert math.isnan(d["t"]) and math.isnan(d["p"]) and d["diff"] == pytest.approx(
            statistics.fmean(a.values()) - statistics.fmean(b.values())), d
        assert d["test"] == test and d["no_spread"] and d["se"] == 0, d
    same = seed_difference({0: 0.8, 1: 0.6}, {0: 0.8, 1: 0.6})
    assert (same["diff"], same["se"], same["t"], same["p"], same["no_spread"]) == (0, 0, 0, 1, False)
    spread = seed_difference({0: 0.9, 1: 0.8}, {0: 0.8, 1: 0.75})  # a real spread is tested as before
    assert not spread["no_spread"] and spread["t"] == pytest.approx(0.075 / 0.025)



def test_a_difference_at_float_rounding_with_no_spread_is_no_difference_not_untested():
    """(found by the review) Runs that scored the same but for the last bits of a float (a multi-task run's `average`
    of three tasks summed in another order: 0.1 + 0.2 + 0.3 against 0.3 + 0.2 + 0.1) had a spread at that rounding, read
    as none, beside a Δ of 3e-17 that was not 0: "no test: no spread", where before the no-spread rule it was "no
    difference beyond the noise". A Δ at the values' rounding, with no spread, is no difference: Δ 0, t 0, p 1."""
    from unified_lora.compare import _verdict

    up, down = sum([0.1, 0.2, 0.3]) / 3, sum([0.3, 0.2, 0.1]) / 3
    assert up != down  # (the same scores, summed in another order)
    for a, b, test in (({0: up, 1: 0.5}, {0: down, 1: 0.5}, "paired"),
                       ({0: 0.1 + 0.2, 1: 0.1 + 0.2}, {2: 0.3, 3: 0.3}, "Welch")):
        d = seed_difference(a, b)
        assert d["test"] == test and not d["no_spread"], d
        assert (d["diff"], d["se"], d["t"], d["p"]) == (0, 0, 0, 1), d
        assert _verdict(d, False) == "no difference"
    # a Δ beyond the rounding, with no spread, is still untested
    assert seed_difference({0: 0.3, 1: 0.5}, {0: 0.3 - 1e-9, 1: 0.5 - 1e-9})["no_spread"]

def _runs(tiny, root, name, seeds, *extra):
    out = []
    for s in seeds:
        d = root / f"{name}_s{s}"
        assert main(_train_args(tiny, d, "--steps", "80", "--seed", str(s), "--dev-data", tiny["csv"], *extra)) == 0
        out.append(d)
    return out


def _final(d, metric):
    ev = json.loads((d / "summary.json").read_text())["arms"]["run"]["eval"]
    return ev[list(ev)[-1]][metric]


@pytest.fixture(scope="module")
def groups(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    learns = ("--no-controller", "--lrs", "3e-2", "3e-2", "3e-2")
    return {"learns": _runs(tiny, root, "learns", (0, 1, 2), *learns),
            "frozen": _runs(tiny, root, "frozen", (0, 1, 2), "--no-controller", "--lrs", "1e-9", "1e-9", "1e-9"),
            "controller": _runs(tiny, root, "ctrl", (0, 1, 2), "--lrs", "3e-2", "3e-2", "3e-2"),
            # a controller whose φ never leaves the MULTI band: it trains what --no-controller trains
            "still": _runs(tiny, root, "still", (0, 1), "--lrs", "3e-2", "3e-2", "3e-2", "--theta0", "0.01",
                           "--theta1", "0.99"),
            "root": root}


def test_compare_finds_a_real_difference_paired_by_seed_and_its_numbers_are_the_runs(groups, capsys, tmp_path):
    """The learning runs score 1.0 and the frozen ones 0.5 in every seed: no spread, so no t test (see
    test_compare_of_runs_whose_seeds_all_differ_by_the_same_amount_says_there_is_no_spread_to_test); that verdict is
    checked here on the runs as they are. The t test itself is checked with one frozen run scoring two dev rows (of
    64) more, so the per-seed differences spread."""
    assert main(["compare", *map(str, groups["learns"]), "--vs", *map(str, groups["frozen"])]) == 0
    text = capsys.readouterr().out
    assert "every seed differs by the same amount: no spread to test against" in text
    # the frozen side is at the majority class (the data is balanced: half the rows): said so
    assert "B scores no better on accuracy than always predicting the majority class (0.5000)" in text

    def two_more_rows(s):
        ev = s["arms"]["run"]["eval"]
        ev[list(ev)[-1]]["accuracy"] += 2 / 64

    frozen = [groups["frozen"][0], _edited(groups["frozen"][1], tmp_path / "frozen_s1", two_more_rows),
              groups["frozen"][2]]
    out = tmp_path / "cmp.json"
    assert main(["compare", *map(str, groups["learns"]), "--vs", *map(str, frozen), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["differ"] == {"mode_lrs": [[0.03] * 3, [1e-9] * 3]} and res["primary"] == "accuracy"
    acc = res["metrics"][0]
    a = [_final(d, "accuracy") for d in groups["learns"]]
    b = [_final(d, "accuracy") for d in frozen]
    assert acc["metric"] == "accuracy" and acc["test"] == "paired" and acc["df"] == 2
    assert acc["mean_a"] == pytest.approx(statistics.fmean(a)) and acc["mean_b"] == pytest.approx(statistics.fmean(b))
    d = [x - y for x, y in zip(a, b)]
    assert acc["diff"] == pytest.approx(statistics.fmean(d))
    assert acc["se"] == pytest.approx(statistics.stdev(d) / 3 ** .5)
    assert statistics.fmean(a) > 0.9 and acc["verdict"] == "A better", (a, b)  # the tiny BERT learns its words
    assert "Verdict on accuracy (higher is better): A is better, beyond the noise" in text
    assert "A: LoRA (fixed rank), 3 runs, seeds 0, 1, 2: mode_lrs 0.03,0.03,0.03" in text
    # the other way round: B better, the same numbers with the sign turned
    assert main(["compare", *map(str, frozen), "--vs", *map(str, groups["learns"])]) == 0
    assert "B is better, beyond the noise: A − B = -" in capsys.readouterr().out


def test_compare_of_the_controller_with_its_baseline_names_what_differs_and_the_cost(groups, capsys):
    assert main(["compare", *map(str, groups["controller"]), "--vs", *map(str, groups["learns"])]) == 0
    text = capsys.readouterr().out
    assert "A: Unified LoRA, 3 runs, seeds 0, 1, 2: controller on" in text
    assert "B: LoRA (fixed rank), 3 runs, seeds 0, 1, 2: controller off" in text
    assert "cost A: " in text and "mean steps per mode SINGLE" in text.split("cost A: ")[1].split("\n")[0]
    # a --no-controller run records φ but never moves: no steps per mode for it, its fixed rank instead
    assert "steps per mode" not in text.split("cost B: ")[1] and "mean rank 8.00" in text.split("cost B: ")[1]


def test_a_train_run_records_its_final_predictions_as_scored(groups):
    for d in groups["learns"] + groups["frozen"]:
        s = json.loads((d / "summary.json").read_text())
        preds, labels = s["arms"]["run"]["final_preds"], s["dev_labels"]
        assert len(preds) == len(labels) == s["dev_rows"] == 64
        assert sum(p == y for p, y in zip(preds, labels)) / 64 == pytest.approx(_final(d, "accuracy"))


def test_compare_with_one_run_a_side_tests_the_dev_rows_and_says_seeds_are_not_covered(groups, capsys, tmp_path):
    out = tmp_path / "one.json"
    a, b = groups["learns"][0], groups["frozen"][0]
    assert main(["compare", str(a), "--vs", str(b), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    acc, f1 = json.loads(out.read_text())["metrics"]
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    y, pa, pb = sa["dev_labels"], sa["arms"]["run"]["final_preds"], sb["arms"]["run"]["final_preds"]
    only_a = sum(p == t and q != t for p, q, t in zip(pa, pb, y))
    only_b = sum(q == t and p != t for p, q, t in zip(pa, pb, y))
    assert (acc["test"], acc["only_a"], acc["only_b"]) == ("McNemar", only_a, only_b) and only_a > 20
    assert acc["p"] == pytest.approx(2 * 0.5 ** only_a) and acc["verdict"] == "A better"  # only_b == 0: 2·P(X=0)
    assert f1["metric"] == "macro_f1" and f1["test"] == "permutation" and f1["verdict"] == "A better"
    assert "A is better, beyond the noise of the dev rows" in text and "not the seed-to-seed spread" in text
    # runs that did not record their rows (a summary.json before they were): no test, and what to run
    for d in (a, b):
        copy = tmp_path / d.name
        shutil.copytree(d, copy)
        s = json.loads((copy / "summary.json").read_text())
        del s["arms"]["run"]["final_preds"]
        (copy / "summary.json").write_text(json.dumps(s))
    assert main(["compare", str(tmp_path / a.name), "--vs", str(tmp_path / b.name)]) == 0
    text = capsys.readouterr().out
    assert "Verdict on accuracy: no test. With one run on a side the seed-to-seed spread is unknown" in text
    assert "no test: one run on a side" in text


def test_compare_with_other_seeds_on_each_side_is_welchs_test(groups, capsys, tmp_path):
    out = tmp_path / "c.json"
    assert main(["compare", *map(str, groups["learns"][:2]), "--vs", str(groups["frozen"][2]),
                 str(groups["frozen"][1]), "--json", str(out)]) == 0  # seeds 0,1 vs 2,1: they do not pair
    assert json.loads(out.read_text())["metrics"][0]["test"] == "Welch"
    assert "Welch's test: the groups share fewer than two seeds, so they do not pair" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["mixed", "seed_twice", "same_path", "other_data", "other_model", "unfinished", "demo",
                                  "no_dir"])
def test_compare_refuses_runs_that_do_not_compare_naming_why(groups, tiny, tmp_path, capsys, case):
    learns, frozen = [str(d) for d in groups["learns"]], [str(d) for d in groups["frozen"]]
    if case == "mixed":
        args, want = [learns[0], frozen[1], "--vs", frozen[0]], "group A mixes settings: mode_lrs is 0.03,0.03,0.03 in"
    elif case == "seed_twice":
        copy = tmp_path / "copy"
        shutil.copytree(learns[0], copy)
        args, want = [learns[0], str(copy), "--vs", frozen[0]], "both ran seed 0; a group is one setting"
    elif case == "same_path":
        args, want = [learns[0], "--vs", learns[0]], "is passed twice"
    elif case == "other_data":
        other = _runs(tiny, tmp_path, "other", (0,), "--no-controller", "--max-length", "12")[0]
        args, want = [learns[0], "--vs", str(other)], "the groups ran on different data: max_length is 16 in A"
    elif case == "other_model":  # (it said "the groups ran on different data: model is ...")
        copy = tmp_path / "copy"
        shutil.copytree(frozen[0], copy)
        s = json.loads((copy / "summary.json").read_text())
        s["config"]["model"] = "org/other-bert"
        (copy / "summary.json").write_text(json.dumps(s))
        args, want = [learns[0], "--vs", str(copy)], \
            f"the groups ran on different base models: model is {tiny['bert']} in A"
    elif case == "unfinished":
        copy = tmp_path / "copy"
        shutil.copytree(learns[0], copy)
        (copy / "summary.json").unlink()
        args, want = [str(copy), "--vs", frozen[0]], "no current summary.json (the run stopped at step 80 of 80"
    elif case == "demo":
        copy = tmp_path / "copy"
        shutil.copytree(learns[0], copy)
        s = json.loads((copy / "summary.json").read_text())
        s["command"] = "demo"
        (copy / "summary.json").write_text(json.dumps(s))
        args, want = [str(copy), "--vs", frozen[0]], "not a `unified-lora train` run (a demo compares its own two arms"
    else:
        args, want = [str(tmp_path / "nowhere"), "--vs", frozen[0]], "no such run folder"
    assert main(["compare", *args]) == 2
    err = capsys.readouterr().err
    assert want in err and err.count("\n") == 1, err


def test_compare_of_causal_lm_runs_reads_loss_and_perplexity_as_lower_is_better(tiny, tmp_path, capsys):
    def lm(name, seed, *extra):
        d = tmp_path / f"{name}_s{seed}"
        assert main(["train", "--model", tiny["gpt2"], "--data", tiny["csv"], "--text-columns", "text", "--steps", "6",
                     "--batch-size", "8", "--max-length", "16", "--seed", str(seed), "--log-every", "0",
                     "--output-dir", str(d), *extra]) == 0
        return d

    trained = [lm("lm", s, "--no-controller", "--lrs", "1e-2", "1e-2", "1e-2") for s in (0, 1)]
    frozen = [lm("frozen", s, "--no-controller", "--lrs", "1e-9", "1e-9", "1e-9") for s in (0, 1)]
    out = tmp_path / "lm.json"
    capsys.readouterr()
    assert main(["compare", *map(str, trained), "--vs", *map(str, frozen), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    loss, ppl = json.loads(out.read_text())["metrics"]
    assert (loss["metric"], ppl["metric"]) == ("loss", "perplexity") and loss["lower_is_better"]
    a = [_final(d, "loss") for d in trained]
    b = [_final(d, "loss") for d in frozen]
    assert loss["diff"] == pytest.approx(statistics.fmean(a) - statistics.fmean(b)) and loss["diff"] < 0
    # a lower loss is A ahead: the verdict's side follows the metric's direction, beyond the noise or not
    assert loss["verdict"] in ("A better", "no difference beyond the noise")
    assert "Verdict on loss (lower is better)" in text and "\nloss (lower is better) " in text
    assert "majority class" not in text.split("Verdict")[1]  # a causal LM has none
    # (found by the review) one run a side at best: a causal LM's dev rows are not tested at any evaluation (no row
    # test of a loss), so the report does not say that it is for want of the best evaluation's predictions
    assert main(["compare", str(trained[0]), "--vs", str(frozen[0]), "--at", "best", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Verdict on loss: no test. With one run on a side" in text and "optimistic" in text
    assert "records its predictions at its final evaluation only" not in text, text
    assert json.loads(out.read_text())["rows_at_final_only"] is False


def test_compare_of_multitask_runs_reads_each_tasks_metrics_and_their_average(tiny, tmp_path, capsys):
    flipped = tmp_path / "flipped.csv"
    flipped.write_text("text,label\n" + "".join(f"{t},{1 - y}\n" for t, y in test_cli._rows(40, seed=2)))

    def mt(name, seed, *extra):
        d = tmp_path / f"{name}_s{seed}"
        assert main(["train", "--model", tiny["bert"], "--data", tiny["csv"], str(flipped), "--task-names", "a,b",
                     "--steps", "6", "--batch-size", "8", "--max-length", "16", "--seed", str(seed), "--log-every", "0",
                     "--output-dir", str(d), *extra]) == 0
        return d

    out = tmp_path / "mt.json"
    assert main(["compare", str(mt("ctrl", 0)), str(mt("ctrl", 1)), "--vs", str(mt("base", 0, "--no-controller")),
                 str(mt("base", 1, "--no-controller")), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    names = [m["metric"] for m in res["metrics"]]
    assert names[0] == res["primary"] == "average" and "a/accuracy" in names and "b/accuracy" in names
    by = {m["metric"]: m for m in res["metrics"]}
    assert by["a/accuracy"]["majority"] == pytest.approx(0.5)  # each task's own majority class, by its name
    assert res["differ"] == {"controller": [True, False]} and by["average"]["test"] == "paired"


def _edited(src, dst, edit):
    """A copy of run folder `src` at `dst` with its summary.json changed by `edit(summary)` (a run as another version,
    or another outcome, would have written it)."""
    shutil.copytree(src, dst)
    s = json.loads((dst / "summary.json").read_text())
    edit(s)
    (dst / "summary.json").write_text(json.dumps(s))
    return dst


def test_a_run_whose_final_dev_metric_is_not_finite_is_refused_in_one_line_naming_it(groups, tmp_path, capsys):
    """(found by the review) a NaN reached statistics.stdev: an internal error; a NaN difference read as B better."""
    def diverged(s):
        ev = s["arms"]["run"]["eval"]
        ev[list(ev)[-1]]["accuracy"] = float("nan")

    bad = _edited(groups["frozen"][0], tmp_path / "bad", diverged)
    assert main(["compare", *map(str, groups["learns"][:2]), "--vs", str(bad), str(groups["frozen"][1])]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: its final dev accuracy is nan (a diverged run or evaluation)" in err and err.count("\n") == 1, err


def test_at_best_a_run_with_no_finite_score_is_told_it_diverged_not_that_it_is_old(groups, tmp_path, capsys):
    """(found by the review) `--at best` on a run none of whose evaluations scored a number (so it has no best) said
    "a run saved before the best was"; and a NaN at the best evaluation was called the "final" one."""
    def diverged(s):
        for e in s["arms"]["run"]["eval"].values():
            e["accuracy"] = float("nan")
        s["best"] = None

    bad = _edited(groups["frozen"][0], tmp_path / "bad", diverged)
    assert main(["compare", str(bad), str(groups["frozen"][1]), "--vs", *map(str, groups["learns"][:2]),
                 "--at", "best"]) == 2
    err = capsys.readouterr().err
    assert err == (f"unified-lora: error: {bad}: no best evaluation recorded (none of its dev accuracy scores is a "
                   "number: a diverged run); compare its final evaluation (leave out --at best)\n"), err

    def nan_at_best(s):
        s["arms"]["run"]["eval"][s["best"]["point"]]["macro_f1"] = float("nan")

    bad2 = _edited(groups["frozen"][0], tmp_path / "bad2", nan_at_best)
    assert main(["compare", str(bad2), str(groups["frozen"][1]), "--vs", *map(str, groups["learns"][:2]),
                 "--at", "best"]) == 2
    assert f"{bad2}: its best dev macro_f1 is nan (a diverged run or evaluation)" in capsys.readouterr().err


def test_compare_of_runs_whose_seeds_all_differ_by_the_same_amount_says_there_is_no_spread_to_test(groups, tmp_path,
                                                                                                    capsys):
    """Two seeds a side whose final accuracies differ by 0.1 in each: SE 0, and compare read "A better" (t = inf,
    p = 0). It says now that there is no spread to test against; the JSON's t and p are null."""
    def acc(v):
        def edit(s):
            ev = s["arms"]["run"]["eval"]
            ev[list(ev)[-1]]["accuracy"] = v
        return edit

    a = [_edited(d, tmp_path / f"a{i}", acc(v)) for i, (d, v) in enumerate(zip(groups["learns"][:2], (0.9, 0.8)))]
    b = [_edited(d, tmp_path / f"b{i}", acc(v)) for i, (d, v) in enumerate(zip(groups["frozen"][:2], (0.8, 0.7)))]
    out = tmp_path / "c.json"
    assert main(["compare", *map(str, a), "--vs", *map(str, b), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    m = json.loads(out.read_text())["metrics"][0]
    assert m["metric"] == "accuracy" and m["test"] == "paired"
    assert m["verdict"] == "no test: no spread" and m["t"] is None and m["p"] is None, m
    assert m["no_spread"]
    assert "paired, SE 0: no t" in text
    assert ("Verdict on accuracy (higher is better): no test: A − B = +0.1000, paired by seed, and every seed differs "
            "by the same amount: no spread to test against (2 and 2 runs)") in text, text
    assert "A is better" not in text


def test_compare_pairs_on_the_seeds_both_ran_and_names_the_runs_left_out_of_the_test(groups, capsys, tmp_path):
    out = tmp_path / "p.json"
    assert main(["compare", *map(str, groups["learns"]), "--vs", *map(str, groups["frozen"][:2]),
                 "--json", str(out)]) == 0
    acc = json.loads(out.read_text())["metrics"][0]
    a = [_final(d, "accuracy") for d in groups["learns"]]
    b = [_final(d, "accuracy") for d in groups["frozen"][:2]]
    assert acc["test"] == "paired" and acc["df"] == 1 and acc["left_out"] == {"a": [2], "b": []}
    assert acc["diff"] == pytest.approx(statistics.fmean([a[0] - b[0], a[1] - b[1]]))
    assert acc["mean_a"] == pytest.approx(statistics.fmean(a))  # seed 2 stays in A's mean
    assert "Paired on the seeds both groups ran: A's seed 2 is in its mean, not in the test." in capsys.readouterr().out


def test_compare_json_is_strict_json_and_the_primary_metrics_origin_is_named(groups, tmp_path, capsys):
    out = tmp_path / "one.json"
    assert main(["compare", str(groups["learns"][0]), "--vs", str(groups["controller"][0]), "--json", str(out)]) == 0
    res = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert res["metrics"][0]["sd_a"] is None and res["primary_why"] == "the runs' --metric-for-best"
    capsys.readouterr()

    def other_metric(s):
        s["config"]["metric_for_best"] = "mcc"

    a = [_edited(d, tmp_path / f"a{i}", other_metric) for i, d in enumerate(groups["learns"][:2])]
    assert main(["compare", *map(str, a), "--vs", *map(str, groups["frozen"][:2])]) == 0
    text = capsys.readouterr().out
    assert "accuracy is B's --metric-for-best (the groups name different ones)" in text, text


def test_eval_steps_count_as_a_setting_where_early_stopping_reads_them(groups, tmp_path, capsys):
    def evals(every, patience):
        def edit(s):
            s["config"].update(eval_steps=every, early_stopping_patience=patience)
        return edit

    # without early stopping --eval-steps changes no training: a group may mix them
    free = [_edited(d, tmp_path / f"f{i}", evals(4 * (i + 1), 0)) for i, d in enumerate(groups["learns"][:2])]
    assert main(["compare", *map(str, free), "--vs", *map(str, groups["frozen"][:2])]) == 0
    stop = [_edited(d, tmp_path / f"s{i}", evals(4 * (i + 1), 2)) for i, d in enumerate(groups["learns"][:2])]
    capsys.readouterr()
    assert main(["compare", *map(str, stop), "--vs", *map(str, groups["frozen"][:2])]) == 2
    assert "group A mixes settings: eval_steps is 4 in" in capsys.readouterr().err


def test_the_majority_class_is_the_mean_of_each_runs_own(groups, tmp_path):
    def majority(v):
        def edit(s):
            s["majority"]["accuracy"] = v
        return edit

    b = [_edited(d, tmp_path / f"b{i}", majority(v)) for i, (d, v) in enumerate(zip(groups["frozen"][:2], (0.4, 0.6)))]
    a = [_edited(d, tmp_path / f"a{i}", majority(0.7)) for i, d in enumerate(groups["learns"][:2])]
    from unified_lora.compare import compare_runs

    res = compare_runs(a, b)
    assert res["metrics"][0]["majority"] == pytest.approx((0.7 + 0.7 + 0.4 + 0.6) / 4)


def test_one_run_a_side_of_other_seeds_on_a_dev_split_of_the_data_gets_no_row_test(groups, tmp_path, capsys):
    """A dev split of --data (--dev-fraction) is drawn by seed: runs of two seeds were scored on other rows, so the
    rows cannot pair, even where the labels read alike."""
    def split(s):
        s["config"]["dev_data"] = None

    a = _edited(groups["learns"][0], tmp_path / "a", split)
    b = _edited(groups["frozen"][1], tmp_path / "b", split)
    same = _edited(groups["frozen"][0], tmp_path / "same", split)
    out = tmp_path / "x.json"
    assert main(["compare", str(a), "--vs", str(b), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"][0]["test"] == "none"
    assert main(["compare", str(a), "--vs", str(same), "--json", str(out)]) == 0  # one seed: one split
    assert json.loads(out.read_text())["metrics"][0]["test"] == "McNemar"


def test_a_controller_that_never_moved_is_said_to_have_trained_as_the_baseline(groups, capsys):
    assert main(["compare", *map(str, groups["still"]), "--vs", *map(str, groups["learns"][:2])]) == 0
    text = capsys.readouterr().out
    said = "A's controller made no transition in any of its runs: it trained in MULTI throughout"
    assert said in text and "verdict" in text
    # they scored alike on every seed: the verdict says no difference, not "none beyond the noise"
    assert "Verdict on accuracy (higher is better): no difference: A − B = +0.0000" in text
    a = [_final(d, "accuracy") for d in groups["still"]]
    assert a == [_final(d, "accuracy") for d in groups["learns"][:2]]  # and it did: the same scores, seed by seed
    assert main(["compare", *map(str, groups["controller"]), "--vs", *map(str, groups["learns"])]) == 0
    assert "made no transition" not in capsys.readouterr().out  # (that controller moved: SINGLE at some steps)
    # beside another controller group (here other thresholds) the baseline is not in the comparison: no note
    assert main(["compare", *map(str, groups["still"]), "--vs", *map(str, groups["controller"][:2])]) == 0
    text = capsys.readouterr().out
    assert "A: Unified LoRA, 2 runs, seeds 0, 1: theta0 0.01, theta1 0.99" in text and "made no transition" not in text
    assert main(["compare", *map(str, groups["learns"][:2]), "--vs", *map(str, groups["still"])]) == 0
    assert "B's controller made no transition in any of its runs" in capsys.readouterr().out  # (either side)


def test_a_run_resumed_with_other_settings_is_not_taken_for_one_trained_with_its_last_ones(groups, tiny, tmp_path,
                                                                                            capsys):
    """(found trying compare) a run trained 40 steps at LR 1e-9 and resumed for 40 more at 3e-2 holds the config of its
    resume alone: compared with runs trained at 3e-2 throughout, the groups were said to have run the same settings,
    "any difference between them is seed-to-seed noise"."""
    learns = ("--no-controller", "--lrs", "3e-2", "3e-2", "3e-2")
    resumed = []
    for s in (0, 1):
        d = tmp_path / f"resumed_s{s}"
        assert main(_train_args(tiny, d, "--steps", "40", "--seed", str(s), "--dev-data", tiny["csv"],
                                "--no-controller", "--lrs", "1e-9", "1e-9", "1e-9")) == 0
        assert main(_train_args(tiny, d, "--resume", "--steps", "80", "--seed", str(s), "--dev-data", tiny["csv"],
                                *learns)) == 0
        resumed.append(d)
    capsys.readouterr()
    assert main(["compare", *map(str, resumed), "--vs", *map(str, groups["learns"][:2])]) == 0
    text = capsys.readouterr().out
    assert "ran the same settings" not in text, text
    s = json.loads((resumed[0] / "summary.json").read_text())
    assert s["config"]["mode_lrs"] == [0.03] * 3  # its last settings: not what its first 40 steps trained with
    assert s["resumes"] == [{"step": 40, "changed": {"mode_lrs": [[1e-9] * 3, [0.03] * 3]}}]  # (its length: no change)
    assert "A: LoRA (fixed rank), 2 runs, seeds 0, 1: changed_on_resume at step 40: mode_lrs 1e-09,1e-09,1e-09 → " \
           "0.03,0.03,0.03" in text, text
    # a group may not mix it with runs that trained at one setting
    assert main(["compare", str(resumed[0]), str(groups["learns"][1]), "--vs", str(groups["frozen"][0])]) == 2
    assert "group A mixes settings: changed_on_resume is at step 40: mode_lrs" in capsys.readouterr().err
    # a run resumed for more steps alone trains as one run of them all: the same setting, and the same scores
    more = tmp_path / "more_s0"
    assert main(_train_args(tiny, more, "--steps", "40", "--seed", "0", "--dev-data", tiny["csv"], *learns)) == 0
    assert main(_train_args(tiny, more, "--resume", "--steps", "80", "--dev-data", tiny["csv"], *learns)) == 0
    from unified_lora.compare import compare_runs

    res = compare_runs([more], [groups["learns"][0]])
    assert res["differ"] == {} and res["metrics"][0]["diff"] == 0
    assert "resumes" not in json.loads((more / "summary.json").read_text())


def test_one_run_a_side_of_other_seeds_on_a_glue_task_folder_gets_the_row_test(tiny, tmp_path, capsys):
    """(found trying compare on the shipped MRPC) a GLUE task's dev rows are its dev.tsv whatever the seed, as a
    --dev-data file's are: two runs of other seeds were scored on the same rows, yet got no test ("one run on a side"),
    as runs on a dev split of --data drawn by seed do."""
    glue = tmp_path / "SST-2"
    glue.mkdir()
    for split, seed in (("train", 0), ("dev", 1)):
        rows = test_cli._rows(48, seed)
        (glue / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    runs = []
    for name, seed, lr in (("learns", 0, "3e-2"), ("frozen", 1, "1e-9")):
        runs.append(tmp_path / name)
        assert main(["train", "--model", tiny["bert"], "--data", str(glue), "--batch-size", "8", "--max-length", "16",
                     "--steps", "40", "--seed", str(seed), "--no-controller", "--log-every", "0", "--output-dir",
                     str(runs[-1]), "--lrs", lr, lr, lr]) == 0
    out = tmp_path / "c.json"
    capsys.readouterr()
    assert main(["compare", str(runs[0]), "--vs", str(runs[1]), "--json", str(out)]) == 0
    acc = json.loads(out.read_text())["metrics"][0]
    assert acc["metric"] == "accuracy" and acc["test"] == "McNemar", capsys.readouterr().out
    s = [json.loads((d / "summary.json").read_text()) for d in runs]
    y, pa, pb = s[0]["dev_labels"], *(r["arms"]["run"]["final_preds"] for r in s)
    assert s[1]["dev_labels"] == y and len(y) == 48  # the folder's dev.tsv, in both runs
    assert (acc["only_a"], acc["only_b"]) == (sum(p == t != q for p, q, t in zip(pa, pb, y)),
                                              sum(q == t != p for p, q, t in zip(pa, pb, y)))


def test_a_group_whose_runs_stopped_early_at_different_steps_names_each_runs_final_evaluation(groups, tiny, capsys):
    """(found trying compare) the header named the first run's final evaluation alone, "at A epoch 6.25 (step 50)",
    for a group whose other runs early stopping had stopped at step 16."""
    stops = _runs(tiny, groups["root"], "stops", (0, 1), "--lrs", "3e-2", "3e-2", "3e-2", "--steps", "60",
                  "--eval-steps", "10", "--early-stopping-patience", "2")
    ends = [list(json.loads((d / "summary.json").read_text())["arms"]["run"]["eval"])[-1] for d in stops]
    assert ends[0] != ends[1], ends  # (seed 1 learns nothing in its first epochs: stopped early there)
    capsys.readouterr()
    assert main(["compare", *map(str, stops), "--vs", *map(str, groups["learns"][:2])]) == 0
    text = capsys.readouterr().out
    assert f"final dev evaluation, at A {ends[0]} (seed 0), {ends[1]} (seed 1); B epoch 10; mean" in text, text


@pytest.mark.parametrize("command", ["compare", "demo", "train", "plot", "report", "predict", "export"])
def test_help_prints_percent_signs_as_one(command, capsys):
    """(found trying compare) `compare --help` said "two-sided at 95 %%": argparse formats an option's help with %,
    not a command's description, which printed the doubled sign as written."""
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "usage: unified-lora" in text and "%%" not in text, text
    if command == "compare":
        assert "two-sided at 95 %)" in " ".join(text.split())


def test_compare_at_best_reads_each_runs_best_evaluation_and_says_it_is_optimistic(groups, tiny, capsys, tmp_path):
    """`--at best`: each run's best evaluation as its --metric-for-best ranked it (the one --save-best keeps), not its
    last; the report names it and says the pick was made on the same dev rows."""
    stops = _runs(tiny, groups["root"], "best", (0, 1), "--lrs", "3e-2", "3e-2", "3e-2", "--steps", "60",
                  "--eval-steps", "10", "--early-stopping-patience", "2")
    sums = [json.loads((d / "summary.json").read_text()) for d in stops + groups["frozen"][:2]]
    best = [s["best"]["point"] for s in sums]
    assert any(p != list(s["arms"]["run"]["eval"])[-1] for p, s in zip(best, sums)), best  # (early stopping's)
    out = tmp_path / "best.json"
    capsys.readouterr()
    assert main(["compare", *map(str, stops), "--vs", *map(str, groups["frozen"][:2]), "--at", "best",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    acc = res["metrics"][0]
    assert res["at"] == "best" and acc["metric"] == "accuracy"
    want = [s["arms"]["run"]["eval"][p]["accuracy"] for s, p in zip(sums, best)]
    assert acc["a_values"] == want[:2] and acc["b_values"] == want[2:]
    assert res["a"]["points"] == best[:2] and res["b"]["points"] == best[2:]
    assert "best dev evaluation of each run (by accuracy), at A " in text
    assert "picked on these same dev rows, so both groups' scores are optimistic" in text
    # the default is the final evaluation, which differs here
    capsys.readouterr()
    assert main(["compare", *map(str, stops), "--vs", *map(str, groups["frozen"][:2]), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"][0]["a_values"] == [_final(d, "accuracy") for d in stops]
    assert "optimistic" not in capsys.readouterr().out
    # one run a side at best: its predictions are the final evaluation's, so no row test where the best is earlier
    i = next(i for i in range(2) if best[i] != list(sums[i]["arms"]["run"]["eval"])[-1])
    assert main(["compare", str(stops[i]), "--vs", str(groups["frozen"][i]), "--at", "best"]) == 0
    text = capsys.readouterr().out
    assert "Verdict on accuracy: no test" in text and "records its predictions at its final evaluation only" in text
    assert compare_runs([stops[i]], [groups["frozen"][i]], at="best")["rows_at_final_only"]


def test_compare_at_best_refuses_groups_whose_best_another_metric_ranked(groups, tiny, capsys):
    other = _runs(tiny, groups["root"], "by_f1", (0,), "--no-controller", "--lrs", "1e-9", "1e-9", "1e-9",
                  "--metric-for-best", "macro_f1")
    capsys.readouterr()
    assert main(["compare", str(other[0]), "--vs", str(groups["frozen"][0]), "--at", "best"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unified-lora: error: --at best: A's runs picked their best evaluation by macro_f1 and "
                          "B's by accuracy; compare their final evaluations"), err
    assert err.count("\n") == 1
    # at their final evaluation they compare (metric_for_best is a setting they differ in)
    assert main(["compare", str(other[0]), "--vs", str(groups["frozen"][0])]) == 0
