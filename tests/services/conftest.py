"""Fixtures for tests against real service processes (moto's S3 server, MLflow, PostgreSQL), and a
fault-injecting HTTP proxy to put in front of them.

- ``moto_url``: moto's S3 API server on 127.0.0.1, one per module.
- ``fault_proxy``: a :class:`FaultProxy` forwarding to ``moto_url``; a test sets ``proxy.fault`` to
  answer some requests with an S3-style 5xx, drop the connection, stall, or corrupt the body.
"""

from __future__ import annotations

import http.client
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest

# hop-by-hop headers are the proxy's own business, never forwarded
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
_ERRORS = {500: ("InternalError", "We encountered an internal error. Please try again."),
           502: ("BadGateway", "Bad gateway."),
           503: ("ServiceUnavailable", "Service is unable to handle request."),
           504: ("GatewayTimeout", "Gateway timeout.")}


@dataclass(frozen=True)
class Seen:
    """One request the proxy received: its method, path (no query), how many times this (method, path)
    had been seen before it (0 = first attempt), and what the proxy did ("forward", "503", ...)."""

    method: str
    path: str
    query: str
    nth: int
    action: str


# fault(method, path, query, nth) -> None (forward) | 500/502/503/504 | "slowdown" (503 SlowDown)
#                                  | "drop" (close, no answer) | ("stall", seconds) | "corrupt" (flip body)
#                                  | "corrupt_upload" (flip the request body before the server stores it)
Fault = Callable[[str, str, str, int], object]


class FaultProxy:
    """A threaded HTTP/1.1 reverse proxy on 127.0.0.1 in front of ``upstream``, recording every request."""

    def __init__(self, upstream: str):
        u = urlparse(upstream)
        self.upstream_host, self.upstream_port = u.hostname, u.port
        self.fault: Fault = lambda method, path, query, nth: None
        self.seen: list[Seen] = []
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _handle(self) -> None:
                body = self._body()
                path, _, query = self.path.partition("?")
                with proxy._lock:
                    nth = proxy._counts.get((self.command, path), 0)
                    proxy._counts[(self.command, path)] = nth + 1
                action = proxy.fault(self.command, path, query, nth)
                name = ("forward" if action is None
                        else action[0] if isinstance(action, tuple) else str(action))
                with proxy._lock:
                    proxy.seen.append(Seen(self.command, path, query, nth, name))
                if action == "drop":
                    self.close_connection = True
                    return
                if isinstance(action, tuple) and action[0] == "stall":
                    proxy._stop.wait(float(action[1]))  # longer than the client's read timeout
                    self.close_connection = True
                    return
                if action in _ERRORS or action == "slowdown":
                    status, (code, msg) = (503, ("SlowDown", "Please reduce your request rate.")) \
                        if action == "slowdown" else (int(action), _ERRORS[int(action)])
                    self._error(status, code, msg, path)
                    return
                self._forward(body, corrupt=action == "corrupt", corrupt_request=action == "corrupt_upload")

            def _error(self, status: int, code: str, msg: str, path: str) -> None:
                xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                       f"<Message>{msg}</Message><Resource>{path}</Resource>"
                       f"<RequestId>fault-{time.monotonic_ns()}</RequestId></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(xml)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(xml)

            def _forward(self, body: bytes, corrupt: bool, corrupt_request: bool = False) -> None:
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    if corrupt_request and body:
                        # bit rot on the way in, with no checksum header left for the server to catch it:
                        # the server stores bad bytes and answers 200
                        body = bytes(b ^ 0xFF for b in body)
                        headers = {k: v for k, v in headers.items()
                                   if not k.lower().startswith(("x-amz-checksum", "content-md5",
                                                                "x-amz-sdk-checksum", "x-amz-trailer"))}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]
                finally:
                    conn.close()
                if corrupt and data:
                    # same length, different bytes, and no checksum header left to give it away: the
                    # storage itself returns a bad object (bit rot, a buggy gateway)
                    data = bytes(b ^ 0xFF for b in data)
                    out_headers = [(k, v) for k, v in out_headers
                                   if not k.lower().startswith(("x-amz-checksum", "content-md5"))]
                self.send_response_only(resp.status, resp.reason)
                for k, v in out_headers:
                    if k.lower() == "content-length":
                        continue
                    self.send_header(k, v)
                if self.command == "HEAD":  # keep the object's size, send no body
                    self.send_header("Content-Length", resp.getheader("Content-Length", "0"))
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _safe(self) -> None:
                try:
                    self._handle()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up (its timeout): fine

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _safe

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="fault-proxy", daemon=True)
        self._thread.start()

    def reset(self, fault: Fault | None = None) -> None:
        with self._lock:
            self.seen.clear()
            self._counts.clear()
        self.fault = fault or (lambda method, path, query, nth: None)

    def requests(self, method: str | None = None, path_re: str | None = None) -> list[Seen]:
        with self._lock:
            seen = list(self.seen)
        return [s for s in seen if (method is None or s.method == method)
                and (path_re is None or re.search(path_re, s.path))]

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from adapterfab.procs import free_port, start_moto, stop_pid

    server = start_moto(tmp_path_factory.mktemp("moto"), free_port())
    yield server.url
    stop_pid(server.pid)


@pytest.fixture
def fault_proxy(moto_url: str) -> Iterator[FaultProxy]:
    proxy = FaultProxy(moto_url)
    yield proxy
    proxy.close()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Test credentials and no stray S3 settings from the caller's environment; returns monkeypatch."""
    for name in ("ADAPTERFAB_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_PROFILE",
                 "ADAPTERFAB_S3_MAX_ATTEMPTS", "ADAPTERFAB_S3_CONNECT_TIMEOUT_S",
                 "ADAPTERFAB_S3_READ_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return monkeypatch
