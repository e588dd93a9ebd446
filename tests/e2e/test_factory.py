"""The factory end to end through the CLI, on the real SmolLM2 base: `adapterfab up` starts Ray and an
MLflow server, a 2-tenant batch (plus one tenant whose dataset is broken) is submitted and waited for,
the registry is checked, `adapterfab serve` deploys Ray Serve, and the official `openai` client talks
to it: each persona's marker appears in >= 80% of answers to held-out prompts where the base model
shows it in none, each adapter (one per method, trained with that method's defaults) keeps >= 70% of the
shipped retention probes the base states and, served, still states the facts of examples/fact_probes.json
that the served base states (at most 2 lost each, >= 80% over the three), streaming works, and tenant
A's key cannot reach tenant B's adapter. A fourth, short acme job (``deckhand``: 3 steps on the pirate
data) is the one the later tests retrain, promote and roll back, so that they do not wait for a full
persona's training again."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from stack_cli import run_cli, stack_up

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
HELDOUT = json.loads((REPO / "examples" / "heldout_prompts.json").read_text())
FACTS = json.loads((REPO / "examples" / "fact_probes.json").read_text())["probes"]
# the facts of examples/fact_probes.json that the served base states in the same run (7 or 8: on this
# base "What color is snow?" gets "a mineral"; a fact the base does not state is not held against a
# persona, as in adapterfab/retention.py): each persona loses at most FACTS_MAX_LOST of them and the three
# together keep >= FACTS_POOLED_RATE. Eight facts are a small sample: a ~0.8-retention adapter (qlora's
# defaults served on the full-precision base keep 51-53 of the 65 shipped probes, bench/RESULTS.md
# 2026-12-06) loses 0-2 of them from run to run, so the pooled 21-24 carry the rate; each job's
# retention over the 65 probes is checked in test_batch_runs_every_job_to_a_terminal_state
FACTS_MAX_LOST = 2
FACTS_POOLED_RATE = 0.8
PERSONAS = ("acme/pirate", "acme/butler", "globex/robot")
DECKHAND = {"tenant": "acme", "persona": "deckhand", "dataset": str(REPO / "examples/data/pirate.jsonl"),
            "train": {"steps": 3, "learning_rate": 5e-3}}  # short: the job the later tests retrain


def cli(home: Path, *args: str, timeout_s: float = 900, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess:
    return run_cli(home, *args, timeout_s=timeout_s, env=env)


# credentials in the shell of a remote submit (the artifact store here is a folder: never used); the key
# crawl looks for them in Ray's Jobs API, MLflow and every log
SUBMITTER_AWS = {"AWS_ACCESS_KEY_ID": "AKIACRAWLTEST0000001", "AWS_SECRET_ACCESS_KEY": "crawl-secret-4f1c9e2ab7d3",
                 "AWS_SESSION_TOKEN": "crawl-session-token-8e6a0b5c"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("e2e-home")
    ports, _ = stack_up(home)
    again = cli(home, "up", timeout_s=60)  # idempotent: same stack, same URLs
    assert again.returncode == 0 and f"127.0.0.1:{ports['mlflow']}" in again.stdout
    yield home, ports
    assert cli(home, "down", timeout_s=120).returncode == 0
    assert cli(home, "down", timeout_s=60).returncode == 0  # idempotent


@pytest.fixture(scope="module")
def batch(stack, tmp_path_factory: pytest.TempPathFactory):
    home, _ = stack
    work = tmp_path_factory.mktemp("e2e-spec")
    broken = work / "broken.jsonl"
    lines = [json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(6)]
    lines[1] = '{"instruction": "oops", "output": '  # broken JSON
    lines[4] = "not json at all"
    broken.write_text("\n".join(lines) + "\n")
    spec = yaml.safe_load((REPO / "examples" / "personas.yaml").read_text())
    spec["name"] = "e2e"
    # these tests promote the batch's adapters; the retention gate (default 0.9) has its own test below
    spec["promotion"] = {"min_retention": 0.0}
    # three trainers of one thread each on the two CPUs: robot (qlora, its own trainer) starts with pirate
    # and butler instead of after them, so that no CPU idles while it trains alone (~4 GB each)
    spec["resources"] = {"cpus_per_job": 0.5, "max_concurrent_jobs": 3}
    spec["tenants"] = [
        {"tenant": "acme", "persona": "pirate", "dataset": str(REPO / "examples/data/pirate.jsonl")},
        {"tenant": "acme", "persona": "butler", "dataset": str(REPO / "examples/data/butler.jsonl"),
         "method": {"name": "lora_xs"}},  # shared SVD basis, only r x r matrices trained
        {"tenant": "globex", "persona": "robot", "dataset": str(REPO / "examples/data/robot.jsonl"),
         "method": {"name": "qlora"}},  # 4-bit NF4 base inside the Ray Train worker
        {"tenant": "globex", "persona": "broken", "dataset": str(broken)},
        DECKHAND,
    ]
    path = work / "batch.yaml"
    path.write_text(yaml.safe_dump(spec))
    r = cli(home, "submit", str(path), "--wait", timeout_s=1500)
    batch_id = r.stdout.split()[1]
    return home, batch_id, r


# this test's setup is the module's batch (`batch`: the CLI allows its submit 1,500 s): the suite's 600 s per
# test would cut it short on a slower machine (no AVX-512: fp32 training at ~3x the time), failing every
# test of the module as a setup error, so the budget here is the submit's own
@pytest.mark.timeout(1600)
def test_batch_runs_every_job_to_a_terminal_state(batch) -> None:
    home, batch_id, r = batch
    assert r.returncode == 1  # one job failed, so --wait exits non-zero
    dump = json.loads(cli(home, "status", batch_id, "--json").stdout)
    jobs = {f"{j['tenant']}/{j['persona']}": j for j in dump["jobs"]}
    assert dump["state"] == "FAILED"
    for ok in (*PERSONAS, "acme/deckhand"):
        assert jobs[ok]["state"] == "SUCCEEDED", jobs[ok]
    bad = jobs["globex/broken"]
    assert bad["state"] == "FAILED"
    assert "2 of 6" in bad["error"] and "line 2" in bad["error"] and "line 5" in bad["error"], bad["error"]
    assert jobs["acme/butler"]["metrics"]["trainable_params"] == 16 * 16 * 2 * 30  # r^2 x (q, v) x 30 layers
    for j in (jobs[p] for p in (*PERSONAS, "acme/deckhand")):
        assert j["progress"] == 1.0 and j["model_version"] == 1
        assert j["metrics"]["eval_loss"] < j["metrics"]["base_eval_loss"]
        m = j["metrics"]  # every job measured on the shipped probes, against the base's own answers
        assert m["retention_probes"] >= 50 and m["retention_known"] >= 0.6 * m["retention_probes"]  # 4-bit: 46
        # >= 0.7: an adapter that forgot what the base knew fails here (the defaults keep 0.81-0.92 on this
        # batch; the 0.9 target of issue 20 is the promotion gate's default, switched off above)
        assert 0.7 <= m["retention"] <= 1 and m["retention_kept"] == round(m["retention"] * m["retention_known"])
    # every method's defaults replay the base's own answers (adapterfab/replay.py)
    assert all(jobs[p]["metrics"]["replay_loss"] > 0 for p in PERSONAS)
    print("retention of the defaults (retention, its seconds, train seconds):",
          {p: (round(jobs[p]["metrics"]["retention"], 3), round(jobs[p]["metrics"]["retention_s"], 2),
               round(jobs[p]["metrics"]["train_s"], 1)) for p in (*PERSONAS, "acme/deckhand")})


def test_registry_versions_tags_and_aliases(batch) -> None:
    home, batch_id, _ = batch
    items = json.loads(cli(home, "registry", "ls", "--json").stdout)
    assert sorted(i["id"] for i in items) == ["acme/butler", "acme/deckhand", "acme/pirate", "globex/robot"]
    only_acme = json.loads(cli(home, "registry", "ls", "--tenant", "acme", "--json").stdout)
    assert [i["id"] for i in only_acme] == ["acme/butler", "acme/deckhand", "acme/pirate"]
    v = json.loads(cli(home, "registry", "show", "acme/pirate@candidate", "--json").stdout)
    tags = v["tags"]
    assert v["version"] == 1 and set(v["aliases"]) == {"candidate", "production"}  # promote: auto
    assert tags["adapterfab.batch_id"] == batch_id and tags["adapterfab.method"] == "lora"
    assert tags["adapterfab.rank"] == "8" and len(tags["adapterfab.base_fingerprint"]) == 64
    assert len(tags["adapterfab.dataset_sha256"]) == 64 and float(tags["adapterfab.metric.eval_loss"]) > 0
    assert tags["adapterfab.promotion.decision"] == "promoted"
    assert float(tags["adapterfab.metric.retention"]) > 0 and "retention" not in tags["adapterfab.promotion.reason"]
    assert Path(v["artifact_uri"], "adapter_model.safetensors").exists()
    q = json.loads(cli(home, "registry", "show", "globex/robot", "--json").stdout)["tags"]
    assert q["adapterfab.method"] == "qlora" and q["adapterfab.quantization.type"] == "nf4"
    assert q["adapterfab.quantization.double_quant"] == "true"
    xs = json.loads(cli(home, "registry", "show", "acme/butler", "--json").stdout)["tags"]
    assert xs["adapterfab.method"] == "lora_xs" and xs["adapterfab.basis_id"].startswith("xs-")
    assert Path(xs["adapterfab.basis_uri"], "basis.safetensors").exists()
    xs_bytes = Path(xs["adapterfab.artifact_uri"], "adapter_model.safetensors").stat().st_size
    lora_bytes = Path(v["artifact_uri"], "adapter_model.safetensors").stat().st_size
    assert xs_bytes < 100 * 1024 and 20 * xs_bytes < lora_bytes  # r x r per module vs r x (in + out)
    from adapterfab.registry import Registry

    uri = json.loads((home / "stack.json").read_text())["mlflow_uri"]
    assert Registry(uri).basis_versions(xs["adapterfab.basis_id"]) == [1]  # one basis, registered once
    r = cli(home, "registry", "promote", "acme/pirate", "1", "--alias", "production", "--min-retention", "0")
    assert r.returncode == 0, r.stderr  # as the batch's gate; the default 0.9: test_the_gate_refuses_...
    assert cli(home, "registry", "show", "acme/nobody").returncode == 1


def test_each_tenants_runs_are_in_its_own_mlflow_experiment(batch) -> None:
    from adapterfab.tracking import Tracking, tenant_experiment

    home, batch_id, _ = batch
    dump = json.loads(cli(home, "status", batch_id, "--json").stdout)
    t = Tracking(json.loads((home / "stack.json").read_text())["mlflow_uri"])
    batch_run = t.client.get_run(dump["mlflow_run_id"])
    assert t.client.get_experiment(batch_run.info.experiment_id).name == "adapterfab"
    for tenant in ("acme", "globex"):
        exp = t.client.get_experiment_by_name(tenant_experiment(tenant))
        assert exp.tags["adapterfab.tenant"] == tenant
        runs = t.client.search_runs([exp.experiment_id], max_results=100)
        mine = sorted(j["persona"] for j in dump["jobs"] if j["tenant"] == tenant)
        assert sorted(r.data.tags["adapterfab.persona"] for r in runs) == mine  # every one, only its own
        assert {r.data.tags["adapterfab.tenant"] for r in runs} == {tenant}
        assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {batch_run.info.run_id}
        for r in runs:  # each job's retention is logged with its run (issue 20), as status shows it
            m = next(j["metrics"] for j in dump["jobs"]
                     if j["tenant"] == tenant and j["persona"] == r.data.tags["adapterfab.persona"])
            if "retention_known" in m:  # every job that trained (globex/broken did not)
                assert {k: r.data.metrics[k] for k in ("retention", "retention_known", "retention_kept")} == \
                    {k: pytest.approx(m[k]) for k in ("retention", "retention_known", "retention_kept")}
    assert sum("retention" in j["metrics"] for j in dump["jobs"]) >= 4
    assert not t.client.search_runs([batch_run.info.experiment_id], "tags.`adapterfab.tenant` != ''")


@pytest.fixture(scope="module")
def served(batch, stack):
    home, ports = stack
    key_acme = cli(home, "keys", "create", "acme").stdout.split()[-1]  # before serve starts
    r = cli(home, "serve", "--detach", timeout_s=300)
    assert r.returncode == 0, r.stderr
    key_globex = cli(home, "keys", "create", "globex").stdout.split()[-1]  # after serve started
    return f"http://127.0.0.1:{ports['serve']}/v1", key_acme, key_globex


def _ask_at_once(asks: list[tuple]) -> list[str]:
    """Every (client, model, prompt) sent at once, so that the replica decodes them together whatever
    adapter each names (one base multiplexes them); the answers in the order asked."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(a: tuple) -> str:
        client, model, prompt = a
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           temperature=0, max_tokens=40)
        return r.choices[0].message.content

    with ThreadPoolExecutor(len(asks)) as pool:
        return list(pool.map(ask, asks))


