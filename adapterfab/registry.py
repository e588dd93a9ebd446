"""The MLflow model registry (runs: tracking.py; the client: mlflow_client.py). Every adapter is a version
of the registered model ``AdapterId.registry_name`` (``af.<tenant>.<persona>``) whose source is the
run's ``adapter`` artifact folder, with lineage tags (``adapterfab.*``) and aliases ``candidate`` /
``production``. MLflow 3 refuses ``register_model`` for a plain artifact folder, so versions are made
with ``create_model_version(source=<run artifact uri>/adapter)``."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterfab import faults
from adapterfab.errors import AdapterNotFound, RegistryError
from adapterfab.ids import CANDIDATE, PRODUCTION, AdapterId, check_id
from adapterfab.mlflow_client import TAG, client, import_mlflow, mlflow_errors, not_found, stores, transient, with_retry
from adapterfab.registry_history import ProductionHistory

log = logging.getLogger("adapterfab.registry")

# The lineage a tenant sees (HTTP registry routes, the dashboard): an allowlist, so a tag added later
# stays internal until named here. Internal: where files are (artifact_uri/root, basis_uri, dataset,
# base_model: buckets and paths), where it trained (node_id, trainer), whom it trained with (fused_with:
# other tenants' adapter ids), job ids (they name the batch's other tenants on failure) and requests.
TENANT_LINEAGE = frozenset(
    {
        "tenant",
        "persona",
        "method",
        "rank",
        "base_fingerprint",
        "dataset_sha256",
        "dataset_rows",
        "dataset_bad_rows",
        "train_rows",
        "eval_rows",
        "eval_sha256",
        "batch_id",
        "code_version",
        "job_fingerprint",
        "basis_id",
        "training",
        "workers",
        "zero_stage",
        "lora_xs.needs_basis",
    }
)
TENANT_LINEAGE_PREFIXES = ("method.", "metric.", "promotion.", "quantization.")


def tenant_visible(key: str) -> bool:
    """Whether a lineage tag (without the ``adapterfab.`` prefix) may be shown to the adapter's tenant."""
    return key in TENANT_LINEAGE or key.startswith(TENANT_LINEAGE_PREFIXES)


@dataclass(frozen=True)
class AdapterVersion:
    id: AdapterId  # with version set
    source: str
    run_id: str | None
    tags: dict[str, str]
    aliases: tuple[str, ...]
    created_s: float

    @property
    def artifact_uri(self) -> str:
        """Where serving loads the files from: our artifact store when recorded, else MLflow's copy."""
        return self.tags.get(TAG + "artifact_uri") or self.source

    @property
    def metrics(self) -> dict[str, float]:
        """The metrics recorded at registration (``adapterfab.metric.<name>`` tags)."""
        prefix = TAG + "metric."
        return {k.removeprefix(prefix): float(v) for k, v in self.tags.items() if k.startswith(prefix)}

    def to_dict(self) -> dict[str, Any]:
        from adapterfab.registry_view import version_dict

        return version_dict(self.id.tenant, self.id.persona, self.id.version, list(self.aliases), self.source,
                            self.run_id, self.created_s, self.tags)

    def public_dict(self) -> dict[str, Any]:
        """What a tenant sees over HTTP: lineage, metrics and the promotion decision (``tenant_visible``
        tags only: bucket names, paths, nodes, run ids and other tenants' names stay internal)."""
        tags = {k.removeprefix(TAG): v for k, v in self.tags.items()
                if k.startswith(TAG) and tenant_visible(k.removeprefix(TAG))}
        return {"id": str(self.id), "persona": self.id.persona, "version": self.id.version,
                "aliases": list(self.aliases), "created": int(self.created_s), "lineage": tags}


@dataclass
class RegisteredAdapter:
    id: AdapterId
    aliases: dict[str, int] = field(default_factory=dict)
    versions: list[AdapterVersion] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from adapterfab.registry_view import adapter_dict

        return adapter_dict(self.id.tenant, self.id.persona, self.aliases, [v.to_dict() for v in self.versions])

    def public_dict(self) -> dict[str, Any]:
        return {"id": str(self.id), "persona": self.id.persona, "aliases": self.aliases,
                "versions": [v.public_dict() for v in self.versions]}

    def resolve(self, aid: AdapterId) -> AdapterVersion:
        """``aid`` among these versions, by ``Registry.resolve``'s rules (a bare id: production, else
        candidate, else the newest)."""
        if aid.version is not None:
            number: int | None = aid.version
        elif aid.alias is not None:
            number = self.aliases.get(aid.alias)
        else:
            number = self.aliases.get(PRODUCTION, self.aliases.get(CANDIDATE))
            if number is None and self.versions:
                number = self.versions[-1].id.version
        for v in self.versions:
            if v.id.version == number:
                return v
        raise AdapterNotFound(f"no adapter {aid}")


