"""The single-job loop's checkpoint and metrics after a review: a resumed job (from a serialized state, from
one kept in memory, on two ZeRO workers with dropout, each worker its own rows) trains exactly as the
uninterrupted one; its tokens/s counts the seconds before the resume; the logged learning rate is the
rate the step used (single-job and fused loops)."""

from __future__ import annotations

import io
import os
import random
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

from adapterfab.jobs.train_loop import lr_lambda, train_adapter
from adapterfab.methods import get_method
from adapterfab.pipelines.local import epoch_batches
from adapterfab.spec import TrainConfig


def _rows(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [r.randint(3, 127) for _ in range(r.randint(5, 12))]
        out.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return out


def _lora(dropout: float) -> Any:
    return get_method("lora").config_cls(r=4, alpha=8, dropout=dropout)


def _trainable(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def _serialized(state: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state, buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=False)


TC = TrainConfig(steps=7, batch_size=3, learning_rate=1e-2, lr_schedule="cosine", warmup_steps=2, dtype="float32",
                 checkpoint_every=3, seed=5)


def _used_rates(tc: TrainConfig) -> list[float]:
    """The rate of each step: LambdaLR's factor after (step - 1) schedule steps."""
    return [tc.learning_rate * lr_lambda(tc)(s - 1) for s in range(1, tc.steps + 1)]


def test_logged_rate_is_the_rate_the_step_used(tiny_model_path: str) -> None:
    logged: list[tuple[int, float]] = []
    train_adapter(tiny_model_path, _lora(0.0), TC, epoch_batches(_rows(10), TC.batch_size, TC.seed, 0),
                  on_step=lambda s, _loss, lr: logged.append((s, lr)))
    assert [s for s, _ in logged] == list(range(1, TC.steps + 1))
    assert [lr for _, lr in logged] == pytest.approx(_used_rates(TC))


def test_fused_logged_rate_is_the_rate_the_step_used(tiny_model_path: str) -> None:
    from transformers import AutoModelForCausalLM

    from adapterfab.jobs.fused import FusedJob, FusedTrainer

    cfg = _lora(0.0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    trainer = FusedTrainer(base, "lora", cfg.resolved_targets(), cfg.r)
    job = FusedJob("j-lr", cfg, TC, epoch_batches(_rows(10), TC.batch_size, TC.seed, 0), lambda: [])
    logged: list[tuple[int, float]] = []
    trainer.train([job], on_step=lambda _j, s, _loss, lr: logged.append((s, lr)))
    assert [s for s, _ in logged] == list(range(1, TC.steps + 1))
    assert [lr for _, lr in logged] == pytest.approx(_used_rates(TC))


def test_resume_from_a_state_kept_in_memory_or_serialized_equals_the_uninterrupted_run(tiny_model_path: str) -> None:
    """LoRA dropout 0.1, warmup + cosine: the step-3 state, kept as handed over (later steps must not change
    it) or through torch.save, resumes to the uninterrupted run's losses and weights."""
    batches = epoch_batches(_rows(10), TC.batch_size, TC.seed, 0)
    saved: dict[str, Any] = {}
    full = train_adapter(tiny_model_path, _lora(0.1), TC, batches, on_checkpoint=lambda _s, st: saved.update(mem=st))
    weights = _trainable(full.model)
    for state in (saved["mem"], _serialized(saved["mem"])):
        resumed = train_adapter(tiny_model_path, _lora(0.1), TC, batches, resume=state)
        assert resumed.losses == pytest.approx(full.losses, abs=1e-6)
        assert _max_diff(_trainable(resumed.model), weights) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: dropout there draws from the CUDA generator")
def test_resume_on_gpu_restores_the_cuda_generator(tiny_model_path: str) -> None:
    batches = epoch_batches(_rows(10), TC.batch_size, TC.seed, 0)
    saved: dict[str, Any] = {}
    full = train_adapter(tiny_model_path, _lora(0.1), TC, batches, device="cuda",
                         on_checkpoint=lambda _s, st: saved.update(s=_serialized(st)))
    resumed = train_adapter(tiny_model_path, _lora(0.1), TC, batches, device="cuda", resume=saved["s"])
    assert resumed.losses == pytest.approx(full.losses, abs=1e-5)
    assert _max_diff(_trainable(resumed.model), _trainable(full.model)) < 1e-5


def test_tokens_per_s_of_a_resumed_job_counts_the_seconds_before_the_resume(tiny_model_path: str) -> None:
    """Resumed at step 18 of 20: all 20 steps' tokens over all 20 steps' seconds (not over the last 2's)."""
    tc = TrainConfig(steps=20, batch_size=3, dtype="float32", checkpoint_every=18)
    batches = epoch_batches(_rows(10), tc.batch_size, tc.seed, 0)
    saved: dict[str, Any] = {}
    full = train_adapter(tiny_model_path, _lora(0.0), tc, batches,
                         on_checkpoint=lambda _s, st: saved.update(s=_serialized(st)))
    resumed = train_adapter(tiny_model_path, _lora(0.0), tc, batches, resume=saved["s"])
    tokens = full.metrics["train_tokens_per_s"] * full.metrics["train_s"]
    assert resumed.metrics["train_tokens_per_s"] * resumed.metrics["train_s"] == pytest.approx(tokens)
    assert resumed.metrics["train_s"] > saved["s"]["train_s"] > 0
    assert resumed.metrics["train_tokens_per_s"] < 3 * full.metrics["train_tokens_per_s"]  # 10x before the fix


def test_a_checkpoint_of_before_per_worker_states_still_resumes(tmp_path: Path) -> None:
    from adapterfab.jobs.launch import OLD_TRAIN_STATE, read_train_state, write_train_state

    assert read_train_state(tmp_path, 0) is None
    torch.save({"step": 3}, tmp_path / OLD_TRAIN_STATE)
    assert read_train_state(tmp_path, 1) == {"step": 3}
    write_train_state(tmp_path, {"step": 4}, 1)
    assert read_train_state(tmp_path, 1) == {"step": 4} and read_train_state(tmp_path, 0) == {"step": 3}


def _zero_rank(rank: int, port: int, base: str, folder: str, out: str) -> None:
    """One of two gloo ranks (ZeRO-2, dropout 0.1, its own rows): the uninterrupted run, writing its
    step-3 checkpoint as a Ray Train worker does into the one folder both ranks' files merge into; then
    a fresh engine resumed from it as a restarted worker does."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    import shutil

    import torch.distributed as dist

    from adapterfab.jobs.launch import read_train_state, write_train_state
    from adapterfab.jobs.zero import deepspeed_config

    dist.init_process_group("gloo", rank=rank, world_size=2)
    tc = TrainConfig(steps=6, batch_size=4, dtype="float32", checkpoint_every=3, seed=5, learning_rate=1e-2)
    batches = epoch_batches(_rows(12)[rank::2], 2, tc.seed, 0)
    zero = deepspeed_config(2, tc.batch_size, 2)
    full = train_adapter(base, _lora(0.1), tc, batches, zero=zero,
                         on_checkpoint=lambda _s, st: write_train_state(folder, st, rank))
    resume = read_train_state(folder, rank, with_engine=True)
    try:
        resumed = train_adapter(base, _lora(0.1), tc, batches, zero=zero, resume=resume)
    finally:
        shutil.rmtree(resume["engine_dir"], ignore_errors=True)
    torch.save({"full": (full.losses, full.metrics, _trainable(full.model)),
                "resumed": (resumed.losses, resumed.metrics, _trainable(resumed.model))}, Path(out) / f"{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_two_zero_workers_resume_each_its_own_state(tiny_model_path: str, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_zero_rank, args=(r, port, tiny_model_path, str(folder), str(tmp_path)))
             for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(150)
    assert [p.exitcode for p in procs] == [0, 0]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=False)
        (fl, fm, fw), (rl, rm, rw) = got["full"], got["resumed"]
        assert rl == pytest.approx(fl, abs=1e-6)
        assert _max_diff(rw, fw) < 1e-6
        assert rm["train_tokens_per_s"] * rm["train_s"] == pytest.approx(fm["train_tokens_per_s"] * fm["train_s"])
