"""Split a label vector over simulated sites with flwr-datasets partitioners."""

from __future__ import annotations

import logging
import warnings

import numpy as np

from common.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SCHEMES = ("iid", "dirichlet", "pathological", "quantity")


def power_law_sizes(n: int, sites: int, size_skew: float) -> list[int]:
    """Site sizes proportional to (i + 1) ** -size_skew, summing exactly to n."""
    weights = np.arange(1, sites + 1, dtype=np.float64) ** -float(size_skew)
    quota = n * weights / weights.sum()
    sizes = np.floor(quota).astype(np.int64)
    # Largest remainder; ties go to the lower site id (stable sort).
    order = np.argsort(-(quota - sizes), kind="stable")
    sizes[order[: n - int(sizes.sum())]] += 1
    return [int(s) for s in sizes]


def _hf_dataset(labels: np.ndarray):
    """A `datasets.Dataset` with the label and the original row index."""
    import datasets

    return datasets.Dataset.from_dict(
        {"label": labels.tolist(), "idx": list(range(len(labels)))}
    )


def _read_back(partitioner, sites: int) -> list[np.ndarray]:
    """The original indices of each partition, sorted."""
    return [
        np.sort(np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64))
        for i in range(sites)
    ]


def _dirichlet(ds, sites: int, alpha: float, min_size: int, seed: int):
    """Dirichlet label skew; flwr-datasets redraws up to 10 times to reach min_size."""
    from flwr_datasets.partitioner import DirichletPartitioner

    def run(min_partition_size: int) -> list[np.ndarray]:
        part = DirichletPartitioner(
            num_partitions=sites,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
        part.dataset = ds
        return _read_back(part, sites)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one warning per redraw; we report below
        try:
            return run(min_size)
        except ValueError:
            log.info(
                "Dirichlet(alpha=%s) missed min_site_size=%d after 10 draws",
                alpha,
                min_size,
            )
            return run(0)


def _shuffled(part, ds, sites: int, seed: int) -> list[np.ndarray]:
    """Indices per site from a partitioner over a seeded shuffle of ``ds``."""
    part.dataset = ds.shuffle(seed=seed)
    return _read_back(part, sites)


def _pathological(
    ds, labels: np.ndarray, sites: int, classes_per_site: int, seed: int
) -> list[np.ndarray]:
    """``classes_per_site`` classes per site; every class used when sites >= K."""
    from flwr_datasets.partitioner import PathologicalPartitioner

    n_cls = len(np.unique(labels))
    if not 1 <= classes_per_site <= n_cls:
        raise ConfigError(
            f"partition.classes_per_site={classes_per_site} is not valid for "
            f"{n_cls} classes; use 1..{n_cls}"
        )
    # "first-deterministic": site i surely holds class i % K, so with
    # sites >= K every class is used; the other classes are drawn at random.
    part = PathologicalPartitioner(
        num_partitions=sites,
        partition_by="label",
        num_classes_per_partition=classes_per_site,
        class_assignment_mode="first-deterministic",
        shuffle=True,
        seed=seed,
    )
    part.dataset = ds
    return _read_back(part, sites)


def _check_request(n: int, sites: int, scheme: str, min_size: int) -> None:
    """Refuse an unknown scheme, no sites, or more sites than the samples allow."""
    if scheme not in SCHEMES:
        raise ConfigError(
            f"partition.scheme={scheme!r} is not valid; choose one of "
            f"{', '.join(SCHEMES)}"
        )
    if sites < 1:
        raise ConfigError(f"partition.sites={sites} is not valid; use >= 1")
    if sites * min_size > n:
        raise DataError(
            f"{n} samples cannot give {sites} sites at least "
            f"{min_size} samples each (partition.min_site_size); use "
            "fewer sites or a smaller min_site_size"
        )


def partition_indices(
    labels: np.ndarray,
    sites: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    classes_per_site: int = 1,
    size_skew: float = 1.0,
    min_site_size: int = 10,
    seed: int = 0,
) -> list[np.ndarray]:
    """Per-site sorted, disjoint index arrays into `labels` (pure in its inputs)."""
    from flwr_datasets.partitioner import IidPartitioner, SizePartitioner

    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    min_size = max(min_site_size, 1)
    _check_request(len(labels), sites, scheme, min_size)
    ds = _hf_dataset(labels)
    if scheme == "iid":
        parts = _shuffled(IidPartitioner(num_partitions=sites), ds, sites, seed)
    elif scheme == "dirichlet":
        if alpha <= 0:
            raise ConfigError(f"partition.alpha={alpha} is not valid; use > 0")
        parts = _dirichlet(ds, sites, float(alpha), min_site_size, seed)
    elif scheme == "pathological":
        parts = _pathological(ds, labels, sites, classes_per_site, seed)
    else:  # quantity
        sizes = power_law_sizes(len(labels), sites, size_skew)
        _check_sizes(scheme, sizes, min_size)
        parts = _shuffled(SizePartitioner(partition_sizes=sizes), ds, sites, seed)
    _check_sizes(scheme, [len(p) for p in parts], min_size)
    return parts


def _check_sizes(scheme: str, sizes: list[int], min_site_size: int) -> None:
    """Raise DataError naming the smallest site when it is under min_site_size."""
    small = int(np.argmin(sizes))
    if sizes[small] >= min_site_size:
        return
    fix = {
        "dirichlet": "a larger partition.alpha, ",
        "quantity": "a smaller partition.size_skew, ",
    }.get(scheme, "")
    shown = str(sizes) if len(sizes) <= 20 else f"[{sizes[0]}, ...] ({len(sizes)})"
    raise DataError(
        f"{scheme} partition gives site-{small} only {sizes[small]} samples "
        f"(< partition.min_site_size={min_site_size}; sizes {shown}); use fewer "
        f"sites, {fix}or a smaller min_site_size"
    )
