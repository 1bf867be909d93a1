"""The site's Flower ClientApp: thin handlers over `client.site`.

Each handler unpacks the message, calls plain functions, and packs the reply.
Only the student (and federated head) arrays and scalar metrics are replied
(under SCAFFOLD also the control-variate update, `scaffold.dc.`),
plus summed statistics: the ridge sums in the handshake, and the calibration
sums of the final model (queries `calibrate` and `ood_threshold`).
Configs and prepared sites come from `site_cache` (one per process); what a
site keeps across rounds is in `context.state`. The query, train and evaluate
replies also carry the site's seconds per phase of the message (ConfigRecord
`profile`, from `common.timing`).
"""

from __future__ import annotations

# First of all: importing common.timing starts the clock of the app's imports.
from common import timing

# isort: split
import logging
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client import secagg
from client.site import (
    PreparedSite,
    calibration_stats,
    evaluate_round,
    head_stats,
    site_cache,
    site_info,
    site_threads,
    threshold_stats,
    train_round,
    uses_teacher,
)
from common import ood
from common.config import ExperimentConfig
from common.errors import MessageError
from common.secure_sum import SumRequest, head_sums_secured
from common.serialization import (
    CALIBRATION_PREFIXES,
    CALIBRATION_RECORD,
    EVAL_RECEIVED,
    EVAL_RECORD,
    FEDERATION_KD_WEIGHT,
    PROFILE_RECORD,
    REFERENCE_RECORD,
    STATS_RECORD,
    pack,
    pack_stats,
    reply_prefixes,
)
from common.timing import phase

log = logging.getLogger(__name__)

app = ClientApp()
timing.app_imported()


def _unpack(
    msg: Message, node_config: Mapping[str, Any]
) -> tuple[ExperimentConfig, ConfigRecord]:
    if secagg.is_secure(msg):  # Flower's SecAgg+ workflow: the legacy layout
        conf = secagg.train_config(msg)
    elif "config" not in msg.content.config_records:
        raise MessageError("message has no ConfigRecord 'config'; is the server ours?")
    else:
        conf = msg.content["config"]
    if "experiment" not in conf:
        raise MessageError("ConfigRecord 'config' lacks key 'experiment' (config YAML)")
    cfg = site_threads(site_cache.config(str(conf["experiment"])), node_config)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    return cfg, conf


def _arrays(msg: Message) -> ArrayRecord:
    if secagg.is_secure(msg):
        return secagg.train_arrays(msg)
    if "arrays" not in msg.content.array_records:
        raise MessageError("message has no ArrayRecord 'arrays' with the global model")
    return msg.content["arrays"]


def _site(
    msg: Message, context: Context
) -> tuple[ExperimentConfig, ConfigRecord, PreparedSite]:
    """(config, config record, prepared site) of a message, phases timed."""
    with phase("config"):
        cfg, conf = _unpack(msg, context.node_config)
    with phase("site"):
        site = site_cache.site(cfg, dict(context.node_config))
    return cfg, conf, site


def _with_profile(content: RecordDict, prof: timing.Profile, msg: Message) -> Message:
    """The reply: `content` plus the message's seconds per phase."""
    content[PROFILE_RECORD] = ConfigRecord(prof.metrics())
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Handshake: report the site's label space and sizes (no data)."""
    with timing.profiled("query") as prof:
        cfg, _, site = _site(msg, context)
        info = site_info(cfg, site)  # the typed contract, sent flat (kebab-case)
        content = RecordDict({"site": ConfigRecord({**info.to_dict()})})
        in_clear = cfg.teacher.head == "closed_form" and not head_sums_secured(cfg)
        if in_clear and uses_teacher(cfg):  # else through SecAgg+ after this
            with phase("head"):
                stats = head_stats(site, info.num_classes)
            content[STATS_RECORD] = pack_stats(stats)
    return _with_profile(content, prof, msg)


def dp_clipping(msg: Message, ctxt: Context, call_next) -> Message:
    """Flower's client-side fixed clipping, applied when the server's DP wrapper
    asks for it (its clipping norm is in the config); a no-op otherwise."""
    conf = msg.content.config_records.get("config")
    if conf is not None and KEY_CLIPPING_NORM in conf:
        return fixedclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def _federation_weight(conf: ConfigRecord) -> float | None:
    """The server's KD-gate verdict from every site's counts, once it has one."""
    value = conf.get(FEDERATION_KD_WEIGHT)
    return None if value is None else float(value)


@app.train(mods=[secagg.secagg_mod, dp_clipping])
def train(msg: Message, context: Context) -> Message:
    """Distil into the global student on this site's data and reply its update
    (or, through SecAgg+, the site's part of a secure sum of statistics)."""
    with timing.profiled("train") as prof:
        cfg, conf, site = _site(msg, context)
        request = SumRequest.from_config(conf) if secagg.is_secure(msg) else None
        if request is not None:
            content = _secure_sum_reply(cfg, conf, site, request)
        else:
            content = _train(cfg, conf, site, msg, context)
    return _with_profile(content, prof, msg)


