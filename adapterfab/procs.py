"""Starting and stopping the local stack's server processes (MLflow, moto's S3, a throwaway PostgreSQL).
Used by ``adapterfab up`` and by the tests, so both run exactly the same servers."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapterfab.errors import AdapterfabError, StackError

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


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None,
              ours: Callable[[], bool] | None = None) -> None:
    """Until ``url`` answers; with ``ours``, only an answer while ``ours()`` holds counts (the listener is
    the process we started, not another server on the same port)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise StackError(f"process for {url} exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500 and (ours is None or ours()):
                    return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.3)
    raise StackError(f"{url} did not answer within {timeout_s:.0f}s")


def refuse_taken(port: int, what: str) -> None:
    """A port someone already listens on: starting a server there would fail, yet the old listener
    would answer the readiness checks for it."""
    if port_open(port):
        raise StackError(f"port {port} ({what}) is already in use by another process: stop what listens there, "
                         "or choose another port (a stack recorded in stack.json keeps its ports: `adapterfab down` "
                         "first)")


def _listen_inodes(port: int) -> set[str] | None:
    """Socket inodes listening on TCP ``port`` (Linux ``/proc/net``); None where they cannot be read."""
    inodes, readable = set(), False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f[9])
    return inodes if readable else None


def port_owned_by(port: int, sid: int) -> bool:
    """Whether a process of session ``sid`` (a server started with ``start_new_session``: its pid, and
    every helper it forks, as Ray's gcs_server and dashboard) listens on ``port``. True where this cannot
    be checked (no ``/proc``): the readiness checks then fall back to the process being alive."""
    inodes = _listen_inodes(port)
    if inodes is None:
        return True
    wanted = {f"socket:[{i}]" for i in inodes}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[3]) != sid:  # field 6: session
                continue
            if any(os.readlink(fd) in wanted for fd in (d / "fd").iterdir()):
                return True
        except (OSError, IndexError, ValueError):
            continue
    return False


def tool(name: str) -> str:
    """A console script of this environment: beside the interpreter (a venv), else on PATH (a `pip install
    --target` folder, as on the GPU machine), else the bare name."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


@dataclass
class Server:
    pid: int
    port: int
    url: str
    log: Path


def mlflow_stores(home: Path, artifacts_destination: str | None = None,
                  backend_uri: str | None = None) -> tuple[str, str]:
    """``(artifacts_destination, backend_uri)`` with the defaults under ``home`` filled in."""
    return (artifacts_destination or str(home / "mlflow-artifacts"),
            backend_uri or f"sqlite:///{home / 'mlflow.db'}")


def start_mlflow(home: Path, port: int, artifacts_destination: str | None = None,
                 backend_uri: str | None = None, timeout_s: float = SERVER_START_TIMEOUT_S,
                 started: Callable[[int], None] | None = None) -> Server:
    """A real MLflow tracking server process (SQLite backend and a local artifact folder by default),
    detached from the caller so it outlives the CLI. ``artifacts_destination`` may be ``s3://bucket/...``
    (the bucket is created if missing; the server gets our S3 endpoint as MLFLOW_S3_ENDPOINT_URL) and
    ``backend_uri`` any SQLAlchemy URL MLflow supports, e.g. ``postgresql://user@host:port/db``.
    ``started(pid)`` is called as soon as the process exists (the caller records it: an interrupted
    start leaves nothing unrecorded); a port already in use is refused."""
    home.mkdir(parents=True, exist_ok=True)
    artifacts_destination, backend_uri = mlflow_stores(home, artifacts_destination, backend_uri)
    log = home / "mlflow.log"
    # the backend URI may hold a database password: in the environment (readable by this user only),
    # never on the command line, which `ps` shows to every local user
    env = {**os.environ, "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false", "MLFLOW_BACKEND_STORE_URI": backend_uri}
    # MLflow 3's server also starts a job runner (huey consumers, for its GenAI jobs: judges, prompt
    # optimisation, trace roll-ups), which the factory never uses: 8 more processes, +1.9 GB resident and
    # ~15 s of CPU at every start. Off unless the environment asks for it.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # MLflow's S3 artifact repository takes its endpoint from MLFLOW_S3_ENDPOINT_URL (or boto3's
    # AWS_ENDPOINT_URL), never from ADAPTERFAB_S3_ENDPOINT_URL: hand it ours (an explicit
    # MLFLOW_S3_ENDPOINT_URL wins), so an s3:// destination on MinIO, moto, ... works.
    from adapterfab.env import env as tunables

    endpoint = tunables().s3_endpoint_url
    if endpoint and not os.environ.get("MLFLOW_S3_ENDPOINT_URL"):
        env["MLFLOW_S3_ENDPOINT_URL"] = endpoint
    if artifacts_destination.startswith("s3://"):
        from adapterfab.storage import S3Store

        try:
            S3Store(artifacts_destination).ensure_bucket()
        except AdapterfabError as e:
            raise StackError(f"MLflow's artifacts destination {artifacts_destination}: {e}") from e
    refuse_taken(port, "MLflow")
    cmd = [tool("mlflow"), "server", "--artifacts-destination", artifacts_destination, "--serve-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log.open("ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                cwd=str(home))
    url = f"http://127.0.0.1:{port}"
    try:
        if started is not None:
            started(proc.pid)
        wait_http(url + "/health", timeout_s, proc, log, ours=lambda: port_owned_by(port, proc.pid))
    except BaseException:  # Ctrl-C or SIGTERM too: its own session, so nothing else would stop it
        stop_pid(proc.pid)
        raise
    return Server(proc.pid, port, url, log)


def start_moto(home: Path, port: int, timeout_s: float = 30) -> Server:
    """moto's S3 API server on 127.0.0.1 (the S3 tests' real server)."""
    home.mkdir(parents=True, exist_ok=True)
    log = home / "moto.log"
    with log.open("ab") as f:
        proc = subprocess.Popen([tool("moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/moto-api/", timeout_s, proc, log)
    return Server(proc.pid, port, url, log)


def _machine() -> tuple[str, str] | None:
    """This machine's boot id and pid namespace (``/proc``): the pids of processes with both the same are
    ours to check. The hostname is not: it may change under a running stack (DHCP, ``hostnamectl``),
    and containers on one host share the boot id but not the pid namespace."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ns = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        return None
    return boot, format(int(ns), "x") if ns.isdigit() else ns


