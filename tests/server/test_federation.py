"""The handshake reads each site's SiteInfo; an unreadable one is a failed site."""

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from common.config import load_config
from common.site_info import SiteInfo
from server.federation import FederationError, handshake


def _info(name: str) -> SiteInfo:
    return SiteInfo(
        name=name,
        classes=("normal", "pneumonia"),
        num_train=10,
        num_test=4,
        num_labelled=10,
        channels=1,
        teacher_used=False,
        teacher_weights="none",
        teacher_feature_dim=0,
    )


class _Grid:
    """Answers each query with the wire form (kebab-case dict) given per node."""

    def __init__(self, wires: dict[int, dict]) -> None:
        self.wires = wires

    def get_node_ids(self) -> list[int]:
        return list(self.wires)

    def push_messages(self, messages):
        self.replies = {}
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{i}"
            wire = self.wires[m.metadata.dst_node_id]
            self.replies[f"m{i}"] = Message(
                RecordDict({"site": ConfigRecord(wire)}), reply_to=m
            )
        return list(self.replies)

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in message_ids if i in self.replies]


def _wires(bad: dict) -> dict[int, dict]:
    wires = {n: _info(f"site-{n}").to_dict() for n in (3, 1, 2)}
    wires[2] = {**wires[2], **bad}
    return wires


def test_handshake_returns_sorted_infos_and_names_by_node():
    cfg = load_config(None, ["partition.sites=3", "federation.min_sites=3"])

    infos, names = handshake(_Grid(_wires({})), cfg, 3)

    assert [i.name for i in infos] == ["site-1", "site-2", "site-3"]
    assert names == {3: "site-3", 1: "site-1", 2: "site-2"}


def test_an_unreadable_handshake_counts_as_a_failed_site():
    cfg = load_config(None, ["partition.sites=3", "federation.min_sites=2"])
    grid = _Grid(_wires({"num-trian": 5}))  # a misspelt key, not a default

    infos, names = handshake(grid, cfg, 3)

    assert [i.name for i in infos] == ["site-1", "site-3"] and 2 not in names


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ({"num-trian": 5}, "unknown handshake keys ['num-trian']"),
        ({"version": 99}, "handshake version 99"),
    ],
)
def test_too_few_readable_sites_stop_with_the_site_and_key(bad, needle):
    cfg = load_config(None, ["partition.sites=3", "federation.min_sites=3"])

    with pytest.raises(FederationError) as err:
        handshake(_Grid(_wires(bad)), cfg, 3)

    line = str(err.value)
    assert "\n" not in line and "2 sites answered the handshake" in line
    assert "node 2: site 'site-2'" in line and needle in line


def test_a_missing_key_is_named():
    cfg = load_config(None, ["partition.sites=3", "federation.min_sites=3"])
    wires = _wires({})
    del wires[2]["num-test"]

    with pytest.raises(FederationError, match="handshake lacks key 'num-test'"):
        handshake(_Grid(wires), cfg, 3)
