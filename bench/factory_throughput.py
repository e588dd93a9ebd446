"""Mass production through the path users run, against the naive way and the fused compute alone, in
one run on one local stack (`adapterfab up` in a temporary home, on free ports):

  submit  `adapterfab submit BATCH --wait` of N persona jobs: validation, planning, Ray Data, resident
          trainers, evaluation, artifact store, MLflow runs and registry versions, everything
  naive   a fresh process per job that loads the base, trains plain PEFT (jobs/train_loop.py), evaluates
          and saves, one after another with every CPU; timed on a sample of the jobs (its rate per job
          does not depend on N)
  fused   the resident fused trainer alone on the same jobs (jobs/resident.py as Ray actors, as many as
          the batch's trainer slots, the same groups), the same train and eval rows (the product's
          own preparation, pipelines/data.py, run beforehand), bases loaded before the clock starts:
          the compute the factory cannot avoid

and reports adapters/hour of each, `ratios.submit_over_naive` and `ratios.submit_over_fused`, the
seconds from submit to the first training step, the batch's own stage timings (`adapterfab status
BATCH --json` -> stats) and the CPU seconds every process group used during the submit. After the
main batch a two-job batch on the same base measures the first step on warm trainers.

    .venv/bin/python bench/factory_throughput.py                 # CPU: SmolLM2-135M LoRA r8 q,v, N=32
    .venv/bin/python bench/factory_throughput.py --tiny          # control plane: 1,000 one-step jobs, tiny Llama
    .venv/bin/python bench/factory_throughput.py --smoke         # a few tiny jobs, no result file (CI keeps it working)
    python bench/factory_throughput.py --device cuda             # GPU (ray, mlflow, bitsandbytes installed):
                                          # the standard 0.96B QLoRA r16 all-linear job, 64 jobs x 20 steps x 4 x 512

`--tiny` also times `adapterfab status BATCH` (the command), the dashboard's batch page and the registry
lookups with 1,000 jobs and versions. Writes bench/results/factory_throughput-<mode>-<date>.json and a
line in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PERSONAS = ["pirate", "butler", "robot"]

NAIVE = r"""
import json, sys, time
t0 = time.monotonic()
import torch
from transformers import AutoTokenizer
from adapterfab.jobs.train_loop import load_base, save_adapter, train_adapter
from adapterfab.methods import get_method
from adapterfab.pipelines.local import encode_file, epoch_batches, split_rows
from adapterfab.spec import TrainConfig
job = json.loads(sys.argv[1])
torch.set_num_threads(job["threads"])
cfg = get_method(job["method"]["name"]).config_cls(**job["method"])
train = TrainConfig(**job["train"])
tok = AutoTokenizer.from_pretrained(job["base"])
base = load_base(job["base"], train.dtype, cfg, job["device"])
tr, ev = split_rows(encode_file(job["dataset"], tok, train.max_seq_len), train.eval_fraction)
pad = tok.pad_token_id
res = train_adapter(job["base"], cfg, train, epoch_batches(tr, train.batch_size, train.seed, pad),
                    lambda: list(epoch_batches(ev, train.batch_size, 0, pad, shuffle=False)(0)), model=base)
save_adapter(res, cfg, job["out"])
print(json.dumps({"wall_s": time.monotonic() - t0, "eval_loss": res.metrics["eval_loss"],
                  "base_eval_loss": res.metrics["base_eval_loss"]}))
