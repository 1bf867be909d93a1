"""Typed config: defaults, overrides, and errors that name the key."""

import pytest

from common.config import (
    CHOICES,
    config_from_dict,
    knob,
    load_config,
    parse_overrides,
    split_overrides,
)
from common.errors import ConfigError


def test_defaults_match_the_documented_experiment():
    cfg = load_config("simulations/configs/default.yaml")
    assert cfg.data.source == "br35h"
    assert cfg.partition.sites == 4 and cfg.partition.scheme == "dirichlet"
    assert cfg.teacher.arch == "vit_small_patch14_dinov2.lvd142m"
    assert cfg.teacher.image_size == 112


def test_overrides_are_typed_and_applied():
    cfg = load_config(
        None,
        [
            "federation.rounds=3",
            "distill.alpha=0.25",
            "teacher.weights=file:/x/y.pth",
            "train.augment=false",
        ],
    )
    assert cfg.federation.rounds == 3
    assert cfg.distill.alpha == 0.25
    assert cfg.teacher.weights == "file:/x/y.pth"
    assert cfg.train.augment is False


def test_int_for_float_is_accepted_and_numbers_for_strings_kept_as_text():
    cfg = load_config(None, ["train.lr=1", "run.name=2024"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.run.name == "2024"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("foo.bar=1", "unknown config section 'foo'"),
        ("train.lrr=0.1", "unknown config key 'train.lrr'"),
        ("train.lr=abc", "'train.lr' must be float"),
        ("federation.rounds=-1", "'federation.rounds'"),
        ("federation.rounds=1.5", "'federation.rounds' must be int"),
        ("distill.alpha=1.5", "'distill.alpha'"),
        ("distill.temperature=0", "'distill.temperature'"),
        ("federation.strategy=fedsgd", "choose one of: fedavg"),
        ("teacher.head=global", "choose one of: local, federated"),
        ("teacher.weights=s3://x", "teacher.weights"),
        ("data.source=imagenet", "data.source"),
        ("partition.labelled_fraction=0", "partition.labelled_fraction"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, [override])
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"train": {"epochs": 3}})
    assert "local_epochs" in str(info.value)


@pytest.mark.parametrize("bad", ["rounds", "federation.rounds", "a.b.c=1", "=3"])
def test_bad_override_syntax(bad):
    with pytest.raises(ConfigError, match="override"):
        parse_overrides([bad])


def test_min_sites_above_sites_is_rejected():
    with pytest.raises(ConfigError, match="min_sites"):
        load_config(None, ["partition.sites=2", "federation.min_sites=3"])


