"""Deployment at simulation speed: a message's fixed cost, a round vs a simulated one.

    python -m benchmarks.deploy [--quick]

On loopback, a SuperLink and 2 SuperNodes with TLS and SuperNode auth
(`tests/deploy/harness.py`, `deploy/launch.py`), each SuperNode on one half of
the shared pneumonia file; the deployment preset (`simulations/configs/
deploy.yaml`) with a random ViT-S/14 teacher at 56 px (`--quick`: a tiny ViT at
32 px and a tiny student). Each SuperNode trains on its share of the cores
(`--num-threads`). The deployment is measured twice, one after the other:
with a warm site worker per SuperNode (`deploy.launch supernode --worker`,
client/worker.py) and a 0.2 s idle poll (`--poll 0.2`, deploy/supernode.py;
the headline keys), and as Flower ships it: a fresh ClientApp process per
message and the SuperNode's 3 s idle poll (the `_cold` keys).

- `deploy_message_fixed_s`: a throwaway ServerApp (our ClientApp unchanged)
  first sends the handshake, which fills each site's teacher cache, then sends
  one evaluate-only message to both sites at a time; the median round trip of
  these messages on a warm disk cache is the fixed cost of one message
  (process start, imports, site assembly from the caches, Flower's polling).
- `deploy_round_vs_sim_ratio`: the median steady round (`seconds` of the
  history rows after the first) of a deployed run, against the in-process
  simulated run of the same preset on the same file split into 2 IID sites,
  measured one after the other in this call.
- the per-phase profile of both kinds of message (`details.deploy.profile`,
  the table in BENCHMARKS.md, "Deployed round profile"): the slowest site's
  seconds per phase from the replies' `profile` records (common/timing.py),
  the median over the evaluate-only messages and over the steady rounds'
  train messages; `outside` is the server's round trip less that site's
  process (polls, transfers, process exit). `fab` times Flower's per-message
  FAB install (`install_from_fab` of this app, already installed).

Load (`os.getloadavg`) is recorded beside each figure: compare numbers taken
on an idle machine only.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._util import SHARED_NPZ, merge, parser, table, timed_run

PRESET = "simulations/configs/deploy.yaml"
SITES = ["hospital-a", "hospital-b"]
FAST_POLL = 0.2  # the warm deployment's SuperNode idle poll (seconds)

BENCH_SERVER = '''\
"""Benchmark ServerApp: handshake, then evaluate-only messages, timed."""
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from common import timing
from common.run_folder import config_from_run_config
from common.serialization import PROFILE_RECORD, pack
from server.exchange import exchange
from server.federation import handshake, initial_arrays

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = config_from_run_config(dict(context.run_config))
    count = int(context.run_config.get("messages", 3))
    t0 = time.perf_counter()
    infos, _ = handshake(grid, cfg, 2)  # SiteInfo by site name, names by node
    first = time.perf_counter() - t0
    dim = max(i.teacher_feature_dim for i in infos)
    n_cls = len(infos[0].classes)
    arrays = pack(initial_arrays(cfg, n_cls, infos[0].channels, dim))
    nodes = sorted(grid.get_node_ids())
    times, profiles = [], []
    for _ in range(count):
        msgs = [
            Message(
                content=RecordDict({
                    "arrays": arrays,
                    "config": ConfigRecord(
                        {"experiment": cfg.to_yaml(), "num-classes": n_cls}
                    ),
                }),
                dst_node_id=node,
                message_type=MessageType.EVALUATE,
            )
            for node in nodes
        ]
        t = time.perf_counter()
        replies = exchange(
            grid, msgs, timeout=600, poll_interval=cfg.federation.poll_interval
        )
        times.append(time.perf_counter() - t)
        assert not any(r.has_error() for r in replies), [
            r.error.reason for r in replies if r.has_error()
        ]
        profiles.append(
            [timing.from_metrics(dict(r.content[PROFILE_RECORD])) for r in replies]
        )
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "messages.json").write_text(
        json.dumps(
            {"handshake_s": first, "evaluate_s": times, "profiles": profiles}
        )
    )
'''


def _overrides(quick: bool, workload: str = "bench") -> list[str]:
    """The preset's settings for this benchmark (both modes use the same).

    `workload="preset"`: the deploy preset's own sizes (64 px, ViT-S/14 at
    112 px, random weights), where a round does more work per message.
    """
    common = [
        "teacher.weights=random",
        "data.image_size=28",
        "federation.round_timeout=900",
        "run.device=cpu",
    ]
    if workload == "preset":
        return [c for c in common if not c.startswith("data.image_size")]
    if quick:
        return [
            *common,
            "teacher.arch=vit_tiny_patch16_224",
            "teacher.image_size=32",
            "student.arch=fedkd_cnn_tiny",
        ]
    return [*common, "teacher.arch=vit_small_patch14_dinov2", "teacher.image_size=56"]


def _bench_app(root: Path, h) -> Path:
    """The real app with the benchmark ServerApp as its server component."""
    app = h.copy_real_app(root)
    (app / "fedkd_bench.py").write_text(BENCH_SERVER)
    py = app / "pyproject.toml"
    text = py.read_text().replace(
        'serverapp = "server.app:app"', 'serverapp = "fedkd_bench:app"'
    )
    # Flower only takes --run-config keys the app declares
    py.write_text(text.replace('overrides = ""', 'overrides = ""\nmessages = 3', 1))
    return app


def _start_federation(h, npz: Path, root: Path, procs, worker: bool):
    """SuperLink and two registered SuperNodes (TLS + auth), each with half of npz."""
    h.write_npz_halves(npz, root / "hospital-a.npz", root / "hospital-b.npz")
    fed = h.start_federation(root, procs, SITES)
    for site in SITES:
        fed.register(site)
    for site in SITES:
        fed.start_supernode(site, f"npz:{root / (site + '.npz')}", worker=worker,
                            poll=FAST_POLL if worker else None)
    fed.wait_online(2, timeout=120)
    kind = (f"a warm site worker each, {FAST_POLL:g} s idle poll" if worker
            else "a fresh process per message, Flower's 3 s idle poll")
    _say(f"federation up: SuperLink + 2 SuperNodes ({kind}), TLS + auth ({root})")
    return fed


def _wait(h, fed, procs, run_id, timeout: float, what: str) -> None:
    """Wait for run `run_id`; raise with the processes' logs unless it completed."""
    status = fed.wait_run(run_id, timeout)
    if status["status"] != "finished:completed":
        raise RuntimeError(f"{what} ended {status}\n{h.dump_logs(procs)}")


