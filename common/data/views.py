"""Fixed, deterministic image views shared by the teacher cache and the student.

View 0 is the image itself; views 1.. are label-preserving augmentations
(flips and small translations). Because the views are fixed, the teacher's
outputs for each view can be cached once and the student trains on exactly the
inputs the cached targets were computed for.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# (horizontal flip, shift in y as a fraction of the side, shift in x)
_VIEWS: tuple[tuple[bool, float, float], ...] = (
    (False, 0.0, 0.0),
    (True, 0.0, 0.0),
    (False, 0.06, 0.06),
    (True, -0.06, 0.06),
    (False, -0.06, -0.06),
    (True, 0.06, -0.06),
    (False, 0.0, 0.08),
    (True, 0.08, 0.0),
)
MAX_VIEWS = len(_VIEWS)

# Student inputs are scaled to [-1, 1]; stored with every model for inference.
STUDENT_MEAN = 0.5
STUDENT_STD = 0.5


def apply_view(images: np.ndarray, view: int) -> np.ndarray:
    """Return view `view` of uint8 NHWC images (same shape; edges replicate)."""
    if not 0 <= view < MAX_VIEWS:
        raise ValueError(f"view {view} out of range; 0..{MAX_VIEWS - 1} exist")
    flip, dy, dx = _VIEWS[view]
    out = images[:, :, ::-1] if flip else images
    h, w = images.shape[1:3]
    sy, sx = int(round(dy * h)), int(round(dx * w))
    if sy or sx:
        pad = ((0, 0), (abs(sy), abs(sy)), (abs(sx), abs(sx)), (0, 0))
        padded = np.pad(out, pad, mode="edge")
        y0, x0 = abs(sy) - sy, abs(sx) - sx
        out = padded[:, y0 : y0 + h, x0 : x0 + w]
    return np.ascontiguousarray(out)


def to_student_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW at `size` (antialiased resize)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    x = x.div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return x.sub_(STUDENT_MEAN).div_(STUDENT_STD).contiguous()


def decode_size(data_image_size: int, teacher_image_size: int) -> int:
    """Side at which images are decoded: large enough for student and teacher views.

    Every consumer (sites, the server's global test set, predict) resizes from
    this one decode, so student inputs are identical wherever they are made.
    """
    return max(data_image_size, teacher_image_size)
