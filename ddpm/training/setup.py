"""The training loop's set-up, in EDM's order: the accelerator, the dataset, the networks, the optimizer, the resume,
then the tracker and the in-training evaluator. Each is called once, from the top of ddpm.training.loop._train."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list
from diffusers import UNet2DModel

from ddpm.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig, dump_yaml, to_dict
from ddpm.data.batches import BatchLoader, BatchOrder
from ddpm.data.cache import Processes, open_cache
from ddpm.data.shards import ShardLoader, ShardOrder, open_shards
from ddpm.device import resolve_placement
from ddpm.evaluation.evaluate import TrainingEvaluator
from ddpm.evaluation.metrics import METRICS
from ddpm.evaluation.scores import drop_training_scores_after, read_scores
from ddpm.files import write_json
from ddpm.models.phema import snapshot_dir
from ddpm.models.unet import build_unet
from ddpm.tracking import Tracker, run_metadata
from ddpm.training.communication import ddp_settings
from ddpm.training.ema import EMA, PowerEMAProfiles
from ddpm.training.state import TrainingState, restore_training_state

log = logging.getLogger(__name__)


def start_accelerator(t: TrainConfig) -> Accelerator:
    """accelerate on this process's device, with the precision resolved for it and the matmul settings for CUDA."""
    accelerator = Accelerator(
        # Without a GPU, accelerate only goes multi-process (gloo) when told it runs on CPUs.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        mixed_precision=resolve_placement(_local_device(), t.mixed_precision).accelerate_precision,
        gradient_accumulation_steps=t.grad_accum,
        # Ranks wait for each other while the data cache is built (and rank 0 lists the source): give them time
        # (cluster profiles set it).
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(minutes=float(os.environ.get("DDPM_DIST_TIMEOUT_MIN", "60")))),
            ddp_settings(),  # DDP's defaults, and why: its docstring
        ],
    )
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
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
    return accelerator


def _local_device() -> torch.device:
    """The device accelerate will pick for this process (the precision is resolved before accelerate starts)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class Data(NamedTuple):
    open_loader: Callable[[int, int], BatchLoader | ShardLoader]  # (epoch, batch): this rank's batches from there on
    batches_per_epoch: int  # per rank, the same on every rank
    images: int  # in the dataset
    class_names: list[str] | None = None  # class index -> name where the data is labelled (data.labels)
    labels_max: int = -1  # the largest label in the cache (-1: unknown before reading, as for shards)


def open_data(data: DataConfig, batch_size: int, seed: int, accelerator: Accelerator, run_dir: Path) -> Data:
    """A cache that every rank helps to build where it is missing (rank 0 alone checks the source), or shards
    streamed from the data's own folder."""
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    pin_memory = accelerator.device.type == "cuda"
    if data.source == "webdataset":
        shards = open_shards(data)
        if is_main and shards.class_names is not None:
            write_json(run_dir / "classes.json", {"class_names": shards.class_names})
        shard_order = ShardOrder(shards.counts, batch_size, seed, rank, world)
        return Data(
            lambda epoch, batch: ShardLoader(shards, shard_order, data, epoch, batch, pin_memory),
            shard_order.batches_per_epoch,
            len(shards),
            shards.class_names,
        )
    processes = Processes(rank, world, accelerator.wait_for_everyone, lambda v: broadcast_object_list([v])[0])
    cache = open_cache(data, show_progress=is_main, processes=processes)
    if is_main and cache.meta.get("skipped"):
        # data.on_bad_image=skip: which files this run trained without, beside its outputs
        write_json(
            run_dir / "skipped_images.json", {"count": len(cache.meta["skipped"]), "images": cache.meta["skipped"]}
        )
    if is_main and cache.class_names is not None:  # what the export and its model card call the classes
        write_json(run_dir / "classes.json", {"class_names": cache.class_names})
    order = BatchOrder(len(cache), batch_size, seed, rank, world)
    return Data(
        lambda epoch, batch: BatchLoader(cache, order, epoch, batch, pin_memory),
        order.batches_per_epoch,
        len(cache),
        cache.class_names,
        int(cache.labels.max()) if cache.labels is not None and len(cache.labels) else -1,
    )


def build_networks(
    model: ModelConfig,
    data: DataConfig,
    t: TrainConfig,
    seed: int,
    accelerator: Accelerator,
    memory_format: torch.memory_format,
    timesteps: int,
) -> tuple[UNet2DModel, UNet2DModel | None]:
    """The UNet to train, and the one the EMA weights are copied into for grids (main process) and evaluations
    (every process; None where neither runs). timesteps: the schedule's T, the size of a "learned" time embedding."""
    device = accelerator.device
    # Same seed on every rank, so every rank starts from the same weights.
    torch.manual_seed(seed)
    unet = build_unet(model, data.resolution, data.image_channels, timesteps)
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.to(device, memory_format=memory_format)
    needs_ema_unet = accelerator.is_main_process or t.eval_every > 0
    sample_unet = (
        build_unet(model, data.resolution, data.image_channels, timesteps).to(device).eval() if needs_ema_unet else None
    )
    # From here the global RNG (dropout) differs per rank, and is saved and restored with the checkpoints.
    torch.manual_seed(int(np.random.SeedSequence([seed, accelerator.process_index, 1]).generate_state(1)[0]))
    return unet, sample_unet


