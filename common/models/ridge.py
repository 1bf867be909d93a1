"""Closed-form federated teacher head: ridge regression from summed statistics.

Fed3R (Fanì et al., ICML 2024): each site sends sums over its frozen teacher
features, the server adds them and solves one linear system, so the federated
head equals the head fitted on the pooled data whatever the partition.

Sums are kept per class (counts, feature sums, feature Grams) so that the
server can choose class weights at solve time. The fit, for class weights w
and S = sum_i w_i, is

    min_{W,b}  (1/S) sum_i w_i ||W z_i + b - y_i||^2 + lam ||W||_F^2,

with one-hot targets y_i, an unpenalised bias, and z = (phi - mu) / sigma
standardised by the weighted mean and (population) std of the same weighted
data, all derived from the sums; W, b are then folded back to raw features.
Dividing by S makes `lam` independent of the number of examples (with
class_weight="none" it is scikit-learn's Ridge(alpha=lam * N) on z), and
standardising with the fit's own weights makes the balanced head blind to the
label prior. One-hot and +-1 targets give the same head up to logits 2s - 1
(the bias is not penalised), so the choice does not change the probe.

Ridge scores are not calibrated logits (about [0, 1] with one-hot targets):
`fit_logit_scale` finds the temperature-like factor that makes them so, and
`gaussian_logit_scale` fits it from the same sums (the scores of each class
are modelled as a Gaussian with that class's mean and covariance), so the
server can calibrate the head without any site's rows.
Written by hand: scikit-learn's Ridge needs the rows, which never leave a site.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

PREFIX = "ridge."
VERSION = 1
CLASS_WEIGHTS = ("balanced", "none")
# sigma floor, as in common.models.head: a constant feature stays harmless.
_MIN_VAR = 1e-12


@dataclass(frozen=True)
class RidgeStats:
    """Sufficient statistics of one site's (or many sites') features, per class."""

    class_counts: np.ndarray  # (K,) int64: examples of each class
    class_sum: np.ndarray  # (K, D) float64: sum of phi over each class
    class_gram: np.ndarray  # (K, D, D) float64: sum of phi phi^T over each class

    @property
    def n(self) -> int:
        """Number of examples."""
        return int(self.class_counts.sum())

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return int(self.class_counts.shape[0])

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.class_sum.shape[1])

    @property
    def feat_sum(self) -> np.ndarray:
        """Sum of the features over all classes, (D,)."""
        return self.class_sum.sum(axis=0)

    @property
    def feat_sq_sum(self) -> np.ndarray:
        """Sum of the squared features over all classes, (D,)."""
        return np.einsum("kdd->d", self.class_gram)


def site_stats(
    features: np.ndarray, labels: np.ndarray, num_classes: int
) -> RidgeStats:
    """Per-class counts, sums and Grams of (N, D) features with labels in [0, K)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(
            f"ridge features must be (N, D) and labels (N,), got {x.shape} and "
            f"{y.shape}"
        )
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0):
        raise ValueError(f"ridge labels must be integers in [0, {num_classes})")
    if y.size and y.max() >= num_classes:
        raise ValueError(f"ridge label {int(y.max())} outside [0, {num_classes})")
    if not np.isfinite(x).all():
        raise ValueError("ridge features contain NaN or inf")
    dim = x.shape[1]
    counts = np.bincount(y.astype(np.int64), minlength=num_classes).astype(np.int64)
    sums = np.zeros((num_classes, dim))
    grams = np.zeros((num_classes, dim, dim))
    for c in np.flatnonzero(counts):
        xc = x[y == c]
        sums[c] = xc.sum(axis=0)
        grams[c] = xc.T @ xc
    return RidgeStats(counts, sums, grams)


def add(a: RidgeStats, b: RidgeStats) -> RidgeStats:
    """The statistics of the union of two disjoint data sets."""
    if a.class_gram.shape != b.class_gram.shape:
        raise ValueError(
            "cannot add ridge statistics of (K, D) = "
            f"{(a.num_classes, a.dim)} and {(b.num_classes, b.dim)}"
        )
    return RidgeStats(
        a.class_counts + b.class_counts,
        a.class_sum + b.class_sum,
        a.class_gram + b.class_gram,
    )


def sum_stats(stats: list[RidgeStats]) -> RidgeStats:
    """The statistics of the union of several sites' data (order does not matter)."""
    if not stats:
        raise ValueError("no ridge statistics to sum")
    total = stats[0]
    for s in stats[1:]:
        total = add(total, s)
    return total


