"""`ddpm train --gpus N|all` and `--processes N`: one process per GPU (or CPU processes on gloo) started by torch's
launcher on this machine; a failing process ends the others and comes back as one line."""

from __future__ import annotations

import json
import time

import pytest
import torch

from ddpm.errors import UserError
from ddpm.training.local_launch import processes_to_start
from tests.conftest import run_cli, tiny_overrides


def test_auto_is_one_process_per_visible_gpu_and_one_without(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert processes_to_start("auto", 0) == (max(1, torch.cuda.device_count()), False)
    assert processes_to_start("auto", 3) == (3, True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPUs")
@pytest.mark.parametrize("gpus", ["all", "2"])
def test_gpus_without_a_gpu_is_refused_in_one_line(monkeypatch, gpus):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UserError, match=rf"--gpus {gpus}: no CUDA GPU is visible here .*--processes N"):
        processes_to_start(gpus, 0)


@pytest.mark.parametrize(
    "gpus, processes, env, message",
    [
        ("two", 0, {}, "--gpus must be 'auto', 'all' or a count, got 'two'"),
        ("0", 0, {}, "positive count"),
        ("2", 2, {}, "not both"),
        ("auto", -1, {}, "--processes must be a positive count"),
        ("2", 0, {"WORLD_SIZE": "8"}, "started this one already"),
    ],
)
def test_bad_launch_options_are_refused(monkeypatch, gpus, processes, env, message):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match=message):
        processes_to_start(gpus, processes)


def test_under_slurm_or_torchrun_auto_starts_nothing_more(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert processes_to_start("auto", 0) == (1, False)


def test_two_cpu_processes_train_one_run_together(tmp_path):
    result = run_cli("train", "--processes", "2", *tiny_overrides(tmp_path / "runs", tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting 2 training processes on the CPU" in result.stdout
    assert "rank 0 of 2" in result.stdout and "rank 1 of 2" in result.stdout
    run = tmp_path / "runs" / "tiny"
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    # the two processes split each epoch: 1,797 digits // (16 per process x 2) = 56 steps per epoch, not 112
    assert last["step"] == 6 and last["epoch"] == pytest.approx(6 / (1797 // 32))
    assert (run / "pipeline" / "model_index.json").is_file()
    assert "gpus" not in (run / "config.yaml").read_text()  # launch options are not part of the run


def test_an_error_on_one_process_ends_all_of_them_in_one_line(tmp_path):
    """A bad image seen by process 0 while it builds the data cache (the others wait for it in a barrier)."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        Image.new("RGB", (12, 12), (i * 30, 0, 0)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    args = tiny_overrides(tmp_path / "runs", tmp_path / "cache", "data.source=folder", f"data.path={folder}")
    start = time.monotonic()
    result = run_cli("train", "--processes", "2", *args, "data.on_bad_image=error")
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ddpm train: error: process 0 of 2 failed") and "broken.png: cannot decode" in last
    assert "Traceback" not in result.stderr  # a user error, not a crash
    # Not the process-group time-out (60 min): the launcher stopped process 1. The bound leaves room for a loaded
    # machine (this took over 120 s once on 2 busy cores) and is still far from the time-out it tells apart.
    assert elapsed < 600
