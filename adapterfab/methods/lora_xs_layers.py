"""LoRA-XS's torch modules (adapterfab/methods/lora_xs.py): the wrapped Linear that adds
``s·((x A) R) B`` and the model that holds them. Imported when a LoRA-XS adapter is built or loaded, so
that importing the method registry does not import torch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from adapterfab.methods.lora_xs import R_INIT_STD, write_adapter

if TYPE_CHECKING:
    from adapterfab.methods.lora_xs import Basis, LoraXSConfig


def compute_dtype(m: nn.Module) -> torch.dtype:
    cd = getattr(m, "compute_dtype", None)  # bitsandbytes Linear4bit
    if isinstance(cd, torch.dtype):
        return cd
    return m.weight.dtype if m.weight.dtype.is_floating_point else torch.float32

class LoraXSLinear(nn.Module):
    """``base_layer(x) + s·((x A) R) B``; calls the wrapped (maybe 4-bit) layer, never touches its weight.

    A, B are non-persistent buffers in the base's compute dtype (the adapter path runs in it); R is an
    fp32 Parameter (the optimizer's master copy), cast to that dtype in the forward."""

    def __init__(self, base_layer: nn.Linear, a: Tensor, b: Tensor, scale: float, init_r: str = "zeros"):
        super().__init__()
        self.base_layer = base_layer
        dtype, device = compute_dtype(base_layer), base_layer.weight.device
        self.register_buffer("lora_xs_A", a.to(device, dtype), persistent=False)
        self.register_buffer("lora_xs_B", b.to(device, dtype), persistent=False)
        r = a.shape[1]
        self.lora_R = nn.Parameter(torch.zeros(r, r, device=device, dtype=torch.float32))
        if init_r == "normal":
            nn.init.normal_(self.lora_R, std=R_INIT_STD)
        self.scale = float(scale)
        self.adapter_enabled = True

    @property
    def weight(self) -> Tensor:  # some HF code reads q_proj.weight (dtype/device checks)
        return self.base_layer.weight

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if not self.adapter_enabled:
            return out
        a = self.lora_xs_A
        h = ((x.to(a.dtype) @ a) @ self.lora_R.to(a.dtype)) @ self.lora_xs_B
        return out + (h * self.scale).to(out.dtype)

class LoraXSModel(nn.Module):
    """A causal LM with LoRA-XS layers; calls, ``generate`` and other attributes go to the wrapped LM."""

    def __init__(self, model: nn.Module, cfg: LoraXSConfig, basis: Basis):
        super().__init__()
        self.model = model
        self.xs_config = cfg
        self.basis_id, self.basis_digest = basis.id, basis.digest
        self.base_fingerprint = basis.base_fingerprint
        self.targets = basis.targets

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    def adapter_layers(self) -> dict[str, LoraXSLinear]:
        """Module name as in the base (``model.layers.0.self_attn.q_proj``) -> its LoRA-XS layer."""
        return {n: m for n, m in self.model.named_modules() if isinstance(m, LoraXSLinear)}

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return {n: m.lora_R.detach().float().cpu().contiguous() for n, m in self.adapter_layers().items()}

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """The base model's function while inside (the base eval next to the adapter's)."""
        layers = list(self.adapter_layers().values())
        before = [m.adapter_enabled for m in layers]
        for m in layers:
            m.adapter_enabled = False
        try:
            yield
        finally:
            for m, was in zip(layers, before):
                m.adapter_enabled = was

    def save_pretrained(self, save_directory: str | Path, **_: Any) -> None:
        """``adapter_config.json`` + ``adapter_model.safetensors`` holding only the R matrices."""
        write_adapter(save_directory, self.xs_config, self.basis_id, self.basis_digest, self.base_fingerprint,
                      self.targets, self.adapter_state_dict())
