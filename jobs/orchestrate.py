"""Runs a batch to a terminal state: for every job, Ray Data prepares the tenant's data, Ray Train fits
the adapter, the artifact store keeps its files, MLflow records the run and registers the version.

``adapterfab submit`` records the batch in the state database and starts this module as a detached
process (``python -m adapterfab.jobs.orchestrate BATCH_ID``), so a batch goes on when the CLI exits and
``adapterfab status`` reads its progress from the database. A job that fails (bad data, a training
error) is marked FAILED with its reason; the other jobs go on. Re-running the orchestrator on a batch
skips SUCCEEDED jobs and restarts the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterfab import __version__
from adapterfab.basemodel import BaseModelRef, pad_token_id, resolve_base_model
from adapterfab.cluster import connect_ray
from adapterfab.errors import AdapterfabError, StackError
from adapterfab.ids import AdapterId, basis_prefix, job_id
from adapterfab.jobs.admission import admit
from adapterfab.jobs.registrar import Prepared, complete_registration, error_text, fail_job, register_job, state_lock
from adapterfab.lifecycle import BatchState, JobState
from adapterfab.methods import get_method
from adapterfab.mlflow_client import factory_retry_s
from adapterfab.registry import Registry
from adapterfab.registry_index import RegistryIndex
from adapterfab.settings import Settings
from adapterfab.spec import BatchSpec, JobSpec, load_spec, parse_spec
from adapterfab.state import StateStore
from adapterfab.storage import MANIFEST, open_store, s3_object_error
from adapterfab.threads import one_torch_thread
from adapterfab.tracking import Tracking

__all__ = ["Prepared", "register_job", "create_batch", "run_batch", "prepare_resume",
           "launch_detached", "BatchContext"]
log = logging.getLogger("adapterfab.orchestrate")
_error_text = error_text
_fail_job = fail_job


def new_batch_id() -> str:
    return time.strftime("b-%Y%m%d-%H%M%S-", time.gmtime()) + secrets.token_hex(3)


def create_batch(settings: Settings, spec_path: str | Path, force: bool = False,
                 batch_id: str | None = None, checked: tuple[Any, Any, str, Any] | None = None) -> str:
    """Validate a spec (schema + semantics, no compute), plan it, and record the batch, its jobs (as
    PENDING) and the plan, which the orchestrator runs as it is: a submit validates and plans once.
    ``force``: train every job even if the registry already has a version from the same spec, data
    and code (otherwise such a job reuses that version)."""
    if checked is not None:  # (spec, jobs, text, plan) the caller loaded and checked under ``batch_id``
        spec, jobs, text, planned = checked
    else:
        spec, jobs, text = load_spec(spec_path)
        batch_id = batch_id or new_batch_id()
        planned = admit(spec, jobs, dataset_exists=s3_object_error, batch_id=batch_id)
    assert batch_id is not None
    StateStore(settings.state_url).create_batch(
        batch_id, spec.name, text, str(Path(spec_path).resolve()), spec.base_model,
        [{"id": job_id(batch_id, j.tenant, j.persona), "tenant": j.tenant, "persona": j.persona,
          "method": j.method.name, "total_steps": j.train.steps} for j in jobs],
        options={"force": force}, plan=[p.to_dict() for p in planned] if planned is not None else None,
    )
    return batch_id


def prepare_resume(settings: Settings, batch_id: str) -> int:
    """``submit --resume``: make a batch whose orchestrator died (killed, machine rebooted) runnable
    again. Refused while its orchestrator still runs. SUCCEEDED jobs are kept as they are; the others
    (left PREPARING/TRAINING/REGISTERING by the dead orchestrator, or FAILED) run again when the
    orchestrator starts (``prepare_job``). Returns how many jobs are left to run."""
    from adapterfab.procs import pid_alive

    todo = StateStore(settings.state_url).reopen_batch(batch_id, pid_alive)  # atomic check and reopen
    if todo:
        log.info("batch %s: resuming %d unfinished job(s)", batch_id, len(todo))
    return len(todo)


class BatchHeld(AdapterfabError):
    """Another live orchestrator runs the batch (two `submit --resume` at once): this one stands down."""


LAUNCHED_AT_ENV = "ADAPTERFAB_ORCHESTRATOR_LAUNCHED_AT"  # epoch seconds: the batch's start-up timeline


def launch_detached(settings: Settings, batch_id: str) -> int:
    """Start the orchestrator for ``batch_id`` as its own process (it outlives the CLI)."""
    settings.logs.mkdir(parents=True, exist_ok=True)
    logf = (settings.logs / f"{batch_id}.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapterfab.jobs.orchestrate", batch_id],
        stdout=logf,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "ADAPTERFAB_HOME": str(settings.home), LAUNCHED_AT_ENV: repr(time.time())},
    )
    return proc.pid  # it claims the batch itself (StateStore.claim_batch): one orchestrator per batch


_CODE_VERSION: str | None = None


def code_version() -> str:
    """``<package version>+<git commit>[-dirty]`` when running from a checkout, else the version."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        try:
            sha = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12", "--exclude=*"],
                                 capture_output=True, text=True, cwd=Path(__file__).parent,
                                 timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            sha = ""
        _CODE_VERSION = f"{__version__}+{sha}" if sha else __version__
    return _CODE_VERSION


