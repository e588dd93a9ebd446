"""The batch spec (YAML, ``version: 1``): what a user submits.

    version: 1
    name: personas-demo
    base_model: smollm2-135m-instruct      # short name, HF id, local path or s3://
    promote: auto                          # none | auto: eval-gated, see `promotion`
    promotion: {metric: eval_loss, margin: 0.0, relative_margin: 0.0}
    defaults:
      method: {name: lora, r: 8, alpha: 16, target_modules: [q_proj, v_proj]}
      train: {steps: 40, batch_size: 8, learning_rate: 1.0e-3}
    tenants:
      - {tenant: acme, persona: pirate, dataset: data/pirate.jsonl}
      - {tenant: globex, persona: robot, dataset: s3://bucket/robot.parquet, train: {steps: 60}}

``parse_spec`` checks the schema (pydantic, unknown keys refused) and ``spec_checks.semantic_problems``
what needs the outside world (datasets readable, base model resolvable) — both before any compute is
spent (``jobs/admission.admit`` runs it with the planner).
Relative dataset paths are resolved against the spec file's folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from adapterfab.dtypes import resolve_auto
from adapterfab.errors import InvalidId, SpecError
from adapterfab.ids import check_id
from adapterfab.methods import MethodConfig, get_method, known_methods

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
# a dataset's suffix -> its format (the data stage's parser: adapterfab.pipelines.rows PARSERS)
DATASET_FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}
DATASET_SUFFIXES = tuple(DATASET_FORMATS)
DATASET_NAME_RULE = f"must end in one of {', '.join(DATASET_SUFFIXES)} after a file name ('.jsonl' alone has none)"
DATASET_SCHEMES = ("s3", "file")
MAX_DATASET_CHARS = 4096  # PATH_MAX: a longer path cannot name a file anyway


def dataset_format(name: str) -> str | None:
    """The format of the dataset ``name`` (a path or URI) by its last component's suffix, any case, or None.
    The spec, the data stage and the local reader all decide with this, so none reads a file another
    refuses: a name that is only a suffix has none to ``os.path.splitext``, so ``.jsonl`` is refused."""
    stem, ext = os.path.splitext(name.rsplit("/", 1)[-1])
    return DATASET_FORMATS.get(ext.lower()) if stem else None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last one, so a
    second ``tenants:`` would silently drop every job of the first). The keys are checked as written,
    on the composed document before anything is built: merge keys (``<<: *defaults``) are expanded only
    later, and the keys beside them override them, as YAML says."""

    def construct_document(self, node: yaml.Node) -> Any:
        _unique_keys(node, set())
        return super().construct_document(node)


