"""What `adapterfab status` answers: a batch and its jobs as one dict, and the console table of it.

The dict is built the same way whoever reads the state DB: ``StateStore.dump`` (SQLAlchemy, any
database) or ``read_sqlite`` here (the stdlib's sqlite3, the default state DB). `status` is what people
and scripts poll, so the command answers from ``read_sqlite`` without importing SQLAlchemy, Typer or
Rich's table code: on a 2-core CPU those imports alone take ~0.9 s, while reading a 1,000-job batch
takes tens of milliseconds. ``fast_main`` is that path; anything it does not cover (another database,
``--address``, ``--help``, an old DB not yet migrated) goes through the full CLI, which gives the same
answer.

This module imports only the standard library and ``adapterfab.lifecycle``/``errors``."""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterfab.errors import StateError
from adapterfab.lifecycle import JobState

STATUS_ROWS = 50  # a batch with more jobs shows its counts and the jobs not yet succeeded (--json: all)


@dataclass(frozen=True)
class JobView:
    id: str
    batch_id: str
    tenant: str
    persona: str
    method: str
    state: JobState
    step: int
    total_steps: int
    loss: float | None
    metrics: dict
    data_stats: dict
    mlflow_run_id: str | None
    adapter_uri: str | None
    model_version: int | None
    attempts: int
    started_s: float | None
    ended_s: float | None
    error: str | None
    reused_version: int | None = None
    placement: dict | None = None
    training_started_s: float | None = None

    @property
    def progress(self) -> float:
        if self.state == JobState.SUCCEEDED:
            return 1.0
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["state"] = self.state.value
        d["progress"] = round(self.progress, 4)
        return d


JOB_COLUMNS = tuple(JobView.__dataclass_fields__)
BATCH_COLUMNS = ("id", "name", "state", "base_model", "mlflow_run_id", "created_s", "started_s", "ended_s",
                 "error", "options", "stats", "cancel_requested_s")
_JSON_JOB = ("metrics", "data_stats", "placement")
_JSON_BATCH = ("options", "stats")


def job_view(m: Mapping[str, Any]) -> JobView:
    """A job's view from its row's columns (JSON columns already decoded)."""
    d = {k: m[k] for k in JOB_COLUMNS}
    d.update(state=JobState(d["state"]), metrics=dict(d["metrics"] or {}), data_stats=dict(d["data_stats"] or {}),
             placement=dict(d["placement"]) if d["placement"] else None)
    return JobView(**d)


def batch_dump(b: Mapping[str, Any], jobs: list[JobView]) -> dict[str, Any]:
    """What `status --json` prints: the batch's columns (its JSON ones {} when empty) and every job's view."""
    return {**{k: (b[k] or {}) if k in _JSON_BATCH else b[k] for k in BATCH_COLUMNS},
            "jobs": [j.to_dict() for j in jobs]}


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)


def status_json(obj: Any) -> str:
    """`status --json`: indented for a terminal, compact into a pipe (a 1,000-job batch is ~1 MB, which
    Python's indenting encoder writes ~6x slower than its compact C one)."""
    return json.dumps(obj, indent=2 if sys.stdout.isatty() else None, default=str)


# -- the stdlib reader ------------------------------------------------------------------------------
def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///PATH`` URL (None for any other database or an in-memory one)."""
    if not url.startswith("sqlite:///") or "?" in url:
        return None
    path = url.removeprefix("sqlite:///")
    return Path(path) if path and path != ":memory:" else None


