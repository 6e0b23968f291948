"""`ddpm upload`: the staged commit (pipeline, model card, config, samples) and its errors, without a network."""

from __future__ import annotations

from ddpm.config import load_config
from ddpm.train import train
from tests.conftest import run_cli


def test_dry_run_lists_the_commit_and_prints_a_model_card(tiny, tmp_path):
    cfg = load_config(None, tiny())
    pipeline = train(cfg)
    r = run_cli("upload", "--pipeline", str(pipeline), "--repo", "someone/tiny-digits", "--dry-run", env={"HF_TOKEN": "hf_secret_value_123"})
    assert r.returncode == 0, r.stderr
    listed = [line.strip() for line in r.stdout.splitlines() if line.startswith("  ")]
    for name in ("README.md", "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                 "unet/diffusion_pytorch_model.safetensors", "training_config.yaml", "samples.png"):
        assert name in listed, name
    card = r.stdout.split("--- README.md ---", 1)[1]
    assert card.startswith("\n---\nlibrary_name: diffusers") and "pipeline_tag: unconditional-image-generation" in card
    assert 'DDPMPipeline.from_pretrained("someone/tiny-digits")' in card and "- steps: 6;" in card
    assert "hf_secret_value_123" not in r.stdout + r.stderr


def test_upload_errors_are_one_line(tmp_path):
    r = run_cli("upload", "--pipeline", str(tmp_path), "--repo", "someone/x", "--dry-run")
    assert r.returncode == 2 and r.stderr.strip() == f"ddpm upload: error: --pipeline: {tmp_path} is not a pipeline directory (no model_index.json); train first"
    r = run_cli("upload", "--pipeline", str(tmp_path), "--repo", "no-slash", "--dry-run")
    assert r.returncode == 2 and "--repo: 'no-slash' is not of the form user/name" in r.stderr
