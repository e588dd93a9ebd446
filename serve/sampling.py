"""Choosing the next token of every request of a step from its logits: what both engines share.

In order, as vLLM applies them: the request's ``logit_bias``; the repetition penalty (over prompt and
output tokens: a positive logit divided by it, a negative one multiplied), the frequency and presence
penalties (over output tokens: ``count × frequency + presence`` subtracted); end-of-sequence and
``stop_token_ids`` masked until ``min_tokens``; a structured-output guide's mask (llguidance: only
tokens that keep the text valid under the JSON schema or grammar). Then greedy (``temperature`` 0) or
sampled: temperature, ``top_k``, ``top_p``, ``min_p``, then a draw from the request's own generator.

``sample_rows`` does all of it for a step's rows at once: the bias, penalties and ``min_tokens`` as
scattered edits of one float32 copy of the rows' logits (their positions gathered on the host, sent in
one copy), the guides' masks row by row (host work by nature), then temperature, top-k, top-p and min-p
as tensor operations with each row's own values (a row without a setting gets the neutral one). A row
with a top-k or top-p ranks only its most likely ``CANDIDATES`` tokens (``topk``, not a sort of the whole
vocabulary) when its kept tokens provably lie among them, and sorts its whole row otherwise. The draw is
by the inverse of the kept probabilities' cumulative sum at one uniform per row and step from the row's
own generator, so a seeded request draws the same tokens whatever shares its step. Every row's token and
log-probabilities come back to the host in one copy (one synchronisation per step, not one per row); a
step with a ranked row the candidates cannot settle has a second.
``sample`` is the same function on one row: the single-request engine and the batched one choose the same
tokens.

Log-probabilities, when asked for, are the model's own (the raw logits' log-softmax, vLLM's default
``raw_logprobs``): the chosen token's and the ``logprobs`` most likely. A token carrying them is a
``Sampled``, an ``int`` with two attributes, so code that only wants ids need not know.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from adapterfab.errors import AdapterfabError

GUIDE_KINDS = ("json_object", "json_schema", "regex", "lark")
# JSON without optional whitespace (`{"a":1}`): a small model given free whitespace may spend its whole
# budget on it; a schema may ask otherwise with its own "x-guidance" options
COMPACT = {"whitespace_flexible": False}


class SamplingError(AdapterfabError):
    """A request's next token cannot be drawn (every token masked), or its parameters do not fit the
    model (``param`` names the request field at fault)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[Any, tuple[str, str | None]]:  # keeps param across Ray's pickling
        return (type(self), (str(self), self.param))


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
        raise InvalidGuide(f"the {kind.replace('_', ' ')} cannot be used for decoding: {_short(str(e))}") from None
    ok, message = _validate(grammar)
    if not ok:
        raise InvalidGuide(f"the {kind.replace('_', ' ')} cannot be used for decoding: {_short(message)}")
    return grammar


def _short(message: str, limit: int = 1000) -> str:
    """A decoder's complaint cut to ``limit`` characters (some quote the whole grammar)."""
    return message if len(message) <= limit else message[:limit] + "..."


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

    def fill(self) -> None:
        """The grammar's mask of allowed next tokens, computed on the host (``mask`` applies it)."""
        import llguidance.torch as lt

        lt.fill_next_token_bitmask(self.matcher, self._mask, 0)

    def mask(self, logits: Any) -> None:
        """Forbid (in place) every token the mask of the last ``fill`` does not allow."""
        import llguidance.torch as lt

        n = self.tok.vocab_size
        head = logits[:n].unsqueeze(0)
        lt.apply_token_bitmask_inplace(head, self._mask.to(logits.device))
        logits[:n] = head[0]
        if logits.shape[-1] > n:  # padding rows of the embedding are never valid
            logits[n:] = float("-inf")

    def apply(self, logits: Any) -> None:
        """Forbid (in place) every token the grammar does not allow next."""
        self.fill()
        self.mask(logits)

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
    seen: set[int] = field(default_factory=set)  # prompt and output tokens (the repetition penalty's)

    def __post_init__(self) -> None:
        self.seen.update(self.prompt)
        self.seen.update(self.counts)

    def advance(self, token: int) -> None:
        t = int(token)
        self.counts[t] += 1
        self.seen.add(t)
        self.produced += 1
        if self.guide is not None:
            self.guide.consume(token)