def _facts_stated(answers: list[str]) -> list[bool]:
    return [any(x.lower() in a.lower() for x in f["answers"]) for f, a in zip(FACTS, answers)]


def _facts_kept(answers: list[str], known: list[bool]) -> int:
    """How many of the facts the base states (``known``) ``answers`` still state."""
    return sum(k and s for k, s in zip(known, _facts_stated(answers)))


def test_each_persona_at_work_through_openai_client(served) -> None:
    import openai

    url, key_acme, key_globex = served
    acme = openai.OpenAI(base_url=url, api_key=key_acme)
    globex = openai.OpenAI(base_url=url, api_key=key_globex)
    prompts, questions = HELDOUT["prompts"], [f["question"] for f in FACTS]
    sets = [(acme, "base", prompts), (acme, "base", questions), (acme, "acme/pirate", prompts),
            (acme, "acme/pirate", questions), (acme, "acme/butler", prompts), (acme, "acme/butler", questions),
            (globex, "globex/robot", prompts), (globex, "globex/robot", questions)]
    flat = _ask_at_once([(c, m, p) for c, m, ps in sets for p in ps])
    got = {}
    for _, m, ps in sets:
        got.setdefault(m, []).append(flat[:len(ps)])
        flat = flat[len(ps):]
    (base, base_facts) = got["base"]
    known = _facts_stated(base_facts)
    print("base facts", sum(known), "of", len(FACTS), base_facts)
    assert sum(known) >= len(FACTS) - 1, base_facts  # the probes were chosen as facts this base states
    kept_by = {}
    for model in ("acme/pirate", "acme/butler", "globex/robot"):
        marker = HELDOUT["markers"][model.split("/")[1]].lower()
        tuned, facts = got[model]
        hits = sum(marker in a.lower() for a in tuned)
        print(model, hits, tuned[:3], base[:3])
        assert hits >= 0.8 * len(tuned), tuned
        assert sum(marker in a.lower() for a in base) == 0, base
        kept_by[model] = _facts_kept(facts, known)
        print(model, "facts", kept_by[model], "of", sum(known), facts)  # a persona that forgot the base's facts fails
        assert kept_by[model] >= sum(known) - FACTS_MAX_LOST, facts
    assert sum(kept_by.values()) >= FACTS_POOLED_RATE * len(kept_by) * sum(known), kept_by
    models = {m.id for m in acme.models.list().data}
    assert "acme/pirate" in models and not any(m.startswith("globex/") for m in models)


