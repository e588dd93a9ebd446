"""The method registry and the interface every method implements."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from adapterfab.errors import AdapterfabError


class MethodConfig(BaseModel):
    """Base of every method's hyper-parameters; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: str

    @model_validator(mode="after")
    def _target_list(self) -> MethodConfig:
        """A method's ``target_modules`` list (where it has one) names each module once, and names some;
        which names the base has is checked against its weights (``adapterfab.spec_checks.semantic_problems``)."""
        targets = getattr(self, "target_modules", None)
        if isinstance(targets, list):
            if not targets:
                raise ValueError("target_modules is empty: name the modules to adapt (e.g. [q_proj, v_proj]) "
                                 "or give 'all-linear'")
            if len(set(targets)) != len(targets):
                raise ValueError("target_modules names a module twice; give each once")
        return self

    def tags(self) -> dict[str, str]:
        """Registry tags describing this method's hyper-parameters."""
        return {f"method.{k}": str(v) for k, v in self.model_dump().items()}


def _peft_save(model: Any, cfg: MethodConfig, out_dir: Path) -> None:
    model.save_pretrained(str(out_dir), safe_serialization=True)


def _peft_load(base: Any, adapter_dir: Path, basis: Any = None) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter_dir))


def _adamw(params: list, lr: float, weight_decay: float) -> Any:
    import torch

    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@dataclass(frozen=True)
class Method:
    """What a PEFT method provides. Only ``name``, ``config_cls`` and ``apply`` are required.

    ``apply(base_model, cfg, basis)`` returns a model with the adapter attached, only adapter params
    trainable, supporting ``disable_adapter()`` (a context manager) and ``save_pretrained(dir)``.
    ``basis`` is whatever ``compute_basis`` produced for methods that share frozen factors across
    tenants (LoRA-XS); None for the others."""

    name: str
    config_cls: type[MethodConfig]
    apply: Callable[[Any, MethodConfig, Any], Any]
    # extra kwargs for AutoModelForCausalLM.from_pretrained (e.g. 4-bit quantization) for this config
    base_load_kwargs: Callable[[MethodConfig], dict] = lambda cfg: {}
    # closed-form count of trainable parameters from the base's config (plan, tests)
    trainable_params: Callable[[Any, MethodConfig], int] | None = None
    # (params, lr, weight_decay) -> optimizer
    make_optimizer: Callable[[list, float, float], Any] = _adamw
    save: Callable[[Any, MethodConfig, Path], None] = _peft_save
    # (base model, adapter folder, basis) -> model with the saved adapter loaded (serving, tests)
    load: Callable[[Any, Path, Any], Any] = _peft_load
    # shared frozen factors (LoRA-XS). compute_basis(full-precision base, cfg, base_fingerprint) -> basis;
    # basis_id(cfg, base_fingerprint) names it before computing; save_basis/load_basis move it to and
    # from a folder. None when the method shares nothing.
    compute_basis: Callable[..., Any] | None = None
    basis_id: Callable[[MethodConfig, str], str] | None = None
    save_basis: Callable[[Any, Path], None] | None = None
    load_basis: Callable[[Path], Any] | None = None
    # (adapter folder, basis, out folder) -> a standard PEFT LoRA folder; None: already PEFT LoRA
    export_peft_lora: Callable[[Path, Any, Path], Path] | None = None
    # training defaults this method needs (e.g. LoRA-XS's much higher learning rate); the batch
    # spec's defaults.train and a tenant's train override them
    default_train: dict[str, Any] = field(default_factory=dict)
    # recorded on the registry version (e.g. the quantization the base was trained with)
    extra_tags: Callable[[MethodConfig], dict[str, str]] = lambda cfg: {}
    # how one adapter sits in a per-row bank, the layout the fused trainer (jobs/fused_bank.py) and the batched
    # engine (serve/batched.py) implement: LOW_RANK (A and B per module) or SHARED_BASIS (one r x r R per
    # module between frozen factors every adapter shares); None: the method trains alone and is served
    # through its PEFT export
    family: str | None = None
    # the ``peft_type`` its adapter folders' adapter_config.json carries
    peft_type: str = "LORA"
    # a SHARED_BASIS method's reader: (adapter folder, basis) -> (its config, {module name: R}), refusing an
    # adapter trained against another basis
    read_adapter: Callable[[Path, Any], tuple[dict[str, Any], dict[str, Any]]] | None = None
    # a SHARED_BASIS method's adapters in the fused trainer: (cfg, r, torch generator) -> a new adapter's R
    # for one module; (out folder, cfg, basis as (id, digest, base fingerprint, targets), {module name: R})
    # -> the adapter folder it saves
    init_shared: Callable[[MethodConfig, int, Any], Any] | None = None
    write_shared: Callable[[Path, MethodConfig, tuple, dict[str, Any]], Path] | None = None


LOW_RANK, SHARED_BASIS = "lora", "lora_xs"  # the per-row bank layouts (``Method.family``)

_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def known_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_of_adapter(peft_type: object) -> Method | None:
    """The method that reads adapter folders whose adapter_config.json says ``peft_type``: the first
    registered that writes them (LoRA and QLoRA write the same PEFT LoRA folders); None for a type no
    method writes."""
    return next((m for m in _REGISTRY.values() if m.peft_type == peft_type), None)


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise AdapterfabError(
            f"unknown method {name!r}: known methods are {', '.join(known_methods())}"
        ) from None


# the fields of a LoRA's adapter_config.json that depend on the adapter; every other field is PEFT's default
_LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "task_type", "bias", "base_model_name_or_path")


def _lora_config_defaults() -> dict[str, Any]:
    """``LoraConfig().to_dict()`` of the installed peft as plain JSON, kept in the machine's cache per peft
    version (and digest of its LoRA config source, for development installs): writing a fused LoRA's folder
    in the orchestrator then needs no peft import (~1.5-4 CPU-s of a small machine, taken from the trainers'
    steps), except once per machine and peft version."""
    import hashlib
    from importlib.metadata import version
    from importlib.util import find_spec

    from adapterfab.settings import cache_dir

    spec = find_spec("peft")  # finds the package without importing it
    source = Path(spec.origin).parent / "tuners" / "lora" / "config.py" if spec and spec.origin else None
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12] if source and source.is_file() else "-"
    path = cache_dir() / "peft" / f"lora-config-{version('peft')}-{digest}.json"
    with contextlib.suppress(OSError, ValueError):
        kept = json.loads(path.read_text())
        if isinstance(kept, dict) and kept.get("peft_type") == "LORA":
            return kept
    from adapterfab.threads import importing

    with importing():  # the registrar's threads, beside a window tokenized in the orchestrator
        from peft import LoraConfig

    defaults = json.loads(json.dumps({k: sorted(v) if isinstance(v, set) else v
                                      for k, v in LoraConfig(task_type="CAUSAL_LM").to_dict().items()}))
    tmp = path.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")
    try:  # a read-only or full cache only costs the import next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(defaults))
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
    return defaults


def peft_lora_config(method: Any, targets: list[str], base_name: str | None) -> dict[str, Any]:
    """A low-rank (LoRA, QLoRA) adapter's ``adapter_config.json``: what PEFT's
    ``LoraConfig(...).save_pretrained`` writes (target modules sorted), without importing peft
    (``_lora_config_defaults``)."""
    values = (method.r, method.alpha, method.dropout, sorted(targets), "CAUSAL_LM", "none", base_name)
    return {**_lora_config_defaults(), **dict(zip(_LORA_FIELDS, values, strict=True))}
