"""Teacher loading from every weights source, and the frozen feature extractor."""

from __future__ import annotations

import logging

import huggingface_hub.constants
import numpy as np
import pytest
import torch

from common.config import TeacherConfig
from common.errors import DataError, ModelError, TeacherWeightsError
from common.models.teacher import FrozenTeacher, load_teacher
from common.models.weights import save_teacher_checkpoint

from .conftest import ARCH, TINY, tiny_vit


def _cfg(weights: str, image_size: int = 28, arch: str = ARCH) -> TeacherConfig:
    return TeacherConfig(arch=arch, weights=weights, image_size=image_size)


def _meta_dinov2_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Re-key a timm DINOv2 ViT the way Meta's original .pth names it."""
    sd = model.state_dict()
    dim = sd["cls_token"].shape[-1]
    meta = {
        "cls_token": sd["cls_token"],
        "pos_embed": sd["pos_embed"],
        "mask_token": torch.zeros(1, dim),  # Meta's iBOT mask token; timm drops it
        "patch_embed.proj.weight": sd["patch_embed.proj.weight"],
        "patch_embed.proj.bias": sd["patch_embed.proj.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            for kind in ("weight", "bias"):
                key = f"blocks.{i}.{part}.{kind}"
                meta[key] = sd[key]
        for ls in ("ls1", "ls2"):
            meta[f"blocks.{i}.{ls}.gamma"] = sd[f"blocks.{i}.{ls}.gamma"]
    assert set(meta) - {"mask_token"} == set(sd)
    return meta


def _source_features(model, teacher: FrozenTeacher, images) -> np.ndarray:
    with torch.inference_mode():
        return model(teacher.preprocess(images)).numpy()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module-prefix"])
def test_file_timm_state_dict_loads_exactly(tmp_path, images, wrap):
    src = tiny_vit(28)
    sd = src.state_dict()
    obj = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd},
        "module-prefix": {f"module.{k}": v for k, v in sd.items()},
    }[wrap]
    path = tmp_path / "timm.pth"
    torch.save(obj, path)

    teacher = load_teacher(_cfg(f"file:{path}"), **TINY)

    assert teacher.weights_source == "file"
    np.testing.assert_allclose(
        teacher.features(images), _source_features(src, teacher, images), atol=1e-6
    )


def test_file_meta_dinov2_checkpoint_loads_exactly(tmp_path, images):
    src = tiny_vit(518)  # Meta's checkpoints carry a 37x37 pos_embed (518 px)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(_meta_dinov2_state_dict(src), path)

    same = load_teacher(_cfg(f"file:{path}", image_size=518), **TINY)
    small = load_teacher(_cfg(f"file:{path}", image_size=28), **TINY)

    np.testing.assert_allclose(
        same.features(images[:2]), _source_features(src, same, images[:2]), atol=1e-5
    )
    # pos_embed was resampled to the 2x2 grid, everything else copied verbatim
    assert small.model.pos_embed.shape == (1, 5, 32)
    torch.testing.assert_close(
        small.model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight
    )
    assert small.features(images).shape == (6, 32)


@pytest.mark.parametrize(
    "overrides, expect",
    [
        (dict(embed_dim=48), "shape mismatches"),
        (dict(depth=2), "unexpected keys"),
        (dict(patch_size=16), "patch size"),
    ],
)
def test_file_of_wrong_architecture_is_refused(tmp_path, overrides, expect):
    path = tmp_path / "other.pth"
    torch.save(
        tiny_vit(32 if "patch_size" in overrides else 28, **overrides).state_dict(),
        path,
    )

    with pytest.raises(TeacherWeightsError) as info:
        load_teacher(_cfg(f"file:{path}"), **TINY)

    msg = str(info.value)
    assert expect in msg and str(path) in msg and "\n" not in msg


def test_missing_and_unreadable_files_are_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")

    with pytest.raises(TeacherWeightsError, match="not found: .*nope.pth"):
        load_teacher(_cfg(f"file:{missing}"), **TINY)
    with pytest.raises(TeacherWeightsError, match="junk.pth is not a readable"):
        load_teacher(_cfg(f"file:{junk}"), **TINY)


