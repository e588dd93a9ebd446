"""The data stage on a real local Ray cluster (2 CPUs): stats, split, errors, Parquet, S3, tenants."""

from __future__ import annotations

import functools
import hashlib
import json
import random
import time
from pathlib import Path

import pytest

from adapterfab.errors import DatasetError

pytestmark = [pytest.mark.ray]

BROKEN = {5: b"{not json", 12: b'{"instruction": "caf\xff", "output": "x"}',
          20: json.dumps({"messages": [{"role": "robot", "content": "x"},
                                       {"role": "assistant", "content": "y"}]}).encode()}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # address="local": never join a cluster someone else started on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _good(tag: str, i: int) -> dict:
    if i % 2:
        return {"instruction": f"[{tag}] question {i}?", "output": f"[{tag}] answer {i}."}
    return {"messages": [{"role": "user", "content": f"[{tag}] hello {i}"},
                         {"role": "assistant", "content": f"[{tag}] reply {i}"}]}


def _write_jsonl(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _good_lines(tag: str, n: int, broken: dict[int, bytes] | None = None) -> list[bytes]:
    """n good rows, a blank line 2, and ``broken`` lines at those 1-based line numbers."""
    lines = [json.dumps(_good(tag, i)).encode() for i in range(n)]
    lines.insert(1, b"")
    for number in sorted(broken or {}):
        assert number <= len(lines) + 1, "not enough good rows before this line"
        lines.insert(number - 1, broken[number])
    return lines


def _prepare(uri: Path | str, tok: str, **overrides):
    from adapterfab.pipelines.data import prepare_dataset

    kwargs = dict(max_seq_len=256, eval_fraction=0.2, seed=3, max_bad_row_fraction=0.1, timeout_s=120)
    return prepare_dataset(str(uri), tok, **{**kwargs, **overrides})


def _rows(ds) -> list[tuple[int, ...]]:
    return sorted(tuple(r["input_ids"]) for r in ds.take_all())


def _texts(ds, tok_path: str) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_path)
    return [tok.decode(r["input_ids"]) for r in ds.take_all()]


@pytest.mark.timeout(240)
def test_jsonl_stats_split_and_batches(ray_local, tmp_path: Path, smollm2_path: str) -> None:
    from adapterfab.pipelines.data import PadCollate
    from adapterfab.pipelines.rows import padded_batch

    lines = _good_lines("a", 40, BROKEN)
    path = _write_jsonl(tmp_path / "a.jsonl", lines)
    first = _prepare(path, smollm2_path)
    s = first.stats
    assert (s.total_rows, s.bad_rows) == (43, 3)
    assert [line for line, _ in s.bad_examples] == [5, 12, 20]
    assert "invalid JSON" in s.bad_examples[0][1] and "UTF-8" in s.bad_examples[1][1]
    assert "unknown role 'robot'" in s.bad_examples[2][1]
    assert s.train_rows + s.eval_rows == 40 and s.eval_rows >= 1 and s.truncated_rows == 0
    assert s.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert json.loads(json.dumps(s.to_dict()))["bad_examples"][0][0] == 5

    train, evals = _rows(first.train), _rows(first.eval)
    assert (len(train), len(evals)) == (s.train_rows, s.eval_rows)
    assert not set(train) & set(evals)
    assert s.train_tokens == sum(len(r) for r in train)

    # same file again, and the same rows in another order: the same split
    again = _prepare(path, smollm2_path)
    assert (_rows(again.train), _rows(again.eval)) == (train, evals)
    good = [x for x in lines if x and x not in BROKEN.values()]
    random.Random(0).shuffle(good)
    shuffled = _prepare(_write_jsonl(tmp_path / "shuffled.jsonl", good), smollm2_path)
    assert (_rows(shuffled.train), _rows(shuffled.eval)) == (train, evals)

    # what the trainer does with a shard: variable-length rows padded by the collate function
    for collate in (PadCollate(pad_id=2), functools.partial(padded_batch, pad_id=2)):
        batches = list(first.train.iter_torch_batches(batch_size=8, collate_fn=collate))
        assert sum(b["input_ids"].shape[0] for b in batches) == s.train_rows
        b = batches[0]
        assert b["labels"].shape == b["input_ids"].shape == b["attention_mask"].shape
        assert ((b["labels"] != -100).sum(dim=1) > 0).all()


