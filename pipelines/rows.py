"""Pure row functions of the data stage: validate, template, tokenize and mask, split, pad.

No Ray here, so every rule about a row is unit-tested without a cluster; ``data.py`` calls these from
Ray Data UDFs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from adapterfab import chat
from adapterfab.chat import IGNORE_INDEX
from adapterfab.errors import DatasetError

ROLES = ("system", "user", "assistant")
ALPACA_KEYS = frozenset({"instruction", "input", "output", "system"})
CHAT_KEYS = frozenset({"messages"})
MESSAGE_KEYS = frozenset({"role", "content"})
_UTF8_BOM = b"\xef\xbb\xbf"
# One row's bytes at most: 8 MiB is far beyond any max_seq_len (131072 tokens is ~1 MiB of text), and
# refusing a longer row before decoding it keeps a hostile 100 MB line from costing more than a scan.
MAX_ROW_BYTES = 8 << 20


class RowError(ValueError):
    """One dataset row is unusable; the message says exactly why (shown to the tenant with its line)."""


def _text(value: Any, where: str, *, required: bool) -> str | None:
    """A content string; empty/whitespace counts as missing so a row never trains on nothing."""
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise RowError(f"{where} must be a string, got {type(value).__name__}")
    try:  # JSON's "\ud800" escapes decode to lone surrogates, which no tokenizer or Arrow column takes
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowError(f"{where} holds an unpaired UTF-16 surrogate at character {e.start}") from None
    if not value.strip():
        if required:
            raise RowError(f"{where} is empty")
        return None
    return value


def _alpaca(obj: Mapping[str, Any]) -> list[dict[str, str]]:
    for key in ("instruction", "output"):
        if key not in obj:
            raise RowError(f"Alpaca row lacks {key!r}")
    instruction = _text(obj["instruction"], "'instruction'", required=True)
    output = _text(obj["output"], "'output'", required=True)
    extra = _text(obj.get("input"), "'input'", required=False)  # "input": "" is common: no input
    system = _text(obj.get("system"), "'system'", required=False)
    user = f"{instruction}\n\n{extra}" if extra else instruction
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _chat(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise RowError("'messages' must be a non-empty list")
    messages = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise RowError(f"{where} must be an object, got {type(msg).__name__}")
        unknown = sorted(set(msg) - MESSAGE_KEYS)
        if unknown:
            raise RowError(f"{where} has unknown keys {unknown} (expected 'role' and 'content')")
        role = msg.get("role")
        if role not in ROLES:
            raise RowError(f"{where} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if role == "system" and i != 0:
            raise RowError(f"{where}: a system turn is only allowed first")
        content = _text(msg.get("content"), f"{where}.content", required=True)
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("conversation has no assistant turn")
    if messages[-1]["role"] != "assistant":
        raise RowError(f"last turn must be the assistant's, got {messages[-1]['role']!r}")
    return messages


def parse_record(obj: Any) -> list[dict[str, str]]:
    """Normalise one row (Alpaca or chat format) to a list of ``{"role", "content"}`` messages."""
    if not isinstance(obj, Mapping):
        raise RowError(f"row must be a JSON object, got {type(obj).__name__}")
    keys = set(obj)
    if keys & CHAT_KEYS and keys & ALPACA_KEYS:
        raise RowError(f"row mixes chat ('messages') and Alpaca keys {sorted(keys & ALPACA_KEYS)}")
    if "messages" in keys:
        if keys - CHAT_KEYS:
            raise RowError(f"unknown keys {sorted(keys - CHAT_KEYS)} (a chat row holds only 'messages')")
        return _chat(obj["messages"])
    unknown = sorted(keys - ALPACA_KEYS)
    if unknown:
        raise RowError(
            f"unknown keys {unknown} (expected 'messages', or 'instruction'/'input'/'output'/'system')"
        )
    return _alpaca(obj)


MAX_ERROR_CHARS = 300  # a bad row's reason quotes the row's own keys and roles: kept short where it is stored


def _entry(line: int, messages: list[dict[str, str]] | None, error: str | None) -> dict[str, Any]:
    dumped = json.dumps(messages, ensure_ascii=False) if messages is not None else None
    if error is not None and len(error) > MAX_ERROR_CHARS:
        error = error[:MAX_ERROR_CHARS] + "..."
    return {"line": line, "messages": dumped, "error": error}


def _without_nulls(value: Any) -> Any:
    """A Parquet row with its nulls dropped at every depth: Parquet gives a struct column one schema,
    so a field that one message has (``name``) is null in every other, which JSONL would not have."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def dataset_format_of(name: str) -> str:
    """``name``'s format (``spec.dataset_format``: the name written decides), for the data stage and the
    local reader alike; DatasetError for a name the spec refuses too."""
    from adapterfab.spec import DATASET_NAME_RULE, dataset_format  # (spec reads no rows: imported when asked)

    fmt = dataset_format(name)
    if fmt is None:
        raise DatasetError(f"dataset {name}: unsupported file type {os.path.splitext(name)[1] or '(none)'!r}; "
                           f"its name {DATASET_NAME_RULE}")
    return fmt


