"""GLUE metrics in plain numpy (same definitions as scikit-learn / GLUE's scorer).

Degenerate cases (no positives, constant predictions) return 0.0 instead of
dividing by zero, as scikit-learn does with `zero_division=0`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from .loaders import normalize_task

# The metric GLUE reports first for a task (used for model selection / plots).
PRIMARY_METRIC = {"mrpc": "f1", "rte": "accuracy", "cola": "mcc", "sst2": "accuracy"}


def _pair(preds: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds).reshape(-1), np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"preds and labels differ in length: {p.size} vs {y.size}")
    if p.size == 0:
        raise ValueError("cannot score an empty set of predictions")
    return p.astype(np.int64), y.astype(np.int64)


def _f1(tp: float, fp: float, fn: float) -> float:
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def accuracy(preds: Any, labels: Any) -> float:
    p, y = _pair(preds, labels)
    return float((p == y).mean())


def f1_binary(preds: Any, labels: Any, positive: int = 1) -> float:
    """F1 of the positive class (GLUE MRPC/QQP use positive = 1)."""
    p, y = _pair(preds, labels)
    tp = np.sum((p == positive) & (y == positive))
    fp = np.sum((p == positive) & (y != positive))
    fn = np.sum((p != positive) & (y == positive))
    return _f1(tp, fp, fn)


def macro_f1(preds: Any, labels: Any) -> float:
    """Unweighted mean of per-class F1 over every class seen in preds or labels."""
    p, y = _pair(preds, labels)
    classes = np.union1d(p, y)
    return float(np.mean([f1_binary(p, y, positive=int(c)) for c in classes]))


def matthews_corrcoef(preds: Any, labels: Any) -> float:
    """Matthews correlation (multiclass R_K form; equals the phi coefficient for 2 classes)."""
    p, y = _pair(preds, labels)
    classes, idx = np.unique(np.concatenate([y, p]), return_inverse=True)
    k, n = len(classes), len(y)
    conf = np.zeros((k, k), dtype=np.float64)  # float: n**2 products overflow int64 on big sets
    np.add.at(conf, (idx[:n], idx[n:]), 1)
    t_sum, p_sum = conf.sum(axis=1), conf.sum(axis=0)
    total = float(n)
    cov_tp = np.trace(conf) * total - t_sum @ p_sum
    cov_pp = total**2 - p_sum @ p_sum
    cov_tt = total**2 - t_sum @ t_sum
    if cov_pp * cov_tt == 0:
        return 0.0  # constant predictions or constant labels: no correlation measurable
    return float(cov_tp / np.sqrt(cov_tt * cov_pp))


def glue_metrics(task: str, preds: Any, labels: Any) -> dict[str, float]:
    """Metrics as GLUE reports them; unknown tasks get accuracy + macro_f1."""
    key = normalize_task(task)
    acc = accuracy(preds, labels)
    if key == "mrpc":
        return {"f1": f1_binary(preds, labels), "accuracy": acc}
    if key == "cola":
        return {"mcc": matthews_corrcoef(preds, labels), "accuracy": acc}
    if key in ("rte", "sst2"):
        return {"accuracy": acc}
    return {"accuracy": acc, "macro_f1": macro_f1(preds, labels)}


def primary_metric(task: str) -> str:
    return PRIMARY_METRIC.get(normalize_task(task), "accuracy")


def majority_class(labels: Any) -> int:
    """Most frequent label; ties go to the smallest label so the result is deterministic."""
    counts = Counter(int(y) for y in np.asarray(labels).reshape(-1))
    if not counts:
        raise ValueError("cannot take the majority class of an empty label list")
    return min(counts, key=lambda c: (-counts[c], c))


def majority_baseline(train_labels: Any, dev_labels: Any, task: str) -> dict[str, float]:
    """Dev metrics of always predicting the train-majority class (the floor to beat)."""
    dev = np.asarray(dev_labels).reshape(-1)
    return glue_metrics(task, np.full(dev.shape, majority_class(train_labels)), dev)


PERMUTATIONS = 20_000  # the paired F1 test's random swaps: the p's Monte Carlo SE is <= 0.0035 (at p = 0.5), 0.0015 at 0.05
EXACT_MAX_ROWS = 14  # up to this many rows predicted differently, all 2**k swaps (16,384 <= PERMUTATIONS) are counted


def paired_f1_test(preds_a: Any, preds_b: Any, labels: Any, positive: int | None = 1,
                   permutations: int = PERMUTATIONS, seed: int = 0, exact_max: int = EXACT_MAX_ROWS) -> dict:
    """A paired permutation test of the F1 difference of two predictors scored on the same rows: F1 of the class
    `positive` (`f1_binary`), or macro-F1 (`macro_f1`) with `positive=None`. Under "no difference" each row's two
    predictions are exchangeable, so each row's pair is swapped (or not) at random and F1(a) - F1(b) recomputed;
    p = the share of swaps whose |difference| is at least the observed one (two-sided). Only the k rows where the
    predictions differ can change anything: up to `exact_max` of them every one of the 2**k swaps is counted (p exact,
    the observed one among them); beyond, `permutations` random swaps drawn with `seed`, p = (1 + hits) / (1 + m).
    Returns {"f1_a", "f1_b", "diff", "p", "rows_differ", "permutations", "exact", "seed"}."""
    a, y = _pair(preds_a, labels)
    b, _ = _pair(preds_b, labels)
    if a.shape != b.shape:
        raise ValueError(f"the two predictors' rows differ in number: {a.size} vs {b.size}")
    classes = np.array([positive]) if positive is not None else np.union1d(np.union1d(a, b), y)
    same, differ = a == b, np.flatnonzero(a != b)

    def counts(p: np.ndarray) -> np.ndarray:  # per row: tp, fp, fn of each class (rows x 3K)
        hit, gold = p[:, None] == classes, y[:, None] == classes
        return np.concatenate([hit & gold, hit & ~gold, ~hit & gold], axis=1).astype(np.float64)

    def f1(c: np.ndarray) -> np.ndarray:  # counts (... x 3K) -> F1 (...): macro over the classes seen, as macro_f1
        k = len(classes)
        tp, fp, fn = c[..., :k], c[..., k:2 * k], c[..., 2 * k:]
        denom = 2 * tp + fp + fn
        score = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
        if positive is not None:
            return score[..., 0]
        return score.sum(-1) / np.maximum((denom > 0).sum(-1), 1)

    ca, cb = counts(a), counts(b)
    base = ca[same].sum(0)  # the rows they predict alike: the same in every swap
    da, db = ca[differ], cb[differ]
    fa, fb = float(f1(ca.sum(0))), float(f1(cb.sum(0)))
    observed = abs(fa - fb)
    tol = 1e-12 * max(1.0, observed)  # one difference reached by other counts may differ from it in the last bits
    k, hits, total = len(differ), 0, 0
    exact = k <= exact_max
    rng = np.random.default_rng(seed)
    n_swaps = 2**k if exact else permutations
    for start in range(0, n_swaps, 4096):  # in chunks: 4096 swaps x k rows at a time
        m = min(4096, n_swaps - start)
        if exact:  # swap i: row j swapped where bit j of i is set
            swap = ((np.arange(start, start + m)[:, None] >> np.arange(k)) & 1).astype(np.float64)
        else:
            swap = rng.integers(0, 2, size=(m, k)).astype(np.float64)
        keep = 1.0 - swap
        d = f1(base + keep @ da + swap @ db) - f1(base + keep @ db + swap @ da)
        hits += int(np.sum(np.abs(d) >= observed - tol))
        total += m
    p = hits / total if exact else (1 + hits) / (1 + total)
    return {"f1_a": fa, "f1_b": fb, "diff": fa - fb, "p": min(1.0, p), "rows_differ": k, "permutations": total,
            "exact": exact, "seed": seed}
