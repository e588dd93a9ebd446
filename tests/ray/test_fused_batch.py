"""The orchestrator runs the planner's packing: three compatible LoRA jobs form one fused group, one of
them fails in its data stage, and the other two train together on one resident trainer (one base),
each registered as its own version with its lineage and promotion decision. A fourth job's batch
(16 x 256 tokens) does not fit ``device_memory_gb``: it trains on two Ray Train workers with DeepSpeed
ZeRO-2. One job at a time (``max_concurrent_jobs: 1``), so the group is not cut to fill a second slot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray]


@pytest.mark.timeout(480)
def test_batch_trains_a_fused_group(af_env: Path, tiny_model_path: str, mlflow_server: str, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    import adapterfab.pipelines.data as data
    from adapterfab.ids import AdapterId
    from adapterfab.jobs.orchestrate import create_batch, run_batch
    from adapterfab.registry import TAG, Registry
    from adapterfab.settings import Settings
    from adapterfab.state import StateStore
    from adapterfab.tracking import Tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    # the window through a Ray Data execution, as a window of more than a few MB is (small ones are
    # tokenized in the orchestrator: tests/e2e/test_factory.py's 64-job batch)
    monkeypatch.setattr(data, "FIRST_WINDOW_IN_PROCESS_BYTES", 0)
    monkeypatch.setattr(data, "WINDOW_IN_PROCESS_BYTES", 0)
    tenants = []
    for name in ("zorp", "quux", "bad", "big"):
        path = tmp_path / f"{name}.jsonl"
        rows = [json.dumps({"instruction": f"Say the number {i}.", "output": f"{name.upper()} {i}"}) for i in range(24)]
        if name == "bad":
            rows = ["not json"] * 20 + rows[:4]
        path.write_text("\n".join(rows) + "\n")
        tenants.append({"tenant": "fuse", "persona": name, "dataset": str(path)})
    tenants[-1]["train"] = {"batch_size": 16, "max_seq_len": 256}  # ~2.5 GiB planned on one worker
    spec = {"version": 1, "name": "fused", "base_model": tiny_model_path, "promote": "auto",
            "defaults": {"method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                         "train": {"steps": 8, "batch_size": 4, "learning_rate": 1e-2, "dtype": "float32",
                                   "max_seq_len": 64, "eval_fraction": 0.2}},
            "resources": {"cpus_per_job": 0.5, "device_memory_gb": 1.5, "max_concurrent_jobs": 1}, "tenants": tenants}
    spec_path = tmp_path / "batch.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    settings = Settings.load()
    settings.ensure_dirs()
    batch_id = create_batch(settings, spec_path)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        final = run_batch(settings, batch_id)
    finally:
        ray.shutdown()
    jobs = {j.persona: j for j in StateStore(settings.state_url).jobs(batch_id)}
    assert final.value == "FAILED"  # the bad dataset's job failed; the others ran to their end
    runs = StateStore(settings.state_url).get_batch(batch_id).stats["data_runs"]
    assert set(runs) == {"ray_data"} and runs["ray_data"] >= 1, runs
    assert jobs["bad"].state.value == "FAILED" and "20 of 24 rows" in jobs["bad"].error, jobs["bad"].error
    registry = Registry(mlflow_server)
    tracking = Tracking(mlflow_server)
    for name in ("zorp", "quux"):
        j = jobs[name]
        assert j.state.value == "SUCCEEDED" and j.model_version == 1, j.error
        assert j.metrics["eval_loss"] < j.metrics["base_eval_loss"]
        v = registry.get(AdapterId("fuse", name).with_version(1))
        assert v.tags[TAG + "training"] == "fused:2"
        assert v.tags[TAG + "fused_with"] == "fuse/zorp,fuse/quux"
        assert v.tags[TAG + "promotion.decision"] == "promoted"
        assert Path(v.artifact_uri, "adapter_model.safetensors").exists()
        history = tracking.client.get_metric_history(j.mlflow_run_id, "loss")
        assert [m.step for m in history] == list(range(1, 9))
    big = jobs["big"]
    assert big.state.value == "SUCCEEDED", big.error
    assert big.placement["workers"] == 2 and big.placement["zero_stage"] == 2 and big.placement["node_id"]
    v = registry.get(AdapterId("fuse", "big").with_version(1))
    assert v.tags[TAG + "training"] == "zero2:2" and v.tags[TAG + "workers"] == "2"
    assert big.metrics["eval_loss"] < big.metrics["base_eval_loss"]
    assert [m.step for m in tracking.client.get_metric_history(big.mlflow_run_id, "loss")] == list(range(1, 9))
