"""Sampling: reverse diffusion with any diffusers scheduler, for an unconditional or a class-conditional UNet.

Every image has its own generator seeded by its seed, so image k is the same whatever the batch
size, the device or the number of processes: that is what makes grids comparable across runs
and sweeps. Noise is drawn on the CPU and then moved, so a seed gives the same start on any device.
A class-conditional model takes a label per image and a guidance scale (ddpm.sampling.guidance): an image is a
function of its seed, its label and the scale only.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UNet2DModel,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from ddpm.errors import UserError
from ddpm.sampling.guidance import predict

# name -> (scheduler class, settings on top of the trained noise schedule)
SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "ddpm": (DDPMScheduler, {}),  # Ho et al. 2020, ancestral, ~1000 steps
    # Song et al. 2021, deterministic; "trailing" steps start at t = T (Lin et al. 2024, table 2): measured
    # better FD than "leading" here, and DDIM's x0 clipping keeps the first step stable on the cosine schedule.
    "ddim": (DDIMScheduler, {"timestep_spacing": "trailing"}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),  # Lu et al. 2022, multistep
    # Its stochastic twin (Lu et al. 2022, sec. 5; second order, diffusers' recommendation for the SDE variant):
    # fresh noise at every step corrects the model's own errors where the deterministic solvers carry them along.
    # The default (ddpm.config): on the default digits model, FD-digitsnet 4.5 and 2.9 at 10 and 25 steps against
    # DDPM-1000's 3.57, DDIM's 38.8 and 18.2, and real digits' 2.98 (1,000 images; docs/benchmarks.md). The "heun"
    # form of its second-order update scored lower than diffusers' default "midpoint" at 5, 10 and 25 steps on
    # both seeds (10.2 / 4.5 / 2.9 against 11.3 / 4.8 / 3.0); diffusers' docs: the form "slightly affects the
    # sample quality, especially for a small number of steps".
    "sde-dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}),
    "dpmsolver-singlestep": (DPMSolverSinglestepScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),  # Zhao et al. 2023
    "deis": (DEISMultistepScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),  # Karras et al. 2022, Algorithm 2 without churn
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),  # two model calls per step
    "lms": (LMSDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "kdpm2": (KDPM2DiscreteScheduler, {}),
    "kdpm2-ancestral": (KDPM2AncestralDiscreteScheduler, {}),
}


def make_sampler(name: str, trained: SchedulerMixin) -> SchedulerMixin:
    """A sampler of the given name on the noise schedule the model was trained with."""
    cls, extra = sampler_recipe(name, trained.config)
    return cls.from_config(trained.config, **extra)


def sampler_recipe(name: str, trained: dict) -> tuple[type[SchedulerMixin], dict]:
    """The scheduler class of `name` and the settings it takes on top of the trained scheduler's config `trained`
    (also what a model card tells plain diffusers users to pass)."""
    if name not in SAMPLERS:
        raise UserError(f"unknown scheduler {name!r}; choose one of {', '.join(SAMPLERS)}")
    cls, extra = SAMPLERS[name]
    accepts = inspect.signature(cls.__init__).parameters
    if trained.get("clip_sample", False) and "thresholding" in accepts and "clip_sample" not in accepts:
        # DDPM and DDIM clip their x0 estimate to [-1, 1]; the DPM-Solver family needs the same for pixel-space
        # models, or its first steps on a cosine schedule (alpha_bar ~ 1e-6 near t = T) amplify the error in the
        # noise estimate by 1/sqrt(alpha_bar). Thresholding with max value 1 is exactly that clip.
        extra = {"thresholding": True, "sample_max_value": trained.get("clip_sample_range", 1.0), **extra}
    if trained.get("beta_schedule") == "squaredcos_cap_v2":
        # The cosine schedule ends at alpha_bar(T) ~ 2e-9, sigma ~ 2e4: samplers that start at t = T (linspace
        # spacing, the sigma-space default) cannot recover from the first step's error there. "leading" starts
        # one stride below T, as DDPM/DDIM do; lambda_min_clipped is diffusers' documented DPM-Solver setting.
        extra = {"timestep_spacing": "leading", **extra}  # a sampler's own spacing (extra) wins
        if "lambda_min_clipped" in accepts:
            extra = {"lambda_min_clipped": -5.1, **extra}
    return cls, extra


# The scheduler settings that decide what a sampler computes: written to settings.json beside every grid, so a
# grid can be reproduced from its folder alone.
SETTINGS_THAT_MATTER = (
    "num_train_timesteps", "beta_schedule", "prediction_type", "timestep_spacing", "steps_offset",
    "algorithm_type", "solver_order", "solver_type", "lower_order_final", "final_sigmas_type",
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "thresholding", "sample_max_value",
    "clip_sample", "clip_sample_range", "lambda_min_clipped", "rescale_betas_zero_snr",
)  # fmt: skip


def sampler_settings(sampler: SchedulerMixin) -> dict:
    """The sampler's class and the settings of SETTINGS_THAT_MATTER it has."""
    config = dict(sampler.config)
    return {"class": type(sampler).__name__, **{k: config[k] for k in SETTINGS_THAT_MATTER if k in config}}


