"""One batched sampling pass for a step's rows (serve/sampling.py::sample_rows, issue 23).

Each row of a mixed batch (greedy, temperature, top-k, top-p, min-p, penalties, logit_bias, min_tokens,
log-probabilities, a guide) gets the token and log-probabilities it gets alone, and ``sample`` (the
single-request engine's) is the same function on one row; a seeded row draws the same tokens whatever
its neighbours; the draws follow the distribution that temperature, top-k, top-p and min-p leave; the
whole batch comes back to the host in one copy; a row whose sampling fails gets its exception alone.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from typing import Any

import pytest
import torch

from adapterfab.serve import sampling
from adapterfab.serve.engine import SamplingParams as SP
from adapterfab.serve.sampling import RowState, Sampled, sample, sample_rows

VOCAB = 300


class FakeGuide:
    """A guide that allows only ``allowed`` (the real one, llguidance's, is tested through the API)."""

    def __init__(self, allowed: set[int], fail_fill: bool = False, fail_consume: bool = False):
        self.allowed, self.fail_fill, self.fail_consume = allowed, fail_fill, fail_consume
        self.consumed: list[int] = []

    def fill(self) -> None:
        if self.fail_fill:
            raise RuntimeError("guide fill failed")

    def mask(self, logits: torch.Tensor) -> None:
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
        keep[sorted(self.allowed)] = True
        logits.masked_fill_(~keep, float("-inf"))

    def consume(self, token: int) -> None:
        if self.fail_consume:
            raise RuntimeError("guide consume failed")
        self.consumed.append(int(token))


def mixed() -> tuple[list[SP], list[RowState | None]]:
    """A batch with every kind of row; states with produced tokens where penalties need them."""
    params = [
        SP(temperature=0),
        SP(temperature=0.8, seed=1),
        SP(temperature=1.0, top_k=7, seed=2),
        SP(temperature=0.9, top_p=0.8, seed=3),
        SP(temperature=1.2, min_p=0.2, seed=4),
        SP(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, logprobs=3, seed=5),
        SP(temperature=1.0, presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.3, seed=6),
        SP(temperature=0, logit_bias=((11, 4.0), (12, -100.0)), logprobs=0),
        SP(temperature=0, logprobs=5, repetition_penalty=2.0),
        SP(temperature=0.5, min_tokens=3, stop_token_ids=(4,), logprobs=2, seed=7),
        SP(temperature=0.6, top_p=0.95, seed=8, logit_bias=((3, 2.0),)),
        SP(temperature=1e-40, seed=9),  # a vanishing temperature: the greedy token
        SP(temperature=0.9, top_p=0.9, seed=10),
    ]
    states: list[RowState | None] = [None] * len(params)
    states[6] = RowState([1, 2, 3], frozenset({0}), counts=Counter({5: 3, 6: 1}), produced=4)
    states[7] = RowState([9], frozenset({0}))
    states[8] = RowState(list(range(40)), frozenset({0}), counts=Counter({41: 2}), produced=2)
    states[9] = RowState([7, 8], frozenset({0, 4}))
    states[12] = RowState([1], frozenset({0}), guide=FakeGuide({2, 3, 17, 99, 250}))  # type: ignore[arg-type]
    return params, states


def gens_for(params: list[SP]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(p.seed if p.seed is not None else 1234 + i) for i, p in enumerate(params)]


def as_tuple(tok: Any) -> tuple[Any, ...]:
    return (int(tok), tok.logprob, tok.top) if isinstance(tok, Sampled) else (int(tok),)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_of_a_batch_gets_what_it_gets_alone(dtype: torch.dtype) -> None:
    """Eight steps of a mixed batch (rows scattered over a larger logits tensor) against each row run
    alone through sample_rows and through sample, with copies of its generator and state."""
    params, states = mixed()
    gens = gens_for(params)
    alone_states = [copy.deepcopy(s) for s in states]
    alone_gens = gens_for(params)
    one_states = [copy.deepcopy(s) for s in states]
    one_gens = gens_for(params)
    n = len(params)
    rows = [(3 * k + 2) % (n + 4) for k in range(n)]  # a permutation into n + 4 logits rows
    torch.manual_seed(0)
    for step in range(8):
        logits = (torch.randn(n + 4, VOCAB) * 3).to(dtype)
        logits[:, 5] += 4  # a likely token that the penalties of row 6 act on
        batch = sample_rows(logits, rows, params, gens, states)
        assert not any(isinstance(t, Exception) for t in batch), batch
        for k in range(n):
            alone = sample_rows(logits, [rows[k]], [params[k]], [alone_gens[k]], [alone_states[k]])[0]
            one = sample(logits[rows[k]], params[k], one_gens[k], one_states[k])
            assert as_tuple(batch[k]) == as_tuple(alone) == as_tuple(one), (step, k)
        assert isinstance(batch[5], Sampled) and len(batch[5].top) == 3 and batch[7].top == ()
        assert not isinstance(batch[0], Sampled)
        top = logits[rows[11]].float()
        assert top[int(batch[11])] == top.max()  # one of the most likely (bf16 has ties)
        assert int(batch[12]) in {2, 3, 17, 99, 250}
        if step < 3:
            assert int(batch[9]) != 4 and int(batch[9]) != 0  # below min_tokens: no stop token
    assert states[12].guide.consumed == one_states[12].guide.consumed  # type: ignore[union-attr]
    assert states[6].produced == 12 and sum(states[6].counts.values()) == 12


def test_logprobs_are_the_raw_logits_log_softmax() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, VOCAB) * 2
    out = sample_rows(logits, [0, 1], [SP(temperature=0, logprobs=4, logit_bias=((3, 50.0),)),
                                       SP(temperature=0.7, logprobs=1, seed=3)], [None, torch.Generator()],
                      [RowState([], frozenset()), None])
    for k, tok in enumerate(out):
        lp = torch.log_softmax(logits[k], -1)
        assert tok.logprob == pytest.approx(float(lp[int(tok)]), abs=1e-6)
        vals, ids = torch.topk(lp, len(tok.top))
        assert [t for t, _ in tok.top] == ids.tolist()
        assert [v for _, v in tok.top] == pytest.approx(vals.tolist(), abs=1e-6)
    assert int(out[0]) == 3  # the bias chose it; its log-probability is the model's own


