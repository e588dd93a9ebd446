"""A batch on a two-node Ray cluster started with `ray start` on this machine: a head and a worker node,
one CPU each (their own resources), MLflow beside them. `adapterfab submit --address` targets the
existing cluster through its Jobs API; the batch asks for a resident trainer per node, its jobs train
on those placed (the state database records each job's node) and both register their versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BIN = Path(sys.executable).parent


def _ray_start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    from adapterfab.procs import free_port

    cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
           "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats", *args]
    return subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


@pytest.fixture()
def two_nodes(tmp_path: Path, mlflow_server: str):
    from adapterfab.procs import free_port, port_open, stop_pid

    home = tmp_path / "cluster-home"
    home.mkdir()
    gcs, dash = free_port(), free_port()
    # the cluster's own settings: MLflow, state and artifacts; this venv first on PATH for Ray Jobs
    env = {**os.environ, "ADAPTERFAB_HOME": str(home), "MLFLOW_TRACKING_URI": mlflow_server,
           "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
           "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}
    env.pop("RAY_ADDRESS", None)
    head = _ray_start(["--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                       "--resources", json.dumps({"head_node": 1})], env, tmp_path / "head.log")
    procs = [head]
    try:
        deadline = time.monotonic() + 180
        while not (port_open(gcs) and port_open(dash)):
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(0.5)
        worker = _ray_start(["--address", f"127.0.0.1:{gcs}", "--resources", json.dumps({"worker_node": 1})],
                            env, tmp_path / "worker.log")
        procs.append(worker)
        from ray.util.state import list_nodes

        while True:
            nodes = [n for n in list_nodes(address=f"http://127.0.0.1:{dash}") if n.state == "ALIVE"]
            if len(nodes) == 2:
                break
            assert worker.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(1)
        yield home, f"http://127.0.0.1:{dash}", {n.node_id: n.resources_total for n in nodes}
    finally:
        for p in reversed(procs):  # `ray start --block` stops its node's processes on SIGTERM (not
            stop_pid(p.pid, timeout_s=60)  # `ray stop`: that would stop every Ray on the machine)


@pytest.mark.timeout(900)
def test_a_batch_on_two_nodes_asks_a_trainer_per_node(two_nodes, tiny_model_path: str, mlflow_server: str,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterfab.ids import AdapterId
    from adapterfab.registry import TAG, Registry
    from adapterfab.settings import Settings
    from adapterfab.state import StateStore
    from adapterfab.tracking import Tracking

    home, address, nodes = two_nodes
    assert sorted("head_node" in r for r in nodes.values()) == [False, True]
    tenants = []
    for name in ("north", "south"):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"instruction": f"Where is {i}?", "output": f"{name.upper()} {i}"}) + "\n"
                                for i in range(24)))
        tenants.append({"tenant": "geo", "persona": name, "dataset": str(path)})
    spec = {"version": 1, "name": "two-nodes", "base_model": tiny_model_path,
            "defaults": {"method": {"name": "lora", "r": 4, "dropout": 0.0},
                         "train": {"steps": 40, "batch_size": 4, "learning_rate": 1e-2, "dtype": "float32",
                                   "max_seq_len": 64, "eval_fraction": 0.2,
                                   "replay_weight": 0}},  # placement is under test here, not replay
            # one CPU per job, one CPU per node; unfused: each trainer (1 CPU) needs a node of its own
            "resources": {"cpus_per_job": 1, "fuse": False}, "tenants": tenants}
    spec_path = tmp_path / "batch.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "ADAPTERFAB_HOME": str(tmp_path / "submitter-home")}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([str(BIN / "adapterfab"), "submit", str(spec_path), "--address", address, "--wait"],
                       capture_output=True, text=True, timeout=840, env=env)
    print(r.stdout[-5000:], r.stderr[-3000:])
    assert r.returncode == 0, r.stderr[-3000:]

    monkeypatch.setenv("ADAPTERFAB_HOME", str(home))
    store = StateStore(Settings.load().state_url)
    (batch,) = store.list_batches()
    jobs = store.jobs(batch.id)
    assert [j.state.value for j in jobs] == ["SUCCEEDED", "SUCCEEDED"], [j.error for j in jobs]
    # The batch asked for a resident trainer per slot (two slots, one CPU each: one per node). Which trainer
    # trains which job is the queue's choice: a trainer up first may train both jobs before the other is
    # placed (seen in CI), and a trainer still unplaced when no group is left is called off (DEAD, no node).
    from ray.util.state import list_actors

    from adapterfab.jobs.trainers import NAME_PREFIX

    trainers = [a for a in list_actors(address=address, filters=[("class_name", "=", "TrainerActor")], detail=True,
                                       raise_on_missing_output=False)
                if (a.name or "").startswith(NAME_PREFIX)]
    seen = [(a.name, a.node_id, a.state) for a in trainers]
    assert len(trainers) == 2, seen
    on = [a.node_id for a in trainers if a.node_id]
    assert on and len(set(on)) == len(on) and set(on) <= set(nodes), seen  # placed ones: one per node
    placed = {j.persona: j.placement["node_id"] for j in jobs}
    assert set(placed.values()) <= set(nodes), placed
    tracking = Tracking(mlflow_server)
    assert all(len(tracking.client.get_metric_history(j.mlflow_run_id, "loss")) == 40 for j in jobs)
    registry = Registry(mlflow_server)
    for j in jobs:
        v = registry.get(AdapterId(j.tenant, j.persona).with_version(j.model_version))
        assert v.tags[TAG + "node_id"] == placed[j.persona]
