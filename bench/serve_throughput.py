"""Serving throughput over loopback HTTP (the real OpenAI-compatible API, streaming), concurrent clients,
adapter popularity Zipf over M adapters, in the same run:

  ours   the batched multi-adapter engine (serve/batched.py) behind adapter tiers (serve/tiers.py):
         requests for any adapters decode together
  base   the same engine and clients, every request on the bare base model (the ceiling)
  naive  PEFT with per-request adapter switching, one request at a time (serve/engine.py's Engine,
         LocalBackend with an LRU of one adapter: the Hugging Face PEFT baseline of S-LoRA's paper)

The clients run in a process of their own (``drive_elsewhere``). ``engine_direct`` also drives the engine
with no HTTP in between (its ceiling; on a GPU with and without CUDA graphs). It reports output
tokens/s, requests/s, time to first token and p50/p99 latency per M, the target ratios (ours / naive at
M=100, ours at M=max / ours at M=1, ours / base), and the adapter cold load (artifact store -> first
token) p50 for LoRA-XS and LoRA r=16. Writes
bench/results/serve_throughput-<device>-<date>.json and a line in bench/RESULTS.md.

    .venv/bin/python bench/serve_throughput.py                     # CPU: SmolLM2-135M, M = 1, 10, 100, 1000
    .venv/bin/python bench/serve_throughput.py --quick             # smoke run, no result file
    python bench/serve_throughput.py --device cuda                 # GPU: ~1B base, 64 clients
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # adapterfab itself must be installed (make setup / pip install .)
PROMPTS = ["Tell me about the sea.", "What is the capital of France?", "Give me a tip for cooking rice.",
           "How do plants grow?", "Describe a sunset in one sentence.", "What is two plus two?",
           "Name three colours.", "Why is the sky blue?"]


def write_lora(out: Path, cfg: dict, shapes: dict[str, tuple[int, int]], r: int, seed: int) -> Path:
    """A PEFT LoRA folder with random weights (what training writes; no PEFT call needed)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, (out_f, in_f) in shapes.items():
        state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) * 0.02
        state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * 0.02
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "r": r, "lora_alpha": 2 * r}))
    return out


