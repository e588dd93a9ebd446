"""S3 retries, for real: the artifact store talks to moto's S3 server through a fault-injecting proxy
that answers with S3-style 5xx errors, drops connections or stalls past the read timeout. Uploads and
downloads must come through (the proxy sees more attempts than objects), a permanent 503 must become a
StorageError after exactly ADAPTERFAB_S3_MAX_ATTEMPTS attempts and quickly, and checksums are still
verified on the way back."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from pathlib import Path

import pytest

from adapterfab.errors import StorageError
from adapterfab.storage import MANIFEST, S3Store

FILES = {"adapter_config.json": b'{"r": 8, "lora_alpha": 16}',
         "adapter_model.safetensors": bytes(range(256)) * 64,
         "tokenizer/special_tokens_map.json": b'{"eos_token": "</s>"}'}
N_OBJECTS = len(FILES) + 1  # and the manifest


def _adapter(tmp_path: Path) -> Path:
    src = tmp_path / "adapter"
    for rel, data in FILES.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    return src


def _same(got: Path) -> None:
    assert {p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()} == set(FILES) | {MANIFEST}
    for rel, data in FILES.items():
        assert (got / rel).read_bytes() == data, rel


@pytest.fixture
def s3(aws_env: pytest.MonkeyPatch, fault_proxy, moto_url: str):  # noqa: ANN201
    """The store's client goes through the proxy; returns (proxy, bucket, direct boto3 client to moto)."""
    import boto3

    aws_env.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    aws_env.setenv("ADAPTERFAB_S3_MAX_ATTEMPTS", "4")
    aws_env.setenv("ADAPTERFAB_S3_CONNECT_TIMEOUT_S", "2")
    aws_env.setenv("ADAPTERFAB_S3_READ_TIMEOUT_S", "2")
    bucket = f"retries-{uuid.uuid4().hex[:8]}"
    direct = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
    direct.create_bucket(Bucket=bucket)
    return fault_proxy, bucket, direct


def _first_attempts_fail(kinds: list[object], methods: tuple[str, ...] | None = None):  # noqa: ANN202
    """The first attempt of every (method, path) fails, cycling through ``kinds``; retries go through.
    ``methods``: only requests of these methods fail."""
    cycle, lock = itertools.cycle(kinds), threading.Lock()

    def fault(method: str, path: str, query: str, nth: int) -> object:
        if nth == 0 and (methods is None or method in methods):
            with lock:
                return next(cycle)
        return None

    return fault


def _retried_everything(seen: list, method: str) -> None:
    """Every object's first attempt failed and a later one was forwarded."""
    paths = {s.path for s in seen if s.method == method}
    assert paths
    for path in paths:
        attempts = [s for s in seen if s.method == method and s.path == path]
        assert attempts[0].action != "forward", (method, path, attempts)
        assert attempts[-1].action == "forward", (method, path, attempts)


@pytest.mark.timeout(60)
def test_5xx_and_dropped_connections_are_retried(s3, tmp_path: Path) -> None:
    proxy, bucket, direct = s3
    # uploads: the PUTs fail (the HEAD that verifies each stored object is not counted in the cycle)
    proxy.reset(_first_attempts_fail([503, 500, "slowdown", "drop"], methods=("PUT",)))
    store = S3Store(f"s3://{bucket}/factory")
    start = time.monotonic()
    uri = store.upload_dir(_adapter(tmp_path), "adapters/acme/pirate/job1/")
    assert uri == f"s3://{bucket}/factory/adapters/acme/pirate/job1/"
    puts = proxy.requests("PUT")
    assert len(puts) == 2 * N_OBJECTS > N_OBJECTS  # each object: one failed attempt, one that went through
    _retried_everything(proxy.seen, "PUT")
    assert {s.action for s in puts} == {"503", "500", "slowdown", "drop", "forward"}
    stored = {o["Key"] for o in direct.list_objects_v2(Bucket=bucket)["Contents"]}
    assert stored == {f"factory/adapters/acme/pirate/job1/{rel}" for rel in [*FILES, MANIFEST]}

    proxy.reset(_first_attempts_fail([502, "drop", 500, "slowdown", 503, 504]))
    got = store.download_dir(uri, tmp_path / "dst")
    _same(got)
    gets = proxy.requests("GET")
    assert len(gets) == 2 * N_OBJECTS  # every object read twice: the failed attempt and the retry
    _retried_everything(proxy.seen, "GET")
    _retried_everything(proxy.seen, "HEAD")
    assert time.monotonic() - start < 30


