"""The factory's groups between preparation and the trainer slots: a prepared fused group
(``GroupItem``), the bounded queue of ready groups (``GroupQueue``), and the trainers each slot's first
group will need, leased ahead while the batch still prepares (``start_trainers``)."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapterfab.spec import JobSpec

if TYPE_CHECKING:
    from adapterfab.jobs.plan import PlannedJob
    from adapterfab.jobs.registrar import Prepared

log = logging.getLogger("adapterfab.factory")


@dataclass
class GroupItem:
    gid: str
    prepared: list[Prepared]
    spec: Any  # trainers.TrainerSpec; None for a multi-worker job (Ray Train + ZeRO)
    checkpointing: bool = False

    @property
    def key(self) -> str | None:
        return self.spec.key() if self.spec is not None else None


class GroupQueue:
    """Ready groups, in the order they were prepared; a consumer may prefer a key (its trainer's)."""

    def __init__(self) -> None:
        self._items: list[GroupItem] = []
        self._closed = self._cancelled = False
        self._cond = threading.Condition()
        self.drained = threading.Event()  # closed and empty: no group will come any more

    def put(self, item: GroupItem) -> bool:
        """Queue ``item``; False (not queued) once the queue was cancelled."""
        with self._cond:
            if self._cancelled:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def cancel(self) -> list[GroupItem]:
        """The batch was cancelled: no group is handed out or taken any more; returns the groups that
        waited (their jobs are the caller's to cancel)."""
        with self._cond:
            self._closed = self._cancelled = True
            dropped, self._items = self._items, []
            self.drained.set()
            self._cond.notify_all()
            return dropped

    def close(self) -> None:
        """No group will be put any more; closed and empty is ``drained`` (trainers still being started
        ahead for the first groups are called off by it: with every slot waiting for one of them, no
        ``take`` would come to see it)."""
        with self._cond:
            self._closed = True
            if not self._items:
                self.drained.set()
            self._cond.notify_all()

    def take(self, prefer_key: str | None = None, avoid_keys: frozenset[str] = frozenset()) -> GroupItem | None:
        """The next group: the first with ``prefer_key`` if one is ready, else the first whose key no
        other slot's trainer has (``avoid_keys``: those slots will take them), else the first; None
        once closed and empty."""
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if not self._items:
                self.drained.set()
                return None
            at = next((i for i, it in enumerate(self._items) if prefer_key and it.key == prefer_key),
                      next((i for i, it in enumerate(self._items) if it.key not in avoid_keys), 0))
            item = self._items.pop(at)
            if self._closed and not self._items:
                self.drained.set()
            self._cond.notify_all()
            return item

    def wait_below(self, groups: int, jobs: int) -> None:
        """Until fewer than ``groups`` groups or fewer than ``jobs`` jobs wait (memory stays bounded)."""
        with self._cond:
            while not self._cancelled and len(self._items) >= groups \
                    and sum(len(i.prepared) for i in self._items) >= jobs:
                self._cond.wait()


def start_trainers(pool: Any, base: Any, jobs: list[JobSpec], planned: list[PlannedJob], groups: list[list[int]],
                   slots: int, called_off: threading.Event) -> list[Future]:
    """Lease (or start) the trainer each slot's first group will need, in the background, as soon as
    the batch is planned: while the orchestrator makes MLflow runs and Ray Data prepares the first
    groups, the trainers start and load the base. Known ahead only for groups whose trainer needs no
    shared basis computed first (LoRA, QLoRA). Per slot: (the trainer's key, a future of its Lease or
    None), or (None, None); a trainer still waiting for resources when ``called_off`` is set (no group
    is left) is not started."""
    from adapterfab.jobs.trainers import TrainerSpec
    from adapterfab.methods import get_method

    specs = []
    for n in range(min(slots, len(groups))):
        first = groups[n][0]
        job, plan = jobs[first], planned[first]
        if plan.workers > 1 or get_method(job.method.name).compute_basis is not None:
            specs.append(None)
        else:
            specs.append(TrainerSpec(base.path, base.fingerprint, job.method.model_dump(), job.train.dtype, None,
                                     plan.cpus, plan.gpus))

    def lease(spec: Any) -> Any:
        try:
            return pool.acquire(spec, called_off=called_off)
        except Exception:  # noqa: BLE001 - the group's own acquire reports it
            log.warning("could not start a trainer ahead of the first groups", exc_info=True)
            return None

    threads = ThreadPoolExecutor(max(1, len(specs)), thread_name_prefix="prewarm")
    out = [(spec.key(), threads.submit(lease, spec)) if spec is not None else (None, None) for spec in specs]
    threads.shutdown(wait=False)
    return out
