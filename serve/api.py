"""The OpenAI-compatible HTTP API (FastAPI, no Ray): tenant keys, adapter resolution, chat completions.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (a raw prompt), ``GET /v1/models``, the
registry lookup ``GET /v1/registry/adapters[/{persona}[/{version|alias}]]`` (the key's own adapters:
versions, aliases, lineage and promotion decisions), the same under ``/tenants/{tenant}/v1/...``, and
``GET /healthz``. ``model`` is ``tenant/persona[@alias|@version]`` or ``base``; on a tenant route
``persona[@ref]`` is enough. A key reaches only its own tenant's adapters, and a foreign adapter gets
the same 404 as a missing one, so nobody learns what other tenants have. With a ``RateLimiter`` each
tenant gets a token bucket; over it, a 429 in OpenAI's error shape with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from cachetools import LRUCache
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapterfab.errors import AdapterfabError, AdapterNotFound, BaseMismatch, RegistryError
from adapterfab.ids import AdapterId, is_decimal, version_number
from adapterfab.registry import AdapterVersion, RegisteredAdapter
from adapterfab.serve import openai_format
from adapterfab.serve.api_errors import ApiError, backend_error, field_error, model_not_found
from adapterfab.serve.auth_guard import AuthFailureLimiter
from adapterfab.serve.backend import Backend
from adapterfab.serve.engine import Finished, SamplingParams
from adapterfab.serve.observe import CountRequests, Metrics, RequestIds, install_record_factory
from adapterfab.serve.openai_models import MAX_CHOICES, ChatRequest, CompletionRequest, FieldError
from adapterfab.serve.sampling import InvalidGuide, grammar_of

__all__ = ["ApiError", "RateLimiter", "ResolveCache", "make_api", "model_not_found"]

log = logging.getLogger("adapterfab.serve.api")

BASE_MODEL = "base"
MAX_REQUEST_BYTES = 1 << 20  # a generation request's JSON body; larger ones get a 413 unread
_RESOLVE_CACHE_MAX_ENTRIES = 10_000
# a request whose replica died before any byte reached the client (a non-streaming one: any time) is
# sent again this often; the only retry of a dead replica (app.RayBackend does not retry)
REPLAYS = 2
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of tokens
IGNORED_HEADER = "X-Adapterfab-Ignored-Fields"
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
CLIENT_GONE = 499  # the status logged for a request whose client went away (nothing is sent)


def ignored_header(names: list[str], limit: int = 1000) -> str:
    """The ignored fields' names for the header, cut to ``limit`` characters (a body may name thousands)."""
    kept: list[str] = []
    size = 0
    for name in names:
        size += len(name) + 2 * bool(kept)
        if size > limit:
            return ", ".join(kept) + f", ... ({len(names) - len(kept)} more)"
        kept.append(name)
    return ", ".join(kept)


class RateLimiter:
    """Per-tenant token buckets: ``rps`` requests per second on average, bursts of up to ``burst``;
    ``per_tenant`` overrides the rate for named tenants (with ``rps`` None, only they are limited). A
    generation request costs one token per
    generation it asks for (prompts × n; at most ``burst``). In-process: with several ingress replicas
    each enforces its own share."""

    def __init__(self, rps: float | None, burst: int = 20, per_tenant: dict[str, float] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.rps, self.burst, self.per_tenant, self.clock = rps, burst, dict(per_tenant or {}), clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, last refill)

    def check(self, tenant: str, cost: float = 1.0) -> float:
        """0 when the request may go now (``cost`` tokens are taken), else the seconds until it may (nothing
        is consumed then)."""
        rate = self.per_tenant.get(tenant, self.rps)
        if rate is None:  # no default rate and no override: unlimited
            return 0.0
        cost = min(float(cost), float(self.burst))  # a request the bucket can never hold would never go
        now = self.clock()
        tokens, last = self._buckets.get(tenant, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * rate)
        if tokens >= cost:
            self._buckets[tenant] = (tokens - cost, now)
            return 0.0
        self._buckets[tenant] = (tokens, now)
        return (cost - tokens) / rate if rate > 0 else 60.0