def test_hub_offline_says_how_to_supply_a_file(monkeypatch):
    # No network: make huggingface_hub fail fast instead of retrying for a minute.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(TeacherWeightsError) as info:
        load_teacher(_cfg("hub"), **TINY)

    msg = str(info.value)
    assert "--set teacher.weights=file:" in msg and "dinov2_vits14_pretrain.pth" in msg
    assert "\n" not in msg


def test_random_weights_warn(caplog):
    with caplog.at_level(logging.WARNING):
        teacher = load_teacher(_cfg("random"), **TINY)

    assert teacher.weights_source == "random"
    assert any("RANDOM-INIT" in r.getMessage() for r in caplog.records)


def test_proxy_checkpoint_round_trip(tmp_path, images):
    src = load_teacher(_cfg("random"), **TINY)
    path = save_teacher_checkpoint(
        src,
        tmp_path / "proxy.pth",
        {"proxy": True, "arch": ARCH, "trained_on": "pneumoniamnist", "note": "test"},
    )

    teacher = load_teacher(_cfg(f"file:{path}"), **TINY)

    assert teacher.weights_source == "proxy"
    assert teacher.describe()["meta"]["trained_on"] == "pneumoniamnist"
    np.testing.assert_allclose(
        teacher.features(images), src.features(images), atol=1e-6
    )
    assert [p.name for p in tmp_path.iterdir()] == ["proxy.pth"]  # no tmp left


def test_checkpoint_meta_for_other_arch_is_refused(tmp_path):
    path = save_teacher_checkpoint(
        tiny_vit(),
        tmp_path / "x.pth",
        {"proxy": False, "arch": "vit_base_patch14_dinov2"},
    )

    with pytest.raises(TeacherWeightsError, match="saved for arch"):
        load_teacher(_cfg(f"file:{path}"), **TINY)
    non_proxy = save_teacher_checkpoint(
        tiny_vit(), tmp_path / "y.pth", {"arch": f"{ARCH}.lvd142m"}
    )
    assert load_teacher(_cfg(f"file:{non_proxy}"), **TINY).weights_source == "file"


def test_image_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(ModelError, match=r"teacher.image_size=30 .* 14 .* 28 or 42"):
        load_teacher(_cfg("random", image_size=30), **TINY)


@pytest.mark.parametrize("arch", ["vit_smal_patch14_dinov2", "dinov2_vits14", ""])
def test_unknown_arch_lists_close_matches(arch):
    with pytest.raises(ModelError, match="unknown model teacher.arch"):
        load_teacher(_cfg("random", arch=arch))


def test_teacher_is_frozen_and_stays_in_eval():
    teacher = load_teacher(_cfg("random"), **TINY)

    teacher.train()
    teacher.requires_grad_(True)

    assert not teacher.training and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.parameters())


def test_features_are_batch_independent_and_gray_is_repeated(images):
    teacher = load_teacher(_cfg("random"), **TINY)
    gray = images[..., :1]

    full = teacher.features(images, batch_size=64)
    batched = teacher.features(images, batch_size=4)
    from_gray = teacher.features(gray)
    from_rgb = teacher.features(np.repeat(gray, 3, axis=-1))

    assert full.dtype == np.float32 and full.shape == (6, teacher.feature_dim)
    np.testing.assert_allclose(full, batched, atol=1e-5)
    np.testing.assert_allclose(from_gray, from_rgb, atol=1e-6)
    assert teacher.features(images[:0]).shape == (0, 32)
    with pytest.raises(DataError, match="uint8"):
        teacher.features(images.astype(np.float32))


def test_describe_and_normalisation_come_from_the_model():
    teacher = load_teacher(_cfg("random", image_size=42), **TINY)

    info = teacher.describe()

    assert info["arch"] == ARCH and info["image_size"] == 42
    assert info["feature_dim"] == 32 and info["patch_size"] == 14
    assert info["params"] > 0 and info["weights_spec"] == "random"
    assert teacher.mean == pytest.approx((0.485, 0.456, 0.406))


def test_cnn_teacher_takes_any_image_size(images):
    teacher = load_teacher(_cfg("random", image_size=30, arch="resnet10t"))

    assert teacher.patch_size is None
    assert teacher.features(images[:2]).shape == (2, teacher.feature_dim)
