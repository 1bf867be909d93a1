"""Temperature scaling from summed NLL curves, and ECE from summed bins."""

import numpy as np
import pytest

from common import calibration
from common.metrics import (
    calibration_bins,
    ece_from_bins,
    expected_calibration_error,
)


def _tempered(n: int, k: int, temperature: float, seed: int = 0):
    """Logits and labels drawn from softmax(logits / temperature)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 4.0, (n, k))
    p = calibration.scaled_probs(logits, temperature)
    labels = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_recovers_a_known_temperature(true_t):
    logits, labels = _tempered(20_000, 3, true_t)

    t = calibration.fit_temperature(logits, labels)

    assert t == pytest.approx(true_t, rel=0.05)


def test_site_sums_give_the_pooled_temperature():
    logits, labels = _tempered(3_000, 2, 1.8, seed=1)
    cuts = [0, 400, 1_700, 3_000]  # three unequal sites

    sites = [
        calibration.to_arrays(calibration.nll_sums(logits[a:b], labels[a:b]), b - a)
        for a, b in zip(cuts, cuts[1:], strict=False)
    ]
    read = [calibration.from_arrays(s) for s in sites]
    fed = calibration.from_sums(
        np.sum([n for n, _ in read], axis=0), sum(c for _, c in read), "sites"
    )

    np.testing.assert_allclose(
        np.sum([n for n, _ in read], axis=0), calibration.nll_sums(logits, labels)
    )
    assert fed.temperature == pytest.approx(
        calibration.fit_temperature(logits, labels), rel=1e-9
    )
    assert fed.images == 3_000 and fed.nll_after <= fed.nll_before


def test_scaling_keeps_the_argmax():
    logits, _ = _tempered(500, 4, 1.0)

    for t in (0.3, 3.0):
        scaled = calibration.scaled_probs(logits, t)
        assert (scaled.argmax(1) == logits.argmax(1)).all()
        np.testing.assert_allclose(scaled.sum(1), 1.0)


def test_temperature_lowers_the_ece_of_an_overconfident_model():
    logits, labels = _tempered(5_000, 2, 3.0, seed=2)  # the model is 3x too sharp
    before = expected_calibration_error(labels, calibration.scaled_probs(logits, 1))

    t = calibration.fit_temperature(logits, labels)
    after = expected_calibration_error(labels, calibration.scaled_probs(logits, t))

    assert before > 0.1 and after < 0.03


def test_ece_by_hand_and_from_summed_bins():
    y = np.array([1, 1, 0, 0])
    p1 = np.array([0.9, 0.7, 0.7, 0.2])  # confidences .9 .7 .7 .8, correct 1 1 0 1
    probs = np.stack([1 - p1, p1], axis=1)
    # bins (15 wide): .9 alone, .7 and .7 together, .8 alone
    expected = (abs(0.9 - 1) + abs(1.4 - 1) + abs(0.8 - 1)) / 4

    assert expected_calibration_error(y, probs) == pytest.approx(expected)
    split = calibration_bins(y[:1], probs[:1]) + calibration_bins(y[1:], probs[1:])
    assert ece_from_bins(split) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"calib.count": np.array([3])}, "calib.nll"),
        (
            {"calib.nll": np.zeros(5), "calib.count": np.array([3])},
            "finite sums",
        ),
        (
            {
                "calib.nll": np.zeros(len(calibration.TEMPERATURES)),
                "calib.count": np.array([-1]),
            },
            "integer >= 0",
        ),
    ],
)
def test_bad_site_sums_are_refused_naming_the_array(arrays, needle):
    with pytest.raises(ValueError, match=needle):
        calibration.from_arrays(arrays)