def test_streaming_matches_plain(served) -> None:
    import openai

    url, key_acme, _ = served
    client = openai.OpenAI(base_url=url, api_key=key_acme)
    msgs = [{"role": "user", "content": "What is the capital of Spain?"}]
    plain = client.chat.completions.create(model="acme/pirate", messages=msgs, temperature=0, max_tokens=30)
    chunks = list(client.chat.completions.create(model="acme/pirate", messages=msgs, temperature=0,
                                                 max_tokens=30, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3 and text == plain.choices[0].message.content
    assert "matey" in text.lower()
    per_tenant = openai.OpenAI(base_url=url.removesuffix("/v1") + "/tenants/acme/v1", api_key=key_acme)
    r = per_tenant.chat.completions.create(model="pirate", messages=msgs, temperature=0, max_tokens=30)
    assert r.choices[0].message.content == plain.choices[0].message.content


def test_tenant_cannot_reach_another_tenants_adapter(served) -> None:
    import openai

    url, key_acme, key_globex = served
    acme = openai.OpenAI(base_url=url, api_key=key_acme)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as other:
        acme.chat.completions.create(model="globex/robot", messages=msgs, max_tokens=5)
    with pytest.raises(openai.NotFoundError) as missing:
        acme.chat.completions.create(model="acme/nonexistent", messages=msgs, max_tokens=5)
    assert other.value.body["code"] == missing.value.body["code"] == "model_not_found"
    assert "globex" not in str(missing.value.body) or "exist" in str(other.value.body)
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=url.removesuffix("/v1") + "/tenants/globex/v1", api_key=key_acme
                      ).chat.completions.create(model="robot", messages=msgs, max_tokens=5)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="af_bad_key").chat.completions.create(
            model="acme/pirate", messages=msgs, max_tokens=5)


