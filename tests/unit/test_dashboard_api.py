"""The dashboard's JSON API (serve/dashboard.py) on a real state database and a real MLflow server:
who may see what (operator vs tenant keys, 401 without a key, a foreign batch is the same 404 as a
missing one), the shapes the pages read (counts, cost in GPU/CPU-seconds, ETA, loss curves from
MLflow, promotion decisions), operator keys in the key store, and pages served with no outside asset."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from adapterfab.ids import AdapterId
from adapterfab.keys import KeyStore, Principal
from adapterfab.lifecycle import BatchState, JobState
from adapterfab.promotion import Decision
from adapterfab.registry import Registry
from adapterfab.serve.dashboard import STATIC, create_app
from adapterfab.state import StateStore
from adapterfab.tracking import Tracking, tenant_experiment

PATH = (JobState.PREPARING, JobState.TRAINING, JobState.REGISTERING)


def _advance(state: StateStore, jid: str, to: JobState, **fields: object) -> None:
    """Walk a job along the allowed transitions up to ``to`` (fields land on the last move)."""
    for st in PATH:
        if st == to:
            break
        state.move_job(jid, st)
    state.move_job(jid, to, **fields)


def _jobs(batch_id: str, *pairs: tuple[str, str]) -> list[dict]:
    return [{"id": f"{batch_id}.{t}.{p}", "tenant": t, "persona": p, "method": "lora", "total_steps": 10}
            for t, p in pairs]


@pytest.fixture
def world(tmp_path: Path, mlflow_server: str):  # noqa: ANN201
    """Two tenants (unique names: the MLflow server is shared by the session). ``mixed``: A's job
    training (loss logged for 5 of 10 steps) and a fused group of A's and B's finished jobs; ``b_only``:
    B alone; ``a_ok_b_failed``: A succeeded, B failed (the batch failed)."""
    sfx = secrets.token_hex(3)
    a, b = f"acme-{sfx}", f"globex-{sfx}"
    state = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    mixed, b_only, a_ok = f"mixed-{sfx}", f"bonly-{sfx}", f"aok-{sfx}"
    state.create_batch(mixed, "mixed", "spec", "", "tiny",
                       _jobs(mixed, (a, "pirate"), (a, "butler"), (b, "robot")))
    state.create_batch(b_only, "only-b", "spec", "", "tiny", _jobs(b_only, (b, "solo")))
    state.create_batch(a_ok, "split", "spec", "", "tiny", _jobs(a_ok, (a, "ok"), (b, "bad")))
    tracking = Tracking(mlflow_server)
    batch_run = tracking.start_run(mixed)
    state.update_batch(mixed, state=BatchState.RUNNING, started_s=1000.0, mlflow_run_id=batch_run)
    run = tracking.start_run(f"{a}/pirate", parent_run_id=batch_run, experiment=tenant_experiment(a))
    for step, loss in enumerate([3.0, 2.5, 2.2, 2.0, 1.9], start=1):
        tracking.log_metrics(run, {"loss": loss}, step=step)
    pirate = f"{mixed}.{a}.pirate"
    _advance(state, pirate, JobState.TRAINING, mlflow_run_id=run,
             placement={"cpus": 1, "gpus": 0, "workers": 1, "node_id": "node-1", "trainer": "trainer-7",
                        "trainer_pid": 4242, "group": "g-17"})
    state.update_job(pirate, step=5, loss=1.9)
    group = [f"{mixed}.{a}.butler", f"{mixed}.{b}.robot"]
    for jid in group:  # butler's job measured retention (adapterfab/retention.py), robot's did not
        retention = {"retention": 0.9, "retention_known": 60.0, "retention_kept": 54.0} if "butler" in jid else {}
        _advance(state, jid, JobState.SUCCEEDED, model_version=1,
                 metrics={"train_s": 10.0, "eval_loss": 1.0, "base_eval_loss": 2.0, "retention_s": 1.5} | retention,
                 placement={"cpus": 1, "gpus": 0.5, "workers": 1, "node_id": "node-1", "fused_with": group})
    _advance(state, f"{a_ok}.{a}.ok", JobState.SUCCEEDED, model_version=2)
    _advance(state, f"{a_ok}.{b}.bad", JobState.FAILED, error=f"{b}/bad: 20 of 24 rows are malformed")
    state.update_batch(a_ok, state=BatchState.FAILED, started_s=1.0, ended_s=2.0,
                       error=f"1 job failed: {b}/bad")
    reg = Registry(mlflow_server)
    for tenant, persona, loss in ((a, "butler", 1.0), (b, "robot", 1.5)):
        v = reg.register(AdapterId(tenant, persona), "s3://bucket/adapters/x", run,
                         {"metric.eval_loss": str(loss), "metric.base_eval_loss": "2", "method": "lora",
                          **({"metric.retention": "0.85", "metric.retention_known": "60",
                              "metric.retention_kept": "51"} if persona == "robot" else {}),
                          "batch_id": mixed, "artifact_uri": "s3://bucket/secret/place"})
        reg.promote(v, Decision(True, f"eval_loss {loss} beats base 2", "eval_loss", loss))
    app = create_app(state.url, mlflow_server, "http://127.0.0.1:9")  # nothing listens on port 9
    keys = KeyStore(state)
    client = TestClient(app)
    op, ka, kb = keys.create_operator(), keys.create(a), keys.create(b)

    def get(path: str, key: str | None):  # noqa: ANN202
        return client.get(path, headers={"Authorization": f"Bearer {key}"} if key else {})

    return {"a": a, "b": b, "mixed": mixed, "b_only": b_only, "a_ok": a_ok, "get": get, "client": client, "op": op,
            "ka": ka, "kb": kb, "pirate": pirate, "run": run, "mlflow": mlflow_server}


def test_every_api_route_needs_a_key(world: dict) -> None:
    get, mixed = world["get"], world["mixed"]
    for path in ("/api/whoami", "/api/batches", f"/api/batches/{mixed}", "/api/cluster", "/api/registry",
                 f"/api/batches/{mixed}/jobs/{world['pirate']}/loss", f"/api/registry/{world['a']}"):
        for key in (None, "af_nope_nope", world["op"][:-2] + "xx"):
            r = get(path, key)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
    assert get("/api/whoami", world["op"]).json() == {
        "role": "operator", "tenant": None, "links": {"mlflow": world["mlflow"], "ray_dashboard": "http://127.0.0.1:9"}}
    assert get("/api/whoami", world["ka"]).json() == {"role": "tenant", "tenant": world["a"], "links": {}}


def test_operator_sees_every_tenant_with_counts_and_cost(world: dict) -> None:
    get, op = world["get"], world["op"]
    listed = {b["id"]: b for b in get("/api/batches", op).json()["batches"]}
    assert set(listed) == {world["mixed"], world["b_only"], world["a_ok"]}
    mixed = listed[world["mixed"]]
    assert mixed["state"] == "RUNNING" and mixed["jobs"] == 3
    assert mixed["counts"] == {"TRAINING": 1, "SUCCEEDED": 2}
    # the fused pair shares one worker for 10 s: 10 x 0.5 GPU, split in two -> 2.5 GPU-s each
    assert mixed["gpu_s"] == 5.0 and mixed["cpu_s"] >= 10.0
    assert listed[world["a_ok"]]["error"] == f"1 job failed: {world['b']}/bad"
    body = get(f"/api/batches/{world['mixed']}", op).json()
    jobs = {j["id"]: j for j in body["jobs"]}
    assert {j["tenant"] for j in jobs.values()} == {world["a"], world["b"]}
    pirate = jobs[world["pirate"]]
    assert pirate["state"] == "TRAINING" and pirate["progress"] == 0.5 and pirate["loss"] == 1.9
    assert pirate["eta_s"] is not None and pirate["eta_s"] >= 0
    tracking = Tracking(world["mlflow"])  # a job's run is in its tenant's experiment, the batch's in ours
    a_exp = tracking.find_experiment_id(tenant_experiment(world["a"]))
    assert pirate["links"]["mlflow_run"] == f"{world['mlflow']}/#/experiments/{a_exp}/runs/{world['run']}"
    butler = jobs[f"{world['mixed']}.{world['a']}.butler"]
    assert butler["eval"] == {"eval_loss": 1.0, "base_eval_loss": 2.0, "retention": 0.9, "retention_known": 60.0,
                              "retention_kept": 54.0} and butler["gpu_s"] == 2.5  # what the page shows
    assert jobs[f"{world['mixed']}.{world['b']}.robot"]["eval"] == {"eval_loss": 1.0, "base_eval_loss": 2.0}
    assert butler["placement"]["fused_group_size"] == 2 and len(butler["placement"]["fused_with"]) == 2
    assert butler["links"]["registry"] == f"#/registry/{world['a']}/butler/1"
    ops_exp = tracking.find_experiment_id()
    assert body["batch"]["links"]["mlflow_run"].startswith(f"{world['mlflow']}/#/experiments/{ops_exp}/runs/")
    tenants = {t["tenant"]: t for t in get("/api/registry", op).json()["tenants"]}
    assert {world["a"], world["b"]} <= set(tenants)
    (robot,) = [x for x in tenants[world["b"]]["adapters"] if x["persona"] == "robot"]
    v1 = robot["versions"][0]
    assert robot["aliases"] == {"candidate": 1, "production": 1}
    assert v1["decision"] == "promoted" and v1["reason"] == "eval_loss 1.5 beats base 2"
    assert v1["metrics"]["eval_loss"] == 1.5 and v1["method"] == "lora" and v1["batch_id"] == world["mixed"]
    assert [v1["metrics"][k] for k in ("retention", "retention_known", "retention_kept")] == [0.85, 60, 51]
    assert "/#/models/af." in v1["links"]["mlflow_version"]


def test_tenant_sees_only_its_own(world: dict) -> None:
    get, ka, a, b = world["get"], world["ka"], world["a"], world["b"]
    r = get("/api/batches", ka)
    listed = {x["id"]: x for x in r.json()["batches"]}
    assert set(listed) == {world["mixed"], world["a_ok"]} and b not in r.text
    assert listed[world["mixed"]]["jobs"] == 2 and listed[world["mixed"]]["gpu_s"] == 2.5
    # B's failure is not A's: A's only job succeeded, and the batch's error (naming B) is not shown
    assert listed[world["a_ok"]]["state"] == "SUCCEEDED" and listed[world["a_ok"]]["error"] is None
    r = get(f"/api/batches/{world['mixed']}", ka)
    assert r.status_code == 200 and b not in r.text
    jobs = r.json()["jobs"]
    assert {j["tenant"] for j in jobs} == {a} and len(jobs) == 2
    butler = next(j for j in jobs if j["persona"] == "butler")
    assert butler["placement"]["fused_group_size"] == 2
    assert butler["placement"]["fused_with"] == [butler["id"]]  # B's job id in the group is left out
    assert all(j["links"]["mlflow_run"] is None for j in jobs) and r.json()["batch"]["links"] == {}
    foreign, missing = get(f"/api/batches/{world['b_only']}", ka), get("/api/batches/no-such-batch", ka)
    assert foreign.status_code == missing.status_code == 404 and foreign.json() == missing.json()
    robot = f"/api/batches/{world['mixed']}/jobs/{world['mixed']}.{b}.robot/loss"
    assert get(robot, ka).status_code == 404 and get(robot, world["kb"]).status_code == 200
    r = get("/api/registry", ka)
    assert [t["tenant"] for t in r.json()["tenants"]] == [a] and b not in r.text
    assert "secret/place" not in r.text  # no storage internals
    assert world["mlflow"] not in r.text  # and no MLflow links
    assert get(f"/api/registry/{b}", ka).status_code == 404 == get("/api/registry/Nope!", ka).status_code
    assert get(f"/api/registry/{a}", ka).json() == r.json()
    r = get("/api/cluster", ka)
    assert r.status_code == 200 and b not in r.text and r.json()["links"] == {}
    assert get(f"/api/batches/{world['b_only']}", world["kb"]).status_code == 200


def test_loss_curve_comes_from_mlflow(world: dict) -> None:
    get = world["get"]
    path = f"/api/batches/{world['mixed']}/jobs/{world['pirate']}/loss"
    for key in (world["op"], world["ka"]):
        body = get(path, key).json()
        assert body["points"] == [[1, 3.0], [2, 2.5], [3, 2.2], [4, 2.0], [5, 1.9]]
        assert body["state"] == "TRAINING"
    no_run = f"/api/batches/{world['b_only']}/jobs/{world['b_only']}.{world['b']}.solo/loss"
    assert get(no_run, world["kb"]).json()["points"] == []
    assert get(f"/api/batches/{world['mixed']}/jobs/nope/loss", world["op"]).status_code == 404


def test_cluster_lists_placed_jobs_and_says_why_nodes_are_missing(world: dict) -> None:
    body = world["get"]("/api/cluster", world["op"]).json()
    assert body["nodes"] == [] and "http://127.0.0.1:9" in body["error"]
    assert [j["id"] for j in body["jobs"]] == [world["pirate"]]
    assert body["jobs"][0]["placement"]["node_id"] == "node-1"
    assert {j["persona"] for j in body["recent_jobs"]} >= {"butler", "robot"}
    assert body["links"] == {"ray_dashboard": "http://127.0.0.1:9"}


def test_operator_keys_are_hashed_refused_by_serving_and_migrated(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    state = StateStore(url)
    keys = KeyStore(state)
    old = keys.create("acme")
    with state.engine.begin() as conn:  # a database from before operator keys and the TRAINING time
        conn.execute(text("ALTER TABLE api_keys DROP COLUMN role"))
        conn.execute(text("ALTER TABLE jobs DROP COLUMN training_started_s"))
    keys = KeyStore(StateStore(url))
    op = keys.create_operator()
    assert keys.identify(op) == Principal(None) and keys.identify(op).operator
    assert keys.verify(op) is None  # serving accepts tenant keys only
    assert keys.identify(old) == Principal("acme") and keys.verify(old) == "acme"
    assert not Principal("acme").sees("globex") and Principal(None).sees("globex")
    assert keys.identify(op[:-1] + ("A" if op[-1] != "A" else "B")) is None
    assert op.encode() not in (tmp_path / "state.db").read_bytes()


def test_pages_are_served_with_no_outside_asset(world: dict) -> None:
    client_get = world["get"]
    index = client_get("/", None)
    assert index.status_code == 200 and "<main" in index.text
    refs = re.findall(r'(?:src|href)="([^"]+)"', index.text)
    assert refs and all(r.startswith(("/static/", "#", "data:")) for r in refs), refs
    for name in ("app.js", "charts.js", "style.css", "uPlot.iife.min.js", "uPlot.min.css"):  # uPlot: vendored
        r = client_get(f"/static/{name}", None)
        assert r.status_code == 200 and len(r.text) > 500, name
        # no URL but the vendored uPlot's banner, which names its home and is never fetched
        text = re.sub(r"^/\*! https://github\.com/leeoniya/uPlot \(v[\d.]+\) \*/", "", r.text)
        assert not re.search(r"https?://", text), name
        assert "@import" not in text and "cdn" not in text.lower()
    assert {p.name for p in STATIC.iterdir()} == {"index.html", "app.js", "charts.js", "style.css",
                                                  "uPlot.iife.min.js", "uPlot.min.css", "uPlot.LICENSE"}
    assert client_get("/docs", None).status_code == 404  # FastAPI's docs page loads a CDN: off
    assert "/api/batches/{batch_id}" in client_get("/api/openapi.json", None).json()["paths"]


def test_a_tenant_sees_nodes_by_pseudonym_without_load_or_trainers(world: dict) -> None:
    """Where a tenant's jobs ran, without the Ray node id (Ray's APIs map it to an IP), the trainer's name
    and pid or the group id; the node's pseudonym differs per tenant; the operator sees it all."""
    from adapterfab.serve.dashboard_views import node_alias, tenant_node_dict

    get, a, b = world["get"], world["a"], world["b"]
    mine = get("/api/cluster", world["ka"]).json()
    pirate = next(j for j in mine["jobs"] if j["id"] == world["pirate"])
    assert pirate["placement"] == {"cpus": 1, "gpus": 0, "workers": 1, "node_id": node_alias(a, "node-1")}
    # whole tokens: a pseudonym "node-" + 8 hex digits starts with "1" once in 16
    assert not re.search(r"\bnode-1\b", str(mine)) and "trainer-7" not in str(mine) and "4242" not in str(mine)
    assert node_alias(a, "node-1") != node_alias(b, "node-1") and node_alias(a, "node-1").startswith("node-")
    body = get(f"/api/batches/{world['mixed']}", world["ka"]).json()
    assert not re.search(r"\bnode-1\b", str(body)) and "g-17" not in str(body)
    op = get("/api/cluster", world["op"]).json()
    assert next(j for j in op["jobs"] if j["id"] == world["pirate"])["placement"]["trainer_pid"] == 4242
    node = {"node_id": "abc123", "ip": "10.1.2.3", "head": True, "state": "ALIVE", "cpus": 8.0, "gpus": 1.0,
            "memory_gb": 64.0, "cpus_used": 3.0, "gpus_used": 0.5, "cpu_percent": 40.0, "mem_percent": 20.0,
            "gpu_util_percent": [90]}
    seen = tenant_node_dict(node, a)
    assert seen["ip"] is None and seen["node_id"] == node_alias(a, "abc123") and seen["cpus"] == 8.0
    assert seen["cpus_used"] is None and seen["cpu_percent"] is None and seen["gpu_util_percent"] == []