def _unique_keys(node: yaml.Node, seen_nodes: set[int]) -> None:
    if id(node) in seen_nodes:  # an alias: the node was checked where it was anchored
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], int] = {}
        for key, value in node.value:  # a merge key (<<) may stand twice: the keys it brings are not checked
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if (key.tag, key.value) in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key.value!r} appears twice in one mapping (lines "
                        f"{first[key.tag, key.value]} and {line}); give it once", key.start_mark)
                first[key.tag, key.value] = line
            _unique_keys(key, seen_nodes)
            _unique_keys(value, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _unique_keys(item, seen_nodes)


class TrainConfig(_Strict):
    """Training hyper-parameters of one job. Every field has a default; a tenant entry overrides some."""

    steps: int = Field(40, ge=1, le=1_000_000, description="optimizer steps")
    batch_size: int = Field(8, ge=1, le=4096, description="rows per optimizer step")
    learning_rate: float = Field(1e-3, gt=0, le=1.0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_seq_len: int = Field(256, ge=16, le=131072, description="tokens; longer rows are truncated")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of rows held out for eval")
    max_bad_row_fraction: float = Field(
        0.1, ge=0.0, le=1.0, description="a dataset with a larger share of malformed rows fails its job"
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="the numpy and torch generators' range")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bfloat16 on a GPU or a CPU with bf16 arithmetic, else float32 "
        "(adapterfab/dtypes.py)")
    log_every_steps: int = Field(1, ge=1)
    checkpoint_every: int = Field(25, ge=0, description="steps between training checkpoints; a worker "
                                  "that dies resumes from the last one (0: never)")
    replay_weight: float = Field(0.0, ge=0.0, le=100.0, description="weight of replay, which keeps what the "
                                 "base knew: KL(base || adapter) on the base's own answers to general prompts "
                                 "after the persona's openings (adapterfab/replay.py); 0: off")
    replay_per_step: int = Field(1, ge=1, le=64, description="replayed answers per job and step")


class Resources(_Strict):
    cpus_per_job: float = Field(1.0, gt=0)
    gpus_per_job: float = Field(0.0, ge=0)
    max_concurrent_jobs: int | None = Field(None, ge=1, description="default: what the cluster fits")
    fuse: bool = Field(True, description="train compatible jobs together over one resident base "
                                         "(same method family, rank, modules, dtype; no dropout)")
    device_memory_gb: float | None = Field(
        None, gt=0, description="memory one training worker may use (a GPU's memory, or its share of RAM "
        "on CPU); a job whose estimate exceeds it runs on several workers with DeepSpeed ZeRO. None: no limit")
    max_workers_per_job: int = Field(8, ge=1, le=64, description="the most data-parallel workers the "
                                     "planner gives one job")
    workers_per_job: int | None = Field(None, ge=1, le=64, description="force this many data-parallel "
                                        "workers (DeepSpeed ZeRO) for every job; None: the planner decides")
    zero_stage: Literal["auto", 2, 3] = Field("auto", description="ZeRO stage of multi-worker jobs: 2 "
                                              "shards optimizer state and gradients, 3 also the weights")
    train_gflops_per_cpu: float = Field(50.0, gt=0, description="the rate a CPU training step achieves, for "
                                        "the time estimate (measured on a 2-core x86 machine, SmolLM2 LoRA)")
    train_tflops_per_gpu: float = Field(50.0, gt=0, description="the rate a GPU training step achieves, for "
                                        "the time estimate (an H100 in the fused QLoRA step, 2026-11-23)")
    trainer_keep_warm_s: float = Field(120.0, ge=0, le=86400, description="how long a resident trainer "
                                       "(base loaded, device held) waits idle for the next batch on the same "
                                       "base before it frees its device")


class Promotion(_Strict):
    """The gate of ``promote: auto``: a new version becomes production only if its ``metric`` beats the
    base model and the current production version by more than max(margin, relative_margin * |ref|)."""

    metric: Literal["eval_loss", "eval_token_accuracy"] = "eval_loss"
    margin: float = Field(0.0, ge=0.0, description="absolute improvement required")
    relative_margin: float = Field(0.0, ge=0.0, lt=1.0, description="improvement required, as a fraction")
    min_retention: float = Field(0.9, ge=0.0, le=1.0, description="the share of the probe facts the base "
                                 "states that the adapter must still state (adapterfab/retention.py); 0: no check")

    def policy(self) -> Any:
        from adapterfab.promotion import Policy

        return Policy(self.metric, self.margin, self.relative_margin, self.min_retention)


MAX_PROBES = 200  # a tenant's own retention probes per entry


class Probe(_Strict):
    """A fact the base model knows, asked of every adapter to measure what it kept: an answer states
    the fact when it contains one of ``answers`` (any case, starting at a word)."""

    question: str = Field(min_length=1, max_length=1000)
    answers: tuple[str, ...] = Field(min_length=1, max_length=20)

    @field_validator("answers")
    @classmethod
    def _answers(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not a.strip() or len(a) > 200 for a in v):
            raise ValueError("each accepted answer must be 1 to 200 characters, not blank")
        return v


class Defaults(_Strict):
    method: dict[str, Any] = Field(default_factory=lambda: {"name": "lora"})
    train: dict[str, Any] = Field(default_factory=dict)


class TenantEntry(_Strict):
    tenant: str
    persona: str
    dataset: str
    method: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    probes: list[Probe] = Field(default_factory=list, max_length=MAX_PROBES, description="the tenant's own "
                                "retention probes, asked with the shipped ones (adapterfab/retention.py)")

    @field_validator("tenant", "persona")
    @classmethod
    def _valid_id(cls, v: str, info: Any) -> str:
        try:
            return check_id(v, info.field_name)
        except InvalidId as e:
            raise ValueError(str(e)) from None

    @field_validator("dataset")
    @classmethod
    def _dataset_form(cls, v: str) -> str:
        if not v or not v.strip():
            raise ValueError("dataset is empty: give a .jsonl or .parquet path or s3:// URI")
        problem = _uri_problem(v, "dataset")
        if problem:
            raise ValueError(problem)
        if "://" in v and v.partition("://")[0] not in DATASET_SCHEMES:
            raise ValueError(f"dataset scheme {v.partition('://')[0][:20]!r} is not supported; use a local "
                             "path, file:// or s3://")
        if dataset_format(v) is None:
            raise ValueError(f"dataset {v!r} {DATASET_NAME_RULE}")
        return v


def _uri_problem(v: str, what: str) -> str | None:
    """What is wrong with the form of a path or URI given as ``what``, or None: empty, too long, control
    characters, or credentials written into an s3:// URI (said without echoing it: it holds a secret)."""
    if not v or not v.strip():
        return f"{what} is empty"
    if len(v) > MAX_DATASET_CHARS:
        return f"{what} is {len(v):,} characters long; at most {MAX_DATASET_CHARS} are allowed"
    if any(ord(c) < 32 or ord(c) == 127 for c in v):
        return f"{what} holds control characters; give a plain path or URI"
    if "://" in v:
        _, _, rest = v.partition("://")
        authority, before_at = rest.split("/", 1)[0], rest.split("@", 1)[0] if "@" in rest else ""
        # A secret key may hold '/': "key:secret@" is looked for before any '@', not in the bucket only.
        if "@" in authority or ":" in before_at:
            return (f"the {what} URI holds credentials (user:secret@); remove them and set AWS_* in the "
                    "environment instead")
    return None


class BatchSpec(_Strict):
    version: Literal[1]
    name: str = Field(min_length=1, max_length=200)
    base_model: str = DEFAULT_BASE_MODEL
    promote: Literal["none", "auto"] = "none"
    promotion: Promotion = Field(default_factory=Promotion)
    defaults: Defaults = Field(default_factory=Defaults)
    resources: Resources = Field(default_factory=Resources)
    tenants: list[TenantEntry] = Field(min_length=1)

    @field_validator("base_model")
    @classmethod
    def _base_form(cls, v: str) -> str:
        problem = _uri_problem(v, "base_model")
        if problem:
            raise ValueError(problem)
        if "://" in v and not v.startswith("s3://"):
            raise ValueError(f"base_model scheme {v.partition('://')[0][:20]!r} is not supported; use a short "
                             "name, a Hugging Face id, a local folder or s3://")
        return v

    @model_validator(mode="after")
    def _unique_jobs(self) -> BatchSpec:
        seen: set[tuple[str, str]] = set()
        for i, t in enumerate(self.tenants):
            if (t.tenant, t.persona) in seen:
                raise ValueError(f"tenants[{i}]: {t.tenant}/{t.persona} appears twice; one entry per persona")
            seen.add((t.tenant, t.persona))
        return self


class JobSpec(BaseModel):
    """One resolved job: a tenant entry merged over the defaults, dataset path made absolute."""

    model_config = ConfigDict(frozen=True)
    tenant: str
    persona: str
    dataset: str
    method: MethodConfig
    train: TrainConfig
    probes: tuple[Probe, ...] = ()


def _merge_method(default: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    if not override:
        return dict(default)
    if "name" in override and override["name"] != default.get("name"):
        return dict(override)  # a different method: its own parameters only
    return {**default, **override}


def _method_config(raw: dict[str, Any], where: str) -> MethodConfig:
    name = raw.get("name")
    if name not in known_methods():
        raise SpecError([(f"{where}.name", f"unknown method {name!r}; use one of: {', '.join(known_methods())}")])
    try:
        return get_method(name).config_cls(**raw)
    except ValidationError as e:
        raise SpecError(_problems(e, where)) from None


def _problems(e: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for err in e.errors():
        at, msg = err["loc"], err["msg"].removeprefix("Value error, ")
        if at[-1:] == ("[key]",):  # a mapping's key that is no string: the mapping is the field (pydantic
            at, msg = at[:-2], "a key must be a string"  # shows the bool key True as 1 in the location)
        loc = ".".join(str(p) for p in at)
        field = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or "(spec)")
        if not loc and msg.startswith("tenants[") and "]: " in msg:  # a whole-spec check naming its entry
            field, msg = msg.split(": ", 1)
        got = err.get("input")
        if err["type"] == "string_type" and (isinstance(got, bool | int | float)
                                             or type(got).__name__ in ("date", "datetime")):
            shown = got if isinstance(got, bool | int | float) else str(got)
            msg += f" (YAML read this as the {type(got).__name__} {shown}: put it in quotes)"
        if err["type"] == "extra_forbidden":
            msg = f"unknown key {err['loc'][-1]!r}; remove it or check its spelling"
        elif err["type"] == "missing":
            msg = "required field is missing"
        out.append((field, msg))
    return out


def _resolve_dataset(dataset: str, root: Path | None) -> str:
    """The dataset's absolute path, its folder's links followed but not the file's own: the format comes
    from the name written, which a link to a suffix-less blob (Hugging Face cache, DVC) must keep."""
    if dataset.startswith("s3://"):
        return dataset
    p = Path(dataset.removeprefix("file://")).expanduser()
    if not p.is_absolute() and root is not None:
        p = root / p
    try:
        return str(p.parent.resolve() / p.name)
    except (OSError, RuntimeError):  # a symlink loop: spec_checks reports the path as unreadable
        return os.path.abspath(p)


def _resolve_base(name: str, root: Path | None) -> str:
    """A base model given as a relative folder is found against the spec file's folder, as datasets
    are (not against wherever the command runs): ``./mybase``, ``../models/x``, or a bare relative name
    whose folder holds a config.json there. Short names, Hugging Face ids and s3:// stay as they are."""
    if root is None or "://" in name or name.startswith(("/", "~")):
        return name
    p = root / name
    if name.startswith(".") or (p / "config.json").is_file():
        with contextlib.suppress(OSError, RuntimeError):
            return str(p.resolve())
        return os.path.abspath(p)
    return name


def _job_problems(promote: str, checked: dict[int, tuple[MethodConfig, TrainConfig]],
                  own: dict[int, dict[str, Any]]) -> list[tuple[str, str]]:
    """Settings that pass each field's own check but would make a job pointless. A problem the entries
    only inherit (their own ``train`` sets neither field) is said once at ``defaults.train`` when every
    such entry has it; when only some do (warmup_steps from defaults.train is fine for lora's default 30
    steps, not for qlora's 20) it is said at each of those entries, which is where the fix goes."""
    inheriting = [i for i in checked if not {"warmup_steps", "steps"} & set(own[i])]
    everywhere = all(checked[i][1].warmup_steps >= checked[i][1].steps for i in inheriting)
    out = []
    for i, (method, train) in checked.items():
        where = f"tenants[{i}]"
        if train.warmup_steps >= train.steps:
            at = "defaults" if i in inheriting and everywhere else where
            why = (f" (both come from defaults.train and the {method.name} method's defaults; set this "
                   "entry's train.steps or train.warmup_steps)" if i in inheriting and not everywhere else "")
            out.append((f"{at}.train.warmup_steps", f"warmup_steps ({train.warmup_steps}) must be below steps "
                        f"({train.steps}): the learning rate would never reach train.learning_rate{why}"))
        if promote == "auto" and train.eval_fraction == 0:
            at = where if "eval_fraction" in own[i] else "defaults"
            out.append((f"{at}.train.eval_fraction", "promote: auto gates on the held-out eval, and "
                        "eval_fraction 0 holds out no rows, so no version could be promoted; give an "
                        "eval_fraction above 0 or promote: none"))
    return out


def _own(field: str, prefix: str, own: dict[str, Any]) -> bool:
    """Whether a problem at ``field`` is about a key in ``own``, the block at ``prefix`` (e.g. tenants[0].train)."""
    return field.startswith(prefix + ".") and field[len(prefix) + 1:].split(".")[0] in own


def _check_jobs(d_method: dict[str, Any], d_train: dict[str, Any] | None,
                entries: list[tuple[int, dict[str, Any], dict[str, Any]]], promote: str,
                ) -> tuple[list[tuple[str, str]], dict[int, tuple[MethodConfig, TrainConfig]]]:
    """(problems, {index: (method, train)} of the entries that pass): each entry's (index, method, train)
    merged over the defaults. A bad default is said where it is written, at an entry only for a key the
    entry sets itself (``d_train`` None: the schema refused it; entries are checked for their own keys)."""
    problems: list[tuple[str, str]] = []
    bad_method: list[tuple[str, str]] = []
    try:
        _method_config(d_method, "defaults.method")
    except SpecError as e:
        problems += (bad_method := e.problems)
    bad_defaults = d_train is None
    try:
        TrainConfig(**(d_train or {}))
    except ValidationError as e:
        problems += _problems(e, "defaults.train")
        bad_defaults = True
    checked: dict[int, tuple[MethodConfig, TrainConfig]] = {}
    for i, own_method, own_train in entries:
        where, method = f"tenants[{i}]", None
        try:
            method = _method_config(_merge_method(d_method, own_method), f"{where}.method")
        except SpecError as e:  # what the entry only inherits from defaults.method is said once, above
            problems += [p for p in e.problems if _own(p[0], f"{where}.method", own_method)
                         or (p[0].replace(f"{where}.method", "defaults.method", 1), p[1]) not in bad_method]
        try:  # checked with a bad method too: a method's training defaults are valid values, no field's problem
            train = TrainConfig(**{**(get_method(method.name).default_train if method else {}), **(d_train or {}),
                                   **own_train})
        except ValidationError as e:  # a bad defaults.train value is said once, above, not per entry
            problems += [p for p in _problems(e, f"{where}.train")
                         if not bad_defaults or _own(p[0], f"{where}.train", own_train)]
            continue
        if method is not None:
            checked[i] = (method, train)
    own = {i: own_train for i, _, own_train in entries}
    return problems + _job_problems(promote, checked, own), checked


def _mapping(raw: Any) -> dict[str, Any] | None:
    """A raw mapping's string keys (the schema reports others: YAML reads ``yes:`` as True), or None."""
    return {k: v for k, v in raw.items() if isinstance(k, str)} if isinstance(raw, dict) else None


def _raw_job_problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    """The defaults' and entries' methods and trains, checked as written when the schema refuses the spec, so
    one run says every problem. A part that is no mapping, and what merges with it, is left to its schema error."""
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        return []
    d_method = _mapping(defaults.get("method", {"name": "lora"}))
    d_train = _mapping(defaults.get("train", {}))
    tenants, entries = data.get("tenants"), []
    for i, t in enumerate(tenants if isinstance(tenants, list) and d_method is not None else []):
        own_method, own_train = (_mapping({} if t.get(k) is None else t.get(k)) if isinstance(t, dict) else None
                                 for k in ("method", "train"))
        if own_method is not None and own_train is not None:
            entries.append((i, own_method, own_train))
    promote = "auto" if data.get("promote") == "auto" else "none"
    return _check_jobs({"name": "lora"} if d_method is None else d_method, d_train, entries, promote)[0]


def parse_spec(data: dict[str, Any] | str, root: Path | None = None) -> tuple[BatchSpec, list[JobSpec]]:
    """Validate a spec (a dict or YAML text) and resolve its jobs. Raises SpecError naming each field."""
    if isinstance(data, str):
        try:
            data = yaml.load(data, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as e:
            raise SpecError([("(yaml)", f"not valid YAML: {e}")]) from None
    if not isinstance(data, dict):
        raise SpecError([("(spec)", "the spec must be a YAML mapping with version, name and tenants")])
    try:
        spec = BatchSpec(**data)
    except ValidationError as e:
        raise SpecError(list(dict.fromkeys(_problems(e) + _raw_job_problems(data)))) from None
    except TypeError as e:
        raise SpecError([("(spec)", str(e))]) from None

    resolved = _resolve_base(spec.base_model, root)
    if resolved != spec.base_model:
        spec = spec.model_copy(update={"base_model": resolved})
    entries = [(i, t.method or {}, t.train or {}) for i, t in enumerate(spec.tenants)]
    problems, checked = _check_jobs(spec.defaults.method, spec.defaults.train, entries, spec.promote)
    if problems:
        raise SpecError(list(dict.fromkeys(problems)))
    jobs: list[JobSpec] = []
    for i, t in enumerate(spec.tenants):
        method, train = resolve_auto(*checked[i], gpu=spec.resources.gpus_per_job > 0)
        jobs.append(JobSpec(tenant=t.tenant, persona=t.persona, dataset=_resolve_dataset(t.dataset, root),
                            method=method, train=train, probes=tuple(t.probes)))
    return spec, jobs


def load_spec(path: str | Path) -> tuple[BatchSpec, list[JobSpec], str]:
    """Read a spec file; returns (spec, jobs, raw text)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([("(file)", f"spec file {str(p)!r} does not exist")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError([("(file)", f"cannot read spec file {str(p)!r}: {e}")]) from None
    spec, jobs = parse_spec(text, root=p.resolve().parent)
    return spec, jobs, text


def spec_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
