"""DP accounting and the aggregation it assumes: epsilon is the library's own."""

import math

import numpy as np
import pytest
from dp_accounting import GaussianDpEvent, NeighboringRelation, SelfComposedDpEvent
from dp_accounting.rdp import RdpAccountant
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting import NeighboringRelation as FlwrRelation
from flwr.supercore.privacy_accounting.rdp_accountant import (
    RdpAccountant as FlwrRdpAccountant,
)

from common.config import load_config
from common.serialization import pack
from server import model_card, privacy
from server.strategy import build_strategy, dp_sample_size
from tests.server.test_strategy import _aggregate, _reply

DP = ["privacy.dp=true", "teacher.head=local", "partition.sites=4"]


def test_reported_epsilon_equals_dp_accountings_own_value():
    # Known setting: z = 1.1, 50 rounds, delta = 1e-5, every site every round.
    cfg = load_config(
        None,
        [
            *DP,
            "privacy.noise_multiplier=1.1",
            "privacy.clipping_norm=0.5",
            "privacy.delta=1e-5",
        ],
    )
    spent = privacy.privacy_spent(cfg, releases=50, denominator=4)

    lib = RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    lib.compose(SelfComposedDpEvent(GaussianDpEvent(1.1), 50))
    assert spent.epsilon == lib.get_epsilon(1e-5)
    assert spent.delta == 1e-5 and spent.releases == 50
    # Flower's own accountant (same backend), for its no-amplification FedAvg model.
    flwr = FlwrRdpAccountant(
        PrivacyConfig(
            target_delta=1e-5,
            population_size=4,
            neighboring_relation=FlwrRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    flwr.compose(
        GaussianPrivacyEvent(noise_multiplier=1.1, sample_size=4, population_size=4),
        count=50,
    )
    assert spent.epsilon == pytest.approx(flwr.get_epsilon(1e-5), rel=1e-9)
    # independent check: T Gaussian releases are rho-zCDP, rho = T / (2 z^2),
    # so epsilon <= rho + 2 sqrt(rho log(1/delta)) (Bun & Steinke 2016)
    rho = 50 / (2 * 1.1**2)
    assert rho < spent.epsilon <= rho + 2 * math.sqrt(rho * math.log(1e5))


def test_epsilon_grows_with_releases_and_shrinks_with_noise_and_delta():
    eps = privacy.gaussian_epsilon
    assert eps(1.0, 10, 1e-5) < eps(1.0, 20, 1e-5)
    assert eps(2.0, 10, 1e-5) < eps(1.0, 10, 1e-5)
    assert eps(1.0, 10, 1e-3) < eps(1.0, 10, 1e-5)
    assert eps(1.0, 0, 1e-5) == 0.0 and math.isinf(eps(0.0, 3, 1e-5))


def test_no_noise_or_an_unaccounted_strategy_reports_no_epsilon():
    no_noise = load_config(None, [*DP, "privacy.noise_multiplier=0"])
    assert privacy.privacy_spent(no_noise, 3, 4).epsilon is None
    assert "infinite" in privacy.privacy_spent(no_noise, 3, 4).note
    median = load_config(
        None, [*DP, "privacy.noise_multiplier=1", "federation.strategy=fedmedian"]
    )
    spent = privacy.privacy_spent(median, 3, 4)
    assert spent.epsilon is None and "fedmedian" in spent.note


def test_dp_aggregate_is_the_uniform_clipped_sum_over_a_fixed_denominator():
    cfg = load_config(
        None, [*DP, "privacy.noise_multiplier=0", "privacy.clipping_norm=1.0"]
    )
    strat = build_strategy(cfg, 4)
    ref = np.full((3, 2), 0.5, np.float32)
    strat.strategy._reference = pack({"student.w": ref})
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=(3, 2)) * s for s in (0.1, 3.0, 10.0)]
    # very unequal example counts; one sampled site (of m = 4) sent nothing
    replies = [
        _reply({"student.w": (ref + d).astype(np.float32)}, n, f"s{i}", i)
        for i, (d, n) in enumerate(zip(deltas, (5, 50, 5000), strict=True))
    ]
    agg, _, _ = _aggregate(strat, 1, replies)
    clipped = [d * min(1.0, 1.0 / np.linalg.norm(d)) for d in deltas]
    np.testing.assert_allclose(
        agg["student.w"].numpy(), ref + sum(clipped) / 4, rtol=1e-5, atol=1e-6
    )
    assert strat.releases == 1 and strat.num_sampled_clients == 4
    # no site moves the aggregate by more than C / m, whatever its size
    assert np.linalg.norm(clipped[2] / 4) <= 1.0 / 4 + 1e-9


def test_dp_keeps_clipped_updates_the_norm_cut_would_drop():
    cfg = load_config(
        None, [*DP, "privacy.noise_multiplier=0", "federation.norm_outlier_factor=2"]
    )
    strat = build_strategy(cfg, 4)
    ref = np.zeros((3, 2), np.float32)
    strat.strategy._reference = pack({"student.w": ref})
    replies = [
        _reply({"student.w": ref + s}, 10, f"s{i}", i)
        for i, s in enumerate((0.01, 0.01, 0.01, 5.0))
    ]
    _, _, report = _aggregate(strat, 1, replies)
    assert report.rejected == [] and report.accepted == 4


