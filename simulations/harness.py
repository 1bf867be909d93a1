"""Compare methods on heterogeneous simulated hospitals, over seeds, and report.

    python -m simulations.harness \
        --experiment simulations/experiments/br35h_proxy.yaml \
        [--out docs/results/br35h] [--work runs/harness] [--seeds 0 1 2 3 4] \
        [--set k=v ...] [--report-only]

An experiment file names the base overrides, the methods (each a set of
overrides on the base), the seeds and optionally a sweep axis. Every (method,
seed, sweep value) is one ordinary run of `simulations.run`, so all methods go
through the same ClientApp/ServerApp code; finished runs are skipped, so an
interrupted comparison resumes. The teacher probe is read from the KD runs'
evaluation (the teacher's head on each site's test part).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.config import load_config, safe_load_unique
from common.errors import ConfigError, FedKDError

log = logging.getLogger(__name__)

EXPERIMENT_KEYS = {"name", "description", "base", "methods", "seeds", "sweep",
                   "proxy_teacher", "report"}
# report: last_k (rounds in the last-k means), anchor ([federated, pooled] IID
# sanity pair), references (methods every other method is also compared with)
REPORT_KEYS = {"last_k", "anchor", "references", "experiment_path"}


@dataclass
class Experiment:
    """A parsed experiment file."""

    name: str
    base: dict[str, Any]
    methods: dict[str, dict[str, Any]]
    seeds: list[int]
    description: str = ""
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    proxy_teacher: dict[str, Any] | None = None
    report: dict[str, Any] = field(default_factory=dict)


def load_experiment(path: str | Path) -> Experiment:
    """Read and check an experiment YAML (keys, methods, seeds, sweep)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment file not found: {p}")
    try:
        # duplicate keys (two `methods:` blocks) are an error, not "last wins"
        data = safe_load_unique(p.read_text()) or {}
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else "parse error"
        raise ConfigError(f"experiment file {p}: {first}; keep one key of each "
                          "name and valid YAML") from err
    unknown = set(data) - EXPERIMENT_KEYS
    if unknown:
        raise ConfigError(f"unknown experiment keys {sorted(unknown)} in {p}; valid: "
                          f"{', '.join(sorted(EXPERIMENT_KEYS))}")
    if not data.get("methods"):
        raise ConfigError(f"{p}: 'methods' must map method names to overrides")
    sweep = data.get("sweep") or {}
    if len(sweep) > 1:
        raise ConfigError(f"{p}: one sweep axis at most, got {sorted(sweep)}")
    report = dict(data.get("report") or {})
    if set(report) - REPORT_KEYS:
        raise ConfigError(f"unknown report keys {sorted(set(report) - REPORT_KEYS)} "
                          f"in {p}; valid: {', '.join(sorted(REPORT_KEYS))}")
    anchor = report.get("anchor")
    if anchor is not None and (not isinstance(anchor, list) or len(anchor) != 2):
        raise ConfigError(f"{p}: report.anchor must name two methods "
                          f"[federated, pooled], got {anchor!r}")
    exp = Experiment(
        name=str(data.get("name", p.stem)),
        description=str(data.get("description", "")),
        base=dict(data.get("base") or {}),
        methods={str(k): dict(v or {}) for k, v in data["methods"].items()},
        seeds=[int(s) for s in data.get("seeds", [0, 1, 2])],
        sweep={str(k): list(v) for k, v in sweep.items()},
        proxy_teacher=data.get("proxy_teacher"),
        report=report,
    )
    # Fail now, not after an hour: every run's config must resolve.
    for _, overrides in _runs(exp, Path("."), {}):
        load_config(None, overrides)
    return exp


def _as_overrides(d: dict[str, Any]) -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, bool):
            v = str(v).lower()
        out.append(f"{k}={v}")
    return out


def _runs(exp: Experiment, work: Path, extra: dict[str, Any],
          per_seed: dict[int, dict[str, Any]] | None = None,
          ) -> list[tuple[dict[str, Any], list[str]]]:
    """(run descriptor, overrides) for every (sweep value, method, seed).

    `per_seed` adds overrides that depend on the seed only (the proxy teacher
    trained on that seed's public pool).
    """
    axis = next(iter(exp.sweep), None)
    values = exp.sweep[axis] if axis else [None]
    runs = []
    for value, (method, m_over), seed in itertools.product(
            values, exp.methods.items(), exp.seeds):
        # a method's own overrides win over the seed's proxy teacher (a method
        # may name another teacher, e.g. a random-init one)
        merged = {**exp.base, **(per_seed or {}).get(seed, {}), **extra, **m_over,
                  "train.seed": seed}
        if axis is not None:
            merged[axis] = value
        tag = f"{axis.split('.')[-1]}-{value}/" if axis else ""
        out_dir = work / exp.name / f"{tag}{method}" / f"seed-{seed}"
        merged["run.out_dir"] = str(out_dir)
        merged.setdefault("run.name", f"{exp.name}/{tag}{method}/seed-{seed}")
        desc = {"method": method, "seed": seed, "sweep_key": axis,
                "sweep_value": value, "run_dir": str(out_dir)}
        runs.append((desc, _as_overrides(merged)))
    return runs


