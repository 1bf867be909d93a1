"""Loopback federation harness: real SuperLink/SuperNode processes, TLS + auth.

Every process is started in its own session (process group) and killed by
group on teardown; every wait has a hard deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deploy import credentials, launch

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None
              ) -> None:
    """Wait until something accepts on 127.0.0.1:port (or fail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before "
                               f"port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"port {port} did not open within {timeout:.0f}s")


@dataclass
class Procs:
    """Processes started by a test; ``stop_all`` kills each process group."""

    procs: list[tuple[str, subprocess.Popen, Path]] = field(default_factory=list)
    # folders to remove once every process is stopped (the workers' sockets)
    folders: list[Path] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str],
              log_dir: Path, cwd: Path | None = None) -> subprocess.Popen:
        log_path = log_dir / f"{name}.log"
        handle = log_path.open("wb")
        proc = subprocess.Popen(argv, env=env, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=cwd)
        handle.close()
        self.procs.append((name, proc, log_path))
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 5.0) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        try:  # children (superexec, app processes) share the group
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass

    def stop_all(self) -> None:
        for _, proc, _ in reversed(self.procs):
            self.stop(proc)
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)

    def log(self, name: str) -> str:
        for pname, _, path in self.procs:
            if pname == name:
                return path.read_text(errors="replace")
        raise KeyError(name)


# ------------------------------------------------------------------- data
def write_npz_halves(src: Path, out_a: Path, out_b: Path, seed: int = 0
                     ) -> None:
    """Two disjoint halves of a MedMNIST .npz, same layout (keys, dtypes)."""
    data = np.load(src)
    rng = np.random.default_rng(seed)
    parts: tuple[dict, dict] = ({}, {})
    for split in ("train", "val", "test"):
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        order = rng.permutation(len(images))
        half = len(order) // 2
        for part, idx in zip(parts, (order[:half], order[half:]), strict=True):
            idx = np.sort(idx)
            part[f"{split}_images"] = images[idx]
            part[f"{split}_labels"] = labels[idx]
    np.savez_compressed(out_a, **parts[0])
    np.savez_compressed(out_b, **parts[1])


# ---------------------------------------------------------------- apps
TINY_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyapp"
version = "0.1.0"
dependencies = []

[tool.flwr.app]
publisher = "fedkdtest"

[tool.flwr.app.components]
serverapp = "tinyapp.server:app"
clientapp = "tinyapp.client:app"

[tool.flwr.app.config]
num-rounds = 2
out-dir = ""
"""

TINY_SERVER = '''\
"""Tiny ServerApp: FedAvg on a 2-parameter numpy model; writes history."""
import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["out-dir"]))
    rounds = int(context.run_config["num-rounds"])
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    strategy = FedAvg(fraction_evaluate=1.0, min_train_nodes=2,
                      min_evaluate_nodes=2, min_available_nodes=2)
    t0 = time.time()
    result = strategy.start(grid=grid,
                            initial_arrays=ArrayRecord([np.zeros(2)]),
                            num_rounds=rounds, timeout=120)
    weights = result.arrays.to_numpy_ndarrays()[0]
    np.save(out / "checkpoints" / "latest.npy", weights)
    with (out / "history.jsonl").open("w") as fh:
        for rnd, metrics in sorted(result.train_metrics_clientapp.items()):
            fh.write(json.dumps({"round": rnd, **dict(metrics)}) + "\\n")
    (out / "done.json").write_text(json.dumps(
        {"weights": weights.tolist(), "seconds": time.time() - t0}))
'''

TINY_CLIENT = '''\
"""Tiny ClientApp: moves the weights towards its site's data mean."""
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _target(context: Context) -> tuple[np.ndarray, int]:
    source = str(context.node_config["data-source"])
    data = np.load(Path(source.removeprefix("npz:")))
    images = data["train_images"].astype(np.float64) / 255.0
    return np.array([images.mean(), images.std()]), len(images)


