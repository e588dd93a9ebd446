"""LoRA (Hu et al. 2021): h = W0 x + (alpha/r) B A x, through PEFT."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from adapterfab.methods.base import LOW_RANK, Method, MethodConfig, register_method

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraConfig(MethodConfig):
    name: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, le=1024, description="rank")
    alpha: float = Field(16.0, gt=0, description="scaling numerator; the update is scaled by alpha/r")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="module names to adapt, or 'all-linear'",
    )

    def resolved_targets(self) -> list[str]:
        return list(ALL_LINEAR) if self.target_modules == "all-linear" else list(self.target_modules)


def _apply(model: Any, cfg: LoraConfig, basis: Any = None) -> Any:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.resolved_targets(),
        task_type="CAUSAL_LM",
        bias="none",
    )
    return get_peft_model(model, peft_cfg)


def _trainable(model_config: Any, cfg: LoraConfig) -> int:
    """r * (in + out) per adapted module, from the base's config (Llama-shaped models)."""
    h = model_config.hidden_size
    inter = model_config.intermediate_size
    heads = model_config.num_attention_heads
    kv = getattr(model_config, "num_key_value_heads", heads)
    head_dim = getattr(model_config, "head_dim", None) or h // heads
    shapes = {
        "q_proj": (h, heads * head_dim),
        "k_proj": (h, kv * head_dim),
        "v_proj": (h, kv * head_dim),
        "o_proj": (heads * head_dim, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    per_layer = sum(cfg.r * (shapes[m][0] + shapes[m][1]) for m in cfg.resolved_targets())
    return per_layer * model_config.num_hidden_layers


# r 8 on q,v, 30 steps of 8 rows at lr 1e-3 learn the quality benchmark's personas on SmolLM2; alone they
# keep 62-88 % of the facts the base states, with replay at weight 5 (adapterfab/replay.py) 90-97 % at
# the same adherence, for about 1.3x the step time (bench/RESULTS.md, "Replay in the product").
DEFAULT_TRAIN = {"learning_rate": 1e-3, "steps": 30, "replay_weight": 5.0}

LORA = register_method(Method(name="lora", config_cls=LoraConfig, apply=_apply, trainable_params=_trainable,
                              default_train=DEFAULT_TRAIN, family=LOW_RANK))
