"""Out-of-distribution check: Mahalanobis distance in the student's feature space.

Lee et al. (NeurIPS 2018): Gaussians with per-class means and one shared
covariance are fitted to the student's pooled penultimate features of the
training images; an image's score is its smallest squared Mahalanobis distance
to a class mean, divided by the feature dimension D (so about 1 for images like
the training data, whatever D). Everything the fit needs is a sum over sites:
per-class counts and feature sums and the feature Gram matrix sum f f^T
(`FeatureStats`, the same kind of aggregate as the closed-form teacher head of
common/models/ridge.py, without its per-class Grams). With class counts kept
private (`privacy.share_class_counts: false`) one class-agnostic Gaussian is
fitted instead (K = 1: only the total count, feature sum and Gram).

The threshold is an order statistic of the scores of held-out in-distribution
images, taken from a histogram over the fixed bins `BIN_EDGES` (counts add up
over sites): the smallest k such that, with probability `confidence`, fewer
than a `false_alarm` share of new in-distribution images score above the k-th
smallest held-out score (distribution-free for exchangeable images: the
score's CDF at the k-th of n order statistics is Beta(k, n + 1 - k)).

Chosen over the energy score (Liu et al., NeurIPS 2020) on four Br35H students
of docs/results/federated-gap (reference on the sites' training images,
threshold on their held-out parts): Mahalanobis AUROC 0.996-0.998 between the
Br35H global test and PneumoniaMNIST chest X-rays, all noise, constant and
colour images flagged; the energy score ranks chest X-rays as *more* typical
(AUROC 0.08-0.43), because the students are most confident on them.
Written by hand: scikit-learn's EmpiricalCovariance needs the rows, which
never leave a site.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PREFIX = "ood."
VERSION = 1
SCORE = "mahalanobis"
# score bins: 1e-3 .. 1e5 (score / D), 100 per decade; out-of-range scores
# count in the first or last bin
BIN_EDGES = np.geomspace(1e-3, 1e5, 801)


@dataclass(frozen=True)
class FeatureStats:
    """Sums over one site's (or many sites') training features."""

    class_counts: np.ndarray  # (K,) int64; K = 1 when class-agnostic
    class_sum: np.ndarray  # (K, D) float64: sum of the features of each class
    gram: np.ndarray  # (D, D) float64: sum of f f^T over every image

    @property
    def n(self) -> int:
        """Number of images."""
        return int(self.class_counts.sum())

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.gram.shape[0])


def feature_stats(
    features: np.ndarray, labels: np.ndarray | None, num_classes: int
) -> FeatureStats:
    """Sums of (N, D) features, per class (labels in [0, K)) or pooled (None)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    if labels is None:
        y, k = np.zeros(len(x), dtype=np.int64), 1
    else:
        y, k = np.asarray(labels).reshape(-1).astype(np.int64), num_classes
        if len(y) != len(x):
            raise ValueError(f"{len(y)} labels for {len(x)} feature rows")
        if y.size and (y.min() < 0 or y.max() >= k):
            raise ValueError(f"labels must be class ids in [0, {k})")
    sums = np.zeros((k, x.shape[1]))
    np.add.at(sums, y, x)
    return FeatureStats(np.bincount(y, minlength=k).astype(np.int64), sums, x.T @ x)


def sum_stats(stats: list[FeatureStats]) -> FeatureStats:
    """The statistics of the union of several sites' images."""
    if not stats:
        raise ValueError("no feature statistics to sum")
    shapes = {(s.class_counts.shape, s.class_sum.shape, s.gram.shape) for s in stats}
    if len(shapes) != 1:
        raise ValueError(f"cannot add feature statistics of shapes {sorted(shapes)}")
    return FeatureStats(
        sum(s.class_counts for s in stats),
        sum(s.class_sum for s in stats),
        sum(s.gram for s in stats),
    )


