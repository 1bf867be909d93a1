"""ImageSet / Dataset invariants and content hashes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from common.data.types import Dataset, ImageSet, fingerprint, image_hashes
from common.errors import DataError


def _set(n: int = 6, size: int = 8, channels: int = 1, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    return ImageSet(images, (np.arange(n) % 2).astype(np.int64))


def test_imageset_rejects_wrong_dtypes_and_shapes():
    good = _set()
    with pytest.raises(DataError, match="uint8"):
        ImageSet(good.images.astype(np.float32), good.labels)
    with pytest.raises(DataError, match="uint8"):
        ImageSet(np.zeros((2, 4, 4, 2), np.uint8), np.zeros(2, np.int64))
    with pytest.raises(DataError, match="int64"):
        ImageSet(good.images, good.labels.astype(np.int32))
    with pytest.raises(DataError, match="6 images but 5 labels"):
        ImageSet(good.images, good.labels[:5])


def test_subset_and_resized_keep_pairs():
    s = _set(n=6)
    sub = s.subset(np.array([4, 1]))
    assert len(sub) == 2
    np.testing.assert_array_equal(sub.images[0], s.images[4])
    np.testing.assert_array_equal(sub.labels, s.labels[[4, 1]])
    big = s.resized(16)
    assert big.images.shape == (6, 16, 16, 1) and big.images.dtype == np.uint8
    joined = ImageSet.concat([s, sub])
    assert len(joined) == 8


def test_dataset_properties_and_label_range():
    s = _set(channels=3)
    ds = Dataset("x", "npz:x", ("a", "b"), s, s.subset(np.arange(0)), s)
    assert ds.num_classes == 2 and ds.channels == 3
    with pytest.raises(DataError, match="labels span"):
        Dataset("x", "npz:x", ("a",), s, s, s)


def test_fingerprint_depends_on_content_and_shape():
    a = _set().images
    assert fingerprint(a) == fingerprint(a.copy())
    assert fingerprint(a) != fingerprint(a.reshape(3, 16, 8, 1))
    b = a.copy()
    b[0, 0, 0, 0] ^= 1
    assert fingerprint(a) != fingerprint(b)
    assert len(fingerprint(a)) == 64


def test_image_hashes_are_per_image_sha1_of_bytes_and_shape():
    imgs = _set(n=5).images
    hashes = image_hashes(imgs)
    assert len(hashes) == 5 and len(set(hashes)) == 5
    expected = hashlib.sha1(imgs[2].tobytes() + str((8, 8, 1)).encode()).hexdigest()
    assert hashes[2] == expected
    # Position-independent: the same image hashes the same anywhere.
    assert image_hashes(imgs[::-1])[0] == hashes[4]
    # The shape is part of the hash: same bytes, other shape -> other hash.
    assert image_hashes(imgs.reshape(5, 4, 16, 1))[0] != hashes[0]
