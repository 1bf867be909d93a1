"""Export the final student with its preprocessing to TorchScript or ONNX.

    python -m server.export RUN_DIR_OR_MODEL_PT --format torchscript|onnx [--out PATH]

The exported graph takes float32 NCHW images in [0, 1] at the model's input size
(`preprocess.image_size`; decode and resize as the sidecar's `preprocess.steps`
say), applies the stored normalisation inside, and returns softmax
probabilities (N, num_classes), divided by the model's calibration temperature
before the softmax when it carries one (a `temperature` buffer in the graph;
`calibration` in the sidecar and the extra files, ONNX metadata `temperature`).
Label names travel inside the file (TorchScript extra file `labels.json`, ONNX
metadata `labels`) and in a sidecar `<out>.json` with the preprocessing. Every
export is run and compared with PyTorch (max abs difference <= 1e-4) before it
is written. The out-of-distribution check is not exported: `client.predict`
runs it.

Exit status: 0 on success, 2 when the model, the tooling or the check fails.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.atomic import atomic_write_bytes
from common.data.inputs import collect_inputs
from common.data.views import to_student_tensor
from common.errors import DataError, FedKDError, ModelError
from common.model_file import EXPORT_FORMAT, ModelMeta, load_model

log = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx")
SUFFIXES = {"torchscript": ".torchscript.pt", "onnx": ".onnx"}
TOLERANCE = 1e-4
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "probs"
INSTALL_HINT = "pip install onnx onnxruntime (or pip install -e '.[export]')"
MAX_CHECK_IMAGES = 16


class ExportWrapper(nn.Module):
    """Student + stored normalisation + softmax(logits / T): [0, 1] NCHW in,
    (calibrated) probabilities out."""

    def __init__(self, student: nn.Module, mean: float, std: float,
                 temperature: float = 1.0) -> None:
        super().__init__()
        self.student = student
        # Buffers (not Python floats) so the values are visible in the saved graph.
        self.register_buffer("mean", torch.tensor(mean).float().reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).float().reshape(1, -1, 1, 1))
        self.register_buffer("temperature", torch.tensor(float(temperature)).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, K) for float32 images in [0, 1]."""
        logits = self.student((x - self.mean) / self.std)
        return torch.softmax(logits / self.temperature, dim=1)


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how closely it matched PyTorch."""

    path: Path            # the exported model
    sidecar: Path         # <path>.json: labels, preprocessing, check result
    max_abs_diff: float   # largest |exported - PyTorch| probability on the checks
    checked: int          # number of images compared (random + samples)


def require_onnx() -> tuple[Any, Any]:
    """The onnx and onnxruntime modules, or a ModelError saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ModelError(
            f"ONNX export needs the onnx and onnxruntime packages ({err.name or err} "
            f"is missing); {INSTALL_HINT}"
        ) from err
    return onnx, onnxruntime


def unit_images(images: np.ndarray, meta: ModelMeta) -> torch.Tensor:
    """uint8 NHWC -> the exported model's input: float32 NCHW in [0, 1] at its size."""
    # to_student_tensor is the one resize; undo only its final normalisation.
    return to_student_tensor(images, meta.image_size).mul_(meta.std).add_(meta.mean)


def sample_images(paths: Sequence[str | Path], meta: ModelMeta,
                  limit: int = MAX_CHECK_IMAGES) -> np.ndarray | None:
    """Up to `limit` decoded images from files, folders or .npz (bad ones skipped)."""
    inputs = collect_inputs(list(paths), meta)
    images = []
    for name, loader in inputs.items[:limit * 2]:
        try:
            images.append(loader())
        except DataError as err:
            log.warning("not using %s for the export check: %s", name, err)
        if len(images) == limit:
            break
    return np.stack(images) if images else None


