"""Behavioural evals of an adapted model: persona adherence (a marker phrase in answers to held-out
prompts) and knowledge retention (answers to fact probes the base gets right still contain the fact).
Plain torch/transformers; used by tests and ``bench/methods.py``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterfab.basemodel import pad_token_id
from adapterfab.retention import fact_span, forced_row, prompt_ids, shipped_probes
from adapterfab.textgen import greedy_answers, greedy_in_batches, pad_rows

__all__ = ["fact_span", "prompt_ids"]  # re-exported: the benchmark and examples/make_probes.py use them here
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


def states_fact(answer: str, accepted: list[str]) -> bool:
    """Whether ``answer`` states the fact: it contains one of the ``accepted`` strings (any case) starting
    at a word; a string of at most 3 characters ("4", "Au", "100") must also end at one, so that "4" is
    not found in "40" nor "Na" in "Nations"."""
    return fact_span(answer, accepted) is not None


def adheres(answer: str, rule: dict[str, Any], i: int) -> bool:
    """Whether ``answer`` (to the persona's i-th held-out prompt) is in character: ``rule`` is a persona's
    ``adherence`` of examples/quality_personas.json (a marker phrase, a style's vocabulary, or the fact
    each prompt asks for)."""
    import re

    if rule["kind"] == "marker":
        return rule["marker"].lower() in answer.lower()
    if rule["kind"] == "lexicon":
        return any(re.search(rf"(?<![A-Za-z']){re.escape(w)}(?![A-Za-z])", answer, flags=re.IGNORECASE)
                   for w in rule["words"])
    if rule["kind"] == "facts":
        return states_fact(answer, rule["answers"][i])
    raise ValueError(f"unknown adherence rule {rule['kind']!r}")


def load_quality() -> tuple[list[dict], list[dict]]:
    """The quality benchmark's personas (examples/quality_personas.json) and retention probes
    (adapterfab/retention_probes.json)."""
    personas = json.loads((EXAMPLES / "quality_personas.json").read_text())["personas"]
    probes = shipped_probes()
    return personas, probes


@dataclass
class QualityReport:
    """A model's adherence on a persona's held-out prompts and retention of the probes the base states."""

    adherent: int
    prompts: int
    kept: int
    known: int  # probes the base itself states: retention counts these only
    answers: list[str] = field(default_factory=list)
    probe_answers: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # probes the base states and this model no longer does

    def to_dict(self) -> dict[str, Any]:
        return {"adherence": round(self.adherent / max(1, self.prompts), 4), "adherent": self.adherent,
                "prompts": self.prompts, "retention": round(self.kept / max(1, self.known), 4),
                "kept": self.kept, "known": self.known, "lost": self.lost}


def quality(model: Any, tokenizer: Any, persona: dict[str, Any], probes: list[dict], base_known: list[bool],
            max_new_tokens: int = 40, batch: int = 16) -> QualityReport:
    """Greedy answers to the persona's prompts and to every probe, in batches; retention is the share of
    the probes the base states (``base_known``) that this model still states."""
    model.eval()
    questions = persona["prompts"] + [p["question"] for p in probes]
    answers = greedy_in_batches(model, tokenizer, questions, max_new_tokens, batch=batch)
    mine, theirs = answers[:len(persona["prompts"])], answers[len(persona["prompts"]):]
    hits = sum(adheres(a, persona["adherence"], i) for i, a in enumerate(mine))
    states = [states_fact(a, p["answers"]) for a, p in zip(theirs, probes)]
    lost = [p["question"] for p, k, s in zip(probes, base_known, states) if k and not s]
    return QualityReport(hits, len(mine), sum(k and s for k, s in zip(base_known, states)), sum(base_known),
                         mine, theirs, lost)


def forced_rows(tokenizer: Any, probes: list[dict], base_answers: list[str]) -> list[dict[str, Any] | None]:
    """``adapterfab.retention.forced_row`` of each probe and the base's answer to it."""
    return [forced_row(tokenizer, p["question"], p["answers"], a) for p, a in zip(probes, base_answers)]


def forced_retention(model: Any, rows: list[dict[str, Any] | None], pad: int, batch: int = 16) -> list[bool | None]:
    """For each row of ``forced_rows``: whether the model's greedy choice is the fact at every one of the
    fact's tokens, given the base's answer before it (None where the row is None)."""
    import torch

    real = [(i, r) for i, r in enumerate(rows) if r is not None]
    out: list[bool | None] = [None] * len(rows)
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(real), batch):
        chunk = real[start:start + batch]
        ids, mask = pad_rows([r["ids"] for _, r in chunk], pad)
        with torch.no_grad():
            picks = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.argmax(-1).cpu()
        for k, (i, r) in enumerate(chunk):
            f = r["labels_from"]
            want = torch.tensor(r["ids"][f:])
            out[i] = bool((picks[k, f - 1:len(r["ids"]) - 1] == want).all())
    return out