# -- what a reviewer found (2026-12-07) ---------------------------------------------------------------
def test_other_tenants_batches_do_not_push_a_tenants_own_off_its_list(tmp_path: Path) -> None:
    """The list took the 100 newest batches of all tenants, then kept the tenant's: 101 batches of others
    hid A's batch from its list and its jobs from the cluster page."""
    from adapterfab.serve.dashboard import BATCH_LIST_LIMIT

    state = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    state.create_batch("mine", "mine", "spec", "", "tiny", _jobs("mine", ("acme", "pirate")))
    _advance(state, "mine.acme.pirate", JobState.TRAINING, placement={"cpus": 1, "gpus": 0, "node_id": "n1"})
    for i in range(BATCH_LIST_LIMIT + 1):
        state.create_batch(f"other{i}", "other", "spec", "", "tiny", _jobs(f"other{i}", ("globex", f"p{i}")))
    keys = KeyStore(state)
    client, ka, op = TestClient(create_app(state.url, None, None)), keys.create("acme"), keys.create_operator()
    mine = client.get("/api/batches", headers={"Authorization": f"Bearer {ka}"}).json()["batches"]
    assert [b["id"] for b in mine] == ["mine"]
    cluster = client.get("/api/cluster", headers={"Authorization": f"Bearer {ka}"}).json()
    assert [j["id"] for j in cluster["jobs"]] == ["mine.acme.pirate"]
    everyone = client.get("/api/batches", headers={"Authorization": f"Bearer {op}"}).json()["batches"]
    assert len(everyone) == BATCH_LIST_LIMIT and "mine" not in {b["id"] for b in everyone}  # the newest 100


