"""Label corruption: deterministic symmetric noise and the shock-window flip."""

from __future__ import annotations

import random
from typing import Any, Sequence


def symmetric_label_noise(labels: Sequence[int], rate: float, num_classes: int, seed: int = 0) -> list[int]:
    """Corrupt labels with symmetric noise, reproducibly for a given seed.

    Definition: each label, independently with probability `rate`, is replaced
    by a *different* class drawn uniformly from the other `num_classes - 1`.
    So `rate` is exactly the expected fraction of wrong labels. Note that with
    this definition, binary labels at rate 0.5 carry no information (random
    labels) and rate 1.0 is a deterministic flip; for K classes, random labels
    correspond to rate (K - 1) / K.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must be in [0, 1], got {rate}")
    if num_classes < 2:
        raise ValueError(f"label noise needs num_classes >= 2, got {num_classes}")
    rng = random.Random(seed)
    noisy = []
    for y in map(int, labels):
        if not 0 <= y < num_classes:
            raise ValueError(f"label {y} is outside range(num_classes={num_classes})")
        # Draw both numbers for every item: the stream stays aligned across rates, so for one
        # seed the items corrupted at a lower rate are a subset of those at a higher rate.
        hit, other = rng.random() < rate, rng.randrange(num_classes - 1)
        # Shift past y so the replacement is uniform over the other classes, never y itself.
        noisy.append((other + (other >= y)) if hit else y)
    return noisy


def flip_labels(labels: Any, num_classes: int | None = None) -> Any:
    """Shock-window flip: y -> (y + 1) % K, i.e. 1 - y for binary labels.

    Works on lists/tuples (returns a list) and on numpy arrays / torch tensors
    (returns the same type). K defaults to max(label) + 1 (at least 2); pass
    `num_classes` when a batch may not contain the highest class.
    """
    is_seq = isinstance(labels, (list, tuple))
    if is_seq and not labels:
        return []
    if num_classes is None:
        top = max(labels) if is_seq else labels.max()
        num_classes = max(2, int(top) + 1)
    if is_seq:
        return [(int(y) + 1) % num_classes for y in labels]
    return (labels + 1) % num_classes
