"""Per-method measurements on the SmolLM2-135M base (CPU): trainable params, adapter bytes, peak
memory, step time, persona adherence and knowledge retention (examples/fact_probes.json), and for
LoRA-XS the one-off SVD time of the shared basis. Each method runs in its own process so peak memory
(ru_maxrss) is its own. Writes bench/results/methods-<date>.json and a line in bench/RESULTS.md.

    .venv/bin/python bench/methods.py                       # lora, qlora, lora_xs with their defaults
    .venv/bin/python bench/methods.py --methods lora_xs --steps 40

GPU (a ~1B Llama-shaped model with random weights) is measured only where a GPU is lent; this script
records the CPU figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PERSONA = "robot"  # examples/data/robot.jsonl, marker "BEEP BOOP."
DEFAULT_METHODS = {
    "lora": {"name": "lora"},
    "qlora": {"name": "qlora"},
    "lora_xs": {"name": "lora_xs"},
}


def run_one(method_json: str, steps: int | None, threads: int) -> dict:
    import resource

    from adapterfab.jobs.evaluate import train_and_evaluate

    out = train_and_evaluate(json.loads(method_json), PERSONA, steps=steps, threads=threads)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def adapter_sizes() -> dict:
    """LoRA-XS vs LoRA adapter bytes at the same rank on the same modules (expect r^2 vs r*(in+out) per
    module), and the one-off SVD time of the shared basis. No training: attach, save, measure."""
    import torch
    from transformers import AutoModelForCausalLM

    from adapterfab.basemodel import resolve_base_model
    from adapterfab.methods import get_method

    base = resolve_base_model("smollm2-135m-instruct")
    rows = []
    for targets in (["q_proj", "v_proj"], "all-linear"):
        for r in (8, 16):
            row: dict = {"targets": targets, "r": r}
            for name in ("lora", "lora_xs"):
                impl = get_method(name)
                cfg = impl.config_cls(name=name, r=r, alpha=r, target_modules=targets)
                model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
                basis = None
                if impl.compute_basis is not None:
                    t0 = time.monotonic()
                    basis = impl.compute_basis(model, cfg, base.fingerprint)
                    row["svd_s"] = round(time.monotonic() - t0, 3)
                import tempfile

                with tempfile.TemporaryDirectory() as tmp:
                    impl.save(impl.apply(model, cfg, basis), cfg, Path(tmp))
                    row[f"{name}_bytes"] = (Path(tmp) / "adapter_model.safetensors").stat().st_size
            row["ratio"] = round(row["lora_bytes"] / row["lora_xs_bytes"], 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"sizes": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--steps", type=int, default=None, help="override the method's default steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", action="store_true", help="only adapter bytes at equal rank + SVD time")
    args = ap.parse_args()
    if args.sizes:
        import torch

        torch.set_num_threads(args.threads)
        res = adapter_sizes()
        stamp = time.strftime("%Y-%m-%d")
        out = REPO / "bench" / "results" / f"sizes-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps({"date": stamp, **res}, indent=1))
        summary = "; ".join(f"{'q,v' if isinstance(r['targets'], list) else r['targets']} r{r['r']}: LoRA-XS "
                            f"{r['lora_xs_bytes']:,} B vs LoRA {r['lora_bytes']:,} B ({r['ratio']}x), SVD {r['svd_s']} s"
                            for r in res["sizes"])
        with (REPO / "bench" / "RESULTS.md").open("a") as f:
            f.write(f"- {stamp} · methods.py --sizes · {platform.machine()} {os.cpu_count()} CPU · SmolLM2-135M fp32 "
                    f"adapter files at equal rank and modules · {summary} "
                    f"(`.venv/bin/python bench/methods.py --sizes`; {out.relative_to(REPO)})\n")
        return 0
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.steps, args.threads)), flush=True)
        return 0
    results = []
    for name in args.methods.split(","):
        spec = DEFAULT_METHODS.get(name, {"name": name})
        cmd = [sys.executable, __file__, "--one", json.dumps(spec), "--threads", str(args.threads)]
        if args.steps:
            cmd += ["--steps", str(args.steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:])
            raise SystemExit(f"{name} failed")
        r = json.loads(line[7:])
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k not in ("method", "train")}, indent=None), flush=True)
    stamp = time.strftime("%Y-%m-%d")
    machine = f"{platform.machine()} {os.cpu_count()} CPU, CPU only"
    out = REPO / "bench" / "results" / f"methods-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"date": stamp, "machine": machine, "persona": PERSONA, "results": results}, indent=1))
    summary = "; ".join(
        f"{r['method']['name']}: {r['trainable_params']:,} params, {r['adapter_bytes'] / 1024:.0f} KiB, "
        f"{r['step_s_median']} s/step, peak {r['peak_rss_mb']:.0f} MB, persona {r['persona']}, facts {r['facts']}"
        + (f", SVD {r['basis_svd_s']} s" if "basis_svd_s" in r else "")
        for r in results)
    with (REPO / "bench" / "RESULTS.md").open("a") as f:
        f.write(f"- {stamp} · methods.py · {machine} · SmolLM2-135M, persona {PERSONA} · {summary} "
                f"(`.venv/bin/python bench/methods.py`; {out.relative_to(REPO)})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
