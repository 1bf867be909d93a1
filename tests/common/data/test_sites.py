"""Site assembly: partition -> site train/test, scanner shift, labelled mask."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from common.config import PartitionConfig
from common.data.sites import (
    labelled_mask,
    load_site_images,
    partition_sites,
    pool_sites,
    simulated_nodes,
)
from common.data.types import Dataset, ImageSet, image_hashes


def _dataset(n: int = 480, classes: int = 3, size: int = 12) -> Dataset:
    """Images that encode their own index, so sites can be traced back."""
    idx = np.arange(n)
    images = np.zeros((n, size, size, 1), np.uint8)
    images[:, 0, 0, 0] = idx % 256
    images[:, 0, 1, 0] = idx // 256
    images[:, 2:, :, 0] = (np.arange(size - 2)[None, :, None] * 20 + 10).astype(
        np.uint8
    )
    labels = (idx % classes).astype(np.int64)
    full = ImageSet(images, labels)
    names = tuple(f"c{i}" for i in range(classes))
    return Dataset(
        "toy", "npz:toy", names, full, full.subset(idx[:10]), full.subset(idx[:20])
    )


def _index(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 1, 0].astype(int)


CFG = PartitionConfig(
    sites=4,
    scheme="dirichlet",
    alpha=1.0,
    site_test_fraction=0.25,
    labelled_fraction=0.1,
    min_site_size=10,
)


def test_sites_cover_the_training_set_once():
    ds = _dataset()
    sites = partition_sites(ds, CFG, seed=0)
    assert [s.name for s in sites] == ["site-0", "site-1", "site-2", "site-3"]
    seen = np.concatenate(
        [_index(s.train.images) for s in sites] + [_index(s.test.images) for s in sites]
    )
    assert sorted(seen.tolist()) == list(range(len(ds.train)))
    for s in sites:
        n = len(s.train) + len(s.test)
        assert abs(len(s.test) - 0.25 * n) <= 1
        np.testing.assert_array_equal(
            s.train.labels, ds.train.labels[_index(s.train.images)]
        )
        assert s.profile is None


def test_partition_sites_is_deterministic():
    ds = _dataset()
    a, b = partition_sites(ds, CFG, seed=5), partition_sites(ds, CFG, seed=5)
    for x, y in zip(a, b, strict=True):
        assert image_hashes(x.train.images) == image_hashes(y.train.images)
        np.testing.assert_array_equal(x.labelled, y.labelled)
        np.testing.assert_array_equal(x.test.labels, y.test.labels)
    c = partition_sites(ds, CFG, seed=6)
    assert any(len(x.train) != len(z.train) for x, z in zip(a, c, strict=True))


def test_labelled_counts_and_same_mask_under_scanner_shift():
    ds = _dataset()
    plain = partition_sites(ds, CFG, seed=1)
    shifted = partition_sites(ds, replace(CFG, shift="scanner"), seed=1)
    for p, s in zip(plain, shifted, strict=True):
        assert int(p.labelled.sum()) == max(1, round(0.1 * len(p.train)))
        present = np.unique(p.train.labels)
        if p.labelled.sum() >= len(present):
            assert set(p.train.labels[p.labelled].tolist()) == set(present.tolist())
        np.testing.assert_array_equal(p.labelled, s.labelled)
        np.testing.assert_array_equal(p.train.labels, s.train.labels)
        assert s.profile is not None
        assert not np.array_equal(p.train.images, s.train.images)
    full = partition_sites(ds, replace(CFG, labelled_fraction=1.0), seed=1)
    assert all(s.labelled.all() for s in full)


def test_labelled_mask_is_pure_and_stratified():
    labels = np.repeat([0, 1, 2], [70, 20, 10])
    m = labelled_mask(labels, 0.2, seed=3, site=1)
    assert m.dtype == np.bool_ and m.sum() == 20
    counts = np.bincount(labels[m], minlength=3)
    assert counts.min() >= 1 and abs(counts[0] - 14) <= 1
    np.testing.assert_array_equal(m, labelled_mask(labels, 0.2, seed=3, site=1))
    assert not np.array_equal(m, labelled_mask(labels, 0.2, seed=3, site=2))
    assert labelled_mask(labels, 0.001, seed=3, site=1).sum() == 1
    tiny = labelled_mask(labels, 0.02, seed=0, site=0)
    assert tiny.sum() == 2 and len(np.unique(labels[tiny])) == 2


def test_load_site_images_uses_whole_source(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 10), ("val", 3), ("test", 5)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]
    np.savez(tmp_path / "hospital.npz", **arrays)
    source = f"npz:{tmp_path / 'hospital.npz'}"
    site = load_site_images(source, 16, tmp_path, 0, "site-7")
    assert site.site_id == 7 and site.name == "site-7" and site.profile is None
    assert len(site.train) == 13 and len(site.test) == 5
    assert site.labelled.all() and site.train.images.shape[1:] == (16, 16, 3)


def test_site_with_empty_test_part_is_rejected():
    from common.errors import DataError

    ds = _dataset(n=60)
    cfg = replace(CFG, sites=2, site_test_fraction=0.001, scheme="iid")
    with pytest.raises(DataError, match="site_test_fraction=0.001"):
        partition_sites(ds, cfg, seed=0)


def test_fair_pooled_site_holds_exactly_the_sites_shifted_images_and_masks():
    cfg = replace(CFG, shift="scanner", labelled_fraction=0.5)
    sites = partition_sites(_dataset(), cfg, seed=3)
    pooled = pool_sites(sites)
    assert pooled.name == "pooled"
    # the same pixels (scanner profiles applied), labels and masks, site by site
    np.testing.assert_array_equal(
        pooled.train.images, np.concatenate([s.train.images for s in sites])
    )
    np.testing.assert_array_equal(
        pooled.test.labels, np.concatenate([s.test.labels for s in sites])
    )
    np.testing.assert_array_equal(
        pooled.labelled, np.concatenate([s.labelled for s in sites])
    )
    assert pooled.labelled.sum() == sum(int(s.labelled.sum()) for s in sites)
    assert simulated_nodes("pooled", 4) == 1 and simulated_nodes("fedavg", 4) == 4
