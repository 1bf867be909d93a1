"""Checkpoints are atomic and self-describing; history survives torn lines."""

import numpy as np
import pytest

from common import atomic
from common.errors import CheckpointError
from server import checkpoint, history


def test_round_trip(tmp_path):
    arrays = {"student.w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    checkpoint.save_checkpoint(tmp_path, 3, arrays, {"config_yaml": "x: 1"})
    ck = checkpoint.load_checkpoint(tmp_path)
    assert ck["round"] == 3 and ck["config_yaml"] == "x: 1"
    np.testing.assert_array_equal(ck["arrays"]["student.w"], arrays["student.w"])
    assert (tmp_path / "checkpoints" / "round-0003.pt").is_file()


def test_server_optimiser_moments_round_trip_as_arrays(tmp_path):
    """NumPy moments (FedAvgM's momentum, FedAdam's m_t) survive weights_only."""
    moments = [np.arange(3, dtype=np.float32), np.ones((2, 2), np.float64)]
    extra = {"optimizer_state": {"momentum_vector": moments, "step": np.int64(4)},
             "last_row": {"acc": np.float32(0.5), "sites": ("a", "b")}}
    checkpoint.save_checkpoint(tmp_path, 2, {}, extra)
    ck = checkpoint.load_checkpoint(tmp_path)
    got = ck["optimizer_state"]["momentum_vector"]
    assert all(isinstance(g, np.ndarray) for g in got)
    for g, m in zip(got, moments, strict=True):
        assert g.dtype == m.dtype
        np.testing.assert_array_equal(g, m)
    assert ck["optimizer_state"]["step"] == 4
    assert ck["last_row"] == {"acc": 0.5, "sites": ("a", "b")}


class _Payload:
    """An object whose unpickling would run code (os.system in a real attack)."""

    def __reduce__(self):
        return (print, ("code ran while loading a checkpoint",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    import torch

    path = tmp_path / "checkpoints" / "latest.pt"
    path.parent.mkdir()
    torch.save({"format": checkpoint.FORMAT_VERSION, "round": 1, "arrays": {},
                "evil": _Payload()}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        checkpoint.load_checkpoint(tmp_path)
    assert "code ran" not in capsys.readouterr().out


def test_interrupted_write_keeps_previous_latest(tmp_path, monkeypatch):
    arrays = {"student.w": np.ones(4, dtype=np.float32)}
    checkpoint.save_checkpoint(tmp_path, 1, arrays, {})

    real_fsync = atomic.os.fsync

    def crash(fd):
        raise KeyboardInterrupt("power cut during write")

    monkeypatch.setattr(atomic.os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(
            tmp_path, 2, {"student.w": np.zeros(4, np.float32)}, {}
        )
    monkeypatch.setattr(atomic.os, "fsync", real_fsync)
    ck = checkpoint.load_checkpoint(tmp_path)
    assert ck["round"] == 1
    np.testing.assert_array_equal(ck["arrays"]["student.w"], 1.0)
    leftovers = list((tmp_path / "checkpoints").glob(".*.tmp"))
    assert leftovers == []


def test_corrupt_checkpoint_is_named(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        checkpoint.load_checkpoint(tmp_path)


def test_history_ignores_torn_last_line_and_truncates(tmp_path):
    path = tmp_path / "history.jsonl"
    for r in (1, 2, 3):
        history.append_row(path, {"round": r, "acc": float("nan")})
    with open(path, "a") as fh:
        fh.write('{"round": 4, "ac')
    rows = history.read_rows(path)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[0]["acc"] is None
    history.truncate_to_round(path, 2)
    assert [r["round"] for r in history.read_rows(path)] == [1, 2]


_KILLED_WRITER = """
import sys, time
import numpy as np
from common import atomic
from server import checkpoint

run = sys.argv[1]
big = 1_000_000  # 4 MB of weights: the write takes real time
checkpoint.save_checkpoint(run, 1, {"student.w": np.full(big, 1, np.float32)}, {})

def stall(src, dst):  # the bytes of round 2 are on disk, not yet renamed
    print("mid-write", flush=True)
    time.sleep(60)

atomic.os.replace = stall
checkpoint.save_checkpoint(run, 2, {"student.w": np.full(big, 2, np.float32)}, {})
"""


def test_sigkill_mid_write_keeps_the_latest_checkpoint(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(tmp_path)],
        cwd=repo,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "mid-write"
        proc.send_signal(signal.SIGKILL)  # no handler, no cleanup: a power cut
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    ck = checkpoint.load_checkpoint(tmp_path)
    assert ck["round"] == 1
    np.testing.assert_array_equal(ck["arrays"]["student.w"], 1.0)
    # The torn temporary file is left behind, but never read, and the next
    # save still works.
    assert list((tmp_path / "checkpoints").glob(".*.tmp"))
    checkpoint.save_checkpoint(tmp_path, 2, {"student.w": np.zeros(3, np.float32)}, {})
    assert checkpoint.load_checkpoint(tmp_path)["round"] == 2
