"""MLflow: run tracking and the model registry. The only module that imports mlflow.

A batch is a run in the operators' experiment ``adapterfab``; each job is a child run (tag
``mlflow.parentRunId``) in its tenant's own experiment ``adapterfab/tenant/<tenant>`` (tagged
``adapterfab.tenant``), so one tenant's runs, params, metrics and artifacts never share an experiment
with another's and MLflow's per-experiment permissions can be granted per tenant. Every adapter is a version
of the registered model ``AdapterId.registry_name`` (``af.<tenant>.<persona>``) whose source is the
run's ``adapter`` artifact folder, with lineage tags (``adapterfab.*``) and aliases ``candidate`` /
``production``. MLflow 3 refuses ``register_model`` for a plain artifact folder, so versions are made
with ``create_model_version(source=<run artifact uri>/adapter)``."""

from __future__ import annotations

import json
import logging
import os
import random
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

log = logging.getLogger("adapterfab.registry")
EXPERIMENT = "adapterfab"
TENANT_EXPERIMENT_PREFIX = EXPERIMENT + "/tenant/"
TAG = "adapterfab."
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
# How long the factory (orchestrator, training workers) rides out an MLflow outage before a job fails.
# Interactive callers (CLI, serving) keep MLflow's own short retries (retry_s=0).
MLFLOW_RETRY_ENV = "ADAPTERFAB_MLFLOW_RETRY_S"
DEFAULT_FACTORY_RETRY_S = 1800.0


def tenant_experiment(tenant: str) -> str:
    """The MLflow experiment that holds one tenant's job runs and nobody else's."""
    return TENANT_EXPERIMENT_PREFIX + check_id(tenant)


def factory_retry_s() -> float:
    try:
        return max(0.0, float(os.environ.get(MLFLOW_RETRY_ENV, DEFAULT_FACTORY_RETRY_S)))
    except ValueError:
        return DEFAULT_FACTORY_RETRY_S


def transient(e: BaseException) -> bool:
    """An error that says the MLflow server is unreachable or briefly failing (connection refused or
    reset, timeout, 5xx), not that the request was wrong: worth retrying."""
    import requests

    if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                      requests.exceptions.RetryError, ConnectionError, TimeoutError)):
        return True
    code = getattr(e, "error_code", "") or ""
    if code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
        return True
    msg = str(e)
    return any(s in msg for s in ("Max retries exceeded", "Connection refused", "Connection aborted",
                                  "RemoteDisconnected", "ConnectionResetError", "failed to return code 200",
                                  "too many 50", "Bad Gateway", "Service Unavailable", "Gateway Timeout",
                                  "NewConnectionError", "ReadTimeout", "ConnectTimeout"))


def with_retry(fn: Callable[[], Any], what: str, retry_s: float,
               before_retry: Callable[[], Any] | None = None) -> Any:
    """``fn()``, retried with exponential backoff and jitter while MLflow is unreachable, for up to
    ``retry_s`` seconds. ``before_retry()`` (for a call that creates something) may return the thing a
    lost-response attempt already created; it is returned instead of creating it twice."""
    deadline = time.monotonic() + retry_s
    delay, failures = 0.5, 0
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - sorted below
            if retry_s <= 0 or not transient(e) or time.monotonic() >= deadline:
                raise
            failures += 1
            log.warning("MLflow unreachable (%s, attempt %d); retrying %s for up to %.0fs more", type(e).__name__,
                        failures, what, deadline - time.monotonic())
            time.sleep(min(delay * (0.5 + random.random()), max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 10.0)
        if before_retry is not None:
            try:
                found = before_retry()
            except Exception as e:  # noqa: BLE001
                if not transient(e):
                    raise
                found = None
            if found is not None:
                return found


class RetryingClient:
    """An MlflowClient whose every call is retried through MLflow outages (``with_retry``)."""

    def __init__(self, client: Any, retry_s: float):
        self._client, self.retry_s = client, retry_s

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr) or self.retry_s <= 0:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return with_retry(lambda: attr(*args, **kwargs), name, self.retry_s)

        return call


_MLFLOW_IMPORT = threading.Lock()


def _import_mlflow() -> None:
    """Import mlflow once, under a lock. Its package imports are circular: two threads importing different
    parts of it at once (a serving replica resolving concurrent requests while its catalogue thread lists)
    see a partially initialised module, fail with ImportError, and leave it broken for the process."""
    with _MLFLOW_IMPORT:
        import mlflow  # noqa: F401
        import mlflow.artifacts  # noqa: F401
        import mlflow.entities  # noqa: F401
        import mlflow.exceptions  # noqa: F401
        import mlflow.tracking  # noqa: F401


