"""Publishing a pipeline on the Hugging Face Hub: a model card written from the run, then one commit.

The token comes from huggingface_hub's usual places (HF_TOKEN, or the token file that
`huggingface-cli login` writes); it is never printed or logged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from ddpm.errors import UserError
from ddpm.export import run_dir_of


def final_grid(run_dir: Path) -> Path | None:
    """The sample grid the run ended with (summary.json names it)."""
    try:
        grid = Path(json.loads((run_dir / "summary.json").read_text())["grid"])
    except (OSError, ValueError, KeyError):
        return None
    return grid if grid.is_file() else None


def model_card(pipeline: Path, repo_id: str) -> str:
    """README.md for the Hub: metadata for search, what was trained on what, how to sample, the figures measured."""
    run_dir = run_dir_of(pipeline)
    cfg_path = run_dir / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    unet = json.loads((pipeline / "unet" / "config.json").read_text())
    scheduler = json.loads((pipeline / "scheduler" / "scheduler_config.json").read_text())
    data = cfg.get("data", {})
    dataset = {"digits": "scikit-learn's 8x8 handwritten digits (1,797 images, upscaled)", "folder": "a local image folder",
               "hf": f"the Hugging Face dataset `{data.get('path', '')}`"}.get(data.get("source", ""), "unknown data")
    front = {"library_name": "diffusers", "license": "mit", "pipeline_tag": "unconditional-image-generation",
             "tags": ["pytorch", "diffusers", "unconditional-image-generation", "ddpm"]}
    if data.get("source") == "hf":
        front["datasets"] = [data.get("path", "")]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {repo_id.split('/')[-1]}", "",
             f"A DDPM (`UNet2DModel` + `DDPMScheduler`) generating {unet['sample_size']}x{unet['sample_size']} images, trained on {dataset}.", ""]
    if final_grid(run_dir):
        t = cfg.get("train", {})
        lines += ["![samples](samples.png)", "",
                  f"EMA weights, {t.get('sample_scheduler', 'ddim')} {t.get('sample_steps', 25)} steps, seeds 0-{t.get('sample_images', 64) - 1}.", ""]
    lines += ["## Usage", "", "```python", "from diffusers import DDPMPipeline, DDIMScheduler", "",
              f'pipe = DDPMPipeline.from_pretrained("{repo_id}")',
              'pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")',
              "images = pipe(batch_size=16, num_inference_steps=25).images", "```", "",
              "## Training", "",
              f"- steps: {summary.get('steps', 'unknown')}; resolution {unet['sample_size']}; channels {unet['block_out_channels']}",
              f"- noise schedule: {scheduler.get('beta_schedule')}, {scheduler.get('num_train_timesteps')} steps, "
              f"{scheduler.get('prediction_type')} prediction"]
    if cfg:
        t, o = cfg.get("train", {}), cfg.get("optim", {})
        lines += [f"- batch size {t.get('batch_size')} x accumulation {t.get('grad_accum')}, AdamW lr {o.get('lr')}, "
                  f"EMA decay up to {o.get('ema_decay')}, precision {t.get('mixed_precision')}"]
    evaluations = sorted((run_dir / "evaluation").glob("*.json")) if (run_dir / "evaluation").is_dir() else []
    if evaluations:
        lines += ["", "## Evaluation", "", "| metric | value | images | sampler | steps |", "|---|---|---|---|---|"]
        for path in evaluations:
            row = json.loads(path.read_text())
            if Path(row.get("model_path", "")).resolve() != pipeline.resolve():
                continue  # an evaluation of a checkpoint, not of the weights being published
            for key in ("fid", "kid", "fd_digitsnet", "kd_digitsnet"):
                if key in row:
                    lines.append(f"| {key} | {row[key]:.4g} | {row['num_images']} | {row['scheduler']} | {row['steps']} |")
    lines += ["", "Trained with the `ddpm` tool (config in `training_config.yaml`)."]
    return "\n".join(lines) + "\n"


def stage(pipeline: Path, repo_id: str, out: Path) -> list[Path]:
    """The folder that becomes the commit: the pipeline, README.md, the run's config and sample grid."""
    if not (pipeline / "model_index.json").is_file():
        raise UserError(f"--pipeline: {pipeline} is not a pipeline directory (no model_index.json); train first")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(pipeline, out)
    run_dir = run_dir_of(pipeline)
    (out / "README.md").write_text(model_card(pipeline, repo_id))
    if (run_dir / "config.yaml").is_file():
        shutil.copy(run_dir / "config.yaml", out / "training_config.yaml")
    if final_grid(run_dir):
        shutil.copy(final_grid(run_dir), out / "samples.png")
    return sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
