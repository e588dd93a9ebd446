"""Review of how fine-tune jobs are planned, grouped and packed onto devices (review 26): forced
placements are held to the device's memory like chosen ones, a 4-bit base is never planned on ZeRO-3,
fractional CPUs fill the cluster, a fused step never pads past what its group's estimate counts, a
recorded group the jobs no longer fuse in is split, the slots' null row is counted, and a resident
trainer gives back the slot rows of a larger group it trained before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapterfab.jobs.plan import (
    MemoryParts,
    PlanError,
    balanced_groups,
    concurrency,
    execution_groups,
    fitted_groups,
    fusion_key,
    needs_activation_checkpointing,
    placement,
    plan_batch,
)
from adapterfab.spec import parse_spec

GiB = 2**30
# SmolLM2-135M's shapes: what the planner reads of a base (config.json only, no weights)
SMOL = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}


def _spec(resources: dict, tenants: list[dict] | None = None, method: dict | None = None,
          train: dict | None = None, n: int = 2):  # noqa: ANN202
    return parse_spec({"version": 1, "name": "r26", "resources": resources,
                       "defaults": {"method": method or {"name": "lora", "dropout": 0.0},
                                    "train": {"dtype": "float32", **(train or {})}},
                       "tenants": tenants or [{"tenant": f"t{i}", "persona": "p", "dataset": "/x.jsonl"}
                                              for i in range(n)]})


@pytest.fixture()
def smol_config(tmp_path: Path) -> str:
    (tmp_path / "config.json").write_text(json.dumps(SMOL))
    return str(tmp_path)


def test_a_forced_placement_that_does_not_fit_the_device_is_refused() -> None:
    """``workers_per_job`` forced a placement whatever its estimate: a job needing 5 GiB on one worker
    was planned on one worker of a 4 GiB device (admission passed, the job ran out of memory)."""
    spec, jobs = _spec({})
    parts = MemoryParts(weights=3 * GiB, adapter_state=0.5 * GiB, activations=1 * GiB, logits=0.5 * GiB,
                        gathered=0.2 * GiB)
    res = lambda **kw: spec.resources.model_copy(update=kw)  # noqa: E731
    with pytest.raises(PlanError, match="workers_per_job forces one worker"):
        placement(parts, jobs[0], res(workers_per_job=1, device_memory_gb=4))
    with pytest.raises(PlanError, match="on the 2 workers resources.workers_per_job forces"):
        placement(parts, jobs[0], res(workers_per_job=2, device_memory_gb=2))
    # what fits stands: one worker with room, or the cheapest stage that fits the forced workers
    assert placement(parts, jobs[0], res(workers_per_job=1, device_memory_gb=6))[:2] == (1, None)
    n, stage, mem = placement(parts, jobs[0], res(workers_per_job=2, device_memory_gb=3))
    assert (n, stage) == (2, 3) and mem <= 3 * GiB
    assert placement(parts, jobs[0], res(workers_per_job=2))[:2] == (2, 2)  # no limit: nothing to check


def test_a_4bit_base_is_never_planned_on_zero3_even_when_the_stage_is_forced() -> None:
    """``zero_stage: 3`` replaced the planner's stages, so a QLoRA job was planned on ZeRO-3 with its 4-bit
    weights counted as sharded (a 13.5 GiB job "fitting" 8 GiB workers at 6.9 GiB each)."""
    spec, jobs = _spec({}, method={"name": "qlora"})
    parts = MemoryParts(weights=12 * GiB, adapter_state=0.1 * GiB, activations=1 * GiB, logits=0, gathered=0.5 * GiB)
    res = lambda **kw: spec.resources.model_copy(update=kw)  # noqa: E731
    assert parts.per_worker(2, 3) <= 8 * GiB < parts.per_worker(8, 2)  # only sharded weights would fit
    with pytest.raises(PlanError, match="4-bit"):
        placement(parts, jobs[0], res(device_memory_gb=8, zero_stage=3))
    with pytest.raises(PlanError, match="4-bit"):
        placement(parts, jobs[0], res(workers_per_job=2, zero_stage=3))
    assert placement(parts, jobs[0], res(device_memory_gb=20, zero_stage=3))[:2] == (1, None)  # fits: no ZeRO


def test_fractional_cpus_fill_the_cluster() -> None:
    """Floor division of floats: 2.0 // 0.2 is 9.0, so ten jobs of 0.2 CPU ran nine at a time on 2 CPUs
    (the GPU count next to it was already computed with a tolerance)."""
    for cpus, per, want in ((2.0, 0.2, 10), (1.0, 0.1, 10), (3.0, 0.3, 10), (0.9, 0.3, 3), (4.0, 1.5, 2)):
        spec, _ = _spec({"cpus_per_job": per})
        assert concurrency(spec, {"CPU": cpus}, 50) == want, (cpus, per)
    spec, _ = _spec({"cpus_per_job": 0.1, "gpus_per_job": 1 / 3})
    assert concurrency(spec, {"CPU": 16.0, "GPU": 1.0}, 50) == 3


def _decoder_weights(cfg: dict) -> int:
    """The decoder's matrix weights (``fused_batches.ModelFlops.body``) of a Llama-shaped config."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    return cfg["num_hidden_layers"] * (2 * h * h + 2 * h * kv + 3 * h * inter)


