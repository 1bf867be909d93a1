"""The handshake contract: what a site tells the server about itself (no data).

The site writes a `SiteInfo` into its query reply; the server reads it back
with `SiteInfo.from_record`. The wire form is a flat Flower ConfigRecord with
kebab-case keys (as in model cards). A missing or unknown key, a wrong type or
another contract version is an error that names the key, never a silent
default: a site running other code must not be read as if it agreed.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any

from common.errors import MessageError

SITE_INFO_VERSION = 1


@dataclass(frozen=True)
class SiteInfo:
    """Scalar facts about one site, sent once in the handshake."""

    name: str
    classes: tuple[str, ...]  # label names, index = label
    num_train: int  # training images (labelled or not)
    num_test: int  # images of the site's own held-out test part
    num_labelled: int  # training images that keep their label
    channels: int  # 1 (grayscale) or 3 (RGB)
    teacher_used: bool  # the site computed teacher features for this run
    teacher_weights: str  # hub | file | proxy | random | none
    teacher_feature_dim: int  # width of the teacher's features, 0 without one
    deployed: bool = False  # a real site (its own data), not a simulated partition
    # per-class training counts; None when privacy.share_class_counts is off
    class_counts: tuple[int, ...] | None = None
    # e with |teacher feature| <= 2^e over the labelled training views; sent
    # only when the closed-form head's statistics are summed securely (the
    # server scales the sum by it; server/teacher_head.py)
    teacher_feature_log2: int | None = None
    version: int = SITE_INFO_VERSION

    @property
    def num_classes(self) -> int:
        """Number of classes the site's label space names."""
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case plain data (the wire form, the model card's `sites` rows)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue  # an absent optional field is not sent
            out[f.name.replace("_", "-")] = list(value) if isinstance(
                value, tuple
            ) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SiteInfo:
        """Read the wire form back; any key not in the contract is an error."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        who = f"site {data.get('name', '?')!r}"
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise MessageError(
                f"{who} sent unknown handshake keys {unknown}; valid: "
                f"{', '.join(known)} (is it running the same fedkd version?)"
            )
        version = data.get("version")
        if version != SITE_INFO_VERSION:
            raise MessageError(
                f"{who} speaks handshake version {version!r}, the server "
                f"{SITE_INFO_VERSION}; run the same fedkd version at every site"
            )
        kwargs = {}
        for key, f in known.items():
            if key not in data:
                if f.default is not MISSING:  # optional, e.g. class-counts
                    continue
                raise MessageError(f"{who}: handshake lacks key '{key}'")
            kwargs[f.name] = _check(who, key, data[key], f.type)
        return cls(**kwargs)


_TYPES = {
    "str": (str,),
    "int": (int,),
    "bool": (bool,),
    "tuple[str, ...]": (list, tuple),
    "tuple[int, ...] | None": (list, tuple),
    "int | None": (int,),
}


def _check(who: str, key: str, value: Any, typ: str) -> Any:
    """`value` converted to the field's type, or a MessageError naming the key."""
    ok = _TYPES[str(typ)]
    bad_bool = isinstance(value, bool) and bool not in ok
    if not isinstance(value, ok) or bad_bool:
        raise MessageError(
            f"{who}: handshake key '{key}' must be {typ}, got "
            f"{type(value).__name__} {value!r}"
        )
    if typ == "tuple[str, ...]":
        return tuple(str(v) for v in value)
    if typ.startswith("tuple[int"):
        return tuple(int(v) for v in value)
    return value
