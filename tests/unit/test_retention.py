"""Retention in the product (adapterfab/retention.py): the probes a job is measured on, the gate that
refuses ``production`` below ``promotion.min_retention``, a tenant's own probes in the spec, and the
measure itself on the real SmolLM2 base inside the resident trainer (counted against the base's own
answers, in the group's fused eval forwards). The over-trained adapter refused through `adapterfab
submit` is in tests/e2e/test_factory.py."""

from __future__ import annotations

import pytest

from adapterfab.errors import SpecError
from adapterfab.promotion import Policy, decide
from adapterfab.retention import AnswerCache, describe, forced_row, job_probes, metrics, shipped_probes
from adapterfab.spec import parse_spec

EVAL = {"eval_loss": 1.0, "base_eval_loss": 3.0}  # beats the base on eval loss


def test_the_gate_refuses_a_version_below_the_minimum_retention_and_says_why() -> None:
    low = {**EVAL, **metrics(65, 60, 48, 1.0)}  # 0.8 of the facts the base states
    d = decide(Policy(), low, None)
    assert not d.promoted
    assert d.reason.startswith("retention 0.80 (48 of 60 facts the base states) is below the minimum 0.9")
    ok = {**EVAL, **metrics(65, 60, 57, 1.0)}  # 0.95
    d = decide(Policy(), ok, None)
    assert d.promoted and "retention 0.95 (57 of 60 facts the base states) (minimum 0.9)" in d.reason
    assert decide(Policy(min_retention=0.75), low, None).promoted  # the batch's own threshold
    assert "retention" not in decide(Policy(min_retention=0.0), low, None).reason  # 0: no check
    # retention passes but the eval metric does not: refused for that
    d = decide(Policy(), {**ok, "eval_loss": 4.0}, None)
    assert not d.promoted and "does not beat base" in d.reason


def test_a_version_without_a_retention_measure_is_not_held_back_and_the_decision_says_so() -> None:
    none_known = {**EVAL, **metrics(65, 0, 0, 1.0)}  # a base that states none of the probes
    d = decide(Policy(), none_known, None)
    assert d.promoted and "the base states none of the 65 probes; not checked" in d.reason
    d = decide(Policy(), EVAL, None)  # measured before retention existed (or on several ZeRO workers)
    assert d.promoted and "no retention was measured; not checked" in d.reason
    as_tags = {k: f"{v:.6g}" for k, v in {**EVAL, **metrics(65, 60, 48, 1.0)}.items()}  # a registry version's
    assert not decide(Policy(), as_tags, None).promoted  # metrics are read back from tags as text
    with pytest.raises(ValueError, match="between 0 and 1"):
        Policy(min_retention=1.5)


def test_a_tenants_probes_join_the_shipped_ones() -> None:
    shipped = shipped_probes()
    assert len(shipped) >= 50 and len({p["topic"] for p in shipped}) >= 8
    mine = job_probes([{"question": "What is the capital of Italy?", "answers": ["Rome"]},
                       {"question": shipped[0]["question"], "answers": ["Edo"]}])
    assert len(mine) == len(shipped) + 1 and mine[-1] == {"question": "What is the capital of Italy?",
                                                          "answers": ["Rome"]}
    assert mine[0]["answers"] == [*shipped[0]["answers"], "Edo"]  # asked once, both answers accepted
    assert describe(metrics(67, 61, 54, 1.0)) == "retention 0.89 (54 of 61 facts the base states)"
    assert describe({}) is None


def _spec(**entry: object) -> dict:
    return {"version": 1, "name": "b", "tenants": [{"tenant": "acme", "persona": "p", "dataset": "d.jsonl", **entry}]}


def test_probes_and_the_retention_threshold_in_the_spec() -> None:
    spec, (job,) = parse_spec({**_spec(probes=[{"question": "What is the capital of Italy?", "answers": ["Rome"]}]),
                               "promotion": {"min_retention": 0.8}})
    assert spec.promotion.policy().min_retention == 0.8 and job.probes[0].answers == ("Rome",)
    assert parse_spec(_spec())[0].promotion.min_retention == 0.9  # the default
    for bad, field, words in (
            ({"probes": [{"question": "Q?", "answers": []}]}, "tenants.0.probes.0.answers", "at least 1"),
            ({"probes": [{"question": "", "answers": ["a"]}]}, "tenants.0.probes.0.question", "at least 1"),
            ({"probes": [{"question": "Q?", "answers": ["  "]}]}, "tenants.0.probes.0.answers", "not blank"),
            ({"probes": [{"question": "Q?", "answers": ["a"], "topic": "x"}]}, "tenants.0.probes.0.topic",
             "unknown key"),
            ({"probes": [{"question": f"Q{i}?", "answers": ["a"]} for i in range(201)]}, "tenants.0.probes",
             "at most 200")):
        with pytest.raises(SpecError) as e:
            parse_spec(_spec(**bad))
        assert any(f == field and words in msg for f, msg in e.value.problems), e.value.problems
    with pytest.raises(SpecError) as e:
        parse_spec({**_spec(), "promotion": {"min_retention": 1.2}})
    assert e.value.problems[0][0] == "promotion.min_retention"


