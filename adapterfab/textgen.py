"""Plain torch/transformers helpers for a model's text: greedy answers to chat prompts, in left-padded
batches, and token id lists padded into one batch. Used by retention and replay (the base's own
answers), the evaluations in jobs/ and the benchmarks."""

from __future__ import annotations

from typing import Any

from adapterfab.basemodel import pad_token_id


def greedy_answer(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 40) -> str:
    """The model's greedy answer to one user prompt (its chat template applied)."""
    return greedy_answers(model, tokenizer, [prompt], max_new_tokens)[0]


def greedy_answers(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 40,
                   opening: str = "") -> list[str]:
    """Greedy answers to many user prompts in one left-padded ``generate`` (rows that end early are padded);
    one prompt alone has no padding, so its answer is the same as generating it by itself. ``opening``:
    text every answer is forced to start with (not part of the returned answer)."""
    import torch

    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) + opening for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    pad = pad_token_id(tokenizer)
    enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return [tokenizer.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


def greedy_in_batches(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int = 40,
                      opening: str = "", batch: int = 16) -> list[str]:
    """``greedy_answers`` over ``prompts`` ``batch`` at a time (bounded padding and memory)."""
    answers: list[str] = []
    for start in range(0, len(prompts), batch):
        answers += greedy_answers(model, tokenizer, prompts[start:start + batch], max_new_tokens, opening=opening)
    return answers


def pad_rows(seqs: list[list[int]], pad: int) -> tuple[Any, Any]:
    """Token id lists right-padded into one batch: (input_ids, attention_mask)."""
    import torch

    n = max(len(q) for q in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, q in enumerate(seqs):
        ids[i, :len(q)] = torch.tensor(q)
        mask[i, :len(q)] = 1
    return ids, mask
