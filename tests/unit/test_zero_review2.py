"""The multi-worker (DeepSpeed ZeRO) path after a second review: every training row is trained on, each
worker the same number of steps (Ray Train's equal split dropped ``len % workers`` rows); a checkpoint
holds the trainable weights and their optimizer state, not the frozen tied embedding, and still resumes
to the uninterrupted run (ZeRO-2 and ZeRO-3); the resume's copy of the ZeRO shards goes when the worker
fails after copying it and before training."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

from adapterfab.jobs.train_loop import train_adapter
from adapterfab.jobs.zero import micro_batch, pad_for_workers
from adapterfab.pipelines.local import epoch_batches
from adapterfab.spec import TrainConfig
from tests.unit.test_train_loop_review import _lora, _rows, _trainable

# --- every row trains, every worker the same steps ---------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _worker_epochs(ds: Any, workers: int, batch_size: int, epochs: int) -> list[list[list[int]]]:
    """Each worker's row indices per step, over ``epochs`` epochs, split as ``run_training_job`` has Ray
    Train split them (``DataConfig(datasets_to_split=["train"])``) and batched as its workers batch them
    (``micro_batch`` rows a step); the workers read at the same time, as Ray Train's do."""
    from ray.train import DataConfig

    shards = DataConfig(datasets_to_split=["train"]).configure({"train": ds}, world_size=workers,
                                                               worker_handles=None, worker_node_ids=None)
    steps: list[list[list[int]]] = [[] for _ in range(workers)]

    def read(rank: int) -> None:
        it = shards[rank]["train"]
        for _ in range(epochs):
            steps[rank].extend([int(i) for i in b["i"]]
                               for b in it.iter_batches(batch_size=micro_batch(batch_size, workers)))

    threads = [threading.Thread(target=read, args=(r,)) for r in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return steps


@pytest.mark.ray
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("rows", "workers", "batch_size"), [(10, 3, 4), (2, 3, 3), (8, 2, 4)])
def test_every_row_trains_and_every_worker_runs_the_same_steps(ray_local, rows: int, workers: int,
                                                               batch_size: int) -> None:
    """10 rows on 3 workers: 4 rows a worker (rows 0 and 1 twice), 2 steps of 2 rows each, where Ray
    Train's split alone gave 3 a worker and never trained row 9; 2 rows on 3 workers (none trained
    before); 8 rows on 2 workers: nothing added."""
    import ray

    ds = ray.data.from_items([{"i": i} for i in range(rows)])
    epochs = 2
    steps = _worker_epochs(pad_for_workers(ds, workers), workers, batch_size, epochs)
    per_epoch = [len(s) // epochs for s in steps]
    assert len({len(s) for s in steps}) == 1 and per_epoch[0] > 0  # every worker: the same number of steps
    assert len({tuple(len(b) for b in s) for s in steps}) == 1  # and the same number of rows in each step
    for e in range(epochs):
        seen = [i for s in steps for b in s[e * per_epoch[0]:(e + 1) * per_epoch[0]] for i in b]
        assert set(seen) == set(range(rows))  # every row, every epoch
        assert len(seen) == -(-rows // workers) * workers  # padded to a multiple of the workers, no more


# --- checkpoints hold what a resume needs, not the frozen tied embedding ---------------------------


def _zero_rank(rank: int, port: int, base: str, root: str) -> None:
    """One of two gloo ranks: for ZeRO-2 then ZeRO-3 (dropout 0.1, its own rows), the uninterrupted run
    writing its step-3 checkpoint as a Ray Train worker does, then a fresh engine resumed from it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    import shutil

    import torch.distributed as dist

    from adapterfab.jobs.launch import read_train_state, write_train_state
    from adapterfab.jobs.zero import deepspeed_config, gathered_trainable

    dist.init_process_group("gloo", rank=rank, world_size=2)
    tc = TrainConfig(steps=5, batch_size=4, dtype="float32", checkpoint_every=3, seed=5, learning_rate=1e-2)
    batches = epoch_batches(_rows(12)[rank::2], 2, tc.seed, 0)
    for stage in (2, 3):
        folder = Path(root) / f"stage{stage}"
        folder.mkdir(exist_ok=True)
        zero = deepspeed_config(stage, tc.batch_size, 2)
        full = train_adapter(base, _lora(0.1), tc, batches, zero=zero,
                             on_checkpoint=lambda _s, st, f=folder: write_train_state(f, st, rank))
        frozen = sorted(n for n, p in full.model.named_parameters(remove_duplicate=False) if not p.requires_grad)
        resume = read_train_state(folder, rank, with_engine=True)
        try:
            resumed = train_adapter(base, _lora(0.1), tc, batches, zero=zero, resume=resume)
        finally:
            shutil.rmtree(resume["engine_dir"], ignore_errors=True)
        with gathered_trainable(full.model):  # ZeRO-3: each rank holds a part of each weight
            full_w = _trainable(full.model)
        with gathered_trainable(resumed.model):
            resumed_w = _trainable(resumed.model)
        torch.save({"frozen": frozen, "full": (full.losses, full_w), "resumed": (resumed.losses, resumed_w)},
                   folder / f"out{rank}.result")
    dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_zero_checkpoint_holds_no_frozen_weight_and_resumes(tiny_model_path: str, tmp_path: Path) -> None:
    """The tiny base ties lm_head to embed_tokens (49152 x 64, frozen). ZeRO-2 checkpoints wrote the
    lm_head (12.6 MB) beside a 1792-parameter adapter; now no frozen weight by any name is written, and a
    resume still trains exactly as the uninterrupted run, under ZeRO-2 and ZeRO-3."""
    pytest.importorskip("deepspeed")
    import torch.multiprocessing as mp
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tiny_model_path).tie_word_embeddings
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_zero_rank, args=(r, port, tiny_model_path, str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(200)
    assert [p.exitcode for p in procs] == [0, 0]
    for stage in (2, 3):
        folder = tmp_path / f"stage{stage}"
        files = [p for p in (folder / "zero").rglob("*") if p.is_file()]
        assert sum(p.stat().st_size for p in files) < 200_000  # 12.6 MB with the lm_head
        assert not [p.name for p in files if p.suffix == ".py"]  # DeepSpeed's offline recovery scripts
        frozen = set(torch.load(folder / "out0.result", weights_only=False)["frozen"])
        assert "base_model.model.lm_head.weight" in frozen
        for f in files:
            if f.suffix == ".pt":
                saved = torch.load(f, weights_only=False)
                names = set(saved.get("module") or {})
                assert not names & frozen, f"{f.name} holds frozen weights {sorted(names & frozen)[:3]}"
                if stage == 2 and "model_states" in f.name:
                    assert names and all("lora_" in n for n in names)  # the trainable weights
        for rank in (0, 1):
            got = torch.load(folder / f"out{rank}.result", weights_only=False)
            (fl, fw), (rl, rw) = got["full"], got["resumed"]
            assert rl == pytest.approx(fl, abs=1e-6)
            assert max(float((rw[n] - fw[n]).abs().max()) for n in fw) < 1e-6


# --- the resume's copy of the ZeRO shards goes whatever fails before training ----------------------


class _Context:  # ray.train.get_context() of worker 0
    def get_world_rank(self) -> int:
        return 0


class _Runtime:  # ray.get_runtime_context() without a cluster
    def get_node_id(self) -> str:
        return "node-test"


def test_resume_copy_of_the_zero_shards_goes_when_the_worker_fails_before_training(
        tiny_model_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restarted ZeRO worker copies its checkpoint's shards to a temp folder, then fails fetching its
    basis (a LoRA job given a basis_uri: lora has none to load), before any training: the copy goes."""
    import ray
    import ray.train

    from adapterfab.errors import RegistryError
    from adapterfab.jobs import launch
    from adapterfab.methods.lora import LoraConfig

    checkpoint = tmp_path / "checkpoint"
    (checkpoint / launch.ZERO_DIR / "adapterfab").mkdir(parents=True)
    (checkpoint / launch.ZERO_DIR / "adapterfab" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 64)
    torch.save({"step": 3, "losses": [1.0] * 3, "tokens": 30, "rng": torch.get_rng_state()},
               checkpoint / launch.TRAIN_STATE.format(rank=0))
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where mkdtemp puts the copy
    # Ray Train's worker API is the edge: worker 0 of a restarted run whose last checkpoint is the above
    monkeypatch.setattr(ray.train, "get_context", lambda: _Context())
    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: object())
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(checkpoint)))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: _Runtime())
    copies: list[Path] = []
    read = launch.read_train_state

    def recorded(folder: Any, rank: int, with_engine: bool = False) -> Any:
        state = read(folder, rank, with_engine)
        copies.append(Path(state["engine_dir"]))
        assert (copies[-1] / "adapterfab" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").exists()
        return state

    monkeypatch.setattr(launch, "read_train_state", recorded)
    job = launch.WorkerJob(job_id="b.acme.zero", base_model_path=tiny_model_path,
                           method=LoraConfig(r=4).model_dump(), train=TrainConfig(steps=4, batch_size=4).model_dump(),
                           mlflow_uri=None, mlflow_run_id=None, progress_board=None, pad_id=0, cpus=1.0,
                           basis_uri="file:///nowhere/basis", workers=2, zero_stage=2)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(RegistryError, match="no shared basis"):
            launch._worker_loop({"job": asdict(job)})
    finally:
        torch.set_num_threads(threads)  # the worker sets its own
    assert copies and copies[0].parent == temp  # the copy was made ...
    assert not copies[0].exists()  # ... and is gone
    assert not list(temp.glob("zero-resume-*"))
