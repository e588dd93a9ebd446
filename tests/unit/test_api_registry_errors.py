"""The API's answers when the registry is down (503, nothing cached) or an adapter belongs to other
base weights (400 naming both fingerprints)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from adapterfab.errors import RegistryError
from adapterfab.ids import AdapterId
from adapterfab.keys import KeyStore
from adapterfab.registry import AdapterVersion
from adapterfab.serve.api import make_api
from adapterfab.serve.app import checked_resolver
from adapterfab.state import StateStore


class NeverCalled:
    async def generate(self, *a, **k):  # noqa: ANN002, ANN003, ANN201
        raise AssertionError("the backend must not be reached")
        yield


class FlakyRegistry:
    def __init__(self, fingerprint: str) -> None:
        self.down = True
        self.calls = 0
        self.fingerprint = fingerprint

    def resolve(self, aid: AdapterId) -> AdapterVersion:
        self.calls += 1
        if self.down:
            raise RegistryError("connection refused")
        return AdapterVersion(aid.unversioned().with_version(1), "src", None,
                              {"adapterfab.base_fingerprint": self.fingerprint}, (), 0.0)


def _client(tmp_path: Path, registry: FlakyRegistry, served_fp: str) -> tuple[TestClient, str]:
    keys = KeyStore(StateStore(f"sqlite:///{tmp_path / 's.db'}"))
    app = make_api(NeverCalled(), keys.verify, checked_resolver(registry, served_fp), resolve_ttl_s=60)
    return TestClient(app), keys.create("acme")


def _chat(client: TestClient, key: str):  # noqa: ANN202
    return client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "acme/pirate", "messages": [{"role": "user", "content": "hi"}]})


def test_registry_down_is_503_and_not_cached(tmp_path: Path) -> None:
    reg = FlakyRegistry("a" * 64)
    client, key = _client(tmp_path, reg, "b" * 64)
    r = _chat(client, key)
    assert r.status_code == 503 and r.json()["error"]["code"] == "registry_unavailable"
    r = _chat(client, key)
    assert r.status_code == 503 and reg.calls == 2  # the failure was not cached for the TTL


def test_adapter_of_other_base_is_refused(tmp_path: Path) -> None:
    reg = FlakyRegistry("a" * 64)
    reg.down = False
    client, key = _client(tmp_path, reg, "b" * 64)
    r = _chat(client, key)
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_base_mismatch"
    assert "aaaaaaaaaaaa" in r.json()["error"]["message"] and "bbbbbbbbbbbb" in r.json()["error"]["message"]
