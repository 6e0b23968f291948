"""The training-step ablation: the UNet training step one change at a time, plus the EMA update."""

from __future__ import annotations

import time

from bench.training import TUTORIAL_MODEL


def stage_step_ablation(batch_size: int, steps: int, with_compile: bool) -> list[dict]:
    """The UNet training step alone (autocast, forward, backward, AdamW), one change at a time, plus the EMA update:
    the measurements behind the trainer's defaults."""
    import contextlib

    import torch
    from diffusers.training_utils import EMAModel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ddpm.config import load_config
    from ddpm.models.unet import build_unet
    from ddpm.training.ema import EMA

    model_cfg = load_config(None, TUTORIAL_MODEL).model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []

    def measure(
        label: str, bf16: bool, channels_last: bool, fused: bool, math_sdpa: bool, compiled: bool = False
    ) -> None:
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
        (
            "EMA: diffusers EMAModel.step (foreach)",
            lambda: EMAModel(params, decay=0.9999, use_ema_warmup=True, power=0.75, foreach=True),
            lambda e: e.step(params),
        ),
        (
            "EMA: ddpm.training.ema.EMA.update (one _foreach_lerp_)",
            lambda: EMA(params, 0.9999, 0.75),
            lambda e: e.update(params),
        ),
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
