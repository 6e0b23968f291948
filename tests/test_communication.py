"""A collective that fails (NCCL's errors, gloo's on the CPU) comes back as one line per failing process naming the
rank, the host and the error, pointing at NCCL_DEBUG=INFO; the job exits non-zero and the newest checkpoint is intact.
DDP runs with its defaults (nothing measured without GPUs: docs/benchmarks.md)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from ddpm.models.checkpoint import latest_checkpoint, verify
from ddpm.training.communication import (
    CollectiveFailed,
    collective_failures,
    ddp_settings,
    describe,
    essence,
    is_collective_failure,
)
from tests.conftest import ROOT, cli, tiny_overrides
from tests.failing_collective import NCCL_SHM_ERROR

# Errors in the shape torch raises them (NCCL's result strings and "Last error:", the watchdog's timeout, gloo's lost
# peer), without the C++ stack torch appends; the shared-memory one is pytorch/torchtitan #853's.
NCCL_TIMEOUT = (
    "[Rank 3] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=1841, OpType=ALLREDUCE, NumelIn=6291456, "
    "NumelOut=6291456, Timeout(ms)=600000) ran for 600047 milliseconds before timing out."
)
NCCL_REMOTE = (
    "NCCL error in: ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:1970, remote process exited or there was a "
    "network error, NCCL version 2.21.5\nncclRemoteError: A call failed possibly due to a network error or a remote "
    "process exiting prematurely.\nLast error:\nNET/IB : Got completion from peer 10.1.2.3<58012> with status=12"
)
GLOO_PEER = "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500"


def test_an_nccl_error_becomes_its_first_line_and_ncclS_last_error():
    assert essence(NCCL_SHM_ERROR) == (
        "NCCL error: unhandled system error, NCCL version 2.21.5; last error: Error while creating shared memory "
        "segment /dev/shm/nccl-1YsMbG (size 7340384)"
    )
    assert essence(NCCL_REMOTE).startswith("NCCL error: remote process exited or there was a network error")
    assert essence(NCCL_REMOTE).endswith("last error: NET/IB : Got completion from peer 10.1.2.3<58012> with status=12")


@pytest.mark.parametrize(
    "error, collective",
    [
        (dist.DistBackendError(NCCL_SHM_ERROR), True),
        (dist.DistNetworkError("Connection reset by peer"), True),
        (dist.DistStoreError("Timed out after 1801 seconds waiting for clients. 7/8 clients joined."), True),
        (RuntimeError(NCCL_TIMEOUT), True),
        (RuntimeError(GLOO_PEER), True),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (ValueError("NCCL"), False),
    ],
)
def test_what_counts_as_a_failed_collective(error, collective):
    assert is_collective_failure(error) == collective


def test_the_line_names_rank_host_error_the_next_step_and_the_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step-00000200").mkdir(parents=True)
    (ckpt / "step-00000200" / "manifest.json").write_text("{}")
    (ckpt / "step-00000300").mkdir()  # no manifest: a write that did not finish, never named as the one to resume
    line = describe(dist.DistBackendError(NCCL_SHM_ERROR), 3, 8, "gpu-node-2", ckpt)
    assert "\n" not in line
    assert line.startswith("rank 3 of 8 on gpu-node-2: NCCL error: unhandled system error")
    assert "--shm-size=1g" in line and "NCCL_DEBUG=INFO" in line
    assert line.endswith("the newest checkpoint, step-00000200, is intact: rerun to resume from it")
    timeout = describe(RuntimeError(NCCL_TIMEOUT), 3, 8, "gpu-node-2", tmp_path / "none")
    assert (
        "a peer stopped answering" in timeout and "NCCL_DEBUG=INFO" in timeout and timeout.endswith("no checkpoint yet")
    )


def test_only_collective_failures_are_rewritten(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CollectiveFailed, match=rf"^rank 1 of 2 on {socket.gethostname()}: .*Connection closed by peer"):
        with collective_failures(tmp_path):
            raise RuntimeError(GLOO_PEER)
    with pytest.raises(KeyError):  # a bug keeps its traceback
        with collective_failures(tmp_path):
            raise KeyError("not a collective")


def test_ddp_keeps_its_defaults():
    """No setting changed without a measurement on several GPUs (ddp_settings' docstring; docs/benchmarks.md)."""
    from accelerate.utils import DistributedDataParallelKwargs

    assert ddp_settings().to_kwargs() == {} and ddp_settings() == DistributedDataParallelKwargs()


def test_a_failed_collective_ends_the_job_in_one_line_and_the_checkpoint_survives(tiny, tmp_path, monkeypatch):
    """In this process (the fast twin of the two-process test below): NCCL's error at the fifth step, after the
    checkpoint of step 3."""
    import torch.nn.functional as F

    from tests.failing_collective import failing

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(F, "mse_loss", failing(rank=0, step=4))
    r = cli("train", *tiny())
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ddpm train: error: rank 0 of 1 on {socket.gethostname()}: NCCL error: unhandled system")
    assert "NCCL_DEBUG=INFO" in last and last.endswith("step-00000003, is intact: rerun to resume from it")
    ckpt = tmp_path / "runs" / "tiny" / "checkpoints"
    assert verify(ckpt / "step-00000003") is None and latest_checkpoint(ckpt).step == 3
    assert not (tmp_path / "runs" / "tiny" / "pipeline").exists()


@pytest.mark.slow  # two processes spawned and importing torch: 30 s to minutes on a loaded 2-core machine
def test_a_failed_collective_in_one_of_two_processes_is_one_line_and_the_checkpoint_survives(tmp_path):
    """Process 1 meets NCCL's shared-memory error at its fifth step, after the checkpoint of step 3; process 0, a real
    gloo peer, loses it. The job ends in one line naming the rank and host, exits non-zero, and step 3 verifies."""
    args = tiny_overrides(tmp_path / "runs", tmp_path / "cache")
    start = time.monotonic()
    r = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "failing_collective.py"), "train", "--processes", "2", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "FAIL_RANK": "1", "FAIL_STEP": "4"},
    )
    elapsed = time.monotonic() - start
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"ddpm train: error: process 1 of 2 failed (exit code 1): rank 1 of 2 on {socket.gethostname()}: "
        "NCCL error: unhandled system error, NCCL version 2.21.5; last error: Error while creating shared memory"
    ), last
    assert "NCCL_DEBUG=INFO" in last and last.endswith(
        "the newest checkpoint, step-00000003, is intact: rerun to resume from it"
    )
    assert "Traceback" not in r.stderr and "C++ CapturedTraceback" not in r.stderr
    ckpt = Path(tmp_path / "runs" / "tiny" / "checkpoints")
    assert verify(ckpt / "step-00000003") is None and latest_checkpoint(ckpt).step == 3
    assert elapsed < 240  # the launcher ended process 0, not the process group's 60-minute time-out


@pytest.mark.parametrize("on_cpu", [False, True])
def test_a_process_that_nccl_aborted_is_named_with_where_to_look(on_cpu):
    """NCCL's watchdog ends a process whose collective timed out with SIGABRT: no Python error to read, so the
    launcher's line says what it usually is (on GPUs only: gloo has no watchdog)."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from ddpm.training.local_launch import _failure_line

    failure = ProcessFailure.__new__(ProcessFailure)
    failure.exitcode, failure.message = -6, "Signal 6 (SIGABRT) received by PID 4242"
    line = _failure_line(3, failure, 8, on_cpu)
    assert line.startswith("process 3 of 8 failed (exit code -6): Signal 6 (SIGABRT) received by PID 4242")
    assert ("NCCL_DEBUG=INFO" in line) != on_cpu
