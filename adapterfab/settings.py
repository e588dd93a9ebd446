"""Where things live. One place reads the environment; everything else receives a Settings.

- ``ADAPTERFAB_HOME`` (default ``~/.adapterfab``): state database, artifact folder, MLflow files, logs,
  and ``stack.json`` written by ``adapterfab up`` (addresses of the running stack).
- ``ADAPTERFAB_CACHE`` (default ``~/.cache/adapterfab``): converted base models and the bases' answers to
  retention probes and replay prompts (``retention/``), shared by homes.
- ``ADAPTERFAB_STATE_URL``: SQLAlchemy URL of the state database (default SQLite under home).
- ``ADAPTERFAB_ARTIFACTS``: artifact store root, a folder or ``s3://bucket/prefix``
  (default ``<home>/artifacts``).
- ``MLFLOW_TRACKING_URI`` and ``RAY_ADDRESS`` override what ``stack.json`` says.
- ``ADAPTERFAB_UI_AUTH_MAX_FAILURES`` and ``ADAPTERFAB_UI_AUTH_FAILURE_WINDOW_S``: the wrong API keys a
  client address may send to the dashboard UI per window (0: no limit), which ``adapterfab up`` gives it
  as ``--auth-max-failures`` and ``--auth-failure-window-s``; unset: the dashboard's defaults (20 per 60 s).

Plain reads, so that ``adapterfab status`` answers without pydantic. The tunables (S3, retries, the Hub,
the planner's knobs, ``ADAPTERFAB_DATA_ROOTS``) are parsed with types and bounds in adapterfab/env.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from adapterfab.errors import SettingError

DEFAULT_MLFLOW_PORT = 5005
DEFAULT_SERVE_PORT = 8000
DEFAULT_RAY_PORT = 6390
DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_UI_PORT = 8280  # our dashboard (serve/dashboard.py); 8265 is Ray's
_warned: set[str] = set()  # the files private_sqlite warned about, once per process


def private_dir(path: str | Path) -> Path:
    """``path`` as a folder (``mkdir -p``), every folder this call creates owner-only (0700): the home,
    the state and MLflow databases' folders and the local artifact folders hold tenants' data (specs,
    runs, adapters), which the process umask (0755) showed to every local user. A folder that exists
    keeps its mode: the user chose it (a shared group folder, say)."""
    path = Path(path)
    if not path.is_dir():
        if path.parent != path:
            private_dir(path.parent)
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:  # made meanwhile by another process (or a file: is_dir says so)
            if not path.is_dir():
                raise
    return path


def private_file(path: str | Path) -> bool:
    """Create ``path`` empty and owner-only (0600), its folder with ``private_dir``, unless it exists;
    True when it was created here. An existing file keeps its mode."""
    path = Path(path)
    private_dir(path.parent)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return False
    return True


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite SQLAlchemy URL (``sqlite:///rel`` or ``sqlite:////abs``, query
    dropped); None for another database, an in-memory one, or a ``file:`` URI."""
    m = re.match(r"sqlite(\+\w+)?:///([^?]*)", url)
    name = m.group(2) if m else ""
    return Path(name).expanduser() if name and name != ":memory:" and not name.startswith("file:") else None


def private_sqlite(url: str) -> None:
    """Make a SQLite database's file owner-only before SQLite creates it with the umask (0644): an empty
    0600 file, which SQLite opens as a new database and whose mode it gives the ``-wal``, ``-shm`` and
    ``-journal`` files it makes beside it. An existing file is left as it is (it may be shared on
    purpose; adapterfab cannot tell), with a warning when every local user may read it."""
    path = sqlite_file(url)
    if path is None or private_file(path):
        return
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return
    if mode & 0o004 and str(path) not in _warned:
        _warned.add(str(path))
        logging.getLogger("adapterfab.settings").warning(
            "%s is readable by every local user (mode %o) though it holds tenants' data: `chmod 600 %s` "
            "(adapterfab creates its databases owner-only, and leaves existing files as they are)",
            path, mode, path)


