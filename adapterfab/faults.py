"""Fault injection for the control-plane tests: an orchestrator armed with ``ADAPTERFAB_FAULT_KILL``
(``POINT`` or ``POINT:N``) SIGKILLs itself right after the N-th time (default 1) it passes ``POINT``:
a job state it committed (``PREPARING``, ``TRAINING``, ``REGISTERING``, ``SUCCEEDED``) or
``REGISTERED`` (a registry version written, its promotion not yet). Only the orchestrator reads the
variable (``arm_from_env`` in its ``main``, which also removes it, so nothing it starts inherits it);
everywhere else ``reached`` is a no-op."""

from __future__ import annotations

import os
import signal
import threading

ENV = "ADAPTERFAB_FAULT_KILL"
_lock = threading.Lock()
_armed: tuple[str, int] | None = None
_seen: dict[str, int] = {}


def arm_from_env() -> str | None:
    """Arm the kill point named in the environment (and take it out of the environment)."""
    global _armed
    value = os.environ.pop(ENV, None)
    if not value:
        return None
    point, _, n = value.partition(":")
    _armed = (point.strip().upper(), int(n) if n else 1)
    _seen.clear()
    return value


def reached(point: str) -> None:
    """``point`` passed: the process dies here if it is the armed point's N-th pass."""
    if _armed is None:
        return
    with _lock:
        _seen[point] = _seen.get(point, 0) + 1
        if (point, _seen[point]) == _armed:
            os.kill(os.getpid(), signal.SIGKILL)
