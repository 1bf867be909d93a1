"""MedMNIST-layout npz loading: the real balanced file, bad inputs, downloads."""

from __future__ import annotations

import hashlib
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from common.data.medmnist import load_medmnist, load_npz, medmnist_filename
from common.errors import ConfigError, DataError

PNEUMONIA = (
    Path(__file__).resolve().parents[3]
    / ".."
    / "shared"
    / "data"
    / ("pneumoniamnist_balanced.npz")
)


def _arrays(n=(12, 4, 6), size=10, channels=None, classes=2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        shape = (
            (count, size, size) if channels is None else (count, size, size, channels)
        )
        out[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        out[f"{split}_labels"] = (np.arange(count) % classes).astype(np.uint8)[:, None]
    return out


def _write(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.skipif(
    not PNEUMONIA.is_file(), reason=f"shared test data {PNEUMONIA} is absent"
)
def test_real_pneumoniamnist_balanced_file():
    ds = load_npz(PNEUMONIA, 32)
    assert ds.name == "pneumoniamnist"
    assert ds.classes == ("normal", "pneumonia")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (2428, 270, 468)
    assert np.bincount(ds.train.labels).tolist() == [1214, 1214]
    assert ds.train.images.shape == (2428, 32, 32, 1)
    assert ds.train.images.dtype == np.uint8 and ds.train.labels.dtype == np.int64


def test_generated_npz_loads_rgb_and_unknown_names(tmp_path):
    path = _write(tmp_path / "mydata.npz", _arrays(channels=3, classes=3))
    ds = load_npz(path, 16)
    assert ds.name == "mydata" and ds.channels == 3
    assert ds.classes == ("class-0", "class-1", "class-2")
    assert ds.test.images.shape == (6, 16, 16, 3)
    assert ds.source == f"npz:{path}"


def _bad(arrays, **changes):
    out = dict(arrays)
    for key, value in changes.items():
        if value is None:
            out.pop(key)
        else:
            out[key] = value
    return out


A = _arrays()
BAD_CASES = {
    "missing key": (
        _bad(A, val_labels=None, test_images=None),
        "missing keys ['val_labels', 'test_images']; expected keys",
    ),
    "float images": (
        _bad(A, train_images=A["train_images"].astype(np.float32)),
        "'train_images' has dtype float32; expected uint8",
    ),
    "2-channel images": (
        _bad(A, val_images=np.zeros((4, 10, 10, 2), np.uint8)),
        "'val_images' has shape (4, 10, 10, 2)",
    ),
    "flat images": (
        _bad(A, test_images=np.zeros((6, 100), np.uint8)),
        "'test_images' has shape (6, 100)",
    ),
    "multi-label": (
        _bad(A, train_labels=np.zeros((12, 14), np.uint8)),
        "multi-label targets are unsupported",
    ),
    "label shape": (
        _bad(A, train_labels=np.zeros((12, 1, 1), np.uint8)),
        "'train_labels' has shape (12, 1, 1)",
    ),
    "float labels": (
        _bad(A, val_labels=np.zeros(4, np.float32)),
        "'val_labels' has dtype float32",
    ),
    "negative": (
        _bad(A, test_labels=-np.ones(6, np.int64)),
        "'test_labels' has negative label -1",
    ),
    "count": (
        _bad(A, train_labels=np.zeros(11, np.uint8)),
        "'train_labels' has 11 labels but the matching images key has 12",
    ),
    "empty train": (
        _bad(
            A,
            train_images=np.zeros((0, 10, 10), np.uint8),
            train_labels=np.zeros(0, np.uint8),
        ),
        "'train_images' is empty",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_npz_contents_raise_one_line_error(tmp_path, case):
    arrays, expected = BAD_CASES[case]
    path = _write(tmp_path / "bad.npz", arrays)
    with pytest.raises(DataError) as info:
        load_npz(path, 16)
    msg = str(info.value)
    assert expected in msg
    assert str(path) in msg and "\n" not in msg


def test_label_out_of_range_for_known_flag(tmp_path):
    arrays = _arrays()
    arrays["test_labels"] = np.array([0, 1, 2, 0, 1, 0], np.uint8)
    path = _write(tmp_path / "pneumoniamnist_sub.npz", arrays)
    with pytest.raises(DataError, match=r"label 2 but pneumoniamnist has 2"):
        load_npz(path, 16)


def test_missing_not_zip_truncated_and_npy_files(tmp_path):
    with pytest.raises(DataError, match="npz file not found: .*nope.npz"):
        load_npz(tmp_path / "nope.npz", 16)
    text = tmp_path / "text.npz"
    text.write_text("hello, not an archive")
    with pytest.raises(DataError, match="text.npz is not a readable .npz archive"):
        load_npz(text, 16)
    good = _write(tmp_path / "good.npz", _arrays())
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match="trunc.npz.*truncated or corrupt"):
        load_npz(trunc, 16)
    npy = tmp_path / "single.npz"
    with open(npy, "wb") as fh:
        np.save(fh, np.zeros(3))
    with pytest.raises(DataError, match="holds a single array"):
        load_npz(npy, 16)


def test_medmnist_spec_validation(tmp_path):
    with pytest.raises(DataError, match="multi-label"):
        load_medmnist("chestmnist", 28, tmp_path)
    with pytest.raises(ConfigError, match="not a 2D MedMNIST flag"):
        load_medmnist("nodulemnist3d", 28, tmp_path)
    with pytest.raises(ConfigError, match="sizes are 28, 64, 128, 224"):
        load_medmnist("pathmnist@32", 28, tmp_path)
    assert medmnist_filename("pathmnist", 28) == "pathmnist.npz"
    assert medmnist_filename("pathmnist", 64) == "pathmnist_64.npz"


def test_medmnist_uses_cached_file(tmp_path):
    _write(tmp_path / "breastmnist_64.npz", _arrays(size=64))
    ds = load_medmnist("breastmnist@64", 32, tmp_path)
    assert ds.name == "breastmnist" and ds.classes == ("malignant", "normal, benign")
    assert ds.source == "medmnist:breastmnist@64"
    assert ds.train.images.shape == (12, 32, 32, 1)


def test_medmnist_missing_without_package_names_file_and_path(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "medmnist", None)  # import fails
    with pytest.raises(DataError) as info:
        load_medmnist("dermamnist@128", 28, tmp_path)
    msg = str(info.value)
    assert "dermamnist_128.npz" in msg and str(tmp_path / "dermamnist_128.npz") in msg
    assert "pip install medmnist" in msg and "zenodo" in msg


def _fake_medmnist(monkeypatch, url: str, md5: str) -> None:
    fake = types.ModuleType("medmnist")
    fake.INFO = {
        "pneumoniamnist": {"url": "x", "MD5": "y", "url_64": url, "MD5_64": md5}
    }
    monkeypatch.setitem(sys.modules, "medmnist", fake)


def test_medmnist_download_checks_md5(tmp_path, monkeypatch):
    src = _write(tmp_path / "src.npz", _arrays(size=64))
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    _fake_medmnist(monkeypatch, src.as_uri(), "0" * 32)
    with pytest.raises(DataError, match="has MD5 .* expected 0000"):
        load_medmnist("pneumoniamnist@64", 28, cache)
    assert not (cache / "pneumoniamnist_64.npz").exists()
    _fake_medmnist(monkeypatch, src.as_uri(), md5)
    ds = load_medmnist("pneumoniamnist@64", 28, cache)
    assert (cache / "pneumoniamnist_64.npz").is_file()
    assert len(ds.train) == 12 and ds.train.images.shape[1] == 28
    assert sorted(p.name for p in cache.iterdir()) == ["pneumoniamnist_64.npz"]


def test_medmnist_download_failure_is_data_error(tmp_path, monkeypatch):
    _fake_medmnist(monkeypatch, (tmp_path / "absent.npz").as_uri(), "0" * 32)
    with pytest.raises(DataError, match="download from .* failed.*put it at"):
        load_medmnist("pneumoniamnist@64", 28, tmp_path / "cache")
