"""Scoring one model: sample N images with a sampler and fixed seeds, then measure them against a reference.

Long because its three callers must agree, and one file shows that they do: `ddpm evaluate` and every sweep cell
(Evaluator) and the in-training evaluation over every process (TrainingEvaluator) sample with the same seeds, the
same class-balanced labels and the same metric code.

This is the building block that `ddpm evaluate`, every cell of a sweep and any later in-training
evaluation call. DDPM pipelines and ddpm checkpoints run on ddpm.sampling.sample's loop; any other diffusers
pipeline (text-to-image, ...) through its own __call__. The metrics themselves are ddpm.evaluation.metrics.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

SEED_STRIDE = 1_000_000  # image k of a run with seed s uses seed s * SEED_STRIDE + k: evaluations and sweeps agree


def image_seeds(seed: int, num_images: int) -> list[int]:
    return [seed * SEED_STRIDE + k for k in range(num_images)]


@dataclass
class Scoring:
    """How samples are measured and kept; what `ddpm evaluate` and a sweep share."""

    metric: str = "inception"  # inception (FID/KID), digitsnet (offline FD/KD) or none (images only)
    reference: str = (
        ""  # dataset to compare with; "" is the model's training data (ddpm.evaluation.metrics.reference_data)
    )
    reference_images: int = 0  # reference images for the statistics; 0: all
    inception_weights: str = ""  # local Inception weights file; "" is the cache, else a checked download
    batch_size: int = 128  # images per forward pass
    grid_images: int = 64  # the first n images form grid.png
    negative_prompt: str = ""  # text-to-image models only


def is_ddpm(path: str | Path) -> bool:
    """A ddpm checkpoint, or a pipeline saved as DDPMPipeline (ours, or one from the Hub) or as this project's
    class-conditional export."""
    from ddpm.models.export import CONDITIONAL_CLASS
    from ddpm.sampling.pretrained import pipeline_class

    return pipeline_class(path) in ("DDPMPipeline", CONDITIONAL_CLASS)


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


def resolved_sampler(path: str, scheduler: str) -> dict:
    """The settings the sampler `scheduler` runs with on the model at `path` (sampler_settings), read from
    the model's schedule without loading its weights; {} where the schedule cannot be read. Part of what
    decides a score: a sampler whose settings changed (in this project or in diffusers) scores again."""
    from ddpm.sampling.sample import sampler_recipe, sampler_settings

    p = Path(path)
    try:
        if (p / "manifest.json").is_file():  # a checkpoint: the schedule of its run's config
            from ddpm.config import load_config
            from ddpm.models.schedule import build_scheduler

            trained = dict(build_scheduler(load_config(p.parent.parent / "config.yaml").schedule).config)
        else:
            trained = json.loads((p / "scheduler" / "scheduler_config.json").read_text())
        cls, extra = sampler_recipe(scheduler, trained)
        return sampler_settings(cls.from_config(trained, **extra))
    except (OSError, ValueError, KeyError):
        return {}


def class_accuracy(space, feats: np.ndarray, labels: list[int], class_names: list[str] | None) -> float | None:
    """The fraction of generated images that the feature space's classifier assigns to the class they were asked
    for: for the digits, FD-digitsnet's network, whose head was trained to classify them (metrics.DigitsNet). None
    where the space has no classifier of these classes (Inception's ImageNet head does not know a model's classes)."""
    import numpy as np

    if not hasattr(space, "classify") or class_names != space.classes:
        return None
    return float(np.mean(space.classify(feats) == np.asarray(labels)))


def checkpoint_step(path: str | Path) -> int | None:
    """The training step of a checkpoint (its name) or of a post-hoc EMA export (its ema.json); else None."""
    from ddpm.models.phema import reconstruction_settings

    name = Path(path).name
    if name.startswith("step-") and name[5:].isdigit():
        return int(name.removeprefix("step-"))
    posthoc = reconstruction_settings(Path(path))
    return int(posthoc["step"]) if posthoc else None


class Evaluator:
    """Samples and scores models, keeping the current model and the reference features between calls."""

    def __init__(self, scoring: Scoring, device: str = "auto", precision: str = "auto"):
        from ddpm.device import resolve_placement

        self.scoring = scoring
        self.placement = resolve_placement(device, precision)
        self._model: tuple[str, Any, Any] | None = None
        self._spaces: dict[int, Any] = {}
        self._reference: dict[tuple, tuple[np.ndarray, str]] = {}
        self._floors: dict[tuple, float | None] = {}

    def _pipeline(self, path: str):
        """(pipeline, the scheduler it was saved with), loaded once for consecutive calls on the same model."""
        if self._model is None or self._model[0] != path:
            self._model = None  # free the previous model before loading the next
            if is_ddpm(path):
                from ddpm.models.export import load_pipeline

                pipe = load_pipeline(path)
                pipe.unet.to(self.placement.device).eval()
            else:
                from ddpm.sampling.pretrained import load_any_pipeline

                pipe = load_any_pipeline(path, self.placement.precision).to(self.placement.device)
                pipe.set_progress_bar_config(disable=True)
            self._model = (path, pipe, pipe.scheduler)
        return self._model[1], self._model[2]

    def _reference_features(self, model_path: str, resolution: int) -> tuple[np.ndarray, str]:
        from ddpm.evaluation.metrics import describe_reference, feature_space, reference_data, reference_features
        from ddpm.models.export import run_dir_of

        s = self.scoring
        data = reference_data(s.reference, resolution, run_dir_of(model_path))
        key = (data.source, data.path, data.split, resolution)
        if key not in self._reference:
            if resolution not in self._spaces:
                self._spaces[resolution] = feature_space(
                    s.metric, resolution, self.placement.device, s.inception_weights
                )
            space = self._spaces[resolution]
            self._reference[key] = (reference_features(space, data, s.reference_images), describe_reference(data))
        return self._reference[key]

    def sample(
        self,
        path: str,
        scheduler: str,
        steps: int,
        seeds: list[int],
        prompt: str | None = None,
        guidance: float | None = None,
        labels: tuple[str, ...] = (),
    ) -> np.ndarray:
        """(N, H, W, 3) uint8 images of the model at `path`, one per seed. A class-conditional model is sampled with
        `labels` (ids or names) repeated over the seeds, by default class-balanced (image k of a cell gets class k
        mod classes), guided with `guidance` (None: 1, the conditional model alone); the labels used are left in
        `self.labels`."""
        from ddpm.models.export import class_names_of
        from ddpm.sampling.guidance import sampling_labels
        from ddpm.sampling.sample import generate, make_sampler

        pipe, trained = self._pipeline(path)
        sampler = make_sampler(scheduler, trained)
        self.labels, self.class_names = None, None
        if is_ddpm(path):
            p, scale = self.placement, 1.0 if guidance is None else guidance
            self.class_names = class_names_of(pipe)
            self.labels = sampling_labels(pipe.unet, len(seeds), labels, self.class_names, scale, "labels")
            return generate(
                pipe.unet, sampler, seeds, steps, self.scoring.batch_size, p.device, p.autocast_dtype, True,
                self.labels, scale,
            )  # fmt: skip
        import numpy as np
        from tqdm.auto import tqdm

        from ddpm.sampling.pretrained import generate_images

        pipe.scheduler = sampler
        made = generate_images(
            pipe,
            seeds,
            steps,
            self.scoring.batch_size,
            prompt,
            self.scoring.negative_prompt or None,
            guidance if guidance is not None else 0.0,
        )
        return np.stack(
            [np.asarray(img.convert("RGB")) for _, img in tqdm(made, total=len(seeds), desc="sampling", unit="img")]
        )

    def run(
        self,
        path: str,
        scheduler: str,
        steps: int,
        seeds: list[int],
        out_dir: Path,
        prompt: str | None = None,
        guidance: float | None = None,
        labels: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """Sample, write images/ and grid.png under `out_dir`, score; returns the figures (no settings)."""
        import torch

        from ddpm.sampling.sample import save_images

        if self.scoring.metric != "none" and is_ddpm(path):
            # The metric's network and the reference first: a missing weight file or reference data fails in one
            # line before hours of sampling, not after (the images come out at the UNet's sample_size).
            self._reference_features(path, self._pipeline(path)[0].unet.config.sample_size)
        cuda = self.placement.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        images = self.sample(path, scheduler, steps, seeds, prompt, guidance, labels)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        save_images(images, seeds, out_dir, grid_images=self.scoring.grid_images)
        row: dict[str, Any] = {
            "seconds_per_image": seconds / len(images),
            "device": str(self.placement.device),
            "precision": self.placement.precision,
            "checkpoint_step": checkpoint_step(path),
        }
        if self.labels is not None:  # part of a class-conditional score's key (ddpm.evaluation.scores)
            row.update(guidance_scale=1.0 if guidance is None else guidance, labels=",".join(labels) or "balanced")
        if self.scoring.metric != "none":
            from ddpm.evaluation.metrics import METRICS, distances

            resolution = images.shape[1]
            ref, described = self._reference_features(path, resolution)
            generated = self._spaces[resolution](images)
            if self.labels is not None:
                accuracy = class_accuracy(self._spaces[resolution], generated, self.labels, self.class_names)
                if accuracy is not None:
                    row["class_accuracy"] = accuracy
            row.update(
                {
                    "reference_data": described,
                    "reference_images": len(ref),
                    **distances(self.scoring.metric, generated, ref),
                    f"{METRICS[self.scoring.metric][0]}_floor": self._floor(ref, described, len(images)),
                }
            )
        return row

    def _floor(self, reference: np.ndarray, described: str, num_images: int) -> float | None:
        """The metric's real-vs-real floor at this image count (metrics.fd_floor), once per reference."""
        from ddpm.evaluation.metrics import fd_floor

        key = (described, len(reference), num_images)
        if key not in self._floors:
            self._floors[key] = fd_floor(reference, num_images)
        return self._floors[key]


