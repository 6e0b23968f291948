"""Nightly sampling sweeps over the newest checkpoints of the runs named in a YAML file.

    python -m slurm.nightly install --cluster local --runs slurm/nightly.yaml   # scrontab entry (or the crontab line)
    python -m slurm.nightly submit --cluster local --runs slurm/nightly.yaml    # what the entry runs each night

The YAML names the runs, how many of their newest checkpoints to sweep, the cron schedule and the
sweep grid (the keys of a sweep config but `models` and `name`); each night's sweep is named
nightly-<date>, so the nights sit side by side in W&B. Cells scored on an earlier night (same weights,
same settings, kept in each run's scores.jsonl) are not sampled again: a night with no new checkpoint
submits nothing, and each night's history.png is quality against training step across the nights.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ddpm.errors import ConfigError, UserError
from ddpm.evaluation.sweep import ModelSource, SweepConfig, absolute_paths, validate_sweep
from ddpm.typed_config import build_config, read_tree
from jobs.sweep import SweepJobConfig

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "# ddpm nightly sweep: begin", "# ddpm nightly sweep: end"


@dataclass
class NightlyConfig:
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
        f"cd {shlex.quote(str(REPO))} && mkdir -p runs && .venv/bin/python -m slurm.nightly submit "
        f"--cluster {shlex.quote(cluster)} "
        f"--runs {shlex.quote(str(runs))} >> runs/nightly.log 2>&1"
    )
    return f"{schedule} {cmd}"


def install(cluster: str, runs: Path) -> int:
    from slurm.profile import load_profile

    profile = load_profile(cluster)
    spec = read_nightly(runs)
    sweep_config(runs)  # a mistake in the grid shows now, not at 02:00 in a log
    line = crontab_line(cluster, runs.resolve(), spec.schedule)
    if shutil.which("scrontab") is None:
        print(f"scrontab is not installed here; add this line with `crontab -e` on a login node instead:\n{line}")
        return 0
    current = subprocess.run(["scrontab", "-l"], capture_output=True, text=True)
    if current.returncode != 0 and "no crontab" not in (current.stderr + current.stdout).lower():
        print(
            f"scrontab is not available here ({current.stderr.strip() or 'exit ' + str(current.returncode)}); "
            f"add this line with `crontab -e` on a login node instead:\n{line}"
        )
        return 0
    kept, inside = [], False
    for existing in current.stdout.splitlines() if current.returncode == 0 else []:
        if existing.strip() == BEGIN:
            inside = True
        if not inside:
            kept.append(existing)
        if existing.strip() == END:
            inside = False
    block = [
        BEGIN,
        f"#SCRON --partition={profile.cpu_job.partition or profile.partition}",
        f"#SCRON --time={profile.cpu_job.time_min}",
        *([f"#SCRON --account={profile.account}"] if profile.account else []),
        line,
        END,
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".scrontab", delete=False) as f:
        f.write("\n".join([*kept, *block]) + "\n")
    r = subprocess.run(["scrontab", f.name], capture_output=True, text=True)
    Path(f.name).unlink()
    if r.returncode != 0:
        raise UserError(
            f"scrontab refused the entry ({r.stderr.strip()}); add this line with `crontab -e` instead: {line}"
        )
    print(f"installed in scrontab (see `scrontab -l`):\n{line}")
    return 0


def submit(cluster: str, runs: Path) -> int:
    from slurm import launch
    from slurm.profile import load_profile

    cfg = sweep_config(runs)
    new = new_cells(cfg)
    if not new:
        print(f"{datetime.datetime.now():%Y-%m-%d %H:%M} {cfg.name}: nothing new to score (no new checkpoint)")
        return 0
    print(f"{cfg.name}: {len(new)} cells to score", flush=True)
    array, merge = launch.submit_sweep(load_profile(cluster), cfg, 64)
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M} {cfg.name}\n{array.describe()}\n{merge.describe()}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m slurm.nightly", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["install", "submit"])
    p.add_argument("--cluster", required=True)
    p.add_argument("--runs", required=True, type=Path, help="the nightly YAML, e.g. slurm/nightly.yaml")
    args = p.parse_args(argv)
    try:
        return install(args.cluster, args.runs) if args.action == "install" else submit(args.cluster, args.runs)
    except UserError as e:
        print(f"nightly {args.action}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