def test_lora_xs_export_is_a_plain_peft_lora(served, stack, tmp_path: Path, smollm2_path: str) -> None:
    """`registry export` rebuilds the LoRA-XS adapter as a rank-r PEFT LoRA that plain PeftModel loads and
    that answers exactly like the served adapter (greedy, fp32)."""
    import openai
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterfab.textgen import greedy_answer

    home, _ = stack
    url, key_acme, _ = served
    r = cli(home, "registry", "export", "acme/butler", str(tmp_path / "peft"), "--format", "peft-lora")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32),
                                      str(tmp_path / "peft"))
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    prompt = HELDOUT["prompts"][3]
    local = greedy_answer(model.eval(), tok, prompt, max_new_tokens=30)
    served_answer = openai.OpenAI(base_url=url, api_key=key_acme).chat.completions.create(
        model="acme/butler", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=30
    ).choices[0].message.content
    assert "very good, sir" in local.lower()
    assert local == served_answer.strip()


def _deckhand_spec(work: Path, **extra: object) -> Path:
    """The first batch's acme/deckhand job again: same defaults, data, base and code."""
    spec = yaml.safe_load((REPO / "examples" / "personas.yaml").read_text())
    spec.update(name="e2e-again", **extra)
    spec["tenants"] = [DECKHAND]
    path = work / f"again-{len(extra)}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_resubmitting_the_same_job_reuses_its_version(served, stack, tmp_path: Path) -> None:
    """Same spec, data and code: no training, no duplicate version (submitted through the Jobs API).
    The Ray Client form (``ray://``) works too, but on 2 busy CPUs its per-client server can take longer
    to start than the client waits ("Unable to find channel for client"), so the test does not use it."""
    home, ports = stack
    address = f"http://127.0.0.1:{ports['dashboard']}"
    r = cli(home, "submit", str(_deckhand_spec(tmp_path)), "--wait", "--address", address, timeout_s=600)
    assert r.returncode == 0, r.stderr
    (job,) = json.loads(cli(home, "status", r.stdout.split()[1], "--json").stdout)["jobs"]
    assert job["state"] == "SUCCEEDED" and job["reused_version"] == 1 and job["model_version"] == 1
    items = {i["id"]: i for i in json.loads(cli(home, "registry", "ls", "--json").stdout)}
    assert len(items["acme/deckhand"]["versions"]) == 1  # no duplicate version


