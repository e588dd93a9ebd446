"""Our batched engine against vLLM, side by side in one run (issue 23).

The workload of the issue's measurement: SmolLM2-135M-Instruct, 48 chat requests (the same prompt token
ids for both), greedy, 32 new tokens each (end of sequence ignored, so both produce the same count),
16 at a time, adapters chosen per request by a Zipf law over M adapters and resident before the clock
starts. Cases: the bare base; LoRA r8 on q,v with M = 1 and M = 100; LoRA-XS r16 on q,v with M = 100
(served natively here; on vLLM's side through its PEFT export); the base and LoRA M = 100 again sampled
(temperature 0.8, top-p 0.95, a seed per request). Ours is ``BatchedEngine`` driven
directly by 16 client threads, as the serving replica drives it; vLLM's is its offline ``LLM`` with
``max_num_seqs`` 16, run by ``bench/vllm_side.py`` in vLLM's own venv (``make vllm-venv``: vLLM's CPU
build pins a transformers older than ours). Both in bf16 and fp32. Greedy tokens of the two engines are
compared per request and the share that agree is reported (fp32: they should all agree).

    make vllm-venv && .venv/bin/python bench/serve_vs_vllm.py [--dtypes bfloat16,float32] [--quick]

Writes bench/results/serve_vs_vllm-<date>.json with ``ratios.ours_base_over_vllm_base``,
``ratios.ours_m100_over_vllm_base`` and ``ratios.ours_m100_over_vllm_m100`` (bf16), and for each of our
cases the engine loop's seconds by phase (prefill, decode, sample, host) and the host share.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VLLM_PY = REPO / ".vllm-venv" / "bin" / "python"
SAMPLED = {"temperature": 0.8, "top_p": 0.95}  # the sampled cases' settings, the same on both sides
TARGETS = ("q_proj", "v_proj")


def zipf_assign(n_requests: int, m: int, seed: int = 0, s: float = 1.1) -> list[int]:
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** s for k in range(m)]
    return rng.choices(range(m), weights=weights, k=n_requests)


def make_loras(base: str, root: Path, m: int, r: int = 8) -> list[str]:
    """``m`` PEFT LoRA folders with random non-zero A and B (seeded), from one PEFT model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), task_type="CAUSAL_LM"))
    out = []
    for k in range(m):
        gen = torch.Generator().manual_seed(1000 + k)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        folder = root / f"lora-{k}"
        model.save_pretrained(str(folder))
        out.append(str(folder))
    return out


def make_lora_xs(base: str, root: Path, m: int, r: int = 16) -> tuple[object, list[str], list[str]]:
    """The base's LoRA-XS basis, ``m`` native adapters with random R, and each one's PEFT export."""
    import torch
    from transformers import AutoModelForCausalLM

    from adapterfab.basemodel import fingerprint
    from adapterfab.methods.lora_xs import LoraXSConfig, compute_basis, export_peft_lora, write_adapter

    cfg = LoraXSConfig(r=r, alpha=r, target_modules=list(TARGETS))
    basis = compute_basis(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), cfg, fingerprint(base))
    native, peft = [], []
    for k in range(m):
        gen = torch.Generator().manual_seed(2000 + k)
        rs = {name: torch.randn(r, r, generator=gen) * 0.5 for name in basis.factors}
        folder = write_adapter(root / f"xs-{k}", cfg, basis.id, basis.digest, basis.base_fingerprint,
                               cfg.resolved_targets(), rs)
        native.append(str(folder))
        peft.append(str(export_peft_lora(folder, basis, root / f"xs-{k}-peft")))
    return basis, native, peft


