"""The harness: every method runs through the same code; the report tells the truth."""

import json

import numpy as np
import pytest
import yaml

from common.config import load_config
from common.data.sites import partition_sites, split_public_pool
from common.data.types import Dataset, ImageSet
from simulations import harness, report
from tests.helpers import TINY_TEACHER, small_npz

METHODS = {
    "local": {"federation.strategy": "local", "distill.alpha": 1.0},
    "fedavg": {"distill.alpha": 1.0},
    "fedprox": {"federation.strategy": "fedprox", "distill.alpha": 1.0},
    "fedkd-local": {"teacher.head": "local"},
    "fedkd-federated": {"teacher.head": "federated"},
    "pooled": {"partition.sites": 1, "partition.scheme": "iid",
               "federation.min_sites": 1, "distill.alpha": 1.0},
}


@pytest.mark.slow
def test_method_matrix_runs_one_round_and_reports(pneumonia_npz, tmp_path):
    npz = small_npz(pneumonia_npz, tmp_path / "small.npz")
    base = {"data.source": f"npz:{npz}", "data.image_size": 28,
            "data.cache_dir": str(tmp_path / "cache"),
            "teacher.cache_dir": str(tmp_path / "tcache"),
            "student.arch": "fedkd_cnn_tiny", "partition.sites": 3,
            "partition.alpha": 1.0, "partition.min_site_size": 5,
            "partition.shift": "scanner", "federation.rounds": 1,
            "run.engine": "inprocess",
            **dict(o.split("=", 1) for o in TINY_TEACHER)}
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(yaml.safe_dump({"name": "tiny", "seeds": [0],
                                        "base": base, "methods": METHODS}))
    out = tmp_path / "report"
    argv = ["--experiment", str(exp_file), "--work", str(tmp_path / "work"),
            "--out", str(out)]
    assert harness.main(argv) == 0
    text = (out / "report.md").read_text()
    for m in METHODS:
        assert f"| {m} |" in text, m
    assert "RANDOM" in text
    for png in ("accuracy_per_round.png", "per_site_acc.png", "class_histogram.png",
                "samples_per_site.png"):
        assert (out / png).stat().st_size > 1000, png
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["fedavg"]["global_acc"][2] == 1
    # local is scored on the global test too: each site's own model, averaged
    assert results["summary"]["local"]["global_acc"][2] == 1
    assert results["summary"]["fedkd-federated"]["teacher_global_acc"][2] == 1
    # beside the teacher's probe, its ceiling: the pooled ridge probe of the
    # same features (computed once, kept in the run folder)
    ceiling = results["summary"]["fedkd-federated"]["pooled_probe_acc"]
    assert ceiling[2] == 1 and 0.0 <= ceiling[0] <= 1.0
    assert list((tmp_path / "work").rglob("pooled_probe.json"))
    assert "pooled probe ACC: the ceiling" in text
    # A second call finds every run finished and runs nothing.
    assert harness.main(argv) == 0


def _records(gaps):
    recs = []
    for seed, gap in enumerate(gaps):
        for method, acc in (("fedavg", 0.70), ("fedkd-federated", 0.70 + gap)):
            recs.append({"method": method, "seed": seed, "sweep_value": None,
                         "global_acc_lastk": acc, "site_acc": acc})
    return recs


def test_verdict_is_worded_from_the_paired_interval():
    # diffs .05 .06 .04: mean 5.0, sd 1.0, t(0.975, 2) = 4.303 -> half 2.48
    win = " ".join(report.verdict(_records([0.05, 0.06, 0.04])))
    assert "fedkd-federated beats fedavg" in win
    assert "+5.0 points, 95 % CI [+2.5, +7.5]" in win
    loss = " ".join(report.verdict(_records([-0.02, -0.025, -0.015])))
    assert "is worse than fedavg" in loss and "-2.0 points" in loss
    # a mean gain whose interval straddles 0 is not called a win
    mixed = " ".join(report.verdict(_records([0.10, -0.05, 0.04])))
    assert "no detectable difference" in mixed


def test_unknown_experiment_key_is_named(tmp_path):
    from common.errors import ConfigError

    f = tmp_path / "e.yaml"
    f.write_text("name: x\nmethods: {a: {}}\nseedz: [1]\n")
    with pytest.raises(ConfigError, match="seedz"):
        harness.load_experiment(f)
    f.write_text("name: x\nmethods: {a: {train.lrr: 1}}\n")
    with pytest.raises(ConfigError, match="train.lrr"):
        harness.load_experiment(f)


