"""The planner's time estimate: training FLOPs over the rate a job's resources achieve. It scales with
steps, rows and tokens, divides by CPUs, GPUs and workers, and with its default GPU rate it reproduces
the training time measured on an H100 (bench/results/train_throughput-cuda-2026-11-23.json). The CPU
rate (50 GFLOP/s per CPU) comes from bench/methods.py on this machine (SmolLM2 LoRA, ~1.7 s per step of
8 short rows); it is not asserted here, because CPU time on a shared 2-core machine swings by 5x and more."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterfab.jobs.plan import train_flops, train_seconds
from adapterfab.spec import parse_spec

REPO = Path(__file__).resolve().parents[2]


def _job(method: dict, train: dict, resources: dict | None = None):  # noqa: ANN202
    spec, jobs = parse_spec({"version": 1, "name": "t", "resources": resources or {},
                             "tenants": [{"tenant": "a", "persona": "b", "dataset": "/x.jsonl"}],
                             "defaults": {"method": method, "train": train}})
    return spec, jobs[0]


def _llama(**shape):  # noqa: ANN003, ANN202
    from transformers import LlamaConfig

    return LlamaConfig(**shape)


def test_estimate_scales_with_work_and_resources() -> None:
    cfg = _llama(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2)
    spec, job = _job({"name": "lora"}, {"steps": 10, "batch_size": 4, "max_seq_len": 64})
    base = train_seconds(cfg, job, spec.resources)
    for change, factor in (({"steps": 20}, 2.0), ({"batch_size": 8}, 2.0)):
        _, other = _job({"name": "lora"}, {"steps": 10, "batch_size": 4, "max_seq_len": 64, **change})
        assert train_seconds(cfg, other, spec.resources) == pytest.approx(factor * base)
    _, longer = _job({"name": "lora"}, {"steps": 10, "batch_size": 4, "max_seq_len": 128})
    assert train_flops(cfg, longer) > 2 * train_flops(cfg, job)  # attention grows with the square
    two_cpus, _ = _job({"name": "lora"}, {"steps": 10}, {"cpus_per_job": 2})
    assert train_seconds(cfg, job, two_cpus.resources) == pytest.approx(base / 2)
    assert train_seconds(cfg, job, spec.resources, workers=4) == pytest.approx(base / 4)
    gpu, _ = _job({"name": "lora"}, {"steps": 10}, {"gpus_per_job": 0.25, "train_tflops_per_gpu": 40})
    assert train_seconds(cfg, job, gpu.resources) == pytest.approx(train_flops(cfg, job) / 10e12)


def test_default_gpu_rate_reproduces_the_h100_measurement() -> None:
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    from train_throughput import GPU_SHAPE

    measured = json.loads((REPO / "bench/results/train_throughput-cuda-2026-11-23.json").read_text())
    cfg = _llama(vocab_size=49152, **GPU_SHAPE)
    spec, job = _job(measured["method"], {"steps": measured["steps"], "batch_size": measured["batch_size"],
                                          "max_seq_len": measured["max_seq_len"], "dtype": "bfloat16"},
                     {"gpus_per_job": 1})
    per_job = measured["raw"]["c_resident_fused"]["phases_s"]["train_s"] / measured["jobs"]
    est = train_seconds(cfg, job, spec.resources)
    assert 0.75 * per_job <= est <= 1.5 * per_job, (est, per_job)
