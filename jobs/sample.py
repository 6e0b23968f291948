"""Sample job: images and a grid from an exported pipeline or a checkpoint, deterministic per seed."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from ddpm.config import DEFAULT_SAMPLER, DEFAULT_STEPS, Precision
from ddpm.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class SampleConfig:
    pipeline: str = ""  # a pipeline directory (runs/<name>/pipeline) or a checkpoint (runs/<name>/checkpoints/step-N)
    scheduler: str = DEFAULT_SAMPLER  # sampler name; see ddpm.sampling.sample.SAMPLERS
    steps: int = DEFAULT_STEPS  # sampler steps
    num_images: int = 64  # images to write
    seed: int = 0  # image i uses seed + i
    batch_size: int = 64  # images per forward pass
    out: str = ""  # output directory; "" means <pipeline>/../samples/<scheduler>-<steps>steps-seed<seed>
    device: str = "auto"  # auto: CUDA if present, else the CPU
    precision: Precision = "auto"  # see ddpm.device.resolve_placement
    compile: bool = False  # torch.compile the UNet (CUDA graphs on a GPU): 3-5x faster, after 30-60 s of compiling

    def validate(self) -> None:
        from ddpm.sampling.sample import SAMPLERS

        if not self.pipeline:
            raise ConfigError(
                "--pipeline is required (a directory written by ddpm train, e.g. runs/digits-16px/pipeline)"
            )
        if self.scheduler not in SAMPLERS:
            raise ConfigError(f"--scheduler: {self.scheduler!r} is not one of {', '.join(SAMPLERS)}")
        for key in ("steps", "num_images", "batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be positive, got {getattr(self, key)}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be non-negative, got {self.seed}")

    @property
    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        return Path(self.pipeline).resolve().parent / "samples" / f"{self.scheduler}-{self.steps}steps-seed{self.seed}"


CONFIG = SampleConfig
GRID_IMAGES = 64  # grid.png shows the first 64 images (a grid of 50,000 would be gigabytes)


def run(cfg: SampleConfig) -> Path:
    """Write PNGs named by seed, grid.png and settings.json; returns the output directory."""
    import numpy as np

    from ddpm.device import resolve_placement
    from ddpm.files import writable_dir, writing
    from ddpm.models.export import load_pipeline
    from ddpm.sampling.sample import (
        compile_unet,
        generate_batches,
        make_grid,
        make_sampler,
        sampler_settings,
        write_pngs,
    )

    cfg.validate()
    out = cfg.out_dir
    if any((Path(cfg.pipeline) / f).is_file() for f in ("model_index.json", "manifest.json")):
        writable_dir(out, "the sample folder")  # before loading: a path that is not a model has no sample folder
    pipe = load_pipeline(cfg.pipeline)
    placement = resolve_placement(cfg.device, cfg.precision)
    unet = pipe.unet.to(placement.device).eval()
    sampler = make_sampler(cfg.scheduler, pipe.scheduler)
    seeds = list(range(cfg.seed, cfg.seed + cfg.num_images))
    model = compile_unet(unet, placement.device) if cfg.compile else unet
    batches = generate_batches(
        model, sampler, seeds, cfg.steps, cfg.batch_size, placement.device, placement.autocast_dtype, progress=True
    )
    first: list[np.ndarray] = []  # the grid's images; the rest go to disk batch by batch (50,000 images fit)
    with writing(("the sample folder", out)), contextlib.closing(batches):
        for chunk, images in batches:
            write_pngs(images, chunk, out / "images")
            first += list(images[: GRID_IMAGES - len(first)])
        make_grid(np.stack(first)).save(out / "grid.png")
        settings = {
            **asdict(cfg),
            "device": str(placement.device),
            "precision": placement.precision,
            "sampler": sampler_settings(sampler),
        }
        (out / "settings.json").write_text(json.dumps(settings, indent=1))
    log.info("wrote %d images and %s", len(seeds), out / "grid.png")
    print(f"images: {out / 'images'}\ngrid: {out / 'grid.png'}")
    return out
