"""The ``adapterfab`` CLI in a subprocess, and `adapterfab up` on free ports: the real stack of the
end-to-end, fault and browser tests (``from stack_cli import run_cli, stack_up``), and ``wait_for`` a
condition on that stack."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

CLI = str(Path(sys.executable).parent / "adapterfab")


def run_cli(home: Path, *args: str, timeout_s: float = 600, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess:
    """``adapterfab ARGS`` with ADAPTERFAB_HOME=home (plus ``env``); prints the tail of its output."""
    r = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout_s,
                       env={**os.environ, **(env or {}), "ADAPTERFAB_HOME": str(home)})
    print(f"$ adapterfab {' '.join(args)} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def stack_up(home: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[dict[str, str], str]:
    """`adapterfab up` on free ports (MLflow, Ray, Ray dashboard, Serve, UI): (the ports, what it printed)."""
    from adapterfab.procs import free_port

    ports = {k: str(free_port()) for k in ("mlflow", "ray", "dashboard", "serve", "ui")}
    r = run_cli(home, "up", "--mlflow-port", ports["mlflow"], "--ray-port", ports["ray"], "--dashboard-port",
                ports["dashboard"], "--serve-port", ports["serve"], "--ui-port", ports["ui"], *extra, env=env)
    if r.returncode != 0 and "the dashboard UI did not start" in r.stderr and "address already in use" in r.stderr:
        # the UI's port, picked before Ray started, was taken by one of Ray's processes meanwhile; the rest
        # of the stack is up, and `up` starts only the UI, on the port it is given
        ports["ui"] = str(free_port())
        r = run_cli(home, "up", "--ui-port", ports["ui"], *extra, env=env)
    assert r.returncode == 0, r.stderr
    return ports, r.stdout


def wait_for(cond, timeout_s: float, what: str, poll_s: float = 0.3):  # noqa: ANN001, ANN201
    """``cond()``'s first truthy value, polled every ``poll_s``; an AssertionError naming ``what`` after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
