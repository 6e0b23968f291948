"""Evaluate job: FID and KID (or the offline FD/KD-digitsnet) of one pipeline against a reference dataset.

It is a sweep of one cell: same sampling, same seeds, same metric code, same reference cache.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ddpm.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    pipeline: str = ""                 # pipeline or checkpoint directory
    reference: str = ""                # digits, folder:PATH, hf:NAME[:SPLIT], a config .yaml; "" = the run's training data
    num_images: int = 1000
    metric: Literal["inception", "digitsnet"] = "inception"
    scheduler: str = "ddim"
    steps: int = 25
    seed: int = 0
    batch_size: int = 128
    reference_images: int = 0
    inception_weights: str = ""
    out: str = ""                      # JSON file; "" = <run>/evaluation/<metric>-<model>-<scheduler>-<steps>steps-<n>img-seed<seed>.json
                                       # (images and grid under the folder of the same name beside it, in cells/)
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    wandb: bool = True


def run(cfg: EvaluateConfig) -> dict:
    from ddpm.config import TrackingConfig
    from ddpm.sweep import Cell, CellRunner, ModelSource, SweepConfig, validate_sweep

    if not cfg.pipeline:
        raise ConfigError("--pipeline is required (a pipeline or checkpoint directory)")
    from ddpm.export import run_dir_of

    path = Path(cfg.pipeline).resolve()
    run_dir = run_dir_of(path)
    out = Path(cfg.out) if cfg.out else (run_dir / "evaluation" /
                                         f"{cfg.metric}-{path.name}-{cfg.scheduler}-{cfg.steps}steps-{cfg.num_images}img-seed{cfg.seed}.json")
    sweep = SweepConfig(name=out.stem, out_dir=str(out.parent), models=(ModelSource(pipeline=str(path)),),
                        schedulers=(cfg.scheduler,), steps=(cfg.steps,), seeds=(cfg.seed,), num_images=cfg.num_images,
                        batch_size=cfg.batch_size, grid_images=64, metric=cfg.metric, reference=cfg.reference,
                        reference_images=cfg.reference_images, inception_weights=cfg.inception_weights, device=cfg.device,
                        precision=cfg.precision, tracking=TrackingConfig(wandb=False))
    validate_sweep(sweep)
    row = CellRunner(sweep).run(Cell(model=f"{run_dir.name}/{path.name}", path=str(path), scheduler=cfg.scheduler,
                                     steps=cfg.steps, seed=cfg.seed))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1))
    if cfg.wandb:
        _track(cfg, run_dir, out.parent / out.stem, row)
    return {**row, "out": str(out)}


def _track(cfg: EvaluateConfig, run_dir: Path, out_dir: Path, row: dict) -> None:
    from ddpm.config import TrackingConfig, load_config
    from ddpm.sweep import metric_columns
    from ddpm.tracking import Tracker, run_metadata

    try:
        run_cfg = load_config(run_dir / "config.yaml")
        tracking, group = run_cfg.tracking, run_cfg.tracking.group or run_cfg.run_name
    except Exception:  # a pipeline outside a run directory
        tracking, group = TrackingConfig(), run_dir.name
    if not tracking.wandb:
        return
    name = f"{group}-evaluate-{cfg.metric}"
    # One W&B run per evaluation output (its id kept beside its images): rerunning it updates that run.
    tracker = Tracker(tracking, out_dir, name, {"evaluate": dict(cfg.__dict__), "run": run_metadata()}, job_type="evaluate", group=group)
    tracker.summarize({k: row[k] for k in [*metric_columns(cfg.metric), "num_images", "seed", "steps", "scheduler"] if k in row})
    tracker.finish()
