"""Typed experiment configuration: YAML -> dataclasses, dotted overrides, strict checks.

Every key is declared here once: its type, default and, beside it (``knob``), its
valid choices, bounds or pattern. Unknown keys, wrong types and values outside
their allowed set raise :class:`ConfigError` naming the key and what is valid;
``validate`` adds only the rules across keys. The resolved config is plain data
(``to_dict``) so it can be written into run folders, checkpoints and Flower
messages.
"""

import dataclasses
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from common.errors import ConfigError

log = logging.getLogger(__name__)


def knob(
    default: Any,
    *,
    choices: tuple[str, ...] = (),
    bounds: str = "",
    pattern: str = "",
    hint: str = "",
) -> Any:
    """A field with its valid values beside it: choices, bounds or a pattern."""
    # bounds is the interval as the error shows it: "[0, 1]", "(0, inf]" ("("
    # excludes the lower end); hint says what a value missing `pattern` looks like.
    # A default outside its own declaration fails at import, not in a run.
    if (choices and default not in choices) or (
        bounds and not _within(default, bounds)
    ):
        raise ValueError(f"default {default!r} is not among its valid values")
    meta = {"choices": choices, "bounds": bounds, "pattern": pattern, "hint": hint}
    return field(default=default, metadata=meta)


def _within(value: float, bounds: str) -> bool:
    """Whether ``value`` lies in an interval written "[lo, hi]" or "(lo, hi]"."""
    if bounds[0] not in "[(" or bounds[-1] != "]":
        raise ValueError(f"bounds {bounds!r}: expected '[lo, hi]' or '(lo, hi]'")
    lo, hi = (float(x) for x in bounds[1:-1].split(","))
    return (value > lo if bounds[0] == "(" else value >= lo) and value <= hi


_SOURCE_RE = r"^(br35h|medmnist:[a-z0-9]+(@(28|64|128|224))?|npz:.+|folder:.+)$"
_SOURCE_HINT = "use br35h, medmnist:<flag>[@28|64|128|224], npz:<path> or folder:<path>"
_WEIGHTS_HINT = "use hub, file:<path> or random"


@dataclass
class DataConfig:
    # "br35h", "medmnist:<flag>[@size]", "npz:<path>" or "folder:<path>"
    source: str = knob("br35h", pattern=_SOURCE_RE, hint=_SOURCE_HINT)
    # side length (px) the student trains at; images are resized to it
    image_size: int = knob(64, bounds="[8, 1024]")
    # folder for downloaded MedMNIST files and decoded-image caches
    cache_dir: str = "~/.cache/fedkd"
    # fractions for the seeded stratified split of sources without official splits
    val_fraction: float = knob(0.1, bounds="[0, 0.5]")
    test_fraction: float = knob(0.2, bounds="(0, 0.5]")
    # label names in label order, comma-separated ("normal,pneumonia"); "" = the
    # source's own (MedMNIST names guessed from an npz file name, folder names,
    # or class-0..). A deployment sets them so they never hang on a file name.
    classes: str = ""


@dataclass
class PartitionConfig:
    # number of simulated hospitals
    sites: int = knob(4, bounds="[1, 10000]")
    scheme: str = knob(
        "dirichlet", choices=("iid", "dirichlet", "pathological", "quantity")
    )
    # Dirichlet concentration (small = strong label skew)
    alpha: float = knob(0.5, bounds="(0, inf]")
    # classes per site for the pathological scheme
    classes_per_site: int = knob(1, bounds="[1, inf]")
    # exponent of the power-law site sizes for the quantity scheme (0 = equal)
    size_skew: float = knob(1.0, bounds="[0, 10]")
    # scanner: a per-site acquisition profile applied to train and test | none
    shift: str = knob("none", choices=("none", "scanner"))
    # share of each site's data kept as its local test part
    site_test_fraction: float = knob(0.2, bounds="(0, 0.9]")
    # share of each site's training images that keep their labels
    labelled_fraction: float = knob(1.0, bounds="(0, 1]")
    # smallest number of training images a site may end up with
    min_site_size: int = knob(10, bounds="[1, inf]")
    # share of the train split held back as a public pool no site receives
    # (to train a proxy teacher offline); 0 = none
    public_pool_fraction: float = knob(0.0, bounds="[0, 0.9]")