def proxy_config(exp: Experiment, extra: dict[str, Any], seed: int):
    """The config a seed's proxy teacher is trained under (its public pool)."""
    return load_config(None, _as_overrides({**exp.base, **extra, "train.seed": seed}))


def proxies(exp: Experiment, extra: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Train (or reuse) one proxy teacher per seed; the overrides that load each.

    Each seed moves the public pool, the sites and the splits, so each seed
    gets its own proxy, trained only on that seed's pool (cached by seed).
    """
    if not exp.proxy_teacher:
        return {}
    if "teacher.weights" in extra:  # an explicit teacher (hub, file:) replaces it
        print(f"teacher.weights={extra['teacher.weights']}: no proxy teacher")
        return {}
    from simulations.proxy_teacher import train_proxy

    spec = dict(exp.proxy_teacher)
    unknown = set(spec) - {"arch", "epochs", "augment", "variants"}
    if unknown:
        raise ConfigError(f"unknown proxy_teacher keys {sorted(unknown)}; valid: "
                          "arch, epochs, augment, variants")
    arch = str(spec.get("arch", "resnet18"))
    epochs = int(spec.get("epochs", 15))
    aug = {"augment": str(spec.get("augment", "flip")),
           "variants": int(spec.get("variants", 8))}
    out = {}
    for seed in exp.seeds:
        path, summary = train_proxy(proxy_config(exp, extra, seed), arch, epochs,
                                    **aug)
        how = "reused" if summary.get("reused") else "trained"
        print(f"proxy teacher {arch} for seed {seed}: {path} ({how})", flush=True)
        out[seed] = {"teacher.arch": arch, "teacher.weights": f"file:{path}"}
    return out


def run_all(exp: Experiment, work: Path, extra: dict[str, Any]) -> list[dict]:
    """Run every missing (method, seed, sweep value); return the descriptors."""
    from simulations.run import main as run_main

    descs = []
    runs = _runs(exp, work, extra, proxies(exp, extra))
    for i, (desc, overrides) in enumerate(runs, 1):
        done = Path(desc["run_dir"]) / "final" / "model_card.json"
        label = f"[{i}/{len(runs)}] {desc['method']} seed {desc['seed']}"
        if desc["sweep_key"]:
            label += f" {desc['sweep_key']}={desc['sweep_value']}"
        if done.is_file():
            print(f"{label}: done earlier, skipped")
        else:
            print(f"{label}: running", flush=True)
            run_dir = Path(desc["run_dir"])
            if run_dir.exists() and (run_dir / "checkpoints" / "latest.pt").is_file():
                code = run_main(["--resume", str(run_dir)])
            else:
                code = run_main([x for o in overrides for x in ("--set", o)])
            if code != 0:
                raise FedKDError(f"run {desc['run_dir']} failed (exit {code}); "
                                 "see its output above")
        descs.append(desc)
    return descs


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the comparison, then write the report."""
    p = argparse.ArgumentParser(prog="python -m simulations.harness",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", required=True)
    p.add_argument("--out", help="report folder (default: <work>/<name>/report)")
    p.add_argument("--work", default="runs/harness", help="folder for the runs")
    p.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="extra override applied to every run (repeatable)")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from finished runs; run nothing")
    args = p.parse_args(argv)
    from simulations.report import write_report

    try:
        exp = load_experiment(args.experiment)
        exp.report.setdefault("experiment_path", args.experiment)
        if args.seeds:
            exp.seeds = args.seeds
        extra = {}
        for item in args.overrides:
            key, _, value = item.partition("=")
            extra[key.strip()] = yaml.safe_load(value)
        work = Path(args.work)
        if args.report_only:
            descs = [d for d, _ in _runs(exp, work, extra)]
        else:
            descs = run_all(exp, work, extra)
        out = Path(args.out) if args.out else work / exp.name / "report"
        summary = write_report(exp, descs, out)
    except FedKDError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary)
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

