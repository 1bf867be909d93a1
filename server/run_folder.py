"""Run folders: resolve the experiment for a run and never overwrite old results."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_bytes
from common.config import (
    ExperimentConfig,
    config_from_yaml_text,
    load_config,
    split_overrides,
)
from common.errors import CheckpointError

log = logging.getLogger(__name__)

APP_ROOT = Path(__file__).resolve().parents[1]


def config_from_run_config(run_config: dict[str, Any]) -> ExperimentConfig:
    """The experiment named by Flower's run config (pyproject / --run-config)."""
    if run_config.get("config-yaml"):
        return config_from_yaml_text(str(run_config["config-yaml"]))
    path = Path(str(run_config.get("config-file", "simulations/configs/default.yaml")))
    if not path.is_absolute():
        path = APP_ROOT / path
    return load_config(path, split_overrides(str(run_config.get("overrides", ""))))


def check_run_dir(cfg: ExperimentConfig, *, resume: bool = False) -> Path:
    """The run folder, if it can be used; nothing is created (cheap, call first)."""
    run_dir = Path(cfg.run.out_dir).expanduser()
    if resume:
        if not (run_dir / "checkpoints" / "latest.pt").is_file():
            raise CheckpointError(
                f"cannot resume {run_dir}: no checkpoints/latest.pt; start a new run"
            )
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.run.overwrite:
        raise CheckpointError(
            f"run folder {run_dir} is not empty; choose another --set run.out_dir=... "
            "or resume it with --resume"
        )
    return run_dir


def prepare_run_dir(cfg: ExperimentConfig, *, resume: bool = False) -> Path:
    """Create the run folder and write config.yaml; refuse to clobber a used one."""
    run_dir = check_run_dir(cfg, resume=resume)
    if resume:
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "config.yaml", cfg.to_yaml().encode())
    return run_dir
