"""The site's per-process cache: bounded, least recently used dropped first."""

import pytest

from client.site import SiteCache
from common.config import load_config


def test_config_is_parsed_once_per_text():
    cache = SiteCache()
    text = load_config(None).to_yaml()

    first = cache.config(text)

    assert cache.config(text) is first
    assert cache.sizes()["configs"] == 1


def test_full_cache_drops_the_least_recently_used_entry():
    cache = SiteCache(configs=2)
    a, b, c = (load_config(None, [f"train.seed={s}"]).to_yaml() for s in (1, 2, 3))
    kept = cache.config(a)
    dropped = cache.config(b)
    cache.config(a)  # a is now the most recently used

    cache.config(c)

    assert cache.sizes()["configs"] == 2
    assert cache.config(a) is kept
    assert cache.config(b) is not dropped  # rebuilt: b was the oldest


def test_clear_forgets_everything():
    cache = SiteCache()
    text = load_config(None).to_yaml()
    first = cache.config(text)

    cache.clear()

    assert set(cache.sizes().values()) == {0}
    assert cache.config(text) is not first


def test_a_size_below_one_is_an_error():
    with pytest.raises(ValueError, match="sites"):
        SiteCache(sites=0)