def _deployed(
    work: Path, npz: Path, over: list[str], rounds: int, messages: int,
    worker: bool,
) -> dict:
    """Start the loopback federation; time evaluate messages, then a real run."""
    from tests.deploy import harness as h

    root = work / ("deploy-warm" if worker else "deploy")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    procs = h.Procs()
    try:
        fed = _start_federation(h, npz, root, procs, worker)
        # 1. evaluate-only messages on a warm cache (the handshake warms it)
        out_msg = root / "messages"
        sets = ";".join([*over, f"run.out_dir={out_msg}"])
        app = _bench_app(root / "bench", h)
        run_id = fed.run(
            app, f'config-file="{PRESET}" overrides="{sets}" messages={messages}'
        )
        _wait(h, fed, procs, run_id, 1800, "benchmark run")
        msg = json.loads((out_msg / "messages.json").read_text())
        load_msg = os.getloadavg()[0]
        _say(
            f"handshake {msg['handshake_s']:.1f}s (fills the caches); evaluate "
            f"messages {[round(x, 2) for x in msg['evaluate_s']]} s"
        )
        # 2. a deployed run of the preset (the caches are warm by now)
        out_run = root / "run"
        sets = ";".join(
            [*over, f"federation.rounds={rounds}", f"run.out_dir={out_run}"]
        )
        real = h.copy_real_app(root / "real")
        t = time.perf_counter()
        run_id = fed.run(real, f'config-file="{PRESET}" overrides="{sets}"')
        _wait(h, fed, procs, run_id, 3600, "deployed run")
        wall = time.perf_counter() - t
        rows = _rows(out_run)
        _say(f"deployed rounds {[round(r['seconds'], 1) for r in rows]} s")
        return {
            "evaluate_s": msg["evaluate_s"],
            "evaluate_profiles": msg["profiles"],
            "handshake_s": msg["handshake_s"],
            "load_messages": round(load_msg, 2),
            "round_s": [r["seconds"] for r in rows],
            "train_s": [r["train_seconds"] for r in rows],
            "train_profiles": [_site_phases(r["sites"], "train/") for r in rows],
            "wall_s": wall,
            "load_rounds": round(os.getloadavg()[0], 2),
            "fab": fab_install(real),
        }
    finally:
        procs.stop_all()


def _site_phases(sites: dict, prefix: str) -> list[dict[str, float]]:
    """Each site's seconds per phase (`<prefix>t_<phase>_s` of a history row)."""
    from common import timing

    return [p for v in sites.values() if (p := timing.from_metrics(v, prefix))]


