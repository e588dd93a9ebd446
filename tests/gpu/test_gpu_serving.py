"""GPU-only checks of the batched engine's CUDA-graph decode (skipped on machines without CUDA; run them on
a lent GPU: see README "GPU checks"). A mixed batch of LoRA (ranks 2..8, different modules), LoRA-XS and
bare-base requests decodes to the same greedy fp32 tokens with CUDA graphs as the same bucketed shapes
run eagerly (the CPU suite checks those against PEFT); graphs are captured once per shape and replayed;
an adapter that creates a new bank after capture is seen (the graphs are recaptured)."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")]


def _adapters(tiny_model_path: str, root: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from adapterfab.basemodel import random_peft_lora
    from adapterfab.methods.lora_xs import LoraXSConfig, compute_basis, write_adapter

    out: dict = {"lora": {}, "xs": {}}
    for name, seed, r, targets in (("pirate", 1, 4, ("q_proj", "v_proj")), ("butler", 2, 8, ("q_proj", "v_proj")),
                                   ("robot", 3, 2, ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))):
        out["lora"][name] = random_peft_lora(tiny_model_path, root / name, seed, r, targets, scale=0.4)
    # "late" targets modules the others leave alone, so loading it creates new banks
    out["late"] = random_peft_lora(tiny_model_path, root / "late", 5, 4, ("o_proj", "down_proj"), scale=0.4)
    cfg = LoraXSConfig(r=4, alpha=4)
    basis = compute_basis(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32), cfg, "tiny")
    gen = torch.Generator().manual_seed(7)
    rs = {m: torch.randn(4, 4, generator=gen) * 2.0 for m in basis.factors}
    out["xs"]["xs-one"] = write_adapter(root / "xs-one", cfg, basis.id, basis.digest, basis.base_fingerprint,
                                        cfg.resolved_targets(), rs)
    out["basis"] = basis
    return out


def _run(engine, requests: list[tuple[str | None, list[int]]]) -> list[list[int]]:  # noqa: ANN001
    from adapterfab.serve.engine import SamplingParams

    params = SamplingParams(max_tokens=16, temperature=0.0)
    got: dict[int, list[int]] = {}

    def one(i: int) -> None:
        adapter, prompt = requests[i]
        got[i] = list(engine.generate_token_ids(prompt, adapter, params))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return [got[i] for i in range(len(requests))]


@pytest.mark.timeout(600)
def test_cuda_graph_decode_equals_eager(tiny_model_path: str, tmp_path: Path) -> None:
    from adapterfab.serve.batched import BatchedEngine

    adapters = _adapters(tiny_model_path, tmp_path)
    engines = {mode: BatchedEngine(tiny_model_path, dtype="float32", device="cuda", max_batch=8, max_len=256,
                                   max_adapters=8, max_rank=16, cuda_graphs=mode == "graphs", buckets=True)
               for mode in ("graphs", "eager")}
    try:
        for eng in engines.values():
            for name, path in adapters["lora"].items():
                eng.load_adapter(name, path)
            eng.load_adapter("xs-one", adapters["xs"]["xs-one"], basis=adapters["basis"])
        names = [None, "pirate", "butler", "robot", "xs-one"]
        rng = random.Random(0)
        vocab = engines["eager"].cfg.vocab_size
        requests = [(rng.choices(names, [1 / (k + 1) for k in range(len(names))])[0],
                     [rng.randrange(10, vocab) for _ in range(rng.randint(3, 90))]) for _ in range(20)]
        want = _run(engines["eager"], requests)
        got = _run(engines["graphs"], requests)
        assert got == want
        g = engines["graphs"]
        assert g.graph_captures >= 1 and g.graph_replays > g.graph_captures  # captured once, replayed after
        assert g.graph_captures <= len(g.decode_shapes)
        assert engines["eager"].graph_replays == 0
        # an adapter on modules no adapter used before creates new banks: the graphs must see it
        captures = g.graph_captures
        for eng in engines.values():
            eng.load_adapter("late", adapters["late"])
        late = [("late", requests[0][1]), (None, requests[0][1])]
        want, got = _run(engines["eager"], late), _run(g, late)
        assert got == want and got[0] != got[1]
        assert g.graph_captures > captures
    finally:
        for eng in engines.values():
            eng.close()
