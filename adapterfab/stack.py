"""The local stack: a Ray head node (``ray start --head --block`` in its own process group), an MLflow
tracking server process (SQLite + local artifact folder by default), the dashboard UI process
(``serve/dashboard.py``), and the serving URL Ray Serve will use. ``up`` and ``down`` are idempotent;
what is running is recorded in ``<home>/stack.json``. The processes it starts get the Hub setting
(``ADAPTERFAB_HF_OFFLINE``, default on) as ``HF_HUB_OFFLINE``: Ray's workers and serving replicas inherit
it from the head."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from adapterfab.env import env
from adapterfab.errors import StackError
from adapterfab.procs import (
    SERVER_START_TIMEOUT_S,
    free_port,
    mlflow_stores,
    pid_alive,
    port_open,
    port_owned_by,
    proc_token,
    refuse_taken,
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
    private_dir,
    private_file,
    private_sqlite,
)

# Ray Train's controller polls workers every 2 s by default, which makes every report() wait ~2 s.
EXTRA_IDLE_WORKERS = 6  # idle Ray workers kept beyond one per CPU (~100 MB each)
# No idle workers started ahead for a new driver (every batch's orchestrator is one): a batch whose data
# is tokenized in its orchestrator runs no Ray task, and each such worker costs a Python start and its
# imports (~1 CPU-s) taken from the trainers' steps on a small machine; workers start when asked.
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
           "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
           "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", "RAY_prestart_worker_first_driver": "0"}
# defaults only: a user's RAY_AUTH_MODE=token (so other local users cannot run code through the Jobs API) wins
RAY_ENV_DEFAULTS = {"RAY_AUTH_MODE": "disabled"}


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


def read_stack(settings: Settings, strict: bool = False) -> dict | None:
    """What stack.json records, None when there is none. A file that cannot be parsed (a write cut short by
    a full disk, an edit) is None too, or with ``strict`` an error: ``up`` and ``down`` must not take it for
    "nothing runs" while the processes it named may."""
    if not settings.stack_file.exists():
        return None
    try:
        info = json.loads(settings.stack_file.read_text())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        if strict:
            raise StackError(f"{settings.stack_file} cannot be read ({e}): the Ray head and MLflow server it "
                             "named may still run; stop them (`ps`), then remove the file") from None
        return None
    return info


def _write_stack(settings: Settings, info: dict | None) -> None:
    """Replace stack.json at once (a reader never sees it half written), owner-only: it may hold the MLflow
    backend URI, password included. ``None`` removes it."""
    if info is None:
        settings.stack_file.unlink(missing_ok=True)
        return
    tmp = settings.stack_file.with_name(f".stack.json.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(json.dumps(info, indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, settings.stack_file)
    finally:
        tmp.unlink(missing_ok=True)


_held = threading.local()  # the homes whose stack.lock this thread holds


@contextmanager
def stack_lock(settings: Settings) -> Iterator[None]:
    """``<home>/stack.lock``, held over ``up``, ``down`` and ``record``: two ``up``s at once each started a
    stack (the loser's servers died on the winner's ports, which its checks took for its own) and the
    last record won, leaving processes no ``down`` stops. Re-entrant within a thread."""
    homes: set = getattr(_held, "homes", set())
    _held.homes = homes
    if settings.home in homes:
        yield
        return
    private_file(settings.home / "stack.lock")  # owner-only, as every state file (its folder too)
    with open(settings.home / "stack.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another `adapterfab up`/`down` on {settings.home}", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        homes.add(settings.home)
        try:
            yield
        finally:
            homes.discard(settings.home)


@contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP (the terminal closed) end ``up`` as Ctrl-C does, through the clean-up of what it
    started: by default they kill it at once, and its servers (own sessions) would run on, unrecorded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    old = {sig: signal.signal(sig, _raise) for sig in (signal.SIGTERM, signal.SIGHUP)
           if signal.getsignal(sig) is signal.SIG_DFL}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _token(info: dict, key: str) -> str | None:
    """The start token recorded with ``info[key]`` (a stack from before tokens has none)."""
    return (info.get("proc_tokens") or {}).get(key)


def _alive(info: dict, key: str) -> bool:
    return pid_alive(info.get(key), _token(info, key))


def stack_alive(info: dict | None) -> bool:
    return bool(info) and _alive(info, "ray_pid") and _alive(info, "mlflow_pid")


def local_stack_down(settings: Settings) -> bool:
    """Whether a command that needs the cluster must refuse: no Ray address at all, or the stack ``up``
    started here has died. With ``RAY_ADDRESS`` set, or a stack.json that names no Ray head of ours (what
    ``adapterfab serve`` records on another cluster), its liveness is not ours to judge."""
    if not settings.ray_address:
        return True
    local = read_stack(settings)
    return bool(local and local.get("ray_pid")) and not os.environ.get("RAY_ADDRESS") and not stack_alive(local)


def _port(url: object) -> int | None:
    return int(str(url).rsplit(":", 1)[1]) if url else None


def _start_ray(settings: Settings, port: int, dashboard_port: int, client_port: int, num_cpus: int | None,
               started: Callable[[int], None] | None = None) -> int:
    """The Ray head (``ray start --head --block``) in its own session; ``started(pid)`` as soon as it exists
    (the caller records it). Ports already in use are refused; the head counts as up once its ports answer
    from its own session (gcs_server, dashboard), not from another listener. Stopped if it fails."""
    for p, what in ((port, "Ray GCS"), (dashboard_port, "Ray dashboard"), (client_port, "Ray client server")):
        refuse_taken(p, what)
    cmd = [tool("ray"), "start", "--head", "--block",
           "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
           "--ray-client-server-port", str(client_port), "--dashboard-agent-listen-port", str(free_port()),
           "--disable-usage-stats"]
    if num_cpus:
        cmd += ["--num-cpus", str(num_cpus)]
    # Ray Jobs run their entrypoint (`python -m adapterfab.cli run ...`) with the head's PATH: put this
    # environment's python first, so `submit --address` to the local head finds adapterfab
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    # Resident trainers and the batch's actors are workers too: with Ray's default soft limit (one worker
    # per CPU) every idle data-task worker is killed after a second and the next Ray Data window starts
    # new ones (a Python start and its imports each, seconds of CPU on a small machine)
    workers = {"RAY_num_workers_soft_limit": str((num_cpus or os.cpu_count() or 2) + EXTRA_IDLE_WORKERS)}
    with (settings.logs / "ray.log").open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**RAY_ENV_DEFAULTS, **os.environ, **RAY_ENV, **env().hf_env(), **workers,
                                     "PATH": path},
                                cwd=str(settings.home))
    try:
        if started is not None:
            started(proc.pid)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise StackError(f"ray start exited with {proc.returncode}; see {settings.logs / 'ray.log'}")
            if all(port_open(p) and port_owned_by(p, proc.pid) for p in (port, dashboard_port)):
                return proc.pid
            time.sleep(0.5)
        raise StackError(f"the Ray head did not come up within {SERVER_START_TIMEOUT_S:.0f}s; "
                         f"see {settings.logs / 'ray.log'}")
    except BaseException:  # Ctrl-C or SIGTERM too: its own session, so nothing else would stop it
        stop_pid(proc.pid, leader_first_s=5)
        raise


def _start_ui(settings: Settings, info: StackInfo, port: int | None) -> None:
    """The dashboard (``python -m adapterfab.serve.dashboard``) as its own process; it reads the stack's
    URLs from ``stack.json``, so it starts after that is written, and is recorded there as it starts. Its
    limit on wrong API keys is the settings' (``ADAPTERFAB_UI_AUTH_*``), given as its flags."""
    port = _pick(port, DEFAULT_UI_PORT)
    url, log = f"http://127.0.0.1:{port}", settings.logs / "ui.log"
    previous_url = (read_stack(settings) or {}).get("ui_url", "")
    try:
        refuse_taken(port, "dashboard UI")
        with log.open("ab") as f:
            proc = subprocess.Popen([sys.executable, "-m", "adapterfab.serve.dashboard", "--port", str(port),
                                     *settings.ui_auth_flags()],
                                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                    cwd=str(settings.home),
                                    env={**os.environ, **env().hf_env(), "ADAPTERFAB_HOME": str(settings.home)})
    except StackError as e:
        raise StackError(f"the dashboard UI did not start ({e}); the rest of the stack is up") from e
    try:
        record(settings, ui_url=url, ui_pid=proc.pid)
        wait_http(url + "/healthz", SERVER_START_TIMEOUT_S, proc, log, ours=lambda: port_owned_by(port, proc.pid))
    except BaseException as e:
        stop_pid(proc.pid)
        record(settings, ui_url=previous_url, ui_pid=0)
        if isinstance(e, StackError):
            raise StackError(f"the dashboard UI did not start ({e}); the rest of the stack is up, "
                             "`adapterfab up` retries it") from e
        raise
    info.ui_url, info.ui_pid = url, proc.pid


