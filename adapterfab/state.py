"""Durable batch and job state (SQLAlchemy; SQLite by default, any SQLAlchemy URL works).

Every job state change goes through ``StateStore.move_job``, which checks the transition, logs it
with tenant and job id, and commits it; so ``adapterfab status`` works after the CLI restarts."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import JSON, Float, Integer, String, Text, TypeDecorator, create_engine, event, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from adapterfab import faults
from adapterfab.errors import StateError
from adapterfab.lifecycle import BatchState, JobState, can_move
from adapterfab.procs import holder_alive
from adapterfab.status import BATCH_COLUMNS, JOB_COLUMNS, JobView, batch_dump, dumps, job_view

log = logging.getLogger("adapterfab.state")
CANCELLED_ERROR = "cancelled by `adapterfab cancel` before it was registered"


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float made None, at any depth."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class FiniteJSON(TypeDecorator):
    """JSON whose NaN and infinities are stored as null: PostgreSQL refuses them (the job failed with a
    database error when an eval loss overflowed) and SQLite kept them, which `status --json` then printed
    as `NaN`, not JSON."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return _finite(value)


class Base(DeclarativeBase):
    pass


class BatchRow(Base):
    __tablename__ = "batches"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16), default=BatchState.PENDING.value)
    spec_text: Mapped[str] = mapped_column(Text)
    spec_path: Mapped[str] = mapped_column(Text, default="")
    base_model: Mapped[str] = mapped_column(Text, default="")
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    orchestrator_pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # host, boot and start time of that pid (procs.proc_token): a later process with the same number is
    # never taken for the orchestrator (claim_batch, `adapterfab down`)
    orchestrator_token: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # the orchestrator's last sign of life (every procs.HEARTBEAT_S): how a claim made on another host is
    # judged, where its pid cannot be checked
    heartbeat_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_s: Mapped[float] = mapped_column(Float, default=time.time)
    started_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    options: Mapped[dict | None] = mapped_column(FiniteJSON, nullable=True)  # e.g. {"force": true}
    plan: Mapped[list | None] = mapped_column(FiniteJSON, nullable=True)  # jobs.plan.PlannedJob dicts, made at submit
    stats: Mapped[dict | None] = mapped_column(FiniteJSON, nullable=True)  # where the run's time went (jobs/factory.py)
    # `adapterfab cancel`: when it was asked; the batch's orchestrator stops at its next check (cancel_batch)
    cancel_requested_s: Mapped[float | None] = mapped_column(Float, nullable=True)


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(300), primary_key=True)
    batch_id: Mapped[str] = mapped_column(String(64), index=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    persona: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING.value)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    metrics: Mapped[dict] = mapped_column(FiniteJSON, default=dict)
    data_stats: Mapped[dict] = mapped_column(FiniteJSON, default=dict)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    adapter_uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    model_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_s: Mapped[float] = mapped_column(Float, default=time.time)
    started_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # when it last entered TRAINING: the dashboard's step rate (ETA) and resource-seconds (cost)
    training_started_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    reused_version: Mapped[int | None] = mapped_column(Integer, nullable=True)  # idempotent resubmit
    # where it trains: node_id, workers, zero_stage, cpus, gpus (per worker), fused_with
    placement: Mapped[dict | None] = mapped_column(FiniteJSON, nullable=True)
    # when anything of the job last changed: `--wait` and the dashboard read only what changed
    updated_s: Mapped[float | None] = mapped_column(Float, nullable=True, default=time.time, onupdate=time.time,
                                                    index=True)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_s: Mapped[float] = mapped_column(Float, default=time.time)
    revoked: Mapped[int] = mapped_column(Integer, default=0)
    role: Mapped[str | None] = mapped_column(String(16), nullable=True)  # None: a tenant key; "operator"
    expires_s: Mapped[float | None] = mapped_column(Float, nullable=True)  # None: never expires
    revoked_s: Mapped[float | None] = mapped_column(Float, nullable=True)  # when it was revoked
    rotated_to: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the key id that replaced it


# the registry's catalogue (adapterfab/registry_index.py): MLflow is the registry of record ------
class RegistryModelRow(Base):
    __tablename__ = "registry_models"
    name: Mapped[str] = mapped_column(String(256), primary_key=True)  # af.<tenant>.<persona>
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    aliases: Mapped[dict] = mapped_column(FiniteJSON, default=dict)  # alias -> version
    indexed_at: Mapped[float] = mapped_column(Float, default=time.time)


