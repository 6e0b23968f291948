"""Publishing a pipeline on the Hugging Face Hub: the folder checked, a model card written from the run, one commit.

What is uploaded is the pipeline itself (model_index.json, the component folders it names, and a class-conditional
export's pipeline.py, which diffusers fetches with the weights), the card,
the run's training config and its final sample grid; never checkpoints, optimizer states, W&B files or
caches, whatever else lies in the folder. The token comes from huggingface_hub's usual places (HF_TOKEN,
or the token file that `hf auth login` writes); it is never printed or logged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from ddpm.config import DEFAULT_SAMPLER, DEFAULT_STEPS
from ddpm.errors import UserError
from ddpm.evaluation.evaluate import SEED_STRIDE
from ddpm.evaluation.metrics import METRICS
from ddpm.evaluation.scores import best_score, headline, measurement, read_scores
from ddpm.models.export import run_dir_of
from ddpm.models.phema import reconstruction_settings
from ddpm.sampling.sample import sampler_recipe


def final_grid(run_dir: Path, pipeline: Path | None = None) -> Path | None:
    """The sample grid the run ended with (summary.json names it). Given the pipeline being published: only when it
    is the run's own export, whose weights drew that grid (not a checkpoint's or a post-hoc EMA's)."""
    if pipeline is not None and Path(pipeline).resolve() != (Path(run_dir) / "pipeline").resolve():
        return None
    try:
        grid = Path(json.loads((run_dir / "summary.json").read_text())["grid"])
    except (OSError, ValueError, KeyError):
        return None
    return grid if grid.is_file() else None


def pipeline_files(pipeline: Path) -> list[Path]:
    """model_index.json and the files of the components it names (unet/, scheduler/, ...), relative to `pipeline`."""
    index_path = pipeline / "model_index.json"
    if not index_path.is_file():
        raise UserError(f"--pipeline: {pipeline} is not a pipeline directory (no model_index.json); train first")
    try:
        index = json.loads(index_path.read_text())
    except ValueError as e:
        raise UserError(f"--pipeline: {index_path} is not valid JSON ({e})") from None
    components = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None]
    files = [Path("model_index.json")]
    if isinstance(index.get("_class_name"), list) and (pipeline / f"{index['_class_name'][0]}.py").is_file():
        files.append(Path(f"{index['_class_name'][0]}.py"))  # the pipeline's own code (ddpm.models.export)
    for name in components:
        files += sorted(
            p.relative_to(pipeline)
            for p in (pipeline / name).rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(pipeline).parts)
        )
    return files


def check_pipeline(pipeline: Path) -> str:
    """Loads the folder as the pipeline class model_index.json names; a partial or broken export is refused.
    Returns the class name."""
    from diffusers import DiffusionPipeline

    from ddpm.models.export import CONDITIONAL_CLASS, CUSTOM_PIPELINE
    from ddpm.sampling.pretrained import pipeline_class

    pipeline_files(pipeline)
    own_code = pipeline_class(pipeline) == CONDITIONAL_CLASS
    if own_code and (pipeline / "pipeline.py").read_bytes() != CUSTOM_PIPELINE.read_bytes():
        raise UserError(f"--pipeline: {pipeline}/pipeline.py is not the code this project exports; export it again")
    try:
        # the folder's code is this project's own file (checked above): loading it is what a user's load does
        pipe = DiffusionPipeline.from_pretrained(pipeline, trust_remote_code=own_code)
    except Exception as e:  # diffusers raises many types for missing, truncated or mismatched files
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(
            f"--pipeline: {pipeline} does not load ({type(e).__name__}: {first}); "
            "a partial or broken export is never uploaded"
        ) from None
    return type(pipe).__name__


# How each score column is named on the Hub: an offline feature net's distance is not FID, and says so.
METRIC_NAMES = {
    "fid": "FID",
    "kid": "KID",
    "fd_digitsnet": "FD-digitsnet (Fréchet distance in an offline digits feature net; not FID)",
    "kd_digitsnet": "KD-digitsnet (kernel distance in an offline digits feature net; not KID)",
}


def final_scores(run_dir: Path, final_step: int | None) -> list[dict]:
    """One score per metric of the run's final weights: the one from the most images, then the lowest."""
    chosen: dict[str, dict] = {}
    for row in read_scores(run_dir):
        if row["step"] != final_step or headline(row["metric"]) not in row or "ema_length" in row:  # other weights
            continue
        old = chosen.get(row["metric"])
        rank = (-row["num_images"], row[headline(row["metric"])])
        if old is None or rank < (-old["num_images"], old[headline(old["metric"])]):
            chosen[row["metric"]] = row
    return list(chosen.values())


