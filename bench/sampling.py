"""The sampling stage: seconds per image and FD-digitsnet of each sampler on the same trained model."""

from __future__ import annotations

import time
from pathlib import Path

from bench.child import peak_memory

QUICK_RUNS = [("ddpm", 50), ("ddim", 10), ("dpmsolver++", 10)]
FULL_RUNS = [
    ("ddpm", 1000),
    ("ddim", 10),
    ("ddim", 25),
    ("dpmsolver++", 10),
    ("dpmsolver++", 25),
    ("sde-dpmsolver++", 10),
    ("sde-dpmsolver++", 25),
    ("sde-dpmsolver++", 50),
]
BATCH = 256  # images per row, sampled as one batch: the throughput figure of the issue, and enough for a rough FD


def quick_pipeline(workdir: Path) -> Path:
    """Quick mode without a trained model: a few steps of a tiny model are enough to run the path."""
    from ddpm.config import load_config
    from ddpm.training.loop import train

    cfg = load_config(
        None,
        [
            f"runs_dir={workdir}/runs",
            "name=bench-digits",
            f"data.cache_dir={workdir}/cache",
            "train.max_steps=4",
            "train.eval_every=0",
            "train.sample_images=1",
            "train.sample_steps=1",
            "tracking.wandb=false",
        ],
    )
    print(f"quick mode: no trained model; training {cfg.train.max_steps} steps of one in {cfg.run_dir}", flush=True)
    train(cfg)
    return workdir / "runs" / "bench-digits" / "pipeline"


def stage_sampling(pipeline: str, cache_dir: str, runs: list[tuple[str, int]], num_images: int) -> dict:
    """Each (sampler, steps) of `runs` on `num_images` seeds in one batch, timed after a warm-up, scored against the
    real digits; s/image and img/s are the throughput of `ddpm sample --batch-size num_images`."""
    import numpy as np
    import torch
    from diffusers import DDPMPipeline

    from ddpm.config import DEFAULT_SAMPLER, DEFAULT_STEPS, DataConfig
    from ddpm.data.cache import open_cache
    from ddpm.device import resolve_placement
    from ddpm.evaluation.metrics import digits_feature_net, fd_floor, features, frechet_distance
    from ddpm.sampling.sample import generate, make_sampler

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = DDPMPipeline.from_pretrained(pipeline)
    unet = pipe.unet.to(device).eval()
    res = unet.config.sample_size
    net = digits_feature_net(res, Path(cache_dir))
    real = open_cache(DataConfig(source="digits", resolution=res, cache_dir=cache_dir), show_progress=False)
    real_features = features(net, real.take(np.arange(len(real))))

    def row(name: str, steps: int, precision: str = "fp32") -> dict:
        """One timed run of `num_images` images in one batch, after a warm-up, with its FD."""
        autocast = resolve_placement(device, precision).autocast_dtype
        sampler = make_sampler(name, pipe.scheduler)
        generate(unet, sampler, [0], 2, 1, device, autocast)  # warm-up
        start = time.perf_counter()
        images = generate(unet, sampler, list(range(num_images)), steps, num_images, device, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        fd = frechet_distance(features(net, images), real_features)
        return {"sampler": name, "steps": steps, "precision": precision, "s_per_img": seconds / num_images, "fd": fd}

    rows = [row(name, steps) for name, steps in runs]
    # What precision "auto" (ddpm.device) buys in sampling: the default sampler in fp32 above, here in auto.
    auto = resolve_placement(device, "auto").precision
    if auto != "fp32":
        rows.append(row(DEFAULT_SAMPLER, DEFAULT_STEPS, auto))
    floor = fd_floor(real_features, num_images)  # what num_images real digits would score: the noise level
    return {"rows": rows, "num_images": num_images, "real_images": len(real), "floor": floor, **peak_memory()}
