"""vLLM's half of ``bench/serve_vs_vllm.py``: run in vLLM's own venv (``make vllm-venv``), never imported
by the project. Reads a job file the other half wrote (model folder, dtype, prompt token ids, cases with
their adapters and each request's adapter), times each case with vLLM's offline ``LLM`` (the same
requests, greedy or with the case's ``sampling`` and a seed per request, ``max_num_seqs`` rows at once,
adapters resident before timing) and writes the figures, with each request's tokens for the equality
check, to the file named in the job.

    .vllm-venv/bin/python bench/vllm_side.py JOB.json
"""

from __future__ import annotations

import json
import sys
import time


def run(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    greedy = SamplingParams(max_tokens=job["max_tokens"], temperature=0, ignore_eos=True)
    out: dict = {}
    next_id = 1
    lora_cases = [c for c in job["cases"] if c["adapters"]]
    plain_cases = [c for c in job["cases"] if not c["adapters"]]
    common = dict(model=job["model"], dtype=job["dtype"], max_num_seqs=job["max_num_seqs"],
                  max_model_len=job["max_model_len"], seed=0)
    for cases, lora in ((plain_cases, False), (lora_cases, True)):
        if not cases:
            continue
        t0 = time.perf_counter()
        extra = {}
        if lora:
            most = max(len(c["adapters"]) for c in cases)
            extra = dict(enable_lora=True, max_lora_rank=job["max_lora_rank"], max_loras=min(most, job["max_num_seqs"]),
                         max_cpu_loras=most)
        llm = LLM(**common, **extra)
        init_s = time.perf_counter() - t0
        for case in cases:
            # an adapter's int id is its identity in vLLM's caches: unique across cases, or a case would be
            # served another case's adapters under the same ids
            reqs = [LoRARequest(f"{case['name']}-{j}", next_id + j, path) for j, path in enumerate(case["adapters"])]
            next_id += len(reqs)
            which = [reqs[k] for k in case["assign"]] if reqs else None
            if reqs:  # every adapter read and resident before the clock starts
                llm.generate([prompts[0]] * len(reqs), SamplingParams(max_tokens=1, temperature=0), lora_request=reqs,
                             use_tqdm=False)
            else:
                llm.generate([prompts[0]], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
            params = greedy
            if case.get("sampling"):  # each request its own seed (its index), as on our side
                params = [SamplingParams(max_tokens=job["max_tokens"], ignore_eos=True, seed=i, **case["sampling"])
                          for i in range(len(prompts))]
            t = time.perf_counter()
            res = llm.generate(prompts, params, lora_request=which, use_tqdm=False)
            dt = time.perf_counter() - t
            tokens = [list(r.outputs[0].token_ids) for r in res]
            out[case["name"]] = {"tok_s": round(sum(map(len, tokens)) / dt, 2), "seconds": round(dt, 3),
                                 "tokens": tokens, "engine_init_s": round(init_s, 1)}
            print(f"vllm {job['dtype']} {case['name']}: {out[case['name']]['tok_s']} tok/s", flush=True)
        del llm
    return out


if __name__ == "__main__":  # vLLM's engine core is a spawned process: it re-imports this module
    job = json.load(open(sys.argv[1]))
    result = run(job)
    with open(job["out"], "w") as f:
        json.dump(result, f)