def _connect(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(str(path), timeout=30)
    con.row_factory = sqlite3.Row
    con.execute("PRAGMA busy_timeout=30000")
    return con


def _decoded(row: sqlite3.Row, json_cols: tuple[str, ...]) -> dict[str, Any]:
    d = dict(row)
    for k in json_cols:
        if d[k] is not None:
            d[k] = json.loads(d[k])
    return d


def read_sqlite(path: Path, batch_id: str) -> dict[str, Any]:
    """``StateStore(url).dump(batch_id)`` read with sqlite3 (raises sqlite3.Error on a DB it cannot read)."""
    with _connect(path) as con:
        b = con.execute(f"SELECT {', '.join(BATCH_COLUMNS)} FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if b is None:
            raise StateError(f"no batch {batch_id!r}; `adapterfab status` lists batches")
        rows = con.execute(f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs WHERE batch_id = ? "
                           "ORDER BY tenant, persona", (batch_id,)).fetchall()
        return batch_dump(_decoded(b, _JSON_BATCH), [job_view(_decoded(r, _JSON_JOB)) for r in rows])


def read_sqlite_batches(path: Path, limit: int = 50) -> list[dict[str, Any]]:
    """The newest batches with their job counts (what `status` without a batch id lists)."""
    with _connect(path) as con:
        rows = con.execute("SELECT b.id, b.name, b.state, b.created_s, "
                           "(SELECT COUNT(*) FROM jobs j WHERE j.batch_id = b.id) AS jobs "
                           "FROM batches b ORDER BY b.created_s DESC LIMIT ?", (limit,)).fetchall()
        return [dict(r) for r in rows]


# -- the console view -------------------------------------------------------------------------------
NO_FIGURE = "–"  # a metric recorded without a value


def _figure(metrics: dict, key: str, spec: str) -> str:
    """``metrics[key]`` formatted by ``spec``; "" when it was never measured, NO_FIGURE when it was
    recorded as null: the state DB stores a NaN or infinite metric (a diverged eval loss) as null
    (state.FiniteJSON), and formatting None would end the command with a TypeError."""
    if key not in metrics:
        return ""
    value = metrics[key]
    return NO_FIGURE if value is None else format(value, spec)


def print_status(dump: dict, every_job: bool = False, console: Any = None) -> None:
    """The batch as a table (up to STATUS_ROWS jobs unless ``every_job``) plus its counts."""
    from rich.markup import escape
    from rich.table import Table

    out = console or _console()
    jobs = dump["jobs"]
    shown = jobs if every_job or len(jobs) <= STATUS_ROWS else \
        [j for j in jobs if j["state"] != "SUCCEEDED"][:STATUS_ROWS]
    t = Table(title=escape(f"batch {dump['id']} ({dump['name']}): {dump['state']}"))
    for col in (
        "adapter",
        "method",
        "state",
        "progress",
        "loss",
        "eval loss",
        "base eval",
        "retention",
        "version",
        "error",
    ):
        t.add_column(col, overflow="fold")
    for j in shown:
        m = j["metrics"] or {}
        cells = (f"{j['tenant']}/{j['persona']}", j["method"], j["state"],
                 f"{j['step']}/{j['total_steps']} ({100 * j['progress']:.0f}%)",
                 f"{j['loss']:.3f}" if j["loss"] is not None else "",
                 _figure(m, "eval_loss", ".3f"), _figure(m, "base_eval_loss", ".3f"),
                 f"{_figure(m, 'retention', '.0%')} ({_figure(m, 'retention_kept', '.0f')}/"
                 f"{_figure(m, 'retention_known', '.0f')})" if "retention" in m
                 else "",  # of the probe facts the base states (adapterfab/retention.py)
                 str(j["model_version"] or "") + (" (reused)" if j.get("reused_version") else ""),
                 (j["error"] or "")[:300])
        t.add_row(*map(escape, cells))  # an error text such as "[q_proj]" is data, not markup
    if shown:
        out.print(t)
    if len(shown) < len(jobs):
        counts: dict[str, int] = {}
        for j in jobs:
            counts[j["state"]] = counts.get(j["state"], 0) + 1
        out.print(f"batch {dump['id']} ({dump['name']}): {dump['state']}, {len(jobs)} jobs: "
                  + ", ".join(f"{n} {st}" for st, n in sorted(counts.items()))
                  + f"; {len(shown)} shown (--all: every job; --json: everything)", markup=False)


def print_batches(rows: list[dict[str, Any]], console: Any = None) -> None:
    import time

    from rich.markup import escape
    from rich.table import Table

    out = console or _console()
    t = Table(title="batches")
    for col in ("id", "name", "state", "jobs", "created"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["id"], escape(r["name"]), r["state"], str(r["jobs"]),
                  time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_s"])))
    out.print(t if rows else "no batches yet: `adapterfab submit BATCH.yaml`")


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)


# -- the command's fast path ------------------------------------------------------------------------
def fast_main(argv: list[str]) -> int | None:
    """`adapterfab status [BATCH_ID] [--json] [--all]` on a SQLite state DB: the exit code, or None when
    this path does not apply and the full CLI must answer."""
    if not argv or argv[0] != "status":
        return None
    flags = {a for a in argv[1:] if a.startswith("-")}
    ids = [a for a in argv[1:] if not a.startswith("-")]
    if not flags <= {"--json", "--all"} or len(ids) > 1:
        return None  # --help, --address, a typo: the full CLI parses and explains
    from adapterfab.settings import Settings

    path = sqlite_path(Settings.load().state_url)
    if path is None or not path.is_file():
        return None
    try:
        if ids:
            dump = read_sqlite(path, ids[0])
        else:
            rows = read_sqlite_batches(path)
    except StateError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    except sqlite3.Error:
        return None  # e.g. a column an older DB lacks: the full CLI migrates it
    if "--json" in flags:
        sys.stdout.write(status_json(dump if ids else rows) + "\n")
    elif ids:
        print_status(dump, "--all" in flags)
    else:
        print_batches(rows)
    return 0


def main() -> None:
    """The `adapterfab` command (see adapterfab.cli)."""
    argv = sys.argv[1:]
    if argv[:2] == ["registry", "ls"]:
        from adapterfab.registry_view import fast_ls

        code = fast_ls(argv[2:])
    else:
        code = fast_main(argv)
    if code is not None:
        sys.exit(code)
    from adapterfab.cli import main as full

    full()


if __name__ == "__main__":
    main()
