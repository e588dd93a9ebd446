"""A tenant's dataset read from S3 (moto's S3 server on 127.0.0.1) through Ray Data on a real local
cluster (2 CPUs) prepares exactly as the same file read from local disk."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from adapterfab.errors import DatasetError

pytestmark = [pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
S3_ENV = ("ADAPTERFAB_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
          "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")


@pytest.fixture(scope="module")
def s3_ray(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """moto's S3 server, its settings in os.environ (Ray's workers inherit them), then a local cluster."""
    import ray

    from adapterfab.procs import free_port, start_moto, stop_pid

    server = start_moto(tmp_path_factory.mktemp("moto"), free_port())
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.pop("AWS_ENDPOINT_URL", None)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update({"ADAPTERFAB_S3_ENDPOINT_URL": server.url, "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        # address="local": never join a cluster someone else started on this machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield server.url
        finally:
            ray.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop_pid(server.pid)


def _dataset(path: Path) -> bytes:
    """Four dozen chat rows in both formats rows.py reads (messages and instruction/output), from the
    examples, plus a blank line and one broken row, so line numbers and bad-row counts are compared too."""
    pirate = (REPO / "examples/data/pirate.jsonl").read_bytes().splitlines()[:30]
    butler = (REPO / "examples/data/butler.jsonl").read_bytes().splitlines()[:18]
    extra = json.dumps({"messages": [{"role": "system", "content": "Talk like a pirate."},
                                     {"role": "user", "content": "Où est le café ? ☕"},
                                     {"role": "assistant", "content": "Arr, matey! Au port. Arr!"}]},
                       ensure_ascii=False).encode()
    lines = [*pirate[:10], b"", *butler, b"{not json", extra, *pirate[10:]]
    body = b"\n".join(lines) + b"\n"
    path.write_bytes(body)
    return body


def _prepare(uri: str, tok: str):  # noqa: ANN202
    from adapterfab.pipelines.data import prepare_dataset

    return prepare_dataset(uri, tok, max_seq_len=256, eval_fraction=0.2, seed=3, max_bad_row_fraction=0.1,
                           timeout_s=180)


def _rows(ds) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:  # noqa: ANN001
    return sorted((tuple(r["input_ids"]), tuple(r["labels"])) for r in ds.take_all())


@pytest.mark.timeout(300)
def test_s3_dataset_prepares_like_local(s3_ray: str, tmp_path: Path, tiny_model_path: str) -> None:
    from adapterfab.storage import S3Store

    local = tmp_path / "pirate.jsonl"
    body = _dataset(local)
    store = S3Store("s3://tenant-data")
    store.ensure_bucket()
    store.put_file(local, "acme/pirate.jsonl")
    uri = "s3://tenant-data/acme/pirate.jsonl"

    from_s3 = _prepare(uri, tiny_model_path)
    from_disk = _prepare(str(local), tiny_model_path)

    assert from_s3.stats.sha256 == from_disk.stats.sha256 == hashlib.sha256(body).hexdigest()
    assert from_s3.stats.total_rows == from_disk.stats.total_rows == 50  # 30 + 18 + broken + extra
    assert from_s3.stats.bad_rows == 1 and from_s3.stats.bad_examples[0][0] == 30  # the "{not json" line
    assert from_s3.stats.train_rows + from_s3.stats.eval_rows == 49
    assert from_s3.stats.eval_rows > 0 and from_s3.stats.train_rows > 0
    assert from_s3.stats.to_dict() == from_disk.stats.to_dict()
    assert from_s3.train.count() == from_s3.stats.train_rows
    assert from_s3.eval.count() == from_s3.stats.eval_rows
    assert _rows(from_s3.train) == _rows(from_disk.train)
    assert _rows(from_s3.eval) == _rows(from_disk.eval)

    with pytest.raises(DatasetError, match=r"dataset s3://tenant-data/acme/missing\.jsonl not found"):
        _prepare("s3://tenant-data/acme/missing.jsonl", tiny_model_path)