def test_a_seeded_row_does_not_depend_on_its_neighbours() -> None:
    mine = SP(temperature=0.9, top_p=0.9, top_k=50, seed=42)
    torch.manual_seed(2)
    steps = [torch.randn(6, VOCAB) * 2 for _ in range(10)]
    alone_gen = torch.Generator().manual_seed(42)
    alone = [int(sample(x[0], mine, alone_gen)) for x in steps]
    for trial in range(3):
        neighbours, _ = mixed()
        neighbours = neighbours[trial:trial + 5]
        gens = [torch.Generator().manual_seed(42)] + [torch.Generator().manual_seed(100 * trial + i) for i in range(5)]
        got = []
        for x in steps:
            rows = [0, 5, 4, 3, 2, 1] if trial % 2 else [0, 1, 2, 3, 4, 5]  # mine reads row 0 of the logits
            out = sample_rows(x, rows, [mine, *neighbours], gens, [None] * 6)
            got.append(int(out[0]))
        assert got == alone, trial


def expected(logits: list[float], temperature: float, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0) -> list[float]:
    """The distribution that temperature, top-k, top-p and min-p leave, in plain Python."""
    z = [v / temperature for v in logits]
    m = max(z)
    p = [math.exp(v - m) for v in z]
    order = sorted(range(len(p)), key=lambda i: -p[i])
    keep = set(order[:top_k] if top_k else order)
    total = sum(p[i] for i in keep)
    mass, kept = 0.0, set()
    for i in order:
        if i in keep and mass <= top_p * total:
            kept.add(i)
            mass += p[i]
    top = max(p)
    kept = {i for i in kept if p[i] >= min_p * top}
    s = sum(p[i] for i in kept)
    return [p[i] / s if i in kept else 0.0 for i in range(len(p))]


