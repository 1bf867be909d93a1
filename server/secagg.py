"""Secure aggregation of a training round through Flower's SecAgg+ (unchanged).

With `privacy.secure_aggregation` the round's train messages go through
Flower's `SecAggPlusWorkflow` instead of `server.rounds.replies_to`. The
workflow belongs to Flower's legacy stack, so it is driven through Flower's
own compatibility layer (docs/security.md, "Secure aggregation"):

- a `LegacyContext` whose strategy is a shim: its `configure_fit` hands the
  workflow the messages our strategy sampled, as `FitIns` (the arrays in
  order, their names in the config as `array-keys`), and its
  `aggregate_fit` keeps the single unmasked result;
- a Grid wrapper that sends each stage's messages through
  `server.exchange` (our short poll, not Flower's 3 s) and keeps the masked
  stage's replies: their scalar metrics, eval record and profile are not
  masked and go into the history as usual, with empty arrays.

The sites send their update (client/secagg.py), weighted by their training
images, so the unmasked vector is FedAvg's example-weighted mean update. It
is added to the global model the round sent and handed to our strategy as one
reply carrying the total image count, so FedAvgM, FedAdam and FedYogi take
their server step from it as from any aggregate. What the server never sees:
one site's update. What it still sees: each site's scalar training metrics
and image count, which sites replied, and the mean.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
)
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import (
    SecAggPlusWorkflow,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from client.secagg import ARRAY_KEYS
from common.errors import FedKDError
from common.secure_sum import SumRequest, join_limbs, quantization_levels
from common.serialization import record_bytes
from server.exchange import exchange
from server.screening import RoundReport, record_site_metrics

log = logging.getLogger(__name__)

# docs/security.md, "Secure aggregation": what two sites leave exposed
TWO_SITES = (
    "SecAgg+ with 2 sites: each site can subtract its own vector from the sum "
    "and read the other's, and each vector carries one pairwise mask, which "
    "Flower 1.42 draws from a 32-bit seed (pseudo_rand_gen): a server that "
    "searches 2^32 seeds can unmask one site; use 3 or more sites"
)
FITRES_METRICS = "fitres.metrics"
FITRES_COUNT = "fitres.num_examples"


class _Shim(Strategy):
    """The legacy strategy the workflow asks: our sampled messages in, the mean out."""

    def __init__(self, pairs: list[tuple[GridClientProxy, FitIns]]) -> None:
        self.pairs = pairs
        self.mean: list[np.ndarray] | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        return self.pairs

    def aggregate_fit(self, server_round, results, failures):
        if not results:
            return None, {}
        # the workflow wrote the unmasked weighted mean into every FitRes
        self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return results[0][1].parameters, {}

    def initialize_parameters(self, client_manager):  # pragma: no cover - unused
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []  # pragma: no cover - unused

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}  # pragma: no cover - unused

    def evaluate(self, server_round, parameters):
        return None  # pragma: no cover - unused


class _RecordingGrid:
    """The round's Grid, exchanging through server.exchange; keeps every reply."""

    def __init__(self, grid, timeout: float, poll_interval: float) -> None:
        self._grid, self._timeout, self._poll = grid, timeout, poll_interval
        self.stages: list[list[Message]] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        replies = exchange(
            self._grid, list(messages), timeout=timeout or self._timeout,
            poll_interval=self._poll,
        )
        self.stages.append(replies)
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def _fitins(msg: Message) -> FitIns:
    """Our train message as the legacy FitIns the workflow sends on."""
    arrays, conf = msg.content["arrays"], msg.content["config"]
    keys = list(arrays.keys())
    nd = [arrays[k].numpy() for k in keys]
    config = {**dict(conf), ARRAY_KEYS: "\n".join(keys)}
    return FitIns(parameters=ndarrays_to_parameters(nd), config=config)


def _masked_replies(stages: list[list[Message]]) -> list[Message]:
    """The masked stage's good replies, as our replies without model arrays."""
    out = []
    for replies in stages:
        for msg in replies:
            if msg.has_error() or FITRES_METRICS not in msg.content.config_records:
                continue
            count = float(msg.content[FITRES_COUNT]["num_examples"])
            metrics = {k: float(v) for k, v in msg.content[FITRES_METRICS].items()
                       if isinstance(v, (int, float))}
            msg.content["metrics"] = MetricRecord({**metrics, "num-examples": count})
            msg.content["arrays"] = ArrayRecord()
            out.append(msg)
    return out


def _masked_bytes(stages: list[list[Message]]) -> int:
    """Bytes of the masked vectors the sites sent (what the server held)."""
    total = 0
    for replies in stages:
        for msg in replies:
            if msg.has_error():
                continue
            rec = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            if rec is not None and Key.MASKED_PARAMETERS in rec:
                total += sum(len(b) for b in rec[Key.MASKED_PARAMETERS])
    return total


