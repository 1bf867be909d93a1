"""The site's teacher: whether this experiment needs it, where it runs, its build.

Knows nothing about Flower or the cache object: `SiteCache.teacher` memoises
`build_teacher` per process, and the features come from the shared feature
cache (`common.distill.features.cached_features`), which calls the teacher
only on a miss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from common.config import ExperimentConfig
from common.device import setup_device
from common.errors import ConfigError
from common.models.teacher import FrozenTeacher, load_teacher


def uses_teacher(cfg: ExperimentConfig) -> bool:
    """Whether this experiment needs teacher outputs at the sites."""
    return cfg.distill.alpha < 1.0 or cfg.distill.feature_weight > 0


def site_device(cfg: ExperimentConfig) -> torch.device:
    """The device `run.device` resolves to here (CPU threads set on the way)."""
    return setup_device(cfg.run.device, cfg.train.num_threads)


def site_threads(
    cfg: ExperimentConfig, node_config: Mapping[str, Any]
) -> ExperimentConfig:
    """`cfg` with `train.num_threads` from the node config's `num-threads`, if set.

    The CPUs belong to the site, not to the run: a SuperNode started with
    `deploy/launch.py supernode --num-threads N` (SuperNodes sharing one
    machine) trains on N threads whatever the experiment says; unset or 0
    leaves the experiment's value.
    """
    raw = node_config.get("num-threads")
    if raw is None or str(raw).strip() in ("", "0"):
        return cfg
    try:
        n = int(str(raw))
    except ValueError:
        n = -1
    if not 1 <= n <= 256:
        raise ConfigError(
            f"node config num-threads={raw!r} is not an integer in [0, 256]; "
            "restart the SuperNode with --num-threads <CPU threads> (0 = all)"
        )
    return replace(cfg, train=replace(cfg.train, num_threads=n))


def build_teacher(cfg: ExperimentConfig, device: torch.device) -> FrozenTeacher:
    """The frozen teacher named by `cfg.teacher`, on `device` (not memoised)."""
    teacher = load_teacher(cfg.teacher)
    return teacher.to(device) if device.type != "cpu" else teacher
