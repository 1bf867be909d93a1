"""predict applies the stored temperature and flags inputs unlike the training data.

The model is a freshly initialised tiny student whose OOD reference is fitted,
as the federation fits it, on generated "MRI-like" images (a textured ellipse
on a dark background, a bright blob for class 1); its threshold is chosen on
held-out images of the same generator.
"""

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from client import predict
from common import ood
from common.calibration import Calibration
from common.config import load_config
from common.data.views import to_student_tensor
from common.model_file import save_student
from common.models.student import create_student, student_outputs
from common.serialization import STUDENT_PREFIX, module_arrays

ARCH, SIZE, DECODE = "fedkd_cnn_tiny", 32, 64
TEMPERATURE = 1.5


def mri_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (n, 64, 64, 1) images, labels): textured ellipses, a blob for 1."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:DECODE, 0:DECODE] / DECODE - 0.5
    out = np.empty((n, DECODE, DECODE, 1), np.uint8)
    labels = rng.integers(0, 2, n)
    for i in range(n):
        a, b = rng.uniform(0.28, 0.4, 2)
        cx, cy = rng.uniform(-0.05, 0.05, 2)
        r = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2
        img = np.where(r < 1, 90 + 60 * np.cos(8 * r + rng.uniform(0, 6)), 8.0)
        img = img + rng.normal(0, 6, r.shape) * (r < 1)
        if labels[i]:
            tx, ty = rng.uniform(-0.15, 0.15, 2)
            img = img + 110 * np.exp(-((xx - tx) ** 2 + (yy - ty) ** 2) / 0.004)
        out[i, ..., 0] = np.clip(img, 0, 255)
    return out, labels


def _features(model, images: np.ndarray) -> np.ndarray:
    feats, _ = student_outputs(model, to_student_tensor(images, SIZE))
    return feats.double().numpy()


def write_model(path: Path, *, calibrated: bool = True) -> Path:
    """model.pt of a tiny student with a temperature and an OOD reference
    fitted on generated images (or, calibrated=False, a file without them)."""
    cfg = load_config(
        None,
        [
            f"student.arch={ARCH}",
            f"data.image_size={SIZE}",
            f"teacher.image_size={DECODE}",
        ],
    )
    torch.manual_seed(0)
    student = create_student(ARCH, 2, 1)
    calib = ref = None
    if calibrated:
        train, labels = mri_like(300, seed=1)
        ref = ood.fit_reference(
            ood.feature_stats(_features(student, train), labels, 2), 0.01, True
        )
        held, _ = mri_like(200, seed=2)
        hist = ood.score_histogram(ref.scores(_features(student, held)))
        threshold, above, reached = ood.threshold_from_histogram(hist, 0.05, 0.9)
        ref = ood.Reference(
            ref.means,
            ref.precision,
            True,
            threshold=threshold,
            confidence=reached,
            held_out=200,
            held_out_flagged=above,
            data="brain MRI, 32 px",
        )
        calib = Calibration(TEMPERATURE, 200, "generated held-out images", 0.7, 0.6)
    save_student(
        path / "final" / "model.pt",
        module_arrays(student, STUDENT_PREFIX),
        cfg,
        ["no", "yes"],
        1,
        {"image_size": DECODE},
        calibration=calib,
        ood=ref,
    )
    return path


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


def far_off_images(folder: Path) -> list[Path]:
    """Noise (8- and 16-bit), constant images and a colourful RGB picture."""
    rng = np.random.default_rng(9)
    yy, xx = np.mgrid[0:DECODE, 0:DECODE] / DECODE
    rgb = np.stack([255 * xx, 255 * (1 - yy), 127 + 100 * np.sin(9 * xx * yy)], -1)
    return [
        _png(folder / "noise.png", rng.integers(0, 256, (DECODE, DECODE), np.uint8)),
        _png(
            folder / "noise16.png",
            rng.integers(0, 65536, (DECODE, DECODE)).astype(np.uint16),
        ),
        _png(folder / "grey.png", np.full((DECODE, DECODE), 128, np.uint8)),
        _png(folder / "black.png", np.zeros((DECODE, DECODE), np.uint8)),
        _png(folder / "colour.png", rgb.astype(np.uint8), "RGB"),
    ]


