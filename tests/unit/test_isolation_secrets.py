"""Tenant isolation and secrets, against the real code paths:

- serving: a tenant's key lists, uses and looks up only its own adapters, on the global and the
  per-tenant routes; another tenant's adapter gets byte for byte the answer of a missing one, and the
  registry resolver is never even asked about it (also when tenant ids share a prefix: acme, acme-corp);
- registry (real MLflow server): ``Registry.list`` and ``adapterfab registry ls --tenant`` return one
  tenant's registered models; a tenant id cannot widen the MLflow filter (``%``, quotes);
- dashboard: hostile tenant and batch path segments are the same 404 as a foreign tenant (the full
  operator/tenant matrix is in test_dashboard_api.py::test_tenant_sees_only_its_own);
- artifact keys: every key of an adapter lies under ``adapters/<tenant>/<persona>/``, no job id escapes
  it, and a manifest cannot pull another tenant's files;
- keys: stored as sha256 only, compared with ``hmac.compare_digest``;
- secrets: API keys and S3 credentials never reach logs, CLI output, error messages or MLflow params.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from adapterfab.errors import AdapterNotFound, InvalidId, SpecError, StorageError
from adapterfab.ids import ID_PATTERN, AdapterId, basis_prefix
from adapterfab.keys import KeyStore
from adapterfab.registry import AdapterVersion, RegisteredAdapter, Registry
from adapterfab.serve.api import make_api, model_not_found
from adapterfab.state import StateStore
from adapterfab.storage import LocalStore
from adapterfab.tracking import Tracking

CLI = str(Path(sys.executable).with_name("adapterfab"))
MSGS = [{"role": "user", "content": "Hi"}]
AWS_KEY_ID, AWS_SECRET = "AKIAHOSTILETEST7Q2Z", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzz9Secret"
AWS_TOKEN = "FwoGZXIvYXdzEHostileSessionToken/42"


class Catalog:
    """tenant/persona -> versions; ``resolve`` records what it was asked, ``everything`` ignores the
    tenant it is given (a leaky catalog: the API must still show only the caller's own)."""

    def __init__(self, keys: list[str]) -> None:
        self.keys, self.asked = keys, []

    def resolve(self, aid: AdapterId) -> AdapterVersion:
        self.asked.append(aid.tenant)
        if aid.key not in self.keys or aid.version not in (None, 1):
            raise AdapterNotFound(str(aid))
        return AdapterVersion(aid.unversioned().with_version(1), "src", None, {}, ("production",), 0.0)

    def everything(self, tenant: str) -> list[RegisteredAdapter]:
        return [RegisteredAdapter(AdapterId(*k.split("/")), {"production": 1},
                                  [self.resolve(AdapterId(*k.split("/")))]) for k in self.keys]


class NeverCalled:
    async def generate(self, *a, **k):  # noqa: ANN002, ANN003, ANN201
        raise AssertionError("the backend must not be reached")
        yield


@pytest.fixture
def serving(tmp_path: Path) -> dict:
    cat = Catalog(["acme/pirate", "acme-corp/pirate", "globex/parrot"])
    state = StateStore(f"sqlite:///{tmp_path / 's.db'}")
    keys = KeyStore(state)
    app = make_api(NeverCalled(), keys.verify, cat.resolve, catalog=cat.everything,
                   lister=lambda t: [k for k in cat.keys if k.split("/")[0] == t])
    http = TestClient(app)
    ks = {t: keys.create(t) for t in ("acme", "acme-corp", "globex")}
    ks["operator"] = keys.create_operator()

    def call(method: str, path: str, tenant: str, body: dict | None = None):  # noqa: ANN202
        return http.request(method, path, json=body, headers={"Authorization": f"Bearer {ks[tenant]}"})

    return {"call": call, "cat": cat, "state": state, "keys": ks}


FOREIGN = ["globex/parrot", "globex/parrot@1", "globex/parrot@production", "acme-corp/pirate",
           "acme-corp/pirate@1"]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions",
                                   "/tenants/acme/v1/chat/completions", "/tenants/acme/v1/completions"])
def test_another_tenants_adapter_is_exactly_a_missing_one(serving: dict, route: str) -> None:
    call, cat = serving["call"], serving["cat"]
    for model in FOREIGN:
        missing = model.replace("parrot", "ghost").replace("pirate", "ghost")
        body = {"model": model, "messages": MSGS} if "chat" in route else {"model": model, "prompt": "x"}
        r = call("POST", route, "acme", body)
        gone = call("POST", route, "acme", {**body, "model": missing})
        assert r.status_code == gone.status_code == 404
        assert r.json() == model_not_found(model).body() and gone.json() == model_not_found(missing).body()
    assert set(cat.asked) <= {"acme"}  # nobody asked the registry about another tenant's adapter


