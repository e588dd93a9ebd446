"""`adapterfab up` / `down` and stack.json under failure: a dead MLflow, ports already taken, two `up`s at
once, an interrupted `up`, a torn record, a record `serve` left, a renamed host. The stack's servers are
stand-ins (small Python programs that bind the ports the real `ray start --head` and `mlflow server`
would) or `sleep`; no real Ray or MLflow starts here."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import adapterfab.procs as procs
import adapterfab.stack as stack
from adapterfab.errors import StackError
from adapterfab.procs import free_port, pid_alive, port_owned_by, proc_token, start_mlflow, stop_pid
from adapterfab.settings import Settings

# `ray start --head --block`: binds --port and --dashboard-port (HTTP) after a start-up delay, exits 1 when
# a port is taken; writes the environment it got to ray-env.json in its cwd (the home)
FAKE_RAY = """
import json, os, socket, sys, threading, time, http.server
a = sys.argv
port, dash = int(a[a.index("--port") + 1]), int(a[a.index("--dashboard-port") + 1])
json.dump(dict(os.environ), open("ray-env.json", "w"))
time.sleep(float(os.environ.get("FAKE_DELAY", "0.3")))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ray")
    def log_message(self, *a): pass
try:
    s = socket.socket(); s.bind(("127.0.0.1", port)); s.listen()
    srv = http.server.HTTPServer(("127.0.0.1", dash), H)
except OSError as e:
    print(e, flush=True); sys.exit(1)
threading.Thread(target=srv.serve_forever, daemon=True).start()
time.sleep(600)
"""
# `mlflow server --port P`: serves /health after a delay (never with FAKE_MLFLOW_HANG), exits 1 if P is taken
FAKE_MLFLOW = """
import os, sys, time, http.server
a = sys.argv
port = int(a[a.index("--port") + 1])
if os.environ.get("FAKE_MLFLOW_HANG"):
    time.sleep(600)
time.sleep(float(os.environ.get("FAKE_DELAY", "0.3")))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"OK")
    def log_message(self, *a): pass
try:
    srv = http.server.HTTPServer(("127.0.0.1", port), H)
except OSError as e:
    print(e, flush=True); sys.exit(1)
