"""``adapterfab submit --address``: ship a batch to a Ray cluster through the Ray Jobs API.

The submitter validates the spec locally, then packs a working folder with the spec and every local
dataset it names (rewritten to relative paths; ``s3://`` datasets stay URIs and are read by the
cluster), and submits the Ray Job ``python -m adapterfab.cli run batch.yaml --batch-id <id>``. On the
cluster, ``run`` records the batch in the cluster's state database and runs it in the foreground; the
cluster's own settings (``MLFLOW_TRACKING_URI``, ``ADAPTERFAB_ARTIFACTS``, ``ADAPTERFAB_STATE_URL`` in
its environment) say where MLflow and the artifacts live. The submitter's S3 settings (``AWS_*``,
``ADAPTERFAB_S3_*``: endpoint, region, profile name) travel as the job's environment so the cluster can
read ``s3://`` datasets; its credentials never do (Ray's Jobs API shows a job's environment to anyone
who reaches the dashboard): the cluster reads S3 with its own.

Addresses: the dashboard's ``http://<head>:8265`` or a Ray Client ``ray://<head>:10001``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from adapterfab.errors import AdapterfabError
from adapterfab.jobs.admission import admit
from adapterfab.spec import load_spec
from adapterfab.storage import s3_object_error

SUBMISSION_PREFIX = "adapterfab-"
MAX_SHIPPED_BYTES = 200 * 2**20  # Ray's package limit is ~500 MiB; larger data belongs on S3
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@contextlib.contextmanager
def _client(address: str) -> Iterator[object]:
    """A JobSubmissionClient for ``address``: RAY_ADDRESS would silently override it, so it is
    unset while the client is made."""
    from ray.job_submission import JobSubmissionClient

    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - connection refused, bad address
        raise AdapterfabError(f"cannot reach the Ray Jobs API at {address}: {e}") from e
    finally:
        os.environ.update(saved)
    yield client


def pack(spec_path: str | Path, dest: Path) -> Path:
    """Write ``dest/batch.yaml`` and ``dest/data/*``: the spec with local datasets copied beside it."""
    spec_path = Path(spec_path)
    spec, jobs, text = load_spec(spec_path)
    raw = yaml.safe_load(text)
    (dest / "data").mkdir(parents=True, exist_ok=True)
    total = 0
    for i, (entry, job) in enumerate(zip(raw["tenants"], jobs)):
        if "://" in job.dataset:
            continue
        src = Path(job.dataset)
        rel = f"data/{i:04d}-{src.name}"
        shutil.copyfile(src, dest / rel)
        total += src.stat().st_size
        entry["dataset"] = rel
    if total > MAX_SHIPPED_BYTES:
        raise AdapterfabError(f"the batch's local datasets are {total / 2**20:.0f} MiB; more than "
                              f"{MAX_SHIPPED_BYTES // 2**20} MiB should be on s3:// for a remote cluster")
    out = dest / "batch.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def submit_remote(address: str, spec_path: str | Path, batch_id: str, force: bool = False) -> str:
    """Validate, pack and submit; returns the Ray Job submission id (``adapterfab-<batch id>``)."""
    from adapterfab.cluster import worker_env

    spec, jobs, _ = load_spec(spec_path)
    admit(spec, jobs, dataset_exists=s3_object_error)
    entrypoint = f"python -m adapterfab.cli run batch.yaml --batch-id {batch_id}" + (" --force" if force else "")
    with tempfile.TemporaryDirectory(prefix="adapterfab-submit-") as tmp:
        pack(spec_path, Path(tmp))
        runtime_env = {"working_dir": tmp, "env_vars": worker_env()}
        with _client(address) as client:
            try:
                return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,  # type: ignore[attr-defined]
                                         submission_id=SUBMISSION_PREFIX + batch_id,
                                         metadata={"adapterfab_batch": batch_id, "name": spec.name})
            except Exception as e:  # noqa: BLE001
                raise AdapterfabError(f"the Ray Jobs API at {address} refused the batch: {e}") from e


def remote_status(address: str, batch_id: str) -> dict[str, str]:
    with _client(address) as client:
        sid = SUBMISSION_PREFIX + batch_id
        try:
            info = client.get_job_info(sid)  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001
            raise AdapterfabError(f"no Ray Job {sid} at {address}: {e}") from e
        return {"batch_id": batch_id, "submission_id": sid, "status": str(info.status.value),
                "message": info.message or "", "logs": client.get_job_logs(sid)}  # type: ignore[attr-defined]


def follow(address: str, batch_id: str, on_line: Callable[[str], None], timeout_s: float = 0,
           poll_s: float = 2.0) -> str:
    """Print the job's new log lines until it ends; returns its final status (or TIMEOUT)."""
    sid = SUBMISSION_PREFIX + batch_id
    shown = 0
    t0 = time.monotonic()
    with _client(address) as client:
        while True:
            status = str(client.get_job_status(sid).value)  # type: ignore[attr-defined]
            logs = client.get_job_logs(sid)  # type: ignore[attr-defined]
            done = status in TERMINAL
            end = len(logs) if done else logs.rfind("\n", shown) + 1  # whole lines only while running
            for line in logs[shown:end].splitlines():
                on_line(line)
            shown = max(shown, end)
            if done:
                return status
            if timeout_s and time.monotonic() - t0 > timeout_s:
                return "TIMEOUT"
            time.sleep(poll_s)
