"""What a review of API keys found (2026-12): the serving API answered a client's wrong keys with 401s
however many it had sent (a brute force, unseen and never told to stop); past a limit per client address
they get a 429 now, while a valid key is never refused (not even one never seen before, from an address
over its limit: behind a proxy every client shares one). And a key in
its rotation grace period could be rotated again (or twice at once by two `keys rotate`), each time
minting another live key while the old key's ``rotated_to`` kept only the last, so the others were lost
from its record.

The API runs in process over HTTP (``TestClient``, httpx's ASGI transport) with the real ``KeyStore`` on a
SQLite state database; the key lookup is wrapped only to count the lookups."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request

from adapterfab.errors import AdapterNotFound, ApiKeyError, StateError
from adapterfab.keys import KeyStore
from adapterfab.serve.api import make_api
from adapterfab.serve.auth_guard import DEFAULT_MAX_FAILURES, AuthFailureLimiter, client_address
from adapterfab.state import StateStore

CLI = str(Path(sys.executable).parent / "adapterfab")
ATTACKER, VICTIM = ("203.0.113.7", 40000), ("198.51.100.2", 40000)
WRONG = "af_0123456789abcdef_" + "x" * 32


class NoBackend:
    async def generate(self, *_: Any) -> AsyncIterator[Any]:  # no test here generates
        raise AssertionError("not reached")
        yield


def _resolver(aid: Any) -> Any:
    raise AdapterNotFound(str(aid))


class Counted:
    """``KeyStore.verify`` (or ``identify``), counting its calls: the lookups the API made."""

    def __init__(self, fn: Any, delay_s: float = 0.0):
        self.fn, self.delay_s, self.calls = fn, delay_s, 0
        self._lock = threading.Lock()

    def __call__(self, key: str | None) -> Any:
        with self._lock:
            self.calls += 1
        time.sleep(self.delay_s)  # a slow database: lookups stay in flight together
        return self.fn(key)


@pytest.fixture
def keys(tmp_path: Path) -> KeyStore:
    return KeyStore(StateStore(f"sqlite:///{tmp_path / 'state.db'}"))


def models(http: Any, key: str) -> httpx.Response:
    return http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})


def test_wrong_keys_from_one_address_get_a_429_past_the_limit(keys: KeyStore) -> None:
    now = [100.0]
    verify = Counted(keys.verify)
    app = make_api(NoBackend(), verify, _resolver,  # type: ignore[arg-type]
                   auth_limit=AuthFailureLimiter(3, window_s=60, clock=lambda: now[0]))
    http = TestClient(app, client=ATTACKER)
    assert [models(http, WRONG + str(i)).status_code for i in range(3)] == [401, 401, 401]
    r = models(http, WRONG + "3")
    assert r.status_code == 429 and verify.calls == 4  # looked up (a valid key would pass), then a 429
    assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": "requests", "param": None,
                                  "code": "rate_limit_exceeded"}}
    assert "wrong API keys" in r.json()["error"]["message"] and r.headers["Retry-After"] == "20"  # 60 s / 3
    now[0] += 20.5  # a token back: one more try, then refused again
    assert [models(http, WRONG + str(i)).status_code for i in range(2)] == [401, 429] and verify.calls == 6
    assert models(http, "").status_code == 401  # no key at all: nothing to guess, a plain 401
    assert http.get("/healthz").status_code == 200


def test_every_server_limits_wrong_keys_by_default(keys: KeyStore) -> None:
    """``make_api`` without ``auth_limit`` (as the Ray Serve ingress builds it) has the default limit."""
    verify = Counted(keys.verify)
    http = TestClient(make_api(NoBackend(), verify, _resolver), client=ATTACKER)  # type: ignore[arg-type]
    codes = [models(http, WRONG + str(i)).status_code for i in range(DEFAULT_MAX_FAILURES + 5)]
    assert codes == [401] * DEFAULT_MAX_FAILURES + [429] * 5 and verify.calls == DEFAULT_MAX_FAILURES + 5
    off = TestClient(make_api(NoBackend(), keys.verify, _resolver,  # type: ignore[arg-type]
                              auth_limit=AuthFailureLimiter(0)), client=ATTACKER)
    assert {models(off, WRONG + str(i)).status_code for i in range(DEFAULT_MAX_FAILURES + 5)} == {401}


def test_a_valid_key_is_never_refused_for_another_clients_wrong_keys(keys: KeyStore) -> None:
    """Behind a proxy or NAT every client shares one address: one client's wrong keys must not shut out
    another's valid key, one never seen before included (a new or rotated key, any key after a restart)."""
    acme, globex, late = keys.create("acme"), keys.create("globex"), keys.create("acme")
    app = make_api(NoBackend(), keys.verify, _resolver,  # type: ignore[arg-type]
                   auth_limit=AuthFailureLimiter(2, window_s=3600))
    shared, victim = TestClient(app, client=ATTACKER), TestClient(app, client=VICTIM)
    assert models(shared, acme).status_code == 200  # a client behind the same address as the guesser
    assert [models(shared, WRONG + str(i)).status_code for i in range(3)] == [401, 401, 429]
    assert models(victim, globex).status_code == 200  # another address: its own bucket
    assert models(shared, acme).status_code == 200  # a valid key passes (tenant routes too)
    assert shared.get("/tenants/acme/v1/models", headers={"Authorization": f"Bearer {acme}"}).status_code == 200
    assert models(shared, late).status_code == 200  # a key never seen, from the guessing address: passes
    restarted = TestClient(make_api(NoBackend(), keys.verify, _resolver,  # type: ignore[arg-type]
                                    auth_limit=AuthFailureLimiter(2, window_s=3600)), client=ATTACKER)
    assert [models(restarted, WRONG + str(i)).status_code for i in range(3)] == [401, 401, 429]
    assert models(restarted, globex).status_code == 200  # a fresh server remembers no key: still passes
    keys.revoke(acme)  # a key is looked up every time: revocation takes effect at once
    assert models(shared, acme).status_code == 429 and models(victim, acme).status_code == 401


