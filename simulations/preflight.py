"""Checks and one-off work done before the engine starts.

Loading the data and building the sites here turns bad input into one clear
error before any worker starts; filling the teacher-feature cache here pays
for the teacher once, batched on all cores, through the same feature cache the
sites read (`common.distill.features.cached_features`). The dataset and the
teacher come from the sites' per-process `site_cache`, so an in-process engine
reuses them.
"""

from __future__ import annotations

import logging

from tqdm import tqdm

from client.site import site_cache, uses_teacher
from common.config import ExperimentConfig
from common.data.sites import partition_sites
from common.distill.features import cached_features
from common.dp_sgd import check_model
from common.models.student import create_student

log = logging.getLogger(__name__)


def preflight(cfg: ExperimentConfig, progress: bool = True) -> str:
    """Validate data and sites, fill the teacher cache; return a summary line."""
    ds = site_cache.dataset(cfg)
    sites = partition_sites(ds, cfg.partition, cfg.train.seed)
    # A bad student name fails here, before any run folder exists; so does one
    # that Opacus cannot train image by image (BatchNorm) under DP-SGD.
    student = create_student(cfg.student.arch, ds.num_classes, ds.channels)
    if cfg.privacy.dp_sgd:
        check_model(student, cfg.student.arch)
    sizes = ", ".join(f"{s.name}:{len(s.train)}/{len(s.test)}" for s in sites[:8])
    more = f" (+{len(sites) - 8} more)" if len(sites) > 8 else ""
    teacher_line = "teacher: not used"
    if uses_teacher(cfg):
        teacher = site_cache.teacher(cfg)
        views = cfg.teacher.views
        bar = tqdm(sites, desc="teacher cache", unit="site", disable=not progress)
        misses = 0
        for s in bar:
            for images, n in ((s.train.images, views), (s.test.images, 1)):
                _, info = cached_features(
                    cfg.teacher, images, n, cfg.teacher.cache_dir, lambda: teacher
                )
                misses += info["cache_misses"]
        d = teacher.describe()
        teacher_line = (
            f"teacher: {d['arch']} @ {cfg.teacher.image_size}px, weights "
            f"{d['weights_source'].upper()}, {misses} images featurised "
            "(others from cache)"
        )
    return (
        f"data: {ds.name} ({', '.join(ds.classes)}), {len(sites)} sites "
        f"[train/test] {sizes}{more}; global test {len(ds.test)}\n{teacher_line}"
    )
