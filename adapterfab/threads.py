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
