"""Fused multi-adapter training: each adapter trained in a fused batch with other tenants equals the
adapter trained alone by the ordinary single-job loop (same initial weights, same data order), for
LoRA and for LoRA-XS; the fused LoRA saves as a PEFT adapter that PeftModel loads; jobs with their own
step counts, learning rates and early stop leave the batch on their own."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from adapterfab.jobs import fused_batches
from adapterfab.jobs.fused import FusedJob, FusedTrainer
from adapterfab.jobs.fused_batches import stack
from adapterfab.jobs.train_loop import save_adapter, seed_everything, train_adapter
from adapterfab.methods import get_method
from adapterfab.pipelines.local import encode_file, epoch_batches
from adapterfab.spec import TrainConfig

REPO = Path(__file__).resolve().parents[2]
DATA = {"pirate": REPO / "examples/data/pirate.jsonl", "butler": REPO / "examples/data/butler.jsonl",
        "robot": REPO / "examples/data/robot.jsonl"}
# different steps, batch sizes, learning rates, schedules and seeds per job
TRAIN = {"pirate": dict(steps=6, batch_size=2, learning_rate=3e-3, seed=1),
         "butler": dict(steps=4, batch_size=3, learning_rate=1e-3, seed=2, lr_schedule="cosine"),
         "robot": dict(steps=5, batch_size=2, learning_rate=2e-3, seed=3, warmup_steps=2)}


def _base(path: str):  # noqa: ANN202
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def data(tiny_model_path: str) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    out = {}
    for name, path in DATA.items():
        rows = encode_file(path, tok, 64)
        out[name] = (rows[:-4], rows[-4:])
    return {"rows": out, "pad": tok.pad_token_id}


def _job(name: str, method, data: dict, init=None, **extra) -> FusedJob:  # noqa: ANN001
    train = TrainConfig(dtype="float32", **TRAIN[name])
    rows, ev = data["rows"][name]
    return FusedJob(f"j-{name}", method, train, epoch_batches(rows, train.batch_size, train.seed, data["pad"]),
                    lambda: epoch_batches(ev, 4, 0, data["pad"])(0), init, **extra)


def _alone(job: FusedJob, path: str, basis=None):  # noqa: ANN001, ANN202
    return train_adapter(path, job.method, job.train, job.epoch_batches, job.eval_batches, basis=basis)


def _peft_init(path: str, method, seed: int) -> dict:  # noqa: ANN001
    """The initial LoRA weights train_adapter gets with this seed (it seeds, then PEFT initializes)."""
    seed_everything(seed)
    model = get_method("lora").apply(_base(path), method, None)
    out: dict = {}
    for n, p in model.named_parameters():
        if "lora_A" in n:
            out.setdefault(n.split(".lora_A")[0].removeprefix("base_model.model."), [None, None])[0] = p.detach()
        elif "lora_B" in n:
            out.setdefault(n.split(".lora_B")[0].removeprefix("base_model.model."), [None, None])[1] = p.detach()
    return {k: tuple(v) for k, v in out.items()}


def _assert_same_adapter(got: FusedTrainer, want: FusedTrainer, job_id: str, **tol: float) -> None:
    """``job_id``'s adapter tensors in ``got`` equal those in ``want``, layer by layer."""
    theirs = want.adapter_tensors(job_id)
    for name, tensors in got.adapter_tensors(job_id).items():
        assert len(tensors) == len(theirs[name])
        for g, w in zip(tensors, theirs[name]):
            torch.testing.assert_close(g, w, **tol)


