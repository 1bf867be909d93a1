"""Run one experiment on N virtual hospitals.

    python -m simulations.run --config simulations/configs/default.yaml \
        [--set section.key=value ...] [--resume RUN_DIR] [--debug]

Errors in the config, the data or the teacher are reported as one line and a
non-zero exit; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from common.config import ExperimentConfig, load_config
from common.errors import FedKDError

log = logging.getLogger("simulations.run")

DEFAULT_CONFIG = "simulations/configs/default.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(
        prog="python -m simulations.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        help=f"experiment YAML (default {DEFAULT_CONFIG}); not with --resume, "
        "which uses the run's own config.yaml",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config key (repeatable)",
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR from its last complete checkpoint",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def setup_logging(debug: bool) -> None:
    """Our progress at INFO; Flower's and Ray's chatter at WARNING."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for name in (
        "flwr",
        "ray",
        "filelock",
        "matplotlib",
        "PIL",
        "urllib3",
        "alembic",
        "huggingface_hub",
    ):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
    try:
        from flwr.common.logger import FLOWER_LOGGER

        FLOWER_LOGGER.setLevel(logging.DEBUG if debug else logging.WARNING)
    except ImportError:  # pragma: no cover - older Flower
        pass


def resolve(args: argparse.Namespace) -> tuple[ExperimentConfig, bool]:
    """The experiment config, from the file or from the run being resumed."""
    if args.resume:
        from common.run_folder import resume_config

        if args.config is not None:
            raise FedKDError(
                f"--config {args.config} cannot be used with --resume {args.resume}: "
                "a resumed run keeps its own config.yaml; drop --config, or start "
                "a new run without --resume"
            )
        return resume_config(Path(args.resume), args.overrides), True
    cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
    if cfg.train.num_threads == 0 and cfg.run.engine == "ray":
        # Each virtual site runs in its own single-core actor (see engine.py).
        cfg.train.num_threads = 1
    return cfg, False


def main(argv: list[str] | None = None) -> int:
    """Entry point: resolve, check, run, summarise."""
    args = parse_args(argv)
    setup_logging(args.debug)
    try:
        from common.run_folder import check_run_dir, prepare_run_dir
        from simulations.engine import simulate
        from simulations.preflight import preflight

        cfg, resume = resolve(args)
        # Check the folder, then the data and teacher, and only then create it:
        # a run that cannot start leaves nothing behind.
        check_run_dir(cfg, resume=resume)
        t0 = time.perf_counter()
        summary = preflight(cfg)
        print(summary, flush=True)
        run_dir = prepare_run_dir(cfg, resume=resume)
        print(f"run folder: {run_dir}", flush=True)
        simulate(cfg, run_dir, resume=resume)
        card = json.loads((run_dir / "final" / "model_card.json").read_text())
    except FedKDError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        # Flower wraps server-side failures; show the root cause on one line.
        root = err
        while root.__cause__ is not None:
            root = root.__cause__
        if args.debug:
            raise
        print(f"error: {root}", file=sys.stderr)
        return 1
    m = card["metrics"]

    def fmt(key: str) -> str:
        return f"{m[key]:.4f}" if isinstance(m.get(key), (int, float)) else "n/a"

    print(
        f"done in {time.perf_counter() - t0:.0f}s: site-mean acc "
        f"{fmt('site_mean_acc')}, global acc {fmt('global_acc')}; teacher weights: "
        f"{card['teacher']['weights_source']}"
    )
    if card["teacher"]["weights_source"] == "random":
        print("WARNING: teacher was RANDOM-INIT; these numbers test the pipeline only")
    print(
        f"outputs: {run_dir}/history.jsonl, {run_dir}/accuracy.png, "
        f"{run_dir}/final/model.pt, {run_dir}/final/model_card.md"
    )
    dp, dp_sgd = card["method"]["dp"], card["method"].get("dp_sgd") or {}
    if dp.get("enabled") or dp_sgd.get("enabled"):
        from server.privacy import describe, describe_per_patient

        if dp.get("enabled"):
            print(f"privacy: {describe(dp)}")
        if dp_sgd.get("enabled"):
            print(f"privacy: {describe_per_patient(dp_sgd)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
