"""Train job: train (or resume) a run; the config is ddpm.config.Config, printed before any work."""

from __future__ import annotations

from pathlib import Path

from ddpm.config import Config, dump_yaml, load_config

CONFIG = Config
load = load_config


def describe(cfg: Config) -> str:
    return f"# run directory: {cfg.run_dir}\n{dump_yaml(cfg)}"


def run(cfg: Config) -> Path | None:
    """Plain and picklable: the same call runs locally, in the container and under SLURM. Returns the exported
    pipeline, or None when the launch ended early with a checkpoint (train.stop_after)."""
    from ddpm.train import train  # heavy imports (torch, diffusers) only when the job runs

    path = train(cfg)
    print(
        f"pipeline: {path}"
        if path
        else f"stopped early with a checkpoint in {cfg.run_dir / 'checkpoints'}; rerun to resume"
    )
    return path
