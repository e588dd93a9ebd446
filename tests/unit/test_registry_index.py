"""The registry's catalogue in the state database (adapterfab/registry_index.py), on a real MLflow
server: after every change adapterfab makes through ``Registry`` (gated registration, plain
registration, promotion, an alias, a rollback), the full listing read from the catalogue equals the
listing MLflow gives; it is read without MLflow; a catalogue that missed a change rebuilds itself; a
rebuild keeps what was catalogued after it began; a change made in MLflow directly shows after
``registry ls --refresh``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from adapterfab.ids import CANDIDATE, PRODUCTION, AdapterId
from adapterfab.promotion import Decision
from adapterfab.registry import Registry
from adapterfab.registry_index import RegistryIndex

CLI = str(Path(sys.executable).parent / "adapterfab")


def _dicts(items: list) -> list[dict]:
    return [r.to_dict() for r in items]


def _tenant() -> str:
    return "cat" + uuid.uuid4().hex[:8]


def _decision(promoted: bool) -> Decision:
    return Decision(promoted, "test", "eval_loss", 1.0)


def test_catalogue_follows_the_registrys_own_changes(mlflow_server: str, tmp_path: Path) -> None:
    index = RegistryIndex(f"sqlite:///{tmp_path}/state.db")
    reg = Registry(mlflow_server, index=index)
    assert not index.complete()
    assert _dicts(reg.list()) == _dicts(reg.list_from_mlflow())  # first listing: from MLflow, then catalogued
    assert index.complete()
    t = _tenant()
    a, b = AdapterId(t, "pirate"), AdapterId(t, "butler")
    steps = [
        lambda: reg.register_gated(a, "s3://bucket/a/1", None, {"method": "lora"}, lambda prod: _decision(True)),
        lambda: reg.register_gated(a, "s3://bucket/a/2", None, {"method": "lora"}, lambda prod: _decision(False)),
        lambda: reg.register(b, "s3://bucket/b/1", None, {"method": "lora_xs"}),
        lambda: reg.register(b, "s3://bucket/b/2", None, {"method": "lora_xs"}, fetch=False),
        lambda: reg.promote(reg.get(a.with_version(2)), _decision(True)),
        lambda: reg.set_alias(b, "staging", 1),
        lambda: reg.rollback(a),
        lambda: reg.promote(reg.get(b.with_version(2)), _decision(False)),
    ]
    for step in steps:
        step()
        assert _dicts(reg.list()) == _dicts(reg.list_from_mlflow())
    mine = {str(r.id): r for r in reg.list() if r.id.tenant == t}
    assert mine[str(a)].aliases == {CANDIDATE: 2, PRODUCTION: 1}  # rolled back to v1
    assert mine[str(b)].aliases == {CANDIDATE: 2, "staging": 1}
    assert [v.tags["adapterfab.promotion.decision"] for v in mine[str(a)].versions] == ["promoted", "rolled_back"]
    offline = Registry("http://127.0.0.1:9", index=index)  # nothing listens there: read from the catalogue
    assert _dicts(offline.list()) == _dicts(reg.list())
    assert offline._client is None  # and MLflow was never touched


def test_a_catalogue_that_missed_a_change_rebuilds_itself(mlflow_server: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    index = RegistryIndex(f"sqlite:///{tmp_path}/state.db")
    reg = Registry(mlflow_server, index=index)
    reg.list()
    aid = AdapterId(_tenant(), "robot")

    def broken(v: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(index, "add_version", broken)
    v = reg.register(aid, "s3://bucket/r/1", None, {"method": "qlora"})  # MLflow took it; the catalogue did not
    assert v.id.version == 1 and not index.complete()
    monkeypatch.undo()
    listed = {str(r.id): r for r in reg.list()}  # rebuilt from MLflow
    assert [x.id.version for x in listed[str(aid)].versions] == [1] and index.complete()


def test_a_rebuild_keeps_what_was_catalogued_after_it_began(mlflow_server: str, tmp_path: Path) -> None:
    index = RegistryIndex(f"sqlite:///{tmp_path}/state.db")
    reg = Registry(mlflow_server, index=index)
    t = _tenant()
    old, new, gone = AdapterId(t, "old"), AdapterId(t, "new"), AdapterId(t, "gone")
    reg.register(old, "s3://bucket/o/1", None, {})
    started = time.time()
    snapshot = reg.list_from_mlflow()  # a slow rebuild's search, made before the next two changes
    time.sleep(0.01)
    reg.register(new, "s3://bucket/n/1", None, {})  # catalogued after the rebuild began
    reg.register(old, "s3://bucket/o/2", None, {})
    index.put([type(snapshot[0])(gone, {}, [])], at=started - 1)  # catalogued before, absent from MLflow
    index.rebuild(snapshot, started)
    listed = {str(r.id): r for r in index.list(t)}
    assert sorted(listed) == [str(new), str(old)]  # "gone" dropped, "new" kept
    assert [v.id.version for v in listed[str(old)].versions] == [1, 2]
    assert listed[str(old)].aliases == {CANDIDATE: 2}
    assert _dicts(index.list()) == _dicts(reg.list_from_mlflow())


def test_registry_ls_reads_the_catalogue_and_refresh_reads_mlflow(mlflow_server: str, tmp_path: Path) -> None:
    state_url = f"sqlite:///{tmp_path}/state.db"
    env = {**os.environ, "ADAPTERFAB_HOME": str(tmp_path / "home"), "ADAPTERFAB_STATE_URL": state_url,
           "MLFLOW_TRACKING_URI": mlflow_server}

    def ls(*extra: str) -> dict[str, dict]:
        r = subprocess.run([CLI, "registry", "ls", "--json", *extra], capture_output=True, text=True, env=env,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        return {i["id"]: i for i in json.loads(r.stdout)}

    reg = Registry(mlflow_server, index=RegistryIndex(state_url))
    aid = AdapterId(_tenant(), "parrot")
    reg.register(aid, "s3://bucket/p/1", None, {})
    assert ls()[str(aid)]["aliases"] == {CANDIDATE: 1}  # first listing builds the catalogue
    reg.register(aid, "s3://bucket/p/2", None, {})  # adapterfab's own change: catalogued
    assert ls()[str(aid)]["aliases"] == {CANDIDATE: 2}
    Registry(mlflow_server).client.set_registered_model_alias(aid.registry_name, "canary", "1")  # MLflow directly
    assert "canary" not in ls()[str(aid)]["aliases"]  # the catalogue does not see it ...
    assert ls("--refresh")[str(aid)]["aliases"] == {CANDIDATE: 2, "canary": 1}  # ... until a refresh
    assert ls()[str(aid)]["aliases"] == {CANDIDATE: 2, "canary": 1}
    assert ls("--tenant", aid.tenant).keys() == {str(aid)}  # one tenant's listing: MLflow's


@pytest.mark.timeout(300)
def test_registry_ls_bench_smoke(tmp_path: Path) -> None:
    """bench/registry_ls.py --smoke: the benchmark's every path on 60 versions, so it cannot rot (it
    checks that the catalogue's listing equals MLflow's before it reports a time)."""
    bench = Path(__file__).resolve().parents[2] / "bench" / "registry_ls.py"
    r = subprocess.run([sys.executable, str(bench), "--smoke"], capture_output=True, text=True, timeout=280,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["versions"] == 60 and out["ratios"]["mlflow_over_catalogue"] > 0


def test_registry_ls_is_answered_without_sqlalchemy_typer_or_mlflow(mlflow_server: str, tmp_path: Path) -> None:
    """On a SQLite state database with a complete catalogue, `registry ls` is read with the stdlib
    (adapterfab/registry_view.py) and prints what the full CLI prints, as JSON and as a table."""
    from typer.testing import CliRunner

    from adapterfab.cli import app

    state_url = f"sqlite:///{tmp_path}/state.db"
    env = {**os.environ, "ADAPTERFAB_HOME": str(tmp_path / "home"), "ADAPTERFAB_STATE_URL": state_url,
           "MLFLOW_TRACKING_URI": mlflow_server}
    reg = Registry(mlflow_server, index=RegistryIndex(state_url))
    t = _tenant()
    reg.register(AdapterId(t, "pirate"), "s3://bucket/p/1", None, {"method": "lora", "metric.eval_loss": "0.5"})
    reg.register_gated(AdapterId(t, "a-b"), "s3://bucket/x/1", None, {"method": "lora[x]"},
                       lambda prod: _decision(True))
    reg.list()  # builds the catalogue
    for args in (["--json"], ["--json", "--tenant", t]):
        probe = ("import runpy, sys; sys.argv = ['adapterfab', 'registry', 'ls', *sys.argv[1:]]\n"
                 "try:\n    runpy.run_module('adapterfab.status', run_name='__main__')\n"
                 "except SystemExit:\n    pass\n"
                 "heavy = sorted(m for m in ('sqlalchemy', 'typer', 'mlflow', 'adapterfab.cli') if m in sys.modules)\n"
                 "sys.stderr.write('HEAVY=' + ','.join(heavy))\n")
        r = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120, env=env)
        assert r.stderr.strip().endswith("HEAVY="), r.stderr
        full = CliRunner().invoke(app, ["registry", "ls", *args], env=env)
        assert full.exit_code == 0, full.output
        assert json.loads(r.stdout) == json.loads(full.stdout)
    mine = json.loads(r.stdout)
    assert [a["id"] for a in mine] == [f"{t}/a-b", f"{t}/pirate"]  # by tenant, then persona
    assert mine[0]["versions"][0]["aliases"] == ["candidate", "production"]
    table = subprocess.run([CLI, "registry", "ls"], capture_output=True, text=True, env=env, timeout=120)
    assert table.returncode == 0 and f"{t}/pirate" in table.stdout and "lora[x]" in table.stdout
    assert "candidate=v1, production=v1" in table.stdout


def test_the_server_completes_the_catalogue_and_lists_from_it(mlflow_server: str, tmp_path: Path) -> None:
    """The serving ingress's registry (serve/app.py): an incomplete catalogue is completed by one full
    listing in the background; from then on a tenant's listing (/v1/models, /v1/registry) is the
    catalogue's, not MLflow's; without a catalogue (`serve --registry-from-mlflow`) nothing runs."""
    from adapterfab.serve.app import complete_catalogue

    reg = Registry(mlflow_server, index=RegistryIndex(f"sqlite:///{tmp_path}/state.db"))
    aid = AdapterId(_tenant(), "owl")
    reg.register(aid, "s3://bucket/o/1", None, {})
    assert not reg.index.complete()
    complete_catalogue(reg).join(120)
    assert reg.index.complete() and _dicts(reg.list()) == _dicts(reg.list_from_mlflow())
    Registry(mlflow_server).client.set_registered_model_alias(aid.registry_name, "canary", "1")  # MLflow directly
    assert [r.aliases for r in reg.list(aid.tenant)] == [{CANDIDATE: 1}]  # read from the catalogue
    assert [r.aliases for r in reg.list(aid.tenant, refresh=True)] == [{CANDIDATE: 1, "canary": 1}]
    assert complete_catalogue(Registry(mlflow_server)) is None


def test_versions_registered_while_the_pages_are_read_are_each_listed_once(mlflow_server: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's version pages are offsets into its ordering; its default (newest first) shifted them when a
    version was registered between two pages, and the listing held one version twice (2026-12-07)."""
    import secrets

    import adapterfab.registry as registry_mod
    from adapterfab.ids import AdapterId

    reg = Registry(mlflow_server)
    tenant = f"pages-{secrets.token_hex(3)}"
    for persona in ("a", "b", "c"):
        for _ in range(2):
            reg.register(AdapterId(tenant, persona), "s3://bucket/x", None, {})
    monkeypatch.setattr(registry_mod, "VERSIONS_PAGE", 2)  # stands in for 10,000
    real, pages = reg.client.search_model_versions, []

    def search(*a: object, **k: object) -> object:
        out = real(*a, **k)
        pages.append(len(out))
        if len(pages) == 1:  # registered between the first page and the second
            reg.register(AdapterId(tenant, "a"), "s3://bucket/x", None, {})
        return out

    monkeypatch.setattr(reg.client, "search_model_versions", search)
    listed = {ra.id.persona: [v.id.version for v in ra.versions] for ra in reg.list_from_mlflow(tenant)}
    assert len(pages) >= 3
    assert listed == {"a": [1, 2, 3], "b": [1, 2], "c": [1, 2]}, listed  # the new version after the pages read

    # the models' pages: a new version of a model already read must not move it past the next one
    monkeypatch.setattr(reg.client, "search_model_versions", real)
    monkeypatch.setattr(registry_mod, "MODELS_PAGE", 1)
    real_models, model_pages = reg.client.search_registered_models, []

    def models(*a: object, **k: object) -> object:
        out = real_models(*a, **k)
        model_pages.append([m.name for m in out])
        if len(model_pages) == 1:
            reg.register(AdapterId(tenant, "a"), "s3://bucket/x", None, {})
        return out

    monkeypatch.setattr(reg.client, "search_registered_models", models)
    assert [ra.id.persona for ra in reg.list_from_mlflow(tenant)] == ["a", "b", "c"], model_pages


