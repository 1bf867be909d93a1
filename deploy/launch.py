"""Build and run the flower-superlink / flower-supernode command lines.

The pure ``*_argv`` / ``*_env`` functions build what is run (unit-tested);
``main`` is a thin CLI over them::

    python -m deploy.launch superlink --creds creds --state /var/lib/fedkd \\
        --host 0.0.0.0 --port 9093
    python -m deploy.launch supernode --superlink link.example.org:9093 \\
        --ca creds/ca.crt --key creds/hospital-a.key --site hospital-a \\
        --data-source npz:/data/pneumonia.npz --cache-dir /var/cache/fedkd \\
        --state /var/lib/fedkd-node
    python -m deploy.launch connection --flwr-home ~/.fedkd-flwr --name fedkd \\
        --address link.example.org:9093 --ca creds/ca.crt

``--dry-run`` prints the command (and the environment it sets) instead of
running it. Otherwise the launcher ``exec``s Flower in place, so systemd sees
Flower's own exit status and signals reach it directly.

flwr 1.42 facts this relies on (read from the installed sources):

* The SuperLink serves the Fleet, Control and Runtime APIs over one HTTPS
  port (``--host``/``--port``; 8000 by default) with ``--ssl-ca-certfile``,
  ``--ssl-certfile`` and ``--ssl-keyfile``. It starts ``flower-superexec``
  from ``PATH`` to run the ServerApp (``--isolation subprocess``).
* The SuperNode verifies the SuperLink with ``--root-certificates`` (without it
  the system trust store is used, which does not hold the federation CA) and
  authenticates with an ECDSA key in OpenSSH format
  (``--auth-supernode-private-key``). It also serves its own local Runtime API
  on ``--host``/``--port`` (9094 by default): two SuperNodes on one machine
  need two ports.
* The ``flwr`` CLI reads SuperLink connections from ``$FLWR_HOME/config.toml``
  (``[superlink.<name>] address=..., root-certificates=...``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from deploy.supernode import check_poll

log = logging.getLogger(__name__)

INSECURE_ACK_FLAG = "--i-understand-this-is-insecure"
DEFAULT_SUPERLINK_PORT = 9093
DEFAULT_SUPERNODE_PORT = 9094
STATE_DB = "superlink-state.db"
# seconds between the SuperExec's looks for work (Flower's default: 1.0)
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


class LaunchError(Exception):
    """The launch was refused; the message names what to fix."""


# ------------------------------------------------------------------- helpers
def flower_executable(name: str) -> str:
    """Path of a Flower console script, preferring this interpreter's venv."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise LaunchError(
            f"{name} not found next to {sys.executable} nor on PATH; "
            "install flwr==1.42.0 in this environment"
        )
    return found