srv.serve_forever()
"""
# one `up` in its own process, on the fake servers, with the default ports given in argv; no UI
CHILD = """
import faulthandler, json, signal, sys
faulthandler.register(signal.SIGUSR1, all_threads=True)  # where it hangs, should it (the test asks)
import adapterfab.procs as procs, adapterfab.stack as stack
from adapterfab.settings import Settings
procs.tool = stack.tool = lambda name: sys.argv[1] + "/" + name
stack._start_ui = lambda *a: None
stack.DEFAULT_RAY_PORT, stack.DEFAULT_DASHBOARD_PORT, stack.DEFAULT_MLFLOW_PORT = map(int, sys.argv[2:5])
i = stack.up(Settings.load())
print(json.dumps({"ray_pid": i.ray_pid, "mlflow_pid": i.mlflow_pid}), flush=True)
"""


def _ours(root: Path) -> list[int]:
    """Processes running in a folder under ``root``: the fake servers this test started."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and os.readlink(d / "cwd").startswith(str(root)) and pid_alive(int(d.name)):
                found.append(int(d.name))
        except OSError:
            continue
    return found


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Settings, Path]]:
    """An isolated home, the fake `ray` and `mlflow` as the stack's tools, free default ports, no UI; every
    process left in the test's folder is stopped at the end."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("ray", FAKE_RAY), ("mlflow", FAKE_MLFLOW)):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{text}")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setattr(procs, "tool", lambda name: str(bin_dir / name))
    monkeypatch.setattr(stack, "tool", lambda name: str(bin_dir / name))
    monkeypatch.setattr(stack, "_start_ui", lambda *a: None)
    for name in ("DEFAULT_RAY_PORT", "DEFAULT_DASHBOARD_PORT", "DEFAULT_MLFLOW_PORT", "DEFAULT_SERVE_PORT"):
        monkeypatch.setattr(stack, name, free_port())
    monkeypatch.setenv("ADAPTERFAB_HOME", str(tmp_path / "home"))
    for var in ("ADAPTERFAB_STATE_URL", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "FAKE_MLFLOW_HANG"):
        monkeypatch.delenv(var, raising=False)
    settings = Settings.load()
    settings.ensure_dirs()
    try:
        yield settings, bin_dir
    finally:
        for pid in _ours(tmp_path):
            stop_pid(pid, timeout_s=2)


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"], start_new_session=True)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _record(settings: Settings, ray: int, mlflow: int, **extra: object) -> None:
    settings.stack_file.write_text(json.dumps({
        "ray_address": f"127.0.0.1:{free_port()}", "ray_pid": ray, "dashboard_url": f"http://127.0.0.1:{free_port()}",
        "mlflow_uri": f"http://127.0.0.1:{free_port()}", "mlflow_pid": mlflow, "serve_url": "http://127.0.0.1:8000",
        "serve_port": 8000, "proc_tokens": {"ray_pid": proc_token(ray), "mlflow_pid": proc_token(mlflow)}, **extra}))


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in raw if b"=" in e)


# 1, 9: MLflow died under running batches --------------------------------------------------------------

def test_up_with_mlflow_dead_restarts_it_alone_with_its_stores(fakes: tuple[Settings, Path]) -> None:
    """The factory rides out an MLflow outage; `adapterfab up` brings MLflow back on its recorded port and
    stores. It used to call `down`: every batch's orchestrator and the live Ray head were killed."""
    from adapterfab.state import StateStore

    settings, _ = fakes
    ray, orchestrator = _sleeper(), _sleeper()
    try:
        backend = f"sqlite:///{settings.home / 'elsewhere.db'}"
        _record(settings, ray.pid, _dead_pid(), mlflow_backend_store_uri=backend,
                mlflow_artifacts_destination=str(settings.home / "arts"))
        port = int(json.loads(settings.stack_file.read_text())["mlflow_uri"].rsplit(":", 1)[1])
        db = StateStore(settings.state_url)
        db.create_batch("b-training", "n", "spec", "", "base", jobs=[])
        db.claim_batch("b-training", orchestrator.pid, proc_token(orchestrator.pid), pid_alive)
        db.update_batch("b-training", state="RUNNING")
        with pytest.raises(StackError, match="--backend-store-uri"):  # 9: not the running stack's store
            stack.up(settings, backend_store_uri="sqlite:////tmp/other.db")
        info = stack.up(settings)
        assert pid_alive(ray.pid) and pid_alive(orchestrator.pid) and info.ray_pid == ray.pid
        assert info.mlflow_uri == f"http://127.0.0.1:{port}" and pid_alive(info.mlflow_pid)
        assert port_owned_by(port, info.mlflow_pid)
        assert _environ(info.mlflow_pid)["MLFLOW_BACKEND_STORE_URI"] == backend  # its recorded store
        assert "--artifacts-destination" in (cmd := Path(f"/proc/{info.mlflow_pid}/cmdline").read_bytes().decode())
        assert str(settings.home / "arts") in cmd
        assert not (settings.home / "ray-env.json").exists()  # no second Ray head
        assert stack.stack_alive(json.loads(settings.stack_file.read_text()))
    finally:
        ray.kill()
        orchestrator.kill()


def test_up_records_its_options_and_refuses_other_ones_for_a_live_stack(fakes: tuple[Settings, Path]) -> None:
    settings, _ = fakes
    info = stack.up(settings, backend_store_uri=f"sqlite:///{settings.home / 'm.db'}")
    rec = json.loads(settings.stack_file.read_text())
    assert rec["mlflow_backend_store_uri"] == f"sqlite:///{settings.home / 'm.db'}"
    assert rec["mlflow_artifacts_destination"] == str(settings.home / "mlflow" / "mlflow-artifacts")
    assert stat.S_IMODE(settings.stack_file.stat().st_mode) == 0o600  # it may hold a database password
    port = int(info.mlflow_uri.rsplit(":", 1)[1])
    with pytest.raises(StackError, match="--mlflow-port"):
        stack.up(settings, mlflow_port=port + 1)
    with pytest.raises(StackError, match="--artifacts-destination"):
        stack.up(settings, artifacts_destination=str(settings.home / "other"))
    same = stack.up(settings, mlflow_port=port, backend_store_uri=rec["mlflow_backend_store_uri"])
    assert same.ray_pid == info.ray_pid  # the options it runs with: nothing to refuse, nothing started


# 2: ports someone else holds, two `up`s at once ------------------------------------------------------

