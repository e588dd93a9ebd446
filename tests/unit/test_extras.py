"""The optional dependencies (adapterfab/extras.py): DeepSpeed (extra ``zero``) and bitsandbytes (extra
``qlora``) are declared extras pinned by the lock, and code that needs one says which extra to install
when it is missing. Absence is simulated at the import edge (``sys.modules[name] = None``, what Python
does for a module that cannot be found); everything behind it is the real code."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import tomllib

from adapterfab.extras import EXTRAS, MissingExtra, need

REPO = Path(__file__).resolve().parents[2]


def test_extras_are_declared_pinned_and_locked() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lock = dict(line.split("==") for line in (REPO / "requirements.lock").read_text().split() if "==" in line)
    base = {re.split(r"[<>=\[ ;]", d)[0] for d in project["dependencies"]}
    for module, (extra, _) in EXTRAS.items():
        assert module not in base, f"{module} is a base dependency; it belongs to the extra {extra}"
        pins = dict(d.split("==") for d in project["optional-dependencies"][extra])
        assert pins[module] == lock[module], f"{extra} pins {module}=={pins[module]}, the lock {lock[module]}"
    assert "DS_BUILD_OPS=0" in (REPO / "Makefile").read_text()
    assert re.search(r"-e '\.\[dev,zero,qlora\]'", (REPO / "Makefile").read_text()), "make installs no extras"


def test_a_4bit_base_without_bitsandbytes_names_the_extra(monkeypatch: pytest.MonkeyPatch,
                                                          tiny_model_path: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from adapterfab.jobs.train_loop import load_base
    from adapterfab.methods import get_method
    from adapterfab.methods.qlora import QLoraConfig
    from adapterfab.methods.quant import keep_trainable_layout

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    cfg = QLoraConfig()
    with pytest.raises(MissingExtra, match=r"4-bit base .* needs bitsandbytes.*pip install 'adapterfab\[qlora\]'"):
        load_base(tiny_model_path, "float32", cfg)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with pytest.raises(MissingExtra, match=r"adapterfab\[qlora\]"):
        keep_trainable_layout(model)
    big = [torch.nn.Parameter(torch.zeros(400, 400))]  # paged: more than PAGED_MIN_NUMEL elements
    with pytest.raises(ImportError, match=r"adapterfab\[qlora\]"):  # still an ImportError for callers
        get_method("qlora").make_optimizer(big, 1e-3, 0.0)
    # a plain LoRA base loads without it
    assert load_base(tiny_model_path, "float32", get_method("lora").config_cls()) is not None


def test_zero_without_deepspeed_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from adapterfab.jobs.zero import deepspeed_config, gathered_trainable, init_engine

    monkeypatch.setitem(sys.modules, "deepspeed", None)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(MissingExtra, match=r"larger than one device .* needs deepspeed.*adapterfab\[zero\]"):
        init_engine(model, opt, None, deepspeed_config(2, 8, 2))
    model.weight.ds_id = 0  # what ZeRO-3 marks a partitioned parameter with
    with pytest.raises(MissingExtra, match=r"adapterfab\[zero\]"), gathered_trainable(model):
        pass


def test_a_broken_install_keeps_its_own_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An extra that is installed but cannot import (a dependency of its own missing) is not reported as
    missing: its own error names what is wrong."""
    (tmp_path / "deepspeed").mkdir()
    (tmp_path / "deepspeed" / "__init__.py").write_text("import adapterfab_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "deepspeed", raising=False)
    with pytest.raises(ModuleNotFoundError) as e:
        need("deepspeed")
    assert e.value.name == "adapterfab_no_such_dependency" and not isinstance(e.value, MissingExtra)
