"""run.device: resolution, CPU threads, and tensors ending on the resolved device."""

import pytest
import torch

from common.device import cpu_threads, resolve_device, setup_device
from common.errors import ConfigError


def test_auto_resolves_to_what_torch_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_an_unavailable_explicit_device_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="run.device=cuda but torch sees no CUDA"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="'run.device' = 'tpu'"):
        resolve_device("tpu")


def test_cpu_threads_cpu_left_alone_auto_uses_usable_cpus(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu = torch.device("cpu")
    assert cpu_threads("cpu", 0, cpu) is None  # unchanged from before
    assert cpu_threads("cpu", 3, cpu) == 3
    assert cpu_threads("auto", 0, cpu) >= 1
    assert cpu_threads("auto", 0, torch.device("cuda")) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads("auto", 0, cpu) is None  # the operator's choice wins


def test_site_tensors_live_on_the_resolved_device(pneumonia_npz, tmp_path):
    from client.site import site_cache
    from tests.helpers import small_npz, tiny_config

    npz = small_npz(pneumonia_npz, tmp_path / "s.npz", n_train=40, n_test=10)
    cfg = tiny_config(npz, tmp_path, "run.device=auto", "distill.alpha=1.0")
    device = setup_device("auto", 1)

    site = site_cache.site(cfg, {"partition-id": 0, "num-partitions": 3})

    assert site.device == device
    for t in (site.train.x, site.train.y, site.train.labelled, site.test_x):
        assert t.device.type == device.type


def test_project_cnn_built_without_timm_equals_timms_build():
    from common.models.cnn import build_cnn
    from common.models.student import _timm

    torch.manual_seed(3)
    direct = build_cnn("fedkd_cnn_small", 3, 1)
    torch.manual_seed(3)
    via_timm = _timm().create_model("fedkd_cnn_small", num_classes=3, in_chans=1)

    assert direct.pretrained_cfg == via_timm.pretrained_cfg
    for (k, a), (_, b) in zip(
        direct.state_dict().items(), via_timm.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