def needs_processing(params: Any) -> bool:
    """Whether a request's logits need edits beyond temperature/top-k/top-p/min-p (and a ``RowState``)."""
    return bool(params.logit_bias or params.presence_penalty or params.frequency_penalty
                or params.repetition_penalty != 1.0 or params.min_tokens or params.guide is not None)


def is_plain_greedy(params: Any) -> bool:
    """Greedy with nothing to process and no log-probabilities."""
    return params.temperature == 0 and params.logprobs is None and not needs_processing(params)


class _Upload:
    """Host values for the device, gathered into one int64 and one float32 list: two copies per step."""

    def __init__(self) -> None:
        self.ints: list[int] = []
        self.floats: list[float] = []

    def i(self, values: list[int]) -> slice:
        self.ints.extend(values)
        return slice(len(self.ints) - len(values), len(self.ints))

    def f(self, values: list[float]) -> slice:
        self.floats.extend(values)
        return slice(len(self.floats) - len(values), len(self.floats))

    def send(self, device: Any) -> tuple[Any, Any]:
        import torch

        # non_blocking: from pageable memory the copy is staged before it returns, without waiting for
        # the device (a blocking one would synchronise with it)
        return (torch.tensor(self.ints, dtype=torch.int64).to(device, non_blocking=True),
                torch.tensor(self.floats, dtype=torch.float32).to(device, non_blocking=True))


@dataclass
class _Edits:
    """Positions (``row × vocab + token``) and values of the logit edits of a step's rows."""

    bias_at: list[int] = field(default_factory=list)
    bias: list[float] = field(default_factory=list)
    rep_at: list[int] = field(default_factory=list)
    rep: list[float] = field(default_factory=list)
    pen_at: list[int] = field(default_factory=list)
    pen: list[float] = field(default_factory=list)
    stop_at: list[int] = field(default_factory=list)

    def extend(self, other: _Edits) -> None:
        for name in self.__dataclass_fields__:
            getattr(self, name).extend(getattr(other, name))


def row_edits(k: int, vocab: int, params: Any, state: RowState | None) -> _Edits:
    """Row ``k``'s logit edits (bias, penalties, ``min_tokens``); raises for a request that cannot be
    sampled (its row fails alone)."""
    if params.logprobs is not None and params.logprobs > vocab:
        raise ValueError(f"logprobs {params.logprobs} is more than the vocabulary's {vocab} tokens")
    e = _Edits()
    base = k * vocab
    for t, b in params.logit_bias:
        if 0 <= t < vocab:
            e.bias_at.append(base + t)
            e.bias.append(b)
    if state is not None:
        if params.repetition_penalty != 1.0:
            e.rep_at = [base + t for t in state.seen if 0 <= t < vocab]
            e.rep = [params.repetition_penalty] * len(e.rep_at)
        if state.counts and (params.frequency_penalty or params.presence_penalty):
            e.pen_at = [base + t for t in state.counts]
            e.pen = [-(c * params.frequency_penalty + params.presence_penalty) for c in state.counts.values()]
        if state.produced < params.min_tokens:
            e.stop_at = [base + t for t in state.stops if 0 <= t < vocab]
    return e


def _is_ranked(params: Any, vocab: int) -> bool:
    """Whether a sampled row needs its tokens in order (a top-k or a top-p)."""
    return 0 < params.top_k < vocab or params.top_p < 1.0


