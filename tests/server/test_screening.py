"""Reply screening: bad replies are rejected and recorded, never silently dropped."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from common.config import load_config
from common.serialization import PROFILE_RECORD, pack, record_bytes
from server.screening import screen, screen_evaluate
from server.strategy import site_eval_means
from tests.server.test_strategy import _aggregate, _reply, _strategy


def test_fp16_replies_are_upcast_before_averaging():
    # 0.1 and 1/3 are not exact in float16: the wire rounds each reply, and the
    # mean of the rounded values is itself not a float16 number, so an average
    # taken (or kept) in float16 would differ from this hand-computed one.
    w1 = np.full((3, 2), 0.1, np.float32)
    w2 = np.full((3, 2), 1 / 3, np.float32)
    a, b = np.float32(np.float16(0.1)), np.float32(np.float16(1 / 3))
    expected = np.float32((a + b) / 2)
    assert a != np.float32(0.1) and np.float16(expected) != expected
    strat = _strategy("federation.transfer_dtype=float16")
    replies = []
    for w, name in ((w1, "a"), (w2, "b")):
        msg = _reply({"student.w": w}, 1, name)
        msg.content["arrays"] = pack({"student.w": w}, "float16")
        replies.append(msg)

    agg, _, _ = _aggregate(strat, 1, replies)

    assert agg["student.w"].numpy().dtype == np.float32
    np.testing.assert_allclose(agg["student.w"].numpy(), expected, rtol=1e-7)


def test_nan_update_is_rejected_and_recorded():
    good = [
        _reply({"student.w": np.ones((3, 2), np.float32)}, 5, f"s{i}") for i in range(2)
    ]
    bad = _reply({"student.w": np.full((3, 2), np.nan, np.float32)}, 5, "poison")
    strat = _strategy()
    agg, _, report = _aggregate(strat, 1, good + [bad])
    np.testing.assert_allclose(agg["student.w"].numpy(), 1.0)
    assert any("poison" in r and "non-finite" in r for r in report.rejected)


def test_norm_outlier_is_rejected():
    replies = [
        _reply({"student.w": np.full((3, 2), 0.1 * (i + 1), np.float32)}, 5, f"s{i}")
        for i in range(3)
    ]
    replies.append(_reply({"student.w": np.full((3, 2), 1e4, np.float32)}, 5, "huge"))
    strat = _strategy("federation.norm_outlier_factor=10")
    agg, _, report = _aggregate(strat, 1, replies)
    assert agg["student.w"].numpy().max() < 1.0
    assert any(r.startswith("huge") for r in report.rejected)


def test_forbidden_arrays_are_rejected():
    msg = _reply({"student.w": np.ones((3, 2), np.float32)}, 5, "leaky")
    msg.content["arrays"]["features.x"] = msg.content["arrays"]["student.w"]
    ok = _reply({"student.w": np.ones((3, 2), np.float32)}, 5, "ok")
    strat = _strategy()
    _, _, report = _aggregate(strat, 1, [msg, ok])
    assert any("forbidden" in r for r in report.rejected)


def _eval_reply(name: str, metrics: dict | None, node: int) -> Message:
    out = Message(
        RecordDict({"config": ConfigRecord()}),
        dst_node_id=node,
        message_type=MessageType.EVALUATE,
    )
    content = {"site": ConfigRecord({"name": name})}
    if metrics is not None:
        content["metrics"] = MetricRecord(metrics)
    return Message(RecordDict(content), reply_to=out)


def test_evaluate_reply_without_metrics_is_rejected_not_raised():
    cfg = load_config(None, ["partition.sites=4"])
    replies = [
        _eval_reply("a", {"num-examples": 10, "acc": 0.5}, 1),
        _eval_reply("b", {"num-examples": 30, "acc": 0.9}, 2),
        _eval_reply("empty", None, 3),
    ]

    rows, report = screen_evaluate(replies, cfg, {})
    out = site_eval_means(rows)

    assert out["acc"] == pytest.approx((10 * 0.5 + 30 * 0.9) / 40)
    assert out["worst_site_acc"] == pytest.approx(0.5)
    assert any(r.startswith("empty (evaluate): malformed") for r in report.rejected)


def test_screen_leaves_the_replies_as_they_came():
    cfg = load_config(None, ["partition.sites=4", "federation.transfer_dtype=float16"])
    msg = _reply({"student.w": np.ones((3, 2), np.float32)}, 5, "a")
    msg.content["arrays"] = pack({"student.w": np.ones((3, 2), np.float32)}, "float16")
    reference = pack({"student.w": np.zeros((3, 2), np.float32)})

    accepted, report = screen([msg], reference, cfg, {})

    assert msg.content["arrays"]["student.w"].numpy().dtype == np.float16
    assert accepted[0].content["arrays"]["student.w"].numpy().dtype == np.float32
    assert accepted[0].metadata.src_node_id == msg.metadata.src_node_id
    assert (report.received, report.accepted) == (1, 1)
    assert report.bytes_up == record_bytes(msg.content["arrays"])  # as sent
    assert report.sites == {"a": {"train/num-examples": 5.0, "train/train_loss": 1.0}}


def test_a_silent_site_is_named_from_the_handshake():
    cfg = load_config(None, ["partition.sites=4", "federation.round_timeout=5"])
    reference = pack({"student.w": np.zeros((3, 2), np.float32)})
    sent = [
        Message(RecordDict({"arrays": reference}), dst_node_id=n, message_type="train")
        for n in (1, 7)
    ]
    replies = [_reply({"student.w": np.ones((3, 2), np.float32)}, 5, "a", node=1)]

    accepted, report = screen(replies, reference, cfg, {7: "hospital-b"}, sent=sent)

    assert len(accepted) == 1 and report.sampled == 2
    assert report.failed == ["hospital-b: no reply within federation.round_timeout=5s"]
    assert report.bytes_down == 2 * record_bytes(reference)


def test_the_sites_timings_go_into_the_history_and_not_into_the_metrics():
    cfg = load_config(None, ["partition.sites=4"])
    msg = _reply({"student.w": np.ones((3, 2), np.float32)}, 5, "a")
    msg.content[PROFILE_RECORD] = ConfigRecord({"t_train_s": 1.5, "t_site_s": 0.25})
    reference = pack({"student.w": np.zeros((3, 2), np.float32)})
    ev = _eval_reply("a", {"num-examples": 10, "acc": 0.8}, 1)
    ev.content[PROFILE_RECORD] = ConfigRecord({"t_eval_s": 0.5})

    _, report = screen([msg], reference, cfg, {})
    rows, ev_report = screen_evaluate([ev], cfg, {})

    assert report.sites["a"]["train/t_train_s"] == 1.5
    assert report.sites["a"]["train/t_site_s"] == 0.25
    assert "t_train_s" not in msg.content["metrics"]  # Flower aggregates those
    assert ev_report.sites["a"]["eval/t_eval_s"] == 0.5
    assert rows == {"a": {"acc": 0.8, "num-examples": 10.0}}  # not averaged
