"""Benchmarks that start a stack (`adapterfab up`, an MLflow server) stop it in a ``finally``. A SIGTERM
(``timeout``, a CI runner) or SIGHUP ended such a script without running it, and the stack's processes
outlived the benchmark; so did a script killed at a test's timeout. ``stop_cleanly`` turns those signals,
and an optional deadline of the script's own (below the caller's timeout), into SystemExit in the main
thread, so every ``finally`` runs and the stack stops."""

from __future__ import annotations

import signal
import sys
from types import FrameType


def stop_cleanly(deadline_s: float | None = None) -> None:
    def leave(signum: int, frame: FrameType | None) -> None:
        signal.alarm(0)
        if signum == signal.SIGALRM:
            raise SystemExit(f"{sys.argv[0]}: its deadline of {deadline_s:g} s passed; stopping what it started")
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(sig, leave)
    if deadline_s:
        signal.alarm(max(1, int(deadline_s)))


def add_deadline_arg(parser: object) -> None:
    parser.add_argument("--deadline-s", type=float, default=None,  # type: ignore[attr-defined]
                        help="stop (the stack it started too) after this many seconds; SIGTERM does the same")
