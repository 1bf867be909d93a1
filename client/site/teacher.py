"""The site's teacher: whether this experiment needs it, where it runs, its build.

Knows nothing about Flower or the cache object: `SiteCache.teacher` memoises
`build_teacher` per process, and the features come from the shared feature
cache (`common.distill.features.cached_features`), which calls the teacher
only on a miss.
"""

from __future__ import annotations

import torch

from common.config import ExperimentConfig
from common.device import setup_device
from common.models.teacher import FrozenTeacher, load_teacher


def uses_teacher(cfg: ExperimentConfig) -> bool:
    """Whether this experiment needs teacher outputs at the sites."""
    return cfg.distill.alpha < 1.0 or cfg.distill.feature_weight > 0


def site_device(cfg: ExperimentConfig) -> torch.device:
    """The device `run.device` resolves to here (CPU threads set on the way)."""
    return setup_device(cfg.run.device, cfg.train.num_threads)


def build_teacher(cfg: ExperimentConfig, device: torch.device) -> FrozenTeacher:
    """The frozen teacher named by `cfg.teacher`, on `device` (not memoised)."""
    teacher = load_teacher(cfg.teacher)
    return teacher.to(device) if device.type != "cpu" else teacher
