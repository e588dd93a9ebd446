"""The batched engine's CPU fast paths give the step it replaces: weights packed into oneDNN's layout
(bf16) give the same logits as ``F.linear``; LoRA updates computed once per distinct adapter of the step
(``_Factors``) equal the per-row gather, with rows of every kind in one batch, and follow an adapter slot
reused by another adapter; and the thread helpers that keep one OpenMP pool beside the decode loop do
what they say."""

from __future__ import annotations

import os
import queue
import random
import subprocess
import sys
import threading

import pytest
import torch

from adapterfab.serve.batched import BatchedEngine, _Request
from adapterfab.serve.engine import SamplingParams
from adapterfab.threads import in_passing_thread, one_torch_thread


def _stopped(eng: BatchedEngine) -> BatchedEngine:
    """The engine with its loop stopped, so the test drives prefill and decode steps itself."""
    with eng._wake:
        eng._stop = True
        eng._wake.notify_all()
    eng._thread.join(timeout=30)
    return eng


def _step_logits(eng: BatchedEngine, adapters: list[str | None], prompt_len: int = 9) -> torch.Tensor:
    """Prefill one prompt per row (row i for adapter ``adapters[i]``), then the logits of one decode step."""
    reqs = []
    for i, name in enumerate(adapters):
        r = _Request([10 + (7 * i + j) % 50 for j in range(prompt_len + i)], name, SamplingParams(max_tokens=4),
                     queue.Queue(), None)
        r.cache_row, r.budget = i, 4
        reqs.append(r)
    with torch.inference_mode():
        eng._running = []
        eng._prefill(reqs)
        assert len(eng._running) == len(reqs)
        for r in reqs:
            r.last = 20 + r.cache_row
        return eng._decode(reqs, [r.cache_row for r in reqs]).float().clone()


@pytest.fixture
def fp32_engine(tiny_model_path: str, mixed_adapters: dict):
    eng = BatchedEngine(tiny_model_path, dtype="float32", max_batch=8, max_len=128, max_adapters=8, max_rank=16)
    for name, path in mixed_adapters["lora"].items():
        eng.load_adapter(name, path)
    for name, path in mixed_adapters["xs"].items():
        eng.load_adapter(name, path, basis=mixed_adapters["basis"])
    yield _stopped(eng)
    eng.close()


ROWS = [None, "pirate", "butler", "robot", "poet", "xs-one", "pirate", "xs-two"]


def test_per_adapter_updates_equal_the_per_row_gather(fp32_engine: BatchedEngine) -> None:
    """Ranks 2/4/8 on q,v, all seven modules, o/down only, LoRA-XS rows and a base row in one step."""
    assert fp32_engine.lora_kernel == "factors"  # exact shapes on CPU take the per-adapter path
    fast = _step_logits(fp32_engine, ROWS)
    fp32_engine.use_lora_kernel("row")
    slow = _step_logits(fp32_engine, ROWS)
    assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-5), (fast - slow).abs().max()
    base = _step_logits(fp32_engine, [None] * len(ROWS))
    assert (fast[1:5] - base[1:5]).abs().max() > 1e-3  # the adapters really changed those rows


def test_the_per_adapter_factors_follow_a_reused_slot(fp32_engine: BatchedEngine, mixed_adapters: dict) -> None:
    before = _step_logits(fp32_engine, ["pirate", "butler"])
    slot = fp32_engine._slot_of["pirate"][1]
    fp32_engine.unload_adapter("pirate")
    fp32_engine.load_adapter("robot2", mixed_adapters["lora"]["robot"])  # takes pirate's slot
    assert fp32_engine._slot_of["robot2"][1] == slot
    after = _step_logits(fp32_engine, ["robot2", "butler"])
    fp32_engine.use_lora_kernel("row")
    want = _step_logits(fp32_engine, ["robot2", "butler"])
    assert torch.allclose(after, want, atol=1e-5, rtol=1e-5)  # not the cached factors of pirate
    assert (after[0] - before[0]).abs().max() > 1e-3


