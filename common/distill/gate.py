"""The KD gate: how much to follow the teacher this round.

The teacher probe (the head giving this round's soft targets) and the global
student just received are compared by balanced ACC on labelled images neither
trains on (the sites' held-out test parts). When the teacher is not worse, the
weight is 1; it falls linearly with the teacher's shortfall and reaches
`floor` at a shortfall of `margin`. A teacher that knows nothing (a random-init
backbone) therefore stops pulling the student down once the student has
overtaken it.

A reference that lacks a class cannot judge a teacher that is wrong only on
that class: balanced ACC over one class is that class's recall. So a site
judges alone only when its reference holds every class `min_per_class` times
(`covers_every_class`); otherwise it follows the federation's verdict, which
the server computes from the per-class counts every site reports
(`per_class_correct`, summed; `balanced_from_counts`): the union of the
sites' references holds every class whenever the federation does.
"""

from __future__ import annotations

import math

import numpy as np


def gate_weight(
    teacher_score: float, student_score: float, *, floor: float, margin: float
) -> float:
    """Weight in [floor, 1] for the teacher's terms, from two held-out scores."""
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"gate floor={floor}; must be in [0, 1]")
    if margin <= 0:
        raise ValueError(f"gate margin={margin}; must be > 0")
    if math.isnan(teacher_score) or math.isnan(student_score):
        return 1.0  # nothing to compare on (empty test part): keep the method
    shortfall = student_score - teacher_score
    if shortfall <= 0:
        return 1.0
    return max(floor, 1.0 - shortfall / margin * (1.0 - floor))


def covers_every_class(
    labels: np.ndarray, num_classes: int, min_per_class: int
) -> bool:
    """Whether a reference holds each of num_classes at least min_per_class times."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    return bool(len(counts) == num_classes and counts.min() >= min_per_class)


def per_class_correct(
    labels: np.ndarray, probs: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(correct predictions per class, items per class) of `probs` on `labels`."""
    y = np.asarray(labels, dtype=np.int64)
    hit = np.asarray(probs).argmax(1) == y
    counts = np.bincount(y, minlength=num_classes)
    correct = np.bincount(y, weights=hit.astype(np.float64), minlength=num_classes)
    return correct, counts


def balanced_from_counts(correct: np.ndarray, counts: np.ndarray) -> float:
    """Balanced ACC from summed per-class counts; nan unless every class occurs."""
    counts = np.asarray(counts, dtype=np.float64)
    if len(counts) == 0 or counts.min() <= 0:
        return math.nan
    return float(np.mean(np.asarray(correct, dtype=np.float64) / counts))


GATE_COUNT_KEYS = ("gate_teacher_correct", "gate_student_correct", "gate_count")


def gate_counts(
    labels: np.ndarray, teacher_probs: np.ndarray, student_probs: np.ndarray, k: int
) -> dict[str, float]:
    """Per-class counts a site reports, as flat metrics `<key>_<class>`."""
    t_hit, n = per_class_correct(labels, teacher_probs, k)
    s_hit, _ = per_class_correct(labels, student_probs, k)
    out = {}
    for key, values in zip(GATE_COUNT_KEYS, (t_hit, s_hit, n), strict=True):
        out.update({f"{key}_{c}": float(v) for c, v in enumerate(values)})
    return out


def federation_weight(
    site_metrics: list[dict[str, float]], *, floor: float, margin: float
) -> float | None:
    """The gate weight from every site's summed counts; None when a class is missing.

    Sites without counts (class counts not shared) are left out of the sums.
    """
    sums: dict[str, float] = {}
    for m in site_metrics:
        for key, v in m.items():
            if key.startswith(GATE_COUNT_KEYS):
                sums[key] = sums.get(key, 0.0) + float(v)
    k = sum(1 for key in sums if key.startswith("gate_count_"))
    if k == 0:
        return None

    def vec(name: str) -> np.ndarray:
        return np.array([sums.get(f"{name}_{c}", 0.0) for c in range(k)])

    counts = vec("gate_count")
    t_score = balanced_from_counts(vec("gate_teacher_correct"), counts)
    s_score = balanced_from_counts(vec("gate_student_correct"), counts)
    if math.isnan(t_score) or math.isnan(s_score):
        return None
    return gate_weight(t_score, s_score, floor=floor, margin=margin)


__all__ = [
    "federation_weight",
    "gate_counts",
    "balanced_from_counts",
    "covers_every_class",
    "gate_weight",
    "per_class_correct",
]
