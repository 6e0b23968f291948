"""Nightly job: sampling sweeps over the newest checkpoints of the runs named in a YAML file, every night.

    ddpm nightly install --cluster local --runs slurm/nightly.yaml   # the scrontab entry (or the crontab line)
    ddpm nightly submit --cluster local --runs slurm/nightly.yaml    # what the entry runs each night

The action is the first plain word (also `--action` or `action=`). The YAML names the runs, how many of
their newest checkpoints to sweep, the cron schedule and the sweep grid (the keys of a sweep config but
`models` and `name`); each night's sweep is named nightly-<date>, so the nights sit side by side in W&B.
Cells scored on an earlier night (same weights, same settings, kept in each run's scores.jsonl) are not
sampled again: a night with no new checkpoint submits nothing, and each night's history.png is quality
against training step across the nights.
"""

from __future__ import annotations

import dataclasses
import datetime
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ddpm.errors import ConfigError
from ddpm.evaluation.sweep import ModelSource, SweepConfig, absolute_paths, validate_sweep
from ddpm.typed_config import build_config, read_tree
from jobs.sweep import SweepJobConfig

REPO = Path(__file__).resolve().parents[1]
ACTIONS = ("install", "submit")
BLOCK = "nightly sweep"  # the scrontab block's name (slurm.scrontab)


@dataclass
class NightlyJobConfig:
    action: Literal["install", "submit"] = "submit"  # install: the scrontab entry; submit: tonight's sweep, if new
    cluster: str = ""  # profile name under slurm/clusters/ (e.g. local) or a .yaml path
    runs: str = "slurm/nightly.yaml"  # the nightly YAML: runs, newest checkpoints, schedule, sweep grid

    def validate(self) -> None:
        if not self.cluster:
            raise ConfigError(
                "--cluster is required: a profile name under slurm/clusters/ (e.g. local) or a .yaml path"
            )


CONFIG = NightlyJobConfig


def load(path: str | None, overrides: list[str] = (), values: dict | None = None) -> NightlyJobConfig:
    """A plain word (no '=') is the action: `ddpm nightly install ...`; the rest are key=value overrides."""
    words = [a for a in overrides if "=" not in a]
    if len(words) > 1 or any(w not in ACTIONS for w in words):
        raise ConfigError(f"the action is one of install, submit; got {' '.join(words)}")
    keys = [a for a in overrides if "=" in a] + [f"action={w}" for w in words]
    cfg = build_config(NightlyJobConfig, read_tree(path, keys, values))
    cfg.validate()
    return cfg


@dataclass
class NightlyConfig:
    """The nightly YAML (slurm/nightly.yaml)."""

    runs: tuple[str, ...] = ()  # run directories whose newest checkpoints are swept, relative to the file
    newest: int = 1  # newest valid checkpoints per run
    schedule: str = "0 2 * * *"  # cron schedule: 02:00 every day
    sweep: SweepConfig = field(default_factory=SweepConfig)  # the sweep grid, without models and name (set here)


def read_nightly(path: Path) -> NightlyConfig:
    if not path.is_file():
        raise ConfigError(f"nightly file not found: {path}")
    try:
        spec = build_config(NightlyConfig, read_tree(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not spec.runs:
        raise ConfigError(f"{path}: runs: give at least one run directory")
    for key in ("models", "name"):
        if getattr(spec.sweep, key):
            raise ConfigError(f"{path}: sweep.{key} is set by the nightly job; remove it")
    return spec


def sweep_config(path: Path, today: datetime.date | None = None) -> SweepJobConfig:
    """Tonight's sweep: the grid of the file over the newest checkpoints of its runs, named nightly-<date>."""
    spec = read_nightly(path)
    base = path.resolve().parent
    models = tuple(
        ModelSource(run=str((base / r).resolve() if not Path(r).is_absolute() else r), newest=spec.newest)
        for r in spec.runs
    )
    grid = {f.name: getattr(spec.sweep, f.name) for f in dataclasses.fields(SweepConfig)}
    cfg = SweepJobConfig(
        **{**grid, "models": models, "name": f"nightly-{(today or datetime.date.today()).isoformat()}"}
    )
    validate_sweep(cfg)
    return absolute_paths(cfg)


def new_cells(cfg: SweepJobConfig) -> list:
    """Tonight's cells that no sweep has scored yet (same weights and settings): only new checkpoints' cells."""
    from ddpm.evaluation.sweep import make_plan
    from ddpm.evaluation.sweep_cells import finished_row, scored_before

    # make_plan, not plan: a night with nothing new leaves no sweep folder behind
    return [c for c in make_plan(cfg) if finished_row(cfg, c) is None and scored_before(cfg, c) is None]


def crontab_line(cluster: str, runs: Path, schedule: str) -> str:
    cmd = (
        f"cd {shlex.quote(str(REPO))} && mkdir -p runs && .venv/bin/ddpm nightly submit "
        f"--cluster {shlex.quote(cluster)} "
        f"--runs {shlex.quote(str(runs))} >> runs/nightly.log 2>&1"
    )
    return f"{schedule} {cmd}"


def install(cluster: str, runs: Path) -> str:
    """The scrontab entry that submits the nightly sweep at the file's schedule; returns its line."""
    from slurm import scrontab
    from slurm.profile import load_profile

    profile = load_profile(cluster)
    spec = read_nightly(runs)
    sweep_config(runs)  # a mistake in the grid shows now, not at 02:00 in a log
    line = crontab_line(cluster, runs.resolve(), spec.schedule)
    scrontab.install(BLOCK, line, profile)
    return line


def submit(cluster: str, runs: Path) -> tuple | None:
    """Tonight's sweep as a SLURM array and merge, when it has new cells; returns what was submitted, or None."""
    from jobs import sweep
    from slurm import launch
    from slurm.profile import load_profile

    cfg = sweep_config(runs)
    new = new_cells(cfg)
    if not new:
        print(f"{datetime.datetime.now():%Y-%m-%d %H:%M} {cfg.name}: nothing new to score (no new checkpoint)")
        return None
    print(f"{cfg.name}: {len(new)} cells to score", flush=True)
    array, merge = launch.submit_sweep(load_profile(cluster), sweep.run, cfg, 64)
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M} {cfg.name}\n{array.describe()}\n{merge.describe()}", flush=True)
    return array, merge


def run(cfg: NightlyJobConfig):
    cfg.validate()
    return install(cfg.cluster, Path(cfg.runs)) if cfg.action == "install" else submit(cfg.cluster, Path(cfg.runs))
