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

    decode = {(c["kind"], c["adapters"], c.get("kernel"), c["rows"], c["context"]): c for c in res["decode"]}
    kinds = (("base", 0, None), ("lora", 1, "factors"), ("lora", 3, "factors"), ("lora", 1, "grouped"),
             ("lora", 3, "grouped"), ("lora_xs", 3, None))  # each LoRA case by the CPU's path and the grouped one
    want = {(kind, n, kernel, rows, ctx) for kind, n, kernel in kinds for rows in (2, 4) for ctx in (16, 32)}
    assert set(decode) == want and len(res["decode"]) == len(want)
    for (kind, n, _kernel, rows, ctx), c in decode.items():
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

    # where K=2's step time goes (bench/step_profile.py), each variant: two steady steps of the same trainer
    profiled = ["tiny K=2 fp32"] + (["tiny K=2 nf4"] if bnb else [])
    assert sorted(res["train_profile"]) == sorted(profiled), res["train_profile"]
    for key in profiled:
        p = res["train_profile"][key]
        assert p["status"] == "ok" and p["steps"] == 2 and p["timer"] == "aten ops' self CPU time", p
        assert 0 < p["busy_ms"] <= p["wall_ms"] and p["kernels_per_step"] > 100, p
        assert p["ms_per_step"]["gemm"] > 0 and p["ms_per_step"]["attention"] > 0, p
        assert sum(p["share"].values()) == pytest.approx(1.0, abs=0.01), p
        assert p["top"] and all(t["calls_per_step"] > 0 for t in p["top"]), p
        assert f"profile {key}: " in r.stdout
    if bnb:  # the 4-bit base's matmuls dequantize its weights on every call
        assert res["train_profile"]["tiny K=2 nf4"]["ms_per_step"]["dequant_4bit"] > 0

    for key in ("decode-tiny", "train-tiny"):
        assert res["attention"][key]["ops"] and res["attention"][key]["backend"] != "none seen", res["attention"]
    assert "decode tiny    4 rows ctx   32 lora×3" in r.stdout and "train  tiny K=2" in r.stdout
    assert "lora×3 grp" in r.stdout


@pytest.mark.timeout(300)
def test_gpu_probe_rebuilds_the_engine_when_the_lora_bank_does_not_fit(tmp_path: Path, smollm2_tokenizer: str) -> None:
    """On a device too small for the bank of the most LoRA adapters beside the KV cache of the most rows (a
    7B shape on an 80 GB H100, 2026-12-06), the probe builds the engine again with the rows that leave room
    and records the larger LoRA cases as not fitting, instead of losing the shape to an OOM. ``--mem-gib``
    stands in for the device's size on the CPU: a first run reads what the tiny engine holds and needs, the
    second gives it room for the bank beside 2 rows but not 4."""
    def probe(name: str, mem_gib: float) -> dict:
        out = tmp_path / f"{name}.json"
        r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_probe.py"), "--smoke", "--device", "cpu",
                            "--no-train", "--out", str(out), "--tokenizer", smollm2_tokenizer,
                            "--mem-gib", str(mem_gib)], capture_output=True, text=True, timeout=240, cwd=tmp_path)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return json.loads(out.read_text())

    roomy = probe("roomy", 1.0)
    fit = roomy["setup"]["decode-tiny"]["lora_fit"]
    assert fit["rows"] == 4 and fit["why"] == "" and "lora_engine" not in roomy["setup"]["decode-tiny"], fit
    assert all(c["status"] == "ok" for c in roomy["decode"]), roomy["decode"]
    # free beside 4 rows = mem - used; a cap whose free falls one row's cache short of the need
    mib = fit["used_mib"] + fit["need_mib"] - 1.5 * fit["kv_row_mib"]
    tight = probe("tight", mib / 1024)
    setup = tight["setup"]["decode-tiny"]
    assert setup["lora_fit"]["rows"] == 2 and "does not fit on this device" in setup["lora_fit"]["why"], setup
    assert setup["lora_engine"]["engine_args"]["max_batch"] == 2, setup
    for c in tight["decode"]:
        if c["kind"] == "lora" and c["rows"] == 4:
            assert c["status"] == "skipped" and "does not fit on this device" in c["reason"], c
        else:
            assert c["status"] == "ok" and c["decode_shape"]["rows"] == c["rows"], c


@pytest.mark.timeout(300)
def test_gpu_probe_times_the_fused_step_with_activation_checkpointing(tmp_path: Path, smollm2_tokenizer: str) -> None:
    """``--checkpointing on`` (what ``auto`` turns on from the first K that runs out of device memory, as
    the product's planner does for a large K): every training case runs with the decoder's activations
    recomputed and says so."""
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_probe.py"), "--smoke", "--device", "cpu",
                        "--no-decode", "--no-4bit", "--checkpointing", "on", "--out", str(out),
                        "--tokenizer", smollm2_tokenizer], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    train = [c for c in json.loads(out.read_text())["train"] if not c["four_bit"]]
    assert {c["k"] for c in train} == {1, 2}
    for c in train:
        assert c["status"] == "ok" and c["checkpointing"] is True and c["step_ms"] > 0, c
    assert "train  tiny K=2   fp32  ckpt" in r.stdout


@pytest.mark.timeout(300)
def test_a_lora_kernel_that_cannot_run_fails_only_its_own_cases(tmp_path: Path, smollm2_tokenizer: str) -> None:
    """``--lora-kernels factors,grouped`` with a rank the grouped GEMM refuses (12: not a multiple of 8): the
    engine's ``use_lora_kernel`` refuses the switch, the grouped cases are recorded as errors saying why, and
    the other kernel's cases of the same shape still run (the switch back to it is allowed), and the result
    file is written."""
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_probe.py"), "--smoke", "--device", "cpu",
                        "--no-train", "--out", str(out), "--tokenizer", smollm2_tokenizer, "--lora-r", "12",
                        "--lora-kernels", "factors,grouped"], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # a case in error: the probe exits 1
    cases = [c for c in json.loads(out.read_text())["decode"] if c["kind"] == "lora"]
    grouped = [c for c in cases if c["kernel"] == "grouped"]
    factors = [c for c in cases if c["kernel"] == "factors"]
    assert grouped and len(grouped) == len(factors), cases
    assert all(c["status"] == "error" and "multiple of 8" in c["reason"] for c in grouped), grouped
    assert all(c["status"] == "ok" and c["decode_shape"]["lora_rank"] > 0 for c in factors), factors
