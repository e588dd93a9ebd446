"""Three leftovers (2026-12), with real files, processes and a real S3 API (moto's server):

- an ``s3://`` base replaced in S3 is downloaded into a folder of its own; the folders it supersedes are
  deleted now (they were kept forever: a full base per replacement), but never the one superseded last
  nor one a running process on this machine resolved (a batch or a deployment reading it), and
  processes resolving and pruning at once all get the base whole;
- ``<home>/stack.lock`` is created owner-only (0600), as every other state file (it was 0644);
- ``adapterfab up`` gives the dashboard UI the limit on wrong API keys that the settings hold
  (``ADAPTERFAB_UI_AUTH_MAX_FAILURES``, ``ADAPTERFAB_UI_AUTH_FAILURE_WINDOW_S``): it had no way to.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from adapterfab.errors import SettingError
from adapterfab.settings import Settings
from adapterfab.storage import open_store
from tests.unit.test_s3_store import s3_server  # noqa: F401 - the module's moto server, started here too

REPO = Path(__file__).resolve().parents[2]
# another process on this machine resolving the base: prints its folder, then runs until its stdin closes
RESOLVER = ("import sys; from pathlib import Path; from adapterfab.basemodel import resolve_base_model; "
            "print(resolve_base_model(sys.argv[1], Path(sys.argv[2])).path, flush=True); sys.stdin.read()")


def _upload(bucket: str, weights: bytes) -> None:
    client = open_store(f"s3://{bucket}").client
    client.put_object(Bucket=bucket, Key="m/config.json", Body=b'{"model_type": "llama"}')
    client.put_object(Bucket=bucket, Key="m/model.safetensors", Body=weights)


class Resolver:
    """``resolve_base_model`` in a process of its own, running until ``end()``."""

    def __init__(self, name: str, cache: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", RESOLVER, name, str(cache)], cwd=REPO, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.path = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert self.path, "the resolving process failed"

    def end(self) -> str:
        self.proc.stdin.close()  # type: ignore[union-attr]
        assert self.proc.wait(timeout=30) == 0
        return self.path


def _weights(path: str | Path) -> bytes:
    return (Path(path) / "model.safetensors").read_bytes()


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "models").iterdir())


def test_superseded_s3_base_folders_are_deleted_but_the_last_one_superseded_stays(
        s3_server: str, tmp_path: Path) -> None:  # noqa: F811
    from adapterfab.basemodel import resolve_base_model

    open_store("s3://prune").ensure_bucket()
    cache, name = tmp_path / "cache", "s3://prune/m"
    _upload("prune", b"weights 1")
    first = Resolver(name, cache).end()  # resolved by processes that have ended: nothing holds them
    _upload("prune", b"weights 2")
    second = Resolver(name, cache).end()
    assert _weights(first) == b"weights 1"  # superseded last: kept (a detached deployment may reload it)

    _upload("prune", b"weights 3")
    got, errors = [], []

    def resolve() -> None:
        try:
            got.append(resolve_base_model(name, cache).path)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=resolve) for _ in range(3)]  # download and prune at once
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(got)) == 1 and _weights(got[0]) == b"weights 3"
    third = got[0]
    assert not Path(first).exists()  # the cache no longer grows by a base per replacement
    assert _weights(second) == b"weights 2"
    left = _entries(cache)
    assert not [n for n in left if n.startswith(Path(first).name)]  # its lock files went with it
    assert not [n for n in left if ".tmp" in n or ".del" in n]
    assert {n for n in left if not n.endswith(".lock")} == {Path(second).name, Path(third).name}

    # the first base put back (the same bytes, the same listing): downloaded again, whole, into its folder
    _upload("prune", b"weights 1")
    again = resolve_base_model(name, cache)
    assert again.path == first and _weights(first) == b"weights 1"
    assert not Path(second).exists() and _weights(third) == b"weights 3"  # third is held by this process


def test_an_s3_base_a_running_process_resolved_is_not_deleted_until_it_ends(
        s3_server: str, tmp_path: Path) -> None:  # noqa: F811
    from adapterfab.basemodel import resolve_base_model

    open_store("s3://held").ensure_bucket()
    cache, name = tmp_path / "cache", "s3://held/m"
    _upload("held", b"weights 1")
    batch = Resolver(name, cache)  # a batch on the first base, running across two replacements
    _upload("held", b"weights 2")
    second = Resolver(name, cache).end()
    _upload("held", b"weights 3")
    third = resolve_base_model(name, cache).path
    assert _weights(batch.path) == b"weights 1" and (Path(batch.path) / "config.json").exists()
    assert _weights(second) == b"weights 2" and _weights(third) == b"weights 3"

    first = batch.end()
    assert resolve_base_model(name, cache).path == third  # the next resolve prunes what nothing holds now
    assert not Path(first).exists() and _weights(second) == b"weights 2"


def test_the_stack_lock_file_is_owner_only(tmp_path: Path) -> None:
    from adapterfab import stack

    home = tmp_path / "home"
    settings = Settings(home=home, cache=tmp_path / "cache", state_url="", artifacts="")
    old = os.umask(0o022)
    try:
        with stack.stack_lock(settings):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((home / "stack.lock").stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


@pytest.fixture
def ui_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    monkeypatch.setenv("ADAPTERFAB_HOME", str(tmp_path / "home"))
    for k in ("ADAPTERFAB_STATE_URL", "ADAPTERFAB_ARTIFACTS", "MLFLOW_TRACKING_URI", "RAY_ADDRESS",
              "ADAPTERFAB_UI_AUTH_MAX_FAILURES", "ADAPTERFAB_UI_AUTH_FAILURE_WINDOW_S"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_the_settings_carry_the_dashboards_wrong_key_limit_and_up_refuses_a_bad_one(
        ui_env: pytest.MonkeyPatch) -> None:
    from adapterfab import stack

    assert Settings.load().ui_auth_flags() == []  # unset: the dashboard's defaults
    ui_env.setenv("ADAPTERFAB_UI_AUTH_MAX_FAILURES", " 0 ")
    ui_env.setenv("ADAPTERFAB_UI_AUTH_FAILURE_WINDOW_S", "")  # empty: unset, as every ADAPTERFAB_* variable
    assert Settings.load().ui_auth_flags() == ["--auth-max-failures", "0"]
    for var, bad in (("ADAPTERFAB_UI_AUTH_MAX_FAILURES", "-1"), ("ADAPTERFAB_UI_AUTH_MAX_FAILURES", "2.5"),
                     ("ADAPTERFAB_UI_AUTH_FAILURE_WINDOW_S", "0"), ("ADAPTERFAB_UI_AUTH_FAILURE_WINDOW_S", "nan"),
                     ("ADAPTERFAB_UI_AUTH_FAILURE_WINDOW_S", "soon")):
        with ui_env.context() as mp:
            mp.setenv(var, bad)
            settings = Settings.load()  # other commands (status, submit) are not failed by it
            with pytest.raises(SettingError, match=f"{var}='{bad}' is not valid"):
                settings.ui_auth_flags()
    ui_env.setenv("ADAPTERFAB_UI_AUTH_MAX_FAILURES", "many")
    settings = Settings.load()
    with pytest.raises(SettingError, match="ADAPTERFAB_UI_AUTH_MAX_FAILURES='many'"):
        stack.up(settings)  # refused before anything starts
    assert not settings.stack_file.exists()


def test_up_gives_the_dashboard_the_wrong_key_limit_of_the_settings(ui_env: pytest.MonkeyPatch) -> None:
    """The dashboard UI as ``up`` starts it (``stack._start_ui``, a real process): 2 wrong keys per 600 s
    from the settings, so the third wrong key from one address gets a 429 (the default allows 20)."""
    from adapterfab import stack
    from adapterfab.procs import free_port, stop_pid

    ui_env.setenv("ADAPTERFAB_UI_AUTH_MAX_FAILURES", "2")
    ui_env.setenv("ADAPTERFAB_UI_AUTH_FAILURE_WINDOW_S", "600")
    settings = Settings.load()
    settings.ensure_dirs()
    info = stack.StackInfo(ray_address="", ray_pid=0, dashboard_url="", mlflow_uri="", mlflow_pid=0,
                           serve_url="", serve_port=0)
    stack._start_ui(settings, info, free_port())
    codes = []
    try:
        argv = Path(f"/proc/{info.ui_pid}/cmdline").read_text().split("\0")
        for i in range(3):
            req = urllib.request.Request(info.ui_url + "/api/whoami",
                                         headers={"Authorization": f"Bearer af_0123456789abcdef_{i:032d}"})
            try:
                urllib.request.urlopen(req, timeout=10)
                codes.append(200)
            except urllib.error.HTTPError as e:
                codes.append(e.code)
    finally:
        stop_pid(info.ui_pid, timeout_s=10)
    assert argv[-5:-1] == ["--auth-max-failures", "2", "--auth-failure-window-s", "600.0"]  # ends in ""
    assert codes == [401, 401, 429]


def test_an_s3_base_resolves_where_no_hold_file_can_be_made(s3_server: str, tmp_path: Path,  # noqa: F811
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The hold (a flock on ``<folder>.hold.lock``) was opened for writing and had to be creatable: a cache
    this user may only read (filled by another user, or read-only) failed every resolve with a raw
    PermissionError, where a downloaded base was read before. The hold file is opened read-only now, and a
    resolve goes on unheld where none can be made (here: a location no one can create files in)."""
    import adapterfab.basemodel as bm

    open_store("s3://nohold").ensure_bucket()
    cache, name = tmp_path / "cache", "s3://nohold/m"
    _upload("nohold", b"weights 1")
    first = bm.resolve_base_model(name, cache).path  # downloaded, and held, as usual
    hold = Path(first + ".hold.lock")
    assert hold.exists()
    hold.chmod(0o444)  # a hold file this user may not write (as root: one it may), resolved by another process
    bm._release(Path(first))
    again = subprocess.run([sys.executable, "-c", RESOLVER, name, str(cache)], cwd=REPO, text=True,
                           input="", capture_output=True, timeout=120)
    assert again.returncode == 0 and again.stdout.strip() == first, again.stderr[-2000:]
    monkeypatch.setattr(bm, "_hold_file", lambda folder: Path("/proc") / (folder.name + ".hold.lock"))
    bm._release(Path(first))
    assert bm.resolve_base_model(name, cache).path == first  # no hold file can be made: read as before
    _upload("nohold", b"weights 2")
    second = bm.resolve_base_model(name, cache).path  # downloaded unheld, and nothing else broken
    assert _weights(second) == b"weights 2" and _weights(first) == b"weights 1"