@app.train()
def train(msg: Message, context: Context) -> Message:
    weights = msg.content["arrays"].to_numpy_ndarrays()[0]
    target, n = _target(context)
    new = weights + 0.5 * (target - weights)
    return Message(RecordDict({
        "arrays": ArrayRecord([new]),
        "metrics": MetricRecord({"num-examples": n,
                                 "loss": float(((new - target) ** 2).sum())}),
    }), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    weights = msg.content["arrays"].to_numpy_ndarrays()[0]
    target, n = _target(context)
    return Message(RecordDict({"metrics": MetricRecord(
        {"num-examples": n, "loss": float(((weights - target) ** 2).sum())})}),
        reply_to=msg)
'''


def make_tiny_app(root: Path) -> Path:
    """Write the throwaway 2-parameter FedAvg app; returns its folder."""
    app = root / "tinyapp-project"
    pkg = app / "tinyapp"
    pkg.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(TINY_PYPROJECT)
    (pkg / "__init__.py").write_text("")
    (pkg / "server.py").write_text(TINY_SERVER)
    (pkg / "client.py").write_text(TINY_CLIENT)
    return app


def copy_real_app(root: Path) -> Path:
    """Copy the project's Flower app (code + configs) to ``root/fedkd-app``.

    ``flwr run`` rewrites a pyproject.toml that still has
    ``[tool.flwr.federations]`` (it migrates them to FLWR_HOME and comments the
    section out), so the e2e test never runs it on the repository itself.
    """
    app = root / "fedkd-app"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "tests")
    for pkg in ("common", "client", "server", "simulations"):
        if (REPO / pkg).is_dir():
            shutil.copytree(REPO / pkg, app / pkg, ignore=ignore)
    lines, skip = [], False
    for line in (REPO / "pyproject.toml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            skip = stripped.startswith("[tool.flwr.federations")
        if not skip:
            lines.append(line)
    (app / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return app


# ----------------------------------------------------------- federation
@dataclass
class Federation:
    """A SuperLink with TLS + SuperNode auth on loopback, plus helpers."""

    root: Path
    procs: Procs
    creds: Path
    port: int
    env: dict[str, str]
    link: subprocess.Popen | None = None
    # the SuperNodes share this machine's CPUs: each site trains on its share
    # (torch threads of two sites on the same cores slow both several-fold)
    node_threads: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def flwr(self, *args: str, timeout: float = 60.0,
             cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout,
                              cwd=cwd or self.root)

    def register(self, name: str) -> str:
        res = self.flwr("supernode", "register", str(self.creds / f"{name}.pub"),
                        "fedkd", "--name", name, "--format", "json")
        assert res.returncode == 0, res.stdout + res.stderr
        return str(json.loads(res.stdout[res.stdout.index("{"):])["node-id"])

    def nodes(self) -> list[dict]:
        res = self.flwr("supernode", "ls", "fedkd", "--format", "json")
        assert res.returncode == 0, res.stdout + res.stderr
        return json.loads(res.stdout[res.stdout.index("{"):])["nodes"]

    def start_worker(self, name: str) -> Path:
        """A warm site worker for SuperNode `name`; its socket once it is up."""
        folder = Path(tempfile.mkdtemp(prefix="fedkd-", dir="/tmp"))
        self.procs.folders.append(folder)
        sock = folder / "w.sock"
        proc = self.procs.start(f"worker-{name}",
                                launch.worker_argv(sock, os.getpid()),
                                {**self.env}, self.root)
        deadline = time.monotonic() + 120
        while not sock.is_socket():
            assert proc.poll() is None, dump_logs(self.procs)
            assert time.monotonic() < deadline, "site worker not up in 120 s"
            time.sleep(0.1)
        return sock

    def start_supernode(self, name: str, data_source: str, *,
                        ca: bool = True, max_retries: int | None = None,
                        worker: bool = False,
                        poll: float | None = None) -> subprocess.Popen:
        home = self.root / f"node-{name}"
        cache = home / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        sock = self.start_worker(name) if worker else None
        spec = launch.SuperNodeSpec(
            superlink=self.address,
            node=launch.NodeConfig(name, data_source, cache, self.node_threads,
                                   sock),
            ca_cert=self.creds / "ca.crt", private_key=self.creds / f"{name}.key",
            port=free_port(), max_retries=max_retries, poll=poll,
        )
        argv = launch.supernode_argv(spec)
        if not ca:  # negative test: no --root-certificates
            i = argv.index("--root-certificates")
            del argv[i:i + 2]
        env = launch.launch_env(home / "flwr-home", base=self.env)
        return self.procs.start(f"supernode-{name}", argv, env, self.root,
                                cwd=home)

    def wait_online(self, count: int, timeout: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        nodes: list[dict] = []
        while time.monotonic() < deadline:
            nodes = self.nodes()
            if sum(n.get("status") == "online" for n in nodes) >= count:
                return nodes
            time.sleep(1.0)
        raise TimeoutError(f"{count} SuperNodes not online in {timeout}s: {nodes}")

    def run(self, app: Path, run_config: str) -> int:
        res = self.flwr("run", str(app), "fedkd", "--run-config", run_config,
                        "--format", "json", timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        return int(json.loads(res.stdout[res.stdout.index("{"):])["run-id"])

    def run_status(self, run_id: int) -> dict:
        res = self.flwr("ls", "fedkd", "--run-id", str(run_id), "--format",
                        "json")
        assert res.returncode == 0, res.stdout + res.stderr
        runs = json.loads(res.stdout[res.stdout.index("{"):])["runs"]
        return runs[0]

    def wait_run(self, run_id: int, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        status: dict = {}
        while time.monotonic() < deadline:
            status = self.run_status(run_id)
            if str(status.get("status", "")).startswith("finished"):
                return status
            time.sleep(2.0)
        raise TimeoutError(f"run {run_id} not finished in {timeout}s: {status}")


def start_federation(root: Path, procs: Procs, node_names: list[str]
                     ) -> Federation:
    """Credentials, a TLS + auth SuperLink on a free port, flwr config.toml."""
    creds = root / "creds"
    credentials.create_all(creds, nodes=node_names)
    port = free_port()
    home = root / "flwr-home"
    env = launch.launch_env(home)
    spec = launch.SuperLinkSpec(
        state_dir=root, ca_cert=creds / "ca.crt", cert=creds / "superlink.crt",
        key=creds / "superlink.key", host="127.0.0.1", port=port,
    )
    cpus = len(os.sched_getaffinity(0))
    fed = Federation(root=root, procs=procs, creds=creds, port=port, env=env,
                     node_threads=max(1, cpus // len(node_names)))
    fed.link = procs.start("superlink", launch.superlink_argv(spec), env, root,
                           cwd=root)
    wait_port(port, 60, fed.link)
    launch.write_connection(home, "fedkd", fed.address, creds / "ca.crt")
    return fed


def dump_logs(procs: Procs) -> str:
    """All process logs (tails), for assertion messages."""
    parts = []
    for name, _, path in procs.procs:
        text = path.read_text(errors="replace") if path.exists() else ""
        parts.append(f"----- {name}\n{text[-4000:]}")
    return "\n".join(parts)