def describe(meta: ModelMeta, fmt: str, out: Path) -> dict[str, Any]:
    """The sidecar / metadata: labels, input contract and stored preprocessing."""
    mode = "L" if meta.in_chans == 1 else "RGB"
    return {
        "format": EXPORT_FORMAT,
        "export": fmt,
        "file": out.name,
        "source_model": str(meta.path),
        # ties the export to the model it came from: a new model.pt written
        # beside it removes exports of any other hash (model_file.save_student)
        "model_sha256": meta.sha256,
        "arch": meta.arch,
        "labels": list(meta.classes),
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32",
                  "range": [0.0, 1.0], "batch": "dynamic", "channels": meta.in_chans,
                  "height": meta.image_size, "width": meta.image_size},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(meta.classes)],
                   "meaning": "softmax probabilities; column i is labels[i]"
                   + (f"; calibrated (logits / {meta.temperature:.6g})"
                      if meta.calibration else "; not calibrated")},
        "calibration": _calibration_entry(meta),
        "preprocess": {
            **meta.preprocess,
            "decode_size": meta.decode_size,
            "steps": [
                f"decode with PIL and convert to mode {mode}",
                f"resize to {meta.decode_size}x{meta.decode_size} with PIL BILINEAR",
                f"resize to {meta.image_size}x{meta.image_size}, bilinear with "
                "antialias (torch.nn.functional.interpolate)",
                "divide by 255 -> float32 [0, 1] NCHW (the model input)",
                f"inside the model: (x - {meta.mean}) / {meta.std}, student, "
                f"logits / {meta.temperature:.6g} (temperature), softmax",
            ],
        },
        "teacher": meta.teacher,
    }


def _calibration_entry(meta: ModelMeta) -> dict[str, Any]:
    """The temperature inside the export, and what the export leaves out."""
    return {
        "temperature": meta.temperature,
        "calibrated": meta.calibration is not None,
        "ood_check": "not in the export: run python -m client.predict for the "
        "in_distribution column" if meta.ood is not None else "none in the model",
    }


@contextmanager
def _quiet_deprecations() -> Iterator[None]:
    """Silence torch's deprecation notices for torch.jit and the legacy exporter."""
    # torch.jit and the TorchScript-based ONNX exporter are deprecated upstream but
    # remain the formats hospitals' runtimes load; the numeric check guards them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def to_torchscript(wrapper: nn.Module, example: torch.Tensor,
                   info: dict[str, Any]) -> bytes:
    """Traced TorchScript bytes with labels.json and preprocess.json extra files."""
    with _quiet_deprecations():
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files=_extra_files(info))
    return buf.getvalue()


def _extra_files(info: dict[str, Any]) -> dict[str, str]:
    """labels.json and preprocess.json texts stored inside an export."""
    contract = {k: info[k] for k in ("input", "output", "preprocess", "calibration")}
    return {"labels.json": json.dumps(info["labels"]),
            "preprocess.json": json.dumps(contract)}


def run_torchscript(blob: bytes, x: torch.Tensor) -> tuple[np.ndarray, dict[str, str]]:
    """Outputs of a TorchScript export on `x`, and its extra files."""
    extra = {"labels.json": "", "preprocess.json": ""}
    with _quiet_deprecations(), torch.inference_mode():
        module = torch.jit.load(io.BytesIO(blob), map_location="cpu",
                                _extra_files=extra)
        out = module(x).numpy()
    return out, {k: v.decode() if isinstance(v, bytes) else v for k, v in extra.items()}


def to_onnx(wrapper: nn.Module, example: torch.Tensor, info: dict[str, Any]) -> bytes:
    """ONNX bytes (dynamic batch) with labels and preprocessing in metadata_props."""
    onnx, _ = require_onnx()
    buf = io.BytesIO()
    with _quiet_deprecations():
        # dynamo=False: the torch.export-based exporter needs onnxscript, which the
        # `export` extra does not install; the numeric check below covers the graph.
        torch.onnx.export(wrapper, (example,), buf, dynamo=False,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"},
                                        OUTPUT_NAME: {0: "batch"}},
                          opset_version=ONNX_OPSET)
    proto = onnx.load_from_string(buf.getvalue())
    extra = _extra_files(info)
    props = {"format": EXPORT_FORMAT, "labels": extra["labels.json"],
             "preprocess": extra["preprocess.json"],
             "temperature": repr(float(info["calibration"]["temperature"]))}
    onnx.helper.set_model_props(proto, props)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def run_onnx(blob: bytes, x: torch.Tensor) -> tuple[np.ndarray, dict[str, str]]:
    """Outputs of an ONNX export on `x` (onnxruntime, CPU), and its metadata."""
    _, ort = require_onnx()
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    out = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    return out, dict(session.get_modelmeta().custom_metadata_map)