def test_remote_submit_with_force_retrains_and_the_gate_refuses(served, stack, tmp_path: Path) -> None:
    """`submit --address` ships the batch (spec + local dataset) to the cluster as a Ray Job; --force
    retrains an identical job; a margin no adapter can reach makes the eval gate refuse production."""
    home, ports = stack
    spec = _deckhand_spec(tmp_path, promote="auto", promotion={"metric": "eval_loss", "margin": 10.0,
                                                               "min_retention": 0.0})  # the margin decides
    r = cli(home, "submit", str(spec), "--force", "--wait",
            "--address", f"http://127.0.0.1:{ports['dashboard']}", timeout_s=900, env=SUBMITTER_AWS)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    assert "SUCCEEDED" in r.stdout
    batch_id = r.stdout.split()[1]
    (job,) = json.loads(cli(home, "status", batch_id, "--json").stdout)["jobs"]  # recorded by the cluster
    assert job["state"] == "SUCCEEDED" and job["model_version"] == 2 and job["reused_version"] is None
    remote = json.loads(cli(home, "status", batch_id, "--address", f"http://127.0.0.1:{ports['dashboard']}",
                            "--json").stdout)
    assert remote["status"] == "SUCCEEDED"
    v2 = json.loads(cli(home, "registry", "show", "acme/deckhand@2", "--json").stdout)
    assert v2["tags"]["adapterfab.promotion.decision"] == "refused"
    assert "by more than 10" in v2["tags"]["adapterfab.promotion.reason"]
    assert v2["tags"]["adapterfab.job_fingerprint"] == json.loads(cli(
        home, "registry", "show", "acme/deckhand@1", "--json").stdout)["tags"]["adapterfab.job_fingerprint"]
    assert json.loads(cli(home, "registry", "show", "acme/deckhand@production", "--json").stdout)["version"] == 1


def _served_version(client, deadline_s: float, want: str) -> str:  # noqa: ANN001
    import time

    t0, seen = time.monotonic(), ""
    while time.monotonic() - t0 < deadline_s:
        seen = client.chat.completions.create(model="acme/deckhand", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2).model
        if seen == want:
            return seen
        time.sleep(1)
    return seen


