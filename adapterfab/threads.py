"""Torch's CPU thread count, set in the thread that computes.

``torch.set_num_threads`` sets OpenMP's thread count for the calling thread only (OpenMP keeps it per
thread): a thread started later gets OpenMP's default, every core, whatever ``torch.get_num_threads()``
reports there. A threaded Ray actor (``max_concurrency`` > 1) runs its methods on pool threads, and an
engine decodes on its own thread, so a count set in ``__init__`` does not hold where the work runs: the
batched engine's decode loop used every core whatever the replica's ``torch_threads`` said, and a
resident trainer's first forward pass on a new pool thread did too (autograd's backward pass happens to
set the thread's count, so the steps after it did not). Call ``use_torch_threads`` at the top of every
method or loop that computes on a thread it did not start."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def use_torch_threads(n: int | None) -> None:
    """Limit torch (OpenMP, MKL) to ``n`` threads in the calling thread; None or 0: leave it."""
    if n:
        import torch

        torch.set_num_threads(int(n))


def openmp_threads() -> int | None:
    """OpenMP's thread count in the calling thread as torch's own OpenMP runtime reports it (None when
    torch ships none): what the next parallel region here will use."""
    import ctypes
    import glob
    import os

    import torch

    libs = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*")))
    if not libs:
        return None
    return int(ctypes.CDLL(libs[0]).omp_get_max_threads())


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch work in the calling thread on one thread for the block (the count is restored after).

    For threads that sit beside a compute loop (a server's request or loader threads): a thread that runs
    a parallel region with n > 1 threads keeps an OpenMP pool of n − 1 workers for as long as it lives, and
    once libgomp manages more threads than there are CPUs it throttles every pool's spin-wait (to 100
    spins, whatever ``GOMP_SPINCOUNT`` says), so each parallel region of the compute loop then wakes its
    workers through the kernel. Measured (2-CPU AMD EPYC, bf16 SmolLM2, 16-row decode step of the batched
    engine on its own thread): 35-37 ms with no other pool in the process, 44-48 ms once the main thread
    had run one 2-thread op; a one-thread region makes no pool and costs nothing."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def in_passing_thread(fn: Callable[..., T], *args: Any, name: str = "passing") -> T:
    """``fn(*args)`` on a new thread that ends when it returns: its OpenMP pool (if it computed on several
    threads) goes with it, instead of staying in the caller's thread (see ``one_torch_thread``). Returns
    what ``fn`` returns or raises what it raised."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=contextvars.copy_context().run, args=(run,), name=name, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def on_one_torch_thread(fn: Callable[..., T]) -> Callable[..., T]:
    """A method decorated so that its torch work runs under ``one_torch_thread`` (for methods a server
    calls from its request or loader threads beside a compute loop)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        with one_torch_thread():
            return fn(*args, **kwargs)

    return wrapper


# transformers (and peft, which imports it) resolve their submodules lazily on first use, and two threads
# of one process importing them at once can each see the other's modules half initialized: "cannot import
# name 'AutoTokenizer' from 'transformers'" or "... 'AutoModel'" in whichever thread lost. The orchestrator
# imports them lazily on several threads (a window tokenized here, the registrar writing a fused adapter's
# PEFT config, the LoRA-XS basis), so every such import holds this lock (tests/unit/test_threads_imports.py).
_IMPORTS = threading.RLock()


@contextlib.contextmanager
def importing() -> Iterator[None]:
    """Held around a lazy import of transformers or peft on a thread that may run beside another one."""
    with _IMPORTS:
        yield
