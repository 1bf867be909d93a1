"""Typed experiment configuration: YAML -> dataclasses, dotted overrides, strict checks.

Every key is declared here with its type; unknown keys, wrong types and values
outside their allowed set raise :class:`ConfigError` naming the key and the
valid choices. The resolved config is plain data (``to_dict``) so it can be
written into run folders, checkpoints and Flower messages.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from common.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    # "br35h", "medmnist:<flag>[@size]", "npz:<path>" or "folder:<path>"
    source: str = "br35h"
    # side length (px) the student trains at; images are resized to it
    image_size: int = 64
    # folder for downloaded MedMNIST files and decoded-image caches
    cache_dir: str = "~/.cache/fedkd"
    # fractions for the seeded stratified split of sources without official splits
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    # label names in label order, comma-separated ("normal,pneumonia"); "" = the
    # source's own (MedMNIST names guessed from an npz file name, folder names,
    # or class-0..). A deployment sets them so they never hang on a file name.
    classes: str = ""


@dataclass
class PartitionConfig:
    # number of simulated hospitals
    sites: int = 4
    # iid | dirichlet | pathological | quantity
    scheme: str = "dirichlet"
    # Dirichlet concentration (small = strong label skew)
    alpha: float = 0.5
    # classes per site for the pathological scheme
    classes_per_site: int = 1
    # exponent of the power-law site sizes for the quantity scheme (0 = equal)
    size_skew: float = 1.0
    # none | scanner: per-site acquisition profile applied to train and test
    shift: str = "none"
    # share of each site's data kept as its local test part
    site_test_fraction: float = 0.2
    # share of each site's training images that keep their labels
    labelled_fraction: float = 1.0
    # smallest number of training images a site may end up with
    min_site_size: int = 10
    # share of the train split held back as a public pool no site receives
    # (to train a proxy teacher offline); 0 = none
    public_pool_fraction: float = 0.0


@dataclass
class TeacherConfig:
    # any timm model name; DINOv2 ViT-S/14 by default
    arch: str = "vit_small_patch14_dinov2.lvd142m"
    # hub | file:<path> | random  (random is for pipeline runs only)
    weights: str = "hub"
    # teacher input side (px); a multiple of the patch size for ViTs
    image_size: int = 112
    # local: head fitted and kept at each site | federated: averaged by the
    # server (the default: under label skew a site's own head never sees the
    # classes it lacks; docs/results/federated-gap)
    head: str = "federated"
    # epochs of head training per round when the head is federated
    head_epochs: int = 20
    # learning rate of the linear head (federated mode)
    head_lr: float = 0.05
    # L2 penalty of the linear head
    head_weight_decay: float = 1e-4
    # folder of the on-disk teacher feature cache
    cache_dir: str = "~/.cache/fedkd/teacher"
    # images per teacher forward pass
    batch_size: int = 64
    # fixed augmented views per image (see common/data/views.py): 2 = the image
    # and its mirror (random flips), 3..8 add small shifts. With train.augment
    # the student trains on a random view per item and the teacher's targets
    # are cached for exactly those views. 2 was chosen on the validation split:
    # Br35H pooled, 30 epochs: val ACC .937 with 2 views, .927 with 1, .890 with
    # 8 (shifts slow convergence at this budget); docs/results/federated-gap
    views: int = 2


@dataclass
class StudentConfig:
    # any timm model name, or one of this project's small CNNs (fedkd_cnn_*)
    arch: str = "fedkd_cnn_small"


@dataclass
class DistillConfig:
    # weight of the hard-label CE term; 1.0 means plain supervised training
    alpha: float = 0.5
    # softmax temperature of the KD term
    temperature: float = 4.0
    # weight of the KD term on unlabelled images (no CE there)
    unlabelled_weight: float = 1.0
    # weight of the feature-distillation term (0 = off)
    feature_weight: float = 0.0
    # cosine | mse
    feature_loss: str = "cosine"
    # KD that cannot hurt: each site compares the teacher probe with the global
    # student (balanced ACC on its held-out labelled test part) every round and
    # scales the teacher's terms by a weight in [gate_floor, 1]
    gate: bool = True
    # weight when the teacher is gate_margin (or more) worse than the student
    gate_floor: float = 0.0
    # balanced-ACC shortfall of the teacher at which the weight reaches the floor
    gate_margin: float = 0.05


@dataclass
class FederationConfig:
    rounds: int = 10
    # fedavg | fedavgm | fedadam | fedyogi | fedexp | fedprox | fedmedian
    # | fedtrimmedavg | krum | local | pooled. `pooled` is the fair reference: one
    # node holding the union of the partition's sites exactly as they hold them
    # (same images, scanner profiles and labelled masks); `fedexp` sets the
    # server step from the updates' norms (Jhunjhunwala et al., ICLR 2023).
    strategy: str = "fedavg"
    # server-side optimiser (fedavgm, fedadam, fedyogi): step size on the
    # averaged update, and momentum (fedavgm) / first-moment decay (adam, yogi).
    # FedAvg with a server learning rate is fedavgm with server_momentum 0.
    server_lr: float = 1.0
    server_momentum: float = 0.9
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    # fewest sites whose replies make a round count
    min_sites: int = 2
    # proximal term for fedprox
    proximal_mu: float = 0.01
    # fedexp: epsilon in its step max(1, mean|d_i|^2 / (2 (|mean d_i|^2 + eps)))
    fedexp_eps: float = 1e-3
    # float32 | float16 for the arrays sent over the wire
    transfer_dtype: str = "float32"
    # seconds the server waits for replies in one round
    round_timeout: float = 3600.0
    # reject updates whose norm exceeds this multiple of the median norm (0 = off)
    norm_outlier_factor: float = 10.0
    # retries of a round that got fewer than min_sites replies
    max_round_retries: int = 1
    # sites evaluate the model they receive inside the train reply (one message
    # per site and round instead of two); that model is the previous round's
    # aggregate, so its metrics are recorded under that round, and the final
    # model is evaluated once after the last round
    eval_in_train: bool = False
    # trimming fraction for fedtrimmedavg / number of byzantine sites for krum
    trim_beta: float = 0.2
    krum_byzantine: int = 1

    @property
    def required_sites(self) -> int:
        """Replies a round needs: min_sites, or 1 for pooled (one node holds all)."""
        return 1 if self.strategy == "pooled" else self.min_sites


@dataclass
class TrainConfig:
    # local work per round: local_epochs passes over the site's data, or, when
    # local_steps > 0, exactly that many SGD steps (batches) whatever its size
    local_epochs: int = 1
    local_steps: int = 0
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # sgd | adam
    optimizer: str = "sgd"
    # the site's optimiser state (SGD's momentum buffer, Adam's moments) across
    # rounds: reset (rebuilt every round, what FedAvg assumes) | keep (kept in
    # the site's state and carried into the next round)
    optimizer_state: str = "reset"
    seed: int = 0
    # torch threads per process (0 = leave torch's default)
    num_threads: int = 0
    # train on a random fixed view per item (teacher.views of them: flips, then
    # small shifts); off = the unaugmented image only
    augment: bool = True
    # learning rate across rounds: cosine (from lr down to lr * lr_final_factor
    # over federation.rounds, driven by the server round) | constant
    lr_schedule: str = "cosine"
    lr_final_factor: float = 0.01
    # logit adjustment by the site's own label prior (FedLC-style): CE on
    # logits + tau * log(prior); 0 = off
    logit_adjust: float = 0.0
    # clip each step's gradient norm to this value (0 = off); keeps KD with
    # large T^2-scaled terms and tiny sites from blowing up an update
    grad_clip: float = 5.0


@dataclass
class PrivacyConfig:
    # client-side fixed clipping with Gaussian noise (Flower DP wrapper)
    dp: bool = False
    clipping_norm: float = 1.0
    noise_multiplier: float = 0.0
    # delta at which the site-level epsilon is reported (server.privacy)
    delta: float = 1e-5
    # send per-class training counts in the handshake (prevalence leaves the site)
    share_class_counts: bool = True


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    # name of the run, written into the model card
    name: str = "default"
    # let a new run write into an existing, non-empty run folder
    overwrite: bool = False
    # evaluate the global model on the held-out global test set each round
    global_eval: bool = True
    # ray: Flower's Simulation Engine | inprocess: all sites in this process
    engine: str = "ray"
    # evaluate (sites and global test) every k rounds, and in each of the last
    # eval_last rounds (the report's last-k means need them)
    eval_every: int = 1
    eval_last: int = 5
    # where sites compute: auto (the GPU when there is one: CUDA, then MPS;
    # otherwise CPU with one torch thread per usable CPU) | cpu | cuda | mps
    device: str = "cpu"


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, suitable for YAML/JSON and Flower ConfigRecords."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML text."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


CHOICES: dict[str, tuple[str, ...]] = {
    "partition.scheme": ("iid", "dirichlet", "pathological", "quantity"),
    "partition.shift": ("none", "scanner"),
    "teacher.head": ("local", "federated"),
    "distill.feature_loss": ("cosine", "mse"),
    "federation.strategy": (
        "fedavg",
        "fedavgm",
        "fedadam",
        "fedyogi",
        "fedexp",
        "fedprox",
        "fedmedian",
        "fedtrimmedavg",
        "krum",
        "local",
        "pooled",
    ),
    "federation.transfer_dtype": ("float32", "float16"),
    "train.optimizer": ("sgd", "adam"),
    "train.optimizer_state": ("reset", "keep"),
    "train.lr_schedule": ("cosine", "constant"),
    "run.engine": ("ray", "inprocess"),
    "run.device": ("auto", "cpu", "cuda", "mps"),
}

_SOURCE_RE = re.compile(
    r"^(br35h|medmnist:[a-z0-9]+(@(28|64|128|224))?|npz:.+|folder:.+)$"
)
_WEIGHTS_RE = re.compile(r"^(hub|random|file:.+)$")


def _section_fields(section: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(section)}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check `value` against the declared type, converting ints to floats."""
    if isinstance(typ, str):  # postponed annotations
        typ = {"int": int, "float": float, "str": str, "bool": bool}.get(typ, typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, str):
            # PyYAML reads "1e-3" (no dot) as text; accept numbers written so.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ConfigError(
                    f"config key '{key}' is {value!r}; give a finite number"
                )
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - all declared fields use the four scalar types
        raise ConfigError(f"{key}: unsupported declared type {typ!r}")
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(
        f"config key '{key}' must be {name}, got {type(value).__name__} {value!r}"
    )


