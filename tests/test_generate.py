"""`ddpm generate`: tiny text-to-image and unconditional pipelines built here, loaded by path, 2 steps on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main
from tests import tiny_pipelines
from tests.conftest import cli, run_cli

POTATO = "an abstract oil painting of sks mr potato head by picasso"


@pytest.fixture(scope="module")
def text_pipeline(tmp_path_factory) -> Path:
    return tiny_pipelines.text_to_image(tmp_path_factory.mktemp("t2i") / "pipeline")


@pytest.fixture(scope="module")
def ddpm_pipeline(tmp_path_factory) -> Path:
    return tiny_pipelines.unconditional(tmp_path_factory.mktemp("uncond") / "pipeline")


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_text_to_image_from_a_local_directory(text_pipeline, tmp_path):
    out = tmp_path / "gen"
    r = cli(
        "generate",
        "--model",
        str(text_pipeline),
        "--prompt",
        POTATO,
        "--prompt",
        "a red square",
        "--steps",
        "2",
        "--num-images",
        "3",
        "--batch-size",
        "2",
        "--seed",
        "5",
        "--precision",
        "fp32",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    settings = json.loads((out / "settings.json").read_text())
    assert settings["pipeline_class"] == "StableDiffusionPipeline" and settings["text_to_image"] is True
    assert (
        settings["prompts"] == [POTATO, "a red square"]
        and settings["precision"] == "fp32"
        and settings["device"] == "cpu"
    )
    assert [(i["prompt"], i["seed"]) for i in settings["images"]] == [
        (p, s) for p in (POTATO, "a red square") for s in (5, 6, 7)
    ]
    files = sorted(p.name for p in (out / "images").iterdir())
    assert files == [f"p{j}-seed-{s:06d}.png" for j in (0, 1) for s in (5, 6, 7)]
    first = Image.open(out / "images" / files[0])
    assert first.size == (32, 32)  # 16 latent px x the VAE's factor 2
    grid = Image.open(out / "grid.png")
    assert grid.size == (3 * (64 + 2) + 2, 2 * (64 + 2) + 2)  # a row per prompt, a column per seed
    # the prompt conditions the image: same seed, other prompt, other pixels
    assert not np.array_equal(pixels(out / "images/p0-seed-000005.png"), pixels(out / "images/p1-seed-000005.png"))

    # image k depends on its seed only, not on the batch it was made in (exactly so in fp32: bf16 kernels round
    # differently for other batch shapes)
    again = tmp_path / "again"
    assert (
        main(
            [
                "generate",
                "--model",
                str(text_pipeline),
                "--prompt",
                POTATO,
                "--steps",
                "2",
                "--num-images",
                "1",
                "--seed",
                "6",
                "--precision",
                "fp32",
                "--out",
                str(again),
            ]
        )
        == 0
    )
    assert np.array_equal(pixels(again / "images/p0-seed-000006.png"), pixels(out / "images/p0-seed-000006.png"))


def test_unconditional_with_a_swapped_scheduler(ddpm_pipeline, tmp_path):
    out = tmp_path / "gen"
    assert (
        main(
            [
                "generate",
                "--model",
                str(ddpm_pipeline),
                "--scheduler",
                "ddim",
                "--steps",
                "2",
                "--num-images",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    settings = json.loads((out / "settings.json").read_text())
    assert settings["pipeline_class"] == "DDPMPipeline" and settings["text_to_image"] is False
    assert settings["scheduler_class"] == "DDIMScheduler" and settings["guidance"] is None
    assert settings["sampler"]["class"] == "DDIMScheduler" and settings["sampler"]["timestep_spacing"] == "trailing"
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"seed-{s:06d}.png" for s in range(4)]
    assert Image.open(out / "images" / "seed-000000.png").size == (8, 8)
    assert Image.open(out / "grid.png").size == (2 * (64 + 2) + 2,) * 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "a cat"], "is unconditional (DDPMPipeline): it takes no --prompt"),
        (["--dtype", "fp16", "--device", "cpu"], "precision fp16 does not run on the CPU"),
        (["--scheduler", "nope"], "--scheduler: 'nope' is not one of ddpm, ddim,"),
        (["--num-images", "0"], "--num-images must be positive, got 0"),
    ],
)
def test_bad_generate_arguments_fail_in_one_line(ddpm_pipeline, tmp_path, capsys, args, message):
    assert main(["generate", "--model", str(ddpm_pipeline), "--steps", "1", "--out", str(tmp_path / "g"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after diffusers' loading bar, when it loaded
    assert err.startswith("ddpm generate: error: ") and message in err
    assert not (tmp_path / "g" / "images").exists()


def test_text_pipeline_without_prompt_and_existing_output_are_refused(text_pipeline, tmp_path, capsys):
    assert main(["generate", "--model", str(text_pipeline), "--steps", "1", "--out", str(tmp_path / "g")]) == 2
    assert "text-to-image pipeline (StableDiffusionPipeline): give --prompt" in capsys.readouterr().err
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.png").write_bytes(b"not to be lost")
    assert main(["generate", "--model", str(text_pipeline), "--prompt", "x", "--steps", "1", "--out", str(kept)]) == 2
    assert f"--out {kept} already holds files" in capsys.readouterr().err
    assert (kept / "mine.png").read_bytes() == b"not to be lost" and sorted(p.name for p in kept.iterdir()) == [
        "mine.png"
    ]


def test_hub_id_offline_says_how_to_fetch_it(tmp_path):
    r = run_cli(
        "generate",
        "--model",
        "johnowhitaker/ddpm-butterflies-32px",
        "--out",
        str(tmp_path / "g"),
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")},
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "ddpm generate: error: --model johnowhitaker/ddpm-butterflies-32px: not in the local Hugging Face "
        "cache and HF_HUB_OFFLINE is set; on a machine with network run "
        "`hf download johnowhitaker/ddpm-butterflies-32px` (same HF_HOME), or give a local directory"
    )


def test_a_folder_that_is_not_a_pipeline_is_named(tmp_path, capsys):
    (tmp_path / "weights").mkdir()
    assert main(["generate", "--model", str(tmp_path / "weights")]) == 2
    assert (
        f"--model {tmp_path / 'weights'}: a local path but not a diffusers pipeline (no model_index.json)"
        in capsys.readouterr().err
    )
