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
    .venv/bin/python bench/retention_fused.py --method lora_xs --basis minor
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

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
    ap.add_argument("--basis", choices=("top", "minor", "random"), default="top",
                    help="study, LoRA-XS: the frozen basis from the top r singular directions (the method's), "
                         "the r minor ones or random orthonormal ones, both at the top r singular values")
    args = ap.parse_args()
    if args.basis != "top":
        if args.method != "lora_xs":
            ap.error("--basis is a LoRA-XS setting: use it with --method lora_xs")
        _study_basis(args.basis)

    personas = [(p["name"], REPO / "examples" / p["dataset"])
                for p in json.loads((REPO / "examples/quality_personas.json").read_text())["personas"]]
    cache = Path(tempfile.gettempdir()) / "adapterfab-retention-bench"  # the base's answers, once per base and dtype
    over = json.loads(args.train) | ({"replay_weight": args.replay} if args.replay is not None else {})
    _, res, cfg, train, wall_s = train_personas(args.method, {"replay_per_step": args.per_step, **over},
                                                json.loads(args.config), personas, args.threads, args.base_model,
                                                cache)
    from factory_throughput import machine  # the CPU's model and AVX-512, as the other benches

    out = {"date": time.strftime("%Y-%m-%d"), "machine": machine(os.cpu_count() or 1),
           "method": args.method, **({"basis": args.basis} if args.method == "lora_xs" else {}),
           "config": cfg.model_dump(), "train": train.model_dump(), "threads": args.threads,
           "group_train_s": round(res.timing["train_s"], 2), "wall_s": round(wall_s, 2), "jobs": {}}
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


def _study_basis(kind: str) -> None:
    """LoRA-XS's basis from other directions than the method's top r (``_svd_factors``), for this process:
    A = V' Σ_r, B = U'ᵀ with V', U' the r minor singular vectors (as MiLoRA does for LoRA) or random
    orthonormal ones, Σ_r the top r singular values, so that R's steps move the output by as much. The
    random directions are drawn from one seed for every module: modules of one shape share them."""
    import torch

    from adapterfab.methods import lora_xs

    def factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
        if kind == "minor":
            u, vh = lora_xs.canonical_signs(u[:, -r:], vh[-r:])
        else:
            g = torch.Generator().manual_seed(0)
            vh = torch.linalg.qr(torch.randn(weight.shape[1], r, generator=g))[0].T
            u = torch.linalg.qr(torch.randn(weight.shape[0], r, generator=g))[0]
        return (vh.T * s[:r]).contiguous(), u.T.contiguous()

    lora_xs._svd_factors = factors


def train_personas(method: str, train_over: dict[str, Any], config_over: dict[str, Any],
                   personas: list[tuple[str, Path]], threads: int, base_model: str, cache: Path) -> tuple[Any, ...]:
    """``personas`` ((name, JSONL file)) as one fused group on the product's resident trainer, each job
    with ``method``'s defaults under ``config_over`` and ``train_over`` and measured on the shipped probes
    (the base's answers cached in ``cache``): (the trainer, its ``GroupResult``, method config, train
    config, the group's seconds)."""
    import torch
    from transformers import AutoModelForCausalLM

    from adapterfab import retention
    from adapterfab.basemodel import pad_token_id, resolve_base_model
    from adapterfab.dtypes import resolve_auto
    from adapterfab.jobs.resident import GroupJob, GroupTask, ResidentWorker
    from adapterfab.methods import get_method
    from adapterfab.pipelines.local import encode_file, split_rows
    from adapterfab.spec import TrainConfig

    torch.set_num_threads(threads)
    base = resolve_base_model(base_model)
    impl = get_method(method)
    cfg, train = resolve_auto(impl.config_cls(**{**config_over, "name": method}),
                              TrainConfig(**{**impl.default_train, **train_over}), gpu=False)
    basis = None
    if impl.compute_basis:
        full = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
        basis = impl.compute_basis(full, cfg, base.fingerprint)
        del full
    worker = ResidentWorker(base.path, cfg.model_dump(), dtype=train.dtype, torch_threads=threads, basis=basis)
    tok = worker.tokenizer
    group = []
    for name, path in personas:
        tr, ev = split_rows(encode_file(path, tok, train.max_seq_len), train.eval_fraction, None)
        group.append(GroupJob(name, cfg.model_dump(), train.model_dump(), tr, ev, probes=retention.job_probes()))
    t0 = time.monotonic()
    res = worker.train_group(GroupTask("bench", group, pad_token_id(tok), probe_cache=str(cache)))
    return worker, res, cfg, train, time.monotonic() - t0


if __name__ == "__main__":
    raise SystemExit(main())
