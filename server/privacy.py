"""The run's privacy accounting: site-level DP (`privacy.dp`) and per-patient
DP-SGD (`privacy.dp_sgd`), reported side by side and never mixed.

Per-patient: each site counts its own DP-SGD steps with Opacus' accountant
(`common.dp_sgd`, `client.site.accountant`) and sends its epsilon so far in
every train reply; `per_patient_spent` keeps the newest one of every site.

Site-level (epsilon, delta) for the DP mode, from Google's `dp-accounting`:

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
from flwr.app import Message

from common.config import ExperimentConfig
from common.dp_sgd import NEIGHBOURING as PATIENT_NEIGHBOURING
from common.dp_sgd import SAMPLING as PATIENT_SAMPLING
from server.screening import site_name
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
    """One line on site-level DP for logs and the run's final output."""
    if spent is None:
        return "site-level DP off"
    d = spent.as_dict() if isinstance(spent, PrivacySpent) else spent
    if d.get("epsilon") is None:
        why = d.get("note") or d.get("epsilon_note") or "not accounted"
        return (
            f"site-level DP on, epsilon not available ({why}), delta={d.get('delta')}"
        )
    return (
        f"site-level DP (epsilon={d['epsilon']:.3g}, delta={d['delta']:g}) over "
        f"{d['releases']} releases, z={d['noise_multiplier']:g}, "
        f"C={d['clipping_norm']:g}, per site"
    )


# the train-reply metrics of a DP-SGD site (common.train.train_local)
PER_PATIENT_METRICS = ("dp_sgd_epsilon", "dp_sgd_steps", "dp_sgd_sample_rate")


def per_patient_spent(
    cfg: ExperimentConfig,
    previous: dict | None,
    replies: list[Message],
    names: dict[int, str],
) -> dict:
    """Each site's per-patient (epsilon, delta) so far, and the worst of them.

    A site's epsilon is cumulative over all its local steps of all rounds, so
    its newest reply has its whole count; a site not sampled this round keeps
    the value from `previous` (the last history row's entry). Every reply that
    carries one counts, rejected ones too: their update was sent all the same.
    """
    p = cfg.privacy
    per_site = {k: dict(v) for k, v in ((previous or {}).get("per_site") or {}).items()}
    for msg in replies:
        if msg.has_error() or "metrics" not in msg.content.metric_records:
            continue
        m = msg.content["metrics"]
        if all(k in m for k in PER_PATIENT_METRICS):
            per_site[site_name(msg, names)] = {
                "epsilon": float(m["dp_sgd_epsilon"]),
                "steps": int(m["dp_sgd_steps"]),
                "sample_rate": float(m["dp_sgd_sample_rate"]),
            }
    eps = [v["epsilon"] for v in per_site.values()]
    return {
        "epsilon": max(eps) if eps else None,  # the worst site's
        "delta": p.dp_sgd_delta,
        "per_site": dict(sorted(per_site.items())),
        "noise_multiplier": p.dp_sgd_noise_multiplier,
        "max_grad_norm": p.dp_sgd_max_grad_norm,
        "unit": "one training image at one site (one patient when each patient "
        "has one image; k images: about k times epsilon)",
        "neighbouring": PATIENT_NEIGHBOURING,
        "sampling": PATIENT_SAMPLING,
        "accountant": f"opacus {p.dp_sgd_accountant} accountant, all local steps "
        "of all rounds at each site",
    }


def describe_per_patient(spent: dict | None) -> str:
    """One line on per-patient DP-SGD for logs and the run's final output."""
    if not spent or spent.get("epsilon") is None:
        return "per-patient DP-SGD on, epsilon not available (no round completed)"
    sites = spent.get("per_site") or {}
    return (
        f"per-patient DP-SGD (epsilon={spent['epsilon']:.3g}, "
        f"delta={spent['delta']:g}) at the worst of {len(sites)} sites, "
        f"z={spent['noise_multiplier']:g}, C={spent['max_grad_norm']:g}, one "
        "training image"
    )
