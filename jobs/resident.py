"""A resident-base worker: loads the base model once (quantized when the method asks) and trains group
after group of jobs fused (``jobs/fused.py``), each job's adapter saved to its own folder.

``ResidentWorker`` is plain Python; ``resident_actor()`` makes it a Ray actor, so the base stays
loaded in one process for as long as the actor lives::

    Worker = resident_actor()
    w = Worker.options(num_cpus=2).remote(base_path, method_dict, torch_threads=2)
    ray.get(w.train.remote([job_dict, ...], out_root))
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from adapterfab.methods import get_method
from adapterfab.spec import TrainConfig


class ResidentWorker:
    def __init__(self, base_path: str, method: dict[str, Any], dtype: str = "float32", torch_threads: int = 0,
                 basis_dir: str | None = None, device: str | None = None):
        import torch

        from adapterfab.jobs.fused import FAMILIES, FusedTrainer
        from adapterfab.jobs.train_loop import load_base

        if torch_threads:
            torch.set_num_threads(torch_threads)
        t0 = time.monotonic()
        impl = get_method(method["name"])
        self.method = impl.config_cls(**method)
        basis = impl.load_basis(Path(basis_dir)) if basis_dir and impl.load_basis else None
        self.base_path = base_path
        if device == "cuda":  # inside a Ray GPU actor: the GPU Ray assigned (CUDA_VISIBLE_DEVICES)
            device = "cuda:0"
        base = load_base(base_path, dtype, self.method, device)
        self.trainer = FusedTrainer(base, FAMILIES[self.method.name], self.method.resolved_targets(),
                                    self.method.r, basis=basis)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(base_path)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.load_s = time.monotonic() - t0

    def train(self, jobs: list[dict[str, Any]], out_root: str) -> list[dict[str, Any]]:
        """``jobs``: {job_id, dataset (a local JSONL), train (TrainConfig fields), eval_rows?}. Each
        job's data is read and tokenized here, the group trains fused, every adapter is evaluated and
        saved to ``out_root/<job_id>``. Returns per-job {job_id, metrics, adapter_dir, error}."""
        from adapterfab.jobs.fused import FusedJob
        from adapterfab.pipelines.local import encode_file, epoch_batches, split_rows

        t0 = time.monotonic()
        fused = []
        for j in jobs:
            train = TrainConfig(**j["train"])
            rows = encode_file(j["dataset"], self.tokenizer, train.max_seq_len)
            tr, ev = split_rows(rows, train.eval_fraction, j.get("eval_rows"))
            fused.append(FusedJob(j["job_id"], self.method, train,
                                  epoch_batches(tr, train.batch_size, train.seed, self.pad_id),
                                  (lambda ev=ev, bs=train.batch_size: list(epoch_batches(ev, bs, 0, self.pad_id)(0)))
                                  if ev else None))
        t1 = time.monotonic()
        results = self.trainer.train(fused)
        t2 = time.monotonic()
        out = []
        for job, res in zip(fused, results):
            adapter_dir = None
            if res.error is None:
                adapter_dir = str(self.trainer.save(job, Path(out_root) / job.job_id))
            self.trainer.remove(job.job_id)
            out.append({"job_id": job.job_id, "metrics": res.metrics, "adapter_dir": adapter_dir,
                        "error": res.error})
        # the group's wall time by phase: read + tokenize, fused train (+ eval of adapter and base), save
        timing = {"prepare_s": t1 - t0, "train_s": max((r.metrics.get("train_s", 0.0) for r in results), default=0.0),
                  "eval_s": 0.0, "save_s": time.monotonic() - t2}
        timing["eval_s"] = max(0.0, t2 - t1 - timing["train_s"])
        for o in out:
            o["group_timing"] = timing
        return out

    def profile(self, jobs: list[dict[str, Any]], out_root: str, row_limit: int = 30) -> str:
        """``train(jobs)`` under torch.profiler: the table of the operators that took the most device
        time (CPU time without a GPU), to see where a fused step goes."""
        import torch
        from torch.profiler import ProfilerActivity, profile

        cuda = torch.cuda.is_available()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            self.train(jobs, out_root)
        table = prof.key_averages()
        for key in (("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)):
            try:
                return table.table(sort_by=key, row_limit=row_limit)
            except (AttributeError, KeyError, ValueError):
                continue
        return table.table(row_limit=row_limit)

    def stats(self) -> dict[str, Any]:
        return {"load_s": self.load_s, "jobs_trained": self.trainer.jobs_trained}


def resident_actor() -> Any:
    import ray

    return ray.remote(ResidentWorker)
