"""QLoRA (Dettmers et al. 2023): the frozen base in 4-bit NormalFloat with double quantization and
bf16 compute, LoRA on all linear layers, paged AdamW (see ``_paged_adamw``: the state of small
tensors is never paged, and then torch's AdamW does the same update). The only module that imports
bitsandbytes.

The adapter is a standard PEFT LoRA adapter; the registry records that it was trained on a 4-bit base
(``quantization.*`` tags) so serving can choose to load the base the same way.

bitsandbytes 0.50.2 on CPU: never run the 4-bit model in eval/no-grad mode and then keep training
(the Linear4bit weights get repacked for CPU inference and gradients silently stop: tests/unit/test_methods.py);
``train_loop.train_adapter`` evaluates only at the end, after the last optimizer step.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from adapterfab.methods.base import LOW_RANK, Method, MethodConfig, register_method
from adapterfab.methods.lora import ALL_LINEAR, _trainable
from adapterfab.methods.quant import keep_trainable_layout, quantization_config, quantization_tags


class QLoraConfig(MethodConfig):
    name: Literal["qlora"] = "qlora"
    r: int = Field(16, ge=1, le=1024, description="rank")
    alpha: float = Field(32.0, gt=0, description="the update is scaled by alpha/r")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="auto: bfloat16 on a GPU or a CPU with bf16 arithmetic, else float32")
    gradient_checkpointing: bool = Field(False, description="trade compute for activation memory")

    def resolved_targets(self) -> list[str]:
        return list(ALL_LINEAR) if self.target_modules == "all-linear" else list(self.target_modules)


def _load_kwargs(cfg: QLoraConfig) -> dict:
    return {"quantization_config": quantization_config(cfg)}


def _apply(model: Any, cfg: QLoraConfig, basis: Any = None) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    keep_trainable_layout(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    peft_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=cfg.resolved_targets(), task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, peft_cfg)


def _load(base: Any, adapter_dir: Any, basis: Any = None) -> Any:
    """Load on the 4-bit base with the same kernels as in training (no CPU inference repack)."""
    from peft import PeftModel

    keep_trainable_layout(base)
    return PeftModel.from_pretrained(base, str(adapter_dir))


PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages only optimizer state of tensors this large or larger


def _paged_adamw(params: list, lr: float, weight_decay: float) -> Any:
    """Paged AdamW (32-bit state). bitsandbytes pages the state of tensors of at least
    ``PAGED_MIN_NUMEL`` elements and keeps smaller ones in plain device memory. When every trainable
    tensor is smaller (LoRA factors up to r·in < 100k, the usual case) nothing would be paged, and the
    same AdamW update runs as torch's multi-tensor AdamW: bitsandbytes' step launches one kernel per
    tensor and waits for the whole device after each (``torch.cuda.synchronize``), which for a fused
    group of K adapters is K × (tensors) waits per step. Adapters with a larger tensor get
    ``bnb.optim.PagedAdamW``."""
    import warnings

    import torch

    params = list(params)
    if all(p.numel() < PAGED_MIN_NUMEL for p in params):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
    from adapterfab.extras import need

    bnb = need("bitsandbytes")

    with warnings.catch_warnings():  # on CPU it falls back to non-paged behaviour and says so
        warnings.simplefilter("ignore")
        return bnb.optim.PagedAdamW(params, lr=lr, weight_decay=weight_decay)


# r 16 on all linear layers: persona 10/10 and 8/8 facts kept on SmolLM2 at lr 3e-4 in 20 steps, where
# 5e-4 lost 2 facts (bench/methods.py measures it; bench/RESULTS.md). Replay (adapterfab/replay.py) at
# weight 2: the speaking-style persona keeps 10/10 adherence (5/10 at weight 5).
DEFAULT_TRAIN = {"learning_rate": 3e-4, "steps": 20, "replay_weight": 2.0}

QLORA = register_method(Method(
    name="qlora", config_cls=QLoraConfig, apply=_apply, base_load_kwargs=_load_kwargs,
    trainable_params=_trainable, make_optimizer=_paged_adamw, extra_tags=quantization_tags, load=_load,
    default_train=DEFAULT_TRAIN, family=LOW_RANK,
))
