"""How the API reaches an engine (no Ray here).

A backend is anything with ``generate(version_key, adapter, messages, params)`` returning an async
iterator of engine events. ``LocalBackend`` wraps an in-process ``Engine`` (tests, benchmarks, the GPU
box); ``app.RayBackend`` forwards to the engine deployment with ``multiplexed_model_id=version_key``.

Also here, shared by both: running the blocking engine in a thread (``iterate_in_thread``), pinning
adapters while a generation uses them (``AdapterPins``), and fetching an adapter version into a local
cache folder (``download_adapter``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from adapterfab.ids import AdapterId
from adapterfab.registry import AdapterVersion
from adapterfab.serve.engine import Engine, Event, SamplingParams

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

    threading.Thread(target=run, name="engine-generate", daemon=True).start()
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


class AdapterPins:
    """Keeps an adapter in the engine while generations use it. An eviction (LRU, or Ray Serve's
    multiplexer) of a pinned adapter is deferred to the last release; a request that got an adapter
    just before it was evicted reloads it for its own use. Idempotent: evicting twice is harmless.
    Call every method from a worker thread, never the event loop (they may wait for the engine)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._in_use: Counter[str] = Counter()
        self._doomed: set[str] = set()  # evicted while in use: unload at the last release

    def loaded(self, name: str, local_dir: str | Path) -> None:
        """The cache (re)admits ``name``: load it, and cancel a pending unload."""
        with self._lock:
            self._doomed.discard(name)
            self.engine.load_adapter(name, local_dir)

    def acquire(self, name: str, local_dir: str | Path) -> None:
        with self._lock:
            if not self.engine.has_adapter(name):  # evicted between lookup and use
                self.engine.load_adapter(name, local_dir)
                self._doomed.add(name)
            self._in_use[name] += 1

    def release(self, name: str) -> None:
        with self._lock:
            self._in_use[name] -= 1
            if self._in_use[name] <= 0:
                del self._in_use[name]
                if name in self._doomed:
                    self._doomed.discard(name)
                    self.engine.unload_adapter(name)

    def evict(self, name: str) -> None:
        with self._lock:
            if self._in_use[name] > 0:
                self._doomed.add(name)
            else:
                self._in_use.pop(name, None)
                self.engine.unload_adapter(name)

    def generate(self, name: str | None, local_dir: str | Path | None, messages: list[dict[str, str]],
                 params: SamplingParams) -> Iterator[Event]:
        """``Engine.generate`` with ``name`` pinned for its whole duration."""
        if name is None:
            yield from self.engine.generate(messages, None, params)
            return
        self.acquire(name, local_dir)  # type: ignore[arg-type]
        try:
            yield from self.engine.generate(messages, name, params)
        finally:
            self.release(name)


class LoadedAdapter:
    """What a cache holds per adapter. Eviction calls ``__del__`` explicitly and the garbage
    collector calls it again (Ray Serve's multiplexer does exactly that), so it acts once."""

    def __init__(self, pins: AdapterPins, name: str, local_dir: Path):
        self.pins, self.name, self.local_dir = pins, name, local_dir
        self._evicted = False
        self._evict_lock = threading.Lock()

    def __del__(self) -> None:
        with self._evict_lock:
            if self._evicted:
                return
            self._evicted = True
        try:
            self.pins.evict(self.name)
        except Exception:  # noqa: BLE001 - never raise from __del__
            pass


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


def download_adapter(registry: Any, version_key: str, cache_dir: str | Path,
                     known: AdapterVersion | None = None) -> Path:
    """Local folder of adapter version ``tenant/persona@N`` as a standard PEFT LoRA: a registry ``get``
    + ``download`` the first time; later a registry ``get`` checks that the cached folder holds this
    registry's version (``_cached``)."""
    aid, dest = _version_folder(version_key, Path(cache_dir).expanduser())
    installed, version = _cached(registry, aid, dest, known)
    if not installed:
        from adapterfab.export import to_peft_lora

        # every method is served as a standard PEFT LoRA (LoRA-XS is rebuilt from its shared basis)
        _install(dest, version, lambda tmp: to_peft_lora(registry, version, tmp))  # type: ignore[arg-type]
    return dest


class BasisCache:
    """Shared bases (LoRA-XS's) a replica has loaded, by URI: every adapter on one basis shares it."""

    def __init__(self) -> None:
        self.bases: dict[str, Any] = {}
        self.lock = threading.Lock()


