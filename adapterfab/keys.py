"""API keys. A key is ``af_<key_id>_<secret>``; only sha256(key) is stored, looked up by its key id
and compared in constant time. Keys live in the state database, so keys created before or after
``serve`` (or the dashboard) starts both work (every request reads the store).

Two kinds: a tenant key (``create``) reaches that tenant's adapters, batches and registry entries;
an operator key (``create_operator``, role ``operator``) sees every tenant on the dashboard. Serving
accepts tenant keys only: ``verify`` returns None for an operator key.

Lifecycle: a key may expire (``ttl_s``); ``revoke`` ends it (``revoke_tenant``: all of a tenant's, when
it leaves); ``rotate`` issues a new key of the same tenant or role, with the old key's lifetime unless
told otherwise, and ends the old one now or after a grace period (clients switch over meanwhile).
Servers read the store on every request, so each takes effect on running servers at once."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, or_, select, update
from sqlalchemy.orm import Session

from adapterfab.errors import ApiKeyError
from adapterfab.ids import check_id
from adapterfab.state import ApiKeyRow, StateStore

PREFIX = "af"
OPERATOR = "operator"


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who a key belongs to: one tenant, or an operator (``tenant`` None) who sees every tenant."""

    tenant: str | None

    @property
    def operator(self) -> bool:
        return self.tenant is None

    def sees(self, tenant: str) -> bool:
        return self.operator or tenant == self.tenant


_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")


def key_id_of(key_or_id: str) -> str:
    """The key id in ``af_<key_id>_<secret>``, or ``key_or_id`` itself when it is a bare key id."""
    text = key_or_id.strip()
    parts = text.split("_", 2)
    if len(parts) == 3 and parts[0] == PREFIX:
        text = parts[1]
    if not _KEY_ID_RE.fullmatch(text):
        shown = parts[1] if len(parts) == 3 else text[:20]  # never a key's secret part
        raise ApiKeyError(f"{shown[:20]!r} is neither a key id (16 hex digits) nor an af_ key")
    return text


@dataclass(frozen=True)
class KeyInfo:
    """What ``keys list`` shows: never the key or its hash."""

    key_id: str
    tenant: str | None  # None: an operator key
    created_s: float
    expires_s: float | None
    revoked_s: float | None
    rotated_to: str | None

    def status(self, now: float) -> str:
        if self.revoked_s is not None:
            return "revoked"
        if self.expires_s is not None and self.expires_s <= now:
            return "expired"
        return "active"

    def as_dict(self, now: float) -> dict[str, Any]:
        return {"key_id": self.key_id, "tenant": self.tenant, "role": OPERATOR if self.tenant is None else "tenant",
                "created": self.created_s, "expires": self.expires_s, "revoked": self.revoked_s,
                "rotated_to": self.rotated_to, "status": self.status(now)}


def _info(row: ApiKeyRow) -> KeyInfo:
    revoked_s = (row.revoked_s or row.created_s) if row.revoked else None
    return KeyInfo(row.key_id, None if row.role == OPERATOR else row.tenant, row.created_s, row.expires_s,
                   revoked_s, row.rotated_to)


def _mint() -> tuple[str, str]:
    """A new key's id and the key itself (``af_<id>_<secret>``: 192 random bits of secret)."""
    key_id = secrets.token_hex(8)
    return key_id, f"{PREFIX}_{key_id}_{secrets.token_urlsafe(24)}"


def _check_ttl(ttl_s: float | None) -> None:
    if ttl_s is not None and not ttl_s > 0:
        raise ApiKeyError(f"a key's lifetime must be positive, not {ttl_s}")


