"""Resident trainers on Ray: long-lived actors that each keep one base model loaded (``jobs/resident.py``)
and train fused group after fused group, across batches.

- A trainer is a detached, named Ray actor (``af-trainer-<key>-<id>`` in the ``adapterfab`` namespace)
  holding the resources of one device slot (``cpus_per_job`` CPUs, ``gpus_per_job`` GPUs: fractions
  pack several trainers on one GPU). Its key names what it holds: the base (path and fingerprint), how
  it is loaded (dtype, quantization) and the adapter shape (family, rank, modules, LoRA-XS basis).
- A batch's orchestrator leases trainers (``TrainerPool.acquire``): an idle one with the group's key if
  one is warm, else a new one. The lease is renewed while the batch runs and expires if the orchestrator
  dies, so a trainer is never held by a dead batch.
- A trainer nobody leases stays warm for ``keep_warm_s`` (the last lessee's ``resources.
  trainer_keep_warm_s``), so the next batch on the same base skips loading it; then it ends and frees
  its device. Idle trainers of another key are retired at once when a batch needs their resources.
- A trainer that dies mid-group (killed, out of memory, node lost) costs the group only the steps since
  its last checkpoint: the orchestrator gives the group to another trainer, which resumes from the
  group's checkpoint file (``MAX_GROUP_ATTEMPTS`` tries in all).

Why actors and not Ray Train workers: a trainer must outlive one batch (warm reuse), and trainers must
fail independently; a Ray Train run ends with its driver and restarts its whole worker group when one
worker fails. Multi-worker DeepSpeed ZeRO jobs still run on Ray Train (``jobs/launch.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import ray

log = logging.getLogger("adapterfab.trainers")
NAMESPACE = "adapterfab"
NAME_PREFIX = "af-trainer-"
LEASE_TTL_S = 90.0  # a lease not renewed for this long ends (its orchestrator died)
RENEW_EVERY_S = 15.0
REAP_EVERY_S = 1.0
MAX_GROUP_ATTEMPTS = 4  # a group whose trainer died resumes on another trainer until this many tries
EVICT_AFTER_S = 2.0  # a new trainer that cannot be placed this long retires idle trainers of other keys (and
# again every EVICT_AFTER_S while it waits: trainers of other batches go idle as their work ends)
PROGRESS_EVERY_S = 0.5  # a trainer reports a group's progress at most this often
OWNER_CHECK_S = 2.0  # how often a training trainer checks that its batch's orchestrator still lives
_SPAWN_GUARD = threading.Lock()


class LeaseLost(RuntimeError):
    """The trainer was leased to someone else (the lease expired) or is shutting down."""


class GroupCancelled(RuntimeError):
    """The group's batch was cancelled (`adapterfab cancel`): it stopped at a step; nothing of it is kept."""


class NoTrainerNeeded(RuntimeError):
    """A wait for a trainer's resources was called off: the batch has no more work for it."""


class Unplaceable(RuntimeError):
    """No node of the cluster can ever host the trainer, and the cluster adds none (no autoscaler)."""


UNPLACEABLE_CHECK_S = 5.0  # how often a wait for a new trainer's resources asks whether any node could host it
UNPLACEABLE_GRACE_S = 60.0  # ... and how long no node may have held it before the wait gives up (a node
# restarting or still joining the cluster is back within it)


def _fixed_cluster() -> bool:
    """Whether this Ray cluster can gain no nodes: its monitor runs the read-only node provider (a local
    ``ray.init``, ``ray start`` without an autoscaling config) and autoscaler v2 is off. Anything unclear
    (status not written yet, another Ray's format) counts as "may autoscale": the caller then waits."""
    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.autoscaler._private.util import format_readonly_node_type
        from ray.autoscaler.v2.utils import is_autoscaler_v2
        from ray.experimental.internal_kv import _internal_kv_get

        if is_autoscaler_v2(fetch_from_server=True):
            return False
        raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        mapping = (json.loads(raw).get("autoscaler_report") or {}).get("node_type_mapping") if raw else None
        return bool(mapping) and all(t == format_readonly_node_type(n) for n, t in mapping.items())
    except Exception:  # noqa: BLE001 - not knowable here: assume nodes may come
        return False


