"""The handshake contract: round trip, and errors that name the key."""

import pytest

from common.errors import MessageError
from common.site_info import SITE_INFO_VERSION, SiteInfo


def _info(**kw) -> SiteInfo:
    base = dict(name="site-0", classes=("no", "yes"), num_train=10, num_test=4,
                num_labelled=8, channels=1, teacher_used=True,
                teacher_weights="proxy", teacher_feature_dim=512,
                class_counts=(6, 4))
    return SiteInfo(**{**base, **kw})


def test_round_trip_through_the_wire_form():
    info = _info()
    wire = info.to_dict()
    assert wire["class-counts"] == [6, 4] and wire["version"] == SITE_INFO_VERSION
    assert SiteInfo.from_dict(wire) == info
    hidden = _info(class_counts=None)
    assert "class-counts" not in hidden.to_dict()  # share_class_counts off
    assert SiteInfo.from_dict(hidden.to_dict()).class_counts is None


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"num-trian": 3}, "unknown handshake keys \\['num-trian'\\]"),
        ({"version": 0}, "handshake version 0"),
        ({"channels": "1"}, "'channels' must be int"),
        ({"teacher-used": 1}, "'teacher-used' must be bool"),
        ({"num-train": True}, "'num-train' must be int"),
    ],
)
def test_bad_handshakes_name_the_key(change, match):
    wire = {**_info().to_dict(), **change}
    with pytest.raises(MessageError, match=match):
        SiteInfo.from_dict(wire)


def test_a_missing_required_key_is_named():
    wire = _info().to_dict()
    del wire["num-test"]
    with pytest.raises(MessageError, match="lacks key 'num-test'"):
        SiteInfo.from_dict(wire)