def retention_of(peft_model: Any, tokenizer: Any, probes: list[dict], cache: str | None, base_path: str,
                 together: Any = None) -> dict[str, float]:
    """A job's retention metrics (adapterfab/retention.py) measured on a PEFT model outside the fused
    trainer (a job on several ZeRO workers): the base's answers (adapter disabled; from the answer
    cache where it has them), their rows, the base's own test of them and the adapter's, one forward
    per row, no prefix sharing. ``together``: the workers' vote (retention.base_answers), so that
    they ask the base the same questions at once."""
    import time

    from adapterfab import retention

    t0 = time.monotonic()
    answers = retention.AnswerCache.of(cache, base_path, peft_model)
    training = peft_model.training  # trained just now: dropout would make the base's answers random
    peft_model.eval()
    try:
        with peft_model.disable_adapter():
            real = [r for r in retention.probe_rows(peft_model, tokenizer, probes, answers, together) if r is not None]
        pad = pad_token_id(tokenizer)
        with peft_model.disable_adapter():
            base_ok = forced_retention(peft_model, real, pad)
        mine = forced_retention(peft_model, real, pad)
    finally:
        peft_model.train(training)
    known = [bool(m) for b, m in zip(base_ok, mine) if b]
    return retention.metrics(len(probes), len(known), sum(known), time.monotonic() - t0)


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


def train_persona(method: dict, dataset: Path, steps: int | None = None, threads: int = 2,
                  base_model: str = "smollm2-135m-instruct", train_overrides: dict | None = None,
                  retain_kl: float = 0.0) -> tuple[Any, Any, dict[str, Any]]:
    """Train one persona adapter on ``dataset`` in this process (no Ray) with the method's defaults (and
    ``train_overrides``): (the adapted model, the tokenizer, its figures: trainable params, adapter bytes,
    step time, losses, the basis SVD time for methods with a shared basis). Study options (not product
    setting): ``retain_kl`` weighs ``train_loop.retain_loss``. Replay (``train.replay_weight``) runs as a
    job's does, the base's answers asked of the model with its adapter disabled (adapterfab/replay.py)."""
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
    rows = encode_file(dataset, tok, train.max_seq_len)
    out: dict[str, Any] = {"method": cfg.model_dump(), "train": train.model_dump(), "rows": len(rows)}
    basis = None
    if impl.compute_basis is not None:
        full = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
        t0 = time.monotonic()
        basis = impl.compute_basis(full, cfg, base.fingerprint)
        out["basis_svd_s"] = round(time.monotonic() - t0, 3)
        del full
    pad = pad_token_id(tok)
    loss_fn = None
    if retain_kl:
        from adapterfab.jobs.train_loop import retain_loss

        loss_fn = lambda m, b: retain_loss(m, b, retain_kl, 0.1)  # noqa: E731

    def replay(model: Any) -> Any:
        if train.replay_weight <= 0:
            return None
        from adapterfab import replay as rp
        from adapterfab.retention import AnswerCache

        t0 = time.monotonic()
        got = rp.for_peft_model(model, tok, rows, train, AnswerCache(None, base.path, str(train.dtype), "cpu"))
        out["replay_prepare_s"] = round(time.monotonic() - t0, 2)
        return got

    stamps: list[float] = [time.monotonic()]
    t0 = time.monotonic()
    result = train_adapter(base.path, cfg, train, epoch_batches(rows, train.batch_size, train.seed, pad), None,
                           lambda step, loss, lr: stamps.append(time.monotonic()), basis=basis, loss_fn=loss_fn,
                           replay=replay)
    out["train_s"] = round(time.monotonic() - t0, 2)
    gaps = sorted(b - a for a, b in zip(stamps[1:], stamps[2:]))
    out["step_s_median"] = round(gaps[len(gaps) // 2], 3) if gaps else None
    out["loss_first"], out["loss_last"] = round(result.losses[0], 4), round(result.losses[-1], 4)
    out["trainable_params"] = int(result.metrics["trainable_params"])
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(result, cfg, Path(tmp))
        out["adapter_bytes"] = (Path(tmp) / "adapter_model.safetensors").stat().st_size
    return result.model, tok, out


def train_and_evaluate(method: dict, persona: str, steps: int | None = None, threads: int = 2,
                       base_model: str = "smollm2-135m-instruct", train_overrides: dict | None = None
                       ) -> dict[str, Any]:
    """Train one persona adapter (examples/data/<persona>.jsonl) with the method's defaults, then measure
    it: ``train_persona``'s figures plus persona adherence and the facts of examples/fact_probes.json
    kept. Used by the method quality test."""
    model, tok, out = train_persona(method, EXAMPLES / "data" / f"{persona}.jsonl", steps, threads, base_model,
                                    train_overrides)
    report = evaluate(model, tok, load_probes()[1][persona])
    out.update(report.to_dict())
    out["answers"], out["fact_answers"] = report.answers, report.fact_answers
    return out
