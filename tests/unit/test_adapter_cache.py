"""Serving's local adapter cache (``serve.backend.download_native`` / ``fetch_peft``) against a real
MLflow registry: a cached version is reused; a folder cached under the same ``tenant/persona/N`` from
another registry's version (a recreated stack reuses names and numbers for other weights) is never
served; with the registry unreachable a cached folder still serves, and nothing uncached does."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterfab.errors import RegistryError
from adapterfab.ids import AdapterId
from adapterfab.procs import free_port
from adapterfab.registry import Registry
from adapterfab.serve.backend import SOURCE_FILE, download_native, fetch_peft
from adapterfab.storage import LocalStore
from adapterfab.tracking import Tracking


def _register(mlflow_uri: str, store: LocalStore, aid: AdapterId, files: Path, job: str) -> None:
    tracking, registry = Tracking(mlflow_uri), Registry(mlflow_uri)
    run_id = tracking.start_run(f"cache-{job}")
    uri = store.upload_dir(files, aid.artifact_prefix(job))
    source = tracking.log_dir(run_id, files, "adapter")
    registry.register(aid, source, run_id, {"artifact_uri": uri, "artifact_root": store.root})
    tracking.end_run(run_id, ok=True)


def _weights(folder: Path) -> bytes:
    return (folder / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("fetch", ["native", "peft"])
def test_cache_serves_this_registrys_version_only(fetch: str, mlflow_server: str, tiny_model_path: str,
                                                   make_lora_adapter, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    aid = AdapterId("cache", f"parrot-{fetch}")

    def get(registry: Registry, version: int = 1) -> tuple[Path, bool]:
        """(the cached folder, whether it was fetched from the store this time)"""
        if fetch == "native":
            folder, _, from_store = download_native(registry, f"{aid}@{version}", cache)
            return folder, from_store
        marker = cache / aid.tenant / aid.persona / str(version) / SOURCE_FILE
        before = marker.read_text() if marker.exists() else None
        folder = fetch_peft(registry, f"{aid}@{version}", cache)[0]
        return folder, marker.read_text() != before or before is None

    store, cache = LocalStore(tmp_path / "store"), tmp_path / "cache"
    first = make_lora_adapter(tiny_model_path, tmp_path / "first", 1)
    second = make_lora_adapter(tiny_model_path, tmp_path / "second", 2)
    assert _weights(first) != _weights(second)
    registry = Registry(mlflow_server)

    _register(mlflow_server, store, aid, first, "b1.cache.first")
    folder, from_store = get(registry)
    assert from_store and _weights(folder) == _weights(first)
    folder, from_store = get(registry)  # checked against the registry, reused
    assert not from_store and _weights(folder) == _weights(first)

    # the registry is recreated: the same name and version number now hold other weights
    registry.client.delete_registered_model(aid.registry_name)
    _register(mlflow_server, store, aid, second, "b2.cache.second")
    assert registry.get(aid.with_version(1)).id.version == 1
    folder, from_store = get(registry)
    assert from_store and _weights(folder) == _weights(second)

    # MLflow down: the cached folder still serves; a version never cached cannot be fetched
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = Registry(f"http://127.0.0.1:{free_port()}")
    folder, from_store = get(down)
    assert not from_store and _weights(folder) == _weights(second)
    with pytest.raises(RegistryError):
        get(down, version=2)


def test_a_version_the_ingress_resolved_is_not_asked_for_again(mlflow_server: str, tiny_model_path: str,
                                                                 make_lora_adapter, tmp_path: Path) -> None:
    """The ingress sends the version it resolved with the request: a replica's cold load checks the cache
    against it and fetches with it, without asking the registry for it again; without it, it asks."""
    aid = AdapterId("cache", "known")
    store, cache = LocalStore(tmp_path / "store"), tmp_path / "cache"
    files = make_lora_adapter(tiny_model_path, tmp_path / "files", 1)
    _register(mlflow_server, store, aid, files, "b1.cache.known")
    registry = Registry(mlflow_server)
    version = registry.get(aid.with_version(1))
    asked: list[str] = []

    class Counting:
        def __getattr__(self, name: str) -> object:
            if name == "get":
                asked.append(name)
            return getattr(registry, name)

    folder, basis, from_store = download_native(Counting(), f"{aid}@1", cache, version)
    assert from_store and basis is None and _weights(folder) == _weights(files) and asked == []
    folder, _, from_store = download_native(Counting(), f"{aid}@1", cache, version)
    assert not from_store and asked == []
    download_native(Counting(), f"{aid}@1", cache)
    assert asked == ["get"]
