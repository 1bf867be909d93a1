"""Run every benchmark in turn: `python -m benchmarks.run_all [--quick]`."""

from __future__ import annotations

from benchmarks import (
    comm,
    deploy,
    mia,
    overhead,
    scale,
    secagg,
    teacher_cache,
    threads,
    why_distil,
)
from benchmarks._util import parser

BENCHMARKS = (
    why_distil, teacher_cache, comm, overhead, scale, threads, mia, deploy, secagg
)


def main() -> None:
    """Run all benchmarks with the same flags."""
    args = parser(__doc__).parse_args()
    for mod in BENCHMARKS:
        print(f"\n== {mod.__name__} ==", flush=True)
        mod.run(args.quick, args.out, args.work)


if __name__ == "__main__":
    main()