def _build(data: dict[str, Any]) -> ExperimentConfig:
    if not isinstance(data, dict):
        raise ConfigError(
            f"config must be a mapping of sections, got {type(data).__name__}"
        )
    sections = _section_fields(ExperimentConfig)
    kwargs: dict[str, Any] = {}
    for sec_name, sec_value in data.items():
        if sec_name not in sections:
            raise ConfigError(
                f"unknown config section '{sec_name}'; valid sections: "
                f"{', '.join(sections)}"
            )
        sec_type = sections[sec_name].default_factory  # type: ignore[misc]
        if sec_value is None:
            sec_value = {}
        if not isinstance(sec_value, dict):
            raise ConfigError(f"config section '{sec_name}' must be a mapping")
        valid = _section_fields(sec_type)
        sec_kwargs = {}
        for key, value in sec_value.items():
            dotted = f"{sec_name}.{key}"
            if key not in valid:
                raise ConfigError(
                    f"unknown config key '{dotted}'; valid keys in '{sec_name}': "
                    f"{', '.join(valid)}"
                )
            sec_kwargs[key] = _coerce(dotted, value, valid[key].type)
        kwargs[sec_name] = sec_type(**sec_kwargs)
    cfg = ExperimentConfig(**kwargs)
    validate(cfg)
    return cfg


