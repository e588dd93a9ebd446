"""Replay: the base's own answers distilled back into an adapter, so that a persona keeps what the base knew.

A persona adapter learns to open its answers its own way ("Arr, matey!", "Verily,") and, on a small base,
that opening then steers what follows away from the facts the base states (bench/RESULTS.md, the retention
study). With ``train.replay_weight`` > 0, every training step of a job also reads ``replay_per_step`` of the
shipped general prompts (``replay_prompts.json``, none a retention probe) answered by the bare base, with
one of the persona's own openings put before the answer, and adds ``replay_weight`` × KL(base ‖ adapter)
over the answer's tokens: the base reads prompt + answer, the adapter prompt + opening + answer (context
distillation: the opening must not change what follows). The persona's cross-entropy is unchanged and is
the loss the job reports. Fused: jobs/fused.py ``FusedTrainer._replay_losses``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

PROMPTS = Path(__file__).with_name("replay_prompts.json")


@lru_cache(maxsize=1)
def prompts() -> tuple[str, ...]:
    """The shipped general prompts whose base answers are replayed."""
    return tuple(json.loads(PROMPTS.read_text())["prompts"])


@dataclass(frozen=True)
class ReplayRow:
    head: tuple[int, ...]  # the prompt through the chat template, up to the assistant's answer
    answer: tuple[int, ...]  # the base's answer, as it starts an answer
    spaced: tuple[int, ...]  # the same answer after an opening: its first word with its space


@dataclass
class ReplaySet:
    """What a job replays: the base's answers and the persona's openings (``[()]``: none, the answer is
    distilled as it is), drawn ``per_step`` at a time, the same draws for the same job seed and step."""

    rows: list[ReplayRow]
    openings: list[tuple[int, ...]] = field(default_factory=lambda: [()])
    weight: float = 1.0
    per_step: int = 1
    seed: int = 0

    @property
    def active(self) -> bool:
        """Whether the set adds anything to a step (rows to draw and a weight above 0)."""
        return bool(self.rows) and self.weight > 0

    def draw(self, step: int) -> list[tuple[ReplayRow, tuple[int, ...]]]:
        """The rows of the job's ``step`` (0-based), each with an opening: a pure function of seed and
        step, so a job that resumes from a checkpoint draws what it would have drawn."""
        if not self.rows:
            return []
        rng = random.Random(f"replay:{self.seed}:{step}")
        return [(rng.choice(self.rows), rng.choice(self.openings)) for _ in range(self.per_step)]


def persona_openings(tokenizer: Any, rows: list[dict[str, Any]], max_tokens: int = 6) -> list[tuple[int, ...]]:
    """The openings of a persona's answers, as token ids: each training row's response up to its last
    ``, . ! ? :`` within its first ``max_tokens`` tokens ("Arr, matey!", "Verily,"); rows whose answers
    start without one (a plain sentence) give none. Distinct, in first-seen order; empty when no row has one."""
    punct = _punctuation(tokenizer)
    out: dict[tuple[int, ...], None] = {}
    for r in rows:
        labels = [int(x) for x in r["labels"]]
        start = next((i for i, x in enumerate(labels) if x != -100), None)
        if start is None:
            continue
        ids = [int(t) for t in list(r["input_ids"])[start:start + max_tokens]]
        cut = max((k + 1 for k, t in enumerate(ids) if t in punct), default=0)
        if cut:
            out[tuple(ids[:cut])] = None
    return list(out)


def _punctuation(tokenizer: Any) -> frozenset[int]:
    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer))
    got = _PUNCT.get(key)
    if got is None:
        got = frozenset(i for i, t in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
                        if t and t.strip("Ġ") in {",", ".", "!", "?", ":"})
        _PUNCT[key] = got
    return got


_PUNCT: dict[tuple[str, int], frozenset[int]] = {}


def replay_rows(tokenizer: Any, answers: dict[str, str]) -> list[ReplayRow]:
    """Replay rows of the base's ``answers`` (prompt -> answer) to the shipped prompts; an answer whose
    tokens change with a leading space beyond its first word (or shorter than 2 tokens) is left out."""
    from adapterfab.retention import prompt_ids

    out = []
    for p in prompts():
        a = answers.get(p, "")
        body = tokenizer.encode(a, add_special_tokens=False)
        spaced = tokenizer.encode(" " + a, add_special_tokens=False)
        if len(body) >= 2 and len(spaced) == len(body) and spaced[1:] == body[1:]:
            out.append(ReplayRow(tuple(prompt_ids(tokenizer, p)), tuple(body), tuple(spaced)))
    return out


def make_set(tokenizer: Any, answers: dict[str, str], rows: list[dict[str, Any]], train: Any) -> ReplaySet:
    """A job's replay set: the base's ``answers`` to the shipped prompts, the openings of its training
    ``rows``, and its ``train`` settings (``replay_weight``, ``replay_per_step``, ``seed``)."""
    return ReplaySet(replay_rows(tokenizer, answers), persona_openings(tokenizer, rows) or [()],
                     train.replay_weight, train.replay_per_step, train.seed)


def for_peft_model(model: Any, tokenizer: Any, rows: list[dict[str, Any]], train: Any, cache: Any) -> ReplaySet:
    """``make_set`` with the base's answers asked of a PEFT ``model`` with its adapter disabled (those the
    ``retention.AnswerCache`` ``cache`` does not have)."""
    from adapterfab import retention

    model.eval()
    try:
        with model.disable_adapter():
            answers = retention.base_answers(model, tokenizer, list(prompts()), cache)
    finally:
        model.train()
    return make_set(tokenizer, answers, rows, train)


def replay_kl(model: Any, peft_model: Any, drawn: list[tuple[ReplayRow, tuple[int, ...]]], device: Any) -> Any:
    """The replay term of one training step outside the fused trainer (jobs/train_loop.py): the mean, over
    the answer tokens of the ``drawn`` rows, of KL(base || adapter), the base (``peft_model`` with its
    adapter disabled, no gradient) reading prompt + answer, ``model`` (the PEFT model, or the DeepSpeed
    engine around it) prompt + opening + answer. The fused trainer's ``_replay_losses`` is the same sum."""
    import torch

    from adapterfab.textgen import pad_rows

    t_ids, t_mask = pad_rows([list(r.head) + list(r.answer) for r, _ in drawn], 0)
    s_ids, s_mask = pad_rows([list(r.head) + list(o) + list(r.spaced if o else r.answer) for r, o in drawn], 0)
    with torch.no_grad(), peft_model.disable_adapter():
        t_logits = peft_model(input_ids=t_ids.to(device), attention_mask=t_mask.to(device)).logits
    s_logits = model(input_ids=s_ids.to(device), attention_mask=s_mask.to(device)).logits
    kls = []
    for i, (r, o) in enumerate(drawn):  # the positions predicting the answer's tokens after its first
        h, n = len(r.head), len(r.answer)
        t = torch.log_softmax(t_logits[i, h:h - 1 + n].float(), -1)
        s = torch.log_softmax(s_logits[i, h + len(o):h - 1 + len(o) + n].float(), -1)
        kls.append((t.exp() * (t - s)).sum(-1))
    return torch.cat(kls).mean()
