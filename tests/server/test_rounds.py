"""Node sampling is seeded per round and does not leak into the global `random`."""

import random

from server.rounds import SeededSampling


def _draws(sampling: SeededSampling, seed: int) -> list[int]:
    sampling.reseed(seed)
    with sampling.active():
        train = random.sample(range(100), 5)  # what Flower's sample_nodes does
    with sampling.active():  # the round's evaluate sampling continues the stream
        evaluate = random.sample(range(100), 5)
    return train + evaluate


def test_sampling_is_a_function_of_the_seed_alone():
    random.seed(1)
    a = _draws(SeededSampling(), 42)
    random.seed(2)  # whatever else the process did with `random`
    b = _draws(SeededSampling(), 42)

    assert a == b
    random.seed(42)
    assert a == random.sample(range(100), 5) + random.sample(range(100), 5)


def test_sampling_leaves_the_global_random_state_alone():
    random.seed(7)
    before = random.getstate()

    _draws(SeededSampling(), 42)

    assert random.getstate() == before
