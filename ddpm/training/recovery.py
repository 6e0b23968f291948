"""What a run does when it breaks (train.on_divergence): keep its last good checkpoint, then roll back to it, stop,
or only warn. The detection is ddpm.training.divergence; every rank reaches the same verdict and calls these
together, the main process alone touching the files.

A rollback restores the weights, EMA, optimizer and random streams of the newest checkpoint from before the
trouble began (the initial weights when the run had none yet), keeps the data position where it is (the batches
that led there are not seen again), and multiplies the learning rate by train.rollback_lr_factor. The step counter
goes on, so metrics.jsonl and W&B keep one increasing axis; the rollback is logged with the step it restored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ddpm.config import TrainConfig
from ddpm.errors import UserError
from ddpm.models.checkpoint import mark_last_good, remove_after, verified_checkpoints
from ddpm.tracking import Tracker
from ddpm.training.divergence import PATIENCE, DivergenceDetector, NonFiniteSteps
from ddpm.training.state import TrainingState, restore_training_state

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """Training stopped because it diverged: exit status 2, so a SLURM job chained with afterok never starts."""


@dataclass
class Window:
    """One log window over all ranks."""

    loss: float  # mean of the finite losses
    grad_norm: float  # the largest finite gradient norm
    nonfinite_run: int  # the longest run of skipped (NaN/inf) steps
    skipped_steps: int  # skipped steps since this launch began
    stop_votes: float  # ranks that received a stop signal


@dataclass
class Recovery:
    """The plain numbers a run keeps about its recoveries; saved in every checkpoint's state.json."""

    lr_scale: float = 1.0  # the learning rate is optim.lr x lr_scale x the schedule
    rollbacks: int = 0

    @classmethod
    def from_checkpoint(cls, state: dict | None) -> Recovery:
        state = state or {}
        return cls(float(state.get("lr_scale", 1.0)), int(state.get("rollbacks", 0)))


class Watchdog:
    """The guards of one run (non-finite steps, divergence) and what it does about them at each log step."""

    def __init__(
        self, t: TrainConfig, ckpt_dir: Path, state: TrainingState, accelerator: Accelerator, tracker: Tracker, resumed
    ):
        self.t, self.ckpt_dir, self.state, self.accelerator, self.tracker = t, ckpt_dir, state, accelerator, tracker
        saved = resumed["state"] if resumed else {}
        self.recovery = Recovery.from_checkpoint(saved)
        self.detector, self.guard = DivergenceDetector(), NonFiniteSteps(accelerator.device)
        self.detector.load_state_dict(saved.get("detector", {}))
        self.initial = None if resumed else initial_weights(state.unet)  # the rollback target before a checkpoint

        device = accelerator.device
        # The log window, on the device: the sum and count of finite losses, the largest finite gradient norm.
        self.loss_sum, self.loss_count, self.grad_max = (torch.zeros((), device=device) for _ in range(3))

    def state_dict(self) -> dict:
        return {**vars(self.recovery), "detector": self.detector.state_dict()}

    def add_loss(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach())
        self.loss_sum += torch.where(finite, loss.detach(), 0.0)
        self.loss_count += finite

    def check_step(self, grad_norm: torch.Tensor) -> torch.Tensor:
        """1.0 on the device where this step must be skipped (NaN/inf gradient norm), else 0.0."""
        skipped = self.guard.check(grad_norm)
        torch.maximum(self.grad_max, torch.where(skipped > 0, 0.0, grad_norm.detach().float()), out=self.grad_max)
        return skipped

    def read_window(self, stop_requested: bool) -> Window:
        """The log window's numbers over all ranks, in one collective (the host sync of the log step), then a new
        window. The gradient norm and the skip counts are the same on every rank already (all-reduced gradients)."""
        acc, world = self.accelerator, self.accelerator.num_processes
        stop = torch.tensor(float(stop_requested), device=acc.device)
        window = torch.stack([self.loss_sum, self.loss_count, self.grad_max, *self.guard.counts(), stop])
        per_rank = torch.tensor([1, 1, world, world, world, 1], device=acc.device)
        loss, count, grad, run, skipped, votes = (acc.reduce(window, "sum") / per_rank).tolist()
        for v in (self.loss_sum, self.loss_count, self.grad_max):
            v.zero_()
        self.guard.new_window()
        return Window(loss / count if count else math.nan, grad, int(run), int(skipped), votes)

    def _announce(self, event: str, title: str, text: str, step: int, log_line: bool = True) -> str:
        """The log line, `divergence/<event>` in metrics.jsonl and W&B (a mark on the charts beside the loss), and a
        W&B alert where the run is online. Returns the text."""
        if self.accelerator.is_main_process:
            if log_line:  # (a stop's text is the run's one-line error instead)
                log.warning("%s: %s", title, text)
            self.tracker.log({f"divergence/{event}": 1.0}, step)
            self.tracker.alert(title, text)
        return text

    def _stopped(self, step: int, text: str) -> str:
        return self._announce("stopped", "training stopped", text, step, log_line=False)

    def _keep_last_good(self, before: int, why: str) -> int | None:
        """The main process picks and marks the last good checkpoint; every rank gets the same answer (a rank must
        never restore other weights than the rest, whatever its view of a shared file system)."""
        good = keep_last_good(self.ckpt_dir, before, why) if self.accelerator.is_main_process else None
        return broadcast_object_list([good])[0] if self.accelerator.num_processes > 1 else good

    def judge(self, window_first: int, step: int, w: Window, checkpoint: Callable[[], None]) -> str:
        """Acts on one log window; returns why the run must stop (a one-line error), or "" to go on. `checkpoint`
        writes the training state at the current step."""
        t, is_main = self.t, self.accelerator.is_main_process
        # Under fp16, GradScaler's own overflow steps count too: it halves its scale (from 2^16) at each, so 16 more
        # in a row are its normal search for a scale at the start, not a broken run.
        limit = t.max_nonfinite_steps + (16 if self.state.scaler is not None else 0)
        if w.nonfinite_run >= limit:  # every skipped step left the weights as they were
            checkpoint()
            return self._stopped(
                step,
                f"step {step}: {w.nonfinite_run} optimizer steps in a row had NaN/inf gradients (each skipped; "
                f"the limit is {limit}, train.max_nonfinite_steps); the weights from before them are checkpointed. "
                "Lower optim.lr, check the data, or try train.mixed_precision=fp32",
            )
        verdict = self.detector.update(window_first, step, w.loss, w.grad_norm)
        first = verdict.spike or (verdict.diverged and self.detector.high == PATIENCE)  # news, not a lasting state
        if not first:
            return ""
        good = self._keep_last_good(verdict.suspect_from, verdict.spike or verdict.reason)
        if verdict.spike:
            named = f"step {good}" if good is not None else "none yet (the initial weights)"
            self._announce("spike", "training spike", f"{verdict.spike}; last good checkpoint: {named}", step)
        if not verdict.diverged:
            return ""
        if t.on_divergence == "warn":
            self._announce("diverged", "training diverged", f"step {step}: {verdict.reason} (warn only)", step)
            return ""
        can_go_back = good is not None or self.initial is not None
        if t.on_divergence == "rollback" and self.recovery.rollbacks < t.max_rollbacks and can_go_back:
            restored = roll_back(self.state, self.ckpt_dir, good, self.initial, self.accelerator, t.batch_size)
            self.recovery.lr_scale *= t.rollback_lr_factor
            self.recovery.rollbacks += 1
            self.detector.high, self.detector.suspect_from = 0, None  # the history from before the trouble stays
            checkpoint()  # the rolled-back state, its lower rate and the data position: a crash now resumes here
            self._announce(
                "rollback",
                "training diverged, rolled back",
                f"step {step}: {verdict.reason}; rollback {self.recovery.rollbacks} of {t.max_rollbacks} to the "
                f"{'weights of step ' + str(restored) if good is not None else 'initial weights'}, past the batches "
                "that led there, learning rate "
                f"x{self.recovery.lr_scale:g}",
                step,
            )
            return ""
        kept = set_aside(self.ckpt_dir, good, is_main)
        return self._stopped(
            step,
            f"step {step}: training diverged: {verdict.reason}; stopped (train.on_divergence={t.on_divergence}, "
            f"{self.recovery.rollbacks} rollbacks); {kept}. Lower optim.lr and rerun",
        )


