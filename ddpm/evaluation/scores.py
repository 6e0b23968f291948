"""A run's scores: <run>/scores.jsonl, one JSON line per score of one of its models, whoever computed it.

In-training evaluation, `ddpm evaluate` and sweeps append here, so a run directory alone answers "how good is this
run, and since which step?" (ddpm compare reads it, and the model card takes the published weights' scores). A
score computed again for the same key (a rerun) is a newer line, and readers keep the newest line per key; a
training run resumed at step s drops the in-training lines after s, which it will write again (as metrics.jsonl).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ddpm.evaluation.metrics import METRICS

log = logging.getLogger(__name__)

SCORES_FILE = "scores.jsonl"
# What makes two scores the same measurement: the model (training step and weights), how it was sampled (sampler,
# steps, precision), how many images from which seeds, and the metric with its reference images.
KEY = ("step", "model_fingerprint", "scheduler", "steps", "seed", "num_images", "metric", "reference_data",
       "reference_images", "precision")  # fmt: skip
# ... and for a class-conditional model, the guidance scale and the labels ("balanced": round robin over the
# classes). Absent from unconditional scores, so the rows written before them keep their keys.
CONDITIONAL_KEY = ("guidance_scale", "labels")


def headline(metric: str) -> str:
    """The score a metric is ranked by: its Fréchet distance column (fid, fd_digitsnet)."""
    return METRICS[metric][0]


def append_score(run_dir: Path, row: dict[str, Any]) -> bool:
    """One line, under an exclusive lock of the file (fcntl locks hold across NFS clients, where O_APPEND alone does
    not). Returns False, with a warning, when the file cannot be written (someone else's run, a read-only
    copy): keeping the score in the run is bookkeeping, and the score itself is already written elsewhere."""
    missing = [k for k in KEY if k not in row]
    if missing:
        raise ValueError(f"a score needs {', '.join(missing)}")
    line = (json.dumps(row, sort_keys=True) + "\n").encode()
    try:
        with _locked(Path(run_dir) / SCORES_FILE) as fd:
            os.write(fd, line)
    except OSError as e:
        log.warning("could not add the score to %s (%s)", Path(run_dir) / SCORES_FILE, e)
        return False
    return True


def drop_training_scores_after(run_dir: Path, step: int) -> None:
    """A training run resumed at `step` will score its later steps again: the lines an abandoned attempt wrote for
    them go (as metrics.jsonl's do)."""
    path = Path(run_dir) / SCORES_FILE
    if not path.is_file():
        return
    with _locked(path) as fd:
        lines = path.read_text().splitlines()
        kept = [line for line in lines if not _is_training_after(line, step)]
        if len(kept) != len(lines):
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, "".join(line + "\n" for line in kept).encode())


def _is_training_after(line: str, step: int) -> bool:
    try:
        row = json.loads(line)
    except ValueError:
        return True  # a line cut short by a kill
    return isinstance(row, dict) and row.get("source") == "training" and row.get("step", 0) > step


@contextmanager
def _locked(path: Path) -> Iterator[int]:
    """The file opened for appending (created with the umask's permissions) and locked exclusively."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # closing releases the lock


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
        if isinstance(row, dict) and all(k in row for k in KEY):
            rows[tuple(str(row[k]) for k in KEY) + tuple(str(row.get(k)) for k in CONDITIONAL_KEY)] = row
    return list(rows.values())


def model_step(model: str | Path) -> int | None:
    """The training step of a run's checkpoint (its name), of a post-hoc EMA export (ema.json) or of its exported
    pipeline (summary.json); None for a model outside a run directory."""
    from ddpm.evaluation.evaluate import checkpoint_step
    from ddpm.models.export import run_dir_of

    model = Path(model)
    run_dir = run_dir_of(model)
    if not (run_dir / "config.yaml").is_file():
        return None
    if (step := checkpoint_step(model)) is not None:
        return step
    try:
        return int(json.loads((run_dir / "summary.json").read_text())["steps"]) if model.name == "pipeline" else None
    except (OSError, ValueError, KeyError):
        return None


def measurement(row: dict[str, Any]) -> tuple:
    """How a score was measured: only scores measured the same way are compared (a curve, a best, a card)."""
    return tuple(row[k] for k in ("metric", "reference_data", "reference_images", "num_images", "scheduler", "steps",
                                  "seed", "precision")) + tuple(row.get(k) for k in CONDITIONAL_KEY)  # fmt: skip


def best_score(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row with the lowest headline score among the rows of the most used (metric, reference, images,
    sampler, steps): only scores measured the same way are compared."""
    if not rows:
        return None

    counts: dict[tuple, int] = {}
    for r in rows:
        counts[measurement(r)] = counts.get(measurement(r), 0) + 1
    common = max(counts, key=counts.get)
    same = [r for r in rows if measurement(r) == common and headline(r["metric"]) in r]
    return min(same, key=lambda r: r[headline(r["metric"])]) if same else None
