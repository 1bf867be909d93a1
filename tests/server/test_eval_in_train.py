"""federation.eval_in_train: one message per site and round, no evaluation lost."""

import numpy as np
import pytest

from server import checkpoint, history
from server.federation import FederationError, check_sites_agree
from simulations.run import main
from tests.helpers import TINY_TEACHER, small_npz


def _run(npz, out, *extra) -> list[dict]:
    sets = [
        f"data.source=npz:{npz}",
        "data.image_size=28",
        f"data.cache_dir={out.parent}/cache",
        *TINY_TEACHER,
        f"teacher.cache_dir={out.parent}/tcache",
        "student.arch=fedkd_cnn_tiny",
        "partition.sites=2",
        "partition.alpha=1.0",
        "partition.min_site_size=5",
        "federation.rounds=2",
        "run.engine=inprocess",
        "run.global_eval=false",
        f"run.out_dir={out}",
        *extra,
    ]
    assert main([x for s in sets for x in ("--set", s)]) == 0
    return history.read_rows(out / "history.jsonl")


@pytest.mark.slow
def test_eval_in_train_records_the_same_evaluations_and_weights(
    pneumonia_npz, tmp_path
):
    npz = small_npz(pneumonia_npz, tmp_path / "small.npz", n_train=80, n_test=20)

    two = _run(npz, tmp_path / "two")
    one = _run(npz, tmp_path / "one", "federation.eval_in_train=true")

    assert [r["round"] for r in one] == [1, 2]
    for a, b in zip(two, one, strict=True):  # the same model, under its round
        assert b["eval"] == pytest.approx(a["eval"])
        assert sorted(b["sites"]) == sorted(a["sites"])
    final_two = checkpoint.load_checkpoint(tmp_path / "two")["arrays"]
    final_one = checkpoint.load_checkpoint(tmp_path / "one")["arrays"]
    for k, v in final_two.items():
        np.testing.assert_array_equal(v, final_one[k])


def test_handshake_names_the_sites_that_disagree_on_class_names():
    infos = [
        {"name": "hospital-a", "classes": ["normal", "pneumonia"], "channels": 1},
        {"name": "hospital-b", "classes": ["class-0", "class-1"], "channels": 1},
        {"name": "hospital-c", "classes": ["normal", "pneumonia"], "channels": 1},
    ]

    with pytest.raises(FederationError) as err:
        check_sites_agree(infos)

    line = str(err.value)
    assert "\n" not in line and "class names" in line
    assert "hospital-b: class-0,class-1" in line
    assert "hospital-a/hospital-c: normal,pneumonia" in line
    check_sites_agree(infos[::2])  # agreeing sites pass
