"""The closed-form federated teacher head (teacher.head=closed_form).

Each site's handshake reply carries its ridge statistics (per-class counts,
feature sums and Gram matrices of its labelled teacher features;
common/models/ridge.py). Their sum is the statistic of the pooled features,
so the head solved from it is the pooled ridge probe whatever the partition
(Fed3R, Fani et al., ICML 2024). It is solved once per (re)start, from the
sites that answered the handshake, and sent with the student every round;
the sites distil from it and never train it, so it cannot drift.

Ridge scores are not logits, so the server also scales the head (one factor
for every site, `ridge.gaussian_logit_scale`, fitted from the same sums): a
site needs no labelled image of its own to distil from it.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from common.config import ExperimentConfig
from common.errors import FedKDError, MessageError
from common.models import ridge
from common.serialization import HEAD_PREFIX, STATS_RECORD

log = logging.getLogger(__name__)


def read_stats(msg: Message, name: str) -> ridge.RidgeStats:
    """A site's ridge statistics from its handshake reply; errors name the site."""
    if STATS_RECORD not in msg.content.array_records:
        raise MessageError(
            f"site {name!r} sent no '{STATS_RECORD}' with teacher.head=closed_form "
            "(is it running the same fedkd version?)"
        )
    rec = msg.content[STATS_RECORD]
    try:
        return ridge.from_arrays({k: rec[k].numpy() for k in rec.keys()})
    except ValueError as err:
        raise MessageError(f"site {name!r}: bad ridge statistics: {err}") from err


def solve_head(
    cfg: ExperimentConfig, stats: dict[str, ridge.RidgeStats], classes: list[str]
) -> dict[str, np.ndarray]:
    """The head's arrays (`head.weight`, `head.bias`) from the sites' summed stats."""
    if not stats:
        raise FedKDError("teacher.head=closed_form: no site sent ridge statistics")
    total = ridge.sum_stats([stats[n] for n in sorted(stats)])
    try:
        weight, bias = ridge.solve(total, cfg.teacher.head_lambda, "balanced")
        scale = ridge.gaussian_logit_scale(total, weight, bias)
    except ValueError as err:  # e.g. a class no site holds a labelled image of
        raise FedKDError(
            f"teacher.head=closed_form cannot be solved from sites "
            f"{sorted(stats)} (classes {classes}): {err}"
        ) from err
    log.info(
        "closed-form teacher head from %d sites, %d labelled feature rows, "
        "class counts %s (lambda %g, logit scale %.3g)",
        len(stats),
        total.n,
        total.class_counts.tolist(),
        cfg.teacher.head_lambda,
        scale,
    )
    return {
        f"{HEAD_PREFIX}weight": (scale * weight).astype(np.float32),
        f"{HEAD_PREFIX}bias": (scale * bias).astype(np.float32),
    }


def with_head(arrays: ArrayRecord, head: dict[str, np.ndarray] | None) -> ArrayRecord:
    """`arrays` with the fixed head (re)attached; unchanged without one."""
    if not head:
        return arrays
    out = {k: arrays[k] for k in arrays.keys()}
    out.update({k: Array(v) for k, v in head.items()})
    return ArrayRecord(out)