@pytest.mark.timeout(60)
def test_stall_past_the_read_timeout_is_retried(s3, tmp_path: Path) -> None:
    proxy, bucket, _ = s3
    stall_s = 8.0  # ADAPTERFAB_S3_READ_TIMEOUT_S is 2: the client must give up on it and retry

    def fault(method: str, path: str, query: str, nth: int) -> object:
        if nth == 0 and path.endswith("adapter_model.safetensors") and method in ("PUT", "GET"):
            return ("stall", stall_s)
        return None

    proxy.reset(fault)
    store = S3Store(f"s3://{bucket}")
    start = time.monotonic()
    uri = store.upload_dir(_adapter(tmp_path), "adapters/acme/robot/job2/")
    took = time.monotonic() - start
    assert took < stall_s - 2, f"upload waited {took:.1f}s: the stalled attempt was not abandoned"
    stalled_put = proxy.requests("PUT", r"adapter_model\.safetensors$")
    assert [s.action for s in stalled_put] == ["stall", "forward"]
    assert len(proxy.requests("PUT")) == N_OBJECTS + 1

    start = time.monotonic()
    _same(store.download_dir(uri, tmp_path / "dst"))
    took = time.monotonic() - start
    assert took < stall_s - 2, f"download waited {took:.1f}s: the stalled attempt was not abandoned"
    assert [s.action for s in proxy.requests("GET", r"adapter_model\.safetensors$")] == ["stall", "forward"]


@pytest.mark.timeout(60)
def test_permanent_503_fails_after_the_configured_attempts(s3, tmp_path: Path) -> None:
    proxy, bucket, direct = s3
    proxy.reset(lambda method, path, query, nth: 503 if method == "PUT" else None)
    store = S3Store(f"s3://{bucket}")
    start = time.monotonic()
    with pytest.raises(StorageError, match=rf"upload to s3://{bucket}/adapters/acme/x/job3/\S+ failed"):
        store.upload_dir(_adapter(tmp_path), "adapters/acme/x/job3/")
    assert time.monotonic() - start < 15
    puts = proxy.requests("PUT")
    assert len({s.path for s in puts}) == 1, "the upload goes on after a file failed"
    assert len(puts) == 4  # ADAPTERFAB_S3_MAX_ATTEMPTS
    assert "Contents" not in direct.list_objects_v2(Bucket=bucket)

    # another setting, another count; reads too (the object exists, every GET is refused)
    proxy.reset()
    uri = store.upload_dir(_adapter(tmp_path), "adapters/acme/x/job4/")
    s3_settings_env = pytest.MonkeyPatch()
    try:
        s3_settings_env.setenv("ADAPTERFAB_S3_MAX_ATTEMPTS", "2")
        proxy.reset(lambda method, path, query, nth: 503 if method == "GET" else None)
        start = time.monotonic()
        expected = rf"download of s3://{bucket}/adapters/acme/x/job4/{MANIFEST} failed"
        with pytest.raises(StorageError, match=expected):
            S3Store(f"s3://{bucket}").download_dir(uri, tmp_path / "dst")
        assert time.monotonic() - start < 15
        assert len(proxy.requests("GET")) == 2
    finally:
        s3_settings_env.undo()


@pytest.mark.timeout(60)
def test_checksums_still_verified_through_retries(s3, tmp_path: Path) -> None:
    proxy, bucket, _ = s3
    store = S3Store(f"s3://{bucket}")
    uri = store.upload_dir(_adapter(tmp_path), "adapters/acme/y/job5/")

    def fault(method: str, path: str, query: str, nth: int) -> object:
        if method == "GET" and path.endswith("adapter_model.safetensors"):
            return 503 if nth == 0 else "corrupt"  # the retry brings back a bad object
        return None

    proxy.reset(fault)
    with pytest.raises(StorageError, match=r"checksum mismatch for .*/job5/adapter_model\.safetensors"):
        store.download_dir(uri, tmp_path / "dst")
    assert not (tmp_path / "dst" / "adapter_model.safetensors").exists()
    assert [s.action for s in proxy.requests("GET", r"safetensors$")] == ["503", "corrupt"]
    proxy.reset()
    _same(store.download_dir(uri, tmp_path / "dst2"))  # the stored object itself is fine


@pytest.mark.timeout(60)
def test_dataset_reads_retry_with_the_same_settings(s3, tmp_path: Path) -> None:
    """The data stage reads datasets with pyarrow's S3 filesystem: the same env settings apply."""
    import hashlib

    from adapterfab.errors import DatasetError
    from adapterfab.pipelines.data import _sha256, s3_filesystem

    proxy, bucket, direct = s3
    body = b"".join(b'{"instruction": "q%d", "output": "a%d"}\n' % (i, i) for i in range(40))
    direct.put_object(Bucket=bucket, Key="acme/pirate.jsonl", Body=body)
    uri = f"s3://{bucket}/acme/pirate.jsonl"

    proxy.reset(lambda method, path, query, nth: 503 if method == "GET" and nth < 2 else None)
    assert _sha256(s3_filesystem(), f"{bucket}/acme/pirate.jsonl", uri) == (hashlib.sha256(body).hexdigest(), len(body))
    assert [s.action for s in proxy.requests("GET", r"pirate\.jsonl$")] == ["503", "503", "forward"]

    proxy.reset(lambda method, path, query, nth: 503 if method == "GET" else None)
    start = time.monotonic()
    with pytest.raises(DatasetError, match=rf"cannot read dataset {uri}"):
        _sha256(s3_filesystem(), f"{bucket}/acme/pirate.jsonl", uri)
    assert time.monotonic() - start < 15
    assert len(proxy.requests("GET", r"pirate\.jsonl$")) == 4  # ADAPTERFAB_S3_MAX_ATTEMPTS


