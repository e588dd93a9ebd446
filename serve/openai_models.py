"""The OpenAI request bodies the API takes, as vLLM's server takes them.

Every field a client may send is accepted. What the engine implements is honoured (roles system,
developer, user and assistant; text content parts; n; logprobs/top_logprobs; presence, frequency and
repetition penalties; logit_bias; top_k; min_p; min_tokens; stop and stop_token_ids; seed; echo;
batched prompts; structured output through ``response_format`` and vLLM's ``guided_*`` fields). What
it cannot do with a value that matters (tools, images, beam search, ``suffix``...) is a 400 naming the
field. Fields nobody here knows are ignored, logged and named in the ``X-Adapterfab-Ignored-Fields``
response header (vLLM ignores them with a warning in its log).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adapterfab.ids import is_decimal
from adapterfab.serve.engine import SamplingParams

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256  # per stop string: each one is matched against the output's tail at every token
MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # choices per request (prompts × n)
MAX_TOP_LOGPROBS = 20
# token ids in a request's logit_bias and in its stop_token_ids: both are edited into its row of the shared
# batch on the host at every step (and stop ids are scanned per token), so one request's 49k-entry bias made
# every other tenant's tokens 5x slower on the tiny model (2026-12). OpenAI takes 300 bias entries
MAX_TOKEN_ID_ENTRIES = 1024
# a structured output's schema, regex, grammar or choices, as text: building its grammar runs before any
# generation (a 400 for a bad one), and a 440 KB choice list took 1.2 s of the ingress (2026-12-07)
MAX_GUIDE_CHARS = 32 * 1024
MAX_GUIDED_CHOICES = 1000
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")  # vLLM's structured outputs
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)  # a 64-bit integer, as vLLM's server takes it
# a logit is divided or multiplied by the repetition penalty in float32: past these bounds a penalty rounds
# to inf or 0 there (1e39 is inf), and 0 × inf made a row of logits NaN. vLLM takes any value above 0; the
# useful ones lie near 1 (1.1 to 1.3 typically)
REPETITION_PENALTY_RANGE = (0.01, 100.0)
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for a completions request that names no max_tokens


class FieldError(ValueError):
    """A request field this server cannot honour: answered 400 with ``param`` set to ``field``."""

    def __init__(self, field: str, message: str, code: str = "unsupported_parameter"):
        super().__init__(message)
        self.field, self.code = field, code


def _encodable(text: str) -> str:
    """JSON may carry lone surrogates (``"\\ud800"``) that no tokenizer takes: refuse them as a 400."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds an unpaired UTF-16 surrogate; send valid Unicode") from None
    return text


def _printable(name: str) -> str:
    shown = json.dumps(str(name), ensure_ascii=True)[1:-1]
    return shown if len(shown) <= 100 else shown[:100] + "..."


class _Open(BaseModel):
    """A body part that takes fields it does not know (they are reported, not refused)."""

    model_config = ConfigDict(extra="allow")

    def ignored(self, prefix: str = "") -> list[str]:
        """The names of the fields ignored here and below, each as printable ASCII (JSON's escapes, at
        most 100 characters): they go into a response header and the log, where a raw CR/LF or a
        non-Latin-1 character would break the response or forge a log line."""
        out = [f"{prefix}{_printable(k)}" for k in (self.model_extra or {})]
        for name in type(self).model_fields:
            value = getattr(self, name)
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if isinstance(item, _Open):
                    at = f"{prefix}{name}.{i}." if isinstance(value, list) else f"{prefix}{name}."
                    out += item.ignored(at)
        return out


