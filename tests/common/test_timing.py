"""Per-phase timing of one message: nested phases count once, start-up once."""

import time

import pytest

from common import timing


def test_nested_phases_count_once_and_sum_to_at_most_the_wall_time():
    prof = timing.Profile()

    t0 = time.perf_counter()
    with prof.phase("site"):
        time.sleep(0.02)
        with prof.phase("features"):
            time.sleep(0.05)
    site_block = time.perf_counter() - t0
    with prof.phase("train"):
        time.sleep(0.01)
    with prof.phase("train"):  # a phase that recurs adds up
        time.sleep(0.01)
    wall = time.perf_counter() - t0

    s = prof.seconds
    assert s["features"] >= 0.05 and s["site"] >= 0.02
    assert s["site"] + s["features"] <= site_block  # site's own time only
    assert s["train"] >= 0.02
    assert sum(s.values()) <= wall
    assert prof.metrics()["t_features_s"] == round(s["features"], 4)


def test_phase_is_a_no_op_outside_a_profiled_message():
    with timing.phase("features"):
        pass  # nothing to record into, nothing raised


def test_profiled_records_the_handler_and_the_phases_inside_it(monkeypatch):
    monkeypatch.setattr(timing, "process_clock", timing.ProcessClock())

    t0 = time.perf_counter()
    with timing.profiled("train") as prof:
        with timing.phase("train"):
            time.sleep(0.02)
    wall = time.perf_counter() - t0

    s = prof.seconds
    assert s["train"] <= s["handler"] <= wall
    # no app_imported on this clock: nothing known about start-up
    assert s["start"] == s["import"] == s["load"] == 0.0


def test_start_up_goes_to_the_first_message_of_a_process_only(monkeypatch):
    clock = timing.ProcessClock()
    clock.app_imported(time.perf_counter() - 0.2)  # imports took 0.2 s
    monkeypatch.setattr(timing, "process_clock", clock)

    with timing.profiled("query") as first:
        pass
    with timing.profiled("train") as second:
        pass

    assert first.seconds["import"] >= 0.2 and first.seconds["load"] >= 0.0
    age = timing.process_age()
    if age is not None:  # Linux: start-up and imports fit in the process's life
        assert 0.0 <= first.seconds["start"] <= age - first.seconds["import"]
    assert second.seconds["start"] == second.seconds["import"] == 0.0
    assert second.seconds["load"] == 0.0


def test_process_age_is_positive_and_grows():
    a = timing.process_age()
    if a is None:
        pytest.skip("no /proc on this platform")
    time.sleep(0.05)
    b = timing.process_age()
    assert 0 < a < b


def test_metrics_read_back_and_describe_in_a_fixed_order():
    sent = {"t_handler_s": 3.0, "t_train_s": 2.0, "t_start_s": 1.0, "acc": 0.9}
    history = {f"train/{k}": v for k, v in sent.items()}

    seconds = timing.from_metrics(history, "train/")

    assert seconds == {"handler": 3.0, "train": 2.0, "start": 1.0}
    assert timing.wall_seconds(seconds) == 4.0
    assert timing.describe(seconds) == "start 1.00s, train 2.00s, handler 3.00s"
