"""Where a site computes: `run.device` (auto | cpu | cuda | mps) -> torch.device.

With `auto` the teacher's feature extraction and the student's training run on
the GPU when there is one (CUDA, then Apple MPS); on a CPU-only machine torch
gets one thread per CPU this process may use (its default counts physical
cores of the whole machine, not the cgroup/affinity share a service gets).
"""

from __future__ import annotations

import logging
import os

import torch

from common.errors import ConfigError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str) -> torch.device:
    """The torch device for `run.device`; an unavailable explicit one is an error."""
    if spec not in DEVICES:
        raise ConfigError(
            f"config key 'run.device' = {spec!r} is not valid; choose one of: "
            f"{', '.join(DEVICES)}"
        )
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if spec == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "run.device=cuda but torch sees no CUDA device; use run.device=auto or cpu"
        )
    if spec == "mps" and not _mps_available():
        raise ConfigError(
            "run.device=mps but torch sees no MPS device; use run.device=auto or cpu"
        )
    return torch.device(spec)


def usable_cpus() -> int:
    """CPUs this process may run on (affinity/cgroup aware where the OS says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def cpu_threads(spec: str, num_threads: int, device: torch.device) -> int | None:
    """Threads to give torch, or None to leave its default (run.device=cpu)."""
    if num_threads > 0:
        return num_threads
    if spec == "auto" and device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        return usable_cpus()
    return None


def setup_device(spec: str, num_threads: int = 0) -> torch.device:
    """Resolve `run.device` and set torch's CPU threads; return the device."""
    device = resolve_device(spec)
    threads = cpu_threads(spec, num_threads, device)
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    log.debug(
        "device %s (run.device=%s), %d CPU threads",
        device,
        spec,
        torch.get_num_threads(),
    )
    return device


__all__ = ["DEVICES", "cpu_threads", "resolve_device", "setup_device", "usable_cpus"]
