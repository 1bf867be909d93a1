"""A secure sum of statistics through SecAgg+: the request and its exact encoding.

Besides a training round, the server can ask the sites for the SUM of some
statistics (the closed-form head's ridge sums; server/teacher_head.py) through
Flower's SecAgg+ (server/secagg.py `secure_sum`, client/secagg.py
`sum_content`), so that it never holds one site's. The train message's config
names what to sum (`secure-sum`), the arrays in order (`sum-keys`), the public
scale each is divided by so that every value lies in [-1, 1] (`sum-scales`),
and the quantiser's levels Q (`sum-levels`).

Flower's quantiser maps [-1, 1] to Q integer levels: a step of 2 / Q, too
coarse for a Gram matrix whose variances are small next to its scale (the
variance is a difference of two such sums). So each value travels as two
limbs: `hi`, the value rounded down to the quantiser's grid (which the
quantiser then carries exactly), and `lo`, the remainder in units of one
grid step, in [0, 1). The sum is sum(hi) + sum(lo) * 2 / Q: exact up to
about (2 / Q)^2 of the scale per site, float64's own precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.errors import MessageError

SECURE_SUM = "secure-sum"
SUM_KEYS = "sum-keys"
SUM_SCALES = "sum-scales"
SUM_LEVELS = "sum-levels"


@dataclass(frozen=True)
class SumRequest:
    """What the server asks a site to sum securely."""

    what: str  # "ridge": the closed-form head's statistics
    keys: list[str]  # the arrays, in order
    scales: list[float]  # each array is divided by its scale into [-1, 1]
    levels: int  # the quantiser's Q

    def to_config(self) -> dict:
        """The message's config entries."""
        return {
            SECURE_SUM: self.what,
            SUM_KEYS: "\n".join(self.keys),
            SUM_SCALES: [float(s) for s in self.scales],
            SUM_LEVELS: int(self.levels),
        }

    @classmethod
    def from_config(cls, conf) -> SumRequest | None:
        """The request in a message's config; None when it asks for none."""
        if SECURE_SUM not in conf:
            return None
        keys = str(conf.get(SUM_KEYS, "")).split("\n")
        scales = [float(v) for v in conf.get(SUM_SCALES, [])]
        levels = int(conf.get(SUM_LEVELS, 0))
        if len(keys) != len(scales) or not all(keys) or min(scales, default=0) <= 0:
            raise MessageError(
                f"secure-sum message: {len(keys)} names {keys[:3]} for "
                f"{len(scales)} positive scales; is the server ours?"
            )
        if levels < 2 or levels % 2:
            raise MessageError(f"secure-sum message: sum-levels {levels} is not even")
        return cls(str(conf[SECURE_SUM]), keys, scales, levels)


def head_sums_secured(cfg) -> bool:
    """Whether the closed-form teacher head's statistics travel as a secure sum
    (teacher.head=closed_form with privacy.secure_aggregation) rather than in
    the handshake, in the clear."""
    return cfg.teacher.head == "closed_form" and cfg.privacy.secure_aggregation


def quantization_levels(secagg_quantization: int, sites: int) -> int:
    """Flower's quantiser levels Q: `privacy.secagg_quantization`, or with 0 the
    finest the workflow's 2^32 modulus allows for `sites` (2^31 / the next
    power of two >= sites, at most 2^30: the mod quantises into int32)."""
    if secagg_quantization:
        return int(secagg_quantization)
    return min(1 << 30, (1 << 31) >> max(sites - 1, 1).bit_length())


def split_limbs(x: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """(hi, lo) of values in [-1, 1]: hi on the quantiser's grid, lo in [0, 1)."""
    half = levels / 2  # grid points per unit
    pos = (np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0) + 1.0) * half
    j = np.floor(pos)
    return j / half - 1.0, pos - j


def join_limbs(hi_sum: np.ndarray, lo_sum: np.ndarray, levels: int) -> np.ndarray:
    """The sum of the values from the sums of their limbs."""
    return hi_sum + lo_sum / (levels / 2)
