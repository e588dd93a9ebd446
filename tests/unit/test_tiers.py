"""Adapter tiers in front of the batched engine, with adapters in a real (local) artifact store: LRU
eviction from the device keeps the adapter read in RAM, pinned adapters are never evicted, concurrent
requests for a cold adapter load it once, the RAM tier has a byte budget backed by the disk cache,
prefetch warms an adapter, the counters and load latency say what happened; and a thousand LoRA-XS
adapters stay resident at once while requests for many of them decode together."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from adapterfab.serve.batched import BatchedEngine
from adapterfab.serve.engine import SamplingParams
from adapterfab.serve.tiers import AdapterBusy, AdapterTiers
from adapterfab.storage import LocalStore

GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def store(tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory, make_lora_adapter) -> dict:
    root = tmp_path_factory.mktemp("tiers")
    s = LocalStore(root / "store")
    uris = {}
    for i in range(4):
        uris[f"t/p@{i + 1}"] = s.upload_dir(make_lora_adapter(tiny_model_path, root / f"src{i}", 10 + i), f"a/{i}")
    return {"store": s, "uris": uris, "root": root}


class Fetch:
    """The disk and store tiers: download from the artifact store into a cache folder once."""

    def __init__(self, store: dict, cache: Path, delay_s: float = 0.0):
        self.store, self.cache, self.delay_s = store, cache, delay_s
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, key: str) -> tuple[Path, None, bool]:
        with self.lock:
            self.calls += 1
        dest = self.cache / key.replace("/", "_").replace("@", "_")
        if (dest / "adapter_config.json").exists():
            return dest, None, False
        time.sleep(self.delay_s)
        self.store["store"].download_dir(self.store["uris"][key], dest)
        return dest, None, True


@pytest.fixture()
def engine(tiny_model_path: str):
    eng = BatchedEngine(tiny_model_path, dtype="float32", max_batch=4, max_len=128, max_adapters=2, max_rank=8)
    yield eng
    eng.close()


def test_lru_eviction_keeps_ram_copy_and_pins_block_eviction(engine: BatchedEngine, store: dict,
                                                            tmp_path: Path) -> None:
    fetch = Fetch(store, tmp_path / "disk")
    tiers = AdapterTiers(engine, fetch, slot_wait_s=0.5)
    tiers.load("t/p@1")
    tiers.load("t/p@2")
    tiers.load("t/p@1")  # a hit: @2 is now the least recently used
    tiers.load("t/p@3")  # evicts @2 from the device, not from RAM
    assert sorted(engine.adapters) == ["t/p@1", "t/p@3"]
    s = tiers.stats()
    assert s["store_loads"] == 3 and s["device_hits"] == 1 and s["device_evictions"] == 1
    tiers.load("t/p@2")  # back from RAM: no store, no disk
    s = tiers.stats()
    assert s["cpu_hits"] == 1 and s["store_loads"] == 3 and fetch.calls == 3
    assert s["load_p50_s"] is not None and s["load_p50_s"] > 0
    # both slots pinned by running requests: a third adapter waits, then gives up
    tiers.acquire("t/p@1")
    tiers.acquire("t/p@2")
    with pytest.raises(AdapterBusy):
        tiers.acquire("t/p@4")
    # ... and gets a slot as soon as one request ends
    got = threading.Event()
    tiers.slot_wait_s = 10
    t = threading.Thread(target=lambda: (tiers.acquire("t/p@4"), got.set()))
    t.start()
    time.sleep(0.3)
    assert not got.is_set()
    tiers.release("t/p@1")
    t.join(timeout=10)
    assert got.is_set() and sorted(engine.adapters) == ["t/p@2", "t/p@4"]
    assert not tiers.evict("t/p@2")  # pinned: stays
    tiers.release("t/p@2")
    assert tiers.evict("t/p@2") and engine.adapters == ["t/p@4"]
    tiers.release("t/p@4")


def test_cold_adapter_loads_once_for_concurrent_requests(engine: BatchedEngine, store: dict, tmp_path: Path) -> None:
    fetch = Fetch(store, tmp_path / "disk", delay_s=0.5)
    tiers = AdapterTiers(engine, fetch)
    outs: list = []

    def request() -> None:
        tiers.acquire("t/p@1")
        try:
            outs.append(tuple(engine.generate_token_ids([5, 6, 7, 8], "t/p@1", GREEDY)))
        finally:
            tiers.release("t/p@1")

    threads = [threading.Thread(target=request) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(outs) == 8 and len(set(outs)) == 1
    s = tiers.stats()
    assert fetch.calls == 1 and s["store_loads"] == 1 and s["device_loads"] == 1


def test_ram_budget_falls_back_to_disk_and_prefetch(engine: BatchedEngine, store: dict, tmp_path: Path) -> None:
    fetch = Fetch(store, tmp_path / "disk")
    one = engine.read_adapter(fetch("t/p@1")[0]).nbytes
    fetch.calls = 0
    tiers = AdapterTiers(engine, fetch, cpu_bytes=int(one * 1.5))  # room for one adapter in RAM
    tiers.load("t/p@1")
    tiers.load("t/p@2")
    assert tiers.stats()["cpu_evictions"] == 1 and tiers.resident()["cpu"] == ["t/p@2"]
    tiers.load("t/p@3")  # device full: @1 leaves the device; RAM holds only @3
    tiers.load("t/p@1")  # not in RAM any more: read again from the disk cache, not the store
    s = tiers.stats()  # (@1 was on disk from the size probe above; @2 and @3 came from the store)
    assert s["disk_hits"] == 2 and s["store_loads"] == 2 and s["cpu_evictions"] == 3
    tiers.evict("t/p@1")
    tiers.prefetch("t/p@4").join(timeout=30)
    s = tiers.stats()
    assert s["prefetches"] == 1 and "t/p@4" in engine.adapters  # a free slot: warmed onto the device


@pytest.mark.timeout(300)
def test_a_thousand_lora_xs_adapters_resident(tiny_model_path: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from adapterfab.methods.lora_xs import LoraXSConfig, compute_basis, load, write_adapter

    cfg = LoraXSConfig(r=4, alpha=4)
    basis = compute_basis(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32), cfg, "tiny")
    gen = torch.Generator().manual_seed(0)
    n = 1000
    folders = {}
    for i in range(n):
        rs = {m: torch.randn(4, 4, generator=gen) * 2.0 for m in basis.factors}
        folders[f"xs/a@{i + 1}"] = write_adapter(tmp_path / f"a{i}", cfg, basis.id, basis.digest,
                                                 basis.base_fingerprint, cfg.resolved_targets(), rs)
    eng = BatchedEngine(tiny_model_path, dtype="float32", max_batch=16, max_len=64, max_adapters=n, max_rank=4)
    try:
        tiers = AdapterTiers(eng, lambda key: (folders[key], basis, False))
        t0 = time.monotonic()
        for key in folders:
            tiers.load(key)
        load_s = time.monotonic() - t0
        assert len(eng.adapters) == n and tiers.stats()["device_evictions"] == 0
        picks = [f"xs/a@{i}" for i in (1, 7, 42, 333, 500, 999, 1000, 64, 128, 256, 512, 777)]
        got: dict = {}

        def run(key: str) -> None:
            got[key] = list(eng.generate_token_ids([3, 4, 5, 6, 7], key, GREEDY))

        threads = [threading.Thread(target=run, args=(k,)) for k in picks]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert eng.stats()["mean_batch_rows"] > 2
        for key in picks[:4]:  # equal to each adapter alone in LoRA-XS's own model
            model = load(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32),
                         folders[key], basis).eval()
            ids, want = torch.tensor([[3, 4, 5, 6, 7]]), []
            with torch.no_grad():
                for _ in range(len(got[key])):
                    nxt = int(model(input_ids=ids).logits[0, -1].argmax())
                    want.append(nxt)
                    ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            assert got[key] == want, key
        assert len({tuple(v) for v in got.values()}) > 3
        print(f"{n} LoRA-XS adapters placed in {load_s:.2f}s")
    finally:
        eng.close()


def test_a_request_cancelled_while_its_adapter_loads_leaves_no_pin() -> None:
    """TieredBackend: a client that goes away while its adapter is still being made resident (the load
    runs on in a thread) must not leave the pin the load takes: it is released as soon as it is taken,
    and a request that completes releases its own."""
    import asyncio
    import threading

    from adapterfab.serve.backend import TieredBackend
    from adapterfab.serve.engine import Finished, SamplingParams

    class SlowTiers:
        def __init__(self) -> None:
            self.pins, self.loading = 0, threading.Event()

        def acquire(self, key: str, tenant: str | None = None, wait_s: float | None = None) -> None:
            self.loading.set()
            time.sleep(0.3)
            self.pins += 1

        def release(self, key: str, tenant: str | None = None) -> None:
            self.pins -= 1

    class OneEventEngine:
        def generate(self, messages, key, params):  # noqa: ANN001, ANN201
            yield Finished("stop", 1, 0)

    tiers = SlowTiers()
    backend = TieredBackend(OneEventEngine(), tiers)

    async def consume() -> list:
        return [ev async for ev in backend.generate("acme/pirate@1", None, [], SamplingParams())]

    async def main() -> None:
        task = asyncio.create_task(consume())
        await asyncio.to_thread(tiers.loading.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.6)  # the load finishes after the cancellation
        assert tiers.pins == 0
        assert len(await consume()) == 1 and tiers.pins == 0

    asyncio.run(main())


def test_a_slot_freed_by_the_engine_after_its_pin_went_is_found(engine: BatchedEngine, store: dict,
                                                               tmp_path: Path) -> None:
    """A request's tiers pin goes (its client left) a moment before the engine retires its row; a request
    waiting for a slot was woken by the release, found the adapter still in the engine's use, and slept
    until its slot_wait_s ran out (AdapterBusy, review 2026-12-07): the engine's own release notifies
    nobody. Now the wait looks again while the engine finishes."""
    engine.eos_ids = set()
    tiers = AdapterTiers(engine, Fetch(store, tmp_path / "disk"), slot_wait_s=5.0, tenant_max_slots=0)
    for key in ("t/p@1", "t/p@2"):  # both slots: one running request each
        tiers.acquire(key, "t1")
    streams = [engine.generate_token_ids([5, 6, 7], key, SamplingParams(max_tokens=400, temperature=0.0))
               for key in ("t/p@1", "t/p@2")]
    for s in streams:
        next(s)
    got: dict = {}

    def other() -> None:
        t0 = time.monotonic()
        try:
            tiers.acquire("t/p@3", "t2")
            got["s"] = time.monotonic() - t0
        except AdapterBusy as e:
            got["error"] = e

    waiter = threading.Thread(target=other)
    waiter.start()
    time.sleep(0.5)  # t/p@3 is read and waits for a slot
    tiers.release("t/p@1", "t1")  # the client went away: the pin first ...
    time.sleep(0.2)
    streams[0].close()  # ... the engine's row a moment later
    waiter.join(timeout=10)
    assert "error" not in got and got["s"] < 3.0, got
    assert sorted(engine.adapters) == ["t/p@2", "t/p@3"]
    streams[1].close()
    tiers.release("t/p@2", "t1")
    tiers.release("t/p@3", "t2")
