"""The real Ray Serve app: tiny base model, a real MLflow registry with two versions of one adapter
(one stored as an MLflow artifact, one in our LocalStore), real keys, HTTP through the openai client."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from adapterfab.ids import AdapterId
from adapterfab.keys import KeyStore
from adapterfab.procs import free_port
from adapterfab.registry import Registry
from adapterfab.state import StateStore
from adapterfab.storage import LocalStore
from adapterfab.tracking import Tracking

pytestmark = [pytest.mark.ray]

MSGS = [{"role": "user", "content": "Ahoy?"}]
PIRATE = AdapterId("acme", "pirate")
RESOLVE_TTL_S = 1.0




@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray
    from ray import serve

    # address="local": a fresh cluster, never one that happens to run on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def served(ray_cluster: None, mlflow_server: str, tiny_model_path: str,
           tmp_path_factory: pytest.TempPathFactory, make_lora_adapter) -> Iterator[dict]:
    from adapterfab.serve.app import ServeConfig, deploy

    root = tmp_path_factory.mktemp("serve")
    dirs = {n: make_lora_adapter(tiny_model_path, root / f"v{n}", n) for n in (1, 2)}
    tracking, registry = Tracking(mlflow_server), Registry(mlflow_server)
    run_id = tracking.start_run("serve-test")
    mlflow_uri = tracking.log_dir(run_id, dirs[1], "adapter")  # v1: files in MLflow's artifact store
    registry.register(PIRATE, mlflow_uri, run_id, {"artifact_uri": mlflow_uri}, aliases=("production",))
    # v2: served from our own store (checksummed manifest); MLflow's source must be a run artifact
    store = LocalStore(root / "artifacts")
    local_uri = store.upload_dir(dirs[2], PIRATE.artifact_prefix("b1.acme.pirate"))
    source = tracking.log_dir(run_id, dirs[2], "adapter-v2")
    registry.register(PIRATE, source, run_id, {"artifact_uri": local_uri, "artifact_root": store.root},
                      aliases=())
    tracking.end_run(run_id, ok=True)

    state_url = f"sqlite:///{root / 'state.db'}"
    keys = KeyStore(StateStore(state_url))
    acme = keys.create("acme")
    cfg = ServeConfig(base_model_path=tiny_model_path, state_url=state_url, mlflow_uri=mlflow_server,
                      max_adapters_per_replica=1, replica_num_cpus=1.0, torch_threads=1,
                      adapter_cache_dir=str(root / "adapter-cache"), resolve_ttl_s=RESOLVE_TTL_S,
                      max_tokens_cap=MAX_TOKENS_CAP)
    t0 = time.monotonic()
    url = deploy(cfg, port=free_port())
    print(f"deploy took {time.monotonic() - t0:.1f}s")
    yield {"url": url, "acme": acme, "keys": keys, "registry": registry, "dirs": dirs, "cfg": cfg}


MAX_TOKENS_CAP = 256  # the operator's cap: hostile and default max_tokens stay short


def engine_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("EngineDeployment", app_name="adapterfab").stats.remote().result()


@pytest.mark.timeout(300)
def test_serve_end_to_end(served: dict, tiny_model_path: str) -> None:
    from adapterfab.serve.engine import Engine, SamplingParams, TextDelta

    c = openai.OpenAI(api_key=served["acme"], base_url=served["url"] + "/v1", max_retries=0, timeout=120)
    r1 = c.chat.completions.create(model="acme/pirate", messages=MSGS, max_tokens=10, temperature=0)
    assert r1.model == "acme/pirate@1" and r1.choices[0].message.content
    chunks = list(c.chat.completions.create(model="acme/pirate@1", messages=MSGS, max_tokens=10,
                                            temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r1.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r1.choices[0].finish_reason
    stats = engine_stats()
    assert stats["adapters"] == ["acme/pirate@1"] and stats["loads"] == 1  # loaded once, then cached
    cached = Path(served["cfg"].adapter_cache_dir) / "native" / "acme" / "pirate" / "1"  # the disk tier
    assert (cached / "adapter_model.safetensors").exists()

    base = c.chat.completions.create(model="base", messages=MSGS, max_tokens=10, temperature=0)
    assert base.model == "base" and base.choices[0].message.content != r1.choices[0].message.content

    # a key created after startup works; an alias move is followed without a restart
    late_key = served["keys"].create("acme")
    served["registry"].set_alias(PIRATE, "production", 2)
    time.sleep(RESOLVE_TTL_S + 0.5)
    c2 = openai.OpenAI(api_key=late_key, base_url=served["url"] + "/tenants/acme/v1", max_retries=0,
                       timeout=120)
    r2 = c2.chat.completions.create(model="pirate", messages=MSGS, max_tokens=10, temperature=0)
    assert r2.model == "acme/pirate@2"
    local = Engine(tiny_model_path, torch_threads=1)
    local.load_adapter("v2", served["dirs"][2])
    want = "".join(e.text for e in local.generate(MSGS, "v2", SamplingParams(max_tokens=10, temperature=0))
                   if isinstance(e, TextDelta))
    assert r2.choices[0].message.content == want != r1.choices[0].message.content
    stats = engine_stats()
    assert stats["adapters"] == ["acme/pirate@2"] and stats["loads"] == 2  # 1 per replica: @1 was evicted

    # back to @1 (evicted, reloaded from the local cache) still answers the same
    again = c.chat.completions.create(model="acme/pirate@1", messages=MSGS, max_tokens=10, temperature=0)
    assert again.choices[0].message.content == r1.choices[0].message.content


@pytest.mark.timeout(120)
def test_the_openai_surface_request_ids_and_metrics_through_serve(served: dict) -> None:
    """Through Ray Serve's proxy: n choices with log-probabilities come back from the engine replica (the
    events cross processes), the client's X-Request-Id comes back once, a reply with no max_tokens stops
    at the operator's cap, and /metrics (an operator's key only) counts the tenant's requests and shows
    the engine replica's rows and tiers."""
    from prometheus_client.parser import text_string_to_metric_families

    acme = {"Authorization": f"Bearer {served['acme']}"}
    body = {"model": "base", "messages": MSGS, "max_tokens": 3, "temperature": 0, "n": 2, "logprobs": True,
            "top_logprobs": 2}
    r = httpx.post(served["url"] + "/v1/chat/completions", json=body, headers={**acme, "X-Request-Id": "trace-9"},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers.get_list("x-request-id") == ["trace-9"]
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1] and choices[0]["message"] == choices[1]["message"]
    assert all(len(c["logprobs"]["content"]) == 3 and len(c["logprobs"]["content"][0]["top_logprobs"]) == 2
               for c in choices)
    long = httpx.post(served["url"] + "/v1/chat/completions", headers=acme, timeout=60,
                      json={"model": "base", "messages": MSGS, "temperature": 0, "ignore_eos": True}).json()
    assert long["usage"]["completion_tokens"] == MAX_TOKENS_CAP and long["choices"][0]["finish_reason"] == "length"
    assert httpx.get(served["url"] + "/metrics", headers=acme, timeout=30).status_code == 403
    operator = {"Authorization": f"Bearer {served['keys'].create_operator()}"}
    m = httpx.get(served["url"] + "/metrics", headers=operator, timeout=30)
    assert m.status_code == 200
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in text_string_to_metric_families(m.text) for s in fam.samples}
    chat_ok = (("adapter", "base"), ("code", "200"), ("route", "chat"), ("tenant", "acme"))
    assert got[("adapterfab_requests_total", chat_ok)] >= 2
    assert got[("adapterfab_output_tokens_total", (("adapter", "base"), ("tenant", "acme")))] >= 6 + MAX_TOKENS_CAP
    assert ("adapterfab_engine_free_rows", ()) in got and ("adapterfab_tier_resident", (("tier", "device"),)) in got


