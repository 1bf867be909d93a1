"""One round's messages: wait for the sites, sample, send, screen, aggregate.

Flower's strategy samples the sites and aggregates; everything between (who
is connected, what came back, what may be aggregated) is done here in the
open, so the federation loop gets each phase's result as return values.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from common.config import ExperimentConfig
from common.errors import FedKDError
from server.exchange import exchange
from server.screening import RoundReport, screen, screen_evaluate
from server.strategy import site_eval_means

log = logging.getLogger(__name__)


class FederationError(FedKDError):
    """The federation cannot go on (too few sites, sites that disagree)."""


class SeededSampling:
    """Flower's node sampling, drawn from a seeded `random` state of its own.

    Flower's `sample_nodes` draws from the global `random` module and takes no
    generator. Seeding that state per (seed, round, attempt) makes a resumed run
    sample the same sites in the same order; swapping it in only around
    Flower's configure calls keeps our seed from leaking into other users of
    `random` in this process (and their draws from shifting our samples). The
    evaluate sampling of a round continues the stream of its train sampling.
    """

    def __init__(self) -> None:
        self._state = random.getstate()

    def reseed(self, seed: int) -> None:
        """Start the stream afresh from `seed` (once per train attempt)."""
        self._state = random.Random(seed).getstate()

    @contextmanager
    def active(self) -> Iterator[None]:
        """Run the body on this stream, then give `random` back its own state."""
        outer = random.getstate()
        random.setstate(self._state)
        try:
            yield
        finally:
            self._state = random.getstate()
            random.setstate(outer)


class _Snapshot:
    """A Grid whose node list is fixed, so Flower's sampling sees what we checked."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, nodes

    def get_node_ids(self) -> list[int]:
        """The node ids connected when the round was configured."""
        return list(self._nodes)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


@dataclass
class RoundContext:
    """What one round's messaging needs besides the model: who, how, how long."""

    cfg: ExperimentConfig
    grid: Grid
    strategy: Any  # build_strategy's: SafeAggregation (or ClientSideDP over it)
    names: Mapping[int, str]  # site name by node id, from the handshake
    needed: int  # sites that must be connected (and reply) for a round to count
    sampling: SeededSampling
    max_images: int = 0  # the largest site's training images (SecAgg+'s weights)


@dataclass
class Trained:
    """The outcome of one training attempt (arrays None when it failed)."""

    arrays: ArrayRecord | None
    metrics: MetricRecord | None
    report: RoundReport
    replies: list[Message] = field(default_factory=list)  # failed ones too
    accepted: list[Message] = field(default_factory=list)  # what was aggregated
    retries: int = 0  # attempts before this one in the same round


def connected_nodes(ctx: RoundContext, phase: str) -> tuple[list[int], list[str]]:
    """(connected node ids, []) once enough are online; ([], [why]) at the timeout.

    Flower's `sample_nodes` polls without a deadline until its minimum is
    connected, so a site lost for good would hang the server. Waiting here
    first turns it into a recorded failure (and a retried round).
    """
    timeout = ctx.cfg.federation.round_timeout
    deadline = time.monotonic() + timeout
    while len(nodes := list(ctx.grid.get_node_ids())) < ctx.needed:
        left = deadline - time.monotonic()
        if left <= 0:
            suffix = "" if phase == "train" else f" ({phase})"
            log.warning(
                "%s: only %d of %d sites connected", phase, len(nodes), ctx.needed
            )
            return [], [
                f"server{suffix}: only {len(nodes)} of the {ctx.needed} sites "
                f"needed were connected within federation.round_timeout="
                f"{timeout:g}s"
            ]
        time.sleep(min(1.0, left))
    return nodes, []


def replies_to(ctx: RoundContext, messages: list[Message]) -> list[Message]:
    """The replies that arrive within federation.round_timeout (server.exchange)."""
    fed = ctx.cfg.federation
    return exchange(
        ctx.grid,
        messages,
        timeout=fed.round_timeout,
        poll_interval=fed.poll_interval,
    )


