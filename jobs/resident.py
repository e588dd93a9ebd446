"""The resident trainer: loads the base once (quantized when the method asks) and trains fused group after
fused group of jobs (``jobs/fused.py``) for as long as it lives. Plain Python, no Ray: the factory runs it
inside a long-lived Ray actor (``jobs/trainers.py``), benchmarks and tests call it directly.

A group arrives as a ``GroupTask``: each job's tokenized train and eval rows (prepared by Ray Data in
the orchestrator), its method and training settings, and the file the group checkpoints to. The
trainer returns each job's metrics, losses and adapter files (``JobOutcome``); saving them to the
artifact store and registering them happens elsewhere (``jobs/registrar.py``), off the trainer's path.

    w = ResidentWorker(base_path, {"name": "lora", "r": 8, "dropout": 0.0}, dtype="float32")
    result = w.train_group(GroupTask("g1", [GroupJob("job-a", method, train, rows, eval_rows)]))

Fault tolerance: every ``checkpoint_every`` fused steps (the smallest of the group's jobs' settings) the
group's state goes to ``task.checkpoint_path`` (written whole, then renamed into place). A trainer that
finds that file when a group starts resumes from it, so a group whose trainer was killed continues on
another one where it stopped.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterfab.basemodel import pad_token_id
from adapterfab.errors import AdapterfabError
from adapterfab.methods import get_method
from adapterfab.spec import TrainConfig
from adapterfab.threads import use_torch_threads

Rows = list[dict[str, Any]]  # each {"input_ids": [...], "labels": [...]}


@dataclass
class GroupJob:
    job_id: str
    method: dict[str, Any]  # MethodConfig.model_dump()
    train: dict[str, Any]  # TrainConfig.model_dump()
    train_rows: Rows
    eval_rows: Rows = field(default_factory=list)
    run_id: str | None = None  # the job's MLflow run (per-step metrics)
    probes: list[dict[str, Any]] | None = None  # retention probes {question, answers} (None: not measured)


@dataclass
class GroupTask:
    group_id: str
    jobs: list[GroupJob]
    pad_id: int = 0
    checkpoint_path: str | None = None
    activation_checkpointing: bool = False
    fail_at_step: int = 0  # > 0: the group raises at this step (a fault injected by adapterfab/faults.py)
    probe_cache: str | None = None  # folder of the base's answers to retention probes (adapterfab/retention.py)


@dataclass
class JobOutcome:
    job_id: str
    metrics: dict[str, float]
    losses: list[float]
    error: str | None = None
    adapter: Any = None  # jobs.fused.ExportedAdapter (jobs.fused.write_exported writes its folder); None when it failed
    pending_metrics: list[tuple[str, float, int, int]] = field(
        default_factory=list
    )  # (key, value, ms, step) not yet in MLflow


@dataclass
class GroupResult:
    outcomes: list[JobOutcome]
    timing: dict[str, float]  # seconds: build (rows -> batches), train, eval, save (export); flops; resumed_from
    trainer: dict[str, Any]  # pid, load_s, warm (the base was loaded before this group), groups trained
    extra: dict[str, Any] | None = None  # what the checkpoint this group resumed from carried (checkpoint_extra)


class ResidentWorker:
    def __init__(self, base_path: str, method: dict[str, Any], dtype: str = "float32", torch_threads: int = 0,
                 basis: Any = None, device: str | None = None, basis_dir: str | None = None):
        from adapterfab.jobs.fused import FusedTrainer
        from adapterfab.jobs.train_loop import load_base

        self.torch_threads = torch_threads
        use_torch_threads(torch_threads)
        t0 = time.monotonic()
        impl = get_method(method["name"])
        self.method = impl.config_cls(**method)
        if basis is None and basis_dir and impl.load_basis:
            basis = impl.load_basis(Path(basis_dir))
        self.base_path, self.dtype = base_path, dtype
        if device == "cuda":  # inside a Ray GPU actor: the GPU Ray assigned (CUDA_VISIBLE_DEVICES)
            device = "cuda:0"
        base = load_base(base_path, dtype, self.method, device)
        self.trainer = FusedTrainer(base, impl.family, self.method.resolved_targets(),
                                    self.method.r, basis=basis)
        self.load_s = time.monotonic() - t0
        self.groups_trained = 0
        self._answers: Any = None  # retention.AnswerCache: probe -> the base's own answer (it never changes)

    @property
    def tokenizer(self) -> Any:
        """The base's tokenizer: this process's one (loaded at first use), which the data preparation
        here (``TrainerActor.prepare``) uses too."""
        from adapterfab.pipelines.data import load_tokenizer

        return load_tokenizer(self.base_path)

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def probe_rows(self, probes: list[dict[str, Any]], cache: str | None = None) -> list[dict[str, Any] | None]:
        """The retention rows of ``probes`` (adapterfab/retention.probe_rows): the bare base answers the
        probes it has not answered before (once per trainer, or once per base as loaded (dtype, 4-bit:
        retention.loaded_as) and device where ``cache`` names a folder). Called after a group has trained,
        while its adapters wait in their slots (the base itself is unchanged)."""
        from adapterfab import retention

        with self._bare_base_asked() as base:
            return retention.probe_rows(base, self.tokenizer, probes, self._answer_cache(cache))

    @contextmanager
    def _bare_base_asked(self) -> Iterator[Any]:
        """The trainer's base in eval mode while it answers (no adapter is routed outside a step), then
        back in training mode."""
        base = self.trainer.base
        base.eval()
        try:
            yield base
        finally:
            base.train()

    def _answer_cache(self, cache: str | None) -> Any:
        from adapterfab import retention

        if self._answers is None or (cache and self._answers.path is None):
            self._answers = retention.AnswerCache.of(cache, self.base_path, self.trainer.base)
        return self._answers

    def replay_set(self, rows: Rows, train: TrainConfig, cache: str | None = None) -> Any:
        """A job's replay (adapterfab/replay.py): the bare base's answers to the shipped general prompts
        (asked once per trainer, or once per base as loaded and device where ``cache`` names a folder;
        the same cache as the retention probes'), with the openings of the job's own training ``rows``."""
        from adapterfab import replay, retention

        with self._bare_base_asked() as base:
            answers = retention.base_answers(base, self.tokenizer, list(replay.prompts()), self._answer_cache(cache))
        return replay.make_set(self.tokenizer, answers, rows, train)

    def train_group(self, task: GroupTask,
                    on_step: Callable[[str, int, float, float], None] | None = None,
                    on_iteration: Callable[[list[tuple[str, int, float]]], None] | None = None,
                    checkpoint_extra: Callable[[], dict[str, Any]] | None = None) -> GroupResult:
        """Train ``task``'s jobs fused, evaluate them (fused, base figures cached), return each job's
        adapter files and metrics; the trainer keeps nothing of the group afterwards.
        ``checkpoint_extra()`` is stored with each checkpoint (the caller's metrics not yet in MLflow)
        and comes back as ``GroupResult.extra`` from a group that resumed from it."""
        import torch

        from adapterfab.jobs.fused import FusedJob
        from adapterfab.pipelines.local import epoch_batches

        use_torch_threads(self.torch_threads)  # this call's thread, not __init__'s (adapterfab/threads.py)
        warm = self.groups_trained > 0
        t0 = time.monotonic()
        fused = []
        for j in task.jobs:
            train = TrainConfig(**j.train)
            cfg = get_method(j.method["name"]).config_cls(**j.method)
            ev = j.eval_rows
            fused.append(FusedJob(
                j.job_id, cfg, train, epoch_batches(j.train_rows, train.batch_size, train.seed, task.pad_id),
                (lambda ev=ev, bs=train.batch_size: list(epoch_batches(ev, bs, 0, task.pad_id, shuffle=False)(0)))
                if ev else None,
                probe_rows=(lambda probes=j.probes: self.probe_rows(probes, task.probe_cache)) if j.probes else None,
                replay=self.replay_set(j.train_rows, train, task.probe_cache) if train.replay_weight > 0 else None))
        resume = _load_checkpoint(task.checkpoint_path)
        every = min((f.train.checkpoint_every for f in fused if f.train.checkpoint_every), default=0)

        def on_checkpoint(state: dict[str, Any]) -> None:
            if checkpoint_extra:
                state["extra"] = checkpoint_extra()
            _save_checkpoint(state, task.checkpoint_path)  # type: ignore[arg-type]

        first_step_at: list[float] = []

        def iteration(progress: list[tuple[str, int, float]]) -> None:
            if not first_step_at:
                first_step_at.append(time.time())
            if task.fail_at_step and any(step >= task.fail_at_step for _, step, _ in progress):
                raise AdapterfabError(f"injected fault: group {task.group_id} of jobs "
                                      f"{', '.join(j.job_id for j in task.jobs)} fails at step {task.fail_at_step}")
            if on_iteration:
                on_iteration(progress)

        self.trainer.set_checkpointing(task.activation_checkpointing)
        t1 = time.monotonic()
        try:
            results = self.trainer.train(fused, on_step, on_checkpoint=on_checkpoint if task.checkpoint_path else None,
                                         checkpoint_every=every, resume=resume, on_iteration=iteration)
        except BaseException:  # the group stops (an error, or a caller gone): the trainer stays usable
            self._end_group(fused)
            raise
        finally:
            self.trainer.set_checkpointing(False)
        t2 = time.monotonic()
        outcomes = []
        try:
            for job, res in zip(fused, results):  # the files are written by whoever registers them
                exported = self.trainer.export(job) if res.error is None else None
                self.trainer.remove(job.job_id)
                outcomes.append(JobOutcome(job.job_id, dict(res.metrics), list(res.losses), res.error, exported))
        finally:
            self._end_group(fused)
        train_s = max((r.metrics.get("train_s", 0.0) for r in results), default=0.0)
        timing = {"build_s": t1 - t0, "train_s": train_s, "eval_s": max(0.0, t2 - t1 - train_s),
                  "save_s": time.monotonic() - t2, "flops": sum(r.metrics.get("train_flops", 0.0) for r in results),
                  "resumed_from": float((resume or {}).get("iteration", 0)), "jobs": float(len(fused)),
                  "first_step_at": first_step_at[0] if first_step_at else 0.0}
        self.groups_trained += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return GroupResult(outcomes, timing, {"pid": os.getpid(), "load_s": self.load_s, "warm": warm,
                                              "groups_trained": self.groups_trained}, (resume or {}).get("extra"))

    def _end_group(self, fused: list[Any]) -> None:
        """The group's adapters leave the trainer, and with them the rows of the slot buffers sized for
        it: ``Slots`` only grows (a trainer that trained a group of 8 kept 9 rows of weights, gradients
        and moments for every later group, which the planner sized and cut to fit the device with its
        own members' adapters only), so a trainer holds what its current group needs."""
        from adapterfab.jobs.fused_bank import Slots

        for job in fused:
            self.trainer.remove(job.job_id)
        if not self.trainer.slot_keys() and self.trainer.slots.capacity > 1:
            self.trainer.slots = Slots(self.trainer.layers, self.trainer.device)

    # -- the benchmarks' entry point: jobs read from local JSONL files --------------------------------
    def train(self, jobs: list[dict[str, Any]], out_root: str) -> list[dict[str, Any]]:
        """``jobs``: {job_id, dataset (a local JSONL), train (TrainConfig fields), eval_rows?}. Each
        job's data is read and tokenized here, the group trains fused, every adapter is saved to
        ``out_root/<job_id>``. Returns per-job {job_id, metrics, adapter_dir, error, group_timing}."""
        from adapterfab.pipelines.local import encode_file, split_rows

        t0 = time.monotonic()
        tok, pad = self.tokenizer, self.pad_id
        group = []
        for j in jobs:
            train = TrainConfig(**j["train"])
            rows = encode_file(j["dataset"], tok, train.max_seq_len)
            tr, ev = split_rows(rows, train.eval_fraction, j.get("eval_rows"))
            group.append(GroupJob(j["job_id"], self.method.model_dump(), train.model_dump(), tr, ev))
        prepare_s = time.monotonic() - t0
        result = self.train_group(GroupTask(f"bench-{jobs[0]['job_id']}", group, pad))
        from adapterfab.jobs.fused import write_exported

        out = []
        for o in result.outcomes:
            adapter_dir = None
            if o.adapter is not None:
                adapter_dir = str(write_exported(o.adapter, Path(out_root) / o.job_id))
            out.append({"job_id": o.job_id, "metrics": o.metrics, "adapter_dir": adapter_dir, "error": o.error})
        timing = {"prepare_s": prepare_s + result.timing["build_s"], "train_s": result.timing["train_s"],
                  "eval_s": result.timing["eval_s"], "save_s": result.timing["save_s"]}
        for o in out:
            o["group_timing"] = timing
        return out

    def profile(self, jobs: list[dict[str, Any]], out_root: str, row_limit: int = 30) -> str:
        """``train(jobs)`` under torch.profiler: the table of the operators that took the most device
        time (CPU time without a GPU), to see where a fused step goes."""
        import torch
        from torch.profiler import ProfilerActivity, profile

        cuda = torch.cuda.is_available()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            self.train(jobs, out_root)
        table = prof.key_averages()
        for key in (("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)):
            try:
                return table.table(sort_by=key, row_limit=row_limit)
            except (AttributeError, KeyError, ValueError):
                continue
        return table.table(row_limit=row_limit)

    def stats(self) -> dict[str, Any]:
        return {"load_s": self.load_s, "jobs_trained": self.trainer.jobs_trained, "groups_trained": self.groups_trained}


def _save_checkpoint(state: dict[str, Any], path: str) -> None:
    """Written to a temporary file beside ``path`` and renamed over it: a trainer killed while writing
    leaves the previous checkpoint whole."""
    import torch

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load_checkpoint(path: str | None) -> dict[str, Any] | None:
    import torch

    if not path or not Path(path).exists():
        return None
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001 - an unreadable checkpoint costs the group its progress, not its jobs
        warnings.warn(f"cannot read the group checkpoint {path} ({e}); the group trains from the start", stacklevel=2)
        return None


def resident_actor() -> Any:
    import ray

    return ray.remote(ResidentWorker)
