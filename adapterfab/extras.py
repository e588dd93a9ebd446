"""Optional dependencies, declared as extras in pyproject.toml and pinned in requirements.lock:
``pip install 'adapterfab[zero]'`` (DeepSpeed, for a job larger than one device) and
``pip install 'adapterfab[qlora]'`` (bitsandbytes, for a 4-bit base). ``make``, the Docker image and the
cluster launcher install both. Code that needs one imports it through ``need``, lazily, so that a missing
extra is one clear error naming what to install, raised where the feature is used."""

from __future__ import annotations

import importlib
from types import ModuleType

from adapterfab.errors import AdapterfabError

# module -> (extra, what needs it)
EXTRAS = {
    "deepspeed": ("zero", "a job larger than one device (DeepSpeed ZeRO)"),
    "bitsandbytes": ("qlora", "a 4-bit base (QLoRA, LoRA-XS with quantize: nf4)"),
}


class MissingExtra(AdapterfabError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def need(module: str) -> ModuleType:
    """``import module``, or a MissingExtra that names its extra when it is not installed. A module that
    is installed but fails to import (a dependency of its own missing) raises its own error."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name != module:
            raise
        extra, what = EXTRAS[module]
        raise MissingExtra(f"{what} needs {module}, which is not installed: "
                           f"pip install 'adapterfab[{extra}]' (make, the Docker image and the cluster "
                           "launcher install it)", name=module) from e
