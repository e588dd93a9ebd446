"""The service's own observability (issue 22): ``/metrics`` in Prometheus' format labelled by tenant and
adapter, ``X-Request-Id`` in and out and in the request's log lines, JSON log lines. The real API
(FastAPI, Starlette's TestClient over httpx) over the batched engine on the tiny random Llama; the
metrics are read back with ``prometheus_client``'s own parser."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from adapterfab.keys import KeyStore
from adapterfab.serve.api import RateLimiter, make_api
from adapterfab.serve.backend import LocalBackend
from adapterfab.serve.batched import BatchedEngine
from adapterfab.serve.observe import install_log_context, request_id
from adapterfab.state import StateStore

MSGS = [{"role": "user", "content": "Ahoy?"}]


@pytest.fixture(scope="module")
def api(tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("observe")
    keys = KeyStore(StateStore(f"sqlite:///{root / 'state.db'}"))
    engine = BatchedEngine(tiny_model_path, max_batch=4, max_len=128, torch_threads=1)
    backend = LocalBackend(engine, fetch=lambda v: v.source, max_adapters=2)
    acme, globex, operator = keys.create("acme"), keys.create("globex"), keys.create_operator()
    limiter = RateLimiter(rps=0.001, burst=3, per_tenant={"acme": 1000})  # globex: 3 requests, then 429s

    def is_operator(key: str | None) -> bool:
        who = keys.identify(key)
        return who is not None and who.operator

    app = make_api(backend, keys.verify, lambda aid: (_ for _ in ()).throw(KeyError(aid)), rate_limit=limiter,
                   metrics_auth=is_operator)
    with TestClient(app) as http:
        yield {"http": http, "acme": acme, "globex": globex, "operator": operator, "engine": engine}
    engine.close()


def h(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def samples(api: dict) -> dict[tuple[str, tuple], float]:
    r = api["http"].get("/metrics", headers=h(api["operator"]))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def value(got: dict, name: str, **labels: str) -> float:
    return got.get((name, tuple(sorted(labels.items()))), 0.0)


def test_request_id_in_and_out_and_in_the_requests_log_lines(api: dict, caplog: pytest.LogCaptureFixture) -> None:
    body = {"model": "base", "messages": MSGS, "max_tokens": 2, "temperature": 0, "frobnicate": 1}
    with caplog.at_level(logging.WARNING, logger="adapterfab"):
        r = api["http"].post("/v1/chat/completions", json=body, headers=h(api["acme"], **{"X-Request-Id": "trace-42"}))
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
    ignored = [rec for rec in caplog.records if "fields ignored" in rec.getMessage()]
    assert ignored and all(rec.request_id == "trace-42" for rec in ignored)
    other = api["http"].get("/healthz")
    assert len(other.headers["x-request-id"]) == 32 and other.headers["x-request-id"] != "trace-42"
    assert request_id.get() == "-"  # nothing leaks out of the request


def test_metrics_count_requests_codes_latency_and_tokens_by_tenant_and_adapter(api: dict) -> None:
    http, before = api["http"], samples(api)
    body = {"model": "base", "messages": MSGS, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    tokens = 0
    for stream in (False, True):
        r = http.post("/v1/chat/completions", json={**body, "stream": stream,
                                                    **({"stream_options": {"include_usage": True}} if stream else {})},
                      headers=h(api["acme"]))
        assert r.status_code == 200
        usage = r.json()["usage"] if not stream else json.loads(r.text.split("data: ")[-2])["usage"]
        tokens += usage["completion_tokens"]
    assert http.post("/v1/chat/completions", json={**body, "temperature": 9}, headers=h(api["acme"])).status_code == 400
    codes = [http.get("/v1/models", headers=h(api["globex"])).status_code for _ in range(5)]
    assert codes.count(429) >= 2
    got = samples(api)
    delta = lambda name, **lab: value(got, name, **lab) - value(before, name, **lab)  # noqa: E731
    assert delta("adapterfab_requests_total", tenant="acme", adapter="base", route="chat", code="200") == 2
    assert delta("adapterfab_requests_total", tenant="acme", adapter="-", route="chat", code="400") == 1
    refused = codes.count(429)
    assert delta("adapterfab_requests_total", tenant="globex", adapter="-", route="models", code="429") == refused
    assert delta("adapterfab_rate_limited_total", tenant="globex") == codes.count(429)
    assert delta("adapterfab_output_tokens_total", tenant="acme", adapter="base") == tokens == 10
    assert delta("adapterfab_time_to_first_token_seconds_count", tenant="acme", adapter="base") == 2
    assert delta("adapterfab_request_seconds_count", tenant="acme", adapter="base") == 2  # streamed or not
    assert delta("adapterfab_inter_token_latency_seconds_count", tenant="acme", adapter="base") >= 1
    assert value(got, "adapterfab_requests_in_flight", tenant="acme", adapter="base") == 0
    assert value(got, "adapterfab_engine_running_rows") == 0 and value(got, "adapterfab_engine_free_rows") == 4
    assert ("adapterfab_engine_queue_depth", ()) in got
    assert ("adapterfab_tier_events_total", (("event", "hit"), ("tier", "device"))) in got


def test_metrics_need_an_operator_key(api: dict) -> None:
    assert api["http"].get("/metrics", headers=h(api["acme"])).status_code == 403
    assert api["http"].get("/metrics").status_code == 403
    assert api["http"].get("/metrics", headers=h(api["operator"])).status_code == 200


def test_json_log_lines_carry_the_request_id() -> None:
    out = io.StringIO()
    install_log_context(json_lines=True, logger="adapterfab.jsontest", stream=out)
    token = request_id.set("rid-7")
    try:
        logging.getLogger("adapterfab.jsontest.sub").warning("hello %s", "there")
    finally:
        request_id.reset(token)
    line = json.loads(out.getvalue().strip().splitlines()[-1])
    assert line["message"] == "hello there" and line["request_id"] == "rid-7" and line["level"] == "WARNING"
    assert line["logger"] == "adapterfab.jsontest.sub"
