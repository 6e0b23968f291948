"""Noticing when training breaks, without a host sync per step.

Two guards. Non-finite steps are skipped on the device: the gradient norm's finiteness becomes the fused AdamW's
`found_inf` (the mechanism torch.amp.GradScaler uses), so a NaN or inf step leaves the weights, the optimizer state
and the EMA untouched, and the counts reach the host at the log steps, where the loss does anyway. A divergence (a
loss that leaves its own recent level and stays there, the collapse of a network to predicting zero noise) is
judged on the window means the log steps already compute; a gradient-norm spike before it is named as an early
warning. The gradient norm is the all-reduced one and the loss the all-reduced mean, so every rank reaches the same
verdict from the same numbers.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

import torch

# A window's mean loss is "high" when it is above LOSS_FACTOR x the median of the recent normal windows and also
# LOSS_SPREADS robust spreads (1.4826 x the median absolute deviation, a standard deviation for Gaussian noise)
# above it. The factor: the collapse this guards against (a network predicting zero noise) takes an epsilon loss
# from ~0.1 to ~1.0, 10x; the recorded curves of the default digits run and the tutorial UNet (tests/data) stay
# within 1.3x of their running median once past the first windows. The spreads: short windows (log_every of 1-10
# steps) have noisy means, and six spreads keep a false alarm rarer than one in a million windows there.
LOSS_FACTOR = 2.0
LOSS_SPREADS = 6.0
# A divergence is a high loss that stays: PATIENCE high windows in a row. One or two are a spike, which is named
# (and its last good checkpoint kept) but not acted on; a run that recovers by itself keeps going.
PATIENCE = 3
# The median needs a few windows of history first; the first windows of a run fall fast and are not a level.
WARMUP_WINDOWS = 3
HISTORY = 20  # normal windows in the running median: recent enough to follow a falling loss
# A window's largest gradient norm over GRAD_FACTOR x the median of the recent windows' is a spike worth naming: the
# reported collapse began with 0.3 -> 8.4 (28x); the recorded healthy curves stay under 4x.
GRAD_FACTOR = 10.0


@dataclass
class Verdict:
    """What one log step's window says. `suspect_from`: the first step of the window where the trouble began (the
    rollback target is the newest checkpoint from before it), set while a spike or divergence is open."""

    diverged: bool = False
    spike: str = ""  # a one-line description of a newly seen loss or gradient spike
    suspect_from: int | None = None
    reason: str = ""  # why it diverged, one line


@dataclass
class DivergenceDetector:
    """Judges each log window's mean loss and largest gradient norm against the run's own recent windows."""

    losses: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    grad_norms: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    high: int = 0  # high windows in a row
    suspect_from: int | None = None
    seen: int = 0  # windows seen since the run (or the rollback) started

    def update(self, window_start: int, step: int, loss: float, grad_norm: float) -> Verdict:
        """`window_start`: the step the window began after; `loss`: its mean loss; `grad_norm`: its largest."""
        if not math.isfinite(loss):  # no finite loss in the window (every step skipped): the guard counts those
            return Verdict(suspect_from=self.suspect_from)
        verdict = Verdict()
        self.seen += 1
        warm = self.seen > WARMUP_WINDOWS and len(self.losses) >= WARMUP_WINDOWS
        level = statistics.median(self.losses) if self.losses else loss
        spread = 1.4826 * statistics.median(abs(x - level) for x in self.losses) if self.losses else 0.0
        is_high = warm and loss > LOSS_FACTOR * level and loss > level + LOSS_SPREADS * spread
        grad_level = statistics.median(self.grad_norms) if self.grad_norms else grad_norm
        grad_spike = warm and grad_norm > GRAD_FACTOR * grad_level > 0
        if grad_spike and self.suspect_from is None:
            self.suspect_from = window_start
            verdict.spike = f"gradient-norm spike by step {step}: {grad_norm:.3g} against {grad_level:.3g} typical"
        if is_high:
            self.high += 1
            if self.suspect_from is None:
                self.suspect_from = window_start
            if self.high == 1 and not verdict.spike:
                verdict.spike = f"loss spike by step {step}: {loss:.4g} against {level:.4g} typical"
            if self.high >= PATIENCE:
                verdict.diverged = True
                verdict.reason = (
                    f"the loss has stayed above {LOSS_FACTOR:g}x its level for {self.high} log windows "
                    f"({loss:.4g} at step {step} against {level:.4g} before step {self.suspect_from})"
                )
        else:
            self.high = 0
            if not grad_spike:
                self.suspect_from = None  # recovered: the spike is over
            if not (warm and self.losses and loss > LOSS_FACTOR * level):  # what is kept as "normal"
                self.losses.append(loss)
            if not grad_spike and grad_norm == grad_norm:
                self.grad_norms.append(grad_norm)
        verdict.suspect_from = self.suspect_from
        return verdict

    def state_dict(self) -> dict:
        """Plain numbers for the checkpoint's state.json: a resumed run keeps judging against the same history."""
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms), "seen": self.seen,
                "high": self.high, "suspect_from": self.suspect_from}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque(state.get("losses", []), maxlen=HISTORY)
        self.grad_norms = deque(state.get("grad_norms", []), maxlen=HISTORY)
        self.seen = int(state.get("seen", 0))
        self.high, self.suspect_from = int(state.get("high", 0)), state.get("suspect_from")  # a spike still open


class NonFiniteSteps:
    """Device-side counts of optimizer steps skipped for a non-finite gradient norm: read at the log steps only."""

    def __init__(self, device: torch.device):
        self.skipped = torch.zeros((), device=device)  # since the start of this launch
        self.streak = torch.zeros((), device=device)  # skipped steps in a row, now
        self.longest = torch.zeros((), device=device)  # the longest such run in this log window

    def check(self, grad_norm: torch.Tensor) -> torch.Tensor:
        """1.0 where this step must be skipped (its gradient norm is NaN or inf), else 0.0; a device tensor."""
        bad = (~torch.isfinite(grad_norm.detach().float())).float()
        self.skipped += bad
        self.streak.mul_(bad).add_(bad)  # (streak + 1) when bad, 0 when good
        torch.maximum(self.longest, self.streak, out=self.longest)
        return bad

    def counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the longest run of skipped steps in this window, skipped steps in all): device scalars."""
        return self.longest, self.skipped

    def new_window(self) -> None:
        self.longest.copy_(self.streak)  # a run still going continues into the next window


def skip_optimizer_step(optimizer: torch.optim.Optimizer, bad: torch.Tensor) -> bool:
    """Makes the next step of a fused optimizer a no-op on the device when `bad` is 1.0 (torch's fused Adam/AdamW
    read `found_inf`, as GradScaler sets it). False when the optimizer cannot skip on the device."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    if not all(g.get("fused") for g in inner.param_groups):
        return False
    inner.found_inf = bad
    return True
