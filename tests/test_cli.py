"""End-to-end tests of the `unified-lora` CLI, in-process through `main([...])`, on a tiny BERT / GPT-2."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import RunsCode, can_build_cpp
from unified_lora.cli import _correct_rows, _fmt_metrics, main
from unified_lora.trace import read_trace

POS = "good great fine nice happy superb".split()
NEG = "bad awful poor sad terrible ugly".split()
FILLER = "the a movie film plot actor was is very quite this that story".split()
PNG = b"\x89PNG\r\n\x1a\n"


def _rows(n: int, seed: int = 0) -> list[tuple[str, int]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [FILLER[int(j)] for j in torch.randint(len(FILLER), (4,), generator=g)]
        words.insert(int(torch.randint(5, (1,), generator=g)), (POS if label else NEG)[i % 6])
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny BERT classifier, a tiny GPT-2 (both sharing one WordPiece vocab) and small data files."""
    from transformers import BertConfig, BertModel, BertTokenizerFast, GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("tiny")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POS, *NEG, *FILLER]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    if len(tok) != len(vocab):  # transformers 5 ignores vocab_file here (a 5-token tokenizer: every word [UNK])
        tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    assert len(tok) == len(vocab) and tok.convert_tokens_to_ids(POS[0]) == 5  # the words are tokens, not [UNK]
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64))
    bert.config.architectures = ["BertModel"]
    bert.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                     bos_token_id=2, eos_token_id=3, pad_token_id=0))
    gpt.save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    rows = _rows(64)
    with open(root / "train.csv", "w") as f:
        f.write("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    with open(root / "train.jsonl", "w") as f:
        f.write("".join(json.dumps({"review": t, "sentiment": ["neg", "pos"][y]}) + "\n" for t, y in rows))
    (root / "header_only.csv").write_text("text,label\n")
    return {"root": root, "bert": str(root / "bert"), "gpt2": str(root / "gpt2"), "csv": str(root / "train.csv"),
            "jsonl": str(root / "train.jsonl"), "empty": str(root / "header_only.csv")}


def _demo_args(tiny, out, *extra) -> list[str]:
    return ["demo", "--model", tiny["bert"], "--data", tiny["csv"], "--steps", "12", "--shock-start", "4",
            "--shock-end", "8", "--batch-size", "8", "--max-length", "16", "--dev-size", "0", "--log-every", "4",
            "--lrs", "1e-2", "5e-3", "1e-3", "--output-dir", str(out), *extra]


def _train_args(tiny, out, *extra) -> list[str]:
    return ["train", "--model", tiny["bert"], "--data", tiny["csv"], "--batch-size", "8", "--max-length", "16",
            "--output-dir", str(out), "--log-every", "0", *extra]


# ----------------------------------------------------------------------------- demo


def test_demo_writes_trace_summary_plot_and_console(tiny, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(_demo_args(tiny, out)) == 0
    trace = read_trace(out / "trace.jsonl")
    assert [r["step"] for r in trace] == list(range(12))
    assert {"step", "loss", "phi", "mode", "rank", "lr", "components"} <= set(trace[0])
    summary = json.loads((out / "summary.json").read_text())
    assert {"model", "shock", "signal", "majority", "arms", "dev_note", "wall_s"} <= set(summary)
    assert set(summary["arms"]) == {"unified", "baseline"}
    for arm in summary["arms"].values():
        assert set(arm["eval"]) == {"pre_shock", "post_shock", "final"}
        assert {"accuracy", "macro_f1"} <= set(arm["eval"]["final"])
    assert {"pre_shock", "peak", "final"} <= set(summary["arms"]["unified"]["phi"])
    assert (out / "plot.png").read_bytes()[:8] == PNG
    console = capsys.readouterr().out
    assert "[0] Mode=1 φ=" in console and "E_s=" in console  # the seed's console line
    # a reader who has not met φ or the modes gets a key to those lines before them (the header named θ0, θ1 and
    # E_s but never said what φ, Mode=2 or E_s is); and the outputs line names every file the demo wrote, each of
    # which exists (it left out baseline_trace.jsonl)
    assert console.index("reading the lines below: φ is the training stress in [0, 1], from the smoothed, scaled loss "
                         "E_s; Mode=0 is SINGLE (rank 4, φ < θ0), Mode=1 MULTI (rank 8), Mode=2 MIRROR (rank 16, "
                         "entered at φ >= θ1") < console.index("[0] Mode=1")
    named = console.split("outputs: ", 1)[1].splitlines()[0].split(", ")
    assert sorted(Path(f).name for f in named) == sorted(f.name for f in out.iterdir()) == \
        ["baseline_trace.jsonl", "console.txt", "plot.png", "summary.json", "trace.jsonl"]
    assert ">>> SHOCK @ step 4" in console and ">>> RECOVERY @ step 8" in console
    assert (out / "console.txt").read_text().count("Mode=") >= 3
    phi = summary["arms"]["unified"]["phi"]  # the φ line names the final mode and counts the steps per mode in words
    modes = ("SINGLE", "MULTI", "MIRROR")
    assert (f"final mode={modes[phi['final_mode']]}  mean rank=" in console
            and "steps per mode: " + ", ".join(f"{m} {phi['steps_in_mode'][m]}" for m in modes) in console)
    # it says whether the controller helped, from this run's final accuracies, with the noise of one seed
    u, b = (summary["arms"][k]["eval"]["final"]["accuracy"] for k in ("unified", "baseline"))
    n = summary["dev_rows"]
    assert f"Did the controller help? Final dev accuracy, one seed, {n} dev rows:" in console
    assert f"Unified LoRA {u:.3f} vs Baseline LoRA r8 {b:.3f}: {u - b:+.3f} ({round((u - b) * n):+d} of {n} rows)" \
        in console
    assert f"vs the majority class ({summary['majority']['accuracy']:.3f})" in console
    # the paired verdict's per-row data: each arm's right/wrong on every dev row, and the majority class's
    for arm in summary["arms"].values():
        assert len(arm["final_correct"]) == n and set(arm["final_correct"]) <= {"0", "1"}
        assert arm["final_correct"].count("1") == round(arm["eval"]["final"]["accuracy"] * n)
    assert summary["majority_correct"].count("1") == round(summary["majority"]["accuracy"] * n)
    t = summary["verdict"]["unified_vs_baseline"]
    assert t["b"] - t["c"] == round((u - b) * n)
    assert f"paired on the same rows: {t['b']} right only by Unified LoRA, {t['c']} only by Baseline LoRA r8, " \
           f"exact McNemar p={t['p']:.3g}" in console
    assert "2 standard errors" not in console  # the unpaired estimate is for older summaries only
    # and the F1 test's: each arm's predicted class per dev row and the gold labels, which give the F1 the table shows
    from unified_lora.cli import _label_ids
    from unified_lora.data import f1_binary, macro_f1

    y = _label_ids(summary["dev_labels"], n)
    for arm in summary["arms"].values():
        p = _label_ids(arm["final_preds"], n)
        assert macro_f1(p, y) == pytest.approx(arm["eval"]["final"]["macro_f1"])
        assert _correct_rows(p, y) == arm["final_correct"]
    f1 = summary["verdict_f1"]
    assert (f1["metric"], f1["positive"], summary["num_labels"]) == ("f1", 1, 2)
    t = f1["unified_vs_baseline"]
    assert t["f1_a"] == pytest.approx(f1_binary(_label_ids(summary["arms"]["unified"]["final_preds"], n), y))
    assert f"  Final dev F1 of class 1: Unified LoRA {t['f1_a']:.3f} vs Baseline LoRA r8 {t['f1_b']:.3f}: " \
           f"{t['diff']:+.3f}, " in console and "F1 of class 1 vs the majority class" in console
    # `report` prints the same verdict, from summary.json
    assert main(["report", str(out)]) == 0
    verdict = console[console.index("Did the controller help?"):console.index("outputs: ")]
    assert verdict.strip() and verdict in capsys.readouterr().out


def _verdict_summary(u: float, b: float | None, maj: float = 0.5, n: int = 200) -> dict:
    """A demo summary as written before the per-row data was stored: final accuracies only."""
    arms = {"unified": {"label": "Unified LoRA", "eval": {"final": {"accuracy": u}}}}
    if b is not None:
        arms["baseline"] = {"label": "Baseline LoRA r8", "eval": {"final": {"accuracy": b}}}
    return {"command": "demo", "dev_rows": n, "majority": {"accuracy": maj}, "arms": arms}


def _paired_summary(both: int, only_u: int, only_b: int, n: int = 200, majority_right: int | None = None) -> dict:
    """A demo summary with per-row data: `both` rows both arms get right, `only_u` only unified, `only_b` only the
    baseline, the rest neither; the majority class is right on the first `majority_right` rows."""
    u = "1" * both + "1" * only_u + "0" * only_b
    b = "1" * both + "0" * only_u + "1" * only_b
    u, b = u.ljust(n, "0"), b.ljust(n, "0")
    s = _verdict_summary(u.count("1") / n, b.count("1") / n, n=n)
    s["arms"]["unified"]["final_correct"], s["arms"]["baseline"]["final_correct"] = u, b
    if majority_right is not None:
        s["majority_correct"] = ("1" * majority_right).ljust(n, "0")
        s["majority"] = {"accuracy": majority_right / n}
    return s


def test_demo_verdict_of_an_older_summary_without_per_row_data_is_the_unpaired_estimate_said_to_be_one():
    from unified_lora.cli import format_summary

    # 200 rows, both near 0.75: 2 SE of the difference = 2*sqrt((0.765*0.235 + 0.745*0.255)/200) ≈ 0.086
    text = format_summary(_verdict_summary(0.765, 0.745, maj=0.7))
    assert "+0.020 (+4 of 200 rows), within noise; this summary.json holds no per-row predictions (a run before " \
           "they were stored), so the noise is the unpaired binomial estimate, 2 standard errors of a difference = " \
           "±0.086, which ignores that both arms are scored on the same rows and is usually too wide" in text
    assert "one seed cannot show training variance (compare several --seed values)" in text
    assert "Unified LoRA +13 of 200 rows, Baseline LoRA r8 +9 of 200 rows." in text  # both above the majority
    text = format_summary(_verdict_summary(0.85, 0.70, maj=0.7))
    assert "+0.150 (+30 of 200 rows), ahead, beyond the noise" in text
    assert "Baseline LoRA r8 scores no better than always predicting the majority class" in text
    assert "behind, beyond the noise" in format_summary(_verdict_summary(0.60, 0.80))
    text = format_summary(_verdict_summary(0.7, None))
    assert "no fixed-rank arm was run (--no-baseline), so this run cannot tell whether the controller helped" in text
    assert "Did the controller help?" not in format_summary({**_verdict_summary(0.7, 0.7), "command": "train"})


def test_demo_verdict_is_a_paired_mcnemar_test_on_the_rows_the_arms_disagree_on():
    """Both arms are scored on the same dev rows, but the verdict set their difference against an unpaired
    two-proportion SE, 2*sqrt((p(1-p)+q(1-q))/n): two fine-tunes of one model agree on most rows, so that is far too
    wide. Unified right on 12 rows the baseline gets wrong and wrong on none it gets right (0.765 vs 0.705 on 200
    rows) was "within noise" (2 SE = ±0.088 > 0.060), while the exact McNemar p is 2 * 0.5**12 = 0.000488."""
    from unified_lora.cli import _paired_verdict, format_summary

    s = _paired_summary(both=141, only_u=12, only_b=0)
    text = format_summary(s)
    assert "Unified LoRA 0.765 vs Baseline LoRA r8 0.705: +0.060 (+12 of 200 rows), ahead, beyond the noise; " \
           "paired on the same rows: 12 right only by Unified LoRA, 0 only by Baseline LoRA r8, exact McNemar " \
           "p=0.000488 (beyond the noise only at p < 0.05). The test covers which dev rows were drawn; one seed " \
           "cannot show training variance (compare several --seed values)." in text
    assert "within noise" not in text and "standard error" not in text
    assert _paired_verdict(s)["unified_vs_baseline"] == {"b": 12, "c": 0, "p": pytest.approx(2 * 0.5**12)}
    # b = c: the same accuracy, however many rows they swap: no difference, p = 1
    text = format_summary(_paired_summary(both=130, only_u=10, only_b=10))
    assert "+0.000 (+0 of 200 rows), no difference; paired on the same rows: 10 right only by Unified LoRA, 10 " \
           "only by Baseline LoRA r8, exact McNemar p=1 " in text
    # 7 vs 2: p = 2 * (C(9,0) + C(9,1) + C(9,2)) / 2**9 = 92/512 = 0.1797: within noise
    text = format_summary(_paired_summary(both=140, only_u=7, only_b=2))
    assert "+0.025 (+5 of 200 rows), within noise; paired on the same rows: 7 right only by Unified LoRA, 2 only " \
           "by Baseline LoRA r8, exact McNemar p=0.18 " in text
    # 0 vs 12: behind
    assert "(-12 of 200 rows), behind, beyond the noise" in format_summary(_paired_summary(141, 0, 12))
    # a large dev set, 5100 vs 4900 discordant rows: the exact sum (math.comb / 2**n: 0.0465855277049) in
    # milliseconds, not the seconds a sum of 10,000-row binomial coefficients in integers takes
    from unified_lora.stats import mcnemar as _mcnemar

    assert _mcnemar("1" * 5100 + "0" * 4900, "0" * 5100 + "1" * 4900)["p"] == pytest.approx(0.0465855277049, rel=1e-9)


def test_demo_verdict_against_the_majority_class_is_paired_too():
    """The majority class predicts one class on every row, so its per-row correctness is known from the labels: the
    arms are compared with it on the same rows, by the same test, not by rows above it alone."""
    from unified_lora.cli import _paired_verdict, format_summary

    # majority right on rows 0-139 (0.700). Unified: right on 0-139 and 140-149 (+10, 10 vs 0, p = 2/1024);
    # baseline: right on 0-139 and 150-154 (+5, 5 vs 0, p = 2/32 = 0.0625, within noise)
    s = _paired_summary(both=140, only_u=10, only_b=5, majority_right=140)
    text = format_summary(s)
    assert "vs the majority class (0.700): Unified LoRA +10 of 200 rows (10 right only by it, 0 only by the " \
           "majority class, p=0.00195), Baseline LoRA r8 +5 of 200 rows (5 right only by it, 0 only by the " \
           "majority class, p=0.0625); Baseline LoRA r8 is above it within noise only." in text
    assert _paired_verdict(s)["vs_majority"]["baseline"] == {"b": 5, "c": 0, "p": pytest.approx(0.0625)}
    # an arm at the majority's accuracy on other rows (it swaps 20 for 20): no better than the majority class
    s["arms"]["unified"]["final_correct"] = ("0" * 20 + "1" * 140).ljust(200, "0")  # right on rows 20-159
    text = format_summary(s)
    assert "Unified LoRA +0 of 200 rows (20 right only by it, 20 only by the majority class, p=1)" in text
    assert "; Unified LoRA scores no better than always predicting the majority class; Baseline LoRA r8 is above " \
           "it within noise only." in text


def _brute_force_f1_p(a: list[int], b: list[int], y: list[int], positive: int | None) -> float:
    """The paired permutation p of F1(a) - F1(b), by enumeration of every one of the 2**n ways to swap rows."""
    import itertools

    from unified_lora.data import f1_binary, macro_f1

    def f1(p):
        return f1_binary(p, y, positive) if positive is not None else macro_f1(p, y)

    observed, hits = abs(f1(a) - f1(b)), 0
    for swap in itertools.product((False, True), repeat=len(y)):
        a2 = [v if s else u for u, v, s in zip(a, b, swap)]
        b2 = [u if s else v for u, v, s in zip(a, b, swap)]
        hits += abs(f1(a2) - f1(b2)) >= observed - 1e-12
    return hits / 2 ** len(y)


def test_paired_f1_permutation_test_equals_a_brute_force_enumeration_of_every_swap():
    """MRPC is scored by F1 as well as accuracy, and the demo's verdict tested accuracy alone. The F1 test swaps the
    two predictions of each row at random; on up to 12 rows its p is checked against all 2**n swaps, counted one by
    one with the metrics GLUE scores (F1 of class 1 for a binary task, macro-F1 for more classes)."""
    from unified_lora.data.metrics import paired_f1_test

    g = torch.Generator().manual_seed(3)
    for n, k in [(12, 2), (10, 2), (12, 3), (9, 3), (11, 4)]:
        y, a, b = (torch.randint(k, (n,), generator=g).tolist() for _ in range(3))
        for positive in ((1, None) if k == 2 else (None,)):
            r = paired_f1_test(a, b, y, positive)
            assert r["exact"] and r["rows_differ"] == sum(u != v for u, v in zip(a, b))
            assert r["p"] == pytest.approx(_brute_force_f1_p(a, b, y, positive), abs=1e-12), (n, k, positive)
    # past EXACT_MAX_ROWS rows predicted differently, 20,000 random swaps: within 0.01 of the exact p, and the same
    # p on every call (seed 0)
    y = [1, 1, 0, 1, 0, 1, 1, 0, 1, 1] * 3
    a = [1] * 30
    b = [1 - v if i % 2 else v for i, v in enumerate(y)]  # right on the even rows, wrong on the odd ones
    exact = paired_f1_test(a, b, y, 1, exact_max=18)  # 2**18 swaps
    mc = paired_f1_test(a, b, y, 1)
    assert exact["exact"] and not mc["exact"] and mc["permutations"] == 20_000 and mc["rows_differ"] == 18
    assert abs(mc["p"] - exact["p"]) < 0.01 and paired_f1_test(a, b, y, 1) == mc


def test_paired_f1_permutation_test_known_cases():
    from unified_lora.data import f1_binary
    from unified_lora.data.metrics import paired_f1_test

    y = [1, 0] * 100
    r = paired_f1_test(y, y, y)  # the same predictions: no row can be swapped, p = 1
    assert (r["diff"], r["p"], r["rows_differ"]) == (0.0, 1.0, 0)
    wrong = [1 - v if i < 60 else v for i, v in enumerate(y)]  # b wrong on the first 60 rows, a right on all
    r = paired_f1_test(y, wrong, y)
    assert r["diff"] == pytest.approx(1 - f1_binary(wrong, y)) == pytest.approx(0.3) and r["rows_differ"] == 60 and not r["exact"]
    # no random swap of 60 rows reaches the observed difference: the smallest p 20,000 swaps can give, 1 / 20,001
    assert r["p"] == pytest.approx(1 / 20_001)
    assert paired_f1_test(wrong, y, y)["p"] == r["p"]  # two-sided
    # the majority class predicts one class: its F1 of class 1 is 2q / (1 + q) (q: the share of class 1) or 0
    q = sum(y) / len(y)
    assert paired_f1_test(y, [1] * 200, y)["f1_b"] == pytest.approx(2 * q / (1 + q))
    assert paired_f1_test(y, [0] * 200, y)["f1_b"] == 0.0


def _f1_summary(u: list[int], b: list[int] | None, y: list[int], majority_label: int = 1) -> dict:
    """A demo summary with the per-row data of both verdicts: correctness per row and the predicted class per row."""
    from unified_lora.cli import _label_string

    n = len(y)
    arms = {"unified": u} if b is None else {"unified": u, "baseline": b}
    s = _verdict_summary(0, 0, n=n)
    s.update(task="mrpc", num_labels=2, classes=["not_equivalent", "equivalent"], dev_labels=_label_string(y),
             majority_label=majority_label, majority_correct=_correct_rows([majority_label] * n, y),
             majority={"accuracy": sum(v == majority_label for v in y) / n})
    if b is None:
        s["arms"].pop("baseline")
    for k, p in arms.items():
        s["arms"][k].update(final_correct=_correct_rows(p, y), final_preds=_label_string(p),
                            eval={"final": {"accuracy": sum(x == v for x, v in zip(p, y)) / n}})
    return s


def test_demo_verdict_tests_the_f1_difference_too():
    """The verdict judged accuracy only; MRPC's GLUE metric is F1 (class 1) and accuracy, and on an imbalanced task
    they can disagree. Here unified and the baseline have the same accuracy (each gets 20 rows the other misses), but
    unified's errors are false positives and the baseline's false negatives: their F1 differs, and is tested."""
    from unified_lora.cli import format_summary

    y = [1] * 140 + [0] * 60
    u = [1] * 140 + [1] * 20 + [0] * 40  # all positives right, 20 negatives called positive
    b = [0] * 20 + [1] * 120 + [0] * 60  # 20 positives missed, all negatives right
    text = format_summary(_f1_summary(u, b, y))
    acc = [ln for ln in text.splitlines() if ln.startswith("  Unified LoRA 0.900 vs Baseline LoRA r8 0.900")]
    assert acc and "exact McNemar p=1 " in acc[0]  # the accuracy line as before
    f1u, f1b = 280 / 300, 240 / 260  # 2tp / (2tp + fp + fn)
    assert f"  Final dev F1 of class 1 (equivalent), GLUE's MRPC F1: Unified LoRA {f1u:.3f} vs Baseline LoRA r8 " \
           f"{f1b:.3f}: {f1u - f1b:+.3f}, within noise; paired permutation test on the same rows (each row's two " \
           "predictions swapped at random; 20,000 random swaps, seed 0, of the 40 rows they predict differently): " \
           "p=" in text
    # the majority class predicts class 1: F1 2*0.7/1.7 = 0.824
    assert "  F1 of class 1 (equivalent) vs the majority class (0.824), by the same test: Unified LoRA +0.110 " \
           "(40 rows predicted differently, p=5e-05), Baseline LoRA r8 +0.100 (80 rows predicted differently, " \
           "p=0.0003)." in text  # 5e-05 = 1 / 20,001: no random swap reached the observed difference
    # the same predictions: no difference, p = 1; worse than the majority class in F1: said so
    low = [0] * 60 + [1] * 80 + [0] * 60  # misses 60 positives
    text = format_summary(_f1_summary(low, low, y))
    assert f"Unified LoRA {160 / 220:.3f} vs Baseline LoRA r8 {160 / 220:.3f}: +0.000, no difference; paired " \
           "permutation test on the same rows (each row's two predictions swapped at random; they predict every row " \
           "alike, so no swap changes anything): p=1 (beyond the noise only at p < 0.05)." in text
    assert "; Unified LoRA and Baseline LoRA r8 score no better F1 of class 1 (equivalent) than always predicting " \
           "the majority class." in text
    # a one-sided F1 difference beyond the noise: exact over the 10 rows that differ
    b10 = [0] * 10 + [1] * 130 + [0] * 60
    text = format_summary(_f1_summary(y, b10, y))
    assert "ahead, beyond the noise; paired permutation test on the same rows (each row's two predictions swapped " \
           "at random; exact: all 2^10 = 1,024 swaps of the 10 rows they predict differently): p=0.00195" in text
    # --no-baseline: the arm against the majority class only
    text = format_summary(_f1_summary(u, None, y))
    assert "Final dev F1" not in text and "F1 of class 1 (equivalent) vs the majority class (0.824)" in text


def test_demo_verdict_of_a_multiclass_summary_tests_macro_f1():
    from unified_lora.cli import format_summary

    y = [0, 1, 2] * 20
    s = _f1_summary(y, [0] * 60, y, majority_label=0)
    s.update(task="csv", num_labels=3, classes=["a", "b", "c"])
    text = format_summary(s)
    assert "  Final dev macro-F1 over the 3 classes: Unified LoRA 1.000 vs Baseline LoRA r8 0.167: +0.833, ahead, " \
           "beyond the noise" in text
    assert "macro-F1 over the 3 classes vs the majority class (0.167), by the same test:" in text


def test_report_prints_the_f1_verdict_of_a_new_summary_and_says_an_old_one_needs_a_rerun(tmp_path, capsys):
    """`report` prints the verdict from summary.json: a summary with the per-row predicted classes gets the F1
    test; one without them (a demo before they were stored) gets the accuracy verdict as before and a line saying
    the F1 test needs a re-run. A summary whose per-row classes are cut short says so."""
    y = [1] * 14 + [0] * 6
    new = _f1_summary(y, [1] * 20, y)
    old = _paired_summary(both=14, only_u=2, only_b=0, n=20)
    for name, s in [("new", new), ("old", old)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(s))
    assert main(["report", str(tmp_path / "new")]) == 0
    report = capsys.readouterr().out
    assert "Final dev F1 of class 1 (equivalent), GLUE's MRPC F1: Unified LoRA 1.000 vs Baseline LoRA r8 0.824" \
        in report and "needs a re-run" not in report and "re-run the demo" not in report
    from unified_lora.cli import format_summary

    assert format_summary(new) in report
    assert main(["report", str(tmp_path / "old")]) == 0
    report = capsys.readouterr().out
    assert "exact McNemar p=0.5 " in report and "Final dev F1" not in report
    assert report.rstrip().endswith(
        "  F1: this summary.json holds no per-row predicted labels (a demo before they were stored), so the F1 "
        "difference is not tested; re-run the demo for the paired F1 permutation test.")
    new["arms"]["baseline"]["final_preds"] = new["arms"]["baseline"]["final_preds"][:-1]  # one row short
    new["dev_labels"] = new["dev_labels"][:-1]
    (tmp_path / "new" / "summary.json").write_text(json.dumps(new))
    assert main(["report", str(tmp_path / "new")]) == 0
    assert "  F1: this summary.json's per-row labels (dev_labels, the arms' final_preds) do not hold one class id " \
           "for each of its 20 dev rows, so the F1 difference is not tested; re-run the demo." in capsys.readouterr().out


def test_label_strings_round_trip_past_ten_classes():
    from unified_lora.cli import _label_ids, _label_string

    assert _label_string([0, 1, 1, 0]) == "0110" and _label_ids("0110", 4) == [0, 1, 1, 0]
    assert _label_ids(_label_string([12, 3, 0]), 3) == [12, 3, 0] and _label_ids(_label_string([12]), 1) == [12]
    assert _label_ids("011", 4) is None and _label_ids(None, 4) is None and _label_ids("0x10", 4) is None


def test_phi_summary_of_a_trace_that_ends_before_the_shock_is_all_pre_shock():
    """A run stopped before its shock window (interrupted, or a window past the last epoch) printed step 0's φ as
    "pre-shock" and as the "peak (step 0)", whatever φ did."""
    from unified_lora.training import phi_summary

    trace = [{"step": i, "phi": p, "mode": 1, "rank": 8} for i, p in enumerate([0.5, 0.6, 0.8, 0.7])]
    s = phi_summary(trace, 10, 20)
    assert (s["pre_shock"], s["peak"], s["peak_step"], s["final"]) == (0.7, 0.8, 2, 0.7)
    s = phi_summary(trace, 2, 3)  # a window inside the trace: as before
    assert (s["pre_shock"], s["peak"], s["peak_step"]) == (0.6, 0.8, 2)


def test_a_run_without_a_shock_labels_its_first_phi_first_not_pre_shock():
    """A train run without --shock-start/--shock-end printed its step-0 φ as "φ pre-shock=" (and so did the report of
    an interrupted demo, summarised from its trace alone)."""
    from unified_lora.cli import format_summary
    from unified_lora.training import phi_summary

    trace = [{"step": i, "phi": p, "mode": 1, "rank": 8} for i, p in enumerate([0.5, 0.6, 0.8, 0.7])]
    arm = {"label": "Unified LoRA", "phi": phi_summary(trace, 0, 0)}
    text = format_summary({"command": "train", "shock": None, "arms": {"run": arm}})
    assert "Unified LoRA: φ first=0.500  peak=0.800 (step 2)  final=0.700" in text and "pre-shock" not in text
    text = format_summary({"command": "train", "shock": {"type": "flip", "start": 2, "end": 3},
                           "arms": {"run": {**arm, "phi": phi_summary(trace, 2, 3)}}})
    assert "Unified LoRA: φ pre-shock=0.600  peak=0.800 (step 2)" in text


def test_demo_baseline_is_pinned_at_rank8(tiny, tmp_path):
    out = tmp_path / "demo"
    assert main(_demo_args(tiny, out, "--loss-scale", "0.05")) == 0  # huge scaled loss: the unified run goes MIRROR
    base = read_trace(out / "baseline_trace.jsonl")
    assert {r["mode"] for r in base} == {1} and {r["rank"] for r in base} == {8}
    unified = read_trace(out / "trace.jsonl")
    assert max(r["mode"] for r in unified) == 2 and any(r["snapshot"] == "saved" for r in unified)


def test_demo_shock_to_the_last_step_still_scores_right_after_it(tiny, tmp_path):
    out = tmp_path / "demo"
    args = _demo_args(tiny, out, "--no-baseline")
    args[args.index("--shock-end") + 1] = "12"  # = --steps: the step after the shock is the end of the run
    assert main(args) == 0
    ev = json.loads((out / "summary.json").read_text())["arms"]["unified"]["eval"]
    assert ev["post_shock"] == ev["final"]
    assert "| -" not in (out / "console.txt").read_text()  # no empty cell in the table


@pytest.mark.parametrize("flag, value, message", [
    ("--threads", "-1", "threads: must be >= 0 (0 = torch's default), got -1"),  # was a RuntimeError, exit 1
    ("--steps", "0", "steps: must be >= 1 (the demo trains this many steps), got 0"),  # trained 0 steps, wrote a
    # trace.jsonl and failed at the plot ("trace: empty")
])
def test_demo_refuses_a_bad_threads_or_steps_value_before_writing_anything(tiny, tmp_path, capsys, flag, value,
                                                                         message):
    out = tmp_path / "demo"
    args = _demo_args(tiny, out, "--no-baseline")
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert main(args) == 2
    assert capsys.readouterr().err == f"unified-lora: error: {message}\n"
    assert not out.exists()


def test_demo_with_fewer_steps_and_no_shock_flags_scales_the_default_window(tiny, tmp_path, capsys):
    """`demo --steps 30` kept the default window (60, 100) of the default 160 steps, and the error named
    "shock_end: must be <= steps (30), got 100", a value the command had not given. Without either shock flag the
    default window is now scaled to --steps: steps 11-17 of 30 (the default 160 steps keep 60-100)."""
    out = tmp_path / "demo"
    args = _demo_args(tiny, out, "--no-baseline")
    for flag in ("--steps", "--shock-start", "--shock-end"):
        i = args.index(flag)
        del args[i:i + 2]
    assert main(args + ["--steps", "30"]) == 0
    said = capsys.readouterr().out
    assert "30 steps, flip shock on [11, 18)" in said and ">>> SHOCK @ step 11" in said
    assert json.loads((out / "summary.json").read_text())["shock"] == {"type": "flip", "start": 11, "end": 18}


@pytest.mark.parametrize("given, message", [
    # one flag given, the other at its default: refused, naming the default and a window that fits
    (["--steps", "30", "--shock-end", "20"], "--shock-start 60 --shock-end 20 (--shock-start is the default, set for "
                                             "the default 160 steps): the shock window must lie inside the run"),
    (["--steps", "12", "--shock-start", "4", "--shock-end", "13"], "--shock-start 4 --shock-end 13: the shock window "
                                                                   "must lie inside the run, 0 <= --shock-start"),
])
def test_demo_refuses_a_shock_window_outside_its_steps_naming_the_flags_and_the_defaults(tiny, tmp_path, capsys, given,
                                                                                         message):
    out = tmp_path / "demo"
    args = _demo_args(tiny, out, "--no-baseline")
    for flag in ("--steps", "--shock-start", "--shock-end"):  # the command gives only `given`: the others default
        i = args.index(flag)
        del args[i:i + 2]
    assert main(args + given) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unified-lora: error: {message}") and err.count("\n") == 1
    assert not out.exists()


def test_demo_summary_says_what_a_mirror_exit_did_to_the_weights():
    from unified_lora.cli import format_summary

    arm = {"label": "Unified LoRA", "mirror": [{"step": 9, "snapshot": "kept", "drift": 0.56},
                                               {"step": 30, "snapshot": "restored", "drift": 0.01}]}
    text = format_summary({"command": "demo", "arms": {"unified": arm}, "drift_threshold": 0.05})
    assert "Mirror exit @ step 9: kept the new weights (drift=56.00%, threshold 5%)" in text
    assert "Mirror exit @ step 30: restored the entry snapshot (drift=1.00%, threshold 5%)" in text


def test_a_mirror_exit_line_names_the_rule_that_decided_it_not_the_drift_threshold():
    """The summary (end of `train`, `report`) printed "threshold 5%" beside every Mirror exit, whatever the rule: a
    loss_worse restore at a 100 %+ drift read "restored the entry snapshot (drift=..., threshold 5%)", which the
    drift rule would never do. The line now names the rule and the numbers it compared. A real run: it starts in
    MIRROR (snapshot at the first loss, 0.2), AdamW moves the weights far, and it leaves MIRROR at a higher loss."""
    from conftest import VOCAB, tiny_llama
    from unified_lora import MachineConfig, MirrorConfig, setup_unified_lora
    from unified_lora.cli import format_summary
    from unified_lora.training import transitions

    llama = tiny_llama()
    _, ctrl = setup_unified_lora(llama, target_modules=["q_proj"], signal="loss", print_fn=None,
                                 mirror=MirrorConfig(policy="loss_worse"),
                                 machine=MachineConfig(initial_mode=2, warmup_steps=3))
    opt = torch.optim.AdamW([p for p in llama.parameters() if p.requires_grad], lr=0.05)
    ctrl.attach_optimizer(opt)
    x = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    for loss in [0.2, 0.5, 0.5, 0.5]:
        llama(input_ids=x, labels=x).loss.backward()
        ctrl.step(loss=loss)
        opt.step()
        opt.zero_grad()
    trace = [json.loads(r.to_json()) for r in ctrl.trace]
    trans = transitions(trace)
    exit_ = trans[-1]
    assert exit_["snapshot"] == "restored" and exit_["drift"] > 0.05  # the drift rule would have kept these weights
    assert exit_["policy"] == "loss_worse" and exit_["loss_at_entry"] == 0.2
    arm = {"label": "Unified LoRA", "mirror": [t for t in trans if t["snapshot"] in ("restored", "kept")]}
    text = format_summary({"command": "train", "arms": {"run": arm}, "drift_threshold": 0.05})
    assert (f"Mirror exit @ step 3: restored the entry snapshot (rule loss_worse: loss EMA "
            f"{exit_['loss_at_exit']:.4g} at exit vs 0.2 at entry; drift={exit_['drift']:.2%})") in text
    assert "threshold" not in text
    # the other rules are named too; the drift rule keeps its threshold, printed as given (2.5 %, not "2%")
    arm["mirror"] = [{"step": 5, "snapshot": "kept", "drift": 0.01, "policy": "never"},
                     {"step": 9, "snapshot": "restored", "drift": 0.01}]
    text = format_summary({"command": "train", "arms": {"run": arm}, "drift_threshold": 0.025})
    assert "Mirror exit @ step 5: kept the new weights (rule never; drift=1.00%)" in text
    assert "Mirror exit @ step 9: restored the entry snapshot (drift=1.00%, threshold 2.5%)" in text


def test_demo_no_baseline_and_composite_signal(tiny, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(_demo_args(tiny, out, "--no-baseline", "--signal", "composite")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {"unified"}
    assert "C" in read_trace(out / "trace.jsonl")[-1]["components"]
    assert not (out / "baseline_trace.jsonl").exists()
    # the demo's loss scale and calibration are the loss signal's: a composite run neither claims nor records them
    # (its console said "signal=composite loss_scale=0.3", a scale that signal never reads)
    console = capsys.readouterr().out
    assert "signal=composite θ0=" in console
    assert "φ is the training stress in [0, 1], from the loss trend C, the gradients' change E and their size S;" \
        in console and "baseline_trace" not in console
    assert summary["signal"]["loss_scale"] == 1.0 and summary["signal"]["calibration_steps"] == 0
    # and one given for it is refused, naming the setting, rather than ignored
    assert main(_demo_args(tiny, tmp_path / "demo2", "--no-baseline", "--signal", "composite",
                           "--calibration-steps", "5")) == 2
    assert "calibration_steps: 5 would be ignored: the 'composite' signal does not read it" in capsys.readouterr().err


def test_the_demo_refuses_rows_past_a_rotary_models_context(tiny, tmp_path, capsys):
    """A Llama classifier (rotary positions, max_position_embeddings 64) ran the demo on 82-token rows without a
    word, where the BERT of the bad-input case below is refused: it is refused too, as `train` refuses it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny["bert"])
    torch.manual_seed(0)
    llama = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id))
    llama.config.architectures = ["LlamaForSequenceClassification"]
    llama.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    capsys.readouterr()
    data = _write(tmp_path / "long.csv", "text,label\n" + "".join(f"{'good ' * 80},1\nawful film,0\n" * 4))
    args = _demo_args(tiny, tmp_path / "demo", "--target-modules", "q_proj,v_proj", "--modules-to-save", "score",
                      "--max-length", "100", "--no-baseline")
    args[args.index("--model") + 1], args[args.index("--data") + 1] = str(tmp_path / "llama"), str(data)
    assert main(args) == 2
    assert capsys.readouterr().err == (
        "unified-lora: error: --max-length 100: the data's longest row is 82 tokens, past the model's context of 64 "
        "positions (max_position_embeddings 64); its rotary positions run on past it without an error, on positions "
        "it was never trained on; pass --max-length 64 or less\n")


# ----------------------------------------------------------------------------- train, resume


def test_train_jsonl_epochs_checkpoints(tiny, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", tiny["bert"], "--data", tiny["jsonl"], "--text-columns", "review",
            "--label-column", "sentiment", "--epochs", "2", "--batch-size", "8", "--max-length", "16",
            "--output-dir", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["arms"]["run"]["eval"]) == ["epoch 1", "epoch 2"]
    assert summary["checkpoints"] == ["epoch-1", "epoch-2"]
    ck = out / "checkpoints" / "epoch-2"
    assert (ck / "adapter_blocks.safetensors").is_file() and (ck / "state.pt").is_file()
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp folders left
    from safetensors.torch import load_file

    keys = load_file(str(ck / "adapter_blocks.safetensors"))
    assert any(".lora_A." in k for k in keys) and any(k.startswith("classifier.") for k in keys)
    assert (out / "plot.png").read_bytes()[:8] == PNG
    peft_dir = out / "peft_adapter"
    assert summary["peft_adapter"] == str(peft_dir)
    assert (peft_dir / "adapter_config.json").is_file() and (peft_dir / "adapter_model.safetensors").is_file()


def test_train_from_yaml_config_with_flag_override(tiny, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {tiny['bert']}\ndata: {tiny['csv']}\nepochs: 3\nbatch_size: 8\nmax_length: 16\n"
                   "peft_every_checkpoint: true\n"
                   # exponent notation without a dot: PyYAML (YAML 1.1) loads these as strings
                   # (no `lr`: --lr-mode absolute does not read it, and giving it is refused)
                   f"mode_lrs: [1e-2, 5e-3, 1e-3]\noutput_dir: {tmp_path / 'run'}\n")
    assert main(["train", "--config", str(cfg), "--epochs", "1"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["config"]["mode_lrs"] == [0.01, 0.005, 0.001]
    assert (tmp_path / "run" / "checkpoints" / "epoch-1" / "peft" / "adapter_config.json").is_file()


@pytest.mark.skipif(not can_build_cpp(), reason="kernel='fused' needs g++ and ninja")
def test_train_takes_the_mirror_kernel_flag_and_records_it(tiny, tmp_path):
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--epochs", "1", "--mirror-kernel", "fused")) == 0
    assert json.loads((out / "summary.json").read_text())["config"]["mirror_kernel"] == "fused"


@pytest.mark.skipif(not can_build_cpp(), reason="layer_kernel='cpp' needs g++ and ninja")
def test_train_takes_the_layer_kernel_flag_and_records_it(tiny, tmp_path):
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--epochs", "1", "--layer-kernel", "cpp")) == 0
    assert json.loads((out / "summary.json").read_text())["config"]["layer_kernel"] == "cpp"


def test_train_takes_no_mirror_pack_and_records_it(tiny, tmp_path):
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--epochs", "1", "--no-mirror-pack")) == 0
    assert json.loads((out / "summary.json").read_text())["config"]["mirror_pack"] is False


def test_resume_continues_the_same_trajectory(tiny, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(_train_args(tiny, straight, "--epochs", "2")) == 0
    assert main(_train_args(tiny, split, "--epochs", "1")) == 0
    assert main(["train", "--output-dir", str(split), "--resume", "--epochs", "2"]) == 0  # stored config + override
    a, b = read_trace(straight / "trace.jsonl"), read_trace(split / "trace.jsonl")
    assert [r["step"] for r in b] == list(range(len(a)))
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert [r["phi"] for r in b] == pytest.approx([r["phi"] for r in a], rel=1e-5)


def test_a_resumed_runs_wall_time_counts_every_session(tiny, tmp_path, capsys):
    """summary.json's wall_s ("total wall time") was the last session's alone: a run of hours resumed near its end
    reported seconds. Each checkpoint now holds the run's wall time so far, and a resumed run adds its own."""
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--epochs", "1")) == 0
    first = json.loads((out / "summary.json").read_text())["wall_s"]
    saved = torch.load(out / "checkpoints" / "epoch-1" / "state.pt", weights_only=False)["run"]["wall_s"]
    assert 0 < saved <= first
    capsys.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume", "--epochs", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    session = summary["wall_s_session"]
    assert summary["wall_s"] == pytest.approx(saved + session, abs=0.5) and summary["wall_s"] > session
    assert (f"total wall time: {summary['wall_s']:.1f} s ({session:.1f} s of it since the last --resume)"
            in capsys.readouterr().out)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by its path there, with its bytes."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_a_resume_of_a_finished_run_says_so_and_leaves_every_file_as_it_is(tiny, tmp_path, capsys):
    """`--resume` of a run that had finished trained nothing, but wrote the adapter, the plot and summary.json again
    and added its own time to the run's wall time (`wall_s` grew with each such resume). It now says in one line
    that the run is finished and how to train further, and leaves every file byte for byte as it was (exit 0); the
    longer run it names resumes as before. A run stopped early (its patience spent) is finished too, unless the
    resume gives a patience that lets it go on; one whose summary.json a kill left unwritten still gets it."""
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--epochs", "1")) == 0
    before = _files(out)
    capsys.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    assert _files(out) == before
    said = capsys.readouterr()
    assert said.out == (f"unified-lora train: the run in {out} is finished at step 8 (1 epoch of 8 steps), evaluated, "
                        "saved and summarised; this --resume has nothing to train and leaves its files as they are; "
                        f"to train further, give it more epochs: unified-lora train --output-dir {out} --resume "
                        "--epochs 2\n") and said.err == ""
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "4"]) == 0  # (fewer steps than it has)
    assert "is finished at step 8 (--steps 4)" in capsys.readouterr().out and _files(out) == before
    assert main(["train", "--output-dir", str(out), "--resume", "--epochs", "2"]) == 0
    assert [r["step"] for r in read_trace(out / "trace.jsonl")] == list(range(16))
    assert json.loads((out / "summary.json").read_text())["steps"] == 16
    # a decaying LR schedule cannot be lengthened on a resume (it is refused): the line says to start a new run
    decaying = tmp_path / "linear"
    assert main(_train_args(tiny, decaying, "--steps", "2", "--lr-scheduler", "linear")) == 0
    capsys.readouterr()
    assert main(["train", "--output-dir", str(decaying), "--resume"]) == 0
    assert capsys.readouterr().out.endswith(
        "is finished at step 2 (--steps 2), evaluated, saved and summarised; this --resume has nothing to train and "
        "leaves its files as they are; its LR schedule (linear) spans its 2 steps, so a resume cannot lengthen it (the "
        "LR would jump): to train further, start a new run in another --output-dir\n")
    # stopped early: finished, with the patience it was given; a larger one trains on
    early = tmp_path / "early"
    assert main(_train_args(tiny, early, "--epochs", "6", "--eval-steps", "2", "--early-stopping-patience", "1",
                            "--early-stopping-threshold", "10")) == 0
    stopped = json.loads((early / "summary.json").read_text())
    assert stopped["stopped_early"] and stopped["steps"] == 4
    before = _files(early)
    capsys.readouterr()
    assert main(["train", "--output-dir", str(early), "--resume"]) == 0
    assert capsys.readouterr().out == (
        f"unified-lora train: the run in {early} is finished at step 4, stopped early: 1 evaluation in a row without "
        "improving dev accuracy (--early-stopping-patience 1), evaluated, saved and summarised; this --resume has "
        f"nothing to train and leaves its files as they are; to train on: unified-lora train --output-dir {early} "
        "--resume --early-stopping-patience 0 (no early stopping), or a larger patience\n")
    assert _files(early) == before
    assert main(["train", "--output-dir", str(early), "--resume", "--early-stopping-patience", "2"]) == 0
    assert json.loads((early / "summary.json").read_text())["steps"] == 6
    # killed after its last checkpoint, before its summary.json: the resume writes its outputs
    (out / "summary.json").unlink()
    (out / "peft_adapter" / "adapter_config.json").unlink()
    assert main(["train", "--output-dir", str(out), "--resume", "--epochs", "2"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 16
    assert (out / "peft_adapter" / "adapter_config.json").is_file()


def test_console_txt_keeps_the_sessions_before_a_resume_and_the_outputs_line_names_it(tiny, tmp_path, capsys):
    """console.txt after a --resume held the last session's lines alone (the trace keeps the earlier steps): the
    resumed session's lines now follow the earlier ones, after a line naming the resume step. The `outputs:` line
    names console.txt (it left it out); a fresh run into the folder (--overwrite) starts a new file."""
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--epochs", "1")) == 0
    first = (out / "console.txt").read_text()
    said = capsys.readouterr().out.splitlines()
    assert said[-1] == (f"outputs: {out / 'trace.jsonl'}, {out / 'summary.json'}, {out / 'plot.png'}, "
                        f"{out / 'checkpoints'}, {out / 'console.txt'}")
    assert main(["train", "--output-dir", str(out), "--resume", "--epochs", "2"]) == 0
    second = capsys.readouterr().out
    text = (out / "console.txt").read_text()
    assert text.startswith(first), text
    separator, *rest = text[len(first):].splitlines()
    step = torch.load(out / "checkpoints" / "epoch-1" / "state.pt", weights_only=False)["run"]["global_step"]
    assert separator == f"----- --resume at step {step} -----"
    assert rest == second.splitlines() and rest[0].startswith("resumed from ")
    # a third session appends again; a fresh run into the folder starts a new file
    assert main(["train", "--output-dir", str(out), "--resume", "--epochs", "3"]) == 0
    assert (out / "console.txt").read_text().startswith(text)
    capsys.readouterr()
    assert main(_train_args(tiny, out, "--epochs", "1", "--overwrite")) == 0
    assert (out / "console.txt").read_text() == capsys.readouterr().out


def test_the_outputs_line_names_plot_png_only_where_one_was_drawn(tiny, tmp_path, capsys):
    """A run resumed after a kill between its last checkpoint and its summary.json, its damaged trace moved aside (as
    the resume's error on it advises), trains no step: it has no step to plot, draws none, and its `outputs:` line
    named plot.png all the same (a file that was not there, or the previous session's). It names the files written."""
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--steps", "2")) == 0
    for name in ("summary.json", "plot.png", "console.txt"):  # killed before them
        (out / name).unlink()
    os.replace(out / "trace.jsonl", tmp_path / "damaged-trace.jsonl")
    capsys.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[-2:] == [f"no plot: {out / 'trace.jsonl'} holds no step (this session trained none)",
                         f"outputs: {out / 'trace.jsonl'}, {out / 'summary.json'}, {out / 'checkpoints'}, "
                         f"{out / 'console.txt'}"]
    assert not (out / "plot.png").exists() and json.loads((out / "summary.json").read_text())["steps"] == 2


def test_resume_from_another_directory_reads_the_runs_own_relative_paths(tiny, tmp_path, monkeypatch):
    """A run started with a relative --data stored that relative path; resumed from another directory, the path was
    read from there: a file of the same name there (other data) was trained on, silently, and the resume check
    compared the new path with itself. Local paths are stored absolute now."""
    import shutil

    first, other = tmp_path / "first", tmp_path / "other"
    first.mkdir(), other.mkdir()
    shutil.copy(tiny["csv"], first / "train.csv")
    rows = _rows(64, seed=1)
    (other / "train.csv").write_text("text,label\n" + "".join(f"{t},{1 - y}\n" for t, y in rows))  # other data
    monkeypatch.chdir(first)
    args = ["train", "--model", tiny["bert"], "--data", "train.csv", "--batch-size", "8", "--max-length", "16",
            "--log-every", "0"]
    assert main([*args, "--output-dir", "straight", "--steps", "6"]) == 0
    assert main([*args, "--output-dir", "split", "--steps", "3"]) == 0
    monkeypatch.chdir(other)
    assert main(["train", "--output-dir", str(first / "split"), "--resume", "--steps", "6"]) == 0
    a, b = read_trace(first / "straight" / "trace.jsonl"), read_trace(first / "split" / "trace.jsonl")
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert json.loads((first / "split" / "summary.json").read_text())["config"]["data"] == str(first / "train.csv")


def test_a_fresh_run_refuses_a_folder_holding_a_run_and_overwrite_replaces_it(tiny, tmp_path, capsys):
    """A second run into the same --output-dir used to leave the first run's checkpoints beside its own (listed in
    its summary), and a later --resume continued the old run's newest step instead of the new run."""
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--steps", "3")) == 0
    capsys.readouterr()
    assert main(_train_args(tiny, out, "--steps", "2")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unified-lora: error: --output-dir {out}: holds a previous run (checkpoints/step-3")
    assert "--resume" in err and "--overwrite" in err and err.count("\n") == 1
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-3"]  # left alone
    assert main(_train_args(tiny, out, "--steps", "2", "--overwrite")) == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]
    assert json.loads((out / "summary.json").read_text())["checkpoints"] == ["step-2"]
    assert [r["step"] for r in read_trace(out / "trace.jsonl")] == [0, 1]


@pytest.mark.parametrize("flag", ["--target-modules", "--modules-to-save"])
def test_overwrite_keeps_the_previous_run_when_the_new_one_fails_to_set_up(tiny, tmp_path, capsys, flag):
    """--overwrite deleted the previous run's checkpoints, adapter and summary before the model was wrapped, so a
    --target-modules or --modules-to-save that matched nothing lost the previous run and trained nothing."""
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--steps", "3")) == 0
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    capsys.readouterr()
    assert main(_train_args(tiny, out, "--steps", "2", "--overwrite", flag, "nomatch")) == 2
    err = capsys.readouterr().err
    assert err.startswith("unified-lora: error: ") and "'nomatch'" in err and "matched no" in err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert [r["step"] for r in read_trace(out / "trace.jsonl")] == [0, 1, 2]


def test_resume_refuses_a_changed_model_data_batch_or_signal_scale_setting_before_loading_anything(tiny, tmp_path,
                                                                                                      capsys):
    """The checkpoint holds a position in the epoch's batch order: resumed with another batch size, seed or data
    file, the run used to go on silently with other batches (rows skipped or seen twice in that epoch). The loss
    signal's scale is part of the controller state a resume loads: `--resume --loss-scale 100` was accepted, recorded
    in the run's config and ignored (the same φ, step for step), and a changed `--calibration-steps` calibrated again
    mid-run."""
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--steps", "2")) == 0
    other = _write(tmp_path / "other.csv", Path(tiny["csv"]).read_text())
    for extra, needle in ((["--batch-size", "4"], "batch_size=8 (now 4)"), (["--seed", "1"], "seed=0 (now 1)"),
                          (["--data", str(other)], f"data={tiny['csv']!r} (now {str(other)!r})"),
                          (["--loss-scale", "100"], "loss_scale=1.0 (now 100.0)"),
                          (["--calibration-steps", "2"], "calibration_steps=0 (now 2)")):
        capsys.readouterr()
        assert main(["train", "--output-dir", str(out), "--resume", "--steps", "4", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"unified-lora: error: --resume {out / 'checkpoints' / 'step-2'}: the run was trained "
                              f"with {needle}") and err.count("\n") == 1
    assert [r["step"] for r in read_trace(out / "trace.jsonl")] == [0, 1]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"]
    # the same model and data, named another way, and a longer run: allowed
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "4", "--model",
                 str(Path(tiny["bert"]).resolve()), "--log-every", "0"]) == 0
    assert [r["step"] for r in read_trace(out / "trace.jsonl")] == [0, 1, 2, 3]


def test_classes_without_a_training_row_and_a_label_column_of_ids_get_a_note(tiny, tmp_path, capsys):
    """Integer labels are class ids: 0/1 and one stray 12 trained a 13-class head whose classes 2 to 11 had no row,
    and a label column with an id per row (--label-column id) trained too, both without a word. Each gets a one-line
    note on stderr (the run goes on: the ids are as documented, and a few-row file rightly has many classes a row);
    string labels, the usual 0/1 file and a dev split that keeps every class say nothing."""
    rows = _rows(40)
    (tmp_path / "gap.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows) + f"{rows[0][0]},12\n")
    (tmp_path / "dev.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in _rows(6, seed=1)))
    (tmp_path / "ids.csv").write_text("text,label,id\n" + "".join(f"{t},{y},{i}\n" for i, (t, y) in enumerate(rows)))

    def notes(*extra):
        capsys.readouterr()
        assert main(["train", "--model", tiny["bert"], "--batch-size", "8", "--max-length", "16", "--log-every", "0",
                     "--steps", "1", "--overwrite", "--output-dir", str(tmp_path / "run"), *extra]) == 0
        return [x for x in capsys.readouterr().err.splitlines() if "note:" in x]

    gap = tmp_path / "gap.csv"
    assert notes("--data", str(gap), "--dev-data", str(tmp_path / "dev.csv")) == [
        f"unified-lora: note: --data {gap}, column 'label': 10 of the 13 classes have no training row: 2, 3, 4, 5, 6, "
        "... (5 more) (integer labels are class ids, so the head has 13 outputs, 0 to 12); the model is never taught "
        "to predict them"]
    ids = tmp_path / "ids.csv"
    said = notes("--data", str(ids), "--label-column", "id")  # the dev split takes 4 of the 40 ids
    assert len(said) == 2 and said[0].startswith(f"unified-lora: note: --data {ids}, column 'id': 4 of the 40 classes "
                                                  "have no training row: ")
    assert said[1] == (f"unified-lora: note: --data {ids}, column 'id': 40 classes for 36 training rows (fewer than 2 "
                       "rows a class): is it the label column, and not an id per row? (--label-column names the "
                       "label column)")
    assert notes("--data", tiny["csv"]) == []
    assert notes("--data", tiny["jsonl"], "--text-columns", "review", "--label-column", "sentiment") == []


def test_the_run_records_its_classes_and_a_resume_on_relabelled_data_is_refused(tiny, tmp_path, capsys):
    """String labels get ids in sorted order, and nothing recorded which id was which class. A --data file edited
    between a run and its --resume (a class renamed: 'pos' -> 'good' sorts first now) resumed with the two labels'
    ids swapped, silently: the checkpoint's head trained on, scored against the other class."""
    data = _write(tmp_path / "d.jsonl", Path(tiny["jsonl"]).read_text())
    out = tmp_path / "run"
    args = ["train", "--model", tiny["bert"], "--data", str(data), "--text-columns", "review", "--label-column",
            "sentiment", "--batch-size", "8", "--max-length", "16", "--log-every", "0", "--output-dir", str(out)]
    assert main([*args, "--steps", "2"]) == 0
    assert json.loads((out / "summary.json").read_text())["classes"] == ["neg", "pos"]
    data.write_text(data.read_text().replace('"pos"', '"good"'))
    capsys.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert err == (f"unified-lora: error: --resume {out / 'checkpoints' / 'step-2'}: the run was trained on the classes "
                   "['neg', 'pos'] (label ids 0, 1, ... in that order) and the data now has ['good', 'neg']; resume "
                   "with the run's data, or start a new run in another --output-dir\n")
    assert [r["step"] for r in read_trace(out / "trace.jsonl")] == [0, 1]
    data.write_text(data.read_text().replace('"good"', '"pos"'))  # the run's data again: it resumes
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "4"]) == 0
    assert json.loads((out / "summary.json").read_text())["classes"] == ["neg", "pos"]


def test_resume_trains_at_the_lr_and_weight_decay_given_now(tiny, tmp_path):
    """README: a resumed run's LRs may change. The optimizer's state_dict holds its param groups' lr and
    weight_decay, and loading it put the old values back: `--resume --lr` (lr_mode multiplier), and a YAML
    `weight_decay`, were ignored silently, and the run went on at the stored values."""
    from unified_lora.config import V1_MULTIPLIERS

    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--steps", "2", "--lr-mode", "multiplier", "--lr", "1e-3")) == 0
    cfg = _write(tmp_path / "more.yaml", "weight_decay: 0.25\n")
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "4", "--lr", "4e-3",
                 "--config", str(cfg)]) == 0
    trace = read_trace(out / "trace.jsonl")
    assert [r["lr"] for r in trace] == pytest.approx([lr * V1_MULTIPLIERS[r["mode"]] for r, lr in
                                                      zip(trace, (1e-3, 1e-3, 4e-3, 4e-3))])
    groups = torch.load(out / "checkpoints" / "step-4" / "state.pt", weights_only=True)["optimizer"]["param_groups"]
    assert {(g["lr"], g["weight_decay"]) for g in groups} == {(4e-3, 0.25)}


def _config_notes(capsys, tmp_path, *argv: str) -> list[str]:
    """The notes `train`'s config step prints on stderr for `argv` (nothing on stdout)."""
    from unified_lora.cli import _train_config, build_parser

    capsys.readouterr()
    _train_config(build_parser().parse_args(["train", "--output-dir", str(tmp_path / "x"), *argv]))
    captured = capsys.readouterr()
    assert not captured.out
    return [line for line in captured.err.splitlines() if "note" in line]


def test_lrs_given_with_lr_mode_multiplier_is_said_to_be_unread_once(tiny, tmp_path, capsys):
    """--lrs (YAML mode_lrs) with --lr-mode multiplier is not read: each mode trains at --lr x its multiplier. It
    was ignored without a word (found by the user trial); refusing it would break recorded commands, so a note on
    stderr says so, once, where the user gave it (a flag or a YAML key), and not for the default table."""
    def note(*argv: str) -> list[str]:
        return _config_notes(capsys, tmp_path, *argv)

    said = ("is not read with --lr-mode multiplier: each mode trains at --lr 0.001 x its multiplier (SINGLE 0.00167, "
            "MULTI 0.001, MIRROR 0.000333); drop it, or pass --lr-mode absolute to train each mode at its --lrs")
    assert note("--lr-mode", "multiplier", "--lr", "1e-3", "--lrs", "1e-2", "1e-2", "1e-2") == [
        f"unified-lora: note: --lrs 0.01 0.01 0.01 {said}"]
    config = _write(tmp_path / "run.yaml", "lr_mode: multiplier\nlr: 1.0e-3\nmode_lrs: [1.0e-2, 5.0e-3, 1.0e-3]\n")
    assert note("--config", str(config)) == [f"unified-lora: note: mode_lrs [0.01 0.005 0.001] (--config) {said}"]
    assert note("--lr-mode", "multiplier") == []  # the default table, given by no one
    assert note("--lrs", "1e-2", "1e-2", "1e-2") == []  # read: --lr-mode absolute
    # a whole run says it once
    assert main(_train_args(tiny, tmp_path / "run", "--steps", "1", "--lr-mode", "multiplier", "--lrs", "1e-2",
                            "1e-2", "1e-2")) == 0
    assert capsys.readouterr().err.count("is not read with --lr-mode multiplier") == 1


def test_controller_only_flags_given_with_no_controller_are_said_to_be_unread_once(tiny, tmp_path, capsys):
    """--theta0, --loss-scale, --min-dwell and the other flags only the controller reads (`_CONTROLLER_ONLY`) were
    accepted with --no-controller and ignored without a word (found by the user trial). A note on stderr now says so,
    once, naming the flags given on the command line; not YAML keys (one file may serve a controller run and its
    --no-controller baseline), and not with the controller. A run given them trains as one without them."""
    def note(*argv: str) -> list[str]:
        return _config_notes(capsys, tmp_path, *argv)

    said = ("not read without the controller (--no-controller), which trains plain LoRA at the MULTI rank and LR "
            "throughout; drop {}, or train with the controller")
    every = ["--signal", "loss", "--loss-scale", "2", "--calibration-steps", "4", "--theta0", "0.2", "--theta1",
             "0.9", "--min-dwell", "5", "--controller-warmup", "3", "--mirror-policy", "never", "--mirror-kernel",
             "eager", "--no-mirror-pack"]
    assert note("--no-controller", *every) == [
        "unified-lora: note: --signal loss, --loss-scale 2, --calibration-steps 4, --theta0 0.2, --theta1 0.9, "
        "--min-dwell 5, --controller-warmup 3, --mirror-policy never, --mirror-kernel eager, --no-mirror-pack are "
        + said.format("them") + " (--signal, --loss-scale, --calibration-steps only set the φ its trace records, "
        "which nothing acts on)"]
    assert note("--no-controller", "--signal", "composite") == [
        f"unified-lora: note: --signal composite is {said.format('it')} (--signal only sets the φ its trace records, "
        "which nothing acts on)"]
    two = [tiny["csv"], tiny["jsonl"], "--task-names", "a,b"]  # several data sets: --resplit-window is theirs
    assert note("--no-controller", "--data", *two, "--resplit-window", "5") == [
        f"unified-lora: note: --resplit-window 5 is {said.format('it')}"]
    assert note("--data", *two, "--resplit-window", "5", *every) == []  # read: the controller runs
    assert note("--no-controller", "--lrs", "1e-2", "1e-2", "1e-2", "--steps", "3") == []  # read without it too
    yaml_keys = _write(tmp_path / "shared.yaml", "theta0: 0.2\nmin_dwell: 5\nloss_scale: 2.0\n")
    assert note("--config", str(yaml_keys), "--no-controller") == []  # a YAML shared with a controller run
    off = _write(tmp_path / "off.yaml", "controller: false\n")  # the controller off in the file, a flag typed
    assert note("--config", str(off), "--min-dwell", "5") == [
        f"unified-lora: note: --min-dwell 5 is {said.format('it')}"]
    # a whole run says it once, and trains as the run without those flags does: they steer the controller alone
    # (--theta0 0.01 --theta1 0.02 would take a controller run to MIRROR at once)
    base = ["--steps", "4", "--no-controller", "--lrs", "1e-2", "1e-2", "1e-2"]
    assert main(_train_args(tiny, tmp_path / "plain", *base)) == 0
    assert "note" not in capsys.readouterr().err
    given = ["--theta0", "0.01", "--theta1", "0.02", "--min-dwell", "2", "--controller-warmup", "1", "--loss-scale",
             "0.01", "--calibration-steps", "2", "--mirror-policy", "always", "--no-mirror-pack"]
    assert main(_train_args(tiny, tmp_path / "flags", *base, *given)) == 0
    assert capsys.readouterr().err.count("not read without the controller") == 1
    plain, flags = (read_trace(tmp_path / d / "trace.jsonl") for d in ("plain", "flags"))
    assert [(r["loss"], r["mode"], r["rank"], r["lr"]) for r in flags] == \
        [(r["loss"], r["mode"], r["rank"], r["lr"]) for r in plain]
    assert {r["mode"] for r in flags} == {1}


def test_lrs_given_with_no_controller_is_said_to_be_read_for_its_multi_value_alone(tiny, tmp_path, capsys):
    """--no-controller trains plain LoRA at the MULTI rank and LR throughout, so `--lrs 1e-3 5e-4 1e-4` trained at
    5e-4 and its SINGLE and MIRROR values were ignored without a word. Not refused (recorded commands give it): a note
    on stderr says so, once, naming the LR used, where the flag is typed with a SINGLE or MIRROR value other than the
    MULTI one; not for YAML `mode_lrs` (one file may serve a controller run and its baseline), not with the
    controller, and not with --lr-mode multiplier, whose own note says that none of --lrs is read."""
    def note(*argv: str) -> list[str]:
        return _config_notes(capsys, tmp_path, *argv)

    said = ("unified-lora: note: --lrs 0.001 0.0005 0.0001 is read for its MULTI value 0.0005 alone without the "
            "controller (--no-controller), which trains plain LoRA at the MULTI rank and LR throughout: not at "
            "SINGLE's 0.001 or MIRROR's 0.0001; train with the controller to use them")
    lrs = ["--lrs", "1e-3", "5e-4", "1e-4"]
    assert note("--no-controller", *lrs) == [said]
    assert note("--no-controller", "--lrs", "5e-4", "5e-4", "1e-4") == [said.replace("0.001 0.0005", "0.0005 0.0005")
                                                                         .replace("SINGLE's 0.001", "SINGLE's 0.0005")]
    assert note("--no-controller", *lrs, "--theta0", "0.2")[0] == said  # and the controller-only flags' note after
    assert note(*lrs) == []  # read: the controller runs
    assert note("--no-controller", "--lrs", "5e-4", "5e-4", "5e-4") == []  # all of it read
    yaml_lrs = _write(tmp_path / "shared.yaml", "mode_lrs: [1.0e-3, 5.0e-4, 1.0e-4]\n")
    assert note("--config", str(yaml_lrs), "--no-controller") == []  # a YAML shared with a controller run
    off = _write(tmp_path / "off.yaml", "controller: false\n")  # the controller off in the file, the flag typed
    assert note("--config", str(off), *lrs) == [said]
    multiplier = note("--no-controller", "--lr-mode", "multiplier", "--lr", "1e-3", *lrs)
    assert len(multiplier) == 1 and "is not read with --lr-mode multiplier" in multiplier[0]
    # a whole run says it once, and trains as the run given the MULTI LR for every mode does
    assert main(_train_args(tiny, tmp_path / "given", "--steps", "3", "--no-controller", *lrs)) == 0
    assert capsys.readouterr().err.count("is read for its MULTI value") == 1
    assert main(_train_args(tiny, tmp_path / "multi", "--steps", "3", "--no-controller", "--lrs", "5e-4", "5e-4",
                            "5e-4")) == 0
    given, multi = (read_trace(tmp_path / d / "trace.jsonl") for d in ("given", "multi"))
    assert [(r["loss"], r["mode"], r["lr"]) for r in given] == [(r["loss"], r["mode"], r["lr"]) for r in multi]
    assert {r["lr"] for r in given} == {5e-4}


def test_resume_refuses_a_state_pt_that_would_run_code_and_trust_checkpoint_loads_it(tiny, tmp_path, capsys):
    """--resume read state.pt with torch.load(weights_only=False): a run folder someone sent you, whose state.pt
    pickles a call, ran that call on --resume (in latest_checkpoint, before any check). The file is now read with
    weights_only=True: refused with exit 2 and a message naming --trust-checkpoint, and nothing of it runs. The
    checkpoints the CLI writes (here with the Mirror snapshot held) load that way; --trust-checkpoint loads a
    trusted file in full."""
    out, marker = tmp_path / "run", tmp_path / "ran.txt"
    cfg = _write(tmp_path / "mirror.yaml", "theta0: 0.001\ntheta1: 0.002\n")  # MIRROR from the first step
    assert main(_train_args(tiny, out, "--steps", "2", "--config", str(cfg))) == 0
    state = out / "checkpoints" / "step-2" / "state.pt"
    st = torch.load(state, weights_only=True)  # what the CLI writes is tensors and plain values
    assert st["controller"]["mirror"]["weights"] is not None
    st["note"] = RunsCode(marker)
    torch.save(st, state)
    capsys.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "refused to load it: it holds exec, which is not a tensor" in err and "--trust-checkpoint" in err, err
    assert [r["step"] for r in read_trace(out / "trace.jsonl")] == [0, 1]  # nothing trained
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "4", "--trust-checkpoint"]) == 0
    assert marker.exists()  # a trusted file is unpickled in full (so its code ran)
    assert [r["step"] for r in read_trace(out / "trace.jsonl")] == [0, 1, 2, 3]


