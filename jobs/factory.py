"""One batch through the factory, its stages pipelined:

    prepare (window of groups) ──► queue of ready groups ──► trainer slots ──► registrar
    MLflow runs, Ray Data           bounded: at most           resident trainers  artifact store, MLflow,
    (one execution per window),     AHEAD_GROUPS_PER_SLOT      (jobs/trainers.py)  registry (jobs/registrar.py)
    reuse check, LoRA-XS basis      groups per slot wait       train fused groups  on its own threads

- **Prepare** runs ahead of training in windows of ``WINDOW_JOBS`` jobs: each window's MLflow runs are
  made on a few threads and its datasets go through one Ray Data execution (``prepare_many``; a window
  of a few MB of files through the same UDFs in this process), while the trainers train earlier groups.
  It stops when enough groups wait, so memory stays bounded.
- **Train**: one thread per trainer slot takes the next ready group (preferring the key of the trainer it
  holds), leases a resident trainer for it and hands it the group's rows. A group whose trainer dies
  resumes from its checkpoint on another trainer. Multi-worker (DeepSpeed ZeRO) jobs run on Ray Train.
- **Register**: each finished job goes to the registrar's threads; the slot goes straight on.
- **Progress**: trainers report each group's step to the batch's board once per step (not per job); the
  orchestrator writes what changed once a second, in one transaction.
- **Cancel** (`adapterfab cancel`, polled with the progress): no group is prepared, queued or taken any
  more; the board tells the trainers, which stop their groups at the next step and stay usable (the
  slots release them); every job not yet registering ends CANCELLED, registrations under way finish.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from adapterfab.basemodel import setup_fingerprint
from adapterfab.errors import AdapterfabError
from adapterfab.ids import AdapterId, job_id
from adapterfab.jobs.groups import GroupItem, GroupQueue, start_trainers
from adapterfab.jobs.registrar import (
    Prepared,
    Registrar,
    cancel_job,
    end_unfinished,
    error_for,
    error_text,
    fail_job,
    group_error_for,
)
from adapterfab.lifecycle import JobState
from adapterfab.spec import JobSpec
from adapterfab.tracking import tenant_experiment

if TYPE_CHECKING:
    from adapterfab.jobs.orchestrate import BatchContext
    from adapterfab.jobs.plan import PlannedJob

log = logging.getLogger("adapterfab.factory")
# jobs whose data one Ray Data execution prepares: the first window is one group per trainer slot (the
# first steps wait for it), later ones grow up to this (each execution costs ~0.3-1 s whatever its size)
WINDOW_JOBS = 128
PREPARE_THREADS = 4  # MLflow round trips of preparation that overlap
FIRST_STEP_WAIT_S = 90.0  # on CPUs, the second window waits this long at most for the first step
AHEAD_GROUPS_PER_SLOT = 2  # prepared groups waiting per trainer slot before preparation pauses (at least)
PROGRESS_POLL_S = 1.0
SLOTS_GONE = ("every trainer slot of the batch stopped on an error before this job was trained; see the "
              "orchestrator's log")


class Factory:
    def __init__(self, ctx: BatchContext, jobs: list[JobSpec], planned: list[PlannedJob], groups: list[list[int]],
                 slots: int, pool: Any = None, early: list[tuple[str | None, Future | None]] | None = None,
                 queue: GroupQueue | None = None, marks: dict[str, float] | None = None):
        from adapterfab.jobs.trainers import TrainerPool

        self.ctx, self.jobs, self.planned, self.groups, self.slots = ctx, jobs, planned, groups, slots
        self.queue = queue or GroupQueue()
        self.registrar = Registrar(ctx)
        self.pool = pool or TrainerPool(ctx.batch_id, ctx.spec.resources.trainer_keep_warm_s)
        self.early = early if early is not None else \
            start_trainers(self.pool, ctx.base, jobs, planned, groups, slots, self.queue.drained)
        self.checkpoints = ctx.settings.home / "checkpoints" / ctx.batch_id
        # where the batch's time went (seconds summed over threads): the batch's ``stats`` afterwards
        self.timing: dict[str, float] = {k: 0.0 for k in (
            "prepare_s", "data_s", "acquire_s", "group_build_s", "group_train_s", "group_eval_s", "group_save_s",
            "register_s", "flops")}
        self.first_step_s: float | None = None  # epoch seconds of the first progress report
        # epoch seconds of the batch's way to its first step (the orchestrator's, then the factory's own)
        self.marks: dict[str, float] = dict(marks or {})
        self.first_window_by = "orchestrator"  # or "trainer NAME": a warm trainer prepared it
        self.data_runs: dict[str, int] = {}  # the windows' data runs (the preparer's): {"ray_data": n, "in_process": m}
        self.stepped = threading.Event()  # a first progress report came (or training is over)
        self.trainers: dict[str, dict[str, Any]] = {}  # name -> {groups, warm (its base was loaded before)}
        # slot -> the key of the trainer it holds (or is starting): other slots leave those groups to it
        self._slot_keys: dict[int, str] = {i: k for i, (k, _) in enumerate(self.early) if k is not None}
        self._zero_running = 0
        self._slots_left = slots  # slot threads still taking groups
        self.slots_gone = False  # every slot thread stopped with groups still to come (``_slot_ended``)
        self._queued: set[str] = set()  # jobs handed to the queue: a slot trains (or fails) them
        self.cancelled = threading.Event()  # `adapterfab cancel` asked (StateStore.cancel_batch)
        self._lock = threading.Lock()

    def stats(self) -> dict[str, Any]:
        return {"slots": self.slots, "groups": len(self.groups), "first_step_s": self.first_step_s,
                **{k: round(v, 3) for k, v in self.timing.items()}, "trainers": self.trainers,
                "startup_s": self.startup(), "first_window_by": self.first_window_by, "data_runs": dict(self.data_runs)}

    def startup(self) -> dict[str, float]:
        """Seconds after submit at which the batch passed each step on its way to the first training
        step: the orchestrator's process was launched, claimed the batch (its imports done), connected to
        Ray, asked for trainers, was set up (MLflow); the first window's data were ready, the first group
        went to a trainer, the first step was reported."""
        marks = {**self.marks, **({"first_step": self.first_step_s} if self.first_step_s else {})}
        t0 = marks.pop("submitted", None)
        if t0 is None:
            return {}
        return {k: round(v - t0, 2) for k, v in sorted(marks.items(), key=lambda kv: kv[1])}

    def _mark(self, name: str) -> None:
        with self._lock:
            self.marks.setdefault(name, time.time())

    def _add(self, **seconds: float) -> None:
        with self._lock:
            for k, v in seconds.items():
                self.timing[k] = self.timing.get(k, 0.0) + v

    # -- the whole batch --------------------------------------------------------------------------------
    def run(self) -> None:
        import ray

        self.board = ray.get_actor(self.ctx.board_name)
        # a dead orchestrator's group checkpoints: its jobs start new attempts (new MLflow runs) from the
        # start, and a failure it recorded in one must not end the retry of that job before it trains
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        stop = threading.Event()
        poller = threading.Thread(target=self._poll, args=(stop,), name="progress", daemon=True)
        poller.start()
        preparer = threading.Thread(target=self._prepare_all, name="prepare", daemon=True)
        preparer.start()
        slots = [threading.Thread(target=self._slot, args=(i,), name=f"slot{i}", daemon=True)
                 for i in range(self.slots)]
        for t in slots:
            t.start()
        for t in [preparer, *slots]:
            t.join()
        self.registrar.close()
        self.pool.close()
        stop.set()
        poller.join(timeout=5)
        self._poll_once()
        self._check_cancel()
        end_unfinished(self.ctx, self.cancelled.is_set(), SLOTS_GONE if self.slots_gone else None)
        shutil.rmtree(self.checkpoints, ignore_errors=True)

    # -- prepare ----------------------------------------------------------------------------------------
    def _prepare_all(self) -> None:
        try:
            window: list[int] = []
            # jobs in the window being filled: the first group of every slot (every trainer starts as soon
            # as it can), then doubling up to WINDOW_JOBS
            size = sum(len(g) for g in self.groups[:self.slots])
            for n, g in enumerate(self.groups):
                if self.cancelled.is_set() or self.slots_gone:
                    break  # the jobs not prepared stay PENDING: end_unfinished ends them
                window.append(n)
                if sum(len(self.groups[i]) for i in window) >= size or n == len(self.groups) - 1:
                    self.queue.wait_below(max(AHEAD_GROUPS_PER_SLOT * self.slots, 2), WINDOW_JOBS)
                    first = n < self.slots
                    self._prepare_window_alone(window, first)
                    if first and n < len(self.groups) - 1:  # a next window will come
                        self._await_first_steps()
                    window = []
                    size = min(WINDOW_JOBS, max(2 * size, len(g)))
        except BaseException as e:  # noqa: BLE001 - every job not yet handed on fails with the reason
            log.exception("preparing batch %s failed", self.ctx.batch_id)
            self._fail_unqueued(None, e)
        finally:
            self.queue.close()

    def _prepare_window_alone(self, window: list[int], first: bool) -> None:
        """``_prepare_window``; an error it did not expect (a bug, a lost connection) fails that window's
        jobs not yet queued, with the reason, and the next windows are prepared as usual."""
        try:
            self._prepare_window(window, first=first)
        except Exception as e:  # noqa: BLE001
            log.exception("batch %s: preparing groups %s failed", self.ctx.batch_id, window)
            self._fail_unqueued([self.planned[i].job_id for n in window for i in self.groups[n]], e)

    def _fail_unqueued(self, ids: list[str] | None, e: BaseException) -> None:
        """Jobs of ``ids`` (None: the batch's) still PENDING or PREPARING and not handed to a slot fail."""
        jobs = self.ctx.state.jobs(self.ctx.batch_id)
        sharing = [(j.id, f"{j.tenant}/{j.persona}") for j in jobs]  # (other tenants' ids are replaced in each
        for j in jobs:  # the queued ones train on                     # one's error)
            if (ids is None or j.id in ids) and j.state in (JobState.PENDING, JobState.PREPARING) \
                    and j.id not in self._queued:
                own = error_for(j.id, sharing, e)
                fail_job(self.ctx, j.id, j.mlflow_run_id, AdapterfabError(f"preparation failed: {own}"))

    def _await_first_steps(self) -> None:
        """After the first window, until the first training step is reported (at most FIRST_STEP_WAIT_S),
        when the trainers train on CPUs: the next window's preparation (MLflow runs, data) would take those
        CPUs from the trainers' start and first steps, which the whole batch waits for, while the groups it
        prepares are not needed before the first (starter) groups are trained."""
        if not any(f is not None for _, f in self.early) or \
                any(self.planned[g[0]].gpus > 0 for g in self.groups[:self.slots]):
            return  # no trainer started ahead, or trainers on GPUs (their start hardly needs these CPUs)
        if self._queued:  # the first window has something to train (else, reused or failed: go on)
            self.stepped.wait(FIRST_STEP_WAIT_S)

    def _prepare_window(self, window: list[int], first: bool = False) -> None:
        """One window's MLflow runs and data: a Ray Data execution, or for a few MB of files the same UDFs here
        (the first steps wait for the first window; a later execution's start takes the trainers' CPUs)."""
        from adapterfab.pipelines import data as prep

        t0 = time.monotonic()
        members = [i for n in window for i in self.groups[n]]
        requests = [prep.DataRequest(self.planned[i].job_id, self.jobs[i].dataset, t.max_seq_len, t.eval_fraction,
                                     t.seed, t.max_bad_row_fraction) for i in members for t in [self.jobs[i].train]]

        def data() -> dict[str, Any]:  # Ray Data runs while the jobs' MLflow runs are made
            t1 = time.monotonic()
            try:
                if first and (rows := self._prepare_on_trainer(requests)) is not None:
                    return rows
                return prep.prepare_many(requests, self.ctx.base.path, runs=self.data_runs, in_process_bytes=(
                    prep.FIRST_WINDOW_IN_PROCESS_BYTES if first else prep.WINDOW_IN_PROCESS_BYTES))
            finally:
                self._add(data_s=time.monotonic() - t1)

        with ThreadPoolExecutor(PREPARE_THREADS + 1, thread_name_prefix="prep") as threads:
            rows = threads.submit(data)
            begun = [b for b in threads.map(self._begin, members) if b is not None]
            prepared = rows.result()
            self._mark("first_window")  # (before any group of it is queued)
            done = threads.map(lambda b: self._after_data(b, prepared[b[1]]), begun)
            ready = {p.jid: p for p in done if p is not None}
        self._add(prepare_s=time.monotonic() - t0)
        for n in window:
            group = [ready[jid] for i in self.groups[n] if (jid := self.planned[i].job_id) in ready]
            if not group:
                continue
            self._queued.update(p.jid for p in group)
            first = self.planned[self.groups[n][0]]
            if first.workers > 1:
                item = GroupItem(f"g{n}", group, None)
            else:
                from adapterfab.jobs.plan import needs_activation_checkpointing

                members = [self.planned[i] for i in self.groups[n]]
                ckpt = needs_activation_checkpointing(members, [p.job for p in group],
                                                      self.ctx.spec.resources.device_memory_gb)
                item = GroupItem(f"g{n}", group, self._spec(group[0]), ckpt)
            if not self.queue.put(item):  # the batch was cancelled, or no slot is left to train it
                self._fail_group(item, AdapterfabError(SLOTS_GONE)) if self.slots_gone else self._cancel_group(item)

    def _prepare_on_trainer(self, requests: list[Any]) -> dict[str, Any] | None:
        """The first window prepared on a trainer already leased (a warm one: its lease came back before
        the window was ready), when its files are local and small; None: prepare it here. The trainer has
        the tokenizer loaded; this process would import transformers first (seconds)."""
        import ray

        from adapterfab.pipelines.data import FIRST_WINDOW_IN_PROCESS_BYTES, FIRST_WINDOW_ON_TRAINER, local_bytes

        if not FIRST_WINDOW_ON_TRAINER:
            return None
        size = local_bytes(requests)
        if size is None or size > FIRST_WINDOW_IN_PROCESS_BYTES:
            return None
        here = ray.get_runtime_context().get_node_id()  # the files were found on this node only
        lease = next((le for _, f in self.early if f is not None and f.done() and not f.exception()
                      and (le := f.result()) is not None and le.info.get("node_id") == here), None)
        if lease is None:
            return None
        try:
            got = ray.get(lease.handle.prepare.remote(self.pool.owner, requests, self.ctx.base.path,
                                                      FIRST_WINDOW_IN_PROCESS_BYTES), timeout=120)
        except Exception:  # noqa: BLE001 - prepared here instead
            log.warning("trainer %s could not prepare the first window; preparing it here", lease.name,
                        exc_info=True)
            return None
        if self.ctx.pad_id is None:
            self.ctx.pad_id = got["pad_id"]
        self.first_window_by = f"trainer {lease.name}"
        return got["rows"]

    def _begin(self, i: int) -> tuple[int, str, AdapterId, str, int] | None:
        """PENDING -> PREPARING with the job's MLflow run; None when the job needs nothing more
        (already succeeded, or registered before its orchestrator died) or failed here."""
        from adapterfab.jobs.orchestrate import _close_orphan_run, _finish_if_registered

        ctx, job = self.ctx, self.jobs[i]
        jid, aid = job_id(ctx.batch_id, job.tenant, job.persona), AdapterId(job.tenant, job.persona)
        if self.cancelled.is_set():
            return None  # stays PENDING: end_unfinished cancels it
        try:
            view = ctx.state.job(jid)
            if view.state == JobState.SUCCEEDED:
                return None
            if view.state != JobState.PENDING:
                ctx.state.move_job(jid, JobState.PENDING)
                if _finish_if_registered(ctx, jid, aid):  # it died after registering, before SUCCEEDED
                    if view.mlflow_run_id:  # the run that registered it (left open by a cancel too)
                        ctx.tracking.end_run(view.mlflow_run_id, ok=True)
                    return None
                if view.mlflow_run_id:  # a dead orchestrator left its run open (or a cancel without one)
                    _close_orphan_run(ctx, view.mlflow_run_id, if_running=view.state.terminal)
            run_id = ctx.tracking.start_run(
                aid.key, parent_run_id=ctx.batch_run_id, experiment=tenant_experiment(job.tenant),
                tags={"adapterfab.tenant": job.tenant, "adapterfab.persona": job.persona,
                      "adapterfab.batch_id": ctx.batch_id, "adapterfab.job_id": jid})
            ctx.state.move_job(jid, JobState.PREPARING, attempts=view.attempts + 1, error=None, step=0, loss=None,
                               mlflow_run_id=run_id)
            return i, jid, aid, run_id, view.attempts + 1
        except Exception as e:  # noqa: BLE001 - the job fails, the batch goes on
            fail_job(ctx, jid, None, e)
            return None

    def _after_data(self, begun: tuple[int, str, AdapterId, str, int], rows: Any) -> Prepared | None:
        """The job's data stats into the state and its MLflow run (one batched call), the reuse check,
        the shared basis; a Prepared job to train, or None."""
        from adapterfab.jobs.orchestrate import _reuse_existing, ensure_basis, job_fingerprint, job_run_params

        ctx = self.ctx
        i, jid, aid, run_id, attempt = begun
        job = self.jobs[i]
        try:
            if isinstance(rows, BaseException):
                raise rows
            stats = rows.stats.to_dict()
            ctx.state.update_job(jid, data_stats=stats)
            fingerprint = job_fingerprint(ctx.base.fingerprint, job, stats["sha256"], setup_fingerprint(ctx.base.path))
            ctx.tracking.log_batch(run_id, params=job_run_params(ctx.spec, job, ctx.base.fingerprint),
                                   metrics={k: float(stats[k]) for k in ("total_rows", "bad_rows", "train_rows",
                                                                          "eval_rows")},
                                   tags={"adapterfab.job_fingerprint": fingerprint})
            ctx.tracking.log_text(run_id, json.dumps({"dataset": job.dataset, **stats}, indent=1),
                                  "dataset_manifest.json")
            if not ctx.force and _reuse_existing(ctx, jid, run_id, aid, fingerprint):
                return None
            basis_id, basis_uri = ensure_basis(ctx, job)
            return Prepared(job, jid, aid, run_id, rows, stats, fingerprint, basis_id, basis_uri, attempt)
        except Exception as e:  # noqa: BLE001
            fail_job(ctx, jid, run_id, e)
            return None

    def _spec(self, p: Prepared) -> Any:
        from adapterfab.jobs.trainers import TrainerSpec

        plan = self.ctx.planned[p.jid]
        return TrainerSpec(self.ctx.base.path, self.ctx.base.fingerprint, p.job.method.model_dump(),
                           p.job.train.dtype, p.basis_uri, plan.cpus, plan.gpus)

    # -- train --------------------------------------------------------------------------------------------
    def _slot(self, index: int) -> None:
        lease = None
        try:
            lease = self._prewarm(index)
            while True:
                with self._lock:
                    if lease is not None:
                        self._slot_keys[index] = lease.key
                    else:
                        self._slot_keys.pop(index, None)
                    others = frozenset(k for i, k in self._slot_keys.items() if i != index)
                item = self.queue.take(lease.key if lease else None, others)
                if item is None:
                    break
                try:
                    if item.spec is None:  # a multi-worker job: Ray Train, beside the trainers
                        if lease is not None:
                            self.pool.release(lease, retire=True)
                            lease = None
                        self._train_zero(item)
                        continue
                    if lease is not None and lease.key != item.key:
                        self.pool.release(lease, retire=True)  # its device goes to the other base or shape
                        lease = None
                    lease = self._train_group(lease, item)
                except Exception as e:  # noqa: BLE001 - this group's jobs fail; the slot takes the next group
                    log.exception("slot %d: group %s failed", index, item.gid)
                    self._fail_group(item, e)
                    if lease is not None:
                        self.pool.forget(lease)  # in an unknown state: its lease lapses, the slot starts afresh
                        lease = None
        except BaseException:  # noqa: BLE001 - logged; the jobs it held were failed where it happened
            log.exception("trainer slot %d stopped", index)
        finally:
            try:
                if lease is not None:
                    self.pool.release(lease, retire=self._zero_running > 0)  # else it stays warm
            finally:
                self._slot_ended()

    def _slot_ended(self) -> None:
        """The last slot thread to end with groups still to come (every slot stopped on an error of its own)
        abandons the queue: the preparer stops waiting for room in it, and the jobs nobody will train fail."""
        with self._lock:
            self._slots_left -= 1
            if self._slots_left > 0 or self.queue.drained.is_set():  # (drained: the batch's normal end, or a cancel)
                return
            self.slots_gone = True
        for item in self.queue.cancel():
            self._fail_group(item, AdapterfabError(SLOTS_GONE))

    def _check_cancel(self) -> None:
        """`adapterfab cancel` asked (polled with the progress): the queue stops, its groups are cancelled."""
        if self.cancelled.is_set():
            return
        try:
            if not self.ctx.state.cancel_requested(self.ctx.batch_id):
                return
        except Exception:  # noqa: BLE001 - a busy database: the next poll
            log.debug("cancel check failed", exc_info=True)
            return
        log.warning("batch %s: cancel requested; stopping", self.ctx.batch_id)
        self.cancelled.set()
        self.stepped.set()  # the preparer waits for nothing any more
        self.board.cancel.remote()  # the trainers stop their groups at the next step (_run_group cancels them)
        for item in self.queue.cancel():
            self._cancel_group(item)

    def _cancel_group(self, item: GroupItem) -> None:
        for p in item.prepared:
            cancel_job(self.ctx, p.jid, p.run_id)

    def _fail_group(self, item: GroupItem, e: BaseException) -> None:
        current = {j.id: j.state for j in self.ctx.state.jobs_by_id([p.jid for p in item.prepared])}
        for p in item.prepared:
            if p.jid in current and not current[p.jid].terminal and current[p.jid] != JobState.REGISTERING:
                fail_job(self.ctx, p.jid, p.run_id, e)

    def _register(self, p: Prepared, outcome: Any, tags: dict[str, Any]) -> None:
        from adapterfab.jobs.registrar import register_outcome

        if self.cancelled.is_set():  # trained, not yet registering: cancelled like the rest
            cancel_job(self.ctx, p.jid, p.run_id)
            return
        t0 = time.monotonic()
        register_outcome(self.ctx, p, outcome, tags)
        self._add(register_s=time.monotonic() - t0)

    def _prewarm(self, index: int) -> Any:
        """The trainer ``start_trainers`` leased for this slot's first group, or None."""
        if index >= len(self.early) or self.early[index][1] is None:
            return None
        try:
            return self.early[index][1].result()
        except Exception:  # noqa: BLE001 - logged where it failed
            return None

    def _train_group(self, lease: Any, item: GroupItem) -> Any:
        """Train ``item`` on ``lease``'s trainer (acquired here when None); a trainer that dies is replaced
        and the group resumes from its checkpoint. Returns the lease the slot holds afterwards."""
        from adapterfab import faults
        from adapterfab.jobs.resident import GroupJob, GroupTask
        from adapterfab.retention import answers_folder, job_probes

        ctx = self.ctx
        task = GroupTask(item.gid, [GroupJob(p.jid, p.job.method.model_dump(), p.job.train.model_dump(),
                                             p.data.train, p.data.eval, p.run_id, job_probes(p.job.probes))
                                    for p in item.prepared],
                         ctx.pad(), str(self.checkpoints / f"{item.gid}.pt"), item.checkpointing,
                         fail_at_step=1 if faults.fail_group([p.job.tenant for p in item.prepared]) else 0,
                         probe_cache=str(answers_folder(ctx.settings)))
        self._mark("first_group")
        try:
            return self._run_group(lease, item, task)
        finally:
            self.stepped.set()  # the group ended (trained or failed): no first step to wait for from it

    def _run_group(self, lease: Any, item: GroupItem, task: Any) -> Any:
        """``_train_group``'s work: the tries on trainers, then the outcomes to the registrar."""
        import ray

        from adapterfab.jobs.trainers import MAX_GROUP_ATTEMPTS, LeaseLost

        ctx = self.ctx
        result, error = None, None
        for attempt in range(1, MAX_GROUP_ATTEMPTS + 1):
            try:
                if lease is None:
                    t0 = time.monotonic()
                    lease = self.pool.acquire(item.spec, called_off=self.cancelled)
                    self._add(acquire_s=time.monotonic() - t0)
                self._start_training(item, lease)
                result = self.pool.train(lease, task, self.board, ctx.tracking.uri)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                if lease is None or getattr(e, "actor_init_failed", False):  # a new trainer died starting
                    error = e  # (a base that does not load): another try would load it again, and fail
                    break
                log.warning("group %s: trainer %s died (%s); attempt %d of %d resumes from its checkpoint",
                            item.gid, lease.name if lease else "?", type(e).__name__, attempt, MAX_GROUP_ATTEMPTS)
                if lease is not None:  # ended, in case it is only unreachable: no two trainers on one group
                    self.pool.forget(lease, kill=True)
                lease, error = None, e
            except ray.exceptions.RayTaskError as e:
                if isinstance(getattr(e, "cause", None), LeaseLost) and lease is not None:
                    self.pool.forget(lease)
                    lease, error = None, e
                    continue
                error = e
                break
            except Exception as e:  # noqa: BLE001 - no trainer could be had (resources, a base that fails to load)
                error = e
                break
        if result is None and self.cancelled.is_set():  # stopped by the cancel (or failed meanwhile)
            self._cancel_group(item)
            return lease
        if result is None:
            error = error or AdapterfabError("the group's trainer failed")
            if len(item.prepared) > 1:
                log.error("group %s failed: %s", item.gid, error_text(error))
            for p in item.prepared:
                fail_job(ctx, p.jid, p.run_id, group_error_for(p, item.prepared, error) if len(item.prepared) > 1
                         else error)
            return lease
        t = result.timing
        if t.get("first_step_at"):
            with self._lock:
                self.first_step_s = min(self.first_step_s or t["first_step_at"], t["first_step_at"])
        self._add(group_build_s=t["build_s"], group_train_s=t["train_s"], group_eval_s=t["eval_s"],
                  group_save_s=t["save_s"], flops=t["flops"])
        with self._lock:
            seen = self.trainers.setdefault(
                result.trainer.get("name", "?"), {"groups": 0, "warm": result.trainer.get("warm")}
            )
            seen["groups"] += 1
        peers = ",".join(f"{p.job.tenant}/{p.job.persona}" for p in item.prepared)
        how = f"fused:{len(item.prepared)}" if len(item.prepared) > 1 else "alone"
        by_id = {p.jid: p for p in item.prepared}
        for o in result.outcomes:
            p = by_id[o.job_id]
            if o.error is not None:
                fail_job(ctx, p.jid, p.run_id, AdapterfabError(o.error))
                continue
            o.metrics["node_id"] = result.trainer.get("node_id")
            o.metrics["resumed_from_iteration"] = t["resumed_from"]
            tags = {"training": how, "trainer": result.trainer.get("name", "")}
            if len(item.prepared) > 1:
                tags["fused_with"] = peers
            self.registrar.run(self._register, p, o, tags)
        return lease

    def _start_training(self, item: GroupItem, lease: Any) -> None:
        """TRAINING, with where the group trains (the trainer, its node, whether its base was warm)."""
        ctx = self.ctx
        ids = [p.jid for p in item.prepared]
        plan = ctx.planned[ids[0]]
        placement: dict[str, Any] = {"cpus": plan.cpus, "gpus": plan.gpus, "workers": 1, "zero_stage": None,
                                     "group": item.gid, "trainer": lease.name, "trainer_pid": lease.info.get("pid"),
                                     "node_id": lease.info.get("node_id"),
                                     "warm": bool(lease.info.get("groups_trained")),
                                     "activation_checkpointing": item.checkpointing}
        if len(ids) > 1:
            placement["fused_with"] = ids
        current = {j.id: j.state for j in ctx.state.jobs_by_id(ids)}
        todo = [j for j in ids if current.get(j) != JobState.TRAINING]
        if todo:
            ctx.state.move_jobs(todo, JobState.TRAINING, placement=placement)
        if len(todo) < len(ids):  # a resumed group: the same jobs on another trainer
            for j in ids:
                if j not in todo:
                    ctx.state.update_job(j, placement=placement)

    def _train_zero(self, item: GroupItem) -> None:
        """A job too big for one worker: Ray Train with DeepSpeed ZeRO on several workers."""
        from adapterfab.jobs.launch import train_zero_jobs

        with self._lock:
            self._zero_running += 1
        try:
            train_zero_jobs(self.ctx, item.prepared, self.cancelled)
        finally:
            with self._lock:
                self._zero_running -= 1

    # -- progress -----------------------------------------------------------------------------------------
    def _poll(self, stop: threading.Event) -> None:
        self._since = 0
        while not stop.wait(PROGRESS_POLL_S):
            self._poll_once()
            self._check_cancel()

    def _poll_once(self) -> None:
        import ray

        try:  # the handle run() looked up once (a name lookup per poll is a GCS round trip)
            board = getattr(self, "board", None) or ray.get_actor(self.ctx.board_name)
            version, changes = ray.get(board.changes.remote(getattr(self, "_since", 0)), timeout=10)
            self._since = version
            if changes:
                with self._lock:
                    if self.first_step_s is None:
                        self.first_step_s = time.time()
                self.stepped.set()
                self.ctx.state.update_progress({j: (c["step"], c["loss"]) for j, c in changes.items()})
        except Exception:  # noqa: BLE001 - progress is best effort
            log.debug("progress poll failed", exc_info=True)

