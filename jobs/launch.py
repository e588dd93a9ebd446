"""Ray Train wiring for jobs too big for one worker: one job = one TorchTrainer run whose workers
(DeepSpeed ZeRO when more than one) stream the tenant's Ray Data shard into ``train_loop.train_adapter``,
log per-step loss to the job's MLflow run, report progress to the batch's ProgressBoard actor, and
return the adapter as a Ray Train checkpoint. Jobs that fit one worker train on resident trainers
(``jobs/trainers.py``). The batch's ProgressBoard actor lives here too."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray

PROGRESS_BOARD_PREFIX = "adapterfab-progress-"
TRAIN_STATE = "train_state.rank{rank}.pt"  # each worker's own: Ray Train merges the workers' checkpoint folders
OLD_TRAIN_STATE = "train_state.pt"  # the one name every worker wrote before (a checkpoint of then holds one rank's)
KEEP_CHECKPOINTS = 2  # a resume needs the last; one more in case the last was cut short
ZERO_DIR = "zero"  # a ZeRO job's engine checkpoint inside its Ray Train checkpoint (each worker's shard)
MAX_WORKER_FAILURES = 3  # a job's worker may die this often; it resumes from its last checkpoint


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
    gpus: float = 0.0  # per worker; fractional values pack several jobs onto one GPU
    workers: int = 1  # data-parallel workers; > 1 trains with DeepSpeed ZeRO (jobs/zero.py)
    zero_stage: int | None = None
    mlflow_retry_s: float = 1800.0  # how long the worker waits for MLflow to take its buffered metrics
    probes: list[dict[str, Any]] | None = None  # retention probes {question, answers} (adapterfab/retention.py)
    probe_cache: str | None = None  # folder of the base's answers to them


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Latest (step, loss) per job of a batch, written by workers and read by the orchestrator. A fused
    group reports all its jobs in one call (``update_many``); the orchestrator reads only what changed
    since its last read (``changes``), so progress costs O(groups) calls and O(changed jobs) writes."""

    def __init__(self) -> None:
        self.progress: dict[str, dict[str, Any]] = {}
        self.version = 0
        self._changed: dict[str, int] = {}  # job id -> version of its last update
        self.cancelled = False  # `adapterfab cancel`: trainers stop their groups

    def update(self, job_id: str, step: int, loss: float, pid: int | None = None, node: str | None = None) -> None:
        self.version += 1
        self.progress[job_id] = {"step": step, "loss": loss, "pid": pid, "node": node}
        self._changed[job_id] = self.version

    def update_many(self, items: list[tuple[str, int, float, int | None, str | None]]) -> None:
        for job_id, step, loss, pid, node in items:
            self.update(job_id, step, loss, pid, node)

    def read(self) -> dict[str, dict[str, Any]]:
        return dict(self.progress)

    def ping(self) -> bool:
        """Trainers ask: the board lives exactly as long as the batch's orchestrator. False once the
        batch is cancelled (``cancel``): a trainer then stops its group at the next step."""
        return not self.cancelled

    def cancel(self) -> None:
        self.cancelled = True

    def changes(self, since: int) -> tuple[int, dict[str, dict[str, Any]]]:
        """(current version, the jobs updated after version ``since``)."""
        return self.version, {j: self.progress[j] for j, v in self._changed.items() if v > since}


def write_train_state(folder: str | Path, state: dict[str, Any], rank: int) -> None:
    """A training state (``train_adapter``'s) into a checkpoint folder: with a ZeRO engine in it
    (``state["engine"]``) the worker's shard of the engine (not the frozen base), and the rest under the
    worker's own name: each worker's RNG and token count are its own, and all land in one folder."""
    import torch

    state = dict(state)
    engine = state.pop("engine", None)
    if engine is not None:
        from adapterfab.jobs.zero import ZERO_TAG

        engine.save_checkpoint(str(Path(folder) / ZERO_DIR), tag=ZERO_TAG, exclude_frozen_parameters=True)
    torch.save(state, Path(folder) / TRAIN_STATE.format(rank=rank))


