"""Resident trainers on a real local Ray cluster (jobs/trainers.py): a leased trainer trains a fused group
from rows Ray Data prepared; released, it stays warm and the next batch on the same base gets the same
process with its base loaded; a trainer leased to one batch is never handed to another; an idle trainer
ends after its keep-warm time and frees its CPU. Through the orchestrator: a trainer killed mid-group
costs the group only the steps since its checkpoint (it resumes on a new trainer; every job is
registered once), and two batches on the same base share a warm trainer."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _dataset(path: Path, word: str, n: int = 24) -> str:
    path.write_text("".join(json.dumps({"instruction": f"Say the number {i}.", "output": f"{word} {i} {word}"}) + "\n"
                            for i in range(n)))
    return str(path)


def _spec(tiny_model_path: str):  # noqa: ANN202
    from adapterfab.jobs.trainers import TrainerSpec
    from adapterfab.methods.lora import LoraConfig

    return TrainerSpec(tiny_model_path, "f" * 64, LoraConfig(r=4, alpha=8, dropout=0.0).model_dump(), "float32",
                       None, 1.0, 0.0)


def _task(tiny_model_path: str, tmp_path: Path, names: dict[str, int], runs: dict[str, str] | None = None):  # noqa: ANN202
    from adapterfab.jobs.resident import GroupJob, GroupTask
    from adapterfab.methods.lora import LoraConfig
    from adapterfab.pipelines.data import DataRequest, prepare_many
    from adapterfab.spec import TrainConfig

    reqs = [DataRequest(n, _dataset(tmp_path / f"{n}.jsonl", n.upper()), 64, 0.2, 0, 0.1) for n in names]
    rows = prepare_many(reqs, tiny_model_path, timeout_s=120)
    jobs = []
    for n, steps in names.items():
        train = TrainConfig(steps=steps, batch_size=4, learning_rate=1e-2, dtype="float32", max_seq_len=64)
        jobs.append(GroupJob(n, LoraConfig(r=4, alpha=8, dropout=0.0).model_dump(), train.model_dump(),
                             rows[n].train, rows[n].eval, (runs or {}).get(n)))
    return GroupTask("g1", jobs, 0)


@pytest.mark.timeout(300)
def test_a_resident_trainer_trains_groups_and_stays_warm(ray_cluster, tiny_model_path: str, mlflow_server: str,
                                                          tmp_path: Path) -> None:
    import ray

    from adapterfab.jobs.launch import PROGRESS_BOARD_PREFIX, ProgressBoard
    from adapterfab.jobs.trainers import TrainerPool, trainers_info
    from adapterfab.tracking import Tracking

    tracking = Tracking(mlflow_server)
    runs = {n: tracking.start_run(n) for n in ("zorp", "quux")}
    board_name = PROGRESS_BOARD_PREFIX + "warm-test"
    board = ProgressBoard.options(name=board_name).remote()
    spec = _spec(tiny_model_path)
    a = TrainerPool("batch-a", keep_warm_s=30)
    lease = a.acquire(spec)
    assert lease.info["groups_trained"] == 0 and lease.key == spec.key()
    result = a.train(lease, _task(tiny_model_path, tmp_path, {"zorp": 10, "quux": 6}, runs), board, mlflow_server)
    by = {o.job_id: o for o in result.outcomes}
    for name, steps in (("zorp", 10), ("quux", 6)):
        o = by[name]
        assert o.error is None and o.metrics["steps"] == steps and o.metrics["eval_loss"] < o.metrics["base_eval_loss"]
        from adapterfab.jobs.fused import write_exported

        folder = write_exported(o.adapter, tmp_path / f"adapter-{name}")  # written by the registrar, off the trainer
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.name for f in folder.iterdir()}
        # every step's loss reaches MLflow: sent by the trainer, or handed back for the registrar to send
        tracking.log_batch(runs[name], history=o.pending_metrics)
        assert sorted({m.step for m in tracking.client.get_metric_history(runs[name], "loss")}) == list(
            range(1, steps + 1)
        )
    progress = ray.get(board.read.remote())
    assert progress["zorp"]["step"] == 10 and progress["quux"]["step"] == 6
    assert result.trainer["warm"] is False and result.timing["flops"] > 0
    a.release(lease)

    b = TrainerPool("batch-b", keep_warm_s=30)  # the next batch on the same base: the same warm process
    again = b.acquire(spec)
    assert again.name == lease.name and again.info["pid"] == lease.info["pid"] and again.info["groups_trained"] == 1
    # a warm trainer prepares its batch's first window: the same rows as prepared here, the base's pad id
    from transformers import AutoTokenizer

    from adapterfab.basemodel import pad_token_id
    from adapterfab.pipelines.data import DataRequest, prepare_many

    reqs = [DataRequest(n, _dataset(tmp_path / f"prep-{n}.jsonl", n.upper()), 64, 0.2, 0, 0.1) for n in ("ka", "kb")]
    here = prepare_many(reqs, tiny_model_path, in_process_bytes=1 << 20)
    got = ray.get(again.handle.prepare.remote("batch-b", reqs, tiny_model_path, 1 << 20))
    assert got["pad_id"] == pad_token_id(AutoTokenizer.from_pretrained(tiny_model_path))
    for n in ("ka", "kb"):
        for split in ("train", "eval"):
            mine, theirs = getattr(here[n], split), getattr(got["rows"][n], split)
            assert len(mine) == len(theirs) > 0
            assert all((a["input_ids"] == b["input_ids"]).all() and (a["labels"] == b["labels"]).all()
                       for a, b in zip(mine, theirs))
    with pytest.raises(Exception, match="not leased to batch-x"):  # only for its lease holder
        ray.get(again.handle.prepare.remote("batch-x", reqs, tiny_model_path, 1 << 20))
    c = TrainerPool("batch-c", keep_warm_s=30)  # leased to batch-b: batch-c gets a trainer of its own
    other = c.acquire(spec)
    assert other.name != again.name
    names = {t["name"]: t for t in trainers_info()}
    assert names[again.name]["owner"] == "batch-b" and names[other.name]["owner"] == "batch-c"
    b.release(again, retire=True)  # its CPU is wanted: it ends now
    ray.get(other.handle.lease.remote("batch-c", 60, 1.0))  # batch-c now asks for 1 s of warmth
    c.release(other)  # released, it ends by itself a second later
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and trainers_info():
        time.sleep(0.5)
    assert trainers_info() == []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and ray.available_resources().get("CPU", 0) < 2:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 2  # both trainers gave their CPU back
    for pool in (a, b, c):
        pool.close()


@pytest.mark.timeout(120)
def test_a_trainer_no_node_can_host_fails_after_a_grace(ray_cluster, tiny_model_path: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU trainer on a cluster without GPUs (and no autoscaler to add one) fails after the grace a node
    restarting or joining has (UNPLACEABLE_GRACE_S, 60 s; 6 s here) with what to change, instead of waiting
    for resources no node has (30 minutes, group after group)."""
    from dataclasses import replace

    from adapterfab.jobs import trainers
    from adapterfab.jobs.trainers import TrainerPool, Unplaceable, _trainer_names, still_unplaceable, unplaceable

    deadline = time.monotonic() + 30  # Ray's monitor writes the cluster's status a few seconds after start
    while unplaceable(1.0, 1.0) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    why = unplaceable(1.0, 1.0)
    assert why is not None and "1 CPU and 1 GPU" in why and "2 CPU, 0 GPU" in why and "gpus_per_job" in why
    assert unplaceable(2.0, 0.0) is None  # a node has 2 CPUs in all (busy or not): Ray places it in time
    assert "3 CPU and 0 GPU" in (unplaceable(3.0, 0.0) or "")
    t0 = time.monotonic()
    assert "1 GPU" in (still_unplaceable(1.0, 1.0, grace_s=3.0) or "") and time.monotonic() - t0 >= 3.0
    assert still_unplaceable(1.0, 0.0, grace_s=60.0) is None  # at once
    monkeypatch.setattr(trainers, "UNPLACEABLE_GRACE_S", 6.0)
    gpu_spec = replace(_spec(tiny_model_path), gpus=1.0)
    pool = TrainerPool("batch-gpu", keep_warm_s=1)
    t0 = time.monotonic()
    with pytest.raises(Unplaceable, match="no node of this Ray cluster"):
        pool.acquire(gpu_spec, timeout_s=600)
    assert 6.0 <= time.monotonic() - t0 < 30
    deadline = time.monotonic() + 20  # the pending trainer actor was killed, not left queued
    while time.monotonic() < deadline and _trainer_names(gpu_spec.key()):
        time.sleep(0.5)
    assert _trainer_names(gpu_spec.key()) == []
    pool.close()