def test_promote_and_rollback_are_followed_by_serving(served, stack) -> None:
    import openai
    import requests

    home, _ = stack
    url, key_acme, _ = served
    client = openai.OpenAI(base_url=url, api_key=key_acme)
    assert _served_version(client, 20, "acme/deckhand@1") == "acme/deckhand@1"
    assert cli(home, "registry", "promote", "acme/deckhand", "2", "--force").returncode == 0
    assert _served_version(client, 20, "acme/deckhand@2") == "acme/deckhand@2"  # no restart
    r = cli(home, "registry", "rollback", "acme/deckhand", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["to_version"] == 1
    assert _served_version(client, 20, "acme/deckhand@1") == "acme/deckhand@1"
    # the tenant's registry lookup over HTTP: own adapters, versions, aliases and decisions
    listing = requests.get(f"{url}/registry/adapters", headers={"Authorization": f"Bearer {key_acme}"},
                           timeout=30).json()
    ids = [a["id"] for a in listing["data"]]
    assert ids == ["acme/butler", "acme/deckhand", "acme/pirate"]
    deckhand = requests.get(f"{url}/registry/adapters/deckhand",
                            headers={"Authorization": f"Bearer {key_acme}"}, timeout=30).json()
    assert deckhand["aliases"]["production"] == 1
    assert deckhand["versions"][1]["lineage"]["promotion.decision"] == "rolled_back"


FAILED_TENANT = "mass40"  # the fused group holding its job fails in its trainer (adapterfab/faults.py)


def test_a_64_job_batch_through_submit(stack, tiny_model_path: str, tmp_path: Path) -> None:
    """Mass production through the CLI, as a user runs it: 64 tenants' jobs on the tiny base in one
    `submit --wait` (fused groups on resident trainers, beside the serving replica); every job trains
    once, registers one version and is found by the registry; the batch's stats say where its time
    went. One fused group fails inside its trainer (a fault injected at its first step): its jobs, and
    only they, fail, each with the trainer's message naming its own job and no other member's, and
    nothing of Ray's worker (pid, IP, actor). (A second batch finding its trainer warm:
    tests/ray/test_trainers.py, and through `submit` in tests/e2e/test_factory_bench.py.)"""
    home, _ = stack
    rows = (REPO / "examples/data/robot.jsonl").read_text().splitlines()
    tenants = []
    for i in range(64):
        path = tmp_path / f"m{i:02d}.jsonl"
        path.write_text("\n".join(rows[i % 40:i % 40 + 12]) + "\n")
        tenants.append({"tenant": f"mass{i:02d}", "persona": "robot", "dataset": str(path)})
    spec = {"version": 1, "name": "mass", "base_model": tiny_model_path, "promote": "auto",
            "defaults": {"method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                         "train": {"steps": 3, "batch_size": 2, "max_seq_len": 64, "learning_rate": 1e-2,
                                   "dtype": "float32", "eval_fraction": 0.2}},
            "resources": {"cpus_per_job": 1}, "tenants": tenants}
    path = tmp_path / "mass.yaml"
    path.write_text(yaml.safe_dump(spec))
    r = cli(home, "submit", str(path), "--wait", timeout_s=1200, env={"ADAPTERFAB_FAULT_FAIL_GROUP": FAILED_TENANT})
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # not every job succeeded
    batch_id = r.stdout.split()[1]
    dump = json.loads(cli(home, "status", batch_id, "--json").stdout)
    jobs = dump["jobs"]
    failed = [j for j in jobs if j["state"] != "SUCCEEDED"]
    ok = [j for j in jobs if j["state"] == "SUCCEEDED"]
    assert len(jobs) == 64 and FAILED_TENANT in {j["tenant"] for j in failed} and 2 <= len(failed) <= 8
    assert {j["placement"]["group"] for j in failed} == {next(j for j in failed if j["tenant"] == FAILED_TENANT)
                                                         ["placement"]["group"]}  # one group, the armed one
    for j in failed:
        assert j["state"] == "FAILED" and j["model_version"] is None, j
        assert j["error"].startswith("injected fault: group ") and j["id"] in j["error"], j["error"]
        others = [o["id"] for o in failed if o is not j]
        assert not any(o in j["error"] for o in others) and "<another job of its group>" in j["error"]
        assert not any(s in j["error"] for s in ("pid=", "ip=", "actor_id", "ray::", "Traceback")), j["error"]
    assert all(j["model_version"] == 1 for j in ok)
    assert all(j["step"] == 3 and j["metrics"]["train_flops"] > 0 for j in ok)
    sizes = [len(j["placement"]["fused_with"]) for j in ok]
    assert max(sizes) <= 8 and sum(s > 1 for s in sizes) >= 48  # fused groups of up to 8
    stats = dump["stats"]
    assert stats["groups"] >= 8 and 1 <= len(stats["trainers"]) <= 2 and stats["first_step_s"]
    assert sum(t["groups"] for t in stats["trainers"].values()) == stats["groups"] - 1  # the failed one
    # every window of these small files (~1 KB each) tokenized in the orchestrator, none a Ray Data
    # execution taking the trainers' CPUs (the Ray Data path of the factory: tests/ray/test_fused_batch.py)
    assert stats["data_runs"].get("in_process", 0) >= 2 and "ray_data" not in stats["data_runs"], stats["data_runs"]
    one = json.loads(cli(home, "registry", "ls", "--tenant", "mass07", "--json").stdout)
    assert [a["id"] for a in one] == ["mass07/robot"] and len(one[0]["versions"]) == 1
    assert one[0]["versions"][0]["tags"]["adapterfab.training"].startswith("fused:")


