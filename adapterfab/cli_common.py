"""What every ``adapterfab`` command shares: the consoles, failing with a message and an exit code, the
settings, the registry with its catalogue, JSON output."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console

from adapterfab.errors import AdapterfabError
from adapterfab.settings import Settings

out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(e: Exception, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {e}")
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
    out.print(json.dumps(obj, indent=2, default=str), markup=False)
