"""Teacher cache: a federated KD round with cached teacher features vs recomputed.

    python -m benchmarks.teacher_cache [--quick]

Drives the sites' own functions (`client.site.site_cache.site`, `train_round`) for
4 sites: (A) the round as the ClientApp runs it, features from the cache;
(B) the same round after recomputing every site's teacher features. A and B
alternate over several rounds in one process; the ratio is taken per round.
"""

from __future__ import annotations

import shutil
import statistics
import time

import torch
from flwr.app import RecordDict

from benchmarks._util import merge, parser, quick_overrides, table
from client.site import site_cache, train_round
from common.config import load_config
from common.data.experiment import site_images
from common.serialization import pack
from server.federation import initial_arrays


def _config(quick: bool, work, cache):
    """Four sites, one teacher view, the teacher cache in a fresh folder."""
    over = (
        quick_overrides(work)
        if quick
        else [
            "data.source=br35h",
            "data.image_size=64",
            "teacher.arch=vit_small_patch14_dinov2.lvd142m",
            "teacher.image_size=112",
            "teacher.weights=random",
        ]
    )
    # one view: mode B below recomputes the features of the unaugmented images
    return load_config(None, [*over, "partition.sites=4", "teacher.views=1",
                              f"teacher.cache_dir={cache}"])


def _time_rounds(cfg, sites, raw, teacher, arrays, rounds: int) -> tuple[list, list]:
    """Seconds per round with cached features (A) and recomputed ones (B)."""
    a_times, b_times = [], []
    for rnd in range(1, rounds + 1):
        for mode in ("A", "B"):
            t = time.perf_counter()
            for s, r in zip(sites, raw, strict=True):
                if mode == "B":  # what a site would pay without the cache
                    feats = teacher.features(r.train.images, cfg.teacher.batch_size)
                    s.feats_train = torch.from_numpy(feats)[None]
                train_round(cfg, s, arrays, RecordDict(), rnd, 2)
            (a_times if mode == "A" else b_times).append(time.perf_counter() - t)
    return a_times, b_times


def run(quick: bool, out, work) -> dict:
    """Measure; merge cache_speedup and cache_fill_s into `out`."""
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "teacher-cache-bench"
    shutil.rmtree(cache, ignore_errors=True)
    cfg = _config(quick, work, cache)
    t0 = time.perf_counter()
    sites = [
        site_cache.site(cfg, {"partition-id": i, "num-partitions": 4})
        for i in range(4)
    ]
    fill = time.perf_counter() - t0
    teacher = site_cache.teacher(cfg)
    print(
        f"teacher {teacher.describe()['arch']}: weights={cfg.teacher.weights} "
        "(RANDOM-INIT: timing only, its outputs mean nothing)",
        flush=True,
    )
    arrays = pack(initial_arrays(cfg, 2, sites[0].channels, 0))
    raw = [
        site_images(cfg, {"partition-id": i, "num-partitions": 4}, site_cache.dataset)
        for i in range(4)
    ]
    rounds = 2 if quick else 3
    a_times, b_times = _time_rounds(cfg, sites, raw, teacher, arrays, rounds)
    ratios = [b / a for a, b in zip(a_times, b_times, strict=True)]
    keys = {
        "cache_speedup": round(statistics.median(ratios), 2),
        "cache_fill_s": round(fill, 1),
    }
    detail = {
        "round_cached_s": a_times,
        "round_recomputed_s": b_times,
        "ratios": ratios,
        "teacher": teacher.describe()["arch"],
        "teacher_weights": "random (timing only)",
        "images": sum(len(r.train.images) for r in raw),
        "quick": quick,
    }
    merge(out, "teacher_cache", keys, detail)
    print(
        table(
            [
                ("teacher", f"{detail['teacher']} (RANDOM-INIT: timing only)"),
                ("train images / round", detail["images"]),
                ("round, cached (s)", [round(x, 2) for x in a_times]),
                ("round, recomputed (s)", [round(x, 2) for x in b_times]),
                ("speed-up (median ratio)", keys["cache_speedup"]),
                ("one-off cache fill (s)", keys["cache_fill_s"]),
            ]
        )
    )
    return keys


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    run(args.quick, args.out, args.work)