def test_resume_with_a_checkpoint_file_cut_short_names_the_file(tiny, tmp_path, capsys):
    """A run folder copied with a file cut short (an interrupted rsync): --resume failed with "OSError: [Errno 22]
    Invalid argument (internal error)" (the newest checkpoint's state.pt) or safetensors' "header too small" (the
    adapter file), naming no file. Now exit 2 with the file and what to do."""
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--epochs", "2")) == 0
    for name in ("epoch-2/state.pt", "epoch-2/adapter_blocks.safetensors"):
        path = out / "checkpoints" / name
        intact = path.read_bytes()
        path.write_bytes(intact[:len(intact) // 2])
        capsys.readouterr()
        assert main(["train", "--output-dir", str(out), "--resume", "--epochs", "3"]) == 2
        err = capsys.readouterr().err
        assert f"{path}: cannot read it" in err and "damaged or incomplete" in err and "internal error" not in err, err
        path.write_bytes(intact)
    assert main(["train", "--output-dir", str(out), "--resume", "--epochs", "3"]) == 0


def test_resume_with_a_state_pt_that_lacks_keys_names_the_file_and_the_keys(tiny, tmp_path, capsys):
    """A checkpoint whose state.pt lacks keys (written by another tool, or edited): --resume failed with
    "KeyError: 'config' (internal error)" (or 'controller', 'run', wherever a key was first read). Now exit 2 with
    the file, the missing keys and what to do; `report` of the run folder says the same; nothing is trained."""
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--epochs", "1")) == 0
    state = out / "checkpoints" / "epoch-1" / "state.pt"
    st = torch.load(state, weights_only=True)
    for drop in (["controller", "torch_rng"], ["config"]):
        torch.save({k: v for k, v in st.items() if k not in drop}, state)
        trace = (out / "trace.jsonl").read_text()
        capsys.readouterr()
        assert main(["train", "--output-dir", str(out), "--resume", "--epochs", "2"]) == 2
        err = capsys.readouterr().err
        assert f"{state}: not a unified-lora checkpoint state (it lacks the keys {drop}" in err, err
        assert "internal error" not in err and len(err.strip().splitlines()) == 1, err
        assert (out / "trace.jsonl").read_text() == trace
    (out / "summary.json").unlink()  # `report` then summarises the run from its newest checkpoint
    assert main(["report", str(out)]) == 2
    assert f"{state}: not a unified-lora checkpoint state" in capsys.readouterr().err


def test_latest_checkpoint_reads_no_state_pt_but_the_newest_one(tiny, tmp_path, capsys):
    """latest_checkpoint torch.load-ed every checkpoint's state.pt (optimizer moments, Mirror snapshot) to find the
    newest: with --save-steps and a big model, slow and memory heavy. It now reads the step from each one's small
    checkpoint.json: older checkpoints whose state.pt cannot be read at all do not stop --resume. Checkpoints
    written before checkpoint.json (none there) are still ordered by their state.pt."""
    from unified_lora.training import latest_checkpoint

    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--epochs", "1", "--save-steps", "1")) == 0
    ckpts = out / "checkpoints"
    newest = latest_checkpoint(ckpts)
    steps = sorted(p for p in ckpts.iterdir() if p.name.startswith("step-"))
    assert len(steps) >= 3
    kept = {}
    for p in ckpts.iterdir():
        if p != newest:  # not a torch file at all: torch.load of it raises
            kept[p] = (p / "state.pt").read_bytes()
            (p / "state.pt").write_bytes(b"not a torch file")
    assert latest_checkpoint(ckpts) == newest
    assert all((p / "checkpoint.json").is_file() for p in ckpts.iterdir())
    capsys.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume", "--epochs", "2", "--save-steps", "0"]) == 0
    assert "resumed from" in capsys.readouterr().out
    for p, data in kept.items():
        (p / "state.pt").write_bytes(data)
    newest = latest_checkpoint(ckpts)
    for p in ckpts.iterdir():  # checkpoints of an older version: no checkpoint.json
        (p / "checkpoint.json").unlink()
    assert latest_checkpoint(ckpts) == newest

def test_resume_refuses_a_model_folder_replaced_by_a_model_of_another_size(tiny, tmp_path, capsys):
    """The run's --model folder replaced since (a wider model saved to the same path): the path is unchanged, so the
    settings check passes, and load_state_dict's "size mismatch" was an internal error. Now exit 2, naming a tensor,
    both shapes and what to do; nothing is trained."""
    from transformers import BertConfig, BertModel

    model, out = tmp_path / "model", tmp_path / "run"
    shutil.copytree(tiny["bert"], model)
    argv = _train_args(tiny, out, "--epochs", "1")
    argv[argv.index("--model") + 1] = str(model)
    assert main(argv) == 0
    old = BertModel.from_pretrained(model)
    wider = BertModel(BertConfig(**{**old.config.to_dict(), "hidden_size": 48}))
    wider.config.architectures = ["BertModel"]
    wider.save_pretrained(model)
    trace = (out / "trace.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint tensors have other shapes than this model's" in err and "(4, 32) (this model's: (4, 48))" in err
    assert f"the model at {model} is not the one the run was trained on" in err and "internal error" not in err, err
    assert (out / "trace.jsonl").read_text() == trace


def test_train_causal_lm(tiny, tmp_path, capsys):
    out = tmp_path / "lm"
    args = ["train", "--model", tiny["gpt2"], "--data", tiny["csv"], "--text-columns", "text", "--target-modules",
            "c_attn", "--epochs", "1", "--batch-size", "8", "--max-length", "16", "--output-dir", str(out),
            "--loss-scale", "4", "--eval-steps", "3"]
    assert main(args) == 0
    said = capsys.readouterr().out
    # its BERT tokenizer has no eos: no text row gets one, and the console says so
    assert ("text rows ('text'): the loss is on every token; the tokenizer has no eos token, so none ends a row (the "
            "model is not taught to stop)") in said
    # the classification table's labels are not trained on, and the console says so (it did not)
    assert f"{tiny['csv']}: column 'label' is not used: a causal LM reads the text ('text'), not labels\n" in said
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task_type"] == "causal-lm"
    evals = summary["arms"]["run"]["eval"]
    assert {"loss", "perplexity"} <= set(evals["epoch 1"])
    # a causal LM's evaluations are ranked by the dev loss, lower is better
    low = min(evals, key=lambda p: evals[p]["loss"])
    assert len(evals) > 1 and low != next(iter(evals))
    assert {k: summary["best"][k] for k in ("point", "metric", "value", "greater_is_better")} == \
        {"point": low, "metric": "loss", "value": evals[low]["loss"], "greater_is_better": False}


def test_a_causal_lm_pads_its_rows_on_the_right_whatever_the_tokenizers_padding_side(tiny):
    """A tokenizer saved with padding_side="left" padded a causal LM's table rows at the start: GPT-2 reads its
    absolute positions from the first column, so a short row's tokens trained at later positions than generation
    gives them, and a dev row's loss depended on the rows batched with it (the dev perplexity with batch 64 was not
    the one with batch 1)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unified_lora.training import encode_rows, evaluate

    rows = ["good movie", "bad awful poor sad terrible ugly the a movie film", "nice film was very quite nice"]
    model = AutoModelForCausalLM.from_pretrained(tiny["gpt2"]).eval()
    encs = {}
    for side in ("left", "right"):
        tok = AutoTokenizer.from_pretrained(tiny["gpt2"], padding_side=side)
        encs[side] = enc = encode_rows(tok, rows, "causal-lm", 32)
        assert tok.padding_side == side  # the tokenizer is left as it was
        assert enc["attention_mask"][:, 0].all() and (enc["labels"] == -100).equal(enc["attention_mask"] == 0)
        together, alone = (evaluate(model, enc, "causal-lm", "lm", batch_size=b) for b in (64, 1))
        assert together["loss"] == pytest.approx(alone["loss"], abs=1e-6), side
    assert all(encs["left"][k].equal(encs["right"][k]) for k in encs["right"])


def test_a_causal_lm_leaves_out_rows_of_one_token(tiny, tmp_path):
    """A row of one token has no next token to predict: one such row alone in the dev set's last batch of 64 (a
    GPT-2-style tokenizer adds no BOS/EOS, so a one-word text is one token) made the whole dev loss and perplexity
    NaN, and a training batch of such rows had a NaN loss. Those rows are left out now."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bert_tok = AutoTokenizer.from_pretrained(tiny["gpt2"])
    word_level = Tokenizer(models.WordLevel(bert_tok.get_vocab(), unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    model_dir = tmp_path / "gpt2_bare_tok"
    shutil.copytree(tiny["gpt2"], model_dir)
    for f in model_dir.iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            f.unlink()
    PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="[PAD]", unk_token="[UNK]",
                            eos_token="[SEP]").save_pretrained(model_dir)
    assert len(AutoTokenizer.from_pretrained(model_dir)("good")["input_ids"]) == 1
    texts = [t for t, _ in _rows(64)]
    train = _write(tmp_path / "train.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts[:32]))
    long = " ".join(texts[:4])  # 20 words: cut at --max-length 16
    dev = _write(tmp_path / "dev.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts + [long, "good"]))
    out = tmp_path / "run"
    # --no-text-eos: with the eos this tokenizer has, "good" would be two tokens, the eos its target
    assert main(["train", "--model", str(model_dir), "--data", str(train), "--dev-data", str(dev), "--target-modules",
                 "c_attn", "--steps", "2", "--batch-size", "8", "--max-length", "16", "--output-dir", str(out),
                 "--log-every", "0", "--no-text-eos"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    final = summary["arms"]["run"]["eval"]
    (metrics,) = final.values()
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["perplexity"])
    console = (out / "console.txt").read_text()
    assert "32 train / 65 dev rows" in console
    # said as the eos path says them (the row was left out, and the long one cut, silently)
    assert ("dev data: 1 of 66 text rows have no token to predict within max_length 16 (a single token) and are left "
            "out\ndev data: 1 of 66 text rows are longer than max_length 16 and cut at its end: the rest of their "
            "text is not trained on") in console


def _corpus(path: Path, lines: int = 120) -> str:
    words = POS + NEG + FILLER
    text = "".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(5 + i % 4)) + "\n" for i in range(lines))
    path.write_text(text)
    return text


def test_train_without_target_modules_adapts_pefts_default_for_the_model_type_and_records_it(tiny, tmp_path):
    """`train`'s default targets were BERT's query,value whatever the model, so a GPT-2 or a Llama run without
    --target-modules was an error; they are PEFT's default for the model type now (c_attn, q_proj,v_proj), recorded
    as resolved names, so a --resume (and predict/export) reads the same layers."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    _corpus(tmp_path / "corpus.txt")
    tok = AutoTokenizer.from_pretrained(tiny["gpt2"])
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                 bos_token_id=2, eos_token_id=3, pad_token_id=0)).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    for arch, model, expected in (("gpt2", tiny["gpt2"], ["c_attn"]),
                                  ("llama", str(tmp_path / "llama"), ["q_proj", "v_proj"])):
        out = tmp_path / arch
        args = ["train", "--model", model, "--data", str(tmp_path / "corpus.txt"), "--steps", "2",
                "--batch-size", "8", "--max-length", "16", "--output-dir", str(out), "--log-every", "0",
                "--save-steps", "1"]
        assert main(args) == 0
        assert json.loads((out / "summary.json").read_text())["config"]["target_modules"] == expected
        blocks = load_file(str(out / "checkpoints" / "step-2" / "adapter_blocks.safetensors"))
        assert {k.split(".lora_")[0].split(".")[-1] for k in blocks if ".lora_" in k} == set(expected)
        assert main(["train", "--output-dir", str(out), "--resume", "--steps", "3", "--log-every", "0"]) == 0
        assert json.loads((out / "summary.json").read_text())["config"]["target_modules"] == expected


def test_a_causal_lm_on_the_loss_signal_calibrates_its_scale_unless_given_one(tiny, tmp_path, capsys):
    """A causal LM's loss (about ln 39 = 3.7 nats here) on the loss signal's default scale of 1 read as MIRROR for the
    whole run (φ 0.80 at the end of a tinyshakespeare run). Given neither --loss-scale nor --calibration-steps, a
    causal-LM run now calibrates on its first 20 steps, says so, and records it; a scale given, or a classifier,
    keeps the default."""
    from unified_lora.cli import LM_CALIBRATION_STEPS
    from unified_lora.trace import read_trace

    _corpus(tmp_path / "corpus.txt")
    base = ["train", "--model", tiny["gpt2"], "--data", str(tmp_path / "corpus.txt"), "--steps", "30",
            "--batch-size", "8", "--max-length", "16", "--log-every", "0"]
    assert main([*base, "--output-dir", str(tmp_path / "cal")]) == 0
    assert "read on the scale of its first 20 steps" in capsys.readouterr().out
    config = json.loads((tmp_path / "cal" / "summary.json").read_text())["config"]
    assert config["calibration_steps"] == LM_CALIBRATION_STEPS == 20 and config["loss_scale"] == 1.0
    phi = [r["phi"] for r in read_trace(tmp_path / "cal" / "trace.jsonl")]
    assert set(phi[:20]) == {0.5} and max(phi[20:]) < 0.7  # held, then read on the run's own scale: not MIRROR
    assert main([*base, "--output-dir", str(tmp_path / "scale1"), "--loss-scale", "1"]) == 0
    assert "read on the scale" not in capsys.readouterr().out
    config = json.loads((tmp_path / "scale1" / "summary.json").read_text())["config"]
    assert config["calibration_steps"] == 0
    assert [r["mode"] for r in read_trace(tmp_path / "scale1" / "trace.jsonl")][-1] == 2  # the loss level alone: MIRROR
    assert main(["train", "--model", tiny["bert"], "--data", tiny["csv"], "--steps", "2", "--batch-size", "8",
                 "--output-dir", str(tmp_path / "cls"), "--log-every", "0"]) == 0
    assert json.loads((tmp_path / "cls" / "summary.json").read_text())["config"]["calibration_steps"] == 0
    capsys.readouterr()
    assert main([*base[:5], "--steps", "12", *base[7:], "--output-dir", str(tmp_path / "short")]) == 0
    # a run that ends inside the calibration is told so (φ held throughout: the controller never acts)
    assert "this run's 12 steps end inside it, so the controller holds MULTI throughout" in capsys.readouterr().out
    assert {r["mode"] for r in read_trace(tmp_path / "short" / "trace.jsonl")} == {1}


def test_a_no_controller_causal_lm_run_records_phi_on_the_calibrated_scale_and_trains_as_before(tiny, tmp_path,
                                                                                                capsys):
    """A controller run of a causal LM calibrates its loss scale; its --no-controller baseline recorded φ on the scale
    of 1, so its trace and plot sat in the MIRROR band beside the controller run's φ of 0.33. The baseline now
    calibrates the recorded signal the same way, and says so; nothing acts on φ there, so it trains as before (the
    uncalibrated baseline, --loss-scale 1, as the runs before this were)."""
    _corpus(tmp_path / "corpus.txt")
    base = ["train", "--model", tiny["gpt2"], "--data", str(tmp_path / "corpus.txt"), "--steps", "30", "--batch-size",
            "8", "--max-length", "16", "--log-every", "0", "--no-controller"]
    assert main([*base, "--output-dir", str(tmp_path / "cal")]) == 0
    out = capsys.readouterr().out
    assert ("a causal LM's loss is read on the scale of its first 20 steps" in out and "without the controller "
            "(--no-controller) φ is recorded, not acted on, so this changes no training" in out)
    assert json.loads((tmp_path / "cal" / "summary.json").read_text())["config"]["calibration_steps"] == 20
    assert main([*base, "--loss-scale", "1", "--output-dir", str(tmp_path / "one")]) == 0
    assert "read on the scale" not in capsys.readouterr().out
    cal, one = (read_trace(tmp_path / d / "trace.jsonl") for d in ("cal", "one"))
    assert [(r["loss"], r["mode"], r["rank"], r["lr"]) for r in cal] == \
        [(r["loss"], r["mode"], r["rank"], r["lr"]) for r in one]  # the same training
    assert {r["mode"] for r in cal} == {1}
    phi = [r["phi"] for r in cal]
    assert set(phi[:20]) == {0.5} and max(phi[20:]) < 0.7  # held, then on the run's own scale: below the MIRROR band
    assert min(r["phi"] for r in one[20:]) > 0.7  # on the scale of 1 it read as MIRROR


def test_report_says_the_loss_scale_a_run_read_and_where_it_came_from(tiny, tmp_path, capsys):
    """A causal LM's run calibrates its loss scale on its first 20 steps; the trace recorded the scale, but `report`
    did not say it, nor whether it was calibrated, given or the default 1. It does now; a summary.json written before
    the record (no `loss_scale` key) still reports, without the line."""
    from unified_lora.trace import read_trace

    _corpus(tmp_path / "corpus.txt")
    base = ["train", "--model", tiny["gpt2"], "--data", str(tmp_path / "corpus.txt"), "--batch-size", "8",
            "--max-length", "16", "--log-every", "0"]

    def report(out: Path) -> list[str]:
        capsys.readouterr()
        assert main(["report", str(out)]) == 0
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("loss scale")]

    assert main([*base, "--steps", "22", "--output-dir", str(tmp_path / "cal")]) == 0
    trace = read_trace(tmp_path / "cal" / "trace.jsonl")
    scale = sum(r["loss"] for r in trace[:20]) / 20 / 0.5  # the first 20 losses' mean maps to 0.5
    assert trace[-1]["components"]["loss_scale"] == pytest.approx(scale, rel=1e-9) and scale > 2
    assert report(tmp_path / "cal") == [f"loss scale: {scale:.4g}, calibrated on the first 20 steps (their mean loss "
                                        "reads as 0.5; --calibration-steps, --calibration-target)"]
    assert main([*base, "--steps", "3", "--output-dir", str(tmp_path / "short")]) == 0
    assert report(tmp_path / "short") == ["loss scale: 1, not calibrated: the run ended inside its calibration on the "
                                          "first 20 steps (--calibration-steps), φ held throughout"]
    assert main([*base, "--steps", "2", "--loss-scale", "3", "--output-dir", str(tmp_path / "given")]) == 0
    assert report(tmp_path / "given") == ["loss scale: 3, given (--loss-scale)"]
    assert main(_train_args(tiny, tmp_path / "cls", "--steps", "2")) == 0
    assert report(tmp_path / "cls") == ["loss scale: 1, the default"]
    # an older run folder: its summary.json has no record of the scale
    path = tmp_path / "cal" / "summary.json"
    summary = json.loads(path.read_text())
    del summary["loss_scale"]
    path.write_text(json.dumps(summary))
    capsys.readouterr()
    assert main(["report", str(tmp_path / "cal")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("train: ") and "loss scale" not in out and "steps per mode" in out


def test_calibration_target_is_a_train_flag_recorded_and_checked_as_the_yaml_key(tiny, tmp_path, capsys):
    """`train` took `calibration_target` (what the mean of the calibration's losses maps to) as a YAML key alone;
    `demo` has the flag. `--calibration-target` now sets it: the scale is the mean of the first N losses / target,
    recorded in the summary and named by `report`; the flag overrides the YAML key; a value that is not positive and
    finite is a one-line error; a --resume may not change it; --no-controller names it among the unread flags."""
    from unified_lora.cli import _train_config, build_parser

    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--steps", "5", "--save-steps", "5", "--calibration-steps", "3",
                            "--calibration-target", "2")) == 0
    trace = read_trace(out / "trace.jsonl")
    scale = sum(r["loss"] for r in trace[:3]) / 3 / 2.0
    assert trace[-1]["components"]["loss_scale"] == pytest.approx(scale, rel=1e-9)
    assert trace[0]["components"]["loss_scale"] == 1.0  # (held at the default until the calibration ends)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["calibration_target"] == 2.0
    assert summary["loss_scale"] == {"value": pytest.approx(scale, rel=1e-9), "source": "calibrated", "steps": 3,
                                     "target": 2.0, "calibrated": True}
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert f"loss scale: {scale:.4g}, calibrated on the first 3 steps (their mean loss reads as 2; " \
        "--calibration-steps, --calibration-target)" in capsys.readouterr().out
    # a resume keeps it, as it keeps --calibration-steps
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "6", "--calibration-target", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unified-lora: error: --resume {out / 'checkpoints' / 'step-5'}: the run was trained with "
                          "calibration_target=2.0 (now 1.0)") and err.count("\n") == 1
    # the flag overrides the YAML key, as other flags do
    yaml = _write(tmp_path / "c.yaml", "calibration_steps: 3\ncalibration_target: 4.0\n")
    args = ["train", "--config", str(yaml), "--output-dir", str(tmp_path / "x")]
    assert _train_config(build_parser().parse_args(args))[0].calibration_target == 4.0
    assert _train_config(build_parser().parse_args([*args, "--calibration-target", "1.5"]))[0].calibration_target \
        == 1.5
    for bad in ("0", "-1", "nan", "inf"):
        capsys.readouterr()
        assert main(_train_args(tiny, tmp_path / "bad", "--steps", "2", "--calibration-steps", "2",
                                "--calibration-target", bad)) == 2
        err = capsys.readouterr().err
        assert err == (f"unified-lora: error: calibration_target: must be a positive finite number, got "
                       f"{float(bad)}\n"), err
    assert not (tmp_path / "bad").exists()
    # the composite signal reads no scale: refused, as --calibration-steps is
    assert main(_train_args(tiny, tmp_path / "comp", "--steps", "2", "--signal", "composite",
                            "--calibration-target", "2")) == 2
    assert "calibration_target: 2.0 would be ignored: the 'composite' signal does not read it" in \
        capsys.readouterr().err
    assert _config_notes(capsys, tmp_path, "--no-controller", "--calibration-steps", "3", "--calibration-target",
                         "2") == [
        "unified-lora: note: --calibration-steps 3, --calibration-target 2 are not read without the controller "
        "(--no-controller), which trains plain LoRA at the MULTI rank and LR throughout; drop them, or train with the "
        "controller (--calibration-steps, --calibration-target only set the φ its trace records, which nothing acts "
        "on)"]
    # (found by the review) without --calibration-steps no calibration reads the target, not even for the φ recorded:
    # the note said it "only sets the φ its trace records", beside train's next note that it is read by nothing
    assert _config_notes(capsys, tmp_path, "--no-controller", "--calibration-target", "2") == [
        "unified-lora: note: --calibration-target 2 is not read without the controller (--no-controller), which "
        "trains plain LoRA at the MULTI rank and LR throughout; drop it, or train with the controller"]


def test_a_loss_signal_setting_given_to_the_composite_signal_is_refused_at_its_default_value_too(tiny, tmp_path,
                                                                                                   capsys):
    """`--signal composite --calibration-target 0.5` ran without a word where `--calibration-target 2` was refused:
    SignalConfig compares the value with its default, and 0.5 is the default. What is refused is what the command
    gives, a flag or a YAML key, whatever its value, as the loss signal's note on an unread target already reads it;
    --loss-scale 1 and --calibration-steps 0 (their defaults) likewise, in `train` and in the demo. Nothing is
    written; without them the composite run builds its config."""
    from unified_lora.cli import _train_config, build_parser

    def error(*argv: str) -> str:
        capsys.readouterr()
        assert main(list(argv)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err.rstrip("\n")

    said = ("unified-lora: error: {k}: {v} would be ignored: the 'composite' signal does not read it (only --signal "
            "loss does), whatever its value; drop {where}, or pass --signal loss")
    for flag, value, shown in (("--calibration-target", "0.5", "0.5"), ("--calibration-target", "2", "2.0"),
                               ("--loss-scale", "1", "1.0"), ("--calibration-steps", "0", "0")):
        key = flag[2:].replace("-", "_")
        assert error(*_train_args(tiny, tmp_path / "t", "--signal", "composite", flag, value)) == said.format(
            k=key, v=shown, where=flag)
        assert error(*_demo_args(tiny, tmp_path / "d", "--signal", "composite", flag, value)) == said.format(
            k=key, v=shown, where=flag)
    yaml = _write(tmp_path / "c.yaml", "signal: composite\ncalibration_target: 0.5\n")
    assert error(*_train_args(tiny, tmp_path / "y", "--config", str(yaml))) == said.format(
        k="calibration_target", v="0.5", where="calibration_target (--config)")
    yaml = _write(tmp_path / "l.yaml", "calibration_target: 0.5\n")  # the key, the flag picks the signal
    assert error(*_train_args(tiny, tmp_path / "y", "--config", str(yaml), "--signal", "composite")) == said.format(
        k="calibration_target", v="0.5", where="calibration_target (--config)")
    assert not any((tmp_path / d).exists() for d in ("t", "d", "y"))
    build = lambda *argv: _train_config(build_parser().parse_args(  # noqa: E731
        ["train", "--output-dir", str(tmp_path / "x"), *argv]))[0]
    assert build("--signal", "composite").calibration_target == 0.5  # the default, not given: no refusal
    assert build("--calibration-target", "0.5", "--calibration-steps", "3").calibration_target == 0.5  # loss signal


def test_a_calibration_target_no_calibration_reads_is_said_to_be_unread(tiny, tmp_path, capsys):
    """--calibration-target (or YAML calibration_target) given to a run that does not calibrate (a classifier with no
    --calibration-steps, or a --loss-scale given) was ignored without a word: a note says so, once, naming why; a
    causal LM, which calibrates of its own, reads it and gets none; neither does a run that calibrates."""
    def note(out: str, *argv: str, model: str = "bert", data: str | None = None) -> list[str]:
        capsys.readouterr()
        args = ["train", "--model", tiny[model], "--data", data or tiny["csv"], "--steps", "2", "--batch-size", "8",
                "--max-length", "16", "--log-every", "0", "--output-dir", str(tmp_path / out), *argv]
        assert main(args) == 0
        return [x for x in capsys.readouterr().err.splitlines() if "calibration" in x]

    assert note("a", "--calibration-target", "2") == [
        "unified-lora: note: --calibration-target 2 is not read: this run does not calibrate its loss scale (it has "
        "no --calibration-steps); give --calibration-steps N to set the scale from the mean loss of its first N "
        "steps"]
    assert note("b", "--calibration-target", "2", "--loss-scale", "3") == [
        "unified-lora: note: --calibration-target 2 is not read: this run does not calibrate its loss scale "
        "(--loss-scale sets the scale); give --calibration-steps N to set the scale from the mean loss of its first "
        "N steps"]
    yaml = _write(tmp_path / "c.yaml", "calibration_target: 1.5\n")
    assert note("c", "--config", str(yaml)) == [
        "unified-lora: note: calibration_target 1.5 (--config) is not read: this run does not calibrate its loss "
        "scale (it has no --calibration-steps); give --calibration-steps N to set the scale from the mean loss of its "
        "first N steps"]
    assert note("d", "--calibration-target", "2", "--calibration-steps", "2") == []
    assert note("d0", "--calibration-target", "2", "--calibration-steps", "0")[0].endswith(
        "does not calibrate its loss scale (--calibration-steps 0); give --calibration-steps N to set the scale from "
        "the mean loss of its first N steps")
    # the demo: its own calibration (20 steps, target 2.2) is off where --loss-scale is given
    capsys.readouterr()
    assert main([*_demo_args(tiny, tmp_path / "demo"), "--loss-scale", "3", "--calibration-target", "2"]) == 0
    assert [x for x in capsys.readouterr().err.splitlines() if "calibration" in x] == [
        "unified-lora: note: --calibration-target 2 is not read: this run does not calibrate its loss scale "
        "(--loss-scale sets the scale); give --calibration-steps N to set the scale from the mean loss of its first "
        "N steps"]
    _corpus(tmp_path / "corpus.txt")
    assert note("e", "--calibration-target", "2", model="gpt2", data=str(tmp_path / "corpus.txt")) == []
    trace = read_trace(tmp_path / "e" / "trace.jsonl")
    assert json.loads((tmp_path / "e" / "summary.json").read_text())["loss_scale"]["target"] == 2.0
    assert trace[-1]["components"]["loss_scale"] == 1.0  # (2 steps: still inside its 20-step calibration)


def test_a_shock_inside_the_loss_signals_calibration_is_said_to_be_read_into_its_scale(tiny, tmp_path, capsys):
    """A causal LM's run calibrates on its first 20 steps by itself; a shock starting inside them was read into the
    scale without a word (a tiny GPT-2 shocked on steps [10, 30): its scale about doubled, φ held through the shock,
    then SINGLE). A note says so, for a calibration given by hand too; a scale given, or a shock after the
    calibration, has none."""
    _corpus(tmp_path / "corpus.txt")
    lm = ["train", "--model", tiny["gpt2"], "--data", str(tmp_path / "corpus.txt"), "--batch-size", "8",
          "--max-length", "16", "--log-every", "0", "--shock-type", "random"]
    note = ("note: the shock (steps [1, 3)) starts inside the loss signal's calibration (its first 20 steps): the scale "
            "is set from shocked losses too and φ is held through them, so the shock reads as less stress; start it "
            "at step 20 or later, or give --loss-scale\n")
    assert main([*lm, "--steps", "3", "--shock-start", "1", "--shock-end", "3", "--output-dir", str(tmp_path / "a")]) == 0
    assert note in capsys.readouterr().out
    assert main([*lm, "--steps", "3", "--shock-start", "1", "--shock-end", "3", "--loss-scale", "3", "--output-dir",
                 str(tmp_path / "b")]) == 0
    assert "starts inside the loss signal's calibration" not in capsys.readouterr().out
    assert main([*lm, "--steps", "4", "--shock-start", "2", "--shock-end", "4", "--calibration-steps", "2",
                 "--output-dir", str(tmp_path / "c")]) == 0
    assert "starts inside the loss signal's calibration" not in capsys.readouterr().out
    assert main(["train", "--model", tiny["bert"], "--data", tiny["csv"], "--steps", "3", "--batch-size", "8",
                 "--calibration-steps", "3", "--shock-start", "2", "--shock-end", "3", "--log-every", "0",
                 "--output-dir", str(tmp_path / "cls")]) == 0
    assert "note: the shock (steps [2, 3)) starts inside the loss signal's calibration (its first 3 steps)" in \
        capsys.readouterr().out


def test_the_readmes_hand_written_loop_with_the_loss_signal_calibrated_gives_trains_trace_for_a_causal_lm(tiny,
                                                                                                         tmp_path):
    """README (the hand-written loop): an API user on the loss signal gets no calibration by itself, as `train` gives
    a causal LM; with `SignalConfig(kind="loss", calibration_steps=20)` and train's LRs, the loop gives train's trace
    (φ, modes, LRs and losses), and without it the loss level reads higher (φ towards MIRROR)."""
    from transformers import AutoModelForCausalLM

    from unified_lora import ActuatorConfig, SignalConfig, setup_unified_lora
    from unified_lora.trace import read_trace
    from unified_lora.training import (TrainConfig, batches, encode_rows, load_data, load_tokenizer, seed_everything,
                                       trim_padding)

    _corpus(tmp_path / "corpus.txt")
    assert main(["train", "--model", tiny["gpt2"], "--data", str(tmp_path / "corpus.txt"), "--steps", "30",
                 "--batch-size", "8", "--max-length", "16", "--log-every", "0", "--output-dir", str(tmp_path / "run")]) == 0
    cli = read_trace(tmp_path / "run" / "trace.jsonl")

    def loop(calibration_steps: int) -> list:
        train, _, _ = load_data(TrainConfig(model=tiny["gpt2"], data=str(tmp_path / "corpus.txt")), "causal-lm")
        enc = encode_rows(load_tokenizer(tiny["gpt2"]), train, "causal-lm", 16)
        seed_everything(0)
        model = AutoModelForCausalLM.from_pretrained(tiny["gpt2"]).train()
        _, ctrl = setup_unified_lora(model, signal=SignalConfig(kind="loss", calibration_steps=calibration_steps),
                                     actuators=ActuatorConfig(lr_mode="absolute", mode_lrs=(2e-3, 5e-4, 1e-4)),
                                     print_fn=None)
        # (train's AdamW: weight_decay 0, where torch's default is 0.01)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4, weight_decay=0.0)
        ctrl.attach_optimizer(optimizer)
        every = [b for epoch in range(30) for b in batches(enc, 8, 0, epoch)]  # (the seed's order, epoch by epoch)
        for batch in every[:30]:
            loss = model(**trim_padding(batch)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            ctrl.step(loss=loss.item())
            optimizer.step(); optimizer.zero_grad()
        return [(r.step, r.phi, r.mode, r.lr, r.loss) for r in ctrl.trace]

    assert loop(20) == [(r["step"], r["phi"], r["mode"], r["lr"], r["loss"]) for r in cli]
    uncalibrated = loop(0)
    assert uncalibrated[-1][1] > cli[-1]["phi"] + 0.2


def test_train_causal_lm_on_a_plain_text_corpus_cuts_token_blocks_and_holds_out_the_tail(tiny, tmp_path, capsys):
    from transformers import AutoTokenizer

    from unified_lora.training import TextCorpus, split_corpus

    text = _corpus(tmp_path / "corpus.txt")
    out = tmp_path / "lm_txt"
    args = ["train", "--model", tiny["gpt2"], "--data", str(tmp_path / "corpus.txt"), "--target-modules", "c_attn",
            "--epochs", "1", "--batch-size", "8", "--max-length", "16", "--output-dir", str(out), "--log-every", "0"]
    assert main(args) == 0
    head = capsys.readouterr().out.split("unified-lora train: ", 1)[1].splitlines()[0]
    train_text, dev_text = split_corpus(TextCorpus([text]), 0.1)
    longest = max(len(line) for line in text.splitlines(keepends=True))
    assert train_text[0] + dev_text[0] == text and train_text[0].endswith("\n")  # the tail, cut at a line start
    assert 0.1 * len(text) <= len(dev_text[0]) < 0.1 * len(text) + longest
    tok = AutoTokenizer.from_pretrained(tiny["gpt2"])
    n_train = len(tok(train_text[0], add_special_tokens=False)["input_ids"]) // 16
    n_dev = len(tok(dev_text[0], add_special_tokens=False)["input_ids"]) // 16
    assert f"{n_train} train / {n_dev} dev rows" in head and n_train > 10
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task_type"] == "causal-lm" and "perplexity" in summary["arms"]["run"]["eval"]["epoch 1"]
    assert main(args[:-2] + ["--dev-size", "2", "--output-dir", str(tmp_path / "lm_txt2"), "--log-every", "0"]) == 0
    assert f"{n_train} train / 2 dev rows" in capsys.readouterr().out
    (tmp_path / "dev.raw").write_text(dev_text[0])  # wikitext's .raw is plain text too; as --dev-data, used whole
    assert main(args[:-2] + ["--dev-data", str(tmp_path / "dev.raw"), "--output-dir", str(tmp_path / "lm_raw"),
                             "--log-every", "0"]) == 0
    assert f"{len(tok(text, add_special_tokens=False)['input_ids']) // 16} train / {n_dev} dev rows" in \
        capsys.readouterr().out


def test_a_text_corpus_is_one_token_stream_with_eos_between_documents(tiny):
    from transformers import AutoTokenizer

    from unified_lora.data import DataError
    from unified_lora.training import TextCorpus, encode_corpus

    tok = AutoTokenizer.from_pretrained(tiny["gpt2"])
    tok.eos_token = "[SEP]"
    docs = ["good great fine nice happy superb bad", "awful poor sad terrible ugly the a movie film"]
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    stream = ids[0] + [tok.eos_token_id] + ids[1]
    enc = encode_corpus(tok, TextCorpus(docs), 4)
    assert enc["input_ids"].tolist() == [stream[i:i + 4] for i in range(0, len(stream) // 4 * 4, 4)]
    assert torch.equal(enc["labels"], enc["input_ids"]) and bool(enc["attention_mask"].all())
    short = encode_corpus(tok, TextCorpus(docs[:1]), 64)  # shorter than a block: one shorter row
    assert short["input_ids"].tolist() == [ids[0]]
    with pytest.raises(DataError, match=r"^the text corpus gives 1 token; a causal LM needs at least 2 .*; add text "
                                        r"to it$"):
        encode_corpus(tok, TextCorpus(["good"]), 16)


def test_a_corpus_too_short_names_its_part_its_tokens_and_the_dev_fraction_that_fits(tiny, tmp_path, capsys):
    """A tiny .txt corpus was refused with "the text corpus gives fewer than 2 tokens": not whether the train split,
    the dev split or the whole file was short, by how much, or what would do. The error names the part and its token
    count, and for a split the --dev-fraction that splits the text into two parts of 2 tokens or more (checked here:
    it trains), or that none does."""
    corpus, dev = tmp_path / "corpus.txt", tmp_path / "dev.txt"

    def train(out: str, *extra) -> int:
        return main(["train", "--model", tiny["gpt2"], "--data", str(corpus), "--target-modules", "c_attn", "--steps",
                     "1", "--batch-size", "8", "--max-length", "16", "--log-every", "0", "--output-dir",
                     str(tmp_path / out), *extra])

    needs = ("a causal LM needs at least 2 (a token, and the next one to predict), whatever --max-length is (a corpus "
             "shorter than a block is one shorter row)")
    corpus.write_text("good bad great fine nice happy superb awful\npoor\n")  # (the tokenizer's words: a token each)
    assert train("dev_short") == 2
    assert capsys.readouterr().err == (f"unified-lora: error: the dev split of {corpus} (the last 10% of it, by "
                                       f"--dev-fraction 0.1) gives 1 token; {needs}; pass --dev-fraction 0.13 (or a "
                                       "--dev-data file)\n")
    assert train("dev_fraction", "--dev-fraction", "0.13") == 0
    corpus.write_text("good\nbad awful poor sad terrible ugly the a movie film\n")  # every cut falls in line 2
    assert train("train_short") == 2
    assert capsys.readouterr().err == (f"unified-lora: error: the train split of {corpus} (all but the last 10% of it, "
                                       f"by --dev-fraction 0.1) gives 1 token; {needs}; no --dev-fraction splits it "
                                       "into two parts of 2 tokens or more (the whole text gives 11); pass a "
                                       "--dev-data file, or a longer corpus\n")
    dev.write_text("poor\n")
    assert train("dev_data", "--dev-data", str(dev)) == 2
    assert capsys.readouterr().err == f"unified-lora: error: {dev} gives 1 token; {needs}; add text to it\n"


def test_a_text_corpus_is_said_as_one_stream_and_refuses_no_text_eos(tiny, tmp_path, capsys):
    """A .txt corpus is a list of texts too, and was taken for a table's text rows: the console said an eos ended
    each row, and --no-text-eos, which the corpus's encoding does not read, trained on as if it were read."""
    _corpus(tmp_path / "corpus.txt")
    args = ["train", "--model", tiny["gpt2"], "--data", str(tmp_path / "corpus.txt"), "--target-modules", "c_attn",
            "--steps", "1", "--batch-size", "8", "--max-length", "16", "--log-every", "0"]
    assert main(args + ["--output-dir", str(tmp_path / "run")]) == 0
    console = capsys.readouterr().out
    assert ("a plain-text corpus: tokenised as one stream and cut into 16-token blocks; the loss is on every token\n"
            in console) and "text rows" not in console
    assert main(args + ["--output-dir", str(tmp_path / "no_eos"), "--no-text-eos"]) == 2
    assert capsys.readouterr().err == ("unified-lora: error: --no-text-eos: for a causal LM's text rows (one text "
                                       "column of a .csv/.tsv/.jsonl table); this run trains on a plain-text corpus, "
                                       "which has an eos between documents\n")
    assert not (tmp_path / "no_eos").exists()


def test_a_causal_lm_shock_trains_on_random_next_tokens_in_the_window_only(tiny, tmp_path):
    """Same seed, data order and steps with and without a random-token shock on steps 12-17: the traced losses
    agree before the window, are higher inside it (random targets), and 'flip' is refused for a causal LM."""
    _corpus(tmp_path / "corpus.txt")
    base = ["train", "--model", tiny["gpt2"], "--data", str(tmp_path / "corpus.txt"), "--target-modules", "c_attn",
            "--steps", "18", "--batch-size", "8", "--max-length", "16", "--log-every", "0", "--no-controller",
            "--lrs", "3e-2", "3e-2", "3e-2", "--modules-to-save", "lm_head"]
    assert main(base + ["--output-dir", str(tmp_path / "clean")]) == 0
    assert main(base + ["--output-dir", str(tmp_path / "shock"), "--shock-start", "12", "--shock-end", "18",
                        "--shock-type", "random"]) == 0
    clean, shock = ([r["loss"] for r in read_trace(tmp_path / d / "trace.jsonl")] for d in ("clean", "shock"))
    assert shock[:12] == clean[:12]
    assert all(s > c + 0.2 for s, c in zip(shock[12:], clean[12:]))
    assert main(base + ["--output-dir", str(tmp_path / "flip"), "--shock-start", "12", "--shock-end", "18"]) == 2


def test_ctrl_c_saves_checkpoint_exits_130_and_resumes(tiny, tmp_path, capsys):
    """A real SIGINT (sent to this process once the trace shows training under way) -> the step finishes,
    a resumable checkpoint is written atomically, exit code 130; --resume then completes the run."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    out = tmp_path / "my run"  # a space: the printed resume command must quote it

    def interrupt_when_training():
        trace = out / "trace.jsonl"
        while not (trace.is_file() and trace.read_text().count("\n") >= 3):
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)

    def mine(signum, frame):  # a SIGTERM handler of the program that calls main(): put back afterwards
        raise AssertionError("not called")

    before, sigint = signal.signal(signal.SIGTERM, mine), signal.getsignal(signal.SIGINT)
    try:
        watcher = threading.Thread(target=interrupt_when_training, daemon=True)
        watcher.start()
        assert main(_train_args(tiny, out, "--epochs", "40")) == 130
        watcher.join(timeout=5)
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is sigint
    finally:
        signal.signal(signal.SIGTERM, before)
    console = capsys.readouterr()
    assert "Traceback" not in console.err
    assert f"continue with: unified-lora train --output-dir '{out}' --resume" in console.out
    saved = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(saved) == 1 and saved[0].startswith("step-")  # no temp folder left behind
    assert 3 <= int(saved[0].split("-")[1]) < 24
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "24"]) == 0
    assert [r["step"] for r in read_trace(out / "trace.jsonl")] == list(range(24))


def test_a_second_ctrl_c_during_the_save_keeps_the_last_checkpoint_and_writes_the_sessions_console_txt(tiny,
                                                                                                     tmp_path):
    """A second Ctrl-C aborts at once: the run left no console.txt for its session (a resumed run's kept the earlier
    sessions' alone), though the console said what it did. It is written now, and nothing is left half-written: the
    checkpoint the first Ctrl-C asked for, cut off mid-save, leaves no folder, the last complete one resumes. The run is
    a subprocess that sends itself real SIGINTs: the first at the end of step 10 (epoch-1 is step 8), the second once
    the step-10 save has written its tensors, and a third as the abort writes console.txt (it cut that write off)."""
    out, child = tmp_path / "run", tmp_path / "interrupted_twice.py"
    child.write_text(
        "import os, signal, sys\n"
        "import safetensors.torch as st\n"
        "from unified_lora import cli, training\n"
        "def after(real, when):\n"
        "    def call(*a, **k):\n"
        "        out = real(*a, **k)\n"
        "        if when(*a):\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        return out\n"
        "    return call\n"
        "training.Run.train_step = after(training.Run.train_step, lambda run, batch: run.state.global_step == 10)\n"
        "st.save_file = after(st.save_file, lambda t, f: os.path.basename(os.path.dirname(f)).startswith('.tmp-step-'))\n"
        "real_save = cli._Console.save\n"
        "def save(self, path):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real_save(self, path)\n"
        "cli._Console.save = save\n"
        "sys.exit(cli.main(sys.argv[1:]))\n")
    p = subprocess.run([sys.executable, str(child), *_train_args(tiny, out, "--epochs", "3", "--threads", "1")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "interrupt: finishing this step, then saving a resumable checkpoint (Ctrl-C again to abort)\n" in p.stdout
    assert p.stdout.endswith(f"aborted; the last complete checkpoint is kept under {out / 'checkpoints'}\n")
    first = (out / "console.txt").read_text()
    assert first == p.stdout
    assert sorted(c.name for c in (out / "checkpoints").iterdir()) == ["epoch-1"]  # no step-10, no temp folder
    assert [r["step"] for r in read_trace(out / "trace.jsonl")] == list(range(10))
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    assert [r["step"] for r in read_trace(out / "trace.jsonl")] == list(range(24))
    assert (out / "console.txt").read_text().startswith(first + "----- --resume at step 8 -----\nresumed from ")


def test_sigterm_finishes_the_step_saves_a_checkpoint_exits_143_and_resumes_bit_for_bit(tiny, tmp_path):
    """SIGTERM is what Slurm (--signal, scancel, a time limit) and Kubernetes (the grace period of an evicted or
    preempted pod) send before SIGKILL. It killed the run on the spot, losing every step since the last epoch end.
    It now does what the first Ctrl-C does: the step finishes, a resumable step-N is written, and the exit code is
    143 (128 + SIGTERM, as a shell reports it). A scheduler may send it again: one during the save must not stop it.
    The run is a subprocess (a SIGTERM this process did not handle would end pytest); it is signalled once its trace
    shows training under way, and its 40 epochs cannot end before that. The child sends itself the second SIGTERM as
    the step-N save starts, so that one lands inside the save on every run."""
    straight, out = tmp_path / "straight", tmp_path / "run"
    child, log = tmp_path / "terminated.py", tmp_path / "console.txt"
    child.write_text(
        "import os, signal, sys\n"
        "from unified_lora import training\n"
        "from unified_lora.cli import main\n"
        "real = training.Run.save_checkpoint\n"
        "def save_checkpoint(self, root, tag, *a, **k):\n"
        "    if tag.startswith('step-'):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(self, root, tag, *a, **k)\n"
        "training.Run.save_checkpoint = save_checkpoint\n"
        "sys.exit(main(sys.argv[1:]))\n")
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, str(child), *_train_args(tiny, out, "--epochs", "40", "--threads", "1")],
                             stdout=f, stderr=subprocess.STDOUT)
        try:
            trace, deadline = out / "trace.jsonl", time.monotonic() + 300
            while not (trace.is_file() and trace.read_text().count("\n") >= 3) and p.poll() is None:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.005)
            p.send_signal(signal.SIGTERM)
            assert p.wait(timeout=120) == 143, log.read_text()[-3000:]
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    console = log.read_text()
    assert "SIGTERM: finishing this step, then saving a resumable checkpoint" in console
    assert f"continue with: unified-lora train --output-dir {out} --resume" in console
    assert "Traceback" not in console
    saved = [c.name for c in (out / "checkpoints").iterdir()]
    steps = [name for name in saved if name.startswith("step-")]
    assert len(steps) == 1 and all(name.startswith(("step-", "epoch-")) for name in saved), saved  # no temp folder
    stopped = int(steps[0].split("-")[1])
    assert 3 <= stopped < 40 and len(read_trace(trace)) == stopped
    assert main(_train_args(tiny, straight, "--epochs", "5", "--threads", "1")) == 0
    # a resume may change the save interval and the limit (they are not part of the run's trajectory); the limit
    # counts the step-N the SIGTERM left, and a step that ends an epoch is saved as epoch-N alone
    assert main(["train", "--output-dir", str(out), "--resume", "--epochs", "5", "--save-steps", "7",
                 "--save-total-limit", "2"]) == 0
    a, b = read_trace(straight / "trace.jsonl"), read_trace(out / "trace.jsonl")
    assert [r["step"] for r in b] == list(range(40)) and b == a
    kept = sorted([stopped] + [s for s in range(7, 40, 7) if s > stopped])[-2:]
    assert sorted(c.name for c in (out / "checkpoints").iterdir() if c.name.startswith("step-")) == \
        sorted(f"step-{s}" for s in kept)
    resumed, whole = _ckpt_state(out / "checkpoints" / "epoch-5"), _ckpt_state(straight / "checkpoints" / "epoch-5")
    assert (resumed[1]["config"].pop("save_steps"), resumed[1]["config"].pop("save_total_limit")) == (7, 2)
    assert (whole[1]["config"].pop("save_steps"), whole[1]["config"].pop("save_total_limit")) == (0, 0)
    assert _same(resumed, whole)


def _interrupt_once(path: Path) -> threading.Thread:
    """Send this process a real SIGINT (as Ctrl-C) once `path` exists."""
    def go():
        while not path.exists():
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def test_report_and_plot_of_an_unfinished_run_use_its_settings_and_newest_checkpoint(tiny, tmp_path, capsys,
                                                                                      monkeypatch):
    """A run interrupted by Ctrl-C has no summary.json: `report` printed "model=None data=None", no shock and no dev
    scores, and "φ pre-shock" was step 0's φ; `plot` drew θ0/θ1 at 0.3/0.7 and no shock window, whatever the run
    used. A finished run resumed for more epochs and interrupted kept its old summary.json: `report` printed that as
    if the run had stopped there. Both now read the newest checkpoint (settings, dev scores) and the trace."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    import unified_lora.plotting as plotting

    drawn, real = [], plotting.plot_trace

    def spy(*args, **kw):  # the real plot runs; this records the thresholds and window it was asked to draw
        drawn.append((kw["theta0"], kw["theta1"], kw["shock"]))
        return real(*args, **kw)

    monkeypatch.setattr(plotting, "plot_trace", spy)
    out = tmp_path / "run"
    watcher = _interrupt_once(out / "checkpoints" / "epoch-1")
    assert main(_train_args(tiny, out, "--epochs", "40", "--theta0", "0.2", "--theta1", "0.6", "--shock-start", "3",
                            "--shock-end", "6")) == 130
    watcher.join(timeout=5)
    capsys.readouterr()
    trace = read_trace(out / "trace.jsonl")
    n = len(trace)
    assert n >= 8 and not (out / "summary.json").exists()
    assert main(["report", str(out)]) == 0
    report = capsys.readouterr().out
    # the steps done, of the run's 40 epochs of 8 (it printed steps={n} alone, which read as the run's length)
    assert f"train (unfinished): model={tiny['bert']} data={tiny['csv']} steps={n} of 320\n" in report
    assert "shock: flip labels on steps [3, 6)" in report
    assert f"continue with: unified-lora train --output-dir {out} --resume" in report
    assert "epoch 1" in report and "accuracy=" in report  # the dev score the checkpoint holds
    assert f"φ pre-shock={trace[2]['phi']:.3f}" in report  # the last step before the shock, not step 0
    assert main(["plot", str(out), "-o", str(tmp_path / "p.png")]) == 0
    assert drawn[-1] == (0.2, 0.6, (3, 6))

    # finished at 16 steps (summary.json), then resumed for more epochs and interrupted: not the old summary
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "16"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 16
    watcher = _interrupt_once(out / "checkpoints" / "epoch-3")
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "0", "--epochs", "40"]) == 130
    watcher.join(timeout=5)
    capsys.readouterr()
    n = len(read_trace(out / "trace.jsonl"))
    assert n >= 24
    assert main(["report", str(out)]) == 0
    report = capsys.readouterr().out
    assert f"steps={n} of 320\n" in report and "no summary.json for step 16 on" in report and "epoch 3" in report
    assert "steps=16\n" not in report


def _killed_mid_save(tmp_path, folder_prefix: str):
    """A script that runs the CLI and kills itself (SIGKILL) right after the real save wrote its tensors into a
    temp folder named `folder_prefix...`: the kill lands mid-save on every run (a parent polling for the temp folder
    missed it on a loaded machine)."""
    child = tmp_path / "killed_mid_save.py"
    child.write_text(
        "import os, signal, sys\n"
        "import safetensors.torch as st\n"
        "from unified_lora.cli import main\n"
        "real = st.save_file\n"
        "def save_file(tensors, filename, *a, **k):\n"
        "    real(tensors, filename, *a, **k)\n"
        f"    if os.path.basename(os.path.dirname(filename)).startswith({folder_prefix!r}):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "st.save_file = save_file\n"
        "sys.exit(main(sys.argv[1:]))\n")
    return child


def test_a_run_killed_while_saving_a_checkpoint_resumes_exactly_and_its_temp_folder_goes(tiny, tmp_path):
    """SIGKILL while `epoch-2` is being written (its temp folder on disk): --resume continues from epoch-1 on the same
    trajectory, bit for bit. The killed save's temp folder (a whole checkpoint's size: adapters + optimizer) stayed
    in checkpoints/ for good; the resumed run's first complete save now removes it.

    The child kills itself right after the real save has written epoch-2's tensors into the temp folder, so the kill
    lands mid-save on every run (a parent polling for the temp folder missed it on a loaded machine)."""
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert main(_train_args(tiny, straight, "--epochs", "3", "--threads", "1")) == 0
    p = subprocess.run([sys.executable, str(_killed_mid_save(tmp_path, ".tmp-epoch-2-")), *_train_args(tiny, out, "--epochs", "3", "--threads", "1")],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    assert p.returncode == -signal.SIGKILL
    ckpts = out / "checkpoints"
    assert [c.name for c in ckpts.iterdir() if c.name.startswith(".tmp-epoch-2-")]  # the killed save's temp folder
    assert sorted(c.name for c in ckpts.iterdir() if not c.name.startswith(".")) == ["epoch-1"]
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    assert sorted(c.name for c in ckpts.iterdir()) == ["epoch-1", "epoch-2", "epoch-3"]  # no temp folder left
    a, b = read_trace(straight / "trace.jsonl"), read_trace(out / "trace.jsonl")
    assert [(r["step"], r["loss"], r["phi"]) for r in b] == [(r["step"], r["loss"], r["phi"]) for r in a]


def test_a_save_killed_between_its_two_renames_leaves_its_complete_new_copy_and_resume_puts_it_back(tiny, tmp_path,
                                                                                                      capsys):
    """Saving over an existing `<tag>` renames it to `.old-<tag>-<pid>`, then the complete temp folder
    `.tmp-<tag>-<pid>` to `<tag>`. A SIGKILL between the two left no `<tag>`: latest_checkpoint (so --resume) saw no
    checkpoint at all here (or went on from an older one), the next save's sweep deleted the complete new copy, and
    the old one stayed under `.old-` for good. Now the new copy is put back under `<tag>` and nothing is left over.

    The child kills itself right after the first rename, so the kill lands in that window on every run."""
    out = tmp_path / "ckpts"
    child = tmp_path / "killed_between_renames.py"
    child.write_text(
        "import os, signal, sys, torch\n"
        "from unified_lora.training import Run, TrainConfig, load_model\n"
        "cfg = TrainConfig(model=sys.argv[1], log_every=0)\n"
        "model, tok = load_model(cfg.model, 'seq-cls', 2)\n"
        "run = Run(cfg, model, 'seq-cls', 2, None, print_fn=None)\n"
        "batch = dict(tok(['good movie', 'the plot was awful'], padding=True, return_tensors='pt'),\n"
        "             labels=torch.tensor([1, 0]))\n"
        "run.train_step(batch)\n"
        "run.save_checkpoint(sys.argv[2], 'last')\n"
        "run.train_step(batch)\n"
        "real = os.replace\n"
        "def replace(src, dst):\n"
        "    real(src, dst)\n"
        "    if os.path.basename(dst).startswith('.old-last-'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.replace = replace\n"
        "run.save_checkpoint(sys.argv[2], 'last')\n")
    p = subprocess.run([sys.executable, str(child), tiny["bert"], str(out)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr
    left = sorted(c.name.split("-")[0] + "-" + c.name.split("-")[1] for c in out.iterdir())
    assert left == [".old-last", ".tmp-last"]  # the window: no `last`, the previous copy and the complete new one
    new = next(out.glob(".tmp-last-*"))
    saved = _ckpt_state(new)
    from unified_lora.training import latest_checkpoint

    ckpt = latest_checkpoint(out)
    assert ckpt == out / "last" and sorted(c.name for c in out.iterdir()) == ["last"]
    assert _same(_ckpt_state(ckpt), saved) and saved[1]["run"]["global_step"] == 2  # the new copy, not the old one
    # an `.old-` copy whose tag is in place (a kill after the second rename) is removed too
    shutil.copytree(ckpt, out / ".old-last-123")
    assert latest_checkpoint(out) == ckpt and sorted(c.name for c in out.iterdir()) == ["last"]
    # a fresh run in a run folder whose one checkpoint is in that state refuses it as a previous run (its first save
    # would have put the old run's checkpoint back beside its own)
    run_dir = tmp_path / "run"
    assert main(_train_args(tiny, run_dir, "--steps", "2")) == 0
    shutil.rmtree(run_dir / "peft_adapter")  # a run killed before its end wrote neither
    (run_dir / "summary.json").unlink()
    os.replace(run_dir / "checkpoints" / "step-2", run_dir / "checkpoints" / ".old-step-2-123")
    shutil.copytree(run_dir / "checkpoints" / ".old-step-2-123", run_dir / "checkpoints" / ".tmp-step-2-123")
    assert main(_train_args(tiny, run_dir, "--steps", "1")) == 2
    assert "holds a previous run (checkpoints/step-2" in capsys.readouterr().err


@pytest.mark.parametrize("writer", ["safetensors", "torch", "permission"])
def test_a_checkpoint_the_disk_cannot_hold_is_a_one_line_error_that_keeps_the_previous_ones(tiny, tmp_path, capsys,
                                                                                           monkeypatch, writer):
    """A full disk while `epoch-2` was written: "internal error" (safetensors' "I/O error", torch's "unexpected pos
    576 vs 534", what each raises on a full disk), naming no folder, and the partial temp folder stayed, holding the
    space the disk lacked. Now one line naming the checkpoint and the cause, exit 1, epoch-1 intact, no temp folder
    left, and --resume, once there is space, goes on from epoch-1."""
    import safetensors.torch

    def failing(real, error):
        def write(obj, filename, *a, **k):
            if os.path.basename(os.path.dirname(filename)).startswith(".tmp-epoch-2-"):
                raise error
            return real(obj, filename, *a, **k)
        return write

    # each writer's own error, as seen on a full 150 KiB tmpfs; and a folder the run may not write into
    cause = {"safetensors": "I/O error: No space left on device (os error 28)",
             "torch": "unexpected pos 576 vs 534", "permission": "Permission denied"}[writer]
    if writer == "torch":
        monkeypatch.setattr(torch, "save", failing(torch.save, RuntimeError(
            f"[enforce fail at inline_container.cc:672] . {cause}")))
    else:
        error = safetensors.SafetensorError(f"Error while serializing: {cause}") if writer == "safetensors" else \
            PermissionError(13, cause)
        monkeypatch.setattr(safetensors.torch, "save_file", failing(safetensors.torch.save_file, error))
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--epochs", "3")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "internal error" not in err, err
    assert err.startswith(f"unified-lora: error: {out / 'checkpoints' / 'epoch-2'}: cannot write this checkpoint ("), \
        err
    assert cause in err, err
    assert sorted(c.name for c in (out / "checkpoints").iterdir()) == ["epoch-1"]  # no partial copy left
    monkeypatch.undo()
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert sorted(c.name for c in (out / "checkpoints").iterdir()) == ["epoch-1", "epoch-2", "epoch-3"]


def test_an_output_dir_the_run_cannot_write_is_a_one_line_error(tiny, tmp_path, capsys):
    """An --output-dir below a file (or in a folder without write permission, or on a read-only disk) was "NotADirectory
    Error: ... (internal error; rerun with --debug ...)". The OS's own message names the path and the cause: now
    that one line, exit 1."""
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "run"
    assert main(_train_args(tiny, out, "--steps", "2")) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"unified-lora: error: [Errno {errno.ENOTDIR}] {os.strerror(errno.ENOTDIR)}: '{out}'", err


def _same(a, b) -> bool:
    """Nested dicts/lists of tensors and plain values, equal exactly (tensors bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and \
            a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _ckpt_state(ckpt: Path) -> tuple[dict, dict]:
    """A checkpoint's tensors and its state.pt without what no two runs share: the wall time and the output folder."""
    from safetensors.torch import load_file

    st = torch.load(ckpt / "state.pt", weights_only=True)
    st["run"].pop("wall_s")
    st["config"].pop("output_dir")
    return load_file(str(ckpt / "adapter_blocks.safetensors")), st


def test_save_steps_keeps_the_newest_k_and_a_run_killed_mid_save_resumes_bit_for_bit(tiny, tmp_path, capsys):
    """--save-steps N writes step-N inside an epoch (an epoch of hours lost everything since its start to a kill);
    --save-total-limit K deletes the oldest step-N beyond K only once a new one is complete, and keeps every epoch-N.
    A run SIGKILLed while step-6 is being written keeps step-3 (the limit of 1 has not deleted it for the half-written
    one), and --resume from that mid-epoch checkpoint ends exactly as the uninterrupted run: the same trace, line for
    line, the same weights, optimizer and controller state, bit for bit, and the same dev scores."""
    straight, out = tmp_path / "straight", tmp_path / "run"
    opts = ("--epochs", "2", "--threads", "1", "--save-steps", "3", "--save-total-limit", "1", "--lrs", "1e-2", "5e-3",
            "1e-3", "--shock-start", "4", "--shock-end", "7", "--shock-type", "random", "--theta0", "0.48",
            "--theta1", "0.497", "--log-every", "0")
    assert main(_train_args(tiny, straight, *opts)) == 0
    # 8 steps an epoch: step-3, step-6, (epoch-1 at 8), step-9, step-12, step-15, (epoch-2 at 16); the limit keeps one
    assert sorted(c.name for c in (straight / "checkpoints").iterdir()) == ["epoch-1", "epoch-2", "step-15"]
    p = subprocess.run([sys.executable, str(_killed_mid_save(tmp_path, ".tmp-step-6-")), *_train_args(tiny, out, *opts)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=600)
    assert p.returncode == -signal.SIGKILL
    ckpts = out / "checkpoints"
    assert sorted(c.name for c in ckpts.iterdir() if not c.name.startswith(".")) == ["step-3"]
    assert len(read_trace(out / "trace.jsonl")) == 6  # the steps after step-3 are trained again, not appended twice
    # `report` of the run killed before its first evaluation: a line that says so, with the steps done and the
    # controller's state (it printed an empty table: a "method" header and a row with no column)
    from unified_lora.config import MODES

    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    said, last = capsys.readouterr().out, read_trace(out / "trace.jsonl")[-1]
    assert (f"no evaluation yet: 6 training step(s) done, no dev evaluation; Unified LoRA at its last step: "
            f"{MODES[last['mode']]}, rank {last['rank']}, φ={last['phi']:.3f}\n") in said
    assert "\nmethod " not in said and "continue with: " in said
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    assert sorted(c.name for c in ckpts.iterdir()) == ["epoch-1", "epoch-2", "step-15"]  # no temp folder left
    a, b = read_trace(straight / "trace.jsonl"), read_trace(out / "trace.jsonl")
    assert [r["step"] for r in b] == list(range(16))
    assert b == a
    assert {r["mode"] for r in a} != {a[0]["mode"]}  # the controller changed mode: its state is part of the test
    for name in ("epoch-1", "epoch-2", "step-15"):
        assert _same(_ckpt_state(ckpts / name), _ckpt_state(straight / "checkpoints" / name)), name
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (straight, out))
    assert sb["arms"]["run"]["eval"] == sa["arms"]["run"]["eval"] and len(sa["arms"]["run"]["eval"]) == 2


def test_an_evaluation_inside_an_epoch_never_reads_as_an_epochs_end():
    """Cut, not rounded, to 2 decimals, or more where 2 read as a whole number: step 1500 of 1499-step epochs was
    `epoch 1 @ step 1500`, right after the epoch's end `epoch 1 @ step 1499`."""
    from unified_lora.cli import _epoch_fraction, _eval_point

    assert [_epoch_fraction(x) for x in (0.995, 0.5, 2 / 3, 1500 / 1499, 0.001)] == ["0.99", "0.5", "0.66", "1.0006",
                                                                                      "0.001"]
    assert _eval_point({"epoch": 1500 / 1499, "step": 1500}) == "epoch 1.0006 (step 1500)"
    assert _eval_point({"epoch": 2.0, "step": 2998}) == "epoch 2"


def test_eval_steps_evaluates_inside_epochs_trains_the_same_weights_and_resumes_with_its_evaluations(tiny, tmp_path,
                                                                                                    capsys):
    """--eval-steps N evaluates on the dev set every N optimizer steps inside an epoch, besides each epoch's end (a
    step that ends an epoch is evaluated once). With dropout on (the model's and --lora-dropout's), a run with it
    trains to the weights of the same run without it, bit for bit: the evaluation leaves the model in training mode
    and draws no random number. Each point is in the checkpoints (the step-N one written at the same step too) and
    the summary; a resume from step-N goes on evaluating and ends with the evaluations of the uninterrupted run, and
    a resume may switch --eval-steps on."""
    cfg = _write(tmp_path / "dropout.yaml", "lora_dropout: 0.2\n")  # (the tiny BERT's own dropout is 0.1)
    opts = ("--config", str(cfg), "--threads", "1", "--lrs", "1e-2", "5e-3", "1e-3")
    run, plain, resumed = tmp_path / "run", tmp_path / "plain", tmp_path / "resumed"
    capsys.readouterr()
    assert main(_train_args(tiny, run, *opts, "--epochs", "2", "--eval-steps", "4", "--save-steps", "4")) == 0
    said = capsys.readouterr().out
    # 8 steps an epoch: step 4, (epoch 1 at 8, once), step 12, (epoch 2 at 16)
    points = ["epoch 0.5 (step 4)", "epoch 1", "epoch 1.5 (step 12)", "epoch 2"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_points"] == points and list(summary["arms"]["run"]["eval"]) == points
    evals = summary["arms"]["run"]["eval"]
    for line in ("epoch 0.5 @ step 4: dev ", "epoch 1 @ step 8: dev ", "epoch 1.5 @ step 12: dev ",
                 "epoch 2 @ step 16: dev "):
        assert said.count(line) == 1, said
    assert f"epoch 0.5 @ step 4: dev {_fmt_metrics(evals['epoch 0.5 (step 4)'])}" in said
    # the checkpoint of step 4 holds step 4's evaluation (evaluated, then saved)
    st = torch.load(run / "checkpoints" / "step-4" / "state.pt", weights_only=True)
    assert [e["step"] for e in st["run"]["evals"]] == [4]
    # the same run without --eval-steps (for its first epoch; its resume switches it on): the same weights
    assert main(_train_args(tiny, plain, *opts, "--epochs", "1")) == 0
    assert main(["train", "--output-dir", str(plain), "--resume", "--epochs", "2", "--eval-steps", "4"]) == 0
    for tag in ("epoch-1", "epoch-2"):
        assert _same(*(_ckpt_state(d / "checkpoints" / tag)[0] for d in (run, plain))), tag
    assert read_trace(plain / "trace.jsonl") == read_trace(run / "trace.jsonl")
    later = json.loads((plain / "summary.json").read_text())["arms"]["run"]["eval"]
    assert later == {p: evals[p] for p in ("epoch 1", "epoch 1.5 (step 12)", "epoch 2")}
    # a run stopped after step-4's save (its later outputs gone), resumed: the uninterrupted run's evaluations
    shutil.copytree(run / "checkpoints" / "step-4", resumed / "checkpoints" / "step-4")
    shutil.copy(run / "trace.jsonl", resumed / "trace.jsonl")
    assert main(["train", "--output-dir", str(resumed), "--resume"]) == 0
    again = json.loads((resumed / "summary.json").read_text())
    assert again["arms"]["run"]["eval"] == evals and again["eval_points"] == points
    assert _same(_ckpt_state(resumed / "checkpoints" / "epoch-2"), _ckpt_state(run / "checkpoints" / "epoch-2"))
    assert main(["report", str(resumed)]) == 0  # more than 3 points: a row each
    report = capsys.readouterr().out
    assert "epoch 1.5 (step 12) | " in report and "dev evaluation" in report


# 8 steps an epoch, a dev evaluation every 2 (macro-F1 ranks them); with --dev-data on the 64 training rows, at this LR
# dev macro-F1 stays at the majority class's to step 10 and peaks at step 16 (epoch 2); every later one is below it
BEST_OPTS = ("--threads", "1", "--eval-steps", "2", "--metric-for-best", "macro_f1", "--save-best", "--lrs", "5e-2",
             "5e-2", "5e-2", "--dev-data")


def _evals(out: Path) -> list[tuple[int, float]]:
    st = torch.load(out / "state.pt", weights_only=True)
    return [(e["step"], e["macro_f1"]) for e in st["run"]["evals"]]


def test_save_best_keeps_the_checkpoint_of_the_best_evaluation_which_predict_uses(tiny, tmp_path, capsys):
    """--save-best writes best/ at each evaluation that beats every earlier one, and only then: it holds the state
    of the checkpoint of that step, bit for bit (the export into best/peft/ draws no random number), not that of a
    later, worse evaluation; --save-total-limit, which deletes step-N checkpoints, leaves it; `predict --checkpoint
    best` loads it and scores the dev rows as that evaluation did; peft_adapter/ stays the final weights."""
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(_train_args(tiny, out, *BEST_OPTS, tiny["csv"], "--epochs", "4", "--save-steps", "2",
                            "--save-total-limit", "1")) == 0
    said = capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-1", "epoch-2", "epoch-3", "epoch-4",
                                                                        "step-30"]
    evals = _evals(out / "checkpoints" / "epoch-4")
    best = max(evals, key=lambda e: e[1])
    first_best = next(e for e in evals if e[1] == best[1])  # (a tie would not replace it)
    assert len([e for e in evals if e[0] > first_best[0]]) >= 4, evals  # worse evaluations after it
    new_bests = [e for i, e in enumerate(evals) if all(e[1] > x[1] for x in evals[:i])]
    assert said.count("new best dev macro_f1=") == len(new_bests) > 1
    step = first_best[0]
    tag = f"epoch-{step // 8}" if step % 8 == 0 else f"step-{step}"
    assert _same(_ckpt_state(out / "best"), _ckpt_state(out / "checkpoints" / tag))
    assert json.loads((out / "best" / "checkpoint.json").read_text()) == {"global_step": step}
    assert (out / "best" / "peft" / "adapter_config.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best"] == {"point": f"epoch {step / 8:g} (step {step})" if step % 8 else f"epoch {step // 8}",
                               "step": step, "metric": "macro_f1", "value": best[1], "greater_is_better": True,
                               "checkpoint": str(out / "best")}
    assert summary["stopped_early"] is False and summary["steps"] == 32
    from safetensors.torch import load_file

    final = load_file(str(out / "peft_adapter" / "adapter_model.safetensors"))
    exported = load_file(str(out / "best" / "peft" / "adapter_model.safetensors"))
    assert final.keys() == exported.keys() and any(not torch.equal(final[k], exported[k]) for k in final)
    assert main(["predict", str(out), "--data", tiny["csv"], "--checkpoint", "best",
                 "--output", str(tmp_path / "p.csv")]) == 0
    said = capsys.readouterr().out
    assert f"checkpoint {out / 'best'} (step {step})" in said
    assert f"macro_f1={best[1]:.3f}" in said
    assert main(["report", str(out)]) == 0
    assert (f"best dev macro_f1 (higher is better): {best[1]:.4f} at {summary['best']['point']}; its checkpoint: "
            f"{out / 'best'}") in capsys.readouterr().out
    # a fresh run in the folder refuses it, best/ named among its outputs
    assert main(_train_args(tiny, out, "--steps", "1")) == 2
    assert "peft_adapter, best);" in capsys.readouterr().err


def test_early_stopping_stops_after_patience_evaluations_without_an_improvement_beyond_the_threshold(tiny, tmp_path,
                                                                                                     capsys):
    """No gain in macro-F1 can exceed 1: with --early-stopping-threshold 1 every evaluation after the first counts
    as no improvement, so with --early-stopping-patience 2 and an evaluation every 2 steps the run stops at step 6,
    inside its first epoch: it saves step-6 and the final peft_adapter/, says why, records it and exits 0. A
    --resume of it trains no further; one with the patience off goes on to the end."""
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(_train_args(tiny, out, *BEST_OPTS, tiny["csv"], "--epochs", "2", "--early-stopping-patience", "2",
                            "--early-stopping-threshold", "1")) == 0
    said = capsys.readouterr().out
    assert "early stopping at step 6 of 16: dev macro_f1 has not improved on the best, epoch 0.25 (step 2)'s " in said
    assert "by more than 1 in 2 evaluations in a row (--early-stopping-patience 2)" in said
    assert [r["step"] for r in read_trace(out / "trace.jsonl")] == list(range(6))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-6"]
    assert (out / "peft_adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] is True and summary["steps"] == 6
    assert summary["eval_points"] == ["epoch 0.25 (step 2)", "epoch 0.5 (step 4)", "epoch 0.75 (step 6)"]
    assert summary["best"]["step"] == 2
    st = torch.load(out / "checkpoints" / "step-6" / "state.pt", weights_only=True)["run"]
    assert (st["best"]["step"], st["evals_without_improvement"]) == (2, 2)
    assert main(["report", str(out)]) == 0
    assert "stopped early at step 6: 2 evaluations in a row without improving the best by more than 1" in \
        capsys.readouterr().out
    # a patience of 1 is "1 evaluation" (it read "1 evaluations"), and a mistyped checkpoint gets a close name
    from unified_lora.cli import format_summary
    assert "stopped early at step 6: 1 evaluation in a row without" in format_summary(
        {**summary, "config": {**summary["config"], "early_stopping_patience": 1}})
    assert main(["predict", str(out), "--checkpoint", "stpe-6", "--data", tiny["csv"]]) == 2
    assert "no such folder (did you mean step-6?)" in capsys.readouterr().err
    # resumed as it is: it stopped, and says so, writing nothing new
    assert main(["train", "--output-dir", str(out), "--resume"]) == 0
    assert (f"the run in {out} is finished at step 6, stopped early: 2 evaluations in a row without improving dev "
            "macro_f1 (--early-stopping-patience 2)") in capsys.readouterr().out
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-6"]
    assert len(read_trace(out / "trace.jsonl")) == 6
    # the patience may change on a resume: off, the run trains to its end
    assert main(["train", "--output-dir", str(out), "--resume", "--early-stopping-patience", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_early"] is False and summary["steps"] == 16


def test_a_resumed_run_ranks_and_stops_as_the_uninterrupted_one(tiny, tmp_path, capsys):
    """The best evaluation and the count of evaluations without an improvement are in each checkpoint: a run
    resumed from step-20 (best at step 16, two evaluations without an improvement since) stops where the
    uninterrupted run stops, at step 26 (patience 5), with the same trace, evaluations, best and checkpoints, bit
    for bit. A run killed after it wrote best/ (step 16) and before the checkpoint of that step resumes from best/,
    the newest, and ends the same. A checkpoint written before these were stored (without the keys) resumes, its
    best and count taken from its evaluations; the metric and --save-best of a run are kept on a resume."""
    opts = (*BEST_OPTS, tiny["csv"], "--epochs", "4", "--save-steps", "4", "--early-stopping-patience", "5")
    straight = tmp_path / "straight"
    assert main(_train_args(tiny, straight, *opts)) == 0
    ckpts = straight / "checkpoints"
    # step-4, step-12, step-20 inside the epochs, epoch-1 to 3; stopped at step 26, saved then
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch-1", "epoch-2", "epoch-3", "step-12", "step-20",
                                                       "step-26", "step-4"]
    sa = json.loads((straight / "summary.json").read_text())
    assert (sa["stopped_early"], sa["steps"], sa["best"]["step"]) == (True, 26, 16)
    assert json.loads((straight / "best" / "checkpoint.json").read_text()) == {"global_step": 16}

    def resumed(name: str, tag: str, *flags: str, legacy: bool = False) -> Path:
        out = tmp_path / name
        shutil.copytree(ckpts / tag, out / "checkpoints" / tag)
        shutil.copytree(straight / "best", out / "best")  # best/ as it was on the disk then
        shutil.copy(straight / "trace.jsonl", out / "trace.jsonl")
        if legacy:  # a checkpoint of a version without best-evaluation settings or state
            st = torch.load(out / "checkpoints" / tag / "state.pt", weights_only=True)
            for key in ("best", "evals_without_improvement"):
                del st["run"][key]
            for key in ("metric_for_best", "save_best", "early_stopping_patience", "early_stopping_threshold"):
                del st["config"][key]
            torch.save(st, out / "checkpoints" / tag / "state.pt")
            shutil.rmtree(out / "best")
        capsys.readouterr()
        assert main(["train", "--output-dir", str(out), "--resume", *flags]) == 0
        return out

    for name, tag in (("from_step", "step-20"), ("killed", "epoch-1")):
        out = resumed(name, tag)
        said = capsys.readouterr().out
        if out.name == "killed":  # epoch-1 is step 8, best/ step 16: the run goes on from best/
            assert f"resumed from {out / 'best'} (step 16, epoch 2)" in said
        assert "early stopping at step 26 of 32" in said
        assert read_trace(out / "trace.jsonl") == read_trace(straight / "trace.jsonl")
        sb = json.loads((out / "summary.json").read_text())
        assert {k: sb[k] for k in ("eval_points", "stopped_early", "steps")} == \
            {k: sa[k] for k in ("eval_points", "stopped_early", "steps")}
        assert sb["arms"]["run"]["eval"] == sa["arms"]["run"]["eval"]
        assert {**sb["best"], "checkpoint": None} == {**sa["best"], "checkpoint": None}
        for tag in ("step-26", "../best"):
            assert _same(_ckpt_state(out / "checkpoints" / tag), _ckpt_state(ckpts / tag)), (out.name, tag)
    out = resumed("legacy", "step-20", "--metric-for-best", "macro_f1", "--early-stopping-patience", "5", legacy=True)
    assert "early stopping at step 26 of 32" in capsys.readouterr().out
    sb = json.loads((out / "summary.json").read_text())
    assert sb["best"] == {**sa["best"], "checkpoint": None} and not (out / "best").exists()
    for flag, value, needle in (("--metric-for-best", "accuracy", "metric_for_best='macro_f1' (now 'accuracy')"),
                                ("--config", str(_write(tmp_path / "nb.yaml", "save_best: false\n")),
                                 "save_best=True (now False)")):
        assert main(["train", "--output-dir", str(straight), "--resume", flag, value]) == 2
        assert needle in capsys.readouterr().err


def test_a_best_save_killed_between_its_renames_is_the_previous_runs_and_overwrite_removes_it(tiny, tmp_path, capsys):
    """best/ is saved as a checkpoint is: over an existing best/, renamed to `.old-best-<pid>`, then its complete new
    copy `.tmp-best-<pid>` to best/. A kill between the two left no best/: a fresh run in the folder did not name it
    among the previous run's outputs, --overwrite left both copies, and a later --resume of the new run put the
    previous run's best/ back (`settle_interrupted_saves`) and went on from it, the newest, silently."""
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, *BEST_OPTS, tiny["csv"], "--steps", "2")) == 0  # best/: step 2
    os.replace(out / "best", out / ".old-best-123")
    shutil.copytree(out / ".old-best-123", out / ".tmp-best-123")
    capsys.readouterr()
    assert main(_train_args(tiny, out, "--steps", "1")) == 2
    assert "holds a previous run (checkpoints/step-2, summary.json, peft_adapter, best);" in capsys.readouterr().err
    assert main(_train_args(tiny, out, "--steps", "1", "--overwrite")) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".", "best"))) == []
    capsys.readouterr()
    assert main(["train", "--output-dir", str(out), "--resume", "--steps", "2"]) == 0
    assert f"resumed from {out / 'checkpoints' / 'step-1'} (step 1," in capsys.readouterr().out


def test_report_of_an_unfinished_run_on_the_bundled_model_names_its_path_not_none(tiny, tmp_path, capsys,
                                                                                  monkeypatch):
    """A run without --model stores `model: None` (the bundled MiniLM): `report` of it unfinished printed
    "model=None", where the finished run's summary names the model's path. The bundled model is the tiny BERT here."""
    import unified_lora.data

    monkeypatch.setattr(unified_lora.data, "default_model_path", lambda: tiny["bert"])
    out = tmp_path / "run"
    args = _train_args(tiny, out, "--steps", "2")
    assert main(args[:1] + args[3:]) == 0  # no --model
    assert json.loads((out / "summary.json").read_text())["model"] == tiny["bert"]
    (out / "summary.json").unlink()  # as a run stopped before its end leaves it
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert f"train (unfinished): model={tiny['bert']} data=" in capsys.readouterr().out


def test_report_of_an_unfinished_run_reads_the_checkpoint_resume_goes_on_from_and_its_own_best(tiny, tmp_path,
                                                                                               capsys):
    """A run killed after a new best (best/, step 16) and before the checkpoint of that step (its newest: epoch-1,
    step 8): `report` summarised epoch-1, naming its older best (step 2) and "its checkpoint" best/, which holds
    another; --resume goes on from best/, and so does the report now. best/ is looked for in the run folder given,
    not in the output_dir the run was given (relative to its working directory, or moved since)."""
    run = tmp_path / "run"
    assert main(_train_args(tiny, run, *BEST_OPTS, tiny["csv"], "--epochs", "2", "--eval-steps", "4")) == 0
    assert json.loads((run / "summary.json").read_text())["best"]["step"] == 16
    shutil.rmtree(run / "checkpoints" / "epoch-2")
    (run / "summary.json").unlink()
    moved = tmp_path / "moved"
    shutil.move(run, moved)
    capsys.readouterr()
    assert main(["report", str(moved)]) == 0
    said = capsys.readouterr().out
    assert "summarised from the newest checkpoint, best (step 16)" in said
    assert f"at epoch 2; its checkpoint: {moved / 'best'}" in said


def test_under_torchrun_with_two_processes_demo_refuses_before_writing_anything(tiny, tmp_path):
    """torchrun started two copies of the whole run, on all the data, into one --output-dir: one refused the other's
    first checkpoint as "a previous run" (exit 2) while the other finished, and with --overwrite they deleted each
    other's files. Every process of `demo` now refuses at once, saying what to launch instead, and writes nothing.
    (`train` runs under torchrun, with DDP: test_cli_ddp.py.)"""
    out, command = tmp_path / "run", "demo"
    args = _demo_args(tiny, out, "--no-baseline")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "unified_lora.cli", *args], capture_output=True, text=True, timeout=300, env=env,
                       start_new_session=True)
    assert p.returncode != 0
    refusal = f"unified-lora: error: {command}: launched as one of 2 processes (WORLD_SIZE=2"
    # each process refuses in its own words, but torchrun stops the other worker once the first has failed, so on
    # a loaded machine the slower one may be stopped before it gets to say so
    assert 1 <= p.stderr.count(refusal) <= 2, p.stderr[-3000:]
    assert "examples/ddp_torchrun.py" in p.stderr and "$(which unified-lora) train" in p.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------- plot, report


def test_python_dash_m_unified_lora_is_the_command(tmp_path):
    """`python -m unified_lora` said "No module named unified_lora.__main__"; it runs `unified-lora` now."""
    p = subprocess.run([sys.executable, "-m", "unified_lora", "export", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=120)
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr.endswith(f"unified-lora: error: {tmp_path / 'nope'}: no such run folder; pass the --output-dir of "
                             "a `unified-lora train` run\n")


def test_plot_and_report(tiny, tmp_path, capsys, monkeypatch):
    from test_cli_multitask import _axes_drawn

    out = tmp_path / "demo"
    assert main(_demo_args(tiny, out, "--no-baseline")) == 0
    capsys.readouterr()
    png = tmp_path / "phi.png"
    drawn = _axes_drawn(monkeypatch)
    assert main(["plot", str(out / "trace.jsonl"), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG
    assert main(["report", str(out)]) == 0
    report = capsys.readouterr().out
    assert "pre_shock" in report and "majority class" in report and "φ pre-shock=" in report
    # a single-task run has no gradient conflict: 4 panels, and no such line (test_cli_multitask: a multi-task run's)
    assert drawn == [4] and "gradient conflict" not in report and "reliability" not in report
    # `unified-lora report RUN | head` once head has left: no traceback (it used to print "internal error"
    # and a BrokenPipeError at exit), and the exit status of a process ended by SIGPIPE
    r, w = os.pipe()
    os.close(r)
    p = subprocess.run([sys.executable, "-m", "unified_lora.cli", "report", str(out)], stdout=w,
                       stderr=subprocess.PIPE, text=True, timeout=300)
    os.close(w)
    assert (p.returncode, p.stderr) == (141, "")


def test_plot_threshold_flags_win_over_the_runs_own(tmp_path, monkeypatch):
    """`plot --theta0/--theta1` were ignored whenever the run folder had a summary.json (its thresholds won), while
    `--shock` overrode the summary's. A flag given now wins; else the run's thresholds; else 0.3/0.7."""
    import unified_lora.plotting as plotting

    drawn, real = [], plotting.plot_trace

    def spy(*args, **kw):  # the real plot runs; this records the lines it was asked to draw
        drawn.append((kw["theta0"], kw["theta1"]))
        return real(*args, **kw)

    monkeypatch.setattr(plotting, "plot_trace", spy)
    run = tmp_path / "run"
    run.mkdir()
    (run / "trace.jsonl").write_text("".join(json.dumps({"step": i, "loss": 1.0, "phi": 0.5, "mode": 1, "rank": 8,
                                                         "lr": 1e-3}) + "\n" for i in range(4)))
    png = str(tmp_path / "p.png")
    assert main(["plot", str(run), "-o", png]) == 0  # no summary: the v1 thresholds
    (run / "summary.json").write_text(json.dumps({"command": "train", "arms": {}, "theta0": 0.25, "theta1": 0.75}))
    assert main(["plot", str(run), "-o", png]) == 0
    assert main(["plot", str(run), "-o", png, "--theta0", "0.2", "--theta1", "0.9"]) == 0
    assert main(["plot", str(run), "-o", png, "--theta1", "0.8"]) == 0
    assert drawn == [(0.3, 0.7), (0.25, 0.75), (0.2, 0.9), (0.25, 0.8)]


def test_demo_help_states_each_default_and_never_a_wrong_one():
    """`demo --help` printed "(default: None)" after options whose real default is set later (--lrs, --loss-scale,
    --calibration-steps, --model, ...), beside the help's own "(default ...)", and no default at all for --steps,
    --shock-start, --seed and the other options without a help text."""
    import argparse

    from unified_lora.cli import DEMO_CALIBRATION, DEMO_LRS, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    demo = sub.choices["demo"]
    fmt = demo.formatter_class(prog="unified-lora demo")
    helps = {a.dest: fmt._expand_help(a) if a.help else "" for a in demo._actions if a.dest != "help"}
    for dest, text in helps.items():
        assert "(default" in text and "(default: None)" not in text, (dest, text)
    for a in demo._actions:
        if a.dest != "help" and a.default is not None:
            shown = ",".join(a.default) if isinstance(a.default, list) else a.default  # as typed: text, not ['text']
            assert f"(default: {shown}" in helps[a.dest], (a.dest, helps[a.dest])
        assert "['" not in helps.get(a.dest, ""), (a.dest, helps[a.dest])
    assert f"(default {' '.join(map(str, DEMO_LRS))})" in helps["lrs"]
    assert f"(default {DEMO_CALIBRATION[0]}," in helps["calibration_steps"]
    assert "(default: 160)" in helps["steps"] and "(default 60 of the default 160 steps;" in helps["shock_start"]


def test_train_help_states_each_default_and_it_is_the_configs():
    """`train --help` gave no default for --lr (5e-4, the base LR of --lr-mode multiplier), --steps, --min-dwell or
    --shock-start. Every option that sets a TrainConfig field says its default, and a number it gives is the field's
    default in TrainConfig (the flags' argparse defaults are None, so that only a flag given overrides the YAML).
    The first default a help names is its own: --calibration-steps said "calibration_target (YAML; default 0.5);
    default 0 = off", so a reader took 0.5 for its default."""
    import argparse
    import re
    from dataclasses import fields

    from unified_lora.cli import _TRAIN_FLAGS, build_parser
    from unified_lora.training import TrainConfig

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for a in sub.choices["train"]._actions:
        if a.dest not in _TRAIN_FLAGS:
            continue
        text, default = a.help % {}, defaults[_TRAIN_FLAGS[a.dest]]
        assert "default" in text, (a.dest, text)
        numbers = [float(x) for x in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?", text)]
        first = re.search(r"\bdefault:? (-?\d[\d.e-]*)", text)
        if first and isinstance(default, (int, float, tuple)) and not isinstance(default, bool):
            assert float(first.group(1)) == (default[0] if isinstance(default, tuple) else default), (a.dest, text)
        for value in (default if isinstance(default, tuple) else (default,)):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert value in numbers, (a.dest, value, text)


def test_the_readme_names_every_setting_a_resume_refuses():
    """The README's resume paragraph listed what `--resume` refuses to change but left out the signal and
    --no-controller, which `_RESUME_FIXED` refuses too. Every refused key must map to a phrase the paragraph has."""
    from unified_lora.cli import _RESUME_FIXED

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    para = readme.split("- **Resume and re-runs:**", 1)[1].split("\n- **", 1)[0]
    said = {"model": "the model", "task_type": "the model", "data": "the data", "dev_data": "the data or its split",
            "dev_fraction": "its split", "text_columns": "the data", "assistant_only_loss": "`--assistant-only-loss`",
            "text_eos": "`--no-text-eos`",
            "label_column": "the data",
            "max_length": "`max_length`", "batch_size": "`batch_size`", "grad_accum": "`grad_accum`", "seed": "`seed`",
            "target_modules": "the LoRA layout", "modules_to_save": "the LoRA layout",
            "rank_levels": "the LoRA layout", "lora_alpha": "the LoRA layout", "lora_dropout": "the LoRA layout",
            "controller": "`--no-controller`", "signal": "the signal", "loss_scale": "`--loss-scale`",
            "calibration_steps": "`--calibration-steps`", "calibration_target": "`--calibration-target`",
            "lr_scheduler": "the LR schedule", "warmup_steps": "`--warmup-steps`", "warmup_ratio": "`--warmup-ratio`",
            "lr_scheduler_kwargs": "`--lr-scheduler-kwargs`",
            "metric_for_best": "`--metric-for-best`", "save_best": "`--save-best`"}
    assert set(said) == set(_RESUME_FIXED), "a new refused key: say it in the README and map it here"
    missing = [k for k in _RESUME_FIXED if said[k] not in para]
    assert not missing, (missing, para)


def test_report_and_plot_refuse_a_foreign_summary_and_name_the_bad_trace_line(tiny, tmp_path, capsys):
    """A summary.json holding a JSON list was an internal error (AttributeError, exit 1); a trace with a bad line
    was reported as 'line 1' or 'line 2' whatever its place."""
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--steps", "3")) == 0
    lines = (out / "trace.jsonl").read_text().splitlines(keepends=True)
    (out / "trace.jsonl").write_text("".join(lines) + '{"step": 3, "phi"\n')  # a line cut short
    (out / "summary.json").write_text("[1, 2]\n")
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    assert capsys.readouterr().err == f"unified-lora: error: {out / 'summary.json'}: not the summary.json of a " \
                                      "unified-lora demo or train run\n"
    (out / "summary.json").unlink()
    assert main(["plot", str(out), "-o", str(tmp_path / "p.png")]) == 2
    assert f"trace.jsonl: line {len(lines) + 1} is not JSON" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input


def test_a_model_that_fails_on_rows_of_any_length_is_not_blamed_on_max_length(tiny, tmp_path, capsys):
    """A T5 classifier given a tokenizer without an eos (a WordPiece one copied into its folder) fails on every row
    ("Each example must contain at least one <eos> token"): the error said "--max-length 16: the model fails on the
    data's longest row ...; pass a smaller --max-length", which cannot help (found by the user trial). The shortest
    row is run too, and where it fails as well the error says the length is not the cause."""
    from transformers import AutoTokenizer, T5Config, T5ForSequenceClassification

    folder = tmp_path / "t5"
    T5ForSequenceClassification(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                         decoder_start_token_id=0, pad_token_id=0)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny["bert"]).save_pretrained(folder)
    rows = Path(tiny["csv"]).read_text().splitlines()
    short = tmp_path / "short.csv"  # rows of two lengths (each of tiny's has 5 words)
    short.write_text("\n".join([*rows, "bad,0", "great,1"]) + "\n")
    out = tmp_path / "o"
    capsys.readouterr()
    args = _train_args(tiny, out, "--target-modules", "q,v")
    assert main([*args[:2], str(folder), args[3], str(short), *args[5:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unified-lora: error: the model fails on the data's longest row (") and err.count("\n") == 1
    assert "so the length is not the cause: Each example must contain at least one <eos> token." in err
    assert "--max-length" not in err and not out.exists()


@pytest.mark.parametrize("case, needle", [
    ("missing_data", "no such file"),
    # a causal LM's missing --data named the classifier's data alone ("a GLUE task folder or a .csv/.tsv/.jsonl file")
    ("missing_lm_corpus", "nope.txt: no such file or folder; pass a .txt corpus or a .csv/.tsv/.jsonl table (a text "
                          "column, prompt/completion columns, or a .jsonl messages column)"),
    ("unknown_column", "unknown column 'nope'"),
    ("empty_data", "no data rows"),
    # a file with nothing in it (no header either; a .jsonl has none) was "a header alone"
    ("empty_file", "empty.csv is empty; it needs data rows (a .csv/.tsv file: a header row, then the rows)"),
    # a .jsonl file was told of a .csv/.tsv file's header row
    ("blank_jsonl", "blank.jsonl is empty; it needs data rows (a .jsonl file: a JSON object a line)"),
    # a UTF-8 byte-order mark (Excel's "CSV UTF-8") and blanks, nothing else, was "a header alone"
    ("bom_only_csv", "bom.csv is empty; it needs data rows (a .csv/.tsv file: a header row, then the rows)"),
    ("bom_only_jsonl", "bom.jsonl is empty; it needs data rows (a .jsonl file: a JSON object a line)"),
    ("missing_model", "no such folder"),
    ("output_dir_is_a_file", "a_file: a file, not a folder; pass a folder (it is made if it does not exist)"),
    # the demo said "[Errno 17] File exists", after the model and data had loaded
    ("demo_output_dir_is_a_file", "a_file: a file, not a folder; pass a folder (it is made if it does not exist)"),
    # `modules_to_save` said target_modules' example
    ("empty_modules_to_save_in_config", "modules_to_save: give at least one module name, e.g. classifier; got []"),
    # a file said "folder has no config.json", of a file that may be that config.json
    ("model_is_its_config_file", "config.json: a file, not a model folder: pass its folder, "),
    ("model_is_a_lone_file", "weights.bin: a file, not a model folder; pass the model's folder, saved with "
                             "save_pretrained() (config.json and the weights)"),
    ("bad_theta", "theta0"),
    ("bad_config_key", "unknown key(s) ['epochz']"),
    ("bad_mirror_kernel", "mirror_kernel: must be 'eager' or 'fused', got 'cuda'"),  # it said "kernel:"
    ("bad_mirror_policy", "mirror_policy: must be 'drift', 'never', 'always' or 'loss_worse', got 'foo'"),
    ("unsupported_format", "--data "),  # not "(or pass fmt=)", an argument of the library the command line lacks
    ("bad_layer_kernel", "layer_kernel: must be one of ('python', 'cpp'), got 'cuda'"),
    ("missing_config", "--config"),
    ("resume_without_checkpoint", "--resume"),
    ("not_a_number_in_config", "epochs: must be an integer, got 'two' (str)"),
    # PyYAML keeps the last of two equal keys silently: the run trained at the second lr
    ("key_given_twice_in_config", "c2.yaml: key 'lr' is given twice (again on line 4); keep one"),
    ("flag_spelling_in_config", "unknown key(s) ['batch-size'] ('batch-size': did you mean 'batch_size'?)"),
    # a flag whose key is another name (--lrs sets mode_lrs): the hint was the nearest key by spelling, 'lr'
    ("flag_dest_in_config", "unknown key(s) ['lrs'] ('lrs': did you mean 'mode_lrs'?)"),
    # (found by the review) --no-controller's key is controller, the other way round: told 'controller' by spelling,
    # `no_controller: true` was written `controller: true`, the controller on
    ("negated_flag_in_config", "unknown key(s) ['no-controller'] ('no-controller': did you mean 'controller: "
                               "false'?)"),
    # (found by the review) a flag with no config key: `trust_checkpoint:` was told 'peft_every_checkpoint' by spelling
    ("flag_only_in_config", "unknown key(s) ['resume', 'trust_checkpoint'] ('resume' is a command-line flag "
                            "(--resume), not a config key; 'trust_checkpoint' is a command-line flag "
                            "(--trust-checkpoint), not a config key)"),
    ("number_key_in_config", "unknown key(s) [5, 'foo']"),  # sorting int and str keys: a TypeError, exit 1
    ("null_output_dir_on_resume", "output_dir: must be a string, got None (NoneType)"),  # Path(None): exit 1
    ("config_not_utf8", "c8.yaml: not UTF-8 text (invalid continuation byte at byte 14); save it as UTF-8"),
    # a JSONL record without the text column became an empty text, and was dropped silently
    ("record_without_the_text_column_for_a_causal_lm", "gap.jsonl: record 2 (line 2) has no 'text' (its columns "
                                                       "are ['txt'], other records have 'text'); add it or drop the "
                                                       "record"),
    # it said "unknown column 'sentiment' in gap.jsonl (record 2)", of a column the other records have
    # the record's line too: blank lines are no record, so record 2 is on line 4
    ("record_without_the_label_key", "gap2.jsonl: record 2 (line 4) has no 'sentiment' (its columns are "
                                     "['review'], other records have 'sentiment'); add it or drop the record"),
    # prompt/completion pairs come from a table (tests/test_cli_sft.py); a .txt corpus has no columns
    ("two_text_columns_for_a_text_corpus", "corpus.txt: a plain-text corpus has no columns; prompt/completion pairs "
                                           "(--text-columns prompt,completion) are read from a .csv, .tsv or .jsonl"),
    # labels named for a causal LM, which reads none: ignored without a word
    ("label_column_for_a_causal_lm", "--label-column sentiment: labels are for a classifier, and this run trains a "
                                     "causal LM (the model is a causal LM), which reads no labels; drop "
                                     "--label-column, or pass --task-type seq-cls to train a classifier"),
    # UTF-16 without a byte-order mark (a NUL before every ASCII character) was read as text with NULs in it
    ("utf16_without_a_bom", "nobom.csv: line 1 holds a NUL character (0x00); is it UTF-16 without a byte-order "
                            "mark? save it as UTF-8"),
    # the offset was the decoder's within its 8 KiB chunk (3816 here), not the file's
    ("not_utf8_past_the_first_chunk", "late.csv is not UTF-8 text (byte 0xe9 at offset 11514, line 1002); save it "
                                      "as UTF-8 (e.g. Excel: CSV UTF-8)"),
    ("config_not_yaml", "not valid YAML (expected the node content, but found '<stream end>' at line 2, column 1)"),
    ("null_text_columns", "text_columns: must be a list of strings, e.g. ('text',), got None (NoneType)"),
    ("number_for_target_modules", "target_modules: must be a list of strings, e.g. ('query', 'value'), got 5"),
    # it ended "(label_names); add it or fix the data": a library argument, and "add it" to what
    ("dev_label_the_train_set_lacks", "has label '2', which is not one of the classes ['0', '1'] of the train set ("),
    ("missing_label", "gap.csv: record 2 (line 3) has no label (column 'label' is empty)"),
    # a dev label is one of the train set's classes by name: an integer was read as an id into them, so a dev 2 was
    # the class "1" of train labels -1/0/1, and MNLI-style ids were the sorted names ("contradiction" = 0)
    ("dev_label_2_for_classes_minus_1_0_1", "has label '2', which is not one of the classes ['-1', '0', '1']"),
    ("dev_ids_for_named_classes", "dev_ids.csv: record 1 (line 2) has label '1', which is not one of the classes "
                                  "['neg', 'pos']"),
    # a window after the last step of an epochs-based run: the summary reported a shock on steps that never ran
    ("shock_past_the_epochs", "shock_end: must be <= the run's "),
    ("missing_trace", "no such trace file"),
    ("missing_run_dir", "no such run folder"),
    ("bad_flag", "--stepz"),
    ("empty_txt", "is empty"),
    ("txt_for_a_classifier", "a plain-text file trains a causal LM"),
    # a causal LM on the bundled MRPC (no --data) or a GLUE folder: an internal AttributeError ('Example' has no strip)
    ("causal_lm_without_data", "no --data: the bundled MRPC sentence pairs are for a classifier, and a causal LM "
                               "trains on a .txt corpus"),
    ("glue_folder_for_a_causal_lm", "a folder is read as a GLUE task, data for a classifier; a causal LM trains on"),
    # one class: an integer label 1 made a 2-class head, and it trained on rows of that one class; the demo took a
    # 1-class head, which transformers trains as a regression on the class id
    ("one_class_of_int_labels", "ones.csv: every row has the label 1 in column 'label'; a classifier needs rows of "
                                "at least 2 classes"),
    ("one_class_in_the_demo", "pos.csv: every row has the label 'pos' in column 'label'"),
    ("null_text_for_a_causal_lm", "n.jsonl: record 2 (line 3) has no text (column 'text' is null)"),
    # it trained on `[CLS] [SEP]` alone, silently
    ("empty_second_text_of_a_pair", "pair.csv: record 3 (line 4) has no text (column 'b' is whitespace only)"),
    # both trained without a word: each row read as the pair (text, text), and a model reading its label as input
    ("a_text_column_given_twice", "text_columns ['text', 'text']: names column 'text' twice, so each row would be "
                                  "read as a pair of the same text; give one column, or a pair task's two columns"),
    ("the_label_column_among_the_text_columns", "label_column 'label' is also one of the text_columns ['text', "
                                                "'label']: the model would read each row's label in its input"),
    ("row_longer_than_the_positions", "--max-length 100: the model fails on the data's longest row, 82 tokens (its "
                                      "config has 64 positions)"),
    ("block_longer_than_the_positions", "--max-length 100: the model fails on the data's longest row, 100 tokens"),
    ("negative_save_steps", "save_steps: must be >= 0 (0 = no checkpoint inside an epoch), got -5"),
    ("negative_save_total_limit", "save_total_limit: must be >= 0 (0 = keep every step-N checkpoint), got -1"),
    ("negative_eval_steps", "eval_steps: must be >= 0 (0 = evaluate only at each epoch's end), got -2"),
    ("unknown_metric_for_best", "--metric-for-best f1: not a dev metric of this run; its evaluation reports "
                                "accuracy, macro_f1"),
    ("classifier_metric_for_a_causal_lm", "--metric-for-best accuracy: not a dev metric of this run; its evaluation "
                                          "reports loss, perplexity"),
    ("negative_patience", "early_stopping_patience: must be >= 0 (0 = never stop early), got -1"),
    ("negative_threshold", "early_stopping_threshold: must be a number >= 0, got -0.1"),
    ("empty_metric_for_best", "metric_for_best: must name a dev metric, e.g. accuracy, f1 or loss, got ''"),
    # one evaluation, at the end (--steps inside the first epoch): nothing to stop early
    ("patience_without_evaluations", "early_stopping_patience: 2, but this run evaluates on dev only at its end "
                                     "(step 3), so it can never stop early"),
    # --lr-mode absolute (the default) does not read --lr: `--lr 1e6` trained at the default --lrs, silently
    ("lr_with_lr_mode_absolute", "--lr 1e+06 (YAML lr): the base LR of --lr-mode multiplier, not read with --lr-mode "
                                 "absolute (the default), which trains each mode at its --lrs SINGLE MULTI MIRROR (now "
                                 "0.002 0.0005 0.0001); pass --lrs instead, or --lr-mode multiplier"),
])
def test_bad_input_one_line_exit_2_no_traceback(tiny, tmp_path, capsys, case, needle):
    out = str(tmp_path / "o")
    _corpus(tmp_path / "corpus.txt")
    argv = {
        "missing_data": _train_args(tiny, out)[:4] + [str(tmp_path / "nope.csv")],
        "missing_lm_corpus": ["train", "--model", tiny["gpt2"], "--data", str(tmp_path / "nope.txt"), "--output-dir",
                              out],
        "unknown_column": _train_args(tiny, out, "--label-column", "nope"),
        "empty_data": ["train", "--model", tiny["bert"], "--data", tiny["empty"], "--output-dir", out],
        "empty_file": _train_args(tiny, out)[:4] + [str(_write(tmp_path / "empty.csv", ""))],
        "blank_jsonl": _train_args(tiny, out)[:4] + [str(_write(tmp_path / "blank.jsonl", "\n  \n"))],
        "bom_only_csv": _train_args(tiny, out)[:4] + [str(_write(tmp_path / "bom.csv", " \n", "utf-8-sig"))],
        "bom_only_jsonl": _train_args(tiny, out)[:4] + [str(_write(tmp_path / "bom.jsonl", "", "utf-8-sig"))],
        "missing_model": ["train", "--model", str(tmp_path / "no-model"), "--data", tiny["csv"], "--output-dir", out],
        "output_dir_is_a_file": _train_args(tiny, str(_write(tmp_path / "a_file", "mine\n"))),
        "demo_output_dir_is_a_file": _demo_args(tiny, str(_write(tmp_path / "a_file", "mine\n"))),
        "empty_modules_to_save_in_config": _train_args(tiny, out, "--config", str(_write(tmp_path / "mts.yaml",
                                                                                        "modules_to_save: []\n"))),
        "model_is_its_config_file": ["train", "--model", str(Path(tiny["bert"]) / "config.json"), "--data",
                                     tiny["csv"], "--output-dir", out],
        "model_is_a_lone_file": ["train", "--model", str(_write(tmp_path / "weights.bin", "")), "--data", tiny["csv"],
                                 "--output-dir", out],
        "bad_theta": _train_args(tiny, out, "--theta0", "0.9", "--theta1", "0.5"),
        "lr_with_lr_mode_absolute": _train_args(tiny, out, "--lr", "1e6"),
        "bad_config_key": ["train", "--config", str(_write(tmp_path / "c.yaml", "epochz: 3\n"))],
        "bad_mirror_kernel": ["train", "--config", str(_write(tmp_path / "k.yaml", f"model: {tiny['bert']}\n"
                                                              f"data: {tiny['csv']}\nmirror_kernel: cuda\n"))],
        "bad_layer_kernel": ["train", "--config", str(_write(tmp_path / "l.yaml", f"model: {tiny['bert']}\n"
                                                             f"data: {tiny['csv']}\nlayer_kernel: cuda\n"))],
        "bad_mirror_policy": _train_args(tiny, out, "--mirror-policy", "foo"),
        "unsupported_format": _train_args(tiny, out)[:4] + [str(_write(tmp_path / "rows.parquet", "text,label\n"))],
        "missing_config": ["train", "--config", str(tmp_path / "none.yaml")],
        "null_text_columns": ["train", "--config", str(_write(tmp_path / "t.yaml", f"model: {tiny['bert']}\n"
                                                              f"data: {tiny['csv']}\ntext_columns: null\n"))],
        "number_for_target_modules": ["train", "--config", str(_write(tmp_path / "m.yaml", f"model: {tiny['bert']}\n"
                                                                      f"data: {tiny['csv']}\ntarget_modules: 5\n"))],
        "dev_label_the_train_set_lacks": _train_args(tiny, out, "--dev-data", str(_write(
            tmp_path / "dev3.csv", "text,label\ngood movie,1\nbad film,2\n"))),
        "record_without_the_label_key": _train_args(tiny, out)[:4] + [str(_write(
            tmp_path / "gap2.jsonl", '{"review": "good", "sentiment": "pos"}\n\n  \n{"review": "bad"}\n')),
            "--text-columns", "review", "--label-column", "sentiment"],
        "missing_label": _train_args(tiny, out)[:4] + [str(_write(tmp_path / "gap.csv", "text,label\na,0\nb,\nc,1\n"))],
        "dev_label_2_for_classes_minus_1_0_1": _train_args(tiny, out)[:4] + [str(_write(
            tmp_path / "m.csv", "text,label\ngood,1\nbad,-1\nfine,0\ngreat,1\nawful,-1\n")), "--dev-data", str(_write(
                tmp_path / "dev_m.csv", "text,label\ngood,1\nsuperb,2\n"))],
        "dev_ids_for_named_classes": _train_args(tiny, out)[:4] + [tiny["jsonl"], "--text-columns", "review",
                                                                   "--label-column", "sentiment", "--dev-data",
                                                                   str(_write(tmp_path / "dev_ids.csv",
                                                                              "review,sentiment\ngood,1\nbad,0\n"))],
        "not_a_number_in_config": ["train", "--config", str(_write(tmp_path / "n.yaml", f"model: {tiny['bert']}\n"
                                                                   f"data: {tiny['csv']}\nepochs: two\n"))],
        "resume_without_checkpoint": ["train", "--output-dir", out, "--resume"],
        "key_given_twice_in_config": _train_args(tiny, out, "--steps", "1", "--lr-mode", "multiplier", "--config", str(
            _write(tmp_path / "c2.yaml", "lr: 1e-4\nepochs: 2\n# the same key again, further down\nlr: 1e-3\n"))),
        "flag_spelling_in_config": ["train", "--config", str(_write(tmp_path / "c3.yaml", "batch-size: 8\n"))],
        "flag_dest_in_config": ["train", "--config", str(_write(tmp_path / "lrs.yaml",
                                                                "lrs: [1.0e-3, 1.0e-3, 1.0e-3]\n"))],
        "negated_flag_in_config": ["train", "--config", str(_write(tmp_path / "noctl.yaml", "no-controller: true\n"))],
        "flag_only_in_config": ["train", "--config", str(_write(tmp_path / "fo.yaml",
                                                                "trust_checkpoint: true\nresume: true\n"))],
        "number_key_in_config": ["train", "--config", str(_write(tmp_path / "c4.yaml", "foo: 1\n5: 2\n"))],
        "null_output_dir_on_resume": ["train", "--resume", "--config", str(_write(tmp_path / "c5.yaml",
                                                                                   "output_dir: null\n"))],
        "config_not_utf8": ["train", "--config", str(tmp_path / "c8.yaml")],
        "record_without_the_text_column_for_a_causal_lm": ["train", "--model", tiny["gpt2"], "--data", str(_write(
            tmp_path / "gap.jsonl", '{"text": "good movie"}\n{"txt": "bad film"}\n' * 8)), "--target-modules",
            "c_attn", "--steps", "1", "--max-length", "16", "--output-dir", out],
        "two_text_columns_for_a_text_corpus": ["train", "--model", tiny["gpt2"], "--data", str(tmp_path / "corpus.txt"),
                                               "--text-columns", "prompt,completion", "--target-modules", "c_attn",
                                               "--output-dir", out],
        "label_column_for_a_causal_lm": ["train", "--model", tiny["gpt2"], "--data", tiny["jsonl"], "--text-columns",
                                         "review", "--label-column", "sentiment", "--target-modules", "c_attn",
                                         "--output-dir", out],
        "utf16_without_a_bom": _train_args(tiny, out)[:4] + [str(_write(tmp_path / "nobom.csv",
                                                                        "text,label\ngood,1\nbad,0\n", "utf-16-le"))],
        "not_utf8_past_the_first_chunk": _train_args(tiny, out)[:4] + [str(_write(
            tmp_path / "late.csv", "text,label\n" + "good film,1\n" * 500 + "bad film,0\n" * 500 + "caf\u00e9,1\n",
            "cp1252"))],
        "config_not_yaml": ["train", "--config", str(_write(tmp_path / "c9.yaml", "text_columns: [\n"))],
        "shock_past_the_epochs": _train_args(tiny, out, "--epochs", "1", "--shock-start", "200", "--shock-end", "300"),
        "missing_trace": ["plot", str(tmp_path / "none.jsonl")],
        "missing_run_dir": ["report", str(tmp_path / "none")],
        "bad_flag": ["demo", "--stepz", "3"],
        "empty_txt": ["train", "--model", tiny["gpt2"], "--data", str(_write(tmp_path / "e.txt", "\n \n")),
                      "--output-dir", out],
        "txt_for_a_classifier": ["train", "--model", tiny["bert"], "--data", str(_write(tmp_path / "c.txt", "text\n")),
                                 "--output-dir", out],
        "causal_lm_without_data": ["train", "--model", tiny["gpt2"], "--output-dir", out],
        "glue_folder_for_a_causal_lm": ["train", "--model", tiny["gpt2"], "--data", str(tiny["root"]),
                                        "--output-dir", out],
        "one_class_of_int_labels": _train_args(tiny, out)[:4] + [str(_write(
            tmp_path / "ones.csv", "text,label\ngood,1\ngreat,1\nfine,1\nsuperb,1\n"))],
        "one_class_in_the_demo": _demo_args(tiny, out)[:4] + [str(_write(
            tmp_path / "pos.csv", "text,label\ngood,pos\ngreat,pos\nfine,pos\n")), "--dev-size", "0"],
        # more tokens than the tiny models' 64 positions: an IndexError / RuntimeError at the first batch holding
        # such a row (an internal error, exit 1, possibly hours into a run) before the model was probed
        "null_text_for_a_causal_lm": ["train", "--model", tiny["gpt2"], "--data", str(_write(
            tmp_path / "n.jsonl", '{"text": "good film"}\n\n{"text": null}\n{"text": "bad"}\n')), "--target-modules",
            "c_attn", "--output-dir", out],
        "empty_second_text_of_a_pair": _train_args(tiny, out)[:4] + [str(_write(
            tmp_path / "pair.csv", "a,b,label\ngood,film,1\nbad,movie,0\nfine, ,1\nawful,plot,0\n")),
            "--text-columns", "a,b"],
        "a_text_column_given_twice": _train_args(tiny, out, "--text-columns", "text,text"),
        "the_label_column_among_the_text_columns": _train_args(tiny, out, "--text-columns", "text,label"),
        "row_longer_than_the_positions": ["train", "--model", tiny["bert"], "--data", str(_write(
            tmp_path / "long.csv", "text,label\ngood movie,1\n" + "bad " * 80 + ",0\nawful film,0\nfine,1\n")),
            "--max-length", "100", "--output-dir", out],
        "block_longer_than_the_positions": ["train", "--model", tiny["gpt2"], "--data", str(tmp_path / "corpus.txt"),
                                            "--target-modules", "c_attn", "--max-length", "100", "--output-dir", out],
        "negative_save_steps": _train_args(tiny, out, "--save-steps", "-5"),
        "negative_eval_steps": _train_args(tiny, out, "--eval-steps", "-2"),
        "unknown_metric_for_best": _train_args(tiny, out, "--metric-for-best", "f1"),
        "classifier_metric_for_a_causal_lm": ["train", "--model", tiny["gpt2"], "--data", str(tmp_path / "corpus.txt"),
                                              "--target-modules", "c_attn", "--metric-for-best", "accuracy",
                                              "--output-dir", out],
        "negative_patience": _train_args(tiny, out, "--early-stopping-patience", "-1"),
        "negative_threshold": _train_args(tiny, out, "--early-stopping-threshold", "-0.1"),
        "empty_metric_for_best": ["train", "--config", str(_write(tmp_path / "e.yaml", f"model: {tiny['bert']}\n"
                                                                  f"data: {tiny['csv']}\nmetric_for_best: ''\n"))],
        "patience_without_evaluations": _train_args(tiny, out, "--steps", "3", "--early-stopping-patience", "2"),
        "negative_save_total_limit": ["train", "--config", str(_write(tmp_path / "s.yaml", f"model: {tiny['bert']}\n"
                                                                      f"data: {tiny['csv']}\nsave_total_limit: -1\n"))],
    }[case]
    (tmp_path / "c8.yaml").write_bytes(b"label_column: \xe9t\xe9\n")  # Latin-1, not UTF-8
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert needle in err
    assert err.strip().splitlines()[-1].startswith("unified-lora")
    if case != "bad_flag":  # argparse adds a usage line; ours is exactly one line
        assert err.count("\n") == 1 and err.startswith("unified-lora: error: ")
    if case == "unsupported_format":
        assert "unsupported data format 'parquet'" in err and "fmt=" not in err
    if case == "dev_label_the_train_set_lacks":
        assert err.endswith("); fix the label, or add rows of that class to --data\n") and "label_names" not in err


def test_a_misspelt_model_folder_under_a_local_folder_of_models_is_named_not_fetched(tiny, tmp_path, monkeypatch,
                                                                                     capsys):
    """`--model models/gpt22`, a typo of the local `models/gpt2`, reads as the hub id `models/gpt22`: it went to the
    hub (five retries offline) and failed as a network error that named no folder."""
    monkeypatch.chdir(tiny["root"].parent)
    out = str(tmp_path / "o")
    given = f"{tiny['root'].name}/gpt22"
    assert main(["train", "--model", given, "--data", tiny["csv"], "--output-dir", out]) == 2
    assert capsys.readouterr().err == (
        f"unified-lora: error: --model {given}: no such folder (did you mean {tiny['root'].name}/gpt2?); the local "
        f"folder {tiny['root'].name} holds the models bert, gpt2, not gpt22, and the Hugging Face cache has no {given} "
        f"(for that hub id, run where {tiny['root'].name} is no local folder, or download it into the cache first)\n")
    assert not Path(out).exists()


@pytest.mark.parametrize("command", ["train", "demo"])
def test_an_empty_output_dir_is_refused_not_the_current_folder(tiny, tmp_path, monkeypatch, capsys, command):
    """`--output-dir ''` (or YAML `output_dir: ''`) is Path(""), the current folder: the run's files were written there,
    among the user's own."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    make = _demo_args if command == "demo" else _train_args
    given = [make(tiny, "")]
    if command == "train":
        given.append(make(tiny, "x")[:-4] + ["--config", str(_write(tmp_path / "c.yaml", "output_dir: ''\n"))])
    for argv in given:
        assert main(argv) == 2
        assert capsys.readouterr().err == ("unified-lora: error: --output-dir '': empty, which would write into the "
                                           "current folder; pass a folder (it is made if it does not exist)\n")
    assert not list(cwd.iterdir())


def test_a_head_left_out_of_modules_to_save_gets_trains_note_alone_not_the_python_apis_warning(tiny, tmp_path,
                                                                                              capsys):
    """(found by the review) setup_unified_lora's warning of a frozen classifier head reached the CLI through `Run`:
    `train --modules-to-save pooler` on a base model printed it (a Python warning naming `modules_to_save=[...]`)
    beside train's own note of the fresh head left frozen; on a checkpoint whose head is trained (not fresh) it
    warned of that trained head, and `predict` and `export` of such a run warned again. train knows which modules
    from_pretrained made afresh, and says so itself."""
    import warnings

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    trained = tmp_path / "bert-cls"  # a classifier checkpoint: its head is loaded, not made afresh
    AutoModelForSequenceClassification.from_pretrained(tiny["bert"], num_labels=2).save_pretrained(trained)
    AutoTokenizer.from_pretrained(tiny["bert"]).save_pretrained(trained)
    for model, note in ((tiny["bert"], True), (str(trained), False)):
        out = tmp_path / f"run-{note}"
        args = _train_args(tiny, out, "--steps", "2", "--modules-to-save", "pooler")
        args[args.index("--model") + 1] = model
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            assert main(args) == 0
            said = capsys.readouterr().out
            assert main(["predict", str(out), "--data", tiny["csv"], "--output", str(tmp_path / "p.csv")]) == 0
            assert main(["export", str(out), "--merged", "--out", str(tmp_path / f"merged-{note}")]) == 0
        assert [str(w.message) for w in got if "stays frozen" in str(w.message)] == []
        assert ("note: ['classifier'] were initialised afresh (the checkpoint lacks them) and are not in "
                "modules_to_save ['pooler']: they stay frozen at their random initialisation") in said.splitlines() \
            if note else "afresh" not in said


def test_a_misspelt_modules_to_save_is_one_error_naming_the_models_own_modules(tiny, tmp_path, capsys):
    """`--modules-to-save clasifier` printed a note that the fresh head stays frozen, then the error; that listed the
    LoRA wrapper's parts (base_layer, lora_A, lora_B, lora_dropout) among the model's module names. An empty
    `--modules-to-save` gave target_modules' example (query,value)."""
    out = tmp_path / "o"
    assert main(_train_args(tiny, out, "--modules-to-save", "clasifier")) == 2
    said = capsys.readouterr()
    assert said.err.startswith("unified-lora: error: modules_to_save: 'clasifier' matched no module (did you mean "
                               "'classifier'?); module names end with [") and said.err.count("\n") == 1
    assert "'query'" in said.err and "'classifier'" in said.err
    for part in ("base_layer", "lora_A", "lora_B", "lora_dropout"):
        assert part not in said.err
    assert "note:" not in said.out and "stay frozen" not in said.out
    assert main(_train_args(tiny, out, "--modules-to-save", " , ")) == 2
    assert "--modules-to-save: expected a comma-separated list, e.g. classifier" in capsys.readouterr().err
    assert main(_train_args(tiny, out, "--text-columns", "")) == 2
    assert "--text-columns: expected a comma-separated list, e.g. sentence1,sentence2" in capsys.readouterr().err


@pytest.mark.parametrize("yaml_text, flags, needle", [
    ("lora_dropout: 1.5\n", [], "lora_dropout: must be in [0, 1), got 1.5"),
    ("lora_alpha: .nan\n", [], "lora_alpha: must be a positive finite number, got nan"),
    ("", ["--no-controller", "--theta0", "2"], "theta0: must be a number in [0, 1], got 2.0"),
], ids=["lora_dropout", "lora_alpha", "theta0_without_controller"])
def test_a_bad_lora_setting_or_threshold_fails_before_anything_is_loaded_or_written(tiny, tmp_path, capsys, yaml_text,
                                                                                    flags, needle):
    """TrainConfig checked lora_alpha and lora_dropout only when the model was wrapped: after the model and data had
    loaded and the --output-dir had been made (with --overwrite, after the previous run was deleted). Thresholds were
    not checked at all with --no-controller, and the run recorded (and plotted) theta0=2."""
    out = tmp_path / "o"
    cfg = _write(tmp_path / "c.yaml", yaml_text or "{}\n")
    assert main(_train_args(tiny, out, "--config", str(cfg), *flags)) == 2
    err = capsys.readouterr().err
    assert err == f"unified-lora: error: {needle}\n"
    assert not out.exists()


def test_a_bad_dev_label_fails_before_any_training(tiny, tmp_path):
    out = tmp_path / "run"
    dev = _write(tmp_path / "dev3.csv", "text,label\ngood movie,1\nbad film,2\n")
    assert main(_train_args(tiny, out, "--dev-data", str(dev))) == 2
    assert not (out / "trace.jsonl").exists()  # nothing ran (it used to fail at the evaluation after training)


def test_dev_data_replaces_a_glue_folders_dev_tsv(tiny, tmp_path, capsys):
    """With a GLUE task folder as --data, --dev-data (documented: "default: GLUE dev.tsv") was ignored, silently,
    even when the file did not exist: the run evaluated on the folder's dev.tsv."""
    sst = tmp_path / "SST-2"
    sst.mkdir()
    rows = _rows(24)
    (sst / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows[:16]))
    (sst / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows[16:]))
    mine = _write(tmp_path / "mine.tsv", "sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows[:3]))
    base = ["train", "--model", tiny["bert"], "--data", str(sst), "--batch-size", "8", "--max-length", "16",
            "--log-every", "0"]
    assert main(base + ["--output-dir", str(tmp_path / "a")]) == 0
    assert "on sst2: 16 train / 8 dev rows" in capsys.readouterr().out
    assert main(base + ["--output-dir", str(tmp_path / "b"), "--dev-data", str(mine)]) == 0
    assert "on sst2: 16 train / 3 dev rows" in capsys.readouterr().out
    assert main(base + ["--output-dir", str(tmp_path / "c"), "--dev-data", str(tmp_path / "none.tsv")]) == 2
    assert "none.tsv" in capsys.readouterr().err


def test_a_dev_fraction_near_one_still_leaves_a_training_row(tiny, tmp_path, capsys):
    """dev_fraction 0.999 of 64 rows held out all 64 (round(63.9)), and the run failed with "encode() got no
    examples; load a non-empty data set first", an error about a library call the user never made."""
    cfg = _write(tmp_path / "run.yaml", f"model: {tiny['bert']}\ndata: {tiny['csv']}\ndev_fraction: 0.999\n")
    assert main(["train", "--config", str(cfg), "--batch-size", "8", "--max-length", "16", "--log-every", "0",
                 "--output-dir", str(tmp_path / "run")]) == 0
    assert "1 train / 63 dev rows" in capsys.readouterr().out


def test_a_left_padded_batch_keeps_its_tokens(tiny):
    """trim_padding cut a batch to its first `width` columns, which for a tokenizer with padding_side="left" (many
    decoder checkpoints set it) are the padding: a batch of short rows trained (and was scored) on [PAD] tokens alone,
    with an all-zero attention mask."""
    from transformers import AutoTokenizer

    from unified_lora.data import Example, TextDataset
    from unified_lora.training import encode_rows, trim_padding

    ds = TextDataset([Example("good", None, 1), Example("bad movie was very bad", None, 0),
                      Example("nice film", None, 1)], 2)
    for side in ("left", "right"):
        tok = AutoTokenizer.from_pretrained(tiny["bert"], padding_side=side)
        enc = encode_rows(tok, ds, "seq-cls", 16)
        batch = trim_padding({k: v[[0, 2]] for k, v in enc.items()})
        alone = encode_rows(tok, TextDataset([ds[0], ds[2]], 2), "seq-cls", 16)  # padded to these rows' longest
        assert {k: v.tolist() for k, v in batch.items()} == {k: v.tolist() for k, v in alone.items()}, side


@pytest.mark.parametrize("targets,expected", [
    ("all-linear", None),  # every Linear but the head
    (r".*\.(query|value)", {"query", "value"}),
    ("query,value", {"query", "value"}),
    ("key", {"key"}),
])
def test_target_modules_flag_takes_suffixes_a_regex_or_all_linear(tiny, tmp_path, targets, expected):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--steps", "2", "--target-modules", targets)) == 0
    blocks = load_file(str(out / "checkpoints" / "step-2" / "adapter_blocks.safetensors"))
    adapted = {k.split(".lora_A")[0].rsplit(".", 1)[-1] for k in blocks if ".lora_A" in k}
    if expected is None:  # all-linear: q, k, v, the attention output and both MLP Linears; not the classifier
        assert {"query", "key", "value", "dense"} <= adapted and not any("classifier" in k and "lora" in k
                                                                       for k in blocks)
    else:
        assert adapted == expected


def test_a_checkpoint_with_a_head_of_another_size_gets_a_new_head_and_says_so(tiny, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    three = AutoModelForSequenceClassification.from_pretrained(tiny["bert"], num_labels=3)
    three.save_pretrained(tmp_path / "bert3")
    for f in Path(tiny["bert"]).glob("*.txt"):
        (tmp_path / "bert3" / f.name).write_bytes(f.read_bytes())
    for f in Path(tiny["bert"]).glob("*token*"):
        (tmp_path / "bert3" / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "run"
    argv = _train_args(tiny, out, "--steps", "2")
    argv[argv.index("--model") + 1] = str(tmp_path / "bert3")
    assert main(argv) == 0  # it used to stop with transformers' size-mismatch RuntimeError, as an internal error
    assert "its classification head has 3 outputs and the data has 2 classes" in capsys.readouterr().out


@pytest.mark.parametrize("which", ["bert", "gpt2"])
def test_a_bf16_checkpoint_trains_in_fp32(tiny, tmp_path, which):
    # transformers 5 loads a checkpoint in the dtype it was saved in (dtype="auto"), so a bf16 checkpoint used to train
    # in bf16 throughout on the CPU: base, LoRA blocks, head and AdamW's moments, with updates under a bf16 ulp lost.
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForCausalLM

    from unified_lora.training import load_model

    cls = AutoModel if which == "bert" else AutoModelForCausalLM
    cls.from_pretrained(tiny[which]).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    for f in Path(tiny[which]).iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            (tmp_path / "bf16" / f.name).write_bytes(f.read_bytes())
    model, _ = load_model(str(tmp_path / "bf16"), "seq-cls" if which == "bert" else "causal-lm")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    out = tmp_path / "run"
    argv = _train_args(tiny, out, "--steps", "2")
    argv[argv.index("--model") + 1] = str(tmp_path / "bf16")
    if which == "gpt2":
        argv += ["--target-modules", "c_attn"]
    assert main(argv) == 0
    saved = load_file(str(out / "checkpoints" / "step-2" / "adapter_blocks.safetensors"))
    assert saved and {t.dtype for k, t in saved.items() if not k.endswith("._extra_state")} == {torch.float32}


def _tiny_base(tiny, root: Path, arch: str) -> str:
    """A tiny DistilBERT or BART base model (no head) with the tiny BERT tokenizer."""
    from transformers import BartConfig, BartModel, DistilBertConfig, DistilBertModel

    vocab = len(Path(tiny["root"], "vocab.txt").read_text().split())
    torch.manual_seed(0)
    if arch == "distilbert":
        model = DistilBertModel(DistilBertConfig(vocab_size=vocab, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                                 max_position_embeddings=64))
    else:  # BertTokenizerFast ends every row with [SEP] (id 3): BART's eos, where its head reads the sequence
        model = BartModel(BartConfig(vocab_size=vocab, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
                                     eos_token_id=3, decoder_start_token_id=3, forced_eos_token_id=3))
    model.save_pretrained(root / arch)
    for f in Path(tiny["bert"]).iterdir():
        if "token" in f.name or f.name == "vocab.txt":
            (root / arch / f.name).write_bytes(f.read_bytes())
    return str(root / arch)


@pytest.mark.parametrize("arch, head", [("distilbert", ["pre_classifier", "classifier"]),
                                        ("bart", ["classification_head.dense", "classification_head.out_proj"])])
def test_every_head_module_a_base_model_lacks_is_trained_saved_and_exported(tiny, tmp_path, arch, head):
    """DistilBERT's head is pre_classifier + classifier, BART's is classification_head: from_pretrained initialises
    all of it afresh on a base checkpoint. Only a module named classifier/score used to train, so the rest stayed
    frozen at random values that no checkpoint held, and BART's PEFT adapter lacked its head (other logits on
    reload)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from unified_lora.training import Run, TrainConfig, latest_checkpoint, load_model, seed_everything

    path, out = _tiny_base(tiny, tmp_path, arch), tmp_path / "run"
    argv = _train_args(tiny, out, "--steps", "3", "--target-modules", "q_lin,v_lin" if arch == "distilbert" else
                       "q_proj,v_proj", "--lrs", "5e-2", "5e-2", "5e-2")
    argv[argv.index("--model") + 1] = path
    assert main(argv) == 0
    saved = load_file(str(out / "checkpoints" / "step-3" / "adapter_blocks.safetensors"))
    seed_everything(0)
    init, tok = load_model(path, "seq-cls", 2)  # the run's model before training (same seed)
    for m in head:
        for leaf in ("weight", "bias"):
            assert not torch.equal(saved[f"{m}.{leaf}"], init.get_parameter(f"{m}.{leaf}"))  # saved, and it trained
    # the trained model, rebuilt from its checkpoint, against the PEFT adapter on a base whose head is another draw
    ckpt = latest_checkpoint(out / "checkpoints")
    cfg = TrainConfig.from_dict(torch.load(ckpt / "state.pt", weights_only=True)["config"])
    run = Run(cfg, init, "seq-cls", 2, None, print_fn=None)
    run.load_checkpoint(ckpt)
    torch.manual_seed(123)
    other, _ = load_model(path, "seq-cls", 2)
    peft_model = PeftModel.from_pretrained(other, str(out / "peft_adapter"))
    x = tok(["good movie", "the plot was awful"], return_tensors="pt", padding=True)
    init.eval(), peft_model.eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(**x).logits, init(**x).logits, atol=1e-6)


def test_peft_every_checkpoint_also_exports_the_step_checkpoints(tiny, tmp_path):
    cfg = _write(tmp_path / "run.yaml", f"model: {tiny['bert']}\ndata: {tiny['csv']}\nsteps: 3\nbatch_size: 8\n"
                                        f"max_length: 16\npeft_every_checkpoint: true\nmodules_to_save: classifier\n"
                                        f"output_dir: {tmp_path / 'run'}\n")
    assert main(["train", "--config", str(cfg)]) == 0  # 3 steps end the run mid-epoch: a step-3 checkpoint
    assert (tmp_path / "run" / "checkpoints" / "step-3" / "peft" / "adapter_config.json").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["modules_to_save"] == ["classifier"]  # one name, not its letters


def test_a_failed_peft_export_keeps_the_run_and_exits_3(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    # LoRA on the head only: PEFT saves the head whole and cannot hold a LoRA layer inside it, so the export is refused
    assert main(_train_args(tiny, out, "--steps", "2", "--target-modules", "classifier")) == 3
    err = capsys.readouterr().err
    assert "PEFT export failed" in err and "exit code 3" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["peft_adapter"] is None and summary["checkpoints"] == ["step-2"]
    assert not (out / "peft_adapter").exists()


def test_debug_shows_the_traceback(tiny, tmp_path):
    with pytest.raises(Exception, match="no such file"):
        main(["--debug", "train", "--model", tiny["bert"], "--data", str(tmp_path / "nope.csv")])


def _write(path: Path, text: str, encoding: str | None = None) -> Path:
    path.write_text(text, encoding=encoding)
    return path


def test_installed_entry_point_help():
    exe = Path(sys.executable).parent / "unified-lora"
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for cmd in ("demo", "train", "plot", "report"):
        assert cmd in res.stdout


def _record_fsync_and_replace(monkeypatch) -> list[tuple]:
    """os.fsync and os.replace, each call recorded in order as ("fsync", path of the fd) / ("replace", src, dst)
    (a power loss cannot be simulated: what is flushed before which rename is what can be checked)."""
    events, fsync, replace = [], os.fsync, os.replace

    def recorded_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def recorded_replace(src, dst, **k):
        events.append(("replace", os.fspath(src), os.fspath(dst)))
        return replace(src, dst, **k)
    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    return events


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fd's file through /proc")
def test_written_atomically_flushes_the_file_before_its_rename_and_the_folder_after(tmp_path, monkeypatch):
    """The temporary file was renamed without os.fsync: after a power loss (ext4/xfs delayed allocation) the name
    could point at an empty file, the old one gone."""
    from unified_lora._files import _host_tag, written_atomically

    events = _record_fsync_and_replace(monkeypatch)
    path = tmp_path / "summary.json"
    path.write_text("old")
    with written_atomically(str(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write('{"ü": 1}\n')
    assert path.read_bytes() == '{"ü": 1}\n'.encode()  # the bytes written, nothing else
    tmp = f"{path}.tmp-{_host_tag()}-{os.getpid()}"
    assert events == [("fsync", tmp), ("replace", tmp, str(path)), ("fsync", str(tmp_path))], events


def test_a_file_write_removes_the_temp_files_that_killed_writers_left_and_keeps_live_ones(tmp_path):
    """A process killed (SIGKILL) while it wrote summary.json, console.txt, plot.png, ... left its temporary
    `<name>.tmp-<pid>` beside the file for good. The next write of that file now removes those of processes gone
    from this host; a live process's (DDP ranks writing one file), another host's and other files' stay."""
    from unified_lora._files import _host_tag, write_text_atomically

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kept = [f"summary.json.tmp-{_host_tag()}-{live.pid}", f"summary.json.tmp-otherhost-{dead}",
                f"console.txt.tmp-{_host_tag()}-{dead}", f"summary.json.tmp-{dead}"]
        for name in kept + [f"summary.json.tmp-{_host_tag()}-{dead}"]:
            (tmp_path / name).write_text('{"cut sh')
        write_text_atomically(tmp_path / "summary.json", "{}\n")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["summary.json"])
    finally:
        live.kill()
        live.wait()


def test_a_plot_interrupted_while_writing_leaves_the_previous_one_whole_and_keeps_the_format_of_its_name(tmp_path,
                                                                                                        monkeypatch):
    """plot_trace wrote plot.png (the CLI's, or `plot -o`) in place: an interrupt or a kill during savefig left a
    PNG cut short where the previous plot was. It is now written under a temporary name and renamed; the format
    still follows the name's extension (the temporary name has none of its own), and a name without one gets .png,
    the path returned and printed being the file written (`plot -o phi` printed "phi" and wrote phi.png)."""
    import io

    from matplotlib.figure import Figure

    from unified_lora.plotting import plot_trace

    trace = [{"step": i, "loss": 1.0 / (i + 1), "phi": 0.5, "mode": 1, "rank": 8, "lr": 1e-3} for i in range(5)]
    png = tmp_path / "plot.png"
    assert plot_trace(trace, png) == str(png) and png.read_bytes()[:8] == PNG
    before = png.read_bytes()
    real = Figure.savefig

    def cut_short(self, fname, **kw):  # writes the first half of the real file, then Ctrl-C
        buf = io.BytesIO()
        real(self, buf, **kw)
        with open(fname, "wb") as f:
            f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        raise KeyboardInterrupt
    monkeypatch.setattr(Figure, "savefig", cut_short)
    with pytest.raises(KeyboardInterrupt):
        plot_trace(trace, png, title="another")
    monkeypatch.undo()
    assert png.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]
    assert plot_trace(trace, tmp_path / "phi.svg").endswith("phi.svg")
    assert (tmp_path / "phi.svg").read_text().startswith("<?xml")
    assert plot_trace(trace, tmp_path / "phi.PDF") and (tmp_path / "phi.PDF").read_bytes()[:5] == b"%PDF-"
    trace_file = tmp_path / "trace.jsonl"
    trace_file.write_text("".join(json.dumps(r) + "\n" for r in trace))
    assert main(["plot", str(trace_file), "-o", str(tmp_path / "phi")]) == 0
    assert (tmp_path / "phi.png").read_bytes()[:8] == PNG and not (tmp_path / "phi").exists()
    with pytest.raises(ValueError, match="Format 'xyz' is not supported"):
        plot_trace(trace, tmp_path / "phi.xyz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phi.PDF", "phi.png", "phi.svg", "plot.png", "trace.jsonl"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fd's file through /proc")
def test_every_file_a_run_writes_is_flushed_to_the_disk_before_it_is_renamed_into_place(tiny, tmp_path, monkeypatch):
    """Checkpoints (their safetensors, state.pt, checkpoint.json, the PEFT copy), the final PEFT adapter,
    summary.json and console.txt were renamed into place (or written in place) without an fsync; the trace was
    never flushed to the disk."""
    events = _record_fsync_and_replace(monkeypatch)
    out = tmp_path / "run"
    assert main(_train_args(tiny, out, "--epochs", "2", "--modules-to-save", "classifier")) == 0
    monkeypatch.undo()
    synced = [e[1] for e in events if e[0] == "fsync"]
    renamed = {e[2]: i for i, e in enumerate(events) if e[0] == "replace"}
    ckpts = out / "checkpoints"
    for tag in ("epoch-1", "epoch-2"):
        into = renamed[str(ckpts / tag)]  # the checkpoint folder's rename: its files are on the disk before it
        src = Path(events[into][1])
        before = {e[1] for e in events[:into] if e[0] == "fsync"}
        for f in (ckpts / tag).rglob("*"):
            assert str(src / f.relative_to(ckpts / tag)) in before, (tag, f)
        assert str(ckpts) in synced[sum(e[0] == "fsync" for e in events[:into]):]  # the rename itself
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        dst = out / "peft_adapter" / name
        src = events[renamed[str(dst)]][1]
        assert ("fsync", src) in events[:renamed[str(dst)]], name
    for name in ("summary.json", "console.txt", "plot.png"):  # plot.png was written in place
        i = renamed[str(out / name)]
        assert events[i - 1] == ("fsync", events[i][1]) and events[i + 1] == ("fsync", str(out)), name
    assert str(out / "trace.jsonl") in synced
    assert json.loads((out / "summary.json").read_text())["checkpoints"] == ["epoch-1", "epoch-2"]


def test_dev_data_replaces_the_bundled_mrpc_dev_split_and_a_missing_one_is_named(tiny, tmp_path, capsys, monkeypatch):
    """Without --data (the shipped MRPC), --dev-data was ignored without a word: the run evaluated MRPC's dev.tsv.
    It now replaces it, in MRPC's layout, as for a GLUE folder; a dev file that does not exist is named."""
    import unified_lora.data
    from unified_lora.data.loaders import resolve_glue_dir

    monkeypatch.setattr(unified_lora.data, "default_model_path", lambda: tiny["bert"])
    rows = (resolve_glue_dir("mrpc") / "MRPC" / "dev.tsv").read_text(encoding="utf-8-sig").splitlines()
    dev = tmp_path / "dev.tsv"
    dev.write_text("\n".join(rows[:8]) + "\n", encoding="utf-8")  # the header and 7 rows
    common = ["--steps", "1", "--batch-size", "8", "--max-length", "16", "--log-every", "0"]
    assert main(["train", "--dev-data", str(dev), "--output-dir", str(tmp_path / "run"), *common]) == 0
    assert "/ 7 dev rows" in capsys.readouterr().out
    missing = tmp_path / "nope.tsv"
    assert main(["train", "--dev-data", str(missing), "--output-dir", str(tmp_path / "r2"), *common]) == 2
    assert f"--dev-data {missing}: no such file; check the path" in capsys.readouterr().err


def test_compare_json_into_a_new_folder_is_written_and_a_folder_is_refused_before_the_comparison(tiny, tmp_path,
                                                                                                   capsys):
    """`compare --json` into a folder that did not exist failed after the table was printed, naming its temporary
    file ("No such file or directory: '.../cmp.json.tmp-host-pid'"); a --json naming a folder did the same ("Is a
    directory"). The folder is made now, as predict's --output makes its own; a folder is refused in one line, before
    anything is compared or printed."""
    runs = []
    for name in ("a", "b"):
        assert main(_train_args(tiny, tmp_path / name, "--steps", "4", "--dev-data", tiny["csv"])) == 0
        runs.append(str(tmp_path / name))
    capsys.readouterr()
    out = tmp_path / "new" / "sub" / "cmp.json"
    assert main(["compare", runs[0], "--vs", runs[1], "--json", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"][0]["metric"] == "accuracy"
    assert capsys.readouterr().out.endswith(f"written: {out}\n")
    assert main(["compare", runs[0], "--vs", runs[1], "--json", str(tmp_path)]) == 2
    said = capsys.readouterr()
    assert said.out == "" and said.err == f"unified-lora: error: --json {tmp_path}: is a folder; name the file to write\n"
