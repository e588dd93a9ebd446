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
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapterfab.chat import TemplateError
from adapterfab.errors import AdapterfabError, AdapterNotFound, BaseMismatch, RegistryError, ReplicaUnavailable
from adapterfab.ids import AdapterId, is_decimal
from adapterfab.registry import AdapterVersion, RegisteredAdapter
from adapterfab.serve.backend import Backend
from adapterfab.serve.engine import Finished, PromptTooLong, SamplingParams, TextDelta

log = logging.getLogger("adapterfab.serve.api")

BASE_MODEL = "base"
DEFAULT_MAX_TOKENS = 256
MAX_TOKENS_LIMIT = 2048
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256  # per stop string: each one is matched against the output's tail at every token
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)  # a 64-bit integer, as vLLM's server takes it
MAX_REQUEST_BYTES = 1 << 20  # a generation request's JSON body; larger ones get a 413 unread
_RESOLVE_CACHE_MAX_ENTRIES = 10_000
# a request whose replica died before any byte reached the client (a non-streaming one: any time) is
# sent again this often; the only retry of a dead replica (app.RayBackend does not retry)
REPLAYS = 2
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of tokens


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class RateLimiter:
    """Per-tenant token buckets: ``rps`` requests per second on average, bursts of up to ``burst``;
    ``per_tenant`` overrides the rate for named tenants. In-process: with several ingress replicas
    each enforces its own share."""

    def __init__(self, rps: float, burst: int = 20, per_tenant: dict[str, float] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.rps, self.burst, self.per_tenant, self.clock = rps, burst, dict(per_tenant or {}), clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, last refill)

    def check(self, tenant: str) -> float:
        """0 when the request may go now, else the seconds until it may (nothing is consumed then)."""
        rate = self.per_tenant.get(tenant, self.rps)
        now = self.clock()
        tokens, last = self._buckets.get(tenant, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * rate)
        if tokens >= 1.0:
            self._buckets[tenant] = (tokens - 1.0, now)
            return 0.0
        self._buckets[tenant] = (tokens, now)
        return (1.0 - tokens) / rate if rate > 0 else 60.0


def model_not_found(model: str) -> ApiError:
    """One message for 'missing' and 'not yours', so a 404 reveals nothing."""
    return ApiError(404, f"The model `{model}` does not exist or you do not have access to it.",
                    param="model", code="model_not_found")


def _encodable(text: str) -> str:
    """JSON may carry lone surrogates (``"\\ud800"``) that no tokenizer takes: refuse them as a 400."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds an unpaired UTF-16 surrogate; send valid Unicode") from None
    return text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: str) -> str:
        return _encodable(v)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """What chat and text completions share: sampling, stops, streaming, one choice."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=300)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    user: str | None = Field(None, max_length=256)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters")
        for s in stops:
            _encodable(s)
        return v

    def _params(self, max_tokens: int) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              stop=tuple(stops), seed=self.seed)


class ChatRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)

    def sampling(self) -> SamplingParams:
        return self._params(self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS)


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: a raw prompt (no chat template), one choice."""

    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS_LIMIT)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        prompts = [v] if isinstance(v, str) else v
        if len(prompts) != 1:
            raise ValueError("send one prompt per request")
        if not prompts[0]:
            raise ValueError("the prompt is empty")
        _encodable(prompts[0])
        return v

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def sampling(self) -> SamplingParams:
        return self._params(self.max_tokens)


def _validation_error(errors: list[dict[str, Any]]) -> ApiError:
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
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
        self._entries: dict[AdapterId, tuple[float, AdapterVersion | None]] = {}

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
            raise ApiError(503, "The adapter registry is unavailable; retry shortly.", type_="server_error",
                           code="registry_unavailable") from None
        if len(self._entries) >= _RESOLVE_CACHE_MAX_ENTRIES:
            self._entries.clear()
        previous = hit[1] if hit is not None else None
        if (self.on_alias_moved and aid.alias and version is not None and previous is not None
                and previous.id != version.id):
            try:  # warm the new version before its first request (prefetch)
                self.on_alias_moved(str(version.id))
            except Exception:  # noqa: BLE001 - a prefetch is an optimisation
                log.warning("prefetch of %s failed", version.id, exc_info=True)
        self._entries[aid] = (now + self.ttl_s, version)
        return version


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


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def make_api(backend: Backend, auth: Callable[[str | None], str | None],
             resolver: Callable[[AdapterId], AdapterVersion],
             lister: Callable[[str], list[str]] | None = None, resolve_ttl_s: float = 5.0,
             catalog: Callable[[str], list[RegisteredAdapter]] | None = None,
             on_alias_moved: Callable[[str], Any] | None = None,
             rate_limit: RateLimiter | None = None, max_request_bytes: int = MAX_REQUEST_BYTES) -> FastAPI:
    """``auth(key) -> tenant | None`` and ``resolver`` are blocking (they run in a thread pool);
    ``lister(tenant)`` names the tenant's models for ``GET /v1/models`` (base only when absent);
    ``catalog(tenant)`` lists the tenant's registered adapters for ``/v1/registry/...``;
    a generation request's body over ``max_request_bytes`` gets a 413."""
    app = FastAPI(title="adapterfab", docs_url=None, redoc_url=None)
    resolve = ResolveCache(resolver, resolve_ttl_s, on_alias_moved=on_alias_moved)

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
        tenant = await run_in_threadpool(auth, key)
        if tenant is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        if path_tenant is not None and path_tenant != tenant:
            raise ApiError(404, "Not found.", code="not_found")
        limit(tenant)  # every route a tenant reaches counts against its rate
        return tenant

    def limit(tenant: str) -> None:
        wait = rate_limit.check(tenant) if rate_limit is not None else 0.0
        if wait > 0:
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

    async def generation(request: Request, path_tenant: str | None, kind: str) -> Any:
        """``kind``: "chat" (messages, the chat template) or "text" (a raw prompt)."""
        tenant = await tenant_of(request, path_tenant)
        body = await _json_body(request, max_request_bytes)
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
        try:
            req: Any = (ChatRequest if kind == "chat" else CompletionRequest).model_validate(body)
        except ValidationError as e:
            raise _validation_error(list(e.errors())) from None
        version_key, version = await resolve_model(tenant, req.model, path_tenant is not None)
        shown_model = version_key or BASE_MODEL
        prompt: Any = ([{"role": m.role, "content": m.content} for m in req.messages] if kind == "chat"
                       else req.text())
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        meta = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": shown_model}
        for attempt in range(1, REPLAYS + 2):
            events = backend.generate(version_key, version, prompt,
                                      dataclasses.replace(req.sampling(), tenant=tenant)).__aiter__()
            try:
                first = await _first_event(events, req.model, tenant)  # errors before any byte is sent
                if req.stream:
                    usage = req.stream_options is not None and req.stream_options.include_usage
                    return StreamingResponse(_stream(meta, first, events, usage, tenant, kind),
                                             media_type="text/event-stream", headers=_SSE_HEADERS)
                return await _complete(meta, first, events, tenant, kind)
            except ApiError as e:
                # nothing has reached the client yet: a request whose replica died is replayed whole
                if e.code != "replica_unavailable" or attempt > REPLAYS:
                    raise
                log.warning("replaying a request of tenant %s after its replica died (%d/%d)", tenant, attempt,
                            REPLAYS)
                await asyncio.sleep(0.2 * attempt)  # Serve marks the dead replica; the replay goes to another
        raise AssertionError("unreachable")

    async def chat(request: Request, path_tenant: str | None) -> Any:
        return await generation(request, path_tenant, "chat")

    async def models(request: Request, path_tenant: str | None) -> dict[str, Any]:
        tenant = await tenant_of(request, path_tenant)
        names = [BASE_MODEL] + (sorted(await run_in_threadpool(lister, tenant)) if lister else [])
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0,
                                            "owned_by": "adapterfab" if n == BASE_MODEL else tenant}
                                           for n in names]}

    async def registry_call(fn: Callable[..., Any], *args: Any) -> Any:
        if catalog is None:
            raise ApiError(404, "This server has no registry lookup.", code="not_found")
        try:
            return await run_in_threadpool(fn, *args)
        except AdapterNotFound:
            return None
        except RegistryError as e:
            log.warning("registry lookup failed: %s", e)
            raise ApiError(503, "The adapter registry is unavailable; retry shortly.", type_="server_error",
                           code="registry_unavailable") from None

    async def own_adapters(request: Request, path_tenant: str | None) -> list[RegisteredAdapter]:
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
        number = int(ref) if is_decimal(ref) else ra.aliases.get(ref)
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
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

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


