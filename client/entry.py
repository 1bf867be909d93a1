"""The deployed ClientApp: each message goes to the site's warm worker, if it has one.

`pyproject.toml` names this module's `app` as the federation's ClientApp.
Flower starts a fresh process for every message, so this module imports no
torch: with `worker-socket` in the node config (`deploy.launch supernode
--worker`) it hands the message to the long-lived `client.worker`, which runs
the handlers of `client.app` warm. Without a worker, or when the worker is
down or runs other code, the same handlers run here, in this process, as
before (slower, never different; one WARNING line says why).

The reply's `profile` record then holds this process's start-up (`start`,
`import`, `load`) beside the worker's phases, and `worker`: the time the
message spent crossing to the worker and back.
"""

from __future__ import annotations

# First of all: importing common.timing starts the clock of the app's imports.
from common import timing

# isort: split
import logging
import time

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from client import worker

log = logging.getLogger(__name__)

SOCKET_KEY = "worker-socket"
# every (category, action) that client.app registers (a test checks they match)
ROUTES = (
    ("query", None),
    ("train", None),
    ("evaluate", None),
    ("query", "calibrate"),
    ("query", "ood_threshold"),
)

app = ClientApp()
timing.app_imported()
_warned: set[str] = set()


def _local(message: Message, context: Context) -> Message:
    """The handlers of client.app, in this process (imports torch on first use)."""
    from client.app import app as site_app

    return site_app(message, context)


def _with_startup(reply: Message, cold: dict[str, float], total: float) -> Message:
    """The worker's reply with this process's start-up and the crossing added."""
    if reply.has_error() or timing.PROFILE_RECORD not in reply.content.config_records:
        return reply
    phases = timing.from_metrics(dict(reply.content[timing.PROFILE_RECORD]))
    phases["worker"] = max(total - phases.get("handler", 0.0), 0.0)
    phases.update(cold)
    phases["handler"] = total
    reply.content[timing.PROFILE_RECORD] = ConfigRecord(
        {timing.metric_name(k): round(v, 4) for k, v in phases.items()}
    )
    return reply


def dispatch(message: Message, context: Context) -> Message:
    """Hand `message` to the node's worker, or handle it here."""
    path = context.node_config.get(SOCKET_KEY)
    if path:
        entered = time.perf_counter()
        try:
            reply = worker.forward(str(path), message, context)
        except worker.WorkerUnavailable as err:
            if str(err) not in _warned:
                _warned.add(str(err))
                log.warning("%s; handling messages in the ClientApp process", err)
        else:
            cold = timing.process_clock.take_startup(entered)
            return _with_startup(reply, cold, time.perf_counter() - entered)
    return _local(message, context)


for _category, _action in ROUTES:
    register = getattr(app, _category)
    (register() if _action is None else register(_action))(dispatch)