def read_train_state(folder: str | Path, rank: int, with_engine: bool = False) -> dict[str, Any] | None:
    """Worker ``rank``'s training state in a checkpoint folder (one of before per-worker files: the one
    there), else None. ``with_engine``: the ZeRO shards are copied to a temp folder named by
    ``state["engine_dir"]`` (the engine loads them once training starts; the caller removes it)."""
    import torch

    path = Path(folder) / TRAIN_STATE.format(rank=rank)
    if not path.exists():
        path = Path(folder) / OLD_TRAIN_STATE
    if not path.exists():
        return None
    state = torch.load(path, weights_only=False)
    if with_engine:
        state["engine_dir"] = tempfile.mkdtemp(prefix="zero-resume-")
        try:
            shutil.copytree(Path(folder) / ZERO_DIR, state["engine_dir"], dirs_exist_ok=True)
        except BaseException:
            shutil.rmtree(state["engine_dir"], ignore_errors=True)
            raise
    return state


def report_train_state(metrics: dict[str, Any], state: dict[str, Any]) -> None:
    """Report a training state (``write_train_state``) as a Ray Train checkpoint."""
    from ray import train as rt

    with tempfile.TemporaryDirectory() as tmp:
        write_train_state(tmp, state, rt.get_context().get_world_rank())
        rt.report(metrics, checkpoint=rt.Checkpoint.from_directory(tmp))