def compile_unet(unet: UNet2DModel, device: torch.device) -> torch.nn.Module:
    """The UNet under torch.compile for sampling. On CUDA with CUDA graphs ("reduce-overhead"): eager sampling of
    these small UNets is bound by kernel launches (the CPU spent 8x the GPU's time in a profile of the digits
    model at batch 256), and replaying a recorded graph removes them. Measured on an H200 at batch 256: 5.6x for
    the digits model, 3x for the tutorial UNet at 64 px, after 30-60 s of compilation (docs/benchmarks.md)."""
    return torch.compile(unet, mode="reduce-overhead" if device.type == "cuda" else "default")


@torch.no_grad()
def generate_batches(
    unet: UNet2DModel,
    sampler: SchedulerMixin,
    seeds: list[int],
    steps: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    labels: list[int] | None = None,
    guidance_scale: float = 1.0,
) -> Iterator[tuple[list[int], np.ndarray]]:
    """(seeds, images as (n, H, W, 3) uint8) per batch, so that a caller can write each batch and forget it:
    memory stays one batch deep whatever the number of images. A grey (one-channel) model's images come with three
    equal channels, so that grids, PNGs and metrics see one format. `labels`: the class of each seed's image, for a
    class-conditional model (None for an unconditional one), guided with `guidance_scale`."""
    device = torch.device(device)
    res, channels = unet.config.sample_size, unet.config.in_channels
    null = (unet.config.get("num_class_embeds") or 1) - 1  # the null class: the class embedding's last entry
    if labels is not None and len(labels) != len(seeds):
        raise ValueError(f"{len(labels)} labels for {len(seeds)} seeds")
    takes_generator = "generator" in inspect.signature(sampler.step).parameters
    bar = tqdm(
        total=len(seeds) * steps,
        desc=f"sampling {len(seeds)} images",
        unit="step",
        disable=not progress,
        mininterval=1.0,
    )
    try:  # closed when the caller stops early too (a write that failed): the bar ends before the error is shown
        for start in range(0, len(seeds), batch_size):
            chunk = seeds[start : start + batch_size]
            classes = None if labels is None else torch.tensor(labels[start : start + batch_size], device=device)
            generators = [torch.Generator("cpu").manual_seed(int(s)) for s in chunk]
            sampler.set_timesteps(steps, device=device)  # also resets multistep solvers' history
            x = randn_tensor((len(chunk), channels, res, res), generator=generators, device=device, dtype=torch.float32)
            x = x * sampler.init_noise_sigma
            for t in sampler.timesteps:
                model_in = sampler.scale_model_input(x, t)
                with torch.autocast(
                    device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
                ):
                    pred = predict(unet, model_in, t, classes, guidance_scale, null)
                kwargs = {"generator": generators} if takes_generator else {}
                x = sampler.step(pred.float(), t, x, **kwargs).prev_sample
                bar.update(len(chunk))
            images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            yield chunk, np.repeat(images, 3, axis=-1) if channels == 1 else images  # grey models: equal channels
    finally:
        bar.close()


def generate(
    unet: UNet2DModel,
    sampler: SchedulerMixin,
    seeds: list[int],
    steps: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    labels: list[int] | None = None,
    guidance_scale: float = 1.0,
) -> np.ndarray:
    """Images for the given seeds, as (N, H, W, 3) uint8, all in memory (see generate_batches to stream)."""
    batches = generate_batches(
        unet, sampler, seeds, steps, batch_size, device, autocast_dtype, progress, labels, guidance_scale
    )
    return np.concatenate([images for _, images in batches])


def make_grid(images: np.ndarray, min_cell: int = 64, pad: int = 2, cols: int = 0) -> Image.Image:
    """A grid (square-ish unless `cols` is given), each cell upscaled (nearest) to at least `min_cell` pixels so
    small images stay legible."""
    n, h, w, _ = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    scale = max(1, math.ceil(min_cell / max(h, w)))
    ch, cw = h * scale, w * scale
    grid = Image.new("RGB", (cols * (cw + pad) + pad, rows * (ch + pad) + pad), (255, 255, 255))
    for i, img in enumerate(images):
        cell = Image.fromarray(img).resize((cw, ch), Image.Resampling.NEAREST)
        grid.paste(cell, (pad + (i % cols) * (cw + pad), pad + (i // cols) * (ch + pad)))
    return grid


def class_grid(
    images: np.ndarray, labels: list[int], num_classes: int, min_cell: int = 64, pad: int = 2
) -> Image.Image:
    """A grid with a row per class (row c: the images of label c, in the order given), for a class-conditional
    model's samples."""
    rows = [[img for img, c in zip(images, labels) if c == k] for k in range(num_classes)]
    cols = max(len(r) for r in rows)
    blank = np.full_like(images[0], 255)
    cells = [r[j] if j < len(r) else blank for r in rows for j in range(cols)]
    return make_grid(np.stack(cells), min_cell, pad, cols=cols)


def save_images(images: np.ndarray, seeds: list[int], out_dir: Path, grid_images: int = 64) -> Path:
    """One PNG per image named by its seed, plus grid.png of the first `grid_images`; returns the grid's path."""
    write_pngs(images, seeds, out_dir / "images")
    grid_path = out_dir / "grid.png"
    make_grid(images[:grid_images]).save(grid_path)
    return grid_path


def write_pngs(images: np.ndarray, seeds: list[int], image_dir: Path) -> None:
    """One PNG per image, named by its seed."""
    image_dir.mkdir(parents=True, exist_ok=True)
    for img, seed in zip(images, seeds):
        Image.fromarray(img).save(image_dir / f"seed-{seed:06d}.png")