@dataclass
class TeacherConfig:
    # any timm model name; DINOv2 ViT-S/14 by default
    arch: str = "vit_small_patch14_dinov2.lvd142m"
    # hub | file:<path> | random  (random is for pipeline runs only)
    weights: str = knob("hub", pattern=r"^(hub|random|file:.+)$", hint=_WEIGHTS_HINT)
    # teacher input side (px); a multiple of the patch size for ViTs
    image_size: int = knob(112, bounds="[14, 1024]")
    # local: head fitted and kept at each site | federated: refitted by SGD at
    # every site each round and averaged by the server | closed_form: the ridge
    # classifier of the pooled features, solved once by the server from the
    # sites' summed statistics (Fed3R; common/models/ridge.py): equal to the
    # pooled probe whatever the partition. closed_form sends per-class feature
    # sums and counts, so it needs privacy.share_class_counts.
    head: str = knob("federated", choices=("local", "federated", "closed_form"))
    # ridge penalty of the closed-form head (on standardised features)
    head_lambda: float = knob(1.0, bounds="[0, inf]")
    # epochs of head training per round when the head is federated
    head_epochs: int = knob(20, bounds="[1, inf]")
    # learning rate of the linear head (federated mode)
    head_lr: float = knob(0.05, bounds="(0, inf]")
    # L2 penalty of the linear head
    head_weight_decay: float = 1e-4
    # folder of the on-disk teacher feature cache
    cache_dir: str = "~/.cache/fedkd/teacher"
    # images per teacher forward pass
    batch_size: int = knob(64, bounds="[1, inf]")
    # fixed augmented views per image (see common/data/views.py): 2 = the image
    # and its mirror (random flips), 3..8 add small shifts. With train.augment
    # the student trains on a random view per item and the teacher's targets
    # are cached for exactly those views. 2 was chosen on the validation split:
    # Br35H pooled, 30 epochs: val ACC .937 with 2 views, .927 with 1, .890 with
    # 8 (shifts slow convergence at this budget); docs/results/federated-gap
    views: int = knob(2, bounds="[1, 8]")


@dataclass
class StudentConfig:
    # any timm model name, or one of this project's small CNNs (fedkd_cnn_*)
    arch: str = "fedkd_cnn_small"


@dataclass
class DistillConfig:
    # weight of the hard-label CE term; 1.0 means plain supervised training
    alpha: float = knob(0.5, bounds="[0, 1]")
    # softmax temperature of the KD term
    temperature: float = knob(4.0, bounds="(0, inf]")
    # weight of the KD term on unlabelled images (no CE there)
    unlabelled_weight: float = knob(1.0, bounds="[0, inf]")
    # which labelled images get the KD term: all | agree (only those whose
    # teacher top class is the label: where the teacher contradicts the label,
    # on a site's shifted images, its soft target teaches the wrong class);
    # distill.alpha=1 gives KD on unlabelled images only
    kd_where: str = knob("all", choices=("all", "agree"))
    # weight of the feature-distillation term (0 = off)
    feature_weight: float = knob(0.0, bounds="[0, inf]")
    feature_loss: str = knob("cosine", choices=("cosine", "mse"))
    # KD that cannot hurt: each site compares the teacher probe with the global
    # student (balanced ACC on its held-out labelled test part) every round and
    # scales the teacher's terms by a weight in [gate_floor, 1]. A site whose
    # test part holds a class fewer than gate_min_per_class times follows the
    # federation's verdict instead: the server sums every site's per-class
    # counts (with privacy.share_class_counts; common/distill/gate.py)
    gate: bool = True
    gate_min_per_class: int = knob(5, bounds="[1, inf]")
    # weight when the teacher is gate_margin (or more) worse than the student
    gate_floor: float = knob(0.0, bounds="[0, 1]")
    # balanced-ACC shortfall of the teacher at which the weight reaches the floor
    gate_margin: float = knob(0.05, bounds="(0, 1]")