@pytest.mark.timeout(120)
def test_a_forgotten_trainer_that_only_looked_dead_is_ended(ray_cluster, tiny_model_path: str) -> None:
    """A trainer the batch gave up on as unreachable (ActorUnavailableError) is killed before its group
    resumes elsewhere: it could otherwise go on training the group beside its successor."""
    import ray

    from adapterfab.jobs.trainers import TrainerPool, _trainer_names

    pool = TrainerPool("batch-lost", keep_warm_s=60)
    lease = pool.acquire(_spec(tiny_model_path))
    assert ray.get(lease.handle.info.remote(), timeout=30)["owner"] == "batch-lost"
    pool.forget(lease)  # a trainer that took another lease (LeaseLost) is only let go
    assert lease.name in _trainer_names()
    pool.forget(lease, kill=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and lease.name in _trainer_names():
        time.sleep(0.5)
    assert lease.name not in _trainer_names()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(lease.handle.info.remote(), timeout=30)
    pool.close()


def _no_trainers() -> None:
    from adapterfab.jobs.trainers import retire_idle_trainers, trainers_info

    retire_idle_trainers()
    deadline = time.monotonic() + 30
    while trainers_info() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert trainers_info() == []


def _batch(tmp_path: Path, tiny_model_path: str, name: str, tenants: list[str], steps: int, every: int) -> Path:
    spec = {"version": 1, "name": name, "base_model": tiny_model_path, "promote": "auto",
            "defaults": {"method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                         "train": {"steps": steps, "batch_size": 4, "learning_rate": 1e-2, "dtype": "float32",
                                   "max_seq_len": 64, "eval_fraction": 0.2, "checkpoint_every": every}},
            "resources": {"cpus_per_job": 1, "trainer_keep_warm_s": 60},
            "tenants": [{"tenant": t, "persona": "p", "dataset": _dataset(tmp_path / f"{name}-{t}.jsonl", t.upper())}
                        for t in tenants]}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.timeout(480)
