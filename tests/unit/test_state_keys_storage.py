"""Durable state, API keys and the local artifact store."""

from __future__ import annotations

import json
import time
from pathlib import Path
from unittest import mock

import pytest

from adapterfab.errors import AdapterfabError, StateError, StorageError
from adapterfab.keys import KeyStore
from adapterfab.lifecycle import JobState
from adapterfab.state import StateStore
from adapterfab.storage import LocalStore


def _store(tmp_path: Path) -> StateStore:
    return StateStore(f"sqlite:///{tmp_path / 'state.db'}")


def test_job_transitions_are_checked_and_durable(tmp_path: Path) -> None:
    s = _store(tmp_path)
    s.create_batch("b1", "n", "spec", "", "base", [{"id": "b1.acme.p", "tenant": "acme", "persona": "p",
                                                     "method": "lora", "total_steps": 10}])
    with pytest.raises(StateError, match="not allowed"):
        s.move_job("b1.acme.p", JobState.SUCCEEDED)  # nothing succeeds without preparing its data
    s.move_job("b1.acme.p", JobState.PREPARING)
    with pytest.raises(StateError, match="not allowed"):
        s.move_job("b1.acme.p", JobState.REGISTERING)
    s.move_job("b1.acme.p", JobState.TRAINING)
    s.update_job("b1.acme.p", step=5, loss=1.5)
    with pytest.raises(StateError):
        s.update_job("b1.acme.p", state="SUCCEEDED")
    again = _store(tmp_path)  # a new process sees the same state
    j = again.job("b1.acme.p")
    assert j.state == JobState.TRAINING and j.step == 5 and j.progress == 0.5 and j.started_s
    s.update_job("b1.acme.p", metrics={"eval_loss": float("nan"), "nested": {"x": [float("-inf"), 2.0]}})
    assert again.job("b1.acme.p").metrics == {"eval_loss": None, "nested": {"x": [None, 2.0]}}  # valid JSON
    json.loads(json.dumps(again.dump("b1"), default=str, allow_nan=False))


def test_keys_hashed_and_scoped(tmp_path: Path) -> None:
    s = _store(tmp_path)
    ks = KeyStore(s)
    k1, k2 = ks.create("acme"), ks.create("globex")
    assert ks.verify(k1) == "acme" and ks.verify(k2) == "globex"
    assert ks.verify(k1[:-1] + ("A" if k1[-1] != "A" else "B")) is None
    assert ks.verify("") is None and ks.verify("af_x_y") is None and ks.verify("Bearer") is None
    raw = (tmp_path / "state.db").read_bytes()
    assert k1.encode() not in raw and k1.split("_", 2)[2].encode() not in raw


def test_local_store_roundtrip_and_checksums(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"hello")
    (src / "sub" / "b.txt").write_text("world")
    store = LocalStore(tmp_path / "store")
    uri = store.upload_dir(src, "adapters/acme/p/job1/")
    got = store.download_dir(uri, tmp_path / "dst")
    assert (got / "a.bin").read_bytes() == b"hello" and (got / "sub" / "b.txt").read_text() == "world"
    (tmp_path / "store" / "adapters/acme/p/job1/a.bin").write_bytes(b"corrupt")
    with pytest.raises(StorageError, match="checksum"):
        store.download_dir(uri, tmp_path / "dst2")
    with pytest.raises(StorageError, match="escapes"):
        store.put_file(src / "a.bin", "../outside")
    with pytest.raises(StorageError, match="MANIFEST"):
        store.download_dir(store.uri("adapters/none/"), tmp_path / "dst3")


