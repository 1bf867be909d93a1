"""A site's SCAFFOLD control variate c_i, kept across rounds (strategy scaffold).

c_i never leaves the site: the train reply carries only its update
Delta c_i = c_i+ - c_i (`scaffold.dc.` arrays), which the server needs to keep
its c the mean of the sites' c_i. Like the optimiser state (`client.site.carry`)
c_i lives in Flower's `context.state` and, so that a restarted site or a
resumed run continues exactly, in one file per round in the site's cache
folder (`<data.cache_dir>/scaffold-control/<run and site key>/round-<r>.pt`).
Round r starts from the c_i saved after round r - 1; none (round 1) is zeros.
A retried round starts again from round r - 1's.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from client.site.carry import carry_dir, save_round_file
from common.config import ExperimentConfig
from common.errors import MessageError
from common.serialization import CONTROL_DELTA_PREFIX, CONTROL_PREFIX, STUDENT_PREFIX
from common.train import ControlVariates

log = logging.getLogger(__name__)

CONTROL_KEY = "fedkd.scaffold-control"
CONTROL_ROUND_KEY = "fedkd.scaffold-control-round"
CONTROL_DIR = "scaffold-control"
# the global c for the student's parameters, as the train message carries it
_RECEIVED = CONTROL_PREFIX + STUDENT_PREFIX


def received_control(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """The server's c by student parameter name ({} before it has one: zeros)."""
    out: dict[str, torch.Tensor] = {}
    for key in arrays.keys():
        if not key.startswith(CONTROL_PREFIX):
            continue
        if not key.startswith(_RECEIVED):
            raise MessageError(
                f"control variate '{key}' corrects no student parameter; only "
                f"'{_RECEIVED}*' arrays are expected"
            )
        value = np.asarray(arrays[key].numpy(), dtype=np.float32)
        out[key[len(_RECEIVED) :]] = torch.from_numpy(value.copy())
    return out


def _kept_round(state: RecordDict) -> int | None:
    """The round after which context.state's c_i was saved, if it holds one."""
    if CONTROL_KEY not in state or CONTROL_ROUND_KEY not in state:
        return None
    return int(state[CONTROL_ROUND_KEY]["round"])


def load_control(
    cfg: ExperimentConfig,
    state: RecordDict,
    arrays: ArrayRecord,
    server_round: int,
    site_name: str,
) -> ControlVariates | None:
    """This round's c (from the message) and c_i (saved after round - 1).

    None unless `federation.strategy=scaffold`.
    """
    if cfg.federation.strategy != "scaffold":
        return None
    want = server_round - 1
    site: dict[str, torch.Tensor] = {}
    if _kept_round(state) == want:
        rec = state[CONTROL_KEY]
        site = {k: torch.from_numpy(rec[k].numpy().copy()) for k in rec.keys()}
    else:
        path = carry_dir(cfg, site_name, CONTROL_DIR) / f"round-{want}.pt"
        if path.is_file():
            site = torch.load(path, weights_only=True)
        elif want >= 1:
            log.warning(
                "no SCAFFOLD control variate after round %d at %s: starting from zeros",
                want,
                site_name,
            )
    return ControlVariates(server=received_control(arrays), site=site)


def save_control(
    cfg: ExperimentConfig,
    state: RecordDict,
    control: ControlVariates | None,
    server_round: int,
    site_name: str,
) -> None:
    """Keep c_i+ in context.state and on disk; drop files older than a round."""
    if control is None:
        return
    tensors = {k: v.detach().cpu().clone() for k, v in control.site.items()}
    state[CONTROL_KEY] = ArrayRecord({k: Array(v.numpy()) for k, v in tensors.items()})
    state[CONTROL_ROUND_KEY] = ConfigRecord({"round": server_round})
    save_round_file(carry_dir(cfg, site_name, CONTROL_DIR), server_round, tensors)


def control_delta_arrays(control: ControlVariates | None) -> dict[str, np.ndarray]:
    """Delta c_i as reply arrays (`scaffold.dc.student.<name>`); {} without one."""
    if control is None:
        return {}
    prefix = CONTROL_DELTA_PREFIX + STUDENT_PREFIX
    return {prefix + k: v.numpy() for k, v in control.delta.items()}
