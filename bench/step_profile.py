"""Where a fused training step's time goes (issue 18's MFU): a few steady-state steps of the product's
``FusedTrainer.train`` under torch.profiler, summed by kind of work.

On CUDA each kernel's device time is put in a category by its name (matmuls, attention, 4-bit dequant,
softmax/loss, copies and indexing, the optimizer's update, other elementwise and reductions), and the
step's wall time is split into the time some kernel ran (the union of kernel intervals) and the time the
GPU sat idle waiting for the host: when ``idle`` is large the step is host-bound (launch overhead, host
syncs), when it is small the kernels themselves are the cost. ``gemm_tflops`` is the trainer's own FLOP
count over the matmul kernels' time: how fast the matmuls ran, against the step's MFU.

On the CPU (the ``--smoke`` runs of make test) the same summary is made of the aten ops' self CPU time;
``idle`` is then the wall time outside any aten op (Python, the trainer's host work).

Each profiled step is bracketed by a device sync (``on_iteration``), so a window holds exactly its own
steps' kernels; the loop already reads every step's losses back, so this adds one sync per step.
torch.profiler adds host time per launch: ``wall_ms`` here is above the unprofiled step's."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# (category, lower-case substrings of a CUDA kernel's or an aten op's name); the first match wins, so the
# specific kinds come before the generic ones (bitsandbytes' 4-bit matmul names "gemm" and "4bit")
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("dequant_4bit", ("dequant", "4bit", "nf4", "bnb")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "aten::mm", "aten::bmm", "aten::addmm",
              "aten::baddbmm", "mkldnn", "onednn")),
    ("softmax_loss", ("softmax", "nll", "cross_entropy", "logsumexp")),
    ("optimizer", ("foreach", "adam", "lerp", "addcdiv", "addcmul", "_amp_")),
    ("copy_index", ("memcpy", "memset", "copy", "index", "gather", "scatter", "cat", "fill", "zero",
                    "stack", "contiguous", "clone")),
    ("elementwise", ("elementwise", "reduce", "mul", "add", "pow", "rsqrt", "silu", "norm", "mean", "sum",
                     "exp", "sigmoid", "neg", "div", "sub", "where", "clamp", "cos", "sin", "max", "min")),
)
WAIT, WARMUP, ACTIVE = 1, 1, 2  # profiler schedule, in fused steps: two steady-state steps are recorded
STEPS = WAIT + WARMUP + ACTIVE


def category(name: str) -> str:
    low = name.lower()
    for cat, words in CATEGORIES:
        if any(w in low for w in words):
            return cat
    return "other"


def _union_us(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def summarize(events: list[Any], cuda: bool, flops_per_step: float | None = None, top: int = 12) -> dict[str, Any]:
    """The breakdown of the profiled steps in ``events`` (torch.profiler's ``events()``), per step."""
    from torch.autograd import DeviceType

    steps = [e for e in events if e.name.startswith("ProfilerStep")]
    if not steps:
        raise ValueError("no ProfilerStep events: the profiler's schedule recorded no step")
    n = len(steps)
    span_us = sum(e.time_range.elapsed_us() for e in steps)
    lo, hi = min(e.time_range.start for e in steps), max(e.time_range.end for e in steps)
    if cuda:
        work = [(e.name, e.time_range.start, e.time_range.end, e.time_range.elapsed_us()) for e in events
                if getattr(e, "device_type", None) == DeviceType.CUDA and lo <= e.time_range.start <= hi]
    else:  # each aten op's own time (its children's excluded); the step markers themselves are not work
        work = [(e.name, e.time_range.start, e.time_range.end, e.self_cpu_time_total) for e in events
                if getattr(e, "device_type", None) == DeviceType.CPU and not e.name.startswith("ProfilerStep")
                and lo <= e.time_range.start <= hi]
    busy_us = _union_us([(a, b) for _, a, b, _ in work]) if cuda else sum(t for *_, t in work)
    by_cat: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for name, _, _, t in work:
        c = category(name)
        by_cat[c] = by_cat.get(c, 0.0) + t
        s = by_name.setdefault(name, [0.0, 0.0])
        s[0] += t
        s[1] += 1
    total_us = sum(by_cat.values()) or 1.0
    gemm_s = by_cat.get("gemm", 0.0) / n / 1e6
    return {
        "steps": n, "timer": "CUDA kernel time" if cuda else "aten ops' self CPU time",
        "wall_ms": round(span_us / n / 1000, 3),
        "busy_ms": round(min(busy_us, span_us) / n / 1000, 3),
        "idle_ms": round(max(0.0, span_us - busy_us) / n / 1000, 3),
        "busy_share": round(min(1.0, busy_us / max(span_us, 1.0)), 4),
        "kernels_per_step": round(len(work) / n, 1),
        "ms_per_step": {c: round(t / n / 1000, 3) for c, t in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "share": {c: round(t / total_us, 4) for c, t in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "gemm_tflops": round(flops_per_step / gemm_s / 1e12, 2) if flops_per_step and gemm_s > 0 else None,
        "top": [{"name": name[:140], "category": category(name), "ms_per_step": round(t / n / 1000, 3),
                 "calls_per_step": round(calls / n, 1)}
                for name, (t, calls) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]],
    }


def profile_train(train: Callable[..., Any], cuda: bool, flops_per_step: float | None = None) -> dict[str, Any]:
    """Profile ``train(on_iteration=...)`` (a fused group of ``STEPS`` steps through ``FusedTrainer.train``)
    and summarize its steady-state steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, schedule=schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE, repeat=1)) as p:
        def on_iteration(progress: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            p.step()

        t0 = time.perf_counter()
        train(on_iteration=on_iteration)
        total_s = time.perf_counter() - t0
    out = summarize(list(p.events()), cuda, flops_per_step)
    out["call_s"] = round(total_s, 3)  # the whole group, its first steps, eval and profiler included
    return out


def text(key: str, s: dict[str, Any]) -> str:
    cats = ", ".join(f"{c} {ms:.1f} ms ({s['share'][c]:.0%})" for c, ms in s["ms_per_step"].items())
    gemm = f", matmuls at {s['gemm_tflops']} TFLOP/s" if s.get("gemm_tflops") else ""
    return (f"profile {key}: {s['wall_ms']:.1f} ms/step profiled, busy {s['busy_share']:.0%}, idle "
            f"{s['idle_ms']:.1f} ms, {s['kernels_per_step']:.0f} {'kernels' if 'CUDA' in s['timer'] else 'ops'}"
            f"/step{gemm}; {cats}")
