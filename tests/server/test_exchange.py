"""The server collects replies as they arrive, not on Flower's 3-second beat."""

import time

import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.superlink.grid import InMemoryGrid

from common.config import load_config
from server.exchange import exchange
from server.screening import screen_evaluate
from simulations.inprocess import InProcessGrid


class _StaggeredGrid:
    """A Grid whose node n replies `delays[n]` s after the push (None: never)."""

    def __init__(self, delays: dict[int, float | None]) -> None:
        self.delays = delays
        self.pulls = 0
        self.pull_interval = 1.0  # for Flower's own loop (the old path)

    def get_node_ids(self) -> list[int]:
        return list(self.delays)

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        self.waiting = {}
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{i}"
            node = m.metadata.dst_node_id
            reply = Message(
                RecordDict({"metrics": MetricRecord({"acc": node / 10})}), reply_to=m
            )
            self.waiting[f"m{i}"] = (self.delays[node], reply)
        return list(self.waiting)

    def pull_messages(self, message_ids):
        self.pulls += 1
        now = time.monotonic() - self.pushed_at
        ready = [
            i
            for i in message_ids
            if i in self.waiting
            and self.waiting[i][0] is not None
            and self.waiting[i][0] <= now
        ]
        return [self.waiting.pop(i)[1] for i in ready]


def _messages(nodes) -> list[Message]:
    return [
        Message(RecordDict(), dst_node_id=n, message_type="evaluate") for n in nodes
    ]


def _acc(replies) -> list[float]:
    return [r.content["metrics"]["acc"] for r in replies]


def _timed(fn):
    t0 = time.monotonic()
    out = fn()
    return out, time.monotonic() - t0


def test_replies_are_collected_as_they_arrive_in_sending_order():
    grid = _StaggeredGrid({1: 0.25, 2: 0.05, 3: 0.4})

    replies, wall = _timed(
        lambda: exchange(grid, _messages([1, 2, 3]), timeout=10, poll_interval=0.02)
    )

    assert _acc(replies) == [0.1, 0.2, 0.3]  # sent order, not arrival order
    assert 0.4 <= wall < 0.7  # the last arrival (plus a poll), not a 3 s beat


def test_results_equal_flowers_loop_without_its_rounding():
    delays = {1: 0.25, 2: 0.05, 3: 0.4}
    # Flower's own send_and_receive (the old path), pulling every 1 s here
    # (3 s on a deployed SuperLink): it only runs push_messages/pull_messages
    old, old_wall = _timed(
        lambda: InMemoryGrid.send_and_receive(
            _StaggeredGrid(delays), _messages([1, 2, 3]), timeout=10
        )
    )
    new, new_wall = _timed(
        lambda: exchange(
            _StaggeredGrid(delays), _messages([1, 2, 3]), timeout=10, poll_interval=0.02
        )
    )

    assert sorted(_acc(old)) == _acc(new)
    assert old_wall >= 1.0 and new_wall < 0.7  # 0.4 s rounded up to 1 s


def test_a_timeout_leaves_the_silent_site_as_a_failure():
    cfg = load_config(None, ["federation.round_timeout=0.3"])
    grid = _StaggeredGrid({1: 0.05, 2: None, 3: 0.1})
    sent = _messages([1, 2, 3])

    replies, wall = _timed(
        lambda: exchange(grid, sent, timeout=0.3, poll_interval=0.05)
    )
    rows, report = screen_evaluate(
        replies, cfg, {1: "site-a", 2: "site-b", 3: "site-c"}, sent=sent
    )

    assert 0.3 <= wall < 0.6  # waited out the timeout, and no longer
    assert sorted(rows) == ["site-a", "site-c"]
    assert report.failed == [
        "site-b (evaluate): no reply within federation.round_timeout=0.3s"
    ]


def test_waiting_pulls_at_the_interval_not_in_a_busy_loop():
    grid = _StaggeredGrid({1: None})

    exchange(grid, _messages([1]), timeout=0.5, poll_interval=0.1)

    assert 3 <= grid.pulls <= 7  # about timeout / interval, plus the last one


def _slow_app(seconds: float):
    def app(msg, ctx):
        time.sleep(seconds)
        content = RecordDict({"site": ConfigRecord({"name": f"n{ctx.node_id}"})})
        return Message(content, reply_to=msg)

    return app


def test_in_process_sites_past_the_deadline_get_no_turn():
    grid = InProcessGrid(_slow_app(0.25), 3)

    replies = exchange(grid, _messages([1, 2, 3]), timeout=0.35, poll_interval=0.05)

    # site 1 answers by 0.25 s, site 2 by 0.5 s (it started before the deadline)
    assert [r.content["site"]["name"] for r in replies] == ["n1", "n2"]
    # the next exchange starts afresh: the unserved message is dropped
    again = exchange(grid, _messages([3]), timeout=1, poll_interval=0.05)
    assert [r.content["site"]["name"] for r in again] == ["n3"]


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_in_process_send_and_receive_serves_every_site(timeout):
    grid = InProcessGrid(_slow_app(0.0), 3)

    replies = grid.send_and_receive(_messages([3, 1, 2]), timeout=timeout)

    assert [r.content["site"]["name"] for r in replies] == ["n3", "n1", "n2"]
    assert [r.metadata.src_node_id for r in replies] == [3, 1, 2]