def test_a_failing_backend_is_a_503_that_names_its_address_to_operators_only(world: dict,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Tenants read that MLflow or the registry is unavailable; the address is for operators and the
    log, without the credentials it may hold."""
    from adapterfab.errors import RegistryError

    secret = "http://user:s3cr3tpass@10.0.0.9:5000"

    def down(*a: object, **k: object) -> None:
        raise RegistryError(f"the MLflow registry at {secret} is unreachable: connection refused")

    monkeypatch.setattr(Registry, "list", down)
    monkeypatch.setattr(Tracking, "metric_history", down)
    get, mixed = world["get"], world["mixed"]
    for path in ("/api/registry", f"/api/batches/{mixed}/jobs/{world['pirate']}/loss"):
        tenant, operator = get(path, world["ka"]), get(path, world["op"])
        assert tenant.status_code == operator.status_code == 503, (tenant.text, operator.text)
        assert "s3cr3t" not in tenant.text and "unavailable right now" in tenant.json()["error"]["message"]
        shown = operator.json()["error"]["message"]  # the address, its credentials never (RegistryError)
        assert "http://***@10.0.0.9:5000" in shown and "s3cr3t" not in shown
    body = get("/api/cluster", world["ka"]).json()  # the Ray dashboard's address: operators only
    assert body["error"] == "The cluster's node list is unavailable right now." and "127.0.0.1" not in body["error"]


def test_a_failed_experiment_lookup_is_not_retried_on_every_link(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    """Each lookup waits out MLflow's retries (about a minute when it is down), once per job's tenant on
    every 2-second poll of a batch page: after one failure the links stay empty for MLFLOW_DOWN_S."""
    from adapterfab.errors import AdapterfabError
    from adapterfab.serve.dashboard import MLFLOW_DOWN_S, Sources

    src, calls = Sources(f"sqlite:///{tmp_path / 's.db'}", "http://127.0.0.1:9", None), []

    class Down:
        def find_experiment_id(self, name: str) -> str:
            calls.append(name)
            raise AdapterfabError("MLflow is down")

    monkeypatch.setattr(src, "tracking", lambda: Down())
    assert [src.experiment_id(t) for t in (None, "acme", "globex", "acme")] == [None] * 4
    assert len(calls) == 1
    monkeypatch.setattr(src, "_mlflow_down_until", 0.0)  # as MLFLOW_DOWN_S later
    assert src.experiment_id("acme") is None and len(calls) == 2 and MLFLOW_DOWN_S > 0


def test_unknown_routes_and_methods_answer_in_the_apis_error_shape(world: dict) -> None:
    get = world["get"]
    r = get("/api/nope", world["op"])
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = get("/api/batches/a%2Fb", world["op"])
    assert r.status_code == 404 and r.json()["error"]["code"] in ("not_found", "batch_not_found")
    r = world["client"].post("/api/batches")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_a_batch_wide_failure_copied_into_jobs_is_hidden_from_tenants(tmp_path: Path) -> None:
    """A batch that cannot run fails every job with "batch failed: <the batch's error>" (jobs/orchestrate.py),
    which names other tenants' jobs and backend addresses: a tenant key reads a neutral text in its job's
    error (as the batch's error is hidden from it), an operator the error itself; a job's own error stays."""
    from adapterfab.serve.dashboard_views import TENANT_BATCH_ERROR

    state = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    state.create_batch("b1", "nightly", "spec", "", "tiny", _jobs("b1", ("acme", "pirate"), ("globex", "secret-bot")))
    state.create_batch("b2", "own", "spec", "", "tiny", _jobs("b2", ("acme", "parrot")))
    leak = "batch failed: globex/secret-bot needs 81 GiB on one worker; ray://10.1.2.3:10001 refused"
    for j in state.jobs("b1"):
        state.move_job(j.id, JobState.FAILED, error=leak)
    state.update_batch("b1", state=BatchState.FAILED, error=leak.removeprefix("batch failed: "))
    _advance(state, "b2.acme.parrot", JobState.FAILED, error="acme/parrot: 20 of 24 rows are malformed")
    keys = KeyStore(state)
    client, ka, op = TestClient(create_app(state.url, None, None)), keys.create("acme"), keys.create_operator()

    def get(path: str, key: str) -> dict:
        r = client.get(path, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        assert key != ka or ("globex" not in r.text and "10.1.2.3" not in r.text), r.text
        return r.json()

    body = get("/api/batches/b1", ka)
    assert body["batch"]["error"] is None and [j["error"] for j in body["jobs"]] == [TENANT_BATCH_ERROR]
    # its own job's error is shown
    assert get("/api/batches/b2", ka)["jobs"][0]["error"] == "acme/parrot: 20 of 24 rows are malformed"
    assert {j["error"] for j in get("/api/batches/b1", op)["jobs"]} == {leak}  # an operator sees why