def test_fused_lora_equals_lora_trained_alone(tiny_model_path: str, data: dict, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    cfg = get_method("lora").config_cls(r=4, alpha=8, dropout=0.0)
    jobs = [_job(n, cfg, data, init=_peft_init(tiny_model_path, cfg, TRAIN[n]["seed"])) for n in TRAIN]
    trainer = FusedTrainer(_base(tiny_model_path), "lora", cfg.resolved_targets(), cfg.r)
    results = {r.job_id: r for r in trainer.train(jobs)}
    for job in jobs:
        alone = _alone(job, tiny_model_path)
        fused = results[job.job_id]
        assert fused.error is None and fused.metrics["steps"] == job.train.steps
        assert fused.losses == pytest.approx(alone.losses, rel=1e-4, abs=1e-5)
        assert fused.metrics["eval_loss"] == pytest.approx(alone.metrics["eval_loss"], rel=1e-4)
        assert fused.metrics["base_eval_loss"] == pytest.approx(alone.metrics["base_eval_loss"], rel=1e-5)
        a_dir = save_adapter(alone, job.method, tmp_path / f"alone-{job.job_id}")
        f_dir = trainer.save(job, tmp_path / f"fused-{job.job_id}")
        a, f = load_file(str(a_dir / "adapter_model.safetensors")), load_file(str(f_dir / "adapter_model.safetensors"))
        assert sorted(a) == sorted(f) and len(a) == 4 * 2  # q,v x A,B x 2 layers
        for k in a:
            assert torch.allclose(a[k], f[k], rtol=1e-3, atol=1e-5), k
        assert any(f[k].abs().sum() > 0 for k in f if "lora_B" in k)  # it did train
        # the fused adapter is a plain PEFT LoRA: loaded alone, it answers like the alone-trained one
        batch = next(iter(job.eval_batches()))
        with torch.no_grad():
            la = (
                PeftModel.from_pretrained(_base(tiny_model_path), str(a_dir))
                .eval()(input_ids=batch["input_ids"])
                .logits
            )
            lf = (
                PeftModel.from_pretrained(_base(tiny_model_path), str(f_dir))
                .eval()(input_ids=batch["input_ids"])
                .logits
            )
        assert torch.allclose(la, lf, atol=1e-4)


def test_fused_lora_xs_equals_lora_xs_trained_alone(tiny_model_path: str, data: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    impl = get_method("lora_xs")
    cfg = impl.config_cls(r=4, alpha=4)
    basis = impl.compute_basis(_base(tiny_model_path), cfg, "f" * 64)
    jobs = [_job(n, cfg, data) for n in TRAIN]
    trainer = FusedTrainer(_base(tiny_model_path), "lora_xs", cfg.resolved_targets(), cfg.r, basis=basis)
    results = {r.job_id: r for r in trainer.train(jobs)}
    for job in jobs:
        alone = _alone(job, tiny_model_path, basis)
        assert results[job.job_id].losses == pytest.approx(alone.losses, rel=1e-4, abs=1e-5)
        a_dir = save_adapter(alone, job.method, tmp_path / f"a-{job.job_id}")
        f_dir = trainer.save(job, tmp_path / f"f-{job.job_id}")
        a, f = load_file(str(a_dir / "adapter_model.safetensors")), load_file(str(f_dir / "adapter_model.safetensors"))
        assert sorted(a) == sorted(f)
        for k in a:
            assert torch.allclose(a[k], f[k], rtol=1e-3, atol=1e-6), k
        assert (a_dir / "adapter_config.json").read_text() == (f_dir / "adapter_config.json").read_text()
        impl.load(_base(tiny_model_path), f_dir, basis)  # loads through the method's own checks


def test_resident_base_trains_group_after_group_and_early_stop(tiny_model_path: str, data: dict) -> None:
    cfg = get_method("lora").config_cls(r=4, alpha=8, dropout=0.0)
    trainer = FusedTrainer(_base(tiny_model_path), "lora", cfg.resolved_targets(), cfg.r)
    first = trainer.train([_job("pirate", cfg, data), _job("butler", cfg, data, early_stop_loss=1e9)])
    by = {r.job_id: r for r in first}
    assert by["j-butler"].stopped_early and by["j-butler"].metrics["steps"] == 1
    assert by["j-pirate"].metrics["steps"] == 6 and not by["j-pirate"].stopped_early
    for r in first:
        trainer.remove(r.job_id)
    (again,) = trainer.train([_job("robot", cfg, data)])  # same resident base, no reload
    assert again.error is None and trainer.jobs_trained == 3
    # the later group reused a freed slot: the buffers (the null row and two slots) did not grow
    assert trainer.slot_keys() == {"j-robot"} and trainer.slots.capacity == 3 and trainer._slot_of["j-robot"] == 1


def test_incompatible_jobs_are_refused(tiny_model_path: str, data: dict) -> None:
    from adapterfab.errors import AdapterfabError

    cfg = get_method("lora").config_cls(r=4, alpha=8, dropout=0.0)
    trainer = FusedTrainer(_base(tiny_model_path), "lora", cfg.resolved_targets(), cfg.r)
    assert "rank" in trainer.compatible(cfg.model_copy(update={"r": 8}))
    assert trainer.compatible(cfg.model_copy(update={"dropout": 0.1})) is None  # dropout trains fused
    assert "family" in trainer.compatible(get_method("lora_xs").config_cls(r=4))
    with pytest.raises(AdapterfabError, match="cannot join"):
        trainer.train([_job("pirate", cfg.model_copy(update={"r": 8}), data)])
    with pytest.raises(AdapterfabError, match="one LoRA dropout"):  # one rate per group
        trainer.train([_job("pirate", cfg, data), _job("robot", cfg.model_copy(update={"dropout": 0.1}), data)])


def test_stack_pads_and_routes_rows() -> None:
    a = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3, dtype=torch.long),
         "labels": torch.ones(2, 3, dtype=torch.long)}
    b = {k: torch.full((1, 5), 2, dtype=torch.long) for k in a}
    batch, segs = stack([("x", a), ("y", b)])
    assert segs == [("x", 0, 2), ("y", 2, 3)] and batch["input_ids"].shape == (3, 5)
    assert batch["labels"][0, 3:].tolist() == [-100, -100] and batch["attention_mask"][1, 3:].tolist() == [0, 0]


