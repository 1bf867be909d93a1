"""A warm site worker: one long-lived process that handles a SuperNode's messages.

    python -m client.worker --socket /var/lib/fedkd-supernode/hospital-a/site.sock

In a deployment Flower starts a fresh `flwr-clientapp` process for every
message; each one imports torch, rebuilds the site from its caches and refits
what it fitted last round before it trains (BENCHMARKS.md, "Deployed round
profile"). The worker keeps that process alive instead, the way NVFlare and
Fed-BioMed clients stay up: the per-message ClientApp (`client.entry`) stays a
thin process without torch that passes the message to the worker over a local
socket and returns its reply. Started by `deploy.launch supernode --worker`,
which adds its socket to the node config (`worker-socket`) and ties its life to
the SuperNode's.

What crosses the socket is what Flower itself passes to a ClientApp process:
the message and the run's context (Flower's protobuf serialisation, never
pickle), and back the reply and the context with the site's updated state. The
worker runs the same handlers (`client.app.app`), so a round gives the same
reply either way.

Security: the socket is a Unix-domain socket (no network port), created with
mode 0600 in a folder the worker makes 0700, and the worker serves only
processes of its own user (the peer's uid, `SO_PEERCRED`). Code drift: the
ClientApp runs the code of the app bundle (FAB) the server sent, the worker
the code installed where it started; each request carries a fingerprint of
the ClientApp's `client` and `common` sources, and a worker with other code
refuses it, so the message is handled in the ClientApp's own process (slower,
never different). Messages are handled one at a time.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import os
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROTOCOL = 1
_LEN = struct.Struct(">Q")
_MAX_FRAME = 4 << 30  # 4 GiB: far above any model, below a corrupt length
PACKAGES = ("client", "common")


class WorkerUnavailable(ConnectionError):
    """No worker answered at the socket (absent, stopped, or other code)."""


class WorkerFailed(RuntimeError):
    """The worker ran the handler and it raised; the text is its error."""


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 of this process's `client` and `common` sources (path + bytes)."""
    h = hashlib.sha256()
    for name in PACKAGES:
        root = Path(importlib.import_module(name).__file__).parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root.parent)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ framing
