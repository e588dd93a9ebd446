"""Failed API keys, limited per client address (review, 2026-12): the key check came before the tenant's
rate limit, so one client could try keys as fast as it liked. ``AuthFailureLimiter`` gives each client
address a token bucket of ``max_failures`` wrong keys, refilled over ``window_s`` seconds; past it, a
wrong key gets a 429 in OpenAI's error shape with ``Retry-After`` instead of a 401 (and is logged once
per window per address), so a guessing client is told to stop and is seen.

A valid key is never refused: every key is looked up, from any address, over the limit or not. A first
version refused unseen keys from an address over its limit before the lookup, to save the lookups; but
behind a proxy or NAT every client shares one address, so one client's wrong keys then shut every
newly created or rotated key (and every key, after a restart) out of the server: one tenant hurting
another, worse than the lookups it saved (an indexed query; keys have 192 random bits, so the guessing
itself is hopeless). Nor are over-limit answers delayed: a delayed answer holds an ingress slot that
other tenants' requests need.

Who is a client: the request's peer address, as the HTTP server gives it. adapterfab has no setting of
its own for trusting a proxy, so ``X-Forwarded-For`` is not read here: uvicorn (Ray Serve's proxy, or
``uvicorn`` serving the app) already puts its first address in the peer's place when the peer is one
of ``FORWARDED_ALLOW_IPS`` (uvicorn's default: 127.0.0.1 only), and a header any client can write
must not pick the bucket it is charged to. IPv6 clients are counted per /64 (one host has a whole /64).
A lookup whose client hung up is charged (Ray Serve cancels such a request; the lookup ran); an error
of the lookup itself (the database down) is not a wrong key. Memory is bounded: ``max_clients``
addresses (the least recently seen go first; an address idle for ``window_s`` has a full bucket again
and is forgotten anyway). In-process: with several ingress replicas each enforces its own share."""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from cachetools import TTLCache
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from adapterfab.serve.api_errors import ApiError

log = logging.getLogger("adapterfab.serve.api")

# defaults of ServeConfig.auth_max_failures and auth_failure_window_s (and of make_api without auth_limit)
DEFAULT_MAX_FAILURES = 20  # wrong keys per address per window; 0: no limit
DEFAULT_FAILURE_WINDOW_S = 60.0
DEFAULT_MAX_CLIENTS = 100_000  # addresses remembered (~200 bytes each)

T = TypeVar("T")


class _Client:
    __slots__ = ("tokens", "last", "logged")

    def __init__(self, tokens: float, now: float):
        self.tokens, self.last, self.logged = tokens, now, float("-inf")


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


class AuthFailureLimiter:
    """At most ``max_failures`` wrong keys per client address per ``window_s`` seconds before a 429 (a
    token bucket refilled at ``max_failures / window_s`` per second); ``max_failures`` 0: no limit."""

    def __init__(self, max_failures: int = DEFAULT_MAX_FAILURES, window_s: float = DEFAULT_FAILURE_WINDOW_S,
                 max_clients: int = DEFAULT_MAX_CLIENTS, clock: Callable[[], float] = time.monotonic):
        if max_failures < 0 or not window_s > 0:
            raise ValueError(f"auth failure limit: max_failures must be 0 or more (got {max_failures}) and "
                             f"window_s positive (got {window_s})")
        self.max_failures, self.window_s, self.clock = int(max_failures), float(window_s), clock
        self.rate = self.max_failures / self.window_s  # tokens back per second
        # an address untouched for window_s has a full bucket again: forgetting it changes nothing
        self._clients: TTLCache[str, _Client] = TTLCache(max_clients, ttl=self.window_s, timer=clock)
        self._lock = threading.Lock()  # requests may come from several event loops' threads (tests)

    def _charge(self, address: str, purpose: str) -> float:
        """One wrong key from ``address``: 0 while within its limit (a token taken), else the seconds until
        a token is back (over the limit: the caller answers 429)."""
        with self._lock:
            now = self.clock()
            c = self._clients.get(address)
            if c is None:
                c = _Client(float(self.max_failures), now)
            c.tokens = min(float(self.max_failures), c.tokens + (now - c.last) * self.rate)
            c.last = now
            self._clients[address] = c  # (kept window_s longer)
            if c.tokens >= 1.0:
                c.tokens -= 1.0
                return 0.0
            wait = (1.0 - c.tokens) / self.rate
            if now - c.logged > self.window_s:  # once per window per address
                c.logged = now
                log.warning("client %s sent more than %d wrong API keys (%s) within %.0f s: its wrong keys get a "
                            "429 for %.0f s", address, self.max_failures, purpose, self.window_s, wait)
            return wait

    async def check(self, request: Request, key: str | None, lookup: Callable[[str | None], T],
                    ok: Callable[[T], bool] = lambda r: r is not None, purpose: str = "serve") -> T:
        """``lookup(key)`` in the thread pool, its result returned; when ``ok`` says it failed, the wrong key
        is charged to the request's address, and past the limit a 429 ``ApiError`` is raised instead of
        returning (the caller's 401 or 403). No key: nothing to guess, nothing counted."""
        if key is None or self.max_failures == 0:
            return await run_in_threadpool(lookup, key)
        address = client_address(request)
        failed = True  # a request cancelled mid-lookup (its client hung up) is charged: the lookup ran
        wait = 0.0
        try:
            result = await run_in_threadpool(lookup, key)
            failed = not ok(result)
        except Exception:
            failed = False  # an error of the lookup itself (the database down) is no wrong key
            raise
        finally:
            if failed:
                wait = self._charge(address, purpose)
        if wait > 0:
            raise ApiError(429, f"Too many wrong API keys from your address; retry in {wait:.1f} s with a "
                                "valid key.", type_="requests", code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return result
