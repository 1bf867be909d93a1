"""Aggregation: FedAvg equals np.average; robust rules and server steps by hand."""

import numpy as np
import pytest
import torch
from flwr.app import (
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from common.config import load_config
from common.serialization import pack
from server.screening import screen
from server.strategy import build_strategy


def _reply(arrays: dict, n: int, name: str, node: int = 1) -> Message:
    out = Message(
        RecordDict({"config": ConfigRecord()}),
        dst_node_id=node,
        message_type=MessageType.TRAIN,
    )
    content = RecordDict(
        {
            "arrays": pack(arrays),
            "metrics": MetricRecord({"num-examples": n, "train_loss": 1.0}),
            "site": ConfigRecord({"name": name}),
        }
    )
    return Message(content, reply_to=out)


def _strategy(*overrides):
    cfg = load_config(None, ["partition.sites=4", *overrides])
    strat = build_strategy(cfg, 4)
    strat._reference = pack({"student.w": np.zeros((3, 2), np.float32)})
    return strat


def _aggregate(strat, rnd: int, replies: list[Message]):
    """What the loop does: screen the replies, aggregate those accepted.

    Returns (arrays, metrics, report).
    """
    inner = getattr(strat, "strategy", strat)  # under the DP wrapper
    accepted, report = screen(replies, inner._reference, inner.cfg, {})
    return (*strat.aggregate_train(rnd, accepted), report)


def test_fedavg_equals_weighted_np_average():
    rng = np.random.default_rng(0)
    ws = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(3)]
    ns = [10, 30, 60]
    strat = _strategy("federation.norm_outlier_factor=0")
    agg, _, _ = _aggregate(
        strat,
        1,
        [
            _reply({"student.w": w}, n, f"s{i}")
            for i, (w, n) in enumerate(zip(ws, ns, strict=True))
        ],
    )
    np.testing.assert_allclose(
        agg["student.w"].numpy(),
        np.average(np.stack(ws), axis=0, weights=ns),
        rtol=1e-6,
    )


def test_pack_refuses_non_model_arrays():
    from common.errors import MessageError

    with pytest.raises(MessageError, match="only"):
        pack({"images": np.zeros((2, 2), np.uint8)})


# Five sites with values 1, 2, 4, 8, 100 and 10..50 examples, aggregated by hand:
#   fedprox (FedAvg on the server): (1*10 + 2*20 + 4*30 + 8*40 + 100*50) / 150
#   fedmedian: median(1, 2, 4, 8, 100) = 4
#   fedtrimmedavg, beta 0.2: int(0.2 * 5) = 1 cut per side -> mean(2, 4, 8)
#   krum, 1 byzantine: score = sum of squared distances to the n - f - 2 = 2
#     nearest others: 1 -> 1 + 9, 2 -> 1 + 4, 4 -> 4 + 9, 8 -> 16 + 36; pick 2
ROBUST = {
    "fedprox": 5490 / 150,
    "fedmedian": 4.0,
    "fedtrimmedavg": 14 / 3,
    "krum": 2.0,
}


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_robust_strategies_match_hand_computed_aggregates(name):
    cfg = load_config(
        None,
        [
            "partition.sites=5",
            f"federation.strategy={name}",
            "federation.norm_outlier_factor=0",
            "federation.trim_beta=0.2",
            "federation.krum_byzantine=1",
        ],
    )
    strat = build_strategy(cfg, 5)
    strat._reference = pack({"student.w": np.zeros((3, 2), np.float32)})
    replies = [
        _reply({"student.w": np.full((3, 2), v, np.float32)}, n, f"s{v}")
        for v, n in ((1.0, 10), (2.0, 20), (4.0, 30), (8.0, 40), (100.0, 50))
    ]

    agg, _, _ = _aggregate(strat, 1, replies)

    np.testing.assert_allclose(agg["student.w"].numpy(), ROBUST[name], rtol=1e-6)


