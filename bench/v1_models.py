"""A tenant's `GET /v1/models` (and `/v1/registry/adapters`) on the served HTTP API over a large
registry, as a client sees it: the stack (`adapterfab up`), the server (`adapterfab serve --detach`),
a tenant key (`adapterfab keys create`), and the OpenAI client's `models.list()`. In one run, the same
server listing from MLflow on every request (`serve --registry-from-mlflow`, the path every listing
took before) and from the registry catalogue in the state database (the default), on the same registry.

The registry is made directly in the stack's MLflow database through MLflow's own store, before
`adapterfab up`, as bench/registry_ls.py makes it (1,000 adapters x 10 versions over 200 tenants: the
measured tenant has 5 adapters, 50 versions, among 9,950 of other tenants). The catalogue is completed
by the server itself at start (one full listing from MLflow in the background); the timing waits for it.

    .venv/bin/python bench/v1_models.py             # 10,000 versions
    .venv/bin/python bench/v1_models.py --smoke     # 60 versions, no result file
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
sys.path.insert(0, str(REPO / "bench"))

from registry_ls import populate  # noqa: E402 - the same registry as the `registry ls` benchmark


def cli(env: dict[str, str], *args: str, timeout: float = 900) -> str:
    r = subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"adapterfab {' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def timed_listing(url: str, key: str, tenant: str, runs: int) -> dict:
    """Wall seconds of the OpenAI client's models.list() and of GET /v1/registry/adapters, one warm-up
    call each first (the first request after a deploy also routes through a new proxy)."""
    import httpx
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600)
    ids = sorted(m.id for m in client.models.list().data)
    models, registry = [], []
    with httpx.Client(timeout=600, headers={"Authorization": f"Bearer {key}"}) as h:
        listed = h.get(f"{url}/v1/registry/adapters")
        listed.raise_for_status()
        for _ in range(runs):
            t0 = time.monotonic()
            assert sorted(m.id for m in client.models.list().data) == ids
            models.append(time.monotonic() - t0)
            t0 = time.monotonic()
            assert h.get(f"{url}/v1/registry/adapters").json() == listed.json()
            registry.append(time.monotonic() - t0)

    def summary(walls: list[float]) -> dict:
        return {"runs": len(walls), "median_ms": round(statistics.median(walls) * 1000, 1),
                "p90_ms": round(sorted(walls)[int(0.9 * (len(walls) - 1))] * 1000, 1),
                "best_ms": round(min(walls) * 1000, 1)}

    return {"models": ids, "registry": listed.json(), "v1_models": summary(models),
            "v1_registry_adapters": summary(registry)}


def deploy(env: dict[str, str], port: int, *flags: str) -> float:
    t0 = time.monotonic()
    cli(env, "serve", "--detach", "--port", str(port), *flags)
    return time.monotonic() - t0


def main() -> None:
    from stack_guard import add_deadline_arg, stop_cleanly  # (bench/, the script's own folder)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--versions", type=int, default=10, help="versions per adapter")
    ap.add_argument("--tenants", type=int, default=200)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="20 adapters x 3 versions, 3 runs; no result file")
    add_deadline_arg(ap)
    args = ap.parse_args()
    stop_cleanly(args.deadline_s)  # a SIGTERM or the deadline still stops the stack it starts
    if args.smoke:
        args.adapters, args.versions, args.tenants, args.runs = 20, 3, 4, 3
    from adapterfab.procs import free_port
    from adapterfab.registry_index import RegistryIndex

    tenant = f"t{7 % args.tenants:04d}"
    with tempfile.TemporaryDirectory(prefix="af-v1-models-bench-") as tmp:
        home = Path(tmp) / "home"
        (home / "mlflow").mkdir(parents=True)
        populate_s = populate(home / "mlflow" / "mlflow.db", args.adapters, args.versions, args.tenants)
        n = args.adapters * args.versions
        print(f"populated {n} versions of {args.adapters} adapters in {populate_s:.1f} s", flush=True)
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "ADAPTERFAB_STATE_URL")}
        env["ADAPTERFAB_HOME"] = str(home)
        port = free_port()
        # no --ui-port (the bench reads no page): `up` picks the UI's port once Ray is up; a port picked
        # before was taken by one of Ray's own processes in a fresh-clone run (2026-12-07)
        cli(env, "up", "--num-cpus", "2", "--mlflow-port", str(free_port()), "--ray-port", str(free_port()),
            "--dashboard-port", str(free_port()), "--serve-port", str(port))
        try:
            key = cli(env, "keys", "create", tenant).split()[-1]
            url = f"http://127.0.0.1:{port}"
            deploy_mlflow_s = deploy(env, port, "--registry-from-mlflow")
            from_mlflow = timed_listing(url, key, tenant, args.runs)
            print(f"from MLflow: {from_mlflow['v1_models']}", flush=True)
            state_url = f"sqlite:///{home / 'state.db'}"
            assert not RegistryIndex(state_url).complete()  # nothing listed the registry whole yet
            deploy_catalogue_s = deploy(env, port)
            t0 = time.monotonic()
            while not RegistryIndex(state_url).complete():  # the server's own background listing
                if time.monotonic() - t0 > 900:
                    raise SystemExit("the server did not complete the registry catalogue in 900 s")
                time.sleep(0.5)
            completed_s = time.monotonic() - t0
            catalogue = timed_listing(url, key, tenant, args.runs)
            print(f"from the catalogue: {catalogue['v1_models']}", flush=True)
        finally:
            subprocess.run([CLI, "down"], env=env, capture_output=True, timeout=300)
    assert catalogue["models"] == from_mlflow["models"] and catalogue["registry"] == from_mlflow["registry"]
    mine = [i for i in range(args.adapters) if i % args.tenants == 7 % args.tenants]
    assert len(catalogue["models"]) == 1 + 3 * len(mine)  # the base, then each adapter and its two aliases
    from factory_throughput import machine

    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(os.cpu_count() or 2), "versions": n,
              "adapters": args.adapters, "tenants": args.tenants, "tenant": tenant,
              "tenant_adapters": len(mine), "tenant_versions": len(mine) * args.versions,
              "populate_s": round(populate_s, 1), "deploy_s": {"from_mlflow": round(deploy_mlflow_s, 1),
                                                               "catalogue": round(deploy_catalogue_s, 1)},
              "catalogue_completed_after_deploy_s": round(completed_s, 1),
              "from_mlflow": {k: from_mlflow[k] for k in ("v1_models", "v1_registry_adapters")},
              "catalogue": {k: catalogue[k] for k in ("v1_models", "v1_registry_adapters")},
              "ratios": {"v1_models_mlflow_over_catalogue": round(from_mlflow["v1_models"]["median_ms"]
                                                                  / catalogue["v1_models"]["median_ms"], 1)},
              "target_ms": 100}
    print(json.dumps(result, indent=1))
    if args.smoke:
        return
    out = REPO / "bench" / "results" / f"v1_models-cpu-{result['date']}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    line = (f"- {result['date']} · v1_models.py · {result['machine']} · {n} versions of {args.adapters} adapters "
            f"({args.tenants} tenants; the tenant has {len(mine)} adapters), served by `adapterfab serve`, "
            f"OpenAI client `models.list()`: median {catalogue['v1_models']['median_ms']} ms (p90 "
            f"{catalogue['v1_models']['p90_ms']}) from the catalogue vs {from_mlflow['v1_models']['median_ms']} ms "
            f"from MLflow = {result['ratios']['v1_models_mlflow_over_catalogue']}x (target 100 ms); "
            f"`/v1/registry/adapters` {catalogue['v1_registry_adapters']['median_ms']} vs "
            f"{from_mlflow['v1_registry_adapters']['median_ms']} ms; catalogue completed {completed_s:.1f} s after "
            f"deploy (`.venv/bin/python bench/v1_models.py`; bench/results/{out.name})")
    with (REPO / "bench" / "RESULTS.md").open("a") as f:
        f.write(line + "\n")
    print(f"wrote {out} and a line in bench/RESULTS.md")


if __name__ == "__main__":
    main()
