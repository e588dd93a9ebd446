"""What a third review of the dashboard found (2026-12): the cluster page (``GET /api/cluster``, polled
every 2 s) still read every job of the 100 listed batches to show the active ones and the 20 latest
ended (200 batches x 500 jobs: 50,000 job rows, 2.9 s a poll); and a job whose metrics hold
``"train_s": null`` (how the state database stores a NaN) broke the batch page's cost (a 500), where the
batch list's SQL took the training time instead.

The dashboard runs in process over HTTP (``TestClient``) on a real SQLite state database with the real
``KeyStore``; job rows read are counted with a SQLAlchemy load listener."""

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
from adapterfab.state import JobRow, StateStore

NOW = 10_000.0
TENANTS = ("acme", "globex", "initech")
BATCHES, PER_BATCH, LISTED = 10, 60, 8


def _get(http: TestClient, path: str, key: str) -> Any:
    return http.get(path, headers={"Authorization": f"Bearer {key}"})


@pytest.fixture
def state(tmp_path: Path) -> StateStore:
    return StateStore(f"sqlite:///{tmp_path / 'state.db'}")


@pytest.fixture
def http(state: StateStore, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    """The dashboard at a fixed clock (cost and ETA), answering errors as a 500 (not raising them)."""
    monkeypatch.setattr(dashboard, "time", types.SimpleNamespace(time=lambda: NOW, monotonic=dashboard.time.monotonic))
    return TestClient(dashboard.create_app(state.url, None, None), raise_server_exceptions=False)


@pytest.fixture
def job_rows(request: pytest.FixtureRequest) -> list[int]:
    """How many job rows the ORM has turned into objects (reset it to 0 before a request)."""
    n = [0]

    def loaded(*_: Any) -> None:
        n[0] += 1

    event.listen(JobRow, "load", loaded)
    request.addfinalizer(lambda: event.remove(JobRow, "load", loaded))
    return n


# -- the cluster page reads only the jobs it shows ------------------------------------------------
def _job(b: int, i: int) -> dict[str, Any]:
    """A fixed mix (no randomness): every state; no placement, an empty one, one on a node, and one fused
    with jobs of this batch (of any tenant), of another batch and of none; ends that tie, none and 0."""
    bid, tenant = f"b{b}", TENANTS[(i + b) % 3]
    state = list(JobState)[i % 7]
    fused = [f"{bid}.{TENANTS[(k + b) % 3]}.p{k}" for k in (i - 3, i + 1, i + 3, i + 6)]
    fused += [f"b{b - 1}.acme.p{i}", "ghost"]
    placement = [None, {}, {"cpus": 2, "gpus": 1, "workers": 2, "node_id": f"n{i % 3}", "trainer_pid": 7},
                 {"cpus": 1, "gpus": 0.5, "node_id": "n1", "fused_with": fused}][i % 4]
    ended = [None, 0.0, 4000.0, 4000.0 + b, 3000.0 + i % 3][i % 5] if state.terminal else None
    if b < BATCHES - LISTED:  # the oldest batches (not listed) ended last: they must not show
        ended = 9000.0 if state.terminal else None
    return {"id": f"{bid}.{tenant}.p{i}", "tenant": tenant, "persona": f"p{i}", "method": "lora",
            "state": state.value, "step": (i * 37) % 130, "total_steps": 100,
            "metrics": {"train_s": 30.0 + i} if i % 2 else {}, "placement": placement,
            "started_s": 1000.0 + i, "ended_s": ended, "training_started_s": 1200.0 + i}


def _world(state: StateStore) -> None:
    for b in range(BATCHES):
        state.create_batch(f"b{b}", f"batch {b}", "spec", "", "tiny", [_job(b, i) for i in range(PER_BATCH)])
        state.update_batch(f"b{b}", state="RUNNING", created_s=100.0 + b)


def _old_cluster(state: StateStore, who: Principal, now: float, cut: bool = True) -> tuple[list[dict], list[dict]]:
    """What the cluster page answered before (702bd13): every job of every listed batch, picked in Python
    (``cut=False``: every ended job it picked from, not the latest 20)."""
    mine = None if who.operator else who.tenant
    rows = state.list_batches(limit=dashboard.BATCH_LIST_LIMIT, tenant=mine)
    jobs_of = state.jobs_of_batches([b.id for b in rows], tenant=mine)
    active, recent = [], []
    for jobs in (jobs_of.get(b.id, []) for b in rows):
        ids = {j.id for j in jobs}
        for j in jobs:
            if j.state in views.ACTIVE:
                active.append(views.job_dict(j, who, now, ids))
            elif j.state.terminal and j.placement and j.state != JobState.CANCELLED:
                recent.append(views.job_dict(j, who, now, ids))
    recent = sorted(recent, key=lambda j: j["ended_s"] or 0, reverse=True)
    return active, recent[:dashboard.CLUSTER_RECENT_JOBS] if cut else recent


def test_the_cluster_page_answers_as_before_reading_only_the_jobs_it_shows(
        state: StateStore, http: TestClient, job_rows: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dashboard, "BATCH_LIST_LIMIT", LISTED)  # so that some batches are not listed
    _world(state)
    keys = KeyStore(state)
    for tenant in (None, *TENANTS, "hooli"):
        who = Principal(tenant)
        job_rows[0] = 0
        r = _get(http, "/api/cluster", keys.create_operator() if tenant is None else keys.create(tenant))
        read, body = job_rows[0], r.json()
        assert r.status_code == 200, r.text
        assert (body["jobs"], body["recent_jobs"]) == _old_cluster(state, who, NOW)
        shown = len(body["jobs"]) + len(body["recent_jobs"])
        assert read == shown  # before: every job of the listed batches (480, 160 a tenant)
        if tenant == "hooli":
            assert shown == 0
            continue
        # the mix holds what the page picks from: ties at the cut, fused groups cut to what `who` sees
        recent, ended = body["recent_jobs"], _old_cluster(state, who, NOW, cut=False)[1]
        assert len(recent) == dashboard.CLUSTER_RECENT_JOBS < len(ended) and len(body["jobs"]) > 20
        assert ended[len(recent)]["ended_s"] == recent[-1]["ended_s"]  # a tie at the cut: the list's order
        assert all(j["batch_id"] not in ("b0", "b1") for j in recent)
        fused = [j["placement"] for j in [*body["jobs"], *recent] if "fused_with" in (j["placement"] or {})]
        assert fused and all(p["fused_group_size"] == 6 for p in fused)
        assert 0 < max(len(p["fused_with"]) for p in fused) < 6
        assert ("trainer_pid" in r.text) == (tenant is None)
    monkeypatch.setattr(dashboard, "BATCH_LIST_LIMIT", 100)
    op = keys.create_operator()
    before = _get(http, "/api/cluster", op).json()
    for b in range(BATCHES, BATCHES + 4):  # newer batches of jobs that ended before: none of them is read
        jobs = [_job(b, i) | {"state": "SUCCEEDED", "ended_s": 100.0 + i} for i in range(200)]
        state.create_batch(f"b{b}", "old news", "spec", "", "tiny", jobs)
        state.update_batch(f"b{b}", created_s=100.0 + b)
    job_rows[0] = 0
    after = _get(http, "/api/cluster", op).json()
    assert (after["jobs"], after["recent_jobs"]) == (before["jobs"], before["recent_jobs"])
    assert job_rows[0] == len(after["jobs"]) + 20
    assert (after["jobs"], after["recent_jobs"]) == _old_cluster(state, Principal(None), NOW)


# -- a null train_s costs its training time, as in the batch list --------------------------------
def test_a_null_train_s_costs_the_training_time_on_the_batch_page_as_in_the_batch_list(
        state: StateStore, http: TestClient) -> None:
    placed = {"cpus": 2, "gpus": 1, "workers": 1, "node_id": "n1"}
    ended = {"state": "SUCCEEDED", "training_started_s": 1000.0, "ended_s": 1600.0, "placement": placed}
    state.create_batch("b", "b", "spec", "", "tiny", [
        {"id": "b.acme.nan", "tenant": "acme", "persona": "nan", "method": "lora", **ended,
         "metrics": {"train_s": float("nan")}},  # stored as null (state.FiniteJSON)
        {"id": "b.acme.null", "tenant": "acme", "persona": "null", "method": "lora", **ended,
         "metrics": {"train_s": None, "eval_loss": 1.5}},
        {"id": "b.acme.timed", "tenant": "acme", "persona": "timed", "method": "lora", **ended,
         "metrics": {"train_s": 30.0}},
        {"id": "b.globex.running", "tenant": "globex", "persona": "running", "method": "lora", "state": "TRAINING",
         "training_started_s": 9000.0, "metrics": {"train_s": None}, "placement": placed}])
    assert state.job("b.acme.nan").metrics == {"train_s": None}
    keys = KeyStore(state)
    op, acme = keys.create_operator(), keys.create("acme")
    for key, costs in ((op, (600.0, 600.0, 30.0, 1000.0)), (acme, (600.0, 600.0, 30.0))):
        r = _get(http, "/api/batches/b", key)
        assert r.status_code == 200, r.text  # before: a TypeError (float(None)), a 500
        page = r.json()
        assert tuple(j["gpu_s"] for j in page["jobs"]) == costs  # ended - training start; now - it
        assert tuple(j["cpu_s"] for j in page["jobs"]) == tuple(2 * c for c in costs)
        listed = _get(http, "/api/batches", key).json()["batches"]
        assert [(b["gpu_s"], b["cpu_s"]) for b in listed] == [(page["batch"]["gpu_s"], page["batch"]["cpu_s"])]
        assert page["batch"]["gpu_s"] == sum(costs)
        cluster = _get(http, "/api/cluster", key)  # its jobs' cost: the same rule
        assert cluster.status_code == 200, cluster.text
        shown = {j["id"]: j["gpu_s"] for j in [*cluster.json()["jobs"], *cluster.json()["recent_jobs"]]}
        assert shown == {j["id"]: j["gpu_s"] for j in page["jobs"]}