def _without_hint(e: ValueError) -> str:
    """Python's message for an over-long integer, less its advice to the programmer (sys.set_int_max_str_digits),
    which a tenant reading why the row is bad can do nothing with."""
    return str(e).partition("; use sys.")[0]


def parse_jsonl(data: bytes) -> Iterator[dict[str, Any]]:
    """One entry per non-blank line: ``{"line", "messages" (JSON) or None, "error" or None}``.

    Lines are decoded one by one so a bad byte costs one row, not the file.
    """
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # every line would be "invalid UTF-8 at byte offset 0"
        yield _entry(1, None, "the file is UTF-16 (its byte-order mark says so); save it as UTF-8")
        return
    start = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    number = 0
    while start <= len(data):  # not data.split: a line over the limit is never copied
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        number += 1
        begin, start = start, end + 1
        if end - begin > MAX_ROW_BYTES:  # refused unread: not decoded, not parsed
            yield _entry(number, None, f"row is {end - begin:,} bytes, more than the "
                                       f"{MAX_ROW_BYTES:,}-byte limit of one row")
            continue
        raw = data[begin:end]
        if raw.startswith(_UTF8_BOM):  # files joined with `cat`: each one's mark starts its first line
            raw = raw[len(_UTF8_BOM):]
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield _entry(number, None, f"invalid UTF-8 at byte offset {e.start}")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield _entry(number, None, f"invalid JSON: {e.msg} (column {e.colno})")
            continue
        except ValueError as e:  # JSONDecodeError's parent: an integer past Python's 4300-digit limit
            yield _entry(number, None, f"invalid JSON: {_without_hint(e)}")
            continue
        except RecursionError:
            yield _entry(number, None, "invalid JSON: nested too deeply")
            continue
        try:
            yield _entry(number, parse_record(obj), None)
        except RowError as e:
            yield _entry(number, None, str(e))


def _check_row_chars(messages: list[dict[str, str]]) -> None:
    """A row read whole (a JSON array's, a Parquet file's) under the JSONL row limit: a character is at
    least a byte."""
    chars = sum(len(m["content"]) for m in messages)
    if chars > MAX_ROW_BYTES:
        raise RowError(f"row holds {chars:,} characters, more than the {MAX_ROW_BYTES:,}-byte limit of one row")


def parse_json(data: bytes) -> Iterator[dict[str, Any]]:
    """A ``.json`` file: a JSON array of rows (``line`` is the row's index + 1), or, when it does not
    start with ``[``, JSON Lines (:func:`parse_jsonl`). An array that does not parse is one error row."""
    body = data[len(_UTF8_BOM):] if data.startswith(_UTF8_BOM) else data
    if not body.lstrip().startswith(b"["):
        yield from parse_jsonl(data)
        return
    try:
        rows = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:  # the line it is on, and its offset in that line (as parse_jsonl says)
        line_start = body.rfind(b"\n", 0, e.start) + 1
        yield _entry(body.count(b"\n", 0, e.start) + 1, None, f"invalid UTF-8 at byte offset {e.start - line_start}")
        return
    except json.JSONDecodeError as e:
        yield _entry(e.lineno, None, f"not a valid JSON array: {e.msg} (line {e.lineno}, column {e.colno})")
        return
    except ValueError as e:  # JSONDecodeError's parent: an integer past Python's 4300-digit limit
        yield _entry(1, None, f"not a valid JSON array: {_without_hint(e)}")
        return
    except RecursionError:
        yield _entry(1, None, "invalid JSON: nested too deeply")
        return
    if not isinstance(rows, list):  # "[1] x" is not JSON, so a body starting with [ parsed is a list
        yield _entry(1, None, "a .json dataset must be a JSON array of rows or JSON Lines")
        return
    for number, obj in enumerate(rows, 1):
        try:
            messages = parse_record(obj)
            _check_row_chars(messages)
            yield _entry(number, messages, None)
        except RowError as e:
            yield _entry(number, None, str(e))


_PARQUET_BATCH_ROWS = 1024