def _train_attempt(
    ctx: RoundContext, rnd: int, arrays: ArrayRecord, conf: ConfigRecord
) -> Trained:
    """Sample, send, screen and aggregate once."""
    nodes, failed = connected_nodes(ctx, "train")
    if not nodes:
        return Trained(None, None, RoundReport(failed=failed))
    with ctx.sampling.active():
        sent = list(
            ctx.strategy.configure_train(rnd, arrays, conf, _Snapshot(ctx.grid, nodes))
        )
    if ctx.cfg.privacy.secure_aggregation:
        return _secure_attempt(ctx, rnd, arrays, sent)
    replies = replies_to(ctx, sent)
    accepted, report = screen(replies, arrays, ctx.cfg, ctx.names, sent=sent)
    new_arrays, metrics = ctx.strategy.aggregate_train(rnd, accepted)
    return Trained(new_arrays, metrics, report, replies, accepted)


def _secure_attempt(
    ctx: RoundContext, rnd: int, arrays: ArrayRecord, sent: list[Message]
) -> Trained:
    """The attempt through Flower's SecAgg+: the strategy sees only the mean."""
    from server.secagg import secure_train  # Flower's legacy stack, on demand

    if len(sent) < 2:
        return Trained(None, None, RoundReport(
            sampled=len(sent), failed=["server: SecAgg+ needs 2 or more sites"]))
    mean, replies, report = secure_train(
        ctx.grid, ctx.cfg, rnd, arrays, sent, ctx.names, ctx.max_images
    )
    if mean is None:
        return Trained(None, None, report, replies, [])
    new_arrays, metrics = ctx.strategy.aggregate_train(rnd, [mean])
    return Trained(new_arrays, metrics, report, replies, replies)


def train_round(
    ctx: RoundContext, rnd: int, arrays: ArrayRecord, conf: ConfigRecord
) -> Trained:
    """Run one training round, retrying while fewer than min_sites replied."""
    fed = ctx.cfg.federation
    earlier: list[str] = []  # failures of retried attempts, kept for the history
    for attempt in range(fed.max_round_retries + 1):
        # Seed node sampling per (seed, round) so a resumed run samples alike.
        ctx.sampling.reseed(ctx.cfg.train.seed * 100_003 + rnd * 101 + attempt)
        out = _train_attempt(ctx, rnd, arrays, conf)
        report = out.report
        if out.arrays is not None and report.accepted >= fed.required_sites:
            report.failed[:0] = earlier
            out.retries = attempt
            return out
        earlier += [
            f"attempt {attempt + 1}: {f}" for f in report.failed + report.rejected
        ]
        log.warning(
            "round %d attempt %d: %d usable replies < min_sites=%d "
            "(failed: %s; rejected: %s)",
            rnd,
            attempt + 1,
            report.accepted,
            fed.min_sites,
            report.failed,
            report.rejected,
        )
    raise FederationError(
        f"round {rnd}: fewer than federation.min_sites={fed.min_sites} sites returned "
        f"a usable update after {fed.max_round_retries + 1} attempts; failures: "
        f"{(report.failed + report.rejected)[:3]}"
    )


def evaluate_round(
    ctx: RoundContext, rnd: int, arrays: ArrayRecord, conf: ConfigRecord
) -> tuple[dict[str, float], RoundReport]:
    """(site-mean metrics of `arrays`, the phase's report) from evaluate messages."""
    nodes, failed = connected_nodes(ctx, "evaluate")
    if not nodes:
        return {}, RoundReport(failed=failed)
    with ctx.sampling.active():
        sent = list(
            ctx.strategy.configure_evaluate(
                rnd, arrays, conf, _Snapshot(ctx.grid, nodes)
            )
        )
    replies = replies_to(ctx, sent)
    rows, report = screen_evaluate(replies, ctx.cfg, ctx.names, sent=sent)
    return site_eval_means(rows), report