def job_fingerprint(base_fingerprint: str, job: JobSpec, dataset_sha256: str, base_setup: str = "") -> str:
    """What makes two jobs the same: base weights (and ``base_setup``: its config, tokenizer and chat
    template, ``basemodel.setup_fingerprint``), method and training hyper-parameters, the data's bytes and
    the code. A resubmitted job with the same fingerprint reuses the registered version."""
    fields = {"base": base_fingerprint, "method": job.method.model_dump(mode="json"),
              "train": job.train.model_dump(mode="json"), "data": dataset_sha256, "code": code_version()}
    if base_setup:
        fields["base_setup"] = base_setup
    if job.probes:  # its own retention probes are part of what the version records
        fields["probes"] = [p.model_dump(mode="json") for p in job.probes]
    payload = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


_BASIS_LOCKS: dict[str, threading.Lock] = {}
_BASIS_LOCKS_GUARD = threading.Lock()
BASIS_LOCK_WAIT_S = 3600.0  # another process computing the same basis (a large base's SVD takes minutes)


def ensure_basis(ctx: BatchContext, job: JobSpec) -> tuple[str | None, str | None]:
    """For methods with shared frozen factors (LoRA-XS): the basis id and its artifact-store URI,
    computed once per (base fingerprint, targets, rank) from the full-precision weights and reused by
    every job and every later batch; registered as ``afbasis.<id>`` in MLflow. (None, None) otherwise."""
    impl = get_method(job.method.name)
    if impl.compute_basis is None or impl.basis_id is None or impl.save_basis is None:
        return None, None
    bid = impl.basis_id(job.method, ctx.base.fingerprint)
    store = open_store(ctx.settings.artifacts)
    prefix = basis_prefix(bid)
    with _BASIS_LOCKS_GUARD:
        lock = _BASIS_LOCKS.setdefault(bid, threading.Lock())
    with lock:
        if store.exists(prefix + MANIFEST):
            return bid, store.uri(prefix)
        # one process computes it: another orchestrator (a batch beside this one) waits and reuses it
        with state_lock(ctx.state, f"basis:{bid}", ctx.batch_id, BASIS_LOCK_WAIT_S,
                        lambda other: f"the shared basis {bid} has been computed by batch {other} for "
                                      f"{BASIS_LOCK_WAIT_S:.0f} s; resume this batch once it is done"):
            if store.exists(prefix + MANIFEST):
                return bid, store.uri(prefix)
            return bid, _compute_basis(ctx, job, impl, bid, store, prefix)


