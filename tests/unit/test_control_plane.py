"""Control-plane races: job moves lock the row from read to write, one orchestrator per
batch (an atomic claim; a duplicate `submit --resume` stands down), and recorded pids are checked
against their start token before anything is stopped (a reused pid is never killed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from adapterfab.errors import StateError
from adapterfab.lifecycle import JobState
from adapterfab.procs import pid_alive, proc_token, stop_pid
from adapterfab.state import StateStore


def _batch(url: str, batch_id: str = "b1", jobs: int = 1) -> StateStore:
    s = StateStore(url)
    s.create_batch(batch_id, "n", "spec", "", "base", [
        {"id": f"{batch_id}.acme.p{i}", "tenant": "acme", "persona": f"p{i}", "method": "lora", "total_steps": 4}
        for i in range(jobs)])
    return s


def test_racing_moves_of_one_job_serialise(tmp_path: Path) -> None:
    """Two processes' stores move one REGISTERING job at the same instant, one to SUCCEEDED and one to
    FAILED: each time exactly one move happens and the other is refused as a transition from the state the
    first left (never both applied, never a 'database is locked')."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    _batch(url)
    jid = "b1.acme.p0"
    a, b = StateStore(url), StateStore(url)  # own engines and connections, as two processes have
    for _ in range(25):
        a.move_job(jid, JobState.PENDING) if a.job(jid).state != JobState.PENDING else None
        for st in (JobState.PREPARING, JobState.TRAINING, JobState.REGISTERING):
            a.move_job(jid, st)
        barrier, results = threading.Barrier(2), {}

        def move(store: StateStore, to: JobState, barrier: threading.Barrier = barrier,
                 results: dict = results, jid: str = jid) -> None:
            barrier.wait()
            try:
                store.move_job(jid, to)
                results[to] = "moved"
            except StateError as e:
                results[to] = f"refused: {e}"
            except Exception as e:  # noqa: BLE001 - what the test must never see
                results[to] = f"error: {type(e).__name__}: {e}"

        threads = [threading.Thread(target=move, args=(a, JobState.SUCCEEDED)),
                   threading.Thread(target=move, args=(b, JobState.FAILED))]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        assert sorted(v.split(":")[0] for v in results.values()) == ["moved", "refused"], results
        final = a.job(jid).state
        assert results[final] == "moved"
        if final == JobState.SUCCEEDED:  # a SUCCEEDED job never moves again: start over with a new one
            _batch(url, f"b{_ + 2}")
            jid = f"b{_ + 2}.acme.p0"


CLAIMER = """
import os, sys, time
from adapterfab.procs import pid_alive, proc_token
from adapterfab.state import StateStore
s = StateStore(sys.argv[1])
claimed = s.claim_batch("b1", os.getpid(), proc_token(os.getpid()), pid_alive)
print("claimed" if claimed is not None else "held", flush=True)
time.sleep(60)
"""


