"""Injected faults: failing and poisoning sites, a killed server, DP clipping.

The federation loop runs on the in-process Grid, which calls the real
ClientApp for every site, so each fault goes through the production code.
"""

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array

from client.app import app as client_app
from client.site import site_cache
from common.errors import FedKDError
from server import checkpoint, history
from server.federation import run_federation
from simulations.inprocess import InProcessGrid
from tests.helpers import small_npz, tiny_config


@pytest.fixture
def npz(pneumonia_npz, tmp_path_factory):
    return small_npz(pneumonia_npz, tmp_path_factory.mktemp("data") / "small.npz")


def _faulty(bad_node: int, fault: str):
    """A ClientApp that misbehaves on one node for train messages."""

    def app(msg, ctx):
        if ctx.node_id == bad_node and msg.metadata.message_type == "train":
            if fault == "raise":
                raise RuntimeError("disk full at the hospital")
            reply = client_app(msg, ctx)
            arrays = reply.content["arrays"]
            key = next(k for k in arrays.keys() if k.endswith("weight"))
            arr = arrays[key].numpy().copy()
            arr[...] = np.nan if fault == "nan" else 1e6
            arrays[key] = Array(arr)
            return reply
        return client_app(msg, ctx)

    return app


def _fresh_process():
    """Forget every per-process memo, as a restarted server and sites would."""
    site_cache.clear()


def _run(cfg, app=client_app, resume=False):
    grid = InProcessGrid(app, cfg.partition.sites)
    return run_federation(grid, cfg, Path(cfg.run.out_dir),
                          resume=resume, expected_sites=cfg.partition.sites)


@pytest.mark.parametrize("fault", ["raise", "nan", "huge"])
def test_round_survives_one_bad_site(npz, tmp_path, fault):
    cfg = tiny_config(npz, tmp_path, "distill.alpha=1.0")
    _run(cfg, _faulty(2, fault))
    rows = history.read_rows(tmp_path / "run" / "history.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        trouble = r["failed"] if fault == "raise" else r["rejected"]
        assert len(trouble) == 1 and "site-1" in trouble[0]
        assert len(r["sites"]) == 3  # everyone still evaluated
    final = checkpoint.load_checkpoint(tmp_path / "run")["arrays"]
    assert all(np.isfinite(v).all() for v in final.values())


def test_too_few_sites_stops_with_a_clear_message(npz, tmp_path):
    cfg = tiny_config(npz, tmp_path, "distill.alpha=1.0", "federation.min_sites=3",
                      "federation.max_round_retries=1")
    with pytest.raises(FedKDError, match="fewer than federation.min_sites=3") as info:
        _run(cfg, _faulty(1, "raise"))
    assert "disk full" in str(info.value) and "\n" not in str(info.value).split(";")[0]


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum"])
def test_robust_strategies_run_through_the_loop(npz, tmp_path, strategy):
    cfg = tiny_config(npz, tmp_path, "distill.alpha=1.0", "federation.rounds=1",
                      f"federation.strategy={strategy}",
                      "federation.norm_outlier_factor=0", "federation.trim_beta=0.34")
    _run(cfg, _faulty(3, "huge"))
    final = checkpoint.load_checkpoint(tmp_path / "run")["arrays"]
    assert max(float(np.abs(v).max()) for v in final.values()
               if v.dtype.kind == "f") < 1e5  # the huge update did not win


def test_killed_server_resumes_to_the_identical_model(npz, tmp_path):
    base = ("federation.rounds=3", "teacher.head=local")
    full = tiny_config(npz, tmp_path / "a", *base)
    _run(full)
    expected = checkpoint.load_checkpoint(tmp_path / "a" / "run")["arrays"]

    cut = tiny_config(npz, tmp_path / "b", *base)
    calls = {"n": 0}

    def dies_in_round_3(msg, ctx):
        if msg.metadata.message_type == "train":
            calls["n"] += 1
            if calls["n"] > 2 * cut.partition.sites:  # the server dies mid round 3
                raise KeyboardInterrupt("server killed")
        return client_app(msg, ctx)

    with pytest.raises(KeyboardInterrupt):
        _run(cut, dies_in_round_3)
    assert checkpoint.load_checkpoint(tmp_path / "b" / "run")["round"] == 2
    _fresh_process()
    _run(cut, resume=True)
    got = checkpoint.load_checkpoint(tmp_path / "b" / "run")["arrays"]
    assert got.keys() == expected.keys()
    for k in expected:
        assert np.array_equal(got[k], expected[k]), k
    rows = history.read_rows(tmp_path / "b" / "run" / "history.jsonl")
    assert [r["round"] for r in rows] == [1, 2, 3]


def test_dp_clipping_bounds_every_site_update(npz, tmp_path):
    cfg = tiny_config(npz, tmp_path, "distill.alpha=1.0", "federation.rounds=1",
                      "privacy.dp=true", "teacher.head=local",
                      "privacy.clipping_norm=0.5",
                      "privacy.noise_multiplier=0.0",
                      "federation.norm_outlier_factor=0")
    sent, norms = {}, []

    def spy(msg, ctx):
        if msg.metadata.message_type == "train":
            sent.update({k: msg.content["arrays"][k].numpy().copy()
                         for k in msg.content["arrays"].keys()})
            reply = client_app(msg, ctx)
            arrs = reply.content["arrays"]
            norms.append(np.sqrt(sum(
                float(((arrs[k].numpy().astype(np.float64) - sent[k]) ** 2).sum())
                for k in arrs.keys())))
            return reply
        return client_app(msg, ctx)

    _run(cfg, spy)
    assert len(norms) == 3 and max(norms) <= 0.5 + 1e-4


def test_dp_with_a_federated_head_is_refused():
    from common.config import load_config
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="privacy.dp"):
        load_config(None, ["privacy.dp=true", "teacher.head=federated"])


