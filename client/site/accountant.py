"""A site's DP-SGD ledger kept across rounds (privacy.dp_sgd).

Each local training appends a row (round, noise multiplier, sample rate,
steps) to the site's `common.dp_sgd.Ledger`; the epsilon a site reports is
Opacus' accountant over every row. The ledger lives in Flower's
`context.state` and, so that a restarted site process or a resumed run keeps
counting, in one file per run and site in the site's cache folder
(`<data.cache_dir>/dp-sgd-ledger/<run and site key>.json`).

Rows are never dropped within a run: a round that is retried, or run again
after the server resumed from its checkpoint, counts every time it trained,
because every update it produced was sent. A ledger on disk met in round 1 with
nothing in `context.state` belongs to an earlier run of the same config (a run
resumed before its first round finished looks the same) and is replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict

from common.atomic import atomic_write_bytes
from common.config import ExperimentConfig
from common.dp_sgd import Ledger
from common.errors import CheckpointError

log = logging.getLogger(__name__)

LEDGER_KEY = "fedkd.dp-sgd-ledger"
_COLUMNS = ("round", "noise_multiplier", "sample_rate", "steps")


def ledger_path(cfg: ExperimentConfig, site_name: str) -> Path:
    """The site's ledger file for this run (same key as its optimiser state)."""
    key = hashlib.sha256((cfg.to_yaml() + "|" + site_name).encode()).hexdigest()[:16]
    return Path(cfg.data.cache_dir).expanduser() / "dp-sgd-ledger" / f"{key}.json"


def _rows(columns: dict) -> list[tuple[int, float, float, int]]:
    """Rows from the column lists of a ConfigRecord or a ledger file."""
    return [
        (int(r), float(z), float(q), int(s))
        for r, z, q, s in zip(*(columns[c] for c in _COLUMNS), strict=True)
    ]


def load_ledger(
    cfg: ExperimentConfig, state: RecordDict, server_round: int, site_name: str
) -> Ledger | None:
    """The site's ledger so far, ready to record `server_round` (None unless DP-SGD)."""
    if not cfg.privacy.dp_sgd:
        return None
    if LEDGER_KEY in state:
        return Ledger(_rows(state[LEDGER_KEY]), round=server_round)
    path = ledger_path(cfg, site_name)
    if path.is_file() and server_round > 1:
        try:
            rows = _rows(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as err:
            # Starting from zero would under-report epsilon: stop instead.
            raise CheckpointError(
                f"DP-SGD ledger {path} of {site_name} is unreadable ({err}); "
                "restore it, or start the run again with a new run.out_dir"
            ) from err
        return Ledger(rows, round=server_round)
    if path.is_file():
        log.info("%s: a new run; the DP-SGD ledger %s starts again", site_name, path)
    return Ledger(round=server_round)


def save_ledger(
    cfg: ExperimentConfig, state: RecordDict, ledger: Ledger | None, site_name: str
) -> None:
    """Keep the ledger in context.state and, atomically, on disk."""
    if ledger is None:
        return
    columns = {c: [row[i] for row in ledger.rows] for i, c in enumerate(_COLUMNS)}
    state[LEDGER_KEY] = ConfigRecord(columns)
    path = ledger_path(cfg, site_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(columns).encode())