def initial_weights(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of a fresh run's weights: the rollback target before its first checkpoint."""
    return {k: v.detach().to("cpu", copy=True) for k, v in unet.state_dict().items()}


def keep_last_good(ckpt_dir: Path, before: int, why: str) -> int | None:
    """Marks the newest checkpoint at or before step `before` as the last good one (pruning keeps it); its step,
    or None when the run has none that early. The main process's call."""
    good = next((c for c in verified_checkpoints(ckpt_dir) if c.step <= before), None)
    if good is not None:
        try:
            mark_last_good(ckpt_dir, good.step, why)
        except OSError as e:  # a full disk: the rollback still has its target, only the mark is missing
            log.warning("could not mark %s as the last good checkpoint: %s", good.path, e)
    return good.step if good else None


def roll_back(
    state: TrainingState,
    ckpt_dir: Path,
    good: int | None,
    initial: dict[str, torch.Tensor] | None,
    accelerator: Accelerator,
    batch_size: int,
) -> int:
    """Restores the last good state on every rank and returns its step: checkpoint `good` (the newer ones are
    deleted, they hold the diverged weights), else the initial weights."""
    if accelerator.is_main_process:
        removed = remove_after(ckpt_dir, good if good is not None else -1, keep_aside=False)
        if removed:
            log.warning("rollback: deleted the checkpoints after the last good one: %s", ", ".join(removed))
    accelerator.wait_for_everyone()
    if good is not None:
        launch = [{k: g[k] for k in ("betas", "eps", "weight_decay")} for g in state.optimizer.param_groups]
        restored = restore_training_state(
            ckpt_dir, state, rank=accelerator.process_index, world=accelerator.num_processes, batch_size=batch_size
        )
        assert restored is not None and restored["step"] == good, (restored, good)
        for g, hyper in zip(state.optimizer.param_groups, launch):  # this launch's config wins, as on resume
            g.update(hyper)
        return good
    device = next(state.unet.parameters()).device
    state.unet.load_state_dict({k: v.to(device) for k, v in initial.items()})
    state.ema.shadow = [p.detach().clone() for p in state.unet.parameters()]
    state.ema.steps = 0
    if state.profiles is not None:
        state.profiles.reset(state.unet.parameters(), 0)
    state.optimizer.state.clear()  # AdamW's moments start again from the first step, as in a fresh run
    return 0


def set_aside(ckpt_dir: Path, good: int | None, is_main: bool) -> str:
    """On a stop: the checkpoints newer than the last good one are renamed `diverged-step-N` (kept for a look, never
    resumed from), so a rerun starts from the good one. Returns what the error message says about it."""
    if is_main:
        moved = remove_after(ckpt_dir, good if good is not None else -1, keep_aside=True)
        if moved:
            log.warning("set aside (renamed diverged-*): %s", ", ".join(moved))
    if good is None:
        return "it had no checkpoint from before; all of them are set aside, so a rerun starts afresh"
    return f"the last good checkpoint is {ckpt_dir / f'step-{good:08d}'}"
