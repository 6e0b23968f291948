"""Sampling sweeps: the grid of models x schedulers x step counts x seeds (x prompts x guidance scales for
text-to-image pipelines), one cell at a time.

A sweep lives in `<out_dir>/<name>/`:
    plan.json                        the cells, in order, with the models resolved to directories
    cells/<model>/<scheduler>-<steps>steps-seed<seed>[-p<prompt>-g<guidance>]/
        images/seed-*.png, grid.png, row.json   (row.json is written last: its presence means done)
    results.csv, results.json, plot.png          written when every cell is done (or by --merge)

A cell is skipped on a rerun when its row.json exists and was made with the same settings, so an
interrupted sweep resumes, and a SLURM array runs shards `--shard i/n` (cells i, i+n, ...) into the
same directory, after which a final `--merge` writes the tables. The seed of image k in a cell with
seed s is s * 1,000,000 + k: two runs (or two checkpoints) show the same noise in the same cell.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ddpm.config import TrackingConfig, build_config, read_tree, to_dict
from ddpm.errors import ConfigError, UserError
from ddpm.files import unique_suffix, write_json

log = logging.getLogger(__name__)

SEED_STRIDE = 1_000_000  # image k of a cell with seed s uses seed s * SEED_STRIDE + k


@dataclass
class ModelSource:
    """One entry of `models`: exactly one of pipeline, checkpoints, run, hub."""
    pipeline: str = ""                 # a diffusers pipeline directory (runs/<name>/pipeline, or any saved pipeline)
    hub: str = ""                      # a Hub model id (user/name), fetched once when the sweep is planned
    checkpoints: str = ""              # a glob of checkpoint directories (runs/<name>/checkpoints/step-*)
    run: str = ""                      # a run directory: its `newest` newest valid checkpoints
    newest: int = 1


@dataclass
class SweepConfig:
    name: str = ""                     # the sweep's directory under out_dir; "" uses the config file's name
    out_dir: str = "sweeps"
    models: tuple[ModelSource, ...] = ()
    schedulers: tuple[str, ...] = ("ddim",)
    steps: tuple[int, ...] = (25,)
    seeds: tuple[int, ...] = (0,)
    prompts: tuple[str, ...] = ()      # text-to-image models: a cell per prompt (unconditional models ignore them)
    guidance_scales: tuple[float, ...] = (7.5,)  # text-to-image models: classifier-free guidance, a cell per scale
    negative_prompt: str = ""
    num_images: int = 1000             # images per cell; part of every reported figure
    batch_size: int = 128
    grid_images: int = 64              # the first n images of a cell form its grid
    metric: Literal["inception", "digitsnet", "none"] = "inception"  # FID/KID, the offline FD/KD-digitsnet, or images only
    reference: str = ""                # dataset to compare with; "" is each model's training data (see ddpm.evaluate.reference_data)
    reference_images: int = 0          # reference images for the statistics; 0: all
    inception_weights: str = ""        # local weights file for compute nodes without internet
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def sweep_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def load_sweep_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig:
    cfg = build_config(SweepConfig, read_tree(path, overrides))
    if not cfg.name:
        cfg.name = Path(path).stem
    validate_sweep(cfg)
    return absolute_paths(cfg)


def absolute_paths(cfg: SweepConfig) -> SweepConfig:
    """Paths as meant where the config was read, so a SLURM job (run from a code snapshot) and a local rerun agree."""
    import dataclasses

    models = tuple(dataclasses.replace(m, pipeline=m.pipeline and str(Path(m.pipeline).resolve()), run=m.run and str(Path(m.run).resolve()),
                                       checkpoints=m.checkpoints and os.path.abspath(m.checkpoints)) for m in cfg.models)
    reference = cfg.reference
    if reference.startswith("folder:"):
        reference = "folder:" + str(Path(reference.removeprefix("folder:")).resolve())
    elif reference.endswith((".yaml", ".yml")):
        reference = str(Path(reference).resolve())
    return dataclasses.replace(cfg, out_dir=str(Path(cfg.out_dir).resolve()), models=models, reference=reference,
                               inception_weights=cfg.inception_weights and str(Path(cfg.inception_weights).resolve()))


def validate_sweep(cfg: SweepConfig) -> None:
    from ddpm.sample import SAMPLERS

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(bool(cfg.models), "models: give at least one model (pipeline:, checkpoints:, run: or hub:)")
    for i, m in enumerate(cfg.models):
        given = [k for k in ("pipeline", "checkpoints", "run", "hub") if getattr(m, k)]
        need(len(given) == 1, f"models[{i}]: give exactly one of pipeline, checkpoints, run, hub (got {', '.join(given) or 'none'})")
        need(not m.hub or (m.hub.count("/") == 1 and all(m.hub.split("/"))), f"models[{i}].hub: {m.hub!r} is not a Hub id user/name")
        need(m.newest >= 1, f"models[{i}].newest must be at least 1, got {m.newest}")
    need(bool(cfg.schedulers) and bool(cfg.steps) and bool(cfg.seeds), "schedulers, steps and seeds each need at least one value")
    for s in cfg.schedulers:
        need(s in SAMPLERS, f"schedulers: {s!r} is not one of {', '.join(SAMPLERS)}")
    need(all(s > 0 for s in cfg.steps), f"steps must be positive, got {list(cfg.steps)}")
    need(all(0 <= s < 2**31 // SEED_STRIDE for s in cfg.seeds), f"seeds must be in 0..{2**31 // SEED_STRIDE - 1}, got {list(cfg.seeds)}")
    need(cfg.num_images >= 1 and cfg.batch_size >= 1 and cfg.grid_images >= 1, "num_images, batch_size and grid_images must be positive")
    need(cfg.metric == "none" or cfg.num_images >= 2, f"num_images: FID/KID need at least 2 images, got {cfg.num_images}")
    need(all(p.strip() for p in cfg.prompts), "prompts: an empty prompt")
    need(bool(cfg.guidance_scales) and all(g >= 0 for g in cfg.guidance_scales),
         f"guidance_scales: need at least one non-negative value, got {list(cfg.guidance_scales)}")
    need(bool(cfg.name) and "/" not in cfg.name and cfg.name not in (".", ".."), f"name: {cfg.name!r} is not a valid directory name")


# --------------------------------------------------------------------------------------
# The plan: cells in a fixed order, models resolved once.


@dataclass
class Cell:
    model: str                         # label, e.g. digits-16px/step-00002000 or digits-16px/pipeline
    path: str                          # pipeline or checkpoint directory
    scheduler: str
    steps: int
    seed: int
    prompt: str | None = None          # text-to-image cells only
    prompt_index: int = 0
    guidance: float | None = None

    @property
    def id(self) -> str:
        text = f"-p{self.prompt_index}-g{self.guidance:g}" if self.prompt is not None else ""
        return f"{self.model}/{self.scheduler}-{self.steps}steps-seed{self.seed}{text}"


def _label(path: Path) -> str:
    """<run>/<pipeline or step-N>, or <user>--<name>/<commit> for a Hub snapshot: short, unique within a sweep of
    runs, and a valid relative path."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return f"{path.parent.parent.name.removeprefix('models--')}/{path.name[:12]}"
    return f"{path.parent.parent.name if path.parent.name == 'checkpoints' else path.parent.name}/{path.name}"


