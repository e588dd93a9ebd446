"""Choosing the next token of one request from its logits: what both engines share.

In order, as vLLM applies them: the request's ``logit_bias``; the repetition penalty (over prompt and
output tokens: a positive logit divided by it, a negative one multiplied), the frequency and presence
penalties (over output tokens: ``count × frequency + presence`` subtracted); end-of-sequence and
``stop_token_ids`` masked until ``min_tokens``; a structured-output guide's mask (llguidance: only
tokens that keep the text valid under the JSON schema or grammar). Then greedy (``temperature`` 0) or
sampled: temperature, ``top_k``, ``top_p``, ``min_p``, then a draw from the request's own generator.

Log-probabilities, when asked for, are the model's own (the raw logits' log-softmax, vLLM's default
``raw_logprobs``): the chosen token's and the ``logprobs`` most likely. A token carrying them is a
``Sampled``, an ``int`` with two attributes, so code that only wants ids need not know.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from adapterfab.errors import AdapterfabError

GUIDE_KINDS = ("json_object", "json_schema", "regex", "lark")
# JSON without optional whitespace (`{"a":1}`): a small model given free whitespace may spend its whole
# budget on it; a schema may ask otherwise with its own "x-guidance" options
COMPACT = {"whitespace_flexible": False}


class InvalidGuide(AdapterfabError):
    """A response format whose schema or grammar the constrained-decoding library refuses."""


class Sampled(int):
    """A token id with its log-probability and the top alternatives ``((id, logprob), ...)``."""

    logprob: float
    top: tuple[tuple[int, float], ...]

    def __new__(cls, token: int, logprob: float, top: tuple[tuple[int, float], ...]) -> Sampled:
        obj = super().__new__(cls, token)
        obj.logprob, obj.top = logprob, top
        return obj

    def __reduce__(self) -> tuple[Any, ...]:  # pickles as itself across processes (Ray)
        return (Sampled, (int(self), self.logprob, self.top))


def grammar_of(guide: tuple[str, str]) -> str:
    """llguidance's grammar text for ``(kind, spec)``; ``InvalidGuide`` when it cannot be built."""
    import llguidance

    kind, spec = guide
    try:
        if kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=COMPACT)
        elif kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.loads(spec), defaults=COMPACT)
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(spec)
        elif kind == "lark":
            grammar = llguidance.LLMatcher.grammar_from_lark(spec)
        else:
            raise InvalidGuide(f"unknown structured-output kind {kind!r}")
    except (ValueError, TypeError, RuntimeError) as e:
        raise InvalidGuide(f"the {kind.replace('_', ' ')} cannot be used for decoding: {e}") from None
    ok, message = _validate(grammar)
    if not ok:
        raise InvalidGuide(f"the {kind.replace('_', ' ')} cannot be used for decoding: {message}")
    return grammar


def _validate(grammar: str) -> tuple[bool, str]:
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return (not is_error, "; ".join(messages))


class GuideTokenizer:
    """llguidance's view of one tokenizer, built once per engine (~0.3 s for a 49k vocabulary)."""

    def __init__(self, tokenizer: Any, eos_ids: set[int]):
        import llguidance.hf

        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(eos_ids)
        self.ll = llguidance.hf.from_tokenizer(tokenizer, eos_token=eos)
        self.vocab_size = self.ll.vocab_size


class Guide:
    """One request's constrained-decoding state: masks the logits, consumes each chosen token."""

    def __init__(self, tok: GuideTokenizer, guide: tuple[str, str]):
        import llguidance
        import llguidance.torch as lt

        self.tok = tok
        self.matcher = llguidance.LLMatcher(tok.ll, grammar_of(guide))
        if self.matcher.is_error():
            raise InvalidGuide(self.matcher.get_error())
        self._mask = lt.allocate_token_bitmask(1, tok.vocab_size)

    def apply(self, logits: Any) -> None:
        """Forbid (in place) every token the grammar does not allow next."""
        import llguidance.torch as lt

        lt.fill_next_token_bitmask(self.matcher, self._mask, 0)
        n = self.tok.vocab_size
        head = logits[:n].unsqueeze(0)
        lt.apply_token_bitmask_inplace(head, self._mask.to(logits.device))
        logits[:n] = head[0]
        if logits.shape[-1] > n:  # padding rows of the embedding are never valid
            logits[n:] = float("-inf")

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise InvalidGuide(f"token {int(token)} broke the grammar: {self.matcher.get_error()}")


