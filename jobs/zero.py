"""DeepSpeed ZeRO for a job whose base does not fit one worker (the planner decides: jobs/plan.py).

The job runs as a multi-worker Ray Train TorchTrainer (gloo on CPU, NCCL on GPU); every worker calls
``train_adapter`` with ``zero=deepspeed_config(...)``, which wraps the PEFT model in a DeepSpeed engine:
ZeRO-2 shards gradients and optimizer state over the workers, ZeRO-3 also the frozen base weights
(gathered layer by layer in the forward pass). Data parallel: each worker trains on its shard of the
rows with ``ceil(batch_size / workers)`` rows per step and DeepSpeed averages the gradients. The rows are
padded to a multiple of the workers first (``pad_for_workers``): Ray Train's split gives every worker
the same number of rows and drops the rest.

A training checkpoint holds the engine's shards of the trainable weights and their optimizer state only
(``TrainableCheckpoint``), never the frozen base: not even a tied embedding under its second name.

The adapter's weights stay fp32 (DeepSpeed's bf16 mode is off: it would cast them to bf16); a bf16
base stays bf16. On CPU DeepSpeed's CPU accelerator is used (no ops are compiled).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ZERO_TAG = "adapterfab"  # the tag of the engine checkpoint written at each training checkpoint


def micro_batch(batch_size: int, workers: int) -> int:
    return max(1, math.ceil(batch_size / max(1, workers)))


def deepspeed_config(stage: int, batch_size: int, workers: int, clip: float = 1.0) -> dict[str, Any]:
    micro = micro_batch(batch_size, workers)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * workers,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,  # the method's own AdamW (torch), not DeepSpeed's fused one
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if stage == 3:  # gather a whole small layer at once; keep nothing gathered between steps
        cfg["zero_optimization"].update({"stage3_param_persistence_threshold": 0,
                                         "stage3_max_live_parameters": 10**8})
    return cfg


def pad_for_workers(ds: Any, workers: int) -> Any:
    """The Ray Dataset ``ds`` with its first rows repeated up to a multiple of ``workers`` rows (all of it
    repeated as often as needed when it has fewer rows than workers).

    Ray Train splits the training rows with ``streaming_split(workers, equal=True)``: every worker gets
    ``len // workers`` rows and the ``len % workers`` others are never trained on (10 rows on 3 workers
    trained 9). The shards must stay equal: every worker runs the same steps (DeepSpeed's collectives),
    and the split's workers start each epoch together, so a longer shard would make its worker's epoch
    longer than the others'. Padding rather than handing the remainder to some workers: every worker's
    step then averages the same number of rows, so each step's loss (the mean of the workers' means) is
    the mean over its rows; a shard one row shorter gives its last step one row less, whose row then
    weighs twice as much. The price is at most ``workers - 1`` rows seen twice per epoch."""
    if workers <= 1:
        return ds
    n = ds.count()
    extra = -n % workers
    if n == 0 or extra == 0:
        return ds
    parts = [ds] * (extra // n) + ([ds.limit(extra % n)] if extra % n else [])
    return ds.union(*parts)


def init_engine(model: Any, optimizer: Any, scheduler: Any, config: dict[str, Any]) -> Any:
    """The DeepSpeed engine around ``model``; torch.distributed must already be initialized (Ray Train
    does it) and is reused."""
    from adapterfab.extras import need

    deepspeed = need("deepspeed")

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=config, dist_init_required=False)
    return engine


class TrainableCheckpoint:
    """What a training checkpoint writes of a DeepSpeed engine (``train_adapter``'s ``state["engine"]``):
    what a resume needs of it, the trainable (adapter) weights, their optimizer state (each worker its
    shard) and the schedule's, never a frozen weight. DeepSpeed's ``exclude_frozen_parameters`` drops the
    frozen weights by their ``named_parameters`` names, which name a tied weight once: under ZeRO-2 a base
    with tied input/output embeddings wrote its whole (frozen) lm_head into every checkpoint (12.6 MB
    beside a 7 KB adapter on the tiny test model; 57 MB for SmolLM2-135M, 0.6 GB for Qwen2.5-3B in bf16;
    ZeRO-3 wrote an empty placeholder). DeepSpeed's offline recovery scripts (zero_to_fp32.py, ...) are
    not kept either: a resume loads the shards with ``engine.load_checkpoint``."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def save_checkpoint(self, save_dir: str, tag: str = ZERO_TAG, exclude_frozen_parameters: bool = True) -> None:
        """``engine.save_checkpoint``; every worker calls it (it waits for the others)."""
        if not exclude_frozen_parameters:
            self.engine.save_checkpoint(save_dir, tag=tag)
            return
        module = self.engine.module
        frozen = [n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad]

        def drop_frozen(_module: Any, state: dict[str, Any], prefix: str, _meta: Any) -> None:
            for name in frozen:
                state.pop(prefix + name, None)

        hook = module.register_state_dict_post_hook(drop_frozen)
        try:
            self.engine.save_checkpoint(save_dir, tag=tag, exclude_frozen_parameters=True)
        finally:
            hook.remove()
        for script in Path(save_dir).glob("zero_to_*.py"):
            script.unlink(missing_ok=True)


def full_numel(p: Any) -> int:
    """A parameter's size, also when ZeRO-3 has partitioned it away (``numel()`` is then 0)."""
    return int(getattr(p, "ds_numel", p.numel()))


def local_fraction(model: Any) -> float:
    """The share of the model's parameters this worker holds (1.0 unless ZeRO-3 partitioned them)."""
    total = held = 0
    for p in model.parameters():
        n = full_numel(p)
        total += n
        held += int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else n
    return held / max(1, total)


@contextlib.contextmanager
def gathered_trainable(model: Any) -> Iterator[None]:
    """Inside: the trainable (adapter) weights are whole on every worker, e.g. to save them."""
    params = [p for p in model.parameters() if p.requires_grad and hasattr(p, "ds_id")]
    if not params:
        yield
        return
    from adapterfab.extras import need

    deepspeed = need("deepspeed")

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def mean_over_workers(value: float, device: Any = "cpu") -> float:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL reduces only GPU tensors
    dist.all_reduce(t)
    return float(t[0]) / dist.get_world_size()


def any_worker(flag: bool, device: Any = "cpu") -> bool:
    """Whether ``flag`` is true on any worker (every worker calls it): ranks that must run the same
    forwards (ZeRO-3 gathers each layer's weights from all of them) decide together."""
    return mean_over_workers(1.0 if flag else 0.0, device) > 0
