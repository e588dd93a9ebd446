"""The MLflow client every adapterfab module talks to MLflow through: made once per URI, mlflow imported
once under a lock, and calls retried with backoff while the server is unreachable (``with_retry``,
``RetryingClient``; a batch waits ``ADAPTERFAB_MLFLOW_RETRY_S``, 30 minutes by default, a request path
not at all). With ``tracking.py`` and ``registry.py``, the only modules that import mlflow."""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("adapterfab.mlflow")
TAG = "adapterfab."  # the prefix of every tag adapterfab writes on runs, models and versions

def factory_retry_s() -> float:
    """How long the factory (orchestrator, training workers) rides out an MLflow outage before a job
    fails (``ADAPTERFAB_MLFLOW_RETRY_S``). Interactive callers (CLI, serving) keep MLflow's own short
    retries (retry_s=0)."""
    from adapterfab.env import env

    return env().mlflow_retry_s


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
    """``fn()``, retried (tenacity) while MLflow is unreachable (``transient``), for up to ``retry_s``
    seconds: waits of 0.5, 1, 2, ... up to 10 s, each times a random 0.5-1.5, never past the deadline.
    ``before_retry()`` (for a call that creates something) may return the thing a lost-response attempt
    already created; it is returned instead of creating it twice."""
    if retry_s <= 0:
        return fn()
    from tenacity import Retrying, retry_if_exception, stop_after_delay

    def left(state: Any) -> float:
        return max(0.0, retry_s - state.seconds_since_start)

    retrying = Retrying(
        retry=retry_if_exception(transient), stop=stop_after_delay(retry_s), reraise=True,
        wait=lambda s: min(min(0.5 * 2 ** (s.attempt_number - 1), 10.0) * (0.5 + random.random()), left(s)),
        before_sleep=lambda s: log.warning("MLflow unreachable (%s, attempt %d); retrying %s for up to %.0fs more",
                                           type(s.outcome.exception()).__name__, s.attempt_number, what, left(s)))
    for attempt in retrying:
        with attempt:
            found = _found(before_retry) if before_retry and attempt.retry_state.attempt_number > 1 else None
            return found if found is not None else fn()


def _found(before_retry: Callable[[], Any]) -> Any:
    try:
        return before_retry()
    except Exception as e:  # noqa: BLE001
        if not transient(e):
            raise
        return None


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


def import_mlflow() -> None:
    """Import mlflow once, under a lock. Its package imports are circular: two threads importing different
    parts of it at once (a serving replica resolving concurrent requests while its catalogue thread lists)
    see a partially initialised module, fail with ImportError, and leave it broken for the process."""
    with _MLFLOW_IMPORT:
        import mlflow  # noqa: F401
        import mlflow.artifacts  # noqa: F401
        import mlflow.entities  # noqa: F401
        import mlflow.exceptions  # noqa: F401
        import mlflow.tracking  # noqa: F401


def client(uri: str, retry_s: float = 0.0):  # noqa: ANN202
    # MLflow's own retries per HTTP call, with its backoff (2, 4, 8, ... s): the orchestrator and trainers
    # (retry_s > 0) ride out an outage anyway; the CLI fails fast (5 retries took 64 s on a refused port)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5" if retry_s > 0 else "1")
    import_mlflow()
    from mlflow.tracking import MlflowClient

    raw = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return RetryingClient(raw, retry_s) if retry_s > 0 else raw


def stores(client: Any) -> tuple[Any, Any]:
    """The tracking and registry stores behind an MlflowClient (or its retrying wrapper). The client's
    own methods add round trips a factory pays per job: ``set_terminated`` fetches the run to print its
    URL, ``set_registered_model_alias`` fetches the model to refuse prompts, and every first artifact
    upload of a run fetches the run for its artifact root. (MLflow's internal layout, pinned in
    requirements.lock; tests run these paths against a real server.)"""
    raw = getattr(client, "client", client)
    return raw._tracking_client.store, raw._get_registry_client().store


def mlflow_errors():  # noqa: ANN202
    import_mlflow()
    from mlflow.exceptions import MlflowException

    return MlflowException


def not_found(e: Exception) -> bool:
    code = getattr(e, "error_code", "") or ""
    return code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") or "not found" in str(e).lower()

