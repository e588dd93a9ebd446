"""Registry semantics on a real MLflow tracking server: eval-gated promotion (every decision recorded on
the version), rollback along the production history, lookup by job fingerprint (idempotent resubmit),
the tenant's HTTP registry lookup (own adapters only, storage internals hidden), and the CLI's
``registry promote/rollback --json``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapterfab.errors import AdapterNotFound, RegistryError
from adapterfab.ids import PRODUCTION, AdapterId
from adapterfab.keys import KeyStore
from adapterfab.promotion import Decision, Policy, decide, gate_decision
from adapterfab.registry import TAG, Registry
from adapterfab.serve.api import make_api
from adapterfab.serve.app import checked_resolver
from adapterfab.state import StateStore

CLI = str(Path(sys.executable).parent / "adapterfab")


# -- the gate itself (pure) ------------------------------------------------------------------------
def test_gate_needs_to_beat_base_and_production() -> None:
    p = Policy("eval_loss")
    assert decide(p, {"eval_loss": 1.0, "base_eval_loss": 2.0}, None).promoted
    d = decide(p, {"eval_loss": 2.5, "base_eval_loss": 2.0}, None)
    assert not d.promoted and "base 2" in d.reason
    d = decide(p, {"eval_loss": 1.0, "base_eval_loss": 2.0}, (3, 0.9))
    assert not d.promoted and "production v3 0.9" in d.reason
    assert decide(p, {"eval_loss": 0.8, "base_eval_loss": 2.0}, (3, 0.9)).promoted
    assert not decide(p, {"eval_loss": 0.9, "base_eval_loss": 2.0}, (3, 0.9)).promoted  # a tie is no win


def test_gate_margins_and_direction() -> None:
    assert not decide(Policy("eval_loss", margin=0.2), {"eval_loss": 0.85, "base_eval_loss": 1.0}, None).promoted
    assert decide(Policy("eval_loss", margin=0.1), {"eval_loss": 0.85, "base_eval_loss": 1.0}, None).promoted
    rel = Policy("eval_loss", relative_margin=0.5)
    assert not decide(rel, {"eval_loss": 0.6, "base_eval_loss": 1.0}, None).promoted
    assert decide(rel, {"eval_loss": 0.4, "base_eval_loss": 1.0}, None).promoted
    acc = Policy("eval_token_accuracy")  # higher is better
    assert decide(acc, {"eval_token_accuracy": 0.7, "base_eval_token_accuracy": 0.5}, None).promoted
    assert not decide(acc, {"eval_token_accuracy": 0.4, "base_eval_token_accuracy": 0.5}, None).promoted


def test_gate_refuses_without_measurements() -> None:
    d = decide(Policy(), {"eval_loss": 1.0}, None)
    assert not d.promoted and "no base-model eval_loss" in d.reason
    assert not decide(Policy(), {}, None).promoted
    d = decide(Policy(), {"eval_loss": 1.0, "base_eval_loss": 2.0}, (2, None))
    assert d.promoted and "production v2 has no recorded eval_loss" in d.reason
    with pytest.raises(ValueError, match="unknown promotion metric"):
        Policy("bleu")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_gate_refuses_what_is_not_a_finite_measurement(bad: float) -> None:
    """NaN compares False with everything, so a diverged run's NaN loss would beat every reference."""
    p = Policy("eval_loss", min_retention=0)
    d = decide(p, {"eval_loss": bad, "base_eval_loss": 2.0}, None)
    assert not d.promoted and "not a measurement" in d.reason
    assert not decide(p, {"eval_loss": 1.0, "base_eval_loss": bad}, None).promoted
    assert not decide(Policy("eval_token_accuracy", min_retention=0),
                      {"eval_token_accuracy": bad, "base_eval_token_accuracy": 0.5}, None).promoted
    d = decide(Policy(), {"eval_loss": 1.0, "base_eval_loss": 2.0, "retention": bad}, None)
    assert not d.promoted and "retention" in d.reason
    d = decide(p, {"eval_loss": 1.0, "base_eval_loss": 2.0}, (4, bad))  # production's figure unusable
    assert d.promoted and "production v4 has no recorded eval_loss" in d.reason
    assert not decide(p, {"eval_loss": 2.5, "base_eval_loss": 2.0}, (4, bad)).promoted  # the base still holds
    for kw in ({"margin": bad}, {"relative_margin": bad}, {"min_retention": bad}):
        with pytest.raises(ValueError):
            Policy("eval_loss", **kw)


