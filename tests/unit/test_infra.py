"""The deployment files under infra/ (KubeRay manifests, the Ray cluster launcher, the Dockerfile).

Every YAML parses, and the parts adapterfab owns agree with the code and with each other: import paths
and the Serve app builder, RayJob entrypoints and CLI commands, every name one object uses to reach
another (ConfigMaps, Secrets and their keys, PVCs, Services in URLs, the RayJob's cluster), GPU counts.
No cluster, no network, nothing deployed. The checks return lists of problems, so a last test can break
a copy of the manifests on purpose and see them complain.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib
import importlib.util
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
LAUNCHER = INFRA / "cluster-launcher.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
NAMESPACE = "adapterfab"
IMAGE = "adapterfab:latest"
EXPECTED_K8S_FILES = {"namespace.yaml", "raycluster.yaml", "rayjob.yaml", "rayservice.yaml", "mlflow.yaml"}
GPU = "nvidia.com/gpu"

Obj = dict[str, Any]


# loading ------------------------------------------------------------------------------------------
def _yaml_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml"))


def _load_all(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


@pytest.fixture(scope="module")
def objects() -> list[Obj]:
    out = []
    for path in _yaml_files(K8S):
        out.extend(_load_all(path))
    return out


def _named(objs: list[Obj], kind: str, name: str | None = None, namespace: str | None = None) -> list[Obj]:
    return [o for o in objs if o.get("kind") == kind
            and (name is None or o["metadata"]["name"] == name)
            and (namespace is None or o["metadata"].get("namespace") == namespace)]


def _one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = _named(objs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''} in infra/k8s, found {len(found)}"
    return found[0]


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def _where(obj: Obj, path: str = "") -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}{path}"


def _keys(obj: Obj) -> set[str]:
    return set(obj.get("data") or {}) | set(obj.get("stringData") or {})


def _serve_config(service: Obj) -> dict:
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def _ray_cluster_specs(objs: list[Obj]) -> Iterator[tuple[Obj, dict]]:
    """(owner, RayClusterSpec) of every RayCluster, RayService and RayJob with an embedded cluster."""
    for o in objs:
        spec = o.get("spec") or {}
        if o.get("kind") == "RayCluster":
            yield o, spec
        elif o.get("kind") == "RayService":
            yield o, spec["rayClusterConfig"]
        elif o.get("kind") == "RayJob" and "rayClusterSpec" in spec:
            yield o, spec["rayClusterSpec"]


def _pod_templates(obj: Obj) -> Iterator[tuple[str, dict, set[str]]]:
    """(path, pod template, extra volume names) of every pod an object makes."""
    spec = obj.get("spec") or {}
    if obj.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates") or []}
        yield ".spec.template", spec["template"], claims
    for _owner, cluster in _ray_cluster_specs([obj]):
        yield ".headGroupSpec.template", cluster["headGroupSpec"]["template"], set()
        for g in cluster.get("workerGroupSpecs") or []:
            yield f".workerGroupSpecs[{g['groupName']}].template", g["template"], set()


def _cpus(value: Any) -> float:
    s = str(value)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def _ray_pin() -> str:
    lock = (REPO / "requirements.lock").read_text()
    m = re.search(r"^ray==([\w.]+)$", lock, re.M)
    assert m, "requirements.lock pins no ray version"
    return m.group(1)


# checks (each returns problems; an empty list is a pass) --------------------------------------------
def reference_problems(objs: list[Obj]) -> list[str]:
    """Every name an object uses to reach another names an object of infra/k8s."""
    problems = []

    def need(kind: str, name: str, ns: str, where: str, key: str | None = None) -> None:
        found = _named(objs, kind, name, ns)
        if not found:
            problems.append(f"{where}: no {kind} {name!r} in namespace {ns}")
        elif key is not None and key not in _keys(found[0]):
            problems.append(f"{where}: {kind} {name!r} has no key {key!r}")

    for o in objs:
        ns = o["metadata"].get("namespace", NAMESPACE)
        for path, node in _walk(o):
            if not isinstance(node, dict):
                continue
            where = _where(o, path)
            if "configMapRef" in node:
                need("ConfigMap", node["configMapRef"]["name"], ns, where)
            if "secretRef" in node:
                need("Secret", node["secretRef"]["name"], ns, where)
            if "configMapKeyRef" in node:
                need("ConfigMap", node["configMapKeyRef"]["name"], ns, where, node["configMapKeyRef"]["key"])
            if "secretKeyRef" in node:
                need("Secret", node["secretKeyRef"]["name"], ns, where, node["secretKeyRef"]["key"])
            if isinstance(node.get("configMap"), dict) and "name" in node:  # a volume
                need("ConfigMap", node["configMap"]["name"], ns, where)
            if isinstance(node.get("secret"), dict) and "name" in node:
                need("Secret", node["secret"]["secretName"], ns, where)
            if "persistentVolumeClaim" in node:
                need("PersistentVolumeClaim", node["persistentVolumeClaim"]["claimName"], ns, where)
            if "authOptions" in node and node["authOptions"].get("secretName"):
                need("Secret", node["authOptions"]["secretName"], ns, where, "auth_token")
            if "clusterSelector" in node:
                name = node["clusterSelector"].get("ray.io/cluster")
                if not name:
                    problems.append(f"{where}: clusterSelector names no ray.io/cluster")
                else:
                    need("RayCluster", name, ns, where)
        if o.get("kind") == "StatefulSet":
            need("Service", o["spec"]["serviceName"], ns, _where(o, ".spec.serviceName"))
        for path, template, extra in _pod_templates(o):
            pod = template["spec"]
            volumes = {v["name"] for v in pod.get("volumes") or []} | extra
            for c in pod.get("initContainers", []) + pod["containers"]:
                for m in c.get("volumeMounts") or []:
                    if m["name"] not in volumes:
                        problems.append(f"{_where(o, path)}: container {c['name']} mounts unknown volume "
                                        f"{m['name']!r}")
    for svc in _named(objs, "Service"):
        ns = svc["metadata"].get("namespace")
        pods = [(o, t) for o in objs if o["metadata"].get("namespace") == ns for _, t, _ in _pod_templates(o)]
        selected = [t for _, t in pods if svc["spec"].get("selector", {}).items()
                    <= (t.get("metadata", {}).get("labels") or {}).items()]
        if not selected:
            problems.append(f"{_where(svc)}: its selector matches no pod of infra/k8s")
        ports = {p.get("containerPort") for t in selected for c in t["spec"]["containers"]
                 for p in c.get("ports") or []}
        for p in svc["spec"]["ports"]:
            if selected and p.get("targetPort", p["port"]) not in ports:
                problems.append(f"{_where(svc)}: targetPort {p.get('targetPort')} is no container's port")
    return problems


URL = re.compile(r"\b([a-z][a-z0-9+.-]*)://(?:([^\s/@:]+)@)?([A-Za-z0-9.-]+)(?::(\d+))?(/[^\s,'\"]*)?")
DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432}


def _service_of_host(host: str, ns: str) -> tuple[str, str] | None:
    """(service, namespace) a cluster-internal host name means; None for hosts outside the cluster."""
    if host in ("localhost", "0.0.0.0") or re.fullmatch(r"[\d.]+", host):
        return None
    parts = host.split(".")
    if len(parts) == 1:
        return parts[0], ns
    if len(parts) == 2 or host.endswith((".svc", ".svc.cluster.local")):
        return parts[0], parts[1]
    return None


def url_problems(objs: list[Obj]) -> list[str]:
    """Every URL to a cluster-internal host names a Service and one of its ports; PostgreSQL URLs name
    a user and database that the PostgreSQL manifests create; MLflow accepts its own Service's Host."""
    problems = []
    pg_users, pg_dbs = set(), set()
    for o in objs:
        for _, node in _walk(o):
            if isinstance(node, dict) and node.get("name") == "POSTGRES_USER" and "value" in node:
                pg_users.add(node["value"])
            if isinstance(node, dict) and node.get("name") == "POSTGRES_DB" and "value" in node:
                pg_dbs.add(node["value"])
        if o.get("kind") == "ConfigMap":
            for text in (o.get("data") or {}).values():
                pg_dbs.update(re.findall(r"CREATE DATABASE\s+(\w+)", str(text), re.I))
    mlflow_hosts: list[str] = []  # the --allowed-hosts patterns of MLflow servers
    mlflow_services = set()
    for o in objs:
        for _, template, _ in _pod_templates(o):
            for c in template["spec"]["containers"]:
                argv = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
                if argv[:2] == ["mlflow", "server"]:
                    labels = template.get("metadata", {}).get("labels") or {}
                    for svc in _named(objs, "Service", namespace=o["metadata"].get("namespace")):
                        if svc["spec"].get("selector", {}).items() <= labels.items():
                            mlflow_services.add((svc["metadata"]["name"], svc["metadata"]["namespace"]))
                    for a in argv:
                        if a.startswith("--allowed-hosts="):
                            mlflow_hosts.extend(a.split("=", 1)[1].split(","))
    for o in objs:
        ns = o["metadata"].get("namespace", NAMESPACE)
        for path, node in _walk(o):
            if not isinstance(node, str):
                continue
            for m in URL.finditer(node):
                scheme, user, host, port, rest = m.groups()
                base = scheme.split("+")[0]
                target = _service_of_host(host, ns)
                if base == "s3" or target is None:
                    continue
                where = f"{_where(o, path)}: {m.group(0)}"
                svc = _named(objs, "Service", target[0], target[1])
                if not svc:
                    problems.append(f"{where}: no Service {target[0]!r} in namespace {target[1]}")
                    continue
                want = int(port) if port else DEFAULT_PORTS.get(base)
                if want not in {p["port"] for p in svc[0]["spec"]["ports"]}:
                    problems.append(f"{where}: Service {target[0]} has no port {want}")
                if base == "postgresql":
                    db = (rest or "/").strip("/").split("?")[0]
                    if user not in pg_users:
                        problems.append(f"{where}: user {user!r} is not the PostgreSQL user ({pg_users})")
                    if db not in pg_dbs:
                        problems.append(f"{where}: database {db!r} is not created ({sorted(pg_dbs)})")
                    if ":" in (user or ""):
                        problems.append(f"{where}: a password in a URL (use PGPASSWORD from the Secret)")
                if base == "http" and target in mlflow_services:
                    header = f"{host}:{port}" if port else host
                    if not mlflow_hosts or not any(fnmatch.fnmatch(header, p) for p in mlflow_hosts):
                        problems.append(f"{where}: the MLflow server's --allowed-hosts refuses Host {header}")
    return problems


