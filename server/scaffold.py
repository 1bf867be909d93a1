"""SCAFFOLD: FedAvg whose sites correct their drift with control variates.

Karimireddy, Kale, Mohri, Reddi, Stich and Suresh, "SCAFFOLD: Stochastic
Controlled Averaging for Federated Learning", ICML 2020. The server keeps a
control variate c (one array per trainable student parameter) and sends it
with the model (`scaffold.c.` arrays in the train message). Each sampled site
i trains with gradients g + c - c_i, keeps its own c_i (`client.site.control`)
and replies its model y_i and Delta c_i = c_i+ - c_i (`scaffold.dc.` arrays).
With S the replies and N the federation's sites, the server moves

    x <- x + server_lr * (mean_i y_i - x)      (FedAvg's example-weighted mean)
    c <- c + (|S| / N) * mean_i Delta c_i       (unweighted: c stays mean_j c_j)

c starts at zeros (sent as nothing in round 1) and is saved with every
checkpoint (`SafeAggregation.optimizer_state`), so a resumed run continues
alike. A sampled site whose reply is left out (failed, rejected) may have
updated its c_i while c does not count it; the paper assumes every sampled
site replies. Flower has no SCAFFOLD, hence this file; the mean itself is
Flower's FedAvg.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.serialization import CONTROL_DELTA_PREFIX, CONTROL_PREFIX, pack

log = logging.getLogger(__name__)


def split_reply(msg: Message) -> tuple[Message, dict[str, np.ndarray]]:
    """(the reply with only its model arrays, its Delta c_i by model key)."""
    rec = msg.content["arrays"]
    delta = {
        k[len(CONTROL_DELTA_PREFIX) :]: rec[k].numpy()
        for k in rec.keys()
        if k.startswith(CONTROL_DELTA_PREFIX)
    }
    model = ArrayRecord(
        {k: rec[k] for k in rec.keys() if not k.startswith(CONTROL_DELTA_PREFIX)}
    )
    out = copy.copy(msg)  # same metadata (sender, round); new content below
    out.content = RecordDict({**msg.content, "arrays": model})
    return out, delta


def update_control(
    control: dict[str, np.ndarray],
    deltas: list[dict[str, np.ndarray]],
    num_sites: int,
) -> dict[str, np.ndarray]:
    """c + (|S| / N) mean_i Delta c_i = c + sum_i Delta c_i / N (a missing key: 0)."""
    total = {k: v.astype(np.float64) for k, v in control.items()}
    for delta in deltas:
        for k, d in delta.items():
            total[k] = total.get(k, np.zeros(d.shape, np.float64)) + d / num_sites
    return {k: v.astype(np.float32) for k, v in total.items()}


def server_step(
    reference: ArrayRecord, mean: ArrayRecord, server_lr: float
) -> ArrayRecord:
    """reference + server_lr * (mean - reference) on the floating arrays.

    Integer buffers and arrays new this round keep the mean; a step of 1 is
    the mean itself, bit for bit.
    """
    if server_lr == 1.0:
        return mean
    out = {}
    for k in mean.keys():
        avg = mean[k].numpy()
        if k in reference and np.issubdtype(reference[k].numpy().dtype, np.floating):
            r = reference[k].numpy().astype(np.float64)
            avg = (r + server_lr * (avg.astype(np.float64) - r)).astype(avg.dtype)
        out[k] = Array(avg)
    return ArrayRecord(out)


class Scaffold(FedAvg):
    """Flower's FedAvg, with the control variate c sent out and updated."""

    def __init__(
        self,
        *args,
        num_sites: int,
        server_lr: float = 1.0,
        transfer_dtype: str = "float32",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.num_sites = num_sites
        self.server_lr = server_lr
        self.transfer_dtype = transfer_dtype
        # c by model key ("student.fc.weight"), float32; {} means zeros
        self.control: dict[str, np.ndarray] = {}
        # the float32 global model this round started from (SafeAggregation)
        self.current_arrays: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's train messages, with c beside the model (`scaffold.c.` arrays)."""
        if self.control:
            c = pack(
                {CONTROL_PREFIX + k: v for k, v in self.control.items()},
                self.transfer_dtype,
                allowed=(CONTROL_PREFIX,),
            )
            arrays = ArrayRecord(
                {**{k: arrays[k] for k in arrays.keys()}, **{k: c[k] for k in c.keys()}}
            )
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's mean of the models, the server step, and c's update."""
        split = [split_reply(m) for m in replies]
        models = [m for m, _ in split]
        arrays, metrics = super().aggregate_train(server_round, models)
        if arrays is None:
            return arrays, metrics
        if self.current_arrays is not None:
            arrays = server_step(self.current_arrays, arrays, self.server_lr)
        self.control = update_control(
            self.control, [d for _, d in split], self.num_sites
        )
        norm = float(np.sqrt(sum(float((v * v).sum()) for v in self.control.values())))
        log.debug("round %d: SCAFFOLD |c| = %.4g", server_round, norm)
        return arrays, MetricRecord({**dict(metrics or {}), "scaffold_c_norm": norm})
