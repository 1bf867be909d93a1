"""Classification metrics with MedMNIST evaluator semantics (ACC, AUC)."""

from __future__ import annotations

import math

import numpy as np


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Share of items whose arg-max class equals the label."""
    if len(labels) == 0:
        return math.nan
    return float((probs.argmax(axis=1) == labels).mean())


def balanced_accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean per-class recall over the classes present in `labels`."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) == 0:
        return math.nan
    pred = probs.argmax(axis=1)
    recalls = [float((pred[labels == c] == c).mean()) for c in np.unique(labels)]
    return float(np.mean(recalls))


def roc_auc_score(labels: np.ndarray, scores: np.ndarray) -> float:
    """Binary ROC AUC (trapezoidal, ties count one half), as scikit-learn's.

    Written here because importing scikit-learn costs about 2 s, paid by every
    Flower message (a fresh process each); tests check it against sklearn.
    """
    labels = np.asarray(labels).reshape(-1).astype(bool)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    # Mann-Whitney U with average ranks for ties: the trapezoidal ROC area.
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), np.float64)
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(avg, counts)
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC as MedMNIST's evaluator computes it; NaN where it is undefined.

    Binary tasks use the score of class 1; multi-class tasks average the
    one-vs-rest AUC over classes. A class absent from `labels` makes its
    one-vs-rest AUC undefined, so it is left out of the mean (MedMNIST would
    raise); with fewer than two classes present the AUC is NaN.
    """
    labels = np.asarray(labels).reshape(-1)
    if len(np.unique(labels)) < 2:
        return math.nan
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    scores = []
    for c in range(probs.shape[1]):
        y = (labels == c).astype(int)
        if 0 < y.sum() < len(y):
            scores.append(roc_auc_score(y, probs[:, c]))
    return float(np.mean(scores)) if scores else math.nan


def summarize(labels: np.ndarray, probs: np.ndarray, loss: float) -> dict[str, float]:
    """ACC, balanced ACC, AUC, loss and count (the keys sent over the wire)."""
    return {
        "acc": accuracy(labels, probs),
        "bacc": balanced_accuracy(labels, probs),
        "auc": auc(labels, probs),
        "loss": float(loss),
        "num-examples": float(len(labels)),
    }


ECE_BINS = 15  # equal-width confidence bins, as Guo et al. (2017) report ECE


def calibration_bins(
    labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS
) -> np.ndarray:
    """Per confidence bin: (count, sum of confidences, correct count), (3, bins).

    Sums, so the bins of several sites add up to the bins of their union.
    """
    labels = np.asarray(labels).reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1) if len(probs) else np.empty(0)
    correct = (probs.argmax(axis=1) == labels) if len(probs) else np.empty(0)
    # bin i holds confidences in (i/bins, (i+1)/bins]; 0 joins the first bin
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    out = np.zeros((3, bins))
    np.add.at(out[0], idx, 1.0)
    np.add.at(out[1], idx, conf)
    np.add.at(out[2], idx, correct.astype(np.float64))
    return out


def ece_from_bins(bins: np.ndarray) -> float:
    """Expected calibration error from (summed) `calibration_bins`; NaN if empty."""
    count, conf, correct = np.asarray(bins, dtype=np.float64)
    total = count.sum()
    if total == 0:
        return math.nan
    return float(np.abs(conf - correct).sum() / total)


def expected_calibration_error(
    labels: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE: the count-weighted mean |confidence - accuracy| over confidence bins."""
    return ece_from_bins(calibration_bins(labels, probs, bins))
