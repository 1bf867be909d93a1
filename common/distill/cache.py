"""On-disk cache of teacher features, keyed by teacher and indexed by image content.

Layout: `<root>/<teacher_key>/shard-*.npy` (float16 features, one row per image)
with a `shard-*.json` sidecar holding the key, the per-image content hashes and
a sha256 over the feature file's bytes and the hashes. Shards are only ever
added, each written atomically (tmp file, fsync, rename; the sidecar last, as
the commit marker), so concurrent processes never see a half-written shard. A
shard that fails any check is moved to `quarantine/` with a warning and its
images are recomputed; it is never used.

The teacher key is computed from the config alone, so a site whose features
are all cached never builds (or even imports) the teacher backbone. It hashes:
`arch`; the weights *kind* (`hub` | `random` | `file`) and, for `file:`, the
sha256 of the file's bytes (not its path; memoised in
`<root>/weights-sha256.json` by path, size and mtime); `image_size`; the view;
the installed timm version (the backbone's code, its seeded random init and its
pretrained config, where the normalisation mean/std come from, are functions
of arch + timm version); and `PREPROCESS_VERSION`/`KEY_VERSION`. The teacher's
own description (feature dim, weights source incl. `proxy`, mean/std) is kept
in `<root>/<key>/teacher.json` when it is first built, and checked against any
later build under the same key.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data.types import image_hashes
from common.errors import CacheError

log = logging.getLogger(__name__)

FORMAT = 1
# Bump when teacher preprocessing (resize, normalisation) changes meaning.
PREPROCESS_VERSION = 1
# Bump when the key's ingredients change (2: from the config, no backbone needed).
KEY_VERSION = 2
INFO_NAME = "teacher.json"
_SHA_MEMO = "weights-sha256.json"
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


@dataclass(frozen=True)
class CacheStats:
    """What one get_or_compute call did."""

    hits: int  # requested images served from the cache
    misses: int  # requested images not cached before the call (computed now)
    seconds: float  # wall time of the call, teacher forward included


def _timm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("timm")
    except PackageNotFoundError:  # pragma: no cover - timm is a dependency
        return "unknown"


def weights_file_sha256(path: str | Path, memo_root: str | Path | None = None) -> str:
    """sha256 of a weights file's bytes, memoised on disk by (path, size, mtime)."""
    path = Path(path).expanduser().resolve()
    try:
        st = path.stat()
    except OSError as err:
        raise CacheError(
            f"teacher weights file not found: {path}; check teacher.weights=file:"
        ) from err
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo_path = Path(memo_root).expanduser() / _SHA_MEMO if memo_root else None
    memo: dict = {}
    if memo_path is not None and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}  # a damaged memo only costs one re-hash
        entry = memo.get(str(path)) if isinstance(memo, dict) else None
        if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items()):
            return str(entry["sha256"])
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    sha = h.hexdigest()
    if memo_path is not None:
        memo = memo if isinstance(memo, dict) else {}
        memo[str(path)] = dict(stamp, sha256=sha)
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(memo_path, json.dumps(memo, indent=1).encode())
    return sha


def teacher_cache_key(
    teacher, view: int = 0, memo_root: str | Path | None = None
) -> str:
    """Cache key of a teacher config (or FrozenTeacher) and view; see module doc.

    Needs no backbone: `teacher` is anything with `arch`, `image_size` and
    `weights` (TeacherConfig) or `weights_spec` (FrozenTeacher).
    """
    spec = str(getattr(teacher, "weights", None) or teacher.weights_spec)
    kind = spec.split(":", 1)[0] if spec.startswith("file:") else spec
    parts = {
        "key_version": KEY_VERSION,
        "arch": teacher.arch,
        "weights": kind,
        "weights_sha256": (
            weights_file_sha256(spec[5:], memo_root) if kind == "file" else None
        ),
        "image_size": int(teacher.image_size),
        "view": int(view),
        "timm": _timm_version(),
        "preprocess": PREPROCESS_VERSION,
    }
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    arch = re.sub(r"[^A-Za-z0-9._-]+", "-", teacher.arch)[:80]
    return f"{arch}-{kind}-{int(teacher.image_size)}px-v{int(view)}-{digest[:16]}"