def _compute_basis(ctx: BatchContext, job: JobSpec, impl: Any, bid: str, store: Any, prefix: str) -> str:
    """``ensure_basis``'s work when the basis is not in the artifact store yet: its URI once stored."""
    import tempfile

    import torch

    from adapterfab.threads import importing

    with importing():  # (on a preparation thread)
        from transformers import AutoModelForCausalLM
    full = AutoModelForCausalLM.from_pretrained(ctx.base.path, dtype=torch.float32)
    t0 = time.monotonic()
    # on one torch thread: the orchestrator holds no Ray CPU and its training jobs may occupy every core,
    # where a LAPACK call on more threads than it can get waits at every barrier for a descheduled
    # thread (beside a training job on 2 CPUs, SmolLM2's LoRA-XS basis took 61 s that way and 2.6 s on
    # one thread); the orchestrator runs no other heavy torch work, so overlapping blocks need nothing
    with one_torch_thread():
        basis = impl.compute_basis(full, job.method, ctx.base.fingerprint)
    svd_s = time.monotonic() - t0
    del full
    with tempfile.TemporaryDirectory() as tmp:
        impl.save_basis(basis, Path(tmp))
        uri = store.upload_dir(tmp, prefix)
        source = ctx.tracking.log_dir(ctx.batch_run_id, tmp, f"bases/{bid}")
    ctx.tracking.log_metrics(ctx.batch_run_id, {f"basis_svd_s.{bid}": svd_s})
    ctx.registry.register_basis(bid, source, ctx.batch_run_id, {
        "basis_id": bid, "artifact_uri": uri, "artifact_root": store.root, "base_model": ctx.spec.base_model,
        "base_fingerprint": ctx.base.fingerprint, "method": job.method.name,
        "r": getattr(job.method, "r", ""), "target_modules": str(getattr(job.method, "target_modules", "")),
        "svd_s": f"{svd_s:.3f}"})
    log.info("computed basis %s in %.2fs -> %s", bid, svd_s, uri)
    return uri


@dataclass
class BatchContext:
    settings: Settings
    state: StateStore
    batch_id: str
    spec: BatchSpec
    base: BaseModelRef
    tracking: Tracking
    registry: Registry
    batch_run_id: str
    board_name: str
    pad_id: int | None  # None until known: ``pad()``
    force: bool = False
    planned: dict[str, Any] = field(default_factory=dict)  # job id -> jobs.plan.PlannedJob (every job)
    factory: Any = None  # jobs.factory.Factory while it runs (its timings afterwards)

    def pad(self) -> int:
        """The base's pad id: from a warm trainer that prepared the first window, else from the tokenizer
        loaded here (not before it is needed: importing transformers takes seconds)."""
        if self.pad_id is None:
            from adapterfab.pipelines.data import load_tokenizer

            self.pad_id = pad_token_id(load_tokenizer(self.base.path))
        return self.pad_id


def job_run_params(spec: BatchSpec, job: JobSpec, base_fingerprint: str) -> dict[str, Any]:
    """A job's MLflow run parameters: the spec's values only, never the environment (credentials stay
    out; a dataset URI cannot hold any, the spec refuses user:secret@)."""
    return {
        **{f"method.{k}": v for k, v in job.method.model_dump().items()},
        **{f"train.{k}": v for k, v in job.train.model_dump().items()},
        "dataset": job.dataset, "base_model": spec.base_model, "base_fingerprint": base_fingerprint,
    }


def _close_orphan_run(ctx: BatchContext, run_id: str, if_running: bool = False) -> None:
    """Close an earlier attempt's MLflow run that its orchestrator left open; with ``if_running``, only
    when MLflow still has it RUNNING (a job that ended without its orchestrator: a cancel while none
    ran ends the job in the state database only; a run that ended is left as it ended)."""
    try:
        if if_running and ctx.tracking.client.get_run(run_id).info.status != "RUNNING":
            return
        ctx.tracking.set_tags(run_id, {"adapterfab.error": "orchestrator died; the job ran again (resume)"})
        ctx.tracking.client.set_terminated(run_id, "KILLED")
    except Exception:  # noqa: BLE001 - bookkeeping of the dead attempt only
        log.warning("could not close the orphaned MLflow run %s", run_id, exc_info=True)


