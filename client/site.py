"""Everything a hospital does with its own data, kept off the wire.

`get_site` assembles the site's tensors (student views, labels, labelled mask,
cached teacher features) once per process; `train_round`, `evaluate_round` and
`site_info` are the plain functions the ClientApp handlers call.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from torch import nn

from common.config import ExperimentConfig
from common.data.sites import (
    SiteData,
    build_sites,
    load_site,
    pool_sites,
    simulated_nodes,
)
from common.data.sources import load_dataset
from common.data.views import apply_view, decode_size, to_student_tensor
from common.device import setup_device
from common.distill.features import cached_features
from common.distill.gate import gate_weight
from common.errors import DataError
from common.metrics import balanced_accuracy
from common.models.head import fit_head, head_logits, train_head
from common.models.student import create_student
from common.models.teacher import FrozenTeacher, load_teacher
from common.serialization import (
    HEAD_PREFIX,
    PROJ_PREFIX,
    STUDENT_PREFIX,
    load_into,
    module_arrays,
    pack,
)
from common.train import (
    LocalData,
    OptimizerCarry,
    evaluate,
    evaluate_logits,
    predict_proba,
    round_lr,
    train_local,
)

log = logging.getLogger(__name__)

LOCAL_HEAD_KEY = "fedkd.local-head"
LOCAL_MODEL_KEY = "fedkd.local-student"
OPTIMIZER_KEY = "fedkd.optimizer-state"


def uses_teacher(cfg: ExperimentConfig) -> bool:
    """Whether this experiment needs teacher outputs at the sites."""
    return cfg.distill.alpha < 1.0 or cfg.distill.feature_weight > 0


def base_image_size(cfg: ExperimentConfig) -> int:
    """Side at which images are decoded: large enough for teacher and student."""
    return decode_size(cfg.data.image_size, cfg.teacher.image_size)


@dataclass
class Site:
    """One hospital's prepared data. Never serialised, never sent."""

    name: str
    classes: tuple[str, ...]
    channels: int
    train: LocalData
    test_x: torch.Tensor
    test_y: torch.Tensor
    feats_train: torch.Tensor | None  # (V, N, D) teacher features of train views
    feats_test: torch.Tensor | None  # (N, D) teacher features of the test images
    teacher_info: dict
    class_counts: list[int]
    # where the student trains and is evaluated; x/y tensors already live there
    device: torch.device = torch.device("cpu")
    # a deployed site (its own data source), not a simulated partition
    deployed: bool = False


# Per-process memo of derived, read-only data (decoded images, teacher). It is a
# cache, not federated state: rebuilding it gives identical values.
@functools.lru_cache(maxsize=4)
def _dataset(
    source: str, size: int, cache_dir: str, seed: int, val: float, test: float
):
    return load_dataset(
        source, size, cache_dir, seed=seed, val_fraction=val, test_fraction=test
    )


@functools.lru_cache(maxsize=2)
def _teacher(arch: str, weights: str, image_size: int, device: str) -> FrozenTeacher:
    from common.config import TeacherConfig

    teacher = load_teacher(
        TeacherConfig(arch=arch, weights=weights, image_size=image_size)
    )
    return teacher.to(device) if device != "cpu" else teacher


def site_device(cfg: ExperimentConfig) -> torch.device:
    """The device `run.device` resolves to here (CPU threads set on the way)."""
    return setup_device(cfg.run.device, cfg.train.num_threads)


def teacher_for(cfg: ExperimentConfig) -> FrozenTeacher:
    """The frozen teacher named by the config (memoised per process)."""
    t = cfg.teacher
    return _teacher(t.arch, t.weights, t.image_size, str(site_device(cfg)))


def dataset_for(cfg: ExperimentConfig):
    """The experiment's whole dataset, decoded at `base_image_size` (memoised)."""
    return _dataset(
        cfg.data.source,
        base_image_size(cfg),
        cfg.data.cache_dir,
        cfg.train.seed,
        cfg.data.val_fraction,
        cfg.data.test_fraction,
    )