def to_arrays(stats: RidgeStats) -> dict[str, np.ndarray]:
    """Flat arrays keyed ``ridge.*``, with a format version, for the wire."""
    return {
        PREFIX + "version": np.array([VERSION], dtype=np.int64),  # 1-d: the wire
        PREFIX + "class_counts": stats.class_counts.copy(),
        PREFIX + "class_sum": stats.class_sum.copy(),
        PREFIX + "class_gram": stats.class_gram.copy(),
    }


def _get(arrays: dict[str, np.ndarray], name: str, shape: tuple) -> np.ndarray:
    """Array ``ridge.<name>`` checked against `shape` (None: any length)."""
    key = PREFIX + name
    if key not in arrays:
        raise ValueError(f"ridge statistics miss array '{key}'")
    value = np.asarray(arrays[key])
    ok = value.ndim == len(shape) and all(
        want is None or got == want
        for got, want in zip(value.shape, shape, strict=True)
    )
    if not ok:
        raise ValueError(f"ridge array '{key}' has shape {value.shape}, want {shape}")
    return value


def from_arrays(arrays: dict[str, np.ndarray]) -> RidgeStats:
    """Statistics from `to_arrays` output; other prefixes are ignored."""
    known = {PREFIX + k for k in ("version", "class_counts", "class_sum", "class_gram")}
    unknown = sorted(k for k in arrays if k.startswith(PREFIX) and k not in known)
    if unknown:
        raise ValueError(f"unknown ridge arrays {unknown}; valid: {sorted(known)}")
    version = int(_get(arrays, "version", (1,))[0])
    if version != VERSION:
        raise ValueError(f"ridge.version is {version}, this code reads {VERSION}")
    counts = _get(arrays, "class_counts", (None,))
    k = counts.shape[0]
    sums = _get(arrays, "class_sum", (k, None))
    grams = _get(arrays, "class_gram", (k, sums.shape[1], sums.shape[1]))
    if not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        raise ValueError("ridge array 'ridge.class_counts' must be integers >= 0")
    return RidgeStats(
        counts.astype(np.int64),
        sums.astype(np.float64),
        grams.astype(np.float64),
    )


def _class_weights(counts: np.ndarray, class_weight: str) -> np.ndarray:
    """Per-class example weights, (K,); every class must have examples."""
    if class_weight not in CLASS_WEIGHTS:
        raise ValueError(
            f"class_weight {class_weight!r} unknown; valid: {list(CLASS_WEIGHTS)}"
        )
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(
            f"class {int(empty[0])} has no examples at any site "
            f"(empty classes: {empty.tolist()}); the ridge head cannot fit it"
        )
    if class_weight == "none":
        return np.ones(len(counts))
    return counts.sum() / (len(counts) * counts.astype(np.float64))


