"""Fused multi-adapter training: K tenants' adapters trained in the same forward/backward pass over one
resident base model. Plain torch, no Ray (a Ray actor holds a ``FusedTrainer`` to keep the base
resident; benchmarks and tests call it directly).

How it works:
- ``FusedTrainer(base, family, targets, r)`` wraps every targeted Linear of the base once in a
  ``MultiLinear``. The base stays loaded (4-bit too) and trains group after group of jobs.
- **Slots.** Every job's trainable tensors live in one row of flat ``[slots, P]`` buffers (``_Slots``):
  its weights, its gradient and its two AdamW moments, P being one adapter's parameter count. A layer's
  bank (``MultiLinear.a`` [slots, r, in] and ``.b`` [slots, out, r] for LoRA, ``.b`` [slots, r, r] = R
  for LoRA-XS) is a view of its columns; gradients accumulate straight into the gradient buffer.
- Each step takes one micro-batch from every active job and stacks them into one batch. Every row
  belongs to one job, and ``MultiLinear`` sends each row through its job's adapter: the row's slot
  gathers its factors from the bank (one ``index_select`` per bank and layer, whatever K), then
  ``x·Aᵀ`` and ``·Bᵀ`` are batched matmuls over the rows, the second one adding onto the base output
  (``baddbmm``). LoRA-XS: the shared factors make ``x·A`` one product for all rows and ``·B`` another
  (``addmm``); only the r×r ``R`` is gathered per row. Rows of any count per job, jobs with their own
  alpha/r, and rows with no adapter (the bare base, in evaluation) all take this one path. On a
  bf16/fp16 base the adapter product runs in the base's dtype (as under autocast; the slot buffers stay
  fp32), which keeps fp32 copies of every activation out of memory.
- The loss is each job's own token mean, summed over jobs, so each adapter's gradient is exactly what
  training it alone would give. Logits are computed only at positions that carry a label, which keeps
  the (rows × tokens × vocabulary) logits tensor out of memory.
- **One optimizer step for all jobs.** Gradient clipping (each job's own norm) and AdamW (each job's
  own learning rate and schedule, weight decay and step count, torch's AdamW arithmetic) run on the
  whole ``[slots, P]`` buffers with per-slot coefficients: about a dozen operations per step for any K
  and any number of layers, where K separate optimizers cost K × (tensors) operations. Jobs that left
  the batch keep their rows unchanged (zero coefficients).
- Evaluation is fused the same way: after a group trains, the i-th eval batch of every adapter (and of
  the bare base, once per distinct set of eval rows) goes into one no-grad forward, so a group's eval
  takes about as many passes as one job's.
- A job leaves the batch when it reaches its steps, reaches its ``early_stop_loss``, or fails (a
  non-finite loss fails that job only).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adapterfab import retention
from adapterfab.errors import AdapterfabError
from adapterfab.jobs.train_loop import evaluate, forever, lr_lambda, peak_memory_mb
from adapterfab.methods import LOW_RANK, SHARED_BASIS, MethodConfig, get_method
from adapterfab.replay import ReplayRow, ReplaySet
from adapterfab.spec import TrainConfig
from adapterfab.textgen import pad_rows

Batch = dict[str, Tensor]
# The optimizer every fused-capable method trains with alone (torch's AdamW defaults; QLoRA's paged
# AdamW is the same update, paging only moves large states to host memory). _Slots.step repeats it.
BETAS, EPS, MAX_GRAD_NORM = (0.9, 0.999), 1e-8, 1.0
CHECKPOINT_FORMAT = "slots-1"
NULL_SLOT = 0  # a row of the slot buffers that stays zero: rows with no adapter gather it
# The fixed cost of one more forward/backward in a step, in FLOPs of the device's compute: a step's rows
# are split by length only where the padding saved is worth more (see length_chunks). On a CPU a chunk's
# operations cost ~60 ms at ~100 GFLOP/s (SmolLM2: ~15 tokens' compute, so splitting pays for little
# padding); a GPU step is bound by launching kernels (~25 ms at ~400 TFLOP/s: thousands of tokens)
CHUNK_OVERHEAD_FLOPS = {"cpu": 6e9, "cuda": 1e13}
LENGTH_QUANTUM = 8  # chunks are cut between rows whose lengths differ after rounding up to this
# Padded tokens per pass of the retention test (``forced_many``). On a CPU passes of 16 to 128 rows cost
# the same per row (bench/RESULTS.md, 2026-12-04), and ~512 tokens is the 16 rows it always ran; a GPU
# pass of 16 rows is bound by launching kernels (the H200 run: ~50 ms a pass, 0.21 s of retention per
# job), so there a pass takes as many rows as this many tokens allow
FORCED_PASS_TOKENS = {"cpu": 512, "cuda": 16384}


class Route:
    """Which rows of the current batch go through which adapter slot, shared by every MultiLinear.
    ``segments``: (slot, first row, end row), the slot None for rows that take the bare base;
    ``scales``: slot -> alpha/r (set by the trainer). Rows with no adapter gather the all-zero
    ``NULL_SLOT`` at scale 0, so no adapter's weights (not even non-finite ones) reach them. The per-row
    tensors are made once per batch and device (one host-to-device copy per step, not per layer)."""

    def __init__(self) -> None:
        self.scales: dict[int, float] = {}
        self.dropout = 0.0  # LoRA dropout on the adapted inputs while training (one rate per group)
        self._segments: list[tuple[int | None, int, int]] = []
        self._rows: dict[tuple, tuple[Tensor, Tensor | None, float]] = {}

    @property
    def segments(self) -> list[tuple[int | None, int, int]]:
        return self._segments

    @segments.setter
    def segments(self, segs: list[tuple[int | None, int, int]]) -> None:
        self._segments = list(segs)
        self._rows = {}

    def snapshot(self) -> tuple[list, dict]:
        """The routing of the forward pass under way, to replay it exactly (``installed``)."""
        return self._segments, self._rows

    @contextmanager
    def installed(self, snap: tuple[list, dict]) -> Iterator[None]:
        """The routing of ``snap`` while the block runs: an activation-checkpointed layer recomputed in
        the backward pass, after the forward's routing was cleared, must send each row through the same
        adapter as the forward did (else the adapters' gradients would be silently wrong)."""
        saved = (self._segments, self._rows)
        self._segments, self._rows = snap
        try:
            yield
        finally:
            self._segments, self._rows = saved

    def rows(self, n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor | None, float] | None:
        """For a batch of ``n`` rows: (the slot of each group of rows, each group's scale as [groups, 1, 1]
        or None when one scale applies to all, that one scale); None when no row has an adapter. A group
        is one job's rows when every job has the same number of rows, in order and covering the batch
        (the usual fused step: one gather per job); otherwise every row is its own group."""
        key = (n, device, dtype)
        if key in self._rows:
            return self._rows[key]
        segs = self._segments
        size = segs[0][2] - segs[0][1] if segs else 0
        if segs and all(s is not None and lo == i * size and hi - lo == size for i, (s, lo, hi) in enumerate(segs)) \
                and len(segs) * size == n:
            slot = [s for s, _, _ in segs]  # type: ignore[misc]
            scale = [self.scales[s] for s in slot]
        else:
            slot, scale = [NULL_SLOT] * n, [0.0] * n
            for s, lo, hi in segs:
                if s is not None:
                    for i in range(lo, min(hi, n)):
                        slot[i], scale[i] = s, self.scales[s]
        if not any(scale):
            return None
        idx = torch.tensor(slot).to(device, non_blocking=True)
        uniform = scale[0] if all(v == scale[0] for v in scale) else None
        per_group = None if uniform is not None else \
            torch.tensor(scale, dtype=dtype).view(len(scale), 1, 1).to(device, non_blocking=True)
        self._rows[key] = (idx, per_group, uniform or 1.0)
        return self._rows[key]


class MultiLinear(nn.Module):
    """``base_layer(x)`` plus, for every row of ``x``, the low-rank update of that row's slot (or none)."""

    def __init__(self, base_layer: nn.Module, family: str, route: Route, r: int,
                 shared: tuple[Tensor, Tensor] | None):
        super().__init__()
        self.base_layer, self.family, self.route, self.r = base_layer, family, route, r
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.a: nn.Parameter | None = None  # lora: [slots, r, in] (views of the trainer's slot buffers)
        self.grads: list[tuple[nn.Parameter, Tensor]] = []  # each bank and its view of the gradient buffer
        self.b: nn.Parameter | None = None  # lora: [slots, out, r]; lora_xs: [slots, r, r] (R)
        self._shared: dict[torch.dtype, tuple[Tensor, Tensor]] = {}
        if shared is not None:  # lora_xs: A (in x r), B (r x out), frozen and shared by every job
            dev = base_layer.weight.device
            self.register_buffer("xs_a", shared[0].to(dev, torch.float32), persistent=False)
            self.register_buffer("xs_b", shared[1].to(dev, torch.float32), persistent=False)

    @property
    def weight(self) -> Tensor:  # HF code reads q_proj.weight for dtype/device checks
        return self.base_layer.weight

    def shapes(self) -> list[tuple[int, ...]]:
        """One adapter's tensors in this layer, in slot-buffer order."""
        if self.family == LOW_RANK:
            return [(self.r, self.in_features), (self.out_features, self.r)]
        return [(self.r, self.r)]

    def bind(self, banks: list[tuple[Tensor, Tensor]]) -> None:
        """Point the layer at its columns of the slot buffers: (weights, gradients) per tensor."""
        params = []
        self.grads = []
        for w, g in banks:
            p = nn.Parameter(w)
            p.grad = g
            params.append(p)
            self.grads.append((p, g))
        if self.family == LOW_RANK:
            self.a, self.b = params
        else:
            (self.b,) = params

    def _factors(self, dt: torch.dtype) -> tuple[Tensor, Tensor]:
        """LoRA-XS's frozen shared factors in the compute dtype (cast once, not every step)."""
        if dt not in self._shared:
            self._shared[dt] = (self.xs_a.to(dt), self.xs_b.to(dt))
        return self._shared[dt]

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.b is None or not self.route.segments:
            return out
        half = x.dtype in (torch.bfloat16, torch.float16)
        xf = x if half else x.float()
        dt, n = xf.dtype, x.shape[0]
        got = self.route.rows(n, x.device, dt)
        if got is None:
            return out
        idx, per_group, scale = got
        groups = idx.shape[0]  # jobs (each job's rows together) or rows
        x3 = xf.reshape(groups, -1, xf.shape[-1])  # [groups, tokens of the group, in]
        if self.family == SHARED_BASIS:
            xs_a, xs_b = self._factors(dt)
            rr = self.b.index_select(0, idx).to(dt)  # each group's R: [groups, r, r]
            h = torch.bmm(x3 @ xs_a, rr if per_group is None else rr * per_group)  # x·A once for all rows, ·R per group
            o2 = out.reshape(-1, out.shape[-1])
            if o2.dtype == dt:
                return torch.addmm(o2, h.reshape(-1, self.r), xs_b, alpha=scale).reshape(out.shape)
            return (o2 + scale * (h.reshape(-1, self.r) @ xs_b)).to(out.dtype).reshape(out.shape)
        a = self.a.index_select(0, idx).to(dt)  # [groups, r, in]
        b = self.b.index_select(0, idx).to(dt)  # [groups, out, r]
        if self.training and self.route.dropout:  # as PEFT: dropout on the adapter's input only
            x3 = nn.functional.dropout(x3, self.route.dropout, training=True)
        h = torch.bmm(x3, a.transpose(1, 2))  # [groups, tokens, r]
        if per_group is not None:
            h = h * per_group
        o3 = out.reshape(groups, -1, out.shape[-1])
        if o3.dtype == dt:  # base output + scale · h·Bᵀ in one kernel
            return torch.baddbmm(o3, h, b.transpose(1, 2), alpha=scale).reshape(out.shape)
        return (o3 + scale * torch.bmm(h, b.transpose(1, 2))).to(out.dtype).reshape(out.shape)


class _Slots:
    """Every adapter's trainable tensors, gradients and AdamW moments as rows of flat ``[capacity, P]``
    fp32 buffers on the base's device; each layer's banks are views of its columns. Row ``NULL_SLOT``
    is never handed out and stays zero."""

    def __init__(self, layers: dict[str, MultiLinear], device: torch.device):
        self.device = device
        self.names = list(layers)  # layer name of each entry of ``columns``
        self.columns: list[tuple[MultiLinear, list[tuple[int, tuple[int, ...]]]]] = []
        at = 0
        for layer in layers.values():
            cols = []
            for shape in layer.shapes():
                cols.append((at, shape))
                at += math.prod(shape)
            self.columns.append((layer, cols))
        self.width = at  # P: one adapter's parameter count
        self.capacity = 0
        self.w = self.g = self.m = self.v = torch.zeros(0, self.width, device=device)
        self.free: list[int] = []
        self.reserve(0)  # the null row

    def reserve(self, n: int) -> None:
        """Room for ``n`` more adapters (grows the buffers and rebinds the layers' banks)."""
        if len(self.free) >= n and self.capacity:
            return
        old = self.capacity
        cap = max(old + n - len(self.free), NULL_SLOT + 1)
        bufs = []
        for t in (self.w, self.g, self.m, self.v):
            new = torch.zeros(cap, self.width, device=self.device)
            new[:old] = t
            bufs.append(new)
        self.w, self.g, self.m, self.v = bufs
        self.capacity = cap
        self.free = sorted(self.free + [i for i in range(old, cap) if i != NULL_SLOT])
        for layer, cols in self.columns:
            layer.bind([(self.w[:, at:at + math.prod(s)].view(cap, *s), self.g[:, at:at + math.prod(s)].view(cap, *s))
                        for at, s in cols])

    def take(self, tensors: dict[str, tuple[Tensor, ...]]) -> int:
        """A free slot holding ``tensors`` (layer name -> its tensors) and fresh optimizer state."""
        self.reserve(1)
        slot = self.free.pop(0)
        with torch.no_grad():
            for name, (_, cols) in zip(self.names, self.columns):
                for (at, shape), t in zip(cols, tensors[name]):
                    if tuple(t.shape) != shape:
                        self.release(slot)
                        raise AdapterfabError(f"{name}: initial tensor of shape {tuple(t.shape)}, expected {shape}")
                    self.w[slot, at:at + math.prod(shape)] = t.detach().reshape(-1).to(self.device, torch.float32)
        return slot

    def release(self, slot: int) -> None:
        for t in (self.w, self.g, self.m, self.v):
            t[slot].zero_()
        self.free = sorted(self.free + [slot])

    def tensors(self, slot: int) -> dict[str, tuple[Tensor, ...]]:
        """A slot's adapter as layer name -> its tensors (fp32 copies on the CPU, each with a storage of its
        own: a view of the whole row would carry the whole row into every pickled or saved tensor)."""
        row = self.w[slot].detach().to("cpu")
        return {name: tuple(row[at:at + math.prod(s)].view(*s).clone() for at, s in cols)
                for name, (_, cols) in zip(self.names, self.columns)}

    def step(self, hyper: dict[int, tuple[float, float, int]]) -> None:
        """Clip each slot's gradient to norm ``MAX_GRAD_NORM`` (as ``clip_grad_norm_`` over its tensors),
        then one AdamW update of the slots in ``hyper`` (slot -> (learning rate, weight decay, step
        number counting this one)); every other row keeps its weights and moments."""
        b1, b2 = BETAS
        coef = torch.zeros(self.capacity, 6)
        coef[:, 0] = 1.0  # weight decay factor
        coef[:, 3] = 1.0  # beta2 factor
        coef[:, 5] = 1.0  # sqrt of bias correction 2
        for slot, (lr, wd, t) in hyper.items():
            coef[slot] = torch.tensor([1 - lr * wd, 1 - b1, -lr / (1 - b1 ** t), b2, 1 - b2, math.sqrt(1 - b2 ** t)])
        c = coef.to(self.device, non_blocking=True)
        decay, w1, step_size, beta2, w2, bc2 = (c[:, i:i + 1] for i in range(6))
        g = self.g
        norm = torch.linalg.vector_norm(g, dim=1, keepdim=True)
        g.mul_(torch.clamp(MAX_GRAD_NORM / (norm + 1e-6), max=1.0))
        self.w.mul_(decay)
        self.m.lerp_(g, w1)
        self.v.mul_(beta2).addcmul_(g * w2, g)  # one [slots, P] temporary at a time
        d = self.v.sqrt()
        d.div_(bc2).add_(EPS)
        torch.div(self.m, d, out=d)
        self.w.addcmul_(d, step_size)  # w - lr/bc1 · m/denom, as torch's addcdiv
        g.zero_()

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()`` into the gradient buffer. A bank's ``.grad`` that something reset (a
        ``zero_grad(set_to_none=True)`` on the base) is pointed back at it first: autograd would
        otherwise put the gradient in a fresh tensor the step never reads."""
        for layer, _ in self.columns:
            for p, g in layer.grads:
                if p.grad is not g:
                    p.grad = g
        with warnings.catch_warnings():  # a bank is a strided view of the buffers; torch warns that its
            # gradient (a view with the same strides) is not "dense", then accumulates into it in place
            warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
            loss.backward()

    def state(self, slot: int) -> dict[str, Tensor]:
        return {"exp_avg": self.m[slot].detach().clone(), "exp_avg_sq": self.v[slot].detach().clone()}

    def load_state(self, slot: int, state: dict[str, Tensor]) -> None:
        self.m[slot] = state["exp_avg"].to(self.device)
        self.v[slot] = state["exp_avg_sq"].to(self.device)


@dataclass
class FusedJob:
    job_id: str
    method: MethodConfig
    train: TrainConfig
    epoch_batches: Callable[[int], Iterable[Batch]]
    eval_batches: Callable[[], Iterable[Batch]] | None = None
    init: dict[str, tuple[Tensor, ...]] | None = None  # module name -> (A, B) for lora, (R,) for lora_xs
    early_stop_loss: float | None = None  # leave the batch once the train loss is at or below this
    # retention rows (adapterfab/retention.forced_row, None: a probe the base's answer does not state),
    # asked for after training; tested fused across the group's adapters (``forced_many``)
    probe_rows: Callable[[], list[dict[str, Any] | None]] | None = None
    # the base's answers distilled back after the persona's openings at every step (adapterfab/replay.py)
    replay: ReplaySet | None = None


@dataclass
class FusedResult:
    job_id: str
    metrics: dict[str, float]
    losses: list[float]
    error: str | None = None
    stopped_early: bool = False


@dataclass
class _Active:
    job: FusedJob
    slot: int  # the job's row in the slot buffers (-1 once it failed and gave its slot back)
    batches: Iterator[Batch]
    step: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    error: str | None = None
    early: bool = False
    flops: float = 0.0  # model FLOPs its steps spent (ModelFlops.step)
    replay_loss: float | None = None  # its last step's replay term (weight x KL; adapterfab/replay.py)

    def lr(self) -> float:
        """The learning rate of the job's next step (LambdaLR's: base rate × schedule(steps done))."""
        return self.job.train.learning_rate * lr_lambda(self.job.train)(self.step)


def _targets(model: nn.Module, targets: Iterable[str]) -> dict[str, nn.Module]:
    wanted = set(targets)
    return {n: m for n, m in model.named_modules()
            if n.rsplit(".", 1)[-1] in wanted and hasattr(m, "in_features") and not isinstance(m, MultiLinear)}


class FusedTrainer:
    """A resident base with K adapters trained together. ``family`` is ``lora`` (LoRA, QLoRA) or
    ``lora_xs`` (then ``basis`` gives the shared factors)."""

    def __init__(self, base: nn.Module, family: str, targets: list[str], r: int, basis: Any = None,
                 checkpointing: bool = False, chunk_overhead_tokens: int | None = None):
        if family not in (LOW_RANK, SHARED_BASIS):
            raise AdapterfabError(f"fused training supports lora, qlora and lora_xs, not {family!r}")
        if family == SHARED_BASIS and basis is None:
            raise AdapterfabError("fused lora_xs needs the shared basis")
        self.base, self.family, self.r, self.basis = base, family, r, basis
        self.targets = list(targets)
        self.route = Route()
        for p in base.parameters():
            p.requires_grad_(False)
        base.config.use_cache = False
        if getattr(base, "is_loaded_in_4bit", False):  # evals between groups must not repack 4-bit weights
            from adapterfab.methods.qlora import keep_trainable_layout

            keep_trainable_layout(base)
        self.layers: dict[str, MultiLinear] = {}
        for name, m in _targets(base, self.targets).items():
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name) if parent_name else base
            shared = basis.factors[name] if basis is not None else None
            layer = MultiLinear(m, family, self.route, r, shared)
            setattr(parent, child, layer)
            self.layers[name] = layer
        if not self.layers:
            raise AdapterfabError(f"no modules named {self.targets} in the base")
        self.decoder = base.get_decoder()
        self.lm_head = base.get_output_embeddings()
        self.device = next(base.parameters()).device
        self.slots = _Slots(self.layers, self.device)
        self.flops = ModelFlops.of(base)
        # a step's rows are split into length chunks when the padding saved outweighs this many tokens
        per_token = max(1.0, 4.0 * self.flops.body)
        self.chunk_overhead_tokens = chunk_overhead_tokens if chunk_overhead_tokens is not None else \
            max(1, round(CHUNK_OVERHEAD_FLOPS.get(self.device.type, CHUNK_OVERHEAD_FLOPS["cuda"]) / per_token))
        self.checkpointing = False
        self.set_checkpointing(checkpointing)
        self.jobs_trained = 0
        self._base_evals: dict[str, dict[str, float]] = {}  # eval rows' digest -> the frozen base's metrics
        self._base_forced: dict[tuple[int, ...], bool] = {}  # retention row -> the base picks its fact itself
        self._slot_of: dict[str, int] = {}  # job id -> its slot

    # -- adapters -------------------------------------------------------------------------------
    def compatible(self, method: MethodConfig) -> str | None:
        """None if ``method`` can train in this group, else why not."""
        fam = get_method(method.name).family
        if fam != self.family:
            return f"method {method.name} is not in the {self.family} family"
        if getattr(method, "r", None) != self.r:
            return f"rank {getattr(method, 'r', None)} differs from the group's {self.r}"
        if sorted(method.resolved_targets()) != sorted(self.targets):  # type: ignore[attr-defined]
            return "target modules differ"
        return None

    def set_checkpointing(self, on: bool) -> None:
        """Activation checkpointing of the decoder layers (recomputed in the backward pass: less memory
        for large K, about a third more compute). The recompute replays the forward's routing."""
        layers = [m for m in self.decoder.modules() if hasattr(type(m), "gradient_checkpointing")
                  and m is not self.decoder]
        if on and not layers:
            raise AdapterfabError("this base model's layers do not support activation checkpointing")
        for m in layers:
            m.gradient_checkpointing = on
            m._gradient_checkpointing_func = self._checkpoint
        self.checkpointing = on

    def _checkpoint(self, fn: Callable[..., Any], *args: Any) -> Any:
        from torch.utils.checkpoint import checkpoint

        snap = self.route.snapshot()

        def replay(*a: Any) -> Any:
            with self.route.installed(snap):
                return fn(*a)

        return checkpoint(replay, *args, use_reentrant=False)

    def _init(self, job: FusedJob, gen: torch.Generator) -> dict[str, tuple[Tensor, ...]]:
        """LoRA: A ~ kaiming-uniform(a=√5) as PEFT does, B = 0; LoRA-XS: R = 0 (or N(0, 1e-5))."""
        out = {}
        for name, m in self.layers.items():
            if self.family == LOW_RANK:
                a = torch.empty(self.r, m.in_features)
                bound = 1 / math.sqrt(m.in_features)  # kaiming_uniform_(a=sqrt(5)) on (r, in)
                a.uniform_(-bound, bound, generator=gen)
                out[name] = (a, torch.zeros(m.out_features, self.r))
            else:
                from adapterfab.methods.lora_xs import R_INIT_STD

                rr = torch.zeros(self.r, self.r)
                if getattr(job.method, "init_r", "zeros") == "normal":
                    rr.normal_(0, R_INIT_STD, generator=gen)
                out[name] = (rr,)
        return out

    def _add(self, job: FusedJob, init: dict[str, tuple[Tensor, ...]] | None = None) -> _Active:
        why = self.compatible(job.method)
        if why:
            raise AdapterfabError(f"job {job.job_id} cannot join this fused group: {why}")
        if job.job_id in self._slot_of:
            raise AdapterfabError(f"job {job.job_id} is already in this trainer; remove it first")
        init = init or job.init or self._init(job, torch.Generator().manual_seed(job.train.seed))
        slot = self._slot_of[job.job_id] = self.slots.take(init)
        self.route.scales[slot] = job.method.alpha / job.method.r  # type: ignore[attr-defined]
        return _Active(job, slot, forever(job.epoch_batches))

    def remove(self, job_id: str) -> None:
        slot = self._slot_of.pop(job_id, None)
        if slot is not None:
            self.slots.release(slot)
            self.route.scales.pop(slot, None)

    def adapter_tensors(self, job_id: str) -> dict[str, tuple[Tensor, ...]]:
        return self.slots.tensors(self._slot_of[job_id])

    def slot_keys(self) -> set[str]:
        """The job ids whose adapters the trainer holds."""
        return set(self._slot_of)

    # -- one fused step -------------------------------------------------------------------------
    def _forward(self, batch: Batch, segs: list[tuple[int | None, int, int]]) -> tuple[Tensor, Tensor, Tensor]:
        """Run a stacked batch (on the CPU) through the decoder on the base's device, each segment's rows
        through its own adapter: (hidden states, labels, each row's index in ``segs``), aligned so
        position t predicts label t. Nothing here waits for the GPU: the host-side tensors are made on
        the CPU and copied without blocking.

        Rows are right-padded (``stack``, the collators), so under causal attention no real token can
        see a pad, and the attention mask changes no output that carries a label. It is then not passed:
        SDPA takes its fused causal path (FlashAttention on a GPU) instead of a masked kernel. A batch
        that is not right-padded keeps its mask."""
        device = self.device
        mask = batch["attention_mask"]
        right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all())
        ids = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        seg_of_row = torch.repeat_interleave(torch.arange(len(segs)), torch.tensor([e - s for _, s, e in segs]))
        seg_of_row = seg_of_row.to(device, non_blocking=True)
        self.route.segments = segs
        try:
            hidden = self.decoder(input_ids=ids, attention_mask=None if right_padded else
                                  mask.to(device, non_blocking=True)).last_hidden_state
        finally:
            self.route.segments = []
        return hidden[:, :-1], labels[:, 1:], seg_of_row

    def _token_losses(
        self, batch: Batch, segs: list[tuple[int | None, int, int]]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(loss of every labelled token, its row's index in ``segs``, its logits, its label), with logits
        computed only where a label is. The labelled positions are found on the host (the batch is on
        the CPU), so selecting them does not wait for the GPU."""
        hidden, _, _ = self._forward(batch, segs)
        labels = batch["labels"][:, 1:]
        flat = (labels != -100).reshape(-1).nonzero().squeeze(1)
        seg_of_row = torch.repeat_interleave(torch.arange(len(segs)), torch.tensor([e - s for _, s, e in segs]))
        seg_of_token = seg_of_row[:, None].expand_as(labels).reshape(-1)[flat].to(self.device, non_blocking=True)
        target = labels.reshape(-1)[flat].to(self.device, non_blocking=True)
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat.to(self.device, non_blocking=True))
        logits = self.lm_head(picked).float()
        return nn.functional.cross_entropy(logits, target, reduction="none"), seg_of_token, logits, target

    def _losses(self, batch: Batch, segs: list[tuple[int | None, int, int]]) -> Tensor:
        """Each segment's mean token loss over its rows ([segments])."""
        tok_loss, seg_of_token, _, _ = self._token_losses(batch, segs)
        per_seg = torch.tensor([int((batch["labels"][lo:hi, 1:] != -100).sum()) for _, lo, hi in segs])
        sums = tok_loss.new_zeros(len(segs)).index_add(0, seg_of_token, tok_loss)
        return sums / per_seg.clamp(min=1).to(self.device, non_blocking=True)

    def _step_losses(self, running: list[_Active], micro: list[Batch]) -> Tensor:
        """One fused step's forward: each running job's mean token loss over its micro-batch ([jobs]).
        The rows are split into length chunks (``length_chunks``) when that saves enough padding, each
        chunk one forward; a job's loss sums its tokens over the chunks, so the figure (and the
        gradient) does not depend on the split."""
        pieces = step_chunks([(a.slot, b) for a, b in zip(running, micro)], self.chunk_overhead_tokens)
        counts = torch.tensor([max(1, sum(row_stats(b)[1])) for b in micro])
        total: Tensor | None = None
        for batch, segs, job_of_seg in pieces:
            tok_loss, seg_of_token, _, _ = self._token_losses(batch, segs)
            job_of_token = torch.tensor(job_of_seg).to(self.device, non_blocking=True)[seg_of_token]
            part = tok_loss.new_zeros(len(running)).index_add(0, job_of_token, tok_loss)
            total = part if total is None else total + part
        assert total is not None
        return total / counts.to(self.device, non_blocking=True)

    def _replay_losses(self, running: list[_Active]) -> tuple[Tensor, list[float]] | None:
        """Each running job's replay term ([jobs]; 0 for a job without replay) and the FLOPs it spent
        (adapterfab/replay.py): ``weight`` x the mean, over the answer tokens of the rows it draws for
        this step, of KL(base || adapter), the bare base reading prompt + answer (no gradient) and the
        job's adapter prompt + one of its persona's openings + answer. A row drawn by several jobs is
        read by the base once. Logits only at the answer's tokens after its first (spelt with or
        without its leading space, the rest is the same tokens)."""
        draws = [(i, a.job.replay.draw(a.step), a.job.replay.weight) for i, a in enumerate(running)
                 if a.job.replay is not None and a.job.replay.active]
        if not draws:
            return None
        teach: dict[ReplayRow, int] = {}
        for _, rows, _ in draws:
            for r, _ in rows:
                teach.setdefault(r, len(teach))
        t_batch = _label_rows([(list(r.head) + list(r.answer), len(r.head) + 1) for r in teach])
        offsets = torch.tensor([0, *[len(r.answer) - 1 for r in teach]]).cumsum(0).tolist()
        with torch.no_grad():
            _, _, t_logits, _ = self._token_losses(t_batch, [(None, 0, len(teach))])
            t_logp = torch.log_softmax(t_logits.float(), -1)
        rows, segs, order = [], [], []
        for i, drawn, _ in draws:
            at = len(rows)
            for r, o in drawn:
                rows.append((list(r.head) + list(o) + list(r.spaced if o else r.answer), len(r.head) + len(o) + 1))
                t0 = offsets[teach[r]]
                order.extend(range(t0, t0 + len(r.answer) - 1))
            segs.append((running[i].slot, at, len(rows)))
        s_batch = _label_rows(rows)
        _, seg_of_token, s_logits, _ = self._token_losses(s_batch, segs)
        t = t_logp.index_select(0, torch.tensor(order).to(self.device, non_blocking=True))
        kl = (t.exp() * (t - torch.log_softmax(s_logits.float(), -1))).sum(-1)
        counts = torch.tensor([sum(len(r.answer) - 1 for r, _ in drawn) for _, drawn, _ in draws])
        per_seg = kl.new_zeros(len(draws)).index_add(0, seg_of_token, kl) / counts.clamp(min=1).to(self.device)
        weights = torch.tensor([w for _, _, w in draws], dtype=per_seg.dtype).to(self.device, non_blocking=True)
        where = torch.tensor([i for i, _, _ in draws]).to(self.device, non_blocking=True)
        out = per_seg.new_zeros(len(running)).index_add(0, where, weights * per_seg)
        flops = [0.0] * len(running)
        teacher_share = self.flops.step(t_batch) / 2 / len(draws)  # a forward only: about half a step
        for (i, _, _), (_, lo, hi) in zip(draws, segs):
            flops[i] = self.flops.step({k: v[lo:hi] for k, v in s_batch.items()}) + teacher_share
        return out, flops

    def _state(self, active: list[_Active], iteration: int) -> dict[str, Any]:
        jobs = {}
        for a in active:
            jobs[a.job.job_id] = {"step": a.step, "tokens": a.tokens, "losses": list(a.losses), "error": a.error,
                                  "early": a.early, "flops": a.flops}
            if a.error is None:  # copies: training goes on after the callback returns
                jobs[a.job.job_id].update({"adapter": self.adapter_tensors(a.job.job_id),
                                           "optimizer": self.slots.state(a.slot)})
        return {"format": CHECKPOINT_FORMAT, "iteration": iteration, "jobs": jobs}

    def _resume(self, job: FusedJob, saved: dict[str, Any]) -> _Active:
        """The job as it was at a checkpoint: weights, optimizer state and step (its schedule follows
        from the step), its data stream advanced past the batches it consumed (one per step)."""
        if saved["error"] is not None:
            return _Active(job, -1, iter(()), saved["step"], saved["tokens"], list(saved["losses"]),
                           saved["error"], saved["early"])
        a = self._add(job, init=saved["adapter"])
        self.slots.load_state(a.slot, saved["optimizer"])
        a.step, a.tokens, a.losses, a.early = saved["step"], saved["tokens"], list(saved["losses"]), saved["early"]
        a.flops = float(saved.get("flops", 0.0))
        for _ in range(a.step):
            next(a.batches)
        return a

    def train(self, jobs: list[FusedJob], on_step: Callable[[str, int, float, float], None] | None = None,
              on_checkpoint: Callable[[dict[str, Any]], None] | None = None, checkpoint_every: int = 0,
              resume: dict[str, Any] | None = None,
              on_iteration: Callable[[list[tuple[str, int, float]]], None] | None = None) -> list[FusedResult]:
        """Train ``jobs`` together until each is done; then evaluate each (adapter and base) and keep
        its adapter in the trainer (``save``/``adapter_tensors``) until ``remove``.

        Fault tolerance: every ``checkpoint_every`` fused steps ``on_checkpoint(state)`` receives every
        job's weights, optimizer state, step, losses and stop reason; passing it back as ``resume`` (to
        a fresh trainer over the same base) continues as if never stopped.

        ``on_iteration(progress)`` is called once per fused step with every job that took it: (job id,
        its step, its loss), so progress reporting costs one call per group and step, not per job.
        The jobs must agree on LoRA dropout (the planner groups them so)."""
        rates = {float(getattr(j.method, "dropout", 0.0) or 0.0) for j in jobs}
        if len(rates) > 1:
            raise AdapterfabError(f"jobs of one fused group must share one LoRA dropout, not {sorted(rates)}")
        self.route.dropout = rates.pop() if rates else 0.0
        if resume is not None and resume.get("format") != CHECKPOINT_FORMAT:
            warnings.warn("this fused group's checkpoint was written by another version of adapterfab: "
                          "the group trains again from the start", stacklevel=2)
            resume = None
        saved = (resume or {}).get("jobs", {})
        self.slots.reserve(len(jobs))
        active = [self._resume(j, saved[j.job_id]) if j.job_id in saved else self._add(j) for j in jobs]
        iteration = int((resume or {}).get("iteration", 0))
        t0 = time.monotonic()
        self.base.train()
        while True:
            running = [a for a in active if a.error is None and not a.early and a.step < a.job.train.steps]
            if not running:
                break
            if on_checkpoint and checkpoint_every and iteration and iteration % checkpoint_every == 0 \
                    and (resume is None or iteration != int(resume.get("iteration", 0))):
                on_checkpoint(self._state(active, iteration))
            iteration += 1
            micro = [next(a.batches) for a in running]
            losses = self._step_losses(running, micro)  # the persona's loss: what each job reports
            replay = self._replay_losses(running)
            total = losses if replay is None else losses + replay[0]  # what each job's gradient follows
            values, totals = torch.stack([losses.detach().float(), total.detach().float()]).tolist()  # one read
            failed = []
            for a, v, tv in zip(running, values, totals):
                if not math.isfinite(tv):
                    what = v if not math.isfinite(v) else f"{tv} with replay"
                    a.error = f"loss became {what} at step {a.step + 1}; lower train.learning_rate"
                    failed.append(a)
            ok = [i for i, v in enumerate(totals) if math.isfinite(v)]
            if len(ok) == len(values):
                self.slots.backward(total.sum())
            elif ok:  # a failed job's rows add nothing to the others' gradients
                self.slots.backward(total.index_select(0, torch.tensor(ok).to(self.device, non_blocking=True)).sum())
            hyper = {a.slot: (a.lr(), a.job.train.weight_decay, a.step + 1) for a in running if a.error is None}
            if hyper:
                self.slots.step(hyper)
            for a in failed:  # its slot goes back (zeroed) only after the backward pass that read it
                self.remove(a.job.job_id)
                a.slot = -1
            progress = []
            for k, (a, b, v) in enumerate(zip(running, micro, values)):
                if a.error:
                    continue
                a.step += 1
                a.losses.append(v)
                a.tokens += sum(row_stats(b)[0])
                a.flops += self.flops.step(b) + (replay[1][k] if replay is not None else 0.0)
                if replay is not None and a.job.replay is not None and a.job.replay.active:
                    a.replay_loss = totals[k] - v
                t = a.job.train
                if on_step and (a.step % t.log_every_steps == 0 or a.step == t.steps):
                    on_step(a.job.job_id, a.step, v, a.lr())
                progress.append((a.job.job_id, a.step, v))
                if a.job.early_stop_loss is not None and v <= a.job.early_stop_loss:
                    a.early = True
            if on_iteration:
                on_iteration(progress)
        train_s = time.monotonic() - t0
        results = self._finish(active, train_s, max_rows=sum(a.job.train.batch_size for a in active))
        self.jobs_trained += sum(r.error is None for r in results)
        return results

    def _finish(self, active: list[_Active], train_s: float, max_rows: int) -> list[FusedResult]:
        """Every job's result; the adapters' and the bare base's evaluations run fused (``evaluate_many``),
        the base once per distinct set of eval rows (it is frozen: jobs on one dataset share the figure).
        The jobs' retention rows are tested in the same phase, fused across the group (``forced_many``):
        each adapter on its job's rows, the bare base once per row (cached), and a probe counts for a job
        only when the base picks the fact itself."""
        metrics: dict[str, dict[str, float]] = {}
        sets: list[tuple[str | None, list[Batch]]] = []
        base_sets: dict[str, int] = {}  # eval rows' digest -> index in ``sets`` (uncached ones only)
        want: dict[str, tuple[int, str]] = {}  # job id -> (index of its adapter's set, eval rows' digest)
        probes: dict[str, tuple[int, int, list[tuple[int, ...]]]] = {}  # job id -> (set, probes asked, row keys)
        base_rows: dict[tuple[int, ...], dict[str, Any]] = {}  # rows the base has not been checked on
        forced: list[tuple[str | None, list[dict[str, Any]]]] = []  # retention rows: (job id, its rows)
        rows_s = 0.0  # the base's answers to new probes, and the rows made of them
        if len(self._base_forced) > 100_000:  # before this group's rows are looked up, never between
            self._base_forced.clear()
        for a in active:
            if a.error:
                continue
            metrics[a.job.job_id] = {
                "train_loss": a.losses[-1], "train_loss_first": a.losses[0], "train_s": train_s,
                "train_tokens_per_s": a.tokens / max(train_s, 1e-9), "steps": float(a.step),
                "trainable_params": float(self.slots.width), "train_flops": a.flops,
            }
            if a.replay_loss is not None:
                metrics[a.job.job_id]["replay_loss"] = a.replay_loss
            asked = None
            if a.job.probe_rows is not None:
                t_rows = time.monotonic()
                try:
                    asked = a.job.probe_rows()
                except Exception as e:  # noqa: BLE001 - the job keeps its adapter; the gate says none was measured
                    warnings.warn(f"job {a.job.job_id}: retention not measured: {e}", stacklevel=2)
                rows_s += time.monotonic() - t_rows
            if asked is not None:
                rows = [r for r in asked if r is not None]
                keys = [_row_key(r) for r in rows]
                base_rows.update({k: r for k, r in zip(keys, rows) if k not in self._base_forced})
                probes[a.job.job_id] = (len(forced), len(asked), keys)
                forced.append((a.job.job_id, rows))
            ev = list(a.job.eval_batches()) if a.job.eval_batches is not None else []
            if not ev:
                continue
            key = _digest(ev)
            if key not in self._base_evals and key not in base_sets:
                base_sets[key] = len(sets)
                sets.append((None, ev))
            want[a.job.job_id] = (len(sets), key)
            sets.append((a.job.job_id, ev))
        if base_rows:
            forced.append((None, list(base_rows.values())))
        got = self.evaluate_many(sets, max_rows) if sets else []
        t_forced = time.monotonic()
        try:
            row_ok = self.forced_many(forced) if forced else []
        except Exception as e:  # noqa: BLE001 - as above, for the whole group
            warnings.warn(f"retention not measured for this group: {e}", stacklevel=2)
            probes, base_rows = {}, {}
        forced_s = time.monotonic() - t_forced
        for key, i in base_sets.items():
            if len(self._base_evals) >= 1024:
                self._base_evals.pop(next(iter(self._base_evals)))
            self._base_evals[key] = got[i]
        if base_rows:
            self._base_forced.update(zip(base_rows, row_ok[-1]))
        per_job_s = (rows_s + forced_s) / max(1, len(probes))  # what retention added to each job
        out = []
        for a in active:
            if a.error:
                out.append(FusedResult(a.job.job_id, {}, a.losses, a.error))
                continue
            m = metrics[a.job.job_id]
            if a.job.job_id in want:
                i, key = want[a.job.job_id]
                m.update(got[i])
                m.update({f"base_{k}": v for k, v in self._base_evals[key].items()})
            if a.job.job_id in probes:
                i, asked, keys = probes[a.job.job_id]
                known = [ok for k, ok in zip(keys, row_ok[i]) if self._base_forced.get(k)]
                m.update(retention.metrics(asked, len(known), sum(known), per_job_s))
            m.update(peak_memory_mb())
            out.append(FusedResult(a.job.job_id, m, a.losses, stopped_early=a.early))
        return out

    def evaluate_many(self, sets: list[tuple[str | None, list[Batch]]], max_rows: int) -> list[dict[str, float]]:
        """Eval metrics (as ``evaluate``) of several sets, each ``(job id, or None for the bare base,
        eval batches)``, fused: the i-th batch of every set is stacked into one forward of at most
        ``max_rows`` rows (one batch alone may be more), each set's rows through its own adapter, logits
        only where a label is, and one host sync at the end."""
        device = self.device
        work = [(k, bs[i]) for i in range(max(len(bs) for _, bs in sets)) for k, (_, bs) in enumerate(sets)
                if i < len(bs)]
        chunks: list[list[tuple[int, Batch]]] = [[]]
        rows = 0
        for k, b in work:
            n = int(b["input_ids"].shape[0])
            if chunks[-1] and rows + n > max_rows:
                chunks.append([])
                rows = 0
            chunks[-1].append((k, b))
            rows += n
        loss_sum, right, count = (torch.zeros(len(sets), dtype=torch.float64, device=device) for _ in range(3))
        self.base.eval()
        try:
            with torch.no_grad():
                for chunk in chunks:
                    names = [self._slot_of[sets[k][0]] if sets[k][0] else None for k, _ in chunk]  # type: ignore[index]
                    batch, segs = stack([(name, b) for name, (_, b) in zip(names, chunk)])
                    hidden, labels, seg_of_row = self._forward(batch, segs)
                    mask = labels != -100
                    logits = self.lm_head(hidden[mask]).float()
                    target = labels[mask]
                    tok_loss = nn.functional.cross_entropy(logits, target, reduction="none")
                    set_of_seg = torch.tensor([k for k, _ in chunk]).to(device, non_blocking=True)
                    idx = set_of_seg[seg_of_row][:, None].expand_as(labels)[mask]
                    loss_sum.index_add_(0, idx, tok_loss.double())
                    right.index_add_(0, idx, (logits.argmax(-1) == target).double())
                    count.index_add_(0, idx, torch.ones_like(tok_loss, dtype=torch.float64))
        finally:
            self.base.train()
        return [{"eval_loss": ls / max(1.0, n), "eval_token_accuracy": c / max(1.0, n)}
                for ls, c, n in zip(loss_sum.tolist(), right.tolist(), count.tolist())]

    def forced_many(self, sets: list[tuple[str | None, list[dict[str, Any]]]], rows_per_pass: int | None = None
                    ) -> list[list[bool]]:
        """The retention test (adapterfab/retention.py) of several sets, each ``(job id, or None for the
        bare base, rows)``: for every row, whether the greedy choice is the row's token at each of its
        labels (``ids[labels_from:]``). Fused like ``evaluate_many``, and the rows' common prefix (the
        chat template's system turn) runs once per set: its keys and values are given to each row of
        the set, whose own tokens then run in passes, shortest first: of ``rows_per_pass`` rows when
        given, else of as many rows as ``FORCED_PASS_TOKENS`` of the device allows (``pass_sizes``)."""
        from transformers import DynamicCache

        device = self.device
        flat = [(k, i, r) for k, (_, rows) in enumerate(sets) for i, r in enumerate(rows)]
        out: list[list[bool]] = [[False] * len(rows) for _, rows in sets]
        if not flat:
            return out
        first = flat[0][2]["ids"]
        p = min(min(r["labels_from"] for _, _, r in flat) - 1, min(len(r["ids"]) for _, _, r in flat))
        for _, _, r in flat:
            while p and r["ids"][:p] != first[:p]:
                p -= 1
        slots = [self._slot_of[j] if j else None for j, _ in sets]
        flat.sort(key=lambda x: len(x[2]["ids"]))
        verdicts: list[tuple[list[tuple[int, int]], Tensor]] = []
        self.base.eval()
        try:
            with torch.no_grad():
                prefix = None
                if p:  # one row per set through its adapter
                    self.route.segments = [(s, k, k + 1) for k, s in enumerate(slots)]
                    ids = torch.tensor([first[:p]] * len(sets)).to(device, non_blocking=True)
                    prefix = self.decoder(input_ids=ids, use_cache=True).past_key_values
                budget = FORCED_PASS_TOKENS.get(device.type, FORCED_PASS_TOKENS["cuda"])
                start = 0
                for size in pass_sizes([len(r["ids"]) - p for _, _, r in flat], budget, rows_per_pass):
                    part = flat[start:start + size]
                    start += size
                    n = max(len(r["ids"]) for _, _, r in part) - p
                    ids = torch.zeros((len(part), n), dtype=torch.long)
                    labels = torch.full((len(part), n), -100, dtype=torch.long)
                    for i, (_, _, r) in enumerate(part):
                        tail = torch.tensor(r["ids"][p:])
                        ids[i, :len(tail)] = tail
                        labels[i, r["labels_from"] - p - 1:len(tail) - 1] = tail[r["labels_from"] - p:]
                    segs, at = [], 0
                    for i in range(1, len(part) + 1):  # runs of rows of one set
                        if i == len(part) or part[i][0] != part[at][0]:
                            segs.append((slots[part[at][0]], at, i))
                            at = i
                    self.route.segments = segs
                    cache = None
                    if prefix is not None:
                        which = torch.tensor([k for k, _, _ in part]).to(device, non_blocking=True)
                        cache = DynamicCache()
                        for layer, kv in enumerate(prefix.layers):
                            cache.update(kv.keys.index_select(0, which), kv.values.index_select(0, which), layer)
                    hidden = self.decoder(input_ids=ids.to(device, non_blocking=True), past_key_values=cache,
                                          use_cache=cache is not None).last_hidden_state
                    mask = labels != -100
                    picks = self.lm_head(hidden[mask.to(device)]).argmax(-1)
                    row = torch.arange(len(part))[:, None].expand_as(labels)[mask].to(device, non_blocking=True)
                    wrong = torch.zeros(len(part), device=device).index_add_(
                        0, row, (picks != labels[mask].to(device, non_blocking=True)).float())
                    verdicts.append(([(k, i) for k, i, _ in part], wrong))
        finally:
            self.route.segments = []
            self.base.train()
        for where, wrong in verdicts:
            for (k, i), w in zip(where, wrong.tolist()):
                out[k][i] = w == 0
        return out

    def evaluate(self, job_id: str | None, batches: list[Batch]) -> dict[str, float]:
        """Eval metrics with ``job_id``'s adapter on every row (None: the bare base)."""
        max_rows = max(b["input_ids"].shape[0] for b in batches)
        self.route.segments = [(self._slot_of[job_id], 0, max_rows)] if job_id else []
        try:
            return evaluate(self.base, batches)
        finally:
            self.route.segments = []

    # -- saving: the method's own format, loadable exactly like an adapter trained alone ------------
    def save(self, job: FusedJob, out_dir: str | Path) -> Path:
        """The job's adapter in its method's own format (a PEFT LoRA folder, or LoRA-XS's)."""
        return write_exported(self.export(job), out_dir)

    def export(self, job: FusedJob) -> ExportedAdapter:
        """What ``save`` writes, as plain data (CPU tensors), so that writing the files can happen
        elsewhere: a resident trainer hands this over and goes on with the next group."""
        basis = None
        if self.family == SHARED_BASIS:
            b = self.basis
            basis = (b.id, b.digest, b.base_fingerprint, list(b.targets))
        return ExportedAdapter(self.family, job.method.model_dump(), list(self.targets),
                               getattr(self.base.config, "_name_or_path", None), basis,
                               self.adapter_tensors(job.job_id))


@dataclass
class ExportedAdapter:
    """A trained adapter as data: its family, method settings, target modules, base name, LoRA-XS basis
    (id, digest, base fingerprint, targets) and tensors (module name -> (A, B) or (R,), fp32, CPU)."""

    family: str
    method: dict[str, Any]
    targets: list[str]
    base_name: str | None
    basis: tuple[str, str, str, list[str]] | None
    tensors: dict[str, tuple[Tensor, ...]]


def write_exported(a: ExportedAdapter, out_dir: str | Path) -> Path:
    """An exported adapter's folder, exactly as the method itself saves one."""
    from adapterfab.methods import get_method

    out = Path(out_dir)
    method = get_method(a.method["name"]).config_cls(**a.method)
    if a.family == SHARED_BASIS:
        from adapterfab.methods.lora_xs import write_adapter

        basis_id, digest, fingerprint, targets = a.basis  # type: ignore[misc]
        return write_adapter(out, method, basis_id, digest, fingerprint, targets,  # type: ignore[arg-type]
                             {n: t[0].float().contiguous() for n, t in a.tensors.items()})
    from peft import LoraConfig
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout,  # type: ignore[attr-defined]
               target_modules=list(a.targets), task_type="CAUSAL_LM", bias="none",
               base_model_name_or_path=a.base_name).save_pretrained(str(out))
    state = {}
    for name, (lora_a, lora_b) in a.tensors.items():
        state[f"base_model.model.{name}.lora_A.weight"] = lora_a.contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = lora_b.contiguous()
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def pass_sizes(lengths: list[int], tokens: int, rows: int | None = None) -> list[int]:
    """Rows per pass over rows of ``lengths`` sorted shortest first: ``rows`` each when given, else as
    many as keep a pass (its rows padded to its longest) within ``tokens``, at least one."""
    sizes: list[int] = []
    at = 0
    while at < len(lengths):
        if rows:
            n = min(rows, len(lengths) - at)
        else:
            n = 1
            while at + n < len(lengths) and (n + 1) * max(1, lengths[at + n]) <= tokens:
                n += 1
        sizes.append(n)
        at += n
    return sizes


def _row_key(row: dict[str, Any]) -> tuple[int, ...]:
    """What identifies a retention row (its tokens and where its fact starts)."""
    return (row["labels_from"], *row["ids"])


def _digest(batches: list[Batch]) -> str:
    """What identifies a set of eval rows (the base's figure on it never changes)."""
    import hashlib

    h = hashlib.sha256()
    for b in batches:
        for key in ("input_ids", "attention_mask", "labels"):
            h.update(key.encode() + str(tuple(b[key].shape)).encode() + b[key].cpu().numpy().tobytes())
    return h.hexdigest()


def _label_rows(rows: list[tuple[list[int], int]]) -> Batch:
    """Token id rows, each labelled from a position to its end (``(ids, from)``), right-padded into one batch."""
    ids_t, mask = pad_rows([ids for ids, _ in rows], 0)
    labels = torch.full_like(ids_t, -100)
    for i, (ids, start) in enumerate(rows):
        labels[i, start:len(ids)] = ids_t[i, start:len(ids)]
    return {"input_ids": ids_t, "attention_mask": mask, "labels": labels}


def stack(items: list[tuple[Any, Batch]]) -> tuple[Batch, list[tuple[Any, int, int]]]:
    """Concatenate several jobs' micro-batches (right-padded to the longest) into one batch."""
    t = max(b["input_ids"].shape[1] for _, b in items)
    parts: dict[str, list[Tensor]] = {"input_ids": [], "attention_mask": [], "labels": []}
    segs, at = [], 0
    for jid, b in items:
        n, pad = b["input_ids"].shape[0], t - b["input_ids"].shape[1]
        for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
            parts[key].append(nn.functional.pad(b[key], (0, pad), value=fill))
        segs.append((jid, at, at + n))
        at += n
    return {k: torch.cat(v) for k, v in parts.items()}, segs


@dataclass(frozen=True)
class ModelFlops:
    """The FLOPs a training step spends on a frozen base, counted as spent: ~4 per weight and token in
    the decoder's matrices (the forward and the input gradients; frozen weights get no gradient),
    the output head only at labelled positions (logits are computed nowhere else), causal attention
    ~6 x length x width per token and layer, and no embedding lookups. Padding is not counted."""

    body: int  # weights of the decoder layers' matrices
    head: int  # weights of the output head
    attn_width: int  # query heads x head size
    layers: int

    @classmethod
    def of(cls, base: nn.Module) -> ModelFlops:
        decoder = base.get_decoder()
        head = base.get_output_embeddings()
        body = sum(m.in_features * m.out_features for m in decoder.modules()
                   if hasattr(m, "in_features") and hasattr(m, "out_features") and not isinstance(m, MultiLinear))
        cfg = base.config
        heads = getattr(cfg, "num_attention_heads", 0) or 0
        head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else 0)
        return cls(body, head.in_features * head.out_features, heads * head_dim,
                   int(getattr(cfg, "num_hidden_layers", 0) or 0))

    def step(self, batch: Batch) -> float:
        """FLOPs of one training step over ``batch`` (its real tokens and labelled positions)."""
        lengths, labelled = row_stats(batch)
        attention = 6.0 * self.attn_width * self.layers * sum(n * n for n in lengths)
        return 4.0 * self.body * sum(lengths) + 4.0 * self.head * sum(labelled) + attention


