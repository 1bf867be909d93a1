"""A secure sum's request and its two-limb encoding through Flower's quantiser."""

import numpy as np
import pytest
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from common.errors import MessageError
from common.secure_sum import (
    SumRequest,
    join_limbs,
    quantization_levels,
    split_limbs,
)


def test_levels_are_the_finest_the_modulus_allows():
    assert quantization_levels(0, 2) == 1 << 30
    assert quantization_levels(0, 3) == quantization_levels(0, 4) == 1 << 29
    assert quantization_levels(0, 5) == 1 << 28
    assert quantization_levels(0, 1000) * 1000 <= 1 << 31
    assert quantization_levels(1 << 22, 4) == 1 << 22  # set by hand


def test_two_limbs_through_flowers_quantiser_sum_to_float64_precision():
    q = quantization_levels(0, 4)
    rng = np.random.default_rng(0)
    # small variations on a large common value: what a Gram matrix holds
    sites = [0.7 + 1e-7 * rng.normal(size=200) for _ in range(4)]
    exact = np.sum(sites, axis=0)

    his, los = zip(*(split_limbs(x, q) for x in sites), strict=True)
    assert all(((lo >= 0) & (lo < 1)).all() for lo in los)
    # the grid values pass Flower's stochastic rounding unchanged
    for hi in his:
        once, twice = (quantize([hi], 1.0, q)[0] for _ in range(2))
        assert (once == twice).all()

    def flower_sum(vectors):  # quantise per site, add the integers, dequantise
        total = sum(quantize([v], 1.0, q)[0].astype(np.int64) for v in vectors)
        return dequantize([total], 1.0, q)[0] - (len(vectors) - 1) * 1.0

    got = join_limbs(flower_sum(his), flower_sum(los), q)
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-14)
    one_limb = flower_sum(sites)  # the plain quantiser: 2 / Q steps
    assert np.abs(one_limb - exact).max() > 1e-10


def test_a_request_round_trips_and_a_bad_one_names_the_problem():
    req = SumRequest("ridge", ["a", "b"], [2.0, 8.0], 1 << 29)
    assert SumRequest.from_config(req.to_config()) == req
    assert SumRequest.from_config({"experiment": "x"}) is None
    with pytest.raises(MessageError, match="2 names .* 1 positive scales"):
        SumRequest.from_config({**req.to_config(), "sum-scales": [2.0]})
    with pytest.raises(MessageError, match="sum-levels 3"):
        SumRequest.from_config({**req.to_config(), "sum-levels": 3})
