"""Shared fixtures: a tiny UNet on 8 px digits, so a whole training run takes seconds on a CPU."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

# No network in tests: the Hub is offline and W&B writes offline run files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per worker (and per child process it starts): `make test` runs a worker per core, and more
    # threads than cores would only make them wait for each other.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = [
    "model.block_out_channels=[16,32]",
    "model.down_block_types=[DownBlock2D,AttnDownBlock2D]",
    "model.up_block_types=[AttnUpBlock2D,UpBlock2D]",
    "model.layers_per_block=1",
    "model.norm_num_groups=8",
    "model.attention_head_dim=8",
]


def tiny_overrides(runs_dir: Path, cache: Path, *extra: str, name: str = "tiny") -> list[str]:
    """A 6-step run of the tiny UNet on 8 px digits (seconds on a CPU); extra key=value strings are appended."""
    return [
        f"name={name}",
        f"runs_dir={runs_dir}",
        f"data.cache_dir={cache}",
        "data.resolution=8",
        *TINY_MODEL,
        "train.batch_size=16",
        "train.max_steps=6",
        "train.log_every=2",
        "train.checkpoint_every=3",
        "train.sample_every=0",
        "train.sample_images=4",
        "train.sample_steps=2",
        "train.eval_every=0",  # tests of in-training evaluation turn it on
        "train.mixed_precision=fp32",
        "optim.warmup_steps=2",
        "tracking.wandb=false",
        *extra,
    ]


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One data cache for the whole session: the digits decode once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, shared_cache) -> Path:
    """One tiny digits run for the whole session (per test worker): 6 steps, checkpoints at steps 3 and 6, an
    exported pipeline. Read-only: a test that changes it works on a copy (`copy_of_tiny_run`)."""
    from ddpm.config import load_config
    from ddpm.training.loop import train

    cfg = load_config(None, tiny_overrides(tmp_path_factory.mktemp("tiny-run") / "runs", shared_cache))
    train(cfg)
    return cfg.run_dir


def copy_of_tiny_run(tiny_run: Path, dest: Path) -> Path:
    """A private copy of the shared run, under dest/runs/tiny."""
    import shutil

    copy = dest / "runs" / tiny_run.name
    shutil.copytree(tiny_run, copy)
    return copy


@pytest.fixture
def tiny(tmp_path, shared_cache):
    """Overrides for a tiny run in tmp_path; extra key=value strings are appended."""

    def make(*extra: str, name: str = "tiny") -> list[str]:
        return tiny_overrides(tmp_path / "runs", shared_cache, *extra, name=name)

    return make


def report(**counts) -> None:
    """Adds a fault-injection test's counts to $DDPM_RELIABILITY_REPORT (JSON lines), for docs/reliability.md."""
    path = os.environ.get("DDPM_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(counts) + "\n")


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real console entry point in a child process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`ddpm <args>` in this process (jobs.cli.main), answered like `run_cli`: exit status, stdout, and stderr with
    the job's log lines as the console script writes them, without a child's seconds of imports. For what a job
    prints and its exit status; a claim about a real process (a signal, a kill, two processes) uses run_cli."""
    from jobs.cli import main

    out, err = io.StringIO(), io.StringIO()
    root, saved_env, umask = logging.getLogger(), dict(os.environ), os.umask(0)
    os.umask(umask)
    os.environ.update(env or {})
    handler = logging.StreamHandler(err)  # where the console script's logging.basicConfig sends its lines
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    level = root.level
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.addHandler(handler)
    try:
        with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        os.environ.clear()
        os.environ.update(saved_env)
        os.umask(umask)  # the job tightens it for its own files, as its process would
        _reset_accelerate_state()  # a fresh process starts without accelerate's singletons
    return subprocess.CompletedProcess(["ddpm", *args], code, out.getvalue(), err.getvalue())


def _reset_accelerate_state() -> None:
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each in-process training run starts clean."""
    yield
    _reset_accelerate_state()