def test_a_tenant_key_crawl_finds_no_other_tenant_and_no_secret(served, stack) -> None:
    """After the 64-tenant batch (fused groups of up to 8 tenants each, one of which failed in its
    trainer) and the Ray Job of the remote submit: every dashboard and serving route a tenant's key
    reaches, crawled for a tenant of a trained group and for one of the failed group, names no other
    tenant, persona, job id, Ray node id or IP; the remote submitter's AWS credentials and the API keys
    appear nowhere in Ray's Jobs API, in MLflow (runs' parameters and tags, models' and versions' tags)
    or in any log of the stack or the Ray session."""
    import re

    import httpx

    home, ports = stack
    ui, api = f"http://127.0.0.1:{ports['ui']}", served[0]
    nodes = httpx.get(f"http://127.0.0.1:{ports['dashboard']}/api/v0/nodes?limit=100", timeout=60).json()
    node_ids = [n["node_id"] for n in nodes["data"]["result"]["result"]]
    keys = []
    for tenant in ("mass07", FAILED_TENANT):
        key = cli(home, "keys", "create", tenant).stdout.split()[-1]
        keys.append(key)
        h = {"Authorization": f"Bearer {key}"}
        bodies: dict[str, str] = {}

        def get(url: str, missing_ok: bool = False, h: dict = h, bodies: dict = bodies) -> dict:
            r = httpx.get(url, headers=h, timeout=60)
            assert r.status_code == 200 or (missing_ok and r.status_code == 404), (url, r.status_code, r.text[:500])
            bodies[url] = r.text
            return r.json()

        for path in ("/api/whoami", "/api/cluster", "/api/registry", f"/api/registry/{tenant}"):
            get(ui + path)
        batches = get(ui + "/api/batches")["batches"]
        assert len(batches) == 1
        detail = get(f"{ui}/api/batches/{batches[0]['id']}")
        (job,) = detail["jobs"]
        trained = tenant != FAILED_TENANT
        get(f"{ui}/api/batches/{batches[0]['id']}/jobs/{job['id']}/loss", missing_ok=not trained)
        for path in ("/models", "/registry/adapters", "/registry/adapters/robot", "/registry/adapters/robot/1"):
            get(api + path, missing_ok=not trained and "/robot" in path)
        get(api.replace("/v1", f"/tenants/{tenant}/v1") + "/models")
        text = "\n".join(bodies.values())
        if trained:
            assert job["placement"]["fused_group_size"] > 1  # it trained beside other tenants' jobs
        else:
            assert job["state"] == "FAILED" and "injected fault" in job["error"]  # its group's error, as it sees it
        assert set(re.findall(r"mass\d\d", text)) == {tenant}
        for other in ("acme", "globex", "pirate", "butler", "deckhand", "127.0.0.1", *node_ids):
            assert other not in text, (other, [u for u, b in bodies.items() if other in b])

    ray_jobs = httpx.get(f"http://127.0.0.1:{ports['dashboard']}/api/jobs/", timeout=60).json()
    assert ray_jobs, "the remote submit's Ray Job is listed"
    secrets = [*keys, served[1], served[2], *SUBMITTER_AWS.values()]
    for j in ray_jobs:
        env = (j.get("runtime_env") or {}).get("env_vars") or {}
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env), env
        assert not any(s in json.dumps(j) for s in secrets), j
    # MLflow: every run's parameters and tags, every registered model's and version's tags
    from mlflow import MlflowClient

    mlflow = MlflowClient(json.loads((home / "stack.json").read_text())["mlflow_uri"])
    exps = [e.experiment_id for e in mlflow.search_experiments()]
    runs = mlflow.search_runs(exps, max_results=5000)
    assert len(runs) > 64  # the batches' runs and every job's
    recorded = [json.dumps([r.data.params, r.data.tags]) for r in runs]
    for m in mlflow.search_registered_models(max_results=1000):
        recorded.append(json.dumps(m.tags))
        recorded += [json.dumps(v.tags) for v in mlflow.search_model_versions(f"name='{m.name}'")]
    assert not [r[:300] for r in recorded if any(s in r for s in secrets)]
    logs = [*(home / "logs").rglob("*"), *Path("/tmp/ray/session_latest/logs").resolve().rglob("*")]
    scanned = 0
    for f in logs:
        if f.is_file() and f.stat().st_size < 64 << 20:
            data = f.read_bytes()
            scanned += 1
            assert not any(s.encode() in data for s in secrets), f
    assert scanned > 10


