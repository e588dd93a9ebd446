"""Per-tenant API keys. A key is ``af_<key_id>_<secret>``; only sha256(key) is stored, looked up by
its key id and compared in constant time. Keys live in the state database, so keys created before
or after ``serve`` starts both work (every request reads the store)."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from adapterfab.ids import check_id
from adapterfab.state import StateStore

PREFIX = "af"


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, state: StateStore):
        self.state = state

    def create(self, tenant: str) -> str:
        check_id(tenant, "tenant")
        key_id = secrets.token_hex(8)
        key = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(24)}"
        self.state.add_key(key_id, tenant, _hash(key))
        return key

    def verify(self, key: str | None) -> str | None:
        """The tenant owning ``key``, or None (unknown, malformed or revoked)."""
        if not key or len(key) > 200:
            return None
        parts = key.split("_", 2)
        if len(parts) != 3 or parts[0] != PREFIX:
            return None
        row = self.state.key_by_id(parts[1])
        if row is None or row.revoked:
            return None
        return row.tenant if hmac.compare_digest(row.sha256, _hash(key)) else None
