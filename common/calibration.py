"""Temperature scaling (Guo et al., ICML 2017) from sums that add up over sites.

The calibrated probabilities are softmax(logits / T) with one T > 0 fitted by
minimising the negative log-likelihood on held-out labelled images; the
arg-max, and so every accuracy, is unchanged. In a federation each site
returns, for the final model, its summed NLL at every temperature of the fixed
grid `TEMPERATURES` on its held-out test part: only those sums (and the image
count) leave a site. Their sum over sites is the pooled held-out NLL curve,
so the T picked from it (`fit_from_nll`: the grid minimum, refined by a
parabola through its neighbours in log T) is the one pooled data would give,
whatever the partition. NLL is convex in 1/T, so the curve has one minimum.
Written by hand: scikit-learn has no temperature scaling, and the fit must
work from the sums, never from the logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PREFIX = "calib."
# 0.05 .. 20, uniform in log T (ratio about 1.038 between neighbours)
TEMPERATURES = np.geomspace(0.05, 20.0, 161)
METHOD = "temperature scaling (Guo et al. 2017)"


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def scaled_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / temperature), float64 (N, K)."""
    return np.exp(_log_softmax(np.asarray(logits, np.float64) / temperature))


def nll_sums(
    logits: np.ndarray, labels: np.ndarray, grid: np.ndarray = TEMPERATURES
) -> np.ndarray:
    """Summed NLL of softmax(logits / T) at every T of `grid`, float64 (G,)."""
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(
            f"logits must be (N, K) and labels (N,), got {x.shape} and {y.shape}"
        )
    if y.size and (y.min() < 0 or y.max() >= x.shape[1]):
        raise ValueError(f"labels must be class ids in [0, {x.shape[1]})")
    if not np.isfinite(x).all():
        raise ValueError("logits contain NaN or inf")
    rows = np.arange(len(y))
    return np.array([-_log_softmax(x / t)[rows, y].sum() for t in grid])


def fit_from_nll(nll: np.ndarray, grid: np.ndarray = TEMPERATURES) -> float:
    """The T minimising a (summed) NLL curve over `grid`, refined between points."""
    f = np.asarray(nll, dtype=np.float64)
    if f.shape != grid.shape or not np.isfinite(f).all():
        raise ValueError(f"NLL sums must be {grid.shape} finite values, got {f.shape}")
    i = int(np.argmin(f))
    if i in (0, len(f) - 1):
        log.warning(
            "temperature %.4g is at the end of the grid [%g, %g]",
            grid[i],
            grid[0],
            grid[-1],
        )
        return float(grid[i])
    # parabola through the minimum and its neighbours, uniform spacing in log T
    f0, f1, f2 = f[i - 1], f[i], f[i + 1]
    curv = f0 - 2 * f1 + f2
    step = np.log(grid[i + 1] / grid[i])
    shift = 0.5 * (f0 - f2) / curv if curv > 0 else 0.0
    return float(grid[i] * np.exp(np.clip(shift, -0.5, 0.5) * step))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T of pooled (logits, labels): what the federated sums reproduce."""
    return fit_from_nll(nll_sums(logits, labels))


def to_arrays(nll: np.ndarray, count: int) -> dict[str, np.ndarray]:
    """A site's NLL sums and image count as `calib.` wire arrays."""
    return {
        PREFIX + "nll": np.asarray(nll, dtype=np.float64),
        PREFIX + "count": np.array([count], dtype=np.int64),
    }


def from_arrays(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, int]:
    """(NLL sums, image count) from `to_arrays` output; ValueError naming the key."""
    for key in (PREFIX + "nll", PREFIX + "count"):
        if key not in arrays:
            raise ValueError(f"calibration statistics miss array '{key}'")
    nll = np.asarray(arrays[PREFIX + "nll"], dtype=np.float64)
    count = np.asarray(arrays[PREFIX + "count"])
    if nll.shape != TEMPERATURES.shape or not np.isfinite(nll).all():
        raise ValueError(
            f"array '{PREFIX}nll' must hold {len(TEMPERATURES)} finite sums, "
            f"got shape {nll.shape}"
        )
    integer = np.issubdtype(count.dtype, np.integer)
    if count.shape != (1,) or not integer or count[0] < 0:
        raise ValueError(f"array '{PREFIX}count' must be one integer >= 0")
    return nll, int(count[0])


def bins_to_arrays(before: np.ndarray, after: np.ndarray) -> dict[str, np.ndarray]:
    """A site's calibration bins (common.metrics) at T = 1 and at the fitted T."""
    return {
        PREFIX + "bins_before": np.asarray(before, dtype=np.float64),
        PREFIX + "bins_after": np.asarray(after, dtype=np.float64),
    }


def bins_from_arrays(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(bins at T = 1, bins at the fitted T) of `bins_to_arrays` output."""
    out = []
    for name in ("bins_before", "bins_after"):
        key = PREFIX + name
        if key not in arrays:
            raise ValueError(f"calibration statistics miss array '{key}'")
        value = np.asarray(arrays[key], dtype=np.float64)
        if value.ndim != 2 or value.shape[0] != 3 or not np.isfinite(value).all():
            raise ValueError(f"array '{key}' must be finite (3, bins) sums")
        out.append(value)
    if out[0].shape != out[1].shape:
        raise ValueError("calibration bins before and after differ in shape")
    return out[0], out[1]


@dataclass(frozen=True)
class Calibration:
    """The temperature stored with a model, and where it came from."""

    temperature: float  # probabilities are softmax(logits / temperature)
    images: int  # held-out images it was fitted on
    fitted_on: str  # which held-out data, in words
    nll_before: float  # mean NLL on those images at T = 1
    nll_after: float  # ... and at `temperature`

    def to_payload(self) -> dict[str, Any]:
        """Plain data for model.pt (covered by its content hash)."""
        return {
            "method": METHOD,
            "temperature": float(self.temperature),
            "images": int(self.images),
            "fitted_on": self.fitted_on,
            "nll_before": float(self.nll_before),
            "nll_after": float(self.nll_after),
        }

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> Calibration:
        """Read `to_payload` output; ValueError when the temperature is unusable."""
        t = float(data["temperature"])
        if not np.isfinite(t) or t <= 0:
            raise ValueError(f"calibration temperature {t!r} is not a positive number")
        return cls(
            temperature=t,
            images=int(data.get("images", 0)),
            fitted_on=str(data.get("fitted_on", "")),
            nll_before=float(data.get("nll_before", np.nan)),
            nll_after=float(data.get("nll_after", np.nan)),
        )


def from_sums(nll: np.ndarray, count: int, fitted_on: str) -> Calibration:
    """The Calibration the summed NLL curve of `count` held-out images gives."""
    if count <= 0:
        raise ValueError("no held-out image to fit a temperature on")
    t = fit_from_nll(nll)
    one = int(np.argmin(np.abs(np.log(TEMPERATURES))))  # T = 1 is on the grid
    return Calibration(
        temperature=t,
        images=count,
        fitted_on=fitted_on,
        nll_before=float(nll[one] / count),
        nll_after=float(np.interp(np.log(t), np.log(TEMPERATURES), nll) / count),
    )


__all__ = [
    "METHOD",
    "PREFIX",
    "TEMPERATURES",
    "Calibration",
    "bins_from_arrays",
    "bins_to_arrays",
    "fit_from_nll",
    "fit_temperature",
    "from_arrays",
    "from_sums",
    "nll_sums",
    "scaled_probs",
    "to_arrays",
]
