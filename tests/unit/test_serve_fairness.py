"""Fairness between tenants in front of the engine's rows: adapter slots and the threads that wait for them.

- One tenant pins at most ``tenant_max_slots`` distinct adapters in the device slots (default three quarters
  of them): its queued requests cannot hold every slot, so another tenant's adapter still finds one, and
  the tenant over its cap waits for its own pins (then gets the same retryable AdapterBusy).
- A resident adapter is pinned on the event loop; loads and slot waits run on the backend's own threads, at
  most ``tenant_waits`` per tenant, so a tenant's waiting requests never take the loop's default executor
  (which serves everyone's ``asyncio.to_thread``) or every slot thread.

A fake engine (slots only) keeps these fast; the real engine's slots are tests/unit/test_tiers.py's.
Also: a deployment's args (``app_builder``: RayService, ``serve deploy``) set every ServeConfig field, these
limits included.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from adapterfab.serve.backend import TieredBackend
from adapterfab.serve.engine import Finished, SamplingParams
from adapterfab.serve.tiers import AdapterBusy, AdapterTiers


class SlotEngine:
    """The part of an engine the tiers use: ``max_adapters`` slots, placing and unloading adapters."""

    def __init__(self, slots: int):
        self.max_adapters, self.placed = slots, {}

    @property
    def free_slots(self) -> int:
        return self.max_adapters - len(self.placed)

    def read_adapter(self, folder: Path, basis: Any = None) -> Any:
        return SimpleNamespace(nbytes=1)

    def place(self, key: str, parsed: Any) -> None:
        self.placed[key] = parsed

    def unload_adapter(self, key: str) -> None:
        self.placed.pop(key, None)

    def in_use(self, key: str) -> int:
        return 0

    def generate(self, messages: Any, key: str | None, params: SamplingParams):  # noqa: ANN201
        yield Finished("stop", 1, 0)


def tiers_of(slots: int, **kw: Any) -> AdapterTiers:
    return AdapterTiers(SlotEngine(slots), lambda key: (Path("/nonexistent"), None, False), **kw)


def test_one_tenant_pins_at_most_its_share_of_the_slots() -> None:
    tiers = tiers_of(4, slot_wait_s=0.2)
    assert tiers.slot_cap == 3  # three quarters of 4
    for v in (1, 2, 3):
        tiers.acquire(f"acme/p@{v}", "acme")
    tiers.acquire("acme/p@1", "acme")  # another request for an adapter it pins already: no new slot
    t0 = time.monotonic()
    with pytest.raises(AdapterBusy, match="tenant acme"):  # a fourth distinct adapter: over its cap
        tiers.acquire("acme/p@4", "acme")
    assert time.monotonic() - t0 >= 0.15  # it waited for one of its own pins first
    assert "acme/p@4" not in tiers.engine.placed
    tiers.acquire("globex/q@1", "globex")  # the slot acme could not take is another tenant's
    assert sorted(tiers.engine.placed) == ["acme/p@1", "acme/p@2", "acme/p@3", "globex/q@1"]
    # acme over its cap gets a slot as soon as one of its own requests ends
    tiers.slot_wait_s = 10
    got = threading.Event()
    t = threading.Thread(target=lambda: (tiers.acquire("acme/p@4", "acme"), got.set()))
    t.start()
    time.sleep(0.2)
    assert not got.is_set()
    tiers.release("acme/p@1", "acme")  # one of its two pins of @1: @1 is still pinned by acme
    time.sleep(0.2)
    assert not got.is_set()
    tiers.release("acme/p@2", "acme")  # @2 unpinned: acme is below its cap, @2's slot is evictable
    t.join(10)
    assert got.is_set() and "acme/p@4" in tiers.engine.placed and "acme/p@2" not in tiers.engine.placed
    assert tiers.stats()["tenants_pinning"] == 2
    for key, tenant in (("acme/p@1", "acme"), ("acme/p@3", "acme"), ("acme/p@4", "acme"),
                        ("globex/q@1", "globex")):
        tiers.release(key, tenant)
    assert tiers.stats()["pins"] == 0 and tiers.stats()["tenants_pinning"] == 0
    # 0: no cap; pins without a tenant (an operator's, a benchmark's) count toward none
    tiers.tenant_max_slots = 0
    assert tiers.slot_cap == 4
    assert tiers_of(2).slot_cap == 1 and tiers_of(1).slot_cap == 1 and tiers_of(4, tenant_max_slots=2).slot_cap == 2


def _generate(backend: TieredBackend, key: str | None, hold: asyncio.Event | None = None) -> asyncio.Task:
    async def run() -> list:
        out = []
        async for ev in backend.generate(key, None, [], SamplingParams()):
            out.append(ev)
            if hold is not None:
                await hold.wait()  # the request stays in flight, its adapter pinned
        return out

    return asyncio.ensure_future(run())


def test_queued_requests_of_one_tenant_leave_a_slot_for_another() -> None:
    """What a flood through the backend did: acme's requests for four adapters (queued behind the engine's
    rows, each pinning its adapter) took all four slots, and globex's adapter got a 503 after the wait."""
    tiers = tiers_of(4, slot_wait_s=0.5)
    backend = TieredBackend(tiers.engine, tiers)

    async def main() -> None:
        hold = asyncio.Event()
        acme = [_generate(backend, f"acme/p@{v}", hold) for v in (1, 2, 3, 4) for _ in range(3)]
        await asyncio.sleep(0.2)
        assert tiers.stats()["pins"] == 9 and "acme/p@4" not in tiers.engine.placed  # @4 waits: over the cap
        assert len(await _generate(backend, "globex/q@1")) == 1  # answered: a slot was left for globex
        done, _ = await asyncio.wait(acme, timeout=1.0)
        assert len(done) == 3 and all(isinstance(t.exception(), AdapterBusy) for t in done)  # acme's own 503
        hold.set()
        await asyncio.gather(*acme, return_exceptions=True)
        assert tiers.stats()["pins"] == 0

    try:
        asyncio.run(main())
    finally:
        backend._pool.shutdown(wait=False)


