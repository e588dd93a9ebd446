"""REGISTERING, off the trainers' path: a finished job's adapter goes to the artifact store and MLflow,
becomes a registry version with its lineage tags, and passes the promotion gate, while the trainers
go on with the next groups.

``Registrar`` is a small thread pool in the orchestrator; ``register_job`` is one job's registration.
MLflow calls are batched: the job's final metrics, the per-step metrics its trainer had not sent yet
and its placement tags go in one ``log_batch``; the version is created with every lineage tag and the
promotion decision at once (the gate is decided before the version exists), then its aliases are set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterfab.errors import AdapterfabError, plain_message
from adapterfab.ids import AdapterId
from adapterfab.lifecycle import JobState
from adapterfab.methods import get_method
from adapterfab.spec import JobSpec
from adapterfab.storage import open_store

if TYPE_CHECKING:
    from adapterfab.jobs.orchestrate import BatchContext

log = logging.getLogger("adapterfab.registrar")
REGISTRAR_THREADS = 4  # MLflow round trips overlap; the server does the work
PLACEMENT_KEYS = ("node_id", "workers", "zero_stage", "zero_local_param_fraction")
REGISTER_LOCK_WAIT_S = 600.0  # how long a job waits for an identical job of another batch to register


@dataclass
class Prepared:
    """A job whose data is ready and that must be trained (not reused)."""

    job: JobSpec
    jid: str
    aid: AdapterId
    run_id: str
    data: Any  # pipelines.data.PreparedRows (or PreparedData for a Ray Train job)
    stats: dict[str, Any]
    fingerprint: str
    basis_id: str | None
    basis_uri: str | None
    attempt: int = 1  # the job's attempts so far, this one included


def error_text(e: BaseException) -> str:
    """A failure as its job records it: ``adapterfab.errors.plain_message``."""
    return plain_message(e)


def error_for(jid: str, sharing: list[tuple[str, str]], e: BaseException) -> AdapterfabError:
    """A failure shared by several jobs as job ``jid`` records it (its tenant reads it): the job ids and
    adapter ids of the others in ``sharing`` ((job id, adapter id) pairs) are replaced, so it never names
    another tenant's job (the log keeps all)."""
    text = error_text(e)
    for other, aid in sharing:
        if other != jid:
            for name in (other, aid):  # whole ids only: "b.acme.pi" is not a part of "b.acme.pirate"
                text = re.sub(rf"(?<![a-z0-9./-]){re.escape(name)}(?![a-z0-9-])", "<another job of its group>", text)
    return AdapterfabError(text)


def group_error_for(p: Prepared, group: list[Prepared], e: BaseException) -> AdapterfabError:
    """A shared group's failure as one member's job records it: ``error_for`` over the group."""
    return error_for(p.jid, [(q.jid, str(q.aid)) for q in group], e)


def fail_job(ctx: BatchContext, jid: str, run_id: str | None, e: BaseException) -> None:
    log.error("job %s failed: %s\n%s", jid, e, "".join(traceback.format_exception(e)))
    ctx.state.move_job(jid, JobState.FAILED, error=error_text(e))
    if run_id is None:
        return
    try:
        ctx.tracking.log_batch(run_id, tags={"adapterfab.error": error_text(e)[:4000]})
        ctx.tracking.end_run(run_id, ok=False)
    except Exception:  # noqa: BLE001
        log.exception("could not close MLflow run %s", run_id)


def end_unfinished(ctx: BatchContext, cancelled: bool, reason: str | None = None) -> None:
    """Every job of the batch ends in a terminal state: one left unfinished by a failure that escaped its
    own handling (a bug, a lost connection) fails with ``reason`` (or one naming its state), never stays
    TRAINING for ever; in a ``cancelled`` batch it ends CANCELLED."""
    for j in ctx.state.jobs(ctx.batch_id):
        if not j.state.terminal and cancelled:
            cancel_job(ctx, j.id, j.mlflow_run_id)
        elif not j.state.terminal:
            fail_job(ctx, j.id, j.mlflow_run_id, AdapterfabError(
                reason or f"the batch ended with this job {j.state.value}; see the orchestrator's log"))


def cancel_job(ctx: BatchContext, jid: str, run_id: str | None = None) -> None:
    """`adapterfab cancel`: the job ends CANCELLED (its MLflow run KILLED), unless it already ended or its
    registration began (that one finishes: a version is never left half made)."""
    from adapterfab.errors import StateError
    from adapterfab.state import CANCELLED_ERROR

    if ctx.state.job(jid).state.terminal:
        return
    try:
        view = ctx.state.move_job(jid, JobState.CANCELLED, error=CANCELLED_ERROR)
    except StateError:  # terminal, or REGISTERING: it stays as it is
        return
    run_id = run_id or view.mlflow_run_id
    if run_id is None:
        return
    try:
        ctx.tracking.set_tags(run_id, {"adapterfab.error": CANCELLED_ERROR})
        ctx.tracking.client.set_terminated(run_id, "KILLED")
    except Exception:  # noqa: BLE001 - the state says CANCELLED; the run's status is bookkeeping
        log.warning("could not close the MLflow run %s of cancelled job %s", run_id, jid, exc_info=True)


