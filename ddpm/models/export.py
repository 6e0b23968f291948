"""The diffusers DDPMPipeline layout (model_index.json, scheduler/, unet/ with safetensors): written at the
end of training, and built on demand from any checkpoint so sweeps can compare training steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from diffusers import DDPMPipeline

from ddpm.errors import UserError
from ddpm.files import unique_suffix
from ddpm.models.checkpoint import all_finite


def export_pipeline(pipeline: DDPMPipeline, out_dir: Path) -> Path:
    """Save atomically: written beside the target, then swapped in, so a reader never sees half a pipeline. Weights
    that hold a NaN or inf are refused in one line, and the export already there stays."""
    out_dir = Path(out_dir)
    if not all_finite(list(pipeline.unet.parameters())):
        raise UserError(f"not exporting {out_dir}: the weights hold NaN or inf (training diverged; see its log)")
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{unique_suffix()}"
    old = out_dir.parent / f".old-{out_dir.name}-{unique_suffix()}"
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def pipeline_from_checkpoint(ckpt_dir: Path) -> DDPMPipeline:
    """The pipeline the export would hold at this checkpoint: EMA weights, the run's noise schedule.

    The checkpoint lives at <run>/checkpoints/step-N; the model and schedule come from <run>/config.yaml."""
    from ddpm.config import load_config
    from ddpm.models.checkpoint import verify
    from ddpm.models.schedule import build_scheduler
    from ddpm.models.unet import architecture, build_unet

    ckpt_dir = Path(ckpt_dir)
    problem = verify(ckpt_dir)
    if problem is not None:
        raise UserError(f"checkpoint {ckpt_dir}: {problem}")
    run_config = ckpt_dir.parent.parent / "config.yaml"
    if not run_config.is_file():
        raise UserError(
            f"checkpoint {ckpt_dir}: no {run_config} beside it (checkpoints are read inside their run directory)"
        )
    cfg = load_config(run_config)
    unet = build_unet(cfg.model, cfg.data.resolution, cfg.data.image_channels, cfg.schedule.num_train_timesteps)
    state = json.loads((ckpt_dir / "state.json").read_text())
    if state.get("architecture") not in (None, architecture(unet)):
        raise UserError(f"checkpoint {ckpt_dir}: its architecture differs from {run_config}")
    from safetensors.torch import load_file

    ema = load_file(ckpt_dir / "ema.safetensors")
    params = dict(unet.named_parameters())
    if set(ema) != set(params):
        raise UserError(f"checkpoint {ckpt_dir}: EMA weights do not match the model in {run_config}")
    for name, p in params.items():
        p.data.copy_(ema[name])
    return DDPMPipeline(unet=unet.eval(), scheduler=build_scheduler(cfg.schedule))


def run_dir_of(model: str | Path) -> Path:
    """The run directory a pipeline (<run>/pipeline), a checkpoint (<run>/checkpoints/step-N) or a post-hoc EMA
    export (<run>/ema-reconstructions/step-N-sigma_rel-S, ddpm.models.phema) belongs to."""
    path = Path(model)
    return path.parent.parent if path.parent.name in ("checkpoints", "ema-reconstructions") else path.parent


def load_pipeline(path: str | Path) -> DDPMPipeline:
    """A pipeline directory (DDPMPipeline layout) or a checkpoint directory, with a one-line error for anything else."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return pipeline_from_checkpoint(path)
    if not (path / "model_index.json").is_file():
        raise UserError(f"{path} is neither a pipeline directory (model_index.json) nor a checkpoint (manifest.json)")
    try:
        return DDPMPipeline.from_pretrained(path)
    except Exception as e:  # diffusers raises several types for missing or mismatched files
        raise UserError(f"cannot load the pipeline {path} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
