"""Read-side queries over the state database that summarise jobs in SQL, without loading them.

The dashboard's batch list (review, 2026-12) read every job row of the 100 batches it lists to count
them by state, 2.7 s and ~200 MB per 2-second poll with 500 jobs a batch; ``batch_totals`` asks the
database for one row per (batch, state) instead: counts, summed progress and cost, first start and last
end. Each figure is the one the job views give (``JobView.progress`` here, the dashboard's cost rule
passed in as SQL), summed in another order: equal up to float rounding in the last bits.

The cluster page (review, 2026-12) read the same 50,000 job rows per poll to show its active jobs and
the 20 most recent ended ones; ``placed_jobs`` reads those jobs only (ordered and cut by the database).

SQLite and PostgreSQL are what the tests run; ``json_array_length`` also compiles for MySQL/MariaDB."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Float, Integer, String, and_, case, cast, func, literal, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

from adapterfab.lifecycle import JobState
from adapterfab.state import JobRow, StateStore
from adapterfab.status import JOB_COLUMNS, JobView, job_view


@dataclass(frozen=True)
class JobTotals:
    """A batch's jobs (those a reader sees) summed up: what its line in a list shows."""

    jobs: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # jobs per state value
    progress: float = 0.0  # the sum of the jobs' JobView.progress
    gpu_s: float = 0.0
    cpu_s: float = 0.0
    first_started_s: float | None = None  # the earliest started_s that is set (not 0)
    last_ended_s: float | None = None  # the latest ended_s, 0 where none has one; None: no jobs


class json_array_length(FunctionElement):  # noqa: N801 - a SQL function, named as SQL names it
    """The length of a JSON array (a JSON path element such as ``JobRow.placement["fused_with"]``);
    0 or NULL for anything else (a missing key, a JSON null, a scalar), never an error."""

    type = Integer()
    inherit_cache = True
    name = "json_array_length"


@compiles(json_array_length)
def _array_length(element: Any, compiler: Any, **kw: Any) -> str:  # MySQL, MariaDB
    return f"JSON_LENGTH({compiler.process(element.clauses, **kw)})"


@compiles(json_array_length, "sqlite")
def _array_length_sqlite(element: Any, compiler: Any, **kw: Any) -> str:
    return f"json_array_length({compiler.process(element.clauses, **kw)})"


@compiles(json_array_length, "postgresql")
def _array_length_pg(element: Any, compiler: Any, **kw: Any) -> str:
    arg = compiler.process(element.clauses, **kw)  # json_array_length raises on a scalar or a JSON null
    return f"CASE WHEN json_typeof({arg}) = 'array' THEN json_array_length({arg}) END"


def json_float(column: Any, key: str) -> ColumnElement:
    """``column[key]`` of a JSON column as a float (NULL when missing or null): cast, because SQLite's
    json_extract gives an integer for ``2``, and integer division would follow."""
    return cast(column[key].as_float(), Float)


def progress_sql() -> ColumnElement:
    """``JobView.progress`` as SQL over the jobs table."""
    ratio = cast(JobRow.step, Float) / JobRow.total_steps
    return case((JobRow.state == JobState.SUCCEEDED.value, literal(1.0)),
                (JobRow.total_steps == 0, literal(0.0)),
                (ratio >= 1.0, literal(1.0)), else_=ratio)