def test_a_fused_step_never_pads_past_what_its_group_estimate_counts(smol_config: str) -> None:
    """Each member's estimate counts its own rows at its own max_seq_len; a fused step pads them to the
    group's longest, splitting by length only where the padding saved outweighs a pass (on a GPU, ~23k
    tokens of SmolLM2). Jobs of 3 and 2 rows of 128 tokens fused with one of 1 x 4096 ran 6 x 4096 tokens
    where 4,736 were counted: ~18 GiB of activations over a group estimated at 7.6 GiB on a 16 GiB device."""
    from adapterfab.jobs.fused_batches import CHUNK_OVERHEAD_FLOPS, step_chunks

    shapes = {"short": (3, 128), "short2": (2, 128), "long": (1, 4096)}
    tenants = [{"tenant": t, "persona": "p", "dataset": "/x.jsonl", "train": {"batch_size": b, "max_seq_len": n}}
               for t, (b, n) in shapes.items()]
    spec, jobs = _spec({"device_memory_gb": 16, "gpus_per_job": 0.5}, tenants, train={"dtype": "bfloat16"})
    planned = plan_batch("b", spec, jobs, smol_config)
    groups = fitted_groups(planned, execution_groups(planned), spec.resources.device_memory_gb)
    overhead = max(1, round(CHUNK_OVERHEAD_FLOPS["cuda"] / (4.0 * _decoder_weights(SMOL))))  # FusedTrainer's
    for g in groups:
        micro = []
        for i in g:  # every row at its job's longest: the most each member's estimate counts
            rows, length = jobs[i].train.batch_size, jobs[i].train.max_seq_len
            ids = torch.ones(rows, length, dtype=torch.long)
            micro.append((i, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}))
        padded = sum(b["input_ids"].numel() for b, _, _ in step_chunks(micro, overhead))
        counted = sum(jobs[i].train.batch_size * jobs[i].train.max_seq_len for i in g)
        assert padded <= counted, f"group {g}: a fused step runs {padded} tokens, its estimate counts {counted}"
        assert not needs_activation_checkpointing([planned[i] for i in g], [jobs[i] for i in g], 16)
    assert sorted(groups) == [[0, 1], [2]]  # equal lengths still fuse


def test_a_recorded_group_the_jobs_no_longer_fuse_in_is_split(tmp_path: Path) -> None:
    """The orchestrator runs the plan recorded at submit but parses the spec again, on its own machine:
    ``dtype: auto`` resolves by the CPU it runs on, so two jobs fused at submit (both float32 there) can
    be float32 and bfloat16 at run time; ``balanced_groups`` keyed a group by its first member and sent
    both to one trainer, which trains every member on the base as it loaded it."""
    from adapterfab.dtypes import cpu_computes_bf16

    (tmp_path / "plain").write_text("flags\t\t: fpu sse2 avx2\n")
    (tmp_path / "amx").write_text("flags\t\t: fpu sse2 avx2 avx512_bf16 amx_bf16\n")
    assert not cpu_computes_bf16(str(tmp_path / "plain")) and cpu_computes_bf16(str(tmp_path / "amx"))

    spec, at_submit = _spec({}, n=3)  # float32 everywhere: one fused group
    planned = plan_batch("b", spec, at_submit, None)
    assert execution_groups(planned) == [[0, 1, 2]]
    at_run = [j if i != 1 else j.model_copy(update={"train": j.train.model_copy(update={"dtype": "bfloat16"})})
              for i, j in enumerate(at_submit)]
    for slots in (1, 2):
        groups = balanced_groups(at_run, execution_groups(planned), slots)
        assert sorted(i for g in groups for i in g) == [0, 1, 2]  # every job once
        for g in groups:
            assert len({fusion_key(at_run[i]) for i in g}) == 1, f"group {g} mixes fusion keys ({slots} slots)"
    assert sorted(balanced_groups(at_run, [[0, 1, 2]], 1)) == [[0, 2], [1]]


