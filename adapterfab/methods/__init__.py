"""PEFT methods behind one registry. A method is a module that defines a pydantic config (with
``name: Literal[...]``) and a ``Method`` object, and registers it. Adding a method is one module plus
a row in the method test matrix; nothing dispatches on method names elsewhere."""

from __future__ import annotations

from adapterfab.methods import lora as _lora  # noqa: F401  (registers "lora")
from adapterfab.methods import lora_xs as _lora_xs  # noqa: F401  (registers "lora_xs")
from adapterfab.methods import qlora as _qlora  # noqa: F401  (registers "qlora")
from adapterfab.methods.base import (
    LOW_RANK,
    SHARED_BASIS,
    Method,
    MethodConfig,
    get_method,
    known_methods,
    method_of_adapter,
    peft_lora_config,
    register_method,
)

__all__ = ["LOW_RANK", "SHARED_BASIS", "Method", "MethodConfig", "get_method", "known_methods", "method_of_adapter",
           "peft_lora_config", "register_method"]
