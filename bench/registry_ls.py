"""`adapterfab registry ls` over a large registry, as a user runs it (the CLI in a subprocess, against a
real MLflow server): from the state database's catalogue (adapterfab/registry_index.py) against the
same listing read from MLflow (`--refresh`, the path every listing took before), in one run.

The registry is made directly in the MLflow server's SQLite database through MLflow's own store
(making 10,000 versions through the REST API would take most of an hour here), shaped like the
factory's: one registered model per tenant/persona, versions with the factory's lineage tags
(about 20 each) and candidate/production aliases. The catalogue is built by the first `--refresh`.

    .venv/bin/python bench/registry_ls.py                    # 10,000 versions (1,000 adapters x 10)
    .venv/bin/python bench/registry_ls.py --smoke            # 60 versions, no result file (CI)
"""

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

from adapterfab.procs import tool

REPO = Path(__file__).resolve().parents[1]
CLI = tool("adapterfab")  # beside this interpreter, else on PATH (the GPU machine's pip --target)


def populate(db: Path, adapters: int, versions: int, tenants: int) -> float:
    from mlflow.entities.model_registry import ModelVersionTag, RegisteredModelTag
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    t0 = time.monotonic()
    store = SqlAlchemyStore(f"sqlite:///{db}")
    for i in range(adapters):
        tenant, persona = f"t{i % tenants:04d}", f"p{i:05d}"
        name = f"af.{tenant}.{persona}"
        store.create_registered_model(name, tags=[RegisteredModelTag("adapterfab.tenant", tenant),
                                                  RegisteredModelTag("adapterfab.persona", persona)])
        for v in range(1, versions + 1):
            tags = {"batch_id": f"b-20261202-{i:06d}-{v:02d}", "job_id": f"b-{i}.{tenant}.{persona}",
                    "method": "lora", "rank": "8", "target_modules": "q_proj,v_proj", "base_model": "smollm2-135m",
                    "base_fingerprint": "f" * 64, "dataset_sha256": f"{i:032x}{v:032x}", "job_fingerprint": "a" * 64,
                    "code_version": "0123456789ab", "artifact_uri": f"/srv/artifacts/{tenant}/{persona}/{v}",
                    "artifact_root": "/srv/artifacts", "metric.eval_loss": f"{1 + v / 100:.4f}",
                    "metric.base_eval_loss": "3.1234", "metric.train_loss": "0.4321", "training": "fused:8",
                    "promotion.decision": "promoted", "promotion.reason": "eval_loss beats base",
                    "promotion.metric": "eval_loss", "request": f"{i:016x}{v:016x}"}
            store.create_model_version(name, f"/srv/artifacts/{tenant}/{persona}/{v}", run_id=None,
                                       tags=[ModelVersionTag("adapterfab." + k, val) for k, val in tags.items()])
        store.set_registered_model_alias(name, "candidate", str(versions))
        store.set_registered_model_alias(name, "production", str(max(1, versions - 1)))
    store.engine.dispose()
    return time.monotonic() - t0


def timed(env: dict[str, str], *args: str, runs: int) -> dict:
    """Wall seconds of `adapterfab ARGS` (a fresh process each run, as a user types it)."""
    walls, out = [], ""
    for _ in range(runs):
        t0 = time.monotonic()
        r = subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=1800)
        walls.append(time.monotonic() - t0)
        if r.returncode != 0:
            raise SystemExit(f"adapterfab {' '.join(args)} failed:\n{r.stderr[-3000:]}")
        out = r.stdout
    return {"runs": [round(w, 3) for w in walls], "median_s": round(statistics.median(walls), 3),
            "best_s": round(min(walls), 3), "stdout": out}


