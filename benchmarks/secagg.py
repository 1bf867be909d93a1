"""Secure aggregation's cost: bytes and seconds per deployed round, with and without.

    python -m benchmarks.secagg [--quick]

On the loopback federation of `benchmarks.deploy` (SuperLink + 2 SuperNodes,
TLS + node auth, a warm site worker each, each on its share of the cores),
the deployment preset runs twice, one after the other in this call: plain
FedAvg, then `privacy.secure_aggregation=true` (Flower's SecAgg+: four
message exchanges per round instead of one). Both use `teacher.head=local`
(the preset's federated head does not compose with secure aggregation).
Reported: the median steady round's seconds, the model bytes per round each
way from the history (under SecAgg+ the masked vectors), Flower's count of
the whole run's traffic (key stages included), and the ratios secure / plain.
"""

from __future__ import annotations

import os
import shutil
import statistics

from benchmarks._util import SHARED_NPZ, merge, parser, table
from benchmarks.deploy import PRESET, _overrides, _rows, _say, _start_federation


def _one(h, fed, procs, root, over: list[str], name: str) -> dict:
    out = root / name
    sets = ";".join([*over, f"run.out_dir={out}"])
    app = h.copy_real_app(root / f"app-{name}")
    run_id = fed.run(app, f'config-file="{PRESET}" overrides="{sets}"')
    status = fed.wait_run(run_id, 3600)
    if status["status"] != "finished:completed":
        raise RuntimeError(f"{name} run ended {status}\n{h.dump_logs(procs)}")
    rows = _rows(out)
    steady = [r["seconds"] for r in rows[1:]] or [rows[0]["seconds"]]
    _say(f"{name}: rounds {[round(r['seconds'], 1) for r in rows]} s")
    return {
        "round_s": [r["seconds"] for r in rows],
        "steady_round_s": statistics.median(steady),
        "bytes_up": statistics.median(r["bytes_up"] for r in rows),
        "bytes_down": statistics.median(r["bytes_down"] for r in rows),
        # Flower's count of the whole run's traffic (handshake and the SecAgg+
        # key stages included)
        "run_bytes": int(status["network-traffic"]["total-bytes"]),
        "load": round(os.getloadavg()[0], 2),
    }


def run(quick: bool, out, work) -> dict:
    """Measure both; merge secagg_round_ratio and secagg_bytes_up_ratio."""
    from tests.deploy import harness as h

    npz = SHARED_NPZ
    root = (work / "secagg-bench").resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if quick:
        from tests.helpers import small_npz

        npz = small_npz(SHARED_NPZ, root / "small.npz")
    rounds = 2 if quick else 4
    over = [*_overrides(quick), "teacher.head=local", f"federation.rounds={rounds}",
            "calibration.temperature=false", "calibration.ood=none"]
    procs = h.Procs()
    try:
        (root / "fed").mkdir()
        fed = _start_federation(h, npz, root / "fed", procs, worker=True)
        plain = _one(h, fed, procs, root, over, "plain")
        secure = _one(h, fed, procs, root, [*over, "privacy.secure_aggregation=true"],
                      "secure")
    finally:
        procs.stop_all()
    ratio = secure["steady_round_s"] / plain["steady_round_s"]
    traffic = secure["run_bytes"] / max(plain["run_bytes"], 1)
    keys = {
        "secagg_round_ratio": round(ratio, 2),
        "secagg_run_bytes_ratio": round(traffic, 3),
    }
    merge(out, "secagg", keys, {"plain": plain, "secure": secure, "quick": quick,
                                "settings": "; ".join(over)})
    print(table([
        ("steady round s, plain / secure",
         f"{plain['steady_round_s']:.1f} / {secure['steady_round_s']:.1f} "
         f"(load {plain['load']} / {secure['load']})"),
        ("model bytes up per round, plain / secure",
         f"{plain['bytes_up']:.0f} / {secure['bytes_up']:.0f}"),
        ("model bytes down per round, plain / secure",
         f"{plain['bytes_down']:.0f} / {secure['bytes_down']:.0f}"),
        ("whole run's traffic B, plain / secure (Flower's count)",
         f"{plain['run_bytes']} / {secure['run_bytes']}"),
        ("secagg_round_ratio", keys["secagg_round_ratio"]),
        ("secagg_run_bytes_ratio", keys["secagg_run_bytes_ratio"]),
    ]))
    return keys


def main() -> None:
    args = parser(__doc__).parse_args()
    run(args.quick, args.out, args.work)


if __name__ == "__main__":
    main()
