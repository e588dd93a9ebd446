"""Ray Data wiring of the data stage: one tenant's file → validated, templated, masked train/eval sets.

    read bytes (one task per file, so line numbers are exact) → parse rows → rebatch → tokenize/mask
    (function UDF, fractional CPUs) → materialize → decide the split on the driver → train / eval

Only function UDFs with ``num_cpus=0.5``: actor pools that take a whole CPU each deadlock Ray Data on a
2-CPU machine (Ray Data waits for CPUs its own actors hold). One call prepares one file, so tenants'
rows never share a dataset.

The file is read twice: hashed first (``_sha256``: its sha256 is the job's provenance and part of its
fingerprint, and decides what is reused), then parsed. The parse UDFs hash the bytes they parse and carry
the digest out (column ``sha256``, on each file's first row), so a file rewritten between the two reads
fails its jobs ("changed while it was read") instead of recording the digest of bytes no row came from.

Parquet is read as bytes too, not with ``ray.data.read_parquet``: that splits a file into row-group
tasks whose output order is not kept, so a row's index — the "line" a tenant is told — would be lost.
A tenant's training file fits one task.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
from ray.data.collate_fn import NumpyBatchCollateFn

from adapterfab.env import env
from adapterfab.errors import DatasetError, plain_message
from adapterfab.pipelines.rows import (
    PARSERS,
    RowError,
    dataset_format_of,
    encode_messages,
    padded_batch,
    split_score,
)

UDF_NUM_CPUS = 0.5  # fractional, so reads and maps always find room next to each other on 2 CPUs
ROWS_PER_BLOCK = 1024  # tokenize blocks: enough rows to amortise a task, enough blocks to use all CPUs
MAX_BAD_EXAMPLES = 20
SHOWN_IN_ERRORS = 5
_HASH_CHUNK_BYTES = 1 << 20
_TOKENIZED = pa.schema([
    ("line", pa.int64()), ("error", pa.string()), ("score", pa.float64()), ("truncated", pa.bool_()),
    ("num_tokens", pa.int64()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
    ("sha256", pa.string()),  # of the bytes parsed, on a file's first row (null on the others)
])
_SPLIT = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
_TOKENIZERS: dict[str, Any] = {}  # per worker process: a tokenizer loads once, not once per batch
T = TypeVar("T")

log = logging.getLogger("adapterfab.data")


@dataclass(frozen=True)
class DataStats:
    """What a dataset gave. Bad rows: unparseable, invalid, refused by the chat template, or with no
    assistant token left within ``max_seq_len``. Token counts are after truncation."""

    total_rows: int  # non-blank lines (JSONL) or rows (Parquet)
    bad_rows: int
    bad_examples: list[tuple[int, str]]  # (line, error), the first MAX_BAD_EXAMPLES by line
    train_rows: int
    eval_rows: int
    truncated_rows: int  # usable rows cut at max_seq_len
    train_tokens: int  # sum of sequence lengths in the train split
    sha256: str  # of the raw file bytes, the very bytes parsed (``_check_parsed_bytes``)
    # which rows the eval split holds (their content hashes and token counts): two versions whose eval
    # figures share it were measured on the same rows, so the promotion gate may compare them
    eval_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["bad_examples"] = [[line, error] for line, error in self.bad_examples]
        return out


@dataclass
class PreparedData:
    train: ray.data.Dataset  # materialized; columns input_ids, labels (variable-length int32 lists)
    eval: ray.data.Dataset  # same columns; may have no rows
    stats: DataStats


class PadCollate(NumpyBatchCollateFn):
    """``iter_torch_batches(collate_fn=PadCollate(pad_id))``: :func:`padded_batch` as the collate class
    Ray 2.47+ asks for (a plain function still works but is deprecated)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return padded_batch(batch, self.pad_id)


