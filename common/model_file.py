"""The deployable student file: one writer, one reader.

`save_student` writes `final/model.pt` (weights, arch, classes and the exact
preprocessing used in training, and, when fitted, the calibration temperature
and the out-of-distribution reference) with a SHA-256 over all of it;
`load_model` reads it back for prediction and export, refusing files whose hash
does not match (a flipped byte, edited classes, image size or temperature),
whose weights are not finite, or whose recorded preprocessing this code does
not implement. Files written before calibration existed lack those two blocks
and still load (`ModelMeta.temperature` and `.ood` are then None).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from common.atomic import atomic_write_bytes
from common.calibration import Calibration
from common.config import ExperimentConfig
from common.data.views import STUDENT_MEAN, STUDENT_STD, decode_size
from common.errors import CheckpointError
from common.models.student import create_student
from common.ood import Reference
from common.serialization import STUDENT_PREFIX

log = logging.getLogger(__name__)

# -2: carries "sha256" (files of -1 do not); -3: may carry the "calibration" and
# "ood" blocks (an older fedkd then refuses the file by its format, not its hash)
MODEL_FORMAT = "fedkd-student-3"
READABLE_FORMATS = ("fedkd-student-2", MODEL_FORMAT)
REQUIRED_KEYS = ("arch", "num_classes", "in_chans", "classes", "preprocess",
                 "state_dict", "sha256")
# Everything the hash covers besides the weights: what inference reads.
HASHED_META = ("format", "arch", "num_classes", "in_chans", "classes", "preprocess",
               "teacher", "config_yaml")
# Blocks added later: hashed when present, so files without them keep their hash
# and a block added to, removed from or edited in a file breaks it.
OPTIONAL_HASHED = ("calibration", "ood")
EXPORT_FORMAT = "fedkd-export-1"  # sidecar JSON of server.export, tied to a hash
RESIZE = "bilinear-antialias"  # what to_student_tensor implements


@dataclass(frozen=True)
class ModelMeta:
    """What inference needs to know about a saved student, read from its file."""

    path: Path                 # the model file it was loaded from
    arch: str                  # timm name or fedkd_cnn_*
    classes: tuple[str, ...]   # label names; index = class id
    in_chans: int              # 1 = grayscale ("L"), 3 = RGB
    image_size: int            # the student's input side (preprocess.image_size)
    decode_size: int           # side files are decoded at before the student resize,
    #                            as on the sites: max(student, teacher image size)
    mean: float                # normalisation: (x / 255 - mean) / std
    std: float
    preprocess: dict[str, Any]  # the stored preprocess block, verbatim
    teacher: dict[str, Any] = field(default_factory=dict)  # as in the model card
    sha256: str = ""           # content hash of weights + metadata (checked on load)
    calibration: Calibration | None = None  # temperature scaling; None: not fitted
    ood: Reference | None = None  # out-of-distribution reference; None: no check

    @property
    def temperature(self) -> float:
        """The divisor of the logits before softmax (1.0 when not calibrated)."""
        return self.calibration.temperature if self.calibration else 1.0

    @property
    def pil_mode(self) -> str:
        """PIL mode images are converted to before resizing."""
        return "L" if self.in_chans == 1 else "RGB"


def resolve_model_path(path: str | Path) -> Path:
    """The model file for a run folder, its final/ folder, or a model file."""
    p = Path(path).expanduser()
    if p.is_dir():
        for cand in (p / "final" / "model.pt", p / "model.pt"):
            if cand.is_file():
                return cand
        raise CheckpointError(
            f"no final model in {p}: expected {p / 'final' / 'model.pt'}; pass a run "
            "folder whose federation finished, or the model.pt file itself"
        )
    if not p.is_file():
        raise CheckpointError(
            f"model not found: {p}; pass a run folder or its final/model.pt"
        )
    return p


def _read_payload(path: Path) -> dict[str, Any]:
    """The dict saved by server.model_card.save_student, checked for its format."""
    try:
        # weights_only: a model file from elsewhere must not run code on load.
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # its message is about torch versions
        raise CheckpointError(
            f"{path} is not a model file (not torch-saved tensors and plain data); "
            "pass final/model.pt of a finished run"
        ) from err
    except Exception as err:  # torch raises many types for a non-checkpoint file
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"{path} is not a readable model file ({type(err).__name__}: "
            f"{first[:160]}); pass final/model.pt of a finished run"
        ) from err
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt == "fedkd-student-1":
        raise CheckpointError(
            f"{path} has format {fmt!r}, written before model files carried a "
            "SHA-256, so its integrity cannot be checked; re-create it with this "
            "fedkd version"
        )
    if fmt not in READABLE_FORMATS:
        raise CheckpointError(
            f"{path} has format {fmt!r}, expected one of {READABLE_FORMATS}; pass "
            "final/model.pt of a run (round checkpoints are not deployable models)"
        )
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path} lacks keys {missing}; the file is incomplete")
    digest = content_hash(payload)
    if digest != payload["sha256"]:
        raise CheckpointError(
            f"{path} fails its integrity check: SHA-256 of weights and metadata is "
            f"{digest[:12]}..., the file records {str(payload['sha256'])[:12]}...; "
            "it was corrupted or edited, use an intact copy of final/model.pt"
        )
    check_finite(path, payload["state_dict"])
    return payload


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor of any dtype and shape (0-d included)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def content_hash(payload: dict[str, Any]) -> str:
    """SHA-256 over the weights (names, dtypes, shapes, bytes) and HASHED_META."""
    h = hashlib.sha256()
    meta = {k: payload.get(k) for k in HASHED_META}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name in sorted(payload["state_dict"]):
        t = payload["state_dict"][name]
        h.update(f"\n{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(_tensor_bytes(t))
    for block in OPTIONAL_HASHED:
        if block in payload:
            _hash_block(h, block, payload[block])
    return h.hexdigest()


def _hash_block(h: Any, name: str, block: Any) -> None:
    """Feed an optional block to `h`: its plain data as JSON, its tensors as bytes."""
    items = block.items() if isinstance(block, dict) else []
    tensors = {k: v for k, v in items if isinstance(v, torch.Tensor)}
    plain = (
        {k: v for k, v in block.items() if k not in tensors}
        if isinstance(block, dict)
        else block
    )
    h.update(f"\n[{name}]{json.dumps(plain, sort_keys=True, default=str)}\n".encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"\n{name}.{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(_tensor_bytes(t))


def check_finite(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Refuse weights holding NaN or inf: they predict the first class for all."""
    bad = [k for k, t in state.items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} weight tensor(s) hold NaN or inf, e.g. {bad[:3]}; "
            "the model is unusable, use an earlier checkpoint or retrain"
        )


