"""procs.stop_pid(leader_first_s=...): the leader of a process group (as `ray start --block` is for its
raylet and GCS) gets the SIGTERM alone and stops its own children; only what it leaves behind is killed.
A SIGTERM to the whole group made Ray's head wait ~10 s for the SIGKILL on every `adapterfab down`."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from adapterfab.procs import pid_alive, stop_pid

# a leader that, on SIGTERM, asks its child to stop (SIGUSR1) and waits for it; the child notes any
# SIGTERM it is sent and stops on SIGUSR1 only
LEADER = r"""
import os, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
def stop(*_):
    child.send_signal(signal.SIGUSR1); child.wait(); sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open(sys.argv[2] + ".ready", "w").write(str(child.pid))
while True: time.sleep(0.1)
"""
CHILD = r"""
import signal, sys, time
notes = sys.argv[1]
signal.signal(signal.SIGTERM, lambda *_: open(notes, "a").write("TERM\n"))
signal.signal(signal.SIGUSR1, lambda *_: sys.exit(0))
while True: time.sleep(0.1)
"""
STUCK = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True: time.sleep(0.1)\n"


def _start(tmp_path: Path, leader: str) -> tuple[subprocess.Popen, Path, int]:
    notes = tmp_path / "notes"
    proc = subprocess.Popen([sys.executable, "-c", leader, CHILD, str(notes)], start_new_session=True)
    ready = Path(str(notes) + ".ready")
    deadline = time.monotonic() + 30
    while not (ready.exists() and ready.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc, notes, int(ready.read_text())


def test_the_leader_stops_its_children_and_they_get_no_sigterm_from_us(tmp_path: Path) -> None:
    proc, notes, child = _start(tmp_path, LEADER)
    assert stop_pid(proc.pid, timeout_s=5, leader_first_s=10)
    proc.wait(timeout=5)
    assert not pid_alive(child)
    assert not notes.exists()  # a group SIGTERM would have reached the child too


def test_a_leader_that_does_not_stop_is_killed_with_its_group(tmp_path: Path) -> None:
    stuck = LEADER.replace("signal.signal(signal.SIGTERM, stop)", "signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    proc, notes, child = _start(tmp_path, stuck)
    t0 = time.monotonic()
    assert stop_pid(proc.pid, timeout_s=1, leader_first_s=0.5)
    proc.wait(timeout=5)
    deadline = time.monotonic() + 5
    while pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(child) and time.monotonic() - t0 < 10


def test_down_stops_the_recorded_ray_head_leader_first(tmp_path: Path, af_env: Path) -> None:
    from adapterfab.settings import Settings
    from adapterfab.stack import down, record

    proc, notes, child = _start(tmp_path, LEADER)  # stands in for `ray start --head --block`
    settings = Settings.load()
    settings.home.mkdir(parents=True, exist_ok=True)
    record(settings, ray_pid=proc.pid)
    assert down(settings) == ["ray"]
    proc.wait(timeout=5)
    assert not pid_alive(child) and not notes.exists()
