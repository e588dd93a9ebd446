"""The trainer pool's claims and the group queue's end, without Ray (review, 2026-12-07): two slots of one
batch asking for the same key at once must not both lease the one warm trainer (the trainer accepts the
same owner twice), and a queue closed with nothing in it is drained at once (the trainers started ahead
for the first groups wait on that, and every slot waits for one of them, so no ``take`` comes)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from adapterfab.jobs import trainers as T
from adapterfab.jobs.groups import GroupItem, GroupQueue


class _Actor:
    """TrainerActor.lease's rule: a lease for nobody's trainer, or again for the owner that holds it."""

    def __init__(self) -> None:
        self.owner, self.until, self._lock = None, 0.0, threading.Lock()

    def lease(self, owner: str, ttl_s: float, keep_warm_s: float) -> dict | None:
        with self._lock:
            if self.owner not in (None, owner) and time.monotonic() < self.until:
                return None
            self.owner, self.until = owner, time.monotonic() + ttl_s
        return {"groups_trained": 1, "load_s": 1.0}


def test_one_warm_trainer_is_leased_to_one_slot_of_a_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    actor = _Actor()
    handle = SimpleNamespace(lease=SimpleNamespace(remote=actor.lease))
    monkeypatch.setattr(T, "_trainer_names", lambda key=None: ["af-trainer-K-1"])
    monkeypatch.setattr(T, "_handle", lambda name: handle)
    monkeypatch.setattr(T.ray, "get", lambda ref, timeout=None: ref)
    pool = T.TrainerPool.__new__(T.TrainerPool)
    pool.owner, pool.keep_warm_s, pool._held, pool._claiming, pool._lock = "batch1", 60, {}, set(), threading.Lock()
    monkeypatch.setattr(pool, "_spawn", lambda *a: "a new trainer")
    # slot A stops right after its lease came back (where it logs it); slot B asks meanwhile
    gap, b_done = threading.Event(), threading.Event()
    info = T.log.info

    def pause_a(msg: str, *args: object) -> None:
        if threading.current_thread().name == "A":
            gap.set()
            b_done.wait(5)
        info(msg, *args)

    monkeypatch.setattr(T.log, "info", pause_a)
    got: dict = {}
    spec = SimpleNamespace(key=lambda: "K")
    a = threading.Thread(target=lambda: got.update(A=pool.acquire(spec)), name="A")
    a.start()
    assert gap.wait(5)
    b = threading.Thread(target=lambda: got.update(B=pool.acquire(spec)), name="B")
    b.start()
    b.join(5)
    b_done.set()
    a.join(5)
    assert getattr(got["A"], "name", None) == "af-trainer-K-1"
    assert got["B"] == "a new trainer"  # not the trainer slot A holds


def test_a_queue_closed_empty_is_drained_and_the_last_take_drains_it() -> None:
    q = GroupQueue()
    q.close()
    assert q.drained.is_set()  # before any take
    q = GroupQueue()
    q.put(GroupItem("g0", [], None))
    q.close()
    assert not q.drained.is_set()
    assert q.take().gid == "g0" and q.drained.is_set()  # nothing left will ever come
