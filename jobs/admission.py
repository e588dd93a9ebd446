"""Admission: the one check a batch passes before anything runs. The spec's outside-world checks
(``adapterfab.spec_checks.semantic_problems``: datasets, data roots, the base model) and the plan
(``jobs/plan.plan_batch``: every job fits some packing), made once; the plan it returns is the one the
batch records and the orchestrator runs. ``validate``, ``plan``, ``submit`` and ``run`` all come here."""

from __future__ import annotations

from typing import Any

from adapterfab.spec import BatchSpec, JobSpec, SpecError
from adapterfab.spec_checks import semantic_problems


def admit(spec: BatchSpec, jobs: list[JobSpec], dataset_exists: Any = None,
          data_roots: tuple[str, ...] | None = None, batch_id: str = "check") -> list[Any]:
    """The batch's plan (``PlannedJob`` per job, under ``batch_id``), or a ``SpecError`` naming every
    problem found: the spec's outside-world checks first, then, when they pass, the planner's
    (``resources``; estimates need the base's config.json, which is never converted or downloaded
    here)."""
    from adapterfab.basemodel import local_folder
    from adapterfab.jobs.plan import PlanError, plan_batch

    problems = semantic_problems(spec, jobs, dataset_exists, data_roots)
    if not problems:
        try:
            return plan_batch(batch_id, spec, jobs, local_folder(spec.base_model))
        except PlanError as e:
            problems.append(("resources", str(e)))
    raise SpecError(problems)
