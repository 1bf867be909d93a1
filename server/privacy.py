"""Site-level (epsilon, delta) for the DP mode, from Google's `dp-accounting`.

What is accounted is what `server.strategy` does when `privacy.dp` is on:

- each sampled site clips its update to `privacy.clipping_norm` C (the client
  mod; the server clips again, so fp16 rounding cannot break the bound);
- the server sums the accepted, clipped updates and divides by a *fixed*
  denominator m, the number of sites sampled per round (uniform weights, not
  example weights; a failed or rejected site counts as a zero update);
- Flower's wrapper adds Gaussian noise of std z*C/m to that mean.

So one release is a Gaussian mechanism with noise multiplier z on a sum whose
sensitivity to adding or removing one site is C. Every aggregate the server
computes counts as a release, retried attempts included.

Sampling is *not* credited: Flower samples a fixed number of sites without
replacement from a seeded RNG (`server.rounds.train_round` seeds it from
`train.seed`, which is in the config and the model card) and the history names
the sites of every round, so the sample is not secret from a reader of the
run's outputs. Amplification by subsampling needs a secret sample; without it a
site that may take part in every round is charged for every round. The epsilon
reported is therefore an upper bound for `federation.fraction_train < 1`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import dp_accounting
from dp_accounting import rdp

from common.config import ExperimentConfig
from server.strategy import uniform_dp_supported

log = logging.getLogger(__name__)

NEIGHBOURING = "add-or-remove-one-site"
ACCOUNTANT = "dp_accounting.rdp.RdpAccountant (RDP, default orders)"


@dataclass(frozen=True)
class PrivacySpent:
    """(epsilon, delta) after `releases` noisy aggregates, and how it was computed."""

    epsilon: float | None  # None when it is infinite (no noise) or not accounted
    delta: float
    releases: int
    noise_multiplier: float
    clipping_norm: float
    denominator: int  # m: fixed number the clipped sum is divided by
    neighbouring: str = NEIGHBOURING
    sampling: str = "no amplification claimed (sample not secret)"
    accountant: str = ACCOUNTANT
    note: str = ""

    def as_dict(self) -> dict:
        """Plain data for the history row and the model card."""
        return asdict(self)


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon of `releases` Gaussian releases with this multiplier, at `delta`."""
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    accountant.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(noise_multiplier), releases
        )
    )
    return float(accountant.get_epsilon(delta))


def accounted(cfg: ExperimentConfig) -> bool:
    """Whether this run's DP aggregation is the one the accountant covers."""
    return cfg.privacy.dp and uniform_dp_supported(cfg)


def privacy_spent(
    cfg: ExperimentConfig, releases: int, denominator: int
) -> PrivacySpent:
    """The run's privacy cost after `releases` noisy aggregates."""
    p = cfg.privacy
    common = dict(
        delta=p.delta,
        releases=releases,
        noise_multiplier=p.noise_multiplier,
        clipping_norm=p.clipping_norm,
        denominator=denominator,
    )
    if not accounted(cfg):
        return PrivacySpent(
            epsilon=None,
            note=f"not accounted: federation.strategy={cfg.federation.strategy} "
            "does not aggregate by the uniform clipped mean (docs/security.md)",
            **common,
        )
    eps = gaussian_epsilon(p.noise_multiplier, releases, p.delta)
    if math.isinf(eps):
        return PrivacySpent(
            epsilon=None,
            note="privacy.noise_multiplier=0: no noise, epsilon is infinite",
            **common,
        )
    return PrivacySpent(epsilon=eps, **common)


def describe(spent: PrivacySpent | dict | None) -> str:
    """One line for logs and the run's final output."""
    if spent is None:
        return "DP off"
    d = spent.as_dict() if isinstance(spent, PrivacySpent) else spent
    if d.get("epsilon") is None:
        why = d.get("note") or d.get("epsilon_note") or "not accounted"
        return f"DP on, epsilon not available ({why}), delta={d.get('delta')}"
    return (
        f"DP (epsilon={d['epsilon']:.3g}, delta={d['delta']:g}) over "
        f"{d['releases']} releases, z={d['noise_multiplier']:g}, "
        f"C={d['clipping_norm']:g}, per site"
    )
