"""``adapterfab registry``: registered adapters (MLflow registry): ls, show, promote, rollback, export."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from adapterfab.cli_common import EXIT_INVALID, _fail, _need_mlflow, _print_json, _registry, _settings, err, out
from adapterfab.errors import AdapterfabError, InvalidId

registry_app = typer.Typer(no_args_is_help=True, help="Registered adapters (MLflow registry).")


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


@registry_app.command("promote")
def registry_promote(adapter: str = typer.Argument(..., help="TENANT/PERSONA"),
                     version: int = typer.Argument(..., help="the version to point the alias at"),
                     alias: str = typer.Option("production", help="alias to move"),
                     metric: str | None = typer.Option(None, help="production gate: the metric compared "
                                                       "[default: the version's batch's, else eval_loss]"),
                     margin: float | None = typer.Option(None, help="production gate: absolute improvement "
                                                         "required [default: the batch's, else 0]"),
                     relative_margin: float | None = typer.Option(None, help="production gate: relative "
                                                                  "improvement [default: the batch's, else 0]"),
                     min_retention: float | None = typer.Option(None, help="production gate: the share of the "
                                                                "base's probe facts the version must keep (0: no "
                                                                "check) [default: the batch's, else 0.9]"),
                     force: bool = typer.Option(False, "--force", help="skip the eval gate"),
                     as_json: bool = typer.Option(False, "--json")) -> None:
    """Point an alias (default production) at a version. `production` is eval-gated: the version must
    keep MIN_RETENTION of the facts the base states and beat the base model and the current production
    version on METRIC (unless --force); the decision is recorded on the version either way. The gate is
    the promotion policy the version's batch declared (recorded with the version), each option given
    here overriding it; a version that records none gets the defaults shown. Serving follows without
    a restart."""
    from adapterfab.ids import PRODUCTION, AdapterId, check_alias
    from adapterfab.promotion import Decision, Policy, gate_decision, policy_for

    s = _settings()
    given = {k: v for k, v in (("metric", metric), ("margin", margin), ("relative_margin", relative_margin),
                               ("min_retention", min_retention)) if v is not None}
    try:
        named = AdapterId.parse(adapter)
        if named.version is not None or named.alias is not None:  # `T/P@3 2` would silently promote v2
            raise InvalidId(f"name the adapter as TENANT/PERSONA and the version apart: "
                            f"`registry promote {named.unversioned()} {version}`")
        aid = named.unversioned()
        gated = check_alias(alias) == PRODUCTION
        try:  # bad options are bad input (exit 2), found before MLflow is asked anything
            if gated:
                Policy(**given)
        except ValueError as e:
            _fail(e, EXIT_INVALID)
        registry = _registry(s)
        v = registry.get(aid.with_version(version))
        # the gate: the policy recorded with the version (its batch's), the options given overriding it
        policy, applied = policy_for(v.tags, given) if gated else (Policy(), None)
        if gated and PRODUCTION in v.aliases:  # a new decision could write "refused" on the version served
            decision = Decision(True, f"version {version} is already {alias}; nothing was changed",
                                policy.metric, None)
            applied = None
        elif not gated:
            v = registry.set_alias(aid, alias, version)
            decision = None
        else:
            if force:
                decision, applied = Decision(True, "forced by `registry promote --force`", policy.metric, None), None
            else:
                decision = gate_decision(registry, v, v.metrics, policy)
            v = registry.promote(v, decision)
    except AdapterfabError as e:
        _fail(e)
    promoted = decision is None or decision.promoted
    if as_json:
        _print_json({"adapter": str(aid), "alias": alias, "version": version, "promoted": promoted,
                     "reason": decision.reason if decision else "", "policy": applied or "",
                     "aliases": list(v.aliases)})
    elif promoted:
        out.print(f"{aid}@{alias} -> version {version}" + (f"  ({decision.reason})" if decision else "")
                  + (f"\n  policy: {applied}" if applied else ""))
    else:
        err.print(f"refused: {aid} version {version} stays out of {alias}: {decision.reason}"
                  + (f"\n  policy: {applied}" if applied else ""))
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