def _finish_if_registered(ctx: BatchContext, jid: str, aid: AdapterId) -> bool:
    """Exactly once: a job whose version was registered (its ``job_id`` tag) before its orchestrator died
    succeeds with that version instead of training and registering again; what its registration had not
    done yet (``candidate``, a promotion the gate decided, the catalogue) is done now."""
    existing = ctx.registry.find(aid, "job_id", jid)
    if existing is None:
        return False
    log.info("job %s: already registered as %s before the orchestrator died", jid, existing.id)
    existing = complete_registration(ctx.state, ctx.registry, existing, jid)  # under the persona's gate lock
    ctx.state.move_job(jid, JobState.PREPARING)
    ctx.state.move_job(jid, JobState.SUCCEEDED, adapter_uri=existing.artifact_uri, metrics=existing.metrics,
                       model_version=existing.id.version, step=ctx.state.job(jid).total_steps)
    return True


def _reuse_existing(ctx: BatchContext, jid: str, run_id: str, aid: AdapterId, fingerprint: str) -> bool:
    """Idempotent resubmit: if a version with this job's fingerprint exists, the job succeeds with it
    (no training, no new version). Returns whether it did."""
    existing = ctx.registry.find(aid, "job_fingerprint", fingerprint)
    if existing is None:
        return False
    metrics = existing.metrics
    log.info("job %s: same spec, data and code as %s; reusing it (submit --force retrains)", jid, existing.id)
    ctx.tracking.set_tags(run_id, {"adapterfab.reused_version": str(existing.id)})
    ctx.tracking.end_run(run_id, ok=True)  # before SUCCEEDED: a resumed batch never revisits a SUCCEEDED job
    ctx.state.move_job(jid, JobState.SUCCEEDED, adapter_uri=existing.artifact_uri, metrics=metrics,
                       model_version=existing.id.version, reused_version=existing.id.version,
                       step=ctx.state.job(jid).total_steps)
    return True


def load_plan(batch: Any, spec: BatchSpec, jobs: list[JobSpec], base_path: str) -> list[Any]:
    """The plan recorded at submit (``create_batch``); a batch recorded before plans were stored is
    planned here."""
    from dataclasses import replace

    from adapterfab.jobs.plan import PlannedJob, plan_batch

    if batch.plan:
        planned = [PlannedJob(**p) for p in batch.plan]
        if spec.resources.device_memory_gb and all(p.est_memory_gb is None for p in planned):
            # planned at submit without the base's shapes (an s3:// base, or a name not converted on the
            # submitting machine): now that the base is here, its memory decides workers and ZeRO (a job
            # that fits no packing fails the batch with PlanError, as `validate` would have said)
            planned = plan_batch(batch.id, spec, jobs, base_path)
    else:
        planned = plan_batch(batch.id, spec, jobs, base_path)
    if not spec.resources.fuse:
        planned = [replace(p, fused_group=None) for p in planned]
    return planned


def run_batch(settings: Settings, batch_id: str) -> BatchState:
    from adapterfab.procs import pid_alive, proc_token

    state = StateStore(settings.state_url)  # the claim first: `submit --wait` follows this pid from here
    pid, token = os.getpid(), proc_token(os.getpid())
    batch = state.claim_batch(batch_id, pid, token, pid_alive)
    if batch is None:
        held = state.get_batch(batch_id)
        raise BatchHeld(f"batch {batch_id} is run by orchestrator pid {held.orchestrator_pid}; not starting another")
    if BatchState(batch.state).terminal:  # reopened, then finished by the orchestrator that won the claim
        log.warning("batch %s already ended %s; nothing to run", batch_id, batch.state)
        return BatchState(batch.state)
    beating = threading.Event()
    threading.Thread(target=_heartbeat, args=(state, batch_id, pid, token, beating), name="heartbeat",
                     daemon=True).start()
    try:
        return _run_claimed(settings, state, batch_id, batch)
    finally:
        beating.set()


