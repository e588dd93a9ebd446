"""The dashboard in a real browser (Debian's headless chromium driven by Playwright) against the stack
that `adapterfab up` starts, while a small 2-tenant batch on the tiny model trains: the page asks for a
key, the batch's jobs move to a terminal state without a reload, loss curves are drawn from MLflow's
per-step history, the cluster page shows Ray's node and where the jobs ran, the registry page shows the
promotion decisions, and a tenant's key neither lists nor opens another tenant's batch. Screenshots of
each page are written to docs/dashboard-*.png (docs/dashboard.md shows them)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from stack_cli import run_cli, stack_up

pytestmark = [pytest.mark.slow, pytest.mark.browser]
REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 800}
STEPS = 100
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")

if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (`make services` does when it can)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing: pip install -e '.[dev]'")


def cli(home: Path, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    return run_cli(home, *args, timeout_s=timeout_s)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    from adapterfab.procs import pid_alive, port_open, stop_pid

    home = tmp_path_factory.mktemp("ui-home")
    ports, printed = stack_up(home)
    info = json.loads((home / "stack.json").read_text())
    assert info["ui_url"] == f"http://127.0.0.1:{ports['ui']}" and info["ui_url"] in printed
    assert pid_alive(info["ui_pid"])
    stop_pid(info["ui_pid"])  # a UI that died: `up` (idempotent otherwise) starts it again, same URL
    again = cli(home, "up", timeout_s=300)
    assert again.returncode == 0 and info["ui_url"] in again.stdout, again.stderr
    info = json.loads((home / "stack.json").read_text())
    assert pid_alive(info["ui_pid"]) and info["ray_pid"] and info["ui_url"].endswith(ports["ui"])
    yield home, info
    assert cli(home, "down", timeout_s=120).returncode == 0
    assert not pid_alive(info["ui_pid"]) and not port_open(int(ports["ui"]))  # `down` stops the UI too


@pytest.fixture(scope="module")
def keys(stack) -> dict[str, str]:
    home, _ = stack
    out = {"operator": cli(home, "keys", "create-operator").stdout.split()[-1]}
    for tenant in ("acme", "globex"):
        out[tenant] = cli(home, "keys", "create", tenant).stdout.split()[-1]
    return out


@pytest.fixture(scope="module")
def batches(stack, tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``mixed``: acme/pirate and globex/robot, submitted and running; ``globex_only``: a batch with
    only globex's job, recorded (PENDING) and never run: all the tenant check needs."""
    from adapterfab.jobs.orchestrate import create_batch
    from adapterfab.settings import Settings

    home, _ = stack
    work = tmp_path_factory.mktemp("ui-spec")
    tenants = []
    for tenant, persona in (("acme", "pirate"), ("globex", "robot")):
        rows = [json.dumps({"instruction": f"Say the number {i}.", "output": f"{persona.upper()} {i}"})
                for i in range(24)]
        (work / f"{persona}.jsonl").write_text("\n".join(rows) + "\n")
        tenants.append({"tenant": tenant, "persona": persona, "dataset": str(work / f"{persona}.jsonl")})
    spec = {"version": 1, "name": "ui-demo", "base_model": tiny_model_path, "promote": "auto",
            "defaults": {"method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                         "train": {"steps": STEPS, "batch_size": 4, "learning_rate": 1e-2, "dtype": "float32",
                                   "max_seq_len": 64, "eval_fraction": 0.2}},
            "resources": {"cpus_per_job": 0.5}, "tenants": tenants}
    (work / "batch.yaml").write_text(yaml.safe_dump(spec))
    r = cli(home, "submit", str(work / "batch.yaml"))
    assert r.returncode == 0, r.stderr
    spec["name"], spec["tenants"] = "globex-only", tenants[1:]
    (work / "globex.yaml").write_text(yaml.safe_dump(spec))
    os.environ["ADAPTERFAB_HOME"] = str(home)
    try:
        other = create_batch(Settings.load(), work / "globex.yaml")
    finally:
        os.environ.pop("ADAPTERFAB_HOME")
    return {"mixed": r.stdout.split()[1], "globex_only": other}


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _open(browser, url: str, key: str):  # noqa: ANN001, ANN202
    """A fresh browser profile at the dashboard; the key is typed into the page's key form."""
    page = browser.new_context(viewport=VIEWPORT).new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.fill("#key-input", key)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#whoami:not(:empty)")
    return page


def _shot(page, name: str) -> None:  # noqa: ANN001
    page.mouse.move(640, 790)  # no hover highlight left on the link clicked last
    page.screenshot(path=str(DOCS / name))


def _job_states(page) -> dict[str, str]:  # noqa: ANN001
    return page.eval_on_selector_all("#jobs tr[data-job-id]", "rows => Object.fromEntries(rows.map("
                                     "r => [r.dataset.jobId, r.querySelector('.badge').textContent]))")


def _curve_points(page) -> list[int]:  # noqa: ANN001
    """Points drawn per job row's loss curve (one M then an L per further point)."""
    return page.eval_on_selector_all("#jobs svg.loss-curve", "svgs => svgs.map(s => { "
                                     "const p = s.querySelector('path'); "
                                     "return p ? p.getAttribute('d').split('L').length : 0; })")