EXPORTERS = {"torchscript": (to_torchscript, run_torchscript),
             "onnx": (to_onnx, run_onnx)}


def check_export(blob: bytes, fmt: str, wrapper: nn.Module, x: torch.Tensor,
                 labels: list[str]) -> float:
    """Max |exported - PyTorch| on `x`; ModelError when too far off or mislabelled."""
    _, runner = EXPORTERS[fmt]
    got, extra = runner(blob, x)
    with torch.inference_mode():
        ref = wrapper(x).numpy()
    if got.shape != ref.shape:
        raise ModelError(f"{fmt} export returns shape {got.shape} for {tuple(x.shape)}"
                         f" inputs, PyTorch {ref.shape}; the export is not usable")
    diff = float(np.max(np.abs(got - ref))) if got.size else 0.0
    if not np.isfinite(got).all() or diff > TOLERANCE:
        raise ModelError(f"{fmt} export differs from PyTorch by {diff:.3g} (> "
                         f"{TOLERANCE}) on {len(x)} inputs; not writing it")
    stored = json.loads(extra.get("labels.json") or extra.get("labels") or "null")
    if stored != labels:
        raise ModelError(f"{fmt} export carries labels {stored}, expected {labels}")
    return diff


def export_model(model_path: str | Path, fmt: str, out: str | Path | None = None,
                 check_images: Sequence[str | Path] = (), seed: int = 0
                 ) -> ExportResult:
    """Export, check against PyTorch, then write the model and its sidecar JSON."""
    if fmt not in EXPORTERS:
        raise ModelError(f"export format {fmt!r} is not valid; use one of {FORMATS}")
    if fmt == "onnx":
        require_onnx()  # fail before any work
    model, meta = load_model(model_path)
    out = Path(out) if out else meta.path.with_name("model" + SUFFIXES[fmt])
    info = describe(meta, fmt, out)
    wrapper = ExportWrapper(model, meta.mean, meta.std, meta.temperature).eval()
    gen = torch.Generator().manual_seed(seed)
    shape = (meta.in_chans, meta.image_size, meta.image_size)
    example = torch.rand((2, *shape), generator=gen)
    blob = EXPORTERS[fmt][0](wrapper, example, info)
    # A batch size other than the traced one catches shapes frozen into the graph.
    checks = [torch.rand((3, *shape), generator=gen)]
    samples = sample_images(check_images, meta) if check_images else None
    if samples is not None:
        checks.append(unit_images(samples, meta))
    x = torch.cat(checks)
    diff = check_export(blob, fmt, wrapper, x, list(meta.classes))
    info["check"] = {"max_abs_diff": diff, "tolerance": TOLERANCE, "inputs": len(x),
                     "sample_images": 0 if samples is None else len(samples)}
    sidecar = out.with_name(out.name + ".json")
    atomic_write_bytes(out, blob)
    atomic_write_bytes(sidecar, json.dumps(info, indent=2).encode())
    log.info("exported %s as %s to %s (max abs diff %.3g on %d inputs)",
             meta.path, fmt, out, diff, len(x))
    return ExportResult(out, sidecar, diff, len(x))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m server.export",
        description="Export the final student with its preprocessing and labels.",
        epilog="Exit status: 0 on success, 2 on any error (one line; --debug "
               "for the traceback).",
    )
    ap.add_argument("model", help="run folder (uses final/model.pt) or model.pt")
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--out", help="output file (default: next to model.pt)")
    ap.add_argument("--check-images", nargs="*", default=[], metavar="PATH",
                    help="images, folders or .npz to include in the PyTorch check")
    ap.add_argument("--debug", action="store_true", help="tracebacks on errors")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        res = export_model(args.model, args.format, args.out, args.check_images)
    except FedKDError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {res.path} ({args.format}) and {res.sidecar}; checked {res.checked} "
          f"inputs against PyTorch: max abs diff {res.max_abs_diff:.3g} "
          f"(tolerance {TOLERANCE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