def to_arrays(stats: FeatureStats) -> dict[str, np.ndarray]:
    """Flat `ood.` arrays with a format version, for the wire."""
    return {
        PREFIX + "version": np.array([VERSION], dtype=np.int64),
        PREFIX + "class_counts": stats.class_counts.copy(),
        PREFIX + "class_sum": stats.class_sum.copy(),
        PREFIX + "gram": stats.gram.copy(),
    }


def from_arrays(arrays: dict[str, np.ndarray]) -> FeatureStats:
    """FeatureStats from `to_arrays` output; ValueError naming the bad array."""
    for name in ("version", "class_counts", "class_sum", "gram"):
        if PREFIX + name not in arrays:
            raise ValueError(f"feature statistics miss array '{PREFIX}{name}'")
    version = np.asarray(arrays[PREFIX + "version"]).reshape(-1)
    if version.tolist() != [VERSION]:
        raise ValueError(
            f"{PREFIX}version is {version.tolist()}, this code reads {VERSION}"
        )
    counts = np.asarray(arrays[PREFIX + "class_counts"])
    sums = np.asarray(arrays[PREFIX + "class_sum"], dtype=np.float64)
    gram = np.asarray(arrays[PREFIX + "gram"], dtype=np.float64)
    k = counts.shape[0] if counts.ndim == 1 else -1
    if (
        k < 1
        or sums.ndim != 2
        or sums.shape[0] != k
        or gram.shape != (sums.shape[1], sums.shape[1])
    ):
        raise ValueError(
            f"feature statistics have shapes counts {counts.shape}, sums "
            f"{sums.shape}, gram {gram.shape}; want (K,), (K, D), (D, D)"
        )
    if not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        raise ValueError(f"array '{PREFIX}class_counts' must be integers >= 0")
    if not (np.isfinite(sums).all() and np.isfinite(gram).all()):
        raise ValueError("feature statistics contain NaN or inf")
    return FeatureStats(counts.astype(np.int64), sums, gram)


@dataclass(frozen=True)
class Reference:
    """What the check needs at predict: class means, precision, threshold."""

    means: np.ndarray  # (K', D) float64: means of the classes with images
    precision: np.ndarray  # (D, D) float64: inverse of the shared covariance
    classwise: bool  # per-class means (False: one class-agnostic mean)
    threshold: float = np.inf  # scores above it are flagged
    false_alarm: float = 0.05  # the held-out false-alarm rate it was chosen for
    confidence: float = 0.9  # ... and the confidence that it holds on new images
    held_out: int = 0  # held-out images the threshold was chosen on
    held_out_flagged: float = float("nan")  # their share above the threshold
    reference_images: int = 0  # training images the Gaussians were fitted on
    shrinkage: float = 0.0  # covariance shrinkage used in the fit
    data: str = ""  # what the training data was, in words ("brain MRI, 64 px")

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.precision.shape[0])

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest class mean, / D, (N,)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be (N, {self.dim}), got {x.shape}")
        best = np.full(len(x), np.inf)
        for mu in self.means:
            d = x - mu
            best = np.minimum(best, np.einsum("nd,de,ne->n", d, self.precision, d))
        return np.maximum(best, 0.0) / self.dim

    def in_distribution(self, scores: np.ndarray) -> np.ndarray:
        """True where a score is at or below the threshold."""
        return np.asarray(scores) <= self.threshold

    def to_payload(self) -> dict[str, Any]:
        """Plain data and float64 arrays for model.pt (covered by its hash)."""
        return {
            "score": SCORE,
            "version": VERSION,
            "classwise": self.classwise,
            "means": self.means.astype(np.float64),
            "precision": self.precision.astype(np.float64),
            "threshold": float(self.threshold),
            "false_alarm": float(self.false_alarm),
            "confidence": float(self.confidence),
            "held_out": int(self.held_out),
            "held_out_flagged": float(self.held_out_flagged),
            "reference_images": int(self.reference_images),
            "shrinkage": float(self.shrinkage),
            "data": self.data,
        }

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> Reference:
        """Read `to_payload` output (arrays as numpy or torch); ValueError if bad."""
        if data.get("score") != SCORE or int(data.get("version", -1)) != VERSION:
            raise ValueError(
                f"out-of-distribution reference {data.get('score')!r} version "
                f"{data.get('version')!r}; this code reads {SCORE!r} version "
                f"{VERSION}"
            )
        means = np.asarray(data["means"], dtype=np.float64)
        precision = np.asarray(data["precision"], dtype=np.float64)
        threshold = float(data["threshold"])
        if means.ndim != 2 or precision.shape != (means.shape[1],) * 2:
            raise ValueError(
                f"reference means {means.shape} and precision {precision.shape} "
                "do not fit: want (K, D) and (D, D)"
            )
        if not (np.isfinite(means).all() and np.isfinite(precision).all()):
            raise ValueError("reference means or precision hold NaN or inf")
        if not threshold > 0:
            raise ValueError(f"reference threshold {threshold!r} is not positive")
        return cls(
            means=means,
            precision=precision,
            classwise=bool(data["classwise"]),
            threshold=threshold,
            false_alarm=float(data.get("false_alarm", np.nan)),
            confidence=float(data.get("confidence", np.nan)),
            held_out=int(data.get("held_out", 0)),
            held_out_flagged=float(data.get("held_out_flagged", np.nan)),
            reference_images=int(data.get("reference_images", 0)),
            shrinkage=float(data.get("shrinkage", 0.0)),
            data=str(data.get("data", "")),
        )


