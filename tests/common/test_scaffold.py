"""SCAFFOLD at the site: the corrected steps and c_i+ against a hand computation."""

import numpy as np
import pytest
import torch
from torch import nn

from common.config import load_config
from common.models.student import create_student
from common.train import ControlVariates, LocalData, train_local

X = np.array([[1.0, 2.0], [-1.0, 0.5]])  # two items, two features
Y = np.array([0, 1])
W0 = np.array([[0.2, -0.1], [0.0, 0.3]])  # (classes, features)
C = np.array([[0.1, -0.2], [0.3, 0.05]])  # the server's c
C_I = np.array([[-0.1, 0.0], [0.2, 0.1]])  # the site's c_i
LR = 0.1


def _cfg(*extra: str):
    # plain SGD: one full batch of both items per step, two steps, no clipping
    return load_config(
        None,
        ["train.batch_size=2", "train.local_steps=2", "train.momentum=0",
         "train.weight_decay=0", "train.grad_clip=0", "train.augment=false",
         "distill.alpha=1.0", *extra],
    )


def _linear(w: np.ndarray) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor(w, dtype=torch.float32))
    return model


def _data() -> LocalData:
    return LocalData(
        x=torch.tensor(X, dtype=torch.float32).reshape(1, 2, 1, 1, 2),
        y=torch.tensor(Y),
        labelled=torch.ones(2, dtype=torch.bool),
    )


def _ce_grad(w: np.ndarray) -> np.ndarray:
    """d/dW of the mean CE of softmax(X W^T), by hand: (P - onehot)^T X / n."""
    logits = X @ w.T
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return (p - np.eye(2)[Y]).T @ X / len(X)


def _control(c=C, c_i=C_I) -> ControlVariates:
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return ControlVariates(server={"1.weight": t(c)}, site={"1.weight": t(c_i)})


def test_two_corrected_sgd_steps_and_c_i_plus_match_a_hand_computation():
    cfg = _cfg()
    model = _linear(W0)
    control = _control()

    out = train_local(model, _data(), cfg.train, cfg.distill, seed=0, lr=LR,
                      control=control)

    # by hand: y_{k+1} = y_k - lr (g(y_k) + c - c_i); c_i+ = mean of g(y_k)
    g0 = _ce_grad(W0)
    w1 = W0 - LR * (g0 + C - C_I)
    g1 = _ce_grad(w1)
    w2 = w1 - LR * (g1 + C - C_I)
    c_plus = (g0 + g1) / 2
    assert out["train_steps"] == 2
    np.testing.assert_allclose(model[1].weight.detach().numpy(), w2, atol=1e-6)
    np.testing.assert_allclose(control.site["1.weight"].numpy(), c_plus, atol=1e-6)
    np.testing.assert_allclose(control.delta["1.weight"].numpy(), c_plus - C_I,
                               atol=1e-6)
    # and that is the paper's option II: c_i - c + (x - y_i) / (K lr)
    option2 = C_I - C + (W0 - w2) / (2 * LR)
    np.testing.assert_allclose(control.site["1.weight"].numpy(), option2, atol=1e-5)
    assert out["scaffold_shift_norm"] == pytest.approx(np.linalg.norm(C - C_I),
                                                       rel=1e-6)


def test_c_i_plus_is_option_two_under_plain_sgd_with_weight_decay_and_clipping():
    cfg = _cfg("train.weight_decay=0.05", "train.grad_clip=0.3")
    model = _linear(W0)
    control = _control()

    train_local(model, _data(), cfg.train, cfg.distill, seed=0, lr=LR,
                control=control)

    option2 = C_I - C + (W0 - model[1].weight.detach().numpy()) / (2 * LR)
    np.testing.assert_allclose(control.site["1.weight"].numpy(), option2, atol=1e-5)


def test_with_momentum_c_i_plus_stays_the_mean_gradient_not_the_optimiser_step():
    """Option II's (x - y_i) / (K lr) would also count momentum's extra distance."""
    cfg = _cfg("train.momentum=0.9")
    model = _linear(W0)
    control = _control(c=np.zeros((2, 2)), c_i=np.zeros((2, 2)))

    train_local(model, _data(), cfg.train, cfg.distill, seed=0, lr=LR,
                control=control)

    g0 = _ce_grad(W0)
    g1 = _ce_grad(W0 - LR * g0)  # the first step from an empty buffer is lr g0
    np.testing.assert_allclose(control.site["1.weight"].numpy(), (g0 + g1) / 2,
                               atol=1e-6)
    # the model moved by the buffers g0 and 0.9 g0 + g1: more than the gradients
    moved = (W0 - model[1].weight.detach().numpy()) / (2 * LR)
    np.testing.assert_allclose(moved, (g0 + 0.9 * g0 + g1) / 2, atol=1e-6)


def test_zero_control_variates_train_exactly_as_fedavg():
    cfg = load_config(None, ["train.batch_size=8", "train.augment=false",
                             "distill.alpha=1.0", "train.local_steps=3"])
    g = torch.Generator().manual_seed(0)
    data = LocalData(x=torch.randn(1, 20, 1, 8, 8, generator=g),
                     y=torch.tensor([0, 1] * 10),
                     labelled=torch.ones(20, dtype=torch.bool))

    def run(control):
        torch.manual_seed(0)
        m = create_student("fedkd_cnn_tiny", 2, 1)
        train_local(m, data, cfg.train, cfg.distill, seed=4, control=control)
        return m

    plain = run(None)
    control = ControlVariates()  # round 1: no c, no c_i -> zeros
    scaffold = run(control)
    for a, b in zip(plain.state_dict().values(), scaffold.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    # c_i+ covers every trainable parameter, and Delta c_i = c_i+ from zeros
    names = {n for n, _ in plain.named_parameters()}
    assert set(control.site) == set(control.delta) == names
    for n in names:
        assert torch.equal(control.site[n], control.delta[n])


def test_control_variates_for_a_parameter_the_student_lacks_are_refused():
    cfg = _cfg()
    control = ControlVariates(server={"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"\['fc.weight'\], which the student lacks"):
        train_local(_linear(W0), _data(), cfg.train, cfg.distill, seed=0,
                    control=control)
