"""The one place where models become Flower arrays and back.

Only the student (prefix ``student.``, with its feature projection ``proj.``)
and, when federated, the teacher head (prefix ``head.``) are ever packed;
anything else is refused.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from common.errors import MessageError

STUDENT_PREFIX = "student."
HEAD_PREFIX = "head."
# The feature-distillation projection is sent with the student: it holds no
# data, and a shared projection keeps every site's student aligned with the
# same teacher feature space.
PROJ_PREFIX = "proj."
ALLOWED_PREFIXES = (STUDENT_PREFIX, HEAD_PREFIX, PROJ_PREFIX)
WIRE_DTYPES = {"float32": np.float32, "float16": np.float16}


def module_arrays(module: nn.Module, prefix: str) -> dict[str, np.ndarray]:
    """A module's state as numpy arrays keyed ``prefix + name`` (no copies)."""
    return {
        prefix + k: v.detach().cpu().numpy() for k, v in module.state_dict().items()
    }


def pack(arrays: dict[str, np.ndarray], transfer_dtype: str = "float32") -> ArrayRecord:
    """Build an ArrayRecord, casting floating arrays to the wire dtype."""
    wire = WIRE_DTYPES[transfer_dtype]
    record = ArrayRecord()
    for key, value in arrays.items():
        if not key.startswith(ALLOWED_PREFIXES):
            raise MessageError(
                f"refusing to send array '{key}': only {ALLOWED_PREFIXES} "
                "may leave a site"
            )
        if np.issubdtype(value.dtype, np.floating) and value.dtype != wire:
            value = value.astype(wire)
        record[key] = Array(np.require(value, requirements="C"))
    return record


def unpack(record: ArrayRecord, prefix: str) -> OrderedDict[str, torch.Tensor]:
    """The arrays under `prefix` as a float32 torch state dict (prefix removed)."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key in record.keys():
        if key.startswith(prefix):
            arr = record[key].numpy()
            if np.issubdtype(arr.dtype, np.floating) and arr.dtype != np.float32:
                arr = arr.astype(np.float32)
            out[key[len(prefix) :]] = torch.from_numpy(np.array(arr, copy=True))
    return out


def load_into(module: nn.Module, record: ArrayRecord, prefix: str) -> None:
    """Load the arrays under `prefix` into `module`, naming any mismatch."""
    state = unpack(record, prefix)
    if not state:
        raise MessageError(f"message carries no arrays under '{prefix}'")
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        raise MessageError(
            f"arrays under '{prefix}' do not match the model: missing {missing[:3]}, "
            f"unexpected {extra[:3]}; server and site must use the same arch"
        )
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise MessageError(
                f"array '{prefix}{k}' has shape {tuple(v.shape)}, model expects "
                f"{tuple(own[k].shape)}"
            )
        state[k] = v.to(own[k].dtype)
    module.load_state_dict(state)


def to_float32(record: ArrayRecord) -> ArrayRecord:
    """A copy of `record` with floating arrays upcast to float32 (for aggregation)."""
    out = ArrayRecord()
    for key in record.keys():
        arr = record[key].numpy()
        if np.issubdtype(arr.dtype, np.floating) and arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        out[key] = Array(np.require(arr, requirements="C"))
    return out


def record_bytes(record: ArrayRecord) -> int:
    """Payload bytes of the arrays in `record`."""
    return int(sum(len(record[k].data) for k in record.keys()))
