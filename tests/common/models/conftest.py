"""Tiny stand-in teachers: the DINOv2 ViT-S/14 layout with one narrow block."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

ARCH = "vit_small_patch14_dinov2"
TINY = dict(depth=1, embed_dim=32, num_heads=2)


def tiny_vit(img_size: int = 28, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised tiny DINOv2-style ViT with non-trivial layer scales."""
    torch.manual_seed(seed)
    kw = dict(TINY, **overrides)
    model = timm.create_model(ARCH, num_classes=0, img_size=img_size, **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):  # init_values=1e-5 would hide the blocks
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def images() -> np.ndarray:
    """Six random uint8 RGB images, 40x40."""
    return np.random.default_rng(0).integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)
