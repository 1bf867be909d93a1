"""The site's side of secure aggregation: Flower's SecAgg+ mod around our train handler.

With `privacy.secure_aggregation` the server runs Flower's `SecAggPlusWorkflow`
(server/secagg.py), which speaks the legacy layout: the round's model arrives
as `fitins.parameters` (unnamed, in order) with `fitins.config`, and the
reply must be `fitres.*`. Flower's `secaggplus_mod` does the protocol and the
cryptography unchanged: key set-up, key shares, masking the reply's vector,
unmasking. This module only translates between that layout and ours:

- `secagg_mod`: `secaggplus_mod` for the protocol's messages, a pass-through
  for every other train message (Flower's mod fails on a train message that
  is not a SecAgg+ stage);
- `train_config`, `train_arrays`: our config and the named global arrays
  from `fitins.*` (the names travel in the config as `array-keys`);
- `fitres_content`: the reply as `fitres.*`: the site's **update** (local -
  received weights, in float64 so that Flower's quantiser, which computes in
  the array's dtype, resolves the finest levels (float32 holds 2^24; the
  masked integers on the wire are the same size either way), in the received
  order), every coordinate clipped
  to +-`privacy.secagg_clipping_range` (the mod quantises within that range),
  and `num_examples` = the site's training images, so the unmasked result is
  FedAvg's example-weighted mean update;
- `sum_content`: for a secure *sum* of statistics (the closed-form head's,
  server/teacher_head.py; common/secure_sum.py), the reply as `fitres.*`: the
  named statistics the server asked for, each divided by the public scale it
  sent so that every coordinate lies in [-1, 1], as two limbs, with weight 1
  (the server multiplies the mean by the number of sites).
"""

from __future__ import annotations

from collections.abc import Mapping

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from common.errors import MessageError
from common.secure_sum import SumRequest, split_limbs

FITINS_ARRAYS = "fitins.parameters"
FITINS_CONFIG = "fitins.config"
ARRAY_KEYS = "array-keys"  # the global arrays' names, newline-separated
CLIPPED_METRIC = "secagg_clipped_fraction"


def secagg_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Flower's `secaggplus_mod` on SecAgg+ messages; others pass through."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def is_secure(msg: Message) -> bool:
    """Whether this train message came through the SecAgg+ workflow."""
    return FITINS_ARRAYS in msg.content.array_records


def _fitins_config(msg: Message) -> ConfigRecord:
    conf = msg.content.config_records.get(FITINS_CONFIG)
    if conf is None or ARRAY_KEYS not in conf:
        raise MessageError(
            f"SecAgg+ train message lacks {FITINS_CONFIG}[{ARRAY_KEYS!r}]; "
            "is the server ours?"
        )
    return conf


def train_config(msg: Message) -> ConfigRecord:
    """Our config record of a SecAgg+ train message (the arrays' names left out)."""
    conf = _fitins_config(msg)
    return ConfigRecord({k: v for k, v in conf.items() if k != ARRAY_KEYS})


def train_arrays(msg: Message) -> ArrayRecord:
    """The named global arrays of a SecAgg+ train message (decoded here)."""
    names = str(_fitins_config(msg)[ARRAY_KEYS]).split("\n")
    record = msg.content[FITINS_ARRAYS]
    data = [record[k].data for k in record.keys()]
    if len(data) != len(names):
        raise MessageError(
            f"SecAgg+ train message has {len(data)} arrays for {len(names)} names"
        )
    pairs = zip(names, data, strict=True)
    return ArrayRecord({n: Array(bytes_to_ndarray(b)) for n, b in pairs})


def fitres_content(
    local: Mapping[str, np.ndarray],
    received: ArrayRecord,
    num_examples: int,
    metrics: Mapping[str, float],
    clipping_range: float,
) -> RecordDict:
    """The reply as `fitres.*`: the clipped update in the received order."""
    extra = set(local) - set(received.keys())
    if extra:
        raise MessageError(
            f"arrays {sorted(extra)[:3]} are not in the global model, so they have "
            "no update to aggregate securely"
        )
    deltas, clipped, total = [], 0, 0
    for key in received.keys():
        ref = received[key].numpy().astype(np.float64)
        new = np.asarray(local.get(key, ref), dtype=np.float64)
        delta = new - ref
        clipped += int(np.count_nonzero(np.abs(delta) > clipping_range))
        total += delta.size
        deltas.append(np.clip(delta, -clipping_range, clipping_range))
    fit = FitRes(
        status=Status(code=Code.OK, message="ok"),
        parameters=ndarrays_to_parameters(deltas),
        num_examples=int(num_examples),
        metrics={**metrics, CLIPPED_METRIC: clipped / max(total, 1)},
    )
    return compat.fitres_to_recorddict(fit, keep_input=True)


def sum_content(values: Mapping[str, np.ndarray], request: SumRequest) -> RecordDict:
    """The reply to a secure sum as `fitres.*`: each values[k] / scale, as its two
    limbs (common/secure_sum.py), in the request's order, weight 1; a value
    beyond +-1 (a scale too small) is clipped and counted."""
    missing = [k for k in request.keys if k not in values]
    if missing:
        raise MessageError(f"secure sum asks for {missing}, which this site lacks")
    vectors, clipped, total = [], 0, 0
    for key, scale in zip(request.keys, request.scales, strict=True):
        v = np.asarray(values[key], dtype=np.float64) / scale
        clipped += int(np.count_nonzero(np.abs(v) > 1.0))
        total += v.size
        vectors.extend(split_limbs(v, request.levels))
    fit = FitRes(
        status=Status(code=Code.OK, message="ok"),
        parameters=ndarrays_to_parameters(vectors),
        num_examples=1,
        metrics={CLIPPED_METRIC: clipped / max(total, 1)},
    )
    return compat.fitres_to_recorddict(fit, keep_input=True)
