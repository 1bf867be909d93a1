"""Screening of the sites' replies before aggregation: kept, or recorded and why.

Pure functions over one round's replies. The federation loop calls `screen` on
the train replies and aggregates only what it accepts, with the Flower rule;
`screen_evaluate` does the same for evaluate replies. A site that failed, sent
nothing in time, or sent a malformed, forbidden, non-finite or outlying update
is never dropped silently: it is named in the `RoundReport`, which goes into the
history row of the round.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict

from common.config import ExperimentConfig
from common.serialization import (
    CONTROL_DELTA_PREFIX,
    PROFILE_RECORD,
    record_bytes,
    reply_prefixes,
    to_float32,
)
from server.strategy import uniform_dp_supported

log = logging.getLogger(__name__)


@dataclass
class RoundReport:
    """What happened to the replies of one round (written into the history)."""

    sampled: int = 0
    received: int = 0
    # replies that passed screening and went into the aggregate
    accepted: int = 0
    failed: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    sites: dict[str, dict[str, float]] = field(default_factory=dict)
    bytes_down: int = 0
    bytes_up: int = 0

    def add(self, other: RoundReport) -> None:
        """Append another phase's failures, rejections and per-site metrics."""
        self.failed += other.failed
        self.rejected += other.rejected
        for name, values in other.sites.items():
            self.sites.setdefault(name, {}).update(values)


def site_name(msg: Message, names: Mapping[int, str]) -> str:
    """The site a reply came from: its own word, else the handshake's name."""
    if not msg.has_error() and "site" in msg.content.config_records:
        return str(msg.content["site"].get("name", msg.metadata.src_node_id))
    node = msg.metadata.src_node_id
    return names.get(node, f"node-{node}")


def _reason(msg: Message) -> str:
    """The first line of a failed reply's reason (tracebacks stay in the log)."""
    return (msg.error.reason or "no reason given").strip().splitlines()[0]


def _finite(record: ArrayRecord) -> bool:
    return all(
        np.isfinite(record[k].numpy()).all()
        for k in record.keys()
        if np.issubdtype(record[k].numpy().dtype, np.floating)
    )


def _update_norm(record: ArrayRecord, reference: ArrayRecord) -> float:
    total = 0.0
    for k in record.keys():
        a = record[k].numpy()
        if np.issubdtype(a.dtype, np.floating) and k in reference:
            d = a.astype(np.float64) - reference[k].numpy().astype(np.float64)
            total += float((d * d).sum())
    return math.sqrt(total)


def _missing(
    sent: Sequence[Message],
    replies: Sequence[Message],
    cfg: ExperimentConfig,
    names: Mapping[int, str],
    phase: str,
) -> list[str]:
    """One failure line per asked site that sent nothing back before the timeout."""
    replied = {m.metadata.src_node_id for m in replies}
    suffix = "" if phase == "train" else f" ({phase})"
    out = []
    for node in (m.metadata.dst_node_id for m in sent):
        if node not in replied:
            name = names.get(node, f"node-{node}")
            out.append(
                f"{name}{suffix}: no reply within federation.round_timeout="
                f"{cfg.federation.round_timeout:g}s"
            )
            log.warning("site %s sent no %s reply in time", name, phase)
    return out


def _train_problem(msg: Message, cfg: ExperimentConfig) -> str | None:
    """Why a (non-error) train reply cannot be aggregated, or None when it can."""
    content = msg.content
    if "arrays" not in content.array_records or len(content.metric_records) != 1:
        return "malformed reply"
    allowed = reply_prefixes(cfg.federation.strategy)
    bad = [k for k in content["arrays"].keys() if not k.startswith(allowed)]
    if bad:
        return f"forbidden arrays {bad[:3]}"
    if cfg.federation.strategy == "scaffold":
        problem = _control_problem(content["arrays"])
        if problem:
            return problem
    if not _finite(content["arrays"]):
        return "non-finite weights"
    return None


def _control_problem(arrays: ArrayRecord) -> str | None:
    """SCAFFOLD: why the reply's Delta c_i does not fit its model arrays, if so."""
    deltas = [k for k in arrays.keys() if k.startswith(CONTROL_DELTA_PREFIX)]
    if not deltas:
        return f"malformed reply: no '{CONTROL_DELTA_PREFIX}' control-variate update"
    for key in deltas:
        target = key[len(CONTROL_DELTA_PREFIX) :]
        if target not in arrays.keys():
            return f"malformed reply: '{key}' corrects no array of the reply"
        if arrays[key].shape != arrays[target].shape:
            return (
                f"malformed reply: '{key}' has shape {tuple(arrays[key].shape)}, "
                f"'{target}' {tuple(arrays[target].shape)}"
            )
    return None


def _as_float32(msg: Message) -> Message:
    """A copy of the reply whose arrays are float32 (the wire may carry float16)."""
    out = copy.copy(msg)  # same metadata (sender, round); new content below
    arrays = to_float32(msg.content["arrays"])
    out.content = RecordDict({**msg.content, "arrays": arrays})
    return out