def resolve_models(cfg: SweepConfig) -> list[tuple[str, str]]:
    """(label, directory) of every model, in config order; a missing model is an error naming it."""
    from ddpm.checkpoint import verified_checkpoints

    found: list[Path] = []
    for i, m in enumerate(cfg.models):
        if m.hub:
            found.append(_fetch_hub_model(m.hub, f"models[{i}].hub"))
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
            raise UserError(f"models: {out[label]} and {path} would share the cell folder {label}; sweep them separately")
        out[label] = str(path)  # the same model listed twice is swept once
    return list(out.items())


def _fetch_hub_model(repo_id: str, key: str) -> Path:
    """The pipeline's snapshot in the Hugging Face cache (fetched now if missing): cells read it from there, so
    compute nodes that share the cache need no network, and the folder name is the commit swept."""
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(repo_id))
    except Exception as e:  # offline and not cached, unknown repo, no access
        raise UserError(f"{key}: cannot fetch {repo_id} ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                        f"with HF_HUB_OFFLINE=1 run `hf download {repo_id}` first on a machine with network") from None


def takes_prompt(path: str) -> bool:
    """Whether the pipeline saved at `path` is text-conditioned, from the class model_index.json names (not loaded)."""
    import diffusers

    from ddpm import pretrained

    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False  # a ddpm checkpoint
    cls = getattr(diffusers, json.loads(index.read_text()).get("_class_name", ""), None)
    return cls is not None and pretrained.takes_prompt(cls)


def make_plan(cfg: SweepConfig) -> list[Cell]:
    from ddpm.export import run_dir_of

    cells = []
    for label, path in resolve_models(cfg):
        if cfg.metric != "none" and not cfg.reference and not (run_dir_of(path) / "config.yaml").is_file():
            raise UserError(f"models: {label} has no training run to compare with; give reference: (digits, folder:PATH, "
                            "hf:NAME[:SPLIT] or a config YAML), or metric: none")
        text = takes_prompt(path)
        if text and not cfg.prompts:
            raise UserError(f"models: {label} is a text-to-image pipeline; give prompts: [...] in the sweep config")
        variants = [(p, j, g) for j, p in enumerate(cfg.prompts) for g in cfg.guidance_scales] if text else [(None, 0, None)]
        cells += [Cell(label, path, sch, steps, seed, prompt, j, g) for sch in cfg.schedulers for steps in cfg.steps
                  for seed in cfg.seeds for prompt, j, g in variants]
    return cells


def config_digest(cfg: SweepConfig) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def write_plan(cfg: SweepConfig, cells: list[Cell]) -> None:
    cfg.sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(cfg.sweep_dir / "plan.json", {"config_digest": config_digest(cfg), "config": to_dict(cfg),
                                              "cells": [c.__dict__ for c in cells]})


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
    """"i/n" with 0 <= i < n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise UserError(f"--shard {text}: need 0 <= i < n")
    return i, n


# --------------------------------------------------------------------------------------
# Running cells.


def model_fingerprint(path: str) -> str:
    """Changes when the weights at `path` change: a checkpoint's EMA SHA-256 from its manifest, or the size and
    modification time of a pipeline's UNet weights (an export replaces them), without hashing gigabytes."""
    p = Path(path)
    try:
        if (p / "manifest.json").is_file():
            return json.loads((p / "manifest.json").read_text())["files"]["ema.safetensors"]["sha256"]
        weights = sorted((p / "unet").glob("diffusion_pytorch_model*"))
        return ";".join(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights)
    except (OSError, ValueError, KeyError):
        return ""


def cell_settings(cfg: SweepConfig, cell: Cell) -> dict[str, Any]:
    """What decides a cell's result: a row made with other settings, or with other weights, is recomputed."""
    text = {"prompt": cell.prompt, "guidance": cell.guidance, "negative_prompt": cfg.negative_prompt} if cell.prompt is not None else {}
    return {"cell": cell.id, "model": cell.model, "model_path": cell.path, "model_fingerprint": model_fingerprint(cell.path),
            "scheduler": cell.scheduler, "steps": cell.steps,
            "seed": cell.seed, "num_images": cfg.num_images, "metric": cfg.metric, "reference": cfg.reference,
            "reference_images_asked": cfg.reference_images, "precision_setting": cfg.precision, **text}


def finished_row(cfg: SweepConfig, cell: Cell) -> dict | None:
    path = cfg.sweep_dir / "cells" / cell.id / "row.json"
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    settings = cell_settings(cfg, cell)
    return row if all(row.get(k) == v for k, v in settings.items()) else None


class CellRunner:
    """Samples and scores cells, keeping the current model and the reference features between cells."""

    def __init__(self, cfg: SweepConfig):
        from ddpm.sample import resolve_device

        self.cfg = cfg
        self.device, self.precision, self.autocast = resolve_device(cfg.device, cfg.precision)
        self._model: tuple[str, Any] | None = None
        self._spaces: dict[int, Any] = {}
        self._reference: dict[tuple, tuple[np.ndarray, str]] = {}

    def _pipeline(self, cell: Cell):
        """(pipeline, the scheduler it was saved with); DDPM pipelines and checkpoints run on ddpm.sample's loop,
        any other pipeline (text-to-image, ...) through its own __call__ in the dtype the precision names."""
        if self._model is None or self._model[0] != cell.path:
            self._model = None  # free the previous model before loading the next
            if _is_ddpm(cell.path):
                from ddpm.export import load_pipeline

                pipe = load_pipeline(cell.path)
                pipe.unet.to(self.device).eval()
            else:
                from ddpm.pretrained import load_any_pipeline, pick_dtype

                dtype = self.pipeline_dtype = pick_dtype(self.device, self.cfg.precision)
                pipe = load_any_pipeline(cell.path, dtype).to(self.device)
                pipe.set_progress_bar_config(disable=True)
            self._model = (cell.path, pipe, pipe.scheduler)
        return self._model[1], self._model[2]

    def _reference_features(self, cell: Cell, resolution: int) -> tuple[np.ndarray, str]:
        from ddpm.evaluate import feature_space, reference_data, reference_features

        from ddpm.export import run_dir_of

        data = reference_data(self.cfg.reference, resolution, run_dir_of(cell.path))
        key = (data.source, data.path, data.split, resolution)
        if key not in self._reference:
            if resolution not in self._spaces:
                self._spaces[resolution] = feature_space(self.cfg.metric, resolution, self.device, self.cfg.inception_weights)
            space = self._spaces[resolution]
            described = {"digits": "digits", "folder": f"folder:{data.path}", "hf": f"hf:{data.path}:{data.split}"}[data.source]
            self._reference[key] = (reference_features(space, data, self.cfg.reference_images), f"{described} at {resolution}px")
        return self._reference[key]

    def run(self, cell: Cell) -> dict:
        import torch

        from ddpm.sample import generate, make_sampler, save_images

        cfg = self.cfg
        pipe, trained = self._pipeline(cell)
        out = cfg.sweep_dir / "cells" / cell.id
        seeds = [cell.seed * SEED_STRIDE + k for k in range(cfg.num_images)]
        sampler = make_sampler(cell.scheduler, trained)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if _is_ddpm(cell.path):
            images = generate(pipe.unet, sampler, seeds, cell.steps, cfg.batch_size, self.device, self.autocast, progress=True)
        else:
            from tqdm.auto import tqdm

            from ddpm.pretrained import generate_images

            pipe.scheduler = sampler
            made = generate_images(pipe, seeds, cell.steps, cfg.batch_size, cell.prompt, cfg.negative_prompt or None,
                                   cell.guidance if cell.guidance is not None else 0.0)
            images = np.stack([np.asarray(img.convert("RGB")) for _, img in tqdm(made, total=len(seeds), desc="sampling", unit="img")])
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        save_images(images, seeds, out, grid_images=cfg.grid_images)
        row = {**cell_settings(cfg, cell), "seconds_per_image": seconds / len(images), "device": str(self.device),
               "precision": self.precision if _is_ddpm(cell.path) else self.pipeline_dtype, "checkpoint_step": _step_of(cell.path)}
        if cfg.metric != "none":
            from ddpm.evaluate import distances

            resolution = images.shape[1]
            ref, described = self._reference_features(cell, resolution)
            space = self._spaces[resolution]
            row.update({"reference_data": described, "reference_images": len(ref), **distances(cfg.metric, space(images), ref)})
        write_json(out / "row.json", row)
        return row


def _is_ddpm(path: str) -> bool:
    """A ddpm checkpoint, or a pipeline saved as DDPMPipeline (ours, or one from the Hub)."""
    p = Path(path)
    if (p / "manifest.json").is_file():
        return True
    try:
        return json.loads((p / "model_index.json").read_text()).get("_class_name") == "DDPMPipeline"
    except (OSError, ValueError):
        return False


def _step_of(path: str) -> int | None:
    name = Path(path).name
    return int(name.removeprefix("step-")) if name.startswith("step-") and name[5:].isdigit() else None


def run_cells(cfg: SweepConfig, cells: list[Cell]) -> tuple[int, int]:
    """Runs the cells not yet done; returns (run, skipped)."""
    todo = [c for c in cells if finished_row(cfg, c) is None]
    if len(todo) < len(cells):
        log.info("%d of %d cells already done; skipping them", len(cells) - len(todo), len(cells))
    if todo:
        runner = CellRunner(cfg)
        for i, cell in enumerate(todo, 1):
            log.info("cell %d/%d: %s", i, len(todo), cell.id)
            row = runner.run(cell)
            log.info("  %s", ", ".join(f"{k}={row[k]:.4g}" for k in metric_columns(cfg.metric) if k in row))
    return len(todo), len(cells) - len(todo)


# --------------------------------------------------------------------------------------
# Results: table, plot.


def metric_columns(metric: str) -> list[str]:
    from ddpm.evaluate import METRICS

    if metric == "none":
        return ["seconds_per_image"]
    fd, kd = METRICS[metric]
    return [fd, kd, f"{kd}_std", "seconds_per_image"]


COLUMNS = ["cell", "model", "checkpoint_step", "scheduler", "steps", "seed", "prompt", "guidance", "num_images", "metric", "reference_data",
           "reference_images", "kid_subset_size", "device", "precision", "model_path"]


def collect_rows(cfg: SweepConfig, cells: list[Cell]) -> list[dict]:
    """Every cell's row, in plan order; a missing cell is an error naming how many and the first few."""
    rows, missing = [], []
    for cell in cells:
        row = finished_row(cfg, cell)
        (missing.append(cell.id) if row is None else rows.append(row))
    if missing:
        raise UserError(f"{len(missing)} of {len(cells)} cells are not done yet ({', '.join(missing[:3])}"
                        f"{', ...' if len(missing) > 3 else ''}); run the missing shards, then --merge")
    return rows


def write_results(cfg: SweepConfig, rows: list[dict]) -> dict[str, Path]:
    out = cfg.sweep_dir
    columns = [c for c in COLUMNS[:8] + metric_columns(cfg.metric) + COLUMNS[8:] if any(c in r for r in rows)]
    tmp = out / f".results.csv.{unique_suffix()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "results.csv")
    write_json(out / "results.json", rows)
    plot_results(cfg, rows, out / "plot.png")
    return {"csv": out / "results.csv", "json": out / "results.json", "plot": out / "plot.png"}


def plot_results(cfg: SweepConfig, rows: list[dict], path: Path) -> None:
    """Quality (or speed, without a metric) against sampling steps, a line per scheduler, a panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    y_key = metric_columns(cfg.metric)[0]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False, sharey=True)
    for ax, model in zip(axes[0], models):
        # a line per scheduler (and guidance scale, for text-to-image); seeds and prompts are averaged
        lines = list(dict.fromkeys((r["scheduler"], r.get("guidance")) for r in rows if r["model"] == model))
        for sch, guidance in lines:
            points: dict[int, list[float]] = {}
            for r in rows:
                if r["model"] == model and r["scheduler"] == sch and r.get("guidance") == guidance:
                    points.setdefault(r["steps"], []).append(r[y_key])
            xs = sorted(points)
            ys = [float(np.mean(points[x])) for x in xs]
            err = [float(np.std(points[x])) for x in xs]
            label = sch if guidance is None else f"{sch}, guidance {guidance:g}"
            ax.errorbar(xs, ys, yerr=err if max(len(v) for v in points.values()) > 1 else None, marker="o", capsize=3, label=label)
        ax.set_xscale("log")
        values = [r[y_key] for r in rows if r["model"] == model and r[y_key] > 0]
        if values and max(values) > 5 * min(values):  # one diverging sampler would flatten the others into a line
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xticks(sorted(cfg.steps), [str(s) for s in sorted(cfg.steps)])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("sampling steps")
        ax.set_title(model, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{y_key} (lower is better)" if cfg.metric != "none" else "seconds per image")
    axes[0][-1].legend(fontsize=8)
    seeds = f"{len(cfg.seeds)} seed{'s' if len(cfg.seeds) > 1 else ''}"
    fig.suptitle(f"{cfg.name}: {y_key}, {cfg.num_images} images per cell, {seeds}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