def proc_token(pid: int | None) -> str | None:
    """What identifies process ``pid`` beyond its number: ``host:boot:start:pidns`` (``/proc``). A pid
    recorded with its token is never mistaken for a later process that got the same number (after a
    reboot, or once pids wrap). None where it cannot be read (no such process, no /proc)."""
    if not pid:
        return None
    machine = _machine()
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22: starttime
    except (OSError, IndexError):
        return None
    if machine is None:
        return None
    return f"{socket.gethostname()}:{machine[0]}:{start}:{machine[1]}"


def token_host(token: str | None) -> str | None:
    return token.split(":", 1)[0] if token else None


def token_is_local(token: str | None) -> bool:
    """Whether ``token`` names a process of this machine (its boot id, and pid namespace when the token
    has one), whatever the hostname was then."""
    parts = (token or "").split(":")
    if len(parts) < 3:
        return False
    machine = _machine()
    if machine is None:  # no /proc: the hostname is all there is
        return parts[0] == socket.gethostname()
    return parts[1] == machine[0] and (len(parts) < 4 or parts[3] == machine[1])


HEARTBEAT_S = 5.0  # how often an orchestrator marks its claim as live (state.StateStore.heartbeat)
LEASE_S = 30.0  # a claim of another host with no heartbeat for this long is taken for dead


def token_is_remote(token: str | None) -> bool:
    """Whether ``token`` (``proc_token``) names a process of another host: its pid means nothing here."""
    return bool(token) and token.count(":") >= 2 and not token_is_local(token)


def holder_alive(pid: int | None, token: str | None, beat_s: float | None,
                 alive: Callable[[int | None, str | None], bool] | None = None, lease_s: float = LEASE_S) -> bool:
    """Whether the process that holds a claim (a batch's orchestrator, a lock) still runs: on this host,
    its pid with its start token (``alive``, default ``pid_alive``); on another host, whose pids cannot
    be checked from here, whether its last heartbeat ``beat_s`` is younger than ``lease_s``."""
    if token_is_remote(token):
        return beat_s is not None and time.time() - beat_s < lease_s
    return (alive or pid_alive)(pid, token)


def pid_alive(pid: int | None, token: str | None = None) -> bool:
    """Whether ``pid`` runs (a zombie does not); with the ``token`` recorded when it started
    (``proc_token``), whether it is still that process."""
    if not pid:
        return False
    if token is not None:
        if not token_is_local(token):
            return False  # not a process of this machine: nothing here to check or stop
        current = proc_token(pid)
        # boot and start time decide (not the hostname, which may have changed since)
        if current is not None and current.split(":")[1:3] != token.split(":")[1:3]:
            return False  # the number now belongs to another process
    try:
        os.kill(pid, 0)
    except PermissionError:
        pass  # it runs, as another user (an orchestrator started by a colleague on a shared host)
    except OSError:
        return False
    try:  # a zombie child counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        pass
    try:  # a zombie whose parent (say, an exited CLI) is not reaping it: gone too (Linux)
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def stop_pid(pid: int | None, timeout_s: float = 15, token: str | None = None, leader_first_s: float = 0) -> bool:
    """SIGTERM the process group, then SIGKILL if it lingers; with ``token``, only if ``pid`` is still
    the process that token was taken from. False when it runs on and is not this user's to stop.
    ``leader_first_s``: SIGTERM ``pid`` alone first and give it that long to stop its own children (an idle
    ``ray start --block`` does so in ~3 s; a SIGTERM to its whole group leaves its raylet and GCS waiting
    on each other until the SIGKILL), then SIGKILL what is left of the group."""
    if not pid_alive(pid, token):
        return True
    if leader_first_s > 0:
        stopped = _leader_stops(pid, leader_first_s)
        try:  # whatever of its group it left behind, or all of it
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError:
            return stopped
        return stopped or _gone_within(pid, timeout_s)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return True
            except PermissionError:  # another user's process (a colleague's orchestrator)
                return False
        if _gone_within(pid, timeout_s):
            return True
    return not pid_alive(pid)


