"""One round at a site: local KD training and evaluation of the received model.

`train_round` and `evaluate_round` are the plain functions the ClientApp's
train and evaluate handlers call. What a site keeps from one round to the next
(its local head, its own model under `local`, its optimiser state, its DP-SGD
ledger, its SCAFFOLD control variate) lives in Flower's `context.state` (the
`state` argument), under the keys below and those of `client.site.carry`,
`client.site.accountant` and `client.site.control`.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

from client.site.accountant import load_ledger, save_ledger
from client.site.carry import load_carry, save_carry
from client.site.control import control_delta_arrays, load_control, save_control
from client.site.prepared import PreparedSite
from client.site.teacher import uses_teacher
from common.config import ExperimentConfig
from common.distill.gate import covers_every_class, gate_counts, gate_weight
from common.dp_sgd import DPSGD
from common.metrics import balanced_accuracy
from common.models import ridge
from common.models.head import fit_head, head_logits, train_head
from common.models.student import create_student
from common.serialization import (
    HEAD_PREFIX,
    PROJ_PREFIX,
    STUDENT_PREFIX,
    load_into,
    module_arrays,
    pack,
)
from common.timing import phase
from common.train import (
    LocalData,
    evaluate,
    evaluate_logits,
    predict_proba,
    round_lr,
    train_local,
)

LOCAL_HEAD_KEY = "fedkd.local-head"
LOCAL_MODEL_KEY = "fedkd.local-student"


def site_seed(cfg: ExperimentConfig, server_round: int, name: str) -> int:
    """The local training seed of site `name` in `server_round`.

    Same seed, round and site -> same local run, so resumed runs match exactly.
    """
    return (cfg.train.seed * 1_000_003 + server_round * 7919 + hash_name(name)) % (
        2**31
    )


def hash_name(name: str) -> int:
    """A stable (not salted) hash of the full site name (SHA-256, 31 bits)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _has_head(arrays: ArrayRecord) -> bool:
    """Whether the received arrays carry a (federated) teacher head."""
    return any(k.startswith(HEAD_PREFIX) for k in arrays.keys())


def _load_head(record: ArrayRecord, feature_dim: int, num_classes: int) -> nn.Linear:
    """A linear teacher head with the `head.` arrays of `record`."""
    head = nn.Linear(feature_dim, num_classes)
    load_into(head, record, HEAD_PREFIX)
    return head


def _head_for_round(
    cfg: ExperimentConfig,
    site: PreparedSite,
    arrays: ArrayRecord,
    state: RecordDict,
    num_classes: int,
    seed: int,
) -> tuple[nn.Linear, nn.Linear | None]:
    """(head giving this round's soft targets, head to send back or None)."""
    if cfg.teacher.head == "closed_form":
        # the server's ridge head, scaled to logits there: the same at every
        # site and in every round, and usable by a site without labels
        return _load_head(arrays, site.feats_train.shape[-1], num_classes), None
    feats, labels = _labelled_features(site)
    if cfg.teacher.head == "local":
        if LOCAL_HEAD_KEY in state:
            head = _load_head(state[LOCAL_HEAD_KEY], feats.shape[1], num_classes)
        else:
            head = _fit(cfg, feats, labels, num_classes, seed)
            state[LOCAL_HEAD_KEY] = pack(module_arrays(head, HEAD_PREFIX))
        return head, None
    # Federated head: warm-start from the global head when the server has one.
    if _has_head(arrays):
        global_head = _load_head(arrays, feats.shape[1], num_classes)
        local = nn.Linear(feats.shape[1], num_classes)
        local.load_state_dict(global_head.state_dict())
        train_head(
            local,
            feats.numpy(),
            labels.numpy(),
            epochs=cfg.teacher.head_epochs,
            lr=cfg.teacher.head_lr,
            weight_decay=cfg.teacher.head_weight_decay,
            seed=seed,
        )
        return global_head, local
    local = _fit(cfg, feats, labels, num_classes, seed)
    return local, local


def _labelled_features(site: PreparedSite) -> tuple[torch.Tensor, torch.Tensor]:
    """(features of every view of the labelled training images, their labels)."""
    labelled = site.train.labelled.cpu()  # heads are fitted on the CPU
    feats = site.feats_train[:, labelled].reshape(-1, site.feats_train.shape[-1])
    labels = site.train.y.cpu()[labelled].repeat(site.feats_train.shape[0])
    return feats, labels


