"""The S3 artifact store against a real S3 API server on 127.0.0.1 (moto's server mode, started here):
bucket creation, adapter upload/download, checksums verified on download, keys under a prefix."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterfab.errors import StorageError
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