def last_train_state(with_engine: bool = False) -> dict[str, Any] | None:
    """This worker's training state of the last checkpoint when Ray Train restarted it after a failure,
    else None (``read_train_state``)."""
    from ray import train as rt

    last = rt.get_checkpoint()
    if last is None:
        return None
    with last.as_directory() as d:
        return read_train_state(d, rt.get_context().get_world_rank(), with_engine)


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs inside the Ray Train worker."""
    import torch
    from ray import train as rt

    from adapterfab.jobs.train_loop import peak_memory_mb, save_adapter, train_adapter
    from adapterfab.methods import get_method
    from adapterfab.pipelines.data import PadCollate
    from adapterfab.spec import TrainConfig

    job = WorkerJob(**config["job"])
    torch.set_num_threads(max(1, int(job.cpus)))
    method_cfg = get_method(job.method["name"]).config_cls(**job.method)
    train_cfg = TrainConfig(**job.train)
    collate = PadCollate(job.pad_id)
    ctx = rt.get_context()
    rank = ctx.get_world_rank()
    train_shard = rt.get_dataset_shard("train")  # this worker's share of the rows
    eval_shard = rt.get_dataset_shard("eval")  # every worker sees all of it (ZeRO-3 steps in lockstep)
    zero = None
    rows_per_step = train_cfg.batch_size
    if job.workers > 1:
        from adapterfab.jobs.zero import deepspeed_config, micro_batch

        zero = deepspeed_config(job.zero_stage or 2, train_cfg.batch_size, job.workers)
        rows_per_step = micro_batch(train_cfg.batch_size, job.workers)
    device = None
    if job.gpus > 0:
        from ray.train.torch import get_device

        device = get_device()

    def epoch_batches(epoch: int):  # noqa: ANN202
        return train_shard.iter_torch_batches(
            batch_size=rows_per_step, collate_fn=collate,
            local_shuffle_buffer_size=4 * rows_per_step, local_shuffle_seed=train_cfg.seed + epoch)

    def eval_batches():  # noqa: ANN202
        return eval_shard.iter_torch_batches(batch_size=rows_per_step, collate_fn=collate)

    tracking = None
    if job.mlflow_uri and job.mlflow_run_id and rank == 0:
        from adapterfab.tracking import MetricBuffer

        tracking = MetricBuffer(job.mlflow_uri)  # an MLflow outage never stalls training
    board = ray.get_actor(job.progress_board) if job.progress_board and rank == 0 else None
    node = ray.get_runtime_context().get_node_id()

    def on_step(step: int, loss: float, lr: float) -> None:
        if tracking:  # per-step loss and learning rate, with the worker's system metrics
            tracking.log(job.mlflow_run_id, {"loss": loss, "lr": lr, **peak_memory_mb()}, step=step)
        if board:
            board.update.remote(job.job_id, step, loss, os.getpid(), node)

    def on_checkpoint(step: int, state: dict[str, Any]) -> None:
        if tracking:
            tracking.flush()  # the steps this checkpoint covers are in MLflow before it counts
        report_train_state({"step": step}, state)

    def replay(model: Any) -> Any:  # the job's replay set: the base's answers, the persona's openings
        if train_cfg.replay_weight <= 0:
            return None
        from transformers import AutoTokenizer

        from adapterfab import replay as rp
        from adapterfab import retention

        # ZeRO workers generate together: no cache one of them could hit alone
        cache = retention.AnswerCache.of(job.probe_cache if zero is None else None, job.base_model_path, model)
        return rp.for_peft_model(model, AutoTokenizer.from_pretrained(job.base_model_path),
                                 list(train_shard.iter_rows()), train_cfg, cache)

    resume = last_train_state(with_engine=zero is not None)
    try:  # from here on the resume's copy of the ZeRO shards is removed whatever fails
        basis = None
        if job.basis_uri:
            from adapterfab.export import fetch_basis

            with tempfile.TemporaryDirectory(prefix="basis-") as tmp:  # the loaded basis lives in memory
                basis = fetch_basis(get_method(method_cfg.name), job.basis_uri, tmp)
        result = train_adapter(job.base_model_path, method_cfg, train_cfg, epoch_batches, eval_batches, on_step,
                               basis=basis, resume=resume, on_checkpoint=on_checkpoint, zero=zero, device=device,
                               replay=replay)
    finally:
        if resume and resume.get("engine_dir"):
            shutil.rmtree(resume["engine_dir"], ignore_errors=True)
    if job.probes:  # every worker takes part (ZeRO-3 gathers each layer's weights for its forward)
        from transformers import AutoTokenizer

        from adapterfab.jobs.evaluate import retention_of

        together = None
        if zero is not None:  # ZeRO workers ask the base together (none waits on another's claim)
            from adapterfab.jobs.zero import any_worker

            device = next(result.model.parameters()).device
            together = lambda missing: any_worker(missing, device)  # noqa: E731
        result.metrics.update(retention_of(result.model, AutoTokenizer.from_pretrained(job.base_model_path),
                                           job.probes, job.probe_cache, job.base_model_path, together))
    if tracking:  # every step's metrics are in MLflow before the job reports done (or the job fails)
        tracking.close(job.mlflow_retry_s)
    placement = {"node_id": node, "workers": job.workers, "zero_stage": job.zero_stage or 0}
    if zero is not None:
        from adapterfab.jobs.zero import gathered_trainable, local_fraction

        placement["zero_local_param_fraction"] = local_fraction(result.model)
        with tempfile.TemporaryDirectory() as tmp:
            with gathered_trainable(result.model):  # every worker takes part; rank 0 writes
                if rank == 0:
                    save_adapter(result, method_cfg, Path(tmp) / "adapter")
            rt.report({**result.metrics, **placement},
                      checkpoint=rt.Checkpoint.from_directory(tmp) if rank == 0 else None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(result, method_cfg, Path(tmp) / "adapter")
        rt.report({**result.metrics, **placement}, checkpoint=rt.Checkpoint.from_directory(tmp))


def scaling(cpus: float, gpus: float, workers: int = 1) -> Any:
    """Ray Train's ScalingConfig for a job's workers: ``cpus`` and ``gpus`` each (a fraction of a GPU
    packs several jobs onto one device; Ray places them and sets CUDA_VISIBLE_DEVICES)."""
    from ray.train import ScalingConfig

    resources: dict[str, float] = {"CPU": cpus}
    if gpus > 0:
        resources["GPU"] = gpus
    return ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=resources)


def run_training_job(job: WorkerJob, train_ds: Any, eval_ds: Any, storage_path: str, run_name: str
                     ) -> tuple[dict[str, float], str]:
    """Fit one job on Ray Train (``job.workers`` workers: DeepSpeed ZeRO when more than one); returns
    (metrics, local path of the saved adapter folder)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    os.makedirs(storage_path, exist_ok=True)
    if job.workers > 1:  # Ray Train's equal split drops len % workers rows: pad to a multiple first
        from adapterfab.jobs.zero import pad_for_workers

        train_ds = pad_for_workers(train_ds, job.workers)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"job": asdict(job)},
        scaling_config=scaling(job.cpus, job.gpus, job.workers),
        torch_config=TorchConfig(backend="nccl" if job.gpus > 0 else "gloo"),
        datasets={"train": train_ds, "eval": eval_ds},
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=MAX_WORKER_FAILURES),
                             checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"job {job.job_id} finished without a checkpoint")
    return dict(result.metrics), os.path.join(result.checkpoint.path, "adapter")