def zipf_keys(m: int, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    weights = [1 / (k + 1) for k in range(m)]
    return [f"t/p{k}@1" for k in rng.choices(range(m), weights, k=n)]


class Server:
    """make_api + a backend in a uvicorn thread on a free port."""

    def __init__(self, backend, resolver, keys) -> None:  # noqa: ANN001
        import uvicorn

        from adapterfab.procs import free_port
        from adapterfab.serve.api import make_api

        app = make_api(backend, keys.verify, resolver, resolve_ttl_s=60)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


async def drive(url: str, key: str, models: list[str], clients: int, max_tokens: int) -> dict:
    """``clients`` concurrent streaming clients work through ``models`` (one request each)."""
    import httpx

    todo = list(enumerate(models))
    results: list[dict] = []

    async def client(http: httpx.AsyncClient) -> None:
        while todo:
            i, model = todo.pop(0)
            body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            t0 = time.monotonic()
            first, usage = None, None
            async with http.stream("POST", f"{url}/v1/chat/completions", json=body,
                                   headers={"Authorization": f"Bearer {key}"}) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"{model}: HTTP {r.status_code} {await r.aread()}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                        first = time.monotonic() - t0
                    if chunk.get("usage"):
                        usage = chunk["usage"]
            results.append({"latency_s": time.monotonic() - t0, "ttft_s": first if first is not None else
                            time.monotonic() - t0, "tokens": usage["completion_tokens"] if usage else 0})

    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.monotonic() - t0
    lat = sorted(r["latency_s"] for r in results)
    ttft = sorted(r["ttft_s"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    q = lambda xs, p: round(xs[min(len(xs) - 1, int(p * len(xs)))], 3)  # noqa: E731
    return {"requests": len(results), "wall_s": round(wall, 2), "output_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 2), "requests_per_s": round(len(results) / wall, 3),
            "ttft_p50_s": q(ttft, 0.5), "latency_p50_s": q(lat, 0.5), "latency_p99_s": q(lat, 0.99)}


def drive_elsewhere(url: str, key: str, models: list[str], clients: int, max_tokens: int) -> dict:
    """``drive`` in a separate process, so that the clients do not share the server's GIL (the GPU run
    of 2026-11-23 had them in one process, and the harness, not the engine, set the pace)."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_drive_sync, url, key, models, clients, max_tokens).result()


def _drive_sync(url: str, key: str, models: list[str], clients: int, max_tokens: int) -> dict:
    return asyncio.run(drive(url, key, models, clients, max_tokens))


def engine_direct(engine, models: list[str], clients: int, max_tokens: int) -> dict:  # noqa: ANN001
    """The engine's own ceiling: ``clients`` threads call ``generate_token_ids`` directly (no HTTP, no
    JSON, no SSE; the threads only wait on queues), so the decode loop alone sets the pace."""
    from adapterfab.serve.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    prompts = [engine.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    todo = list(enumerate(models))
    lock = threading.Lock()
    tokens, lat = [0], []
    steps0 = engine.steps

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i, model = todo.pop(0)
            t0 = time.monotonic()
            n = sum(1 for _ in engine.generate_token_ids(prompts[i % len(prompts)], None if model == "base" else model,
                                                         params))
            with lock:
                tokens[0] += n
                lat.append(time.monotonic() - t0)

    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    steps = engine.steps - steps0
    return {
        "requests": len(lat),
        "wall_s": round(wall, 2),
        "output_tokens": tokens[0],
        "tokens_per_s": round(tokens[0] / wall, 2),
        "decode_steps": steps,
        "wall_ms_per_step": round(1000 * wall / max(1, steps), 2),
        "latency_p50_s": round(statistics.median(lat), 3),
    }


def direct_runs(engine, m: int, requests: int, clients: int, max_tokens: int) -> dict:  # noqa: ANN001
    """``engine_direct`` on the bare base, then Zipf over ``m`` adapters."""
    return {"base": engine_direct(engine, ["base"] * requests, clients, max_tokens),
            f"m{m}": engine_direct(engine, zipf_keys(m, requests, m), clients, max_tokens)}


def cold_loads(engine, store_root: Path, folders: dict[str, Path], basis, n: int) -> dict:  # noqa: ANN001
    """Artifact store (a local folder store) -> disk -> RAM -> device -> first token, per fresh adapter."""
    from adapterfab.serve.engine import SamplingParams
    from adapterfab.serve.tiers import AdapterTiers
    from adapterfab.storage import LocalStore

    store = LocalStore(store_root / "store")
    uris = {k: store.upload_dir(v, f"cold/{i}") for i, (k, v) in enumerate(list(folders.items())[:n])}
    disk = store_root / "disk"

    def fetch(key: str):  # noqa: ANN202
        dest = disk / key.replace("/", "_").replace("@", "_")
        store.download_dir(uris[key], dest)
        return dest, basis, True

    tiers = AdapterTiers(engine, fetch)
    out = []
    for key in uris:
        t0 = time.monotonic()
        tiers.acquire(key)
        try:
            next(iter(engine.generate_token_ids([1, 2, 3, 4], key, SamplingParams(max_tokens=1, temperature=0))))
        finally:
            tiers.release(key)
        out.append(time.monotonic() - t0)
        tiers.evict(key)
    return {"n": len(out), "p50_s": round(statistics.median(out), 4), "max_s": round(max(out), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", default="1,10,100,1000", help="adapter counts M")
    ap.add_argument("--requests", type=int, default=48, help="requests per run")
    ap.add_argument("--naive-requests", type=int, default=16, help="requests per naive run (it is slow)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: a ~1B Llama-shaped base with random bf16 weights (bench/train_throughput.py's)")
    ap.add_argument("--tokenizer", default=os.environ.get("ADAPTERFAB_TOKENIZER_DIR"),
                    help="a folder with the SmolLM2 tokenizer (GPU mode; default: the converted SmolLM2 base)")
    args = ap.parse_args()
    gpu = args.device == "cuda"
    if gpu and not args.quick:  # the GPU scale unless given otherwise
        args.requests = 128 if args.requests == 48 else args.requests
        args.naive_requests = 6 if args.naive_requests == 16 else args.naive_requests  # ~30 s per M on an H100
        args.clients = 64 if args.clients == 16 else args.clients
        args.max_tokens = 64 if args.max_tokens == 32 else args.max_tokens
    if args.quick:
        args.ms, args.requests, args.naive_requests, args.clients, args.max_tokens = "1,10", 8, 4, 4, 8
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from adapterfab.basemodel import resolve_base_model
    from adapterfab.ids import AdapterId
    from adapterfab.keys import KeyStore
    from adapterfab.methods.lora_xs import LoraXSConfig, compute_basis, write_adapter
    from adapterfab.registry import AdapterVersion
    from adapterfab.serve.backend import LocalBackend, TieredBackend
    from adapterfab.serve.batched import BatchedEngine
    from adapterfab.serve.engine import Engine
    from adapterfab.serve.tiers import AdapterTiers
    from adapterfab.state import StateStore

    threads = os.cpu_count() or 2
    torch.set_num_threads(threads)
    ms = [int(x) for x in args.ms.split(",")]
    base = args.tokenizer if gpu and args.tokenizer else resolve_base_model("smollm2-135m-instruct").path
    dtype, device = ("bfloat16", "cuda") if gpu else ("float32", "cpu")
    gpu_dir = tempfile.mkdtemp(prefix="af-serve-base-") if gpu else None
    if gpu:
        sys.path.insert(0, str(REPO / "bench"))
        from train_throughput import gpu_base

        base, _ = gpu_base(Path(gpu_dir), base)
    cfg = AutoConfig.from_pretrained(base)
    hd = cfg.hidden_size // cfg.num_attention_heads
    shapes = {}
    for i in range(cfg.num_hidden_layers):
        shapes[f"model.layers.{i}.self_attn.q_proj"] = (cfg.hidden_size, cfg.hidden_size)
        shapes[f"model.layers.{i}.self_attn.v_proj"] = (cfg.num_key_value_heads * hd, cfg.hidden_size)
    peft_cfg = {"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM",
                "bias": "none", "lora_dropout": 0.0, "base_model_name_or_path": base}
    out: dict = {"runs": {}}
    with tempfile.TemporaryDirectory(prefix="af-serve-bench-") as tmp:
        root = Path(tmp)
        folders = {f"t/p{k}@1": write_lora(root / f"p{k}", peft_cfg, shapes, 8, k) for k in range(max(ms))}
        versions = {key: AdapterVersion(id=AdapterId.parse(key), source=str(path), run_id=None, tags={},
                                        aliases=(), created_s=0.0) for key, path in folders.items()}

        def resolver(aid: AdapterId) -> AdapterVersion:
            return versions[str(aid)]

        keys = KeyStore(StateStore(f"sqlite:///{root / 'state.db'}"))
        key = keys.create("t")
        engine = BatchedEngine(base, dtype=dtype, device=device, max_batch=args.clients, max_len=512,
                               max_adapters=max(ms), max_rank=8, torch_threads=threads)
        tiers = AdapterTiers(engine, lambda k: (folders[k], None, False))
        server = Server(TieredBackend(engine, tiers), resolver, keys)
        try:  # warm-up at full size, base and adapter paths, so no run pays first-use costs
            for k in zipf_keys(1, 1, 1):
                tiers.load(k)
            drive_elsewhere(server.url, key, ["base"] * args.clients + zipf_keys(1, args.clients, 1), args.clients,
                            args.max_tokens)
            out["runs"]["base"] = drive_elsewhere(server.url, key, ["base"] * args.requests, args.clients,
                                                  args.max_tokens)
            print("base", out["runs"]["base"], flush=True)
            for m in ms:
                for k in zipf_keys(m, m, 1):  # the adapters are resident before the clock starts
                    tiers.load(k)
                run = drive_elsewhere(server.url, key, zipf_keys(m, args.requests, m), args.clients,
                                      args.max_tokens)
                run["distinct_adapters"] = len(set(zipf_keys(m, args.requests, m)))
                out["runs"][f"ours_m{m}"] = run
                print(f"ours M={m}", run, flush=True)
            out["batching"] = engine.stats()
            out["tiers"] = tiers.stats()
            # the engine alone (no HTTP): base, and Zipf over the most adapters
            out["engine_direct"] = direct_runs(engine, max(ms), args.requests, args.clients, args.max_tokens)
            print("engine direct", out["engine_direct"], flush=True)
        finally:
            server.stop()
            engine.close()
        del engine, tiers
        if gpu:  # the same engine without CUDA graphs (eager decode steps), driven directly
            eager = BatchedEngine(base, dtype=dtype, device=device, max_batch=args.clients, max_len=512,
                                  max_adapters=max(ms), max_rank=8, torch_threads=threads, cuda_graphs=False)
            try:
                for k in zipf_keys(max(ms), max(ms), 1):
                    eager.load_adapter(k, folders[k])
                engine_direct(eager, zipf_keys(1, args.clients, 1), args.clients, args.max_tokens)  # warm-up
                out["engine_direct_eager"] = direct_runs(eager, max(ms), args.requests, args.clients,
                                                         args.max_tokens)
                print("engine direct, eager", out["engine_direct_eager"], flush=True)
            finally:
                eager.close()
            del eager
        # LoRA r=16 and LoRA-XS r=16 cold loads: artifact store -> first token
        cold_engine = BatchedEngine(base, dtype=dtype, device=device, max_batch=4, max_len=64, max_adapters=32,
                                    max_rank=16, torch_threads=threads)
        try:
            lora16 = {f"c/l{k}@1": write_lora(root / f"l16-{k}", peft_cfg, shapes, 16, 1000 + k) for k in range(12)}
            out["cold_load_lora_r16"] = cold_loads(cold_engine, root / "cold-lora", lora16, None, 12)
            xs_cfg = LoraXSConfig(r=16, alpha=16)
            basis = compute_basis(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), xs_cfg, "bench")
            gen = torch.Generator().manual_seed(0)
            xs = {}
            for k in range(12):
                rs = {m: torch.randn(16, 16, generator=gen) * 1e-3 for m in basis.factors}
                xs[f"c/x{k}@1"] = write_adapter(root / f"xs-{k}", xs_cfg, basis.id, basis.digest,
                                                basis.base_fingerprint, xs_cfg.resolved_targets(), rs)
            out["cold_load_lora_xs_r16"] = cold_loads(cold_engine, root / "cold-xs", xs, basis, 12)
            print("cold", out["cold_load_lora_r16"], out["cold_load_lora_xs_r16"], flush=True)
        finally:
            cold_engine.close()
        del cold_engine
        # naive: PEFT, one request at a time, switching adapters per request
        naive_engine = Engine(base, dtype=dtype, device=device, torch_threads=threads)
        naive = LocalBackend(naive_engine, fetch=lambda v: v.source, max_adapters=1)
        server = Server(naive, resolver, keys)
        try:
            for m in [x for x in ms if x in (1, 10, 100)] or ms[:1]:
                run = drive_elsewhere(server.url, key, zipf_keys(m, args.naive_requests, m), args.clients,
                                      args.max_tokens)
                out["runs"][f"naive_m{m}"] = run
                print(f"naive M={m}", run, flush=True)
        finally:
            server.stop()
            naive.close()

    runs = out["runs"]
    m_hi = max(ms)
    naive_m = max(m for m in ms if f"naive_m{m}" in runs)
    ratios = {
        f"ours_over_naive_m{naive_m}": round(runs[f"ours_m{naive_m}"]["tokens_per_s"]
                                             / runs[f"naive_m{naive_m}"]["tokens_per_s"], 2),
        f"ours_m{m_hi}_over_m1": round(runs[f"ours_m{m_hi}"]["tokens_per_s"] / runs["ours_m1"]["tokens_per_s"], 2)
        if "ours_m1" in runs else None,
        f"ours_m{m_hi}_over_base": round(runs[f"ours_m{m_hi}"]["tokens_per_s"] / runs["base"]["tokens_per_s"], 2),
    }
    out["ratios"] = ratios
    print(json.dumps(ratios, indent=1))
    if args.quick:
        return
    stamp = time.strftime("%Y-%m-%d")
    machine = (f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}" if gpu else
               f"{platform.machine()} {threads} CPU, torch {torch.__version__}, CPU only")
    base_name = "random ~1B Llama-shaped bf16" if gpu else "SmolLM2-135M-Instruct fp32"
    out.update({"date": stamp, "machine": machine, "base": base_name,
                "adapters": "LoRA r8 q,v (random weights)", "clients": args.clients, "max_tokens": args.max_tokens,
                "requests": args.requests, "naive_requests": args.naive_requests})
    path = REPO / "bench" / "results" / f"serve_throughput-{args.device}-{stamp}.json"
    path.write_text(json.dumps(out, indent=1))
    per_m = ", ".join(f"M={m} {runs[f'ours_m{m}']['tokens_per_s']} tok/s (p50 {runs[f'ours_m{m}']['latency_p50_s']} s, "
                      f"p99 {runs[f'ours_m{m}']['latency_p99_s']} s, TTFT p50 {runs[f'ours_m{m}']['ttft_p50_s']} s)"
                      for m in ms)
    naive = ", ".join(f"M={m} {runs[f'naive_m{m}']['tokens_per_s']} tok/s" for m in ms if f"naive_m{m}" in runs)
    direct = "; ".join(f"{label} base {d['base']['tokens_per_s']} tok/s ({d['base']['wall_ms_per_step']} ms/step), "
                       f"M={m_hi} {d[f'm{m_hi}']['tokens_per_s']} tok/s ({d[f'm{m_hi}']['wall_ms_per_step']} ms/step)"
                       for label, d in (("graphs" if gpu else "eager", out["engine_direct"]),
                                        ("eager", out.get("engine_direct_eager"))) if d)
    line = (
        f"- {stamp} · serve_throughput.py · {machine} · {base_name}, LoRA r8 q,v, Zipf, {args.clients} "
        f"streaming clients, {args.max_tokens} tokens · ours {per_m}; base alone {runs['base']['tokens_per_s']} "
        f"tok/s; naive PEFT {naive}; engine alone, no HTTP: {direct}; ratios {json.dumps(ratios)}; "
        f"cold load store→first token p50 "
        f"LoRA r16 {out['cold_load_lora_r16']['p50_s']} s, LoRA-XS r16 {out['cold_load_lora_xs_r16']['p50_s']} s "
        f"(`{'python' if gpu else '.venv/bin/python'} bench/serve_throughput.py{' --device cuda' if gpu else ''}`"
        f"; bench/results/{path.name})"
    )
    results_md = REPO / "bench" / "RESULTS.md"
    text = results_md.read_text()
    header = "## serve_throughput.py — multi-adapter serving (issue 6)"
    if header not in text:
        text = text.rstrip("\n") + f"\n\n{header}\n\n"
    results_md.write_text(text.rstrip("\n") + "\n" + line + "\n")
    print(line)


if __name__ == "__main__":
    main()
