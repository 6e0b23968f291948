"""Fault injection: real processes, real signals, a real full disk. What each fault must never cost: a checkpoint,
a resumed step, a byte of a finished file, or a secret. docs/reliability.md lists every fault and its test.

The long variants (the kill loops, disk full, two launches, ...) carry the `slow` marker: `make test-slow` and
`make test-reliability` run them."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields, is_dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ddpm.config import Config, load_config
from ddpm.errors import ConfigError
from ddpm.models.checkpoint import verified_checkpoints, verify
from ddpm.training.loop import train
from tests.conftest import ROOT, cli, report, run_cli


def weights(run_dir: Path, step: int) -> tuple[dict, dict]:
    ckpt = run_dir / "checkpoints" / f"step-{step:08d}"
    return load_file(ckpt / "unet.safetensors"), load_file(ckpt / "ema.safetensors")


def assert_same_weights(a_dir: Path, b_dir: Path, step: int) -> None:
    for a, b in zip(weights(a_dir, step), weights(b_dir, step)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def start_training(overrides: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "train", *overrides],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------------------------
# 1. SIGKILL at random moments, checkpoint writes included


@pytest.mark.parametrize(
    "kills",
    [pytest.param(3, id="3-kills", marks=pytest.mark.slow), pytest.param(20, id="20-kills", marks=pytest.mark.slow)],
)
def test_sigkill_at_random_moments_resumes_from_the_newest_complete_checkpoint(tiny, kills):
    """Every step writes a checkpoint; each launch is killed at a random moment after its next checkpoint started,
    often in the middle of one. No partial checkpoint is ever taken for a complete one, every relaunch resumes
    from the newest complete checkpoint, and the end is bit-identical to a run never interrupted."""
    rng = random.Random(kills)
    max_steps = kills + 4
    common = [
        f"train.max_steps={max_steps}",
        "train.checkpoint_every=1",
        "train.log_every=1",
        "train.keep_checkpoints=2",
    ]
    straight = load_config(None, tiny(*common, name="straight"))
    train(straight)
    overrides = tiny(*common, name="killed")
    ckpts = load_config(None, overrides).run_dir / "checkpoints"
    resumed_from, mid_write, outputs = [], 0, []
    for _ in range(kills):
        before = verified_checkpoints(ckpts, newest=1)
        newest = before[0].step if before else 0
        launched = time.time()
        proc = start_training(overrides)
        deadline = launched + 180
        while time.time() < deadline and proc.poll() is None:  # wait until this launch is writing a newer checkpoint
            if any(step > newest and _made_since(p, launched) for p, step in _checkpoint_writes(ckpts)):
                break  # (a .tmp-step-N left by the previous kill does not count: this launch has not touched it yet)
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.25))
        mid_write += any(ckpts.glob(".tmp-step-*"))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
        outputs.append(out)
        match = re.search(r"resuming \S+ from step-(\d+)", out)
        resumed_from.append((newest, int(match.group(1)) if match else 0))
        # a directory under a checkpoint's final name is always complete
        for path in ckpts.glob("step-*"):
            assert verify(path) is None, f"{path} is incomplete after SIGKILL: {verify(path)}"
    assert all(got == expected for expected, got in resumed_from), (resumed_from, outputs[-1][-3000:])
    final = run_cli("train", *overrides)
    assert final.returncode == 0, final.stderr[-2000:]
    assert_same_weights(straight.run_dir, load_config(None, overrides).run_dir, max_steps)
    report(fault="SIGKILL", injected=kills, during_checkpoint_write=mid_write, resumed=kills, steps_lost=0)


def _checkpoint_writes(ckpts: Path) -> list[tuple[Path, int]]:
    """step-N and .tmp-step-N with their steps; not .trash-step-N-<id>, a pruned one on its way out."""
    found = (re.fullmatch(r"(?:\.tmp-)?step-(\d+)", p.name) for p in ckpts.glob("*step-*"))
    return [(ckpts / m.group(0), int(m.group(1))) for m in found if m]


def _made_since(path: Path, t: float) -> bool:
    try:
        return path.stat().st_mtime >= t
    except FileNotFoundError:  # renamed or removed meanwhile
        return False


# ----------------------------------------------------------------------------------------------------------------
# 2. SIGTERM and the pre-limit signal, on every rank of a two-process run


@pytest.mark.parametrize(
    "sig",
    [pytest.param(signal.SIGTERM, id="SIGTERM"), pytest.param(signal.SIGUSR2, id="SIGUSR2", marks=pytest.mark.slow)],
)
def test_stop_signal_to_a_two_process_run_checkpoints_on_every_rank(tiny, tmp_path, sig):
    """The signal reaches one rank only (as submitit's reaches only the process it started); both ranks stop at
    the same step after one collective checkpoint holding both ranks' RNG state (torchrun, 2 CPU processes, gloo)."""
    overrides = tiny("train.max_steps=400", "train.log_every=1", "train.checkpoint_every=1000", name="stopped")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
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
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    cfg = load_config(None, overrides)
    metrics = cfg.run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.2)
    ranks = [
        int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    ]
    assert len(ranks) == 2, "torchrun should run two training processes"
    os.kill(max(ranks), sig)  # one rank only: the other must learn of it
    out, _ = proc.communicate(timeout=240)
    saved = sorted((cfg.run_dir / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and verify(saved[0]) is None, out[-3000:]
    step = int(saved[0].name[5:])
    assert 3 <= step < 400 and {p.name for p in saved[0].glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}
    assert f"stopped at step {step} of 400" in out
    report(
        fault=f"{signal.Signals(sig).name} to one of two ranks",
        injected=1,
        checkpoints_written=1,
        resumed=0,
        steps_lost=0,
    )


# ----------------------------------------------------------------------------------------------------------------
# 3. A checkpoint damaged by hand


@pytest.mark.parametrize("damage", ["truncated-safetensors", "missing-file", "garbage-json"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tiny, damage, caplog):
    straight = load_config(None, tiny(name="straight"))
    train(straight)
    cfg = load_config(None, tiny(name="damaged"))
    train(cfg)
    newest = cfg.run_dir / "checkpoints" / "step-00000006"
    if damage == "truncated-safetensors":
        data = (newest / "ema.safetensors").read_bytes()
        (newest / "ema.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "missing-file":
        (newest / "optimizer.pt").unlink()
    else:
        (newest / "state.json").write_text("{not json")
    shutil.rmtree(cfg.run_dir / "pipeline")
    caplog.set_level("WARNING")
    train(cfg)  # resumes from step 3 and trains steps 4-6 again
    assert any("step-00000006" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert verify(newest) is None
    assert_same_weights(straight.run_dir, cfg.run_dir, 6)
    report(fault=f"checkpoint damaged: {damage}", injected=1, resumed=1, steps_lost=0)


# ----------------------------------------------------------------------------------------------------------------
# 4. Disk full while a checkpoint is written


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_stops_clearly_and_keeps_the_previous_one(tiny, tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    probe = load_config(None, tiny("train.max_steps=3", "train.checkpoint_every=3", name="probe"))
    train(probe)
    size = sum(p.stat().st_size for p in (probe.run_dir / "checkpoints" / "step-00000003").iterdir())
    disk = tmp_path / "small-disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True)
    try:
        overrides = tiny("train.max_steps=9", "train.checkpoint_every=3", f"runs_dir={disk}", name="full")
        filler = disk / "filler"
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        with open(filler, "wb") as f:  # leave room for one checkpoint and a half, and the run's small files
            f.write(b"\0" * (free - int(1.5 * size) - 256 * 1024))
        r = run_cli("train", *overrides)
        assert r.returncode == 2, r.stderr[-2000:]
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(
            f"ddpm train: error: cannot write checkpoint {disk}/full/checkpoints/step-00000006 (disk full: "
        )
        assert last.endswith("the previous checkpoint step-00000003 is intact"), last
        ckpts = disk / "full" / "checkpoints"
        assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000003"] and verify(ckpts / "step-00000003") is None
        assert not (disk / "full" / "lock.json").exists()
        # room again: the rerun resumes from step 3 and finishes
        filler.unlink()
        r = run_cli("train", *overrides)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "resuming" in r.stderr and "from step-00000003" in r.stderr
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
    report(fault="disk full during a checkpoint write", injected=1, resumed=1, steps_lost=0)


# ----------------------------------------------------------------------------------------------------------------
# 5. Two launches on one run directory at once


@pytest.mark.slow
def test_two_launches_at_once_one_trains_and_the_other_names_it(tiny):
    overrides = tiny("train.max_steps=300", "train.checkpoint_every=100", name="twice")
    first, second = start_training(overrides), start_training(overrides)
    outs = {p.pid: p.communicate(timeout=600)[0] for p in (first, second)}
    codes = {p.pid: p.returncode for p in (first, second)}
    assert sorted(codes.values()) == [0, 2], outs
    winner = next(pid for pid, c in codes.items() if c == 0)
    loser = next(pid for pid, c in codes.items() if c == 2)
    assert f"is in use by pid {winner} on {socket.gethostname()}" in outs[loser].strip().splitlines()[-1]
    report(fault="second launch on a live run directory", injected=1, refused=1)


# ----------------------------------------------------------------------------------------------------------------
# 6. Bad data at scale


def _image_folder(root: Path) -> tuple[list[str], int]:
    """1,000 files: 950 usable (PNG, CMYK JPEG, 16-bit, animated GIF) and 50 bad (corrupt, truncated, empty,
    and five 20,000 x 20,000 px decompression bombs). Returns the bad names in sorted order and the usable count."""
    root.mkdir()
    rng = np.random.default_rng(0)
    bad = []
    bomb = Image.new("1", (20_000, 20_000))  # 50 MB in memory, a few kB as PNG; 400 M pixels when decoded
    for i in range(1000):
        name = f"img-{i:04d}"
        kind = i % 20
        pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        if i % 20 == 7 and i % 200 != 7:
            path = root / f"{name}.png"
            corrupt, truncated, empty = b"\x89PNG\r\n\x1a\n" + rng.bytes(200), _png_bytes(pixels)[:60], b""
            path.write_bytes((corrupt, truncated, empty)[(i // 20) % 3])
            bad.append(path.name)
        elif i % 200 == 7:
            path = root / f"{name}.png"
            bomb.save(path)
            bad.append(path.name)
        elif kind == 3:
            Image.fromarray(pixels).convert("CMYK").save(root / f"{name}.jpg")
        elif kind == 5:
            Image.fromarray(pixels[..., 0].astype(np.uint16) * 257).save(root / f"{name}.png")
        elif kind == 9:
            frames = [Image.fromarray(pixels), Image.fromarray(255 - pixels)]
            frames[0].save(root / f"{name}.gif", save_all=True, append_images=frames[1:])
        else:
            Image.fromarray(pixels).save(root / f"{name}.png")
    return sorted(bad), 1000 - len(bad)


def _png_bytes(pixels: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_a_thousand_files_with_five_percent_bad_strict_names_the_first_skip_reports_all(tiny, tmp_path):
    bad, usable = _image_folder(tmp_path / "photos")
    assert len(bad) == 50
    data = ["data.source=folder", f"data.path={tmp_path / 'photos'}", f"data.cache_dir={tmp_path / 'cache'}"]
    r = cli("train", *tiny(*data, "train.max_steps=2", name="strict"))
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ddpm train: error: ") and bad[0] in last and "data.on_bad_image=skip" in last
    assert not any(name in last for name in bad[1:])

    start = time.time()
    r = cli("train", *tiny(*data, "data.on_bad_image=skip", "train.max_steps=2", name="skip"))
    assert r.returncode == 0, r.stderr[-2000:]
    skipped = json.loads((tmp_path / "runs" / "skip" / "skipped_images.json").read_text())
    assert skipped["count"] == 50 and sorted(Path(s.split(":")[0]).name for s in skipped["images"]) == bad
    assert (
        sum("exceeds" in s or "pixels" in s for s in skipped["images"]) == 5
    )  # the bombs: refused by size, not decoded
    assert time.time() - start < 120  # five 400-megapixel images decoded would take minutes and gigabytes
    meta = json.loads(next((tmp_path / "cache").rglob("meta.json")).read_text())
    assert meta["count"] == usable
    report(fault="bad images in a folder of 1,000", injected=50, named=50, trained_on=usable)


# ----------------------------------------------------------------------------------------------------------------
# 7. Every config field with a wrong type fails before work, naming the key


def _leaves(cls, prefix: str = ""):
    for f in fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            yield from _leaves(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", default


def _wrong_value(default):
    if isinstance(default, bool):
        return "sometimes"
    if isinstance(default, (int, float)):
        return "lots"
    if isinstance(default, (tuple, list)):
        return "{a: 1}"
    return "[1, 2]"  # a string field given a list


@pytest.mark.parametrize("key, default", list(_leaves(Config)), ids=[k for k, _ in _leaves(Config)])
def test_every_config_field_with_a_wrong_type_is_refused_by_name(key, default):
    """load_config runs before any work (data, model, run directory): a refusal here means nothing was touched."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={_wrong_value(default)}"])
    assert key in str(e.value), str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# Security: secrets, unpickling, permissions


def test_tokens_appear_in_no_file_or_output_a_run_writes(tiny, tmp_path):
    import secrets

    hf, wb = "hf_" + secrets.token_hex(15), secrets.token_hex(20)  # token-shaped values, new each run
    env = {"HF_TOKEN": hf, "WANDB_API_KEY": wb, "WANDB_MODE": "offline"}
    r = cli("train", *tiny("tracking.wandb=true", name="secret"), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    run_dir = tmp_path / "runs" / "secret"
    up = cli("upload", "--pipeline", str(run_dir / "pipeline"), "--repo-id", "me/secret", "--dry-run", env=env)
    assert up.returncode == 0, up.stderr[-2000:]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "config.yaml" for p in files)
    for text in (r.stdout, r.stderr, up.stdout, up.stderr):
        assert hf not in text and wb not in text
    for path in files:
        data = path.read_bytes()
        assert hf.encode() not in data and wb.encode() not in data, path
    report(fault="tokens in the environment", injected=2, files_searched=len(files) + 4, found=0)


def test_a_checkpoint_file_that_smuggles_code_is_refused_not_run(tiny, tmp_path):
    cfg = load_config(None, tiny("train.max_steps=3", "train.checkpoint_every=3", name="pickled"))
    train(cfg)
    ckpt = cfg.run_dir / "checkpoints" / "step-00000003"
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(ckpt / "optimizer.pt", "wb") as f:
        pickle.dump({"state": Payload()}, f)
    manifest = json.loads(
        (ckpt / "manifest.json").read_text()
    )  # an attacker who can write files can fix the manifest too
    from ddpm.models.checkpoint import sha256_file

    manifest["files"]["optimizer.pt"] = {
        "bytes": (ckpt / "optimizer.pt").stat().st_size,
        "sha256": sha256_file(ckpt / "optimizer.pt"),
    }
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    r = cli("train", *tiny("train.max_steps=6", "train.checkpoint_every=3", name="pickled"))
    assert r.returncode == 2 and not marker.exists()
    assert (
        "optimizer.pt holds more than tensors and plain data; refusing to unpickle it"
        in r.stderr.strip().splitlines()[-1]
    )


def test_source_never_unpickles_untrusted_data():
    """torch.load only with weights_only=True, YAML only with safe_load, no pickle.load anywhere."""
    offenders = []
    for path in [*ROOT.glob("ddpm/*.py"), *ROOT.glob("jobs/*.py"), *ROOT.glob("slurm/*.py")]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if (
                ("torch.load(" in code and "weights_only=True" not in code)
                or "pickle.load" in code
                or re.search(r"yaml\.(load|unsafe_load|full_load)\(", code)
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []


def test_nothing_a_run_writes_is_writable_by_other_users_whatever_the_umask(tiny, tmp_path):
    started_with = os.umask(0o000)  # the job starts under a umask that lets anyone write
    try:
        r = cli("train", *tiny(name="perms"))
    finally:
        os.umask(started_with)
    assert r.returncode == 0, r.stderr[-2000:]
    run_dir = tmp_path / "runs" / "perms"
    paths = [run_dir, *run_dir.rglob("*")]
    writable = [str(p) for p in paths if p.stat().st_mode & 0o002]
    assert len(paths) > 10 and writable == []
