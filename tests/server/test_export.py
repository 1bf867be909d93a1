"""Exports reproduce PyTorch and carry their labels; the model card tells the truth."""

import io
import json
import sys

import numpy as np
import pytest
import torch

from client import predict
from common.config import load_config
from common.data.inputs import decode_image
from common.errors import ModelError
from server import export, model_card
from tests.client.test_predict import br35h_jpegs, image_folder, write_student


def load_export(path, fmt):
    """(run(x) -> probs, labels) of an exported file, loaded as a hospital would."""
    if fmt == "torchscript":
        extra = {"labels.json": ""}
        module = torch.jit.load(str(path), _extra_files=extra)
        return (lambda x: module(x).detach().numpy()), json.loads(extra["labels.json"])
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    labels = json.loads(session.get_modelmeta().custom_metadata_map["labels"])
    return (lambda x: session.run(None, {"images": x.numpy()})[0]), labels


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_round_trip_matches_pytorch(tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnx")
    run = write_student(tmp_path / "run", image_size=32, teacher_image_size=56)
    images = image_folder(tmp_path / "images")
    out = tmp_path / f"exported.{fmt}"

    res = export.export_model(run, fmt, out, check_images=[images])

    assert res.path == out and res.checked == 3 + 4 and res.max_abs_diff <= 1e-4
    run_export, labels = load_export(out, fmt)
    assert labels == ["no", "yes"]
    model, meta = predict.load_model(run)
    decoded = np.stack([decode_image(p, meta)
                        for p in sorted(images.rglob("*.jpg"))])
    got = run_export(export.unit_images(decoded, meta))
    np.testing.assert_allclose(got, predict.predict_images(model, meta, decoded),
                               atol=1e-4)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    side = json.loads(res.sidecar.read_text())
    assert side["labels"] == ["no", "yes"] and side["check"]["max_abs_diff"] <= 1e-4
    assert side["input"]["height"] == 32 and side["input"]["channels"] == 1
    assert side["preprocess"]["mean"] == 0.5 and side["preprocess"]["decode_size"] == 56


def test_cli_writes_next_to_the_model_and_reports_the_diff(tmp_path, capsys):
    run = write_student(tmp_path / "run")

    rc = export.main([str(run), "--format", "torchscript"])

    assert rc == 0
    assert (run / "final" / "model.torchscript.pt").is_file()
    assert (run / "final" / "model.torchscript.pt.json").is_file()
    assert "max abs diff" in capsys.readouterr().out


def test_export_that_disagrees_with_pytorch_fails_loudly(tmp_path):
    model_a, meta = predict.load_model(write_student(tmp_path / "a", seed=0))
    model_b, _ = predict.load_model(write_student(tmp_path / "b", seed=1))
    x = torch.rand(4, 1, 32, 32)
    wrapper_a = export.ExportWrapper(model_a, meta.mean, meta.std).eval()
    wrapper_b = export.ExportWrapper(model_b, meta.mean, meta.std).eval()
    info = export.describe(meta, "torchscript", tmp_path / "m.pt")
    blob = export.to_torchscript(wrapper_a, x, info)

    assert export.check_export(blob, "torchscript", wrapper_a, x, ["no", "yes"]) <= 1e-4
    with pytest.raises(ModelError, match="differs from PyTorch"):
        export.check_export(blob, "torchscript", wrapper_b, x, ["no", "yes"])


def test_missing_onnx_tooling_is_one_clear_line(tmp_path, monkeypatch, capsys):
    run = write_student(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` fail

    with pytest.raises(ModelError, match=r"pip install onnx onnxruntime"):
        export.export_model(run, "onnx")
    rc = export.main([str(run), "--format", "onnx"])

    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "[export]" in err
    assert not (run / "final" / "model.onnx").exists()


# The model card lives in server/model_card.py; its test sits here with the other
# deliverables handed to the hospitals.
def _card(tmp_path, weights_source):
    cfg = load_config(None, ["data.source=br35h", "federation.rounds=7",
                             "federation.strategy=fedprox"])
    sites = [{"name": "site-0", "num-train": 120, "num-labelled": 60, "num-test": 30},
             {"name": "site-1", "num-train": 80, "num-labelled": 40, "num-test": 20}]
    teacher = {"arch": "vit_small_patch14_dinov2.lvd142m",
               "weights_source": weights_source, "weights_spec": weights_source,
               "image_size": 224, "head": "local"}
    metrics = {"global_acc": 0.8125, "site_mean_acc": 0.75,
               "per_site": {"site-0": {"eval/acc": 0.7, "eval/auc": 0.71},
                            "site-1": {"eval/acc": 0.8, "eval/auc": 0.83}}}
    card = model_card.build_card(cfg, classes=["no", "yes"], site_infos=sites,
                                 rounds_done=7, final_metrics=metrics,
                                 teacher=teacher, params=80_000)
    model_card.write_card(tmp_path, card)
    return (json.loads((tmp_path / "model_card.json").read_text()),
            (tmp_path / "model_card.md").read_text())


@pytest.mark.parametrize("weights_source", ["random", "proxy", "hub"])
def test_model_card_states_data_method_teacher_metrics_and_use(tmp_path,
                                                               weights_source):
    card, md = _card(tmp_path, weights_source)

    assert card["data"]["source"] == "br35h"
    assert [s["name"] for s in card["data"]["sites"]] == ["site-0", "site-1"]
    assert card["method"]["rounds"] == 7 and card["method"]["strategy"] == "fedprox"
    assert card["teacher"]["weights_source"] == weights_source
    assert card["metrics"]["global_acc"] == 0.8125
    assert "NOT a medical device" in card["intended_use"]
    head = md.split("\n## ", 1)[0]  # prominent: above the first section
    assert (model_card.RANDOM_BANNER in head) == (weights_source == "random")
    assert (model_card.PROXY_BANNER in head) == (weights_source == "proxy")
    assert "Not a medical device" in head
    assert "`vit_small_patch14_dinov2.lvd142m`" in md
    assert f"weights source: **{weights_source}**" in md
    assert "rounds: 7" in md and "fedprox" in md
    assert "`br35h`" in md and "| site-0 | 120 | 60 | 30 |" in md
    assert "| global_acc | 0.8125 |" in md
    assert "| site-1 | 0.8000 | 0.8300 |" in md


def test_exported_labels_follow_the_model_file(tmp_path):
    run = write_student(tmp_path / "run", classes=("a", "b", "c"), channels=3)
    jpeg = br35h_jpegs(1)["yes"][0]

    res = export.export_model(run, "torchscript", check_images=[jpeg])

    extra = {"labels.json": "", "preprocess.json": ""}
    torch.jit.load(io.BytesIO(res.path.read_bytes()), _extra_files=extra)
    assert json.loads(extra["labels.json"]) == ["a", "b", "c"]
    assert json.loads(extra["preprocess.json"])["input"]["channels"] == 3


def test_export_refuses_an_edited_model(tmp_path, capsys):
    run = write_student(tmp_path / "run")
    path = run / "final" / "model.pt"
    payload = torch.load(path, weights_only=True)
    payload["classes"] = ["yes", "no"]
    torch.save(payload, path)

    rc = export.main([str(run), "--format", "torchscript"])

    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "integrity check" in err
    assert not list((run / "final").glob("model.torchscript*"))


def test_export_refuses_nan_weights(tmp_path, capsys):
    from common.model_file import content_hash

    run = write_student(tmp_path / "run")
    path = run / "final" / "model.pt"
    payload = torch.load(path, weights_only=True)
    name = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][name][0] = float("inf")
    payload["sha256"] = content_hash(payload)
    torch.save(payload, path)

    rc = export.main([str(run), "--format", "torchscript"])

    assert rc == 2 and "NaN or inf" in capsys.readouterr().err


def test_export_is_tied_to_its_model_and_stale_ones_are_removed(tmp_path):
    run = write_student(tmp_path / "run", seed=0)
    res = export.export_model(run, "torchscript")
    side = json.loads(res.sidecar.read_text())
    _, meta = predict.load_model(run)
    assert side["model_sha256"] == meta.sha256

    write_student(tmp_path / "run", seed=1)  # a new final model in the same folder

    assert not res.path.exists() and not res.sidecar.exists()
    res2 = export.export_model(run, "torchscript")
    write_student(tmp_path / "run", seed=1)  # the same model again: export kept
    assert res2.path.exists() and res2.sidecar.exists()


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exports_carry_the_calibration_temperature(tmp_path, fmt):
    from tests.client.test_predict_ood import TEMPERATURE, mri_like, write_model

    if fmt == "onnx":
        pytest.importorskip("onnx")
    run = write_model(tmp_path / "run")
    out = tmp_path / f"calibrated.{fmt}"

    res = export.export_model(run, fmt, out)

    model, meta = predict.load_model(run)
    images, _ = mri_like(5, seed=6)
    x = export.unit_images(images, meta)
    run_export, _ = load_export(out, fmt)
    got = run_export(x)
    np.testing.assert_allclose(got, predict.predict_images(model, meta, images),
                               atol=1e-4)
    with torch.no_grad():
        logits = model((x - meta.mean) / meta.std)
    np.testing.assert_allclose(
        got, torch.softmax(logits / TEMPERATURE, 1).numpy(), atol=1e-4)
    assert not np.allclose(got, torch.softmax(logits, 1).numpy(), atol=1e-3)
    side = json.loads(res.sidecar.read_text())
    assert side["calibration"]["temperature"] == TEMPERATURE
    assert side["calibration"]["calibrated"] is True
    if fmt == "torchscript":
        module = torch.jit.load(str(out))
        assert float(module.temperature) == TEMPERATURE
    else:
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        meta_map = session.get_modelmeta().custom_metadata_map
        assert float(meta_map["temperature"]) == TEMPERATURE


def test_model_card_reports_calibration_and_what_the_check_misses(tmp_path):
    from server.calibration import CANNOT_CATCH

    report = {
        "sites": ["site-0", "site-1"],
        "data": "brain MRI, 64 px",
        "temperature": {"temperature": 1.8, "images": 300, "nll_before": 0.61,
                        "nll_after": 0.42, "fitted_on": "the held-out test parts"},
        "ece_global_test_before": 0.112, "ece_global_test_after": 0.031,
        "global_test_images": 600, "global_test_flagged": 0.035,
        "ece_sites_before": 0.1, "ece_sites_after": 0.02,
        "ood": {"score": "Mahalanobis", "classwise": True, "threshold": 2.31,
                "false_alarm": 0.05, "confidence": 0.91, "held_out": 336,
                "held_out_flagged": 0.033, "reference_images": 1344,
                "shrinkage": 0.01, "cannot_catch": CANNOT_CATCH},
    }
    cfg = load_config(None, ["data.source=br35h"])
    card = model_card.build_card(cfg, classes=["no", "yes"], site_infos=[],
                                 rounds_done=3, final_metrics={}, teacher={},
                                 params=1, calibration=report)

    md = model_card.render_markdown(card)

    assert "**T = 1.800**" in md
    assert "**0.1120 before, 0.0310 after** calibration" in md
    assert "**3.5 % of the global test**" in md and "3.3 % of the held-out" in md
    assert "a new disease" in md and "scanner" in md
    assert "calibration statistics:" in md


def test_model_card_says_when_nothing_was_fitted(tmp_path):
    cfg = load_config(None, ["data.source=br35h"])
    card = model_card.build_card(
        cfg, classes=["no", "yes"], site_infos=[], rounds_done=1, final_metrics={},
        teacher={}, params=1, calibration={"skipped": "privacy.dp is on"})

    md = model_card.render_markdown(card)

    assert "**not fitted**: privacy.dp is on" in md
    assert "calibration statistics" not in md
