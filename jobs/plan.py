"""Batch → jobs with their resources, estimates and output adapter ids. Pure: no Ray, no loading.

The memory estimate of one job: base weights at the training dtype (NF4 ~0.53 B/param), adapter
params with grads and AdamW moments, activations ~ 28 values per token, layer and hidden unit, and the
logits with their loss copies (fp32 logits, log-softmax and gradient: 12 B per token and vocabulary
entry; 14 B when the model runs in bf16 and the loss upcasts), and with LoRA dropout the dropped fp32
copy and mask of every adapted input. The constants were fitted to peak RSS
measured on SmolLM2 (fp32 and bf16, 1.5k-4k tokens per step, within 5%), and
tests/unit/test_plan_memory.py checks the estimate against a measured training step.

The time estimate of one job: its training FLOPs over the rate its resources achieve. A frozen base
costs ~4 FLOPs per weight and token (the forward pass and the input gradients; the adapter's own
gradients are negligible) plus causal attention (~6 × sequence × attention width × layers per token),
counted at full ``max_seq_len`` rows, so an upper bound when rows are shorter; the rates are
``resources.train_gflops_per_cpu`` / ``train_tflops_per_gpu`` (defaults measured here; see
bench/RESULTS.md), times the job's workers.

Placement: a job whose estimate exceeds ``resources.device_memory_gb`` runs as a multi-worker Ray Train
job with DeepSpeed ZeRO, on the fewest workers that fit: ZeRO-2 (gradients and optimizer state sharded)
when that suffices, else ZeRO-3 (the frozen weights sharded too). Jobs that fit one worker and share a
fusion key train fused, up to FUSED_GROUP_MAX per group.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adapterfab.env import env
from adapterfab.ids import AdapterId, job_id
from adapterfab.methods import get_method
from adapterfab.spec import BatchSpec, JobSpec

_BYTES = {"float32": 4, "bfloat16": 2}
ACTIVATION_VALUES_PER_TOKEN_LAYER_HIDDEN = 28
LOGIT_BYTES_PER_TOKEN_VOCAB = {"float32": 12, "bfloat16": 14}
NF4_BYTES_PER_PARAM = 0.53


@dataclass(frozen=True)
class PlannedJob:
    job_id: str
    adapter: str  # tenant/persona (the version is assigned at registration)
    registry_name: str
    method: str
    dataset: str
    steps: int
    batch_size: int
    cpus: float
    gpus: float
    trainable_params: int | None
    est_memory_gb: float | None
    fused_group: str | None = None  # jobs with the same group train together over one resident base
    workers: int = 1  # data-parallel Ray Train workers (> 1: DeepSpeed ZeRO)
    zero_stage: int | None = None  # 2 or 3 when workers > 1
    est_train_s: float | None = None  # training steps only (no data, eval or registration)
    est_weights_gb: float | None = None  # of est_memory_gb: the base's weights (shared by a fused group)
    est_checkpointed_gb: float | None = None  # with activation checkpointing, the base's weights left out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# what the plan reads of a base's config; a config.json that names them all (and whether the embeddings
# are tied, whose default differs by architecture) is read as it is, without importing transformers
# (seconds of every `submit`); any other goes through AutoConfig
PLAN_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def _model_config(base_path: str | None) -> Any:
    if not base_path or not (Path(base_path) / "config.json").exists():
        return None
    from types import SimpleNamespace

    try:
        raw = json.loads((Path(base_path) / "config.json").read_text())
    except (OSError, ValueError):
        raw = None
    if isinstance(raw, dict) and all(isinstance(raw.get(k), int) for k in PLAN_CONFIG_KEYS) \
            and isinstance(raw.get("tie_word_embeddings"), bool) and "text_config" not in raw:
        return SimpleNamespace(**{k: raw[k] for k in (*PLAN_CONFIG_KEYS, "tie_word_embeddings")},
                               num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
                               head_dim=raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"])
    from adapterfab.threads import importing

    with importing():
        from transformers import AutoConfig
    return AutoConfig.from_pretrained(base_path)


def _param_count(cfg: Any) -> int:
    h, inter, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", heads)
    hd = getattr(cfg, "head_dim", None) or h // heads
    per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * inter + 2 * h
    emb = vocab * h * (1 if getattr(cfg, "tie_word_embeddings", False) else 2)
    return layers * per_layer + emb + h


def train_flops(cfg: Any, job: JobSpec) -> float:
    """FLOPs of a job's training steps on a frozen base (see the module docstring)."""
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    width = heads * (getattr(cfg, "head_dim", None) or h // heads)
    matmul = _param_count(cfg)
    if not getattr(cfg, "tie_word_embeddings", False):
        matmul -= cfg.vocab_size * h  # the input embedding is a lookup; the output head is a product
    seq = job.train.max_seq_len
    per_token = 4 * matmul + 6 * seq * width * layers
    return float(per_token * seq * job.train.batch_size * job.train.steps)


def train_seconds(cfg: Any, job: JobSpec, resources: Any, workers: int = 1) -> float:
    rate = (resources.gpus_per_job * resources.train_tflops_per_gpu * 1e12 if resources.gpus_per_job > 0
            else resources.cpus_per_job * resources.train_gflops_per_cpu * 1e9)
    return train_flops(cfg, job) / (rate * max(1, workers))


class PlanError(ValueError):
    """A job that no packing fits (the message says what to change)."""


@dataclass(frozen=True)
class MemoryParts:
    """A job's training memory on one worker, in bytes, split the way ZeRO shards it."""

    weights: float  # the frozen base at its training dtype (or NF4)
    adapter_state: float  # trainable params with grads and two AdamW moments (fp32)
    activations: float  # for the whole batch; data parallelism divides it
    logits: float
    gathered: float  # ZeRO-3: the largest weight one forward gathers at once (embedding or one layer)

    def checkpointed(self, layers: int) -> float:
        """One worker's memory with activation checkpointing, the weights left out: each layer keeps its
        input (one value per token and hidden unit), one layer's activations are recomputed at a time;
        the logits and the adapter's state stay."""
        kept = self.activations / ACTIVATION_VALUES_PER_TOKEN_LAYER_HIDDEN + self.activations / max(1, layers)
        return self.adapter_state + self.logits + min(self.activations, kept)

    def per_worker(self, workers: int = 1, stage: int | None = None) -> float:
        n = max(1, workers)
        per_batch = (self.activations + self.logits) / n
        if stage == 3:
            return (self.weights + self.adapter_state) / n + self.gathered + per_batch
        if stage == 2:  # the fp32 params stay whole; gradients and moments are sharded
            return self.weights + self.adapter_state / 4 + self.adapter_state * 3 / 4 / n + per_batch
        return self.weights + self.adapter_state + per_batch


def memory_parts(cfg: Any, job: JobSpec, trainable: int | None) -> MemoryParts:
    method = get_method(job.method.name)
    quantized = bool(method.base_load_kwargs(job.method))  # 4-bit NF4 + double quant: ~0.53 B/param
    nbytes = _BYTES[job.train.dtype]
    weights = _param_count(cfg) * (NF4_BYTES_PER_PARAM if quantized else nbytes)
    adapter = (trainable or 0) * 4 * 4  # fp32 param + grad + two Adam moments
    tokens = job.train.batch_size * job.train.max_seq_len
    acts = tokens * cfg.hidden_size * cfg.num_hidden_layers * ACTIVATION_VALUES_PER_TOKEN_LAYER_HIDDEN * nbytes
    logits = tokens * cfg.vocab_size * LOGIT_BYTES_PER_TOKEN_VOCAB[job.train.dtype]
    if getattr(job.method, "dropout", 0.0):  # PEFT keeps each adapted input's dropped fp32 copy + mask
        n_targets = len(job.method.resolved_targets())  # type: ignore[attr-defined]
        acts += tokens * cfg.num_hidden_layers * n_targets * cfg.hidden_size * 4 * 2
    layer = (_param_count(cfg) - cfg.vocab_size * cfg.hidden_size) / max(1, cfg.num_hidden_layers)
    gathered = max(layer, cfg.vocab_size * cfg.hidden_size) * nbytes * 2  # the current one and a prefetch
    return MemoryParts(weights, adapter, acts, logits, gathered)


def placement(parts: MemoryParts | None, job: JobSpec, resources: Any, floor: float | None = None
              ) -> tuple[int, int | None, float | None]:
    """(workers, ZeRO stage, estimated bytes per worker) for one job: one worker when it fits
    ``device_memory_gb`` (or no limit is set); else the fewest workers up to ``max_workers_per_job``
    that fit, with ZeRO-2 when sharding gradients and optimizer state suffices and ZeRO-3 (the weights
    sharded too) otherwise. ``workers_per_job`` / ``zero_stage`` force the choice; a forced choice that
    does not fit ``device_memory_gb`` (or ZeRO-3 forced on a 4-bit base, which it cannot shard) is a
    PlanError, as a job no packing fits. ``floor``: the bytes one worker needs at least where it can train
    with activation checkpointing (a resident trainer turns it on when a group does not fit): one forced
    worker is held to that."""
    forced_n, forced_stage = resources.workers_per_job, resources.zero_stage
    forced_stage = None if forced_stage == "auto" else int(forced_stage)
    cap = resources.device_memory_gb * 2**30 if resources.device_memory_gb else None
    quantized = bool(get_method(job.method.name).base_load_kwargs(job.method))

    def stages() -> list[int]:
        options = [2] if quantized else [2, 3]  # a 4-bit base cannot be sharded by ZeRO-3
        return [st for st in options if st == forced_stage] if forced_stage else options

    def refuse(why: str, change: str = "raise resources.max_workers_per_job") -> PlanError:
        need = f"{parts.per_worker() / 2**30:.2f} GiB on one worker" if parts is not None else "more than one worker"
        return PlanError(f"{job.tenant}/{job.persona} needs {need}, more than resources.device_memory_gb="
                         f"{resources.device_memory_gb}, and {why}; give the workers more memory, {change}, or "
                         "lower train.batch_size / train.max_seq_len")

    four_bit = "a 4-bit (QLoRA) base cannot be sharded with ZeRO-3"
    if forced_n is not None:
        change = "unset or raise resources.workers_per_job"
        if forced_n == 1:
            need = floor if floor is not None else parts.per_worker() if parts is not None else None
            if need is not None and cap is not None and need > cap:
                raise refuse("resources.workers_per_job forces one worker", change)
            return 1, None, parts.per_worker() if parts else None
        options = stages()  # the cheapest stage that fits on the forced workers
        if not options:
            raise PlanError(f"{job.tenant}/{job.persona}: resources.workers_per_job={forced_n} trains it with "
                            f"ZeRO-{forced_stage} (resources.zero_stage), but {four_bit}; use zero_stage 2 or auto")
        for stage in options:
            if parts is None or cap is None or parts.per_worker(forced_n, stage) <= cap:
                return forced_n, stage, parts.per_worker(forced_n, stage) if parts else None
        assert parts is not None
        raise refuse(f"even ZeRO-{options[-1]} on the {forced_n} workers resources.workers_per_job forces needs "
                     f"{parts.per_worker(forced_n, options[-1]) / 2**30:.2f} GiB per worker", change)
    if parts is None or cap is None or parts.per_worker() <= cap:
        return 1, None, parts.per_worker() if parts else None
    for n in range(2, resources.max_workers_per_job + 1):
        for stage in stages():
            if parts.per_worker(n, stage) <= cap:
                return n, stage, parts.per_worker(n, stage)
    if quantized and forced_stage != 2:
        raise refuse(four_bit)
    raise refuse(f"even ZeRO-{stages()[-1]} on {resources.max_workers_per_job} workers needs "
                 f"{parts.per_worker(resources.max_workers_per_job, stages()[-1]) / 2**30:.2f} GiB per worker")


def plan_batch(batch_id: str, spec: BatchSpec, jobs: list[JobSpec], base_path: str | None = None
               ) -> list[PlannedJob]:
    """Raises PlanError when a job fits no packing."""
    cfg = _model_config(base_path)
    shapes = []
    weights: list[float | None] = []
    floors: list[float | None] = []
    for j in jobs:
        method = get_method(j.method.name)
        try:
            trainable = method.trainable_params(cfg, j.method) if (cfg is not None and method.trainable_params) \
                else None
        except KeyError:  # a module the method's shape table does not know (a base of another architecture)
            trainable = None
        parts = memory_parts(cfg, j, trainable) if cfg is not None else None
        floor = None  # a job a resident trainer trains may use activation checkpointing on one worker
        if parts is not None and trainer_key(j.method, j.train.dtype) is not None:
            floor = parts.weights + parts.checkpointed(cfg.num_hidden_layers) + (trainable or 0) * 16
        shapes.append((trainable, placement(parts, j, spec.resources, floor)))
        weights.append(round(parts.weights / 2**30, 3) if parts is not None else None)
        floors.append(round(parts.checkpointed(cfg.num_hidden_layers) / 2**30, 3) if parts is not None else None)
    multi = {i for i, (_, (n, _, _)) in enumerate(shapes) if n > 1}
    group_of: dict[int, str | None] = dict.fromkeys(range(len(jobs)))
    fused = [g for g in fusion_groups(jobs, exclude=multi) if len(g) > 1]
    for n, g in enumerate(fused, start=1):
        for i in g:
            group_of[i] = f"g{n}"
    out = []
    for i, (j, (trainable, (workers, stage, mem))) in enumerate(zip(jobs, shapes)):
        aid = AdapterId(j.tenant, j.persona)
        out.append(PlannedJob(
            job_id=job_id(batch_id, j.tenant, j.persona), adapter=aid.key, registry_name=aid.registry_name,
            method=j.method.name, dataset=j.dataset, steps=j.train.steps, batch_size=j.train.batch_size,
            cpus=spec.resources.cpus_per_job, gpus=spec.resources.gpus_per_job,
            trainable_params=trainable, est_memory_gb=round(mem / 2**30, 2) if mem is not None else None,
            fused_group=group_of[i], workers=workers, zero_stage=stage,
            est_train_s=round(train_seconds(cfg, j, spec.resources, workers), 1) if cfg is not None else None,
            est_weights_gb=weights[i], est_checkpointed_gb=floors[i],
        ))
    return out


def needs_activation_checkpointing(members: list[PlannedJob], jobs: list[JobSpec], device_memory_gb: float | None
                                   ) -> bool:
    """Whether a fused group trains with activation checkpointing: a member's method asks for it, or the
    group's estimate (the base's weights and the slots' null row once, plus every member's adapter,
    activations and logits) exceeds ``device_memory_gb``."""
    if any(getattr(j.method, "gradient_checkpointing", False) for j in jobs):
        return True
    if not device_memory_gb or any(p.est_memory_gb is None or p.est_weights_gb is None for p in members):
        return False
    weights = max(p.est_weights_gb or 0.0 for p in members) + null_slot_gb(members)
    return weights + sum((p.est_memory_gb or 0.0) - (p.est_weights_gb or 0.0) for p in members) > device_memory_gb


def null_slot_gb(members: list[PlannedJob]) -> float:
    """What a resident trainer holds besides its group's adapters: the slot buffers' null row (weights,
    gradients and two moments, fp32, of one adapter: ``jobs/fused_bank.Slots``), which rows without an
    adapter gather; a group of K holds K + 1 rows."""
    return max((p.trainable_params or 0) for p in members) * 16 / 2**30 if members else 0.0


def fitted_groups(planned: list[PlannedJob], groups: list[list[int]], device_memory_gb: float | None
                  ) -> list[list[int]]:
    """``groups`` with every fused group cut, in order, into groups that fit ``device_memory_gb`` even with
    activation checkpointing: the base's weights and the slots' null row once, plus each member's
    checkpointed estimate (its logits and adapter state stay whatever is recomputed). Each job was
    placed to fit alone; without a limit or an estimate the groups stand."""
    if not device_memory_gb:
        return groups
    out: list[list[int]] = []
    for g in groups:
        members = [planned[i] for i in g]
        if len(g) < 2 or any(p.est_checkpointed_gb is None or p.est_weights_gb is None for p in members):
            out.append(g)
            continue
        weights, cut, used = max(p.est_weights_gb or 0.0 for p in members) + null_slot_gb(members), [], 0.0
        for i in g:
            need = planned[i].est_checkpointed_gb or 0.0
            if cut and weights + used + need > device_memory_gb:
                out.append(cut)
                cut, used = [], 0.0
            cut.append(i)
            used += need
        out.append(cut)
    return out


def execution_groups(planned: list[PlannedJob]) -> list[list[int]]:
    """Indexes of the planned jobs as the orchestrator runs them: a fused group together, every other
    job (single- or multi-worker) alone; in spec order."""
    groups: dict[str, list[int]] = {}
    out: list[list[int]] = []
    for i, p in enumerate(planned):
        if p.fused_group is None:
            out.append([i])
        elif p.fused_group in groups:
            groups[p.fused_group].append(i)
        else:
            groups[p.fused_group] = [i]
            out.append(groups[p.fused_group])
    return out


FUSED_GROUP_MAX = 8  # K: more rows per step than this stops paying on one device (bench/fused_step.py)


def trainer_key(method: Any, dtype: str) -> tuple | None:
    """What a resident trainer is built for (jobs/resident.py): the adapter family, rank and modules on
    the base loaded the same way (dtype, quantization). Jobs with equal keys can share a trainer; None:
    no resident trainer can train this method."""
    family = get_method(method.name).family
    if family is None:
        return None
    quant = tuple((k, str(v)) for k, v in sorted(method.model_dump().items())
                  if k in ("quant_type", "double_quant", "compute_dtype", "quantize"))
    return (family, method.name, method.r, tuple(sorted(method.resolved_targets())), dtype, quant)


def fusion_key(job: JobSpec) -> tuple | None:
    """Jobs with equal keys can train fused (jobs/fused.py): the same trainer key, the same LoRA
    dropout (one rate per fused step) and the same ``max_seq_len``: a fused step pads every row to its
    longest (``fused_batches.step_chunks`` splits by length only where that saves more than a pass
    costs: on a GPU, thousands of tokens), while each member's memory estimate counts its own rows at
    its own ``max_seq_len``; with equal lengths no step pads past what the group's estimate counts.
    None: trains alone."""
    key = trainer_key(job.method, job.train.dtype)
    return None if key is None else (*key, float(getattr(job.method, "dropout", 0.0) or 0.0),
                                     job.train.max_seq_len)


def balanced_groups(jobs: list[JobSpec], groups: list[list[int]], slots: int, k_max: int = FUSED_GROUP_MAX
                    ) -> list[list[int]]:
    """The planner's fused groups re-cut for ``slots`` trainers computing at once: each fusion key's jobs
    in as few groups of at most ``k_max`` as keep every slot busy, sizes as equal as possible (12 jobs
    on 2 trainers: 6 + 6, not 8 + 4 with one trainer idle half the time). Groups of one stay alone.
    ``slots`` counts devices that compute side by side (CPU slots, whole GPUs: trainers sharing one GPU
    gain nothing from smaller groups)."""
    by_key: dict[tuple, list[int]] = {}
    singles: list[list[int]] = []
    for g in groups:  # each member by its own key: a recorded plan may group what these jobs no longer fuse
        for i in g:  # (planned on another machine, where ``dtype: auto`` resolved otherwise; older code)
            key = fusion_key(jobs[i]) if len(g) > 1 else None
            if key is None:
                singles.append([i])
            else:
                by_key.setdefault(key, []).append(i)
    out = list(singles)
    for members in by_key.values():
        n = len(members)
        count = max(-(-n // k_max), min(n, slots))
        count = min(n, -(-count // slots) * slots) if slots > 1 else count
        size, extra = divmod(n, count)
        at = 0
        for i in range(count):
            take = size + (1 if i < extra else 0)
            out.append(members[at:at + take])
            at += take
    return sorted(out, key=lambda g: g[0])


# the first group each trainer slot trains, when it has more than one to train (0: no starter groups)
STARTER_GROUP_JOBS = env().starter_group_jobs


def starter_groups(groups: list[list[int]], slots: int, size: int = STARTER_GROUP_JOBS) -> list[list[int]]:
    """The first group of each of ``slots`` trainers cut to its first ``size`` jobs, the rest of it queued
    right behind, when the batch has more groups than slots. A fused step costs about its rows on a
    device that is already full (a CPU, a busy GPU), so a starter group of 2 reaches its first step in a
    quarter of a K=8 group's step and its adapters come out first, while the slot's total work stays
    the same; the first window of data (the starters) is small and quick to prepare. A batch with one
    group per slot or fewer is left as it is (there, splitting would only add a group)."""
    if size < 1 or slots < 1 or len(groups) <= slots:
        return groups
    head, rest = groups[:slots], groups[slots:]
    starters = [g[:size] for g in head]
    remainders = [g[size:] for g in head if len(g) > size]
    return starters + remainders + rest


def fusion_groups(jobs: list[JobSpec], k_max: int = FUSED_GROUP_MAX, exclude: set[int] | frozenset = frozenset()
                  ) -> list[list[int]]:
    """Indexes of ``jobs`` packed into fused groups of at most ``k_max`` (in spec order); a job that
    cannot fuse (or is in ``exclude``: multi-worker jobs), or is alone with its key, forms a group of one."""
    by_key: dict[tuple, list[int]] = {}
    groups: list[list[int]] = []
    for i, j in enumerate(jobs):
        key = None if i in exclude else fusion_key(j)
        if key is None:
            groups.append([i])
            continue
        by_key.setdefault(key, []).append(i)
    for members in by_key.values():
        groups += [members[i:i + k_max] for i in range(0, len(members), k_max)]
    return sorted(groups, key=lambda g: g[0])


def concurrency(spec: BatchSpec, cluster: dict[str, float], n_jobs: int) -> int:
    """How many jobs run at once: what the spec caps, what the cluster's CPUs (and GPUs, for GPU
    jobs; fractions pack several per GPU) fit, at least one. Ray queues what does not fit yet."""
    r = spec.resources
    fit = max(1, int(cluster.get("CPU", 1) / r.cpus_per_job + 1e-9))  # (2.0 // 0.2 is 9.0)
    if r.gpus_per_job > 0:
        fit = min(fit, max(1, int(cluster.get("GPU", 0) / r.gpus_per_job + 1e-9)))
    cap = spec.resources.max_concurrent_jobs or fit
    return max(1, min(cap, fit, n_jobs))


def plan_json(planned: list[PlannedJob]) -> str:
    return json.dumps([p.to_dict() for p in planned], indent=2)
