"""Shared bits of the benchmarks: settings, result merging, tables."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results.json"
SHARED_NPZ = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / ("pneumoniamnist_balanced.npz")
)


def parser(doc: str) -> argparse.ArgumentParser:
    """Common flags: --quick (tiny settings for the smoke test) and --out."""
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    p.add_argument(
        "--out", type=Path, default=RESULTS, help="results JSON to merge into"
    )
    p.add_argument(
        "--work",
        type=Path,
        default=Path("runs/bench"),
        help="scratch folder for runs and caches",
    )
    return p


def machine() -> dict[str, Any]:
    """Cores, memory and versions, recorded with every result."""
    import torch

    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        pass
    return {
        "cpus": os.cpu_count(),
        "mem_gib": round(mem, 1) if mem else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def merge(out: Path, name: str, keys: dict[str, Any], detail: dict[str, Any]) -> None:
    """Merge this benchmark's headline keys and details into the results file."""
    data = json.loads(out.read_text()) if out.is_file() else {}
    data.update(keys)
    data.setdefault("details", {})[name] = {**detail, "machine": machine()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))


def timed_run(
    sets: list[str], out: Path, config: str | None = None
) -> tuple[float, list[float]]:
    """Run `simulations.run` into `out` (emptied first) with `--set` items.

    Returns (wall seconds of the whole run, seconds of each round from its
    history), the pair the overhead and deploy benchmarks compare.
    """
    import shutil
    import time

    from server import history
    from simulations.run import main as run_main

    shutil.rmtree(out, ignore_errors=True)
    args = [] if config is None else ["--config", config]
    args += [x for s in [*sets, f"run.out_dir={out}"] for x in ("--set", s)]
    t = time.perf_counter()
    assert run_main(args) == 0
    wall = time.perf_counter() - t
    return wall, [r["seconds"] for r in history.read_rows(out / "history.jsonl")]


def table(rows: list[tuple[str, Any]]) -> str:
    """A two-column text table."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def quick_overrides(work: Path) -> list[str]:
    """Tiny settings: the shared chest X-rays, a tiny teacher and student."""
    from tests.helpers import small_npz

    npz = work / "small.npz"
    if not npz.is_file():
        work.mkdir(parents=True, exist_ok=True)
        small_npz(SHARED_NPZ, npz)
    return [
        f"data.source=npz:{npz}",
        "data.image_size=28",
        "teacher.arch=vit_tiny_patch16_224",
        "teacher.image_size=32",
        "teacher.weights=random",
        "student.arch=fedkd_cnn_tiny",
        "partition.min_site_size=5",
        "partition.alpha=1.0",
    ]
