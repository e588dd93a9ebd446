"""A job's data sha256 (its provenance, its fingerprint, what decides reuse) is of the bytes it trained on.

The data stage hashes a dataset file, then reads it again to parse it (in Ray Data, or in process). A file
rewritten between the two reads (a tenant writing its dataset while a batch starts) gave a job that trained
on the new rows and recorded the old bytes' sha256 (review, 2026-12): now the parse UDFs hash the bytes
they parse and the job fails when they differ from the first hash.

The real data stage on real local files and the SmolLM2 tokenizer; the only hook is at the edge between
the two reads: ``_sha256`` wrapped to rewrite the file once it has hashed it. The Ray Data path starts a
local Ray cluster (2 CPUs)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from adapterfab.errors import DatasetError
from adapterfab.pipelines import data
from adapterfab.pipelines.data import DataRequest, PreparedRows, prepare_dataset, prepare_many


def _lines(tag: str, n: int) -> bytes:
    rows = [{"instruction": f"[{tag}] question {i}?", "output": f"[{tag}] answer {i}."} for i in range(n)]
    return b"\n".join(json.dumps(r).encode() for r in rows) + b"\n"


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    out = {k: tmp_path / f"{k}.jsonl" for k in ("acme", "globex")}
    for k, p in out.items():
        p.write_bytes(_lines(k, 10))
    return out


def _rewrite_after_hashing(monkeypatch: pytest.MonkeyPatch, victim: Path, body: bytes) -> None:
    """The victim file is hashed as it is, then rewritten before the data stage parses it."""
    real = data._sha256

    def hash_then_rewrite(fs, path, uri):  # noqa: ANN001, ANN202
        out = real(fs, path, uri)
        if path == str(victim):
            victim.write_bytes(body)
        return out

    monkeypatch.setattr(data, "_sha256", hash_then_rewrite)


def _requests(files: dict[str, Path]) -> list[DataRequest]:
    return [DataRequest(f"j-{k}", str(p), 128, 0.2, 3, 0.2) for k, p in files.items()]


def _check_many(files: dict[str, Path], tok: str, monkeypatch: pytest.MonkeyPatch, in_process_bytes: int) -> None:
    hashed = {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in files.items()}
    runs: dict[str, int] = {}
    out = prepare_many(_requests(files), tok, timeout_s=180, in_process_bytes=in_process_bytes, runs=runs)
    for k in files:  # the file as it is: its own bytes' digest, all its rows
        got = out[f"j-{k}"]
        assert isinstance(got, PreparedRows), got
        assert got.stats.sha256 == hashed[k] and got.stats.total_rows == 10

    _rewrite_after_hashing(monkeypatch, files["acme"], _lines("rewritten", 12))
    out = prepare_many(_requests(files), tok, timeout_s=180, in_process_bytes=in_process_bytes, runs=runs)
    err = out["j-acme"]
    assert isinstance(err, DatasetError), f"trained on new rows, recorded the old sha256: {getattr(err, 'stats', err)}"
    assert "acme.jsonl changed while it was read" in str(err) and "submit again" in str(err), str(err)
    other = out["j-globex"]  # another tenant's job in the same execution is untouched
    assert isinstance(other, PreparedRows) and other.stats.sha256 == hashed["globex"]
    assert set(runs) == {"in_process" if in_process_bytes else "ray_data"}, runs  # the path meant


def test_a_file_rewritten_between_hash_and_parse_fails_its_job_in_process(
        files: dict[str, Path], smollm2_tokenizer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _check_many(files, smollm2_tokenizer, monkeypatch, in_process_bytes=1 << 30)


def test_the_parse_udfs_carry_the_digest_of_the_bytes_they_parse() -> None:
    import numpy as np

    body = _lines("a", 3)
    want = hashlib.sha256(body).hexdigest()
    table = data._parse_files({"bytes": np.array([body], dtype=object)}, "jsonl")
    assert table.column("sha256").to_pylist() == [want, None, None]  # one value per file
    tagged = data._parse_tagged({"bytes": np.array([body], dtype=object), "path": np.array(["/d"], dtype=object)},
                                {"/d": [(0, "jsonl"), (1, "jsonl")]})
    assert [(r["req"], r["sha256"]) for r in tagged.to_pylist() if r["sha256"]] == [(0, want), (1, want)]
    junk = b"PAR1junk"  # a file that does not parse at all: its error row carries the digest too
    broken = data._parse_tagged({"bytes": np.array([junk], dtype=object), "path": np.array(["/p"], dtype=object)},
                                {"/p": [(0, "parquet")]}).to_pylist()
    assert broken[0]["line"] == 0 and broken[0]["error"] and broken[0]["sha256"] == hashlib.sha256(junk).hexdigest()


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # address="local": never join a cluster someone else started on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_file_rewritten_between_hash_and_parse_fails_its_job_in_ray_data(
        ray_local: None, files: dict[str, Path], smollm2_tokenizer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _check_many(files, smollm2_tokenizer, monkeypatch, in_process_bytes=0)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_prepare_dataset_fails_on_a_file_rewritten_between_hash_and_parse(
        ray_local: None, files: dict[str, Path], smollm2_tokenizer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs = dict(max_seq_len=128, eval_fraction=0.2, seed=3, max_bad_row_fraction=0.2, timeout_s=180)
    path = files["acme"]
    got = prepare_dataset(str(path), smollm2_tokenizer, **kwargs)
    assert got.stats.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() and got.stats.total_rows == 10
    assert got.train.count() + got.eval.count() == 10  # the digest column never reaches the splits' rows
    assert set(got.train.columns()) == {"input_ids", "labels"}

    _rewrite_after_hashing(monkeypatch, path, _lines("rewritten", 12))
    with pytest.raises(DatasetError, match="acme.jsonl changed while it was read.*submit again"):
        prepare_dataset(str(path), smollm2_tokenizer, **kwargs)
