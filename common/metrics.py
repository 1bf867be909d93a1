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