class KeyStore:
    def __init__(self, state: StateStore, clock: Callable[[], float] = time.time):
        self.state, self.clock = state, clock

    def _new(self, tenant: str, role: str | None, ttl_s: float | None) -> str:
        _check_ttl(ttl_s)
        key_id, key = _mint()
        self.state.add_key(key_id, tenant, _hash(key), role=role,
                           expires_s=None if ttl_s is None else self.clock() + ttl_s)
        return key

    def create(self, tenant: str, ttl_s: float | None = None) -> str:
        """A new key for ``tenant``; it expires after ``ttl_s`` seconds (None: never)."""
        return self._new(check_id(tenant, "tenant"), None, ttl_s)

    def create_operator(self, ttl_s: float | None = None) -> str:
        """A key that sees every tenant's batches and adapters on the dashboard (not a serving key)."""
        return self._new("", OPERATOR, ttl_s)

    def list(self, tenant: str | None = None, operators: bool = False) -> list[KeyInfo]:
        """Every key (``tenant``: that tenant's; ``operators``: operator keys only), oldest first."""
        if tenant is not None:
            check_id(tenant, "tenant")
        return [_info(r) for r in self.state.list_keys(tenant=tenant, role=OPERATOR if operators else None)]

    def revoke(self, key_or_id: str) -> KeyInfo:
        """End a key now (a running server refuses it from its next request)."""
        row = self.state.revoke_key(key_id_of(key_or_id), self.clock())
        if row is None:
            raise ApiKeyError(f"no key {key_id_of(key_or_id)}")
        return _info(row)

    def revoke_tenant(self, tenant: str) -> list[KeyInfo]:
        """End every active key of ``tenant`` now (offboarding), in one transaction: a key that is active
        (in a rotation's grace period too) is revoked; expired or revoked ones are left as they are.
        Operator keys are never touched. Returns the keys it ended (none: an empty list)."""
        check_id(tenant, "tenant")
        now, cols = self.clock(), ApiKeyRow
        # locks before it reads (the state store's read-check-write engine: SQLite's BEGIN IMMEDIATE,
        # elsewhere FOR UPDATE): a rotation of one of these keys at the same moment is refused once this
        # commits (its key is no longer active), or made before this reads, and its new key ended too.
        # Read again until none is left: on PostgreSQL (READ COMMITTED) a rotation that commits while the
        # read waits on its old key's lock adds a key the read's snapshot did not hold; the next read does
        ended: list[ApiKeyRow] = []
        with Session(self.state._locking, expire_on_commit=False) as s, s.begin():
            while rows := list(s.scalars(
                    select(cols).where(cols.tenant == tenant, cols.role.is_(None), cols.revoked == 0,
                                       or_(cols.expires_s.is_(None), cols.expires_s > now))
                    .order_by(cols.created_s, cols.key_id).with_for_update())):
                for row in rows:
                    row.revoked, row.revoked_s = 1, now
                s.flush()
                ended += rows
            s.expunge_all()
        return [_info(r) for r in ended]

    def rotate(self, key_or_id: str, grace_s: float = 0.0, ttl_s: float | None = None) -> tuple[str, KeyInfo]:
        """A new key of the same tenant (or operator role); the old one ends now, or after ``grace_s``
        seconds while clients switch over. Returns the new key and the old key's record.

        The new key lives ``ttl_s`` seconds from now; None: as long as the old key's lifetime (its expiry
        less its creation), counted from now, so a key that expires keeps expiring once rotated (it never
        expired, before: review, 2026-12); a key that never expires gives one that never does.

        A key rotates once: ending it and storing its successor are one transaction that claims the old
        key only while it is active and not yet rotated, so a second ``rotate`` (in its grace period, or
        at the same moment from another process) is refused instead of minting another live key whose
        record the first one's ``rotated_to`` then lost (review, 2026-12)."""
        if grace_s < 0:
            raise ApiKeyError(f"the grace period must be 0 or more seconds, not {grace_s}")
        _check_ttl(ttl_s)
        key_id = key_id_of(key_or_id)
        row = self.state.key_by_id(key_id)
        if row is None:
            raise ApiKeyError(f"no key {key_id}")
        now = self.clock()
        if ttl_s is None and row.expires_s is not None:
            ttl_s = row.expires_s - row.created_s  # its lifetime (its row stamps created_s as it is written)
        new_id, key = _mint()
        cols = ApiKeyRow
        if grace_s > 0:  # it expires then, unless it would sooner
            ends: dict[str, Any] = {"expires_s": case((or_(cols.expires_s.is_(None), cols.expires_s > now + grace_s),
                                                       now + grace_s), else_=cols.expires_s)}
        else:
            ends = {"revoked": 1, "revoked_s": now}
        with Session(self.state.engine) as s, s.begin():
            # ... and only with the expiry read above, whose lifetime the new key gets (only a rotation
            # changes a key's expiry, and it claims the key)
            same_expiry = cols.expires_s.is_(None) if row.expires_s is None else cols.expires_s == row.expires_s
            claimed = s.execute(
                update(cols).where(cols.key_id == key_id, cols.revoked == 0, cols.rotated_to.is_(None),
                                   or_(cols.expires_s.is_(None), cols.expires_s > now), same_expiry)
                .values(rotated_to=new_id, **ends)).rowcount
            if claimed == 1:  # created and expires from one clock reading: the lifetime it passes on
                s.add(ApiKeyRow(key_id=new_id, tenant=row.tenant, sha256=_hash(key), role=row.role, created_s=now,
                                expires_s=None if ttl_s is None else now + ttl_s))
        old = self.state.key_by_id(key_id)
        assert old is not None
        if claimed != 1:
            if old.rotated_to is not None and not old.revoked and (old.expires_s is None or old.expires_s > now):
                raise ApiKeyError(f"key {key_id} was already rotated to {old.rotated_to} (it ends at "
                                  f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(old.expires_s or now))}); "
                                  f"rotate {old.rotated_to} instead, or revoke {key_id} to end it now")
            raise ApiKeyError(f"key {key_id} has already ended; create a new one")
        return key, _info(old)

    def _row(self, key: str | None) -> ApiKeyRow | None:
        if not key or len(key) > 200:
            return None
        parts = key.split("_", 2)
        if len(parts) != 3 or parts[0] != PREFIX:
            return None
        row = self.state.key_by_id(parts[1])
        if row is None or row.revoked or (row.expires_s is not None and row.expires_s <= self.clock()):
            return None
        return row if hmac.compare_digest(row.sha256, _hash(key)) else None

    def verify(self, key: str | None) -> str | None:
        """The tenant owning ``key``, or None (unknown, malformed, revoked, or an operator key)."""
        row = self._row(key)
        return row.tenant if row is not None and row.role is None else None

    def identify(self, key: str | None) -> Principal | None:
        """The tenant or operator behind ``key``, or None."""
        row = self._row(key)
        if row is None:
            return None
        if row.role == OPERATOR:
            return Principal(None)
        return Principal(row.tenant) if row.role is None else None  # an unknown role grants nothing
