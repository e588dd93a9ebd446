"""``adapterfab serve``: deploy the serving app on the stack's Ray cluster, in the foreground until
interrupted (``--detach``: deploy and return; the app stays on the cluster until ``adapterfab down``)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from adapterfab.basemodel import resolve_base_model
from adapterfab.errors import StackError
from adapterfab.settings import DEFAULT_SERVE_PORT, Settings

DEVICES = ("cpu", "cuda", "auto")
ANY_ADDRESS = ("0.0.0.0", "::", "")


def replica_gpus(device: str, cluster_gpus: float) -> float:
    """GPUs each engine replica reserves for ``device`` (cpu, cuda, auto) on a cluster with
    ``cluster_gpus``: cuda without any is refused (the engine would never be placed)."""
    if device not in DEVICES:
        raise StackError(f"device {device!r}: use one of {', '.join(DEVICES)}")
    if device == "cuda" and cluster_gpus < 1:
        raise StackError("--device cuda: the Ray cluster has no GPU (ray.cluster_resources() lists none); "
                         "serve on --device cpu, or start the stack on a machine with a GPU")
    return 1.0 if device == "cuda" or (device == "auto" and cluster_gpus >= 1) else 0.0


def reachable_url(host: str, port: int) -> str:
    """The URL a client on this machine uses for a server bound to ``host`` (0.0.0.0: every address)."""
    return f"http://{'127.0.0.1' if host in ANY_ADDRESS else host}:{port}"


def serve_forever(settings: Settings, port: int | None = None, base_model: str = "smollm2-135m-instruct",
                  detach: bool = False, replicas: int = 1, dtype: str = "float32",
                  registry_catalogue: bool = True, tenant_rps: float | None = None, tenant_burst: int | None = None,
                  announce: Callable[[str, str], None] = lambda url, device: print(url),
                  before_deploy: Callable[[], object] | None = None, host: str = "127.0.0.1",
                  device: str = "cpu", max_tokens_cap: int | None = None, json_logs: bool = False) -> str:
    """Deploy ``replicas`` engine replicas on ``device`` (cpu, cuda: one GPU each, auto) behind Serve's
    proxy bound to ``host``; ``announce(url, device)`` once it serves. ``before_deploy`` runs once
    connected to the cluster (the CLI retires the idle warm trainers there, whose devices the replicas
    need). ``max_tokens_cap``: the most tokens a reply may ask for; ``json_logs``: the replicas' log lines as
    JSON. Returns the URL."""
    import ray
    from ray import serve

    from adapterfab.cluster import connect_ray
    from adapterfab.serve.app import ServeConfig, deploy
    from adapterfab.stack import record

    if not settings.mlflow_uri:
        raise StackError("no MLflow server known: run `adapterfab up` first (or set MLFLOW_TRACKING_URI)")
    if replicas < 1:
        raise StackError(f"replicas must be at least 1, not {replicas}")
    connect_ray(settings)
    gpus = replica_gpus(device, float(ray.cluster_resources().get("GPU", 0)))
    if before_deploy is not None:
        before_deploy()
    base = resolve_base_model(base_model, settings.cache)
    cfg = ServeConfig(base_model_path=base.path, state_url=settings.state_url, mlflow_uri=settings.mlflow_uri,
                      dtype=dtype, num_replicas=replicas, replica_num_gpus=gpus, base_fingerprint=base.fingerprint,
                      adapter_cache_dir=str(settings.cache / "adapters"),
                      registry_catalogue=registry_catalogue, max_tokens_cap=max_tokens_cap, json_logs=json_logs,
                      **({"tenant_rps": tenant_rps} if tenant_rps is not None else {}),
                      **({"tenant_burst": tenant_burst} if tenant_burst is not None else {}))
    port = port or settings.extra.get("serve_port") or DEFAULT_SERVE_PORT
    bound = deploy(cfg, host=host, port=port)
    url = reachable_url(host, port)
    record(settings, serve_url=url, serve_port=port, serve_host=host)
    announce(bound, "cuda" if gpus else "cpu")
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