def _digest(feature_bytes: bytes, hashes: list[str]) -> str:
    h = hashlib.sha256(feature_bytes)
    h.update("\n".join(hashes).encode())
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # not supported on every filesystem
        pass
    finally:
        os.close(fd)


class _Corrupt(Exception):
    pass


class FeatureCache:
    """Teacher features per image content hash, in checksummed float16 shards."""

    def __init__(self, root: str | Path, teacher_key: str) -> None:
        if not isinstance(teacher_key, str) or not _KEY_RE.match(teacher_key):
            raise CacheError(
                f"bad teacher cache key {teacher_key!r}; build it with "
                "teacher_cache_key(teacher, view)"
            )
        self.root = Path(root).expanduser()
        self.key = teacher_key
        self.dir = self.root / teacher_key
        self.dim: int | None = None
        self._loaded: set[str] = set()
        self._blocks: list[np.ndarray] = []
        self._index: dict[str, tuple[int, int]] = {}  # hash -> (block, row)

    def read_info(self) -> dict | None:
        """The teacher description stored with these features, or None."""
        try:
            info = json.loads((self.dir / INFO_NAME).read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def write_info(self, info: dict) -> None:
        """Store the teacher's description; refuse one that contradicts it."""
        old = self.read_info()
        if old is not None:
            keys = ("feature_dim", "mean", "std", "weights_source")
            diff = [k for k in keys if old.get(k) != info.get(k)]
            if diff:
                raise CacheError(
                    f"teacher cache {self.dir} was written by a teacher with "
                    f"{ {k: old.get(k) for k in diff} }, this one has "
                    f"{ {k: info.get(k) for k in diff} }; delete that folder"
                )
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.dir / INFO_NAME, json.dumps(info, default=str).encode())

    def shard_names(self) -> list[str]:
        """Names (without suffix) of the committed shards on disk."""
        if not self.dir.is_dir():
            return []
        return sorted(p.stem for p in self.dir.glob("shard-*.json"))

    def _quarantine(self, name: str, reason: str) -> None:
        qdir = self.dir / "quarantine"
        qdir.mkdir(parents=True, exist_ok=True)
        stamp = uuid.uuid4().hex[:8]
        for suffix in (".json", ".npy"):
            src = self.dir / f"{name}{suffix}"
            try:
                os.replace(src, qdir / f"{name}.{stamp}{suffix}")
            except FileNotFoundError:  # absent, or another process moved it first
                pass
        log.warning(
            "teacher feature cache shard %s is corrupt (%s); moved to %s "
            "and its images will be recomputed",
            self.dir / f"{name}.npy",
            reason,
            qdir,
        )

    def _read_shard(self, name: str) -> tuple[list[str], np.ndarray]:
        try:
            meta = json.loads((self.dir / f"{name}.json").read_text())
        except (OSError, ValueError) as err:
            raise _Corrupt(f"unreadable sidecar: {err}") from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise _Corrupt("unknown sidecar format")
        if meta.get("key") != self.key:
            raise _Corrupt(f"key {meta.get('key')!r} != {self.key!r}")
        hashes, rows, dim = meta.get("hashes"), meta.get("rows"), meta.get("dim")
        if not isinstance(hashes, list) or len(hashes) != rows:
            raise _Corrupt("hash list does not match the row count")
        try:
            data = (self.dir / f"{name}.npy").read_bytes()
        except OSError as err:
            raise _Corrupt(f"feature file unreadable: {err}") from err
        if _digest(data, hashes) != meta.get("sha256"):
            raise _Corrupt("checksum mismatch")
        try:
            feats = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError) as err:
            raise _Corrupt(f"feature file does not parse: {err}") from err
        if feats.dtype != np.float16 or feats.shape != (rows, dim):
            want = f"float16 ({rows}, {dim})"
            raise _Corrupt(f"array {feats.dtype} {feats.shape} != {want}")
        if self.dim is not None and dim != self.dim:
            raise _Corrupt(f"feature dim {dim} != {self.dim} of the other shards")
        return hashes, feats

    def _refresh(self) -> None:
        """Load shards written since the last call (by us or other processes)."""
        for name in self.shard_names():
            if name in self._loaded:
                continue
            try:
                hashes, feats = self._read_shard(name)
            except _Corrupt as err:
                self._quarantine(name, str(err))
                continue
            self._add(name, hashes, feats)

    def _add(self, name: str, hashes: list[str], feats: np.ndarray) -> None:
        self._loaded.add(name)
        self.dim = int(feats.shape[1])
        block = len(self._blocks)
        self._blocks.append(feats)
        for row, h in enumerate(hashes):
            self._index.setdefault(h, (block, row))

    def _write_shard(self, hashes: list[str], feats: np.ndarray) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"shard-{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        buf = io.BytesIO()
        np.save(buf, feats, allow_pickle=False)
        data = buf.getvalue()
        meta = {
            "format": FORMAT,
            "key": self.key,
            "rows": len(hashes),
            "dim": int(feats.shape[1]),
            "dtype": "float16",
            "sha256": _digest(data, hashes),
            "hashes": hashes,
        }
        _write_atomic(self.dir / f"{name}.npy", data)
        _write_atomic(self.dir / f"{name}.json", json.dumps(meta).encode())
        _fsync_dir(self.dir)
        return name

    def _checked(self, feats: np.ndarray, count: int) -> np.ndarray:
        feats = np.asarray(feats)
        if (
            feats.ndim != 2
            or feats.shape[0] != count
            or (self.dim is not None and feats.shape[1] != self.dim)
        ):
            want = f"({count}, {self.dim if self.dim is not None else 'D'})"
            raise CacheError(
                f"teacher feature function returned shape {feats.shape}, expected "
                f"{want} for cache {self.dir}; is it the teacher of key {self.key}?"
            )
        if not np.isfinite(feats).all():
            raise CacheError(
                f"teacher features for cache {self.dir} contain NaN/inf; check the "
                "teacher weights and inputs"
            )
        peak = float(np.abs(feats).max()) if feats.size else 0.0
        if peak > float(np.finfo(np.float16).max):
            raise CacheError(
                f"teacher features for cache {self.dir} exceed the float16 range "
                f"(max |x| = {peak:.3g}); the teacher is broken"
            )
        return feats.astype(np.float16)

    def get_or_compute(
        self, images: np.ndarray, compute: Callable[[np.ndarray], np.ndarray]
    ) -> tuple[np.ndarray, CacheStats]:
        """float32 (N, D) features of `images`; `compute` runs on uncached ones only."""
        t0 = time.perf_counter()
        hashes = image_hashes(images)
        self._refresh()
        missing = [i for i, h in enumerate(hashes) if h not in self._index]
        if missing:
            first: dict[str, int] = {}
            for i in missing:  # duplicates within the call are computed once
                first.setdefault(hashes[i], i)
            new_hashes = list(first)
            todo = np.asarray(list(first.values()))
            feats = self._checked(compute(images[todo]), len(todo))
            name = self._write_shard(new_hashes, feats)
            self._add(name, new_hashes, feats)
        dim = self.dim if self.dim is not None else 0
        out = np.empty((len(hashes), dim), np.float32)
        for i, h in enumerate(hashes):
            block, row = self._index[h]
            out[i] = self._blocks[block][row]
        stats = CacheStats(
            hits=len(hashes) - len(missing),
            misses=len(missing),
            seconds=time.perf_counter() - t0,
        )
        log.debug(
            "teacher cache %s: %d hits, %d misses", self.key, stats.hits, stats.misses
        )
        return out, stats


__all__ = ["CacheStats", "FeatureCache", "teacher_cache_key", "weights_file_sha256"]