@dataclass
class RowState:
    """What one request's sampling needs across steps: its prompt, output counts and guide."""

    prompt: list[int]
    stops: frozenset[int]  # end of sequence and the request's stop_token_ids (masked below min_tokens)
    guide: Guide | None = None
    counts: Counter = field(default_factory=Counter)
    produced: int = 0

    def advance(self, token: int) -> None:
        self.counts[int(token)] += 1
        self.produced += 1
        if self.guide is not None:
            self.guide.consume(token)


def needs_processing(params: Any) -> bool:
    """Whether a request's logits must be processed row by row (anything beyond plain greedy/sampling)."""
    return bool(params.logit_bias or params.presence_penalty or params.frequency_penalty
                or params.repetition_penalty != 1.0 or params.min_tokens or params.guide is not None)


def is_plain_greedy(params: Any) -> bool:
    """Greedy with nothing to process and no log-probabilities: one batched argmax serves it."""
    return params.temperature == 0 and params.logprobs is None and not needs_processing(params)


def process(logits: Any, params: Any, state: RowState | None) -> Any:
    """The request's logits after bias, penalties, min_tokens and its guide (a new float32 tensor)."""
    import torch

    x = logits.float().clone()
    if params.logit_bias:
        ids = torch.tensor([i for i, _ in params.logit_bias], device=x.device)
        valid = ids < x.shape[-1]
        x[ids[valid]] += torch.tensor([b for _, b in params.logit_bias], device=x.device)[valid]
    if state is not None:
        if state.counts and (params.frequency_penalty or params.presence_penalty):
            ids = torch.tensor(list(state.counts), device=x.device)
            counts = torch.tensor(list(state.counts.values()), dtype=x.dtype, device=x.device)
            x[ids] -= counts * params.frequency_penalty + params.presence_penalty
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(state.prompt) | set(state.counts)), device=x.device)
            seen = seen[seen < x.shape[-1]]
            v = x[seen]
            x[seen] = torch.where(v > 0, v / params.repetition_penalty, v * params.repetition_penalty)
        if state.produced < params.min_tokens and state.stops:
            x[torch.tensor(sorted(state.stops), device=x.device)] = float("-inf")
        if state.guide is not None:
            state.guide.apply(x)
    return x


def choose(x: Any, params: Any, gen: Any) -> int:
    """Greedy or sampled from processed float32 logits (temperature, top_k, top_p, min_p)."""
    import torch

    if params.temperature == 0:
        return int(torch.argmax(x))
    # shifted so that the largest logit is 0 before the division: however small the temperature, the
    # scaled logits stay in [-inf, 0] with one 0, and the softmax is finite (a vanishing temperature is
    # greedy) instead of inf/inf = NaN; the floor keeps a denormal temperature from becoming 0 in float32
    x = (x - x.max()) / max(params.temperature, 1e-30)
    if 0 < params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        drop = torch.cumsum(sorted_p, dim=-1) - sorted_p > params.top_p  # always keeps the top token
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=gen))


def with_logprobs(logits: Any, token: int, n: int) -> Sampled:
    """``token`` with its log-probability under the raw logits and the ``n`` most likely tokens'."""
    import torch

    lp = torch.log_softmax(logits.float(), dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if n > 0:
        vals, ids = torch.topk(lp, n)
        top = tuple(zip(ids.tolist(), vals.tolist()))
    return Sampled(token, float(lp[token]), top)


def sample(logits: Any, params: Any, gen: Any, state: RowState | None = None) -> int:
    """The next token of one request (a ``Sampled`` when it asked for log-probabilities); advances
    ``state`` (its counts and guide) with it."""
    x = process(logits, params, state) if needs_processing(params) else logits.float()
    token = choose(x, params, gen)
    if params.logprobs is not None:
        token = with_logprobs(logits, token, params.logprobs)
    if state is not None:
        state.advance(token)
    return token
