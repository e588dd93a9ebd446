"""Base model resolution and fingerprints (a hash of the weights, not of the name)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from adapterfab.basemodel import check_base_model, fingerprint, resolve_base_model
from adapterfab.errors import BaseModelError


def test_local_folder_and_fingerprint(tiny_model_path: str, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_path, copy)
    ref = resolve_base_model(str(copy))
    assert ref.path == str(copy.resolve()) and len(ref.fingerprint) == 64
    assert fingerprint(copy) == ref.fingerprint == fingerprint(tiny_model_path)  # same weights, same hash
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the weights
    weights.write_bytes(bytes(data))
    assert fingerprint(copy) != ref.fingerprint


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(BaseModelError, match="unknown base model"):
        check_base_model("not-a-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match="config.json"):
        check_base_model(str(tmp_path / "empty"))
    with pytest.raises(BaseModelError, match=r"downloads are off \(ADAPTERFAB_HF_OFFLINE\)"):
        resolve_base_model("some-org/some-model-not-cached", cache=tmp_path)


def test_default_short_name_is_the_shipped_smollm2(smollm2_path: str) -> None:
    check_base_model("smollm2-135m-instruct")
    assert (Path(smollm2_path) / "model.safetensors").exists() or list(Path(smollm2_path).glob("*.safetensors"))
    assert (Path(smollm2_path) / "tokenizer_config.json").exists()


def test_local_folder_never_converts(tiny_model_path: str, tmp_path: Path) -> None:
    from adapterfab.basemodel import local_folder

    assert local_folder(tiny_model_path) == tiny_model_path
    assert local_folder("smollm2-135m-instruct", cache=tmp_path) is None  # not converted in this cache
    assert local_folder("s3://bucket/base", cache=tmp_path) is None
    assert not (tmp_path / "models").exists()


def test_a_changed_chat_template_makes_a_job_new(tiny_model_path: str, tmp_path: Path) -> None:
    """The weights' fingerprint left out the config and the tokenizer: after a base's chat template was
    fixed, a resubmitted job reused the version trained on rows of the old template (review, 2026-12)."""
    import json

    from adapterfab.basemodel import setup_fingerprint
    from adapterfab.jobs.orchestrate import job_fingerprint
    from adapterfab.spec import parse_spec

    fixed = tmp_path / "fixed"
    shutil.copytree(tiny_model_path, fixed)
    cfg = json.loads((fixed / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (fixed / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert fingerprint(fixed) == fingerprint(tiny_model_path)  # the same weights
    assert setup_fingerprint(str(fixed)) != setup_fingerprint(tiny_model_path)
    _, (job,) = parse_spec({"version": 1, "name": "n", "base_model": tiny_model_path,
                            "tenants": [{"tenant": "acme", "persona": "p", "dataset": "/d.jsonl"}]})
    assert job_fingerprint("w", job, "d", setup_fingerprint(str(fixed))) != \
        job_fingerprint("w", job, "d", setup_fingerprint(tiny_model_path))
