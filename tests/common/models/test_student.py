"""Student factory and the project's small CNNs in timm's registry."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from common.errors import ModelError
from common.models.student import count_params, create_student, student_features


@pytest.mark.parametrize(
    "arch, lo, hi",
    [("fedkd_cnn_small", 300_000, 600_000), ("fedkd_cnn_tiny", 50_000, 100_000)],
)
def test_project_cnns_are_timm_models_of_the_promised_size(arch, lo, hi):
    model = create_student(arch, num_classes=3, in_chans=1)

    assert arch in timm.list_models("fedkd_cnn_*")
    assert lo <= count_params(model) <= hi
    assert model.pretrained_cfg["architecture"] == arch
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 3)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)


def test_timm_interface_of_project_cnn():
    model = create_student("fedkd_cnn_small", num_classes=2, in_chans=3).eval()
    x = torch.randn(3, 3, 64, 64)

    feats = model.forward_features(x)
    pre, logits = student_features(model, x)
    model.reset_classifier(5)

    assert feats.shape == (3, model.num_features, 64 // 8, 64 // 8)
    assert pre.shape == (3, model.num_features) and logits.shape == (3, 2)
    assert model.get_classifier().out_features == 5
    assert model(x).shape == (3, 5)


@pytest.mark.parametrize("arch", ["fedkd_cnn_tiny", "resnet10t"])
def test_student_features_match_forward(arch):
    model = create_student(arch, num_classes=4, in_chans=3).eval()
    x = torch.randn(2, 3, 32, 32)

    pre, logits = student_features(model, x)

    assert pre.shape == (2, model.num_features)
    torch.testing.assert_close(logits, model(x))


@pytest.mark.parametrize("arch", ["fedkd_cnn_smal", "resnet_fifty"])
def test_unknown_student_lists_close_matches(arch):
    with pytest.raises(ModelError, match="unknown model student.arch=.*close matches"):
        create_student(arch, num_classes=2, in_chans=1)


def test_project_cnn_learns_a_tiny_batch():
    torch.manual_seed(0)
    model = create_student("fedkd_cnn_tiny", num_classes=2, in_chans=1)
    x = torch.randn(8, 1, 32, 32)
    y = torch.tensor([0, 1] * 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    first = None
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()

    assert loss.item() < 0.5 * first
