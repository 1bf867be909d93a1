"""Scale: 10, 50 and 100 sites over the same total data; round time and peak memory.

    python -m benchmarks.scale [--quick] [--engine inprocess|ray]

Each site count runs as its own `simulations.run` process. Peak memory of the
process tree: the main process's VmHWM (its own high-water mark, exact) plus
the summed VmRSS of its descendants (Ray's raylet and actors), sampled from
/proc every 0.5 s; the largest such sum over the run is reported. With the
in-process engine the tree is one process, so the figure is its VmHWM.

Round time: round 1 also builds every site (decode + partition, once per
process), so the headline is the steady round (the median of rounds 2..); the
first round is kept in the details.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

from benchmarks._util import SHARED_NPZ, merge, parser, quick_overrides, table
from server import history


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            m = re.search(rf"{field}:\s+(\d+)", fh.read())
    except OSError:
        return 0
    return int(m.group(1)) if m else 0


def _children(pid: int) -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - the process may just have exited
        return []
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as fh:
                kids = [int(c) for c in fh.read().split()]
        except OSError:
            continue
        out += kids
        todo += kids
    return out


def _tree_peak(pid: int) -> int:
    """Bytes: main process's VmHWM + current VmRSS of all its descendants."""
    kib = _status_kib(pid, "VmHWM")
    kib += sum(_status_kib(c, "VmRSS") for c in _children(pid))
    return kib * 1024


def _one(sites: int, over: list[str], work, engine: str) -> dict:
    out = work / f"scale-{engine}-{sites}"
    shutil.rmtree(out, ignore_errors=True)
    args = [
        *over,
        f"partition.sites={sites}",
        f"run.out_dir={out}",
        f"run.engine={engine}",
    ]
    cmd = [sys.executable, "-m", "simulations.run"] + [
        x for a in args for x in ("--set", a)
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_peak(proc.pid))
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{sites} sites failed: {err[-500:]}")
    rows = history.read_rows(out / "history.jsonl")
    secs = [r["seconds"] for r in rows]
    return {
        "sites": sites,
        "round_s": float(np.median(secs[1:] if len(secs) > 1 else secs)),
        "first_round_s": secs[0],
        "rounds_s": secs,
        "samples_per_round": sum(
            int(v.get("train/num-examples", 0)) for v in rows[-1]["sites"].values()
        ),
        "peak_rss_gib": peak[0] / 2**30,
    }


def run(quick: bool, out, work, engine: str = "inprocess") -> dict:
    """Measure; merge the 100-site numbers and the per-site cost into `out`."""
    work.mkdir(parents=True, exist_ok=True)
    base = (
        quick_overrides(work)
        if quick
        else [
            f"data.source=npz:{SHARED_NPZ}",
            "data.image_size=28",
            "student.arch=fedkd_cnn_small",
            "partition.min_site_size=5",
        ]
    )
    over = [
        *base,
        "partition.scheme=iid",
        "distill.alpha=1.0",
        "federation.rounds=2",
        "federation.min_sites=2",
        "run.global_eval=false",
        f"data.cache_dir={work / 'cache'}",
    ]
    counts = [3, 6] if quick else [10, 50, 100]
    res = [_one(n, over, work, engine) for n in counts]
    b, a = np.polyfit([r["sites"] for r in res], [r["round_s"] for r in res], 1)
    last = res[-1]
    tag = f"sites{last['sites']}"
    keys = {
        f"{tag}_round_s": round(last["round_s"], 2),
        f"{tag}_peak_rss_gib": round(last["peak_rss_gib"], 2),
        "per_site_fixed_cost_s": round(float(b), 3),
    }
    merge(
        out,
        "scale",
        keys,
        {"engine": engine, "runs": res, "fit_a_s": a, "fit_b_s_per_site": b},
    )
    print(
        table(
            [
                (
                    f"{r['sites']} sites",
                    f"{r['round_s']:.2f} s/round (steady), "
                    f"peak {r['peak_rss_gib']:.2f} GiB",
                )
                for r in res
            ]
            + [
                ("samples / round", [r["samples_per_round"] for r in res]),
                (
                    "first round (s, builds sites)",
                    [round(r["first_round_s"], 2) for r in res],
                ),
                ("fit steady round_s = a + b*sites", f"a={a:.2f}s, b={b:.3f}s/site"),
            ]
        )
    )
    return keys


if __name__ == "__main__":
    p = parser(__doc__)
    p.add_argument("--engine", default="inprocess", choices=["inprocess", "ray"])
    args = p.parse_args()
    run(args.quick, args.out, args.work, args.engine)
