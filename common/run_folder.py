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


# What `--resume` may change: where and how fast the run executes, never what
# it trains on, what it trains or how (data, model, method).
RESUME_MAY_CHANGE = (
    "run.engine",
    "run.device",
    "train.num_threads",
    "federation.round_timeout",
    "federation.poll_interval",
    "federation.max_round_retries",
    "data.cache_dir",
    "teacher.cache_dir",
)
FINISHED_MARK = Path("final") / "model_card.json"  # written last by `finish`


def _flat(cfg: ExperimentConfig) -> dict[str, Any]:
    return {
        f"{sec}.{key}": value
        for sec, values in cfg.to_dict().items()
        for key, value in values.items()
    }


def resume_config(run_dir: Path, overrides: list[str]) -> ExperimentConfig:
    """The stored config of `run_dir` plus overrides that leave the run the same.

    Any override that changes the data, the model or the method is refused:
    the rounds still to run would train something other than what config.yaml,
    the checkpoints and the model card describe.
    """
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"cannot resume {run_dir}: no config.yaml in it")
    stored = load_config(cfg_path)
    asked = load_config(cfg_path, overrides)
    before, after = _flat(stored), _flat(asked)
    changed = [k for k in after if after[k] != before[k] and k != "run.out_dir"]
    refused = [k for k in changed if k not in RESUME_MAY_CHANGE]
    if refused:
        key = refused[0]
        raise CheckpointError(
            f"cannot resume {run_dir} with {key}={after[key]!r}: the run was made "
            f"with {key}={before[key]!r} and a resume must not change its data, "
            "model or method; start a new run (--config ... --set run.out_dir=...)"
            f" or change only {', '.join(RESUME_MAY_CHANGE)}"
        )
    asked.run.out_dir = str(run_dir)
    return asked


def check_run_dir(cfg: ExperimentConfig, *, resume: bool = False) -> Path:
    """The run folder, if it can be used; nothing is created (cheap, call first)."""
    run_dir = Path(cfg.run.out_dir).expanduser()
    if (run_dir / FINISHED_MARK).is_file():
        raise CheckpointError(
            f"run folder {run_dir} holds a finished run ({FINISHED_MARK} exists); "
            f"{'--resume' if resume else 'run.overwrite=true'} would overwrite its "
            "results: start a new run with --set run.out_dir=<new folder>"
        )
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