@contextlib.contextmanager
def state_lock(state: Any, key: str, holder: str, wait_s: float, busy: Callable[[str], str]) -> Iterator[None]:
    """The lock ``key`` in the state database, across processes, held by ``holder`` for the block; an
    AdapterfabError (``busy(the other holder)``) after ``wait_s`` of waiting. A holder that died while
    holding it loses it."""
    from adapterfab.procs import pid_alive, proc_token

    pid = os.getpid()
    token = proc_token(pid)
    deadline = time.monotonic() + wait_s
    while (other := state.try_lock(key, holder, pid, token, pid_alive)) is not None:
        if time.monotonic() > deadline:
            raise AdapterfabError(busy(other))
        time.sleep(0.2)
    try:
        yield
    finally:
        state.unlock(key, holder)


def fingerprint_lock(ctx: BatchContext, p: Prepared) -> Any:
    """Registration of ``p``'s adapter and job fingerprint, one job at a time across processes: two
    identical batches running at once (each job trained before either registered) register one
    version, and the second reuses it. A holder that died mid-registration loses the lock."""
    return state_lock(ctx.state, f"register:{p.aid}:{p.fingerprint}", p.jid, REGISTER_LOCK_WAIT_S,
                      lambda holder: f"{p.aid}: an identical job ({holder}) has been registering for "
                                     f"{REGISTER_LOCK_WAIT_S:.0f} s; resume this batch once it is done")


def gate_lock(state: Any, aid: AdapterId, holder: str) -> Any:
    """The lock every change of ``aid``'s versions and aliases by a batch takes (``register_gated``,
    ``complete_registration``), across processes."""
    from adapterfab.mlflow_client import factory_retry_s

    wait_s = REGISTER_LOCK_WAIT_S + factory_retry_s()  # the holder may be riding out an MLflow outage
    return state_lock(state, f"gate:{aid.unversioned()}", holder, wait_s,
                      lambda other: f"{aid}: another job ({other}) has been registering a version of it for "
                                    f"{wait_s:.0f} s; resume this batch once it is done")


def register_gated(state: Any, registry: Any, aid: AdapterId, holder: str, source: str, run_id: str | None,
                   tags: dict[str, Any], gate: Any) -> tuple[Any, Any]:
    """``registry.register_gated``, one registration of an adapter at a time across processes (gated or
    not): two batches training the same persona at once each compared with the production version they
    had read and both were promoted, the later one standing whether or not it was the better; and
    without a gate, the older version's ``candidate`` call could land after the newer one's and keep
    ``candidate`` on the older version. Now the second one's gate sees the first one's outcome and the
    newer version's aliases are set last. (Only jobs of one persona wait for each other.)"""
    with gate_lock(state, aid, holder):
        return registry.register_gated(aid, source, run_id, tags, gate)


def complete_registration(state: Any, registry: Any, version: Any, holder: str) -> Any:
    """``registry.complete_registration`` of ``version`` under the lock registrations of its adapter take
    (``gate_lock``): outside it, a resume read ``candidate`` on an older version, a concurrent batch then
    registered a newer one and set it, and the resume moved ``candidate`` back onto ``version`` (and
    catalogued the adapter as it had read it)."""
    with gate_lock(state, version.id, holder):
        return registry.complete_registration(version)


def auto_gate(policy: Any, metrics: dict[str, Any], stats: dict[str, Any]) -> Callable[[Any], Any]:
    """``promote: auto``'s gate (``decide(production) -> Decision``) for a job with these eval metrics and
    data stats: ``promotion.decide_over``, which compares with production only on the same eval rows
    (``eval_sha256``), as ``registry promote`` does."""
    from functools import partial

    from adapterfab.promotion import decide_over

    return partial(decide_over, policy, metrics, eval_sha256=stats.get("eval_sha256") or None)


def register_job(ctx: BatchContext, p: Prepared, metrics: dict[str, Any], adapter_dir: str,
                 extra_tags: dict[str, Any] | None = None,
                 history: list[tuple[str, float, int, int]] | None = None) -> None:
    """REGISTERING -> SUCCEEDED: the artifact store, MLflow's copy, the registry version with its
    lineage tags and promotion decision. ``history``: per-step metrics the trainer had not yet sent."""
    jid, run_id, t = p.jid, p.run_id, p.job.train
    try:
        metrics = dict(metrics)
        placed = {k: metrics.pop(k) for k in PLACEMENT_KEYS if k in metrics}
        placement = {**(ctx.state.job(jid).placement or {}), **placed}
        ctx.state.move_job(jid, JobState.REGISTERING, step=int(metrics.get("steps", t.steps)),
                           loss=metrics.get("train_loss"), metrics=metrics, placement=placement)
        ctx.tracking.log_batch(run_id, metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                               tags={f"adapterfab.{k}": str(v) for k, v in placed.items()}, step=t.steps,
                               history=history)
        with contextlib.nullcontext() if ctx.force else fingerprint_lock(ctx, p):
            _register_locked(ctx, p, metrics, adapter_dir, placed, extra_tags)
    except Exception as e:  # noqa: BLE001
        fail_job(ctx, jid, run_id, e)


