"""What a second review of the dashboard found (2026-12): its ``/api`` routes answered a client's wrong
keys with 401s however many it had sent (a brute force of tenant and operator keys); past a limit per
address they get a 429 now, a valid key never refused; and the batch list read every job row of the 100 batches it lists
to count them by state (200 batches x 500 jobs: 2.7 s, ~200 MB and 50,000 rows per 2-second poll).

The dashboard runs in process over HTTP (``TestClient``) on a real SQLite state database with the real
``KeyStore``; queries, key lookups and job rows are counted with SQLAlchemy event listeners."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from adapterfab.keys import KeyStore, Principal
from adapterfab.lifecycle import JobState
from adapterfab.serve import dashboard
from adapterfab.serve import dashboard_views as views
from adapterfab.serve.auth_guard import DEFAULT_FAILURE_WINDOW_S, DEFAULT_MAX_FAILURES, AuthFailureLimiter
from adapterfab.state import JobRow, StateStore
from adapterfab.state_queries import batch_totals

ATTACKER, VICTIM = ("203.0.113.7", 40000), ("198.51.100.2", 40000)
WRONG = "af_0123456789abcdef_" + "x" * 32
NOW = 10_000.0


def _get(http: TestClient, path: str, key: str) -> Any:
    return http.get(path, headers={"Authorization": f"Bearer {key}"})


def _key_lookups(state: StateStore) -> list[int]:
    """How many times the state database was asked for a key (``KeyStore``'s lookups)."""
    n = [0]

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "api_keys" in statement:
            n[0] += 1

    event.listen(state.engine, "before_cursor_execute", count)
    return n


@pytest.fixture
def state(tmp_path: Path) -> StateStore:
    return StateStore(f"sqlite:///{tmp_path / 'state.db'}")


# -- wrong keys are limited -------------------------------------------------------------------------
def test_wrong_keys_from_one_client_get_a_429_and_valid_keys_keep_working(state: StateStore) -> None:
    keys, now = KeyStore(state), [100.0]
    op, acme = keys.create_operator(), keys.create("acme")
    app = dashboard.create_app(state.url, None, None,
                               auth_limit=AuthFailureLimiter(3, window_s=60, clock=lambda: now[0]))
    lookups = _key_lookups(app.state.sources.state)
    attacker, victim = TestClient(app, client=ATTACKER), TestClient(app, client=VICTIM)
    assert _get(attacker, "/api/whoami", op).status_code == 200  # an operator behind the guesser's address
    lookups[0] = 0
    codes = [_get(attacker, path, WRONG + str(i)).status_code
             for i, path in enumerate(("/api/whoami", "/api/batches", "/api/cluster", "/api/batches", "/api/registry"))]
    assert codes == [401, 401, 401, 429, 429] and lookups[0] == 5  # every key looked up: a valid one passes
    r = _get(attacker, "/api/batches", op[:-2] + "xx")  # an operator key guessed: the same
    assert r.status_code == 429 and r.headers["Retry-After"] == "20"  # 60 s / 3 failures: a token back in 20 s
    assert r.json() == {"error": {"message": r.json()["error"]["message"], "code": "rate_limit_exceeded"}}
    assert "wrong API keys" in r.json()["error"]["message"]
    assert r.headers["cache-control"] == "no-store, private"
    assert _get(attacker, "/api/batches", op).status_code == 200  # a valid key is never refused
    assert _get(attacker, "/api/whoami", keys.create("globex")).json()["tenant"] == "globex"  # a new one neither
    assert _get(victim, "/api/whoami", acme).json()["tenant"] == "acme"  # another address: its own bucket
    assert attacker.get("/api/whoami").status_code == 401  # no key: nothing to guess, a plain 401
    assert attacker.get("/healthz").status_code == 200
    now[0] += 20.5  # one token back: one more 401, then 429 again
    assert [_get(attacker, "/api/whoami", WRONG + str(i)).status_code for i in range(2)] == [401, 429]


def test_the_dashboard_limits_wrong_keys_by_default_and_its_flags_set_the_limit(
        state: StateStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    http = TestClient(dashboard.create_app(state.url, None, None), client=ATTACKER)
    codes = [_get(http, "/api/batches", WRONG + str(i)).status_code for i in range(DEFAULT_MAX_FAILURES + 2)]
    assert codes == [401] * DEFAULT_MAX_FAILURES + [429] * 2

    # how `adapterfab up` starts it: `python -m adapterfab.serve.dashboard --port N` (uvicorn is the edge)
    served: list[Any] = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: served.append(app))
    monkeypatch.setenv("ADAPTERFAB_HOME", str(tmp_path / "home"))
    for name in ("ADAPTERFAB_STATE_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    dashboard.main(["--port", "8999"])
    dashboard.main(["--auth-max-failures", "2", "--auth-failure-window-s", "5"])
    dashboard.main(["--auth-max-failures", "0"])
    default, two, off = (app.state.auth_guard for app in served)
    assert (default.max_failures, default.window_s) == (DEFAULT_MAX_FAILURES, DEFAULT_FAILURE_WINDOW_S)
    assert (two.max_failures, two.window_s) == (2, 5.0) and off.max_failures == 0
    http = TestClient(served[1], client=ATTACKER)
    assert [_get(http, "/api/whoami", WRONG + str(i)).status_code for i in range(3)] == [401, 401, 429]
    http = TestClient(served[2], client=ATTACKER)
    assert {_get(http, "/api/whoami", WRONG + str(i)).status_code for i in range(DEFAULT_MAX_FAILURES + 2)} == {401}
    with pytest.raises(SystemExit):
        dashboard.main(["--auth-max-failures", "-1"])
    with pytest.raises(SystemExit):
        dashboard.main(["--auth-failure-window-s", "0"])


# -- the batch list sums in the database ------------------------------------------------------------
def _job(batch: str, tenant: str, i: int) -> dict[str, Any]:
    """A job with a little of everything the list sums, chosen by ``i`` (a fixed mix, no randomness)."""
    state = list(JobState)[i % 7]
    terminal = state.terminal
    placement = [None, {"cpus": 2, "gpus": 0.5, "workers": 2, "node_id": "n1"},
                 {"cpus": 1, "gpus": 1, "workers": 0, "fused_with": [f"{batch}.x{k}" for k in range(i % 4)]},
                 {"cpus": 4, "gpus": None, "fused_with": []}, {"gpus": 0.25, "workers": 3, "fused_with": None},
                 {"cpus": 1.5, "gpus": 2, "workers": 1, "fused_with": ["a", "b", "c"]}][i % 6]
    metrics = [{}, {"train_s": 12}, {"train_s": 33.3, "eval_loss": 1.5}, {"eval_loss": 2.0}][i % 4]
    return {"id": f"{batch}.{tenant}.p{i}", "tenant": tenant, "persona": f"p{i}", "method": "lora",
            "state": state.value, "step": (i * 37) % 130, "total_steps": [100, 0, 120, 7][i % 4],
            "metrics": metrics, "placement": placement,
            "reused_version": 3 if i % 11 == 5 else None,
            "started_s": [None, 0.0, 1000.0 + i, 900.0 - i][i % 4],
            "ended_s": (2000.0 + 3 * i if i % 5 else None) if terminal else None,
            "training_started_s": None if i % 9 == 4 else 1200.0 + i * 1.7}


def _world(state: StateStore, batches: int = 6, per_batch: int = 40) -> None:
    """``batches`` batches of ``per_batch`` jobs of three tenants in every state, and an empty batch."""
    for b in range(batches):
        bid = f"b{b}"
        jobs = [_job(bid, ("acme", "globex", "initech")[(i + b) % 3], i + 5 * b) for i in range(per_batch)]
        if b == 1:  # one tenant with every job terminal and none ended: its end is 0
            jobs = [j | {"state": "CANCELLED", "ended_s": None} if j["tenant"] == "initech" else j for j in jobs]
        if b == 2:  # every acme job succeeded
            jobs = [j | {"state": "SUCCEEDED"} if j["tenant"] == "acme" else j for j in jobs]
        state.create_batch(bid, f"batch {b}", "spec", "", "tiny", jobs)
        state.update_batch(bid, state=["PENDING", "RUNNING", "FAILED"][b % 3], started_s=500.0 + b,
                           created_s=100.0 + b)
    state.create_batch("empty", "no jobs", "spec", "", "tiny", [])


def _old_list(state: StateStore, who: Principal, now: float) -> list[dict[str, Any]]:
    """What the batch list answered before: every job of every listed batch, summed in Python."""
    rows = state.list_batches(limit=dashboard.BATCH_LIST_LIMIT, tenant=who.tenant)
    jobs = state.jobs_of_batches([b.id for b in rows], tenant=who.tenant)
    return [views.batch_dict(b, jobs.get(b.id, []), who, now) for b in rows if jobs.get(b.id) or who.operator]


def test_the_database_totals_equal_the_sums_over_the_jobs(state: StateStore) -> None:
    _world(state)
    ids = [b.id for b in state.list_batches(limit=None)]
    cost = [0.0, 0.0]
    for now in (NOW, 1300.0):  # 1300: some training jobs started after it (no negative cost)
        for tenant in (None, "acme", "globex", "initech"):
            who = Principal(tenant)
            totals = batch_totals(state, ids, tenant, views.job_cost_sql(now))
            jobs = state.jobs_of_batches(ids, tenant=tenant)
            assert set(totals) == set(jobs) and "empty" not in totals
            for bid, js in jobs.items():
                t, old = totals[bid], views.job_totals(js, now)
                assert t.counts == old.counts and t.jobs == old.jobs
                assert (t.first_started_s, t.last_ended_s) == (old.first_started_s, old.last_ended_s)
                assert t.progress == pytest.approx(old.progress, rel=1e-12)
                assert (t.gpu_s, t.cpu_s) == pytest.approx((old.gpu_s, old.cpu_s), rel=1e-12)
                b = state.get_batch(bid)
                assert views.batch_summary(b, t, who) == views.batch_dict(b, js, who, now)
                cost = [cost[0] + t.gpu_s, cost[1] + t.cpu_s]
    assert cost[0] > 0 and cost[1] > 0  # the mix costs something


def test_the_batch_list_answers_as_before_without_reading_job_rows(
        state: StateStore, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    _world(state)
    app = dashboard.create_app(state.url, None, None)
    monkeypatch.setattr(dashboard, "time", types.SimpleNamespace(time=lambda: NOW, monotonic=dashboard.time.monotonic))
    keys, http = KeyStore(state), TestClient(app)
    engine = app.state.sources.state.engine
    queries, job_rows = [0], [0]
    event.listen(engine, "before_cursor_execute", lambda *a, **k: queries.__setitem__(0, queries[0] + 1))

    def loaded(*_: Any) -> None:
        job_rows[0] += 1

    event.listen(JobRow, "load", loaded)  # every job row the ORM turns into an object (the old list: all)
    request.addfinalizer(lambda: event.remove(JobRow, "load", loaded))

    def listed(key: str) -> tuple[list[dict], int, int]:
        queries[0] = job_rows[0] = 0
        r = _get(http, "/api/batches", key)
        assert r.status_code == 200, r.text
        return r.json()["batches"], queries[0], job_rows[0]

    for tenant in (None, "acme", "globex", "initech"):
        key = keys.create_operator() if tenant is None else keys.create(tenant)
        body, n_queries, n_rows = listed(key)
        assert body == _old_list(state, Principal(tenant), NOW)
        assert len(body) == (7 if tenant is None else 6) and n_rows == 0 and n_queries == 3  # key, batches, sums
    op = keys.create_operator()
    before = listed(op)
    for b in range(6):  # ten times the jobs: still no job row read, the same number of queries
        state.create_batch(f"more{b}", "more", "spec", "", "tiny", [_job(f"more{b}", "acme", i) for i in range(400)])
    body, n_queries, n_rows = listed(op)
    assert (n_queries, n_rows) == before[1:] == (3, 0) and len(body) == 13
    assert body == _old_list(state, Principal(None), NOW)