def _range(
    key: str, value: float, lo: float | None, hi: float | None, *, lo_open: bool = False
) -> None:
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and value > hi
    )
    if bad:
        left = "(" if lo_open else "["
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise ConfigError(
            f"config key '{key}' = {value!r} is out of range; "
            f"valid: {left}{lo_s}, {hi_s}]"
        )


def validate(cfg: ExperimentConfig) -> None:
    """Check choices and ranges; raise ConfigError naming the key and valid values."""
    d = cfg.to_dict()
    for dotted, choices in CHOICES.items():
        sec, key = dotted.split(".")
        if d[sec][key] not in choices:
            raise ConfigError(
                f"config key '{dotted}' = {d[sec][key]!r} is not valid; "
                f"choose one of: {', '.join(choices)}"
            )
    if not _SOURCE_RE.match(cfg.data.source):
        raise ConfigError(
            f"config key 'data.source' = {cfg.data.source!r} is not valid; use br35h, "
            "medmnist:<flag>[@28|64|128|224], npz:<path> or folder:<path>"
        )
    if not _WEIGHTS_RE.match(cfg.teacher.weights):
        raise ConfigError(
            f"config key 'teacher.weights' = {cfg.teacher.weights!r} is not valid; "
            "use hub, file:<path> or random"
        )
    _range("data.image_size", cfg.data.image_size, 8, 1024)
    _range("data.val_fraction", cfg.data.val_fraction, 0.0, 0.5)
    _range("data.test_fraction", cfg.data.test_fraction, 0.0, 0.5, lo_open=True)
    _range("partition.sites", cfg.partition.sites, 1, 10000)
    _range("partition.alpha", cfg.partition.alpha, 0.0, None, lo_open=True)
    _range("partition.classes_per_site", cfg.partition.classes_per_site, 1, None)
    _range("partition.size_skew", cfg.partition.size_skew, 0.0, 10.0)
    _range(
        "partition.site_test_fraction",
        cfg.partition.site_test_fraction,
        0.0,
        0.9,
        lo_open=True,
    )
    _range(
        "partition.labelled_fraction",
        cfg.partition.labelled_fraction,
        0.0,
        1.0,
        lo_open=True,
    )
    _range("partition.min_site_size", cfg.partition.min_site_size, 1, None)
    _range("partition.public_pool_fraction", cfg.partition.public_pool_fraction, 0.0,
           0.9)
    _range("teacher.image_size", cfg.teacher.image_size, 14, 1024)
    _range("teacher.head_epochs", cfg.teacher.head_epochs, 1, None)
    _range("teacher.head_lr", cfg.teacher.head_lr, 0.0, None, lo_open=True)
    _range("teacher.batch_size", cfg.teacher.batch_size, 1, None)
    _range("teacher.views", cfg.teacher.views, 1, 8)  # common/data/views.py
    _range("distill.alpha", cfg.distill.alpha, 0.0, 1.0)
    _range("distill.temperature", cfg.distill.temperature, 0.0, None, lo_open=True)
    _range("distill.unlabelled_weight", cfg.distill.unlabelled_weight, 0.0, None)
    _range("distill.feature_weight", cfg.distill.feature_weight, 0.0, None)
    _range("federation.rounds", cfg.federation.rounds, 1, None)
    _range(
        "federation.fraction_train",
        cfg.federation.fraction_train,
        0.0,
        1.0,
        lo_open=True,
    )
    _range("federation.fraction_evaluate", cfg.federation.fraction_evaluate, 0.0, 1.0)
    _range("federation.min_sites", cfg.federation.min_sites, 1, None)
    _range("federation.proximal_mu", cfg.federation.proximal_mu, 0.0, None)
    _range(
        "federation.round_timeout",
        cfg.federation.round_timeout,
        0.0,
        None,
        lo_open=True,
    )
    _range(
        "federation.norm_outlier_factor", cfg.federation.norm_outlier_factor, 0.0, None
    )
    _range("federation.max_round_retries", cfg.federation.max_round_retries, 0, 100)
    _range("federation.trim_beta", cfg.federation.trim_beta, 0.0, 0.5, lo_open=True)
    _range("federation.krum_byzantine", cfg.federation.krum_byzantine, 0, None)
    _range("train.local_epochs", cfg.train.local_epochs, 1, None)
    _range("train.local_steps", cfg.train.local_steps, 0, None)
    _range("federation.fedexp_eps", cfg.federation.fedexp_eps, 0.0, None, lo_open=True)
    _range("train.batch_size", cfg.train.batch_size, 1, None)
    _range("train.lr", cfg.train.lr, 0.0, None, lo_open=True)
    _range("train.momentum", cfg.train.momentum, 0.0, 1.0)
    _range("train.weight_decay", cfg.train.weight_decay, 0.0, None)
    _range("train.num_threads", cfg.train.num_threads, 0, 256)
    _range("train.grad_clip", cfg.train.grad_clip, 0.0, None)
    _range("train.lr_final_factor", cfg.train.lr_final_factor, 0.0, 1.0)
    _range("train.logit_adjust", cfg.train.logit_adjust, 0.0, 10.0)
    _range("distill.gate_floor", cfg.distill.gate_floor, 0.0, 1.0)
    _range("distill.gate_margin", cfg.distill.gate_margin, 0.0, 1.0, lo_open=True)
    _range("federation.server_lr", cfg.federation.server_lr, 0.0, None, lo_open=True)
    _range("federation.server_momentum", cfg.federation.server_momentum, 0.0, 0.999)
    _range("run.eval_every", cfg.run.eval_every, 1, None)
    _range("run.eval_last", cfg.run.eval_last, 0, None)
    _range("privacy.clipping_norm", cfg.privacy.clipping_norm, 0.0, None, lo_open=True)
    _range("privacy.noise_multiplier", cfg.privacy.noise_multiplier, 0.0, None)
    _range("privacy.delta", cfg.privacy.delta, 0.0, 0.1, lo_open=True)
    if cfg.federation.min_sites > cfg.partition.sites:
        raise ConfigError(
            f"config key 'federation.min_sites' = {cfg.federation.min_sites} exceeds "
            f"'partition.sites' = {cfg.partition.sites}; lower min_sites"
        )
    if cfg.privacy.dp and (cfg.teacher.head == "federated"
                           or cfg.federation.strategy == "local"):
        raise ConfigError(
            "privacy.dp=true needs teacher.head=local and a federated strategy: "
            "client-side clipping bounds the update of the arrays the server sent"
        )
    if cfg.privacy.dp and cfg.privacy.delta >= 1 / cfg.partition.sites:
        log.warning(
            "privacy.delta=%g is not below 1/partition.sites=%g: a guarantee that "
            "may fail with that probability could expose a whole site",
            cfg.privacy.delta,
            1 / cfg.partition.sites,
        )
    names = [c.strip() for c in cfg.data.classes.split(",")] if cfg.data.classes else []
    if names and (not all(names) or len(set(names)) != len(names)):
        raise ConfigError(
            f"config key 'data.classes' = {cfg.data.classes!r} is not valid; give "
            "distinct, non-empty names in label order, e.g. normal,pneumonia"
        )
    if cfg.federation.eval_in_train and cfg.federation.fraction_train < 1.0:
        log.warning(
            "federation.eval_in_train with fraction_train=%g: only the sites "
            "sampled for training evaluate each round",
            cfg.federation.fraction_train,
        )
    if cfg.distill.alpha == 1.0 and cfg.distill.feature_weight > 0:
        log.warning(
            "distill.alpha=1 with feature_weight>0: only the feature term "
            "uses the teacher"
        )