def _backend_error(exc: BaseException, model: str, tenant: str) -> ApiError:
    cause = getattr(exc, "cause", None)  # Ray wraps replica errors in RayTaskError(cause)
    exc = cause if isinstance(cause, BaseException) else exc
    if isinstance(exc, AdapterNotFound):
        return model_not_found(model)
    if isinstance(exc, ReplicaUnavailable):
        log.warning("tenant %s model %s: %s", tenant, model, exc)
        return ApiError(503, "The serving replica failed during this request; retry it.", type_="server_error",
                        code="replica_unavailable", headers={"Retry-After": "1"})
    if isinstance(exc, PromptTooLong):
        return ApiError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, TemplateError):
        return ApiError(400, f"The model's chat template cannot take these messages: {exc}", param="messages",
                        code="invalid_messages")
    log.error("generation failed for tenant %s model %s: %r", tenant, model, exc, exc_info=exc)
    return ApiError(500, "The server failed to generate a response; see the server log.",
                    type_="server_error", code="internal_error")


async def _first_event(events: AsyncIterator[Any], model: str, tenant: str) -> Any:
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return Finished("stop", 0, 0)
    except Exception as e:  # noqa: BLE001
        raise _backend_error(e, model, tenant) from None


async def _complete(meta: dict[str, Any], first: Any, events: AsyncIterator[Any],
                    tenant: str, kind: str = "chat") -> dict[str, Any]:
    parts: list[str] = []
    done: Finished | None = None
    try:
        ev = first
        while True:
            if isinstance(ev, TextDelta):
                parts.append(ev.text)
            elif isinstance(ev, Finished):
                done = ev
                break
            ev = await events.__anext__()
    except StopAsyncIteration:
        pass
    except Exception as e:  # noqa: BLE001
        raise _backend_error(e, meta["model"], tenant) from None
    finally:
        await _aclose(events)
    done = done or Finished("stop", 0, 0)
    if kind == "text":
        return {**meta, "object": "text_completion",
                "choices": [{"index": 0, "text": "".join(parts), "finish_reason": done.finish_reason,
                             "logprobs": None}], "usage": _usage(done)}
    return {**meta, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                         "finish_reason": done.finish_reason, "logprobs": None}],
            "usage": _usage(done)}


async def _stream(meta: dict[str, Any], first: Any, events: AsyncIterator[Any], include_usage: bool,
                  tenant: str, kind: str = "chat") -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        if kind == "text":
            return _sse({**meta, "object": obj, "choices": [{"index": 0, "text": delta.get("content", ""),
                                                             "finish_reason": finish, "logprobs": None}]})
        return _sse({**meta, "object": obj,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    try:
        if kind == "chat":
            yield chunk({"role": "assistant", "content": ""})
        ev = first
        while True:
            if isinstance(ev, TextDelta):
                yield chunk({"content": ev.text})
            elif isinstance(ev, Finished):
                yield chunk({}, ev.finish_reason)
                if include_usage:
                    yield _sse({**meta, "object": obj, "choices": [], "usage": _usage(ev)})
                break
            ev = await events.__anext__()
    except StopAsyncIteration:
        yield chunk({}, "stop")
    except Exception as e:  # noqa: BLE001 - headers are sent: report in-band, as OpenAI does
        yield _sse(_backend_error(e, meta["model"], tenant).body())
    finally:
        await _aclose(events)
    yield "data: [DONE]\n\n"


def _usage(done: Finished) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


async def _aclose(events: AsyncIterator[Any]) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:  # noqa: BLE001 - best effort
            pass