def test_slot_waits_never_take_the_default_executor_nor_every_slot_thread() -> None:
    """Every slot pinned; acme sends many requests for cold adapters, which wait for a slot. Globex's
    request for its resident adapter is pinned on the loop at once, ``asyncio.to_thread`` (guided requests'
    grammars, auth) finds the default executor free, and acme holds at most ``tenant_waits`` slot threads."""
    tiers = tiers_of(2, slot_wait_s=3.0, tenant_max_slots=0)
    backend = TieredBackend(tiers.engine, tiers, slot_threads=8, tenant_waits=2)
    acquire, lock = tiers.acquire, threading.Lock()
    active: collections.Counter[str | None] = collections.Counter()
    most: collections.Counter[str | None] = collections.Counter()

    def counted(key: str, tenant: str | None = None, wait_s: float | None = None) -> None:
        with lock:
            active[tenant] += 1
            most[tenant] = max(most[tenant], active[tenant])
        try:
            acquire(key, tenant, wait_s)
        finally:
            with lock:
                active[tenant] -= 1

    tiers.acquire = counted  # type: ignore[method-assign]

    async def main() -> None:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(4))  # as small as on few CPUs
        hold = asyncio.Event()
        busy = [_generate(backend, "globex/q@1", hold), _generate(backend, "acme/p@1", hold)]
        await asyncio.sleep(0.1)
        assert sorted(tiers.engine.placed) == ["acme/p@1", "globex/q@1"]  # both slots pinned
        waiting = [_generate(backend, f"acme/p@{v}") for v in range(2, 14)]
        await asyncio.sleep(0.3)
        assert active["acme"] == most["acme"] == 2  # acme's turn: 2 threads wait; the other 10 on the loop
        t0 = time.monotonic()
        assert len(await asyncio.wait_for(_generate(backend, "globex/q@1"), 2.0)) == 1  # resident: at once
        assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), 1.0) == 42
        assert time.monotonic() - t0 < 1.0
        hold.set()
        await asyncio.gather(*busy)
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(r, list) or isinstance(r, AdapterBusy) for r in results), results
        assert tiers.stats()["pins"] == 0

    try:
        asyncio.run(main())
    finally:
        backend._pool.shutdown(wait=False)


def test_multiplexer_loads_a_resident_adapter_on_the_loop() -> None:
    """``TieredBackend.load`` (Serve's multiplexer): a resident version answers without a thread."""
    tiers = tiers_of(2)
    backend = TieredBackend(tiers.engine, tiers, slot_threads=1)

    async def main() -> None:
        await backend.load("acme/p@1")  # cold: on a slot thread
        assert "acme/p@1" in tiers.engine.placed and tiers.stats()["device_loads"] == 1
        backend._pool.shutdown(wait=True)  # no thread left to run anything: a resident one needs none
        await asyncio.wait_for(backend.load("acme/p@1"), 1.0)
        assert tiers.stats()["device_hits"] == 1 and tiers.stats()["pins"] == 0

    asyncio.run(main())


def test_app_builder_takes_every_serve_config_field(tiny_model_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``max_tokens_cap`` and ``json_logs`` (and ``tenant_max_slots``) were ServeConfig fields that no
    serve-deploy config could set: app_builder refused them as unknown args."""
    import dataclasses

    from adapterfab.serve import app as serve_app

    fields = {f.name: f for f in dataclasses.fields(serve_app.ServeConfig)}
    assert set(serve_app._BUILDER_OPTIONAL) == set(fields) - {"base_model_path", "state_url", "mlflow_uri",
                                                               "base_fingerprint"}
    for name, kind in serve_app._BUILDER_OPTIONAL.items():  # each arg is read as its field's type
        assert kind.__name__ in str(fields[name].type), (name, kind, fields[name].type)
    built: list = []
    monkeypatch.setattr(serve_app, "build_app", built.append)
    ok = {"base_model": tiny_model_path, "mlflow_uri": "http://127.0.0.1:9", "state_url": "sqlite://"}
    serve_app.app_builder({**ok, "max_tokens_cap": "512", "json_logs": "true", "tenant_max_slots": 2})
    serve_app.app_builder({**ok, "max_tokens_cap": 64.0, "json_logs": False})
    assert [(c.max_tokens_cap, c.json_logs) for c in built] == [(512, True), (64, False)]
    assert built[0].tenant_max_slots == 2 and built[1].tenant_max_slots is None
    with pytest.raises(ValueError, match="max_tokens_cap=1.5 is not a valid int"):
        serve_app.app_builder({**ok, "max_tokens_cap": 1.5})
    with pytest.raises(ValueError, match="max_tokens_cap must be at least 1"):
        serve_app.app_builder({**ok, "max_tokens_cap": 0})
    with pytest.raises(ValueError, match="json_logs=1 is not a valid bool"):
        serve_app.app_builder({**ok, "json_logs": 1})
    with pytest.raises(ValueError, match="tenant_max_slots must not be negative"):
        serve_app.app_builder({**ok, "tenant_max_slots": -1})
