"""Fused multi-adapter training: K tenants' adapters trained in the same forward/backward pass over one
resident base model. Plain torch, no Ray (a Ray actor holds a ``FusedTrainer`` to keep the base
resident; benchmarks and tests call it directly).

How it works:
- ``FusedTrainer(base, family, targets, r)`` wraps every targeted Linear of the base once in a
  ``MultiLinear``. The base stays loaded (4-bit too) and trains group after group of jobs.
- Each step takes one micro-batch from every active job and stacks them into one batch. Every row
  belongs to one job, and ``MultiLinear`` sends each job's rows only through that job's adapter
  (segment by segment, like S-LoRA/punica's SGMV):
  - LoRA (and QLoRA, the same on a 4-bit base): ``x·Aₖᵀ·Bₖᵀ`` per segment;
  - LoRA-XS: the shared factors make ``x·A`` one product for all rows and ``·B`` another; only the
    r×r ``Rₖ`` is applied per segment.
  When every job has the same number of rows in the step (the usual case: equal batch sizes), the K
  segments are one batched matmul (``bmm`` over the stacked ``Aₖ``, ``Bₖ`` or ``Rₖ``) instead of K small
  ones, so the launches per layer do not grow with K. On a bf16/fp16 base the adapter product runs in
  the base's dtype (as under autocast; the adapter weights and their optimizer state stay fp32), which
  keeps fp32 copies of every activation out of memory; an fp32 base computes it in fp32 as before.
- The loss is each job's own token mean, summed over jobs, so each adapter's gradient is exactly what
  training it alone would give. Logits are computed only at positions that carry a label, which keeps
  the (rows × tokens × vocabulary) logits tensor out of memory.
- Evaluation is fused the same way: after a group trains, the i-th eval batch of every adapter (and of
  the bare base, once per distinct set of eval rows) goes into one no-grad forward, so a group's eval
  takes about as many passes as one job's.
- Every job has its own optimizer state, learning-rate schedule, gradient clipping and step count.
  A job leaves the batch when it reaches its steps, reaches its ``early_stop_loss``, or fails
  (a non-finite loss fails that job only).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adapterfab.errors import AdapterfabError
from adapterfab.jobs.train_loop import evaluate, forever, lr_lambda, peak_memory_mb
from adapterfab.methods import MethodConfig, get_method
from adapterfab.spec import TrainConfig

Batch = dict[str, Tensor]
FAMILIES = {"lora": "lora", "qlora": "lora", "lora_xs": "lora_xs"}


@dataclass
class Route:
    """Which rows of the current batch go through which job's adapter (shared by every MultiLinear)."""

    segments: list[tuple[str, int, int]] = field(default_factory=list)  # (job id, first row, end row)


