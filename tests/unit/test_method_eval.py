"""jobs/evaluate.train_and_evaluate, the in-process path of bench/methods.py, on the tiny random Llama:
each method trains, saves and is measured (adherence and retention counted over the shipped held-out
prompts and fact probes). Whether the real defaults learn a persona and keep what the base knew is
asserted on the trained, served adapters in tests/e2e/test_factory.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterfab.jobs.evaluate import EXAMPLES, train_and_evaluate


@pytest.mark.parametrize("method", ["lora", "qlora", "lora_xs"])
def test_train_and_evaluate_measures_a_method(method: str, tiny_model_path: str) -> None:
    r = train_and_evaluate({"name": method}, "robot", steps=2, threads=1, base_model=tiny_model_path,
                           train_overrides={"max_seq_len": 64, "batch_size": 2})
    held = json.loads((Path(EXAMPLES) / "heldout_prompts.json").read_text())["prompts"]
    facts = json.loads((Path(EXAMPLES) / "fact_probes.json").read_text())["probes"]
    assert r["train"]["steps"] == 2 and r["rows"] > 0 and r["trainable_params"] > 0 and r["adapter_bytes"] > 0
    assert len(r["answers"]) == len(held) and len(r["fact_answers"]) == len(facts)
    assert r["persona"] == f"{round(r['persona_rate'] * len(held))}/{len(held)}"
    assert 0 <= r["facts_rate"] <= 1 and r["train_s"] > 0
    assert ("basis_svd_s" in r) == (method == "lora_xs")  # only LoRA-XS computes a shared basis