def test_public_pool_is_disjoint_from_sites_and_deterministic():
    rng = np.random.default_rng(0)
    n = 400
    labels = np.repeat([0, 1], n // 2)
    imgs = rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    imgs[:, 0, 0, 0] = np.arange(n) % 256  # make images distinguishable
    imgs[:, 0, 1, 0] = np.arange(n) // 256
    empty = ImageSet(imgs[:0], labels[:0].astype(np.int64))
    ds = Dataset("t", "t", ("a", "b"), ImageSet(imgs, labels.astype(np.int64)),
                 empty, empty)
    pool, rest = split_public_pool(labels, 0.25, seed=3)
    pool2, _ = split_public_pool(labels, 0.25, seed=3)
    assert np.array_equal(pool, pool2) and len(pool) == 100
    assert set(pool).isdisjoint(rest) and len(pool) + len(rest) == n
    assert np.bincount(labels[pool]).tolist() == [50, 50]
    cfg = load_config(None, ["partition.sites=3", "partition.public_pool_fraction=0.25",
                             "partition.min_site_size=5"]).partition
    pool_keys = {imgs[i].tobytes() for i in pool}
    for site in partition_sites(ds, cfg, seed=3):
        for part in (site.train, site.test):
            assert not pool_keys & {im.tobytes() for im in part.images}


def _hashes(images: np.ndarray) -> set[str]:
    import hashlib

    return {hashlib.sha256(im.tobytes()).hexdigest() for im in images}


@pytest.mark.parametrize("experiment", ["br35h_proxy.yaml", "pneumonia_proxy.yaml"])
def test_each_seeds_proxy_trains_only_on_that_seeds_pool(
    experiment, monkeypatch, tmp_path
):
    """No proxy training image is in any site's data, val or the global test."""
    from pathlib import Path

    from common.data.sites import public_pool
    from common.data.sources import load_dataset
    from simulations import proxy_teacher

    path = Path("simulations/experiments") / experiment
    exp = harness.load_experiment(path)
    if "npz:" in str(exp.base.get("data.source")):
        npz = Path(str(exp.base["data.source"])[4:])
        if not npz.is_file():
            pytest.skip(f"{npz} not present")
    exp.seeds = [0, 1, 2]
    trained = {}

    def fake_train(cfg, arch, epochs, **aug):  # record what each proxy would train on
        trained[cfg.train.seed] = cfg
        return tmp_path / f"proxy-{cfg.train.seed}.pt", {"reused": True}

    monkeypatch.setattr(proxy_teacher, "train_proxy", fake_train)
    per_seed = harness.proxies(exp, {})
    assert sorted(trained) == [0, 1, 2]
    runs = harness._runs(exp, tmp_path, {}, per_seed)
    for seed, pcfg in trained.items():
        size = max(pcfg.data.image_size, pcfg.teacher.image_size)
        ds = load_dataset(pcfg.data.source, size, pcfg.data.cache_dir, seed=seed,
                          val_fraction=pcfg.data.val_fraction,
                          test_fraction=pcfg.data.test_fraction)
        everything = np.concatenate([ds.train.images, ds.val.images, ds.test.images])
        all_hashes = [h for im in everything for h in _hashes(im[None])]
        dupes = {h for h in all_hashes if all_hashes.count(h) > 1}
        pool = _hashes(public_pool(ds, pcfg.partition.public_pool_fraction,
                                   seed).images) - dupes
        assert len(pool) > 100
        assert pool.isdisjoint(_hashes(ds.val.images))
        assert pool.isdisjoint(_hashes(ds.test.images))
        for desc, overrides in runs:
            if desc["seed"] != seed:
                continue
            if "teacher.weights" in exp.methods[desc["method"]]:
                continue  # a method that names its own teacher (random-init)
            # the run loads this seed's proxy, and its sites never hold a pool image
            assert f"teacher.weights=file:{tmp_path}/proxy-{seed}.pt" in overrides
            cfg = load_config(None, overrides + ["partition.shift=none"])
            for site in partition_sites(ds, cfg.partition, seed):
                assert pool.isdisjoint(_hashes(site.train.images))
                assert pool.isdisjoint(_hashes(site.test.images))


@pytest.mark.parametrize("text", [
    "name: x\nmethods:\n  fedavg: {}\nmethods:\n  local: {}\n",
    "name: x\nmethods:\n  fedavg:\n    train.lr: 0.1\n    train.lr: 0.2\n",
])
def test_duplicate_experiment_keys_are_an_error(tmp_path, text):
    from common.errors import ConfigError

    f = tmp_path / "dup.yaml"
    f.write_text(text)

    with pytest.raises(ConfigError, match="duplicate key"):
        harness.load_experiment(f)
