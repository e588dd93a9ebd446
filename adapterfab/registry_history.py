"""Production history and the repair of interrupted registrations, a part of ``Registry``
(adapterfab/registry.py): every version ``production`` pointed at, in order (the registered model's
``adapterfab.production_history`` tag), for ``rollback``; and finishing a registration whose process stopped
after MLflow made the version (``complete_registration``, ``complete_promotion``)."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from adapterfab.errors import AdapterNotFound, RegistryError
from adapterfab.ids import CANDIDATE, PRODUCTION, AdapterId
from adapterfab.mlflow_client import TAG, mlflow_errors, transient

if TYPE_CHECKING:
    from adapterfab.registry import AdapterVersion

log = logging.getLogger("adapterfab.registry")
HISTORY = TAG + "production_history"


class ProductionHistory:
    """``Registry``'s production history, rollback and repairs (a mixin: it uses the registry's client,
    lookups, alias writes and catalogue)."""

    client: Any
    uri: str

    def production_history(self, aid: AdapterId) -> list[int]:
        try:
            rm = self.client.get_registered_model(aid.registry_name)
        except mlflow_errors() as e:
            if transient(e):  # an empty history would overwrite the real one
                raise RegistryError(f"the MLflow registry at {self.uri} is unreachable: {e}") from e
            return []
        raw = (rm.tags or {}).get(HISTORY, "")
        try:
            return [int(v) for v in json.loads(raw)] if raw else []
        except (ValueError, TypeError):
            return []

    def _set_history(self, aid: AdapterId, history: list[int]) -> None:
        self.client.set_registered_model_tag(aid.registry_name, HISTORY, json.dumps(history[-200:]))

    def _record_production(self, aid: AdapterId, version: int, had_production: bool) -> None:
        """``production`` moved to ``version``: it goes at the end of the history. A model that had no
        production version starts a new history: one recorded then is stale (written by a registration
        that failed before the alias moved, as before 2026-12-07), and rollback would move production onto
        a version it never held."""
        history = self.production_history(aid) if had_production else []
        if not history or history[-1] != version:
            self._set_history(aid, [*history, version])

    def production(self, aid: AdapterId) -> AdapterVersion | None:
        try:
            return self.get(aid.unversioned().with_alias(PRODUCTION))
        except AdapterNotFound:
            return None

    def complete_registration(self, v: AdapterVersion) -> AdapterVersion:
        """Finish a registration that stopped after MLflow made ``v`` (its orchestrator died, or an outage
        outlasted the retries): ``candidate`` moves to ``v`` unless a newer version holds it, a promotion
        the gate decided is completed (``complete_promotion``), and the adapter is catalogued anew (the
        catalogue may say complete without ``v``, and serving and ``registry ls`` read it)."""
        aid = v.id.unversioned()
        with self._moved(v.id):
            if CANDIDATE not in v.aliases:
                held = self._aliases(aid).get(CANDIDATE)
                if held is None or held < v.id.version:
                    log.info("%s: its registration was interrupted before `candidate` moved; moving it", v.id)
                    self._alias(aid.registry_name, CANDIDATE, v.id.version)
                    v = _with_alias(v, CANDIDATE)
            v = self.complete_promotion(v, catalogue=False)
        self._catalogue_adapter(aid)
        return v

    def complete_promotion(self, v: AdapterVersion, catalogue: bool = True) -> AdapterVersion:
        """Finish what ``register_gated`` began when its process died between writing ``v`` and moving
        ``production``: a version the gate promoted (its ``promotion.decision`` tag) becomes production,
        at the end of the history, unless production is already on it or on a newer version (a later
        decision stands). ``catalogue=False``: the caller catalogues the adapter."""
        from adapterfab.promotion import PROMOTED

        if v.tags.get(TAG + "promotion.decision") != PROMOTED or PRODUCTION in v.aliases:
            return v
        aid = v.id.unversioned()
        current = self.production(aid)
        if current is not None and current.id.version >= v.id.version:
            return v
        log.info("%s: its promotion was interrupted; completing it", v.id)
        with self._moved(aid):
            self._alias(aid.registry_name, PRODUCTION, v.id.version)
            self._record_production(aid, v.id.version, current is not None)
        if catalogue:
            self._catalogue_adapter(aid)
        return _with_alias(v, PRODUCTION)

    def rollback(self, aid: AdapterId, reason: str = "rollback") -> tuple[int, int]:
        """Move production back to the version it pointed at before the current one.
        Returns (from_version, to_version); the rolled-back version records why."""
        aid = aid.unversioned()
        current = self.production(aid)
        if current is None:
            raise AdapterNotFound(f"{aid} has no production version to roll back")
        cur = current.id.version
        history = self.production_history(aid)
        while history and history[-1] == cur:
            history.pop()
        existing = {v.id.version for v in self.versions(aid)}
        while history and history[-1] not in existing:
            history.pop()  # deleted versions cannot come back
        if not history:
            raise RegistryError(f"{aid}@production is v{cur} and no earlier production version is recorded")
        target = history[-1]
        self.client.set_registered_model_alias(aid.registry_name, PRODUCTION, str(target))
        with self._moved(aid):
            self._set_history(aid, history)
            decided = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.set_version_tags(current, {"promotion.decision": "rolled_back", "promotion.decided_at": decided,
                                            "promotion.reason": f"{reason}: production moved back to v{target}"})
        return cur, target


def _with_alias(v: AdapterVersion, alias: str) -> AdapterVersion:
    from dataclasses import replace

    return replace(v, aliases=(*v.aliases, alias))
