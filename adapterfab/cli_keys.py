"""``adapterfab keys``: API keys per tenant (serving, dashboard) and operator (dashboard): create, list,
revoke, rotate."""

from __future__ import annotations

import time

import typer
from rich.table import Table

from adapterfab.cli_common import _fail, _print_json, _settings, out
from adapterfab.errors import AdapterfabError

keys_app = typer.Typer(no_args_is_help=True, help="API keys: per tenant (serving, dashboard) and operator (dashboard).")


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str | None, what: str) -> float | None:
    """``90``, ``90s``, ``15m``, ``12h``, ``30d`` -> seconds; None stays None."""
    if text is None:
        return None
    import re

    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)", text.strip())
    if not m or float(m.group(1)) <= 0:
        _fail(AdapterfabError(f"invalid {what} {text!r}: use a positive number of seconds, or 15m, 12h, 30d"))
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


def _key_store():  # noqa: ANN202
    from adapterfab.keys import KeyStore
    from adapterfab.state import StateStore

    return KeyStore(StateStore(_settings().state_url))


_EXPIRES_HELP = "the key ends after this long (seconds, or 15m, 12h, 30d); default: never"


@keys_app.command("create")
def keys_create(tenant: str = typer.Argument(..., help="tenant id"),
                expires: str | None = typer.Option(None, "--expires", help=_EXPIRES_HELP)) -> None:
    """Create an API key for TENANT; the key is the last token printed (shown once, stored hashed)."""
    ttl = _duration(expires, "--expires")
    try:
        key = _key_store().create(tenant, ttl_s=ttl)
    except AdapterfabError as e:
        _fail(e)
    out.print(f"API key for tenant {tenant} (shown once): {key}")


@keys_app.command("create-operator")
def keys_create_operator(expires: str | None = typer.Option(None, "--expires", help=_EXPIRES_HELP)) -> None:
    """Create an operator key for the dashboard: it sees every tenant's batches and adapters (serving
    refuses it). The key is the last token printed (shown once, stored hashed)."""
    key = _key_store().create_operator(ttl_s=_duration(expires, "--expires"))
    out.print(f"operator API key (shown once): {key}")


@keys_app.command("list")
def keys_list(tenant: str | None = typer.Option(None, "--tenant", help="only this tenant's keys"),
              operators: bool = typer.Option(False, "--operators", help="only operator keys"),
              as_json: bool = typer.Option(False, "--json")) -> None:
    """Every key's id, tenant (or operator), dates and status (active, expired, revoked); never a secret."""
    now = time.time()
    try:
        keys = _key_store().list(tenant=tenant, operators=operators)
    except AdapterfabError as e:
        _fail(e)
    if as_json:
        _print_json([k.as_dict(now) for k in keys])
        return
    table = Table("key id", "tenant", "created", "expires", "status", "rotated to")
    stamp = lambda t: "-" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))  # noqa: E731
    for k in keys:
        table.add_row(k.key_id, k.tenant or "(operator)", stamp(k.created_s), stamp(k.expires_s), k.status(now),
                      k.rotated_to or "")
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key: str = typer.Argument(..., help="the key id (as `keys list` shows it) or the key")) -> None:
    """End a key now: running servers and the dashboard refuse it from their next request."""
    try:
        info = _key_store().revoke(key)
    except AdapterfabError as e:
        _fail(e)
    out.print(f"revoked key {info.key_id} ({info.tenant or 'operator'})")


@keys_app.command("rotate")
def keys_rotate(
    key: str = typer.Argument(..., help="the key id (as `keys list` shows it) or the key"),
    grace: str | None = typer.Option(
        None, "--grace", help="the old key keeps working this long (e.g. 1h); default: ends now"
    ),
    expires: str | None = typer.Option(None, "--expires", help=_EXPIRES_HELP),
) -> None:
    """A new key for the same tenant (or operator); the old one ends now or after --grace. The new key is
    the last token printed (shown once)."""
    grace_s = _duration(grace, "--grace") or 0.0
    try:
        new, old = _key_store().rotate(key, grace_s=grace_s, ttl_s=_duration(expires, "--expires"))
    except AdapterfabError as e:
        _fail(e)
    ends = "now" if not grace_s else time.strftime("at %Y-%m-%d %H:%M:%S", time.localtime(old.expires_s))
    out.print(f"key {old.key_id} ends {ends}; new key for {old.tenant or 'operator'} (shown once): {new}")
