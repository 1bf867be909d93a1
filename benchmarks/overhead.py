"""Framework overhead: a federated run vs a plain PyTorch loop doing the same steps.

    python -m benchmarks.overhead [--quick]

Same 4 sites, same local SGD steps (1 epoch per round, no teacher), same
per-round evaluation on each site's test part. The plain loop calls
`common.train.train_local` / `evaluate` on every site in sequence. Threads:
the Ray engine runs one single-thread actor per core; the plain loop and the
in-process engine use torch's threads (all cores) — the fair reading is the
ratio of steady-state round times at equal total cores.
"""

from __future__ import annotations

import shutil
import statistics
import time

from benchmarks._util import merge, parser, quick_overrides, table
from client import site as site_lib
from common.config import load_config
from common.models.student import create_student
from common.train import evaluate, train_local
from server import history
from simulations.run import main as run_main


def _engine(engine: str, over: list[str], work, rounds: int) -> tuple[float, list]:
    out = work / f"overhead-{engine}"
    shutil.rmtree(out, ignore_errors=True)
    args = [
        *over,
        f"run.engine={engine}",
        f"federation.rounds={rounds}",
        f"run.out_dir={out}",
        "run.global_eval=false",
    ]
    t = time.perf_counter()
    assert run_main([x for a in args for x in ("--set", a)]) == 0
    wall = time.perf_counter() - t
    rows = history.read_rows(out / "history.jsonl")
    return wall, [r["seconds"] for r in rows]


def _plain(over: list[str], rounds: int) -> list[float]:
    cfg = load_config(None, over)
    sites = [
        site_lib.build_site(cfg, {"partition-id": i, "num-partitions": 4})
        for i in range(4)
    ]
    times = []
    for rnd in range(rounds):
        t = time.perf_counter()
        for s in sites:
            model = create_student(cfg.student.arch, 2, s.channels)
            train_local(model, s.train, cfg.train, cfg.distill, seed=rnd)
            evaluate(model, s.test_x, s.test_y)
        times.append(time.perf_counter() - t)
    return times


def run(quick: bool, out, work) -> dict:
    """Measure; merge overhead_ratio_steady and engine_startup_s into `out`."""
    work.mkdir(parents=True, exist_ok=True)
    base = (
        quick_overrides(work) if quick else ["data.source=br35h", "data.image_size=64"]
    )
    over = [
        *base,
        "partition.sites=4",
        "distill.alpha=1.0",
        f"data.cache_dir={work / 'cache'}",
    ]
    rounds = 2 if quick else 5
    ray_wall, ray_rounds = _engine("ray", over, work, rounds)
    ip_wall, ip_rounds = _engine("inprocess", over, work, rounds)
    plain = _plain(over, rounds)
    steady = lambda xs: statistics.median(xs[1:] if len(xs) > 1 else xs)  # noqa: E731
    keys = {
        "overhead_ratio_steady": round(steady(ray_rounds) / steady(plain), 3),
        "overhead_ratio_steady_inprocess": round(steady(ip_rounds) / steady(plain), 3),
        "engine_startup_s": round(ray_wall - sum(ray_rounds), 1),
        "engine_startup_s_inprocess": round(ip_wall - sum(ip_rounds), 1),
    }
    detail = {
        "ray_round_s": ray_rounds,
        "inprocess_round_s": ip_rounds,
        "plain_round_s": plain,
        "ray_wall_s": ray_wall,
        "inprocess_wall_s": ip_wall,
        "note": "start-up = whole run wall time minus the rounds: process and "
        "engine start, data load, handshake, final model and card",
    }
    merge(out, "overhead", keys, detail)
    print(
        table(
            [
                ("plain loop round (s)", [round(x, 2) for x in plain]),
                ("ray engine round (s)", [round(x, 2) for x in ray_rounds]),
                ("in-process round (s)", [round(x, 2) for x in ip_rounds]),
                ("steady ratio ray / plain", keys["overhead_ratio_steady"]),
                (
                    "steady ratio in-process / plain",
                    keys["overhead_ratio_steady_inprocess"],
                ),
                ("start-up + wrap-up, ray (s)", keys["engine_startup_s"]),
                (
                    "start-up + wrap-up, in-process (s)",
                    keys["engine_startup_s_inprocess"],
                ),
            ]
        )
    )
    return keys


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    run(args.quick, args.out, args.work)
