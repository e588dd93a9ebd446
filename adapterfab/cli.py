"""``adapterfab``: the command line. Every subcommand has ``--help``.

    adapterfab up | down                       start/stop the local stack (idempotent)
    adapterfab validate BATCH.yaml             schema + semantic checks, no compute
    adapterfab plan BATCH.yaml                 jobs, resources, output adapter ids
    adapterfab submit BATCH.yaml [--wait]      run a batch; prints its id
    adapterfab status [BATCH_ID] [--json]      per-job state, progress, metrics
    adapterfab cancel BATCH_ID                 stop a batch; registered versions stay
    adapterfab logs BATCH_ID [JOB]             the batch's orchestrator log, or one job's lines
    adapterfab registry ls|show|promote        the MLflow registry
    adapterfab serve [--port 8000]             the OpenAI-compatible serving app (Ray Serve)
    adapterfab ... --json                      every command: one JSON document on stdout
    adapterfab keys create TENANT [--expires]  a new API key for a tenant
    adapterfab keys create-operator            a dashboard key that sees every tenant
    adapterfab keys list|revoke|rotate         key lifecycle (takes effect on running servers)
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from adapterfab.cli_batches import _wait, cancel, logs
from adapterfab.cli_common import (
    EXIT_CODES_HELP,
    EXIT_FAILED,
    EXIT_INVALID,
    _fail,
    _need_mlflow,
    _print_json,
    _settings,
    complete_batch_id,
    err,
    json_option,
    out,
)
from adapterfab.cli_keys import keys_app
from adapterfab.cli_registry import registry_app
from adapterfab.errors import AdapterfabError, SpecError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, help=__doc__.split("\n\n")[0],
                  epilog=EXIT_CODES_HELP)
app.add_typer(registry_app, name="registry")
app.add_typer(keys_app, name="keys")


@app.command()
def up(mlflow_port: int | None = typer.Option(None, help="MLflow port (default 5005 or a free one)"),
       ray_port: int | None = typer.Option(None, help="Ray GCS port (default 6390 or a free one)"),
       dashboard_port: int | None = typer.Option(None, help="Ray dashboard port (default 8265)"),
       serve_port: int | None = typer.Option(None, help="serving HTTP port (default 8000)"),
       num_cpus: int | None = typer.Option(None, help="CPUs the Ray head offers (default: all)"),
       artifacts_destination: str | None = typer.Option(None, help="MLflow artifacts: a folder or s3://"),
       backend_store_uri: str | None = typer.Option(None, help="MLflow backend (default SQLite)"),
       ui_port: int | None = typer.Option(None, help="dashboard UI port (default 8280 or a free one)"),
       as_json: bool = json_option()) -> None:
    """Start the local stack: Ray head, MLflow tracking server, dashboard UI. Idempotent."""
    from adapterfab.stack import up as stack_up

    s = _settings()
    try:
        info = stack_up(s, mlflow_port, ray_port, dashboard_port, serve_port, num_cpus,
                        artifacts_destination, backend_store_uri, ui_port)
    except AdapterfabError as e:
        _fail(e)
    if as_json:
        _print_json({"home": str(s.home), "ray_address": info.ray_address, **info.urls()})
        return
    out.print(f"stack up (home {s.home})")
    out.print(f"  MLflow:        {info.mlflow_uri}")
    out.print(f"  Ray dashboard: {info.dashboard_url}   (ray address {info.ray_address})")
    out.print(f"  serving:       {info.serve_url}   (start it with `adapterfab serve`)")
    out.print(f"  dashboard UI:  {info.ui_url}   (a key: `adapterfab keys create-operator`)")


@app.command()
def down(as_json: bool = json_option()) -> None:
    """Stop the local stack (Ray, MLflow, serving, running orchestrators). Idempotent."""
    from adapterfab.stack import down as stack_down

    s = _settings()
    try:
        stopped = stack_down(s)
    except AdapterfabError as e:  # a stack.json it cannot read: kept, and said (exit 1)
        _fail(e)
    if as_json:
        _print_json({"home": str(s.home), "stopped": stopped})
        return
    out.print("stopped: " + (", ".join(stopped) if stopped else f"nothing was running (home {s.home})"),
              markup=False)


@app.command()
def validate(batch: Path = typer.Argument(..., help="batch spec YAML"), as_json: bool = json_option()) -> None:
    """Check a batch spec (schema, ids, datasets, method, base model) without running anything.

    Exit code 2 on problems (with --json: {"ok": false, "problems": [{"field", "message"}, ...]})."""
    from adapterfab.jobs.admission import admit
    from adapterfab.spec import load_spec
    from adapterfab.storage import s3_object_error

    try:
        spec, jobs, _ = load_spec(batch)
        admit(spec, jobs, dataset_exists=s3_object_error)
    except SpecError as e:
        if as_json:
            _print_json({"ok": False, "problems": [{"field": f, "message": m} for f, m in e.problems]})
        _fail(e, EXIT_INVALID)
    if as_json:
        _print_json({"ok": True, "name": spec.name, "jobs": len(jobs), "tenants": len({j.tenant for j in jobs}),
                     "base_model": spec.base_model})
        return
    out.print(f"[green]ok[/green]: {escape(spec.name)}: {len(jobs)} job(s) for "
              f"{len({j.tenant for j in jobs})} tenant(s) on {escape(spec.base_model)}", markup=True)


@app.command()
def plan(batch: Path = typer.Argument(..., help="batch spec YAML"),
         as_json: bool = json_option()) -> None:
    """The jobs a batch would run: resources, estimates and output adapter ids."""
    from adapterfab.jobs.admission import admit
    from adapterfab.spec import load_spec
    from adapterfab.storage import s3_object_error

    try:
        spec, jobs, _ = load_spec(batch)
        planned = admit(spec, jobs, dataset_exists=s3_object_error, batch_id="new-batch")
    except SpecError as e:
        _fail(e, EXIT_INVALID)
    if as_json:
        _print_json([p.to_dict() for p in planned])
        return
    t = Table(title=escape(f"plan: {spec.name} on {spec.base_model}"))
    for col in ("adapter", "registry model", "method", "steps x batch", "cpus", "gpus", "trainable",
                "est. mem / worker", "est. train", "workers", "fused group"):
        t.add_column(col)
    for p in planned:
        t.add_row(p.adapter, p.registry_name, p.method, f"{p.steps} x {p.batch_size}", str(p.cpus), str(p.gpus),
                  f"{p.trainable_params:,}" if p.trainable_params else "?",
                  f"{p.est_memory_gb} GiB" if p.est_memory_gb is not None else "?",
                  f"≤ {p.est_train_s:g} s" if p.est_train_s is not None else "?",
                  f"{p.workers} (ZeRO-{p.zero_stage})" if p.workers > 1 else "1", p.fused_group or "-")
    out.print(t)
    if planned and all(p.est_train_s is not None for p in planned):
        total = sum(p.est_train_s * p.workers for p in planned)  # type: ignore[operator]
        out.print(f"estimated training time: ≤ {total:g} job-seconds in all (steps only, rows at max_seq_len)")


@app.command()
def submit(batch: Path | None = typer.Argument(None, help="batch spec YAML (not with --resume)"),
           wait: bool = typer.Option(False, "--wait", help="show progress until every job is terminal"),
           timeout_s: float = typer.Option(0, help="with --wait: give up waiting after this long (0: never)"),
           force: bool = typer.Option(False, "--force", help="retrain jobs whose spec, data and code already "
                                                            "produced a registered version (default: reuse it)"),
           address: str | None = typer.Option(None, "--address", help="run on a Ray cluster through the "
                                                 "Ray Jobs API: http://HEAD:8265 or ray://HEAD:10001"),
           resume: str | None = typer.Option(None, "--resume", metavar="BATCH_ID",
                                                help="finish a batch whose orchestrator died (or a cancelled "
                                                     "one): SUCCEEDED jobs stay as they are, the others run again"),
           as_json: bool = json_option("one JSON document on stdout: the batch id (with --wait: the batch's "
                                       "status at its end; progress goes to stderr)")
           ) -> None:
    """Validate and run a batch; prints its id.

    With --wait, exit code 0 only if every job succeeded (1: a job failed, 4: the batch was cancelled)."""
    from adapterfab.jobs.admission import admit
    from adapterfab.jobs.orchestrate import create_batch, launch_detached, new_batch_id, prepare_resume
    from adapterfab.spec import load_spec
    from adapterfab.stack import local_stack_down
    from adapterfab.storage import s3_object_error

    s = _settings()
    say = err if as_json else out
    if resume:
        if batch is not None or address:
            _fail(AdapterfabError("--resume BATCH_ID takes no spec file and no --address"), EXIT_INVALID)
        try:
            if local_stack_down(s):
                raise AdapterfabError("the local stack is not running: run `adapterfab up` first")
            _need_mlflow(s)
            todo = prepare_resume(s, resume)
        except AdapterfabError as e:
            _fail(e)
        launched = launch_detached(s, resume) if todo else None
        if wait or not todo:
            say.print(f"batch {resume}  (resuming: {todo} job(s) to finish)", markup=False)
            raise typer.Exit(_wait(s, resume, timeout_s, as_json=as_json, launched=launched))
        if as_json:
            _print_json({"batch_id": resume, "resumed_jobs": todo})
        else:
            out.print(f"batch {resume}  (resuming: {todo} job(s) to finish)")
        return
    if batch is None:
        _fail(AdapterfabError("a batch spec file is needed (or --resume BATCH_ID)"), EXIT_INVALID)
    try:
        checked = load_spec(batch)  # refuse a bad spec before anything else; validated and planned once
        batch_id = new_batch_id()
        planned = admit(checked[0], checked[1], dataset_exists=s3_object_error, batch_id=batch_id)
        if address:
            from adapterfab.jobs.remote import follow, submit_remote

            sid = submit_remote(address, batch, batch_id, force)
            if not wait:
                if as_json:
                    _print_json({"batch_id": batch_id, "submission_id": sid, "address": address})
                else:
                    out.print(f"batch {batch_id}  (Ray Job {sid} on {address})")
                return
            say.print(f"batch {batch_id}  (Ray Job {sid} on {address})")
            final = follow(address, batch_id, lambda line: say.print(line, markup=False), timeout_s)
            if as_json:
                _print_json({"batch_id": batch_id, "submission_id": sid, "address": address, "status": final})
            else:
                out.print(f"Ray Job {sid}: {final}")
            raise typer.Exit(0 if final == "SUCCEEDED" else EXIT_FAILED)
        if local_stack_down(s):
            raise AdapterfabError("the local stack is not running: run `adapterfab up` first")
        _need_mlflow(s)
        batch_id = create_batch(s, batch, force=force, batch_id=batch_id, checked=(*checked, planned))
    except SpecError as e:
        _fail(e, EXIT_INVALID)
    except AdapterfabError as e:
        _fail(e)
    launched = launch_detached(s, batch_id)
    if wait:
        say.print(f"batch {batch_id}")
        raise typer.Exit(_wait(s, batch_id, timeout_s, as_json=as_json, launched=launched))
    if as_json:
        _print_json({"batch_id": batch_id})
    else:
        out.print(f"batch {batch_id}")


@app.command()
def run(batch: Path = typer.Argument(..., help="batch spec YAML"),
        batch_id: str | None = typer.Option(None, "--batch-id", help="id to record the batch under"),
        force: bool = typer.Option(False, "--force", help="retrain even if an identical version exists"),
        as_json: bool = json_option("one JSON document on stdout: the batch's status at its end (progress "
                                    "goes to stderr)")
        ) -> None:
    """Run a batch in the foreground on the Ray cluster this process is on.

    What a Ray Job or a KubeRay RayJob runs (`submit --address` uses it). Exit code 0 only if every job
    succeeded (1: a job failed, 4: the batch was cancelled)."""
    import logging
    import threading

    from adapterfab.jobs.orchestrate import create_batch, run_batch

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # the job log shows our progress lines
    s = _settings()
    try:
        _need_mlflow(s)
        bid = create_batch(s, batch, force=force, batch_id=batch_id)
    except SpecError as e:
        _fail(e, EXIT_INVALID)
    except AdapterfabError as e:
        _fail(e)
    (err if as_json else out).print(f"batch {bid}")
    failure: list[BaseException] = []

    def orchestrate() -> None:
        try:
            run_batch(s, bid)
        except BaseException as e:  # noqa: BLE001 - reported below; the batch never started
            failure.append(e)

    worker = threading.Thread(target=orchestrate, name="orchestrator", daemon=True)
    worker.start()
    code = _wait(s, bid, 0, finished=lambda: not worker.is_alive(), as_json=as_json)
    worker.join()
    if failure:
        err.print(f"the batch {bid} could not run: {failure[0]}", markup=False)
    raise typer.Exit(code)


@app.command()
def status(batch_id: str | None = typer.Argument(None, help="a batch id (default: list batches)",
                                              autocompletion=complete_batch_id),
           as_json: bool = json_option(),
           every_job: bool = typer.Option(False, "--all", help="every job of a large batch, not only those "
                                                               "still running or failed"),
           address: str | None = typer.Option(None, "--address", help="a batch submitted with "
                                                 "`submit --address`: its Ray Job's status and log")) -> None:
    """Per-job state, progress and final metrics of a batch, or the list of batches.

    (On the default SQLite state DB the `adapterfab` command answers this in adapterfab.status, without
    this module.)"""
    from adapterfab.state import StateStore
    from adapterfab.status import print_status, status_json

    s = _settings()
    if address:
        from adapterfab.jobs.remote import remote_status

        if not batch_id:
            _fail(AdapterfabError("--address needs a batch id"), EXIT_INVALID)
        try:
            info = remote_status(address, batch_id)  # type: ignore[arg-type]
        except AdapterfabError as e:
            _fail(e)
        if as_json:
            _print_json(info)
        else:
            out.print(f"Ray Job {info['submission_id']}: {info['status']} {info['message']}", markup=False)
            out.print("\n".join(info["logs"].splitlines()[-40:]), markup=False)
        return
    state = StateStore(s.state_url)
    try:
        if batch_id is None:
            rows = [{"id": b.id, "name": b.name, "state": b.state, "created_s": b.created_s,
                     "jobs": sum(state.job_counts(b.id).values())} for b in state.list_batches()]
            if as_json:
                sys.stdout.write(status_json(rows) + "\n")
            else:
                from adapterfab.status import print_batches

                print_batches(rows, out)
            return
        dump = state.dump(batch_id)
    except AdapterfabError as e:
        _fail(e)
    if as_json:  # written as is: a console renderer takes seconds over a thousand jobs
        sys.stdout.write(status_json(dump) + "\n")
    else:
        print_status(dump, every_job, out)


app.command()(cancel)
app.command()(logs)


@app.command()
def serve(port: int | None = typer.Option(None, help="HTTP port (default: the stack's, 8000)"),
          host: str = typer.Option("127.0.0.1", help="address to bind: 127.0.0.1 (this machine only) or "
                                                     "0.0.0.0 (every interface: put TLS and a firewall in front)"),
          base_model: str = typer.Option("smollm2-135m-instruct", help="the shared base model"),
          detach: bool = typer.Option(False, "--detach", help="deploy and return; the app stays on Ray"),
          replicas: int = typer.Option(1, min=1, help="engine replicas (Ray Serve deployment replicas)"),
          device: str = typer.Option(
              "cpu", autocompletion=lambda incomplete: [d for d in ("cpu", "cuda", "auto") if d.startswith(incomplete)],
              help="where each engine replica runs: cpu, cuda (one GPU per replica; an error without GPUs in "
                   "the cluster) or auto (cuda when the cluster has GPUs)"),
          dtype: str = typer.Option("float32", help="float32 or bfloat16"),
          registry_catalogue: bool = typer.Option(
              True, "--registry-catalogue/--registry-from-mlflow",
              help="list /v1/models and /v1/registry from the registry catalogue (fast at any size), or "
                   "from MLflow on every request (sees changes made in MLflow's UI at once)"),
          tenant_rps: float | None = typer.Option(
              None, "--tenant-rps", min=0,
              help="requests per second each tenant may send, on every route (default 50; 0: unlimited)"),
          tenant_burst: int | None = typer.Option(None, "--tenant-burst", min=1,
                                                     help="requests a tenant may send at once (default 100)"),
          max_tokens_cap: int | None = typer.Option(
              None, "--max-tokens-cap", min=1,
              help="the most tokens one reply may ask for (more: a 400); a request naming no max_tokens gets up "
                   "to the rest of its context within it (default: the context is the only limit)"),
          json_logs: bool = typer.Option(False, "--json-logs", help="the replicas' log lines as JSON objects, each "
                                                                   "with its request_id"),
          as_json: bool = json_option("one JSON line on stdout once serving: url, openai_base_url, host, port, "
                                      "replicas, device")) -> None:
    """Serve every tenant's adapters from one base model: OpenAI-compatible /v1/chat/completions."""
    from adapterfab.jobs.trainers import retire_idle_trainers
    from adapterfab.serve.deploy import DEVICES, serve_forever

    if device not in DEVICES:
        _fail(AdapterfabError(f"--device {device!r}: use one of {', '.join(DEVICES)}"), EXIT_INVALID)
    s = _settings()

    def announce(url: str, placed: str) -> None:
        if as_json:
            _print_json({"url": url, "openai_base_url": f"{url}/v1", "host": host, "port": int(url.rsplit(":", 1)[1]),
                         "replicas": replicas, "device": placed, "detached": detach})
        else:
            out.print(f"serving on {url}  (OpenAI base_url {url}/v1; {replicas} replica(s) on {placed})",
                      markup=False)

    try:
        url = serve_forever(
            s,
            port=port,
            host=host,
            base_model=base_model,
            detach=detach,
            replicas=replicas,
            device=device,
            dtype=dtype,
            registry_catalogue=registry_catalogue,
            tenant_rps=tenant_rps,
            tenant_burst=tenant_burst,
            max_tokens_cap=max_tokens_cap,
            json_logs=json_logs,
            announce=announce,
            # warm trainers hold devices the replicas need; busy ones stay
            before_deploy=retire_idle_trainers,
        )
    except AdapterfabError as e:
        _fail(e)
    if detach and not as_json:
        out.print(f"deployed; stop with `adapterfab down`  ({url})", markup=False)


def main() -> None:
    try:
        app()
    except AdapterfabError as e:
        err.print(f"error: {e}", markup=False)
        sys.exit(EXIT_FAILED)
    except Exception as e:  # MLflow's own errors (a registry change it refused half-way): a line, not a traceback
        if type(e).__module__.split(".")[0] not in ("mlflow", "requests", "urllib3"):
            raise
        err.print(f"error: the MLflow server failed: {e}", markup=False)
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