class ContentPart(_Open):
    type: str
    text: str | None = None


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    # no ``name``: the chat template renders no speaker names, so a message's name is reported as ignored
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: str | list[ContentPart] | None) -> str | list[ContentPart] | None:
        if isinstance(v, str):
            _encodable(v)
        for part in v if isinstance(v, list) else []:
            _encodable(part.text or "")
        return v

    def text(self, at: str) -> str:
        """The message's text: a string, or its text parts joined by newlines (as vLLM joins them)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for j, part in enumerate(self.content):
            if part.type != "text":
                raise FieldError(f"{at}.content.{j}", f"This model takes text only; a content part of type "
                                 f"'{part.type}' cannot be read.")
            if part.text is None:
                raise FieldError(f"{at}.content.{j}.text", "A text content part needs 'text'.", "invalid_value")
            texts.append(part.text)
        return "\n".join(texts)


class StreamOptions(_Open):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(_Open):
    name: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _GenerationRequest(_Open):
    """What chat and text completions share: sampling, stops, streaming, choices."""

    model: str = Field(min_length=1, max_length=300)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, ge=REPETITION_PENALTY_RANGE[0], le=REPETITION_PENALTY_RANGE[1])
    logit_bias: dict[str, float] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_TOKEN_ID_ENTRIES)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=MAX_N)
    best_of: int | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    user: str | None = Field(None, max_length=256)
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    use_beam_search: bool = False
    echo: bool | None = False  # OpenAI's completions take null (false)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters")
        for s in stops:
            _encodable(s)
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None and len(v) > MAX_TOKEN_ID_ENTRIES:
            raise ValueError(f"at most {MAX_TOKEN_ID_ENTRIES} logit_bias entries, not {len(v)}")
        for k, b in (v or {}).items():
            if not is_decimal(k) or len(k) > 20:  # ASCII digits: str.isdigit takes "²", which int() refuses
                raise ValueError(f"logit_bias keys are token ids, not {k[:40]!r}")
            if not -100 <= b <= 100:
                raise ValueError(f"a logit bias lies in [-100, 100], not {b}")
        return v

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    def _check_common(self) -> None:
        if self.use_beam_search:
            raise FieldError("use_beam_search", "Beam search is not supported; sample n choices instead.")
        if self.best_of is not None and self.best_of != self.choices_per_prompt:
            raise FieldError("best_of", "best_of other than n is not supported.")

    def guide(self) -> tuple[str, str] | None:
        """The structured-output constraint as ``(kind, spec)`` (``serve/sampling.py``), or None; at most
        ``MAX_GUIDE_CHARS`` of spec text and ``MAX_GUIDED_CHOICES`` choices."""
        got = self._guide()
        if self.guided_choice is not None and not self.guided_choice:  # its grammar would take only ""
            raise FieldError("guided_choice", "guided_choice needs at least one choice.", "invalid_value")
        if self.guided_choice is not None and len(self.guided_choice) > MAX_GUIDED_CHOICES:
            raise FieldError("guided_choice", f"At most {MAX_GUIDED_CHOICES} choices.", "invalid_value")
        if got is not None and len(got[1]) > MAX_GUIDE_CHARS:
            raise FieldError(self.guide_field(), f"The structured output's specification is {len(got[1]):,} "
                             f"characters; at most {MAX_GUIDE_CHARS:,} are taken.", "invalid_value")
        return got

    def guide_field(self) -> str:
        """The request's field that carries its structured output (for an error's ``param``)."""
        return next((n for n in GUIDED_FIELDS if getattr(self, n) is not None), "response_format")

    def _guide(self) -> tuple[str, str] | None:
        given = [name for name in GUIDED_FIELDS if getattr(self, name) is not None]
        rf = self.response_format
        if rf is not None and rf.type != "text":
            given.append("response_format")
        if len(given) > 1:
            raise FieldError(given[1], f"Ask for one structured output at a time, not {' and '.join(given)}.",
                             "invalid_value")
        if rf is not None and rf.type == "json_object":
            return ("json_object", "")
        if rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise FieldError("response_format.json_schema.schema", "A json_schema response format needs "
                                 "its schema.", "invalid_value")
            return ("json_schema", json.dumps(rf.json_schema.schema_))
        if self.guided_json is not None:
            spec = self.guided_json if isinstance(self.guided_json, str) else json.dumps(self.guided_json)
            return ("json_schema", spec)
        if self.guided_regex is not None:
            return ("regex", self.guided_regex)
        if self.guided_choice is not None:
            return ("lark", "start: " + " | ".join(json.dumps(c) for c in self.guided_choice))
        if self.guided_grammar is not None:
            return ("lark", self.guided_grammar)
        return None

    def _params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, stop=tuple(stops), seed=self.seed,
            top_k=max(0, self.top_k or 0), min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias=tuple(sorted((int(k), float(b)) for k, b in (self.logit_bias or {}).items())),
            stop_token_ids=tuple(self.stop_token_ids or ()), min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos, logprobs=logprobs, guide=self.guide())


class ChatRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them (developer is the system role); a 400 naming
        the field for what this server cannot do."""
        self._check_common()
        if self.tools or self.functions:
            field = "tools" if self.tools else "functions"
            raise FieldError(field, "Tool calling is not supported: the base model's chat template has no "
                             "tools. Send the request without tools.")
        if self.tool_choice not in (None, "none", "auto"):
            raise FieldError("tool_choice", "tool_choice needs tools, which this server does not support.")
        if self.function_call not in (None, "none", "auto"):
            raise FieldError("function_call", "function_call needs functions, which this server does not support.")
        if self.modalities is not None and set(self.modalities) - {"text"}:
            raise FieldError("modalities", "This model answers in text only.")
        if self.audio is not None:
            raise FieldError("audio", "This model answers in text only.")
        if self.prediction is not None:
            raise FieldError("prediction", "Predicted outputs are not supported.")
        if not self.add_generation_prompt or self.continue_final_message:
            field = "add_generation_prompt" if not self.add_generation_prompt else "continue_final_message"
            raise FieldError(field, "Only a new assistant turn is supported (add_generation_prompt true, "
                             "continue_final_message false).")
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs needs logprobs true.", "invalid_value")
        out = []
        for i, m in enumerate(self.messages):
            if m.role in ("tool", "function"):
                raise FieldError(f"messages.{i}.role", f"A '{m.role}' message needs tool calling, which this "
                                 "server does not support.")
            if m.tool_calls:
                raise FieldError(f"messages.{i}.tool_calls", "Tool calls are not supported.")
            out.append({"role": "system" if m.role == "developer" else m.role, "content": m.text(f"messages.{i}")})
        return out

    def sampling(self, default_max_tokens: int | None) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._params(self.max_completion_tokens or self.max_tokens or default_max_tokens, logprobs)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def echo_text(self) -> str:
        """vLLM's chat ``echo``: the last message's text, when it is the assistant's (the reply continues it)."""
        last = self.messages[-1]
        return last.text(f"messages.{len(self.messages) - 1}") if self.echo and last.role == "assistant" else ""


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: raw prompts (no chat template): a string, a list of strings, token ids
    or a list of token id lists; ``n`` choices each, indexed prompt by prompt."""

    prompt: str | list[str] | list[int] | list[list[int]]
    # unset: COMPLETIONS_MAX_TOKENS (within the operator's cap); null: the rest of the context
    max_tokens: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    prompt_logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: Any) -> Any:
        prompts = [v] if isinstance(v, str) or (v and isinstance(v[0], int)) else v
        if not prompts:
            raise ValueError("the prompt is empty")
        for p in prompts:
            if not p:
                raise ValueError("the prompt is empty")
            if isinstance(p, str):
                _encodable(p)
            elif any(i < 0 for i in p):
                raise ValueError("token ids are non-negative")
        return v

    def prompts(self) -> list[str | list[int]]:
        self._check_common()
        if self.suffix:
            raise FieldError("suffix", "suffix is not supported.")
        if self.prompt_logprobs:
            raise FieldError("prompt_logprobs", "prompt_logprobs is not supported.")
        if self.echo and self.logprobs is not None:
            raise FieldError("echo", "echo with logprobs would need the prompt's log-probabilities, which are "
                             "not supported; ask for one or the other.")
        if self.echo and not (isinstance(self.prompt, str) or all(isinstance(x, str) for x in self.prompt)):
            raise FieldError("echo", "echo repeats text prompts; with token-id prompts it is not supported (the "
                             "ids are yours to decode).")
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)  # type: ignore[list-item]

    def sampling(self, default_max_tokens: int | None) -> SamplingParams:
        """``default_max_tokens``: the operator's cap. A request that names no max_tokens gets OpenAI's
        default, lowered to the cap (it asked for nothing the cap could refuse); ``null`` runs to the end of the
        context, within the cap."""
        if "max_tokens" not in self.model_fields_set:
            cap = default_max_tokens
            return self._params(COMPLETIONS_MAX_TOKENS if cap is None else min(COMPLETIONS_MAX_TOKENS, cap),
                                self.logprobs)
        return self._params(self.max_tokens or default_max_tokens, self.logprobs)

    @property
    def requested_max_tokens(self) -> int | None:
        """What the client asked for (None when it named none): only that is held against the cap."""
        return self.max_tokens