def _mean_reply(
    arrays: ArrayRecord, mean: list[np.ndarray], replies: list[Message],
    sent: list[Message],
) -> Message:
    """One reply holding global + the unmasked mean update, with the sites' total
    image count and their example-weighted metrics (Flower's aggregation)."""
    model = {
        k: Array((arrays[k].numpy().astype(np.float32) + d).astype(np.float32))
        for k, d in zip(arrays.keys(), mean, strict=True)
    }
    metrics = aggregate_metricrecords(
        [RecordDict({"metrics": m.content["metrics"]}) for m in replies],
        "num-examples",
    )
    metrics["num-examples"] = sum(
        float(m.content["metrics"]["num-examples"]) for m in replies
    )
    content = RecordDict({"arrays": ArrayRecord(model), "metrics": metrics})
    return Message(content=content, reply_to=sent[0])


def _workflow(
    grid, cfg, rnd: int, sent: list[Message], *, max_weight: float,
    clipping_range: float, levels: int,
) -> tuple[_Shim, _RecordingGrid]:
    """Flower's SecAggPlusWorkflow over `sent`: (shim holding the mean, stages);
    `levels` is the quantiser's Q."""
    p, fed = cfg.privacy, cfg.federation
    if len(sent) == 2:
        log.warning(TWO_SITES)
    shim = _Shim([
        (GridClientProxy(m.metadata.dst_node_id, grid, m.metadata.run_id), _fitins(m))
        for m in sent
    ])
    legacy = LegacyContext(
        Context(run_id=sent[0].metadata.run_id, node_id=0, node_config={},
                state=RecordDict(), run_config={}),
        strategy=shim,
    )
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: rnd}
    )
    legacy.state.array_records[MAIN_PARAMS_RECORD] = sent[0].content["arrays"]
    recording = _RecordingGrid(grid, fed.round_timeout, fed.poll_interval)
    SecAggPlusWorkflow(
        num_shares=float(p.secagg_shares),
        reconstruction_threshold=float(p.secagg_threshold),
        max_weight=float(max_weight),
        clipping_range=float(clipping_range),
        quantization_range=int(levels),
        timeout=fed.round_timeout,
    )(recording, legacy)
    return shim, recording


def secure_train(
    grid, cfg, rnd: int, arrays: ArrayRecord, sent: list[Message],
    names: Mapping[int, str], max_images: int,
) -> tuple[Message | None, list[Message], RoundReport]:
    """Run SecAgg+ over `sent`: (one reply holding the mean, site replies, report).

    `max_images` is the largest site's training images (from the handshake):
    each site's weight in the workflow is its images over it, at most 1.
    """
    shim, recording = _workflow(
        grid, cfg, rnd, sent, max_weight=max(max_images, 1),
        clipping_range=cfg.privacy.secagg_clipping_range,
        levels=quantization_levels(cfg.privacy.secagg_quantization, len(sent)),
    )
    replies = _masked_replies(recording.stages)
    report = RoundReport(sampled=len(sent), received=len(replies))
    report.bytes_down = sum(record_bytes(m.content["arrays"]) for m in sent)
    report.bytes_up = _masked_bytes(recording.stages)
    report.failed += _dropped(sent, replies, names)
    if shim.mean is None or not replies:
        report.failed.append("server: SecAgg+ could not unmask this round")
        return None, replies, report
    report.accepted = len(replies)
    for msg in replies:
        record_site_metrics(report, msg, names)
    return _mean_reply(arrays, shim.mean, replies, sent), replies, report


def _dropped(
    sent: list[Message], replies: list[Message], names: Mapping[int, str]
) -> list[str]:
    """One line per site that sent no masked vector."""
    got = {m.metadata.src_node_id for m in replies}
    return [
        f"{names.get(m.metadata.dst_node_id, m.metadata.dst_node_id)}: no masked "
        "vector (dropped out of the SecAgg+ exchange)"
        for m in sent if m.metadata.dst_node_id not in got
    ]


def secure_sum(
    grid, cfg, sent: list[Message], names: Mapping[int, str], request: SumRequest
) -> tuple[list[np.ndarray], list[str]]:
    """The unmasked SUM of the statistics the sites reply to `sent` (in
    `request.keys` order), and who it lacks (one line each).

    Each site scales its arrays into [-1, 1] by the request's public scales,
    splits them into two limbs (common/secure_sum.py) and replies with weight
    1, so the workflow's mean times the number of sites that replied is the
    sum of the limbs. The server never holds one site's arrays. FedKDError
    when it cannot unmask or fewer than two sites took part.
    """
    if len(sent) < 2:
        raise FedKDError("a secure sum needs 2 or more sites; only "
                         f"{len(sent)} connected")
    # the sites split their values on the request's grid: the workflow must
    # quantise with the same Q for the high limbs to pass exactly
    shim, recording = _workflow(grid, cfg, 0, sent, max_weight=1.0,
                                clipping_range=1.0, levels=request.levels)
    replies = _masked_replies(recording.stages)
    missing = _dropped(sent, replies, names)
    if shim.mean is None or len(replies) < 2:
        raise FedKDError(
            f"SecAgg+ could not unmask the sum ({len(replies)} of {len(sent)} "
            f"sites sent a masked vector; {'; '.join(missing) or 'no error'})"
        )
    limbs = [m * len(replies) for m in shim.mean]
    sums = [
        join_limbs(hi, lo, request.levels)
        for hi, lo in zip(limbs[0::2], limbs[1::2], strict=True)
    ]
    return [s * scale for s, scale in zip(sums, request.scales, strict=True)], missing
