"""The diffusers DDPMPipeline layout (model_index.json, scheduler/, unet/ with safetensors): written at the
end of training, and built on demand from any checkpoint so sweeps can compare training steps.

A class-conditional model is exported in the same layout with its pipeline's code beside it: `pipeline.py`
(ddpm/models/class_conditional_pipeline.py) and `"_class_name": ["pipeline", "ClassConditionalDDPMPipeline"]` in
model_index.json, the class names as `id2label`. Why this mechanism: diffusers' `DiffusionPipeline.from_pretrained`
resolves a `[file, class]` _class_name to `<folder>/<file>.py` when that file lies in the pipeline's own folder
(pipeline_loading_utils._resolve_custom_pipeline_and_cls), and fetches the same file with the weights from a Hub
repository (pipeline_utils.download), so one `from_pretrained(path_or_repo, trust_remote_code=True)` loads the export
offline from a local directory and online from the Hub alike; `custom_pipeline=` would need the file's path as a
second argument, and no pipeline in diffusers runs a class-conditional UNet2DModel with guidance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel

from ddpm.errors import UserError
from ddpm.files import unique_suffix
from ddpm.models.checkpoint import all_finite

CUSTOM_PIPELINE = Path(__file__).with_name("class_conditional_pipeline.py")
CONDITIONAL_CLASS = "ClassConditionalDDPMPipeline"


def make_pipeline(unet: UNet2DModel, scheduler, class_names: list[str] | None = None) -> DiffusionPipeline:
    """The pipeline that exports this UNet: a plain DDPMPipeline for an unconditional one, as always; the
    class-conditional pipeline with the class names for one with a class embedding."""
    if not unet.config.get("num_class_embeds"):
        return DDPMPipeline(unet=unet, scheduler=scheduler)
    from ddpm.models.class_conditional_pipeline import ClassConditionalDDPMPipeline

    id2label = {str(i): name for i, name in enumerate(class_names)} if class_names else None
    return ClassConditionalDDPMPipeline(unet=unet, scheduler=scheduler, id2label=id2label)


def class_names_of(pipeline) -> list[str] | None:
    """The class names of a class-conditional pipeline, in index order; None for an unconditional one."""
    id2label = getattr(pipeline, "config", {}).get("id2label")
    return [id2label[str(i)] for i in range(len(id2label))] if id2label else None


def saved_num_classes(path: str | Path) -> int:
    """The classes of the model saved at `path` (a pipeline's unet/config.json, or a checkpoint's run config), read
    without loading weights; 0 for an unconditional model or one that cannot be read (loading then says why)."""
    p = Path(path)
    try:
        if (p / "manifest.json").is_file():
            from ddpm.config import load_config

            n = load_config(p.parent.parent / "config.yaml").model.num_classes
            return n if isinstance(n, int) else 0
        embeds = json.loads((p / "unet" / "config.json").read_text()).get("num_class_embeds")
        return embeds - 1 if embeds else 0
    except (OSError, ValueError, UserError):
        return 0


def saved_class_names(path: str | Path) -> list[str]:
    """The class names of the class-conditional model saved at `path` (its pipeline's id2label, or a checkpoint's
    run classes.json), read without loading weights; the ids "0".."n-1" where the names are not saved."""
    p = Path(path)
    n = saved_num_classes(p)
    names = None
    if (p / "manifest.json").is_file():
        names = run_class_names(p.parent.parent)
    elif (p / "model_index.json").is_file():
        id2label = json.loads((p / "model_index.json").read_text()).get("id2label")
        names = [id2label[str(i)] for i in range(len(id2label))] if id2label else None
    return names if names and len(names) == n else [str(i) for i in range(n)]


def export_pipeline(pipeline: DiffusionPipeline, out_dir: Path) -> Path:
    """Save atomically: written beside the target, then swapped in, so a reader never sees half a pipeline. Weights
    that hold a NaN or inf are refused in one line, and the export already there stays."""
    out_dir = Path(out_dir)
    if not all_finite(list(pipeline.unet.parameters())):
        raise UserError(f"not exporting {out_dir}: the weights hold NaN or inf (training diverged; see its log)")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "model_index.json").is_file():
        # Only a pipeline is ever replaced: a run directory, or any folder of other files, given as the output is
        # refused before anything in it moves.
        raise UserError(f"not exporting into {out_dir}: it holds files and is not a pipeline; give a new directory")
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{unique_suffix()}"
    old = out_dir.parent / f".old-{out_dir.name}-{unique_suffix()}"
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    if type(pipeline).__name__ == CONDITIONAL_CLASS:  # the code beside the weights, named by model_index.json
        shutil.copyfile(CUSTOM_PIPELINE, tmp / "pipeline.py")
        index = json.loads((tmp / "model_index.json").read_text())
        index["_class_name"] = ["pipeline", CONDITIONAL_CLASS]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def pipeline_from_checkpoint(ckpt_dir: Path) -> DiffusionPipeline:
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
    return make_pipeline(unet.eval(), build_scheduler(cfg.schedule), run_class_names(ckpt_dir.parent.parent))


def run_class_names(run_dir: Path) -> list[str] | None:
    """The class names a class-conditional run trained on (<run>/classes.json); None where it has none."""
    classes = Path(run_dir) / "classes.json"
    return json.loads(classes.read_text())["class_names"] if classes.is_file() else None


def run_dir_of(model: str | Path) -> Path:
    """The run directory a pipeline (<run>/pipeline), a checkpoint (<run>/checkpoints/step-N) or a post-hoc EMA
    export (<run>/ema-reconstructions/step-N-sigma_rel-S, ddpm.models.phema) belongs to."""
    path = Path(model)
    return path.parent.parent if path.parent.name in ("checkpoints", "ema-reconstructions") else path.parent


def load_pipeline(path: str | Path) -> DiffusionPipeline:
    """A pipeline directory (DDPMPipeline layout, or a class-conditional export) or a checkpoint directory, with a
    one-line error for anything else."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return pipeline_from_checkpoint(path)
    if not (path / "model_index.json").is_file():
        raise UserError(f"{path} is neither a pipeline directory (model_index.json) nor a checkpoint (manifest.json)")
    try:
        index = json.loads((path / "model_index.json").read_text())
        if index.get("_class_name") == ["pipeline", CONDITIONAL_CLASS]:
            # built from its parts with this project's copy of the class: nothing from the folder is executed
            unet = UNet2DModel.from_pretrained(path / "unet")
            scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
            id2label = index.get("id2label")
            return make_pipeline(
                unet, scheduler, [id2label[str(i)] for i in range(len(id2label))] if id2label else None
            )
        return DDPMPipeline.from_pretrained(path)
    except Exception as e:  # diffusers raises several types for missing or mismatched files
        raise UserError(f"cannot load the pipeline {path} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
