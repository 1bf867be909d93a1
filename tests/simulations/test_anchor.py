"""Issue 19's IID sanity anchor on small data: FedAvg on IID, unshifted sites
reaches pooled training on the same images, so the federated optimiser is right.

The committed check is the 3-seed Br35H report (simulations/experiments/
br35h_anchor.yaml); this is the same property at a size a test can afford:
real chest X-rays (the shared pneumonia file), 4 IID sites, a tiny CNN, and a
budget at which both arms have converged (FedAvg makes a quarter of the
sequential SGD steps per epoch that pooled makes, so it gets 4 local epochs).
"""

import pytest

from server import history
from simulations.run import main
from tests.helpers import small_npz


def _global_acc(tmp_path, name: str, npz, extra: list[str]) -> float:
    out = tmp_path / name
    sets = [f"data.source=npz:{npz}", "data.image_size=28",
            f"data.cache_dir={tmp_path}/cache", "student.arch=fedkd_cnn_tiny",
            "distill.alpha=1.0", "partition.sites=4", "partition.scheme=iid",
            "partition.shift=none", "train.lr=0.05", "train.optimizer_state=keep",
            "train.lr_schedule=cosine", "federation.rounds=12",
            "run.engine=inprocess", "run.global_eval=true", "run.eval_every=1",
            f"run.out_dir={out}", *extra]
    assert main([x for s in sets for x in ("--set", s)]) == 0
    rows = [r for r in history.read_rows(out / "history.jsonl") if r.get("global")]
    last = rows[-3:]  # mean of the last 3 evaluated rounds, as the reports do
    return 100 * sum(r["global"]["acc"] for r in last) / len(last)


@pytest.mark.slow
def test_fedavg_on_iid_sites_reaches_pooled(pneumonia_npz, tmp_path):
    npz = small_npz(pneumonia_npz, tmp_path / "small.npz", n_train=480, n_test=200)
    pooled = _global_acc(tmp_path, "pooled", npz, ["federation.strategy=pooled"])
    fedavg = _global_acc(tmp_path, "fedavg", npz, ["train.local_epochs=4"])
    assert pooled > 75, f"pooled reached only {pooled:.1f}: the check is void"
    assert fedavg >= pooled - 2.0, f"FedAvg-IID {fedavg:.1f} vs pooled {pooled:.1f}"
