"""Adapters per hour for a standard persona job, end to end (read + tokenize the tenant's JSONL, train,
eval on held-out rows with and without the adapter, save the adapter folder), three ways in the same
run on the same Ray cluster:

  (a) sequential: one Ray task per job, one after another; each loads the base, trains, exits
  (b) concurrent: one Ray task per job, fractional resources (here: 1 CPU each on a 2-CPU node, the
      CPU analogue of 0.25-GPU tasks), no resident base: every task loads the base itself
  (c) ours: a resident-base Ray actor (jobs/resident.py) that loads the base once and trains the jobs
      K at a time fused in one forward/backward pass (jobs/fused.py)

Registration in MLflow is left out of all three (the same fixed cost for each). Writes
bench/results/train_throughput-<device>-<date>.json and a line in bench/RESULTS.md.

    .venv/bin/python bench/train_throughput.py                  # CPU: SmolLM2-135M LoRA, 8 jobs, K=4
    .venv/bin/python bench/train_throughput.py --jobs 4 --steps 4 --quick
    python bench/train_throughput.py --device cuda              # GPU (with ray + bitsandbytes installed)

GPU mode is the standard GPU job of bench/RESULTS.md: a Llama-shaped base with random bf16 weights
(hidden 2048, MLP 5632, 16 layers, 16 heads / 8 KV heads; the SmolLM2 tokenizer's 49,152-token vocabulary makes it 0.96B
parameters rather than the issue's 886M with a 32k vocabulary), QLoRA r=16 on all linear layers,
20 steps of 4 rows x 512 tokens (multi-turn persona chats), (a) 1 GPU per task sequentially,
(b) --gpu-fraction GPU per task concurrently, (c) a resident 1-GPU actor fusing K jobs. It also
reports the model FLOP utilisation of (c): 4 x params x tokens / time / --peak-tflops.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # adapterfab itself must be installed (make setup / pip install .)
PERSONAS = ["pirate", "butler", "robot"]


def one_job(base_path: str, method: dict, job: dict, out_root: str, threads: int, device: str | None = None) -> dict:
    """A whole job in its own task: load the base, read + tokenize, train, eval, save."""
    import torch
    from transformers import AutoTokenizer

    from adapterfab.jobs.train_loop import load_base, save_adapter, train_adapter
    from adapterfab.methods import get_method
    from adapterfab.pipelines.local import encode_file, epoch_batches, split_rows
    from adapterfab.spec import TrainConfig

    torch.set_num_threads(threads)
    t0 = time.monotonic()
    cfg = get_method(method["name"]).config_cls(**method)
    train = TrainConfig(**job["train"])
    tok = AutoTokenizer.from_pretrained(base_path)
    base = load_base(base_path, train.dtype, cfg, "cuda:0" if device == "cuda" else None)
    tr, ev = split_rows(encode_file(job["dataset"], tok, train.max_seq_len), train.eval_fraction)
    pad = tok.pad_token_id
    res = train_adapter(base_path, cfg, train, epoch_batches(tr, train.batch_size, train.seed, pad),
                        lambda: list(epoch_batches(ev, train.batch_size, 0, pad)(0)), model=base)
    save_adapter(res, cfg, Path(out_root) / job["job_id"])
    return {"job_id": job["job_id"], "metrics": res.metrics, "wall_s": time.monotonic() - t0}


def make_jobs(n: int, steps: int, batch_size: int, seq: int, data: dict[str, str] | None = None,
              dtype: str = "float32") -> list[dict]:
    data = data or {p: str(REPO / f"examples/data/{p}.jsonl") for p in PERSONAS}
    return [{"job_id": f"job{i:03d}-{PERSONAS[i % 3]}", "dataset": data[PERSONAS[i % 3]],
             "train": {"steps": steps, "batch_size": batch_size, "max_seq_len": seq, "learning_rate": 1e-3,
                       "dtype": dtype, "seed": i, "eval_fraction": 0.1}} for i in range(n)]


GPU_SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 16,
             "num_key_value_heads": 8, "max_position_embeddings": 2048}


def gpu_base(folder: Path, tokenizer_path: str) -> tuple[str, int]:
    """The Llama-shaped benchmark base (random bf16 weights) with the SmolLM2 tokenizer; (path, params)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **GPU_SHAPE)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    if not (folder / "config.json").exists():
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    return str(folder), n


