"""Adapter tiers in front of the batched engine: device slots ← CPU RAM ← local disk ← artifact store.

- **device**: the engine's adapter slots (``BatchedEngine.max_adapters``), LRU; an adapter is pinned
  while a request uses it and is never evicted then.
- **CPU**: adapters read and shape-checked (``ParsedAdapter``), LRU within ``cpu_bytes``; re-admitting
  one to the device is a copy, no file read.
- **disk**: the local cache folder that ``fetch`` fills (``serve.backend.download_native``).
- **store**: the registry's artifact store, reached only through ``fetch``.

Pins are the slots' fairness: a request's pin names its tenant (``acquire(key, tenant)``), and one tenant
pins at most ``tenant_max_slots`` distinct adapters at once (default three quarters of the slots, at least
one), so its queued requests cannot hold every slot and another tenant's adapter always finds one; a
tenant at its cap waits for one of its own pins to go (then ``AdapterBusy``, a retryable 503 to it alone).

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
from adapterfab.serve.engine import AdapterRejected

log = logging.getLogger("adapterfab.serve.tiers")
COUNTERS = ("device_hits", "device_loads", "device_evictions", "cpu_hits", "cpu_evictions", "disk_hits",
            "store_loads", "prefetches")


ENGINE_RELEASE_POLL_S = 0.01  # how often a wait for a slot looks again while the engine retires a request
PLACE_RETRY_S = 30.0  # a key whose place on the device failed (e.g. out of memory) is not tried again for this long
PLACE_FAILED_MAX = 1024  # failed places remembered at once (oldest forgotten first)


class AdapterBusy(AdapterfabError):
    """Every device slot is pinned by running requests and none frees up in time (or the requesting
    tenant already pins its ``tenant_max_slots`` adapters and none of them is released in time)."""


class _FolderGone(AdapterBusy):
    """The RAM tier's entry for an adapter names a folder that is gone: read it again (``_ensure``)."""


