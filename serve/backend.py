"""How the API reaches an engine (no Ray here).

A backend is anything with ``generate(version_key, adapter, messages, params)`` returning an async
iterator of engine events. ``TieredBackend`` runs an in-process engine behind its adapter tiers (a Ray
Serve replica holds one; ``LocalBackend`` is the same for tests and benchmarks, without Ray);
``app.RayBackend`` forwards to the engine deployment with ``multiplexed_model_id=version_key``.

Also here: running the blocking engine in a thread (``iterate_in_thread``), and fetching an adapter
version into the local cache folder that is the tiers' disk tier (``download_native`` for the batched
engine, ``fetch_peft`` for the one-at-a-time engine).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from adapterfab.ids import AdapterId
from adapterfab.registry import AdapterVersion
from adapterfab.serve.engine import Event, SamplingParams

_DONE = object()
log = logging.getLogger("adapterfab.serve")


class Backend(Protocol):
    def generate(self, version_key: str | None, adapter: AdapterVersion | None,
                 messages: list[dict[str, str]], params: SamplingParams) -> AsyncIterator[Event]:
        """``version_key`` is the concrete ``tenant/persona@N`` (None: the base model); ``adapter`` is
        what the resolver returned for it, for backends that load straight from it."""
        ...


async def iterate_in_thread(make_iter: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    """Drive a blocking iterator in a worker thread and hand its items to the event loop. If the
    consumer goes away (client disconnect, cancellation) the thread stops after the current item and
    closes the iterator, which releases the engine."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancelled = threading.Event()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            cancelled.set()

    def run() -> None:
        try:
            it = make_iter()
            try:
                for item in it:
                    if cancelled.is_set():
                        break
                    put(item)
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put(e)

    # the thread runs in a copy of the caller's context: its log lines carry the request's id (serve/observe.py)
    threading.Thread(target=contextvars.copy_context().run, args=(run,), name="engine-generate", daemon=True).start()
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancelled.set()


def _version_folder(version_key: str, root: Path) -> tuple[AdapterId, Path]:
    aid = AdapterId.parse(version_key)
    if aid.version is None:
        raise ValueError(f"{version_key!r} is not a concrete version (tenant/persona@N)")
    return aid, root / aid.tenant / aid.persona / str(aid.version)


SOURCE_FILE = ".adapterfab-source"  # in a cached version's folder: which registered files it holds


def _source_of(version: AdapterVersion) -> str:
    """What tells one registered version's files from another's under the same name and number: the
    MLflow run that produced them (unique per training run) and where they are stored."""
    return json.dumps({"run_id": version.run_id, "artifact_uri": version.artifact_uri}, sort_keys=True)


def _holds(dest: Path, version: AdapterVersion) -> bool:
    try:
        return (dest / "adapter_config.json").is_file() and (dest / SOURCE_FILE).read_text() == _source_of(version)
    except OSError:
        return False