def s3_filesystem() -> pafs.S3FileSystem:
    """S3 settings from the environment, the same variables as ``adapterfab.storage`` (endpoint,
    region, credentials, and ADAPTERFAB_S3_MAX_ATTEMPTS / ADAPTERFAB_S3_CONNECT_TIMEOUT_S /
    ADAPTERFAB_S3_READ_TIMEOUT_S for retries and timeouts)."""
    e = env()
    kwargs: dict[str, Any] = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=e.s3_max_attempts),
        "connect_timeout": e.s3_connect_timeout_s,
        "request_timeout": e.s3_read_timeout_s,  # honoured by the AWS SDK on macOS/Windows
    }
    endpoint = e.s3_endpoint_url
    if endpoint:
        parsed = urlparse(endpoint)
        if parsed.scheme and parsed.netloc:
            kwargs.update(scheme=parsed.scheme, endpoint_override=parsed.netloc)
        else:
            kwargs["endpoint_override"] = endpoint
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return pafs.S3FileSystem(**kwargs)


def _resolve(uri: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path inside it, format) for a local path, ``file://`` or ``s3://`` URI."""
    if uri.startswith("s3://"):
        fs: pafs.FileSystem = s3_filesystem()
        path = uri[len("s3://"):]
    else:
        fs = pafs.LocalFileSystem()
        path = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
    return fs, path, dataset_format_of(uri)  # the spec's rule: the name given decides, not a link's target


def _sha256(fs: pafs.FileSystem, path: str, uri: str) -> tuple[str, int]:
    """Checks the file is there, readable and non-empty; hashes it for provenance: (sha256, bytes)."""
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise DatasetError(f"dataset {uri} not found")
        if info.type != pafs.FileType.File:
            raise DatasetError(f"dataset {uri} is not a file")
        digest, size = hashlib.sha256(), 0
        with fs.open_input_stream(path) as f:
            while chunk := f.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
                size += len(chunk)
    except (OSError, pa.ArrowException) as e:
        raise DatasetError(f"cannot read dataset {uri}: {e}") from e
    if size == 0:
        raise DatasetError(f"dataset {uri} is empty")
    return digest.hexdigest(), size


def load_tokenizer(path: str) -> Any:
    """The tokenizer at ``path``, loaded once per process (a resident trainer's training and data
    preparation share it)."""
    if path not in _TOKENIZERS:
        from adapterfab.threads import importing

        with importing():  # the orchestrator's other threads may be importing transformers (peft) now
            from transformers import AutoTokenizer
        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path)
    return _TOKENIZERS[path]


def _with_digest(rows: list[dict[str, Any]], digest: str) -> list[dict[str, Any]]:
    """``rows`` parsed from bytes whose sha256 is ``digest``, the first one carrying it: what
    ``_check_parsed_bytes`` compares with the hash taken before (one value per file, not one per row)."""
    if rows:
        rows[0] = {**rows[0], "sha256": digest}
    return rows


