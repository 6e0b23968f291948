"""Any diffusers pipeline, by Hub id or local path: unconditional (DDPMPipeline, ...) or text-to-image.

Images are made one generator per image, seeded by its seed and drawn on the CPU, so image k of a
prompt is the same whatever the batch size or the device, as in ddpm.sampling.sample.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ddpm.device import DTYPES
from ddpm.errors import UserError


def pipeline_class(model: str | Path) -> str:
    """The class a saved pipeline names in its model_index.json (a ddpm checkpoint is a DDPMPipeline), read
    without loading any weights; "" when it cannot be read (load_any_pipeline then says why)."""
    path = Path(model)
    if (path / "manifest.json").is_file():
        return "DDPMPipeline"
    try:
        if path.exists():
            name = json.loads((path / "model_index.json").read_text()).get("_class_name", "")
            # a pipeline with its own code names [file, class] (a class-conditional export: ddpm.models.export)
            return name[1] if isinstance(name, list) and len(name) == 2 else name
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(str(model)).get("_class_name", "")  # a Hub id: the cached index only
    except Exception:  # not a pipeline, not cached offline, ...: the load that follows names the problem
        return ""


def load_any_pipeline(model: str, dtype: str = "fp32"):
    """A pipeline from a local directory (a diffusers pipeline or a ddpm checkpoint) or a Hub model id.

    With HF_HUB_OFFLINE=1 a Hub id loads only from the local cache; the error says how to fill it."""
    from diffusers import DiffusionPipeline

    path = Path(model)
    if (path / "manifest.json").is_file():  # a training checkpoint: its EMA weights as a DDPMPipeline
        from ddpm.models.export import load_pipeline

        return load_pipeline(path).to(dtype=DTYPES[dtype])
    if path.exists() and not (path / "model_index.json").is_file():
        raise UserError(f"--model {model}: a local path but not a diffusers pipeline (no model_index.json)")
    from ddpm.models.export import CONDITIONAL_CLASS, load_pipeline

    if path.exists() and pipeline_class(path) == CONDITIONAL_CLASS:  # ours: built without running the folder's code
        return load_pipeline(path).to(dtype=DTYPES[dtype])
    try:
        return DiffusionPipeline.from_pretrained(model, dtype=DTYPES[dtype])
    except Exception as e:  # missing files, unknown repo, no network: diffusers and the Hub raise many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not path.exists() and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise UserError(
                f"--model {model}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; on a machine "
                f"with network run `hf download {model}` (same HF_HOME), or give a local directory"
            ) from None
        raise UserError(f"--model {model}: cannot load the pipeline ({type(e).__name__}: {first})") from None


def takes_prompt(pipe) -> bool:
    """Text-conditioned pipelines (Stable Diffusion and kin) take `prompt`; DDPMPipeline and DDIMPipeline do not.
    `pipe` is a pipeline or a pipeline class."""
    return "prompt" in inspect.signature(pipe.__call__).parameters


def set_sampler(pipe, name: str) -> None:
    """Swap the pipeline's scheduler for a named one on the same noise schedule (ddpm.sampling.sample.SAMPLERS)."""
    from ddpm.sampling.sample import make_sampler

    pipe.scheduler = make_sampler(name, pipe.scheduler)


def generate_images(
    pipe,
    seeds: list[int],
    steps: int,
    batch_size: int,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    guidance: float = 7.5,
) -> Iterator[tuple[int, Image.Image]]:
    """(seed, image) for every seed, in batches; text-to-image pipelines get the prompt on every image."""
    text = takes_prompt(pipe)
    if text and prompt is None:
        raise UserError(f"{type(pipe).__name__} is a text-to-image pipeline: give --prompt")
    if not text and prompt is not None:
        raise UserError(f"{type(pipe).__name__} is unconditional: it takes no --prompt")
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        kwargs: dict[str, Any] = {
            "num_inference_steps": steps,
            "output_type": "pil",
            "generator": [torch.Generator("cpu").manual_seed(int(s)) for s in chunk],
        }
        if text:
            kwargs.update(
                prompt=[prompt] * len(chunk),
                guidance_scale=guidance,
                negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
            )
        else:
            kwargs["batch_size"] = len(chunk)
        images = pipe(**kwargs).images
        yield from zip(chunk, images)


def fetch_hub_pipeline(repo_id: str, key: str) -> Path:
    """The pipeline's snapshot in the Hugging Face cache (fetched now if missing): jobs read it from there, so
    compute nodes that share the cache need no network, and the folder name is the commit used."""
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(repo_id))
    except Exception as e:  # offline and not cached, unknown repo, no access
        raise UserError(
            f"{key}: cannot fetch {repo_id} "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
            f"with HF_HUB_OFFLINE=1 run `hf download {repo_id}` first on a machine with network"
        ) from None


def saved_takes_prompt(path: str | Path) -> bool:
    """Whether the pipeline saved at `path` is text-conditioned, from the class model_index.json names (not loaded)."""
    import diffusers

    cls = getattr(diffusers, pipeline_class(path), None)
    return cls is not None and takes_prompt(cls)