class Registry(ProductionHistory):
    """The model registry. ``retry_s`` > 0: every call rides out an MLflow outage of up to that long.
    ``index``: the catalogue in the state database (adapterfab/registry_index.py) that this registry
    keeps up to date with its own changes and that ``list`` reads once it is complete. Production history,
    rollback and the repair of interrupted registrations: ``ProductionHistory`` (adapterfab/registry_history.py)."""

    def __init__(self, uri: str, retry_s: float = 0.0, index: Any = None):
        self.uri, self.retry_s, self.index = uri, retry_s, index
        if index is not None and index.source is None:
            index.source = uri  # the catalogue is of this server's registry
        self._client: Any = None  # made on first use: a listing from the catalogue never imports mlflow
        self._client_lock = threading.Lock()
        self._models: set[str] = set()  # registered models this client made or saw (never deleted here)

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._client_lock:  # one client for the threads of a serving replica
                if self._client is None:
                    self._client = client(self.uri, self.retry_s)
        return self._client

    def _catalogue(self, what: str, fn: Callable[[Any], None]) -> None:
        """A change to the catalogue after MLflow took it; if the catalogue cannot take it, it is marked
        incomplete (the next full listing rebuilds it from MLflow) and the caller's change stands."""
        if self.index is None:
            return
        try:
            fn(self.index)
        except Exception as e:  # noqa: BLE001 - the catalogue is a cache of MLflow, never the record
            log.warning("the registry catalogue missed %s (%s); the next listing rebuilds it from MLflow", what, e)
            self._invalidate()

    def _invalidate(self) -> None:
        """Mark the catalogue incomplete: the next full listing rebuilds it from MLflow."""
        if self.index is None:
            return
        try:
            self.index.invalidate()
        except Exception:  # noqa: BLE001
            log.exception("cannot mark the registry catalogue incomplete")

    @contextlib.contextmanager
    def _moved(self, what: Any) -> Iterator[None]:
        """The rest of a change MLflow already took part of (a version made, an alias moved): should it
        fail, the catalogue is marked incomplete before the error goes on, as it may now say complete
        without that part (serving and ``registry ls`` read it)."""
        try:
            yield
        except BaseException:
            log.warning("%s: a registry change failed half made; the catalogue is rebuilt at the next listing",
                        what)
            self._invalidate()
            raise

    def _catalogue_adapter(self, aid: AdapterId) -> None:
        """Re-read one adapter (its aliases and versions) from MLflow into the catalogue."""
        if self.index is None:
            return
        aid, at = aid.unversioned(), time.time()  # a version catalogued meanwhile is newer: put keeps it

        def refresh(index: Any) -> None:
            aliases = self._aliases(aid)
            index.put([RegisteredAdapter(aid, aliases, self.versions(aid, aliases))], at)

        self._catalogue(str(aid), refresh)

    def _version(self, mv: Any) -> AdapterVersion:
        base = AdapterId.from_registry_name(mv.name)
        return AdapterVersion(
            id=base.with_version(int(mv.version)), source=mv.source, run_id=mv.run_id or None,
            tags=dict(mv.tags or {}), aliases=tuple(getattr(mv, "aliases", []) or []),
            created_s=(mv.creation_timestamp or 0) / 1000,
        )

    def register(self, aid: AdapterId, source: str, run_id: str | None, tags: dict[str, Any],
                 aliases: tuple[str, ...] = (CANDIDATE,), fetch: bool = True, catalogue: bool = True
                 ) -> AdapterVersion:
        """A new version with ``tags`` and ``aliases``. ``fetch=False``: the returned version is built
        from what was sent (one MLflow call less); its creation time is then this call's.
        ``catalogue=False``: the caller adds it to the catalogue."""
        name = aid.registry_name
        self._ensure_model(aid)
        token = uuid.uuid4().hex  # a retried create finds the version an earlier attempt made
        vtags = {TAG + k if not k.startswith(TAG) else k: str(v) for k, v in tags.items()}
        vtags[TAG + "request"] = token
        raw = getattr(self.client, "client", self.client)

        def made() -> list[Any]:  # every page: a duplicate past the first would stay
            return _search_versions(raw, f"name='{name}' and tags.`{TAG}request` = '{token}'")

        def created() -> Any:
            mvs = made()
            return min(mvs, key=lambda m: int(m.version)) if mvs else None

        from mlflow.entities.model_registry import ModelVersionTag

        _, store = stores(self.client)
        mv = with_retry(lambda: store.create_model_version(name, source, run_id,
                                                           tags=[ModelVersionTag(k, v) for k, v in vtags.items()]),
                        "create_model_version", self.retry_s, before_retry=created)
        with self._moved(aid.with_version(int(mv.version))):
            mv = self._one_version(name, mv, with_retry(made, "search_model_versions", self.retry_s))
            for alias in aliases:
                self._alias(name, alias, mv.version)
            if fetch:
                v = self.get(aid.with_version(int(mv.version)))
            else:
                made_s = (getattr(mv, "creation_timestamp", None) or time.time() * 1000) / 1000
                v = AdapterVersion(aid.unversioned().with_version(int(mv.version)), source, run_id, vtags,
                                   tuple(aliases), made_s)
        if catalogue:
            self._catalogue(str(v.id), lambda index: index.add_version(v))
        return v

    def _one_version(self, name: str, mv: Any, made: list[Any]) -> Any:
        """The one version a create made (``made``: every version with its request token). MLflow's HTTP
        session re-sends a create whose answer was lost (a dropped connection, a gateway's 5xx) beneath
        ``with_retry``'s lookup, and the server made a version per send: the lowest stays, the others
        are deleted before any alias or the catalogue names them."""
        if len(made) <= 1:
            return mv
        keep, *extra = sorted(made, key=lambda m: int(m.version))
        _, store = stores(self.client)
        for m in extra:
            log.warning("%s: version %s is a re-sent create's duplicate of version %s; deleting it",
                        name, m.version, keep.version)
            try:
                with_retry(lambda m=m: store.delete_model_version(name, str(m.version)), "delete_model_version",
                           self.retry_s)
            except mlflow_errors() as e:
                if not not_found(e):  # a re-sent delete: gone already
                    raise
        return keep

    def get(self, aid: AdapterId) -> AdapterVersion:
        """The version ``aid`` names exactly (version or alias)."""
        MlflowException = mlflow_errors()
        try:
            if aid.version is not None:
                mv = self.client.get_model_version(aid.registry_name, str(aid.version))
            elif aid.alias is not None:
                mv = self.client.get_model_version_by_alias(aid.registry_name, aid.alias)
            else:
                return self.resolve(aid)
        except MlflowException as e:
            if not_found(e):
                raise AdapterNotFound(f"no adapter {aid}") from None
            raise RegistryError(f"the MLflow registry at {self.uri} failed looking up {aid}: {e}") from e
        except Exception as e:  # noqa: BLE001 - connection errors: the registry is unreachable
            raise RegistryError(f"the MLflow registry at {self.uri} is unreachable: {e}") from e
        return self._version(mv)

    def resolve(self, aid: AdapterId) -> AdapterVersion:
        """Like ``get``; a bare ``tenant/persona`` means production, else candidate, else the newest."""
        if aid.version is not None or aid.alias is not None:
            return self.get(aid)
        for alias in (PRODUCTION, CANDIDATE):
            try:
                return self.get(aid.with_alias(alias))
            except AdapterNotFound:
                pass
        versions = self.versions(aid)
        if not versions:
            raise AdapterNotFound(f"no adapter {aid}")
        return versions[-1]

    def resolve_from_catalogue(self, aid: AdapterId) -> AdapterVersion:
        """``resolve`` from the registry's catalogue in the state database: what serving answers with
        while MLflow is unreachable (the catalogue holds every change adapterfab made). RegistryError when
        there is no complete catalogue to answer from."""
        try:
            if self.index is None or not self.index.complete():
                raise RegistryError("no complete registry catalogue to resolve from")
            ra = self.index.adapter(aid)
        except RegistryError:
            raise
        except Exception as e:  # noqa: BLE001 - the state database failing too
            raise RegistryError(f"the registry catalogue cannot be read: {e}") from e
        if ra is None:
            raise AdapterNotFound(f"no adapter {aid}")
        return ra.resolve(aid)

    def _aliases(self, aid: AdapterId) -> dict[str, int]:
        try:
            rm = self.client.get_registered_model(aid.registry_name)
        except mlflow_errors() as e:
            if transient(e):
                raise RegistryError(f"the MLflow registry at {self.uri} is unreachable: {e}") from e
            return {}
        return {a: int(v) for a, v in (getattr(rm, "aliases", None) or {}).items()}

    def versions(self, aid: AdapterId, aliases: dict[str, int] | None = None) -> list[AdapterVersion]:
        """Every version of ``aid``, oldest first: a search (every page of it) plus one lookup for the
        aliases (search results carry tags but no aliases)."""
        MlflowException = mlflow_errors()
        try:
            mvs = _search_versions(self.client, f"name='{aid.registry_name}'")
        except MlflowException as e:
            if transient(e):
                raise RegistryError(f"the MLflow registry at {self.uri} is unreachable: {e}") from e
            return []
        if aliases is None:
            aliases = self._aliases(aid)
        by_version: dict[int, list[str]] = {}
        for a, v in aliases.items():
            by_version.setdefault(v, []).append(a)
        out = [AdapterVersion(id=aid.unversioned().with_version(int(mv.version)), source=mv.source,
                              run_id=mv.run_id or None, tags=dict(mv.tags or {}),
                              aliases=tuple(sorted(by_version.get(int(mv.version), []))),
                              created_s=(mv.creation_timestamp or 0) / 1000) for mv in mvs]
        return sorted(out, key=lambda v: v.id.version or 0)

    def find(self, aid: AdapterId, tag: str, value: str) -> AdapterVersion | None:
        """The newest version of ``aid`` whose lineage tag ``tag`` equals ``value`` (idempotent resubmit)."""
        key = tag if tag.startswith(TAG) else TAG + tag
        try:
            # the newest match by itself, asked for explicitly (MLflow's default order, newest first within
            # a model, is the server's choice, not a promise)
            mvs = self.client.search_model_versions(f"name='{aid.registry_name}' and tags.`{key}` = '{value}'",
                                                    max_results=1, order_by=["version_number DESC"])
        except mlflow_errors() as e:
            if transient(e):  # an outage is not "no such version": that would train or register twice
                raise RegistryError(f"the MLflow registry at {self.uri} is unreachable: {e}") from e
            return None
        if not mvs:
            return None
        newest = max(int(mv.version) for mv in mvs)
        return self.get(aid.unversioned().with_version(newest))

    def set_alias(self, aid: AdapterId, alias: str, version: int) -> AdapterVersion:
        self.get(aid.unversioned().with_version(version))  # exists?
        had_production = alias == PRODUCTION and PRODUCTION in self._aliases(aid)
        self.client.set_registered_model_alias(aid.registry_name, alias, str(version))
        with self._moved(aid):
            if alias == PRODUCTION:
                self._record_production(aid, version, had_production)
        self._catalogue_adapter(aid)
        return self.get(aid.unversioned().with_version(version))

    def set_version_tags(self, v: AdapterVersion, tags: dict[str, Any], catalogue: bool = True) -> None:
        for k, val in tags.items():
            self.client.set_model_version_tag(v.id.registry_name, str(v.id.version),
                                              k if k.startswith(TAG) else TAG + k, str(val))
        if catalogue:
            self._catalogue_adapter(v.id)

    def _alias(self, name: str, alias: str, version: Any) -> None:
        """Point ``alias`` at ``version`` of a model this factory registered (never a prompt)."""
        _, store = stores(self.client)
        with_retry(lambda: store.set_registered_model_alias(name, alias, str(version)), "set_alias", self.retry_s)

    def _ensure_model(self, aid: AdapterId) -> bool:
        """The registered model of ``aid`` exists afterwards; True when this call created it (it then has
        no versions or aliases yet)."""
        name = aid.registry_name
        if name in self._models:
            return False
        try:
            self.client.create_registered_model(name, tags={TAG + "tenant": aid.tenant, TAG + "persona": aid.persona})
            created = True
        except mlflow_errors() as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code if hasattr(e, "error_code") else e):
                raise RegistryError(f"cannot create registered model {name}: {e}") from e
            created = False
        self._models.add(name)
        return created

    def register_gated(self, aid: AdapterId, source: str, run_id: str | None, tags: dict[str, Any],
                       decide: Callable[[AdapterVersion | None], Any] | None) -> tuple[AdapterVersion, Any]:
        """``register`` with the promotion gate decided first, against the current production version
        (``decide(production) -> Decision``, None: no gate): the decision's tags go into the version as
        it is made and ``production`` moves to it when promoted. A model this call creates has no
        production version to read. The history is written only once ``production`` moved (written
        before, a failed registration left a version in it that never was production). Returns (the
        version, the decision or None)."""
        new_model = self._ensure_model(aid)
        prod = self.production(aid) if decide is not None and not new_model else None
        decision = decide(prod) if decide is not None else None
        if decision is not None:
            tags = {**tags, **decision.tags()}
        v = self.register(aid, source, run_id, tags, fetch=False, catalogue=False)
        faults.reached("REGISTERED")
        if decision is not None and decision.promoted:
            with self._moved(v.id):  # made, with candidate: not yet in the catalogue
                self._alias(aid.registry_name, PRODUCTION, v.id.version)
                self._record_production(aid, v.id.version, prod is not None)
            v = AdapterVersion(v.id, v.source, v.run_id, v.tags, (*v.aliases, PRODUCTION), v.created_s)
        self._catalogue(str(v.id), lambda index: index.add_version(v))
        return v, decision

    def promote(self, v: AdapterVersion, decision: Any) -> AdapterVersion:
        """Record ``decision`` (a promotion.Decision) on ``v``; move production to it if promoted."""
        self.set_version_tags(v, decision.tags(), catalogue=not decision.promoted)
        if decision.promoted:
            with self._moved(v.id):  # the decision's tags are in MLflow, not yet in the catalogue
                return self.set_alias(v.id, PRODUCTION, v.id.version)
        return self.get(v.id)

    def list(self, tenant: str | None = None, refresh: bool = False) -> list[RegisteredAdapter]:
        """Every registered adapter (of ``tenant``) with its versions and aliases: from the catalogue
        when this registry has one and it is complete (``refresh``: from MLflow regardless), else from
        MLflow, whose full listing then rebuilds the catalogue."""
        if tenant is not None:
            check_id(tenant, "tenant")
        if self.index is not None and not refresh:
            try:
                if self.index.complete():
                    return self.index.list(tenant)
            except Exception as e:  # noqa: BLE001 - the catalogue is a cache: MLflow answers instead
                log.warning("the registry catalogue cannot be read (%s); listing from MLflow", e)
        started = time.time()
        items = self.list_from_mlflow(tenant)
        if tenant is None:
            self._catalogue("a rebuild", lambda index: index.rebuild(items, started))
        return items

    def list_from_mlflow(self, tenant: str | None = None) -> list[RegisteredAdapter]:
        """The listing as MLflow has it: the registered models and the versions are each read in pages
        (as many as there are), two searches in all for up to a thousand models and ten thousand
        versions, whatever the number of adapters. MLflow unreachable: RegistryError."""
        if tenant is not None:  # it goes into a filter string: no quotes or LIKE wildcards get there
            check_id(tenant, "tenant")
        try:
            return self._list_from_mlflow(tenant)
        except Exception as e:
            if transient(e):
                raise RegistryError(f"the MLflow registry at {self.uri} is unreachable: {e}") from e
            raise

    def _list_from_mlflow(self, tenant: str | None) -> list[RegisteredAdapter]:
        flt = f"name LIKE 'af.{tenant}.%'" if tenant else "name LIKE 'af.%'"
        adapters: dict[str, RegisteredAdapter] = {}
        # orders that registering cannot reorder (MODELS_ORDER, VERSIONS_ORDER): MLflow's pages are offsets
        # into the ordering, and its default for versions (last updated first) shifted them, listing a
        # version twice (which failed the catalogue's rebuild) or leaving one out (2026-12-07)
        for rm in _pages(lambda token: self.client.search_registered_models(
                filter_string=flt, max_results=MODELS_PAGE, page_token=token, order_by=MODELS_ORDER)):
            try:
                aid = AdapterId.from_registry_name(rm.name)
            except Exception:  # noqa: BLE001 - not ours
                continue
            if tenant and aid.tenant != tenant:  # LIKE's "_" matches any character
                continue
            adapters[rm.name] = RegisteredAdapter(
                aid, {a: int(v) for a, v in (getattr(rm, "aliases", None) or {}).items()}
            )
        seen: set[tuple[str, int]] = set()
        for mv in _pages(lambda token: self.client.search_model_versions(
                filter_string=flt, max_results=VERSIONS_PAGE, page_token=token, order_by=VERSIONS_ORDER)):
            ra = adapters.get(mv.name)
            if ra is None or (mv.name, int(mv.version)) in seen:  # a page boundary read twice: once only
                continue
            seen.add((mv.name, int(mv.version)))
            names = tuple(sorted(a for a, v in ra.aliases.items() if v == int(mv.version)))
            ra.versions.append(AdapterVersion(id=ra.id.with_version(int(mv.version)), source=mv.source,
                                              run_id=mv.run_id or None, tags=dict(mv.tags or {}), aliases=names,
                                              created_s=(mv.creation_timestamp or 0) / 1000))
        for ra in adapters.values():
            ra.versions.sort(key=lambda v: v.id.version or 0)
        return sorted(adapters.values(), key=lambda r: r.id)

    def register_basis(self, basis_id: str, source: str, run_id: str | None, tags: dict[str, Any]) -> int:
        """A shared LoRA-XS basis as a version of ``afbasis.<basis_id>`` (one version per basis id)."""
        from adapterfab.ids import basis_registry_name

        name = basis_registry_name(basis_id)
        existing = self.basis_versions(basis_id)
        if existing:
            return existing[0]
        try:
            self.client.create_registered_model(name, tags={TAG + "kind": "lora_xs_basis"})
        except mlflow_errors():
            pass  # created concurrently or earlier
        mv = self.client.create_model_version(name, source=source, run_id=run_id,
                                              tags={TAG + k: str(v) for k, v in tags.items()})
        return int(mv.version)

    def basis_versions(self, basis_id: str) -> list[int]:
        from adapterfab.ids import basis_registry_name

        try:
            mvs = _search_versions(self.client, f"name='{basis_registry_name(basis_id)}'")
        except mlflow_errors():
            return []
        return sorted(int(mv.version) for mv in mvs)

    def download(self, v: AdapterVersion, dest: str | Path) -> Path:
        """Fetch an adapter's files to ``dest`` (checksums verified when it comes from our store)."""
        uri = v.artifact_uri
        if uri.startswith(("s3://", "/", "file://")) and v.tags.get(TAG + "artifact_uri"):
            from adapterfab.storage import open_store

            root = v.tags.get(TAG + "artifact_root") or uri
            return open_store(root).download_dir(uri, dest)
        import_mlflow()
        import mlflow.artifacts

        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest),
                                                        tracking_uri=self.uri))

