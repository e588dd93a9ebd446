"""Job and batch states, and the transitions allowed between them."""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    PENDING = "PENDING"
    PREPARING = "PREPARING"  # Ray Data: read, validate, tokenize, split
    TRAINING = "TRAINING"  # Ray Train
    REGISTERING = "REGISTERING"  # artifact store + MLflow registry
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


class BatchState(str, Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"  # at least one job failed; the others ran to their end
    CANCELLED = "CANCELLED"  # `adapterfab cancel`: its unfinished jobs CANCELLED, its registered ones kept

    @property
    def terminal(self) -> bool:
        return self in (BatchState.SUCCEEDED, BatchState.FAILED, BatchState.CANCELLED)


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.PREPARING, JobState.FAILED, JobState.CANCELLED}),
    # PREPARING -> SUCCEEDED: the same spec, data and code were already trained (idempotent resubmit)
    JobState.PREPARING: frozenset({JobState.TRAINING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED,
                                   JobState.PENDING}),
    JobState.TRAINING: frozenset({JobState.REGISTERING, JobState.FAILED, JobState.CANCELLED, JobState.PENDING}),
    JobState.REGISTERING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.PENDING}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset({JobState.PENDING}),  # an explicit resume/retry
    JobState.CANCELLED: frozenset({JobState.PENDING}),
}


def can_move(old: JobState, new: JobState) -> bool:
    return new == old or new in ALLOWED[old]