_STRATEGIES = (
    "fedavg",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedexp",
    "fedprox",
    "scaffold",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "local",
    "pooled",
)


@dataclass
class FederationConfig:
    rounds: int = knob(10, bounds="[1, inf]")
    # `pooled` is the fair reference: one node holding the union of the
    # partition's sites exactly as they hold them (same images, scanner profiles
    # and labelled masks); `fedexp` sets the server step from the updates' norms
    # (Jhunjhunwala et al., ICLR 2023); `scaffold` corrects each site's drift
    # under label skew with control variates (Karimireddy et al., ICML 2020;
    # server/scaffold.py), which doubles every train message and reply.
    strategy: str = knob("fedavg", choices=_STRATEGIES)
    # server-side optimiser (fedavgm, fedadam, fedyogi): step size on the
    # averaged update, and momentum (fedavgm) / first-moment decay (adam, yogi).
    # FedAvg with a server learning rate is fedavgm with server_momentum 0;
    # scaffold takes server_lr as its global step size (no momentum).
    server_lr: float = knob(1.0, bounds="(0, inf]")
    server_momentum: float = knob(0.9, bounds="[0, 0.999]")
    fraction_train: float = knob(1.0, bounds="(0, 1]")
    fraction_evaluate: float = knob(1.0, bounds="[0, 1]")
    # fewest sites whose replies make a round count
    min_sites: int = knob(2, bounds="[1, inf]")
    # proximal term for fedprox
    proximal_mu: float = knob(0.01, bounds="[0, inf]")
    # fedexp: epsilon in its step max(1, mean|d_i|^2 / (2 (|mean d_i|^2 + eps)))
    fedexp_eps: float = knob(1e-3, bounds="(0, inf]")
    # dtype of the arrays sent over the wire
    transfer_dtype: str = knob("float32", choices=("float32", "float16"))
    # seconds the server waits for replies in one round
    round_timeout: float = knob(3600.0, bounds="(0, inf]")
    # seconds between the server's pulls for replies while it waits (Flower's
    # deployed Grid polls every 3 s, which rounded every reply up to 3 s)
    poll_interval: float = knob(0.1, bounds="(0, 60]")
    # reject updates whose norm exceeds this multiple of the median norm (0 = off)
    norm_outlier_factor: float = knob(10.0, bounds="[0, inf]")
    # retries of a round that got fewer than min_sites replies
    max_round_retries: int = knob(1, bounds="[0, 100]")
    # sites evaluate the model they receive inside the train reply (one message
    # per site and round instead of two); that model is the previous round's
    # aggregate, so its metrics are recorded under that round, and the final
    # model is evaluated once after the last round
    eval_in_train: bool = False
    # trimming fraction for fedtrimmedavg / number of byzantine sites for krum
    trim_beta: float = knob(0.2, bounds="(0, 0.5]")
    krum_byzantine: int = knob(1, bounds="[0, inf]")

    @property
    def required_sites(self) -> int:
        """Replies a round needs: min_sites, or 1 for pooled (one node holds all)."""
        return 1 if self.strategy == "pooled" else self.min_sites


