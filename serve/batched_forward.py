"""The batched engine's forward pass: a Llama decoder run by hand so that every row adds its own
adapter's update (LOW_RANK slots gathered per row, SHARED_BASIS rows through their basis), prefill of
new prompts into the KV cache, and decode steps with static shapes, captured once per shape bucket as
CUDA graphs on a GPU. A mixin of ``serve/batched.py``'s ``BatchedEngine``; plain torch."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from adapterfab.methods import LOW_RANK

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


def _bucket(n: int, cap: int, smallest: int) -> int:
    """The smallest power-of-two multiple of ``smallest`` that holds ``n``, at most ``cap``."""
    b = smallest
    while b < n:
        b *= 2
    return min(b, cap)


class BatchedForward:
    """``BatchedEngine``'s decoder forward, prefill and (graph-captured) decode step."""

    def _linear(self, key: tuple[int, str], x: Any, lora: tuple[Any, int] | None, xs_slots: dict[str, Any]) -> Any:
        """``x Wᵀ`` plus each row's adapter delta; ``lora`` is (slot per row, rank to gather up to)."""
        return self._plus_delta(self.linear[key](x), key, x, lora, xs_slots)

    def _fused(self, i: int, group: str, names: tuple[str, ...], x: Any, lora: Any, xs_slots: dict[str, Any]) -> list:
        """The modules ``names`` of layer ``i`` from one matmul of their stacked weights, each plus its rows'
        adapter deltas."""
        import torch

        weight, bias, sizes = self.fused[(i, group)]
        outs = torch.nn.functional.linear(x, weight, bias).split(sizes, dim=-1)
        return [self._plus_delta(y, (i, n), x, lora, xs_slots) for y, n in zip(outs, names)]

    def _plus_delta(self, y: Any, key: tuple[int, str], x: Any, lora: tuple[Any, int] | None,
                    xs_slots: dict[str, Any]) -> Any:
        import torch

        if lora is not None and key in self.lora_a:
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

    def _prefill_forward(self, ids: Any, rows: Any, lora: Any, xs: dict[str, Any], last: Any) -> Any:
        """Prompts ``ids`` [B, T] (right-padded) from position 0 into cache ``rows`` [B]; returns the
        logits [B, vocab] at each row's last prompt token ``last`` [B]. A prompt attends only to its own
        keys, so attention runs on them directly with the fused causal kernel (no mask, no cache read);
        right padding is harmless: no real token sees a pad, and the pads' cache slots are overwritten
        as the request decodes."""
        import torch

        bsz, t = ids.shape
        h = self.model.model.embed_tokens(ids)
        cos, sin = self.model.model.rotary_emb(h, torch.arange(t, device=self.device)[None, :].expand(bsz, t))

        def attend(i: int, q: Any, k: Any, v: Any) -> Any:
            self.k_cache[i, rows, :, :t] = k
            self.v_cache[i, rows, :, :t] = v
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)

        for i, layer in enumerate(self.layers):
            h = self._block(i, layer, h, cos, sin, lora, xs, attend)
        h = h[torch.arange(bsz, device=self.device), last]
        return self.model.lm_head(self.model.model.norm(h)).float()

    def _decode_core(self, inp: Any, nb: int, span: int, r: int, bids: tuple[str, ...]) -> Any:
        """One decode step over cache rows ``0..nb-1`` with static shapes (what a CUDA graph captures):
        ``inp`` [3 + len(bids), nb] holds each row's last token, its position, its LoRA slot and its slot
        in each LoRA-XS basis ``bids``; attention reads cache positions ``0..span-1`` (a view) under a
        mask of each row's own positions. Returns the logits [nb, vocab]; nothing is read back."""
        import torch

        ids, pos = inp[0], inp[1]
        lora = (inp[2], r) if r else None
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
        return self.model.lm_head(self.model.model.norm(h[:, 0])).float()

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
        if self.buckets:
            nb_b = _bucket(nb, self.max_batch, 1)
            span = _bucket(span, self.max_len, 64)
            r = _bucket(r, self.max_rank, 8) if r else 0
            lora += [0] * (nb_b - nb)
            xs = {b: v + [0] * (nb_b - nb) for b, v in xs.items()}
            nb = nb_b
        ids, pos = [0] * nb, [0] * nb  # idle rows: a dummy token at position 0 of a row nobody owns
        for q in running:
            ids[q.cache_row], pos[q.cache_row] = q.last, q.pos
        bids = tuple(sorted(xs))
        self.decode_shapes[(nb, span, r, bids)] += 1
        host = torch.tensor([ids, pos, lora, *(xs[b] for b in bids)], dtype=torch.long)
        if self.cuda_graphs:
            logits = self._replay((nb, span, r, bids), host)
            if logits is not None:
                return logits
        return self._decode_core(host.to(self.device), nb, span, r, bids)

    def _replay(self, key: tuple, host: Any) -> Any:
        """Run the decode step ``key`` = (nb, span, rank, bases) from its CUDA graph (captured on first use);
        None when it cannot be captured (graphs are then off and the caller runs the step eagerly)."""
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
