"""Per-patient DP-SGD through a whole run: epsilon in history, card and final line."""

import json

import pytest

from common.dp_sgd import epsilon
from server import history
from simulations.run import main
from tests.helpers import small_npz, tiny_config


def test_per_patient_epsilon_reaches_history_card_and_final_line(
    pneumonia_npz, tmp_path, capsys
):
    npz = small_npz(pneumonia_npz, tmp_path / "small.npz", n_train=120, n_test=40)
    cfg = tiny_config(
        npz, tmp_path, "distill.alpha=1.0", "privacy.dp_sgd=true",
        "privacy.dp_sgd_noise_multiplier=2.0", "federation.fraction_train=0.67",
        "run.engine=inprocess", "partition.scheme=iid",
    )  # fmt: skip
    path = tmp_path / "exp.yaml"
    path.write_text(cfg.to_yaml())

    assert main(["--config", str(path)]) == 0

    rows = history.read_rows(tmp_path / "run" / "history.jsonl")
    per_patient = rows[-1]["privacy_per_patient"]
    # each site's epsilon is Opacus' over every step it took, in every round
    for name, site in per_patient["per_site"].items():
        eps = epsilon([(2.0, site["sample_rate"], site["steps"])], 1e-5)
        assert site["epsilon"] == pytest.approx(eps, rel=1e-9), name
    # 2 of 3 sites per round: a site that sat out round 2 keeps its round-1 value
    assert len(per_patient["per_site"]) >= 2
    worst = max(s["epsilon"] for s in per_patient["per_site"].values())
    assert per_patient["epsilon"] == worst
    assert "dp_sgd_epsilon" not in rows[-1]["train"]  # no mean over sites
    # the row's per-site metrics carry it for the 2 sites that trained
    trained = [n for n, m in rows[-1]["sites"].items() if "train/dp_sgd_epsilon" in m]
    assert len(trained) == 2
    assert "privacy" not in rows[-1]  # site-level DP stays off
    card = json.loads((tmp_path / "run" / "final" / "model_card.json").read_text())
    assert card["method"]["dp_sgd"]["epsilon"] == worst
    assert card["method"]["dp"]["enabled"] is False
    assert "privacy.dp_sgd" in card["calibration"]["skipped"]
    out = capsys.readouterr().out
    assert f"privacy: per-patient DP-SGD (epsilon={worst:.3g}, delta=1e-05)" in out
