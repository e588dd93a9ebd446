"""Adapter tiers in front of the batched engine: device slots ← CPU RAM ← local disk ← artifact store.

- **device**: the engine's adapter slots (``BatchedEngine.max_adapters``), LRU; an adapter is pinned
  while a request uses it and is never evicted then.
- **CPU**: adapters read and shape-checked (``ParsedAdapter``), LRU within ``cpu_bytes``; re-admitting
  one to the device is a copy, no file read.
- **disk**: the local cache folder that ``fetch`` fills (``serve.backend.download_native``).
- **store**: the registry's artifact store, reached only through ``fetch``.

Concurrent requests for a cold adapter trigger one load (the others wait for it). ``prefetch`` warms
an adapter in the background (an alias that moved). ``stats()`` reports hits per tier, loads from the
store, evictions and load latency.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterfab.errors import AdapterfabError

log = logging.getLogger("adapterfab.serve.tiers")
COUNTERS = ("device_hits", "device_loads", "device_evictions", "cpu_hits", "cpu_evictions", "disk_hits",
            "store_loads", "prefetches")


class AdapterBusy(AdapterfabError):
    """Every device slot is pinned by running requests and none frees up in time."""


class AdapterTiers:
    """``fetch(key) -> (local folder, basis or None, came_from_store)``: the disk and store tiers
    (blocking; run from worker threads). Every method is thread-safe and may block."""

    def __init__(self, engine: Any, fetch: Callable[[str], tuple[Path, Any, bool]], cpu_bytes: int = 2 << 30,
                 slot_wait_s: float = 30.0):
        self.engine, self.fetch, self.cpu_bytes, self.slot_wait_s = engine, fetch, cpu_bytes, slot_wait_s
        self._lock = threading.Condition()
        self._device: collections.OrderedDict[str, None] = collections.OrderedDict()  # LRU order
        self._cpu: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._cpu_used = 0
        self._pins: collections.Counter[str] = collections.Counter()
        self._loading: dict[str, threading.Event] = {}
        self._errors: dict[str, BaseException] = {}
        self.counts: collections.Counter[str] = collections.Counter()
        self.load_s: collections.deque[float] = collections.deque(maxlen=1000)

    # -- public -----------------------------------------------------------------------------------
    def acquire(self, key: str) -> None:
        """Make ``key`` resident on the device and pin it (``release`` when the request ends)."""
        self._ensure(key, pin=True)

    def release(self, key: str) -> None:
        with self._lock:
            self._pins[key] -= 1
            if self._pins[key] <= 0:
                del self._pins[key]
            self._lock.notify_all()

    def load(self, key: str) -> None:
        """Make ``key`` resident on the device without pinning it."""
        self._ensure(key, pin=False)

    def prefetch(self, key: str) -> threading.Thread:
        """Warm ``key`` in the background: into the CPU tier, and onto the device if a slot is free."""
        def run() -> None:
            try:
                self._parsed(key)
                with self._lock:
                    room = self.engine.free_slots > 0
                if room:
                    self._ensure(key, pin=False)
                self.counts["prefetches"] += 1
            except Exception:  # noqa: BLE001 - a failed prefetch only costs the later request a load
                log.warning("prefetch of %s failed", key, exc_info=True)

        t = threading.Thread(target=run, name=f"prefetch-{key}", daemon=True)
        t.start()
        return t

    def evict(self, key: str) -> bool:
        """Take ``key`` off the device (it stays in the CPU tier); False while it is pinned."""
        with self._lock:
            if self._pins[key] > 0 or key not in self._device:
                return False
            self._unplace(key)
            return True

    def resident(self) -> dict[str, list[str]]:
        with self._lock:
            return {"device": list(self._device), "cpu": list(self._cpu)}

    def stats(self) -> dict[str, Any]:
        lat = sorted(self.load_s)
        pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 4) if lat else None)  # noqa: E731
        with self._lock:
            counts = {k: self.counts.get(k, 0) for k in COUNTERS}
            return {**counts, "device_resident": len(self._device), "cpu_resident": len(self._cpu),
                    "pins": sum(self._pins.values()),
                    "cpu_bytes": self._cpu_used, "load_p50_s": pct(0.5), "load_p99_s": pct(0.99)}

    # -- internals --------------------------------------------------------------------------------
    def _ensure(self, key: str, pin: bool) -> None:
        t0 = time.monotonic()
        with self._lock:
            if key in self._device:
                self._device.move_to_end(key)
                self.counts["device_hits"] += 1
                if pin:
                    self._pins[key] += 1
                return
        parsed = self._parsed(key)  # single flight per key (CPU tier, then disk/store)
        deadline = time.monotonic() + self.slot_wait_s
        with self._lock:
            while key not in self._device:
                if self.engine.free_slots == 0 and not self._evict_lru():
                    if not self._lock.wait(timeout=max(0.0, deadline - time.monotonic())):
                        raise AdapterBusy(f"all {self.engine.max_adapters} adapter slots are in use by running "
                                          "requests; retry shortly")
                    continue
                self.engine.place(key, parsed)
                self._device[key] = None
                self.counts["device_loads"] += 1
                self.load_s.append(time.monotonic() - t0)
            self._device.move_to_end(key)
            if pin:
                self._pins[key] += 1

    def _evict_lru(self) -> bool:
        for old in self._device:  # least recently used first
            if self._pins[old] <= 0 and not self.engine.in_use(old):
                self._unplace(old)
                return True
        return False

    def _unplace(self, key: str) -> None:
        self.engine.unload_adapter(key)
        self._device.pop(key, None)
        self.counts["device_evictions"] += 1

    def _parsed(self, key: str) -> Any:
        while True:
            with self._lock:
                hit = self._cpu.get(key)
                if hit is not None:
                    self._cpu.move_to_end(key)
                    self.counts["cpu_hits"] += 1
                    return hit
                waiter = self._loading.get(key)
                if waiter is None:
                    done = self._loading[key] = threading.Event()
                    break
            waiter.wait()  # another thread is loading it: one load serves everyone
            with self._lock:
                err = self._errors.get(key)
                if err is not None and key not in self._cpu:
                    raise err
        try:
            folder, basis, from_store = self.fetch(key)
            parsed = self.engine.read_adapter(folder, basis)
            with self._lock:
                self.counts["store_loads" if from_store else "disk_hits"] += 1
                self._errors.pop(key, None)
                self._cpu[key] = parsed
                self._cpu_used += parsed.nbytes
                while self._cpu_used > self.cpu_bytes and len(self._cpu) > 1:
                    _, old = self._cpu.popitem(last=False)
                    self._cpu_used -= old.nbytes
                    self.counts["cpu_evictions"] += 1
            return parsed
        except BaseException as e:
            with self._lock:
                self._errors[key] = e
            raise
        finally:
            with self._lock:
                self._loading.pop(key, None)
            done.set()