@pytest.mark.timeout(120)
def test_too_many_bad_rows_names_lines(ray_local, tmp_path: Path, smollm2_path: str) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", _good_lines("b", 17, BROKEN))
    with pytest.raises(DatasetError) as err:
        _prepare(path, smollm2_path, max_bad_row_fraction=0.1)
    msg = str(err.value)
    assert "bad.jsonl" in msg and "3 of 20 rows (15.0%)" in msg
    assert "line 5:" in msg and "line 12:" in msg and "line 20:" in msg
    assert "train.max_bad_row_fraction" in msg
    ok = _prepare(path, smollm2_path, max_bad_row_fraction=0.15)
    assert ok.stats.bad_rows == 3


@pytest.mark.timeout(120)
def test_unusable_files(ray_local, tmp_path: Path, smollm2_path: str) -> None:
    cases = {
        tmp_path / "missing.jsonl": "not found",
        _write_jsonl(tmp_path / "empty.jsonl", []): "holds no rows",
        tmp_path / "data.csv": "unsupported file type '.csv'",
        _write_jsonl(tmp_path / "allbad.jsonl", [b"[1]", b"{}"]): "none of its 2 rows is usable",
    }
    (tmp_path / "zero.jsonl").write_bytes(b"")
    cases[tmp_path / "zero.jsonl"] = "is empty"
    for path, fragment in cases.items():
        with pytest.raises(DatasetError, match=fragment):
            _prepare(path, smollm2_path, max_bad_row_fraction=1.0)


@pytest.mark.timeout(120)
def test_split_edges_and_truncation(ray_local, tmp_path: Path, smollm2_path: str) -> None:
    two = _write_jsonl(tmp_path / "two.jsonl", _good_lines("t", 2))
    tiny = _prepare(two, smollm2_path, eval_fraction=0.01)
    assert (tiny.stats.train_rows, tiny.stats.eval_rows) == (1, 1)
    everything = _prepare(two, smollm2_path, eval_fraction=1.0)
    assert (everything.stats.train_rows, everything.stats.eval_rows) == (1, 1)
    none = _prepare(two, smollm2_path, eval_fraction=0.0)
    assert (none.stats.train_rows, none.stats.eval_rows) == (2, 0)
    assert none.eval.count() == 0 and list(none.eval.iter_batches()) == []

    # a long reply is cut; a prompt that leaves no assistant token within max_seq_len is a bad row
    rows = [{"instruction": "hi", "output": "word " * 100}, {"instruction": "word " * 100, "output": "ok"},
            {"instruction": "hi", "output": "short"}]
    cut = _prepare(_write_jsonl(tmp_path / "long.jsonl", [json.dumps(r).encode() for r in rows]),
                   smollm2_path, max_seq_len=48, max_bad_row_fraction=0.5, eval_fraction=0.0)
    assert (cut.stats.bad_rows, cut.stats.truncated_rows, cut.stats.train_rows) == (1, 1, 2)
    assert cut.stats.bad_examples[0][0] == 2 and "max_seq_len=48" in cut.stats.bad_examples[0][1]
    assert max(len(r["input_ids"]) for r in cut.train.take_all()) == 48


