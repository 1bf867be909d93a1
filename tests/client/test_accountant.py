"""A site's DP-SGD ledger survives rounds and restarts; a new run starts anew."""

import pytest
import torch
from flwr.app import RecordDict
from opacus.accountants import RDPAccountant
from torch import nn

from client.site.accountant import ledger_path, load_ledger, save_ledger
from common.config import load_config
from common.dp_sgd import DPSGD
from common.errors import CheckpointError
from common.train import LocalData, train_local


def _cfg(tmp_path):
    return load_config(
        None,
        [
            "privacy.dp_sgd=true",
            "distill.alpha=1.0",
            "train.augment=false",
            "train.batch_size=4",
            "train.local_steps=3",
            f"data.cache_dir={tmp_path}",
        ],
    )


def _round(cfg, state: RecordDict, rnd: int) -> dict[str, float]:
    """One DP-SGD round at site-0 as client.site.round.train_round runs it."""
    g = torch.Generator().manual_seed(0)
    data = LocalData(
        x=torch.randn(1, 16, 1, 8, 8, generator=g),
        y=torch.arange(16) % 2,
        labelled=torch.ones(16, dtype=torch.bool),
    )
    ledger = load_ledger(cfg, state, rnd, "site-0")
    dp = DPSGD.from_config(cfg.privacy)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))  # a tiny stand-in
    metrics = train_local(
        student, data, cfg.train, cfg.distill, seed=rnd, dp_sgd=dp, ledger=ledger
    )
    save_ledger(cfg, state, ledger, "site-0")
    return metrics


def _opacus(steps: int) -> float:
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=1.0, sample_rate=0.25)  # batch 4 of 16
    return acc.get_epsilon(delta=1e-5)


def test_epsilon_grows_over_rounds_and_counts_every_step(tmp_path):
    cfg, state = _cfg(tmp_path), RecordDict()

    first = _round(cfg, state, 1)
    second = _round(cfg, state, 2)

    assert first["dp_sgd_steps"] == 3 and second["dp_sgd_steps"] == 6
    assert second["dp_sgd_epsilon"] > first["dp_sgd_epsilon"]
    assert first["dp_sgd_epsilon"] == pytest.approx(_opacus(3), rel=1e-12)
    assert second["dp_sgd_epsilon"] == pytest.approx(_opacus(6), rel=1e-12)


def test_a_restarted_site_continues_from_disk_and_a_new_run_starts_anew(tmp_path):
    cfg = _cfg(tmp_path)
    _round(cfg, RecordDict(), 1)
    _round(cfg, RecordDict(), 2)  # a new process: context.state is empty
    assert ledger_path(cfg, "site-0").is_file()

    third = _round(cfg, RecordDict(), 3)
    assert third["dp_sgd_steps"] == 9  # rounds 1 to 3, read back from disk

    # the same config started again from round 1 is a new run
    assert _round(cfg, RecordDict(), 1)["dp_sgd_steps"] == 3


def test_a_retried_round_counts_twice(tmp_path):
    cfg, state = _cfg(tmp_path), RecordDict()
    _round(cfg, state, 1)
    _round(cfg, state, 2)
    # the server retried (or resumed and re-ran) round 2: both updates were sent
    assert _round(cfg, state, 2)["dp_sgd_steps"] == 9


def test_an_unreadable_ledger_stops_the_site(tmp_path):
    cfg = _cfg(tmp_path)
    _round(cfg, RecordDict(), 1)
    ledger_path(cfg, "site-0").write_text("{not json")
    with pytest.raises(CheckpointError, match="dp-sgd-ledger"):
        load_ledger(cfg, RecordDict(), 2, "site-0")


def test_no_ledger_without_dp_sgd(tmp_path):
    cfg = load_config(None, [f"data.cache_dir={tmp_path}"])
    assert load_ledger(cfg, RecordDict(), 1, "site-0") is None
