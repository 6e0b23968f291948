"""The benchmark runs end to end in quick mode (what CI checks); speed itself is not asserted here."""

from __future__ import annotations

import json

import pytest
import torch

from bench.__main__ import BenchConfig, run
from bench.report import guidance_report, report, sampling_report
from ddpm.config import DEFAULT_SAMPLER, DEFAULT_STEPS
from ddpm.device import auto_precision


@pytest.mark.slow  # a developer tool beside the product: make test-slow
def test_quick_bench_measures_every_stage(tmp_path):
    results = run(BenchConfig(quick=True, pipeline=str(tmp_path / "none"), workdir=str(tmp_path)))
    assert results["data"]["pil_img_s"] > 0 and results["data"]["cached_img_s"] > 0
    assert results["reference"]["img_s"] > 0 and results["ours"]["img_s"] > 0
    assert results["ours"]["flops_per_img"] > 1e8  # the tutorial UNet at 32 px: about a GFLOP per image
    runs = [(r["sampler"], r["steps"], r["precision"]) for r in results["sampling"]["rows"]]
    auto = auto_precision(torch.device("cpu"))  # the default sampler again in the precision "auto" picks
    extra = [(DEFAULT_SAMPLER, DEFAULT_STEPS, auto)] if auto != "fp32" else []
    assert runs == [("ddpm", 50, "fp32"), ("ddim", 10, "fp32"), ("dpmsolver++", 10, "fp32"), *extra]
    assert all(r["fd"] >= 0 and r["s_per_img"] > 0 for r in results["sampling"]["rows"])
    assert results["data"]["peak_rss_mib"] > 0
    text = report(results)
    assert "| training, tutorial UNet 32 px" in text and "| dpmsolver++ | 10 | fp32 |" in text


@pytest.mark.slow
def test_quick_bench_sampling_alone_reports_images_per_second(tmp_path):
    results = run(BenchConfig(quick=True, sampling=True, pipeline=str(tmp_path / "none"), workdir=str(tmp_path)))
    assert set(results) >= {"sampling"} and "ours" not in results  # the training stages did not run
    text = sampling_report(results)
    assert 'make bench ARGS="--quick --sampling"' in text and "| img/s |" in text
    assert "| dpmsolver++ | 10 | fp32 |" in text


@pytest.mark.slow
def test_quick_guidance_bench_times_the_three_cases_with_what_each_asks_of_the_network(tmp_path):
    results = run(BenchConfig(quick=True, guidance=True, workdir=str(tmp_path)))
    rows = {r["case"]: r for r in results["guidance"]["rows"]}
    assert list(rows) == ["unconditional", "conditional, scale 1", "conditional, scale 2"]
    # Scale 1 is one conditional pass; scale 2 feeds both halves, twice the images, through the network each step.
    assert [r["inputs_per_image_step"] for r in rows.values()] == [1, 1, 2]
    assert rows["unconditional"]["time_ratio"] == 1 and all(r["img_s"] > 0 for r in rows.values())
    text = guidance_report(results)
    assert 'make bench ARGS="--quick --guidance"' in text and "| conditional, scale 2 | 2 |" in text


@pytest.mark.slow
def test_quick_ablation_times_every_variant(tmp_path):
    rows = run(BenchConfig(quick=True, ablation=True, workdir=str(tmp_path)))["ablation"]
    first_two = [r["variant"] for r in rows][:2]
    assert first_two == ["fp32, plain AdamW (the tutorial's step)", "fp32, channels_last, fused AdamW"]
    assert all(r.get("img_s", 0) > 0 or r.get("ms_per_update", 0) > 0 for r in rows) and len(rows) == 8


@pytest.mark.slow
def test_quick_gpu_bench_runs_every_stage_on_this_machine(tmp_path):
    from bench.gpu import dense_bf16_peak
    from bench.gpu import report as gpu_report
    from bench.gpu import run as gpu_run

    json_out = tmp_path / "gpu.json"
    results = gpu_run(True, tmp_path, str(json_out))
    loops = [(r["loop"], r["resolution"]) for r in results["training"]]
    assert loops == [("tutorial", 32), ("ddpm", 32)]
    assert all(r["img_s"] > 0 for r in results["training"] + results["sampling"])
    assert results["training"][1]["tflops"] > 0 and results["sampling"][0]["batch"] == 4
    assert json_out.is_file() and len(json.loads(json_out.read_text())["sampling"]) == 1  # written per stage
    assert "| ddpm train | 32 | 8 |" in gpu_report(results)
    assert dense_bf16_peak("NVIDIA H100 PCIe") == 756e12 and dense_bf16_peak("NVIDIA H200") == 989.4e12
    assert dense_bf16_peak("Tesla T4") is None  # not in the table: MFU left out rather than guessed


@pytest.mark.slow
def test_sampler_settings_scores_each_variant_with_its_setting_applied(tmp_path):
    from bench.sampler_settings import run as settings_run
    from bench.sampler_settings import table
    from bench.sampling import quick_pipeline

    pipeline = quick_pipeline(tmp_path)
    rows = settings_run(str(pipeline), "sde-dpmsolver++", 3, ["midpoint", "heun"], 8, [0], tmp_path / "out")
    assert [r["variant"] for r in rows] == ["midpoint", "heun"]
    assert all(isinstance(r["fd"][0], float) and r["fd"][0] > 0 and r["floor"] > 0 for r in rows)
    assert rows[0]["fd"] != rows[1]["fd"]  # each setting reached the sampler
    assert "| heun | " in table(rows, "sde-dpmsolver++", 3)


def test_the_divergence_table_photographs_are_the_same_everywhere_and_train(tmp_path):
    """bench.divergence's data: colour crops of the photographs the packages ship, identical on every run."""
    import hashlib

    from bench.divergence import photo_crops, train_args
    from ddpm.data.cache import open_cache
    from jobs.train import load

    def digest(folder):
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.jpg"))]

    a, b = photo_crops(tmp_path / "a", count=6), photo_crops(tmp_path / "b", count=6)
    assert len(digest(a)) == 6 and digest(a) == digest(b)
    cfg = load(None, train_args(tmp_path / "runs", a, 1.6e-3, 16, 500), {})
    cache = open_cache(cfg.data)
    assert (len(cache), cfg.data.image_channels, cfg.train.on_divergence) == (6, 3, "warn")
