"""Starting and stopping the local stack's server processes (MLflow, moto's S3). Used by
``adapterfab up`` and by the tests, so both run exactly the same servers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from adapterfab.errors import StackError

# MLflow's server answers /health after ~7 s on an idle 2-core machine but took 84 s once while two
# test suites shared the CPUs; a start is only declared failed after this long.
SERVER_START_TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise StackError(f"process for {url} exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.3)
    raise StackError(f"{url} did not answer within {timeout_s:.0f}s")


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else name


@dataclass
class Server:
    pid: int
    port: int
    url: str
    log: Path


def start_mlflow(home: Path, port: int, artifacts_destination: str | None = None,
                 backend_uri: str | None = None, timeout_s: float = SERVER_START_TIMEOUT_S) -> Server:
    """A real MLflow tracking server process (SQLite backend and a local artifact folder by default),
    detached from the caller so it outlives the CLI."""
    home.mkdir(parents=True, exist_ok=True)
    backend_uri = backend_uri or f"sqlite:///{home / 'mlflow.db'}"
    artifacts_destination = artifacts_destination or str(home / "mlflow-artifacts")
    log = home / "mlflow.log"
    env = {**os.environ, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}
    cmd = [_bin("mlflow"), "server", "--backend-store-uri", backend_uri,
           "--artifacts-destination", artifacts_destination, "--serve-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log.open("ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                cwd=str(home))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", timeout_s, proc, log)
    except StackError:
        stop_pid(proc.pid)
        raise
    return Server(proc.pid, port, url, log)


def start_moto(home: Path, port: int, timeout_s: float = 30) -> Server:
    """moto's S3 API server on 127.0.0.1 (the S3 tests' real server)."""
    home.mkdir(parents=True, exist_ok=True)
    log = home / "moto.log"
    with log.open("ab") as f:
        proc = subprocess.Popen([_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/moto-api/", timeout_s, proc, log)
    return Server(proc.pid, port, url, log)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def stop_pid(pid: int | None, timeout_s: float = 15) -> None:
    """SIGTERM the process group, then SIGKILL if it lingers."""
    if not pid_alive(pid):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.2)
