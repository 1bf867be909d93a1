"""The site's KD gate: a test part that lacks a class follows the federation."""

from types import SimpleNamespace

import torch
from torch import nn

from client.site.round import kd_gate
from common.config import load_config


class _Const(nn.Module):
    """A student that always predicts class `c`."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c = c

    def forward(self, x):
        out = torch.full((len(x), 2), -5.0)
        out[:, self.c] = 5.0
        return out


class _Oracle(nn.Module):
    """A student that reads the label off its input (always right)."""

    def forward(self, x):
        y = x[:, 0, 0, 0].long()
        return torch.nn.functional.one_hot(y, 2).float() * 10 - 5


def _site(labels):
    n = len(labels)
    return SimpleNamespace(
        feats_test=torch.ones(n, 3),
        test_y=torch.tensor(labels),
        test_x=torch.tensor(labels, dtype=torch.float32).reshape(n, 1, 1, 1)
        .expand(n, 1, 4, 4).clone(),
    )


def _head_for(c: int) -> nn.Linear:
    head = nn.Linear(3, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([5.0, -5.0] if c == 0 else [-5.0, 5.0]))
    return head


def test_one_class_test_part_takes_the_federation_weight_not_its_own():
    cfg = load_config(None, ["distill.gate_min_per_class=2"])
    # teacher always says class 0; this site's test part holds only class 0,
    # so on its own it would judge the teacher perfect
    site = _site([0] * 6)
    w, m = kd_gate(cfg, site, _Const(0), _head_for(0), federation_weight=0.0)
    assert w == 0.0 and m["gate_local"] == 0.0 and m["kd_weight"] == 0.0
    # before the server has a verdict the method's weight stands
    w, m = kd_gate(cfg, site, _Const(0), _head_for(0), federation_weight=None)
    assert w == 1.0 and m["gate_local"] == 0.0
    # its per-class counts go to the server (class counts shared by default)
    assert m["gate_count_0"] == 6 and m["gate_count_1"] == 0
    assert m["gate_teacher_correct_0"] == 6


def test_a_site_that_holds_every_class_judges_alone():
    cfg = load_config(None, ["distill.gate_min_per_class=2"])
    site = _site([0, 0, 0, 1, 1, 1])
    # teacher wrong on class 1 (bACC .5), student right on both (1.0): floor
    w, m = kd_gate(cfg, site, _Oracle(), _head_for(0), federation_weight=1.0)
    assert m["gate_local"] == 1.0 and m["gate_teacher_bacc"] == 0.5
    assert m["gate_student_bacc"] == 1.0
    assert w == 0.0  # its own verdict, not the federation's 1.0
