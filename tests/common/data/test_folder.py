"""Class-folder loading: decoding, caching and bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import common.data.folder as folder
from common.data.folder import load_folder
from common.errors import DataError


def _make_tree(root: Path, counts: dict[str, int], mode: str = "L") -> Path:
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            h, w = 20 + i, 30 - i  # varied, non-square sizes
            shape = (h, w) if mode == "L" else (h, w, 3)
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(arr, mode).save(root / name / f"img{i}.png")
    return root


def test_folder_loads_split_and_resizes(tmp_path):
    root = _make_tree(tmp_path / "scans", {"benign": 10, "malignant": 10})
    ds = load_folder(
        root, 16, tmp_path / "cache", seed=0, val_fraction=0.1, test_fraction=0.2
    )
    assert ds.name == "scans" and ds.classes == ("benign", "malignant")
    assert ds.channels == 1
    assert (len(ds.train), len(ds.val), len(ds.test)) == (14, 2, 4)
    assert np.bincount(ds.test.labels).tolist() == [2, 2]
    assert ds.train.images.shape[1:] == (16, 16, 1)


def test_folder_rgb_images_give_three_channels(tmp_path):
    root = _make_tree(tmp_path / "derm", {"a": 4, "b": 4}, mode="RGB")
    ds = load_folder(root, 8, tmp_path / "cache")
    assert ds.channels == 3


def test_folder_second_load_uses_cache_and_new_file_invalidates(tmp_path, monkeypatch):
    root = _make_tree(tmp_path / "d", {"a": 5, "b": 5})
    first = load_folder(root, 12, tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "decoded").glob("*.npz"))) == 1

    def boom(*args, **kwargs):
        raise AssertionError("decoded again despite a valid cache")

    monkeypatch.setattr(folder, "decode_file", boom)
    second = load_folder(root, 12, tmp_path / "cache")
    np.testing.assert_array_equal(first.train.images, second.train.images)
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(root / "a" / "extra.png")
    with pytest.raises(AssertionError, match="decoded again"):
        load_folder(root, 12, tmp_path / "cache")


def test_corrupt_cache_is_rebuilt(tmp_path):
    root = _make_tree(tmp_path / "d", {"a": 5, "b": 5})
    first = load_folder(root, 12, tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache" / "decoded").glob("*.npz")
    cache_file.write_bytes(b"garbage")
    again = load_folder(root, 12, tmp_path / "cache")
    np.testing.assert_array_equal(first.test.images, again.test.images)


def test_empty_class_folder_is_named(tmp_path):
    root = _make_tree(tmp_path / "d", {"a": 3, "b": 3})
    (root / "c").mkdir()
    with pytest.raises(DataError, match=r"class folder .*d/c has no images"):
        load_folder(root, 8, tmp_path / "cache")


def test_unreadable_image_is_named(tmp_path):
    root = _make_tree(tmp_path / "d", {"a": 3, "b": 3})
    (root / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError) as info:
        load_folder(root, 8, tmp_path / "cache")
    msg = str(info.value)
    assert "broken.png" in msg and "replace or delete" in msg and "\n" not in msg


def test_too_few_classes_and_missing_folder(tmp_path):
    root = _make_tree(tmp_path / "d", {"only": 3})
    with pytest.raises(DataError, match="1 class subfolder"):
        load_folder(root, 8, tmp_path / "cache")
    with pytest.raises(DataError, match="image folder not found"):
        load_folder(tmp_path / "missing", 8, tmp_path / "cache")