def main() -> None:
    from stack_guard import add_deadline_arg, stop_cleanly  # (bench/, the script's own folder)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--versions", type=int, default=10, help="versions per adapter")
    ap.add_argument("--tenants", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="20 adapters x 3 versions; no result file")
    add_deadline_arg(ap)
    args = ap.parse_args()
    stop_cleanly(args.deadline_s)  # a SIGTERM or the deadline still stops the stack it starts
    if args.smoke:
        args.adapters, args.versions, args.tenants, args.runs = 20, 3, 4, 1
    from adapterfab.procs import free_port, start_mlflow, stop_pid

    with tempfile.TemporaryDirectory(prefix="af-registry-bench-") as tmp:
        home = Path(tmp)
        populate_s = populate(home / "mlflow.db", args.adapters, args.versions, args.tenants)
        n = args.adapters * args.versions
        print(f"populated {n} versions of {args.adapters} adapters in {populate_s:.1f} s", flush=True)
        server = start_mlflow(home, free_port())
        try:
            env = {**os.environ, "ADAPTERFAB_HOME": str(home / "af"), "MLFLOW_TRACKING_URI": server.url,
                   "ADAPTERFAB_STATE_URL": f"sqlite:///{home / 'state.db'}"}
            mlflow_ls = timed(env, "registry", "ls", "--json", "--refresh", runs=1 if n > 2000 else args.runs)
            catalogue_ls = timed(env, "registry", "ls", "--json", runs=args.runs)
            table_ls = timed(env, "registry", "ls", runs=args.runs)
            tenant_ls = timed(env, "registry", "ls", "--json", "--tenant", "t0007", runs=args.runs)
            tenant_mlflow_ls = timed(env, "registry", "ls", "--json", "--tenant", "t0007", "--refresh", runs=args.runs)
        finally:
            stop_pid(server.pid)
    listed = json.loads(catalogue_ls["stdout"])
    assert sum(len(a["versions"]) for a in listed) == n and listed == json.loads(mlflow_ls["stdout"])
    assert len(json.loads(tenant_ls["stdout"])) == len([i for i in range(args.adapters) if i % args.tenants == 7])
    assert json.loads(tenant_ls["stdout"]) == json.loads(tenant_mlflow_ls["stdout"])
    for r in (mlflow_ls, catalogue_ls, table_ls, tenant_ls, tenant_mlflow_ls):
        r.pop("stdout")
    sys.path.insert(0, str(REPO / "bench"))
    from factory_throughput import machine

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(os.cpu_count() or 2),
        "versions": n,
        "adapters": args.adapters,
        "tenants": args.tenants,
        "populate_s": round(populate_s, 1),
        "ls_json_from_mlflow": mlflow_ls,
        "ls_json_catalogue": catalogue_ls,
        "ls_table_catalogue": table_ls,
        "ls_json_one_tenant_catalogue": tenant_ls,
        "ls_json_one_tenant_from_mlflow": tenant_mlflow_ls,
        "ratios": {
            "mlflow_over_catalogue": round(mlflow_ls["median_s"] / catalogue_ls["median_s"], 1),
            "one_tenant_mlflow_over_catalogue": round(tenant_mlflow_ls["median_s"] / tenant_ls["median_s"], 1),
        },
    }
    print(json.dumps(result, indent=1))
    if args.smoke:
        return
    out = REPO / "bench" / "results" / f"registry_ls-cpu-{result['date']}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    line = (f"- {result['date']} · registry_ls.py · {result['machine']} · {n} versions of {args.adapters} "
            f"adapters ({args.tenants} tenants), through the `adapterfab` command · `registry ls --json`: "
            f"{catalogue_ls['median_s']} s from the catalogue vs {mlflow_ls['median_s']} s from MLflow (`--refresh`) "
            f"= {result['ratios']['mlflow_over_catalogue']}x; table {table_ls['median_s']} s; one tenant "
            f"{tenant_ls['median_s']} s vs {tenant_mlflow_ls['median_s']} s from MLflow "
            f"(`.venv/bin/python bench/registry_ls.py`; bench/results/{out.name})")
    with (REPO / "bench" / "RESULTS.md").open("a") as f:
        f.write(line + "\n")
    print(f"wrote {out} and a line in bench/RESULTS.md")


if __name__ == "__main__":
    main()