@pytest.mark.timeout(1200)
def test_dashboard_follows_a_running_batch(stack, keys, batches, browser) -> None:
    _, info = stack
    DOCS.mkdir(exist_ok=True)
    page = browser.new_context(viewport=VIEWPORT).new_page()
    page.goto(info["ui_url"])
    page.wait_for_selector("#key-form")  # no key yet: the page asks for one
    page.fill("#key-input", "af_wrong_key")
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#key-form .error-text")
    assert "not accepted" in page.inner_text("#key-form .error-text")
    page.close()

    page = _open(browser, info["ui_url"], keys["operator"])
    assert page.inner_text("#whoami").startswith("operator")
    page.wait_for_selector(f"#batches tr[data-batch-id='{batches['mixed']}']")
    page.click(f"#batches tr[data-batch-id='{batches['mixed']}'] a")
    page.wait_for_selector("#jobs tr[data-job-id]")
    page.evaluate("window.__sameDocument = true")  # gone if the page reloads
    seen: dict[str, set[str]] = {}
    deadline = time.monotonic() + 900
    cluster_shot = False
    while time.monotonic() < deadline:
        states = _job_states(page)
        for jid, st in states.items():
            seen.setdefault(jid, set()).add(st)
        # as soon as a job trains (a tiny-model job trains in seconds: the page's 2 s poll may draw its
        # curve only after it ended, so the cluster page is checked on the first TRAINING seen)
        if not cluster_shot and "TRAINING" in states.values():
            _cluster_while_training(page, batches["mixed"])
            cluster_shot = True
        if len(states) == 2 and all(s in TERMINAL for s in states.values()):
            break
        time.sleep(0.5)
    states = _job_states(page)
    print("states seen in the page:", seen)
    assert sorted(states.values()) == ["SUCCEEDED", "SUCCEEDED"], (states, seen)
    assert all(seen[j] - set(TERMINAL) for j in states), seen  # each job was seen before its end, live
    assert page.evaluate("window.__sameDocument") is True  # updated in place, never reloaded
    page.wait_for_function(f"() => [...document.querySelectorAll('#jobs svg.loss-curve path')]"
                           f".filter(p => p.getAttribute('d').split('L').length === {STEPS}).length === 2")
    assert _curve_points(page) == [STEPS, STEPS]  # every step's loss, as MLflow recorded it
    assert page.get_attribute("#job-detail svg.loss-chart path", "d").count("L") == STEPS - 1
    assert page.locator("#jobs a[href$='/1']").count() == 2  # each job links to its registry version
    _shot(page, "dashboard-batch.png")

    page.goto(info["ui_url"] + "/#/batches")
    page.wait_for_selector(f"#batches tr[data-batch-id='{batches['mixed']}'] .badge.st-succeeded")
    row = page.inner_text(f"#batches tr[data-batch-id='{batches['mixed']}']")
    assert "2 succeeded" in row  # job counts per state
    assert page.locator(f"#batches tr[data-batch-id='{batches['globex_only']}']").count() == 1
    _shot(page, "dashboard-batches.png")

    page.goto(info["ui_url"] + "/#/registry")
    page.wait_for_selector("section.tenant[data-tenant='globex'] .badge")
    text = page.inner_text("main")
    assert "acme/pirate" in text and "globex/robot" in text and "production → v1" in text
    assert "beats" in text or "refused" in text.lower()  # the decision's reason is shown
    _shot(page, "dashboard-registry.png")
    assert cluster_shot, "no job was seen TRAINING: the cluster page was not checked live"


def _cluster_while_training(page, batch_id: str) -> None:  # noqa: ANN001
    """Mid-run: Ray's head node with its resources, and the batch's jobs on it (packed into one fused
    worker); then back to the batch page (a hash change, not a reload)."""
    page.click("nav a[data-page=cluster]")
    page.wait_for_selector("#nodes tr[data-node-id]")
    node = page.get_attribute("#nodes tr[data-node-id]", "data-node-id")
    assert "head" in page.inner_text("#nodes")
    # the jobs name the node they run on (cell title: the full node id); finished ones move to "recent"
    page.wait_for_selector("#active-jobs tr[data-job-id], #recent-jobs tr[data-job-id]")
    _shot(page, "dashboard-cluster.png")
    placed = page.eval_on_selector_all("#active-jobs td[title], #recent-jobs td[title]",
                                       "tds => tds.map(c => c.title)")
    assert node in placed, (node, placed)
    page.goto(page.url.split("#")[0] + f"#/batches/{batch_id}")
    page.wait_for_selector("#jobs tr[data-job-id]")


@pytest.mark.timeout(300)
def test_tenant_key_sees_only_its_own_batches(stack, keys, batches, browser) -> None:
    _, info = stack
    page = _open(browser, info["ui_url"], keys["acme"])
    assert page.inner_text("#whoami").startswith("tenant acme")
    page.wait_for_selector(f"#batches tr[data-batch-id='{batches['mixed']}']")
    assert page.locator(f"#batches tr[data-batch-id='{batches['globex_only']}']").count() == 0
    page.goto(info["ui_url"] + f"/#/batches/{batches['globex_only']}")
    page.locator(".empty h2", has_text="Not found").wait_for()  # the same answer as a missing batch
    page.goto(info["ui_url"] + f"/#/batches/{batches['mixed']}")
    page.wait_for_selector("#jobs tr[data-job-id]")
    assert [r.split(".")[-2] for r in _job_states(page)] == ["acme"]
    assert "globex" not in page.inner_text("body") and "robot" not in page.inner_text("body")
    _shot(page, "dashboard-tenant.png")
    page.goto(info["ui_url"] + "/#/registry")
    page.wait_for_selector("section.tenant[data-tenant='acme'], .empty")
    assert "globex" not in page.inner_text("body")
    page.goto(info["ui_url"] + "/#/registry/globex")
    page.locator(".empty h2", has_text="Not found").wait_for()
