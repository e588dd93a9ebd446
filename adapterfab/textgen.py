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
    one prompt alone has no padding, so its answer is the same as generating it by itself. Each prompt is
    tokenized as serving tokenizes it (``chat.encode_prompt``: template pieces and contents apart), and
    padded with ``pad_token_id`` (a tokenizer without a pad token, as Llama's, has none to pad with).
    ``opening``: text every answer is forced to start with (not part of the returned answer)."""
    import torch

    from adapterfab.chat import encode_prompt

    forced = tokenizer.encode(opening, add_special_tokens=False) if opening else []
    rows = [encode_prompt([{"role": "user", "content": p}], tokenizer) + forced for p in prompts]
    pad, width = pad_token_id(tokenizer), max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding: generation continues every row from its last real token
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]


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