class RegistryVersionRow(Base):
    __tablename__ = "registry_versions"
    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    source: Mapped[str] = mapped_column(Text)
    run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    tags: Mapped[dict] = mapped_column(FiniteJSON, default=dict)
    created_s: Mapped[float] = mapped_column(Float, default=0.0)


class RegistryIndexMetaRow(Base):
    __tablename__ = "registry_index_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[float] = mapped_column(Float)


def _view(row: JobRow) -> JobView:
    return job_view({k: getattr(row, k) for k in JOB_COLUMNS})


def _add_missing_columns(engine: Any) -> None:
    """A state database made by an older adapterfab lacks newer nullable columns: add them in place
    (``create_all`` only creates missing tables)."""
    from sqlalchemy import inspect, text
    from sqlalchemy.exc import DBAPIError

    insp = inspect(engine)
    for table in Base.metadata.sorted_tables:
        have = {c["name"] for c in insp.get_columns(table.name)}
        for col in table.columns:
            if col.name not in have and col.nullable:
                ddl = col.type.compile(dialect=engine.dialect)
                try:
                    with engine.begin() as conn:
                        conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN {col.name} {ddl}'))
                except DBAPIError:  # another process added it first ("duplicate column"): fine if it is there
                    if col.name not in {c["name"] for c in inspect(engine).get_columns(table.name)}:
                        raise
        indexes = {i["name"] for i in insp.get_indexes(table.name)}
        for index in table.indexes:  # an index added in a newer version (create_all skips existing tables)
            if index.name not in indexes:
                try:
                    index.create(engine, checkfirst=True)
                except DBAPIError:  # made meanwhile by another process
                    if index.name not in {i["name"] for i in inspect(engine).get_indexes(table.name)}:
                        raise


def _apply_move(row: JobRow, new: JobState, now: float, fields: dict[str, Any]) -> JobState:
    """A checked state change of ``row`` (with its timestamps and ``fields``); returns the old state."""
    old = JobState(row.state)
    if not can_move(old, new):
        raise StateError(f"job {row.id}: {old.value} -> {new.value} is not allowed")
    row.state = new.value
    if new == JobState.PREPARING and row.started_s is None:
        row.started_s = now
    if new == JobState.TRAINING and old != new:
        row.training_started_s = now
    if new.terminal:
        row.ended_s = now
    for k, v in fields.items():
        setattr(row, k, v)
    return old


def _log_move(old: JobState, new: JobState, tenant: str, persona: str, job_id: str) -> None:
    if old != new:
        log.info("job %s: %s -> %s", job_id, old.value, new.value,
                 extra={"tenant": tenant, "adapter_id": f"{tenant}/{persona}", "job_id": job_id})


class LockRow(Base):
    """A named lock held by one process (pid and start token) across processes and batches, e.g.
    registering one job fingerprint (two identical batches at once register one version)."""
    __tablename__ = "locks"
    key: Mapped[str] = mapped_column(String(400), primary_key=True)
    holder: Mapped[str] = mapped_column(String(300))
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    token: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_s: Mapped[float] = mapped_column(Float, default=time.time)


