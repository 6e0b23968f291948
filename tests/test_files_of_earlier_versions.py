"""Files written before the library moved into folders (commit 83e7170, `ddpm train` of a tiny run: tests/data/
pre-layout/README.md) still load: the checkpoint resumes, the export samples, the cache opens warm, the scores read.

A change to the on-disk formats that breaks these files must say so here, with a migration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline

from ddpm.config import load_config
from ddpm.data.cache import open_cache
from ddpm.evaluation.scores import best_score, read_scores
from ddpm.models.checkpoint import latest_checkpoint
from ddpm.models.export import load_pipeline, pipeline_from_checkpoint
from ddpm.training.loop import train
from tests.conftest import ROOT

DATA = ROOT / "tests" / "data" / "pre-layout"


@pytest.fixture
def earlier(tmp_path) -> tuple[Path, Path]:
    """A copy of the earlier run directory and cache: (runs_dir, cache_dir)."""
    shutil.copytree(DATA / "run", tmp_path / "runs" / "tiny")
    shutil.copytree(DATA / "cache", tmp_path / "cache")
    return tmp_path / "runs", tmp_path / "cache"


def earlier_config(runs: Path, cache: Path, *extra: str):
    saved = (DATA / "run" / "config.yaml").read_text()
    overrides = [f"runs_dir={runs}", f"data.cache_dir={cache}", "tracking.wandb=false", *extra]
    path = runs / "earlier.yaml"
    path.write_text(saved)
    return load_config(path, overrides)


def test_the_earlier_checkpoint_verifies_and_resumes_to_more_steps(earlier):
    runs, cache = earlier
    ckpt = latest_checkpoint(runs / "tiny" / "checkpoints")
    assert ckpt is not None and ckpt.step == 6
    before = ckpt.tensors("unet")
    cfg = earlier_config(runs, cache, "train.max_steps=8", "train.eval_every=0")
    exported = train(cfg)
    rows = [json.loads(line) for line in (runs / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6, 8]  # resumed at 6, not started again
    after = latest_checkpoint(runs / "tiny" / "checkpoints")
    assert after.step == 8 and not all(torch.equal(before[k], after.tensors("unet")[k]) for k in before)
    assert list(DDPMPipeline.from_pretrained(exported).unet.config.block_out_channels) == [8, 16]


def test_the_earlier_export_and_checkpoint_load_as_pipelines(earlier):
    runs, _ = earlier
    pipe = load_pipeline(runs / "tiny" / "pipeline")
    from_ckpt = pipeline_from_checkpoint(runs / "tiny" / "checkpoints" / "step-00000006")
    ema = load_pipeline(runs / "tiny" / "pipeline").unet.state_dict()
    assert all(torch.equal(from_ckpt.unet.state_dict()[k], ema[k]) for k in ema)
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 8, 8, 1)


def test_the_earlier_cache_opens_warm_without_decoding(earlier, monkeypatch):
    runs, cache = earlier
    from ddpm.data import cache as cache_module

    monkeypatch.setattr(cache_module, "build_parts", lambda *a, **k: pytest.fail("the cache was built again"))
    opened = open_cache(earlier_config(runs, cache).data)
    assert len(opened) == 1797 and opened.meta["resolution"] == 8


def test_the_earlier_scores_read_and_rank(earlier):
    runs, _ = earlier
    rows = read_scores(runs / "tiny")
    assert len(rows) == 1 and rows[0]["step"] == 6 and rows[0]["metric"] == "digitsnet"
    assert best_score(rows)["fd_digitsnet"] == rows[0]["fd_digitsnet"]
