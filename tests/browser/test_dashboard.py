"""The dashboard in a real browser (Debian's headless chromium driven by Playwright) against the stack
that `adapterfab up` starts, while a small 2-tenant batch on the tiny model trains: the page asks for a
key, the batch's jobs move to a terminal state without a reload, loss curves are drawn from MLflow's
per-step history by the vendored uPlot (served by the dashboard itself; hovering the large chart shows
the values under the cursor), the cluster page shows Ray's node and where the jobs ran, the registry
page shows the promotion decisions, and a tenant's key neither lists nor opens another tenant's batch.
Screenshots of each page are written to docs/dashboard-*.png (docs/dashboard.md shows them)."""

from __future__ import annotations

import json
import math
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
    """Points drawn per job row's loss curve (the steps in the data of the uPlot chart in each row)."""
    return page.eval_on_selector_all("#jobs .chart", "els => els.map(e => e.uplot.data[0].length)")


def _blue_pixels(page, selector: str) -> int:  # noqa: ANN001
    """Pixels of the train-loss line's blue (--accent, #2f6fdf) on the chart's canvas: 0 when nothing is drawn."""
    return page.eval_on_selector(selector + " canvas", "c => { const d = c.getContext('2d')"
                                 ".getImageData(0, 0, c.width, c.height).data; let n = 0; "
                                 "for (let i = 0; i < d.length; i += 4) "
                                 "if (d[i + 3] > 200 && d[i + 2] > 180 && d[i] < 110 && d[i + 1] < 160) n++; "
                                 "return n; }")


def _retention_text(m: dict) -> str:
    """What the page shows for a job's or a version's retention measure (serve/dashboard_static/app.js
    retentionText: Math.round of the percentage, numbers as JavaScript prints them)."""
    assert "retention_known" in m, m  # measured: every job that trains is
    if not float(m["retention_known"]):
        return "retention: base knows no probe"
    return (f"retention {math.floor(100 * float(m['retention']) + 0.5)}% "
            f"({float(m['retention_kept']):g}/{float(m['retention_known']):g})")


def _shows_retention_of_a_base_that_knows_facts(page, batch_id: str) -> None:  # noqa: ANN001
    """The tiny random model states none of the probes, so the live batch only ever shows "base knows no
    probe". The page's other branch, on the batch API's reply with a measure the real base gives (55 of the
    60 facts it states: tests/unit/test_dashboard_api.py checks the API carries it)."""
    def measured(route) -> None:  # noqa: ANN001
        body = route.fetch().json()
        for j in body["jobs"]:
            j["eval"].update(retention=55 / 60, retention_known=60.0, retention_kept=55.0)
        route.fulfill(json=body)

    page.route(f"**/api/batches/{batch_id}", measured)
    try:
        page.wait_for_function("() => [...document.querySelectorAll('#jobs tr[data-job-id] .retention')]"
                               ".filter(e => e.textContent === 'retention 92% (55/60)').length === 2")
        assert _retention_text({"retention": 55 / 60, "retention_known": 60, "retention_kept": 55}) == \
            "retention 92% (55/60)"
    finally:
        page.unroute(f"**/api/batches/{batch_id}")


def _hover_detail_chart(page) -> None:  # noqa: ANN001
    """The cursor over the large chart: uPlot's legend shows the step and loss under it, as drawn."""
    legend = "#job-detail .u-legend .u-series"
    page.mouse.move(640, 5)  # the header's empty middle: off the chart
    assert page.inner_text(f"{legend}:nth-child(2) .u-value") == "--"  # no cursor yet: no value
    box = page.locator("#job-detail .u-over").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] / 2)
    idx = page.eval_on_selector("#job-detail .chart", "e => e.uplot.cursor.idx")
    assert isinstance(idx, int), idx
    step, loss = page.eval_on_selector("#job-detail .chart", f"e => [e.uplot.data[0][{idx}], e.uplot.data[1][{idx}]]")
    assert page.inner_text(f"{legend}:nth-child(1) .u-value") == str(step)
    assert page.inner_text(f"{legend}:nth-child(2) .u-value") == f"{loss:.4f}"
    assert 0 < step < STEPS


@pytest.mark.timeout(1200)
def test_dashboard_follows_a_running_batch(stack, keys, batches, browser) -> None:
    home, info = stack
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
    requests: list[str] = []
    served: dict[str, int] = {}
    errors: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("response", lambda r: served.__setitem__(r.url, r.status))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.reload()  # the key stays in localStorage: this load's requests are all seen
    page.wait_for_selector("#whoami:not(:empty)")
    assert served.get(info["ui_url"] + "/static/uPlot.iife.min.js") == 200  # the vendored chart library
    assert page.evaluate("typeof uPlot") == "function"
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
    page.wait_for_function(f"() => [...document.querySelectorAll('#jobs .chart')]"
                           f".filter(e => e.uplot.data[0].length === {STEPS}).length === 2")
    assert _curve_points(page) == [STEPS, STEPS]  # every step's loss, as MLflow recorded it
    detail = page.eval_on_selector("#job-detail .chart", "e => ({n: e.uplot.data[1].length, "
                                   "labels: e.uplot.series.map(s => s.label)})")
    assert detail["n"] == STEPS
    # the selected job succeeded: its held-out eval loss and the base's are drawn beside the train loss
    assert detail["labels"][1:] == ["train loss", "eval loss (held-out)", "base eval loss (held-out)"], detail
    assert _blue_pixels(page, "#job-detail .chart") > 200  # the curve is on the canvas, not only in data
    assert all(_blue_pixels(page, f"#jobs tr[data-job-id='{j}'] .chart") > 20 for j in states)
    assert page.locator("#jobs a[href$='/1']").count() == 2  # each job links to its registry version
    done = json.loads(cli(home, "status", batches["mixed"], "--json").stdout)["jobs"]
    for j in done:  # every job measured retention; the page shows the measure beside the eval loss
        assert _retention_text(j["metrics"]) in page.inner_text(f"#jobs tr[data-job-id='{j['id']}']")
    page.locator("#job-detail .u-legend").scroll_into_view_if_needed()
    _hover_detail_chart(page)
    page.screenshot(path=str(DOCS / "dashboard-batch.png"))  # with the cursor on the chart: its values
    _shows_retention_of_a_base_that_knows_facts(page, batches["mixed"])

    # a job with no loss yet (globex-only was recorded, never run): placeholders, no chart, no error
    page.goto(info["ui_url"] + f"/#/batches/{batches['globex_only']}")
    page.wait_for_selector("#job-detail .chart-none")
    assert "no loss yet" in page.inner_text("#job-detail") and "no loss yet" in page.inner_text("#jobs")
    assert page.locator(".uplot").count() == 0  # the other batch's charts went with its page
    assert not page.is_visible("#error"), page.inner_text("#error")

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
    for tenant, persona in (("acme", "pirate"), ("globex", "robot")):  # each version's retention, as registered
        tags = json.loads(cli(home, "registry", "show", f"{tenant}/{persona}@1", "--json").stdout)["tags"]
        m = {k.removeprefix("adapterfab.metric."): v for k, v in tags.items() if k.startswith("adapterfab.metric.")}
        assert _retention_text(m) in page.inner_text(f"#v-{tenant}-{persona}-1")
    _shot(page, "dashboard-registry.png")
    assert cluster_shot, "no job was seen TRAINING: the cluster page was not checked live"
    assert not errors, errors
    outside = [u for u in requests if not u.startswith((info["ui_url"] + "/", "data:"))]
    assert not outside, outside  # every script, style and chart from the dashboard itself


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