EXIT_DEPOSED = 75  # the orchestrator's exit status when another one took its batch over


def _deposed() -> None:
    """Another orchestrator holds the batch now (this one was judged dead): stop at once, writing
    nothing more. The new holder resumes the batch as after a crash, which loses and repeats nothing
    (a registration cut short is finished or redone once: jobs/registrar.py)."""
    logging.shutdown()
    os._exit(EXIT_DEPOSED)


def _heartbeat(state: StateStore, batch_id: str, pid: int, token: str | None, stop: threading.Event,
               on_lost: Any = _deposed) -> None:
    """The claim's sign of life, every HEARTBEAT_S: what an orchestrator on another host (a Ray Job's
    node), whose pid cannot be checked, is judged by (procs.holder_alive). A beat that finds the claim
    gone calls ``on_lost`` (by default: the process exits), so two orchestrators never run one batch."""
    from adapterfab.procs import HEARTBEAT_S

    while not stop.wait(HEARTBEAT_S):
        try:
            if not state.heartbeat(batch_id, pid, token):
                log.error("batch %s is no longer claimed by this orchestrator (pid %s): another one holds it; "
                          "stopping", batch_id, pid)
                on_lost()
                return
        except Exception:  # noqa: BLE001 - a busy database: the next beat
            log.warning("heartbeat of batch %s not written", batch_id, exc_info=True)