def site_data(cfg: ExperimentConfig, node_config: dict) -> SiteData:
    """The raw images of the site named by the node config."""
    size = base_image_size(cfg)
    cache_dir = str(node_config.get("cache-dir", cfg.data.cache_dir))
    if "data-source" in node_config:  # deployment: the site's data is the site's
        return load_site(
            str(node_config["data-source"]),
            size,
            cache_dir,
            cfg.train.seed,
            str(node_config.get("site", "site")),
        )
    if "partition-id" not in node_config:
        raise DataError(
            "node config names no data: give data-source=<br35h|npz:..|folder:..> "
            "(deployment) or partition-id (simulation)"
        )
    pid = int(node_config["partition-id"])
    nodes = simulated_nodes(cfg.federation.strategy, cfg.partition.sites)
    n_part = int(node_config.get("num-partitions", nodes))
    if n_part != nodes:
        raise DataError(
            f"engine runs {n_part} nodes but federation.strategy="
            f"{cfg.federation.strategy} with partition.sites={cfg.partition.sites} "
            f"needs {nodes}; they must match"
        )
    sites = build_sites(dataset_for(cfg), cfg.partition, cfg.train.seed)
    return pool_sites(sites) if cfg.federation.strategy == "pooled" else sites[pid]


def teacher_features(
    cfg: ExperimentConfig, images: np.ndarray, views: int, cache_root: str | Path
) -> tuple[np.ndarray, dict]:
    """Cached teacher features (V, N, D) for `views` fixed views of `images`.

    The teacher is built (memoised per process) only when some image is not
    cached yet; see common/distill/features.py.
    """
    return cached_features(
        cfg.teacher, images, views, cache_root, lambda: teacher_for(cfg)
    )


def build_site(cfg: ExperimentConfig, node_config: dict) -> Site:
    """Decode, shift, view and featurise one site's data."""
    raw = site_data(cfg, node_config)
    classes = class_names(cfg, raw)
    device = site_device(cfg)
    cache_root = node_config.get("cache-dir", cfg.teacher.cache_dir)
    # Every method trains on the same fixed views, so augmentation is equal
    # across methods; the teacher's targets are cached for exactly these views.
    views = cfg.teacher.views if cfg.train.augment else 1
    size = cfg.data.image_size
    x = torch.stack(
        [to_student_tensor(apply_view(raw.train.images, v), size) for v in range(views)]
    )
    feats_train = feats_test = None
    info: dict = {"used": False}
    if uses_teacher(cfg):
        ft, info = teacher_features(cfg, raw.train.images, views, cache_root)
        fs, _ = teacher_features(cfg, raw.test.images, 1, cache_root)
        feats_train, feats_test = torch.from_numpy(ft), torch.from_numpy(fs[0])
        info["used"] = True
    n_cls = max(len(classes), int(raw.train.labels.max(initial=0)) + 1)
    counts = np.bincount(raw.train.labels, minlength=n_cls).tolist()
    # Moved to the device once here, never per batch (a no-op on the CPU).
    return Site(
        name=raw.name,
        classes=classes,
        channels=int(raw.train.images.shape[-1]),
        train=LocalData(
            x=x.to(device),
            y=torch.from_numpy(raw.train.labels.astype(np.int64)).to(device),
            labelled=torch.from_numpy(raw.labelled.astype(bool)).to(device),
        ),
        test_x=to_student_tensor(raw.test.images, size).to(device),
        test_y=torch.from_numpy(raw.test.labels.astype(np.int64)).to(device),
        feats_train=feats_train,
        feats_test=feats_test,
        teacher_info=info,
        class_counts=counts,
        device=device,
        deployed="data-source" in node_config,
    )


def class_names(cfg: ExperimentConfig, raw: SiteData) -> tuple[str, ...]:
    """`data.classes` when set (checked against the labels), else the source's."""
    if not cfg.data.classes:
        return tuple(raw.classes)
    names = tuple(c.strip() for c in cfg.data.classes.split(","))
    top = max(int(raw.train.labels.max(initial=0)), int(raw.test.labels.max(initial=0)))
    if top >= len(names):
        raise DataError(
            f"site {raw.name}: label {top} found but data.classes names "
            f"{len(names)} classes ({cfg.data.classes}); list one name per label"
        )
    return names


