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
        code = 2 if "--expires" in bad or "--tenant" in bad else 1  # a malformed value or name: bad input
        assert r.returncode == code and "error" in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)


# -- --json, exit codes, completion, cancel and logs without a stack ----------------------------------
COMMANDS = [["up"], ["down"], ["validate"], ["plan"], ["submit"], ["run"], ["status"], ["cancel"], ["logs"],
            ["serve"], ["registry", "ls"], ["registry", "show"], ["registry", "promote"], ["registry", "rollback"],
            ["registry", "export"], ["keys", "create"], ["keys", "create-operator"], ["keys", "list"],
            ["keys", "revoke"], ["keys", "rotate"]]


def test_every_command_is_listed_here_and_takes_json(tmp_path: Path) -> None:
    """A command added later without --json fails here (the list is checked against the app itself)."""
    import typer.main

    from adapterfab.cli import app

    def leaves(cmd: object, path: list[str]) -> list[list[str]]:
        if hasattr(cmd, "commands"):  # a group
            return [p for name, sub in cmd.commands.items() for p in leaves(sub, [*path, name])]
        return [path]

    assert sorted(leaves(typer.main.get_command(app), [])) == sorted(COMMANDS)
    for cmd in COMMANDS:
        r = run(*cmd, "--help", home=tmp_path)
        assert r.returncode == 0 and "--json" in r.stdout, cmd


def _state(home: Path):  # noqa: ANN202
    from adapterfab.state import StateStore

    return StateStore(f"sqlite:///{home / 'state.db'}")


def _batch(home: Path, batch_id: str, states: dict[str, str], error: str | None = None) -> None:
    """A recorded batch whose jobs (persona -> state) were moved there the way an orchestrator does."""
    from adapterfab.lifecycle import JobState

    st = _state(home)
    st.create_batch(batch_id, "b", "x", "/x.yaml", "base",
                    [{"id": f"{batch_id}.acme.{p}", "tenant": "acme", "persona": p, "method": "lora",
                      "total_steps": 10} for p in states])
    path = {"PREPARING": ["PREPARING"], "TRAINING": ["PREPARING", "TRAINING"],
            "REGISTERING": ["PREPARING", "TRAINING", "REGISTERING"],
            "SUCCEEDED": ["PREPARING", "TRAINING", "REGISTERING", "SUCCEEDED"],
            "FAILED": ["PREPARING", "FAILED"], "PENDING": []}
    for p, final in states.items():
        for s in path[final]:
            fields = {"model_version": 1} if s == "SUCCEEDED" else {"error": error} if s == "FAILED" else {}
            st.move_job(f"{batch_id}.acme.{p}", JobState(s), **fields)