def test_every_message_a_site_sends_carries_only_weights_and_scalars(npz, tmp_path):
    from common.serialization import (
        ALLOWED_PREFIXES,
        CALIBRATE,
        CALIBRATION_PREFIXES,
        OOD_THRESHOLD,
    )
    from tests.client.test_app import _walk_reply

    cfg = tiny_config(npz, tmp_path, "federation.rounds=1", "teacher.head=federated",
                      "distill.feature_weight=0.5")
    replies = []

    def spy(msg, ctx):
        reply = client_app(msg, ctx)
        replies.append((msg.metadata.message_type, reply))
        return reply

    _run(cfg, spy)
    kinds = {k for k, _ in replies}
    after_training = (CALIBRATE, OOD_THRESHOLD)  # summed statistics only
    assert kinds == {"query", "train", "evaluate", *after_training}
    prefixes = set()
    for kind, reply in replies:
        allowed = CALIBRATION_PREFIXES if kind in after_training else ALLOWED_PREFIXES
        seen = _walk_reply(reply, image_count=10**9, allowed=allowed)
        prefixes |= {k.split(".")[0] for k in seen["arrays"]}
    assert prefixes == {"student", "head", "proj", "calib", "ood"}


class _SilentGrid(InProcessGrid):
    """A Grid on which one node's replies never arrive (a link down, a hung site)."""

    def __init__(self, app, num_nodes, silent_node, phases):
        super().__init__(app, num_nodes)
        self.silent_node, self.phases = silent_node, phases

    def pull_messages(self, message_ids):
        self.serve_all()  # the others answer at once, however short the timeout
        replies = super().pull_messages(message_ids)
        return [
            r
            for r in replies
            if not (
                r.metadata.src_node_id == self.silent_node
                and r.metadata.message_type in self.phases
            )
        ]


def _run_on(grid, cfg, resume=False):
    return run_federation(grid, cfg, Path(cfg.run.out_dir), resume=resume,
                          expected_sites=cfg.partition.sites)


def test_silent_site_is_recorded_and_the_round_completes(npz, tmp_path):
    # the server waits federation.round_timeout for the silent site, then goes on
    cfg = tiny_config(npz, tmp_path, "distill.alpha=1.0",
                      "federation.round_timeout=0.5")
    _run_on(_SilentGrid(client_app, 3, 2, {"train", "evaluate"}), cfg)
    rows = history.read_rows(tmp_path / "run" / "history.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["failed"] == [
            "site-1: no reply within federation.round_timeout=0.5s",
            "site-1 (evaluate): no reply within federation.round_timeout=0.5s",
        ]
        assert sorted(r["sites"]) == ["site-0", "site-2"]


def test_silent_handshake_below_min_sites_stops(npz, tmp_path):
    cfg = tiny_config(npz, tmp_path, "distill.alpha=1.0", "federation.min_sites=3",
                      "federation.round_timeout=0.5")
    with pytest.raises(FedKDError, match="2 sites answered the handshake"):
        _run_on(_SilentGrid(client_app, 3, 1, {"query"}), cfg)