def _foreign_server(port: int) -> object:
    import http.server

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    srv = http.server.HTTPServer(("127.0.0.1", port), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.mark.parametrize("which", ["ray_port", "dashboard_port", "mlflow_port"])
def test_up_refuses_a_port_another_server_holds(fakes: tuple[Settings, Path], which: str) -> None:
    """The other server answered the readiness checks: `up` said the stack was up while its own processes
    had died on 'address in use', and recorded them."""
    settings, _ = fakes
    port = free_port()
    srv = _foreign_server(port)
    try:
        with pytest.raises(StackError, match=f"port {port} .*already in use"):
            stack.up(settings, **{which: port})
    finally:
        srv.shutdown()
        srv.server_close()
    assert not settings.stack_file.exists() and not _ours(settings.home)


def test_a_listener_that_is_not_ours_never_counts_as_started(tmp_path: Path, fakes: tuple[Settings, Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Another server takes the port after the check, while ours is still starting: its answers are not
    ours, and the start fails (our process stopped) instead of recording a server that is not running."""
    monkeypatch.setenv("FAKE_MLFLOW_HANG", "1")
    port = free_port()
    timer = threading.Timer(0.5, lambda: servers.append(_foreign_server(port)))
    servers: list = []
    timer.start()
    pids: list[int] = []
    try:
        with pytest.raises(StackError, match="did not answer"):
            start_mlflow(tmp_path / "ml", port, timeout_s=3, started=pids.append)
    finally:
        timer.join()
        [(s.shutdown(), s.server_close()) for s in servers]
    assert servers and pids and not pid_alive(pids[0])


def test_two_ups_at_once_make_one_stack(fakes: tuple[Settings, Path]) -> None:
    settings, bin_dir = fakes
    ports = [str(free_port()) for _ in range(3)]
    env = {**os.environ, "FAKE_DELAY": "1"}
    ups = [subprocess.Popen([sys.executable, "-c", CHILD, str(bin_dir), *ports], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in ups]
    assert [p.returncode for p in ups] == [0, 0], [o[1][-1500:] for o in outs]
    a, b = (json.loads(o[0]) for o in outs)
    assert a == b  # the second found the first's stack
    assert stack.stack_alive(json.loads(settings.stack_file.read_text()))
    assert sorted(_ours(settings.home)) == sorted(a.values())  # nothing else: no orphan
    stack.down(settings)
    assert not _ours(settings.home)


# 3: an interrupted `up` -------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_an_interrupted_up_leaves_nothing_running_unrecorded(fakes: tuple[Settings, Path], sig: int) -> None:
    """Ctrl-C or SIGTERM while `up` waits for MLflow: what it started is stopped (Ray and MLflow run in
    their own sessions: the terminal's SIGINT never reaches them); SIGKILL: both are recorded, for `down`."""
    settings, bin_dir = fakes
    env = {**os.environ, "FAKE_MLFLOW_HANG": "1"}
    up = subprocess.Popen([sys.executable, "-c", CHILD, str(bin_dir), *(str(free_port()) for _ in range(3))],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # Ray is up, MLflow started and not answering
        rec = stack.read_stack(settings) or {}
        if rec.get("mlflow_pid"):
            break
        time.sleep(0.1)
    assert rec.get("mlflow_pid"), up.stderr.read() if up.poll() is not None else "no MLflow started"
    up.send_signal(sig)
    try:  # (~1.5 s alone; 30 s once ran out with the suite's two streams on 2 CPUs under a load of ~8)
        up.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        up.send_signal(signal.SIGUSR1)
        time.sleep(2)
        up.kill()
        pytest.fail(f"`up` did not end after signal {sig}; its threads:\n{up.communicate()[1][-6000:]}")
    assert up.returncode != 0
    if sig == signal.SIGKILL:
        assert sorted(_ours(settings.home)) == sorted([rec["ray_pid"], rec["mlflow_pid"]])
        assert sorted(stack.down(settings)) == ["mlflow", "ray"]
    else:
        assert not settings.stack_file.exists()
    assert not _ours(settings.home)


# 4: a torn stack.json --------------------------------------------------------------------------------

def test_stack_json_is_never_seen_half_written(fakes: tuple[Settings, Path]) -> None:
    settings, _ = fakes
    _record(settings, os.getpid(), os.getpid())
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            stack.record(settings, serve_url="http://127.0.0.1:8000", serve_port=8000, serve_host="127.0.0.1")

    t = threading.Thread(target=writer)
    t.start()
    try:
        deadline, reads = time.monotonic() + 1, 0
        while time.monotonic() < deadline:
            assert stack.read_stack(settings) is not None
            reads += 1
    finally:
        stop.set()
        t.join()
    assert reads > 100


def test_down_keeps_a_stack_json_it_cannot_read(fakes: tuple[Settings, Path]) -> None:
    """A write cut short (disk full) left it empty: `down` stopped nothing, said so, exit 0, and deleted
    the only record of the processes still running."""
    settings, _ = fakes
    settings.stack_file.write_text("")
    r = subprocess.run([sys.executable, "-m", "adapterfab.cli", "down"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "ADAPTERFAB_HOME": str(settings.home)})
    assert r.returncode == 1 and "cannot be read" in r.stderr, r.stdout + r.stderr
    assert settings.stack_file.exists()
    with pytest.raises(StackError, match="cannot be read"):
        stack.up(settings)  # nor does `up` start a second stack beside the unknown one
    assert not _ours(settings.home)


# 5: the MLflow backend's password --------------------------------------------------------------------

def test_the_backend_uri_is_not_on_mlflows_command_line(tmp_path: Path, fakes: tuple[Settings, Path]) -> None:
    """`ps` shows every process's command line to every local user; the environment is the owner's."""
    uri = "postgresql://mlflow:S3cretPassw0rd@db.internal:5432/mlflow"
    srv = start_mlflow(tmp_path / "ml", free_port(), backend_uri=uri, timeout_s=30)
    try:
        assert b"S3cretPassw0rd" not in Path(f"/proc/{srv.pid}/cmdline").read_bytes()
        assert _environ(srv.pid)["MLFLOW_BACKEND_STORE_URI"] == uri  # `mlflow server` reads it there
    finally:
        stop_pid(srv.pid)


# 6: a record `adapterfab serve` left -----------------------------------------------------------------

def test_a_serve_record_does_not_block_submit_on_an_existing_cluster(fakes: tuple[Settings, Path],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve` on a cluster of RAY_ADDRESS records its URL in stack.json; `submit` then said the local
    stack was not running, and `up` took the record for a half-dead stack."""
    settings, _ = fakes
    monkeypatch.setenv("RAY_ADDRESS", "ray://10.0.0.5:10001")
    stack.record(settings, serve_url="http://127.0.0.1:8000", serve_port=8000, serve_host="127.0.0.1")
    assert not stack.local_stack_down(Settings.load())
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    r = subprocess.run([sys.executable, "-m", "adapterfab.cli", "submit", "--resume", "b-123"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert "not running" not in r.stderr, r.stderr
    _record(settings, _dead_pid(), _dead_pid())  # a dead local stack: RAY_ADDRESS names another cluster
    assert not stack.local_stack_down(Settings.load())
    monkeypatch.delenv("RAY_ADDRESS")
    assert stack.local_stack_down(Settings.load())
    stack.record(settings, ray_pid=None)  # `serve`'s record alone again: `up` starts a stack, no `down`
    info = stack.up(Settings.load())
    assert pid_alive(info.ray_pid) and pid_alive(info.mlflow_pid)


# 7: the user's RAY_AUTH_MODE -------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [None, "token"])
def test_the_ray_head_keeps_the_users_auth_mode(fakes: tuple[Settings, Path], monkeypatch: pytest.MonkeyPatch,
                                                mode: str | None) -> None:
    settings, _ = fakes
    if mode:
        monkeypatch.setenv("RAY_AUTH_MODE", mode)
    else:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    stack.up(settings)
    got = json.loads((settings.home / "ray-env.json").read_text())
    assert got["RAY_AUTH_MODE"] == (mode or "disabled")


# 8: a renamed host -----------------------------------------------------------------------------------

def test_down_stops_the_stack_after_the_hostname_changed(fakes: tuple[Settings, Path],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    settings, _ = fakes
    ray, mlflow = _sleeper(), _sleeper()
    try:
        _record(settings, ray.pid, mlflow.pid)
        monkeypatch.setattr(socket, "gethostname", lambda: "laptop-renamed")
        token = proc_token(ray.pid)
        assert token.startswith("laptop-renamed:") and not procs.token_is_remote(
            json.loads(settings.stack_file.read_text())["proc_tokens"]["ray_pid"])
        assert sorted(stack.down(settings)) == ["mlflow", "ray"]
        assert ray.wait(timeout=10) is not None and mlflow.wait(timeout=10) is not None
    finally:
        ray.kill()
        mlflow.kill()


def test_a_token_of_another_boot_or_pid_namespace_is_remote() -> None:
    """Containers on one host share its boot id, not its pid numbers: a pid of another container's
    namespace must not be checked here (it would look dead, and its batch be taken over)."""
    host, boot, start, ns = proc_token(os.getpid()).split(":")
    assert not procs.token_is_remote(f"{host}:{boot}:{start}:{ns}")
    assert not procs.token_is_remote(f"other-name:{boot}:{start}")  # a token from before pid namespaces
    assert procs.token_is_remote(f"{host}:{boot}:{start}:{int(ns, 16) + 1:x}")
    assert procs.token_is_remote(f"{host}:another-boot:{start}:{ns}")
