"""model.pt carries the temperature and the OOD reference under its hash."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common import ood
from common.calibration import Calibration
from common.config import load_config
from common.errors import CheckpointError
from common.model_file import HASHED_META, content_hash, load_model, save_student
from common.models.student import create_student
from common.serialization import STUDENT_PREFIX, module_arrays

ARCH = "fedkd_cnn_tiny"  # 96 pooled features


def reference(dim: int = 96, threshold: float = 3.0) -> ood.Reference:
    """A small valid OOD reference over `dim` features."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(400, dim)), rng.integers(0, 2, 400)
    ref = ood.fit_reference(ood.feature_stats(x, y, 2), 0.01, True)
    return ood.Reference(
        ref.means,
        ref.precision,
        True,
        threshold=threshold,
        held_out=120,
        held_out_flagged=0.03,
        data="brain MRI, 32 px",
    )


def save(path: Path, *, temperature: float | None = 1.7, ref=None, dim: int = 96):
    """Write model.pt of a fresh tiny student with the given calibration blocks."""
    cfg = load_config(None, [f"student.arch={ARCH}", "data.image_size=32"])
    torch.manual_seed(0)
    student = create_student(ARCH, 2, 1)
    calib = (
        None
        if temperature is None
        else Calibration(
            temperature, 120, "the held-out test parts of 3 site(s)", 0.61, 0.43
        )
    )
    save_student(
        path,
        module_arrays(student, STUDENT_PREFIX),
        cfg,
        ["no", "yes"],
        1,
        {"image_size": 32},
        calibration=calib,
        ood=reference(dim) if ref is None else (ref or None),
    )
    return path


def test_temperature_and_reference_round_trip(tmp_path):
    path = save(tmp_path / "model.pt", temperature=1.7)

    _, meta = load_model(path)

    assert meta.calibration.temperature == meta.temperature == 1.7
    assert meta.calibration.images == 120
    want = reference()
    np.testing.assert_array_equal(meta.ood.precision, want.precision)
    assert (meta.ood.threshold, meta.ood.data) == (3.0, "brain MRI, 32 px")
    assert meta.sha256 == content_hash(torch.load(path, weights_only=True))


def _tamper(path: Path, edit) -> None:
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)  # the stored sha256 is left as it was


@pytest.mark.parametrize(
    "edit",
    [
        lambda p: p["calibration"].update(temperature=1.0),
        lambda p: p.pop("calibration"),
        lambda p: p["ood"].update(threshold=1e9),
        lambda p: p["ood"]["precision"].mul_(0.5),
        lambda p: p["ood"].update(data="chest X-ray, 32 px"),
    ],
    ids=["temperature", "calibration-removed", "threshold", "precision", "data"],
)
def test_an_edited_calibration_fails_the_integrity_check(tmp_path, edit):
    path = save(tmp_path / "model.pt")
    _tamper(path, edit)

    with pytest.raises(CheckpointError, match="fails its integrity check"):
        load_model(path)


def _hash_before_calibration(payload: dict) -> str:
    """content_hash as fedkd computed it before model files had these blocks."""
    h = hashlib.sha256()
    meta = {k: payload.get(k) for k in HASHED_META}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for name in sorted(payload["state_dict"]):
        t = payload["state_dict"][name]
        h.update(f"\n{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def test_a_file_without_calibration_keeps_its_hash_and_loads(tmp_path):
    path = save(tmp_path / "model.pt", temperature=None, ref=False)
    payload = torch.load(path, weights_only=True)

    _, meta = load_model(path)

    assert "calibration" not in payload and "ood" not in payload
    assert payload["sha256"] == _hash_before_calibration(payload)
    assert meta.calibration is None and meta.ood is None and meta.temperature == 1.0


def test_a_file_of_the_previous_format_still_loads(tmp_path):
    path = save(tmp_path / "model.pt", temperature=None, ref=False)
    payload = torch.load(path, weights_only=True)
    payload["format"] = "fedkd-student-2"  # as written before calibration existed
    payload["sha256"] = _hash_before_calibration(payload)
    torch.save(payload, path)

    model, meta = load_model(path)

    assert meta.calibration is None and meta.ood is None
    assert meta.sha256 == payload["sha256"] and not model.training


def test_a_reference_of_another_width_is_refused(tmp_path):
    path = save(tmp_path / "model.pt", ref=reference(dim=8))

    with pytest.raises(CheckpointError, match="8 features, the student 96"):
        load_model(path)
