"""The wire: round trips, float16 rounding and range, integer buffers."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.errors import MessageError
from common.serialization import load_into, pack, restore_int_dtypes, unpack

F16_MAX = float(np.finfo(np.float16).max)  # 65504

shapes = hnp.array_shapes(min_dims=0, max_dims=3, max_side=4)
floats = hnp.arrays(np.float32, shapes,
                    elements=st.floats(-F16_MAX, F16_MAX, width=32))
ints = hnp.arrays(np.int64, shapes, elements=st.integers(-(2**62), 2**62))


@settings(max_examples=60, deadline=None)
@given(w=floats, steps=ints, wire=st.sampled_from(["float32", "float16"]))
def test_round_trip_is_exact_or_float16_rounding(w, steps, wire):
    record = pack({"student.w": w, "student.steps": steps}, wire)

    back = unpack(record, "student.")

    assert back["w"].dtype == torch.float32 and back["w"].shape == w.shape
    expected = w if wire == "float32" else w.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(back["w"].numpy(), expected)
    # integer buffers never travel as floats: exact in both wire dtypes
    assert record["student.steps"].numpy().dtype == np.int64
    np.testing.assert_array_equal(back["steps"].numpy(), steps)


@settings(max_examples=40, deadline=None)
@given(big=st.floats(65536.0, float(np.finfo(np.float32).max), width=32),
       neg=st.booleans())
def test_float16_wire_refuses_finite_values_it_would_make_inf(big, neg):
    w = np.array([0.5, -big if neg else big], np.float32)

    with pytest.raises(MessageError, match=r"'student.w' has 1 value\(s\) outside"):
        pack({"student.w": w}, "float16")
    assert pack({"student.w": w}, "float32")["student.w"].numpy()[1] == w[1]


def test_averaged_integer_buffers_are_restored_to_their_dtype():
    ref = pack({"student.n": np.array(70_001, np.int64)})
    averaged = pack({"student.n": np.array(70_001.0)})  # what averaging returns

    out = restore_int_dtypes(averaged, ref)

    assert out["student.n"].numpy().dtype == np.int64
    assert int(out["student.n"].numpy()) == 70_001


def test_integer_buffer_arriving_as_inf_is_refused():
    module = torch.nn.Module()
    module.register_buffer("num_batches_tracked", torch.tensor(0))
    record = pack({"student.num_batches_tracked": np.array(np.inf, np.float16)})

    with pytest.raises(MessageError, match="integer buffer"):
        load_into(module, record, "student.")
    assert int(module.num_batches_tracked) == 0