def head_stats(site: PreparedSite, num_classes: int) -> dict[str, np.ndarray]:
    """The site's ridge statistics for the closed-form head (the handshake sends them).

    Per-class counts, feature sums and Gram matrices of the labelled training
    features, every view included: they reveal the site's class counts and
    per-class feature moments, never an image or a single feature vector.
    """
    feats, labels = _labelled_features(site)
    stats = ridge.site_stats(feats.double().numpy(), labels.numpy(), num_classes)
    return ridge.to_arrays(stats)


def _fit(
    cfg: ExperimentConfig,
    feats: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    seed: int,
) -> nn.Linear:
    """A head fitted in closed form to the site's labelled features."""
    return fit_head(
        feats.numpy(),
        labels.numpy(),
        num_classes,
        weight_decay=cfg.teacher.head_weight_decay,
        seed=seed,
    )


def _student_source(
    cfg: ExperimentConfig, state: RecordDict, arrays: ArrayRecord
) -> ArrayRecord:
    """The global arrays, or for `local` the site's own model once it has one."""
    if cfg.federation.strategy == "local" and LOCAL_MODEL_KEY in state:
        return state[LOCAL_MODEL_KEY]
    return arrays


def make_student(cfg: ExperimentConfig, num_classes: int, channels: int) -> nn.Module:
    """The student network named by the config."""
    return create_student(cfg.student.arch, num_classes, channels)


def make_proj(student: nn.Module, feature_dim: int) -> nn.Linear:
    """Projection from the student's pooled features to the teacher's space."""
    return nn.Linear(student.num_features, feature_dim)


def kd_gate(
    cfg: ExperimentConfig,
    site: PreparedSite,
    student: nn.Module,
    head: nn.Linear,
    federation_weight: float | None = None,
) -> tuple[float, dict[str, float]]:
    """(weight of the teacher's terms this round, metrics to log) for this site.

    Teacher probe and the received student are compared by balanced ACC on the
    site's held-out test part, which neither trains on. A test part that lacks
    a class cannot judge (common/distill/gate.py): the site then takes the
    federation's weight (`federation_weight`, from every site's counts; 1.0
    before the server has one) and logs `gate_local` 0. With class counts
    shared, the per-class counts go into the metrics for the server to sum.
    """
    if not cfg.distill.gate or site.feats_test is None or len(site.test_y) == 0:
        return 1.0, {"kd_weight": 1.0}
    y = site.test_y.cpu().numpy()
    k = head.out_features
    with torch.no_grad():
        t_probs = torch.softmax(head_logits(head, site.feats_test).float(), dim=1)
    s_probs = predict_proba(student, site.test_x).cpu().numpy()
    t_score = balanced_accuracy(y, t_probs.numpy())
    s_score = balanced_accuracy(y, s_probs)
    metrics = {"gate_teacher_bacc": t_score, "gate_student_bacc": s_score}
    if covers_every_class(y, k, cfg.distill.gate_min_per_class):
        d = cfg.distill
        w = gate_weight(t_score, s_score, floor=d.gate_floor, margin=d.gate_margin)
        metrics["gate_local"] = 1.0
    else:
        w = 1.0 if federation_weight is None else federation_weight
        metrics["gate_local"] = 0.0
    if cfg.privacy.share_class_counts:
        metrics.update(gate_counts(y, t_probs.numpy(), s_probs, k))
    return w, {"kd_weight": w, **metrics}


def _with_targets(
    cfg: ExperimentConfig, site: PreparedSite, head: nn.Linear
) -> LocalData:
    """The site's training tensors plus the head's soft targets for every view."""
    feats = site.feats_train
    with torch.no_grad():
        logits = head_logits(head, feats.reshape(-1, feats.shape[-1]))
    # Teacher targets go to the device once per round, not per batch; the
    # features only when the feature loss reads them.
    on_device = feats.to(site.device) if cfg.distill.feature_weight > 0 else feats
    return LocalData(
        x=site.train.x,
        y=site.train.y,
        labelled=site.train.labelled,
        teacher_logits=logits.reshape(feats.shape[0], site.train.n, -1).to(site.device),
        teacher_feats=on_device,
    )


def _projection(
    student: nn.Module, site: PreparedSite, source: ArrayRecord
) -> nn.Linear:
    """The student-to-teacher projection of the feature loss, as received."""
    proj = make_proj(student, site.feats_train.shape[-1])
    load_into(proj, source, PROJ_PREFIX)
    return proj.to(site.device)