def _register_locked(ctx: BatchContext, p: Prepared, metrics: dict[str, Any], adapter_dir: str,
                     placed: dict[str, Any], extra_tags: dict[str, Any] | None) -> None:
    """The registration proper, under the job fingerprint's lock (none with ``--force``)."""
    from adapterfab.jobs.orchestrate import _reuse_existing, code_version
    from adapterfab.promotion import POLICY_TAG, policy_tag

    job, jid, aid, run_id, stats = p.job, p.jid, p.aid, p.run_id, p.stats
    # exactly once: a job that ran before (a resumed batch, a retried group) never registers twice
    version = ctx.registry.find(aid, "job_id", jid) if p.attempt > 1 else None
    if version is not None:  # registered before its orchestrator died: that version stands, its aliases set
        version = complete_registration(ctx.state, ctx.registry, version, jid)
        ctx.tracking.end_run(run_id, ok=True)
        ctx.state.move_job(jid, JobState.SUCCEEDED, adapter_uri=version.artifact_uri, model_version=version.id.version)
        return
    # an identical job of another batch registered while this one trained: its version stands
    if not ctx.force and _reuse_existing(ctx, jid, run_id, aid, p.fingerprint):
        return
    store = open_store(ctx.settings.artifacts)
    artifact_uri = store.upload_dir(adapter_dir, aid.artifact_prefix(jid))
    source = ctx.tracking.log_dir(run_id, adapter_dir, "adapter")
    tags = {
        "tenant": job.tenant, "persona": job.persona, "method": job.method.name,
        "rank": getattr(job.method, "r", ""), **job.method.tags(),
        "base_model": ctx.spec.base_model, "base_fingerprint": ctx.base.fingerprint,
        "dataset": job.dataset, "dataset_sha256": stats["sha256"], "dataset_rows": stats["total_rows"],
        "dataset_bad_rows": stats["bad_rows"], "train_rows": stats["train_rows"],
        "eval_rows": stats["eval_rows"], "eval_sha256": stats.get("eval_sha256", ""),
        "batch_id": ctx.batch_id, "job_id": jid,
        "code_version": code_version(), "job_fingerprint": p.fingerprint,
        "artifact_uri": artifact_uri, "artifact_root": store.root,
        # the batch's gate, which a later `registry promote` of this version applies (promote: none too)
        POLICY_TAG: policy_tag(ctx.spec.promotion.policy()),
        **{f"metric.{k}": f"{v:.6g}" for k, v in metrics.items() if isinstance(v, float)},
        **get_method(job.method.name).extra_tags(job.method), **(extra_tags or {}),
        **{k: str(v) for k, v in placed.items() if k in ("node_id", "workers", "zero_stage")},
    }
    if p.basis_id:
        tags.update({"basis_id": p.basis_id, "basis_uri": p.basis_uri})
    gate = auto_gate(ctx.spec.promotion.policy(), metrics, stats) if ctx.spec.promote == "auto" else None
    version, decision = register_gated(ctx.state, ctx.registry, aid, jid, source, run_id, tags, gate)
    if decision is not None:
        log.info("%s: %s (%s)", version.id, decision.outcome, decision.reason)
    ctx.tracking.end_run(run_id, ok=True)  # before SUCCEEDED: a resumed batch never revisits a SUCCEEDED job
    ctx.state.move_job(jid, JobState.SUCCEEDED, adapter_uri=artifact_uri, model_version=version.id.version)


def register_outcome(ctx: BatchContext, p: Prepared, outcome: Any, extra_tags: dict[str, Any]) -> None:
    """A trainer's ``JobOutcome``: its adapter's folder written here (off the trainer), then
    ``register_job``."""
    from adapterfab.jobs.fused import write_exported

    try:
        with tempfile.TemporaryDirectory(prefix="af-adapter-") as tmp:
            write_exported(outcome.adapter, Path(tmp) / "adapter")
            register_job(ctx, p, outcome.metrics, str(Path(tmp) / "adapter"), extra_tags, outcome.pending_metrics)
    except Exception as e:  # noqa: BLE001 - the job fails, the batch goes on
        fail_job(ctx, p.jid, p.run_id, e)


class Registrar:
    """Registers finished jobs on a few threads while the trainers train the next groups."""

    def __init__(self, ctx: BatchContext, threads: int = REGISTRAR_THREADS):
        self.ctx = ctx
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="register")
        self._futures: list[Future] = []

    def submit(self, p: Prepared, outcome: Any, extra_tags: dict[str, Any]) -> Future:
        return self.run(register_outcome, self.ctx, p, outcome, extra_tags)

    def run(self, fn: Any, *args: Any) -> Future:
        """``fn(*args)`` on the registrar's threads (a registration wrapped by its caller)."""
        f = self._pool.submit(fn, *args)
        self._futures.append(f)
        return f

    def close(self) -> None:
        """Wait for every registration handed in."""
        self._pool.shutdown(wait=True)