def test_planner_groups_only_compatible_jobs() -> None:
    from adapterfab.jobs.plan import fusion_groups
    from adapterfab.spec import parse_spec

    tenants = [{"tenant": f"t{i}", "persona": "p", "dataset": "/x.jsonl"} for i in range(10)]
    tenants[3]["method"] = {"r": 16}  # another rank
    tenants[4]["method"] = {"name": "lora_xs"}
    tenants[5]["method"] = {"name": "lora_xs"}
    tenants[6]["method"] = {"name": "qlora", "dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "r": 8}
    tenants[7]["train"] = {"dtype": "bfloat16"}  # the base loaded another way
    _, jobs = parse_spec({"version": 1, "name": "g", "defaults": {"method": {"name": "lora", "dropout": 0.0},
                                                                  "train": {"dtype": "float32"}},
                          "tenants": tenants})
    groups = fusion_groups(jobs, k_max=4)
    assert groups == [[0, 1, 2, 8], [3], [4, 5], [6], [7], [9]]
    _, dropout = parse_spec({"version": 1, "name": "g", "tenants": tenants[:3]})  # lora's default dropout
    assert fusion_groups(dropout) == [[0, 1, 2]]  # the same rate fuses
    mixed = [
        dropout[0],
        dropout[1].model_copy(update={"method": dropout[1].method.model_copy(update={"dropout": 0.1})}),
    ]
    assert fusion_groups(mixed) == [[0], [1]]  # one rate per fused step


def test_groups_are_recut_to_keep_every_trainer_busy() -> None:
    from adapterfab.jobs.plan import balanced_groups, fusion_groups
    from adapterfab.spec import parse_spec

    def spec(n: int, extra: dict | None = None) -> list:
        tenants = [{"tenant": f"t{i}", "persona": "p", "dataset": "/x.jsonl"} for i in range(n)]
        if extra:
            tenants.append({"tenant": "other", "persona": "p", "dataset": "/x.jsonl", **extra})
        return parse_spec({"version": 1, "name": "g", "tenants": tenants})[1]

    twelve = spec(12)
    assert [len(g) for g in fusion_groups(twelve)] == [8, 4]
    assert [len(g) for g in balanced_groups(twelve, fusion_groups(twelve), slots=2)] == [6, 6]
    assert [len(g) for g in balanced_groups(twelve, fusion_groups(twelve), slots=1)] == [6, 6]  # ceil(12/8) groups
    thirty_two = spec(32)
    assert [len(g) for g in balanced_groups(thirty_two, fusion_groups(thirty_two), slots=2)] == [8, 8, 8, 8]
    three = spec(3, {"method": {"name": "lora_xs"}})
    got = balanced_groups(three, fusion_groups(three), slots=2)
    assert got == [[0, 1], [2], [3]]  # the lone LoRA-XS job stays alone
    assert sorted(i for g in balanced_groups(spec(64), fusion_groups(spec(64)), 3) for i in g) == list(range(64))


def test_each_slot_starts_with_a_small_group_when_it_has_more_to_train() -> None:
    from adapterfab.jobs.plan import starter_groups

    eight = [list(range(i, i + 8)) for i in range(0, 32, 8)]  # 32 jobs in 4 groups of 8 on 2 slots
    got = starter_groups(eight, slots=2)
    assert [len(g) for g in got] == [2, 2, 6, 6, 8, 8]
    assert got[:2] == [[0, 1], [8, 9]] and got[2] == list(range(2, 8))  # a group's rest right behind it
    assert sorted(i for g in got for i in g) == list(range(32))  # every job once
    assert starter_groups(eight[:2], slots=2) == eight[:2]  # one group per slot: left as it is
    assert starter_groups([[0], [1, 2, 3], [4, 5]], slots=1) == [[0], [1, 2, 3], [4, 5]]  # a single starts
    assert starter_groups([[0, 1, 2], [3], [4, 5]], slots=2) == [[0, 1], [3], [2], [4, 5]]


def test_starter_groups_can_be_switched_off_for_a_deployment() -> None:
    """``ADAPTERFAB_STARTER_GROUP_JOBS=0`` (read when the planner loads, as the orchestrator does): every
    slot starts on its full group (on a CPU whose K=8 step is short, a few seconds less per batch)."""
    import subprocess
    import sys

    code = ("from adapterfab.jobs.plan import starter_groups; "
            "print(starter_groups([list(range(i, i + 8)) for i in range(0, 32, 8)], slots=2))")
    env = {**__import__("os").environ, "ADAPTERFAB_STARTER_GROUP_JOBS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str([list(range(i, i + 8)) for i in range(0, 32, 8)])


def test_second_window_waits_for_the_first_step_on_cpu_trainers() -> None:
    """Factory._await_first_steps: on CPU trainers started ahead, the next window's preparation waits
    until a first step is reported (or a group ends); not when nothing of the first window trains,
    nor on GPU trainers."""
    import threading
    import time
    from concurrent.futures import Future
    from types import SimpleNamespace

    from adapterfab.jobs import factory as fm

    def made(gpus: float, queued: set) -> fm.Factory:
        f = fm.Factory.__new__(fm.Factory)  # only what the wait reads
        f.early, f.groups, f.slots, f._queued = [("k", Future())], [[0], [1]], 1, queued
        f.planned = [SimpleNamespace(gpus=gpus), SimpleNamespace(gpus=gpus)]
        f.stepped = threading.Event()
        return f

    f = made(0.0, {"b.t.p"})
    threading.Timer(0.5, f.stepped.set).start()  # the progress poll sees a first step
    t0 = time.monotonic()
    f._await_first_steps()
    assert 0.4 < time.monotonic() - t0 < 5
    for f in (made(0.0, set()), made(0.5, {"b.t.p"})):  # nothing to train / GPU trainers: no wait
        t0 = time.monotonic()
        f._await_first_steps()
        assert time.monotonic() - t0 < 0.2 and not f.stepped.is_set()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_group_resumes_from_its_checkpoint(tiny_model_path: str, data: dict, dropout: float) -> None:
    """A fused group checkpoints every 2 steps; a fresh trainer over a fresh base, resumed from the
    step-4 checkpoint (after one job already finished), ends with the same weights and losses as the
    uninterrupted run, with LoRA dropout too (its masks were drawn from whatever the process had drawn
    before: a resumed group drew others); a job whose loss turned non-finite stays failed after the resume."""
    cfg = get_method("lora").config_cls(r=4, alpha=8, dropout=dropout)

    def jobs() -> list[FusedJob]:
        return [_job(n, cfg, data, init=_peft_init(tiny_model_path, cfg, TRAIN[n]["seed"])) for n in TRAIN]

    saved: list[dict] = []
    full = FusedTrainer(_base(tiny_model_path), "lora", cfg.resolved_targets(), cfg.r)
    results = {r.job_id: r for r in full.train(jobs(), on_checkpoint=saved.append, checkpoint_every=2)}
    assert [s["iteration"] for s in saved] == [2, 4]  # none after the last step
    at4 = saved[-1]
    assert at4["jobs"]["j-butler"]["step"] == 4  # butler (4 steps) had finished at the checkpoint
    import copy

    at4 = copy.deepcopy(at4)
    torch.rand(1000)  # what a resident trainer ran before: other draws from the same generator
    resumed_trainer = FusedTrainer(_base(tiny_model_path), "lora", cfg.resolved_targets(), cfg.r)
    seen: list[tuple[str, int]] = []
    resumed = {r.job_id: r for r in resumed_trainer.train(
        jobs(), on_step=lambda j, s, loss, lr: seen.append((j, s)), resume=at4)}
    assert sorted(seen) == [("j-pirate", 5), ("j-pirate", 6), ("j-robot", 5)]  # only the steps left
    for jid, r in results.items():
        assert resumed[jid].error is None
        assert resumed[jid].losses == pytest.approx(r.losses, rel=1e-5)
        _assert_same_adapter(resumed_trainer, full, jid, rtol=1e-5, atol=1e-7)
    older = {k: v for k, v in copy.deepcopy(at4).items() if k != "format"}  # another version's checkpoint
    with pytest.warns(UserWarning, match="trains again from the start"):
        fresh = {r.job_id: r for r in FusedTrainer(_base(tiny_model_path), "lora", cfg.resolved_targets(), cfg.r)
                 .train(jobs(), resume=older)}
    assert all(fresh[jid].losses == pytest.approx(r.losses, rel=1e-5) for jid, r in results.items())
    at4["jobs"]["j-robot"] = {**at4["jobs"]["j-robot"], "error": "loss became nan at step 3"}
    again = {r.job_id: r for r in FusedTrainer(_base(tiny_model_path), "lora", cfg.resolved_targets(), cfg.r)
             .train(jobs(), resume=at4)}
    assert again["j-robot"].error == "loss became nan at step 3" and again["j-pirate"].error is None


@pytest.mark.parametrize("family", ["lora", "lora_xs"])
@pytest.mark.parametrize("alphas", [(8, 8, 8), (8, 16, 2)], ids=["same-scale", "own-scales"])
@pytest.mark.parametrize("layout", ["mixed", "equal"])
def test_each_row_goes_through_its_own_adapter(tiny_model_path: str, data: dict, family: str, alphas: tuple,
                                               layout: str) -> None:
    """Every job's loss and gradient in a stacked batch equal those of its rows run alone through its
    adapter, with a shared or each job's own alpha/r. ``mixed``: jobs of 2, 3 and 1 rows and rows that
    take the bare base (as in a fused evaluation), one gather per row; their loss equals the bare base's,
    even when every job's adapter holds NaN. ``equal``: 2 rows each, one gather per job."""
    impl = get_method(family)
    cfgs = [impl.config_cls(r=4, alpha=a, dropout=0.0) if family == "lora" else impl.config_cls(r=4, alpha=a)
            for a in alphas]
    cfg = cfgs[0]
    basis = impl.compute_basis(_base(tiny_model_path), cfg, "f" * 64) if family == "lora_xs" else None
    trainer = FusedTrainer(_base(tiny_model_path), family, cfg.resolved_targets(), cfg.r, basis=basis)
    gen = torch.Generator().manual_seed(0)
    actives = []
    for name, c in zip(TRAIN, cfgs):
        job = _job(name, c, data)
        init = {n: tuple(torch.randn(t.shape, generator=gen) * 0.1 for t in ts)  # non-zero B and R
                for n, ts in trainer._init(job, gen).items()}
        actives.append(trainer._add(job, init))
    sizes = (2, 3, 1) if layout == "mixed" else (2, 2, 2)
    rows = {name: next(iter(epoch_batches(data["rows"][name][0], n, 0, data["pad"])(0)))
            for name, n in zip(TRAIN, sizes)}
    bare = next(iter(epoch_batches(data["rows"]["robot"][1], 2, 0, data["pad"])(0)))
    parts = [(a.slot, rows[n]) for a, n in zip(actives, TRAIN)]
    if layout == "mixed":
        parts.insert(1, (None, bare))
    batch, segs = stack(parts)
    trainer.route.segments = segs
    groups = trainer.route.rows(batch["input_ids"].shape[0], torch.device("cpu"), torch.float32)[0].shape[0]
    trainer.route.segments = []
    assert groups == (8 if layout == "mixed" else 3)  # a gather per row, or per job
    jobs_at = [i for i, (s, _, _) in enumerate(segs) if s is not None]
    mixed = trainer._losses(batch, segs)
    trainer.slots.backward(mixed[jobs_at].sum())
    g = trainer.slots.g
    mixed_grads = {a.slot: g[a.slot].clone() for a in actives}
    g.zero_()
    for a, name in zip(actives, TRAIN):
        alone = trainer._losses(rows[name], [(a.slot, 0, rows[name]["input_ids"].shape[0])])
        alone.sum().backward()
        k = [i for i, (s, _, _) in enumerate(segs) if s == a.slot][0]
        assert float(mixed[k].detach()) == pytest.approx(float(alone[0]), rel=1e-4), name
        torch.testing.assert_close(mixed_grads[a.slot], g[a.slot], rtol=1e-3, atol=1e-6)
        assert g[a.slot].abs().sum() > 0
        g.zero_()
    assert len({round(float(mixed[k].detach()), 6) for k in jobs_at}) == 3  # each job's rows met its own adapter
    if layout == "equal":
        return
    with torch.no_grad():
        logits = trainer.base(input_ids=bare["input_ids"]).logits  # no route: the bare base
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), bare["labels"][:, 1:].reshape(-1)
    )
    assert float(mixed[1].detach()) == pytest.approx(float(ref), rel=1e-4)
    assert abs(float(mixed[1].detach()) - float(trainer._losses(bare, [(actives[2].slot, 0, 2)])[0])) > 1e-4
    with torch.no_grad():  # adapters gone bad (a last step's non-finite update) never reach base rows
        for a in actives:
            trainer.slots.w[a.slot] = float("nan")
        poisoned = trainer._losses(batch, segs)
    assert float(poisoned[1]) == pytest.approx(float(ref), rel=1e-4) and poisoned[jobs_at].isnan().all()