def _send(sock: socket.socket, *parts: bytes) -> None:
    sock.sendall(b"".join(_LEN.pack(len(p)) + p for p in parts))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError(
                f"peer closed the socket after {len(buf)} of {n} bytes"
            )
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket, count: int) -> list[bytes]:
    parts = []
    for _ in range(count):
        (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
        if n > _MAX_FRAME:
            raise ConnectionError(f"frame of {n} bytes exceeds the {_MAX_FRAME} limit")
        parts.append(_recv_exact(sock, n))
    return parts


# ------------------------------------------------------------ the ClientApp side
def forward(path: str | Path, message: Any, context: Any) -> Any:
    """Have the worker at `path` handle `message`; update `context.state`; reply.

    Raises `WorkerUnavailable` when no worker with this code answered (nothing
    was handled: the caller handles the message itself) and `WorkerFailed`
    when the handler raised in the worker.
    """
    from flwr.common import serde
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.supercore.task_identity import TaskIdentity

    header = {
        "protocol": PROTOCOL,
        "code": code_fingerprint(),
        "task": [TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id],
    }
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(str(path))
        except OSError as err:
            raise WorkerUnavailable(f"no site worker at {path}: {err}") from err
        _send(
            sock,
            json.dumps(header).encode(),
            serde.message_to_proto(message).SerializeToString(),
            serde.context_to_proto(context).SerializeToString(),
        )
        try:
            (head,) = _recv(sock, 1)
            answer = json.loads(head)
            if answer.get("ok"):
                reply_b, context_b = _recv(sock, 2)
        except (OSError, ValueError) as err:  # it died mid-message: state untouched
            raise WorkerUnavailable(f"site worker at {path} broke off: {err}") from err
        if answer.get("refused"):
            raise WorkerUnavailable(f"site worker at {path}: {answer['refused']}")
        if not answer.get("ok"):
            raise WorkerFailed(answer.get("error", "the site worker failed"))
    finally:
        sock.close()
    reply = serde.message_from_proto(ProtoMessage.FromString(reply_b))
    state = serde.context_from_proto(ProtoContext.FromString(context_b)).state
    for key in list(context.state.keys()):
        del context.state[key]
    for key, record in state.items():
        context.state[key] = record
    return reply


# ------------------------------------------------------------------ the worker
def _peer_uid(conn: socket.socket) -> int | None:
    """The connecting process's uid (Linux SO_PEERCRED); None where unknown."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    size = struct.calcsize("3i")
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, size)
    return struct.unpack("3i", creds)[1]


def bind(path: str | Path) -> socket.socket:
    """A listening Unix socket at `path`, mode 0600, in a folder of mode 0700."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.is_socket():
        path.unlink()  # a stale socket of a stopped worker
    elif path.exists():
        raise FileExistsError(
            f"{path} exists and is not a socket; choose another --socket"
        )
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is born 0600: no window with wider rights
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    sock.listen(8)
    return sock


def handle(conn: socket.socket, app: Callable[[Any, Any], Any]) -> str:
    """Serve one request on `conn` with `app`; return what happened (for the log)."""
    from flwr.common import serde
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.supercore.task_identity import TaskIdentity

    uid = _peer_uid(conn)
    if uid is not None and uid != os.getuid():
        _send(conn, json.dumps({"refused": f"uid {uid} is not the worker's"}).encode())
        return f"refused uid {uid}"
    head, msg_b, ctx_b = _recv(conn, 3)
    header = json.loads(head)
    if header.get("protocol") != PROTOCOL or header.get("code") != code_fingerprint():
        why = (
            f"other code (ClientApp {header.get('code')}, worker "
            f"{code_fingerprint()}, protocol {header.get('protocol')})"
        )
        _send(conn, json.dumps({"refused": why}).encode())
        return f"refused: {why}"
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = header["task"]
    message = serde.message_from_proto(ProtoMessage.FromString(msg_b))
    context = serde.context_from_proto(ProtoContext.FromString(ctx_b))
    kind = message.metadata.message_type
    try:
        reply = app(message, context)
    except Exception as err:  # the ClientApp turns it into an error reply
        log.exception("site worker: %s message failed", kind)
        _send(conn, json.dumps({"ok": False, "error": f"{type(err).__name__}: {err}"})
              .encode())
        return f"{kind} failed: {err}"
    _send(
        conn,
        json.dumps({"ok": True}).encode(),
        serde.message_to_proto(reply).SerializeToString(),
        serde.context_to_proto(context).SerializeToString(),
    )
    return f"{kind} handled"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(
    path: str | Path,
    *,
    parent_pid: int | None = None,
    stop: threading.Event | None = None,
    app: Callable[[Any, Any], Any] | None = None,
) -> None:
    """Handle messages at `path` until `stop` is set or `parent_pid` exits."""
    if app is None:
        from client.app import app  # imports torch once, here
    from common import timing

    timing.process_clock.take_startup(time.perf_counter())  # replies: no cold phases
    stop = stop or threading.Event()
    server = bind(path)
    server.settimeout(1.0)
    log.info("site worker serving %s (code %s, pid %d)", path, code_fingerprint(),
             os.getpid())
    try:
        while not stop.is_set():
            if parent_pid is not None and not _alive(parent_pid):
                log.info("site worker: the SuperNode (pid %d) is gone; stopping",
                         parent_pid)
                break
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                try:
                    log.info("site worker: %s", handle(conn, app))
                except Exception as err:  # a bad request must not stop the worker
                    log.warning("site worker: dropped a request: %s: %s",
                                type(err).__name__, err)
    finally:
        server.close()
        Path(path).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m client.worker --socket PATH [--parent-pid PID]`."""
    p = argparse.ArgumentParser(prog="python -m client.worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--socket", required=True, type=Path, help="Unix socket path")
    p.add_argument("--parent-pid", type=int, default=None,
                   help="stop when this process (the SuperNode) exits")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    try:
        serve(args.socket, parent_pid=args.parent_pid)
    except (OSError, FileExistsError) as err:
        print(f"error: site worker at {args.socket}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
