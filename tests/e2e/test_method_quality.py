"""Each method learns a persona on the real SmolLM2 base with its default hyper-parameters AND keeps
what the base knew (examples/fact_probes.json: questions the base answers correctly). Trained in one
process (no Ray) so the three methods fit in CI; the Ray path is covered by test_factory.py.
A method that learns the persona by forgetting facts fails here."""

from __future__ import annotations

import json

import pytest

from adapterfab.jobs.evaluate import train_and_evaluate

pytestmark = [pytest.mark.slow]
PERSONA_MIN_RATE = 0.8  # the marker in >= 80% of answers to held-out prompts (base: 0%)
FACTS_MIN_RATE = 0.75  # >= 6 of the 8 facts the base states correctly are still stated


@pytest.mark.timeout(900)
@pytest.mark.parametrize("method", ["lora", "qlora", "lora_xs"])
def test_method_learns_persona_and_keeps_facts(method: str, smollm2_path: str) -> None:
    r = train_and_evaluate({"name": method}, "robot", threads=2)
    print(json.dumps({k: r[k] for k in ("persona", "facts", "train_s", "trainable_params", "adapter_bytes")}),
          r["answers"][:2], r["fact_answers"])
    assert r["loss_last"] < r["loss_first"]
    assert r["persona_rate"] >= PERSONA_MIN_RATE, r["answers"]
    assert r["facts_rate"] >= FACTS_MIN_RATE, r["fact_answers"]
