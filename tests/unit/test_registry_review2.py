"""The registry, second review, on a real MLflow server: ``registry promote`` gates a version by the
promotion policy its batch declared (recorded with the version at registration), the options given
overriding it; a resume completing a cut-short registration takes its turn with the registrations of
the same persona; registry searches read every page, not the first one only."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from adapterfab.ids import CANDIDATE, AdapterId
from adapterfab.mlflow_client import TAG, client
from adapterfab.registry import Registry
from adapterfab.registry_index import RegistryIndex
from adapterfab.state import StateStore
from tests.unit.test_registry_review import ALIAS, CREATE, proxy  # noqa: F401 - the fixture


def _aid(persona: str) -> AdapterId:
    return AdapterId("rv" + uuid.uuid4().hex[:8], persona)


# -- 1: `registry promote` gates by the batch's recorded policy ----------------------------------------
def _register_through_a_batch(mlflow_server: str, tmp_path: Path, aid: AdapterId, promotion: dict[str, Any],
                              metrics: dict[str, float]) -> Any:
    """One job of a ``promote: none`` batch with ``promotion`` registered by the orchestrator's
    REGISTERING step (jobs/registrar.register_job), artifacts in a local store."""
    from adapterfab.jobs.orchestrate import BatchContext, Prepared, register_job
    from adapterfab.lifecycle import JobState
    from adapterfab.settings import Settings
    from adapterfab.spec import parse_spec
    from adapterfab.tracking import Tracking

    spec, jobs = parse_spec({"version": 1, "name": "policy", "base_model": "/nonexistent", "promotion": promotion,
                             "tenants": [{"tenant": aid.tenant, "persona": aid.persona, "dataset": "/d.jsonl"}]})
    state = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    batch, jid = "b-policy", f"b-policy.{aid.tenant}.{aid.persona}"
    state.create_batch(batch, "policy", "", "", "/nonexistent", [{"id": jid, "tenant": aid.tenant,
                                                                  "persona": aid.persona, "method": "lora",
                                                                  "total_steps": 1}])
    for st in (JobState.PREPARING, JobState.TRAINING):
        state.move_job(jid, st)
    tracking, registry = Tracking(mlflow_server), Registry(mlflow_server)
    run_id = tracking.start_run("policy-job")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    settings = Settings(home=tmp_path, cache=tmp_path, state_url=state.url, artifacts=str(tmp_path / "store"))
    ctx = BatchContext(settings, state, batch, spec, SimpleNamespace(fingerprint="f" * 64), tracking, registry,
                       run_id, "", 0)
    stats = {"sha256": "0" * 64, "total_rows": 4, "bad_rows": 0, "train_rows": 3, "eval_rows": 1,
             "eval_sha256": "e" * 32}
    register_job(ctx, Prepared(jobs[0], jid, aid, run_id, None, stats, "fp", None, None),
                 {"train_loss": 1.0, **metrics}, str(adapter))
    job = state.job(jid)
    assert job.state == JobState.SUCCEEDED, job.error
    return registry.get(aid.with_version(job.model_version))


def _promote(mlflow_server: str, home: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> Any:
    from typer.testing import CliRunner

    from adapterfab.cli import app

    monkeypatch.setenv("ADAPTERFAB_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return CliRunner().invoke(app, ["registry", "promote", *args])


def test_registry_promote_gates_by_the_policy_the_batch_recorded(mlflow_server: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch declared margin 0.5: its version beats the base by 0.2 only. `registry promote` gated it
    with its own defaults (margin 0) and promoted what the batch's policy refuses. The batch's policy is
    recorded with the version and applied; an option given explicitly overrides it; the output says
    which policy applied."""
    aid = _aid("policy")
    v = _register_through_a_batch(mlflow_server, tmp_path, aid, {"margin": 0.5, "min_retention": 0.0},
                                  {"eval_loss": 2.0, "base_eval_loss": 2.2})
    home = tmp_path / "home"
    r = _promote(mlflow_server, home, monkeypatch, str(aid), str(v.id.version))
    assert r.exit_code == 3, r.output
    assert "does not beat base 2.2 by more than 0.5" in r.output, r.output
    assert "margin 0.5" in r.output and "recorded at registration by batch b-policy" in r.output, r.output
    reg = Registry(mlflow_server)
    assert reg.production(aid) is None and reg.get(v.id).tags[TAG + "promotion.decision"] == "refused"

    r = _promote(mlflow_server, home, monkeypatch, str(aid), str(v.id.version), "--margin", "0.1", "--json")
    assert r.exit_code == 0 and '"promoted": true' in r.output, r.output
    assert "margin 0.1" in r.output and "min_retention 0 " in r.output, r.output  # the rest: the batch's
    assert "overridden by --margin" in r.output, r.output
    assert reg.production(aid).id.version == v.id.version


