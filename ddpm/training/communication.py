"""How the processes of a run talk: DDP's communication settings, and a collective that fails (NCCL on GPUs, gloo on
the CPU) reported as one line naming the rank, the host and the error, instead of a C++ traceback per process.

Room in /dev/shm for NCCL is checked before any process starts (ddpm.environment.require_shm, from jobs/train.py).
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ddpm.errors import UserError
from ddpm.models.checkpoint import newest_written


class CollectiveFailed(UserError):
    """A collective (or the process group's set-up) failed in this process: one line, exit status non-zero."""


def ddp_settings():
    """accelerate's DistributedDataParallelKwargs for the UNet: DDP's defaults, kept on purpose.

    Nothing was measured here: the development machine has no GPU, and one GPU is one process, where DDP does not
    communicate at all. What DDP's documentation (torch.nn.parallel.DistributedDataParallel) says of each, and why the
    default stays until a multi-GPU measurement says otherwise (docs/benchmarks.md, "DDP's communication settings"):
    - gradient_as_bucket_view=False: True makes the gradients views into the all-reduce buckets, which "can reduce peak
      memory usage ... equal to the total gradients size" and "avoids the overhead of copying between gradients and
      allreduce communication buckets": a saving on every GPU count above one, but it changes what zero_grad and the
      non-finite step skip (divergence.py) act on, so not without a measurement and a resume test on GPUs.
    - static_graph=False: True lets DDP skip its search for unused parameters and supports activation checkpointing
      several times; the UNet uses all its parameters every step (find_unused_parameters=False already skips the
      search), so the documented gain does not apply.
    - bucket_cap_mb=25: buckets let the all-reduce of one overlap the backward of the next; the digits UNet's 1.7 M
      parameters are 6.8 MB of fp32 gradients, two buckets (DDP's first holds 1 MiB), so the size matters only for
      the larger recipes.
    - comm_hook none: the bf16 compression hook (default_hooks.bf16_compress_hook) halves the bytes every all-reduce
      sends, which pays where the network, not NVLink, is the bottleneck (across nodes); it rounds every gradient to
      bf16 before the average, which changes the training it would have to be measured against.
    """
    from accelerate.utils import DistributedDataParallelKwargs

    return DistributedDataParallelKwargs()


# The parts of a torch.distributed error that say what went wrong: NCCL's first line without its source location, and
# its "Last error:" (what NCCL's own warning said), without the C++ stack torch appends.
_SOURCE = re.compile(r"^NCCL error in: \S+:\d+, ")
_OWN_HINT = " (run with NCCL_DEBUG=INFO for details)"


def is_collective_failure(e: BaseException) -> bool:
    """torch.distributed's own errors (DistBackendError, DistNetworkError, DistStoreError), and the RuntimeErrors that
    older paths and gloo raise with their backend's name in the text."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):  # absent where torch is built without distributed
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(k in text for k in ("NCCL", "gloo", "ProcessGroup", "c10d"))


def essence(text: str) -> str:
    """The error in one line: its first line and NCCL's "Last error", without file locations and C++ frames."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "(no message)"
    first = _SOURCE.sub("NCCL error: ", lines[0]).replace(_OWN_HINT, "")
    if "Last error:" in lines:
        i = lines.index("Last error:")
        if i + 1 < len(lines) and not lines[i + 1].startswith("Exception raised from"):
            first += f"; last error: {lines[i + 1]}"
    return first


def describe(e: BaseException, rank: int, world: int, host: str, ckpt_dir: Path) -> str:
    """The line a failed collective becomes: who, where, what, where to look next, what is safe."""
    text = str(e)
    newest = newest_written(ckpt_dir)
    kept = (
        f"the newest checkpoint, {newest.name}, is intact: rerun to resume from it" if newest else "no checkpoint yet"
    )
    hint = "rerun with NCCL_DEBUG=INFO for NCCL's own account"
    if "shared memory" in text or "/dev/shm" in text:
        hint = "NCCL found too little /dev/shm: docker run --shm-size=1g (or --ipc=host); " + hint
    elif "imeout" in text or "timed out" in text:
        hint = "a peer stopped answering (hung, killed or unreachable); " + hint
    return f"rank {rank} of {world} on {host}: {essence(text)}; {hint}; {kept}"


@contextmanager
def collective_failures(ckpt_dir: Path) -> Iterator[None]:
    """Around a training process: a failed collective leaves as CollectiveFailed with its one line (the rank and
    world size from the launcher's variables, so that it also covers the process group's set-up)."""
    try:
        yield
    except Exception as e:
        if not is_collective_failure(e):
            raise
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        raise CollectiveFailed(describe(e, rank, world, socket.gethostname(), ckpt_dir)) from None
