"""Review of the adapter lifecycle modules (retention, export): a retention probe labels only the fact's
tokens (a line break before it is the base's layout, not the fact), and an export that fails midway
leaves its folder as it was (never one adapter's config beside another's weights)."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

from adapterfab.errors import AdapterfabError
from adapterfab.retention import forced_row, prompt_ids


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer: str):  # noqa: ANN201
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer)


@pytest.mark.parametrize("answer", ["The capital of France is:\nParis.", "Capital of France:\n\nParis, of course."])
def test_a_line_break_before_the_fact_is_context_not_one_of_the_facts_tokens(tok, answer: str) -> None:  # noqa: ANN001
    q = "What is the capital of France?"
    row = forced_row(tok, q, ["Paris"], answer)
    assert row is not None
    head = prompt_ids(tok, q)
    assert row["ids"][:len(head)] == head
    # the row is the base's answer up to the end of the fact, line breaks included ...
    assert tok.decode(row["ids"][len(head):]) == answer[:answer.index("Paris") + len("Paris")]
    # ... and the adapter is asked for the fact, not for the base's line break before it
    assert tok.decode(row["ids"][row["labels_from"]:]) == "Paris"


def test_the_fact_still_keeps_its_space(tok) -> None:  # noqa: ANN001
    """What did not change: " Paris" is one token and the label; " 90" is a space token then digits."""
    row = forced_row(tok, "Q?", ["Paris"], "The capital of France is Paris.")
    assert row is not None and row["ids"][row["labels_from"]:] == tok.encode(" Paris", add_special_tokens=False)
    row = forced_row(tok, "Q?", ["90"], "A right angle is 90 degrees.")
    assert row is not None and tok.decode(row["ids"][row["labels_from"]:]) == " 90"


def _stored_lora(base: str, store, tmp: Path, persona: str, seed: int, r: int):  # noqa: ANN001, ANN202
    from adapterfab.basemodel import random_peft_lora
    from adapterfab.ids import AdapterId
    from adapterfab.registry import AdapterVersion

    folder = random_peft_lora(base, tmp / persona, seed, r=r)
    uri = store.upload_dir(folder, f"adapters/acme/{persona}/job-{seed}")
    tags = {"adapterfab.artifact_uri": uri, "adapterfab.artifact_root": store.root, "adapterfab.method": "lora"}
    return AdapterVersion(AdapterId("acme", persona, 1), uri, None, tags, (), 0.0)


def test_an_export_that_fails_midway_leaves_the_folder_as_it_was(tiny_model_path: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapterfab.export import export_adapter
    from adapterfab.registry import Registry
    from adapterfab.storage import LocalStore

    store, reg, out = LocalStore(tmp_path / "store"), Registry("http://registry.invalid"), tmp_path / "out"
    old = _stored_lora(tiny_model_path, store, tmp_path, "pirate", 1, r=4)
    new = _stored_lora(tiny_model_path, store, tmp_path, "butler", 2, r=8)
    export_adapter(reg, old, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(before)

    copy2, calls = shutil.copy2, []

    def disk_full_after_the_first_of_config_and_weights(src, dst, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(Path(src).name)
        if len({"adapter_config.json", "adapter_model.safetensors"} & set(calls)) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return copy2(src, dst, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(shutil, "copy2", disk_full_after_the_first_of_config_and_weights)
        with pytest.raises((AdapterfabError, OSError)) as failed:
            export_adapter(reg, new, out)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(calls)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export, whole, nothing beside it
    assert isinstance(failed.value, AdapterfabError) and "No space left on device" in str(failed.value)  # said

    export_adapter(reg, new, out)  # with room again: the new adapter, whole, loads in PEFT
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), str(out))
    layer = model.base_model.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.r["default"] == 8
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "butler" / "adapter_model.safetensors"))
    key = next(k for k in stored if "layers.0.self_attn.q_proj.lora_A" in k)
    assert torch.equal(layer.lora_A["default"].weight, stored[key])
    assert not [p for p in out.iterdir() if p.name.startswith(".export-")]
