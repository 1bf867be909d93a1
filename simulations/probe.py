"""The teacher's ceiling: a pooled linear probe of its frozen features.

    python -m simulations.probe --experiment simulations/experiments/br35h_proxy.yaml \
        [--seeds 0 1] [--lam 1.0] [--augment flip|acquisition] [--variants 8]

For each seed this trains (or reuses) the experiment's PROXY teacher, computes
its features of every site's training images (as the sites hold them: label
skew and scanner profile), fits the closed-form ridge head on the union of
those features (the head a federation computes from summed statistics,
`common/models/ridge.py`), and scores it on the validation split (to choose
by) and the global test split (to report). The per-site probes show how far
a site alone gets. Nothing here trains a student.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import numpy as np

from common.config import ExperimentConfig
from common.data.sites import partition_sites
from common.data.sources import load_dataset
from common.data.views import decode_size
from common.distill.features import cached_features
from common.errors import FedKDError
from common.metrics import summarize
from common.models import ridge
from common.models.teacher import load_teacher

log = logging.getLogger(__name__)


def _features(cfg: ExperimentConfig, images: np.ndarray) -> np.ndarray:
    """Unaugmented teacher features (N, D), through the sites' feature cache."""
    feats, _ = cached_features(
        cfg.teacher, images, 1, cfg.teacher.cache_dir, lambda: load_teacher(cfg.teacher)
    )
    return feats[0].astype(np.float64)


def _score(w: np.ndarray, b: np.ndarray, feats: np.ndarray, labels: np.ndarray,
           scale: float) -> dict[str, float]:
    logits = scale * (feats @ w.T + b)
    p = np.exp(logits - logits.max(1, keepdims=True))
    return summarize(labels, p / p.sum(1, keepdims=True), float("nan"))


def probe(cfg: ExperimentConfig, lam: float) -> dict[str, dict[str, float]]:
    """Pooled and per-site ridge probes of cfg's teacher: val and global-test scores."""
    size = decode_size(cfg.data.image_size, cfg.teacher.image_size)
    ds = load_dataset(cfg.data.source, size, cfg.data.cache_dir, seed=cfg.train.seed,
                      val_fraction=cfg.data.val_fraction,
                      test_fraction=cfg.data.test_fraction)
    sites = partition_sites(ds, cfg.partition, cfg.train.seed)
    k = ds.num_classes
    stats = [ridge.site_stats(_features(cfg, s.train.images), s.train.labels, k)
             for s in sites]
    val_x, test_x = _features(cfg, ds.val.images), _features(cfg, ds.test.images)
    out = {}
    for name, st in [("pooled", ridge.sum_stats(stats)),
                     *[(s.name, st) for s, st in zip(sites, stats, strict=True)]]:
        try:
            w, b = ridge.solve(st, lam)
        except ValueError as err:  # a site that lacks a class has no probe
            out[name] = {"error": str(err)}
            continue
        scale = ridge.fit_logit_scale(val_x @ w.T + b, ds.val.labels)
        out[name] = {
            **{f"val_{m}": v for m, v in
               _score(w, b, val_x, ds.val.labels, scale).items()},
            **{f"test_{m}": v for m, v in
               _score(w, b, test_x, ds.test.labels, scale).items()},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: probe the experiment's proxy teacher at each seed; print JSON lines."""
    from simulations.harness import load_experiment, proxies, proxy_config

    p = argparse.ArgumentParser(prog="python -m simulations.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--augment")
    p.add_argument("--variants", type=int)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        exp = load_experiment(args.experiment)
        exp.seeds = args.seeds or exp.seeds
        for key in ("augment", "variants"):
            if getattr(args, key) is not None:
                exp.proxy_teacher = {**(exp.proxy_teacher or {}),
                                     key: getattr(args, key)}
        per_seed = proxies(exp, {})
        for seed in exp.seeds:
            cfg = proxy_config(exp, per_seed.get(seed, {}), seed)
            res = probe(cfg, args.lam)
            print(json.dumps({"seed": seed, "proxy": exp.proxy_teacher,
                              "lam": args.lam, "probe": res}), flush=True)
    except FedKDError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
