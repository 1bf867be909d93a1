"""Closed-form federated ridge head: exact federation, weighting, wire format."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.models.ridge import (
    fit_logit_scale,
    from_arrays,
    gaussian_logit_scale,
    ridge_head,
    site_stats,
    solve,
    sum_stats,
    to_arrays,
)

K, D, N, LAM = 3, 8, 300, 0.1


def _problem(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping blobs with offset, unequal scales and an unequal label prior."""
    rng = np.random.default_rng(seed)
    y = rng.choice(K, size=n, p=[0.5, 0.3, 0.2])
    centers = rng.normal(0, 1.5, (K, D))
    scales = np.geomspace(0.1, 10.0, D)
    x = (centers[y] + rng.normal(0, 1, (n, D))) * scales + 50.0
    return x, y


def _partition(y: np.ndarray, kind: str, seed: int = 0) -> list[np.ndarray]:
    """Index sets of 4 (iid, dirichlet) or K (pathological) sites."""
    rng = np.random.default_rng(seed)
    if kind == "iid":
        return np.array_split(rng.permutation(len(y)), 4)
    if kind == "pathological":
        return [np.flatnonzero(y == c) for c in range(K)]
    sites: list[list[int]] = [[] for _ in range(4)]
    for c in range(K):
        idx = rng.permutation(np.flatnonzero(y == c))
        cuts = (np.cumsum(rng.dirichlet([0.3] * 4))[:-1] * len(idx)).astype(int)
        for site, part in zip(sites, np.split(idx, cuts), strict=True):
            site.extend(part.tolist())
    return [np.array(s, dtype=int) for s in sites]


def _reference(x, y, lam, class_weight):
    """Pooled weighted ridge on standardised rows, straight from the definition."""
    counts = np.bincount(y, minlength=K)
    if class_weight == "balanced":
        w = len(y) / (K * counts[y])
    else:
        w = np.ones(len(y))
    s = w.sum()
    mu = (w[:, None] * x).sum(0) / s
    sd = np.sqrt((w[:, None] * (x - mu) ** 2).sum(0) / s)
    z = np.c_[(x - mu) / sd, np.ones(len(y))]
    targets = np.eye(K)[y]
    penalty = lam * np.diag(np.r_[np.ones(D), 0.0])
    theta = np.linalg.solve(
        z.T @ (w[:, None] * z) / s + penalty, z.T @ (w[:, None] * targets) / s
    )
    weight = theta[:D].T / sd
    return weight, theta[D] - weight @ mu


@pytest.mark.parametrize("class_weight", ["balanced", "none"])
@pytest.mark.parametrize("kind", ["iid", "dirichlet", "pathological"])
def test_federated_head_equals_pooled_and_reference(kind, class_weight):
    x, y = _problem()
    parts = _partition(y, kind)
    assert sum(len(p) for p in parts) == N

    fed_w, fed_b = solve(
        sum_stats([site_stats(x[p], y[p], K) for p in parts]), LAM, class_weight
    )
    pool_w, pool_b = solve(site_stats(x, y, K), LAM, class_weight)
    ref_w, ref_b = _reference(x, y, LAM, class_weight)

    np.testing.assert_allclose(fed_w, pool_w, rtol=0, atol=1e-8)
    np.testing.assert_allclose(fed_b, pool_b, rtol=0, atol=1e-8)
    np.testing.assert_allclose(pool_w, ref_w, rtol=0, atol=1e-5)
    np.testing.assert_allclose(pool_b, ref_b, rtol=0, atol=1e-5)


def test_balanced_head_ignores_duplicated_class_but_unweighted_does_not():
    x, y = _problem()
    extra = y == 1
    x2, y2 = np.r_[x, x[extra]], np.r_[y, y[extra]]

    bal, bal2 = (solve(site_stats(a, b, K), LAM) for a, b in ((x, y), (x2, y2)))
    raw, raw2 = (solve(site_stats(a, b, K), LAM, "none") for a, b in ((x, y), (x2, y2)))

    np.testing.assert_allclose(bal2[0], bal[0], rtol=0, atol=1e-8)
    np.testing.assert_allclose(bal2[1], bal[1], rtol=0, atol=1e-8)
    assert np.abs(raw2[1] - raw[1]).max() > 1e-2


