"""FedExP: FedAvg with a server step set from the updates' norms.

Jhunjhunwala, Wang and Joshi, "FedExP: Speeding up Federated Averaging via
Extrapolation", ICLR 2023. With site updates d_i = w_i - w (weights p_i, the
example counts FedAvg uses) and their mean d = sum_i p_i d_i, the server moves

    w <- w + eta * d,   eta = max(1, sum_i p_i |d_i|^2 / (2 (|d|^2 + eps)))

When the sites agree, |d|^2 is close to the mean |d_i|^2 and eta stays near 1
(FedAvg); when their updates point different ways (label skew), averaging
shrinks d, and eta extrapolates. Flower has no FedExP, hence this file; the
mean itself is Flower's FedAvg.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

log = logging.getLogger(__name__)


def fedexp_step(
    reference: dict[str, np.ndarray],
    updates: list[dict[str, np.ndarray]],
    weights: list[float],
    eps: float,
) -> float:
    """FedExP's server step eta from the sites' models and the reference model.

    Only floating arrays present in the reference count (integer buffers and
    arrays the sites add this round carry no update).
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    keys = [
        k
        for k, v in reference.items()
        if np.issubdtype(v.dtype, np.floating) and all(k in u for u in updates)
    ]
    ref = {k: reference[k].astype(np.float64) for k in keys}
    sq_each = 0.0
    mean = {k: np.zeros_like(v) for k, v in ref.items()}
    for p, u in zip(w, updates, strict=True):
        for k in keys:
            d = u[k].astype(np.float64) - ref[k]
            sq_each += p * float((d * d).sum())
            mean[k] += p * d
    sq_mean = sum(float((m * m).sum()) for m in mean.values())
    return max(1.0, sq_each / (2.0 * (sq_mean + eps)))


class FedExP(FedAvg):
    """Flower's FedAvg mean, then FedExP's extrapolation from the reference model."""

    def __init__(self, *args, eps: float = 1e-3, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps
        # the global model this round started from (set by SafeAggregation)
        self.current_arrays: ArrayRecord | None = None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The weighted mean, moved eta times as far from the reference."""
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or self.current_arrays is None:
            return arrays, metrics
        ref = {k: self.current_arrays[k].numpy() for k in self.current_arrays.keys()}
        updates = [
            {k: m.content["arrays"][k].numpy() for k in m.content["arrays"].keys()}
            for m in replies
        ]
        weights = [float(m.content["metrics"][self.weighted_by_key]) for m in replies]
        eta = fedexp_step(ref, updates, weights, self.eps)
        out = {}
        for k in arrays.keys():
            avg = arrays[k].numpy()
            if k in ref and np.issubdtype(ref[k].dtype, np.floating):
                r = ref[k].astype(np.float64)
                avg = (r + eta * (avg.astype(np.float64) - r)).astype(avg.dtype)
            out[k] = Array(avg)
        log.debug("round %d: FedExP server step %.3f", server_round, eta)
        metrics = MetricRecord({**dict(metrics or {}), "server_step": eta})
        return ArrayRecord(out), metrics
