"""A prepared site: its images as student tensors on its device, plus teacher features.

`prepare_site` turns a node's `SiteImages` into a `PreparedSite` once per
process (`SiteCache.site` memoises it); `site_info` is what the handshake
tells the server about it. Nothing here is ever serialised or sent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.site.teacher import site_device, uses_teacher
from common.config import ExperimentConfig
from common.data.experiment import class_names, site_images
from common.data.sites import SiteImages
from common.data.types import Dataset
from common.data.views import apply_view, to_student_tensor
from common.distill.features import cached_features
from common.models.teacher import FrozenTeacher
from common.secure_sum import head_sums_secured
from common.site_info import SiteInfo
from common.timing import phase
from common.train import LocalData


@dataclass
class PreparedSite:
    """One hospital's prepared data. Never serialised, never sent."""

    name: str
    classes: tuple[str, ...]
    channels: int
    train: LocalData
    test_x: torch.Tensor
    test_y: torch.Tensor
    feats_train: torch.Tensor | None  # (V, N, D) teacher features of train views
    feats_test: torch.Tensor | None  # (N, D) teacher features of the test images
    teacher_info: dict
    class_counts: list[int]
    # where the student trains and is evaluated; x/y tensors already live there
    device: torch.device = torch.device("cpu")
    # a deployed site (its own data source), not a simulated partition
    deployed: bool = False


def prepare_site(
    cfg: ExperimentConfig,
    node_config: Mapping[str, Any],
    dataset: Callable[[ExperimentConfig], Dataset],
    teacher: Callable[[], FrozenTeacher],
) -> PreparedSite:
    """Decode, shift, view and featurise one site's images.

    `dataset` gives the experiment's dataset (simulation) and `teacher()` the
    frozen teacher on a feature-cache miss; `SiteCache.site` passes its memos.
    """
    images = site_images(cfg, node_config, dataset)
    classes = class_names(cfg, images)
    device = site_device(cfg)
    cache_root = node_config.get("cache-dir", cfg.teacher.cache_dir)
    # Every method trains on the same fixed views, so augmentation is equal
    # across methods; the teacher's targets are cached for exactly these views.
    views = cfg.teacher.views if cfg.train.augment else 1
    size = cfg.data.image_size
    x = torch.stack(
        [
            to_student_tensor(apply_view(images.train.images, v), size)
            for v in range(views)
        ]
    )
    with phase("features"):  # read from the cache; the teacher runs on a miss
        feats_train, feats_test, info = _features(
            cfg, images, views, cache_root, teacher
        )
    n_cls = max(len(classes), int(images.train.labels.max(initial=0)) + 1)
    # Moved to the device once here, never per batch (a no-op on the CPU).
    return PreparedSite(
        name=images.name,
        classes=classes,
        channels=int(images.train.images.shape[-1]),
        train=LocalData(
            x=x.to(device),
            y=_labels(images.train.labels).to(device),
            labelled=torch.from_numpy(images.labelled.astype(bool)).to(device),
        ),
        test_x=to_student_tensor(images.test.images, size).to(device),
        test_y=_labels(images.test.labels).to(device),
        feats_train=feats_train,
        feats_test=feats_test,
        teacher_info=info,
        class_counts=np.bincount(images.train.labels, minlength=n_cls).tolist(),
        device=device,
        deployed="data-source" in node_config,
    )


def _features(
    cfg: ExperimentConfig,
    images: SiteImages,
    views: int,
    cache_root: str | Path,
    teacher: Callable[[], FrozenTeacher],
) -> tuple[torch.Tensor | None, torch.Tensor | None, dict]:
    """(train-view features, test features, cache facts); no features without KD."""
    if not uses_teacher(cfg):
        return None, None, {"used": False}
    ft, info = cached_features(
        cfg.teacher, images.train.images, views, cache_root, teacher
    )
    fs, _ = cached_features(cfg.teacher, images.test.images, 1, cache_root, teacher)
    info["used"] = True
    return torch.from_numpy(ft), torch.from_numpy(fs[0]), info


def _labels(labels: np.ndarray) -> torch.Tensor:
    """int64 label tensor (on the CPU) of a label array."""
    return torch.from_numpy(labels.astype(np.int64))


def site_info(cfg: ExperimentConfig, site: PreparedSite) -> SiteInfo:
    """Scalar facts about the site for the server's handshake (no data)."""
    teacher = site.teacher_info
    # the site's prevalence, exactly; sent only when the config allows it
    counts = tuple(int(c) for c in site.class_counts)
    return SiteInfo(
        name=site.name,
        classes=tuple(site.classes),
        num_train=site.train.n,
        num_test=int(site.test_y.shape[0]),
        num_labelled=int(site.train.labelled.sum()),
        channels=site.channels,
        teacher_used=bool(teacher.get("used", False)),
        teacher_weights=str(teacher.get("weights_source", "none")),
        teacher_feature_dim=int(teacher.get("feature_dim", 0)),
        deployed=bool(site.deployed),
        class_counts=counts if cfg.privacy.share_class_counts else None,
        teacher_feature_log2=_feature_log2(site) if head_sums_secured(cfg) else None,
    )


def _feature_log2(site: PreparedSite) -> int | None:
    """e with |feature| <= 2^e over the labelled training views (None: no teacher).

    Only this power of two leaves the site: the server's scale for the sum."""
    if site.feats_train is None:
        return None
    labelled = site.train.labelled.cpu()
    peak = float(site.feats_train[:, labelled].abs().max()) if labelled.any() else 0.0
    return math.ceil(math.log2(peak)) if peak > 0 else 0


__all__ = ["PreparedSite", "prepare_site", "site_info"]
