"""A batch after `submit`: following it to its end (``_wait``), ``adapterfab cancel`` and ``adapterfab logs``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from adapterfab.cli_common import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_OK,
    _fail,
    _print_json,
    _settings,
    complete_batch_id,
    err,
    json_option,
    out,
)
from adapterfab.errors import AdapterfabError
from adapterfab.lifecycle import BatchState
from adapterfab.settings import Settings

EXIT_OF = {BatchState.SUCCEEDED.value: EXIT_OK, BatchState.FAILED.value: EXIT_FAILED,
           BatchState.CANCELLED.value: EXIT_CANCELLED}


def _wait(s: Settings, batch_id: str, timeout_s: float, finished: Any = None, as_json: bool = False,
          launched: int | None = None) -> int:
    """Print progress until the batch is terminal (to stderr with ``as_json``, then the batch as JSON on
    stdout); ``finished()`` says the in-process orchestrator ended; ``launched``: the pid of the
    orchestrator this CLI started, which failed the wait if it exits before it claims the batch (it
    waited for ever when an orchestrator crashed on start-up). Returns the exit code."""
    from adapterfab.procs import pid_alive
    from adapterfab.state import StateStore
    from adapterfab.status import print_status

    say = err if as_json else out
    state = StateStore(s.state_url)
    t0 = time.monotonic()
    last: dict[str, tuple] = {}
    since = 0.0
    while True:
        b = state.get_batch(batch_id)
        polled = time.time()
        for j in state.jobs_changed(batch_id, since - 2.0):  # what changed since the last poll (clock slack)
            key = (j.state.value, j.step)
            if last.get(j.id) != key:
                last[j.id] = key
                loss = f" loss {j.loss:.3f}" if j.loss is not None else ""
                extra = f" -> version {j.model_version}" if j.model_version else ""
                extra += " (reused: same spec, data and code; --force retrains)" if j.reused_version else ""
                why = f": {j.error}" if j.error else ""
                say.print(f"[{time.monotonic() - t0:6.0f}s] {j.tenant}/{j.persona} {j.state.value} "
                          f"{j.step}/{j.total_steps}{loss}{extra}{why}", markup=False)
        since = polled
        if BatchState(b.state).terminal:
            dump = state.dump(batch_id)
            if as_json:
                _print_json(dump)
            else:
                print_status(dump, console=out)
            return EXIT_OF[b.state]
        if finished is not None and finished() and not BatchState(state.get_batch(batch_id).state).terminal:
            return EXIT_FAILED
        if launched and not b.orchestrator_pid and not pid_alive(launched):
            b = state.get_batch(batch_id)
            if not BatchState(b.state).terminal and not b.orchestrator_pid:
                err.print(f"the orchestrator of {batch_id} exited before it started the batch; see "
                          f"{s.logs / (batch_id + '.log')}", markup=False)
                return EXIT_FAILED
        if b.orchestrator_pid and not state.orchestrator_alive(b) and time.monotonic() - t0 > 10:
            b = state.get_batch(batch_id)
            if not BatchState(b.state).terminal:
                err.print(f"the orchestrator of {batch_id} died; see {s.logs / (batch_id + '.log')}", markup=False)
                return EXIT_FAILED
        if timeout_s and time.monotonic() - t0 > timeout_s:
            err.print(f"stopped waiting after {timeout_s:.0f}s; the batch goes on (`adapterfab status {batch_id}`)",
                      markup=False)
            return EXIT_FAILED
        time.sleep(1.0)


def cancel(batch_id: str = typer.Argument(..., help="the batch to stop", autocompletion=complete_batch_id),
           wait: bool = typer.Option(True, "--wait/--no-wait", help="wait until the batch has stopped"),
           timeout_s: float = typer.Option(300, help="with --wait: give up waiting after this long"),
           as_json: bool = json_option("one JSON document on stdout: the batch's status once stopped (with "
                                       "--no-wait: what was done)")) -> None:
    """Stop a batch; versions already registered stay.

    No more jobs are prepared or trained, training groups stop at their next step and their trainers
    are freed; every job not yet registering ends CANCELLED (never registered), versions
    registered stay. `submit --resume BATCH_ID` runs the cancelled jobs later. Exit code 0 once the
    batch is CANCELLED (or had already ended)."""
    from adapterfab.state import StateStore

    s = _settings()
    try:
        done = StateStore(s.state_url).cancel_batch(batch_id)
    except AdapterfabError as e:
        _fail(e)
    say = err if as_json else out
    if done == "ended":
        b = StateStore(s.state_url).get_batch(batch_id)
        say.print(f"batch {batch_id} had already ended {b.state}; nothing to cancel", markup=False)
    elif done == "cancelled":
        say.print(f"batch {batch_id} cancelled (no orchestrator was running it)", markup=False)
    else:
        say.print(f"batch {batch_id}: cancel requested; its orchestrator stops it", markup=False)
    if done == "requested" and not wait:
        if as_json:
            _print_json({"batch_id": batch_id, "cancel": done})
        return
    code = _wait(s, batch_id, timeout_s, as_json=as_json) if done == "requested" else None
    if code is None:
        dump = StateStore(s.state_url).dump(batch_id)
        if as_json:
            _print_json(dump)
        return
    raise typer.Exit(EXIT_OK if code in (EXIT_OK, EXIT_CANCELLED) else code)  # (all done before it stopped: 0)


def _job_lines(path: Path, needles: tuple[str, ...]) -> list[str]:
    """The lines of the log at ``path`` that name one of ``needles`` (a traceback stays with its line)."""
    lines: list[str] = []
    keep = False
    with path.open(errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if any(n in line for n in needles):
                keep = True
            elif line[:4].isdigit() or line.startswith("(") or not line.strip():
                keep = False  # a new record (a timestamp, a Ray worker's prefix)
            if keep:
                lines.append(line)
    return lines


def _worker_logs(placement: dict | None) -> list[Path]:
    """The Ray worker logs of the trainer process that trained a job (its pid in the job's placement),
    in every Ray session folder on this machine (worker-<id>-<job>-<pid>.out/.err)."""
    import glob
    import os

    pid = (placement or {}).get("trainer_pid")
    if not pid:
        return []
    root = os.environ.get("RAY_TMPDIR") or "/tmp/ray"
    return sorted(Path(p) for p in glob.glob(f"{root}/session_*/logs/worker-*-{pid}.*"))


def logs(batch_id: str = typer.Argument(..., help="the batch", autocompletion=complete_batch_id),
         job: str | None = typer.Argument(None, help="one job: its id or TENANT/PERSONA (default: the whole log)"),
         tail: int = typer.Option(0, "--tail", "-n", min=0, help="only the last N lines (0: all)"),
         follow: bool = typer.Option(False, "--follow", "-f", help="keep printing new lines until the batch ends"),
         as_json: bool = json_option("one JSON document on stdout: {batch_id, job, files, lines}")) -> None:
    """A batch's orchestrator log, or one job's lines.

    The orchestrator log is ADAPTERFAB_HOME/logs/BATCH_ID.log (its stages, every job's state changes and
    failures with their tracebacks); a job's lines come from it and from the Ray worker log of the
    trainer that trained it. A batch submitted with --address logs on its cluster: `status
    --address`."""
    from adapterfab.state import StateStore

    s = _settings()
    path = s.logs / f"{batch_id}.log"
    state = StateStore(s.state_url)
    try:
        b = state.get_batch(batch_id)
    except AdapterfabError as e:
        _fail(e)
    files = [path] if path.is_file() else []
    if not files and job is None:
        _fail(AdapterfabError(f"batch {batch_id} has no orchestrator log at {path} (a batch run by `adapterfab "
                              "run` or `submit --address` logs where it ran: `status BATCH_ID --address URL`)"))
    if job is None:
        lines = path.read_text(errors="replace").splitlines()
        if follow and not as_json:
            _follow(state, batch_id, path, lines, tail)
            return
    else:
        jobs = [j for j in state.jobs(batch_id) if job in (j.id, f"{j.tenant}/{j.persona}")]
        if not jobs:
            _fail(AdapterfabError(f"batch {batch_id} has no job {job!r}: give its id or TENANT/PERSONA "
                                  "(`adapterfab status BATCH_ID`)"), EXIT_INVALID)
        j = jobs[0]
        needles = (j.id, f"{j.tenant}/{j.persona}")
        workers = _worker_logs(j.placement)
        files += workers
        lines = [line for f in files for line in _job_lines(f, needles)]
    if tail:
        lines = lines[-tail:]
    if as_json:
        _print_json({"batch_id": batch_id, "batch_state": b.state, "job": job, "files": [str(f) for f in files],
                     "lines": lines})
        return
    for line in lines:
        print(line)


def _follow(state: Any, batch_id: str, path: Path, lines: list[str], tail: int) -> None:
    """Print the log, then what it grows by, until the batch has ended (and its orchestrator wrote its last)."""
    for line in lines[-tail:] if tail else lines:
        print(line, flush=True)
    t0 = time.monotonic()  # (an orchestrator that just started may not have claimed the batch yet)
    with path.open(errors="replace") as f:
        f.seek(0, 2)
        while True:
            chunk = f.read()
            if chunk:
                print(chunk, end="", flush=True)
                continue
            b = state.get_batch(batch_id)
            if not state.orchestrator_alive(b) and (BatchState(b.state).terminal or time.monotonic() - t0 > 10):
                if not BatchState(b.state).terminal:  # nothing runs it: nothing more will be written
                    err.print(f"no orchestrator runs {batch_id} ({b.state}); `adapterfab submit --resume "
                              f"{batch_id}` runs it again", markup=False)
                return
            time.sleep(0.5)
