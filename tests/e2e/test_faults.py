"""Faults injected into a running factory, on the real local stack that `adapterfab up` starts
(Ray head, MLflow server, state DB), through the CLI, with the tiny model as the base so each job takes
seconds:

- the orchestrator is killed (SIGKILL) once one job of a 2-job batch has SUCCEEDED and the other trains;
  `adapterfab submit --resume BATCH_ID` finishes the batch, the finished job is not trained again, and no
  job registers twice;
- the MLflow server is stopped while a batch trains and started again ~10 s later (plus its start-up) on
  the same port and store; the batch completes, and every run, per-step metric, parameter and version is there.

MLflow's own HTTP retries are cut to one (MLFLOW_HTTP_REQUEST_MAX_RETRIES=1, about a second), so only
adapterfab's buffer-and-retry can carry a batch over the outage. Killing a training *worker* is
tests/ray/test_train_job.py and tests/ray/test_zero.py."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from signal import SIGKILL

import pytest
import yaml
from stack_cli import run_cli, stack_up, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.ray]
REPO = Path(__file__).resolve().parents[2]
STEPS = 12
ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "ADAPTERFAB_MLFLOW_RETRY_S": "400"}


def cli(home: Path, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    return run_cli(home, *args, timeout_s=timeout_s, env=ENV)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("faults-home")
    stack_up(home, "--num-cpus", "2", env=ENV)
    yield home
    assert cli(home, "down", timeout_s=120).returncode == 0


def write_batch(path: Path, base: str, name: str, tenants: list[tuple[str, str, str]], steps: int = STEPS) -> Path:
    spec = {"version": 1, "name": name, "base_model": base, "promote": "none",
            "defaults": {"method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                         "train": {"steps": steps, "batch_size": 4, "max_seq_len": 64, "checkpoint_every": 4,
                                   "learning_rate": 1e-3, "replay_weight": 0}},  # faults under test, not replay
            "resources": {"cpus_per_job": 1, "fuse": False, "max_concurrent_jobs": 1},
            "tenants": [{"tenant": t, "persona": p, "dataset": str(REPO / "examples" / "data" / f"{d}.jsonl")}
                        for t, p, d in tenants]}
    path.write_text(yaml.safe_dump(spec))
    return path


def state(home: Path):  # noqa: ANN201
    from adapterfab.state import StateStore

    return StateStore(f"sqlite:///{home / 'state.db'}")


def mlflow_uri(home: Path) -> str:
    return json.loads((home / "stack.json").read_text())["mlflow_uri"]


def versions_of(home: Path, adapter: str) -> list[dict]:
    from adapterfab.ids import AdapterId
    from adapterfab.registry import Registry

    return [v.to_dict() for v in Registry(mlflow_uri(home)).versions(AdapterId.parse(adapter))]


def test_killed_orchestrator_resumes_without_redoing_finished_jobs(stack: Path, tiny_model_path: str,
                                                                  tmp_path: Path) -> None:
    from adapterfab.procs import pid_alive

    home = stack
    # the second job (spec order) long enough that it still trains once the first is registered: a
    # resident trainer takes the next job as soon as a job's steps end, while the first registers (12
    # steps: ~1.5 s); the first one short, as nothing of the test happens while it trains
    spec = write_batch(tmp_path / "kill.yaml", tiny_model_path, "kill-orchestrator",
                       [("acme", "k-pirate", "pirate"), ("globex", "k-robot", "robot")], steps=240)
    short = yaml.safe_load(spec.read_text())
    short["tenants"][0]["train"] = {"steps": STEPS}
    spec.write_text(yaml.safe_dump(short))
    r = cli(home, "submit", str(spec))
    assert r.returncode == 0, r.stderr
    batch_id = r.stdout.split()[1]
    st = state(home)

    def one_done_one_training():  # noqa: ANN202
        jobs = st.jobs(batch_id)
        done = [j for j in jobs if j.state.value == "SUCCEEDED"]  # the other past a checkpoint (every 4 steps)
        return done if done and any(j.state.value == "TRAINING" and j.step >= 6 for j in jobs) else None

    done = wait_for(one_done_one_training, 400, "one SUCCEEDED job and the next one TRAINING", poll_s=0.2)
    b = st.get_batch(batch_id)
    pid = b.orchestrator_pid
    assert time.time() - b.heartbeat_s < 15  # it beats (every 5 s): how a remote orchestrator is judged alive
    os.kill(pid, SIGKILL)  # mid-batch: one job done, the other in Ray Train
    wait_for(lambda: not pid_alive(pid), 30, "the orchestrator to die")  # gone, or a zombie nobody reaps
    before = {j.id: j for j in st.jobs(batch_id)}
    print({j.id: (j.state.value, j.attempts) for j in before.values()})
    assert st.get_batch(batch_id).state == "RUNNING"  # nobody finished it
    finished = {j.id: j for j in done}

    r = cli(home, "submit", "--resume", batch_id, "--wait", "--timeout-s", "500")
    assert r.returncode == 0, r.stdout + r.stderr
    assert cli(home, "submit", "--resume", batch_id).returncode == 0  # nothing left: a no-op, still exit 0
    after = {j.id: j for j in st.jobs(batch_id)}
    assert st.get_batch(batch_id).state == "SUCCEEDED"
    assert all(j.state.value == "SUCCEEDED" for j in after.values()), after
    for jid, j in finished.items():  # not trained, not registered again: same run, same version, 1 attempt
        assert after[jid].attempts == 1 and after[jid].mlflow_run_id == j.mlflow_run_id
        assert after[jid].model_version == j.model_version == 1 and after[jid].reused_version is None
    for j in after.values():  # every adapter registered exactly once, by this batch's job
        vs = versions_of(home, f"{j.tenant}/{j.persona}")
        assert [v["version"] for v in vs] == [1], (j.id, vs)
        assert vs[0]["tags"]["adapterfab.job_id"] == j.id
        assert j.model_version == 1 and j.reused_version is None
    restarted = [j for j in after.values() if j.id not in finished and before[j.id].state.value != "PENDING"]
    assert restarted  # the job killed while TRAINING
    from adapterfab.tracking import Tracking

    t = Tracking(mlflow_uri(home))
    for j in restarted:  # the dead attempt's run is closed as KILLED, the new one FINISHED
        assert j.attempts == before[j.id].attempts + 1
        if before[j.id].mlflow_run_id and before[j.id].mlflow_run_id != j.mlflow_run_id:
            assert t.client.get_run(before[j.id].mlflow_run_id).info.status == "KILLED"
        run = t.client.get_run(j.mlflow_run_id)
        assert run.info.status == "FINISHED"
        # a new attempt with a new run trains from the start: the dead orchestrator's group checkpoint
        # (its steps are in the old run; a failure recorded in it would end the retry untrained) is not used
        assert run.data.metrics["resumed_from_iteration"] == 0
        assert min(m.step for m in t.client.get_metric_history(j.mlflow_run_id, "loss")) == 1


def test_mlflow_outage_during_a_batch_loses_nothing(stack: Path, tiny_model_path: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterfab.procs import pid_alive, start_mlflow, stop_pid
    from adapterfab.settings import Settings
    from adapterfab.stack import record
    from adapterfab.tracking import Tracking, tenant_experiment

    home = stack
    spec = write_batch(tmp_path / "outage.yaml", tiny_model_path, "mlflow-outage",
                       [("initech", "o-pirate", "pirate"), ("initech", "o-robot", "robot")])
    r = cli(home, "submit", str(spec))
    assert r.returncode == 0, r.stderr
    batch_id = r.stdout.split()[1]
    st = state(home)
    # down while the first job trains (its worker buffers per-step metrics) and before the others start
    training = wait_for(lambda: [j.id for j in st.jobs(batch_id) if j.state.value == "TRAINING"], 300,
                        "the first job to train", poll_s=0.2)
    info = json.loads((home / "stack.json").read_text())
    port = int(info["mlflow_uri"].rsplit(":", 1)[1])
    t_down, wall_down = time.monotonic(), time.time()
    stop_pid(info["mlflow_pid"])  # the server process is gone: connections are refused
    # down until the first job has taken steps (the state DB has them from Ray, not from MLflow): its Ray
    # Train worker can need 20+ s to start on 2 busy CPUs, and a job in TRAINING may not step yet
    wait_for(lambda: [j for j in st.jobs(batch_id) if j.id in training and (j.step > 0 or j.state.value != "TRAINING")],
             300, "the first job's steps while MLflow is down", poll_s=0.2)
    time.sleep(10)  # plus the restart below (MLflow answers /health after 7-60 s here)
    states_during = {j.id: j.state.value for j in st.jobs(batch_id)}
    print("during the outage:", states_during)
    assert st.get_batch(batch_id).state == "RUNNING"
    assert not any(s == "FAILED" for s in states_during.values()), states_during
    server = start_mlflow(home / "mlflow", port)  # same port, same SQLite store and artifact folder
    monkeypatch.setenv("ADAPTERFAB_HOME", str(home))
    record(Settings.load(), mlflow_pid=server.pid)  # `adapterfab down` stops the new one
    wall_up = time.time()
    print(f"MLflow down for {time.monotonic() - t_down:.0f}s")
    try:
        wait_for(lambda: st.get_batch(batch_id).state in ("SUCCEEDED", "FAILED"), 500, "the batch to end", 1.0)
    finally:
        if not pid_alive(server.pid):
            stop_pid(server.pid)
    dump = st.dump(batch_id)
    assert dump["state"] == "SUCCEEDED", json.dumps(dump, indent=1, default=str)[-3000:]
    t = Tracking(mlflow_uri(home))
    batch_run = t.client.get_run(dump["mlflow_run_id"])
    assert batch_run.data.params["jobs"] == "2" and batch_run.info.status == "FINISHED"
    exps = [batch_run.info.experiment_id] + [t.find_experiment_id(tenant_experiment(tn))
                                             for tn in {j["tenant"] for j in dump["jobs"]}]
    runs = t.client.search_runs(exps, f"tags.`adapterfab.batch_id` = '{batch_id}'", max_results=100)
    assert len(runs) == 3  # the batch run and one run per job: none lost, none created twice
    for j in dump["jobs"]:
        run = t.client.get_run(j["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.params["train.steps"] == str(STEPS) and "eval_loss" in run.data.metrics
        history = t.client.get_metric_history(j["mlflow_run_id"], "loss")
        steps = sorted(m.step for m in history)
        assert steps == list(range(1, STEPS + 1)), steps  # every step's loss, none lost in the outage
        during = [m.step for m in history if wall_down <= m.timestamp / 1000 <= wall_up]
        print(j["persona"], "steps logged while MLflow was down:", during)
        if j["id"] in training:  # it trained through the outage: its worker buffered these steps
            assert during, [(m.step, m.timestamp / 1000) for m in history]
        vs = versions_of(home, f"{j['tenant']}/{j['persona']}")
        assert [v["version"] for v in vs] == [1] and vs[0]["tags"]["adapterfab.job_id"] == j["id"]
        assert Path(vs[0]["artifact_uri"], "adapter_model.safetensors").exists()


KILL_POINTS = ["PREPARING", "TRAINING", "REGISTERING", "REGISTERED", "SUCCEEDED"]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_orchestrator_killed_at_each_job_transition(stack: Path, tiny_model_path: str, tmp_path: Path,
                                                     point: str) -> None:
    """SIGKILL of the orchestrator right after it commits a job's move into ``point`` (``REGISTERED``: the
    registry version written, production not yet moved to it), then `submit --resume`: every job ends
    SUCCEEDED with exactly one version, registered by its own job, production on it with history [1]
    (the gate promotes each first version), and every job's MLflow run FINISHED."""
    from adapterfab.ids import AdapterId
    from adapterfab.procs import pid_alive
    from adapterfab.registry import Registry
    from adapterfab.tracking import Tracking

    home, tag = stack, point.lower()
    path = write_batch(tmp_path / "kill.yaml", tiny_model_path, f"kill-at-{tag}",
                       [("acme", f"{tag}-pirate", "pirate"), ("globex", f"{tag}-robot", "robot")])
    spec = yaml.safe_load(path.read_text())
    spec["promote"] = "auto"
    path.write_text(yaml.safe_dump(spec))
    r = run_cli(home, "submit", str(path), env={**ENV, "ADAPTERFAB_FAULT_KILL": point})
    assert r.returncode == 0, r.stderr
    batch_id = r.stdout.split()[1]
    st = state(home)
    pid = wait_for(lambda: st.get_batch(batch_id).orchestrator_pid, 60, "the orchestrator to start")
    wait_for(lambda: not pid_alive(pid), 300, f"the orchestrator to kill itself at {point}")
    before = {j.id: j for j in st.jobs(batch_id)}
    print(point, {j.id: (j.state.value, j.attempts) for j in before.values()})
    assert st.get_batch(batch_id).state == "RUNNING"  # died mid-batch: nobody finished it
    at = "REGISTERING" if point == "REGISTERED" else point
    assert any(j.state.value == at for j in before.values()), before  # it died right at that move

    r = cli(home, "submit", "--resume", batch_id, "--wait", "--timeout-s", "400")
    assert r.returncode == 0, r.stdout + r.stderr
    after = {j.id: j for j in st.jobs(batch_id)}
    assert st.get_batch(batch_id).state == "SUCCEEDED"
    registry, tracking = Registry(mlflow_uri(home)), Tracking(mlflow_uri(home))
    for j in after.values():
        assert j.state.value == "SUCCEEDED", (j.id, j.state, j.error)
        aid = AdapterId(j.tenant, j.persona)
        vs = registry.versions(aid)
        assert [v.id.version for v in vs] == [1], (j.id, [v.to_dict() for v in vs])  # exactly once
        assert vs[0].tags["adapterfab.job_id"] == j.id and j.model_version == 1 and j.reused_version is None
        assert vs[0].tags["adapterfab.promotion.decision"] == "promoted"
        prod = registry.production(aid)
        assert prod is not None and prod.id.version == 1, (j.id, point)  # an interrupted promotion completed
        assert registry.production_history(aid) == [1]
        assert tracking.client.get_run(j.mlflow_run_id).info.status == "FINISHED", (j.id, point)
        if before[j.id].state.value == "SUCCEEDED":  # finished before the kill: left alone
            assert j.attempts == before[j.id].attempts and j.mlflow_run_id == before[j.id].mlflow_run_id


