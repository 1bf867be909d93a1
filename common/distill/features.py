"""Teacher features of images and their fixed views, from the on-disk cache.

The one place where "look the features up, build the teacher only on a miss"
lives: sites (client/site/prepared.py) and the server's teacher probe on the global
test (server/evaluation.py) both call `cached_features`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from common.data.views import apply_view
from common.distill.cache import FeatureCache, teacher_cache_key


def cached_features(
    teacher_cfg: Any,
    images: np.ndarray,
    views: int,
    cache_root: str | Path,
    build: Callable[[], Any],
) -> tuple[np.ndarray, dict]:
    """Features (V, N, D) of `views` fixed views of `images`, and cache facts.

    `build()` returns the frozen teacher; it is called at most once, and only
    when some image is not cached yet (or the cache lacks the teacher's
    description). The cache key comes from `teacher_cfg` (a TeacherConfig)
    alone; the description comes from the cache's `teacher.json`.
    """
    root = Path(cache_root).expanduser()
    built: list[Any] = []

    def teacher() -> Any:
        if not built:
            built.append(build())
        return built[0]

    def compute(imgs: np.ndarray) -> np.ndarray:
        return teacher().features(imgs, batch_size=teacher_cfg.batch_size)

    out, hits, misses, described = [], 0, 0, None
    for v in range(views):
        cache = FeatureCache(root, teacher_cache_key(teacher_cfg, v, memo_root=root))
        feats, stats = cache.get_or_compute(apply_view(images, v), compute)
        out.append(feats)
        hits, misses = hits + stats.hits, misses + stats.misses
        described = cache.read_info()
        if described is None or built:  # first build, or check it matches
            # cached rows without a description (crash, old run) need the build
            cache.write_info(teacher().describe())
            described = cache.read_info()
    info = dict(described or {}, cache_hits=hits, cache_misses=misses)
    info["teacher_built"] = bool(built)
    return np.stack(out), info


__all__ = ["cached_features"]