def test_status_json_keeps_text_rich_would_take_for_markup(tmp_path: Path) -> None:
    """An error such as "[q_proj]" (or ":x:") is data: both the fast path and the full CLI print it."""
    import json

    error = "target module [q_proj] not found in [bold]the base[/bold] :x: \\[v_proj]"
    _batch(tmp_path, "b-json-1", {"one": "FAILED"}, error=error)
    fast = run("status", "b-json-1", "--json", home=tmp_path)
    assert fast.returncode == 0, fast.stderr
    assert json.loads(fast.stdout)["jobs"][0]["error"] == error
    # the full CLI (Typer, SQLAlchemy): what answers for another database URL
    env = {"PATH": "/usr/bin:/bin", "ADAPTERFAB_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "ADAPTERFAB_STATE_URL": f"sqlite:///{tmp_path / 'state.db'}?timeout=30"}
    full = subprocess.run([CLI, "status", "b-json-1", "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert full.returncode == 0, full.stderr
    assert json.loads(full.stdout)["jobs"][0]["error"] == error
    listed = subprocess.run([CLI, "status", "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert [b["id"] for b in json.loads(listed.stdout)] == ["b-json-1"]
    table = run("status", "b-json-1", home=tmp_path)  # the table escapes it too
    assert "[q_proj]" in table.stdout


def test_json_output_of_commands_that_need_no_stack(tmp_path: Path, examples_copy: Path) -> None:
    import json

    ok = json.loads(run("validate", str(REPO / "examples" / "personas.yaml"), "--json", home=tmp_path).stdout)
    assert ok == {"ok": True, "name": "personas-demo", "jobs": 3, "tenants": 2, "base_model": "smollm2-135m-instruct"}
    bad = examples_copy / "bad.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load((examples_copy / "personas.yaml").read_text()),
                                   "version": 99}))
    r = run("validate", str(bad), "--json", home=tmp_path)
    assert r.returncode == 2 and json.loads(r.stdout)["ok"] is False
    assert [p["field"] for p in json.loads(r.stdout)["problems"]] == ["version"]
    made = json.loads(run("keys", "create", "acme", "--json", home=tmp_path).stdout)
    assert made["key"].startswith("af_") and made["tenant"] == "acme" and made["status"] == "active"
    assert made["key"].split("_")[1] == made["key_id"]
    op = json.loads(run("keys", "create-operator", "--expires", "1h", "--json", home=tmp_path).stdout)
    assert op["role"] == "operator" and op["expires"] - op["created"] == pytest.approx(3600, abs=5)
    quiet = run("keys", "create", "acme", "--quiet", home=tmp_path).stdout
    assert quiet.strip().startswith("af_") and len(quiet.split()) == 1
    rotated = json.loads(run("keys", "rotate", made["key_id"], "--json", home=tmp_path).stdout)
    assert rotated["tenant"] == "acme" and rotated["replaces"]["key_id"] == made["key_id"]
    assert rotated["replaces"]["status"] == "revoked"
    revoked = json.loads(run("keys", "revoke", rotated["key"], "--json", home=tmp_path).stdout)
    assert revoked["key_id"] == rotated["key_id"] and revoked["status"] == "revoked"
    down = json.loads(run("down", "--json", home=tmp_path).stdout)
    assert down == {"home": str(tmp_path), "stopped": []}


def test_exit_codes_are_in_help_and_docs_and_match_the_code(tmp_path: Path) -> None:
    import re

    from adapterfab import cli_common

    codes = {v: k for k, v in vars(cli_common).items() if k.startswith("EXIT_") and isinstance(v, int)}
    assert sorted(codes) == [0, 1, 2, 3, 4]
    helped = " ".join(run("--help", home=tmp_path).stdout.split())
    docs = (REPO / "docs" / "cli.md").read_text()
    for code in codes:
        assert re.search(rf"\b{code} [a-z(]", helped), (code, helped)
        assert f"| `{code}` |" in docs, code
    assert run("validate", "/nope.yaml", home=tmp_path).returncode == cli_common.EXIT_INVALID
    assert run("status", "b-none", home=tmp_path).returncode == cli_common.EXIT_FAILED
    assert run("serve", "--device", "tpu", home=tmp_path).returncode == cli_common.EXIT_INVALID
    assert run("frobnicate", home=tmp_path).returncode == cli_common.EXIT_INVALID  # a usage error


def _complete(words: str, home: Path) -> list[str]:
    """What bash completion offers for the command line ``words`` (the cursor after its last word)."""
    r = subprocess.run([CLI], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "ADAPTERFAB_HOME": str(home), "_ADAPTERFAB_COMPLETE":
                            "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split(" ")) - 1)})
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_shell_completion_through_the_entry_point(tmp_path: Path) -> None:
    """The `adapterfab` entry point (adapterfab.status:main) hands completion to the Typer app."""
    assert _complete("adapterfab ", tmp_path)[:3] == ["up", "down", "validate"]
    assert {"cancel", "logs", "status"} <= set(_complete("adapterfab ", tmp_path))
    assert _complete("adapterfab ca", tmp_path) == ["cancel"]
    assert _complete("adapterfab keys cr", tmp_path) == ["create", "create-operator"]
    assert _complete("adapterfab serve --device c", tmp_path) == ["cpu", "cuda"]
    assert _complete("adapterfab status b-", tmp_path) == []  # no state DB yet: nothing, no traceback
    _batch(tmp_path, "b-20261205-1", {"one": "PENDING"})
    _batch(tmp_path, "b-20261205-2", {"one": "PENDING"})
    assert sorted(_complete("adapterfab cancel b-2026", tmp_path)) == ["b-20261205-1", "b-20261205-2"]
    assert _complete("adapterfab logs b-20261205-2", tmp_path) == ["b-20261205-2"]
    script = run("--show-completion", "bash", home=tmp_path)
    assert script.returncode == 0 and "_ADAPTERFAB_COMPLETE=complete_bash" in script.stdout


def test_cancel_a_batch_no_orchestrator_runs(tmp_path: Path) -> None:
    """Not yet claimed (or its orchestrator died): cancelled at once; what succeeded stays, a job left
    REGISTERING fails with the reason (it may have its version), nothing else is ever registered."""
    import json

    _batch(tmp_path, "b-c-1", {"a": "SUCCEEDED", "b": "TRAINING", "c": "PENDING", "d": "REGISTERING",
                               "e": "FAILED"}, error="bad data")
    r = run("cancel", "b-c-1", "--json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    dump = json.loads(r.stdout)
    assert dump["state"] == "CANCELLED" and dump["cancel_requested_s"] and dump["ended_s"]
    jobs = {j["persona"]: j for j in dump["jobs"]}
    assert {p: j["state"] for p, j in jobs.items()} == {"a": "SUCCEEDED", "b": "CANCELLED", "c": "CANCELLED",
                                                        "d": "FAILED", "e": "FAILED"}
    assert jobs["a"]["model_version"] == 1 and jobs["b"]["model_version"] is None
    assert "adapterfab cancel" in jobs["b"]["error"] and "--resume" in jobs["d"]["error"]
    assert jobs["e"]["error"] == "bad data"
    again = run("cancel", "b-c-1", home=tmp_path)  # idempotent
    assert again.returncode == 0 and "already ended CANCELLED" in again.stderr + again.stdout
    assert "CANCELLED" in run("status", home=tmp_path).stdout
    assert run("cancel", "b-none", home=tmp_path).returncode == 1
    from adapterfab.serve.dashboard_views import _tenant_state  # a tenant's view of the batch on the dashboard

    jobs = {j.persona: j for j in _state(tmp_path).jobs("b-c-1")}
    assert _tenant_state([jobs["a"], jobs["b"], jobs["c"]], "CANCELLED") == "CANCELLED"
    assert _tenant_state([jobs["a"], jobs["b"], jobs["e"]], "CANCELLED") == "FAILED"
    assert _tenant_state([jobs["a"]], "CANCELLED") == "SUCCEEDED"
    # an orchestrator that claims it afterwards runs nothing
    import os

    from adapterfab.jobs.orchestrate import run_batch
    from adapterfab.lifecycle import BatchState
    from adapterfab.settings import Settings
    os.environ["ADAPTERFAB_HOME"] = str(tmp_path)
    try:
        assert run_batch(Settings.load(), "b-c-1") == BatchState.CANCELLED
    finally:
        del os.environ["ADAPTERFAB_HOME"]
    # `submit --resume` would take the cancelled and failed jobs up again
    from adapterfab.procs import pid_alive

    assert sorted(j.persona for j in _state(tmp_path).reopen_batch("b-c-1", pid_alive)) == ["b", "c", "d", "e"]
    assert _state(tmp_path).get_batch("b-c-1").cancel_requested_s is None


def test_cancel_of_a_running_batch_is_a_request_its_orchestrator_sees(tmp_path: Path) -> None:
    import os

    from adapterfab.procs import proc_token

    _batch(tmp_path, "b-c-2", {"a": "TRAINING"})
    st = _state(tmp_path)
    assert st.claim_batch("b-c-2", os.getpid(), proc_token(os.getpid()), lambda *_: False) is not None
    assert not st.cancel_requested("b-c-2")
    r = run("cancel", "b-c-2", "--no-wait", "--json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    import json

    assert json.loads(r.stdout) == {"batch_id": "b-c-2", "cancel": "requested"}
    assert st.cancel_requested("b-c-2") and st.job("b-c-2.acme.a").state.value == "TRAINING"  # its orchestrator's


def test_logs_of_a_batch_and_of_one_job(tmp_path: Path) -> None:
    import json

    _batch(tmp_path, "b-l-1", {"one": "FAILED", "two": "PENDING"}, error="boom")
    assert run("logs", "b-l-1", home=tmp_path).returncode == 1  # no log yet: says where it would be
    (tmp_path / "logs").mkdir(exist_ok=True)
    (tmp_path / "logs" / "b-l-1.log").write_text(
        "2026-12-05 10:00:00,000 INFO adapterfab.orchestrate: batch b-l-1 starts\n"
        "2026-12-05 10:00:01,000 INFO adapterfab.state: job b-l-1.acme.one: PENDING -> PREPARING\n"
        "2026-12-05 10:00:02,000 ERROR adapterfab.registrar: job b-l-1.acme.one failed: boom\n"
        "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: boom\n"
        "2026-12-05 10:00:03,000 INFO adapterfab.state: job b-l-1.acme.two: PENDING -> PREPARING\n")
    whole = run("logs", "b-l-1", home=tmp_path)
    assert whole.returncode == 0 and len(whole.stdout.splitlines()) == 7
    one = run("logs", "b-l-1", "acme/one", home=tmp_path).stdout.splitlines()
    assert one[0].endswith("PENDING -> PREPARING") and one[-1] == "ValueError: boom" and len(one) == 5
    assert not any("acme.two" in line for line in one)
    got = json.loads(run("logs", "b-l-1", "b-l-1.acme.two", "--json", "--tail", "1", home=tmp_path).stdout)
    assert got["lines"] == ["2026-12-05 10:00:03,000 INFO adapterfab.state: job b-l-1.acme.two: PENDING -> PREPARING"]
    assert got["files"] == [str(tmp_path / "logs" / "b-l-1.log")]
    assert run("logs", "b-l-1", "acme/nobody", home=tmp_path).returncode == 2


def test_a_batch_nobody_runs_ends_logs_follow(tmp_path: Path) -> None:
    """`logs --follow` waited for ever on a batch no orchestrator runs (never started, or died)."""
    _batch(tmp_path, "b-f-1", {"one": "PENDING"})
    (tmp_path / "logs").mkdir(exist_ok=True)
    (tmp_path / "logs" / "b-f-1.log").write_text("2026-12-05 10:00:00,000 INFO adapterfab.orchestrate: starts\n")
    r = run("logs", "b-f-1", "--follow", home=tmp_path)
    assert r.returncode == 0 and "starts" in r.stdout and "no orchestrator runs b-f-1" in r.stderr


def test_bad_homes_state_databases_and_key_durations_are_one_clear_line(tmp_path: Path) -> None:
    """Each of these printed a traceback (or broke `keys list` for good, or echoed part of a secret)."""
    (tmp_path / "a-file").write_text("x")
    r = run("keys", "list", home=tmp_path / "a-file")
    assert r.returncode == 1 and r.stderr.startswith("error: cannot use") and "Traceback" not in r.stderr
    home = tmp_path / "home"
    home.mkdir()
    (home / "state.db").write_text("garbage")
    for args in (["keys", "list"], ["status"], ["status", "b1", "--json"]):
        r = run(*args, home=home)
        assert r.returncode == 1 and "file is not a database" in r.stderr and "Traceback" not in r.stderr, args
    ok = tmp_path / "ok"
    r = run("keys", "create", "acme", "--expires", "9999999999999d", "-q", home=ok)
    assert r.returncode == 2 and "at most 100 years" in r.stderr
    assert run("keys", "list", home=ok).returncode == 0
    r = run("keys", "revoke", "Bearer af_96281c4be7a6a785_ChaNvK4C7ZRo5xyzsecret", home=ok)
    assert r.returncode == 1 and "ChaNvK4" not in r.stderr + r.stdout


def test_promote_refuses_a_versioned_adapter_name(tmp_path: Path) -> None:
    """`registry promote acme/pirate@3 2` promoted version 2 and ignored the @3. A name that is no
    adapter's is bad input: exit 2, as for every malformed id (it was 1, as for a failure)."""
    for name in ("acme/pirate@3", "acme/pirate@candidate"):
        r = run("registry", "promote", name, "2", home=tmp_path)
        assert r.returncode == 2 and "registry promote acme/pirate 2" in r.stderr, r.stderr
    for name in ("acme", "Acme/pirate", "acme/pi rate"):
        r = run("registry", "promote", name, "2", home=tmp_path)
        assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)


def test_an_empty_home_variable_is_the_default_home_not_the_current_folder(tmp_path: Path) -> None:
    cwd, user = tmp_path / "cwd", tmp_path / "user"
    cwd.mkdir()
    user.mkdir()
    r = subprocess.run([CLI, "keys", "list"], capture_output=True, text=True, timeout=120, cwd=cwd,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(user), "ADAPTERFAB_HOME": "",
                            "ADAPTERFAB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert not list(cwd.iterdir()) and (user / ".adapterfab" / "state.db").exists()
