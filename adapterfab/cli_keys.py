"""``adapterfab keys``: API keys per tenant (serving, dashboard) and operator (dashboard): create, list,
revoke, rotate."""

from __future__ import annotations

import time
from typing import Any

import typer
from rich.table import Table

from adapterfab.cli_common import EXIT_INVALID, _fail, _print_json, _settings, json_option, out
from adapterfab.errors import AdapterfabError

keys_app = typer.Typer(no_args_is_help=True, help="API keys: per tenant (serving, dashboard) and operator (dashboard).")


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION_S = 100 * 365 * 86400  # a key's lifetime or grace: beyond it, dates no longer print


def _duration(text: str | None, what: str) -> float | None:
    """``90``, ``90s``, ``15m``, ``12h``, ``30d`` -> seconds; None stays None."""
    if text is None:
        return None
    import re

    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)", text.strip())
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"] if m else 0.0
    if not m or not 0 < seconds <= MAX_DURATION_S:
        _fail(AdapterfabError(f"invalid {what} {text[:40]!r}: use a positive number of seconds, or 15m, 12h, 30d, "
                              "at most 100 years"), EXIT_INVALID)
    return seconds


def _key_store():  # noqa: ANN202
    from adapterfab.keys import KeyStore
    from adapterfab.state import StateStore

    return KeyStore(StateStore(_settings().state_url))


_EXPIRES_HELP = "the key ends after this long (seconds, or 15m, 12h, 30d); default: never"
_QUIET_HELP = "print the key alone (for KEY=$(...))"


def _quiet() -> Any:
    return typer.Option(False, "--quiet", "-q", help=_QUIET_HELP)


def _new_key(key: str, info: Any, text: str, as_json: bool, quiet: bool, **extra: Any) -> None:
    """A key just made: its text, the key alone (--quiet), or JSON with the key and its record."""
    if as_json:
        _print_json({"key": key, **info.as_dict(time.time()), **extra})
    elif quiet:
        print(key)
    else:
        out.print(f"{text} (shown once): {key}", markup=False)


def _info(store: Any, key: str) -> Any:
    """The stored record of a key just made (never its secret)."""
    from adapterfab.keys import _info as info_of
    from adapterfab.keys import key_id_of

    return info_of(store.state.key_by_id(key_id_of(key)))


@keys_app.command("create")
def keys_create(tenant: str = typer.Argument(..., help="tenant id"),
                expires: str | None = typer.Option(None, "--expires", help=_EXPIRES_HELP),
                quiet: bool = _quiet(), as_json: bool = json_option()) -> None:
    """Create an API key for TENANT; the key is the last token printed (shown once, stored hashed)."""
    ttl = _duration(expires, "--expires")
    store = _key_store()
    try:
        key = store.create(tenant, ttl_s=ttl)
    except AdapterfabError as e:
        _fail(e)
    _new_key(key, _info(store, key), f"API key for tenant {tenant}", as_json, quiet)


@keys_app.command("create-operator")
def keys_create_operator(expires: str | None = typer.Option(None, "--expires", help=_EXPIRES_HELP),
                         quiet: bool = _quiet(), as_json: bool = json_option()) -> None:
    """Create an operator key for the dashboard: it sees every tenant's batches and adapters (serving
    refuses it). The key is the last token printed (shown once, stored hashed)."""
    store = _key_store()
    key = store.create_operator(ttl_s=_duration(expires, "--expires"))
    _new_key(key, _info(store, key), "operator API key", as_json, quiet)


@keys_app.command("list")
def keys_list(tenant: str | None = typer.Option(None, "--tenant", help="only this tenant's keys"),
              operators: bool = typer.Option(False, "--operators", help="only operator keys"),
              as_json: bool = json_option()) -> None:
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
def keys_revoke(key: str | None = typer.Argument(None, help="the key id (as `keys list` shows it) or the key"),
                tenant: str | None = typer.Option(None, "--tenant",
                                                  help="every active key of this tenant instead (offboarding)"),
                as_json: bool = json_option()) -> None:
    """End a key now, or with --tenant every active key of a tenant (one transaction): running servers and
    the dashboard refuse them from their next request."""
    if (key is None) == (tenant is None):
        _fail(AdapterfabError("name a key, or --tenant T for all of a tenant's keys, not both"
                              if key is not None else "name the key to revoke, or --tenant T for all of a "
                              "tenant's keys"), EXIT_INVALID)
    if tenant is not None:
        try:
            ended = _key_store().revoke_tenant(tenant)
        except AdapterfabError as e:
            _fail(e)
        if as_json:
            now = time.time()
            _print_json({"tenant": tenant, "revoked": len(ended), "keys": [k.as_dict(now) for k in ended]})
        else:
            out.print(f"revoked {len(ended)} active key{'' if len(ended) == 1 else 's'} of tenant {tenant}"
                      + (f": {', '.join(k.key_id for k in ended)}" if ended else ""), markup=False)
        return
    try:
        info = _key_store().revoke(key)
    except AdapterfabError as e:
        _fail(e)
    if as_json:
        _print_json(info.as_dict(time.time()))
    else:
        out.print(f"revoked key {info.key_id} ({info.tenant or 'operator'})", markup=False)


@keys_app.command("rotate")
def keys_rotate(
    key: str = typer.Argument(..., help="the key id (as `keys list` shows it) or the key"),
    grace: str | None = typer.Option(
        None, "--grace", help="the old key keeps working this long (e.g. 1h); default: ends now"
    ),
    expires: str | None = typer.Option(
        None, "--expires", help="the new key ends after this long; default: the old key's lifetime, from now"
    ),
    quiet: bool = _quiet(),
    as_json: bool = json_option(),
) -> None:
    """A new key for the same tenant (or operator); the old one ends now or after --grace. The new key
    lives as long as the old key's lifetime, from now (a key that never expires: never), unless --expires
    says otherwise. The new key is the last token printed (shown once)."""
    grace_s = _duration(grace, "--grace") or 0.0
    store = _key_store()
    try:
        new, old = store.rotate(key, grace_s=grace_s, ttl_s=_duration(expires, "--expires"))
    except AdapterfabError as e:
        _fail(e)
    ends = "now" if not grace_s else time.strftime("at %Y-%m-%d %H:%M:%S", time.localtime(old.expires_s))
    info = _info(store, new)
    lives = "never expires" if info.expires_s is None else \
        time.strftime("expires at %Y-%m-%d %H:%M:%S", time.localtime(info.expires_s))
    _new_key(new, info, f"key {old.key_id} ends {ends}; new key for {old.tenant or 'operator'} ({lives})",
             as_json, quiet, replaces=old.as_dict(time.time()))
