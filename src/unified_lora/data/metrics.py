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
