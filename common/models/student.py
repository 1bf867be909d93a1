"""Student factory: any timm model, plus this project's small CNNs in timm's registry.

The `fedkd_cnn_*` models (`common.models.cnn`) are built directly, without
importing timm: timm pulls in torchvision (about 2.5 s), which every Flower
message would pay. They are registered with timm as soon as timm is loaded
(here, or by anyone before this module), so `timm.create_model("fedkd_cnn_small")`
still works and builds the same network.
"""

from __future__ import annotations

import difflib
import logging
import sys

import torch
from torch import nn

from common.errors import ModelError
from common.models.cnn import VARIANTS, FedKDCNN, _cfg, build_cnn

log = logging.getLogger(__name__)

_REGISTERED = False


def _timm():
    """timm, imported on first use, with the project's CNNs registered."""
    import timm
    from timm.models import generate_default_cfgs, register_model

    global _REGISTERED, default_cfgs
    if not _REGISTERED:
        # register_model reads this module's `default_cfgs` for the cfgs
        default_cfgs = generate_default_cfgs({name: _cfg() for name in VARIANTS})
        register_model(fedkd_cnn_small)
        register_model(fedkd_cnn_tiny)
        _REGISTERED = True
    return timm


def close_model_names(name: str, n: int = 5) -> list[str]:
    """timm model names that look like `name` (for error messages)."""
    base = name.split(".", 1)[0]
    # Substring matches on each '_'-separated part catch family names ("dinov2").
    parts = [p for p in base.split("_") if len(p) >= 3]
    timm = _timm()
    pool = set(timm.list_models()) | set(timm.list_models(pretrained=True))
    close = difflib.get_close_matches(name, sorted(pool), n=n, cutoff=0.6)
    for part in parts:
        if len(close) >= n:
            break
        for hit in timm.list_models(f"*{part}*"):
            if hit not in close and len(close) < n:
                close.append(hit)
    return close[:n]


def check_arch(name: str, key: str) -> None:
    """Raise ModelError naming config `key` when timm has no model called `name`."""
    if name in VARIANTS:
        return
    if isinstance(name, str) and name and _timm().is_model(name):
        return
    close = close_model_names(str(name))
    hint = ", ".join(close) if close else "see timm.list_models()"
    raise ModelError(f"unknown model {key}={name!r}; close matches: {hint}")


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (optionally only trainable) parameters of `model`."""
    return sum(
        p.numel() for p in model.parameters() if p.requires_grad or not trainable_only
    )


def _create(variant: str, pretrained: bool, **kwargs) -> FedKDCNN:
    from timm.models import build_model_with_cfg

    return build_model_with_cfg(FedKDCNN, variant, pretrained, **kwargs)


def fedkd_cnn_small(pretrained: bool = False, **kwargs) -> FedKDCNN:
    """4-stage CNN, channels 32-64-128-256 (~0.39M params)."""
    args = dict(VARIANTS["fedkd_cnn_small"], **kwargs)
    return _create("fedkd_cnn_small", pretrained, **args)


def fedkd_cnn_tiny(pretrained: bool = False, **kwargs) -> FedKDCNN:
    """4-stage CNN, channels 16-32-64-96 (~80k params)."""
    args = dict(VARIANTS["fedkd_cnn_tiny"], **kwargs)
    return _create("fedkd_cnn_tiny", pretrained, **args)


def create_student(arch: str, num_classes: int, in_chans: int) -> nn.Module:
    """Build a randomly initialised student `arch` (timm name or fedkd_cnn_*)."""
    if arch in VARIANTS:  # no timm import: the network timm would build
        model = build_cnn(arch, num_classes, in_chans)
        log.debug("student %s: %d params", arch, count_params(model))
        return model
    check_arch(arch, "student.arch")
    try:
        model = _timm().create_model(
            arch, pretrained=False, num_classes=num_classes, in_chans=in_chans
        )
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelError(
            f"cannot build student.arch={arch!r} with num_classes={num_classes}, "
            f"in_chans={in_chans}: {first}; choose another timm model"
        ) from err
    log.debug("student %s: %d params", arch, count_params(model))
    return model


def student_features(
    model: nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled pre-logit features, logits) of a timm-style model in one pass."""
    pre = model.forward_head(model.forward_features(x), pre_logits=True)
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:  # not a timm model: run the head twice
        return pre, model.forward_head(model.forward_features(x))
    return pre, get_classifier()(pre)


@torch.inference_mode()
def student_outputs(
    model: nn.Module, x: torch.Tensor, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled pre-logit features, logits) of `model` on `x`, batched, eval mode."""
    model.eval()
    feats, logits = [], []
    for i in range(0, len(x), batch_size):
        pre, out = student_features(model, x[i : i + batch_size])
        feats.append(pre.float().cpu())
        logits.append(out.float().cpu())
    if not feats:
        width = int(getattr(model, "num_features", 0))
        classes = int(getattr(model, "num_classes", 0))
        return torch.empty(0, width), torch.empty(0, classes)
    return torch.cat(feats), torch.cat(logits)


if "timm" in sys.modules:  # timm already loaded: make the CNNs visible to it now
    _timm()

__all__ = [
    "FedKDCNN",
    "check_arch",
    "close_model_names",
    "count_params",
    "create_student",
    "fedkd_cnn_small",
    "fedkd_cnn_tiny",
    "student_features",
    "student_outputs",
]