def _parse_scalar(text: str) -> Any:
    """Parse an override value with YAML rules (``3`` -> int, ``true`` -> bool)."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _split_items(items: list[str] | tuple[str, ...]) -> list[tuple[str, str, str]]:
    """``["section.key=value", ...]`` -> [(section, key, raw text)]; check syntax."""
    out = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(
                f"bad override {item!r}: expected section.key=value, "
                "e.g. --set federation.rounds=3"
            )
        dotted, _, raw = item.partition("=")
        parts = dotted.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(
                f"bad override key {dotted!r}: expected section.key, "
                "e.g. teacher.weights"
            )
        out.append((parts[0], parts[1], raw.strip()))
    return out


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Turn ``["section.key=value", ...]`` into a nested dict; reject bad syntax."""
    nested: dict[str, dict[str, Any]] = {}
    for sec, key, raw in _split_items(items):
        nested.setdefault(sec, {})[key] = _parse_scalar(raw)
    return nested


def _keep_override_text(data: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """Str-typed keys take the override's text as written (quotes removed): YAML
    would read ``run.name=yes`` as true, ``data.cache_dir=~`` as null, ``0.10``
    as 0.1 and drop `` #x`` as a comment."""
    sections = _section_fields(ExperimentConfig)
    for sec, key, raw in _split_items(items):
        if sec not in sections:
            continue
        valid = _section_fields(sections[sec].default_factory)  # type: ignore[misc]
        if key in valid and valid[key].type in (str, "str"):
            quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
            parsed = _parse_scalar(raw) if quoted else raw
            data[sec][key] = parsed if isinstance(parsed, str) else raw
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for sec, values in over.items():
        if isinstance(values, dict) and isinstance(out.get(sec), dict):
            out[sec].update(values)
        else:
            out[sec] = values
    return out


def _stringify_str_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Overrides such as ``student.arch=123`` parse as int; str fields take text."""
    sections = _section_fields(ExperimentConfig)
    for sec, values in data.items():
        if sec not in sections or not isinstance(values, dict):
            continue
        valid = _section_fields(sections[sec].default_factory)  # type: ignore[misc]
        for key, value in values.items():
            if (
                key in valid
                and valid[key].type in (str, "str")
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
            ):
                values[key] = str(value)
    return data


def config_from_dict(
    data: dict[str, Any] | None, overrides: list[str] | None = None
) -> ExperimentConfig:
    """Build a validated config from a nested dict plus dotted overrides."""
    merged = _merge(data or {}, parse_overrides(overrides or []))
    merged = _keep_override_text(merged, list(overrides or []))
    return _build(_stringify_str_fields(merged))


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping that names one key twice (plain YAML keeps the last)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader, except that a key given twice is an error."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    """Build a mapping like SafeLoader, after checking no key repeats."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<:` merges are resolved by construct_mapping
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if isinstance(key, (str, int, float, bool)) and key in seen:
            raise DuplicateKeyError(
                f"duplicate key {key!r} at line {line} (first at line {seen[key]})"
            )
        if isinstance(key, (str, int, float, bool)):
            seen[key] = line
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping
)


