"""Any diffusers pipeline, by Hub id or local path: unconditional (DDPMPipeline, ...) or text-to-image.

Images are made one generator per image, seeded by its seed and drawn on the CPU, so image k of a
prompt is the same whatever the batch size or the device, as in ddpm.sample.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image

from ddpm.errors import UserError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_dtype(device: torch.device, dtype: str = "auto") -> str:
    """fp16 on CUDA, fp32 elsewhere, unless asked; a dtype the device cannot run is refused, naming the fix."""
    if dtype == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if dtype == "fp16" and device.type == "cpu":
        raise UserError("--dtype fp16 does not run on the CPU (half-precision convolutions are missing there); use fp32 or bf16")
    if dtype == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UserError(f"--dtype bf16: this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16; use fp16")
    return dtype


def load_any_pipeline(model: str, dtype: str = "fp32"):
    """A pipeline from a local directory (a diffusers pipeline or a ddpm checkpoint) or a Hub model id.

    With HF_HUB_OFFLINE=1 a Hub id loads only from the local cache; the error says how to fill it."""
    from diffusers import DiffusionPipeline

    path = Path(model)
    if (path / "manifest.json").is_file():  # a training checkpoint: its EMA weights as a DDPMPipeline
        from ddpm.export import load_pipeline

        return load_pipeline(path).to(dtype=DTYPES[dtype])
    if path.exists() and not (path / "model_index.json").is_file():
        raise UserError(f"--model {model}: a local path but not a diffusers pipeline (no model_index.json)")
    try:
        return DiffusionPipeline.from_pretrained(model, dtype=DTYPES[dtype])
    except Exception as e:  # missing files, unknown repo, no network: diffusers and the Hub raise many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not path.exists() and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise UserError(f"--model {model}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; on a machine "
                            f"with network run `hf download {model}` (same HF_HOME), or give a local directory") from None
        raise UserError(f"--model {model}: cannot load the pipeline ({type(e).__name__}: {first})") from None


def takes_prompt(pipe) -> bool:
    """Text-conditioned pipelines (Stable Diffusion and kin) take `prompt`; DDPMPipeline and DDIMPipeline do not.
    `pipe` is a pipeline or a pipeline class."""
    return "prompt" in inspect.signature(pipe.__call__).parameters


def set_sampler(pipe, name: str) -> None:
    """Swap the pipeline's scheduler for a named one on the same noise schedule (ddpm.sample.SAMPLERS)."""
    from ddpm.sample import make_sampler

    pipe.scheduler = make_sampler(name, pipe.scheduler)


def generate_images(pipe, seeds: list[int], steps: int, batch_size: int, prompt: str | None = None,
                    negative_prompt: str | None = None, guidance: float = 7.5) -> Iterator[tuple[int, Image.Image]]:
    """(seed, image) for every seed, in batches; text-to-image pipelines get the prompt on every image."""
    text = takes_prompt(pipe)
    if text and prompt is None:
        raise UserError(f"{type(pipe).__name__} is a text-to-image pipeline: give --prompt")
    if not text and prompt is not None:
        raise UserError(f"{type(pipe).__name__} is unconditional: it takes no --prompt")
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        kwargs: dict[str, Any] = {"num_inference_steps": steps, "output_type": "pil",
                                  "generator": [torch.Generator("cpu").manual_seed(int(s)) for s in chunk]}
        if text:
            kwargs.update(prompt=[prompt] * len(chunk), guidance_scale=guidance,
                          negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None)
        else:
            kwargs["batch_size"] = len(chunk)
        images = pipe(**kwargs).images
        yield from zip(chunk, images)