_SITES: dict[tuple[str, str], Site] = {}


def get_site(cfg: ExperimentConfig, node_config: dict) -> Site:
    """The site for (experiment, node), built once per process."""
    key = (cfg.to_yaml(), repr(sorted(dict(node_config).items())))
    if key not in _SITES:
        if len(_SITES) > 256:  # harness runs many experiments in one process
            _SITES.clear()
        _SITES[key] = build_site(cfg, node_config)
    return _SITES[key]


def site_info(cfg: ExperimentConfig, site: Site) -> dict:
    """Scalar facts about the site for the server's handshake (no data)."""
    classes = site.classes
    info = {
        "classes": list(classes),
        "num-train": site.train.n,
        "num-test": int(site.test_y.shape[0]),
        "num-labelled": int(site.train.labelled.sum()),
        "channels": site.channels,
        "num-classes": len(classes),
        "teacher-used": bool(site.teacher_info.get("used", False)),
        "teacher-weights": str(site.teacher_info.get("weights_source", "none")),
        "teacher-feature-dim": int(site.teacher_info.get("feature_dim", 0)),
    }
    if site.deployed:  # the model card then describes sites, not a partition
        info["deployed"] = True
    if cfg.privacy.share_class_counts:  # the site's prevalence, exactly
        info["class-counts"] = [int(c) for c in site.class_counts]
    return info


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


def _head_for_round(
    cfg: ExperimentConfig,
    site: Site,
    arrays: ArrayRecord,
    state: RecordDict,
    num_classes: int,
    seed: int,
) -> tuple[nn.Linear, nn.Linear | None]:
    """(head giving this round's soft targets, head to send back or None)."""
    labelled = site.train.labelled.cpu()  # the head is fitted on the CPU
    feats = site.feats_train[:, labelled].reshape(-1, site.feats_train.shape[-1])
    labels = site.train.y.cpu()[labelled].repeat(site.feats_train.shape[0])
    if cfg.teacher.head == "local":
        if LOCAL_HEAD_KEY in state:
            head = nn.Linear(feats.shape[1], num_classes)
            load_into(head, state[LOCAL_HEAD_KEY], HEAD_PREFIX)
        else:
            head = _fit(cfg, feats, labels, num_classes, seed)
            state[LOCAL_HEAD_KEY] = pack(module_arrays(head, HEAD_PREFIX))
        return head, None
    # Federated head: warm-start from the global head when the server has one.
    has_global = any(k.startswith(HEAD_PREFIX) for k in arrays.keys())
    if has_global:
        global_head = nn.Linear(feats.shape[1], num_classes)
        load_into(global_head, arrays, HEAD_PREFIX)
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


def _fit(
    cfg: ExperimentConfig,
    feats: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    seed: int,
) -> nn.Linear:
    return fit_head(
        feats.numpy(),
        labels.numpy(),
        num_classes,
        weight_decay=cfg.teacher.head_weight_decay,
        seed=seed,
    )


def load_carry(cfg: ExperimentConfig, state: RecordDict) -> OptimizerCarry | None:
    """The optimiser state this site kept from its last round (optimizer_state=keep)."""
    if cfg.train.optimizer_state != "keep":
        return None
    if OPTIMIZER_KEY not in state:
        return OptimizerCarry()
    rec = state[OPTIMIZER_KEY]
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key in rec.keys():
        index, _, name = key.partition("/")
        out.setdefault(int(index), {})[name] = torch.from_numpy(rec[key].numpy())
    return OptimizerCarry(out)