def fit_reference(stats: FeatureStats, shrinkage: float, classwise: bool) -> Reference:
    """Class means and the shared precision from summed statistics (no threshold).

    The within-class covariance is shrunk towards `shrinkage` times its mean
    variance on the diagonal, so a feature that never varied in training
    (a dead ReLU channel) keeps the inverse finite. Classes without images
    are left out of the means.
    """
    if stats.n < 2:
        raise ValueError(f"{stats.n} training image(s): too few for a covariance")
    if not 0 <= shrinkage <= 1:
        raise ValueError(f"shrinkage {shrinkage} outside [0, 1]")
    present = stats.class_counts > 0
    counts = stats.class_counts[present].astype(np.float64)
    means = stats.class_sum[present] / counts[:, None]
    # within-class scatter: sum f f^T - sum_c n_c mu_c mu_c^T
    scatter = stats.gram - np.einsum("k,ki,kj->ij", counts, means, means)
    cov = 0.5 * (scatter + scatter.T) / max(stats.n - len(counts), 1)
    mean_var = float(np.trace(cov)) / stats.dim
    cov[np.diag_indices_from(cov)] += max(shrinkage * mean_var, 1e-12)
    vals, vecs = np.linalg.eigh(cov)
    vals = np.maximum(vals, 1e-12 * max(float(vals.max()), 1e-12))
    precision = (vecs / vals) @ vecs.T
    return Reference(
        means=means,
        precision=0.5 * (precision + precision.T),
        classwise=classwise,
        reference_images=stats.n,
        shrinkage=shrinkage,
    )


def score_histogram(scores: np.ndarray) -> np.ndarray:
    """Counts of scores per bin of `BIN_EDGES` (ends clipped in), int64 (B,)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    idx = np.searchsorted(BIN_EDGES, s, side="left") - 1
    idx = np.clip(idx, 0, len(BIN_EDGES) - 2)
    return np.bincount(idx, minlength=len(BIN_EDGES) - 1).astype(np.int64)


def order_statistic(n: int, false_alarm: float, confidence: float) -> tuple[int, float]:
    """(k, confidence reached): the smallest k in 1..n whose k-th held-out score
    keeps new images' false-alarm rate <= `false_alarm` with that confidence."""
    from scipy.stats import beta  # scipy comes with scikit-learn; server side only

    if n < 1:
        raise ValueError("no held-out image to choose a threshold on")
    k = np.arange(1, n + 1)
    # P(rate > false_alarm) = P(F(s_(k)) < 1 - false_alarm), F(s_(k)) ~ Beta(k, n+1-k)
    risk = beta.cdf(1.0 - false_alarm, k, n + 1 - k)
    ok = np.flatnonzero(risk <= 1.0 - confidence)
    if ok.size == 0:
        reached = float(1.0 - risk[-1])
        log.warning(
            "%d held-out images cannot bound the false-alarm rate at %g with "
            "confidence %g; using the largest score (confidence %.2f)",
            n,
            false_alarm,
            confidence,
            reached,
        )
        return n, reached
    return int(k[ok[0]]), float(1.0 - risk[ok[0]])