def _parse_files(batch: dict[str, np.ndarray], fmt: str) -> pa.Table:
    """UDF: whole files' bytes → one row per record, bad rows kept with their error; each file's first
    row carries the sha256 of the bytes parsed."""
    parse = PARSERS[fmt]
    rows = [entry for data in batch["bytes"]
            for entry in _with_digest(list(parse(data)), hashlib.sha256(data).hexdigest())]
    schema = pa.schema([("line", pa.int64()), ("messages", pa.string()), ("error", pa.string()),
                        ("sha256", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def _check_parsed_bytes(uri: str, digests: np.ndarray, sha: str) -> None:
    """The bytes parsed (``digests``: the parse UDFs' ``sha256`` column) are the bytes hashed first (``sha``,
    what the job records as its data's sha256, provenance and fingerprint). A file rewritten between the
    two reads fails: its job would record a digest of bytes it never trained on. (A file with no row left
    fails anyway, on the bytes parsed: ``_check_and_split``.)"""
    if len(digests) and {d for d in digests if d is not None} != {sha}:
        raise DatasetError(f"dataset {uri} changed while it was read (its bytes were hashed, then parsed, and "
                           "they differ): submit again once it is no longer being written")


def _tokenize(batch: dict[str, np.ndarray], tokenizer_path: str, max_seq_len: int, seed: int) -> pa.Table:
    """UDF: chat template + tokenize + mask; a row the template refuses or that keeps no assistant token
    becomes a bad row here."""
    tok = load_tokenizer(tokenizer_path)
    out: dict[str, list[Any]] = {name: [] for name in _TOKENIZED.names}
    out["sha256"] = list(batch["sha256"]) if "sha256" in batch else [None] * len(batch["line"])  # passed on
    for line, messages, error in zip(batch["line"], batch["messages"], batch["error"]):
        enc: dict[str, Any] = {"input_ids": [], "labels": [], "truncated": False}
        if error is None:
            try:
                enc = encode_messages(json.loads(messages), tok, max_seq_len)
            except RowError as e:
                error = str(e)
            if error is None and all(label < 0 for label in enc["labels"]):
                error = f"no assistant token within max_seq_len={max_seq_len} (the prompt is too long)"
                enc = {"input_ids": [], "labels": [], "truncated": True}
        out["line"].append(int(line))
        out["error"].append(error)
        out["score"].append(split_score(messages, seed) if error is None else 1.0)
        out["truncated"].append(enc["truncated"])
        out["num_tokens"].append(len(enc["input_ids"]))
        out["input_ids"].append(enc["input_ids"])
        out["labels"].append(enc["labels"])
    return pa.Table.from_pydict(out, schema=_TOKENIZED)


def _eval_mask(score: np.ndarray, eval_fraction: float, forced_eval: float, forced_train: float) -> np.ndarray:
    """The split rule, shared by the driver (stats) and the workers (rows). A row's side follows from its
    score alone, so identical rows (one score) always share a side; a forced score (NaN: none) moves
    every row that has it."""
    return ((score < eval_fraction) | (score == forced_eval)) & (score != forced_train)


def _select(batch: pa.Table, want_eval: bool, eval_fraction: float, forced_eval: float,
            forced_train: float) -> pa.Table:
    """UDF: the rows of one split, with only the columns the trainer reads."""
    ok = batch["error"].is_null().to_numpy(zero_copy_only=False)
    is_eval = _eval_mask(batch["score"].to_numpy(), eval_fraction, forced_eval, forced_train)
    keep = ok & (is_eval if want_eval else ~is_eval)
    return batch.filter(pa.array(keep)).select(_SPLIT.names).cast(_SPLIT)


def _summary(ds: ray.data.Dataset) -> dict[str, np.ndarray]:
    """The small per-row columns, pulled to the driver for the bad-row check, split and stats."""
    cols = ["line", "error", "score", "truncated", "num_tokens", "sha256"]
    tables = list(ds.select_columns(cols).iter_batches(batch_size=None, batch_format="pyarrow"))
    table = pa.concat_tables(tables) if tables else _TOKENIZED.empty_table().select(cols)
    return {c: table[c].to_numpy(zero_copy_only=False) for c in cols}


def _forced(s: dict[str, np.ndarray], eval_fraction: float) -> tuple[float, float]:
    """The scores whose rows move across the split (NaN: none) so that eval has ≥ 1 row when the usable
    rows are not all one row repeated (and eval_fraction > 0) and train has ≥ 1: the lowest score to eval,
    the highest to train. Every row with the score moves, not one line: identical rows share a score, and
    one of them left behind would put the same row in train and eval. Order-independent."""
    ok = np.array([e is None for e in s["error"]], dtype=bool)
    score = s["score"][ok]
    forced_eval = forced_train = float("nan")
    if eval_fraction > 0 and not (score < eval_fraction).any() and len(np.unique(score)) >= 2:
        forced_eval = float(score.min())  # another score stays: train keeps a row
    if len(score) and _eval_mask(score, eval_fraction, forced_eval, forced_train).all():
        forced_train = float(score.max())  # every row is eval: the top score's rows train (one row repeated: all)
    return forced_eval, forced_train


def _bad_list(bad: list[tuple[int, str]]) -> str:
    shown = "; ".join(f"line {line}: {error}" for line, error in bad[:SHOWN_IN_ERRORS])
    return shown + (f"; ... ({len(bad) - SHOWN_IN_ERRORS} more)" if len(bad) > SHOWN_IN_ERRORS else "")


def _within(timeout_s: float, uri: str, work: Callable[[], T]) -> T:
    """Run ``work`` in a daemon thread and give up after ``timeout_s``: a Ray Data execution that cannot
    get resources waits forever, and a stuck job must fail, not hang the factory."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = work()
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            result["error"] = e

    thread = threading.Thread(target=target, name=f"prepare-dataset:{uri}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise DatasetError(f"preparing dataset {uri} did not finish within {timeout_s:g} s; the Ray cluster "
                           "may have no free CPU for the data tasks (check `ray status`)")
    if "error" in result:
        error = result["error"]
        if isinstance(error, DatasetError):
            raise error
        raise DatasetError(f"preparing dataset {uri} failed: {plain_message(error)}") from error
    return result["value"]


def _rows_fingerprint(scores: np.ndarray, num_tokens: np.ndarray) -> str:
    """The identity of a set of rows, whatever their order: each row's split score (a hash of its
    messages and the split seed) with its token count (after truncation), sorted."""
    pairs = sorted(zip(scores.tolist(), num_tokens.tolist()))
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:32]


def _check_and_split(uri: str, s: dict[str, np.ndarray], sha: str, eval_fraction: float,
                     max_bad_row_fraction: float) -> tuple[DataStats, tuple[float, float], np.ndarray, np.ndarray]:
    """A tokenized file's rows (``_summary``'s columns) checked against the bad-row limit and split:
    (stats, (forced eval score, forced train score), train mask, eval mask). Raises DatasetError."""
    bad = sorted((int(line), str(err)) for line, err in zip(s["line"], s["error"]) if err is not None)
    total = len(s["line"])
    if total == 0:
        raise DatasetError(f"dataset {uri} holds no rows (an empty file, only blank lines, an empty JSON array "
                           "or a Parquet file of no rows)")
    if len(bad) == total:
        raise DatasetError(f"dataset {uri}: none of its {total} rows is usable; {_bad_list(bad)}")
    if len(bad) / total > max_bad_row_fraction:
        raise DatasetError(
            f"dataset {uri}: {len(bad)} of {total} rows ({len(bad) / total:.1%}) are bad, more than "
            f"train.max_bad_row_fraction={max_bad_row_fraction:g} allows; {_bad_list(bad)}. "
            "Fix those rows or raise train.max_bad_row_fraction."
        )
    forced_eval, forced_train = _forced(s, eval_fraction)
    ok = np.array([e is None for e in s["error"]], dtype=bool)
    is_eval = _eval_mask(s["score"], eval_fraction, forced_eval, forced_train)
    train_mask, eval_mask = ok & ~is_eval, ok & is_eval
    stats = DataStats(
        total_rows=total, bad_rows=len(bad), bad_examples=bad[:MAX_BAD_EXAMPLES],
        train_rows=int(train_mask.sum()), eval_rows=int(eval_mask.sum()),
        truncated_rows=int((s["truncated"] & ok).sum()),
        train_tokens=int(s["num_tokens"][train_mask].sum()), sha256=sha,
        eval_sha256=_rows_fingerprint(s["score"][eval_mask], s["num_tokens"][eval_mask]),
    )
    return stats, (forced_eval, forced_train), train_mask, eval_mask


def prepare_dataset(uri: str, tokenizer_path: str, *, max_seq_len: int, eval_fraction: float, seed: int,
                    max_bad_row_fraction: float, timeout_s: float = 300) -> PreparedData:
    """Read, validate, template, tokenize and split one tenant's dataset (JSONL or Parquet, local or S3).

    Raises DatasetError for a missing, unreadable or empty file, when no usable row is left, when the share
    of bad rows exceeds ``max_bad_row_fraction``, or after ``timeout_s``.
    """
    fs, path, fmt = _resolve(uri)

    def work() -> PreparedData:
        sha, _ = _sha256(fs, path, uri)
        tokenized = (
            ray.data.read_binary_files(path, filesystem=fs, num_cpus=UDF_NUM_CPUS)
            .map_batches(_parse_files, batch_size=1, fn_kwargs={"fmt": fmt}, num_cpus=UDF_NUM_CPUS)
            .repartition(target_num_rows_per_block=ROWS_PER_BLOCK)
            .map_batches(_tokenize, batch_size=ROWS_PER_BLOCK, num_cpus=UDF_NUM_CPUS, fn_kwargs={
                "tokenizer_path": tokenizer_path, "max_seq_len": max_seq_len, "seed": seed})
            .materialize()
        )
        s = _summary(tokenized)
        _check_parsed_bytes(uri, s["sha256"], sha)
        stats, (forced_eval, forced_train), _, _ = _check_and_split(uri, s, sha, eval_fraction, max_bad_row_fraction)
        kwargs = {"eval_fraction": eval_fraction, "forced_eval": forced_eval, "forced_train": forced_train}
        splits = {
            want_eval: tokenized.map_batches(_select, batch_format="pyarrow", num_cpus=UDF_NUM_CPUS,
                                             fn_kwargs={"want_eval": want_eval, **kwargs}).materialize()
            for want_eval in (False, True)
        }
        return PreparedData(train=splits[False], eval=splits[True], stats=stats)

    return _within(timeout_s, uri, work)


# -- many files in one Ray Data execution (the factory's data stage) ------------------------------------
# The factory prepares the next groups' data while resident trainers hold the cluster's CPUs, so these
# short tasks reserve none: a reservation would wait for a trainer to end. A window of files is one
# execution (one task set, ~0.3 s of overhead), not one per file.
DATA_TASK_NUM_CPUS = 0
MAX_READ_BLOCKS = 4
# A Ray Data execution's start costs seconds before its first row: ~7 s for a trivial one on a fresh
# 2-CPU cluster, ~14 s for this one (its task workers start and import the tokenizer) while trainers load
# their bases. The factory's first window is what the first training step waits for, so ``prepare_many``
# may run a small set of files (``in_process_bytes``) through the same UDFs in the calling process.
FIRST_WINDOW_IN_PROCESS_BYTES = env().first_window_in_process_bytes  # 0: never
# later windows, which the trainers do not wait for, up to this size too: an execution's start takes the
# CPUs of the trainers training meanwhile (0: always Ray Data)
WINDOW_IN_PROCESS_BYTES = env().window_in_process_bytes
# such a (first) window goes to a warm trainer already leased, when there is one (jobs/factory.py); 0: never
FIRST_WINDOW_ON_TRAINER = env().first_window_on_trainer
_TAGGED = pa.schema([("req", pa.int64()), ("line", pa.int64()), ("messages", pa.string()), ("error", pa.string()),
                     ("sha256", pa.string())])


@dataclass(frozen=True)
class DataRequest:
    """One job's dataset and how to prepare it."""

    key: str  # the caller's name for it (a job id)
    uri: str
    max_seq_len: int
    eval_fraction: float
    seed: int
    max_bad_row_fraction: float


@dataclass
class PreparedRows:
    """A job's tokenized rows, split: each {"input_ids", "labels"} (int32 arrays), in file order."""

    train: list[dict[str, np.ndarray]]
    eval: list[dict[str, np.ndarray]]
    stats: DataStats


def _parse_tagged(batch: dict[str, np.ndarray], wanted: dict[str, list[tuple[int, str]]]) -> pa.Table:
    """UDF: whole files → one row per record for every request that names the file, tagged with the
    request; a file that cannot be parsed at all becomes one error row at line 0 of each request. Each
    request's first row carries the sha256 of the bytes parsed."""
    rows: list[dict[str, Any]] = []
    for data, path in zip(batch["bytes"], batch["path"]):
        digest = hashlib.sha256(data).hexdigest()
        for req, fmt in wanted[str(path)]:
            parse = PARSERS[fmt]
            try:
                parsed = [{"req": req, **entry} for entry in parse(data)]
            except Exception as e:  # noqa: BLE001 - this request fails, the window's others go on
                parsed = [{"req": req, "line": 0, "messages": None,
                           "error": f"cannot read the file: {type(e).__name__}: {e}"}]
            rows += _with_digest(parsed, digest)
    return pa.Table.from_pylist(rows, schema=_TAGGED)


def _tokenize_tagged(batch: pa.Table, tokenizer_path: str, params: dict[int, tuple[int, int]]) -> pa.Table:
    """UDF: ``_tokenize`` with each row's request's ``max_seq_len`` and split seed."""
    reqs = batch["req"].to_numpy()
    out = []
    for req in sorted(set(reqs.tolist())):
        part = batch.filter(pa.array(reqs == req))
        max_seq_len, seed = params[req]
        cols = {c: part[c].to_numpy(zero_copy_only=False) for c in ("line", "messages", "error", "sha256")}
        table = _tokenize(cols, tokenizer_path, max_seq_len, seed)
        out.append(table.append_column("req", pa.array([req] * table.num_rows, pa.int64())))
    return pa.concat_tables(out) if out else _TOKENIZED.empty_table().append_column("req", pa.array([], pa.int64()))


def _rows(cols: dict[str, np.ndarray], mask: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [{"input_ids": np.asarray(i, dtype=np.int32), "labels": np.asarray(lab, dtype=np.int32)}
            for i, lab in zip(cols["input_ids"][mask], cols["labels"][mask])]


def local_bytes(requests: list[DataRequest]) -> int | None:
    """The bytes of ``requests``' files when every one is a local file that exists, else None (an S3 or
    missing file: the caller's own preparation reads and reports it)."""
    total = 0
    for r in requests:
        if r.uri.startswith("s3://"):
            return None
        try:
            total += os.path.getsize(_resolve(r.uri)[1])
        except (DatasetError, OSError):
            return None
    return total


def prepare_many(requests: list[DataRequest], tokenizer_path: str, timeout_s: float = 300,
                 in_process_bytes: int = 0, runs: dict[str, int] | None = None
                 ) -> dict[str, PreparedRows | DatasetError]:
    """Read, validate, template, tokenize and split several jobs' datasets in one Ray Data execution per
    filesystem. Each job gets its own rows and stats, or its own DatasetError (a missing file, a bad
    share of bad rows, ...): one job's data never affects another's. Same checks as
    ``prepare_dataset``; a file named by several jobs is read once. A filesystem's files that total at
    most ``in_process_bytes`` go through the same UDFs in this process instead (no execution to start).
    ``runs``, if given, counts the runs made by kind (``"ray_data"``, ``"in_process"``), retries included."""
    out: dict[str, PreparedRows | DatasetError] = {}
    by_fs: dict[str, tuple[pafs.FileSystem, dict[str, list[tuple[int, str]]]]] = {}
    sha: dict[int, str] = {}
    size: dict[str, int] = {}
    for i, r in enumerate(requests):
        try:
            fs, path, fmt = _resolve(r.uri)
            sha[i], size[path] = _sha256(fs, path, r.uri)
        except DatasetError as e:
            out[r.key] = e
            continue
        kind = "s3" if r.uri.startswith("s3://") else "local"
        by_fs.setdefault(kind, (fs, {}))[1].setdefault(path, []).append((i, fmt))
    for fs, wanted in by_fs.values():
        run = _run_tagged_here if sum(size[p] for p in wanted) <= in_process_bytes else _run_tagged
        kind = "in_process" if run is _run_tagged_here else "ray_data"
        if runs is not None:
            runs[kind] = runs.get(kind, 0) + 1
        try:
            _collect(_run_files(fs, wanted, requests, tokenizer_path, run, timeout_s), wanted, requests, sha, out)
        except DatasetError as e:
            if len(wanted) == 1:
                _fail_all(wanted, requests, e, out)
                continue
            # one file (or the execution) failed the whole execution: each file again alone, so that only
            # the jobs of a file that fails by itself fail, each with its own message
            log.warning("preparing %d datasets together failed (%s); each file again alone", len(wanted), e)
            for path, reqs in wanted.items():
                one = {path: reqs}
                if runs is not None:
                    runs[kind] += 1
                try:
                    _collect(_run_files(fs, one, requests, tokenizer_path, run, timeout_s), one, requests, sha, out)
                except DatasetError as alone:
                    _fail_all(one, requests, alone, out)
    return out


def _run_files(fs: pafs.FileSystem, wanted: dict[str, list[tuple[int, str]]], requests: list[DataRequest],
               tokenizer_path: str, run: Callable[..., pa.Table], timeout_s: float) -> pa.Table:
    todo = [i for reqs in wanted.values() for i, _ in reqs]
    label = requests[todo[0]].uri if len(wanted) == 1 else f"{len(wanted)} files"
    return _within(timeout_s, label, lambda: run(fs, wanted, requests, tokenizer_path))


def _fail_all(wanted: dict[str, list[tuple[int, str]]], requests: list[DataRequest], e: DatasetError,
              out: dict[str, PreparedRows | DatasetError]) -> None:
    """Every job of ``wanted``'s files fails with ``e``: its text names those files only, and nothing of
    Ray's wrapper (a worker's pid, IP or paths: ``plain_message``)."""
    for reqs in wanted.values():
        for i, _ in reqs:
            out[requests[i].key] = e


def _collect(table: pa.Table, wanted: dict[str, list[tuple[int, str]]], requests: list[DataRequest],
             sha: dict[int, str], out: dict[str, PreparedRows | DatasetError]) -> None:
    """Each request's rows of ``table`` checked and split into ``out`` (or its own DatasetError)."""
    reqs = table["req"].to_numpy()
    for i in [i for rs in wanted.values() for i, _ in rs]:
        r = requests[i]
        part = table.filter(pa.array(reqs == i))
        cols = {c: part[c].to_numpy(zero_copy_only=False) for c in part.column_names}
        order = np.argsort(cols["line"], kind="stable")
        cols = {c: v[order] for c, v in cols.items()}
        unreadable = [str(e) for line, e in zip(cols["line"], cols["error"]) if line == 0 and e is not None]
        try:
            _check_parsed_bytes(r.uri, cols["sha256"], sha[i])  # first: a file half rewritten may not parse
            if unreadable:
                raise DatasetError(f"dataset {r.uri}: {unreadable[0]}")
            stats, _, train_mask, eval_mask = _check_and_split(r.uri, cols, sha[i], r.eval_fraction,
                                                               r.max_bad_row_fraction)
        except DatasetError as e:
            out[r.key] = e
            continue
        out[r.key] = PreparedRows(_rows(cols, train_mask), _rows(cols, eval_mask), stats)


def _params(wanted: dict[str, list[tuple[int, str]]], requests: list[DataRequest]) -> dict[int, tuple[int, int]]:
    return {i: (requests[i].max_seq_len, requests[i].seed) for reqs in wanted.values() for i, _ in reqs}


def _tagged_table(tables: list[pa.Table]) -> pa.Table:
    schema = _TOKENIZED.append(pa.field("req", pa.int64()))
    return pa.concat_tables([t.select(schema.names).cast(schema) for t in tables]) if tables \
        else schema.empty_table()


def _run_tagged_here(fs: pafs.FileSystem, wanted: dict[str, list[tuple[int, str]]], requests: list[DataRequest],
                     tokenizer_path: str) -> pa.Table:
    """``_run_tagged``'s UDFs on the same blocks (one file per parse, ROWS_PER_BLOCK rows per tokenize),
    in this process."""
    params, tables = _params(wanted, requests), []
    for path in wanted:
        try:
            with fs.open_input_stream(path) as f:
                data = f.read()
        except OSError as e:
            raise DatasetError(f"cannot read {path}: {e}") from e
        parsed = _parse_tagged({"bytes": np.array([data], dtype=object), "path": np.array([path], dtype=object)},
                               wanted)
        for start in range(0, parsed.num_rows, ROWS_PER_BLOCK):
            tables.append(_tokenize_tagged(parsed.slice(start, ROWS_PER_BLOCK), tokenizer_path, params))
    return _tagged_table(tables)


def _run_tagged(fs: pafs.FileSystem, wanted: dict[str, list[tuple[int, str]]], requests: list[DataRequest],
                tokenizer_path: str) -> pa.Table:
    paths = list(wanted)
    params = _params(wanted, requests)
    ds = (ray.data.read_binary_files(paths, filesystem=fs, include_paths=True, num_cpus=DATA_TASK_NUM_CPUS,
                                     override_num_blocks=min(len(paths), MAX_READ_BLOCKS))
          .map_batches(_parse_tagged, batch_size=1, fn_kwargs={"wanted": wanted}, num_cpus=DATA_TASK_NUM_CPUS)
          .map_batches(_tokenize_tagged, batch_size=ROWS_PER_BLOCK, batch_format="pyarrow",
                       num_cpus=DATA_TASK_NUM_CPUS, fn_kwargs={"tokenizer_path": tokenizer_path, "params": params}))
    return _tagged_table(list(ds.iter_batches(batch_size=None, batch_format="pyarrow")))
