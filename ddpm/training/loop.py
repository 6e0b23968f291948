"""The training loop: one function, on accelerate, the same for one CPU process and many GPU ranks.

Long because the loop is one function read top to bottom in EDM's phases (data, model, resume, then per step:
accumulate, EMA, log, sample, checkpoint; then export): splitting it would hide the order that makes it right.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list
from diffusers import DDPMPipeline
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ddpm.config import Config, dump_yaml, to_dict
from ddpm.data.batches import BatchLoader, BatchOrder, to_model_input
from ddpm.data.cache import Processes, open_cache
from ddpm.data.shards import ShardLoader, ShardOrder, open_shards
from ddpm.device import resolve_placement
from ddpm.errors import RunStopped
from ddpm.evaluation.evaluate import TrainingEvaluator
from ddpm.evaluation.metrics import METRICS
from ddpm.evaluation.scores import append_score, drop_training_scores_after, read_scores
from ddpm.files import write_json
from ddpm.models.export import export_pipeline
from ddpm.models.schedule import NoiseProcess, build_scheduler
from ddpm.models.unet import architecture, build_unet
from ddpm.sampling.sample import generate, make_grid, make_sampler
from ddpm.tracking import Tracker, run_metadata
from ddpm.training.ema import EMA
from ddpm.training.lock import RunLock
from ddpm.training.state import TrainingState, restore_training_state, save_training_state

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
    clean exit."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def install(self) -> None:
        self._previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
        }

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.requested, self.signal_name = True, signal.Signals(signum).name


def _local_device() -> torch.device:
    """The device accelerate will pick for this process (the precision is resolved before accelerate starts)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def train(cfg: Config) -> Path | None:
    """Train (or resume) the run `cfg.run_dir`; returns the exported pipeline's directory, or None
    when the launch ended early at `train.stop_after` (with a checkpoint to resume from)."""
    run_dir, t = cfg.run_dir, cfg.train
    accelerator = Accelerator(
        # Without a GPU, accelerate only goes multi-process (gloo) when told it runs on CPUs.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        mixed_precision=resolve_placement(_local_device(), t.mixed_precision).accelerate_precision,
        gradient_accumulation_steps=t.grad_accum,
        # Ranks wait for each other while the data cache is built (and rank 0 lists the source): give them time
        # (cluster profiles set it).
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(minutes=float(os.environ.get("DDPM_DIST_TIMEOUT_MIN", "60"))))
        ],
    )
    device, rank, world, is_main = (
        accelerator.device,
        accelerator.process_index,
        accelerator.num_processes,
        accelerator.is_main_process,
    )
    if world > 1:  # every rank says where it landed: the first thing to read when a multi-node job misbehaves
        print(
            f"rank {rank} of {world} on {socket.gethostname()}: device {device}, "
            f"local rank {accelerator.local_process_index}",
            flush=True,
        )
    if device.type == "cuda":
        # TF32 for what runs outside autocast (cuDNN convolutions use TF32 by default).
        torch.set_float32_matmul_precision("high")
        # Every training batch has the same shape, so cuDNN's one-off search for the fastest convolution
        # algorithm per shape pays back from the first epoch on.
        torch.backends.cudnn.benchmark = True
    lock = RunLock(run_dir)
    if is_main:
        lock.acquire()
    accelerator.wait_for_everyone()
    stop = StopRequest()
    stop.install()
    try:
        return _train(cfg, accelerator, lock, stop)
    finally:
        stop.uninstall()
        if is_main:
            lock.release()