def _run_claimed(settings: Settings, state: StateStore, batch_id: str, batch: Any) -> BatchState:
    # the batch's way to its first step, in epoch seconds (the batch's stats: ``startup_s``)
    now = time.time()
    try:  # (unset: not started by launch_detached)
        launched = float(os.environ.get(LAUNCHED_AT_ENV) or 0) or None
    except ValueError:
        launched = None
    # a resumed batch counts from its new orchestrator's launch
    marks = {"submitted": (launched or now) if batch.started_s else (batch.created_s or now), "claimed": now}
    if launched:
        marks["launched"] = launched
    import ray

    from adapterfab.jobs.factory import Factory
    from adapterfab.jobs.groups import GroupQueue, start_trainers
    from adapterfab.jobs.launch import PROGRESS_BOARD_PREFIX, ProgressBoard
    from adapterfab.jobs.plan import balanced_groups, concurrency, execution_groups, fitted_groups, starter_groups
    from adapterfab.jobs.trainers import TrainerPool, still_unplaceable
    spec, jobs = parse_spec(batch.spec_text, root=Path(batch.spec_path).parent if batch.spec_path else None)
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # a Ray Job (`submit --address`) runs in the home:
        # it starts in its unpacked working_dir, which the runtime-env agent of another node on the same
        # machine can replace while the batch runs, and libraries imported later (torch._dynamo, through
        # peft, at the first registration) read the cwd (the spec's relative paths are resolved above)
        settings.home.mkdir(parents=True, exist_ok=True)
        os.chdir(settings.home)
    state.update_batch(batch_id, state=BatchState.RUNNING, started_s=time.time(), error=None)
    factory = pool = queue = None
    try:
        if not settings.mlflow_uri:
            raise StackError("no MLflow server: run `adapterfab up` first (or set MLFLOW_TRACKING_URI)")
        connect_ray(settings)
        marks["ray"] = time.time()
        base = resolve_base_model(spec.base_model, settings.cache)
        planned = load_plan(batch, spec, jobs, base.path)
        groups = execution_groups(planned)
        cluster = ray.cluster_resources()
        if why := still_unplaceable(spec.resources.cpus_per_job, spec.resources.gpus_per_job):
            raise StackError(why)  # now: every group would otherwise wait for resources no node has
        slots = concurrency(spec, cluster, len(jobs))
        devices = slots if spec.resources.gpus_per_job == 0 else max(1, min(slots, int(cluster.get("GPU", 1))))
        groups = balanced_groups(jobs, groups, devices)  # a fused group may be cut to keep every device busy
        groups = fitted_groups(planned, groups, spec.resources.device_memory_gb)  # ... and to fit its device
        slots = min(slots, len(groups))
        groups = starter_groups(groups, slots)  # each slot's first group small: first steps and adapters early
        pool = TrainerPool(batch_id, spec.resources.trainer_keep_warm_s)
        queue = GroupQueue()
        early = start_trainers(pool, base, jobs, planned, groups, slots, queue.drained)  # start while the rest sets up
        marks["trainers_asked"] = time.time()
        retry_s = factory_retry_s()  # the batch rides out an MLflow outage (buffer and retry)
        tracking = Tracking(settings.mlflow_uri, retry_s)
        batch_run = batch.mlflow_run_id or tracking.start_run(
            f"batch {spec.name}", tags={"adapterfab.batch_id": batch_id, "adapterfab.batch_name": spec.name})
        if not batch.mlflow_run_id:
            state.update_batch(batch_id, mlflow_run_id=batch_run)
            tracking.log_text(batch_run, batch.spec_text, "batch_spec.yaml")
            tracking.log_params(batch_run, {"name": spec.name, "base_model": spec.base_model,
                                            "base_fingerprint": base.fingerprint, "jobs": len(jobs),
                                            "code_version": code_version()})
        board_name = PROGRESS_BOARD_PREFIX + batch_id
        board = ProgressBoard.options(name=board_name, get_if_exists=True).remote()
        ctx = BatchContext(
            settings,
            state,
            batch_id,
            spec,
            base,
            tracking,
            Registry(settings.mlflow_uri, retry_s, RegistryIndex(state)),
            batch_run,
            board_name,
            None,
            force=bool((batch.options or {}).get("force")),
        )
        ctx.planned = {p.job_id: p for p in planned}
        marks["set_up"] = time.time()
        factory = ctx.factory = Factory(ctx, jobs, planned, groups, slots, pool, early, queue, marks)
        factory.run()
        ray.kill(board)
    except Exception as e:  # noqa: BLE001 - the batch cannot run at all: fail every unfinished job
        log.exception("batch %s failed", batch_id)
        if queue is not None:  # the trainers still starting give up (they wait on queue.drained)
            queue.cancel()
        if pool is not None:
            pool.close()  # the trainers started ahead go back (or end after their keep-warm time)
        for j in state.jobs(batch_id):
            if not j.state.terminal:
                state.move_job(j.id, JobState.FAILED, error=f"batch failed: {_error_text(e)}")
        state.update_batch(batch_id, error=_error_text(e))
    final = (BatchState.SUCCEEDED if all(j.state == JobState.SUCCEEDED for j in state.jobs(batch_id))
             else BatchState.CANCELLED if state.cancel_requested(batch_id) else BatchState.FAILED)
    batch_run_id = state.get_batch(batch_id).mlflow_run_id
    try:  # before the batch ends: whoever sees it ended finds its run closed (as a job's run before SUCCEEDED)
        if batch_run_id:
            Tracking(settings.mlflow_uri, factory_retry_s()).end_run(batch_run_id, ok=final == BatchState.SUCCEEDED)
    except Exception:  # noqa: BLE001
        log.exception("could not close the batch run")
    state.update_batch(batch_id, state=final, ended_s=time.time(), stats=factory.stats() if factory else None)
    return final


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(argv) != 1:
        print("usage: python -m adapterfab.jobs.orchestrate BATCH_ID", file=sys.stderr)
        return 2
    from adapterfab import faults

    if armed := faults.arm_from_env():
        log.warning("fault injection armed: %s", armed)
    try:
        final = run_batch(Settings.load(), argv[0])
    except BatchHeld as e:
        log.warning("%s", e)
        return 3
    return 0 if final == BatchState.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