def test_the_slots_null_row_is_counted_in_a_group(smol_config: str) -> None:
    """A resident trainer holds K + 1 rows of fp32 weights, gradients and moments for a group of K (row 0
    is the null adapter that rows without one gather); the group's estimate counted K."""
    spec, jobs = _spec({}, n=3, train={"batch_size": 2, "max_seq_len": 128})
    planned = plan_batch("b", spec, jobs, smol_config)
    null = planned[0].trainable_params * 16 / GiB
    assert null > 0.005  # 7 MiB for SmolLM2's r8 q,v LoRA; a QLoRA on all layers of a 7B: ~0.6 GiB
    p = planned[0]
    counted = p.est_weights_gb + 3 * (p.est_memory_gb - p.est_weights_gb)
    assert needs_activation_checkpointing(planned, jobs, counted + null / 2)
    assert not needs_activation_checkpointing(planned, jobs, counted + 2 * null)
    checkpointed = p.est_weights_gb + 3 * p.est_checkpointed_gb
    assert fitted_groups(planned, [[0, 1, 2]], checkpointed + null / 2) == [[0, 1], [2]]
    assert fitted_groups(planned, [[0, 1, 2]], checkpointed + 2 * null) == [[0, 1, 2]]


def test_a_resident_trainer_holds_only_the_slot_rows_of_its_current_group(tiny_model_path: str) -> None:
    """``Slots`` only grows: a trainer that trained a group of 6 kept 7 rows for a later group of 1, which
    the planner had sized (and cut to fit the device) with its own one adapter."""
    from adapterfab.jobs.resident import GroupJob, GroupTask, ResidentWorker

    method = {"name": "lora", "r": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    w = ResidentWorker(tiny_model_path, method, "float32", torch_threads=1)
    spec, jobs = _spec({}, method=method, n=1)
    assert w.trainer.slots.width == plan_batch("b", spec, jobs, tiny_model_path)[0].trainable_params
    rows = [{"input_ids": list(range(5, 5 + n)), "labels": [-100, -100] + list(range(7, 5 + n))} for n in (6, 8, 9)]
    train = {"steps": 2, "batch_size": 2, "learning_rate": 1e-3}
    held: list[int] = []

    def group(name: str, k: int) -> None:
        held.clear()
        task = GroupTask(name, [GroupJob(f"{name}{i}", w.method.model_dump(), train, rows) for i in range(k)])
        result = w.train_group(task, on_iteration=lambda _: held.append(w.trainer.slots.w.shape[0]))
        assert all(o.error is None and o.adapter is not None for o in result.outcomes)

    group("six", 6)
    assert set(held) == {7}  # six adapters and the null row
    group("one", 1)
    assert set(held) == {2}, f"a group of one trained with {set(held)} slot rows"
    assert w.trainer.slots.w.shape[0] == 1 and not w.trainer.slot_keys()  # between groups: the null row only


def test_a_warm_trainer_is_not_leased_across_a_changed_chat_template(tmp_path: Path) -> None:
    """A trainer's key covered the base's weights but not its config and tokenizer: after the chat template
    was fixed, the next batch's jobs (which retrain: their fingerprint covers the template) leased a trainer
    kept warm with the old tokenizer and config. The orchestrator is a new process per batch (here:
    ``setup_fingerprint``'s per-process cache cleared)."""
    from adapterfab.basemodel import setup_fingerprint
    from adapterfab.jobs.trainers import TrainerSpec

    (tmp_path / "config.json").write_text(json.dumps(SMOL))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    method = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    spec = TrainerSpec(str(tmp_path), "f" * 64, method, "float32", None, 1.0, 0.0)
    before = spec.key()
    setup_fingerprint.cache_clear()
    assert spec.key() == before  # nothing changed: the warm trainer is leased
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages | fixed }}"}))
    setup_fingerprint.cache_clear()
    assert spec.key() != before


def test_one_forced_worker_that_fits_with_activation_checkpointing_stands(smol_config: str) -> None:
    """Forcing one worker is how a job too big for a device without activation checkpointing trains on one
    device with it (a resident trainer turns it on when its group does not fit): the forced-placement check
    refused it against the estimate without checkpointing. A job that does not fit even checkpointed is
    still refused."""
    train = {"batch_size": 8, "max_seq_len": 2048}
    spec, jobs = _spec({"workers_per_job": 1, "device_memory_gb": 12.5}, train=train, n=1)
    planned = plan_batch("b", spec, jobs, smol_config)[0]
    assert planned.workers == 1 and planned.est_memory_gb > 12.5  # does not fit without checkpointing ...
    assert needs_activation_checkpointing([planned], jobs, 12.5)  # ... so its trainer checkpoints
    assert planned.est_weights_gb + planned.est_checkpointed_gb <= 12.5
    spec, jobs = _spec({"workers_per_job": 1, "device_memory_gb": 4.0}, train=train, n=1)
    with pytest.raises(PlanError, match="workers_per_job forces one worker"):
        plan_batch("b", spec, jobs, smol_config)
