"""The planner's placement of jobs: a job that fits one worker's memory trains on one worker (fused
with compatible jobs); one that does not gets the fewest data-parallel workers that fit, with ZeRO-2
when sharding gradients and optimizer state is enough and ZeRO-3 when the weights must be sharded too;
a job no packing fits is refused at validation with a message that says what to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterfab.jobs.admission import admit
from adapterfab.jobs.plan import MemoryParts, PlanError, execution_groups, memory_parts, placement, plan_batch
from adapterfab.spec import SpecError, parse_spec

GiB = 2**30


def _spec(resources: dict, method: dict | None = None, train: dict | None = None, n: int = 3,
          base: str = "/nonexistent"):  # noqa: ANN202
    return parse_spec({"version": 1, "name": "p", "base_model": base, "resources": resources,
                       "tenants": [{"tenant": "t", "persona": f"p{i}", "dataset": "/x.jsonl"} for i in range(n)],
                       "defaults": {"method": method or {"name": "lora", "dropout": 0.0},
                                    "train": {"dtype": "float32", **(train or {})}}})


def test_stage_choice_follows_what_must_be_sharded() -> None:
    spec, jobs = _spec({})
    res = lambda **kw: spec.resources.model_copy(update=kw)  # noqa: E731
    # big adapter state, small weights: sharding optimizer state and gradients (ZeRO-2) is enough
    parts = MemoryParts(weights=1 * GiB, adapter_state=8 * GiB, activations=1 * GiB, logits=0, gathered=0.1 * GiB)
    assert parts.per_worker() == 10 * GiB
    n, stage, mem = placement(parts, jobs[0], res(device_memory_gb=7))
    assert (n, stage) == (2, 2) and mem == pytest.approx((1 + 2 + 3 + 0.5) * GiB) and mem <= 7 * GiB
    # the weights alone exceed the device: only ZeRO-3 helps, on the fewest workers that fit
    parts = MemoryParts(weights=12 * GiB, adapter_state=0.1 * GiB, activations=1 * GiB, logits=0, gathered=0.5 * GiB)
    n, stage, mem = placement(parts, jobs[0], res(device_memory_gb=5))
    assert (n, stage) == (3, 3) and mem == pytest.approx((12.1 / 3 + 0.5 + 1 / 3) * GiB) and mem <= 5 * GiB
    with pytest.raises(PlanError, match="raise resources.max_workers_per_job"):
        placement(parts, jobs[0], res(device_memory_gb=5, max_workers_per_job=2))
    # fits: one worker, whatever the limit
    assert placement(parts, jobs[0], res(device_memory_gb=20))[:2] == (1, None)
    assert placement(parts, jobs[0], res())[:2] == (1, None)  # no limit given
    # forced: the workers asked for, the cheapest stage that fits them
    assert placement(parts, jobs[0], res(workers_per_job=4, device_memory_gb=5))[:2] == (4, 3)
    assert placement(parts, jobs[0], res(workers_per_job=2))[:2] == (2, 2)
    assert placement(parts, jobs[0], res(workers_per_job=2, zero_stage=3))[:2] == (2, 3)


def test_a_4bit_base_is_never_sharded_by_zero3() -> None:
    spec, jobs = _spec({"device_memory_gb": 5}, method={"name": "qlora"})
    parts = MemoryParts(weights=12 * GiB, adapter_state=0.1 * GiB, activations=1 * GiB, logits=0, gathered=0.5 * GiB)
    with pytest.raises(PlanError, match="4-bit"):
        placement(parts, jobs[0], spec.resources)


def test_plan_on_smollm2_puts_big_jobs_on_zero_workers_and_fuses_the_rest(smollm2_path: str) -> None:
    spec, jobs = _spec({"device_memory_gb": 2.0}, train={"batch_size": 8, "max_seq_len": 256}, n=2)
    small_spec, small = _spec({"device_memory_gb": 2.0}, train={"batch_size": 1, "max_seq_len": 64}, n=2)
    planned = plan_batch("b", spec, jobs + small, smollm2_path)
    big, little = planned[:2], planned[2:]
    parts = memory_parts(__import__("transformers").AutoConfig.from_pretrained(smollm2_path), jobs[0],
                         big[0].trainable_params)
    assert parts.per_worker() > 2 * GiB  # does not fit one worker ...
    for p in big:  # ... so it is split over the fewest ZeRO workers whose estimate fits
        assert p.workers > 1 and p.zero_stage in (2, 3) and p.est_memory_gb <= 2.0 and p.fused_group is None
        assert parts.per_worker(p.workers - 1, 3) > 2 * GiB and parts.per_worker(p.workers - 1, 2) > 2 * GiB
    assert [p.workers for p in little] == [1, 1] and little[0].fused_group == little[1].fused_group == "g1"
    assert execution_groups(planned) == [[0], [1], [2, 3]]


def test_validation_refuses_a_job_no_packing_fits(smollm2_path: str, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    spec, jobs = parse_spec({"version": 1, "name": "p", "base_model": smollm2_path,
                             "resources": {"device_memory_gb": 0.3, "max_workers_per_job": 2},
                             "tenants": [{"tenant": "t", "persona": "p", "dataset": str(data)}]})
    with pytest.raises(SpecError) as e:
        admit(spec, jobs)
    assert "resources" in str(e.value) and "device_memory_gb=0.3" in str(e.value)


def test_cli_plan_shows_workers(smollm2_path: str, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    spec = tmp_path / "b.yaml"
    spec.write_text(json.dumps({"version": 1, "name": "p", "base_model": smollm2_path,
                                "resources": {"workers_per_job": 2, "zero_stage": 3},
                                "tenants": [{"tenant": "t", "persona": "p", "dataset": str(data)}]}))
    r = subprocess.run([str(Path(sys.executable).parent / "adapterfab"), "plan", str(spec), "--json"],
                       capture_output=True, text=True, timeout=120, env={**__import__("os").environ,
                                                                            "ADAPTERFAB_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    (p,) = json.loads(r.stdout)
    assert p["workers"] == 2 and p["zero_stage"] == 3