def still_unplaceable(cpus: float, gpus: float, grace_s: float | None = None) -> str | None:
    """``unplaceable``, asked every UNPLACEABLE_CHECK_S until it says None or has said why for ``grace_s``
    seconds (default UNPLACEABLE_GRACE_S): a node restarting or joining must not fail a batch."""
    grace_s = UNPLACEABLE_GRACE_S if grace_s is None else grace_s
    deadline = time.monotonic() + grace_s
    while (why := unplaceable(cpus, gpus)) and time.monotonic() < deadline:
        time.sleep(min(UNPLACEABLE_CHECK_S, max(0.0, deadline - time.monotonic())))
    return why


def unplaceable(cpus: float, gpus: float) -> str | None:
    """Why no node of this cluster can ever host a trainer (or a ZeRO worker) of ``cpus`` CPUs and ``gpus``
    GPUs, or None: some live node has that much in all (busy or not), or the cluster may add nodes.
    Ray would otherwise keep such a request pending for ever (and the wait for it would run to its
    timeout, group after group)."""
    need = {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}
    nodes = [n.get("Resources") or {} for n in ray.nodes() if n.get("Alive")]
    if any(all(r.get(k, 0.0) + 1e-9 >= v for k, v in need.items()) for r in nodes):
        return None
    if not _fixed_cluster():
        return None
    have = "; ".join(f"{r.get('CPU', 0):g} CPU, {r.get('GPU', 0):g} GPU" for r in nodes) or "none alive"
    return (f"no node of this Ray cluster can host a trainer of {cpus:g} CPU and {gpus:g} GPU (its nodes: {have}), "
            "and the cluster adds no nodes (no autoscaler): lower resources.cpus_per_job / gpus_per_job in the "
            "spec, or run the batch on a cluster with such a node")


