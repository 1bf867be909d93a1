"""The site's local training and evaluation loops, readable top to bottom.

`train_local` runs `epochs` of knowledge distillation (or plain CE when no
teacher targets are given) on tensors that are already on the device; nothing
in here knows about Flower, files or the teacher backbone.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.config import DistillConfig, TrainConfig
from common.distill.loss import feature_loss, kd_loss
from common.dp_sgd import (
    DPSGD,
    Ledger,
    PrivateSteps,
    check_model,
    planned_steps,
    poisson_batches,
    sample_rate,
    secret_generator,
)
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


@dataclass
class ControlVariates:
    """SCAFFOLD's control variates for one local round (`federation.strategy=scaffold`).

    Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
    Learning", ICML 2020. `server` is the global c, `site` this site's c_i, both
    CPU tensors by the student's parameter names; a name missing from either is
    zeros (round 1). `train_local` adds c - c_i to the gradient of every student
    parameter at every step, then replaces `site` by c_i+ and puts
    Delta c_i = c_i+ - c_i in `delta`.
    """

    server: dict[str, torch.Tensor] = field(default_factory=dict)
    site: dict[str, torch.Tensor] = field(default_factory=dict)
    delta: dict[str, torch.Tensor] = field(default_factory=dict)


class _Drift:
    """SCAFFOLD's correction of each step, and the round's c_i+.

    Each step's gradient g (after `train.grad_clip`) becomes g + c - c_i before
    the optimiser's step. With momentum (and `train.optimizer_state=keep`) the
    buffer then accumulates corrected gradients: SCAFFOLD is defined for plain
    SGD, and correcting the gradient fed to the optimiser is the common practical
    variant (as for Adam).

    c_i+ is the mean over the round's K steps of g + weight_decay * w, the
    gradient of the regularised local loss that the optimiser applies. Under
    plain SGD (no momentum) this is exactly the paper's option II,
    c_i - c + (x - y_i) / (K lr), since then x - y_i = lr * sum(g + wd w + c - c_i)
    (tests/common/test_scaffold.py checks both). Option II's formula itself is
    not used: with momentum mu the model moves about lr / (1 - mu) per unit of
    gradient, so (x - y_i) / (K lr) would make c_i ten times the gradient at
    mu = 0.9 and the correction ten times too strong.
    """

    def __init__(
        self, student: nn.Module, control: ControlVariates, weight_decay: float
    ) -> None:
        self.params = list(student.named_parameters())
        names = {n for n, _ in self.params}
        unknown = sorted((set(control.server) | set(control.site)) - names)
        if unknown:
            raise ValueError(
                f"control variates for {unknown[:3]}, which the student lacks; "
                "server and site must use the same student.arch"
            )
        self.shift = [self._shift(n, p, control) for n, p in self.params]
        self.sums = [torch.zeros_like(p, dtype=torch.float32) for _, p in self.params]
        self.weight_decay = weight_decay
        self.steps = 0

    @staticmethod
    def _shift(name: str, p: nn.Parameter, control: ControlVariates) -> torch.Tensor:
        """c - c_i for one parameter, on its device."""
        out = torch.zeros_like(p, dtype=torch.float32)
        for sign, side in ((1.0, control.server), (-1.0, control.site)):
            if name in side:
                if side[name].shape != p.shape:
                    raise ValueError(
                        f"control variate '{name}' has shape "
                        f"{tuple(side[name].shape)}, the student {tuple(p.shape)}"
                    )
                out.add_(side[name].to(out.device, torch.float32), alpha=sign)
        return out

    def correct(self) -> None:
        """Add c - c_i to every student gradient; sum the uncorrected ones."""
        with torch.no_grad():
            for (_, p), shift, total in zip(
                self.params, self.shift, self.sums, strict=True
            ):
                if p.grad is None:  # unused this step: a zero gradient
                    p.grad = torch.zeros_like(p)
                total.add_(p.grad)
                if self.weight_decay:
                    total.add_(p, alpha=self.weight_decay)
                p.grad.add_(shift)
        self.steps += 1

    def finish(self, control: ControlVariates) -> None:
        """Put c_i+ (the mean gradient) in `control.site` and Delta c_i in `delta`."""
        old = control.site
        new = {
            n: (t / self.steps).cpu()
            for (n, _), t in zip(self.params, self.sums, strict=True)
        }
        control.delta = {
            n: v - old[n].to(v.dtype) if n in old else v.clone() for n, v in new.items()
        }
        control.site = new

    def shift_norm(self) -> float:
        """|c - c_i| of this round (how hard the correction pulls)."""
        return math.sqrt(sum(float((s * s).sum()) for s in self.shift))


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
        kd_where=distill_cfg.kd_where,
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


def _start_loop(
    student: nn.Module,
    data: LocalData,
    train_cfg: TrainConfig,
    distill_cfg: DistillConfig,
    *,
    seed: int,
    proj: nn.Module | None,
    proximal_mu: float,
    epochs: int | None,
    lr: float | None,
    kd_weight: float,
    carry: OptimizerCarry | None,
    control: ControlVariates | None,
) -> _Loop:
    """Seeded RNGs, the optimiser (state restored from `carry`), train mode."""
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
    loop = _Loop(
        student=student,
        proj=proj if r.use_feats else None,
        opt=opt,
        r=r,
        pool=pool,
        gen=gen,
        train_cfg=train_cfg,
        distill_cfg=distill_cfg,
        epochs=epochs or train_cfg.local_epochs,
        global_params=global_params,
        proximal_mu=proximal_mu,
        drift=None
        if control is None
        else _Drift(student, control, train_cfg.weight_decay),
    )
    return loop


def _run_private(loop: _Loop, dp_sgd: DPSGD, ledger: Ledger) -> dict[str, float]:
    """DP-SGD steps recorded in `ledger`; the site's epsilon so far and its inputs."""
    _train_private(loop, dp_sgd, ledger)
    return {
        "dp_sgd_epsilon": ledger.epsilon(dp_sgd.delta, dp_sgd.accountant),
        "dp_sgd_steps": float(ledger.steps),
        "dp_sgd_sample_rate": sample_rate(len(loop.pool), loop.train_cfg.batch_size),
    }


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
    dp_sgd: DPSGD | None = None,
    ledger: Ledger | None = None,
    control: ControlVariates | None = None,
) -> dict[str, float]:
    """Train `student` in place on one site's data; return scalar metrics.

    `lr` is this round's rate (`round_lr`; default `train_cfg.lr`). `kd_weight`
    in [0, 1] scales every teacher term (the site's KD gate): the effective
    alpha is 1 - (1 - alpha) * kd_weight. `carry` holds the optimiser state
    kept across rounds (`train.optimizer_state=keep`). With `dp_sgd` the steps
    are DP-SGD steps (`_train_private`), recorded in `ledger` (the site's
    accountant across rounds; a fresh one when None). With `control` every
    step is SCAFFOLD-corrected (`_Drift`) and `control` comes back with c_i+
    and Delta c_i (the non-private steps only).
    """
    if control is not None and dp_sgd is not None:
        raise ValueError(
            "SCAFFOLD's correction is built for the non-private steps only; "
            "federation.strategy=scaffold does not compose with privacy.dp_sgd"
        )
    t0 = time.perf_counter()
    loop = _start_loop(
        student, data, train_cfg, distill_cfg, seed=seed, proj=proj,
        proximal_mu=proximal_mu, epochs=epochs, lr=lr, kd_weight=kd_weight,
        carry=carry, control=control,
    )
    privacy: dict[str, float] = {}
    if dp_sgd is None:
        _train_plain(loop)
    else:
        privacy = _run_private(loop, dp_sgd, ledger if ledger is not None else Ledger())
    if loop.steps == 0:
        raise ValueError("no training step ran; batch_size too large for the site?")
    if carry is not None:
        carry.state = loop.opt.state_dict()["state"]
    drift: dict[str, float] = {}
    if loop.drift is not None:
        loop.drift.finish(control)
        drift["scaffold_shift_norm"] = loop.drift.shift_norm()
    secs = time.perf_counter() - t0
    out = _train_metrics(loop.sums, loop.steps, loop.seen, len(loop.pool), secs)
    return {**out, **privacy, **drift}


