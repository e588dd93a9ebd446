"""GPU-only checks of mass training (skipped on machines without CUDA and bitsandbytes; run them on a
lent GPU: see CONTRIBUTING.md "GPU checks"). QLoRA jobs train fused over one resident 4-bit base on the GPU and
save adapters that a plain PeftModel over the same 4-bit base reproduces; two Ray Train jobs at 0.5 GPU
each share one GPU at the same time."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")]


def _rows(path: Path, word: str, n: int = 32) -> Path:
    path.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"{word} {i} {word}"}) + "\n"
                            for i in range(n)))
    return path


@pytest.mark.timeout(600)
def test_fused_qlora_on_gpu(tiny_model_path: str, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    from adapterfab.jobs.resident import ResidentWorker
    from adapterfab.jobs.train_loop import evaluate, load_base
    from adapterfab.methods import get_method
    from adapterfab.pipelines.local import encode_file, epoch_batches, split_rows

    method = {"name": "qlora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
    worker = ResidentWorker(tiny_model_path, method, "bfloat16", device="cuda")
    jobs = [{"job_id": f"j{w}", "dataset": str(_rows(tmp_path / f"{w}.jsonl", w)),
             "train": {"steps": 12, "batch_size": 4, "learning_rate": 1e-2, "dtype": "bfloat16", "max_seq_len": 64}}
            for w in ("ZORP", "QUUX")]
    out = worker.train(jobs, str(tmp_path / "out"))
    assert all(o["error"] is None for o in out), out
    for o, job in zip(out, jobs):
        m = o["metrics"]
        assert m["eval_loss"] < m["base_eval_loss"] and m["system_peak_gpu_mem_mb"] > 0
        cfg = get_method("qlora").config_cls(**method)
        base = load_base(tiny_model_path, "bfloat16", cfg, "cuda:0")
        model = PeftModel.from_pretrained(base, o["adapter_dir"])
        _, ev = split_rows(encode_file(job["dataset"], worker.tokenizer, 64), 0.1)
        alone = evaluate(model, list(epoch_batches(ev, 4, 0, worker.pad_id)(0)))["eval_loss"]
        assert alone == pytest.approx(m["eval_loss"], rel=2e-2)  # 4-bit matmuls: not bit-exact


@pytest.mark.timeout(900)
def test_fractional_gpu_jobs_share_one_gpu(tiny_model_path: str, mlflow_server: str, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from adapterfab.jobs.launch import WorkerJob, run_training_job
    from adapterfab.methods.lora import LoraConfig
    from adapterfab.pipelines.data import prepare_dataset
    from adapterfab.spec import TrainConfig
    from adapterfab.tracking import Tracking

    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        tracking = Tracking(mlflow_server)
        results: dict = {}

        def fit(name: str) -> None:
            p = prepare_dataset(str(_rows(tmp_path / f"{name}.jsonl", name.upper())), tiny_model_path,
                                max_seq_len=64, eval_fraction=0.2, seed=0, max_bad_row_fraction=0.1, timeout_s=120)
            train = TrainConfig(steps=60, batch_size=4, learning_rate=1e-2, dtype="bfloat16", max_seq_len=64)
            job = WorkerJob(job_id=f"b.gpu.{name}", base_model_path=tiny_model_path,
                            method=LoraConfig(r=4).model_dump(), train=train.model_dump(), mlflow_uri=mlflow_server,
                            mlflow_run_id=tracking.start_run(name), progress_board=None, pad_id=0, cpus=1, gpus=0.5)
            results[name] = (job, run_training_job(job, p.train, p.eval, str(tmp_path / "results"), name))

        threads = [threading.Thread(target=fit, args=(n,)) for n in ("left", "right")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=800)
        assert sorted(results) == ["left", "right"]
        spans = []
        for job, (metrics, adapter_dir) in results.values():
            assert metrics["system_peak_gpu_mem_mb"] > 0 and Path(adapter_dir, "adapter_model.safetensors").exists()
            spans.append([m.timestamp for m in tracking.client.get_metric_history(job.mlflow_run_id, "loss")])
        assert min(spans[0]) < max(spans[1]) and min(spans[1]) < max(spans[0])  # on the one GPU at once
    finally:
        ray.shutdown()