def test_concurrent_guesses_get_no_more_401s_than_a_series(keys: KeyStore) -> None:
    fresh = keys.create("acme")
    verify = Counted(keys.verify, delay_s=0.05)
    app = make_api(NoBackend(), verify, _resolver,  # type: ignore[arg-type]
                   auth_limit=AuthFailureLimiter(4, window_s=3600))

    async def burst(client: tuple[str, int], key_of: Any, n: int) -> list[int]:
        transport = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            rs = await asyncio.gather(*(http.get("/v1/models", headers={"Authorization": f"Bearer {key_of(i)}"})
                                        for i in range(n)))
        return sorted(r.status_code for r in rs)

    assert asyncio.run(burst(ATTACKER, lambda i: WRONG + str(i), 30)) == [401] * 4 + [429] * 26
    assert verify.calls == 30
    # many requests with one fresh valid key at once, from the address over its limit: all pass
    assert asyncio.run(burst(ATTACKER, lambda i: fresh, 30)) == [200] * 30


def test_operator_key_guesses_on_metrics_are_limited_too(keys: KeyStore) -> None:
    op, acme = keys.create_operator(), keys.create("acme")
    identify = Counted(keys.identify)
    app = make_api(NoBackend(), keys.verify, _resolver, auth_limit=AuthFailureLimiter(2, window_s=3600),  # type: ignore[arg-type]
                   metrics_auth=lambda key: (who := identify(key)) is not None and who.operator)
    shared = TestClient(app, client=ATTACKER)

    def metrics(key: str) -> int:
        return shared.get("/metrics", headers={"Authorization": f"Bearer {key}"}).status_code

    assert metrics(op) == 200 and models(shared, acme).status_code == 200
    assert [metrics(WRONG + str(i)) for i in range(3)] == [403, 403, 429] and identify.calls == 4
    assert metrics(op) == 200  # the operator's key still reads the metrics
    assert metrics(acme) == 429  # a tenant key is no metrics key: a wrong key there
    assert models(shared, acme).status_code == 200  # ... and a valid key for serving


def test_a_failing_key_database_is_not_counted_as_wrong_keys(keys: KeyStore) -> None:
    down = [True]

    def verify(key: str | None) -> str | None:
        if down[0]:
            raise StateError("the state database is unreachable")
        return keys.verify(key)

    app = make_api(NoBackend(), verify, _resolver, auth_limit=AuthFailureLimiter(1, window_s=3600))  # type: ignore[arg-type]
    http = TestClient(app, client=ATTACKER, raise_server_exceptions=False)
    assert [models(http, WRONG + str(i)).status_code for i in range(3)] == [500, 500, 500]
    down[0] = False
    assert [models(http, WRONG + str(i)).status_code for i in range(2)] == [401, 429]


def _request(host: str | None) -> Request:
    return Request({"type": "http", "method": "GET", "path": "/", "headers": [],
                    "client": None if host is None else (host, 1)})


def test_clients_are_addresses_and_their_memory_is_bounded() -> None:
    assert client_address(_request("2001:db8:1:2:aaaa::1")) == client_address(_request("2001:db8:1:2::9")) \
        == "2001:db8:1:2::/64"  # one host has a whole /64
    assert client_address(_request("::ffff:192.0.2.1")) == "192.0.2.1"
    assert client_address(_request(None)) == "unknown"
    fwd = Request({"type": "http", "method": "GET", "path": "/", "client": ("192.0.2.9", 1),
                   "headers": [(b"x-forwarded-for", b"10.9.9.9")]})
    assert client_address(fwd) == "192.0.2.9"  # a header any client writes picks no bucket

    now = [0.0]
    limiter = AuthFailureLimiter(2, window_s=10, max_clients=50, clock=lambda: now[0])

    async def guess(host: str) -> None:
        await limiter.check(_request(host), WRONG, lambda key: None)

    async def many() -> None:
        for i in range(1000):
            await guess(f"10.0.{i // 256}.{i % 256}")

    asyncio.run(many())
    assert len(limiter._clients) <= 50
    now[0] = 11.0  # a window later every bucket is full again: nothing left to remember
    limiter._clients.expire()
    assert len(limiter._clients) == 0


