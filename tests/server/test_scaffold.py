"""SCAFFOLD at the server: c goes out with the model, comes back as Delta c_i, is
updated by the paper's formula, survives a checkpoint, and screening knows it."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from common.config import load_config
from common.errors import MessageError
from common.serialization import pack, record_bytes, reply_prefixes
from server import checkpoint
from server.screening import screen
from server.strategy import build_strategy

DC = "scaffold.dc.student.w"


class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _cfg(strategy: str = "scaffold", *extra: str):
    return load_config(
        None,
        ["partition.sites=3", f"federation.strategy={strategy}",
         "federation.norm_outlier_factor=0", *extra],
    )


def _reply(arrays: dict, n: int, name: str, strategy: str = "scaffold") -> Message:
    out = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=1,
                  message_type=MessageType.TRAIN)
    content = RecordDict(
        {
            "arrays": pack(arrays, "float32", reply_prefixes(strategy)),
            "metrics": MetricRecord({"num-examples": n, "train_loss": 1.0}),
            "site": ConfigRecord({"name": name}),
        }
    )
    return Message(content, reply_to=out)


def _configure(strat, x: np.ndarray, rnd: int = 1) -> list[Message]:
    arrays = pack({"student.w": x})
    return list(strat.configure_train(rnd, arrays, ConfigRecord(), _Grid([1, 2, 3])))


def _aggregate(strat, replies: list[Message]):
    accepted, report = screen(replies, strat._reference, strat.cfg, {})
    arrays, metrics = strat.aggregate_train(1, accepted)
    return arrays, metrics, report


def test_control_update_for_two_sites_out_of_three_is_the_papers_formula():
    strat = build_strategy(_cfg(), 3)
    c0 = np.array([0.5, -1.0], np.float32)
    strat.control = {"student.w": c0.copy()}
    x = np.array([1.0, 2.0], np.float32)
    _configure(strat, x)
    d1, d2 = np.array([0.3, 0.6], np.float32), np.array([-0.9, 0.0], np.float32)
    replies = [
        _reply({"student.w": x + 1, DC: d1}, 10, "s1"),
        _reply({"student.w": x - 2, DC: d2}, 30, "s2"),
    ]

    agg, metrics, report = _aggregate(strat, replies)

    # c <- c + |S|/N mean(Delta c_i), |S| = 2 of N = 3
    expect = c0 + (2 / 3) * (d1 + d2) / 2
    np.testing.assert_allclose(strat.control["student.w"], expect, rtol=1e-6)
    assert metrics["scaffold_c_norm"] == pytest.approx(np.linalg.norm(expect))
    # the model is FedAvg's example-weighted mean, without the Delta c arrays
    assert set(agg.keys()) == {"student.w"} and report.accepted == 2
    np.testing.assert_allclose(agg["student.w"].numpy(), x + (10 - 60) / 40,
                               rtol=1e-6)


def test_c_goes_out_with_the_model_once_there_is_one():
    strat = build_strategy(_cfg("scaffold", "federation.transfer_dtype=float16"), 3)
    x = np.zeros(4, np.float32)
    first = _configure(strat, x)
    assert set(first[0].content["arrays"].keys()) == {"student.w"}  # c = 0
    strat.control = {"student.w": np.full(4, 0.25, np.float32)}

    sent = _configure(strat, x, rnd=2)

    rec = sent[0].content["arrays"]
    assert set(rec.keys()) == {"student.w", "scaffold.c.student.w"}
    assert rec["scaffold.c.student.w"].numpy().dtype == np.float16  # the wire's
    np.testing.assert_array_equal(rec["scaffold.c.student.w"].numpy(), 0.25)
    # c doubles the downlink; the reference the replies are screened against
    # is the model alone
    assert record_bytes(rec) == 2 * record_bytes(first[0].content["arrays"])
    assert set(strat._reference.keys()) == {"student.w"}


def test_zero_control_variates_aggregate_exactly_as_fedavg():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2)).astype(np.float32)
    ws = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(3)]
    ns = [10, 25, 40]
    fedavg, scaffold = build_strategy(_cfg("fedavg"), 3), build_strategy(_cfg(), 3)
    for strat in (fedavg, scaffold):
        _configure(strat, x)
    zero = np.zeros((3, 2), np.float32)

    pairs = list(enumerate(zip(ws, ns, strict=True)))
    a, _, _ = _aggregate(fedavg, [_reply({"student.w": w}, n, f"s{i}", "fedavg")
                                  for i, (w, n) in pairs])
    b, _, _ = _aggregate(scaffold, [_reply({"student.w": w, DC: zero}, n, f"s{i}")
                                    for i, (w, n) in pairs])

    np.testing.assert_array_equal(a["student.w"].numpy(), b["student.w"].numpy())
    np.testing.assert_array_equal(scaffold.control["student.w"], zero)


def test_server_lr_scales_the_step_from_the_global_model():
    strat = build_strategy(_cfg("scaffold", "federation.server_lr=2.0"), 3)
    x = np.array([1.0, -1.0], np.float32)
    _configure(strat, x)
    zero = np.zeros(2, np.float32)
    agg, _, _ = _aggregate(strat, [_reply({"student.w": x + 0.5, DC: zero}, 1, "a"),
                                   _reply({"student.w": x + 1.5, DC: zero}, 1, "b")])
    np.testing.assert_allclose(agg["student.w"].numpy(), x + 2.0 * 1.0, rtol=1e-6)


def test_c_round_trips_through_a_checkpoint(tmp_path):
    strat = build_strategy(_cfg(), 3)
    control = {"student.w": np.array([0.1, -0.2], np.float32),
               "student.conv.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    strat.control = dict(control)
    checkpoint.save_checkpoint(tmp_path, 4, {"student.w": np.zeros(2, np.float32)},
                               {"optimizer_state": strat.optimizer_state()})

    ck = checkpoint.load_checkpoint(tmp_path)
    fresh = build_strategy(_cfg(), 3)
    fresh.load_optimizer_state(ck["optimizer_state"])

    assert set(fresh.control) == set(control)
    for k, v in control.items():
        np.testing.assert_array_equal(fresh.control[k], v)
        assert fresh.control[k].dtype == np.float32
    x = np.zeros(2, np.float32)
    a, b = _configure(strat, x, 5)[0], _configure(fresh, x, 5)[0]
    for k in a.content["arrays"].keys():
        np.testing.assert_array_equal(a.content["arrays"][k].numpy(),
                                      b.content["arrays"][k].numpy())


def test_screening_takes_delta_c_only_under_scaffold():
    x = np.zeros(2, np.float32)
    fedavg = build_strategy(_cfg("fedavg"), 3)
    _configure(fedavg, x)
    sneaky = _reply({"student.w": x + 1, DC: x}, 5, "s1", "scaffold")
    _, report = screen([sneaky], fedavg._reference, fedavg.cfg, {})
    assert report.accepted == 0
    assert report.rejected == ["s1: forbidden arrays ['scaffold.dc.student.w']"]
    # a site cannot even pack it outside scaffold
    with pytest.raises(MessageError, match="refusing to send array"):
        pack({DC: x}, "float32", reply_prefixes("fedavg"))

    scaffold = build_strategy(_cfg(), 3)
    _configure(scaffold, x)
    bad = [
        _reply({"student.w": x + 1}, 5, "none"),
        _reply({"student.w": x, "scaffold.dc.student.v": x}, 5, "orphan"),
        _reply({"student.w": x, DC: np.zeros(3, np.float32)}, 5, "shape"),
        _reply({"student.w": x, DC: np.array([np.nan, 0], np.float32)}, 5, "nan"),
    ]
    _, report = screen(bad, scaffold._reference, scaffold.cfg, {})
    assert report.accepted == 0
    assert [r.split(":")[0] for r in report.rejected] == ["none", "orphan", "shape",
                                                          "nan"]
    assert "no 'scaffold.dc.' control-variate update" in report.rejected[0]
    assert "corrects no array of the reply" in report.rejected[1]
    assert "has shape (3,)" in report.rejected[2]
    assert report.rejected[3] == "nan: non-finite weights"


# -- through the loop: the real ClientApp on the in-process Grid ----------------


@pytest.fixture
def npz(pneumonia_npz, tmp_path_factory):
    from tests.helpers import small_npz

    return small_npz(pneumonia_npz, tmp_path_factory.mktemp("data") / "small.npz",
                     n_train=120, n_test=40)


def _run(cfg, app=None, resume=False):
    from pathlib import Path

    from client.app import app as client_app
    from server.federation import run_federation
    from simulations.inprocess import InProcessGrid

    grid = InProcessGrid(app or client_app, cfg.partition.sites)
    return run_federation(grid, cfg, Path(cfg.run.out_dir), resume=resume,
                          expected_sites=cfg.partition.sites)


def _loop_config(npz, tmp):
    from tests.helpers import tiny_config

    return tiny_config(npz, tmp, "federation.strategy=scaffold",
                       "federation.rounds=3", "distill.alpha=1.0",
                       "train.lr=0.05", "train.optimizer_state=keep",
                       "calibration.temperature=false", "calibration.ood=none")


def test_scaffold_runs_through_the_loop_and_resumes_to_the_identical_model(
        npz, tmp_path):
    from client.app import app as client_app
    from client.site import site_cache
    from server import history

    full = _loop_config(npz, tmp_path / "a")
    _run(full)
    done = checkpoint.load_checkpoint(tmp_path / "a" / "run")
    rows = history.read_rows(tmp_path / "a" / "run" / "history.jsonl")
    # c is sent from round 2 on, and covers exactly the student's parameters
    assert rows[1]["bytes_down"] > rows[0]["bytes_down"]
    assert rows[0]["bytes_up"] > rows[0]["bytes_down"]  # Delta c_i comes back
    control = done["optimizer_state"]["control"]
    params = {k for k in done["arrays"] if "running_" not in k
              and "num_batches" not in k}
    assert set(control) == params
    assert all(r["train"]["scaffold_c_norm"] > 0 for r in rows)
    assert all(r["rejected"] == [] and r["failed"] == [] for r in rows)

    cut = _loop_config(npz, tmp_path / "b")
    calls = {"n": 0}

    def dies_in_round_3(msg, ctx):
        if msg.metadata.message_type == "train":
            calls["n"] += 1
            if calls["n"] > 2 * cut.partition.sites:
                raise KeyboardInterrupt("server killed")
        return client_app(msg, ctx)

    with pytest.raises(KeyboardInterrupt):
        _run(cut, dies_in_round_3)
    site_cache.clear()  # a restarted server and sites: c_i from the sites' disks
    _run(cut, resume=True)
    got = checkpoint.load_checkpoint(tmp_path / "b" / "run")
    for k, v in done["arrays"].items():
        assert np.array_equal(got["arrays"][k], v), k
    for k, v in control.items():
        assert np.array_equal(got["optimizer_state"]["control"][k], v), k