def _client(uri: str, retry_s: float = 0.0):  # noqa: ANN202
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    _import_mlflow()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return RetryingClient(client, retry_s) if retry_s > 0 else client


def _stores(client: Any) -> tuple[Any, Any]:
    """The tracking and registry stores behind an MlflowClient (or its retrying wrapper). The client's
    own methods add round trips a factory pays per job: ``set_terminated`` fetches the run to print its
    URL, ``set_registered_model_alias`` fetches the model to refuse prompts, and every first artifact
    upload of a run fetches the run for its artifact root. (MLflow's internal layout, pinned in
    requirements.lock; tests run these paths against a real server.)"""
    raw = getattr(client, "_client", client)
    return raw._tracking_client.store, raw._get_registry_client().store


def _mlflow_errors():  # noqa: ANN202
    _import_mlflow()
    from mlflow.exceptions import MlflowException

    return MlflowException


def _not_found(e: Exception) -> bool:
    code = getattr(e, "error_code", "") or ""
    return code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") or "not found" in str(e).lower()


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


class Tracking:
    """Run tracking through MlflowClient (no global active run, so threads and workers are safe).
    ``retry_s`` > 0: every call rides out an MLflow outage of up to that long (the factory's setting)."""

    def __init__(self, uri: str, retry_s: float = 0.0):
        self.uri, self.retry_s = uri, retry_s
        self.client = _client(uri, retry_s)
        self._experiments: dict[str, str] = {}  # name -> id (experiments are never renamed here)
        self._artifact_uris: dict[str, str] = {}  # run id -> its artifact root, from create_run

    def experiment_id(self, name: str = EXPERIMENT) -> str:
        """The experiment's id, created on first use; a tenant's experiment is tagged with its tenant."""
        if name in self._experiments:
            return self._experiments[name]
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            self._experiments[name] = exp.experiment_id
            return exp.experiment_id
        tenant = name.removeprefix(TENANT_EXPERIMENT_PREFIX) if name.startswith(TENANT_EXPERIMENT_PREFIX) else None
        tags = {TAG + "tenant": check_id(tenant)} if tenant is not None else {TAG + "scope": "operators"}
        try:
            return self.client.create_experiment(name, tags=tags)
        except _mlflow_errors():  # created concurrently
            return self.client.get_experiment_by_name(name).experiment_id

    def start_run(self, name: str, tags: dict[str, str] | None = None, parent_run_id: str | None = None,
                  experiment: str = EXPERIMENT) -> str:
        """A new run in ``experiment`` (a job's: ``tenant_experiment(tenant)``)."""
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        token = tags[TAG + "request"] = uuid.uuid4().hex  # a retried create finds an earlier one's run
        exp = self.experiment_id(experiment)
        raw = getattr(self.client, "_client", self.client)

        def created() -> Any:
            runs = raw.search_runs([exp], f"tags.`{TAG}request` = '{token}'", max_results=1)
            return runs[0] if runs else None

        run = with_retry(lambda: raw.create_run(exp, run_name=name, tags=tags), "create_run", self.retry_s,
                         before_retry=created)
        self._artifact_uris[run.info.run_id] = run.info.artifact_uri
        try:  # its uploads then need no lookup of the run's artifact root (MLflow caches repos by run)
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
            from mlflow.tracking._tracking_service import utils as tracking_utils

            tracking_utils._artifact_repos_cache[run.info.run_id] = get_artifact_repository(
                run.info.artifact_uri, tracking_uri=self.uri)
        except Exception:  # noqa: BLE001 - only a saved round trip
            pass
        return run.info.run_id

    def log_batch(self, run_id: str, params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
                  tags: dict[str, Any] | None = None, step: int = 0,
                  history: list[tuple[str, float, int, int]] | None = None) -> None:
        """Params, metrics (at ``step``), tags and earlier metrics (``history``: (key, value, timestamp
        ms, step)) in as few calls as MLflow allows (1,000 entries, 100 params per call)."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        items: list[tuple[str, Any]] = [("p", Param(k, str(v)[:6000])) for k, v in (params or {}).items()]
        items += [("t", RunTag(k, str(v)[:8000])) for k, v in (tags or {}).items()]
        items += [("m", Metric(k, float(v), now, step)) for k, v in (metrics or {}).items()]
        items += [("m", Metric(k, float(v), int(ts), int(st))) for k, v, ts, st in (history or [])]
        while items:
            chunk, n_params = [], 0
            while items and len(chunk) < 1000 and (items[0][0] != "p" or n_params < 100):
                kind, item = items.pop(0)
                n_params += kind == "p"
                chunk.append((kind, item))
            self.client.log_batch(run_id, metrics=[i for k, i in chunk if k == "m"],
                                  params=[i for k, i in chunk if k == "p"], tags=[i for k, i in chunk if k == "t"])

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    def log_text(self, run_id: str, text: str, path: str) -> None:
        self.client.log_text(run_id, text, path)

    def log_dir(self, run_id: str, local_dir: str | Path, artifact_path: str) -> str:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)
        root = self._artifact_uris.get(run_id) or self.client.get_run(run_id).info.artifact_uri
        return f"{root}/{artifact_path}"

    def end_run(self, run_id: str, ok: bool) -> None:
        from mlflow.entities import RunStatus

        store, _ = _stores(self.client)
        status = RunStatus.from_string("FINISHED" if ok else "FAILED")
        with_retry(lambda: store.update_run_info(run_id, run_status=status, end_time=int(time.time() * 1000),
                                                 run_name=None), "end_run", self.retry_s)

    def run_url(self, run_id: str) -> str:
        run = self.client.get_run(run_id)
        return f"{self.uri}/#/experiments/{run.info.experiment_id}/runs/{run_id}"

    def find_experiment_id(self, name: str = EXPERIMENT) -> str | None:
        """The experiment's id, or None while it does not exist yet (never creates it)."""
        try:
            exp = self.client.get_experiment_by_name(name)
        except Exception as e:  # noqa: BLE001 - connection errors: the server is unreachable
            raise RegistryError(f"the MLflow server at {self.uri} is unreachable: {e}") from e
        return exp.experiment_id if exp is not None else None

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float, float]]:
        """(step, value, timestamp in s) of a run's metric, by step; [] when the run has none."""
        try:
            history = self.client.get_metric_history(run_id, key)
        except _mlflow_errors() as e:
            if _not_found(e):
                return []
            raise RegistryError(f"MLflow failed reading {key!r} of run {run_id}: {e}") from e
        except Exception as e:  # noqa: BLE001 - connection errors: the server is unreachable
            raise RegistryError(f"the MLflow server at {self.uri} is unreachable: {e}") from e
        return sorted((int(m.step), float(m.value), m.timestamp / 1000) for m in history)


