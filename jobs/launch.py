"""Ray Train wiring: one adapter job = one TorchTrainer run whose worker streams its tenant's Ray Data
shard into ``train_loop.train_adapter``, logs per-step loss to the job's MLflow run, reports progress
to the batch's ProgressBoard actor, and returns the adapter as a Ray Train checkpoint."""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray

PROGRESS_BOARD_PREFIX = "adapterfab-progress-"


@dataclass(frozen=True)
class WorkerJob:
    """Everything a training worker needs, passed explicitly (no globals)."""

    job_id: str
    base_model_path: str
    method: dict[str, Any]  # MethodConfig.model_dump()
    train: dict[str, Any]  # TrainConfig.model_dump()
    mlflow_uri: str | None
    mlflow_run_id: str | None
    progress_board: str | None  # name of the ProgressBoard actor
    pad_id: int
    cpus: float
    basis_uri: str | None = None  # shared frozen factors in the artifact store (LoRA-XS)


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Latest (step, loss) per job of a batch, written by workers and read by the orchestrator."""

    def __init__(self) -> None:
        self.progress: dict[str, dict[str, Any]] = {}

    def update(self, job_id: str, step: int, loss: float) -> None:
        self.progress[job_id] = {"step": step, "loss": loss}

    def read(self) -> dict[str, dict[str, Any]]:
        return dict(self.progress)


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs inside the Ray Train worker."""
    import torch
    from ray import train as rt

    from adapterfab.methods import get_method
    from adapterfab.pipelines.data import PadCollate
    from adapterfab.spec import TrainConfig

    from adapterfab.jobs.train_loop import peak_memory_mb, save_adapter, train_adapter

    job = WorkerJob(**config["job"])
    torch.set_num_threads(max(1, int(job.cpus)))
    method_cfg = get_method(job.method["name"]).config_cls(**job.method)
    train_cfg = TrainConfig(**job.train)
    collate = PadCollate(job.pad_id)
    train_shard = rt.get_dataset_shard("train")
    eval_shard = rt.get_dataset_shard("eval")

    def epoch_batches(epoch: int):  # noqa: ANN202
        return train_shard.iter_torch_batches(
            batch_size=train_cfg.batch_size, collate_fn=collate,
            local_shuffle_buffer_size=4 * train_cfg.batch_size, local_shuffle_seed=train_cfg.seed + epoch)

    def eval_batches():  # noqa: ANN202
        return eval_shard.iter_torch_batches(batch_size=train_cfg.batch_size, collate_fn=collate)

    tracking = None
    if job.mlflow_uri and job.mlflow_run_id:
        from adapterfab.registry import Tracking

        tracking = Tracking(job.mlflow_uri)
    board = ray.get_actor(job.progress_board) if job.progress_board else None

    def on_step(step: int, loss: float, lr: float) -> None:
        if tracking:  # per-step loss and learning rate, with the worker's system metrics
            tracking.log_metrics(job.mlflow_run_id, {"loss": loss, "lr": lr, **peak_memory_mb()}, step=step)
        if board:
            board.update.remote(job.job_id, step, loss)

    basis = None
    if job.basis_uri:
        from adapterfab.export import fetch_basis

        with tempfile.TemporaryDirectory(prefix="basis-") as tmp:  # the loaded basis lives in memory
            basis = fetch_basis(get_method(method_cfg.name), job.basis_uri, tmp)
    result = train_adapter(job.base_model_path, method_cfg, train_cfg, epoch_batches, eval_batches, on_step,
                           basis=basis)
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(result, method_cfg, Path(tmp) / "adapter")
        rt.report(result.metrics, checkpoint=rt.Checkpoint.from_directory(tmp))


def run_training_job(job: WorkerJob, train_ds: Any, eval_ds: Any, storage_path: str, run_name: str
                     ) -> tuple[dict[str, float], str]:
    """Fit one job on Ray Train; returns (metrics, local path of the saved adapter folder)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    os.makedirs(storage_path, exist_ok=True)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"job": asdict(job)},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": job.cpus}),
        datasets={"train": train_ds, "eval": eval_ds},
        run_config=RunConfig(name=run_name, storage_path=storage_path),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"job {job.job_id} finished without a checkpoint")
    return dict(result.metrics), os.path.join(result.checkpoint.path, "adapter")
