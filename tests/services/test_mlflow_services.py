"""MLflow on real services: artifacts proxied to S3 (moto's server) and a PostgreSQL backend store, and
the state store on PostgreSQL. Every server here is a real process started by the test."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapterfab.errors import StackError, StateError
from adapterfab.ids import CANDIDATE, PRODUCTION, AdapterId
from adapterfab.procs import free_port, start_mlflow, stop_pid

FILES = {"adapter_config.json": b'{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}',
         "adapter_model.safetensors": bytes(range(256)) * 32}


def _adapter(tmp_path: Path, tag: str = "") -> Path:
    src = tmp_path / f"adapter{tag}"
    src.mkdir()
    for rel, data in FILES.items():
        (src / rel).write_bytes(data + tag.encode())
    return src


def _same_files(got: Path, tag: str = "") -> None:
    got = Path(got)
    for rel, data in FILES.items():
        assert (got / rel).read_bytes() == data + tag.encode(), rel


def test_mlflow_server_starts_without_its_genai_job_runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow 3 starts a job runner and huey consumers beside the server (~1.9 GB, ~15 s of CPU at every
    start) for features the factory never uses; ``start_mlflow`` leaves them off."""
    import os
    import subprocess

    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", raising=False)
    server = start_mlflow(tmp_path / "mlflow", free_port())
    try:
        sid = os.getsid(server.pid)
        ps = subprocess.run(["ps", "-e", "-o", "sid=,args="], capture_output=True, text=True, check=True).stdout
        mine = [line.split(None, 1)[1] for line in ps.splitlines() if line.split(None, 1)[0] == str(sid)]
        assert any("mlflow" in cmd for cmd in mine), mine
        assert not [cmd for cmd in mine if "huey" in cmd or "_job_runner" in cmd], mine
    finally:
        stop_pid(server.pid)


# --- MLflow with its artifacts in S3 ------------------------------------------------------------------

@pytest.mark.timeout(400)
def test_mlflow_artifacts_in_s3(aws_env: pytest.MonkeyPatch, moto_url: str, tmp_path: Path) -> None:
    """``start_mlflow(artifacts_destination="s3://...")`` with only ADAPTERFAB_S3_ENDPOINT_URL set: the
    bucket is created, the server writes artifacts there, and they come back through MLflow."""
    import boto3
    import mlflow.artifacts

    from adapterfab.registry import Registry
    from adapterfab.tracking import Tracking

    aws_env.setenv("ADAPTERFAB_S3_ENDPOINT_URL", moto_url)  # not AWS_ENDPOINT_URL: start_mlflow passes it on
    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    direct = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
    assert bucket not in {b["Name"] for b in direct.list_buckets()["Buckets"]}

    server = start_mlflow(tmp_path / "mlflow", free_port(), artifacts_destination=f"s3://{bucket}/mlflow")
    try:
        assert bucket in {b["Name"] for b in direct.list_buckets()["Buckets"]}  # made by start_mlflow
        tracking = Tracking(server.url)
        run_id = tracking.start_run("job-s3", tags={"adapterfab.tenant": "acme"})
        uri = tracking.log_dir(run_id, _adapter(tmp_path), "adapter")
        tracking.end_run(run_id, ok=True)

        objects = direct.list_objects_v2(Bucket=bucket, Prefix="mlflow/")["Contents"]
        by_name = {o["Key"].rsplit("/", 1)[-1]: o["Key"] for o in objects if f"/{run_id}/" in o["Key"]}
        assert set(by_name) == set(FILES), [o["Key"] for o in objects]
        for rel, key in by_name.items():
            assert key.endswith(f"/{run_id}/artifacts/adapter/{rel}")
            assert direct.get_object(Bucket=bucket, Key=key)["Body"].read() == FILES[rel]

        got = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "back"),
                                                  tracking_uri=server.url)
        _same_files(Path(got))

        # a registry version whose source is that folder downloads through MLflow too
        registry = Registry(server.url)
        v = registry.register(AdapterId("acme", "s3-persona"), source=uri, run_id=run_id,
                              tags={"method": "lora"})
        _same_files(registry.download(v, tmp_path / "from-registry"))
    finally:
        stop_pid(server.pid)
    log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.timeout(60)
