"""What every ``adapterfab`` command shares: the consoles, failing with a message and an exit code, the
settings, the registry with its catalogue, JSON output."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from adapterfab.errors import AdapterfabError, InvalidId
from adapterfab.settings import Settings

out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)


# exit codes, the same for every command (the app's --help and docs/cli.md list them)
EXIT_OK = 0
EXIT_FAILED = 1  # an error (stack not running, no such batch or adapter, ...), a batch with a failed job, a timeout
EXIT_INVALID = 2  # bad input: a usage error, an invalid batch spec
EXIT_REFUSED = 3  # `registry promote`: the eval gate refused the version
EXIT_CANCELLED = 4  # a batch waited for ended CANCELLED (`adapterfab cancel`)
EXIT_CODES_HELP = ("Exit codes: 0 success; 1 an error, or a batch waited for has a failed job, or a timeout; "
                   "2 bad input (usage, an invalid batch spec or name); 3 refused by the promotion gate; "
                   "4 a batch waited for was cancelled.")


def _fail(e: Exception, code: int = EXIT_FAILED) -> None:
    if isinstance(e, InvalidId) and code == EXIT_FAILED:  # a malformed tenant, persona or adapter name
        code = EXIT_INVALID
    err.print(f"[red]error:[/red] {escape(str(e))}")  # the message may quote user text holding [brackets]
    raise typer.Exit(code)


def _settings() -> Settings:
    s = Settings.load()
    s.ensure_dirs()
    return s


def _need_mlflow(s: Settings) -> str:
    if not s.mlflow_uri:
        _fail(AdapterfabError("no MLflow server known: run `adapterfab up` (or set MLFLOW_TRACKING_URI)"))
    return s.mlflow_uri  # type: ignore[return-value]


def _registry(s: Settings) -> Any:
    """The MLflow registry with the state database's catalogue (adapterfab/registry_index.py), which
    listings read and changes made here keep current; without a usable state database, MLflow alone."""
    from adapterfab.registry import Registry
    from adapterfab.registry_index import RegistryIndex

    uri = _need_mlflow(s)
    try:
        index = RegistryIndex(s.state_url)
    except Exception as e:  # noqa: BLE001 - the catalogue is a cache of MLflow: list from MLflow instead
        err.print(f"warning: the state database at {s.state_url} is unusable ({e}); reading MLflow alone",
                  markup=False)
        index = None
    return Registry(uri, index=index)


def _print_json(obj: object) -> None:
    """Machine-readable output: plain JSON on stdout, never through Rich (its markup would eat text such
    as "[q_proj]", its emoji codes ":x:", its wrapping long lines). Indented for a terminal, compact
    into a pipe."""
    sys.stdout.write(json.dumps(obj, indent=2 if sys.stdout.isatty() else None, default=str) + "\n")
    sys.stdout.flush()


def complete_batch_id(incomplete: str) -> list[str]:
    """Shell completion of a batch id: the newest batches of the state DB (the stdlib reader; nothing
    when it cannot be read)."""
    from adapterfab.status import read_sqlite_batches, sqlite_path

    path = sqlite_path(Settings.load().state_url)
    try:
        rows = read_sqlite_batches(path) if path is not None and path.is_file() else []
    except Exception:  # noqa: BLE001 - completion offers nothing rather than a traceback
        return []
    return [r["id"] for r in rows if r["id"].startswith(incomplete)]


def json_option(help: str = "machine-readable output: one JSON document on stdout") -> Any:  # noqa: A002
    return typer.Option(False, "--json", help=help)
