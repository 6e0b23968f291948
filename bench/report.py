"""What the benchmark writes: the machine it ran on and the markdown tables (docs/benchmarks.md)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def machine() -> str:
    """GPU (when there is one), CPU model, core count and torch version."""
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


def ablation_report(rows: list[dict], with_compile: bool) -> str:
    """The training-step ablation as a markdown table: img/s of each variant, ms of each EMA update."""
    command = f".venv/bin/python -m bench --ablation{' --compile' if with_compile else ''}"
    lines = [
        f"Command: `{command}` ({machine()}, {time.strftime('%Y-%m-%d')})",
        "",
        "| variant | img/s | ms per EMA update |",
        "|---|---|---|",
    ]
    for r in rows:
        if "img_s" in r:
            lines.append(f"| {r['variant']} | {r['img_s']:.1f} |  |")
        else:
            lines.append(f"| {r['variant']} |  | {r['ms_per_update']:.1f} |")
    return "\n".join(lines)


def _head(r: dict) -> list[str]:
    """A section's heading lines: the date and machine, the command that made it."""
    quick = " (quick mode: sizes too small for speed claims)" if r["quick"] else ""
    return [f"### {r['date']}: {r['machine']}", "", f"Command: `{r['command']}`" + quick, ""]


def report(r: dict) -> str:
    """The results of a full run (see bench.__main__.run) as a markdown section."""
    ref, ours, data, smp = r["reference"], r["ours"], r["data"], r["sampling"]
    lines = [
        *_head(r),
        "| figure | tutorial way | this project | ratio |",
        "|---|---|---|---|",
        f"| training, tutorial UNet 32 px, img/s (median of windows) | {ref['img_s']:.1f} | {ours['img_s']:.1f} "
        f"({ours['precision']}) | {ours['img_s'] / ref['img_s']:.2f}x |",
    ]
    if "ours_fp32" in r:  # what mixed precision buys, the rest of the trainer unchanged
        b = r["ours_fp32"]
        lines.append(
            f"| training with train.mixed_precision=fp32, img/s | {ref['img_s']:.1f} | {b['img_s']:.1f} "
            f"| {b['img_s'] / ref['img_s']:.2f}x |"
        )
    lines += [
        f"| data pipeline, img/s (32 px from 256 px JPEGs) | {data['pil_img_s']:.0f} | {data['cached_img_s']:.0f} "
        f"| {data['cached_img_s'] / data['pil_img_s']:.1f}x |",
        f"| peak RSS, training (MiB) | {ref['peak_rss_mib']:.0f} | {ours['peak_rss_mib']:.0f} | |",
    ]
    if "peak_gpu_mib" in ours:
        lines.append(f"| peak GPU memory, training (MiB) | {ref['peak_gpu_mib']:.0f} | {ours['peak_gpu_mib']:.0f} | |")
    flops = ours["flops_per_img"] * ours["img_s"]
    lines += [
        "",
        f"Training compute: {ours['flops_per_img'] / 1e9:.2f} GFLOP per image (forward + backward, torch's FLOP "
        f"counter) x {ours['img_s']:.1f} img/s = {flops / 1e12:.3f} TFLOP/s achieved. Cache build (one-off): "
        f"{data['cache_build_s']:.1f} s for {data['images']} images.",
        "",
        *_sampling_table(smp),
    ]
    return "\n".join(lines)


def sampling_report(r: dict) -> str:
    """The results of `python -m bench --sampling` as a markdown section."""
    return "\n".join(_head(r) + _sampling_table(r["sampling"]))


def _sampling_table(smp: dict) -> list[str]:
    from ddpm.config import DEFAULT_SAMPLER, DEFAULT_STEPS

    n = smp["num_images"]
    lines = [
        f"Sampling with the `make train` model ({n} images per row in one batch, seeds 0-{n - 1}; FD-digitsnet "
        f"against the {smp['real_images']} real digits, lower is better, where {n} real digits would score "
        f"{smp['floor']:.2f}; peak RSS {smp['peak_rss_mib']:.0f} MiB):",
        "",
        "| sampler | steps | precision | img/s | s/image | speed-up vs DDPM | FD-digitsnet |",
        "|---|---|---|---|---|---|---|",
    ]
    base = next(row for row in smp["rows"] if row["sampler"] == "ddpm")
    for row in smp["rows"]:
        default = " (default)" if (row["sampler"], row["steps"]) == (DEFAULT_SAMPLER, DEFAULT_STEPS) else ""
        lines.append(
            f"| {row['sampler']}{default} | {row['steps']} | {row['precision']} | {1 / row['s_per_img']:.1f} "
            f"| {row['s_per_img']:.4f} | {base['s_per_img'] / row['s_per_img']:.1f}x | {row['fd']:.2f} |"
        )
    return lines


def guidance_report(r: dict) -> str:
    """The results of `python -m bench --guidance` as a markdown section."""
    g = r["guidance"]
    lines = [
        *_head(r),
        f"Sampling speed of the `{g['config']}` UNet (fresh weights: speed does not depend on them) without and with "
        f"a class embedding of {g['num_classes']} classes: {g['batch']} images in one batch, {g['steps']} steps of "
        f"{g['sampler']}, {g['precision']}, {g['threads']} torch thread(s), median of {g['repeats']} interleaved "
        f"rounds (each round's figure in brackets; peak RSS {g['peak_rss_mib']:.0f} MiB):",
        "",
        "| model | network inputs per image and step | img/s | time per image against unconditional |",
        "|---|---|---|---|",
    ]
    for row in g["rows"]:
        runs = ", ".join(f"{x:.1f}" for x in row["img_s_runs"])
        lines.append(
            f"| {row['case']} | {row['inputs_per_image_step']:g} | {row['img_s']:.1f} ({runs}) "
            f"| {row['time_ratio']:.2f}x |"
        )
    return "\n".join(lines)
