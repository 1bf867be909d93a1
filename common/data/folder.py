"""Image-folder sources (one subfolder per class) with an on-disk decode cache.

Decoding rules (the same for training and for `client.predict`):

- **walk**: `image_files` lists a folder recursively (sorted, hidden files and
  folders skipped), so images in sub-folders of a class folder belong to that
  class, and predict on a folder sees exactly the same files;
- **colour**: the data set takes the mode of the majority of its files
  (grayscale "L" or colour "RGB"; a tie is RGB); the other files are converted,
  with a warning that counts them;
- **transparency**: an image with transparent pixels is refused (there is no
  right background to put under them); a fully opaque alpha channel is dropped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from common.data.splits import stratified_split
from common.data.types import Dataset, ImageSet
from common.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "P;L")
_CACHE_VERSION = 1


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, sorted; hidden entries skipped."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def list_class_folders(root: Path) -> tuple[tuple[str, ...], list[Path], np.ndarray]:
    """Class names (sorted subfolders), image paths and labels under `root`."""
    if not root.is_dir():
        raise DataError(
            f"image folder not found: {root}; point data.source=folder:<path> at a "
            "folder with one subfolder per class"
        )
    classes = tuple(
        sorted(
            p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
    )
    if len(classes) < 2:
        raise DataError(
            f"image folder {root} has {len(classes)} class subfolder(s) "
            f"{list(classes)}; put each class's images in its own subfolder (>= 2)"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = image_files(root / name)
        nested = sum(1 for p in files if p.parent != root / name)
        if nested:
            log.info("class %s: %d of %d images are in sub-folders (counted)",
                     name, nested, len(files))
        if not files:
            raise DataError(
                f"class folder {root / name} has no images "
                f"({', '.join(IMAGE_SUFFIXES)}); add images or remove the folder"
            )
        paths.extend(files)
        labels.extend([label] * len(files))
    return classes, paths, np.asarray(labels, dtype=np.int64)


def _file_list_fingerprint(root: Path, paths: list[Path]) -> str:
    """sha256 over relative names, sizes and modification times of the files."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(
            f"{p.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode()
        )
    return h.hexdigest()


def _is_gray(path: Path) -> bool:
    """True when the file's header declares a single-channel mode."""
    try:
        with Image.open(path) as im:
            return im.mode in _GRAY_MODES
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(
            f"cannot read image {path} ({type(err).__name__}: {err}); "
            "replace or delete the file"
        ) from err


def _refuse_transparency(path: Path, im: Image.Image) -> None:
    """DataError for an image with transparent pixels (opaque alpha is fine)."""
    if "A" in im.getbands():
        alpha = np.asarray(im.getchannel("A"))
    elif im.mode == "P" and "transparency" in im.info:
        alpha = np.asarray(im.convert("RGBA").getchannel("A"))
    else:
        return
    clear = int(np.count_nonzero(alpha < 255))
    if clear:
        raise DataError(
            f"image {path} has {clear} transparent pixel(s) (mode {im.mode}); "
            "flatten it onto the intended background and save it without alpha"
        )


