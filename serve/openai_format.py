"""Engine events -> OpenAI responses: one JSON body, or server-sent events, for one or many choices.

A choice is one generation (prompt ``p``, sample ``j`` of ``n``: index ``p * n + j``). Usage counts each
prompt's tokens once and every choice's output. Log-probabilities travel with the text deltas that
hold their tokens and are shaped as OpenAI shapes them for chat (``logprobs.content``) and for text
completions (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from adapterfab.serve.api_errors import ApiError
from adapterfab.serve.engine import Finished, TextDelta, TokenLogprob

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM reports this instead


@dataclass
class Choice:
    """One generation in flight: its first event (already received: errors came before any byte was
    sent) and the rest."""

    index: int
    prompt_index: int
    first: Any
    events: AsyncIterator[Any]
    echo: str = ""
    # where a streamed completion's next token starts: advanced by each token's own text, as ``complete``
    # counts it (not by the text sent, which a stop string that may be starting holds back for a while)
    text_offset: int = 0
    completion_tokens: int = 0  # decoded so far, as the last event said (streamed usage)
    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    done: Finished | None = None


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _lp(x: float) -> float:
    return max(x, LOGPROB_FLOOR)


def _chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": _lp(logprob), "bytes": list(token.encode("utf-8"))}

    return {"content": [{**one(t.token, t.logprob), "top_logprobs": [one(s, lp) for s, lp in t.top]}
                        for t in entries]}


def _text_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    offsets = []
    for t in entries:
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": [t.token for t in entries], "token_logprobs": [_lp(t.logprob) for t in entries],
            "top_logprobs": [{s: _lp(lp) for s, lp in t.top} for t in entries], "text_offset": offsets}


def usage(choices: list[Choice]) -> dict[str, int]:
    prompts: dict[int, int] = {}
    completion = 0
    for c in choices:
        if c.done is not None:
            prompts.setdefault(c.prompt_index, c.done.prompt_tokens)
            completion += c.done.completion_tokens
    prompt = sum(prompts.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _events(c: Choice) -> AsyncIterator[Any]:
    """The choice's events from its first; ends with its ``Finished`` (a missing one is a plain stop)."""
    ev = c.first
    while True:
        yield ev
        if isinstance(ev, Finished):
            return
        try:
            ev = await c.events.__anext__()
        except StopAsyncIteration:
            yield Finished("stop", 0, 0)
            return


async def aclose(events: AsyncIterator[Any]) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:  # noqa: BLE001 - best effort
            pass


async def complete(meta: dict[str, Any], choices: list[Choice], kind: str, logprobs: bool,
                   on_error: Callable[[BaseException], ApiError], watch: Any = None) -> dict[str, Any]:
    """The whole response once every choice has finished (choices decode concurrently). ``watch``
    (``observe.Watch``) times the first text and counts the tokens; it is closed here when the response
    is done, by the caller when it fails (which may replay the request on the same watch)."""

    async def drain(c: Choice) -> None:
        try:
            async for ev in _events(c):
                if isinstance(ev, TextDelta):
                    if watch is not None and not c.parts:
                        watch.text()
                    c.parts.append(ev.text)
                    c.logprobs.extend(ev.logprobs)
                elif isinstance(ev, Finished):
                    c.done = ev
        finally:
            await aclose(c.events)

    tasks = [asyncio.ensure_future(drain(c)) for c in choices]
    try:
        await asyncio.gather(*tasks)
    except Exception as e:  # noqa: BLE001 - one choice failed: the others stop too (their rows are freed)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise on_error(e) from None
    total = usage(choices)
    if watch is not None:
        watch.done(total["prompt_tokens"], total["completion_tokens"])
    out = []
    for c in choices:
        text = c.echo + "".join(c.parts)
        finish = c.done.finish_reason if c.done else "stop"
        if kind == "text":
            lp = _text_logprobs(c.logprobs, len(c.echo)) if logprobs else None
            out.append({"index": c.index, "text": text, "finish_reason": finish, "logprobs": lp})
        else:
            lp = _chat_logprobs(c.logprobs) if logprobs else None
            out.append({"index": c.index, "message": {"role": "assistant", "content": text},
                        "finish_reason": finish, "logprobs": lp})
    obj = "text_completion" if kind == "text" else "chat.completion"
    return {**meta, "object": obj, "choices": out, "usage": total}


async def stream(meta: dict[str, Any], choices: list[Choice], kind: str, logprobs: bool, include_usage: bool,
                 on_error: Callable[[BaseException], ApiError], watch: Any = None,
                 continuous_usage: bool = False) -> AsyncIterator[str]:
    """Server-sent events: chunks of every choice as they decode (interleaved), each choice's finish
    reason, then usage (when asked) and ``[DONE]``. With ``continuous_usage`` (vLLM's
    ``stream_options.continuous_usage_stats``) every chunk carries its choice's usage so far. An error
    after the headers goes in-band. ``watch`` (``observe.Watch``) times the first text and the gaps
    between chunks, and counts the tokens."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(c: Choice, text: str | None, entries: tuple[TokenLogprob, ...] = (),
              finish: str | None = None, role: bool = False) -> str:
        extra: dict[str, Any] = {}
        if continuous_usage:
            prompt = getattr(c.first, "prompt_tokens", 0)
            extra["usage"] = {"prompt_tokens": prompt, "completion_tokens": c.completion_tokens,
                              "total_tokens": prompt + c.completion_tokens}
        if kind == "text":
            lp = _text_logprobs(list(entries), c.text_offset) if logprobs and entries else None
            c.text_offset += sum(len(t.token) for t in entries)
            return sse({**meta, "object": obj, "choices": [{"index": c.index, "text": text or "",
                                                            "finish_reason": finish, "logprobs": lp}], **extra})
        delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if role else (
            {"content": text} if text is not None else {})
        lp = _chat_logprobs(list(entries)) if logprobs and entries else None
        return sse({**meta, "object": obj, "choices": [{"index": c.index, "delta": delta, "finish_reason": finish,
                                                        "logprobs": lp}], **extra})

    queue: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice) -> None:
        try:
            async for ev in _events(c):
                await queue.put((c, ev))
        except Exception as e:  # noqa: BLE001 - reported in-band by the consumer
            await queue.put((c, e))
        finally:
            await aclose(c.events)

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        for c in choices:
            if kind == "chat":
                yield chunk(c, c.echo, role=True)
            elif c.echo:
                c.text_offset = len(c.echo)  # the tokens follow the echoed prompt
                yield chunk(c, c.echo)
        left = len(choices)
        while left:
            c, ev = await queue.get()
            if isinstance(ev, BaseException):
                err = on_error(ev)
                if watch is not None:
                    watch.failed(err.status)
                yield sse(err.body())
                break
            if isinstance(ev, TextDelta):
                if watch is not None:
                    watch.text()
                c.completion_tokens = ev.completion_tokens
                yield chunk(c, ev.text, ev.logprobs)
            elif isinstance(ev, Finished):
                c.done = ev
                c.completion_tokens = ev.completion_tokens
                left -= 1
                yield chunk(c, None, finish=ev.finish_reason)
        else:
            total = usage(choices)
            if watch is not None:
                watch.done(total["prompt_tokens"], total["completion_tokens"])
            if include_usage:
                yield sse({**meta, "object": obj, "choices": [], "usage": total})
    finally:
        if watch is not None:
            watch.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    yield "data: [DONE]\n\n"
