"""Each benchmark's function runs end to end on tiny settings (< 60 s in all).

Tiny settings (`--quick`): the pneumonia npz cut down by `tests.helpers.small_npz`,
a random-init ViT-Tiny teacher at 32 px, `fedkd_cnn_tiny` at 28 px, 2 rounds.
The overhead benchmark skips Ray here (its start-up alone is tens of seconds);
the full run measures both engines.
"""

import json

import pytest

from benchmarks import comm, overhead, run_all, scale, teacher_cache, why_distil
from tests.helpers import small_npz


@pytest.mark.slow
def test_benchmarks_run_on_tiny_settings(pneumonia_npz, tmp_path):
    # quick_overrides() reuses <work>/small.npz when it is there.
    small_npz(pneumonia_npz, tmp_path / "small.npz")
    out = tmp_path / "results.json"
    why_distil.run(True, out, tmp_path)
    teacher_cache.run(True, out, tmp_path)
    comm.run(True, out, tmp_path)
    overhead.run(True, out, tmp_path, engines=("inprocess",))
    scale.run(True, out, tmp_path)
    data = json.loads(out.read_text())
    for key in (
        "student_vs_teacher_speedup",
        "cache_speedup",
        "cache_fill_s",
        "bytes_per_site_round_fp32",
        "bytes_per_site_round_fp16",
        "fp16_acc_delta",
        "overhead_ratio_steady_inprocess",
        "engine_startup_s_inprocess",
        "per_site_fixed_cost_s",
        "sites6_round_s",
        "sites6_peak_rss_gib",
    ):
        assert key in data, key
    assert data["bytes_per_site_round_fp16"] < 0.6 * data["bytes_per_site_round_fp32"]
    assert data["cache_speedup"] > 0 and data["cache_fill_s"] >= 0
    assert data["student_vs_teacher_speedup"] > 0
    assert 0 < data["sites6_peak_rss_gib"] < 8
    assert set(data["details"]) == {
        "why_distil",
        "teacher_cache",
        "comm",
        "overhead",
        "scale",
    }


def test_run_all_covers_every_benchmark():
    names = {m.__name__.rsplit(".", 1)[-1] for m in run_all.BENCHMARKS}
    assert names == {"why_distil", "teacher_cache", "comm", "overhead", "scale",
                     "threads", "mia", "deploy", "secagg"}


@pytest.mark.slow
def test_threads_benchmark_times_three_arms(tmp_path):
    from benchmarks import threads

    out = tmp_path / "results.json"
    keys = threads.run(True, out, tmp_path)
    detail = json.loads(out.read_text())["details"]["threads"]
    assert keys["colocated_share_vs_all_threads"] > 0
    for arm in ("alone_s", "two_all_threads_s", "two_share_threads_s"):
        assert detail[arm] > 0, arm


@pytest.mark.slow
def test_mia_runs_on_tiny_settings(pneumonia_npz, tmp_path):
    from benchmarks import mia

    small_npz(pneumonia_npz, tmp_path / "small.npz")
    out = tmp_path / "results.json"
    keys = mia.run(True, out, tmp_path, noise=(0.1, 1.0))
    assert set(keys) == {"mia_auc_dp_off", "mia_auc_dp_z0p1", "mia_auc_dp_z1"}
    assert all(0.0 <= v <= 1.0 for v in keys.values())
    settings = json.loads(out.read_text())["details"]["mia"]["settings"]
    assert settings["dp_off"]["epsilon"] is None
    # more noise, smaller epsilon: the reported value follows the accountant
    assert settings["dp_z1"]["epsilon"] < settings["dp_z0.1"]["epsilon"]
