"""The S3 artifact store against a real S3 API server on 127.0.0.1 (moto's server mode, started here):
bucket creation, adapter upload/download, checksums verified on download, keys under a prefix."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterfab.errors import SettingError, StorageError
from adapterfab.storage import S3Store, open_store


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    from adapterfab.procs import free_port, start_moto, stop_pid

    server = start_moto(tmp_path_factory.mktemp("moto"), free_port())
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ENDPOINT_URL", server.url)
    mp.setenv("AWS_ACCESS_KEY_ID", "test")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "test")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    yield server.url
    mp.undo()
    stop_pid(server.pid)


def _adapter(tmp_path: Path) -> Path:
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_config.json").write_text('{"r": 8}')
    (src / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 64)
    return src


def test_roundtrip_and_checksums(s3_server: str, tmp_path: Path) -> None:
    store = open_store("s3://artifacts/factory")
    assert isinstance(store, S3Store)
    store.ensure_bucket()
    store.ensure_bucket()  # idempotent
    uri = store.upload_dir(_adapter(tmp_path), "adapters/acme/pirate/job1/")
    assert uri == "s3://artifacts/factory/adapters/acme/pirate/job1/"
    keys = {o["Key"] for o in store.client.list_objects_v2(Bucket="artifacts")["Contents"]}
    assert keys == {f"factory/adapters/acme/pirate/job1/{n}"
                    for n in ("adapter_config.json", "adapter_model.safetensors", "MANIFEST.json")}
    got = store.download_dir(uri, tmp_path / "dst")
    assert (got / "adapter_model.safetensors").read_bytes() == bytes(range(256)) * 64
    # a store rooted at the adapter's own prefix reads it too (how workers fetch a basis)
    assert (open_store(uri).download_dir(uri, tmp_path / "dst2") / "adapter_config.json").exists()

    store.client.put_object(Bucket="artifacts", Key="factory/adapters/acme/pirate/job1/adapter_model.safetensors",
                            Body=b"corrupted")
    with pytest.raises(StorageError, match="checksum"):
        store.download_dir(uri, tmp_path / "dst3")
    assert not (tmp_path / "dst3" / "adapter_model.safetensors").exists()  # the corrupt file is not kept


def test_incomplete_upload_and_missing_bucket(s3_server: str, tmp_path: Path) -> None:
    store = open_store("s3://artifacts2")
    store.ensure_bucket()
    store.put_file(_adapter(tmp_path) / "adapter_config.json", "adapters/acme/x/job/adapter_config.json")
    with pytest.raises(StorageError, match="MANIFEST"):  # no manifest: never loaded as an adapter
        store.download_dir(store.uri("adapters/acme/x/job/"), tmp_path / "d")
    with pytest.raises(StorageError):
        open_store("s3://no-such-bucket").put_file(tmp_path / "adapter" / "adapter_config.json", "k")
    store.delete_prefix("adapters/acme/x/")
    assert not store.exists("adapters/acme/x/job/adapter_config.json")


def test_dataset_roundtrip_and_missing_key(s3_server: str, tmp_path: Path) -> None:
    """A tenant's JSONL dataset goes into S3 and comes back byte for byte; a missing key names its URI."""
    import hashlib
    import json

    rows = [{"messages": [{"role": "user", "content": f"question {i} — café ✓"},
                          {"role": "assistant", "content": f"Arr! answer {i}\n"}]} for i in range(40)]
    src = tmp_path / "pirate.jsonl"
    src.write_bytes(b"\n".join(json.dumps(r, ensure_ascii=False).encode() for r in rows) + b"\n\n")
    store = open_store("s3://datasets")
    store.ensure_bucket()
    store.put_file(src, "acme/pirate.jsonl")
    assert store.exists("acme/pirate.jsonl")
    raw = store.client.get_object(Bucket="datasets", Key="acme/pirate.jsonl")["Body"].read()
    assert raw == src.read_bytes()
    store.get_file("acme/pirate.jsonl", tmp_path / "back.jsonl")
    assert (tmp_path / "back.jsonl").read_bytes() == src.read_bytes()
    assert hashlib.sha256((tmp_path / "back.jsonl").read_bytes()).hexdigest() == \
        hashlib.sha256(src.read_bytes()).hexdigest()

    # as a folder too (what a batch's data upload does): verified by the manifest on the way back
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "pirate.jsonl").write_bytes(src.read_bytes())
    uri = store.upload_dir(folder, "acme/batch1/")
    assert (store.download_dir(uri, tmp_path / "data-back") / "pirate.jsonl").read_bytes() == src.read_bytes()

    assert not store.exists("acme/missing.jsonl")
    with pytest.raises(StorageError, match=r"^s3://datasets/acme/missing\.jsonl does not exist$"):
        store.get_file("acme/missing.jsonl", tmp_path / "missing.jsonl")
    assert not (tmp_path / "missing.jsonl").exists()
    with pytest.raises(StorageError, match=r"s3://datasets/acme/nothing/ has no MANIFEST"):
        store.download_dir("s3://datasets/acme/nothing/", tmp_path / "nothing")