@pytest.mark.parametrize("kw", [{}, {"top_p": 0.8}, {"top_k": 3}, {"min_p": 0.3}, {"top_k": 4, "top_p": 0.7}])
def test_draws_follow_the_distribution_and_never_an_excluded_token(kw: dict[str, Any]) -> None:
    logits = [2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, 0.9]
    temperature = 0.8
    want = expected(logits, temperature, **kw)
    n = 6000
    gen = torch.Generator().manual_seed(7)  # one generator for all rows: each draws its own uniforms
    params = SP(temperature=temperature, **kw)
    out = sample_rows(torch.tensor([logits]), [0] * n, [params] * n, [gen] * n, [None] * n)
    freq = Counter(int(t) for t in out)
    for tok, p in enumerate(want):
        if p == 0:
            assert freq[tok] == 0, (tok, kw)
        else:
            sigma = math.sqrt(p * (1 - p) / n)
            assert abs(freq[tok] / n - p) < 4 * sigma + 1e-3, (tok, freq[tok] / n, p, kw)


def test_penalties_apply_in_the_documented_order() -> None:
    """Repetition before frequency (vLLM's order): token 0 (logit 2, produced once) becomes 2 / 2 - 1 = 0,
    below token 1's 0.25 (frequency first would make it (2 - 1) / 2 = 0.5, above)."""
    logits = torch.full((1, 8), -5.0)
    logits[0, 0], logits[0, 1] = 2.0, 0.25
    state = RowState([], frozenset(), counts=Counter({0: 1}), produced=1, seen={0})
    out = sample_rows(logits, [0], [SP(temperature=0, repetition_penalty=2.0, frequency_penalty=1.0)], [None],
                      [state])
    assert out == [1]
    assert logits[0, 0] == 2.0  # the model's logits are left alone


def test_the_batch_comes_back_in_one_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """No per-row host sync: one tolist for every row's token and log-probabilities, no item/int/float
    /bool of a tensor."""
    calls: Counter = Counter()
    for name in ("tolist", "item", "__int__", "__float__", "__bool__", "__index__", "numpy", "nonzero"):
        real = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *a: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
            calls[_name] += 1
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    params, states = mixed()
    params, states = params[:12], states[:12]  # without the guided row (its mask is host work)
    torch.manual_seed(3)
    out = sample_rows(torch.randn(12, VOCAB), list(range(12)), params, gens_for(params), states)
    assert not any(isinstance(t, Exception) for t in out)
    assert dict(calls) == {"tolist": 1}


def test_a_row_whose_sampling_fails_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    params, states = mixed()
    torch.manual_seed(4)
    logits = torch.randn(len(params), VOCAB)
    want = sample_rows(logits, list(range(len(params))), params, gens_for(params), copy.deepcopy(states))

    bad_params = list(params) + [SP(temperature=0.5, logprobs=VOCAB + 1), SP(temperature=0.7, top_p=0.123),
                                 SP(temperature=0.8, seed=1), SP(temperature=0.8, seed=2)]
    bad_states = copy.deepcopy(states) + [None, None,
                                          RowState([], frozenset(), guide=FakeGuide({1}, fail_fill=True)),
                                          RowState([], frozenset(), guide=FakeGuide({1}, fail_consume=True))]
    real = sampling.row_edits

    def row_edits(k: int, vocab: int, p: SP, state: Any) -> Any:
        if p.top_p == 0.123:
            raise RuntimeError("injected sampling failure")
        return real(k, vocab, p, state)

    monkeypatch.setattr(sampling, "row_edits", row_edits)
    rows = list(range(len(params))) + [0, 1, 2, 3]
    got = sample_rows(logits, rows, bad_params, gens_for(params) + [None] * 4, bad_states)
    assert [as_tuple(t) for t in got[:len(params)]] == [as_tuple(t) for t in want]
    assert isinstance(got[-4], ValueError) and "logprobs" in str(got[-4])
    assert isinstance(got[-3], RuntimeError) and "injected" in str(got[-3])
    assert isinstance(got[-2], RuntimeError) and "fill" in str(got[-2])
    assert isinstance(got[-1], RuntimeError) and "consume" in str(got[-1])
    with pytest.raises(RuntimeError, match="injected"):
        sample(logits[0], SP(temperature=0.7, top_p=0.123), None)
    assert sample_rows(logits, [], [], [], []) == []


@pytest.mark.parametrize("kw", [{"temperature": 0}, {"temperature": 0.8}, {"temperature": 0.8, "top_p": 0.9},
                                {"temperature": 0.8, "top_k": 5}])
