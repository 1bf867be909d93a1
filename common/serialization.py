"""The one place where models become Flower arrays and back.

Only the student (prefix ``student.``, with its feature projection ``proj.``)
and, when federated, the teacher head (prefix ``head.``) are ever packed;
anything else is refused. Under ``federation.strategy=scaffold`` a site's
reply also carries its control-variate update (``scaffold.dc.``), and the
server's train message the global control variate (``scaffold.c.``).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from common import timing
from common.errors import MessageError

STUDENT_PREFIX = "student."
HEAD_PREFIX = "head."
# The feature-distillation projection is sent with the student: it holds no
# data, and a shared projection keeps every site's student aligned with the
# same teacher feature space.
PROJ_PREFIX = "proj."
ALLOWED_PREFIXES = (STUDENT_PREFIX, HEAD_PREFIX, PROJ_PREFIX)
# SCAFFOLD (server/scaffold.py): the train message carries the global control
# variate c beside the model, and the reply the site's update of its own
# c_i, each keyed by the model array it corrects ("scaffold.c.student.fc.weight").
# c_i itself never leaves the site.
CONTROL_PREFIX = "scaffold.c."
CONTROL_DELTA_PREFIX = "scaffold.dc."


def reply_prefixes(strategy: str) -> tuple[str, ...]:
    """The array prefixes a site's train reply may carry under `strategy`."""
    if strategy == "scaffold":
        return (*ALLOWED_PREFIXES, CONTROL_DELTA_PREFIX)
    return ALLOWED_PREFIXES


# federation.eval_in_train: the server sets EVAL_RECEIVED in the train config,
# and the site's train reply carries the received model's metrics (scalars) in
# a ConfigRecord EVAL_RECORD (Flower's aggregation wants one MetricRecord).
EVAL_RECEIVED = "evaluate-received"
EVAL_RECORD = "eval"
# Train and evaluate replies carry the site's seconds per phase of handling the
# message (`t_<phase>_s` scalars) in a ConfigRecord of their own, so that they
# stay out of the model metrics Flower aggregates (defined in common/timing.py,
# which the torch-free deployed ClientApp entry imports).
PROFILE_RECORD = timing.PROFILE_RECORD
WIRE_DTYPES = {"float32": np.float32, "float16": np.float16}


def _to_wire(key: str, value: np.ndarray, wire: type) -> np.ndarray:
    """`value` cast to the wire dtype; refuse finite values the cast would make inf."""
    limit = float(np.finfo(wire).max)
    finite = value[np.isfinite(value)]
    over = int(np.count_nonzero(np.abs(finite) > limit)) if finite.size else 0
    if over:
        raise MessageError(
            f"array '{key}' has {over} value(s) outside the "
            f"{np.dtype(wire).name} range +-{limit:g} (largest "
            f"{float(np.abs(finite).max()):.6g}); they would arrive as inf: set "
            "federation.transfer_dtype=float32"
        )
    return value.astype(wire)


def module_arrays(module: nn.Module, prefix: str) -> dict[str, np.ndarray]:
    """A module's state as numpy arrays keyed ``prefix + name`` (no copies)."""
    return {
        prefix + k: v.detach().cpu().numpy() for k, v in module.state_dict().items()
    }


# the train config's KD-gate verdict of the whole federation (summed per-class
# counts of the previous round); sites whose test part lacks a class follow it
FEDERATION_KD_WEIGHT = "federation-kd-weight"

# teacher.head=closed_form: the handshake reply carries the site's ridge
# statistics (common/models/ridge.py) in this ArrayRecord, in float64: they are
# summed at the server, and float32 would cost the head its equality with the
# pooled fit.
STATS_RECORD = "ridge-stats"
STATS_PREFIX = "ridge."


# calibration.temperature / calibration.ood: after the last round the server
# sends the final model in a query message of type CALIBRATE; each site replies
# its sums (NLL on the temperature grid of its held-out part, training-feature
# sums) in CALIBRATION_RECORD. Then OOD_THRESHOLD carries the fitted reference
# (REFERENCE_RECORD, `ood.` arrays) and the temperature, and each site replies
# the histogram of its held-out scores and its calibration bins.
CALIBRATE = "query.calibrate"
OOD_THRESHOLD = "query.ood_threshold"
CALIBRATION_RECORD = "calibration-stats"
REFERENCE_RECORD = "ood-reference"
CALIBRATION_PREFIXES = ("calib.", "ood.")


def pack_stats(
    arrays: dict[str, np.ndarray], prefixes: tuple[str, ...] = (STATS_PREFIX,)
) -> ArrayRecord:
    """Summed statistics as sent: float64 kept, nothing outside `prefixes`."""
    bad = [k for k in arrays if not k.startswith(prefixes)]
    if bad:
        raise MessageError(
            f"refusing to send arrays {bad[:3]} as statistics: only "
            f"{list(prefixes)} arrays may"
        )
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def pack(
    arrays: dict[str, np.ndarray],
    transfer_dtype: str = "float32",
    allowed: tuple[str, ...] = ALLOWED_PREFIXES,
) -> ArrayRecord:
    """Build an ArrayRecord, casting floating arrays to the wire dtype.

    Integer and bool arrays (e.g. BatchNorm's ``num_batches_tracked``) travel in
    their own dtype; a float value outside the wire dtype's range is refused, and
    so is a key outside `allowed` (`reply_prefixes` for a train reply).
    """
    wire = WIRE_DTYPES[transfer_dtype]
    record = ArrayRecord()
    for key, value in arrays.items():
        if not key.startswith(allowed):
            raise MessageError(
                f"refusing to send array '{key}': only {allowed} may leave a site"
            )
        if np.issubdtype(value.dtype, np.floating) and value.dtype != wire:
            value = _to_wire(key, value, wire)
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
        if v.is_floating_point() and not own[k].is_floating_point():
            v = _float_to_int(f"{prefix}{k}", v, own[k].dtype)
        state[k] = v.to(own[k].dtype)
    module.load_state_dict(state)


def _float_to_int(key: str, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float tensor bound for an integer buffer, rounded; refuse inf and NaN."""
    info = torch.iinfo(dtype)
    ok = torch.isfinite(value) & (value >= info.min) & (value <= info.max)
    if not bool(ok.all()):
        raise MessageError(
            f"array '{key}' is an integer buffer ({dtype}) but arrived with "
            f"{int((~ok).sum())} non-finite or out-of-range value(s); send integer "
            "arrays in their own dtype"
        )
    return value.round()


def restore_int_dtypes(record: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """`record` with arrays that are integer in `reference` rounded back to it.

    Averaging makes every array float (``int * weight``); an integer buffer must
    not then be cast to the float16 wire, where values above 65504 become inf.
    """
    out = ArrayRecord()
    for key in record.keys():
        arr = record[key].numpy()
        ref = reference[key].numpy().dtype if key in reference else None
        if ref is not None and not np.issubdtype(ref, np.floating) and arr.dtype != ref:
            arr = np.rint(arr).astype(ref)
        out[key] = Array(np.require(arr, requirements="C"))
    return out


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