def test_a_guess_whose_client_hangs_up_mid_lookup_still_counts() -> None:
    """Ray Serve cancels a request whose client went away: a guesser hanging up before the answer must not
    get its lookup for free."""
    limiter = AuthFailureLimiter(1, window_s=3600)

    async def run() -> int:
        task = asyncio.ensure_future(limiter.check(_request(ATTACKER[0]), WRONG, lambda key: time.sleep(0.2)))
        await asyncio.sleep(0.05)  # the lookup is running
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        try:
            await limiter.check(_request(ATTACKER[0]), WRONG + "1", lambda key: None)
        except Exception as e:  # noqa: BLE001
            return getattr(e, "status", 0)
        return 401

    assert asyncio.run(run()) == 429


# -- key rotation ---------------------------------------------------------------------------------


def test_a_key_rotates_once_not_again_in_its_grace_period(keys: KeyStore) -> None:
    old = keys.create("acme")
    new, info = keys.rotate(old, grace_s=3600)
    with pytest.raises(ApiKeyError, match=f"already rotated to {new.split('_')[1]}"):
        keys.rotate(old, grace_s=3600)
    assert [k.key_id for k in keys.list("acme") if k.status(time.time()) == "active"] == [
        info.key_id, new.split("_")[1]]  # the old one (in its grace period) and its one successor
    newer, _ = keys.rotate(new)  # the successor rotates as usual
    assert keys.verify(old) == keys.verify(newer) == "acme" and keys.verify(new) is None


def test_two_rotations_at_once_make_one_new_key(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    old = KeyStore(StateStore(url)).create("acme")
    stores = [KeyStore(StateStore(url)) for _ in range(6)]  # one each, as separate `keys rotate` processes
    start, made, refused = threading.Barrier(len(stores)), [], []

    def rotate(store: KeyStore) -> None:
        start.wait()
        try:
            made.append(store.rotate(old, grace_s=3600)[0])
        except ApiKeyError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=rotate, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(made) == 1 and len(refused) == len(stores) - 1, refused
    listed = stores[0].list("acme")
    assert len(listed) == 2 and listed[0].rotated_to == made[0].split("_")[1]


def test_rotating_a_key_twice_from_the_cli_says_what_to_do(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "ADAPTERFAB_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    key = KeyStore(StateStore(f"sqlite:///{tmp_path / 'state.db'}")).create("acme")
    first = subprocess.run([CLI, "keys", "rotate", key, "--grace", "1h", "-q"], capture_output=True, text=True,
                           timeout=120, env=env)
    assert first.returncode == 0 and first.stdout.startswith("af_"), first.stderr
    again = subprocess.run([CLI, "keys", "rotate", key, "--grace", "1h", "-q"], capture_output=True, text=True,
                           timeout=120, env=env)
    assert again.returncode == 1 and again.stdout == "" and "Traceback" not in again.stderr
    assert f"already rotated to {first.stdout.split('_')[1]}" in again.stderr


def test_the_wrong_key_limit_is_an_app_arg(tiny_model_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``auth_max_failures`` / ``auth_failure_window_s`` reach the served app's config (the ingress builds
    its AuthFailureLimiter from them), and values a limiter refuses are refused at deploy."""
    from adapterfab.serve import app as serve_app
    from adapterfab.serve.auth_guard import DEFAULT_MAX_FAILURES

    built: list = []
    monkeypatch.setattr(serve_app, "build_app", built.append)
    ok = {"base_model": tiny_model_path, "mlflow_uri": "http://127.0.0.1:9", "state_url": "sqlite://"}
    with pytest.raises(ValueError, match="auth_max_failures must not be negative"):
        serve_app.app_builder({**ok, "auth_max_failures": -1})
    with pytest.raises(ValueError, match="auth_failure_window_s must be positive"):
        serve_app.app_builder({**ok, "auth_failure_window_s": 0})
    serve_app.app_builder({**ok, "auth_max_failures": 5, "auth_failure_window_s": 10.0})
    serve_app.app_builder(ok)
    assert (built[0].auth_max_failures, built[0].auth_failure_window_s) == (5, 10.0)
    assert built[1].auth_max_failures == DEFAULT_MAX_FAILURES > 0
