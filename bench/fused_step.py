"""The fused training step alone, against plain PEFT on the same rows, in one run (no Ray, no data
pipeline, no bitsandbytes: torch, transformers and peft only, so it runs on a bare GPU machine too).

The end-to-end figure (bench/train_throughput.py) mixes the step with data, eval, saving and
Ray. This isolates the step: K jobs x ``--rows`` rows x ``--seq`` tokens of random ids (labels on the
second half of each row, like an assistant turn) through

  peft   ONE PEFT LoRA adapter over all K x rows rows, one AdamW: the compute-equivalent of K fused
         jobs with none of the per-job bookkeeping (plain PEFT on a GPU trains that job at ~3,750-3,850
         adapters/hour for K=4-8 with gradient checkpointing, the project's reference figure; this
         baseline runs without it)
  fused  ``jobs/fused.py`` FusedTrainer with K adapters: each job's rows through its own adapter, its
         own loss, optimizer, schedule and clipping
  fused1 FusedTrainer with one job of ``--rows`` rows (how the step scales with K)

and reports ms per step, trained tokens/s, the adapters/hour a 20-step job implies (step time only),
model FLOP utilisation (4 x params x tokens / time / --peak-tflops, as train_throughput.py) and peak
memory, with ``fused / peft`` as the ratio that matters: it is what the multi-adapter machinery costs.
``--profile`` adds torch.profiler tables of both steps. Writes bench/results/fused_step-<device>-<date>.json
and a line in bench/RESULTS.md.

    .venv/bin/python bench/fused_step.py                       # CPU: SmolLM2-135M shape, fp32
    python bench/fused_step.py --device cuda --shape gpu       # GPU: the standard 0.96B shape, bf16
    .venv/bin/python bench/fused_step.py --shape host --k 16   # host cost of a step of the GPU job's layers
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPES = {  # hidden, MLP, layers, heads / KV heads; vocabulary 49,152 (the SmolLM2 tokenizer's) unless given
    "smollm2": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "max_position_embeddings": 2048, "tie_word_embeddings": True},
    "gpu": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 16,
            "num_key_value_heads": 8, "max_position_embeddings": 2048},  # bench/train_throughput.py GPU_SHAPE
    # the GPU job's structure (16 layers x 7 adapted modules) at sizes whose compute is negligible: the
    # step time is then what the host spends issuing the step's operations (one thread, as the one Python
    # thread that feeds a GPU), the part of a GPU step that no GPU makes faster
    "host": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 16, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 512, "vocab_size": 1024},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 512, "vocab_size": 1024},  # smoke tests
}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_base(shape: str, dtype, device: str):  # noqa: ANN001, ANN201
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{"vocab_size": 49152, **SHAPES[shape]})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.config.use_cache = False
    return model


def batches(k: int, rows: int, seq: int, vocab: int, seed: int) -> list[dict]:
    """Each job's micro-batches: random ids, labels on the second half of every row."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        ids = torch.randint(10, vocab, (rows, seq), generator=g)
        labels = ids.clone()
        labels[:, : seq // 2] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_mb() -> float | None:
    """Peak CUDA memory since ``reset_peak`` (None on CPU), as the training loop records it."""
    from adapterfab.jobs.train_loop import peak_memory_mb

    gpu = peak_memory_mb().get("system_peak_gpu_mem_mb")
    return round(gpu, 1) if gpu is not None else None


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_peft(args: argparse.Namespace, dtype, targets: list[str]) -> dict:  # noqa: ANN001
    """One PEFT adapter over the K jobs' stacked rows."""
    import torch
    from peft import LoraConfig, get_peft_model

    base = make_base(args.shape, dtype, args.device)
    model = get_peft_model(base, LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                            target_modules=targets, task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    parts = batches(args.k, args.rows, args.seq, base.config.vocab_size, 0)
    ids = torch.cat([b["input_ids"] for b in parts]).to(args.device)
    labels = torch.cat([b["labels"] for b in parts]).to(args.device)

    def step() -> None:
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync(args.device)
    reset_peak(args.device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(args.device)
    out = {"step_s": (time.perf_counter() - t0) / args.steps, "peak_mb": peak_mb(),
           "rows": int(ids.shape[0]), "label_tokens": int((labels[:, 1:] != -100).sum())}
    if args.profile:
        out["profile"] = profile(step, args.device)
    return out  # the model goes with this frame, before the next variant builds its own


def run_fused(args: argparse.Namespace, dtype, targets: list[str], k: int) -> dict:  # noqa: ANN001
    """FusedTrainer with ``k`` jobs of ``--rows`` rows each (every job its own adapter and optimizer)."""
    from adapterfab.jobs.fused import FusedJob, FusedTrainer
    from adapterfab.methods import get_method
    from adapterfab.spec import TrainConfig

    base = make_base(args.shape, dtype, args.device)
    trainer = FusedTrainer(base, "lora", targets, args.r)
    method = get_method("lora").config_cls(name="lora", r=args.r, alpha=2 * args.r, dropout=0.0,
                                           target_modules=targets)
    parts = batches(k, args.rows, args.seq, base.config.vocab_size, 0)

    def jobs(tag: str, steps: int) -> list:
        return [FusedJob(f"{tag}{i}", method, TrainConfig(steps=steps, batch_size=args.rows, learning_rate=1e-4,
                                                           seed=i, log_every_steps=1000),
                         lambda epoch, b=b: itertools.repeat(b)) for i, b in enumerate(parts)]

    def train(tag: str, steps: int) -> float:
        group = jobs(tag, steps)
        res = trainer.train(group)  # train_s: the fused loop, which reads every step's losses (a sync)
        for j in group:
            trainer.remove(j.job_id)
        assert all(r.error is None for r in res), [r.error for r in res]
        return res[0].metrics["train_s"]

    train("warm", args.warmup)
    sync(args.device)
    reset_peak(args.device)
    out = {"step_s": train("timed", args.steps) / args.steps, "peak_mb": peak_mb(),
           "rows": k * args.rows, "label_tokens": sum(int((b["labels"][:, 1:] != -100).sum()) for b in parts)}
    if args.profile:  # one step of the trainer's own loop (adapters added and evaluated-less finish included)
        out["profile"] = profile(lambda: train("prof", 1), args.device)
    return out


def profile(fn, device: str, rows: int = 25) -> str:  # noqa: ANN001
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    cuda = device.startswith("cuda")
    with prof(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as p:
        fn()
        sync(device)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return p.key_averages().table(sort_by=key, row_limit=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: smollm2 on CPU, gpu on CUDA")
    ap.add_argument("--k", type=int, default=8, help="jobs fused per step")
    ap.add_argument("--rows", type=int, default=4, help="rows per job and step")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (default 128 on CPU, 512 on CUDA)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--targets", choices=["all-linear", "qv"], default="all-linear")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on CPU, 20 on CUDA)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for MFU")
    ap.add_argument("--profile", action="store_true", help="add torch.profiler tables of one step of each")
    ap.add_argument("--quick", action="store_true", help="smoke run: no result file")
    args = ap.parse_args()

    import torch

    cuda = args.device.startswith("cuda")
    args.shape = args.shape or ("gpu" if cuda else "smollm2")
    host = args.shape == "host"
    args.seq = args.seq or (512 if cuda else 16 if host else 128)
    args.steps = args.steps or (20 if cuda or host else 5)
    dtype = torch.bfloat16 if cuda else torch.float32
    if not cuda:
        torch.set_num_threads(1 if host else os.cpu_count() or 1)
    targets = ALL_LINEAR if args.targets == "all-linear" else ["q_proj", "v_proj"]
    n_params = sum(p.numel() for p in make_base(args.shape, dtype, "meta").parameters())

    res = {"peft": run_peft(args, dtype, targets)}
    print(f"peft:   {res['peft']['step_s'] * 1000:.1f} ms/step", flush=True)
    res["fused"] = run_fused(args, dtype, targets, args.k)
    print(f"fused:  {res['fused']['step_s'] * 1000:.1f} ms/step", flush=True)
    res["fused1"] = run_fused(args, dtype, targets, 1)
    print(f"fused1: {res['fused1']['step_s'] * 1000:.1f} ms/step", flush=True)
    for r in res.values():
        tokens = r["rows"] * args.seq
        jobs = r["rows"] / args.rows
        r["tokens_per_s"] = round(tokens / r["step_s"], 1)
        r["adapters_per_hour_step_only"] = round(3600 * jobs / (20 * r["step_s"]), 1)  # a 20-step job
        r["mfu"] = round(4 * n_params * tokens / r["step_s"] / (args.peak_tflops * 1e12), 4) if cuda else None
        r["step_ms"] = round(r.pop("step_s") * 1000, 2)
    ratios = {"fused_over_peft_time": round(res["fused"]["step_ms"] / res["peft"]["step_ms"], 3),
              "fused_k_over_fused1_throughput": round(res["fused"]["tokens_per_s"] / res["fused1"]["tokens_per_s"], 2)}
    tables = {k: r.pop("profile") for k, r in res.items() if "profile" in r}
    print(json.dumps({"results": res, "ratios": ratios}, indent=1))
    for k, t in tables.items():
        print(f"--- profile: {k}\n{t}")
    if args.quick:
        return
    stamp = time.strftime("%Y-%m-%d")
    device = "cuda" if cuda else "cpu"
    machine = (f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}" if cuda else
               f"{platform.machine()} {os.cpu_count()} CPU, torch {torch.__version__}, CPU only")
    result = {"date": stamp, "machine": machine, "shape": {args.shape: SHAPES[args.shape]}, "params": n_params,
              "dtype": str(dtype).removeprefix("torch."), "k": args.k, "rows": args.rows, "seq": args.seq,
              "r": args.r, "targets": targets, "steps": args.steps, "results": res, "ratios": ratios}
    default_shape = args.shape == ("gpu" if cuda else "smollm2")
    path = (
        REPO
        / "bench"
        / "results"
        / f"fused_step-{device}-{'' if default_shape else args.shape + '-'}{'' if args.k == 8 else f'k{args.k}-'}"
        f"{stamp}.json"
    )
    path.write_text(json.dumps(result, indent=1))
    if tables:
        path.with_suffix(".profile.txt").write_text("\n".join(f"--- {k}\n{t}" for k, t in tables.items()))

    def fig(name: str) -> str:
        r = res[name]
        mfu = f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""
        peak = f", peak {r['peak_mb']:.0f} MiB" if r["peak_mb"] is not None else ""
        return (f"{name} {r['step_ms']} ms/step ({r['tokens_per_s']} tok/s, "
                f"{r['adapters_per_hour_step_only']}/h{mfu}{peak})")

    line = (f"- {stamp} · fused_step.py · {machine} · {n_params / 1e6:.0f}M Llama-shaped ({args.shape}) "
            f"{result['dtype']}, LoRA r{args.r} {args.targets}, K={args.k} × {args.rows} rows × {args.seq} tokens, "
            f"{args.steps} timed steps · {fig('peft')}; {fig('fused')}; {fig('fused1')}; fused/peft step time "
            f"{ratios['fused_over_peft_time']}× (`{'python' if cuda else '.venv/bin/python'} bench/fused_step.py"
            f"{' --device cuda' if cuda else ''}{'' if default_shape else ' --shape ' + args.shape}"
            f"{f' --k {args.k}' if args.k != 8 else ''}`; bench/results/{path.name})")
    results_md = REPO / "bench" / "RESULTS.md"
    results_md.write_text(results_md.read_text().rstrip("\n") + "\n" + line + "\n")
    print(line)


if __name__ == "__main__":
    main()
