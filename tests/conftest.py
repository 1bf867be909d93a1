"""Shared test set-up: offline, quiet Flower; paths to the shared real data."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PNEUMONIA_NPZ = SHARED_DATA / "pneumoniamnist_balanced.npz"


@pytest.fixture(autouse=True)
def _flower_task_identity():
    """Messages built outside a running Flower app need a task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        if getattr(TaskIdentity, attr) is None:
            setattr(TaskIdentity, attr, 1)
    yield


@pytest.fixture
def pneumonia_npz() -> Path:
    """The shared real chest X-ray file (skip when the checkout lacks ../shared)."""
    if not PNEUMONIA_NPZ.is_file():
        pytest.skip(f"{PNEUMONIA_NPZ} not present")
    return PNEUMONIA_NPZ
