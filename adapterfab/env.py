"""adapterfab's tunables from the environment, parsed in one place by pydantic-settings: types, defaults,
bounds, and a ``SettingError`` naming the variable for a bad value. Where things live (home, cache, state
database, artifacts, the stack's addresses) is ``settings.Settings``, read without pydantic so that
``adapterfab status`` answers in milliseconds. Every variable is ``ADAPTERFAB_<FIELD>`` unless noted;
docs/cli.md, "Configuration", lists them. ``env()`` reads the environment as it is when called."""

from __future__ import annotations

from pydantic import AliasChoices, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapterfab.errors import SettingError

PREFIX = "ADAPTERFAB_"


class Env(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, env_ignore_empty=True, extra="ignore", frozen=True)

    # where batch datasets may live: comma-separated local folders and s3://bucket[/prefix] URIs; empty:
    # anywhere (``roots``)
    data_roots: str = ""
    # a base_model given as a Hugging Face id is read from the local HF cache only; false: downloaded into
    # it on first use. The processes the local stack starts get HF_HUB_OFFLINE to match (``hf_env``)
    hf_offline: bool = True
    # how long the orchestrator and training workers ride out an MLflow outage before a job fails
    mlflow_retry_s: float = Field(1800.0, ge=0)
    # S3 (adapterfab/storage.py, pipelines/data.py): endpoint (or AWS_ENDPOINT_URL), attempts per request
    # (the first included), seconds to connect, seconds without a byte before an attempt is abandoned
    s3_endpoint_url: str | None = Field(None, validation_alias=AliasChoices(f"{PREFIX}S3_ENDPOINT_URL",
                                                                             "AWS_ENDPOINT_URL"))
    s3_max_attempts: int = Field(6, ge=1)
    s3_connect_timeout_s: float = Field(5.0, gt=0, allow_inf_nan=False)
    s3_read_timeout_s: float = Field(30.0, gt=0, allow_inf_nan=False)
    # the planner's first groups on each trainer slot: this many jobs (0: every slot starts on a full group)
    starter_group_jobs: int = Field(2, ge=0)
    # the factory's first window of data is prepared in the orchestrator when its files hold at most this
    # many bytes (0: never), on a warm trainer already leased when there is one (false: never)
    first_window_in_process_bytes: int = Field(4 << 20, ge=0)
    first_window_on_trainer: bool = True
    # a later window too, when its files hold at most this many bytes (0: every later window is a Ray Data
    # execution). On CPUs the trainers hold, an execution's start (task workers importing the tokenizer,
    # Ray Data's own actors: ~40 CPU-s on 2 cores) is taken from the training steps around it, and costs
    # far more than tokenizing a few MB in the orchestrator (bench/RESULTS.md, issue 18, 2026-12-06)
    window_in_process_bytes: int = Field(4 << 20, ge=0)

    @property
    def roots(self) -> tuple[str, ...]:
        return tuple(r.strip() for r in self.data_roots.split(",") if r.strip())

    def hf_env(self) -> dict[str, str]:
        """The environment a process adapterfab starts gets for the Hub: offline or not, as this setting."""
        return {"HF_HUB_OFFLINE": "1" if self.hf_offline else "0", f"{PREFIX}HF_OFFLINE": str(int(self.hf_offline))}


def env() -> Env:
    try:
        return Env()
    except ValidationError as e:
        problems = []
        for err in e.errors():
            name = str(err["loc"][0]).lower().removeprefix(PREFIX.lower())
            problems.append(f"{PREFIX}{name.upper()}={err['input']!r} is not valid: {err['msg']} "
                            f"(default {Env.model_fields[name].default})")
        raise SettingError("; ".join(problems)) from None
