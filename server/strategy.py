"""Flower strategies, wrapped so that every reply is checked before aggregation.

The aggregation rules themselves are Flower's (FedAvg, FedProx, FedMedian,
FedTrimmedAvg, Krum). `SafeAggregation` adds what a hospital federation needs
on top: the wire dtype, rejection of failed, malformed, non-finite and
outlier updates (recorded, never silent), and evaluation metrics averaged over
the sites that could compute them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)

from common.config import ExperimentConfig
from common.serialization import (
    ALLOWED_PREFIXES,
    pack,
    restore_int_dtypes,
    to_float32,
)
from server.fedexp import FedExP

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


# Site names by node id, learnt from the handshake (failed replies carry none).
NODE_NAMES: dict[int, str] = {}


def _site_name(msg: Message) -> str:
    if not msg.has_error() and "site" in msg.content.config_records:
        return str(msg.content["site"].get("name", msg.metadata.src_node_id))
    node = msg.metadata.src_node_id
    return NODE_NAMES.get(node, f"node-{node}")


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


def dp_sample_size(cfg: ExperimentConfig, num_sites: int) -> int:
    """Sites Flower's FedAvg samples per round (its own formula); the DP denominator."""
    fed = cfg.federation
    need = min(fed.required_sites, num_sites)
    return max(int(num_sites * fed.fraction_train), need, 1)


def uniform_dp_supported(cfg: ExperimentConfig) -> bool:
    """Whether the strategy aggregates by a plain mean, so DP can use the uniform one.

    Server optimisers (FedAvgM/FedAdam/FedYogi) and robust rules change the
    aggregate after the mean, where Flower's wrapper would then add the noise.
    """
    base = _BASES[cfg.federation.strategy]
    return cfg.federation.strategy != "local" and (
        base.aggregate_train is FedAvg.aggregate_train
    )


def uniform_clipped_mean(
    replies: list[Message], reference: ArrayRecord, clip: float, denominator: int
) -> ArrayRecord:
    """reference + sum of the replies' updates, each clipped to `clip`, / denominator.

    Uniform weights and a fixed denominator keep one site's share of the
    aggregate at most clip/denominator whoever else replied (DP-FedAvg's
    fixed-denominator estimator, McMahan et al. 2018); a missing site counts as
    a zero update. Re-clipping here also absorbs the float16 wire's rounding.
    """
    ref = {k: reference[k].numpy().astype(np.float64) for k in reference.keys()}
    total = {k: np.zeros_like(v) for k, v in ref.items()}
    for msg in replies:
        rec = msg.content["arrays"]
        delta = {k: rec[k].numpy().astype(np.float64) - ref[k] for k in ref}
        norm = math.sqrt(sum(float((d * d).sum()) for d in delta.values()))
        scale = min(1.0, clip / norm) if norm > 0 else 1.0
        for k, d in delta.items():
            total[k] += scale * d
    return ArrayRecord(
        {k: Array((ref[k] + total[k] / denominator).astype(np.float32)) for k in ref}
    )


