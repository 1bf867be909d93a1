"""Property-based tests: the config parser and the npz loader never fail oddly."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.config import config_from_dict, load_config
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
