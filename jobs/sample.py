"""Sample job: images and a grid from an exported pipeline, deterministic per seed."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from ddpm.errors import ConfigError, UserError

log = logging.getLogger(__name__)


@dataclass
class SampleConfig:
    pipeline: str = ""                 # a directory in the DDPMPipeline layout (runs/<name>/pipeline)
    scheduler: str = "ddim"            # sampler name; see ddpm.sample.SAMPLERS
    steps: int = 25                    # sampler steps
    num_images: int = 64
    seed: int = 0                      # image i uses seed + i
    batch_size: int = 64
    out: str = ""                      # output directory; "" means <pipeline>/../samples/<scheduler>-<steps>-seed<seed>
    device: str = "auto"               # auto: CUDA if present, else CPU
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA GPUs that have it, fp32 elsewhere

    def validate(self) -> None:
        from ddpm.sample import SAMPLERS

        if not self.pipeline:
            raise ConfigError("--pipeline is required (a directory written by ddpm train, e.g. runs/digits-16px/pipeline)")
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


def run(cfg: SampleConfig) -> Path:
    """Write PNGs named by seed, grid.png and settings.json; returns the output directory."""
    import torch
    from diffusers import DDPMPipeline

    from ddpm.sample import generate, make_sampler, save_images

    cfg.validate()
    path = Path(cfg.pipeline)
    if not (path / "model_index.json").is_file():
        raise UserError(f"--pipeline: {path} is not a pipeline directory (no model_index.json)")
    try:
        pipe = DDPMPipeline.from_pretrained(path)
    except Exception as e:  # diffusers raises several types for missing or mismatched files
        raise UserError(f"--pipeline: cannot load {path} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    except RuntimeError:
        raise UserError(f"--device: {cfg.device!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device}: no CUDA GPU is visible on this machine")
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    unet = pipe.unet.to(device).eval()
    sampler = make_sampler(cfg.scheduler, pipe.scheduler)
    seeds = list(range(cfg.seed, cfg.seed + cfg.num_images))
    images = generate(unet, sampler, seeds, cfg.steps, cfg.batch_size, device, autocast, progress=True)
    out = cfg.out_dir
    grid = save_images(images, seeds, out)
    (out / "settings.json").write_text(json.dumps({**asdict(cfg), "device": str(device), "precision": precision}, indent=1))
    log.info("wrote %d images and %s", len(images), grid)
    return out