@dataclass
class _Loop:
    """One local training's model, optimiser, data and running sums."""

    student: nn.Module
    proj: nn.Module | None  # the feature loss's projection, when it trains
    opt: torch.optim.Optimizer
    r: _Round
    pool: torch.Tensor  # usable training indices (CPU)
    gen: torch.Generator  # views and shuffling, seeded from train.seed
    train_cfg: TrainConfig
    distill_cfg: DistillConfig
    epochs: int
    global_params: list[torch.Tensor] | None  # FedProx's anchor
    proximal_mu: float
    drift: _Drift | None = None  # SCAFFOLD's correction (federation.strategy)
    sums: dict[str, float] = field(
        default_factory=lambda: {"loss": 0.0, "ce": 0.0, "kd": 0.0, "feat": 0.0}
    )
    steps: int = 0
    seen: int = 0  # sample-gradients

    @property
    def params(self) -> list[nn.Parameter]:
        """What the optimiser steps: the student, and the projection if it trains."""
        extra = list(self.proj.parameters()) if self.proj is not None else []
        return list(self.student.parameters()) + extra

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        """The batch's loss (without the proximal term); its parts go in `sums`."""
        loss, losses, f_loss = _step_loss(
            self.student, self.proj, self.r, idx, self.gen, self.train_cfg,
            self.distill_cfg,
        )  # fmt: skip
        # .item() is a sync point; cheap on the CPU and keeps the metrics exact.
        for key, value in (
            ("loss", loss),
            ("ce", losses["ce"]),
            ("kd", losses["kd"]),
            ("feat", f_loss),
        ):
            self.sums[key] += value.item() if value is not None else 0.0
        return loss


