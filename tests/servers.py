"""An ASGI app served by uvicorn in a thread on a free loopback port, for the API tests that drive it with
real HTTP clients (``from servers import serve_in_thread``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from adapterfab.procs import free_port


@contextmanager
def serve_in_thread(app: Any, start_timeout_s: float = 20) -> Iterator[str]:
    """The app's base URL while it serves; stopped on exit."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
