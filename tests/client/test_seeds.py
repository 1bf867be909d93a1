"""Site training seeds come from a real hash of the full site name."""

import hashlib

import pytest

from client.site import hash_name, site_seed
from common.config import load_config

# Pairs that share their first 8 bytes: a hash of a name prefix gives them
# identical seeds.
PAIRS = [("hospital-north", "hospital-south"), ("site-100", "site-1000")]


@pytest.mark.parametrize(("a", "b"), PAIRS)
def test_names_sharing_a_prefix_get_different_seeds(a, b):
    cfg = load_config(None)

    assert hash_name(a) != hash_name(b)
    for rnd in (1, 2, 7):
        assert site_seed(cfg, rnd, a) != site_seed(cfg, rnd, b)


def test_hash_is_sha256_of_the_whole_name_and_stable():
    digest = hashlib.sha256(b"hospital-north").digest()

    assert hash_name("hospital-north") == int.from_bytes(digest[:4], "little") & (
        2**31 - 1
    )
    assert 0 <= site_seed(load_config(None), 3, "site-0") < 2**31
    assert site_seed(load_config(None), 3, "site-0") == site_seed(
        load_config(None), 3, "site-0"
    )
