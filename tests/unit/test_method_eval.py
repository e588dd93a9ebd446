"""jobs/evaluate.train_and_evaluate, the in-process path of bench/methods.py, on the tiny random Llama:
each method trains, saves and is measured (adherence and retention counted over the shipped held-out
prompts and fact probes). Whether the real defaults learn a persona and keep what the base knew is
asserted on the trained, served adapters in tests/e2e/test_factory.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterfab.jobs.evaluate import EXAMPLES, train_and_evaluate


@pytest.mark.parametrize("method", ["lora", "qlora", "lora_xs"])
def test_train_and_evaluate_measures_a_method(method: str, tiny_model_path: str) -> None:
    r = train_and_evaluate({"name": method}, "robot", steps=2, threads=1, base_model=tiny_model_path,
                           train_overrides={"max_seq_len": 64, "batch_size": 2})
    held = json.loads((Path(EXAMPLES) / "heldout_prompts.json").read_text())["prompts"]
    facts = json.loads((Path(EXAMPLES) / "fact_probes.json").read_text())["probes"]
    assert r["train"]["steps"] == 2 and r["rows"] > 0 and r["trainable_params"] > 0 and r["adapter_bytes"] > 0
    assert len(r["answers"]) == len(held) and len(r["fact_answers"]) == len(facts)
    assert r["persona"] == f"{round(r['persona_rate'] * len(held))}/{len(held)}"
    assert 0 <= r["facts_rate"] <= 1 and r["train_s"] > 0
    assert ("basis_svd_s" in r) == (method == "lora_xs")  # only LoRA-XS computes a shared basis


def test_a_fact_is_stated_only_as_a_whole_word() -> None:
    from adapterfab.jobs.evaluate import states_fact

    assert states_fact("The capital of Australia is Canberra.", ["Canberra"])
    assert states_fact("Fish breathe with their gills.", ["gill"])  # a longer word may start with it
    assert not states_fact("A dog has 40 legs.", ["4", "four"])  # short answers end at a word too
    assert not states_fact("The United Nations says so.", ["Na"]) and states_fact("Its symbol is Na.", ["Na"])
    assert not states_fact("The capital of Australia is Sydney.", ["Canberra"])


def test_adherence_rules_of_the_quality_personas() -> None:
    from adapterfab.jobs.evaluate import adheres, load_quality

    personas = {p["name"]: p for p in load_quality()[0]}
    assert {p["style"] for p in personas.values()} == {"fixed phrase", "speaking style", "domain of knowledge"}
    pirate, bard, orbit = personas["pirate"]["adherence"], personas["bard"]["adherence"], personas["orbit"]["adherence"]
    assert adheres("Arr, matey! Snow is white. Arr!", pirate, 0) and not adheres("Snow is white.", pirate, 0)
    assert adheres("Verily, snow is white.", bard, 0) and adheres("'Tis white, as thou knowest.", bard, 0)
    assert not adheres("The theme is mine-craft.", {"kind": "lexicon", "words": ["thee"]}, 0)
    assert not adheres("Snow is white, my friend.", bard, 0)
    warranty = personas["orbit"]["prompts"].index("For how many years is an Orbit grinder covered?")
    assert adheres("It is covered by a three-year warranty.", orbit, warranty)
    assert not adheres("It is covered for one year.", orbit, warranty)


def test_retention_counts_only_the_facts_the_base_itself_states(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention is measured against the base's own answers: a probe the base gets wrong is not counted
    against the adapter, whatever the adapter answers. The model is replaced by canned answers (the
    accounting is under test, not generation)."""
    from adapterfab import textgen
    from adapterfab.jobs import evaluate

    probes = [{"question": "capital of Japan?", "answers": ["Tokyo"]},
              {"question": "capital of Australia?", "answers": ["Canberra"]},
              {"question": "legs of an insect?", "answers": ["six", "6"]}]
    persona = {"prompts": ["snow?"], "adherence": {"kind": "marker", "marker": "Arr"}}
    canned = {"snow?": "Arr, snow is white.", "capital of Japan?": "Arr, Tokyo it be.",
              "capital of Australia?": "Arr, Sydney.", "legs of an insect?": "Arr, eight."}
    monkeypatch.setattr(textgen, "greedy_answers", lambda model, tok, prompts, *a, **k: [canned[p] for p in prompts])
    base_known = [True, True, False]  # the base says Tokyo and Canberra, and gets the insect wrong
    model = type("Model", (), {"eval": lambda self: self})()
    r = evaluate.quality(model, None, persona, probes, base_known)
    assert (r.adherent, r.prompts, r.kept, r.known) == (1, 1, 1, 2)
    assert r.lost == ["capital of Australia?"] and r.to_dict()["retention"] == 0.5


def test_the_studys_kl_term_is_zero_while_the_adapter_is_the_base(tiny_model_path: str) -> None:
    """bench/methods.py --retain-kl: with a fresh LoRA (B = 0, so the adapter is the base) the loss is the
    plain cross-entropy; once trained it is larger by the KL term."""
    import torch

    from adapterfab.jobs.train_loop import load_base, retain_loss
    from adapterfab.methods import get_method

    impl = get_method("lora")
    cfg = impl.config_cls(name="lora", r=4, alpha=8)
    model = impl.apply(load_base(tiny_model_path, "float32", cfg, None), cfg, None)
    torch.manual_seed(0)
    ids = torch.randint(5, 500, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt: KL only, no cross-entropy
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    plain = model(**b).loss
    assert float(retain_loss(model, b, 5.0, 0.1)) == pytest.approx(float(plain), rel=1e-5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert float(retain_loss(model, b, 5.0, 0.1)) > float(model(**b).loss) + 1e-4


@pytest.mark.timeout(300)
def test_methods_bench_smoke() -> None:
    """bench/methods.py --smoke: the quality benchmark's every path (the base's answers, one child process
    per method and persona, the replay study option) on the tiny random base, so it cannot rot. Writes
    no result file."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    before = set((repo / "bench" / "results").glob("methods-*.json"))
    r = subprocess.run([sys.executable, str(repo / "bench/methods.py"), "--smoke", "--methods", "lora_xs",
                        "--personas", "pirate,orbit", "--replay-kl", "1"], capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "smoke: 2 runs" in r.stdout
    assert set((repo / "bench" / "results").glob("methods-*.json")) == before


def test_teacher_forced_retention_on_the_real_base(smollm2_path: str) -> None:
    """The cheap retention signal (no generation): after the base's own answer up to the fact, the base
    chooses the fact greedily on (nearly) every probe it states; a base whose last layers are broken
    does not."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterfab.jobs.evaluate import forced_retention, forced_rows, load_quality

    torch.set_num_threads(2)
    probes = load_quality()[1][:24]
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    rows = forced_rows(tok, probes, [p["base_answer"] for p in probes])
    assert sum(r is not None for r in rows) >= 20
    tokens = {tuple(r["ids"][r["labels_from"]:]) for r in rows if r is not None}
    assert len(tokens) >= 15  # the facts' own tokens, not one shared token
    kept = forced_retention(model, rows, tok.pad_token_id)
    assert sum(bool(k) for k in kept) >= 0.9 * sum(k is not None for k in kept)
    with torch.no_grad():
        for layer in model.model.layers[-8:]:
            layer.mlp.down_proj.weight.mul_(-3.0)
    broken = forced_retention(model, rows, tok.pad_token_id)
    assert sum(bool(k) for k in broken) <= 0.5 * sum(bool(k) for k in kept)
