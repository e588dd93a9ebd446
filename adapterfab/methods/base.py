"""The method registry and the interface every method implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

from adapterfab.errors import AdapterfabError


class MethodConfig(BaseModel):
    """Base of every method's hyper-parameters; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str

    def tags(self) -> dict[str, str]:
        """Registry tags describing this method's hyper-parameters."""
        return {f"method.{k}": str(v) for k, v in self.model_dump().items()}


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type[MethodConfig]
    # (base model, config) -> a model with the adapter attached and only adapter params trainable
    apply: Callable[[Any, MethodConfig], Any]
    # extra kwargs for AutoModelForCausalLM.from_pretrained (e.g. quantization) for this config
    base_load_kwargs: Callable[[MethodConfig], dict] = lambda cfg: {}
    # closed-form count of trainable parameters for a model config (used by plan and tests)
    trainable_params: Callable[[Any, MethodConfig], int] | None = None


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def known_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise AdapterfabError(
            f"unknown method {name!r}: known methods are {', '.join(known_methods())}"
        ) from None
