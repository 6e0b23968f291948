"""Running a sweep's cells and collecting their rows: a cell is done when its row.json holds the same settings.

A cell's settings include a fingerprint of the model's weights, so a checkpoint replaced under the same
name, or a pipeline exported again, is sampled again; anything else already done is skipped.

A model of a training run also keeps every sweep's scores in the run's scores.jsonl (ddpm.evaluation.scores): a
cell that another sweep (last night's, say) scored with the same weights and settings is taken from there instead
of being sampled again, so a nightly sweep over the newest checkpoints only samples the checkpoints that are new.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from ddpm.errors import UserError
from ddpm.evaluation.evaluate import Evaluator, image_seeds, model_fingerprint, resolved_sampler
from ddpm.evaluation.scores import append_score, model_step, read_scores
from ddpm.evaluation.sweep import Cell, SweepConfig
from ddpm.files import write_json
from ddpm.models.export import run_dir_of

log = logging.getLogger(__name__)


def cell_settings(cfg: SweepConfig, cell: Cell) -> dict[str, Any]:
    """What decides a cell's result: a row made with other settings, or with other weights, is recomputed."""
    text = (
        {"prompt": cell.prompt, "guidance": cell.guidance, "negative_prompt": cfg.negative_prompt}
        if cell.prompt is not None
        else {}
    )
    if cell.class_conditional:
        text = {"guidance": cell.guidance, "class_labels": list(cfg.labels)}  # the row says "labels" as scores do
    return {
        "cell": cell.id,
        "model": cell.model,
        "model_path": cell.path,
        "model_fingerprint": model_fingerprint(cell.path),
        "scheduler": cell.scheduler,
        "sampler": resolved_sampler(cell.path, cell.scheduler),
        "steps": cell.steps,
        "seed": cell.seed,
        "num_images": cfg.num_images,
        "metric": cfg.metric,
        "reference": cfg.reference,
        "reference_images_asked": cfg.reference_images,
        "precision_setting": cfg.precision,
        **text,
        **({"ema_length": cell.ema_length} if cell.ema_length is not None else {}),
    }


def finished_row(cfg: SweepConfig, cell: Cell) -> dict | None:
    path = cfg.sweep_dir / "cells" / cell.id / "row.json"
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    settings = cell_settings(cfg, cell)
    return row if all(row.get(k) == v for k, v in settings.items()) else None


# The settings that make a score of another sweep this cell's score (the cell's name and the model's label and
# path aside: the same weights give the same images wherever they are).
REUSED_SETTINGS = ("model_fingerprint", "scheduler", "sampler", "steps", "seed", "num_images", "metric", "reference",
                   "reference_images_asked", "precision_setting", "prompt", "guidance", "negative_prompt",
                   "ema_length", "class_labels")  # fmt: skip


def scored_before(cfg: SweepConfig, cell: Cell) -> dict | None:
    """The row another sweep wrote into the model's run (scores.jsonl) for the same weights and settings."""
    run_dir = run_dir_of(cell.path)
    settings = cell_settings(cfg, cell)
    if not settings["model_fingerprint"] or not (run_dir / "config.yaml").is_file():
        return None
    for row in reversed(read_scores(run_dir)):
        if row.get("source") == "sweep" and all(row.get(k) == settings.get(k) for k in REUSED_SETTINGS):
            # Only a cell whose folder (its grid) still exists elsewhere: a deleted cell of this very sweep, or one
            # whose sweep was cleaned up, is sampled again.
            cell_dir = Path(row.get("cell_dir", ""))
            here = cfg.sweep_dir / "cells" / cell.id
            if (cell_dir / "grid.png").is_file() and cell_dir.resolve() != here.resolve():
                return row
    return None


def _reuse(cfg: SweepConfig, cell: Cell, scored: dict) -> None:
    """This cell's row.json from a score of another sweep, with that sweep's grid beside it (not its images)."""
    out = cfg.sweep_dir / "cells" / cell.id
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(scored["cell_dir"]) / "grid.png", out / "grid.png")
    kept = {k: v for k, v in scored.items() if k not in ("source", "sweep", "step")}
    write_json(out / "row.json", {**kept, **cell_settings(cfg, cell), "reused_from": scored.get("cell_dir")})


def _attach(cfg: SweepConfig, cell: Cell, row: dict, out: Path) -> None:
    """A scored cell of a training run's model goes into the run's scores.jsonl too."""
    step = model_step(cell.path)
    if step is not None and cfg.metric != "none":
        run_dir = run_dir_of(cell.path)
        append_score(run_dir, {**row, "step": step, "source": "sweep", "sweep": cfg.name, "cell_dir": str(out)})


def run_cells(cfg: SweepConfig, cells: list[Cell]) -> tuple[int, int]:
    """Runs the cells not yet done (and not scored by another sweep); returns (run, skipped)."""
    todo = [c for c in cells if finished_row(cfg, c) is None]
    if len(todo) < len(cells):
        log.info("%d of %d cells already done; skipping them", len(cells) - len(todo), len(cells))
    reused = [(c, row) for c in todo if (row := scored_before(cfg, c)) is not None]
    for cell, row in reused:
        _reuse(cfg, cell, row)
    if reused:
        log.info("%d cells scored by an earlier sweep with the same weights and settings; taken from it", len(reused))
        todo = [c for c in todo if finished_row(cfg, c) is None]
    if todo:
        from ddpm.evaluation.metrics import metric_columns

        evaluator = Evaluator(cfg.scoring, cfg.device, cfg.precision)
        for i, cell in enumerate(todo, 1):
            log.info("cell %d/%d: %s", i, len(todo), cell.id)
            out = cfg.sweep_dir / "cells" / cell.id
            scores = evaluator.run(
                cell.path,
                cell.scheduler,
                cell.steps,
                image_seeds(cell.seed, cfg.num_images),
                out,
                cell.prompt,
                cell.guidance,
                cfg.labels if cell.class_conditional else (),  # other models in the sweep take no labels
            )
            row = {**cell_settings(cfg, cell), **scores}
            _attach(cfg, cell, row, out)  # before row.json: a cell killed in between is redone, not lost to the run
            write_json(out / "row.json", row)  # last: its presence means the cell is done
            shown = [
                f"{k}={row[k]:.4g}" for k in [*metric_columns(cfg.metric), "class_accuracy"] if row.get(k) is not None
            ]
            log.info("  %s", ", ".join(shown))
    return len(todo), len(cells) - len(todo)


def collect_rows(cfg: SweepConfig, cells: list[Cell]) -> list[dict]:
    """Every cell's row, in plan order; a missing cell is an error naming how many and the first few."""
    rows, missing = [], []
    for cell in cells:
        row = finished_row(cfg, cell)
        (missing.append(cell.id) if row is None else rows.append(row))
    if missing:
        raise UserError(
            f"{len(missing)} of {len(cells)} cells are not done yet ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}); run the missing shards, then --merge"
        )
    return rows
