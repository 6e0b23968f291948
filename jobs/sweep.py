"""Sweep job: every cell of a sampling grid, resumable and shardable; tables, plot and a W&B run at the end.

ddpm sweep --config configs/sweeps/digits.yaml              # all cells, then the results
ddpm sweep --config ... --shard 0/4                         # cells 0, 4, 8, ... (a SLURM array task)
ddpm sweep --config ... --merge                             # the results from the shards' cells
ddpm sweep --config ... --plan-only                         # resolve the models and write plan.json
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ddpm.errors import ConfigError, UserError
from ddpm.evaluation.sweep import SweepConfig, load_sweep_config, parse_shard, plan, read_plan
from ddpm.evaluation.sweep_cells import collect_rows, run_cells

log = logging.getLogger(__name__)


@dataclass
class SweepJobConfig(SweepConfig):
    """The sweep's grid (ddpm.evaluation.sweep) plus how this invocation runs, which is not part of the grid."""

    shard: str = ""  # I/N: run only cells I, I+N, ... (one task of a SLURM array); no tables
    merge: bool = False  # write the tables, plot and W&B run from the cells the shards wrote
    plan_only: bool = False  # resolve the models, write plan.json and exit

    def validate(self) -> None:
        if sum(map(bool, (self.shard, self.merge, self.plan_only))) > 1:
            raise ConfigError("--shard, --merge and --plan-only exclude each other")
        if self.shard:
            parse_shard(self.shard)


CONFIG = SweepJobConfig


def load(path: str | None, overrides: list[str] = (), values: dict | None = None) -> SweepJobConfig:
    cfg = load_sweep_config(path, overrides, values, cls=SweepJobConfig)
    cfg.validate()
    return cfg


def run(cfg: SweepJobConfig, cells: list | None = None) -> dict[str, Path] | None:
    """Returns the result files, or None when only a shard's cells (or only the plan) were done.

    Shards and the merge must see the same cells: SLURM tasks get them with the job (`cells`); by hand, they
    read the plan that `--plan-only` (or a whole run) wrote for this very config."""
    from ddpm.files import writable_dir, writing

    writable_dir(cfg.sweep_dir, "the sweep directory")  # before resolving the models or sampling a cell
    with writing(("the sweep directory", cfg.sweep_dir)):
        return _run(cfg, cells)


def _run(cfg: SweepJobConfig, cells: list | None) -> dict[str, Path] | None:
    if cells is None:
        if cfg.shard or cfg.merge:
            cells = read_plan(cfg)
            if cells is None:
                raise UserError(
                    f"no plan for this sweep config in {cfg.sweep_dir}: run `ddpm sweep --config ... --plan-only` "
                    f"once before the shards (ddpm submit sweep does it for you)"
                )
        else:
            cells = plan(cfg)
    text = (
        f" x {len(cfg.prompts)} prompts x {len(cfg.guidance_scales)} guidance scales"
        if any(c.prompt for c in cells)
        else ""
    )
    log.info(
        "sweep %s: %d cells (%d models x %d schedulers x %d step counts x %d seeds%s), %d images each, in %s",
        cfg.name,
        len(cells),
        len({c.model for c in cells}),
        len(cfg.schedulers),
        len(cfg.steps),
        len(cfg.seeds),
        text,
        cfg.num_images,
        cfg.sweep_dir,
    )
    if cfg.plan_only:
        print(f"plan: {cfg.sweep_dir / 'plan.json'}")
        return None
    if cfg.shard:
        i, n = parse_shard(cfg.shard)
        done, skipped = run_cells(cfg, cells[i::n])
        log.info("shard %d/%d: %d cells run, %d already done", i, n, done, skipped)
        print(f"cells: {cfg.sweep_dir / 'cells'}")
        return None
    if not cfg.merge:
        run_cells(cfg, cells)
    from ddpm.evaluation.results import write_results

    rows = collect_rows(cfg, cells)
    files = write_results(cfg.sweep_dir, cfg.name, cfg.metric, rows)
    if cfg.metric != "none" and _history(cfg, rows):
        files["history"] = cfg.sweep_dir / "history.png"
    _track(cfg, rows, files)
    print("\n".join(f"{k}: {v}" for k, v in files.items()))
    return files


def _history(cfg: SweepConfig, rows: list[dict]) -> bool:
    """history.png: quality against training step of the swept runs, across every sweep that scored them."""
    from ddpm.evaluation.compare import labels_for
    from ddpm.evaluation.results import plot_history
    from ddpm.evaluation.scores import read_scores
    from ddpm.models.export import run_dir_of

    run_dirs = [d for d in dict.fromkeys(run_dir_of(r["model_path"]) for r in rows) if (d / "config.yaml").is_file()]
    scores = {label: read_scores(d) for d, label in zip(run_dirs, labels_for(run_dirs))}
    return plot_history(cfg.metric, cfg.num_images, scores, cfg.sweep_dir / "history.png")


def _track(cfg: SweepConfig, rows: list[dict], files: dict[str, Path]) -> None:
    from ddpm.evaluation.metrics import metric_columns
    from ddpm.evaluation.sweep import grid_dict
    from ddpm.tracking import Tracker, run_metadata

    if not cfg.tracking.wandb:
        return
    tracker = Tracker(
        cfg.tracking,
        cfg.sweep_dir,
        cfg.name,
        {**grid_dict(cfg), "run": run_metadata()},
        job_type="sweep",
        group=_group(cfg, rows),
    )
    columns = [
        "cell",
        "model",
        "checkpoint_step",
        "scheduler",
        "steps",
        "seed",
        "num_images",
        *metric_columns(cfg.metric),
    ]
    if any(r.get("prompt") is not None for r in rows):
        columns[6:6] = ["prompt", "guidance"]
    table = [[r.get(c) for c in columns] for r in rows]
    grids = {i: cfg.sweep_dir / "cells" / r["cell"] / "grid.png" for i, r in enumerate(rows)}
    # Grids also go in as images of their own: W&B drops the images inside a table in offline runs (wandb#4611).
    images = {"sweep/plot": files["plot"], **{f"grid/{rows[i]['cell']}": p for i, p in grids.items()}}
    if "history" in files:
        images["sweep/history"] = files["history"]
    tracker.log_table("sweep/results", columns, table, row_images=grids, images=images)
    if cfg.metric != "none":
        key = metric_columns(cfg.metric)[0]
        best = min(rows, key=lambda r: r[key])
        tracker.summarize(
            {f"best_{key}": best[key], "best_cell": best["cell"], "num_images": cfg.num_images, "cells": len(rows)}
        )
    tracker.finish()


def _group(cfg: SweepConfig, rows: list[dict]) -> str:
    """The W&B group of the training run the first model comes from, so its sweeps sit beside it; else the sweep
    name."""
    from ddpm.config import load_config
    from ddpm.models.export import run_dir_of

    run_dir = run_dir_of(rows[0]["model_path"])
    try:
        run_cfg = load_config(run_dir / "config.yaml")
    except Exception:  # a pipeline from elsewhere (the Hub, a copy): no training run to sit beside
        return cfg.name
    return run_cfg.tracking.group or run_cfg.run_name
