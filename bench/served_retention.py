"""One persona trained with a method's defaults on the product's resident trainer, then asked as the server
asks it: the full-precision base with the adapter, greedy. Reports, next to the job's own retention (measured
in training, on the base the method trains on: 4-bit NF4 for qlora), the facts kept when served: the 8 of
examples/fact_probes.json (the e2e test's served check) and the 65 shipped retention probes, and the
persona's marker on the held-out prompts. Appends to bench/results/served_retention.jsonl.

    .venv/bin/python bench/served_retention.py --method qlora --replay 2
    .venv/bin/python bench/served_retention.py --method qlora --train '{"learning_rate": 2e-4}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="qlora")
    ap.add_argument("--replay", type=float, default=None, help="train.replay_weight (default: the method's)")
    ap.add_argument("--train", default="{}", help="JSON: train settings over the method's defaults")
    ap.add_argument("--config", default="{}", help="JSON: method settings over its defaults (r, target_modules, ...)")
    ap.add_argument("--persona", default="robot", help="examples/data/<persona>.jsonl, marker from heldout_prompts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/tmp/adapterfab-served-retention")
    args = ap.parse_args()

    import torch
    from peft import PeftModel
    from retention_fused import train_personas
    from transformers import AutoModelForCausalLM

    from adapterfab import retention
    from adapterfab.jobs.evaluate import states_fact
    from adapterfab.jobs.fused import write_exported
    from adapterfab.textgen import greedy_in_batches

    over = json.loads(args.train) | ({"replay_weight": args.replay} if args.replay is not None else {})
    config = json.loads(args.config)
    worker, res, _, train, train_s = train_personas(
        args.method, over, config, [(args.persona, REPO / "examples/data" / f"{args.persona}.jsonl")], args.threads,
        "smollm2-135m-instruct", Path(args.out) / "cache")
    base_path, tok = worker.base_path, worker.tokenizer  # the base as train_personas resolved it
    outcome = res.outcomes[0]
    if outcome.error:
        raise SystemExit(outcome.error)
    folder = write_exported(outcome.adapter, Path(args.out) / f"{args.method}-{int(time.time())}")
    del worker

    full = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    facts = json.loads((REPO / "examples/fact_probes.json").read_text())["probes"]
    probes = retention.shipped_probes()
    heldout = json.loads((REPO / "examples/heldout_prompts.json").read_text())
    questions = [f["question"] for f in facts] + [p["question"] for p in probes]
    base_said = greedy_in_batches(full, tok, questions)
    said = greedy_in_batches(PeftModel.from_pretrained(full, str(folder)).eval(), tok, questions + heldout["prompts"])
    marker = heldout["markers"][args.persona].lower()

    def kept(of: list[dict], base_answers: list[str], answers: list[str]) -> tuple[int, int]:
        known = [states_fact(b, p["answers"]) for b, p in zip(base_answers, of)]
        return sum(k and states_fact(a, p["answers"]) for k, a, p in zip(known, answers, of)), sum(known)

    from factory_throughput import machine

    n = len(facts)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": machine(args.threads), "method": args.method,
           "config": config, "persona": args.persona, "train": train.model_dump(), "train_s": round(train_s, 1),
           "retention_in_training": outcome.metrics.get("retention"),
           "served_facts8": kept(facts, base_said[:n], said[:n]),
           "served_probes": kept(probes, base_said[n:], said[n:len(questions)]),
           "heldout_marker": sum(marker in a.lower() for a in said[len(questions):])}
    print(json.dumps(out))
    with open(REPO / "bench/results/served_retention.jsonl", "a") as f:
        f.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
