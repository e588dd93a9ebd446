"""What `adapterfab registry ls` shows, and its fast path: on a SQLite state database whose registry
catalogue (adapterfab/registry_index.py) is complete, the command is answered here with the stdlib
(no SQLAlchemy, Typer or mlflow import: those alone take ~1 s, more than reading 10,000 versions).
``AdapterVersion.to_dict`` and ``RegisteredAdapter.to_dict`` build their dicts with the functions
below, so both paths print the same thing."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

TAG = "adapterfab."


def version_dict(tenant: str, persona: str, version: int, aliases: list[str], source: str, run_id: str | None,
                 created_s: float, tags: dict[str, str]) -> dict[str, Any]:
    return {"id": f"{tenant}/{persona}@{version}", "tenant": tenant, "persona": persona, "version": version,
            "aliases": list(aliases), "source": source, "artifact_uri": tags.get(TAG + "artifact_uri") or source,
            "run_id": run_id, "created_s": created_s, "tags": tags}


def adapter_dict(tenant: str, persona: str, aliases: dict[str, int], versions: list[dict]) -> dict[str, Any]:
    return {"id": f"{tenant}/{persona}", "tenant": tenant, "persona": persona, "aliases": aliases,
            "versions": versions}


def print_adapters(items: list[dict[str, Any]], console: Any = None) -> None:
    """The listing as a table: one row per adapter."""
    from rich.markup import escape
    from rich.table import Table

    from adapterfab.status import _console

    out = console or _console()
    t = Table(title="registered adapters")
    for col in ("adapter", "versions", "aliases", "latest method", "latest eval loss"):
        t.add_column(col)
    for r in items:
        last = r["versions"][-1] if r["versions"] else None
        tags = last["tags"] if last else {}
        t.add_row(r["id"], str(len(r["versions"])), ", ".join(f"{a}=v{v}" for a, v in sorted(r["aliases"].items())),
                  escape(tags.get(TAG + "method", "")), escape(tags.get(TAG + "metric.eval_loss", "")))
    out.print(t if items else "no adapters registered yet")


def complete_key(source: str) -> str:
    """The catalogue's meta key saying it is complete as a copy of the MLflow registry at ``source``:
    a catalogue rebuilt from one server says nothing of another's (MLFLOW_TRACKING_URI changed)."""
    import hashlib

    return "complete_since@" + hashlib.sha256(server_identity(source).encode()).hexdigest()[:16]


LOOPBACK = {"localhost", "127.0.0.1", "::1", "[::1]"}


def server_identity(uri: str) -> str:
    """``uri`` as one spelling per server: no credentials, scheme and host in lower case, the default
    port written out, this machine's loopback names as one (the CLI and the orchestrator may spell the
    same local MLflow as localhost and 127.0.0.1)."""
    from urllib.parse import urlsplit

    u = urlsplit(uri.strip().rstrip("/"))
    if not u.netloc:
        return uri.strip().rstrip("/")
    host = (u.hostname or "").lower()
    host = "localhost" if host in LOOPBACK else host
    try:
        port = u.port or {"http": 80, "https": 443}.get(u.scheme.lower())
    except ValueError:
        port = None
    return f"{u.scheme.lower()}://{host}:{port}{u.path}"


def read_sqlite(path: Path, tenant: str | None = None, source: str = "") -> list[dict[str, Any]] | None:
    """The catalogue's listing (of ``tenant``) read with sqlite3, as ``RegistryIndex.list`` gives it;
    None when the catalogue is not complete for the MLflow registry at ``source`` (the full CLI then
    rebuilds it from MLflow)."""
    from adapterfab.status import _connect

    with _connect(path) as con:
        if con.execute("SELECT 1 FROM registry_index_meta WHERE key = ?", (complete_key(source),)).fetchone() is None:
            return None
        where, args = ("WHERE tenant = ?", (tenant,)) if tenant is not None else ("", ())
        models = con.execute(f"SELECT name, aliases FROM registry_models {where}", args).fetchall()
        versions = con.execute(f"SELECT name, version, source, run_id, tags, created_s FROM registry_versions {where} "
                               "ORDER BY name, version", args).fetchall()
    out: dict[str, dict[str, Any]] = {}
    for name, aliases in models:
        _, t, persona = name.split(".", 2)
        out[name] = adapter_dict(t, persona, {a: int(v) for a, v in json.loads(aliases or "{}").items()}, [])
    for name, version, source, run_id, tags, created_s in versions:
        ra = out.get(name)
        if ra is None:
            continue
        names = sorted(a for a, v in ra["aliases"].items() if v == version)
        ra["versions"].append(version_dict(ra["tenant"], ra["persona"], version, names, source, run_id, created_s,
                                           json.loads(tags or "{}")))
    return sorted(out.values(), key=lambda r: (r["tenant"], r["persona"]))


def fast_ls(argv: list[str]) -> int | None:
    """`adapterfab registry ls [--tenant T] [--json]`: the exit code, or None when this path does not
    apply (another database, an incomplete catalogue, --refresh, --help) and the full CLI must answer."""
    args = list(argv)
    tenant = None
    if "--tenant" in args:
        at = args.index("--tenant")
        if at + 1 >= len(args):
            return None
        tenant = args[at + 1]
        del args[at:at + 2]
    if not set(args) <= {"--json"}:
        return None
    from adapterfab.errors import InvalidId
    from adapterfab.ids import check_id
    from adapterfab.settings import Settings
    from adapterfab.status import sqlite_path, status_json

    if tenant is not None:
        try:
            check_id(tenant, "tenant")
        except InvalidId:
            return None  # the full CLI says what is wrong with it
    settings = Settings.load()
    path = sqlite_path(settings.state_url)
    if path is None or not path.is_file() or not settings.mlflow_uri:
        return None
    try:
        items = read_sqlite(path, tenant, settings.mlflow_uri)
    except sqlite3.Error:
        return None  # no catalogue tables yet (an older database): the full CLI makes them
    if items is None:
        return None
    if "--json" in args:
        sys.stdout.write(status_json(items) + "\n")
    else:
        print_adapters(items)
    return 0