def train_zero_jobs(ctx: Any, prepared: list[Any], cancelled: Any) -> None:
    """The factory's jobs too big for one worker (``prepared``: registrar.Prepared), one after another:
    each a Ray Train job with DeepSpeed ZeRO on several workers, registered as it ends; a job fails
    alone; once ``cancelled`` (a threading.Event) is set the rest are cancelled."""
    from adapterfab.jobs.registrar import cancel_job
    from adapterfab.jobs.trainers import retire_idle_trainers

    retire_idle_trainers()  # their devices are what the ZeRO workers wait for
    storage = ctx.settings.home / "ray_results"
    for p in prepared:
        if cancelled.is_set():  # (a running Ray Train job ends its steps; then it is cancelled)
            cancel_job(ctx, p.jid, p.run_id)
            continue
        run_name = f"{p.jid}.a{p.attempt}"
        try:
            _train_zero_job(ctx, p, cancelled, str(storage), run_name)
        finally:  # registered (its adapter uploaded), failed or cancelled: the run's checkpoints go
            shutil.rmtree(storage / run_name, ignore_errors=True)


def _train_zero_job(ctx: Any, p: Any, cancelled: Any, storage_path: str, run_name: str) -> None:
    """One job of ``train_zero_jobs``: trained in Ray Train run ``run_name``, then registered, failed or
    cancelled."""
    from adapterfab.jobs.registrar import cancel_job, fail_job, register_job
    from adapterfab.lifecycle import JobState
    from adapterfab.retention import answers_folder, job_probes

    plan = ctx.planned[p.jid]
    try:
        ctx.state.move_job(p.jid, JobState.TRAINING, total_steps=p.job.train.steps,
                           placement={"cpus": plan.cpus, "gpus": plan.gpus, "workers": plan.workers,
                                      "zero_stage": plan.zero_stage})
        job = WorkerJob(
            job_id=p.jid, base_model_path=ctx.base.path, method=p.job.method.model_dump(),
            train=p.job.train.model_dump(), mlflow_uri=ctx.tracking.uri, mlflow_run_id=p.run_id,
            progress_board=ctx.board_name, pad_id=ctx.pad(), cpus=plan.cpus, basis_uri=p.basis_uri,
            gpus=plan.gpus, workers=plan.workers, zero_stage=plan.zero_stage,
            mlflow_retry_s=ctx.tracking.retry_s, probes=job_probes(p.job.probes),
            probe_cache=str(answers_folder(ctx.settings)))
        train_ds = ray.data.from_items([_listed(r) for r in p.data.train])
        eval_ds = ray.data.from_items([_listed(r) for r in p.data.eval])
        metrics, adapter_dir = run_training_job(job, train_ds, eval_ds, storage_path, run_name)
    except Exception as e:  # noqa: BLE001
        fail_job(ctx, p.jid, p.run_id, e)
        return
    if cancelled.is_set():
        cancel_job(ctx, p.jid, p.run_id)
        return
    register_job(ctx, p, metrics, adapter_dir, {"training": f"zero{plan.zero_stage}:{plan.workers}"})


def _listed(row: dict[str, Any]) -> dict[str, list[int]]:
    return {"input_ids": [int(x) for x in row["input_ids"]], "labels": [int(x) for x in row["labels"]]}
