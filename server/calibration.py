"""Calibrate the final model from the sites' sums: a temperature and an OOD check.

After the last round `run_federation` calls `calibrate`, which sends the final
student to every site twice (query messages; client/site/calibration.py):

1. `query.calibrate`: each site replies its summed NLL over the fixed
   temperature grid on its held-out test part, and the sums over its training
   images' pooled student features. The server adds them up (in site-name
   order), picks the temperature (common/calibration.py) and fits the
   Mahalanobis reference (common/ood.py): exactly what the pooled images
   would give.
2. `query.ood_threshold` (with the reference and the temperature): each site
   replies the histogram of its held-out images' scores and its calibration
   bins; the summed histogram gives the threshold for
   `calibration.ood_false_alarm`, the summed bins the sites' ECE.

The temperature is fitted where `calibration.temperature_data` says: the
sites' summed held-out NLL (what a deployment has: the centre holds no
images), or, in a simulation whose server holds the global validation split,
that split (`auto`, the default). The sites' held-out parts carry each
site's scanner profile, the global test split does not, and the model's
confidence differs between the two: on the demo model the sites' parts gave
T = 0.96 and a global-test ECE of 0.074, the validation split T = 1.31 and
0.048 (README, "Calibration"). The OOD reference and threshold always
come from the sites. In a simulation the server then reports ECE before and
after, and the share flagged, on the global test split, which no step has
seen.

A site that fails is left out (logged). With fewer than the sites a round
needs, or with `privacy.dp` or `privacy.dp_sgd` (the sums carry no noise),
nothing is fitted: the model is saved without it, and the card and
`client.predict` say so.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from common import calibration, ood
from common.calibration import Calibration
from common.config import ExperimentConfig
from common.data.sources import describe_source
from common.errors import MessageError
from common.metrics import ece_from_bins, expected_calibration_error
from common.serialization import (
    CALIBRATE,
    CALIBRATION_RECORD,
    OOD_THRESHOLD,
    REFERENCE_RECORD,
    pack_stats,
)
from server.evaluation import GlobalEvaluator
from server.rounds import RoundContext, replies_to

log = logging.getLogger(__name__)

CANNOT_CATCH = (
    "The check compares an image with the training images in the student's "
    "feature space. It catches another modality, body part or colour mode, "
    "noise and blank or broken exports; it cannot catch a subtle change "
    "(a new scanner or protocol, other contrast or resolution of the same "
    "anatomy), a new disease or finding the model was never trained on, or "
    "an in-distribution image that is simply hard. A passed check does not "
    "make a prediction right."
)


@dataclass
class Fitted:
    """What calibration produced: stored in model.pt, and reported in the card."""

    calibration: Calibration | None = None
    ood: ood.Reference | None = None
    report: dict[str, Any] = field(default_factory=dict)


def skip_reason(cfg: ExperimentConfig) -> str | None:
    """Why nothing is fitted for this config, or None."""
    c = cfg.calibration
    if not c.temperature and c.ood == "none":
        return "calibration.temperature=false and calibration.ood=none"
    if cfg.privacy.dp:
        return (
            "privacy.dp is on, and the sites' sums carry no noise: fitting them "
            "would release the training features outside the DP guarantee"
        )
    if cfg.privacy.dp_sgd:
        return (
            "privacy.dp_sgd is on, and the sites' sums carry no noise: fitting "
            "them would release the training features outside the per-patient "
            "DP guarantee"
        )
    return None


def training_data(cfg: ExperimentConfig, site_infos: list[dict[str, Any]]) -> str:
    """What the model was trained on, in words: modality and input size."""
    deployed = bool(site_infos) and all(s.get("deployed") for s in site_infos)
    what = (
        "the sites' training images" if deployed else describe_source(cfg.data.source)
    )
    return f"{what}, {cfg.data.image_size} px"


def _ask(
    ctx: RoundContext, kind: str, content: RecordDict
) -> dict[str, dict[str, np.ndarray]]:
    """Send `content` to every connected site; its stats arrays by site name."""
    nodes = [n for n in ctx.grid.get_node_ids() if n in ctx.names]
    msgs = [Message(content=content, dst_node_id=n, message_type=kind) for n in nodes]
    replies = replies_to(ctx, msgs)
    out: dict[str, dict[str, np.ndarray]] = {}
    for msg in replies:
        name = ctx.names.get(msg.metadata.src_node_id)
        if name is None:
            continue
        if msg.has_error():
            reason = (msg.error.reason or "no reason").strip().splitlines()[0]
            log.warning("calibration (%s): site %s failed: %s", kind, name, reason)
            continue
        if CALIBRATION_RECORD not in msg.content.array_records:
            log.warning(
                "calibration (%s): site %s sent no '%s'", kind, name, CALIBRATION_RECORD
            )
            continue
        rec = msg.content[CALIBRATION_RECORD]
        out[name] = {k: rec[k].numpy() for k in rec.keys()}
    return out


def _read(
    replies: dict[str, dict[str, np.ndarray]], reader: Callable[[dict], Any]
) -> dict[str, Any]:
    """`reader` applied to each site's arrays; a site it refuses is left out."""
    out = {}
    for name in sorted(replies):
        try:
            out[name] = reader(replies[name])
        except (ValueError, MessageError) as err:
            log.warning("calibration: site %s: bad statistics: %s", name, err)
    return out


