"""adapterfab's tunables (adapterfab/env.py): parsed in one place with types, defaults and bounds; a bad
value is one clear error naming the variable, also through the CLI; and the Hub setting
(ADAPTERFAB_HF_OFFLINE) reaches the processes the local stack starts and decides whether a Hub id
downloads."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from adapterfab.env import Env, env
from adapterfab.errors import BaseModelError, SettingError, StackError

REPO = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "adapterfab")


@pytest.fixture
def clean(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for k in list(os.environ):
        if k.startswith("ADAPTERFAB_") and k not in ("ADAPTERFAB_HOME", "ADAPTERFAB_CACHE") or k == "AWS_ENDPOINT_URL":
            monkeypatch.delenv(k)
    return monkeypatch


def test_defaults_and_parsing(clean: pytest.MonkeyPatch) -> None:
    e = env()
    assert (e.hf_offline, e.mlflow_retry_s, e.s3_max_attempts, e.s3_connect_timeout_s, e.s3_read_timeout_s,
            e.starter_group_jobs, e.first_window_in_process_bytes, e.first_window_on_trainer,
            e.window_in_process_bytes, e.roots, e.s3_endpoint_url) == (True, 1800.0, 6, 5.0, 30.0, 2, 4 << 20, True,
                                                                      4 << 20, (), None)
    assert e.hf_env() == {"HF_HUB_OFFLINE": "1", "ADAPTERFAB_HF_OFFLINE": "1"}
    clean.setenv("ADAPTERFAB_DATA_ROOTS", " /data/a, s3://b/acme ,,")
    clean.setenv("AWS_ENDPOINT_URL", "http://aws:9000")
    for off in ("0", "false", "no", "off"):
        clean.setenv("ADAPTERFAB_HF_OFFLINE", off)
        assert env().hf_offline is False
    assert env().hf_env() == {"HF_HUB_OFFLINE": "0", "ADAPTERFAB_HF_OFFLINE": "0"}
    assert env().roots == ("/data/a", "s3://b/acme") and env().s3_endpoint_url == "http://aws:9000"
    clean.setenv("ADAPTERFAB_S3_ENDPOINT_URL", "http://minio:9000")  # ours wins over boto3's
    clean.setenv("ADAPTERFAB_S3_MAX_ATTEMPTS", "")  # empty: the default
    assert (env().s3_endpoint_url, env().s3_max_attempts) == ("http://minio:9000", 6)


@pytest.mark.parametrize("name,bad,why", [
    ("ADAPTERFAB_S3_MAX_ATTEMPTS", "0", "greater than or equal to 1"),
    ("ADAPTERFAB_S3_CONNECT_TIMEOUT_S", "soon", "valid number"),
    ("ADAPTERFAB_MLFLOW_RETRY_S", "-5", "greater than or equal to 0"),
    ("ADAPTERFAB_HF_OFFLINE", "maybe", "valid boolean"),
    ("ADAPTERFAB_STARTER_GROUP_JOBS", "2.5", "valid integer"),
    ("ADAPTERFAB_FIRST_WINDOW_ON_TRAINER", "sometimes", "valid boolean"),
])
def test_a_bad_value_names_the_variable(clean: pytest.MonkeyPatch, name: str, bad: str, why: str) -> None:
    clean.setenv(name, bad)
    default = Env.model_fields[name.removeprefix("ADAPTERFAB_").lower()].default
    with pytest.raises(SettingError, match=rf"^{name}='{bad}' is not valid: .*{why}.* \(default {default}\)$"):
        env()


def test_the_cli_reports_a_bad_value_in_one_line(tmp_path: Path) -> None:
    r = subprocess.run([CLI, "validate", str(REPO / "examples" / "personas.yaml")], capture_output=True,
                       text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "ADAPTERFAB_HOME": str(tmp_path),
                                                    "HF_HUB_OFFLINE": "1", "ADAPTERFAB_S3_MAX_ATTEMPTS": "none"})
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "ADAPTERFAB_S3_MAX_ATTEMPTS='none' is not valid" in r.stderr + r.stdout


def _settings(home: Path):  # noqa: ANN202
    from adapterfab.settings import Settings

    s = Settings(home=home, cache=home / "cache", state_url=f"sqlite:///{home / 'state.db'}",
                 artifacts=str(home / "artifacts"))
    s.ensure_dirs()
    return s


def test_the_stack_hands_the_hub_setting_to_what_it_starts(clean: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The dashboard UI, a real process started by the stack, and the Ray head (its Popen captured: Ray's
    workers and serving replicas inherit the head's environment) get HF_HUB_OFFLINE from the setting,
    whatever HF_HUB_OFFLINE the caller has (the test suite runs with 1)."""
    from adapterfab import stack
    from adapterfab.procs import free_port, stop_pid

    clean.setenv("HF_HUB_OFFLINE", "1")
    clean.setenv("ADAPTERFAB_HF_OFFLINE", "0")
    settings = _settings(tmp_path)
    info = stack.StackInfo(ray_address="", ray_pid=0, dashboard_url="", mlflow_uri="", mlflow_pid=0,
                           serve_url="", serve_port=0)
    stack._start_ui(settings, info, free_port())
    try:
        environ = dict(kv.split("=", 1) for kv in Path(f"/proc/{info.ui_pid}/environ").read_text().split("\0")
                       if "=" in kv)
    finally:
        stop_pid(info.ui_pid, timeout_s=10)
    assert (environ["HF_HUB_OFFLINE"], environ["ADAPTERFAB_HF_OFFLINE"]) == ("0", "0")

    started: list[dict] = []

    class ExitedAtOnce:  # `ray start` as a process that ended: what _start_ray was given is what counts
        pid, returncode = 0, 1

        def __init__(self, cmd: list[str], **kwargs: object) -> None:
            started.append(kwargs["env"])  # type: ignore[arg-type]

        def poll(self) -> int:
            return 1

    clean.setattr(stack.subprocess, "Popen", ExitedAtOnce)
    for setting, expected in ((None, "1"), ("0", "0"), ("1", "1")):
        if setting is None:
            clean.delenv("ADAPTERFAB_HF_OFFLINE")
        else:
            clean.setenv("ADAPTERFAB_HF_OFFLINE", setting)
        with pytest.raises(StackError, match="ray start exited"):
            stack._start_ray(settings, free_port(), free_port(), free_port(), 1)
        assert started[-1]["HF_HUB_OFFLINE"] == expected and started[-1]["ADAPTERFAB_HF_OFFLINE"] == expected


