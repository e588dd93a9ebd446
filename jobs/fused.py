"""Fused multi-adapter training: K tenants' adapters trained in the same forward/backward pass over one
resident base model. Plain torch, no Ray (a Ray actor holds a ``FusedTrainer`` to keep the base
resident; benchmarks and tests call it directly).

How it works:
- ``FusedTrainer(base, family, targets, r)`` wraps every targeted Linear of the base once in a
  ``MultiLinear``. The base stays loaded (4-bit too) and trains group after group of jobs.
- **Slots.** Every job's trainable tensors live in one row of flat ``[slots, P]`` buffers (``Slots``):
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

import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adapterfab import retention
from adapterfab.errors import AdapterfabError
from adapterfab.jobs.fused_bank import MultiLinear, Route, Slots, _targets, rng_state, seed_dropout
from adapterfab.jobs.fused_batches import (
    CHUNK_OVERHEAD_FLOPS,
    Batch,
    ModelFlops,
    _digest,
    _label_rows,
    _row_key,
    row_stats,
    step_chunks,
)
from adapterfab.jobs.fused_eval import FusedEvaluation
from adapterfab.jobs.train_loop import forever, lr_lambda, peak_memory_mb
from adapterfab.methods import LOW_RANK, SHARED_BASIS, MethodConfig, get_method, peft_lora_config
from adapterfab.replay import ReplayRow, ReplaySet
from adapterfab.spec import TrainConfig

CHECKPOINT_FORMAT = "slots-1"


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


class FusedTrainer(FusedEvaluation):
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
            from adapterfab.methods.quant import keep_trainable_layout

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
        self.slots = Slots(self.layers, self.device)
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
                out[name] = (get_method(job.method.name).init_shared(job.method, self.r, gen),)
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
        return {"format": CHECKPOINT_FORMAT, "iteration": iteration, "jobs": jobs, "rng": rng_state(self.device)}

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
        seed_dropout(self.device, [(j.job_id, j.train.seed) for j in jobs], (resume or {}).get("rng"))
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
            micro = []
            for a in running:  # a job whose data fails ends alone, its slot given back
                try:
                    micro.append(next(a.batches))
                except Exception as e:  # noqa: BLE001
                    a.error = f"its training data: {e}"
                    self.remove(a.job.job_id)
                    a.slot = -1
            running = [a for a in running if a.error is None]
            if not running:
                continue
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
                    on_step(a.job.job_id, a.step, v, hyper[a.slot][0])  # the rate this step used
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
                except Exception as e:  # noqa: BLE001 - the job keeps its adapter; the gate refuses it (NaN)
                    warnings.warn(f"job {a.job.job_id}: retention not measured: {e}", stacklevel=2)
                    metrics[a.job.job_id]["retention"] = math.nan
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
            for jid in probes:
                metrics[jid]["retention"] = math.nan
            probes, base_rows = {}, {}
        forced_s = time.monotonic() - t_forced
        base_of = {key: got[base_sets[key]] if key in base_sets else self._base_evals[key] for _, key in want.values()}
        for key, i in base_sets.items():  # (this group's figures were read above: an eviction cannot lose them)
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
                m.update({f"base_{k}": v for k, v in base_of[key].items()})
            if a.job.job_id in probes:
                i, asked, keys = probes[a.job.job_id]
                known = [ok for k, ok in zip(keys, row_ok[i]) if self._base_forced.get(k)]
                m.update(retention.metrics(asked, len(known), sum(known), per_job_s))
            m.update(peak_memory_mb())
            out.append(FusedResult(a.job.job_id, m, a.losses, stopped_early=a.early))
        return out

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
    out = Path(out_dir)
    method = get_method(a.method["name"]).config_cls(**a.method)
    if a.family == SHARED_BASIS:
        return get_method(a.method["name"]).write_shared(out, method, a.basis,  # type: ignore[misc,arg-type]
                                                         {n: t[0].float().contiguous() for n, t in a.tensors.items()})
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = peft_lora_config(method, a.targets, a.base_name)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))  # as PEFT writes it
    state = {}
    for name, (lora_a, lora_b) in a.tensors.items():
        state[f"base_model.model.{name}.lora_A.weight"] = lora_a.contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = lora_b.contiguous()
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out
