"""Batch → jobs with their resources, estimates and output adapter ids. Pure: no Ray, no loading.

The memory estimate of one job: base weights at the training dtype (NF4 ~0.53 B/param), adapter
params with grads and AdamW moments, activations ~ 28 values per token, layer and hidden unit, and the
logits with their loss copies (fp32 logits, log-softmax and gradient: 12 B per token and vocabulary
entry; 14 B when the model runs in bf16 and the loss upcasts), and with LoRA dropout the dropped fp32
copy and mask of every adapted input. The constants were fitted to peak RSS
measured on SmolLM2 (fp32 and bf16, 1.5k-4k tokens per step, within 5%), and
tests/unit/test_plan_memory.py checks the estimate against a measured training step.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _model_config(base_path: str | None) -> Any:
    if not base_path or not (Path(base_path) / "config.json").exists():
        return None
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


def plan_batch(batch_id: str, spec: BatchSpec, jobs: list[JobSpec], base_path: str | None = None
               ) -> list[PlannedJob]:
    cfg = _model_config(base_path)
    group_of = {}
    for n, g in enumerate(fusion_groups(jobs), start=1):
        for i in g:
            group_of[i] = f"g{n}" if len(g) > 1 else None
    out = []
    for i, j in enumerate(jobs):
        method = get_method(j.method.name)
        trainable = method.trainable_params(cfg, j.method) if (cfg is not None and method.trainable_params) else None
        mem = None
        if cfg is not None:
            quantized = bool(method.base_load_kwargs(j.method))  # 4-bit NF4 + double quant: ~0.53 B/param
            weights = _param_count(cfg) * (NF4_BYTES_PER_PARAM if quantized else _BYTES[j.train.dtype])
            adapter = (trainable or 0) * 4 * 4  # fp32 param + grad + two Adam moments
            tokens = j.train.batch_size * j.train.max_seq_len
            acts = (tokens * cfg.hidden_size * cfg.num_hidden_layers * ACTIVATION_VALUES_PER_TOKEN_LAYER_HIDDEN
                    * _BYTES[j.train.dtype])
            logits = tokens * cfg.vocab_size * LOGIT_BYTES_PER_TOKEN_VOCAB[j.train.dtype]
            if getattr(j.method, "dropout", 0.0):  # PEFT keeps each adapted input's dropped fp32 copy + mask
                n_targets = len(j.method.resolved_targets())  # type: ignore[attr-defined]
                acts += tokens * cfg.num_hidden_layers * n_targets * cfg.hidden_size * 4 * 2
            mem = round((weights + adapter + acts + logits) / 2**30, 2)
        aid = AdapterId(j.tenant, j.persona)
        out.append(PlannedJob(
            job_id=job_id(batch_id, j.tenant, j.persona), adapter=aid.key, registry_name=aid.registry_name,
            method=j.method.name, dataset=j.dataset, steps=j.train.steps, batch_size=j.train.batch_size,
            cpus=spec.resources.cpus_per_job, gpus=spec.resources.gpus_per_job,
            trainable_params=trainable, est_memory_gb=mem, fused_group=group_of[i],
        ))
    return out


FUSED_GROUP_MAX = 8  # K: more rows per step than this stops paying on one device (fused_probe.py)
_FAMILY = {"lora": "lora", "qlora": "lora", "lora_xs": "lora_xs"}


def fusion_key(job: JobSpec) -> tuple | None:
    """Jobs with equal keys can train fused (jobs/fused.py): same adapter family, rank and modules on
    the same base loaded the same way (dtype, quantization); no dropout. None: trains alone."""
    m = job.method
    family = _FAMILY.get(m.name)
    if family is None or getattr(m, "dropout", 0.0):
        return None
    quant = tuple((k, str(v)) for k, v in sorted(m.model_dump().items())
                  if k in ("quant_type", "double_quant", "compute_dtype", "quantize"))
    return (family, m.name == "qlora", m.r, tuple(sorted(m.resolved_targets())), job.train.dtype,  # type: ignore[attr-defined]
            quant)


def fusion_groups(jobs: list[JobSpec], k_max: int = FUSED_GROUP_MAX) -> list[list[int]]:
    """Indexes of ``jobs`` packed into fused groups of at most ``k_max`` (in spec order); a job that
    cannot fuse, or is alone with its key, forms a group of one."""
    by_key: dict[tuple, list[int]] = {}
    groups: list[list[int]] = []
    for i, j in enumerate(jobs):
        key = fusion_key(j)
        if key is None:
            groups.append([i])
            continue
        by_key.setdefault(key, []).append(i)
    for members in by_key.values():
        groups += [members[i:i + k_max] for i in range(0, len(members), k_max)]
    return sorted(groups, key=lambda g: g[0])


def concurrency(spec: BatchSpec, cluster_cpus: float, n_jobs: int) -> int:
    """How many jobs run at once: what the spec caps, what the cluster's CPUs fit, at least one."""
    fit = max(1, int(cluster_cpus // spec.resources.cpus_per_job))
    cap = spec.resources.max_concurrent_jobs or fit
    return max(1, min(cap, fit, n_jobs))


def plan_json(planned: list[PlannedJob]) -> str:
    return json.dumps([p.to_dict() for p in planned], indent=2)