def message_profile(round_trip: float, sites: list[dict[str, float]]) -> dict:
    """One message's phases: its slowest site's, plus what lies outside them.

    `sites` holds each site's seconds per phase (`common.timing.from_metrics`);
    `outside` is the round trip the server saw less that site's process time
    (polls, transfers, process exit).
    """
    from common import timing

    slowest = max(sites, key=timing.wall_seconds)
    outside = round_trip - timing.wall_seconds(slowest)
    return {**slowest, "outside": outside, "round_trip": round_trip}


def median_profile(profiles: list[dict[str, float]]) -> dict[str, float]:
    """The median of each phase over messages (a phase a message lacks counts 0)."""
    keys = {k for p in profiles for k in p}
    return {
        k: round(statistics.median(p.get(k, 0.0) for p in profiles), 3)
        for k in sorted(keys)
    }


def fab_install(app: Path, repeats: int = 5) -> dict:
    """Flower's per-message FAB install of `app`, timed (installed once first).

    `flwr-clientapp` calls `install_from_fab` on every message: it unzips the
    whole FAB into a temporary folder, checks every file's hash, reads
    pyproject.toml and, the app being installed already, returns.
    """
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.install import install_from_fab

    fab = build_fab_from_disk(app)
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        install_from_fab(fab, install_dir=Path(tmp), skip_prompt=True)
        for _ in range(repeats):
            t = time.perf_counter()
            install_from_fab(fab, install_dir=Path(tmp), skip_prompt=True)
            times.append(time.perf_counter() - t)
    return {
        "fab_bytes": len(fab),
        "fab_files": len(zipfile.ZipFile(io.BytesIO(fab)).namelist()),
        "fab_install_s": round(statistics.median(times), 4),
    }


def profiles(dep: dict) -> dict[str, dict[str, float]]:
    """Median phases of the evaluate-only messages and of the steady train rounds."""
    evaluate = [
        message_profile(rt, sites)
        for rt, sites in zip(dep["evaluate_s"], dep["evaluate_profiles"], strict=True)
        if sites
    ]
    pairs = list(zip(dep["train_s"], dep["train_profiles"], strict=True))
    train = [message_profile(rt, sites) for rt, sites in pairs[1:] if sites]
    return {
        "evaluate": median_profile(evaluate) if evaluate else {},
        "train": median_profile(train) if train else {},
    }


