"""Run a federation on Flower's Simulation Engine, in-process and offline.

Uses only Flower's public `run_simulation`: the ServerApp is built here around
the resolved experiment, the ClientApp is the deployed one (`client.app:app`),
so simulation and deployment share every line of site and server logic.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from common.config import ExperimentConfig

log = logging.getLogger(__name__)


def flower_env(run_dir: Path) -> None:
    """Keep Flower's state inside the run folder and its telemetry off."""
    os.environ.setdefault("FLWR_HOME", str(Path(run_dir).resolve() / ".flwr"))
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def backend_config(cfg: ExperimentConfig) -> dict:
    """Ray resources: one CPU per virtual site, as many actors as cores."""
    cpus = os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cpus,
            "num_gpus": 0,
            "include_dashboard": False,
            "logging_level": "ERROR",
            "log_to_driver": True,
            # The object store only carries messages (a few MB); keep it small.
            "object_store_memory": 256 * 1024 * 1024,
        },
    }


def threads_per_site(cfg: ExperimentConfig) -> int:
    """Torch threads per actor so that concurrent sites do not oversubscribe."""
    if cfg.train.num_threads > 0:
        return cfg.train.num_threads
    return 1  # one actor per core, one thread each


def simulate(cfg: ExperimentConfig, run_dir: Path, *, resume: bool = False) -> None:
    """Run (or resume) the experiment with `partition.sites` virtual hospitals."""
    flower_env(run_dir)
    # Imported late so FLWR_HOME is set before Flower reads it.
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from common.data.sites import simulated_nodes
    from server.federation import run_federation

    nodes = simulated_nodes(cfg.federation.strategy, cfg.partition.sites)
    if cfg.run.engine == "inprocess":
        from simulations.inprocess import InProcessGrid

        grid = InProcessGrid(client_app, nodes)
        run_federation(grid, cfg, run_dir, resume=resume, expected_sites=nodes)
        return

    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:  # noqa: ANN001 - Flower's signature
        run_federation(grid, cfg, run_dir, resume=resume, expected_sites=nodes)

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=nodes,
        backend_config=backend_config(cfg),
    )