def run_threads(fn: Callable[[int], None], n: int) -> None:
    """``fn(0)`` … ``fn(n - 1)``, each on its own thread (the engine's clients), until all have returned."""
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def run_ours(base: str, dtype: str, prompts: list[list[int]], cases: list[dict], max_tokens: int, clients: int,
             basis: object) -> dict:
    from adapterfab.serve.batched import BatchedEngine
    from adapterfab.serve.engine import SamplingParams

    out = {}
    most = max([len(c["ours"]) for c in cases] + [1])
    eng = BatchedEngine(base, dtype=dtype, max_batch=clients, max_len=512, max_adapters=most + 1, max_rank=16,
                        torch_threads=os.cpu_count())
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    try:
        for case in cases:
            names = []
            for j, path in enumerate(case["ours"]):
                name = f"{case['name']}-{j}"
                eng.load_adapter(name, path, basis=basis if case["kind"] == "xs" else None)
                names.append(name)
            for name in names or [None]:  # each adapter used once before the clock starts
                list(eng.generate_token_ids(prompts[0], name, SamplingParams(max_tokens=1, temperature=0)))
            tokens: list[list[int]] = [[] for _ in prompts]

            def client(c: int, case: dict = case, names: list = names, tokens: list = tokens) -> None:
                for i in range(c, len(prompts), clients):
                    adapter = names[case["assign"][i]] if names else None
                    ps = (dataclasses.replace(params, seed=i, **case["sampling"]) if case.get("sampling")
                          else params)  # sampled cases: each request its own seed (its index), as on vLLM's side
                    tokens[i] = [int(t) for t in eng.generate_token_ids(prompts[i], adapter, ps)]

            before = dict(eng.phase_s)
            t = time.perf_counter()
            run_threads(client, clients)
            dt_s = time.perf_counter() - t
            phases = {k: round(eng.phase_s[k] - before[k], 3) for k in before}  # the engine loop's own split
            busy = sum(phases.values())
            out[case["name"]] = {"tok_s": round(sum(map(len, tokens)) / dt_s, 2), "seconds": round(dt_s, 3),
                                 "loop_phases_s": phases, "host_share": round(phases["host"] / max(busy, 1e-9), 4),
                                 "tokens": tokens}
            print(f"ours {dtype} {case['name']}: {out[case['name']]['tok_s']} tok/s; loop {phases} "
                  f"(host {100 * out[case['name']]['host_share']:.1f}%)", flush=True)
            for name in names:
                eng.unload_adapter(name)
    finally:
        eng.close()
    return out


def run_arrivals(base: str, dtype: str, prompts: list[list[int]], long_prompts: list[list[int]], chunks: list,
                 max_tokens: int, clients: int, rate: float, seed: int = 0) -> dict:
    """Requests arriving by a Poisson process (``rate`` per second; every fourth a long prompt) at our engine,
    each streamed by its own thread: the gaps between a stream's tokens (inter-token latency, its p50 and
    p99), time to first token and throughput, for each ``prefill_chunk`` in ``chunks`` (0: every
    admitted prompt prefilled whole before the next decode step). Ours only: vLLM's offline ``LLM`` takes
    its requests at once."""
    import statistics

    from adapterfab.serve.batched import BatchedEngine
    from adapterfab.serve.engine import SamplingParams

    rng = random.Random(seed)
    n = len(prompts)
    work = [long_prompts[i % len(long_prompts)] if i % 4 == 3 else prompts[i] for i in range(n)]
    gaps_at, t_next = [], 0.0
    for _ in range(n):
        gaps_at.append(t_next)
        t_next += rng.expovariate(rate)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    out = {}
    for chunk in chunks:
        eng = BatchedEngine(base, dtype=dtype, max_batch=clients, max_len=1024, torch_threads=os.cpu_count(),
                            prefill_chunk=chunk)
        try:
            list(eng.generate_token_ids(prompts[0], None, SamplingParams(max_tokens=2, temperature=0)))
            stamps: list[list[float]] = [[] for _ in range(n)]
            t0 = time.perf_counter()

            def client(i: int, stamps: list = stamps, t0: float = t0, eng: BatchedEngine = eng) -> None:
                time.sleep(max(0.0, t0 + gaps_at[i] - time.perf_counter()))
                stamps[i].append(time.perf_counter())  # sent
                for _ in eng.generate_token_ids(work[i], None, params):
                    stamps[i].append(time.perf_counter())

            run_threads(client, n)
            wall = time.perf_counter() - t0
            stats = eng.stats()
        finally:
            eng.close()
        itl = sorted(b - a for st in stamps for a, b in zip(st[1:], st[2:]))
        ttft = sorted(st[1] - st[0] for st in stamps)
        q = lambda v, p: v[min(len(v) - 1, int(p * len(v)))]  # noqa: E731
        key = f"chunk_{chunk}" if chunk else "whole"  # 0: every admitted prompt whole before the next step
        out[key] = {"prefill_chunk": chunk, "itl_p50_ms": round(1e3 * statistics.median(itl), 1),
                    "itl_p99_ms": round(1e3 * q(itl, 0.99), 1), "itl_max_ms": round(1e3 * itl[-1], 1),
                    "ttft_p50_ms": round(1e3 * statistics.median(ttft), 1),
                    "ttft_p99_ms": round(1e3 * q(ttft, 0.99), 1),
                    "tok_s": round(sum(len(st) - 1 for st in stamps) / wall, 1),
                    "prefill_pieces": stats["prefill_pieces"]}
        print(f"ours {dtype} arrivals {key}: {out[key]}", flush=True)
    return out


