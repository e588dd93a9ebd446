"""Chat-template encoding, shared by data preparation (training rows) and serving (prompts).

The template is rendered with placeholders for the message contents and split at them: template text
is tokenized normally (its special tokens are real), contents with ``split_special_tokens=True``, so a
tenant's text cannot open a turn (``<|im_start|>system`` typed in a message stays text), and the
assistant spans of a training row are exact.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

IGNORE_INDEX = -100  # label value the loss skips (torch.nn.CrossEntropyLoss default)
# A content stand-in no template alters (no whitespace to trim, no markup) and no text contains by chance.
_PLACEHOLDER = "AFCONTENT{}X7f3a9c"
_PLACEHOLDER_RE = re.compile(r"AFCONTENT(\d+)X7f3a9c")
# A fast tokenizer applies ``split_special_tokens`` by setting it on its backend, shared by every thread,
# then encodes (the GIL released): two threads of one process tokenizing at once (a data window prepared
# on a trainer, a timed-out preparation still running) could encode a tenant's content with the other's
# setting, its ``<|im_start|>`` a real token (14 in 3,000 under contention, 2026-12-07). One at a time.
_TOKENIZE = threading.Lock()


class TemplateError(ValueError):
    """The chat template cannot render this conversation (it refuses a role, or does not render each
    content once, in order). Data preparation reports it as a bad row; serving answers it with a 400."""


def _special_ids(tokenizer: Any) -> frozenset[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    return frozenset(ids)


def _ids(tokenizer: Any, texts: list[str], *, plain: bool) -> list[list[int]]:
    if not texts:
        return []
    with _TOKENIZE:
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=plain)["input_ids"]


def split_render(messages: Sequence[Mapping[str, str]], tokenizer: Any,
                  add_generation_prompt: bool = False) -> tuple[list[list[int]], list[list[int]]]:
    """(template pieces' ids, contents' ids): the template is rendered with placeholders as contents
    and split at them; template text is tokenized normally (its special tokens are real), contents
    with ``split_special_tokens=True`` so a tenant cannot inject ``<|im_start|>system``. Piece i comes
    before content i; there is one more piece than contents."""
    stand_ins = [{"role": m["role"], "content": _PLACEHOLDER.format(i)} for i, m in enumerate(messages)]
    try:
        rendered = tokenizer.apply_chat_template(stand_ins, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises for conversations a template refuses (e.g. no system role)
        raise TemplateError(f"the chat template refused the conversation: {e}") from e
    parts = _PLACEHOLDER_RE.split(rendered)  # template, index, template, index, ..., template
    order = [int(i) for i in parts[1::2]]
    if order != list(range(len(messages))):
        raise TemplateError("the chat template does not render each message content exactly once, in order")
    contents = [m["content"] for m in messages]
    return _ids(tokenizer, parts[0::2], plain=False), _ids(tokenizer, contents, plain=True)


def encode_prompt(messages: Sequence[Mapping[str, str]], tokenizer: Any) -> list[int]:
    """A serving prompt: the chat template with the assistant's turn opened, contents as plain text
    (the same split tokenization as training rows, so a request cannot open a turn either)."""
    template_ids, content_ids = split_render(messages, tokenizer, add_generation_prompt=True)
    ids = list(template_ids[0])
    for content, after in zip(content_ids, template_ids[1:]):
        ids += content + after
    return ids


def encode_messages(
    messages: Sequence[Mapping[str, str]], tokenizer: Any, max_seq_len: int
) -> dict[str, Any]:
    """Chat-template, tokenize and mask one conversation.

    Template and contents are tokenized apart (``_split_render``), so a tenant cannot inject
    ``<|im_start|>system`` — and the assistant spans are exact. Labels cover the
    assistant contents plus the special token the template puts right after each (``<|im_end|>``) so
    the model learns to stop; everything else is ``IGNORE_INDEX``.
    """
    template_ids, content_ids = split_render(messages, tokenizer)
    special = _special_ids(tokenizer)

    input_ids: list[int] = list(template_ids[0])
    labels: list[int] = [IGNORE_INDEX] * len(input_ids)
    for i, message in enumerate(messages):
        content, after = content_ids[i], template_ids[i + 1]
        learn = message["role"] == "assistant"
        input_ids += content
        labels += content if learn else [IGNORE_INDEX] * len(content)
        # The end-of-turn token directly after an assistant reply is learned; the rest is template.
        stop = 1 if learn and after and after[0] in special else 0
        input_ids += after
        labels += after[:stop] + [IGNORE_INDEX] * (len(after) - stop)
    truncated = len(input_ids) > max_seq_len
    return {"input_ids": input_ids[:max_seq_len], "labels": labels[:max_seq_len], "truncated": truncated}
