"""The site's part in calibrating the final model: sums over its own images.

After the last round the server sends the final student twice, in query
messages (`server/calibration.py`). Each time the site runs it over its own
images and replies sums only, never an image, a label or one image's output:

- `calibration_stats`: the summed NLL at every temperature of the fixed grid on
  its held-out test part (common/calibration.py), and the sums over its
  training images' pooled student features that the out-of-distribution
  reference is fitted from (per class when `privacy.share_class_counts`, else
  class-agnostic; common/ood.py);
- `threshold_stats`: the histogram of its held-out images' scores under the
  federation's reference, and its calibration bins (common/metrics.py) at
  T = 1 and at the federation's temperature.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from client.site.prepared import PreparedSite
from common import calibration, ood
from common.config import ExperimentConfig
from common.metrics import calibration_bins
from common.models.student import create_student, student_outputs
from common.serialization import STUDENT_PREFIX, load_into


def _student(
    cfg: ExperimentConfig, site: PreparedSite, arrays: ArrayRecord, num_classes: int
) -> nn.Module:
    """The received (final) student on the site's device."""
    student = create_student(cfg.student.arch, num_classes, site.channels)
    load_into(student, arrays, STUDENT_PREFIX)
    return student.to(site.device)


def _outputs(student: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(pooled features, logits) as float64 numpy."""
    feats, logits = student_outputs(student, x)
    return feats.double().numpy(), logits.double().numpy()


def calibration_stats(
    cfg: ExperimentConfig, site: PreparedSite, arrays: ArrayRecord, num_classes: int
) -> dict[str, np.ndarray]:
    """`calib.` NLL sums (held-out part) and `ood.` feature sums (training images)."""
    student = _student(cfg, site, arrays, num_classes)
    out: dict[str, np.ndarray] = {}
    if cfg.calibration.temperature:
        _, logits = _outputs(student, site.test_x)
        labels = site.test_y.cpu().numpy()
        out.update(
            calibration.to_arrays(calibration.nll_sums(logits, labels), len(labels))
        )
    if cfg.calibration.ood == "mahalanobis":
        # the unaugmented view (view 0) of every training image
        feats, _ = _outputs(student, site.train.x[0])
        if cfg.privacy.share_class_counts:  # per class: labelled images only
            keep = site.train.labelled.cpu().numpy()
            labels = site.train.y.cpu().numpy()[keep]
            stats = ood.feature_stats(feats[keep], labels, num_classes)
        else:  # class-agnostic: no per-class count leaves the site
            stats = ood.feature_stats(feats, None, num_classes)
        out.update(ood.to_arrays(stats))
    return out


def threshold_stats(
    cfg: ExperimentConfig,
    site: PreparedSite,
    arrays: ArrayRecord,
    num_classes: int,
    reference: ood.Reference | None,
    temperature: float,
) -> dict[str, np.ndarray]:
    """Held-out score histogram (`ood.hist`) and calibration bins (`calib.bins_*`)."""
    student = _student(cfg, site, arrays, num_classes)
    feats, logits = _outputs(student, site.test_x)
    labels = site.test_y.cpu().numpy()
    out = calibration.bins_to_arrays(
        calibration_bins(labels, calibration.scaled_probs(logits, 1.0)),
        calibration_bins(labels, calibration.scaled_probs(logits, temperature)),
    )
    if reference is not None:
        out.update(ood.hist_to_arrays(ood.score_histogram(reference.scores(feats))))
    return out


__all__ = ["calibration_stats", "threshold_stats"]