@dataclass
class TrainConfig:
    # local work per round: local_epochs passes over the site's data, or, when
    # local_steps > 0, exactly that many SGD steps (batches) whatever its size
    local_epochs: int = knob(1, bounds="[1, inf]")
    local_steps: int = knob(0, bounds="[0, inf]")
    batch_size: int = knob(32, bounds="[1, inf]")
    lr: float = knob(0.01, bounds="(0, inf]")
    momentum: float = knob(0.9, bounds="[0, 1]")
    weight_decay: float = knob(5e-4, bounds="[0, inf]")
    optimizer: str = knob("sgd", choices=("sgd", "adam"))
    # the site's optimiser state (SGD's momentum buffer, Adam's moments) across
    # rounds: reset (rebuilt every round, what FedAvg assumes) | keep (kept in
    # the site's state and carried into the next round)
    optimizer_state: str = knob("reset", choices=("reset", "keep"))
    seed: int = 0
    # torch threads per process (0 = leave torch's default)
    num_threads: int = knob(0, bounds="[0, 256]")
    # train on a random fixed view per item (teacher.views of them: flips, then
    # small shifts); off = the unaugmented image only
    augment: bool = True
    # learning rate across rounds: cosine (from lr down to lr * lr_final_factor
    # over federation.rounds, driven by the server round) | constant
    lr_schedule: str = knob("cosine", choices=("cosine", "constant"))
    lr_final_factor: float = knob(0.01, bounds="[0, 1]")
    # logit adjustment by the site's own label prior (FedLC-style): CE on
    # logits + tau * log(prior); 0 = off
    logit_adjust: float = knob(0.0, bounds="[0, 10]")
    # clip each step's gradient norm to this value (0 = off); keeps KD with
    # large T^2-scaled terms and tiny sites from blowing up an update
    grad_clip: float = knob(5.0, bounds="[0, inf]")


@dataclass
class PrivacyConfig:
    # client-side fixed clipping with Gaussian noise (Flower DP wrapper)
    dp: bool = False
    clipping_norm: float = knob(1.0, bounds="(0, inf]")
    noise_multiplier: float = knob(0.0, bounds="[0, inf]")
    # delta at which the site-level epsilon is reported (server.privacy)
    delta: float = knob(1e-5, bounds="(0, 0.1]")
    # send per-class training counts in the handshake (prevalence leaves the site)
    share_class_counts: bool = True
    # Per-patient DP-SGD at each site (Opacus; common/dp_sgd.py), independent of
    # the site-level `dp` above (both may be on). Every local step samples a
    # Poisson batch (rate train.batch_size / the site's usable images), clips
    # each training image's gradient to dp_sgd_max_grad_norm and adds Gaussian
    # noise of std dp_sgd_noise_multiplier * that norm; train.grad_clip is then
    # not applied (the per-image clipping replaces it). Each site reports its
    # epsilon at dp_sgd_delta over all its steps of all rounds.
    dp_sgd: bool = False
    dp_sgd_noise_multiplier: float = knob(1.0, bounds="(0, 100]")
    dp_sgd_max_grad_norm: float = knob(1.0, bounds="(0, inf]")
    # should be below 1 / (images at the smallest site)
    dp_sgd_delta: float = knob(1e-5, bounds="(0, 0.1]")
    # Opacus' accountant: rdp (Renyi DP, an upper bound) | prv (privacy loss
    # random variables, tighter, numerical with a small stated error)
    dp_sgd_accountant: str = knob("rdp", choices=("rdp", "prv"))
    # Flower's SecAgg+ (server/secagg.py, client/secagg.py): the server sees
    # only the masked sum of the sites' updates, never one site's. Each site
    # sends its update (local - global weights), every coordinate clipped to
    # +-secagg_clipping_range, weighted by its training images and quantised
    # to secagg_quantization levels (0: the finest the workflow's 2^32
    # modulus allows for the round's sites, 2^31 / the next power of two >=
    # the sites: 2^29 for 4, a step of 2 * 8 / 2^29 = 3e-8); Flower's workflow
    # unmasks the weighted mean. With teacher.head=closed_form the head's
    # statistics are summed the same way, once (server/teacher_head.py).
    # secagg_shares: each site's secret is split among this fraction of the
    # round's sites; secagg_threshold: the fraction of those shares that must
    # come back to rebuild a dropped site's masks.
    secure_aggregation: bool = False
    secagg_shares: float = knob(1.0, bounds="(0, 1]")
    secagg_threshold: float = knob(0.5, bounds="(0, 1]")
    secagg_clipping_range: float = knob(8.0, bounds="(0, inf]")
    secagg_quantization: int = knob(0, bounds="[0, 1073741824]")


