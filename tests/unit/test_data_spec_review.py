"""What a review of the spec and the data stage found (2026-12-07): a dataset's format decided from one
name by the spec and from another by the data stage, and a forced split that put one row on both sides.
No Ray is started here: the data stage's split is tested on the columns it decides from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from adapterfab.errors import DatasetError, SpecError
from adapterfab.pipelines import data
from adapterfab.pipelines.local import encode_file
from adapterfab.spec import dataset_format, parse_spec
from adapterfab.spec_checks import check_semantics

ROW = json.dumps({"instruction": "hi", "output": "yo"})


def _spec(dataset: str) -> dict:
    return {"version": 1, "name": "n", "tenants": [{"tenant": "acme", "persona": "p", "dataset": dataset}]}


def test_a_dataset_that_links_to_a_blob_with_no_suffix_keeps_its_own_name(tmp_path: Path) -> None:
    """A Hugging Face cache or DVC keeps a file as a suffix-less blob behind a link. The spec took the
    format from the link's name, the job the blob's path, and the data stage then failed on it
    ("unsupported file type '(none)'") after the batch was admitted."""
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "9f2c1e").write_text(ROW + "\n" + ROW.replace("hi", "ho") + "\n")
    (tmp_path / "data").symlink_to(tmp_path)  # a linked folder is followed: only the file's own link is kept
    (tmp_path / "train.jsonl").symlink_to(tmp_path / "blobs" / "9f2c1e")
    spec, jobs = parse_spec(_spec("data/train.jsonl"), root=tmp_path)
    assert jobs[0].dataset == str(tmp_path.resolve() / "train.jsonl")
    check_semantics(spec, jobs, data_roots=(str(tmp_path),))
    assert data._resolve(jobs[0].dataset)[1:] == (jobs[0].dataset, "jsonl")
    # where the roots are checked, the link is followed: a link to a file outside them is outside
    with pytest.raises(SpecError, match="outside the allowed data roots"):
        check_semantics(spec, jobs, data_roots=(str(tmp_path / "elsewhere"),))


def test_one_rule_decides_a_datasets_format_for_the_spec_the_data_stage_and_the_local_reader(
        tmp_path: Path) -> None:
    """A file named only `.jsonl` passed the spec (its name ends in .jsonl), failed the data stage
    (os.path.splitext gives a hidden file no suffix) and was read as JSONL by the local reader."""
    for name, fmt in (("a.JSONL", "jsonl"), ("s3://b/x/y.pq", "parquet"), ("x.tar.json", "json"),
                      (".jsonl", None), ("dir/.parquet", None), ("x.csv", None), ("jsonl", None)):
        assert dataset_format(name) == fmt, name
    (tmp_path / ".jsonl").write_text(ROW + "\n")
    with pytest.raises(SpecError, match=r"must end in one of \.jsonl.* after a file name") as e:
        parse_spec(_spec(".jsonl"), root=tmp_path)
    assert [f for f, _ in e.value.problems] == ["tenants.0.dataset"]
    with pytest.raises(DatasetError, match="after a file name"):
        data._resolve(str(tmp_path / ".jsonl"))
    with pytest.raises(DatasetError, match="after a file name"):
        encode_file(tmp_path / ".jsonl", tokenizer=None, max_seq_len=64)


def _summary(scores: list[float]) -> dict[str, np.ndarray]:
    """``_summary``'s columns for usable rows with these split scores (one score per distinct row)."""
    n = len(scores)
    return {"line": np.arange(1, n + 1), "error": np.array([None] * n, dtype=object),
            "score": np.array(scores, dtype=np.float64), "truncated": np.zeros(n, dtype=bool),
            "num_tokens": np.full(n, 10)}


def _split(scores: list[float], eval_fraction: float) -> tuple[list[float], list[float]]:
    s = _summary(scores)
    stats, forced, train, ev = data._check_and_split("d.jsonl", s, "sha", eval_fraction, 0.1)
    assert (stats.train_rows, stats.eval_rows) == (int(train.sum()), int(ev.sum()))
    # the workers' rule (prepare_dataset's _select) picks the same rows as the driver's masks
    table = pa.table({"line": s["line"], "error": pa.array([None] * len(scores), pa.string()), "score": s["score"],
                      "input_ids": [[int(x * 1e6)] for x in scores], "labels": [[1]] * len(scores)})
    for want_eval, mask in ((False, train), (True, ev)):
        picked = data._select(table, want_eval, eval_fraction, *forced)["input_ids"].to_pylist()
        assert picked == [[int(x * 1e6)] for x in s["score"][mask]]
    return sorted(s["score"][train].tolist()), sorted(s["score"][ev].tolist())


def test_identical_rows_never_land_on_both_sides_of_a_forced_split() -> None:
    """When no row scored into eval, the lowest-scored line was moved there, and a copy of that row
    elsewhere in the file stayed in train: eval measured a row the adapter trained on."""
    a, b, c, d = 0.159, 0.504, 0.66, 0.912
    assert _split([a, b, a, c, d], 0.1) == ([b, c, d], [a, a])  # no row under 0.1: a's copies all go to eval
    assert _split([a, b, d, d], 0.95) == ([d, d], [a, b])  # every row eval: d's copies all go to train
    assert _split([a] * 10, 0.2) == ([a] * 10, [])  # one row repeated, all eval: it trains, eval holds none
    assert _split([d] * 10, 0.2) == ([d] * 10, [])  # one row repeated, none eval: no eval to force
    assert _split([a, b], 0.0) == ([a, b], [])  # eval_fraction 0 forces nothing
    rng = np.random.default_rng(0)
    for _ in range(300):
        distinct = rng.random(int(rng.integers(1, 5)))
        scores = rng.choice(distinct, size=int(rng.integers(1, 12))).tolist()
        fraction = float(rng.choice([0.0, 0.05, 0.3, 0.9, 0.999]))
        train, ev = _split(scores, fraction)
        assert not set(train) & set(ev), (scores, fraction)
        assert train, (scores, fraction)
        assert ev or fraction == 0 or len(set(scores)) == 1, (scores, fraction)