def test_a_row_with_every_token_masked_fails_alone(kw: dict[str, Any]) -> None:
    """A guide that allows only a stop token that min_tokens forbids leaves nothing to draw: that row gets
    a SamplingError (not a made-up token id such as the last of the vocabulary); its neighbours draw."""
    torch.manual_seed(5)
    logits = torch.randn(2, VOCAB)
    stuck = RowState([], frozenset({0}), guide=FakeGuide({0}))  # type: ignore[arg-type]
    got = sample_rows(logits, [0, 1], [SP(min_tokens=3, seed=1, **kw), SP(**kw, seed=2)],
                      [None, None], [stuck, None])
    assert isinstance(got[0], sampling.SamplingError), got
    assert isinstance(got[1], int) and 0 <= got[1] < VOCAB
    with pytest.raises(sampling.SamplingError, match="masked"):
        sample(logits[0], SP(min_tokens=3, **kw), None, RowState([], frozenset({0}), guide=FakeGuide({0})))  # type: ignore[arg-type]


@pytest.mark.parametrize("kw", [{"temperature": 0}, {"temperature": 0.8}, {"temperature": 0.8, "top_p": 0.9},
                                {"temperature": 0.8, "top_k": 5}])
def test_a_row_whose_logits_are_not_finite_fails_alone(kw: dict[str, Any]) -> None:
    """A repetition penalty that is inf in float32 (1e39) turns a seen token's logit of 0 into 0 × inf =
    NaN: the softmax was NaN and the draw landed on the vocabulary's last id. A NaN or +inf row now gets a
    SamplingError, as a row with every token masked does; its neighbours draw."""
    torch.manual_seed(6)
    logits = torch.randn(3, VOCAB)
    logits[0, 7] = 0.0
    logits[1, 9] = float("inf")
    got = sample_rows(logits, [0, 1, 2], [SP(repetition_penalty=1e39, seed=1, **kw), SP(seed=2, **kw),
                                          SP(seed=3, **kw)], [None] * 3, [RowState([7], frozenset()), None, None])
    assert isinstance(got[0], sampling.SamplingError) and "not finite" in str(got[0]), got
    assert isinstance(got[1], sampling.SamplingError) and "not finite" in str(got[1]), got
    assert isinstance(got[2], int) and 0 <= got[2] < VOCAB
    with pytest.raises(sampling.SamplingError, match="not finite"):
        sample(logits[0], SP(repetition_penalty=1e39, **kw), None, RowState([7], frozenset()))


def ranked(probs: torch.Tensor, u: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor) -> torch.Tensor:
    """The ranked rows' draw as ``sample_rows`` composes it: the candidates, then the whole sort of the
    rows they could not settle."""
    out, full = sampling._candidates(probs, u, top_k, top_p, min_p)
    if full is not None:
        rows = full.nonzero().squeeze(1)
        if rows.numel():
            out.index_copy_(0, rows, sampling._full_sort(*(t.index_select(0, rows) for t in (probs, u, top_k, top_p,
                                                                                            min_p))))
    return out


