"""Teacher weights: parse `teacher.weights`, read local checkpoints, save proxies.

Sources are `hub` (timm's pretrained download), `file:<path>` (a timm state dict,
Meta's original DINOv2 `.pth`, or a proxy checkpoint written by
`save_teacher_checkpoint`) and `random`. Every failure raises
TeacherWeightsError; no source ever falls back to another.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import TeacherWeightsError

log = logging.getLogger(__name__)

META_KEY = "fedkd_meta"
_WRAPPERS = ("state_dict", "model", "teacher")
_PREFIXES = ("module.", "_orig_mod.", "backbone.")
_SHOW = 3  # offending keys named in an error message


def parse_weights_spec(spec: str) -> tuple[str, Path | None]:
    """Split `teacher.weights` into (hub|file|random, path or None)."""
    if spec in ("hub", "random"):
        return spec, None
    if isinstance(spec, str) and spec.startswith("file:") and len(spec) > 5:
        return "file", Path(spec[5:]).expanduser()
    raise TeacherWeightsError(
        f"teacher.weights={spec!r} is not valid; use hub, file:<path> or random"
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def hub_error(
    arch: str, err: BaseException, url: str | None = None
) -> TeacherWeightsError:
    """The error for a failed hub download, saying how to supply a local file."""
    name = Path(url).name if url else "dinov2_vits14_pretrain.pth"
    where = f" (get it from {url} on a connected machine)" if url else ""
    if isinstance(err, OSError):  # DNS, HTTP, and "not in the local cache" errors
        why = "the hub is unreachable and the weights are not in the local cache"
    else:
        why = "the hub weights did not load"
    return TeacherWeightsError(
        f"cannot get pretrained weights for teacher.arch={arch!r}: {why} "
        f"({_first_line(err)}); supply a local file with "
        f"--set teacher.weights=file:/path/to/{name} (Meta's original) or a timm "
        f"checkpoint{where}"
    )


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    meta = None
    if isinstance(obj, dict) and META_KEY in obj:
        meta = obj[META_KEY]
        if not isinstance(meta, dict):
            raise TeacherWeightsError(
                f"teacher weights file {path}: '{META_KEY}' is not a mapping; rewrite "
                "it with save_teacher_checkpoint"
            )
    for _ in range(2):  # e.g. {"model": {"state_dict": ...}}
        if isinstance(obj, dict):
            inner = next(
                (obj[k] for k in _WRAPPERS if k in obj and isinstance(obj[k], dict)),
                None,
            )
            if inner is not None:
                obj = inner
    if not isinstance(obj, dict) or not obj:
        raise TeacherWeightsError(
            f"teacher weights file {path} holds no state dict (got "
            f"{type(obj).__name__}); give a timm or Meta DINOv2 checkpoint"
        )
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TeacherWeightsError(
            f"teacher weights file {path} has non-tensor entries {bad[:_SHOW]}; give "
            "a plain state dict (optionally under 'state_dict' or 'model')"
        )
    sd: dict[str, torch.Tensor] = dict(obj)
    for prefix in _PREFIXES:  # DDP / torch.compile / DINOv2 training wrappers
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd, meta


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Load (state dict, fedkd meta or None) from a local checkpoint file."""
    if not path.is_file():
        raise TeacherWeightsError(
            f"teacher weights file not found: {path}; check "
            "--set teacher.weights=file:<path> (or use hub / random)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and truncation errors alike
        raise TeacherWeightsError(
            f"teacher weights file {path} is not a readable torch checkpoint "
            f"({_first_line(err)}); re-download or re-export it"
        ) from err
    return _unwrap(obj, path)


def _check_patch_embed(
    sd: dict[str, torch.Tensor], model: nn.Module, path: Path, arch: str
) -> None:
    # timm's filter would silently resample a different patch size; that is a
    # different architecture here, so refuse it.
    key = "patch_embed.proj.weight"
    own = model.state_dict().get(key)
    theirs = sd.get(key)
    if own is None or theirs is None or theirs.ndim != 4:
        return
    if tuple(theirs.shape[-2:]) != tuple(own.shape[-2:]):
        raise TeacherWeightsError(
            f"teacher weights file {path} has patch size {tuple(theirs.shape[-2:])} "
            f"but teacher.arch={arch!r} uses {tuple(own.shape[-2:])}; use a "
            "checkpoint of that architecture or change teacher.arch"
        )


def convert_state_dict(
    sd: dict[str, torch.Tensor], model: nn.Module, path: Path, arch: str
) -> dict[str, torch.Tensor]:
    """Map a timm or Meta checkpoint onto `model` with timm's own filter."""
    _check_patch_embed(sd, model, path, arch)
    module = sys.modules.get(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            # The filter renames Meta DINOv2 keys and resamples pos_embed to the
            # model's grid; it mutates its input, hence the copy.
            sd = filter_fn(dict(sd), model)
        except Exception as err:
            raise TeacherWeightsError(
                f"teacher weights file {path} cannot be converted for "
                f"teacher.arch={arch!r} ({_first_line(err)}); use a checkpoint of "
                "that architecture"
            ) from err
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    own = model.state_dict()
    if isinstance(classifier, str):  # the teacher is built without a head
        sd = {
            k: v
            for k, v in sd.items()
            if k in own or not k.startswith(classifier + ".")
        }
    return sd


def load_state_dict_strict(
    model: nn.Module, sd: dict[str, torch.Tensor], path: Path, arch: str
) -> None:
    """Load `sd` into `model`; any missing, extra or mis-shaped key is an error."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in sd
        if k in own and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys e.g. {missing[:_SHOW]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys e.g. {unexpected[:_SHOW]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches e.g. {shapes[:_SHOW]}")
        raise TeacherWeightsError(
            f"teacher weights file {path} does not fit teacher.arch={arch!r}: "
            f"{'; '.join(parts)}; use a checkpoint of that architecture or set "
            "teacher.arch to the checkpoint's"
        )
    model.load_state_dict(sd, strict=True)


def _base_arch(name: str) -> str:
    return str(name).split(".", 1)[0]


def load_file_weights(model: nn.Module, path: Path, arch: str) -> tuple[str, dict]:
    """Load a local checkpoint into `model`; return ("file"|"proxy", meta)."""
    sd, meta = read_checkpoint(path)
    meta = dict(meta or {})
    if meta:
        meta_arch = meta.get("arch")
        # Pretrained tags (".lvd142m") name weights, not shapes: compare base names.
        if not isinstance(meta_arch, str) or _base_arch(meta_arch) != _base_arch(arch):
            raise TeacherWeightsError(
                f"teacher weights file {path} was saved for arch {meta_arch!r} but "
                f"teacher.arch={arch!r}; set teacher.arch={meta_arch} or use another "
                "file"
            )
    sd = convert_state_dict(sd, model, path, arch)
    load_state_dict_strict(model, sd, path, arch)
    source = "proxy" if meta.get("proxy") else "file"
    if source == "proxy":
        log.warning(
            "teacher %s is a PROXY (trained on %s): not the real pretrained weights",
            arch,
            meta.get("trained_on", "unknown data"),
        )
    return source, meta


def save_teacher_checkpoint(model: nn.Module, path: str | Path, meta: dict) -> Path:
    """Write {"state_dict", "fedkd_meta"} atomically (tmp, fsync, rename)."""
    if not isinstance(meta, dict) or not isinstance(meta.get("arch"), str):
        raise TeacherWeightsError(
            "save_teacher_checkpoint needs meta with an 'arch' string, e.g. "
            "{'arch': 'vit_small_patch14_dinov2', 'proxy': True, 'trained_on': ...}"
        )
    inner = getattr(model, "model", model)  # a FrozenTeacher wraps its backbone
    sd = {k: v.detach().cpu().contiguous() for k, v in inner.state_dict().items()}
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"state_dict": sd, META_KEY: dict(meta)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def state_dict_sha256(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of `model`'s state dict."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


__all__ = [
    "META_KEY",
    "convert_state_dict",
    "hub_error",
    "load_file_weights",
    "load_state_dict_strict",
    "parse_weights_spec",
    "read_checkpoint",
    "save_teacher_checkpoint",
    "state_dict_sha256",
]