def row_stats(batch: Batch) -> tuple[list[int], list[int]]:
    """Each row's length and labelled next-token positions: what ``padded_batch`` recorded, else
    counted here (a batch made some other way)."""
    lengths = getattr(batch, "lengths", None)
    labelled = getattr(batch, "labelled", None)
    if lengths is None or labelled is None:
        lengths = batch["attention_mask"].sum(1).tolist()
        labelled = (batch["labels"][:, 1:] != -100).sum(1).tolist()
    return lengths, labelled


def length_chunks(lengths: list[int], overhead_tokens: int, quantum: int = LENGTH_QUANTUM) -> list[list[int]]:
    """Rows (their indexes into ``lengths``) split into chunks of similar length, each padded only to
    its own longest row: the split (cut in length order) that minimises padded tokens plus
    ``overhead_tokens`` per chunk. One chunk of every row when splitting saves nothing."""
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sizes = [lengths[i] for i in order]
    cuts = [k for k in range(1, len(sizes)) if -(-sizes[k] // quantum) != -(-sizes[k - 1] // quantum)]
    ends = [0, *cuts, len(sizes)]
    best: list[tuple[float, int]] = [(0.0, -1)]  # (cost up to ends[j], index of the previous cut)
    for j in range(1, len(ends)):
        best.append(min((best[i][0] + sizes[ends[j] - 1] * (ends[j] - ends[i]) + overhead_tokens, i)
                        for i in range(j)))
    out, j = [], len(ends) - 1
    while j > 0:
        i = best[j][1]
        out.append(order[ends[i]:ends[j]])
        j = i
    return out[::-1]


def step_chunks(items: list[tuple[Any, Batch]], overhead_tokens: int
                ) -> list[tuple[Batch, list[tuple[Any, int, int]], list[int]]]:
    """A fused step's micro-batches (``(slot, batch)`` per job) as the forwards to run: (stacked batch,
    its segments, each segment's job index into ``items``). Rows of different lengths go into chunks
    (``length_chunks``) instead of all being padded to the longest; within a chunk each job's rows stay
    together. With one chunk it is ``stack`` of the whole step (each job's rows in one segment)."""
    rows = [(j, i, int(n)) for j, (_, b) in enumerate(items) for i, n in enumerate(row_stats(b)[0])]
    plan = length_chunks([n for _, _, n in rows], overhead_tokens)
    rows_of = [row_stats(b)[0] for _, b in items]
    if len(plan) <= 1:
        batch, segs = stack(items)
        return [(batch, segs, list(range(len(items))))]
    out = []
    for chunk in plan:
        picked: dict[int, list[int]] = {}
        for k in sorted(chunk, key=lambda k: rows[k][:2]):
            picked.setdefault(rows[k][0], []).append(rows[k][1])
        parts, job_of_seg = [], []
        for j, idx in picked.items():
            b = items[j][1]
            sel = torch.tensor(idx)
            width = max(rows_of[j][i] for i in idx)
            parts.append((items[j][0], {k: b[k][sel, :width] for k in ("input_ids", "attention_mask", "labels")}))
            job_of_seg.append(j)
        batch, segs = stack(parts)
        out.append((batch, segs, job_of_seg))
    return out
