"""The harness: every method runs through the same code; the report tells the truth."""

import json

import numpy as np
import pytest
import yaml

from common.config import load_config
from common.data.sites import build_sites, split_public_pool
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
    for m in (*METHODS, "teacher-probe-local", "teacher-probe-federated"):
        assert f"| {m} |" in text, m
    assert "RANDOM" in text
    for png in ("accuracy_per_round.png", "per_site_acc.png", "class_histogram.png",
                "samples_per_site.png"):
        assert (out / png).stat().st_size > 1000, png
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["fedavg"]["global_acc"][2] == 1
    # A second call finds every run finished and runs nothing.
    assert harness.main(argv) == 0


def _records(gaps):
    recs = []
    for seed, gap in enumerate(gaps):
        for method, acc in (("fedavg", 0.70), ("fedkd-federated", 0.70 + gap)):
            recs.append({"method": method, "seed": seed, "sweep_value": None,
                         "global_acc": acc, "site_acc": acc})
    return recs


def test_verdict_states_win_and_loss_plainly():
    win = " ".join(report.verdict(_records([0.05, 0.06, 0.04])))
    assert "fedkd-federated beat fedavg" in win and "+5.0 ± 1.0 points" in win
    loss = " ".join(report.verdict(_records([-0.02, -0.01, -0.03])))
    assert "did NOT beat" in loss and "-2.0" in loss


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
    for site in build_sites(ds, cfg, seed=3):
        for part in (site.train, site.test):
            assert not pool_keys & {im.tobytes() for im in part.images}
