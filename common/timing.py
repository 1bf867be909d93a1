"""Where one message's time goes at a site: per-phase seconds for the reply.

A handler runs inside `profiled()`; the steps it calls mark their phases with
`phase(name)`, which is a no-op outside a profiled message, so library code
can mark phases without knowing whether anyone is timing it. Phases nest: a
phase's seconds exclude those of the phases inside it, so the phases of one
message add up to no more than its handler's wall time.

The start-up of the process is timed too, because in a deployment Flower
starts a fresh `flwr-clientapp` process for every message (it pulls the
message, installs the FAB, imports the app, answers and exits). The app
module calls `app_imported` once its imports are done; the first message a
process serves then also reports

- `start`: process start -> the app's imports began (Python, Flower's own
  imports, pulling the message and installing the FAB);
- `import`: the app module's imports;
- `load`: the app imported -> this handler entered (Flower loading the app).

Later messages of a long-lived process (a simulation's workers) report 0 for
these: they did not pay for them. Written by hand: the standard library's
profilers time functions, not named phases of one request.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

# When this module was first imported: the app module imports it before
# anything else, so this is when the app's own imports began.
_LOADED_AT = time.perf_counter()

log = logging.getLogger(__name__)

COLD_PHASES = ("start", "import", "load")
# the reply's ConfigRecord holding the phases (re-exported by common.serialization)
PROFILE_RECORD = "profile"


def metric_name(phase_name: str) -> str:
    """The reply's key for a phase: `t_<phase>_s` (seconds)."""
    return f"t_{phase_name}_s"


def from_metrics(values: Mapping[str, float], prefix: str = "") -> dict[str, float]:
    """The phases in `values` (numbers under `<prefix>t_<phase>_s`), by phase."""
    head = f"{prefix}t_"
    return {
        k[len(head) : -2]: float(v)
        for k, v in values.items()
        if k.startswith(head) and k.endswith("_s") and isinstance(v, (int, float))
    }


def wall_seconds(seconds: Mapping[str, float]) -> float:
    """A message's seconds at the site: its process's start-up plus its handler."""
    return sum(seconds.get(k, 0.0) for k in (*COLD_PHASES, "handler"))


def process_age() -> float | None:
    """Seconds since this process started (Linux `/proc`); None where unknown."""
    try:
        stat = Path("/proc/self/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    # field 22 (starttime, clock ticks after boot); the command name before it
    # is in parentheses and may hold spaces, so count from the last ')'
    start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
    return max(uptime - start_ticks / ticks, 0.0)


class Profile:
    """Seconds per phase of one message, each phase net of the phases inside it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # per open phase: seconds of its children

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body as `name` (added up when the phase recurs)."""
        start = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            total = time.perf_counter() - start
            inner = self._inner.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + total - inner
            if self._inner:
                self._inner[-1] += total

    def metrics(self) -> dict[str, float]:
        """The phases as reply metrics: `t_<phase>_s`, rounded to 0.1 ms."""
        return {metric_name(k): round(v, 4) for k, v in self.seconds.items()}


class ProcessClock:
    """When this process's app was imported; its start-up goes to the first message."""

    def __init__(self) -> None:
        self._startup: dict[str, float] = {}
        self._imported_at: float | None = None
        self._served = False

    def app_imported(self, import_started: float) -> None:
        """Record the app's start-up; its imports began at `import_started`."""
        now = time.perf_counter()
        imports = now - import_started
        self._startup = {"import": imports}
        age = process_age()
        if age is not None:
            self._startup["start"] = max(age - imports, 0.0)
        self._imported_at = now

    def take_startup(self, entered: float) -> dict[str, float]:
        """The cold phases this message pays: all on a process's first, else 0."""
        first, self._served = not self._served, True
        if not first or self._imported_at is None:
            return {"start": 0.0, "import": 0.0, "load": 0.0}
        return {**self._startup, "load": max(entered - self._imported_at, 0.0)}


process_clock = ProcessClock()
"""The one clock of this process (its start-up is a per-process fact)."""

_active: ContextVar[Profile | None] = ContextVar("fedkd_profile", default=None)


def app_imported() -> None:
    """Called by the app module once its imports are done (see module doc)."""
    process_clock.app_imported(_LOADED_AT)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the body as phase `name` of the message being profiled, if any."""
    prof = _active.get()
    if prof is None:
        yield
        return
    with prof.phase(name):
        yield


@contextmanager
def profiled(kind: str) -> Iterator[Profile]:
    """Profile one message's handler; its `handler` phase is the total wall time.

    On exit the profile holds the handler's phases, `handler` and the cold
    phases (`COLD_PHASES`); one DEBUG line names them all (the server logs
    the slowest site's at INFO, where `flwr log` shows it).
    """
    entered = time.perf_counter()
    prof = Profile()
    token = _active.set(prof)
    try:
        yield prof
    finally:
        _active.reset(token)
        handler = time.perf_counter() - entered
        prof.seconds.update(process_clock.take_startup(entered))
        prof.seconds["handler"] = handler
        log.debug("%s message profile: %s", kind, describe(prof.seconds))


def describe(seconds: Mapping[str, float]) -> str:
    """One line: `phase 1.23s` for every phase, cold ones first, handler last."""
    order = [*COLD_PHASES, *(k for k in seconds if k not in (*COLD_PHASES, "handler"))]
    order += ["handler"]
    return ", ".join(f"{k} {seconds[k]:.2f}s" for k in order if k in seconds)
