"""API keys. A key is ``af_<key_id>_<secret>``; only sha256(key) is stored, looked up by its key id
and compared in constant time. Keys live in the state database, so keys created before or after
``serve`` (or the dashboard) starts both work (every request reads the store).

Two kinds: a tenant key (``create``) reaches that tenant's adapters, batches and registry entries;
an operator key (``create_operator``, role ``operator``) sees every tenant on the dashboard. Serving
accepts tenant keys only: ``verify`` returns None for an operator key."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

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


class KeyStore:
    def __init__(self, state: StateStore):
        self.state = state

    def _new(self, tenant: str, role: str | None) -> str:
        key_id = secrets.token_hex(8)
        key = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(24)}"
        self.state.add_key(key_id, tenant, _hash(key), role=role)
        return key

    def create(self, tenant: str) -> str:
        return self._new(check_id(tenant, "tenant"), None)

    def create_operator(self) -> str:
        """A key that sees every tenant's batches and adapters on the dashboard (not a serving key)."""
        return self._new("", OPERATOR)

    def _row(self, key: str | None) -> ApiKeyRow | None:
        if not key or len(key) > 200:
            return None
        parts = key.split("_", 2)
        if len(parts) != 3 or parts[0] != PREFIX:
            return None
        row = self.state.key_by_id(parts[1])
        if row is None or row.revoked:
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
