"""Image sets and datasets (uint8 NHWC + int64 labels) and their content hashes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from common.errors import DataError


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images (uint8, N x H x W x C with C in {1, 3}) and their int64 labels."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        """Check dtypes and shapes so every consumer can rely on them."""
        imgs, labels = self.images, self.labels
        if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[-1] not in (1, 3):
            raise DataError(
                f"ImageSet images must be uint8 (N, H, W, 1|3), got {imgs.dtype} "
                f"{imgs.shape}; convert before building the set"
            )
        if labels.dtype != np.int64 or labels.ndim != 1:
            raise DataError(
                f"ImageSet labels must be int64 (N,), got {labels.dtype} "
                f"{labels.shape}; convert with labels.astype(np.int64).reshape(-1)"
            )
        if len(imgs) != len(labels):
            raise DataError(
                f"ImageSet has {len(imgs)} images but {len(labels)} labels; "
                "they must match one to one"
            )

    def __len__(self) -> int:
        """Number of images."""
        return int(self.labels.shape[0])

    def subset(self, idx: np.ndarray) -> ImageSet:
        """The images and labels at `idx` (a new set; arrays are copied)."""
        idx = np.asarray(idx, dtype=np.int64)
        return ImageSet(np.ascontiguousarray(self.images[idx]), self.labels[idx].copy())

    def resized(self, size: int) -> ImageSet:
        """This set with every image resized to size x size (bilinear, antialiased)."""
        return ImageSet(resize_images(self.images, size), self.labels)

    @staticmethod
    def concat(sets: list[ImageSet]) -> ImageSet:
        """All images of `sets`, in order, as one set."""
        return ImageSet(
            np.concatenate([s.images for s in sets], axis=0),
            np.concatenate([s.labels for s in sets], axis=0),
        )


@dataclass(frozen=True, eq=False)
class Dataset:
    """A named source with label names and its train/val/test image sets."""

    name: str
    source: str
    classes: tuple[str, ...]
    train: ImageSet
    val: ImageSet
    test: ImageSet

    def __post_init__(self) -> None:
        """Check that labels fit the class list and that splits agree on channels."""
        n = len(self.classes)
        for split in ("train", "val", "test"):
            part: ImageSet = getattr(self, split)
            if len(part) and (part.labels.min() < 0 or part.labels.max() >= n):
                raise DataError(
                    f"dataset {self.name!r} {split} labels span "
                    f"[{part.labels.min()}, {part.labels.max()}] but there are "
                    f"{n} classes {self.classes}; fix the labels or the class list"
                )
            if part.images.shape[-1] != self.train.images.shape[-1]:
                raise DataError(
                    f"dataset {self.name!r} {split} has {part.images.shape[-1]} "
                    f"channels, train has {self.train.images.shape[-1]}; use one "
                    "colour mode for all splits"
                )

    @property
    def num_classes(self) -> int:
        """Number of label classes."""
        return len(self.classes)

    @property
    def channels(self) -> int:
        """Image channels (1 = grayscale, 3 = RGB)."""
        return int(self.train.images.shape[-1])


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 NHWC images to size x size with PIL (bilinear, antialiased)."""
    n, h, w, c = images.shape
    if h == size and w == size:
        return images
    out = np.empty((n, size, size, c), dtype=np.uint8)
    for i in range(n):
        img = images[i, :, :, 0] if c == 1 else images[i]
        # PIL's bilinear resize widens its filter when shrinking (antialiasing).
        res = Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(res).reshape(size, size, c)
    return out


def fingerprint(images: np.ndarray) -> str:
    """sha256 hex digest over the array's shape, dtype and bytes."""
    arr = np.ascontiguousarray(images)
    h = hashlib.sha256()
    h.update(f"{arr.shape}|{arr.dtype.str}|".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def image_hashes(images: np.ndarray) -> list[str]:
    """Per-image sha1 hex digests of each image's bytes followed by its shape."""
    arr = np.ascontiguousarray(images)
    tag = str(tuple(arr.shape[1:])).encode()
    flat = arr.reshape(len(arr), -1).view(np.uint8) if arr.size else arr
    out = []
    for i in range(len(arr)):
        h = hashlib.sha1(memoryview(flat[i]))
        h.update(tag)
        out.append(h.hexdigest())
    return out
