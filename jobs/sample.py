"""Sample job: images and a grid from an exported pipeline or a checkpoint, deterministic per seed (and, for a
class-conditional model, per label and guidance scale)."""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from ddpm.config import DEFAULT_SAMPLER, DEFAULT_STEPS, Precision, is_guidance_scale
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
    labels: tuple[str, ...] = ()  # class-conditional models: class ids or names, repeated over the images; () round
    # robin over every class, and the grid has a row per class
    guidance_scale: float = 1.0  # class-conditional models: classifier-free guidance; 1 the conditional model alone,
    # 0 the unconditional one, above 1 guided (twice the model evaluations per step)
    out: str = ""  # output directory; "": <run>/samples/<scheduler>-<steps>steps-seed<seed> for a run's pipeline,
    # <run>/samples/<model>-<scheduler>-... for a checkpoint, a post-hoc EMA export or any other pipeline folder
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
        if not is_guidance_scale(self.guidance_scale):
            raise ConfigError(f"--guidance-scale must be a non-negative number, got {self.guidance_scale}")

    @property
    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        name = f"{self.scheduler}-{self.steps}steps-seed{self.seed}"
        name += f"-cfg{self.guidance_scale:g}" if self.guidance_scale != 1.0 else ""
        name += f"-labels-{'_'.join(self.labels)}"[:80] if self.labels else ""
        from ddpm.models.export import run_dir_of

        model = Path(self.pipeline).resolve()
        if model.name != "pipeline":  # two checkpoints (or two exports side by side) must not share a folder
            name = f"{model.name}-{name}"
        return run_dir_of(model) / "samples" / name


CONFIG = SampleConfig
GRID_IMAGES = 64  # grid.png shows the first 64 images (a grid of 50,000 would be gigabytes)


def stale_images(out: Path, seeds: list[int]) -> list[Path]:
    """The images an earlier `ddpm sample` left in `out` (it wrote settings.json) under seeds this one does not
    write, which would otherwise sit beside this run's as if they were its own; the seeds it writes are overwritten.
    A folder that ddpm sample did not write is never cleared."""
    if not (out / "settings.json").is_file():
        return []
    keep = {f"seed-{s:06d}.png" for s in seeds}
    return [p for p in sorted((out / "images").glob("seed-*.png")) if p.name not in keep]


def run(cfg: SampleConfig) -> Path:
    """Write PNGs named by seed, grid.png and settings.json; returns the output directory."""
    import numpy as np

    from ddpm.device import resolve_placement
    from ddpm.files import writable_dir, writing
    from ddpm.models.export import class_names_of, load_pipeline
    from ddpm.models.unet import num_classes_of
    from ddpm.sampling.guidance import sampling_labels
    from ddpm.sampling.sample import (
        class_grid,
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
    names = class_names_of(pipe)
    labels = sampling_labels(unet, len(seeds), cfg.labels, names, cfg.guidance_scale)
    model = compile_unet(unet, placement.device) if cfg.compile else unet
    batches = generate_batches(
        model, sampler, seeds, cfg.steps, cfg.batch_size, placement.device, placement.autocast_dtype, True, labels,
        cfg.guidance_scale,
    )  # fmt: skip
    first: list[np.ndarray] = []  # the grid's images; the rest go to disk batch by batch (50,000 images fit)
    with writing(("the sample folder", out)), contextlib.closing(batches):
        replaced = stale_images(out, seeds)
        if replaced:
            log.info("replacing the %d images of an earlier ddpm sample in %s", len(replaced), out)
            for path in replaced:
                path.unlink()
        out.mkdir(parents=True, exist_ok=True)
        # Until the last image is written the folder says it is incomplete (an interrupted run leaves it so).
        (out / "settings.json").write_text(json.dumps({**asdict(cfg), "complete": False}, indent=1))
        for chunk, images in batches:
            write_pngs(images, chunk, out / "images")
            first += list(images[: GRID_IMAGES - len(first)])
        if labels is None:
            make_grid(np.stack(first)).save(out / "grid.png")
        else:  # a row per class
            class_grid(np.stack(first), labels[: len(first)], num_classes_of(unet)).save(out / "grid.png")
        settings = {
            **asdict(cfg),
            **({"image_labels": labels, "class_names": names} if labels is not None else {}),
            "device": str(placement.device),
            "precision": placement.precision,
            "sampler": sampler_settings(sampler),
            "complete": True,
        }
        (out / "settings.json").write_text(json.dumps(settings, indent=1))
    log.info("wrote %d images and %s", len(seeds), out / "grid.png")
    print(f"images: {out / 'images'}\ngrid: {out / 'grid.png'}")
    return out
