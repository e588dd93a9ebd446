"""The CLI refuses bad input with a clear message and records nothing (no stack needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "adapterfab")


def run(*args: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "ADAPTERFAB_HOME": str(home), "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("cmd", [[], ["up"], ["down"], ["validate"], ["plan"], ["submit"], ["run"], ["status"],
                                 ["serve"], ["registry", "ls"], ["registry", "show"], ["registry", "promote"],
                                 ["registry", "rollback"], ["registry", "export"],
                                 ["keys", "create"], ["keys", "create-operator"], ["keys", "list"],
                                 ["keys", "revoke"], ["keys", "rotate"]])
def test_every_subcommand_has_help(cmd: list[str], tmp_path: Path) -> None:
    r = run(*cmd, "--help", home=tmp_path)
    assert r.returncode == 0 and "Usage" in r.stdout


def test_validate_example_ok(tmp_path: Path) -> None:
    r = run("validate", str(REPO / "examples" / "personas.yaml"), home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "3 job(s) for 2 tenant(s)" in r.stdout


def test_malformed_spec_names_field_and_records_nothing(tmp_path: Path, examples_copy: Path) -> None:
    spec = yaml.safe_load((examples_copy / "personas.yaml").read_text())
    spec["tenants"][0]["tenant"] = "../evil"
    spec["tenants"][1]["dataset"] = "data/missing.jsonl"
    spec["defaults"]["method"]["name"] = "dora-x"
    bad = examples_copy / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec))
    for cmd in ("validate", "plan", "submit"):
        r = run(cmd, str(bad), home=tmp_path / "home")
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert "tenants.0.tenant" in r.stderr and "defaults.method.name" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    spec["defaults"]["method"]["name"] = "lora"
    spec["tenants"][0]["tenant"] = "acme"
    bad.write_text(yaml.safe_dump(spec))
    r = run("submit", str(bad), home=tmp_path / "home")
    assert r.returncode == 2 and "tenants[1].dataset" in r.stderr and "does not exist" in r.stderr
    r = run("status", "--json", home=tmp_path / "home")
    assert r.returncode == 0 and r.stdout.strip() == "[]"  # nothing was recorded


def test_submit_without_stack_is_refused(tmp_path: Path) -> None:
    r = run("submit", str(REPO / "examples" / "personas.yaml"), home=tmp_path)
    assert r.returncode == 1 and "adapterfab up" in r.stderr


def test_plan_shows_jobs_and_ids(tmp_path: Path, smollm2_path: str) -> None:
    r = run("plan", str(REPO / "examples" / "personas.yaml"), "--json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    import json

    planned = json.loads(r.stdout)
    assert [p["adapter"] for p in planned] == ["acme/pirate", "acme/butler", "globex/robot"]
    assert planned[0]["registry_name"] == "af.acme.pirate" and planned[0]["trainable_params"] == 460800


def test_run_without_a_cluster_fails_every_job_and_exits_1(tmp_path: Path) -> None:
    """`run` (what a Ray Job executes) records the batch, reports why it could not run, never hangs."""
    import json

    env = {"PATH": "/usr/bin:/bin", "ADAPTERFAB_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    r = subprocess.run([CLI, "run", str(REPO / "examples" / "personas.yaml"), "--batch-id", "b-run-1"],
                       capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    dump = json.loads(run("status", "b-run-1", "--json", home=tmp_path).stdout)
    assert dump["state"] == "FAILED" and len(dump["jobs"]) == 3
    assert all(j["state"] == "FAILED" and "no Ray cluster" in j["error"] for j in dump["jobs"])
    r = subprocess.run([CLI, "run", str(REPO / "examples" / "personas.yaml"), "--batch-id", "b-run-1"],
                       capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 1 and "b-run-1" in r.stderr and "already exists" in r.stderr  # not overwritten
    assert "Traceback" not in r.stderr


def test_keys_lifecycle_from_the_cli(tmp_path: Path) -> None:
    import json

    key = run("keys", "create", "acme", "--expires", "30d", home=tmp_path).stdout.split()[-1]
    op = run("keys", "create-operator", home=tmp_path).stdout.split()[-1]
    listed = json.loads(run("keys", "list", "--json", home=tmp_path).stdout)
    assert [(k["tenant"], k["role"], k["status"]) for k in listed] == [("acme", "tenant", "active"),
                                                                       (None, "operator", "active")]
    assert 29 * 86400 < listed[0]["expires"] - listed[0]["created"] <= 30 * 86400
    assert key not in json.dumps(listed) and op.split("_", 2)[2] not in json.dumps(listed)
    r = run("keys", "rotate", key, "--grace", "1h", home=tmp_path)
    assert r.returncode == 0 and "new key for acme" in r.stdout, r.stderr
    new = r.stdout.split()[-1]
    assert new.startswith("af_") and new != key
    r = run("keys", "revoke", listed[1]["key_id"], home=tmp_path)
    assert r.returncode == 0 and "revoked" in r.stdout
    after = {k["key_id"]: k for k in json.loads(run("keys", "list", "--json", home=tmp_path).stdout)}
    assert after[listed[1]["key_id"]]["status"] == "revoked"
    assert after[key.split("_")[1]]["rotated_to"] == new.split("_")[1]
    assert [k["tenant"] for k in json.loads(run("keys", "list", "--tenant", "acme", "--json", home=tmp_path).stdout)] \
        == ["acme", "acme"]
    for bad in (["keys", "create", "acme", "--expires", "soon"], ["keys", "revoke", "0" * 16],
                ["keys", "revoke", "not-a-key"], ["keys", "list", "--tenant", "../x"]):
        r = run(*bad, home=tmp_path)
        assert r.returncode == 1 and "error" in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)
