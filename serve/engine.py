"""One base model, many named LoRA adapters, token-by-token chat generation. Plain PyTorch +
transformers + peft (no Ray), so it runs in a unit test, a Ray Serve replica or a benchmark alike.

One generation runs at a time (a lock around the decode loop); the batched multi-adapter engine
replaces this later behind the same ``generate`` contract.

Try it on CPU::

    python -c "from adapterfab.serve.engine import Engine, SamplingParams as P; \
e = Engine('~/.cache/adapterfab/models/smollm2-135m-instruct'); \
print(''.join(ev.text for ev in e.generate([{'role': 'user', 'content': 'Hi!'}], None, P(max_tokens=32)) \
if hasattr(ev, 'text')))"
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterfab.errors import AdapterfabError
from adapterfab.serve.sampling import SamplingError, sample
from adapterfab.threads import use_torch_threads

log = logging.getLogger("adapterfab.serve.engine")

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
IM_END = "<|im_end|>"
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


class AdapterRejected(AdapterfabError):
    """An adapter folder that this engine refuses to load (format or shapes)."""


class AdapterNotLoaded(AdapterfabError):
    pass


class InvalidPrompt(AdapterfabError):
    """Prompt token ids the model has no embedding for (the client's mistake: a 400, not a failed batch)."""


class PromptTooLong(AdapterfabError):
    pass


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding; ``serve/sampling.py`` says in which order they apply (vLLM's)."""

    max_tokens: int | None = 256  # None: up to the end of the engine's context
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    tenant: str | None = None  # who asked: the batched engine admits tenants' requests in turn
    top_k: int = 0  # 0 (or -1): every token
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; n: the chosen token's and the n most likely
    guide: tuple[str, str] | None = None  # structured output: (kind, spec), sampling.GUIDE_KINDS

    def budget(self, prompt_tokens: int, context: int) -> int:
        """New tokens this request may produce in a context of ``context`` positions."""
        room = context - prompt_tokens
        return room if self.max_tokens is None else min(self.max_tokens, room)

    def ends(self, token: int, eos_ids: set[int]) -> bool:
        """Whether ``token`` ends the request (end of sequence unless ignored, or a stop token id)."""
        return (token in eos_ids and not self.ignore_eos) or token in self.stop_token_ids


@dataclass(frozen=True)
class TokenLogprob:
    """One output token as the API reports it: its text, log-probability and the top alternatives."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class TextDelta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens behind this text, when the request asked
    prompt_tokens: int = 0
    completion_tokens: int = 0  # tokens decoded so far (for streamed usage: ``continuous_usage_stats``)


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


Event = TextDelta | Finished


class Detokenizer:
    """Incremental decoding that only emits complete characters: text is held back while the
    tokens so far end in a partial UTF-8 sequence (decoded as U+FFFD)."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # tokens up to here have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever complete text is still pending at the end (a dangling partial byte is dropped)."""
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:]).rstrip("\ufffd")
        self._prefix = self._read = len(self.ids)
        return now[len(before):] if len(now) > len(before) else ""