def test_missing_sites_time_out_the_handshake(npz, tmp_path):
    import time

    cfg = tiny_config(npz, tmp_path, "federation.round_timeout=0.5")
    grid = InProcessGrid(client_app, 2)  # the third SuperNode never connects
    t0 = time.monotonic()
    with pytest.raises(FedKDError, match="only 2 of 3 sites connected within 0.5s"):
        _run_on(grid, cfg)
    assert time.monotonic() - t0 < 5


def test_failed_attempt_is_retried_and_kept_in_history(npz, tmp_path):
    cfg = tiny_config(npz, tmp_path, "distill.alpha=1.0", "federation.min_sites=3",
                      "federation.max_round_retries=1")
    calls = {"n": 0}

    def fails_once(msg, ctx):
        if ctx.node_id == 1 and msg.metadata.message_type == "train":
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("scanner PC rebooted")
        return client_app(msg, ctx)

    _run(cfg, fails_once)
    rows = history.read_rows(tmp_path / "run" / "history.jsonl")
    assert [r["retries"] for r in rows] == [1, 0]
    assert rows[0]["failed"] == ["attempt 1: site-0: RuntimeError: scanner PC rebooted"]
    assert rows[1]["failed"] == []


def test_dp_round_survives_a_failing_site(npz, tmp_path):
    # Flower's DP wrapper alone skips a round on any error reply; ours screens first.
    cfg = tiny_config(npz, tmp_path, "distill.alpha=1.0", "privacy.dp=true",
                      "teacher.head=local", "privacy.clipping_norm=1.0",
                      "privacy.noise_multiplier=0.1")
    _run(cfg, _faulty(2, "raise"))
    rows = history.read_rows(tmp_path / "run" / "history.jsonl")
    assert [r["retries"] for r in rows] == [0, 0]
    assert all(len(r["failed"]) == 1 and "disk full" in r["failed"][0] for r in rows)
    import json

    from server.privacy import gaussian_epsilon

    # 2 rounds, one noisy aggregate each: epsilon is the library's for 2 releases
    priv = rows[-1]["privacy"]
    assert (priv["clipping_norm"], priv["noise_multiplier"], priv["releases"],
            priv["delta"], priv["denominator"]) == (1.0, 0.1, 2, 1e-5, 3)
    assert priv["epsilon"] == pytest.approx(gaussian_epsilon(0.1, 2, 1e-5))
    assert rows[0]["privacy"]["epsilon"] < priv["epsilon"]
    card = json.loads((tmp_path / "run" / "final" / "model_card.json").read_text())
    dp = card["method"]["dp"]
    assert (dp["enabled"], dp["clipping_norm"], dp["noise_multiplier"]) == (
        True, 1.0, 0.1)
    assert (dp["epsilon"], dp["delta"]) == (priv["epsilon"], 1e-5)
    md = (tmp_path / "run" / "final" / "model_card.md").read_text()
    assert f"epsilon = {priv['epsilon']:.3g}, delta = 1e-05" in md


def _dies_on_save_of(round_no):
    real = checkpoint.save_checkpoint

    def save(run_dir, server_round, *args, **kwargs):
        if server_round == round_no:  # history row written, checkpoint not
            raise KeyboardInterrupt("server killed while saving")
        return real(run_dir, server_round, *args, **kwargs)

    return save


def test_killed_while_saving_resumes_to_the_identical_model(npz, tmp_path,
                                                           monkeypatch):
    base = ("federation.rounds=3", "teacher.head=federated",
            "distill.feature_weight=0.5", "federation.strategy=fedprox")
    _run(tiny_config(npz, tmp_path / "a", *base))
    expected = checkpoint.load_checkpoint(tmp_path / "a" / "run")["arrays"]

    cut = tiny_config(npz, tmp_path / "b", *base)
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save_checkpoint", _dies_on_save_of(2))
        with pytest.raises(KeyboardInterrupt):
            _run(cut)
    run = tmp_path / "b" / "run"
    assert [r["round"] for r in history.read_rows(run / "history.jsonl")] == [1, 2]
    assert checkpoint.load_checkpoint(run)["round"] == 1
    _fresh_process()
    _run(cut, resume=True)
    got = checkpoint.load_checkpoint(run)["arrays"]
    assert got.keys() == expected.keys()
    for k in expected:
        assert np.array_equal(got[k], expected[k]), k
    assert [r["round"] for r in history.read_rows(run / "history.jsonl")] == [1, 2, 3]


