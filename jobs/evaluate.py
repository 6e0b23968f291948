"""Evaluate job: FID and KID (or the offline FD/KD-digitsnet) of one model against a reference dataset.

It calls the same scorer as every sweep cell (ddpm.evaluation.evaluate.Evaluator): same sampling, same seeds
(image k of seed s is s * 1,000,000 + k), same metric code, same reference cache.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from ddpm.config import DEFAULT_SAMPLER, DEFAULT_STEPS, Precision, is_guidance_scale
from ddpm.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    pipeline: str = ""  # pipeline or checkpoint directory
    reference: str = ""  # digits, folder:PATH, hf:NAME[:SPLIT] or a config .yaml; "" = the run's training data
    num_images: int = 1000  # generated images; part of every figure (FID falls as it grows)
    metric: Literal["inception", "digitsnet"] = "inception"  # FID/KID (checked weights), or offline FD/KD-digitsnet
    scheduler: str = DEFAULT_SAMPLER  # sampler; see ddpm.sampling.sample.SAMPLERS
    steps: int = DEFAULT_STEPS  # sampler steps
    seed: int = 0  # image k uses seed * 1,000,000 + k, as in sweeps
    batch_size: int = 128  # images per forward pass
    labels: tuple[str, ...] = ()  # class-conditional models: class ids or names repeated over the images; () balanced
    guidance_scale: float = 1.0  # class-conditional models: classifier-free guidance (1: conditional model alone)
    reference_images: int = 0  # reference images for the statistics; 0: all
    inception_weights: str = ""  # local Inception weights file; "" is the cache, else a checked download
    out: str = ""  # JSON file; "" = <run>/evaluation/<metric>-<model>-<scheduler>-<steps>steps-<n>img-seed<seed>.json
    # (images and grid in the folder of the same name beside it)
    device: str = "auto"  # auto: CUDA if present, else the CPU
    precision: Precision = "auto"  # see ddpm.device.resolve_placement
    wandb: bool = True  # log a W&B evaluate run in the training run's group

    def validate(self) -> None:
        from ddpm.evaluation.evaluate import SEED_STRIDE
        from ddpm.sampling.sample import SAMPLERS

        if not self.pipeline:
            raise ConfigError("--pipeline is required (a pipeline or checkpoint directory)")
        if self.scheduler not in SAMPLERS:
            raise ConfigError(f"--scheduler: {self.scheduler!r} is not one of {', '.join(SAMPLERS)}")
        if not 0 <= self.seed < 2**31 // SEED_STRIDE:
            raise ConfigError(f"--seed must be in 0..{2**31 // SEED_STRIDE - 1}, got {self.seed}")
        if self.num_images < 2:
            raise ConfigError(f"--num-images: FID/KID need at least 2 images, got {self.num_images}")
        if not is_guidance_scale(self.guidance_scale):
            raise ConfigError(f"--guidance-scale must be a non-negative number, got {self.guidance_scale}")
        for key in ("steps", "batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be positive, got {getattr(self, key)}")


CONFIG = EvaluateConfig


def run(cfg: EvaluateConfig) -> dict:
    """Writes the JSON row (and the images beside it); returns the row with its path under "out"."""
    from ddpm.evaluation.scores import model_step
    from ddpm.files import writable_dir, writable_file, writing
    from ddpm.models.export import run_dir_of

    cfg.validate()
    path = Path(cfg.pipeline).resolve()
    run_dir = run_dir_of(path)
    name = f"{cfg.metric}-{path.name}-{cfg.scheduler}-{cfg.steps}steps-{cfg.num_images}img-seed{cfg.seed}"
    name += f"{_conditional_suffix(cfg)}.json"
    out = Path(cfg.out) if cfg.out else run_dir / "evaluation" / name
    step = model_step(path)
    # The outputs, before sampling: the JSON (images beside it) and, for a model of a training run, its scores.
    if any((path / f).is_file() for f in ("model_index.json", "manifest.json")):  # else loading says what is wrong
        writable_file(out, "the evaluation output")
        if step is not None:
            writable_dir(run_dir, "the run directory")
    with writing(("the evaluation output", out.parent), ("the run directory", run_dir)):
        return _evaluate(cfg, path, run_dir, out, step)


def _conditional_suffix(cfg: EvaluateConfig) -> str:
    """-cfg<scale>[-labels-<ids>] where a class-conditional evaluation leaves the defaults: outputs do not collide."""
    scale = f"-cfg{cfg.guidance_scale:g}" if cfg.guidance_scale != 1.0 else ""
    return scale + (f"-labels-{'_'.join(cfg.labels)}"[:80] if cfg.labels else "")


def _evaluate(cfg: EvaluateConfig, path: Path, run_dir: Path, out: Path, step: int | None) -> dict:
    from ddpm.evaluation.evaluate import Evaluator, Scoring, image_seeds, model_fingerprint
    from ddpm.evaluation.metrics import metric_columns
    from ddpm.evaluation.scores import append_score
    from ddpm.files import write_json

    scoring = Scoring(
        metric=cfg.metric,
        reference=cfg.reference,
        reference_images=cfg.reference_images,
        inception_weights=cfg.inception_weights,
        batch_size=cfg.batch_size,
    )
    seeds = image_seeds(cfg.seed, cfg.num_images)
    scores = Evaluator(scoring, cfg.device, cfg.precision).run(
        str(path), cfg.scheduler, cfg.steps, seeds, out.parent / out.stem, None, cfg.guidance_scale, cfg.labels
    )
    row = {
        "model": f"{run_dir.name}/{path.name}",
        "model_path": str(path),
        "model_fingerprint": model_fingerprint(str(path)),
        "scheduler": cfg.scheduler,
        "steps": cfg.steps,
        "seed": cfg.seed,
        "num_images": cfg.num_images,
        "metric": cfg.metric,
        "reference": cfg.reference,
        **scores,
    }
    write_json(out, row)
    if step is not None:  # a model of a training run: its score belongs to that run too
        append_score(run_dir, {**row, "step": step, "source": "evaluate"})
    if cfg.wandb:
        _track(cfg, run_dir, out.parent / out.stem, {**row, "step": step})
    columns = [*metric_columns(cfg.metric), "class_accuracy"]
    shown = "\n".join(f"{k}: {row[k]:.6g}" for k in columns if row.get(k) is not None)
    guided = f", labels {row['labels']}, guidance {row['guidance_scale']:g}" if "labels" in row else ""
    print(
        f"{row['num_images']} images ({cfg.scheduler}, {cfg.steps} steps, seed {cfg.seed}{guided}) "
        f"vs {row['reference_images']} "
        f"reference images ({row['reference_data']})\n{shown}\njson: {out}"
    )
    return {**row, "out": str(out)}


def _track(cfg: EvaluateConfig, run_dir: Path, out_dir: Path, row: dict) -> None:
    from ddpm.config import TrackingConfig, load_config, to_dict
    from ddpm.evaluation.metrics import metric_columns
    from ddpm.tracking import Tracker, run_metadata

    try:
        run_cfg = load_config(run_dir / "config.yaml")
        tracking, group = run_cfg.tracking, run_cfg.tracking.group or run_cfg.run_name
        training = to_dict(run_cfg)
    except Exception:  # a pipeline outside a run directory
        tracking, group, training = TrackingConfig(), run_dir.name, {}
    if not tracking.wandb:
        return
    name = f"{group}-evaluate-{cfg.metric}"
    # One W&B run per evaluation output (its id kept beside its images), in the training run's group and carrying
    # its whole config, so the project table sorts and plots scores against any training setting. Not the training
    # run itself: it may still be running, and two processes writing one W&B run conflict.
    config = {**training, "evaluate": asdict(cfg), "run": run_metadata(), "checkpoint_step": row.get("step")}
    tracker = Tracker(tracking, out_dir, name, config, job_type="evaluate", group=group)
    if row.get("step") is not None:  # the score at its training step, under the in-training evaluation's names
        tracker.log_against("train_step", row["step"], {f"eval/{k}": row[k] for k in metric_columns(cfg.metric)[:2]})
    tracker.summarize(
        {k: row[k] for k in [*metric_columns(cfg.metric), "num_images", "seed", "steps", "scheduler"] if k in row}
    )
    tracker.finish()