class Registry:
    """The model registry. ``retry_s`` > 0: every call rides out an MLflow outage of up to that long.
    ``index``: the catalogue in the state database (adapterfab/registry_index.py) that this registry
    keeps up to date with its own changes and that ``list`` reads once it is complete."""

    def __init__(self, uri: str, retry_s: float = 0.0, index: Any = None):
        self.uri, self.retry_s, self.index = uri, retry_s, index
        self._client: Any = None  # made on first use: a listing from the catalogue never imports mlflow
        self._client_lock = threading.Lock()
        self._models: set[str] = set()  # registered models this client made or saw (never deleted here)

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._client_lock:  # one client for the threads of a serving replica
                if self._client is None:
                    self._client = _client(self.uri, self.retry_s)
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
            try:
                self.index.invalidate()
            except Exception:  # noqa: BLE001
                log.exception("cannot mark the registry catalogue incomplete")

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
        raw = getattr(self.client, "_client", self.client)

        def created() -> Any:
            mvs = raw.search_model_versions(f"name='{name}' and tags.`{TAG}request` = '{token}'")
            return mvs[0] if mvs else None

        from mlflow.entities.model_registry import ModelVersionTag

        _, store = _stores(self.client)
        mv = with_retry(lambda: store.create_model_version(name, source, run_id,
                                                           tags=[ModelVersionTag(k, v) for k, v in vtags.items()]),
                        "create_model_version", self.retry_s, before_retry=created)
        for alias in aliases:
            self._alias(name, alias, mv.version)
        if fetch:
            v = self.get(aid.with_version(int(mv.version)))
        else:
            v = AdapterVersion(aid.unversioned().with_version(int(mv.version)), source, run_id, vtags, tuple(aliases),
                               (getattr(mv, "creation_timestamp", None) or time.time() * 1000) / 1000)
        if catalogue:
            self._catalogue(str(v.id), lambda index: index.add_version(v))
        return v

    def get(self, aid: AdapterId) -> AdapterVersion:
        """The version ``aid`` names exactly (version or alias)."""
        MlflowException = _mlflow_errors()
        try:
            if aid.version is not None:
                mv = self.client.get_model_version(aid.registry_name, str(aid.version))
            elif aid.alias is not None:
                mv = self.client.get_model_version_by_alias(aid.registry_name, aid.alias)
            else:
                return self.resolve(aid)
        except MlflowException as e:
            if _not_found(e):
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
        except _mlflow_errors() as e:
            if transient(e):
                raise RegistryError(f"the MLflow registry at {self.uri} is unreachable: {e}") from e
            return {}
        return {a: int(v) for a, v in (getattr(rm, "aliases", None) or {}).items()}

    def versions(self, aid: AdapterId, aliases: dict[str, int] | None = None) -> list[AdapterVersion]:
        """Every version of ``aid``, oldest first: one search plus one lookup for the aliases
        (search results carry tags but no aliases)."""
        MlflowException = _mlflow_errors()
        try:
            mvs = self.client.search_model_versions(f"name='{aid.registry_name}'")
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
            mvs = self.client.search_model_versions(f"name='{aid.registry_name}' and tags.`{key}` = '{value}'")
        except _mlflow_errors() as e:
            if transient(e):  # an outage is not "no such version": that would train or register twice
                raise RegistryError(f"the MLflow registry at {self.uri} is unreachable: {e}") from e
            return None
        if not mvs:
            return None
        newest = max(int(mv.version) for mv in mvs)
        return self.get(aid.unversioned().with_version(newest))

    def set_alias(self, aid: AdapterId, alias: str, version: int) -> AdapterVersion:
        self.get(aid.unversioned().with_version(version))  # exists?
        self.client.set_registered_model_alias(aid.registry_name, alias, str(version))
        if alias == PRODUCTION:
            history = self.production_history(aid)
            if not history or history[-1] != version:
                self._set_history(aid, [*history, version])
        self._catalogue_adapter(aid)
        return self.get(aid.unversioned().with_version(version))

    def set_version_tags(self, v: AdapterVersion, tags: dict[str, Any], catalogue: bool = True) -> None:
        for k, val in tags.items():
            self.client.set_model_version_tag(v.id.registry_name, str(v.id.version),
                                              k if k.startswith(TAG) else TAG + k, str(val))
        if catalogue:
            self._catalogue_adapter(v.id)

    # production history: every version production pointed at, in order, for rollback -----------
    def production_history(self, aid: AdapterId) -> list[int]:
        try:
            rm = self.client.get_registered_model(aid.registry_name)
        except _mlflow_errors() as e:
            if transient(e):  # an empty history would overwrite the real one
                raise RegistryError(f"the MLflow registry at {self.uri} is unreachable: {e}") from e
            return []
        raw = (rm.tags or {}).get(TAG + "production_history", "")
        try:
            return [int(v) for v in json.loads(raw)] if raw else []
        except (ValueError, TypeError):
            return []

    def _set_history(self, aid: AdapterId, history: list[int]) -> None:
        self.client.set_registered_model_tag(aid.registry_name, TAG + "production_history",
                                             json.dumps(history[-200:]))

    def production(self, aid: AdapterId) -> AdapterVersion | None:
        try:
            return self.get(aid.unversioned().with_alias(PRODUCTION))
        except AdapterNotFound:
            return None

    def _alias(self, name: str, alias: str, version: Any) -> None:
        """Point ``alias`` at ``version`` of a model this factory registered (never a prompt)."""
        _, store = _stores(self.client)
        with_retry(lambda: store.set_registered_model_alias(name, alias, str(version)), "set_alias", self.retry_s)

    def _ensure_model(self, aid: AdapterId, extra_tags: dict[str, str] | None = None) -> bool:
        """The registered model of ``aid`` exists afterwards; True when this call created it (with
        ``extra_tags``; it then has no versions or aliases yet)."""
        name = aid.registry_name
        if name in self._models:
            return False
        try:
            self.client.create_registered_model(name, tags={TAG + "tenant": aid.tenant, TAG + "persona": aid.persona,
                                                            **(extra_tags or {})})
            created = True
        except _mlflow_errors() as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code if hasattr(e, "error_code") else e):
                raise RegistryError(f"cannot create registered model {name}: {e}") from e
            created = False
        self._models.add(name)
        return created

    def register_gated(self, aid: AdapterId, source: str, run_id: str | None, tags: dict[str, Any],
                       decide: Callable[[AdapterVersion | None], Any] | None) -> tuple[AdapterVersion, Any]:
        """``register`` with the promotion gate decided first, against the current production version
        (``decide(production) -> Decision``, None: no gate): the decision's tags go into the version as
        it is made and ``production`` moves to it when promoted, with no extra tag writes. A model this
        call creates has no production version and no history to read. Returns (the version, the
        decision or None)."""
        # a model made here has no production version: its gate is decided before it exists, and when
        # version 1 is promoted the model is created with that production history already
        first = decide(None) if decide is not None else None
        history_tag = {TAG + "production_history": "[1]"} if first is not None and first.promoted else None
        new_model = self._ensure_model(aid, history_tag)
        decision = first if new_model else (decide(self.production(aid)) if decide is not None else None)
        if decision is not None:
            tags = {**tags, **decision.tags()}
        v = self.register(aid, source, run_id, tags, fetch=False, catalogue=False)
        faults.reached("REGISTERED")
        if decision is not None and decision.promoted:
            self._alias(aid.registry_name, PRODUCTION, v.id.version)
            if new_model and history_tag:  # created with history [1]: right unless a race took version 1
                if v.id.version != 1:
                    self._set_history(aid, [v.id.version])
            else:
                history = self.production_history(aid)
                if not history or history[-1] != v.id.version:
                    self._set_history(aid, [*history, v.id.version])
            v = AdapterVersion(v.id, v.source, v.run_id, v.tags, (*v.aliases, PRODUCTION), v.created_s)
        self._catalogue(str(v.id), lambda index: index.add_version(v))
        return v, decision

    def complete_promotion(self, v: AdapterVersion) -> AdapterVersion:
        """Finish what ``register_gated`` began when its process died between writing ``v`` and moving
        ``production``: a version the gate promoted (its ``promotion.decision`` tag) becomes production,
        at the end of the history, unless production is already on it or on a newer version (a later
        decision stands)."""
        from adapterfab.promotion import PROMOTED

        if v.tags.get(TAG + "promotion.decision") != PROMOTED or PRODUCTION in v.aliases:
            return v
        aid = v.id.unversioned()
        current = self.production(aid)
        if current is not None and current.id.version >= v.id.version:
            return v
        log.info("%s: its promotion was interrupted; completing it", v.id)
        self._alias(aid.registry_name, PRODUCTION, v.id.version)
        history = self.production_history(aid)
        if not history or history[-1] != v.id.version:
            self._set_history(aid, [*history, v.id.version])
        self._catalogue_adapter(aid)
        return AdapterVersion(v.id, v.source, v.run_id, v.tags, (*v.aliases, PRODUCTION), v.created_s)

    def promote(self, v: AdapterVersion, decision: Any) -> AdapterVersion:
        """Record ``decision`` (a promotion.Decision) on ``v``; move production to it if promoted."""
        self.set_version_tags(v, decision.tags(), catalogue=not decision.promoted)
        if decision.promoted:
            return self.set_alias(v.id, PRODUCTION, v.id.version)
        return self.get(v.id)

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
        self._set_history(aid, history)
        self.set_version_tags(current, {"promotion.decision": "rolled_back",
                                        "promotion.reason": f"{reason}: production moved back to v{target}",
                                        "promotion.decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                              time.gmtime())})  # catalogued
        return cur, target

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
        for rm in _pages(lambda token: self.client.search_registered_models(
                filter_string=flt, max_results=MODELS_PAGE, page_token=token)):
            try:
                aid = AdapterId.from_registry_name(rm.name)
            except Exception:  # noqa: BLE001 - not ours
                continue
            if tenant and aid.tenant != tenant:  # LIKE's "_" matches any character
                continue
            adapters[rm.name] = RegisteredAdapter(
                aid, {a: int(v) for a, v in (getattr(rm, "aliases", None) or {}).items()}
            )
        for mv in _pages(lambda token: self.client.search_model_versions(
                filter_string=flt, max_results=VERSIONS_PAGE, page_token=token)):
            ra = adapters.get(mv.name)
            if ra is None:
                continue
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
        except _mlflow_errors():
            pass  # created concurrently or earlier
        mv = self.client.create_model_version(name, source=source, run_id=run_id,
                                              tags={TAG + k: str(v) for k, v in tags.items()})
        return int(mv.version)

    def basis_versions(self, basis_id: str) -> list[int]:
        from adapterfab.ids import basis_registry_name

        try:
            mvs = self.client.search_model_versions(f"name='{basis_registry_name(basis_id)}'")
        except _mlflow_errors():
            return []
        return sorted(int(mv.version) for mv in mvs)

    def download(self, v: AdapterVersion, dest: str | Path) -> Path:
        """Fetch an adapter's files to ``dest`` (checksums verified when it comes from our store)."""
        uri = v.artifact_uri
        if uri.startswith(("s3://", "/", "file://")) and v.tags.get(TAG + "artifact_uri"):
            from adapterfab.storage import open_store

            root = v.tags.get(TAG + "artifact_root") or uri
            return open_store(root).download_dir(uri, dest)
        _import_mlflow()
        import mlflow.artifacts

        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest),
                                                        tracking_uri=self.uri))


