"""Property-based tests: the config parser and the npz loader never fail oddly."""

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.config import (
    CHOICES,
    ExperimentConfig,
    config_from_dict,
    config_from_yaml_text,
    load_config,
)
from common.data.medmnist import load_npz
from common.errors import ConfigError, DataError

KEYS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
VALUES = st.one_of(st.integers(-5, 5), st.floats(-2, 2, allow_nan=False),
                   st.booleans(), st.text(max_size=6), st.none())


@settings(max_examples=60, deadline=None)
@given(section=st.sampled_from(["data", "train", "distill", "federation", "zzz"]),
       key=KEYS, value=VALUES)
def test_config_accepts_or_names_the_key(section, key, value):
    try:
        cfg = config_from_dict({section: {key: value}})
    except ConfigError as err:
        msg = str(err)
        assert "\n" not in msg
        assert section in msg or key in msg
    else:  # accepted: it must be a real key and survive a YAML round trip
        assert key in getattr(cfg, section).__dataclass_fields__
        assert config_from_dict(cfg.to_dict()) == cfg


@settings(max_examples=40, deadline=None)
@given(rounds=st.integers(-3, 1000), alpha=st.floats(-1, 2, allow_nan=False),
       temp=st.floats(-1, 10, allow_nan=False))
def test_numeric_ranges(rounds, alpha, temp):
    ok = rounds >= 1 and 0 <= alpha <= 1 and temp > 0
    try:
        load_config(None, [f"federation.rounds={rounds}", f"distill.alpha={alpha!r}",
                           f"distill.temperature={temp!r}"])
        assert ok
    except ConfigError:
        assert not ok


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 6), h=st.integers(1, 9), chans=st.sampled_from([None, 1, 3, 4]),
       dtype=st.sampled_from([np.uint8, np.float32, np.int64]),
       label_max=st.integers(-2, 5), label_dims=st.sampled_from([1, 2]),
       drop=st.sampled_from([None, "val_images", "test_labels"]))
def test_npz_loader_loads_or_raises_data_error(tmp_path_factory, n, h, chans, dtype,
                                               label_max, label_dims, drop):
    path = tmp_path_factory.mktemp("npz") / "x.npz"
    shape = (n, h, h) if chans is None else (n, h, h, chans)
    data = {}
    for split in ("train", "val", "test"):
        data[f"{split}_images"] = np.zeros(shape, dtype)
        labels = np.full(n, label_max, np.int64)
        data[f"{split}_labels"] = labels.reshape(-1, 1) if label_dims == 2 else labels
    if drop:
        del data[drop]
    np.savez(path, **data)
    try:
        ds = load_npz(path, 8)
    except DataError as err:
        assert "\n" not in str(err)
    else:
        assert ds.train.images.dtype == np.uint8
        assert ds.train.images.shape[1:3] == (8, 8)


# -- the config parser: unknown keys, round trips, numeric ranges ------------

SECTIONS = {
    f.name: f.default_factory().__dataclass_fields__  # type: ignore[misc]
    for f in dataclasses.fields(ExperimentConfig)
}
IDENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1,
                max_size=16)
# free text for str-typed keys: YAML-significant characters included on purpose
FREE_TEXT = st.text(
    alphabet=st.characters(codec="ascii", categories=["L", "N", "P", "S", "Zs"]),
    min_size=1, max_size=20,
).filter(lambda s: s == s.strip() and not (s[0] == s[-1] and s[0] in "'\""))


@settings(max_examples=80, deadline=None)
@given(section=st.sampled_from(sorted(SECTIONS)), key=IDENT,
       value=VALUES, via_override=st.booleans())
def test_unknown_keys_are_always_rejected_and_named(section, key, value,
                                                    via_override):
    if key in SECTIONS[section]:
        return
    with pytest.raises(ConfigError) as info:
        if via_override:
            load_config(None, [f"{section}.{key}={value}"])
        else:
            config_from_dict({section: {key: value}})
    msg = str(info.value)
    assert f"'{section}.{key}'" in msg and "valid keys" in msg and "\n" not in msg


@settings(max_examples=40, deadline=None)
@given(section=IDENT)
def test_unknown_sections_are_always_rejected_and_named(section):
    if section in SECTIONS:
        return
    with pytest.raises(ConfigError, match=f"unknown config section '{section}'"):
        config_from_dict({section: {}})


