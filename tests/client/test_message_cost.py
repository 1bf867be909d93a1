"""A Flower message is a fresh process: with a warm cache it must stay cheap.

With every teacher feature cached the handlers never build the backbone, and a
train reply can carry the site's evaluation of the model it received. Every
reply says where its time went, phase by phase.
"""

import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

import client.site.teacher as site_teacher
import common.models.teacher as teacher_mod
from client.app import app
from client.site import site_cache
from common import timing
from common.serialization import EVAL_RECEIVED, EVAL_RECORD, PROFILE_RECORD, pack
from server.federation import initial_arrays
from tests.helpers import small_npz, tiny_config


def _ctx() -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )


def _send(kind: str, conf: ConfigRecord, ctx: Context, arrays=None) -> Message:
    content = RecordDict({"config": conf})
    if arrays is not None:
        content["arrays"] = arrays
    return app(Message(content=content, dst_node_id=1, message_type=kind), ctx)


def _fresh_process() -> None:
    """Forget what this process built, as a new ClientApp process would."""
    site_cache.clear()


@pytest.fixture
def warm(pneumonia_npz, tmp_path, monkeypatch):
    """(config record, arrays) after one query filled the teacher cache."""
    npz = small_npz(pneumonia_npz, tmp_path / "small.npz", n_train=60, n_test=20)
    cfg = tiny_config(npz, tmp_path, "teacher.head=federated")
    conf = ConfigRecord(
        {"experiment": cfg.to_yaml(), "num-classes": 2, "server-round": 1}
    )
    first = _send(MessageType.QUERY, conf, _ctx())
    _fresh_process()
    return conf, pack(initial_arrays(cfg, 2, 1, 0)), dict(first.content["site"])


def test_handlers_with_a_full_cache_never_build_the_teacher(warm, monkeypatch):
    conf, arrays, first_info = warm

    def refuse(*_a, **_k):
        raise AssertionError("teacher backbone built although every feature is cached")

    monkeypatch.setattr(teacher_mod.FrozenTeacher, "__init__", refuse)
    monkeypatch.setattr(site_teacher, "load_teacher", refuse)

    info = dict(_send(MessageType.QUERY, conf, _ctx()).content["site"])
    _fresh_process()
    trained = _send(MessageType.TRAIN, conf, _ctx(), arrays)
    _fresh_process()
    ev = _send(MessageType.EVALUATE, conf, _ctx(), trained.content["arrays"])

    # the description comes from the cache's teacher.json, as if built
    assert info["teacher-feature-dim"] == first_info["teacher-feature-dim"] > 0
    assert info["teacher-weights"] == "random"
    assert "teacher_acc" in ev.content["metrics"]


def test_train_reply_carries_the_received_models_evaluation(warm):
    conf, arrays, _ = warm
    conf_eval = ConfigRecord(dict(conf, **{EVAL_RECEIVED: True}))

    plain = _send(MessageType.TRAIN, conf, _ctx(), arrays)
    both = _send(MessageType.TRAIN, conf_eval, _ctx(), arrays)
    alone = _send(MessageType.EVALUATE, conf, _ctx(), arrays)

    assert EVAL_RECORD not in plain.content.config_records
    assert dict(both.content[EVAL_RECORD]) == pytest.approx(
        dict(alone.content["metrics"])
    )
    # evaluating first leaves the update exactly as without it
    for k in plain.content["arrays"].keys():
        np.testing.assert_array_equal(
            plain.content["arrays"][k].numpy(), both.content["arrays"][k].numpy()
        )


def test_replies_carry_the_seconds_of_each_phase(warm, monkeypatch):
    conf, arrays, _ = warm
    conf_eval = ConfigRecord(dict(conf, **{EVAL_RECEIVED: True}))
    clock = timing.ProcessClock()  # as in a fresh flwr-clientapp process
    clock.app_imported(time.perf_counter() - 0.1)
    monkeypatch.setattr(timing, "process_clock", clock)

    t0 = time.perf_counter()
    first = _send(MessageType.TRAIN, conf_eval, _ctx(), arrays)
    wall = time.perf_counter() - t0
    second = _send(MessageType.EVALUATE, conf, _ctx(), arrays)

    seconds = timing.from_metrics(dict(first.content[PROFILE_RECORD]))
    inside = ["config", "site", "features", "eval", "head", "gate", "train", "reply"]
    assert set(inside) | {"handler", "import", "load"} <= set(seconds)
    assert all(v >= 0 for v in seconds.values())
    assert sum(seconds[k] for k in inside) <= seconds["handler"] + 1e-3 <= wall + 1e-3
    assert seconds["import"] >= 0.1  # the start-up went to the first message
    assert set(first.content["metrics"]).isdisjoint(first.content[PROFILE_RECORD])
    later = timing.from_metrics(dict(second.content[PROFILE_RECORD]))
    assert later["import"] == later["load"] == 0.0 and later["eval"] > 0
