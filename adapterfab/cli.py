"""``adapterfab``: the command line. Every subcommand has ``--help``.

    adapterfab up | down                       start/stop the local stack (idempotent)
    adapterfab validate BATCH.yaml             schema + semantic checks, no compute
    adapterfab plan BATCH.yaml                 jobs, resources, output adapter ids
    adapterfab submit BATCH.yaml [--wait]      run a batch; prints its id
    adapterfab status [BATCH_ID] [--json]      per-job state, progress, metrics
    adapterfab registry ls|show|promote        the MLflow registry
    adapterfab serve [--port 8000]             the OpenAI-compatible serving app (Ray Serve)
    adapterfab keys create TENANT [--expires]  a new API key for a tenant
    adapterfab keys create-operator            a dashboard key that sees every tenant
    adapterfab keys list|revoke|rotate         key lifecycle (takes effect on running servers)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from adapterfab.errors import AdapterfabError, SpecError
from adapterfab.settings import Settings

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help=__doc__.split("\n\n")[0]
)
registry_app = typer.Typer(no_args_is_help=True, help="Registered adapters (MLflow registry).")
keys_app = typer.Typer(no_args_is_help=True, help="API keys: per tenant (serving, dashboard) and operator (dashboard).")
app.add_typer(registry_app, name="registry")
app.add_typer(keys_app, name="keys")
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(e: Exception, code: int = 1) -> None:
    err.print(f"[red]error:[/red] {e}")
    raise typer.Exit(code)


def _settings() -> Settings:
    s = Settings.load()
    s.ensure_dirs()
    return s


def _need_mlflow(s: Settings) -> str:
    if not s.mlflow_uri:
        _fail(AdapterfabError("no MLflow server known: run `adapterfab up` (or set MLFLOW_TRACKING_URI)"))
    return s.mlflow_uri  # type: ignore[return-value]


def _registry(s: Settings) -> Any:
    """The MLflow registry with the state database's catalogue (adapterfab/registry_index.py), which
    listings read and changes made here keep current; without a usable state database, MLflow alone."""
    from adapterfab.registry import Registry
    from adapterfab.registry_index import RegistryIndex

    uri = _need_mlflow(s)
    try:
        index = RegistryIndex(s.state_url)
    except Exception as e:  # noqa: BLE001 - the catalogue is a cache of MLflow: list from MLflow instead
        err.print(f"warning: the state database at {s.state_url} is unusable ({e}); reading MLflow alone",
                  markup=False)
        index = None
    return Registry(uri, index=index)


@app.command()
def up(mlflow_port: int | None = typer.Option(None, help="MLflow port (default 5005 or a free one)"),
       ray_port: int | None = typer.Option(None, help="Ray GCS port (default 6390 or a free one)"),
       dashboard_port: int | None = typer.Option(None, help="Ray dashboard port (default 8265)"),
       serve_port: int | None = typer.Option(None, help="serving HTTP port (default 8000)"),
       num_cpus: int | None = typer.Option(None, help="CPUs the Ray head offers (default: all)"),
       artifacts_destination: str | None = typer.Option(None, help="MLflow artifacts: a folder or s3://"),
       backend_store_uri: str | None = typer.Option(None, help="MLflow backend (default SQLite)"),
       ui_port: int | None = typer.Option(None, help="dashboard UI port (default 8280 or a free one)")) -> None:
    """Start the local stack: Ray head, MLflow tracking server, dashboard UI. Idempotent."""
    from adapterfab.stack import up as stack_up

    s = _settings()
    try:
        info = stack_up(s, mlflow_port, ray_port, dashboard_port, serve_port, num_cpus,
                        artifacts_destination, backend_store_uri, ui_port)
    except AdapterfabError as e:
        _fail(e)
    out.print(f"stack up (home {s.home})")
    out.print(f"  MLflow:        {info.mlflow_uri}")
    out.print(f"  Ray dashboard: {info.dashboard_url}   (ray address {info.ray_address})")
    out.print(f"  serving:       {info.serve_url}   (start it with `adapterfab serve`)")
    out.print(f"  dashboard UI:  {info.ui_url}   (a key: `adapterfab keys create-operator`)")


@app.command()
def down() -> None:
    """Stop the local stack (Ray, MLflow, serving, running orchestrators). Idempotent."""
    from adapterfab.stack import down as stack_down

    stopped = stack_down(_settings())
    out.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command()
def validate(batch: Path = typer.Argument(..., help="batch spec YAML")) -> None:
    """Check a batch spec (schema, ids, datasets, method, base model) without running anything."""
    from adapterfab.jobs.admission import admit
    from adapterfab.spec import load_spec
    from adapterfab.storage import s3_object_error

    try:
        spec, jobs, _ = load_spec(batch)
        admit(spec, jobs, dataset_exists=s3_object_error)
    except SpecError as e:
        _fail(e, 2)
    out.print(f"[green]ok[/green]: {spec.name}: {len(jobs)} job(s) for "
              f"{len({j.tenant for j in jobs})} tenant(s) on {spec.base_model}")


@app.command()
def plan(batch: Path = typer.Argument(..., help="batch spec YAML"),
         as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """The jobs a batch would run: resources, estimates and output adapter ids."""
    from adapterfab.jobs.admission import admit
    from adapterfab.spec import load_spec
    from adapterfab.storage import s3_object_error

    try:
        spec, jobs, _ = load_spec(batch)
        planned = admit(spec, jobs, dataset_exists=s3_object_error, batch_id="new-batch")
    except SpecError as e:
        _fail(e, 2)
    if as_json:
        out.print_json(json.dumps([p.to_dict() for p in planned]))
        return
    t = Table(title=f"plan: {spec.name} on {spec.base_model}")
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


def _print_status(dump: dict, every_job: bool = False) -> None:
    from adapterfab.status import print_status

    print_status(dump, every_job, out)


@app.command()
def submit(batch: Path | None = typer.Argument(None, help="batch spec YAML (not with --resume)"),
           wait: bool = typer.Option(False, "--wait", help="show progress until every job is terminal"),
           timeout_s: float = typer.Option(0, help="with --wait: give up waiting after this long (0: never)"),
           force: bool = typer.Option(False, "--force", help="retrain jobs whose spec, data and code already "
                                                            "produced a registered version (default: reuse it)"),
           address: str | None = typer.Option(None, "--address", help="run on a Ray cluster through the "
                                                 "Ray Jobs API: http://HEAD:8265 or ray://HEAD:10001"),
           resume: str | None = typer.Option(None, "--resume", metavar="BATCH_ID",
                                                help="finish a batch whose orchestrator died: SUCCEEDED jobs "
                                                     "stay as they are, the others run again")
           ) -> None:
    """Validate and run a batch. Prints the batch id; exit code 0 (with --wait) only if all succeeded."""
    from adapterfab.jobs.admission import admit
    from adapterfab.jobs.orchestrate import create_batch, launch_detached, new_batch_id, prepare_resume
    from adapterfab.spec import load_spec
    from adapterfab.stack import read_stack, stack_alive
    from adapterfab.storage import s3_object_error

    s = _settings()
    if resume:
        if batch is not None or address:
            _fail(AdapterfabError("--resume BATCH_ID takes no spec file and no --address"), 2)
        try:
            local = read_stack(s)
            if not s.ray_address or (local is not None and not stack_alive(local)):
                raise AdapterfabError("the local stack is not running: run `adapterfab up` first")
            _need_mlflow(s)
            todo = prepare_resume(s, resume)
        except AdapterfabError as e:
            _fail(e)
        out.print(f"batch {resume}  (resuming: {todo} job(s) to finish)")
        if todo:
            launch_detached(s, resume)
        if wait or not todo:
            raise typer.Exit(_wait(s, resume, timeout_s))
        return
    if batch is None:
        _fail(AdapterfabError("a batch spec file is needed (or --resume BATCH_ID)"), 2)
    try:
        checked = load_spec(batch)  # refuse a bad spec before anything else; validated and planned once
        batch_id = new_batch_id()
        planned = admit(checked[0], checked[1], dataset_exists=s3_object_error, batch_id=batch_id)
        if address:
            from adapterfab.jobs.remote import follow, submit_remote

            sid = submit_remote(address, batch, batch_id, force)
            out.print(f"batch {batch_id}  (Ray Job {sid} on {address})")
            if wait:
                final = follow(address, batch_id, lambda line: out.print(line, markup=False), timeout_s)
                out.print(f"Ray Job {sid}: {final}")
                raise typer.Exit(0 if final == "SUCCEEDED" else 1)
            return
        local = read_stack(s)
        if not s.ray_address or (local is not None and not stack_alive(local)):
            raise AdapterfabError("the local stack is not running: run `adapterfab up` first")
        _need_mlflow(s)
        batch_id = create_batch(s, batch, force=force, batch_id=batch_id, checked=(*checked, planned))
    except SpecError as e:
        _fail(e, 2)
    except AdapterfabError as e:
        _fail(e)
    launch_detached(s, batch_id)
    out.print(f"batch {batch_id}")
    if wait:
        raise typer.Exit(_wait(s, batch_id, timeout_s))


@app.command()
def run(batch: Path = typer.Argument(..., help="batch spec YAML"),
        batch_id: str | None = typer.Option(None, "--batch-id", help="id to record the batch under"),
        force: bool = typer.Option(False, "--force", help="retrain even if an identical version exists")
        ) -> None:
    """Run a batch in the foreground on the Ray cluster this process belongs to (what a Ray Job or a
    KubeRay RayJob runs; `submit --address` uses it). Exit code 0 only if every job succeeded."""
    import logging
    import threading

    from adapterfab.jobs.orchestrate import create_batch, run_batch

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # the job log shows our progress lines
    s = _settings()
    try:
        _need_mlflow(s)
        bid = create_batch(s, batch, force=force, batch_id=batch_id)
    except SpecError as e:
        _fail(e, 2)
    except AdapterfabError as e:
        _fail(e)
    out.print(f"batch {bid}")
    failure: list[BaseException] = []

    def orchestrate() -> None:
        try:
            run_batch(s, bid)
        except BaseException as e:  # noqa: BLE001 - reported below; the batch never started
            failure.append(e)

    worker = threading.Thread(target=orchestrate, name="orchestrator", daemon=True)
    worker.start()
    code = _wait(s, bid, 0, finished=lambda: not worker.is_alive())
    worker.join()
    if failure:
        err.print(f"the batch {bid} could not run: {failure[0]}")
    raise typer.Exit(code)


def _wait(s: Settings, batch_id: str, timeout_s: float, finished: Any = None) -> int:
    """Print progress until the batch is terminal; ``finished()`` says the in-process orchestrator ended."""
    from adapterfab.state import StateStore

    state = StateStore(s.state_url)
    t0 = time.monotonic()
    last: dict[str, tuple] = {}
    since = 0.0
    while True:
        b = state.get_batch(batch_id)
        polled = time.time()
        for j in state.jobs_changed(batch_id, since - 2.0):  # what changed since the last poll (clock slack)
            key = (j.state.value, j.step)
            if last.get(j.id) != key:
                last[j.id] = key
                loss = f" loss {j.loss:.3f}" if j.loss is not None else ""
                extra = f" -> version {j.model_version}" if j.model_version else ""
                extra += " (reused: same spec, data and code; --force retrains)" if j.reused_version else ""
                why = f": {j.error}" if j.error else ""
                out.print(f"[{time.monotonic() - t0:6.0f}s] {j.tenant}/{j.persona} {j.state.value} "
                          f"{j.step}/{j.total_steps}{loss}{extra}{why}", markup=False)
        since = polled
        if b.state in ("SUCCEEDED", "FAILED"):
            _print_status(state.dump(batch_id))
            return 0 if b.state == "SUCCEEDED" else 1
        if finished is not None and finished() and state.get_batch(batch_id).state not in ("SUCCEEDED", "FAILED"):
            return 1
        if b.orchestrator_pid and not state.orchestrator_alive(b) and time.monotonic() - t0 > 10:
            b = state.get_batch(batch_id)
            if b.state not in ("SUCCEEDED", "FAILED"):
                err.print(f"the orchestrator of {batch_id} died; see {s.logs / (batch_id + '.log')}")
                return 1
        if timeout_s and time.monotonic() - t0 > timeout_s:
            err.print(f"stopped waiting after {timeout_s:.0f}s; the batch goes on (`adapterfab status {batch_id}`)")
            return 1
        time.sleep(1.0)


@app.command()
def status(batch_id: str | None = typer.Argument(None, help="a batch id (default: list batches)"),
           as_json: bool = typer.Option(False, "--json"),
           every_job: bool = typer.Option(False, "--all", help="every job of a large batch, not only those "
                                                               "still running or failed"),
           address: str | None = typer.Option(None, "--address", help="a batch submitted with "
                                                 "`submit --address`: its Ray Job's status and log")) -> None:
    """Per-job state, progress and final metrics of a batch, or the list of batches. (On the default
    SQLite state DB the `adapterfab` command answers this in adapterfab.status, without this module.)"""
    from adapterfab.state import StateStore, dumps
    from adapterfab.status import status_json

    s = _settings()
    if address:
        from adapterfab.jobs.remote import remote_status

        if not batch_id:
            _fail(AdapterfabError("--address needs a batch id"), 2)
        try:
            info = remote_status(address, batch_id)  # type: ignore[arg-type]
        except AdapterfabError as e:
            _fail(e)
        if as_json:
            out.print(dumps(info), markup=False)
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
        _print_status(dump, every_job)


@registry_app.command("ls")
def registry_ls(tenant: str | None = typer.Option(None, help="only this tenant's adapters"),
                refresh: bool = typer.Option(False, "--refresh", help="read MLflow itself (and, without "
                                             "--tenant, rebuild the catalogue): changes made in MLflow directly"),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """Registered adapters with their versions and aliases, from the state database's catalogue of the
    registry (adapterfab keeps it current with its own changes; --refresh reads MLflow)."""
    from adapterfab.ids import check_id

    s = _settings()
    try:
        if tenant:
            check_id(tenant, "tenant")
        items = _registry(s).list(tenant, refresh=refresh)
    except AdapterfabError as e:
        _fail(e)
    from adapterfab.registry_view import print_adapters
    from adapterfab.status import status_json

    if as_json:  # written as is (10,000 versions are ~15 MB, which a console renderer takes seconds over)
        sys.stdout.write(status_json([r.to_dict() for r in items]) + "\n")
    else:
        print_adapters([r.to_dict() for r in items], out)


@registry_app.command("show")
def registry_show(adapter: str = typer.Argument(..., help="TENANT/PERSONA[@ALIAS|@VERSION]"),
                  as_json: bool = typer.Option(False, "--json")) -> None:
    """One adapter version with its lineage tags (a bare id means production, else candidate)."""
    from adapterfab.ids import AdapterId
    from adapterfab.registry import Registry

    s = _settings()
    try:
        v = Registry(_need_mlflow(s)).resolve(AdapterId.parse(adapter))
    except AdapterfabError as e:
        _fail(e)
    if as_json:
        _print_json(v.to_dict())
        return
    out.print(f"[bold]{v.id}[/bold]  aliases: {', '.join(v.aliases) or '-'}")
    out.print(f"  source:   {v.source}\n  files:    {v.artifact_uri}\n  run:      {v.run_id}")
    from adapterfab.retention import describe

    out.print(f"  {describe(v.metrics) or 'retention not measured'}")
    for k, val in sorted(v.tags.items()):
        out.print(f"  {k.removeprefix('adapterfab.')}: {val}")


def _print_json(obj: object) -> None:
    out.print(json.dumps(obj, indent=2, default=str), markup=False)


@registry_app.command("promote")
def registry_promote(adapter: str = typer.Argument(..., help="TENANT/PERSONA"),
                     version: int = typer.Argument(..., help="the version to point the alias at"),
                     alias: str = typer.Option("production", help="alias to move"),
                     metric: str = typer.Option("eval_loss", help="production gate: the metric compared"),
                     margin: float = typer.Option(0.0, help="production gate: absolute improvement required"),
                     relative_margin: float = typer.Option(0.0, help="production gate: relative improvement"),
                     min_retention: float = typer.Option(0.9, help="production gate: the share of the base's "
                                                         "probe facts the version must keep (0: no check)"),
                     force: bool = typer.Option(False, "--force", help="skip the eval gate"),
                     as_json: bool = typer.Option(False, "--json")) -> None:
    """Point an alias (default production) at a version. `production` is eval-gated: the version must
    keep MIN_RETENTION of the facts the base states and beat the base model and the current production
    version on METRIC (unless --force); the decision
    is recorded on the version either way. Serving follows without a restart."""
    from adapterfab.ids import PRODUCTION, AdapterId, check_alias
    from adapterfab.promotion import Decision, Policy, gate_decision

    s = _settings()
    try:
        aid = AdapterId.parse(adapter).unversioned()
        registry = _registry(s)
        v = registry.get(aid.with_version(version))
        if check_alias(alias) != PRODUCTION:
            v = registry.set_alias(aid, alias, version)
            decision = None
        else:
            try:
                policy = Policy(metric, margin, relative_margin, min_retention)
            except ValueError as e:
                raise AdapterfabError(str(e)) from None
            if force:
                decision = Decision(True, "forced by `registry promote --force`", metric, None)
            else:
                decision = gate_decision(registry, v, v.metrics, policy)
            v = registry.promote(v, decision)
    except AdapterfabError as e:
        _fail(e)
    promoted = decision is None or decision.promoted
    if as_json:
        _print_json({"adapter": str(aid), "alias": alias, "version": version, "promoted": promoted,
                     "reason": decision.reason if decision else "", "aliases": list(v.aliases)})
    elif promoted:
        out.print(f"{aid}@{alias} -> version {version}" + (f"  ({decision.reason})" if decision else ""))
    else:
        err.print(f"refused: {aid} version {version} stays out of {alias}: {decision.reason}")
    if not promoted:
        raise typer.Exit(3)


@registry_app.command("rollback")
def registry_rollback(adapter: str = typer.Argument(..., help="TENANT/PERSONA"),
                      as_json: bool = typer.Option(False, "--json")) -> None:
    """Move `production` back to the version it pointed at before the current one."""
    from adapterfab.ids import AdapterId

    s = _settings()
    try:
        aid = AdapterId.parse(adapter).unversioned()
        old, new = _registry(s).rollback(aid, "rollback by `registry rollback`")
    except AdapterfabError as e:
        _fail(e)
    if as_json:
        _print_json({"adapter": str(aid), "alias": "production", "from_version": old, "to_version": new})
    else:
        out.print(f"{aid}@production: version {old} -> version {new}")


@registry_app.command("export")
def registry_export(adapter: str = typer.Argument(..., help="TENANT/PERSONA[@ALIAS|@VERSION]"),
                    out_dir: Path = typer.Argument(..., help="folder to write"),
                    fmt: str = typer.Option("peft-lora", "--format", help="peft-lora: a standard PEFT LoRA"),
                    as_json: bool = typer.Option(False, "--json")) -> None:
    """Write an adapter as a standard rank-r PEFT LoRA folder (LoRA-XS rebuilt from its shared basis),
    loadable by PeftModel.from_pretrained, vLLM and LoRAX."""
    from adapterfab.export import export_adapter
    from adapterfab.ids import AdapterId
    from adapterfab.registry import Registry

    s = _settings()
    try:
        reg = Registry(_need_mlflow(s))
        v = reg.resolve(AdapterId.parse(adapter))
        out_path = export_adapter(reg, v, out_dir, fmt)
    except AdapterfabError as e:
        _fail(e)
    if as_json:
        _print_json({"adapter": str(v.id), "path": str(out_path), "format": fmt,
                     "files": sorted(p.name for p in Path(out_path).iterdir())})
        return
    out.print(f"{v.id} -> {out_path} ({fmt})")


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str | None, what: str) -> float | None:
    """``90``, ``90s``, ``15m``, ``12h``, ``30d`` -> seconds; None stays None."""
    if text is None:
        return None
    import re

    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)", text.strip())
    if not m or float(m.group(1)) <= 0:
        _fail(AdapterfabError(f"invalid {what} {text!r}: use a positive number of seconds, or 15m, 12h, 30d"))
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


def _key_store():  # noqa: ANN202
    from adapterfab.keys import KeyStore
    from adapterfab.state import StateStore

    return KeyStore(StateStore(_settings().state_url))


_EXPIRES_HELP = "the key ends after this long (seconds, or 15m, 12h, 30d); default: never"


@keys_app.command("create")
def keys_create(tenant: str = typer.Argument(..., help="tenant id"),
                expires: str | None = typer.Option(None, "--expires", help=_EXPIRES_HELP)) -> None:
    """Create an API key for TENANT; the key is the last token printed (shown once, stored hashed)."""
    ttl = _duration(expires, "--expires")
    try:
        key = _key_store().create(tenant, ttl_s=ttl)
    except AdapterfabError as e:
        _fail(e)
    out.print(f"API key for tenant {tenant} (shown once): {key}")


@keys_app.command("create-operator")
def keys_create_operator(expires: str | None = typer.Option(None, "--expires", help=_EXPIRES_HELP)) -> None:
    """Create an operator key for the dashboard: it sees every tenant's batches and adapters (serving
    refuses it). The key is the last token printed (shown once, stored hashed)."""
    key = _key_store().create_operator(ttl_s=_duration(expires, "--expires"))
    out.print(f"operator API key (shown once): {key}")


@keys_app.command("list")
def keys_list(tenant: str | None = typer.Option(None, "--tenant", help="only this tenant's keys"),
              operators: bool = typer.Option(False, "--operators", help="only operator keys"),
              as_json: bool = typer.Option(False, "--json")) -> None:
    """Every key's id, tenant (or operator), dates and status (active, expired, revoked); never a secret."""
    now = time.time()
    try:
        keys = _key_store().list(tenant=tenant, operators=operators)
    except AdapterfabError as e:
        _fail(e)
    if as_json:
        _print_json([k.as_dict(now) for k in keys])
        return
    table = Table("key id", "tenant", "created", "expires", "status", "rotated to")
    stamp = lambda t: "-" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))  # noqa: E731
    for k in keys:
        table.add_row(k.key_id, k.tenant or "(operator)", stamp(k.created_s), stamp(k.expires_s), k.status(now),
                      k.rotated_to or "")
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key: str = typer.Argument(..., help="the key id (as `keys list` shows it) or the key")) -> None:
    """End a key now: running servers and the dashboard refuse it from their next request."""
    try:
        info = _key_store().revoke(key)
    except AdapterfabError as e:
        _fail(e)
    out.print(f"revoked key {info.key_id} ({info.tenant or 'operator'})")


