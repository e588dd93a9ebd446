"""The API's answers when the registry is down (the last resolution, else the registry's catalogue, else
503 and nothing cached) or an adapter belongs to other base weights (400 naming both fingerprints)."""

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

    def resolve_from_catalogue(self, aid: AdapterId) -> AdapterVersion:
        raise RegistryError("no complete registry catalogue to resolve from")


def _client(tmp_path: Path, registry: FlakyRegistry, served_fp: str,
            clock=None) -> tuple[TestClient, str]:  # noqa: ANN001
    keys = KeyStore(StateStore(f"sqlite:///{tmp_path / 's.db'}"))
    resolver = checked_resolver(registry, served_fp, **({"clock": clock} if clock else {}))
    app = make_api(NeverCalled(), keys.verify, resolver, resolve_ttl_s=60)
    return TestClient(app), keys.create("acme")


def _chat(client: TestClient, key: str):  # noqa: ANN202
    return client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "acme/pirate", "messages": [{"role": "user", "content": "hi"}]})


def test_registry_down_is_503_and_not_cached(tmp_path: Path) -> None:
    """Nothing to answer from (no earlier resolution, no catalogue): 503. MLflow is asked again only after
    the back-off (requests do not each wait out a dead connection), and the failure is not cached."""
    reg = FlakyRegistry("a" * 64)
    now = [0.0]
    client, key = _client(tmp_path, reg, "b" * 64, clock=lambda: now[0])
    r = _chat(client, key)
    assert r.status_code == 503 and r.json()["error"]["code"] == "registry_unavailable"
    r = _chat(client, key)
    assert r.status_code == 503 and reg.calls == 1  # within the back-off: the catalogue, not MLflow
    now[0] = 6.0
    r = _chat(client, key)
    assert r.status_code == 503 and reg.calls == 2  # the failure was not cached for the TTL


def test_registry_down_serves_the_last_resolution() -> None:
    """Stale but valid: while the registry is down an expired resolution keeps answering (and MLflow is
    asked again once per TTL); an id never resolved gets the 503."""
    import asyncio

    import pytest

    from adapterfab.serve.api import ApiError, ResolveCache

    reg = FlakyRegistry("a" * 64)
    reg.down = False
    now = [0.0]
    cache = ResolveCache(reg.resolve, ttl_s=5, clock=lambda: now[0])
    pirate = AdapterId.parse("acme/pirate")

    async def walk() -> None:
        assert str((await cache.get(pirate)).id) == "acme/pirate@1"
        reg.down, now[0] = True, 6.0
        assert str((await cache.get(pirate)).id) == "acme/pirate@1" and reg.calls == 2
        now[0] = 8.0
        assert str((await cache.get(pirate)).id) == "acme/pirate@1" and reg.calls == 2  # not asked again yet
        now[0] = 12.0
        await cache.get(pirate)
        assert reg.calls == 3
        with pytest.raises(ApiError) as e:
            await cache.get(AdapterId.parse("acme/butler"))
        assert e.value.status == 503
        reg.down, now[0] = False, 20.0
        assert str((await cache.get(pirate)).id) == "acme/pirate@1" and reg.calls == 5

    asyncio.run(walk())


def test_mlflow_down_resolves_from_the_registry_catalogue(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A real Registry whose MLflow is unreachable, with the catalogue adapterfab keeps in the state
    database: serving resolves versions, aliases and bare ids from the catalogue, still refusing other
    bases' adapters and answering not-found for unknown ones."""
    import pytest

    from adapterfab.errors import AdapterNotFound, BaseMismatch
    from adapterfab.registry import RegisteredAdapter, Registry
    from adapterfab.registry_index import RegistryIndex

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    index = RegistryIndex(StateStore(f"sqlite:///{tmp_path / 's.db'}"))
    pirate = AdapterId.parse("acme/pirate")

    def version(n: int, fp: str) -> AdapterVersion:
        return AdapterVersion(pirate.with_version(n), f"/store/{n}", None, {"adapterfab.base_fingerprint": fp}, (), 0.0)

    registry = Registry("http://127.0.0.1:9", index=index)  # nothing listens there now
    index.rebuild([RegisteredAdapter(pirate, {"production": 1, "candidate": 3},  # its catalogue, made before
                                     [version(1, "a" * 64), version(2, "a" * 64), version(3, "c" * 64)])], 0.0)
    resolve = checked_resolver(registry, "a" * 64)
    assert str(resolve(pirate).id) == "acme/pirate@1"  # bare: production
    assert str(resolve(AdapterId.parse("acme/pirate@2")).id) == "acme/pirate@2"
    with pytest.raises(BaseMismatch):
        resolve(AdapterId.parse("acme/pirate@candidate"))
    for missing in ("acme/pirate@9", "acme/pirate@staging", "acme/butler", "globex/pirate"):
        with pytest.raises(AdapterNotFound):
            resolve(AdapterId.parse(missing))
    index.invalidate()  # an incomplete catalogue cannot answer for MLflow
    with pytest.raises(RegistryError):
        resolve(pirate)


def test_adapter_of_other_base_is_refused(tmp_path: Path) -> None:
    reg = FlakyRegistry("a" * 64)
    reg.down = False
    client, key = _client(tmp_path, reg, "b" * 64)
    r = _chat(client, key)
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_base_mismatch"
    assert "aaaaaaaaaaaa" in r.json()["error"]["message"] and "bbbbbbbbbbbb" in r.json()["error"]["message"]