def test_integer_buffers_stay_integer_through_averaging_and_the_fp16_wire():
    # num_batches_tracked above 65504 would be inf in float16 and load as
    # -9223372036854775808; averaging alone turns it into a float.
    from common.serialization import load_into

    steps = np.array(70_001, np.int64)
    strat = _strategy(
        "federation.transfer_dtype=float16", "federation.norm_outlier_factor=0"
    )
    strat._reference = pack(
        {
            "student.bn.num_batches_tracked": steps,
            "student.w": np.zeros((3, 2), np.float32),
        }
    )
    replies = [
        _reply(
            {
                "student.bn.num_batches_tracked": steps,
                "student.w": np.full((3, 2), v, np.float32),
            },
            n,
            f"s{v}",
        )
        for v, n in ((1.0, 1), (2.0, 2))
    ]

    agg, _, _ = _aggregate(strat, 1, replies)
    wire = pack({k: agg[k].numpy() for k in agg.keys()}, "float16")

    assert agg["student.bn.num_batches_tracked"].numpy().dtype == np.int64
    assert wire["student.bn.num_batches_tracked"].numpy().dtype == np.int64
    module = torch.nn.Module()
    module.bn = torch.nn.Module()
    module.bn.register_buffer("num_batches_tracked", torch.tensor(0))
    module.w = torch.nn.Parameter(torch.zeros(3, 2))
    load_into(module, wire, "student.")
    assert int(module.bn.num_batches_tracked) == 70_001


def test_server_send_refuses_values_outside_float16():
    from common.errors import MessageError

    strat = _strategy("federation.transfer_dtype=float16")
    arrays = pack({"student.w": np.array([1.0, 7e4, -1e5], np.float32)})

    with pytest.raises(MessageError, match=r"'student.w' has 2 value\(s\) outside"):
        strat.configure_train(1, arrays, ConfigRecord(), grid=None)


def _opt_strategy(name: str, lr: float, momentum: float):
    cfg = load_config(
        None,
        [
            "partition.sites=4",
            f"federation.strategy={name}",
            f"federation.server_lr={lr}",
            f"federation.server_momentum={momentum}",
            "federation.norm_outlier_factor=0",
        ],
    )
    return build_strategy(cfg, 4)


def _round(strat, rnd: int, current: np.ndarray, replies: list[np.ndarray]):
    """configure + aggregate one round with equal-weight replies around `current`."""
    arrays = pack({"student.w": current})
    strat._reference = arrays
    strat._track_server_model(arrays)
    agg, _, _ = _aggregate(
        strat,
        rnd,
        [_reply({"student.w": w}, 10, f"s{i}") for i, w in enumerate(replies)],
    )
    return agg["student.w"].numpy()


def test_fedavgm_step_matches_hand_computed_update():
    strat = _opt_strategy("fedavgm", 0.5, 0.9)
    x0 = np.array([1.0, -2.0], np.float32)
    # round 1: mean reply 0.6,-1.6 -> pseudo-gradient g1 = x0 - mean = (0.4, -0.4)
    x1 = _round(
        strat,
        1,
        x0,
        [np.array([0.5, -1.5], np.float32), np.array([0.7, -1.7], np.float32)],
    )
    g1 = np.array([0.4, -0.4])
    np.testing.assert_allclose(x1, x0 - 0.5 * g1, rtol=1e-6)
    # round 2: momentum v2 = 0.9 * g1 + g2
    x2 = _round(strat, 2, x1, [x1 - 0.1, x1 - 0.3])
    g2 = np.array([0.2, 0.2])
    np.testing.assert_allclose(x2, x1 - 0.5 * (0.9 * g1 + g2), rtol=1e-5)
    # its state is what a checkpoint stores, and restoring it continues alike
    state = strat.optimizer_state()
    fresh = _opt_strategy("fedavgm", 0.5, 0.9)
    fresh.load_optimizer_state(state)
    a = _round(strat, 3, x2, [x2 + 0.2])
    b = _round(fresh, 3, x2, [x2 + 0.2])
    np.testing.assert_array_equal(a, b)


