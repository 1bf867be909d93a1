"""Per-patient DP-SGD: epsilon is Opacus' own, each image's gradient is clipped."""

import dp_accounting
import pytest
import torch
from dp_accounting import rdp
from opacus.accountants import RDPAccountant
from torch import nn

from common.config import load_config
from common.dp_sgd import DPSGD, Ledger, check_model, epsilon, poisson_batches
from common.errors import ModelError
from common.models.student import create_student
from common.train import LocalData, train_local

SUPERVISED = ["distill.alpha=1.0", "train.augment=false", "privacy.dp_sgd=true"]


def _opacus_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    """Opacus' RDP accountant, stepped once per DP-SGD step as its optimiser does."""
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=z, sample_rate=q)
    return acc.get_epsilon(delta=delta)


def _data(n: int, channels: int = 1, side: int = 8, seed: int = 0) -> LocalData:
    g = torch.Generator().manual_seed(seed)
    return LocalData(
        x=torch.randn(1, n, channels, side, side, generator=g),
        y=torch.arange(n) % 2,
        labelled=torch.ones(n, dtype=torch.bool),
    )


def test_epsilon_equals_opacus_and_dp_accounting_for_a_known_setting():
    # Known setting (Opacus' MNIST example): z = 1.1, batch 256 of 60,000
    # (q = 0.00427), 60 epochs = 14,100 steps, delta = 1e-5: epsilon 2.60.
    z, q, steps, delta = 1.1, 256 / 60_000, 60 * 235, 1e-5
    ledger = Ledger()
    for rnd in range(1, 4):  # three rounds of 4,700 steps: the same steps in all
        ledger.round = rnd
        ledger.add(z, q, steps // 3)

    ours = ledger.epsilon(delta)

    assert ours == pytest.approx(_opacus_epsilon(z, q, steps, delta), rel=1e-12)
    assert ours == pytest.approx(2.600, abs=1e-3)
    # An independent implementation of the same Poisson-subsampled Gaussian RDP
    google = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    google.compose(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)),
        steps,
    )
    assert ours == pytest.approx(google.get_epsilon(delta), rel=1e-6)
    # PRV is tighter than RDP for the same steps
    assert epsilon([(z, q, steps)], delta, "prv") < ours


def test_train_local_reports_opacus_epsilon_of_its_steps():
    cfg = load_config(None, [*SUPERVISED, "train.batch_size=8", "train.local_epochs=2"])
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))

    m = train_local(model, _data(32), cfg.train, cfg.distill, seed=1, dp_sgd=dp)

    # 32 images, batch 8: q = 0.25, 2 epochs of 4 steps
    assert m["dp_sgd_sample_rate"] == 0.25 and m["dp_sgd_steps"] == 8
    assert m["train_steps"] == 8
    assert m["dp_sgd_epsilon"] == pytest.approx(
        _opacus_epsilon(1.0, 0.25, 8, 1e-5), rel=1e-12
    )


