"""The batched engine's forward pass: a Llama decoder run by hand so that every row adds its own
adapter's update (LOW_RANK slots gathered per row, SHARED_BASIS rows through their basis), prefill of
new prompts into the KV cache, and decode steps with static shapes, captured once per shape bucket as
CUDA graphs on a GPU. A mixin of ``serve/batched.py``'s ``BatchedEngine``; plain torch."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adapterfab.methods import LOW_RANK

FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}  # one matmul each
IN_FUSED = frozenset(n for names in FUSED.values() for n in names)  # modules computed in a fused group

if TYPE_CHECKING:
    from adapterfab.serve.batched import _Request

log = logging.getLogger("adapterfab.serve.batched")


@dataclass
class _Graph:
    """One captured decode step: its static input ([rows, nb] long: ids, positions, LoRA slots, one row
    per LoRA-XS basis) and output (logits [nb, vocab]) tensors."""

    graph: Any
    inp: Any
    out: Any


@dataclass
class _Factors:
    """A decode step's LoRA updates computed per distinct adapter instead of per row: for each base matmul
    (a fused group such as q/k/v, or one module), ``ab[key]`` holds the step's U distinct adapters' A
    stacked [n·U·r, in] and B [n·U·r, out] (each banked module's block in its own output columns), and
    ``weight`` [rows, U·r] holds each row's scale on its own adapter's r columns and zeros elsewhere. A
    matmul's update for every row is then ``((x·Aᵀ) ⊙ weight)·B``: two plain matmuls over all rows and
    all modules of the group, where the per-row gather copies every row's A and B and runs two batched
    matmuls of one row per module. Each row computes all U adapters' ``x·Aᵀ`` (U·r columns: a few hundred
    at most in a decode step, while the base's weights dominate what the step reads)."""

    ab: dict[Any, tuple[Any, Any, int]]
    weight: Any
    packed: bool  # A and Bᵀ in oneDNN's layout (``BatchedForward._prepack``)
    _tiled: dict[int, Any] = field(default_factory=dict)

    def add(self, key: Any, y: Any, x: Any) -> Any:
        f = self.ab.get(key)
        if f is None:
            return y
        a, b, n = f
        w = self._tiled.get(n)
        if w is None:
            w = self._tiled[n] = (self.weight.repeat(1, n) if n > 1 else self.weight)[:, None, :]
        if self.packed:
            import torch

            mm = torch.ops.mkldnn._linear_pointwise
            return y + mm(mm(x, a, None, "none", [], "") * w, b, None, "none", [], "")
        return y + ((x @ a.T) * w) @ b


@dataclass
class _Segments:
    """A decode step's LoRA rows sorted by bank slot, for the grouped path (``lora_kernel="grouped"``):
    ``perm`` [nb] the rows in slot order, ``back`` [nb] where each row sits in that order, ``offs`` [slots]
    int32 where each slot's run of sorted rows ends, ``scale`` [nb] each sorted row's adapter scale and ``r``
    the rank bucket. Every banked module's update is then two grouped matmuls over the whole bank
    (``torch._grouped_mm``: a slot with no rows is an empty group), so each adapter's A and B are read once
    per step and nothing is gathered per row; all of it is computed on the device from the step's slot row,
    once per step, so a CUDA graph captures it with the step's shape."""

    perm: Any
    back: Any
    offs: Any
    scale: Any
    r: int

    @classmethod
    def of(cls, slot_row: Any, groups: int, scale: Any, r: int, dtype: Any) -> _Segments:
        """The segments of a step whose rows hold LoRA slots ``slot_row`` [nb] (on the device), over a bank
        of ``groups`` slots; ``scale`` holds each slot's adapter scale."""
        import torch

        slots, perm = torch.sort(slot_row, stable=True)
        ends = torch.arange(1, groups + 1, device=slot_row.device)
        return cls(perm, torch.argsort(perm), torch.searchsorted(slots, ends).to(torch.int32),
                   scale[slots].to(dtype)[:, None], r)

    def sort(self, x: Any) -> Any:
        """The rows ``x`` [nb, T, in] (T = 1 in a decode step) as [nb, in] in slot order."""
        nb, t, d_in = x.shape
        assert t == 1, "the grouped path runs decode steps (one token a row)"
        return x.reshape(nb, d_in).index_select(0, self.perm)

    def sorted_delta(self, a_bank: Any, b_bank: Any, xs: Any) -> Any:
        """The update [nb, out] of the sorted rows ``xs`` (``sort``), still in slot order."""
        import torch

        xa = torch._grouped_mm(xs, a_bank[:, : self.r].transpose(1, 2), offs=self.offs)  # [nb, r]
        return torch._grouped_mm(xa * self.scale, b_bank[:, :, : self.r].transpose(1, 2), offs=self.offs)

    def unsort(self, d: Any) -> Any:
        """Sorted updates [nb, out] back in row order, as [nb, 1, out]."""
        return d.index_select(0, self.back).unsqueeze(1)

    def delta(self, a_bank: Any, b_bank: Any, x: Any) -> Any:
        """The update [nb, T, out] of the rows ``x`` [nb, T, in] (T = 1 in a decode step)."""
        return self.unsort(self.sorted_delta(a_bank, b_bank, self.sort(x)))


GROUPED_MAX_GROUPS = 1024  # torch's CUTLASS grouped GEMM sets its groups up in one block of threads


def grouped_lora_supported(device: Any, dtype: Any, slots: int | None = None,
                           max_rank: int | None = None) -> tuple[bool, str]:
    """Whether ``torch._grouped_mm`` runs the grouped LoRA path here without a host sync (which a CUDA graph
    cannot capture): on a GPU only its CUTLASS kernel does (bf16, compute capability 9.x or 10.x, fewer
    than 1,024 groups: ``slots``, the bank's adapter slots); its fallback, which CPUs run, loops over the
    groups on the host. On every device the bank's B [rank, out] is read with a row stride of ``max_rank``,
    which must be 16-byte aligned."""
    import torch

    if not hasattr(torch, "_grouped_mm"):
        return False, f"torch {torch.__version__} has no _grouped_mm"
    if max_rank is not None and max_rank % 8:
        return False, f"max_rank must be a multiple of 8 (16-byte rows of bf16), not {max_rank}"
    if device.type == "cpu":
        return True, ""
    if device.type != "cuda":
        return False, f"not on {device.type}"
    major = torch.cuda.get_device_capability(device)[0]
    if dtype != torch.bfloat16 or major not in (9, 10):
        return False, f"the grouped GEMM kernel needs bf16 on compute capability 9.x or 10.x (here {dtype}, {major}.x)"
    if slots is not None and slots >= GROUPED_MAX_GROUPS:
        return False, (f"the grouped GEMM kernel takes fewer than {GROUPED_MAX_GROUPS} groups, one per adapter slot "
                       f"(max_adapters + 1 = {slots})")
    return True, ""


def _bucket(n: int, cap: int, smallest: int) -> int:
    """The smallest power-of-two multiple of ``smallest`` that holds ``n``, at most ``cap``."""
    b = smallest
    while b < n:
        b *= 2
    return min(b, cap)


class BatchedForward:
    """``BatchedEngine``'s decoder forward, prefill and (graph-captured) decode step."""

    def _prepack(self) -> bool:
        """Reorder every base matmul's weight once into oneDNN's blocked layout (bf16/fp16 on a CPU whose
        oneDNN runs that dtype natively). ``F.linear`` reorders the weight on every call, which at decode
        batch sizes costs as much as the product itself: bf16, 16 rows, SmolLM2's shapes, 2 threads, the
        matmuls of one decode step took 20.3 ms plain and 13.7 ms packed, the lm_head alone 5.8 vs 2.7 ms,
        with identical outputs. The modules keep their own weights (the HF model stays usable); the packed
        copies are extra memory of one base's linear weights. Returns whether it packed."""
        import torch

        mkldnn = getattr(torch.ops, "mkldnn", None)
        if (self.device.type != "cpu" or self.dtype not in (torch.bfloat16, torch.float16)
                or not torch.backends.mkldnn.is_available() or not hasattr(mkldnn, "_linear_pointwise")):
            return False
        supported = (mkldnn._is_mkldnn_bf16_supported if self.dtype == torch.bfloat16
                     else mkldnn._is_mkldnn_fp16_supported)
        if not supported():
            return False
        weights = {key: (w, b) for key, (w, b, _) in self.fused.items()}
        weights.update({key: (lin.weight, lin.bias) for key, lin in self.linear.items() if key[1] not in IN_FUSED})
        weights["lm_head"] = (self.model.lm_head.weight, self.model.lm_head.bias)
        self.packed = {key: (mkldnn._reorder_linear_weight(w.detach(), self.max_batch), b)
                       for key, (w, b) in weights.items()}
        return True

    def _matmul(self, key: Any, x: Any, weight: Any, bias: Any) -> Any:
        """``x Wᵀ (+ b)`` of the base's matmul ``key``, from its packed weight where there is one."""
        import torch

        packed = self.packed.get(key)
        if packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, packed[0], packed[1], "none", [], "")
        return torch.nn.functional.linear(x, weight, bias)

    def _lm_head(self, h: Any) -> Any:
        head = self.model.lm_head
        return self._matmul("lm_head", self.model.model.norm(h), head.weight, head.bias).float()

    def _linear(self, key: tuple[int, str], x: Any, lora: Any, xs_slots: dict[str, Any]) -> Any:
        """``x Wᵀ`` plus each row's adapter delta; ``lora`` is (slot per row, rank to gather up to) or the
        step's ``_Factors``."""
        lin = self.linear[key]
        y = self._matmul(key, x, lin.weight, lin.bias)
        if isinstance(lora, _Factors):
            return self._plus_delta(lora.add(key, y, x), key, x, None, xs_slots)
        return self._plus_delta(y, key, x, lora, xs_slots)

    def _fused(self, i: int, group: str, names: tuple[str, ...], x: Any, lora: Any, xs_slots: dict[str, Any]) -> list:
        """The modules ``names`` of layer ``i`` from one matmul of their stacked weights, each plus its rows'
        adapter deltas (with ``_Factors``: the whole group's LoRA deltas in two more matmuls)."""
        weight, bias, sizes = self.fused[(i, group)]
        y = self._matmul((i, group), x, weight, bias)
        if isinstance(lora, _Factors):
            y, lora = lora.add((i, group), y, x), None
        elif isinstance(lora, _Segments):  # x sorted once for the group, the deltas put back in one gather
            y, lora = self._grouped_group(i, names, sizes, y, x, lora), None
        return [self._plus_delta(y, (i, n), x, lora, xs_slots) for y, n in zip(y.split(sizes, dim=-1), names)]

    def _grouped_group(self, i: int, names: tuple[str, ...], sizes: list[int], y: Any, x: Any,
                       seg: _Segments) -> Any:
        """The fused output ``y`` [nb, 1, sum(sizes)] of layer ``i``'s modules ``names`` plus their banked
        modules' grouped updates: the group's rows sorted once, each module's update in slot order (zeros
        for a module with no bank), and all of them returned to row order by one gather."""
        import torch

        if not any((i, n) in self.lora_a for n in names):
            return y
        xs = seg.sort(x)
        parts = [seg.sorted_delta(self.lora_a[(i, n)], self.lora_b[(i, n)], xs) if (i, n) in self.lora_a
                 else xs.new_zeros(xs.shape[0], size) for n, size in zip(names, sizes)]
        return y + seg.unsort(torch.cat(parts, dim=-1))

    def _plus_delta(self, y: Any, key: tuple[int, str], x: Any, lora: tuple[Any, int] | None,
                    xs_slots: dict[str, Any]) -> Any:
        import torch

        if isinstance(lora, _Segments):
            if key in self.lora_a:
                y = y + lora.delta(self.lora_a[key], self.lora_b[key], x)
        elif lora is not None and key in self.lora_a:  # per row: each row's factors gathered
            slots, r = lora
            a, b = self.lora_a[key][slots, :r], self.lora_b[key][slots, :, :r]  # [B, r, in], [B, out, r]
            xa = torch.bmm(x, a.transpose(1, 2))  # [B, T, r]
            y = y + torch.bmm(xa, b.transpose(1, 2)) * self.lora_scale[slots].to(y.dtype)[:, None, None]
        for bid, slots in xs_slots.items():
            bank = self.xs[bid]
            if key in bank.a:
                xa = x @ bank.a[key]  # shared basis: one product for every row
                xr = torch.bmm(xa, bank.rr[key][slots])  # only the r x r R per row
                y = y + (xr @ bank.b[key]) * self.xs_scale[slots].to(y.dtype)[:, None, None]
        return y

    def _block(self, i: int, layer: Any, h: Any, cos: Any, sin: Any, lora: Any, xs: dict[str, Any],
               attend: Any) -> Any:
        """One decoder layer; ``attend(i, q, k, v)`` stores K/V in the cache and returns attention."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        bsz, t = h.shape[:2]
        x = layer.input_layernorm(h)
        q, k, v = self._fused(i, "qkv", ("q_proj", "k_proj", "v_proj"), x, lora, xs)
        q = q.view(bsz, t, self.n_heads, self.head_dim)
        k = k.view(bsz, t, self.n_kv, self.head_dim)
        v = v.view(bsz, t, self.n_kv, self.head_dim)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        attn = attend(i, q, k, v.transpose(1, 2))
        attn = attn.transpose(1, 2).reshape(bsz, t, self.n_heads * self.head_dim)
        h = h + self._linear((i, "o_proj"), attn, lora, xs)
        x = layer.post_attention_layernorm(h)
        gate, up = self._fused(i, "gate_up", ("gate_proj", "up_proj"), x, lora, xs)
        return h + self._linear((i, "down_proj"), layer.mlp.act_fn(gate) * up, lora, xs)

    def _prefill_forward(self, ids: Any, rows: Any, lora: Any, xs: dict[str, Any], last: Any, start: int = 0) -> Any:
        """Prompts ``ids`` [B, T] (right-padded) from position ``start`` into cache ``rows`` [B]; returns the
        logits [B, vocab] at each row's token ``last`` [B] of ``ids`` (None: no logits, a piece of a prompt
        that goes on). From position 0 a prompt attends only to its own keys, so attention runs on them
        directly with the fused causal kernel (no mask, no cache read); right padding is harmless: no real
        token sees a pad, and the pads' cache slots are overwritten as the request decodes. From a later
        position (the next piece of a prompt) the piece attends to the cache up to itself."""
        import torch

        bsz, t = ids.shape
        h = self.model.model.embed_tokens(ids)
        positions = torch.arange(start, start + t, device=self.device)
        cos, sin = self.model.model.rotary_emb(h, positions[None, :].expand(bsz, t))
        gqa = self.n_kv != self.n_heads

        def attend(i: int, q: Any, k: Any, v: Any) -> Any:
            self.k_cache[i, rows, :, start:start + t] = k
            self.v_cache[i, rows, :, start:start + t] = v
            if not start:
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            return torch.nn.functional.scaled_dot_product_attention(
                q, self.k_cache[i, rows, :, :start + t], self.v_cache[i, rows, :, :start + t], attn_mask=mask,
                enable_gqa=gqa)

        if start:  # query j (position start + j) sees the cache up to its own position
            mask = torch.arange(start + t, device=self.device)[None, :] <= positions[:, None]
        for i, layer in enumerate(self.layers):
            h = self._block(i, layer, h, cos, sin, lora, xs, attend)
        if last is None:
            return None
        h = h[torch.arange(bsz, device=self.device), last]
        return self._lm_head(h)

    def _factors(self, slots: list[int], r: int) -> _Factors:
        """The LoRA argument of a decode step that computes each distinct adapter's update once (see
        ``_Factors``): the stacked factors of the step's distinct adapters, kept while that set (and the
        banks) stay the same, which is from one admission to the next; and each row's weight."""
        import torch

        uniq = tuple(sorted({s for s in slots if s}))
        key = (uniq, r, self._lora_version)
        if self._factor_cache is None or self._factor_cache[0] != key:
            self._factor_cache = (key, self._stack_factors(uniq, r))
        col = {s: j for j, s in enumerate(uniq)}
        weight = torch.zeros(len(slots), len(uniq) * r, dtype=torch.float32)
        for i, s in enumerate(slots):
            if s:
                weight[i, col[s] * r:(col[s] + 1) * r] = self.lora_scale_host[s]
        return _Factors(self._factor_cache[1], weight.to(self.device, self.dtype), bool(self.packed))

    def _stack_factors(self, uniq: tuple[int, ...], r: int) -> dict[Any, tuple[Any, Any, int]]:
        """Per base matmul (a fused group or a module) with LoRA banks: A of adapters ``uniq`` stacked
        [n·U·r, in] (n banked modules in the matmul) and B [n·U·r, out] with each module's block in its own
        output columns (zeros elsewhere)."""
        import torch

        idx = torch.tensor(uniq, device=self.device)
        matmuls = [((i, group), FUSED[group], sizes) for (i, group), (_, _, sizes) in self.fused.items()]
        matmuls += [(key, (key[1],), [self.linear[key].out_features]) for key in self.linear
                    if key[1] not in IN_FUSED]
        out = {}
        for key, names, sizes in matmuls:
            layer = key[0]
            parts = [(j, n) for j, n in enumerate(names) if (layer, n) in self.lora_a]
            if not parts:
                continue
            ur = len(uniq) * r
            a = torch.cat([self.lora_a[(layer, n)].index_select(0, idx)[:, :r].reshape(ur, -1) for _, n in parts])
            b = torch.zeros(len(parts) * ur, sum(sizes), dtype=self.dtype, device=self.device)
            for k, (j, n) in enumerate(parts):
                at = sum(sizes[:j])
                b[k * ur:(k + 1) * ur, at:at + sizes[j]] = (
                    self.lora_b[(layer, n)].index_select(0, idx)[:, :, :r].transpose(1, 2).reshape(ur, sizes[j]))
            if self.packed:  # bf16 on CPU: both products from oneDNN's layout, like the base's matmuls
                mkldnn = torch.ops.mkldnn
                a = mkldnn._reorder_linear_weight(a, self.max_batch)
                b = mkldnn._reorder_linear_weight(b.T.contiguous(), self.max_batch)
            out[key] = (a, b, len(parts))
        return out

    def _decode_core(self, inp: Any, nb: int, span: int, r: int, bids: tuple[str, ...], kernel: str,
                     factors: _Factors | None = None) -> Any:
        """One decode step over cache rows ``0..nb-1`` with static shapes (what a CUDA graph captures):
        ``inp`` [3 + len(bids), nb] holds each row's last token, its position, its LoRA slot and its slot
        in each LoRA-XS basis ``bids``; attention reads cache positions ``0..span-1`` (a view) under a
        mask of each row's own positions; LoRA rows add their updates by ``kernel`` (the step's
        ``lora_kernel``). Returns the logits [nb, vocab]; nothing is read back."""
        import torch

        ids, pos = inp[0], inp[1]
        if factors is not None or not r:
            lora = factors
        elif kernel == "grouped":
            # one group per bank slot (the banks' size, not lora_scale's: a backend may lower max_adapters
            # after the engine is built, and banks are allocated at first use)
            groups = next(iter(self.lora_a.values())).shape[0]
            lora = _Segments.of(inp[2], groups, self.lora_scale, r, self.dtype)
        else:
            lora = (inp[2], r)
        xs = {bid: inp[3 + j] for j, bid in enumerate(bids)}
        rows = torch.arange(nb, device=self.device)
        h = self.model.model.embed_tokens(ids[:, None])
        cos, sin = self.model.model.rotary_emb(h, pos[:, None])
        mask = (torch.arange(span, device=self.device)[None, :] <= pos[:, None])[:, None, None, :]

        groups = self.n_heads // self.n_kv

        def attend(i: int, q: Any, k: Any, v: Any) -> Any:
            self.k_cache[i, rows, :, pos] = k[:, :, 0]
            self.v_cache[i, rows, :, pos] = v[:, :, 0]
            # the query heads that share a K/V head are folded into the query dimension ([nb, kv, groups,
            # d]: heads are grouped consecutively, as Llama's repeat_kv has it), so attention reads each
            # K/V head once, without the GQA path (which repeats K/V per query head and, in bf16 on CPU,
            # took 5x as long); the one mask of each row's positions applies to all its query heads
            out = torch.nn.functional.scaled_dot_product_attention(
                q.reshape(nb, self.n_kv, groups, self.head_dim), self.k_cache[i, :nb, :, :span],
                self.v_cache[i, :nb, :, :span], attn_mask=mask)
            return out.reshape(nb, self.n_heads, 1, self.head_dim)

        for i, layer in enumerate(self.layers):
            h = self._block(i, layer, h, cos, sin, lora, xs, attend)
        return self._lm_head(h[:, 0])

    def _adapter_table(
        self, reqs: list[_Request], at: list[int], n: int
    ) -> tuple[list[int], int, dict[str, list[int]]]:
        """Per row of an ``n``-row batch (request k sits at row ``at[k]``): its LoRA slot (0: none), the
        highest LoRA rank among them, and its slot in each LoRA-XS basis that has rows."""
        lora, rank, xs = [0] * n, 0, {}
        for req, i in zip(reqs, at):
            if req.adapter is None:
                continue
            kind, slot, bid = self._slot_of[req.adapter]
            if kind == LOW_RANK:
                lora[i] = slot
                rank = max(rank, self.lora_rank[slot])
            else:
                xs.setdefault(bid, [0] * n)[i] = slot
        return lora, rank, xs

    def _decode(self, running: list[_Request], rows: list[int]) -> Any:
        """The logits [nb, vocab] of one decode step; request ``running[i]``'s row is ``rows[i]`` (its
        ``cache_row``)."""
        import torch

        nb = max(rows) + 1
        span = max(q.pos for q in running) + 1
        lora, r, xs = self._adapter_table(running, rows, nb)
        kernel = self.lora_kernel  # read once: use_lora_kernel may switch it between steps
        if self.buckets:
            nb_b = _bucket(nb, self.max_batch, 1)
            span = _bucket(span, self.max_len, 64)
            r = _bucket(r, self.max_rank, 8) if r else 0
            lora += [0] * (nb_b - nb)
            xs = {b: v + [0] * (nb_b - nb) for b, v in xs.items()}
            nb = nb_b
        elif r and kernel == "grouped":  # the grouped GEMM reads x·Aᵀ [rows, r] in 16-byte rows
            r = min(-(-r // 8) * 8, self.max_rank)
        # idle rows get a dummy token at the cache's last position: a row without a running request may
        # belong to a prompt still being prefilled in pieces, whose K/V at position 0 (where the dummy
        # went before) the step then overwrote; no prompt token sits at max_len-1, and a request that
        # reaches it in decode writes its own K/V there before it reads it
        ids, pos = [0] * nb, [self.max_len - 1] * nb
        for q in running:
            ids[q.cache_row], pos[q.cache_row] = q.last, q.pos
        bids = tuple(sorted(xs))
        self.decode_shapes[(nb, span, r, bids)] += 1
        host = torch.tensor([ids, pos, lora, *(xs[b] for b in bids)], dtype=torch.long)
        if self.cuda_graphs:
            logits = self._replay((nb, span, r, bids, kernel), host)  # a kernel's graphs are its own
            if logits is not None:
                return logits
        return self._decode_core(host.to(self.device), nb, span, r, bids, kernel,
                                 self._factors(lora, r) if r and kernel == "factors" else None)

    def _replay(self, key: tuple, host: Any) -> Any:
        """Run the decode step ``key`` = (nb, span, rank, bases, LoRA kernel) from its CUDA graph (captured on
        first use); None when it cannot be captured (graphs are then off and the caller runs the step eagerly)."""
        if self._graphs_version != self._banks_version:  # a new bank: graphs captured before miss it
            self._drop_graphs()
            self._graphs_version = self._banks_version
        g = self._graphs.get(key)
        if g is None:
            try:
                g = self._capture(key, host)
            except Exception:  # noqa: BLE001 - a step that cannot be captured still runs, eagerly
                log.exception("CUDA graph capture failed; decoding eagerly from now on")
                self.cuda_graphs = False
                self._drop_graphs()
                return None
        else:
            self._graphs.move_to_end(key)
            g.inp.copy_(host, non_blocking=True)
        g.graph.replay()
        self.graph_replays += 1
        return g.out

    def _drop_graphs(self) -> None:
        """Forget every graph, and their memory pool with them: PyTorch refuses a capture into a pool
        whose graphs are all gone (its use count is 0), so the next capture starts a new pool."""
        self._graphs.clear()
        self._graph_pool = None

    def _capture(self, key: tuple, host: Any) -> _Graph:
        import torch

        inp = host.to(self.device)
        prev = torch.cuda.current_stream(self.device)
        if self._capture_stream is None:  # one stream for every warm-up and capture (cuBLAS handles are
            self._capture_stream = torch.cuda.Stream(self.device)  # cached per stream; the pool is shared)
        side = self._capture_stream
        with self._lock:  # no adapter is placed (no bank created) while the step is captured
            side.wait_stream(prev)
            with torch.cuda.stream(side):  # warm-up: lazy handles and workspaces before capture; its
                self._decode_core(inp, *key)  # cache writes are the ones the replay makes again
            prev.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._graph_pool, stream=side, capture_error_mode="thread_local"):
                    out = self._decode_core(inp, *key)
            finally:  # a capture that fails to begin leaves the side stream current
                torch.cuda.set_stream(prev)
        if self._graph_pool is None:
            self._graph_pool = graph.pool()  # every bucket's graph shares one memory pool (replays are serial)
        g = self._graphs[key] = _Graph(graph, inp, out)
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        self.graph_captures += 1
        return g

    # -- scheduling -------------------------------------------------------------------------------
