"""Federated-optimisation levers at the site: local steps and kept optimiser state."""

import pytest
import torch
from flwr.app import RecordDict

from client.site import load_carry, save_carry
from common.config import load_config
from common.errors import ConfigError
from common.models.student import create_student
from common.train import LocalData, OptimizerCarry, train_local


def _data(n: int = 20) -> LocalData:
    g = torch.Generator().manual_seed(0)
    return LocalData(
        x=torch.randn(1, n, 1, 8, 8, generator=g),
        y=torch.tensor([0, 1] * (n // 2)),
        labelled=torch.ones(n, dtype=torch.bool),
    )


def _cfg(*overrides: str):
    return load_config(
        None,
        ["train.batch_size=8", "train.augment=false", "distill.alpha=1.0",
         "train.grad_clip=0", *overrides],
    )


def test_local_steps_runs_exactly_that_many_steps_across_epochs():
    # 20 items at batch 8: batches of 8, 8, 4 per epoch; 7 steps span 3 epochs
    cfg = _cfg("train.local_steps=7")
    m = create_student("fedkd_cnn_tiny", 2, 1)
    r = train_local(m, _data(), cfg.train, cfg.distill, seed=0)
    assert r["train_steps"] == 7
    assert r["train_samples"] == 8 + 8 + 4 + 8 + 8 + 4 + 8
    by_epochs = train_local(m, _data(), _cfg("train.local_epochs=2").train,
                            cfg.distill, seed=0)
    assert by_epochs["train_steps"] == 6 and by_epochs["train_samples"] == 40


def test_local_steps_skip_single_item_batches_without_counting_them():
    # 17 items at batch 8: 8, 8, 1 -> the lone item is skipped every epoch
    cfg = _cfg("train.local_steps=3")
    m = create_student("fedkd_cnn_tiny", 2, 1)
    data = _data(18)
    data = LocalData(data.x[:, :17], data.y[:17], data.labelled[:17])
    r = train_local(m, data, cfg.train, cfg.distill, seed=0)
    assert r["train_steps"] == 3 and r["train_samples"] == 24


def _sgd_by_hand(w0, grads, lr, mom, wd):
    """torch SGD (dampening 0): b = mom*b + (g + wd*w); w -= lr*b."""
    w, b = w0.clone(), None
    for g in grads:
        d = g + wd * w
        b = d if b is None else mom * b + d
        w = w - lr * b
    return w


def test_kept_momentum_matches_one_uninterrupted_sgd_run():
    """Two rounds with the carried buffer equal torch SGD over both rounds' grads."""
    cfg = _cfg("train.local_steps=1", "train.momentum=0.9", "train.weight_decay=0")
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -1.0]]))
    carry = OptimizerCarry()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    for g in (torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]])):
        from common.train import _restore
        opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
        _restore(opt, carry)
        lin.weight.grad = g.clone()
        opt.step()
        carry.state = opt.state_dict()["state"]
    expect = _sgd_by_hand(torch.tensor([[1.0, -1.0]]),
                          [torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]])],
                          0.1, 0.9, 0.0)
    torch.testing.assert_close(lin.weight.detach(), expect)
    # reset (no carry) would have taken the plain step in round 2: not the same
    reset = torch.tensor([[1.0, -1.0]]) - 0.1 * torch.tensor([[1.0, 2.0]])
    reset = reset - 0.1 * torch.tensor([[0.5, -1.0]])
    assert not torch.allclose(expect, reset)
    assert cfg.train.optimizer_state == "reset"  # the default


def test_site_keeps_the_buffer_in_its_state_only_when_asked(tmp_path):
    keep = _cfg("train.optimizer_state=keep", "train.local_steps=2",
                f"data.cache_dir={tmp_path}")
    m = create_student("fedkd_cnn_tiny", 2, 1)
    state = RecordDict()
    carry = load_carry(keep, state, 1, "site-0")
    assert carry is not None and carry.state is None  # round 1: nothing yet
    train_local(m, _data(), keep.train, keep.distill, seed=0, carry=carry)
    save_carry(keep, state, carry, 1, "site-0")
    back = load_carry(keep, state, 2, "site-0")
    assert set(back.state) == set(carry.state)
    for i, st in carry.state.items():
        torch.testing.assert_close(back.state[i]["momentum_buffer"],
                                   st["momentum_buffer"], rtol=0, atol=0)
    # round 2 starts from the carried buffer: differs from a fresh optimiser
    m2 = create_student("fedkd_cnn_tiny", 2, 1)
    m2.load_state_dict(m.state_dict())
    m3 = create_student("fedkd_cnn_tiny", 2, 1)
    m3.load_state_dict(m.state_dict())
    train_local(m2, _data(), keep.train, keep.distill, seed=1, carry=back)
    train_local(m3, _data(), keep.train, keep.distill, seed=1)
    assert not torch.equal(m2.fc.weight, m3.fc.weight)
    assert load_carry(_cfg(), state, 2, "site-0") is None  # reset ignores it
    # a restarted site (empty context.state) continues from its file on disk
    again = load_carry(keep, RecordDict(), 2, "site-0")
    for i, st in carry.state.items():
        torch.testing.assert_close(again.state[i]["momentum_buffer"],
                                   st["momentum_buffer"], rtol=0, atol=0)
    # a state saved after a later round is not used for an earlier one
    save_carry(keep, state, carry, 2, "site-0")
    assert load_carry(keep, RecordDict(), 2, "site-0").state is not None  # round 1
    assert load_carry(keep, state, 5, "site-0").state is None


def test_bad_lever_values_name_the_key():
    with pytest.raises(ConfigError, match="train.optimizer_state.*reset, keep"):
        _cfg("train.optimizer_state=forever")
    with pytest.raises(ConfigError, match="train.local_steps"):
        _cfg("train.local_steps=-1")
    # pooled runs one node: a round needs one reply whatever min_sites says
    pooled = load_config(None, ["federation.strategy=pooled", "federation.min_sites=2"])
    assert pooled.federation.required_sites == 1
    assert load_config(None, []).federation.required_sites == 2
