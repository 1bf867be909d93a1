"""Student factory: any timm model, plus this project's small CNNs in timm's registry.

The `fedkd_cnn_*` models are plain conv-BN-ReLU stacks that train from scratch in
minutes on CPU at 64 px. They are registered with timm so that one factory
(`timm.create_model`) builds every student and so they expose timm's interface
(`forward_features`, `forward_head`, `num_features`, `reset_classifier`).
"""

from __future__ import annotations

import difflib
import logging

import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from common.errors import ModelError

log = logging.getLogger(__name__)


def close_model_names(name: str, n: int = 5) -> list[str]:
    """timm model names that look like `name` (for error messages)."""
    base = name.split(".", 1)[0]
    # Substring matches on each '_'-separated part catch family names ("dinov2").
    parts = [p for p in base.split("_") if len(p) >= 3]
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
    if isinstance(name, str) and name and timm.is_model(name):
        return
    close = close_model_names(str(name))
    hint = ", ".join(close) if close else "see timm.list_models()"
    raise ModelError(f"unknown model {key}={name!r}; close matches: {hint}")


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (optionally only trainable) parameters of `model`."""
    return sum(
        p.numel() for p in model.parameters() if p.requires_grad or not trainable_only
    )


def _norm(kind: str, channels: int) -> nn.Module:
    # GroupNorm by default: it keeps no running statistics, so averaging
    # weights across sites with different label and scanner mixes does not
    # average incompatible batch statistics (the FedAvg+BatchNorm failure mode).
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise ModelError(f"fedkd_cnn norm={kind!r}; use 'group' or 'batch'")


class FedKDCNN(nn.Module):
    """Conv-norm-ReLU stages, stride-2 downsampling, global average pool."""

    def __init__(
        self,
        num_classes: int = 2,
        in_chans: int = 3,
        channels: tuple[int, ...] = (32, 64, 128, 256),
        strides: tuple[int, ...] = (1, 2, 2, 2),
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        norm: str = "group",
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            log.debug("FedKDCNN ignores kwargs %s", sorted(kwargs))
        if global_pool not in ("avg", ""):
            raise ModelError(f"fedkd_cnn global_pool={global_pool!r}; use 'avg'")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.global_pool = global_pool
        layers: list[nn.Module] = []
        self.feature_info = []
        cin, reduction = in_chans, 1
        for i, (cout, stride) in enumerate(zip(channels, strides, strict=True)):
            reduction *= stride
            layers.append(
                nn.Sequential(
                    nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                    _norm(norm, cout),
                    nn.ReLU(inplace=True),
                )
            )
            self.feature_info.append(
                dict(num_chs=cout, reduction=reduction, module=f"stages.{i}")
            )
            cin = cout
        self.stages = nn.Sequential(*layers)
        self.num_features = self.head_hidden_size = cin
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(cin, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Module:
        """The final linear layer (timm interface)."""
        return self.fc

    def reset_classifier(
        self, num_classes: int, global_pool: str | None = None
    ) -> None:
        """Replace the classifier for `num_classes` outputs (timm interface)."""
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.fc = (
            nn.Linear(self.num_features, num_classes)
            if num_classes > 0
            else nn.Identity()
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled feature map (N, num_features, h, w)."""
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, dropout and classify; `pre_logits` returns the pooled features."""
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes)."""
        return self.forward_head(self.forward_features(x))


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 2,
        "input_size": (3, 64, 64),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "stages.0.0",
        "classifier": "fc",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "fedkd_cnn_small": _cfg(),
        "fedkd_cnn_tiny": _cfg(),
    }
)


def _create(variant: str, pretrained: bool, **kwargs) -> FedKDCNN:
    return build_model_with_cfg(FedKDCNN, variant, pretrained, **kwargs)


@register_model
def fedkd_cnn_small(pretrained: bool = False, **kwargs) -> FedKDCNN:
    """4-stage CNN, channels 32-64-128-256 (~0.39M params)."""
    args = dict(channels=(32, 64, 128, 256), strides=(1, 2, 2, 2))
    return _create("fedkd_cnn_small", pretrained, **dict(args, **kwargs))


@register_model
def fedkd_cnn_tiny(pretrained: bool = False, **kwargs) -> FedKDCNN:
    """4-stage CNN, channels 16-32-64-96 (~80k params)."""
    args = dict(channels=(16, 32, 64, 96), strides=(1, 2, 2, 2))
    return _create("fedkd_cnn_tiny", pretrained, **dict(args, **kwargs))


def create_student(arch: str, num_classes: int, in_chans: int) -> nn.Module:
    """Build a randomly initialised student `arch` (timm name or fedkd_cnn_*)."""
    check_arch(arch, "student.arch")
    try:
        model = timm.create_model(
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


__all__ = [
    "FedKDCNN",
    "check_arch",
    "close_model_names",
    "count_params",
    "create_student",
    "fedkd_cnn_small",
    "fedkd_cnn_tiny",
    "student_features",
]
