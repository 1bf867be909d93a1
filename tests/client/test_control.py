"""The site's SCAFFOLD control variate c_i: from the message, kept across rounds."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from client.site.control import (
    control_delta_arrays,
    load_control,
    received_control,
    save_control,
)
from common.config import load_config
from common.errors import MessageError
from common.serialization import pack, reply_prefixes


def _cfg(tmp_path, strategy: str = "scaffold"):
    return load_config(None, [f"federation.strategy={strategy}",
                              f"data.cache_dir={tmp_path}"])


def _message(**control) -> ArrayRecord:
    arrays = {"student.fc.weight": Array(np.zeros((2, 3), np.float32))}
    arrays.update({f"scaffold.c.student.{k}": Array(v) for k, v in control.items()})
    return ArrayRecord(arrays)


def test_c_i_is_zeros_in_round_one_and_carried_into_the_next(tmp_path):
    cfg = _cfg(tmp_path)
    state = RecordDict()
    first = load_control(cfg, state, _message(), 1, "site-0")
    assert first.server == {} and first.site == {}  # both zeros
    first.site = {"fc.weight": torch.full((2, 3), 0.5)}
    save_control(cfg, state, first, 1, "site-0")

    c = np.full((2, 3), 0.1, np.float32)
    second = load_control(cfg, state, _message(**{"fc.weight": c}), 2, "site-0")

    assert torch.equal(second.site["fc.weight"], torch.full((2, 3), 0.5))
    np.testing.assert_array_equal(second.server["fc.weight"].numpy(), c)
    # a restarted site (empty context.state) reads the file of round 1
    again = load_control(cfg, RecordDict(), _message(), 2, "site-0")
    assert torch.equal(again.site["fc.weight"], torch.full((2, 3), 0.5))
    # a retried round 2 starts again from round 1's c_i, not a later one
    second.site = {"fc.weight": torch.full((2, 3), 9.0)}
    save_control(cfg, state, second, 2, "site-0")
    retry = load_control(cfg, RecordDict(), _message(), 2, "site-0")
    assert torch.equal(retry.site["fc.weight"], torch.full((2, 3), 0.5))


def test_only_scaffold_keeps_a_control_variate(tmp_path):
    assert load_control(_cfg(tmp_path, "fedavg"), RecordDict(), _message(), 1,
                        "site-0") is None
    assert control_delta_arrays(None) == {}


def test_delta_c_goes_back_under_its_own_prefix_and_only_under_scaffold(tmp_path):
    control = load_control(_cfg(tmp_path), RecordDict(), _message(), 1, "site-0")
    control.delta = {"fc.weight": torch.ones(2, 3)}

    arrays = control_delta_arrays(control)

    assert list(arrays) == ["scaffold.dc.student.fc.weight"]
    pack(arrays, "float32", reply_prefixes("scaffold"))
    with pytest.raises(MessageError, match="refusing to send"):
        pack(arrays, "float32", reply_prefixes("fedavg"))


def test_a_control_variate_outside_the_student_is_refused():
    bad = ArrayRecord({"scaffold.c.head.weight": Array(np.zeros(2, np.float32))})
    with pytest.raises(MessageError, match="'scaffold.c.head.weight' corrects no"):
        received_control(bad)