def _drop_outliers(
    replies: list[Message],
    reference: ArrayRecord,
    cfg: ExperimentConfig,
    names: Mapping[int, str],
) -> tuple[list[Message], list[str]]:
    """(kept replies, rejection lines) under federation.norm_outlier_factor."""
    factor = cfg.federation.norm_outlier_factor
    if factor <= 0 or len(replies) < 3:
        return replies, []
    if cfg.privacy.dp and uniform_dp_supported(cfg):
        # A median-relative cut lets one site's update decide whether another
        # site counts, which breaks the DP sensitivity bound; clipping already
        # bounds every update (server.privacy).
        return replies, []
    ref = to_float32(reference)
    norms = [_update_norm(m.content["arrays"], ref) for m in replies]
    median = float(np.median(norms))
    keep, rejected = [], []
    for msg, norm in zip(replies, norms, strict=True):
        if median > 0 and norm > factor * median:
            name = site_name(msg, names)
            rejected.append(
                f"{name}: update norm {norm:.3g} > {factor:g} x median {median:.3g}"
            )
            log.warning(
                "rejected outlier update of %s (norm %.3g, median %.3g)",
                name,
                norm,
                median,
            )
        else:
            keep.append(msg)
    return keep, rejected


def screen(
    replies: Iterable[Message],
    reference: ArrayRecord,
    cfg: ExperimentConfig,
    names: Mapping[int, str],
    *,
    sent: Sequence[Message] = (),
) -> tuple[list[Message], RoundReport]:
    """(train replies fit to aggregate, as float32 copies; the round's report).

    `reference` is the global model the round sent (the outlier cut measures
    updates from it), `names` the handshake's site names by node id (failed
    replies carry none), `sent` the round's train messages (whom we asked).
    """
    replies = list(replies)
    report = RoundReport(sampled=len(sent), received=len(replies))
    report.bytes_down = sum(record_bytes(m.content["arrays"]) for m in sent)
    report.failed += _missing(sent, replies, cfg, names, "train")
    good: list[Message] = []
    for msg in replies:
        name = site_name(msg, names)
        if msg.has_error():
            report.failed.append(f"{name}: {_reason(msg)}")
            log.warning("site %s failed this round: %s", name, msg.error.reason)
            continue
        problem = _train_problem(msg, cfg)
        if problem:
            report.rejected.append(f"{name}: {problem}")
            log.warning("rejected reply of %s: %s", name, problem)
            continue
        report.bytes_up += record_bytes(msg.content["arrays"])
        good.append(_as_float32(msg))
    good, outliers = _drop_outliers(good, reference, cfg, names)
    report.rejected += outliers
    report.accepted = len(good)
    for msg in good:
        record_site_metrics(report, msg, names)
    return good, report


def record_site_metrics(
    report: RoundReport, msg: Message, names: Mapping[int, str]
) -> None:
    """A train reply's scalar metrics and seconds per phase, as `train/<key>`."""
    report.sites.setdefault(site_name(msg, names), {}).update(
        {
            f"train/{k}": float(v)
            for k, v in [*msg.content["metrics"].items(), *_profile(msg)]
        }
    )


def _profile(msg: Message) -> list[tuple[str, float]]:
    """The site's seconds per phase of the message (`t_<phase>_s`), if it sent them."""
    record = msg.content.config_records.get(PROFILE_RECORD)
    if record is None:
        return []
    return [(k, float(v)) for k, v in record.items() if isinstance(v, (int, float))]


def screen_evaluate(
    replies: Iterable[Message],
    cfg: ExperimentConfig,
    names: Mapping[int, str],
    *,
    sent: Sequence[Message] = (),
) -> tuple[dict[str, dict[str, float]], RoundReport]:
    """(metrics by site name of the usable evaluate replies; the phase's report)."""
    replies = list(replies)
    report = RoundReport(failed=_missing(sent, replies, cfg, names, "evaluate"))
    rows: dict[str, dict[str, float]] = {}
    for msg in replies:
        name = site_name(msg, names)
        if msg.has_error():
            report.failed.append(f"{name} (evaluate): {_reason(msg)}")
            continue
        if len(msg.content.metric_records) != 1:
            # recorded like a malformed train reply, never indexed into below
            report.rejected.append(
                f"{name} (evaluate): malformed reply "
                f"({len(msg.content.metric_records)} metric records, expected 1)"
            )
            log.warning("rejected evaluate reply of %s: no metrics", name)
            continue
        metrics = next(iter(msg.content.metric_records.values()))
        rows[name] = {k: float(v) for k, v in metrics.items()}
        report.sites.setdefault(name, {}).update(
            {f"eval/{k}": v for k, v in [*rows[name].items(), *_profile(msg)]}
        )
    return rows, report