@pytest.mark.timeout(120)
def test_serve_auth_and_isolation(served: dict) -> None:
    other = served["keys"].create("globex")
    r = httpx.post(served["url"] + "/v1/chat/completions", json={"model": "base", "messages": MSGS},
                   timeout=60)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    g = openai.OpenAI(api_key=other, base_url=served["url"] + "/v1", max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError) as foreign:
        g.chat.completions.create(model="acme/pirate", messages=MSGS, max_tokens=4)
    with pytest.raises(openai.NotFoundError) as missing:
        g.chat.completions.create(model="acme/pirat", messages=MSGS, max_tokens=4)
    bodies = [e.value.response.json()["error"] for e in (foreign, missing)]
    assert bodies[0]["code"] == bodies[1]["code"] == "model_not_found"
    assert bodies[0]["message"].replace("acme/pirate", "X") == bodies[1]["message"].replace("acme/pirat", "X")
    assert [m.id for m in g.models.list()] == ["base"]
    acme = openai.OpenAI(api_key=served["acme"], base_url=served["url"] + "/v1", max_retries=0)
    acme_models = [m.id for m in acme.models.list()]
    assert "acme/pirate" in acme_models and "acme/pirate@production" in acme_models


@pytest.mark.timeout(120)
def test_revoked_rotated_and_expired_keys_on_a_running_server(served: dict) -> None:
    """Key lifecycle through the running server: a revoked key is refused from its next request, a rotated
    key keeps working through its grace period only, an expired key is refused."""
    keys = served["keys"]

    def status(key: str) -> int:
        return httpx.get(served["url"] + "/v1/models", headers={"Authorization": f"Bearer {key}"},
                         timeout=30).status_code

    doomed = keys.create("acme")
    assert status(doomed) == 200
    keys.revoke(doomed)
    assert status(doomed) == 401
    old = keys.create("acme")
    new, info = keys.rotate(old, grace_s=3)
    assert info.rotated_to == new.split("_")[1] and status(old) == 200 and status(new) == 200
    time.sleep(3.5)
    assert status(old) == 401 and status(new) == 200
    short = keys.create("acme", ttl_s=1.5)
    assert status(short) == 200
    time.sleep(2)
    assert status(short) == 401
    assert {k.key_id: k.status(time.time()) for k in keys.list("acme")}[short.split("_")[1]] == "expired"


