"""MLflow run tracking: a batch is a run in the operators' experiment ``adapterfab``; each job is a child
run (tag ``mlflow.parentRunId``) in its tenant's own experiment ``adapterfab/tenant/<tenant>`` (tagged
``adapterfab.tenant``), so one tenant's runs, params, metrics and artifacts never share an experiment with
another's and MLflow's per-experiment permissions can be granted per tenant. ``MetricBuffer`` sends a
process's per-step metrics in batches."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from adapterfab.errors import RegistryError
from adapterfab.ids import check_id
from adapterfab.mlflow_client import TAG, client, mlflow_errors, not_found, stores, with_retry

log = logging.getLogger("adapterfab.tracking")

EXPERIMENT = "adapterfab"
TENANT_EXPERIMENT_PREFIX = EXPERIMENT + "/tenant/"


def tenant_experiment(tenant: str) -> str:
    """The MLflow experiment that holds one tenant's job runs and nobody else's."""
    return TENANT_EXPERIMENT_PREFIX + check_id(tenant)


class Tracking:
    """Run tracking through MlflowClient (no global active run, so threads and workers are safe).
    ``retry_s`` > 0: every call rides out an MLflow outage of up to that long (the factory's setting)."""

    def __init__(self, uri: str, retry_s: float = 0.0):
        self.uri, self.retry_s = uri, retry_s
        self.client = client(uri, retry_s)
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
        except mlflow_errors():  # created concurrently
            return self.client.get_experiment_by_name(name).experiment_id

    def start_run(self, name: str, tags: dict[str, str] | None = None, parent_run_id: str | None = None,
                  experiment: str = EXPERIMENT) -> str:
        """A new run in ``experiment`` (a job's: ``tenant_experiment(tenant)``)."""
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        token = tags[TAG + "request"] = uuid.uuid4().hex  # a retried create finds an earlier one's run
        exp = self.experiment_id(experiment)
        raw = getattr(self.client, "client", self.client)

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

        store, _ = stores(self.client)
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
        except mlflow_errors() as e:
            if not_found(e):
                return []
            raise RegistryError(f"MLflow failed reading {key!r} of run {run_id}: {e}") from e
        except Exception as e:  # noqa: BLE001 - connection errors: the server is unreachable
            raise RegistryError(f"the MLflow server at {self.uri} is unreachable: {e}") from e
        return sorted((int(m.step), float(m.value), m.timestamp / 1000) for m in history)


class MetricBuffer:
    """Per-step metrics of a training worker, sent to MLflow by a background thread in batches, so an
    MLflow outage never stalls training. Nothing is dropped: a batch leaves the buffer only once
    MLflow took it. ``close(timeout_s)`` waits until everything is in, else raises RegistryError (the job
    fails rather than finishing with metrics missing)."""

    def __init__(self, uri: str, every_s: float = 1.0, max_batch: int = 900):
        self.client = client(uri)  # MLflow's own short retries per attempt; this class retries forever
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
        """Send the pending metrics run by run, oldest first. A run MLflow does not take (down, or that
        run refused, e.g. deleted) is tried again after its own backoff while the other runs' metrics go
        on (one such run held every job of the trainer back); with a backlog, batches go without a pause."""
        backoff: dict[str, float] = {}  # run -> the wait after its next failure
        not_before: dict[str, float] = {}  # run -> when it may be tried again
        sent_last = False
        while True:
            with self._cond:
                if not self._closing and not sent_last:
                    self._cond.wait(timeout=self.every_s)
                now = time.monotonic()
                run_id = next((r for r, _ in self._pending if not_before.get(r, 0.0) <= now), None)
                batch = [m for r, m in self._pending if r == run_id][:self.max_batch] if run_id else []
                closing, waiting = self._closing, bool(self._pending)
            sent_last = False
            if not batch:
                if closing and not waiting:
                    return
                if waiting:  # every pending run is backing off: until the first may be tried again
                    time.sleep(min(0.5, max(0.01, min(not_before.values(), default=now) - now)))
                continue
            try:
                self.client.log_batch(run_id, metrics=batch)
            except Exception as e:  # noqa: BLE001 - kept, retried with backoff
                self.failed_attempts += 1
                wait = backoff.get(run_id, 0.5)
                not_before[run_id], backoff[run_id] = time.monotonic() + wait, min(wait * 2, 10.0)
                log.warning("MLflow did not take %d metric(s) of run %s (%s); %d buffered, retrying", len(batch),
                            run_id, type(e).__name__, self.pending())
                continue
            backoff.pop(run_id, None)
            not_before.pop(run_id, None)
            sent_last = True
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