def test_each_images_gradient_is_clipped_before_the_mean():
    # A linear student, 4 images, one of them 10,000x brighter; q = 1 (every image
    # in the one step), no noise, SGD at lr 1: the step is exactly
    # -(1/4) * sum_i clip(g_i, C), with g_i the hand-written CE gradient.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    data = _data(4, side=2)
    data.x[0, :3] *= 0.1  # three faint images: gradients under the clip
    data.x[0, 3] *= 1000.0
    with torch.no_grad():  # label it as the class the model finds less likely
        data.y[3] = model(data.x[0, 3:4]).argmin()
    w0, b0 = (t.detach().clone() for t in (model[1].weight, model[1].bias))
    cfg = load_config(
        None,
        [*SUPERVISED, "train.batch_size=4", "train.local_steps=1",
         "train.momentum=0", "train.weight_decay=0"],
    )  # fmt: skip
    clip = 1.0
    dp = DPSGD(noise_multiplier=0.0, max_grad_norm=clip, delta=1e-5, seed=0)

    train_local(model, data, cfg.train, cfg.distill, seed=1, lr=1.0, dp_sgd=dp)

    x = data.x[0].flatten(1)  # (4, 4)
    p = torch.softmax(x @ w0.T + b0, dim=1)
    err = p - nn.functional.one_hot(data.y, 2).float()  # dCE/dlogits per image
    g_w = err[:, :, None] * x[:, None, :]  # (4, 2, 4): (p - y) x^T
    norms = (g_w.flatten(1).pow(2).sum(1) + err.pow(2).sum(1)).sqrt()
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)  # Opacus' clipping factor
    assert norms[3] > 100 * clip and (norms[:3] < clip).all()
    expected_w = w0 - (factor[:, None, None] * g_w).sum(0) / 4
    expected_b = b0 - (factor[:, None] * err).sum(0) / 4
    torch.testing.assert_close(model[1].weight.detach(), expected_w)
    torch.testing.assert_close(model[1].bias.detach(), expected_b)
    # the bright image moved the weights by at most C / 4, not by its raw norm
    step = torch.cat([(model[1].weight - w0).flatten(), model[1].bias - b0])
    assert step.norm() <= clip + 1e-6
    # and the model is plain again: no Opacus hooks or per-image gradients left
    assert not model[1]._forward_hooks and not model[1]._backward_hooks
    assert not any(hasattr(t, "grad_sample") for t in model.parameters())


def test_noise_is_secret_unless_a_test_seed_is_given():
    cfg = load_config(None, [*SUPERVISED, "train.batch_size=8", "train.local_steps=2"])

    def weights(seed):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
        dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, seed=seed)
        train_local(model, _data(16), cfg.train, cfg.distill, seed=1, dp_sgd=dp)
        return torch.cat([t.detach().flatten() for t in model.parameters()])

    # train.seed is public (config, model card): it must not fix the noise
    assert not torch.equal(weights(None), weights(None))
    assert torch.equal(weights(7), weights(7))


def test_poisson_batches_vary_in_size_and_keep_the_step_count():
    gen = torch.Generator().manual_seed(0)
    sizes = [len(b) for b in poisson_batches(torch.arange(10), 0.1, 200, gen)]
    assert len(sizes) == 200  # every planned step, the empty ones included
    assert 0 in sizes and max(sizes) >= 3
    assert sum(sizes) / len(sizes) == pytest.approx(1.0, abs=0.3)


def test_dp_sgd_trains_the_feature_projection_and_takes_empty_batches():
    cfg = load_config(
        None,
        [*SUPERVISED, "distill.feature_weight=1.0", "distill.gate=false",
         "teacher.head=local", "train.batch_size=1", "train.local_steps=12",
         "federation.proximal_mu=0.1"],
    )  # fmt: skip
    data = _data(8)
    data.teacher_feats = torch.randn(1, 8, 5)
    model = create_student("fedkd_cnn_tiny", 2, 1)
    proj = nn.Linear(model.num_features, 5)
    before = proj.weight.detach().clone()
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, seed=3)

    m = train_local(
        model, data, cfg.train, cfg.distill, seed=1, proj=proj, dp_sgd=dp,
        proximal_mu=0.1,
    )  # fmt: skip

    # q = 1/8: some of the 12 steps drew no image and ran on the noise alone
    sample = poisson_batches(
        torch.arange(8), 1 / 8, 12, torch.Generator().manual_seed(3)
    )
    sizes = [len(b) for b in sample]  # the batches the test seed drew
    assert 0 in sizes and m["train_samples"] == sum(sizes)
    assert m["train_steps"] == 12
    assert m["train_feat"] > 0 and not torch.equal(before, proj.weight)


def test_batchnorm_student_is_refused_by_name():
    with pytest.raises(ModelError, match=r"student.arch=bn .*BatchNorm"):
        check_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), "bn")
    check_model(create_student("fedkd_cnn_small", 2, 1))  # GroupNorm: fine
