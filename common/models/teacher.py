"""The frozen teacher: a timm backbone that turns uint8 images into pooled features.

The teacher never trains and never leaves the site: it is always in eval mode
with gradients off, and its input normalisation comes from the backbone's own
pretrained config.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.config import TeacherConfig
from common.errors import DataError, ModelError
from common.models.student import check_arch, count_params
from common.models.weights import (
    hub_error,
    load_file_weights,
    parse_weights_spec,
    state_dict_sha256,
)

log = logging.getLogger(__name__)


def patch_size_of(model: nn.Module) -> int | None:
    """The (square) patch size of a ViT-style model, None for CNNs."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        return None
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def _check_image_size(model: nn.Module, arch: str, size: int) -> None:
    patch = patch_size_of(model)
    if patch is None or size % patch == 0:
        return
    lower = size // patch * patch
    valid = [v for v in (lower, lower + patch) if v > 0]
    raise ModelError(
        f"teacher.image_size={size} is not a multiple of the patch size {patch} of "
        f"{arch}; use {' or '.join(str(v) for v in valid)}"
    )


class FrozenTeacher(nn.Module):
    """A frozen timm backbone (num_classes=0) that maps images to pooled features."""

    def __init__(
        self,
        model: nn.Module,
        *,
        arch: str,
        weights_source: str,
        weights_spec: str,
        image_size: int,
        meta: dict | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.arch = arch
        self.weights_source = weights_source
        self.weights_spec = weights_spec
        self.image_size = int(image_size)
        self.meta = dict(meta or {})
        self.feature_dim = int(model.num_features)
        self.patch_size = patch_size_of(model)
        from timm.data import resolve_data_config  # timm only once a model exists

        data_cfg = resolve_data_config({}, model=model)
        self.mean = tuple(float(v) for v in data_cfg["mean"])
        self.std = tuple(float(v) for v in data_cfg["std"])
        self.in_chans = int(getattr(model, "in_chans", 0) or len(self.mean))
        self.register_buffer(
            "_mean", torch.tensor(self.mean).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "_std", torch.tensor(self.std).view(1, -1, 1, 1), persistent=False
        )
        self._checksum: str | None = None
        super().train(False)
        super().requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Stay in eval mode whatever is asked (the teacher is frozen)."""
        if mode:
            log.debug("FrozenTeacher.train(True) ignored: the teacher stays in eval")
        return super().train(False)

    def requires_grad_(self, requires_grad: bool = True) -> FrozenTeacher:
        """Keep gradients off whatever is asked (the teacher is frozen)."""
        return super().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of normalised (N, C, image_size, image_size) input."""
        return self.model(x)

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 NHWC -> normalised float NCHW at image_size, channels_last."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        x = x.to(self._mean.device, torch.float32).div_(255.0)
        if x.shape[1] == 1 and self.in_chans == 3:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        x = (x - self._mean) / self._std
        return x.contiguous(memory_format=torch.channels_last)

    def features(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """float32 (N, feature_dim) features of uint8 NHWC images (C in {1, 3})."""
        if (
            not isinstance(images, np.ndarray)
            or images.dtype != np.uint8
            or images.ndim != 4
            or images.shape[-1] not in (1, 3)
        ):
            got = (
                f"{images.dtype} {images.shape}"
                if isinstance(images, np.ndarray)
                else type(images).__name__
            )
            raise DataError(
                f"teacher features need uint8 (N, H, W, C) images with C in {{1, 3}}, "
                f"got {got}; convert the images before featurising"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; must be >= 1")
        out = [np.zeros((0, self.feature_dim), np.float32)]
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = self.preprocess(images[start : start + batch_size])
                out.append(self.model(x).float().cpu().numpy())
        return np.concatenate(out)

    def weights_checksum(self) -> str:
        """sha256 of the backbone's state dict, computed once."""
        if self._checksum is None:
            self._checksum = state_dict_sha256(self.model)
        return self._checksum

    def describe(self) -> dict[str, Any]:
        """Plain facts about the teacher for model cards and logs."""
        info: dict[str, Any] = {
            "arch": self.arch,
            "weights_source": self.weights_source,
            "weights_spec": self.weights_spec,
            "image_size": self.image_size,
            "feature_dim": self.feature_dim,
            "patch_size": self.patch_size,
            "params": count_params(self.model),
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.meta:
            info["meta"] = dict(self.meta)
        return info


def _create(
    arch: str, image_size: int, pretrained: bool, with_img_size: bool, kwargs: dict
) -> nn.Module:
    from common.models.student import _timm  # timm only when a teacher is built

    if with_img_size:
        kwargs = dict(kwargs, img_size=image_size)
    return _timm().create_model(arch, pretrained=pretrained, num_classes=0, **kwargs)


def _build(arch: str, image_size: int, kwargs: dict) -> tuple[nn.Module, bool]:
    """Random-init backbone and whether it took `img_size` (ViTs do, CNNs don't)."""
    try:
        return _create(arch, image_size, False, True, kwargs), True
    except TypeError as err:
        if "img_size" not in str(err):
            raise ModelError(
                f"cannot build teacher.arch={arch!r}: {err}; check the model kwargs"
            ) from err
    return _create(arch, image_size, False, False, kwargs), False


def load_teacher(cfg: TeacherConfig, **model_kwargs: Any) -> FrozenTeacher:
    """Build the frozen teacher named by `cfg` (extra kwargs go to timm)."""
    check_arch(cfg.arch, "teacher.arch")
    source, path = parse_weights_spec(cfg.weights)
    # Seeded init: a random-init teacher is then the same network in every
    # process (so sites share it and its cached features); other sources
    # overwrite these weights anyway.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, takes_size = _build(cfg.arch, cfg.image_size, model_kwargs)
    _check_image_size(model, cfg.arch, cfg.image_size)
    meta: dict = {}
    if source == "hub":
        url = (getattr(model, "pretrained_cfg", None) or {}).get("url") or None
        try:
            model = _create(cfg.arch, cfg.image_size, True, takes_size, model_kwargs)
        except Exception as err:  # network, cache and shape errors alike
            raise hub_error(cfg.arch, err, url) from err
    elif source == "file":
        assert path is not None
        source, meta = load_file_weights(model, path, cfg.arch)
    else:
        log.warning(
            "teacher %s is RANDOM-INIT (teacher.weights=random): its soft "
            "targets are meaningless; use it for pipeline runs only",
            cfg.arch,
        )
    teacher = FrozenTeacher(
        model,
        arch=cfg.arch,
        weights_source=source,
        weights_spec=cfg.weights,
        image_size=cfg.image_size,
        meta=meta,
    )
    log.info(
        "teacher %s (%s) at %d px: %d-d features, %d params",
        cfg.arch,
        source,
        cfg.image_size,
        teacher.feature_dim,
        count_params(model),
    )
    return teacher


__all__ = ["FrozenTeacher", "load_teacher", "patch_size_of"]