def _train(cfg: Config, accelerator: Accelerator, lock: RunLock, stop: StopRequest) -> Path | None:
    run_dir, t, o = cfg.run_dir, cfg.train, cfg.optim
    device, rank, world, is_main = (
        accelerator.device,
        accelerator.process_index,
        accelerator.num_processes,
        accelerator.is_main_process,
    )

    # Data: a cache that every rank helps to build where it is missing (rank 0 alone checks the source), or shards
    # streamed from the data's own folder.
    pin_memory = device.type == "cuda"
    if cfg.data.source == "webdataset":
        shards = open_shards(cfg.data)
        order = ShardOrder(shards.counts, t.batch_size, cfg.seed, rank, world)
        dataset_images = len(shards)

        def open_loader(epoch: int, batch: int) -> ShardLoader:
            return ShardLoader(shards, order, cfg.data, epoch, batch, pin_memory)

    else:
        processes = Processes(rank, world, accelerator.wait_for_everyone, lambda v: broadcast_object_list([v])[0])
        cache = open_cache(cfg.data, show_progress=is_main, processes=processes)
        if is_main and cache.meta.get("skipped"):
            # data.on_bad_image=skip: which files this run trained without, beside its outputs
            write_json(
                run_dir / "skipped_images.json", {"count": len(cache.meta["skipped"]), "images": cache.meta["skipped"]}
            )
        order = BatchOrder(len(cache), t.batch_size, cfg.seed, rank, world)
        dataset_images = len(cache)

        def open_loader(epoch: int, batch: int) -> BatchLoader:
            return BatchLoader(cache, order, epoch, batch, pin_memory)

    if is_main:
        lock.refresh()  # the cache build can take long: show other hosts that this run is alive
    steps_per_epoch = order.batches_per_epoch / t.grad_accum  # optimizer steps run on across epoch boundaries
    total = t.max_steps or max(1, t.epochs * order.batches_per_epoch // t.grad_accum)
    images_per_step = t.batch_size * t.grad_accum * world  # e.g. 64 x 1 x 1 = 64 images per optimizer step

    # Model, noise, optimizer, EMA. Same seed on every rank, so every rank starts from the same weights.
    torch.manual_seed(cfg.seed)
    unet = build_unet(cfg.model, cfg.data.resolution, cfg.data.image_channels)
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format  # see to_model_input
    unet.to(device, memory_format=memory_format)
    scheduler = build_scheduler(cfg.schedule)
    noise = NoiseProcess(scheduler, device)
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=o.lr,
        betas=o.betas,
        eps=o.eps,
        weight_decay=o.weight_decay,
        fused=device.type in ("cuda", "cpu"),
    )
    ema = EMA(unet.parameters(), max_decay=o.ema_decay, power=o.ema_power)
    generator = torch.Generator(device).manual_seed(int(np.random.SeedSequence([cfg.seed, rank]).generate_state(1)[0]))
    channels = cfg.data.image_channels
    # The EMA weights are copied into this UNet for grids (main process) and evaluations (every process).
    needs_ema_unet = is_main or t.eval_every > 0
    sample_unet = build_unet(cfg.model, cfg.data.resolution, channels).to(device).eval() if needs_ema_unet else None
    # From here the global RNG (dropout) differs per rank, and is saved and restored with the checkpoints.
    torch.manual_seed(int(np.random.SeedSequence([cfg.seed, rank, 1]).generate_state(1)[0]))
    model = torch.compile(unet) if t.compile else unet
    model, optimizer = accelerator.prepare(model, optimizer)

    # Resume from the newest complete checkpoint, if there is one.
    ckpt_dir = run_dir / "checkpoints"
    state = TrainingState(unet, ema, optimizer, accelerator.scaler, generator, architecture(unet))
    resumed = restore_training_state(ckpt_dir, state, rank=rank, world=world, batch_size=t.batch_size)
    step, epoch, batch = (resumed["step"], resumed["epoch"], resumed["batch"]) if resumed else (0, 0, 0)
    if resumed:
        for g in optimizer.param_groups:  # the config of this launch wins over the checkpoint's hyperparameters
            g.update(betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        if is_main:
            log.info("resuming %s from %s (step %d of %d)", run_dir, resumed["path"].name, step, total)

    # Record the resolved config next to the outputs; W&B gets it too.
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    run_info = {
        **to_dict(cfg),
        "run": {
            **run_metadata(),
            "world_size": world,
            "mixed_precision": accelerator.mixed_precision,
            "total_steps": total,
            "images_per_step": images_per_step,
            "dataset_images": dataset_images,
        },
    }
    tracker = Tracker(
        cfg.tracking, run_dir, cfg.run_name, run_info, group=cfg.run_name, enabled=is_main, resume_step=step
    )
    sampler = make_sampler(t.sample_scheduler, scheduler)
    autocast_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else None
    evaluator = None
    if t.eval_every:
        evaluator = TrainingEvaluator(cfg.data, t.eval_images, t.eval_reference_images, t.eval_metric, accelerator)
        tracker.define_best([f"eval/{c}" for c in METRICS[evaluator.metric][:2]])
    owed = False  # a launch stopped at an evaluation step wrote its checkpoint before scoring it
    if evaluator is not None and is_main:
        drop_training_scores_after(run_dir, step)
        due = resumed and (step % t.eval_every == 0 or step == total)
        owed = due and not any(r["step"] == step and r.get("source") == "training" for r in read_scores(run_dir))
    owed = bool(broadcast_object_list([owed])[0])

    def sample_grid(tag: str) -> Path:
        """A grid from the EMA weights with seeds 0..n-1, the same noise in every run."""
        ema.copy_to(sample_unet.parameters())
        images = generate(
            sample_unet,
            sampler,
            list(range(t.sample_images)),
            t.sample_steps,
            batch_size=64,
            device=device,
            autocast_dtype=autocast_dtype,
        )
        path = run_dir / "samples" / f"{tag}.png"
        path.parent.mkdir(exist_ok=True)
        make_grid(images).save(path)
        tracker.log_image(
            "samples",
            path,
            step,
            caption=f"EMA, {t.sample_scheduler} {t.sample_steps} steps, seeds 0-{t.sample_images - 1}",
        )
        return path

    def evaluate() -> None:
        """Score the EMA weights on every process; the main process logs the score and keeps it in scores.jsonl."""
        ema.copy_to(sample_unet.parameters())
        scores = evaluator(sample_unet, sampler, t.sample_steps, t.batch_size, autocast_dtype)
        if scores is None:
            return
        fd, kd = METRICS[scores["metric"]][:2]
        tracker.log({f"eval/{fd}": scores[fd], f"eval/{kd}": scores[kd], "eval/seconds": scores["seconds"]}, step)
        # The EMA at this step has no fingerprint of its own (the checkpoint, if any, is written after): the step
        # and the run directory name it.
        append_score(
            run_dir,
            {**scores, "step": step, "model_fingerprint": "", "scheduler": t.sample_scheduler,
             "steps": t.sample_steps, "seed": 0, "source": "training"},
        )  # fmt: skip
        log.info("step %d: %s %.4g (%d images, %.1f s)", step, fd, scores[fd], scores["num_images"], scores["seconds"])

    def checkpoint() -> None:
        position = {"step": step, "epoch": epoch, "batch": batch, "batch_size": t.batch_size, "seed": cfg.seed}
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
        evaluate()
    loader = open_loader(epoch, batch)
    loss_sum = torch.zeros((), device=device)
    grad_norm = torch.zeros((), device=device)
    window_start, window_steps = time.perf_counter(), 0
    bar = tqdm(
        total=total,
        initial=step,
        desc=cfg.run_name,
        unit="step",
        disable=not is_main,
        dynamic_ncols=True,
        mininterval=2.0,
    )
    # On CPUs the math attention kernel beats the flash one for these short sequences (64 tokens at 8x8):
    # 36 vs 32 img/s on the tutorial UNet in bf16, measured on the 2-core development machine.
    attention = (lambda: sdpa_kernel([SDPBackend.MATH])) if device.type == "cpu" else nullcontext
    model.train()
    stopped_early, signalled = False, False
    leave_at = step + t.stop_after if t.stop_after else total
    try:  # the bar and the prefetching loader end before any error is printed
        while step < total:
            # Accumulate gradients over grad_accum micro-batches; DDP syncs only on the last one.
            for g in optimizer.param_groups:
                g["lr"] = o.lr * lr_factor(step, o.warmup_steps, total, o.lr_schedule)
            for _ in range(t.grad_accum):
                (epoch, batch), images = next(loader)
                x0 = to_model_input(images, device, cfg.data.random_flip, generator)
                eps = torch.randn(x0.shape, device=device, generator=generator).contiguous(memory_format=memory_format)
                timesteps = noise.sample_timesteps(x0.shape[0], device, generator)
                with accelerator.accumulate(model), attention():
                    pred = model(noise.add_noise(x0, eps, timesteps), timesteps).sample
                    loss = F.mse_loss(pred.float(), noise.target(x0, eps, timesteps))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and o.grad_clip > 0:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), o.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
            step += 1
            window_steps += 1
            # the next position to read
            epoch, batch = (epoch, batch + 1) if batch + 1 < order.batches_per_epoch else (epoch + 1, 0)

            # Update EMA (only here, on real optimizer steps).
            ema.update(unet.parameters())
            bar.update(1)

            # Log: the only host sync, every log_every steps.
            if step % t.log_every == 0 or step == total:
                mean_loss = accelerator.reduce(loss_sum, "mean").item() / (window_steps * t.grad_accum)
                stop_votes = accelerator.reduce(torch.tensor(float(stop.requested), device=device), "sum").item()
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "loss": mean_loss,
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": float(grad_norm),
                    "images_per_sec": window_steps * images_per_step / elapsed,
                    "epoch": step / steps_per_epoch,
                }
                tracker.log(metrics, step)
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{metrics['images_per_sec']:.0f}")
                loss_sum.zero_()
                window_start, window_steps = time.perf_counter(), 0
                if is_main:
                    lock.refresh()
                if stop_votes > 0:
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
                sample_grid(f"step-{step:08d}")

            # Score the EMA weights (every process samples a share).
            if evaluator is not None and (step % t.eval_every == 0 or step == total):
                eval_start = time.perf_counter()
                evaluate()
                window_start += time.perf_counter() - eval_start  # images_per_sec counts training only

            # Save a checkpoint.
            if step % t.checkpoint_every == 0 or step == total or step == leave_at:
                checkpoint()
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

    # Export the EMA weights as a DDPMPipeline, and the final grid.
    export_dir = run_dir / "pipeline"
    if is_main and not stopped_early:
        ema.copy_to(sample_unet.parameters())
        export_pipeline(DDPMPipeline(unet=sample_unet, scheduler=scheduler), export_dir)
        grid = sample_grid(f"step-{step:08d}")
        (run_dir / "summary.json").write_text(
            json.dumps({"steps": step, "pipeline": str(export_dir), "grid": str(grid)}, indent=1)
        )
        log.info("exported %s; final grid %s", export_dir, grid)
    tracker.finish()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if signalled:
        raise RunStopped(
            f"stopped at step {step} of {total} on request ({stop.signal_name or 'signal on another rank'}); "
            "the checkpoint is saved, rerun to resume"
        )
    return None if stopped_early else export_dir
