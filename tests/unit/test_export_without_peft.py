"""The orchestrator writes a fused LoRA's folder (``jobs.fused.write_exported``, on the registrar's
threads) without importing peft: the config's fields that do not depend on the adapter are PEFT's defaults,
kept in the machine's cache per peft version (``_lora_config_defaults``). Importing peft in the
orchestrator cost ~1.5-4 CPU-s of a 2-core machine, taken from the trainers' steps. The config must still
be what ``LoraConfig.save_pretrained`` writes, and the folder must load in PEFT."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapterfab.jobs.fused import ExportedAdapter
from adapterfab.methods import LOW_RANK, get_method

WRITE = r"""
import pickle, sys
from adapterfab.jobs.fused import write_exported
a = pickle.load(open(sys.argv[1], "rb"))
write_exported(a, sys.argv[2])
print("PEFT_IMPORTED" if "peft" in sys.modules else "NO_PEFT")
"""


def _write(tmp_path: Path, a: ExportedAdapter, out: str) -> str:
    (tmp_path / "a.pkl").write_bytes(pickle.dumps(a))
    r = subprocess.run([sys.executable, "-c", WRITE, str(tmp_path / "a.pkl"), str(tmp_path / out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(("r", "alpha", "dropout"), [(4, 8, 0.0), (16, 32, 0.05)])
def test_a_fused_lora_folder_is_written_without_peft_and_loads_as_peft_saved_it(
        tiny_model_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, r: int, alpha: int,
        dropout: float) -> None:
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("ADAPTERFAB_CACHE", str(tmp_path / "cache"))
    cfg = get_method("lora").config_cls(r=r, alpha=alpha, dropout=dropout, target_modules=["q_proj", "v_proj"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    targets = sorted(n for n, m in base.named_modules() if n.split(".")[-1] in ("q_proj", "v_proj"))
    gen = torch.Generator().manual_seed(0)
    tensors = {n: (torch.randn(r, base.get_submodule(n).in_features, generator=gen),
                   torch.randn(base.get_submodule(n).out_features, r, generator=gen)) for n in targets}
    a = ExportedAdapter(LOW_RANK, cfg.model_dump(), targets, tiny_model_path, None, tensors)
    # the machine's first folder imports peft once and keeps its defaults; every later one does not
    assert _write(tmp_path, a, "first") == "PEFT_IMPORTED"
    assert list((tmp_path / "cache" / "peft").glob("lora-config-*.json"))
    assert _write(tmp_path, a, "out") == "NO_PEFT"
    assert (tmp_path / "first" / "adapter_config.json").read_text() == \
        (tmp_path / "out" / "adapter_config.json").read_text()

    # the same file PEFT writes (set order aside), and the adapter loads with its tensors in place
    LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM",
               bias="none", base_model_name_or_path=tiny_model_path).save_pretrained(str(tmp_path / "peft"))
    ours = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    theirs["target_modules"] = sorted(theirs["target_modules"])
    assert ours == theirs
    model = PeftModel.from_pretrained(base, str(tmp_path / "out"))
    layer = model.base_model.model.get_submodule(targets[0])
    assert torch.equal(layer.lora_A["default"].weight, tensors[targets[0]][0])
    assert torch.equal(layer.lora_B["default"].weight, tensors[targets[0]][1])
    assert layer.scaling["default"] == alpha / r


def test_a_damaged_defaults_file_is_made_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterfab.methods import peft_lora_config

    monkeypatch.setenv("ADAPTERFAB_CACHE", str(tmp_path))
    cfg = get_method("lora").config_cls(r=2, alpha=4, dropout=0.0, target_modules=["q_proj"])
    first = peft_lora_config(cfg, ["model.layers.0.self_attn.q_proj"], None)
    (kept,) = (tmp_path / "peft").glob("lora-config-*.json")
    for damaged in ("{not json", "[]", '{"r": 8}'):
        kept.write_text(damaged)
        assert peft_lora_config(cfg, ["model.layers.0.self_attn.q_proj"], None) == first
        assert json.loads(kept.read_text())["peft_type"] == "LORA"
    assert (first["r"], first["lora_alpha"], first["target_modules"]) == (2, 4, ["model.layers.0.self_attn.q_proj"])