# -- on the real registry ----------------------------------------------------------------------------
def _register(reg: Registry, aid: AdapterId, eval_loss: float, base: float = 3.0, **tags: str):  # noqa: ANN202
    return reg.register(aid, f"s3://bucket/adapters/{aid.tenant}/{aid.persona}/{eval_loss}", None,
                        {"metric.eval_loss": f"{eval_loss:.6g}", "metric.base_eval_loss": f"{base:.6g}",
                         "artifact_uri": "s3://bucket/secret/place", "method": "lora", **tags})


def _metrics(v) -> dict[str, str]:  # noqa: ANN001
    return {k.removeprefix(TAG + "metric."): x for k, x in v.tags.items() if k.startswith(TAG + "metric.")}


def test_promotion_history_and_rollback(mlflow_server: str) -> None:
    reg = Registry(mlflow_server)
    aid = AdapterId("gate", "pirate")
    v1 = _register(reg, aid, 2.0)
    d1 = gate_decision(reg, v1, _metrics(v1), Policy())
    assert d1.promoted
    reg.promote(v1, d1)
    v2 = _register(reg, aid, 2.5)  # beats the base (3.0) but not production v1 (2.0)
    d2 = gate_decision(reg, v2, _metrics(v2), Policy())
    reg.promote(v2, d2)
    assert not d2.promoted
    assert reg.production(aid).id.version == 1
    tags = reg.get(aid.with_version(2)).tags
    assert tags[TAG + "promotion.decision"] == "refused" and "production v1" in tags[TAG + "promotion.reason"]
    v3 = _register(reg, aid, 1.5)
    reg.promote(v3, gate_decision(reg, v3, _metrics(v3), Policy()))
    assert reg.production(aid).id.version == 3
    assert reg.get(aid.with_version(3)).tags[TAG + "promotion.decision"] == "promoted"
    assert reg.production_history(aid) == [1, 3]

    assert reg.rollback(aid) == (3, 1)
    assert reg.production(aid).id.version == 1
    assert reg.get(aid.with_version(3)).tags[TAG + "promotion.decision"] == "rolled_back"
    with pytest.raises(RegistryError, match="no earlier production version"):
        reg.rollback(aid)
    with pytest.raises(AdapterNotFound):
        reg.rollback(AdapterId("gate", "never-promoted"))
    # the listing carries aliases per version from one lookup
    (listed,) = [r for r in reg.list("gate") if r.id.persona == "pirate"]
    assert [v.id.version for v in listed.versions] == [1, 2, 3]
    assert listed.versions[0].aliases == (PRODUCTION,) and "candidate" in listed.versions[2].aliases


def test_find_by_fingerprint(mlflow_server: str) -> None:
    reg = Registry(mlflow_server)
    aid = AdapterId("idem", "robot")
    _register(reg, aid, 2.0, job_fingerprint="f" * 32)
    v2 = _register(reg, aid, 2.0, job_fingerprint="e" * 32)
    assert reg.find(aid, "job_fingerprint", "e" * 32).id == v2.id
    assert reg.find(aid, "job_fingerprint", "0" * 32) is None
    assert reg.find(AdapterId("idem", "nobody"), "job_fingerprint", "e" * 32) is None


class NeverCalled:
    async def generate(self, *a, **k):  # noqa: ANN002, ANN003, ANN201
        raise AssertionError("the backend must not be reached")
        yield


