"""Self-describing, atomically written round checkpoints.

A checkpoint holds the global arrays, the round, the resolved config, the site
handshake and the metrics so far. It is written to a temporary file, fsynced,
then renamed over the target, so a crash mid-write never corrupts the latest
checkpoint.

It is read with `torch.load(weights_only=True)`: tensors, containers and plain
scalars only, so a file someone swapped into the run folder cannot run code
when a run resumes. NumPy arrays (the server optimiser's moments) are stored
as tensors under a marker and turned back into arrays on load.
"""

from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.atomic import atomic_write_bytes
from common.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_NDARRAY = "__ndarray__"


def _to_safe(value: Any) -> Any:
    """`value` with NumPy arrays and scalars made loadable under weights_only."""
    if isinstance(value, np.ndarray):
        return {_NDARRAY: torch.from_numpy(np.require(value, requirements="C"))}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _to_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_safe(v) for v in value)
    return value


def _from_safe(value: Any) -> Any:
    """Inverse of `_to_safe`."""
    if isinstance(value, dict):
        if set(value) == {_NDARRAY}:
            return value[_NDARRAY].numpy()
        return {k: _from_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_from_safe(v) for v in value)
    return value


def save_checkpoint(
    run_dir: Path,
    server_round: int,
    arrays: dict[str, np.ndarray],
    extra: dict[str, Any],
) -> Path:
    """Write checkpoints/round-XXXX.pt and point checkpoints/latest.pt at it."""
    payload = {
        "format": FORMAT_VERSION,
        "round": server_round,
        "arrays": {
            k: torch.from_numpy(np.require(v, requirements="C"))
            for k, v in arrays.items()
        },
        **_to_safe(extra),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    ckpt_dir = Path(run_dir) / "checkpoints"
    path = ckpt_dir / f"round-{server_round:04d}.pt"
    atomic_write_bytes(path, data)
    atomic_write_bytes(ckpt_dir / "latest.pt", data)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`, naming what is wrong."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "latest.pt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; was a round completed?")
    try:
        # weights_only: a swapped-in file cannot execute code on resume
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # garbage, not a refused object
            raise CheckpointError(
                f"checkpoint {path} is unreadable (not a torch file);"
                " use an earlier round-XXXX.pt"
            ) from err
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain data;"
            " refusing to unpickle it (was it written by fedkd?)"
        ) from err
    except Exception as err:  # torch raises several types for a damaged file
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({err.__class__.__name__});"
            " use an earlier round-XXXX.pt"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} is not a fedkd checkpoint (format {FORMAT_VERSION})"
        )
    payload["arrays"] = {k: v.numpy() for k, v in payload["arrays"].items()}
    return _from_safe(payload)