"""


def cli(home: Path, *args: str, timeout_s: float = 7200) -> subprocess.CompletedProcess:
    from adapterfab.procs import tool
    return subprocess.run([tool("adapterfab"), *args], capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "ADAPTERFAB_HOME": str(home)})


def free_ports() -> dict[str, str]:
    from adapterfab.procs import free_port

    return {k: str(free_port()) for k in ("mlflow", "ray", "dashboard", "serve", "ui")}


def write_data(folder: Path, n: int, rows: int, turns: int = 1) -> list[str]:
    """``n`` distinct tenant files of ``rows`` chat rows each, drawn from the example personas; with
    ``turns`` > 1 each row is a multi-turn chat of that many of them (~500+ tokens at 12)."""
    import random

    folder.mkdir(parents=True, exist_ok=True)
    src = {p: (REPO / f"examples/data/{p}.jsonl").read_text().splitlines() for p in PERSONAS}
    paths = []
    for i in range(n):
        lines = src[PERSONAS[i % 3]]
        path = folder / f"t{i:04d}.jsonl"
        if turns > 1:
            rng = random.Random(i)
            pairs = [_messages(json.loads(x)) for x in lines]
            path.write_text("".join(json.dumps({"messages": [m for pair in rng.sample(pairs, min(turns, len(pairs)))
                                                             for m in pair]}) + "\n" for _ in range(rows)))
        else:
            start = (i * 7) % max(1, len(lines) - rows)
            path.write_text("\n".join(lines[start:start + rows]) + "\n")
        paths.append(str(path))
    return paths


def _messages(row: dict) -> list[dict]:
    if "messages" in row:
        return row["messages"]
    return [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["output"]}]


CPU_METHOD = {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
GPU_METHOD = {"name": "qlora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


def batch_spec(name: str, base: str, paths: list[str], steps: int, batch_size: int, seq: int, cpus: float,
               gpus: float = 0.0) -> dict:
    gpu = gpus > 0
    return {
        "version": 1,
        "name": name,
        "base_model": base,
        "promote": "auto",
        "defaults": {
            "method": GPU_METHOD if gpu else CPU_METHOD,
            "train": {
                "steps": steps,
                "batch_size": batch_size,
                "max_seq_len": seq,
                "learning_rate": 3e-4 if gpu else 1e-3,
                "dtype": "bfloat16" if gpu else "float32",
                "eval_fraction": 0.1,
                "checkpoint_every": 25,
                "replay_weight": 0.0,
            },
        },  # the benchmark's jobs: plain LoRA (replay: bench/methods.py)
        "resources": {"cpus_per_job": cpus, "gpus_per_job": gpus},
        "tenants": [
            {"tenant": f"t{i:04d}", "persona": PERSONAS[i % 3], "dataset": p, "train": {"seed": i}}
            for i, p in enumerate(paths)
        ],
    }


class CpuMeter:
    """CPU seconds of every process on the machine while it runs, summed by what the process is."""

    GROUPS = (("trainers", "TrainerActor"), ("trainers", "ResidentWorker"),
              ("orchestrator", "adapterfab.jobs.orchestrate"), ("mlflow", "mlflow"), ("ray_data", "ray::Map"),
              ("ray_data", "ray::Read"),
              ("cli", "adapterfab submit"), ("ray_core", "raylet"), ("ray_core", "gcs_server"),
              ("ray_core", "dashboard"), ("ray_core", "ray::"), ("ray_core", "ray/"))

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil
        self.first: dict[tuple[int, float], float] = {}  # (pid, start time) -> CPU seconds
        self.last: dict[tuple[int, float], tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    # titles a Ray worker shows before it is given its task or actor (then re-read at every sample)
    PROVISIONAL = ("ray::IDLE", "default_worker")

    def _sample(self) -> None:
        for p in self.psutil.process_iter(["pid", "create_time", "cpu_times"]):
            try:
                t = p.info["cpu_times"]
                used = t.user + t.system
                key = (p.info["pid"], p.info["create_time"])
                # a process's command line is read until it is final (the meter's own CPU is taken from what
                # it measures): a Ray worker's title changes from ray::IDLE to its actor's or task's
                cmd = self.last[key][0] if key in self.last else ""
                if not cmd or any(w in cmd for w in self.PROVISIONAL):
                    cmd = " ".join(p.cmdline() or [])
            except (self.psutil.Error, TypeError):
                continue
            self.first.setdefault(key, used)
            self.last[key] = (cmd, used)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._sample()

    def __enter__(self) -> CpuMeter:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def by_group(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, (cmd, used) in self.last.items():
            spent = used - self.first.get(pid, used)
            if spent <= 0:
                continue
            group = next((g for g, needle in self.GROUPS if needle in cmd), "other")
            out[group] = round(out.get(group, 0.0) + spent, 1)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def top(self, n: int = 12) -> dict[str, float]:
        """CPU seconds by command (its program and first words), the ``n`` largest: where the
        non-trainer CPU goes, process kind by process kind."""
        out: dict[str, float] = {}
        for pid, (cmd, used) in self.last.items():
            spent = used - self.first.get(pid, used)
            if spent <= 0:
                continue
            words = cmd.split()
            name = " ".join([Path(words[0]).name, *words[1:3]])[:80] if words else "?"
            out[name] = round(out.get(name, 0.0) + spent, 1)
        return dict(sorted(out.items(), key=lambda kv: -kv[1])[:n])


def run_submit(home: Path, spec: dict, work: Path, tag: str) -> dict:
    import yaml

    path = work / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(spec))
    with CpuMeter() as meter:
        t0 = time.time()
        r = cli(home, "submit", str(path), "--wait")
        wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"submit failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    batch_id = r.stdout.split()[1]
    dump = json.loads(cli(home, "status", batch_id, "--json").stdout)
    jobs = dump["jobs"]
    stats = dump.get("stats") or {}
    first = stats.get("first_step_s")
    return {
        "batch_id": batch_id,
        "wall_s": round(wall, 2),
        "jobs": len(jobs),
        "succeeded": sum(j["state"] == "SUCCEEDED" for j in jobs),
        "adapters_per_hour": round(3600 * len(jobs) / wall, 1),
        "first_step_after_submit_s": round(first - t0, 2) if first else None,
        "mean_eval_loss": round(sum(j["metrics"].get("eval_loss", 0) for j in jobs) / len(jobs), 4),
        "mean_base_eval_loss": round(sum(j["metrics"].get("base_eval_loss", 0) for j in jobs) / len(jobs), 4),
        "all_beat_base": all(j["metrics"].get("eval_loss", 9e9) < j["metrics"].get("base_eval_loss", 0) for j in jobs),
        # what retention (adapterfab/retention.py) added to each job: the base's answers and the probe rows
        "retention_s_per_job": round(sum(j["metrics"].get("retention_s", 0) for j in jobs) / len(jobs), 2),
        "mean_retention": round(sum(j["metrics"].get("retention", 0) for j in jobs) / len(jobs), 4),
        "warm_trainers": [n for n, t in stats.get("trainers", {}).items() if t.get("warm")],
        "stats": stats,
        "cpu_s_by_process": meter.by_group(),
        "cpu_s_top_commands": meter.top(),
    }


def run_naive(base: str, spec: dict, sample: int, work: Path, threads: int) -> dict:
    times, evals = [], []
    device = "cuda:0" if spec["resources"]["gpus_per_job"] else None
    for i, t in enumerate(spec["tenants"][:sample]):
        job = {"base": base, "method": spec["defaults"]["method"], "dataset": t["dataset"], "threads": threads,
               "device": device,
               "train": {**spec["defaults"]["train"], **t.get("train", {})}, "out": str(work / f"naive{i}")}
        t0 = time.time()
        r = subprocess.run([sys.executable, "-c", NAIVE, json.dumps(job)], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"naive job failed:\n{r.stderr[-3000:]}")
        times.append(time.time() - t0)
        evals.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return {"jobs": sample, "wall_s": round(sum(times), 2), "per_job_s": [round(x, 2) for x in times],
            "adapters_per_hour": round(3600 * sample / sum(times), 1),
            "mean_eval_loss": round(sum(e["eval_loss"] for e in evals) / len(evals), 4)}


def run_fused(ray_address: str, base: str, spec: dict, slots: int, cpus: float, gpus: float = 0.0,
              probe_cache: str | None = None) -> dict:
    """The resident fused trainers alone: the batch's groups on ``slots`` trainer actors, with the same
    work per job as submit's trainers (eval and retention on the shipped probes, the base's answers
    from the same cache folder)."""
    import ray
    from transformers import AutoTokenizer

    from adapterfab.jobs.plan import balanced_groups, fusion_groups
    from adapterfab.jobs.resident import GroupJob, GroupTask, resident_actor
    from adapterfab.jobs.trainers import retire_idle_trainers
    from adapterfab.pipelines.data import DataRequest, prepare_many
    from adapterfab.retention import job_probes
    from adapterfab.spec import parse_spec

    _, jobs = parse_spec(spec)
    groups = balanced_groups(jobs, fusion_groups(jobs), slots)
    tok = AutoTokenizer.from_pretrained(base)
    gpu = "cuda" if gpus else None
    # the rows submit trains and evaluates: the product's own preparation (same split), run here
    data = prepare_many([DataRequest(f"f{i}", j.dataset, j.train.max_seq_len, j.train.eval_fraction, j.train.seed,
                                     j.train.max_bad_row_fraction) for i, j in enumerate(jobs)],
                        base, in_process_bytes=1 << 40)
    tasks = []
    for n, g in enumerate(groups):
        members = []
        for i in g:
            j, rows = jobs[i], data[f"f{i}"]
            if isinstance(rows, Exception):
                raise rows
            members.append(GroupJob(f"f{i}", j.method.model_dump(), j.train.model_dump(), rows.train, rows.eval,
                                    probes=job_probes(j.probes)))
        tasks.append(GroupTask(f"g{n}", members, tok.pad_token_id, probe_cache=probe_cache))
    ray.init(address=ray_address, log_to_driver=False)
    try:
        retire_idle_trainers()  # the submit's warm trainers hold the CPUs
        time.sleep(2)
        worker = resident_actor().options(num_cpus=cpus, num_gpus=gpus)
        actors = [worker.remote(base, jobs[0].method.model_dump(), jobs[0].train.dtype, 1 if gpu else max(1, int(cpus)),
                                None, gpu) for _ in range(min(slots, len(tasks)))]
        load_s = ray.get([a.stats.remote() for a in actors])
        # the same meter as submit's, so that its own CPU (~1-2 % of a core) weighs on both sides alike
        with CpuMeter() as meter:
            t0 = time.time()
            pending, results, queue = {}, [], list(tasks)
            for a in actors:
                if queue:
                    pending[a.train_group.remote(queue.pop(0))] = a
            while pending:
                done, _ = ray.wait(list(pending))
                a = pending.pop(done[0])
                results.append(ray.get(done[0]))
                if queue:
                    pending[a.train_group.remote(queue.pop(0))] = a
            wall = time.time() - t0
        for a in actors:
            ray.kill(a)
    finally:
        ray.shutdown()
    n = sum(len(r.outcomes) for r in results)
    flops = sum(r.timing["flops"] for r in results)
    return {
        "jobs": n,
        "wall_s": round(wall, 2),
        "adapters_per_hour": round(3600 * n / wall, 1),
        "flops": flops,
        "step_s": sum(r.timing["train_s"] for r in results),
        "groups": len(tasks),
        "trainers": len(load_s),
        "base_load_s": [round(s["load_s"], 2) for s in load_s],
        "train_s": round(sum(r.timing["train_s"] for r in results), 2),
        "eval_s": round(sum(r.timing["eval_s"] for r in results), 2),
        "achieved_gflops": round(flops / max(1e-9, sum(r.timing["train_s"] for r in results)) / 1e9 * len(load_s), 1),
        "mean_eval_loss": round(sum(o.metrics.get("eval_loss", 0) for r in results for o in r.outcomes) / n, 4),
        "cpu_s_by_process": meter.by_group(),
        "cpu_s_top_commands": meter.top(),
    }


def control_plane(home: Path, batch_id: str, tenant: str) -> dict:
    """Latency of what people poll: status (the command and the query), the dashboard's batch page,
    the registry for one tenant and for everyone."""
    import requests

    from adapterfab.registry import Registry
    from adapterfab.settings import Settings
    from adapterfab.state import StateStore

    os.environ["ADAPTERFAB_HOME"] = str(home)
    s = Settings.load()
    out: dict = {}

    def best(fn, n: int = 5) -> float:  # noqa: ANN001
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(min(times) * 1000, 1)

    out["status_command_ms"] = best(lambda: cli(home, "status", batch_id, "--json"), 3)
    out["status_query_ms"] = best(lambda: StateStore(s.state_url).dump(batch_id))
    key = cli(home, "keys", "create-operator").stdout.split()[-1]
    ui = json.loads((home / "stack.json").read_text())["ui_url"]
    out["dashboard_batch_ms"] = best(lambda: requests.get(f"{ui}/api/batches/{batch_id}",
                                                          headers={"Authorization": f"Bearer {key}"}, timeout=60))
    reg = Registry(s.mlflow_uri)
    out["registry_ls_tenant_ms"] = best(lambda: reg.list(tenant))
    out["registry_ls_all_ms"] = best(lambda: reg.list(), 2)
    out["registry_versions"] = sum(len(a.versions) for a in reg.list())
    return out


def machine(cpus: int, gpu: bool = False) -> str:
    """The CPU's model, core count and whether it has AVX-512 (bf16 and fp32 speed differ a lot); the GPU."""
    if gpu:
        import torch

        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}"
    model, flags = platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == platform.machine():
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    return f"{model}, {cpus} CPU, {'AVX-512' if 'avx512f' in flags else 'no AVX-512'}, CPU only"


