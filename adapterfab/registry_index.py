"""The registry's catalogue in the state database: `registry ls` over every tenant reads two tables
instead of paging MLflow's REST search, which costs ~8 ms a version on the local server (10,000
versions: over a minute) because every version's tags travel as JSON through protobuf both ways.

MLflow stays the registry of record: serving resolves aliases there, and here only while MLflow is
unreachable (``Registry.resolve_from_catalogue``); `registry ls`, the
dashboard's registry pages and the server's listings (`/v1/models`, `/v1/registry`) read the catalogue
(a serving ingress completes an incomplete one in the background). The catalogue is
written by ``Registry`` after each change adapterfab makes (a version registered, an alias moved,
tags set) and rebuilt from MLflow whole whenever it is not known to be complete: on first use, after
a write to it failed, and on ``registry ls --refresh`` (for changes made in MLflow itself, e.g. its
UI). A rebuild never undoes a change the catalogue took after the rebuild began."""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import delete, select

from adapterfab.ids import AdapterId
from adapterfab.registry_view import complete_key
from adapterfab.state import RegistryIndexMetaRow, RegistryModelRow, RegistryVersionRow, StateStore

log = logging.getLogger("adapterfab.registry")
COMPLETE = "complete_since"  # meta keys (one per MLflow server, registry_view.complete_key): when the last
# rebuild from that server began; absent: rebuild first


