"""Checkpoints that are complete or absent: the on-disk contract (write aside, manifest last, verify, prune, find
the newest), so no other module knows its file names. What training puts in and takes out: ddpm.training.state.

A checkpoint is `<run>/checkpoints/step-00001234/`: weights as safetensors, the optimizer and the
RNG states as tensors-only torch files (loaded with weights_only=True), `state.json` with the
step and data position, and `manifest.json` with the size and SHA-256 of every file, written last.
It is built in a temporary directory and renamed into place, so a crash leaves either the whole
checkpoint or none; deleting one (pruning, or replacing a checkpoint of the same step) first renames
it out of the checkpoint names, so a kill mid-delete never leaves half a checkpoint under a final
name. A checkpoint corrupted later fails its manifest check and resuming falls back to the previous one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ddpm.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
LAST_GOOD = "last-good.json"  # mark_last_good
PREFIX = "step-"


@dataclass
class Checkpoint:
    path: Path
    state: dict  # step, epoch, batch, architecture, wandb_run_id, ...

    @property
    def step(self) -> int:
        return self.state["step"]

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(self.path / f"{name}.safetensors")

    def torch_state(self, name: str) -> dict:
        return load_plain(self.path / f"{name}.pt")

    def has(self, name: str) -> bool:
        return (self.path / name).exists()


def load_plain(path: Path) -> dict:
    """torch.load restricted to tensors and plain containers (weights_only): a checkpoint file that smuggles code
    in a pickle is refused, never run, whatever its manifest says."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(
            f"{path} holds more than tensors and plain data; refusing to unpickle it ({first[:120]})"
        ) from None


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """One host sync: whether every element of every tensor is finite (checked before a checkpoint or an export)."""
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t.detach()).all().to(tensors[0].device) for t in tensors]).all())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    *,
    tensors: dict[str, dict[str, torch.Tensor]],
    torch_states: dict[str, dict],
    rank_states: dict[str, dict],
    state: dict,
    keep: int,
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
) -> Path | None:
    """Write a checkpoint collectively: every rank saves its own `rank_states` (RNG), rank 0 the rest.

    Every rank must call this at the same step. Returns the final path on rank 0.
    """
    final = ckpt_dir / f"{PREFIX}{step:08d}"
    tmp = ckpt_dir / f".tmp-{PREFIX}{step:08d}"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        for leftover in ckpt_dir.glob(".trash-*"):  # a delete that an earlier kill interrupted
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir()
    barrier()
    failure: Exception | None = None
    try:
        for name, value in rank_states.items():
            torch.save(value, tmp / f"{name}-rank{rank}.pt")
        if rank == 0:
            for name, value in tensors.items():
                save_file({k: v.detach().contiguous().cpu() for k, v in value.items()}, tmp / f"{name}.safetensors")
            for name, value in torch_states.items():
                torch.save(value, tmp / f"{name}.pt")
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
    except Exception as e:  # OSError, or safetensors' own error type wrapping one
        failure = e
    barrier()
    if rank != 0:
        if failure:
            raise UserError(f"cannot write checkpoint {final} ({failure})")
        return None
    try:
        if failure:
            raise failure if isinstance(failure, OSError) else OSError(str(failure))
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        for p in files:
            _fsync(p)
        manifest = {
            "step": step,
            "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(tmp / MANIFEST)
        replaced = _discard(final) if final.exists() else None  # the same step from an earlier attempt
        tmp.rename(final)
        _fsync(ckpt_dir)
        if replaced:
            shutil.rmtree(replaced, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [c.name for c in _candidates(ckpt_dir) if c != final]
        kept = f"; the previous checkpoint {previous[0]} is intact" if previous else ""
        # torch.save and safetensors wrap ENOSPC in their own errors ("unexpected pos ...", "file write failed"):
        # the free space tells, measured against the size of the previous checkpoint.
        free = shutil.disk_usage(ckpt_dir).free
        needed = max((sum(f.stat().st_size for f in Path(ckpt_dir, previous[0]).iterdir()) if previous else 0), 1 << 20)
        full = e.errno == errno.ENOSPC or free < needed or any(t in str(e) for t in ("os error 28", "No space left"))
        reason = f"disk full: {free / 1e6:.1f} MB free, a checkpoint takes {needed / 1e6:.1f} MB" if full else str(e)
        raise UserError(f"cannot write checkpoint {final} ({reason}){kept}") from None
    # Prune older checkpoints only: never the one just written, even when a (corrupt) newer one exists, and never
    # the last good one from before a detected divergence (mark_last_good).
    protected = last_good_step(ckpt_dir)
    older = [c for c in _candidates(ckpt_dir) if protected != int(c.name[len(PREFIX) :]) < step]
    for old in older[max(keep - 1, 0) :]:
        try:
            shutil.rmtree(_discard(old), ignore_errors=True)
        except OSError:  # already gone: nothing to prune
            pass
    return final


def mark_last_good(ckpt_dir: Path, step: int, reason: str) -> None:
    """Marks checkpoint `step` as the newest from before a detected divergence: pruning keeps it whatever
    `keep_checkpoints` says, so a rollback, or a person, always has it. One mark: a newer one replaces it."""
    tmp = ckpt_dir / f".{LAST_GOOD}.tmp"
    tmp.write_text(json.dumps({"step": step, "reason": reason}, indent=1))
    tmp.rename(ckpt_dir / LAST_GOOD)


def last_good_step(ckpt_dir: Path) -> int | None:
    try:
        return int(json.loads((ckpt_dir / LAST_GOOD).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_after(ckpt_dir: Path, step: int, *, keep_aside: bool) -> list[str]:
    """Takes the checkpoints newer than `step` out of the checkpoint names, so a resume starts from `step`: renamed
    to `diverged-step-N-<id>` with `keep_aside` (kept for a look), else deleted. Returns their names."""
    names = []
    for c in (c for c in _candidates(ckpt_dir) if int(c.name[len(PREFIX) :]) > step):
        names.append(c.name)
        if keep_aside:  # a suffix: a rerun that diverges again at the same steps must not collide
            c.rename(c.with_name(f"diverged-{c.name}-{uuid.uuid4().hex[:8]}"))
        else:
            shutil.rmtree(_discard(c), ignore_errors=True)
    return names


def _discard(path: Path) -> Path:
    """Renames a checkpoint out of the checkpoint names (atomic) before it is deleted: a kill during the delete
    then leaves a `.trash-` directory, cleared at the next save, never a half checkpoint named step-N."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    path.rename(trash)
    return trash


def _candidates(ckpt_dir: Path) -> list[Path]:
    """Checkpoint directories, newest first (temporary ones excluded)."""
    if not ckpt_dir.is_dir():
        return []
    found = [
        p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]), reverse=True)


def verify(path: Path) -> str | None:
    """None when every file matches the manifest, else what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest (incomplete write)"
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest ({e})"
    for name, expected in files.items():
        p = path / name
        if not p.is_file():
            return f"missing file {name}"
        if p.stat().st_size != expected["bytes"]:
            return f"{name} has {p.stat().st_size} bytes, manifest says {expected['bytes']}"
        if sha256_file(p) != expected["sha256"]:
            return f"{name} fails its SHA-256 check"
    try:
        json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        return f"unreadable state.json ({e})"
    return None


def verified_checkpoints(ckpt_dir: Path, newest: int = 0) -> list[Checkpoint]:
    """Up to `newest` (0: all) checkpoints that pass their manifest check, newest first."""
    found = []
    for path in _candidates(ckpt_dir):
        problem = verify(path)
        if problem is not None:
            log.warning("skipping corrupt checkpoint %s: %s", path, problem)
            continue
        found.append(Checkpoint(path=path, state=json.loads((path / "state.json").read_text())))
        if len(found) == newest:
            break
    return found


def newest_written(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint whose manifest was written (it is written last), without hashing its files: for
    messages that name it, not for loading it (latest_checkpoint checks it)."""
    return next((p for p in _candidates(ckpt_dir) if (p / MANIFEST).is_file()), None)


def latest_checkpoint(ckpt_dir: Path) -> Checkpoint | None:
    """The newest checkpoint that passes its manifest check; broken newer ones are named in a warning."""
    for path in _candidates(ckpt_dir):
        problem = verify(path)
        if problem is None:
            return Checkpoint(path=path, state=json.loads((path / "state.json").read_text()))
        log.warning("skipping corrupt checkpoint %s: %s", path, problem)
    return None