def test_a_tenants_probes_are_part_of_its_job_fingerprint() -> None:
    from adapterfab.jobs.orchestrate import job_fingerprint

    _, (plain,) = parse_spec(_spec())
    _, (probed,) = parse_spec(_spec(probes=[{"question": "What is the capital of Italy?", "answers": ["Rome"]}]))
    assert job_fingerprint("base", plain, "data") != job_fingerprint("base", probed, "data")


@pytest.mark.slow
def test_retention_is_measured_against_the_base_own_answers_in_the_trainer(smollm2_path: str, tmp_path) -> None:  # noqa: ANN001
    """Two jobs of one fused group on the real base: one on the shipped probes, one with a tenant's two
    more: one the base gets wrong ("Berlin" for France's capital: the base says Paris), which gives no
    row and is not counted, and one it states (Tokyo), which counts. An adapter barely trained keeps
    every fact the base states."""
    from transformers import AutoTokenizer

    from adapterfab.jobs.resident import GroupJob, GroupTask, ResidentWorker
    from adapterfab.pipelines.local import encode_file, split_rows
    from adapterfab.spec import TrainConfig

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    rows = encode_file("examples/data/pirate.jsonl", tok, 128)
    tr, ev = split_rows(rows, 0.1, None)
    train = TrainConfig(steps=2, learning_rate=1e-6, batch_size=2).model_dump()
    own = [{"question": "What is the capital of France?", "answers": ["Berlin"]},
           {"question": "Which city is the capital of Japan?", "answers": ["Tokyo"]}]
    method = {"name": "lora", "dropout": 0.0}
    w = ResidentWorker(smollm2_path, method, dtype="float32", torch_threads=2)
    jobs = [GroupJob("shipped", method, train, tr, ev, probes=job_probes()),
            GroupJob("own", method, train, tr, ev, probes=job_probes(own))]
    outcomes = {o.job_id: o for o in w.train_group(GroupTask("g", jobs, tok.pad_token_id,
                                                             probe_cache=str(tmp_path))).outcomes}
    got = {j: o.metrics for j, o in outcomes.items()}
    shipped, mine = got["shipped"], got["own"]
    n = len(shipped_probes())
    assert shipped["retention_probes"] == n and mine["retention_probes"] == n + 2
    assert shipped["retention_known"] >= 0.9 * n  # the probes were chosen as facts this base states
    said = [w._answers.answers[p["question"]] for p in own]
    assert "Paris" in said[0] and "Tokyo" in said[1], said
    assert forced_row(tok, own[0]["question"], own[0]["answers"], said[0]) is None
    assert mine["retention_known"] == shipped["retention_known"] + 1  # Tokyo counts, Berlin does not
    assert shipped["retention"] == 1.0 and mine["retention"] == 1.0  # 2 steps at lr 1e-6: the base itself
    assert shipped["retention_s"] > 0
    # a second group: the base's answers are not asked again, the same rows give the same figures
    again = w.train_group(GroupTask("g2", jobs[:1], tok.pad_token_id)).outcomes[0].metrics
    assert again["retention_known"] == shipped["retention_known"] and again["retention_s"] < shipped["retention_s"]
    # a job on several ZeRO workers is measured on a PeftModel (jobs/evaluate.retention_of, no fused
    # trainer): the same adapter (the first group's "own") gets the same figures there
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapterfab.jobs.evaluate import retention_of
    from adapterfab.jobs.fused import write_exported

    outcome = outcomes["own"]
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32),
                                     str(write_exported(outcome.adapter, tmp_path / "adapter")))
    alone = retention_of(peft, tok, job_probes(own), str(tmp_path), smollm2_path)
    assert {k: alone[k] for k in ("retention_probes", "retention_known", "retention_kept")} == \
        {k: outcome.metrics[k] for k in ("retention_probes", "retention_known", "retention_kept")}
    # nor by another trainer on the same base, dtype and device: the answers are in the cache folder
    (saved,) = tmp_path.glob("answers-*.json")
    assert AnswerCache(str(tmp_path), smollm2_path, "torch.float32", "cpu").answers == w._answers.answers
    assert len(w._answers.answers) == n + 2 and saved.stat().st_size > 0
    assert AnswerCache(str(tmp_path), smollm2_path, "torch.bfloat16", "cpu").answers == {}  # another dtype