def test_one_optimizer_step_equals_torch_adamw_per_job(tiny_model_path: str, data: dict) -> None:
    """The slots' vectorized update is torch's AdamW with clip_grad_norm_ per job: two jobs with their
    own learning rates, weight decay and step counts, one of them idle (its row must not move)."""
    cfg = get_method("lora").config_cls(r=4, alpha=8, dropout=0.0)
    trainer = FusedTrainer(_base(tiny_model_path), "lora", cfg.resolved_targets(), cfg.r)
    gen = torch.Generator().manual_seed(1)
    slots = [trainer._add(_job(n, cfg, data), {k: tuple(torch.randn(t.shape, generator=gen) for t in ts)
                                               for k, ts in trainer._init(_job(n, cfg, data), gen).items()}).slot
             for n in TRAIN]
    s = trainer.slots
    ref = {i: torch.nn.Parameter(s.w[i].clone()) for i in slots[:2]}
    opts = {
        i: torch.optim.AdamW([ref[i]], lr=lr, weight_decay=wd) for i, lr, wd in zip(slots, (1e-2, 3e-3), (0.0, 0.1))
    }
    s.m[slots[2]], s.v[slots[2]] = torch.randn(s.width, generator=gen), torch.rand(s.width, generator=gen)
    idle = [t[slots[2]].clone() for t in (s.w, s.m, s.v)]  # a job with state that is not in this step
    for t in range(1, 4):
        grads = torch.randn(2, s.width, generator=gen) * (5.0 if t == 2 else 0.01)  # step 2 gets clipped
        for i, gr in zip(slots[:2], grads):
            s.g[i] = gr
            ref[i].grad = gr.clone()
            torch.nn.utils.clip_grad_norm_([ref[i]], 1.0)
            opts[i].step()
        s.step({slots[0]: (1e-2, 0.0, t), slots[1]: (3e-3, 0.1, t)})
        for i in slots[:2]:
            torch.testing.assert_close(s.w[i], ref[i].detach(), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(s.m[i], opts[i].state[ref[i]]["exp_avg"], rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(s.v[i], opts[i].state[ref[i]]["exp_avg_sq"], rtol=1e-5, atol=1e-10)
        assert all(torch.equal(t[slots[2]], before) for t, before in zip((s.w, s.m, s.v), idle)) and not s.g.any()


def test_operations_per_step_do_not_grow_with_the_number_of_jobs(tiny_model_path: str, data: dict) -> None:
    """The host issues about as many operations for a step of 8 jobs as for a step of 2 (on a GPU each is
    a kernel launch from one Python thread): no per-job optimizer, clipping or adapter stacking. Counted
    with torch.profiler over the steps of a group, less a one-step group's count (adds and evals)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = get_method("lora").config_cls(r=4, alpha=8, dropout=0.0)
    trainer = FusedTrainer(_base(tiny_model_path), "lora", cfg.resolved_targets(), cfg.r)
    rows = next(iter(epoch_batches(data["rows"]["robot"][0], 2, 0, data["pad"])(0)))

    def ops(k: int, steps: int) -> int:
        jobs = [FusedJob(f"k{k}-{steps}-{i}", cfg, TrainConfig(steps=steps, batch_size=2, seed=i, log_every_steps=100),
                         lambda epoch: iter([rows] * 100)) for i in range(k)]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.train(jobs)
        for j in jobs:
            trainer.remove(j.job_id)
        return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))

    per_step = {k: (ops(k, 5) - ops(k, 1)) / 4 for k in (2, 8)}
    assert per_step[2] > 100
    assert per_step[8] < 1.15 * per_step[2], per_step


def test_a_job_whose_loss_turns_non_finite_fails_alone(tiny_model_path: str, data: dict) -> None:
    """A job whose adapter makes its loss NaN fails at step 1 with the reason; the other jobs of its
    group train exactly as they do without it, and its slot is given back zeroed. A zero_grad that
    drops the banks' gradients between steps (set_to_none) changes nothing either."""
    cfg = get_method("lora").config_cls(r=4, alpha=8, dropout=0.0)

    def jobs(bad: bool) -> list[FusedJob]:
        out = [_job(n, cfg, data, init=_peft_init(tiny_model_path, cfg, TRAIN[n]["seed"])) for n in ("pirate", "robot")]
        if bad:
            init = {k: (a, torch.full_like(b, float("nan"))) for k, (a, b) in
                    _peft_init(tiny_model_path, cfg, TRAIN["butler"]["seed"]).items()}
            out.insert(1, _job("butler", cfg, data, init=init))
        return out

    clean = FusedTrainer(_base(tiny_model_path), "lora", cfg.resolved_targets(), cfg.r)
    want = {r.job_id: r for r in clean.train(jobs(False))}
    trainer = FusedTrainer(_base(tiny_model_path), "lora", cfg.resolved_targets(), cfg.r)
    got = {r.job_id: r for r in trainer.train(
        jobs(True), on_step=lambda *_: trainer.base.zero_grad(set_to_none=True))}
    assert got["j-butler"].error == "loss became nan at step 1; lower train.learning_rate"
    assert "j-butler" not in trainer.slot_keys()
    for jid, r in want.items():
        assert got[jid].error is None and got[jid].losses == pytest.approx(r.losses, rel=1e-5)
        _assert_same_adapter(trainer, clean, jid, rtol=1e-4, atol=1e-6)  # per-row vs per-job gathers: rounding
    s = trainer.slots
    assert s.free and all(not t[i].any() for i in s.free for t in (s.w, s.g, s.m, s.v))


def test_a_job_whose_data_fails_ends_alone(tiny_model_path: str, data: dict) -> None:
    """A job whose training split yields no batch (or whose data raises) fails with the reason; it
    ended the whole group's training before. The other jobs train as they do without it."""
    cfg = get_method("lora").config_cls(r=4, alpha=8, dropout=0.0)

    def jobs(bad: bool) -> list[FusedJob]:
        out = [_job(n, cfg, data, init=_peft_init(tiny_model_path, cfg, TRAIN[n]["seed"])) for n in ("pirate", "robot")]
        if bad:
            out.insert(1, FusedJob("j-empty", cfg, TrainConfig(dtype="float32", steps=3, batch_size=2),
                                   epoch_batches([], 2, 0, data["pad"])))
        return out

    clean = FusedTrainer(_base(tiny_model_path), "lora", cfg.resolved_targets(), cfg.r)
    want = {r.job_id: r for r in clean.train(jobs(False))}
    trainer = FusedTrainer(_base(tiny_model_path), "lora", cfg.resolved_targets(), cfg.r)
    got = {r.job_id: r for r in trainer.train(jobs(True))}
    assert "no batches" in got["j-empty"].error and "j-empty" not in trainer.slot_keys()
    for jid, r in want.items():
        assert got[jid].error is None and got[jid].losses == pytest.approx(r.losses, rel=1e-5)


def test_the_local_split_holds_out_rows_as_the_data_stage_does() -> None:
    from adapterfab.pipelines.local import split_rows

    rows = [{"i": i} for i in range(10)]
    assert [len(x) for x in split_rows(rows, 0.0)] == [10, 0]  # a fraction of 0 holds out nothing
    assert [len(x) for x in split_rows(rows, 0.25)] == [8, 2]
    assert [len(x) for x in split_rows(rows, 0.01)] == [9, 1]  # at least one eval row from two rows on
    assert [len(x) for x in split_rows(rows[:1], 0.5)] == [1, 0]  # and at least one train row
    assert [len(x) for x in split_rows(rows, 0.1, eval_rows=3)] == [7, 3]


def test_fused_lora_on_a_bf16_base_tracks_fp32(tiny_model_path: str, data: dict) -> None:
    """On a bf16 base the adapter product runs in bf16 (fp32 weights and optimizer state): the losses
    stay within bf16 rounding of the fp32 run and the adapter still trains."""
    from transformers import AutoModelForCausalLM

    cfg = get_method("lora").config_cls(r=4, alpha=8, dropout=0.0)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        jobs = [
            _job(n, cfg, data, init=_peft_init(tiny_model_path, cfg, TRAIN[n]["seed"])) for n in ("pirate", "robot")
        ]
        base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=dtype)
        trainer = FusedTrainer(base, "lora", cfg.resolved_targets(), cfg.r)
        out[dtype] = {r.job_id: r for r in trainer.train(jobs)}
        assert trainer.slots.w.dtype == torch.float32  # the adapters and their optimizer state stay fp32
    for jid, r in out[torch.float32].items():
        half = out[torch.bfloat16][jid]
        assert half.error is None and half.losses == pytest.approx(r.losses, rel=3e-2)
        assert half.losses[-1] < half.losses[0]


def test_base_eval_is_computed_once_per_eval_set(tiny_model_path: str, data: dict) -> None:
    """Two jobs on the same eval rows share one base evaluation (the base is frozen); other rows get
    their own, and the shared figure equals a fresh evaluation of the bare base. All of a group's
    evaluations run fused, in passes of at most the group's training rows."""
    cfg = get_method("lora").config_cls(r=4, alpha=8, dropout=0.0)
    trainer = FusedTrainer(_base(tiny_model_path), "lora", cfg.resolved_targets(), cfg.r)
    calls = []
    orig = trainer.evaluate_many
    trainer.evaluate_many = lambda sets, max_rows: (
        calls.append(([j for j, _ in sets], max_rows)) or orig(sets, max_rows)
    )
    twin = _job("pirate", cfg, data)
    twin.job_id = "j-pirate-2"
    results = {r.job_id: r for r in trainer.train([_job("pirate", cfg, data), twin, _job("robot", cfg, data)])}
    (sets, max_rows), = calls  # one fused evaluation for the group
    assert sets.count(None) == 2 and len(sets) == 5 and max_rows == 2 + 2 + 2  # 3 adapters, 2 distinct eval sets
    assert results["j-pirate"].metrics["base_eval_loss"] == results["j-pirate-2"].metrics["base_eval_loss"]
    fresh = trainer.evaluate(None, list(_job("robot", cfg, data).eval_batches()))
    assert results["j-robot"].metrics["base_eval_loss"] == pytest.approx(fresh["eval_loss"], rel=1e-5)
    for jid in ("j-pirate", "j-robot"):  # each adapter's fused figures equal its own evaluation's
        alone = trainer.evaluate(jid, list(_job(jid.removeprefix("j-"), cfg, data).eval_batches()))
        for k in ("eval_loss", "eval_token_accuracy"):
            assert results[jid].metrics[k] == pytest.approx(alone[k], rel=1e-5), (jid, k)
    later = _job("robot", cfg, data)
    later.job_id = "j-robot-3"
    (r3,) = trainer.train([later])  # a later group on known eval rows: the cached base figure, no base pass
    assert calls[1][0] == ["j-robot-3"]
    assert r3.metrics["base_eval_loss"] == results["j-robot"].metrics["base_eval_loss"]


def test_right_padded_batches_skip_the_attention_mask(tiny_model_path: str, data: dict) -> None:
    """A right-padded batch runs without an attention mask (SDPA's fused causal path) and gives the
    losses the masked forward gives; a batch padded otherwise keeps its mask."""
    cfg = get_method("lora").config_cls(r=4, alpha=8, dropout=0.0)
    trainer = FusedTrainer(_base(tiny_model_path), "lora", cfg.resolved_targets(), cfg.r)
    active = trainer._add(_job("robot", cfg, data))
    batch = next(iter(epoch_batches(data["rows"]["robot"][0], 3, 0, data["pad"])(0)))
    assert not bool(batch["attention_mask"].all())  # rows of different lengths: there is padding
    seen = []
    forward = trainer.decoder.forward
    trainer.decoder.forward = lambda **kw: seen.append(kw["attention_mask"]) or forward(**kw)
    segs = [(active.slot, 0, 3)]
    unmasked = trainer._losses(batch, segs)[0]
    assert seen[-1] is None
    trainer.route.segments = segs
    with torch.no_grad():  # the same rows with their mask, as the single-job loop runs them
        masked = trainer.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    trainer.route.segments = []
    labels = batch["labels"][:, 1:]
    ref = torch.nn.functional.cross_entropy(masked[:, :-1].reshape(-1, masked.shape[-1]), labels.reshape(-1))
    assert float(unmasked) == pytest.approx(float(ref), rel=1e-5)
    left = {k: torch.flip(v, dims=[1]) for k, v in batch.items()}  # padding first: the mask is needed
    trainer._losses(left, segs)
    assert seen[-1] is not None and torch.equal(seen[-1], left["attention_mask"])


def test_fused_step_bench_runs(tmp_path: Path) -> None:
    """bench/fused_step.py (the GPU pass's `step`) on a tiny shape: the three variants run over the same
    rows and report their step times."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(REPO / "bench/fused_step.py"), "--shape", "tiny", "--k", "3", "--seq", "32",
                        "--steps", "2", "--warmup", "1", "--quick"], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])
    res = out["results"]
    assert res["peft"]["rows"] == res["fused"]["rows"] == 3 * 4 and res["fused1"]["rows"] == 4
    assert res["peft"]["label_tokens"] == res["fused"]["label_tokens"] == 3 * res["fused1"]["label_tokens"] > 0
    assert all(v["step_ms"] > 0 for v in res.values()) and out["ratios"]["fused_over_peft_time"] > 0


def _trained(tiny_model_path: str, data: dict, cfg, seed: int = 0, **trainer_kw) -> tuple[FusedTrainer, dict]:  # noqa: ANN001
    """Every TRAIN job trained fused from the same initial weights and global RNG state."""
    inits = {n: _peft_init(tiny_model_path, cfg, TRAIN[n]["seed"]) for n in TRAIN}
    trainer = FusedTrainer(_base(tiny_model_path), "lora", cfg.resolved_targets(), cfg.r, **trainer_kw)
    torch.manual_seed(seed)  # the process's generator (the trainer seeds the dropout masks from the jobs)
    results = {r.job_id: r for r in trainer.train([_job(n, cfg, data, init=inits[n]) for n in TRAIN])}
    return trainer, results


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_activation_checkpointing_trains_exactly_as_without(tiny_model_path: str, data: dict, dropout: float) -> None:
    """With activation checkpointing the decoder layers are recomputed in the backward pass, after the
    forward's routing is gone; each row must still go through its own adapter (and see the same
    dropout mask), so every adapter ends where it ends without checkpointing."""
    cfg = get_method("lora").config_cls(r=4, alpha=8, dropout=dropout)
    plain, plain_results = _trained(tiny_model_path, data, cfg)
    ckpt, ckpt_results = _trained(tiny_model_path, data, cfg, checkpointing=True)
    assert ckpt.checkpointing and not plain.checkpointing
    for jid, r in plain_results.items():
        assert ckpt_results[jid].losses == pytest.approx(r.losses, rel=1e-5, abs=1e-6)
        _assert_same_adapter(ckpt, plain, jid, rtol=1e-5, atol=1e-7)
    assert any(float(t[1].abs().sum()) > 0 for t in plain.adapter_tensors("j-pirate").values())  # it trained


def test_dropout_is_applied_in_training_only(tiny_model_path: str, data: dict) -> None:
    """Fused LoRA dropout drops adapter inputs while training (it differs from no dropout), its masks
    follow from the group's jobs, not from what the process drew before (the same group trains the same
    adapters on any trainer), and it never drops in evaluation (the eval figures are the adapter's own)."""
    with_p = get_method("lora").config_cls(r=4, alpha=8, dropout=0.5)
    a, ra = _trained(tiny_model_path, data, with_p, seed=1)
    b, rb = _trained(tiny_model_path, data, with_p, seed=2)  # the process's generator elsewhere
    _, rz = _trained(tiny_model_path, data, with_p.model_copy(update={"dropout": 0.0}), seed=1)
    assert ra["j-pirate"].losses == rb["j-pirate"].losses
    assert ra["j-pirate"].losses[1:] != pytest.approx(rz["j-pirate"].losses[1:], rel=1e-4)
    job = _job("pirate", with_p, data)
    again = a.evaluate("j-pirate", list(job.eval_batches()))
    assert again["eval_loss"] == pytest.approx(ra["j-pirate"].metrics["eval_loss"], rel=1e-6)


def test_rows_split_by_length_train_as_one_padded_batch(tiny_model_path: str, data: dict) -> None:
    """A step whose rows are split into length chunks (each padded to its own longest row) gives every
    job the loss and the adapter it gets from one batch padded to the longest row."""
    from adapterfab.jobs.fused_batches import step_chunks

    cfg = get_method("lora").config_cls(r=4, alpha=8, dropout=0.0)
    one, one_results = _trained(tiny_model_path, data, cfg, chunk_overhead_tokens=10**9)
    split, split_results = _trained(tiny_model_path, data, cfg, chunk_overhead_tokens=0)
    for jid, r in one_results.items():
        assert split_results[jid].losses == pytest.approx(r.losses, rel=1e-5, abs=1e-6)
        _assert_same_adapter(split, one, jid, rtol=1e-4, atol=1e-6)
    # the split really happened on these rows, and padded fewer tokens
    micro = [next(iter(epoch_batches(data["rows"][n][0], 3, 0, data["pad"])(0))) for n in TRAIN]
    chunks = step_chunks(list(enumerate(micro)), 0)
    single = step_chunks(list(enumerate(micro)), 10**9)
    assert len(chunks) > 1 and len(single) == 1
    assert sum(int(b["input_ids"].numel()) for b, _, _ in chunks) < single[0][0]["input_ids"].numel()
    assert sum(int(b["attention_mask"].sum()) for b, _, _ in chunks) == int(single[0][0]["attention_mask"].sum())


def test_length_chunks_partition_rows_and_cut_only_where_it_pays() -> None:
    from adapterfab.jobs.fused_batches import length_chunks

    lengths = [50, 60, 55, 58, 300, 310, 305, 52]
    chunks = length_chunks(lengths, overhead_tokens=100)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    assert [sorted(lengths[i] for i in c) for c in chunks] == [[50, 52, 55, 58, 60], [300, 305, 310]]
    assert len(length_chunks(lengths, overhead_tokens=10**6)) == 1  # saving ~1,250 tokens is not worth it
    assert length_chunks([], 100) == []


def test_model_flops_count_what_a_step_spends(tiny_model_path: str) -> None:
    """4 FLOPs per decoder weight and real token, the head's only at labelled positions, causal attention;
    no embedding, no padding."""
    from adapterfab.jobs.fused_batches import ModelFlops
    from adapterfab.pipelines.rows import padded_batch

    base = _base(tiny_model_path)
    cfg = base.config
    f = ModelFlops.of(base)
    h, inter, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    assert f.body == n * (2 * h * h + 2 * h * kv + 3 * h * inter) and f.head == h * cfg.vocab_size
    batch = padded_batch(
        {"input_ids": [[1, 2, 3], [4, 5, 6, 7, 8]], "labels": [[-100, 2, 3], [-100, -100, 6, 7, -100]]}, 0
    )
    want = 4 * f.body * 8 + 4 * f.head * (2 + 2) + 6 * h * n * (9 + 25)
    assert f.step(batch) == want
    plain = {k: v for k, v in batch.items()}  # no recorded row stats: counted from the tensors
    assert f.step(plain) == want


def test_an_exported_adapter_travels_at_its_own_size(tiny_model_path: str, data: dict, tmp_path: Path) -> None:
    """A resident trainer hands each adapter back through Ray (pickled): every tensor must own its storage,
    or each one would carry the job's whole slot row (an all-linear r16 adapter of a 1B model 100x over)."""
    import pickle

    from adapterfab.jobs.fused import write_exported

    cfg = get_method("lora").config_cls(r=4, alpha=8, dropout=0.0)
    trainer = FusedTrainer(_base(tiny_model_path), "lora", cfg.resolved_targets(), cfg.r)
    job = _job("pirate", cfg, data)
    trainer.train([job])
    exported = trainer.export(job)
    size = sum(t.numel() * t.element_size() for ts in exported.tensors.values() for t in ts)
    assert len(pickle.dumps(exported)) < 1.5 * size + 10_000
    folder = write_exported(pickle.loads(pickle.dumps(exported)), tmp_path / "a")
    assert (folder / "adapter_model.safetensors").exists() and (folder / "adapter_config.json").exists()


def test_retention_rows_go_through_their_own_adapter_with_their_prefix_run_once(tiny_model_path: str,
                                                                                 data: dict, monkeypatch) -> None:
    """``forced_many`` (the retention test, adapterfab/retention.py): every set's rows through its own
    adapter (or the bare base), their common prefix run once per set and handed to each row as keys
    and values, in passes of a few rows: each verdict equals a plain full forward of that row alone.
    Half the rows end in the tokens the pirate adapter itself picks, so it keeps those."""
    cfg = get_method("lora").config_cls(r=4, alpha=8, dropout=0.0)
    trainer = FusedTrainer(_base(tiny_model_path), "lora", cfg.resolved_targets(), cfg.r)
    trainer.train([_job("pirate", cfg, data), _job("robot", cfg, data)])
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(5, 200, (6,), generator=gen).tolist()

    def picks(job_id: str | None, ids: list[int]) -> list[int]:
        trainer.route.segments = [(trainer._slot_of[job_id] if job_id else None, 0, 1)]
        try:
            with torch.no_grad():
                hidden = trainer.decoder(input_ids=torch.tensor([ids])).last_hidden_state
        finally:
            trainer.route.segments = []
        return trainer.lm_head(hidden).argmax(-1)[0].tolist()

    rows = []
    for i, n in enumerate((3, 5, 8, 4, 9, 6, 7, 5, 2, 10)):
        ids = prefix + torch.randint(5, 200, (n,), generator=gen).tolist()
        if i % 2 == 0:  # two more tokens, each the pirate adapter's own greedy choice
            for _ in range(2):
                ids.append(picks("j-pirate", ids)[-1])
        else:
            ids += torch.randint(5, 200, (2,), generator=gen).tolist()
        rows.append({"ids": ids, "labels_from": len(ids) - 2})
    trainer.base.eval()
    want = [[picks(j, r["ids"])[r["labels_from"] - 1:-1] == r["ids"][r["labels_from"]:] for r in rows]
            for j in ("j-pirate", "j-robot", None)]
    got = trainer.forced_many([("j-pirate", rows), ("j-robot", rows), (None, rows)], rows_per_pass=3)
    assert got == want
    for tokens in (40, 10_000):  # passes sized by padded tokens (the default): the same verdicts
        monkeypatch.setitem(fused_batches.FORCED_PASS_TOKENS, "cpu", tokens)
        assert trainer.forced_many([("j-pirate", rows), ("j-robot", rows), (None, rows)]) == want
    assert all(got[0][::2]) and not any(got[0][1::2])  # kept: its own choices; random tokens: not
    assert got[1] != got[0]  # the robot adapter is another model


def test_retention_passes_are_sized_by_padded_tokens() -> None:
    """A pass of the retention test takes rows (shortest first) while its rows padded to its longest fit
    the token budget, at least one row; a fixed row count overrides it."""
    assert fused_batches.pass_sizes([10, 10, 12, 20, 30, 50], 40) == [3, 1, 1, 1]
    assert fused_batches.pass_sizes([5] * 10, 20) == [4, 4, 2]
    assert fused_batches.pass_sizes([100, 200], 16) == [1, 1]  # a row longer than the budget passes alone
    assert fused_batches.pass_sizes([5] * 10, 20, rows=3) == [3, 3, 3, 1]
    assert fused_batches.pass_sizes([], 20) == []


def test_a_retention_measure_that_fails_costs_the_job_nothing_else(tiny_model_path: str, data: dict) -> None:
    """Retention rows that cannot be made (here: raising) leave the job its adapter and eval figures,
    with a retention of NaN, which the gate refuses (a version whose measurement failed is not one
    measured without probes); the other job is measured."""
    cfg = get_method("lora").config_cls(r=4, alpha=8, dropout=0.0)
    trainer = FusedTrainer(_base(tiny_model_path), "lora", cfg.resolved_targets(), cfg.r)

    def broken() -> list:
        raise ValueError("no chat template")

    rows = [{"ids": [5, 6, 7, 8, 9], "labels_from": 3}]
    with pytest.warns(UserWarning, match="j-pirate: retention not measured: no chat template"):
        got = {r.job_id: r for r in trainer.train([_job("pirate", cfg, data, probe_rows=broken),
                                                  _job("robot", cfg, data, probe_rows=lambda: rows + [None])])}
    assert got["j-pirate"].error is None and "eval_loss" in got["j-pirate"].metrics
    assert [k for k in got["j-pirate"].metrics if k.startswith("retention")] == ["retention"]
    assert math.isnan(got["j-pirate"].metrics["retention"])
    assert got["j-robot"].metrics["retention_probes"] == 2 and "retention_known" in got["j-robot"].metrics