def run_vllm(base: str, dtype: str, prompts: list[list[int]], cases: list[dict], max_tokens: int, clients: int,
             work: Path) -> dict:
    job = {"model": base, "dtype": dtype, "prompts": prompts, "max_tokens": max_tokens, "max_num_seqs": clients,
           "max_model_len": 512, "max_lora_rank": 16, "out": str(work / f"vllm-{dtype}.json"),
           "cases": [{"name": c["name"], "adapters": c["vllm"], "assign": c["assign"]} for c in cases]}
    path = work / f"job-{dtype}.json"
    path.write_text(json.dumps(job))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1", "VLLM_USE_STANDALONE_COMPILE": "0"}
    env.pop("PYTHONPATH", None)
    r = subprocess.run([str(VLLM_PY), str(REPO / "bench" / "vllm_side.py"), str(path)], env=env, cwd=str(work),
                       capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"vLLM's side failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    print("\n".join(line for line in r.stdout.splitlines() if line.startswith("vllm ")), flush=True)
    return json.loads(Path(job["out"]).read_text())


def agreement(a: dict, b: dict) -> float:
    pairs = list(zip(a["tokens"], b["tokens"]))
    return round(sum(x == y for x, y in pairs) / max(1, len(pairs)), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--m", type=int, default=100, help="adapters in the many-adapter cases")
    ap.add_argument("--quick", action="store_true", help="M = 10 and 16 requests (a check that both sides run)")
    ap.add_argument("--no-xs", action="store_true", help="skip the LoRA-XS case")
    ap.add_argument("--no-sampled", action="store_true", help="skip the sampled (temperature, top-p) cases")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-arrivals", action="store_true", help="skip the inter-token latency run under arrivals")
    ap.add_argument("--only-arrivals", action="store_true", help="only the arrivals run (no vLLM needed)")
    ap.add_argument("--rate", type=float, default=4.0, help="arrivals per second in the arrivals run")
    args = ap.parse_args()
    if args.quick:
        args.m, args.requests = 10, 16
    if not VLLM_PY.exists() and not args.only_arrivals:
        sys.exit(f"no vLLM venv at {VLLM_PY.parent.parent}: run `make vllm-venv` first")
    from transformers import AutoTokenizer

    from adapterfab.basemodel import resolve_base_model
    from adapterfab.chat import encode_prompt
    from adapterfab.threads import in_passing_thread

    base = resolve_base_model("smollm2-135m-instruct").path
    tok = AutoTokenizer.from_pretrained(base)
    topics = ["ships", "the sea", "stars", "bread", "rivers", "mountains", "music", "clocks"]
    prompts = [encode_prompt([{"role": "user", "content": f"Tell me about {topics[i % len(topics)]}, please ({i})."}],
                             tok) for i in range(args.requests)]
    # long prompts for the arrivals run: a document of ~400 tokens to summarise
    doc = " ".join(f"Paragraph {k}: the {topics[k % len(topics)]} of the north were known for their long "
                   f"history, and travellers wrote about them often." for k in range(20))
    long_prompts = [encode_prompt([{"role": "user", "content": f"Summarise this ({i}): {doc}"}], tok)
                    for i in range(4)]
    if args.only_arrivals:
        res = {"date": dt.date.today().isoformat(), "requests": args.requests, "rate": args.rate,
               "long_prompt_tokens": len(long_prompts[0]),
               "arrivals": run_arrivals(base, "bfloat16", prompts, long_prompts, [0, 512, 256, 128], args.max_tokens,
                                        args.clients, args.rate)}
        print(json.dumps(res, indent=2))
        return
    work = Path(tempfile.mkdtemp(prefix="serve-vs-vllm-"))
    t0 = time.perf_counter()
    # adapters are made on a passing thread: the server's process makes none, and a 2-thread torch op on
    # this (main) thread would leave an OpenMP pool beside the engine's, which slows its decode loop by a
    # quarter (adapterfab/threads.py)
    loras = in_passing_thread(make_loras, base, work, args.m)
    cases = [{"name": "base", "kind": "base", "ours": [], "vllm": [], "assign": [0] * args.requests},
             {"name": "lora_m1", "kind": "lora", "ours": loras[:1], "vllm": loras[:1], "assign": [0] * args.requests},
             {"name": f"lora_m{args.m}", "kind": "lora", "ours": loras, "vllm": loras,
              "assign": zipf_assign(args.requests, args.m)}]
    if not args.no_sampled:  # one batched sampling pass per step (temperature and top-p, a seed per request)
        cases += [{**c, "name": f"{c['name']}_sampled", "sampling": SAMPLED} for c in (cases[0], cases[2])]
    basis = None
    if not args.no_xs:
        basis, native, exported = in_passing_thread(make_lora_xs, base, work, args.m)
        cases.append({"name": f"lora_xs_m{args.m}", "kind": "xs", "ours": native, "vllm": exported,
                      "assign": zipf_assign(args.requests, args.m, seed=1)})
    print(f"adapters ready in {time.perf_counter() - t0:.0f} s ({work})", flush=True)
    results: dict = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} CPU",
                     "model": "SmolLM2-135M-Instruct", "requests": args.requests, "clients": args.clients,
                     "max_tokens": args.max_tokens, "m": args.m, "by_dtype": {}}
    try:
        import torch

        results["torch"] = torch.__version__
        cpu = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        results["cpu"] = cpu[0].split(":", 1)[1].strip() if cpu else platform.processor()
    except OSError:
        pass
    for dtype in args.dtypes.split(","):
        ours = run_ours(base, dtype, prompts, cases, args.max_tokens, args.clients, basis)
        vllm = run_vllm(base, dtype, prompts, cases, args.max_tokens, args.clients, work)
        by = {}
        for c in cases:
            n = c["name"]
            by[n] = {"ours_tok_s": ours[n]["tok_s"], "vllm_tok_s": vllm[n]["tok_s"],
                     "ours_over_vllm": round(ours[n]["tok_s"] / vllm[n]["tok_s"], 3),
                     "ours_loop_phases_s": ours[n]["loop_phases_s"], "ours_host_share": ours[n]["host_share"]}
            if not c.get("sampling"):  # sampled tokens differ by design (each side its own generator)
                by[n]["greedy_agreement"] = agreement(ours[n], vllm[n])
        results["by_dtype"][dtype] = by
    if not args.no_arrivals:
        results["long_prompt_tokens"] = len(long_prompts[0])
        results["arrivals_rate_per_s"] = args.rate
        results["arrivals_bf16"] = run_arrivals(base, "bfloat16", prompts, long_prompts, [0, 512, 256, 128],
                                                args.max_tokens, args.clients, args.rate)
    m = f"lora_m{args.m}"
    for dtype, by in results["by_dtype"].items():
        key = "ratios" if dtype == "bfloat16" else f"ratios_{dtype}"
        results[key] = {"ours_base_over_vllm_base": round(by["base"]["ours_tok_s"] / by["base"]["vllm_tok_s"], 3),
                        "ours_m100_over_vllm_base": round(by[m]["ours_tok_s"] / by["base"]["vllm_tok_s"], 3),
                        "ours_m100_over_vllm_m100": round(by[m]["ours_tok_s"] / by[m]["vllm_tok_s"], 3)}
    out = Path(args.out or REPO / "bench" / "results" / f"serve_vs_vllm-{results['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k.startswith("ratios") or k == "by_dtype"}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
