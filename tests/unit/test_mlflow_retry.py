"""``mlflow_client.with_retry`` (tenacity underneath): which errors are retried, the backoff, the deadline,
the warning per retry, and ``before_retry`` finding what a lost-response attempt created. The call it
retries is a plain function that fails as an unreachable server does (tests/services/test_mlflow_outage.py
takes a real server away)."""

from __future__ import annotations

import logging
import time

import pytest
import requests

from adapterfab.mlflow_client import with_retry


class Flaky:
    def __init__(self, failures: list[BaseException], result: object = "ok"):
        self.failures, self.result, self.calls = list(failures), result, []

    def __call__(self) -> object:
        self.calls.append(time.monotonic())
        if self.failures:
            raise self.failures.pop(0)
        return self.result


def test_transient_errors_are_retried_with_backoff_and_a_warning_each(caplog: pytest.LogCaptureFixture) -> None:
    fn = Flaky([requests.exceptions.ConnectionError("Connection refused"), TimeoutError("slow"),
                ConnectionResetError("reset")])
    with caplog.at_level(logging.WARNING, logger="adapterfab.mlflow"):
        assert with_retry(fn, "create_run", retry_s=60) == "ok"
    assert len(fn.calls) == 4
    gaps = [b - a for a, b in zip(fn.calls, fn.calls[1:])]
    for gap, base in zip(gaps, (0.5, 1.0, 2.0)):  # 0.5, 1, 2 s, each times 0.5-1.5
        assert 0.5 * base - 0.01 <= gap <= 1.5 * base + 0.25, gaps
    msgs = [r.getMessage() for r in caplog.records]
    assert [m.split(";")[0] for m in msgs] == ["MLflow unreachable (ConnectionError, attempt 1)",
                                              "MLflow unreachable (TimeoutError, attempt 2)",
                                              "MLflow unreachable (ConnectionResetError, attempt 3)"]
    assert all("retrying create_run for up to" in m for m in msgs)


def test_real_errors_and_no_window_are_not_retried() -> None:
    wrong = Flaky([ValueError("RESOURCE_DOES_NOT_EXIST: no such run")])
    with pytest.raises(ValueError, match="no such run"):
        with_retry(wrong, "get_run", retry_s=60)
    assert len(wrong.calls) == 1
    down = Flaky([ConnectionError("Connection refused")])
    with pytest.raises(ConnectionError):
        with_retry(down, "get_run", retry_s=0)  # interactive callers: MLflow's own retries only
    assert len(down.calls) == 1


def test_the_deadline_holds_and_the_last_error_is_raised() -> None:
    fn = Flaky([ConnectionError(f"Connection refused {i}") for i in range(100)])
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="Connection refused"):
        with_retry(fn, "log_batch", retry_s=1.2)
    took = time.monotonic() - start
    assert 1.2 <= took < 1.6 and len(fn.calls) >= 2  # a wait never runs past the deadline
    assert fn.calls[-1] - start >= 1.2 - 0.05  # the last attempt is made at the deadline


def test_before_retry_returns_what_a_lost_response_created() -> None:
    created: list[str] = []

    def create() -> str:  # the server creates the run, then the response is lost
        created.append(f"run-{len(created) + 1}")
        raise requests.exceptions.ConnectionError("Connection aborted")

    assert with_retry(create, "create_run", retry_s=60, before_retry=lambda: created[-1]) == "run-1"
    assert created == ["run-1"]  # created once

    created.clear()
    looks = Flaky([requests.exceptions.ConnectionError("Connection refused")], result=None)
    with pytest.raises(requests.exceptions.ConnectionError):  # the lookup failed, then found nothing
        with_retry(create, "create_run", retry_s=1.0, before_retry=looks)
    assert len(looks.calls) >= 2 and len(created) == len(looks.calls) + 1  # not found: created again

    def broken() -> None:
        raise KeyError("a bug in the lookup")

    with pytest.raises(KeyError):
        with_retry(Flaky([TimeoutError()]), "create_run", retry_s=60, before_retry=broken)
