"""Seeded, stratified n-way splits of a label vector (pure functions)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.errors import ConfigError


def stratified_split(
    labels: np.ndarray, fractions: Sequence[float], seed: int
) -> list[np.ndarray]:
    """Split indices of `labels` into len(fractions) sorted parts, class-stratified.

    Written by hand because scikit-learn's splitters are two-way and refuse classes
    with a single member. Items are grouped by class (class order and the order
    within a class are seeded permutations) and dealt out one by one to the part
    furthest behind its quota, so every part gets round(n * fraction) items (+-1)
    and every class is spread over the parts in proportion (+-1).
    """
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or len(fr) == 0 or (fr < 0).any() or abs(fr.sum() - 1.0) > 1e-6:
        raise ConfigError(
            f"split fractions {list(fractions)} must be >= 0 and sum to 1; "
            "check data.val_fraction / data.test_fraction"
        )
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    order = []
    for c in rng.permutation(classes):
        members = np.flatnonzero(labels == c)
        order.append(members[rng.permutation(len(members))])
    ordered = np.concatenate(order) if order else np.zeros(0, dtype=np.int64)
    counts = np.zeros(len(fr), dtype=np.int64)
    assign = np.empty(len(ordered), dtype=np.int64)
    for pos in range(len(ordered)):
        k = int(np.argmax((pos + 1) * fr - counts))
        assign[pos] = k
        counts[k] += 1
    return [np.sort(ordered[assign == k]).astype(np.int64) for k in range(len(fr))]