def batch_totals(store: StateStore, batch_ids: list[str], tenant: str | None = None,
                 cost: tuple[ColumnElement, ColumnElement] | None = None) -> dict[str, JobTotals]:
    """Each batch's ``JobTotals`` in one query (a batch without jobs is absent); with ``tenant``, of that
    tenant's jobs only. ``cost``: the (GPU-seconds, CPU-seconds) of one job as SQL over the jobs table
    (None: 0)."""
    if not batch_ids:
        return {}
    gpu, cpu = cost or (literal(0.0), literal(0.0))
    q = (select(JobRow.batch_id, JobRow.state, func.count(), func.sum(progress_sql()), func.sum(gpu),
                func.sum(cpu), func.min(case((JobRow.started_s != 0, JobRow.started_s))),
                func.max(func.coalesce(JobRow.ended_s, 0.0)))
         .where(JobRow.batch_id.in_(batch_ids)).group_by(JobRow.batch_id, JobRow.state))
    if tenant is not None:
        q = q.where(JobRow.tenant == tenant)
    groups: dict[str, list[Any]] = {}
    with Session(store.engine) as s:
        for row in s.execute(q):
            groups.setdefault(row[0], []).append(row)
    order = {st.value: i for i, st in enumerate(JobState)}  # counts in lifecycle order
    out = {}
    for batch_id, rows in groups.items():
        rows.sort(key=lambda r: order.get(r[1], len(order)))
        started = [r[6] for r in rows if r[6] is not None]
        out[batch_id] = JobTotals(
            jobs=sum(r[2] for r in rows), counts={r[1]: r[2] for r in rows},
            progress=sum(float(r[3] or 0.0) for r in rows), gpu_s=sum(float(r[4] or 0.0) for r in rows),
            cpu_s=sum(float(r[5] or 0.0) for r in rows), first_started_s=min(started, default=None),
            last_ended_s=max(float(r[7]) for r in rows))
    return out


@dataclass(frozen=True)
class PlacedJobs:
    """What the cluster page shows of the listed batches' jobs (``placed_jobs``)."""

    active: list[JobView]  # in the list's order: batch by batch, each by tenant and persona
    recent: list[JobView]  # the latest ended first (no end: 0), ties in the list's order
    seen: dict[str, set[str]]  # by batch: the ids in these jobs' ``fused_with`` that the reader sees


def placed_jobs(store: StateStore, batch_ids: list[str], tenant: str | None, active: Iterable[JobState],
                ended: Iterable[JobState], recent: int) -> PlacedJobs:
    """Of the jobs of ``batch_ids`` (listed newest first; with ``tenant``, that tenant's only): every job
    in an ``active`` state, and the ``recent`` latest ended in an ``ended`` state that have a placement.
    What reading every job of the batches in the list's order, then sorting by end, gave: the database
    orders and cuts, so only the jobs shown are read (and the ids their fused groups name)."""
    if not batch_ids:
        return PlacedJobs([], [], {})
    position = case({b: i for i, b in enumerate(batch_ids)}, value=JobRow.batch_id, else_=len(batch_ids))
    mine = [JobRow.batch_id.in_(batch_ids)] + ([JobRow.tenant == tenant] if tenant is not None else [])
    listed = (position, JobRow.tenant, JobRow.persona)
    # a placement: not SQL NULL, JSON null or {} (JobView's None; stored as json.dumps writes them)
    placed = and_(JobRow.placement.is_not(None), cast(JobRow.placement, String).not_in(("null", "{}")))
    with Session(store.engine) as s:
        shown = [_view(r) for r in s.scalars(select(JobRow).where(
            *mine, JobRow.state.in_([st.value for st in active])).order_by(*listed))]
        latest: list[JobView] = []
        q = (select(JobRow).where(*mine, JobRow.state.in_([st.value for st in ended]), placed)
             .order_by(func.coalesce(JobRow.ended_s, 0.0).desc(), *listed).execution_options(yield_per=recent))
        for r in s.scalars(q) if recent > 0 else ():  # a page at a time: the check below rarely skips one
            if (v := _view(r)).placement:  # (any other JSON that JobView finds empty)
                latest.append(v)
                if len(latest) == recent:
                    break
        fused = {i for j in [*shown, *latest] for i in (j.placement or {}).get("fused_with") or []
                 if isinstance(i, str)}  # (job ids: anything else names no job)
        seen: dict[str, set[str]] = {}
        if fused:
            q = select(JobRow.batch_id, JobRow.id).where(*mine, JobRow.id.in_(sorted(fused)))
            for batch_id, job_id in s.execute(q):
                seen.setdefault(batch_id, set()).add(job_id)
    return PlacedJobs(shown, latest, seen)


def _view(row: JobRow) -> JobView:
    return job_view({k: getattr(row, k) for k in JOB_COLUMNS})
