"""Teacher feature cache: reuse, partial reuse, corruption, real teacher."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from common.config import TeacherConfig
from common.distill.cache import FeatureCache, teacher_cache_key
from common.errors import CacheError
from common.models.teacher import load_teacher

KEY = "test-teacher-key"
TINY = dict(depth=1, embed_dim=32, num_heads=2)


class Counting:
    """A stand-in teacher: features are pixel means; remembers what it saw."""

    def __init__(self, dim: int = 4) -> None:
        self.dim = dim
        self.calls: list[int] = []

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.calls.append(len(images))
        m = images.reshape(len(images), -1).mean(1, keepdims=True) / 255.0
        return (m * np.arange(1, self.dim + 1)).astype(np.float32)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


def test_second_call_does_no_compute(tmp_path):
    imgs, fn = _images(5), Counting()
    cache = FeatureCache(tmp_path, KEY)

    first, s1 = cache.get_or_compute(imgs, fn)
    second, s2 = cache.get_or_compute(imgs, fn)
    third, s3 = FeatureCache(tmp_path, KEY).get_or_compute(imgs, fn)  # new process

    assert (s1.hits, s1.misses) == (0, 5)
    assert (s2.hits, s2.misses) == (5, 0) and (s3.hits, s3.misses) == (5, 0)
    assert fn.calls == [5]
    assert first.dtype == np.float32 and first.shape == (5, 4)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, third)
    np.testing.assert_allclose(first, fn(imgs), rtol=1e-3)  # stored as float16


def test_partial_reuse_computes_only_new_images(tmp_path):
    a, b = _images(4, seed=1), _images(3, seed=2)
    fn = Counting()
    cache = FeatureCache(tmp_path, KEY)
    cache.get_or_compute(a, fn)

    both = np.concatenate([a[2:], b, b[:1]])  # b[0] twice: computed once
    feats, stats = cache.get_or_compute(both, fn)

    assert fn.calls == [4, 3]
    assert (stats.hits, stats.misses) == (2, 4)
    np.testing.assert_array_equal(feats[2], feats[5])
    assert len(cache.shard_names()) == 2
    assert not list((tmp_path / KEY).glob(".*tmp"))


def _corrupt(folder, kind: str) -> None:
    npy = next(folder.glob("shard-*.npy"))
    side = npy.with_suffix(".json")
    if kind == "truncated":
        npy.write_bytes(npy.read_bytes()[:-7])
    elif kind == "flipped-byte":
        data = bytearray(npy.read_bytes())
        data[-1] ^= 0xFF
        npy.write_bytes(bytes(data))
    elif kind == "wrong-key":
        meta = json.loads(side.read_text())
        side.write_text(json.dumps(dict(meta, key="another-teacher")))
    elif kind == "wrong-rows":
        meta = json.loads(side.read_text())
        side.write_text(json.dumps(dict(meta, rows=meta["rows"] + 1)))
    elif kind == "bad-json":
        side.write_text("{not json")
    elif kind == "missing-npy":
        npy.unlink()


@pytest.mark.parametrize(
    "kind",
    ["truncated", "flipped-byte", "wrong-key", "wrong-rows", "bad-json", "missing-npy"],
)
def test_corrupt_shard_is_quarantined_and_recomputed(tmp_path, caplog, kind):
    imgs, fn = _images(3), Counting()
    reference, _ = FeatureCache(tmp_path, KEY).get_or_compute(imgs, fn)
    _corrupt(tmp_path / KEY, kind)

    with caplog.at_level(logging.WARNING):
        feats, stats = FeatureCache(tmp_path, KEY).get_or_compute(imgs, fn)

    assert stats.misses == 3 and fn.calls == [3, 3]
    np.testing.assert_array_equal(feats, reference)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("corrupt" in w and "shard-" in w for w in warnings)
    assert list((tmp_path / KEY / "quarantine").iterdir())


def test_bad_compute_output_and_bad_key_are_errors(tmp_path):
    cache = FeatureCache(tmp_path, KEY)
    cache.get_or_compute(_images(2), Counting(dim=4))

    with pytest.raises(CacheError, match="expected"):
        cache.get_or_compute(_images(2, seed=9), Counting(dim=5))
    with pytest.raises(CacheError, match="NaN"):
        cache.get_or_compute(
            _images(1, seed=8), lambda x: np.full((len(x), 4), np.nan, np.float32)
        )
    with pytest.raises(CacheError, match="float16"):
        cache.get_or_compute(
            _images(1, seed=7), lambda x: np.full((len(x), 4), 1e6, np.float32)
        )
    with pytest.raises(CacheError, match="bad teacher cache key"):
        FeatureCache(tmp_path, "../escape")


def test_real_teacher_runs_no_forward_on_second_call(tmp_path):
    cfg = TeacherConfig(
        arch="vit_small_patch14_dinov2", weights="random", image_size=28
    )
    teacher = load_teacher(cfg, **TINY)
    forwards = []
    teacher.model.register_forward_hook(lambda *_: forwards.append(1))
    imgs = np.random.default_rng(3).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    cache = FeatureCache(tmp_path, teacher_cache_key(teacher, view=0))

    first, _ = cache.get_or_compute(imgs, lambda x: teacher.features(x, 2))
    n_first = len(forwards)
    second, stats = cache.get_or_compute(imgs, lambda x: teacher.features(x, 2))

    assert n_first == 3 and len(forwards) == n_first and stats.misses == 0
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, teacher.features(imgs), atol=2e-2, rtol=2e-3)


def test_cache_key_comes_from_the_config_without_a_backbone(tmp_path, monkeypatch):
    import common.models.teacher as teacher_mod

    def refuse(*_a, **_k):
        raise AssertionError("the key must not build the teacher")

    monkeypatch.setattr(teacher_mod, "load_teacher", refuse)
    cfg = TeacherConfig(
        arch="vit_small_patch14_dinov2", weights="random", image_size=28
    )

    k1 = teacher_cache_key(cfg, 0)

    assert k1 == teacher_cache_key(cfg, 0) and k1.startswith("vit_small_patch14")
    assert teacher_cache_key(cfg, 1) != k1
    # a built teacher of the same config has the same key (shared cache)
    monkeypatch.undo()
    assert teacher_cache_key(load_teacher(cfg, **TINY), 0) == k1


def test_cache_key_tracks_the_weights_file_bytes_not_its_path(tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    a.write_bytes(b"weights-1")
    b.write_bytes(b"weights-1")

    def key(path):
        cfg = TeacherConfig(arch="vit_small_patch14_dinov2", weights=f"file:{path}",
                            image_size=28)
        return teacher_cache_key(cfg, 0, memo_root=tmp_path / "cache")

    same = key(a) == key(b)
    b.write_bytes(b"weights-2")

    assert same and key(b) != key(a)
    assert (tmp_path / "cache" / "weights-sha256.json").is_file()


def test_cache_key_tracks_arch_and_image_size():
    from types import SimpleNamespace

    def stub(**over):
        fields = dict(arch="vit_small_patch14_dinov2", weights_source="random",
                      weights_spec="random", image_size=28, mean=(0.5,), std=(0.5,),
                      weights_checksum=lambda: "abc")
        return SimpleNamespace(**{**fields, **over})

    base = teacher_cache_key(stub(), 0)
    digest = base.rsplit("-", 1)[1]

    assert teacher_cache_key(stub(), 0) == base
    for other in (stub(image_size=56), stub(arch="vit_base_patch14_dinov2")):
        key = teacher_cache_key(other, 0)
        # both the readable prefix and the hash (the part that must not collide)
        assert key != base and key.rsplit("-", 1)[1] != digest
