"""Round history as JSON Lines: one self-contained row per completed round."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one row and fsync, so a crash loses at most the row being written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(_clean(row), sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_rows(path: Path) -> list[dict[str, Any]]:
    """All complete rows (a torn last line from a crash is ignored)."""
    if not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def truncate_to_round(path: Path, last_round: int) -> list[dict[str, Any]]:
    """Keep rows up to `last_round` (used when resuming from a checkpoint)."""
    rows = [r for r in read_rows(path) if int(r.get("round", 0)) <= last_round]
    tmp = Path(path).with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    os.replace(tmp, path)
    return rows