def test_a_killed_trainer_costs_its_group_only_the_steps_since_its_checkpoint(
        ray_cluster, af_env: Path, tiny_model_path: str, mlflow_server: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL to a trainer process once its group has checkpointed: the orchestrator gives the group to a
    new trainer, which resumes at the checkpoint; every job succeeds with one registry version, its
    loss history has every step, and it did not train from the start again."""
    from adapterfab.ids import AdapterId
    from adapterfab.jobs.orchestrate import create_batch, run_batch
    from adapterfab.registry import Registry
    from adapterfab.settings import Settings
    from adapterfab.state import StateStore
    from adapterfab.tracking import Tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    steps = 400
    spec_path = _batch(tmp_path, tiny_model_path, "kill", ["ka", "kb", "kc"], steps, every=20)
    settings = Settings.load()
    settings.ensure_dirs()
    batch_id = create_batch(settings, spec_path)
    state = StateStore(settings.state_url)
    killed: dict = {}

    def killer() -> None:
        deadline = time.monotonic() + 300
        folder = settings.home / "checkpoints" / batch_id
        while time.monotonic() < deadline and not killed:
            for ckpt in folder.glob("g*.pt") if folder.exists() else []:
                for j in state.jobs(batch_id):
                    p = j.placement or {}
                    if j.state.value == "TRAINING" and p.get("trainer_pid") and p.get("group") == ckpt.stem:
                        killed.update(
                            pid=p["trainer_pid"], trainer=p["trainer"], jobs=set(p.get("fused_with") or [j.id])
                        )
                        os.kill(p["trainer_pid"], signal.SIGKILL)
                        return
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    final = run_batch(settings, batch_id)
    thread.join(5)
    assert killed, "no trainer was killed: the group ended before its first checkpoint"
    jobs = {j.id: j for j in state.jobs(batch_id)}
    assert final.value == "SUCCEEDED", {j.id: j.error for j in jobs.values()}
    registry, tracking = Registry(mlflow_server), Tracking(mlflow_server)
    for j in jobs.values():
        assert [v.id.version for v in registry.versions(AdapterId(j.tenant, j.persona))] == [1]  # registered once
        history = tracking.client.get_metric_history(j.mlflow_run_id, "loss")
        assert sorted({m.step for m in history}) == list(range(1, steps + 1))  # no step lost
        if j.id in killed["jobs"]:
            assert j.placement["trainer"] != killed["trainer"]  # finished on another trainer
            assert j.metrics["resumed_from_iteration"] >= 20  # from its checkpoint, not from the start
        else:
            assert j.metrics["resumed_from_iteration"] == 0
    assert not (settings.home / "checkpoints" / batch_id).exists()  # cleaned up once registered


@pytest.mark.timeout(480)
def test_two_batches_on_the_same_base_share_a_warm_trainer(ray_cluster, af_env: Path, tiny_model_path: str,
                                                           mlflow_server: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterfab.jobs.orchestrate import create_batch, run_batch
    from adapterfab.settings import Settings
    from adapterfab.state import StateStore

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    settings = Settings.load()
    settings.ensure_dirs()
    state = StateStore(settings.state_url)
    _no_trainers()  # the earlier tests' trainers, warm on the same base, are not this test's
    first = create_batch(settings, _batch(tmp_path, tiny_model_path, "one", ["wa", "wb", "wc", "wd"], 4, 25))
    assert run_batch(settings, first).value == "SUCCEEDED"
    trainers_one = {j.placement["trainer"] for j in state.jobs(first)}
    assert all(j.placement["warm"] is False for j in state.jobs(first))
    second = create_batch(settings, _batch(tmp_path, tiny_model_path, "two", ["we", "wf"], 4, 25))
    assert run_batch(settings, second).value == "SUCCEEDED"
    two = state.jobs(second)
    assert all(j.placement["warm"] is True for j in two)  # the base was loaded already
    assert {j.placement["trainer"] for j in two} <= trainers_one
    stats = state.get_batch(second).stats
    assert stats["trainers"] and all(t["warm"] for t in stats["trainers"].values())
    # the warm trainer prepared the second batch's first window (the first batch's trainers were starting)
    assert state.get_batch(first).stats["first_window_by"] == "orchestrator"
    assert stats["first_window_by"].removeprefix("trainer ") in trainers_one
    # the way to the first step, in order, in seconds after submit
    way = stats["startup_s"]
    assert list(way) == ["claimed", "ray", "trainers_asked", "set_up", "first_window", "first_group", "first_step"]
    assert 0 <= way["claimed"] <= way["first_step"] < 120