class RegistryIndex:
    """``source``: the MLflow registry this is a catalogue of (its tracking URI; ``Registry`` sets it).
    Complete means complete for that server (``registry_view.server_identity``: one spelling per server):
    pointed at another, the catalogue is rebuilt from it, and a write from another server's registry
    marks it incomplete."""

    def __init__(self, state: str | StateStore, source: str | None = None):
        self.engine = (StateStore(state) if isinstance(state, str) else state).engine
        self.source = source

    def _key(self) -> str:
        return complete_key(self.source or "")

    def complete(self) -> bool:
        """Complete for this index's server; an index bound to none (a bench or tool reading the state
        database) asks whether it is complete for any."""
        mine = RegistryIndexMetaRow.key == self._key() if self.source is not None else \
            RegistryIndexMetaRow.key.like(COMPLETE + "%")
        with self.engine.connect() as c:
            return c.execute(select(RegistryIndexMetaRow.value).where(mine)).first() is not None

    def _foreign(self, c: Any) -> bool:
        """Whether the catalogue is complete for another MLflow server than this one's (never, for an
        index bound to none)."""
        if self.source is None:
            return False
        keys = {k for (k,) in c.execute(select(RegistryIndexMetaRow.key).where(
            RegistryIndexMetaRow.key.like(COMPLETE + "%")))}
        return bool(keys) and self._key() not in keys

    def _claim(self, c: Any) -> None:
        """Before a write from this server's registry: a catalogue complete for another server is
        marked incomplete (the next full listing rebuilds it), so a reader never trusts a catalogue
        that missed this write."""
        if self._foreign(c):
            c.execute(delete(RegistryIndexMetaRow).where(RegistryIndexMetaRow.key.like(COMPLETE + "%")))

    def invalidate(self) -> None:
        """The catalogue may miss a change: the next full listing rebuilds it from MLflow."""
        with self.engine.begin() as c:
            c.execute(delete(RegistryIndexMetaRow).where(RegistryIndexMetaRow.key.like(COMPLETE + "%")))

    def put(self, adapters: list[Any], at: float | None = None) -> None:
        """Whole adapters (``RegisteredAdapter``: aliases and every version) as MLflow had them at
        time ``at`` (default now): an adapter the catalogue changed after ``at`` is left as it is."""
        at = time.time() if at is None else at
        with self.engine.begin() as c:
            self._claim(c)
            for ra in adapters:
                name = ra.id.registry_name
                newer = c.execute(select(RegistryModelRow.indexed_at).where(RegistryModelRow.name == name)).scalar()
                if newer is not None and newer > at:
                    continue
                c.execute(delete(RegistryModelRow).where(RegistryModelRow.name == name))
                c.execute(delete(RegistryVersionRow).where(RegistryVersionRow.name == name))
                c.execute(RegistryModelRow.__table__.insert().values(
                    name=name, tenant=ra.id.tenant, aliases=dict(ra.aliases), indexed_at=max(at, newer or 0)))
                if ra.versions:
                    c.execute(RegistryVersionRow.__table__.insert(), [_version_row(v) for v in ra.versions])

    def add_version(self, v: Any) -> None:
        """One version adapterfab just registered (``AdapterVersion``); the aliases it holds move to it."""
        name = v.id.registry_name
        with self.engine.begin() as c:
            self._claim(c)
            aliases = c.execute(select(RegistryModelRow.aliases).where(RegistryModelRow.name == name)).scalar()
            aliases = {**(aliases or {}), **{a: int(v.id.version) for a in v.aliases}}
            c.execute(delete(RegistryModelRow).where(RegistryModelRow.name == name))
            c.execute(RegistryModelRow.__table__.insert().values(name=name, tenant=v.id.tenant, aliases=aliases,
                                                                 indexed_at=time.time()))
            c.execute(delete(RegistryVersionRow).where(RegistryVersionRow.name == name,
                                                       RegistryVersionRow.version == int(v.id.version)))
            c.execute(RegistryVersionRow.__table__.insert().values(**_version_row(v)))

    def rebuild(self, adapters: list[Any], started: float) -> None:
        """Everything MLflow listed in a search that began at ``started``: adapters it no longer has are
        dropped (unless indexed after ``started``), the rest replaced; then the catalogue is complete."""
        names = {ra.id.registry_name for ra in adapters}
        with self.engine.begin() as c:
            foreign = self._foreign(c)  # a catalogue of another server: none of it stays
            if foreign:
                c.execute(delete(RegistryIndexMetaRow).where(RegistryIndexMetaRow.key.like(COMPLETE + "%")))
            stale = [n for n, at in c.execute(select(RegistryModelRow.name, RegistryModelRow.indexed_at))
                     if n not in names and (foreign or at <= started)]
            for n in stale:
                c.execute(delete(RegistryModelRow).where(RegistryModelRow.name == n))
                c.execute(delete(RegistryVersionRow).where(RegistryVersionRow.name == n))
        self.put(adapters, started)
        with self.engine.begin() as c:
            c.execute(delete(RegistryIndexMetaRow).where(RegistryIndexMetaRow.key.like(COMPLETE + "%")))
            c.execute(RegistryIndexMetaRow.__table__.insert().values(key=self._key(), value=started))

    def adapter(self, aid: AdapterId) -> Any:
        """One catalogued adapter (``RegisteredAdapter``, every version), or None."""
        found = self.list(name=aid.registry_name)
        return found[0] if found else None

    def list(self, tenant: str | None = None, name: str | None = None) -> list[Any]:
        """Every catalogued adapter (of ``tenant``; or the one registered as ``name``) as ``Registry.list``
        returns it."""
        from adapterfab.registry import AdapterVersion, RegisteredAdapter

        m, v = RegistryModelRow, RegistryVersionRow
        models, versions = select(m.name, m.aliases), select(v.name, v.version, v.source, v.run_id, v.tags, v.created_s)
        if tenant is not None:
            models, versions = models.where(m.tenant == tenant), versions.where(v.tenant == tenant)
        if name is not None:
            models, versions = models.where(m.name == name), versions.where(v.name == name)
        with self.engine.connect() as c:
            out = {name: RegisteredAdapter(AdapterId.from_registry_name(name), {a: int(n) for a, n in aliases.items()})
                   for name, aliases in c.execute(models)}
            rows = c.execute(versions.order_by(v.name, v.version)).all()
        for name, version, source, run_id, tags, created_s in rows:
            ra = out.get(name)
            if ra is None:
                continue
            names = tuple(sorted(a for a, n in ra.aliases.items() if n == version))
            ra.versions.append(
                AdapterVersion(ra.id.with_version(version), source, run_id, tags or {}, names, created_s)
            )
        return sorted(out.values(), key=lambda r: r.id)


def _version_row(v: Any) -> dict[str, Any]:
    return {"name": v.id.registry_name, "version": int(v.id.version), "tenant": v.id.tenant, "source": v.source,
            "run_id": v.run_id, "tags": dict(v.tags), "created_s": float(v.created_s or 0.0)}
