"""Time from `adapterfab submit` to the first training step with no trainer running, with the factory's
first window prepared in the orchestrator (B, the default) against a Ray Data execution (A,
``ADAPTERFAB_FIRST_WINDOW_IN_PROCESS_BYTES=0``), alternating A and B on one stack in one run.

    .venv/bin/python bench/first_step.py [--pairs 3] [--jobs 16]

Each run: 16 SmolLM2 LoRA jobs (two fused groups on the 2-CPU default), 1 step, trainers retired after
each batch (`trainer_keep_warm_s: 0`), so every run starts its trainers cold. Reports per run the
seconds from submit to the first job TRAINING and to the first finished step, and the batch's data
seconds. Writes bench/results/first_step-cpu-<date>.json and a line in bench/RESULTS.md."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "adapterfab")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=16)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="af-first-step-"))
    home, work = root / "home", root / "work"
    work.mkdir(parents=True)
    env = {**os.environ, "ADAPTERFAB_HOME": str(home)}

    def cli(*a: str, extra: dict[str, str] | None = None, t: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([CLI, *a], capture_output=True, text=True, env={**env, **(extra or {})}, timeout=t)

    personas = ("pirate", "butler", "robot")
    src = {p: (REPO / f"examples/data/{p}.jsonl").read_text().splitlines() for p in personas}
    tenants = []
    for i in range(args.jobs):
        p = personas[i % 3]
        f = work / f"t{i:02d}.jsonl"
        f.write_text("\n".join((src[p] * 3)[i:i + 48]) + "\n")
        tenants.append({"tenant": f"t{i:02d}", "persona": p, "dataset": str(f)})
    spec = {"version": 1, "name": "first-step", "base_model": "smollm2-135m-instruct", "promote": "none",
            "defaults": {"method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0,
                                    "target_modules": ["q_proj", "v_proj"]},
                         "train": {"steps": 1, "batch_size": 4, "max_seq_len": 128, "dtype": "float32",
                                   "eval_fraction": 0.1}},
            "resources": {"cpus_per_job": 1, "trainer_keep_warm_s": 0}, "tenants": tenants}
    up = cli("up", "--num-cpus", "2")
    if up.returncode:
        sys.exit(up.stdout + up.stderr)
    runs = []
    try:
        for k, mode in enumerate("AB" * args.pairs):
            spec["name"] = f"first-step-{k}"
            spec["defaults"]["train"]["seed"] = k  # a new fingerprint: nothing is reused
            path = work / f"run{k}.yaml"
            path.write_text(yaml.safe_dump(spec))
            time.sleep(15)  # the last batch's trainers retired
            t0 = time.time()
            r = cli("submit", str(path), "--wait",
                    extra={"ADAPTERFAB_FIRST_WINDOW_IN_PROCESS_BYTES": "0" if mode == "A" else str(4 << 20)})
            if r.returncode:
                sys.exit(r.stdout[-3000:] + r.stderr[-3000:])
            d = json.loads(cli("status", r.stdout.split()[1], "--json").stdout)
            training = min(j["training_started_s"] for j in d["jobs"] if j["training_started_s"])
            runs.append({"mode": mode, "first_step_s": round(d["stats"]["first_step_s"] - t0, 1),
                         "training_s": round(training - t0, 1), "wall_s": round(time.time() - t0, 1),
                         "data_s": d["stats"].get("data_s")})
            print(runs[-1], flush=True)
    finally:
        cli("down", t=120)
    mean = {m: {k: round(statistics.mean(r[k] for r in runs if r["mode"] == m), 1)
                for k in ("first_step_s", "training_s", "data_s")} for m in "AB"}
    sys.path.insert(0, str(REPO / "bench"))
    from factory_throughput import machine

    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(os.cpu_count() or 1), "jobs": args.jobs, "runs": runs, "mean": mean}
    out = REPO / "bench" / "results" / f"first_step-cpu-{result['date']}.json"
    out.write_text(json.dumps(result, indent=1))
    line = (f"- {result['date']} · first_step.py · {result['machine']} · SmolLM2-135M-Instruct LoRA r8 q,v, "
            f"{args.jobs} jobs, cold trainers, {args.pairs} A/B pairs · first window through Ray Data (A) vs in "
            f"the orchestrator (B): first step {mean['A']['first_step_s']} vs {mean['B']['first_step_s']} s after "
            f"submit, first job TRAINING {mean['A']['training_s']} vs {mean['B']['training_s']} s, data "
            f"{mean['A']['data_s']} vs {mean['B']['data_s']} s (`.venv/bin/python bench/first_step.py`; "
            f"bench/results/{out.name})")
    with (REPO / "bench" / "RESULTS.md").open("a") as f:
        f.write(line + "\n")
    print(json.dumps(mean), line, sep="\n")


if __name__ == "__main__":
    main()