def test_fedadam_step_matches_hand_computed_update():
    strat = _opt_strategy("fedadam", 0.1, 0.9)
    x0 = np.array([1.0, -1.0], np.float32)
    x1 = _round(strat, 1, x0, [np.array([1.5, -1.2], np.float32)])
    delta = np.array([0.5, -0.2])
    m = 0.1 * delta
    v = 0.01 * delta**2
    eta = 0.1 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2)  # Flower's bias correction
    np.testing.assert_allclose(x1, x0 + eta * m / (np.sqrt(v) + 1e-3), rtol=1e-5)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_server_optimiser_accepts_an_array_the_sites_add(name):
    """Round 1 of a federated head: replies carry head arrays the server lacked."""
    strat = _opt_strategy(name, 0.5, 0.9)
    arrays = pack({"student.w": np.zeros(2, np.float32)})
    strat._reference = arrays
    strat._track_server_model(arrays)
    replies = [
        _reply(
            {
                "student.w": np.full(2, v, np.float32),
                "head.weight": np.full((2, 3), v, np.float32),
            },
            10,
            f"s{i}",
        )
        for i, v in enumerate((1.0, 3.0))
    ]
    agg, _, _ = _aggregate(strat, 1, replies)
    assert set(agg.keys()) == {"student.w", "head.weight"}
    # the new array starts at the replies' mean and takes no server step
    np.testing.assert_allclose(agg["head.weight"].numpy(), 2.0, rtol=1e-6)
    assert agg["student.w"].numpy().shape == (2,)


def _fedexp(eps: float = 1e-3):
    cfg = load_config(
        None,
        [
            "partition.sites=4",
            "federation.strategy=fedexp",
            f"federation.fedexp_eps={eps}",
            "federation.norm_outlier_factor=0",
        ],
    )
    return build_strategy(cfg, 4)


def test_fedexp_step_matches_hand_computed_extrapolation():
    x0 = np.array([1.0, 2.0], np.float32)
    # updates d1 = (1, 0), d2 = (-1, 0.2): mean |d_i|^2 = (1 + 1.04) / 2 = 1.02,
    # mean d = (0, 0.1), |d|^2 = 0.01 -> eta = 1.02 / (2 (0.01 + 1e-3))
    x1 = _round(
        _fedexp(),
        1,
        x0,
        [x0 + np.array([1.0, 0.0], np.float32), x0 + np.array([-1.0, 0.2], np.float32)],
    )
    eta = 1.02 / (2 * 0.011)
    np.testing.assert_allclose(x1, x0 + eta * np.array([0.0, 0.1]), rtol=1e-5)


def test_fedexp_is_fedavg_when_the_sites_agree():
    x0 = np.zeros(3, np.float32)
    same = [x0 + 0.5, x0 + 0.5]
    # mean |d_i|^2 = |d|^2 -> eta = max(1, 1/2) = 1: the plain mean
    np.testing.assert_allclose(_round(_fedexp(), 1, x0, same), x0 + 0.5, rtol=1e-6)


def test_fedexp_records_its_step_and_leaves_new_arrays_at_the_mean():
    strat = _fedexp()
    arrays = pack({"student.w": np.zeros(2, np.float32)})
    strat._reference = arrays
    strat._track_server_model(arrays)
    replies = [
        _reply(
            {
                "student.w": np.array([1.0, 0.0], np.float32),
                "head.weight": np.full((2, 3), v, np.float32),
            },
            10,
            f"s{i}",
        )
        for i, v in enumerate((1.0, 3.0))
    ]
    replies[1] = _reply(
        {
            "student.w": np.array([-1.0, 0.0], np.float32),
            "head.weight": np.full((2, 3), 3.0, np.float32),
        },
        10,
        "s1",
    )
    agg, metrics, _ = _aggregate(strat, 1, replies)
    # opposite updates: mean d = 0 -> eta = 1 / (2 * 1e-3) = 500, times a zero move
    assert metrics["server_step"] == pytest.approx(500.0)
    np.testing.assert_allclose(agg["student.w"].numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(agg["head.weight"].numpy(), 2.0, rtol=1e-6)
