"""The training loop: one function, on accelerate, the same for one CPU process and many GPU ranks.

`_train` reads top to bottom in EDM's phases (NVlabs/edm training/training_loop.py): the set-up (dataset, network,
optimizer, resume; each a function of ddpm.training.setup, called once), then per optimizer step: accumulate
gradients, update weights, update EMA, maintenance (status, grids, scores), snapshot; then the export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ddpm.config import Config
from ddpm.data.batches import to_model_input
from ddpm.errors import RunStopped
from ddpm.models.export import export_pipeline, make_pipeline
from ddpm.models.schedule import NoiseProcess, build_scheduler
from ddpm.models.unet import architecture
from ddpm.sampling.sample import make_sampler
from ddpm.training.communication import collective_failures
from ddpm.training.divergence import skip_optimizer_step
from ddpm.training.labels import drop_labels, resolve_num_classes
from ddpm.training.lock import RunLock
from ddpm.training.recovery import TrainingDiverged, Watchdog
from ddpm.training.reports import sample_grid, score_ema
from ddpm.training.setup import (
    build_networks,
    open_data,
    open_evaluator,
    open_tracker,
    resume,
    setup_optimizer,
    setup_profiles,
    start_accelerator,
    start_from_base,
)
from ddpm.training.state import TrainingState, save_training_state

log = logging.getLogger(__name__)


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Linear warm-up over `warmup` optimizer steps, then cosine to zero at `total` or constant.
    Counted in optimizer steps, so accumulation and the number of processes do not stretch it."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class StopRequest:
    """SIGTERM, SIGUSR1 or SIGUSR2 (SLURM's warning before a time limit or preemption) asks for a checkpoint and a
    clean exit. So does a first Ctrl-C (SIGINT) of a single-process run, which would otherwise lose every step since
    the last checkpoint; a second one stops at once (Python's KeyboardInterrupt)."""

    def __init__(self, interactive: bool = False) -> None:
        self.requested = False
        self.signal_name = ""
        self.interactive = interactive  # SIGINT too: one process, started from a terminal or a script

    def install(self) -> None:
        signals = [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2] + ([signal.SIGINT] if self.interactive else [])
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested, self.signal_name = True, signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the second Ctrl-C: KeyboardInterrupt
            print(
                "\nCtrl-C: writing a checkpoint at the next log step (train.log_every), then stopping; "
                "Ctrl-C again stops now and loses the steps since the last checkpoint",
                file=sys.stderr,
                flush=True,
            )


def train(cfg: Config) -> Path | None:
    """Train (or resume) the run `cfg.run_dir`; returns the exported pipeline's directory, or None
    when the launch ended early at `train.stop_after` (with a checkpoint to resume from). A failed collective (NCCL,
    gloo) leaves as one line naming this rank, its host and the error (ddpm.training.communication)."""
    with collective_failures(cfg.run_dir / "checkpoints"):
        accelerator = start_accelerator(cfg.train)
        lock = RunLock(cfg.run_dir)
        if accelerator.is_main_process:
            lock.acquire()
        accelerator.wait_for_everyone()
        # Ctrl-C is a stop request where one process runs; under a launcher of several, the launcher owns it.
        stop = StopRequest(interactive=accelerator.num_processes == 1)
        stop.install()
        try:
            return _train(cfg, accelerator, lock, stop)
        finally:
            stop.uninstall()
            if accelerator.is_main_process:
                lock.release()


def _train(cfg: Config, accelerator: Accelerator, lock: RunLock, stop: StopRequest) -> Path | None:
    run_dir, t, o = cfg.run_dir, cfg.train, cfg.optim
    device, rank, world, is_main = (
        accelerator.device,
        accelerator.process_index,
        accelerator.num_processes,
        accelerator.is_main_process,
    )

    # Load dataset (with its labels for a class-conditional model, whose number of classes it decides).
    data = open_data(cfg.data, t.batch_size, cfg.seed, accelerator, run_dir)
    if is_main:
        lock.refresh()  # the cache build can take long: show other hosts that this run is alive
    num_classes = resolve_num_classes(cfg.model, data.class_names, data.labels_max)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=num_classes))  # auto resolved
    steps_per_epoch = data.batches_per_epoch / t.grad_accum  # optimizer steps run on across epoch boundaries
    total = t.max_steps or max(1, t.epochs * data.batches_per_epoch // t.grad_accum)
    images_per_step = t.batch_size * t.grad_accum * world  # e.g. 64 x 1 x 1 = 64 images per optimizer step

    # Construct network, the noise it learns to remove and this rank's stream of noise, timesteps and flips.
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format  # see to_model_input
    unet, sample_unet = build_networks(
        cfg.model, cfg.data, t, cfg.seed, accelerator, memory_format, cfg.schedule.num_train_timesteps
    )
    scheduler = build_scheduler(cfg.schedule)
    noise = NoiseProcess(scheduler, device, o.loss_weighting, o.snr_gamma)
    generator = torch.Generator(device).manual_seed(int(np.random.SeedSequence([cfg.seed, rank]).generate_state(1)[0]))

    # Setup optimizer (and the EMA of the weights it updates, and post-hoc EMA's profiles).
    model, optimizer, ema = setup_optimizer(unet, o, t.compile, accelerator)
    profiles = setup_profiles(unet, o, t, run_dir, accelerator, total)

    # Resume training from the newest complete checkpoint, if there is one; then the tracker and the evaluator.
    ckpt_dir = run_dir / "checkpoints"
    state = TrainingState(unet, ema, optimizer, accelerator.scaler, generator, architecture(unet), profiles)
    resumed = resume(state, ckpt_dir, o, t.batch_size, accelerator)
    step, epoch, batch = (resumed["step"], resumed["epoch"], resumed["batch"]) if resumed else (0, 0, 0)
    if not resumed and cfg.model.init_from:  # a fine-tuning run's first launch; a resume never reloads the base
        start_from_base(unet, ema, cfg.model)
    if resumed and is_main:
        log.info("resuming %s from %s (step %d of %d)", run_dir, resumed["path"].name, step, total)
    tracker = open_tracker(
        cfg, accelerator, step, total_steps=total, images_per_step=images_per_step, dataset_images=data.images
    )
    # What notices a breaking run and what it did about it (ddpm.training.recovery), carried through checkpoints.
    watchdog = Watchdog(t, ckpt_dir, state, accelerator, tracker, resumed)
    evaluator, owed = open_evaluator(
        cfg.data, t, accelerator, tracker, run_dir, step, bool(resumed), total, data.class_names
    )
    sampler = make_sampler(t.sample_scheduler, scheduler)
    autocast_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else None
    grid = partial(sample_grid, ema, sample_unet, sampler, t, run_dir, tracker, autocast_dtype)  # grid(step)
    score = partial(score_ema, ema, sample_unet, evaluator, sampler, t, run_dir, tracker, autocast_dtype)

    def checkpoint() -> None:  # at the loop's current position
        position = {"step": step, "epoch": epoch, "batch": batch, "batch_size": t.batch_size, "seed": cfg.seed,
                    **watchdog.state_dict()}  # fmt: skip
        save_training_state(
            ckpt_dir,
            state,
            position,
            keep=t.keep_checkpoints,
            rank=rank,
            world=world,
            barrier=accelerator.wait_for_everyone,
        )

    if owed:
        score(step)
    loader = data.open_loader(epoch, batch)
    window_first, failure = step, ""  # the step the log window began after; why the run stopped itself, if it did
    window_start, window_steps = time.perf_counter(), 0
    bar = tqdm(total=total, initial=step, desc=cfg.run_name, unit="step", disable=not is_main, dynamic_ncols=True,
               mininterval=2.0)  # fmt: skip
    # On CPUs the math attention kernel beats the flash one for these short sequences (64 tokens at 8x8):
    # 36 vs 32 img/s on the tutorial UNet in bf16, measured on the 2-core development machine.
    attention = (lambda: sdpa_kernel([SDPBackend.MATH])) if device.type == "cpu" else nullcontext
    model.train()
    stopped_early, signalled = False, False
    leave_at = step + t.stop_after if t.stop_after else total
    try:  # the bar and the prefetching loader end before any error is printed
        while step < total:
            # Accumulate gradients over grad_accum micro-batches; DDP syncs only on the last one.
            for _ in range(t.grad_accum):
                (epoch, batch), images, labels = next(loader)
                x0 = to_model_input(images, device, cfg.data.random_flip, generator)
                eps = torch.randn(x0.shape, device=device, generator=generator).contiguous(memory_format=memory_format)
                timesteps = noise.sample_timesteps(x0.shape[0], device, generator)
                classes = drop_labels(labels, num_classes, t.label_dropout, device, generator) if num_classes else None
                with accelerator.accumulate(model), attention():
                    pred = model(noise.add_noise(x0, eps, timesteps), timesteps, class_labels=classes).sample
                    loss = noise.loss(pred, x0, eps, timesteps)
                    accelerator.backward(loss)
                watchdog.add_loss(loss)

            # Update weights: one optimizer step on the accumulated gradients. Here, after the last micro-batch,
            # accelerate counts them as synced, so its optimizer (which skips steps between syncs) steps.
            # A NaN/inf gradient norm makes the step a no-op on the device (fused AdamW's found_inf, GradScaler's
            # own check under fp16), with no host sync; only an optimizer that cannot skip there syncs.
            for g in optimizer.param_groups:
                g["lr"] = o.lr * watchdog.recovery.lr_scale * lr_factor(step, o.warmup_steps, total, o.lr_schedule)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), o.grad_clip if o.grad_clip > 0 else math.inf)
            skipped = watchdog.check_step(grad_norm)
            skips_on_device = accelerator.scaler is not None or skip_optimizer_step(optimizer, skipped)
            if skips_on_device or not skipped.item():
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            # Update EMA (only here, on real optimizer steps; a skipped step leaves it as it is).
            ema.update(unet.parameters(), skipped=skipped)
            profiles.update(unet.parameters(), skipped=skipped)

            # Update state: one more optimizer step, and the next position to read.
            step += 1
            window_steps += 1
            bar.update(1)
            epoch, batch = (epoch, batch + 1) if batch + 1 < data.batches_per_epoch else (epoch + 1, 0)
            profiles.snapshot(step, total)  # the EMA profiles' snapshot, before a stop or a rollback can leave the step

            # Print status: the only host sync, every log_every steps; a stop request is counted there, on all ranks.
            if step % t.log_every == 0 or step == total:
                w = watchdog.read_window(stop.requested)  # the one collective: loss, gradient norm, skips, stop votes
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "loss": w.loss,
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": float(grad_norm),
                    "images_per_sec": window_steps * images_per_step / elapsed,
                    "epoch": step / steps_per_epoch,
                    "skipped_steps": w.skipped_steps,
                }
                tracker.log(metrics, step)
                bar.set_postfix(loss=f"{w.loss:.4f}", img_s=f"{metrics['images_per_sec']:.0f}")
                window_start, window_steps = time.perf_counter(), 0
                failure = watchdog.judge(window_first, step, w, checkpoint)
                window_first = step
                if failure:
                    stopped_early = True
                    break
                if is_main:
                    lock.refresh()
                if w.stop_votes > 0:
                    stopped_early = signalled = True
                    if is_main:
                        log.warning(
                            "stop requested (%s): writing a checkpoint at step %d",
                            stop.signal_name or "another rank",
                            step,
                        )
                    checkpoint()
                    break

            # Sample grid from the EMA weights, with fixed seeds.
            if is_main and t.sample_every and step % t.sample_every == 0 and step != total:
                grid(step)

            # Score the EMA weights (every process samples a share).
            if evaluator is not None and (step % t.eval_every == 0 or step == total):
                eval_start = time.perf_counter()
                score(step)
                window_start += time.perf_counter() - eval_start  # images_per_sec counts training only

            # Save network snapshot: the whole training state, to resume from.
            if step % t.checkpoint_every == 0 or step == total or step == leave_at:
                checkpoint()

            # Done with this launch at train.stop_after.
            if step == leave_at and step < total:
                stopped_early = True
                if is_main:
                    log.info(
                        "leaving at step %d of %d (train.stop_after=%d); rerun to resume", step, total, t.stop_after
                    )
                break
    finally:
        bar.close()
        loader.close()

    # Done: export the EMA weights as a DDPMPipeline (class-conditional: with its pipeline's code), and the final grid.
    export_dir = run_dir / "pipeline"
    if is_main and not stopped_early:
        ema.copy_to(sample_unet.parameters())
        export_pipeline(make_pipeline(sample_unet, scheduler, data.class_names), export_dir)
        final_grid = grid(step)
        (run_dir / "summary.json").write_text(
            json.dumps({"steps": step, "pipeline": str(export_dir), "grid": str(final_grid)}, indent=1)
        )
        log.info("exported %s; final grid %s", export_dir, final_grid)
    tracker.finish()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if failure:
        raise TrainingDiverged(failure)
    if signalled:
        raise RunStopped(
            f"stopped at step {step} of {total} on request ({stop.signal_name or 'signal on another rank'}); "
            "the checkpoint is saved, rerun to resume"
        )
    return None if stopped_early else export_dir