class StopMatcher:
    """Cuts the output at the first stop string; holds back text that might begin one, so the
    stop string never reaches the client. Text pushed with ``check`` False (the tokens up to
    ``min_tokens``) cannot stop the output: only a stop string that ends after it does, as in vLLM."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.text = ""
        self._sent = 0
        self._free = 0  # no stop string ending at or before this position counts
        self.stopped = False

    def push(self, delta: str, check: bool = True) -> str:
        if self.stopped:
            return ""
        self.text += delta
        if not self.stops:
            out, self._sent = self.text[self._sent:], len(self.text)
            return out
        if not check:
            self._free = len(self.text)
        search_from = max(0, self._sent - max(len(s) for s in self.stops))
        hits = [i for i in (self.text.find(s, max(search_from, self._free - len(s) + 1)) for s in self.stops)
                if i >= 0]
        if hits:
            cut = min(hits)
            self.stopped = True
            out, self._sent = self.text[self._sent:cut], cut
            return out
        hold = 0  # the longest tail of the text that begins a stop string: held back
        for s in self.stops:
            tail = self.text[-(len(s) - 1):] if len(s) > 1 else ""
            i = tail.find(s[0])
            while i >= 0 and len(tail) - i > hold:  # only where the stop string's first character is
                if s.startswith(tail[i:]):
                    hold = len(tail) - i
                    break
                i = tail.find(s[0], i + 1)
        end = max(self._sent, len(self.text) - hold)
        out, self._sent = self.text[self._sent:end], end
        return out

    def flush(self) -> str:
        if self.stopped:
            return ""
        out, self._sent = self.text[self._sent:], len(self.text)
        return out


def _check_adapter_files(local_dir: Path, base_shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse anything but a safetensors LoRA whose every tensor fits a module of the base."""
    cfg_path, weights = local_dir / ADAPTER_CONFIG, local_dir / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        found = sorted(p.name for p in local_dir.iterdir()) if local_dir.is_dir() else []
        raise AdapterRejected(f"{local_dir} is not a safetensors PEFT adapter: it needs {ADAPTER_CONFIG} and "
                              f"{ADAPTER_WEIGHTS} (found {found}); re-save it with save_pretrained(..., "
                              "safe_serialization=True)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise AdapterRejected(f"{cfg_path} is not valid JSON: {e}") from None
    from adapterfab.methods import LOW_RANK, method_of_adapter

    method = method_of_adapter(cfg.get("peft_type"))
    if method is None or method.family != LOW_RANK:  # this engine serves PEFT LoRA folders (exports of the rest)
        raise AdapterRejected(f"{local_dir}: peft_type {cfg.get('peft_type')!r} is not served; only LORA is")
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a corrupt file
        raise AdapterRejected(f"{weights} is not a readable safetensors file: {e}") from None
    if not shapes:
        raise AdapterRejected(f"{weights} holds no tensors")
    for key, shape in shapes.items():
        name = key.removeprefix("base_model.model.")
        for part in (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B"):
            if name.endswith(part):
                module = name[: -len(part)]
                break
        else:
            if base_shapes.get(name) != shape:
                have = list(base_shapes[name]) if name in base_shapes else "no such tensor"
                raise AdapterRejected(f"{local_dir}: tensor {key} {list(shape)} does not match the base "
                                      f"model ({have})")
            continue
        base = base_shapes.get(module + ".weight")
        if base is None or len(shape) != 2:
            raise AdapterRejected(f"{local_dir}: {key} adapts {module}, which the base model does not have")
        out_f, in_f = base  # nn.Linear weight is (out, in); nn.Embedding is (num, dim)
        ok = {"lora_A.weight": shape[1] == in_f, "lora_B.weight": shape[0] == out_f,
              "lora_embedding_A": shape[1] == out_f, "lora_embedding_B": shape[0] == in_f}[part.lstrip(".")]
        if not ok:
            raise AdapterRejected(f"{local_dir}: {key} has shape {list(shape)}, which does not fit {module} "
                                  f"{list(base)} of the base model (was it trained on another base?)")


class TextGeneration:
    """What both engines share above token ids: the prompt (chat template or raw text), EOS ids, and
    ``generate``: ids -> text deltas with stop strings, then one ``Finished`` with usage. A subclass
    sets ``tokenizer``, ``eos_ids`` (``eos_ids_of``) and ``_tokenizer_lock``, and implements
    ``generate_token_ids(prompt_ids, adapter, params)``."""

    tokenizer: Any
    eos_ids: set[int]
    _tokenizer_lock: threading.Lock

    def generate_token_ids(self, prompt_ids: list[int], adapter: str | None,
                           params: SamplingParams) -> Iterator[int]:
        raise NotImplementedError

    def eos_ids_of(self, model: Any) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        im_end = self.tokenizer.convert_tokens_to_ids(IM_END)
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            ids.add(im_end)
        return {i for i in ids if isinstance(i, int)}

    def encode_text(self, prompt: str) -> list[int]:
        """A raw prompt (``/v1/completions``): the tokenizer's own special tokens, no chat template."""
        with self._tokenizer_lock:
            return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat template with the assistant turn opened; message contents are plain text, so
        ``<|im_start|>system`` typed in a message cannot open a turn (as in training rows). A template
        that refuses the conversation raises ``adapterfab.chat.TemplateError``."""
        from adapterfab.chat import encode_prompt

        with self._tokenizer_lock:
            return encode_prompt(messages, self.tokenizer)

    def prompt_token_limit(self) -> int:
        """The most prompt tokens this engine takes."""
        raise NotImplementedError

    def _max_token_bytes(self) -> int:
        """The most UTF-8 bytes any vocabulary entry is written with (at least the bytes it stands for)."""
        cached = getattr(self, "_token_bytes", None)
        if cached is None:
            vocab = self.tokenizer.get_vocab()
            cached = self._token_bytes = max((len(t.encode("utf-8", "replace")) for t in vocab), default=1)
        return cached

    def vocab_rows(self) -> int:
        """How many token ids the model embeds (its embedding's rows, which may exceed the tokenizer's)."""
        cached = getattr(self, "_vocab_rows", None)
        if cached is None:
            emb = getattr(getattr(self, "model", None), "get_input_embeddings", lambda: None)()
            cached = self._vocab_rows = int(getattr(emb, "num_embeddings", 0) or len(self.tokenizer))
        return cached

    def check_token_ids(self, prompt_ids: list[int]) -> None:
        """Refuse token ids outside the model's vocabulary before they reach a batch: in a shared prefill
        one bad id would fail every request admitted with it."""
        rows = self.vocab_rows()
        bad = next((i for i in prompt_ids if not 0 <= i < rows), None)
        if bad is not None:
            raise InvalidPrompt(f"token id {_shown_id(bad)} is out of range: this model's token ids are 0 to "
                                f"{rows - 1}")

    def check_params(self, params: SamplingParams) -> None:
        """Refuse a ``logit_bias`` on token ids the model has none of (as vLLM does): the bias would be
        dropped without a word."""
        rows = self.vocab_rows()
        bad = sorted(t for t, _ in params.logit_bias if not 0 <= t < rows)
        if bad:
            shown = ", ".join(_shown_id(t) for t in bad[:5])
            raise SamplingError(f"logit_bias names token ids outside this model's vocabulary (0 to {rows - 1}): "
                                f"{shown}{' ...' if len(bad) > 5 else ''}", param="logit_bias")

    def check_prompt_size(self, messages: list[dict[str, str]] | list[int] | str) -> None:
        """Refuse, before tokenizing it (under the replica-wide tokenizer lock), text that cannot fit:
        no token stands for more bytes than the longest vocabulary entry, and a character is at least one
        byte, so more characters than that times the token limit is too long for certain; every message
        of a conversation renders at least one token of its template (its role's markers), so more
        messages than the limit is too long too, whatever their text."""
        if _is_ids(messages):
            return  # token ids: the engine checks them, and their count, where it admits them
        chars = len(messages) if isinstance(messages, str) else sum(len(m.get("content") or "") for m in messages)
        limit = self.prompt_token_limit()
        if chars > limit * self._max_token_bytes():
            raise PromptTooLong(f"the prompt has {chars} characters, more than fit in this engine's {limit} "
                                "tokens")
        if not isinstance(messages, str) and len(messages) > limit:
            raise PromptTooLong(f"the conversation has {len(messages)} messages, more than fit in this engine's "
                                f"{limit} tokens (each message's template takes at least one)")

    def row_state(self, prompt_ids: list[int], params: SamplingParams) -> Any:
        """The per-request state of ``serve/sampling.py`` (None when its sampling needs none)."""
        from adapterfab.serve.sampling import Guide, GuideTokenizer, RowState, needs_processing

        if not needs_processing(params):
            return None
        guide = None
        if params.guide is not None:
            with self._tokenizer_lock:
                tok = getattr(self, "_guide_tok", None)
                if tok is None:
                    tok = self._guide_tok = GuideTokenizer(self.tokenizer, self.eos_ids)
            guide = Guide(tok, params.guide)
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(self.eos_ids))
        return RowState(list(prompt_ids), stops, guide)

    def _token_logprob(self, token: Any) -> TokenLogprob:
        with self._tokenizer_lock:
            text = self.tokenizer.decode([int(token)])
            top = tuple((self.tokenizer.decode([i]), lp) for i, lp in token.top)
        return TokenLogprob(text, token.logprob, top)

    def generate(self, messages: list[dict[str, str]] | list[int] | str, adapter: str | None = None,
                 params: SamplingParams | None = None) -> Iterator[Event]:
        """Text deltas as they decode, then one ``Finished`` with the finish reason and usage. ``messages``:
        a conversation (the chat template), a raw prompt, or prompt token ids."""
        params = params or SamplingParams()
        self.check_prompt_size(messages)
        if _is_ids(messages):
            prompt_ids = [int(i) for i in messages]
        elif isinstance(messages, str):
            prompt_ids = self.encode_text(messages)
        else:
            prompt_ids = self.encode_chat(messages)
        detok, stops = Detokenizer(self.tokenizer), StopMatcher(params.stop)
        n_out, reason = 0, "length"
        pending: list[TokenLogprob] = []  # log-probabilities of tokens whose text is not out yet
        tokens = self.generate_token_ids(prompt_ids, adapter, params)
        try:
            for token in tokens:
                n_out += 1
                if params.ends(token, self.eos_ids):
                    reason = "stop"
                    break
                if params.logprobs is not None:
                    pending.append(self._token_logprob(token))
                # a stop string counts once min_tokens are out (EOS and stop ids are masked until then)
                text = stops.push(detok.add(token), check=n_out > params.min_tokens)
                if text:
                    yield TextDelta(text, tuple(pending), len(prompt_ids), n_out)
                    pending = []
                if stops.stopped:
                    reason = "stop"
                    break
        finally:
            tokens.close()  # releases the engine (lock or batch row) even when the consumer stops early
        tail = stops.push(detok.flush(), check=n_out > params.min_tokens) + stops.flush()
        if stops.stopped:  # the held-back text completed a stop string: a stop, even at max_tokens
            reason = "stop"
        if tail:
            yield TextDelta(tail, tuple(pending), len(prompt_ids), n_out)
        yield Finished(reason, len(prompt_ids), n_out)


def _shown_id(token_id: int) -> str:
    """A token id as an error message shows it: a client may send one thousands of digits long."""
    text = str(token_id)
    return text if len(text) <= 30 else text[:30] + "..."


def _is_ids(prompt: Any) -> bool:
    return isinstance(prompt, list | tuple) and bool(prompt) and all(isinstance(i, int) for i in prompt)


@dataclass(frozen=True)
class ReadFolder:
    """A checked adapter folder, what the tiers keep in their RAM tier for the one-at-a-time engine."""

    folder: Path
    nbytes: int


class Engine(TextGeneration):
    """The base model loaded once, plus named LoRA adapters; ``generate`` streams events."""

    def __init__(self, model_path: str | Path, dtype: str = "float32", device: str = "cpu",
                 torch_threads: int | None = None, max_adapters: int = 32):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch_threads = torch_threads
        self.max_adapters = max_adapters  # adapters loaded at once behind adapter tiers (serve/tiers.py)
        use_torch_threads(torch_threads)
        path = str(Path(model_path).expanduser())
        torch_dtype = getattr(torch, DTYPES.get(dtype, dtype)) if isinstance(dtype, str) else dtype
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if not getattr(self.tokenizer, "chat_template", None):
            raise AdapterfabError(f"the tokenizer in {path} has no chat template; serving needs one")
        self.base = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
        self.model: Any = self.base  # becomes a PeftModel with the first adapter
        self.max_positions = int(getattr(self.base.config, "max_position_embeddings", 0) or 1 << 30)
        self._base_shapes = {k: tuple(v.shape) for k, v in self.base.state_dict().items()}
        self.eos_ids = self.eos_ids_of(self.base)
        self._adapters: dict[str, str] = {}  # public name -> internal peft name (no '.' allowed there)
        self._next_slot = 0
        self._lock = threading.Lock()
        self._tokenizer_lock = threading.Lock()  # fast tokenizers raise "Already borrowed" when shared

    @property
    def busy(self) -> bool:
        """A generation (or an adapter load) holds the engine right now."""
        return self._lock.locked()

    # adapters ---------------------------------------------------------------------------------
    def has_adapter(self, name: str) -> bool:
        return name in self._adapters

    @property
    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def load_adapter(self, name: str, local_dir: str | Path, checked: bool = False) -> None:
        """Load a safetensors LoRA under ``name``; a no-op if ``name`` is already loaded. ``checked``: the
        folder already passed ``read_adapter``'s check (the tiers place what they read)."""
        local_dir = Path(local_dir)
        with self._lock:
            if name in self._adapters:
                return
            if not checked:
                _check_adapter_files(local_dir, self._base_shapes)
            slot = f"a{self._next_slot}"
            self._next_slot += 1
            if self.model is self.base:
                from peft import PeftModel

                self.model = PeftModel.from_pretrained(self.base, str(local_dir), adapter_name=slot).eval()
            else:
                self.model.load_adapter(str(local_dir), adapter_name=slot)
            self._adapters[name] = slot
            log.info("loaded adapter %s from %s", name, local_dir)

    # the adapter tiers' interface (serve/tiers.py), as the batched engine has it ---------------------
    @property
    def free_slots(self) -> int:
        return max(0, self.max_adapters - len(self._adapters))

    def read_adapter(self, local_dir: str | Path, basis: Any = None) -> ReadFolder:
        """Check an adapter folder (a safetensors PEFT LoRA that fits the base) without loading it."""
        local_dir = Path(local_dir)
        _check_adapter_files(local_dir, self._base_shapes)
        return ReadFolder(local_dir, sum(f.stat().st_size for f in local_dir.iterdir() if f.is_file()))

    def place(self, name: str, read: ReadFolder) -> None:
        """Load the folder ``read_adapter`` checked; FileNotFoundError when it is gone since (a disk cache
        trim of another replica sharing the folder: serve.backend.DiskCache), for the tiers to read again."""
        if not (read.folder / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{read.folder} was removed after it was read")
        self.load_adapter(name, read.folder, checked=True)

    def in_use(self, name: str) -> int:
        """Generations hold the engine's lock one at a time; the tiers' pins keep a used adapter loaded."""
        return 0

    def unload_adapter(self, name: str) -> None:
        """Free an adapter's weights; a no-op if it is not loaded (eviction may call this twice)."""
        with self._lock:
            slot = self._adapters.pop(name, None)
            if slot is None:
                return
            self.model.delete_adapter(slot)
            if not self._adapters:  # peft cannot run with zero adapters: go back to the bare base
                self.model = self.model.unload()
            log.info("unloaded adapter %s", name)

    def _adapter_context(self, adapter: str | None) -> Any:
        if adapter is None:
            return self.model.disable_adapter() if self.model is not self.base else nullcontext()
        slot = self._adapters.get(adapter)
        if slot is None:
            raise AdapterNotLoaded(f"adapter {adapter} is not loaded")
        self.model.set_adapter(slot)
        return nullcontext()

    # generation -------------------------------------------------------------------------------
    def prompt_token_limit(self) -> int:
        return self.max_positions - 1

    def generate_token_ids(self, prompt_ids: list[int], adapter: str | None,
                           params: SamplingParams) -> Iterator[int]:
        """Sampled token ids, one per decode step (KV cache), ending at EOS or max_tokens. Holds the
        engine lock while it runs: drain or close it."""
        import torch

        use_torch_threads(self.torch_threads)  # the caller's thread (adapterfab/threads.py)
        self.check_token_ids(prompt_ids)
        self.check_params(params)
        if len(prompt_ids) >= self.max_positions:
            raise PromptTooLong(f"the prompt has {len(prompt_ids)} tokens; this model takes at most "
                                f"{self.max_positions - 1}")
        budget = params.budget(len(prompt_ids), self.max_positions)
        state = self.row_state(prompt_ids, params)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed_of(params))
        with self._lock, torch.inference_mode():
            with self._adapter_context(adapter):
                ids = torch.tensor([prompt_ids], device=self.device)
                past = None
                for _ in range(budget):
                    out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                    past = out.past_key_values
                    token = sample(out.logits[0, -1], params, gen, state)
                    yield token
                    if params.ends(token, self.eos_ids):
                        return
                    ids = torch.tensor([[token]], device=self.device)


def seed_of(params: SamplingParams) -> int:
    """The generator seed of a request: its own (any integer, folded into torch's 64-bit range) or random."""
    return params.seed % (1 << 64) if params.seed is not None else random.getrandbits(63)