def setup_optimizer(
    unet: UNet2DModel, o: OptimConfig, compile: bool, accelerator: Accelerator
) -> tuple[torch.nn.Module, torch.optim.Optimizer, EMA]:
    """AdamW and the EMA of the weights it updates; the model to call (compiled, DDP-wrapped) and the optimizer come
    back prepared by accelerate."""
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=o.lr,
        betas=o.betas,
        eps=o.eps,
        weight_decay=o.weight_decay,
        fused=accelerator.device.type in ("cuda", "cpu"),
    )
    ema = EMA(unet.parameters(), max_decay=o.ema_decay, power=o.ema_power)
    model = torch.compile(unet) if compile else unet
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, ema


def setup_profiles(
    unet: UNet2DModel, o: OptimConfig, t: TrainConfig, run_dir: Path, accelerator: Accelerator, total: int
) -> PowerEMAProfiles:
    """Post-hoc EMA's power-function profiles (none when optim.ema_profiles is empty), their snapshots' disk cost
    said once at the start."""
    profiles = PowerEMAProfiles(
        unet.named_parameters(),
        o.ema_profiles,
        snapshot_dir(run_dir),
        t.ema_snapshot_every,
        t.ema_snapshot_dtype,
        accelerator.is_main_process,
    )
    cost = profiles.describe(sum(p.numel() for p in unet.parameters()), total)
    if cost and accelerator.is_main_process:
        log.info("%s", cost)
    return profiles


def resume(
    state: TrainingState, ckpt_dir: Path, o: OptimConfig, batch_size: int, accelerator: Accelerator
) -> dict[str, Any] | None:
    """Restore the newest complete checkpoint into `state`, if there is one; its position (step, epoch, batch), or
    None."""
    resumed = restore_training_state(
        ckpt_dir, state, rank=accelerator.process_index, world=accelerator.num_processes, batch_size=batch_size
    )
    if resumed:
        for g in state.optimizer.param_groups:  # the config of this launch wins over the checkpoint's hyperparameters
            g.update(betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    return resumed


def start_from_base(unet: UNet2DModel, ema: EMA, model: ModelConfig) -> None:
    """A run with model.init_from and no checkpoint to resume: the base's weights into the UNet, and the EMA
    starting from them (not from the random initialisation). Every rank loads the same weights."""
    from ddpm.errors import UserError
    from ddpm.models.base import load_base_weights

    weights = load_base_weights(model)
    params = dict(unet.named_parameters())
    if set(params) - set(weights) == {"class_embedding.weight"} and unet.config.num_class_embeds:
        # A class-conditional run from an unconditional base: the new class embedding starts at zero, so the
        # first step computes exactly what the base did (ddpm.models.unet.add_class_embedding).
        weights = {**weights, "class_embedding.weight": torch.zeros_like(params["class_embedding.weight"])}
    if set(weights) - set(unet.state_dict()) or set(params) - set(weights):
        raise UserError(f"model.init_from={model.init_from}: its weights do not fit the UNet of this config")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    ema.shadow = [p.detach().clone() for p in unet.parameters()]


def open_tracker(cfg: Config, accelerator: Accelerator, step: int, **run: Any) -> Tracker:
    """Record the resolved config next to the outputs; W&B gets it too, with this launch's `run` facts (total_steps,
    images_per_step, dataset_images)."""
    is_main = accelerator.is_main_process
    if is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.yaml").write_text(dump_yaml(cfg))
    run_info = {
        **to_dict(cfg),
        "run": {
            **run_metadata(),
            "world_size": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            **run,
        },
    }
    return Tracker(
        cfg.tracking, cfg.run_dir, cfg.run_name, run_info, group=cfg.run_name, enabled=is_main, resume_step=step
    )


def open_evaluator(
    data: DataConfig,
    t: TrainConfig,
    accelerator: Accelerator,
    tracker: Tracker,
    run_dir: Path,
    step: int,
    resumed: bool,
    total: int,
    class_names: list[str] | None = None,
) -> tuple[TrainingEvaluator | None, bool]:
    """The in-training evaluator (None when train.eval_every=0), and whether this launch owes a score for the step
    it starts at: a launch stopped at an evaluation step wrote its checkpoint before scoring it."""
    evaluator, owed = None, False
    if t.eval_every:
        evaluator = TrainingEvaluator(
            data, t.eval_images, t.eval_reference_images, t.eval_metric, accelerator, class_names
        )
        tracker.define_best([f"eval/{c}" for c in METRICS[evaluator.metric][:2]])
        if accelerator.is_main_process:
            drop_training_scores_after(run_dir, step)
            due = resumed and (step % t.eval_every == 0 or step == total)
            owed = due and not any(r["step"] == step and r.get("source") == "training" for r in read_scores(run_dir))
    return evaluator, bool(broadcast_object_list([owed])[0])
