"""Predict with a distilled student: images, folders or MedMNIST-style .npz -> CSV.

    python -m client.predict --model RUN_DIR_OR_MODEL_PT INPUT... [--out preds.csv]

INPUT is any mix of image files (PNG, JPEG, ...), folders (searched recursively,
files in sorted order, hidden ones skipped: the walk training uses) and
MedMNIST-layout .npz files (`--npz-split`, default test; rows are named
`file.npz#test[i]`). The CSV (stdout unless --out) has one
row per image: path, predicted label, and `p_<label>` per class; with a model
that carries an out-of-distribution reference also `in_distribution` (true /
false) and `ood_score` (about 1 for images like the training data; above the
model's threshold the image is flagged false). Flagged images keep their
probabilities; one line on stderr says how many were flagged (a louder one
when most were). Probabilities are temperature-scaled when the model carries a
temperature (`final/model.pt`, fitted after training; server/calibration.py).

Images are decoded and resized exactly as the sites decoded them for training:
the stored preprocessing (`final/model.pt`) is read, never re-declared here
(input expansion and decoding: `common/data/inputs.py`, shared with export).

Exit status: 0 when at least one image was predicted (unreadable images are
skipped and listed on stderr), 1 when no image could be predicted, 2 when the
model or the arguments are unusable (one-line error; --debug shows the trace).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from torch import nn

from common.data.inputs import (
    NPZ_SPLITS,
    Inputs,
    Skipped,
    collect_inputs,
    match_channels,
)
from common.data.views import to_student_tensor
from common.errors import DataError, FedKDError
from common.model_file import ModelMeta, load_model
from common.models.student import student_features

log = logging.getLogger(__name__)

EXIT_OK, EXIT_NONE_PREDICTED, EXIT_ERROR = 0, 1, 2


@dataclass
class Batch:
    """One batch of predictions: row names, probabilities, OOD scores (or None)."""

    names: list[str]
    probs: np.ndarray  # (N, K) float32, temperature-scaled when calibrated
    scores: np.ndarray | None  # (N,) float64; None without an OOD reference


@torch.inference_mode()
def score_images(model: nn.Module, meta: ModelMeta, images: np.ndarray,
                 batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities (N, K) float32, OOD scores (N,) or None) for uint8 NHWC images.

    Probabilities are softmax(logits / T) with the model's stored temperature
    (T = 1 without one); scores come from its stored OOD reference.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(
            f"images must be uint8 (N, H, W[, C]); got {images.dtype} {images.shape}"
        )
    if images.ndim == 3:
        images = images[..., None]
    images = match_channels(images, meta.in_chans)
    out = np.empty((len(images), len(meta.classes)), dtype=np.float32)
    scores = np.empty(len(images)) if meta.ood is not None else None
    for start in range(0, len(images), batch_size):
        x = to_student_tensor(images[start:start + batch_size], meta.image_size)
        if scores is None:
            logits = model(x).float()
        else:
            feats, logits = student_features(model, x)
            scores[start:start + len(x)] = meta.ood.scores(feats.double().numpy())
        probs = torch.softmax(logits.float() / meta.temperature, dim=1)
        out[start:start + len(x)] = probs.numpy()
    return out, scores


def predict_images(model: nn.Module, meta: ModelMeta, images: np.ndarray,
                   batch_size: int = 64) -> np.ndarray:
    """Class probabilities (N, K) float32 for uint8 NHWC images of any size."""
    return score_images(model, meta, images, batch_size)[0]


def _load(item: tuple[str, Callable[[], np.ndarray]]) -> np.ndarray | Skipped:
    name, loader = item
    try:
        return loader()
    except DataError as err:
        return Skipped(name, str(err))


def iter_batches(model: nn.Module, meta: ModelMeta, inputs: Inputs,
                 batch_size: int = 64, workers: int = 4) -> Iterator[Batch]:
    """Yield one Batch per `batch_size` inputs; bad images go to skipped."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PIL frees the GIL
        for start in range(0, len(inputs.items), batch_size):
            batch = inputs.items[start:start + batch_size]
            names, images = [], []
            for (name, _), img in zip(batch, pool.map(_load, batch), strict=True):
                if isinstance(img, Skipped):
                    log.warning("skipping %s: %s", img.name, img.reason)
                    inputs.skipped.append(img)
                else:
                    names.append(name)
                    images.append(img)
            if images:
                probs, scores = score_images(model, meta, np.stack(images),
                                             batch_size)
            else:
                probs = np.empty((0, len(meta.classes)), np.float32)
                scores = None if meta.ood is None else np.empty(0)
            yield Batch(names, probs, scores)


