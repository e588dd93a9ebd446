"""The batch spec's checks that touch the outside world but run no compute (``adapterfab.spec`` checks
its schema): datasets under the allowed data roots, present and readable; the base model resolvable; each
job's ``target_modules`` (and LoRA-XS's rank) against the layers the base has."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from adapterfab.errors import SpecError
from adapterfab.spec import BatchSpec, JobSpec


def outside_data_roots(dataset: str, roots: tuple[str, ...]) -> bool:
    """Whether a resolved dataset (an absolute path or s3:// URI) lies outside every allowed root
    (local folders, ``s3://bucket[/prefix]``); no roots allow everything."""
    if not roots:
        return False
    if dataset.startswith("s3://"):
        if any(part in (".", "..") for part in dataset[len("s3://"):].split("/")):
            return True  # S3 keeps them literally, other readers do not: never trust them under a root
        return not any(dataset.startswith(r.rstrip("/") + "/") for r in roots if r.startswith("s3://"))
    try:  # where the file really is: a link inside a root to a file outside it is outside
        path = Path(dataset).resolve()
    except (OSError, RuntimeError):  # a symlink loop: reported as unreadable, judged by its name here
        path = Path(os.path.abspath(dataset))
    return not any(path.is_relative_to(Path(r.removeprefix("file://")).expanduser().resolve())
                   for r in roots if not r.startswith("s3://"))


def _local_dataset_problem(p: Path) -> str | None:
    """What is wrong with a local dataset file, or None. An OS error (a name too long, a loop of links)
    is a problem like any other, never a crash."""
    try:
        if not p.exists():
            return ("does not exist; check the path (relative paths are resolved against the spec file's "
                    "folder)")
        if not p.is_file():
            return "is not a file"
        with p.open("rb") as f:
            f.read(1)
        if p.stat().st_size == 0:
            return "is empty"
    except OSError as e:
        return f"is not readable: {e.strerror or e}"
    return None


def semantic_problems(spec: BatchSpec, jobs: list[JobSpec], dataset_exists: Any = None,
                      data_roots: tuple[str, ...] | None = None) -> list[tuple[str, str]]:
    """Checks that touch the outside world but run no compute: datasets lie under the allowed roots
    (``data_roots``, default ``ADAPTERFAB_DATA_ROOTS``), exist and are readable, and the base model can
    be resolved. ``dataset_exists(uri) -> str | None`` returns an error message for a remote URI (the
    storage layer's check); local files are checked here. Returns (field, problem) pairs, none when
    all is well. Whether every job fits some packing is the planner's to say: ``jobs/admission.admit``
    runs both, and is what the CLI and the orchestrator call."""
    from adapterfab.basemodel import check_base_model
    from adapterfab.env import env

    roots = env().roots if data_roots is None else data_roots
    problems: list[tuple[str, str]] = []
    try:
        check_base_model(spec.base_model)
        if spec.base_model.startswith("s3://") and dataset_exists:  # a model folder: its config.json
            err = dataset_exists(spec.base_model.rstrip("/") + "/config.json")
            if err:
                problems.append(("base_model", f"{err} (a base model folder needs its config.json)"))
    except Exception as e:  # noqa: BLE001 - reported as a spec problem
        problems.append(("base_model", str(e)))
    else:
        problems += _module_problems(spec, jobs)
    for i, job in enumerate(jobs):
        field = f"tenants[{i}].dataset"
        if outside_data_roots(job.dataset, roots):
            problems.append((field, f"{job.dataset} is outside the allowed data roots ({', '.join(roots)}); "
                                    "move the data there or ask the operator to extend ADAPTERFAB_DATA_ROOTS"))
            continue
        if "://" in job.dataset:
            err = dataset_exists(job.dataset) if dataset_exists else None
            if err:
                problems.append((field, err))
            continue
        problem = _local_dataset_problem(Path(job.dataset))
        if problem:
            problems.append((field, f"{job.dataset} {problem}"))
    return problems


def _module_problems(spec: BatchSpec, jobs: list[JobSpec]) -> list[tuple[str, str]]:
    """Each job's ``target_modules`` against the Linear layers the base has (read from its weights'
    headers when the base is on this machine; a base that is not yet, or has no safetensors, is not
    checked here), and LoRA-XS's rank against the smallest of those layers (its basis is their top r
    singular directions). A problem every entry inherits from ``defaults.method`` is said there, once."""
    from adapterfab.basemodel import linear_layers, local_folder

    folder = local_folder(spec.base_model)
    layers = linear_layers(folder) if folder else None
    if not layers:
        return []
    out = []
    for i, (t, job) in enumerate(zip(spec.tenants, jobs, strict=False)):
        own = t.method or {}
        resolve = getattr(job.method, "resolved_targets", None)
        if resolve is None:
            continue
        targets = resolve()
        missing = [m for m in targets if m not in layers]
        where = f"tenants[{i}].method" if {"name", "target_modules"} & set(own) else "defaults.method"
        if missing:
            out.append((f"{where}.target_modules",
                        f"the base has no Linear layer named {', '.join(map(repr, missing))} in its blocks; "
                        f"it has: {', '.join(sorted(layers))}"))
            continue
        if job.method.name == "lora_xs":
            r = job.method.r  # type: ignore[attr-defined]
            small = min(min(layers[m]) for m in targets)
            if r > small:
                at = f"tenants[{i}].method" if {"name", "r"} & set(own) else "defaults.method"
                out.append((f"{at}.r", f"LoRA-XS's r ({r}) exceeds the smallest adapted layer's rank ({small}, "
                                       f"of {', '.join(m for m in targets if min(layers[m]) == small)}); "
                                       f"give r ≤ {small}"))
    return list(dict.fromkeys(out))  # entries that inherit one problem from defaults.method: said once


def check_semantics(spec: BatchSpec, jobs: list[JobSpec], dataset_exists: Any = None,
                    data_roots: tuple[str, ...] | None = None) -> None:
    """``semantic_problems``, raised as one ``SpecError`` when there are any."""
    problems = semantic_problems(spec, jobs, dataset_exists, data_roots)
    if problems:
        raise SpecError(problems)
