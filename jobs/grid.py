"""Training grids: multi-valued overrides, in Hydra's multirun syntax, expand into one training run per point.

    ddpm submit train --cluster gpu optim.lr=1e-4,4e-4 train.batch_size=32,64

is four runs, submitted as one SLURM array (jobs.submit, then slurm.launch.submit_grid): each point has its own run
directory and W&B run, named from the values it varies (`digits-16px_lr-1e-4_batch_size-32`), all in one W&B group
named after the grid, and each element requeues and resumes on its own. Commas inside brackets belong to one value
(`model.block_out_channels=[32,64]` is not an axis).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from ddpm.errors import ConfigError

MAX_POINTS = 1000  # SLURM's default MaxArraySize is 1001


@dataclass
class GridPoint:
    suffix: str  # appended to the grid's name: the run's name
    overrides: list[str]  # the command line's fixed overrides, then this point's values


def split_values(raw: str) -> list[str]:
    """The values of `a,b,[c,d]`: commas at the top level separate, commas inside brackets or braces do not."""
    values, depth, current = [], 0, ""
    for ch in raw:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    return [*values, current]


def _label(name: str, value: str) -> str:
    return f"{name}-{re.sub(r'[^A-Za-z0-9.+-]+', '-', value).strip('-')}"


def expand(overrides: list[str]) -> list[GridPoint] | None:
    """The points of the grid the overrides describe, in row-major order; None when no override has two values."""
    fixed, axes = [], []
    for item in overrides:
        key, sep, raw = item.partition("=")
        values = split_values(raw) if sep else [raw]
        if len(values) == 1:
            fixed.append(item)
            continue
        if any(not v.strip() for v in values):
            raise ConfigError(f"grid axis {item!r}: an empty value (values are separated by commas)")
        if len(set(values)) != len(values):
            raise ConfigError(f"grid axis {item!r}: a value is repeated")
        if key in (k for k, _ in axes):
            raise ConfigError(f"grid axis {key}: given twice; list all its values in one override")
        axes.append((key, values))
    if not axes:
        return None
    count = 1
    for _, values in axes:
        count *= len(values)
    if count > MAX_POINTS:
        raise ConfigError(f"the grid has {count} points; at most {MAX_POINTS} go into one SLURM array")
    # A run is named by the last part of each varied key, or the whole key where two axes share that last part.
    short = [k.split(".")[-1] for k, _ in axes]
    names = [k.replace(".", "-") if short.count(k.split(".")[-1]) > 1 else k.split(".")[-1] for k, _ in axes]
    points = []
    for combination in itertools.product(*(values for _, values in axes)):
        suffix = "_".join(_label(name, v) for name, v in zip(names, combination))
        points.append(GridPoint(suffix, [*fixed, *(f"{k}={v}" for (k, _), v in zip(axes, combination))]))
    if len({p.suffix for p in points}) != len(points):
        raise ConfigError("two points of the grid get the same run name: their values differ only in punctuation")
    return points