def _content(
    cfg: ExperimentConfig, arrays: ArrayRecord, num_classes: int, **extra: Any
) -> RecordDict:
    conf = ConfigRecord(
        {"experiment": cfg.to_yaml(), "num-classes": num_classes, **extra}
    )
    return RecordDict({"arrays": arrays, "config": conf})


def _fit_temperature(
    cfg: ExperimentConfig, replies: dict[str, dict[str, np.ndarray]]
) -> Calibration | None:
    """The temperature of the summed NLL curves, or None (logged)."""
    sums = _read(replies, calibration.from_arrays)
    count = sum(c for _, c in sums.values())
    if len(sums) < cfg.federation.required_sites or count == 0:
        log.warning(
            "calibration: no temperature: %d site(s) sent NLL sums over %d "
            "held-out image(s)",
            len(sums),
            count,
        )
        return None
    nll = np.sum([n for n, _ in sums.values()], axis=0)
    where = f"the held-out test parts of {len(sums)} site(s) ({', '.join(sums)})"
    return calibration.from_sums(nll, count, where)


def _on_validation(
    cfg: ExperimentConfig, evaluator: GlobalEvaluator | None, arrays: ArrayRecord
) -> Calibration | None:
    """The temperature of the global validation split's NLL, when the config
    asks for it and the server holds the split; None to fit on the sites."""
    choice = cfg.calibration.temperature_data
    if choice == "sites":
        return None
    held = evaluator.val_logits(arrays) if evaluator is not None else None
    if held is None or not len(held[1]):
        if choice == "validation":
            log.warning(
                "calibration.temperature_data=validation, but the server holds no "
                "validation split (run.global_eval off, or the data did not load): "
                "the temperature is fitted on the sites' held-out parts"
            )
        return None
    logits, labels = held
    where = f"the global validation split ({len(labels)} images)"
    return calibration.from_sums(calibration.nll_sums(logits, labels), len(labels),
                                 where)


def _fit_reference(
    cfg: ExperimentConfig, replies: dict[str, dict[str, np.ndarray]]
) -> ood.Reference | None:
    """Class means and shared precision from the summed feature sums, or None."""
    stats = _read(replies, ood.from_arrays)
    if len(stats) < cfg.federation.required_sites:
        log.warning(
            "calibration: no OOD reference: %d site(s) sent feature sums", len(stats)
        )
        return None
    try:
        total = ood.sum_stats([stats[n] for n in sorted(stats)])
        return ood.fit_reference(
            total, cfg.calibration.ood_shrinkage, cfg.privacy.share_class_counts
        )
    except ValueError as err:
        log.warning("calibration: no OOD reference: %s", err)
        return None


def calibrate(
    ctx: RoundContext,
    arrays: ArrayRecord,
    num_classes: int,
    data: str,
    evaluator: GlobalEvaluator | None = None,
) -> Fitted:
    """Temperature and OOD reference of the final model, from the sites' sums."""
    cfg = ctx.cfg
    reason = skip_reason(cfg)
    if reason:
        log.warning("calibration skipped: %s", reason)
        return Fitted(report={"skipped": reason})
    first = _ask(ctx, CALIBRATE, _content(cfg, arrays, num_classes))
    temp = None
    if cfg.calibration.temperature:
        temp = _on_validation(cfg, evaluator, arrays) or _fit_temperature(cfg, first)
    ref = _fit_reference(cfg, first) if cfg.calibration.ood != "none" else None
    if temp is None and ref is None:
        return Fitted(report={"skipped": "too few sites sent usable statistics"})
    content = _content(
        cfg,
        arrays,
        num_classes,
        temperature=temp.temperature if temp else 1.0,
        classwise=bool(ref.classwise) if ref else True,
    )
    if ref is not None:
        content[REFERENCE_RECORD] = pack_stats(ood.reference_arrays(ref), (ood.PREFIX,))
    second = _ask(ctx, OOD_THRESHOLD, content)
    report = {"sites": sorted(first), "data": data}
    if ref is not None:
        ref = _threshold(cfg, ref, second, data)
    report.update(_site_ece(second, temp))
    if evaluator is not None:
        report.update(global_figures(evaluator, arrays, temp, ref))
    fitted = Fitted(temp, ref, report)
    fitted.report.update(card_entry(fitted))
    _log(fitted)
    return fitted


