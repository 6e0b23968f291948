"""/dev/shm for NCCL: `ddpm doctor` shows it, and a launch of several GPU processes on a node whose /dev/shm is too
small is refused in one line naming the fix before any process starts (the local launcher and a SLURM task alike); the
escape hatches let it through. Sizes come from a tmpfs mounted small in a mount namespace where the machine allows
it, else from the check's input patched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from ddpm import environment
from ddpm.environment import require_shm, shm_check, shm_needed
from ddpm.errors import UserError
from tests.conftest import ROOT, cli

MiB, GiB = 2**20, 2**30
DOCKER_DEFAULT = (64 * MiB, 64 * MiB)  # what a container gets without --shm-size


def small_shm(monkeypatch, size: tuple[int, int] | None = DOCKER_DEFAULT) -> None:
    monkeypatch.setattr(environment, "shm_bytes", lambda path="/dev/shm": size)
    monkeypatch.delenv("NCCL_SHM_DISABLE", raising=False)
    monkeypatch.delenv("NCCL_BUFFSIZE", raising=False)


def test_the_need_is_the_arithmetic_of_ncclS_segments(monkeypatch):
    """9,637,888 bytes per segment (the size in NCCL's own errors), 2 channels per process."""
    monkeypatch.delenv("NCCL_BUFFSIZE", raising=False)
    assert shm_needed(1) == 2 * 9_637_888
    assert shm_needed(8) == 8 * 2 * 9_637_888  # 147 MiB: far over Docker's 64 MB
    monkeypatch.setenv("NCCL_BUFFSIZE", str(16 * MiB))  # a larger Simple buffer makes every segment larger
    assert shm_needed(8) == 8 * 2 * (16 * MiB + 4_915_200 + 524_288 + 4096)


@pytest.mark.parametrize(
    "size, processes, status",
    [
        (DOCKER_DEFAULT, 8, "fail"),  # the README's `docker run --gpus all` on an 8-GPU workstation, before the fix
        (DOCKER_DEFAULT, 4, "fail"),  # 74 MiB: NVIDIA/nccl #1518 failed here
        (DOCKER_DEFAULT, 2, "ok"),  # 37 MiB: #1518 started
        (DOCKER_DEFAULT, 1, "ok"),  # one process has no NCCL peer on its node
        ((GiB, GiB), 8, "ok"),  # --shm-size=1g
        ((GiB, 100 * MiB), 8, "fail"),  # what is free counts: segments left behind by crashed runs take room
        (None, 8, "warn"),  # no /dev/shm at all
    ],
)
def test_the_check_fails_below_what_the_processes_need(monkeypatch, size, processes, status):
    small_shm(monkeypatch, size)
    check = shm_check(processes)
    assert check.status == status, check.line()
    if status == "fail":
        assert "--shm-size=1g" in check.verdict and "--ipc=host" in check.verdict
        assert "NCCL_SHM_DISABLE=1" in check.verdict


def test_nccl_shm_disable_lets_it_through(monkeypatch):
    small_shm(monkeypatch)
    monkeypatch.setenv("NCCL_SHM_DISABLE", "1")
    assert shm_check(8).status == "ok"
    require_shm(8)


def test_the_refusal_is_one_line_naming_the_flags_and_the_escape_hatches(monkeypatch):
    small_shm(monkeypatch)
    with pytest.raises(UserError) as e:
        require_shm(8)
    line = str(e.value)
    assert "\n" not in line
    assert line.startswith(f"/dev/shm on {os.uname().nodename} has 64 MiB free, NCCL needs about 147 MiB for 8 GPU")
    for fix in ("--shm-size=1g", "--ipc=host", "NCCL_SHM_DISABLE=1", "shm_check=false"):
        assert fix in line


def _mount_namespaces() -> str:
    """Why a small tmpfs cannot be mounted on /dev/shm in a private mount namespace here ("" when it can)."""
    if not shutil.which("unshare"):
        return "no unshare(1)"
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"], capture_output=True, text=True
    )
    return "" if r.returncode == 0 else f"mount namespaces not permitted here: {r.stderr.strip()}"


NAMESPACES = _mount_namespaces()


def in_namespace(size: str, *command: str) -> subprocess.CompletedProcess:
    """`command` with a fresh tmpfs of `size` on /dev/shm, in a mount namespace of its own (the host's is untouched)."""
    script = f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$@"'
    env = {k: v for k, v in os.environ.items() if k not in ("NCCL_SHM_DISABLE", "NCCL_BUFFSIZE", "WORLD_SIZE")}
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.skipif(bool(NAMESPACES), reason=NAMESPACES)
@pytest.mark.parametrize("size, refused", [("16m", True), ("1g", False)])
def test_a_real_small_tmpfs_is_measured_and_refused(size, refused):
    probe = "from ddpm.environment import require_shm, shm_bytes; print(shm_bytes()); require_shm(2)"
    r = in_namespace(size, sys.executable, "-c", probe)
    total = {"16m": 16 * MiB, "1g": GiB}[size]
    assert f"({total}, " in r.stdout, r.stdout + r.stderr
    assert (r.returncode != 0) == refused, r.stderr
    if refused:
        assert "UserError: /dev/shm on" in r.stderr and "16 MiB free" in r.stderr and "--shm-size=1g" in r.stderr