@pytest.mark.parametrize(("dtype", "buckets"), [("float32", True), ("bfloat16", True), ("float32", False)])
def test_grouped_lora_kernel_equals_the_per_row_gather(tiny_model_path: str, mixed_adapters: dict, dtype: str,
                                                       buckets: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``lora_kernel="grouped"`` (rows sorted by bank slot, two grouped matmuls over the whole bank per module,
    the path meant for CUDA graphs on a GPU), here on the CPU's ``torch._grouped_mm``: the same logits as the
    per-row gather, with ranks 2/4/8, every module kind, LoRA-XS rows, a base row and one adapter on two
    rows in one step; on the bucketed shapes a GPU runs, and on exact shapes, where the step's rank is
    rounded up to a multiple of 8 (the GPU kernel reads x·Aᵀ in 16-byte rows)."""
    calls = []
    grouped_mm = torch._grouped_mm

    def counted(*args, **kw):  # noqa: ANN002, ANN003
        calls.append(args[1].shape)
        return grouped_mm(*args, **kw)

    monkeypatch.setattr(torch, "_grouped_mm", counted)
    from adapterfab.serve.batched_forward import _Segments

    sorts = []
    sort = _Segments.sort
    monkeypatch.setattr(_Segments, "sort", lambda self, x: sorts.append(1) or sort(self, x))
    eng = BatchedEngine(tiny_model_path, dtype=dtype, max_batch=8, max_len=128, max_adapters=8, max_rank=16,
                        buckets=buckets, lora_kernel="grouped")
    try:
        for name, path in mixed_adapters["lora"].items():
            eng.load_adapter(name, path)
        for name, path in mixed_adapters["xs"].items():
            eng.load_adapter(name, path, basis=mixed_adapters["basis"])
        _stopped(eng)
        assert eng.lora_kernel == "grouped"
        grouped = _step_logits(eng, ROWS)
        assert calls and all(shape[0] == 9 for shape in calls)  # the grouped path ran: one group per bank slot
        # every module is banked (one adapter has all seven): two grouped matmuls per module, but the rows
        # sorted once per matmul of the base, i.e. 4 times a layer (q,k,v and gate,up share theirs), not 7
        assert len(sorts) * 7 == len(calls) // 2 * 4, (len(sorts), len(calls))
        assert all(r % 8 == 0 for (_, _, r, _) in eng.decode_shapes if r)
        eng.use_lora_kernel("row")
        n = len(calls)
        row = _step_logits(eng, ROWS)
        assert len(calls) == n  # the reference did not
        tol = 1e-5 if dtype == "float32" else 3e-2
        assert torch.allclose(grouped, row, atol=tol, rtol=tol), (grouped - row).abs().max()
        base = _step_logits(eng, [None] * len(ROWS))
        assert (grouped[1:5] - base[1:5]).abs().max() > 1e-2  # the adapters really changed those rows
    finally:
        eng.close()


def test_an_unknown_lora_kernel_or_a_misaligned_rank_is_refused(tiny_model_path: str) -> None:
    from adapterfab.errors import AdapterfabError

    with pytest.raises(AdapterfabError, match="lora_kernel must be"):
        BatchedEngine(tiny_model_path, max_batch=2, max_len=32, max_adapters=2, lora_kernel="punica")
    with pytest.raises(AdapterfabError, match="max_rank must be a multiple of 8"):
        BatchedEngine(tiny_model_path, max_batch=2, max_len=32, max_adapters=2, max_rank=12, lora_kernel="grouped")
    eng = BatchedEngine(tiny_model_path, max_batch=2, max_len=32, max_adapters=2, max_rank=12, buckets=True)
    try:  # a switch between steps (bench/gpu_probe.py times both kernels on one engine) is checked alike
        with pytest.raises(AdapterfabError, match="max_rank must be a multiple of 8"):
            eng.use_lora_kernel("grouped")
        with pytest.raises(AdapterfabError, match="lora_kernel must be 'row' or 'grouped', not 'factors'"):
            eng.use_lora_kernel("factors")  # the per-adapter path runs exact shapes only
        assert eng.lora_kernel == "row"
    finally:
        eng.close()


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    reason="oneDNN runs no bf16 on this CPU, so the engine does not pack")
def test_packed_bf16_weights_give_the_same_logits(tiny_model_path: str, mixed_adapters: dict) -> None:
    out = {}
    for prepack in (True, False):
        eng = BatchedEngine(tiny_model_path, dtype="bfloat16", max_batch=8, max_len=128, max_adapters=8, max_rank=16,
                            prepack=prepack)
        try:
            assert eng.prepacked is prepack
            for name, path in mixed_adapters["lora"].items():
                eng.load_adapter(name, path)
            out[prepack] = _step_logits(_stopped(eng), ROWS[:5])
        finally:
            eng.close()
    assert torch.allclose(out[True], out[False], atol=2e-2, rtol=2e-2), (out[True] - out[False]).abs().max()
    assert (out[True].argmax(-1) == out[False].argmax(-1)).all()


def test_in_passing_thread_returns_raises_and_leaves_no_pool() -> None:
    assert in_passing_thread(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(ZeroDivisionError):
        in_passing_thread(lambda: 1 / 0)
    before = torch.get_num_threads()
    with one_torch_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: no OpenMP worker threads to count")
def test_the_helpers_keep_the_callers_thread_free_of_openmp_workers() -> None:
    """What they are for, counted in a fresh process: a 2-thread op run in the caller's thread leaves an
    OpenMP worker thread behind; run in a passing thread, or under one_torch_thread, it leaves none."""
    script = """
import os, sys, time, torch
from adapterfab.threads import in_passing_thread, one_torch_thread
torch.set_num_threads(2)
work = lambda: torch.randn(4_000_000).sin().sum()
tasks = lambda: len(os.listdir("/proc/self/task"))
n0 = tasks()
{how}
deadline = time.monotonic() + 2  # a passing thread's workers exit just after it is joined
while tasks() > n0 and time.monotonic() < deadline:
    time.sleep(0.02)
print(tasks() - n0)
"""
    counts = {}
    for how in ("in_passing_thread(work)", "with one_torch_thread():\n    work()", "work()"):
        r = subprocess.run([sys.executable, "-c", script.format(how=how)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        counts[how.split("(")[0]] = int(r.stdout.split()[-1])
    assert counts["work"] >= 1, counts  # the check can see a pool
    assert counts["in_passing_thread"] == 0 and counts["with one_torch_thread"] == 0, counts


def _run_all(eng: BatchedEngine, requests: list[tuple[str | None, list[int]]], n: int = 6) -> list[list[int]]:
    got: dict[int, list[int]] = {}

    def run(i: int) -> None:
        adapter, prompt = requests[i]
        got[i] = list(eng.generate_token_ids(prompt, adapter, SamplingParams(max_tokens=n, temperature=0.0)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return [got[i] for i in range(len(requests))]


def test_prompts_prefilled_in_pieces_give_the_same_tokens(tiny_model_path: str, mixed_adapters: dict) -> None:
    """Chunked prefill: prompts of 3 to 60 tokens, for LoRA, LoRA-XS and the base, prefilled 7 tokens per
    loop iteration (so in pieces that attend to the cache) decode the same greedy fp32 tokens as prompts
    prefilled whole."""
    rng = random.Random(3)
    names = [None, "pirate", "robot", "poet", "xs-one", "butler", None, "xs-two"]
    requests = [(names[i], [rng.randrange(10, 500) for _ in range(rng.randint(3, 60))]) for i in range(8)]
    out, pieces = {}, {}
    for chunk in (7, 0):
        eng = BatchedEngine(tiny_model_path, dtype="float32", max_batch=8, max_len=128, max_adapters=8, max_rank=16,
                            prefill_chunk=chunk)
        try:
            for name, path in mixed_adapters["lora"].items():
                eng.load_adapter(name, path)
            for name, path in mixed_adapters["xs"].items():
                eng.load_adapter(name, path, basis=mixed_adapters["basis"])
            out[chunk] = _run_all(eng, requests)
            pieces[chunk] = eng.stats()["prefill_pieces"]
        finally:
            eng.close()
    assert pieces[7] >= 8 and pieces[0] == 0, pieces
    assert out[7] == out[0]


def test_running_streams_keep_decoding_while_a_long_prompt_is_prefilled(tiny_model_path: str) -> None:
    """A request already decoding gets a token between the pieces of a 200-token prompt admitted after it
    (16 prompt tokens per iteration); prefilled whole, the long prompt holds it back for one step. Counted
    from the long prompt's admission (the engine thread's order), not from its submit."""
    counts = {}
    for chunk in (16, 0):
        eng = BatchedEngine(tiny_model_path, dtype="float32", max_batch=4, max_len=256 + 4, prefill_chunk=chunk)
        events: list[str] = []
        emit = eng._emit

        def watched(req, token, emit=emit, events=events):  # noqa: ANN001, ANN202 - the engine thread's order
            events.append("long" if len(req.prompt) == 200 else "short")
            return emit(req, token)

        eng._emit = watched
        admit = eng._admit

        def admitted(admit=admit, events=events):  # noqa: ANN202 - marks when the long prompt gets its row
            out = admit()
            events.extend("admit" for r in out if len(r.prompt) == 200)
            return out

        eng._admit = admitted
        try:
            # long enough that it is still decoding when the long prompt is admitted, however slow the
            # submitting thread (asserted below: otherwise a count of 0 would prove nothing)
            short = eng.generate_token_ids([11, 12, 13], None, SamplingParams(max_tokens=240, temperature=0.0,
                                                                              ignore_eos=True))
            next(short)  # decoding
            long = eng.generate_token_ids(list(range(20, 220)), None, SamplingParams(max_tokens=2, temperature=0.0))
            list(long)
            list(short)
        finally:
            eng.close()
        # the short stream's tokens between the long prompt's admission and its first token: counted from
        # the admission, not from the submit, so a loaded machine's thread timing cannot change the count
        counts[chunk] = events[events.index("admit"):events.index("long")].count("short")
        assert "short" in events[events.index("long"):], "the short stream ended before the long prompt came"
    assert counts[16] >= 10, counts  # a token per piece but the last (13 pieces: 12 here), some slack
    assert counts[0] <= 1, counts


def test_the_loop_accounts_its_time_by_phase(tiny_model_path: str) -> None:
    """``stats()["phase_s"]``: the scheduler loop's busy seconds split into prefill, decode, sampling and
    host work; each phase a real request passes through is counted, and together they fit in the wall time
    the requests took (the bench's host share is read from it)."""
    import time

    eng = BatchedEngine(tiny_model_path, dtype="float32", max_batch=4, max_len=128, torch_threads=1)
    try:
        t = time.perf_counter()
        threads = [threading.Thread(target=lambda s=s: list(eng.generate_token_ids(
            [5, 6, 7, 8 + s], None, SamplingParams(max_tokens=12, temperature=0.7 * s, seed=s, ignore_eos=True))))
            for s in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        wall = time.perf_counter() - t
        phases = eng.stats()["phase_s"]
        assert set(phases) == {"prefill", "decode", "sample", "host"}
        assert all(v > 0 for v in phases.values()), phases
        assert sum(phases.values()) <= wall, (phases, wall)
        assert eng.steps >= 11
    finally:
        eng.close()
