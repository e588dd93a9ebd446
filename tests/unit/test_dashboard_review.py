"""What a review of the dashboard found (2026-12-07), on a real state database with fakes only at the
edges (MLflow's client, the registry): experiment lookups once per tenant and a missing experiment
remembered, the loss route reading one job, the lists reading their batches' jobs in a fixed number of
queries with the same answers, backend credentials kept off the page, and API answers no cache keeps.
The full operator/tenant matrix against a real MLflow server is in test_dashboard_api.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from adapterfab.keys import KeyStore, Principal
from adapterfab.lifecycle import BatchState, JobState
from adapterfab.serve import dashboard_views as views
from adapterfab.serve.dashboard import create_app
from adapterfab.state import StateStore
from adapterfab.tracking import EXPERIMENT, tenant_experiment

MLFLOW = "http://user:s3cr3t@mlflow.example:5000"
RAY = "http://admin:raypw@127.0.0.1:9"  # nothing listens on port 9


class FakeTracking:
    """MLflow's side: acme's experiment exists, no other does yet; every lookup is counted."""

    def __init__(self) -> None:
        self.lookups: list[str] = []

    def find_experiment_id(self, name: str) -> str | None:
        self.lookups.append(name)
        return "7" if name == tenant_experiment("acme") else None

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float, float]]:
        return [(1, 2.0, 0.0)]


def _jobs(batch_id: str, tenant: str, n: int, runs: bool) -> list[dict]:
    return [{"id": f"{batch_id}.{tenant}.p{i}", "tenant": tenant, "persona": f"p{i}", "method": "lora",
             "total_steps": 10, **({"mlflow_run_id": f"run-{tenant}-{i}"} if runs else {})} for i in range(n)]


@pytest.fixture
def dash(tmp_path: Path) -> dict:
    """Batch ``big``: 5 jobs each of acme and globex with MLflow runs, 5 of initech without; the batch
    has a run of its own."""
    state = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    state.create_batch("big", "big", "spec", "", "tiny",
                       _jobs("big", "acme", 5, True) + _jobs("big", "globex", 5, True)
                       + _jobs("big", "initech", 5, False))
    state.update_batch("big", state=BatchState.RUNNING, mlflow_run_id="batch-run")
    app = create_app(state.url, MLFLOW, RAY)
    src, tracking = app.state.sources, FakeTracking()
    src._tracking = tracking
    keys = KeyStore(state)
    client = TestClient(app)
    op, ka = keys.create_operator(), keys.create("acme")

    def get(path: str, key: str):  # noqa: ANN202
        return client.get(path, headers={"Authorization": f"Bearer {key}"})

    return {"state": state, "src": src, "tracking": tracking, "get": get, "op": op, "ka": ka}


def test_the_batch_page_looks_up_each_tenants_experiment_once_and_remembers_a_missing_one(
        dash: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """It looked one up per job, jobs without a run too, and asked again on every 2-second poll while an
    experiment did not exist yet (a batch still pending)."""
    get, op, lookups = dash["get"], dash["op"], dash["tracking"].lookups
    body = get("/api/batches/big", op).json()
    assert sorted(lookups) == sorted([EXPERIMENT, tenant_experiment("acme"), tenant_experiment("globex")])
    links = {j["id"]: j["links"]["mlflow_run"] for j in body["jobs"]}
    assert links["big.acme.p0"] == "http://***@mlflow.example:5000/#/experiments/7/runs/run-acme-0"
    assert links["big.globex.p0"] is None and links["big.initech.p0"] is None
    assert body["batch"]["links"] == {"mlflow_run": None}
    get("/api/batches/big", op)
    assert len(lookups) == 3  # found or not, nothing is asked again at once
    monkeypatch.setattr(dash["src"], "_no_experiment_until", {})  # as NO_EXPERIMENT_S later
    get("/api/batches/big", op)
    assert sorted(lookups[3:]) == sorted([EXPERIMENT, tenant_experiment("globex")])  # acme's is known


def test_the_loss_route_reads_one_job_and_404s_for_anyone_elses(dash: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """It read every job of the batch to find one: a tenant's batch page asks per job every 2 s."""
    import adapterfab.state as state_mod

    get, state = dash["get"], dash["state"]
    state.create_batch("other", "other", "spec", "", "tiny", _jobs("other", "acme", 1, True))
    read, view = [], state_mod._view
    monkeypatch.setattr(state_mod, "_view", lambda row: read.append(row.id) or view(row))
    r = get("/api/batches/big/jobs/big.acme.p3/loss", dash["ka"])
    assert r.status_code == 200 and r.json()["points"] == [[1, 2.0]]
    assert read == ["big.acme.p3"]
    for path in ("/api/batches/big/jobs/big.globex.p0/loss",  # another tenant's job
                 "/api/batches/other/jobs/big.acme.p0/loss",  # its own job, asked for under another batch
                 "/api/batches/big/jobs/other.acme.p0/loss",
                 "/api/batches/big/jobs/nope/loss"):
        r = get(path, dash["ka"])
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", path
    assert get("/api/batches/big/jobs/big.globex.p0/loss", dash["op"]).status_code == 200


