"""How the fused trainer cuts and counts its work: stacking jobs' micro-batches into one batch
(``stack``), splitting a step's rows by length where the padding saved pays for another pass
(``length_chunks``, ``step_chunks``), sizing the retention test's passes (``pass_sizes``), and the FLOPs a
step spends (``ModelFlops``). Plain torch."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from adapterfab.jobs.fused_bank import MultiLinear
from adapterfab.textgen import pad_rows

Batch = dict[str, Tensor]
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
