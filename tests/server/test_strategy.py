"""Aggregation: FedAvg equals np.average; bad replies are rejected and recorded."""

import numpy as np
import pytest
from flwr.app import (
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from common.config import load_config
from common.serialization import pack
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


def test_fedavg_equals_weighted_np_average():
    rng = np.random.default_rng(0)
    ws = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(3)]
    ns = [10, 30, 60]
    strat = _strategy("federation.norm_outlier_factor=0")
    agg, _ = strat.aggregate_train(
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


def test_fp16_replies_are_upcast_before_averaging():
    w1 = np.full((3, 2), 1.0, np.float32)
    w2 = np.full((3, 2), 3.0, np.float32)
    strat = _strategy("federation.transfer_dtype=float16")
    replies = []
    for w, name in ((w1, "a"), (w2, "b")):
        msg = _reply({"student.w": w}, 1, name)
        msg.content["arrays"] = pack({"student.w": w}, "float16")
        replies.append(msg)
    agg, _ = strat.aggregate_train(1, replies)
    assert agg["student.w"].numpy().dtype == np.float32
    np.testing.assert_allclose(agg["student.w"].numpy(), 2.0)


def test_nan_update_is_rejected_and_recorded():
    good = [
        _reply({"student.w": np.ones((3, 2), np.float32)}, 5, f"s{i}") for i in range(2)
    ]
    bad = _reply({"student.w": np.full((3, 2), np.nan, np.float32)}, 5, "poison")
    strat = _strategy()
    agg, _ = strat.aggregate_train(1, good + [bad])
    np.testing.assert_allclose(agg["student.w"].numpy(), 1.0)
    assert any("poison" in r and "non-finite" in r for r in strat.report.rejected)


def test_norm_outlier_is_rejected():
    replies = [
        _reply({"student.w": np.full((3, 2), 0.1 * (i + 1), np.float32)}, 5, f"s{i}")
        for i in range(3)
    ]
    replies.append(_reply({"student.w": np.full((3, 2), 1e4, np.float32)}, 5, "huge"))
    strat = _strategy("federation.norm_outlier_factor=10")
    agg, _ = strat.aggregate_train(1, replies)
    assert agg["student.w"].numpy().max() < 1.0
    assert any(r.startswith("huge") for r in strat.report.rejected)


def test_forbidden_arrays_are_rejected():
    msg = _reply({"student.w": np.ones((3, 2), np.float32)}, 5, "leaky")
    msg.content["arrays"]["features.x"] = msg.content["arrays"]["student.w"]
    ok = _reply({"student.w": np.ones((3, 2), np.float32)}, 5, "ok")
    strat = _strategy()
    strat.aggregate_train(1, [msg, ok])
    assert any("forbidden" in r for r in strat.report.rejected)


def test_pack_refuses_non_model_arrays():
    from common.errors import MessageError

    with pytest.raises(MessageError, match="only"):
        pack({"images": np.zeros((2, 2), np.uint8)})


@pytest.mark.parametrize("name", ["fedprox", "fedmedian", "fedtrimmedavg", "krum"])
def test_robust_strategies_build_and_aggregate(name):
    strat = _strategy(f"federation.strategy={name}", "federation.norm_outlier_factor=0")
    replies = [
        _reply({"student.w": np.full((3, 2), v, np.float32)}, 5, f"s{v}")
        for v in (1.0, 2.0, 3.0, 100.0)
    ]
    agg, _ = strat.aggregate_train(1, replies)
    assert agg is not None
    if name in ("fedmedian", "krum"):
        assert agg["student.w"].numpy().max() <= 3.0
