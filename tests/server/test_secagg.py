"""Secure aggregation (Flower's SecAgg+): masked for the server, FedAvg unmasked."""

from pathlib import Path

import numpy as np
import pytest
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
)

from common.config import load_config
from common.errors import ConfigError
from server import checkpoint, history


@pytest.fixture
def npz(pneumonia_npz, tmp_path_factory):
    from tests.helpers import small_npz

    return small_npz(pneumonia_npz, tmp_path_factory.mktemp("data") / "small.npz",
                     n_train=120, n_test=40)


def _cfg(npz, tmp, *extra):
    from tests.helpers import tiny_config

    return tiny_config(npz, tmp, "federation.rounds=1", "distill.alpha=1.0",
                       "train.lr=0.05", "federation.min_sites=2",
                       "calibration.temperature=false", "calibration.ood=none",
                       *extra)


def _run(cfg, app):
    from server.federation import run_federation
    from simulations.inprocess import InProcessGrid

    grid = InProcessGrid(app, cfg.partition.sites)
    run_federation(grid, cfg, Path(cfg.run.out_dir), expected_sites=cfg.partition.sites)
    return checkpoint.load_checkpoint(Path(cfg.run.out_dir))["arrays"]


class _Spy:
    """The real ClientApp, keeping what each site sent and the raw replies."""

    def __init__(self, drop_masked_stage_of: int | None = None):
        from client.app import app

        self.app, self.drop = app, drop_masked_stage_of
        self.masked: dict[int, list[np.ndarray]] = {}
        self.updates: dict[int, list[np.ndarray]] = {}

    def __call__(self, msg, ctx):
        node = msg.metadata.dst_node_id
        conf = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = conf.get(Key.STAGE) if conf is not None else None
        if stage == "collect_masked_vectors" and node == self.drop:
            raise RuntimeError("site lost after sharing its keys")
        reply = self.app(msg, ctx)
        out = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if out is not None and Key.MASKED_PARAMETERS in out:
            vectors = out[Key.MASKED_PARAMETERS]
            self.masked[node] = [bytes_to_ndarray(b) for b in vectors]
        return reply


def test_secure_round_equals_fedavg_within_quantisation_and_hides_each_update(
    npz, tmp_path
):
    from client.app import app

    plain = _run(_cfg(npz, tmp_path / "plain"), app)
    spy = _Spy()
    secure = _run(_cfg(npz, tmp_path / "secure", "privacy.secure_aggregation=true"),
                  spy)

    # the unmasked aggregate is FedAvg's example-weighted mean, up to the
    # quantisation step 2 C / Q per coordinate (C = 8, Q = 2^22: 3.8e-6)
    step = 2 * 8.0 / (1 << 22)
    for key, value in plain.items():
        if value.dtype.kind == "f":
            np.testing.assert_allclose(secure[key], value, atol=4 * step, err_msg=key)
    # what the server held for each site is masked: uncorrelated with the
    # site's quantised update (uniform noise over the modulus)
    assert len(spy.masked) == 3
    for vectors in spy.masked.values():
        flat = np.concatenate([v.ravel() for v in vectors]).astype(np.float64)
        assert flat.std() > 1e8  # uniform over [0, 2^32), not a small update
    a, b = (np.concatenate([v.ravel() for v in spy.masked[n]]).astype(np.float64)
            for n in sorted(spy.masked)[:2])
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.05
    rows = history.read_rows(tmp_path / "secure" / "run" / "history.jsonl")
    assert rows[0]["failed"] == [] and len(rows[0]["sites"]) == 3
    assert all("train/train_loss" in v for v in rows[0]["sites"].values())


def test_a_site_that_drops_out_after_sharing_keys_does_not_stop_the_round(
    npz, tmp_path
):
    spy = _Spy(drop_masked_stage_of=2)
    cfg = _cfg(npz, tmp_path, "privacy.secure_aggregation=true",
               "federation.max_round_retries=0")
    arrays = _run(cfg, spy)

    rows = history.read_rows(tmp_path / "run" / "history.jsonl")
    trained = [n for n, v in rows[0]["sites"].items() if "train/train_loss" in v]
    assert len(trained) == 2 and len(rows[0]["failed"]) == 1, rows[0]["failed"]
    assert "dropped out" in rows[0]["failed"][0]
    # the neighbours' shares rebuilt the lost site's masks: the result is
    # FedAvg of the two sites that stayed
    from client.app import app

    def lost(msg, ctx):
        if msg.metadata.message_type == "train" and msg.metadata.dst_node_id == 2:
            raise RuntimeError("site lost")
        return app(msg, ctx)

    plain = _run(_cfg(npz, tmp_path / "plain", "federation.max_round_retries=0"), lost)
    for key, value in plain.items():
        if value.dtype.kind == "f":
            np.testing.assert_allclose(arrays[key], value, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("extra,match", [
    (["federation.strategy=fedmedian"], "fedmedian"),
    (["privacy.dp=true", "teacher.head=local"], "privacy.dp"),
    (["teacher.head=federated", "distill.alpha=0.5"], "teacher.head=federated"),
])
def test_secure_aggregation_refuses_what_needs_one_sites_update(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["privacy.secure_aggregation=true", *extra])


def test_per_patient_dp_sgd_composes_with_secure_aggregation():
    cfg = load_config(None, ["privacy.secure_aggregation=true", "privacy.dp_sgd=true",
                             "distill.alpha=1.0"])
    assert cfg.privacy.secure_aggregation and cfg.privacy.dp_sgd


def test_the_card_says_what_the_server_saw(tmp_path):
    from server.model_card import _shared

    cfg = load_config(None, ["privacy.secure_aggregation=true", "distill.alpha=1"])
    shared = _shared(cfg, [])
    assert shared["secure_aggregation"] is True
    assert "masked by Flower's SecAgg+" in shared["per_round"]