def test_a_version_without_a_recorded_policy_is_gated_by_the_cli_defaults(mlflow_server: str, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A version registered before the policy was recorded: `registry promote`'s defaults, said so."""
    reg, aid = Registry(mlflow_server), _aid("nopolicy")
    v = reg.register(aid, "s3://b/1", None, {"metric.eval_loss": "2", "metric.base_eval_loss": "2.2"})
    r = _promote(mlflow_server, tmp_path / "home", monkeypatch, str(aid), str(v.id.version))
    assert r.exit_code == 0, r.output
    assert "margin 0," in r.output and "min_retention 0.9" in r.output and "records no policy" in r.output, r.output


# -- 2: a resume's completion takes its turn -----------------------------------------------------------
def test_completing_a_registration_takes_turns_with_a_registration_of_the_persona(
        mlflow_server: str, proxy, tmp_path: Path) -> None:  # noqa: ANN001, F811
    """A resumed batch completes v2 (made by a killed orchestrator, no ``candidate``): it read ``candidate``
    on v1 and its move was slow; another batch registered v3 and set ``candidate``; the resume's move then
    landed, leaving ``candidate`` (and the catalogue) on the older v2. The completion takes the lock every
    registration of the persona takes (jobs/registrar.complete_registration), so v3 is made after it."""
    from adapterfab.jobs.registrar import complete_registration, register_gated

    state = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    index = RegistryIndex(state)
    aid, reg = _aid("resume"), Registry(mlflow_server, index=index)
    reg.register(aid, "s3://b/1", None, {"job_id": "b1.x"})
    reg.list()  # the catalogue complete
    reg.client.create_model_version(aid.registry_name, "s3://b/2", None, tags={TAG + "job_id": "b2.x"})
    p = proxy("POST", ALIAS, "delay", delay_s=2.0)
    resumed = Registry(p.url, index=index)
    done: dict[str, Any] = {}
    a = threading.Thread(target=lambda: done.update(v=complete_registration(
        state, resumed, resumed.find(aid, "job_id", "b2.x"), "b2.x")))
    a.start()
    assert p.hit.wait(30)  # the resume read candidate on v1; its move to v2 is on its way
    v3, _ = register_gated(state, Registry(mlflow_server, index=index), aid, "b3.x", "s3://b/3", None,
                           {"job_id": "b3.x"}, None)
    a.join(60)
    assert done["v"].id.version == 2 and v3.id.version == 3
    assert reg.get(aid.with_alias(CANDIDATE)).id.version == 3
    assert index.complete() and index.adapter(aid).aliases == {CANDIDATE: 3}


# -- 3: every page of a search -------------------------------------------------------------------------
class SmallPages:
    """An MlflowClient whose server answers a version search with at most ``PAGE`` versions a page (as
    MLflow answers one with ten thousand): the rest behind the page token."""

    PAGE = 2

    def __init__(self, uri: str):
        self._client = client(uri)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def search_model_versions(self, filter_string: str | None = None, max_results: int = 10000,
                              order_by: list[str] | None = None, page_token: str | None = None) -> Any:
        return self._client.search_model_versions(filter_string, min(max_results, self.PAGE), order_by, page_token)


def _small_pages(uri: str, monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> Registry:
    import adapterfab.registry as registry

    monkeypatch.setattr(registry, "VERSIONS_PAGE", SmallPages.PAGE)
    reg = Registry(uri, **kwargs)
    reg._client = SmallPages(uri)
    return reg


def test_versions_read_every_page(mlflow_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A persona with more versions than a page: ``versions`` (rollback's, and the catalogue's after each
    change) listed one page, so the catalogue (which `registry ls`, `/v1/models` and outage resolution
    read) lost every version past it. ``find`` asks for the newest match by itself."""
    aid, plain = _aid("pages"), Registry(mlflow_server)
    for i in range(1, 6):
        plain.register(aid, f"s3://b/{i}", None, {"job_fingerprint": "fp", "job_id": f"b{i}.x"})
    index = RegistryIndex(f"sqlite:///{tmp_path / 'state.db'}")
    reg = _small_pages(mlflow_server, monkeypatch, index=index)
    assert [v.id.version for v in reg.versions(aid)] == [1, 2, 3, 4, 5]
    reg.list()  # the catalogue complete
    reg.set_alias(aid, "staging", 2)  # the adapter re-read into the catalogue
    assert index.complete() and [v.id.version for v in index.adapter(aid).versions] == [1, 2, 3, 4, 5]
    assert reg.find(aid, "job_fingerprint", "fp").id.version == 5
    assert reg.find(aid, "job_id", "b1.x").id.version == 1


def test_the_duplicates_of_a_re_sent_create_are_found_on_every_page(
        mlflow_server: str, proxy, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001, F811
    """A create re-sent twice made three versions with one request token; the lookup of them read one page
    and left a duplicate past it in the registry."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    p = proxy("POST", CREATE, "drop", times=2)
    aid = _aid("dups")
    v = _small_pages(p.url, monkeypatch, retry_s=60).register(aid, "s3://b/x", None, {"job_id": "b1.x"})
    assert [f for _, path, f in p.seen if path == CREATE] == [True, True, False]  # sent three times
    assert v.id.version == 1 and [x.id.version for x in Registry(mlflow_server).versions(aid)] == [1]
