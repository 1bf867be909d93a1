"""The local training loop: unlabelled items get KD only; determinism; features."""

import pytest
import torch

from common.config import load_config
from common.models.student import create_student
from common.train import LocalData, evaluate, train_local


def _data(labels: torch.Tensor, labelled: torch.Tensor, views: int = 1) -> LocalData:
    g = torch.Generator().manual_seed(0)
    n = len(labels)
    return LocalData(
        x=torch.randn(views, n, 1, 16, 16, generator=g),
        y=labels,
        labelled=labelled,
        teacher_logits=torch.randn(views, n, 2, generator=g),
        teacher_feats=torch.randn(views, n, 8, generator=g),
    )


def _train(data: LocalData, *overrides: str, proj=None):
    cfg = load_config(None, ["train.batch_size=8", "train.augment=false", *overrides])
    torch.manual_seed(0)
    model = create_student("fedkd_cnn_tiny", 2, 1)
    metrics = train_local(model, data, cfg.train, cfg.distill, seed=1, proj=proj)
    return model, metrics


def test_unlabelled_items_contribute_no_cross_entropy():
    labels = torch.tensor([0, 1] * 8)
    labelled = torch.tensor([True] * 4 + [False] * 12)
    scrambled = labels.clone()
    scrambled[~labelled] = 1 - scrambled[~labelled]
    m1, r1 = _train(_data(labels, labelled))
    m2, r2 = _train(_data(scrambled, labelled))
    assert r1["num-examples"] == 16  # unlabelled images are used (for KD)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # Relabelling a labelled item does change training: the CE term is live.
    flipped = labels.clone()
    flipped[0] = 1
    m3, _ = _train(_data(flipped, labelled))
    assert not all(
        torch.equal(a, b)
        for a, b in zip(m1.state_dict().values(), m3.state_dict().values(), strict=True)
    )


def test_without_a_teacher_only_labelled_items_train():
    labels = torch.tensor([0, 1] * 8)
    labelled = torch.tensor([True] * 6 + [False] * 10)
    _, r = _train(_data(labels, labelled), "distill.alpha=1.0")
    assert r["num-examples"] == 6
    assert r["train_kd"] == 0.0


def test_same_seed_same_weights_and_feature_term_trains_projection():
    labels = torch.tensor([0, 1] * 8)
    labelled = torch.ones(16, dtype=torch.bool)
    proj = torch.nn.Linear(create_student("fedkd_cnn_tiny", 2, 1).num_features, 8)
    before = proj.weight.detach().clone()
    m1, r1 = _train(
        _data(labels, labelled, views=2), "distill.feature_weight=1.0", proj=proj
    )
    assert r1["train_feat"] > 0
    assert not torch.equal(before, proj.weight)
    m2, _ = _train(_data(labels, labelled, views=2))
    m3, _ = _train(_data(labels, labelled, views=2))
    for a, b in zip(m2.state_dict().values(), m3.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    ev = evaluate(m2, torch.randn(10, 1, 16, 16), torch.tensor([0, 1] * 5))
    assert 0 <= ev["acc"] <= 1 and ev["num-examples"] == 10


def test_proximal_term_matches_hand_computed_value():
    from common.train import proximal_term

    student = torch.nn.Linear(2, 1)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[1.0, 2.0]]))
        student.bias.copy_(torch.tensor([0.5]))
    global_params = [torch.tensor([[0.0, 1.0]]), torch.tensor([1.5])]
    # ||w - w_g||^2 = 1^2 + 1^2 + (-1)^2 = 3; (mu / 2) * 3 with mu = 0.2
    term = proximal_term(student, global_params, 0.2)
    assert term.item() == pytest.approx(0.3)
    term.backward()  # gradient mu * (w - w_g)
    torch.testing.assert_close(student.weight.grad, torch.tensor([[0.2, 0.2]]))
    torch.testing.assert_close(student.bias.grad, torch.tensor([-0.2]))


def test_train_local_adds_the_proximal_term(monkeypatch):
    import common.train as train

    calls = []
    real = train.proximal_term

    def spy(student, global_params, mu):
        calls.append(mu)
        return real(student, global_params, mu)

    monkeypatch.setattr(train, "proximal_term", spy)
    data = _data(torch.tensor([0, 1] * 4), torch.ones(8, dtype=torch.bool))
    cfg = load_config(None, ["train.batch_size=4", "train.augment=false"])
    torch.manual_seed(0)
    student = create_student("fedkd_cnn_tiny", 2, 1)
    train.train_local(student, data, cfg.train, cfg.distill, seed=0, proximal_mu=0.5)
    assert calls and set(calls) == {0.5}
