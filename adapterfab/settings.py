"""Where things live. One place reads the environment; everything else receives a Settings.

- ``ADAPTERFAB_HOME`` (default ``~/.adapterfab``): state database, artifact folder, MLflow files, logs,
  and ``stack.json`` written by ``adapterfab up`` (addresses of the running stack).
- ``ADAPTERFAB_CACHE`` (default ``~/.cache/adapterfab``): converted base models and the bases' answers to
  retention probes and replay prompts (``retention/``), shared by homes.
- ``ADAPTERFAB_STATE_URL``: SQLAlchemy URL of the state database (default SQLite under home).
- ``ADAPTERFAB_ARTIFACTS``: artifact store root, a folder or ``s3://bucket/prefix``
  (default ``<home>/artifacts``).
- ``MLFLOW_TRACKING_URI`` and ``RAY_ADDRESS`` override what ``stack.json`` says.

Plain reads, so that ``adapterfab status`` answers without pydantic. The tunables (S3, retries, the Hub,
the planner's knobs, ``ADAPTERFAB_DATA_ROOTS``) are parsed with types and bounds in adapterfab/env.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from adapterfab.errors import SettingError

DEFAULT_MLFLOW_PORT = 5005
DEFAULT_SERVE_PORT = 8000
DEFAULT_RAY_PORT = 6390
DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_UI_PORT = 8280  # our dashboard (serve/dashboard.py); 8265 is Ray's


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
        )

    def ensure_dirs(self) -> None:
        for p in (self.home, self.logs, self.cache):
            try:
                p.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise SettingError(f"cannot use {p} as a folder (ADAPTERFAB_HOME is {self.home}): "
                                   f"{e.strerror or e}") from None
