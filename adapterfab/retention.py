"""Knowledge retention: the share of the facts the base model states that an adapter still states.

Every job is measured on a probe set: the one shipped here (``retention_probes.json``: 65 facts over
10 topics, none asked by the example personas) plus the tenant's own (``probes:`` in its spec entry).
The measure is taken **against the base's own answers**: the base answers each probe once (greedy,
``MAX_NEW_TOKENS``) and a probe counts only when that answer states the fact (``fact_span``) and the base,
teacher-forced on it, picks the fact's tokens itself. A fact the base gets wrong is never counted
against an adapter.

An adapter keeps a fact when, given the probe's prompt and the base's answer up to the fact, its greedy
choice at each of the fact's tokens is the fact's token (``forced_row``): one forward per probe, no
generation, fused across a group's adapters in its eval phase (jobs/fused.py ``forced_many``). Over
the benchmark's adapters this ranks them as generating whole answers does (bench/RESULTS.md, 2026-12-04).
The promotion gate refuses ``production`` below ``promotion.min_retention`` (adapterfab/promotion.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

SHIPPED = Path(__file__).with_name("retention_probes.json")
MAX_NEW_TOKENS = 40  # the base's answer to a probe: long enough to state a fact
CLAIM_WAIT_S = 900.0  # the longest a trainer waits for another asking the base the same questions
MAX_GENERATE_BATCH = 64  # prompts per generate call: 40 decode steps cost about the same for 16 rows or 64


def answers_folder(settings: Any) -> Path:
    """Where the base's answers (to retention probes and replay prompts) are kept: beside the converted
    base models, in the machine's cache (``ADAPTERFAB_CACHE``), shared by every home and stack on it. The
    answers are a property of the base's weights (a content hash), how they are loaded and the device
    type (``AnswerCache``'s key), not of a stack: a new stack's first batch on a base asks nothing again
    (~65 greedy answers of 40 tokens: 15-25 s of a trainer on 2 CPUs, 1-3 minutes without AVX-512)."""
    return Path(settings.cache) / "retention"


def loaded_as(model: Any) -> str:
    """How ``model``'s base is loaded, as its answers depend on it: the first parameter's dtype, and for a
    4-bit base (bitsandbytes ``Linear4bit``: QLoRA, LoRA-XS ``quantize: nf4``) its quant type, compute
    dtype and double quantization. A 4-bit base answers otherwise than the full-precision one of the same
    file (it states other facts), so the two never share cached answers."""
    first = next(model.parameters())
    kind = str(first.dtype)
    for m in model.modules():
        w = getattr(m, "weight", None)
        if type(m).__name__ == "Linear4bit" and w is not None and not hasattr(m, "base_layer"):  # not PEFT's
            return (f"{kind}:4bit:{getattr(w, 'quant_type', '?')}:{getattr(m, 'compute_dtype', None)}:"
                    f"dq={getattr(w, 'compress_statistics', '?')}")
    return kind


def generate_batch(n: int) -> int:
    """Rows per generate call for ``n`` prompts: as few calls as ``MAX_GENERATE_BATCH`` allows, evenly
    filled (65 prompts: 2 calls of 33, not 64 + 1; 1 thread on SmolLM2: 20 s, against 29 s in 16s)."""
    calls = -(-n // MAX_GENERATE_BATCH)
    return max(1, -(-n // max(1, calls)))


@lru_cache(maxsize=1)
def _shipped() -> tuple[tuple[str, tuple[str, ...]], ...]:
    return tuple((p["question"], tuple(p["answers"])) for p in json.loads(SHIPPED.read_text())["probes"])


def shipped_probes() -> list[dict[str, Any]]:
    """The shipped probe set: [{topic, question, answers, base_answer (SmolLM2's, for reference)}]."""
    return json.loads(SHIPPED.read_text())["probes"]


def job_probes(own: list[dict[str, Any]] | tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """The probes a job is measured on: the shipped set, then the tenant's own (a question asked twice
    counts once, the tenant's accepted answers added)."""
    out: dict[str, list[str]] = {q: list(a) for q, a in _shipped()}
    for p in own:
        q, answers = (p["question"], p["answers"]) if isinstance(p, dict) else (p.question, p.answers)
        out[q] = list(dict.fromkeys([*out.get(q, []), *answers]))
    return [{"question": q, "answers": a} for q, a in out.items()]


def fact_span(answer: str, accepted: list[str]) -> tuple[int, int] | None:
    """Where ``answer`` states the fact: (start, end) characters of its first match, or None. A match
    is one of the ``accepted`` strings (any case) starting at a word; a string of at most 3 characters
    ("4", "Au", "100") must also end at one, so that "4" is not found in "40" nor "Na" in "Nations"."""
    best = None
    for a in accepted:
        end = r"(?![A-Za-z0-9])" if len(a) <= 3 else ""
        m = re.search(rf"(?<![A-Za-z0-9]){re.escape(a)}{end}", answer, flags=re.IGNORECASE)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), m.end())
    return best


def prompt_ids(tokenizer: Any, question: str) -> list[int]:
    """A user prompt through the chat template, up to where the assistant's answer starts, tokenized as
    serving tokenizes it (``chat.encode_prompt``): retention measures the adapter on the prompts it serves."""
    from adapterfab.chat import encode_prompt

    return encode_prompt([{"role": "user", "content": question}], tokenizer)


def forced_row(tokenizer: Any, question: str, accepted: list[str], base_answer: str) -> dict[str, Any] | None:
    """A teacher-forced retention row: the probe's prompt and the base's own answer up to where it states
    the fact, then the fact's tokens, which are the labels (``ids[labels_from:]``). None when the base's
    answer does not state the fact (or the fact does not start at a token boundary)."""
    span = fact_span(base_answer, accepted)
    if span is None:
        return None
    cut = _fact_tokens(tokenizer, base_answer[:span[1]], span[0])
    if cut is None:
        return None
    head = prompt_ids(tokenizer, question)
    whole, first = cut
    return {"ids": head + whole, "labels_from": len(head) + first}


def _fact_tokens(tokenizer: Any, text: str, start: int) -> tuple[list[int], int] | None:
    """``text`` (the base's answer up to the end of the fact, which starts at character ``start``) as
    tokens, and the index of the fact's first token: the first holding one of its characters or of the
    spaces right before it (" Paris" is one token; " 90" is "Ġ", "9", "0"). Only spaces: line breaks before
    it ("Capital:\\n\\nParis") are tokens of the base's layout, not of the fact, and stay in the context.
    None when that token also holds text before the fact (it does not start at a token boundary)."""
    start = len(text[:start].rstrip(" "))
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = [int(i) for i in enc["input_ids"]], [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError, KeyError):  # a tokenizer without offsets
        ids, offsets = [], []
    if ids and len(offsets) == len(ids):
        first = next((k for k, (_, end) in enumerate(offsets) if end > start), None)
        if first is None or text[offsets[first][0]:start].strip():
            return None
        return ids, first
    before = tokenizer.encode(text[:start].rstrip(), add_special_tokens=False)  # as before offsets: any whitespace
    whole = tokenizer.encode(text, add_special_tokens=False)
    if whole[:len(before)] != before or len(whole) == len(before):
        return None
    return whole, len(before)


ANSWERS_FORMAT = "v2"  # the answers files' key (``AnswerCache``): a new one when what makes answers changes
PROMPT_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                "special_tokens_map.json", "generation_config.json")


def prompt_format(base_path: str) -> str:
    """A digest of the files beside a base's weights that shape its answers besides them: the tokenizer,
    its chat template (the prompt), and the generation config. The same weights under another template
    answer otherwise."""
    import hashlib

    h = hashlib.sha256()
    for name in PROMPT_FILES:
        f = Path(base_path) / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


class AnswerCache:
    """The base's answers to probes, in memory and (``folder`` given) in a JSON file per base model (its
    weights and ``prompt_format``), dtype and device type, so that a new trainer on the same base does not
    ask them again. Any answer the base
    gave is as good as another (a probe counts only where the base, teacher-forced on its answer, picks
    the fact itself), so the file is written whole and the last writer wins. Trainers that start at once
    (a batch's first groups) would each ask the same questions: ``claim`` lets one ask while the others
    wait for its file (``base_answers``)."""

    def __init__(self, folder: str | None, base_path: str, dtype: str, device: str):
        self.answers: dict[str, str] = {}
        self.path: Path | None = None
        if folder:
            import hashlib

            from adapterfab.basemodel import fingerprint

            try:
                key = f"{ANSWERS_FORMAT}:{fingerprint(base_path)}:{prompt_format(base_path)}:{dtype}:{device}:" \
                      f"{MAX_NEW_TOKENS}"
            except Exception:  # noqa: BLE001 - no cache for a base that cannot be fingerprinted
                return
            self.path = Path(folder) / f"answers-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
            self._read()

    @classmethod
    def of(cls, folder: str | None, base_path: str, model: Any) -> AnswerCache:
        """The cache of ``model``'s base as it is loaded (``loaded_as``) on its device."""
        return cls(folder, base_path, loaded_as(model), next(model.parameters()).device.type)

    @contextmanager
    def claim(self, wait_s: float = CLAIM_WAIT_S) -> Iterator[None]:
        """Held while this process asks the base: an exclusive lock on the file's ``.lock`` beside it (the
        OS drops it if the holder dies), then the answers another holder wrote are read in. A holder that
        keeps it past ``wait_s`` (a stalled trainer) costs only the time: this one goes on without it."""
        if self.path is None:
            yield
            return
        import fcntl
        import time

        held = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            held = open(self.path.with_suffix(".lock"), "a")  # noqa: SIM115 - closed below
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        held.close()
                        held = None
                        break
                    time.sleep(0.2)
        except OSError:  # a folder without locks: each trainer asks for itself, as before
            if held is not None:
                held.close()
            held = None
        try:
            self._read()
            yield
        finally:
            if held is not None:
                held.close()  # closing the file drops the lock

    def _read(self) -> None:
        """The file's answers, added to those in memory (another trainer's, written since)."""
        if self.path is None:
            return
        try:
            self.answers.update(dict(json.loads(self.path.read_text())))
        except (OSError, ValueError, TypeError):
            pass

    def missing(self, questions: list[str]) -> list[str]:
        """The ``questions`` not answered yet (a cache grown past 20,000 answers starts again first, so
        that every question of this call is either here or in the returned list)."""
        if len(self.answers) > 20_000:
            self.answers.clear()
        return list(dict.fromkeys(q for q in questions if q not in self.answers))

    def add(self, answers: dict[str, str]) -> None:
        self.answers.update(answers)
        if self.path is None:
            return
        import os
        import tempfile

        try:  # written whole, then renamed into place
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".answers-")
            with os.fdopen(fd, "w") as f:
                json.dump(self.answers, f)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a cache that cannot be written costs time, never the job


def probe_rows(base: Any, tokenizer: Any, probes: list[dict[str, Any]], cache: AnswerCache,
               together: Callable[[bool], bool] | None = None) -> list[dict[str, Any] | None]:
    """The retention rows of ``probes`` (``forced_row``, None where the base's answer does not state the
    fact): ``base`` (the bare base, adapters disabled by the caller) answers the probes ``cache`` has not
    seen, greedy, in as few generate calls as ``generate_batch`` gives (``together``: ``base_answers``)."""
    base_answers(base, tokenizer, [p["question"] for p in probes], cache, together)
    return [forced_row(tokenizer, p["question"], list(p["answers"]), cache.answers[p["question"]])
            for p in probes]


def base_answers(base: Any, tokenizer: Any, questions: list[str], cache: AnswerCache,
                 together: Callable[[bool], bool] | None = None) -> dict[str, str]:
    """The base's greedy answers to ``questions`` (``MAX_NEW_TOKENS``): those ``cache`` has not seen are
    asked, in as few generate calls as ``generate_batch`` gives, and added to it. ``together``: this
    process is one of several workers that must run the same forwards (ZeRO-3); given whether this one
    misses an answer, it says whether any does (jobs/zero.any_worker). Then no worker waits on another's
    claim: if any misses one, all ask every question, together."""
    from adapterfab.textgen import greedy_in_batches

    def ask(new: list[str]) -> None:
        answers = greedy_in_batches(base, tokenizer, new, MAX_NEW_TOKENS, batch=generate_batch(len(new)))
        cache.add(dict(zip(new, answers)))

    if together is not None:
        if together(bool(cache.missing(questions))):
            ask(questions)
    elif cache.missing(questions):
        with cache.claim():  # another trainer asking them now: its answers, once it has written them
            new = cache.missing(questions)
            if new:
                ask(new)
    return {q: cache.answers[q] for q in questions}


def metrics(asked: int, known: int, kept: int, seconds: float) -> dict[str, float]:
    """A job's retention metrics (``retention`` only when the base states at least one probe)."""
    out = {"retention_probes": float(asked), "retention_known": float(known), "retention_kept": float(kept),
           "retention_s": seconds}
    if known:
        out["retention"] = kept / known
    return out


def describe(m: dict[str, Any]) -> str | None:
    """``retention 0.94 (61 of 65 facts the base states)``, or None when nothing was measured."""
    try:
        known, kept = int(float(m["retention_known"])), int(float(m["retention_kept"]))
    except (KeyError, TypeError, ValueError):
        return None
    if not known:
        return f"retention not measured: the base states none of the {int(float(m.get('retention_probes', 0)))} probes"
    return f"retention {kept / known:.2f} ({kept} of {known} facts the base states)"
