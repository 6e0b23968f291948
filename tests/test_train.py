"""Training: outputs of a run, exact resume, the data position, W&B offline files, and user errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline
from safetensors.torch import load_file

from ddpm.config import load_config
from ddpm.data.cache import ImageCache
from ddpm.errors import UserError
from ddpm.training.loop import lr_factor, train
from tests import wandb_files
from tests.conftest import ROOT, cli


def run_tiny(overrides: list[str]):
    cfg = load_config(None, overrides)
    return cfg, train(cfg)


def final_weights(run_dir: Path, step: int) -> tuple[dict, dict]:
    ckpt = run_dir / "checkpoints" / f"step-{step:08d}"
    return load_file(ckpt / "unet.safetensors"), load_file(ckpt / "ema.safetensors")


def test_a_run_leaves_config_metrics_checkpoints_pipeline_and_grid(tiny):
    cfg, pipeline = run_tiny(tiny())
    run = cfg.run_dir
    assert pipeline == run / "pipeline"
    assert (run / "config.yaml").is_file() and load_config(run / "config.yaml") == cfg
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert all({"loss", "lr", "grad_norm", "images_per_sec", "epoch"} <= r.keys() for r in rows)
    assert all(r["loss"] > 0 for r in rows)
    # keep_checkpoints=2 of the checkpoints at steps 3 and 6
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    assert (run / "samples" / "step-00000006.png").is_file()
    assert not (run / "lock.json").exists(), "the lock is released at the end"


def test_export_holds_ema_weights_and_loads_with_plain_diffusers(tiny):
    cfg, pipeline = run_tiny(tiny())
    raw, ema = final_weights(cfg.run_dir, 6)
    assert sorted(p.name for p in pipeline.iterdir()) == ["model_index.json", "scheduler", "unet"]
    assert (pipeline / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = DDPMPipeline.from_pretrained(pipeline)
    exported = pipe.unet.state_dict()
    assert all(torch.equal(exported[k], ema[k]) for k in ema), "the export carries the EMA weights"
    assert any(not torch.equal(exported[k], raw[k]) for k in raw), "EMA differs from the raw weights"
    out = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert pipe.unet.config.in_channels == 1 and out.shape == (2, 8, 8, 1)  # the digits train a grey model
    pil = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert pil.mode == "L"  # plain DDPMPipeline gives grey images


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["train.grad_accum=2", "data.random_flip=true"],
        ["optim.loss_weighting=min_snr", "optim.ema_profiles=[0.03,0.2]"],
    ],
    ids=["plain", "accum-flip", "min-snr-profiles"],
)
def test_resume_ends_with_the_same_weights_as_a_straight_run(tiny, extra):
    straight, _ = run_tiny(tiny(*extra, name="straight"))
    cfg, first = run_tiny(tiny(*extra, "train.stop_after=3", name="resumed"))
    assert first is None and not (cfg.run_dir / "pipeline").exists()
    _, second = run_tiny(tiny(*extra, name="resumed"))
    assert second == cfg.run_dir / "pipeline"
    profiles = [
        load_file(r / "checkpoints" / "step-00000006" / "phema.safetensors") for r in (straight.run_dir, cfg.run_dir)
    ]
    for a, b in zip(
        final_weights(straight.run_dir, 6) + (profiles[0],), final_weights(cfg.run_dir, 6) + (profiles[1],)
    ):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((cfg.run_dir / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["phema_t"] == 6
    accum = 2 if "train.grad_accum=2" in extra else 1
    assert (state["step"], state["ema_step"], state["batch"]) == (6, 6, 6 * accum)


def test_resume_jumps_to_the_data_position_without_rereading(tiny, monkeypatch):
    run_tiny(tiny("train.stop_after=4", name="jump"))
    reads = []
    original = ImageCache.take
    monkeypatch.setattr(ImageCache, "take", lambda self, idx: reads.append(idx) or original(self, idx))
    run_tiny(tiny(name="jump"))
    # 2 remaining steps read 2 batches (plus at most one prefetched), never the 4 already trained on
    assert 2 <= len(reads) <= 3


def test_lr_schedule_counts_optimizer_steps():
    assert [round(lr_factor(s, 2, 6, "cosine"), 6) for s in range(6)] == [0.5, 1.0, 1.0, 0.853553, 0.5, 0.146447]
    assert lr_factor(5, 0, 6, "constant") == 1.0


def test_logged_lr_follows_the_schedule_under_accumulation(tiny):
    cfg, _ = run_tiny(tiny("train.grad_accum=3", "train.log_every=1"))
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert r["lr"] == pytest.approx(cfg.optim.lr * lr_factor(r["step"] - 1, 2, 6, "cosine"))


def test_two_processes_count_steps_lr_and_ema_once(tiny, tmp_path):
    """torchrun with 2 CPU processes (gloo): the step count, the LR schedule and the EMA are per optimizer
    step, not per process or micro-step; only rank 0 exports."""
    overrides = tiny("train.grad_accum=2", "train.log_every=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "jobs.cli",
            "train",
            *overrides,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = load_config(None, overrides)
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert r["lr"] == pytest.approx(cfg.optim.lr * lr_factor(r["step"] - 1, 2, 6, "cosine"))
    state = json.loads((cfg.run_dir / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert (state["world_size"], state["ema_step"], state["batch"]) == (2, 6, 12)
    assert sorted(p.name for p in (cfg.run_dir / "checkpoints" / "step-00000006").glob("rng-rank*.pt")) == [
        "rng-rank0.pt",
        "rng-rank1.pt",
    ]
    _, ema = final_weights(cfg.run_dir, 6)
    exported = DDPMPipeline.from_pretrained(cfg.run_dir / "pipeline").unet.state_dict()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert proc.stdout.count("pipeline: ") == 2 and len(list(cfg.run_dir.glob(".tmp-*"))) == 0


def test_wandb_offline_run_keeps_config_history_and_images_and_resumes_the_same_run(tiny):
    cfg, _ = run_tiny(tiny("tracking.wandb=true", "train.stop_after=4", "train.sample_every=2", name="tracked"))
    run_id = (cfg.run_dir / "wandb_run_id").read_text()
    files = list((cfg.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and wandb_files.run_id(files[0]) == run_id
    config = wandb_files.run_config(files[0])
    assert (
        config["seed"] == 0
        and config["train"]["batch_size"] == 16
        and config["model"]["block_out_channels"] == [16, 32]
    )
    assert config["run"]["world_size"] == 1 and "git_sha" in config["run"]
    history = wandb_files.history(files[0])
    assert [h["_step"] for h in history if "loss" in h] == [2, 4]
    assert any(h.get("samples/_type") == "image-file" for h in history), "sample grids are logged as images"
    assert list((cfg.run_dir / "wandb").glob("offline-run-*/files/media/images/samples_*.png"))

    # W&B names offline directories by the second and the run id: a launch within the same second would write its
    # run file over the first one's. A real resume is never that quick; wait past the second.
    time.sleep(1.1)
    run_tiny(tiny("tracking.wandb=true", "train.sample_every=2", name="tracked"))
    files = sorted((cfg.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert {wandb_files.run_id(f) for f in files} == {run_id}, "the resumed launch continues the same W&B run"
    assert 6 in [h["_step"] for f in files for h in wandb_files.history(f) if "loss" in h]


def test_metrics_after_the_checkpoint_are_rewritten_on_resume(tiny):
    cfg, _ = run_tiny(tiny("train.stop_after=4", "train.checkpoint_every=2", "train.log_every=1", name="rewind"))
    # Simulate a crash after step 4's checkpoint: drop it, so the newest is step 2 while metrics say 4.
    import shutil

    shutil.rmtree(cfg.run_dir / "checkpoints" / "step-00000004")
    run_tiny(tiny("train.checkpoint_every=2", "train.log_every=1", name="rewind"))
    steps = [json.loads(line)["step"] for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6], "no duplicated or forked history"


def test_resume_with_a_different_model_config_is_refused(tiny):
    run_tiny(tiny("train.stop_after=3", name="arch"))
    with pytest.raises(UserError, match="different model config.*layers_per_block: 1 != 2"):
        run_tiny(tiny("model.layers_per_block=2", name="arch"))


def test_a_run_directory_held_by_a_live_process_is_refused(tiny):
    cfg = load_config(None, tiny(name="held"))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cfg.run_dir.mkdir(parents=True)
        (cfg.run_dir / "lock.json").write_text(
            json.dumps({"host": socket.gethostname(), "pid": holder.pid, "started": "earlier"})
        )
        proc = cli("train", *tiny(name="held"))  # this process; the lock's holder is another live one
        assert proc.returncode == 2
        error_lines = [line for line in proc.stderr.splitlines() if "error" in line]
        assert len(error_lines) == 1 and f"pid {holder.pid} on {socket.gethostname()}" in error_lines[0]
        assert "Traceback" not in proc.stderr
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone now: the lock is stale and the next launch takes it over.
    _, pipeline = run_tiny(tiny(name="held"))
    assert pipeline.is_dir()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_writes_a_checkpoint_and_exits_with_3(tiny, sig):
    """A real signal to a real training process: it checkpoints at the next log step and exits with 3. A first
    Ctrl-C of a single-process run does the same (it lost every step since the last checkpoint before)."""
    overrides = tiny("train.max_steps=2000", "train.log_every=1", "train.checkpoint_every=1000", name=sig.name)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "train", *overrides],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    cfg = load_config(None, overrides)
    metrics = cfg.run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out[-2000:]
    assert f"on request ({sig.name})" in out and ("Ctrl-C again stops now" in out) == (sig == signal.SIGINT)
    saved = sorted((cfg.run_dir / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and 3 <= int(saved[0].name[5:]) < 2000
    assert not (cfg.run_dir / "lock.json").exists()


@pytest.mark.parametrize(
    "extra",
    [["train.mixed_precision=bf16"], ["schedule.prediction_type=v_prediction"], ["train.gradient_checkpointing=true"]],
    ids=["bf16", "v-prediction", "grad-checkpointing"],
)
def test_training_options_run_and_export(tiny, extra):
    cfg, pipeline = run_tiny(tiny(*extra, "train.log_every=1"))
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(0 < r["loss"] < 10 for r in rows)
    pipe = DDPMPipeline.from_pretrained(pipeline)
    assert pipe.scheduler.config.prediction_type == cfg.schedule.prediction_type


def test_v_prediction_target_is_the_velocity():
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022), so x0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
    from ddpm.config import ScheduleConfig
    from ddpm.models.schedule import NoiseProcess, build_scheduler

    process = NoiseProcess(build_scheduler(ScheduleConfig(prediction_type="v_prediction")), torch.device("cpu"))
    x0, eps, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0, 100, 500, 999])
    xt, v = process.add_noise(x0, eps, t), process.target(x0, eps, t)
    a, s = process.sqrt_abar[t].view(-1, 1, 1, 1), process.sqrt_one_minus_abar[t].view(-1, 1, 1, 1)
    assert torch.allclose(a * xt - s * v, x0, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_formula_on_the_trained_schedule(prediction_type):
    """Hang et al. 2023: min(SNR, 5) / SNR on the noise, min(SNR, 5) / (SNR + 1) on v, with SNR from diffusers'
    own compute_snr on the same schedule; the loss weights each image's error by its timestep's weight."""
    from diffusers.training_utils import compute_snr

    from ddpm.config import ScheduleConfig
    from ddpm.models.schedule import NoiseProcess, build_scheduler

    scheduler = build_scheduler(ScheduleConfig(prediction_type=prediction_type))
    process = NoiseProcess(scheduler, torch.device("cpu"), "min_snr", 5.0)
    t = torch.arange(1000)
    snr = compute_snr(scheduler, t).double()
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr if prediction_type == "epsilon" else snr + 1)
    expected = torch.nan_to_num(expected, nan=1.0)  # 0/0 where the cosine schedule's SNR underflows: weight 1
    assert torch.allclose(process.loss_weights.double(), expected, rtol=1e-5, atol=1e-7)
    assert process.loss_weights.isfinite().all() and process.loss_weights.max() <= 1.0
    # high-noise steps (SNR < 5) keep weight 1 (epsilon); low-noise steps are weighted down
    assert (process.loss_weights[-100:] == 1.0).all() if prediction_type == "epsilon" else True
    assert process.loss_weights[0] < 0.01

    x0, eps, ts = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    pred = torch.randn(4, 1, 8, 8)
    per_image = (pred - process.target(x0, eps, ts)).square().mean(dim=(1, 2, 3))
    assert torch.allclose(process.loss(pred, x0, eps, ts), (per_image * process.loss_weights[ts]).mean())
    plain = NoiseProcess(scheduler, torch.device("cpu"))
    assert torch.equal(plain.loss(pred, x0, eps, ts), F.mse_loss(pred, plain.target(x0, eps, ts)))


def test_resume_survives_a_half_written_metrics_line(tiny):
    cfg, _ = run_tiny(tiny("train.stop_after=3", name="halfline"))
    with open(cfg.run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.')  # the process was killed mid-write
    _, pipeline = run_tiny(tiny(name="halfline"))
    steps = [json.loads(line)["step"] for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert pipeline.is_dir() and steps == [2, 4, 6]
