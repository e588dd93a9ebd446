"""What a reviewer found wrong in the API (2026-12): a completions request that named no max_tokens refused
under a cap below OpenAI's default of 16; Starlette's plain-text 500 for ``/v1/models`` with the registry
down, and for any error no handler took; streamed ``text_offset`` that disagreed with the whole answer
where a stop string held text back; a repetition penalty that overflowed float32; an empty
``guided_choice`` accepted; stop strings that ended a reply before ``min_tokens``.

No model: the API runs in process (``TestClient``) over a backend that records what it is asked and
replays ``TextGeneration.generate`` on a stub whose tokens are fixed strings."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from adapterfab.errors import AdapterNotFound, RegistryError
from adapterfab.serve.api import make_api
from adapterfab.serve.engine import Event, Finished, SamplingParams, TextDelta, TextGeneration
from adapterfab.serve.sampling import Sampled

VOCAB = ["<eos>", "ab", "cd", "ef", "gh", "ij", "kl", "mn"]  # token id -> its text
AUTH = {"Authorization": "Bearer k"}
MSGS = [{"role": "user", "content": "hi"}]


class Tokenizer:
    eos_token_id = 0

    def decode(self, ids: list[int], **_: Any) -> str:
        return "".join(VOCAB[i] for i in ids if i)  # the end of sequence is a special token: no text


class Stub(TextGeneration):
    """``TextGeneration.generate`` (detokenizing, stop strings, log-probabilities) over tokens 1, 2, 3, ...
    in turn: the text "abcdefghijklmn"."""

    def __init__(self) -> None:
        self.tokenizer, self.eos_ids, self._tokenizer_lock = Tokenizer(), {0}, threading.Lock()

    def prompt_token_limit(self) -> int:
        return 1000

    def generate_token_ids(self, prompt_ids: list[int], adapter: str | None,
                           params: SamplingParams) -> Iterator[int]:
        for t in range(1, min(len(VOCAB), (params.max_tokens or len(VOCAB)) + 1)):
            yield Sampled(t, -0.5, ()) if params.logprobs is not None else t


class Backend:
    """What the API asked for (its sampling parameters), answered by ``Stub``."""

    def __init__(self) -> None:
        self.params: list[SamplingParams] = []

    async def generate(self, version_key: str | None, version: Any, prompt: Any,
                       params: SamplingParams) -> AsyncIterator[Event]:
        self.params.append(params)
        for ev in Stub().generate([1], None, params):
            yield ev


def api(cap: int | None = None, lister: Any = None) -> tuple[TestClient, Backend]:
    def resolver(aid: Any) -> Any:
        raise AdapterNotFound(str(aid))

    backend = Backend()
    app = make_api(backend, lambda key: "acme" if key == "k" else None, resolver, lister=lister,  # type: ignore[arg-type]
                   max_tokens_cap=cap)
    return TestClient(app), backend


def test_a_completion_that_names_no_max_tokens_gets_16_within_the_cap() -> None:
    """OpenAI's default of 16 was held against the cap as if the client had asked for it: a 400 under a cap
    below 16. Only what the client sent is checked; the default is lowered to the cap."""
    for cap, want in ((8, 8), (100, 16), (None, 16)):
        client, backend = api(cap)
        r = client.post("/v1/completions", headers=AUTH, json={"model": "base", "prompt": "x"})
        assert r.status_code == 200, r.text
        assert backend.params[-1].max_tokens == want
    client, backend = api(8)
    r = client.post("/v1/completions", headers=AUTH, json={"model": "base", "prompt": "x", "max_tokens": 9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    r = client.post("/v1/completions", headers=AUTH, json={"model": "base", "prompt": "x", "max_tokens": None})
    assert r.status_code == 200 and backend.params[-1].max_tokens == 8, r.text  # null: up to the cap
    r = client.post("/v1/chat/completions", headers=AUTH, json={"model": "base", "messages": MSGS})
    assert r.status_code == 200 and backend.params[-1].max_tokens == 8, r.text


def test_models_with_the_registry_down_is_a_503_in_openai_shape() -> None:
    def lister(tenant: str) -> list[str]:
        raise RegistryError("MLflow unreachable")

    client, _ = api(lister=lister)
    for path in ("/v1/models", "/tenants/acme/v1/models"):
        r = client.get(path, headers=AUTH)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "registry_unavailable" and r.json()["error"]["type"] == "server_error"


def test_an_error_no_handler_takes_is_a_500_in_openai_shape_without_its_text(
        caplog: pytest.LogCaptureFixture) -> None:
    def lister(tenant: str) -> list[str]:
        raise RuntimeError("password=hunter2 at db.internal")

    client, _ = api(lister=lister)
    with caplog.at_level(logging.ERROR, logger="adapterfab.serve.api"):
        r = client.get("/v1/models", headers={**AUTH, "X-Request-Id": "req-77"})
    assert r.status_code == 500 and r.headers["content-type"] == "application/json", r.text
    assert r.json() == {"error": {"message": "internal error", "type": "server_error", "param": None,
                                  "code": "internal_error"}}
    assert "hunter2" not in r.text and r.headers["x-request-id"] == "req-77"
    record = next(rec for rec in caplog.records if rec.exc_info)
    assert "hunter2" in str(record.exc_info[1])  # the detail is in the server log, with its traceback


def sse_choices(text: str) -> list[dict[str, Any]]:
    return [c for line in text.split("\n\n") if line.startswith("data: {")
            for c in json.loads(line[6:])["choices"]]


def test_streamed_text_offsets_are_the_whole_answers() -> None:
    """The stop string "dQ" never matches, but "d" may begin it: "abcd" goes out as "abc" with the
    log-probabilities of "ab" and "cd", and the next chunk's token "ef" starts at 4, not at the 3
    characters sent."""
    client, _ = api()
    body = {"model": "base", "prompt": "x", "max_tokens": 4, "logprobs": 0, "stop": ["dQ"]}
    whole = client.post("/v1/completions", headers=AUTH, json=body).json()["choices"][0]
    assert whole["text"] == "abcdefgh" and whole["logprobs"]["text_offset"] == [0, 2, 4, 6]
    chunks = sse_choices(client.post("/v1/completions", headers=AUTH, json={**body, "stream": True}).text)
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert [t for c in chunks if c["logprobs"] for t in c["logprobs"]["tokens"]] == whole["logprobs"]["tokens"]
    assert [o for c in chunks if c["logprobs"] for o in c["logprobs"]["text_offset"]] == [0, 2, 4, 6]


@pytest.mark.parametrize("value", [1e39, 1e30, 101, 1e-308, 0.0, -1.0])
def test_a_repetition_penalty_that_overflows_float32_is_a_400(value: float) -> None:
    """1e39 is inf in float32, and 0 × inf = NaN made a row of logits NaN (the draw then gave the
    vocabulary's last id every time); a tiny one divides by 0."""
    client, backend = api()
    r = client.post("/v1/chat/completions", headers=AUTH,
                    json={"model": "base", "messages": MSGS, "repetition_penalty": value})
    assert r.status_code == 400 and r.json()["error"]["param"] == "repetition_penalty", r.text
    assert not backend.params
    for ok in (0.01, 1.2, 100):
        r = client.post("/v1/chat/completions", headers=AUTH,
                        json={"model": "base", "messages": MSGS, "repetition_penalty": ok})
        assert r.status_code == 200 and backend.params[-1].repetition_penalty == ok, r.text


def test_an_empty_guided_choice_is_a_400() -> None:
    """Its grammar took only the empty string: every reply was ""."""
    client, backend = api()
    r = client.post("/v1/chat/completions", headers=AUTH, json={"model": "base", "messages": MSGS, "guided_choice": []})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "guided_choice" and r.json()["error"]["code"] == "invalid_value"
    assert not backend.params


def text_of(params: SamplingParams) -> tuple[str, Finished]:
    events = list(Stub().generate([1], None, params))
    return "".join(e.text for e in events if isinstance(e, TextDelta)), events[-1]


@pytest.mark.parametrize(("stop", "min_tokens", "text", "tokens"), [
    ("cd", 0, "ab", 2),
    ("cd", 2, "abcdefghijklmn", 7),  # "cd" ends in token 2: before min_tokens are out, it does not count
    ("cd", 1, "ab", 2),  # it ends in token 2, the first after min_tokens
    ("de", 2, "abc", 3),  # it began before min_tokens and ends after: it counts, as in vLLM
    ("ab", 1, "abcdefghijklmn", 7),
    ("gh", 3, "abcdef", 4),
])
def test_stop_strings_count_only_after_min_tokens(stop: str, min_tokens: int, text: str, tokens: int) -> None:
    """vLLM checks stop strings (as it masks the end of sequence) only once ``min_tokens`` tokens are out:
    a stop string counts when it ends in the text of a later token. Here "alco" with min_tokens 10 ended a
    reply after 4 tokens."""
    got, done = text_of(SamplingParams(max_tokens=None, stop=(stop,), min_tokens=min_tokens))
    assert (got, done.completion_tokens) == (text, tokens)
    assert done.finish_reason == ("length" if tokens == 7 else "stop")


class PartialTokenizer(Tokenizer):
    """Token 2 ends in the first byte of a two-byte character: decoded last, it is "cd\ufffd" ("cd" and
    a partial byte), so the detokenizer holds "cd" back until the end."""

    def decode(self, ids: list[int], **_: Any) -> str:
        text = super().decode(ids)
        return text + "\ufffd" if ids and ids[-1] == 2 else text


def test_a_stop_string_completed_by_the_held_back_text_is_a_stop() -> None:
    """The reply reached max_tokens with "cd" still held back (a partial character); the flush at the
    end completed the stop string "bc": the text was cut there, yet the finish reason said "length"."""
    stub = Stub()
    stub.tokenizer = PartialTokenizer()
    events = list(stub.generate([1], None, SamplingParams(max_tokens=2, stop=("bc",))))
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "a"
    assert events[-1].finish_reason == "stop" and events[-1].completion_tokens == 2
    events = list(stub.generate([1], None, SamplingParams(max_tokens=2, stop=("zz",))))
    assert events[-1].finish_reason == "length"


def stream_chunks(client: TestClient, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    text = client.post(path, headers=AUTH, json={**body, "stream": True}).text
    return [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": MSGS}), ("/v1/completions", {"prompt": "x"})])
def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(path: str, body: dict[str, Any]) -> None:
    """vLLM's ``stream_options.continuous_usage_stats``: each chunk carries its choice's usage so far
    (it was accepted and ignored); without it (or without include_usage) only the last chunk has usage."""
    client, _ = api()
    body = {"model": "base", "max_tokens": 5, "stop": ["dQ"], **body}
    chunks = stream_chunks(client, path, {**body, "stream_options": {"include_usage": True,
                                                                      "continuous_usage_stats": True}})
    assert all("usage" in c for c in chunks)
    done = [c for c in chunks if not c["choices"]]
    assert len(done) == 1 and done[0]["usage"]["completion_tokens"] == 5
    so_far = [c["usage"]["completion_tokens"] for c in chunks if c["choices"]]
    assert so_far == sorted(so_far) and so_far[-1] == 5 and len(set(so_far)) > 2
    assert all(c["usage"]["prompt_tokens"] == 1 and c["usage"]["total_tokens"] == 1 + c["usage"]["completion_tokens"]
               for c in chunks if c["choices"])
    for opts in ({"include_usage": True}, {"continuous_usage_stats": True}):
        chunks = stream_chunks(client, path, {**body, "stream_options": opts})
        assert [c for c in chunks if "usage" in c] == ([c for c in chunks if not c["choices"]]
                                                        if opts.get("include_usage") else [])


def test_a_message_name_is_reported_as_ignored() -> None:
    """The chat template renders no speaker names: a message's ``name`` was accepted without a word."""
    client, _ = api()
    r = client.post("/v1/chat/completions", headers=AUTH, json={"model": "base", "messages": [
        {"role": "user", "content": "hi", "name": "alice"}]})
    assert r.status_code == 200, r.text
    assert r.headers["X-Adapterfab-Ignored-Fields"] == "messages.0.name"


def test_a_sampling_error_keeps_the_field_it_names_across_pickling() -> None:
    """Replica errors reach the API pickled (Ray): the 400 for an out-of-vocabulary logit_bias names the field."""
    import pickle

    from adapterfab.serve.sampling import SamplingError

    e = pickle.loads(pickle.dumps(SamplingError("bad bias", param="logit_bias")))
    assert (str(e), e.param) == ("bad bias", "logit_bias")


def test_a_request_for_many_generations_costs_one_token_of_the_rate_each() -> None:
    """Rate limits counted requests: one request of 4 prompts × n=16 (64 generations) cost what one
    generation did. Now each generation takes a token (at most the burst, so such a request can ever go)."""
    from adapterfab.serve.api import RateLimiter

    now = [0.0]
    backend = Backend()
    limiter = RateLimiter(rps=1.0, burst=10, clock=lambda: now[0])
    client = TestClient(make_api(backend, lambda key: "acme" if key == "k" else None,  # type: ignore[arg-type]
                                 lambda aid: None, rate_limit=limiter))

    def ask(n: int, prompts: int = 1) -> int:
        body = {"model": "base", "prompt": ["x"] * prompts, "n": n, "max_tokens": 1}
        return client.post("/v1/completions", headers=AUTH, json=body).status_code

    assert ask(4) == 200 and ask(4) == 200  # 8 of 10 tokens
    r = client.post("/v1/completions", headers=AUTH, json={"model": "base", "prompt": "x", "n": 4, "max_tokens": 1})
    # 2 left: its way in took 1 (as every request's does), and 3 more were 2 s away at 1/s
    assert r.status_code == 429 and int(r.headers["retry-after"]) == 2
    assert ask(1) == 200 and ask(1) == 429  # a single generation still goes while a token lasts
    now[0] = 100.0  # full again: a request of 64 generations costs the whole burst, not more
    assert ask(16, prompts=4) == 200 and ask(1) == 429
