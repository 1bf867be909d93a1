"""An experiment's data as its sites see it: decode size, dataset, one site's images.

Plain functions of the config (no memo here): the sites' per-process cache
(`client.site.SiteCache`) keeps the decoded dataset between messages; the
report, preflight and benchmarks call these directly or through that cache.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from common.config import ExperimentConfig
from common.data.sites import (
    SiteImages,
    load_site_images,
    partition_sites,
    pool_sites,
    simulated_nodes,
)
from common.data.sources import load_dataset
from common.data.types import Dataset
from common.data.views import decode_size
from common.errors import DataError


def base_image_size(cfg: ExperimentConfig) -> int:
    """Side at which images are decoded: large enough for teacher and student."""
    return decode_size(cfg.data.image_size, cfg.teacher.image_size)


def dataset_for(cfg: ExperimentConfig) -> Dataset:
    """The experiment's whole dataset, decoded at `base_image_size`."""
    return load_dataset(
        cfg.data.source,
        base_image_size(cfg),
        cfg.data.cache_dir,
        seed=cfg.train.seed,
        val_fraction=cfg.data.val_fraction,
        test_fraction=cfg.data.test_fraction,
    )


def site_images(
    cfg: ExperimentConfig,
    node_config: Mapping[str, Any],
    dataset: Callable[[ExperimentConfig], Dataset] = dataset_for,
) -> SiteImages:
    """The images of the site named by the node config.

    `dataset` gives the experiment's whole dataset (simulation only; the site
    cache passes its memo so a process decodes it once).
    """
    size = base_image_size(cfg)
    cache_dir = str(node_config.get("cache-dir", cfg.data.cache_dir))
    if "data-source" in node_config:  # deployment: the site's data is the site's
        return load_site_images(
            str(node_config["data-source"]),
            size,
            cache_dir,
            cfg.train.seed,
            str(node_config.get("site", "site")),
        )
    if "partition-id" not in node_config:
        raise DataError(
            "node config names no data: give data-source=<br35h|npz:..|folder:..> "
            "(deployment) or partition-id (simulation)"
        )
    pid = int(node_config["partition-id"])
    nodes = simulated_nodes(cfg.federation.strategy, cfg.partition.sites)
    n_part = int(node_config.get("num-partitions", nodes))
    if n_part != nodes:
        raise DataError(
            f"engine runs {n_part} nodes but federation.strategy="
            f"{cfg.federation.strategy} with partition.sites={cfg.partition.sites} "
            f"needs {nodes}; they must match"
        )
    sites = partition_sites(dataset(cfg), cfg.partition, cfg.train.seed)
    return pool_sites(sites) if cfg.federation.strategy == "pooled" else sites[pid]


def class_names(cfg: ExperimentConfig, images: SiteImages) -> tuple[str, ...]:
    """`data.classes` when set (checked against the labels), else the source's."""
    if not cfg.data.classes:
        return tuple(images.classes)
    names = tuple(c.strip() for c in cfg.data.classes.split(","))
    top = max(
        int(images.train.labels.max(initial=0)), int(images.test.labels.max(initial=0))
    )
    if top >= len(names):
        raise DataError(
            f"site {images.name}: label {top} found but data.classes names "
            f"{len(names)} classes ({cfg.data.classes}); list one name per label"
        )
    return names