class StateStore:
    def __init__(self, url: str):
        self.url = url
        try:
            self._open(url)
        except (SQLAlchemyError, OSError) as e:  # a bad URL, a refused connection, a file that is no database
            from adapterfab.errors import redact_credentials

            why = str(getattr(e, "orig", None) or e).strip().splitlines()[0][:300]
            raise StateError(f"the state database {redact_credentials(url)} cannot be used: "
                             f"{redact_credentials(why)} (ADAPTERFAB_STATE_URL)") from None

    def _open(self, url: str) -> None:
        from adapterfab.settings import private_sqlite

        private_sqlite(url)  # a new database file (and its -wal, -shm, folder) owner-only: tenants' data
        self.engine = create_engine(url, connect_args={"timeout": 30} if url.startswith("sqlite") else {})
        if url.startswith("sqlite"):
            @event.listens_for(self.engine, "connect")
            def _wal(dbapi_conn, _rec):  # noqa: ANN001 - several processes read while one writes
                dbapi_conn.execute("PRAGMA journal_mode=WAL")
                dbapi_conn.execute("PRAGMA busy_timeout=30000")
        Base.metadata.create_all(self.engine)
        _add_missing_columns(self.engine)
        # read-check-write transactions (job moves, batch claims) lock before they read: SQLite's
        # BEGIN IMMEDIATE on an engine of their own; elsewhere SELECT ... FOR UPDATE (with_for_update)
        self._locking = self.engine
        if url.startswith("sqlite:///") and ":memory:" not in url:  # (an in-memory database is one connection's)
            self._locking = create_engine(url, connect_args={"timeout": 30})

            @event.listens_for(self._locking, "connect")
            def _manual(dbapi_conn, _rec):  # noqa: ANN001 - SQLAlchemy emits BEGIN, not the driver
                dbapi_conn.isolation_level = None
                dbapi_conn.execute("PRAGMA journal_mode=WAL")
                dbapi_conn.execute("PRAGMA busy_timeout=30000")

            @event.listens_for(self._locking, "begin")
            def _immediate(conn):  # noqa: ANN001
                conn.exec_driver_sql("BEGIN IMMEDIATE")

    # batches ----------------------------------------------------------------------------------
    def create_batch(self, batch_id: str, name: str, spec_text: str, spec_path: str, base_model: str,
                     jobs: list[dict[str, Any]], options: dict[str, Any] | None = None,
                     plan: list[dict[str, Any]] | None = None) -> None:
        with Session(self.engine) as s, s.begin():
            if s.get(BatchRow, batch_id) is not None:
                raise StateError(f"a batch {batch_id!r} already exists; batch ids are never reused")
            s.add(BatchRow(id=batch_id, name=name, spec_text=spec_text, spec_path=spec_path,
                           base_model=base_model, options=options or {}, plan=plan))
            for j in jobs:
                s.add(JobRow(batch_id=batch_id, **j))

    def get_batch(self, batch_id: str) -> BatchRow:
        with Session(self.engine, expire_on_commit=False) as s:
            row = s.get(BatchRow, batch_id)
            if row is None:
                raise StateError(f"no batch {batch_id!r}; `adapterfab status` lists batches")
            s.expunge(row)
            return row

    def claim_batch(self, batch_id: str, pid: int, token: str | None,
                    alive: Callable[[int | None, str | None], bool]) -> BatchRow | None:
        """Make ``pid`` (with its start ``token``) the batch's one orchestrator, atomically: None (and
        nothing changed) while another live orchestrator holds it (``alive(pid, token)``), else the
        batch as it was before the claim. Two orchestrators started at once for one batch (two
        ``submit --resume``) cannot both run it."""
        with Session(self._locking, expire_on_commit=False) as s, s.begin():
            row = s.get(BatchRow, batch_id, with_for_update=True)
            if row is None:
                raise StateError(f"no batch {batch_id!r}; `adapterfab status` lists batches")
            held = row.orchestrator_pid
            if held and (held, row.orchestrator_token) != (pid, token) \
                    and holder_alive(held, row.orchestrator_token, row.heartbeat_s, alive):
                return None
            before = {c: getattr(row, c) for c in ("state", "orchestrator_pid", "orchestrator_token", "heartbeat_s")}
            row.orchestrator_pid, row.orchestrator_token, row.heartbeat_s = pid, token, time.time()
            s.flush()
            s.expunge(row)
        for k, v in before.items():
            setattr(row, k, v)
        return row

    def reopen_batch(self, batch_id: str, alive: Callable[[int | None, str | None], bool]) -> list[JobView]:
        """``submit --resume``: the batch back to PENDING, atomically refused (StateError) while a live
        orchestrator holds it. Returns its unfinished jobs (none: the batch is marked SUCCEEDED)."""
        with Session(self._locking, expire_on_commit=False) as s, s.begin():
            row = s.get(BatchRow, batch_id, with_for_update=True)
            if row is None:
                raise StateError(f"no batch {batch_id!r}; `adapterfab status` lists batches")
            if row.state in (BatchState.PENDING.value, BatchState.RUNNING.value) \
                    and holder_alive(row.orchestrator_pid, row.orchestrator_token, row.heartbeat_s, alive):
                raise StateError(f"batch {batch_id} is still running (orchestrator pid {row.orchestrator_pid}); "
                                 "`adapterfab status` follows it")
            todo = [_view(j) for j in s.scalars(select(JobRow).where(JobRow.batch_id == batch_id))
                    if j.state != JobState.SUCCEEDED.value]
            if todo:  # the next orchestrator claims it (claim_batch); a cancelled batch goes on
                row.state, row.ended_s, row.error = BatchState.PENDING.value, None, None
                row.cancel_requested_s = None
                row.orchestrator_pid = row.orchestrator_token = None
            elif row.state != BatchState.SUCCEEDED.value:
                row.state, row.ended_s, row.error = BatchState.SUCCEEDED.value, time.time(), None
        return todo

    def cancel_batch(self, batch_id: str, alive: Callable[[int | None, str | None], bool] | None = None) -> str:
        """`adapterfab cancel`, atomically with the orchestrator's claim: "ended" when the batch is already
        terminal (nothing changes); "requested" when a live orchestrator holds it (it stops handing out
        work, its unfinished jobs end CANCELLED, jobs already registering finish: run_batch); "cancelled"
        when none does (a batch not yet claimed, or one whose orchestrator died): its unfinished jobs are
        CANCELLED here and the batch too. A job a dead orchestrator left REGISTERING may have its version:
        it is FAILED with that reason (`submit --resume` finds its version; never cancelled unregistered)."""
        now = time.time()
        with Session(self._locking, expire_on_commit=False) as s, s.begin():
            row = s.get(BatchRow, batch_id, with_for_update=True)
            if row is None:
                raise StateError(f"no batch {batch_id!r}; `adapterfab status` lists batches")
            if BatchState(row.state).terminal:
                return "ended"
            row.cancel_requested_s = row.cancel_requested_s or now
            if holder_alive(row.orchestrator_pid, row.orchestrator_token, row.heartbeat_s, alive):
                return "requested"
            moved = []
            for j in s.scalars(select(JobRow).where(JobRow.batch_id == batch_id).with_for_update()):
                old = JobState(j.state)
                if old.terminal:
                    continue
                if old == JobState.REGISTERING:
                    new, why = JobState.FAILED, ("cancelled while its orchestrator was gone mid-registration: "
                                                 "`adapterfab submit --resume` finds out whether it was registered")
                else:
                    new, why = JobState.CANCELLED, CANCELLED_ERROR
                _apply_move(j, new, now, {"error": why})
                moved.append((old, new, j.tenant, j.persona, j.id))
            row.state, row.ended_s = BatchState.CANCELLED.value, now
        for old, new, tenant, persona, jid in moved:
            _log_move(old, new, tenant, persona, jid)
        return "cancelled"

    def cancel_requested(self, batch_id: str) -> bool:
        """Whether `adapterfab cancel` asked the batch to stop (what its orchestrator polls)."""
        with Session(self.engine) as s:
            return s.scalar(select(BatchRow.cancel_requested_s).where(BatchRow.id == batch_id)) is not None

    def heartbeat(self, batch_id: str, pid: int, token: str | None) -> bool:
        """The orchestrator ``pid`` (``token``) is alive; False when it no longer holds the batch."""
        from sqlalchemy import update

        with self.engine.begin() as conn:
            res = conn.execute(update(BatchRow).where(BatchRow.id == batch_id, BatchRow.orchestrator_pid == pid,
                                                      BatchRow.orchestrator_token == token)
                               .values(heartbeat_s=time.time()))
        return bool(res.rowcount)

    def orchestrator_alive(self, batch: BatchRow) -> bool:
        """Whether ``batch``'s recorded orchestrator still runs (on another host: it beats)."""
        return holder_alive(batch.orchestrator_pid, batch.orchestrator_token, batch.heartbeat_s)

    def list_batches(self, limit: int | None = 50, tenant: str | None = None,
                     states: tuple[str, ...] | None = None) -> list[BatchRow]:
        """The newest ``limit`` batches (None: all); with ``tenant``, the newest that hold a job of that
        tenant (the filter before the limit: other tenants' batches must not push a tenant's own off its
        list); with ``states``, those in one of them."""
        with Session(self.engine, expire_on_commit=False) as s:
            q = select(BatchRow)
            if states is not None:
                q = q.where(BatchRow.state.in_(states))
            if tenant is not None:
                q = q.where(BatchRow.id.in_(select(JobRow.batch_id).where(JobRow.tenant == tenant)))
            rows = list(s.scalars(q.order_by(BatchRow.created_s.desc()).limit(limit)))
            for r in rows:
                s.expunge(r)
            return rows

    def update_batch(self, batch_id: str, **fields: Any) -> None:
        with Session(self.engine) as s, s.begin():
            row = s.get(BatchRow, batch_id)
            if row is None:
                raise StateError(f"no batch {batch_id!r}")
            for k, v in fields.items():
                setattr(row, k, v.value if isinstance(v, BatchState) else v)

    # jobs -------------------------------------------------------------------------------------
    def jobs(self, batch_id: str) -> list[JobView]:
        return self.jobs_of_batches([batch_id]).get(batch_id, [])

    def jobs_of_batches(self, batch_ids: list[str], tenant: str | None = None) -> dict[str, list[JobView]]:
        """The jobs of several batches in one query, by batch id (each batch's by tenant and persona; a
        batch without any is absent); with ``tenant``, only that tenant's. The dashboard's lists
        of 100 batches read their jobs at once, not with a query per batch."""
        q = select(JobRow).where(JobRow.batch_id.in_(batch_ids))
        if tenant is not None:
            q = q.where(JobRow.tenant == tenant)
        out: dict[str, list[JobView]] = {}
        with Session(self.engine) as s:
            for r in s.scalars(q.order_by(JobRow.batch_id, JobRow.tenant, JobRow.persona)):
                out.setdefault(r.batch_id, []).append(_view(r))
        return out

    def jobs_changed(self, batch_id: str, since_s: float) -> list[JobView]:
        """The batch's jobs changed after ``since_s`` (epoch seconds)."""
        with Session(self.engine) as s:
            return [_view(r) for r in s.scalars(select(JobRow).where(JobRow.batch_id == batch_id,
                                                                      JobRow.updated_s > since_s)
                                                .order_by(JobRow.tenant, JobRow.persona))]

    def job_counts(self, batch_id: str) -> dict[str, int]:
        """How many of the batch's jobs are in each state (one aggregate query)."""
        from sqlalchemy import func

        with Session(self.engine) as s:
            return {st: n for st, n in s.execute(select(JobRow.state, func.count()).where(JobRow.batch_id == batch_id)
                                                 .group_by(JobRow.state))}

    def jobs_by_id(self, job_ids: list[str]) -> list[JobView]:
        with Session(self.engine) as s:
            return [_view(r) for r in s.scalars(select(JobRow).where(JobRow.id.in_(job_ids)))]

    def job(self, job_id: str) -> JobView:
        with Session(self.engine) as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise StateError(f"no job {job_id!r}")
            return _view(row)

    def move_job(self, job_id: str, new: JobState, **fields: Any) -> JobView:
        """The one place a job changes state: checks the transition, records it, logs it (the row locked
        from the read to the write: two processes cannot both make the same move)."""
        with Session(self._locking) as s, s.begin():
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is None:
                raise StateError(f"no job {job_id!r}")
            old = _apply_move(row, new, time.time(), fields)
            view = _view(row)
        _log_move(old, new, view.tenant, view.persona, job_id)
        faults.reached(new.value)
        return view

    def move_jobs(self, job_ids: list[str], new: JobState, **fields: Any) -> None:
        """``move_job`` for several jobs in one transaction (a fused group entering TRAINING)."""
        moved = []
        with Session(self._locking) as s, s.begin():
            rows = {r.id: r for r in s.scalars(select(JobRow).where(JobRow.id.in_(job_ids)).with_for_update())}
            now = time.time()
            for jid in job_ids:
                row = rows.get(jid)
                if row is None:
                    raise StateError(f"no job {jid!r}")
                moved.append((_apply_move(row, new, now, fields), row.tenant, row.persona, jid))
        for old, tenant, persona, jid in moved:
            _log_move(old, new, tenant, persona, jid)
        if moved:
            faults.reached(new.value)

    def update_progress(self, progress: dict[str, tuple[int, float | None]]) -> int:
        """Step and loss of the TRAINING jobs among ``progress`` (job id -> (step, loss)), in one
        transaction; jobs that left TRAINING keep their final figures. Returns the rows written."""
        if not progress:
            return 0
        from sqlalchemy import bindparam, update

        stmt = (update(JobRow).where(JobRow.id == bindparam("jid"), JobRow.state == JobState.TRAINING.value)
                .values(step=bindparam("s"), loss=bindparam("l"), updated_s=bindparam("u"))
                .execution_options(synchronize_session=False))
        now = time.time()
        with self.engine.begin() as conn:
            res = conn.execute(
                stmt, [{"jid": j, "s": int(st), "l": loss, "u": now} for j, (st, loss) in progress.items()]
            )
        return int(res.rowcount or 0)

    def update_job(self, job_id: str, **fields: Any) -> None:
        """Progress and metrics, no state change."""
        if "state" in fields:
            raise StateError("use move_job to change a job's state")
        with Session(self.engine) as s, s.begin():
            row = s.get(JobRow, job_id)
            if row is None:
                raise StateError(f"no job {job_id!r}")
            for k, v in fields.items():
                setattr(row, k, v)

    # locks ------------------------------------------------------------------------------------
    def try_lock(self, key: str, holder: str, pid: int, token: str | None,
                 alive: Callable[[int | None, str | None], bool], lease_s: float = 600.0) -> str | None:
        """Take the lock ``key`` for ``holder`` (held by process ``pid`` with start ``token``): None when
        taken (or already ours), else the live holder's name. A holder whose process is gone
        (``alive(pid, token)`` false: killed mid-work) loses the lock to the next taker; a holder on
        another host, whose pid cannot be checked, holds it for ``lease_s`` at most."""
        from sqlalchemy.exc import IntegrityError

        try:
            with Session(self._locking) as s, s.begin():
                row = s.get(LockRow, key, with_for_update=True)
                if row is not None and row.holder != holder \
                        and holder_alive(row.pid, row.token, row.created_s, alive, lease_s):
                    return row.holder
                if row is None:
                    s.add(LockRow(key=key, holder=holder, pid=pid, token=token, created_s=time.time()))
                else:
                    row.holder, row.pid, row.token, row.created_s = holder, pid, token, time.time()
        except IntegrityError:  # another process inserted it first (databases without BEGIN IMMEDIATE)
            return "another process"
        return None

    def unlock(self, key: str, holder: str) -> None:
        """Release ``key`` if ``holder`` holds it."""
        from sqlalchemy import delete

        with Session(self._locking) as s, s.begin():
            s.execute(delete(LockRow).where(LockRow.key == key, LockRow.holder == holder))

    # api keys ---------------------------------------------------------------------------------
    def add_key(self, key_id: str, tenant: str, sha256: str, role: str | None = None,
                expires_s: float | None = None) -> None:
        with Session(self.engine) as s, s.begin():
            s.add(ApiKeyRow(key_id=key_id, tenant=tenant, sha256=sha256, role=role, expires_s=expires_s))

    def key_by_id(self, key_id: str) -> ApiKeyRow | None:
        with Session(self.engine, expire_on_commit=False) as s:
            row = s.get(ApiKeyRow, key_id)
            if row is not None:
                s.expunge(row)
            return row

    def list_keys(self, tenant: str | None = None, role: str | None = None) -> list[ApiKeyRow]:
        """Keys, oldest first: a tenant's (``tenant``), operator keys (``role``), or all."""
        with Session(self.engine, expire_on_commit=False) as s:
            q = select(ApiKeyRow).order_by(ApiKeyRow.created_s, ApiKeyRow.key_id)
            if tenant is not None:
                q = q.where(ApiKeyRow.tenant == tenant, ApiKeyRow.role.is_(None))
            if role is not None:
                q = q.where(ApiKeyRow.role == role)
            rows = list(s.scalars(q))
            s.expunge_all()
            return rows

    def revoke_key(self, key_id: str, now: float, expires_s: float | None = None,
                   rotated_to: str | None = None) -> ApiKeyRow | None:
        """Revoke a key now, or (``expires_s``) let it expire then if that is sooner than it would.
        None: no such key."""
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            row = s.get(ApiKeyRow, key_id)
            if row is None:
                return None
            if expires_s is None:
                if not row.revoked:
                    row.revoked, row.revoked_s = 1, now
            elif row.expires_s is None or expires_s < row.expires_s:
                row.expires_s = expires_s
            if rotated_to is not None:
                row.rotated_to = rotated_to
            s.flush()
            s.expunge(row)
            return row

    def dump(self, batch_id: str) -> dict[str, Any]:
        """The batch and its jobs as `status --json` prints them (adapterfab.status)."""
        b = self.get_batch(batch_id)
        return batch_dump({k: getattr(b, k) for k in BATCH_COLUMNS}, self.jobs(batch_id))


__all__ = ["ApiKeyRow", "BatchRow", "JobRow", "JobView", "StateStore", "dumps"]