def gpu_problems(objs: list[Obj]) -> list[str]:
    """Each Ray cluster has a GPU worker group; a group's nvidia.com/gpu limit and num-gpus agree."""
    problems = []
    for owner, cluster in _ray_cluster_specs(objs):
        gpu_groups = 0
        for g in cluster.get("workerGroupSpecs") or []:
            where = _where(owner, f".workerGroupSpecs[{g['groupName']}]")
            pod = g["template"]["spec"]
            limits = [c.get("resources", {}).get("limits", {}) for c in pod["containers"]]
            requests = [c.get("resources", {}).get("requests", {}) for c in pod["containers"]]
            k8s_gpus = sum(float(lim.get(GPU, 0)) for lim in limits)
            ray_gpus = float(g.get("rayStartParams", {}).get("num-gpus", 0))
            if not (g.get("minReplicas", 0) <= g.get("replicas", 0) <= g.get("maxReplicas", 0)):
                problems.append(f"{where}: needs minReplicas <= replicas <= maxReplicas")
            if k8s_gpus == 0 and ray_gpus == 0:
                continue
            gpu_groups += 1
            if k8s_gpus != ray_gpus:
                problems.append(f"{where}: {GPU} limit {k8s_gpus:g} != rayStartParams num-gpus {ray_gpus:g}")
            if any(GPU in r and float(r[GPU]) != float(lim.get(GPU, 0)) for r, lim in zip(requests, limits)):
                problems.append(f"{where}: {GPU} requests and limits differ")
            if not any(t.get("key") == GPU for t in pod.get("tolerations") or []):
                problems.append(f"{where}: no toleration for {GPU} (GPU nodes are tainted)")
            if not pod.get("nodeSelector") and not pod.get("affinity"):
                problems.append(f"{where}: no nodeSelector/affinity for GPU nodes")
        if not gpu_groups:
            problems.append(f"{_where(owner)}: no GPU worker group")
    return problems


