"""Partitions over sites (flwr-datasets): determinism, skew, sizes, errors."""

from __future__ import annotations

import numpy as np
import pytest

from common.data.partition import partition_indices, power_law_sizes
from common.errors import ConfigError, DataError

LABELS = np.repeat(np.arange(4), 150)  # 600 samples, 4 classes


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological", "quantity"])
def test_partition_is_pure_disjoint_and_sorted(scheme):
    kw = dict(alpha=1.0, classes_per_site=2, size_skew=1.0, min_site_size=5)
    a = partition_indices(LABELS, 4, scheme, seed=7, **kw)
    b = partition_indices(LABELS.copy(), 4, scheme, seed=7, **kw)
    c = partition_indices(LABELS, 4, scheme, seed=8, **kw)
    assert len(a) == 4
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    joined = np.concatenate(a)
    assert len(np.unique(joined)) == len(joined)  # each index at most once
    assert all(np.all(np.diff(p) > 0) and p.dtype == np.int64 for p in a)
    if scheme != "pathological":
        assert len(joined) == len(LABELS)


def test_iid_sites_have_equal_sizes_and_mixed_classes():
    parts = partition_indices(LABELS, 3, "iid", seed=0)
    assert [len(p) for p in parts] == [200, 200, 200]
    assert all(len(np.unique(LABELS[p])) == 4 for p in parts)


def _mean_max_share(alpha: float) -> float:
    labels = np.repeat(np.arange(10), 200)
    shares = []
    for seed in range(3):
        parts = partition_indices(
            labels, 5, "dirichlet", alpha=alpha, min_site_size=1, seed=seed
        )
        shares += [np.bincount(labels[p]).max() / len(p) for p in parts]
    return float(np.mean(shares))


def test_dirichlet_small_alpha_concentrates_classes():
    skewed, even = _mean_max_share(0.05), _mean_max_share(100.0)
    assert skewed > 0.4 > 0.15 > even


def test_pathological_limits_classes_per_site():
    parts = partition_indices(LABELS, 4, "pathological", classes_per_site=1, seed=0)
    assert [len(np.unique(LABELS[p])) for p in parts] == [1, 1, 1, 1]
    # first-deterministic assignment: with sites >= classes every class is used
    assert sorted(int(LABELS[p][0]) for p in parts) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="classes_per_site=5"):
        partition_indices(LABELS, 4, "pathological", classes_per_site=5)


def test_quantity_sizes_follow_power_law():
    parts = partition_indices(LABELS, 4, "quantity", size_skew=1.0, seed=0)
    sizes = [len(p) for p in parts]
    assert sizes == power_law_sizes(600, 4, 1.0) == [288, 144, 96, 72]
    assert sum(sizes) == 600
    steep = [len(p) for p in partition_indices(LABELS, 4, "quantity", size_skew=2.0)]
    assert steep[0] / steep[-1] > sizes[0] / sizes[-1]
    flat = [len(p) for p in partition_indices(LABELS, 4, "quantity", size_skew=0.0)]
    assert flat == [150, 150, 150, 150]


def test_too_small_sites_raise_data_error_naming_site():
    with pytest.raises(DataError, match=r"site-\d+ only \d+ samples.*fewer sites"):
        partition_indices(LABELS, 10, "quantity", size_skew=3.0, min_site_size=10)
    with pytest.raises(DataError, match="cannot give 700 sites"):
        partition_indices(LABELS, 700, "iid", min_site_size=1)


def test_dirichlet_unreachable_min_size_names_site():
    labels = np.repeat(np.arange(10), 20)
    with pytest.raises(DataError, match=r"dirichlet partition gives site-\d+ only"):
        partition_indices(labels, 10, "dirichlet", alpha=0.01, min_site_size=15)


def test_unknown_scheme_is_config_error():
    with pytest.raises(ConfigError, match="iid, dirichlet, pathological, quantity"):
        partition_indices(LABELS, 2, "random")
