"""The closed-form federated teacher head (teacher.head=closed_form).

Each site's handshake reply carries its ridge statistics (per-class counts,
feature sums and Gram matrices of its labelled teacher features;
common/models/ridge.py). Their sum is the statistic of the pooled features,
so the head solved from it is the pooled ridge probe whatever the partition
(Fed3R, Fani et al., ICML 2024). It is solved once per (re)start, from the
sites that answered the handshake, and sent with the student every round;
the sites distil from it and never train it, so it cannot drift.

With `privacy.secure_aggregation` the statistics never leave a site in the
clear: after the handshake the server asks every site for them through
Flower's SecAgg+ (`secure_stats`, server/secagg.py `secure_sum`) and unmasks
only their sum. For that each site scales its sums into [-1, 1] by public
factors: the largest labelled row count (views x the handshake's labelled
images) and 2^e, e the largest of the sites' `teacher-feature-log2` (a
power of two above the site's largest feature value: the one extra fact the
handshake then carries). Each value travels as two limbs
(common/secure_sum.py), so the sum is exact to float64 precision, not only
to the quantiser's step of 2 / Q of the scale.

Ridge scores are not logits, so the server also scales the head (one factor
for every site, `ridge.gaussian_logit_scale`, fitted from the same sums): a
site needs no labelled image of its own to distil from it.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from common.config import ExperimentConfig
from common.errors import FedKDError, MessageError
from common.models import ridge
from common.secure_sum import SumRequest, quantization_levels
from common.serialization import HEAD_PREFIX, STATS_RECORD
from common.site_info import SiteInfo

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


def _sum_request(cfg: ExperimentConfig, infos: list[SiteInfo]) -> SumRequest:
    """What to ask the sites for: the ridge arrays and their public scales."""
    rows = float(max(cfg.teacher.views * max(i.num_labelled for i in infos), 1))
    bounds = [i.teacher_feature_log2 for i in infos]
    if None in bounds:
        missing = sorted(i.name for i in infos if i.teacher_feature_log2 is None)
        raise MessageError(
            f"sites {missing} sent no 'teacher-feature-log2' for the secure sum of "
            "the closed-form head (is every site running the same fedkd version "
            "with a teacher?)"
        )
    f = 2.0 ** max(bounds)
    keys = [f"{ridge.PREFIX}class_counts", f"{ridge.PREFIX}class_sum",
            f"{ridge.PREFIX}class_gram"]
    levels = quantization_levels(cfg.privacy.secagg_quantization, len(infos))
    return SumRequest("ridge", keys, [rows, rows * f, rows * f * f], levels)


def secure_stats(
    grid, cfg: ExperimentConfig, infos: list[SiteInfo], names: dict[int, str]
) -> ridge.RidgeStats:
    """The sites' summed ridge statistics through SecAgg+ (no site's in the clear)."""
    from server.secagg import secure_sum  # Flower's legacy stack, on demand

    request = _sum_request(cfg, infos)
    conf = ConfigRecord({
        "experiment": cfg.to_yaml(), "num-classes": len(infos[0].classes),
        **request.to_config(),
    })
    sent = [
        Message(content=RecordDict({"arrays": ArrayRecord(), "config": conf}),
                dst_node_id=node, message_type=MessageType.TRAIN)
        for node in sorted(names)
    ]
    sums, missing = secure_sum(grid, cfg, sent, names, request)
    if missing:  # the head must be the pooled probe of the sites that train
        raise FedKDError(
            "the secure sum of the closed-form head's statistics lacks "
            + "; ".join(missing)
        )
    arrays = dict(zip(request.keys, sums, strict=True))
    counts = arrays[request.keys[0]]
    arrays[request.keys[0]] = np.rint(counts).astype(np.int64)
    arrays[f"{ridge.PREFIX}version"] = np.array([ridge.VERSION], dtype=np.int64)
    log.info(
        "closed-form head statistics summed through SecAgg+ over %d sites "
        "(largest count error before rounding %.2g)",
        len(sent), float(np.abs(counts - arrays[request.keys[0]]).max()),
    )
    try:
        return ridge.from_arrays(arrays)
    except ValueError as err:
        raise FedKDError(f"the securely summed ridge statistics: {err}") from err


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
        "closed-form teacher head from %s, %d labelled feature rows, "
        "class counts %s (lambda %g, logit scale %.3g)",
        ", ".join(sorted(stats)),
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
