"""Co-located sites: torch threads of two sites on the same cores.

python -m benchmarks.threads [--quick]

Two processes train the student at the same time (what two SuperNodes on one
machine do in a round), each with all the machine's cores as threads, and
then each with its share (cores / 2, what `deploy.launch supernode
--num-threads` sets); one process alone on all cores is the yardstick.
Reported per arm: the median seconds per process for the same steps, and the
ratio to the yardstick, all measured one after the other in this call.
`colocated_share_vs_all_threads` is the share arm's time over the all-cores
arm's: below 1 means the per-site setting pays.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time

from benchmarks._util import merge, parser, table


def _train(threads: int, steps: int, size: int, q) -> None:
    import torch

    from common.models.student import create_student

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_student("fedkd_cnn_small", 2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 1, size, size), torch.randint(0, 2, (32,))

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):  # warm-up: kernel selection, allocations
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    q.put(time.perf_counter() - t)


def _arm(procs: int, threads: int, steps: int, size: int) -> float:
    """Median seconds per process of `procs` processes training at once."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    args = (threads, steps, size, q)
    ps = [ctx.Process(target=_train, args=args) for _ in range(procs)]
    for p in ps:
        p.start()
    for p in ps:
        p.join()
    return statistics.median(q.get() for _ in ps)


def run(quick: bool, out, work) -> dict:
    """Measure the three arms; merge colocated_share_vs_all_threads into `out`."""
    cores = len(os.sched_getaffinity(0))
    share = max(1, cores // 2)
    steps, size = (10, 28) if quick else (60, 64)
    load = round(os.getloadavg()[0], 2)
    alone = _arm(1, cores, steps, size)
    every = _arm(2, cores, steps, size)
    shared = _arm(2, share, steps, size)
    keys = {"colocated_share_vs_all_threads": round(shared / every, 3)}
    detail = {
        "cores": cores, "steps": steps, "image_size": size, "load_start": load,
        "alone_s": round(alone, 3), "two_all_threads_s": round(every, 3),
        "two_share_threads_s": round(shared, 3),
        "load_end": round(os.getloadavg()[0], 2),
    }
    merge(out, "threads", keys, detail)
    print(table([
        (f"1 process, {cores} threads (s)", f"{alone:.2f}  (1.00)"),
        (f"2 processes, {cores} threads each (s)",
         f"{every:.2f}  ({every / alone:.2f})"),
        (f"2 processes, {share} thread(s) each (s)",
         f"{shared:.2f}  ({shared / alone:.2f})"),
        ("colocated_share_vs_all_threads", f"{shared / every:.3f}"),
        ("load at start / end", f"{load} / {detail['load_end']}"),
    ]))
    return keys


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__).parse_args(argv)
    run(args.quick, args.out, args.work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
