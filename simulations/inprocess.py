"""A single-process Grid: every virtual site's ClientApp runs in this process.

Flower's Simulation Engine (Ray) is the reference engine (`run.engine=ray`).
For sweeps of many small experiments its per-run start-up (Ray, one actor
process per core, each re-importing torch and re-reading the data) dominates;
this Grid calls the very same `client.app.app` handlers in-process, one site
after another, with each node's `Context` kept across rounds exactly as the
engine keeps it. Failures inside a ClientApp become Flower error replies, as
they do on the engine. Flower has no public in-process Grid, hence this one.

Pushed messages wait; each `pull_messages` gives the first waiting site its
turn. So the server's wait loop (`server.exchange`) checks its deadline
between sites, and sites past the round timeout get no turn, as on a link.
"""

from __future__ import annotations

import logging
import math
import traceback
import uuid
from collections import deque
from collections.abc import Iterable

from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from server.exchange import exchange

log = logging.getLogger(__name__)


def _own_copy(content: RecordDict) -> RecordDict:
    """`content` with copies of its records (the arrays' buffers are shared:
    nothing changes them in place, and copying them would cost every round)."""
    out = RecordDict()
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            out[name] = ArrayRecord({k: record[k] for k in record.keys()})
        else:
            out[name] = type(record)(dict(record))
    return out


class InProcessGrid(Grid):
    """Grid over `num_nodes` virtual sites served by one ClientApp object."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1) -> None:
        self.client_app = client_app
        self.node_ids = list(range(1, num_nodes + 1))
        self.contexts = {
            n: Context(
                run_id=run_id,
                node_id=n,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i, n in enumerate(self.node_ids)
        }
        self._run = Run.create_empty(run_id=run_id)
        self._waiting: deque[Message] = deque()  # pushed, not yet served
        self._replies: dict[str, Message] = {}
        # Messages take their sender from the process's task identity; here the
        # server and every site share one process, so set it for the server.
        TaskIdentity.run_id = run_id
        TaskIdentity.task_id = 1
        TaskIdentity.node_id = 0

    def set_run(self, run: Run) -> None:
        """Flower's Grid interface: remember the run."""
        self._run = run

    @property
    def run(self) -> Run:
        """Flower's Grid interface: the current run."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Flower's Grid interface (deprecated upstream): build a message."""
        return Message(
            content=content,
            dst_node_id=dst_node_id,
            message_type=message_type,
            group_id=group_id,
            ttl=ttl,
        )

    def get_node_ids(self) -> Iterable[int]:
        """The virtual sites."""
        return list(self.node_ids)

    def _deliver(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        # On a link every site gets its own copy of what was sent; a server may
        # send one content object to many sites (Flower's SecAgg+ workflow
        # does), and a site may change what it received (its mod pops keys)
        msg.content = _own_copy(msg.content)
        TaskIdentity.run_id = self._run.run_id
        TaskIdentity.task_id = 1
        TaskIdentity.node_id = node
        try:
            return self.client_app(msg, self.contexts[node])
        except Exception as err:  # a site's crash must not crash the server
            log.warning("site node %d raised %s: %s", node, type(err).__name__, err)
            reason = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=3)}"
            return Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                reply_to=msg,
            )
        finally:
            TaskIdentity.node_id = 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue each message for its site; its id names the reply to pull."""
        if self._waiting:  # an earlier exchange gave up on these (its deadline)
            log.warning(
                "round timeout: nodes %s had no turn before the last wait ended",
                [m.metadata.dst_node_id for m in self._waiting],
            )
            self._waiting.clear()
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self._waiting.append(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def _serve_next(self) -> None:
        """Give the first waiting site its turn; keep its reply for a pull."""
        msg = self._waiting.popleft()
        self._replies[msg.metadata.message_id] = self._deliver(msg)

    def serve_all(self) -> None:
        """Give every waiting site its turn now (as if they ran side by side)."""
        while self._waiting:
            self._serve_next()

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Serve the next waiting site, then return the replies asked for."""
        if self._waiting:
            self._serve_next()
        return [self._replies.pop(m) for m in message_ids if m in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Flower's Grid interface: `server.exchange` with no poll wait."""
        return exchange(
            self,
            messages,
            timeout=math.inf if timeout is None else timeout,
            poll_interval=0.01,
        )
