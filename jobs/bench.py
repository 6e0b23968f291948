"""Benchmark job: this project's trainer, data path and samplers against the tutorial's way, side by side.

Every figure is a ratio measured in one run, because the machines are shared and noisy:
- training: images/s of ddpm.train (its defaults) against the tutorial's loop (torchvision
  transforms per image in a DataLoader, fp32, loss.item() every step, plain AdamW), on the
  tutorial's UNet at 32 px; median of timed windows after warm-up;
- data: images/s of the cached uint8 path against the per-image PIL path;
- sampling: seconds per image of DDPM 1000 steps against the fast samplers on the same trained
  model, with FD-digitsnet (ddpm.evaluate) on the same number of images beside each;
- peak memory of each stage (RSS on CPU, max allocated on GPU): each stage runs in its own child process.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

TUTORIAL_MODEL = [
    "model.block_out_channels=[64,128,128,256]",
    "model.down_block_types=[DownBlock2D,DownBlock2D,AttnDownBlock2D,AttnDownBlock2D]",
    "model.up_block_types=[AttnUpBlock2D,AttnUpBlock2D,UpBlock2D,UpBlock2D]",
    "model.layers_per_block=2",
]


@dataclass
class BenchConfig:
    quick: bool = False                # CI mode: tiny sizes, checks that everything runs, no speed claims
    pipeline: str = "runs/digits-16px/pipeline"  # trained digits model for the sampling figures
    out: str = ""                      # markdown file to append the results to ("" = print only)
    workdir: str = ""                  # scratch space; "" = a temporary directory
    ablation: bool = False             # instead: the training step one change at a time (the table behind the defaults)
    compile: bool = False              # with ablation: also time torch.compile (minutes of compilation on a CPU)


# --------------------------------------------------------------------------------------
# Stages; each runs in a child process and returns its figures plus its peak memory.


def _peak_memory() -> dict:
    import torch

    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _make_images(folder: Path, count: int, size: int = 256) -> None:
    """Photo-sized JPEGs (smooth random colour fields) so decoding costs what real files cost."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)