def _train_plain(loop: _Loop) -> None:
    """The round's SGD steps on shuffled batches."""
    cfg, params = loop.train_cfg, loop.params
    for idx in _batches(loop.pool, cfg, loop.gen, loop.epochs):
        loss = loop.loss(idx)
        if loop.global_params is not None:
            loss = loss + proximal_term(
                loop.student, loop.global_params, loop.proximal_mu
            )
        loop.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if loop.drift is not None:
            # after the clipping: c - c_i is not the batch's gradient, and c_i+
            # must average the gradients the steps actually took
            loop.drift.correct()
        loop.opt.step()
        loop.steps += 1
        loop.seen += len(idx)


def _train_private(loop: _Loop, dp: DPSGD, ledger: Ledger) -> None:
    """The round's DP-SGD steps (common/dp_sgd.py), recorded in `ledger`.

    Batches are Poisson samples drawn from secret randomness, so their size
    varies; every planned step runs, an empty batch included (then the step is
    the noise alone), because the accountant counts planned steps. No batch is
    skipped and `train.grad_clip` is not applied: the per-image clipping to
    `dp.max_grad_norm` bounds every step.
    """
    cfg, usable = loop.train_cfg, len(loop.pool)
    check_model(loop.student)
    if dp.delta >= 1.0 / usable:
        log.warning(
            "privacy.dp_sgd_delta=%g is not below 1/%d (this site's usable "
            "images): the guarantee may fail for one patient with that chance",
            dp.delta,
            usable,
        )
    q = sample_rate(usable, cfg.batch_size)
    n_steps = planned_steps(usable, cfg.batch_size, loop.epochs, cfg.local_steps)
    sampler = secret_generator(dp.seed, torch.device("cpu"))  # the pool is on the CPU
    modules = [loop.student] + ([loop.proj] if loop.proj is not None else [])
    device = next(loop.student.parameters()).device
    with PrivateSteps(modules, loop.opt, dp, round(q * usable), device) as private:
        for idx in poisson_batches(loop.pool, q, n_steps, sampler):
            private.zero_grad()
            if len(idx) == 0:
                private.empty_batch()
            else:
                loop.loss(idx).backward()
            private.step(_proximal_grad(loop))
            loop.steps += 1
            loop.seen += len(idx)
    ledger.add(dp.noise_multiplier, q, n_steps)


def _proximal_grad(loop: _Loop):
    """FedProx's gradient mu * (w - w_global), to add after DP-SGD's noise."""
    if loop.global_params is None:
        return None

    def add() -> None:
        # The term depends on no image, so (like weight decay) it needs no
        # clipping or noise; Opacus would drop it, building the step from
        # per-image gradients only.
        for p, g in zip(loop.student.parameters(), loop.global_params, strict=True):
            p.grad.add_(p.detach() - g, alpha=loop.proximal_mu)

    return add


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