@dataclass
class CalibrationConfig:
    # What the final model says about its own answers, fitted after the last
    # round from sums the sites send for the final model (common/calibration.py,
    # common/ood.py; docs/security.md says what they reveal). Skipped with
    # privacy.dp: the sums carry no noise.
    # temperature scaling (Guo et al. 2017) ...
    temperature: bool = True
    # ... fitted on: sites (the sites' held-out test parts, summed: what a
    # deployment has) | validation (the global validation split, which a
    # simulation's server holds: the images the global test resembles, where
    # the sites' parts carry their scanner profiles) | auto (validation when
    # the server holds that split, else sites)
    temperature_data: str = knob("auto", choices=("auto", "sites", "validation"))
    # out-of-distribution check stored with the model: mahalanobis (Lee et al.
    # 2018, in the student's pooled features; per class, or one class-agnostic
    # Gaussian when privacy.share_class_counts is false) | none
    ood: str = knob("mahalanobis", choices=("mahalanobis", "none"))
    # share of in-distribution images the check may flag (its false-alarm rate),
    # chosen on the sites' held-out test parts ...
    ood_false_alarm: float = knob(0.05, bounds="(0, 0.5]")
    # ... so that it holds on new images with this confidence
    ood_confidence: float = knob(0.9, bounds="[0.5, 0.999]")
    # shrinkage of the shared feature covariance towards its mean variance
    ood_shrinkage: float = knob(0.01, bounds="[0, 1]")


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
    engine: str = knob("ray", choices=("ray", "inprocess"))
    # evaluate (sites and global test) every k rounds, and in each of the last
    # eval_last rounds (the report's last-k means need them)
    eval_every: int = knob(1, bounds="[1, inf]")
    eval_last: int = knob(5, bounds="[0, inf]")
    # where sites compute: auto (the GPU when there is one: CUDA, then MPS;
    # otherwise CPU with one torch thread per usable CPU) | cpu | cuda | mps
    device: str = knob("cpu", choices=("auto", "cpu", "cuda", "mps"))


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
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict, suitable for YAML/JSON and Flower ConfigRecords."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML text."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# every key by section, in declaration order (the order of to_dict and to_yaml)
_SECTIONS: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in fields(ExperimentConfig)
}
_KEYS: dict[str, dict[str, dataclasses.Field]] = {
    name: {f.name: f for f in fields(typ)} for name, typ in _SECTIONS.items()
}
CHOICES: dict[str, tuple[str, ...]] = {
    f"{sec}.{key}": f.metadata["choices"]
    for sec, keys in _KEYS.items()
    for key, f in keys.items()
    if f.metadata.get("choices")
}


def _is_text(sec: str, key: str) -> bool:
    """Whether ``sec.key`` is a declared str-typed key."""
    f = _KEYS.get(sec, {}).get(key)
    return f is not None and f.type is str


def _coerce(key: str, value: Any, typ: type) -> Any:
    """Check `value` against the declared type, converting ints to floats."""
    if typ is float and isinstance(value, str):
        try:  # PyYAML reads "1e-3" (no dot) as text; accept numbers written so.
            value = float(value)
        except ValueError:
            pass
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is float and number:
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}' is {value!r}; give a finite number")
        return float(value)
    if isinstance(value, typ) and (number or typ is not int):
        return value
    raise ConfigError(
        f"config key '{key}' must be {typ.__name__}, "
        f"got {type(value).__name__} {value!r}"
    )