def sample_rows(logits: Any, rows: list[int], params: list[Any], gens: list[Any],
                states: list[RowState | None]) -> list[Any]:
    """The next token of each of a step's requests: request k's from ``logits[rows[k]]`` with
    ``params[k]``, its generator ``gens[k]`` (None: torch's default) and state ``states[k]`` (advanced
    with the token); a ``Sampled`` for a request that asked for log-probabilities; the exception instead
    of a token for a request whose sampling failed (the others go on). One batch of tensor operations
    for all rows and one device-to-host copy (``tolist``) for all their tokens and log-probabilities."""
    import torch

    n = len(rows)
    out: list[Any] = [None] * n
    if n == 0:
        return out
    vocab, device = logits.shape[-1], logits.device
    edits = _Edits()
    noise: dict[int, Any] = {}
    for k in range(n):  # the host's part, row by row: a failure is that row's
        try:
            edits.extend(row_edits(k, vocab, params[k], states[k]))
            if states[k] is not None and states[k].guide is not None:
                states[k].guide.fill()  # on the host, while the device may still be computing the logits
            if params[k].temperature != 0:  # the row's own stream: one uniform per step, whatever its neighbours
                noise[k] = torch.rand(1, generator=gens[k], device=device)
        except Exception as e:  # noqa: BLE001 - this row's request fails alone, the batch goes on
            out[k] = e
    live = [k for k in range(n) if out[k] is None]
    if not live:
        return out
    greedy = [k for k in live if params[k].temperature == 0]
    plain = [k for k in live if params[k].temperature != 0 and not _is_ranked(params[k], vocab)]
    ranked = [k for k in live if params[k].temperature != 0 and _is_ranked(params[k], vocab)]
    drawn = plain + ranked
    asks = [k for k in live if params[k].logprobs is not None]
    tops: dict[int, list[int]] = {}  # rows by their number of top log-probabilities (positions in asks)
    for j, k in enumerate(asks):
        if params[k].logprobs > 0:
            tops.setdefault(params[k].logprobs, []).append(j)
    guided = [k for k in live if states[k] is not None and states[k].guide is not None]

    up = _Upload()
    at_rows = up.i(rows)
    at_edit = (up.i(edits.bias_at), up.f(edits.bias), up.i(edits.rep_at), up.f(edits.rep),
               up.i(edits.pen_at), up.f(edits.pen), up.i(edits.stop_at))
    at_greedy, at_drawn, at_ranked = up.i(greedy), up.i(drawn), up.i(list(range(len(plain), len(drawn))))
    at_asks, at_ask_rows = up.i(asks), up.i([rows[k] for k in asks])
    at_tops = {m: up.i(js) for m, js in tops.items()}
    # the largest logit is shifted to 0 before the division by the temperature: however small that is,
    # the scaled logits stay in [-inf, 0] with one 0 and the softmax is finite (a vanishing temperature
    # is greedy) instead of inf/inf = NaN; the floor keeps a denormal temperature from becoming 0 in float32
    at_temp = up.f([max(params[k].temperature, 1e-30) for k in drawn])
    at_min_p = up.f([params[k].min_p for k in drawn])
    at_top_k = up.i([params[k].top_k if 0 < params[k].top_k < vocab else vocab for k in ranked])
    at_top_p = up.f([params[k].top_p if params[k].top_p < 1.0 else float("inf") for k in ranked])
    ints, floats = up.send(device)

    def take(t: Any, ks: list[int], at: slice) -> Any:  # rows ks of t (t itself when that is all of it)
        return t if ks == list(range(t.shape[0])) else t.index_select(0, ints[at])

    x = take(logits, rows, at_rows).float()
    if (edits.bias_at or edits.rep_at or edits.pen_at or edits.stop_at or guided) and x.data_ptr() == logits.data_ptr():
        x = x.clone()  # the edits leave the logits alone
    flat = x.view(-1)
    bias_at, bias, rep_at, rep, pen_at, pen, stop_at = (
        (floats if i % 2 else ints)[at] for i, at in enumerate(at_edit))  # positions int64, values float32
    if edits.bias_at:
        flat.index_add_(0, bias_at, bias)
    if edits.rep_at:
        v = flat.index_select(0, rep_at)
        flat.index_copy_(0, rep_at, torch.where(v > 0, v / rep, v * rep))
    if edits.pen_at:
        flat.index_add_(0, pen_at, pen)
    if edits.stop_at:
        flat.index_fill_(0, stop_at, float("-inf"))
    for k in guided:
        try:
            states[k].guide.mask(x[k])
        except Exception as e:  # noqa: BLE001 - this row's request fails alone (its result is dropped)
            out[k] = e

    token = torch.zeros(n, dtype=torch.int64, device=device)
    unsettled = None
    if greedy:
        token.index_copy_(0, ints[at_greedy], take(x, greedy, at_greedy).argmax(-1))
    if drawn:
        xs = take(x, drawn, at_drawn)
        probs = torch.softmax((xs - xs.amax(-1, keepdim=True)) / floats[at_temp].unsqueeze(1), dim=-1)
        min_p = floats[at_min_p].unsqueeze(1)
        u = torch.cat([noise[k] for k in drawn])
        pick = torch.zeros(len(drawn), dtype=torch.int64, device=device)
        if plain:
            p = probs[:len(plain)]
            if any(params[k].min_p > 0 for k in plain):
                p = p.masked_fill(p < min_p[:len(plain)] * p.amax(-1, keepdim=True), 0.0)
            pick[:len(plain)] = _inverse_cdf(p, u[:len(plain)])
        if ranked:
            ranked_args = (probs[len(plain):], u[len(plain):], ints[at_top_k], floats[at_top_p], min_p[len(plain):])
            settled, unsettled = _candidates(*ranked_args)
            pick.index_copy_(0, ints[at_ranked], settled)
        token.index_copy_(0, ints[at_drawn], pick)

    # a row whose every token is masked (-inf: a guide and min_tokens disagreeing, a bias of -inf on all)
    # has nothing to draw, and one with a NaN or +inf (an overflow: the softmax is then NaN, and the draw
    # lands on the vocabulary's last id) nothing to draw from: it fails alone rather than get a made-up token
    # id. Its largest logit tells which (amax propagates NaN), in the same copy
    back = [token.double(), x.amax(-1).double()]
    if unsettled is not None:  # the ranked rows the candidates could not settle: known after the copy
        back.append(unsettled.double())
    if asks:
        lp = torch.log_softmax(take(logits, [rows[k] for k in asks], at_ask_rows).float(), dim=-1)
        back.append(lp.gather(1, token.index_select(0, ints[at_asks]).unsqueeze(1)).squeeze(1).double())
        for m, at in at_tops.items():
            vals, ids = torch.topk(lp.index_select(0, ints[at]), m)
            back += [vals.double().flatten(), ids.double().flatten()]
    got = torch.cat(back).tolist()  # the step's one device-to-host copy

    chosen = [int(t) for t in got[:n]]
    largest = got[n:2 * n]
    pos = 2 * n
    redo: list[int] = []  # positions in ``ranked`` of the rows to sort whole
    if unsettled is not None:
        redo = [j for j, f in enumerate(got[pos:pos + len(ranked)]) if f]
        pos += len(ranked)
    logprob = dict(zip(asks, got[pos:pos + len(asks)]))
    pos += len(asks)
    if redo:  # rare (flat rows, a top k beyond the candidates): their tokens and log-probabilities again
        at = torch.tensor(redo, device=device)
        again = _full_sort(*(t.index_select(0, at) for t in ranked_args))
        fix = [again.double()]
        ask_pos = {k: j for j, k in enumerate(asks)}
        redo_asks = [j for j, r in enumerate(redo) if ranked[r] in ask_pos]
        if redo_asks:
            sub = torch.tensor([ask_pos[ranked[redo[j]]] for j in redo_asks], device=device)
            fix.append(lp.index_select(0, sub).gather(
                1, again.index_select(0, torch.tensor(redo_asks, device=device)).unsqueeze(1)).squeeze(1).double())
        more = torch.cat(fix).tolist()  # a second copy, only for a step that has such rows
        for j, r in enumerate(redo):
            chosen[ranked[r]] = int(more[j])
        for i, j in enumerate(redo_asks):
            logprob[ranked[redo[j]]] = more[len(redo) + i]
    top: dict[int, tuple[tuple[int, float], ...]] = {}
    for m, js in tops.items():
        vals, ids = got[pos:pos + m * len(js)], got[pos + m * len(js):pos + 2 * m * len(js)]
        pos += 2 * m * len(js)
        for i, j in enumerate(js):
            top[asks[j]] = tuple(zip((int(t) for t in ids[i * m:(i + 1) * m]), vals[i * m:(i + 1) * m]))
    for k in live:
        if out[k] is not None:
            continue
        try:
            if largest[k] == float("-inf"):
                raise SamplingError("every token of the vocabulary is masked for this request (its guide, "
                                    "min_tokens, stop tokens and logit bias leave nothing to choose)")
            if not math.isfinite(largest[k]):
                raise SamplingError("this request's logits are not finite after its penalties and bias (NaN or "
                                    "+inf): no token can be drawn")
            tok: int = chosen[k]
            if params[k].logprobs is not None:
                tok = Sampled(tok, logprob[k], top.get(k, ()))
            if states[k] is not None:
                states[k].advance(tok)
            out[k] = tok
        except Exception as e:  # noqa: BLE001 - this row's request fails alone
            out[k] = e
    return out