def in_distribution_images(folder: Path, n: int = 40) -> list[Path]:
    """New images of the training generator (a seed neither fit used)."""
    images, _ = mri_like(n, seed=3)
    return [
        _png(folder / f"mri-{i:02d}.png", im[..., 0]) for i, im in enumerate(images)
    ]


def _csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_far_off_inputs_are_flagged_and_training_like_ones_accepted(tmp_path, capsys):
    run = write_model(tmp_path / "run")
    far = far_off_images(tmp_path / "in" / "far")
    near = in_distribution_images(tmp_path / "in" / "near")
    out = tmp_path / "preds.csv"

    rc = predict.main(
        ["--model", str(run), str(tmp_path / "in"), "--out", str(out), "--quiet"]
    )

    rows = {r["path"]: r for r in _csv(out.read_text())}
    assert rc == 0 and len(rows) == len(far) + len(near)
    assert list(next(iter(rows.values())))[-2:] == ["in_distribution", "ood_score"]
    assert all(rows[str(p)]["in_distribution"] == "false" for p in far)
    accepted = [rows[str(p)]["in_distribution"] == "true" for p in near]
    assert np.mean(accepted) >= 0.9
    for r in rows.values():  # flagged images keep their probabilities
        assert float(r["p_no"]) + float(r["p_yes"]) == pytest.approx(1.0, abs=1e-5)
        assert float(r["ood_score"]) >= 0
    err = capsys.readouterr().err.strip().splitlines()
    flagged = len(far) + accepted.count(False)
    assert err == [
        f"note: {flagged} of {len(rows)} images do not look like the training data "
        "(brain MRI, 32 px); they have in_distribution=false in the CSV and their "
        "probabilities are not reliable"
    ]


def test_mostly_foreign_inputs_get_the_loud_line(tmp_path, capsys):
    run = write_model(tmp_path / "run")
    far = far_off_images(tmp_path / "far")

    rc = predict.main(
        ["--model", str(run), *map(str, far), "--out", str(tmp_path / "p.csv")]
    )

    err = capsys.readouterr().err
    assert rc == 0
    assert (
        f"WARNING: {len(far)} of {len(far)} images do not look like the "
        "training data (brain MRI, 32 px): check the modality"
    ) in err


def test_probabilities_are_temperature_scaled(tmp_path):
    run = write_model(tmp_path / "run")
    model, meta = predict.load_model(run)
    images, _ = mri_like(6, seed=4)

    probs, scores = predict.score_images(model, meta, images)

    with torch.no_grad():
        logits = model(to_student_tensor(images, SIZE))
    np.testing.assert_allclose(
        probs, torch.softmax(logits / TEMPERATURE, 1).numpy(), atol=1e-6
    )
    assert not np.allclose(probs, torch.softmax(logits, 1).numpy(), atol=1e-3)
    assert scores.shape == (6,) and meta.temperature == TEMPERATURE


def test_an_old_model_still_predicts_and_says_what_it_lacks(tmp_path, capsys):
    run = write_model(tmp_path / "run", calibrated=False)
    far = far_off_images(tmp_path / "far")

    rc = predict.main(["--model", str(run), *map(str, far)])

    out, err = capsys.readouterr()
    assert rc == 0
    assert list(_csv(out)[0]) == ["path", "label", "p_no", "p_yes"]
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes == [
        f"note: {run / 'final' / 'model.pt'} carries no calibration temperature "
        "and no out-of-distribution reference (saved before fedkd stored them, "
        "or fitted with calibration off): probabilities are uncalibrated and "
        "inputs are not checked against the training data"
    ]
    assert "do not look like" not in err
