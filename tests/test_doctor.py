"""`ddpm doctor`: one line per check with a verdict; an expectation that fails is a one-line error; no secret shown."""

from __future__ import annotations

import pytest
import torch

from ddpm.environment import driver_verdict
from tests.conftest import cli, run_cli


@pytest.mark.parametrize(
    "driver, cuda, status, fragment",
    [
        (
            "550.54.15",
            "13.0",
            "fail",
            "driver 550 is too old for this CUDA 13.0 build (needs 580+): install a torch built for CUDA 12",
        ),
        ("580.65.06", "13.0", "ok", "runs CUDA 13.0"),
        ("535.183.01", "12.8", "ok", "runs CUDA 12.8"),
        ("470.256.02", "12.8", "fail", "update the driver"),
        ("", "13.0", "warn", "no NVIDIA driver"),
        ("550.54.15", None, "warn", "this torch build has no CUDA"),
    ],
)
def test_the_driver_verdict_names_the_fix(driver, cuda, status, fragment):
    check = driver_verdict(driver, cuda)
    assert check.status == status and fragment in check.verdict


def test_doctor_prints_every_check_and_never_the_token(tmp_path):
    secret = "hf_" + "Zx9" * 12
    # a child process: huggingface_hub reads HF_HOME when it is imported
    r = run_cli("doctor", env={"HF_TOKEN": secret, "HF_HOME": str(tmp_path / "hf"), "WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr
    names = [line.split()[1] for line in r.stdout.splitlines()]
    assert names == [
        "torch",
        "driver",
        "GPUs",
        *(["NCCL"] if torch.cuda.is_available() else []),
        "precision",
        "SLURM",
        "distributed",
        "/dev/shm",
        "container",
        "W&B",
        "HF",
    ]
    assert "a token is set" in r.stdout and secret not in r.stdout + r.stderr
    assert f"(CUDA build {torch.version.cuda or 'none'})" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure on a machine without GPUs")
def test_expected_gpus_that_are_missing_fail_in_one_line():
    r = cli("doctor", "--expect-gpus", "2")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("ddpm doctor: error: 1 check(s) failed: GPUs: 2 GPU(s) asked")
    assert "fail  GPUs" in r.stdout


def test_a_negative_gpu_count_is_refused_before_any_check():
    r = cli("doctor", "--expect-gpus", "-1")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["ddpm doctor: error: --expect-gpus must be non-negative, got -1"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure on a machine without GPUs")
def test_a_gpu_training_task_without_usable_gpus_fails_before_any_work(tmp_path):
    """A GPU profile's training task refuses to fall back to the CPU: one line, before the process group or the
    data are touched (nothing is written)."""
    from ddpm.config import load_config
    from ddpm.environment import require_gpus
    from ddpm.errors import UserError
    from jobs import train
    from slurm.entry import TrainTask

    require_gpus(0)  # a CPU profile asks for none
    cfg = load_config(None, [f"runs_dir={tmp_path / 'runs'}"])
    with pytest.raises(UserError, match=r"^8 GPU\(s\) asked for, 0 usable on .*: .*ddpm doctor"):
        TrainTask(train.run, cfg, max_requeues=1, dist_timeout_min=1, gpus_per_task=8)()
    assert not (tmp_path / "runs").exists()
