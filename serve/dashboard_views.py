"""What each dashboard page shows, as JSON-ready dicts: pure functions over state rows, registry
versions and the Ray dashboard's node JSON (no FastAPI, no Ray import), so the rules live in one place.

- **Cost** of a job in resource-seconds: training seconds (the trainer's ``train_s`` when done and not
  null, else the time since it entered TRAINING) x workers x GPUs (CPUs) per worker, divided by the size
  of its fused group (the group shares one worker's resources). A batch's cost is the sum over its jobs.
- **ETA** of a training job: remaining steps / the step rate since it entered TRAINING (worker start-up
  included, so early estimates run long).
- **Tenant view**: a tenant key sees only its own jobs; batch state, start and end are derived from
  those jobs, the batch's error text and other tenants' job ids (fused groups) are left out; so is the
  batch's error where a failed batch copied it into each job's error ("batch failed: ..." names other
  tenants' jobs and backend addresses). MLflow and the Ray dashboard have no per-tenant access control,
  so links to them go to operators only.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable
from typing import Any

from sqlalchemy import Float, and_, case, cast, func, literal
from sqlalchemy.sql.elements import ColumnElement

from adapterfab.keys import Principal
from adapterfab.lifecycle import TERMINAL, BatchState, JobState
from adapterfab.registry import TAG, AdapterVersion, RegisteredAdapter
from adapterfab.state import BatchRow, JobRow, JobView
from adapterfab.state_queries import JobTotals, json_array_length, json_float

EVAL_KEYS = ("eval_loss", "base_eval_loss", "eval_token_accuracy", "base_eval_token_accuracy",
             "retention", "retention_known", "retention_kept")  # retention: adapterfab/retention.py
ACTIVE = frozenset({JobState.PREPARING, JobState.TRAINING, JobState.REGISTERING})
RECENT = TERMINAL - {JobState.CANCELLED}  # the cluster page's ended jobs (with a placement: where they ran)


def training_seconds(j: JobView, now: float) -> float:
    if j.reused_version is not None:
        return 0.0  # an idempotent resubmit trained nothing
    if j.metrics.get("train_s") is not None:  # null (how the database keeps a NaN): the time, as job_cost_sql
        return float(j.metrics["train_s"])
    if j.training_started_s is None:
        return 0.0
    end = j.ended_s if j.state.terminal and j.ended_s else now
    return max(0.0, end - j.training_started_s)


def job_cost(j: JobView, now: float) -> tuple[float, float]:
    """(GPU-seconds, CPU-seconds) the job held."""
    p = j.placement or {}
    share = len(p.get("fused_with") or []) or 1
    held_s = training_seconds(j, now) * (p.get("workers") or 1) / share
    return held_s * float(p.get("gpus") or 0), held_s * float(p.get("cpus") or 0)


def job_cost_sql(now: float) -> tuple[ColumnElement, ColumnElement]:
    """``job_cost`` (with ``training_seconds``) as SQL over the jobs table, for the batch list's sums
    (adapterfab/state_queries.py): the same rule, step by step; change the two together
    (tests/unit/test_dashboard_review2.py compares them)."""
    train_s, started = json_float(JobRow.metrics, "train_s"), JobRow.training_started_s
    end = case((and_(JobRow.state.in_([s.value for s in TERMINAL]), JobRow.ended_s != 0), JobRow.ended_s),
               else_=literal(now))
    trained = case((JobRow.reused_version.is_not(None), literal(0.0)), (train_s.is_not(None), train_s),
                   (started.is_(None), literal(0.0)), (end - started > 0, end - started), else_=literal(0.0))
    share = cast(func.coalesce(func.nullif(json_array_length(JobRow.placement["fused_with"]), 0), 1), Float)
    workers = func.coalesce(func.nullif(json_float(JobRow.placement, "workers"), 0), 1.0)
    held_s = trained * workers / share
    return (held_s * func.coalesce(json_float(JobRow.placement, "gpus"), 0.0),
            held_s * func.coalesce(json_float(JobRow.placement, "cpus"), 0.0))


def eta_s(j: JobView, now: float) -> float | None:
    if j.state != JobState.TRAINING or not j.training_started_s or j.step <= 0 or not j.total_steps:
        return None
    rate = j.step / max(now - j.training_started_s, 1e-6)
    return max(0.0, (j.total_steps - j.step) / rate)


def mlflow_run_url(mlflow_uri: str | None, experiment_id: str | None, run_id: str | None) -> str | None:
    if not (mlflow_uri and experiment_id and run_id):
        return None
    return f"{mlflow_uri}/#/experiments/{experiment_id}/runs/{run_id}"


# what a tenant sees of where its job ran (an allowlist: a key added later stays operator-only):
# no trainer names or pids, group ids, or Ray node ids; the node is a per-tenant pseudonym
TENANT_PLACEMENT = frozenset({"cpus", "gpus", "workers", "zero_stage", "zero_local_param_fraction", "warm",
                              "activation_checkpointing", "fused_with", "fused_group_size"})


def node_alias(tenant: str, node_id: str | None) -> str | None:
    """A tenant's name for a Ray node: stable across pages and requests, different per tenant, and no
    way back to the node id (which Ray's own APIs would map to an IP)."""
    if not node_id:
        return None
    return "node-" + hashlib.sha256(f"{tenant}\0{node_id}".encode()).hexdigest()[:8]


def tenant_node_dict(node: dict[str, Any], tenant: str) -> dict[str, Any]:
    """A node as a tenant sees it: its size, not its address, id or load (load shows others' work)."""
    return {"node_id": node_alias(tenant, node["node_id"]), "ip": None, "head": node["head"],
            "state": node["state"], "cpus": node["cpus"], "gpus": node["gpus"], "memory_gb": node["memory_gb"],
            "cpus_used": None, "gpus_used": None, "cpu_percent": None, "mem_percent": None,
            "gpu_util_percent": []}


BATCH_FAILED = "batch failed:"  # how jobs/orchestrate.py prefixes the batch's error copied into each job
TENANT_BATCH_ERROR = "the batch could not run; an operator can see why"


def job_error(j: JobView, who: Principal) -> str | None:
    """A job's error as ``who`` sees it: a batch-wide failure's text is the batch's (other tenants' jobs,
    backend addresses), which a tenant does not see (``batch_dict``); its own job's error it does."""
    if j.error and not who.operator and j.error.lstrip().lower().startswith(BATCH_FAILED):
        return TENANT_BATCH_ERROR
    return j.error


def job_dict(j: JobView, who: Principal, now: float, visible_ids: set[str],
             run_url: str | None = None) -> dict[str, Any]:
    gpu_s, cpu_s = job_cost(j, now)
    placement = dict(j.placement or {})
    if placement.get("fused_with"):
        placement["fused_group_size"] = len(placement["fused_with"])
        placement["fused_with"] = [i for i in placement["fused_with"] if i in visible_ids]
    if not who.operator and placement:
        node = node_alias(j.tenant, placement.get("node_id"))
        placement = {k: v for k, v in placement.items() if k in TENANT_PLACEMENT}
        if node:
            placement["node_id"] = node
    version = j.model_version or j.reused_version
    return {
        "id": j.id, "batch_id": j.batch_id, "tenant": j.tenant, "persona": j.persona, "method": j.method,
        "state": j.state.value, "terminal": j.state.terminal, "step": j.step, "total_steps": j.total_steps,
        "progress": round(j.progress, 4), "eta_s": eta_s(j, now), "loss": j.loss,
        "eval": {k: j.metrics[k] for k in EVAL_KEYS if k in j.metrics},
        "model_version": version, "reused": j.reused_version is not None, "error": job_error(j, who),
        "started_s": j.started_s, "ended_s": j.ended_s, "gpu_s": round(gpu_s, 1), "cpu_s": round(cpu_s, 1),
        "placement": placement or None, "has_loss_curve": j.mlflow_run_id is not None,
        "links": {"registry": f"#/registry/{j.tenant}/{j.persona}/{version}" if version else None,
                  "mlflow_run": run_url if who.operator else None},
    }


def _tenant_state(jobs: list[JobView], batch_state: str) -> str:
    """A batch's state as one tenant's jobs show it (other tenants' failures are not theirs)."""
    return _tenant_state_of(Counter(j.state.value for j in jobs), batch_state)


def _tenant_state_of(counts: dict[str, int], batch_state: str) -> str:
    """``_tenant_state`` from the tenant's job ``counts`` per state (the batch list's sums)."""
    if not all(JobState(s).terminal for s in counts):
        pending = batch_state == BatchState.PENDING.value
        return BatchState.PENDING.value if pending else BatchState.RUNNING.value
    if all(s == JobState.SUCCEEDED.value for s in counts):
        return BatchState.SUCCEEDED.value
    failed = JobState.FAILED.value in counts
    return BatchState.FAILED.value if failed else BatchState.CANCELLED.value  # (`adapterfab cancel`)


def job_totals(jobs: list[JobView], now: float) -> JobTotals:
    """What ``batch_totals`` (adapterfab/state_queries.py) sums in SQL, from the job views."""
    costs = [job_cost(j, now) for j in jobs]
    return JobTotals(jobs=len(jobs), counts=dict(Counter(j.state.value for j in jobs)),
                     progress=sum(j.progress for j in jobs), gpu_s=sum(c[0] for c in costs),
                     cpu_s=sum(c[1] for c in costs),
                     first_started_s=min((j.started_s for j in jobs if j.started_s), default=None),
                     last_ended_s=max((j.ended_s or 0 for j in jobs), default=None))


def batch_dict(b: BatchRow, jobs: list[JobView], who: Principal, now: float) -> dict[str, Any]:
    """A batch as ``who`` sees it; ``jobs`` are already only the ones ``who`` may see (non-empty
    for a tenant)."""
    return batch_summary(b, job_totals(jobs, now), who)


def _rounded(total: float, digits: int) -> float:
    """``round(total, digits)`` of a sum, alike in whichever order it was summed: the batch list sums in
    the database, the batch page in Python, and their last bits differ (180007.95 came out once as
    180008.0, once as 180007.9); rounded to 12 significant digits first, both round a tie the same way."""
    return round(float(f"{total:.12g}"), digits)


def batch_summary(b: BatchRow, t: JobTotals, who: Principal) -> dict[str, Any]:
    """A batch as ``who`` sees it, from the totals of the jobs ``who`` may see (the batch list's
    line: ``batch_totals`` sums them in the database)."""
    out = {"id": b.id, "name": b.name, "state": b.state, "created_s": b.created_s, "started_s": b.started_s,
           "ended_s": b.ended_s, "error": b.error, "jobs": t.jobs, "counts": dict(t.counts),
           "progress": _rounded(t.progress / t.jobs, 4) if t.jobs else 0.0,
           "gpu_s": _rounded(t.gpu_s, 1), "cpu_s": _rounded(t.cpu_s, 1)}
    if not who.operator:
        done = all(JobState(s).terminal for s in t.counts)
        ended = t.last_ended_s or (0 if t.jobs else None)  # (0, not 0.0, where no job has an end)
        out.update(state=_tenant_state_of(t.counts, b.state), error=None, started_s=t.first_started_s,
                   ended_s=ended if done else None)
    return out


# cluster -----------------------------------------------------------------------------------------

def node_dicts(nodes: list[dict], usage_by_node: dict[str, dict],
               summary: list[dict]) -> list[dict[str, Any]]:
    """Nodes from Ray's state API (``/api/v0/nodes``), with the resources Ray has handed out
    (``/api/cluster_status`` usageByNode: {resource: [used, total]}) and measured host load
    (``/nodes?view=summary``: CPU %, memory, GPU utilisation) where the dashboard reports them."""
    load = {s.get("raylet", {}).get("nodeId"): s for s in summary}
    out = []
    for n in nodes:
        nid = n.get("node_id", "")
        total = n.get("resources_total") or {}
        used = usage_by_node.get(nid) or {}
        s = load.get(nid) or {}
        mem = s.get("mem") or []
        out.append({
            "node_id": nid, "ip": n.get("node_ip"), "head": bool(n.get("is_head_node")),
            "state": n.get("state"),
            "cpus": total.get("CPU", 0.0), "gpus": total.get("GPU", 0.0),
            "cpus_used": (used.get("CPU") or [None])[0], "gpus_used": (used.get("GPU") or [None])[0],
            # the host's memory when the dashboard reports it (Ray's "memory" resource is a share of it)
            "memory_gb": round((mem[0] if mem else total.get("memory", 0.0)) / 2**30, 1),
            "cpu_percent": s.get("cpu"), "mem_percent": mem[2] if len(mem) > 2 else None,
            "gpu_util_percent": [g.get("utilizationGpu") for g in s.get("gpus") or []],
        })
    return sorted(out, key=lambda n: (not n["head"], n["ip"] or "", n["node_id"]))


# registry ----------------------------------------------------------------------------------------

def version_dict(v: AdapterVersion, who: Principal, mlflow_uri: str | None,
                 experiment_of: Callable[[str], str | None]) -> dict[str, Any]:
    """``experiment_of(tenant)``: the id of the tenant's MLflow experiment, which holds the version's run."""
    t = v.tags
    out = {"version": v.id.version, "aliases": list(v.aliases), "created_s": v.created_s,
           "method": t.get(TAG + "method"), "metrics": v.metrics, "batch_id": t.get(TAG + "batch_id"),
           "decision": t.get(TAG + "promotion.decision"), "reason": t.get(TAG + "promotion.reason"),
           "lineage": v.public_dict()["lineage"], "links": {}}
    if who.operator and mlflow_uri:
        version_url = f"{mlflow_uri}/#/models/{v.id.registry_name}/versions/{v.id.version}"
        out["links"] = {"mlflow_run": mlflow_run_url(mlflow_uri, experiment_of(v.id.tenant), v.run_id),
                        "mlflow_version": version_url}
    return out


def registry_dict(items: list[RegisteredAdapter], who: Principal, mlflow_uri: str | None,
                  experiment_of: Callable[[str], str | None]) -> list[dict[str, Any]]:
    """Adapters grouped by tenant: [{tenant, adapters: [{id, persona, aliases, versions}]}]."""
    tenants: dict[str, list[dict]] = {}
    for ra in items:
        if not who.sees(ra.id.tenant):
            continue
        tenants.setdefault(ra.id.tenant, []).append({
            "id": str(ra.id), "persona": ra.id.persona, "aliases": ra.aliases,
            "versions": [version_dict(v, who, mlflow_uri, experiment_of) for v in reversed(ra.versions)]})
    return [{"tenant": t, "adapters": a} for t, a in sorted(tenants.items())]
