"""Interop with vLLM (issue 23): adapters trained by the product's training loop (LoRA, QLoRA on a 4-bit
base, LoRA-XS through its PEFT export) load in vLLM and give the same greedy tokens as our batched
engine in fp32, on SmolLM2-135M-Instruct. vLLM runs in its own venv (``make vllm-venv``), through
``bench/vllm_side.py``; without that venv the test skips and says so. Slow: three short trainings and
one vLLM engine start (about 2 minutes on 2 CPUs)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VLLM_PY = REPO / ".vllm-venv" / "bin" / "python"
PROMPTS = ["Who are you?", "Tell me about the sea.", "What is bread made of?"]
MAX_TOKENS = 16

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not VLLM_PY.exists(), reason="no vLLM venv (.vllm-venv): `make vllm-venv` builds it (vLLM 0.32's CPU build)")]


def _train(base: str, method: object, data: Path, out: Path, basis: object = None) -> Path:
    from transformers import AutoTokenizer

    from adapterfab.jobs.train_loop import save_adapter, train_adapter
    from adapterfab.pipelines.local import encode_file, epoch_batches
    from adapterfab.spec import TrainConfig

    tok = AutoTokenizer.from_pretrained(base)
    rows = encode_file(data, tok, 64)
    train = TrainConfig(steps=3, batch_size=2, learning_rate=5e-3, dtype="float32", seed=1)
    result = train_adapter(base, method, train, epoch_batches(rows, 2, 1, tok.pad_token_id), basis=basis)
    return save_adapter(result, method, out)


def test_factory_trained_adapters_give_the_same_greedy_tokens_in_vllm(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterfab.basemodel import fingerprint, resolve_base_model
    from adapterfab.chat import encode_prompt
    from adapterfab.methods.lora import LoraConfig
    from adapterfab.methods.lora_xs import LoraXSConfig, compute_basis, export_peft_lora
    from adapterfab.methods.qlora import QLoraConfig
    from adapterfab.serve.batched import BatchedEngine
    from adapterfab.serve.engine import SamplingParams

    base = resolve_base_model("smollm2-135m-instruct").path
    data = REPO / "examples" / "data" / "pirate.jsonl"
    xs_cfg = LoraXSConfig(r=8, alpha=8)
    basis = compute_basis(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), xs_cfg, fingerprint(base))
    trained = {"lora": _train(base, LoraConfig(r=8), data, tmp_path / "lora"),
               "qlora": _train(base, QLoraConfig(r=8, target_modules=["q_proj", "v_proj"]), data, tmp_path / "qlora"),
               "lora_xs": _train(base, xs_cfg, data, tmp_path / "lora_xs", basis=basis)}
    exported = {**trained, "lora_xs": export_peft_lora(trained["lora_xs"], basis, tmp_path / "lora_xs-peft")}

    tok = AutoTokenizer.from_pretrained(base)
    prompts = [encode_prompt([{"role": "user", "content": p}], tok) for p in PROMPTS]
    names = list(trained)
    eng = BatchedEngine(base, dtype="float32", max_batch=4, max_len=256, max_adapters=4, max_rank=16, torch_threads=2)
    ours: dict[str, list[list[int]]] = {}
    try:
        for name in names:
            eng.load_adapter(name, trained[name], basis=basis if name == "lora_xs" else None)
            ours[name] = [[int(t) for t in eng.generate_token_ids(
                ids, name, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))] for ids in prompts]
    finally:
        eng.close()

    job = {"model": base, "dtype": "float32", "prompts": prompts, "max_tokens": MAX_TOKENS, "max_num_seqs": 4,
           "max_model_len": 256, "max_lora_rank": 16, "out": str(tmp_path / "vllm.json"),
           "cases": [{"name": n, "adapters": [str(exported[n])], "assign": [0] * len(prompts)} for n in names]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(VLLM_PY), str(REPO / "bench" / "vllm_side.py"), str(tmp_path / "job.json")],
                       env={**env, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}, cwd=tmp_path,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    theirs = json.loads((tmp_path / "vllm.json").read_text())
    for name in names:
        assert theirs[name]["tokens"] == ours[name], name
