"""The registry's behaviour when a registration goes wrong half way, on a real MLflow server behind a
small fault-injecting HTTP proxy: a create re-sent after its answer was lost makes one version; a
registration that failed after its version was made marks the catalogue incomplete and is finished on
resume (``candidate``, the catalogue); a failed first registration leaves no production history;
two registrations of one persona at once leave ``candidate`` on the newer version; ``promote: auto``
compares with production only on the same eval rows; bad ``registry promote`` gate options exit 2."""

from __future__ import annotations

import http.client
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest

from adapterfab.errors import RegistryError
from adapterfab.ids import CANDIDATE, PRODUCTION, AdapterId
from adapterfab.mlflow_client import TAG
from adapterfab.promotion import Decision, Policy, decide_over
from adapterfab.registry import Registry
from adapterfab.registry_index import RegistryIndex
from adapterfab.state import StateStore

CLI = str(Path(sys.executable).parent / "adapterfab")
CREATE = "/api/2.0/mlflow/model-versions/create"
ALIAS = "/api/2.0/mlflow/registered-models/alias"


class Proxy:
    """A reverse proxy to MLflow that injects a fault into the first ``times`` requests ``method path``:
    ``drop`` (MLflow acts on it, the answer is lost: the connection closes), ``504`` (MLflow acts on it, a
    gateway answers 504), ``refuse`` (MLflow never sees it: 503) or ``delay`` (forwarded after
    ``delay_s``). ``hit`` is set when a fault begins."""

    def __init__(self, upstream: str, method: str, path: str, mode: str, times: int = 1, delay_s: float = 0.0):
        u = urlparse(upstream)
        self.hit, self.left, self.seen = threading.Event(), times, []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _do(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = self.command == method and self.path.split("?")[0] == path and proxy.left > 0
                proxy.left -= fault
                proxy.seen.append((self.command, self.path.split("?")[0], fault))
                if fault:
                    proxy.hit.set()
                    if mode == "refuse":
                        return self._answer(503, b"")
                    time.sleep(delay_s if mode == "delay" else 0)
                c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
                c.request(self.command, self.path, body=body,
                          headers={k: v for k, v in self.headers.items() if k.lower() != "connection"})
                r = c.getresponse()
                data, status, ctype = r.read(), r.status, r.getheader("Content-Type", "application/json")
                c.close()
                if fault and mode == "drop":
                    self.close_connection = True
                    return None
                return self._answer(504 if fault and mode == "504" else status, b"" if fault and mode == "504"
                                    else data, ctype)

            def _answer(self, status: int, data: bytes, ctype: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _do

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(mlflow_server: str, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """``proxy(method, path, mode, ...)``: a ``Proxy`` to the test MLflow server, closed afterwards.
    MLflow's own HTTP retries do not wait here."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    made: list[Proxy] = []

    def make(*args: object, **kwargs: object) -> Proxy:
        made.append(Proxy(mlflow_server, *args, **kwargs))
        return made[-1]

    yield make
    for p in made:
        p.close()


def _aid(persona: str) -> AdapterId:
    return AdapterId("rev" + uuid.uuid4().hex[:8], persona)


def _complete_index(reg: Registry) -> RegistryIndex:
    reg.list()  # the first full listing catalogues everything
    assert reg.index.complete()
    return reg.index


# -- 1: a create re-sent by MLflow's HTTP session ------------------------------------------------------
@pytest.mark.parametrize("mode", ["drop", "504"])
def test_a_create_whose_answer_was_lost_and_was_re_sent_makes_one_version(
        mlflow_server: str, proxy, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:  # noqa: ANN001
    """MLflow's session (5 retries in the factory) re-sends a create whose answer was lost beneath
    ``with_retry``'s token lookup: the server made two versions with one request token, ``candidate`` on the
    second and the first orphaned. The lowest stays; the other is deleted before any alias names it."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    p = proxy("POST", CREATE, mode)
    aid = _aid("dup")
    v = Registry(p.url, retry_s=60).register(aid, "s3://bucket/adapters/x", None, {"job_id": "b1.x.dup"})
    assert [f for _, path, f in p.seen if path == CREATE] == [True, False]  # it was sent twice
    versions = Registry(mlflow_server).versions(aid)
    assert [x.id.version for x in versions] == [1] and v.id.version == 1
    assert versions[0].aliases == (CANDIDATE,) and v.aliases == (CANDIDATE,)
    assert Registry(mlflow_server).find(aid, "job_id", "b1.x.dup").id.version == 1


# -- 2: promote: auto and different eval rows --------------------------------------------------------
def test_promote_auto_compares_with_production_only_on_the_same_eval_rows(mlflow_server: str) -> None:
    """A batch's gate (jobs/registrar.auto_gate) applies ``registry promote``'s rule: a candidate evaluated
    on other rows than production is refused, and the advice names no version that does not exist yet."""
    from adapterfab.jobs.registrar import auto_gate

    reg, aid, policy = Registry(mlflow_server), _aid("rows"), Policy(min_retention=0)

    def job(loss: float, rows: str):  # noqa: ANN202
        metrics = {"eval_loss": loss, "base_eval_loss": 3.0}
        tags = {"eval_sha256": rows, **{f"metric.{k}": f"{x:.6g}" for k, x in metrics.items()}}
        return reg.register_gated(aid, f"s3://b/{loss}", None, tags, auto_gate(policy, metrics, {"eval_sha256": rows}))

    v1, d1 = job(2.0, "a" * 32)
    assert d1.promoted
    v2, d2 = job(1.0, "b" * 32)  # far lower, on other rows
    assert not d2.promoted and "evaluated on other rows" in d2.reason and "--force" in d2.reason
    assert f"registry promote {aid} VERSION --force" in d2.reason and f"{aid} 2" not in d2.reason
    assert reg.production(aid).id.version == 1 and reg.get(v2.id).tags[TAG + "promotion.decision"] == "refused"
    _, d3 = job(3.5, "b" * 32)  # not even better than the base: that is the reason
    assert not d3.promoted and "does not beat base" in d3.reason
    v4, d4 = job(1.5, "a" * 32)  # the same rows as production: compared, and better
    assert d4.promoted and "production v1 2" in d4.reason and reg.production(aid).id.version == 4
    # no eval digest on either side (versions made before it was recorded): compared as before
    assert decide_over(policy, {"eval_loss": 1.0, "base_eval_loss": 3.0}, reg.get(v4.id), None).promoted


# -- 3: a registration that stopped after its version was made ----------------------------------------
def _job(tmp_path: Path, batch: str, aid: AdapterId) -> tuple[StateStore, str]:
    state = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    jid = f"{batch}.{aid.tenant}.{aid.persona}"
    state.create_batch(batch, "n", "spec", "", "base", [{"id": jid, "tenant": aid.tenant, "persona": aid.persona,
                                                         "method": "lora", "total_steps": 4}])
    return state, jid


def test_a_registration_that_failed_after_its_version_was_made_is_finished_on_resume(
        mlflow_server: str, proxy, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:  # noqa: ANN001
    """MLflow made the version, then ``candidate`` could not be set (an outage past the retry budget): the
    catalogue, which said complete without the version, is marked incomplete; the resumed batch
    (``_finish_if_registered``) moves ``candidate`` to the version and catalogues it."""
    from adapterfab.jobs.orchestrate import _finish_if_registered

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    aid, index = _aid("half"), RegistryIndex(f"sqlite:///{tmp_path / 'state.db'}")
    reg = Registry(mlflow_server, index=index)
    reg.register(aid, "s3://b/1", None, {"job_id": "b1.x"})
    _complete_index(reg)
    state, jid = _job(tmp_path, "b2", aid)
    p = proxy("POST", ALIAS, "refuse")
    with pytest.raises(Exception):  # noqa: B017, PT011 - MLflow's error for the refused alias call
        Registry(p.url, index=index).register_gated(aid, "s3://b/2", None, {"job_id": jid}, None)
    assert not index.complete()  # a listing now rebuilds it from MLflow
    assert Registry(mlflow_server).versions(aid)[-1].aliases == ()  # v2 made, without candidate

    resumed = Registry(mlflow_server, index=index)
    assert _finish_if_registered(SimpleNamespace(registry=resumed, state=state), jid, aid)
    assert state.job(jid).model_version == 2 and state.job(jid).state.value == "SUCCEEDED"
    assert resumed.resolve(aid).id.version == 2 and resumed.get(aid.with_alias(CANDIDATE)).id.version == 2


def test_resume_catalogues_a_version_a_killed_registration_made(mlflow_server: str, tmp_path: Path) -> None:
    """The orchestrator was killed right after MLflow made the version: nothing marked the catalogue
    incomplete. The resume points ``candidate`` at the version and catalogues it, so ``registry ls``,
    ``/v1/models`` and outage resolution (all read from the catalogue) see it; a version whose
    ``candidate`` a newer version holds keeps it there."""
    from adapterfab.jobs.orchestrate import _finish_if_registered

    aid, index = _aid("killed"), RegistryIndex(f"sqlite:///{tmp_path / 'state.db'}")
    reg = Registry(mlflow_server, index=index)
    reg.register(aid, "s3://b/1", None, {"job_id": "b1.x"})
    _complete_index(reg)
    state, jid = _job(tmp_path, "b2", aid)
    raw = Registry(mlflow_server).client  # the create the killed orchestrator made, and nothing after it
    raw.create_model_version(aid.registry_name, "s3://b/2", None, tags={TAG + "job_id": jid})
    assert _finish_if_registered(SimpleNamespace(registry=Registry(mlflow_server, index=index), state=state), jid, aid)
    assert index.complete()
    (listed,) = [r for r in reg.list(aid.tenant) if r.id == aid]  # from the catalogue
    assert [v.id.version for v in listed.versions] == [1, 2] and listed.aliases == {CANDIDATE: 2}
    assert reg.resolve_from_catalogue(aid).id.version == 2
    assert listed.to_dict() == next(r for r in reg.list(aid.tenant, refresh=True) if r.id == aid).to_dict()

    reg.register(aid, "s3://b/3", None, {"job_id": "b3.x"})  # newer: candidate stays on it
    v = reg.complete_registration(reg.find(aid, "job_id", jid))
    assert CANDIDATE not in v.aliases and reg.get(aid.with_alias(CANDIDATE)).id.version == 3


def test_a_failed_alias_move_marks_the_catalogue_incomplete(mlflow_server: str, proxy,  # noqa: ANN001
                                                            monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``set_alias`` (production) and ``rollback``: the alias moved, then writing the history failed; the
    catalogue, which does not have the move, is marked incomplete."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    aid, index = _aid("moved"), RegistryIndex(f"sqlite:///{tmp_path / 'state.db'}")
    reg = Registry(mlflow_server, index=index)
    for i in (1, 2):
        reg.register(aid, f"s3://b/{i}", None, {})
    reg.set_alias(aid, PRODUCTION, 1)
    reg.set_alias(aid, PRODUCTION, 2)
    for change in (lambda r: r.set_alias(aid, PRODUCTION, 1), lambda r: r.rollback(aid)):
        _complete_index(reg)
        p = proxy("POST", "/api/2.0/mlflow/registered-models/set-tag", "refuse")
        with pytest.raises(Exception):  # noqa: B017, PT011
            change(Registry(p.url, index=index))
        assert not index.complete()
        assert reg.list(aid.tenant)[0].to_dict() == reg.list(aid.tenant, refresh=True)[0].to_dict()
        reg.set_alias(aid, PRODUCTION, 2)


# -- 4: no production history before production moves ------------------------------------------------
def test_a_failed_first_registration_leaves_no_production_history(mlflow_server: str, proxy,  # noqa: ANN001
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The first gate-promoted job's model was created with history [1] before version 1 existed; its
    create failed, a later job's refused version 1 then stood in the history, and rollback moved
    production onto it. The history is written once production moved; one recorded while the model has
    no production version (as an older adapterfab left it) is stale."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    policy, aid = Policy(min_retention=0), _aid("hist")

    def gate(loss: float):  # noqa: ANN202
        return lambda prod: decide_over(policy, {"eval_loss": loss, "base_eval_loss": 3.0}, prod)

    p = proxy("POST", CREATE, "refuse")
    with pytest.raises(Exception):  # noqa: B017, PT011
        Registry(p.url).register_gated(aid, "s3://b/j1", None, {"metric.eval_loss": "1"}, gate(1.0))
    reg = Registry(mlflow_server)
    assert reg.versions(aid) == [] and reg.production_history(aid) == []
    v1, d1 = reg.register_gated(aid, "s3://b/j2", None, {"metric.eval_loss": "3.5"}, gate(3.5))
    assert not d1.promoted and v1.id.version == 1
    v2, d2 = reg.register_gated(aid, "s3://b/j3", None, {"metric.eval_loss": "1"}, gate(1.0))
    assert d2.promoted and reg.production_history(aid) == [2]
    with pytest.raises(RegistryError, match="no earlier production version"):
        reg.rollback(aid)
    assert reg.production(aid).id.version == 2

    stale = _aid("stale")  # the phantom an older version left: history [1], no production alias
    reg.register(stale, "s3://b/s1", None, {})
    reg._set_history(stale, [1])
    reg.register_gated(stale, "s3://b/s2", None, {}, lambda prod: Decision(True, "test", "eval_loss", 1.0))
    assert reg.production_history(stale) == [2]


# -- 5: two registrations of one persona at once ------------------------------------------------------
def test_candidate_ends_on_the_newer_of_two_registrations_at_once(mlflow_server: str, proxy,  # noqa: ANN001
                                                                  tmp_path: Path) -> None:
    """Two batches register the same persona at once without a gate: A made v1, its ``candidate`` call was
    slow; B made v2 and set candidate; then A's call landed, leaving candidate on v1. Registrations of one
    adapter take turns (jobs/registrar.register_gated's state lock), so B's version is made after A is done."""
    from adapterfab.jobs.registrar import register_gated

    state = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    aid = _aid("race")
    p = proxy("POST", ALIAS, "delay", delay_s=2.0)

    def batch(name: str, registry: Registry) -> None:
        register_gated(state, registry, aid, name, f"s3://b/{name}", None, {"job_id": name}, None)

    a = threading.Thread(target=batch, args=("ba.x", Registry(p.url)))
    a.start()
    assert p.hit.wait(30)  # A made v1 and its alias call is on its way
    batch("bb.x", Registry(mlflow_server))
    a.join(60)
    reg = Registry(mlflow_server)
    by_job = {v.tags[TAG + "job_id"]: v.id.version for v in reg.versions(aid)}
    assert sorted(by_job.values()) == [1, 2]
    assert reg.get(aid.with_alias(CANDIDATE)).id.version == 2 == max(by_job.values())


# -- 6: bad gate options are bad input ----------------------------------------------------------------
@pytest.mark.parametrize(("option", "said"), [(["--metric", "foo"], "unknown promotion metric"),
                                              (["--margin", "-1"], "margins must be >= 0"),
                                              (["--min-retention", "2"], "min_retention must be between 0 and 1")])
def test_bad_promote_gate_options_exit_2_before_mlflow_is_asked(tmp_path: Path, option: list[str], said: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "ADAPTERFAB_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}  # nothing listens: a lookup would exit 1
    r = subprocess.run([CLI, "registry", "promote", "acme/pirate", "1", *option], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_promoting_the_production_version_again_changes_nothing(mlflow_server: str, tmp_path: Path) -> None:
    """`registry promote T/P N` where N is production already decided again: a gate that now refuses (here:
    no eval figures) wrote "refused" on the version being served and exited 3."""
    reg = Registry(mlflow_server)
    aid = _aid("served")
    v = reg.register(aid, "s3://b/1", None, {"job_id": "b.x"})
    reg.promote(v, Decision(True, "forced by `registry promote --force`", "eval_loss", None))
    env = {"PATH": "/usr/bin:/bin", "ADAPTERFAB_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": mlflow_server}
    r = subprocess.run([CLI, "registry", "promote", str(aid), "1"], capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 0 and "already production" in r.stdout, (r.stdout, r.stderr)
    got = reg.get(aid.with_version(1))
    assert PRODUCTION in got.aliases and got.tags[TAG + "promotion.decision"] == "promoted"


def test_an_mlflow_error_half_way_through_a_cli_change_is_an_error_line(mlflow_server: str, proxy,  # noqa: ANN001
                                                                        tmp_path: Path) -> None:
    """`registry promote` / `rollback` call MLflow for several writes; one MLflow refused printed a raw
    MlflowException traceback. Now one `error:` line and exit 1."""
    reg = Registry(mlflow_server)
    aid = _aid("halfway")
    reg.register(aid, "s3://b/1", None, {"job_id": "b.x"})
    p = proxy("POST", ALIAS, "refuse")
    env = {"PATH": "/usr/bin:/bin", "ADAPTERFAB_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": p.url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    r = subprocess.run([CLI, "registry", "promote", str(aid), "1", "--force"], capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.hit.is_set() and r.returncode == 1, (r.stdout, r.stderr)
    assert "\nerror: the MLflow server failed" in r.stderr and "Traceback" not in r.stderr, r.stderr