@pytest.mark.timeout(120)
def test_parquet(ray_local, tmp_path: Path, smollm2_path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    chat = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
            for i in range(9)]
    chat.insert(4, chat[0] + [{"role": "user", "content": "and?"}])  # row index 4 → line 5
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"messages": chat}), path, row_group_size=3)
    p = _prepare(path, smollm2_path, max_bad_row_fraction=0.2)
    assert (p.stats.total_rows, p.stats.bad_rows) == (10, 1)
    assert p.stats.bad_examples == [(5, "last turn must be the assistant's, got 'user'")]
    assert p.stats.train_rows + p.stats.eval_rows == 9

    alpaca = tmp_path / "alpaca.parquet"
    pq.write_table(pa.table({"instruction": ["x", "y", "z"], "input": [None, "ctx", ""],
                             "output": ["1", "2", "3"]}), alpaca)
    a = _prepare(alpaca, smollm2_path, eval_fraction=0.0)
    assert (a.stats.bad_rows, a.stats.train_rows) == (0, 3)
    assert any("y\n\nctx" in t for t in _texts(a.train, smollm2_path))


@pytest.mark.timeout(120)
def test_tenants_do_not_mix(ray_local, tmp_path: Path, smollm2_path: str) -> None:
    a = _prepare(_write_jsonl(tmp_path / "tenant-a.jsonl", _good_lines("tenant-a", 12)), smollm2_path)
    b = _prepare(_write_jsonl(tmp_path / "tenant-b.jsonl", _good_lines("tenant-b", 7)), smollm2_path)
    for prepared, mine, other, n in ((a, "[tenant-a]", "[tenant-b]", 12), (b, "[tenant-b]", "[tenant-a]", 7)):
        texts = _texts(prepared.train, smollm2_path) + _texts(prepared.eval, smollm2_path)
        assert len(texts) == n
        assert all(mine in t and other not in t for t in texts)


