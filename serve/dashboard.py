"""The cluster job dashboard: a JSON API and the pages that read it (FastAPI, no Ray import).

``adapterfab up`` starts it as its own process (``python -m adapterfab.serve.dashboard --port 8280``);
it reads the state database, MLflow and the Ray dashboard named by the stack's settings. The pages are
static files in ``dashboard_static/`` (hand-written HTML/CSS/JS; loss charts drawn by uPlot, vendored
there with its license; nothing fetched from outside at run time); they poll the API every 2 s, so
states and curves move without a reload.

Every ``/api`` route needs ``Authorization: Bearer <key>``: an operator key
(``adapterfab keys create-operator``) sees everything, a tenant key (``adapterfab keys create T``) only
its own jobs, batches and registry entries. A batch with none of the tenant's jobs gets the same 404
as a missing one. Routes (JSON; errors are ``{"error": {"message", "code"}}``):

- ``GET /api/whoami``: ``{role, tenant, links}`` (links to MLflow and the Ray dashboard: operators)
- ``GET /api/batches``: ``{batches: [{id, name, state, counts, progress, created_s, started_s,
  ended_s, gpu_s, cpu_s, ...}]}``, newest first
- ``GET /api/batches/{id}``: ``{batch, jobs: [{tenant, persona, method, state, step, total_steps,
  progress, eta_s, loss, eval, model_version, gpu_s, cpu_s, placement, links, ...}]}``
- ``GET /api/batches/{id}/jobs/{job_id}/loss``: ``{job_id, points: [[step, loss], ...]}`` from MLflow
- ``GET /api/cluster``: ``{nodes, jobs, error}``: Ray nodes with resources and load, and where jobs run
- ``GET /api/registry`` and ``/api/registry/{tenant}``: ``{tenants: [{tenant, adapters: [{id,
  aliases, versions: [{version, aliases, metrics, decision, reason, ...}]}]}]}``
- ``GET /api/openapi.json``: the schema; ``GET /healthz``: liveness (no key)

Wrong keys are limited per client address (``serve/auth_guard.py``, as on the serving API: a client
could otherwise guess keys as fast as it liked, each a lookup in the state database): past
``--auth-max-failures`` (20) per ``--auth-failure-window-s`` (60 s; 0 failures: no limit) its wrong
keys get a 429 ``rate_limit_exceeded`` with ``Retry-After`` instead of a 401; a valid key is never
refused.

Every ``/api`` answer is ``Cache-Control: no-store, private`` with ``Vary: Authorization``: it is one
key's view, which neither the browser nor a proxy may keep or hand to another key. Backend addresses
that reach the page (links, an operator's error text) have their ``user:password@`` redacted.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapterfab.errors import AdapterfabError, StateError, redact_credentials
from adapterfab.keys import KeyStore, Principal
from adapterfab.serve import dashboard_views as views
from adapterfab.serve.api_errors import ApiError
from adapterfab.serve.auth_guard import DEFAULT_FAILURE_WINDOW_S, DEFAULT_MAX_FAILURES, AuthFailureLimiter
from adapterfab.state import StateStore
from adapterfab.state_queries import JobTotals, batch_totals, placed_jobs

log = logging.getLogger("adapterfab.serve.dashboard")
STATIC = Path(__file__).resolve().parent / "dashboard_static"
BATCH_LIST_LIMIT = 100
CLUSTER_RECENT_JOBS = 20
RAY_TIMEOUT_S = 5.0
MLFLOW_DOWN_S = 30.0  # after a failed experiment lookup, the pages' MLflow links stay empty this long
# an experiment not found (made when a batch starts) is looked up again after this long, not on every poll
NO_EXPERIMENT_S = 10.0


class DashError(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def unavailable(who: Principal, what: str, e: BaseException, code: str) -> DashError:
    """A 503 for a backend that failed: an operator reads why (it names the backend's address, its
    credentials redacted: MLflow's own exception text repeats them); a tenant reads only that it is
    unavailable (the address is the operators' to know). The detail goes to the log either way."""
    why = redact_credentials(str(e))
    log.warning("%s unavailable: %s", what, why)
    return DashError(503, why if who.operator else f"{what} is unavailable right now; try again shortly.", code)


def _batch_not_found() -> DashError:
    """One answer for 'missing' and 'not yours', so a 404 tells a tenant nothing."""
    return DashError(404, "No such batch (or it has none of your jobs).", "batch_not_found")


class Sources:
    """The dashboard's backends: the state DB, MLflow (opened on first use: importing mlflow is slow,
    and /healthz must answer at once) and the Ray dashboard's HTTP API. ``mlflow_link`` and
    ``ray_link`` are their addresses as pages show them: without the credentials the server connects with."""

    def __init__(self, state_url: str, mlflow_uri: str | None, ray_dashboard_url: str | None):
        self.state = StateStore(state_url)
        self.keys = KeyStore(self.state)
        self.mlflow_uri = mlflow_uri.rstrip("/") if mlflow_uri else None
        self.ray_dashboard_url = ray_dashboard_url.rstrip("/") if ray_dashboard_url else None
        self.mlflow_link = redact_credentials(self.mlflow_uri) if self.mlflow_uri else None
        self.ray_link = redact_credentials(self.ray_dashboard_url) if self.ray_dashboard_url else None
        self._tracking: Any = None
        self._registry: Any = None
        self._experiment_ids: dict[str, str] = {}
        self._no_experiment_until: dict[str, float] = {}  # name -> when to look for it again
        self._mlflow_down_until = 0.0  # a failed lookup: no more tries (each waits out MLflow's retries) until then

    def _need_mlflow(self) -> str:
        if not self.mlflow_uri:
            raise DashError(503, "No MLflow server is configured (run `adapterfab up`).",
                            "mlflow_unavailable")
        return self.mlflow_uri

    def tracking(self) -> Any:
        if self._tracking is None:
            from adapterfab.tracking import Tracking

            self._tracking = Tracking(self._need_mlflow())
        return self._tracking

    def registry(self) -> Any:
        if self._registry is None:
            from adapterfab.registry import Registry
            from adapterfab.registry_index import RegistryIndex

            self._registry = Registry(self._need_mlflow(), index=RegistryIndex(self.state))
        return self._registry

    def experiment_id(self, tenant: str | None = None) -> str | None:
        """For MLflow run links: the operators' experiment (batch runs) or ``tenant``'s (its job runs);
        None (no link) while MLflow is down or the experiment does not exist yet; a missing one is asked
        for again only after NO_EXPERIMENT_S (the pages poll every 2 s)."""
        from adapterfab.tracking import EXPERIMENT, tenant_experiment

        name = tenant_experiment(tenant) if tenant else EXPERIMENT
        now = time.monotonic()
        if name not in self._experiment_ids and self.mlflow_uri and now >= self._mlflow_down_until \
                and now >= self._no_experiment_until.get(name, 0.0):
            try:
                found = self.tracking().find_experiment_id(name)
            except AdapterfabError:
                self._mlflow_down_until = time.monotonic() + MLFLOW_DOWN_S
                return None
            if found is not None:
                self._experiment_ids[name] = found
            else:
                self._no_experiment_until[name] = time.monotonic() + NO_EXPERIMENT_S
        return self._experiment_ids.get(name)

    def ray(self, path: str) -> Any:
        if not self.ray_dashboard_url:
            raise DashError(503, "No Ray dashboard is configured (run `adapterfab up`).", "ray_unavailable")
        r = httpx.get(self.ray_dashboard_url + path, timeout=RAY_TIMEOUT_S)
        r.raise_for_status()
        return r.json()["data"]


async def principal(request: Request) -> Principal:
    """The operator or tenant behind the request's ``Authorization: Bearer`` key; 401 without one or a
    wrong one, 429 for a wrong one while the client's address is over its wrong keys (``auth_guard``)."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    key = key.strip() if scheme.lower() == "bearer" else ""
    who = await request.app.state.auth_guard.check(request, key, request.app.state.sources.keys.identify,
                                                   purpose="dashboard") if key else None
    if who is None:
        raise DashError(401, "A valid API key is required: `Authorization: Bearer <key>` "
                             "(`adapterfab keys create-operator` or `adapterfab keys create TENANT`).",
                        "invalid_api_key")
    return who


Who = Annotated[Principal, Depends(principal)]


def create_app(state_url: str, mlflow_uri: str | None, ray_dashboard_url: str | None,
               auth_limit: AuthFailureLimiter | None = None) -> FastAPI:
    """``auth_limit``: how many wrong keys a client address may send (None: ``auth_guard``'s defaults;
    ``AuthFailureLimiter(0)``: no limit)."""
    src = Sources(state_url, mlflow_uri, ray_dashboard_url)
    app = FastAPI(title="adapterfab dashboard", docs_url=None, redoc_url=None,  # their pages load a CDN
                  openapi_url="/api/openapi.json")
    app.state.sources = src
    app.state.auth_guard = auth_limit or AuthFailureLimiter()

    @app.exception_handler(DashError)
    async def _dash_error(_: Request, e: DashError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse({"error": {"message": e.message, "code": e.code}}, e.status, headers=headers)

    @app.exception_handler(ApiError)
    async def _guard_error(_: Request, e: ApiError) -> JSONResponse:
        """The auth guard's 429 (raised in the serving API's shape) in the dashboard's, Retry-After kept."""
        return JSONResponse({"error": {"message": e.message, "code": e.code}}, e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        """The framework's own 404/405 in the API's error shape (what app.js reads)."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return JSONResponse({"error": {"message": str(e.detail), "code": code}}, e.status_code,
                            headers=getattr(e, "headers", None))

    @app.middleware("http")
    async def _private(request: Request, call_next: Any) -> Any:
        """An API answer is one key's view: no cache may keep it or serve it for another key."""
        response = await call_next(request)
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store, private"
            response.headers["Vary"] = "Authorization"
        return response

    def visible_jobs(batch_id: str, who: Principal) -> list:
        return [j for j in src.state.jobs(batch_id) if who.sees(j.tenant)]

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/whoami")
    def whoami(who: Who) -> dict[str, Any]:
        """The key's role and tenant, and links to the tools behind the dashboard (operators)."""
        links = {"mlflow": src.mlflow_link, "ray_dashboard": src.ray_link} if who.operator else {}
        return {"role": "operator" if who.operator else "tenant", "tenant": who.tenant, "links": links}

    @app.get("/api/batches")
    def batches(who: Who) -> dict[str, Any]:
        """Batches, newest first, with job counts per state, progress, times and cost: summed by the
        database (one row per batch and state), not from every job of 100 batches on each poll."""
        now, mine = time.time(), None if who.operator else who.tenant
        rows = src.state.list_batches(limit=BATCH_LIST_LIMIT, tenant=mine)
        totals = batch_totals(src.state, [b.id for b in rows], mine, views.job_cost_sql(now))
        listed = [(b, totals.get(b.id) or JobTotals()) for b in rows]
        return {"batches": [views.batch_summary(b, t, who) for b, t in listed if t.jobs or who.operator]}

    @app.get("/api/batches/{batch_id}")
    def batch(batch_id: str, who: Who) -> dict[str, Any]:
        """One batch and every job of it that the key may see."""
        try:
            b = src.state.get_batch(batch_id)
        except StateError:
            raise _batch_not_found() from None
        jobs = visible_jobs(batch_id, who)
        if not jobs and not who.operator:
            raise _batch_not_found()
        now, ids = time.time(), {j.id for j in jobs}
        out = views.batch_dict(b, jobs, who, now)
        out["links"] = {"mlflow_run": views.mlflow_run_url(
            src.mlflow_link, src.experiment_id() if b.mlflow_run_id else None, b.mlflow_run_id)} if who.operator else {}
        # run links are operators'; one experiment lookup per tenant that has a run, not one per job
        experiments = {t: src.experiment_id(t) for t in {j.tenant for j in jobs if j.mlflow_run_id}} \
            if who.operator else {}
        return {"batch": out, "jobs": [views.job_dict(j, who, now, ids, views.mlflow_run_url(
            src.mlflow_link, experiments.get(j.tenant), j.mlflow_run_id) if who.operator else None)
            for j in jobs]}

    @app.get("/api/batches/{batch_id}/jobs/{job_id}/loss")
    def loss(batch_id: str, job_id: str, who: Who) -> dict[str, Any]:
        """The job's per-step training loss as MLflow recorded it: ``points`` are [step, loss]."""
        try:  # the one job, not the batch's every job (a tenant's batch page asks this per job, every 2 s)
            job = src.state.job(job_id)
        except StateError:
            job = None
        if job is None or job.batch_id != batch_id or not who.sees(job.tenant):
            raise DashError(404, f"No job {job_id!r} in batch {batch_id!r} (or it is not yours).",
                            "job_not_found")
        points: list[list[float]] = []
        if job.mlflow_run_id:
            try:
                points = [[s, v] for s, v, _ in src.tracking().metric_history(job.mlflow_run_id, "loss")]
            except AdapterfabError as e:
                raise unavailable(who, "MLflow", e, "mlflow_unavailable") from None
        return {"job_id": job.id, "state": job.state.value, "points": points}

    @app.get("/api/cluster")
    def cluster(who: Who) -> dict[str, Any]:
        """Ray's nodes (resources, what Ray has handed out, host load) and the jobs placed on them;
        a tenant sees only its own jobs. ``error`` says why nodes are missing (Ray unreachable)."""
        nodes, error = [], None
        try:
            raw = src.ray("/api/v0/nodes?limit=1000&detail=1")["result"]["result"]
            usage, summary = {}, []
            try:  # load figures are extras: the node list alone is still worth showing
                usage = src.ray("/api/cluster_status")["clusterStatus"]["loadMetricsReport"]["usageByNode"]
                summary = src.ray("/nodes?view=summary")["summary"]
            except (httpx.HTTPError, KeyError, TypeError, ValueError) as e:
                log.debug("Ray load figures unavailable: %s", e)
            nodes = views.node_dicts(raw, usage or {}, summary or [])
        except DashError as e:
            error = e.message
        except (httpx.HTTPError, KeyError, TypeError, ValueError) as e:
            # httpx's text repeats the URL, credentials and all
            why = redact_credentials(f"The Ray dashboard at {src.ray_dashboard_url} did not answer: {e}")
            log.warning("%s", why)
            error = why if who.operator else "The cluster's node list is unavailable right now."
        # of the listed batches' jobs that ``who`` sees: the active ones and the latest ended with a
        # placement, read alone (every job of 100 batches was read on each 2-second poll)
        now, tenant = time.time(), None if who.operator else who.tenant
        rows = src.state.list_batches(limit=BATCH_LIST_LIMIT, tenant=tenant)
        placed = placed_jobs(src.state, [b.id for b in rows], tenant, views.ACTIVE, views.RECENT,
                             CLUSTER_RECENT_JOBS)
        active, recent = ([views.job_dict(j, who, now, placed.seen.get(j.batch_id, set())) for j in jobs]
                          for jobs in (placed.active, placed.recent))
        if not who.operator:  # a tenant sees the nodes its own jobs ran on, by pseudonym, without load
            mine = {(j["placement"] or {}).get("node_id") for j in [*active, *recent]}
            nodes = [n for n in (views.tenant_node_dict(n, who.tenant) for n in nodes) if n["node_id"] in mine]
        return {"nodes": nodes, "jobs": active, "recent_jobs": recent, "error": error,
                "links": {"ray_dashboard": src.ray_link} if who.operator else {}}

    def registry_for(who: Principal, tenant: str | None) -> dict[str, Any]:
        registry = src.registry()
        try:
            items = registry.list(tenant)
        except AdapterfabError as e:
            raise unavailable(who, "The model registry", e, "registry_unavailable") from None
        except Exception as e:  # noqa: BLE001 - MLflow's connection errors are not ours; say what failed
            raise unavailable(who, "The model registry", RuntimeError(
                f"the MLflow registry at {src.mlflow_uri} is unreachable: {e}"), "registry_unavailable") from None
        return {"tenants": views.registry_dict(items, who, src.mlflow_link, src.experiment_id)}

    @app.get("/api/registry")
    def registry(who: Who) -> dict[str, Any]:
        """Per tenant: personas, versions, aliases, promotion decisions and their reasons."""
        return registry_for(who, who.tenant)

    @app.get("/api/registry/{tenant}")
    def registry_tenant(tenant: str, who: Who) -> dict[str, Any]:
        """One tenant's registry entries (a tenant key: only its own; another tenant is a 404)."""
        from adapterfab.ids import check_id

        try:
            check_id(tenant, "tenant")
        except AdapterfabError:
            raise DashError(404, f"No tenant {tenant!r}.", "tenant_not_found") from None
        if not who.sees(tenant):
            raise DashError(404, f"No tenant {tenant!r}.", "tenant_not_found")
        return registry_for(who, tenant)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def main(argv: list[str] | None = None) -> None:
    """``python -m adapterfab.serve.dashboard [--host 127.0.0.1] [--port 8280] [--auth-max-failures 20]
    [--auth-failure-window-s 60]``: serve the dashboard for the stack that ``ADAPTERFAB_HOME``'s settings
    name (state DB, MLflow, Ray dashboard)."""
    import uvicorn

    from adapterfab.settings import DEFAULT_UI_PORT, Settings

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=DEFAULT_UI_PORT)
    ap.add_argument("--auth-max-failures", type=int, default=DEFAULT_MAX_FAILURES,
                    help="wrong API keys a client address may send per window before a 429 (0: no limit)")
    ap.add_argument("--auth-failure-window-s", type=float, default=DEFAULT_FAILURE_WINDOW_S,
                    help="seconds in which a client's wrong keys count")
    args = ap.parse_args(argv)
    try:
        limit = AuthFailureLimiter(args.auth_max_failures, args.auth_failure_window_s)
    except ValueError as e:
        ap.error(str(e))
    s = Settings.load()
    app = create_app(s.state_url, s.mlflow_uri, s.dashboard_url, auth_limit=limit)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