def safe_load_unique(text: str) -> Any:
    """`yaml.safe_load`, but duplicate keys at any level raise DuplicateKeyError."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader


def _yaml_file_error(p: Path, err: yaml.YAMLError) -> ConfigError:
    """One line for a YAML file that cannot be read as an unambiguous mapping."""
    first = str(err).splitlines()[0] if str(err) else "parse error"
    if isinstance(err, DuplicateKeyError):
        return ConfigError(
            f"config file {p} has a {first}; keep one (YAML would silently use "
            "the last)"
        )
    return ConfigError(f"config file {p} is not valid YAML: {first}")


def load_config(
    path: str | Path | None, overrides: list[str] | None = None
) -> ExperimentConfig:
    """Load a YAML experiment file (or defaults when None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file not found: {p}; pass --config <path to yaml>"
            )
        try:
            data = safe_load_unique(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise _yaml_file_error(p, err) from err
    return config_from_dict(data, overrides)


def config_from_yaml_text(text: str) -> ExperimentConfig:
    """Rebuild a config from the YAML text carried in a message or checkpoint."""
    try:
        data = safe_load_unique(text) or {}
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else "parse error"
        raise ConfigError(f"config text is not valid YAML: {first}") from err
    return config_from_dict(data)


def split_overrides(text: str) -> list[str]:
    """Split the ``overrides`` run-config string ("a.b=1;c.d=x") into items."""
    return [p for p in re.split(r"[;\n]", text or "") if p.strip()]


__all__ = [
    "CHOICES",
    "DataConfig",
    "DistillConfig",
    "ExperimentConfig",
    "FederationConfig",
    "PartitionConfig",
    "PrivacyConfig",
    "RunConfig",
    "StudentConfig",
    "TeacherConfig",
    "TrainConfig",
    "config_from_dict",
    "config_from_yaml_text",
    "load_config",
    "parse_overrides",
    "safe_load_unique",
    "split_overrides",
    "validate",
]
