"""Each benchmark runs end to end on tiny settings (they are not run in full here)."""

import json

import pytest

from benchmarks import comm, overhead, scale, teacher_cache, why_distil


@pytest.mark.slow
def test_benchmarks_run_on_tiny_settings(pneumonia_npz, tmp_path):
    out = tmp_path / "results.json"
    why_distil.run(True, out, tmp_path)
    teacher_cache.run(True, out, tmp_path)
    comm.run(True, out, tmp_path)
    scale.run(True, out, tmp_path)
    data = json.loads(out.read_text())
    for key in (
        "student_vs_teacher_speedup",
        "cache_speedup",
        "cache_fill_s",
        "bytes_per_site_round_fp32",
        "bytes_per_site_round_fp16",
        "fp16_acc_delta",
        "per_site_fixed_cost_s",
    ):
        assert key in data, key
    assert data["bytes_per_site_round_fp16"] < 0.6 * data["bytes_per_site_round_fp32"]
    assert data["cache_speedup"] > 0 and data["cache_fill_s"] >= 0


def test_overhead_has_a_plain_loop_baseline():
    assert callable(overhead.run) and "plain" in overhead.__doc__