class AdapterTiers:
    """``fetch(key) -> (local folder, basis or None, came_from_store)``: the disk and store tiers
    (blocking; run from worker threads). Every method is thread-safe and may block, except ``try_acquire``
    and ``try_load``, which never wait (an event loop's fast path). ``tenant_max_slots``: distinct adapters
    one tenant's requests may pin at once (None: three quarters of the engine's slots, at least one; 0: no cap)."""

    def __init__(self, engine: Any, fetch: Callable[[str], tuple[Path, Any, bool]], cpu_bytes: int = 2 << 30,
                 slot_wait_s: float = 30.0, tenant_max_slots: int | None = None):
        self.engine, self.fetch, self.cpu_bytes, self.slot_wait_s = engine, fetch, cpu_bytes, slot_wait_s
        self.tenant_max_slots = tenant_max_slots
        self._held: dict[str, collections.Counter[str]] = {}  # tenant -> adapter -> pins of its requests
        self._lock = threading.Condition()
        self._device: collections.OrderedDict[str, None] = collections.OrderedDict()  # LRU order
        self._cpu: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._cpu_used = 0
        self._pins: collections.Counter[str] = collections.Counter()
        # key -> (its read finishing, where a failed read leaves its error for that read's waiters only): no
        # error outlives its waiters (a kept one pinned its traceback's frames: the whole tensors read, review)
        self._loading: dict[str, tuple[threading.Event, list[BaseException]]] = {}
        # keys being placed on or taken off the device outside the lock (the engine may block meanwhile: the
        # one-at-a-time engine waits for a running generation); each holds a slot until it is done
        self._moving: dict[str, str] = {}
        # key -> (retry after, its error's name, its text when the engine refused the adapter) of a failed place
        self._place_failed: dict[str, tuple[float, str, str | None]] = {}
        self.counts: collections.Counter[str] = collections.Counter()
        self.load_s: collections.deque[float] = collections.deque(maxlen=1000)

    # -- public -----------------------------------------------------------------------------------
    def acquire(self, key: str, tenant: str | None = None, wait_s: float | None = None) -> None:
        """Make ``key`` resident on the device and pin it (``release`` with the same tenant when the request
        ends). ``tenant``: whose request it is (None: not counted toward any tenant's cap); ``wait_s``: how
        long to wait for a slot (default ``slot_wait_s``)."""
        self._ensure(key, True, tenant, wait_s)

    def try_acquire(self, key: str, tenant: str | None = None) -> bool:
        """Pin ``key`` now if it is resident and ``tenant`` may pin it, without waiting for anything (not
        even a busy lock) and without loading; False: call ``acquire``."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if key not in self._device or not self._may_pin(key, tenant):
                return False
            self._hit(key)
            self._pin(key, tenant)
            return True
        finally:
            self._lock.release()

    def release(self, key: str, tenant: str | None = None) -> None:
        with self._lock:
            self._pins[key] -= 1
            if self._pins[key] <= 0:
                del self._pins[key]
            held = self._held.get(tenant) if tenant is not None else None
            if held is not None:
                held[key] -= 1
                if held[key] <= 0:
                    del held[key]
                if not held:
                    del self._held[tenant]
            self._lock.notify_all()

    def load(self, key: str, wait_s: float | None = None) -> None:
        """Make ``key`` resident on the device without pinning it."""
        self._ensure(key, False, None, wait_s)

    def try_load(self, key: str) -> bool:
        """True when ``key`` is resident already (counted as a hit), without waiting; False: call ``load``."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if key in self._device:
                self._hit(key)
                return True
            return False
        finally:
            self._lock.release()

    @property
    def slot_cap(self) -> int:
        """Distinct adapters one tenant's requests may pin at once."""
        n = self.engine.max_adapters
        if self.tenant_max_slots is None:
            return max(1, (3 * n) // 4)
        return self.tenant_max_slots if self.tenant_max_slots > 0 else n

    def prefetch(self, key: str) -> threading.Thread:
        """Warm ``key`` in the background: into the CPU tier, and onto the device if a slot is free."""
        def run() -> None:
            try:
                self._parsed(key)
                with self._lock:
                    room = self._free_slots() > 0
                if room:
                    self._ensure(key, False, None, None)
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
                    "pins": sum(self._pins.values()), "tenants_pinning": len(self._held),
                    "cpu_bytes": self._cpu_used, "load_p50_s": pct(0.5), "load_p99_s": pct(0.99)}

    # -- internals --------------------------------------------------------------------------------
    def _ensure(self, key: str, pin: bool, tenant: str | None, wait_s: float | None) -> None:
        try:
            self._ensure_once(key, pin, tenant, wait_s)
        except _FolderGone:  # read again from disk or the store, once
            self._ensure_once(key, pin, tenant, wait_s)

    def _ensure_once(self, key: str, pin: bool, tenant: str | None, wait_s: float | None) -> None:
        t0 = time.monotonic()
        wait_s = self.slot_wait_s if wait_s is None else wait_s
        deadline = t0 + wait_s
        with self._lock:
            while pin and not self._may_pin(key, tenant):  # at its cap: one of its own pins must go first
                self._wait(deadline, tenant)
            if key in self._device:
                self._hit(key)
                if pin:
                    self._pin(key, tenant)
                return
            self._check_place_failed(key)
        parsed = self._parsed(key)  # single flight per key (CPU tier, then disk/store)
        deadline = time.monotonic() + wait_s  # the wait for a slot starts once the adapter is read
        with self._lock:
            while key not in self._device or (pin and not self._may_pin(key, tenant)):
                if pin and not self._may_pin(key, tenant):
                    self._wait(deadline, tenant)
                    continue
                self._check_place_failed(key)  # before evicting anyone's adapter for it
                if key in self._moving:  # another thread places it (or takes it off): wait for that
                    self._wait(deadline, None)
                elif self._free_slots() > 0:
                    self._place(key, parsed, t0)
                elif "unplace" in self._moving.values():  # a slot is being freed: no second eviction for it
                    self._wait(deadline, None)
                elif not self._evict_lru():
                    self._wait(deadline, None, poll=self._engine_finishing())
            self._device.move_to_end(key)
            if pin:
                self._pin(key, tenant)

    def _free_slots(self) -> int:
        """Device slots neither held nor being filled or freed (caller holds the lock)."""
        return min(self.engine.free_slots, self.engine.max_adapters - len(self._device) - len(self._moving))

    def _outside_lock(self, key: str, move: str, fn: Callable[[], None]) -> None:
        """``fn()`` (an engine call that may block) with the lock released, ``key`` marked as moving meanwhile
        (caller holds the lock, and holds it again after); everyone waiting is woken when it is done."""
        self._moving[key] = move
        self._lock.release()
        try:
            fn()
        finally:
            self._lock.acquire()
            self._moving.pop(key, None)
            self._lock.notify_all()

    def _place(self, key: str, parsed: Any, t0: float) -> None:
        """Put ``key`` in a free slot (caller holds the lock and checked there is one). A failed place (e.g.
        the device out of memory) is remembered for PLACE_RETRY_S: its retries fail at once instead of each
        evicting another tenant's adapter for a place that fails again."""
        try:
            self._outside_lock(key, "place", lambda: self.engine.place(key, parsed))
        except FileNotFoundError as e:  # the RAM tier's entry names a folder that went (the one-at-a-time
            old = self._cpu.pop(key, None)  # engine reads it again to place it): not a failed place
            if old is not None:
                self._cpu_used -= old.nbytes
            log.info("adapter %s: %s; reading it again", key, e)
            raise _FolderGone(str(e)) from e
        except Exception as e:
            log.warning("placing adapter %s on the device failed: %r", key, e)
            while len(self._place_failed) >= PLACE_FAILED_MAX:
                self._place_failed.pop(next(iter(self._place_failed)))
            # its text, not the error: a kept traceback would pin the frames (the tensors) of the failed place
            self._place_failed[key] = (time.monotonic() + PLACE_RETRY_S, type(e).__name__,
                                       str(e) if isinstance(e, AdapterRejected) else None)
            raise
        self._device[key] = None
        self.counts["device_loads"] += 1
        self.load_s.append(time.monotonic() - t0)

    def _check_place_failed(self, key: str) -> None:
        """AdapterBusy while ``key``'s last place failed less than PLACE_RETRY_S ago (caller holds the lock)."""
        failed = self._place_failed.get(key)
        if failed is None:
            return
        if time.monotonic() >= failed[0]:
            del self._place_failed[key]
            return
        if failed[2] is not None:  # refused by the engine: the same answer on every try, its 400 (not a 503)
            raise AdapterRejected(failed[2])
        raise AdapterBusy(f"adapter {key} could not be placed on the device ({failed[1]}); retried after "
                          f"{PLACE_RETRY_S:.0f} s")

    def _engine_finishing(self) -> bool:
        """Whether a resident adapter nobody pins here is still in use by the engine (caller holds the lock):
        its request's pin went (a client gone, a stream ended) before the engine retired its row, and the
        engine's own release notifies nobody here."""
        return any(self._pins[k] <= 0 and self.engine.in_use(k) for k in self._device)

    def _wait(self, deadline: float, tenant: str | None, poll: bool = False) -> None:
        """Wait for a release (caller holds the lock); AdapterBusy past ``deadline``. ``tenant``: the tenant
        waiting for its own pins (at its cap), None: a wait for any slot. ``poll``: the release awaited is
        the engine's (``_engine_finishing``): look again every ENGINE_RELEASE_POLL_S until the deadline."""
        left = max(0.0, deadline - time.monotonic())
        if not self._lock.wait(timeout=min(left, ENGINE_RELEASE_POLL_S) if poll else left) \
                and not (poll and time.monotonic() < deadline):
            if tenant is not None:
                raise AdapterBusy(f"tenant {tenant} already pins {self.slot_cap} adapter slots with its requests; "
                                  "retry shortly")
            raise AdapterBusy(f"all {self.engine.max_adapters} adapter slots are in use by running "
                              "requests; retry shortly")

    def _may_pin(self, key: str, tenant: str | None) -> bool:
        """Whether ``tenant`` may pin ``key`` (caller holds the lock): one it pins already, or a new one
        below its cap."""
        held = self._held.get(tenant) if tenant is not None else None
        return held is None or key in held or len(held) < self.slot_cap

    def _hit(self, key: str) -> None:
        self._device.move_to_end(key)
        self.counts["device_hits"] += 1

    def _pin(self, key: str, tenant: str | None) -> None:
        self._pins[key] += 1
        if tenant is not None:
            self._held.setdefault(tenant, collections.Counter())[key] += 1

    def _evict_lru(self) -> bool:
        for old in self._device:  # least recently used first
            if self._pins[old] <= 0 and not self.engine.in_use(old):
                self._unplace(old)
                return True
        return False

    def _unplace(self, key: str) -> None:
        """Take ``key`` off the device (caller holds the lock; released during the engine's call, which may wait
        for a running generation). Nobody can pin it meanwhile; it comes back if the engine refuses."""
        self._device.pop(key, None)
        try:
            self._outside_lock(key, "unplace", lambda: self.engine.unload_adapter(key))
        except BaseException:
            self._device[key] = None
            raise
        self.counts["device_evictions"] += 1

    def _parsed(self, key: str) -> Any:
        while True:
            with self._lock:
                hit = self._cpu.get(key)
                if hit is not None:
                    self._cpu.move_to_end(key)
                    self.counts["cpu_hits"] += 1
                    return hit
                loading = self._loading.get(key)
                if loading is None:
                    done, failed = self._loading[key] = (threading.Event(), [])
                    break
            loading[0].wait()  # another thread is loading it: one load serves everyone
            with self._lock:
                if loading[1] and key not in self._cpu:
                    raise loading[1][0]
        try:
            folder, basis, from_store = self.fetch(key)
            parsed = self.engine.read_adapter(folder, basis)
            with self._lock:
                self.counts["store_loads" if from_store else "disk_hits"] += 1
                self._cpu[key] = parsed
                self._cpu_used += parsed.nbytes
                while self._cpu_used > self.cpu_bytes and len(self._cpu) > 1:
                    _, old = self._cpu.popitem(last=False)
                    self._cpu_used -= old.nbytes
                    self.counts["cpu_evictions"] += 1
            return parsed
        except BaseException as e:
            failed.append(e)  # for this load's waiters; gone with them
            raise
        finally:
            with self._lock:
                self._loading.pop(key, None)
            done.set()
            del failed  # this frame's own reference: no cycle through the error's traceback keeps it alive
