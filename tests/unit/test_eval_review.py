"""What a reviewer found wrong in post-training evaluation (2026-12): a retention measurement that failed
left no retention figure, and the gate promoted the version as "not checked"; a base whose tokenizer has
no pad token (Llama's) could not be asked for its answers at all (retention never measured, replay groups
failed); the base-eval cache could evict, while a group was finishing, the entry one of its jobs had
matched (the whole group failed); retention prompts were tokenized unlike served ones; the stand-alone
retention asked the base in train mode (dropout made its answers random)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from adapterfab.jobs.fused import FusedJob, FusedTrainer
from adapterfab.methods import get_method
from adapterfab.pipelines.local import encode_file, epoch_batches
from adapterfab.promotion import Policy, decide
from adapterfab.spec import TrainConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok(tiny_model_path: str):  # noqa: ANN201
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def rows(tok) -> list:  # noqa: ANN001
    return encode_file(REPO / "examples/data/pirate.jsonl", tok, 64)


def _base(path: str):  # noqa: ANN202
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _job(name: str, rows: list, ev: list, pad: int, probe_rows=None) -> FusedJob:  # noqa: ANN001
    cfg = get_method("lora").config_cls(r=4, alpha=8, dropout=0.0)
    train = TrainConfig(dtype="float32", steps=2, batch_size=2, learning_rate=1e-3, seed=1)
    return FusedJob(name, cfg, train, epoch_batches(rows, 2, 1, pad),
                    lambda: list(epoch_batches(ev, 2, 0, pad, shuffle=False)(0)), probe_rows=probe_rows)


def _trainer(path: str) -> FusedTrainer:
    cfg = get_method("lora").config_cls(r=4, alpha=8, dropout=0.0)
    return FusedTrainer(_base(path), "lora", cfg.resolved_targets(), cfg.r)


def _oom() -> list:
    raise RuntimeError("CUDA out of memory (simulated)")


@pytest.mark.parametrize("where", ["probe_rows", "forced_many"])
def test_a_retention_measurement_that_fails_refuses_promotion(tiny_model_path: str, tok, rows: list,  # noqa: ANN001
                                                              where: str) -> None:
    trainer = _trainer(tiny_model_path)
    if where == "probe_rows":
        job = _job("j", rows[:-5], rows[-5:], tok.pad_token_id, probe_rows=_oom)
    else:
        job = _job("j", rows[:-5], rows[-5:], tok.pad_token_id,
                   probe_rows=lambda: [{"ids": list(range(10, 40)), "labels_from": 25}])
        trainer.forced_many = lambda *a, **k: _oom()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        (r,) = trainer.train([job])
    assert r.error is None and r.metrics["eval_loss"] > 0  # the job keeps its adapter and figures
    d = decide(Policy(min_retention=0.9), r.metrics, None)
    assert not d.promoted and "retention is nan" in d.reason, d.reason


def test_a_base_eval_figure_a_group_matched_survives_the_caches_eviction(tiny_model_path: str, tok,  # noqa: ANN001
                                                                         rows: list) -> None:
    trainer = _trainer(tiny_model_path)
    ev_a, ev_b, pad = rows[-5:], rows[-10:-5], tok.pad_token_id
    (first,) = trainer.train([_job("a", rows[:-10], ev_a, pad)])  # caches the base's figure on ev_a: the oldest
    for i in range(1023):  # 1023 other eval sets seen since (a warm trainer serving many tenants)
        trainer._base_evals[f"other-{i}"] = {"eval_loss": 1.0, "eval_token_accuracy": 0.0}
    a2, b = trainer.train([_job("a2", rows[:-10], ev_a, pad), _job("b", rows[:-10], ev_b, pad)])  # b evicts ev_a
    assert a2.error is None and b.error is None
    assert a2.metrics["base_eval_loss"] == first.metrics["base_eval_loss"]
    assert len(trainer._base_evals) == 1024


def test_answers_need_no_pad_token_and_prompts_are_tokenized_as_served(tiny_model_path: str, tok) -> None:  # noqa: ANN001
    """Llama's tokenizer has no pad token: ``tokenizer(texts, padding=True)`` raised, even for one prompt."""
    from transformers import AutoTokenizer

    from adapterfab.chat import encode_prompt
    from adapterfab.retention import prompt_ids
    from adapterfab.textgen import greedy_answer, greedy_answers

    model = _base(tiny_model_path).eval()
    nopad = AutoTokenizer.from_pretrained(tiny_model_path)
    nopad.pad_token = None
    prompts = ["What is the capital of Egypt?", "Name a colour."]
    both = greedy_answers(model, nopad, prompts, max_new_tokens=6)
    assert both == greedy_answers(model, tok, prompts, max_new_tokens=6)
    assert both[1] == greedy_answer(model, nopad, prompts[1], max_new_tokens=6)  # padding changes no answer
    # a template that puts a space before the content (Llama-2 / Mistral): served prompts tokenize the content
    # apart from the template; retention's prompts were the rendered string tokenized as one
    spaced = AutoTokenizer.from_pretrained(tiny_model_path)
    spaced.chat_template = ("{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
                            "{% if add_generation_prompt %} {% endif %}")
    q = "What is the capital of Egypt?"
    assert prompt_ids(spaced, q) == encode_prompt([{"role": "user", "content": q}], spaced)


def test_stand_alone_retention_asks_the_base_in_eval_mode(tiny_model_path: str, tok) -> None:  # noqa: ANN001
    """``retention_of`` runs on the model ``train_adapter`` returns, in train mode: with dropout in the
    base, the base's answers (cached machine-wide) were random. Now eval mode, and the mode is restored."""
    from peft import LoraConfig, get_peft_model

    from adapterfab.jobs.evaluate import retention_of

    model = get_peft_model(_base(tiny_model_path), LoraConfig(r=4, target_modules=["q_proj"])).train()
    seen = []
    model.base_model.model.model.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    probes = [{"question": "What is the capital of Egypt?", "answers": ["Cairo"]}]
    got = retention_of(model, tok, probes, None, tiny_model_path)
    assert seen and not any(seen) and model.training
    assert got["retention_probes"] == 1.0
