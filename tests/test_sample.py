"""Sampling: every scheduler runs; an image depends on its seed only, not on the batch it was in."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline
from PIL import Image

from ddpm.config import load_config
from ddpm.models.schedule import build_scheduler
from ddpm.models.unet import build_unet
from ddpm.sampling.sample import SAMPLERS, generate, make_grid, make_sampler
from jobs.sample import SampleConfig, run
from tests.conftest import TINY_MODEL, cli


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    cfg = load_config(None, [*TINY_MODEL, "data.resolution=8"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pipe") / "pipeline"
    DDPMPipeline(unet=build_unet(cfg.model, 8), scheduler=build_scheduler(cfg.schedule)).save_pretrained(path)
    return path


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_scheduler_samples(tiny_pipeline, name):
    pipe = DDPMPipeline.from_pretrained(tiny_pipeline)
    images = generate(pipe.unet, make_sampler(name, pipe.scheduler), [0, 1], steps=3, batch_size=2)
    assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8


@pytest.mark.parametrize("name", ["ddpm", "dpmsolver++", "sde-dpmsolver++", "euler-ancestral"])
def test_an_image_depends_on_its_seed_not_its_batch(tiny_pipeline, name):
    pipe = DDPMPipeline.from_pretrained(tiny_pipeline)
    sampler = make_sampler(name, pipe.scheduler)
    together = generate(pipe.unet, sampler, [5, 6, 7], steps=4, batch_size=3)
    alone = np.concatenate([generate(pipe.unet, sampler, [s], steps=4, batch_size=1) for s in (5, 6, 7)])
    assert np.abs(together.astype(int) - alone.astype(int)).max() <= 1  # float reduction order may differ by one level
    assert not np.array_equal(together[0], together[1])


def test_sample_job_is_deterministic_and_writes_pngs_grid_and_settings(tiny_pipeline, tmp_path):
    a = run(
        SampleConfig(
            pipeline=str(tiny_pipeline),
            scheduler="ddim",
            steps=3,
            num_images=5,
            seed=10,
            batch_size=2,
            out=str(tmp_path / "a"),
        )
    )
    b = run(
        SampleConfig(
            pipeline=str(tiny_pipeline),
            scheduler="ddim",
            steps=3,
            num_images=5,
            seed=10,
            batch_size=5,
            out=str(tmp_path / "b"),
        )
    )
    names = sorted(p.name for p in (a / "images").iterdir())
    assert names == [f"seed-{s:06d}.png" for s in range(10, 15)]
    for name in names:
        assert (a / "images" / name).read_bytes() == (b / "images" / name).read_bytes()
    assert Image.open(a / "grid.png").size[0] > 8 * 3
    settings = json.loads((a / "settings.json").read_text())
    assert settings["scheduler"] == "ddim" and settings["seed"] == 10 and settings["device"] == "cpu"
    # the sampler's own settings, enough to reproduce the grid from its folder
    assert settings["sampler"]["class"] == "DDIMScheduler" and settings["sampler"]["timestep_spacing"] == "trailing"
    assert settings["sampler"]["beta_schedule"] == "squaredcos_cap_v2" and settings["sampler"]["clip_sample"] is True


def test_sample_cli(tiny_pipeline, tmp_path):
    proc = cli(
        "sample",
        "--pipeline",
        str(tiny_pipeline),
        "--scheduler",
        "dpmsolver++",
        "--steps",
        "3",
        "--num-images",
        "4",
        "--seed",
        "0",
        "--out",
        str(tmp_path / "out"),
    )
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 4 and (tmp_path / "out" / "grid.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--pipeline", "/nonexistent/pipeline"],
            "/nonexistent/pipeline is neither a pipeline directory (model_index.json) nor a checkpoint",
        ),
        (["--scheduler", "warp-drive"], "'warp-drive' is not one of"),
        (["--steps", "0"], "--steps must be positive"),
    ],
)
def test_sample_cli_errors_are_one_line(tiny_pipeline, args, message):
    argv = ["sample", *([] if "--pipeline" in args else ["--pipeline", str(tiny_pipeline)]), *args]
    proc = cli(*argv)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_grid_is_square_and_upscaled():
    images = np.zeros((10, 8, 8, 3), dtype=np.uint8)
    grid = make_grid(images, min_cell=64, pad=2)
    assert grid.size == (4 * 66 + 2, 3 * 66 + 2)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_scheduler_gives_the_same_images_from_every_entry_point(tiny_pipeline, tmp_path, name):
    """ddpm sample, ddpm generate and the scorer behind ddpm evaluate and the sweeps run one sampling loop: the
    same seed gives the same image from each (generate once handed DDPM pipelines to DDPMPipeline.__call__,
    which broke unipc, heun, ... and scaled the noise wrongly for the Euler family)."""
    from ddpm.evaluation.evaluate import Evaluator, Scoring
    from jobs.generate import GenerateConfig
    from jobs.generate import run as generate_run

    seeds, common = [3, 4, 5], {"steps": 3, "num_images": 3, "seed": 3, "batch_size": 3, "precision": "fp32"}
    sampled = run(SampleConfig(pipeline=str(tiny_pipeline), scheduler=name, out=str(tmp_path / "s"), **common))
    generated = generate_run(
        GenerateConfig(model=str(tiny_pipeline), scheduler=name, out=str(tmp_path / "g"), **common)
    )
    scored = Evaluator(Scoring(metric="none", batch_size=3), device="cpu", precision="fp32").sample(
        str(tiny_pipeline), name, 3, seeds
    )
    for k, seed in enumerate(seeds):
        from_sample = np.asarray(Image.open(sampled / "images" / f"seed-{seed:06d}.png"))
        from_generate = np.asarray(Image.open(generated / "images" / f"seed-{seed:06d}.png"))
        assert np.array_equal(from_sample, from_generate) and np.array_equal(from_sample, scored[k])
    assert scored.std() > 0 and not np.array_equal(scored[0], scored[1])  # a NaN sample would come out flat


def test_many_images_go_to_disk_batch_by_batch_and_the_grid_shows_the_first_64(tiny_pipeline, tmp_path, monkeypatch):
    import ddpm.sampling.sample

    batches_alive = []  # how many batches of images the sampler had handed out while the job still held them
    real = ddpm.sampling.sample.generate_batches

    def watched(*args, **kwargs):
        for chunk, images in real(*args, **kwargs):
            batches_alive.append(len(chunk))
            yield chunk, images

    monkeypatch.setattr(ddpm.sampling.sample, "generate_batches", watched)
    out = run(SampleConfig(pipeline=str(tiny_pipeline), scheduler="ddim", steps=2, num_images=70, batch_size=16,
                           precision="fp32", out=str(tmp_path / "s")))  # fmt: skip
    assert batches_alive == [16, 16, 16, 16, 6]  # five batches, streamed
    assert len(list((out / "images").glob("seed-*.png"))) == 70
    assert Image.open(out / "grid.png").size == (8 * 66 + 2, 8 * 66 + 2)  # 64 cells of 8 px upscaled to 64, padded
    alone = generate(DDPMPipeline.from_pretrained(tiny_pipeline).unet, make_sampler("ddim", build_scheduler(
        load_config(None, [*TINY_MODEL, "data.resolution=8"]).schedule)), [69], steps=2, batch_size=1)  # fmt: skip
    written = np.asarray(Image.open(out / "images" / "seed-000069.png"))
    assert np.abs(written.astype(int) - alone[0].astype(int)).max() <= 1  # the last, short batch is the same image


@pytest.mark.slow  # torch.compile on a CPU takes a minute or more
def test_compiled_sampling_gives_the_eager_images(tiny_pipeline, tmp_path):
    kwargs = {"pipeline": str(tiny_pipeline), "steps": 3, "num_images": 4, "precision": "fp32"}
    eager = run(SampleConfig(**kwargs, out=str(tmp_path / "e")))
    compiled = run(SampleConfig(**kwargs, out=str(tmp_path / "c"), compile=True))
    for seed in range(4):
        a, b = (np.asarray(Image.open(d / "images" / f"seed-{seed:06d}.png")).astype(int) for d in (eager, compiled))
        assert np.abs(a - b).max() <= 2  # fused kernels round differently, by a level or two at most
    assert json.loads((compiled / "settings.json").read_text())["compile"] is True


def test_default_folders_are_keyed_on_the_model_and_a_rerun_leaves_no_stale_images(tiny_pipeline, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    for model in ("pipeline", "step-00000002", "step-00000004"):
        shutil.copytree(tiny_pipeline, run_dir / ("checkpoints" if model.startswith("step") else "") / model)
    settings = dict(scheduler="ddim", steps=2, batch_size=4)
    a = run(SampleConfig(pipeline=str(run_dir / "pipeline"), num_images=2, **settings))
    b = run(SampleConfig(pipeline=str(run_dir / "checkpoints" / "step-00000002"), num_images=6, **settings))
    c = run(SampleConfig(pipeline=str(run_dir / "checkpoints" / "step-00000004"), num_images=2, **settings))
    assert a == run_dir / "samples" / "ddim-2steps-seed0"  # a run's export: where it always went
    assert (b.name, c.name) == ("step-00000002-ddim-2steps-seed0", "step-00000004-ddim-2steps-seed0")
    assert b.parent == c.parent == run_dir / "samples" and len(list((b / "images").iterdir())) == 6
    # The same folder again with fewer images: the earlier run's extra seeds go, the folder matches its settings.
    again = run(SampleConfig(pipeline=str(run_dir / "checkpoints" / "step-00000002"), num_images=3, **settings))
    assert again == b and sorted(p.name for p in (b / "images").iterdir()) == [f"seed-00000{i}.png" for i in range(3)]
    done = json.loads((b / "settings.json").read_text())
    assert done["complete"] is True and done["num_images"] == 3
