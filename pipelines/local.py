"""The same row functions without Ray, for benchmarks and tests that train in one process:
read a JSONL file, template/tokenize/mask every good row, and batch it in a seeded order."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from adapterfab.pipelines.rows import PARSERS, RowError, dataset_format_of, encode_messages, padded_batch


def encode_file(path: str | Path, tokenizer: Any, max_seq_len: int) -> list[dict[str, list[int]]]:
    """The file's usable rows, as the data stage keeps them (pipelines/data.py): parsed by its suffix (a
    name the spec and the data stage refuse is refused here too, not read as JSONL), and a row the
    template refuses, or that keeps no assistant token within ``max_seq_len``, left out."""
    parse = PARSERS[dataset_format_of(str(path))]
    rows = []
    for entry in parse(Path(path).read_bytes()):
        if entry["error"] is not None:
            continue
        try:
            enc = encode_messages(json.loads(entry["messages"]), tokenizer, max_seq_len)
        except RowError:
            continue
        if any(label >= 0 for label in enc["labels"]):
            rows.append({"input_ids": enc["input_ids"], "labels": enc["labels"]})
    return rows


def split_rows(rows: list[dict], eval_fraction: float, eval_rows: int | None = None) -> tuple[list[dict], list[dict]]:
    """(train, eval): the last ``eval_rows`` rows (default: ``eval_fraction`` of them) held out with every
    copy of them earlier in ``rows`` (eval never scores a row train saw); as the data stage splits: at
    least one eval row when the fraction is above 0 and there are two rows or more (not one row repeated),
    none at a fraction of 0, and at least one train row."""
    if eval_rows is not None:
        n_eval = int(eval_rows)
    else:
        n_eval = 0 if eval_fraction <= 0 or len(rows) < 2 else max(1, int(len(rows) * eval_fraction))
    n_eval = min(n_eval, max(0, len(rows) - 1))
    # a held-out row's copies are held out with it (the data stage's rule: identical rows share a side), or
    # eval would score rows that train saw; fewer rows are held out where their copies would leave no train
    # row, and none when every row is one row repeated
    ids = [_identity(r) for r in rows]
    for n in range(n_eval, 0, -1):
        held = set(ids[-n:])
        train = [r for r, i in zip(rows[:-n], ids) if i not in held]
        if train:
            return train, [r for r, i in zip(rows[:-n], ids) if i in held] + rows[-n:]
    return rows, []


def _identity(row: dict) -> str:
    return json.dumps(row, sort_keys=True, default=lambda v: v.tolist())


def epoch_batches(rows: list[dict], batch_size: int, seed: int, pad_id: int,
                  shuffle: bool = True) -> Callable[[int], Iterator[dict]]:
    """``f(epoch)`` yields that epoch's padded batches in a seeded shuffle (what train_adapter takes);
    ``shuffle=False``: in the rows' order (evaluation)."""

    def f(epoch: int) -> Iterator[dict]:
        order = list(range(len(rows)))
        if shuffle:
            random.Random(seed * 1000 + epoch).shuffle(order)
        for i in range(0, len(order), batch_size):
            chunk = [rows[j] for j in order[i:i + batch_size]]
            yield padded_batch({"input_ids": [r["input_ids"] for r in chunk],
                                "labels": [r["labels"] for r in chunk]}, pad_id)

    return f
