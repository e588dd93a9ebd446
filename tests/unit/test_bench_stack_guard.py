"""bench/stack_guard.py: a benchmark that started a stack stops it in a ``finally``; a SIGTERM, or the
script's own deadline, must reach that ``finally`` (a default SIGTERM ended the process without it, and a
test's timeout killed it: the stack's processes outlived the benchmark)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys, time
sys.path.insert(0, {bench!r})
from stack_guard import stop_cleanly
stop_cleanly({deadline})
try:
    print("started", flush=True)
    time.sleep(60)
finally:
    open({marker!r}, "w").write("stopped")
"""


def _script(tmp_path: Path, deadline: float | None) -> tuple[Path, Path]:
    marker = tmp_path / "stopped"
    path = tmp_path / "bench_like.py"
    path.write_text(SCRIPT.format(bench=str(REPO / "bench"), deadline=deadline, marker=str(marker)))
    return path, marker


def test_the_deadline_runs_the_finally_and_says_why(tmp_path: Path) -> None:
    path, marker = _script(tmp_path, 1)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "deadline of 1 s passed" in r.stderr, r.stderr
    assert marker.read_text() == "stopped" and time.monotonic() - t0 < 20


def test_sigterm_runs_the_finally(tmp_path: Path) -> None:
    path, marker = _script(tmp_path, None)
    p = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "started"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=20) == 128 + signal.SIGTERM
    assert marker.read_text() == "stopped"
