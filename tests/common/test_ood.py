"""Mahalanobis reference from sums over sites, and its held-out threshold."""

import numpy as np
import pytest

from common import ood


def _gaussians(n: int, dim: int = 6, seed: int = 0):
    """Two classes with different means and one shared, correlated covariance."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim) + np.eye(dim)
    labels = rng.integers(0, 2, n)
    means = np.stack([np.zeros(dim), np.full(dim, 3.0)])
    return rng.normal(size=(n, dim)) @ mix.T + means[labels], labels, mix, means


def _split(n: int, cuts=(0.1, 0.55)) -> list[slice]:
    a, b = int(cuts[0] * n), int(cuts[1] * n)
    return [slice(0, a), slice(a, b), slice(b, n)]


@pytest.mark.parametrize("classwise", [True, False])
def test_site_sums_give_the_pooled_reference(classwise):
    x, y, _, _ = _gaussians(900)
    labels = y if classwise else None

    parts = [
        ood.from_arrays(
            ood.to_arrays(ood.feature_stats(x[s], None if labels is None else y[s], 2))
        )
        for s in _split(len(x))
    ]
    fed = ood.fit_reference(ood.sum_stats(parts), 0.01, classwise)
    pooled = ood.fit_reference(ood.feature_stats(x, labels, 2), 0.01, classwise)

    np.testing.assert_allclose(fed.means, pooled.means, rtol=1e-10)
    np.testing.assert_allclose(fed.precision, pooled.precision, rtol=1e-8)
    assert fed.reference_images == 900 and len(fed.means) == (2 if classwise else 1)


def test_reference_matches_the_textbook_estimate():
    x, y, _, _ = _gaussians(2_000, seed=1)
    ref = ood.fit_reference(ood.feature_stats(x, y, 2), 0.0, True)

    means = np.stack([x[y == c].mean(0) for c in (0, 1)])
    resid = x - means[y]
    cov = resid.T @ resid / (len(x) - 2)  # pooled within-class covariance
    np.testing.assert_allclose(ref.means, means, rtol=1e-10)
    np.testing.assert_allclose(ref.precision, np.linalg.inv(cov), rtol=1e-6)
    # the score is the squared distance to the nearest class mean, over D
    d = x[:5] - means[y[:5]]
    want = np.einsum("nd,de,ne->n", d, np.linalg.inv(cov), d) / x.shape[1]
    assert (ref.scores(x[:5]) <= want + 1e-9).all()


def test_threshold_keeps_false_alarms_low_and_flags_far_points():
    x, y, mix, means = _gaussians(6_000, seed=2)
    train, held, new = x[:2_000], x[2_000:2_600], x[2_600:]
    ref = ood.fit_reference(ood.feature_stats(train, y[:2_000], 2), 0.01, True)
    # the held-out histogram arrives in two site parts
    hist = ood.score_histogram(ref.scores(held[:250])) + ood.score_histogram(
        ref.scores(held[250:])
    )

    threshold, above, reached = ood.threshold_from_histogram(hist, 0.05, 0.9)
    ref = ood.Reference(ref.means, ref.precision, True, threshold=threshold)

    assert above <= 0.05 and reached >= 0.9
    assert np.mean(~ref.in_distribution(ref.scores(new))) <= 0.05
    far = np.random.default_rng(3).normal(size=(50, x.shape[1])) * 8 + 20
    assert (~ref.in_distribution(ref.scores(far))).all()


def test_order_statistic_is_conservative_and_says_when_it_cannot_be():
    k, reached = ood.order_statistic(1_000, 0.05, 0.9)
    assert 950 < k < 1_000 and reached >= 0.9  # above the plain 95 % quantile
    # the promise, checked by simulation: new images' false-alarm rate at the
    # k-th of 200 held-out scores exceeds 5 % in at most about 10 % of draws
    k, _ = ood.order_statistic(200, 0.05, 0.9)
    scores = np.sort(np.random.default_rng(0).random((4_000, 200)), axis=1)
    rates = 1.0 - scores[:, k - 1]  # uniform scores: P(new > s) = 1 - s
    assert np.mean(rates > 0.05) <= 0.11

    k, reached = ood.order_statistic(10, 0.05, 0.9)  # too few held-out images
    assert k == 10 and reached < 0.9


def test_a_dead_feature_keeps_the_precision_finite():
    x, y, _, _ = _gaussians(500)
    x[:, 2] = 0.0  # a ReLU channel that never fired in training

    ref = ood.fit_reference(ood.feature_stats(x, y, 2), 0.01, True)

    assert np.isfinite(ref.precision).all()
    probe = x[:3].copy()
    probe[:, 2] = 5.0
    assert (ref.scores(probe) > ref.scores(x[:3]) * 10).all()


def test_payload_round_trip_and_refusals():
    x, y, _, _ = _gaussians(300)
    ref = ood.fit_reference(ood.feature_stats(x, y, 2), 0.01, True)
    ref = ood.Reference(ref.means, ref.precision, True, threshold=2.5, data="MRI")

    back = ood.Reference.from_payload(ref.to_payload())

    np.testing.assert_array_equal(back.precision, ref.precision)
    assert (back.threshold, back.data, back.classwise) == (2.5, "MRI", True)
    bad = ref.to_payload() | {"threshold": float("nan")}
    with pytest.raises(ValueError, match="threshold"):
        ood.Reference.from_payload(bad)
    with pytest.raises(ValueError, match="ood.gram"):
        ood.from_arrays(
            {
                k: v
                for k, v in ood.to_arrays(ood.feature_stats(x, y, 2)).items()
                if k != "ood.gram"
            }
        )
