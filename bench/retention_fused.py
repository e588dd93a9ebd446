"""Retention of each method's defaults as the product measures it, with and without replay.

The three personas of examples/quality_personas.json (a fixed phrase, a speaking style, a product's facts)
train as one fused group on a resident trainer (jobs/resident.py ``train_group``: the trainer `submit`
runs, without Ray), each with the method's defaults and ``--replay`` as ``train.replay_weight``; every job
is measured on the shipped probes as in the product (teacher-forced, against the base's own answers).
Prints and appends to bench/results/retention_fused.jsonl: retention per persona and the group's
training seconds, to set the replay weight against its cost. Adherence (generation) is bench/methods.py's.

    .venv/bin/python bench/retention_fused.py --method lora --replay 5
    .venv/bin/python bench/retention_fused.py --method lora_xs --replay 0 --threads 2
    .venv/bin/python bench/retention_fused.py --method lora_xs --config '{"r": 32, "alpha": 32}' --replay 3
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="lora")
    ap.add_argument("--replay", type=float, default=None, help="train.replay_weight (default: the method's)")
    ap.add_argument("--per-step", type=int, default=1, help="train.replay_per_step")
    ap.add_argument("--train", default="{}", help="JSON: train settings over the method's defaults")
    ap.add_argument("--config", default="{}", help="JSON: method settings over its defaults (r, alpha, target_modules)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base-model", default="smollm2-135m-instruct")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from adapterfab import retention
    from adapterfab.basemodel import pad_token_id, resolve_base_model
    from adapterfab.dtypes import resolve_auto
    from adapterfab.jobs.resident import GroupJob, GroupTask, ResidentWorker
    from adapterfab.methods import get_method
    from adapterfab.pipelines.local import encode_file, split_rows
    from adapterfab.spec import TrainConfig

    base = resolve_base_model(args.base_model)
    impl = get_method(args.method)
    cfg = impl.config_cls(**{**json.loads(args.config), "name": args.method})
    over = json.loads(args.train) | ({"replay_weight": args.replay} if args.replay is not None else {})
    train = TrainConfig(**{**impl.default_train, "replay_per_step": args.per_step, **over})
    cfg, train = resolve_auto(cfg, train, gpu=False)
    basis = None
    if impl.compute_basis:
        full = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
        basis = impl.compute_basis(full, cfg, base.fingerprint)
        del full
    worker = ResidentWorker(base.path, cfg.model_dump(), dtype=train.dtype, torch_threads=args.threads, basis=basis)
    tok = worker.tokenizer
    pad = pad_token_id(tok)
    group = []
    for p in json.loads((REPO / "examples/quality_personas.json").read_text())["personas"]:
        tr, ev = split_rows(
            encode_file(REPO / "examples" / p["dataset"], tok, train.max_seq_len), train.eval_fraction, None
        )
        group.append(GroupJob(p["name"], cfg.model_dump(), train.model_dump(), tr, ev, probes=retention.job_probes()))
    cache = Path(tempfile.gettempdir()) / "adapterfab-retention-bench"  # the base's answers, once per base and dtype
    t0 = time.monotonic()
    res = worker.train_group(GroupTask("bench", group, pad, probe_cache=str(cache)))
    from factory_throughput import machine  # the CPU's model and AVX-512, as the other benches

    out = {"date": time.strftime("%Y-%m-%d"), "machine": machine(os.cpu_count() or 1),
           "method": args.method, "config": cfg.model_dump(), "train": train.model_dump(), "threads": args.threads,
           "group_train_s": round(res.timing["train_s"], 2), "wall_s": round(time.monotonic() - t0, 2), "jobs": {}}
    for o in res.outcomes:
        m = o.metrics
        out["jobs"][o.job_id] = {
            k: m.get(k)
            for k in (
                "retention",
                "retention_kept",
                "retention_known",
                "eval_loss",
                "base_eval_loss",
                "train_loss",
                "replay_loss",
            )
        } | {"error": o.error}
    print(json.dumps(out, indent=1))
    with open(REPO / "bench" / "results" / "retention_fused.jsonl", "a") as f:
        f.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
