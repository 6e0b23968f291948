"""Train job: train (or resume) a run; the config is ddpm.config.Config, printed before any work.

ddpm train [--config FILE] [key=value ...]       one process per visible GPU (one process without GPUs)
ddpm train --gpus 2 ...                          two processes on GPUs 0 and 1 (train.batch_size is per process)
ddpm train --processes 2 ...                     two CPU processes on gloo: the multi-process path without GPUs
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from ddpm.config import Config, dump_yaml, validate_config
from ddpm.training.local_launch import ALREADY_LAUNCHED
from ddpm.typed_config import build_config, read_tree


@dataclass
class TrainJobConfig(Config):
    """The run's config (ddpm.config.Config) plus how this machine runs it, which is not part of the run."""

    gpus: str = "auto"  # processes on GPUs: auto (one per visible GPU), all, or a count; ignored under SLURM
    processes: int = 0  # instead: this many CPU processes on gloo (0: off)
    shm_check: bool = True  # refuse several GPU processes on a node whose /dev/shm is too small for NCCL (false: skip)


CONFIG = TrainJobConfig


def load(path: str | None, overrides: list[str] = (), values: dict | None = None) -> TrainJobConfig:
    tree = read_tree(path, overrides, values)
    cfg = build_config(TrainJobConfig, tree)
    if cfg.model.init_from:  # the base's config is the model (ddpm.models.base); no weights are loaded here
        from ddpm.models.base import resolve_init

        cfg = build_config(TrainJobConfig, resolve_init(tree, cfg.run_dir))
    validate_config(cfg)
    return cfg


def run_config(cfg: Config) -> Config:
    """The run's own config, without the launch options: what config.yaml and a resume see."""
    if type(cfg) is Config:
        return cfg
    return Config(**{f.name: getattr(cfg, f.name) for f in fields(Config)})


def describe(cfg: Config) -> str:
    return f"# run directory: {cfg.run_dir}\n{dump_yaml(run_config(cfg))}"


def _outputs(cfg: Config) -> list[tuple[str, Path]]:
    """What the run writes to: its run directory and, unless the data streams from shards, the data cache."""
    places = [("the run directory", cfg.run_dir)]
    if cfg.data.source != "webdataset":
        from ddpm.data.cache import cache_root

        places.append(("the data cache directory", cache_root(cfg.data)))
    return places


def _train_one(cfg: Config) -> Path | None:
    """One process of the run (module level: the launcher pickles it by name)."""
    from ddpm.files import writing
    from ddpm.training.loop import train  # heavy imports (torch, diffusers) only when the job runs

    with writing(*_outputs(cfg)):  # a disk that fills mid-run: one line, the checkpoints written so far intact
        return train(cfg)


def gpu_processes_here(nproc: int, on_cpu: bool) -> int:
    """GPU processes of this run on this node: the ones about to start, or, in a task that SLURM or torchrun started,
    its node's share (LOCAL_WORLD_SIZE)."""
    import torch

    if os.environ.get(ALREADY_LAUNCHED):
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if torch.cuda.is_available() else 0
    return 0 if on_cpu else nproc


def run(cfg: Config) -> Path | None:
    """Plain and picklable: the same call runs locally, in the container and under SLURM. Starts one process
    per GPU where asked (ddpm.training.local_launch). Returns the exported pipeline, or None when the launch ended
    early with a checkpoint (train.stop_after)."""
    from ddpm.environment import require_shm
    from ddpm.files import writable_dir
    from ddpm.training.local_launch import launch, processes_to_start

    nproc, on_cpu = processes_to_start(getattr(cfg, "gpus", "auto"), getattr(cfg, "processes", 0))
    if getattr(cfg, "shm_check", True):  # room for NCCL's segments, rather than a failure inside NCCL minutes later
        require_shm(gpu_processes_here(nproc, on_cpu))
    plain = run_config(cfg)
    for what, path in _outputs(plain):  # before any process starts, loads a model or decodes data
        writable_dir(path, what)
    if nproc > 1:
        print(f"starting {nproc} training processes on {'the CPU' if on_cpu else f'{nproc} GPUs'}", flush=True)
        path = launch(_train_one, plain, nproc, on_cpu)
    else:
        path = _train_one(plain)
    print(
        f"pipeline: {path}"
        if path
        else f"stopped early with a checkpoint in {plain.run_dir / 'checkpoints'}; rerun to resume"
    )
    return path
