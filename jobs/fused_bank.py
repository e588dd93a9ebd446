"""The per-row adapter bank of fused training: which rows of a stacked batch go through which adapter
slot (``Route``), the wrapped Linear that adds each row's low-rank update (``MultiLinear``), and every
adapter's trainable tensors, gradients and AdamW moments as rows of flat buffers (``Slots``), with one
clipped AdamW step for all of them. Used by ``jobs/fused.py``'s ``FusedTrainer``; plain torch."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from adapterfab.errors import AdapterfabError
from adapterfab.methods import LOW_RANK, SHARED_BASIS

# The optimizer every fused-capable method trains with alone (torch's AdamW defaults; QLoRA's paged
# AdamW is the same update, paging only moves large states to host memory). Slots.step repeats it.
BETAS, EPS, MAX_GRAD_NORM = (0.9, 0.999), 1e-8, 1.0
NULL_SLOT = 0  # a row of the slot buffers that stays zero: rows with no adapter gather it


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


class Slots:
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


def _targets(model: nn.Module, targets: Iterable[str]) -> dict[str, nn.Module]:
    wanted = set(targets)
    return {n: m for n, m in model.named_modules()
            if n.rsplit(".", 1)[-1] in wanted and hasattr(m, "in_features") and not isinstance(m, MultiLinear)}


def rng_state(device: torch.device) -> dict[str, Any]:
    """The generators LoRA dropout draws from, for a group's checkpoint."""
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def seed_dropout(device: torch.device, jobs: list[tuple[str, int]], saved: dict[str, Any] | None) -> None:
    """Set the generators LoRA dropout draws from at the start of a group's training: as they were at its
    checkpoint ``saved`` (a resumed group draws the masks it would have drawn), else from its jobs' ids and
    seeds ``jobs``, so the same group trains the same adapters whatever the trainer ran before."""
    if saved is not None:
        torch.set_rng_state(saved["cpu"])
        if "cuda" in saved and device.type == "cuda":
            torch.cuda.set_rng_state(saved["cuda"], device)
        return
    import hashlib

    torch.manual_seed(int(hashlib.sha256(repr(sorted(jobs)).encode()).hexdigest()[:15], 16))
