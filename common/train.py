"""The site's local training and evaluation loops, readable top to bottom.

`train_local` runs `epochs` of knowledge distillation (or plain CE when no
teacher targets are given) on tensors that are already on the device; nothing
in here knows about Flower, files or the teacher backbone.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.config import DistillConfig, TrainConfig
from common.distill.loss import feature_loss, kd_loss
from common.metrics import summarize

log = logging.getLogger(__name__)


@dataclass
class LocalData:
    """A site's training tensors: V fixed views of N images."""

    x: torch.Tensor  # float (V, N, C, H, W), normalised student inputs
    y: torch.Tensor  # int64 (N,)
    labelled: torch.Tensor  # bool (N,)
    teacher_logits: torch.Tensor | None = None  # float (V, N, K)
    teacher_feats: torch.Tensor | None = None  # float (V, N, D)

    @property
    def n(self) -> int:
        return int(self.y.shape[0])


def _forward(
    student: nn.Module, x: torch.Tensor, want_features: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not want_features:
        return student(x), None
    feats = student.forward_features(x)
    pre = student.forward_head(feats, pre_logits=True)
    return student.forward_head(feats), pre


def _make_optimizer(params, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


@dataclass
class OptimizerCarry:
    """A site's optimiser state carried from one round into the next.

    `train_local` loads `state` (a torch optimizer `state_dict()['state']`) into
    the round's new optimiser when it fits the parameters, and leaves the final
    state there. With `train.optimizer_state=reset` no carry is passed.
    """

    state: dict | None = None


def _restore(opt: torch.optim.Optimizer, carry: OptimizerCarry | None) -> None:
    """Load a carried state whose shapes match; the round's lr stays as set."""
    if carry is None or not carry.state:
        return
    params = [p for g in opt.param_groups for p in g["params"]]
    fits = set(carry.state) <= set(range(len(params))) and all(
        v.shape == params[i].shape
        for i, st in carry.state.items()
        for v in st.values()
        if torch.is_tensor(v) and v.ndim > 0
    )
    if not fits:
        log.warning("carried optimiser state does not fit the model; starting anew")
        return
    # state_dict() names parameters by index and holds this round's lr
    sd = opt.state_dict()
    sd["state"] = carry.state
    opt.load_state_dict(sd)


def round_lr(cfg: TrainConfig, server_round: int, rounds: int) -> float:
    """The learning rate of `server_round` (1-based) out of `rounds`.

    Cosine decays from `lr` in round 1 to `lr * lr_final_factor` in the last
    round. It depends only on the round number the server sends, so a resumed
    run uses exactly the rates of an uninterrupted one.
    """
    if cfg.lr_schedule == "constant" or rounds <= 1 or server_round <= 0:
        return cfg.lr
    t = (min(server_round, rounds) - 1) / (rounds - 1)
    low = cfg.lr * cfg.lr_final_factor
    return low + 0.5 * (cfg.lr - low) * (1.0 + math.cos(math.pi * t))


def log_prior(counts: torch.Tensor) -> torch.Tensor:
    """log of the label prior from per-class counts (+1 smoothing: no -inf)."""
    c = counts.double() + 1.0
    return torch.log(c / c.sum()).float()


def proximal_term(
    student: nn.Module, global_params: list[torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx's (mu / 2) * ||w - w_global||^2 over the student's parameters."""
    sq = sum(
        (p - g).pow(2).sum()
        for p, g in zip(student.parameters(), global_params, strict=True)
    )
    return 0.5 * mu * sq


def _batches(pool: torch.Tensor, cfg: TrainConfig, gen: torch.Generator, epochs):
    """Index batches of one round: `epochs` passes, or `train.local_steps` steps.

    A batch of one item is skipped (BatchNorm cannot train on it) and does not
    count as a step.
    """
    steps = 0
    epoch = 0
    while (cfg.local_steps > 0 and steps < cfg.local_steps) or (
        cfg.local_steps == 0 and epoch < epochs
    ):
        order = pool[torch.randperm(len(pool), generator=gen)]
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            if len(idx) < 2:
                continue
            yield idx
            steps += 1
            if cfg.local_steps and steps >= cfg.local_steps:
                return
        epoch += 1
        if steps == 0:
            return  # no usable batch at all; train_local reports it


@dataclass
class _Round:
    """What one local round's steps share (resolved once in `train_local`)."""

    data: LocalData
    alpha: float
    use_teacher: bool
    use_feats: bool
    kd_weight: float
    offset: torch.Tensor | None = None


def _step_loss(
    student: nn.Module,
    proj: nn.Module | None,
    r: _Round,
    idx: torch.Tensor,
    gen: torch.Generator,
    train_cfg: TrainConfig,
    distill_cfg: DistillConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """(loss, kd_loss's parts, feature loss) of one batch."""
    data = r.data
    # A random fixed view per item: the teacher's cached targets were computed
    # for exactly these inputs (common/data/views.py).
    view = torch.randint(data.x.shape[0], (len(idx),), generator=gen)
    logits, pre = _forward(student, data.x[view, idx], r.use_feats)
    t_logits = data.teacher_logits[view, idx] if r.use_teacher else None
    if r.offset is None and train_cfg.logit_adjust > 0:
        # Logit adjustment (FedLC-style): CE sees logits + tau * log(site prior),
        # so a class the site rarely sees is not pushed down for being rare.
        counts = torch.bincount(data.y[data.labelled], minlength=logits.shape[1])
        r.offset = train_cfg.logit_adjust * log_prior(counts)
    losses = kd_loss(
        logits,
        t_logits,
        data.y[idx],
        alpha=r.alpha if r.use_teacher else 1.0,
        temperature=distill_cfg.temperature,
        labelled=data.labelled[idx],
        unlabelled_weight=distill_cfg.unlabelled_weight * r.kd_weight
        if r.use_teacher
        else 0.0,
        ce_offset=r.offset,
    )
    loss, f_loss = losses["loss"], None
    if r.use_feats:
        f_loss = feature_loss(
            proj(pre), data.teacher_feats[view, idx], kind=distill_cfg.feature_loss
        )
        loss = loss + distill_cfg.feature_weight * r.kd_weight * f_loss
    return loss, losses, f_loss


def _resolve(
    data: LocalData, distill_cfg: DistillConfig, proj, kd_weight: float
) -> tuple[_Round, torch.Tensor]:
    """The round's KD switches and the pool of usable training indices."""
    use_teacher = (
        data.teacher_logits is not None and distill_cfg.alpha < 1.0 and kd_weight > 0
    )
    use_feats = (
        proj is not None
        and data.teacher_feats is not None
        and distill_cfg.feature_weight * kd_weight > 0
    )
    if use_teacher or use_feats:
        pool = torch.arange(data.n)
    else:
        # Without a teacher an unlabelled image carries no signal at all.
        pool = torch.nonzero(data.labelled.cpu()).flatten()  # indices on the CPU
    if len(pool) < 2:
        raise ValueError(f"site has {len(pool)} usable training images; need >= 2")
    # alpha = 1 in the config means plain supervised training
    alpha = 1.0 - (1.0 - distill_cfg.alpha) * kd_weight
    return _Round(data, alpha, use_teacher, use_feats, kd_weight), pool


def train_local(
    student: nn.Module,
    data: LocalData,
    train_cfg: TrainConfig,
    distill_cfg: DistillConfig,
    *,
    seed: int,
    proj: nn.Module | None = None,
    proximal_mu: float = 0.0,
    epochs: int | None = None,
    lr: float | None = None,
    kd_weight: float = 1.0,
    carry: OptimizerCarry | None = None,
) -> dict[str, float]:
    """Train `student` in place on one site's data; return scalar metrics.

    `lr` is this round's rate (`round_lr`; default `train_cfg.lr`). `kd_weight`
    in [0, 1] scales every teacher term (the site's KD gate): the effective
    alpha is 1 - (1 - alpha) * kd_weight. `carry` holds the optimiser state
    kept across rounds (`train.optimizer_state=keep`).
    """
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    r, pool = _resolve(data, distill_cfg, proj, kd_weight)
    params = list(student.parameters()) + (
        list(proj.parameters()) if r.use_feats else []
    )
    opt = _make_optimizer(params, train_cfg, train_cfg.lr if lr is None else lr)
    _restore(opt, carry)
    global_params = (
        [p.detach().clone() for p in student.parameters()] if proximal_mu > 0 else None
    )
    student.train()
    if proj is not None:
        proj.train()
    sums = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "feat": 0.0}
    steps = seen = 0
    for idx in _batches(pool, train_cfg, gen, epochs or train_cfg.local_epochs):
        loss, losses, f_loss = _step_loss(
            student, proj, r, idx, gen, train_cfg, distill_cfg
        )
        if global_params is not None:
            loss = loss + proximal_term(student, global_params, proximal_mu)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, train_cfg.grad_clip)
        opt.step()
        # .item() is a sync point; cheap on the CPU and keeps the metrics exact.
        for key, value in (("loss", loss), ("ce", losses["ce"]),
                           ("kd", losses["kd"]), ("feat", f_loss)):
            sums[key] += value.item() if value is not None else 0.0
        steps += 1
        seen += len(idx)
    if steps == 0:
        raise ValueError("no training step ran; batch_size too large for the site?")
    if carry is not None:
        carry.state = opt.state_dict()["state"]
    return _train_metrics(sums, steps, seen, len(pool), time.perf_counter() - t0)


def _train_metrics(
    sums: dict[str, float], steps: int, seen: int, usable: int, secs: float
) -> dict[str, float]:
    """Per-step means of the loss parts, with the round's size and speed."""
    if not np.isfinite(sums["loss"]):
        log.warning("non-finite training loss at this site (lr too high?)")
    out = {f"train_{k}": v / steps for k, v in sums.items()}
    out.update(
        {
            "num-examples": float(usable),
            # SGD steps and sample-gradients of this round (the compute budget)
            "train_steps": float(steps),
            "train_samples": float(seen),
            "train_seconds": secs,
            "train_images_per_s": seen / max(secs, 1e-9),
        }
    )
    return out


@torch.inference_mode()
def predict_proba(
    model: nn.Module, x: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """Class probabilities of `model` on `x`, batched, in eval mode."""
    model.eval()
    outs = [model(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)]
    return torch.softmax(torch.cat(outs), dim=1)


def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256
) -> dict[str, float]:
    """ACC, AUC, CE loss and count of `model` on (x, y)."""
    probs = predict_proba(model, x, batch_size)
    loss = F.nll_loss(torch.log(probs.clamp_min(1e-12)), y).item() if len(y) else 0.0
    return summarize(y.cpu().numpy(), probs.cpu().numpy(), loss)


def evaluate_logits(logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Metrics for precomputed logits (the teacher probe)."""
    probs = torch.softmax(logits.float(), dim=1)
    loss = F.cross_entropy(logits.float(), y).item() if len(y) else 0.0
    return summarize(y.cpu().numpy(), probs.cpu().numpy(), loss)