def _say(text: str) -> None:
    print(f"[deploy bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


def _rows(run_dir: Path) -> list[dict]:
    from server import history

    return history.read_rows(run_dir / "history.jsonl")


def _simulated(work: Path, npz: Path, over: list[str], rounds: int) -> dict:
    """The same preset in the in-process engine, 2 IID sites of the same file."""
    sets = [
        *over,
        f"data.source=npz:{npz}",
        f"data.cache_dir={work / 'sim-data'}",
        f"teacher.cache_dir={work / 'sim-teacher'}",
        "partition.sites=2",
        "partition.scheme=iid",
        "run.engine=inprocess",
        f"federation.rounds={rounds}",
    ]
    wall, rounds_s = timed_run(sets, work / "sim", config=PRESET)
    return {
        "round_s": rounds_s,
        "wall_s": wall,
        "load_rounds": round(os.getloadavg()[0], 2),
    }


def _steady(xs: list[float]) -> float:
    """The median round after the first (which fills caches), or the only one."""
    return statistics.median(xs[1:] if len(xs) > 1 else xs)


def _fixed(dep: dict) -> float:
    """A deployment's fixed cost: the median evaluate-only round trip."""
    return round(statistics.median(dep["evaluate_s"]), 2)


def _ratio(dep: dict, sim: dict) -> float:
    """Steady deployed round over steady simulated round."""
    return round(_steady(dep["round_s"]) / _steady(sim["round_s"]), 2)


def _print_figures(dep: dict, cold: dict, sim: dict, profile: dict,
                   profile_cold: dict) -> None:
    """The headline figures of both deployments and their phase tables."""
    print(
        table(
            [
                (
                    "deploy_message_fixed_s",
                    f"{_fixed(dep)} (load {dep['load_messages']})",
                ),
                (
                    "deployed steady round s",
                    f"{_steady(dep['round_s']):.1f} (load {dep['load_rounds']})",
                ),
                (
                    "deploy_message_fixed_s_cold",
                    f"{_fixed(cold)} (load {cold['load_messages']})",
                ),
                (
                    "deployed steady round s, cold",
                    f"{_steady(cold['round_s']):.1f} (load {cold['load_rounds']})",
                ),
                (
                    "simulated steady round s",
                    f"{_steady(sim['round_s']):.1f} (load {sim['load_rounds']})",
                ),
                ("deploy_round_vs_sim_ratio", _ratio(dep, sim)),
                ("deploy_round_vs_sim_ratio_cold", _ratio(cold, sim)),
            ]
        )
    )
    print("warm site worker:")
    print(profile_table(profile))
    print("fresh process per message (cold):")
    print(profile_table(profile_cold))


def run(quick: bool, out: Path, work: Path, workload: str = "bench") -> dict:
    """Measure; merge deploy_message_fixed_s and deploy_round_vs_sim_ratio."""
    if not SHARED_NPZ.is_file():
        raise SystemExit(f"benchmarks.deploy needs {SHARED_NPZ}; it is absent")
    work = Path(work).resolve() / "deploy-bench"
    work.mkdir(parents=True, exist_ok=True)
    over = _overrides(quick, workload)
    rounds, messages = (3, 2) if quick else (4, 5)
    npz = SHARED_NPZ
    if quick:  # 240 train / 60 test images: both halves train in seconds
        from tests.helpers import small_npz

        npz = small_npz(SHARED_NPZ, work / "small.npz")
    load_start = round(os.getloadavg()[0], 2)
    cold = _deployed(work, npz, over, rounds, messages, worker=False)
    dep = _deployed(work, npz, over, rounds, messages, worker=True)
    _say("in-process simulation of the same preset ...")
    sim = _simulated(work, npz, over, rounds)
    fixed, ratio = _fixed(dep), _ratio(dep, sim)
    fixed_cold, ratio_cold = _fixed(cold), _ratio(cold, sim)
    profile = {**profiles(dep), "fab": dep["fab"]}
    profile_cold = {**profiles(cold), "fab": cold["fab"]}
    detail = {
        "settings": ("quick: " if quick else "") + "; ".join(over),
        "data": str(npz),
        "preset": PRESET,
        "rounds": rounds,
        "load_start": load_start,
        "deployed": dep,
        "deployed_cold": cold,
        "simulated": sim,
        "profile": profile,
        "profile_cold": profile_cold,
        "note": "2 SuperNodes on loopback, TLS + node auth, subprocess isolation, "
        "each SuperNode on its share of the cores (--num-threads); the headline "
        "keys with a warm site worker per SuperNode (deploy.launch supernode "
        f"--worker --poll {FAST_POLL:g}), the _cold keys with Flower's fresh "
        "process per message and its 3 s idle poll; "
        "fixed cost = median round trip of an evaluate-only message to both sites "
        "on a warm cache; ratio = median steady round, deployed / in-process",
    }
    suffix = "" if workload == "bench" else "_preset64"
    keys = {
        f"deploy_message_fixed_s{suffix}": fixed,
        f"deploy_round_vs_sim_ratio{suffix}": ratio,
        f"deploy_message_fixed_s_cold{suffix}": fixed_cold,
        f"deploy_round_vs_sim_ratio_cold{suffix}": ratio_cold,
    }
    if not quick:
        merge(out, f"deploy{suffix}", keys, detail)
    _print_figures(dep, cold, sim, profile, profile_cold)
    return {**keys, "detail": detail}


PHASE_ORDER = ("outside", "start", "import", "load", "worker", "config", "site")
PHASE_ORDER += ("features",)
PHASE_ORDER += ("eval", "head", "gate", "train", "reply", "handler", "round_trip")


def profile_table(profile: dict) -> str:
    """Seconds per phase: evaluate-only message | steady train message."""
    ev, tr = profile["evaluate"], profile["train"]
    rows = [("phase", "evaluate-only s | train s")]
    for k in PHASE_ORDER:
        if k in ev or k in tr:
            rows.append((k, f"{ev.get(k, 0.0):.2f} | {tr.get(k, 0.0):.2f}"))
    fab = profile["fab"]
    rows.append(
        (
            "(of start) FAB install",
            f"{fab['fab_install_s']:.3f} ({fab['fab_files']} files, "
            f"{fab['fab_bytes'] / 1e6:.2f} MB)",
        )
    )
    return table(rows)


def main() -> None:
    """Command-line entry: run, print, record (not with --quick)."""
    p = parser(__doc__)
    p.add_argument("--workload", choices=("bench", "preset"), default="bench",
                   help="bench: 28 px, ViT-S at 56 px (the headline keys); preset: "
                   "the deploy preset's 64 px and ViT-S at 112 px (keys *_preset64)")
    args = p.parse_args()
    # SIGTERM (e.g. `timeout`) must still stop the SuperLink and SuperNodes
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = None
    if args.quick:
        tmp = Path(tempfile.mkdtemp(prefix="fedkd-deploy-bench-"))
    try:
        run(args.quick, args.out, tmp or args.work, args.workload)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