def long_chats(folder: Path, rows: int = 64, turns: int = 12) -> dict[str, str]:
    """Multi-turn persona chats (each ~500+ tokens) built from the example personas' rows."""
    import random

    out = {}
    folder.mkdir(parents=True, exist_ok=True)
    for persona in PERSONAS:
        raw = [json.loads(line) for line in (REPO / f"examples/data/{persona}.jsonl").open()]
        pairs = [r["messages"] if "messages" in r else  # chat rows, or instruction/output rows
                 [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
                 for r in raw]
        rng = random.Random(persona)
        path = folder / f"{persona}-long.jsonl"
        with path.open("w") as f:
            for _ in range(rows):
                msgs = [m for pair in rng.sample(pairs, min(turns, len(pairs))) for m in pair]
                f.write(json.dumps({"messages": msgs}) + "\n")
        out[persona] = str(path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="jobs fused per step in (c)")
    ap.add_argument("--quick", action="store_true", help="smoke run: no result file")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--gpu-fraction", type=float, default=0.25, help="GPU per task in (b)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for MFU")
    ap.add_argument("--baseline-jobs", type=int, default=0,
                    help="run (a) and (b) on the first N jobs only (0: all); rates are per job, so a few show them")
    ap.add_argument("--profile", action="store_true",
                    help="after (c), profile one more fused group of K jobs (4 steps) with torch.profiler; "
                         "writes bench/results/train_profile-<device>-<date>.txt")
    ap.add_argument("--tokenizer", default=os.environ.get("ADAPTERFAB_TOKENIZER_DIR"),
                    help="a folder with the SmolLM2 tokenizer (GPU mode; default: the converted SmolLM2 base)")
    args = ap.parse_args()
    if args.device == "cuda":  # the standard GPU job unless given otherwise
        defaults = {"jobs": 8, "steps": 10, "batch_size": 4, "seq": 128, "k": 4, "baseline_jobs": 0}
        for key, value in {"jobs": 32, "steps": 20, "batch_size": 4, "seq": 512, "k": 8,
                           "baseline_jobs": 8}.items():
            if getattr(args, key) == defaults[key]:
                setattr(args, key, value)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    import torch

    from adapterfab.basemodel import resolve_base_model
    from adapterfab.jobs.resident import resident_actor

    gpu = args.device == "cuda"
    smollm2 = args.tokenizer if gpu and args.tokenizer else resolve_base_model("smollm2-135m-instruct").path
    cpus = os.cpu_count() or 2
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    task = ray.remote(max_calls=1)(one_job)  # each task its own process, which exits (and frees the GPU)
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="af-bench-") as tmp:
        if gpu:
            base, n_params = gpu_base(Path(tmp) / "base", smollm2)
            method = {"name": "qlora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
            jobs = make_jobs(args.jobs, args.steps, args.batch_size, args.seq, long_chats(Path(tmp) / "data"),
                             dtype="bfloat16")
            whole, part, actor = {"num_gpus": 1, "num_cpus": 1}, {"num_gpus": args.gpu_fraction, "num_cpus": 1}, \
                {"num_gpus": 1, "num_cpus": 1}
            threads, dev = 1, "cuda"
        else:
            base, n_params = smollm2, 0
            method = {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
            jobs = make_jobs(args.jobs, args.steps, args.batch_size, args.seq)
            whole, part, actor = {"num_cpus": cpus}, {"num_cpus": 1}, {"num_cpus": cpus}
            threads, dev = cpus, None
        few = jobs[:args.baseline_jobs or len(jobs)]
        t0 = time.monotonic()
        seq = [ray.get(task.options(**whole).remote(base, method, j, f"{tmp}/a", threads, dev)) for j in few]
        out["a_sequential"] = {"wall_s": time.monotonic() - t0, "jobs": seq}
        print(f"(a) sequential tasks: {out['a_sequential']['wall_s']:.1f}s", flush=True)

        t0 = time.monotonic()
        conc = ray.get([task.options(**part).remote(base, method, j, f"{tmp}/b", 1, dev) for j in few])
        out["b_concurrent"] = {"wall_s": time.monotonic() - t0, "jobs": conc, "resources_per_task": part}
        print(f"(b) concurrent tasks ({part}): {out['b_concurrent']['wall_s']:.1f}s", flush=True)

        t0 = time.monotonic()
        worker = resident_actor().options(**actor).remote(base, method, jobs[0]["train"]["dtype"],
                                                          threads if not gpu else 0, None, dev)
        fused: list = []
        for i in range(0, len(jobs), args.k):
            fused += ray.get(worker.train.remote(jobs[i:i + args.k], f"{tmp}/c"))
        out["c_resident_fused"] = {"wall_s": time.monotonic() - t0, "jobs": fused, "k": args.k,
                                   "load_s": ray.get(worker.stats.remote())["load_s"],
                                   "phases_s": {ph: round(sum(j["group_timing"][ph] for j in fused[::args.k]), 2)
                                                for ph in fused[0]["group_timing"]}}
        print(f"(c) resident base, fused K={args.k}: {out['c_resident_fused']['wall_s']:.1f}s, phases "
              f"{out['c_resident_fused']['phases_s']}, base load {out['c_resident_fused']['load_s']:.1f}s", flush=True)
        assert all(j["error"] is None and Path(j["adapter_dir"], "adapter_model.safetensors").exists()
                   for j in fused), fused
        if args.profile:
            probe = [{**j, "job_id": j["job_id"] + "-prof", "train": {**j["train"], "steps": 4}} for j in jobs[:args.k]]
            table = ray.get(worker.profile.remote(probe, f"{tmp}/p"))
            prof_path = REPO / "bench" / "results" / f"train_profile-{args.device}-{time.strftime('%Y-%m-%d')}.txt"
            if not args.quick:
                prof_path.write_text(table)
            print(table, flush=True)
    ray.shutdown()

    summary = {}
    for key, res in out.items():
        evals = [j["metrics"]["eval_loss"] for j in res["jobs"]]
        bases = [j["metrics"]["base_eval_loss"] for j in res["jobs"]]
        summary[key] = {"wall_s": round(res["wall_s"], 2),
                        "jobs": len(res["jobs"]),
                        "adapters_per_hour": round(3600 * len(res["jobs"]) / res["wall_s"], 1),
                        "mean_eval_loss": round(sum(evals) / len(evals), 4),
                        "mean_base_eval_loss": round(sum(bases) / len(bases), 4),
                        "all_beat_base": all(e < b for e, b in zip(evals, bases))}
    c = summary["c_resident_fused"]["adapters_per_hour"]
    ratios = {"c_over_a": round(c / summary["a_sequential"]["adapters_per_hour"], 2),
              "c_over_b": round(c / summary["b_concurrent"]["adapters_per_hour"], 2)}
    if gpu:  # model FLOP utilisation: frozen base, so ~4 x params FLOPs per trained token (fwd + input grads)
        fused = out["c_resident_fused"]["jobs"]
        tokens = sum(j["metrics"]["train_tokens_per_s"] * j["metrics"]["train_s"] for j in fused)
        step_s = sum(fused[i]["metrics"]["train_s"] for i in range(0, len(fused), args.k))
        peak = args.peak_tflops * 1e12
        ratios["mfu_fused_step"] = round(4 * n_params * tokens / step_s / peak, 4)
        ratios["mfu_end_to_end"] = round(4 * n_params * tokens / out["c_resident_fused"]["wall_s"] / peak, 4)
    print(json.dumps({"summary": summary, "ratios": ratios}, indent=1))
    if args.quick:
        return
    device = args.device
    if gpu:
        machine = f"{torch.cuda.get_device_name(0)}, {torch.__version__}"
    else:
        machine = f"{platform.machine()} {cpus} CPU, {torch.__version__}, CPU only"
    stamp = time.strftime("%Y-%m-%d")
    result = {
        "date": stamp,
        "machine": machine,
        "device": device,
        "base": f"random Llama {GPU_SHAPE}, {n_params} params" if gpu else "SmolLM2-135M-Instruct",
        "method": method,
        "jobs": len(jobs),
        "baseline_jobs": len(few),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_seq_len": args.seq,
        "k": args.k,
        "summary": summary,
        "ratios": ratios,
        "raw": {k: {kk: vv for kk, vv in v.items() if kk != "jobs"} for k, v in out.items()},
    }
    path = REPO / "bench" / "results" / f"train_throughput-{device}-{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    what = (f"{n_params / 1e9:.2f}B Llama-shaped QLoRA r16 all-linear" if gpu else "SmolLM2-135M LoRA r8 q,v")
    extra = (f"; MFU of the fused step {ratios['mfu_fused_step']:.1%}, end to end {ratios['mfu_end_to_end']:.1%} "
             f"(peak {args.peak_tflops:g} TFLOP/s)" if gpu else "")
    line = (
        f"- {stamp} · train_throughput.py · {machine} · {what}, {len(jobs)} jobs "
        f"({len(few)} in (a) and (b)) × "
        f"{args.steps} steps × {args.batch_size} rows × ≤{args.seq} tokens, end to end without registry · "
        f"(a) sequential tasks {summary['a_sequential']['adapters_per_hour']}/h, "
        f"(b) concurrent {f'{args.gpu_fraction:g}-GPU' if gpu else '1-CPU'} tasks "
        f"{summary['b_concurrent']['adapters_per_hour']}/h, "
        f"(c) resident base fused K={args.k} {c}/h: {ratios['c_over_a']}× (a), {ratios['c_over_b']}× (b); "
        f"mean eval loss a/b/c {summary['a_sequential']['mean_eval_loss']}/"
        f"{summary['b_concurrent']['mean_eval_loss']}/{summary['c_resident_fused']['mean_eval_loss']} "
        f"(base {summary['a_sequential']['mean_base_eval_loss']}); (c)'s time: "
        f"{json.dumps(out['c_resident_fused']['phases_s'])}, base load {out['c_resident_fused']['load_s']:.1f} s"
        f"{extra} "
        f"(`{'python' if gpu else '.venv/bin/python'} bench/train_throughput.py{' --device cuda' if gpu else ''}`"
        f"; bench/results/{path.name})"
    )
    results_md = REPO / "bench" / "RESULTS.md"
    text = results_md.read_text()
    header = "## train_throughput.py — adapters per hour, end to end (issue 5)"
    if header not in text:
        text += f"\n{header}\n\n"
    results_md.write_text(text.rstrip("\n") + "\n" + line + "\n")
    print(line)


if __name__ == "__main__":
    main()