def _valid_overrides():
    """A strategy for a set of valid `--set` items across every type of key."""
    finite = {"allow_nan": False, "allow_infinity": False}
    fields = {
        "federation.rounds": st.integers(1, 10**6),
        "federation.strategy": st.sampled_from(CHOICES["federation.strategy"]),
        "federation.round_timeout": st.floats(1e-3, 1e7, **finite),
        "federation.trim_beta": st.floats(1e-3, 0.5, **finite),
        "distill.alpha": st.floats(0, 1, **finite),
        "distill.temperature": st.floats(1e-3, 1e3, **finite),
        "train.lr": st.floats(1e-9, 10, **finite),
        "train.seed": st.integers(-(2**31), 2**31),
        "train.augment": st.booleans(),
        "train.optimizer": st.sampled_from(CHOICES["train.optimizer"]),
        "privacy.noise_multiplier": st.floats(0, 100, **finite),
        "run.name": FREE_TEXT,
        "run.out_dir": FREE_TEXT,
        "data.cache_dir": FREE_TEXT,
        "student.arch": FREE_TEXT,
        "data.source": FREE_TEXT.map(lambda s: f"npz:{s}"),
        "teacher.weights": st.one_of(st.sampled_from(["hub", "random"]),
                                     FREE_TEXT.map(lambda s: f"file:{s}")),
    }
    return st.fixed_dictionaries({}, optional=fields)


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


@settings(max_examples=80, deadline=None)
@given(values=_valid_overrides())
def test_valid_settings_round_trip_through_set_and_yaml(values):
    cfg = load_config(None, [f"{k}={_text(v)}" for k, v in values.items()])
    for dotted, value in values.items():  # --set gives exactly what was typed
        sec, key = dotted.split(".")
        assert getattr(getattr(cfg, sec), key) == value, dotted
    assert config_from_yaml_text(cfg.to_yaml()) == cfg  # YAML is lossless
    flat = [f"{s}.{k}={_text(v)}" for s, d in cfg.to_dict().items()
            for k, v in d.items()]
    assert load_config(None, flat) == cfg  # so is the full set of overrides


RANGES = {  # key: (lo, hi, lo_open)
    "distill.alpha": (0.0, 1.0, False),
    "distill.temperature": (0.0, math.inf, True),
    "train.lr": (0.0, math.inf, True),
    "train.momentum": (0.0, 1.0, False),
    "federation.trim_beta": (0.0, 0.5, True),
    "federation.round_timeout": (0.0, math.inf, True),
    "federation.poll_interval": (0.0, 60.0, True),
    "partition.alpha": (0.0, math.inf, True),
    "privacy.clipping_norm": (0.0, math.inf, True),
    "privacy.noise_multiplier": (0.0, math.inf, False),
    "privacy.delta": (0.0, 0.1, True),
}


@settings(max_examples=120, deadline=None)
@given(key=st.sampled_from(sorted(RANGES)),
       value=st.one_of(st.floats(-2, 2), st.floats(allow_nan=True),
                       st.sampled_from([0.0, 0.5, 1.0, math.inf, -math.inf])))
def test_float_keys_accept_exactly_their_finite_range(key, value):
    lo, hi, lo_open = RANGES[key]
    ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) \
        and value <= hi
    try:
        load_config(None, [f"{key}={value!r}"])
    except ConfigError as err:
        assert not ok, f"{key}={value!r} rejected: {err}"
        assert f"'{key}'" in str(err)
    else:
        assert ok, f"{key}={value!r} accepted"


# -- the npz loader: anything loads or raises DataError ----------------------

def _array(draw, n):
    kind = draw(st.sampled_from(["uint8", "int16", "float64", "bool", "str",
                                 "scalar", "fraction"]))
    h = draw(st.integers(1, 6))
    shape = draw(st.sampled_from([(n,), (n, h), (n, h, h), (n, h, h, 1),
                                  (n, h, h, 3), (n, h, h, 2), (n, 1)]))
    if kind == "scalar":
        return np.array(draw(st.integers(-3, 3)))
    if kind == "str":
        return np.full(shape, "x")
    if kind == "fraction":
        return np.full(shape, draw(st.one_of(st.floats(-1, 3), st.just(math.nan))))
    if kind == "bool":
        return np.zeros(shape, bool)
    return np.full(shape, draw(st.integers(-3, 300))).astype(kind)


@st.composite
def _npz_content(draw):
    out = {}
    for split in ("train", "val", "test"):
        n = draw(st.integers(0, 5))
        for part in ("images", "labels"):
            if draw(st.integers(0, 9)) == 0:
                continue  # a missing key
            m = n if draw(st.integers(0, 5)) else n + 1  # sometimes a count mismatch
            out[f"{split}_{part}"] = _array(draw, m)
    return out


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=_npz_content())
def test_any_npz_loads_or_raises_data_error(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("npz") / "y.npz"
    np.savez(path, **content)
    try:
        ds = load_npz(path, 8)
    except DataError as err:
        assert "\n" not in str(err) and str(path) in str(err)
    else:
        for part in (ds.train, ds.val, ds.test):
            assert part.images.dtype == np.uint8 and part.images.shape[1:3] == (8, 8)
            assert part.labels.dtype == np.int64 and len(part.labels) == len(part)
            assert ((part.labels >= 0) & (part.labels < ds.num_classes)).all()
