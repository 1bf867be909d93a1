"""`data.source` dispatch: br35h, medmnist:<flag>[@size], npz:<path>, folder:<path>."""

from __future__ import annotations

import logging
from pathlib import Path

from common.data.br35h import load_br35h
from common.data.folder import check_fractions, load_folder
from common.data.medmnist import load_medmnist, load_npz
from common.data.types import Dataset
from common.errors import ConfigError

log = logging.getLogger(__name__)


def load_dataset(
    source: str,
    image_size: int,
    cache_dir: str | Path,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> Dataset:
    """Load the dataset named by a `data.source` spec, images at image_size px."""
    if (
        not isinstance(image_size, int)
        or isinstance(image_size, bool)
        or not (8 <= image_size <= 1024)
    ):
        raise ConfigError(
            f"data.image_size={image_size!r} is not valid; use an int in [8, 1024]"
        )
    check_fractions(val_fraction, test_fraction)
    kind, _, arg = source.partition(":")
    if source == "br35h":
        ds = load_br35h(image_size, cache_dir, seed, val_fraction, test_fraction)
    elif kind == "medmnist" and arg:
        ds = load_medmnist(arg, image_size, cache_dir)
    elif kind == "npz" and arg:
        ds = load_npz(arg, image_size, source=source)
    elif kind == "folder" and arg:
        ds = load_folder(
            arg, image_size, cache_dir, seed, val_fraction, test_fraction, source=source
        )
    else:
        raise ConfigError(
            f"data.source={source!r} is not valid; use br35h, "
            "medmnist:<flag>[@28|64|128|224], npz:<path> or folder:<path>"
        )
    log.info(
        "loaded %s: %d classes, %d/%d/%d train/val/test images, %d channel(s)",
        source,
        ds.num_classes,
        len(ds.train),
        len(ds.val),
        len(ds.test),
        ds.channels,
    )
    return ds


# What a source's images show, for messages about inputs that do not look like
# them ("do not look like the training data (brain MRI, 64 px)").
MODALITIES = {
    "br35h": "brain MRI",
    "pneumoniamnist": "chest X-ray",
    "chestmnist": "chest X-ray",
    "breastmnist": "breast ultrasound",
    "dermamnist": "dermatoscope image",
    "octmnist": "retinal OCT",
    "retinamnist": "fundus photograph",
    "bloodmnist": "blood-cell microscopy",
    "pathmnist": "colon pathology",
    "tissuemnist": "kidney-cortex microscopy",
    "organamnist": "abdominal CT",
    "organcmnist": "abdominal CT",
    "organsmnist": "abdominal CT",
}


def describe_source(source: str) -> str:
    """A few words for what a `data.source` holds: its modality when known."""
    kind, _, arg = source.partition(":")
    if source == "br35h":
        return MODALITIES["br35h"]
    name = arg.split("@", 1)[0] if kind == "medmnist" else Path(arg).stem
    name = name.lower() or source
    for flag, modality in sorted(MODALITIES.items(), key=lambda kv: -len(kv[0])):
        if name.startswith(flag):
            return modality
    return f"images like {name}"