@pytest.mark.slow  # a child that imports torch: the line itself is tested in-process below
@pytest.mark.skipif(bool(NAMESPACES), reason=NAMESPACES)
def test_doctor_in_a_container_with_16_mib_fails_that_line_naming_the_fix():
    """`--expect-gpus 2` says two GPU processes will run here (on this machine without GPUs the GPUs line fails too)."""
    r = in_namespace("16m", sys.executable, "-m", "jobs.cli", "doctor", "--expect-gpus", "2")
    assert r.returncode == 2
    line = next(x for x in r.stdout.splitlines() if "/dev/shm" in x)
    assert line.startswith("fail  /dev/shm     16 MiB (16 MiB free); 2 GPU processes on this node"), line
    assert "--shm-size=1g" in line and "--ipc=host" in line
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ddpm doctor: error: ") and "/dev/shm: NCCL needs about 37 MiB" in last


def test_doctor_reports_the_size_of_dev_shm(monkeypatch):
    small_shm(monkeypatch, (GiB, GiB - 3 * MiB))
    r = cli("doctor")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if "/dev/shm" in x)
    assert line.startswith("ok    /dev/shm     1.0 GiB (1021 MiB free); ")


def test_doctor_fails_the_line_when_several_gpu_processes_will_run(monkeypatch):
    small_shm(monkeypatch)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")  # a GPU profile's node: one task per GPU
    r = cli("doctor")
    assert r.returncode == 2
    assert "fail  /dev/shm     64 MiB (64 MiB free); 8 GPU processes on this node" in r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last == (
        "ddpm doctor: error: 1 check(s) failed: /dev/shm: NCCL needs about 147 MiB: give the container more shared "
        "memory: docker run --shm-size=1g (or --ipc=host), or NCCL_SHM_DISABLE=1"
    )


@pytest.fixture
def two_gpus(monkeypatch):
    """This machine as one with two GPUs, as far as the launch decides; the launch itself is a stand-in that records
    whether it was reached (nothing reaches a GPU)."""
    import ddpm.training.local_launch as local_launch

    started = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(local_launch, "launch", lambda fn, arg, nproc, on_cpu: started.append(nproc))
    return started


def test_train_on_two_gpus_is_refused_before_any_process_starts(monkeypatch, two_gpus, tiny, tmp_path):
    small_shm(monkeypatch, (32 * MiB, 32 * MiB))
    r = cli("train", "--gpus", "2", *tiny())
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ddpm train: error: /dev/shm on ") and "--shm-size=1g" in last, r.stderr
    assert two_gpus == [] and "starting 2 training processes" not in r.stdout
    assert not (tmp_path / "runs").exists()  # nothing written either


@pytest.mark.parametrize("escape", [["shm_check=false"], ["--no-shm-check"], "NCCL_SHM_DISABLE"])
def test_the_escape_hatches_start_the_processes(monkeypatch, two_gpus, tiny, escape):
    small_shm(monkeypatch, (32 * MiB, 32 * MiB))
    if escape == "NCCL_SHM_DISABLE":
        monkeypatch.setenv("NCCL_SHM_DISABLE", "1")
        escape = []
    r = cli("train", "--gpus", "2", *tiny(), *escape)
    assert r.returncode == 0, r.stderr
    assert two_gpus == [2]


def test_a_slurm_task_with_eight_gpus_per_node_is_refused_before_any_work(monkeypatch, tmp_path):
    """A GPU profile's task (one per GPU) sees LOCAL_WORLD_SIZE=8 from submitit; the check runs in the job's run(cfg),
    before the process group or the data are touched."""
    import ddpm.environment
    from jobs import train
    from slurm.entry import TrainTask

    small_shm(monkeypatch)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # what the task exports stays in this test
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    os.environ.update(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="7", SLURM_NTASKS="8", SLURM_PROCID="3",
                      SLURM_LOCALID="3", SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0",
                      SLURM_JOB_NODELIST="gpu-node-1")  # fmt: skip
    monkeypatch.setattr(ddpm.environment, "require_gpus", lambda n: None)  # as on a node with its 8 GPUs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = train.load(None, [f"runs_dir={tmp_path / 'runs'}"])
    with pytest.raises(UserError, match=r"^/dev/shm on .* NCCL needs about 147 MiB for 8 GPU processes: .*--ipc=host"):
        TrainTask(train.run, cfg, max_requeues=1, dist_timeout_min=1, gpus_per_task=8)()
    assert os.environ["LOCAL_WORLD_SIZE"] == "8"
    assert not (tmp_path / "runs").exists()