@pytest.mark.parametrize("path,method", [
    ("/tenants/{t}/v1/models", "GET"), ("/tenants/{t}/v1/chat/completions", "POST"),
    ("/tenants/{t}/v1/completions", "POST"), ("/tenants/{t}/v1/registry/adapters", "GET"),
    ("/tenants/{t}/v1/registry/adapters/parrot", "GET"),
    ("/tenants/{t}/v1/registry/adapters/parrot/1", "GET"),
])
def test_another_tenants_routes_are_exactly_a_missing_tenants(serving: dict, path: str, method: str) -> None:
    call = serving["call"]
    body = {"model": "parrot", "messages": MSGS, "prompt": "x"} if method == "POST" else None
    if body is not None and "chat" in path:
        body.pop("prompt")
    elif body is not None:
        body.pop("messages")
    other = call(method, path.format(t="globex"), "acme", body)
    nobody = call(method, path.format(t="nobody"), "acme", body)
    prefix = call(method, path.format(t="acme-corp"), "acme", body)
    assert other.status_code == nobody.status_code == prefix.status_code == 404
    assert other.json() == nobody.json() == prefix.json()
    assert call(method, path.format(t="globex"), "globex", body).status_code != 404  # the owner gets through


def test_models_and_registry_list_only_the_callers_own(serving: dict) -> None:
    call = serving["call"]
    for tenant, want in (("acme", ["acme/pirate"]), ("acme-corp", ["acme-corp/pirate"]),
                         ("globex", ["globex/parrot"])):
        for route in ("/v1", f"/tenants/{tenant}/v1"):
            assert [m["id"] for m in call("GET", f"{route}/models", tenant).json()["data"]] == ["base", *want]
            listed = call("GET", f"{route}/registry/adapters", tenant)  # the catalog leaks; the API does not
            assert [a["id"] for a in listed.json()["data"]] == want
        assert call("GET", "/v1/registry/adapters/parrot", tenant).status_code == (
            200 if tenant == "globex" else 404)


def test_operator_and_bad_keys_get_nothing_from_serving(serving: dict) -> None:
    call = serving["call"]
    for path in ("/v1/models", "/v1/registry/adapters"):
        r = call("GET", path, "operator")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    acme = serving["keys"]["acme"]
    key_id = acme.split("_")[1]
    forged = [f"af_{key_id}_" + "x" * 32, acme + "x", acme[:-1], acme.upper(), f"af_{key_id}", "af__" + acme,
              acme.replace("_", "-"), "a" * 10_000]
    for bad in forged:
        serving["keys"]["bad"] = bad
        assert call("GET", "/v1/models", "bad").status_code == 401, bad[:40]
    assert call("GET", "/v1/models", "acme").status_code == 200


# -- registry (MLflow) -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registered(mlflow_server: str) -> dict:
    sfx = secrets.token_hex(3)
    a, a_corp, b = f"iso{sfx}", f"iso{sfx}-corp", f"other{sfx}"
    reg = Registry(mlflow_server)
    for tenant, persona in ((a, "pirate"), (a_corp, "pirate"), (b, "robot")):
        reg.register(AdapterId(tenant, persona), "s3://bucket/x", None, {"method": "lora"})
    return {"reg": reg, "a": a, "a_corp": a_corp, "b": b, "uri": mlflow_server}


def test_registry_lists_one_tenant_and_tags_each_model_with_it(registered: dict) -> None:
    reg, a, a_corp, b = registered["reg"], registered["a"], registered["a_corp"], registered["b"]
    assert [str(r.id) for r in reg.list(a)] == [f"{a}/pirate"]  # not acme-corp's, although LIKE 'af.iso..%'
    assert [str(r.id) for r in reg.list(a_corp)] == [f"{a_corp}/pirate"]
    assert [str(r.id) for r in reg.list(b)] == [f"{b}/robot"]
    for tenant in (a, a_corp, b):
        for ra in reg.list(tenant):
            model = reg.client.get_registered_model(ra.id.registry_name)
            assert ra.id.registry_name == f"af.{tenant}.{ra.id.persona}"
            assert model.tags["adapterfab.tenant"] == tenant


