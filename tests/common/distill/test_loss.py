"""KD and feature losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common.distill.loss import feature_loss, kd_loss


def _softmax2(a: float, b: float) -> tuple[float, float]:
    ea, eb = math.exp(a), math.exp(b)
    return ea / (ea + eb), eb / (ea + eb)


def _kl2(p: tuple[float, float], q: tuple[float, float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def test_two_class_example_by_hand():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    y = torch.tensor([0])
    temp, alpha = 2.0, 0.3
    ce = -math.log(_softmax2(1.0, 0.0)[0])  # = log(1 + e^-1)
    kl = _kl2(_softmax2(0.0, 0.5), _softmax2(0.5, 0.0))

    out = kd_loss(s, t, y, alpha=alpha, temperature=temp)

    assert out["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert out["kd"].item() == pytest.approx(temp**2 * kl, rel=1e-6)
    assert out["loss"].item() == pytest.approx(
        alpha * ce + (1 - alpha) * temp**2 * kl, rel=1e-6
    )


def test_labelled_and_unlabelled_items_average_over_the_batch():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 0])
    labelled = torch.tensor([True, False])
    temp, alpha, w_u = 1.0, 0.5, 0.25
    ce0 = -math.log(_softmax2(1.0, 0.0)[0])
    kl0 = _kl2(_softmax2(0.0, 1.0), _softmax2(1.0, 0.0))
    kl1 = _kl2(_softmax2(1.0, 1.0), _softmax2(0.0, 2.0))

    out = kd_loss(
        s, t, y, alpha=alpha, temperature=temp, labelled=labelled, unlabelled_weight=w_u
    )

    expected = (alpha * ce0 + (1 - alpha) * kl0 + w_u * kl1) / 2
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert out["ce"].item() == pytest.approx(ce0 / 2, rel=1e-6)
    assert out["kd"].item() == pytest.approx((kl0 + kl1) / 2, rel=1e-6)


def test_alpha_one_is_plain_cross_entropy():
    torch.manual_seed(0)
    s, t = torch.randn(8, 3), torch.randn(8, 3)
    y = torch.randint(0, 3, (8,))

    with_teacher = kd_loss(s, t, y, alpha=1.0, temperature=4.0)
    without = kd_loss(s, None, y, alpha=1.0, temperature=4.0)

    torch.testing.assert_close(with_teacher["loss"], F.cross_entropy(s, y))
    torch.testing.assert_close(without["loss"], F.cross_entropy(s, y))
    with pytest.raises(ValueError, match="teacher_logits=None"):
        kd_loss(s, None, y, alpha=0.5, temperature=4.0)


def test_unlabelled_labels_are_ignored():
    torch.manual_seed(1)
    s, t = torch.randn(6, 3), torch.randn(6, 3)
    labelled = torch.tensor([True, True, False, False, True, False])
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    y_changed = torch.where(labelled, y, torch.tensor([1, 1, -1, 2, 1, 1]))

    a = kd_loss(s, t, y, alpha=0.5, temperature=2.0, labelled=labelled)
    b = kd_loss(s, t, y_changed, alpha=0.5, temperature=2.0, labelled=labelled)

    for key in ("loss", "ce", "kd"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_gradient_flows_to_student_only():
    s = torch.randn(4, 2, requires_grad=True)
    t = torch.randn(4, 2, requires_grad=True)

    kd_loss(s, t, torch.tensor([0, 1, 0, 1]), alpha=0.5, temperature=3.0)[
        "loss"
    ].backward()

    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_feature_loss_is_zero_on_match_and_positive_otherwise(kind):
    torch.manual_seed(2)
    f = torch.randn(5, 8)

    assert feature_loss(f, f.clone(), kind=kind).item() == pytest.approx(0.0, abs=1e-6)
    assert feature_loss(f, -f, kind=kind).item() > 0.1


def test_feature_loss_values():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[0.0, 1.0], [2.0, 2.0]])

    cos = feature_loss(s, t, kind="cosine").item()
    mse = feature_loss(s, t, kind="mse").item()

    assert cos == pytest.approx((1.0 + 0.0) / 2, abs=1e-6)  # 90 degrees, then 0
    assert mse == pytest.approx((1 + 1 + 1 + 1) / 4, abs=1e-6)
    with pytest.raises(ValueError, match="feature shapes differ"):
        feature_loss(s, torch.zeros(2, 3))


def test_kd_where_agree_drops_soft_targets_that_contradict_the_label():
    # item 0: teacher says class 1, label 0 (disagree: KD dropped);
    # item 1: teacher says class 0, label 0 (agree: KD kept);
    # item 2: unlabelled, teacher says class 1 (kept: no label to check)
    s = torch.tensor([[1.0, 0.0], [0.5, 0.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 2.0], [3.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0, 0])
    labelled = torch.tensor([True, True, False])
    temp, alpha = 1.0, 0.5
    ce0 = -math.log(_softmax2(1.0, 0.0)[0])
    ce1 = -math.log(_softmax2(0.5, 0.0)[0])
    kl1 = _kl2(_softmax2(3.0, 0.0), _softmax2(0.5, 0.0))
    kl2 = _kl2(_softmax2(0.0, 1.0), _softmax2(0.0, 0.0))

    out = kd_loss(s, t, y, alpha=alpha, temperature=temp, labelled=labelled,
                  kd_where="agree")

    expected = (alpha * (ce0 + ce1) + (1 - alpha) * kl1 + kl2) / 3
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    every = kd_loss(s, t, y, alpha=alpha, temperature=temp, labelled=labelled)
    assert every["loss"].item() > out["loss"].item()
    with pytest.raises(ValueError, match="kd_where"):
        kd_loss(s, t, y, alpha=alpha, temperature=temp, kd_where="some")
