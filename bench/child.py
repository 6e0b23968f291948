"""Each stage runs in its own child process: timings isolated from the other stages, and its own peak memory."""

from __future__ import annotations

import resource
from multiprocessing import get_context


def peak_memory() -> dict:
    """Peak memory of this process so far: RSS, and max allocated on the GPU when there is one."""
    import torch

    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def in_child(fn, *args):
    """Run one stage in a fresh process: isolated timings and its own peak memory."""
    with get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(fn, args)