_UNION_TAG = re.compile(r"^(str|int|float|bool|dict|list|none|[A-Z]\w*|.*\[.*)$")


def _validation_error(errors: list[dict[str, Any]]) -> ApiError:
    first = errors[0] if errors else {}
    # a union's member tags (``str``, ``list[ContentPart]``, ``function-after[...]``) are not fields
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _UNION_TAG.match(str(p))]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":
        msg = f"Unrecognized request argument supplied: {param}"
    elif param:
        msg = f"Invalid value for '{param}': {msg}"
    return ApiError(400, msg, param=param, code="invalid_value" if first.get("type") != "extra_forbidden"
                    else "unknown_parameter")


class ResolveCache:
    """Resolutions (including 'not found') live ``ttl_s`` seconds: short enough that an alias move
    is followed without a restart, long enough to keep the registry off the hot path. While the
    registry is unreachable, an expired resolution is served as it was (stale but valid: the version
    it names exists) and retried after another ``ttl_s``; only an id never resolved gets a 503."""

    def __init__(self, resolver: Callable[[AdapterId], AdapterVersion], ttl_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 on_alias_moved: Callable[[str], Any] | None = None):
        self.resolver, self.ttl_s, self.clock = resolver, ttl_s, clock
        self.on_alias_moved = on_alias_moved  # called with the new version key when an alias moves
        # the least recently used resolutions go first past _RESOLVE_CACHE_MAX_ENTRIES (expiry is ours: an
        # expired resolution still answers while the registry is down, which a TTL cache would have dropped)
        self._entries: LRUCache[AdapterId, tuple[float, AdapterVersion | None]] = LRUCache(_RESOLVE_CACHE_MAX_ENTRIES)

    async def get(self, aid: AdapterId) -> AdapterVersion | None:
        now = self.clock()
        hit = self._entries.get(aid)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            version: AdapterVersion | None = await run_in_threadpool(self.resolver, aid)
        except AdapterNotFound:
            version = None
        except BaseMismatch as e:
            raise ApiError(400, str(e), param="model", code="adapter_base_mismatch") from None
        except RegistryError as e:
            if hit is not None:  # the registry is down: keep answering as before, ask again in ttl_s
                log.warning("registry lookup of %s failed (%s); serving its last resolution", aid, e)
                self._entries[aid] = (now + self.ttl_s, hit[1])
                return hit[1]
            log.warning("registry lookup of %s failed: %s", aid, e)  # nothing to answer with: say so
            raise _registry_unavailable() from None
        previous = hit[1] if hit is not None else None
        if (self.on_alias_moved and aid.alias and version is not None and previous is not None
                and previous.id != version.id):
            try:  # warm the new version before its first request (prefetch)
                self.on_alias_moved(str(version.id))
            except Exception:  # noqa: BLE001 - a prefetch is an optimisation
                log.warning("prefetch of %s failed", version.id, exc_info=True)
        self._entries[aid] = (now + self.ttl_s, version)
        return version


def _registry_unavailable() -> ApiError:
    return ApiError(503, "The adapter registry is unavailable; retry shortly.", type_="server_error",
                    code="registry_unavailable")