class MultiLinear(nn.Module):
    """``base_layer(x)`` plus, for each segment of rows, that job's low-rank update."""

    def __init__(self, base_layer: nn.Module, family: str, route: Route, shared: tuple[Tensor, Tensor] | None):
        super().__init__()
        self.base_layer, self.family, self.route = base_layer, family, route
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.a = nn.ParameterDict()  # lora: job -> A (r x in)
        self.b = nn.ParameterDict()  # lora: job -> B (out x r); lora_xs: job -> R (r x r)
        self.scale: dict[str, float] = {}
        self._scale_cache: dict[tuple, Tensor] = {}  # (jobs, dtype, device) -> their scales, when unequal
        if shared is not None:  # lora_xs: A (in x r), B (r x out), frozen and shared by every job
            dev = base_layer.weight.device
            self.register_buffer("xs_a", shared[0].to(dev, torch.float32), persistent=False)
            self.register_buffer("xs_b", shared[1].to(dev, torch.float32), persistent=False)

    @property
    def weight(self) -> Tensor:  # HF code reads q_proj.weight for dtype/device checks
        return self.base_layer.weight

    def add(self, job: str, params: tuple[Tensor, ...], scale: float) -> list[nn.Parameter]:
        dev = self.base_layer.weight.device
        made = [nn.Parameter(t.detach().to(dev, torch.float32).clone()) for t in params]
        if self.family == "lora":
            self.a[job], self.b[job] = made
        else:
            (self.b[job],) = made
        self.scale[job] = scale
        self._scale_cache.clear()
        return made

    def drop(self, job: str) -> None:
        for d in (self.a, self.b):
            if job in d:
                del d[job]
        self.scale.pop(job, None)
        self._scale_cache.clear()

    grouped = True  # one bmm for equal-size segments (tests switch it off to compare with the loop)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        segs = [s for s in self.route.segments if s[0] in self.b]
        if not segs:
            return out
        half = x.dtype in (torch.bfloat16, torch.float16)
        xf = x if half else x.float()
        n = segs[0][2] - segs[0][1]
        if self.grouped and len(segs) > 1 and segs[0][1] == 0 and segs[-1][2] == x.shape[0] \
                and all(e - s == n and s == i * n for i, (_, s, e) in enumerate(segs)):
            return self._grouped(out, xf, segs, n)
        return self._loop(out, xf, segs)

    def _grouped(self, out: Tensor, xf: Tensor, segs: list[tuple[str, int, int]], n: int) -> Tensor:
        """Every job has ``n`` rows, in order: one bmm over the K stacked adapters."""
        k, dt = len(segs), xf.dtype
        scale = self._scales(segs, xf)
        rows = xf.reshape(k, -1, xf.shape[-1])  # [K, n*T, in]
        if self.family == "lora_xs":
            h = rows @ self.xs_a.to(dt)  # the shared basis: one product for all rows
            r = torch.stack([self.b[j] for j, _, _ in segs]).to(dt)  # [K, r, r]
            delta = (torch.bmm(h, r) * scale) @ self.xs_b.to(dt)
        else:
            a = torch.stack([self.a[j] for j, _, _ in segs]).to(dt)  # [K, r, in]
            b = torch.stack([self.b[j] for j, _, _ in segs]).to(dt)  # [K, out, r]
            delta = torch.bmm(torch.bmm(rows, a.transpose(1, 2)), b.transpose(1, 2)) * scale
        return (out + delta.reshape(out.shape)).to(out.dtype)

    def _scales(self, segs: list[tuple[str, int, int]], like: Tensor) -> float | Tensor:
        """The K jobs' alpha/r: one float when they agree (the usual case), else a [K, 1, 1] tensor on the
        device, made once per set of jobs. Building it every step would copy host to device in every
        layer, and each such copy waits for the GPU: the CPU could no longer queue layers ahead."""
        values = [self.scale[j] for j, _, _ in segs]
        if all(v == values[0] for v in values):
            return values[0]
        key = (tuple(j for j, _, _ in segs), like.dtype, like.device)
        if key not in self._scale_cache:
            self._scale_cache[key] = like.new_tensor(values).view(len(values), 1, 1)
        return self._scale_cache[key]

    def _loop(self, out: Tensor, xf: Tensor, segs: list[tuple[str, int, int]]) -> Tensor:
        """Segment by segment (jobs with different row counts in this step), in ``xf``'s dtype (the fp32
        adapter weights are cast for a half base; ``to`` is a no-op otherwise)."""
        cast = lambda t: t.to(xf.dtype)  # noqa: E731
        if self.family == "lora_xs":
            h = xf @ cast(self.xs_a)  # one product for every row of every tenant
            parts = [h[s:e] @ cast(self.b[j]) * self.scale[j] for j, s, e in segs]
            delta = self._place(parts, segs, xf.shape[0]) @ cast(self.xs_b)
        else:
            parts = [(xf[s:e] @ cast(self.a[j]).t()) @ cast(self.b[j]).t() * self.scale[j] for j, s, e in segs]
            delta = self._place(parts, segs, xf.shape[0])
        return (out + delta).to(out.dtype)  # the result back in the base dtype

    @staticmethod
    def _place(parts: list[Tensor], segs: list[tuple[str, int, int]], rows: int) -> Tensor:
        """Concatenate per-segment results into ``rows`` rows (zeros where no adapter applies)."""
        pieces, at = [], 0
        for p, (_, s, e) in zip(parts, segs):
            if s > at:
                pieces.append(p.new_zeros((s - at, *p.shape[1:])))
            pieces.append(p)
            at = e
        if at < rows:
            pieces.append(parts[0].new_zeros((rows - at, *parts[0].shape[1:])))
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


@dataclass
class FusedJob:
    job_id: str
    method: MethodConfig
    train: TrainConfig
    epoch_batches: Callable[[int], Iterable[Batch]]
    eval_batches: Callable[[], Iterable[Batch]] | None = None
    init: dict[str, tuple[Tensor, ...]] | None = None  # module name -> (A, B) for lora, (R,) for lora_xs
    early_stop_loss: float | None = None  # leave the batch once the train loss is at or below this


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
    slot: str  # the key of this job's adapter inside the layers (job ids may contain '.')
    params: list[nn.Parameter]
    opt: Any
    sched: Any
    batches: Iterator[Batch]
    step: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    error: str | None = None
    early: bool = False