@pytest.mark.parametrize("hostile", ["%", "_", "iso%", "x' OR name LIKE '%", "../x", "", "ISO"])
def test_a_tenant_id_cannot_widen_the_registry_filter(registered: dict, hostile: str) -> None:
    with pytest.raises(InvalidId):
        registered["reg"].list(hostile)


def test_cli_registry_ls_shows_one_tenant(registered: dict, tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "ADAPTERFAB_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": registered["uri"]}
    r = subprocess.run([CLI, "registry", "ls", "--tenant", registered["a"], "--json"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert [x["id"] for x in json.loads(r.stdout)] == [f"{registered['a']}/pirate"]
    r = subprocess.run([CLI, "registry", "ls", "--tenant", "%", "--json"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 2 and "invalid tenant id" in r.stderr and r.stdout.strip() == ""


def test_each_tenant_has_its_own_mlflow_experiment(registered: dict) -> None:
    from adapterfab.tracking import EXPERIMENT, tenant_experiment

    t, a, a_corp = Tracking(registered["uri"]), registered["a"], registered["a_corp"]
    runs = {tn: t.start_run(f"{tn}/pirate", tags={"adapterfab.tenant": tn}, experiment=tenant_experiment(tn))
            for tn in (a, a_corp)}
    for tn, other in ((a, a_corp), (a_corp, a)):
        exp = t.client.get_experiment_by_name(tenant_experiment(tn))
        assert exp.name == f"{EXPERIMENT}/tenant/{tn}" and exp.tags["adapterfab.tenant"] == tn
        assert t.client.get_run(runs[tn]).info.experiment_id == exp.experiment_id
        assert [r.info.run_id for r in t.client.search_runs([exp.experiment_id])] == [runs[tn]]
        assert exp.experiment_id != t.client.get_experiment_by_name(tenant_experiment(other)).experiment_id
    for hostile in ("../x", "", "ISO", "a/b", "x" * 64):
        with pytest.raises(InvalidId):
            tenant_experiment(hostile)


# -- dashboard -------------------------------------------------------------------------------------


@pytest.mark.parametrize("segment", ["%2e%2e", "..%2F..%2Fetc", "ACME", "%D0%B0cme", "a" * 300, "%25",
                                     "acme-corp"])
def test_dashboard_hostile_segments_are_the_foreign_404(registered: dict, tmp_path: Path,
                                                        segment: str) -> None:
    from adapterfab.serve.dashboard import create_app

    state = StateStore(f"sqlite:///{tmp_path / 'd.db'}")
    key = KeyStore(state).create("acme")
    http = TestClient(create_app(state.url, registered["uri"], None))
    h = {"Authorization": f"Bearer {key}"}
    foreign_reg = http.get(f"/api/registry/{registered['b']}", headers=h)
    foreign_batch = http.get("/api/batches/someone-elses", headers=h)
    assert foreign_reg.status_code == foreign_batch.status_code == 404
    r = http.get(f"/api/registry/{segment}", headers=h)
    assert r.status_code == 404 and "acme" not in r.text.replace(segment, "")
    r = http.get(f"/api/batches/{segment}", headers=h)
    assert r.status_code == 404
    assert http.get("/api/registry/acme", headers=h).status_code == 200


# -- artifact keys ---------------------------------------------------------------------------------

valid_ids = st.from_regex(rf"\A{ID_PATTERN}\Z")


@settings(max_examples=200, deadline=None)
@given(tenant=valid_ids, persona=valid_ids, job=st.text(max_size=80))
def test_no_job_id_escapes_its_tenants_prefix(tenant: str, persona: str, job: str) -> None:
    aid = AdapterId(tenant, persona)
    try:
        prefix = aid.artifact_prefix(job)
    except InvalidId:
        return
    assert prefix.startswith(f"adapters/{tenant}/{persona}/") and prefix.endswith("/")
    parts = prefix.split("/")
    assert parts[:3] == ["adapters", tenant, persona] and len(parts) == 5  # exactly one more segment
    assert ".." not in parts and "" not in parts[:-1]


@settings(max_examples=200, deadline=None)
@given(a=st.tuples(valid_ids, valid_ids), b=st.tuples(valid_ids, valid_ids),
       ja=st.from_regex(r"\A[a-z0-9][a-z0-9.-]{0,20}\Z"), jb=st.from_regex(r"\A[a-z0-9][a-z0-9.-]{0,20}\Z"))
def test_two_adapters_prefixes_never_nest(a: tuple, b: tuple, ja: str, jb: str) -> None:
    try:
        pa, pb = AdapterId(*a).artifact_prefix(ja), AdapterId(*b).artifact_prefix(jb)
    except InvalidId:
        return
    if pa.startswith(pb) or pb.startswith(pa):
        assert a == b and ja == jb


@pytest.mark.parametrize("job", ["../globex", "..", "a/../../globex", "/abs", "b1..x", "x/y", "b1\x00", "",
                                 "B1", "a" * 300])
def test_hostile_job_and_basis_ids_are_refused(job: str) -> None:
    with pytest.raises(InvalidId):
        AdapterId("acme", "pirate").artifact_prefix(job)
    with pytest.raises(InvalidId):
        basis_prefix(job)


def test_a_manifest_cannot_pull_another_tenants_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "adapter_model.safetensors").write_bytes(b"globex's weights")
    globex = store.upload_dir(theirs, AdapterId("globex", "robot").artifact_prefix("b1.globex.robot"))
    mine = AdapterId("acme", "pirate").artifact_prefix("b1.acme.pirate")
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "MANIFEST.json").write_text(json.dumps({"files": {
        "../../../globex/robot/b1.globex.robot/adapter_model.safetensors": {"sha256": "0" * 64}}}))
    store.put_file(evil / "MANIFEST.json", mine + "MANIFEST.json")
    with pytest.raises(StorageError, match="outside the folder"):
        store.download_dir(store.uri(mine), tmp_path / "got")
    assert not list((tmp_path / "got").rglob("*.safetensors"))
    with pytest.raises(StorageError, match="escapes"):
        store.get_file("../outside", tmp_path / "x")
    assert store.download_dir(globex, tmp_path / "ok")  # the owner's own download still works


def test_serving_cache_folders_are_per_tenant(tmp_path: Path) -> None:
    from adapterfab.serve.backend import _version_folder

    aid, folder = _version_folder("acme/pirate@3", tmp_path)
    assert folder == tmp_path / "acme" / "pirate" / "3"
    for bad in ("../globex/robot@1", "acme/../globex@1", "/abs/x@1", "acme/pirate@../../1"):
        with pytest.raises(InvalidId):
            _version_folder(bad, tmp_path)


# -- keys ------------------------------------------------------------------------------------------


def test_keys_are_stored_as_sha256_only(tmp_path: Path) -> None:
    state = StateStore(f"sqlite:///{tmp_path / 'k.db'}")
    ks = KeyStore(state)
    key, op = ks.create("acme"), ks.create_operator()
    with state.engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(text("SELECT * FROM api_keys"))]
    assert len(rows) == 2
    by_hash = {r["sha256"]: r for r in rows}
    assert set(by_hash) == {hashlib.sha256(k.encode()).hexdigest() for k in (key, op)}
    for k in (key, op):
        secret = k.split("_", 2)[2]
        for row in rows:
            assert all(secret not in str(v) and k not in str(v) for v in row.values())
    assert by_hash[hashlib.sha256(key.encode()).hexdigest()]["tenant"] == "acme"
    raw = (tmp_path / "k.db").read_bytes()  # nor anywhere in the file (free pages, journal)
    assert key.split("_", 2)[2].encode() not in raw and op.split("_", 2)[2].encode() not in raw


def test_keys_are_compared_with_compare_digest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ks = KeyStore(StateStore(f"sqlite:///{tmp_path / 'k.db'}"))
    key = ks.create("acme")
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a, b):  # noqa: ANN001, ANN202
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    wrong = key[:-4] + ("abcd" if not key.endswith("abcd") else "wxyz")
    assert ks.verify(key) == "acme" and ks.verify(wrong) is None and ks.identify(key).tenant == "acme"
    want = hashlib.sha256(key.encode()).hexdigest()
    assert calls == [(want, want), (want, hashlib.sha256(wrong.encode()).hexdigest()), (want, want)]
    calls.clear()
    assert ks.verify("af_0000000000000000_nope") is None and ks.verify("garbage") is None
    assert calls == []  # no row to compare with: nothing about a stored hash is touched