def _weighted_moments(
    stats: RidgeStats, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Augmented second moment A (D+1, D+1) and cross moment B (D+1, K), both / S."""
    total = float(w @ stats.class_counts)
    dim = stats.dim
    a = np.empty((dim + 1, dim + 1))
    a[:dim, :dim] = np.einsum("k,kij->ij", w, stats.class_gram)
    a[:dim, dim] = a[dim, :dim] = w @ stats.class_sum
    a[dim, dim] = total
    b = np.empty((dim + 1, stats.num_classes))
    b[:dim] = (w[:, None] * stats.class_sum).T
    b[dim] = w * stats.class_counts
    return a / total, b / total


def solve(
    stats: RidgeStats, lam: float, class_weight: str = "balanced"
) -> tuple[np.ndarray, np.ndarray]:
    """Ridge head (W (K, D), b (K,)) on raw features; lam penalises W, not b."""
    if not np.isfinite(lam) or lam < 0:
        raise ValueError(f"ridge lam must be finite and >= 0, got {lam}")
    w = _class_weights(stats.class_counts, class_weight)
    a, b = _weighted_moments(stats, w)
    dim = stats.dim
    mu = a[dim, :dim]  # weighted mean: the last row of A holds sum w phi / S
    var = np.maximum(np.diag(a)[:dim] - mu**2, _MIN_VAR)
    sd = np.sqrt(var)
    # z~ = phi~ @ t with phi~ = [phi, 1], z~ = [(phi - mu) / sd, 1]
    t = np.eye(dim + 1)
    t[:dim, :dim] = np.diag(1.0 / sd)
    t[dim, :dim] = -mu / sd
    a_z = t.T @ a @ t
    a_z = 0.5 * (a_z + a_z.T) + lam * np.diag(np.r_[np.ones(dim), 0.0])
    b_z = t.T @ b
    try:
        theta_z = np.linalg.solve(a_z, b_z)
    except np.linalg.LinAlgError:
        log.warning("ridge system is singular (lam=%g); using least squares", lam)
        theta_z = np.linalg.lstsq(a_z, b_z, rcond=None)[0]
    theta = t @ theta_z  # logits = z~ @ theta_z = phi~ @ (t @ theta_z)
    return theta[:dim].T.copy(), theta[dim].copy()


def ridge_head(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    """A float32 `nn.Linear` (D -> K) holding the ridge weights."""
    weight = np.asarray(weight)
    bias = np.asarray(bias)
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise ValueError(
            f"ridge head wants W (K, D) and b (K,), got {weight.shape} and {bias.shape}"
        )
    head = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        head.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return head


def _mean_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of softmax(logits) against integer labels."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1))
    return float(np.mean(log_z - shifted[np.arange(len(labels)), labels]))


def fit_logit_scale(
    scores: np.ndarray,
    labels: np.ndarray,
    bounds: tuple[float, float] = (0.1, 1000.0),
) -> float:
    """The s > 0 minimising the mean cross-entropy of softmax(s * scores)."""
    x = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or y.shape != (len(x),) or len(x) == 0:
        raise ValueError(
            f"scores must be (N, K) and labels (N,), N > 0; got {x.shape}, {y.shape}"
        )
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= x.shape[1]:
        raise ValueError(f"labels must be integers in [0, {x.shape[1]})")
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    # Convex in s, so a bounded 1-D search (Brent, deterministic) finds the optimum.
    # scipy (it comes with scikit-learn) is imported here, not at the top: its
    # 1-2 s import would be paid by every message's fresh ClientApp process
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(
        lambda log_s: _mean_cross_entropy(np.exp(log_s) * x, y),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-6},
    )
    if min(res.x - lo, hi - res.x) < 1e-3:
        log.warning("logit scale %.4g is at the search bound %s", np.exp(res.x), bounds)
    return float(np.exp(res.x))


def _cholesky(cov: np.ndarray) -> np.ndarray:
    """A lower-triangular L with L L^T = cov (+ a relative 1e-9 jitter).

    Unlike an eigendecomposition, whose vectors may flip sign under a change
    in the last bit (the score covariance of K classes has rank K - 1: the
    ridge scores sum to about 1), it moves continuously with `cov`, so equal
    sums computed in another order give the same scale to rounding."""
    jitter = 1e-9 * max(float(np.trace(cov)) / len(cov), 1e-300)
    return np.linalg.cholesky(cov + jitter * np.eye(len(cov)))


def gaussian_logit_scale(
    stats: RidgeStats,
    weight: np.ndarray,
    bias: np.ndarray,
    samples_per_class: int = 4000,
    seed: int = 0,
) -> float:
    """The logit scale of head (W, b), fitted from the summed statistics alone.

    Each class's scores W phi + b are drawn from a Gaussian with the class's
    mean and covariance (from its counts, sums and Gram; a linear score over
    many features is close to Gaussian), the same number per class so that the
    scale carries no label prior, and `fit_logit_scale` is run on the draws.
    Deterministic for a given seed, and continuous in the statistics (the
    draws are one fixed set of normals times a Cholesky factor). Classes
    without examples are skipped.
    """
    w = np.asarray(weight, dtype=np.float64)
    b = np.asarray(bias, dtype=np.float64)
    rng = np.random.default_rng(seed)
    scores, labels = [], []
    for c in np.flatnonzero(stats.class_counts > 0):
        n = float(stats.class_counts[c])
        mu = stats.class_sum[c] / n
        cov = stats.class_gram[c] / n - np.outer(mu, mu)
        s_cov = w @ cov @ w.T
        s_cov = 0.5 * (s_cov + s_cov.T)
        z = rng.standard_normal((samples_per_class, s_cov.shape[0]))
        scores.append(w @ mu + b + z @ _cholesky(s_cov).T)
        labels.append(np.full(samples_per_class, c))
    if len(scores) < 2:
        raise ValueError("a logit scale needs examples of at least two classes")
    return fit_logit_scale(np.concatenate(scores), np.concatenate(labels))


__all__ = [
    "CLASS_WEIGHTS",
    "PREFIX",
    "VERSION",
    "RidgeStats",
    "add",
    "fit_logit_scale",
    "gaussian_logit_scale",
    "from_arrays",
    "ridge_head",
    "site_stats",
    "solve",
    "sum_stats",
    "to_arrays",
]
