"""Fault injection for the control-plane tests: an orchestrator armed with ``ADAPTERFAB_FAULT_KILL``
(``POINT`` or ``POINT:N``) SIGKILLs itself right after the N-th time (default 1) it passes ``POINT``:
a job state it committed (``PREPARING``, ``TRAINING``, ``REGISTERING``, ``SUCCEEDED``) or
``REGISTERED`` (a registry version written, its promotion not yet). An orchestrator armed with
``ADAPTERFAB_FAULT_FAIL_GROUP=TENANT`` has the fused group holding that tenant's first job fail inside
its trainer at its first step (``fail_group`` marks the group's task; ``jobs/resident.py`` raises), as a
trainer's own error would. Only the orchestrator reads the variables (``arm_from_env`` in its ``main``,
which also removes them, so nothing it starts inherits them); everywhere else ``reached`` and
``fail_group`` are no-ops."""

from __future__ import annotations

import os
import signal
import threading

ENV = "ADAPTERFAB_FAULT_KILL"
GROUP_ENV = "ADAPTERFAB_FAULT_FAIL_GROUP"
_lock = threading.Lock()
_armed: tuple[str, int] | None = None
_fail_tenant: str | None = None
_seen: dict[str, int] = {}


def arm_from_env() -> str | None:
    """Arm the faults named in the environment (and take them out of the environment); what was armed."""
    global _armed, _fail_tenant
    value = os.environ.pop(ENV, None)
    tenant = os.environ.pop(GROUP_ENV, None)
    armed = []
    if value:
        point, _, n = value.partition(":")
        _armed = (point.strip().upper(), int(n) if n else 1)
        _seen.clear()
        armed.append(f"kill at {value}")
    if tenant:
        _fail_tenant = tenant.strip()
        armed.append(f"the group of tenant {_fail_tenant} fails")
    return "; ".join(armed) or None


def fail_group(tenants: list[str]) -> bool:
    """Whether the group of these tenants' jobs is the one to fail (once: the first group holding the
    armed tenant)."""
    global _fail_tenant
    with _lock:
        if _fail_tenant is None or _fail_tenant not in tenants:
            return False
        _fail_tenant = None
        return True


def reached(point: str) -> None:
    """``point`` passed: the process dies here if it is the armed point's N-th pass."""
    if _armed is None:
        return
    with _lock:
        _seen[point] = _seen.get(point, 0) + 1
        if (point, _seen[point]) == _armed:
            os.kill(os.getpid(), signal.SIGKILL)