@pytest.mark.timeout(120)
def test_s3(ray_local, tmp_path: Path, smollm2_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    from adapterfab.procs import free_port, start_moto, stop_pid

    server = start_moto(tmp_path / "moto", free_port())
    try:
        for k, v in {"ADAPTERFAB_S3_ENDPOINT_URL": server.url, "AWS_ACCESS_KEY_ID": "test",
                     "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        s3 = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1")
        s3.create_bucket(Bucket="tenant-data")
        body = b"\n".join(_good_lines("s3", 6)) + b"\n"
        s3.put_object(Bucket="tenant-data", Key="acme/pirate.jsonl", Body=body)
        p = _prepare("s3://tenant-data/acme/pirate.jsonl", smollm2_path)
        assert p.stats.train_rows + p.stats.eval_rows == 6
        assert p.stats.sha256 == hashlib.sha256(body).hexdigest()
        with pytest.raises(DatasetError, match="not found"):
            _prepare("s3://tenant-data/acme/missing.jsonl", smollm2_path)
    finally:
        stop_pid(server.pid)


@pytest.mark.timeout(30)
def test_timeout_fails_instead_of_hanging() -> None:
    from adapterfab.pipelines.data import _within

    start = time.monotonic()
    with pytest.raises(DatasetError, match="did not finish within 0.5 s"):
        _within(0.5, "x.jsonl", lambda: time.sleep(10))
    assert time.monotonic() - start < 3
    with pytest.raises(DatasetError, match="failed: ZeroDivisionError"):
        _within(5, "x.jsonl", lambda: 1 / 0)
    assert _within(5, "x.jsonl", lambda: 42) == 42


@pytest.mark.timeout(240)
def test_many_datasets_in_process_equal_ray_data(ray_local, tmp_path: Path, smollm2_path: str) -> None:
    """``prepare_many``'s in-process path (the factory's first, small window) gives exactly what its Ray
    Data execution gives: the same rows, splits and stats per job, the same per-job errors, no mixing."""
    from adapterfab.pipelines.data import DataRequest, prepare_many

    parquet = tmp_path / "p.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist([{"messages": json.dumps(_good("pq", i)["messages"])} for i in range(0, 16, 2)]), parquet
    )
    files = {"a": _write_jsonl(tmp_path / "a.jsonl", _good_lines("a", 12)),
             "b": _write_jsonl(tmp_path / "b.jsonl", _good_lines("b", 17, BROKEN)),
             "big": _write_jsonl(tmp_path / "big.jsonl", _good_lines("big", 1200)),  # more than one tokenize block
             "pq": parquet, "gone": tmp_path / "missing.jsonl",
             "junk": _write_jsonl(tmp_path / "junk.jsonl", [b"[1]", b"{}"])}
    reqs = [DataRequest(f"j-{k}", str(p), 96 if k == "b" else 256, 0.2, 3, 0.2) for k, p in files.items()]
    reqs.append(DataRequest("j-a-again", str(files["a"]), 64, 0.5, 7, 0.1))  # one file, two jobs, own settings

    def view(out: dict) -> dict:
        return {k: (type(v).__name__, str(v)) if isinstance(v, Exception) else
                ([r["input_ids"].tolist() for r in v.train], [r["labels"].tolist() for r in v.eval], v.stats)
                for k, v in out.items()}

    in_ray = view(prepare_many(reqs, smollm2_path, timeout_s=180))
    here = view(prepare_many(reqs, smollm2_path, timeout_s=180, in_process_bytes=1 << 30))
    assert here == in_ray
    assert in_ray["j-gone"][0] == "DatasetError" and "not found" in in_ray["j-gone"][1]
    assert "none of its 2 rows is usable" in in_ray["j-junk"][1]
    assert in_ray["j-b"][2].bad_rows == 3 and len(in_ray["j-big"][0]) + len(in_ray["j-big"][1]) == 1200
    assert in_ray["j-a-again"][:2] != in_ray["j-a"][:2]  # its own max_seq_len and split seed
    assert in_ray["j-a"][0] and in_ray["j-a"][0] != in_ray["j-b"][0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("in_process", [False, True], ids=["ray-data", "in-process"])
def test_a_file_gone_before_its_read_fails_only_its_own_jobs(ray_local, tmp_path: Path, smollm2_path: str,
                                                             monkeypatch: pytest.MonkeyPatch, in_process: bool) -> None:
    """Several tenants' datasets go through one execution; one file disappears between its check and its
    read (a tenant rewriting its dataset), which fails the whole execution. Each file is then prepared
    alone: the other tenants' jobs get exactly their rows, and only the gone file's jobs fail, with a
    message naming that file and no other tenant's, and nothing of Ray's worker."""
    from adapterfab.pipelines import data
    from adapterfab.pipelines.data import DataRequest, prepare_many

    files = {k: _write_jsonl(tmp_path / f"{k}.jsonl", _good_lines(k, 10)) for k in ("acme", "globex", "victim")}
    reqs = [DataRequest(f"j-{k}", str(p), 128, 0.2, 3, 0.2) for k, p in files.items()]
    alone = {r.key: prepare_many([r], smollm2_path, timeout_s=180) for r in reqs[:2]}
    real = data._sha256

    def then_gone(fs, path, uri):  # noqa: ANN001, ANN202 - the file is checked, then removed before the read
        out = real(fs, path, uri)
        if path.endswith("victim.jsonl"):
            Path(path).unlink()
        return out

    monkeypatch.setattr(data, "_sha256", then_gone)
    out = prepare_many(reqs, smollm2_path, timeout_s=180, in_process_bytes=(1 << 30) if in_process else 0)
    for k in ("j-acme", "j-globex"):
        got, want = out[k], alone[k][k]
        assert [r["input_ids"].tolist() for r in got.train] == [r["input_ids"].tolist() for r in want.train]
        assert [r["input_ids"].tolist() for r in got.eval] == [r["input_ids"].tolist() for r in want.eval]
    err = out["j-victim"]
    assert isinstance(err, DatasetError) and "victim.jsonl" in str(err), err
    assert not any(s in str(err) for s in ("acme", "globex", "pid=", "ip=", "actor_id", "Traceback")), str(err)
