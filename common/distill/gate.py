"""The site's KD gate: how much to follow the teacher this round.

Each site compares the teacher probe (the head giving this round's soft
targets) with the global student it just received, on labelled images neither
trains on (its held-out test part), by balanced ACC. When the teacher is not
worse, the weight is 1; it falls linearly with the teacher's shortfall and
reaches `floor` at a shortfall of `margin`. A teacher that knows nothing (a
random-init backbone) therefore stops pulling the student down once the
student has overtaken it.
"""

from __future__ import annotations

import math


def gate_weight(
    teacher_score: float, student_score: float, *, floor: float, margin: float
) -> float:
    """Weight in [floor, 1] for the teacher's terms, from two held-out scores."""
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"gate floor={floor}; must be in [0, 1]")
    if margin <= 0:
        raise ValueError(f"gate margin={margin}; must be > 0")
    if math.isnan(teacher_score) or math.isnan(student_score):
        return 1.0  # nothing to compare on (empty test part): keep the method
    shortfall = student_score - teacher_score
    if shortfall <= 0:
        return 1.0
    return max(floor, 1.0 - shortfall / margin * (1.0 - floor))


__all__ = ["gate_weight"]