class _Snapshot:
    """A Grid whose node list is fixed, so Flower's sampling sees what we checked."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, nodes

    def get_node_ids(self) -> list[int]:
        """The node ids connected when the round was configured."""
        return list(self._nodes)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class SafeAggregation:
    """Mixin over a Flower strategy: validate, record and dtype-convert replies."""

    def setup_safety(self, cfg: ExperimentConfig) -> None:
        """Store the knobs this mixin needs (called once after construction)."""
        self.cfg = cfg
        self.report = RoundReport()
        self._reference: ArrayRecord | None = None
        # node ids each phase asked; a node missing from the replies timed out
        self._asked: dict[str, list[int]] = {"train": [], "evaluate": []}
        # set by ClientSideDP, which screens before Flower's DP wrapper sees errors
        self.prescreened = False
        # with federation.strategy=local: each site's own model, by site name,
        # for the server's global-test score of the local method
        self.site_models: dict[str, ArrayRecord] = {}

    def _note_missing(self, phase: str, replies: list[Message]) -> None:
        """Record every asked site that sent nothing back before the timeout."""
        replied = {m.metadata.src_node_id for m in replies}
        suffix = "" if phase == "train" else f" ({phase})"
        for node in self._asked[phase]:
            if node not in replied:
                name = NODE_NAMES.get(node, f"node-{node}")
                self.report.failed.append(
                    f"{name}{suffix}: no reply within federation.round_timeout="
                    f"{self.cfg.federation.round_timeout:g}s"
                )
                log.warning("site %s sent no %s reply in time", name, phase)

    def _connected_nodes(self, grid: Grid, needed: int, phase: str) -> list[int]:
        """Connected node ids once `needed` are online, or [] after round_timeout.

        Flower's `sample_nodes` polls without a deadline until its minimum is
        connected, so a site lost for good would hang the server. Waiting here
        first turns it into a recorded failure (and a retried round).
        """
        timeout = self.cfg.federation.round_timeout
        deadline = time.monotonic() + timeout
        while len(nodes := list(grid.get_node_ids())) < needed:
            left = deadline - time.monotonic()
            if left <= 0:
                suffix = "" if phase == "train" else f" ({phase})"
                self.report.failed.append(
                    f"server{suffix}: only {len(nodes)} of the {needed} sites "
                    f"needed were connected within federation.round_timeout="
                    f"{timeout:g}s"
                )
                log.warning(
                    "%s: only %d of %d sites connected", phase, len(nodes), needed
                )
                return []
            time.sleep(min(1.0, left))
        return nodes

    # -- train ---------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model in the wire dtype and remember it for checks."""
        self.report = RoundReport()
        self._reference = arrays
        wire = pack(
            {k: arrays[k].numpy() for k in arrays.keys()},
            self.cfg.federation.transfer_dtype,
        )
        nodes = self._connected_nodes(
            grid, max(self.min_available_nodes, self.min_train_nodes), "train"
        )
        if not nodes:
            self._asked["train"] = []
            return []
        messages = list(
            super().configure_train(server_round, wire, config, _Snapshot(grid, nodes))
        )
        self._track_server_model(arrays)
        self.report.sampled = len(messages)
        self._asked["train"] = [m.metadata.dst_node_id for m in messages]
        self.report.bytes_down = sum(len(wire[k].data) for k in wire.keys()) * len(
            messages
        )
        return messages

    def screen_train_replies(self, replies: Iterable[Message]) -> list[Message]:
        """Drop failed, malformed, non-finite or outlying replies; record why."""
        replies = list(replies)
        self.report.received = len(replies)
        self._note_missing("train", replies)
        good: list[Message] = []
        for msg in replies:
            name = _site_name(msg)
            if msg.has_error():
                self.report.failed.append(f"{name}: {_reason(msg)}")
                log.warning("site %s failed this round: %s", name, msg.error.reason)
                continue
            content = msg.content
            if (
                "arrays" not in content.array_records
                or len(content.metric_records) != 1
            ):
                self.report.rejected.append(f"{name}: malformed reply")
                log.warning("rejected reply of %s: no arrays/metrics", name)
                continue
            bad = [
                k
                for k in content["arrays"].keys()
                if not k.startswith(ALLOWED_PREFIXES)
            ]
            if bad:
                self.report.rejected.append(f"{name}: forbidden arrays {bad[:3]}")
                log.warning("rejected reply of %s: forbidden arrays %s", name, bad[:3])
                continue
            if not _finite(content["arrays"]):
                self.report.rejected.append(f"{name}: non-finite weights")
                log.warning("rejected reply of %s: NaN/Inf weights", name)
                continue
            self.report.bytes_up += sum(
                len(content["arrays"][k].data) for k in content["arrays"].keys()
            )
            content["arrays"] = to_float32(content["arrays"])
            good.append(msg)
        return self._drop_outliers(good)

    def _drop_outliers(self, replies: list[Message]) -> list[Message]:
        factor = self.cfg.federation.norm_outlier_factor
        if factor <= 0 or len(replies) < 3 or self._reference is None:
            return replies
        if getattr(self, "dp_denominator", 0):
            # A median-relative cut lets one site's update decide whether another
            # site counts, which breaks the DP sensitivity bound; clipping already
            # bounds every update (server.privacy).
            return replies
        ref = to_float32(self._reference)
        norms = [_update_norm(m.content["arrays"], ref) for m in replies]
        median = float(np.median(norms))
        keep = []
        for msg, norm in zip(replies, norms, strict=True):
            if median > 0 and norm > factor * median:
                name = _site_name(msg)
                self.report.rejected.append(
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
        return keep

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the screened replies with the wrapped Flower rule."""
        good = list(replies) if self.prescreened else self.screen_train_replies(replies)
        self.report.accepted = len(good)
        for msg in good:
            self.report.sites.setdefault(_site_name(msg), {}).update(
                {f"train/{k}": float(v) for k, v in msg.content["metrics"].items()}
            )
        if self.cfg.federation.strategy == "local":
            self.site_models = {_site_name(m): m.content["arrays"] for m in good}
        if not good:
            return None, None
        self._align_server_model(good)
        arrays, metrics = super().aggregate_train(server_round, good)
        if arrays is not None and getattr(self, "dp_denominator", 0):
            # DP: uniform weights, fixed denominator (what server.privacy accounts)
            arrays = uniform_clipped_mean(
                good, self._reference, self.cfg.privacy.clipping_norm,
                self.dp_denominator,
            )
        if arrays is not None and self._reference is not None:
            # averaging made integer buffers float; they must not go out as float16
            arrays = restore_int_dtypes(arrays, self._reference)
        return arrays, metrics

    # -- server optimiser state (FedAvgM, FedAdam, FedYogi) ---------------------
    def _track_server_model(self, arrays: ArrayRecord) -> None:
        """Server optimisers step from the float32 global model, not the wire copy."""
        if isinstance(self, (FedAvgM, FedExP)):
            self.current_arrays = arrays
        elif isinstance(self, (FedAdam, FedYogi)):
            self.current_arrays = {k: arrays[k].numpy() for k in arrays.keys()}

    def _align_server_model(self, replies: list[Message]) -> None:
        """Give the server optimiser's model exactly the replies' keys, in order.

        Flower's FedAvgM pairs arrays by position and FedOpt by key set, so an
        array the sites add (the federated head in round 1) would misalign
        them. A new key starts from the replies' weighted mean: a zero step.
        """
        if not isinstance(self, (FedAvgM, FedAdam, FedYogi)) or not replies:
            return
        current = self.current_arrays
        if current is None:
            return
        keys = list(replies[0].content["arrays"].keys())
        if list(current.keys()) == keys:
            return
        weights = np.array(
            [float(m.content["metrics"].get("num-examples", 1.0)) for m in replies]
        )

        def start(k: str) -> np.ndarray:
            if k in current.keys():
                v = current[k]
                return v.numpy() if isinstance(v, Array) else np.asarray(v)
            stack = np.stack([m.content["arrays"][k].numpy() for m in replies])
            return np.average(stack, axis=0, weights=weights).astype(stack.dtype)

        aligned = {k: start(k) for k in keys}
        if isinstance(self, FedAvgM):
            self.current_arrays = ArrayRecord({k: Array(v) for k, v in aligned.items()})
        else:
            self.current_arrays = aligned

    def optimizer_state(self) -> dict[str, list[np.ndarray] | dict | None]:
        """The server optimiser's moments, saved with each checkpoint for resume."""
        if isinstance(self, FedAvgM):
            return {"momentum_vector": self.momentum_vector}
        if isinstance(self, (FedAdam, FedYogi)):
            return {"m_t": self.m_t, "v_t": self.v_t}
        return {}

    def load_optimizer_state(self, state: dict) -> None:
        """Restore what `optimizer_state` saved (resume is then bit-identical)."""
        for key, value in (state or {}).items():
            setattr(self, key, value)

    # -- evaluate ------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's sampling; remember whom we asked, to name the silent ones."""
        nodes = self._connected_nodes(
            grid, max(self.min_available_nodes, self.min_evaluate_nodes), "evaluate"
        )
        if not nodes:
            self._asked["evaluate"] = []
            return []
        messages = list(
            super().configure_evaluate(
                server_round, arrays, config, _Snapshot(grid, nodes)
            )
        )
        self._asked["evaluate"] = [m.metadata.dst_node_id for m in messages]
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted means over the sites that reported each metric."""
        rows: dict[str, dict[str, float]] = {}
        replies = list(replies)
        self._note_missing("evaluate", replies)
        for msg in replies:
            name = _site_name(msg)
            if msg.has_error():
                self.report.failed.append(f"{name} (evaluate): {_reason(msg)}")
                continue
            if len(msg.content.metric_records) != 1:
                # screened like train replies: a malformed reply is recorded, and
                # never reaches next(iter(...)) below
                self.report.rejected.append(
                    f"{name} (evaluate): malformed reply "
                    f"({len(msg.content.metric_records)} metric records, expected 1)"
                )
                log.warning("rejected evaluate reply of %s: no metrics", name)
                continue
            metrics = next(iter(msg.content.metric_records.values()))
            rows[name] = {k: float(v) for k, v in metrics.items()}
            self.report.sites.setdefault(name, {}).update(
                {f"eval/{k}": v for k, v in rows[name].items()}
            )
        out = site_eval_means(rows)
        return MetricRecord(out) if out else None


def site_eval_means(rows: dict[str, dict[str, float]]) -> dict[str, float]:
    """Example-weighted means over the sites that reported each metric.

    Adds `worst_site_acc`; {} when no site reported a finite metric.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for metrics in rows.values():
        n = float(metrics.get("num-examples", 1.0))
        for k, v in metrics.items():
            if k == "num-examples" or not math.isfinite(float(v)):
                continue
            sums[k] = sums.get(k, 0.0) + n * float(v)
            weights[k] = weights.get(k, 0.0) + n
    if not sums:
        return {}
    out = {k: sums[k] / weights[k] for k in sums}
    accs = [r["acc"] for r in rows.values() if "acc" in r]
    if accs:
        out["worst_site_acc"] = float(min(accs))
    return out


_BASES = {
    "fedavg": FedAvg,
    "local": FedAvg,  # sites keep their own models; aggregation is not used
    "pooled": FedAvg,  # one site holding all the data
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedexp": FedExP,
    "fedprox": FedProx,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}


def build_strategy(cfg: ExperimentConfig, num_sites: int):
    """The configured Flower strategy with reply screening mixed in."""
    fed = cfg.federation
    base = _BASES[fed.strategy]
    kwargs = dict(
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=min(fed.required_sites, num_sites),
        min_evaluate_nodes=min(fed.required_sites, num_sites)
        if fed.fraction_evaluate
        else 0,
        min_available_nodes=min(fed.required_sites, num_sites),
    )
    if fed.strategy == "fedprox":
        kwargs["proximal_mu"] = fed.proximal_mu
    elif fed.strategy == "fedtrimmedavg":
        kwargs["beta"] = fed.trim_beta
        if int(fed.trim_beta * num_sites) == 0:
            log.warning("federation.trim_beta=%g trims no site out of %d; raise it to "
                        ">= %.2f", fed.trim_beta, num_sites, 1 / num_sites)
    elif fed.strategy == "fedavgm":
        kwargs["server_learning_rate"] = fed.server_lr
        kwargs["server_momentum"] = fed.server_momentum
    elif fed.strategy in ("fedadam", "fedyogi"):
        # eta_l is only reported by Flower; the sites' rate is train.lr
        kwargs.update(eta=fed.server_lr, beta_1=fed.server_momentum, beta_2=0.99)
    elif fed.strategy == "fedexp":
        kwargs["eps"] = fed.fedexp_eps
    elif fed.strategy == "krum":
        kwargs["num_malicious_nodes"] = fed.krum_byzantine
    cls = type(f"Safe{base.__name__}", (SafeAggregation, base), {})
    strategy = cls(**kwargs)
    strategy.setup_safety(cfg)
    if cfg.privacy.dp:
        m = dp_sample_size(cfg, num_sites)
        if uniform_dp_supported(cfg):
            strategy.dp_denominator = m
        else:
            log.warning("privacy.dp with federation.strategy=%s: its aggregation is "
                        "not the uniform clipped mean, so no epsilon is reported",
                        fed.strategy)
        return ClientSideDP(
            strategy,
            noise_multiplier=cfg.privacy.noise_multiplier,
            clipping_norm=cfg.privacy.clipping_norm,
            num_sampled_clients=m,
        )
    return strategy


class ClientSideDP(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP wrapper around a screened strategy.

    Sites clip their update (client mod `client.app.dp_clipping`), the server
    adds Gaussian noise to the aggregate. Replies are still screened by the
    wrapped strategy, which aggregates by `uniform_clipped_mean` where it can.
    Flower's own accountant only takes its unscreened FedAvg without sampling
    credit; `server.privacy` accounts the aggregation done here from `releases`.
    """

    # noisy aggregates computed so far (retried attempts included)
    releases: int = 0

    @property
    def report(self) -> RoundReport:
        """The wrapped strategy's round report."""
        return self.strategy.report

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen first: Flower's wrapper skips a whole round on any error reply."""
        good = self.strategy.screen_train_replies(replies)
        self.strategy.prescreened = True
        try:
            arrays, metrics = super().aggregate_train(server_round, good)
        finally:
            self.strategy.prescreened = False
        if arrays is not None:
            self.releases += 1
        return arrays, metrics