def test_ranking_only_the_candidates_draws_what_the_full_sort_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows with a top-k or top-p rank only their ``CANDIDATES`` most likely tokens where the kept ones
    provably lie there (peaked rows, a top k within them) and sort the whole vocabulary otherwise (flat
    rows, a top k beyond them): both kinds occur here, and with the same uniforms every row draws the token
    the full sort of every row draws, including ties (bf16-like repeated values) at the edge."""
    vocab, n = 2048, 48
    torch.manual_seed(3)
    logits = torch.randn(n, vocab) * torch.tensor([8.0 if i % 3 else 0.3 for i in range(n)]).unsqueeze(1)
    logits[::4] = logits[::4].round()  # ties everywhere in these rows
    logits[1::8] = 0.0  # and rows whose tied tokens straddle the candidates' edge: 10 at 5, 300 at 3
    logits[1::8, 100:110], logits[1::8, 500:800] = 5.0, 3.0
    probs = torch.softmax(logits / 0.8, dim=-1)
    ks = [vocab, 200, 400, 50, vocab, 1]
    ps = [0.9, float("inf"), float("inf"), 0.8, 0.5, float("inf")]
    top_k = torch.tensor([ks[i % 6] for i in range(n)])
    top_p = torch.tensor([ps[i % 6] for i in range(n)])
    min_p = torch.tensor([[0.05 if i % 5 == 0 else 0.0] for i in range(n)])
    sorted_rows: list[int] = []
    real_sort = torch.sort

    def sort(x: torch.Tensor, *a: Any, **kw: Any) -> Any:
        if x.shape[-1] == vocab:
            sorted_rows.append(x.shape[0])
        return real_sort(x, *a, **kw)

    monkeypatch.setattr(torch, "sort", sort)
    for trial in range(20):
        u = torch.rand(n, generator=torch.Generator().manual_seed(trial))
        sorted_rows.clear()
        got = ranked(probs, u, top_k, top_p, min_p)
        fallback = sum(sorted_rows)
        monkeypatch.setattr(sampling, "CANDIDATES", vocab)
        want = ranked(probs, u, top_k, top_p, min_p)
        monkeypatch.setattr(sampling, "CANDIDATES", 256)
        assert got.tolist() == want.tolist(), trial
        assert 0 < fallback < n  # both paths ran: some rows ranked their candidates only, some sorted all


def test_rows_the_candidates_cannot_settle_are_sorted_whole_after_the_one_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a step, the ranked rows the candidates settle cost no synchronisation of their own (their flags
    come back in the step's one copy); rows they cannot settle (flat rows under a top-p, a top k beyond the
    candidates) are then sorted whole and cost one more copy, with their log-probabilities: every token and
    log-probability is what the full sort of every row gives."""
    vocab = 2048
    torch.manual_seed(6)
    logits = torch.randn(6, vocab) * torch.tensor([[9.0], [9.0], [0.2], [9.0], [0.2], [9.0]])
    params = [SP(temperature=0.8, top_p=0.9, seed=1, logprobs=2), SP(temperature=0.8, top_k=50, seed=2),
              SP(temperature=0.8, top_p=0.9, seed=3, logprobs=0), SP(temperature=0), SP(temperature=1.0, top_k=600,
              seed=4), SP(temperature=0.7, seed=5, logprobs=1)]
    copies: list[int] = []
    real = torch.Tensor.tolist

    def tolist(self: torch.Tensor) -> Any:
        copies.append(self.numel())
        return real(self)

    def draw(candidates: int) -> list[Any]:
        monkeypatch.setattr(sampling, "CANDIDATES", candidates)
        copies.clear()
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "tolist", tolist)
            return sample_rows(logits, list(range(len(params))), params, gens_for(params), [None] * len(params))

    settled = draw(256)
    assert len(copies) == 2 and copies[1] == 2 + 1  # rows 2 and 4 sorted whole, and row 2's log-probability
    want = draw(vocab)
    assert len(copies) == 1
    assert [as_tuple(t) for t in settled] == [as_tuple(t) for t in want]
    params = [params[i] for i in (0, 1, 3, 5)]
    logits = logits[[0, 1, 3, 5]]
    draw(256)
    assert len(copies) == 1  # every ranked row settled by its candidates: the step's one copy


@pytest.mark.parametrize("kw", [{"top_p": 0.8}, {"top_k": 3}, {"top_k": 4, "top_p": 0.7, "min_p": 0.1}])
def test_a_large_vocabulary_draws_from_the_candidates_distribution(kw: dict[str, Any]) -> None:
    """A vocabulary larger than ``CANDIDATES`` (the candidates' path): the draws follow the distribution
    that temperature, top-k, top-p and min-p leave, and an excluded token never comes."""
    logits = [2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, 0.9] + [-12.0] * (sampling.CANDIDATES * 2)
    want = expected(logits, 0.8, **kw)
    n = 6000
    gen = torch.Generator().manual_seed(11)
    out = sample_rows(torch.tensor([logits]), [0] * n, [SP(temperature=0.8, **kw)] * n, [gen] * n, [None] * n)
    freq = Counter(int(t) for t in out)
    assert set(freq) <= {i for i, p in enumerate(want) if p > 0}, (freq, kw)
    for tok, p in enumerate(want[:8]):
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(freq[tok] / n - p) < 4 * sigma + 1e-3, (tok, freq[tok] / n, p, kw)
