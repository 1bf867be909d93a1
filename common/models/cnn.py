"""The project's small CNN students, in plain torch (no timm import).

Plain conv-norm-ReLU stacks that train from scratch in minutes on CPU at 64 px.
They expose timm's model interface (`forward_features`, `forward_head`,
`num_features`, `reset_classifier`, `pretrained_cfg`) and are registered in
timm's registry by `common.models.student`; building them here directly keeps
timm (and the torchvision it imports, about 2.5 s) out of every Flower message.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from common.errors import ModelError

log = logging.getLogger(__name__)


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


# name -> (constructor kwargs, one-line description)
VARIANTS: dict[str, dict] = {
    "fedkd_cnn_small": dict(channels=(32, 64, 128, 256), strides=(1, 2, 2, 2)),
    "fedkd_cnn_tiny": dict(channels=(16, 32, 64, 96), strides=(1, 2, 2, 2)),
}


def build_cnn(arch: str, num_classes: int, in_chans: int) -> FedKDCNN:
    """Build `arch` exactly as timm.create_model would (same init, same cfg)."""
    if arch not in VARIANTS:
        raise ModelError(f"unknown project CNN {arch!r}; valid: {sorted(VARIANTS)}")
    model = FedKDCNN(num_classes=num_classes, in_chans=in_chans, **VARIANTS[arch])
    # what timm's registry would attach (its PretrainedCfg defaults included)
    model.pretrained_cfg = model.default_cfg = dict(
        _cfg(),
        architecture=arch,
        crop_mode="center",
        custom_load=False,
        fixed_input_size=False,
    )
    return model


__all__ = ["VARIANTS", "FedKDCNN", "build_cnn"]