def test_a_hub_id_downloads_only_when_the_setting_allows(clean: pytest.MonkeyPatch, tmp_path: Path,
                                                         tiny_model_path: str) -> None:
    """Offline (the default): the real huggingface_hub looks in an empty cache and the error says how to
    switch downloads on. Online: the id is fetched (the Hub's download, faked at that edge, returns the
    folder it would have filled) and the folder is the base."""
    import huggingface_hub

    from adapterfab.basemodel import fingerprint, resolve_base_model

    clean.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(BaseModelError, match=r"not in the local Hugging Face cache.*ADAPTERFAB_HF_OFFLINE=0"):
        resolve_base_model("some-org/not-cached", cache=tmp_path)

    calls: list[tuple[str, bool]] = []

    def download(repo_id: str, local_files_only: bool = False) -> str:
        calls.append((repo_id, local_files_only))
        return tiny_model_path

    clean.setattr(huggingface_hub, "snapshot_download", download)
    clean.setenv("ADAPTERFAB_HF_OFFLINE", "0")
    ref = resolve_base_model("some-org/some-model", cache=tmp_path)
    assert calls == [("some-org/some-model", False)]
    assert (ref.path, ref.fingerprint) == (tiny_model_path, fingerprint(tiny_model_path))

    def unreachable(repo_id: str, local_files_only: bool = False) -> str:
        raise OSError("Network is unreachable")

    clean.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(BaseModelError, match=r"could not be downloaded from the Hugging Face Hub: OSError: Network"):
        resolve_base_model("some-org/some-model", cache=tmp_path)


def test_deployments_use_the_setting_and_force_no_hub_mode() -> None:
    """The image, the k8s config and the cluster launcher set ADAPTERFAB_HF_OFFLINE (offline), never
    HF_HUB_OFFLINE itself, which would keep an operator's ADAPTERFAB_HF_OFFLINE=0 from downloading."""
    for path in ("infra/docker/Dockerfile", "infra/k8s/namespace.yaml", "infra/cluster-launcher.yaml"):
        text = (REPO / path).read_text()
        assert "HF_HUB_OFFLINE" not in text, path
        assert re.search(r"ADAPTERFAB_HF_OFFLINE[=:] ?\"?1", text), path