def test_dp_denominator_is_floweres_sample_size():
    cfg = load_config(
        None, [*DP, "federation.fraction_train=0.3", "federation.min_sites=2"]
    )
    # Flower's FedAvg samples max(int(4 * 0.3), min_train_nodes) = 2 sites
    assert dp_sample_size(cfg, 4) == 2
    assert build_strategy(cfg, 4).num_sampled_clients == 2


def test_card_states_epsilon_and_what_the_handshake_shared():
    cfg = load_config(None, [*DP, "privacy.noise_multiplier=1.1"])
    spent = privacy.privacy_spent(cfg, 10, 4).as_dict()
    sites = [{"name": "site-0", "classes": ["a", "b"], "num-train": 5}]
    card = model_card.build_card(
        cfg,
        classes=["a", "b"],
        site_infos=sites,
        rounds_done=10,
        final_metrics={},
        teacher={},
        params=1,
        privacy=spent,
    )
    assert card["method"]["dp"]["epsilon"] == spent["epsilon"]
    assert card["shared_with_server"]["class_counts"] is False
    md = model_card.render_markdown(card)
    assert f"epsilon = {spent['epsilon']:.3g}, delta = 1e-05" in md
    assert "per-class training counts **not shared**" in md


@pytest.mark.parametrize("share", [True, False])
def test_class_counts_leave_the_site_only_when_configured(share):
    from types import SimpleNamespace

    import torch

    from client.site import site_info

    cfg = load_config(None, [f"privacy.share_class_counts={str(share).lower()}"])
    site = SimpleNamespace(
        name="site-0",
        classes=("normal", "pneumonia"),
        channels=1,
        class_counts=[7, 3],
        train=SimpleNamespace(n=10, labelled=np.ones(10, bool)),
        test_y=torch.zeros(4),
        teacher_info={},
        deployed=False,
    )
    info = site_info(cfg, site).to_dict()
    assert ("class-counts" in info) is share
    assert info["num-train"] == 10  # sizes are still shared


def _dp_sgd_reply(name: str, eps: float, steps: int, node: int = 1):
    msg = _reply({"student.w": np.zeros((3, 2), np.float32)}, 5, name, node)
    msg.content["metrics"]["dp_sgd_epsilon"] = eps
    msg.content["metrics"]["dp_sgd_steps"] = steps
    msg.content["metrics"]["dp_sgd_sample_rate"] = 0.25
    return msg


DP_SGD = ["privacy.dp_sgd=true", "distill.alpha=1", "privacy.dp_sgd_delta=1e-6"]


def test_per_patient_epsilon_is_each_sites_newest_and_the_worst_is_reported():
    cfg = load_config(None, DP_SGD)
    first = privacy.per_patient_spent(
        cfg, None, [_dp_sgd_reply("a", 1.0, 10), _dp_sgd_reply("b", 3.0, 30)], {}
    )
    # round 2 samples only site a; b keeps the epsilon of its last round
    second = privacy.per_patient_spent(cfg, first, [_dp_sgd_reply("a", 2.0, 20)], {})

    assert first["epsilon"] == 3.0
    assert second["per_site"]["a"] == {"epsilon": 2.0, "steps": 20, "sample_rate": 0.25}
    assert second["per_site"]["b"]["epsilon"] == 3.0 and second["epsilon"] == 3.0
    assert second["delta"] == 1e-6
    assert "training image" in second["unit"] and "Poisson" in second["sampling"]
    assert "worst of 2 sites" in privacy.describe_per_patient(second)


def test_card_and_final_line_label_site_level_and_per_patient_dp_apart():
    from server.calibration import skip_reason

    cfg = load_config(None, [*DP, *DP_SGD, "privacy.noise_multiplier=1.1"])
    site_level = privacy.privacy_spent(cfg, 10, 4).as_dict()
    per_patient = privacy.per_patient_spent(
        cfg, None, [_dp_sgd_reply("site-0", 4.5, 40)], {}
    )
    card = model_card.build_card(
        cfg,
        classes=["a", "b"],
        site_infos=[{"name": "site-0", "num-train": 5}],
        rounds_done=10,
        final_metrics={},
        teacher={},
        params=1,
        privacy=site_level,
        privacy_per_patient=per_patient,
    )

    assert card["method"]["dp"]["epsilon"] == site_level["epsilon"]
    assert card["method"]["dp_sgd"]["epsilon"] == 4.5
    assert "does_not_cover" in card["method"]["dp_sgd"]
    md = model_card.render_markdown(card)
    assert "- site-level privacy (one hospital): DP on" in md
    assert "- per-patient privacy (one training image): DP-SGD" in md
    assert "epsilon = 4.5, delta = 1e-06" in md and "site-0 4.5 (40 steps)" in md
    assert privacy.describe(site_level).startswith("site-level DP (epsilon=")
    assert privacy.describe_per_patient(per_patient).startswith(
        "per-patient DP-SGD (epsilon=4.5, delta=1e-06)"
    )
    # the calibration sums carry no noise: nothing is fitted under DP-SGD
    assert "privacy.dp_sgd" in skip_reason(load_config(None, DP_SGD))
