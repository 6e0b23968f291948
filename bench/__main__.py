"""Benchmark job: this project's trainer, data path and samplers against the tutorial's way, side by side.

Every figure is a ratio measured in one run, because the machines are shared and noisy:
- training: images/s of ddpm.training.loop (its defaults) against the tutorial's loop (torchvision
  transforms per image in a DataLoader, fp32, loss.item() every step, plain AdamW), on the
  tutorial's UNet at 32 px; median of timed windows after warm-up;
- data: images/s of the cached uint8 path against the per-image PIL path;
- sampling: images/s at batch 256 of DDPM 1000 steps against the fast samplers on the same trained
  model (fp32, and the default sampler in the precision "auto" picks: bf16 where the CPU has it), with
  FD-digitsnet (ddpm.evaluation.metrics) on the same images beside each (`--sampling`: this stage alone);
- guidance (`--guidance`: this stage alone): sampling img/s of an unconditional UNet against the class-conditional
  one at guidance scale 1 and 2 (bench/guidance.py);
- peak memory of each stage (RSS on CPU, max allocated on GPU): each stage runs in its own child process.

Run: python -m bench [--quick] [--ablation] [--compile] [--sampling] [--guidance] [--pipeline P] [--out F] [--workdir D]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.ablation import stage_step_ablation
from bench.child import in_child
from bench.data import make_images, stage_data
from bench.guidance import stage_guidance
from bench.report import ablation_report, guidance_report, machine, report, sampling_report
from bench.sampling import BATCH, FULL_RUNS, QUICK_RUNS, quick_pipeline, stage_sampling
from bench.training import stage_ddpm_train, stage_reference_train

EXIT_USER_ERROR = 2


@dataclass
class BenchConfig:
    quick: bool = False  # CI mode: tiny sizes, checks that everything runs, no speed claims
    pipeline: str = "runs/digits-16px/pipeline"  # trained digits model for the sampling figures
    out: str = ""  # markdown file to append the results to ("" = print only)
    workdir: str = ""  # scratch space; "" = a temporary directory
    ablation: bool = False  # instead: the training step one change at a time (the table behind the defaults)
    compile: bool = False  # with ablation: also time torch.compile (minutes of compilation on a CPU)
    sampling: bool = False  # only the sampling table (speed and FD of each sampler on the trained model)
    guidance: bool = False  # only the cost of guidance (unconditional against class-conditional sampling)
    guidance_config: str = "configs/digits-16px.yaml"  # the architecture that --guidance times


def _append(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write("\n" + text + "\n")


def _publish(cfg: BenchConfig, text: str) -> None:
    """Print a report, and append it to cfg.out when set."""
    print(text, flush=True)
    if cfg.out:
        _append(cfg.out, text)
        print(f"appended to {cfg.out}")


def run(cfg: BenchConfig) -> dict:
    """Every stage, each in its own child process; prints the report and appends it to cfg.out when set."""
    import torch

    gpu = torch.cuda.is_available()
    q = cfg.quick
    batch = 64 if gpu else 16
    if cfg.ablation:
        print(f"training-step ablation on {machine()}, tutorial UNet 32 px, batch {batch}", flush=True)
        rows = in_child(stage_step_ablation, batch, 2 if q else 8, cfg.compile)
        text = ablation_report(rows, cfg.compile)
        print(text)
        if cfg.out:
            _append(cfg.out, text)
        return {"ablation": rows}
    windows, window_steps, warmup = (2, 2, 2) if q else (5, 10, 10)
    workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="ddpm-bench-"))
    args = " ".join(a for a, on in (("--quick", q), ("--sampling", cfg.sampling), ("--guidance", cfg.guidance)) if on)
    results: dict = {
        "machine": machine(),
        "command": "make bench" + (f" ARGS={args}" if " " not in args and args else f' ARGS="{args}"' if args else ""),
        "date": time.strftime("%Y-%m-%d"),
        "quick": q,
    }
    print(f"benchmarking on {results['machine']} (workdir {workdir})", flush=True)
    if cfg.guidance:
        from ddpm.config import DEFAULT_STEPS

        # quick: a tiny batch and two steps run every case once (CI); else the batch and steps the sampling table
        # uses on a CPU evaluation (128, the default sampler's 25 steps), or 256 on a GPU.
        batch, steps, repeats = (4, 2, 1) if q else (256 if gpu else 128, DEFAULT_STEPS, 3)
        results["guidance"] = in_child(stage_guidance, cfg.guidance_config, 10, batch, steps, repeats)
        _publish(cfg, guidance_report(results))
        return results
    if cfg.sampling:
        results["sampling"] = _sampling(cfg, workdir)
        _publish(cfg, sampling_report(results))
        return results
    folder = workdir / "images"
    make_images(folder, 64 if q else 512)

    data = results["data"] = in_child(stage_data, str(folder), 32, batch, 4 if q else 30)
    print(f"data: PIL {data['pil_img_s']:.0f} img/s, cached {data['cached_img_s']:.0f} img/s", flush=True)
    results["reference"] = in_child(stage_reference_train, str(folder), batch, windows, window_steps, warmup)
    print(f"train (tutorial loop): {results['reference']['img_s']:.1f} img/s", flush=True)
    train_args = (str(folder), str(workdir), batch, windows, window_steps, warmup)
    ours = results["ours"] = in_child(stage_ddpm_train, *train_args, [])
    print(f"train (ddpm, defaults, {ours['precision']}): {ours['img_s']:.1f} img/s", flush=True)
    results["ours_fp32"] = in_child(stage_ddpm_train, *train_args, ["train.mixed_precision=fp32"])
    print(f"train (ddpm, fp32): {results['ours_fp32']['img_s']:.1f} img/s", flush=True)

    results["sampling"] = _sampling(cfg, workdir)
    print(report(results), flush=True)
    if cfg.out:
        _append(cfg.out, report(results))
        print(f"appended to {cfg.out}")
    return results


def _sampling(cfg: BenchConfig, workdir: Path) -> dict:
    from ddpm.errors import UserError

    pipeline = Path(cfg.pipeline)
    if not (pipeline / "model_index.json").is_file():
        if not cfg.quick:
            raise UserError(f"no trained model at {pipeline}: run `make train` first (the sampling figures need one)")
        pipeline = quick_pipeline(workdir)
    runs = QUICK_RUNS if cfg.quick else FULL_RUNS
    return in_child(stage_sampling, str(pipeline), str(workdir / "cache"), runs, 16 if cfg.quick else BATCH)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench", description="Measure training, data and sampling speed against the tutorial's way."
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks that every stage runs (CI), no speed claims"
    )
    p.add_argument("--pipeline", default=BenchConfig.pipeline, help="trained digits pipeline for the sampling figures")
    p.add_argument("--out", default="", help="markdown file to append the results to, e.g. docs/benchmarks.md")
    p.add_argument("--workdir", default="", help="scratch directory (default: a new temporary one)")
    p.add_argument("--ablation", action="store_true", help="time the training step one change at a time instead")
    p.add_argument(
        "--compile", action="store_true", help="with --ablation: include torch.compile (slow to compile on a CPU)"
    )
    p.add_argument("--sampling", action="store_true", help="only the sampling table (needs the trained model)")
    p.add_argument(
        "--guidance", action="store_true", help="only the cost of guidance: unconditional against conditional sampling"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ddpm.errors import UserError
    from ddpm.files import no_world_writable_files

    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpx2", "urllib3", "filelock", "datasets", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    no_world_writable_files()
    cfg = BenchConfig(
        quick=args.quick,
        pipeline=args.pipeline,
        out=args.out,
        workdir=args.workdir,
        ablation=args.ablation,
        compile=args.compile,
        sampling=args.sampling,
        guidance=args.guidance,
    )
    try:
        run(cfg)
    except UserError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