def model_card(pipeline: Path, repo_id: str, license: str = "mit") -> str:
    """README.md for the Hub: metadata for search, what was trained on what, how to sample, the figures measured."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    run_dir = run_dir_of(pipeline)
    cfg_path = run_dir / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    unet = json.loads((pipeline / "unet" / "config.json").read_text())
    scheduler = json.loads((pipeline / "scheduler" / "scheduler_config.json").read_text())
    # the project's default sampler with the settings ddpm.sampling.sample gives it on this schedule:
    # what `ddpm sample` runs
    sampler_cls, sampler_extra = sampler_recipe(DEFAULT_SAMPLER, scheduler)
    sampler_args = ", ".join(f"{k}={v!r}" for k, v in sampler_extra.items())
    data = cfg.get("data", {})
    index = json.loads((pipeline / "model_index.json").read_text())
    id2label = index.get("id2label") if isinstance(index.get("_class_name"), list) else None
    classes = [id2label[str(i)] for i in range(len(id2label))] if id2label else []
    dataset = {
        "digits": "scikit-learn's 8x8 handwritten digits (1,797 images, upscaled)",
        "folder": "a local image folder",
        "hf": f"the Hugging Face dataset `{data.get('path', '')}`",
    }.get(data.get("source", ""), "unknown data")
    # Scores of the published weights (the final EMA: the run's last step), in the Hub's model-index format.
    # (a post-hoc EMA export has none of its own there: the run's scores are of other weights)
    published = [] if reconstruction_settings(pipeline) else final_scores(run_dir, summary.get("steps"))
    base = {k: v for k, v in cfg.get("model", {}).items() if k.startswith("init_")} if cfg else {}
    base = base if base.get("init_from") else {}
    base_is_hub = bool(base) and not Path(base["init_from"]).is_absolute()  # ddpm.models.base records paths absolute
    meta = ModelCardData(
        model_name=repo_id.split("/")[-1],
        eval_results=[
            EvalResult(
                task_type="unconditional-image-generation",
                dataset_type=data.get("path") if data.get("source") == "hf" else data.get("source", "unknown"),
                dataset_name=row["reference_data"],
                metric_type=key,
                metric_name=METRIC_NAMES[key],
                metric_value=round(float(row[key]), 6),
                metric_config=f"{row['num_images']} images, {row['scheduler']} {row['steps']} steps, "
                f"seeds from {row['seed'] * SEED_STRIDE}",
            )
            for row in published
            for key in METRICS[row["metric"]][:2]
        ]
        or None,
        library_name="diffusers",
        license=license,
        pipeline_tag="unconditional-image-generation",
        tags=["pytorch", "diffusers", "unconditional-image-generation", "ddpm"]
        + (["class-conditional", "classifier-free-guidance"] if classes else []),
        datasets=[data["path"]] if data.get("source") == "hf" else None,
        base_model=base["init_from"] if base and base_is_hub else None,  # the Hub links the two models
    )
    lines = [
        "---",
        meta.to_yaml(),
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A DDPM (`UNet2DModel` + `DDPMScheduler`) generating {unet['sample_size']}x{unet['sample_size']} images, "
        f"trained on {dataset}.",
        "",
    ]
    if base_is_hub:
        lines += [
            f"Fine-tuned from [{base['init_from']}](https://huggingface.co/{base['init_from']}) "
            f"at commit `{base['init_hash']}`.",
            "",
        ]
    elif base:
        lines += [f"Fine-tuned from `{base['init_from']}` (UNet weights SHA-256 `{base['init_hash']}`).", ""]
    if classes:
        shown = ", ".join(f"`{c}`" for c in classes[:50]) + (
            f" and {len(classes) - 50} more" if len(classes) > 50 else ""
        )
        lines += [
            f"Class-conditional, with classifier-free guidance: {len(classes)} classes, {shown} (ids 0-"
            f"{len(classes) - 1}, in that order). One network predicts both ways: the null class (id {len(classes)}) "
            f"is its unconditional prediction, learnt from the {cfg.get('train', {}).get('label_dropout', 0.1):g} "
            "of training labels dropped to it.",
            "",
        ]
    if final_grid(run_dir, pipeline):
        t = cfg.get("train", {})
        lines += [
            "![samples](samples.png)",
            "",
            f"EMA weights, {t.get('sample_scheduler', DEFAULT_SAMPLER)} {t.get('sample_steps', DEFAULT_STEPS)} steps, "
            f"seeds 0-{t.get('sample_images', 64) - 1}.",
            "",
        ]
    if classes:
        # diffusers runs the pipeline.py saved with the weights (model_index.json names it), hence trust_remote_code
        scale = cfg.get("train", {}).get("sample_guidance_scale", 1.0)
        lines += [
            "## Usage",
            "",
            "```python",
            f"from diffusers import DiffusionPipeline, {sampler_cls.__name__}",
            "",
            f'pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)',
            f"pipe.scheduler = {sampler_cls.__name__}.from_config(pipe.scheduler.config, {sampler_args})",
            f"labels = {[classes[i % len(classes)] for i in range(min(4, 2 * len(classes)))]!r}  # names or ids",
            f"images = pipe(class_labels=labels, guidance_scale={scale:g}, num_inference_steps={DEFAULT_STEPS}).images",
            "```",
            "",
            "`guidance_scale`: 1 is the conditional model alone, 0 the unconditional one; above 1 each step runs both "
            "in one batch and moves away from the unconditional prediction.",
            "",
        ]
    else:
        lines += [
            "## Usage",
            "",
            "```python",
            f"from diffusers import DDPMPipeline, {sampler_cls.__name__}",
            "",
            f'pipe = DDPMPipeline.from_pretrained("{repo_id}")',
            f"pipe.scheduler = {sampler_cls.__name__}.from_config(pipe.scheduler.config, {sampler_args})",
            f"images = pipe(batch_size=16, num_inference_steps={DEFAULT_STEPS}).images",
            "```",
            "",
        ]
    lines += [
        "## Training",
        "",
        f"- steps: {summary.get('steps', 'unknown')}; resolution {unet['sample_size']}; "
        f"channels {unet['block_out_channels']}",
        f"- noise schedule: {scheduler.get('beta_schedule')}, {scheduler.get('num_train_timesteps')} steps, "
        f"{scheduler.get('prediction_type')} prediction",
    ]
    posthoc = reconstruction_settings(pipeline)  # a `ddpm ema` export: its weights are not the classic EMA
    if cfg:
        t, o = cfg.get("train", {}), cfg.get("optim", {})
        ema = (
            f"post-hoc EMA, sigma_rel {posthoc['sigma_rel']:g} at step {posthoc['step']} (Karras et al. 2024)"
            if posthoc
            else f"EMA decay up to {o.get('ema_decay')}"
        )
        lines += [
            f"- batch size {t.get('batch_size')} x accumulation {t.get('grad_accum')}, AdamW lr {o.get('lr')}, "
            f"{ema}, precision {t.get('mixed_precision')}, loss weighting {o.get('loss_weighting', 'none')}"
        ]
    if published:
        lines += [
            "",
            "## Evaluation",
            "",
            "| metric | value | images | sampler | steps | reference |",
            "|---|---|---|---|---|---|",
        ]
        for row in published:
            for key in METRICS[row["metric"]][:2]:
                lines.append(
                    f"| {METRIC_NAMES[key]} | {row[key]:.4g} | {row['num_images']} | {row['scheduler']} | "
                    f"{row['steps']} | {row['reference_data']} |"
                )
    best = best_score([r for r in read_scores(run_dir) if "ema_length" not in r])  # the run's own EMA only
    final = next((r for r in published if best and r["metric"] == best["metric"]), None)
    if (
        best
        and final
        and measurement(best) == measurement(final)
        and best[headline(best["metric"])] < final[headline(best["metric"])]
    ):
        key = headline(best["metric"])
        lines += [
            "",
            f"The run's best {METRIC_NAMES[key]} was {best[key]:.4g}, from the EMA weights at training step "
            f"{best['step']}; these weights are the EMA at the last step, {final[key]:.4g} measured the same way.",
        ]
    lines += ["", "Trained with the `ddpm` tool (config in `training_config.yaml`)."]
    return str(ModelCard("\n".join(lines) + "\n"))  # parses the header: a malformed card fails here, not on the Hub


def stage(pipeline: Path, repo_id: str, out: Path, license: str = "mit") -> list[Path]:
    """The folder that becomes the commit: the pipeline's own files, README.md, the run's config and sample grid."""
    shutil.rmtree(out, ignore_errors=True)
    for rel in pipeline_files(pipeline):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(pipeline / rel, out / rel)
    run_dir = run_dir_of(pipeline)
    (out / "README.md").write_text(model_card(pipeline, repo_id, license))
    if (run_dir / "config.yaml").is_file():
        shutil.copy(run_dir / "config.yaml", out / "training_config.yaml")
    if final_grid(run_dir, pipeline):
        shutil.copy(final_grid(run_dir, pipeline), out / "samples.png")
    return sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
