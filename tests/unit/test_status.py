"""`adapterfab status` on the default SQLite state DB answers from the stdlib reader (adapterfab.status):
the same dict as the SQLAlchemy store, through the real command, without importing SQLAlchemy or Typer;
what that path does not cover goes to the full CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapterfab.lifecycle import JobState
from adapterfab.state import StateStore
from adapterfab.status import fast_main, read_sqlite, read_sqlite_batches, sqlite_path

CLI = str(Path(sys.executable).parent / "adapterfab")


def _batch(home: Path) -> StateStore:
    s = StateStore(f"sqlite:///{home / 'state.db'}")
    jobs = [{"id": f"b1.{t}.{p}", "tenant": t, "persona": p, "method": "lora", "total_steps": 10}
            for t, p in (("globex", "robot"), ("acme", "pirate"), ("acme", "butler"))]
    s.create_batch("b1", "nightly", "spec", "", "base", jobs, options={"force": True})
    s.move_job("b1.acme.pirate", JobState.PREPARING)
    s.move_job("b1.acme.pirate", JobState.TRAINING, placement={"node_id": "n1", "fused_with": ["b1.acme.butler"]})
    s.update_job("b1.acme.pirate", step=4, loss=1.25, metrics={"train_flops": 1e12})
    s.move_job("b1.globex.robot", JobState.FAILED, error="2 of 6 rows are not valid JSON [line 2]")
    s.update_batch("b1", stats={"groups": 1, "trainers": {"t1": {"groups": 1}}}, started_s=5.0)
    s.create_batch("b0", "empty", "spec", "", "base", [])
    return s


def test_the_stdlib_reader_gives_what_the_store_gives(tmp_path: Path) -> None:
    store = _batch(tmp_path)
    path = sqlite_path(store.url)
    assert path == tmp_path / "state.db"
    mine = read_sqlite(path, "b1")
    assert mine == store.dump("b1")
    assert [j["tenant"] + "/" + j["persona"] for j in mine["jobs"]] == ["acme/butler", "acme/pirate", "globex/robot"]
    pirate = mine["jobs"][1]
    assert pirate["state"] == "TRAINING" and pirate["progress"] == 0.4 and pirate["placement"]["node_id"] == "n1"
    assert mine["options"] == {"force": True} and mine["stats"]["trainers"]["t1"]["groups"] == 1
    assert read_sqlite(path, "b0")["jobs"] == [] and read_sqlite(path, "b0")["stats"] == {}
    listed = read_sqlite_batches(path)
    assert {r["id"]: r["jobs"] for r in listed} == {"b1": 3, "b0": 0}
    assert sqlite_path("postgresql://u@h/db") is None and sqlite_path("sqlite:///:memory:") is None


def _run(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ADAPTERFAB_HOME": str(home)})


def test_the_command_answers_without_sqlalchemy_or_typer(tmp_path: Path) -> None:
    store = _batch(tmp_path)
    probe = (
        "import runpy, sys; sys.argv = ['adapterfab', 'status', 'b1', '--json']\n"
        "try:\n    runpy.run_module('adapterfab.status', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('sqlalchemy', 'typer', 'adapterfab.cli', 'adapterfab.state') if m in sys.modules)\n"
        "sys.stderr.write('HEAVY=' + ','.join(heavy))\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "ADAPTERFAB_HOME": str(tmp_path)})
    assert r.stderr.strip().endswith("HEAVY="), r.stderr
    assert json.loads(r.stdout) == json.loads(json.dumps(store.dump("b1"), default=str))
    # the installed command: the same answers, the table, the list, a clear error
    assert json.loads(_run(tmp_path, "status", "b1", "--json").stdout) == json.loads(r.stdout)
    table = _run(tmp_path, "status", "b1")
    assert table.returncode == 0 and "acme/pirate" in table.stdout and "TRAINING" in table.stdout
    assert "line 2" in table.stdout  # an error text with brackets is shown as written
    assert {b["id"] for b in json.loads(_run(tmp_path, "status", "--json").stdout)} == {"b0", "b1"}
    missing = _run(tmp_path, "status", "nope")
    assert missing.returncode == 1 and "no batch 'nope'" in missing.stderr


@pytest.mark.parametrize("argv", [["status", "--help"], ["status", "b1", "--address", "http://x:8265"],
                                  ["status", "a", "b"], ["status", "--jsn"], ["submit", "x.yaml"], []])
def test_what_the_fast_path_leaves_to_the_full_cli(argv: list[str], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _batch(tmp_path)
    monkeypatch.setenv("ADAPTERFAB_HOME", str(tmp_path))
    assert fast_main(argv) is None


def test_another_database_or_no_db_goes_to_the_full_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERFAB_HOME", str(tmp_path))
    assert fast_main(["status"]) is None  # no state DB yet: the full CLI creates it and says so
    _batch(tmp_path)
    assert fast_main(["status", "b1", "--json"]) == 0
    monkeypatch.setenv("ADAPTERFAB_STATE_URL", "postgresql://nobody@127.0.0.1:1/none")
    assert fast_main(["status", "b1", "--json"]) is None


def test_a_metric_stored_as_null_is_a_dash_in_the_table(tmp_path: Path) -> None:
    """The state DB stores a NaN or infinite metric (a diverged eval loss) as null (state.FiniteJSON):
    the table, from either reader, formatted that None and ended in a TypeError."""
    import io

    from rich.console import Console

    from adapterfab.status import NO_FIGURE, print_status

    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    store.create_batch("b1", "nightly", "spec", "", "base",
                       [{"id": "b1.acme.pirate", "tenant": "acme", "persona": "pirate", "method": "lora",
                         "total_steps": 10}])
    for st in (JobState.PREPARING, JobState.TRAINING, JobState.REGISTERING):
        store.move_job("b1.acme.pirate", st)
    store.move_job("b1.acme.pirate", JobState.SUCCEEDED, model_version=1,
                   metrics={"eval_loss": float("inf"), "base_eval_loss": 2.0, "retention": float("nan"),
                            "retention_kept": None, "retention_known": 60.0})
    for dump in (store.dump("b1"), read_sqlite(tmp_path / "state.db", "b1")):
        assert dump["jobs"][0]["metrics"]["eval_loss"] is None
        out = io.StringIO()
        print_status(dump, console=Console(file=out, width=200, highlight=False))
        row = next(line for line in out.getvalue().splitlines() if "acme/pirate" in line)
        cells = [c.strip() for c in row.split("│")[1:-1]]
        assert cells[5:8] == [NO_FIGURE, "2.000", f"{NO_FIGURE} ({NO_FIGURE}/60)"], cells