def _threshold(
    cfg: ExperimentConfig,
    ref: ood.Reference,
    replies: dict[str, dict[str, np.ndarray]],
    data: str,
) -> ood.Reference | None:
    """`ref` with the threshold from the summed held-out histograms, or None."""
    hists = _read(replies, ood.hist_from_arrays)
    total = np.sum(list(hists.values()), axis=0) if hists else None
    if total is None or total.sum() == 0:
        log.warning("calibration: no OOD threshold: no held-out scores came back")
        return None
    c = cfg.calibration
    threshold, above, reached = ood.threshold_from_histogram(
        total, c.ood_false_alarm, c.ood_confidence
    )
    return dataclasses.replace(
        ref,
        threshold=threshold,
        false_alarm=c.ood_false_alarm,
        confidence=reached,
        held_out=int(total.sum()),
        held_out_flagged=above,
        data=data,
    )


def _site_ece(
    replies: dict[str, dict[str, np.ndarray]], temp: Calibration | None
) -> dict[str, float]:
    """ECE on the sites' held-out parts (summed bins), before and after."""
    bins = _read(replies, calibration.bins_from_arrays)
    if not bins:
        return {}
    before = np.sum([b for b, _ in bins.values()], axis=0)
    after = np.sum([a for _, a in bins.values()], axis=0)
    out = {"ece_sites_before": ece_from_bins(before)}
    if temp is not None:
        out["ece_sites_after"] = ece_from_bins(after)
    return out


def global_figures(
    evaluator: GlobalEvaluator,
    arrays: ArrayRecord,
    temp: Calibration | None,
    ref: ood.Reference | None,
) -> dict[str, float]:
    """ECE before/after and the share flagged on the global test (simulation)."""
    feats, logits, labels = evaluator.outputs(arrays)
    t = temp.temperature if temp else 1.0
    out = {
        "global_test_images": int(len(labels)),
        "ece_global_test_before": expected_calibration_error(
            labels, calibration.scaled_probs(logits, 1.0)
        ),
    }
    if temp is not None:
        out["ece_global_test_after"] = expected_calibration_error(
            labels, calibration.scaled_probs(logits, t)
        )
    if ref is not None and len(labels):
        out["global_test_flagged"] = float(
            np.mean(~ref.in_distribution(ref.scores(feats)))
        )
    return out


def card_entry(fitted: Fitted) -> dict[str, Any]:
    """The model card's `calibration` fields for the temperature and the check."""
    out: dict[str, Any] = {"temperature": None, "ood": None}
    if fitted.calibration is not None:
        out["temperature"] = fitted.calibration.to_payload()
    ref = fitted.ood
    if ref is not None:
        out["ood"] = {
            "score": "Mahalanobis distance to the nearest class mean in the "
            "student's pooled features, squared and divided by their dimension "
            f"({ref.dim}) (Lee et al. 2018)"
            if ref.classwise
            else "Mahalanobis distance to the mean of all training features "
            "(class-agnostic: privacy.share_class_counts is false), squared and "
            f"divided by their dimension ({ref.dim})",
            "classwise": ref.classwise,
            "threshold": ref.threshold,
            "false_alarm": ref.false_alarm,
            "confidence": ref.confidence,
            "held_out": ref.held_out,
            "held_out_flagged": ref.held_out_flagged,
            "reference_images": ref.reference_images,
            "shrinkage": ref.shrinkage,
            "cannot_catch": CANNOT_CATCH,
        }
    return out


def _log(fitted: Fitted) -> None:
    """One line with what was fitted."""
    r, ref = fitted.report, fitted.ood
    temp = fitted.calibration
    log.info(
        "calibration: T=%s (ECE global test %s -> %s); OOD threshold %s, "
        "held-out flagged %s, global test flagged %s",
        f"{temp.temperature:.3f}" if temp else "n/a",
        _num(r.get("ece_global_test_before")),
        _num(r.get("ece_global_test_after")),
        f"{ref.threshold:.3g}" if ref else "n/a",
        _num(ref.held_out_flagged if ref else None),
        _num(r.get("global_test_flagged")),
    )


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


__all__ = [
    "CANNOT_CATCH",
    "Fitted",
    "calibrate",
    "card_entry",
    "global_figures",
    "skip_reason",
    "training_data",
]
