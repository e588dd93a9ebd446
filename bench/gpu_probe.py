"""GPU readiness (issue 23): the serving engine's decode step and the fused trainer's step on 1B and 7B
Llama shapes, in one run of at most ``--budget-s`` (8 minutes) on one GPU. torch, transformers and peft
plus adapterfab itself: no Ray, MLflow or bitsandbytes (4-bit rows are skipped, with the reason, without
it). adapterfab's serving and training modules import pydantic (through ``adapterfab.methods``), which
the bare GPU machine lacks: the wheel bundle of CONTRIBUTING.md "GPU checks" brings it.

Everything runs through the product's own code; random weights stand in for a checkpoint:

  decode  ``serve/batched.py`` BatchedEngine (the engine the server runs), one per shape, built with the
          engine's own constructor (KV cache, fused q/k/v and gate/up, CUDA graphs on by default on a GPU).
          Its weights are a random Llama built in memory and handed to that constructor in place of
          ``AutoModelForCausalLM.from_pretrained`` (``--via-disk``: saved to a temp folder and loaded from
          it, as the server would; a 7B is 13.5 GB). Adapters go into its banks through ``place`` (what
          ``load_adapter`` calls after reading a folder): LoRA r16 on q,k,v,o (``--lora-r``,
          ``--lora-targets``), 1, 100 and 1,000 of them; LoRA-XS with the method's defaults (r16 on q,v)
          on one shared basis, 1,000 of them. Each case is ``rows`` requests whose KV caches hold
          ``context`` tokens (the step attends over ``context`` positions; the cache holds zeros, which
          costs the same), the adapters spread evenly over the rows; a step is what the engine's loop runs
          per token: ``_decode`` (a CUDA graph replay per shape bucket) then ``_sample_rows`` (greedy: one
          argmax and one read back).
            gpu_ms   CUDA events around ``--decode-steps`` back-to-back ``_decode`` calls, per step: the stream's
                     time, host launch gaps included where the host is the slower one (CUDA only)
            wall_ms  median host wall time of one whole step (``_decode`` + ``_sample_rows``, which syncs)
          Which SDPA backend attention runs is read from torch.profiler's op names (and on CUDA kernel
          names) of one eager decode step of the same shapes: the dispatcher's choice, which a graph
          capture records as it is.
  train   ``jobs/fused.py`` FusedTrainer on a base loaded by ``jobs/train_loop.load_base`` (what the
          resident trainer does; the random base is saved to a temp folder first), LoRA r16 all-linear,
          or QLoRA's 4-bit NF4 base (``--no-4bit`` to leave it out), K jobs x ``--train-rows`` rows x
          ``--train-seq`` tokens (bench/fused_step.py's random rows, labels on the second half; 4 x 256 by
          default, the product's default max_seq_len), K = 1, 8, 16, 32, on the 1B shape and then, as
          time allows, the 7B (whose K = 32 is not expected to fit: recorded as ``oom``, larger K then
          skipped). MFU = the trainer's own FLOP count (``ModelFlops``: every job's ``train_flops``, the
          FLOPs counted as spent) / its ``train_s`` / ``--peak-tflops`` (989: H200/H100 dense bf16), as
          factory_throughput.py (fused_step.py counts 4 x params x tokens instead).
  profile where the step time of K = ``--profile-k`` (8) goes, each variant and shape: two steady-state
          steps of the same trainer under torch.profiler, kernel time by kind (matmuls, attention, 4-bit
          dequant, softmax/loss, copies, optimizer, other elementwise), the GPU's idle time waiting on
          the host, kernels per step, and the matmuls' own TFLOP/s (bench/step_profile.py): what limits
          the MFU above (issue 18's 35 % target).

A case that runs out of device memory is recorded as ``oom``; one that would overrun the budget as
``skipped``; a failure as ``error`` (exit status 1). Writes bench/results/gpu_probe-<device>-<date>.json.

    bash bench/gpu_pass.sh install probe                       # on a lent GPU (CONTRIBUTING.md "GPU checks")
    python bench/gpu_probe.py --device cuda                    # the same, by hand
    .venv/bin/python bench/gpu_probe.py --smoke --out /tmp/p.json   # tiny shapes on the CPU (make test)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import gc
import itertools
import json
import os
import platform
import queue
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import fused_step  # noqa: E402  (bench/fused_step.py: random training rows, sync, peak memory)
import step_profile  # noqa: E402  (bench/step_profile.py: where a fused step's time goes)

SHAPES = {
    # Llama-3.2-1B's shape (tied embeddings, GQA 32/8, head size 64); default RoPE
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True,
           "max_position_embeddings": 8192},
    # Llama-2-7B's shape (no GQA)
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False,
           "max_position_embeddings": 4096},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 1024, "tie_word_embeddings": True,
             "max_position_embeddings": 512},
}
# rough seconds each part takes on an H200 (for the budget guard: a part that would not fit is skipped)
COST = {"engine": {"1b": 20, "7b": 45}, "disk": {"1b": 15, "7b": 120}, "place1000": {"1b": 10, "7b": 20},
        "decode": {"1b": 3, "7b": 6}, "train_load": {"1b": 20, "7b": 90}, "train_k": {"1b": 12, "7b": 45},
        "train_profile": {"1b": 8, "7b": 15}}
SDPA_OPS = {  # the op SDPA dispatches to -> its backend
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU kernel)",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient (memory-efficient, CUTLASS)",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable (backend-provided)",
}


@dataclass
class Plan:
    decode_shapes: tuple[str, ...]
    rows: tuple[int, ...]
    contexts: tuple[int, ...]
    lora_adapters: tuple[int, ...]
    xs_adapters: int
    train_shapes: tuple[str, ...]
    ks: tuple[int, ...]
    train_rows: int
    train_seq: int
    decode_warmup: int
    decode_steps: int
    train_warmup: int
    train_steps: int
    profile_k: int  # the K whose fused step is profiled (bench/step_profile.py); 0: none


FULL = Plan(("1b", "7b"), (64, 256), (128, 512), (1, 100, 1000), 1000, ("1b", "7b"), (1, 8, 16, 32), 4, 256,
            3, 20, 2, 5, 8)
SMOKE = Plan(("tiny",), (2, 4), (16, 32), (1, 3), 3, ("tiny",), (1, 2), 2, 16, 1, 3, 1, 2, 2)


class Budget:
    def __init__(self, total_s: float, smoke: bool, t0: float):
        self.total_s, self.smoke, self.t0 = total_s, smoke, t0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def fits(self, part: str, shape: str, times: float = 1, extra: str | None = None) -> tuple[bool, str]:
        """Whether ``times`` x the cost of ``part`` (plus one ``extra`` part) still ends within the budget."""
        need = 0.0 if self.smoke else COST[part].get(shape, 0) * times + (COST[extra].get(shape, 0) if extra else 0)
        if self.elapsed() + need <= self.total_s:
            return True, ""
        return False, f"time budget: {self.elapsed():.0f} s of {self.total_s:.0f} s spent, this needs ~{need:.0f} s"


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def failed(cases: list[dict[str, Any]], e: BaseException, where: str = "") -> bool:
    """Record ``e`` on ``cases`` (``oom`` or ``error``, printing the traceback of an error); True when it
    was an OOM. The caller releases memory after its ``except`` block, once the traceback (and the frames
    holding tensors) is gone."""
    oom = is_oom(e)
    for c in cases:
        c.update(status="oom" if oom else "error", reason=f"{where}{type(e).__name__}: {str(e)[:300]}")
    if not oom:
        traceback.print_exc()
    return oom


def release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def mem_mb(cuda: bool, peak: bool = False) -> float | None:
    import torch

    if not cuda:
        return None
    return round((torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**20, 1)


def random_llama(shape: str, dtype: Any, device: str, tok: Any) -> Any:
    """A Llama of ``shape`` with random weights (seed 0), built on ``device`` in ``dtype``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def n_params(shape: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]))
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def prebuilt(model: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` answers ``model`` (once, at the engine's dtype) while the
    engine's constructor runs: every other line of the constructor is the engine's own."""
    from unittest import mock

    import transformers

    calls = []

    def from_pretrained(path: Any, *args: Any, dtype: Any = None, **kwargs: Any) -> Any:
        calls.append(path)
        if dtype is not None and dtype != next(model.parameters()).dtype:
            raise RuntimeError(f"the engine asked for {dtype}, the prebuilt model is {next(model.parameters()).dtype}")
        return model

    with mock.patch.object(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained):
        yield
    if len(calls) != 1:
        raise RuntimeError(f"the engine loaded its model {len(calls)} times, not once")


def sdpa_backend(fn: Any, cuda: bool) -> dict[str, Any]:
    """Which SDPA backend ``fn`` runs: the aten ops of one call under torch.profiler (and on CUDA the
    attention kernels' names)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as p:
        fn()
        fused_step.sync("cuda" if cuda else "cpu")
    events = list(p.events())
    ops = sorted({e.name for e in events if e.name in SDPA_OPS})
    kernels = sorted({e.name[:120] for e in events if getattr(e, "device_type", None) == DeviceType.CUDA
                      and any(w in e.name.lower() for w in ("fmha", "flash", "attention", "cudnn", "sdpa"))})
    how = "torch.profiler op names (SDPA's dispatch) of one eager call" + (", CUDA kernel names" if cuda else "")
    return {"backend": " + ".join(SDPA_OPS[o] for o in ops) or "none seen", "ops": ops, "kernels": kernels[:6],
            "how": how}


# -- decode ------------------------------------------------------------------------------------------
def lora_parsed(eng: Any, r: int, targets: list[str], seed: int) -> Any:
    """A LoRA (A [r, in], B [out, r] per target module of every layer) as ``read_adapter`` returns it."""
    import torch

    from adapterfab.methods import LOW_RANK
    from adapterfab.serve.batched import ParsedAdapter

    g = torch.Generator(device=eng.device).manual_seed(seed)
    tensors = {}
    for (i, name), lin in eng.linear.items():
        if name in targets:
            a = torch.randn(r, lin.in_features, generator=g, device=eng.device, dtype=eng.dtype) * 0.02
            b = torch.randn(lin.out_features, r, generator=g, device=eng.device, dtype=eng.dtype) * 0.02
            tensors[(i, name)] = (a, b)
    return ParsedAdapter(LOW_RANK, {"r": r, "lora_alpha": 2 * r}, tensors, None)


def xs_basis_and_rs(eng: Any, pool: int) -> tuple[Any, list[Any]]:
    """A LoRA-XS basis (the method's default r and targets) with random factors, and ``pool`` distinct
    adapters' R matrices on it, as ``read_adapter`` returns them."""
    import torch

    from adapterfab.methods import SHARED_BASIS
    from adapterfab.methods.lora_xs import Basis, LoraXSConfig
    from adapterfab.serve.batched import ParsedAdapter

    cfg = LoraXSConfig()
    targets = cfg.resolved_targets()
    g = torch.Generator(device=eng.device).manual_seed(1)
    factors, keys = {}, []
    for (i, name), lin in eng.linear.items():
        if name in targets:
            where = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            factors[f"model.layers.{i}.{where}.{name}"] = (
                torch.randn(lin.in_features, cfg.r, generator=g, device=eng.device, dtype=eng.dtype) * 0.02,
                torch.randn(cfg.r, lin.out_features, generator=g, device=eng.device, dtype=eng.dtype) * 0.02)
            keys.append((i, name))
    basis = Basis("xs-probe-random", cfg.r, tuple(targets), "random", factors)
    adapters = [ParsedAdapter(SHARED_BASIS, {"scale": cfg.alpha / cfg.r},
                              {k: torch.randn(cfg.r, cfg.r, generator=g, device=eng.device, dtype=eng.dtype)
                               for k in keys}, basis) for _ in range(pool)]
    return basis, adapters


def requests(eng: Any, rows: int, context: int, names: list[str | None]) -> list[Any]:
    """``rows`` greedy requests in cache rows 0..rows-1, each with ``context`` tokens in its cache
    (position ``context - 1`` next), the adapters ``names`` spread evenly over them."""
    import random

    from adapterfab.serve.batched import _Request
    from adapterfab.serve.engine import SamplingParams

    rng = random.Random(rows * 7919 + context)
    params = SamplingParams(max_tokens=None, temperature=0.0)
    n = len(names)
    out = []
    for i in range(rows):
        adapter = names[(i * n) // rows if n > rows else i % n]
        out.append(_Request([1], adapter, params, queue.Queue(), None, cache_row=i, pos=context - 1,
                            last=rng.randrange(10, eng.cfg.vocab_size)))
    return out


def time_decode(eng: Any, running: list[Any], warmup: int, steps: int, cuda: bool) -> dict[str, Any]:
    import torch

    rows = [q.cache_row for q in running]
    with torch.inference_mode():
        for _ in range(warmup):  # the first captures this shape's CUDA graph
            eng._sample_rows(eng._decode(running, rows), running, rows)
        fused_step.sync("cuda" if cuda else "cpu")
        gpu_ms = None
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                eng._decode(running, rows)
            end.record()
            end.synchronize()
            gpu_ms = start.elapsed_time(end) / steps
        walls = []
        for _ in range(steps):
            t = time.perf_counter()
            eng._sample_rows(eng._decode(running, rows), running, rows)  # reads the tokens back: a sync
            walls.append(time.perf_counter() - t)
    wall_ms = statistics.median(walls) * 1000
    return {"gpu_ms": round(gpu_ms, 3) if gpu_ms is not None else None, "wall_ms": round(wall_ms, 3),
            "wall_ms_min": round(min(walls) * 1000, 3), "wall_ms_max": round(max(walls) * 1000, 3),
            "tokens_per_s": round(len(running) / (wall_ms / 1000), 1), "steps": steps}


def engine_max_adapters(plan: Plan) -> int:
    """The decode engine's adapter slots: the most LoRA or LoRA-XS adapters a case places."""
    return max(*plan.lora_adapters, plan.xs_adapters)


def build_engine(shape: str, plan: Plan, args: argparse.Namespace, tok_dir: str, tmp: Path,
                 max_batch: int | None = None) -> tuple[Any, dict]:
    import torch
    from transformers import AutoTokenizer

    from adapterfab.serve.batched import BatchedEngine

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    kw = {"dtype": str(dtype).removeprefix("torch."), "device": args.device, "max_batch": max_batch or max(plan.rows),
          "max_len": max(plan.contexts), "max_adapters": engine_max_adapters(plan),
          "max_rank": args.lora_r}
    tok = AutoTokenizer.from_pretrained(tok_dir)
    info: dict[str, Any] = {"engine_args": kw}
    t0 = time.perf_counter()
    model = random_llama(shape, dtype, args.device, tok)
    info["random_init_s"] = round(time.perf_counter() - t0, 2)
    if args.via_disk:
        folder = tmp / f"decode-{shape}"
        t0 = time.perf_counter()
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        del model
        release()
        info["save_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        eng = BatchedEngine(folder, **kw)
        info["weights"] = "random, saved to a temp folder and loaded by the engine"
    else:
        t0 = time.perf_counter()
        with prebuilt(model):
            eng = BatchedEngine(tok_dir, **kw)
        del model
        info["weights"] = ("random, built in memory and handed to the engine's constructor "
                           "(from_pretrained stood in for)")
    info["engine_init_s"] = round(time.perf_counter() - t0, 2)
    info["cuda_graphs"] = eng.cuda_graphs
    info["buckets"] = eng.buckets
    info["after_init_mb"] = mem_mb(cuda)
    return eng, info


def lora_kernels(args: argparse.Namespace, plan: Plan) -> tuple[str, ...]:
    """How the LoRA cases add their updates (``BatchedEngine.lora_kernel``): the engine's default (the
    per-row gather on a GPU, per distinct adapter on a CPU), and the grouped matmuls over the bank where
    they run without a host sync (bf16 on Hopper/Blackwell; the CPU's fallback for the smoke run)."""
    import torch

    from adapterfab.serve.batched_forward import grouped_lora_supported

    cuda = args.device == "cuda"
    default = "row" if cuda else "factors"  # the engine's own choice: graphs on a GPU, exact shapes on a CPU
    if args.lora_kernels:
        kernels = tuple(args.lora_kernels.split(","))
        allowed = ("row", "grouped") if cuda else ("factors", "row", "grouped")  # a GPU's shapes are bucketed
        bad = [k for k in kernels if k not in allowed]
        if bad:
            raise SystemExit(f"--lora-kernels: {', '.join(bad)} not among {', '.join(allowed)} on {args.device}")
        return kernels
    ok, _ = grouped_lora_supported(torch.device(args.device), torch.bfloat16 if cuda else torch.float32,
                                   engine_max_adapters(plan) + 1, args.lora_r)  # build_engine's engine
    return (default, "grouped") if ok else (default,)


def lora_fit(eng: Any, plan: Plan, args: argparse.Namespace, cuda: bool, margin_gib: float = 2.0) -> dict:
    """Whether the LoRA bank of the most adapters (``max_adapters`` + 1 slots of r x (in + out) per target
    module, allocated at the first placement) fits the device memory left beside this engine; if not, the
    most rows (of ``plan.rows``) whose KV cache leaves room for it, or None. On a CPU it always fits unless
    ``--mem-gib`` names a size."""
    import torch

    rows = eng.max_batch
    if not cuda and not args.mem_gib:
        return {"rows": rows, "why": ""}
    elem = torch.tensor([], dtype=eng.dtype).element_size()
    per_slot = sum(lin.in_features + lin.out_features for (_, name), lin in eng.linear.items()
                   if name in args.lora_targets) * eng.max_rank * elem
    bank = (eng.max_adapters + 1) * per_slot  # the engine allocates every slot at the first placement
    pool = 8 * per_slot * args.lora_r // eng.max_rank
    kv = 2 * eng.k_cache.numel() * eng.k_cache.element_size()  # K and V
    kv_row = kv / eng.max_batch
    used = None
    if args.mem_gib:  # a device of this size: what the engine holds (weights, KV cache, banks) is used
        used = (sum(t.numel() * t.element_size() for t in eng.model.parameters()) + kv
                + sum(t.numel() * t.element_size() for banked in (eng.lora_a, eng.lora_b) for t in banked.values()))
        free = args.mem_gib * 2**30 - used
        margin_gib = 0.0 if args.smoke else margin_gib
    else:
        free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    need = bank + pool + margin_gib * 2**30
    fits = [r for r in plan.rows if r <= rows and need <= free + kv_row * (rows - r)]
    gib = 2**30
    why = (f"does not fit on this device: the bank of {eng.max_adapters} LoRA r{eng.max_rank} adapters "
           f"({args.lora_targets}) takes {bank / gib:.1f} GiB, the KV cache {kv_row / gib:.2f} GiB a row at "
           f"context {eng.max_len}, {free / gib:.1f} GiB free beside {rows} rows (margin {margin_gib} GiB)")
    return {"rows": max(fits) if fits else None, "why": why if not fits or max(fits) < rows else "",
            "bank_mib": round(bank / 2**20, 1), "kv_row_mib": round(kv_row / 2**20, 4),
            "free_mib": round(free / 2**20, 3), "need_mib": round(need / 2**20, 3),
            "used_mib": round(used / 2**20, 3) if used is not None else None}


def decode_shape(shape: str, plan: Plan, args: argparse.Namespace, tok_dir: str, tmp: Path, budget: Budget,
                 out: dict) -> None:
    cuda = args.device == "cuda"
    cases: list[dict[str, Any]] = []
    kernels = lora_kernels(args, plan)
    for kind, counts in (("base", (0,)), ("lora_xs", (plan.xs_adapters,)), ("lora", plan.lora_adapters)):
        for n in counts:
            for kernel in (kernels if kind == "lora" else (None,)):
                for context in plan.contexts:
                    for rows in plan.rows:
                        cases.append({"shape": shape, "kind": kind, "adapters": n, "rows": rows,
                                      "context": context, "status": "skipped"}
                                     | ({"kernel": kernel} if kernel else {}))
    out["decode"].extend(cases)
    ok, why = budget.fits("engine", shape, extra="disk" if args.via_disk else None)
    if not ok:
        for c in cases:
            c["reason"] = why
        return
    eng = None
    try:
        eng, info = build_engine(shape, plan, args, tok_dir, tmp)
    except Exception as e:  # noqa: BLE001 - recorded; the next shape still runs
        failed(cases, e, "engine: ")
    if eng is None:
        release()
        return
    out["setup"][f"decode-{shape}"] = info
    print(f"[{budget.elapsed():6.1f} s] decode {shape}: engine ready ({info})", flush=True)
    placed: list[str] = []

    def run(c: dict[str, Any], names: list[str | None]) -> None:
        ok, why = budget.fits("decode", shape)
        if not ok:
            c["reason"] = why
            return
        try:
            running = requests(eng, c["rows"], c["context"], names)
            seen, captures, replays = collections.Counter(eng.decode_shapes), eng.graph_captures, eng.graph_replays
            c.update(time_decode(eng, running, plan.decode_warmup, plan.decode_steps, cuda), status="ok")
            # what the engine ran: its decode shape (rows, cache span, LoRA rank gathered, LoRA-XS bases) and
            # graphs, so a case that missed the adapter path shows it
            (nb, span, rank, bases), = [k for k in eng.decode_shapes if eng.decode_shapes[k] != seen[k]]
            c.update(distinct_adapters=len({q.adapter for q in running if q.adapter is not None}),
                     decode_shape={"rows": nb, "span": span, "lora_rank": rank, "xs_bases": len(bases)},
                     graph_captures=eng.graph_captures - captures, graph_replays=eng.graph_replays - replays)
        except Exception as e:  # noqa: BLE001
            failed([c], e)
        if c["status"] != "ok":
            release()
        c["elapsed_s"] = round(budget.elapsed(), 1)
        print(f"[{budget.elapsed():6.1f} s] {row_text(c)}", flush=True)

    try:
        for c in (c for c in cases if c["kind"] == "base"):
            run(c, [None])
        # which SDPA backend the decode step's attention runs: one eager step (graphs off for it), base rows
        was = eng.cuda_graphs
        eng.cuda_graphs = False
        try:
            import torch

            running = requests(eng, max(plan.rows), max(plan.contexts), [None])
            rows = [q.cache_row for q in running]
            with torch.inference_mode():
                out["attention"][f"decode-{shape}"] = sdpa_backend(lambda: eng._decode(running, rows), cuda)
        except Exception as e:  # noqa: BLE001 - the cases go on without it
            out["attention"][f"decode-{shape}"] = {"backend": "not read", "ops": [], "kernels": [],
                                                   "how": f"{type(e).__name__}: {str(e)[:300]}"}
        finally:
            eng.cuda_graphs = was
        # LoRA-XS: 1,000 adapters on one shared basis, then out again (their slots go to the LoRA ones)
        xs_cases = [c for c in cases if c["kind"] == "lora_xs"]
        ok, why = budget.fits("place1000", shape)
        if not ok:
            for c in xs_cases:
                c["reason"] = why
        else:
            t0 = time.perf_counter()
            _, pool = xs_basis_and_rs(eng, 8)
            names = [f"xs-{i}" for i in range(plan.xs_adapters)]
            for i, name in enumerate(names):
                eng.place(name, pool[i % len(pool)])
            info["xs_place_s"] = round(time.perf_counter() - t0, 2)
            info["xs_placed_mb"] = mem_mb(cuda)
            for c in xs_cases:
                run(c, names)
            for name in names:
                eng.unload_adapter(name)
            del pool
        # LoRA: 1, then 100, then 1,000 adapters placed (each case's rows spread over all of them). Where the
        # bank of the most adapters does not fit beside this engine's KV cache (a 7B shape on an 80 GB card:
        # 64 GiB of cache for 256 rows x 512), the engine is built again with as many rows as leave room
        # for it, and the larger cases are recorded as not fitting, with the figures
        lora_cases = [c for c in cases if c["kind"] == "lora"]
        fit = lora_fit(eng, plan, args, cuda)
        info["lora_fit"] = fit
        if fit["rows"] != eng.max_batch:
            for c in lora_cases:
                if fit["rows"] is None or c["rows"] > fit["rows"]:
                    c["reason"] = fit["why"]
            eng.close()
            eng = None
            release()
            if fit["rows"] is None:
                return
            eng, info2 = build_engine(shape, plan, args, tok_dir, tmp, max_batch=fit["rows"])
            info["lora_engine"] = info2
            print(f"[{budget.elapsed():6.1f} s] decode {shape}: engine rebuilt for the LoRA bank ({info2})",
                  flush=True)
        t_place, pool_l = 0.0, [lora_parsed(eng, args.lora_r, args.lora_targets, s) for s in range(8)]
        graphs = eng.cuda_graphs
        for n in plan.lora_adapters:
            ok, why = budget.fits("place1000", shape, 0 if n <= 100 else 1)
            if not ok:
                for c in cases:
                    if c["kind"] == "lora" and c["adapters"] >= n:
                        c["reason"] = why
                break
            t0, lost = time.perf_counter(), False
            try:
                for i in range(len(placed), n):
                    eng.place(f"lora-{i}", pool_l[i % len(pool_l)])
                    placed.append(f"lora-{i}")
            except Exception as e:  # noqa: BLE001 - an OOM placing them: these and the larger cases are lost
                failed([c for c in lora_cases if c["adapters"] >= n and c["rows"] <= eng.max_batch], e, "placing: ")
                lost = True
            if lost:
                release()
                break
            t_place += time.perf_counter() - t0
            for c in (c for c in lora_cases if c["adapters"] == n and c["rows"] <= eng.max_batch):
                if eng.lora_kernel != c["kernel"]:  # the path the step's graphs were captured with
                    try:
                        eng.use_lora_kernel(c["kernel"])  # the constructor's checks; drops those graphs
                    except Exception as e:  # noqa: BLE001 - this kernel cannot run here: its cases only
                        failed([c], e)
                        continue
                    eng.cuda_graphs = graphs  # a capture that failed under the other kernel turned them off
                run(c, list(placed))
                c["cuda_graphs"] = eng.cuda_graphs  # False: this case ran eagerly (its capture failed)
        info["lora_place_s"] = round(t_place, 2)
        info["lora_placed_mb"] = mem_mb(cuda)
        info["peak_mb"] = mem_mb(cuda, peak=True)
        info["graph_captures"] = eng.graph_captures
    finally:
        if eng is not None:
            eng.close()
        eng = None  # the engine, its KV cache, banks and graphs go before the next shape's
        release()


# -- training ----------------------------------------------------------------------------------------
def train_shape(shape: str, plan: Plan, args: argparse.Namespace, tok_dir: str, tmp: Path, budget: Budget,
                out: dict) -> None:
    import torch
    from transformers import AutoTokenizer

    cuda = args.device == "cuda"
    variants = [False] + ([True] if not args.no_4bit else [])
    cases = [{"shape": shape, "four_bit": fb, "base": "nf4" if fb else "bf16" if cuda else "fp32", "k": k,
              "rows_per_job": plan.train_rows, "seq": plan.train_seq, "status": "skipped"}
             for fb in variants for k in plan.ks]
    out["train"].extend(cases)
    try:
        import bitsandbytes  # noqa: F401
        bnb_missing = None
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install
        bnb_missing = f"bitsandbytes is not installed ({type(e).__name__}: {str(e)[:120]})"
    ok, why = budget.fits("train_load", shape)
    if not ok:
        for c in cases:
            c["reason"] = why
        return
    folder = tmp / f"train-{shape}"
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = random_llama(shape, torch.bfloat16, args.device, tok)
    model.save_pretrained(folder)
    del model
    release()
    out["setup"][f"train-{shape}"] = {"save_s": round(time.perf_counter() - t0, 2)}
    try:
        for fb in variants:
            mine = [c for c in cases if c["four_bit"] == fb]
            if fb and bnb_missing:
                for c in mine:
                    c["reason"] = bnb_missing
                continue
            ok, why = budget.fits("train_load", shape)
            if not ok:
                for c in mine:
                    c["reason"] = why
                continue
            train_variant(shape, fb, mine, plan, args, folder, budget, out)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def train_variant(shape: str, four_bit: bool, cases: list[dict], plan: Plan, args: argparse.Namespace,
                  folder: Path, budget: Budget, out: dict) -> None:
    from adapterfab.jobs.fused import FusedJob, FusedTrainer
    from adapterfab.jobs.train_loop import load_base
    from adapterfab.methods import get_method
    from adapterfab.spec import TrainConfig

    cuda = args.device == "cuda"
    name = "qlora" if four_bit else "lora"
    impl = get_method(name)
    method = impl.config_cls(name=name, r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    t0 = time.perf_counter()
    base = trainer = None
    try:
        base = load_base(str(folder), "bfloat16" if cuda else "float32", method, "cuda:0" if cuda else None)
        trainer = FusedTrainer(base, impl.family, method.resolved_targets(), method.r)
    except Exception as e:  # noqa: BLE001
        failed(cases, e, "load: ")
    if trainer is None:
        base = None
        release()
        return
    key = f"train-{shape}{'-4bit' if four_bit else ''}"
    out["setup"][key] = {"load_s": round(time.perf_counter() - t0, 2), "method": name, "base_mb": mem_mb(cuda),
                         "loaded_in_4bit": bool(getattr(base, "is_loaded_in_4bit", False))}
    vocab = base.config.vocab_size

    def jobs(tag: str, parts: list[dict], steps: int) -> list:
        return [FusedJob(f"{tag}{i}", method, TrainConfig(steps=steps, batch_size=plan.train_rows,
                                                          learning_rate=1e-4, seed=i, log_every_steps=1000),
                         lambda epoch, b=b: itertools.repeat(b)) for i, b in enumerate(parts)]

    def train(group: list, on_iteration: Any = None) -> list:
        try:
            res = trainer.train(group, on_iteration=on_iteration)
        finally:
            for j in group:
                trainer.remove(j.job_id)
        errors = [r.error for r in res if r.error]
        if errors:
            raise RuntimeError(f"fused training failed: {errors[0]}")
        return res

    ckpt = args.checkpointing == "on"  # "auto": on from the first K that runs out of memory without it
    trainer.set_checkpointing(ckpt)
    try:
        oom_at = None
        for c in cases:
            if oom_at is not None:
                c["reason"] = f"K={oom_at} ran out of device memory"
                continue
            ok, why = budget.fits("train_k", shape)
            if not ok:
                c["reason"] = why
                continue
            k = c["k"]
            parts = fused_step.batches(k, plan.train_rows, plan.train_seq, vocab, seed=k)

            def measure(on: bool, c: dict = c, k: int = k, parts: list = parts) -> bool:
                """Time K jobs' fused step into ``c`` (checkpointing ``on``); True when it ran out of memory."""
                try:
                    train(jobs("warm", parts, plan.train_warmup))
                    fused_step.sync(args.device)
                    fused_step.reset_peak(args.device)
                    res = train(jobs("timed", parts, plan.train_steps))
                    train_s = res[0].metrics["train_s"]
                    flops = sum(r.metrics["train_flops"] for r in res)  # without the recompute
                    tokens = k * plan.train_rows * plan.train_seq * plan.train_steps
                    c.update(status="ok", step_ms=round(train_s / plan.train_steps * 1000, 2),
                             tokens_per_s=round(tokens / train_s, 1), flops_per_step=flops / plan.train_steps,
                             achieved_tflops=float(f"{flops / train_s / 1e12:.4g}"),
                             mfu=round(flops / train_s / (args.peak_tflops * 1e12), 4) if cuda else None,
                             peak_mb=fused_step.peak_mb(), checkpointing=on)
                    return False
                except Exception as e:  # noqa: BLE001
                    return failed([c], e)

            oom = measure(ckpt)
            if oom and not ckpt and args.checkpointing == "auto":  # as the product plans it for a large K
                release()
                ckpt = True
                trainer.set_checkpointing(True)
                c.update(status="skipped", reason="")
                oom = measure(ckpt)
            if oom:
                oom_at = k
            if c["status"] != "ok":
                release()
            elif k == plan.profile_k:  # where this K's step time goes, by kind of kernel (bench/step_profile.py)
                profile_case(c, shape, lambda on_iteration, parts=parts: train(
                    jobs("prof", parts, step_profile.STEPS), on_iteration), cuda, budget, out)
            if c["status"] == "ok" and k == min(plan.ks) and not four_bit:  # which SDPA backend: one step
                try:
                    group = jobs("prof", parts, 1)
                    out["attention"][f"train-{shape}"] = sdpa_backend(lambda g=group: train(g), cuda)
                except Exception as e:  # noqa: BLE001 - the measurement above stands
                    out["attention"][f"train-{shape}"] = {"backend": "not read", "ops": [], "kernels": [],
                                                          "how": f"{type(e).__name__}: {str(e)[:300]}"}
            c["elapsed_s"] = round(budget.elapsed(), 1)
            print(f"[{budget.elapsed():6.1f} s] {train_text(c)}", flush=True)
    finally:
        trainer = base = None
        release()


def profile_case(c: dict, shape: str, train: Any, cuda: bool, budget: Budget, out: dict) -> None:
    """Profile ``STEPS`` fused steps of case ``c`` into ``out["train_profile"]`` (bench/step_profile.py);
    a failure is recorded there and leaves the case's own measurement standing."""
    key = f"{shape} K={c['k']} {c['base']}"
    ok, why = budget.fits("train_profile", shape)
    if not ok:
        out["train_profile"][key] = {"status": "skipped", "reason": why}
        return
    try:
        got = step_profile.profile_train(train, cuda, c.get("flops_per_step"))
        out["train_profile"][key] = {"status": "ok", "step_ms_unprofiled": c["step_ms"], "mfu": c["mfu"], **got}
        print(f"[{budget.elapsed():6.1f} s] {step_profile.text(key, got)}", flush=True)
    except Exception as e:  # noqa: BLE001 - the measurement of the case stands
        traceback.print_exc()
        out["train_profile"][key] = {"status": "oom" if is_oom(e) else "error",
                                     "reason": f"{type(e).__name__}: {str(e)[:300]}"}
        release()


# -- report ------------------------------------------------------------------------------------------
def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def row_text(c: dict) -> str:
    what = c["kind"] if c["kind"] == "base" else f"{c['kind']}×{c['adapters']}"
    if c.get("kernel") == "grouped":
        what += " grp"
    head = f"decode {c['shape']:>4} {c['rows']:>4} rows ctx {c['context']:>4} {what:<13}"
    if c["status"] != "ok":
        return f"{head} {c['status']}: {c.get('reason', '')}"
    return (f"{head} gpu {_f(c['gpu_ms'], '8.3f')} ms  wall {c['wall_ms']:8.3f} ms  "
            f"{c['tokens_per_s']:>10.1f} tok/s")


def train_text(c: dict) -> str:
    what = f"train  {c['shape']:>4} K={c['k']:<3} {c['base']:<5}"
    if c.get("checkpointing"):
        what += " ckpt"
    if c["status"] != "ok":
        return f"{what} {c['status']}: {c.get('reason', '')}"
    mfu = f"MFU {c['mfu']:.1%}" if c["mfu"] is not None else "MFU -"
    return (f"{what} {c['step_ms']:9.2f} ms/step  {c['tokens_per_s']:>10.1f} tok/s  "
            f"{c['achieved_tflops']:7.2f} TFLOP/s  {mfu}  peak {_f(c['peak_mb'], '.0f')} MiB")


def tokenizer_dir(arg: str | None) -> str:
    if arg:
        return arg
    if os.environ.get("ADAPTERFAB_TOKENIZER_DIR"):
        return os.environ["ADAPTERFAB_TOKENIZER_DIR"]
    from adapterfab.basemodel import resolve_base_model

    return resolve_base_model("smollm2-135m-instruct").path


def main(argv: list[str] | None = None) -> int:
    t0 = time.monotonic()  # the budget counts from here: imports and set-up included
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, a few steps: the CPU check of make test")
    ap.add_argument("--budget-s", type=float, default=450.0, help="parts whose estimated cost would end past this "
                    "many seconds are skipped (a part that outruns its estimate overruns it: 30 s of margin to 8 min)")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/gpu_probe-<device>-<date>.json; "
                    "with --smoke a file in the temp folder)")
    ap.add_argument("--tokenizer", default=None, help="a folder with a chat-template tokenizer (default "
                    "$ADAPTERFAB_TOKENIZER_DIR, else the SmolLM2 base's)")
    ap.add_argument("--shapes", default=None, help="decode shapes, comma-separated (default 1b,7b; smoke: tiny)")
    ap.add_argument("--train-shapes", default=None, help="training shapes (default 1b,7b: 7b last, as time allows)")
    ap.add_argument("--decode-steps", type=int, default=None, help="timed decode steps per case (default 20)")
    ap.add_argument("--train-rows", type=int, default=None, help="rows per job and step (default 4)")
    ap.add_argument("--train-seq", type=int, default=None, help="tokens per row (default 256)")
    ap.add_argument("--profile-k", type=int, default=None, help="profile the fused step of this K, each variant "
                    "(default 8; smoke 2; 0: none): where its time goes, bench/step_profile.py")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--mem-gib", type=float, default=None, help="take the device to have this much memory in "
                    "all when fitting the LoRA bank beside the KV cache (default: what CUDA reports free; on a "
                    "CPU this is how a test makes the engine rebuild with fewer rows)")
    ap.add_argument("--lora-kernels", default=None, help="the engine's LoRA paths to time, comma-separated "
                    "(row, grouped; default both where grouped runs without a host sync, else row)")
    ap.add_argument("--checkpointing", choices=("auto", "off", "on"), default="auto",
                    help="activation checkpointing in the fused training step: auto turns it on from the first K "
                         "that runs out of device memory without it (MFU counts the step's FLOPs, not the recompute)")
    ap.add_argument("--no-4bit", action="store_true", help="leave the 4-bit training rows out")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--via-disk", action="store_true", help="decode engines load their random weights from a "
                    "temp folder (as the server does) instead of taking them built in memory")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for MFU")
    args = ap.parse_args(argv)
    args.lora_targets = [t for t in args.lora_targets.split(",") if t]

    try:
        import pydantic  # noqa: F401  (adapterfab.methods needs it; the bare GPU machine has none)
    except ImportError:
        print("gpu_probe needs pydantic (adapterfab.methods imports it): install the wheel bundle of "
              "CONTRIBUTING.md 'GPU checks' first", file=sys.stderr)
        return 2
    import peft
    import torch
    import transformers

    cuda_ok = torch.cuda.is_available()
    args.device = args.device or ("cuda" if cuda_ok else "cpu")
    cuda = args.device.startswith("cuda")
    if cuda:
        args.device = "cuda"
    if cuda and not cuda_ok:
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    if not cuda and not args.smoke:
        print("the full probe needs a CUDA device (a 7B engine's KV cache alone is ~69 GB); on a CPU run --smoke",
              file=sys.stderr)
        return 2
    plan = SMOKE if args.smoke else FULL
    if args.shapes:
        plan = dataclasses.replace(plan, decode_shapes=tuple(args.shapes.split(",")))
    if args.train_shapes:
        plan = dataclasses.replace(plan, train_shapes=tuple(args.train_shapes.split(",")))
    for field in ("decode_steps", "train_rows", "train_seq", "profile_k"):
        if getattr(args, field) is not None:
            plan = dataclasses.replace(plan, **{field: getattr(args, field)})
    try:
        import bitsandbytes
        bnb_version = bitsandbytes.__version__
    except Exception:  # noqa: BLE001
        bnb_version = None
    budget = Budget(args.budget_s, args.smoke, t0)
    tok_dir = tokenizer_dir(args.tokenizer)
    stamp = time.strftime("%Y-%m-%d")
    machine = (f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}" if cuda else
               f"{platform.machine()} {os.cpu_count()} CPU, torch {torch.__version__}, CPU only")
    out: dict[str, Any] = {
        "date": stamp, "machine": machine, "device": args.device, "smoke": args.smoke,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "bitsandbytes": bnb_version, "cuda": torch.version.cuda, "python": platform.python_version()},
        "budget_s": args.budget_s, "peak_tflops": args.peak_tflops if cuda else None,
        "shapes": {s: {**SHAPES[s], "params": n_params(s)} for s in {*plan.decode_shapes, *plan.train_shapes}},
        "plan": plan.__dict__, "lora": {"r": args.lora_r, "targets": args.lora_targets},
        "timers": {"gpu_ms": "CUDA events around back-to-back engine decode steps, per step (CUDA only; None on CPU)",
                   "wall_ms": "median host wall time of one engine step: _decode + _sample_rows (greedy, reads "
                              "tokens back)",
                   "step_ms": "the fused trainer's own train_s (its loop reads every step's losses: a sync) per step"},
        "setup": {}, "attention": {}, "decode": [], "train": [], "train_profile": {},
    }
    print(f"gpu_probe: {machine}; budget {args.budget_s:.0f} s; tokenizer {tok_dir}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_probe-"))
    # order: the 1B engine, the 1B trainer, then the 7B engine (the largest, most likely to run out), 7B trainer
    parts = [(decode_shape, s) for s in plan.decode_shapes if s != "7b" and not args.no_decode]
    parts += [(train_shape, s) for s in plan.train_shapes if s != "7b" and not args.no_train]
    parts += [(decode_shape, s) for s in plan.decode_shapes if s == "7b" and not args.no_decode]
    parts += [(train_shape, s) for s in plan.train_shapes if s == "7b" and not args.no_train]
    try:
        for fn, s in parts:
            before = {k: len(out[k]) for k in ("decode", "train")}
            try:
                fn(s, plan, args, tok_dir, tmp, budget, out)
            except Exception as e:  # noqa: BLE001 - a part that broke outside its cases: the next part runs
                traceback.print_exc()
                out.setdefault("failures", []).append(f"{fn.__name__}({s}): {type(e).__name__}: {str(e)[:300]}")
                for c in (c for k, n in before.items() for c in out[k][n:]):
                    if c.get("status", "skipped") == "skipped" and not c.get("reason"):
                        c.update(status="error", reason=f"not reached: {type(e).__name__}: {str(e)[:200]}")
            release()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["elapsed_s"] = round(budget.elapsed(), 1)
    if args.out:
        path = Path(args.out)
    elif args.smoke:
        path = Path(tempfile.gettempdir()) / "gpu_probe-smoke.json"
    else:
        path = REPO / "bench" / "results" / f"gpu_probe-{args.device}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"\n== gpu_probe · {machine} · {out['elapsed_s']} s of {args.budget_s:.0f} s")
    for key, a in out["attention"].items():
        kernels = f", kernels {a['kernels']}" if a["kernels"] else ""
        print(f"attention {key}: {a['backend']} (ops {a['ops']}{kernels})")
    for c in out["decode"]:
        print(row_text(c))
    for c in out["train"]:
        print(train_text(c))
    for key, s in out["train_profile"].items():
        print(step_profile.text(key, s) if s["status"] == "ok" else f"profile {key}: {s['status']}: {s['reason']}")
    for f in out.get("failures", []):
        print(f"FAILED {f}")
    print(f"wrote {path}")
    return 1 if out.get("failures") or any(c["status"] == "error" for c in out["decode"] + out["train"]) else 0


if __name__ == "__main__":
    sys.exit(main())