def iter_predictions(model: nn.Module, meta: ModelMeta, inputs: Inputs,
                     batch_size: int = 64, workers: int = 4
                     ) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yield (row names, probabilities) batch by batch; bad images go to skipped."""
    for batch in iter_batches(model, meta, inputs, batch_size, workers):
        yield batch.names, batch.probs


def csv_header(meta: ModelMeta) -> list[str]:
    """CSV columns: path, predicted label, p_<label> per class, then (with an OOD
    reference) in_distribution and ood_score."""
    ood = ["in_distribution", "ood_score"] if meta.ood is not None else []
    return ["path", "label", *(f"p_{c}" for c in meta.classes), *ood]


def _rows(batch: Batch, meta: ModelMeta) -> Iterator[list]:
    scores = batch.scores if batch.scores is not None else [None] * len(batch.names)
    for name, p, s in zip(batch.names, batch.probs, scores, strict=True):
        row = [name, meta.classes[int(p.argmax())], *(f"{v:.6f}" for v in p)]
        if s is not None:
            ok = bool(meta.ood.in_distribution(s))
            row += ["true" if ok else "false", f"{s:.4g}"]
        yield row


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m client.predict",
        description="Predict with a distilled student; writes one CSV row per image.",
        epilog="Exit status: 0 if any image was predicted (unreadable ones are "
               "listed on stderr), 1 if none, 2 if the model or arguments are "
               "unusable.",
    )
    ap.add_argument("--model", required=True,
                    help="run folder (uses final/model.pt) or a model.pt file")
    ap.add_argument("inputs", nargs="+",
                    help="image files, folders (recursive) and .npz files")
    ap.add_argument("--out", help="CSV file to write (default: stdout)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--npz-split", choices=NPZ_SPLITS, default="test",
                    help="which <split>_images of .npz inputs to predict")
    ap.add_argument("--quiet", action="store_true",
                    help="no progress bar or summary (lines about images that do "
                         "not look like the training data are still printed)")
    ap.add_argument("--debug", action="store_true", help="tracebacks on errors")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error(f"--batch-size={args.batch_size}; use a positive integer")
    return args


def _write(out: TextIO, model: nn.Module, meta: ModelMeta, inputs: Inputs,
           args: argparse.Namespace) -> tuple[int, int]:
    """Stream predictions as CSV rows into `out`; return (written, flagged)."""
    from tqdm import tqdm

    writer = csv.writer(out)
    writer.writerow(csv_header(meta))
    n = flagged = 0
    large = len(inputs.items) > args.batch_size
    show = large and not args.quiet and sys.stderr.isatty()
    with tqdm(total=len(inputs.items), unit="img", disable=not show,
              file=sys.stderr) as bar:
        for batch in iter_batches(model, meta, inputs, args.batch_size):
            writer.writerows(_rows(batch, meta))
            n += len(batch.names)
            if batch.scores is not None:
                flagged += int((~meta.ood.in_distribution(batch.scores)).sum())
            bar.update(min(args.batch_size, bar.total - bar.n))  # skipped count too
    return n, flagged


def unavailable_line(meta: ModelMeta) -> str | None:
    """One line saying what the model file lacks (calibration, OOD), or None."""
    missing = [what for what, have in (
        ("calibration temperature", meta.calibration is not None),
        ("out-of-distribution reference", meta.ood is not None),
    ) if not have]
    if not missing:
        return None
    effect = {
        1: ("probabilities are uncalibrated" if meta.calibration is None
            else "inputs are not checked against the training data"),
        2: "probabilities are uncalibrated and inputs are not checked against "
           "the training data",
    }[len(missing)]
    return (f"note: {meta.path} carries no {' and no '.join(missing)} (saved "
            f"before fedkd stored them, or fitted with calibration off): {effect}")


def flagged_line(meta: ModelMeta, flagged: int, n: int) -> str | None:
    """The summary of flagged images: one line, louder when most are flagged."""
    if not flagged or meta.ood is None:
        return None
    what = f"{flagged} of {n} images do not look like the training data"
    data = f" ({meta.ood.data})" if meta.ood.data else ""
    if 2 * flagged > n:
        return (f"WARNING: {what}{data}: check the modality. Their probabilities "
                "are not reliable (in_distribution=false in the CSV).")
    return (f"note: {what}{data}; they have in_distribution=false in the CSV "
            "and their probabilities are not reliable")


def _run(args: argparse.Namespace) -> int:
    model, meta = load_model(args.model)
    inputs = collect_inputs(args.inputs, meta, args.npz_split)
    if not args.quiet and (note := unavailable_line(meta)):
        print(note, file=sys.stderr)
    if args.out:
        out_path = Path(args.out)
        tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                n, flagged = _write(fh, model, meta, inputs, args)
            os.replace(tmp, out_path)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        n, flagged = _write(sys.stdout, model, meta, inputs, args)
    for s in inputs.skipped:
        print(f"skipped {s.name}: {s.reason}", file=sys.stderr)
    if line := flagged_line(meta, flagged, n):  # printed even with --quiet
        print(line, file=sys.stderr)
    if not args.quiet:
        dest = args.out or "stdout"
        print(f"predicted {n} image(s) with {meta.path} -> {dest}; "
              f"skipped {len(inputs.skipped)}", file=sys.stderr)
    return EXIT_OK if n else EXIT_NONE_PREDICTED


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except FedKDError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
