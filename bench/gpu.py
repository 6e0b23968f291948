"""GPU figures in one short run (under 8 minutes on one H100/H200): training img/s of the tutorial UNet at 32 and
64 px, the tutorial's loop against this project's trainer (its defaults, then a larger batch with torch.compile),
model FLOPs utilisation (MFU) against the GPU's dense bf16 peak, sampling img/s at batch 256 (eager and compiled),
and the peak GPU memory of each. Each stage runs in its own child process (bench.child).

Run: make bench-gpu  (= python -m bench.gpu --out docs/benchmarks.md); --quick runs every stage at toy sizes on
any machine, the CPU included (what the tests check), without the compiled variants.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.child import in_child, peak_memory
from bench.data import make_images
from bench.report import machine
from bench.training import TUTORIAL_MODEL, stage_ddpm_train, stage_reference_train

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, by a part of the name torch reports.
# First match wins, so the more specific names come first.
DENSE_BF16_PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("A10G", 70.0),
]


def dense_bf16_peak(device_name: str) -> float | None:
    """FLOP/s of the GPU's dense bf16 peak, or None for a GPU not in the table (MFU is then left out)."""
    for part, tflops in DENSE_BF16_PEAK_TFLOPS:
        if part in device_name:
            return tflops * 1e12
    return None


def stage_sampling_speed(model: str, resolution: int, batch: int, steps: int, batches: int, compile_mode: str) -> dict:
    """img/s of the default sampler on a UNet with random weights (speed does not depend on them), in the
    precision `auto` picks, eager or torch.compile'd with `compile_mode`."""
    import torch

    from ddpm.config import DEFAULT_SAMPLER, load_config
    from ddpm.device import resolve_placement
    from ddpm.models.schedule import build_scheduler
    from ddpm.models.unet import build_unet
    from ddpm.sampling.sample import generate, make_sampler

    cfg = load_config(None, TUTORIAL_MODEL if model == "tutorial" else [])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    placement = resolve_placement(device, "auto")
    # contiguous, as ddpm sample runs it: channels_last measured slower for eager sampling on an H200 (708 against
    # 664 img/s for the digits model, 201 against 157 for the tutorial UNet at 64 px)
    unet = build_unet(cfg.model, resolution, cfg.data.image_channels).to(device).eval()
    forward = torch.compile(unet, mode=compile_mode) if compile_mode else unet  # .config reaches the UNet's
    sampler = make_sampler(DEFAULT_SAMPLER, build_scheduler(cfg.schedule))
    seeds = list(range(batch))
    start = time.perf_counter()
    with torch.inference_mode():
        generate(forward, sampler, seeds, steps, batch, device, placement.autocast_dtype)  # warm-up (compiles)
        warm = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(batches):
            generate(forward, sampler, seeds, steps, batch, device, placement.autocast_dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "model": model,
        "resolution": resolution,
        "batch": batch,
        "sampler": DEFAULT_SAMPLER,
        "steps": steps,
        "precision": placement.precision,
        "compile": compile_mode or "eager",
        "img_s": batches * batch / seconds,
        "warmup_s": warm,
        **peak_memory(),
    }


def run(quick: bool, workdir: Path, json_out: str = "", deadline_s: float = 0, only: list[str] = (), log=print) -> dict:
    """Every stage in order of importance (or the stages named in `only`, in that order); stages not started by
    `deadline_s` (0 = none) are skipped and listed."""
    import torch

    from ddpm.config import DEFAULT_STEPS

    gpu = torch.cuda.is_available()
    peak = dense_bf16_peak(torch.cuda.get_device_name()) if gpu else None
    full = gpu and not quick  # the larger and compiled variants: seconds on a GPU, many minutes on a CPU
    windows, window_steps, warmup = (2, 2, 2) if quick else (5, 20, 20)
    batch, big_batch = (8, 8) if quick else (64, 256)
    sample_batch, sample_steps, sample_batches = (4, 2, 1) if quick else (256, DEFAULT_STEPS, 3)
    folder = workdir / "images"
    make_images(folder, 32 if quick else 512)
    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "quick": quick, "training": [], "sampling": []}
    results["skipped"], results["peak_bf16_tflops"] = [], peak / 1e12 if peak else None
    log(f"GPU bench on {results['machine']} (workdir {workdir})")

    def keep(section: str, row: dict) -> None:
        results[section].append(row)
        if json_out:  # what is measured so far survives a run cut short
            Path(json_out).write_text(json.dumps(results, indent=1))

    def tutorial(res: int) -> None:
        row = in_child(stage_reference_train, str(folder), batch, windows, window_steps, warmup, res)
        keep("training", {"loop": "tutorial", "resolution": res, "batch": batch, "precision": "fp32", **row})
        log(f"train {res} px, tutorial loop, batch {batch}: {row['img_s']:.0f} img/s")

    def ours(res: int, b: int, extra: list[str]) -> None:
        row = in_child(stage_ddpm_train, str(folder), str(workdir), b, windows, window_steps, warmup, extra, res)
        flops = row["flops_per_img"] * row["img_s"]
        row.update(loop="ddpm", resolution=res, batch=b, compile=bool(extra), tflops=flops / 1e12)
        if peak:
            row["mfu"] = flops / peak
        keep("training", row)
        log(f"train {res} px, ddpm, batch {b}{', compiled' if extra else ''}: {row['img_s']:.0f} img/s")

    def sampling(model: str, res: int, mode: str) -> None:
        try:
            row = in_child(stage_sampling_speed, model, res, sample_batch, sample_steps, sample_batches, mode)
        except Exception as e:  # a compile mode that fails here is a figure too, not the end of the run
            row = {"model": model, "resolution": res, "compile": mode, "error": f"{type(e).__name__}: {e}"[:300]}
        keep("sampling", row)
        log(f"sample {model} {res} px, {mode or 'eager'}: {row.get('img_s', 0):.0f} img/s {row.get('error', '')}")

    # In order of importance, so that a deadline drops the least important: 64 px first (the MFU target is set
    # there), eager sampling, then 32 px and the compiled samplers. CUDA graphs ("reduce-overhead") for the small
    # model, whose steps are short enough for launch overhead to count; plain compile for the larger one.
    stages = [
        ("tutorial loop, 64 px", full, lambda: tutorial(64)),
        ("ddpm train, 64 px", full, lambda: ours(64, batch, [])),
        ("ddpm train, 64 px, compiled", full, lambda: ours(64, big_batch, ["train.compile=true"])),
        ("ddpm train, 64 px, large batch", full, lambda: ours(64, big_batch, [])),  # what the batch alone buys
        ("sampling, default model, 16 px", True, lambda: sampling("default", 16, "")),
        ("sampling, tutorial UNet, 64 px", full, lambda: sampling("tutorial", 64, "")),
        ("tutorial loop, 32 px", True, lambda: tutorial(32)),
        ("ddpm train, 32 px", True, lambda: ours(32, batch, [])),
        ("ddpm train, 32 px, compiled", full, lambda: ours(32, big_batch, ["train.compile=true"])),
        ("sampling, default model, CUDA graphs", full, lambda: sampling("default", 16, "reduce-overhead")),
        ("sampling, tutorial UNet, compiled", full, lambda: sampling("tutorial", 64, "default")),
    ]
    if only:
        known = {label: (label, wanted, stage) for label, wanted, stage in stages}
        unknown = [label for label in only if label not in known]
        if unknown:
            raise SystemExit(f"bench.gpu: unknown stage {unknown[0]!r}; stages: {'; '.join(known)}")
        stages = [known[label] for label in only]
    started = time.perf_counter()
    for label, wanted, stage in stages:
        if not wanted:
            continue
        if deadline_s and time.perf_counter() - started > deadline_s:
            results["skipped"].append(label)
            log(f"skipped (past the {deadline_s:.0f} s deadline): {label}")
            continue
        stage()
    return results