def _build_section(name: str, values: Any) -> Any:
    """One section's dataclass from its mapping; unknown keys and wrong types fail."""
    if name not in _SECTIONS:
        raise ConfigError(
            f"unknown config section '{name}'; valid sections: {', '.join(_SECTIONS)}"
        )
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"config section '{name}' must be a mapping")
    valid = _KEYS[name]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{name}.{key}"
        if key not in valid:
            raise ConfigError(
                f"unknown config key '{dotted}'; valid keys in '{name}': "
                f"{', '.join(valid)}"
            )
        kwargs[key] = _coerce(dotted, value, valid[key].type)
    return _SECTIONS[name](**kwargs)


def _build(data: dict[str, Any]) -> ExperimentConfig:
    """A validated config from a nested mapping of sections."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"config must be a mapping of sections, got {type(data).__name__}"
        )
    cfg = ExperimentConfig(
        **{name: _build_section(name, v) for name, v in data.items()}
    )
    validate(cfg)
    return cfg


def _check_key(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    """Raise ConfigError when a value misses its field's choices, pattern or bounds."""
    hint = ""
    if meta.get("choices") and value not in meta["choices"]:
        hint = f"choose one of: {', '.join(meta['choices'])}"
    elif meta.get("pattern") and not re.match(meta["pattern"], value):
        hint = meta["hint"]
    if hint:
        raise ConfigError(f"config key '{key}' = {value!r} is not valid; {hint}")
    if meta.get("bounds") and not _within(value, meta["bounds"]):
        raise ConfigError(
            f"config key '{key}' = {value!r} is out of range; valid: {meta['bounds']}"
        )


def validate(cfg: ExperimentConfig) -> None:
    """Check every key, then the rules across keys; raise or warn naming them."""
    for sec, keys in _KEYS.items():
        for key, f in keys.items():
            _check_key(f"{sec}.{key}", getattr(getattr(cfg, sec), key), f.metadata)
    if cfg.federation.min_sites > cfg.partition.sites:
        raise ConfigError(
            f"config key 'federation.min_sites' = {cfg.federation.min_sites} exceeds "
            f"'partition.sites' = {cfg.partition.sites}; lower min_sites"
        )
    closed_form_in_clear = (
        cfg.teacher.head == "closed_form" and not cfg.privacy.secure_aggregation
    )
    if closed_form_in_clear and not cfg.privacy.share_class_counts:
        raise ConfigError(
            "teacher.head=closed_form sends per-class feature sums and counts, which "
            "privacy.share_class_counts=false forbids unless they are summed "
            "securely; set privacy.secure_aggregation=true, or use "
            "teacher.head=federated or local"
        )
    if cfg.federation.strategy == "scaffold":
        _check_scaffold(cfg)
    dp = cfg.privacy.dp
    if dp and (cfg.teacher.head == "federated" or cfg.federation.strategy == "local"):
        raise ConfigError(
            "privacy.dp=true needs teacher.head=local and a federated strategy: "
            "client-side clipping bounds the update of the arrays the server sent"
        )
    if dp and cfg.privacy.delta >= 1 / cfg.partition.sites:
        log.warning(
            "privacy.delta=%g is not below 1/partition.sites=%g: a guarantee that "
            "may fail with that probability could expose a whole site",
            cfg.privacy.delta,
            1 / cfg.partition.sites,
        )
    if cfg.privacy.dp_sgd:
        _check_dp_sgd(cfg)
    if cfg.privacy.secure_aggregation:
        _check_secure_aggregation(cfg)
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


def _check_scaffold(cfg: ExperimentConfig) -> None:
    """Refuse the privacy settings SCAFFOLD's control variates would get around."""
    why = ""
    if cfg.privacy.dp:
        # Under plain SGD Delta c_i is (x - y_i) / (K lr) - c: the site's update,
        # rescaled, which neither the client-side clipping nor the server's
        # noise covers.
        why = (
            "privacy.dp=true: each site's control-variate update is a rescaled "
            "copy of its model update that neither the clipping nor the noise "
            "covers; use fedavg, fedprox or fedavgm under privacy.dp"
        )
    elif cfg.privacy.dp_sgd:
        why = (
            "privacy.dp_sgd=true: the drift correction and the control variates "
            "are built for the non-private steps only (common/train.py); use "
            "fedprox or fedavgm under privacy.dp_sgd"
        )
    if why:
        raise ConfigError(f"federation.strategy=scaffold does not compose with {why}")