def test_a_catalogue_is_a_copy_of_one_mlflow_server(mlflow_server: str, tmp_path: Path) -> None:
    """Pointed at another MLflow server (MLFLOW_TRACKING_URI changed), `registry ls` listed the first
    server's adapters from the catalogue, and `show` then said they did not exist. The catalogue is now
    complete only for the server it was rebuilt from (however its URI is spelled); a registry of another
    server rebuilds it (what that server has, nothing of the first), and its writes mark it incomplete."""
    from adapterfab.registry_view import read_sqlite

    state_url = f"sqlite:///{tmp_path}/state.db"
    first = RegistryIndex(state_url)
    reg = Registry(mlflow_server, index=first)
    t = _tenant()
    reg.register(AdapterId(t, "pirate"), "s3://bucket/p/1", None, {"method": "lora"})
    assert any(r.id.tenant == t for r in reg.list()) and first.complete()
    db = tmp_path / "state.db"
    assert read_sqlite(db, t, mlflow_server) and read_sqlite(db, t, "http://mlflow-2:5000") is None
    second = RegistryIndex(state_url)
    other = Registry("http://mlflow-2:5000", index=second)  # another server (nothing listens: not needed)
    assert second.source == "http://mlflow-2:5000" and not second.complete()
    same = RegistryIndex(state_url)  # the same server spelled otherwise (the CLI's localhost, 127.0.0.1 here)
    Registry(mlflow_server.replace("127.0.0.1", "localhost") + "/", index=same)
    assert same.complete()
    other._catalogue("a foreign write", lambda index: index.add_version(reg.versions(AdapterId(t, "pirate"))[0]))
    assert not first.complete()  # a write from another server's registry: no reader trusts it any more
    second.rebuild([], time.time())  # what the other server listed: nothing
    assert second.complete() and not first.complete()
    assert second.list() == [] and read_sqlite(db, None, "http://mlflow-2:5000") == []
    assert any(r.id.tenant == t for r in reg.list())  # the first server's registry rebuilds it back
    assert first.complete() and not second.complete()
