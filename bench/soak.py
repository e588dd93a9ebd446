"""Soak test of the serving endpoint on loopback: many concurrent clients across many
tenants, each with its own API key and adapters, for a bounded time, against the real HTTP API
(serve/api.py: auth, alias resolution, OpenAI shapes, SSE streaming) over the batched engine
(serve/batched.py) and its adapter tiers (serve/tiers.py), in one uvicorn server on 127.0.0.1.

It reports requests served, errors (any non-200, malformed body, or a request past its timeout), latency
p50/p99, and the process's resident memory over time (first vs last fifth of the run, after a warm-up that
touches every adapter), and says whether the run passed: zero errors, p99 under --p99-limit-s, memory
growth under --rss-growth-limit-mb.

    python bench/soak.py                          # 10 min, 32 clients, 24 tenants x 2 adapters, tiny base
    python bench/soak.py --duration-s 60 --base smollm2-135m-instruct

Writes bench/results/soak-<date>.json and appends a line to bench/RESULTS.md. The short version runs in
`make test` (tests/unit/test_soak.py, ~40 s on the tiny model).
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
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["Hello!", "What is the capital of France?", "Tell me a joke.", "How do fish breathe?",
           "Name a colour.", "What day is it?", "Say something nice.", "Count to three."]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Server:
    """make_api over TieredBackend(BatchedEngine, AdapterTiers), uvicorn in a thread on a free port."""

    def __init__(self, base_path: str, folders: dict[str, Path], keys: Any, max_batch: int,
                 max_adapters: int) -> None:
        import uvicorn

        from adapterfab.errors import AdapterNotFound
        from adapterfab.ids import AdapterId
        from adapterfab.procs import free_port
        from adapterfab.registry import AdapterVersion
        from adapterfab.serve.api import make_api
        from adapterfab.serve.backend import TieredBackend
        from adapterfab.serve.batched import BatchedEngine
        from adapterfab.serve.tiers import AdapterTiers

        def resolve(aid: AdapterId) -> AdapterVersion:  # production = version 1
            key = f"{aid.key}@1"
            if key not in folders or aid.version not in (None, 1) or aid.alias not in (None, "production"):
                raise AdapterNotFound(f"no adapter {aid}")
            return AdapterVersion(id=aid.unversioned().with_version(1), source=str(folders[key]), run_id=None,
                                  tags={}, aliases=("production",), created_s=0.0)

        self.engine = BatchedEngine(base_path, max_batch=max_batch, max_len=256, max_adapters=max_adapters,
                                    max_rank=8, torch_threads=max(1, (os.cpu_count() or 2) - 1))
        self.tiers = AdapterTiers(self.engine, lambda k: (folders[k], None, False))
        app = make_api(TieredBackend(self.engine, self.tiers), keys.verify, resolve, resolve_ttl_s=5)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="soak-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.server.started:
            raise RuntimeError("uvicorn did not start")
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        close = getattr(self.engine, "close", None)
        if close:
            close()


async def _one(http: Any, url: str, key: str, model: str, stream: bool, max_tokens: int, timeout_s: float,
               rng: random.Random) -> tuple[bool, float, str]:
    body = {"model": model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": max_tokens, "temperature": rng.choice([0, 0.7]), "stream": stream}
    headers = {"Authorization": f"Bearer {key}"}
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            if stream:
                got_done, text = False, ""
                async with http.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
                    if r.status_code != 200:
                        return False, time.monotonic() - t0, f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            got_done = True
                        elif line.startswith("data: "):
                            chunk = json.loads(line[6:])
                            if chunk.get("error"):
                                return False, time.monotonic() - t0, f"stream error: {chunk['error']}"
                            text += "".join(c["delta"].get("content") or "" for c in chunk.get("choices", []))
                if not got_done:
                    return False, time.monotonic() - t0, "stream ended without [DONE]"
            else:
                r = await http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
                if r.status_code != 200:
                    return False, time.monotonic() - t0, f"HTTP {r.status_code}: {r.text[:200]}"
                d = r.json()
                if d.get("object") != "chat.completion" or d["usage"]["completion_tokens"] < 1:
                    return False, time.monotonic() - t0, f"bad body: {str(d)[:200]}"
    except TimeoutError:
        return False, time.monotonic() - t0, f"no answer within {timeout_s:.0f}s"
    except Exception as e:  # noqa: BLE001 - every failure is counted, none ends the soak
        return False, time.monotonic() - t0, f"{type(e).__name__}: {e}"
    return True, time.monotonic() - t0, ""


async def drive(url: str, tenants: dict[str, tuple[str, list[str]]], clients: int, duration_s: float,
                max_tokens: int, timeout_s: float, seed: int = 0) -> dict[str, Any]:
    """``clients`` concurrent clients, each sending one request after another until ``duration_s`` has
    passed: a random tenant, that tenant's key, one of its adapters (bare id, @production, @1, or the
    base), streaming or not. RSS is sampled every second."""
    import httpx

    results: list[tuple[bool, float, str]] = []
    rss: list[tuple[float, float]] = []
    t_start = time.monotonic()
    stop_at = t_start + duration_s
    names = sorted(tenants)

    async def client(i: int, http: httpx.AsyncClient) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < stop_at:
            tenant = rng.choice(names)
            key, models = tenants[tenant]
            model = rng.choice(models + ["base"] if rng.random() < 0.1 else models)
            if model != "base":
                model += rng.choice(["", "", "@production", "@1"])
            results.append(await _one(http, url, key, model, rng.random() < 0.5, max_tokens, timeout_s, rng))

    async def sampler() -> None:
        while time.monotonic() < stop_at:
            rss.append((time.monotonic() - t_start, rss_mb()))
            await asyncio.sleep(1.0)

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=timeout_s + 5, limits=limits) as http:
        await asyncio.gather(sampler(), *(client(i, http) for i in range(clients)))
    wall = time.monotonic() - t_start
    lat = sorted(t for ok, t, _ in results if ok)
    errors = [why for ok, _, why in results if not ok]
    q = lambda xs, p: round(xs[min(len(xs) - 1, int(p * len(xs)))], 3) if xs else None  # noqa: E731
    fifth = max(1, len(rss) // 5)
    first = statistics.median(m for _, m in rss[:fifth]) if rss else 0.0
    last = statistics.median(m for _, m in rss[-fifth:]) if rss else 0.0
    return {"requests": len(results), "ok": len(lat), "errors": len(errors), "error_examples": errors[:10],
            "wall_s": round(wall, 1), "requests_per_s": round(len(results) / wall, 2),
            "latency_p50_s": q(lat, 0.5), "latency_p99_s": q(lat, 0.99), "latency_max_s": lat[-1] if lat else None,
            "rss_first_fifth_mb": round(first, 1), "rss_last_fifth_mb": round(last, 1),
            "rss_growth_mb": round(last - first, 1), "rss_max_mb": round(max((m for _, m in rss), default=0), 1),
            "rss_samples": [(round(t, 1), round(m, 1)) for t, m in rss]}


def run_soak(base_path: str, workdir: Path, duration_s: float = 30, clients: int = 16, tenants: int = 12,
             adapters_per_tenant: int = 2, max_tokens: int = 12, timeout_s: float = 30,
             warmup_s: float = 0) -> dict[str, Any]:
    """Build the server and the tenants (keys, adapters), warm every adapter up, then soak."""
    from adapterfab.basemodel import random_peft_lora
    from adapterfab.keys import KeyStore
    from adapterfab.state import StateStore

    keys = KeyStore(StateStore(f"sqlite:///{workdir / 'state.db'}"))
    folders: dict[str, Path] = {}
    table: dict[str, tuple[str, list[str]]] = {}
    for t in range(tenants):
        name = f"tenant-{t:03d}"
        models = []
        for a in range(adapters_per_tenant):
            aid = f"{name}/persona-{a}"
            folders[f"{aid}@1"] = random_peft_lora(base_path, workdir / "adapters" / name / f"p{a}", seed=t * 100 + a)
            models.append(aid)
        table[name] = (keys.create(name), models)
    server = Server(base_path, folders, keys, max_batch=clients, max_adapters=len(folders))
    try:
        warm = asyncio.run(drive(server.url, table, clients, max(warmup_s, 1.0), max_tokens, timeout_s, seed=99))
        for k in folders:  # every adapter on the device before the measured run
            server.tiers.acquire(k)
            server.tiers.release(k)
        out = asyncio.run(drive(server.url, table, clients, duration_s, max_tokens, timeout_s))
        out["warmup"] = {k: warm[k] for k in ("requests", "errors", "error_examples")}
        out["tiers"] = server.tiers.stats() if hasattr(server.tiers, "stats") else {}
    finally:
        server.stop()
    out.update({"clients": clients, "tenants": tenants, "adapters": len(folders), "max_tokens": max_tokens,
                "timeout_s": timeout_s, "duration_s": duration_s})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration-s", type=float, default=600)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--tenants", type=int, default=24)
    ap.add_argument("--adapters-per-tenant", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--timeout-s", type=float, default=60)
    ap.add_argument("--base", default="tiny", help="'tiny' (random 2-layer Llama) or a base model name/folder")
    ap.add_argument("--p99-limit-s", type=float, default=10.0)
    ap.add_argument("--rss-growth-limit-mb", type=float, default=100.0)
    ap.add_argument("--no-record", action="store_true", help="write neither results/ nor RESULTS.md")
    args = ap.parse_args()
    import torch

    from adapterfab.basemodel import resolve_base_model, tiny_random_llama

    with tempfile.TemporaryDirectory(prefix="af-soak-") as tmp:
        root = Path(tmp)
        smol = resolve_base_model("smollm2-135m-instruct").path
        if args.base == "tiny":
            base, base_desc = tiny_random_llama(root / "tiny", smol), "tiny random Llama (2 layers, hidden 64)"
        else:
            base, base_desc = resolve_base_model(args.base).path, args.base
        out = run_soak(base, root, args.duration_s, args.clients, args.tenants, args.adapters_per_tenant,
                       args.max_tokens, args.timeout_s, warmup_s=5)
    out["passed"] = bool(out["errors"] == 0 and out["latency_p99_s"] is not None
                         and out["latency_p99_s"] <= args.p99_limit_s
                         and out["rss_growth_mb"] <= args.rss_growth_limit_mb)
    out["limits"] = {"p99_s": args.p99_limit_s, "rss_growth_mb": args.rss_growth_limit_mb}
    date = time.strftime("%Y-%m-%d")
    out["env"] = {"date": date, "machine": f"{platform.machine()} {os.cpu_count()} CPU",
                  "torch": torch.__version__, "base": base_desc, "command": " ".join(["python", *sys.argv])}
    summary = {k: v for k, v in out.items() if k != "rss_samples"}
    print(json.dumps(summary, indent=1))
    if args.no_record:
        return
    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"soak-{date}.json"
    path.write_text(json.dumps(out, indent=1))
    line = (f"- {date} · soak.py · {out['env']['machine']}, torch {torch.__version__}, CPU only · {base_desc}, "
            f"{args.clients} clients, {args.tenants} tenants x {args.adapters_per_tenant} adapters, "
            f"{args.max_tokens} tokens, {args.duration_s:.0f} s · {out['requests']} requests, "
            f"{out['errors']} errors, {out['requests_per_s']} req/s, p50 {out['latency_p50_s']} s, "
            f"p99 {out['latency_p99_s']} s, RSS {out['rss_first_fifth_mb']} -> {out['rss_last_fifth_mb']} MB "
            f"({out['rss_growth_mb']:+} MB) · {'passed' if out['passed'] else 'FAILED'} · "
            f"`{out['env']['command']}` · results/{path.name}\n")
    with (REPO / "bench" / "RESULTS.md").open("a") as f:
        f.write(line)
    print(line, end="")


if __name__ == "__main__":
    main()