def test_mlflow_unreachable_s3_fails_before_starting(aws_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    aws_env.setenv("ADAPTERFAB_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    aws_env.setenv("ADAPTERFAB_S3_MAX_ATTEMPTS", "2")
    aws_env.setenv("ADAPTERFAB_S3_CONNECT_TIMEOUT_S", "1")
    with pytest.raises(StackError,
                       match=r"artifacts destination s3://nowhere/mlflow: cannot reach the bucket"):
        start_mlflow(tmp_path / "mlflow", free_port(), artifacts_destination="s3://nowhere/mlflow")
    assert not (tmp_path / "mlflow" / "mlflow.log").exists()  # no server was started


# --- PostgreSQL --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def postgres() -> Iterator:
    from adapterfab.procs import postgres_bin, start_postgres, stop_postgres

    missing = [n for n in ("initdb", "pg_ctl", "createdb") if postgres_bin(n) is None]
    if missing:
        pytest.skip(f"PostgreSQL server programs not installed ({', '.join(missing)}): "
                    "`apt-get install postgresql` to run the PostgreSQL tests")
    pg = start_postgres(free_port())
    yield pg
    stop_postgres(pg)
    assert not pg.base.exists()


def _sql(url: str, query: str) -> list[tuple]:
    import psycopg

    conn = psycopg.connect(url, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchall()
    finally:
        conn.close()


@pytest.mark.timeout(400)
def test_mlflow_registry_on_postgres(postgres, tmp_path: Path) -> None:
    from adapterfab.procs import create_database
    from adapterfab.registry import Registry
    from adapterfab.tracking import Tracking

    db = create_database(postgres, "mlflow")
    server = start_mlflow(tmp_path / "mlflow", free_port(), backend_uri=db)
    try:
        tracking, registry = Tracking(server.url), Registry(server.url)
        aid = AdapterId("acme", "pirate")
        versions = []
        for i in (1, 2):
            run_id = tracking.start_run(f"job-{i}")
            tracking.log_params(run_id, {"rank": 8 * i, "method": "lora"})
            tracking.log_metrics(run_id, {"eval_loss": 1.0 / i})
            source = tracking.log_dir(run_id, _adapter(tmp_path, str(i)), "adapter")
            tracking.end_run(run_id, ok=True)
            versions.append(registry.register(aid, source=source, run_id=run_id,
                                              tags={"method": "lora", "dataset_sha256": f"sha-{i}",
                                                    "job_id": f"job-{i}"}))
        assert [v.id.version for v in versions] == [1, 2]
        registry.set_alias(aid, PRODUCTION, 1)

        prod = registry.get(aid.with_alias(PRODUCTION))
        cand = registry.get(aid.with_alias(CANDIDATE))
        assert (prod.id.version, cand.id.version) == (1, 2)
        assert prod.tags["adapterfab.dataset_sha256"] == "sha-1"
        assert cand.tags["adapterfab.job_id"] == "job-2" and cand.run_id == versions[1].run_id
        assert PRODUCTION in prod.aliases and CANDIDATE in cand.aliases
        assert [v.id.version for v in registry.versions(aid)] == [1, 2]
        assert registry.resolve(aid).id.version == 1  # a bare id means production
        assert [str(r.id) for r in registry.list("acme")] == ["acme/pirate"]
        _same_files(registry.download(prod, tmp_path / "v1"), "1")
        run = tracking.client.get_run(versions[1].run_id)
        assert run.data.params["rank"] == "16" and run.data.metrics["eval_loss"] == 0.5

        # it really is PostgreSQL that holds them
        assert _sql(db, "select name from registered_models") == [("af.acme.pirate",)]
        assert sorted(_sql(db, "select version, run_id from model_versions")) == \
            [(1, versions[0].run_id), (2, versions[1].run_id)]
        assert sorted(_sql(db, "select alias, version from registered_model_aliases")) == \
            [(CANDIDATE, 2), (PRODUCTION, 1)]
    finally:
        stop_pid(server.pid)


@pytest.mark.timeout(120)
def test_state_store_on_postgres(postgres) -> None:
    from adapterfab.lifecycle import BatchState, JobState
    from adapterfab.procs import create_database
    from adapterfab.state import StateStore

    url = create_database(postgres, "state")
    store = StateStore(url)
    jobs = [{"id": f"b1/acme/{p}", "tenant": "acme", "persona": p, "method": "lora", "total_steps": 30}
            for p in ("pirate", "robot")]
    store.create_batch("b1", "nightly", "name: nightly\n", "/specs/nightly.yaml", "smollm2-135m-instruct",
                       jobs)
    store.update_batch("b1", state=BatchState.RUNNING, started_s=1.5)
    store.move_job("b1/acme/pirate", JobState.PREPARING)
    store.move_job("b1/acme/pirate", JobState.TRAINING, data_stats={"train_rows": 40, "sha256": "abc"})
    store.update_job("b1/acme/pirate", step=12, loss=0.25, metrics={"lr": 1e-3, "tokens": 9000})
    with pytest.raises(StateError, match="TRAINING -> SUCCEEDED is not allowed"):
        store.move_job("b1/acme/pirate", JobState.SUCCEEDED)
    store.move_job("b1/acme/robot", JobState.FAILED, error="dataset: none of its rows is usable",
                   metrics={"eval_loss": float("nan"), "curve": [1.0, float("inf")]})  # PostgreSQL's JSON has no NaN

    again = StateStore(url)  # a new engine (another process would see the same): state is durable
    job = again.job("b1/acme/pirate")
    assert (job.state, job.step, job.loss) == (JobState.TRAINING, 12, 0.25)
    assert job.data_stats == {"train_rows": 40, "sha256": "abc"} and job.metrics["tokens"] == 9000
    assert job.started_s is not None and job.ended_s is None
    assert again.job("b1/acme/robot").state == JobState.FAILED
    assert again.job("b1/acme/robot").metrics == {"eval_loss": None, "curve": [1.0, None]}
    dump = again.dump("b1")
    assert dump["state"] == "RUNNING" and [j["state"] for j in dump["jobs"]] == ["TRAINING", "FAILED"]
    json.dumps(dump, default=str)
    assert [b.id for b in again.list_batches()] == ["b1"]
    assert sorted(_sql(url, "select id, state from jobs")) == [("b1/acme/pirate", "TRAINING"),
                                                                ("b1/acme/robot", "FAILED")]
