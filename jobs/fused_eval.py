"""The fused trainer's evaluations, each one pass (or a few) for a whole group: eval loss and token
accuracy of every adapter and of the bare base on their eval rows (``evaluate_many``), and the
retention test of their probe rows (``forced_many``, adapterfab/retention.py). A mixin of
``jobs/fused.py``'s ``FusedTrainer``, whose base, routing and slots it uses; plain torch."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from adapterfab.jobs.fused_batches import FORCED_PASS_TOKENS, Batch, pass_sizes, stack
from adapterfab.jobs.train_loop import evaluate


class FusedEvaluation:
    """``FusedTrainer``'s evaluations (it provides ``base``, ``decoder``, ``lm_head``, ``route``,
    ``device``, ``_slot_of`` and ``_forward``)."""

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