def test_trainers_starting_at_once_ask_the_base_once(tiny_model_path: str, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Two trainers on one base (two caches on one folder, as a batch's first groups start) ask the same
    probes at once: one asks the base, the other waits for its file and asks nothing; both get the same
    answers. A lock held past the wait (a stalled trainer) only costs the time: the waiter asks itself."""
    import threading
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterfab import retention, textgen

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    questions = ["What is the capital of France?", "How many legs has a spider?", "Who wrote Hamlet?"]
    asked: list[list[str]] = []
    real = textgen.greedy_in_batches

    def spy(model, tokenizer, prompts, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        asked.append(list(prompts))
        time.sleep(0.5)  # long enough for the other trainer to arrive while this one asks
        return real(model, tokenizer, prompts, *a, **kw)

    monkeypatch.setattr(textgen, "greedy_in_batches", spy)
    caches = [AnswerCache(str(tmp_path), tiny_model_path, "torch.float32", "cpu") for _ in range(2)]
    got: list[dict[str, str]] = [{}, {}]

    def trainer(i: int) -> None:
        got[i] = retention.base_answers(base, tok, questions, caches[i])

    threads = [threading.Thread(target=trainer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join(60)
    assert asked == [questions]  # asked once, by one of them
    assert got[0] == got[1] and set(got[0]) == set(questions)
    assert caches[1].answers == caches[0].answers
    # a holder that never lets go: the waiter gives up after its wait and asks for itself
    other = AnswerCache(str(tmp_path), tiny_model_path, "torch.float32", "cpu")
    late = AnswerCache(str(tmp_path), tiny_model_path, "torch.float32", "cpu")
    with other.claim():
        t0 = time.monotonic()
        with late.claim(wait_s=0.5):
            waited = time.monotonic() - t0
    assert 0.4 < waited < 5


def test_a_4bit_base_and_its_full_precision_file_never_share_cached_answers(tiny_model_path: str, tmp_path) -> None:  # noqa: ANN001
    """The base's answers are cached per base file *and how it is loaded*: QLoRA's 4-bit NF4 base states
    other facts than the fp32 base of the same file, so a batch whose qlora and lora jobs start at once
    must not read one another's answers (which one asked first decided both jobs' retention)."""
    from adapterfab.jobs.train_loop import load_base
    from adapterfab.methods import get_method
    from adapterfab.methods.lora import LoraConfig
    from adapterfab.methods.qlora import QLoraConfig
    from adapterfab.retention import loaded_as

    lora, qlora = LoraConfig(name="lora"), QLoraConfig(name="qlora")
    full, four = load_base(tiny_model_path, "float32", lora), load_base(tiny_model_path, "float32", qlora)
    assert loaded_as(full) == "torch.float32"
    assert loaded_as(four).startswith("torch.float32:4bit:nf4:") and loaded_as(four) != loaded_as(full)
    wrapped = get_method("qlora").apply(four, qlora, None)  # the same key through PEFT's wrapper
    assert loaded_as(wrapped) == loaded_as(load_base(tiny_model_path, "float32", qlora))
    paths = [AnswerCache(str(tmp_path), tiny_model_path, loaded_as(m), "cpu").path for m in (full, wrapped)]
    assert paths[0] != paths[1]
    from adapterfab.jobs.resident import ResidentWorker  # the fused trainers of a lora and a qlora job

    trainers = [ResidentWorker(tiny_model_path, {"name": name}, dtype="float32", torch_threads=1)
                for name in ("lora", "qlora")]
    assert [w._answer_cache(str(tmp_path)).path for w in trainers] == paths


def test_answers_are_cached_per_weights_and_prompt_format(tiny_model_path: str, tmp_path) -> None:  # noqa: ANN001
    """The answers' file is shared by every home on the machine (``answers_folder``: ADAPTERFAB_CACHE),
    so its key holds all that shapes them: the weights, and the tokenizer and chat template that make the
    prompt. The same weights under another chat template are another file; a copy of the same folder
    (another home's converted base) is the same file."""
    import json
    import shutil

    from adapterfab.retention import answers_folder
    from adapterfab.settings import Settings

    same, other = tmp_path / "same", tmp_path / "other"
    shutil.copytree(tiny_model_path, same)
    shutil.copytree(tiny_model_path, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    (other / "chat_template.jinja").unlink(missing_ok=True)
    folder = answers_folder(Settings(home=tmp_path / "home", cache=tmp_path / "cache", state_url="sqlite://",
                                     artifacts=str(tmp_path / "a")))
    assert folder == tmp_path / "cache" / "retention"
    paths = [AnswerCache(str(folder), str(p), "torch.float32", "cpu").path for p in (tiny_model_path, same, other)]
    assert paths[0] == paths[1] and paths[2] != paths[0]