OPTIONS = {"ray_port": "--ray-port", "dashboard_port": "--dashboard-port", "mlflow_port": "--mlflow-port",
           "mlflow_artifacts_destination": "--artifacts-destination",
           "mlflow_backend_store_uri": "--backend-store-uri"}


def _folder_or_uri(dest: str | None) -> str | None:
    """A local folder as an absolute path (compared with the recorded one); a URI as it is."""
    return str(Path(dest).expanduser().resolve()) if dest and "://" not in dest else dest


def _recorded(rec: dict) -> dict:
    """The options a recorded stack runs with (a stack.json from before they were saved lacks the stores)."""
    ray = rec.get("ray_address")
    return {"ray_port": _port(ray), "dashboard_port": _port(rec.get("dashboard_url")),
            "mlflow_port": _port(rec.get("mlflow_uri")),
            "mlflow_artifacts_destination": rec.get("mlflow_artifacts_destination"),
            "mlflow_backend_store_uri": rec.get("mlflow_backend_store_uri")}


def private_mlflow_stores(mlflow_home: Path, artifacts: str, backend: str) -> None:
    """MLflow's folder, its SQLite database and its local artifact folder made owner-only before the
    server makes them with its umask (0644 and 0755: every tenant's runs, metrics and adapters readable
    by every local user). What exists already keeps its mode (settings.private_sqlite says why)."""
    private_dir(mlflow_home)
    if "://" not in artifacts or artifacts.startswith("file://"):
        private_dir(Path(artifacts.removeprefix("file://")).expanduser())
    private_sqlite(backend)