def _targets(model: nn.Module, targets: Iterable[str]) -> dict[str, nn.Module]:
    wanted = set(targets)
    return {n: m for n, m in model.named_modules()
            if n.rsplit(".", 1)[-1] in wanted and hasattr(m, "in_features") and not isinstance(m, MultiLinear)}


class FusedTrainer:
    """A resident base with K adapters trained together. ``family`` is ``lora`` (LoRA, QLoRA) or
    ``lora_xs`` (then ``basis`` gives the shared factors)."""

    def __init__(self, base: nn.Module, family: str, targets: list[str], r: int, basis: Any = None):
        if family not in ("lora", "lora_xs"):
            raise AdapterfabError(f"fused training supports lora, qlora and lora_xs, not {family!r}")
        if family == "lora_xs" and basis is None:
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
            layer = MultiLinear(m, family, self.route, shared)
            setattr(parent, child, layer)
            self.layers[name] = layer
        if not self.layers:
            raise AdapterfabError(f"no modules named {self.targets} in the base")
        self.decoder = base.get_decoder()
        self.lm_head = base.get_output_embeddings()
        self.jobs_trained = 0
        self._base_evals: dict[str, dict[str, float]] = {}  # eval rows' digest -> the frozen base's metrics
        self._slots: dict[str, str] = {}
        self._next_slot = 0

    # -- adapters -------------------------------------------------------------------------------
    def compatible(self, method: MethodConfig) -> str | None:
        """None if ``method`` can train in this group, else why not."""
        fam = FAMILIES.get(method.name)
        if fam != self.family:
            return f"method {method.name} is not in the {self.family} family"
        if getattr(method, "r", None) != self.r:
            return f"rank {getattr(method, 'r', None)} differs from the group's {self.r}"
        if sorted(method.resolved_targets()) != sorted(self.targets):  # type: ignore[attr-defined]
            return "target modules differ"
        if getattr(method, "dropout", 0.0):
            return "fused training does not apply dropout; set dropout: 0"
        return None

    def _init(self, job: FusedJob, gen: torch.Generator) -> dict[str, tuple[Tensor, ...]]:
        """LoRA: A ~ kaiming-uniform(a=√5) as PEFT does, B = 0; LoRA-XS: R = 0 (or N(0, 1e-5))."""
        out = {}
        for name, m in self.layers.items():
            if self.family == "lora":
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
        init = init or job.init or self._init(job, torch.Generator().manual_seed(job.train.seed))
        scale = job.method.alpha / job.method.r  # type: ignore[attr-defined]
        if job.job_id in self._slots:
            raise AdapterfabError(f"job {job.job_id} is already in this trainer; remove it first")
        slot = self._slots[job.job_id] = f"a{self._next_slot}"
        self._next_slot += 1
        params: list[nn.Parameter] = []
        for name, layer in self.layers.items():
            params += layer.add(slot, init[name], scale)
        impl = get_method(job.method.name)
        opt = impl.make_optimizer(params, job.train.learning_rate, job.train.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(job.train))
        return _Active(job, slot, params, opt, sched, forever(job.epoch_batches))

    def remove(self, job_id: str) -> None:
        slot = self._slots.pop(job_id, None)
        for layer in self.layers.values():
            if slot is not None:
                layer.drop(slot)

    def adapter_tensors(self, job_id: str) -> dict[str, tuple[Tensor, ...]]:
        slot = self._slots[job_id]
        out = {}
        for name, layer in self.layers.items():
            if self.family == "lora":
                out[name] = (layer.a[slot].detach().cpu(), layer.b[slot].detach().cpu())
            else:
                out[name] = (layer.b[slot].detach().cpu(),)
        return out

    def slot_keys(self) -> set[str]:
        """The job ids whose adapters the trainer holds."""
        return set(self._slots)

    # -- one fused step -------------------------------------------------------------------------
    def _forward(self, batch: Batch, segs: list[tuple[str, int, int]]) -> tuple[Tensor, Tensor, Tensor]:
        """Run a stacked batch (on the CPU) through the decoder on the base's device, each segment's rows
        through its own adapter: (hidden states, labels, each row's index in ``segs``), aligned so
        position t predicts label t. Nothing here waits for the GPU: the host-side tensors are made on
        the CPU and copied without blocking.

        Rows are right-padded (``stack``, the collators), so under causal attention no real token can
        see a pad, and the attention mask changes no output that carries a label. It is then not passed:
        SDPA takes its fused causal path (FlashAttention on a GPU) instead of a masked kernel. A batch
        that is not right-padded keeps its mask."""
        device = next(self.base.parameters()).device
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

    def _losses(self, batch: Batch, segs: list[tuple[str, int, int]]) -> dict[str, Tensor]:
        """Each job's mean token loss over its rows, computing logits only where a label is."""
        hidden, labels, seg_of_row = self._forward(batch, segs)
        mask = labels != -100
        logits = self.lm_head(hidden[mask]).float()  # the step's one wait for the GPU (a boolean index)
        tok_loss = nn.functional.cross_entropy(logits, labels[mask], reduction="none")
        seg_of_token = seg_of_row[:, None].expand_as(labels)[mask]
        # per-job sums without a boolean index per job (each would wait for the GPU)
        sums = tok_loss.new_zeros(len(segs)).index_add(0, seg_of_token, tok_loss)
        counts = torch.bincount(seg_of_token, minlength=len(segs)).clamp(min=1)
        return {jid: sums[k] / counts[k] for k, (jid, _, _) in enumerate(segs)}

    def _state(self, active: list[_Active], iteration: int) -> dict[str, Any]:
        jobs = {}
        for a in active:
            jobs[a.job.job_id] = {"step": a.step, "tokens": a.tokens, "losses": list(a.losses), "error": a.error,
                                  "early": a.early}
            if a.error is None:
                jobs[a.job.job_id].update({  # copies: training goes on after the callback returns
                    "adapter": {n: tuple(t.clone() for t in ts) for n, ts in self.adapter_tensors(a.job.job_id).items()},
                    "optimizer": copy.deepcopy(a.opt.state_dict()), "scheduler": copy.deepcopy(a.sched.state_dict())})
        return {"iteration": iteration, "jobs": jobs}

    def _resume(self, job: FusedJob, saved: dict[str, Any]) -> _Active:
        """The job as it was at a checkpoint: weights, optimizer and schedule state, its data stream
        advanced past the batches it consumed (one per step)."""
        if saved["error"] is not None:
            return _Active(job, "", [], None, None, iter(()), saved["step"], saved["tokens"], list(saved["losses"]),
                           saved["error"], saved["early"])
        a = self._add(job, init=saved["adapter"])
        a.opt.load_state_dict(saved["optimizer"])
        a.sched.load_state_dict(saved["scheduler"])
        a.step, a.tokens, a.losses, a.early = saved["step"], saved["tokens"], list(saved["losses"]), saved["early"]
        for _ in range(a.step):
            next(a.batches)
        return a

    def train(self, jobs: list[FusedJob], on_step: Callable[[str, int, float, float], None] | None = None,
              on_checkpoint: Callable[[dict[str, Any]], None] | None = None, checkpoint_every: int = 0,
              resume: dict[str, Any] | None = None) -> list[FusedResult]:
        """Train ``jobs`` together until each is done; then evaluate each (adapter and base) and keep
        its adapter in the trainer (``save``/``adapter_tensors``) until ``remove``.

        Fault tolerance: every ``checkpoint_every`` fused steps ``on_checkpoint(state)`` receives every
        job's weights, optimizer and schedule state, step, losses and stop reason; passing it back as
        ``resume`` (to a fresh trainer over the same base) continues as if never stopped."""
        saved = (resume or {}).get("jobs", {})
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
            batch, segs = stack([(a.slot, b) for a, b in zip(running, micro)])
            losses = self._losses(batch, segs)
            values = dict(zip(losses, torch.stack(list(losses.values())).detach().float().tolist()))  # one sync
            finite = {j: v for j, v in losses.items() if math.isfinite(values[j])}
            for a in running:
                if a.slot not in finite:
                    a.error = (f"loss became {values[a.slot]} at step {a.step + 1}; "
                               "lower train.learning_rate")
                    self.remove(a.job.job_id)
            if finite:
                sum(finite.values()).backward()
            for a, b in zip(running, micro):
                if a.error:
                    continue
                torch.nn.utils.clip_grad_norm_(a.params, 1.0)
                a.opt.step()
                a.sched.step()
                a.opt.zero_grad(set_to_none=True)
                a.step += 1
                a.losses.append(values[a.slot])
                a.tokens += int(b["attention_mask"].sum())
                t = a.job.train
                if on_step and (a.step % t.log_every_steps == 0 or a.step == t.steps):
                    on_step(a.job.job_id, a.step, a.losses[-1], a.sched.get_last_lr()[0])
                if a.job.early_stop_loss is not None and a.losses[-1] <= a.job.early_stop_loss:
                    a.early = True
        train_s = time.monotonic() - t0
        results = self._finish(active, train_s, max_rows=sum(a.job.train.batch_size for a in active))
        self.jobs_trained += sum(r.error is None for r in results)
        return results

    def _finish(self, active: list[_Active], train_s: float, max_rows: int) -> list[FusedResult]:
        """Every job's result; the adapters' and the bare base's evaluations run fused (``evaluate_many``),
        the base once per distinct set of eval rows (it is frozen: jobs on one dataset share the figure)."""
        metrics: dict[str, dict[str, float]] = {}
        sets: list[tuple[str | None, list[Batch]]] = []
        base_sets: dict[str, int] = {}  # eval rows' digest -> index in ``sets`` (uncached ones only)
        want: dict[str, tuple[int, str]] = {}  # job id -> (index of its adapter's set, eval rows' digest)
        for a in active:
            if a.error:
                continue
            metrics[a.job.job_id] = {
                "train_loss": a.losses[-1], "train_loss_first": a.losses[0], "train_s": train_s,
                "train_tokens_per_s": a.tokens / max(train_s, 1e-9), "steps": float(a.step),
                "trainable_params": float(sum(p.numel() for p in a.params)),
            }
            ev = list(a.job.eval_batches()) if a.job.eval_batches is not None else []
            if not ev:
                continue
            key = _digest(ev)
            if key not in self._base_evals and key not in base_sets:
                base_sets[key] = len(sets)
                sets.append((None, ev))
            want[a.job.job_id] = (len(sets), key)
            sets.append((a.job.job_id, ev))
        got = self.evaluate_many(sets, max_rows) if sets else []
        for key, i in base_sets.items():
            if len(self._base_evals) >= 1024:
                self._base_evals.pop(next(iter(self._base_evals)))
            self._base_evals[key] = got[i]
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
            m.update(peak_memory_mb())
            out.append(FusedResult(a.job.job_id, m, a.losses, stopped_early=a.early))
        return out

    def evaluate_many(self, sets: list[tuple[str | None, list[Batch]]], max_rows: int) -> list[dict[str, float]]:
        """Eval metrics (as ``evaluate``) of several sets, each ``(job id, or None for the bare base,
        eval batches)``, fused: the i-th batch of every set is stacked into one forward of at most
        ``max_rows`` rows (one batch alone may be more), each set's rows through its own adapter, logits
        only where a label is, and one host sync at the end."""
        device = next(self.base.parameters()).device
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
                    names = [self._slots[sets[k][0]] if sets[k][0] else f"base-{k}" for k, _ in chunk]  # type: ignore[index]
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

    def evaluate(self, job_id: str | None, batches: list[Batch]) -> dict[str, float]:
        """Eval metrics with ``job_id``'s adapter on every row (None: the bare base)."""
        max_rows = max(b["input_ids"].shape[0] for b in batches)
        self.route.segments = [(self._slots[job_id], 0, max_rows)] if job_id else []
        try:
            return evaluate(self.base, batches)
        finally:
            self.route.segments = []

    # -- saving: the method's own format, loadable exactly like an adapter trained alone ------------
    def save(self, job: FusedJob, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        tensors = self.adapter_tensors(job.job_id)
        if self.family == "lora_xs":
            from adapterfab.methods.lora_xs import write_adapter

            b = self.basis
            return write_adapter(out, job.method, b.id, b.digest, b.base_fingerprint, b.targets,  # type: ignore[arg-type]
                                 {n: t[0].float().contiguous() for n, t in tensors.items()})
        from peft import LoraConfig
        from safetensors.torch import save_file

        m = job.method
        out.mkdir(parents=True, exist_ok=True)
        LoraConfig(r=m.r, lora_alpha=m.alpha, lora_dropout=m.dropout,  # type: ignore[attr-defined]
                   target_modules=list(self.targets), task_type="CAUSAL_LM", bias="none",
                   base_model_name_or_path=getattr(self.base.config, "_name_or_path", None)).save_pretrained(str(out))
        state = {}
        for name, (a, b) in tensors.items():
            state[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
            state[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
        save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        return out


def _digest(batches: list[Batch]) -> str:
    """What identifies a set of eval rows (the base's figure on it never changes)."""
    import hashlib

    h = hashlib.sha256()
    for b in batches:
        for key in ("input_ids", "attention_mask", "labels"):
            h.update(key.encode() + str(tuple(b[key].shape)).encode() + b[key].cpu().numpy().tobytes())
    return h.hexdigest()


def stack(items: list[tuple[str, Batch]]) -> tuple[Batch, list[tuple[str, int, int]]]:
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
