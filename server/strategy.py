"""Flower strategies with what a hospital federation adds around their rules.

The aggregation rules themselves are Flower's (FedAvg, FedProx, FedMedian,
FedTrimmedAvg, Krum, the server optimisers), FedExP (`server.fedexp`) and
SCAFFOLD (`server.scaffold`).
`SafeAggregation` adds the wire dtype on the way out, integer buffers kept
integer on the way back, the server optimiser's bookkeeping, and the DP mean.
Replies reach `aggregate_train` already screened (`server.screening.screen`);
evaluation metrics are averaged by `site_eval_means` over the sites that could
compute them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

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
from common.serialization import pack, restore_int_dtypes
from server.fedexp import FedExP
from server.scaffold import Scaffold

log = logging.getLogger(__name__)


def sites_needed(cfg: ExperimentConfig, num_sites: int) -> int:
    """Sites that must be connected (and reply) for a round to count."""
    return min(cfg.federation.required_sites, num_sites)


def dp_sample_size(cfg: ExperimentConfig, num_sites: int) -> int:
    """Sites Flower's FedAvg samples per round (its own formula); the DP denominator."""
    need = sites_needed(cfg, num_sites)
    return max(int(num_sites * cfg.federation.fraction_train), need, 1)


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


class SafeAggregation:
    """Mixin over a Flower strategy: wire dtype out, screened replies aggregated."""

    def setup_safety(self, cfg: ExperimentConfig) -> None:
        """Store the knobs this mixin needs (called once after construction)."""
        self.cfg = cfg
        # the float32 global model of the round being configured (not the wire copy)
        self._reference: ArrayRecord | None = None
        # privacy.dp with a plain-mean rule: m of `uniform_clipped_mean`, else 0
        self.dp_denominator = 0

    # -- train ---------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model in the wire dtype and keep it as the reference."""
        self._reference = arrays
        wire = pack(
            {k: arrays[k].numpy() for k in arrays.keys()},
            self.cfg.federation.transfer_dtype,
        )
        messages = list(super().configure_train(server_round, wire, config, grid))
        self._track_server_model(arrays)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate replies `server.screening.screen` accepted, by the Flower rule."""
        good = list(replies)
        if not good:
            return None, None
        self._align_server_model(good)
        arrays, metrics = super().aggregate_train(server_round, good)
        if arrays is not None and self.dp_denominator:
            # DP: uniform weights, fixed denominator (what server.privacy accounts)
            arrays = uniform_clipped_mean(
                good,
                self._reference,
                self.cfg.privacy.clipping_norm,
                self.dp_denominator,
            )
        if arrays is not None and self._reference is not None:
            # averaging made integer buffers float; they must not go out as float16
            arrays = restore_int_dtypes(arrays, self._reference)
        return arrays, metrics

    # -- server optimiser state (FedAvgM, FedAdam, FedYogi) ---------------------
    def _track_server_model(self, arrays: ArrayRecord) -> None:
        """Server optimisers step from the float32 global model, not the wire copy."""
        if isinstance(self, (FedAvgM, FedExP, Scaffold)):
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
        """The server optimiser's moments (SCAFFOLD's c), saved with each checkpoint."""
        if isinstance(self, Scaffold):
            return {"control": dict(self.control)}
        if isinstance(self, FedAvgM):
            return {"momentum_vector": self.momentum_vector}
        if isinstance(self, (FedAdam, FedYogi)):
            return {"m_t": self.m_t, "v_t": self.v_t}
        return {}

    def load_optimizer_state(self, state: dict) -> None:
        """Restore what `optimizer_state` saved (resume is then bit-identical)."""
        for key, value in (state or {}).items():
            setattr(self, key, value)


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
    "scaffold": Scaffold,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}


def _rule_kwargs(cfg: ExperimentConfig, num_sites: int) -> dict:
    """The Flower strategy's constructor arguments for federation.strategy."""
    fed = cfg.federation
    need = sites_needed(cfg, num_sites)
    kwargs = dict(
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=need,
        min_evaluate_nodes=need if fed.fraction_evaluate else 0,
        min_available_nodes=need,
    )
    if fed.strategy == "fedprox":
        kwargs["proximal_mu"] = fed.proximal_mu
    elif fed.strategy == "fedtrimmedavg":
        kwargs["beta"] = fed.trim_beta
        if int(fed.trim_beta * num_sites) == 0:
            log.warning(
                "federation.trim_beta=%g trims no site out of %d; raise it to >= %.2f",
                fed.trim_beta,
                num_sites,
                1 / num_sites,
            )
    elif fed.strategy == "fedavgm":
        kwargs["server_learning_rate"] = fed.server_lr
        kwargs["server_momentum"] = fed.server_momentum
    elif fed.strategy in ("fedadam", "fedyogi"):
        # eta_l is only reported by Flower; the sites' rate is train.lr
        kwargs.update(eta=fed.server_lr, beta_1=fed.server_momentum, beta_2=0.99)
    elif fed.strategy == "fedexp":
        kwargs["eps"] = fed.fedexp_eps
    elif fed.strategy == "scaffold":
        kwargs.update(
            num_sites=num_sites,
            server_lr=fed.server_lr,
            transfer_dtype=fed.transfer_dtype,
        )
    elif fed.strategy == "krum":
        kwargs["num_malicious_nodes"] = fed.krum_byzantine
    return kwargs


def build_strategy(cfg: ExperimentConfig, num_sites: int):
    """The configured Flower strategy with `SafeAggregation` mixed in (and DP)."""
    base = _BASES[cfg.federation.strategy]
    cls = type(f"Safe{base.__name__}", (SafeAggregation, base), {})
    strategy = cls(**_rule_kwargs(cfg, num_sites))
    strategy.setup_safety(cfg)
    if not cfg.privacy.dp:
        return strategy
    m = dp_sample_size(cfg, num_sites)
    if uniform_dp_supported(cfg):
        strategy.dp_denominator = m
    else:
        log.warning(
            "privacy.dp with federation.strategy=%s: its aggregation is "
            "not the uniform clipped mean, so no epsilon is reported",
            cfg.federation.strategy,
        )
    return ClientSideDP(
        strategy,
        noise_multiplier=cfg.privacy.noise_multiplier,
        clipping_norm=cfg.privacy.clipping_norm,
        num_sampled_clients=m,
    )


class ClientSideDP(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP wrapper around `SafeAggregation`.

    Sites clip their update (client mod `client.app.dp_clipping`), the server
    adds Gaussian noise to the aggregate. The loop screens replies before they
    get here (Flower's wrapper alone skips a whole round on any error reply);
    the wrapped strategy aggregates by `uniform_clipped_mean` where it can.
    Flower's own accountant only takes its unscreened FedAvg without sampling
    credit; `server.privacy` accounts the aggregation done here from `releases`.
    """

    # noisy aggregates computed so far (retried attempts included)
    releases: int = 0

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's clipped, noised aggregate; count it as one release."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            self.releases += 1
        return arrays, metrics