CANDIDATES = 256  # a ranked row's most likely tokens, ranked without sorting its whole vocabulary


def _inverse_cdf(probs: Any, u: Any) -> Any:
    """One draw per row from ``probs`` (unnormalised, in any order; a 0 is never drawn) at the uniform
    ``u`` of the row: the first position whose cumulative sum passes ``u`` of the row's total."""
    import torch

    cum = torch.cumsum(probs, dim=-1)
    total = cum[:, -1]
    # strictly below the total (u * total may round up to it): the position found then has a mass > 0
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cum, target.unsqueeze(1), right=True).squeeze(1).clamp_max_(probs.shape[-1] - 1)


def _keep(p: Any, top_k: Any, top_p: Any, min_p: Any, outside: Any = None) -> tuple[Any, Any, Any]:
    """Rows of probabilities in decreasing order: the top k kept (and ties with the k-th), then the fewest
    most likely whose mass reaches top_p of what is left (``outside``: mass of the row not in ``p``), then
    min_p of the largest; the rest set to 0. Also returns the cumulative sums after the top k, and the
    mass top_p is a share of."""
    import torch

    p = p.masked_fill(p < p.gather(1, (top_k.clamp(max=p.shape[-1]) - 1).unsqueeze(1)), 0.0)
    cum = torch.cumsum(p, dim=-1)
    total = cum[:, -1] if outside is None else cum[:, -1] + outside
    p = p.masked_fill(cum - p > (top_p * total).unsqueeze(1), 0.0)  # always keeps the top token
    return p.masked_fill(p < min_p * p[:, :1], 0.0), cum, total


