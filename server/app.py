"""The Flower ServerApp: a thin entry over `server.federation`."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import run_federation
from server.run_folder import config_from_run_config, prepare_run_dir

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Resolve the experiment from the run config and run the federation."""
    run_config = dict(context.run_config)
    cfg = config_from_run_config(run_config)
    resume = str(run_config.get("resume", "")).lower() in ("1", "true", "yes")
    run_dir = prepare_run_dir(cfg, resume=resume)
    expected = int(run_config.get("expected-sites", cfg.federation.min_sites))
    run_federation(grid, cfg, run_dir, resume=resume, expected_sites=expected)
