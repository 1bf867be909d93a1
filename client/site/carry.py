"""A site's optimiser state kept across rounds (train.optimizer_state=keep).

The state (SGD's momentum buffer, Adam's moments) never leaves the site. It
lives in Flower's `context.state` and, so that a restarted site or a resumed
run continues exactly, in one file per round in the site's cache folder
(`<data.cache_dir>/optimizer-state/<run and site key>/round-<r>.pt`). Round r
starts from the state saved after round r - 1; a state saved after a later
round (a server that resumed from an earlier checkpoint) is not used.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from common.config import ExperimentConfig
from common.train import OptimizerCarry

log = logging.getLogger(__name__)

OPTIMIZER_KEY = "fedkd.optimizer-state"
OPTIMIZER_ROUND_KEY = "fedkd.optimizer-round"


def carry_dir(
    cfg: ExperimentConfig, site_name: str, kind: str = "optimizer-state"
) -> Path:
    """The site's folder of saved per-round state of `kind` for this run."""
    key = hashlib.sha256((cfg.to_yaml() + "|" + site_name).encode()).hexdigest()[:16]
    return Path(cfg.data.cache_dir).expanduser() / kind / key


def save_round_file(folder: Path, server_round: int, payload: object) -> None:
    """Write `payload` as round-<r>.pt (atomically); drop files older than a round."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"round-{server_round}.pt.tmp"
    torch.save(payload, tmp)
    tmp.replace(folder / f"round-{server_round}.pt")  # atomic: never half a file
    for old in folder.glob("round-*.pt"):
        if int(old.stem.split("-")[1]) < server_round - 1:
            old.unlink(missing_ok=True)


def _from_record(rec: ArrayRecord) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key in rec.keys():
        index, _, name = key.partition("/")
        out.setdefault(int(index), {})[name] = torch.from_numpy(rec[key].numpy())
    return out


def load_carry(
    cfg: ExperimentConfig, state: RecordDict, server_round: int, site_name: str
) -> OptimizerCarry | None:
    """The state saved after round server_round - 1 (None unless keep)."""
    if cfg.train.optimizer_state != "keep":
        return None
    want = server_round - 1
    if OPTIMIZER_KEY in state and OPTIMIZER_ROUND_KEY in state:
        if int(state[OPTIMIZER_ROUND_KEY]["round"]) == want:
            return OptimizerCarry(_from_record(state[OPTIMIZER_KEY]))
    path = carry_dir(cfg, site_name) / f"round-{want}.pt"
    if path.is_file():
        return OptimizerCarry(torch.load(path, weights_only=True))
    if want >= 1:
        log.warning("no optimiser state after round %d at %s: starting anew",
                    want, site_name)
    return OptimizerCarry()


def save_carry(
    cfg: ExperimentConfig,
    state: RecordDict,
    carry: OptimizerCarry | None,
    server_round: int,
    site_name: str,
) -> None:
    """Keep the state in context.state and on disk; drop files older than a round."""
    if carry is None or not carry.state:
        return
    tensors = {
        i: {n: v.detach().cpu().clone() for n, v in st.items() if torch.is_tensor(v)}
        for i, st in carry.state.items()
    }
    flat = {f"{i}/{n}": v for i, st in tensors.items() for n, v in st.items()}
    state[OPTIMIZER_KEY] = ArrayRecord({k: Array(v.numpy()) for k, v in flat.items()})
    state[OPTIMIZER_ROUND_KEY] = ConfigRecord({"round": server_round})
    save_round_file(carry_dir(cfg, site_name), server_round, tensors)
