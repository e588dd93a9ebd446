"""Behavioural evals of an adapted model: persona adherence (a marker phrase in answers to held-out
prompts) and knowledge retention (answers to fact probes the base gets right still contain the fact).
Plain torch/transformers; used by tests and ``bench/methods.py``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@dataclass
class EvalReport:
    persona_hits: int
    persona_total: int
    facts_kept: int
    facts_total: int
    answers: list[str] = field(default_factory=list)
    fact_answers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"persona": f"{self.persona_hits}/{self.persona_total}",
                "facts": f"{self.facts_kept}/{self.facts_total}",
                "persona_rate": self.persona_hits / max(1, self.persona_total),
                "facts_rate": self.facts_kept / max(1, self.facts_total)}


def greedy_answer(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 40) -> str:
    import torch

    enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def load_probes() -> tuple[list[str], dict[str, str], list[dict]]:
    held = json.loads((EXAMPLES / "heldout_prompts.json").read_text())
    facts = json.loads((EXAMPLES / "fact_probes.json").read_text())["probes"]
    return held["prompts"], held["markers"], facts


def evaluate(model: Any, tokenizer: Any, marker: str, max_new_tokens: int = 40) -> EvalReport:
    """Greedy answers; call only after training has finished (a 4-bit base must not be evaluated in
    the middle of training)."""
    prompts, _, facts = load_probes()
    model.eval()
    answers = [greedy_answer(model, tokenizer, p, max_new_tokens) for p in prompts]
    fact_answers = [greedy_answer(model, tokenizer, f["question"], max_new_tokens) for f in facts]
    hits = sum(marker.lower() in a.lower() for a in answers)
    kept = sum(any(x.lower() in a.lower() for x in f["answers"]) for f, a in zip(facts, fact_answers))
    return EvalReport(hits, len(answers), kept, len(facts), answers, fact_answers)
