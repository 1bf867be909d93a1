"""Scanner profiles: determinism, identity, effect and speed."""

from __future__ import annotations

import time

import numpy as np

from common.data.shift import ScannerProfile, apply_profile, scanner_profiles


def _images(n=20, size=32, channels=1):
    rng = np.random.default_rng(0)
    base = np.linspace(30, 220, size * size).reshape(1, size, size, 1)
    noise = rng.normal(0, 20, (n, size, size, channels))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def test_profiles_are_deterministic_and_site0_mild():
    a, b = scanner_profiles(5, seed=3), scanner_profiles(5, seed=3)
    assert a == b
    assert scanner_profiles(5, seed=4) != a
    assert scanner_profiles(3, seed=3) == a[:3]  # adding sites keeps earlier ones
    p0 = a[0]
    assert (p0.gamma, p0.contrast, p0.blur_sigma, p0.resample_factor) == (1, 1, 0, 1)
    assert len({(p.gamma, p.contrast) for p in a}) == 5


def test_identity_profile_returns_same_images():
    x = _images(channels=3)
    np.testing.assert_array_equal(
        apply_profile(x, ScannerProfile(1.0, 1.0, 0.0, 0.0, 1.0, seed=0)), x
    )


def test_apply_profile_deterministic_and_changes_images():
    x = _images()
    p = ScannerProfile(1.3, 0.8, 1.0, 4.0, 0.5, seed=11)
    y1, y2 = apply_profile(x, p), apply_profile(x, p)
    assert y1.dtype == np.uint8 and y1.shape == x.shape
    np.testing.assert_array_equal(y1, y2)
    assert np.abs(y1.astype(int) - x).mean() > 5
    other = apply_profile(x, ScannerProfile(1.3, 0.8, 1.0, 4.0, 0.5, seed=12))
    assert not np.array_equal(y1, other)  # noise follows the profile seed
    np.testing.assert_array_equal(apply_profile(x[:1], p), y1[:1])


def test_blur_and_contrast_reduce_spread():
    x = _images()
    blurred = apply_profile(x, ScannerProfile(1.0, 1.0, 1.5, 0.0, 1.0, seed=0))
    low = apply_profile(x, ScannerProfile(1.0, 0.5, 0.0, 0.0, 1.0, seed=0))
    dx = np.abs(np.diff(x.astype(float), axis=2)).mean()
    assert np.abs(np.diff(blurred.astype(float), axis=2)).mean() < 0.6 * dx
    assert low.std() < 0.7 * x.std()


def test_apply_profile_is_fast_on_many_images():
    x = np.random.default_rng(0).integers(0, 256, (1500, 112, 112, 1), np.uint8)
    start = time.perf_counter()
    apply_profile(x, scanner_profiles(3, seed=0)[2])
    assert time.perf_counter() - start < 5.0