# -- secrets in logs, output and MLflow params ----------------------------------------------------


@pytest.fixture
def s3_secrets(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    from adapterfab.procs import free_port

    env = {"AWS_ACCESS_KEY_ID": AWS_KEY_ID, "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
           "AWS_SESSION_TOKEN": AWS_TOKEN,
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_REGION": "us-east-1",
           "ADAPTERFAB_S3_MAX_ATTEMPTS": "1", "ADAPTERFAB_S3_CONNECT_TIMEOUT_S": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def test_no_key_in_serving_logs_or_answers(serving: dict, caplog: pytest.LogCaptureFixture) -> None:
    class Failing:
        async def generate(self, *a, **k):  # noqa: ANN002, ANN003, ANN201
            raise RuntimeError("engine exploded")
            yield

    ks = KeyStore(serving["state"])
    key = ks.create("acme")
    forged = key[:-6] + "zzzzzz"
    app = make_api(Failing(), ks.verify, serving["cat"].resolve)
    http = TestClient(app)
    bodies = []
    with caplog.at_level(logging.DEBUG):
        for k in (key, forged, key):
            for body in ({"model": "base", "messages": MSGS}, {"model": "globex/parrot", "messages": MSGS}):
                r = http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {k}"})
                bodies.append(r.text)
    assert "engine exploded" in caplog.text  # the failure was logged (with its traceback)...
    secret, forged_secret = key.split("_", 2)[2], forged.split("_", 2)[2]
    for s in (secret, forged_secret):
        assert s not in caplog.text and all(s not in b for b in bodies)  # ...but no key


def test_no_s3_secret_in_validation_errors_logs_or_cli_output(s3_secrets: dict, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from adapterfab.spec import parse_spec
    from adapterfab.spec_checks import check_semantics
    from adapterfab.storage import s3_object_error

    spec = {"version": 1, "name": "s", "tenants": [{"tenant": "acme", "persona": "p",
                                                   "dataset": "s3://tenant-data/acme/p.jsonl"}]}
    batch, jobs = parse_spec(spec)
    with caplog.at_level(logging.DEBUG), pytest.raises(SpecError) as e:
        check_semantics(batch, jobs, dataset_exists=s3_object_error)
    assert "tenant-data/acme/p.jsonl" in str(e.value)  # the S3 check did run and fail
    assert any(r.name.startswith("botocore") for r in caplog.records)  # boto3 did log, at DEBUG...
    for s in (AWS_SECRET, AWS_KEY_ID, AWS_TOKEN):
        assert s not in str(e.value)
        assert s not in caplog.text  # ...but none of its records that carry credentials
    (tmp_path / "b.yaml").write_text(json.dumps(spec))
    r = subprocess.run([CLI, "validate", str(tmp_path / "b.yaml")], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "ADAPTERFAB_HOME": str(tmp_path / "home")})
    assert r.returncode == 2 and "tenant-data" in r.stderr
    for s in (AWS_SECRET, AWS_KEY_ID, AWS_TOKEN):
        assert s not in r.stdout + r.stderr


def test_run_params_hold_the_spec_only(s3_secrets: dict, mlflow_server: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterfab.jobs.orchestrate import job_run_params
    from adapterfab.spec import parse_spec

    monkeypatch.setenv("ADAPTERFAB_API_KEY", "af_0123456789abcdef_" + "s" * 32)
    spec = {"version": 1, "name": "s", "tenants": [
        {"tenant": "acme", "persona": "p", "dataset": "s3://tenant-data/acme/p.jsonl"}]}
    batch, jobs = parse_spec(spec)
    params = job_run_params(batch, jobs[0], "f" * 64)
    fixed = {"dataset", "base_model", "base_fingerprint"}
    assert set(params) - fixed and all(k in fixed or k.startswith(("method.", "train.")) for k in params)
    tracking = Tracking(mlflow_server)
    run_id = tracking.start_run(f"secrets-{secrets.token_hex(3)}", tags={"adapterfab.tenant": "acme"})
    tracking.log_params(run_id, params)
    logged = tracking.client.get_run(run_id).data.params
    assert logged == {k: str(v) for k, v in params.items()}
    dump = json.dumps(logged)
    for s in (AWS_SECRET, AWS_KEY_ID, AWS_TOKEN, "s" * 32, os.environ["AWS_ENDPOINT_URL"]):
        assert s not in dump
    with pytest.raises(SpecError, match="holds credentials"):  # nor can a dataset URI carry one in
        parse_spec({**spec, "tenants": [{**spec["tenants"][0],
                                         "dataset": f"s3://{AWS_KEY_ID}:{AWS_SECRET}@tenant-data/p.jsonl"}]})


def test_a_failed_shared_group_names_no_other_tenants_job() -> None:
    """A fused group of three tenants' jobs fails with an error naming one of them: each member's job
    records the error with the other members' job and adapter ids replaced (its own kept whole)."""
    from adapterfab.errors import AdapterfabError
    from adapterfab.ids import AdapterId
    from adapterfab.jobs.registrar import Prepared, group_error_for

    def prep(tenant: str, persona: str) -> Prepared:
        aid = AdapterId(tenant, persona)
        return Prepared(None, f"b-1.{tenant}.{persona}", aid, "run", None, {}, "fp", None, None)

    acme, globex, acme_pi = prep("acme", "pirate"), prep("globex", "parrot"), prep("acme", "pi")
    group = [acme, globex, acme_pi]
    e = AdapterfabError("job b-1.globex.parrot: row 3 of globex/parrot@2 is empty; b-1.acme.pirate and "
                        "acme/pirate waited; b-1.acme.pi too")
    for_acme = str(group_error_for(acme, group, e))
    assert "globex" not in for_acme and "b-1.acme.pirate" in for_acme and "acme/pirate" in for_acme
    assert "b-1.acme.pi " not in for_acme and "b-1.acme.pi too" not in for_acme
    for_globex = str(group_error_for(globex, group, e))
    assert "acme" not in for_globex and "b-1.globex.parrot" in for_globex and "globex/parrot@2" in for_globex


def test_a_trainers_error_reaches_the_job_without_rays_worker_details() -> None:
    """A trainer actor's exception comes back wrapped by Ray, whose text names the worker's pid, IP, actor
    id and source paths: the job (which its tenant reads) records the message the trainer raised and
    nothing of the wrapper; a worker that died is named as such, without its node."""
    import ray.exceptions

    from adapterfab.errors import AdapterfabError
    from adapterfab.jobs.registrar import error_text

    def wrapped(e: BaseException) -> BaseException:
        return ray.exceptions.RayTaskError("TrainerActor.train_group", 'Traceback:\n  File "/srv/jobs/fused.py"',
                                           e, pid=4242, ip="10.1.2.3", actor_id="ab12cd34ef56").as_instanceof_cause()

    ours = wrapped(AdapterfabError("loss became nan at step 3; lower train.learning_rate"))
    assert isinstance(ours, AdapterfabError)  # Ray's wrapper is also the raised class
    assert error_text(ours) == "loss became nan at step 3; lower train.learning_rate"
    theirs = wrapped(ValueError("shapes (4, 8) and (8, 5) do not match"))
    assert error_text(theirs) == "ValueError: shapes (4, 8) and (8, 5) do not match"
    died = error_text(ray.exceptions.ActorDiedError())
    assert died.startswith("ActorDiedError: ") and "worker failed" in died
    for said in (error_text(ours), error_text(theirs), died):
        assert not any(s in said for s in ("4242", "10.1.2.3", "ab12cd34ef56", "/srv/", "pid=", "ip="))
    chained = AdapterfabError("dataset s3://b/x.jsonl cannot be read")
    chained.__cause__ = OSError("connection reset")
    assert error_text(chained) == "dataset s3://b/x.jsonl cannot be read"  # ours is the message, not its cause


def test_credentials_never_travel_in_a_jobs_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What goes into a Ray job's runtime_env (shown by Ray's Jobs API and dashboard): S3 settings but no
    credential value. On this machine's cluster the credentials go to an owner-only AWS credentials
    file that boto3 reads; to a remote cluster (`submit --address`) they do not go at all."""
    import stat

    import boto3

    from adapterfab.cluster import worker_env

    secret, token = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRET", "FwoGZXIvYXdzEXAMPLETOKEN"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEYID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    monkeypatch.setenv("ADAPTERFAB_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for env in (worker_env(tmp_path / "secrets"), worker_env()):
        text = json.dumps(env)
        assert secret not in text and token not in text and "AKIAEXAMPLEKEYID" not in text
        assert env["AWS_DEFAULT_REGION"] == "eu-west-3" and env["ADAPTERFAB_S3_ENDPOINT_URL"] == "http://127.0.0.1:9"
    local = worker_env(tmp_path / "secrets")
    path = Path(local["AWS_SHARED_CREDENTIALS_FILE"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.parent == tmp_path / "secrets"
    assert "AWS_SHARED_CREDENTIALS_FILE" not in worker_env()
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):  # a worker without its own
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(path))
    creds = boto3.session.Session().get_credentials().get_frozen_credentials()
    assert (creds.access_key, creds.secret_key, creds.token) == ("AKIAEXAMPLEKEYID", secret, token)