def _gone_within(pid: int, within_s: float) -> bool:
    """Whether ``pid`` is gone within ``within_s`` (polled every 0.2 s)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.2)
    return not pid_alive(pid)


def _leader_stops(pid: int, within_s: float) -> bool:
    """SIGTERM ``pid`` alone; whether it is gone within ``within_s``."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _gone_within(pid, within_s)


# PostgreSQL ------------------------------------------------------------------------------------------

def postgres_bin(name: str) -> str | None:
    """A PostgreSQL server program (initdb, pg_ctl, createdb, ...): on PATH, else in the newest
    /usr/lib/postgresql/<version>/bin (Debian keeps most of them off PATH)."""
    found = shutil.which(name)
    if found:
        return found
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2])
                  if d.split("/")[-2].isdigit() else 0)
    for d in reversed(dirs):
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


@dataclass
class Postgres(Server):
    """A throwaway cluster: ``base`` holds data/, sock/ and the log, and is removed by ``stop_postgres``."""

    base: Path = Path()
    user: str = "postgres"

    def db_url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{self.user}@127.0.0.1:{self.port}/{database}"


def _as_postgres_user() -> dict:
    """postgres refuses to run as root: switch to the ``postgres`` account then."""
    return {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}


def _pg_run(args: list[str], cwd: Path, timeout_s: float) -> None:
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "HOME": str(cwd)}
    try:
        r = subprocess.run(args, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout_s,
                           start_new_session=True, **_as_postgres_user())
    except subprocess.TimeoutExpired as e:
        raise StackError(f"{Path(args[0]).name} did not finish within {timeout_s:.0f}s") from e
    if r.returncode != 0:
        raise StackError(f"{' '.join(args)} exited with {r.returncode}: {(r.stderr or r.stdout)[-2000:]}")


def start_postgres(port: int, base: Path | None = None, timeout_s: float = 120) -> Postgres:
    """A PostgreSQL server on 127.0.0.1:``port`` with a fresh cluster (superuser ``postgres``, trust
    authentication, durability off: for tests and throwaway local stacks, never for data you keep).

    ``base`` (default: a new folder under /tmp) must be reachable by the ``postgres`` account when
    running as root, which is what the server then runs as. Databases: :func:`create_database`."""
    tools = {n: postgres_bin(n) for n in ("initdb", "pg_ctl")}
    missing = [n for n, p in tools.items() if p is None]
    if missing:
        raise StackError(f"PostgreSQL server programs not found: {', '.join(missing)} "
                         "(install postgresql, e.g. `apt-get install postgresql`)")
    made = base is None
    base = Path(tempfile.mkdtemp(prefix="adapterfab-pg-", dir="/tmp")) if base is None else Path(base)
    try:
        base.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(base, "postgres", "postgres")
        data, sock, log = base / "data", base / "sock", base / "postgres.log"
        _pg_run([tools["initdb"], "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                 "--locale=C", "--no-sync", "--no-instructions"], base, timeout_s)
        sock.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(sock, "postgres", "postgres")
        opts = (f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off")
        _pg_run([tools["pg_ctl"], "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t",
                 str(int(timeout_s)), "start"], base, timeout_s + 10)
        pid = int((data / "postmaster.pid").read_text().split()[0])
    except BaseException:
        if made:
            shutil.rmtree(base, ignore_errors=True)
        raise
    return Postgres(pid=pid, port=port, url=f"postgresql://postgres@127.0.0.1:{port}", log=log, base=base)


def create_database(pg: Postgres, name: str, timeout_s: float = 60) -> str:
    """Create database ``name``; returns its URL, ``postgresql://...`` (SQLAlchemy 2.1 and MLflow
    connect to it with psycopg 3)."""
    createdb = postgres_bin("createdb")
    if createdb is None:
        raise StackError("PostgreSQL's createdb not found")
    _pg_run([createdb, "-h", "127.0.0.1", "-p", str(pg.port), "-U", pg.user, name], pg.base, timeout_s)
    return pg.db_url(name)


def stop_postgres(pg: Postgres, remove: bool = True, timeout_s: float = 30) -> None:
    """Fast shutdown (open sessions are ended), then the folder goes (``remove``)."""
    pg_ctl = postgres_bin("pg_ctl")
    try:
        if pg_ctl and pid_alive(pg.pid):
            _pg_run([pg_ctl, "-D", str(pg.base / "data"), "-m", "fast", "-w", "-t", str(int(timeout_s)),
                     "stop"], pg.base, timeout_s + 10)
    except StackError:
        pass
    finally:
        stop_pid(pg.pid, timeout_s=10)  # if pg_ctl could not
        if remove:
            shutil.rmtree(pg.base, ignore_errors=True)