def _parquet_rows(table: Any) -> Iterator[tuple[int, Any, str | None]]:
    """(index, row, None), or (index, None, why) for a row with a text cell that is not UTF-8 (Parquet
    writers need not check it, and Arrow checks it only here): like a JSON line's bad byte, it costs its
    row, not the file."""
    for start in range(0, table.num_rows, _PARQUET_BATCH_ROWS):
        part = table.slice(start, _PARQUET_BATCH_ROWS)
        try:
            rows = part.to_pylist()
        except UnicodeDecodeError:
            rows = None
        if rows is not None:
            yield from ((start + k, row, None) for k, row in enumerate(rows))
            continue
        for k in range(part.num_rows):  # the batch holds such a cell: row by row, column by column
            one, row, error = part.slice(k, 1), {}, None
            for name in one.column_names:
                try:
                    row[name] = one.column(name).to_pylist()[0]
                except UnicodeDecodeError as e:
                    error = f"column {name!r} holds text that is not UTF-8 ({e.reason} at byte offset {e.start})"
                    break
            yield (start + k, None, error) if error else (start + k, row, None)


def parse_parquet(data: bytes) -> Iterator[dict[str, Any]]:
    """Like :func:`parse_jsonl` for a Parquet file; ``line`` is the row index + 1, nulls count as absent
    (at every depth: a null nested field is one no row of JSONL would carry)."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    for index, row, error in _parquet_rows(table):
        if error is not None:
            yield _entry(index + 1, None, error)
            continue
        try:
            messages = parse_record(_without_nulls(row))
            _check_row_chars(messages)
        except RowError as e:
            yield _entry(index + 1, None, str(e))
        else:
            yield _entry(index + 1, messages, None)


# a format (adapterfab.spec DATASET_FORMATS, by suffix) -> its parser
PARSERS = {"jsonl": parse_jsonl, "json": parse_json, "parquet": parse_parquet}


def encode_messages(messages: Sequence[Mapping[str, str]], tokenizer: Any, max_seq_len: int) -> dict[str, Any]:
    """One conversation chat-templated, tokenized and masked (``adapterfab.chat.encode_messages``), a
    template that refuses it a ``RowError``."""
    try:
        return chat.encode_messages(messages, tokenizer, max_seq_len)
    except chat.TemplateError as e:
        raise RowError(str(e)) from e


def split_score(messages_json: str, seed: int) -> float:
    """A uniform number in [0, 1) from the row's content alone, so the split ignores row order."""
    digest = hashlib.sha256(f"{seed}\x00{messages_json}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_eval_row(messages_json: str, eval_fraction: float, seed: int) -> bool:
    """Deterministic train/eval assignment; identical rows land on the same side (no leakage)."""
    return split_score(messages_json, seed) < eval_fraction


class PaddedBatch(dict):
    """A padded batch (``input_ids``, ``labels``, ``attention_mask`` tensors) that also knows, as plain
    Python ints, each row's length and how many of its next-token positions carry a label: a fused
    step plans its chunks and counts its FLOPs from them without a tensor operation per job."""

    lengths: list[int]
    labelled: list[int]


def padded_batch(rows: Mapping[str, Sequence[Sequence[int]]], pad_id: int) -> PaddedBatch:
    """Right-pad a batch of variable-length rows into tensors (the trainer's ``collate_fn``).

    Accepts what Ray Data hands a collate function (numpy object arrays of arrays) as well as lists.
    """
    import numpy as np
    import torch

    ids, labels = list(rows["input_ids"]), list(rows["labels"])
    if len(ids) != len(labels):
        raise ValueError(f"batch has {len(ids)} input_ids rows but {len(labels)} labels rows")
    width = max((len(r) for r in ids), default=0)
    out_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    out_labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    lengths, labelled = [], []
    for i, (row_ids, row_labels) in enumerate(zip(ids, labels)):
        n = len(row_ids)
        if len(row_labels) != n:
            raise ValueError(f"row {i}: {n} input_ids but {len(row_labels)} labels")
        out_ids[i, :n] = torch.from_numpy(np.asarray(row_ids, dtype=np.int64))
        lab = np.asarray(row_labels, dtype=np.int64)
        out_labels[i, :n] = torch.from_numpy(lab)
        mask[i, :n] = 1
        lengths.append(n)
        labelled.append(int((lab[1:] != IGNORE_INDEX).sum()))
    out = PaddedBatch(input_ids=out_ids, labels=out_labels, attention_mask=mask)
    out.lengths, out.labelled = lengths, labelled
    return out
