"""A site's CPU threads come from its node config when the SuperNode sets them."""

import pytest

from client.site import site_threads
from common.config import load_config
from common.errors import ConfigError


def test_node_config_threads_override_the_experiments():
    cfg = load_config(None, ["train.num_threads=2"])

    assert site_threads(cfg, {"num-threads": "1"}).train.num_threads == 1
    assert site_threads(cfg, {}).train.num_threads == 2
    assert site_threads(cfg, {"num-threads": "0"}).train.num_threads == 2
    assert cfg.train.num_threads == 2  # the cached config is left as it was


@pytest.mark.parametrize("bad", ["two", "-1", "1000"])
def test_bad_node_config_threads_name_the_key(bad):
    with pytest.raises(ConfigError, match="num-threads"):
        site_threads(load_config(None, []), {"num-threads": bad})
