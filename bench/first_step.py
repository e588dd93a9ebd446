"""Time from `adapterfab submit` to the first training step with no trainer running, with the factory's
first window prepared in the orchestrator (B, the default) against a Ray Data execution (A,
``ADAPTERFAB_FIRST_WINDOW_IN_PROCESS_BYTES=0``), alternating A and B on one stack in one run.

    .venv/bin/python bench/first_step.py [--pairs 3] [--jobs 16]

Each run: 16 SmolLM2 LoRA jobs (two fused groups on the 2-CPU default), 1 step, trainers retired after
each batch (`trainer_keep_warm_s: 0`), so every run starts its trainers cold. Reports per run the
seconds from submit to the first job TRAINING and to the first finished step, and the batch's data
seconds. Writes bench/results/first_step-cpu-<date>.json and a line in bench/RESULTS.md.

    .venv/bin/python bench/first_step.py --warm [--pairs 3] [--jobs 2]

The same on warm trainers (kept warm between batches, one unmeasured batch starts them): the first window
prepared in the orchestrator (A, ``ADAPTERFAB_FIRST_WINDOW_ON_TRAINER=0``, which first imports
transformers and loads the tokenizer) against on the warm trainer that will train it (B, the default).
Each run also records the batch's own way to its first step (``stats.startup_s``). Writes
bench/results/first_step-warm-cpu-<date>.json."""

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

from adapterfab.procs import tool

REPO = Path(__file__).resolve().parents[1]
CLI = tool("adapterfab")  # beside this interpreter, else on PATH (the GPU machine's pip --target)


def main() -> None:
    from stack_guard import add_deadline_arg, stop_cleanly  # (bench/, the script's own folder)

    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=0, help="jobs per batch (default: 16 cold, 2 warm)")
    ap.add_argument(
        "--warm", action="store_true", help="warm trainers: first window in the orchestrator vs on the trainer"
    )
    add_deadline_arg(ap)
    args = ap.parse_args()
    stop_cleanly(args.deadline_s)  # a SIGTERM or the deadline still stops the stack it starts
    args.jobs = args.jobs or (2 if args.warm else 16)
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
            "resources": {"cpus_per_job": 1, "trainer_keep_warm_s": 900 if args.warm else 0}, "tenants": tenants}
    # A and B: cold, the first window through Ray Data vs in the orchestrator; warm, in the orchestrator vs
    # on the warm trainer
    modes = ({"A": {"ADAPTERFAB_FIRST_WINDOW_ON_TRAINER": "0"}, "B": {"ADAPTERFAB_FIRST_WINDOW_ON_TRAINER": "1"}}
             if args.warm else {"A": {"ADAPTERFAB_FIRST_WINDOW_IN_PROCESS_BYTES": "0"},
                                "B": {"ADAPTERFAB_FIRST_WINDOW_IN_PROCESS_BYTES": str(4 << 20)}})
    up = cli("up", "--num-cpus", "2")
    if up.returncode:
        sys.exit(up.stdout + up.stderr)
    runs = []
    try:
        for k, mode in enumerate(("W" if args.warm else "") + "AB" * args.pairs):
            spec["name"] = f"first-step-{k}"
            spec["defaults"]["train"]["seed"] = k  # a new fingerprint: nothing is reused
            path = work / f"run{k}.yaml"
            path.write_text(yaml.safe_dump(spec))
            if not args.warm:
                time.sleep(15)  # the last batch's trainers retired
            t0 = time.time()
            r = cli("submit", str(path), "--wait", extra=modes.get(mode))
            if r.returncode:
                sys.exit(r.stdout[-3000:] + r.stderr[-3000:])
            if mode == "W":  # the trainers are started (and warm from now on)
                continue
            d = json.loads(cli("status", r.stdout.split()[1], "--json").stdout)
            training = min(j["training_started_s"] for j in d["jobs"] if j["training_started_s"])
            runs.append({"mode": mode, "first_step_s": round(d["stats"]["first_step_s"] - t0, 2),
                         "training_s": round(training - t0, 2), "wall_s": round(time.time() - t0, 1),
                         "data_s": d["stats"].get("data_s"), "startup_s": d["stats"].get("startup_s"),
                         "first_window_by": d["stats"].get("first_window_by")})
            print(runs[-1], flush=True)
    finally:
        cli("down", t=120)
    mean = {m: {k: round(statistics.mean(r[k] for r in runs if r["mode"] == m), 2)
                for k in ("first_step_s", "training_s", "data_s")} for m in "AB"}
    sys.path.insert(0, str(REPO / "bench"))
    from factory_throughput import machine

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(os.cpu_count() or 1),
        "jobs": args.jobs,
        "runs": runs,
        "mean": mean,
    }
    out = REPO / "bench" / "results" / f"first_step-{'warm-' if args.warm else ''}cpu-{result['date']}.json"
    out.write_text(json.dumps(result, indent=1))
    if args.warm:
        line = (f"- {result['date']} · first_step.py --warm · {result['machine']} · SmolLM2-135M-Instruct LoRA r8 "
                f"q,v, {args.jobs} jobs of 1 step, warm trainers, {args.pairs} A/B pairs through `adapterfab submit "
                f"--wait` · first window in the orchestrator (A) vs on the warm trainer (B): first step "
                f"{mean['A']['first_step_s']} vs {mean['B']['first_step_s']} s after submit, first job TRAINING "
                f"{mean['A']['training_s']} vs {mean['B']['training_s']} s (`.venv/bin/python bench/first_step.py "
                f"--warm`; bench/results/{out.name})")
    else:
        line = (f"- {result['date']} · first_step.py · {result['machine']} · SmolLM2-135M-Instruct LoRA r8 q,v, "
                f"{args.jobs} jobs, cold trainers, {args.pairs} A/B pairs · first window through Ray Data (A) vs in "
                f"the orchestrator (B): first step {mean['A']['first_step_s']} vs {mean['B']['first_step_s']} s "
                f"after submit, first job TRAINING {mean['A']['training_s']} vs {mean['B']['training_s']} s, data "
                f"{mean['A']['data_s']} vs {mean['B']['data_s']} s (`.venv/bin/python bench/first_step.py`; "
                f"bench/results/{out.name})")
    with (REPO / "bench" / "RESULTS.md").open("a") as f:
        f.write(line + "\n")
    print(json.dumps(mean), line, sep="\n")


if __name__ == "__main__":
    main()
