"""Checks and one-off work done before the engine starts.

Loading the data and building the sites here turns bad input into one clear
error before any worker starts; filling the teacher-feature cache here pays
for the teacher once, batched on all cores, through the same cache the sites
read (`client.site.teacher_features`).
"""

from __future__ import annotations

import logging

from tqdm import tqdm

from client import site as site_lib
from common.config import ExperimentConfig
from common.data.sites import build_sites
from common.models.student import create_student

log = logging.getLogger(__name__)


def preflight(cfg: ExperimentConfig, progress: bool = True) -> str:
    """Validate data and sites, fill the teacher cache; return a summary line."""
    ds = site_lib.dataset_for(cfg)
    sites = build_sites(ds, cfg.partition, cfg.train.seed)
    # A bad student name fails here, before any run folder exists.
    create_student(cfg.student.arch, ds.num_classes, ds.channels)
    sizes = ", ".join(f"{s.name}:{len(s.train)}/{len(s.test)}" for s in sites[:8])
    more = f" (+{len(sites) - 8} more)" if len(sites) > 8 else ""
    teacher_line = "teacher: not used"
    if site_lib.uses_teacher(cfg):
        teacher = site_lib.teacher_for(cfg)
        views = cfg.teacher.views
        bar = tqdm(sites, desc="teacher cache", unit="site", disable=not progress)
        misses = 0
        for s in bar:
            _, info = site_lib.teacher_features(
                cfg, s.train.images, views, cfg.teacher.cache_dir
            )
            _, info_t = site_lib.teacher_features(
                cfg, s.test.images, 1, cfg.teacher.cache_dir
            )
            misses += info["cache_misses"] + info_t["cache_misses"]
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
