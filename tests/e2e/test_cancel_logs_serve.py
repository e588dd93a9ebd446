"""`adapterfab cancel`, `adapterfab logs` and `serve --host --replicas --device`, on the real local stack
that `adapterfab up` starts (Ray head, MLflow server, state DB), through the CLI, with the tiny random
Llama as the base:

- a 3-job batch on one trainer slot: the first job (3 steps) is registered, the second trains (20,000
  steps) when `cancel` comes; the batch ends CANCELLED within a minute, the first job keeps its version,
  the other two end CANCELLED with no version and their MLflow runs KILLED; the trainer that was
  training is free: the next batch trains on it, warm;
- `logs` prints the orchestrator's log and one job's lines;
- `serve` binds 0.0.0.0 with 2 engine replicas on CPU, answers on 127.0.0.1, and refuses `--device
  cuda` on a cluster without GPUs."""

from __future__ import annotations

import glob
import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from stack_cli import run_cli, stack_up, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.ray]
REPO = Path(__file__).resolve().parents[2]


def cli(home: Path, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    return run_cli(home, *args, timeout_s=timeout_s)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("cancel-home")
    ports, _ = stack_up(home, "--num-cpus", "4")
    yield home, ports
    assert cli(home, "down", timeout_s=120).returncode == 0


def write_batch(path: Path, base: str, name: str, tenants: list[tuple[str, str, str, int]]) -> Path:
    spec = {"version": 1, "name": name, "base_model": base, "promote": "none",
            "defaults": {"method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                         "train": {"batch_size": 2, "max_seq_len": 64, "learning_rate": 1e-3, "replay_weight": 0}},
            "resources": {"cpus_per_job": 1, "fuse": False, "max_concurrent_jobs": 1},
            "tenants": [{"tenant": t, "persona": p, "dataset": str(REPO / "examples" / "data" / f"{d}.jsonl"),
                         "train": {"steps": steps}} for t, p, d, steps in tenants]}
    path.write_text(yaml.safe_dump(spec))
    return path


def status(home: Path, batch_id: str) -> dict:
    r = cli(home, "status", batch_id, "--json", timeout_s=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def cancelled(stack, tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory):
    home, _ = stack
    work = tmp_path_factory.mktemp("cancel-spec")
    spec = write_batch(work / "cancel.yaml", tiny_model_path, "cancel-me",
                       [("acme", "first", "pirate", 3), ("acme", "second", "butler", 20_000),
                        ("globex", "third", "robot", 20_000)])
    r = cli(home, "submit", str(spec), "--json")
    assert r.returncode == 0, r.stderr
    batch_id = json.loads(r.stdout)["batch_id"]

    def first_done_second_training():  # noqa: ANN202
        now = status(home, batch_id)
        assert now["state"] in ("PENDING", "RUNNING"), now  # ended before the cancel: the test is moot
        jobs = {j["persona"]: j for j in now["jobs"]}
        return jobs if jobs["first"]["state"] == "SUCCEEDED" and jobs["second"]["state"] == "TRAINING" \
            and jobs["second"]["step"] >= 3 else None

    before = wait_for(first_done_second_training, 420, "the first job registered, the second training", 1.0)
    t0 = time.monotonic()
    r = cli(home, "cancel", batch_id, "--json", "--timeout-s", "120")
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    return home, batch_id, before, json.loads(r.stdout), took


def test_cancel_stops_the_batch_and_keeps_what_was_registered(cancelled) -> None:
    home, batch_id, before, dump, took = cancelled
    assert took < 60, took  # the trainer stopped at a step, not at the end of 20,000
    assert dump["id"] == batch_id and dump["state"] == "CANCELLED" and dump["cancel_requested_s"]
    jobs = {j["persona"]: j for j in dump["jobs"]}
    assert {p: j["state"] for p, j in jobs.items()} == {"first": "SUCCEEDED", "second": "CANCELLED",
                                                        "third": "CANCELLED"}
    assert jobs["first"]["model_version"] == before["first"]["model_version"] == 1
    assert 3 <= jobs["second"]["step"] < 20_000 and jobs["second"]["model_version"] is None
    assert jobs["third"]["model_version"] is None and "adapterfab cancel" in jobs["third"]["error"]
    listed = json.loads(cli(home, "registry", "ls", "--refresh", "--json").stdout)
    assert [a["id"] for a in listed] == ["acme/first"]  # nothing cancelled was registered
    from adapterfab.tracking import Tracking

    uri = json.loads((home / "stack.json").read_text())["mlflow_uri"]
    client = Tracking(uri).client
    assert client.get_run(jobs["second"]["mlflow_run_id"]).info.status == "KILLED"
    assert client.get_run(jobs["first"]["mlflow_run_id"]).info.status == "FINISHED"
    again = cli(home, "cancel", batch_id)
    assert again.returncode == 0 and "already ended CANCELLED" in again.stdout
    assert "CANCELLED" in cli(home, "status").stdout


def test_the_cancelled_groups_trainer_is_free_and_trains_the_next_batch(cancelled, tiny_model_path: str,
                                                                         tmp_path: Path) -> None:
    home, batch_id, before, dump, _ = cancelled
    trainer = {j["persona"]: j for j in dump["jobs"]}["second"]["placement"]["trainer"]
    spec = write_batch(tmp_path / "next.yaml", tiny_model_path, "after-cancel", [("initech", "next", "pirate", 3)])
    r = cli(home, "submit", str(spec), "--wait", "--timeout-s", "300", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    done = json.loads(r.stdout)  # the batch's status at its end; the progress went to stderr
    assert done["state"] == "SUCCEEDED" and "SUCCEEDED" in r.stderr
    placement = done["jobs"][0]["placement"]
    assert placement["trainer"] == trainer and placement["warm"] is True  # the same trainer, its base loaded


def test_logs_of_the_batch_and_of_one_job(cancelled) -> None:
    home, batch_id, _, dump, _ = cancelled
    jobs = {j["persona"]: j for j in dump["jobs"]}
    whole = cli(home, "logs", batch_id)
    assert whole.returncode == 0 and "cancel requested" in whole.stdout
    assert jobs["first"]["id"] in whole.stdout and jobs["second"]["id"] in whole.stdout
    one = cli(home, "logs", batch_id, "acme/second")
    assert one.returncode == 0 and f"job {jobs['second']['id']}: TRAINING -> CANCELLED" in one.stdout
    assert jobs["first"]["id"] not in one.stdout and jobs["third"]["id"] not in one.stdout
    got = json.loads(cli(home, "logs", batch_id, jobs["first"]["id"], "--json").stdout)
    assert got["batch_state"] == "CANCELLED" and got["files"][0].endswith(f"{batch_id}.log")
    assert any("REGISTERING -> SUCCEEDED" in line for line in got["lines"])


def test_serve_on_every_interface_with_two_replicas(cancelled, stack, tiny_model_path: str) -> None:
    import psutil

    home, ports = stack
    up = json.loads(cli(home, "up", "--json", timeout_s=60).stdout)  # idempotent: the same stack
    assert up["home"] == str(home) and up["serving"].endswith(f":{ports['serve']}")
    r = cli(home, "serve", "--detach", "--host", "0.0.0.0", "--replicas", "2", "--device", "auto",
            "--base-model", tiny_model_path, "--max-tokens-cap", "8", "--json-logs", "--json", timeout_s=400)
    assert r.returncode == 0, r.stderr
    served = json.loads(r.stdout)
    assert served == {"url": f"http://0.0.0.0:{ports['serve']}", "openai_base_url": f"http://0.0.0.0:{ports['serve']}/v1",
                      "host": "0.0.0.0", "port": int(ports["serve"]), "replicas": 2, "device": "cpu",
                      "detached": True}
    listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("tcp") if c.status == "LISTEN"}
    assert ("0.0.0.0", int(ports["serve"])) in listening
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['dashboard']}/api/serve/applications/", timeout=30) as f:
        apps = json.load(f)["applications"]
    replicas = apps["adapterfab"]["deployments"]["EngineDeployment"]["replicas"]
    assert len(replicas) == 2 and {x["state"] for x in replicas} == {"RUNNING"}
    key = cli(home, "keys", "create", "acme", "--quiet").stdout.strip()
    req = urllib.request.Request(f"http://127.0.0.1:{ports['serve']}/v1/models",
                                 headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=60) as f:
        assert "acme/first" in [m["id"] for m in json.load(f)["data"]]
    # the operator's cap bounds a reply that names no max_tokens; the replicas log JSON lines with the request id
    body = {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "ignore_eos": True,
            "frobnicate": 1}
    req = urllib.request.Request(f"http://127.0.0.1:{ports['serve']}/v1/chat/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                                          "X-Request-Id": "e2e-json-7"})
    with urllib.request.urlopen(req, timeout=60) as f:
        assert f.headers.get_all("x-request-id") == ["e2e-json-7"]
        assert json.load(f)["usage"]["completion_tokens"] == 8
    lines = [json.loads(line) for p in glob.glob("/tmp/ray/session_*/logs/worker-*")
             for line in Path(p).read_text(errors="replace").splitlines() if "e2e-json-7" in line and line[:1] == "{"]
    assert any(x["request_id"] == "e2e-json-7" and "frobnicate" in x["message"] for x in lines), lines
    import torch

    if not torch.cuda.is_available():
        r = cli(home, "serve", "--detach", "--device", "cuda", "--base-model", tiny_model_path, timeout_s=120)
        assert r.returncode == 1 and "no GPU" in r.stderr and "Traceback" not in r.stderr