def _number(var: str, raw: str, kind: type[int] | type[float]) -> int | float:
    """``raw``, the value of ``var``, as an ``int`` 0 or more or a finite ``float`` above 0; a bad one is
    a ``SettingError`` naming the variable (as env.py's)."""
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not (value >= 0 if kind is int else 0 < value < float("inf")):
        what = "a whole number, 0 or more" if kind is int else "a number of seconds above 0"
        raise SettingError(f"{var}={raw!r} is not valid: it must be {what} (unset: the dashboard's default)")
    return value


def cache_dir() -> Path:
    """``ADAPTERFAB_CACHE``: converted and downloaded base models, downloaded adapters, the bases' answers
    to retention probes and replay prompts (adapterfab/retention.py ``answers_folder``), PEFT's LoRA config
    defaults per peft version (adapterfab/methods/base.py ``peft_lora_config``)."""
    return Path(os.environ.get("ADAPTERFAB_CACHE") or "~/.cache/adapterfab").expanduser().resolve()


@dataclass(frozen=True)
class Settings:
    home: Path
    cache: Path
    state_url: str
    artifacts: str
    mlflow_uri: str | None = None
    ray_address: str | None = None
    serve_url: str | None = None
    dashboard_url: str | None = None
    extra: dict = field(default_factory=dict)
    # the dashboard UI's limit on wrong API keys (serve/auth_guard.py) as the environment says it, read by
    # ``ui_auth_flags`` (checked by `up` only: a bad value fails no other command); None: its default
    ui_auth_max_failures: str | None = None
    ui_auth_failure_window_s: str | None = None

    @property
    def stack_file(self) -> Path:
        return self.home / "stack.json"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @classmethod
    def load(cls) -> Settings:
        # an empty ADAPTERFAB_HOME= is unset (as for every ADAPTERFAB_* variable), not the current folder
        home = Path(os.environ.get("ADAPTERFAB_HOME") or "~/.adapterfab").expanduser().resolve()
        cache = cache_dir()
        stack: dict = {}
        stack_file = home / "stack.json"
        if stack_file.exists():
            try:
                stack = json.loads(stack_file.read_text())
            except (OSError, ValueError):
                stack = {}
        return cls(
            home=home,
            cache=cache,
            state_url=os.environ.get("ADAPTERFAB_STATE_URL", f"sqlite:///{home / 'state.db'}"),
            artifacts=os.environ.get("ADAPTERFAB_ARTIFACTS", str(home / "artifacts")),
            mlflow_uri=os.environ.get("MLFLOW_TRACKING_URI") or stack.get("mlflow_uri"),
            ray_address=os.environ.get("RAY_ADDRESS") or stack.get("ray_address"),
            serve_url=stack.get("serve_url"),
            dashboard_url=stack.get("dashboard_url"),
            extra=stack,
            ui_auth_max_failures=os.environ.get("ADAPTERFAB_UI_AUTH_MAX_FAILURES", "").strip() or None,
            ui_auth_failure_window_s=os.environ.get("ADAPTERFAB_UI_AUTH_FAILURE_WINDOW_S", "").strip() or None,
        )

    def ui_auth_flags(self) -> list[str]:
        """The dashboard UI's flags for its limit on wrong API keys (``--auth-max-failures N
        --auth-failure-window-s S``), those set; a ``SettingError`` for a bad value."""
        flags: list[str] = []
        for var, flag, raw, kind in (
                ("ADAPTERFAB_UI_AUTH_MAX_FAILURES", "--auth-max-failures", self.ui_auth_max_failures, int),
                ("ADAPTERFAB_UI_AUTH_FAILURE_WINDOW_S", "--auth-failure-window-s", self.ui_auth_failure_window_s,
                 float)):
            if raw is not None:
                flags += [flag, str(_number(var, raw, kind))]
        return flags

    def ensure_dirs(self) -> None:
        """The home, its logs and the cache, those this creates owner-only (``private_dir``)."""
        for p in (self.home, self.logs, self.cache):
            try:
                private_dir(p)
            except OSError as e:
                raise SettingError(f"cannot use {p} as a folder (ADAPTERFAB_HOME is {self.home}): "
                                   f"{e.strerror or e}") from None
