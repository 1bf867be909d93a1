"""Framework overhead: a federated run vs a plain PyTorch loop doing the same steps.

    python -m benchmarks.overhead [--quick]

Same 4 sites, same local SGD steps (1 epoch per round, no teacher), same
per-round evaluation on each site's test part. The plain loop calls
`common.train.train_local` / `evaluate` on every site in sequence, with the
seeds the sites use. Threads: `train.num_threads=1` everywhere (the Ray actors,
the in-process engine and the plain loop all train with one torch thread); Ray
runs one actor per core, so it may use both cores where the other two use one.
The machine is shared, so the plain loop is timed before and after each engine
run and each engine is compared with the mean of the two (steady medians).
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from benchmarks._util import merge, parser, quick_overrides, table, timed_run
from client.site import site_cache, site_seed
from common.config import load_config
from common.models.student import create_student
from common.train import evaluate, train_local


def _engine(engine: str, over: list[str], work, rounds: int) -> tuple[float, list]:
    sets = [*over, f"run.engine={engine}", f"federation.rounds={rounds}",
            "run.global_eval=false"]
    return timed_run(sets, work / f"overhead-{engine}")


def _plain(over: list[str], rounds: int, threads: int) -> list[float]:
    cfg = load_config(None, over)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sites = [
            site_cache.site(cfg, {"partition-id": i, "num-partitions": 4})
            for i in range(4)
        ]
        times = []
        for rnd in range(1, rounds + 1):
            t = time.perf_counter()
            for s in sites:
                model = create_student(cfg.student.arch, 2, s.channels)
                seed = site_seed(cfg, rnd, s.name)
                train_local(model, s.train, cfg.train, cfg.distill, seed=seed)
                evaluate(model, s.test_x, s.test_y)
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return times


def run(quick: bool, out, work, engines=("ray", "inprocess")) -> dict:
    """Measure; merge overhead_ratio_steady and engine_startup_s into `out`.

    `engines` lets the smoke test skip Ray's start-up; the keys of an engine
    that did not run are left out.
    """
    work.mkdir(parents=True, exist_ok=True)
    base = (
        quick_overrides(work) if quick else ["data.source=br35h", "data.image_size=64"]
    )
    over = [
        *base,
        "partition.sites=4",
        "distill.alpha=1.0",
        "train.num_threads=1",
        f"data.cache_dir={work / 'cache'}",
    ]
    rounds = 2 if quick else 5
    steady = lambda xs: statistics.median(xs[1:] if len(xs) > 1 else xs)  # noqa: E731
    detail: dict = {
        "threads": "train.num_threads=1 in the engines and the plain loop",
        "note": "start-up = whole run wall time minus the rounds: process and "
        "engine start, data load, handshake, final model and card",
    }
    # The machine is shared, so its load drifts: the plain loop is measured
    # before and after each engine run and the engine is compared with the mean
    # of the two steady medians that bracket it.
    plain_rounds = 2 if quick else 3
    plains = [_plain(over, plain_rounds, threads=1)]
    loads = [os.getloadavg()[0]]
    keys: dict = {}
    rows = []
    suffix = {"ray": "", "inprocess": "_inprocess"}
    for engine in engines:
        wall, rounds_s = _engine(engine, over, work, rounds)
        loads.append(os.getloadavg()[0])
        plains.append(_plain(over, plain_rounds, threads=1))
        loads.append(os.getloadavg()[0])
        detail[f"{engine}_round_s"], detail[f"{engine}_wall_s"] = rounds_s, wall
        base = (steady(plains[-2]) + steady(plains[-1])) / 2
        ratio = round(steady(rounds_s) / base, 3)
        start = round(wall - sum(rounds_s), 1)
        keys[f"overhead_ratio_steady{suffix[engine]}"] = ratio
        keys[f"engine_startup_s{suffix[engine]}"] = start
        rows += [
            (f"{engine} round (s)", [round(x, 2) for x in rounds_s]),
            ("plain loop around it (s), 1 thread", round(base, 2)),
            (f"steady ratio {engine} / plain (median, rounds 2..)", ratio),
            (f"start-up + wrap-up, {engine} (s)", start),
        ]
    detail["plain_round_s"] = plains
    detail["load_avg_1min"] = loads
    rows.insert(
        0,
        ("plain loop rounds, 1 thread (s)", [[round(x, 2) for x in p] for p in plains]),
    )
    rows.append(("1-min load average (2 cores)", [round(x, 1) for x in loads]))
    merge(out, "overhead", keys, detail)
    print(table(rows))
    return keys


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    run(args.quick, args.out, args.work)