@keys_app.command("rotate")
def keys_rotate(
    key: str = typer.Argument(..., help="the key id (as `keys list` shows it) or the key"),
    grace: str | None = typer.Option(
        None, "--grace", help="the old key keeps working this long (e.g. 1h); default: ends now"
    ),
    expires: str | None = typer.Option(None, "--expires", help=_EXPIRES_HELP),
) -> None:
    """A new key for the same tenant (or operator); the old one ends now or after --grace. The new key is
    the last token printed (shown once)."""
    grace_s = _duration(grace, "--grace") or 0.0
    try:
        new, old = _key_store().rotate(key, grace_s=grace_s, ttl_s=_duration(expires, "--expires"))
    except AdapterfabError as e:
        _fail(e)
    ends = "now" if not grace_s else time.strftime("at %Y-%m-%d %H:%M:%S", time.localtime(old.expires_s))
    out.print(f"key {old.key_id} ends {ends}; new key for {old.tenant or 'operator'} (shown once): {new}")


@app.command()
def serve(port: int | None = typer.Option(None, help="HTTP port (default: the stack's, 8000)"),
          base_model: str = typer.Option("smollm2-135m-instruct", help="the shared base model"),
          detach: bool = typer.Option(False, "--detach", help="deploy and return; the app stays on Ray"),
          replicas: int = typer.Option(1, help="engine replicas"),
          dtype: str = typer.Option("float32", help="float32 or bfloat16"),
          registry_catalogue: bool = typer.Option(
              True, "--registry-catalogue/--registry-from-mlflow",
              help="list /v1/models and /v1/registry from the registry catalogue (fast at any size), or "
                   "from MLflow on every request (sees changes made in MLflow's UI at once)"),
          tenant_rps: float | None = typer.Option(
              None, "--tenant-rps", min=0,
              help="requests per second each tenant may send, on every route (default 50; 0: unlimited)"),
          tenant_burst: int | None = typer.Option(None, "--tenant-burst", min=1,
                                                     help="requests a tenant may send at once (default 100)")) -> None:
    """Serve every tenant's adapters from one base model: OpenAI-compatible /v1/chat/completions."""
    from adapterfab.jobs.trainers import retire_idle_trainers
    from adapterfab.serve.runner import serve_forever

    s = _settings()
    try:
        url = serve_forever(
            s,
            port=port,
            base_model=base_model,
            detach=detach,
            replicas=replicas,
            dtype=dtype,
            registry_catalogue=registry_catalogue,
            tenant_rps=tenant_rps,
            tenant_burst=tenant_burst,
            announce=lambda u: out.print(f"serving on {u}  (OpenAI base_url {u}/v1)"),
            # warm trainers hold devices the replicas need; busy ones stay
            before_deploy=retire_idle_trainers,
        )
    except AdapterfabError as e:
        _fail(e)
    if detach:
        out.print(f"deployed; stop with `adapterfab down`  ({url})")


def main() -> None:
    try:
        app()
    except AdapterfabError as e:
        err.print(f"error: {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
