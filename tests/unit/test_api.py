"""The OpenAI-compatible API over HTTP with the official ``openai`` client: uvicorn in a thread, an
in-process engine on the tiny model, real API keys in a temp SQLite state DB, a fake registry."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from servers import serve_in_thread

from adapterfab.errors import AdapterNotFound
from adapterfab.ids import AdapterId
from adapterfab.keys import KeyStore
from adapterfab.registry import AdapterVersion
from adapterfab.serve.api import make_api, model_not_found
from adapterfab.serve.backend import LocalBackend
from adapterfab.serve.engine import Engine, SamplingParams, TextDelta
from adapterfab.state import StateStore

MSGS = [{"role": "user", "content": "Ahoy?"}]
TTL_S = 0.3




class FakeRegistry:
    """tenant/persona -> versions and aliases; resolves like Registry.resolve."""

    def __init__(self) -> None:
        self.versions: dict[str, dict[int, Path]] = {}
        self.aliases: dict[str, dict[str, int]] = {}

    def resolve(self, aid: AdapterId) -> AdapterVersion:
        versions = self.versions.get(aid.key, {})
        n = aid.version or self.aliases.get(aid.key, {}).get(aid.alias or "production")
        if n is None and aid.alias is None and versions:
            n = max(versions)
        if n not in versions:
            raise AdapterNotFound(f"no adapter {aid}")
        return AdapterVersion(id=aid.unversioned().with_version(n), source=str(versions[n]), run_id=None,
                              tags={}, aliases=(), created_s=0.0)

    def list(self, tenant: str) -> list[str]:
        return [k for k in self.versions if k.startswith(tenant + "/")]


@pytest.fixture(scope="module")
def stack(tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory, make_lora_adapter) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("api")
    reg = FakeRegistry()
    reg.versions["acme/pirate"] = {1: make_lora_adapter(tiny_model_path, root / "p1", 1),
                                   2: make_lora_adapter(tiny_model_path, root / "p2", 2)}
    reg.aliases["acme/pirate"] = {"production": 1}
    reg.versions["globex/parrot"] = {1: make_lora_adapter(tiny_model_path, root / "g1", 3)}
    keys = KeyStore(StateStore(f"sqlite:///{root / 'state.db'}"))
    engine = Engine(tiny_model_path, torch_threads=1)
    backend = LocalBackend(engine, fetch=lambda v: v.source, max_adapters=2)
    app = make_api(backend, keys.verify, reg.resolve, lister=reg.list, resolve_ttl_s=TTL_S, max_tokens_cap=2048)
    with serve_in_thread(app) as url:
        yield {"url": url, "reg": reg, "engine": engine, "backend": backend,
               "acme": keys.create("acme"), "globex": keys.create("globex")}


def client(stack: dict, tenant: str = "acme", route: str = "/v1") -> openai.OpenAI:
    return openai.OpenAI(api_key=stack[tenant], base_url=stack["url"] + route, max_retries=0, timeout=60)


def direct(engine: Engine, adapter: str | None, params: SamplingParams) -> str:
    return "".join(e.text for e in engine.generate(MSGS, adapter, params) if isinstance(e, TextDelta))


def test_plain_and_stream(stack: dict) -> None:
    c = client(stack)
    r = c.chat.completions.create(model="acme/pirate", messages=MSGS, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == "acme/pirate@1"  # bare id -> production
    want = direct(stack["engine"], "acme/pirate@1", SamplingParams(max_tokens=12, temperature=0))
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(c.chat.completions.create(model="acme/pirate", messages=MSGS, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [r.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    base = c.chat.completions.create(model="base", messages=MSGS, max_tokens=8, temperature=0)
    assert base.model == "base"
    greedy8 = SamplingParams(max_tokens=8, temperature=0)
    assert base.choices[0].message.content == direct(stack["engine"], None, greedy8)
    other = client(stack, "globex").chat.completions.create(model="base", messages=MSGS, max_tokens=8,
                                                            temperature=0)
    assert other.choices[0].message.content == base.choices[0].message.content


def test_a_conversation_the_chat_template_refuses_is_a_400(stack: dict) -> None:
    """A chat template that refuses the messages (here: one that takes no system turn) is the client's
    error, named, not a server failure; the same engine then answers a conversation it takes."""
    tok = stack["engine"].tokenizer
    saved = tok.chat_template
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('this model takes no system message') }}{% endif %}"
                         "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    try:
        with pytest.raises(openai.BadRequestError) as e:
            client(stack).chat.completions.create(
                model="acme/pirate", max_tokens=4, temperature=0,
                messages=[{"role": "system", "content": "Be brief."}, *MSGS])
        assert e.value.status_code == 400 and e.value.code == "invalid_messages"
        assert "this model takes no system message" in e.value.message
        ok = client(stack).chat.completions.create(model="acme/pirate", messages=MSGS, max_tokens=4,
                                                   temperature=0)
        assert ok.choices[0].finish_reason in ("stop", "length")
    finally:
        tok.chat_template = saved


def test_auth_required(stack: dict) -> None:
    r = httpx.post(stack["url"] + "/v1/chat/completions", json={"model": "base", "messages": MSGS},
                   timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    for bad in ("nonsense", stack["acme"][:-2] + "xx", "af_0000000000000000_secret"):
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(api_key=bad, base_url=stack["url"] + "/v1", max_retries=0).chat.completions.create(
                model="base", messages=MSGS)
        assert e.value.status_code == 401
    assert httpx.get(stack["url"] + "/healthz").json() == {"status": "ok"}


def test_tenant_isolation(stack: dict) -> None:
    def not_found_body(tenant: str, model: str, route: str = "/v1") -> dict:
        r = httpx.post(f"{stack['url']}{route}/chat/completions", json={"model": model, "messages": MSGS},
                       headers={"Authorization": f"Bearer {stack[tenant]}"}, timeout=30)
        assert r.status_code == 404
        return r.json()

    foreign = not_found_body("globex", "acme/pirate")  # exists, but not globex's
    missing = not_found_body("globex", "acme/ghost")  # exists nowhere
    assert foreign == model_not_found("acme/pirate").body()
    assert missing == model_not_found("acme/ghost").body()
    assert not_found_body("globex", "acme/pirate@1") == model_not_found("acme/pirate@1").body()
    assert not_found_body("globex", "Not An Id!")["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client(stack, "acme").chat.completions.create(model="globex/parrot", messages=MSGS, max_tokens=4)
    with pytest.raises(openai.NotFoundError):  # path tenant must be the key's tenant
        client(stack, "globex", "/tenants/acme/v1").chat.completions.create(model="pirate", messages=MSGS)
    ids = [m.id for m in client(stack, "acme").models.list()]
    assert ids == ["base", "acme/pirate"]


def test_tenant_route_and_alias_move(stack: dict) -> None:
    c = client(stack, "acme", "/tenants/acme/v1")
    assert c.chat.completions.create(model="pirate@2", messages=MSGS, max_tokens=4).model == "acme/pirate@2"
    r = c.chat.completions.create(model="acme/pirate", messages=MSGS, max_tokens=4)
    assert r.model == "acme/pirate@1"
    stack["reg"].aliases["acme/pirate"]["production"] = 2
    try:
        time.sleep(TTL_S + 0.1)
        r = c.chat.completions.create(model="pirate@production", messages=MSGS, max_tokens=6, temperature=0)
        assert r.model == "acme/pirate@2"
        assert r.choices[0].message.content == direct(stack["engine"], "acme/pirate@2",
                                                      SamplingParams(max_tokens=6, temperature=0))
    finally:
        stack["reg"].aliases["acme/pirate"]["production"] = 1
    # 3 distinct adapters went through an LRU of 2: eviction happened and serving still works
    client(stack, "globex").chat.completions.create(model="globex/parrot", messages=MSGS, max_tokens=2)
    assert len(stack["engine"].adapters) <= 2 and stack["backend"].loads >= 3


@pytest.mark.parametrize("extra,param", [
    ({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 5000}, "max_tokens"),
    ({"n": 17}, "n"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"), ({"messages": []}, "messages"),
])
def test_validation_errors_in_openai_shape(stack: dict, extra: dict, param: str) -> None:
    body = {"model": "acme/pirate", "messages": MSGS, **extra}
    r = httpx.post(stack["url"] + "/v1/chat/completions", json=body,
                   headers={"Authorization": f"Bearer {stack['acme']}"}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    with pytest.raises(openai.BadRequestError):
        client(stack).chat.completions.create(**body)


def test_client_disconnect_frees_the_engine(stack: dict) -> None:
    body = {"model": "base", "messages": MSGS, "max_tokens": 2048, "temperature": 0, "stream": True}
    h = {"Authorization": f"Bearer {stack['acme']}"}
    with httpx.stream("POST", stack["url"] + "/v1/chat/completions", json=body, headers=h, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break
        assert stack["engine"].busy
    deadline = time.monotonic() + 3.0  # 2048 tokens would take several seconds more
    while stack["engine"].busy and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not stack["engine"].busy


def test_bad_json_and_unknown_route(stack: dict) -> None:
    h = {"Authorization": f"Bearer {stack['acme']}", "Content-Type": "application/json"}
    r = httpx.post(stack["url"] + "/v1/chat/completions", content=b"{nope", headers=h, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.get(stack["url"] + "/v2/whatever", headers=h)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_alias_move_triggers_one_prefetch_of_the_new_version() -> None:
    import asyncio

    from adapterfab.ids import AdapterId
    from adapterfab.serve.api import ResolveCache

    reg = FakeRegistry()
    reg.versions["acme/pirate"] = {1: Path("/v1"), 2: Path("/v2")}
    reg.aliases["acme/pirate"] = {"production": 1}
    now = [0.0]
    moved: list[str] = []
    cache = ResolveCache(reg.resolve, ttl_s=5, clock=lambda: now[0], on_alias_moved=moved.append)
    prod, pinned = AdapterId.parse("acme/pirate@production"), AdapterId.parse("acme/pirate@1")

    async def walk() -> None:
        assert str((await cache.get(prod)).id) == "acme/pirate@1"
        await cache.get(pinned)
        reg.aliases["acme/pirate"]["production"] = 2
        assert str((await cache.get(prod)).id) == "acme/pirate@1"  # still cached
        now[0] = 6
        assert str((await cache.get(prod)).id) == "acme/pirate@2"  # moved: prefetch @2
        now[0] = 12
        await cache.get(prod)  # same version again: nothing to warm
        await cache.get(pinned)  # a concrete version never "moves"

    asyncio.run(walk())
    assert moved == ["acme/pirate@2"]


def test_text_completions(stack: dict) -> None:
    c = client(stack, "acme")
    r = c.completions.create(model="acme/pirate@2", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.model == "acme/pirate@2"
    engine = stack["engine"]
    want = "".join(e.text for e in engine.generate("Once upon a time", "acme/pirate@2",
                                                   SamplingParams(max_tokens=6, temperature=0))
                   if isinstance(e, TextDelta))
    assert r.choices[0].text == want and r.usage.completion_tokens == 6
    assert r.usage.prompt_tokens == len(engine.encode_text("Once upon a time"))  # no chat template
    chunks = list(c.completions.create(model="acme/pirate@2", prompt="Once upon a time", max_tokens=6,
                                       temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
    assert chunks[-1].usage.completion_tokens == 6
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="globex/parrot", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="base", prompt=["a", ""], max_tokens=2)
    assert e.value.body["param"] == "prompt"


def test_per_tenant_rate_limit(stack: dict) -> None:
    from fastapi.testclient import TestClient

    from adapterfab.serve.api import RateLimiter, make_api

    now = [0.0]
    limiter = RateLimiter(rps=0.5, burst=2, per_tenant={"globex": 100.0}, clock=lambda: now[0])
    keys_verify = {stack["acme"]: "acme", stack["globex"]: "globex"}.get
    app = make_api(stack["backend"], keys_verify, FakeRegistry().resolve, rate_limit=limiter)
    http = TestClient(app)

    def post(key: str) -> httpx.Response:  # an invalid body: answered 400 without generating anything
        return http.post("/v1/chat/completions", json={"model": "base", "messages": []},
                         headers={"Authorization": f"Bearer {key}"})

    assert [post(stack["acme"]).status_code for _ in range(2)] == [400, 400]  # the burst
    r = post(stack["acme"])
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert r.json()["error"]["type"] == "requests" and int(r.headers["retry-after"]) == 2
    assert [post(stack["globex"]).status_code for _ in range(2)] == [400, 400]  # its own bucket
    now[0] = 0.05  # globex's override (100/s) refills it at once; acme's 0.5/s does not
    assert post(stack["globex"]).status_code == 400 and post(stack["acme"]).status_code == 429
    now[0] = 2.05  # one token back for acme after 2 s at 0.5/s
    assert post(stack["acme"]).status_code == 400 and post(stack["acme"]).status_code == 429


def test_every_slot_pinned_is_a_503_to_retry_not_a_500(stack: dict) -> None:
    """Both device slots pinned (as running requests pin them, through the tiers' own acquire) and the wait
    for one over: the third adapter's request is a 503 ``adapter_busy`` with Retry-After (the client's retry
    will find a slot), not a server failure; once the pins go, the same request is answered."""
    c = client(stack)
    for model in ("acme/pirate@1", "acme/pirate@2"):  # both resident
        c.chat.completions.create(model=model, messages=MSGS, max_tokens=1)
    tiers = stack["backend"].tiers
    old, tiers.slot_wait_s = tiers.slot_wait_s, 0.3
    pinned = ["acme/pirate@1", "acme/pirate@2"]
    for key in pinned:
        tiers.acquire(key)
    try:
        r = httpx.post(stack["url"] + "/v1/chat/completions", timeout=60,
                       json={"model": "globex/parrot", "messages": MSGS, "max_tokens": 2},
                       headers={"Authorization": f"Bearer {stack['globex']}"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "adapter_busy", r.text
        assert r.headers["retry-after"] == "1"
    finally:
        for key in pinned:
            tiers.release(key)
        tiers.slot_wait_s = old
    ok = client(stack, "globex").chat.completions.create(model="globex/parrot", messages=MSGS, max_tokens=2)
    assert ok.usage.completion_tokens == 2


class DiesMidGeneration:
    """The real backend, except that its first ``deaths`` generations lose their replica after the first
    event, as RayBackend reports a replica killed mid-generation."""

    def __init__(self, inner: LocalBackend, deaths: int, alternate: bool = False):
        self.inner, self.deaths, self.calls, self.alternate = inner, deaths, 0, alternate

    async def generate(self, version_key, version, messages, params):  # noqa: ANN001, ANN201
        from adapterfab.errors import ReplicaUnavailable

        self.calls += 1
        dies = self.calls <= self.deaths
        if dies and self.alternate and self.calls % 2 == 0:  # this one before its first event
            raise ReplicaUnavailable("the serving replica died: ActorDiedError")
        n = 0
        async for ev in self.inner.generate(version_key, version, messages, params):
            yield ev
            n += 1
            if dies and n == 1:
                raise ReplicaUnavailable("the serving replica died mid-request: ActorDiedError")


@pytest.mark.parametrize("deaths, replayed", [(2, True), (3, False)])
def test_a_replica_dying_mid_generation_replays_a_non_streaming_request(
        stack: dict, tmp_path: Path, deaths: int, replayed: bool) -> None:
    """Nothing of a non-streaming answer has reached the client when its replica dies after the first
    token: it is replayed whole (``REPLAYS`` = 2 times) and the client gets the full answer; once the
    replays are spent it is a 503 to retry. A stream that has sent tokens ends with an in-band error."""
    from adapterfab.serve.api import REPLAYS

    assert REPLAYS == 2
    backend = DiesMidGeneration(stack["backend"], deaths)
    keys = KeyStore(StateStore(f"sqlite:///{tmp_path / 'state.db'}"))
    app = make_api(backend, keys.verify, stack["reg"].resolve, lister=stack["reg"].list, resolve_ttl_s=TTL_S)
    key = keys.create("acme")
    body = {"model": "acme/pirate@1", "messages": MSGS, "max_tokens": 8, "temperature": 0}

    def first_text_times() -> tuple[float, float]:  # (count, sum) of the request's time-to-first-text
        from prometheus_client.parser import text_string_to_metric_families

        got = {s.name: s.value for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text)
               for s in fam.samples if s.labels.get("tenant") == "acme" and s.labels.get("adapter") == "acme/pirate"}
        return (got.get("adapterfab_time_to_first_token_seconds_count", 0.0),
                got.get("adapterfab_time_to_first_token_seconds_sum", 0.0))

    with serve_in_thread(app) as url:
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60, headers={"Authorization": f"Bearer {key}"})
        wall = time.monotonic() - t0
        assert backend.calls == min(deaths + 1, REPLAYS + 1)
        count, total = first_text_times()
        if replayed:
            want = direct(stack["engine"], "acme/pirate@1", SamplingParams(max_tokens=8, temperature=0))
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == want
            # one first text for the request: the replay that answered (after 2 pauses of 0.2 and 0.4 s),
            # not one for each attempt that died after its first text
            assert count == 1 and 0.6 <= total <= wall, (count, total, wall)
        else:
            assert r.status_code == 503 and r.json()["error"]["code"] == "replica_unavailable", r.text
            assert count == 0  # no attempt answered
        # replicas dying now before the first event, now after it: the request's replays are one budget
        # (REPLAYS generations more in all), not REPLAYS for each way of dying multiplied together
        backend.calls, backend.deaths, backend.alternate = 0, 100, True
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 503 and backend.calls == REPLAYS + 1, (r.status_code, backend.calls)
        backend.calls, backend.deaths, backend.alternate = 0, 1, False
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as s:
            lines = [ln for ln in s.iter_lines() if ln.strip()]
        assert s.status_code == 200 and backend.calls == 1
        assert any(ln.startswith('data: {"error"') and "replica_unavailable" in ln for ln in lines), lines