def _group_gpus(group: dict) -> float:
    return float(group.get("rayStartParams", {}).get("num-gpus", 0))


def _group_cpus(group: dict) -> float:
    return sum(_cpus(c["resources"]["limits"]["cpu"]) for c in group["template"]["spec"]["containers"])


def serve_fit_problems(objs: list[Obj]) -> list[str]:
    """The serving app's engine replicas fit on the RayService's GPU pods, at the autoscaling maximum too."""
    problems = []
    for svc in _named(objs, "RayService"):
        groups = svc["spec"]["rayClusterConfig"].get("workerGroupSpecs") or []
        for app in _serve_config(svc)["applications"]:
            args = app.get("args") or {}
            gpus, cpus = float(args.get("replica_num_gpus", 0)), float(args.get("replica_num_cpus", 1))
            fits = [g for g in groups if _group_gpus(g) >= gpus and _group_cpus(g) >= cpus]
            if not fits:
                problems.append(f"{_where(svc)}: app {app['name']}: no worker group fits a replica "
                                f"({cpus:g} CPU, {gpus:g} GPU)")
                continue
            most = max([int(args.get("num_replicas", 1))] + [
                int((d.get("autoscaling_config") or {}).get("max_replicas", 1))
                for d in app.get("deployments") or [] if d.get("name") == "EngineDeployment"])
            room = sum(g["maxReplicas"] * int(_group_gpus(g) // gpus) for g in fits) if gpus else most
            if most > room:
                problems.append(f"{_where(svc)}: up to {most} replicas of {gpus:g} GPU, but the GPU groups "
                                f"hold {room} at maxReplicas")
    return problems


# tests ---------------------------------------------------------------------------------------------
def test_every_yaml_under_infra_parses() -> None:
    files = _yaml_files(INFRA)
    assert {p.name for p in files} >= EXPECTED_K8S_FILES | {LAUNCHER.name}
    for path in files:
        docs = _load_all(path)  # raises on broken YAML
        assert docs, f"{path} is empty"
        assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


def test_k8s_objects_are_well_formed(objects: list[Obj]) -> None:
    seen = set()
    for o in objects:
        assert {"apiVersion", "kind", "metadata"} <= set(o), o
        name, ns = o["metadata"].get("name"), o["metadata"].get("namespace")
        assert name, f"{o['kind']} without a name"
        if o["kind"] == "Namespace":
            assert name == NAMESPACE
        else:
            assert ns == NAMESPACE, f"{_where(o)} is in namespace {ns!r}, not {NAMESPACE}"
        assert (o["kind"], ns, name) not in seen, f"{_where(o)} is defined twice"
        seen.add((o["kind"], ns, name))
        assert o["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == NAMESPACE, _where(o)
        if o["kind"] in ("RayCluster", "RayJob", "RayService"):
            assert o["apiVersion"] == "ray.io/v1", _where(o)
    for kind in ("RayCluster", "RayJob", "RayService", "ConfigMap", "Secret", "PersistentVolumeClaim",
                 "StatefulSet", "Deployment", "Service"):
        assert _named(objects, kind), f"infra/k8s has no {kind}"


def test_secrets_are_placeholders(objects: list[Obj]) -> None:
    for s in _named(objects, "Secret"):
        assert not s.get("data"), f"{_where(s)}: templates use stringData placeholders, never encoded values"
        # infra/README.md applies the manifests with -l '!adapterfab.io/secret-template' once real ones exist
        assert s["metadata"]["labels"].get("adapterfab.io/secret-template") == "true", _where(s)
        for k, v in (s.get("stringData") or {}).items():
            assert v == "REPLACE_ME", f"{_where(s)}: {k} must stay a placeholder in the repository"


def test_images_and_ray_version(objects: list[Obj]) -> None:
    for owner, cluster in _ray_cluster_specs(objects):
        assert cluster["rayVersion"] == _ray_pin(), f"{_where(owner)}: rayVersion != requirements.lock's ray"
    for o in objects:
        for path, template, _ in _pod_templates(o):
            for c in template["spec"]["containers"]:
                if not c["image"].startswith("postgres:"):
                    assert c["image"] == IMAGE, f"{_where(o, path)}: image {c['image']}"


def test_references_name_existing_objects(objects: list[Obj]) -> None:
    assert reference_problems(objects) == []


def test_urls_name_existing_services(objects: list[Obj]) -> None:
    assert url_problems(objects) == []
    config = _one(objects, "ConfigMap", "adapterfab-config")["data"]
    for key in ("ADAPTERFAB_STATE_URL", "ADAPTERFAB_ARTIFACTS", "MLFLOW_TRACKING_URI", "ADAPTERFAB_CACHE"):
        assert config.get(key), f"adapterfab-config sets no {key}"
    assert config["ADAPTERFAB_ARTIFACTS"].startswith("s3://")
    assert config["ADAPTERFAB_STATE_URL"].startswith("postgresql")
    host = URL.match(config["MLFLOW_TRACKING_URI"]).group(3)
    assert _service_of_host(host, NAMESPACE) == ("adapterfab-mlflow", NAMESPACE)
    # serving reads the same state DB and registry as the factory
    for svc in _named(objects, "RayService"):
        for app in _serve_config(svc)["applications"]:
            assert app["args"]["state_url"] == config["ADAPTERFAB_STATE_URL"]
            assert app["args"]["mlflow_uri"] == config["MLFLOW_TRACKING_URI"]


def test_mlflow_server_on_postgres_with_s3_artifacts(objects: list[Obj]) -> None:
    deploy = _one(objects, "Deployment", "adapterfab-mlflow")
    argv = deploy["spec"]["template"]["spec"]["containers"][0]["command"]
    opts = dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    assert argv[:2] == ["mlflow", "server"] and "--serve-artifacts" in argv
    assert opts["--backend-store-uri"].startswith("postgresql://")
    assert opts["--artifacts-destination"].startswith("s3://")
    env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"  # as adapterfab up starts it


def test_gpu_worker_groups(objects: list[Obj]) -> None:
    assert gpu_problems(objects) == []
    assert serve_fit_problems(objects) == []


def _import_path(path: str) -> Any:
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def test_serve_import_paths_resolve(objects: list[Obj]) -> None:
    apps = [app for svc in _named(objects, "RayService") for app in _serve_config(svc)["applications"]]
    assert apps
    for app in apps:
        assert callable(_import_path(app["import_path"])), app["import_path"]


def test_rayservice_app_builds_without_deploying(objects: list[Obj], tiny_model_path: str,
                                                 tmp_path: Path) -> None:
    import ray
    from ray import serve
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    for svc in _named(objects, "RayService"):
        for app in _serve_config(svc)["applications"]:
            builder = _import_path(app["import_path"])
            args = {**app["args"], "base_model": tiny_model_path, "mlflow_uri": "http://127.0.0.1:9",
                    "state_url": f"sqlite:///{tmp_path / 'state.db'}",
                    "adapter_cache_dir": str(tmp_path / "adapters")}
            built_app = call_user_app_builder_with_args_if_necessary(builder, args)  # what Serve does
            assert isinstance(built_app, serve.Application)
            built = build_app(built_app, name=app["name"])
            by_name = {d.name: d for d in built.deployments}
            for override in app.get("deployments") or []:
                assert override["name"] in by_name, f"serveConfigV2 overrides unknown {override['name']}"
            engine = by_name["EngineDeployment"]
            assert engine.ray_actor_options["num_gpus"] == float(app["args"].get("replica_num_gpus", 0))
            assert engine.ray_actor_options["num_cpus"] == float(app["args"].get("replica_num_cpus", 1))
    assert not ray.is_initialized()  # nothing was started


def test_app_builder_refuses_bad_args(tiny_model_path: str) -> None:
    from adapterfab.serve.app import app_builder

    ok = {"base_model": tiny_model_path, "mlflow_uri": "http://127.0.0.1:9", "state_url": "sqlite://"}
    with pytest.raises(ValueError, match="missing state_url"):
        app_builder({k: v for k, v in ok.items() if k != "state_url"})
    with pytest.raises(ValueError, match="unknown num_gpus"):
        app_builder({**ok, "num_gpus": 1})
    with pytest.raises(ValueError, match="num_replicas"):
        app_builder({**ok, "num_replicas": "two"})
    with pytest.raises(ValueError, match="dtype"):
        app_builder({**ok, "dtype": "int3"})
    with pytest.raises(ValueError, match="cuda_graphs=1 is not a valid bool"):
        app_builder({**ok, "cuda_graphs": 1})
    with pytest.raises(ValueError, match="cuda_graphs='yes' is not a valid bool"):
        app_builder({**ok, "cuda_graphs": "yes"})
    from adapterfab.serve.app import _builder_arg

    assert _builder_arg("cuda_graphs", bool, "false") is False and _builder_arg("cuda_graphs", bool, True) is True
    with pytest.raises(ValueError, match="max_batch=True is not a valid int"):
        app_builder({**ok, "max_batch": True})


def _entrypoints(objs: list[Obj]) -> list[tuple[Obj, list[str]]]:
    return [(j, shlex.split(j["spec"]["entrypoint"])) for j in _named(objs, "RayJob")]


def _cli_commands() -> set[str]:
    from adapterfab.cli import app

    names = {c.name or c.callback.__name__.lower().replace("_", "-") for c in app.registered_commands}
    return names | {g.name for g in app.registered_groups}


def test_rayjob_entrypoints_run_importable_modules(objects: list[Obj]) -> None:
    jobs = _entrypoints(objects)
    assert jobs
    for job, argv in jobs:
        assert argv[0] in ("python", "python3") and argv[1] == "-m" and len(argv) >= 4, argv
        spec = importlib.util.find_spec(argv[2])
        assert spec is not None, f"{_where(job)}: no module {argv[2]}"
        if spec.submodule_search_locations:  # a package runs its __main__
            assert importlib.util.find_spec(argv[2] + ".__main__"), f"{argv[2]} has no __main__"
        else:
            assert 'if __name__ == "__main__"' in Path(spec.origin).read_text(), f"{argv[2]} runs nothing"


def test_rayjob_batch_spec_is_mounted_and_valid(objects: list[Obj]) -> None:
    from adapterfab.spec import parse_spec

    for job, argv in _entrypoints(objects):
        batch = Path(argv[4]) if argv[3] == "run" else None
        if batch is None:
            continue
        cluster = _one(objects, "RayCluster", job["spec"]["clusterSelector"]["ray.io/cluster"])
        head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for c in head["containers"] for m in c.get("volumeMounts") or []}
        assert str(batch.parent) in mounts, f"the head of {_where(cluster)} mounts nothing at {batch.parent}"
        volume = next(v for v in head["volumes"] if v["name"] == mounts[str(batch.parent)])
        cm = _one(objects, "ConfigMap", volume["configMap"]["name"])
        assert batch.name in cm["data"], f"{_where(cm)} has no {batch.name}"
        spec, jobs = parse_spec(cm["data"][batch.name], root=batch.parent)  # a valid batch spec
        assert jobs


def test_rayjob_cli_subcommands_are_registered(objects: list[Obj]) -> None:
    commands = _cli_commands()
    wanted = [argv[3] for _, argv in _entrypoints(objects) if argv[2] == "adapterfab.cli"]
    assert wanted
    assert set(wanted) <= commands, f"the RayJobs run unknown CLI commands {set(wanted) - commands}"


def test_cluster_launcher() -> None:
    import json

    import jsonschema
    import ray.autoscaler

    cfg = _load_all(LAUNCHER)[0]
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in cfg, f"cluster-launcher.yaml has no {key}"
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)  # Ray's own schema for `ray up`
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    assert any(float(t["resources"].get("GPU", 0)) > 0 for t in workers.values()), "no GPU worker type"
    for name, t in workers.items():
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"], name
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]
    # the repository is synced to every node and pip-installed from there, with the pinned versions
    repo_dirs = [remote for remote, local in cfg["file_mounts"].items() if local in (".", "./")]
    assert repo_dirs, "file_mounts does not sync the repository"
    installs = [c for c in cfg["setup_commands"] if "pip install" in c and repo_dirs[0] in c]
    assert any(f"-c {repo_dirs[0]}/requirements.lock" in c and "[zero,qlora]" in c for c in installs), installs
    starts = cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    env_file = re.search(r"cat > (\S+) <<", "\n".join(cfg["setup_commands"]))
    assert env_file, "setup_commands write no env file"
    assert all(f". {env_file.group(1)}" in c for c in starts if "ray start" in c)
    env_text = "\n".join(cfg["setup_commands"])
    for var in ("MLFLOW_TRACKING_URI", "ADAPTERFAB_ARTIFACTS=s3://", "ADAPTERFAB_STATE_URL", "RAY_AUTH_MODE"):
        assert var in env_text, var


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_installs_the_project() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    instructions = _dockerfile_instructions()
    assert instructions[0][0] in ("ARG", "FROM") and any(
        op == "FROM" and rest.split()[0].split(":")[0].endswith("python") for op, rest in instructions)
    copied = {src for op, rest in instructions if op == "COPY" for src in rest.split()[:-1]}
    assert {"pyproject.toml", "requirements.lock"} <= copied
    for folder in pyproject["tool"]["setuptools"]["package-dir"].values():
        assert folder in copied, f"the Dockerfile does not copy the package folder {folder}/"
    pip = [shlex.split(cmd) for op, rest in instructions if op == "RUN"
           for cmd in rest.split("&&") if "pip install" in cmd]
    project = [argv for argv in pip if any(a in (".", "-e.", "--editable=.") or a.startswith(".[") for a in argv)]
    assert project, "no `pip install .` of the project (pyproject.toml's name: " \
                    f"{pyproject['project']['name']})"
    assert any("requirements.lock" in argv for argv in project), "the project is installed without the lock"
    assert any(argv[-1] == "." and "-e" in argv for argv in project), "the final install is not editable"
    # the extras: DeepSpeed ZeRO and bitsandbytes in every pod, with the lock's versions
    extras = {e for argv in project if "requirements.lock" in argv for a in argv if a.startswith(".[")
              for e in a[2:-1].split(",")}
    assert extras == {"zero", "qlora"} <= set(pyproject["project"]["optional-dependencies"]), extras
    assert IMAGE in DOCKERFILE.read_text() and IMAGE in (INFRA / "README.md").read_text()


