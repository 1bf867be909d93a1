"""The warm site worker answers exactly as the ClientApp process would."""

import json
import logging
import os
import socket
import stat
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client import entry, worker
from client.app import app as site_app
from common import timing
from common.serialization import pack
from server.federation import initial_arrays
from tests.helpers import small_npz, tiny_config


@pytest.fixture
def sock_path():
    # a Unix socket path holds at most 107 bytes: pytest's tmp_path can be longer
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        yield Path(d) / "w.sock"


@pytest.fixture
def running(sock_path):
    stop = threading.Event()
    t = threading.Thread(
        target=worker.serve, args=(sock_path,), kwargs={"stop": stop, "app": site_app}
    )
    t.start()
    for _ in range(200):
        if sock_path.is_socket():
            break
        threading.Event().wait(0.01)
    yield sock_path
    stop.set()
    t.join(10)


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0,
                   "num-partitions": 3, **node_config}, state=RecordDict(),
                   run_config={})


def _msg(kind: str, content: RecordDict) -> Message:
    return Message(content=content, dst_node_id=1, message_type=kind)


def _arrays(reply: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in reply.content["arrays"].items()}


def test_a_round_through_the_worker_equals_one_in_process(
    pneumonia_npz, tmp_path, running
):
    cfg = tiny_config(small_npz(pneumonia_npz, tmp_path / "s.npz"), tmp_path,
                      "train.optimizer_state=keep")
    conf = ConfigRecord({"experiment": cfg.to_yaml(), "num-classes": 2,
                         "server-round": 1})
    arrays = pack(initial_arrays(cfg, 2, 1, 0))
    here, there = _context({}), _context({entry.SOCKET_KEY: str(running)})
    replies = {}
    for name, ctx in (("here", here), ("there", there)):
        query = _msg(MessageType.QUERY, RecordDict({"config": conf}))
        info = entry.dispatch(query, ctx)
        train = entry.dispatch(
            _msg(MessageType.TRAIN, RecordDict({"arrays": arrays, "config": conf})), ctx
        )
        replies[name] = (dict(info.content["site"]), train)

    assert replies["here"][0] == replies["there"][0]
    a, b = _arrays(replies["here"][1]), _arrays(replies["there"][1])
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # the state a site keeps across rounds (the optimiser's) came back
    assert set(there.state.keys()) == set(here.state.keys()) != set()
    # the reply says where the time went, the crossing to the worker included
    phases = timing.from_metrics(dict(replies["there"][1].content["profile"]))
    assert {"worker", "train", "handler", "start", "import", "load"} <= set(phases)
    assert phases["handler"] >= phases["worker"] >= 0


def test_a_handler_error_in_the_worker_is_raised_in_the_clientapp(running):
    ctx = _context({entry.SOCKET_KEY: str(running)})

    with pytest.raises(worker.WorkerFailed, match="MessageError.*experiment"):
        entry.dispatch(_msg(MessageType.QUERY, RecordDict({"config": ConfigRecord()})),
                       ctx)


def test_without_a_worker_the_clientapp_handles_the_message_itself(
    pneumonia_npz, tmp_path, sock_path, caplog
):
    cfg = tiny_config(small_npz(pneumonia_npz, tmp_path / "s.npz"), tmp_path)
    conf = ConfigRecord({"experiment": cfg.to_yaml(), "num-classes": 2})
    ctx = _context({entry.SOCKET_KEY: str(sock_path)})  # nothing listens there

    with caplog.at_level(logging.WARNING, logger="client.entry"):
        query = _msg(MessageType.QUERY, RecordDict({"config": conf}))
        info = entry.dispatch(query, ctx)

    assert dict(info.content["site"])["num-train"] > 0
    assert "no site worker at" in caplog.text


def test_a_worker_refuses_a_clientapp_with_other_code(sock_path):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    header = {"protocol": worker.PROTOCOL, "code": "0" * 16, "task": [1, 1, 1]}
    worker._send(a, json.dumps(header).encode(), b"", b"")

    outcome = worker.handle(b, site_app)

    answer = json.loads(worker._recv(a, 1)[0])
    assert "other code" in answer["refused"] and outcome.startswith("refused")
    a.close(), b.close()


def test_the_socket_is_private_to_the_workers_user(sock_path):
    server = worker.bind(sock_path)
    try:
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
    finally:
        server.close()
    # a stale socket is replaced; any other file there is not
    worker.bind(sock_path).close()
    sock_path.unlink()
    sock_path.write_text("not a socket")
    with pytest.raises(FileExistsError, match="not a socket"):
        worker.bind(sock_path)


def test_the_thin_clientapp_routes_every_message_type_of_the_site_app():
    assert set(entry.app._registered_funcs) == set(site_app._registered_funcs)


def test_the_thin_clientapp_imports_no_torch():
    import subprocess
    import sys

    code = "import client.entry, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True)

    assert out.stdout.strip() == "False"


def test_a_garbled_request_does_not_stop_the_worker(running, pneumonia_npz, tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(running))
        header = {"protocol": worker.PROTOCOL, "code": worker.code_fingerprint(),
                  "task": [1, 1, 1]}
        worker._send(s, json.dumps(header).encode(), b"\xff not protobuf", b"")
    cfg = tiny_config(small_npz(pneumonia_npz, tmp_path / "s.npz"), tmp_path)
    conf = ConfigRecord({"experiment": cfg.to_yaml(), "num-classes": 2})
    ctx = _context({entry.SOCKET_KEY: str(running)})

    reply = entry.dispatch(_msg(MessageType.QUERY, RecordDict({"config": conf})), ctx)

    assert dict(reply.content["site"])["num-train"] > 0
    assert "worker" in timing.from_metrics(dict(reply.content["profile"]))
