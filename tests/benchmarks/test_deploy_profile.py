"""The deploy benchmark's profile: the slowest site's phases, and what lies outside."""

import pytest

from benchmarks import deploy


def test_a_message_is_profiled_by_its_slowest_site():
    sites = [
        {"start": 1.0, "import": 2.0, "load": 0.1, "handler": 0.9, "train": 0.5},
        {"start": 1.5, "import": 2.5, "load": 0.1, "handler": 1.9, "train": 1.2},
    ]

    out = deploy.message_profile(8.0, sites)

    assert out["train"] == 1.2 and out["round_trip"] == 8.0
    assert out["outside"] == pytest.approx(8.0 - (1.5 + 2.5 + 0.1 + 1.9))


def test_profiles_take_medians_over_messages_and_skip_the_first_round():
    one = {"start": 1.0, "import": 2.0, "load": 0.0, "handler": 1.0}
    dep = {
        "evaluate_s": [5.0, 7.0, 6.0],
        "evaluate_profiles": [[one], [one], [one]],
        "train_s": [90.0, 10.0, 12.0],  # round 1 fills the caches: left out
        "train_profiles": [[{**one, "handler": 80.0}], [one], [{**one, "train": 2.0}]],
        "fab": {"fab_install_s": 0.02, "fab_files": 135, "fab_bytes": 1_100_000},
    }

    prof = deploy.profiles(dep)

    assert prof["evaluate"]["round_trip"] == 6.0
    assert prof["evaluate"]["outside"] == 2.0
    assert prof["train"]["handler"] == 1.0 and prof["train"]["train"] == 1.0
    text = deploy.profile_table({**prof, "fab": dep["fab"]})
    assert "outside" in text and "135 files" in text


def test_the_fab_install_of_this_app_is_timed(tmp_path):
    from tests.deploy.harness import copy_real_app

    fab = deploy.fab_install(copy_real_app(tmp_path), repeats=1)

    assert fab["fab_files"] > 10 and fab["fab_bytes"] > 0
    assert 0 < fab["fab_install_s"] < 30
