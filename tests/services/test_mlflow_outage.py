"""An MLflow outage, for real: a real MLflow server process is stopped while a training worker logs
per-step metrics and the orchestrator creates a run and registers a version; it comes back on the same
port and store some seconds later. Nothing is lost and nothing is created twice (adapterfab.registry:
MetricBuffer, with_retry). MLflow's own HTTP retries are turned off here (MLFLOW_HTTP_REQUEST_MAX_RETRIES=0)
so only adapterfab's retries can carry a call over the outage. The whole factory riding out an outage
mid-batch is tests/e2e/test_faults.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from adapterfab.errors import RegistryError
from adapterfab.ids import AdapterId
from adapterfab.procs import free_port, start_mlflow, stop_pid
from adapterfab.registry import Registry
from adapterfab.tracking import MetricBuffer, Tracking

STEPS = 60
OUTAGE_S = 8.0


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    home, port = tmp_path / "mlflow", free_port()
    box = {"server": start_mlflow(home, port), "home": home, "port": port}
    yield box
    stop_pid(box["server"].pid)


@pytest.mark.timeout(400)
def test_outage_loses_no_run_metric_or_version(server: dict, tmp_path: Path) -> None:
    uri = server["server"].url
    tracking, registry = Tracking(uri, retry_s=300), Registry(uri, retry_s=300)
    run_id = tracking.start_run("training-job")
    buffer = MetricBuffer(uri, every_s=0.2)
    for step in range(1, 11):
        buffer.log(run_id, {"loss": 1.0 / step}, step=step)
    time.sleep(1.0)  # these went in before the outage
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 4}')

    stop_pid(server["server"].pid)
    t0 = time.monotonic()
    for step in range(11, STEPS + 1):  # training goes on: logging never blocks on the dead server
        buffer.log(run_id, {"loss": 1.0 / step}, step=step)
    assert time.monotonic() - t0 < 0.5
    results: dict = {}

    def orchestrator() -> None:  # what register_job does, started while MLflow is down
        try:
            rid = tracking.start_run("job-during-outage", tags={"adapterfab.job_id": "b1.acme.pirate"})
            tracking.log_params(rid, {"train.steps": STEPS})
            tracking.log_metrics(rid, {"eval_loss": 0.5}, step=STEPS)
            source = tracking.log_dir(rid, adapter, "adapter")
            v = registry.register(AdapterId("acme", "pirate"), source, rid, {"job_id": "b1.acme.pirate"})
            tracking.end_run(rid, ok=True)
            results["run_id"], results["version"] = rid, v.id.version
        except BaseException as e:  # noqa: BLE001
            results["error"] = e

    worker = threading.Thread(target=orchestrator, daemon=True)
    worker.start()
    time.sleep(OUTAGE_S)
    assert worker.is_alive() and "error" not in results  # waiting for MLflow, not failed
    assert buffer.pending() >= (STEPS - 10) and buffer.failed_attempts >= 1

    server["server"] = start_mlflow(server["home"], server["port"])  # same port, same store
    worker.join(240)
    assert not worker.is_alive() and "error" not in results, results
    buffer.close(120)
    assert buffer.pending() == 0

    plain = Tracking(uri)
    history = plain.client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))  # every step, once
    run = plain.client.get_run(results["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.steps"] == str(STEPS)
    assert run.data.metrics["eval_loss"] == 0.5
    exp = run.info.experiment_id
    assert len(plain.client.search_runs([exp], "attributes.run_name = 'job-during-outage'")) == 1
    versions = Registry(uri).versions(AdapterId("acme", "pirate"))
    assert [v.id.version for v in versions] == [1] == [results["version"]]
    assert versions[0].tags["adapterfab.job_id"] == "b1.acme.pirate" and versions[0].aliases == ("candidate",)


@pytest.mark.timeout(120)
def test_real_errors_are_not_retried_and_an_outage_is_never_read_as_empty(server: dict) -> None:
    uri = server["server"].url
    registry = Registry(uri, retry_s=300)
    t0 = time.monotonic()
    with pytest.raises(Exception, match="(?i)not found|does not exist"):
        Tracking(uri, retry_s=300).client.get_run("0" * 32)  # a wrong request fails at once
    assert registry.find(AdapterId("acme", "ghost"), "job_id", "x") is None  # really not there
    assert time.monotonic() - t0 < 10
    stop_pid(server["server"].pid)
    quick = Registry(uri)  # retry_s=0 (CLI, serving): fails fast, and says why
    for call in (lambda: quick.find(AdapterId("acme", "ghost"), "job_id", "x"),
                 lambda: quick.versions(AdapterId("acme", "ghost")),
                 lambda: quick.production_history(AdapterId("acme", "ghost"))):
        with pytest.raises(RegistryError, match="unreachable"):  # not None / [] ("nothing registered")
            call()


def test_a_run_mlflow_refuses_does_not_hold_back_the_other_runs_metrics(server: dict) -> None:
    """A trainer's buffer holds the metrics of every job it trains. MLflow refuses the metrics of a
    deleted run for good; the buffer sent run by run, oldest first, and kept retrying that one, so no
    other job of the trainer got a metric in until its group ended."""
    uri = server["server"].url
    tracking = Tracking(uri)
    gone, live = tracking.start_run("deleted-job"), tracking.start_run("live-job")
    tracking.client.delete_run(gone)
    buffer = MetricBuffer(uri, every_s=0.2)
    try:
        buffer.log(gone, {"loss": 1.0}, step=1)
        for step in range(1, 6):
            buffer.log(live, {"loss": 1.0 / step}, step=step)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(tracking.client.get_metric_history(live, "loss")) < 5:
            time.sleep(0.2)
        assert len(tracking.client.get_metric_history(live, "loss")) == 5
        assert buffer.peek([gone]) and not buffer.peek([live])  # the refused one is kept, not dropped
    finally:
        buffer.take([gone])
        buffer.close(5)
