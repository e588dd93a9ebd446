"""Replay (adapterfab/replay.py): the base's own answers distilled back after a persona's openings. The
fused trainer's replay term trains each job exactly as ``train_adapter`` does alone; draws are a pure
function of seed and step (a resumed job draws the same); openings and rows are cut as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapterfab import replay
from adapterfab.jobs.fused import FusedTrainer
from adapterfab.methods import get_method
from adapterfab.spec import TrainConfig
from tests.unit.test_fused import TRAIN, _base, _job, _peft_init, data  # noqa: F401 - the fixture

ANSWER = "The sky looks blue because air scatters blue light more than red light."


@pytest.fixture(scope="module")
def tok(tiny_model_path: str):  # noqa: ANN201
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


def _set(tok, rows, weight: float, per_step: int, seed: int) -> replay.ReplaySet:  # noqa: ANN001
    answers = {p: ANSWER if i % 2 else "Water boils at 100 degrees Celsius at sea level." for i, p in
               enumerate(replay.prompts()[:4])}
    train = TrainConfig(replay_weight=weight, replay_per_step=per_step, seed=seed)
    return replay.make_set(tok, answers, rows, train)


def test_openings_rows_and_draws(tok, data: dict) -> None:  # noqa: ANN001, F811
    rows = data["rows"]["pirate"][0]
    openings = replay.persona_openings(tok, rows)
    assert openings and all(tok.decode(list(o)).strip()[-1] in ",.!?:" for o in openings)
    assert len(openings) == len(set(openings))
    assert replay.persona_openings(tok, [{"input_ids": [1, 2], "labels": [-100, -100]}]) == []
    s = _set(tok, rows, 3.0, 2, seed=7)
    assert len(s.rows) == 4 and s.weight == 3.0 and s.per_step == 2
    r = s.rows[0]
    assert tok.decode(list(r.head)).rstrip().endswith("assistant")  # the chat template up to the answer
    assert tok.decode(list(r.answer)).strip() == tok.decode(list(r.spaced)).strip()
    assert r.answer[1:] == r.spaced[1:] and r.answer[0] != r.spaced[0]
    assert s.draw(3) == s.draw(3) and len(s.draw(3)) == 2  # a resumed job draws what it would have
    assert [s.draw(k) for k in range(6)] != [s.draw(3)] * 6
    assert _set(tok, rows, 3.0, 2, seed=8).draw(3) != s.draw(3) or _set(tok, rows, 3.0, 2, seed=9).draw(3) != s.draw(3)
    # an answer whose tokens change beyond its first word with a leading space is left out
    assert replay.replay_rows(tok, {replay.prompts()[0]: "x"}) == []


def test_fused_replay_trains_each_job_as_it_trains_alone(tiny_model_path: str, data: dict, tok,  # noqa: ANN001, F811
                                                          tmp_path: Path) -> None:
    """Two jobs with replay (other weights, rows per step, seeds) and one without, fused, end where each
    ends trained alone by ``train_adapter`` with the same replay; and replay changed what they learnt."""
    from safetensors.torch import load_file

    from adapterfab.jobs.train_loop import save_adapter

    cfg = get_method("lora").config_cls(r=4, alpha=8, dropout=0.0)
    sets = {"pirate": _set(tok, data["rows"]["pirate"][0], 3.0, 1, 1),
            "butler": _set(tok, data["rows"]["butler"][0], 1.5, 2, 2)}
    inits = {n: _peft_init(tiny_model_path, cfg, TRAIN[n]["seed"]) for n in TRAIN}

    def fused(with_replay: bool) -> tuple[FusedTrainer, dict]:
        jobs = [_job(n, cfg, data, init=inits[n], replay=sets.get(n) if with_replay else None) for n in TRAIN]
        trainer = FusedTrainer(_base(tiny_model_path), "lora", cfg.resolved_targets(), cfg.r)
        return trainer, {r.job_id: r for r in trainer.train(jobs)}

    trainer, results = fused(True)
    plain, plain_results = fused(False)
    for name in TRAIN:
        job = _job(name, cfg, data)
        alone = train_adapter_with(tiny_model_path, job, sets.get(name))
        r = results[job.job_id]
        assert r.error is None
        assert r.losses == pytest.approx(alone.losses, rel=1e-4, abs=1e-5)  # the persona's loss is what it reports
        a = load_file(str(save_adapter(alone, job.method, tmp_path / f"alone-{name}") / "adapter_model.safetensors"))
        f = load_file(str(trainer.save(job, tmp_path / f"fused-{name}") / "adapter_model.safetensors"))
        assert sorted(a) == sorted(f)
        for k in a:
            torch.testing.assert_close(f[k], a[k], rtol=1e-3, atol=1e-5)
        moved = max(float((x - y).abs().max()) for (x0, y0), (x1, y1) in
                    zip(trainer.adapter_tensors(job.job_id).values(), plain.adapter_tensors(job.job_id).values())
                    for x, y in ((x0, x1), (y0, y1)))
        if name in sets:
            assert r.metrics["replay_loss"] == pytest.approx(alone.metrics["replay_loss"], rel=1e-3)
            assert r.metrics["replay_loss"] > 0
            assert moved > 1e-4  # replay took part in the gradient
            assert r.metrics["train_flops"] > plain_results[job.job_id].metrics["train_flops"]
        else:
            assert moved < 1e-6  # a job without replay is not touched by its group's replay
            assert "replay_loss" not in r.metrics and "replay_loss" not in alone.metrics


def train_adapter_with(path: str, job, rs):  # noqa: ANN001, ANN201
    from adapterfab.jobs.train_loop import train_adapter

    return train_adapter(path, job.method, job.train, job.epoch_batches, job.eval_batches,
                         replay=(lambda model: rs) if rs is not None else None)


def test_replay_prompts_are_not_what_a_job_is_measured_on() -> None:
    """Replay must not teach the probes' answers (retention would measure the replay, not what the base
    knew) nor the quality benchmark's held-out persona prompts."""
    import json

    from adapterfab.retention import shipped_probes
    from tests.conftest import REPO

    asked = {p["question"].lower() for p in shipped_probes()}
    personas = json.loads((REPO / "examples/quality_personas.json").read_text())["personas"]
    asked |= {q.lower() for p in personas for q in p["prompts"]}
    assert len(replay.prompts()) >= 30 and not asked & {p.lower() for p in replay.prompts()}
