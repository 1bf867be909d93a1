"""End to end on Flower's Simulation Engine: 3 sites, 2 rounds, real X-rays."""

import json

import pytest

from server import checkpoint, history
from simulations.run import main
from tests.helpers import TINY_TEACHER, small_npz


def _args(npz, tmp_path, *extra):
    sets = [
        f"data.source=npz:{npz}",
        "data.image_size=28",
        f"data.cache_dir={tmp_path}/cache",
        *TINY_TEACHER,
        f"teacher.cache_dir={tmp_path}/tcache",
        "student.arch=fedkd_cnn_tiny",
        "partition.sites=3",
        "partition.alpha=1.0",
        "partition.min_site_size=5",
        "federation.rounds=2",
        f"run.out_dir={tmp_path}/run",
        *extra,
    ]
    return [x for s in sets for x in ("--set", s)]


@pytest.mark.slow
def test_two_rounds_three_sites(pneumonia_npz, tmp_path, capsys):
    npz = small_npz(pneumonia_npz, tmp_path / "small.npz")
    assert main(_args(npz, tmp_path)) == 0
    run = tmp_path / "run"
    rows = history.read_rows(run / "history.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    assert len(rows[-1]["sites"]) == 3
    assert 0.0 <= rows[-1]["eval"]["acc"] <= 1.0
    assert "acc" in rows[-1]["global"]
    assert checkpoint.load_checkpoint(run)["round"] == 2
    assert (run / "accuracy.png").stat().st_size > 1000
    card = json.loads((run / "final" / "model_card.json").read_text())
    assert card["teacher"]["weights_source"] == "random"
    assert "RANDOM-INIT" in (run / "final" / "model_card.md").read_text()
    assert "RANDOM-INIT" in capsys.readouterr().out
    # A second run into the same folder is refused; nothing is overwritten.
    before = (run / "history.jsonl").read_bytes()
    assert main(_args(npz, tmp_path)) == 2
    assert (run / "history.jsonl").read_bytes() == before


def test_inprocess_engine_matches_the_ray_engine_contract(pneumonia_npz, tmp_path):
    npz = small_npz(pneumonia_npz, tmp_path / "small.npz")
    assert main(_args(npz, tmp_path, "run.engine=inprocess")) == 0
    rows = history.read_rows(tmp_path / "run" / "history.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    assert sorted(rows[-1]["sites"]) == ["site-0", "site-1", "site-2"]
    assert (tmp_path / "run" / "final" / "model.pt").is_file()