def launch_env(flwr_home: Path, base: Mapping[str, str] | None = None
               ) -> dict[str, str]:
    """Environment for Flower processes: own FLWR_HOME, telemetry off.

    The interpreter's bin folder is put first on PATH because the SuperLink and
    the SuperNode start ``flower-superexec`` by name. That SuperExec looks for
    a message to start an app process for once a second by default
    (flwr/supercore/superexec/run_superexec.py), which a SuperNode pays on
    every message; 0.2 s unless the environment already sets it.
    """
    env = dict(os.environ if base is None else base)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env.setdefault(SUPEREXEC_POLL_ENV, "0.2")
    bin_dir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        env["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir
    return env


def _require_file(path: Path | None, what: str, flag: str) -> Path:
    if path is None:
        raise LaunchError(f"{what} missing; pass {flag} <file>")
    if not path.is_file():
        raise LaunchError(
            f"{what} {path} does not exist or is not a file; fix {flag} "
            "(create it with `python -m deploy.credentials`)"
        )
    return path


# ----------------------------------------------------------------- SuperLink
@dataclass(frozen=True)
class SuperLinkSpec:
    """What a SuperLink is started with."""

    state_dir: Path
    ca_cert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    host: str = "0.0.0.0"
    port: int = DEFAULT_SUPERLINK_PORT
    insecure: bool = False
    i_understand_insecure: bool = False
    log_file: Path | None = None
    health_address: str | None = None


def superlink_argv(spec: SuperLinkSpec, executable: str | None = None
                   ) -> list[str]:
    """The flower-superlink command line: TLS, SuperNode auth, a state DB.

    Refuses ``insecure`` unless ``i_understand_insecure`` (then TLS and
    SuperNode authentication are off: Flower requires TLS for node auth).
    """
    exe = executable or flower_executable("flower-superlink")
    argv = [exe]
    if spec.insecure:
        if not spec.i_understand_insecure:
            raise LaunchError(
                "refusing to start the SuperLink with --insecure (no TLS, no "
                "SuperNode authentication, model updates readable on the wire); "
                f"drop --insecure, or add {INSECURE_ACK_FLAG} for a throwaway test"
            )
        log.warning("SuperLink starts INSECURE: no TLS, no SuperNode auth")
        argv.append("--insecure")
    else:
        ca = _require_file(spec.ca_cert, "CA certificate", "--ca")
        cert = _require_file(spec.cert, "SuperLink certificate", "--cert")
        key = _require_file(spec.key, "SuperLink private key", "--key")
        argv += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert),
                 "--ssl-keyfile", str(key), "--enable-supernode-auth"]
    argv += [
        "--database", str(spec.state_dir / STATE_DB),
        "--disable-runtime-dependency-installation",
        "--isolation", "subprocess",
        "--host", spec.host,
        "--port", str(spec.port),
    ]
    if spec.log_file is not None:
        argv += ["--log-file", str(spec.log_file)]
    if spec.health_address:
        argv += ["--health-server-address", spec.health_address]
    return argv


# ----------------------------------------------------------------- SuperNode
WORKER_SOCKET = "site-worker.sock"
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes, the last one a NUL


def worker_argv(socket_path: Path, parent_pid: int) -> list[str]:
    """The warm site worker's command line (it stops when `parent_pid` exits)."""
    return [sys.executable, "-m", "client.worker", "--socket", str(socket_path),
            "--parent-pid", str(parent_pid)]


def start_worker(socket_path: Path, parent_pid: int, env: dict[str, str]
                 ) -> subprocess.Popen:
    """Start the site worker; return once its socket is up (or raise)."""
    socket_path.unlink(missing_ok=True)
    proc = subprocess.Popen(worker_argv(socket_path, parent_pid), env=env)
    deadline = time.monotonic() + 120  # it imports torch and the app once
    while not socket_path.is_socket():
        if proc.poll() is not None:
            raise LaunchError(f"the site worker exited with code {proc.returncode}; "
                              "its error is printed above")
        if time.monotonic() > deadline:
            proc.kill()
            raise LaunchError(f"the site worker did not open {socket_path} in 120 s")
        time.sleep(0.1)
    print(f"site worker up on {socket_path} (pid {proc.pid})", flush=True)
    return proc


@dataclass(frozen=True)
class NodeConfig:
    """A site's identity as its ClientApp reads it from the node config."""

    site: str
    data_source: str
    cache_dir: Path
    # CPU threads of this site's ClientApp; 0 = every CPU the process may use.
    # Set it when SuperNodes share a machine (cores / SuperNodes each): torch
    # threads of two sites on the same cores slow both several-fold
    num_threads: int = 0
    # the warm site worker's Unix socket (client/worker.py); None = no worker
    worker_socket: Path | None = None

    def as_flower_arg(self) -> str:
        """The ``--node-config`` value: space-separated TOML string pairs."""
        pairs = {"site": self.site, "data-source": self.data_source,
                 "cache-dir": str(self.cache_dir)}
        if self.num_threads:
            pairs["num-threads"] = str(self.num_threads)
        if self.worker_socket is not None:
            pairs["worker-socket"] = str(self.worker_socket)
        return " ".join(f'{key}="{value}"' for key, value in pairs.items())