class _InternalErrors:
    """ASGI middleware: an exception no handler took becomes a 500 in OpenAI's shape (Starlette's own is
    plain text, which OpenAI clients cannot parse), logged with its traceback. The body never carries
    the exception's text, which may name internals. Inside ``RequestIds`` and ``CountRequests``, so the
    log line has the request id, the response its ``X-Request-Id`` and the metrics its 500. A response
    already started (a stream) cannot be replaced: the exception goes on to the server."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch_start(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch_start)
        except Exception:
            if started:
                raise
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            error = ApiError(500, "internal error", type_="server_error", code="internal_error")
            await error.response()(scope, receive, send)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


async def _json_body(request: Request, max_bytes: int) -> Any:
    """The request's JSON, refused with a 413 past ``max_bytes`` (checked on the declared length, then
    while reading, so an oversized body is never held whole) and a 400 when it is not JSON."""
    too_large = ApiError(413, f"The request body is larger than {max_bytes:,} bytes.",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if is_decimal(declared) and int(declared) > max_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ApiError(400, "The request body is not valid JSON.", code="invalid_json") from None


def make_api(backend: Backend, auth: Callable[[str | None], str | None],
             resolver: Callable[[AdapterId], AdapterVersion],
             lister: Callable[[str], list[str]] | None = None, resolve_ttl_s: float = 5.0,
             catalog: Callable[[str], list[RegisteredAdapter]] | None = None,
             on_alias_moved: Callable[[str], Any] | None = None,
             rate_limit: RateLimiter | None = None, max_request_bytes: int = MAX_REQUEST_BYTES,
             max_tokens_cap: int | None = None, echo_request_id: bool = True,
             metrics_auth: Callable[[str | None], bool] | None = None,
             auth_limit: AuthFailureLimiter | None = None) -> FastAPI:
    """``auth(key) -> tenant | None`` and ``resolver`` are blocking (they run in a thread pool);
    ``lister(tenant)`` names the tenant's models for ``GET /v1/models`` (base only when absent);
    ``catalog(tenant)`` lists the tenant's registered adapters for ``/v1/registry/...``;
    a generation request's body over ``max_request_bytes`` gets a 413. ``max_tokens_cap``: the operator's cap on
    a reply's tokens (a request asking for more is a 400; one that names none gets up to the rest of the
    context, within the cap). ``GET /metrics``: Prometheus (``serve/observe.py``); ``echo_request_id``
    False where a proxy in front already sends ``X-Request-Id`` back (Ray Serve's). ``metrics_auth(key)``:
    whether a key may read ``/metrics`` (labels name tenants and adapters: an operator's key in production;
    None leaves it open, for in-process use). ``auth_limit``: wrong keys allowed per client address
    (``serve/auth_guard.py``; None: its defaults; ``AuthFailureLimiter(0)``: no limit)."""
    app = FastAPI(title="adapterfab", docs_url=None, redoc_url=None)
    resolve = ResolveCache(resolver, resolve_ttl_s, on_alias_moved=on_alias_moved)
    guard = auth_limit or AuthFailureLimiter()  # a client's wrong keys past the limit: a 429, not a 401
    install_record_factory()  # log records carry the request id (formats name it: observe.TEXT_FORMAT)
    metrics = Metrics(getattr(backend, "stats", None))
    app.add_middleware(_InternalErrors)  # added first: innermost, inside the request id and the count
    app.add_middleware(CountRequests, metrics=metrics)
    app.add_middleware(RequestIds, echo=echo_request_id)  # added last: outermost, so every line has the id

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return ApiError(exc.status_code, str(exc.detail), param=None, code=code).response()

    async def tenant_of(request: Request, path_tenant: str | None) -> str:
        key = _bearer(request)
        if key is None:
            raise ApiError(401, "You didn't provide an API key: use 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        tenant = await guard.check(request, key, auth)
        if tenant is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        if path_tenant is not None and path_tenant != tenant:
            raise ApiError(404, "Not found.", code="not_found")
        request.state.tenant = tenant
        limit(tenant)  # every route a tenant reaches counts against its rate
        return tenant

    def limit(tenant: str, cost: float = 1.0) -> None:
        wait = rate_limit.check(tenant, cost) if rate_limit is not None else 0.0
        if wait > 0:
            metrics.rate_limited.labels(tenant).inc()
            raise ApiError(429, f"Rate limit reached for tenant {tenant}; retry in {wait:.1f} s.", type_="requests",
                           code="rate_limit_exceeded", headers={"Retry-After": str(max(1, round(wait + 0.5)))})

    async def resolve_model(tenant: str, model: str,
                            on_tenant_route: bool) -> tuple[str | None, AdapterVersion | None]:
        if model == BASE_MODEL:
            return None, None
        text = model if "/" in model or not on_tenant_route else f"{tenant}/{model}"
        try:
            aid = AdapterId.parse(text)
        except AdapterfabError:
            raise model_not_found(model) from None
        version = await resolve.get(aid) if aid.tenant == tenant else None
        if version is None:
            raise model_not_found(model)
        return str(version.id), version

    async def start(version_key: str | None, version: AdapterVersion | None, prompt: Any,
                    params: SamplingParams, model: str, tenant: str, prompt_field: str,
                    budget: list[int]) -> tuple[Any, Any]:
        """One generation's first event and the rest; errors before any byte is sent are raised here,
        and a generation whose replica died is replayed whole while the request's replay ``budget`` (one
        list shared by its choices and the whole-request replays below) lasts."""
        attempt = 0
        while True:
            events = backend.generate(version_key, version, prompt, params).__aiter__()
            try:
                return await _first_event(events, model, tenant, prompt_field), events
            except ApiError as e:
                await openai_format.aclose(events)
                if e.code != "replica_unavailable" or budget[0] <= 0:
                    raise
                budget[0] -= 1
                attempt += 1
                log.warning("replaying a request of tenant %s after its replica died (%d)", tenant, attempt)
                await asyncio.sleep(0.2 * attempt)  # Serve marks the dead replica; the replay goes to another

    async def generation(request: Request, path_tenant: str | None, kind: str) -> Any:
        """``kind``: "chat" (messages, the chat template) or "text" (raw prompts or token ids)."""
        t0 = time.monotonic()
        request.state.route = "chat" if kind == "chat" else "completions"
        tenant = await tenant_of(request, path_tenant)
        body = await _json_body(request, max_request_bytes)
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
        try:
            req: Any = (ChatRequest if kind == "chat" else CompletionRequest).model_validate(body)
            prompts: list[Any] = [req.conversation()] if kind == "chat" else req.prompts()
            asked = req.requested_max_tokens
            if max_tokens_cap is not None and asked is not None and asked > max_tokens_cap:
                field = "max_completion_tokens" if kind == "chat" and req.max_completion_tokens else "max_tokens"
                raise FieldError(field, f"{field} is at most {max_tokens_cap} on this server.", "invalid_value")
            params = dataclasses.replace(req.sampling(max_tokens_cap), tenant=tenant)
            if len(prompts) * req.choices_per_prompt > MAX_CHOICES:
                raise FieldError("n", f"At most {MAX_CHOICES} choices per request (prompts × n).", "invalid_value")
            # the rate counts generations: one token each (the way in took the first), at most the burst
            if rate_limit is not None and len(prompts) * req.choices_per_prompt > 1:
                limit(tenant, min(len(prompts) * req.choices_per_prompt, rate_limit.burst) - 1)
            if params.guide is not None:
                await asyncio.to_thread(grammar_of, params.guide)  # a bad schema: a 400 before any work; off the loop
        except ValidationError as e:
            raise _validation_error(list(e.errors())) from None
        except FieldError as e:
            raise field_error(e) from None
        except InvalidGuide as e:
            raise ApiError(400, str(e), param=req.guide_field(), code="invalid_response_format") from None
        ignored = req.ignored()
        if ignored:
            log.warning("tenant %s: fields ignored in a %s request: %s", tenant, kind, ignored_header(ignored))
        version_key, version = await resolve_model(tenant, req.model, path_tenant is not None)
        adapter = version.id.key if version is not None else BASE_MODEL  # a label: versions are not
        request.state.adapter = adapter
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        meta = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": version_key or BASE_MODEL}
        n, prompt_field = req.choices_per_prompt, "messages" if kind == "chat" else "prompt"
        jobs = []
        for p, prompt in enumerate(prompts):
            for j in range(n):  # the j-th sample of a seeded request draws from seed + j
                seed = None if params.seed is None else params.seed + j
                jobs.append((p, prompt, dataclasses.replace(params, seed=seed)))
        chat_echo = req.echo_text() if kind == "chat" else ""  # completions echo each choice's own prompt text

        # replays of this request in all, counted in generations: REPLAYS per choice, so that a request never
        # costs more than (REPLAYS + 1) generations per choice however its replicas die
        budget = [REPLAYS * len(jobs)]

        async def start_all() -> list[openai_format.Choice]:
            """Every choice's first event (a choice that fails before it stops the others)."""
            starts = [asyncio.ensure_future(start(version_key, version, prompt, ps, req.model, tenant, prompt_field,
                                                  budget))
                      for _, prompt, ps in jobs]
            try:
                started = await asyncio.gather(*starts)
            except BaseException:
                for t in starts:
                    t.cancel()
                for r in await asyncio.gather(*starts, return_exceptions=True):
                    if isinstance(r, tuple):
                        await openai_format.aclose(r[1])
                raise
            return [openai_format.Choice(i, p, first, events, echo=chat_echo or (
                        prompt if kind == "text" and req.echo and isinstance(prompt, str) else ""))
                    for i, ((p, prompt, _), (first, events)) in enumerate(zip(jobs, started))]

        headers = {IGNORED_HEADER: ignored_header(ignored)} if ignored else {}
        on_error = lambda e: backend_error(e, meta["model"], tenant, prompt_field)  # noqa: E731
        logprobs = params.logprobs is not None
        gone = Response(status_code=CLIENT_GONE)  # for a client that went away: nobody reads it
        if req.stream:  # once a byte is sent, a dead replica ends the stream with an in-band error
            choices = await _unless_disconnected(request, start_all())  # (a choice may wait for a row)
            if choices is None:
                return gone
            opts = req.stream_options
            usage = opts is not None and opts.include_usage
            watch = metrics.watch(tenant, adapter, t0)
            return StreamingResponse(openai_format.stream(meta, choices, kind, logprobs, usage, on_error, watch,
                                                          continuous_usage=usage and opts.continuous_usage_stats),
                                     media_type="text/event-stream", headers={**_SSE_HEADERS, **headers})

        async def whole() -> dict[str, Any]:
            """Nothing reaches the client before the whole body: a replica that dies mid-generation is
            replayed (one watch for every attempt: the one that answers gives the request's first-text time)."""
            attempt = 0
            choices = await start_all()
            watch = metrics.watch(tenant, adapter, t0, replayable=True)
            try:
                while True:
                    try:
                        return await openai_format.complete(meta, choices, kind, logprobs, on_error, watch)
                    except ApiError as e:
                        if e.code != "replica_unavailable" or budget[0] < len(jobs):
                            raise
                        budget[0] -= len(jobs)  # every choice is generated again
                        attempt += 1
                        log.warning("replaying a request of tenant %s after its replica died mid-generation (%d)",
                                    tenant, attempt)
                        watch.replayed()
                        await asyncio.sleep(0.2 * attempt)
                        choices = await start_all()
            finally:
                watch.close()  # a no-op after done(), which closed it with the request's time

        # served without Ray Serve (uvicorn), nothing else stops the choices of a client that went away
        body = await _unless_disconnected(request, whole())
        if body is None:
            log.info("tenant %s: the client went away; its %d generations were stopped", tenant, len(jobs))
            return gone
        return JSONResponse(body, headers=headers)

    async def chat(request: Request, path_tenant: str | None) -> Any:
        return await generation(request, path_tenant, "chat")

    async def models(request: Request, path_tenant: str | None) -> dict[str, Any]:
        request.state.route = "models"
        tenant = await tenant_of(request, path_tenant)
        names = [BASE_MODEL] + (sorted(await from_registry(lister, tenant)) if lister else [])
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0,
                                            "owned_by": "adapterfab" if n == BASE_MODEL else tenant}
                                           for n in names]}

    async def from_registry(fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the thread pool; the registry being unreachable is a 503 to retry, not a 500."""
        try:
            return await run_in_threadpool(fn, *args)
        except RegistryError as e:
            log.warning("registry lookup failed: %s", e)
            raise _registry_unavailable() from None

    async def registry_call(fn: Callable[..., Any], *args: Any) -> Any:
        if catalog is None:
            raise ApiError(404, "This server has no registry lookup.", code="not_found")
        try:
            return await from_registry(fn, *args)
        except AdapterNotFound:
            return None

    async def own_adapters(request: Request, path_tenant: str | None) -> list[RegisteredAdapter]:
        request.state.route = "registry"
        tenant = await tenant_of(request, path_tenant)
        return [ra for ra in (await registry_call(catalog, tenant) or []) if ra.id.tenant == tenant]

    async def registry_list(request: Request, path_tenant: str | None) -> dict[str, Any]:
        return {"object": "list", "data": [ra.public_dict() for ra in await own_adapters(request, path_tenant)]}

    async def registry_one(request: Request, path_tenant: str | None, persona: str,
                           ref: str | None) -> dict[str, Any]:
        found = [ra for ra in await own_adapters(request, path_tenant) if ra.id.persona == persona]
        shown = persona if ref is None else f"{persona}@{ref}"
        if not found:
            raise model_not_found(shown)
        ra = found[0]
        if ref is None:
            return ra.public_dict()
        number = version_number(ref) if is_decimal(ref) else ra.aliases.get(ref)
        for v in ra.versions:
            if v.id.version == number:
                return v.public_dict()
        raise model_not_found(shown)

    @app.get("/v1/registry/adapters")
    async def registry_list_global(request: Request) -> dict[str, Any]:
        return await registry_list(request, None)

    @app.get("/tenants/{tenant}/v1/registry/adapters")
    async def registry_list_tenant(tenant: str, request: Request) -> dict[str, Any]:
        return await registry_list(request, tenant)

    @app.get("/v1/registry/adapters/{persona}")
    async def registry_one_global(persona: str, request: Request) -> dict[str, Any]:
        return await registry_one(request, None, persona, None)

    @app.get("/tenants/{tenant}/v1/registry/adapters/{persona}")
    async def registry_one_tenant(tenant: str, persona: str, request: Request) -> dict[str, Any]:
        return await registry_one(request, tenant, persona, None)

    @app.get("/v1/registry/adapters/{persona}/{ref}")
    async def registry_version_global(persona: str, ref: str, request: Request) -> dict[str, Any]:
        return await registry_one(request, None, persona, ref)

    @app.get("/tenants/{tenant}/v1/registry/adapters/{persona}/{ref}")
    async def registry_version_tenant(tenant: str, persona: str, ref: str, request: Request) -> dict[str, Any]:
        return await registry_one(request, tenant, persona, ref)

    @app.get("/healthz")
    async def healthz(request: Request) -> dict[str, str]:
        request.state.route = "healthz"
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus(request: Request) -> Response:
        request.state.route = "metrics"
        if metrics_auth is not None and not await guard.check(request, _bearer(request), metrics_auth, bool,
                                                              "metrics"):
            raise ApiError(403, "Metrics need an operator key (`adapterfab keys create-operator`).",
                           code="forbidden")
        return Response(await metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat_global(request: Request) -> Any:
        return await chat(request, None)

    @app.post("/tenants/{tenant}/v1/chat/completions")
    async def chat_tenant(tenant: str, request: Request) -> Any:
        return await chat(request, tenant)

    @app.post("/v1/completions")
    async def completions_global(request: Request) -> Any:
        return await generation(request, None, "text")

    @app.post("/tenants/{tenant}/v1/completions")
    async def completions_tenant(tenant: str, request: Request) -> Any:
        return await generation(request, tenant, "text")

    @app.get("/v1/models")
    async def models_global(request: Request) -> dict[str, Any]:
        return await models(request, None)

    @app.get("/tenants/{tenant}/v1/models")
    async def models_tenant(tenant: str, request: Request) -> dict[str, Any]:
        return await models(request, tenant)

    return app


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """``work``'s result, or None when the client disconnects first (checked every ``DISCONNECT_POLL_S``):
    then ``work`` is cancelled, which closes every choice's events and so stops its engine rows. Ray
    Serve cancels a request whose client went away by itself; uvicorn serving the app directly does not."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                # work that finished meanwhile is returned: its choices are open, and the caller's usual
                # path closes them (a stream's next chunk finds the client gone)
                return task.result() if task.done() else None
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _first_event(events: AsyncIterator[Any], model: str, tenant: str, prompt_field: str) -> Any:
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return Finished("stop", 0, 0)
    except Exception as e:  # noqa: BLE001
        raise backend_error(e, model, tenant, prompt_field) from None
