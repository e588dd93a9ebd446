"""``dtype: auto``: the precision a job trains in where the spec leaves it to us.

bfloat16 halves a base's memory and is what GPUs (and CPUs with AVX-512 BF16 or AMX) compute fastest;
on a CPU without those instructions PyTorch emulates it, and a bf16 matmul runs ~90x slower than fp32
(measured on this project's 2-core AMD EPYC: 714 ms against 8 ms for 512x576 @ 576x1536). So ``auto`` is
bfloat16 for GPU jobs and for CPUs that compute it natively, float32 otherwise. It is resolved when the
spec is parsed (on the machine that plans the batch), so the plan, the fusion keys and the registry's tags
all see the concrete dtype."""

from __future__ import annotations

import functools
from typing import Any

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_computes_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this machine's CPU has bfloat16 arithmetic (AVX-512 BF16 or AMX); False where unknown."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in NATIVE_BF16_FLAGS)
    except OSError:
        pass
    return False


def auto_dtype(gpu: bool) -> str:
    return "bfloat16" if gpu or cpu_computes_bf16() else "float32"


def resolve_auto(method: Any, train: Any, gpu: bool) -> tuple[Any, Any]:
    """(method, train) with every ``auto`` precision made concrete for a job on a GPU or a CPU."""
    if getattr(method, "compute_dtype", None) == "auto":
        method = method.model_copy(update={"compute_dtype": auto_dtype(gpu)})
    if train.dtype == "auto":
        train = train.model_copy(update={"dtype": auto_dtype(gpu)})
    return method, train
