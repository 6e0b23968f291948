"""Checkpoints are complete or absent; a corrupted one is detected and skipped; the run lock."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch

from ddpm.errors import UserError
from ddpm.models.checkpoint import latest_checkpoint, save_checkpoint, verify
from ddpm.training.lock import RunLock


def write(ckpt_dir, step, keep=5):
    return save_checkpoint(
        ckpt_dir,
        step,
        tensors={"unet": {"w": torch.full((64,), float(step))}},
        torch_states={"optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}},
        rank_states={"rng": {"generator": torch.Generator().manual_seed(step).get_state()}},
        state={"step": step},
        keep=keep,
    )


def test_save_writes_every_file_with_a_manifest_and_no_temporary_left(tmp_path):
    path = write(tmp_path, 7)
    assert path.name == "step-00000007"
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "optimizer.pt",
        "rng-rank0.pt",
        "state.json",
        "unet.safetensors",
    ]
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"optimizer.pt", "rng-rank0.pt", "state.json", "unet.safetensors"}
    assert verify(path) is None
    assert not list(tmp_path.glob(".tmp-*"))
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.step == 7 and torch.equal(ckpt.tensors("unet")["w"], torch.full((64,), 7.0))
    assert ckpt.torch_state("optimizer")["param_groups"][0]["lr"] == 0.1


def test_keeps_only_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        write(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003", "step-00000004"]


@pytest.mark.parametrize(
    "damage, reason",
    [
        (
            lambda p: (p / "unet.safetensors").write_bytes((p / "unet.safetensors").read_bytes()[:100]),
            "unet.safetensors has 100 bytes",
        ),
        (lambda p: (p / "unet.safetensors").write_bytes(b"\0" * (p / "unet.safetensors").stat().st_size), "SHA-256"),
        (lambda p: (p / "optimizer.pt").unlink(), "missing file optimizer.pt"),
        (lambda p: (p / "manifest.json").write_text("{garbage"), "unreadable manifest"),
        (lambda p: (p / "manifest.json").unlink(), "no manifest"),
    ],
    ids=["truncated", "bit-rot", "missing-file", "garbage-manifest", "no-manifest"],
)
def test_a_damaged_checkpoint_is_skipped_with_a_warning_naming_it(tmp_path, caplog, damage, reason):
    write(tmp_path, 1)
    bad = write(tmp_path, 2)
    damage(bad)
    with caplog.at_level(logging.WARNING):
        ckpt = latest_checkpoint(tmp_path)
    assert ckpt.step == 1
    assert "step-00000002" in caplog.text and reason in caplog.text


def test_a_half_written_temporary_is_never_taken_for_a_checkpoint(tmp_path):
    write(tmp_path, 1)
    (tmp_path / ".tmp-step-00000002").mkdir()
    (tmp_path / ".tmp-step-00000002" / "unet.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path).step == 1
    write(tmp_path, 2)  # a later save of that step replaces the leftover
    assert latest_checkpoint(tmp_path).step == 2


def test_no_checkpoint_at_all(tmp_path):
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_lock_refuses_a_live_holder_and_names_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "lock.json").write_text(
            json.dumps({"host": socket.gethostname(), "pid": holder.pid, "started": "t0"})
        )
        with pytest.raises(UserError, match=f"in use by pid {holder.pid} on {socket.gethostname()} since t0"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(tmp_path)
    lock.acquire()  # the holder died: stale, taken over
    assert json.loads((tmp_path / "lock.json").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "lock.json").exists()


def test_lock_from_another_host_is_stale_only_when_not_refreshed(tmp_path):
    (tmp_path / "lock.json").write_text(json.dumps({"host": "node-that-is-elsewhere", "pid": 1, "started": "t0"}))
    with pytest.raises(UserError, match="node-that-is-elsewhere"):
        RunLock(tmp_path, stale_after=60).acquire()
    old = os.stat(tmp_path / "lock.json").st_mtime - 120
    os.utime(tmp_path / "lock.json", (old, old))
    RunLock(tmp_path, stale_after=60).acquire()


def test_lock_of_an_earlier_attempt_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch):
    (tmp_path / "lock.json").write_text(
        json.dumps({"host": "node-a", "pid": 1, "slurm_job_id": "4242", "started": "t0"})
    )
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    RunLock(tmp_path).acquire()


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """A corrupt newer checkpoint (say step 10) must not push out the one just saved at a lower step."""
    write(tmp_path, 10)
    (tmp_path / "step-00000010" / "manifest.json").write_text("{garbage")
    write(tmp_path, 5)
    write(tmp_path, 7, keep=1)
    assert (tmp_path / "step-00000007").is_dir() and not (tmp_path / "step-00000005").exists()
    assert latest_checkpoint(tmp_path).step == 7