def test_ridge_head_separates_blobs_and_matches_solution():
    x, y = _problem()
    weight, bias = solve(site_stats(x, y, K), 1e-3)

    head = ridge_head(weight, bias)
    logits = head(torch.as_tensor(x, dtype=torch.float32)).detach().numpy()

    assert head.in_features == D and head.out_features == K
    np.testing.assert_allclose(logits, x @ weight.T + bias, rtol=1e-4, atol=1e-3)
    assert (logits.argmax(1) == y).mean() > 0.9


def test_wire_round_trip_is_exact():
    x, y = _problem(n=40)
    stats = site_stats(x, y, K)

    back = from_arrays(to_arrays(stats))

    assert back.n == stats.n == 40
    for name in ("class_counts", "class_sum", "class_gram"):
        got, want = getattr(back, name), getattr(stats, name)
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert np.array_equal(solve(back, LAM)[0], solve(stats, LAM)[0])


def test_missing_or_misshapen_array_raises_naming_the_key():
    x, y = _problem(n=40)
    arrays = to_arrays(site_stats(x, y, K))
    missing = {k: v for k, v in arrays.items() if k != "ridge.class_sum"}
    misshapen = dict(arrays, **{"ridge.class_gram": arrays["ridge.class_gram"][:, :-1]})

    with pytest.raises(ValueError, match="ridge.class_sum"):
        from_arrays(missing)
    with pytest.raises(ValueError, match="ridge.class_gram"):
        from_arrays(misshapen)


def test_class_without_examples_raises_naming_the_class():
    x, y = _problem()
    keep = y != 2
    stats = site_stats(x[keep], y[keep], K)

    for class_weight in ("balanced", "none"):
        with pytest.raises(ValueError, match="class 2 has no examples"):
            solve(stats, LAM, class_weight)


def test_bad_inputs_raise():
    x, y = _problem(n=20)

    with pytest.raises(ValueError, match="outside"):
        site_stats(x, np.where(y == 0, K, y), K)
    with pytest.raises(ValueError, match="class_weight"):
        solve(site_stats(x, y, K), LAM, "inverse")
    with pytest.raises(ValueError, match=r"\(K, D\)"):
        sum_stats([site_stats(x, y, K), site_stats(x[:, :-1], y, K)])


def test_fit_logit_scale_recovers_known_scale():
    rng = np.random.default_rng(0)
    s_true = 7.0
    scores = rng.uniform(0, 1, (20_000, K))
    p = np.exp(s_true * scores)
    p /= p.sum(1, keepdims=True)
    labels = np.minimum((rng.uniform(size=(len(p), 1)) > p.cumsum(1)).sum(1), K - 1)

    s = fit_logit_scale(scores, labels)

    assert abs(s - s_true) / s_true < 0.1
    assert fit_logit_scale(scores, labels) == s


def test_gaussian_logit_scale_matches_the_fit_on_the_rows():
    """On Gaussian classes the scale from the sums equals the scale fitted on rows."""
    rng = np.random.default_rng(1)
    d, n = 6, 6000
    means = rng.normal(0, 1.0, (K, d))
    x = np.concatenate([rng.normal(means[c], 1.5, (n, d)) for c in range(K)])
    y = np.repeat(np.arange(K), n)
    stats = site_stats(x, y, K)
    w, b = solve(stats, LAM)

    from_sums = gaussian_logit_scale(stats, w, b)

    from_rows = fit_logit_scale(x @ w.T + b, y)
    assert abs(from_sums - from_rows) / from_rows < 0.05
    assert gaussian_logit_scale(stats, w, b) == from_sums  # deterministic
    one_class = site_stats(x[y == 0], y[y == 0], K)
    with pytest.raises(ValueError, match="two classes"):
        gaussian_logit_scale(one_class, w, b)


def test_gaussian_logit_scale_moves_continuously_with_the_sums():
    """Sums equal up to their last bits (added in another order, or through
    SecAgg+) give the same scale: with one-hot targets the K scores sum to
    about 1, so their covariance is singular, and an eigendecomposition's
    vectors could flip sign between the two and redraw every sample."""
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(c, 1.0, (200, 5)) for c in range(2)])
    y = np.repeat(np.arange(2), 200)
    stats = site_stats(x, y, 2)
    w, b = solve(stats, LAM)
    nudged = type(stats)(stats.class_counts, stats.class_sum * (1 + 1e-15),
                         stats.class_gram * (1 - 1e-15))

    scale = gaussian_logit_scale(stats, w, b)
    assert gaussian_logit_scale(nudged, w, b) == pytest.approx(scale, rel=1e-9)