def test_one_orchestrator_per_batch(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    s = _batch(url, jobs=2)
    holder = subprocess.Popen([sys.executable, "-c", CLAIMER, url], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        me = os.getpid()
        assert s.claim_batch("b1", me, proc_token(me), pid_alive) is None  # a live orchestrator holds it
        with pytest.raises(StateError, match="still running"):
            s.reopen_batch("b1", pid_alive)
        b = s.get_batch("b1")
        assert b.orchestrator_pid == holder.pid and b.orchestrator_token == proc_token(holder.pid)
    finally:
        holder.kill()
        holder.wait()
    assert len(s.reopen_batch("b1", pid_alive)) == 2  # its orchestrator died: resumable
    assert s.get_batch("b1").orchestrator_pid is None
    # two orchestrators started at once for the reopened batch: exactly one gets it
    barrier, won = threading.Barrier(2), []
    live = {111111, 222222}

    def claim(pid: int) -> None:
        store = StateStore(url)
        barrier.wait()
        if store.claim_batch("b1", pid, f"tok-{pid}", lambda p, t: p in live) is not None:
            won.append(pid)

    threads = [threading.Thread(target=claim, args=(p,)) for p in sorted(live)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert len(won) == 1 and s.get_batch("b1").orchestrator_pid == won[0]
    assert s.claim_batch("b1", won[0], f"tok-{won[0]}", lambda p, t: p in live) is not None  # re-claim: its own


def test_a_claim_made_on_another_host_lives_by_its_heartbeat(tmp_path: Path) -> None:
    """An orchestrator on another host (a Ray Job on a cluster node, the state DB shared) cannot be
    checked by pid from here: its claim holds while it beats and is taken over once its heartbeat is
    older than the lease; `--wait` and `--resume` judge it the same way."""
    from sqlalchemy import update

    from adapterfab.procs import LEASE_S
    from adapterfab.state import BatchRow

    url = f"sqlite:///{tmp_path / 'state.db'}"
    s = _batch(url, jobs=2)
    remote = "node-7.cluster:0b5e1d3c-boot:123456"
    assert s.claim_batch("b1", 4242, remote, pid_alive) is not None  # the remote orchestrator claims it
    assert s.orchestrator_alive(s.get_batch("b1"))
    me = os.getpid()
    assert s.claim_batch("b1", me, proc_token(me), pid_alive) is None  # it beats: held
    with pytest.raises(StateError, match="still running"):
        s.reopen_batch("b1", pid_alive)
    assert s.heartbeat("b1", 4242, remote) and not s.heartbeat("b1", me, proc_token(me))  # only the holder beats

    def age(seconds: float) -> None:
        with s.engine.begin() as conn:
            conn.execute(update(BatchRow).where(BatchRow.id == "b1").values(heartbeat_s=time.time() - seconds))

    age(LEASE_S / 2)
    assert s.orchestrator_alive(s.get_batch("b1"))
    age(LEASE_S + 1)  # silent longer than the lease: gone
    assert not s.orchestrator_alive(s.get_batch("b1"))
    assert len(s.reopen_batch("b1", pid_alive)) == 2
    assert s.claim_batch("b1", me, proc_token(me), pid_alive) is not None
    b = s.get_batch("b1")
    assert b.orchestrator_pid == me and time.time() - b.heartbeat_s < 5
    # a lock held on another host: kept for its lease, then taken over
    assert s.try_lock("register:a/b:fp", "job-r", 4242, remote, pid_alive, lease_s=60) is None
    assert s.try_lock("register:a/b:fp", "job-l", me, proc_token(me), pid_alive, lease_s=60) == "job-r"
    assert s.try_lock("register:a/b:fp", "job-l", me, proc_token(me), pid_alive, lease_s=0) is None


def test_a_named_lock_has_one_live_holder(tmp_path: Path) -> None:
    """The registration lock of a job fingerprint (jobs/registrar.fingerprint_lock): one holder at a time
    among racing processes, re-taken by its holder, released by its holder only, and taken over from a
    holder whose process died."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    s = StateStore(url)
    live = {111111, 222222, 333333}
    alive = lambda p, t: p in live  # noqa: E731
    barrier, won = threading.Barrier(3), []

    def take(pid: int) -> None:
        store = StateStore(url)
        barrier.wait()
        if store.try_lock("register:a/b:fp", f"job-{pid}", pid, f"tok-{pid}", alive) is None:
            won.append(pid)

    threads = [threading.Thread(target=take, args=(p,)) for p in sorted(live)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert len(won) == 1
    winner = won[0]
    other = next(p for p in live if p != winner)
    assert s.try_lock("register:a/b:fp", f"job-{other}", other, f"tok-{other}", alive) == f"job-{winner}"
    assert s.try_lock("register:a/b:fp", f"job-{winner}", winner, f"tok-{winner}", alive) is None  # its own
    s.unlock("register:a/b:fp", f"job-{other}")  # not the holder: nothing released
    assert s.try_lock("register:a/b:fp", f"job-{other}", other, f"tok-{other}", alive) == f"job-{winner}"
    assert s.try_lock("register:a/b:other", f"job-{other}", other, f"tok-{other}", alive) is None  # another key
    live.discard(winner)  # the holder was killed mid-registration: the next taker gets it
    assert s.try_lock("register:a/b:fp", f"job-{other}", other, f"tok-{other}", alive) is None
    s.unlock("register:a/b:fp", f"job-{other}")
    assert s.try_lock("register:a/b:fp", "job-new", 333333, "tok-333333", alive) is None


def test_a_recorded_pid_is_stopped_only_while_it_is_the_same_process(tmp_path: Path) -> None:
    """stack.json from before a reboot names a pid that now belongs to something else: `down` leaves it."""
    from adapterfab.settings import Settings
    from adapterfab.stack import down

    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        token = proc_token(sleeper.pid)
        assert token and pid_alive(sleeper.pid, token) and pid_alive(sleeper.pid)
        host, boot, start, ns = token.split(":")
        stale = f"{host}:{boot}:{int(start) - 100}:{ns}"  # the same number, an earlier process
        # another machine is another boot id (or pid namespace: a container), whatever the hostname
        assert not pid_alive(sleeper.pid, stale) and not pid_alive(sleeper.pid, f"{host}:other-boot:{start}:{ns}")
        assert not pid_alive(sleeper.pid, f"{host}:{boot}:{start}:ffff")
        stop_pid(sleeper.pid, timeout_s=1, token=stale)
        assert sleeper.poll() is None
        home = tmp_path / "home"
        home.mkdir()
        settings = Settings(home=home, cache=tmp_path / "cache", state_url=f"sqlite:///{home / 'state.db'}",
                            artifacts=str(tmp_path / "artifacts"))
        (home / "stack.json").write_text(json.dumps({"ray_pid": sleeper.pid, "mlflow_pid": sleeper.pid,
                                                     "proc_tokens": {"ray_pid": stale, "mlflow_pid": stale}}))
        assert down(settings) == [] and sleeper.poll() is None
        stop_pid(sleeper.pid, timeout_s=5, token=token)  # its own token: stopped (and reaped by pid_alive,
        assert not pid_alive(sleeper.pid) and not Path(f"/proc/{sleeper.pid}").exists()  # so no exit code here)
    finally:
        if sleeper.poll() is None:
            sleeper.kill()


def test_the_local_store_flushes_every_file_before_the_manifest_names_it(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Durability is not observable without pulling the power, so the order of the calls is checked: each
    file's bytes are flushed before its rename and its folder after, and the manifest (which makes the
    upload count) is renamed last."""
    import adapterfab.storage as storage
    from adapterfab.storage import LocalStore

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    monkeypatch.setattr(storage.os, "replace", replace)
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes(b"w" * 100)
    (src / "adapter_config.json").write_text("{}")
    store = LocalStore(tmp_path / "store")
    store.upload_dir(src, "acme/pirate/1")
    dest = store.path / "acme" / "pirate" / "1"
    for name in ("adapter_model.safetensors", "adapter_config.json", "MANIFEST.json"):
        i = events.index(("replace", str(dest / name)))
        assert events[i - 1][0] == "fsync" and events[i - 1][1].startswith(str(dest / name) + ".part")
        assert events[i + 1] == ("fsync", str(dest))
    assert [e for e in events if e[0] == "replace"][-1] == ("replace", str(dest / "MANIFEST.json"))


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/setpriv").exists(),
                    reason="needs root and setpriv to check a process as another user")
def test_a_process_of_another_user_counts_as_alive(tmp_path: Path) -> None:
    """On a host shared by several users, `kill(pid, 0)` on a colleague's orchestrator is EPERM: it
    runs. Taken for dead, `cancel` cancelled under it and `--resume` started a second orchestrator."""
    me = os.getpid()
    code = (f"import sys; sys.path[:0] = {sys.path!r}; from adapterfab.procs import pid_alive, stop_pid; "
            f"print(pid_alive({me}), pid_alive({me}, {proc_token(me)!r}), stop_pid({me}, 1))")
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True", "False"]  # and not this user's to stop: no crash


def test_an_orchestrator_whose_claim_was_taken_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Judged dead and taken over, an orchestrator must not go on running the batch beside the new one:
    its next heartbeat finds the claim gone and stops it (by default the process exits)."""
    import adapterfab.procs as procs
    from adapterfab.jobs.orchestrate import _heartbeat

    monkeypatch.setattr(procs, "HEARTBEAT_S", 0.01)
    s = _batch(f"sqlite:///{tmp_path / 'state.db'}")
    assert s.claim_batch("b1", 4242, "node-7.cluster:boot:1", pid_alive) is not None
    lost, stop = [], threading.Event()
    t = threading.Thread(target=_heartbeat, args=(s, "b1", 4242, "node-7.cluster:boot:1", stop, lambda: lost.append(1)))
    t.start()
    time.sleep(0.2)
    assert not lost  # it holds the claim: it beats
    with s.engine.begin() as conn:  # another orchestrator takes the batch over
        from sqlalchemy import update

        from adapterfab.state import BatchRow

        conn.execute(update(BatchRow).where(BatchRow.id == "b1").values(orchestrator_pid=999, orchestrator_token="x"))
    t.join(timeout=10)
    stop.set()
    assert lost == [1] and not t.is_alive()


def test_a_run_left_open_by_a_cancel_without_orchestrator_is_closed_on_resume(mlflow_server: str,
                                                                              tmp_path: Path) -> None:
    """An orchestrator dies mid-training; `adapterfab cancel` (none running) ends the job in the state
    database only; `submit --resume` runs it again. The dead attempt's MLflow run, still RUNNING, is
    closed KILLED (it stayed RUNNING for ever), and a run that had ended is left as it ended."""
    from types import SimpleNamespace

    from adapterfab.jobs.factory import Factory
    from adapterfab.registry import Registry
    from adapterfab.tracking import Tracking

    tracking = Tracking(mlflow_server)
    s = _batch(f"sqlite:///{tmp_path / 'state.db'}", jobs=2)
    assert s.claim_batch("b1", 4242, "node-7.cluster:boot:1", pid_alive) is not None
    old = {}
    for i in range(2):
        jid = f"b1.acme.p{i}"
        old[jid] = tracking.start_run(f"acme/p{i}", experiment="adapterfab/cancel-test")
        s.move_job(jid, JobState.PREPARING, mlflow_run_id=old[jid])
        s.move_job(jid, JobState.TRAINING)
    tracking.end_run(old["b1.acme.p1"], ok=False)  # this attempt's run had ended FAILED
    from sqlalchemy import update

    from adapterfab.state import BatchRow

    with s.engine.begin() as conn:  # the orchestrator's heartbeat is long gone
        conn.execute(update(BatchRow).where(BatchRow.id == "b1").values(heartbeat_s=0))
    assert s.cancel_batch("b1") == "cancelled"
    assert len(s.reopen_batch("b1", pid_alive)) == 2
    ctx = SimpleNamespace(batch_id="b1", state=s, tracking=tracking, batch_run_id=None,
                          registry=Registry(mlflow_server))
    factory = SimpleNamespace(ctx=ctx, jobs=[SimpleNamespace(tenant="acme", persona=f"p{i}") for i in range(2)],
                              cancelled=threading.Event())
    for i in range(2):
        assert Factory._begin(factory, i) is not None  # the job starts again, with a new run
    status = {jid: tracking.client.get_run(run).info.status for jid, run in old.items()}
    assert status == {"b1.acme.p0": "KILLED", "b1.acme.p1": "FAILED"}


def test_wait_ends_when_the_orchestrator_it_launched_dies_before_claiming(tmp_path: Path) -> None:
    """`submit --wait` waited for ever (the default timeout is none) on a batch whose orchestrator
    crashed during start-up, before it recorded its pid: the CLI now watches the process it launched."""
    from types import SimpleNamespace

    from adapterfab.cli_batches import _wait
    from adapterfab.cli_common import EXIT_FAILED

    url = f"sqlite:///{tmp_path / 'state.db'}"
    _batch(url)
    crashed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    crashed.wait()
    t0 = time.monotonic()
    code = _wait(SimpleNamespace(state_url=url, logs=tmp_path), "b1", 60, launched=crashed.pid)
    assert code == EXIT_FAILED and time.monotonic() - t0 < 10


def test_two_batches_gating_one_persona_at_once_keep_the_better_version(mlflow_server: str, tmp_path: Path) -> None:
    """Two batches register a version of the same persona at once with `promote: auto`. Each gate read
    the production version (none), both were promoted, and the later registration stood: here the worse
    one (eval loss 1.0 over 0.5), as its gate took longer. One gated registration per adapter at a time
    (a lock in the state database) makes the second gate compare with the first's outcome."""
    import uuid

    from adapterfab.ids import AdapterId
    from adapterfab.jobs.registrar import register_gated
    from adapterfab.promotion import Policy, decide_over
    from adapterfab.registry import Registry

    state = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    registry = Registry(mlflow_server)
    aid = AdapterId("gate" + uuid.uuid4().hex[:8], "pirate")
    policy = Policy("eval_loss", min_retention=0)

    decided = threading.Event()

    def job(name: str, loss: float, think_s: float, after: threading.Event | None) -> None:
        def gate(prod):  # noqa: ANN001, ANN202 - the decision, then a slow moment before registering
            d = decide_over(policy, {"eval_loss": loss, "base_eval_loss": 2.0}, prod)
            decided.set()
            time.sleep(think_s)
            return d

        if after is not None:
            after.wait(30)  # the other job's gate has read production (none) and is still deciding
        register_gated(state, registry, aid, name, f"s3://b/{name}", None, {"name": name}, gate)

    worse = threading.Thread(target=job, args=("b1.worse", 1.0, 3.0, None))
    better = threading.Thread(target=job, args=("b2.better", 0.5, 0.0, decided))
    for t in (worse, better):
        t.start()
    for t in (worse, better):
        t.join(60)
    prod = registry.production(aid)
    assert prod is not None and prod.tags["adapterfab.name"] == "b2.better"
