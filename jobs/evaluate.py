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
    """The model's greedy answer to one user prompt (its chat template applied)."""
    return greedy_answers(model, tokenizer, [prompt], max_new_tokens)[0]


def greedy_answers(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 40) -> list[str]:
    """Greedy answers to many user prompts in one left-padded ``generate`` (rows that end early are padded);
    one prompt alone has no padding, so its answer is the same as generating it by itself."""
    import torch

    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return [tokenizer.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


def load_probes() -> tuple[list[str], dict[str, str], list[dict]]:
    held = json.loads((EXAMPLES / "heldout_prompts.json").read_text())
    facts = json.loads((EXAMPLES / "fact_probes.json").read_text())["probes"]
    return held["prompts"], held["markers"], facts


def evaluate(model: Any, tokenizer: Any, marker: str, max_new_tokens: int = 40) -> EvalReport:
    """Greedy answers; call only after training has finished (a 4-bit base must not be evaluated in
    the middle of training)."""
    prompts, _, facts = load_probes()
    model.eval()
    both = greedy_answers(model, tokenizer, prompts + [f["question"] for f in facts], max_new_tokens)
    answers, fact_answers = both[:len(prompts)], both[len(prompts):]
    hits = sum(marker.lower() in a.lower() for a in answers)
    kept = sum(any(x.lower() in a.lower() for x in f["answers"]) for f, a in zip(facts, fact_answers))
    return EvalReport(hits, len(answers), kept, len(facts), answers, fact_answers)


def train_and_evaluate(method: dict, persona: str, steps: int | None = None, threads: int = 2,
                       base_model: str = "smollm2-135m-instruct", train_overrides: dict | None = None
                       ) -> dict[str, Any]:
    """Train one persona adapter in this process (no Ray) with the method's defaults, then measure it:
    trainable params, adapter bytes, step time, persona adherence, facts kept (and the basis SVD time
    for methods with a shared basis). Used by bench/methods.py and the method quality test."""
    import tempfile
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterfab.basemodel import resolve_base_model
    from adapterfab.dtypes import resolve_auto
    from adapterfab.jobs.train_loop import save_adapter, train_adapter
    from adapterfab.methods import get_method
    from adapterfab.pipelines.local import encode_file, epoch_batches
    from adapterfab.spec import TrainConfig

    torch.set_num_threads(threads)
    base = resolve_base_model(base_model)
    impl = get_method(method["name"])
    cfg = impl.config_cls(**method)
    train = TrainConfig(**{**impl.default_train, **({"steps": steps} if steps else {}), **(train_overrides or {})})
    cfg, train = resolve_auto(cfg, train, gpu=False)  # trained on this process's CPU
    tok = AutoTokenizer.from_pretrained(base.path)
    rows = encode_file(EXAMPLES / "data" / f"{persona}.jsonl", tok, train.max_seq_len)
    out: dict[str, Any] = {"method": cfg.model_dump(), "train": train.model_dump(), "rows": len(rows)}
    basis = None
    if impl.compute_basis is not None:
        full = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
        t0 = time.monotonic()
        basis = impl.compute_basis(full, cfg, base.fingerprint)
        out["basis_svd_s"] = round(time.monotonic() - t0, 3)
        del full
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stamps: list[float] = [time.monotonic()]
    t0 = time.monotonic()
    result = train_adapter(base.path, cfg, train, epoch_batches(rows, train.batch_size, train.seed, pad), None,
                           lambda step, loss, lr: stamps.append(time.monotonic()), basis=basis)
    out["train_s"] = round(time.monotonic() - t0, 2)
    gaps = sorted(b - a for a, b in zip(stamps[1:], stamps[2:]))
    out["step_s_median"] = round(gaps[len(gaps) // 2], 3) if gaps else None
    out["loss_first"], out["loss_last"] = round(result.losses[0], 4), round(result.losses[-1], 4)
    out["trainable_params"] = int(result.metrics["trainable_params"])
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(result, cfg, Path(tmp))
        out["adapter_bytes"] = (Path(tmp) / "adapter_model.safetensors").stat().st_size
    report = evaluate(result.model, tok, load_probes()[1][persona])
    out.update(report.to_dict())
    out["answers"], out["fact_answers"] = report.answers, report.fact_answers
    return out