def _peak_mib(row: dict) -> float:
    """Peak GPU memory where there is a GPU, else the process's peak RSS."""
    return row.get("peak_gpu_mib", row.get("peak_rss_mib", 0))


def report(r: dict) -> str:
    """The results as a markdown section for docs/benchmarks.md."""
    quick = " (quick mode: sizes too small for speed claims)" if r["quick"] else ""
    peak = f"{r['peak_bf16_tflops']:.0f} TFLOP/s" if r["peak_bf16_tflops"] else "not in bench/gpu.py's table"
    lines = [
        f"### {r['date']}: {r['machine']} (GPU figures)",
        "",
        f"Command: `make bench-gpu`{quick}. MFU: achieved FLOP/s (torch's FLOP counter, forward + backward) over the "
        f"GPU's dense bf16 peak ({peak}). Peak MiB: GPU memory allocated (peak RSS on a CPU).",
        "",
        "| training, tutorial UNet | px | batch | precision | img/s | vs tutorial | TFLOP/s | MFU | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {row["resolution"]: row["img_s"] for row in r["training"] if row["loop"] == "tutorial"}
    for row in r["training"]:
        label = (
            "tutorial loop" if row["loop"] == "tutorial" else "ddpm train" + (", compiled" if row["compile"] else "")
        )
        tflops = f"{row['tflops']:.1f}" if "tflops" in row else ""
        mfu = f"{100 * row['mfu']:.1f} %" if "mfu" in row else ""
        ratio = f"{row['img_s'] / base[row['resolution']]:.2f}x" if row["resolution"] in base else ""
        lines.append(
            f"| {label} | {row['resolution']} | {row['batch']} | {row['precision']} | {row['img_s']:.0f} "
            f"| {ratio} | {tflops} | {mfu} | {_peak_mib(row):.0f} |"
        )
    lines += [
        "",
        "| sampling (random weights) | px | batch | sampler | precision | mode | img/s | peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["sampling"]:
        model = "`make train` model" if row["model"] == "default" else "tutorial UNet"
        if "error" in row:
            lines.append(f"| {model} | {row['resolution']} | | | | {row['compile']} | failed: {row['error']} | |")
            continue
        lines.append(
            f"| {model} | {row['resolution']} | {row['batch']} | {row['sampler']} {row['steps']} | {row['precision']} "
            f"| {row['compile']} | {row['img_s']:.0f} | {_peak_mib(row):.0f} |"
        )
    if r["skipped"]:
        lines += ["", "Not measured (past the run's deadline): " + "; ".join(r["skipped"]) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="toy sizes, any machine: checks that every stage runs")
    p.add_argument("--out", default="", help="markdown file to append the report to (and FILE.json beside it)")
    p.add_argument("--json", default="", help="file to write the raw figures to after every stage")
    p.add_argument("--deadline", type=float, default=0, help="seconds after which no new stage starts (0: none)")
    p.add_argument("--only", default="", help="';'-separated stage names to run, in that order (default: all)")
    p.add_argument("--workdir", default="", help="scratch directory (default: a new temporary one)")
    args = p.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ddpm-bench-gpu-"))
    started = time.perf_counter()
    results = run(
        args.quick,
        workdir,
        args.json,
        args.deadline,
        [label.strip() for label in args.only.split(";") if label.strip()],
        log=lambda m: print(f"[{time.perf_counter() - started:5.0f} s] {m}", flush=True),
    )
    text = report(results)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