def test_yaml_round_trip_is_lossless(tmp_path):
    cfg = load_config(None, ["federation.rounds=7", "data.source=npz:/d/x.npz"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_split_overrides():
    assert split_overrides("a.b=1; c.d=x\n") == ["a.b=1", " c.d=x"]
    assert split_overrides("") == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "federation.max_round_retries=101",
            "config key 'federation.max_round_retries' = 101 is out of range; "
            "valid: [0, 100]",
        ),
        (
            "privacy.delta=0",
            "config key 'privacy.delta' = 0.0 is out of range; valid: (0, 0.1]",
        ),
        (
            "run.device=tpu",
            "config key 'run.device' = 'tpu' is not valid; "
            "choose one of: auto, cpu, cuda, mps",
        ),
    ],
)
def test_messages_quote_the_declaration_beside_the_field(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == message


def test_choices_are_read_from_the_field_declarations():
    assert set(CHOICES) == {
        "partition.scheme",
        "partition.shift",
        "teacher.head",
        "distill.feature_loss",
        "distill.kd_where",
        "federation.strategy",
        "federation.transfer_dtype",
        "train.optimizer",
        "train.optimizer_state",
        "train.lr_schedule",
        "privacy.dp_sgd_accountant",
        "calibration.ood",
        "calibration.temperature_data",
        "run.engine",
        "run.device",
    }
    assert "pooled" in CHOICES["federation.strategy"]


@pytest.mark.parametrize(
    "declaration",
    [
        {"default": 0.0, "bounds": "(0, 1]"},
        {"default": "x", "choices": ("a", "b")},
        {"default": 1, "bounds": "0..2"},
    ],
)
def test_a_field_declared_against_its_own_default_fails_at_import(declaration):
    with pytest.raises(ValueError):
        knob(**declaration)


def test_the_first_bad_key_in_file_order_is_reported():
    with pytest.raises(ConfigError, match="'data.source'"):
        load_config(None, ["teacher.head=x", "data.source=x"])


def test_calibration_defaults_and_bounds():
    cfg = load_config(None)
    c = cfg.calibration
    assert (c.temperature, c.ood, c.ood_false_alarm, c.ood_confidence) == (
        True, "mahalanobis", 0.05, 0.9)
    with pytest.raises(ConfigError, match="calibration.ood_false_alarm"):
        load_config(None, ["calibration.ood_false_alarm=0.7"])
    with pytest.raises(ConfigError, match="choose one of: mahalanobis, none"):
        load_config(None, ["calibration.ood=energy"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("privacy.dp_sgd_noise_multiplier=0", "'privacy.dp_sgd_noise_multiplier' = 0"),
        ("privacy.dp_sgd_max_grad_norm=-1", "'privacy.dp_sgd_max_grad_norm' = -1"),
        ("privacy.dp_sgd_delta=0.5", "'privacy.dp_sgd_delta' = 0.5"),
        ("privacy.dp_sgd_accountant=gdp", "choose one of: rdp, prv"),
        ("privacy.dp_sgd=maybe", "'privacy.dp_sgd' must be bool"),
    ],
)
def test_dp_sgd_values_are_checked_by_name(override, message):
    assert load_config(None).privacy.dp_sgd is False  # off by default
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["privacy.dp_sgd=true", "distill.alpha=1", override])


DP_SGD = ["privacy.dp_sgd=true", "distill.alpha=1"]
FEATURE_KD = [*DP_SGD, "distill.feature_weight=1", "teacher.head=local"]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["privacy.dp_sgd=true", "distill.alpha=0.5"], "distill.alpha=0.5"),
        ([*FEATURE_KD, "distill.gate=true"], "distill.gate=true"),
        ([*FEATURE_KD, "distill.gate=false", "teacher.head=federated"],
         "teacher.head=federated"),
        ([*FEATURE_KD, "distill.gate=false", "teacher.head=closed_form"],
         "teacher.head=closed_form"),
        ([*DP_SGD, "train.logit_adjust=1"], "train.logit_adjust=1"),
    ],
)  # fmt: skip
def test_dp_sgd_refuses_what_would_tie_one_image_to_the_others(overrides, named):
    with pytest.raises(ConfigError, match=f"privacy.dp_sgd=true .*{named}"):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["distill.gate=false", "distill.feature_weight=1", "teacher.head=local"],
        ["train.optimizer=adam", "train.optimizer_state=keep"],
        ["federation.strategy=fedprox"],
        ["privacy.dp=true", "teacher.head=local"],  # site-level DP as well
        ["federation.strategy=local"],
    ],
)
def test_dp_sgd_composes_with_what_keeps_each_loss_per_image(extra):
    assert load_config(None, [*DP_SGD, *extra]).privacy.dp_sgd


def test_scaffold_is_a_strategy_with_its_server_step():
    cfg = load_config(None, ["federation.strategy=scaffold",
                             "federation.server_lr=1.5"])
    assert cfg.federation.strategy == "scaffold"
    assert cfg.federation.server_lr == 1.5
    assert "scaffold" in CHOICES["federation.strategy"]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["privacy.dp=true", "teacher.head=local"], "privacy.dp=true"),
        ([*DP_SGD], "privacy.dp_sgd=true"),
    ],
)
def test_scaffold_refuses_what_its_control_variates_would_get_around(overrides,
                                                                    named):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["federation.strategy=scaffold", *overrides])
    msg = str(info.value)
    assert msg.startswith(f"federation.strategy=scaffold does not compose with {named}")
    assert "\n" not in msg
