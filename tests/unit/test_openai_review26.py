"""What a review of the OpenAI request layer found (2026-12, review 26): a request's logit_bias and
stop_token_ids had no bound but the body's size, and both cost host work in every step of the batch the
request shares with other tenants (a 49k-entry bias made another tenant's tokens 5x slower); ``echo: null``
(OpenAI's completions take it) was a 400.

No model: the API runs in process over ``test_api_review``'s backend, which records the sampling
parameters it is asked for and answers with ``TextGeneration.generate`` on a stub."""

from __future__ import annotations

import pytest

from adapterfab.serve.openai_models import MAX_TOKEN_ID_ENTRIES
from tests.unit.test_api_review import AUTH, MSGS, api


@pytest.mark.parametrize("path,body", [("/v1/chat/completions", {"messages": MSGS}),
                                       ("/v1/completions", {"prompt": "x"})])
def test_logit_bias_and_stop_token_ids_are_bounded(path: str, body: dict) -> None:
    client, backend = api()
    at_most = {"logit_bias": {str(t): -1.0 for t in range(MAX_TOKEN_ID_ENTRIES)},
               "stop_token_ids": list(range(MAX_TOKEN_ID_ENTRIES))}
    r = client.post(path, headers=AUTH, json={"model": "base", "max_tokens": 2, **body, **at_most})
    assert r.status_code == 200, r.text
    assert len(backend.params[-1].logit_bias) == len(backend.params[-1].stop_token_ids) == MAX_TOKEN_ID_ENTRIES
    asked = len(backend.params)
    for field, value in (("logit_bias", {str(t): -1.0 for t in range(MAX_TOKEN_ID_ENTRIES + 1)}),
                         ("stop_token_ids", list(range(MAX_TOKEN_ID_ENTRIES + 1)))):
        r = client.post(path, headers=AUTH, json={"model": "base", "max_tokens": 2, **body, field: value})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == field and error["type"] == "invalid_request_error", error
    assert len(backend.params) == asked  # refused before any generation


def test_echo_null_is_echo_false() -> None:
    client, backend = api()
    r = client.post("/v1/completions", headers=AUTH, json={"model": "base", "prompt": "PROMPT", "echo": None,
                                                           "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "abcd"  # the stub's two tokens, no prompt in front
    r = client.post("/v1/chat/completions", headers=AUTH, json={"model": "base", "messages": MSGS, "echo": None,
                                                                "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "abcd", r.text



def test_errors_name_the_field_the_client_sent() -> None:
    """Over the operator's cap, a request that sent max_completion_tokens was told about max_tokens, and a bad
    guided_json or guided_regex was reported as response_format."""
    client, _ = api(cap=8)
    for field in ("max_tokens", "max_completion_tokens"):
        r = client.post("/v1/chat/completions", headers=AUTH, json={"model": "base", "messages": MSGS, field: 9})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        assert field in r.json()["error"]["message"]
    # completions take no max_completion_tokens (an ignored extra field): the cap refused max_tokens
    r = client.post("/v1/completions", headers=AUTH, json={"model": "base", "prompt": "x", "max_tokens": 9,
                                                           "max_completion_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    for field, value in (("guided_regex", "(unclosed"), ("guided_json", {"type": "no-such-type"}),
                         ("response_format", {"type": "json_schema",
                                              "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}})):
        r = client.post("/v1/chat/completions", headers=AUTH, json={"model": "base", "messages": MSGS, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