def test_store_rooted_at_the_adapter_folder(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_model.safetensors").write_bytes(b"weights")
    uri = LocalStore(tmp_path / "store").upload_dir(src, "adapters/acme/p/j/")
    got = LocalStore(uri).download_dir(uri, tmp_path / "dst")  # root == the adapter's own folder
    assert (got / "adapter_model.safetensors").read_bytes() == b"weights"


def test_a_factory_never_ends_a_batch_with_an_unfinished_job(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from adapterfab.jobs.registrar import end_unfinished

    s = _store(tmp_path)
    jobs = [{"id": f"b1.t{i}.p", "tenant": f"t{i}", "persona": "p", "method": "lora", "total_steps": 3}
            for i in range(4)]
    s.create_batch("b1", "n", "spec", "", "base", jobs)
    s.move_job("b1.t1.p", JobState.PREPARING)
    for jid in ("b1.t2.p", "b1.t3.p"):
        s.move_job(jid, JobState.PREPARING)
        s.move_job(jid, JobState.TRAINING)
    s.move_job("b1.t3.p", JobState.FAILED, error="its own reason")
    end_unfinished(SimpleNamespace(batch_id="b1", state=s), cancelled=False)
    after = {j.id: j for j in s.jobs("b1")}
    assert {j: v.state for j, v in after.items()} == {f"b1.t{i}.p": JobState.FAILED for i in range(4)}
    assert "ended with this job PENDING" in after["b1.t0.p"].error
    assert "ended with this job TRAINING" in after["b1.t2.p"].error
    assert after["b1.t3.p"].error == "its own reason"  # a terminal job keeps its state and reason
    # a cancelled batch: its unfinished jobs end CANCELLED instead, a terminal one keeps its state
    s.create_batch("b2", "n", "spec", "", "base", [{**j, "id": j["id"].replace("b1", "b2")} for j in jobs])
    s.move_job("b2.t1.p", JobState.PREPARING)
    s.move_job("b2.t1.p", JobState.SUCCEEDED, model_version=1)
    end_unfinished(SimpleNamespace(batch_id="b2", state=s), cancelled=True)
    assert {j.id: j.state for j in s.jobs("b2")} == {"b2.t0.p": JobState.CANCELLED, "b2.t1.p": JobState.SUCCEEDED,
                                                      "b2.t2.p": JobState.CANCELLED, "b2.t3.p": JobState.CANCELLED}


def test_an_unexpected_error_in_one_window_fails_that_window_only(tmp_path: Path) -> None:
    """Preparation runs in windows of groups; an error no stage expected (a bug, a lost connection) in
    one window failed every job of every later window too. Now only that window's jobs fail, each with
    the reason but without another tenant's job id in it, and the next windows go on to the queue."""
    import threading
    from types import SimpleNamespace

    from adapterfab.jobs.factory import Factory
    from adapterfab.jobs.groups import GroupQueue

    s = _store(tmp_path)
    ids = [f"b1.t{i}.p" for i in range(4)]
    s.create_batch("b1", "n", "spec", "", "base", [{"id": j, "tenant": f"t{i}", "persona": "p", "method": "lora",
                                                    "total_steps": 3} for i, j in enumerate(ids)])
    f = Factory.__new__(Factory)
    f.ctx = SimpleNamespace(batch_id="b1", state=s)
    f.groups, f.slots, f.early = [[0, 1], [2], [3]], 1, []
    f.planned = [SimpleNamespace(job_id=j) for j in ids]
    f.cancelled, f.queue, f._queued, f.slots_gone = threading.Event(), GroupQueue(), set(), False
    seen = []

    def window(members: list[int], first: bool = False) -> None:
        seen.append(members)
        if members == [0]:
            s.move_job(ids[0], JobState.PREPARING)  # one job had begun, the other not yet
            raise KeyError(ids[3])  # names a job of another tenant (and another window)
        f._queued.update(ids[i] for n in members for i in f.groups[n])

    f._prepare_window = window
    f._prepare_all()
    assert seen == [[0], [1, 2]]  # the windows after the failed one were prepared
    after = {j.id: j for j in s.jobs("b1")}
    assert {j: after[j].state for j in ids} == {ids[0]: JobState.FAILED, ids[1]: JobState.FAILED,
                                                ids[2]: JobState.PENDING, ids[3]: JobState.PENDING}
    for j in ids[:2]:
        assert after[j].error.startswith("preparation failed:") and ids[3] not in after[j].error, after[j].error
    assert f.queue.take() is None  # closed (and empty): a slot asking for a group ends at once


def test_when_every_slot_thread_stops_the_preparer_stops_waiting_and_the_jobs_fail(tmp_path: Path) -> None:
    """Each trainer slot is a thread that takes prepared groups from a bounded queue; the preparer waits
    for room in it. A slot thread that stopped on an error of its own (a lost database, a bug) was gone;
    with every slot gone, the preparer waited for ever and the batch never ended. Now the last slot to
    stop abandons the queue: the groups waiting in it and those prepared after fail with the reason, the
    preparer stops preparing, and the jobs never prepared fail with it too."""
    import threading
    from types import SimpleNamespace

    from adapterfab.jobs.factory import SLOTS_GONE, Factory
    from adapterfab.jobs.groups import GroupItem, GroupQueue
    from adapterfab.jobs.registrar import end_unfinished

    s = _store(tmp_path)
    ids = [f"b1.t{i}.p" for i in range(5)]
    s.create_batch("b1", "n", "spec", "", "base", [{"id": j, "tenant": f"t{i}", "persona": "p", "method": "lora",
                                                    "total_steps": 3} for i, j in enumerate(ids)])
    f = Factory.__new__(Factory)
    f.ctx = SimpleNamespace(batch_id="b1", state=s, tracking=None)
    f.groups, f.slots, f.early = [[0], [1], [2], [3], [4]], 2, []
    f.planned = [SimpleNamespace(job_id=j) for j in ids]
    f.cancelled, f.queue, f._queued, f._lock = threading.Event(), GroupQueue(), set(), threading.Lock()
    f._slots_left, f.slots_gone, f._slot_keys = 2, False, {}
    windows: list[list[int]] = []

    def window(members: list[int], first: bool = False) -> None:  # a window is prepared and its groups queued
        windows.append(members)
        for n in members:
            s.move_job(ids[n], JobState.PREPARING)
            item = GroupItem(f"g{n}", [SimpleNamespace(jid=ids[n], run_id=None)], None)
            if not f.queue.put(item):
                f._fail_group(item, AdapterfabError(SLOTS_GONE))

    def broken(index: int) -> None:
        raise ConnectionError("the state database went away")

    f._prepare_window, f._prewarm, f._await_first_steps = window, broken, lambda: None
    with mock.patch("adapterfab.jobs.factory.AHEAD_GROUPS_PER_SLOT", 1), \
            mock.patch("adapterfab.jobs.factory.WINDOW_JOBS", 1):
        preparer = threading.Thread(target=f._prepare_all, daemon=True)
        preparer.start()
        while len(f.queue._items) < 2:  # the queue is full: the preparer waits for a slot to take a group
            time.sleep(0.01)
        for i in range(2):
            f._slot(i)
        preparer.join(timeout=10)
    assert not preparer.is_alive(), "the preparer still waits for room in a queue nobody takes from"
    assert f.slots_gone and windows == [[0, 1], [2]]  # the window it waited with; no more
    end_unfinished(f.ctx, cancelled=False, reason=SLOTS_GONE)
    assert {j.state for j in s.jobs("b1")} == {JobState.FAILED}
    assert all(j.error == SLOTS_GONE for j in s.jobs("b1"))


def test_key_lifecycle_list_revoke_rotate_expire(tmp_path: Path) -> None:
    from adapterfab.errors import ApiKeyError

    now = [1000.0]
    ks = KeyStore(_store(tmp_path), clock=lambda: now[0])
    a, b = ks.create("acme"), ks.create("acme", ttl_s=60)
    op = ks.create_operator()
    g = ks.create("globex")
    assert [k.key_id for k in ks.list("acme")] == [a.split("_")[1], b.split("_")[1]]
    assert [k.key_id for k in ks.list(operators=True)] == [op.split("_")[1]] and len(ks.list()) == 4
    listed = ks.list("acme")[1].as_dict(now[0])
    assert listed["expires"] == 1060.0 and listed["status"] == "active" and listed["tenant"] == "acme"
    assert not any(a.split("_", 2)[2] in str(k.as_dict(now[0])) for k in ks.list())  # no secret listed
    now[0] = 1061.0
    assert ks.verify(b) is None and ks.list("acme")[1].status(now[0]) == "expired"
    with pytest.raises(ApiKeyError, match="already ended"):
        ks.rotate(b)
    assert ks.revoke(a.split("_")[1]).status(now[0]) == "revoked" and ks.verify(a) is None
    assert ks.revoke(a).revoked_s == 1061.0  # revoking twice keeps the first time
    new_g, old_g = ks.rotate(g, grace_s=30)
    assert ks.verify(g) == "globex" and ks.verify(new_g) == "globex" and old_g.rotated_to == new_g.split("_")[1]
    now[0] = 1092.0
    assert ks.verify(g) is None and ks.verify(new_g) == "globex"
    new_op, _ = ks.rotate(op)
    assert ks.identify(op) is None and ks.identify(new_op).operator and ks.verify(new_op) is None
    for bad in ("", "nothex", "af_zz_y", "0" * 15):
        with pytest.raises(ApiKeyError):
            ks.revoke(bad)
    with pytest.raises(ApiKeyError, match="no key"):
        ks.revoke("0" * 16)
    with pytest.raises(ApiKeyError):
        ks.create("acme", ttl_s=0)
    with pytest.raises(ApiKeyError):
        ks.rotate(new_g, grace_s=-1)


def test_an_older_state_database_gets_the_key_lifecycle_columns(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "state.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE api_keys (key_id VARCHAR(32) PRIMARY KEY, tenant VARCHAR(64), sha256 VARCHAR(64) "
                "UNIQUE, created_s FLOAT, revoked INTEGER, role VARCHAR(16))")
    con.commit()
    con.close()
    ks = KeyStore(StateStore(f"sqlite:///{db}"))
    k = ks.create("acme", ttl_s=100)
    assert ks.verify(k) == "acme" and ks.list("acme")[0].expires_s is not None


def test_an_older_database_migrated_by_two_processes_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes opening an older database both see a column missing; the second ALTER fails with
    'duplicate column' and crashed its process. Now it finds the column there and goes on; missing
    indexes are made too (create_all skips existing tables). The race is set up exactly: the second
    migration works from what the database looked like before the first one."""
    import sqlalchemy
    from sqlalchemy import create_engine, inspect, text

    from adapterfab.state import _add_missing_columns

    url = f"sqlite:///{tmp_path / 'state.db'}"
    StateStore(url)
    engine = create_engine(url)
    with engine.begin() as conn:  # as an older adapterfab left it
        conn.execute(text("ALTER TABLE batches DROP COLUMN heartbeat_s"))
        conn.execute(text("DROP INDEX ix_jobs_tenant"))
    stale = inspect(engine)
    stale.get_columns("batches"), stale.get_indexes("jobs")  # (cached: the view before the first migration)
    StateStore(url)  # the first process migrates
    have = inspect(engine)
    assert "heartbeat_s" in {c["name"] for c in have.get_columns("batches")}
    assert "ix_jobs_tenant" in {i["name"] for i in have.get_indexes("jobs")}
    views = iter([stale])
    monkeypatch.setattr(sqlalchemy, "inspect", lambda e: next(views, None) or inspect(e))
    _add_missing_columns(engine)  # the second, from the stale view: no "duplicate column" crash


def test_down_stops_a_running_batch_however_many_batches_came_after(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`adapterfab down` stops the orchestrators of running batches: it looked at the newest 200 batches
    only, so an older batch still running kept its orchestrator."""
    import subprocess
    import sys

    from adapterfab.lifecycle import BatchState
    from adapterfab.procs import pid_alive, proc_token
    from adapterfab.settings import Settings
    from adapterfab.stack import down

    monkeypatch.setenv("ADAPTERFAB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ADAPTERFAB_STATE_URL", raising=False)
    settings = Settings.load()
    s = StateStore(settings.state_url)
    orchestrator = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        for i in range(205):
            s.create_batch(f"b{i:03d}", "n", "spec", "", "base", [])
            s.update_batch(f"b{i:03d}", created_s=1000.0 + i,
                           state=BatchState.RUNNING if i == 0 else BatchState.SUCCEEDED)
        assert s.claim_batch("b000", orchestrator.pid, proc_token(orchestrator.pid), pid_alive) is not None
        assert "orchestrator of b000" in down(settings)
        assert orchestrator.wait(timeout=30) is not None
    finally:
        orchestrator.kill()
