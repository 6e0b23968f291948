"""`ddpm train` whose process FAIL_RANK meets a failed collective at its FAIL_STEP-th optimizer step (from 0), for the
test of the one-line NCCL failure on the CPU:

    python tests/failing_collective.py train --processes 2 key=value ...     with FAIL_RANK, FAIL_STEP

The stand-in is the error torch raises when NCCL cannot create its shared-memory segments (the text of
pytorch/torchtitan #853, with one line of the C++ stack torch appends): a torch.distributed.DistBackendError, raised
where the loss is computed. It is
installed at import, outside the main guard, so the processes the launcher spawns (which import this file as
__mp_main__) carry it too; the other ranks are real gloo processes that lose their peer.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

NCCL_SHM_ERROR = (
    "NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.hpp:268, unhandled system error (run with "
    "NCCL_DEBUG=INFO for details), NCCL version 2.21.5\n"
    "ncclSystemError: System call (e.g. socket, malloc) or external library call failed or device error. \n"
    "Last error:\n"
    "Error while creating shared memory segment /dev/shm/nccl-1YsMbG (size 7340384)\n"
    "Exception raised from create at /pytorch/torch/csrc/distributed/c10d/NCCLUtils.hpp:268 (most recent call first):\n"
    "C++ CapturedTraceback:\n"
    "#4 std::_Function_handler<std::shared_ptr<c10::LazyValue<std::string> const> () from Logging.cpp:0\n"
)
_real_mse = F.mse_loss


def failing(rank: int, step: int):
    """A stand-in for torch.nn.functional.mse_loss (called once per micro-batch) that fails on `rank` at `step`."""
    calls = [0]

    def mse_loss(pred: torch.Tensor, target: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        i, calls[0] = calls[0], calls[0] + 1
        if int(os.environ.get("RANK", "0")) == rank and i == step:
            raise dist.DistBackendError(NCCL_SHM_ERROR)
        return _real_mse(pred, target, *args, **kwargs)

    return mse_loss


if os.environ.get("FAIL_RANK"):
    F.mse_loss = failing(int(os.environ["FAIL_RANK"]), int(os.environ["FAIL_STEP"]))

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from jobs.cli import main

    sys.exit(main(sys.argv[1:]))