def up(settings: Settings, mlflow_port: int | None = None, ray_port: int | None = None,
       dashboard_port: int | None = None, serve_port: int | None = None, num_cpus: int | None = None,
       artifacts_destination: str | None = None, backend_store_uri: str | None = None,
       ui_port: int | None = None) -> StackInfo:
    """Start what of the stack is not running: all of it, or only its dead parts (MLflow, the Ray head, the
    UI) on their recorded ports and stores. Never stops anything: batches ride out an MLflow outage, and
    ``adapterfab up`` is how one ends. Options that differ from a recorded stack's are refused."""
    settings.ensure_dirs()
    settings.ui_auth_flags()  # a bad ADAPTERFAB_UI_AUTH_* is refused before anything starts
    with stack_lock(settings), _signals_raise():
        before = read_stack(settings, strict=True)
        rec = dict(before) if before and before.get("ray_pid") else {}  # no ray_pid: `serve` elsewhere
        mlflow_home = settings.home / "mlflow"
        given = {"ray_port": ray_port, "dashboard_port": dashboard_port, "mlflow_port": mlflow_port,
                 "mlflow_artifacts_destination": _folder_or_uri(artifacts_destination),
                 "mlflow_backend_store_uri": backend_store_uri}
        recorded = _recorded(rec)
        clash = [OPTIONS[k] for k, v in given.items() if v is not None and recorded[k] is not None and v != recorded[k]]
        if clash:
            raise StackError(f"the stack of {settings.home} runs with another {', '.join(clash)} (see "
                             f"{settings.stack_file}): `adapterfab down` first to change it")
        opts = {k: given[k] if given[k] is not None else recorded[k] for k in given}
        started: list[tuple[int, str | None]] = []  # what this call started: stopped again if it fails

        def spawned(key: str, pid: int) -> None:  # recorded at once: a killed `up` leaves nothing unnamed
            token = proc_token(pid)
            started.append((pid, token))
            rec[key] = pid
            rec["proc_tokens"] = {**(rec.get("proc_tokens") or {}), key: token}
            _write_stack(settings, rec)

        try:
            if not _alive(rec, "ray_pid"):
                port = opts["ray_port"] or _pick(None, DEFAULT_RAY_PORT)
                dash = opts["dashboard_port"] or _pick(None, DEFAULT_DASHBOARD_PORT)
                client = _port(rec.get("ray_client_address")) or free_port()
                cpus = num_cpus or rec.get("num_cpus")
                # the addresses `submit --address` takes: the Jobs API (dashboard) and the Ray Client server
                rec.update(ray_address=f"127.0.0.1:{port}", dashboard_url=f"http://127.0.0.1:{dash}",
                           ray_client_address=f"ray://127.0.0.1:{client}", num_cpus=cpus)
                _start_ray(settings, port, dash, client, cpus, started=lambda pid: spawned("ray_pid", pid))
            if not _alive(rec, "mlflow_pid"):
                port = opts["mlflow_port"] or _pick(None, DEFAULT_MLFLOW_PORT)
                artifacts, backend = mlflow_stores(mlflow_home, opts["mlflow_artifacts_destination"],
                                                   opts["mlflow_backend_store_uri"])
                rec.update(mlflow_uri=f"http://127.0.0.1:{port}", mlflow_artifacts_destination=artifacts,
                           mlflow_backend_store_uri=backend)
                private_mlflow_stores(mlflow_home, artifacts, backend)
                start_mlflow(mlflow_home, port, artifacts, backend, started=lambda pid: spawned("mlflow_pid", pid))
            if not rec.get("serve_url"):
                port = _pick(serve_port, DEFAULT_SERVE_PORT)
                rec.update(serve_url=f"http://127.0.0.1:{port}", serve_port=port)
            _write_stack(settings, rec)
            if started and started[0][0] == rec["ray_pid"]:
                try:
                    wait_http(rec["dashboard_url"], 60)
                except StackError:
                    pass  # the dashboard is a convenience; the cluster itself is up
        except BaseException:  # Ctrl-C and SIGTERM too: what this call started is stopped, the record restored
            for pid, token in reversed(started):
                stop_pid(pid, token=token)
            _write_stack(settings, before)
            raise
        info = StackInfo(**{k: rec[k] for k in StackInfo.__dataclass_fields__ if k in rec})
        if not _alive(rec, "ui_pid"):  # no UI yet, or it died: on its recorded port
            _start_ui(settings, info, ui_port or _port(rec.get("ui_url")))
        return info


def down(settings: Settings) -> list[str]:
    """Stop what ``up`` started (and running orchestrators of this home). Returns what was stopped. A
    stack.json that cannot be read is an error and stays: the processes it named may still run."""
    with stack_lock(settings):
        info = read_stack(settings, strict=True) or {}
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
            if pid and _alive(info, key):
                stop_pid(pid, timeout_s=10, token=_token(info, key), leader_first_s=5 if name == "ray" else 0)
                stopped.append(name)
        settings.stack_file.unlink(missing_ok=True)
        return stopped


def record(settings: Settings, **fields: object) -> None:
    """Add ``fields`` to stack.json; a ``*_pid`` field gets its process's start token beside it."""
    with stack_lock(settings):
        info = read_stack(settings, strict=True) or {}
        info.update(fields)
        tokens = dict(info.get("proc_tokens") or {})
        for k, v in fields.items():
            if k.endswith("_pid") and isinstance(v, int):
                tokens[k] = proc_token(v)
        info["proc_tokens"] = tokens
        _write_stack(settings, info)
