"""The federated-gap levers: logit adjustment, the KD gate, the LR schedule."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.config import load_config
from common.distill.gate import gate_weight
from common.distill.loss import kd_loss
from common.models.student import create_student
from common.train import LocalData, log_prior, round_lr, train_local


def test_logit_adjustment_matches_hand_computed_ce_on_a_known_prior():
    # prior from counts (29, 9) with +1 smoothing: (30/40, 10/40)
    prior = log_prior(torch.tensor([29, 9]))
    assert torch.allclose(prior, torch.log(torch.tensor([0.75, 0.25])))
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([1, 0])
    out = kd_loss(logits, None, labels, alpha=1.0, temperature=1.0,
                  ce_offset=1.0 * prior)
    # by hand: adjusted logits [2+ln.75, ln.25] and [ln.75, 1+ln.25]
    a = [2 + math.log(0.75), math.log(0.25)]
    b = [math.log(0.75), 1 + math.log(0.25)]
    ce1 = -(a[1] - math.log(math.exp(a[0]) + math.exp(a[1])))
    ce2 = -(b[0] - math.log(math.exp(b[0]) + math.exp(b[1])))
    assert out["loss"].item() == pytest.approx((ce1 + ce2) / 2, rel=1e-6)
    # the rare class's item costs more (its raw logit is pushed up harder), the
    # common class's item less: the site's prior no longer biases the raw logits
    plain = F.cross_entropy(logits, labels, reduction="none")
    assert ce1 > plain[0].item() and ce2 < plain[1].item()


def test_logit_adjustment_leaves_the_kd_term_on_raw_logits():
    logits = torch.randn(6, 3)
    teacher = torch.randn(6, 3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    off = torch.tensor([0.5, -1.0, 0.2])
    with_off = kd_loss(logits, teacher, labels, alpha=0.5, temperature=2.0,
                       ce_offset=off)
    without = kd_loss(logits, teacher, labels, alpha=0.5, temperature=2.0)
    assert with_off["kd"].item() == pytest.approx(without["kd"].item())
    assert with_off["ce"].item() != pytest.approx(without["ce"].item())


@pytest.mark.parametrize(
    ("teacher", "student", "expected"),
    [(0.9, 0.8, 1.0), (0.8, 0.8, 1.0), (0.775, 0.8, 0.5), (0.75, 0.8, 0.0),
     (0.5, 0.95, 0.0)],
)
def test_gate_weight_falls_to_its_floor_for_a_worse_teacher(teacher, student,
                                                            expected):
    assert gate_weight(teacher, student, floor=0.0, margin=0.05) == pytest.approx(
        expected)
    # with a floor, a hopeless teacher keeps exactly the floor
    assert gate_weight(0.1, 0.9, floor=0.2, margin=0.05) == pytest.approx(0.2)
    assert gate_weight(float("nan"), 0.9, floor=0.0, margin=0.05) == 1.0


def test_kd_weight_zero_is_plain_supervised_training():
    g = torch.Generator().manual_seed(0)
    n = 16
    data = LocalData(
        x=torch.randn(1, n, 1, 16, 16, generator=g),
        y=torch.tensor([0, 1] * 8),
        labelled=torch.ones(n, dtype=torch.bool),
        teacher_logits=torch.randn(1, n, 2, generator=g),
    )
    cfg = load_config(None, ["train.batch_size=8", "train.augment=false"])
    sup = load_config(None, ["train.batch_size=8", "train.augment=false",
                             "distill.alpha=1.0"])

    def run(c, w):
        torch.manual_seed(0)
        m = create_student("fedkd_cnn_tiny", 2, 1)
        r = train_local(m, data, c.train, c.distill, seed=3, kd_weight=w)
        return m, r

    gated, r0 = run(cfg, 0.0)
    plain, _ = run(sup, 1.0)
    for a, b in zip(gated.state_dict().values(), plain.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    assert r0["train_kd"] == 0.0
    followed, _ = run(cfg, 1.0)
    assert not torch.equal(followed.fc.weight, plain.fc.weight)


def test_cosine_schedule_by_round():
    cfg = load_config(None, ["train.lr=0.1", "train.lr_final_factor=0.01"]).train
    assert round_lr(cfg, 1, 30) == pytest.approx(0.1)
    assert round_lr(cfg, 30, 30) == pytest.approx(0.001)
    mid = 0.001 + 0.5 * (0.1 - 0.001) * (1 + math.cos(math.pi * 14 / 29))
    assert round_lr(cfg, 15, 30) == pytest.approx(mid)
    rates = [round_lr(cfg, r, 30) for r in range(1, 31)]
    assert rates == sorted(rates, reverse=True)
    const = load_config(None, ["train.lr=0.1", "train.lr_schedule=constant"]).train
    assert round_lr(const, 17, 30) == 0.1


def test_gate_counts_sum_over_sites_to_the_pooled_balanced_accuracy():
    from common.distill.gate import (
        balanced_from_counts,
        covers_every_class,
        per_class_correct,
    )

    # site A holds only class 0 (3 items, 3 right); site B: class 0 x1 (right),
    # class 1 x4 (1 right). Pooled: class 0 4/4, class 1 1/4 -> bACC 0.625.
    a_y, a_p = np.array([0, 0, 0]), np.array([[0.9, 0.1]] * 3)
    b_y = np.array([0, 1, 1, 1, 1])
    b_p = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.6, 0.4], [0.6, 0.4]])
    ca, na = per_class_correct(a_y, a_p, 2)
    cb, nb = per_class_correct(b_y, b_p, 2)
    assert ca.tolist() == [3, 0] and na.tolist() == [3, 0]
    assert balanced_from_counts(ca, na) != balanced_from_counts(ca, na)  # nan
    assert balanced_from_counts(ca + cb, na + nb) == pytest.approx(0.625)
    # the one-class site cannot judge alone; the two-class one can at min 1
    assert not covers_every_class(a_y, 2, 1)
    assert covers_every_class(b_y, 2, 1) and not covers_every_class(b_y, 2, 2)


def test_federation_gate_weight_sums_every_sites_counts():
    from common.distill.gate import federation_weight, gate_counts

    # the seed-3 situation: site A's test part holds class 0 only, where the
    # teacher is right; site B shows the teacher wrong on class 1
    y_a = np.zeros(6, dtype=int)
    y_b = np.array([0, 0, 1, 1, 1, 1])
    teacher = lambda y: np.eye(2)[np.zeros_like(y)]  # noqa: E731 - always class 0
    student = lambda y: np.eye(2)[y]  # noqa: E731 - always right
    rows = [gate_counts(y, teacher(y), student(y), 2) for y in (y_a, y_b)]
    # pooled: teacher bACC (1 + 0) / 2 = 0.5, student 1.0 -> floor
    assert federation_weight(rows, floor=0.0, margin=0.05) == 0.0
    # site A alone would have passed the teacher (its only class is right)
    assert gate_weight(1.0, 1.0, floor=0.0, margin=0.05) == 1.0
    assert federation_weight([rows[0]], floor=0.0, margin=0.05) is None
    assert federation_weight([{"train_loss": 1.0}], floor=0.0, margin=0.05) is None
