"""The same row functions without Ray, for benchmarks and tests that train in one process:
read a JSONL file, template/tokenize/mask every good row, and batch it in a seeded order."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable, Iterator

from adapterfab.pipelines.rows import encode_messages, padded_batch, parse_jsonl


def encode_file(path: str | Path, tokenizer: Any, max_seq_len: int) -> list[dict[str, list[int]]]:
    rows = []
    for entry in parse_jsonl(Path(path).read_bytes()):
        if entry["error"] is None:
            enc = encode_messages(json.loads(entry["messages"]), tokenizer, max_seq_len)
            rows.append({"input_ids": enc["input_ids"], "labels": enc["labels"]})
    return rows


def epoch_batches(rows: list[dict], batch_size: int, seed: int, pad_id: int) -> Callable[[int], Iterator[dict]]:
    """``f(epoch)`` yields that epoch's padded batches in a seeded shuffle (what train_adapter takes)."""

    def f(epoch: int) -> Iterator[dict]:
        order = list(range(len(rows)))
        random.Random(seed * 1000 + epoch).shuffle(order)
        for i in range(0, len(order), batch_size):
            chunk = [rows[j] for j in order[i:i + batch_size]]
            yield padded_batch({"input_ids": [r["input_ids"] for r in chunk],
                                "labels": [r["labels"] for r in chunk]}, pad_id)

    return f
