"""Train job: validate the config, print it, then hand it to ddpm.train.train."""

from __future__ import annotations

import logging
from pathlib import Path

from ddpm.config import Config, dump_yaml

log = logging.getLogger(__name__)


def run(cfg: Config) -> Path:
    """Plain and picklable: the same call runs locally, in the container and under SLURM."""
    from ddpm.train import train  # heavy imports (torch, diffusers) only when the job runs

    return train(cfg)


def describe(cfg: Config) -> str:
    return f"# run directory: {cfg.run_dir}\n{dump_yaml(cfg)}"
