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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PERSONAS = ["pirate", "butler", "robot"]


def one_job(base_path: str, method: dict, job: dict, out_root: str, threads: int) -> dict:
    """A whole job in its own task: load the base, read + tokenize, train, eval, save."""
    import torch

    from adapterfab.jobs.train_loop import load_base, save_adapter, train_adapter
    from adapterfab.methods import get_method
    from adapterfab.pipelines.local import encode_file, epoch_batches
    from adapterfab.spec import TrainConfig
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    t0 = time.monotonic()
    cfg = get_method(method["name"]).config_cls(**method)
    train = TrainConfig(**job["train"])
    tok = AutoTokenizer.from_pretrained(base_path)
    base = load_base(base_path, train.dtype, cfg)
    rows = encode_file(job["dataset"], tok, train.max_seq_len)
    n_eval = max(1, int(len(rows) * train.eval_fraction))
    tr, ev = rows[:-n_eval], rows[-n_eval:]
    pad = tok.pad_token_id
    res = train_adapter(base_path, cfg, train, epoch_batches(tr, train.batch_size, train.seed, pad),
                        lambda: list(epoch_batches(ev, train.batch_size, 0, pad)(0)), model=base)
    save_adapter(res, cfg, Path(out_root) / job["job_id"])
    return {"job_id": job["job_id"], "metrics": res.metrics, "wall_s": time.monotonic() - t0}


def make_jobs(n: int, steps: int, batch_size: int, seq: int) -> list[dict]:
    return [{"job_id": f"job{i:03d}-{PERSONAS[i % 3]}", "dataset": str(REPO / f"examples/data/{PERSONAS[i % 3]}.jsonl"),
             "train": {"steps": steps, "batch_size": batch_size, "max_seq_len": seq, "learning_rate": 1e-3,
                       "dtype": "float32", "seed": i, "eval_fraction": 0.1}} for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="jobs fused per step in (c)")
    ap.add_argument("--quick", action="store_true", help="smoke run: no result file")
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    import torch

    from adapterfab.basemodel import resolve_base_model
    from adapterfab.jobs.resident import resident_actor

    base = resolve_base_model("smollm2-135m-instruct").path
    method = {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    jobs = make_jobs(args.jobs, args.steps, args.batch_size, args.seq)
    cpus = os.cpu_count() or 2
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    task = ray.remote(one_job)
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="af-bench-") as tmp:
        t0 = time.monotonic()
        seq = [ray.get(task.options(num_cpus=cpus).remote(base, method, j, f"{tmp}/a", cpus)) for j in jobs]
        out["a_sequential"] = {"wall_s": time.monotonic() - t0, "jobs": seq}
        print(f"(a) sequential tasks: {out['a_sequential']['wall_s']:.1f}s", flush=True)

        t0 = time.monotonic()
        conc = ray.get([task.options(num_cpus=1).remote(base, method, j, f"{tmp}/b", 1) for j in jobs])
        out["b_concurrent"] = {"wall_s": time.monotonic() - t0, "jobs": conc, "cpus_per_task": 1}
        print(f"(b) concurrent tasks (1 CPU each): {out['b_concurrent']['wall_s']:.1f}s", flush=True)

        t0 = time.monotonic()
        worker = resident_actor().options(num_cpus=cpus).remote(base, method, "float32", cpus)
        fused: list = []
        for i in range(0, len(jobs), args.k):
            fused += ray.get(worker.train.remote(jobs[i:i + args.k], f"{tmp}/c"))
        out["c_resident_fused"] = {"wall_s": time.monotonic() - t0, "jobs": fused, "k": args.k,
                                   "load_s": ray.get(worker.stats.remote())["load_s"]}
        print(f"(c) resident base, fused K={args.k}: {out['c_resident_fused']['wall_s']:.1f}s", flush=True)
        assert all(j["error"] is None and Path(j["adapter_dir"], "adapter_model.safetensors").exists()
                   for j in fused), fused
    ray.shutdown()

    summary = {}
    for key, res in out.items():
        evals = [j["metrics"]["eval_loss"] for j in res["jobs"]]
        bases = [j["metrics"]["base_eval_loss"] for j in res["jobs"]]
        summary[key] = {"wall_s": round(res["wall_s"], 2),
                        "adapters_per_hour": round(3600 * len(jobs) / res["wall_s"], 1),
                        "mean_eval_loss": round(sum(evals) / len(evals), 4),
                        "mean_base_eval_loss": round(sum(bases) / len(bases), 4),
                        "all_beat_base": all(e < b for e, b in zip(evals, bases))}
    c = summary["c_resident_fused"]["adapters_per_hour"]
    ratios = {"c_over_a": round(c / summary["a_sequential"]["adapters_per_hour"], 2),
              "c_over_b": round(c / summary["b_concurrent"]["adapters_per_hour"], 2)}
    print(json.dumps({"summary": summary, "ratios": ratios}, indent=1))
    if args.quick:
        return
    device = "cpu"
    machine = f"{platform.machine()} {cpus} CPU, {torch.__version__}, CPU only"
    stamp = time.strftime("%Y-%m-%d")
    result = {"date": stamp, "machine": machine, "device": device, "base": "SmolLM2-135M-Instruct",
              "method": method, "jobs": len(jobs), "steps": args.steps, "batch_size": args.batch_size,
              "max_seq_len": args.seq, "k": args.k, "summary": summary, "ratios": ratios,
              "raw": {k: {kk: vv for kk, vv in v.items() if kk != "jobs"} for k, v in out.items()}}
    path = REPO / "bench" / "results" / f"train_throughput-{device}-{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    line = (f"- {stamp} · train_throughput.py · {machine} · SmolLM2-135M LoRA r8 q,v, {len(jobs)} jobs × "
            f"{args.steps} steps × {args.batch_size} rows × ≤{args.seq} tokens, end to end without registry · "
            f"(a) sequential tasks {summary['a_sequential']['adapters_per_hour']}/h, "
            f"(b) concurrent 1-CPU tasks {summary['b_concurrent']['adapters_per_hour']}/h, "
            f"(c) resident base fused K={args.k} {c}/h: {ratios['c_over_a']}× (a), {ratios['c_over_b']}× (b); "
            f"mean eval loss a/b/c {summary['a_sequential']['mean_eval_loss']}/"
            f"{summary['b_concurrent']['mean_eval_loss']}/{summary['c_resident_fused']['mean_eval_loss']} "
            f"(base {summary['a_sequential']['mean_base_eval_loss']}) "
            f"(`.venv/bin/python bench/train_throughput.py`; bench/results/{path.name})")
    results_md = REPO / "bench" / "RESULTS.md"
    text = results_md.read_text()
    header = "## train_throughput.py — adapters per hour, end to end (issue 5)"
    if header not in text:
        text += f"\n{header}\n\n"
    results_md.write_text(text.rstrip("\n") + "\n" + line + "\n")
    print(line)


if __name__ == "__main__":
    main()
