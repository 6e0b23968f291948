"""The training stages: the tutorial's loop as written there, this project's trainer on the same images and UNet, and
the FLOPs of one training image."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from bench.child import peak_memory
from bench.data import tutorial_loader

TUTORIAL_MODEL = [
    "model.block_out_channels=[64,128,128,256]",
    "model.down_block_types=[DownBlock2D,DownBlock2D,AttnDownBlock2D,AttnDownBlock2D]",
    "model.up_block_types=[AttnUpBlock2D,AttnUpBlock2D,UpBlock2D,UpBlock2D]",
    "model.layers_per_block=2",
]


def stage_reference_train(
    folder: str, batch_size: int, windows: int, window_steps: int, warmup_steps: int, resolution: int = 32
) -> dict:
    """The tutorial's training loop, as written there (its UNet at `resolution`)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DModel

    # fmt: off
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    train_dataloader = tutorial_loader(Path(folder), resolution, batch_size)
    model = UNet2DModel(
        sample_size=resolution, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(64, 128, 128, 256),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ).to(device)
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4)
    losses, marks, step = [], [], 0
    total = warmup_steps + windows * window_steps
    while step < total:
        for batch in train_dataloader:
            if step == warmup_steps or (step > warmup_steps and (step - warmup_steps) % window_steps == 0):
                marks.append(time.perf_counter())
            if step == total:
                break
            clean_images = batch["images"].to(device)
            noise = torch.randn(clean_images.shape).to(clean_images.device)
            bs = clean_images.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bs,), device=clean_images.device).long()
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
            noise_pred = model(noisy_images, timesteps, return_dict=False)[0]
            loss = F.mse_loss(noise_pred, noise)
            loss.backward(loss)
            losses.append(loss.item())
            optimizer.step()
            optimizer.zero_grad()
            step += 1
    # fmt: on
    if len(marks) == windows:
        marks.append(time.perf_counter())
    rates = [window_steps * batch_size / (b - a) for a, b in zip(marks, marks[1:])]
    return {"img_s": statistics.median(rates), "windows": rates, **peak_memory()}


def stage_ddpm_train(
    folder: str,
    workdir: str,
    batch_size: int,
    windows: int,
    window_steps: int,
    warmup_steps: int,
    extra: list[str],
    resolution: int = 32,
) -> dict:
    """This project's trainer with its defaults, on the same images and UNet; figures from its own metrics."""
    import torch

    from ddpm.config import load_config
    from ddpm.device import resolve_placement
    from ddpm.training.loop import train

    name = f"bench-{resolution}px-b{batch_size}-" + (
        "-".join(e.replace("=", "_").replace(".", "_") for e in extra) or "defaults"
    )
    cfg = load_config(
        None,
        [
            f"name={name}",
            f"runs_dir={workdir}/runs",
            "data.source=folder",
            f"data.path={folder}",
            f"data.resolution={resolution}",
            "data.random_flip=true",
            f"data.cache_dir={workdir}/cache",
            *TUTORIAL_MODEL,
            f"train.batch_size={batch_size}",
            f"train.max_steps={warmup_steps + windows * window_steps}",
            f"train.log_every={window_steps}",
            "train.checkpoint_every=100000",
            "train.sample_every=0",
            "train.eval_every=0",  # the training step alone is timed
            "train.sample_images=1",
            "train.sample_steps=1",
            "tracking.wandb=false",
            "optim.warmup_steps=0",
            *extra,
        ],
    )
    # warm-up: the first window (compilation, allocator, caches) is not counted
    cfg.train.log_every = window_steps
    train(cfg)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    skip = warmup_steps // window_steps
    rates = [r["images_per_sec"] for r in rows[skip : skip + windows]]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_placement(device, cfg.train.mixed_precision).precision  # fp32, bf16 or fp16
    return {
        "img_s": statistics.median(rates),
        "windows": rates,
        "precision": precision,
        "flops_per_img": train_flops_per_image(cfg),
        **peak_memory(),
        "cuda": torch.cuda.is_available(),
    }


def train_flops_per_image(cfg) -> float:
    """Forward + backward FLOPs of one image through the UNet at the config's resolution, counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ddpm.models.unet import build_unet

    unet = build_unet(cfg.model, cfg.data.resolution, cfg.data.image_channels)
    x = torch.randn(2, cfg.data.image_channels, cfg.data.resolution, cfg.data.resolution)
    with FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([10, 500])).sample.sum().backward()
    return counter.get_total_flops() / 2
