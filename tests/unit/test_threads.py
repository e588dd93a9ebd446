"""Torch's thread count holds in the thread that computes (adapterfab/threads.py): a resident trainer's
groups run on a Ray actor's pool thread, not on the thread that built the trainer."""

from __future__ import annotations

import os
import threading

import pytest

from adapterfab.threads import openmp_threads, use_torch_threads

pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2 or openmp_threads() is None,
                                reason="needs 2+ cores and torch's OpenMP runtime to tell 1 thread from many")


def _in_thread(fn):  # noqa: ANN001, ANN202
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_a_thread_count_set_on_one_thread_does_not_hold_on_another() -> None:
    """What the helper is for: OpenMP keeps the count per thread, so a new thread uses every core."""
    use_torch_threads(1)
    assert openmp_threads() == 1
    assert _in_thread(openmp_threads) == os.cpu_count()

    def pinned() -> int | None:
        use_torch_threads(1)
        return openmp_threads()

    assert _in_thread(pinned) == 1


def test_a_resident_trainer_trains_on_its_thread_count_whatever_thread_calls_it(tiny_model_path: str) -> None:
    from adapterfab.jobs.resident import GroupJob, GroupTask, ResidentWorker

    worker = ResidentWorker(tiny_model_path, {"name": "lora", "r": 4, "dropout": 0.0,
                                              "target_modules": ["q_proj", "v_proj"]}, "float32", torch_threads=1)
    rows = [{"input_ids": list(range(5, 5 + n)), "labels": [-100, -100] + list(range(7, 5 + n))} for n in (6, 8, 9, 7)]
    train = {"steps": 3, "batch_size": 2, "learning_rate": 1e-3}
    task = GroupTask("g", [GroupJob(f"j{i}", worker.method.model_dump(), train, rows) for i in range(2)])
    seen: list[int | None] = []
    forward = worker.trainer._step_losses

    def watched(*args):  # noqa: ANN002, ANN202 - each step's forward (the first runs before any backward,
        seen.append(openmp_threads())  # which would set the thread's count as a side effect)
        return forward(*args)

    worker.trainer._step_losses = watched  # type: ignore[method-assign]
    result = _in_thread(lambda: worker.train_group(task))
    assert all(o.error is None for o in result.outcomes)
    assert seen and set(seen) == {1}, f"OpenMP threads during the group's steps: {seen}"


def test_the_batched_engine_decodes_on_its_thread_count(tiny_model_path: str) -> None:
    """The engine's scheduler loop runs on a thread of its own: the replica's ``torch_threads`` must
    hold there, not only on the thread that built the engine."""
    from adapterfab.serve.batched import BatchedEngine
    from adapterfab.serve.engine import SamplingParams

    eng = BatchedEngine(tiny_model_path, dtype="float32", max_batch=2, max_len=128, max_adapters=2, max_rank=8,
                        torch_threads=1)
    seen: list[int | None] = []
    admit = eng._admit

    def watched():  # noqa: ANN202 - called by the engine's loop, on its thread
        seen.append(openmp_threads())
        return admit()

    eng._admit = watched  # type: ignore[method-assign]
    try:
        list(eng.generate([{"role": "user", "content": "hi"}], None, SamplingParams(max_tokens=3, temperature=0.0)))
    finally:
        eng.close()
    assert seen and set(seen) == {1}, f"OpenMP threads on the engine's loop: {seen}"