def test_retry_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterfab.storage import s3_client

    for name in ("ADAPTERFAB_S3_MAX_ATTEMPTS", "ADAPTERFAB_S3_CONNECT_TIMEOUT_S",
                 "ADAPTERFAB_S3_READ_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    cfg = s3_client().meta.config
    assert (cfg.retries["total_max_attempts"], cfg.retries["mode"]) == (6, "standard")
    assert (cfg.connect_timeout, cfg.read_timeout) == (5, 30)

    monkeypatch.setenv("ADAPTERFAB_S3_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("ADAPTERFAB_S3_CONNECT_TIMEOUT_S", "0.5")
    monkeypatch.setenv("ADAPTERFAB_S3_READ_TIMEOUT_S", "1.5")
    cfg = s3_client().meta.config
    assert (cfg.retries["total_max_attempts"], cfg.connect_timeout, cfg.read_timeout) == (2, 0.5, 1.5)

    for name, bad in (("ADAPTERFAB_S3_MAX_ATTEMPTS", "0"), ("ADAPTERFAB_S3_MAX_ATTEMPTS", "three"),
                      ("ADAPTERFAB_S3_READ_TIMEOUT_S", "-1"), ("ADAPTERFAB_S3_CONNECT_TIMEOUT_S", "inf"),
                      ("ADAPTERFAB_S3_READ_TIMEOUT_S", "inf")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(SettingError, match=rf"{name}='{bad}' is not valid"):
            s3_client()
        monkeypatch.delenv(name)


def test_upload_to_a_kms_encrypted_bucket_is_verified_by_reading_back(s3_server: str, tmp_path: Path) -> None:
    """Under SSE-KMS (or SSE-C) S3's ETag is not the MD5 of the bytes: trusting it failed every upload
    as 'corrupted in transit'. moto returns the MD5 anyway, so the HeadObject reply is made to look as AWS
    writes it for a KMS object (an opaque ETag), at the edge: the S3 client's own event hook."""
    import secrets

    store = open_store("s3://kmsbucket")
    store.ensure_bucket()
    heads = []

    def kms_head(parsed: dict, **_: object) -> None:
        parsed["ETag"] = f'"{secrets.token_hex(16)}"'
        parsed["ServerSideEncryption"] = "aws:kms"
        heads.append(parsed)

    store.client.meta.events.register("after-call.s3.HeadObject", kms_head)
    uri = store.upload_dir(_adapter(tmp_path), "adapters/acme/x/job1")
    assert heads  # each object was checked, by its bytes read back
    store.download_dir(uri, tmp_path / "back")
    assert (tmp_path / "back" / "adapter_model.safetensors").read_bytes() == bytes(range(256)) * 64


def test_s3_errors_are_storage_errors_and_prefixes_are_folders(s3_server: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store("s3://prefixes")
    store.ensure_bucket()
    src = _adapter(tmp_path)
    store.upload_dir(src, "adapters/acme/p/j")
    store.upload_dir(src, "adapters/acme-2/p/j")
    store.delete_prefix("adapters/acme")  # not adapters/acme-2
    assert not store.exists("adapters/acme/p/j/MANIFEST.json")
    assert store.exists("adapters/acme-2/p/j/MANIFEST.json")
    with pytest.raises(StorageError, match="whole artifact store"):
        store.delete_prefix("/")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("ADAPTERFAB_S3_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError, match="cannot check"):  # was botocore's EndpointConnectionError
        open_store("s3://prefixes").download_dir("s3://prefixes/adapters/acme-2/p/j", tmp_path / "d")


@pytest.mark.parametrize("root", ["gs://bucket/factory", "S3://bucket/f", "s3:/bucket/f", "https://minio/b"])
def test_an_unknown_store_scheme_is_refused_not_made_a_local_folder(root: str) -> None:
    with pytest.raises(StorageError, match="unsupported artifact store"):
        open_store(root)


def test_an_s3_base_model_folder_is_downloaded_once_as_any_tool_uploaded_it(
        s3_server: str, tiny_model_path: str, tmp_path: Path) -> None:
    """A base folder put in S3 with plain boto3 (no adapterfab manifest) resolves; processes resolving it
    at once take turns (a file lock), one downloads, none fails, and no temporary folder stays behind.
    A prefix without config.json is refused at validate and at resolve, leaving nothing in the cache."""
    import threading

    from adapterfab.basemodel import fingerprint, resolve_base_model
    from adapterfab.spec import parse_spec
    from adapterfab.spec_checks import semantic_problems
    from adapterfab.storage import s3_client, s3_object_error

    client = s3_client()
    client.create_bucket(Bucket="bases")
    for f in Path(tiny_model_path).iterdir():
        if f.is_file() and not f.name.startswith("."):
            client.upload_file(str(f), "bases", f"tiny/{f.name}")
    client.put_object(Bucket="bases", Key="tiny/", Body=b"")  # a console's "folder" marker
    client.put_object(Bucket="bases", Key="empty/rows.jsonl", Body=b"not a model")
    cache = tmp_path / "cache"
    got, errors = [], []

    def resolve() -> None:
        try:
            got.append(resolve_base_model("s3://bases/tiny/", cache=cache))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=resolve) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len({r.path for r in got}) == 1
    assert got[0].fingerprint == fingerprint(tiny_model_path)
    assert sorted(p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock")) == [
        Path(got[0].path).name]
    with pytest.raises(StorageError, match="no config.json"):
        resolve_base_model("s3://bases/empty", cache=cache)
    assert len([p for p in (cache / "models").iterdir() if not p.name.endswith(".lock")]) == 1
    spec, jobs = parse_spec({"version": 1, "name": "b", "base_model": "s3://bases/empty", "tenants": [
        {"tenant": "acme", "persona": "p", "dataset": "s3://bases/empty/rows.jsonl"}]})
    problems = semantic_problems(spec, jobs, dataset_exists=s3_object_error, data_roots=("s3://",))
    assert [f for f, _ in problems] == ["base_model"] and "config.json" in problems[0][1]


def test_a_base_folder_object_whose_key_is_an_absolute_path_is_refused(s3_server: str, tmp_path: Path) -> None:
    """A base stored by another tool (no manifest) is every object under its prefix; ``m//tmp/x`` made the
    relative part ``/tmp/x``, and ``Path(folder) / "/tmp/x"`` wrote outside the cache (review, 2026-12)."""
    from adapterfab.storage import download_base

    store = open_store("s3://bases-abs")
    store.ensure_bucket()
    outside = tmp_path / "outside" / "x"
    for key, body in (("m/config.json", b"{}"), ("m/model.safetensors", b"w"), (f"m/{outside}", b"escaped")):
        store.client.put_object(Bucket="bases-abs", Key=key, Body=body)
    with pytest.raises(StorageError, match="outside the folder"):
        download_base(store, "s3://bases-abs/m", tmp_path / "cache")
    assert not outside.exists()
