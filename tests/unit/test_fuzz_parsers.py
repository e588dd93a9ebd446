"""Property-based fuzzing (hypothesis) of the parsers that take tenants' input: the batch spec and the
dataset rows. Whatever the input, they answer with their own clear error (SpecError, a per-row error
message) and never crash with another exception; what they accept is well formed."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterfab.pipelines.rows import ROLES, RowError, parse_jsonl, parse_record
from adapterfab.spec import SpecError, parse_spec

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30)
# keys a spec really has, so the fuzzer gets past the first level often
spec_keys = st.sampled_from(["version", "name", "base_model", "promote", "promotion", "defaults", "resources",
                             "tenants", "tenant", "persona", "dataset", "method", "train", "r", "steps",
                             "batch_size", "device_memory_gb", "workers_per_job", "zero_stage", "x"])
spec_like = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) | st.text(max_size=30)
    | st.sampled_from(["lora", "qlora", "lora_xs", "a.jsonl", "s3://b/k.jsonl", "../x.jsonl", "auto", 1]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(spec_keys, inner, max_size=6), max_leaves=40)


@FUZZ
@given(spec_like)
def test_spec_parser_answers_with_spec_errors_only(data: object) -> None:
    try:
        spec, jobs = parse_spec(data if isinstance(data, dict) else {"version": 1, "tenants": data})
    except SpecError as e:
        assert e.problems and all(isinstance(f, str) and isinstance(m, str) and m for f, m in e.problems)
        return
    assert spec.tenants and len(jobs) == len(spec.tenants)


@FUZZ
@given(st.text(max_size=400))
def test_spec_text_parser_answers_with_spec_errors_only(text: str) -> None:
    with pytest.raises(SpecError):
        parse_spec(text)  # no text without tenants is a valid spec


# rows near the two accepted forms, so the fuzzer also walks the accepting paths
good = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30).filter(str.strip)
texts = st.one_of(good, good, good, st.text(max_size=30), st.none(), st.integers())
alpaca_rows = st.fixed_dictionaries({"instruction": texts, "output": texts},
                                    optional={"input": texts, "system": texts, "extra": texts})
chat_rows = st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from([*ROLES, *ROLES, *ROLES, "tool", "", "USER"]), "content": texts}),
    min_size=1, max_size=5) | json_values})


@FUZZ
@given(json_values | alpaca_rows | chat_rows)
def test_row_parser_accepts_well_formed_rows_only(obj: object) -> None:
    try:
        messages = parse_record(obj)
    except RowError as e:
        assert str(e)
        return
    assert messages and all(set(m) == {"role", "content"} and m["role"] in ROLES and isinstance(m["content"], str)
                            for m in messages)
    assert any(m["role"] == "assistant" for m in messages)


@FUZZ
@given(st.lists(st.binary(max_size=80) | json_values.map(lambda v: json.dumps(v).encode()), max_size=8))
def test_jsonl_parser_never_crashes_and_keeps_line_numbers(lines: list[bytes]) -> None:
    data = b"\n".join(lines)
    entries = list(parse_jsonl(data))
    numbers = [e["line"] for e in entries]
    assert numbers == sorted(set(numbers)) and all(1 <= n <= data.count(b"\n") + 1 for n in numbers)
    for e in entries:
        assert (e["messages"] is None) != (e["error"] is None)
        if e["messages"] is not None:
            assert json.loads(e["messages"])