def _teacher_image_size(payload: dict[str, Any]) -> int | None:
    """The teacher's input side the sites decoded for (teacher block or config)."""
    size = (payload.get("teacher") or {}).get("image_size")
    if size is None and payload.get("config_yaml"):
        cfg = yaml.safe_load(payload["config_yaml"]) or {}
        size = (cfg.get("teacher") or {}).get("image_size")
    return int(size) if size is not None else None


def _meta(path: Path, payload: dict[str, Any]) -> ModelMeta:
    """Check the stored preprocessing is the one this code implements; build meta."""
    pre = dict(payload["preprocess"])
    mean, std = pre.get("mean"), pre.get("std")
    # One implementation of the student's input (to_student_tensor): refuse a file
    # whose recorded preprocessing it does not reproduce rather than guess.
    if (mean, std, pre.get("resize")) != (STUDENT_MEAN, STUDENT_STD, RESIZE):
        raise CheckpointError(
            f"{path} records preprocessing mean={mean}, std={std}, "
            f"resize={pre.get('resize')!r}; this code implements mean={STUDENT_MEAN}, "
            f"std={STUDENT_STD}, resize={RESIZE!r}: use the fedkd version that "
            "trained the model"
        )
    size = int(pre["image_size"])
    in_chans = int(payload["in_chans"])
    if int(pre.get("channels", in_chans)) != in_chans:
        raise CheckpointError(
            f"{path}: preprocess.channels={pre.get('channels')} but in_chans="
            f"{in_chans}; the file is inconsistent, re-export it from the run"
        )
    teacher_size = _teacher_image_size(payload)
    classes = tuple(str(c) for c in payload["classes"])
    if len(classes) != int(payload["num_classes"]):
        raise CheckpointError(
            f"{path}: {len(classes)} class names for num_classes="
            f"{payload['num_classes']}; the file is inconsistent"
        )
    calibration, ood = _trust_blocks(path, payload)
    return ModelMeta(
        path=path,
        arch=str(payload["arch"]),
        classes=classes,
        in_chans=in_chans,
        image_size=size,
        decode_size=decode_size(size, teacher_size) if teacher_size else size,
        mean=float(mean),
        std=float(std),
        preprocess=pre,
        teacher=dict(payload.get("teacher") or {}),
        sha256=str(payload["sha256"]),
        calibration=calibration,
        ood=ood,
    )


