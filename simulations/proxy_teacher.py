"""A proxy teacher for offline evidence, trained on a public pool no site gets.

DINOv2 weights cannot be downloaded on an air-gapped machine, and a random
teacher knows nothing. To show what distillation does offline, this trains a
timm backbone (default `resnet18`) on `partition.public_pool_fraction` of the
training split — images no site receives — and saves it as a teacher
checkpoint marked `proxy`, loaded through the ordinary `teacher.weights=file:`
path. Every output of a run with it says PROXY.

    python -m simulations.proxy_teacher --config <experiment.yaml> [--set ...]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from common.config import ExperimentConfig, TeacherConfig, load_config
from common.data.shift import reacquire
from common.data.sites import public_pool
from common.data.sources import load_dataset
from common.data.views import decode_size
from common.errors import FedKDError
from common.models.teacher import load_teacher
from common.models.weights import save_teacher_checkpoint

log = logging.getLogger(__name__)


AUGMENTS = ("flip", "acquisition")


def proxy_path(cfg: ExperimentConfig, arch: str, epochs: int,
               augment: str = "flip", variants: int = 0) -> Path:
    """Cache location of the proxy for (data, pool, size, arch, epochs, seed, aug)."""
    key = (f"{cfg.data.source}|{cfg.partition.public_pool_fraction}|"
           f"{cfg.teacher.image_size}|{arch}|{epochs}|{cfg.train.seed}")
    if augment != "flip":  # flip-only proxies keep their cached names
        key += f"|{augment}|{variants}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cfg.data.cache_dir).expanduser() / "proxy" / f"{arch}-{digest}.pt"


def _preprocessor(arch: str, image_size: int):
    """The frozen-teacher wrapper, for the exact input pipeline the sites use.

    Only its preprocessing is used, so its RANDOM-INIT warning (meant for runs
    that distil from such a teacher) would mislead here: it is silenced.
    """
    teacher_log = logging.getLogger("common.models.teacher")
    level = teacher_log.level
    teacher_log.setLevel(logging.ERROR)
    try:
        return load_teacher(TeacherConfig(arch=arch, weights="random",
                                          image_size=image_size))
    finally:
        teacher_log.setLevel(level)


def _views(prep, images, augment: str, variants: int, seed: int) -> torch.Tensor:
    """(1 + variants, N, C, H, W) inputs: the pool, then re-acquired copies.

    `acquisition` augments with the scanner family at random strengths (gamma,
    contrast, blur, noise, resampling), so that the proxy, like a foundation
    model trained under heavy augmentation, does not move with the scanner.
    """
    copies = [images]
    if augment == "acquisition":
        rng = np.random.default_rng([seed, 0xAC0])
        copies += [reacquire(images, rng) for _ in range(variants)]
    return torch.stack([prep.preprocess(c) for c in copies])


def _fit(backbone: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor,
         epochs: int, lr: float, seed: int, arch: str) -> None:
    """AdamW with a one-cycle schedule; a random view and a random flip per item."""
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * ((len(y) + 31) // 32))
    gen = torch.Generator().manual_seed(seed)
    backbone.train()
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        total = 0.0
        for start in range(0, len(y), 32):
            idx = order[start : start + 32]
            if len(idx) < 2:
                continue
            if len(x) > 1:  # augmented: one random variant per item
                xb = x[torch.randint(len(x), (len(idx),), generator=gen), idx]
            else:
                xb = x[0, idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(head(backbone(xb)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        log.info("proxy %s epoch %d/%d: loss %.4f", arch, epoch + 1, epochs,
                 total / len(y))
    backbone.eval()


def train_proxy(cfg: ExperimentConfig, arch: str = "resnet18", epochs: int = 15,
                lr: float = 1e-3, augment: str = "flip",
                variants: int = 8) -> tuple[Path, dict]:
    """Train (or reuse) the proxy teacher; return its file and a summary."""
    if augment not in AUGMENTS:
        raise FedKDError(f"proxy_teacher.augment={augment!r} is not valid; choose "
                         f"one of: {', '.join(AUGMENTS)}")
    path = proxy_path(cfg, arch, epochs, augment, variants)
    if path.is_file():
        return path, {"path": str(path), "reused": True}
    if cfg.partition.public_pool_fraction <= 0:
        raise FedKDError("a proxy teacher needs a public pool: set "
                         "partition.public_pool_fraction (e.g. 0.2)")
    size = decode_size(cfg.data.image_size, cfg.teacher.image_size)
    ds = load_dataset(cfg.data.source, size, cfg.data.cache_dir, seed=cfg.train.seed,
                      val_fraction=cfg.data.val_fraction,
                      test_fraction=cfg.data.test_fraction)
    pool = public_pool(ds, cfg.partition.public_pool_fraction, cfg.train.seed)
    prep = _preprocessor(arch, cfg.teacher.image_size)
    x = _views(prep, pool.images, augment, variants, cfg.train.seed)
    y = torch.from_numpy(pool.labels)
    torch.manual_seed(cfg.train.seed)
    backbone = timm.create_model(arch, pretrained=False, num_classes=0)
    head = nn.Linear(backbone.num_features, ds.num_classes)
    t0 = time.perf_counter()
    _fit(backbone, head, x, y, epochs, lr, cfg.train.seed, arch)
    with torch.inference_mode():
        val_x = prep.preprocess(ds.val.images)
        val_acc = float((head(backbone(val_x)).argmax(1).numpy() == ds.val.labels)
                        .mean()) if len(ds.val) else float("nan")
    meta = {
        "proxy": True,
        "arch": arch,
        "trained_on": (f"{cfg.data.source} public pool: {len(y)} images "
                       f"({cfg.partition.public_pool_fraction:g} of train), "
                       f"seed {cfg.train.seed}; no site receives them"),
        "epochs": epochs,
        "augment": augment if augment == "flip" else f"{augment} x{variants}",
        "image_size": cfg.teacher.image_size,
        "val_acc_with_pool_head": val_acc,
    }
    save_teacher_checkpoint(backbone, path, meta)
    log.info("proxy teacher saved to %s (val acc %.3f)", path, val_acc)
    return path, dict(meta, path=str(path), seconds=time.perf_counter() - t0,
                      reused=False)


def main(argv: list[str] | None = None) -> int:
    """CLI: train the proxy teacher for an experiment config and print its path."""
    p = argparse.ArgumentParser(prog="python -m simulations.proxy_teacher")
    p.add_argument("--config", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--augment", default="flip", choices=AUGMENTS)
    p.add_argument("--variants", type=int, default=8)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        path, summary = train_proxy(cfg, args.arch, args.epochs,
                                    augment=args.augment, variants=args.variants)
    except FedKDError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"proxy teacher: {path}")
    print({k: v for k, v in summary.items() if k != "path"})
    return 0


if __name__ == "__main__":
    sys.exit(main())

