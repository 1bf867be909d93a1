"""Site images: partition -> per-site train/test, scanner shift, labelled mask.

A `SiteImages` is what one site holds before any tensor is made: simulated
(`partition_sites`), deployed (`load_site_images`) or pooled (`pool_sites`).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import PartitionConfig
from common.data.partition import partition_indices
from common.data.shift import ScannerProfile, apply_profile, scanner_profiles
from common.data.sources import load_dataset
from common.data.splits import stratified_split
from common.data.types import Dataset, ImageSet
from common.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class SiteImages:
    """The images one site holds: train/test sets, labelled mask, scanner profile."""

    site_id: int
    name: str
    train: ImageSet
    test: ImageSet
    labelled: np.ndarray  # bool (len(train),): which train labels are kept
    profile: ScannerProfile | None
    classes: tuple[str, ...] = ()  # label names, index = label

    def __post_init__(self) -> None:
        """Check the mask matches the training set."""
        if self.labelled.dtype != np.bool_ or self.labelled.shape != (len(self.train),):
            raise DataError(
                f"{self.name}: labelled mask is {self.labelled.dtype} "
                f"{self.labelled.shape}, expected bool ({len(self.train)},)"
            )


def labelled_mask(
    labels: np.ndarray, fraction: float, seed: int, site: int
) -> np.ndarray:
    """Which labels a site keeps: round(fraction * n) items (>= 1), class-stratified.

    A pure function of (labels, fraction, seed, site), so every method (supervised,
    distillation, ...) sees the same labelled items. When the count allows, each
    present class keeps at least one label; the rest follow the class proportions.
    """
    labels = np.asarray(labels).reshape(-1)
    n = len(labels)
    mask = np.zeros(n, dtype=bool)
    if n == 0:
        return mask
    k = min(n, max(1, int(round(fraction * n))))
    if k == n:
        mask[:] = True
        return mask
    rng = np.random.default_rng([seed, site, 0x1ABE1])
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    members = [m[rng.permutation(len(m))] for m in members]
    if k < len(classes):
        for ci in rng.permutation(len(classes))[:k]:
            mask[members[ci][0]] = True
        return mask
    # One per class first, then the rest by largest remainder over what is left.
    spare = np.array([len(m) - 1 for m in members], dtype=np.float64)
    extra = k - len(classes)
    quota = extra * spare / spare.sum() if spare.sum() else spare
    take = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - take), kind="stable")
    take[order[: extra - int(take.sum())]] += 1
    for m, t in zip(members, take, strict=True):
        mask[m[: 1 + t]] = True
    return mask


def _site_split(
    part: ImageSet, fraction: float, seed: int, site: int, name: str
) -> tuple[ImageSet, ImageSet]:
    """Stratified site train/test split; the test part must not be empty."""
    tr, te = stratified_split(
        part.labels,
        (1.0 - fraction, fraction),
        seed=int(np.random.default_rng([seed, site]).integers(0, 2**31 - 1)),
    )
    if len(te) == 0 or len(tr) == 0:
        raise DataError(
            f"{name}: {len(part)} images give {len(tr)} train / {len(te)} test with "
            f"partition.site_test_fraction={fraction}; raise site_test_fraction or "
            "use fewer sites"
        )
    return part.subset(tr), part.subset(te)


def split_public_pool(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(pool, rest) indices: a stratified public pool that no site receives."""
    n = len(labels)
    if fraction <= 0:
        return np.zeros(0, dtype=np.int64), np.arange(n)
    pool, rest = stratified_split(labels, [fraction, 1.0 - fraction], seed + 7907)
    return np.sort(pool), np.sort(rest)


def public_pool(dataset: Dataset, fraction: float, seed: int) -> ImageSet:
    """The public pool of the train split (for training a proxy teacher)."""
    pool, _ = split_public_pool(dataset.train.labels, fraction, seed)
    return dataset.train.subset(pool)


def partition_sites(
    dataset: Dataset, cfg: PartitionConfig, seed: int
) -> list[SiteImages]:
    """Partition dataset.train (minus the public pool) over cfg.sites sites."""
    _, rest = split_public_pool(dataset.train.labels, cfg.public_pool_fraction, seed)
    pool_free = dataset.train.subset(rest)
    parts = partition_indices(
        pool_free.labels,
        cfg.sites,
        cfg.scheme,
        alpha=cfg.alpha,
        classes_per_site=cfg.classes_per_site,
        size_skew=cfg.size_skew,
        min_site_size=cfg.min_site_size,
        seed=seed,
    )
    profiles: list[ScannerProfile | None]
    if cfg.shift == "scanner":
        profiles = list(scanner_profiles(cfg.sites, seed))
    else:
        profiles = [None] * cfg.sites
    sites = []
    for site_id, (idx, profile) in enumerate(zip(parts, profiles, strict=True)):
        name = f"site-{site_id}"
        part = pool_free.subset(idx)
        if profile is not None:
            # Applied before the split, so noise streams differ for every image.
            part = ImageSet(apply_profile(part.images, profile), part.labels)
        train, test = _site_split(part, cfg.site_test_fraction, seed, site_id, name)
        mask = labelled_mask(train.labels, cfg.labelled_fraction, seed, site_id)
        log.info(
            "%s: %d train (%d labelled) / %d test, classes %s",
            name,
            len(train),
            int(mask.sum()),
            len(test),
            np.bincount(train.labels, minlength=dataset.num_classes).tolist(),
        )
        sites.append(
            SiteImages(
                site_id=site_id,
                name=name,
                train=train,
                test=test,
                labelled=mask,
                profile=profile,
                classes=tuple(dataset.classes),
            )
        )
    return sites


def pool_sites(sites: list[SiteImages]) -> SiteImages:
    """One site holding every site's data exactly as they hold it (fair pooling).

    Train and test parts, labelled masks and scanner-shifted pixels are
    concatenated in site order; the pooled reference then differs from the
    federation only in where the data sits, not in what it is.
    """
    if not sites:
        raise DataError("cannot pool zero sites")
    return SiteImages(
        site_id=0,
        name="pooled",
        train=ImageSet.concat([s.train for s in sites]),
        test=ImageSet.concat([s.test for s in sites]),
        labelled=np.concatenate([s.labelled for s in sites]),
        profile=None,
        classes=sites[0].classes,
    )


def simulated_nodes(strategy: str, sites: int) -> int:
    """Nodes a simulation runs: one for the pooled reference, else one per site."""
    return 1 if strategy == "pooled" else sites


def load_site_images(
    source: str,
    image_size: int,
    cache_dir: str | Path,
    seed: int,
    site_name: str,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> SiteImages:
    """A deployed site's data: the whole source (train+val to train, test to test)."""
    ds = load_dataset(
        source,
        image_size,
        cache_dir,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )
    m = re.search(r"(\d+)$", site_name)
    site_id = int(m.group(1)) if m else 0
    train = ImageSet.concat([ds.train, ds.val])
    if len(ds.test) == 0:
        raise DataError(
            f"site {site_name}: data source {source!r} has an empty test split; "
            "provide test images (test_images in npz, or data.test_fraction > 0)"
        )
    return SiteImages(
        site_id=site_id,
        name=site_name,
        train=train,
        test=ds.test,
        labelled=np.ones(len(train), dtype=bool),
        profile=None,
        classes=tuple(ds.classes),
    )
