"""The local stack: a Ray head node (``ray start --head --block`` in its own process group), an MLflow
tracking server process (SQLite + local artifact folder by default), the dashboard UI process
(``serve/dashboard.py``), and the serving URL Ray Serve will use. ``up`` and ``down`` are idempotent;
what is running is recorded in ``<home>/stack.json``. The processes it starts get the Hub setting
(``ADAPTERFAB_HF_OFFLINE``, default on) as ``HF_HUB_OFFLINE``: Ray's workers and serving replicas inherit
it from the head."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from adapterfab.env import env
from adapterfab.errors import StackError
from adapterfab.procs import (
    SERVER_START_TIMEOUT_S,
    free_port,
    pid_alive,
    port_open,
    proc_token,
    start_mlflow,
    stop_pid,
    tool,
    wait_http,
)
from adapterfab.settings import (
    DEFAULT_DASHBOARD_PORT,
    DEFAULT_MLFLOW_PORT,
    DEFAULT_RAY_PORT,
    DEFAULT_SERVE_PORT,
    DEFAULT_UI_PORT,
    Settings,
)

# Ray Train's controller polls workers every 2 s by default, which makes every report() wait ~2 s.
EXTRA_IDLE_WORKERS = 6  # idle Ray workers kept beyond one per CPU (~100 MB each)
# No idle workers started ahead for a new driver (every batch's orchestrator is one): a batch whose data
# is tokenized in its orchestrator runs no Ray task, and each such worker costs a Python start and its
# imports (~1 CPU-s) taken from the trainers' steps on a small machine; workers start when asked.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
           "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
           "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", "RAY_prestart_worker_first_driver": "0"}


@dataclass
class StackInfo:
    ray_address: str
    ray_pid: int
    dashboard_url: str
    mlflow_uri: str
    mlflow_pid: int
    serve_url: str
    serve_port: int
    ui_url: str = ""  # our dashboard; dashboard_url is Ray's
    ui_pid: int = 0

    def urls(self) -> dict[str, str]:
        return {"mlflow": self.mlflow_uri, "ray_dashboard": self.dashboard_url, "serving": self.serve_url,
                "ui": self.ui_url}


def _pick(port: int | None, default: int) -> int:
    if port:
        return port
    return default if not port_open(default) else free_port()


def read_stack(settings: Settings) -> dict | None:
    if not settings.stack_file.exists():
        return None
    try:
        return json.loads(settings.stack_file.read_text())
    except ValueError:
        return None


def _token(info: dict, key: str) -> str | None:
    """The start token recorded with ``info[key]`` (a stack from before tokens has none)."""
    return (info.get("proc_tokens") or {}).get(key)


def stack_alive(info: dict | None) -> bool:
    return bool(info) and pid_alive(info.get("ray_pid"), _token(info, "ray_pid")) \
        and pid_alive(info.get("mlflow_pid"), _token(info, "mlflow_pid"))


def _start_ray(settings: Settings, port: int, dashboard_port: int, client_port: int, num_cpus: int | None) -> int:
    cmd = [tool("ray"), "start", "--head", "--block",
           "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
           "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(free_port()),
           "--disable-usage-stats"]
    if num_cpus:
        cmd += ["--num-cpus", str(num_cpus)]
    log = (settings.logs / "ray.log").open("ab")
    # Ray Jobs run their entrypoint (`python -m adapterfab.cli run ...`) with the head's PATH: put this
    # environment's python first, so `submit --address` to the local head finds adapterfab
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    # Resident trainers and the batch's actors are workers too: with Ray's default soft limit (one worker
    # per CPU) every idle data-task worker is killed after a second and the next Ray Data window starts
    # new ones (a Python start and its imports each, seconds of CPU on a small machine)
    workers = {"RAY_num_workers_soft_limit": str((num_cpus or os.cpu_count() or 2) + EXTRA_IDLE_WORKERS)}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **RAY_ENV, **env().hf_env(), **workers, "PATH": path},
                            cwd=str(settings.home))
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"ray start exited with {proc.returncode}; see {settings.logs / 'ray.log'}")
        if port_open(port) and port_open(dashboard_port):
            return proc.pid
        time.sleep(0.5)
    stop_pid(proc.pid)
    raise StackError(f"the Ray head did not come up within {SERVER_START_TIMEOUT_S:.0f}s; "
                     f"see {settings.logs / 'ray.log'}")


def _start_ui(settings: Settings, info: StackInfo, port: int | None) -> None:
    """The dashboard (``python -m adapterfab.serve.dashboard``) as its own process; it reads the stack's
    URLs from ``stack.json``, so it starts after that is written, and is recorded there."""
    port = _pick(port, DEFAULT_UI_PORT)
    log = settings.logs / "ui.log"
    with log.open("ab") as f:
        proc = subprocess.Popen([sys.executable, "-m", "adapterfab.serve.dashboard", "--port", str(port)],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=str(settings.home),
                                env={**os.environ, **env().hf_env(), "ADAPTERFAB_HOME": str(settings.home)})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz", SERVER_START_TIMEOUT_S, proc, log)
    except StackError as e:
        stop_pid(proc.pid)
        raise StackError(f"the dashboard UI did not start ({e}); the rest of the stack is up, "
                         "`adapterfab up` retries it") from e
    info.ui_url, info.ui_pid = url, proc.pid
    record(settings, ui_url=url, ui_pid=proc.pid)


def up(settings: Settings, mlflow_port: int | None = None, ray_port: int | None = None,
       dashboard_port: int | None = None, serve_port: int | None = None, num_cpus: int | None = None,
       artifacts_destination: str | None = None, backend_store_uri: str | None = None,
       ui_port: int | None = None) -> StackInfo:
    settings.ensure_dirs()
    current = read_stack(settings)
    if stack_alive(current):
        info = StackInfo(**{k: current[k] for k in StackInfo.__dataclass_fields__ if k in current})
        if not pid_alive(info.ui_pid, _token(current, "ui_pid")):  # no UI yet, or it died: same port
            recorded = int(info.ui_url.rsplit(":", 1)[1]) if info.ui_url else None
            _start_ui(settings, info, ui_port or recorded)
        return info
    if current:
        down(settings)  # half-dead stack: clean it up first
    ray_port = _pick(ray_port, DEFAULT_RAY_PORT)
    dashboard_port = _pick(dashboard_port, DEFAULT_DASHBOARD_PORT)
    mlflow_port = _pick(mlflow_port, DEFAULT_MLFLOW_PORT)
    serve_port = _pick(serve_port, DEFAULT_SERVE_PORT)
    client_port = free_port()
    ray_pid = _start_ray(settings, ray_port, dashboard_port, client_port, num_cpus)
    try:
        mlflow = start_mlflow(settings.home / "mlflow", mlflow_port, artifacts_destination, backend_store_uri)
    except Exception:
        stop_pid(ray_pid)
        raise
    info = StackInfo(ray_address=f"127.0.0.1:{ray_port}", ray_pid=ray_pid,
                     dashboard_url=f"http://127.0.0.1:{dashboard_port}", mlflow_uri=mlflow.url,
                     mlflow_pid=mlflow.pid, serve_url=f"http://127.0.0.1:{serve_port}", serve_port=serve_port)
    # the addresses `submit --address` takes: the Jobs API (dashboard) and the Ray Client server
    settings.stack_file.write_text(json.dumps({**info.__dict__,
                                              "ray_client_address": f"ray://127.0.0.1:{client_port}",
                                              "proc_tokens": {"ray_pid": proc_token(ray_pid),
                                                              "mlflow_pid": proc_token(mlflow.pid)}}, indent=1))
    try:
        wait_http(info.dashboard_url, 60)
    except StackError:
        pass  # the dashboard is a convenience; the cluster itself is up
    _start_ui(settings, info, ui_port)
    return info


def down(settings: Settings) -> list[str]:
    """Stop what ``up`` started (and running orchestrators of this home). Returns what was stopped."""
    info = read_stack(settings) or {}
    stopped = []
    try:
        from adapterfab.state import StateStore

        running = StateStore(settings.state_url).list_batches(limit=None, states=("PENDING", "RUNNING"))
    except Exception:  # noqa: BLE001 - no state db yet
        running = []
    for b in running:  # every running batch, however old (not the newest 200 only)
        token = b.orchestrator_token
        try:
            if pid_alive(b.orchestrator_pid, token):
                if stop_pid(b.orchestrator_pid, timeout_s=5, token=token):
                    stopped.append(f"orchestrator of {b.id}")
                else:
                    print(f"not stopped: the orchestrator of {b.id} runs as another user", file=sys.stderr)
        except Exception as e:  # noqa: BLE001 - one batch's orchestrator must not keep down from the others
            print(f"could not stop the orchestrator of {b.id}: {e}", file=sys.stderr)
    # a recorded pid is stopped only while it is still the process that was recorded (its start token):
    # after a reboot the number may belong to anything
    for name, key in (("ui", "ui_pid"), ("ray", "ray_pid"), ("mlflow", "mlflow_pid"), ("serve", "serve_pid")):
        pid = info.get(key)
        if pid and pid_alive(pid, _token(info, key)):
            stop_pid(pid, timeout_s=10, token=_token(info, key))
            stopped.append(name)
    settings.stack_file.unlink(missing_ok=True)
    return stopped


def record(settings: Settings, **fields: object) -> None:
    """Add ``fields`` to stack.json; a ``*_pid`` field gets its process's start token beside it."""
    info = read_stack(settings) or {}
    info.update(fields)
    tokens = dict(info.get("proc_tokens") or {})
    for k, v in fields.items():
        if k.endswith("_pid") and isinstance(v, int):
            tokens[k] = proc_token(v)
    info["proc_tokens"] = tokens
    settings.stack_file.write_text(json.dumps(info, indent=1))
