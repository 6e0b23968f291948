"""Running a sweep's cells and collecting their rows: a cell is done when its row.json holds the same settings.

A cell's settings include a fingerprint of the model's weights, so a checkpoint replaced under the same
name, or a pipeline exported again, is sampled again; anything else already done is skipped.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ddpm.errors import UserError
from ddpm.evaluate import Evaluator, image_seeds, model_fingerprint
from ddpm.files import write_json
from ddpm.sweep import Cell, SweepConfig

log = logging.getLogger(__name__)


def cell_settings(cfg: SweepConfig, cell: Cell) -> dict[str, Any]:
    """What decides a cell's result: a row made with other settings, or with other weights, is recomputed."""
    text = (
        {"prompt": cell.prompt, "guidance": cell.guidance, "negative_prompt": cfg.negative_prompt}
        if cell.prompt is not None
        else {}
    )
    return {
        "cell": cell.id,
        "model": cell.model,
        "model_path": cell.path,
        "model_fingerprint": model_fingerprint(cell.path),
        "scheduler": cell.scheduler,
        "steps": cell.steps,
        "seed": cell.seed,
        "num_images": cfg.num_images,
        "metric": cfg.metric,
        "reference": cfg.reference,
        "reference_images_asked": cfg.reference_images,
        "precision_setting": cfg.precision,
        **text,
    }


def finished_row(cfg: SweepConfig, cell: Cell) -> dict | None:
    path = cfg.sweep_dir / "cells" / cell.id / "row.json"
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    settings = cell_settings(cfg, cell)
    return row if all(row.get(k) == v for k, v in settings.items()) else None


def run_cells(cfg: SweepConfig, cells: list[Cell]) -> tuple[int, int]:
    """Runs the cells not yet done; returns (run, skipped)."""
    todo = [c for c in cells if finished_row(cfg, c) is None]
    if len(todo) < len(cells):
        log.info("%d of %d cells already done; skipping them", len(cells) - len(todo), len(cells))
    if todo:
        from ddpm.metrics import metric_columns

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
            )
            row = {**cell_settings(cfg, cell), **scores}
            write_json(out / "row.json", row)  # last: its presence means the cell is done
            log.info("  %s", ", ".join(f"{k}={row[k]:.4g}" for k in metric_columns(cfg.metric) if k in row))
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