def test_http_registry_lookup_own_adapters_only(mlflow_server: str, tmp_path: Path) -> None:
    reg = Registry(mlflow_server)
    v = _register(reg, AdapterId("httpa", "pirate"), 1.0, dataset_sha256="d" * 64)
    reg.promote(v, Decision(True, "test", "eval_loss", 1.0))
    _register(reg, AdapterId("httpa", "pirate"), 0.5)
    _register(reg, AdapterId("httpb", "secret"), 1.0)
    keys = KeyStore(StateStore(f"sqlite:///{tmp_path / 's.db'}"))
    ka, kb = keys.create("httpa"), keys.create("httpb")
    client = TestClient(make_api(NeverCalled(), keys.verify, checked_resolver(reg, None), catalog=reg.list))

    def get(path: str, key: str):  # noqa: ANN202
        return client.get(path, headers={"Authorization": f"Bearer {key}"})

    body = get("/v1/registry/adapters", ka).json()
    assert [a["id"] for a in body["data"]] == ["httpa/pirate"]
    one = get("/v1/registry/adapters/pirate", ka).json()
    assert one["aliases"] == {"production": 1, "candidate": 2} and len(one["versions"]) == 2
    prod = get("/v1/registry/adapters/pirate/production", ka).json()
    assert prod["version"] == 1 and prod["lineage"]["dataset_sha256"] == "d" * 64
    assert prod["lineage"]["promotion.decision"] == "promoted"
    assert "artifact_uri" not in prod["lineage"] and "secret/place" not in json.dumps(body)
    assert get("/v1/registry/adapters/pirate/2", ka).json()["aliases"] == ["candidate"]
    assert get("/tenants/httpa/v1/registry/adapters/pirate/1", ka).status_code == 200
    # another tenant's adapter looks exactly like a missing one
    other = get("/v1/registry/adapters/secret", ka)
    missing = get("/v1/registry/adapters/nothing", ka)
    assert other.status_code == missing.status_code == 404
    assert other.json()["error"]["code"] == missing.json()["error"]["code"] == "model_not_found"
    assert get("/tenants/httpb/v1/registry/adapters", ka).status_code == 404
    assert get("/v1/registry/adapters/pirate/9", ka).status_code == 404
    for ref in ("%C2%B2", "%D9%A1", "1%0A"):  # Unicode digits and a trailing newline: 404, never a 500
        assert get(f"/v1/registry/adapters/pirate/{ref}", ka).status_code == 404
    assert [a["id"] for a in get("/v1/registry/adapters", kb).json()["data"]] == ["httpb/secret"]
    assert client.get("/v1/registry/adapters").status_code == 401


def _cli(*args: str, mlflow: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "ADAPTERFAB_HOME": str(home), "HF_HUB_OFFLINE": "1",
                               "MLFLOW_TRACKING_URI": mlflow})