def test_cli_resume_gives_the_uninterrupted_model(npz, tmp_path, monkeypatch, capsys):
    import logging

    from simulations.run import main
    from tests.simulations.test_run import _args

    # main() points the root logger at this test's captured stderr; put the
    # handlers back so later tests do not log into a closed stream.
    monkeypatch.setattr(logging.root, "handlers", list(logging.root.handlers))
    extra = ("run.engine=inprocess", "federation.rounds=3", "federation.min_sites=2")
    assert main(_args(npz, tmp_path / "a", *extra)) == 0
    expected = checkpoint.load_checkpoint(tmp_path / "a" / "run")["arrays"]

    _fresh_process()
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save_checkpoint", _dies_on_save_of(3))
        with pytest.raises(KeyboardInterrupt):
            main(_args(npz, tmp_path / "b", *extra))
    _fresh_process()
    run = tmp_path / "b" / "run"
    assert main(["--resume", str(run)]) == 0
    got = checkpoint.load_checkpoint(run)["arrays"]
    for k in expected:
        assert np.array_equal(got[k], expected[k]), k
    assert (run / "final" / "model.pt").is_file()


def test_killed_after_the_last_round_resumes_to_a_complete_card(npz, tmp_path,
                                                               monkeypatch):
    import json

    from server import federation

    cfg = tiny_config(npz, tmp_path, "distill.alpha=1.0")
    with monkeypatch.context() as m:
        m.setattr(federation, "finish", _raise_killed)
        with pytest.raises(KeyboardInterrupt):
            _run(cfg)
    _fresh_process()
    _run(cfg, resume=True)
    card = json.loads((tmp_path / "run" / "final" / "model_card.json").read_text())
    assert card["method"]["rounds"] == 2
    assert "site_mean_acc" in card["metrics"]


def _raise_killed(*args, **kwargs):
    raise KeyboardInterrupt("server killed before the final model was written")


class _ShrinkingGrid(InProcessGrid):
    """A Grid on which one SuperNode disconnects for good after the handshake."""

    def __init__(self, app, num_nodes, lost_node):
        super().__init__(app, num_nodes)
        self.lost_node, self.handshake_done = lost_node, False

    def get_node_ids(self):
        nodes = super().get_node_ids()
        return [n for n in nodes if not (self.handshake_done and n == self.lost_node)]

    def pull_messages(self, message_ids):
        # The in-process Grid serves sites one per pull; let every connected
        # site answer however short the test's timeout is.
        self.serve_all()
        self.handshake_done = True
        return super().pull_messages(message_ids)


@pytest.mark.parametrize("min_sites", [2, 3])
def test_a_lost_site_never_makes_sampling_wait_forever(npz, tmp_path, min_sites):
    import time

    # Flower's sample_nodes polls with no deadline until min_available_nodes are
    # connected; the loop bounds that wait by federation.round_timeout.
    cfg = tiny_config(npz, tmp_path, "distill.alpha=1.0",
                      f"federation.min_sites={min_sites}",
                      "federation.round_timeout=0.3", "federation.max_round_retries=1")
    grid = _ShrinkingGrid(client_app, 3, lost_node=2)
    t0 = time.monotonic()
    if min_sites == 2:  # enough sites remain: every round completes without it
        _run_on(grid, cfg)
        rows = history.read_rows(tmp_path / "run" / "history.jsonl")
        assert [sorted(r["sites"]) for r in rows] == [["site-0", "site-2"]] * 2
    else:  # too few remain: each attempt times out, then one clear error
        with pytest.raises(FedKDError, match="fewer than federation.min_sites=3") as e:
            _run_on(grid, cfg)
        assert "only 2 of the 3 sites needed were connected" in str(e.value)
        assert "\n" not in str(e.value)
    assert time.monotonic() - t0 < 30


def test_resuming_a_local_only_run_is_refused(npz, tmp_path):
    # Sites keep their own models in context.state, which a restart loses;
    # resuming would silently train from the checkpointed average instead.
    cfg = tiny_config(npz, tmp_path, "federation.strategy=local",
                      "federation.rounds=1")
    _run(cfg)
    _fresh_process()
    with pytest.raises(FedKDError, match="federation.strategy=local"):
        _run(cfg, resume=True)
