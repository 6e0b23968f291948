"""A run's scores: <run>/scores.jsonl, one JSON line per score of one of its models, whoever computed it.

In-training evaluation and `ddpm evaluate` append here, so a run directory alone answers "how good is this run,
and since which step?" (ddpm compare reads it, and the model card takes its best score). Lines are only ever
appended; a score computed again for the same key (after a resume replays steps, or a rerun) is a newer line,
and readers keep the newest line per key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ddpm.metrics import METRICS

SCORES_FILE = "scores.jsonl"
# What makes two scores the same measurement: the model (training step and weights), how it was sampled, how many
# images from which seeds, and the metric with its reference.
KEY = ("step", "model_fingerprint", "scheduler", "steps", "seed", "num_images", "metric", "reference_data")


def headline(metric: str) -> str:
    """The score a metric is ranked by: its Fréchet distance column (fid, fd_digitsnet)."""
    return METRICS[metric][0]


def append_score(run_dir: Path, row: dict[str, Any]) -> None:
    """One line, written with a single write() on an O_APPEND descriptor: concurrent writers (an evaluation while
    training runs) never interleave within a line."""
    missing = [k for k in KEY if k not in row]
    if missing:
        raise ValueError(f"a score needs {', '.join(missing)}")
    line = (json.dumps(row, sort_keys=True) + "\n").encode()
    fd = os.open(run_dir / SCORES_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_scores(run_dir: Path) -> list[dict[str, Any]]:
    """The newest line per key, in the order the keys first appeared; a line cut short by a kill is skipped."""
    path = Path(run_dir) / SCORES_FILE
    if not path.is_file():
        return []
    rows: dict[tuple, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows[tuple(str(row.get(k)) for k in KEY)] = row
    return list(rows.values())


def model_step(model: str | Path) -> int | None:
    """The training step of a run's checkpoint (its name) or of its exported pipeline (summary.json); None for a
    model outside a run directory."""
    model = Path(model)
    run_dir = model.parent.parent if model.parent.name == "checkpoints" else model.parent
    if not (run_dir / "config.yaml").is_file():
        return None
    name = model.name
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    try:
        return int(json.loads((run_dir / "summary.json").read_text())["steps"]) if name == "pipeline" else None
    except (OSError, ValueError, KeyError):
        return None


def best_score(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row with the lowest headline score among the rows of the most used (metric, reference, images,
    sampler, steps): only scores measured the same way are compared."""
    if not rows:
        return None

    def how(r: dict) -> tuple:
        return (r["metric"], r["reference_data"], r["num_images"], r["scheduler"], r["steps"])

    counts: dict[tuple, int] = {}
    for r in rows:
        counts[how(r)] = counts.get(how(r), 0) + 1
    common = max(counts, key=counts.get)
    same = [r for r in rows if how(r) == common and headline(r["metric"]) in r]
    return min(same, key=lambda r: r[headline(r["metric"])]) if same else None