@pytest.mark.timeout(60)
def test_an_upload_corrupted_in_transit_is_detected_and_sent_again(s3, tmp_path: Path) -> None:
    proxy, bucket, direct = s3

    def fault(method: str, path: str, query: str, nth: int) -> object:
        return "corrupt_upload" if method == "PUT" and path.endswith("safetensors") and nth == 0 else None

    proxy.reset(fault)
    uri = S3Store(f"s3://{bucket}").upload_dir(_adapter(tmp_path), "adapters/acme/z/job6/")
    assert [s.action for s in proxy.requests("PUT", r"safetensors$")] == ["corrupt_upload", "forward"]
    stored = direct.get_object(Bucket=bucket, Key="adapters/acme/z/job6/adapter_model.safetensors")
    assert stored["Body"].read() == FILES["adapter_model.safetensors"]  # the good copy replaced the bad one
    proxy.reset()
    _same(S3Store(f"s3://{bucket}").download_dir(uri, tmp_path / "dst"))


@pytest.mark.timeout(120)
def test_an_upload_corrupted_every_time_is_never_registered(s3, tmp_path: Path, mlflow_server: str) -> None:
    """The orchestrator's REGISTERING step on a store whose uploads always arrive corrupted: the job fails
    with the reason, no manifest is written (nothing can download it) and no registry version exists."""
    from types import SimpleNamespace

    from adapterfab.ids import AdapterId
    from adapterfab.jobs.orchestrate import BatchContext, Prepared, register_job
    from adapterfab.lifecycle import JobState
    from adapterfab.registry import Registry
    from adapterfab.settings import Settings
    from adapterfab.spec import parse_spec
    from adapterfab.state import StateStore
    from adapterfab.tracking import Tracking

    proxy, bucket, direct = s3
    proxy.reset(lambda method, path, query, nth: "corrupt_upload"
                if method == "PUT" and path.endswith("safetensors") else None)
    tenant = f"t{uuid.uuid4().hex[:8]}"
    spec, jobs = parse_spec({"version": 1, "name": "corrupt", "base_model": "/nonexistent",
                             "tenants": [{"tenant": tenant, "persona": "pirate", "dataset": "/d.jsonl"}]})
    state = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    jid = f"b-corrupt.{tenant}.pirate"
    state.create_batch("b-corrupt", "corrupt", "", "", "/nonexistent",
                       [{"id": jid, "tenant": tenant, "persona": "pirate", "method": "lora", "total_steps": 1}])
    for st in (JobState.PREPARING, JobState.TRAINING):
        state.move_job(jid, st)
    tracking, registry = Tracking(mlflow_server), Registry(mlflow_server)
    run_id = tracking.start_run("corrupt-job")
    settings = Settings(home=tmp_path, cache=tmp_path, state_url=state.url, artifacts=f"s3://{bucket}/store")
    ctx = BatchContext(settings, state, "b-corrupt", spec, SimpleNamespace(fingerprint="f" * 64), tracking,
                       registry, run_id, "", 0)
    aid = AdapterId(tenant, "pirate")
    stats = {"sha256": "0" * 64, "total_rows": 1, "bad_rows": 0, "train_rows": 1, "eval_rows": 0}
    register_job(ctx, Prepared(jobs[0], jid, aid, run_id, None, stats, "fp", None, None),
                 {"train_loss": 1.0, "eval_loss": 1.0}, str(_adapter(tmp_path)))
    job = state.job(jid)
    assert job.state == JobState.FAILED and "corrupted in transit" in job.error and job.model_version is None
    assert len(proxy.requests("PUT", r"safetensors$")) == 3  # UPLOAD_ATTEMPTS, each one verified
    prefix = f"store/{aid.artifact_prefix(jid)}"
    keys = [o["Key"] for o in direct.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    assert keys and not any(k.endswith(MANIFEST) for k in keys)  # never downloadable
    with pytest.raises(StorageError, match="no MANIFEST"):
        S3Store(f"s3://{bucket}/store").download_dir(f"s3://{bucket}/{prefix}", tmp_path / "dst")
    assert registry.versions(aid) == []  # never registered