def _candidates(probs: Any, u: Any, top_k: Any, top_p: Any, min_p: Any) -> tuple[Any, Any]:
    """The draw of rows with a top-k or a top-p (``vocab`` and ``inf`` where a row has none), over their
    probabilities in decreasing order, ties by token id (``_keep``), for the rows whose kept tokens all
    lie among their ``CANDIDATES`` most likely:
    the tokens, and a flag per row that is True where that is not proven (the row's token must then come
    from ``_full_sort``); ``None`` for the flags when the vocabulary is no larger than the candidates (all
    rows sorted whole here).

    The candidates are ranked by ``topk`` and a sort of those by token id, then stably by value: the full
    stable order's head, exactly, wherever their values are above the last candidate's. A row is settled
    when its top k fits in that head, or (no top k) the head's mass already passes top_p of the row's."""
    import torch

    n, vocab = probs.shape
    if CANDIDATES >= vocab:
        return _full_sort(probs, u, top_k, top_p, min_p), None
    vals, ids = torch.topk(probs, CANDIDATES, dim=-1)
    ids, o = torch.sort(ids, dim=-1)
    bits, o = torch.sort(vals.gather(1, o).view(torch.int32), dim=-1, descending=True, stable=True)
    p, order = bits.view(torch.float32), ids.gather(1, o)
    head = (p > p[:, -1:]).sum(-1)  # these lead the full stable order
    no_k = top_k >= vocab
    outside = torch.where(no_k, (probs.sum(-1) - p.sum(-1)).clamp_min(0.0), 0.0)
    p, cum, total = _keep(p, top_k, top_p, min_p, outside)
    # no top k: the first token after the head is dropped by top-p (and so is every later one)
    passed = cum.gather(1, (head - 1).clamp(min=0).unsqueeze(1)).squeeze(1) > top_p * total
    full = torch.where(no_k, (head == 0) | ~passed, top_k > head)
    return order.gather(1, _inverse_cdf(p, u).unsqueeze(1)).squeeze(1), full


def _full_sort(probs: Any, u: Any, top_k: Any, top_p: Any, min_p: Any) -> Any:
    """The same draw (``_candidates``) by a sort of each row's whole vocabulary (a stable sort of the float32 bits as
    integers: the same order as the values', about a third faster on a CPU than floats)."""
    import torch

    bits, order = torch.sort(probs.view(torch.int32), dim=-1, descending=True, stable=True)
    p, _, _ = _keep(bits.view(torch.float32), top_k, top_p, min_p)
    return order.gather(1, _inverse_cdf(p, u).unsqueeze(1)).squeeze(1)


def sample(logits: Any, params: Any, gen: Any, state: RowState | None = None) -> int:
    """The next token of one request from its logits (1-D): ``sample_rows`` on one row, so that it is the
    token the batched engine would choose; a ``Sampled`` when it asked for log-probabilities; advances
    ``state`` (its counts and guide) with it."""
    token = sample_rows(logits.unsqueeze(0), [0], [params], [gen], [state])[0]
    if isinstance(token, Exception):
        raise token
    return token
