"""The Flower ServerApp: a thin entry over `server.federation`."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.run_folder import config_from_run_config, prepare_run_dir
from server.federation import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Resolve the experiment from the run config and run the federation."""
    _forward_logs()
    run_config = dict(context.run_config)
    cfg = config_from_run_config(run_config)
    resume = str(run_config.get("resume", "")).lower() in ("1", "true", "yes")
    run_dir = prepare_run_dir(cfg, resume=resume)
    expected = int(run_config.get("expected-sites", cfg.federation.min_sites))
    run_federation(grid, cfg, run_dir, resume=resume, expected_sites=expected)


def _forward_logs() -> None:
    """Show our INFO lines where operators look: `flwr log` and `flwr run --stream`.

    A deployed ServerApp process configures no logging, so our loggers' INFO
    lines would be dropped; Flower forwards its own console handler's output
    to the SuperLink, so they use that handler. Where logging is configured
    already (simulations.run), nothing changes.
    """
    if logging.getLogger().handlers:
        return
    from flwr.common.logger import console_handler

    for name in ("server", "common"):
        logger = logging.getLogger(name)
        if console_handler not in logger.handlers:
            logger.addHandler(console_handler)
        logger.setLevel(logging.INFO)
