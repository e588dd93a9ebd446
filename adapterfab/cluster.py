"""The Ray cluster a driver works on: connecting to it (``connect_ray``: the orchestrator, ``adapterfab
serve``) and the environment its workers need to reach S3 (``worker_env``: sent with the driver's
runtime env, or with a job submitted to a remote cluster)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from adapterfab.errors import StackError
from adapterfab.settings import Settings

log = logging.getLogger("adapterfab.cluster")


def connect_ray(settings: Settings) -> None:
    import ray

    if ray.is_initialized():
        return
    if not settings.ray_address:
        raise StackError("no Ray cluster: run `adapterfab up` first (or set RAY_ADDRESS)")
    # this driver runs the Ray Data executions: with usage stats on, each one also starts (and feeds) a
    # usage-collection actor, a whole Python process on a 2-CPU node, to report to nobody (we are offline)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env = None
    forwarded = worker_env(settings.home / "secrets")
    if forwarded and not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # a Ray Job has its own env
        runtime_env = {"env_vars": forwarded}
    ray.init(address=settings.ray_address, log_to_driver=False, runtime_env=runtime_env)


FORWARDED_ENV_PREFIXES = ("AWS_", "ADAPTERFAB_S3_", "MLFLOW_S3_")
# never in a job's runtime_env: Ray's Jobs API and dashboard show it to anyone who reaches them
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def worker_env(secrets_dir: Path | None = None) -> dict[str, str]:
    """Settings the Ray workers need to reach S3 (datasets, bases, artifacts): passed along with the
    job, since the cluster's processes were started with another environment. Credentials never travel
    in it: with ``secrets_dir`` (a cluster on this machine) they are written to an owner-only AWS
    credentials file there and the job gets its path (``AWS_SHARED_CREDENTIALS_FILE``, read by boto3
    when the worker has no credentials of its own); without, the cluster uses its own credentials."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) and k not in SECRET_ENV}
    secrets = {k: os.environ[k] for k in SECRET_ENV if os.environ.get(k)}
    if secrets and secrets_dir is not None:
        env["AWS_SHARED_CREDENTIALS_FILE"] = str(_credentials_file(secrets_dir, secrets,
                                                                   os.environ.get("AWS_PROFILE") or "default"))
    elif secrets:
        log.info("AWS credentials stay here; the cluster reads S3 with its own")
    return env


def _credentials_file(folder: Path, secrets: dict[str, str], profile: str) -> Path:
    import hashlib

    names = {"AWS_ACCESS_KEY_ID": "aws_access_key_id", "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
             "AWS_SESSION_TOKEN": "aws_session_token", "AWS_SECURITY_TOKEN": "aws_security_token"}
    text = f"[{profile}]\n" + "".join(f"{names[k]} = {v}\n" for k, v in secrets.items())
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / f"aws-{hashlib.sha256(text.encode()).hexdigest()[:16]}.ini"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    return path