def test_identical_batches_at_once_register_each_adapter_once(stack: Path, tiny_model_path: str,
                                                              tmp_path: Path) -> None:
    """The same spec submitted twice at once: both batches succeed, each adapter has exactly one version
    (with production on it and history [1]); in each pair of twin jobs one registered it and the other
    reused it, whether it saw the version before training or only at registration (the fingerprint lock)."""
    from adapterfab.ids import AdapterId
    from adapterfab.registry import Registry

    home = stack
    path = write_batch(tmp_path / "twins.yaml", tiny_model_path, "twins",
                       [("acme", "twin-pirate", "pirate"), ("globex", "twin-robot", "robot")])
    spec = yaml.safe_load(path.read_text())
    spec["promote"] = "auto"
    path.write_text(yaml.safe_dump(spec))
    procs = [subprocess.Popen([str(REPO / ".venv" / "bin" / "adapterfab"), "submit", str(path), "--wait",
                               "--timeout-s", "500"], env={**os.environ, **ENV, "ADAPTERFAB_HOME": str(home)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    batch_ids = [out.split()[1] for out, _ in outs]
    st, registry = state(home), Registry(mlflow_uri(home))
    jobs = [j for b in batch_ids for j in st.jobs(b)]
    assert len(jobs) == 4 and all(j.state.value == "SUCCEEDED" for j in jobs), [(j.id, j.state, j.error) for j in jobs]
    for persona in ("twin-pirate", "twin-robot"):
        twins = [j for j in jobs if j.persona == persona]
        aid = AdapterId(twins[0].tenant, persona)
        vs = registry.versions(aid)
        assert [v.id.version for v in vs] == [1], [v.to_dict() for v in vs]
        assert sorted((j.reused_version or 0) for j in twins) == [0, 1], [(j.id, j.reused_version) for j in twins]
        registered = next(j for j in twins if j.reused_version is None)
        assert vs[0].tags["adapterfab.job_id"] == registered.id
        assert all(j.model_version == 1 for j in twins)
        assert registry.production(aid).id.version == 1 and registry.production_history(aid) == [1]
    print({j.id: (j.reused_version, j.attempts) for j in jobs})