MODELS_PAGE = 1000  # MLflow's most registered models per search
VERSIONS_PAGE = 10000
# models by name: MLflow's "timestamp" is the last update, which a new version moves to the end, so a
# model at a page's edge was skipped; a name never moves (a model created meanwhile is read twice at
# most, and kept once). Versions by creation, which nothing changes: a new one lands after the pages.
MODELS_ORDER = ["name ASC"]
VERSIONS_ORDER = ["creation_timestamp ASC", "name ASC", "version_number ASC"]


def _search_versions(client: Any, flt: str) -> list[Any]:
    """Every model version ``flt`` matches, read page by page: one search returns a page
    (``VERSIONS_PAGE`` at most; a server may return fewer) and a ``find``, ``versions`` or a create's
    duplicate lookup that read only the first missed the rest. In creation order, which registering
    cannot reorder; a version a page boundary gives twice is kept once."""
    seen: dict[tuple[str, int], Any] = {}
    for mv in _pages(lambda token: client.search_model_versions(
            filter_string=flt, max_results=VERSIONS_PAGE, page_token=token, order_by=VERSIONS_ORDER)):
        seen.setdefault((mv.name, int(mv.version)), mv)
    return list(seen.values())


def _pages(search: Callable[[str | None], Any]) -> Iterator[Any]:
    """Every result of a paged MLflow search (``search(page_token)``)."""
    token = None
    while True:
        page = search(token)
        yield from page
        token = getattr(page, "token", None)
        if not token:
            return