def _tutorial_loader(folder: Path, resolution: int, batch_size: int):
    """The tutorial's data path: PIL + torchvision transforms per image in a DataLoader."""
    import torch
    from PIL import Image
    from torchvision import transforms

    preprocess = transforms.Compose([
        transforms.Resize((resolution, resolution)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])
    files = sorted(folder.glob("*.jpg"))

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return {"images": preprocess(Image.open(files[i]).convert("RGB"))}

    return torch.utils.data.DataLoader(Images(), batch_size=batch_size, shuffle=True)


def stage_data(folder: str, resolution: int, batch_size: int, batches: int) -> dict:
    import torch

    from ddpm.config import DataConfig
    from ddpm.data import BatchLoader, BatchOrder, open_cache, to_model_input

    loader = _tutorial_loader(Path(folder), resolution, batch_size)
    start, seen = time.perf_counter(), 0
    while seen < batches * batch_size:
        for batch in loader:
            seen += batch["images"].shape[0]
            if seen >= batches * batch_size:
                break
    pil = seen / (time.perf_counter() - start)

    cfg = DataConfig(source="folder", path=folder, resolution=resolution, random_flip=True,
                     cache_dir=str(Path(folder).parent / "cache"))
    start = time.perf_counter()
    cache = open_cache(cfg, show_progress=False)
    build_s = time.perf_counter() - start
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device).manual_seed(0)
    order = BatchOrder(len(cache), batch_size, seed=0)
    reader = BatchLoader(cache, order, 0, 0, pin_memory=device.type == "cuda")
    for _ in range(5):  # warm-up: thread start, first torch ops
        to_model_input(next(reader)[1], device, True, generator)
    start = time.perf_counter()
    for _ in range(batches * 10):
        _, images = next(reader)
        x = to_model_input(images, device, True, generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    cached = batches * 10 * batch_size / (time.perf_counter() - start)
    reader.close()
    return {"pil_img_s": pil, "cached_img_s": cached, "cache_build_s": build_s, "images": len(cache), **_peak_memory()}


def stage_reference_train(folder: str, batch_size: int, windows: int, window_steps: int, warmup_steps: int) -> dict:
    """The tutorial's training loop, as written there."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    train_dataloader = _tutorial_loader(Path(folder), 32, batch_size)
    model = UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(64, 128, 128, 256),
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
    if len(marks) == windows:
        marks.append(time.perf_counter())
    rates = [window_steps * batch_size / (b - a) for a, b in zip(marks, marks[1:])]
    return {"img_s": statistics.median(rates), "windows": rates, **_peak_memory()}


def stage_ddpm_train(folder: str, workdir: str, batch_size: int, windows: int, window_steps: int, warmup_steps: int,
                     extra: list[str]) -> dict:
    """This project's trainer with its defaults, on the same images and UNet; figures from its own metrics."""
    import torch

    from ddpm.config import load_config
    from ddpm.train import resolve_precision, train

    name = "bench-" + ("-".join(e.replace("=", "_").replace(".", "_") for e in extra) or "defaults")
    cfg = load_config(None, [
        f"name={name}", f"runs_dir={workdir}/runs", "data.source=folder", f"data.path={folder}", "data.resolution=32",
        "data.random_flip=true", f"data.cache_dir={workdir}/cache", *TUTORIAL_MODEL,
        f"train.batch_size={batch_size}", f"train.max_steps={warmup_steps + windows * window_steps}",
        f"train.log_every={window_steps}", "train.checkpoint_every=100000", "train.sample_every=0",
        "train.sample_images=1", "train.sample_steps=1", "tracking.wandb=false", "optim.warmup_steps=0", *extra,
    ])
    # warm-up: the first window (compilation, allocator, caches) is not counted
    cfg.train.log_every = window_steps
    train(cfg)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    skip = warmup_steps // window_steps
    rates = [r["images_per_sec"] for r in rows[skip:skip + windows]]
    precision = resolve_precision(cfg.train.mixed_precision)
    return {"img_s": statistics.median(rates), "windows": rates, "precision": "fp32" if precision == "no" else precision,
            "flops_per_img": _train_flops_per_image(cfg), **_peak_memory(), "cuda": torch.cuda.is_available()}


def _train_flops_per_image(cfg) -> float:
    """Forward + backward FLOPs of one 32 px image through the UNet, counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ddpm.model import build_unet

    unet = build_unet(cfg.model, cfg.data.resolution)
    x = torch.randn(2, 3, cfg.data.resolution, cfg.data.resolution)
    with FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([10, 500])).sample.sum().backward()
    return counter.get_total_flops() / 2


def stage_sampling(pipeline: str, cache_dir: str, runs: list[tuple[str, int]], num_images: int) -> dict:
    import numpy as np
    import torch
    from diffusers import DDPMPipeline

    from ddpm.config import DataConfig
    from ddpm.data import open_cache
    from ddpm.evaluate import digits_feature_net, features, frechet_distance
    from ddpm.sample import generate, make_sampler

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = DDPMPipeline.from_pretrained(pipeline)
    unet = pipe.unet.to(device).eval()
    res = unet.config.sample_size
    net = digits_feature_net(res, Path(cache_dir))
    real = open_cache(DataConfig(source="digits", resolution=res, cache_dir=cache_dir), show_progress=False)
    real_features = features(net, real.take(np.arange(len(real))))
    rows = []
    for name, steps in runs:
        generate(unet, make_sampler(name, pipe.scheduler), [0], 2, 1, device)  # warm-up
        start = time.perf_counter()
        images = generate(unet, make_sampler(name, pipe.scheduler), list(range(num_images)), steps, batch_size=num_images, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append({"sampler": name, "steps": steps, "s_per_img": seconds / num_images,
                     "fd": frechet_distance(features(net, images), real_features)})
    return {"rows": rows, "num_images": num_images, "real_images": len(real), **_peak_memory()}


def stage_step_ablation(batch_size: int, steps: int, with_compile: bool) -> list[dict]:
    """The UNet training step alone (autocast, forward, backward, AdamW), one change at a time, plus the EMA update:
    the measurements behind the trainer's defaults."""
    import contextlib

    import torch
    from diffusers.training_utils import EMAModel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ddpm.config import load_config
    from ddpm.ema import EMA
    from ddpm.model import build_unet

    model_cfg = load_config(None, TUTORIAL_MODEL).model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []

    def measure(label: str, bf16: bool, channels_last: bool, fused: bool, math_sdpa: bool, compiled: bool = False) -> None:
        torch.manual_seed(0)
        unet = build_unet(model_cfg, 32).to(device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        unet = unet.to(memory_format=fmt)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=fused)
        forward = torch.compile(unet) if compiled else unet
        x = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(memory_format=fmt)
        t = torch.randint(0, 1000, (batch_size,), device=device)

        def step() -> None:
            attention = sdpa_kernel([SDPBackend.MATH]) if math_sdpa else contextlib.nullcontext()
            with attention, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = forward(x, t).sample
            (out.float() - x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        start = time.perf_counter()
        step(), step()
        warm = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append({"variant": label, "img_s": steps * batch_size / (time.perf_counter() - start), "warmup_s": warm})
        print(f"  {label}: {rows[-1]['img_s']:.1f} img/s", flush=True)

    measure("fp32, plain AdamW (the tutorial's step)", False, False, False, False)
    measure("fp32, channels_last, fused AdamW", False, True, True, False)
    measure("bf16 autocast", True, False, False, False)
    measure("bf16, fused AdamW", True, False, True, False)
    measure("bf16, fused AdamW, channels_last", True, True, True, False)
    measure("bf16, fused AdamW, math SDPA", True, False, True, True)
    if with_compile:
        measure("bf16, fused AdamW, math SDPA, torch.compile", True, False, True, True, compiled=True)

    params = list(build_unet(model_cfg, 32).to(device).parameters())
    for label, make, update in [
        ("EMA: diffusers EMAModel.step (foreach)", lambda: EMAModel(params, decay=0.9999, use_ema_warmup=True, power=0.75, foreach=True), lambda e: e.step(params)),
        ("EMA: ddpm.ema.EMA.update (one _foreach_lerp_)", lambda: EMA(params, 0.9999, 0.75), lambda e: e.update(params)),
    ]:
        ema = make()
        update(ema)
        start = time.perf_counter()
        for _ in range(20):
            update(ema)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rows.append({"variant": label, "ms_per_update": (time.perf_counter() - start) / 20 * 1000})
        print(f"  {label}: {rows[-1]['ms_per_update']:.1f} ms", flush=True)
    return rows


def _in_child(fn, *args):
    """Run one stage in a fresh process: isolated timings and its own peak memory."""
    with get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(fn, args)


# --------------------------------------------------------------------------------------


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        text = f"{torch.cuda.get_device_name()} + {text}"
    return text


def run(cfg: BenchConfig) -> dict:
    import torch

    from ddpm.errors import UserError

    gpu = torch.cuda.is_available()
    q = cfg.quick
    batch = 64 if gpu else 16
    if cfg.ablation:
        print(f"training-step ablation on {machine()}, tutorial UNet 32 px, batch {batch}", flush=True)
        rows = _in_child(stage_step_ablation, batch, 2 if q else 8, cfg.compile)
        text = "\n".join([f"Command: `.venv/bin/ddpm bench --ablation{' --compile' if cfg.compile else ''}` ({machine()}, {time.strftime('%Y-%m-%d')})", "",
                          "| variant | img/s | ms per EMA update |", "|---|---|---|"]
                         + [f"| {r['variant']} | {r['img_s']:.1f} |  |" if "img_s" in r else f"| {r['variant']} |  | {r['ms_per_update']:.1f} |" for r in rows])
        print(text)
        if cfg.out:
            with open(cfg.out, "a") as f:
                f.write("\n" + text + "\n")
        return {"ablation": rows}
    windows, window_steps, warmup = (2, 2, 2) if q else (5, 10, 10)
    workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="ddpm-bench-"))
    folder = workdir / "images"
    _make_images(folder, 64 if q else 512)
    results: dict = {"machine": machine(), "command": "make bench" + (" ARGS=--quick" if q else ""),
                     "date": time.strftime("%Y-%m-%d"), "quick": q}
    print(f"benchmarking on {results['machine']} (workdir {workdir})", flush=True)

    results["data"] = _in_child(stage_data, str(folder), 32, batch, 4 if q else 30)
    print(f"data: PIL {results['data']['pil_img_s']:.0f} img/s, cached {results['data']['cached_img_s']:.0f} img/s", flush=True)
    results["reference"] = _in_child(stage_reference_train, str(folder), batch, windows, window_steps, warmup)
    print(f"train (tutorial loop): {results['reference']['img_s']:.1f} img/s", flush=True)
    results["ours"] = _in_child(stage_ddpm_train, str(folder), str(workdir), batch, windows, window_steps, warmup, [])
    print(f"train (ddpm, defaults, {results['ours']['precision']}): {results['ours']['img_s']:.1f} img/s", flush=True)
    results["ours_fp32"] = _in_child(stage_ddpm_train, str(folder), str(workdir), batch, windows, window_steps, warmup,
                                     ["train.mixed_precision=fp32"])
    print(f"train (ddpm, fp32): {results['ours_fp32']['img_s']:.1f} img/s", flush=True)

    pipeline = Path(cfg.pipeline)
    if not (pipeline / "model_index.json").is_file():
        if not q:
            raise UserError(f"no trained model at {pipeline}: run `make train` first (the sampling figures need one)")
        from jobs.cli import main as cli_main  # quick mode: a few steps of a tiny model are enough to run the path

        cli_main(["train", f"runs_dir={workdir}/runs", "name=bench-digits", f"data.cache_dir={workdir}/cache",
                  "train.max_steps=4", "train.sample_images=1", "train.sample_steps=1", "tracking.wandb=false"])
        pipeline = workdir / "runs" / "bench-digits" / "pipeline"
    runs = ([("ddpm", 50), ("ddim", 10), ("dpmsolver++", 10)] if q else
            [("ddpm", 1000), ("ddim", 10), ("ddim", 25), ("ddim", 50), ("dpmsolver++", 10), ("dpmsolver++", 25), ("dpmsolver++", 50)])
    results["sampling"] = _in_child(stage_sampling, str(pipeline), str(workdir / "cache"), runs, 16 if q else 200)
    print(report(results), flush=True)
    if cfg.out:
        with open(cfg.out, "a") as f:
            f.write("\n" + report(results) + "\n")
        print(f"appended to {cfg.out}")
    return results


