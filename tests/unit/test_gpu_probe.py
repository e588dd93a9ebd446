"""bench/gpu_probe.py (issue 23's GPU readiness probe) in its ``--smoke`` mode: tiny shapes on the CPU, run
as a subprocess the way bench/gpu_pass.sh runs the full probe, so the script cannot rot between GPU runs.
Every decode case (base, LoRA x1 and x3, LoRA-XS x3 at 2 and 4 rows x context 16 and 32) and every fused
training case (K = 1, 2, with and without the 4-bit base) ran, through the adapter path it names, with
positive times; which SDPA backend ran was read."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_gpu_probe_smoke_runs_every_case(tmp_path: Path, smollm2_tokenizer: str) -> None:
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_probe.py"), "--smoke", "--device", "cpu",
                        "--out", str(out), "--tokenizer", smollm2_tokenizer],
                       capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["smoke"] and res["device"] == "cpu" and res["elapsed_s"] < 120

    decode = {(c["kind"], c["adapters"], c["rows"], c["context"]): c for c in res["decode"]}
    want = {(kind, n, rows, ctx) for kind, n in (("base", 0), ("lora", 1), ("lora", 3), ("lora_xs", 3))
            for rows in (2, 4) for ctx in (16, 32)}
    assert set(decode) == want and len(res["decode"]) == len(want)
    for (kind, n, rows, ctx), c in decode.items():
        assert c["status"] == "ok", c
        assert c["wall_ms"] > 0 and c["tokens_per_s"] > 0 and c["gpu_ms"] is None, c  # no CUDA events on a CPU
        shape = c["decode_shape"]  # the engine's own record of the step it ran
        assert shape["rows"] == rows and shape["span"] == ctx, c  # CPU: exact shapes, no buckets
        assert (shape["lora_rank"] > 0) == (kind == "lora") and (shape["xs_bases"] == 1) == (kind == "lora_xs"), c
        assert c["distinct_adapters"] == min(n, rows), c

    bnb = importlib.util.find_spec("bitsandbytes") is not None
    train = {(c["k"], c["four_bit"]): c for c in res["train"]}
    assert set(train) == {(k, fb) for k in (1, 2) for fb in (False, True)}
    for (_k, four_bit), c in train.items():
        if four_bit and not bnb:
            assert c["status"] == "skipped" and "bitsandbytes" in c["reason"], c
            continue
        assert c["status"] == "ok", c
        assert c["step_ms"] > 0 and c["tokens_per_s"] > 0 and c["flops_per_step"] > 0 and c["mfu"] is None, c
    if bnb:
        assert res["setup"]["train-tiny-4bit"]["loaded_in_4bit"]
    assert not res["setup"]["train-tiny"]["loaded_in_4bit"]

    for key in ("decode-tiny", "train-tiny"):
        assert res["attention"][key]["ops"] and res["attention"][key]["backend"] != "none seen", res["attention"]
    assert "decode tiny    4 rows ctx   32 lora×3" in r.stdout and "train  tiny K=2" in r.stdout
