"""Generate job: images from any pretrained diffusers pipeline (a Hub id or a local directory), with or without prompts.

    ddpm generate --model johnowhitaker/ddpm-butterflies-32px --num-images 16
    ddpm generate --model sd-dreambooth-library/mr-potato-head \\
        --prompt "an abstract oil painting of sks mr potato head by picasso" --steps 50 --guidance 7.5

Writes <out>/images/*.png (one per prompt and seed), grid.png (a row per prompt, the first 16 seeds) and settings.json.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ddpm.config import Precision
from ddpm.errors import UserError

log = logging.getLogger(__name__)


GRID_COLUMNS = 16  # seeds per prompt in grid.png (a grid of thousands of images would not fit in memory)


@dataclass
class GenerateConfig:
    model: str = ""  # Hub id (user/name) or local directory (pipeline, or a ddpm checkpoint)
    prompts: list[str] = field(default_factory=list)  # text-to-image only; each gets num_images images
    negative_prompt: str = ""  # text-to-image: what the images should not show
    steps: int = 50  # sampler steps
    guidance: float = 7.5  # classifier-free guidance scale (text-to-image)
    labels: tuple[str, ...] = ()  # class-conditional models: class ids or names over the images; () round robin
    guidance_scale: float = 1.0  # class-conditional models: classifier-free guidance (1: the conditional model)
    seed: int = 0  # image i of every prompt uses seed + i: prompts are compared on the same noise
    num_images: int = 4  # per prompt
    batch_size: int = 4  # images per pipeline call
    precision: Precision = field(default="auto", metadata={"aliases": ["--dtype"]})  # see ddpm.device
    scheduler: str = ""  # "" keeps the pipeline's own; else a name from ddpm.sampling.sample.SAMPLERS
    device: str = "auto"  # auto: CUDA if present, else the CPU
    out: str = ""  # "" is generated/<model>-<time>; an existing non-empty directory is refused

    def validate(self) -> None:
        from ddpm.sampling.sample import SAMPLERS

        if not self.model:
            raise UserError(
                "--model is required (a Hub id such as johnowhitaker/ddpm-butterflies-32px, or a local directory)"
            )
        for key in ("steps", "num_images", "batch_size"):
            if getattr(self, key) <= 0:
                raise UserError(f"--{key.replace('_', '-')} must be positive, got {getattr(self, key)}")
        if self.seed < 0:
            raise UserError(f"--seed must be non-negative, got {self.seed}")
        if self.scheduler and self.scheduler not in SAMPLERS:
            raise UserError(f"--scheduler: {self.scheduler!r} is not one of {', '.join(SAMPLERS)}")
        if any(not p.strip() for p in self.prompts):
            raise UserError("--prompt: an empty prompt")
        from ddpm.config import is_guidance_scale

        for flag, value in (("--guidance", self.guidance), ("--guidance-scale", self.guidance_scale)):
            if not is_guidance_scale(value):
                raise UserError(f"{flag} must be a non-negative number, got {value}")

    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", self.model.strip("/").replace("/", "--"))[-80:]
        return Path("generated") / f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}"


CONFIG = GenerateConfig


def run(cfg: GenerateConfig) -> Path:
    """Returns the output directory. DDPM pipelines run on the library's sampling loop, as `ddpm sample` does (it
    scales the initial noise and the model input for every scheduler); other pipelines through their own __call__."""
    import numpy as np
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from ddpm.device import resolve_placement
    from ddpm.files import writable_dir, write_json, writing
    from ddpm.models.export import CONDITIONAL_CLASS, class_names_of
    from ddpm.sampling.guidance import sampling_labels
    from ddpm.sampling.pretrained import generate_images, load_any_pipeline, pipeline_class, set_sampler, takes_prompt
    from ddpm.sampling.sample import generate, make_grid, sampler_settings

    cfg.validate()
    out = cfg.out_dir()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} already holds files; give a new directory (nothing there is overwritten)")
    placement = resolve_placement(cfg.device, cfg.precision)
    # DDPM pipelines run on ddpm.sampling.sample's loop as `ddpm sample` does: fp32 weights under autocast, so the same
    # seed gives the same image from either command. Other pipelines are loaded in the precision itself.
    found = pipeline_class(cfg.model)  # "" when the model cannot be read: loading says why, and no folder is made
    ddpm_loop = found in ("DDPMPipeline", CONDITIONAL_CLASS)
    if found:
        writable_dir(out, "the output folder")  # before loading the weights
    pipe = load_any_pipeline(cfg.model, "fp32" if ddpm_loop else placement.precision)
    text = takes_prompt(pipe)
    if text and not cfg.prompts:
        raise UserError(f"--model {cfg.model} is a text-to-image pipeline ({type(pipe).__name__}): give --prompt")
    if not text and cfg.prompts:
        raise UserError(f"--model {cfg.model} is unconditional ({type(pipe).__name__}): it takes no --prompt")
    if cfg.scheduler:
        set_sampler(pipe, cfg.scheduler)
    pipe = pipe.to(placement.device)
    pipe.set_progress_bar_config(leave=False, desc="denoising")
    seeds = list(range(cfg.seed, cfg.seed + cfg.num_images))
    labels = None
    if ddpm_loop:  # a label per seed for a class-conditional model; refused for an unconditional one
        labels = sampling_labels(pipe.unet, len(seeds), cfg.labels, class_names_of(pipe), cfg.guidance_scale)
    elif cfg.labels or cfg.guidance_scale != 1.0:
        raise UserError(f"--label/--guidance-scale: {type(pipe).__name__} is not a class-conditional DDPM pipeline")

    def images_of(prompt: str | None):
        if ddpm_loop:
            for start in range(0, len(seeds), cfg.batch_size):
                chunk = seeds[start : start + cfg.batch_size]
                made = generate(
                    pipe.unet,
                    pipe.scheduler,
                    chunk,
                    cfg.steps,
                    cfg.batch_size,
                    placement.device,
                    placement.autocast_dtype,
                    labels=None if labels is None else labels[start : start + cfg.batch_size],
                    guidance_scale=cfg.guidance_scale,
                )
                yield from zip(chunk, (Image.fromarray(im) for im in made))
        else:
            yield from generate_images(
                pipe, seeds, cfg.steps, cfg.batch_size, prompt, cfg.negative_prompt or None, cfg.guidance
            )

    with writing(("the output folder", out)):  # a disk that fills meanwhile: one line, the images so far kept
        writable_dir(out / "images", "the output folder")
        prompts: list[str | None] = list(cfg.prompts) if text else [None]
        written, grid_cells = [], []
        start = time.perf_counter()
        with tqdm(total=len(prompts) * len(seeds), desc=f"generating with {type(pipe).__name__}", unit="img") as bar:
            for j, prompt in enumerate(prompts):
                for seed, image in images_of(prompt):
                    name = f"p{j}-seed-{seed:06d}.png" if text else f"seed-{seed:06d}.png"
                    image.save(out / "images" / name)
                    written.append({"file": f"images/{name}", "prompt": prompt, "seed": seed})
                    if seed - cfg.seed < GRID_COLUMNS:  # the grid shows the first seeds; the rest stay on disk only
                        grid_cells.append(image.convert("RGB"))
                    bar.update(1)
        seconds = time.perf_counter() - start
        make_grid(
            np.stack([np.asarray(im) for im in grid_cells]), cols=min(len(seeds), GRID_COLUMNS) if text else 0
        ).save(out / "grid.png")
        write_json(
            out / "settings.json",
            {
                "model": cfg.model,
                "pipeline_class": type(pipe).__name__,
                "text_to_image": text,
                "scheduler": cfg.scheduler or "pipeline default",
                "scheduler_class": type(pipe.scheduler).__name__,
                "sampler": sampler_settings(pipe.scheduler),
                "steps": cfg.steps,
                "guidance": cfg.guidance if text else None,
                **({"labels": labels, "guidance_scale": cfg.guidance_scale} if labels is not None else {}),
                "prompts": cfg.prompts,
                "negative_prompt": cfg.negative_prompt or None,
                "seed": cfg.seed,
                "num_images": cfg.num_images,
                "batch_size": cfg.batch_size,
                "device": str(placement.device),
                "precision": placement.precision,
                "torch": torch.__version__,
                "seconds": round(seconds, 3),
                "seconds_per_image": round(seconds / len(written), 4),
                "grid": "grid.png",
                "images": written,
            },
        )
    log.info("wrote %d images to %s", len(written), out)
    print(f"images: {out / 'images'}\ngrid: {out / 'grid.png'}\nsettings: {out / 'settings.json'}")
    return out
