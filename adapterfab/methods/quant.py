"""A 4-bit base through bitsandbytes, for every method that trains on one (QLoRA; LoRA-XS with
``quantize: nf4``) and for the fused trainer that keeps such a base resident: its ``BitsAndBytesConfig``,
the registry tags that say how it was loaded, and the CPU pitfall that silently stops gradients
(``keep_trainable_layout``)."""

from __future__ import annotations

from typing import Any


def quantization_config(cfg: Any) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=getattr(cfg, "quant_type", "nf4"),
        bnb_4bit_use_double_quant=getattr(cfg, "double_quant", True),
        bnb_4bit_compute_dtype=getattr(torch, _compute_dtype(cfg)),
    )


def _compute_dtype(cfg: Any) -> str:
    """The config's compute dtype; ``auto`` left unresolved (a config made outside a spec) is resolved
    for this process's device."""
    cd = getattr(cfg, "compute_dtype", "bfloat16")
    if cd == "auto":
        import torch

        from adapterfab.dtypes import auto_dtype

        cd = auto_dtype(gpu=torch.cuda.is_available())
    return cd


def keep_trainable_layout(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout when the model runs
    in eval/no-grad mode: after that repack, backward through the layer silently yields no gradient
    (tests/unit/test_lora_xs.py, test_methods.py). Returns how many 4-bit layers were set."""
    from adapterfab.extras import need

    bnb = need("bitsandbytes")

    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def quantization_tags(cfg: Any) -> dict[str, str]:
    """Registry tags for the 4-bit base ``quantization_config(cfg)`` loads (same defaults)."""
    return {"quantization.bits": "4", "quantization.type": getattr(cfg, "quant_type", "nf4"),
            "quantization.double_quant": str(getattr(cfg, "double_quant", True)).lower(),
            "quantization.compute_dtype": _compute_dtype(cfg)}