def decode_file(path: Path, size: int, mode: str) -> np.ndarray:
    """One image as uint8 (size, size, C) in PIL mode `mode` ("L" or "RGB")."""
    try:
        with Image.open(path) as im:
            _refuse_transparency(path, im)
            im.draft(mode, (size, size))  # JPEG: decode at a reduced scale, faster
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F") and mode == "L":
                arr = np.asarray(im, dtype=np.float64)
                lo, hi = float(arr.min()), float(arr.max())
                arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else arr * 0.0
                im2 = Image.fromarray(arr.round().astype(np.uint8))
            else:
                im2 = im.convert(mode)
            # PIL's bilinear filter widens when shrinking, i.e. it antialiases.
            im2 = im2.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(im2, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(
            f"cannot read image {path} ({type(err).__name__}: {err}); replace or "
            "delete the file (training data must decode cleanly)"
        ) from err
    return arr.reshape(size, size, 1 if mode == "L" else 3)


def _majority_mode(root: Path, paths: list[Path]) -> str:
    """"L" when most files are single-channel, else "RGB"; warn about the rest."""
    gray = {p for p in paths if _is_gray(p)}
    mode = "L" if len(gray) * 2 > len(paths) else "RGB"
    other = [p for p in paths if (p in gray) != (mode == "L")]
    if other:
        log.warning(
            "%s: %d of %d images are %s and are converted to %s like the rest, "
            "e.g. %s",
            root,
            len(other),
            len(paths),
            "colour" if mode == "L" else "grayscale",
            mode,
            other[0],
        )
    return mode


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz next to `path` and move it into place in one step."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _read_cache(path: Path, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached (images, labels) for `key`, or None when absent or unusable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return z["images"], z["labels"].astype(np.int64)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        log.warning("ignoring unreadable decode cache %s (%s); rebuilding", path, err)
        return None


def decode_folder(
    root: Path,
    name: str,
    image_size: int,
    cache_dir: str | Path,
    mode: str | None = None,
) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """Classes, uint8 NHWC images and labels of a class-folder tree, cached.

    `mode` forces "L" or "RGB"; None picks "L" when every file is single-channel.
    The cache is keyed by (name, size, mode, file-list fingerprint).
    """
    if mode not in (None, "L", "RGB"):
        raise ConfigError(f"image mode {mode!r} is not valid; use 'L' or 'RGB'")
    classes, paths, labels = list_class_folders(root)
    fp = _file_list_fingerprint(root, paths)
    cache_root = Path(cache_dir).expanduser() / "decoded"
    key = f"v{_CACHE_VERSION}|{name}|{image_size}|{mode}|{fp}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    cache_path = cache_root / f"{name}-{image_size}px-{digest}.npz"
    cached = _read_cache(cache_path, key)
    if cached is not None and len(cached[1]) == len(paths):
        log.info("loaded %d decoded images of %s from %s", len(paths), name, cache_path)
        return classes, cached[0], cached[1]
    if mode is None:
        mode = _majority_mode(root, paths)
    log.info(
        "decoding %d images of %s at %dpx (%s)", len(paths), name, image_size, mode
    )
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL
        decoded = list(pool.map(lambda p: decode_file(p, image_size, mode), paths))
    images = np.stack(decoded)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        _atomic_savez(cache_path, images=images, labels=labels, key=np.array(key))
    except OSError as err:
        log.warning(
            "could not write decode cache %s (%s); continuing without it",
            cache_path,
            err,
        )
    return classes, images, labels


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Reject split fractions that leave no training data."""
    if not (
        0.0 <= val_fraction < 1
        and 0.0 < test_fraction < 1
        and val_fraction + test_fraction < 1
    ):
        raise ConfigError(
            f"data.val_fraction={val_fraction} / data.test_fraction={test_fraction} "
            "are not valid; need val >= 0, test > 0 and val + test < 1"
        )


def split_dataset(
    name: str,
    source: str,
    classes: tuple[str, ...],
    images: np.ndarray,
    labels: np.ndarray,
    seed: int,
    val_fraction: float,
    test_fraction: float,
) -> Dataset:
    """A Dataset from one pool of images via a seeded stratified 3-way split."""
    check_fractions(val_fraction, test_fraction)
    fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
    tr, va, te = stratified_split(labels, fractions, seed)
    pool = ImageSet(images, labels)
    return Dataset(
        name=name,
        source=source,
        classes=classes,
        train=pool.subset(tr),
        val=pool.subset(va),
        test=pool.subset(te),
    )


def load_folder(
    path: str | Path,
    image_size: int,
    cache_dir: str | Path,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    source: str | None = None,
) -> Dataset:
    """Load `folder:<path>` (one subfolder per class) with a stratified split."""
    root = Path(path).expanduser().resolve()
    check_fractions(val_fraction, test_fraction)
    name = root.name or "folder"
    classes, images, labels = decode_folder(root, name, image_size, cache_dir)
    return split_dataset(
        name,
        source or f"folder:{path}",
        classes,
        images,
        labels,
        seed,
        val_fraction,
        test_fraction,
    )