MODELS_PAGE = 1000  # MLflow's most registered models per search
VERSIONS_PAGE = 10000


def _pages(search: Callable[[str | None], Any]) -> Iterator[Any]:
    """Every result of a paged MLflow search (``search(page_token)``)."""
    token = None
    while True:
        page = search(token)
        yield from page
        token = getattr(page, "token", None)
        if not token:
            return


class MetricBuffer:
    """Per-step metrics of a training worker, sent to MLflow by a background thread in batches, so an
    MLflow outage never stalls training. Nothing is dropped: a batch leaves the buffer only once
    MLflow took it. ``close(timeout_s)`` waits until everything is in, else raises RegistryError (the job
    fails rather than finishing with metrics missing)."""

    def __init__(self, uri: str, every_s: float = 1.0, max_batch: int = 900):
        self.client = _client(uri)  # MLflow's own short retries per attempt; this class retries forever
        self.every_s, self.max_batch = every_s, max_batch
        self._pending: list[tuple[str, Any]] = []
        self._cond = threading.Condition()
        self._closing = False
        self.sent = 0
        self.failed_attempts = 0
        self._thread = threading.Thread(target=self._run, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def log(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._cond:
            self._pending.extend((run_id, Metric(k, float(v), now, step)) for k, v in metrics.items())

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def peek(self, run_ids: list[str]) -> dict[str, list[tuple[str, float, int, int]]]:
        """The metrics of ``run_ids`` not yet in MLflow, as (key, value, timestamp ms, step) per run."""
        wanted, out = set(run_ids), {}
        with self._cond:
            for r, m in self._pending:
                if r in wanted:
                    out.setdefault(r, []).append((m.key, m.value, m.timestamp, m.step))
        return out

    def take(self, run_ids: list[str]) -> dict[str, list[tuple[str, float, int, int]]]:
        """Like ``peek``, and the caller sends them from now on (``log_metric_tuples``). One this
        buffer is sending right now may reach MLflow twice; MLflow keeps one of identical metrics."""
        wanted = set(run_ids)
        out = self.peek(run_ids)
        with self._cond:
            self._pending = [(r, m) for r, m in self._pending if r not in wanted]
        return out

    def _run(self) -> None:
        backoff = 0.5
        while True:
            with self._cond:
                if not self._closing:
                    self._cond.wait(timeout=self.every_s)
                head = self._pending[:self.max_batch]
                closing = self._closing
            if not head:
                if closing:
                    return
                continue
            run_id = head[0][0]
            batch = [m for r, m in head if r == run_id]
            try:
                self.client.log_batch(run_id, metrics=batch)
            except Exception as e:  # noqa: BLE001 - kept, retried with backoff
                self.failed_attempts += 1
                log.warning("MLflow did not take %d metric(s) (%s); %d buffered, retrying", len(batch),
                            type(e).__name__, self.pending())
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            with self._cond:
                sent = {id(m) for m in batch}
                self._pending = [(r, m) for r, m in self._pending if id(m) not in sent]
                self.sent += len(batch)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Send what is buffered now and wait (up to ``timeout_s``) until MLflow has it; True if
        nothing is left. Workers call it before each checkpoint, so that a worker killed after the
        checkpoint loses no metric of the steps the checkpoint covers (the steps after it are redone)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._cond.notify_all()
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.pending()

    def close(self, timeout_s: float) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise RegistryError(f"MLflow stayed unreachable for {timeout_s:.0f}s: {self.pending()} metric(s) "
                                "of this job were not recorded")