def main() -> None:
    from stack_guard import add_deadline_arg, stop_cleanly  # (bench/, the script's own folder)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rows", type=int, default=48, help="rows per tenant file")
    ap.add_argument("--naive-sample", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=1,
                    help="submit and fused passes alternated this many times, the ratio over all of them (a VM's "
                         "speed drifts by ~5 %% between passes); each later submit trains the jobs as other tenants")
    ap.add_argument("--cpus-per-job", type=float, default=1.0)
    ap.add_argument("--tiny", action="store_true", help="control plane: 1,000 one-step jobs on a tiny random Llama")
    ap.add_argument("--smoke", action="store_true", help="a few tiny jobs; no result file")
    ap.add_argument("--keep", action="store_true", help="keep the stack's home (logs, state DB) after the run")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--gpus-per-job", type=float, default=1.0, help="GPU mode: a trainer slot's share of a GPU")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="GPU mode: the device's dense bf16 peak, for MFU")
    ap.add_argument("--tokenizer", default=os.environ.get("ADAPTERFAB_TOKENIZER_DIR"),
                    help="GPU mode: a folder with the SmolLM2 tokenizer (default: the converted SmolLM2 base)")
    add_deadline_arg(ap)
    args = ap.parse_args()
    stop_cleanly(args.deadline_s)  # a SIGTERM or the deadline still stops the stack it starts
    gpu = args.device == "cuda"
    if gpu:  # the standard GPU job, unless told otherwise
        defaults = {"jobs": 32, "steps": 10, "seq": 128, "rows": 48, "naive_sample": 4}
        for key, value in {"jobs": 64, "steps": 20, "seq": 512, "rows": 64, "naive_sample": 2}.items():
            if getattr(args, key) == defaults[key]:
                setattr(args, key, value)
    if args.tiny or args.smoke:
        args.jobs = 1000 if args.tiny and args.jobs == 32 else (4 if args.smoke else args.jobs)
        args.steps, args.rows, args.seq = (1, 12, 64) if args.tiny else (3, 12, 64)
        args.naive_sample = 1 if args.smoke else 2
    mode = "tiny" if args.tiny else ("smoke" if args.smoke else args.device)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from adapterfab.basemodel import resolve_base_model, tiny_random_llama

    cpus = os.cpu_count() or 2
    with contextlib.nullcontext(tempfile.mkdtemp(prefix="af-factory-bench-")) if args.keep else \
            tempfile.TemporaryDirectory(prefix="af-factory-bench-") as tmp:
        work = Path(tmp)
        print(f"work folder {work}", flush=True)
        home = work / "home"
        smollm2 = args.tokenizer if gpu and args.tokenizer else resolve_base_model("smollm2-135m-instruct").path
        n_params = 0
        if gpu:
            sys.path.insert(0, str(REPO / "bench"))
            from train_throughput import gpu_base

            base, n_params = gpu_base(work / "base", smollm2)
        else:
            base = tiny_random_llama(work / "tiny", smollm2) if (args.tiny or args.smoke) else smollm2
        ports = free_ports()
        r = cli(home, "up", "--mlflow-port", ports["mlflow"], "--ray-port", ports["ray"], "--dashboard-port",
                ports["dashboard"], "--serve-port", ports["serve"], "--ui-port", ports["ui"])
        if r.returncode != 0 and "retries it" in r.stderr:  # a port taken between picking and binding
            r = cli(home, "up")
        if r.returncode != 0:
            raise SystemExit(f"adapterfab up failed:\n{r.stderr}")
        try:
            paths = write_data(work / "data", args.jobs, args.rows, turns=12 if gpu else 1)
            gpus = args.gpus_per_job if gpu else 0.0
            spec = batch_spec(f"factory-{mode}", base, paths, args.steps, args.batch_size, args.seq, args.cpus_per_job,
                              gpus)
            from adapterfab.retention import answers_folder
            from adapterfab.settings import Settings

            answers = answers_folder(Settings.load())  # the machine's (ADAPTERFAB_CACHE), shared by homes
            cached = sorted(p.name for p in answers.glob("answers-*.json")) if answers.is_dir() else []
            submit = run_submit(home, spec, work, "main")
            # whether the bases' answers to the probes were there before (a first batch on this machine asks them)
            submit["answer_files_before"] = cached
            print(
                f"submit: {submit['wall_s']} s for {submit['jobs']} jobs = {submit['adapters_per_hour']}/h, first step "
                f"{submit['first_step_after_submit_s']} s after submit; stats {submit['stats']}",
                flush=True,
            )
            warm_spec = batch_spec(f"factory-{mode}-warm", base, paths[:2], args.steps, args.batch_size, args.seq,
                                   args.cpus_per_job, gpus)
            for t in warm_spec["tenants"]:
                t["tenant"] += "w"
            warm = run_submit(home, warm_spec, work, "warm")
            print(f"warm probe: first step {warm['first_step_after_submit_s']} s after submit, warm trainers "
                  f"{warm['warm_trainers']}", flush=True)
            cp = control_plane(home, submit["batch_id"], "t0001") if args.tiny or args.smoke else None
            if cp:
                print(f"control plane: {cp}", flush=True)
            naive = run_naive(base, spec, args.naive_sample, work, 1 if gpu else cpus)
            print(f"naive: {naive['adapters_per_hour']}/h ({naive['per_job_s']} s per job)", flush=True)
            stack = json.loads((home / "stack.json").read_text())
            fused = run_fused(
                stack["ray_address"],
                base,
                spec,
                submit["stats"].get("slots", 1),
                args.cpus_per_job,
                gpus,
                str(answers),
            )
            print(f"fused compute only: {fused['adapters_per_hour']}/h ({fused['wall_s']} s)", flush=True)
            pairs = [{"submit_s": submit["wall_s"], "fused_s": fused["wall_s"]}]
            for i in range(2, args.pairs + 1):  # the same jobs again as other tenants: nothing is reused
                again = batch_spec(f"factory-{mode}-{i}", base, paths, args.steps, args.batch_size, args.seq,
                                   args.cpus_per_job, gpus)
                for t in again["tenants"]:
                    t["tenant"] += f"p{i}"
                s_i = run_submit(home, again, work, f"pair{i}")
                f_i = run_fused(stack["ray_address"], base, again, s_i["stats"].get("slots", 1), args.cpus_per_job,
                                gpus, str(answers))
                pairs.append({"submit_s": s_i["wall_s"], "fused_s": f_i["wall_s"], "submit": s_i, "fused": f_i})
                trained = sum(t.get("groups", 0) for t in s_i["stats"].get("trainers", {}).values())
                print(f"pair {i}: submit {s_i['wall_s']} s ({trained} groups trained, {s_i['succeeded']} of "
                      f"{s_i['jobs']} jobs succeeded), fused {f_i['wall_s']} s", flush=True)
        finally:
            cli(home, "down", timeout_s=300)
    # over every pair: submit and fused passes alternate, so a drift of the machine weighs on both
    submit_s, fused_s = sum(p["submit_s"] for p in pairs), sum(p["fused_s"] for p in pairs)
    ratios = {"submit_over_naive": round(3600 * submit["jobs"] * len(pairs) / submit_s / naive["adapters_per_hour"], 2),
              "submit_over_fused": round(fused_s / submit_s, 3)}
    for p in pairs:
        p["submit_over_fused"] = round(p["fused_s"] / p["submit_s"], 3)
    non_compute = (submit_s - fused_s) / submit["jobs"] / len(pairs)
    if gpu:  # model FLOPs utilisation, counted as spent (jobs/fused.py ModelFlops), per device
        import torch

        peak = args.peak_tflops * 1e12
        st = submit["stats"]
        ratios["mfu_fused_step"] = round(fused["flops"] / max(1e-9, fused["step_s"]) / peak, 4)
        ratios["mfu_submit_step"] = round(st["flops"] / max(1e-9, st["group_train_s"]) / peak, 4)
        ratios["mfu_submit_end_to_end"] = round(
            st["flops"] / submit["wall_s"] / (peak * max(1, torch.cuda.device_count())), 4
        )
    what = (f"random Llama {n_params / 1e9:.2f}B QLoRA r16 all-linear" if gpu else
            ("tiny random Llama" if base != smollm2 else "SmolLM2-135M-Instruct") + " LoRA r8 q,v")
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "mode": mode,
        "machine": machine(cpus, gpu),
        "base": what,
        "jobs": args.jobs,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_seq_len": args.seq,
        "submit": submit,
        "warm_probe": warm,
        "naive": naive,
        "fused": fused,
        "ratios": ratios,
        "pairs": pairs,
        "non_compute_s_per_job": round(non_compute, 3),
        "control_plane": cp,
    }
    print(json.dumps({"ratios": ratios, "non_compute_s_per_job": result["non_compute_s_per_job"]}, indent=1))
    if args.smoke:
        return
    out = REPO / "bench" / "results" / f"factory_throughput-{mode}-{result['date']}.json"
    out.write_text(json.dumps(result, indent=1))
    flag = " --tiny" if args.tiny else (" --device cuda" if gpu else "")
    pairs_flag = f" --pairs {args.pairs}" if args.pairs > 1 else ""
    line = (
        f"- {result['date']} · factory_throughput.py{flag} · {result['machine']} · "
        f"{result['base']}, {args.jobs} jobs × {args.steps} steps × {args.batch_size} rows × "
        f"≤{args.seq} tokens · {'pair 1: ' if len(pairs) > 1 else ''}submit {submit['adapters_per_hour']}/h "
        f"({submit['wall_s']} s), naive "
        f"{naive['adapters_per_hour']}/h (sample of {naive['jobs']}), fused compute only "
        f"{fused['adapters_per_hour']}/h; {'over every pair: ' if len(pairs) > 1 else ''}submit/naive "
        f"{ratios['submit_over_naive']}×, submit/fused "
        f"{ratios['submit_over_fused']}×"
        + (f" over {len(pairs)} alternated pairs (submit / fused s: "
           + ", ".join(f"{p['submit_s']} / {p['fused_s']} = {p['submit_over_fused']}×" for p in pairs) + ")"
           if len(pairs) > 1 else "")
        + f"; first step {submit['first_step_after_submit_s']} s after submit "
        f"(warm trainers: {warm['first_step_after_submit_s']} s); non-compute {result['non_compute_s_per_job']} s/job; "
        f"retention measured on every job (mean {submit['mean_retention']:.2f}), {submit['retention_s_per_job']} s/job "
        f"in submit (the fused pass does the same, the naive one does not)"
        + (
            f"; MFU of the fused step {ratios['mfu_fused_step']:.1%} alone, {ratios['mfu_submit_step']:.1%} in submit, "
            f"{ratios['mfu_submit_end_to_end']:.1%} end to end (peak {args.peak_tflops:g} TFLOP/s)"
            if gpu
            else ""
        )
        + (
            f"; status {cp['status_command_ms']} ms (command) / {cp['status_query_ms']} ms (query), dashboard batch "
            f"{cp['dashboard_batch_ms']} ms, registry ls --tenant {cp['registry_ls_tenant_ms']} ms, all "
            f"{cp['registry_ls_all_ms']} ms over {cp['registry_versions']} versions"
            if cp
            else ""
        )
        + f" (`.venv/bin/python bench/factory_throughput.py{flag}{pairs_flag}`; bench/results/{out.name})"
    )
    results_md = REPO / "bench" / "RESULTS.md"
    text = results_md.read_text()
    header = "## factory_throughput.py — adapters per hour through `adapterfab submit` (issue 18)"
    if header not in text:
        text = text.rstrip("\n") + f"\n\n{header}\n"
    results_md.write_text(text.rstrip("\n") + "\n" + line + "\n")
    print(line)


if __name__ == "__main__":
    main()
