"""Failed API keys, limited per client address (review, 2026-12): the key check came before the tenant's
rate limit, so one client could try keys as fast as it liked (a brute force), each try costing a key
lookup in the state database. ``AuthFailureLimiter`` gives each client address a token bucket of
``max_failures`` wrong keys, refilled over ``window_s`` seconds; past it, a request with a key the server
has not seen pass gets a 429 in OpenAI's error shape with ``Retry-After``, before any lookup.

Who is a client: the request's peer address, as the HTTP server gives it. adapterfab has no setting of
its own for trusting a proxy, so ``X-Forwarded-For`` is not read here: uvicorn (Ray Serve's proxy, or
``uvicorn`` serving the app) already puts its first address in the peer's place when the peer is one
of ``FORWARDED_ALLOW_IPS`` (uvicorn's default: 127.0.0.1 only), and a header any client can write
must not pick the bucket it is charged to. IPv6 clients are counted per /64 (one host has a whole /64).

A client with a valid key is never slowed by another's failures: buckets are per address, and a key
that passed on this server since it started (``max_known_keys`` of them, by hash, per purpose: serving
or ``/metrics``) skips the buckets altogether, so even clients behind one proxy address keep working
while another client there guesses keys; such a key is still looked up on every request, so its
revocation takes effect at once. Only a key never seen to pass, from an address over its failures, gets
the 429. Lookups in flight count against the bucket (a success gives its token back), so a burst of
concurrent guesses gets no more lookups than a series: a request that finds the bucket held only by
lookups in flight waits for them (a cold start of many fresh keys from one address is slowed, not
refused). Memory is bounded: ``max_clients`` addresses (the least recently seen go first; an address
idle for ``window_s`` has a full bucket again and is forgotten anyway).
In-process: with several ingress replicas each enforces its own share."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from cachetools import LRUCache, TTLCache
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from adapterfab.serve.api_errors import ApiError

log = logging.getLogger("adapterfab.serve.api")

# defaults of ServeConfig.auth_max_failures and auth_failure_window_s (and of make_api without auth_limit)
DEFAULT_MAX_FAILURES = 20  # wrong keys per address per window; 0: no limit
DEFAULT_FAILURE_WINDOW_S = 60.0
DEFAULT_MAX_CLIENTS = 100_000  # addresses remembered (~200 bytes each)
DEFAULT_MAX_KNOWN_KEYS = 10_000  # hashes of keys that passed, which skip the buckets
IN_FLIGHT_WAIT_S = 5.0  # the longest a request waits for lookups in flight from its address
_POLL_S = 0.01

T = TypeVar("T")


class _Client:
    __slots__ = ("tokens", "last", "in_flight", "logged")

    def __init__(self, tokens: float, now: float):
        self.tokens, self.last, self.in_flight, self.logged = tokens, now, 0, float("-inf")


def client_address(request: Request) -> str:
    """The bucket a request is charged to: its peer's address (an IPv6 one's /64; an IPv4-mapped one as
    IPv4); "unknown" when the server gives none (all such requests share one bucket)."""
    host = request.client.host if request.client is not None else ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host[:100] or "unknown"  # e.g. a test client's name
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class AuthFailureLimiter:
    """At most ``max_failures`` wrong keys per client address per ``window_s`` seconds (a token bucket
    refilled at ``max_failures / window_s`` per second); ``max_failures`` 0: no limit."""

    def __init__(self, max_failures: int = DEFAULT_MAX_FAILURES, window_s: float = DEFAULT_FAILURE_WINDOW_S,
                 max_clients: int = DEFAULT_MAX_CLIENTS, max_known_keys: int = DEFAULT_MAX_KNOWN_KEYS,
                 clock: Callable[[], float] = time.monotonic, in_flight_wait_s: float = IN_FLIGHT_WAIT_S):
        if max_failures < 0 or not window_s > 0:
            raise ValueError(f"auth failure limit: max_failures must be 0 or more (got {max_failures}) and "
                             f"window_s positive (got {window_s})")
        self.max_failures, self.window_s, self.clock = int(max_failures), float(window_s), clock
        self.rate = self.max_failures / self.window_s  # tokens back per second
        self.in_flight_wait_s = in_flight_wait_s
        # an address untouched for window_s has a full bucket again: forgetting it changes nothing
        self._clients: TTLCache[str, _Client] = TTLCache(max_clients, ttl=self.window_s, timer=clock)
        self._known: LRUCache[tuple[str, bytes], bool] = LRUCache(max_known_keys)  # (what for, key hash)
        self._lock = threading.Lock()  # requests may come from several event loops' threads (tests)

    def _client(self, address: str) -> _Client:
        """The address's bucket, refilled to now (and kept ``window_s`` longer)."""
        now = self.clock()
        c = self._clients.get(address)
        if c is None:
            c = _Client(float(self.max_failures), now)
        c.tokens = min(float(self.max_failures), c.tokens + (now - c.last) * self.rate)
        c.last = now
        self._clients[address] = c
        return c

    def _wait_s(self, c: _Client) -> float:
        return (1.0 - c.tokens) / self.rate if self.rate > 0 else self.window_s

    def _admit(self, address: str) -> tuple[_Client | None, float]:
        """Under the lock: (the bucket, 0) with a token taken for a lookup; (None, 0) to wait for lookups
        in flight; (None, seconds until a token is back) when the address is over its failures."""
        c = self._client(address)
        if c.tokens - c.in_flight >= 1.0:
            c.in_flight += 1
            return c, 0.0
        if c.tokens >= 1.0:  # only lookups in flight hold the tokens: wait for them to end
            return None, 0.0
        return None, self._wait_s(c)

    def _done(self, address: str, c: _Client, failed: bool) -> None:
        with self._lock:
            c.in_flight -= 1  # (an evicted bucket is updated for nothing: the address starts afresh)
            if not failed:
                return
            c.tokens -= 1.0
            now = self.clock()
            if c.tokens < 1.0 and now - c.logged > self.window_s:  # once per window per address
                c.logged = now
                log.warning("client %s sent %d wrong API keys within %.0f s: its requests with keys not "
                            "seen to pass get a 429 for %.0f s", address, self.max_failures, self.window_s,
                            self._wait_s(c))

    async def check(self, request: Request, key: str | None, lookup: Callable[[str | None], T],
                    ok: Callable[[T], bool] = lambda r: r is not None, purpose: str = "serve") -> T:
        """``lookup(key)`` in the thread pool, counted against the request's address when ``ok`` says it
        failed; a 429 ``ApiError`` instead while the address is over its failures (and ``key`` never
        passed here for this ``purpose``: a tenant key that serves is no key for ``/metrics``). No key:
        nothing to guess, nothing counted."""
        if key is None or self.max_failures == 0:
            return await run_in_threadpool(lookup, key)
        digest = (purpose, _digest(key))
        address = client_address(request)
        deadline = time.monotonic() + self.in_flight_wait_s  # a real wait, whatever the clock
        while True:
            with self._lock:
                if self._known.get(digest) is not None:  # a key that passed: never slowed, but looked up
                    c = None  # (it may have been revoked since)
                    break
                c, wait = self._admit(address)
                if c is not None:
                    break
            if wait > 0 or time.monotonic() >= deadline:
                wait = max(wait, _POLL_S)
                raise ApiError(429, f"Too many wrong API keys from your address; retry in {wait:.1f} s with a "
                                    "valid key.", type_="requests", code="rate_limit_exceeded",
                               headers={"Retry-After": str(max(1, math.ceil(wait)))})
            await asyncio.sleep(_POLL_S)
        failed = True  # a request cancelled mid-lookup (its client hung up) is charged: the lookup ran
        try:
            result = await run_in_threadpool(lookup, key)
            failed = not ok(result)
        except Exception:
            failed = False  # an error of the lookup itself (the database down) is no wrong key
            raise
        finally:
            if c is not None:
                self._done(address, c, failed)
        with self._lock:
            if failed:
                self._known.pop(digest, None)
            else:
                self._known[digest] = True
        return result
