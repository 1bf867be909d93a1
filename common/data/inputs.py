"""Images to run a deployed student on: files, folders and .npz, decoded as trained.

`client.predict` (the prediction CLI) and `server.export` (its parity check)
both expand their inputs here, so a row name and its pixels mean the same in
either tool. The decode size and colour mode come from the model file's
`ModelMeta`, never from a re-declared setting.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from common.data.folder import IMAGE_SUFFIXES, image_files
from common.data.folder import decode_file as decode_as_training  # sites' decoder
from common.data.types import resize_images
from common.errors import DataError
from common.model_file import ModelMeta

NPZ_SPLITS = ("train", "val", "test")


@dataclass
class Skipped:
    """An input that produced no prediction, and why."""

    name: str
    reason: str


def match_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 NHWC images with `channels` channels (PIL's RGB->L weights for gray)."""
    have = images.shape[-1]
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return np.repeat(images, 3, axis=-1)
    if have == 3 and channels == 1:
        return np.stack(
            [np.asarray(Image.fromarray(im).convert("L"))[..., None] for im in images]
        )
    raise DataError(f"images have {have} channels; the model takes {channels}")


def decode_image(path: Path, meta: ModelMeta) -> np.ndarray:
    """One image file as uint8 (decode_size, decode_size, C), decoded as for training.

    Raises DataError naming the file when it cannot be read.
    """
    try:
        return decode_as_training(Path(path), meta.decode_size, meta.pil_mode)
    except DataError as err:  # reword: the training decoder's advice is for training
        cause = err.__cause__ or err
        raise DataError(
            f"cannot read image {path} ({type(cause).__name__}: {cause})"
        ) from err


def load_npz_images(path: Path, split: str, meta: ModelMeta) -> np.ndarray:
    """`<split>_images` of a MedMNIST-layout .npz as uint8 NHWC at decode size."""
    key = f"{split}_images"
    try:
        with np.load(path, allow_pickle=False) as z:
            if key not in z.files:
                raise DataError(
                    f"{path} has no key '{key}' (keys: {z.files}); "
                    "pick another --npz-split"
                )
            images = z[key]
    except (
        OSError,
        ValueError,
        EOFError,
        TypeError,
        AttributeError,
        zipfile.BadZipFile,
        zlib.error,
    ) as err:
        raise DataError(
            f"{path} is not a readable .npz ({type(err).__name__}: "
            f"{err}); re-create it with np.savez"
        ) from err
    if images.dtype != np.uint8 or not (
        images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))
    ):
        raise DataError(
            f"{path}: '{key}' is {images.dtype} {images.shape}; expected "
            "uint8 (N, H, W) or (N, H, W, 1|3)"
        )
    if images.ndim == 3:
        images = images[..., None]
    # The sites resize npz images to the decode size with this same function.
    return resize_images(match_channels(images, meta.in_chans), meta.decode_size)


@dataclass
class Inputs:
    """Everything to predict, in order: (row name, loader of one HWC image)."""

    items: list[tuple[str, Callable[[], np.ndarray]]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def collect_inputs(
    args: list[str | Path], meta: ModelMeta, npz_split: str = "test"
) -> Inputs:
    """Expand files, folders (recursive, sorted) and .npz files into row loaders."""
    out = Inputs()

    def add_file(p: Path) -> None:
        out.items.append((str(p), lambda p=p: decode_image(p, meta)))

    for arg in args:
        p = Path(arg).expanduser()
        if p.is_dir():
            files = image_files(p)  # the same walk as a training class folder
            if not files:
                out.skipped.append(
                    Skipped(
                        str(p),
                        f"folder has no image files ({', '.join(IMAGE_SUFFIXES)})",
                    )
                )
            for f in files:
                add_file(f)
        elif not p.exists():
            out.skipped.append(Skipped(str(p), "no such file or folder"))
        elif p.suffix.lower() == ".npz":
            try:
                arr = load_npz_images(p, npz_split, meta)
            except DataError as err:
                out.skipped.append(Skipped(str(p), str(err)))
                continue
            for i in range(len(arr)):
                out.items.append((f"{p}#{npz_split}[{i}]", lambda a=arr, i=i: a[i]))
        else:
            add_file(p)  # any other file: let the decoder say whether it is an image
    return out