def _trust_blocks(
    path: Path, payload: dict[str, Any]
) -> tuple[Calibration | None, Reference | None]:
    """The stored temperature and OOD reference (None where the file has none)."""
    try:
        calibration = (
            Calibration.from_payload(payload["calibration"])
            if payload.get("calibration")
            else None
        )
        ood = Reference.from_payload(payload["ood"]) if payload.get("ood") else None
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: unusable calibration or out-of-distribution block ({err}); "
            "re-create the file with this fedkd version"
        ) from err
    return calibration, ood


def load_model(path: str | Path) -> tuple[nn.Module, ModelMeta]:
    """The student in eval mode on CPU and its metadata, from a run folder or file."""
    model_path = resolve_model_path(path)
    payload = _read_payload(model_path)
    meta = _meta(model_path, payload)
    model = create_student(meta.arch, len(meta.classes), meta.in_chans)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(
            f"{model_path}: weights do not fit student.arch={meta.arch!r} "
            f"({str(err).splitlines()[0][:160]}); the file is corrupt or mislabelled"
        ) from err
    model.eval()
    width = getattr(model, "num_features", None)
    if meta.ood is not None and width != meta.ood.dim:
        raise CheckpointError(
            f"{model_path}: the out-of-distribution reference has {meta.ood.dim} "
            f"features, the student {width}; the file is inconsistent"
        )
    log.info("loaded %s (%s, %d classes, %dpx, %d channel(s))", model_path,
             meta.arch, len(meta.classes), meta.image_size, meta.in_chans)
    return model, meta


def save_student(
    path: Path,
    arrays: dict[str, np.ndarray],
    cfg: ExperimentConfig,
    classes: list[str],
    channels: int,
    teacher: dict[str, Any],
    calibration: Calibration | None = None,
    ood: Reference | None = None,
) -> None:
    """Write the student's weights with everything inference needs, and its hash.

    `calibration` and `ood` (when fitted) are stored in blocks the hash covers.
    Refuses non-finite weights; removes exports of an earlier model beside it.
    """
    state = {
        k[len(STUDENT_PREFIX) :]: torch.from_numpy(np.array(v))
        for k, v in arrays.items()
        if k.startswith(STUDENT_PREFIX)
    }
    payload = {
        "format": MODEL_FORMAT,
        "arch": cfg.student.arch,
        "num_classes": len(classes),
        "in_chans": channels,
        "classes": list(classes),
        "preprocess": {
            "image_size": cfg.data.image_size,
            "channels": channels,
            "mean": STUDENT_MEAN,
            "std": STUDENT_STD,
            "resize": "bilinear-antialias",
            "grayscale": channels == 1,
        },
        "state_dict": state,
        "teacher": teacher,
        "config_yaml": cfg.to_yaml(),
    }
    if calibration is not None:
        payload["calibration"] = calibration.to_payload()
    if ood is not None:  # arrays as tensors: torch.load(weights_only) reads them
        payload["ood"] = {
            k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v
            for k, v in ood.to_payload().items()
        }
    check_finite(path, state)
    payload["sha256"] = content_hash(payload)
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())
    remove_stale_exports(path.parent, payload["sha256"])


def remove_stale_exports(folder: Path, sha256: str) -> list[Path]:
    """Delete exports (and sidecars) in `folder` made from another model hash."""
    removed = []
    for sidecar in sorted(folder.glob("*.json")):
        try:
            info = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
            continue
        if info.get("model_sha256") == sha256:
            continue
        for stale in (folder / str(info.get("file", "")), sidecar):
            if stale.is_file() and stale.parent == folder:
                stale.unlink()
                removed.append(stale)
        log.warning("removed export %s of an earlier model (sha256 %s); export "
                    "the new model again", info.get("file"),
                    str(info.get("model_sha256"))[:12])
    return removed