def _cached(registry: Any, aid: AdapterId, dest: Path, known: AdapterVersion | None = None
            ) -> tuple[bool, AdapterVersion | None]:
    """(whether ``dest`` holds the files of ``aid`` as this registry has it, the registry's version or
    None when the registry could not be asked).

    The cache folder is per machine and keyed by ``tenant/persona/N``, which another registry reuses
    for other weights: a recreated stack (``make clean``), another MLflow server. A cached folder whose
    recorded source is not this registry's version is stale and is moved away, so the wrong adapter is
    never served. With the registry unreachable a cached folder is used as it is (serving rides out an
    MLflow outage); a version the registry no longer has is refused (AdapterNotFound). ``known``: the
    version as the caller already resolved it (the ingress sends it with the request), so the registry
    is not asked again; a concrete version's files never change within one registry."""
    from adapterfab.errors import RegistryError

    installed = (dest / "adapter_config.json").is_file()
    try:
        version = known if known is not None and known.id == aid else registry.get(aid)
    except RegistryError:
        if installed:
            log.warning("the registry is unreachable: serving the cached %s unchecked", aid)
            return True, None
        raise
    if installed and not _holds(dest, version):
        log.warning("the cached %s holds other files than this registry's version: fetching them", aid)
        stale = dest.with_name(f".{dest.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(dest, stale)
        except OSError:  # another loader moved it first
            pass
        shutil.rmtree(stale, ignore_errors=True)
        installed = _holds(dest, version)  # another loader may have installed the right one since
    return installed, version


def _install(dest: Path, version: AdapterVersion, fetch: Callable[[Path], Path]) -> None:
    """``fetch(tmp)`` writes the adapter under a temp folder beside ``dest`` (returning where); the
    folder holding its adapter_config.json gets the version's source recorded (``SOURCE_FILE``) and is
    renamed to ``dest``, so concurrent loaders and crashes never leave a half folder behind."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        got = Path(fetch(tmp))
        cfg = next(iter(sorted(got.rglob("adapter_config.json"), key=lambda p: len(p.parts))), None)
        if cfg is None:
            raise FileNotFoundError(f"adapter {version.id} has no adapter_config.json in its artifacts")
        (cfg.parent / SOURCE_FILE).write_text(_source_of(version))
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(cfg.parent, dest)
        except OSError:  # another loader won the race
            if not (dest / "adapter_config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


ADAPTER_CACHE_BYTES = 20 << 30  # a replica's adapter cache folder, by default (ServeConfig.adapter_cache_mb)
CACHE_RECENT_S = 600.0  # a version folder used this recently is never removed: a load may be reading it
CACHE_ORPHAN_S = 86400.0  # a temp folder this old was left by a process that died (no download takes a day)


class DiskCache:
    """The byte bound of the adapter cache folder (``adapter_cache_dir``), which the fetches fill with one
    folder per version (``tenant/persona/N`` under ``native/`` or the folder itself) and nothing else removed.

    Every fetch marks its folder used (``touch``: the mtime of its ``SOURCE_FILE``, which replicas sharing
    the folder all see); ``trim`` removes the least recently used version folders until the folder holds at
    most ``max_bytes``, never one whose version ``keep()`` names (what the replica's engine holds), one used
    within ``recent_s`` (a load between its fetch and its read) or a temp folder (a download under way).
    Removal is a rename to a temp name then a delete: a concurrent reader never sees half a folder, and a
    folder its reader marked used meanwhile is put back. A reader whose folder was removed fetches it again
    (``_fetch_version``). The bound may be exceeded while everything is kept or recent."""

    def __init__(self, root: str | Path, max_bytes: int = ADAPTER_CACHE_BYTES,
                 keep: Callable[[], Any] = tuple, recent_s: float = CACHE_RECENT_S) -> None:
        self.root, self.max_bytes, self.keep, self.recent_s = Path(root).expanduser(), max_bytes, keep, recent_s
        self.removed = 0  # version folders this process removed
        self._lock = threading.Lock()  # one trim at a time in this process

    @staticmethod
    def touch(dest: Path) -> bool:
        """Mark ``dest`` used now; False when it is gone (a trim removed it: fetch it again)."""
        try:
            os.utime(dest / SOURCE_FILE)
            return True
        except FileNotFoundError:
            return False

    def _parents(self) -> Iterator[tuple[str, Path]]:
        """(``tenant/persona``, its folder) of every persona folder of both trees."""
        for tree in (self.root, self.root / "native"):
            for persona in tree.glob("*/*"):
                if persona.is_dir() and not persona.name.startswith(".") and not persona.parent.name.startswith("."):
                    yield f"{persona.parent.name}/{persona.name}", persona

    def trim(self) -> list[Path]:
        """Remove least recently used version folders until the folder is within ``max_bytes``; the
        folders removed."""
        with self._lock:
            now, keep = time.time(), {str(k) for k in self.keep()}
            entries, total = [], 0
            for name, persona in self._parents():
                for folder in persona.iterdir():
                    try:
                        if folder.name.startswith("."):
                            if folder.is_dir() and now - folder.stat().st_mtime > CACHE_ORPHAN_S:
                                shutil.rmtree(folder, ignore_errors=True)  # a dead process's temp folder
                            continue
                        used = (folder / SOURCE_FILE).stat().st_mtime_ns  # none: not an installed version
                        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                    except OSError:  # being removed by another replica
                        continue
                    entries.append((used, size, f"{name}@{folder.name}", folder))
                    total += size
            removed = []
            for used, size, key, folder in sorted(entries):
                if total <= self.max_bytes:
                    break
                if key in keep or now - used / 1e9 < self.recent_s:
                    continue
                if self._remove(folder, used):
                    total -= size
                    removed.append(folder)
            for tmp in (self.root / "bases").glob(".tmp-*"):  # a basis read by a process that died
                with contextlib.suppress(OSError):
                    if now - tmp.stat().st_mtime > CACHE_ORPHAN_S:
                        shutil.rmtree(tmp, ignore_errors=True)
            self.removed += len(removed)
        if removed:
            log.info("adapter cache over %d MiB: removed %d version folder(s), least recently used first",
                     self.max_bytes >> 20, len(removed))
        return removed

    @staticmethod
    def _remove(folder: Path, used: int) -> bool:
        """Rename ``folder`` away, then delete it, unless a reader marked it used since ``used`` (it goes
        back); whether it is gone."""
        gone = folder.with_name(f".{folder.name}.evict-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(folder, gone)
        except FileNotFoundError:  # another replica removed it first
            return True
        except OSError:
            return False
        try:
            marked = (gone / SOURCE_FILE).stat().st_mtime_ns != used
        except OSError:
            marked = False
        if marked:  # a reader touched it between our look and the rename: it stays where it was
            try:
                os.rename(gone, folder)
                return False
            except OSError:  # the version was fetched again meanwhile: that copy serves
                pass
        shutil.rmtree(gone, ignore_errors=True)
        return True


def _fetch_version(registry: Any, version_key: str, root: Path, known: AdapterVersion | None,
                   fetch: Callable[[AdapterVersion, Path], Path], disk: DiskCache | None
                   ) -> tuple[AdapterId, Path, AdapterVersion | None, bool, dict]:
    """The version's folder under ``root``, installed by ``fetch(version, tmp)`` unless cached (``_cached``):
    (its id, its folder, the registry's version or None, whether it came from the store, its adapter
    config). With ``disk`` the folder is marked used before it is read and returned (a trim then leaves it
    alone for ``recent_s``), and the cache is trimmed after a download; a folder a trim (another replica's)
    removed before the mark or the read is fetched again."""
    aid, dest = _version_folder(version_key, root)
    from_store = False
    for _ in range(3):
        installed, version = _cached(registry, aid, dest, known)
        if not installed:
            _install(dest, version, functools.partial(fetch, version))  # type: ignore[arg-type]
            from_store = True
        try:
            if disk is None or disk.touch(dest):
                cfg = json.loads((dest / "adapter_config.json").read_text())
                if disk is not None and from_store:
                    disk.trim()
                return aid, dest, version, from_store, cfg
        except FileNotFoundError:
            pass
        log.info("the cached %s was removed by a cache trim as it was fetched: fetching it again", aid)
    raise FileNotFoundError(f"{dest} was removed by cache trims three times as it was fetched: adapter_cache_mb "
                            "is too small for the adapters in use; raise it")


def fetch_peft(registry: Any, version_key: str, cache_dir: str | Path,
               known: AdapterVersion | None = None, disk: DiskCache | None = None) -> tuple[Path, None, bool]:
    """Adapter version ``tenant/persona@N`` as a standard PEFT LoRA, for the one-at-a-time engine's tiers:
    (local folder, no basis, whether it came from the store). A registry ``get`` + ``download`` the first
    time; later the cached folder is checked against the registry's version (``_cached``), or against
    ``known``, the version the caller already resolved. ``disk``: the cache folder's bound (``DiskCache``)."""
    def fetch(version: AdapterVersion, tmp: Path) -> Path:
        from adapterfab.export import to_peft_lora

        # every method is served as a standard PEFT LoRA (LoRA-XS is rebuilt from its shared basis)
        return to_peft_lora(registry, version, tmp)

    _, dest, _, from_store, _ = _fetch_version(registry, version_key, Path(cache_dir).expanduser(), known, fetch,
                                               disk)
    return dest, None, from_store


BASIS_CACHE_BYTES = 4 << 30  # LoRA-XS bases a replica's BasisCache keeps by itself (least recently used go first)


class BasisCache:
    """Shared bases (LoRA-XS's) a replica has loaded, by URI: every adapter on one basis shares it.

    ``get`` downloads each URI once however many loads ask for it at once, outside the cache's lock, so one
    tenant's new basis never holds up another's load. Up to ``max_bytes`` of bases are kept by the cache
    itself, least recently used dropped first; one dropped while an adapter read in the tiers still holds it
    is found again without a download (a weak reference: no second copy while anyone uses it)."""

    def __init__(self, max_bytes: int = BASIS_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bases: collections.OrderedDict[str, Any] = collections.OrderedDict()  # held here, LRU order
        self.nbytes: dict[str, int] = {}
        self._dropped: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self._loading: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def get(self, uri: str, load: Callable[[], Any]) -> Any:
        """The basis at ``uri``: cached, or ``load()``-ed by one caller while the others for it wait."""
        while True:
            with self.lock:
                basis = self.bases.get(uri)
                if basis is None:
                    basis = self._dropped.get(uri)
                    if basis is not None:
                        self._keep(uri, basis)
                if basis is not None:
                    self.bases.move_to_end(uri)
                    return basis
                waiter = self._loading.get(uri)
                if waiter is None:
                    done = self._loading[uri] = threading.Event()
                    break
            waiter.wait()  # a failed download leaves nothing: the next waiter tries it again
        try:
            basis = load()
            with self.lock:
                self._keep(uri, basis)
            return basis
        finally:
            with self.lock:
                self._loading.pop(uri, None)
            done.set()

    def _keep(self, uri: str, basis: Any) -> None:
        """Hold ``basis`` (caller holds the lock), dropping the least recently used past ``max_bytes``."""
        self._dropped.pop(uri, None)
        self.bases[uri] = basis
        self.nbytes[uri] = sum(t.numel() * t.element_size() for pair in getattr(basis, "factors", {}).values()
                               for t in pair)
        while len(self.bases) > 1 and sum(self.nbytes.values()) > self.max_bytes:
            old, dropped = self.bases.popitem(last=False)
            del self.nbytes[old]
            try:
                self._dropped[old] = dropped
            except TypeError:  # no weak reference to it: a later load downloads it again
                pass


def download_native(registry: Any, version_key: str, cache_dir: str | Path,
                    known: AdapterVersion | None = None, bases: BasisCache | None = None,
                    disk: DiskCache | None = None) -> tuple[Path, Any, bool]:
    """The adapter version as its method saved it, for the batched engine: (local folder, LoRA-XS
    basis or None, whether it came from the store). LoRA-XS stays R-only (kilobytes) with its basis
    downloaded once per basis and shared (``bases``: the replica's; none given, a basis is read from its
    folder again). Folders are written to a temp name and renamed into place. ``disk``: the cache
    folder's bound (``DiskCache``)."""
    aid, dest, version, from_store, cfg = _fetch_version(registry, version_key, Path(cache_dir).expanduser() / "native",
                                                         known, registry.download, disk)
    from adapterfab.methods import method_of_adapter

    method = method_of_adapter(cfg.get("peft_type"))
    if method is None or method.load_basis is None:  # an adapter that needs no shared basis
        return dest, None, from_store
    version = version or registry.get(aid)
    uri = version.tags.get("adapterfab.basis_uri")
    if not uri:
        raise ValueError(f"{version_key} is a {method.name} adapter but its version records no basis_uri")
    root = Path(cache_dir).expanduser() / "bases"

    def load() -> Any:
        """Into a folder of this load's own (read whole: the files can go): replicas sharing the cache
        folder (one machine, a shared volume) copied over each other's files and failed each other's checksums."""
        from adapterfab.export import fetch_basis

        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".tmp-basis-", dir=root) as tmp:
            return fetch_basis(method, uri, tmp)

    return dest, (bases or BasisCache()).get(uri, load), from_store


def tenant_of_key(key: str) -> str | None:
    """The tenant owning version key ``tenant/persona@N`` (a key reaches only its own tenant's adapters)."""
    tenant, slash, _ = key.partition("/")
    return tenant if slash else None


SLOT_THREADS = 32  # threads that load adapters and wait for device slots, for every tenant together
TENANT_SLOT_WAITS = 4  # of which one tenant's at once; its further loads wait on the event loop, holding none
_TURN_POLL_S = 0.02


class TieredBackend:
    """An in-process engine (the batched ``serve.batched.BatchedEngine``, or the one-at-a-time
    ``serve.engine.Engine``) behind its adapter tiers (``serve.tiers.AdapterTiers``), the one adapter cache
    of serving: a request's adapter is made resident and pinned until the request ends.

    A resident adapter is pinned on the event loop (``tiers.try_acquire``: no thread, no wait). A load or
    a wait for a slot (up to the tiers' ``slot_wait_s``) runs on this backend's own ``slot_threads``, at
    most ``tenant_waits`` of them for one tenant: waiting requests never take the event loop's default
    executor (``asyncio.to_thread``), and one tenant's waits cannot take every thread of the pool."""

    KNOWN_MAX = 4096  # versions remembered (oldest forgotten first)

    def __init__(self, engine: Any, tiers: Any, slot_threads: int = SLOT_THREADS,
                 tenant_waits: int = TENANT_SLOT_WAITS):
        self.engine, self.tiers = engine, tiers
        # version key -> the version the API resolved for a request, for the tiers' fetch (``known``): a
        # cold load then does not ask the registry again
        self.known: dict[str, AdapterVersion] = {}
        self.tenant_waits = tenant_waits
        self._pool = ThreadPoolExecutor(slot_threads, thread_name_prefix="adapter-slots")
        self._waits: collections.Counter[str | None] = collections.Counter()  # tenant -> calls on the pool
        self._waits_lock = threading.Lock()  # (a backend may serve more than one event loop: tests)

    def remember(self, version: AdapterVersion) -> None:
        key = str(version.id)
        if key not in self.known and len(self.known) >= self.KNOWN_MAX:
            self.known.pop(next(iter(self.known)))
        self.known[key] = version

    async def _slot_call(self, tenant: str | None, fast: Callable[[], bool], fn: Callable[..., Any],
                         *args: Any) -> tuple[bool, asyncio.Future | None]:
        """``fast()`` on the loop, else ``fn(*args, wait_s=<what is left of the tiers' slot_wait_s>)`` on the
        slot threads once ``tenant`` has a turn (fewer than ``tenant_waits`` calls there): (True, None) when
        the fast path answered, else (False, the call's future). A tenant that finds no turn within the
        wait gets AdapterBusy, as when no slot frees up."""
        wait_s = float(getattr(self.tiers, "slot_wait_s", 30.0))
        deadline = time.monotonic() + wait_s
        while True:
            if fast():
                return True, None
            with self._waits_lock:
                if self._waits[tenant] < self.tenant_waits:
                    self._waits[tenant] += 1
                    break
            if time.monotonic() >= deadline:
                from adapterfab.serve.tiers import AdapterBusy

                raise AdapterBusy(f"tenant {tenant} has {self.tenant_waits} adapter loads or slot waits under way "
                                  "already; retry shortly")
            await asyncio.sleep(_TURN_POLL_S)  # polled, not an asyncio primitive: no loop to bind it to

        def done(_: Any) -> None:  # the turn ends with the call (on its thread), not with a caller gone away
            with self._waits_lock:
                self._waits[tenant] -= 1
                if self._waits[tenant] <= 0:
                    del self._waits[tenant]

        left = max(0.0, deadline - time.monotonic())
        try:
            call = self._pool.submit(contextvars.copy_context().run, functools.partial(fn, *args, wait_s=left))
        except BaseException:
            done(None)
            raise
        call.add_done_callback(done)
        return False, asyncio.wrap_future(call)

    async def load(self, key: str) -> None:
        """Make ``key`` resident without pinning it (Serve's multiplexer loading a version): on the loop when
        it is resident, else on the slot threads."""
        try_load = getattr(self.tiers, "try_load", None)
        _, fut = await self._slot_call(tenant_of_key(key), lambda: bool(try_load and try_load(key)),
                                       self.tiers.load, key)
        if fut is not None:
            await fut

    async def _acquire(self, key: str) -> None:
        """Pin ``key`` for its tenant (``_slot_call``: on the loop when it is resident, else loading it or
        waiting for a slot on the slot threads). A request cancelled meanwhile (its client went away) leaves
        the thread running: the pin it takes is released as soon as it is taken, so cancellations never
        leak pinned slots."""
        tenant = tenant_of_key(key)
        try_acquire = getattr(self.tiers, "try_acquire", None)
        fast, fut = await self._slot_call(tenant, lambda: bool(try_acquire and try_acquire(key, tenant)),
                                          self.tiers.acquire, key, tenant)
        if fast:
            return
        assert fut is not None

        def release_orphan(f: asyncio.Future) -> None:
            if not f.cancelled() and f.exception() is None:
                self.tiers.release(key, tenant)

        try:
            await asyncio.shield(fut)
        except BaseException:
            if not fut.done() or (not fut.cancelled() and fut.exception() is None):
                fut.add_done_callback(release_orphan)  # runs at once when the pin is already taken
            raise

    async def stats(self) -> dict[str, Any]:
        """The tiers' counters and the batched engine's rows (``/metrics``: serve/observe.py)."""
        stats = getattr(self.engine, "stats", None)
        return {"tiers": self.tiers.stats(), "batching": stats() if callable(stats) else {}}

    async def generate(self, version_key: str | None, adapter: AdapterVersion | None,
                       messages: list[dict[str, str]], params: SamplingParams) -> AsyncIterator[Event]:
        if adapter is not None and str(adapter.id) == version_key:
            self.remember(adapter)
        if version_key is not None:
            await self._acquire(version_key)  # pinned until the request ends
        try:
            async for ev in iterate_in_thread(lambda: self.engine.generate(messages, version_key, params)):
                yield ev
        finally:
            if version_key is not None:
                self.tiers.release(version_key, tenant_of_key(version_key))


class LocalBackend(TieredBackend):
    """An in-process engine behind adapter tiers of at most ``max_adapters`` loaded adapters, for the API
    without Ray (tests, benchmarks). ``fetch(version) -> local folder`` gets an adapter's files (e.g. a
    folder of ``fetch_peft``); the version is the one the API resolved for the request."""

    def __init__(self, engine: Any, fetch: Callable[[AdapterVersion], str | Path], max_adapters: int = 32):
        from adapterfab.serve.tiers import AdapterTiers

        engine.max_adapters = max_adapters
        super().__init__(engine, AdapterTiers(engine, lambda key: (Path(fetch(self.known[key])), None, True)))

    @property
    def loads(self) -> int:
        """Adapters loaded into the engine so far (tests, metrics)."""
        return self.tiers.counts["device_loads"]

    def close(self) -> None:
        """Unload every adapter now (not from the garbage collector at interpreter exit)."""
        for key in self.tiers.resident()["device"]:
            self.tiers.evict(key)
        self._pool.shutdown(wait=False)

    async def generate(self, version_key: str | None, adapter: AdapterVersion | None,
                       messages: list[dict[str, str]], params: SamplingParams) -> AsyncIterator[Event]:
        if version_key is not None and adapter is None:
            raise ValueError("LocalBackend needs the resolved AdapterVersion to load an adapter")
        async for ev in super().generate(version_key, adapter, messages, params):
            yield ev
