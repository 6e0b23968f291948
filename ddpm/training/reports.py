"""What the training loop reports from the EMA weights while it trains: sample grids (main process) and
in-training scores (every process samples a share), each a function of the step that ddpm.training.loop calls."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ddpm.config import TrainConfig
from ddpm.evaluation.evaluate import TrainingEvaluator
from ddpm.evaluation.metrics import METRICS
from ddpm.evaluation.scores import append_score, read_scores
from ddpm.models.unet import num_classes_of
from ddpm.sampling.guidance import round_robin
from ddpm.sampling.sample import class_grid, generate, make_grid
from ddpm.tracking import Tracker
from ddpm.training.ema import EMA

log = logging.getLogger(__name__)

# An in-training score this many times the run's best so far is named as a warning: healthy runs improve or wobble
# by a few percent between evaluations (FD-digitsnet 16.8, 4.42, 4.73 on the default run); a diverged or collapsed
# network scores many times worse (a network that predicts zero noise samples noise).
EVAL_ALARM = 2.0


def sample_grid(
    ema: EMA,
    unet: UNet2DModel,
    sampler: SchedulerMixin,
    t: TrainConfig,
    run_dir: Path,
    tracker: Tracker,
    autocast_dtype: torch.dtype | None,
    step: int,
) -> Path:
    """A grid from the EMA weights (copied into `unet`) with seeds 0..n-1, the same noise in every run; a
    class-conditional model's has a row per class (seed i gets class i mod classes), guided with
    train.sample_guidance_scale."""
    ema.copy_to(unet.parameters())
    num_classes = num_classes_of(unet)
    labels = round_robin(t.sample_images, num_classes) if num_classes else None
    images = generate(
        unet,
        sampler,
        list(range(t.sample_images)),
        t.sample_steps,
        batch_size=64,
        device=unet.device,
        autocast_dtype=autocast_dtype,
        labels=labels,
        guidance_scale=t.sample_guidance_scale,
    )
    path = run_dir / "samples" / f"step-{step:08d}.png"
    path.parent.mkdir(exist_ok=True)
    (class_grid(images, labels, num_classes) if labels else make_grid(images)).save(path)
    per_class = f", a row per class, guidance {t.sample_guidance_scale:g}" if labels else ""
    tracker.log_image(
        "samples",
        path,
        step,
        caption=f"EMA, {t.sample_scheduler} {t.sample_steps} steps, seeds 0-{t.sample_images - 1}{per_class}",
    )
    return path


def score_ema(
    ema: EMA,
    unet: UNet2DModel,
    evaluator: TrainingEvaluator,
    sampler: SchedulerMixin,
    t: TrainConfig,
    run_dir: Path,
    tracker: Tracker,
    autocast_dtype: torch.dtype | None,
    step: int,
) -> None:
    """Score the EMA weights on every process; the main process logs the score and keeps it in scores.jsonl."""
    ema.copy_to(unet.parameters())
    scores = evaluator(unet, sampler, t.sample_steps, t.batch_size, autocast_dtype, t.sample_guidance_scale)
    if scores is None:
        return
    fd, kd = METRICS[scores["metric"]][:2]
    tracker.log({f"eval/{fd}": scores[fd], f"eval/{kd}": scores[kd], "eval/seconds": scores["seconds"]}, step)
    earlier = [r[fd] for r in read_scores(run_dir) if r.get("source") == "training" and r["step"] < step and fd in r]
    if earlier and scores[fd] > EVAL_ALARM * min(earlier):  # the second alarm, beside the loss detector's
        text = f"step {step}: {fd} {scores[fd]:.4g} is over {EVAL_ALARM:g}x this run's best, {min(earlier):.4g}"
        log.warning("sample quality fell: %s", text)
        tracker.alert("sample quality fell", text)
    # The EMA at this step has no fingerprint of its own (the checkpoint, if any, is written after): the step and
    # the run directory name it.
    append_score(
        run_dir,
        {**scores, "step": step, "model_fingerprint": "", "scheduler": t.sample_scheduler,
         "steps": t.sample_steps, "seed": 0, "source": "training"},
    )  # fmt: skip
    log.info("step %d: %s %.4g (%d images, %.1f s)", step, fd, scores[fd], scores["num_images"], scores["seconds"])
