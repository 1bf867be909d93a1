"""flower-supernode with a shorter idle poll: `python -m deploy.supernode --poll S ...`.

Flower 1.42's SuperNode sleeps a hard-coded 3 s whenever a pull from the
SuperLink finds no message (`flwr/supernode/start_client_internal.py`, line
263), and 0.5 s while it waits for the ClientApp's reply (lines 470 and 506);
none of it is configurable. Every message a site gets therefore waits 1.5 s
on average (2 s for the later of two sites) before the site even sees it
(BENCHMARKS.md, "Deployed round profile").

This entry point runs Flower's own `flower_supernode()` unchanged, with every
argument after `--poll S` passed through, after swapping the `time` that
module sleeps with for one whose `sleep(3)` and `sleep(0.5)` last S seconds.
Nothing else changes: the protocol, TLS and node authentication are
Flower's. The cost is load on the SuperLink: an idle SuperNode pulls every S
seconds instead of every 3.

The swap is refused (the SuperNode still starts, with Flower's own polls and
a WARNING) unless the installed Flower is the version it was written against
and the module still holds those sleeps: a later Flower may change them.
`deploy.launch supernode --poll S` starts this instead of flower-supernode.
"""

from __future__ import annotations

import inspect
import logging
import sys
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)

FLOWER_VERSION = "1.42.0"
# the sleeps of start_client_internal that --poll shortens, as the source has them
IDLE_SLEEPS = {3: "time.sleep(3)", 0.5: "time.sleep(0.5)"}
POLL_RANGE = (0.01, 3.0)


class _Clock:
    """`time` for start_client_internal: its idle sleeps last `poll` seconds."""

    def __init__(self, poll: float) -> None:
        self._poll = poll

    def sleep(self, seconds: float) -> None:
        time.sleep(self._poll if seconds in IDLE_SLEEPS else seconds)

    def __getattr__(self, name: str):
        return getattr(time, name)


def patch_polls(poll: float) -> bool:
    """Shorten the SuperNode's idle sleeps to `poll` s; False (and a WARNING)
    when this Flower is not the one the patch was written for."""
    import flwr
    from flwr.supernode import start_client_internal as internal

    source = inspect.getsource(internal)
    missing = [s for s in IDLE_SLEEPS.values() if s not in source]
    if flwr.__version__ != FLOWER_VERSION or missing:
        log.warning(
            "--poll %g ignored: written for flwr %s, this is %s%s; the SuperNode "
            "keeps Flower's own 3 s idle poll",
            poll, FLOWER_VERSION, flwr.__version__,
            f" and its source lacks {missing}" if missing else "",
        )
        return False
    internal.time = _Clock(poll)
    return True


def check_poll(poll: float) -> float:
    """`poll` if it lies in POLL_RANGE seconds; ValueError naming it if not."""
    lo, hi = POLL_RANGE
    if not lo <= poll <= hi:
        raise ValueError(f"--poll {poll:g} is outside [{lo:g}, {hi:g}] seconds")
    return poll


def parse_poll(argv: Sequence[str]) -> tuple[float, list[str]]:
    """(`--poll` seconds, the rest for flower-supernode); ValueError if bad."""
    args = list(argv)
    if len(args) < 2 or args[0] != "--poll":
        raise ValueError("usage: python -m deploy.supernode --poll S <flower-supernode "
                         "arguments>")
    return check_poll(float(args[1])), args[2:]


def main(argv: Sequence[str] | None = None) -> None:
    """Patch the polls, then run Flower's flower-supernode with the rest."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        poll, rest = parse_poll(sys.argv[1:] if argv is None else argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if patch_polls(poll):
        log.info("SuperNode idle poll %g s (Flower's own: 3 s)", poll)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()


if __name__ == "__main__":
    main()
