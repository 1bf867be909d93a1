"""The ClientApp's replies carry only the student (and head) and scalar metrics."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import app
from common.serialization import ALLOWED_PREFIXES, pack
from server.federation import initial_arrays
from tests.helpers import small_npz, tiny_config


def _context(pid: int) -> Context:
    return Context(
        run_id=1,
        node_id=pid + 1,
        node_config={"partition-id": pid, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )


def _msg(kind: str, content: RecordDict) -> Message:
    return Message(content=content, dst_node_id=1, message_type=kind)


def _walk_reply(
    reply: Message, image_count: int, allowed: tuple[str, ...] = ALLOWED_PREFIXES
) -> dict:
    """Every record of a reply; fail on anything that is not allowed out."""
    seen = {"arrays": [], "metrics": [], "configs": []}
    for name, rec in reply.content.array_records.items():
        for key in rec.keys():
            assert key.startswith(allowed), f"{name}/{key} must not leave"
            arr = rec[key].numpy()
            assert arr.dtype != np.uint8, "uint8 arrays look like images"
            assert image_count not in arr.shape[:1] or arr.ndim == 1, (
                f"{key} has one row per image: looks like data, not weights"
            )
            seen["arrays"].append(key)
    for rec in reply.content.metric_records.values():
        for key, value in rec.items():
            assert isinstance(value, (int, float)), f"metric {key} is not scalar"
            seen["metrics"].append(key)
    for rec in reply.content.config_records.values():
        for key, value in rec.items():
            flat = value if isinstance(value, list) else [value]
            assert all(isinstance(v, (str, int, float, bool)) for v in flat)
            assert not isinstance(value, bytes), f"config {key} carries bytes"
            seen["configs"].append(key)
    return seen


@pytest.mark.parametrize("head", ["local", "federated"])
def test_replies_contain_only_student_head_and_scalars(pneumonia_npz, tmp_path, head):
    npz = small_npz(pneumonia_npz, tmp_path / "small.npz")
    cfg = tiny_config(npz, tmp_path, f"teacher.head={head}")
    conf = ConfigRecord(
        {"experiment": cfg.to_yaml(), "num-classes": 2, "server-round": 1}
    )
    ctx = _context(0)

    info = app(_msg(MessageType.QUERY, RecordDict({"config": conf})), ctx)
    site = dict(info.content["site"])
    assert len(site["classes"]) == 2 and site["num-train"] > 0
    _walk_reply(info, site["num-train"])

    arrays = pack(initial_arrays(cfg, 2, 1, 0))
    reply = app(
        _msg(MessageType.TRAIN, RecordDict({"arrays": arrays, "config": conf})), ctx
    )
    seen = _walk_reply(reply, site["num-train"])
    has_head = any(k.startswith("head.") for k in seen["arrays"])
    assert has_head == (head == "federated")
    assert {"num-examples", "train_loss", "train_kd"} <= set(seen["metrics"])
    assert set(reply.content["arrays"].keys()) - {
        k for k in reply.content["arrays"].keys() if k.startswith("head.")
    } == set(arrays.keys())

    ev = app(
        _msg(
            MessageType.EVALUATE,
            RecordDict({"arrays": reply.content["arrays"], "config": conf}),
        ),
        ctx,
    )
    seen = _walk_reply(ev, site["num-test"])
    assert seen["arrays"] == []
    assert {"acc", "loss", "num-examples", "teacher_acc"} <= set(seen["metrics"])


def test_missing_experiment_config_is_an_error_reply(tmp_path):
    from common.errors import MessageError

    with pytest.raises(MessageError, match="experiment"):
        app(
            _msg(MessageType.QUERY, RecordDict({"config": ConfigRecord()})), _context(0)
        )


def test_the_per_message_process_imports_no_heavy_optional_package():
    # Flower starts a fresh ClientApp process for every deployed message, so
    # every import here is paid per message (scipy alone took 1-2 s)
    import subprocess
    import sys

    heavy = ("scipy", "timm", "sklearn", "torchvision", "opacus", "matplotlib")
    code = f"import client.app, sys; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert out.stdout.strip() == "[]"
