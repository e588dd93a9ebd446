"""Ray Serve wiring: an ``Ingress`` (the FastAPI app of ``api.py``, 0 CPUs) in front of an
``EngineDeployment`` (one base model per replica, adapters multiplexed on demand by version id).

The ingress authenticates, resolves ``model`` to a concrete version (``acme/pirate@3``) and calls the
engine through its handle with ``multiplexed_model_id=<version>``, so Serve routes a tenant's requests
to a replica that already holds the adapter; the replica's loader downloads a missing version from
the registry into ``adapter_cache_dir``. The caller has done ``ray.init(address=...)``::

    ray.init(); deploy(ServeConfig(base_model_path=..., state_url="sqlite:///...", mlflow_uri=...))

On a cluster (a KubeRay RayService, ``serve deploy``), ``import_path: adapterfab.serve.app:app_builder``
with ``args`` builds the same app: see ``app_builder`` and ``infra/k8s/rayservice.yaml``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from adapterfab.basemodel import default_cache
from adapterfab.registry import AdapterVersion
from adapterfab.serve.auth_guard import DEFAULT_FAILURE_WINDOW_S, DEFAULT_MAX_FAILURES, AuthFailureLimiter
from adapterfab.serve.backend import (
    ADAPTER_CACHE_BYTES,
    BasisCache,
    DiskCache,
    TieredBackend,
    download_native,
    fetch_peft,
)
from adapterfab.serve.engine import DTYPES, Event, SamplingParams

log = logging.getLogger("adapterfab.serve.app")

APP_NAME = "adapterfab"


DEFAULT_TENANT_RPS = 50.0
DEFAULT_TENANT_BURST = 100


@dataclass(frozen=True)
class ServeConfig:
    base_model_path: str
    state_url: str
    mlflow_uri: str
    dtype: str = "float32"
    max_adapters_per_replica: int = 32
    num_replicas: int = 1
    replica_num_cpus: float = 1.0
    replica_num_gpus: float = 0  # > 0: each engine replica reserves GPUs and runs the model on cuda
    torch_threads: int = 2
    adapter_cache_dir: str = field(default_factory=lambda: str(default_cache() / "adapters"))
    # the most the adapter cache folder holds: past it, the least recently used versions no engine of this
    # replica holds are removed (shared by replicas on one machine; serve.backend.DiskCache)
    adapter_cache_mb: int = ADAPTER_CACHE_BYTES >> 20
    resolve_ttl_s: float = 5.0  # how long the ingress trusts an alias resolution
    base_fingerprint: str | None = None  # refuse adapters trained on other base weights
    engine: str = "batched"  # "batched": requests for any adapters decode together; "simple": one at a time
    max_batch: int = 16  # batched: requests decoding together per replica
    max_len: int = 2048  # batched: prompt + completion tokens per request (the KV cache is preallocated)
    max_rank: int = 64  # batched: the largest LoRA rank a replica accepts
    cuda_graphs: bool = True  # batched on a GPU: decode steps replayed from CUDA graphs (one per shape bucket)
    cpu_cache_mb: int = 2048  # batched: adapters kept read in RAM beside the device slots
    min_replicas: int | None = None  # set both for autoscaling on ongoing requests
    max_replicas: int | None = None
    target_ongoing_requests: int = 8
    graceful_shutdown_s: float = 30.0  # a replica that is scaled down finishes its requests first
    # per-tenant rate limit on every route (requests/s, token bucket of tenant_burst); None or 0: unlimited
    tenant_rps: float | None = DEFAULT_TENANT_RPS
    tenant_burst: int = DEFAULT_TENANT_BURST
    # wrong API keys one client address may send per auth_failure_window_s before a 429 (0: no limit)
    auth_max_failures: int = DEFAULT_MAX_FAILURES
    auth_failure_window_s: float = DEFAULT_FAILURE_WINDOW_S
    tenant_max_rows: int | None = None  # batched: rows one tenant may hold (None: 3/4 of max_batch; 0: all)
    # distinct adapters one tenant's requests may pin in a replica's device slots at once (None: 3/4 of
    # max_adapters_per_replica, at least 1; 0: all), so another tenant's adapter always finds a slot
    tenant_max_slots: int | None = None
    # batched: prompt tokens prefilled between two decode steps (longer prompts go in pieces, so running
    # streams keep flowing); None: 256 on a CPU, 2048 on a GPU; 0: every admitted prompt before the next step
    prefill_chunk: int | None = None
    # batched: how a decode step adds its LoRA rows' updates (None: the engine's choice; "grouped": two
    # grouped matmuls over the adapter bank per module, bf16 on Hopper/Blackwell GPUs; docs/serving.md)
    lora_kernel: str | None = None
    tenant_rps_overrides: dict = field(default_factory=dict)  # tenant -> requests/s
    # /v1/models and /v1/registry list from the registry's catalogue in the state database (a tenant's
    # listing costs one indexed query however many other tenants there are); False: from MLflow on every
    # request (for registries changed outside adapterfab, e.g. in MLflow's UI, with no `registry ls --refresh`)
    registry_catalogue: bool = True
    # the most tokens one reply may ask for (a request asking more gets a 400); a request naming none gets up
    # to the rest of its context within this cap. None: the context is the only limit
    max_tokens_cap: int | None = None
    json_logs: bool = False  # the replicas' adapterfab log lines as JSON objects (each with its request id)
    # generations (one per choice) an engine replica holds at once, decoding or waiting for a row in its own
    # per-tenant fair queue; None: 8 x max_batch, at least 64. Past it they wait in Ray Serve's queue, first
    # come first served (Serve's default of 5 let only 5 requests reach the engine: no batching)
    max_ongoing_requests: int | None = None
    ingress_max_ongoing_requests: int = 4096  # HTTP requests one ingress replica (async, 0 CPUs) holds at once


class EngineDeployment:
    """One replica: the base model once, adapters on demand by version id. Serve's multiplexer routes a
    version's requests to replicas that hold it; the adapters live in the replica's tiers (device slots,
    CPU, disk, store: ``serve.tiers``), the one adapter cache, with either engine: the batched one (requests
    for any adapters decode together) or the one-at-a-time PEFT engine (``engine: simple``)."""

    def __init__(self, cfg: ServeConfig):
        from adapterfab.registry import Registry
        from adapterfab.serve.observe import install_log_context
        from adapterfab.serve.tiers import AdapterTiers

        install_log_context(cfg.json_logs)
        self.cfg = cfg
        self.registry = Registry(cfg.mlflow_uri)
        self.loads = 0
        device = "cuda" if cfg.replica_num_gpus else "cpu"
        # the folders of the adapters in this replica's tiers stay (the one-at-a-time engine reads its folder
        # again when it places an adapter from RAM); others go, least recently used first, past the bound
        disk = DiskCache(cfg.adapter_cache_dir, cfg.adapter_cache_mb << 20,
                         keep=lambda: [k for keys in self.tiers.resident().values() for k in keys])
        if cfg.engine == "batched":
            from adapterfab.serve.batched import BatchedEngine

            self.engine: Any = BatchedEngine(cfg.base_model_path, dtype=cfg.dtype, device=device,
                                             max_batch=cfg.max_batch, max_len=cfg.max_len,
                                             max_adapters=cfg.max_adapters_per_replica, max_rank=cfg.max_rank,
                                             torch_threads=cfg.torch_threads,
                                             cuda_graphs=cfg.cuda_graphs and device == "cuda",
                                             tenant_max_rows=cfg.tenant_max_rows, prefill_chunk=cfg.prefill_chunk,
                                             lora_kernel=cfg.lora_kernel)
            bases = BasisCache()

            def fetch(key: str) -> tuple[Path, Any, bool]:
                return download_native(self.registry, key, cfg.adapter_cache_dir, self.backend.known.get(key), bases,
                                       disk)
        else:
            from adapterfab.serve.engine import Engine

            self.engine = Engine(cfg.base_model_path, dtype=cfg.dtype, torch_threads=cfg.torch_threads,
                                 device=device, max_adapters=cfg.max_adapters_per_replica)

            def fetch(key: str) -> tuple[Path, Any, bool]:
                return fetch_peft(self.registry, key, cfg.adapter_cache_dir, self.backend.known.get(key), disk)
        self.tiers = AdapterTiers(self.engine, fetch, cpu_bytes=cfg.cpu_cache_mb << 20,
                                  tenant_max_slots=cfg.tenant_max_slots)
        self.backend = TieredBackend(self.engine, self.tiers)  # one for every request

        self._get_adapter = self._multiplexer(cfg.max_adapters_per_replica)

    def _multiplexer(self, max_models: int) -> Any:
        """Serve's multiplexed loader, built here, not as a class decorator, so the limit comes from the config;
        the name must not be a str attribute (Serve's method detection looks it up on the model id)."""
        async def _load_adapter_for_multiplex(version_key: str) -> Any:
            return await self._load(version_key)

        return serve.multiplexed(max_num_models_per_replica=max_models)(_load_adapter_for_multiplex)

    async def _load(self, version_key: str) -> Any:
        """Serve's multiplexer calls this for a version it has not routed here lately, under ONE lock per
        replica (Ray 2.x): it only records the version id, for Serve's routing of the version's requests
        here, and loads nothing. The load (store, RAM, a wait for a device slot) happens in the request's
        own ``TieredBackend`` acquire, with its tenant's turns, so one tenant's slow cold load never holds up
        another tenant's first request (review 2026-12). The tiers alone decide what stays where: Serve
        forgetting a version evicts nothing."""
        self.loads += 1
        return version_key

    async def generate(self, messages: list[dict[str, str]], params: SamplingParams,
                       version: AdapterVersion | None = None) -> AsyncIterator[Event]:
        version_key = serve.get_multiplexed_model_id() or None
        if version is not None and str(version.id) == version_key:
            self.backend.remember(version)  # before Serve's loader fetches it
        if version_key:
            await self._get_adapter(version_key)
        async for ev in self.backend.generate(version_key, version, messages, params):
            yield ev

    async def prefetch(self) -> bool:
        """Load the multiplexed version now (an alias moved to it): the first request finds it warm."""
        version_key = serve.get_multiplexed_model_id() or None
        if version_key:
            await self._get_adapter(version_key)
            await self.backend.load(version_key)  # the multiplexer only records it (``_load``)
        return version_key is not None

    async def stats(self) -> dict[str, Any]:
        """What this replica holds (tests, metrics and debugging)."""
        out: dict[str, Any] = {"adapters": self.engine.adapters, "loads": self.loads, "engine": self.cfg.engine,
                               "tiers": self.tiers.stats()}
        if self.cfg.engine == "batched":
            out["batching"] = self.engine.stats()
        return out

    async def check_health(self) -> None:
        """Serve restarts a replica whose engine thread died."""
        thread = getattr(self.engine, "_thread", None)
        if thread is not None and not thread.is_alive():
            raise RuntimeError("the batched engine's scheduler thread stopped")


def _replica_died(e: BaseException) -> bool:
    """A replica's process died or became unreachable (not an error raised by the engine's code)."""
    from ray import exceptions as rex

    kinds = tuple(k for k in (getattr(rex, "RayActorError", None), getattr(rex, "ActorDiedError", None),
                              getattr(rex, "ActorUnavailableError", None), getattr(rex, "WorkerCrashedError", None))
                  if k is not None)
    seen: BaseException | None = e
    for _ in range(5):  # RayTaskError wraps the replica's error in .cause
        if seen is None:
            return False
        if isinstance(seen, kinds):
            return True
        seen = getattr(seen, "cause", None) or seen.__cause__
    return False


class RayBackend:
    """The API's backend inside Serve: stream from the engine deployment, routed by version id."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def stats(self) -> dict[str, Any]:
        """One engine replica's tiers and rows (the one Serve routes this call to)."""
        return await self.handle.stats.remote()

    async def generate(self, version_key: str | None, adapter: AdapterVersion | None,
                       messages: list[dict[str, str]], params: SamplingParams) -> AsyncIterator[Event]:
        """A replica that dies surfaces as ReplicaUnavailable, never a hang. The API is the one place that
        sends the request again (``api.REPLAYS``: before the first byte reached the client, or whole for a
        non-streaming request), and Serve routes it to a live replica."""
        from adapterfab.errors import ReplicaUnavailable

        stream = self.handle.options(stream=True, multiplexed_model_id=version_key or "")
        try:
            async for ev in stream.generate.remote(messages, params, adapter):
                yield ev
        except Exception as e:  # noqa: BLE001 - only a replica's death becomes ReplicaUnavailable
            if not _replica_died(e):
                raise
            raise ReplicaUnavailable(f"the serving replica died mid-request: {type(e).__name__}") from e

    def prefetch(self, version_key: str) -> None:
        """Fire and forget: a replica (one that already holds it, if any) loads the version."""
        self.handle.options(multiplexed_model_id=version_key).prefetch.remote()


@serve.ingress()
class Ingress:
    """HTTP entry: the FastAPI app with the production auth (keys in the state DB, read per request so
    new keys work at once), resolver (MLflow registry), listings (the registry catalogue in the state DB,
    ``registry_catalogue``) and the engine handle."""

    def __init__(self, engine: DeploymentHandle, cfg: ServeConfig):
        self.engine, self.cfg = engine, cfg

    def __serve_build_asgi_app__(self) -> Any:
        from adapterfab.keys import KeyStore
        from adapterfab.registry import Registry
        from adapterfab.registry_index import RegistryIndex
        from adapterfab.serve.api import make_api
        from adapterfab.serve.observe import install_log_context
        from adapterfab.state import StateStore

        install_log_context(self.cfg.json_logs)

        # a lookup with MLflow down fails within seconds (then the catalogue answers), not after MLflow's
        # default retries and 120 s timeout (this replica's process only)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        state = StateStore(self.cfg.state_url)
        keys = KeyStore(state)
        registry = Registry(self.cfg.mlflow_uri, index=RegistryIndex(state) if self.cfg.registry_catalogue else None)
        complete_catalogue(registry)

        def lister(tenant: str) -> list[str]:
            out = []
            for ra in registry.list(tenant):
                out.append(str(ra.id))
                out.extend(f"{ra.id}@{alias}" for alias in sorted(ra.aliases))
            return out

        backend = RayBackend(self.engine)
        limiter = tenant_limiter(self.cfg)
        return make_api(backend, keys.verify, checked_resolver(registry, self.cfg.base_fingerprint),
                        lister=lister, catalog=registry.list, resolve_ttl_s=self.cfg.resolve_ttl_s,
                        on_alias_moved=backend.prefetch, rate_limit=limiter,
                        max_tokens_cap=self.cfg.max_tokens_cap, echo_request_id=False,  # Serve's proxy echoes it
                        metrics_auth=lambda key: (who := keys.identify(key)) is not None and who.operator,
                        auth_limit=AuthFailureLimiter(self.cfg.auth_max_failures, self.cfg.auth_failure_window_s))


def tenant_limiter(cfg: ServeConfig) -> Any:
    """The ingress's per-tenant RateLimiter: ``tenant_rps`` for every tenant, ``tenant_rps_overrides`` for the
    named ones. With no ``tenant_rps`` (None or 0) only the overridden tenants are limited (the overrides
    were dropped, review 2026-12); None when neither is set."""
    from adapterfab.serve.api import RateLimiter

    if not cfg.tenant_rps and not cfg.tenant_rps_overrides:
        return None
    return RateLimiter(cfg.tenant_rps or None, cfg.tenant_burst, cfg.tenant_rps_overrides)


def complete_catalogue(registry: Any) -> threading.Thread | None:
    """Until the registry's catalogue is complete (a registry never listed whole: a stack from before the
    catalogue, or one whose catalogue missed a write), listings go to MLflow; one full listing from MLflow,
    in the background, completes it. None: nothing to do."""
    if registry.index is None:
        return None

    def run() -> None:
        try:
            if not registry.index.complete():
                registry.list()  # a full listing from MLflow rebuilds the catalogue
        except Exception as e:  # noqa: BLE001 - listings keep going to MLflow; the next start retries
            log.warning("cannot complete the registry catalogue from MLflow (%s); listing from MLflow", e)

    t = threading.Thread(target=run, name="registry-catalogue", daemon=True)
    t.start()
    return t


REGISTRY_BACKOFF_S = 5.0  # after MLflow failed a lookup, lookups go to the catalogue this long


def checked_resolver(registry: Any, base_fingerprint: str | None, clock: Any = time.monotonic,
                     backoff_s: float = REGISTRY_BACKOFF_S) -> Any:
    """``registry.resolve`` that refuses versions whose recorded base fingerprint is not ours. While
    MLflow is unreachable it resolves from the registry's catalogue in the state database (what
    adapterfab last registered and promoted), and asks MLflow again only after ``backoff_s`` so requests
    do not each wait out a dead connection."""
    from adapterfab.errors import BaseMismatch, RegistryError

    down_until = [0.0]

    def lookup(aid: Any) -> AdapterVersion:
        if clock() >= down_until[0]:
            try:
                return registry.resolve(aid)
            except RegistryError as e:
                down_until[0] = clock() + backoff_s
                log.warning("MLflow lookup of %s failed (%s); resolving from the registry catalogue", aid, e)
        return registry.resolve_from_catalogue(aid)  # RegistryError when it cannot answer either

    def resolve(aid: Any) -> AdapterVersion:
        v = lookup(aid)
        fp = v.tags.get("adapterfab.base_fingerprint")
        if base_fingerprint and fp and fp != base_fingerprint:
            raise BaseMismatch(f"adapter {v.id} was trained on base weights {fp[:12]}..., but this server "
                               f"serves {base_fingerprint[:12]}...; serve it with its own base model")
        return v

    return resolve


def build_app(cfg: ServeConfig) -> serve.Application:
    scaling: dict[str, Any] = {"num_replicas": cfg.num_replicas}
    if cfg.min_replicas is not None and cfg.max_replicas is not None:  # autoscale on ongoing requests
        scaling = {"autoscaling_config": {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                          "target_ongoing_requests": cfg.target_ongoing_requests}}
    engine = serve.deployment(EngineDeployment, name="EngineDeployment").options(
        **scaling, graceful_shutdown_timeout_s=cfg.graceful_shutdown_s,
        max_ongoing_requests=cfg.max_ongoing_requests or max(cfg.max_batch * 8, 64),
        ray_actor_options={"num_cpus": cfg.replica_num_cpus, "num_gpus": cfg.replica_num_gpus})
    ingress = serve.deployment(Ingress, name="Ingress").options(
        max_ongoing_requests=cfg.ingress_max_ongoing_requests, ray_actor_options={"num_cpus": 0})
    return ingress.bind(engine.bind(cfg), cfg)


# app_builder's args: the required ones, then the optional ones with their types (ServeConfig's fields)
_BUILDER_REQUIRED = ("base_model", "mlflow_uri", "state_url")
_BUILDER_OPTIONAL: dict[str, type] = {
    "dtype": str, "num_replicas": int, "replica_num_cpus": float, "replica_num_gpus": float,
    "max_adapters_per_replica": int, "adapter_cache_dir": str, "adapter_cache_mb": int, "torch_threads": int,
    "resolve_ttl_s": float, "engine": str, "max_batch": int, "max_len": int, "max_rank": int, "cpu_cache_mb": int,
    "min_replicas": int, "max_replicas": int, "target_ongoing_requests": int, "graceful_shutdown_s": float,
    "tenant_rps": float, "tenant_burst": int, "tenant_rps_overrides": dict, "cuda_graphs": bool, "tenant_max_rows": int,
    "registry_catalogue": bool, "prefill_chunk": int, "lora_kernel": str, "max_tokens_cap": int, "json_logs": bool,
    "tenant_max_slots": int, "max_ongoing_requests": int, "ingress_max_ongoing_requests": int,
    "auth_max_failures": int, "auth_failure_window_s": float}


def _builder_arg(name: str, kind: type, value: Any) -> Any:
    if kind is bool:  # YAML gives true/false, `serve run k=v` the strings; 0, 1 or "yes" are refused
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"adapterfab serve app arg {name}={value!r} is not a valid bool")
    whole = not (kind is int and isinstance(value, float) and not value.is_integer())
    ok = whole and not isinstance(value, bool)
    try:
        if ok:
            return kind(value)
    except (TypeError, ValueError):
        pass
    raise ValueError(f"adapterfab serve app arg {name}={value!r} is not a valid {kind.__name__}")


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Ray Serve's application builder, for ``import_path: adapterfab.serve.app:app_builder`` with ``args``
    (a RayService's ``serveConfigV2``, ``serve deploy``/``serve run`` configs).

    Required args: ``base_model`` (short name, HF id, local folder or ``s3://``; resolved and fingerprinted
    here, so the folder must be at the same path on the replicas' nodes: a shared cache),
    ``mlflow_uri``, ``state_url``. Optional: every other ``ServeConfig`` field by its name and type
    (``_BUILDER_OPTIONAL``: ``dtype``, ``num_replicas``, ``max_batch``, ``max_tokens_cap``, ``json_logs``,
    ``tenant_max_rows``, ``tenant_max_slots``, ...). Unknown, missing or ill-typed args raise ``ValueError``."""
    from adapterfab.basemodel import resolve_base_model

    if not isinstance(args, dict):
        raise ValueError(f"app_builder takes a mapping of args, got {type(args).__name__}")
    unknown = sorted(set(args) - set(_BUILDER_REQUIRED) - set(_BUILDER_OPTIONAL))
    missing = [k for k in _BUILDER_REQUIRED if args.get(k) in (None, "")]
    if unknown or missing:
        allowed = ", ".join((*_BUILDER_REQUIRED, *_BUILDER_OPTIONAL))
        raise ValueError("adapterfab serve app args: "
                         + "; ".join(filter(None, [missing and f"missing {', '.join(missing)}",
                                                   unknown and f"unknown {', '.join(unknown)}"]))
                         + f" (allowed: {allowed})")
    options = {name: _builder_arg(name, kind, args[name]) for name, kind in _BUILDER_OPTIONAL.items()
               if args.get(name) is not None}
    bad = [
        options.get("dtype", "float32") not in DTYPES and f"dtype must be one of {', '.join(DTYPES)}",
        options.get("num_replicas", 1) < 1 and "num_replicas must be at least 1",
        options.get("engine", "batched") not in ("batched", "simple") and "engine must be batched or simple",
        (options.get("min_replicas") is None) != (options.get("max_replicas") is None)
        and "give both min_replicas and max_replicas (autoscaling) or neither",
        min(options.get("replica_num_cpus", 0), options.get("replica_num_gpus", 0)) < 0
        and "replica_num_cpus and replica_num_gpus must not be negative",
        options.get("max_tokens_cap", 1) < 1 and "max_tokens_cap must be at least 1",
        min(options.get("max_ongoing_requests", 1), options.get("ingress_max_ongoing_requests", 1)) < 1
        and "max_ongoing_requests and ingress_max_ongoing_requests must be at least 1",
        options.get("tenant_max_slots", 0) < 0 and "tenant_max_slots must not be negative",
        # a replica cannot start with these (Serve would restart it forever): refused here, at deploy
        *(options.get(k, 1) < 1 and f"{k} must be at least 1"
          for k in ("max_adapters_per_replica", "max_batch", "max_len", "max_rank", "torch_threads",
                    "tenant_burst", "target_ongoing_requests", "adapter_cache_mb")),
        options.get("cpu_cache_mb", 0) < 0 and "cpu_cache_mb must not be negative",
        options.get("tenant_rps", 0) < 0 and "tenant_rps must not be negative",
        options.get("auth_max_failures", 0) < 0 and "auth_max_failures must not be negative",
        options.get("auth_failure_window_s", 1) <= 0 and "auth_failure_window_s must be positive",
        not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                for v in options.get("tenant_rps_overrides", {}).values())
        and "tenant_rps_overrides must map tenants to requests/s (numbers, not negative)",
    ]
    if any(bad):
        raise ValueError("adapterfab serve app args: " + "; ".join(b for b in bad if b))
    base = resolve_base_model(str(args["base_model"]))
    return build_app(ServeConfig(base_model_path=base.path, state_url=str(args["state_url"]),
                                 mlflow_uri=str(args["mlflow_uri"]), base_fingerprint=base.fingerprint,
                                 **options))


def deploy(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, blocking: bool = False) -> str:
    """Start Serve's HTTP proxy on ``host:port`` and run the app; returns the base URL."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=blocking)
    return f"http://{host}:{port}"