def test_cli_promote_gate_and_rollback_json(mlflow_server: str, tmp_path: Path) -> None:
    reg = Registry(mlflow_server)
    aid = AdapterId("clig", "butler")
    _register(reg, aid, 2.0)
    _register(reg, aid, 3.5)  # worse than the base (3.0)
    r = _cli("registry", "promote", "clig/butler", "1", "--json", mlflow=mlflow_server, home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["promoted"] is True
    r = _cli("registry", "promote", "clig/butler", "2", "--json", mlflow=mlflow_server, home=tmp_path)
    assert r.returncode == 3 and json.loads(r.stdout)["promoted"] is False
    assert "does not beat base" in json.loads(r.stdout)["reason"]
    assert reg.production(aid).id.version == 1
    r = _cli("registry", "promote", "clig/butler", "2", "--force", mlflow=mlflow_server, home=tmp_path)
    assert r.returncode == 0 and reg.production(aid).id.version == 2
    assert "forced" in reg.get(aid.with_version(2)).tags[TAG + "promotion.reason"]
    r = _cli("registry", "rollback", "clig/butler", "--json", mlflow=mlflow_server, home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"adapter": "clig/butler", "alias": "production", "from_version": 2,
                                    "to_version": 1}
    r = _cli("registry", "rollback", "clig/butler", mlflow=mlflow_server, home=tmp_path)
    assert r.returncode == 1 and "no earlier production version" in r.stderr
    r = _cli("registry", "show", "clig/butler@production", "--json", mlflow=mlflow_server, home=tmp_path)
    assert json.loads(r.stdout)["version"] == 1


def test_old_state_database_gains_new_columns(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE batches (id VARCHAR(64) PRIMARY KEY, name VARCHAR(200), state VARCHAR(16), "
                "spec_text TEXT, spec_path TEXT, base_model TEXT, mlflow_run_id VARCHAR(64), "
                "orchestrator_pid INTEGER, created_s FLOAT, started_s FLOAT, ended_s FLOAT, error TEXT)")
    con.execute("INSERT INTO batches (id, name, state, spec_text, spec_path, base_model, created_s) "
                "VALUES ('b-old', 'old', 'SUCCEEDED', 'x', '', 'm', 0)")
    con.commit()
    con.close()
    state = StateStore(f"sqlite:///{db}")
    assert state.get_batch("b-old").options is None
    state.create_batch("b-new", "new", "x", "", "m", [], options={"force": True})
    assert state.get_batch("b-new").options == {"force": True}


def test_a_tenant_sees_only_its_own_lineage() -> None:
    """The lineage a tenant reads (HTTP registry routes, dashboard) is an allowlist: the tags a fused
    registration writes that name other tenants, buckets, paths or nodes stay internal; a tag nobody
    named yet stays internal too."""
    from adapterfab.registry import AdapterVersion

    internal = {"fused_with": "globex/parrot,initech/robot", "base_model": "s3://secret-bucket/bases/x",
                "node_id": "a1b2c3", "trainer": "trainer-3", "job_id": "b-1.globex.parrot",
                "artifact_uri": "s3://bucket/acme/p/1", "artifact_root": "s3://bucket", "dataset": "/srv/data/x.jsonl",
                "basis_uri": "s3://bucket/bases/b", "request": "r-1", "some_future_tag": "globex"}
    shown = {"method": "lora", "rank": "8", "method.r": "8", "metric.eval_loss": "0.5", "training": "fused:3",
             "promotion.decision": "promoted", "quantization.bits": "4", "dataset_sha256": "d" * 64,
             "base_fingerprint": "f" * 64, "batch_id": "b-1", "workers": "1"}
    v = AdapterVersion(AdapterId("acme", "pirate", version=1), "mlflow-artifacts:/x", "run-1",
                       {TAG + k: val for k, val in {**internal, **shown}.items()}, ("candidate",), 0.0)
    lineage = v.public_dict()["lineage"]
    assert lineage == shown
    text = json.dumps(v.public_dict())
    assert not any(val in text for val in internal.values())


RACE = '''
import sys, threading
from adapterfab.registry import Registry
from adapterfab.mlflow_client import mlflow_errors as _mlflow_errors
from adapterfab.ids import AdapterId
from adapterfab.errors import RegistryError
assert "mlflow" not in sys.modules
reg = Registry("http://127.0.0.1:9")  # nothing listens: every lookup is "unreachable", never an ImportError
n = 12
barrier = threading.Barrier(n)
errors = []
def one(i):
    barrier.wait()
    try:
        [_mlflow_errors, reg.list, lambda: reg.get(AdapterId.parse("acme/pirate@1"))][i % 3]()
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}")
threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
[t.start() for t in threads]; [t.join() for t in threads]
print("\\n".join(errors))
'''


def test_first_mlflow_use_from_many_threads_at_once() -> None:
    """A serving replica's first requests resolve in several threads while its catalogue thread lists:
    mlflow's circular package imports, raced, failed with ImportError and left the replica answering
    503 to every request (found by the fresh-clone make test)."""
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    out = subprocess.run([sys.executable, "-c", RACE], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    errors = [e for e in out.stdout.splitlines() if e]
    assert len(errors) == 8 and all(e.startswith("RegistryError") for e in errors), errors
    assert not any("import" in e for e in errors), errors


def test_the_gate_compares_with_production_only_on_the_same_eval_rows(mlflow_server: str) -> None:
    """Production's recorded eval loss was measured on its own eval split: a candidate evaluated on other
    rows (new data) is not promoted on a comparison of unlike figures; on the same rows it is compared."""
    reg = Registry(mlflow_server)
    aid = AdapterId("gate", "rows")
    v1 = _register(reg, aid, 2.0, eval_sha256="a" * 32)
    reg.promote(v1, gate_decision(reg, v1, _metrics(v1), Policy()))
    assert reg.production(aid).id.version == 1
    v2 = _register(reg, aid, 1.0, eval_sha256="b" * 32)  # a far lower loss, on other rows
    d2 = gate_decision(reg, v2, _metrics(v2), Policy())
    assert not d2.promoted and "evaluated on other rows" in d2.reason and "--force" in d2.reason
    v3 = _register(reg, aid, 3.5, eval_sha256="b" * 32)  # does not even beat the base: that is the reason
    d3 = gate_decision(reg, v3, _metrics(v3), Policy())
    assert not d3.promoted and "does not beat base" in d3.reason
    v4 = _register(reg, aid, 1.5, eval_sha256="a" * 32)  # the same rows as production: compared, and better
    d4 = gate_decision(reg, v4, _metrics(v4), Policy())
    assert d4.promoted and "production v1 2" in d4.reason
    assert reg.get(aid.with_version(4)).public_dict()["lineage"]["eval_sha256"] == "a" * 32


def test_an_interrupted_promotion_is_completed_unless_a_later_one_stands(mlflow_server: str) -> None:
    """A process that died between writing a version the gate promoted and moving production to it
    (registry.register_gated): ``complete_promotion`` moves production and the history on; a version the
    gate refused, or one older than the current production, is left as it is."""
    from adapterfab.promotion import Decision

    reg = Registry(mlflow_server)
    aid = AdapterId("gate", "interrupted")
    v1 = _register(reg, aid, 2.0)
    reg.promote(v1, gate_decision(reg, v1, _metrics(v1), Policy()))
    v2 = _register(reg, aid, 1.0)
    d2 = gate_decision(reg, v2, _metrics(v2), Policy())
    assert d2.promoted and isinstance(d2, Decision)
    reg.set_version_tags(v2, d2.tags())  # the decision written with the version, then the process died
    v2 = reg.get(v2.id)
    assert reg.production(aid).id.version == 1
    done = reg.complete_promotion(v2)
    assert "production" in done.aliases and reg.production(aid).id.version == 2
    assert reg.production_history(aid) == [1, 2]
    assert reg.complete_promotion(reg.get(v2.id)).id.version == 2 and reg.production_history(aid) == [1, 2]
    refused = _register(reg, aid, 2.9)
    d3 = gate_decision(reg, refused, _metrics(refused), Policy())
    reg.set_version_tags(refused, d3.tags())
    assert not d3.promoted
    reg.complete_promotion(reg.get(refused.id))
    assert reg.production(aid).id.version == 2  # a refused version never becomes production
    v4 = _register(reg, aid, 0.5)
    reg.promote(v4, gate_decision(reg, v4, _metrics(v4), Policy()))
    reg.complete_promotion(reg.get(v2.id))  # an older interrupted promotion does not undo a later one
    assert reg.production(aid).id.version == 4 and reg.production_history(aid) == [1, 2, 4]


def test_export_to_a_folder_that_cannot_be_made_is_a_clear_error_before_any_download(tmp_path: Path) -> None:
    from adapterfab.errors import AdapterfabError
    from adapterfab.export import export_adapter

    (tmp_path / "a-file").write_text("x")
    for bad in (tmp_path / "a-file", tmp_path / "a-file" / "below"):
        with pytest.raises(AdapterfabError, match="cannot write the export"):
            export_adapter(None, None, bad)  # type: ignore[arg-type] # nothing is downloaded first


def test_registry_errors_never_print_the_uri_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterfab.errors import RegistryError
    from adapterfab.procs import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once

    reg = Registry(f"http://admin:hunter2@127.0.0.1:{free_port()}", retry_s=0)  # nothing listens there
    with pytest.raises(RegistryError) as e:
        reg.get(AdapterId.parse("acme/pirate@1"))
    assert "hunter2" not in str(e.value) and "***@127.0.0.1" in str(e.value)
    from adapterfab.errors import redact_credentials

    assert redact_credentials("at http://u:pa@ss@h:1/x for a@b.com") == "at http://***@h:1/x for a@b.com"