def validate_node_config(cfg: NodeConfig) -> NodeConfig:
    """Check the site's identity before the SuperNode starts.

    ``data-source``: ``br35h`` | ``npz:<readable file>`` | ``folder:<dir>``.
    Flower's ``--node-config`` parser splits on spaces and quotes, so values
    may not contain whitespace or quotes.
    """
    for key, value in (("site", cfg.site), ("data-source", cfg.data_source),
                       ("cache-dir", str(cfg.cache_dir)),
                       ("worker-socket", str(cfg.worker_socket or "-"))):
        if not value:
            raise LaunchError(f"node config {key} is empty; pass --{key} <value>")
        if any(ch.isspace() for ch in value) or '"' in value or "'" in value:
            raise LaunchError(
                f"node config {key}={value!r} contains whitespace or quotes, which "
                "Flower's --node-config cannot carry; rename/move it"
            )
    if cfg.worker_socket is not None and len(str(cfg.worker_socket)) > SOCKET_PATH_MAX:
        raise LaunchError(
            f"worker socket {cfg.worker_socket} is longer than {SOCKET_PATH_MAX} "
            "characters, the limit of a Unix socket path; use a shorter --state"
        )
    if not 0 <= cfg.num_threads <= 256:
        raise LaunchError(
            f"num-threads={cfg.num_threads} is outside [0, 256]; pass --num-threads "
            "<CPU threads for this site> (0 = all)"
        )
    source = cfg.data_source
    if source == "br35h":
        pass
    elif source.startswith("npz:"):
        path = Path(source[4:])
        if not path.is_file() or not os.access(path, os.R_OK):
            raise LaunchError(
                f"data-source {source}: {path} is not a readable file; fix "
                "--data-source npz:<path to the site's .npz>"
            )
    elif source.startswith("folder:"):
        path = Path(source[7:])
        if not path.is_dir():
            raise LaunchError(
                f"data-source {source}: {path} is not a directory; fix "
                "--data-source folder:<dir with one sub-folder per class>"
            )
    else:
        raise LaunchError(
            f"data-source {source!r} is not br35h, npz:<path> or folder:<path>; "
            "fix --data-source"
        )
    if cfg.cache_dir.exists() and not cfg.cache_dir.is_dir():
        raise LaunchError(
            f"cache-dir {cfg.cache_dir} exists and is not a directory; fix "
            "--cache-dir"
        )
    return cfg


@dataclass(frozen=True)
class SuperNodeSpec:
    """What a SuperNode is started with."""

    superlink: str
    node: NodeConfig
    ca_cert: Path | None = None
    private_key: Path | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_SUPERNODE_PORT
    max_retries: int | None = None
    max_wait_time: float | None = None
    insecure: bool = False
    i_understand_insecure: bool = False
    # seconds between the SuperNode's pulls when idle; None = Flower's own
    # 3 s (flower-supernode); a value runs deploy/supernode.py instead
    poll: float | None = None


def supernode_argv(spec: SuperNodeSpec, executable: str | None = None
                   ) -> list[str]:
    """The flower-supernode command line (node config validated first)."""
    if ":" not in spec.superlink or "://" in spec.superlink:
        raise LaunchError(
            f"--superlink {spec.superlink!r} must be host:port without a scheme, "
            "e.g. link.example.org:9093"
        )
    validate_node_config(spec.node)
    if spec.poll is None:
        argv = [executable or flower_executable("flower-supernode")]
    else:
        try:
            check_poll(spec.poll)
        except ValueError as err:
            raise LaunchError(str(err)) from err
        argv = [executable or sys.executable, "-m", "deploy.supernode",
                "--poll", f"{spec.poll:g}"]
    argv += ["--superlink", spec.superlink]
    if spec.insecure:
        if not spec.i_understand_insecure:
            raise LaunchError(
                "refusing to start the SuperNode with --insecure; drop it, or add "
                f"{INSECURE_ACK_FLAG} for a throwaway test"
            )
        argv.append("--insecure")
    else:
        ca = _require_file(spec.ca_cert, "CA certificate", "--ca")
        key = _require_file(spec.private_key, "SuperNode private key", "--key")
        argv += ["--root-certificates", str(ca),
                 "--auth-supernode-private-key", str(key)]
    argv += [
        "--node-config", spec.node.as_flower_arg(),
        "--isolation", "subprocess",
        "--host", spec.host,
        "--port", str(spec.port),
    ]
    if spec.max_retries is not None:
        argv += ["--max-retries", str(spec.max_retries)]
    if spec.max_wait_time is not None:
        argv += ["--max-wait-time", str(spec.max_wait_time)]
    return argv


