"""Simulated scanner shift: a fixed acquisition profile per site, applied to uint8."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_CHUNK = 512  # images per vectorised step; bounds the float32 working memory


@dataclass(frozen=True)
class ScannerProfile:
    """One site's acquisition characteristics (identity: 1, 1, 0, 0, 1)."""

    gamma: float  # intensity gamma (x ** gamma on [0, 1])
    contrast: float  # scale of deviations from each image's mean
    blur_sigma: float  # Gaussian blur sigma in pixels (0 = none)
    noise_std: float  # additive Gaussian noise, in uint8 grey levels
    resample_factor: float  # down- then up-sampling factor in (0, 1] (1 = none)
    seed: int  # seeds the noise; image i uses (seed, i)


def scanner_profiles(sites: int, seed: int) -> list[ScannerProfile]:
    """Deterministic profiles; site 0 is a mild reference scanner."""
    out = []
    for site in range(sites):
        rng = np.random.default_rng([seed, site, 0x5CA77E])
        noise_seed = int(rng.integers(0, 2**31 - 1))
        if site == 0:
            out.append(ScannerProfile(1.0, 1.0, 0.0, 1.0, 1.0, noise_seed))
            continue
        out.append(
            ScannerProfile(
                gamma=round(float(math.exp(rng.uniform(-0.4, 0.4))), 4),
                contrast=round(float(rng.uniform(0.7, 1.3)), 4),
                blur_sigma=round(float(rng.choice([0.0, rng.uniform(0.4, 1.5)])), 4),
                noise_std=round(float(rng.uniform(1.0, 8.0)), 4),
                resample_factor=float(rng.choice([1.0, 0.75, 0.5])),
                seed=noise_seed,
            )
        )
    return out


def random_profile(rng: np.random.Generator) -> ScannerProfile:
    """One acquisition profile at random strengths, wider than the sites' family.

    For augmentation (the proxy teacher), not for sites: gamma e^U(-.6,.6),
    contrast U(.6, 1.4), blur none or U(.3, 2), noise U(0, 10) grey levels,
    resampling 1, .75, .5 or .35.
    """
    return ScannerProfile(
        gamma=float(math.exp(rng.uniform(-0.6, 0.6))),
        contrast=float(rng.uniform(0.6, 1.4)),
        blur_sigma=float(rng.choice([0.0, rng.uniform(0.3, 2.0)])),
        noise_std=float(rng.uniform(0.0, 10.0)),
        resample_factor=float(rng.choice([1.0, 0.75, 0.5, 0.35])),
        seed=int(rng.integers(0, 2**31 - 1)),
    )


def reacquire(
    images: np.ndarray, rng: np.random.Generator, group: int = 8
) -> np.ndarray:
    """`images` re-acquired, each group of `group` under its own random profile."""
    out = np.empty_like(images)
    for start in range(0, len(images), group):
        part = images[start : start + group]
        out[start : start + group] = apply_profile(part, random_profile(rng))
    return out


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of NCHW with reflected borders."""
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _noise(seed: int, start: int, count: int, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal noise for images start..start+count, one stream per image."""
    out = np.empty((count, *shape), dtype=np.float32)
    for j in range(count):
        rng = np.random.default_rng([seed, start + j])
        out[j] = rng.standard_normal(shape, dtype=np.float32)
    return out


def apply_profile(images: np.ndarray, profile: ScannerProfile) -> np.ndarray:
    """Apply `profile` to uint8 NHWC images; returns new uint8 images."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"expected uint8 NHWC images, got {images.dtype} {images.shape}"
        )
    n, h, w, c = images.shape
    out = np.empty_like(images)
    for start in range(0, n, _CHUNK):
        chunk = images[start : start + _CHUNK]
        x = torch.from_numpy(np.ascontiguousarray(chunk)).permute(0, 3, 1, 2).float()
        x = x / 255.0
        if profile.resample_factor < 1.0:
            small = (
                max(2, round(h * profile.resample_factor)),
                max(2, round(w * profile.resample_factor)),
            )
            x = F.interpolate(
                x, size=small, mode="bilinear", antialias=True, align_corners=False
            )
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        if profile.blur_sigma > 0:
            x = _gaussian_blur(x, profile.blur_sigma)
        x = x.clamp(0.0, 1.0)
        if profile.gamma != 1.0:
            x = x.pow(profile.gamma)
        if profile.contrast != 1.0:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * profile.contrast + mean
        x = x * 255.0
        if profile.noise_std > 0:
            noise = _noise(profile.seed, start, len(chunk), (c, h, w))
            x = x + torch.from_numpy(noise) * profile.noise_std
        y = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        out[start : start + len(chunk)] = y.numpy()
    return out
