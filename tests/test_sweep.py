"""Sampling sweeps: every artefact written, finished cells skipped, shards merged equal to one run, W&B files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMPipeline
from PIL import Image

from ddpm.device import auto_precision
from ddpm.evaluation.sweep import load_sweep_config
from ddpm.models.export import pipeline_from_checkpoint
from jobs import sweep as sweep_job
from tests.conftest import cli, copy_of_tiny_run, run_cli


@pytest.fixture
def sweep_file(tiny_run, shared_cache, tmp_path, monkeypatch):
    """Writes a sweep YAML over the session's tiny run; keyword arguments replace its keys."""
    monkeypatch.setenv("DDPM_CACHE", str(shared_cache / "ddpm"))  # feature net + reference features, shared

    def make(name: str = "grid", **changes) -> Path:
        # Each sweep name gets its own copy of the run: sweeps keep their scores in the run (scores.jsonl), and
        # a sweep would take another's cells from there instead of computing them.
        run = tmp_path / f"run-of-{name}" / "runs" / tiny_run.name
        if not run.is_dir():
            copy_of_tiny_run(tiny_run, tmp_path / f"run-of-{name}")
        spec = {
            "name": name,
            "out_dir": str(tmp_path / "sweeps"),
            "models": [{"pipeline": str(run / "pipeline")}],
            "schedulers": ["ddim", "dpmsolver++"],
            "steps": [2, 4],
            "seeds": [0],
            "num_images": 12,
            "batch_size": 6,
            "grid_images": 4,
            "metric": "digitsnet",
            "device": "cpu",
            "precision": "fp32",
            "tracking": {"wandb": False, "project": "ddpm-tests"},
            **changes,
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    return make


METRICS = ("fd_digitsnet", "kd_digitsnet", "kd_digitsnet_std")


def test_a_sweep_writes_every_artefact_then_a_rerun_skips_finished_cells(sweep_file, caplog, monkeypatch):
    cfg = sweep_job.load(sweep_file(tracking={"wandb": True, "project": "ddpm-tests"}))
    files = sweep_job.run(cfg)
    rows = json.loads(files["json"].read_text())
    assert [(r["scheduler"], r["steps"]) for r in rows] == [
        ("ddim", 2),
        ("ddim", 4),
        ("dpmsolver++", 2),
        ("dpmsolver++", 4),
    ]
    for r in rows:
        cell = cfg.sweep_dir / "cells" / r["cell"]
        assert sorted(p.name for p in (cell / "images").iterdir()) == [f"seed-{k:06d}.png" for k in range(12)]
        assert Image.open(cell / "grid.png").size[0] > 8 * 2  # 4 images of 8 px, upscaled into a grid
        assert r["num_images"] == 12 and r["reference_images"] == 1797 and r["metric"] == "digitsnet"
        assert all(np.isfinite(r[m]) for m in METRICS) and r["fd_digitsnet"] > 0 and r["seconds_per_image"] > 0
        assert "fid" not in r and "kid" not in r  # the offline metric never appears under FID's name
    # the real-vs-real floor at 12 images against the same reference, beside every score
    assert len({r["fd_digitsnet_floor"] for r in rows}) == 1 and 0 < rows[0]["fd_digitsnet_floor"]
    header = files["csv"].read_text().splitlines()[0].split(",")
    assert {"cell", "scheduler", "steps", "seed", "num_images", *METRICS, "fd_digitsnet_floor"} <= set(header)
    assert "fid" not in header
    assert len(files["csv"].read_text().splitlines()) == 1 + 4
    assert Image.open(files["plot"]).size[0] >= 400

    # The W&B offline run holds the table of the four rows, the plot and one grid per cell.
    media = next((cfg.sweep_dir / "wandb").glob("offline-run-*")) / "files" / "media"
    table = json.loads(next((media / "table" / "sweep").glob("results_*.table.json")).read_text())
    assert (
        table["columns"][:6] == ["cell", "model", "checkpoint_step", "scheduler", "steps", "seed"]
        and len(table["data"]) == 4
    )
    assert {r[0] for r in table["data"]} == {r["cell"] for r in rows}
    assert len(list((media / "images" / "sweep").glob("plot_*.png"))) == 1
    assert len(list((media / "images" / "grid").rglob("*.png"))) == 4

    # Rerun: nothing is sampled again (row files untouched); a changed setting reruns every cell.
    stamps = {r["cell"]: (cfg.sweep_dir / "cells" / r["cell"] / "row.json").stat().st_mtime_ns for r in rows}
    caplog.set_level("INFO")
    sweep_job.run(sweep_job.load(sweep_file(tracking={"wandb": False})))
    assert "4 of 4 cells already done" in caplog.text
    assert {c: (cfg.sweep_dir / "cells" / c / "row.json").stat().st_mtime_ns for c in stamps} == stamps
    again = sweep_job.run(sweep_job.load(sweep_file(num_images=8)))
    assert {r["num_images"] for r in json.loads(again["json"].read_text())} == {8}
    # New weights at the same path (a re-export) redo the cells too.
    weights = next((Path(rows[0]["model_path"]) / "unet").glob("diffusion_pytorch_model*"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    stamps = {r["cell"]: (cfg.sweep_dir / "cells" / r["cell"] / "row.json").stat().st_mtime_ns for r in rows}
    sweep_job.run(sweep_job.load(sweep_file(num_images=8)))
    assert all((cfg.sweep_dir / "cells" / c / "row.json").stat().st_mtime_ns != t for c, t in stamps.items())
    # A sampler whose settings changed (in ddpm.sampling.sample, or with another diffusers) redoes its own cells only.
    from ddpm.sampling.sample import SAMPLERS

    stamps = {r["cell"]: (cfg.sweep_dir / "cells" / r["cell"] / "row.json").stat().st_mtime_ns for r in rows}
    cls, extra = SAMPLERS["ddim"]
    monkeypatch.setitem(SAMPLERS, "ddim", (cls, {**extra, "timestep_spacing": "leading"}))
    sweep_job.run(sweep_job.load(sweep_file(num_images=8)))
    redone = {c for c, t in stamps.items() if (cfg.sweep_dir / "cells" / c / "row.json").stat().st_mtime_ns != t}
    assert redone == {r["cell"] for r in rows if r["scheduler"] == "ddim"}


@pytest.mark.slow  # the SLURM array test covers shards + merge too
def test_two_shards_merged_equal_the_unsharded_sweep(sweep_file, tmp_path):
    whole = json.loads(sweep_job.run(sweep_job.load(sweep_file("whole")))["json"].read_text())
    config = sweep_file("sharded")
    env = {"DDPM_CACHE": os.environ["DDPM_CACHE"]}
    r = run_cli("sweep", "--config", str(config), "--shard", "0/2", env=env)
    assert r.returncode == 2 and "no plan for this sweep config" in r.stderr.strip().splitlines()[-1]
    assert run_cli("sweep", "--config", str(config), "--plan-only", env=env).returncode == 0
    for shard in ("0/2", "1/2"):  # as two SLURM array tasks would, each in its own process
        r = run_cli("sweep", "--config", str(config), "--shard", shard, env={"DDPM_CACHE": os.environ["DDPM_CACHE"]})
        assert r.returncode == 0, r.stderr
        assert not (tmp_path / "sweeps" / "sharded" / "results.csv").exists()  # a shard writes cells only
    r = run_cli("sweep", "--config", str(config), "--merge", env={"DDPM_CACHE": os.environ["DDPM_CACHE"]})
    assert r.returncode == 0, r.stderr
    merged = json.loads((tmp_path / "sweeps" / "sharded" / "results.json").read_text())
    assert [r["cell"] for r in merged] == [r["cell"] for r in whole]
    for a, b in zip(whole, merged):
        assert {m: a[m] for m in METRICS} == pytest.approx({m: b[m] for m in METRICS}, rel=1e-9)
        cell = Path(a["cell"])
        for name in ("grid.png", "images/seed-000011.png"):  # same seeds, same pixels, in a separate process
            assert np.array_equal(
                np.asarray(Image.open(tmp_path / "sweeps" / "whole" / "cells" / cell / name)),
                np.asarray(Image.open(tmp_path / "sweeps" / "sharded" / "cells" / cell / name)),
            )


def test_merge_names_the_cells_still_missing(sweep_file):
    config = sweep_file("partial")
    assert cli("sweep", "--config", str(config), "--plan-only").returncode == 0
    assert (
        cli("sweep", "--config", str(config), "--shard", "0/2", env={"DDPM_CACHE": os.environ["DDPM_CACHE"]}).returncode
        == 0
    )
    r = cli("sweep", "--config", str(config), "--merge")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("ddpm sweep: error: 2 of 4 cells are not done yet") and "ddim-4steps-seed0" in error


def test_checkpoints_of_a_run_are_swept_as_models(tiny_run, sweep_file, tmp_path):
    run = copy_of_tiny_run(tiny_run, tmp_path / "ckpts")
    cfg = sweep_job.load(sweep_file("ckpts", models=[{"run": str(run), "newest": 2}], schedulers=["ddim"], steps=[2]))
    rows = json.loads(sweep_job.run(cfg)["json"].read_text())
    assert [(r["model"], r["checkpoint_step"]) for r in rows] == [("tiny/step-00000003", 3), ("tiny/step-00000006", 6)]
    # The last checkpoint's EMA weights are the exported pipeline's.
    from_ckpt = pipeline_from_checkpoint(tiny_run / "checkpoints" / "step-00000006").unet.state_dict()
    exported = DDPMPipeline.from_pretrained(tiny_run / "pipeline").unet.state_dict()
    assert all(torch.equal(from_ckpt[k], exported[k]) for k in exported)


def test_an_ema_length_axis_sweeps_post_hoc_reconstructions_and_resumes(tiny_run, sweep_file, tmp_path, caplog):
    """ema_lengths: the run's newest checkpoint, and its post-hoc EMA at each sigma_rel from the run's snapshots
    (exported once into the run); a rerun samples nothing again and exports nothing again."""
    run = copy_of_tiny_run(tiny_run, tmp_path / "ema")
    spec = dict(models=[{"run": str(run), "newest": 1}], schedulers=["ddim"], steps=[2], ema_lengths=[0.05, 0.15])
    cfg = sweep_job.load(sweep_file("ema", **spec))
    rows = json.loads(sweep_job.run(cfg)["json"].read_text())
    assert [(r["model"], r.get("ema_length"), r["checkpoint_step"]) for r in rows] == [
        ("tiny/step-00000006", None, 6),
        ("tiny/ema-step-00000006-sigma_rel-0.05", 0.05, 6),
        ("tiny/ema-step-00000006-sigma_rel-0.15", 0.15, 6),
    ]
    assert len({r["fd_digitsnet"] for r in rows}) == 3, "three different sets of weights"
    exports = sorted((run / "ema-reconstructions").iterdir())
    assert [p.name for p in exports] == ["step-00000006-sigma_rel-0.05", "step-00000006-sigma_rel-0.15"]
    assert "ema_length" in files_header(cfg)
    # the run's own scores keep the post-hoc ones apart: the model card's figures are the classic EMA's
    from ddpm.evaluation.scores import read_scores

    assert sorted(str(r.get("ema_length")) for r in read_scores(run)) == ["0.05", "0.15", "None"]
    stamps = {p: (p / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns for p in exports}
    caplog.set_level("INFO")
    sweep_job.run(sweep_job.load(sweep_file("ema", **spec)))
    assert "3 of 3 cells already done" in caplog.text
    assert {p: (p / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns for p in exports} == stamps
    r = cli("sweep", "--config", str(sweep_file("ema-bad", **{**spec, "ema_lengths": [0.3]})))
    assert r.returncode == 2 and "ema_lengths: 0.3 is not in (0, 0.289)" in r.stderr


def files_header(cfg) -> list[str]:
    return (cfg.sweep_dir / "results.csv").read_text().splitlines()[0].split(",")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"schedulers": ["ddim", "nope"]}, "schedulers: 'nope' is not one of"),
        ({"models": [{"pipeline": "a", "run": "b"}]}, "models[0]: give exactly one of pipeline, checkpoints, run"),
        (
            {"models": [{"pipeline": "/nonexistent/pipeline"}]},
            "models[0].pipeline: /nonexistent/pipeline is not a pipeline directory",
        ),
        ({"metric": "fid"}, "metric: 'fid' is not one of"),
        ({"stepz": [1]}, "unknown key 'stepz'"),
    ],
)
def test_bad_sweep_configs_fail_in_one_line(sweep_file, change, message):
    r = cli("sweep", "--config", str(sweep_file("bad", **change)))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert (
        r.stderr.strip().splitlines()[-1].startswith("ddpm sweep: error: ")
        and message in r.stderr.strip().splitlines()[-1]
    )


SWEEP_CONFIGS = Path(__file__).parents[1] / "configs" / "sweeps"


@pytest.mark.parametrize("name", sorted({"digits.yaml", *(p.name for p in SWEEP_CONFIGS.glob("*.yaml"))}))
def test_shipped_sweep_configs_load(name):
    """The sweep configs the README and Makefile point at exist and are valid."""
    path = SWEEP_CONFIGS / name
    cfg = load_sweep_config(path)
    assert cfg.name == path.stem and cfg.models


def test_text_to_image_sweep_over_prompts_and_guidance_from_the_hub_cache(tmp_path, monkeypatch):
    """A text-to-image pipeline named by Hub id, served from a pre-filled Hugging Face cache (offline), swept over
    prompts x guidance scales; a local unconditional pipeline in the same sweep gets no prompt cells."""
    from tests import tiny_pipelines

    # the cache layout huggingface_hub reads offline: models--<user>--<name>/{refs/main, snapshots/<commit>/...}
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-sd"
    commit = "0123456789abcdef0123456789abcdef01234567"
    tiny_pipelines.text_to_image(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    uncond = tiny_pipelines.unconditional(tmp_path / "uncond" / "pipeline")
    spec = {
        "name": "t2i",
        "out_dir": str(tmp_path / "sweeps"),
        "models": [{"hub": "someone/tiny-sd"}, {"pipeline": str(uncond)}],
        "schedulers": ["ddim"],
        "steps": [2],
        "seeds": [0],
        "prompts": ["a red square", "a blue circle"],
        "guidance_scales": [1.0, 7.5],
        "num_images": 2,
        "batch_size": 2,
        "grid_images": 2,
        "metric": "none",
        "device": "cpu",
        "precision": "auto",
        "tracking": {"wandb": False},
    }
    (tmp_path / "t2i.yaml").write_text(yaml.safe_dump(spec))
    # HF_HUB_CACHE=tmp_path/hf/hub HF_HUB_OFFLINE=1 (tests run offline): huggingface_hub reads the variable when it
    # is imported, so in this process the same setting is its constant
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    r = cli("sweep", "--config", str(tmp_path / "t2i.yaml"))
    assert r.returncode == 0, r.stderr
    cfg = load_sweep_config(tmp_path / "t2i.yaml")
    files = {k: cfg.sweep_dir / f for k, f in (("json", "results.json"), ("csv", "results.csv"), ("plot", "plot.png"))}
    rows = json.loads(files["json"].read_text())
    t2i = [r for r in rows if r["model"] == "someone--tiny-sd/0123456789ab"]
    assert [(r["prompt"], r["guidance"]) for r in t2i] == [
        (p, g) for p in ("a red square", "a blue circle") for g in (1.0, 7.5)
    ]
    auto = auto_precision(torch.device("cpu"))  # one meaning of "auto" for every job (ddpm.device)
    assert all(r["model_path"] == str(repo / "snapshots" / commit) and r["precision"] == auto for r in t2i)
    assert [r["cell"] for r in rows if r["model"] == "uncond/pipeline"] == ["uncond/pipeline/ddim-2steps-seed0"]
    images = {
        r["cell"]: np.asarray(Image.open(cfg.sweep_dir / "cells" / r["cell"] / "images" / "seed-000000.png"))
        for r in t2i
    }
    assert all(img.shape == (32, 32, 3) for img in images.values())
    assert len({img.tobytes() for img in images.values()}) == 4  # each prompt and guidance scale changes the image
    header = files["csv"].read_text().splitlines()[0].split(",")
    assert header[:8] == ["cell", "model", "checkpoint_step", "scheduler", "steps", "seed", "prompt", "guidance"]
    assert files["plot"].is_file()
    # a rerun skips every cell
    r = cli("sweep", "--config", str(tmp_path / "t2i.yaml"))
    assert r.returncode == 0 and "5 of 5 cells already done" in r.stderr


def test_a_text_to_image_model_without_prompts_is_refused(tmp_path):
    from tests import tiny_pipelines

    pipe = tiny_pipelines.text_to_image(tmp_path / "sd" / "pipeline")
    (tmp_path / "s.yaml").write_text(
        yaml.safe_dump({"models": [{"pipeline": str(pipe)}], "metric": "none", "out_dir": str(tmp_path)})
    )
    r = cli("sweep", "--config", str(tmp_path / "s.yaml"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "ddpm sweep: error: models: sd/pipeline is a text-to-image pipeline; give prompts: [...] in the sweep config"
    )
    (tmp_path / "s.yaml").write_text(
        yaml.safe_dump({"models": [{"pipeline": str(pipe)}], "prompts": ["x"], "out_dir": str(tmp_path)})
    )
    r = cli("sweep", "--config", str(tmp_path / "s.yaml"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "ddpm sweep: error: models: sd/pipeline has no training run to compare with; "
        "give reference: (digits, folder:PATH, "
        "hf:NAME[:SPLIT] or a config YAML), or metric: none"
    )
    assert not (tmp_path / "s" / "cells").exists()


def test_nightly_sweeps_score_only_new_checkpoints_and_plot_quality_across_nights(
    tiny_run, shared_cache, tmp_path, monkeypatch, caplog
):
    import datetime

    from ddpm.config import load_config
    from ddpm.training.loop import train
    from jobs.nightly import new_cells, sweep_config
    from tests.conftest import tiny_overrides

    monkeypatch.setenv("DDPM_CACHE", str(shared_cache / "ddpm"))
    run = copy_of_tiny_run(tiny_run, tmp_path)  # checkpoints at steps 3 and 6
    nightly = tmp_path / "nightly.yaml"
    nightly.write_text(
        yaml.safe_dump(
            {
                "runs": [str(run)],
                "newest": 2,
                "sweep": {"schedulers": ["ddim"], "steps": [2], "num_images": 8, "batch_size": 8, "metric": "digitsnet",
                          "device": "cpu", "precision": "fp32", "out_dir": str(tmp_path / "sweeps"),
                          "tracking": {"wandb": False}},
            }
        )
    )  # fmt: skip
    night = {d: sweep_config(nightly, today=datetime.date(2026, 11, d)) for d in (1, 2, 3)}

    assert len(new_cells(night[1])) == 2
    sweep_job.run(night[1])
    assert new_cells(night[2]) == []  # no new checkpoint: nothing to score
    r = cli("nightly", "submit", "--cluster", "local", "--runs", str(nightly))
    assert r.returncode == 0 and "nothing new to score (no new checkpoint)" in r.stdout, r.stdout + r.stderr

    train(load_config(None, tiny_overrides(run.parent, shared_cache, "train.max_steps=9")))  # a new checkpoint, 9
    [new] = new_cells(night[3])
    assert new.model == "tiny/step-00000009"
    caplog.set_level("INFO")
    files = sweep_job.run(night[3])
    assert "1 cells scored by an earlier sweep with the same weights and settings" in caplog.text
    rows = {r["checkpoint_step"]: r for r in json.loads(files["json"].read_text())}
    first = {r["checkpoint_step"]: r for r in json.loads((night[1].sweep_dir / "results.json").read_text())}
    assert rows[6]["fd_digitsnet"] == first[6]["fd_digitsnet"] and rows[6]["reused_from"]
    assert "reused_from" not in rows[9]
    steps = sorted({s["step"] for s in map(json.loads, (run / "scores.jsonl").read_text().splitlines())})
    assert steps == [3, 6, 9]  # every night's scores, kept in the run
    assert Image.open(files["history"]).size[0] >= 400  # quality against training step across the nights