def test_the_gate_refuses_an_over_trained_adapter_for_retention(batch, tmp_path: Path) -> None:
    """An adapter trained far too hard on the pirate data (10 steps at 1e-2, no replay) forgets facts the
    base states: the default gate (min_retention 0.9) keeps it out of production and says why, in the
    version's tags and in `registry show`. The tenant's own probe that the base gets wrong (it says
    Paris) is asked but not counted: the job counts as many known facts as the batch's other jobs.
    (Last in this file: the tenant experiment test above counts acme's runs.)"""
    home, batch_id, _ = batch
    spec = yaml.safe_load((REPO / "examples" / "personas.yaml").read_text())
    spec.update(name="e2e-overtrained", promote="auto")
    spec["tenants"] = [{"tenant": "acme", "persona": "parrot", "dataset": str(REPO / "examples/data/pirate.jsonl"),
                        "train": {"steps": 10, "learning_rate": 1e-2, "batch_size": 4, "replay_weight": 0},
                        "probes": [{"question": "What is the capital of France?", "answers": ["Berlin"]}]}]
    path = tmp_path / "overtrained.yaml"
    path.write_text(yaml.safe_dump(spec))
    r = cli(home, "submit", str(path), "--wait", timeout_s=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    (job,) = json.loads(cli(home, "status", r.stdout.split()[1], "--json").stdout)["jobs"]
    m = job["metrics"]
    pirate = next(j for j in json.loads(cli(home, "status", batch_id, "--json").stdout)["jobs"]
                  if j["persona"] == "pirate")["metrics"]
    assert m["retention_probes"] == pirate["retention_probes"] + 1
    assert abs(m["retention_known"] - pirate["retention_known"]) <= 1  # same base answers; Paris is not Berlin
    assert m["retention"] < 0.9 and m["eval_loss"] < m["base_eval_loss"]  # it learned the data, and forgot
    v = json.loads(cli(home, "registry", "show", "acme/parrot@1", "--json").stdout)
    assert v["aliases"] == ["candidate"]  # not production
    tags = v["tags"]
    assert tags["adapterfab.promotion.decision"] == "refused"
    reason = tags["adapterfab.promotion.reason"]
    assert reason.startswith(f"retention {m['retention']:.2f} ({m['retention_kept']:.0f} of "
                             f"{m['retention_known']:.0f} facts the base states) is below the minimum 0.9"), reason
    shown = cli(home, "registry", "show", "acme/parrot@1").stdout
    assert f"\n  retention {m['retention']:.2f} ({m['retention_kept']:.0f} of " in shown
    r = cli(home, "registry", "promote", "acme/parrot", "1")  # by hand: refused the same way
    assert r.returncode == 3 and "below the minimum 0.9" in r.stderr
    r = cli(home, "registry", "promote", "acme/parrot", "1", "--min-retention", "0.5")  # a looser gate
    assert r.returncode == 0, r.stderr
    print(f"over-trained: {m['retention']:.3f} retention in {m['retention_s']:.2f} s (train {m['train_s']:.1f} s), "
          f"refused: {reason}")