def training_metric(requested: str) -> str:
    """train.eval_metric "auto": FID/KID when checked Inception weights are already on this machine (a training job
    never waits on a download), else the offline FD/KD-digitsnet."""
    if requested != "auto":
        return requested
    from ddpm.evaluation.inception import local_inception_weights

    return "inception" if local_inception_weights() is not None else "digitsnet"


class TrainingEvaluator:
    """Scores the EMA weights during training. Every process samples its share of the seeds (seed k goes to process
    k mod world) and embeds them in the feature space; the features (a few KB per image, not the images) are
    gathered by seed, so the score is the one `ddpm evaluate --seed 0` gives for the same weights, whatever the
    number of processes. The reference statistics are computed once, by the main process."""

    def __init__(
        self, data, num_images: int, reference_images: int, metric: str, accelerator, class_names=None
    ) -> None:
        import dataclasses

        from accelerate.utils import broadcast_object_list

        from ddpm.errors import ConfigError
        from ddpm.evaluation.metrics import describe_reference, feature_space, reference_features

        self.accelerator = accelerator
        rank, world = accelerator.process_index, accelerator.num_processes
        if num_images < world:
            raise ConfigError(f"train.eval_images={num_images} is fewer than the {world} processes that share it")
        # The main process decides "auto" for all: nodes may differ in what their caches hold.
        self.metric = broadcast_object_list([training_metric(metric) if accelerator.is_main_process else None])[0]
        self.seeds = image_seeds(0, num_images)
        self.mine = self.seeds[rank::world]
        with accelerator.main_process_first():  # the first process trains (or fetches) the feature net alone
            self.space = feature_space(self.metric, data.resolution, accelerator.device)
        reference = dataclasses.replace(data, random_flip=False)
        self.reference, self.reference_data = None, describe_reference(reference)
        self.class_names = class_names
        if accelerator.is_main_process:
            self.reference = reference_features(self.space, reference, reference_images, warn=False)

    def __call__(
        self, unet, sampler, steps: int, batch_size: int, autocast_dtype, guidance_scale: float = 1.0
    ) -> dict[str, Any] | None:
        """The scores on the main process (None elsewhere); every process must call it at the same step. A
        class-conditional model is sampled class-balanced (seed k gets class k mod classes, as `ddpm evaluate`
        does) with `guidance_scale`."""
        import numpy as np
        from accelerate.utils import gather_object

        from ddpm.evaluation.metrics import distances
        from ddpm.models.unet import num_classes_of
        from ddpm.sampling.guidance import round_robin
        from ddpm.sampling.sample import generate

        device = self.accelerator.device
        start = time.perf_counter()
        n = num_classes_of(unet)
        labels = round_robin(len(self.seeds), n) if n else None
        mine = labels[self.accelerator.process_index :: self.accelerator.num_processes] if labels else None
        images = generate(
            unet, sampler, self.mine, steps, batch_size, device, autocast_dtype, False, mine, guidance_scale
        )
        parts = gather_object([(self.mine, self.space(images))])
        if not self.accelerator.is_main_process:
            return None
        by_seed = {s: f for seeds, feats in parts for s, f in zip(seeds, feats)}
        generated = np.stack([by_seed[s] for s in self.seeds])
        conditional = {}
        if labels:
            conditional = {"guidance_scale": guidance_scale, "labels": "balanced"}
            accuracy = class_accuracy(self.space, generated, labels, self.class_names)
            if accuracy is not None:
                conditional["class_accuracy"] = accuracy
        return {
            **distances(self.metric, generated, self.reference),
            **conditional,
            "precision": "bf16" if autocast_dtype is not None else "fp32",
            "metric": self.metric,
            "num_images": len(self.seeds),
            "reference_images": len(self.reference),
            "reference_data": self.reference_data,
            "seconds": time.perf_counter() - start,
        }