HOSTILE = [  # (what, body): each must get an answer below 500, never disturb anyone else
    ("vanishing temperature", {"temperature": 1e-40}),
    ("zero top_p", {"temperature": 1.0, "top_p": 1e-30}),
    ("64-bit seed", {"temperature": 1.0, "seed": -(1 << 63)}),
    ("seed past 64 bits", {"seed": 1 << 70}),
    ("huge max_tokens", {"max_tokens": 10 ** 9}),
    ("zero max_tokens", {"max_tokens": 0}),
    ("NaN-ish temperature", {"temperature": 1e308}),
    ("negative temperature", {"temperature": -1}),
    ("long stop string", {"stop": ["x" * 100_000]}),
    ("many stops", {"stop": ["a", "b", "c", "d", "e"]}),
    ("n", {"n": 3}),
    ("unknown field", {"logit_bias": {"1": 100}}),
    ("model with a newline", {"model": "evil/x\n"}),
    ("model with a Unicode digit", {"model": "evil/x@²"}),
    ("model path traversal", {"model": "../../etc/passwd"}),
    ("another tenant's adapter", {"model": "globex/robot"}),
    ("a 10,000-character model", {"model": "e" * 10_000}),
    ("lone surrogate", {"messages": [{"role": "user", "content": "\ud800"}]}),
    ("empty messages", {"messages": []}),
    ("huge prompt", {"messages": [{"role": "user", "content": "ha " * 300_000}]}),
]