def _teacher_terms(
    cfg: ExperimentConfig,
    site: PreparedSite,
    arrays: ArrayRecord,
    state: RecordDict,
    student: nn.Module,
    source: ArrayRecord,
    num_classes: int,
    seed: int,
    federation_weight: float | None,
    out: dict[str, np.ndarray],
    metrics: dict[str, float],
) -> tuple[LocalData, nn.Linear | None, float]:
    """(data with soft targets, feature projection or None, KD weight).

    Adds the head to send back (if any) to `out` and the gate's metrics to
    `metrics`.
    """
    with phase("head"):  # the round's head and its soft targets
        target_head, send_head = _head_for_round(
            cfg, site, arrays, state, num_classes, seed
        )
        data = _with_targets(cfg, site, target_head)
    with phase("gate"):
        kd_weight, gate_metrics = kd_gate(
            cfg, site, student, target_head, federation_weight
        )
    metrics.update(gate_metrics)
    if send_head is not None:
        out.update(module_arrays(send_head, HEAD_PREFIX))
    if cfg.distill.feature_weight <= 0:
        return data, None, kd_weight
    return data, _projection(student, site, source), kd_weight


def train_round(
    cfg: ExperimentConfig,
    site: PreparedSite,
    arrays: ArrayRecord,
    state: RecordDict,
    server_round: int,
    num_classes: int,
    proximal_mu: float = 0.0,
    federation_weight: float | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """One round of local KD; returns (arrays to send, scalar metrics).

    `federation_weight` is the KD gate's verdict from every site's counts,
    which a site whose test part lacks a class follows (see `kd_gate`).
    """
    seed = site_seed(cfg, server_round, site.name)
    student = make_student(cfg, num_classes, site.channels)
    source = _student_source(cfg, state, arrays)
    load_into(student, source, STUDENT_PREFIX)
    student.to(site.device)  # a no-op on the CPU
    out: dict[str, np.ndarray] = {}
    metrics: dict[str, float] = {}
    data, proj, kd_weight = site.train, None, 1.0
    if uses_teacher(cfg):
        data, proj, kd_weight = _teacher_terms(
            cfg, site, arrays, state, student, source, num_classes, seed,
            federation_weight, out, metrics,
        )
    carry = load_carry(cfg, state, server_round, site.name)
    ledger = load_ledger(cfg, state, server_round, site.name)  # privacy.dp_sgd
    control = load_control(cfg, state, arrays, server_round, site.name)  # scaffold
    metrics.update(
        train_local(
            student,
            data,
            cfg.train,
            cfg.distill,
            seed=seed,
            proj=proj,
            proximal_mu=proximal_mu,
            lr=round_lr(cfg.train, server_round, cfg.federation.rounds),
            kd_weight=kd_weight,
            carry=carry,
            dp_sgd=DPSGD.from_config(cfg.privacy),
            ledger=ledger,
            control=control,
        )
    )
    save_carry(cfg, state, carry, server_round, site.name)
    save_ledger(cfg, state, ledger, site.name)
    save_control(cfg, state, control, server_round, site.name)
    out.update(module_arrays(student, STUDENT_PREFIX))
    out.update(control_delta_arrays(control))  # Delta c_i; c_i stays here
    if proj is not None:
        out.update(module_arrays(proj, PROJ_PREFIX))
    if cfg.federation.strategy == "local":
        state[LOCAL_MODEL_KEY] = pack(out)
    return out, metrics


def _teacher_metrics(
    site: PreparedSite, arrays: ArrayRecord, state: RecordDict, num_classes: int
) -> dict[str, float]:
    """`teacher_*` metrics of the received (else the site's own) head, if any."""
    dim = site.feats_test.shape[1]
    if _has_head(arrays):
        head = _load_head(arrays, dim, num_classes)
    elif LOCAL_HEAD_KEY in state:
        head = _load_head(state[LOCAL_HEAD_KEY], dim, num_classes)
    else:
        return {}
    with torch.no_grad():
        t = evaluate_logits(head_logits(head, site.feats_test), site.test_y.cpu())
    return {f"teacher_{k}": v for k, v in t.items() if k != "num-examples"}


def evaluate_round(
    cfg: ExperimentConfig,
    site: PreparedSite,
    arrays: ArrayRecord,
    state: RecordDict,
    num_classes: int,
) -> dict[str, float]:
    """Metrics of the global (or, for `local`, the site's own) student and teacher."""
    student = make_student(cfg, num_classes, site.channels)
    source = _student_source(cfg, state, arrays)
    load_into(student, source, STUDENT_PREFIX)
    metrics = evaluate(student.to(site.device), site.test_x, site.test_y)
    if uses_teacher(cfg) and site.feats_test is not None:
        metrics.update(_teacher_metrics(site, arrays, state, num_classes))
    # An undefined metric (AUC on a one-class test set) is left out, not faked.
    return {k: v for k, v in metrics.items() if not math.isnan(v)}
