"""Export: the diffusers DDPMPipeline layout (model_index.json, scheduler/, unet/ with safetensors)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from diffusers import DDPMPipeline


def export_pipeline(pipeline: DDPMPipeline, out_dir: Path) -> Path:
    """Save atomically: written beside the target, then swapped in, so a reader never sees half a pipeline."""
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    old = out_dir.parent / f".old-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
