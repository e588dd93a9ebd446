"""The training loop of one adapter job: plain torch + PEFT, no Ray, so it runs and benchmarks anywhere.

``launch.py`` calls ``train_adapter`` inside a Ray Train worker with batches from the worker's Ray Data
shard; tests and benchmarks call it directly with any iterable of batches.

CPU run on the tiny test model:  python -m pytest tests/ray/test_train_job.py
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterfab.methods import MethodConfig, get_method
from adapterfab.spec import TrainConfig

Batch = dict[str, Any]  # input_ids, labels, attention_mask: LongTensor [B, T]


@dataclass
class TrainResult:
    model: Any  # the PeftModel, adapter attached
    metrics: dict[str, float]
    losses: list[float] = field(default_factory=list)


def load_base(path: str, dtype: str, method: MethodConfig, device: Any = None) -> Any:
    """The frozen base at ``dtype`` (4-bit where the method asks), on ``device`` (default: CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = get_method(method.name).base_load_kwargs(method)
    if "quantization_config" in kwargs:  # before transformers' own error, which names no extra
        from adapterfab.extras import need

        need("bitsandbytes")
    on_device = device is not None and str(device) != "cpu"
    if on_device:
        kwargs.setdefault("device_map", {"": device})
    if dtype == "auto":  # a config made outside a spec
        from adapterfab.dtypes import auto_dtype

        dtype = auto_dtype(gpu=on_device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **kwargs)
    model.config.use_cache = False
    return model


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    return f


def forever(epoch_batches: Callable[[int], Iterable[Batch]]) -> Iterator[Batch]:
    """Cycle through epochs; ``epoch_batches(epoch)`` returns that epoch's (shuffled) batches."""
    epoch = 0
    while True:
        n = 0
        for b in epoch_batches(epoch):
            n += 1
            yield b
        if n == 0:
            raise ValueError("the training split produced no batches")
        epoch += 1


EVAL_METRICS = ("eval_loss", "eval_token_accuracy")  # each also measured on the base as base_<name>


def evaluate(model: Any, batches: Iterable[Batch]) -> dict[str, float]:
    """Over assistant tokens (labels != -100): mean token loss and next-token (argmax) accuracy."""
    import torch

    total, correct, tokens = 0.0, 0, 0
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for b in batches:
            b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            logits = out.logits[:, :-1].float()
            labels = b["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum")
            mask = labels != -100
            total += float(loss)
            correct += int(((logits.argmax(-1) == labels) & mask).sum())
            tokens += int(mask.sum())
    model.train()
    return {"eval_loss": total / max(1, tokens), "eval_token_accuracy": correct / max(1, tokens)}


def eval_loss(model: Any, batches: Iterable[Batch]) -> float:
    """Mean token loss over assistant tokens (labels != -100)."""
    return evaluate(model, batches)["eval_loss"]


def peak_memory_mb() -> dict[str, float]:
    """System metrics of this process: peak resident memory, and peak CUDA memory when on a GPU."""
    import resource

    import torch

    out = {"system_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["system_peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def retain_loss(peft_model: Any, b: dict[str, Any], weight: float, threshold: float) -> Any:
    """Cross-entropy on the labelled tokens plus ``weight`` x KL(base || adapter) on the prompt's tokens
    and on the labelled tokens the base already expects (its probability of the label >= ``threshold``):
    the adapter learns what the base would not say (the persona) and keeps the base's distribution where
    the row says what the base would (the content). The base is the same model with the adapter off."""
    import torch
    import torch.nn.functional as F

    ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
    with torch.no_grad(), peft_model.disable_adapter():
        base_logp = F.log_softmax(peft_model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
    logp = F.log_softmax(peft_model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
    target = labels[:, 1:]
    labelled = target != -100
    safe = target.clamp(min=0).unsqueeze(-1)
    ce = -logp.gather(-1, safe).squeeze(-1)
    expected = base_logp.gather(-1, safe).squeeze(-1).exp() >= threshold
    prompt = (mask[:, 1:] > 0) & ~labelled
    kl_at = (prompt | (labelled & expected)).float()
    kl = (base_logp.exp() * (base_logp - logp)).sum(-1)
    n = labelled.sum().clamp(min=1)
    return (ce * labelled).sum() / n + weight * (kl * kl_at).sum() / kl_at.sum().clamp(min=1)


def train_adapter(
    base_path: str,
    method: MethodConfig,
    train: TrainConfig,
    epoch_batches: Callable[[int], Iterable[Batch]],
    eval_batches: Callable[[], Iterable[Batch]] | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
    model: Any = None,
    basis: Any = None,
    resume: dict[str, Any] | None = None,
    on_checkpoint: Callable[[int, dict[str, Any]], None] | None = None,
    zero: dict[str, Any] | None = None,
    device: Any = None,
    loss_fn: Callable[[Any, dict[str, Any]], Any] | None = None,
    replay: Callable[[Any], Any] | None = None,
) -> TrainResult:
    """Attach ``method``'s adapter to the base and train it for ``train.steps`` optimizer steps.

    ``on_step(step, loss, lr)`` is called every ``train.log_every_steps`` steps (1-based step).
    Eval runs once at the end (never between steps: a 4-bit base must not be evaluated mid-training,
    see methods/qlora.py), on the adapter and on the base with the adapter disabled.

    Fault tolerance: every ``train.checkpoint_every`` steps ``on_checkpoint(step, state)`` receives the
    training state (trainable weights, optimizer and schedule state, the CPU and CUDA generators LoRA dropout
    draws from, losses, tokens and training seconds so far), a copy later steps leave alone; passing such a
    state back as ``resume`` continues from that step on the same data order, as if never stopped.

    ``zero``: a DeepSpeed config (jobs/zero.py); the model trains inside a DeepSpeed engine, one of
    several data-parallel workers. Its checkpoint state then carries the engine (``state["engine"]``, a
    ``zero.TrainableCheckpoint`` to be written with its ``save_checkpoint``: the trainable weights and
    the optimizer's shards, no frozen weight) instead of the weights and optimizer, and ``resume`` names
    the folder it was written to (``resume["engine_dir"]``).

    ``loss_fn(model, batch)``: the step's loss instead of the model's cross-entropy (the method quality
    benchmark's study of knowledge retention: ``retain_loss``). Not a spec setting: the factory's fused
    trainer does not have it.

    ``replay(peft_model)``: the job's ``adapterfab.replay.ReplaySet`` (or None), asked for once the adapter
    is attached; with one, each step's loss adds ``weight`` x ``replay.replay_kl`` over the rows it draws
    for that step (the reported loss stays the cross-entropy), as the fused trainer does."""
    import torch

    from adapterfab.jobs.fused_bank import rng_state, seed_dropout

    seed_everything(train.seed)
    impl = get_method(method.name)
    base = model if model is not None else load_base(base_path, train.dtype, method, device)
    peft_model = impl.apply(base, method, basis)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = impl.make_optimizer(params, train.learning_rate, train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(train))
    engine = None
    if zero is not None:
        from adapterfab.jobs.zero import ZERO_TAG, init_engine

        engine = init_engine(peft_model, opt, sched, zero)
    device = engine.device if engine is not None else next(peft_model.parameters()).device
    replayed = replay(peft_model) if replay is not None else None
    if replayed is not None and not replayed.active:
        replayed = None
    losses: list[float] = []
    t0 = time.monotonic()
    tokens, done_s = 0, 0.0  # done_s: training seconds before a resume (train_tokens_per_s counts them too)
    batches = forever(epoch_batches)
    start = 0
    if resume is not None:
        if engine is not None:
            engine.load_checkpoint(resume["engine_dir"], tag=ZERO_TAG, load_module_strict=False,
                                   load_optimizer_states=True, load_lr_scheduler_states=True)
        else:
            named = dict(peft_model.named_parameters())
            with torch.no_grad():
                for name, value in resume["trainable"].items():
                    named[name].copy_(value)
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
        rng = resume["rng"]  # a state of old (CPU generator only) or as rng_state writes it
        seed_dropout(torch.device(device), [], rng if isinstance(rng, dict) else {"cpu": rng})
        losses, tokens, start = list(resume["losses"]), int(resume["tokens"]), int(resume["step"])
        done_s = float(resume.get("train_s", 0.0))
        for _ in range(start):  # the batches the interrupted run already consumed
            next(batches)
    for step in range(start + 1, train.steps + 1):
        b = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        if loss_fn is not None and engine is None:
            loss = loss_fn(peft_model, b)
        else:
            out = (engine or peft_model)(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                         labels=b["labels"])
            loss = out.loss
        reported = loss
        if replayed is not None:
            from adapterfab.replay import replay_kl

            term = replayed.weight * replay_kl(engine or peft_model, peft_model, replayed.draw(step - 1), device)
            loss = loss + term
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {float(loss)} at step {step}; lower train.learning_rate")
        lr = sched.get_last_lr()[0]  # this step's rate (read before the schedule steps to the next one)
        if engine is not None:  # averages gradients over the workers, clips, steps and zeroes them
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        losses.append(float(reported.detach()))
        tokens += int(b["attention_mask"].sum())
        if engine is not None:  # the step's loss over all workers' rows
            from adapterfab.jobs.zero import mean_over_workers

            losses[-1] = mean_over_workers(losses[-1], device)
        if on_step and (step % train.log_every_steps == 0 or step == train.steps):
            on_step(step, losses[-1], lr)
        if on_checkpoint and train.checkpoint_every and step % train.checkpoint_every == 0 and step < train.steps:
            state: dict[str, Any] = {"step": step, "losses": list(losses), "tokens": tokens,
                                     "rng": rng_state(torch.device(device)), "train_s": done_s + time.monotonic() - t0}
            if engine is not None:
                from adapterfab.jobs.zero import TrainableCheckpoint

                state["engine"] = TrainableCheckpoint(engine)
            else:
                state.update({
                    "trainable": {n: p.detach().clone() for n, p in peft_model.named_parameters()
                                  if p.requires_grad},
                    # a copy: the optimizer's state tensors are updated in place by the steps after this one
                    "optimizer": copy.deepcopy(opt.state_dict()), "scheduler": sched.state_dict()})
            on_checkpoint(step, state)
    train_s = done_s + time.monotonic() - t0
    if engine is not None:  # every worker's tokens
        from adapterfab.jobs.zero import mean_over_workers

        tokens = round(mean_over_workers(tokens, device) * torch.distributed.get_world_size())
    metrics: dict[str, float] = {
        "train_loss": losses[-1],
        "train_loss_first": losses[0],
        "train_s": train_s,
        "train_tokens_per_s": tokens / max(train_s, 1e-9),
        "trainable_params": float(sum(int(getattr(p, "ds_numel", p.numel())) for p in params)),
    }
    if replayed is not None and train.steps > start:
        metrics["replay_loss"] = float(term.detach())  # the last step's replay term (weight x KL)
    if eval_batches is not None:
        ev = list(eval_batches())
        if ev:
            metrics.update(evaluate(peft_model, ev))
            with peft_model.disable_adapter():
                metrics.update({f"base_{k}": v for k, v in evaluate(peft_model, ev).items()})
    metrics.update(peak_memory_mb())
    return TrainResult(peft_model, metrics, losses)


def save_adapter(result: TrainResult, method: MethodConfig, out_dir: str | Path) -> Path:
    """adapter_config.json + adapter_model.safetensors (PEFT's format for PEFT methods)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    get_method(method.name).save(result.model, method, out)
    return out