def save_carry(state: RecordDict, carry: OptimizerCarry | None) -> None:
    """Keep the optimiser state in the site's Flower state for the next round."""
    if carry is None or not carry.state:
        return
    state[OPTIMIZER_KEY] = ArrayRecord(
        {
            f"{i}/{name}": Array(v.detach().cpu().numpy().copy())
            for i, st in carry.state.items()
            for name, v in st.items()
            if torch.is_tensor(v)
        }
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
    cfg: ExperimentConfig, site: Site, student: nn.Module, head: nn.Linear
) -> tuple[float, dict[str, float]]:
    """(weight of the teacher's terms this round, metrics to log) for this site.

    Teacher probe and the received student are compared by balanced ACC on the
    site's held-out test part, which neither trains on (common/distill/gate.py).
    """
    if not cfg.distill.gate or site.feats_test is None or len(site.test_y) == 0:
        return 1.0, {"kd_weight": 1.0}
    y = site.test_y.cpu().numpy()
    with torch.no_grad():
        t_probs = torch.softmax(head_logits(head, site.feats_test).float(), dim=1)
    s_probs = predict_proba(student, site.test_x)
    t_score = balanced_accuracy(y, t_probs.numpy())
    s_score = balanced_accuracy(y, s_probs.cpu().numpy())
    w = gate_weight(
        t_score, s_score, floor=cfg.distill.gate_floor, margin=cfg.distill.gate_margin
    )
    return w, {
        "kd_weight": w,
        "gate_teacher_bacc": t_score,
        "gate_student_bacc": s_score,
    }


def train_round(
    cfg: ExperimentConfig,
    site: Site,
    arrays: ArrayRecord,
    state: RecordDict,
    server_round: int,
    num_classes: int,
    proximal_mu: float = 0.0,
) -> tuple[dict[str, np.ndarray], dict]:
    """One round of local KD; returns (arrays to send, scalar metrics)."""
    seed = site_seed(cfg, server_round, site.name)
    student = make_student(cfg, num_classes, site.channels)
    source = _student_source(cfg, state, arrays)
    load_into(student, source, STUDENT_PREFIX)
    student.to(site.device)  # a no-op on the CPU
    proj = None
    out: dict[str, np.ndarray] = {}
    metrics: dict[str, float] = {}
    data = site.train
    kd_weight = 1.0
    if uses_teacher(cfg):
        target_head, send_head = _head_for_round(
            cfg, site, arrays, state, num_classes, seed
        )
        kd_weight, gate_metrics = kd_gate(cfg, site, student, target_head)
        metrics.update(gate_metrics)
        with torch.no_grad():
            logits = head_logits(
                target_head, site.feats_train.reshape(-1, site.feats_train.shape[-1])
            )
        # Teacher targets go to the device once per round, not per batch.
        data = LocalData(
            x=data.x,
            y=data.y,
            labelled=data.labelled,
            teacher_logits=logits.reshape(
                site.feats_train.shape[0], site.train.n, -1
            ).to(site.device),
            teacher_feats=site.feats_train.to(site.device)
            if cfg.distill.feature_weight > 0
            else site.feats_train,
        )
        if send_head is not None:
            out.update(module_arrays(send_head, HEAD_PREFIX))
        if cfg.distill.feature_weight > 0:
            proj = make_proj(student, site.feats_train.shape[-1])
            load_into(proj, source, PROJ_PREFIX)
            proj.to(site.device)
    carry = load_carry(cfg, state)
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
        )
    )
    save_carry(state, carry)
    out.update(module_arrays(student, STUDENT_PREFIX))
    if proj is not None:
        out.update(module_arrays(proj, PROJ_PREFIX))
    if cfg.federation.strategy == "local":
        state[LOCAL_MODEL_KEY] = pack(out)
    return out, metrics


def evaluate_round(
    cfg: ExperimentConfig,
    site: Site,
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
        head = None
        if any(k.startswith(HEAD_PREFIX) for k in arrays.keys()):
            head = nn.Linear(site.feats_test.shape[1], num_classes)
            load_into(head, arrays, HEAD_PREFIX)
        elif LOCAL_HEAD_KEY in state:
            head = nn.Linear(site.feats_test.shape[1], num_classes)
            load_into(head, state[LOCAL_HEAD_KEY], HEAD_PREFIX)
        if head is not None:
            with torch.no_grad():
                t = evaluate_logits(
                    head_logits(head, site.feats_test), site.test_y.cpu()
                )
            metrics.update(
                {f"teacher_{k}": v for k, v in t.items() if k != "num-examples"}
            )
    # An undefined metric (AUC on a one-class test set) is left out, not faked.
    return {k: v for k, v in metrics.items() if not math.isnan(v)}
