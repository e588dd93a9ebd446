"""The batched engine's limits from the base's config: a base with a sliding attention window (Mistral)
was served with full attention over sequences longer than its window, which answers differently from the
model (and from vLLM); sequences are now limited to the window."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from adapterfab.serve.batched import BatchedEngine


def _as_mistral(tiny_model_path: str, folder: Path, **config: object) -> str:
    """The tiny Llama as a Mistral (the same weights' layout) with ``config`` set."""
    shutil.copytree(tiny_model_path, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update({"model_type": "mistral", "architectures": ["MistralForCausalLM"], **config})
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


@pytest.mark.parametrize(("window", "max_len"), [(16, 16), (None, 64), (4096, 64)])
def test_a_sliding_window_limits_the_sequences_served(tiny_model_path: str, tmp_path: Path, window: int | None,
                                                      max_len: int) -> None:
    engine = BatchedEngine(_as_mistral(tiny_model_path, tmp_path / "m", sliding_window=window), dtype="float32",
                           max_batch=2, max_len=64, max_adapters=2, max_rank=8)
    try:
        assert engine.max_len == max_len and engine.prompt_token_limit() == max_len - 1
    finally:
        engine.close()
