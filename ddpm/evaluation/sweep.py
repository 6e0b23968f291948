"""Sampling sweeps: the grid of models x schedulers x step counts x seeds (x prompts x guidance scales for
text-to-image pipelines, x guidance scales for class-conditional models; x post-hoc EMA lengths for runs with EMA
snapshots), one cell at a time. Long because it holds the whole grid, config to plan, in one place: its keys,
their checks, and how models become cells.

A sweep lives in `<out_dir>/<name>/`:
    plan.json                        the cells, in order, with the models resolved to directories
    cells/<model>/<scheduler>-<steps>steps-seed<seed>[-p<prompt>-g<guidance> | -cfg<guidance>]/
        images/seed-*.png, grid.png, row.json   (row.json is written last: its presence means done)
    results.csv, results.json, plot.png          written when every cell is done (or by --merge)
    guidance-plot.png                            class-conditional models: the score against the guidance scale

A cell is skipped on a rerun when its row.json exists and was made with the same settings, so an
interrupted sweep resumes, and a SLURM array runs shards `--shard i/n` (cells i, i+n, ...) into the
same directory, after which a final `--merge` writes the tables. The seed of image k in a cell with
seed s is s * 1,000,000 + k: two runs (or two checkpoints) show the same noise in the same cell.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ddpm.config import DEFAULT_SAMPLER, DEFAULT_STEPS, Precision, TrackingConfig, is_guidance_scale
from ddpm.errors import ConfigError, UserError
from ddpm.evaluation.evaluate import SEED_STRIDE, Scoring
from ddpm.files import write_json
from ddpm.typed_config import build_config, read_tree, to_dict

log = logging.getLogger(__name__)


@dataclass
class ModelSource:
    """One entry of `models`: exactly one of pipeline, checkpoints, run, hub."""

    pipeline: str = ""  # a diffusers pipeline directory (runs/<name>/pipeline, or any saved pipeline)
    hub: str = ""  # a Hub model id (user/name), fetched once when the sweep is planned
    checkpoints: str = ""  # a glob of checkpoint directories (runs/<name>/checkpoints/step-*)
    run: str = ""  # a run directory: its `newest` newest valid checkpoints
    newest: int = 1  # with run: how many of its newest valid checkpoints


@dataclass
class SweepConfig:
    name: str = ""  # the sweep's directory under out_dir; "" uses the config file's name
    out_dir: str = "sweeps"  # parent of the sweep directories
    models: tuple[ModelSource, ...] = ()  # the models to sweep: a list of {pipeline|hub|checkpoints|run: ...}
    schedulers: tuple[str, ...] = (DEFAULT_SAMPLER,)  # samplers (see ddpm.sampling.sample.SAMPLERS), a cell each
    steps: tuple[int, ...] = (DEFAULT_STEPS,)  # sampling step counts, a cell each
    seeds: tuple[int, ...] = (0,)  # a cell each; image k of seed s uses seed s * 1,000,000 + k
    prompts: tuple[str, ...] = ()  # text-to-image models: a cell per prompt (unconditional models ignore them)
    guidance_scales: tuple[float, ...] = (7.5,)  # text-to-image models: classifier-free guidance, a cell per scale
    negative_prompt: str = ""  # text-to-image models: the negative prompt of every cell
    ema_lengths: tuple[float, ...] = ()  # post-hoc EMA sigma_rels: each model of a run with EMA snapshots is also
    # swept as its reconstruction at each (`ddpm ema`, at the newest snapshot up to its step), a model each
    # Class-conditional models (model.num_classes): samples class-balanced unless labels are given.
    class_guidance_scales: tuple[float, ...] = (1.0,)  # class-conditional models: guidance, a cell per scale
    labels: tuple[str, ...] = ()  # class-conditional models: class ids or names over the images; () round robin
    num_images: int = 1000  # images per cell; part of every reported figure
    batch_size: int = 128  # images per forward pass
    grid_images: int = 64  # the first n images of a cell form its grid
    metric: Literal["inception", "digitsnet", "none"] = "inception"  # FID/KID, offline FD/KD-digitsnet, or none
    reference: str = (
        ""  # dataset to compare with; "" is each model's training data (ddpm.evaluation.metrics.reference_data)
    )
    reference_images: int = 0  # reference images for the statistics; 0: all
    inception_weights: str = ""  # local weights file for compute nodes without internet
    device: str = "auto"  # auto: CUDA when present, else the CPU
    precision: Precision = "auto"  # see ddpm.device.resolve_placement
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # the sweep's W&B run

    @property
    def scoring(self) -> Scoring:
        return Scoring(
            metric=self.metric,
            reference=self.reference,
            reference_images=self.reference_images,
            inception_weights=self.inception_weights,
            batch_size=self.batch_size,
            grid_images=self.grid_images,
            negative_prompt=self.negative_prompt,
        )

    @property
    def sweep_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def load_sweep_config(
    path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    values: dict[str, Any] | None = None,
    cls: type = SweepConfig,
) -> SweepConfig:
    """A sweep config (or a subclass that adds a job's own fields) from its YAML file, overrides and flags."""
    if not path:
        raise ConfigError("--config is required (a sweep YAML, e.g. configs/sweeps/digits.yaml)")
    cfg = build_config(cls, read_tree(path, overrides, values))
    if not cfg.name:
        cfg.name = Path(path).stem
    validate_sweep(cfg)
    return absolute_paths(cfg)


def absolute_paths(cfg: SweepConfig) -> SweepConfig:
    """Paths as meant where the config was read, so a SLURM job (run from a code snapshot) and a local rerun agree."""
    models = tuple(
        dataclasses.replace(
            m,
            pipeline=m.pipeline and str(Path(m.pipeline).resolve()),
            run=m.run and str(Path(m.run).resolve()),
            checkpoints=m.checkpoints and os.path.abspath(m.checkpoints),
        )
        for m in cfg.models
    )
    reference = cfg.reference
    if reference.startswith("folder:"):
        reference = "folder:" + str(Path(reference.removeprefix("folder:")).resolve())
    elif reference.endswith((".yaml", ".yml")):
        reference = str(Path(reference).resolve())
    return dataclasses.replace(
        cfg,
        out_dir=str(Path(cfg.out_dir).resolve()),
        models=models,
        reference=reference,
        inception_weights=cfg.inception_weights and str(Path(cfg.inception_weights).resolve()),
    )


def validate_sweep(cfg: SweepConfig) -> None:
    from ddpm.sampling.sample import SAMPLERS

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(bool(cfg.models), "models: give at least one model (pipeline:, checkpoints:, run: or hub:)")
    for i, m in enumerate(cfg.models):
        given = [k for k in ("pipeline", "checkpoints", "run", "hub") if getattr(m, k)]
        need(
            len(given) == 1,
            f"models[{i}]: give exactly one of pipeline, checkpoints, run, hub (got {', '.join(given) or 'none'})",
        )
        need(
            not m.hub or (m.hub.count("/") == 1 and all(m.hub.split("/"))),
            f"models[{i}].hub: {m.hub!r} is not a Hub id user/name",
        )
        need(m.newest >= 1, f"models[{i}].newest must be at least 1, got {m.newest}")
    need(
        bool(cfg.schedulers) and bool(cfg.steps) and bool(cfg.seeds),
        "schedulers, steps and seeds each need at least one value",
    )
    for s in cfg.schedulers:
        need(s in SAMPLERS, f"schedulers: {s!r} is not one of {', '.join(SAMPLERS)}")
    need(all(s > 0 for s in cfg.steps), f"steps must be positive, got {list(cfg.steps)}")
    need(
        all(0 <= s < 2**31 // SEED_STRIDE for s in cfg.seeds),
        f"seeds must be in 0..{2**31 // SEED_STRIDE - 1}, got {list(cfg.seeds)}",
    )
    need(
        cfg.num_images >= 1 and cfg.batch_size >= 1 and cfg.grid_images >= 1,
        "num_images, batch_size and grid_images must be positive",
    )
    need(
        cfg.metric == "none" or cfg.num_images >= 2, f"num_images: FID/KID need at least 2 images, got {cfg.num_images}"
    )
    need(all(p.strip() for p in cfg.prompts), "prompts: an empty prompt")
    for sigma_rel in cfg.ema_lengths:
        need(0 < sigma_rel < 0.289, f"ema_lengths: {sigma_rel} is not in (0, 0.289)")
    need(
        bool(cfg.guidance_scales) and all(g >= 0 and math.isfinite(g) for g in cfg.guidance_scales),
        f"guidance_scales: need one value or more, each a non-negative number, got {list(cfg.guidance_scales)}",
    )
    need(
        bool(cfg.class_guidance_scales) and all(is_guidance_scale(g) for g in cfg.class_guidance_scales),
        f"class_guidance_scales: need one value or more, each a non-negative number, got "
        f"{list(cfg.class_guidance_scales)}",
    )
    need(
        bool(cfg.name) and "/" not in cfg.name and cfg.name not in (".", ".."),
        f"name: {cfg.name!r} is not a valid directory name",
    )


# --------------------------------------------------------------------------------------
# The plan: cells in a fixed order, models resolved once.


@dataclass
class Cell:
    model: str  # label, e.g. digits-16px/step-00002000 or digits-16px/pipeline
    path: str  # pipeline or checkpoint directory
    scheduler: str
    steps: int
    seed: int
    prompt: str | None = None  # text-to-image cells only
    prompt_index: int = 0
    guidance: float | None = None  # text-to-image and class-conditional cells
    ema_length: float | None = None  # the sigma_rel of a post-hoc EMA model; None: the model's own weights

    @property
    def class_conditional(self) -> bool:
        """A class-conditional model's cell: guided, without a prompt (make_plan gives the others no guidance)."""
        return self.prompt is None and self.guidance is not None

    @property
    def id(self) -> str:
        text = f"-p{self.prompt_index}-g{self.guidance:g}" if self.prompt is not None else ""
        classes = f"-cfg{self.guidance:g}" if self.class_conditional else ""
        return f"{self.model}/{self.scheduler}-{self.steps}steps-seed{self.seed}{text}{classes}"


def _label(path: Path) -> str:
    """<run>/<pipeline or step-N>, or <user>--<name>/<commit> for a Hub snapshot: short, unique within a sweep of
    runs, and a valid relative path."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return f"{path.parent.parent.name.removeprefix('models--')}/{path.name[:12]}"
    return f"{path.parent.parent.name if path.parent.name == 'checkpoints' else path.parent.name}/{path.name}"


def resolve_models(cfg: SweepConfig) -> list[tuple[str, str]]:
    """(label, directory) of every model, in config order; a missing model is an error naming it."""
    from ddpm.models.checkpoint import verified_checkpoints
    from ddpm.sampling.pretrained import fetch_hub_pipeline

    found: list[Path] = []
    for i, m in enumerate(cfg.models):
        if m.hub:
            found.append(fetch_hub_pipeline(m.hub, f"models[{i}].hub"))
        elif m.pipeline:
            if not (Path(m.pipeline) / "model_index.json").is_file():
                raise UserError(f"models[{i}].pipeline: {m.pipeline} is not a pipeline directory (no model_index.json)")
            found.append(Path(m.pipeline))
        elif m.checkpoints:
            paths = sorted(Path(p) for p in glob.glob(m.checkpoints) if (Path(p) / "manifest.json").is_file())
            if not paths:
                raise UserError(f"models[{i}].checkpoints: no checkpoint matches {m.checkpoints}")
            found.extend(paths)
        else:
            ckpts = verified_checkpoints(Path(m.run) / "checkpoints", newest=m.newest)
            if not ckpts:
                raise UserError(f"models[{i}].run: {m.run} has no valid checkpoint under {Path(m.run) / 'checkpoints'}")
            found.extend(sorted(c.path for c in ckpts))
    out: dict[str, str] = {}  # label -> path
    for path in (p.resolve() for p in found):
        label = _label(path)
        if label in out and out[label] != str(path):
            raise UserError(
                f"models: {out[label]} and {path} would share the cell folder {label}; sweep them separately"
            )
        out[label] = str(path)  # the same model listed twice is swept once
    return [*out.items(), *posthoc_models(out.items(), cfg.ema_lengths)]


def posthoc_models(models, ema_lengths: tuple[float, ...]) -> list[tuple[str, str]]:
    """(label, directory) of the post-hoc EMA reconstructions of every model in a run with EMA snapshots: at the
    newest snapshot up to the model's step, each sigma_rel exported once into the run (ddpm.models.phema) and
    reused while its snapshots are the same, so a resumed or a nightly sweep samples the same files."""
    from ddpm.evaluation.scores import model_step
    from ddpm.models.export import run_dir_of
    from ddpm.models.phema import export_reconstruction, list_snapshots, snapshot_dir

    found: dict[str, str] = {}
    for label, path in models if ema_lengths else ():
        run_dir, step = run_dir_of(path), model_step(path)
        at = [s.step for s in list_snapshots(snapshot_dir(run_dir)) if step is not None and s.step <= step]
        if not at:
            log.info("ema_lengths: %s has no EMA snapshot up to its step; swept with its own weights only", label)
        for sigma_rel in ema_lengths if at else ():
            ema_label = f"{run_dir.name}/ema-step-{max(at):08d}-sigma_rel-{sigma_rel:g}"
            if ema_label not in found:
                found[ema_label] = str(export_reconstruction(run_dir, sigma_rel, max(at)).resolve())
    return list(found.items())


def make_plan(cfg: SweepConfig) -> list[Cell]:
    from ddpm.models.export import run_dir_of, saved_class_names, saved_num_classes
    from ddpm.models.phema import reconstruction_settings
    from ddpm.sampling.guidance import parse_labels
    from ddpm.sampling.pretrained import saved_takes_prompt

    cells = []
    for label, path in resolve_models(cfg):
        if cfg.metric != "none" and not cfg.reference and not (run_dir_of(path) / "config.yaml").is_file():
            raise UserError(
                f"models: {label} has no training run to compare with; give reference: (digits, folder:PATH, "
                "hf:NAME[:SPLIT] or a config YAML), or metric: none"
            )
        text = saved_takes_prompt(path)
        if text and not cfg.prompts:
            raise UserError(f"models: {label} is a text-to-image pipeline; give prompts: [...] in the sweep config")
        if text:
            variants = [(p, j, g) for j, p in enumerate(cfg.prompts) for g in cfg.guidance_scales]
        elif saved_num_classes(path):
            variants = [(None, 0, g) for g in cfg.class_guidance_scales]
            parse_labels(cfg.labels, saved_class_names(path), f"labels (model {label})")  # now, not hours in
        else:
            variants = [(None, 0, None)]
        ema_length = (reconstruction_settings(path) or {}).get("sigma_rel")
        cells += [
            Cell(label, path, sch, steps, seed, prompt, j, g, ema_length)
            for sch in cfg.schedulers
            for steps in cfg.steps
            for seed in cfg.seeds
            for prompt, j, g in variants
        ]
    return cells


def grid_dict(cfg: SweepConfig) -> dict[str, Any]:
    """The sweep's own keys, without those a job adds to say how this invocation runs (shard, merge, ...)."""
    tree = to_dict(cfg)
    return {f.name: tree[f.name] for f in dataclasses.fields(SweepConfig)}


def config_digest(cfg: SweepConfig) -> str:
    return hashlib.sha256(json.dumps(grid_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def plan(cfg: SweepConfig) -> list[Cell]:
    """Resolve the models now (the newest checkpoints of a run change while it trains) and record the cells."""
    cells = make_plan(cfg)
    write_plan(cfg, cells)
    return cells


def write_plan(cfg: SweepConfig, cells: list[Cell]) -> None:
    cfg.sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        cfg.sweep_dir / "plan.json",
        {"config_digest": config_digest(cfg), "config": grid_dict(cfg), "cells": [c.__dict__ for c in cells]},
    )


def read_plan(cfg: SweepConfig) -> list[Cell] | None:
    """The plan written for this very config (shards of one array share it), else None."""
    path = cfg.sweep_dir / "plan.json"
    if not path.is_file():
        return None
    plan = json.loads(path.read_text())
    if plan.get("config_digest") != config_digest(cfg):
        return None
    return [Cell(**c) for c in plan["cells"]]


def parse_shard(text: str) -> tuple[int, int]:
    """ "i/n" with 0 <= i < n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise UserError(f"--shard {text}: need 0 <= i < n")
    return i, n