def test_the_lists_read_their_batches_jobs_in_a_fixed_number_of_queries(dash: dict) -> None:
    """The batch list and the cluster page made a query per listed batch (up to 100 each poll); the
    answers are what each batch's own jobs give, a tenant's only its own."""
    get, state, src = dash["get"], dash["state"], dash["src"]
    kg = KeyStore(state).create("globex")
    queries = [0]
    event.listen(src.state.engine, "before_cursor_execute", lambda *a, **k: queries.__setitem__(0, queries[0] + 1))

    def count(path: str, key: str) -> int:
        queries[0] = 0
        assert get(path, key).status_code == 200
        return queries[0]

    few = {(path, key): count(path, key) for path in ("/api/batches", "/api/cluster") for key in (dash["op"], kg)}
    for i in range(12):
        state.create_batch(f"b{i}", "b", "spec", "", "tiny", _jobs(f"b{i}", "globex", 2, False)
                           + _jobs(f"b{i}", "initech", 1, False))
        state.move_job(f"b{i}.globex.p0", JobState.CANCELLED)
        state.move_job(f"b{i}.globex.p1", JobState.PREPARING)
    many = {(path, key): count(path, key) for path, key in few}
    assert many == few
    running = [j["id"] for j in get("/api/cluster", kg).json()["jobs"]]
    assert running == [f"b{i}.globex.p1" for i in reversed(range(12))]
    for key, who in ((dash["op"], Principal(None)), (kg, Principal("globex"))):
        listed = get("/api/batches", key).json()["batches"]
        expected = [views.batch_dict(b, [j for j in state.jobs(b.id) if who.sees(j.tenant)], who, 0.0)
                    for b in state.list_batches(limit=100, tenant=who.tenant)]
        assert listed == expected and len(listed) == 13
    assert "initech" not in get("/api/batches", kg).text


def test_backend_credentials_never_reach_the_page(dash: dict) -> None:
    """The MLflow and Ray dashboard URLs may carry user:password@; links and an operator's error texts
    showed them."""
    get, op, src = dash["get"], dash["op"], dash["src"]
    who = get("/api/whoami", op).json()
    assert who["links"] == {"mlflow": "http://***@mlflow.example:5000", "ray_dashboard": "http://***@127.0.0.1:9"}
    cluster = get("/api/cluster", op).json()
    assert "http://***@127.0.0.1:9" in cluster["error"] and cluster["links"] == {"ray_dashboard": "http://***@127.0.0.1:9"}

    class Unreachable:
        def list(self, tenant: str | None) -> list:
            raise ConnectionError(f"HTTPConnectionPool(host='mlflow.example'): {MLFLOW}/api refused")

    src._registry = Unreachable()
    registry = get("/api/registry", op)
    assert registry.status_code == 503 and "http://***@mlflow.example:5000" in registry.json()["error"]["message"]
    for path in ("/api/whoami", "/api/cluster", "/api/registry", "/api/batches/big", "/api/batches"):
        text = get(path, op).text
        assert "s3cr3t" not in text and "raypw" not in text, (path, text)


def test_api_answers_are_kept_by_no_cache(dash: dict) -> None:
    """Each answer is one key's view: a shared cache must not hand it to another key."""
    for path, key in (("/api/batches", dash["ka"]), ("/api/batches/big", dash["op"]), ("/api/whoami", "bad")):
        r = dash["get"](path, key)
        assert r.headers["cache-control"] == "no-store, private" and r.headers["vary"] == "Authorization", path
