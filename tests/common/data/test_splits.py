"""Stratified n-way splits."""

from __future__ import annotations

import numpy as np
import pytest

from common.data.splits import stratified_split
from common.errors import ConfigError


def test_split_counts_cover_and_stratify():
    labels = np.repeat([0, 1, 2], [500, 300, 200])
    parts = stratified_split(labels, (0.7, 0.1, 0.2), seed=3)
    assert [len(p) for p in parts] == [700, 100, 200]
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == 1000 and allidx.min() == 0
    for p, f in zip(parts, (0.7, 0.1, 0.2), strict=True):
        assert np.all(np.diff(p) > 0)  # sorted, no repeats
        counts = np.bincount(labels[p], minlength=3)
        assert np.all(np.abs(counts - f * np.array([500, 300, 200])) <= 1)


def test_split_is_deterministic_and_seeded():
    labels = np.random.default_rng(0).integers(0, 4, 300)
    a = stratified_split(labels, (0.8, 0.2), seed=1)
    b = stratified_split(labels, (0.8, 0.2), seed=1)
    c = stratified_split(labels, (0.8, 0.2), seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])


def test_split_handles_singletons_and_zero_fraction():
    labels = np.arange(10)  # ten classes of one item each
    tr, va, te = stratified_split(labels, (0.8, 0.0, 0.2), seed=0)
    assert (len(tr), len(va), len(te)) == (8, 0, 2)


def test_split_rejects_bad_fractions():
    with pytest.raises(ConfigError, match="sum to 1"):
        stratified_split(np.zeros(10), (0.5, 0.2), seed=0)
    with pytest.raises(ConfigError, match=">= 0"):
        stratified_split(np.zeros(10), (1.2, -0.2), seed=0)
