"""Communication: bytes per site per round, float32 vs float16 on the wire.

python -m benchmarks.comm [--quick]
"""

from __future__ import annotations

import shutil

from benchmarks._util import merge, parser, quick_overrides, table
from server import history
from simulations.run import main as run_main


def _run(dtype: str, over: list[str], work, rounds: int) -> dict:
    out = work / f"comm-{dtype}"
    shutil.rmtree(out, ignore_errors=True)
    args = [
        *over,
        f"federation.transfer_dtype={dtype}",
        f"federation.rounds={rounds}",
        f"run.out_dir={out}",
    ]
    assert run_main([x for a in args for x in ("--set", a)]) == 0
    rows = history.read_rows(out / "history.jsonl")
    sites = len(rows[-1]["sites"])
    return {
        "up": rows[-1]["bytes_up"] / sites,
        "down": rows[-1]["bytes_down"] / sites,
        "acc": rows[-1]["global"]["acc"],
    }


def run(quick: bool, out, work) -> dict:
    """Measure; merge the byte counts and fp16_acc_delta into `out`."""
    work.mkdir(parents=True, exist_ok=True)
    base = (
        quick_overrides(work) if quick else ["data.source=br35h", "data.image_size=64"]
    )
    over = [
        *base,
        "partition.sites=4",
        "distill.alpha=1.0",
        "run.engine=inprocess",
        f"data.cache_dir={work / 'cache'}",
    ]
    rounds = 2 if quick else 5
    f32, f16 = _run("float32", over, work, rounds), _run("float16", over, work, rounds)
    keys = {
        "bytes_per_site_round_fp32": int(f32["up"] + f32["down"]),
        "bytes_per_site_round_fp16": int(f16["up"] + f16["down"]),
        "fp16_acc_delta": round(100 * (f16["acc"] - f32["acc"]), 2),
    }
    merge(out, "comm", keys, {"fp32": f32, "fp16": f16, "rounds": rounds})
    print(
        table(
            [
                ("fp32 up / down per site (B)", f"{f32['up']:.0f} / {f32['down']:.0f}"),
                ("fp16 up / down per site (B)", f"{f16['up']:.0f} / {f16['down']:.0f}"),
                (
                    "ratio fp16 / fp32",
                    round(
                        keys["bytes_per_site_round_fp16"]
                        / keys["bytes_per_site_round_fp32"],
                        3,
                    ),
                ),
                (
                    "final global ACC fp32 / fp16",
                    f"{f32['acc']:.4f} / {f16['acc']:.4f}",
                ),
                ("delta (points)", keys["fp16_acc_delta"]),
            ]
        )
    )
    return keys


if __name__ == "__main__":
    args = parser(__doc__).parse_args()
    run(args.quick, args.out, args.work)