def report(r: dict) -> str:
    ref, ours, data, smp = r["reference"], r["ours"], r["data"], r["sampling"]
    lines = [f"### {r['date']}: {r['machine']}", "", f"Command: `{r['command']}`" + (" (quick mode: sizes too small for speed claims)" if r["quick"] else ""), "",
             "| figure | tutorial way | this project | ratio |", "|---|---|---|---|",
             f"| training, tutorial UNet 32 px, img/s (median of windows) | {ref['img_s']:.1f} | {ours['img_s']:.1f} ({ours['precision']}) | {ours['img_s'] / ref['img_s']:.2f}x |"]
    if "ours_fp32" in r:  # what mixed precision buys, the rest of the trainer unchanged
        b = r["ours_fp32"]
        lines.append(f"| training with train.mixed_precision=fp32, img/s | {ref['img_s']:.1f} | {b['img_s']:.1f} | {b['img_s'] / ref['img_s']:.2f}x |")
    lines += [f"| data pipeline, img/s (32 px from 256 px JPEGs) | {data['pil_img_s']:.0f} | {data['cached_img_s']:.0f} | {data['cached_img_s'] / data['pil_img_s']:.1f}x |",
              f"| peak RSS, training (MiB) | {ref['peak_rss_mib']:.0f} | {ours['peak_rss_mib']:.0f} | |"]
    if "peak_gpu_mib" in ours:
        lines.append(f"| peak GPU memory, training (MiB) | {ref['peak_gpu_mib']:.0f} | {ours['peak_gpu_mib']:.0f} | |")
    flops = ours["flops_per_img"] * ours["img_s"]
    lines += ["", f"Training compute: {ours['flops_per_img'] / 1e9:.2f} GFLOP per image (forward + backward, torch's FLOP counter) "
              f"x {ours['img_s']:.1f} img/s = {flops / 1e12:.3f} TFLOP/s achieved. Cache build (one-off): {data['cache_build_s']:.1f} s for {data['images']} images.", "",
              f"Sampling with the `make train` model ({smp['num_images']} images per row, seeds 0-{smp['num_images'] - 1}; "
              f"FD-digitsnet against the {smp['real_images']} real digits, lower is better; peak RSS {smp['peak_rss_mib']:.0f} MiB):", "",
              "| sampler | steps | s/image | speed-up vs DDPM | FD-digitsnet |", "|---|---|---|---|---|"]
    from ddpm.sample import DEFAULT_SAMPLER, DEFAULT_STEPS

    base = next(row for row in smp["rows"] if row["sampler"] == "ddpm")
    for row in smp["rows"]:
        default = " (default)" if (row["sampler"], row["steps"]) == (DEFAULT_SAMPLER, DEFAULT_STEPS) else ""
        lines.append(f"| {row['sampler']}{default} | {row['steps']} | {row['s_per_img']:.4f} | {base['s_per_img'] / row['s_per_img']:.1f}x | {row['fd']:.2f} |")
    return "\n".join(lines)