# ------------------------------------------------------- flwr CLI connection
def connection_toml(name: str, address: str, ca_cert: Path | None,
                    insecure: bool = False) -> str:
    """``$FLWR_HOME/config.toml`` text naming one SuperLink connection."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]",
             f'address = "{address}"']
    if insecure:
        lines.append("insecure = true")
    else:
        if ca_cert is None:
            raise LaunchError("connection needs --ca <ca.crt> (or --insecure)")
        lines.append(f'root-certificates = "{Path(ca_cert).resolve()}"')
    return "\n".join(lines) + "\n"


def write_connection(flwr_home: Path, name: str, address: str,
                     ca_cert: Path | None, force: bool = False) -> Path:
    """Write the ``flwr`` CLI's config.toml under ``flwr_home``."""
    path = flwr_home / "config.toml"
    if path.exists() and not force:
        raise LaunchError(f"{path} already exists; pass --force to replace it")
    if ca_cert is not None:
        _require_file(ca_cert, "CA certificate", "--ca")
    text = connection_toml(name, address, ca_cert)
    flwr_home.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------ CLI
def _shared_args(p: argparse.ArgumentParser) -> None:
    """Options both the SuperLink and a SuperNode take."""
    p.add_argument("--state", type=Path, required=True,
                   help="state folder (SuperLink DB / FLWR_HOME live here)")
    p.add_argument("--flwr-home", type=Path, default=None,
                   help="FLWR_HOME (default: <state>/flwr-home)")
    p.add_argument("--insecure", action="store_true",
                   help="disable TLS (refused without "
                   f"{INSECURE_ACK_FLAG})")
    p.add_argument(INSECURE_ACK_FLAG, dest="ack_insecure",
                   action="store_true",
                   help="really allow --insecure (throwaway tests only)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the command instead of running it")


def _superlink_args(sub) -> None:
    """The ``superlink`` subcommand."""
    link = sub.add_parser("superlink", help="start the SuperLink")
    _shared_args(link)
    link.add_argument("--creds", type=Path, default=None,
                      help="folder with ca.crt, superlink.crt, superlink.key")
    link.add_argument("--ca", type=Path, default=None)
    link.add_argument("--cert", type=Path, default=None)
    link.add_argument("--key", type=Path, default=None)
    link.add_argument("--host", default="0.0.0.0",
                      help="address to listen on (default 0.0.0.0)")
    link.add_argument("--port", type=int, default=DEFAULT_SUPERLINK_PORT)
    link.add_argument("--log-file", type=Path, default=None)
    link.add_argument("--health-address", default=None,
                      help="host:port of a plaintext gRPC health endpoint")


def _supernode_args(sub) -> None:
    """The ``supernode`` subcommand."""
    node = sub.add_parser("supernode", help="start a hospital's SuperNode")
    _shared_args(node)
    node.add_argument("--superlink", required=True, help="SuperLink host:port")
    node.add_argument("--ca", type=Path, default=None, help="federation ca.crt")
    node.add_argument("--key", type=Path, default=None,
                      help="this SuperNode's private key (OpenSSH format)")
    node.add_argument("--site", required=True, help="site name, e.g. hospital-a")
    node.add_argument("--data-source", required=True,
                      help="br35h | npz:<path> | folder:<path>")
    node.add_argument("--cache-dir", type=Path, required=True,
                      help="teacher feature cache folder")
    node.add_argument("--worker", action="store_true",
                      help="keep the site warm: a long-lived worker process "
                      f"(client/worker.py) on the Unix socket <state>/{WORKER_SOCKET} "
                      "handles the messages instead of a fresh process each")
    node.add_argument("--num-threads", type=int, default=0,
                      help="CPU threads for this site's training (default 0: all "
                      "CPUs; SuperNodes sharing a machine: cores / SuperNodes)")
    node.add_argument("--host", default="127.0.0.1",
                      help="local Runtime API host (default 127.0.0.1)")
    node.add_argument("--port", type=int, default=DEFAULT_SUPERNODE_PORT,
                      help="local Runtime API port (one per SuperNode)")
    node.add_argument("--max-retries", type=int, default=None)
    node.add_argument("--max-wait-time", type=float, default=None)
    node.add_argument("--poll", type=float, default=None,
                      help="seconds between pulls when idle (default: Flower's "
                      "hard-coded 3 s; e.g. 0.2 cuts each message's wait, at the "
                      "cost of more requests to the SuperLink; deploy/supernode.py)")


