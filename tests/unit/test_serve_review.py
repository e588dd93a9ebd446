"""Serving review (2026-12), one test per fix, on real engines over a tiny random Llama:

1. a place that fails on the device (out of memory) gives its slot back, and its retries fail fast without
   evicting other tenants' adapters;
2. Serve's multiplexed loader (one lock per replica) only records a version: one tenant's slow cold load
   never holds up another tenant's first request;
3. a failed adapter read leaves nothing behind (its traceback pinned every tensor read);
4. a LoRA-XS basis downloads outside the basis cache's lock, once per URI, and the cache is bounded;
5. an adapter the engine refuses is a 400 ``adapter_not_servable``, not a 500;
6. with ``engine: simple`` the tiers never hold their lock across an engine call a generation blocks;
7. ``tenant_rps_overrides`` apply with no ``tenant_rps``;
8. ``app_builder`` refuses settings a replica cannot start with.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from adapterfab.basemodel import random_peft_lora
from adapterfab.serve.backend import TieredBackend
from adapterfab.serve.batched import BatchedEngine
from adapterfab.serve.engine import Finished, SamplingParams
from adapterfab.serve.tiers import AdapterBusy, AdapterTiers

OOM = "CUDA out of memory. Tried to allocate 1.50 GiB"


@pytest.fixture(scope="module")
def adapters(tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("review")
    return {"bob/p@1": random_peft_lora(tiny_model_path, root / "b1", 1, scale=0.4),
            "bob/p@2": random_peft_lora(tiny_model_path, root / "b2", 2, scale=0.4),
            "eve/mlp@1": random_peft_lora(tiny_model_path, root / "mlp", 3, targets=("gate_proj", "up_proj"),
                                          scale=0.4),
            "eve/r16@1": random_peft_lora(tiny_model_path, root / "r16", 4, r=16, scale=0.4)}


@pytest.fixture()
def engine(tiny_model_path: str):  # noqa: ANN201
    eng = BatchedEngine(tiny_model_path, dtype="float32", max_batch=2, max_len=64, max_adapters=2, max_rank=8)
    yield eng
    eng.close()


def fetch_of(folders: dict[str, Path], gate: dict[str, threading.Event] | None = None) -> Any:
    """The disk tier: a folder per key; a key in ``gate`` waits for its event first (a slow store)."""
    def fetch(key: str) -> tuple[Path, None, bool]:
        if gate and key in gate:
            gate[key].wait(30)
        return folders[key], None, False

    return fetch


class BankOOM:
    """The device out of memory for a new adapter bank (the one allocation ``place`` makes on first use of a
    module): ``torch.zeros`` of a bank's shape raises while ``on`` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, slots: int):
        self.on, self.slots, real = True, slots, torch.zeros

        def zeros(*size: Any, **kw: Any) -> Any:
            if self.on and size and size[0] == self.slots + 1:
                raise RuntimeError(OOM)
            return real(*size, **kw)

        monkeypatch.setattr(torch, "zeros", zeros)


# 1 ----------------------------------------------------------------------------------------------------------
def test_a_failed_place_gives_its_slot_back(engine: BatchedEngine, adapters: dict, monkeypatch) -> None:
    parsed = engine.read_adapter(adapters["eve/mlp@1"])
    oom = BankOOM(monkeypatch, engine.max_adapters)
    for _ in range(3):  # each try used to leak one slot: none left after max_adapters tries
        with pytest.raises(RuntimeError, match="out of memory"):
            engine.place("eve/mlp@1", parsed)
    assert engine.free_slots == 2 and engine.adapters == []
    oom.on = False
    engine.place("eve/mlp@1", parsed)
    engine.load_adapter("bob/p@1", adapters["bob/p@1"])
    assert engine.free_slots == 0 and engine.adapters == ["bob/p@1", "eve/mlp@1"]


