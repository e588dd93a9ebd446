"""Concurrent requests through Ray Serve, the path `adapterfab serve` runs: how many reach the engine at
once, and the tokens/s that gives, in the same run for two settings of the deployments' request limits:

  before  the ingress at Ray Serve's default of 5 ongoing requests and the engine at max(2 x max_batch, 8)
          (what the product shipped until 2026-12-07)
  after   the product's defaults now (ingress 4,096; engine 8 x max_batch, at least 64)

Each setting is deployed with ``serve.app.deploy`` on a fresh local Ray, a real MLflow server and state
database (the ingress needs them for keys and the registry), then C streaming OpenAI clients send R chat
requests to the bare base (greedy-free sampling with a fixed ``min_tokens`` so every reply has the same
length). Reported: output tokens/s, request latency p50/p99, time to first token p50, and the most
requests the engine held at once (running + prefilling + waiting, polled every 0.1 s). Writes
bench/results/served_concurrency-<device>-<date>.json and prints a line for bench/RESULTS.md.

    .venv/bin/python bench/served_concurrency.py                  # SmolLM2-135M, 16 clients, 48 requests
    .venv/bin/python bench/served_concurrency.py --smoke          # tiny random Llama, no result file
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MSGS = [{"role": "user", "content": "Tell me about the sea."}]
SETTINGS = {"before": {"ingress_max_ongoing_requests": 5},
            "after": {}}


def _tiny_model(folder: Path) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from adapterfab.basemodel import resolve_base_model

    tok = AutoTokenizer.from_pretrained(resolve_base_model("smollm2-135m-instruct").path)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def run_setting(name: str, overrides: dict, base: str, mlflow_uri: str, work: Path, clients: int,
                requests: int, max_tokens: int, max_batch: int) -> dict:
    import openai
    import ray
    from ray import serve

    from adapterfab.keys import KeyStore
    from adapterfab.procs import free_port
    from adapterfab.serve.app import ServeConfig, deploy
    from adapterfab.state import StateStore

    state_url = f"sqlite:///{work / (name + '.db')}"
    key = KeyStore(StateStore(state_url)).create("acme")
    extra = dict(overrides)
    if name == "before":
        extra["max_ongoing_requests"] = max(2 * max_batch, 8)
    cfg = ServeConfig(base_model_path=base, state_url=state_url, mlflow_uri=mlflow_uri, torch_threads=2,
                      replica_num_cpus=1.0, max_batch=max_batch, adapter_cache_dir=str(work / "cache"),
                      tenant_rps=None, **extra)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        url = deploy(cfg, port=free_port())
        handle = serve.get_deployment_handle("EngineDeployment", app_name="adapterfab")
        client = openai.OpenAI(api_key=key, base_url=url + "/v1", max_retries=0, timeout=600)
        client.chat.completions.create(model="base", messages=MSGS, max_tokens=2)  # warm: first forward
        held, stop = [], threading.Event()

        def poll() -> None:
            while not stop.is_set():
                b = handle.stats.remote().result()["batching"]
                held.append(b["running"] + b["prefilling"] + b["waiting"])
                time.sleep(0.1)

        def one(i: int) -> tuple[float, float, int]:
            t0 = time.monotonic()
            first, tokens = None, 0
            for chunk in client.chat.completions.create(
                    model="base", messages=MSGS, max_tokens=max_tokens, temperature=1.0, seed=i, stream=True,
                    stream_options={"include_usage": True}, extra_body={"min_tokens": max_tokens}):
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.monotonic() - t0
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            return time.monotonic() - t0, first or 0.0, tokens

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(one, range(requests)))
        wall = time.monotonic() - t0
        stop.set()
        poller.join()
    finally:
        serve.shutdown()
        ray.shutdown()
    lat = sorted(r[0] for r in results)
    tokens = sum(r[2] for r in results)
    return {"setting": name, "overrides": extra, "wall_s": round(wall, 2), "output_tokens": tokens,
            "tok_s": round(tokens / wall, 2), "latency_p50_s": round(statistics.median(lat), 3),
            "latency_p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3),
            "ttft_p50_s": round(statistics.median(r[1] for r in results), 3), "engine_held_max": max(held or [0])}


def main() -> int:
    from stack_guard import add_deadline_arg, stop_cleanly  # (bench/, the script's own folder)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--smoke", action="store_true", help="a tiny random Llama and few requests; no result file")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/served_concurrency-...)")
    add_deadline_arg(ap)
    args = ap.parse_args()
    stop_cleanly(args.deadline_s)  # a SIGTERM or the deadline still stops the stack it starts
    from adapterfab.basemodel import resolve_base_model
    from adapterfab.procs import free_port, start_mlflow, stop_pid

    if args.smoke:
        args.clients, args.requests, args.max_tokens, args.max_batch = 8, 8, 4, 8
    with tempfile.TemporaryDirectory(prefix="served-concurrency-") as tmp:
        work = Path(tmp)
        base = _tiny_model(work / "tiny") if args.smoke else resolve_base_model("smollm2-135m-instruct").path
        mlflow = start_mlflow(work / "mlflow", free_port())
        try:
            runs = [run_setting(name, o, base, mlflow.url, work, args.clients, args.requests, args.max_tokens,
                                args.max_batch) for name, o in SETTINGS.items()]
        finally:
            stop_pid(mlflow.pid)
    by = {r["setting"]: r for r in runs}
    out = {"bench": "served_concurrency", "date": time.strftime("%Y-%m-%d"), "machine": platform.processor()
           or platform.machine(), "base": "tiny" if args.smoke else "smollm2-135m-instruct",
           "clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens,
           "max_batch": args.max_batch, "runs": runs,
           "ratios": {"after_over_before_tok_s": round(by["after"]["tok_s"] / max(by["before"]["tok_s"], 1e-9), 2)}}
    print(json.dumps(out, indent=1))
    if not args.smoke:
        path = Path(args.out) if args.out else REPO / "bench" / "results" / \
            f"served_concurrency-cpu-{out['date']}.json"
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