@dataclass(frozen=True)
class TrainerSpec:
    """What a resident trainer holds and the resources it takes. ``key()`` names the trainers that can
    train a group: same base, same loading, same adapter shape, same resources."""

    base_path: str
    base_fingerprint: str
    method: dict[str, Any]  # a member job's method (family, rank, modules and quantization are what count)
    dtype: str
    basis_uri: str | None
    cpus: float
    gpus: float

    def key(self) -> str:
        """What a warm trainer must share with a job to train it: the base (its weights, and its config and
        tokenizer with the chat template, ``setup_fingerprint``: a trainer kept warm across a fixed template
        would prepare data and probes with the old one), the layers' shapes, the basis and the resources."""
        from adapterfab.basemodel import setup_fingerprint
        from adapterfab.jobs.plan import trainer_key
        from adapterfab.methods import get_method

        method = get_method(self.method["name"]).config_cls(**self.method)
        base = [self.base_path, self.base_fingerprint, setup_fingerprint(self.base_path)]
        payload = json.dumps({"base": base, "shape": trainer_key(method, self.dtype),
                              "basis": self.basis_uri, "cpus": self.cpus, "gpus": self.gpus}, sort_keys=True,
                             default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def device(self) -> str | None:
        return "cuda" if self.gpus > 0 else None


class TrainerActor:
    """The Ray actor around a ``ResidentWorker`` (made remote by ``_actor_class``): leases, progress
    reports, per-step metrics to MLflow in the background, idle retirement."""

    def __init__(self, spec: dict[str, Any], keep_warm_s: float, owner: str | None = None):
        import tempfile

        from adapterfab.jobs.resident import ResidentWorker
        from adapterfab.methods import get_method

        self.spec = TrainerSpec(**spec)
        basis = None
        if self.spec.basis_uri:
            from adapterfab.export import fetch_basis

            with tempfile.TemporaryDirectory(prefix="basis-") as tmp:  # the loaded basis lives in memory
                basis = fetch_basis(get_method(self.spec.method["name"]), self.spec.basis_uri, tmp)
        threads = max(1, int(self.spec.cpus)) if self.spec.gpus == 0 else 1
        self.worker = ResidentWorker(self.spec.base_path, self.spec.method, self.spec.dtype, threads, basis,
                                     self.spec.device)
        self.key = self.spec.key()
        self.node = ray.get_runtime_context().get_node_id()
        self.name = ray.get_runtime_context().get_actor_name()
        self.keep_warm_s = keep_warm_s
        self._lock = threading.Lock()
        # a first window being prepared (``prepare``) uses the tokenizer that training uses: a group waits
        self._preparing = threading.Lock()
        self._owner: str | None = owner  # born leased to whoever started it: nobody retires it meanwhile
        self._lease_until = time.monotonic() + LEASE_TTL_S if owner else 0.0
        self._busy = False
        self._closing = False
        self._last_used = time.monotonic()
        self._metrics: dict[str, Any] = {}  # MLflow URI -> MetricBuffer
        threading.Thread(target=self._reap, name="trainer-reaper", daemon=True).start()

    # -- leases ---------------------------------------------------------------------------------------
    def lease(self, owner: str, ttl_s: float, keep_warm_s: float) -> dict[str, Any] | None:
        """Lease the trainer to ``owner`` (a batch); None if it is leased to another or shutting down."""
        with self._lock:
            now = time.monotonic()
            if self._closing or self._busy or (self._owner not in (None, owner) and now < self._lease_until):
                return None
            self._owner, self._lease_until, self.keep_warm_s = owner, now + ttl_s, keep_warm_s
        return self.info()

    def renew(self, owner: str, ttl_s: float) -> bool:
        with self._lock:
            if self._owner != owner or self._closing:
                return False
            self._lease_until = time.monotonic() + ttl_s
            return True

    def release(self, owner: str, retire: bool = False) -> bool:
        """End ``owner``'s lease; ``retire``: and end the trainer now (its resources are wanted)."""
        with self._lock:
            if self._owner == owner:
                self._owner, self._last_used = None, time.monotonic()
        return self.retire_if_idle() if retire else False

    def retire_if_idle(self) -> bool:
        """End the trainer if nobody holds a lease and it trains nothing; whether it will end."""
        with self._lock:
            leased = self._owner is not None and time.monotonic() < self._lease_until
            if self._busy or leased or self._closing:
                return self._closing
            self._closing = True
        ray.get_runtime_context().current_actor.__ray_terminate__.remote()
        return True

    def _reap(self) -> None:
        while True:
            time.sleep(REAP_EVERY_S)
            with self._lock:
                expired = self._owner is not None and time.monotonic() >= self._lease_until
                if expired:  # its orchestrator stopped renewing: free it
                    self._owner, self._last_used = None, time.monotonic()
                idle = self._owner is None and not self._busy and time.monotonic() - self._last_used >= self.keep_warm_s
            if idle and self.retire_if_idle():
                return

    def info(self) -> dict[str, Any]:
        with self._lock:
            return {"name": self.name, "key": self.key, "pid": os.getpid(), "node_id": self.node,
                    "owner": self._owner, "busy": self._busy, "load_s": self.worker.load_s,
                    "groups_trained": self.worker.groups_trained, "idle_s": time.monotonic() - self._last_used}

    # -- training ---------------------------------------------------------------------------------------
    def prepare(self, owner: str, requests: list[Any], tokenizer_path: str, in_process_bytes: int) -> dict[str, Any]:
        """A batch's first window of data, prepared here for the lease holder (``prepare_many`` in this
        process, with the tokenizer this trainer has loaded): a warm trainer is ready before the batch's
        orchestrator has imported a tokenizer, and has nothing else to do until its first group comes.
        {rows: job key -> PreparedRows | DatasetError, pad_id}."""
        from adapterfab.pipelines.data import prepare_many

        with self._lock:
            if self._owner != owner or self._closing:
                raise LeaseLost(f"trainer {self.name} is not leased to {owner}")
        with self._preparing:  # (the worker's tokenizer is the one prepare_many loads for its base)
            return {"rows": prepare_many(requests, tokenizer_path, in_process_bytes=in_process_bytes),
                    "pad_id": self.worker.pad_id}

    def train_group(self, owner: str, task: Any, board: Any, mlflow_uri: str | None) -> Any:
        """Train one group (``ResidentWorker.train_group``) for the lease holder; per-step loss and
        learning rate go to each job's MLflow run in the background, progress to the batch's ``board``
        (an actor of the batch's orchestrator: when it is gone, so is the orchestrator, and the group
        stops at its next step). Metrics not yet in MLflow when the group ends travel back with its
        outcomes."""
        from adapterfab.jobs.train_loop import peak_memory_mb

        with self._lock:
            if self._owner != owner or self._closing:
                raise LeaseLost(f"trainer {self.name} is not leased to {owner}")
            if self._busy:
                raise LeaseLost(f"trainer {self.name} is already training a group")
            self._busy, self._lease_until = True, max(self._lease_until, time.monotonic() + LEASE_TTL_S)
        with self._preparing:  # a window its orchestrator gave up waiting for is finished first
            pass
        orphaned, cancelled = threading.Event(), threading.Event()
        watcher = threading.Thread(target=self._watch_owner, args=(board, orphaned, cancelled), name="owner-watch",
                                   daemon=True)
        watcher.start()
        try:
            runs = {j.job_id: j.run_id for j in task.jobs}
            steps = {j.job_id: int(j.train.get("steps", 0)) for j in task.jobs}
            buffer = self._buffer(mlflow_uri) if mlflow_uri else None
            pid, last = os.getpid(), [0.0]

            def on_step(jid: str, step: int, loss: float, lr: float) -> None:
                if buffer is not None and runs.get(jid):
                    buffer.log(runs[jid], {"loss": loss, "lr": lr, **peak_memory_mb()}, step=step)

            def on_iteration(progress: list[tuple[str, int, float]]) -> None:
                if orphaned.is_set():  # nobody will take this group's results: stop, free the trainer
                    raise LeaseLost(f"the orchestrator of {owner} is gone; group {task.group_id} stops")
                if cancelled.is_set():  # the batch was cancelled: stop; the trainer stays leased and usable
                    raise GroupCancelled(f"batch {owner} was cancelled; group {task.group_id} stops")
                now = time.monotonic()
                if board is not None and (now - last[0] >= PROGRESS_EVERY_S or  # and every job's last step
                                          any(step >= steps.get(jid, 0) for jid, step, _ in progress)):
                    last[0] = now
                    board.update_many.remote([(jid, step, loss, pid, self.node) for jid, step, loss in progress])

            def checkpoint_extra() -> dict[str, Any]:  # unsent metrics ride in the checkpoint
                return {"pending_metrics": buffer.peek(list(filter(None, runs.values())))} if buffer else {}

            result = self.worker.train_group(task, on_step, on_iteration, checkpoint_extra)
            if buffer is not None:
                taken = buffer.take(list(filter(None, runs.values())))
                carried = (result.extra or {}).get("pending_metrics", {})
                for o in result.outcomes:
                    run = runs.get(o.job_id)
                    o.pending_metrics = list(carried.get(run, [])) + taken.get(run, [])
            result.trainer.update({"name": self.name, "node_id": self.node, "key": self.key})
            return result
        finally:
            with self._lock:
                self._busy, self._last_used = False, time.monotonic()
                if orphaned.is_set() and self._owner == owner:
                    self._owner = None
            orphaned.set()  # ends the watcher

    def _watch_owner(self, board: Any, orphaned: threading.Event, cancelled: threading.Event) -> None:
        """Sets ``orphaned`` when the batch's board actor (its orchestrator's) has died, ``cancelled`` when
        it says the batch was cancelled."""
        while not orphaned.wait(OWNER_CHECK_S):
            if board is None:
                return
            try:
                if not ray.get(board.ping.remote(), timeout=OWNER_CHECK_S * 5):
                    cancelled.set()
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                orphaned.set()
            except Exception:  # noqa: BLE001 - slow to answer is not dead
                continue

    def _buffer(self, uri: str) -> Any:
        from adapterfab.tracking import MetricBuffer

        if uri not in self._metrics:
            self._metrics[uri] = MetricBuffer(uri)
        return self._metrics[uri]


_ACTOR: Any = None


def _actor_class() -> Any:
    global _ACTOR
    if _ACTOR is None:
        _ACTOR = ray.remote(TrainerActor)
    return _ACTOR


def _trainer_names(key: str | None = None) -> list[str]:
    prefix = NAME_PREFIX + (key + "-" if key else "")
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a.get("namespace") == NAMESPACE and a["name"].startswith(prefix))