def threshold_from_histogram(
    hist: np.ndarray, false_alarm: float, confidence: float
) -> tuple[float, float, float]:
    """(threshold, share of held-out images above it, confidence reached).

    The threshold is the upper edge of the bin holding the k-th smallest
    held-out score (`order_statistic`): at or above that score, so the bound
    still holds for the binned scores.
    """
    counts = np.asarray(hist, dtype=np.int64)
    if counts.shape != (len(BIN_EDGES) - 1,):
        raise ValueError(f"histogram must have {len(BIN_EDGES) - 1} bins")
    n = int(counts.sum())
    k, reached = order_statistic(n, false_alarm, confidence)
    cum = np.cumsum(counts)
    b = int(np.searchsorted(cum, k, side="left"))
    threshold = float(BIN_EDGES[b + 1])
    if b == len(counts) - 1:
        log.warning(
            "out-of-distribution threshold at the last score bin (%g)", threshold
        )
    above = float((n - cum[b]) / n)
    return threshold, above, reached


def hist_to_arrays(hist: np.ndarray) -> dict[str, np.ndarray]:
    """A site's held-out score histogram as an `ood.` wire array."""
    return {PREFIX + "hist": np.asarray(hist, dtype=np.int64)}


def hist_from_arrays(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The histogram of `hist_to_arrays`; ValueError naming the key when bad."""
    key = PREFIX + "hist"
    if key not in arrays:
        raise ValueError(f"score statistics miss array '{key}'")
    hist = np.asarray(arrays[key])
    if (
        hist.shape != (len(BIN_EDGES) - 1,)
        or not np.issubdtype(hist.dtype, np.integer)
        or (hist < 0).any()
    ):
        raise ValueError(f"array '{key}' must be {len(BIN_EDGES) - 1} counts >= 0")
    return hist.astype(np.int64)


def reference_arrays(ref: Reference) -> dict[str, np.ndarray]:
    """The fitted means and precision as `ood.` arrays (server to sites)."""
    return {PREFIX + "means": ref.means, PREFIX + "precision": ref.precision}


def reference_from_arrays(arrays: dict[str, np.ndarray], classwise: bool) -> Reference:
    """A Reference (no threshold yet) from `reference_arrays` output."""
    for name in ("means", "precision"):
        if PREFIX + name not in arrays:
            raise ValueError(f"the reference misses array '{PREFIX}{name}'")
    means = np.asarray(arrays[PREFIX + "means"], dtype=np.float64)
    precision = np.asarray(arrays[PREFIX + "precision"], dtype=np.float64)
    if means.ndim != 2 or precision.shape != (means.shape[1],) * 2:
        raise ValueError(
            f"reference means {means.shape} and precision {precision.shape} do "
            "not fit: want (K, D) and (D, D)"
        )
    return Reference(means=means, precision=precision, classwise=classwise)


__all__ = [
    "BIN_EDGES",
    "PREFIX",
    "SCORE",
    "FeatureStats",
    "Reference",
    "feature_stats",
    "fit_reference",
    "from_arrays",
    "hist_from_arrays",
    "hist_to_arrays",
    "order_statistic",
    "reference_arrays",
    "reference_from_arrays",
    "score_histogram",
    "sum_stats",
    "threshold_from_histogram",
    "to_arrays",
]