@pytest.mark.timeout(400)
def test_abuse_and_aborts_leave_other_tenants_and_the_replica_whole(served: dict) -> None:
    """Two tenants' load (streams and plain requests, two adapters contending for the replica's one device
    slot, and the base) runs while a third tenant sends hostile sampling values and ids and clients abort in
    every phase (while queued, during a cold load, waiting for the slot, mid-stream). Every victim request
    succeeds, no hostile one gets a 5xx, and the engine's rows, pins and slots come back to idle."""
    import json as _json
    import threading

    from adapterfab.storage import LocalStore

    url, keys = served["url"], served["keys"]
    robot = AdapterId("globex", "robot")
    store = LocalStore(Path(served["cfg"].adapter_cache_dir).parent / "artifacts")
    uri = store.upload_dir(served["dirs"][1], robot.artifact_prefix("b9.globex.robot"))
    tracking = Tracking(served["registry"].uri)
    run_id = tracking.start_run("abuse-test")
    source = tracking.log_dir(run_id, served["dirs"][1], "adapter")
    served["registry"].register(robot, source, run_id, {"artifact_uri": uri, "artifact_root": store.root},
                                aliases=("production",))
    tracking.end_run(run_id, ok=True)
    victims = {"acme": keys.create("acme"), "globex": keys.create("globex")}
    evil = keys.create("evil")
    failures: list[str] = []
    hostile_statuses: dict[str, int] = {}

    def post(key: str, body: dict, timeout: float = 120) -> httpx.Response:
        # the body as JSON text with escapes: a lone surrogate travels as "\\ud800" (httpx's json= cannot encode it)
        return httpx.post(url + "/v1/chat/completions", content=_json.dumps(body), timeout=timeout,
                          headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})

    def victim(tenant: str, model: str, i: int) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": f"Hello {i}"}], "max_tokens": 12,
                "temperature": 0.7, "seed": i, "stream": i % 2 == 0}
        try:
            for _ in range(3):  # as the openai client does: a 503 with Retry-After (every slot pinned) is retried
                r = post(victims[tenant], body)
                if r.status_code != 503 or "adapter_busy" not in r.text:
                    break
                time.sleep(float(r.headers.get("retry-after", "1")))
            text = r.text
            ok = r.status_code == 200 and ("[DONE]" in text if body["stream"] else r.json()["choices"])
            if not ok or "error" in text:
                failures.append(f"{tenant} {model} #{i}: {r.status_code} {text[:300]}")
        except Exception as e:  # noqa: BLE001
            failures.append(f"{tenant} {model} #{i}: {type(e).__name__}: {e}")

    def hostile() -> None:
        for what, extra in HOSTILE:
            body = {"model": "base", "messages": MSGS, "max_tokens": 8, **extra}
            r = post(evil, body)
            hostile_statuses[what] = r.status_code

    def abort_after(delay_s: float, model: str) -> None:
        """A client that goes away after delay_s: while queued, loading, waiting for the slot or mid-stream."""
        body = {"model": model, "messages": MSGS, "max_tokens": 200, "stream": True}
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=delay_s,
                              headers={"Authorization": f"Bearer {victims['acme']}"}) as r:
                for _ in r.iter_lines():
                    pass
        except httpx.TimeoutException:
            pass  # the abort

    def abort_mid_stream(model: str) -> None:
        body = {"model": model, "messages": MSGS, "max_tokens": 200, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {victims['acme']}"}) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n >= 3:
                    break  # closes the connection mid-stream

    threads = [threading.Thread(target=hostile)]
    models = [("globex", "globex/robot"), ("acme", "acme/pirate@2"), ("globex", "base"), ("acme", "acme/pirate@1")]
    for i in range(16):
        tenant, model = models[i % len(models)]
        threads.append(threading.Thread(target=victim, args=(tenant, model, i)))
    for j, delay in enumerate((0.05, 0.2, 0.5, 1.0, 2.0, 4.0)):
        threads.append(threading.Thread(target=abort_after, args=(delay, ["acme/pirate@1", "acme/pirate@2"][j % 2])))
    threads += [threading.Thread(target=abort_mid_stream, args=(m,)) for m in ("acme/pirate@2", "base")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not failures, failures
    assert len(hostile_statuses) == len(HOSTILE)
    assert all(s < 500 for s in hostile_statuses.values()), hostile_statuses
    assert hostile_statuses["another tenant's adapter"] == 404
    assert hostile_statuses["vanishing temperature"] == 200 and hostile_statuses["64-bit seed"] == 200
    deadline, stats = time.monotonic() + 60, {}
    while time.monotonic() < deadline:  # every aborted request's row, pin and slot comes back
        stats = engine_stats()
        b, tiers = stats["batching"], stats["tiers"]
        if (b["running"], b["waiting"], b["in_use"], tiers["pins"]) == (0, 0, 0, 0) \
                and b["free_rows"] == served["cfg"].max_batch:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the replica did not come back to idle: {_json.dumps(stats)[:2000]}")
    ok = post(victims["globex"], {"model": "globex/robot", "messages": MSGS, "max_tokens": 4})
    assert ok.status_code == 200  # and it still serves


@pytest.mark.timeout(300)
def test_concurrent_requests_reach_the_engine_together_through_serve(served: dict) -> None:
    """Batching needs the requests in the engine at once. Ray Serve lets a deployment hold 5 requests
    by default: the ingress took 5 and every other request waited in Serve's queue, first come first
    served, where the engine's batching and per-tenant fairness never saw it."""
    import concurrent.futures

    c = openai.OpenAI(api_key=served["acme"], base_url=served["url"] + "/v1", max_retries=0, timeout=240)
    seen, done = [], False

    def one(i: int) -> int:
        stream = c.chat.completions.create(model="base", messages=MSGS, max_tokens=48, temperature=1.0, seed=i,
                                           stream=True, extra_body={"min_tokens": 48})
        return sum(1 for _ in stream)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one, i) for i in range(16)]
        while not done:
            b = engine_stats()["batching"]
            seen.append(b["running"] + b["prefilling"] + b["waiting"])
            done = all(f.done() for f in futures)
            time.sleep(0.1)
        assert all(f.result() > 0 for f in futures)
    assert max(seen) >= 12, seen
