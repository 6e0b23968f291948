"""`ddpm train` with a fault injected into the training loss, for the divergence tests (in-process or under torchrun).

    python tests/poisoned_training.py train key=value ...     with POISON=nan|collapse, POISON_STEPS=a:b, POISON_RANK

The loss of optimizer steps a..b-1 (counted from 0 in this process) becomes NaN, or the loss of a network that
predicts zero noise (a collapse: ~1.0 for epsilon prediction, whatever the weights); on every rank, or only on
POISON_RANK. The weights, the optimizer and the data are the real ones; only the loss the step sees is replaced.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

_real_mse = F.mse_loss


def poisoned(kind: str, first: int, end: int, rank: int | None = None):
    """A stand-in for torch.nn.functional.mse_loss, which the training loop calls once per micro-batch."""
    calls = [0]

    def mse_loss(pred: torch.Tensor, target: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        i, calls[0] = calls[0], calls[0] + 1
        here = rank is None or int(os.environ.get("RANK", "0")) == rank
        if not (here and first <= i < end):
            return _real_mse(pred, target, *args, **kwargs)
        if kind == "nan":
            return _real_mse(pred, target, *args, **kwargs) * float("nan")
        return _real_mse(pred * 0.0, target, *args, **kwargs)  # a collapsed network's loss, still a graph

    return mse_loss


if __name__ == "__main__":
    a, b = (int(x) for x in os.environ["POISON_STEPS"].split(":"))
    rank = os.environ.get("POISON_RANK")
    F.mse_loss = poisoned(os.environ["POISON"], a, b, int(rank) if rank else None)
    from jobs.cli import main

    sys.exit(main(sys.argv[1:]))