def _secure_sum_reply(
    cfg: ExperimentConfig,
    conf: ConfigRecord,
    site: PreparedSite,
    request: SumRequest,
) -> RecordDict:
    """The site's scaled statistics for a secure sum (client/secagg.py)."""
    if request.what != "ridge" or not uses_teacher(cfg):
        raise MessageError(
            f"secure sum of {request.what!r}: this site sums only the closed-form "
            "head's 'ridge' statistics, and only with a teacher"
        )
    with phase("head"):
        stats = head_stats(site, int(conf["num-classes"]))
    content = secagg.sum_content(stats, request)
    content["site"] = ConfigRecord({"name": site.name})
    return content


def _train(
    cfg: ExperimentConfig,
    conf: ConfigRecord,
    site: PreparedSite,
    msg: Message,
    context: Context,
) -> RecordDict:
    """One training round: evaluate first (eval_in_train), train, the reply."""
    global_arrays = _arrays(msg)
    received = None
    if conf.get(EVAL_RECEIVED, False):  # federation.eval_in_train: first
        with phase("eval"):
            received = evaluate_round(
                cfg, site, global_arrays, context.state, int(conf["num-classes"])
            )
    with phase("train"):
        arrays, metrics = train_round(
            cfg,
            site,
            global_arrays,
            context.state,
            server_round=int(conf.get("server-round", 0)),
            num_classes=int(conf["num-classes"]),
            proximal_mu=float(conf.get("proximal-mu", 0.0)),
            federation_weight=_federation_weight(conf),
        )
    with phase("reply"):
        content = _train_reply(cfg, msg, arrays, global_arrays, metrics)
        content["site"] = ConfigRecord({"name": site.name})
        if received is not None:
            content[EVAL_RECORD] = ConfigRecord(
                {k: float(v) for k, v in received.items()}
            )
    return content


def _train_reply(
    cfg: ExperimentConfig,
    msg: Message,
    arrays: dict,
    global_arrays: ArrayRecord,
    metrics: dict,
) -> RecordDict:
    """The model part of a train reply: ours, or `fitres.*` under SecAgg+."""
    if secagg.is_secure(msg):  # secaggplus_mod masks fitres.parameters
        return secagg.fitres_content(
            arrays,
            global_arrays,
            int(metrics["num-examples"]),
            metrics,
            cfg.privacy.secagg_clipping_range,
        )
    packed = pack(
        arrays, cfg.federation.transfer_dtype, reply_prefixes(cfg.federation.strategy)
    )
    return RecordDict({"arrays": packed, "metrics": MetricRecord(metrics)})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global student (and teacher probe) on the site's test part."""
    with timing.profiled("evaluate") as prof:
        cfg, conf, site = _site(msg, context)
        with phase("eval"):
            metrics = evaluate_round(
                cfg, site, _arrays(msg), context.state, int(conf["num-classes"])
            )
        content = RecordDict(
            {
                "metrics": MetricRecord(metrics),
                "site": ConfigRecord({"name": site.name}),
            }
        )
    return _with_profile(content, prof, msg)


def _stats_reply(msg: Message, name: str, stats: dict) -> Message:
    """A reply carrying only summed statistics (`calib.`/`ood.`) and the site name."""
    content = RecordDict(
        {
            CALIBRATION_RECORD: pack_stats(stats, CALIBRATION_PREFIXES),
            "site": ConfigRecord({"name": name}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.query("calibrate")  # message type CALIBRATE (common/serialization.py)
def calibrate(msg: Message, context: Context) -> Message:
    """After the last round: the final model's sums for temperature and OOD fit."""
    cfg, conf, site = _site(msg, context)
    stats = calibration_stats(cfg, site, _arrays(msg), int(conf["num-classes"]))
    return _stats_reply(msg, site.name, stats)


def _reference(msg: Message, conf: ConfigRecord) -> ood.Reference | None:
    """The federation's OOD reference sent with the message, if any."""
    if REFERENCE_RECORD not in msg.content.array_records:
        return None
    rec = msg.content[REFERENCE_RECORD]
    try:
        return ood.reference_from_arrays(
            {k: rec[k].numpy() for k in rec.keys()}, bool(conf.get("classwise", True))
        )
    except ValueError as err:
        raise MessageError(f"bad '{REFERENCE_RECORD}': {err}") from err


@app.query("ood_threshold")  # message type OOD_THRESHOLD
def ood_threshold(msg: Message, context: Context) -> Message:
    """Held-out score histogram and calibration bins under the fitted reference."""
    cfg, conf, site = _site(msg, context)
    stats = threshold_stats(
        cfg,
        site,
        _arrays(msg),
        int(conf["num-classes"]),
        _reference(msg, conf),
        float(conf.get("temperature", 1.0)),
    )
    return _stats_reply(msg, site.name, stats)