def _connection_args(sub) -> None:
    """The ``connection`` subcommand."""
    conn = sub.add_parser("connection",
                          help="write $FLWR_HOME/config.toml for `flwr run`")
    conn.add_argument("--flwr-home", type=Path, required=True)
    conn.add_argument("--name", default="fedkd")
    conn.add_argument("--address", required=True, help="SuperLink host:port")
    conn.add_argument("--ca", type=Path, required=True)
    conn.add_argument("--force", action="store_true")


def _parser() -> argparse.ArgumentParser:
    """The command line: superlink, supernode and connection subcommands."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.launch",
        description="Start a Flower SuperLink or SuperNode for FedKD with TLS "
        "and SuperNode authentication on.",
    )
    sub = parser.add_subparsers(dest="role", required=True)
    _superlink_args(sub)
    _supernode_args(sub)
    _connection_args(sub)
    return parser


def _from_creds(args: argparse.Namespace) -> tuple[Path | None, ...]:
    creds = args.creds
    ca = args.ca or (creds / "ca.crt" if creds else None)
    cert = args.cert or (creds / "superlink.crt" if creds else None)
    key = args.key or (creds / "superlink.key" if creds else None)
    return ca, cert, key


def build(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The argv and environment ``main`` runs for parsed ``args``."""
    flwr_home = args.flwr_home or args.state / "flwr-home"
    env = launch_env(flwr_home)
    if args.role == "superlink":
        ca, cert, key = _from_creds(args)
        spec = SuperLinkSpec(
            state_dir=args.state, ca_cert=ca, cert=cert, key=key, host=args.host,
            port=args.port, insecure=args.insecure,
            i_understand_insecure=args.ack_insecure, log_file=args.log_file,
            health_address=args.health_address,
        )
        return superlink_argv(spec), env
    spec_n = SuperNodeSpec(
        superlink=args.superlink,
        node=NodeConfig(args.site, args.data_source, args.cache_dir,
                        args.num_threads,
                        args.state / WORKER_SOCKET if args.worker else None),
        ca_cert=args.ca, private_key=args.key, host=args.host, port=args.port,
        max_retries=args.max_retries, max_wait_time=args.max_wait_time,
        insecure=args.insecure, i_understand_insecure=args.ack_insecure,
        poll=args.poll,
    )
    return supernode_argv(spec_n), env


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; execs Flower (or prints with --dry-run)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.role == "connection":
            path = write_connection(args.flwr_home, args.name, args.address,
                                    args.ca, force=args.force)
            print(f"wrote {path}; use: FLWR_HOME={args.flwr_home} "
                  f"flwr run <app> {args.name}")
            return 0
        command, env = build(args)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"FLWR_HOME={shlex.quote(env['FLWR_HOME'])} "
              f"FLWR_TELEMETRY_ENABLED=0 {SUPEREXEC_POLL_ENV}="
              f"{shlex.quote(env[SUPEREXEC_POLL_ENV])} {shlex.join(command)}")
        return 0
    args.state.mkdir(parents=True, exist_ok=True)
    Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    if args.role == "supernode":
        args.cache_dir.mkdir(parents=True, exist_ok=True)
    if args.role == "supernode" and args.worker:
        try:
            start_worker(args.state / WORKER_SOCKET, os.getpid(), env)
        except LaunchError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    print(f"starting: {shlex.join(command)}", flush=True)
    os.execve(command[0], command, env)
    return 0  # pragma: no cover - execve does not return


if __name__ == "__main__":
    sys.exit(main())