def download_native(registry: Any, version_key: str, cache_dir: str | Path,
                    known: AdapterVersion | None = None, bases: BasisCache | None = None) -> tuple[Path, Any, bool]:
    """The adapter version as its method saved it, for the batched engine: (local folder, LoRA-XS
    basis or None, whether it came from the store). LoRA-XS stays R-only (kilobytes) with its basis
    downloaded once per basis and shared (``bases``: the replica's; none given, a basis is read from its
    folder again). Folders are written to a temp name and renamed into place."""
    aid, dest = _version_folder(version_key, Path(cache_dir).expanduser() / "native")
    installed, version = _cached(registry, aid, dest, known)
    from_store = not installed
    if from_store:
        _install(dest, version, lambda tmp: registry.download(version, tmp))  # type: ignore[arg-type]
    from adapterfab.methods import method_of_adapter

    method = method_of_adapter(json.loads((dest / "adapter_config.json").read_text()).get("peft_type"))
    if method is None or method.load_basis is None:  # an adapter that needs no shared basis
        return dest, None, from_store
    version = version or registry.get(aid)
    uri = version.tags.get("adapterfab.basis_uri")
    if not uri:
        raise ValueError(f"{version_key} is a {method.name} adapter but its version records no basis_uri")
    bases = bases or BasisCache()
    with bases.lock:
        basis = bases.bases.get(uri)
        if basis is None:
            from adapterfab.export import fetch_basis

            folder = Path(cache_dir).expanduser() / "bases" / uuid.uuid5(uuid.NAMESPACE_URL, uri).hex
            basis = bases.bases[uri] = fetch_basis(method, uri, folder)
    return dest, basis, from_store


class BatchedBackend:
    """An in-process batched engine (``serve.batched.BatchedEngine``) behind adapter tiers
    (``serve.tiers.AdapterTiers``): requests for any adapters decode together."""

    def __init__(self, engine: Any, tiers: Any):
        self.engine, self.tiers = engine, tiers

    async def _acquire(self, key: str) -> None:
        """Pin ``key`` (loading it may take a while, in a thread). A request cancelled meanwhile (its client
        went away) leaves the thread running: the pin it takes is released as soon as it is taken, so
        cancellations never leak pinned slots."""
        fut = asyncio.get_running_loop().run_in_executor(None, self.tiers.acquire, key)

        def release_orphan(f: asyncio.Future) -> None:
            if not f.cancelled() and f.exception() is None:
                self.tiers.release(key)

        try:
            await asyncio.shield(fut)
        except BaseException:
            if not fut.done() or (not fut.cancelled() and fut.exception() is None):
                fut.add_done_callback(release_orphan)  # runs at once when the pin is already taken
            raise

    async def generate(self, version_key: str | None, adapter: AdapterVersion | None,
                       messages: list[dict[str, str]], params: SamplingParams) -> AsyncIterator[Event]:
        if version_key is not None:
            await self._acquire(version_key)  # pinned until the request ends
        try:
            async for ev in iterate_in_thread(lambda: self.engine.generate(messages, version_key, params)):
                yield ev
        finally:
            if version_key is not None:
                self.tiers.release(version_key)


class LocalBackend:
    """An in-process engine with an LRU of at most ``max_adapters`` loaded adapters.
    ``fetch(version) -> local folder`` gets an adapter's files (e.g. ``download_adapter``)."""

    def __init__(self, engine: Engine, fetch: Callable[[AdapterVersion], str | Path], max_adapters: int = 32):
        self.engine, self.fetch, self.max_adapters = engine, fetch, max_adapters
        self.pins = AdapterPins(engine)
        self._lru: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._lru_lock = threading.Lock()
        self.loads = 0  # for tests and metrics

    def _get(self, key: str, version: AdapterVersion) -> LoadedAdapter:
        with self._lru_lock:
            hit = self._lru.get(key)
            if hit is not None:
                self._lru.move_to_end(key)
                return hit
            local_dir = Path(self.fetch(version))
            self.pins.loaded(key, local_dir)
            self.loads += 1
            entry = self._lru[key] = LoadedAdapter(self.pins, key, local_dir)
            while len(self._lru) > self.max_adapters:
                _, old = self._lru.popitem(last=False)
                old.__del__()
            return entry

    def close(self) -> None:
        """Unload every adapter now (not from the garbage collector at interpreter exit)."""
        with self._lru_lock:
            while self._lru:
                _, old = self._lru.popitem(last=False)
                old.__del__()

    async def generate(self, version_key: str | None, adapter: AdapterVersion | None,
                       messages: list[dict[str, str]], params: SamplingParams) -> AsyncIterator[Event]:
        local_dir = None
        if version_key is not None:
            if adapter is None:
                raise ValueError("LocalBackend needs the resolved AdapterVersion to load an adapter")
            local_dir = (await asyncio.to_thread(self._get, version_key, adapter)).local_dir
        def run() -> Iterator[Event]:
            return self.pins.generate(version_key, local_dir, messages, params)

        async for ev in iterate_in_thread(run):
            yield ev
