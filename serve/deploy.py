"""``adapterfab serve``: deploy the serving app on the stack's Ray cluster, in the foreground until
interrupted (``--detach``: deploy and return; the app stays on the cluster until ``adapterfab down``)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from adapterfab.basemodel import resolve_base_model
from adapterfab.errors import StackError
from adapterfab.settings import DEFAULT_SERVE_PORT, Settings


def serve_forever(settings: Settings, port: int | None = None, base_model: str = "smollm2-135m-instruct",
                  detach: bool = False, replicas: int = 1, dtype: str = "float32",
                  registry_catalogue: bool = True, tenant_rps: float | None = None, tenant_burst: int | None = None,
                  announce: Callable[[str], None] = print, before_deploy: Callable[[], object] | None = None) -> str:
    """Deploy; ``before_deploy`` runs once connected to the cluster (the CLI retires the idle warm
    trainers there, whose devices the replicas need)."""
    import ray
    from ray import serve

    from adapterfab.cluster import connect_ray
    from adapterfab.serve.app import ServeConfig, deploy
    from adapterfab.stack import record

    if not settings.mlflow_uri:
        raise StackError("no MLflow server known: run `adapterfab up` first (or set MLFLOW_TRACKING_URI)")
    connect_ray(settings)
    if before_deploy is not None:
        before_deploy()
    base = resolve_base_model(base_model, settings.cache)
    cfg = ServeConfig(base_model_path=base.path, state_url=settings.state_url, mlflow_uri=settings.mlflow_uri,
                      dtype=dtype, num_replicas=replicas, base_fingerprint=base.fingerprint,
                      adapter_cache_dir=str(settings.cache / "adapters"),
                      registry_catalogue=registry_catalogue,
                      **({"tenant_rps": tenant_rps} if tenant_rps is not None else {}),
                      **({"tenant_burst": tenant_burst} if tenant_burst is not None else {}))
    port = port or settings.extra.get("serve_port") or DEFAULT_SERVE_PORT
    url = deploy(cfg, port=port)
    record(settings, serve_url=url, serve_port=port)
    announce(url)
    if detach:
        return url
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        serve.delete("adapterfab")
        ray.shutdown()
    return url