SECAGG_STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi")


def _check_secure_aggregation(cfg: ExperimentConfig) -> None:
    """Refuse what needs one site's update, which secure aggregation hides."""
    strategy, why = cfg.federation.strategy, ""
    if strategy not in SECAGG_STRATEGIES:
        why = (
            f"federation.strategy={strategy}: it needs each site's update (or "
            "model); use one of " + ", ".join(SECAGG_STRATEGIES)
        )
    elif cfg.privacy.dp:
        why = (
            "privacy.dp=true: Flower's site-level DP wrapper checks each site's "
            "clipped update; use per-patient privacy.dp_sgd, which composes"
        )
    elif cfg.teacher.head == "federated" and cfg.distill.alpha < 1.0:
        why = (
            "teacher.head=federated: a site's first head arrives without a global "
            "one to take the update from; use teacher.head=closed_form or local"
        )
    elif cfg.privacy.secagg_quantization == 1:
        why = (
            "privacy.secagg_quantization=1: one level cannot carry a value; use 0 "
            "(the finest the modulus allows) or 2 and above"
        )
    if why:
        raise ConfigError(
            f"privacy.secure_aggregation=true does not compose with {why}"
        )


def _check_dp_sgd(cfg: ExperimentConfig) -> None:
    """Refuse what would make one image's loss depend on other training images."""
    # DP-SGD's bound holds when each image's loss depends only on that image and
    # on what is public or already private (the received model, the frozen
    # teacher's features of that image). These settings fit something on all
    # of the site's training images without noise and feed it into every loss.
    d, why = cfg.distill, ""
    if d.alpha < 1.0:
        why = (
            f"distill.alpha={d.alpha:g}: the soft labels come from a teacher head "
            "fitted on the same patients without noise; use distill.alpha=1 "
            "(supervised, optionally with distill.feature_weight > 0)"
        )
    elif d.feature_weight > 0 and d.gate:
        why = (
            "distill.gate=true: the gate's weight, which scales every image's "
            "loss, comes from a teacher head fitted on the same patients; set "
            "distill.gate=false"
        )
    elif d.feature_weight > 0 and cfg.teacher.head != "local":
        why = (
            f"teacher.head={cfg.teacher.head} sends a head or sums fitted on the "
            "patients without noise; use teacher.head=local"
        )
    elif cfg.train.logit_adjust > 0:
        why = (
            f"train.logit_adjust={cfg.train.logit_adjust:g} shifts every image's "
            "loss by the label prior of all the patients; set it to 0"
        )
    if why:
        raise ConfigError(f"privacy.dp_sgd=true does not compose with {why}")


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
    """Give str-typed keys the override's text as written (quotes removed)."""
    # YAML would read run.name=yes as true, data.cache_dir=~ as null, 0.10 as
    # 0.1, and drop " #x" as a comment.
    for sec, key, raw in _split_items(items):
        if _is_text(sec, key):
            quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
            parsed = _parse_scalar(raw) if quoted else raw
            data[sec][key] = parsed if isinstance(parsed, str) else raw
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s sections laid on top, key by key."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for sec, values in over.items():
        if isinstance(values, dict) and isinstance(out.get(sec), dict):
            out[sec].update(values)
        else:
            out[sec] = values
    return out


def _stringify_str_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Overrides such as ``student.arch=123`` parse as int; str fields take text."""
    for sec, values in data.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number and _is_text(sec, key):
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
    "CalibrationConfig",
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
    "knob",
    "load_config",
    "parse_overrides",
    "safe_load_unique",
    "split_overrides",
    "validate",
]