def test_retries_of_a_failed_place_fail_fast_and_evict_nobody(engine: BatchedEngine, adapters: dict,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    tiers = AdapterTiers(engine, fetch_of(adapters), slot_wait_s=2.0, tenant_max_slots=0)
    tiers.load("bob/p@1")
    tiers.load("bob/p@2")
    oom = BankOOM(monkeypatch, engine.max_adapters)
    with pytest.raises(RuntimeError, match="out of memory"):
        tiers.acquire("eve/mlp@1", "eve")  # evicts bob's LRU adapter for it: the one eviction
    assert tiers.resident()["device"] == ["bob/p@2"] and engine.free_slots == 1
    for _ in range(3):
        t0 = time.monotonic()
        with pytest.raises(AdapterBusy, match="could not be placed"):
            tiers.acquire("eve/mlp@1", "eve")
        assert time.monotonic() - t0 < 0.5
    assert tiers.resident()["device"] == ["bob/p@2"] and engine.free_slots == 1  # bob keeps his adapter
    tiers.acquire("bob/p@1", "bob")  # and bob's other one finds a slot
    tiers.release("bob/p@1", "bob")
    oom.on = False
    tiers._place_failed["eve/mlp@1"] = (time.monotonic() - 1, "RuntimeError", None)  # PLACE_RETRY_S later
    tiers.acquire("eve/mlp@1", "eve")
    assert "eve/mlp@1" in engine.adapters and engine.free_slots == 0


def test_retries_of_a_place_the_engine_refused_get_its_refusal(engine: BatchedEngine, adapters: dict,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A place the engine refuses (a LoRA-XS basis naming a module the base lacks) refuses every retry
    the same way: its 400, not a 503 telling the client to retry."""
    from adapterfab.serve.engine import AdapterRejected

    tiers = AdapterTiers(engine, fetch_of(adapters), slot_wait_s=2.0, tenant_max_slots=0)
    real = engine.place

    def refuse(key: str, parsed: Any) -> None:
        raise AdapterRejected("its basis has no q_proj")

    monkeypatch.setattr(engine, "place", refuse)
    for _ in range(2):
        with pytest.raises(AdapterRejected, match="no q_proj"):
            tiers.acquire("eve/mlp@1", "eve")
    monkeypatch.setattr(engine, "place", real)


# 2 ----------------------------------------------------------------------------------------------------------
def test_one_tenants_slow_cold_load_does_not_hold_up_anothers(engine: BatchedEngine, adapters: dict,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve's multiplexer runs the replica's loader under one asyncio lock (Ray 2.x); run for real here,
    with its replica context and metrics pusher stubbed (no cluster)."""
    from types import SimpleNamespace
    from unittest import mock

    import ray.serve.multiplex as mx
    from ray import serve

    from adapterfab.serve.app import EngineDeployment

    slow = threading.Event()
    tiers = AdapterTiers(engine, fetch_of(adapters, {"eve/mlp@1": slow}), slot_wait_s=10.0)
    dep = EngineDeployment.__new__(EngineDeployment)
    dep.engine, dep.tiers, dep.loads = engine, tiers, 0
    dep.backend = TieredBackend(engine, tiers)
    model_id: contextvars.ContextVar[str] = contextvars.ContextVar("model_id")
    monkeypatch.setattr(serve, "get_multiplexed_model_id", lambda: model_id.get())
    ctx = SimpleNamespace(app_name="a", deployment="EngineDeployment", replica_id="r1")
    params = SamplingParams(max_tokens=2, temperature=0.0)

    async def request(key: str) -> float:
        model_id.set(key)
        t0 = time.monotonic()
        events = [ev async for ev in dep.generate([{"role": "user", "content": "hi"}], params)]
        assert isinstance(events[-1], Finished)
        return time.monotonic() - t0

    async def main() -> None:
        dep._get_adapter = dep._multiplexer(4)
        eve = asyncio.create_task(request("eve/mlp@1"))  # its store is slow
        await asyncio.sleep(0.2)
        took = await asyncio.wait_for(request("bob/p@1"), 20)
        assert not eve.done()
        slow.set()
        await asyncio.wait_for(eve, 20)
        model_id.set("bob/p@2")
        assert await dep.prefetch() and "bob/p@2" in engine.adapters  # a prefetch still loads it
        assert took < 10

    with mock.patch.object(mx, "_get_internal_replica_context", return_value=ctx), \
            mock.patch.object(mx, "MetricsPusher"), mock.patch("ray.serve._private.usage.ServeUsageTag"):
        asyncio.run(main())
    slow.set()


# 3 ----------------------------------------------------------------------------------------------------------
def test_a_rejected_adapter_leaves_no_tensor_behind(engine: BatchedEngine, adapters: dict,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch as st

    read: list[weakref.ref] = []
    real = st.load_file

    def load_file(*a: Any, **kw: Any) -> dict:
        state = real(*a, **kw)
        read.extend(weakref.ref(t) for t in state.values())
        return state

    monkeypatch.setattr(st, "load_file", load_file)
    tiers = AdapterTiers(engine, lambda key: (adapters["eve/r16@1"], None, False), slot_wait_s=0.5)
    for n in range(1, 4):  # rank 16 > the engine's max_rank 8
        with pytest.raises(Exception, match="rank 16"):
            tiers.acquire(f"eve/r16@{n}", "eve")
    gc.collect()
    assert read and not [r for r in read if r() is not None]


# 4 ----------------------------------------------------------------------------------------------------------
def basis(uri: str, n: int) -> Any:
    from adapterfab.methods.lora_xs import Basis

    return Basis(uri, 2, ("q_proj",), "fp", {"q": (torch.zeros(n), torch.zeros(n))})  # 8n bytes


def test_a_basis_downloads_outside_the_cache_lock_once_and_the_cache_is_bounded() -> None:
    from adapterfab.serve.backend import BasisCache

    cache = BasisCache(max_bytes=1000)
    calls: list[str] = []
    slow = threading.Event()

    def load(uri: str) -> Any:
        def run() -> Any:
            calls.append(uri)
            if uri == "big":
                slow.wait(10)
            return basis(uri, 50)  # 400 bytes
        return run

    small = cache.get("small", load("small"))
    big = [threading.Thread(target=lambda: cache.get("big", load("big"))) for _ in range(3)]
    for t in big:
        t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    assert cache.get("small", load("small")) is small and time.monotonic() - t0 < 0.1  # not behind "big"
    slow.set()
    for t in big:
        t.join(10)
    assert calls == ["small", "big"]  # "big" once for its three loads
    cache.get("c", load("c"))  # 1200 bytes held: "small", the least recently used, goes
    assert list(cache.bases) == ["big", "c"]
    assert cache.get("small", load("small")) is small and calls[-1] == "c"  # still in use: found again
    cache.get("d", load("d"))  # "c" goes, and nobody holds it
    gc.collect()
    cache.get("c", load("c"))
    assert calls.count("c") == 2  # downloaded again


# 5 ----------------------------------------------------------------------------------------------------------
def test_an_adapter_the_engine_refuses_is_a_400(engine: BatchedEngine, adapters: dict, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from adapterfab.ids import AdapterId
    from adapterfab.keys import KeyStore
    from adapterfab.registry import AdapterVersion
    from adapterfab.serve.api import make_api
    from adapterfab.state import StateStore

    big = adapters["eve/r16@1"]  # rank 16 > max_rank 8
    backend = TieredBackend(engine, AdapterTiers(engine, lambda k: (big, None, True), slot_wait_s=0.5))

    def resolve(aid: AdapterId) -> AdapterVersion:
        return AdapterVersion(aid.unversioned().with_version(1), str(big), None, {}, (), 0.0)

    keys = KeyStore(StateStore(f"sqlite:///{tmp_path / 'state.db'}"))
    key = keys.create("acme")
    with TestClient(make_api(backend, keys.verify, resolve)) as c:
        r = c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                   json={"model": "acme/big", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "adapter_not_servable" and err["param"] == "model"
    assert str(tmp_path.parent) not in err["message"] and str(big) not in err["message"]


# 6 ----------------------------------------------------------------------------------------------------------
def test_simple_engine_calls_never_hold_the_tiers_lock(tiny_model_path: str, adapters: dict) -> None:
    from adapterfab.serve.engine import Engine

    eng = Engine(tiny_model_path, torch_threads=1, max_adapters=3)
    tiers = AdapterTiers(eng, fetch_of(adapters), slot_wait_s=10.0, tenant_max_slots=0)
    tiers.acquire("bob/p@1", "bob")
    tiers.load("bob/p@2")  # one slot left free
    running = eng.generate_token_ids([5, 6, 7], "bob/p@1", SamplingParams(max_tokens=20, temperature=0.0))
    next(running)  # a generation holds the engine's lock until it ends
    errors: list[BaseException] = []

    def in_thread(fn: Any) -> threading.Thread:
        def run() -> None:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        return t

    loading = in_thread(lambda: tiers.acquire("eve/mlp@1", "eve"))  # a free slot: places, waits for the engine
    evicting = in_thread(lambda: tiers.evict("bob/p@2"))  # waits for the engine too
    time.sleep(0.5)
    assert evicting.is_alive() and loading.is_alive()
    quick = in_thread(lambda: (tiers.stats(), tiers.resident(), tiers.acquire("bob/p@1", "bob"),
                               tiers.release("bob/p@1", "bob")))  # the event loop's calls
    quick.join(2)
    assert not quick.is_alive()
    running.close()
    evicting.join(10)
    loading.join(10)
    assert not errors and tiers.resident()["device"] == ["bob/p@1", "eve/mlp@1"] == eng.adapters
    tiers.release("bob/p@1", "bob")
    tiers.release("eve/mlp@1", "eve")


# 7 ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rps", [None, 0])
def test_overrides_limit_their_tenants_without_a_default_rate(rps: float | None, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from unittest import mock

    import adapterfab.serve.api as api
    from adapterfab.serve.app import Ingress, ServeConfig

    cfg = ServeConfig(base_model_path="/x", state_url=f"sqlite:///{tmp_path / 's.db'}",
                      mlflow_uri="http://127.0.0.1:9", tenant_rps=rps, tenant_burst=2,
                      tenant_rps_overrides={"abuser": 1.0}, registry_catalogue=False)
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):  # the ingress sets them
        monkeypatch.setenv(name, "1")
    seen: dict = {}
    cls = getattr(Ingress, "func_or_class", Ingress)
    ing = cls.__new__(cls)
    ing.engine, ing.cfg = None, cfg
    with mock.patch.object(api, "make_api", lambda *a, **kw: seen.update(kw)):
        cls.__serve_build_asgi_app__(ing)
    limiter = seen["rate_limit"]
    waits = [limiter.check("abuser") for _ in range(3)]  # a burst of 2, then 1 request/s
    assert waits[:2] == [0.0, 0.0] and waits[2] > 0
    assert all(limiter.check("other") == 0.0 for _ in range(100))


# 8 ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arg", ["max_adapters_per_replica", "max_batch", "max_len", "max_rank", "torch_threads"])
def test_app_builder_refuses_what_a_replica_cannot_start_with(arg: str, tiny_model_path: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterfab.serve import app as serve_app

    built: list = []
    monkeypatch.setattr(serve_app, "build_app", built.append)
    ok = {"base_model": tiny_model_path, "mlflow_uri": "http://127.0.0.1:9", "state_url": "sqlite://"}
    with pytest.raises(ValueError, match=f"{arg} must be at least 1"):
        serve_app.app_builder({**ok, arg: 0})
    with pytest.raises(ValueError, match="cpu_cache_mb must not be negative"):
        serve_app.app_builder({**ok, "cpu_cache_mb": -1})
    with pytest.raises(ValueError, match="tenant_rps_overrides"):
        serve_app.app_builder({**ok, "tenant_rps_overrides": {"a": -1}})
    serve_app.app_builder({**ok, arg: 1, "cpu_cache_mb": 0, "tenant_rps_overrides": {"a": 0.5}})
    assert getattr(built[0], arg) == 1