def _handle(name: str) -> Any | None:
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def retire_idle_trainers(except_key: str | None = None, timeout_s: float = 10.0) -> int:
    """End every idle trainer (no lease, nothing training), except those of ``except_key``: their
    devices are wanted (another base, a serving replica, a ZeRO job). Returns how many ended."""
    handles = [h for n in _trainer_names() if (except_key is None or not n.startswith(NAME_PREFIX + except_key))
               and (h := _handle(n)) is not None]
    refs = [h.retire_if_idle.remote() for h in handles]
    ended = 0
    for ref in refs:
        try:
            ended += bool(ray.get(ref, timeout=timeout_s))
        except Exception:  # noqa: BLE001 - it died already, or is busy answering: not idle
            continue
    return ended


def trainers_info(timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """Every resident trainer on the cluster: name, key, pid, node, owner, busy, load and idle seconds."""
    out = []
    for name in _trainer_names():
        h = _handle(name)
        if h is None:
            continue
        try:
            out.append(ray.get(h.info.remote(), timeout=timeout_s))
        except Exception:  # noqa: BLE001 - ended or starting
            continue
    return out


@dataclass
class Lease:
    spec: TrainerSpec
    key: str
    name: str
    handle: Any
    info: dict[str, Any]


class TrainerPool:
    """A batch's access to resident trainers: leases them, renews the leases while the batch runs,
    gives them back when it ends."""

    def __init__(self, owner: str, keep_warm_s: float):
        self.owner, self.keep_warm_s = owner, keep_warm_s
        self._held: dict[str, Lease] = {}
        self._claiming: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name="trainer-leases", daemon=True)
        self._renewer.start()

    def acquire(self, spec: TrainerSpec, timeout_s: float = 1800.0, called_off: threading.Event | None = None) -> Lease:
        """A trainer for ``spec``: a warm idle one with its key if any (no base load), else a new one.
        Waiting for a new one's resources ends with ``NoTrainerNeeded`` once ``called_off`` is set."""
        key = spec.key()
        for name in _trainer_names(key):
            with self._lock:  # one claim per trainer among this pool's threads (one lease holder: the batch)
                if name in self._held or name in self._claiming:
                    continue
                self._claiming.add(name)
            info = lease = None
            try:
                h = _handle(name)
                info = ray.get(h.lease.remote(self.owner, LEASE_TTL_S, self.keep_warm_s), timeout=30) if h else None
            except Exception:  # noqa: BLE001, S110 - it is ending or died (info stays None): try the next
                pass
            finally:
                with self._lock:  # held before the claim goes: another slot of this pool (the same lease
                    if info is not None:  # owner, which the trainer accepts again) must not lease it too
                        lease = self._held[name] = Lease(spec, key, name, h, info)
                    self._claiming.discard(name)
            if info is not None:
                log.info("leased warm trainer %s (%d groups trained on it; its base load took %.1fs)", name,
                         info["groups_trained"], info["load_s"])
                return lease
        return self._spawn(spec, key, timeout_s, called_off)

    def _spawn(self, spec: TrainerSpec, key: str, timeout_s: float, called_off: threading.Event | None) -> Lease:
        name = f"{NAME_PREFIX}{key}-{uuid.uuid4().hex[:8]}"
        options: dict[str, Any] = {"name": name, "namespace": NAMESPACE, "lifetime": "detached",
                                   "num_cpus": spec.cpus, "max_concurrency": 4, "max_restarts": 0}
        if spec.gpus:
            options["num_gpus"] = spec.gpus
        with _SPAWN_GUARD:
            h = _actor_class().options(**options).remote(asdict(spec), self.keep_warm_s, self.owner)
        ref = h.lease.remote(self.owner, LEASE_TTL_S, self.keep_warm_s)
        deadline = time.monotonic() + timeout_s
        t0 = evicted = checked = time.monotonic()
        unplaceable_since: float | None = None
        while True:
            ready, _ = ray.wait([ref], timeout=0.5)
            if ready:
                info = ray.get(ref)  # raises if the trainer failed to start (bad base, out of memory)
                if info is None:
                    raise LeaseLost(f"new trainer {name} refused its first lease")
                log.info("started trainer %s in %.1fs (base load %.1fs)", name, time.monotonic() - t0, info["load_s"])
                return self._keep(Lease(spec, key, name, h, info))
            if time.monotonic() - evicted > EVICT_AFTER_S:
                evicted = time.monotonic()  # waiting for resources: idle trainers of other keys give theirs up
                n = retire_idle_trainers(except_key=key)
                if n:
                    log.info("retired %d idle trainer(s) of other keys to place %s", n, name)
            if called_off is not None and called_off.is_set():
                ray.kill(h, no_restart=True)
                raise NoTrainerNeeded(f"trainer {name} was not needed after all")
            if time.monotonic() - checked > UNPLACEABLE_CHECK_S:
                checked = time.monotonic()  # (a node that could host it may have gone since the batch began)
                why = unplaceable(spec.cpus, spec.gpus)
                unplaceable_since = (unplaceable_since or checked) if why else None
                if why and checked - unplaceable_since >= UNPLACEABLE_GRACE_S:  # (not a node restarting)
                    ray.kill(h, no_restart=True)
                    raise Unplaceable(why)
            if time.monotonic() > deadline:
                ray.kill(h, no_restart=True)
                raise TimeoutError(
                    f"no resources for a trainer ({spec.cpus} CPU, {spec.gpus} GPU) within {timeout_s:.0f}s"
                )

    def _keep(self, lease: Lease) -> Lease:
        with self._lock:
            self._held[lease.name] = lease
        return lease

    def train(self, lease: Lease, task: Any, board: Any, mlflow_uri: str | None) -> Any:
        """``task`` on the leased trainer; ``board``: the batch's ProgressBoard actor handle."""
        return ray.get(lease.handle.train_group.remote(self.owner, task, board, mlflow_uri))

    def release(self, lease: Lease, retire: bool = False) -> None:
        with self._lock:
            self._held.pop(lease.name, None)
        try:
            ray.get(lease.handle.release.remote(self.owner, retire), timeout=30)
        except Exception:  # noqa: BLE001 - it died: nothing to give back
            pass

    def forget(self, lease: Lease, kill: bool = False) -> None:
        """A trainer that died (or took another lease): stop renewing its lease. ``kill``: end it too, for
        one that only looked dead (``ActorUnavailableError``: unreachable, maybe still training the group
        and writing its checkpoint while another trainer resumes it); a dead one's kill is a no-op."""
        with self._lock:
            self._held.pop(lease.name, None)
        if kill:
            try:
                ray.kill(lease.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_EVERY_S):
            with self._lock:
                held = list(self._held.values())
            for lease in held:
                try:
                    lease.handle.renew.remote(self.owner, LEASE_TTL_S)
                except Exception:  # noqa: BLE001 - a dead trainer is handled by whoever trains on it
                    pass

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            held = list(self._held.values())
        for lease in held:
            self.release(lease)
