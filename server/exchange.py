"""Send messages to sites and collect their replies by a deadline.

Flower's `Grid.send_and_receive` pulls for replies every 3 s on a deployed
SuperLink (`HttpGrid`), so every message's round trip was rounded up to the
next 3 s. `exchange` pushes the messages once and pulls every
`federation.poll_interval` seconds instead, on any Grid: the simulation
engine's `InMemoryGrid` (which polled every 0.1 s already), the deployed
`HttpGrid` and the in-process `InProcessGrid` (whose pulls give the waiting
sites their turns, one per pull).

What has not come back by the deadline is simply absent from the result, as
with `send_and_receive`: screening records each asked site without a reply as
a failure (`server.screening`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

log = logging.getLogger(__name__)


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    *,
    timeout: float,
    poll_interval: float,
) -> list[Message]:
    """The replies to `messages` that arrive within `timeout` s, in sending order.

    Pulls right after pushing, then every `poll_interval` s while a pull
    brings nothing new, and once more at the deadline. Replies are returned in
    the order their messages were sent, whatever order they arrived in, so
    that aggregation sums them in the same order on every run.
    """
    messages = list(messages)
    deadline = time.monotonic() + timeout
    ids = list(grid.push_messages(messages))
    order = {mid: i for i, mid in enumerate(ids) if mid}  # None: not pushed
    if len(order) < len(messages):  # those sites will count as silent
        log.warning(
            "%d of %d messages were not pushed",
            len(messages) - len(order),
            len(messages),
        )
    pending = set(order)
    replies: list[Message] = []
    while pending:
        got = [m for m in grid.pull_messages(list(pending)) if _answers(m, pending)]
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        left = deadline - time.monotonic()
        if not pending or left <= 0:
            break
        if not got:
            time.sleep(min(poll_interval, left))
    return sorted(replies, key=lambda m: order[m.metadata.reply_to_message_id])


def _answers(reply: Message, pending: set[str]) -> bool:
    """Whether `reply` answers a message still waited for (else it is dropped)."""
    if reply.metadata.reply_to_message_id in pending:
        return True
    log.warning(
        "dropped a reply from node %d to no message waited for",
        reply.metadata.src_node_id,
    )
    return False
