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
from adapterfab.registry import Registry, Tracking
from adapterfab.state import StateStore
from adapterfab.storage import LocalStore

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
                      adapter_cache_dir=str(root / "adapter-cache"), resolve_ttl_s=RESOLVE_TTL_S)
    t0 = time.monotonic()
    url = deploy(cfg, port=free_port())
    print(f"deploy took {time.monotonic() - t0:.1f}s")
    yield {"url": url, "acme": acme, "keys": keys, "registry": registry, "dirs": dirs, "cfg": cfg}


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