def test_checks_catch_broken_manifests(objects: list[Obj]) -> None:
    """The checks above are not vacuous: break a copy of the manifests and they complain."""
    broken = copy.deepcopy(objects)
    _one(broken, "Service", "adapterfab-mlflow")["metadata"]["name"] = "adapterfab-tracking"
    assert any("adapterfab-mlflow" in p for p in url_problems(broken))
    broken = copy.deepcopy(objects)
    _one(broken, "Secret", "adapterfab-s3")["metadata"]["name"] = "aws"
    assert any("adapterfab-s3" in p for p in reference_problems(broken))
    broken = copy.deepcopy(objects)
    _one(broken, "RayCluster")["metadata"]["name"] = "factory"
    assert any("RayCluster 'adapterfab'" in p for p in reference_problems(broken))
    broken = copy.deepcopy(objects)
    _one(broken, "PersistentVolumeClaim")["metadata"]["name"] = "other"
    assert any("PersistentVolumeClaim" in p for p in reference_problems(broken))
    broken = copy.deepcopy(objects)
    group = next(g for g in _one(broken, "RayCluster")["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    group["rayStartParams"]["num-gpus"] = "2"
    assert any("num-gpus" in p for p in gpu_problems(broken))
    broken = copy.deepcopy(objects)
    _one(broken, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = 1
    assert any("at maxReplicas" in p for p in serve_fit_problems(broken))
    broken = copy.deepcopy(objects)
    pg = _one(broken, "ConfigMap", "adapterfab-config")["data"]
    pg["ADAPTERFAB_STATE_URL"] = pg["ADAPTERFAB_STATE_URL"].rsplit("/", 1)[0] + "/factory"
    assert any("database 'factory'" in p for p in url_problems(broken))
