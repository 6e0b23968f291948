"""The training state: what the loop hands a checkpoint to save (weights, EMA, optimizer, scaler, every rank's
random streams, the data position), and restores in place on resume, in one call each."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddpm.errors import UserError
from ddpm.models.checkpoint import Checkpoint, all_finite, latest_checkpoint, load_plain, save_checkpoint
from ddpm.training.ema import EMA, PowerEMAProfiles

log = logging.getLogger(__name__)


@dataclass
class TrainingState:
    """The objects a checkpoint writes and restores in place; the loop's position travels as plain numbers."""

    unet: torch.nn.Module  # the raw UNet (not the DDP/compile wrapper)
    ema: EMA
    optimizer: torch.optim.Optimizer
    scaler: Any | None  # accelerate's GradScaler under fp16, else None
    generator: torch.Generator  # this rank's noise/timestep/flip stream
    architecture: dict  # ddpm.models.unet.architecture(unet): a resume must match it
    profiles: PowerEMAProfiles | None = None  # post-hoc EMA's profiles, when optim.ema_profiles has any

    def param_names(self) -> list[str]:
        return [name for name, _ in self.unet.named_parameters()]


def save_training_state(
    ckpt_dir: Path,
    s: TrainingState,
    position: dict[str, Any],
    *,
    keep: int,
    rank: int,
    world: int,
    barrier: Callable[[], None],
) -> Path | None:
    """A collective checkpoint of the whole training state at `position` (step, epoch, batch, batch_size, seed, and
    the plain numbers the loop keeps: the learning-rate scale, rollbacks, the divergence detector's history).
    Weights or EMA that hold a NaN or inf are refused in one line: no checkpoint ever holds one."""
    profile_tensors = [w for shadow in s.profiles.shadows for w in shadow] if s.profiles else []
    if not all_finite([*s.unet.parameters(), *s.ema.shadow, *profile_tensors]):
        newest = latest_checkpoint(ckpt_dir)
        kept = f"; the newest good checkpoint is {newest.path}" if newest else ""
        raise UserError(f"step {position['step']}: the weights or their EMA are not finite, not checkpointed{kept}")
    device_type = next(s.unet.parameters()).device.type
    state = {
        **position,
        "world_size": world,
        "device_type": device_type,
        "ema_step": s.ema.steps,
        "architecture": s.architecture,
        **({"phema_t": s.profiles.t, "phema_sigma_rels": list(s.profiles.sigma_rels)} if profile_tensors else {}),
    }
    rng = {
        "generator": s.generator.get_state(),
        "torch": torch.get_rng_state(),
        **({"cuda": torch.cuda.get_rng_state()} if device_type == "cuda" else {}),
    }
    return save_checkpoint(
        ckpt_dir,
        position["step"],
        keep=keep,
        rank=rank,
        barrier=barrier,
        state=state,
        tensors={
            "unet": s.unet.state_dict(),
            "ema": dict(zip(s.param_names(), s.ema.shadow)),
            # fp32, unlike the snapshots: a resume continues the profiles exactly
            **({"phema": _flat(s.profiles.named())} if profile_tensors else {}),
        },
        torch_states={
            "optimizer": s.optimizer.state_dict(),
            **({"scaler": s.scaler.state_dict()} if s.scaler is not None else {}),
        },
        rank_states={"rng": rng},
    )


def restore_training_state(
    ckpt_dir: Path, s: TrainingState, *, rank: int, world: int, batch_size: int
) -> dict[str, Any] | None:
    """Load the newest complete checkpoint into `s`; returns its position (step, epoch, batch), or None when there
    is none. Random streams continue exactly when the process layout is the same; a different global batch
    cannot continue mid-epoch and starts the next one."""
    latest = latest_checkpoint(ckpt_dir)
    if latest is None:
        return None
    theirs, ours = latest.state["architecture"], s.architecture
    if theirs != ours:
        diff = ", ".join(f"{k}: {theirs.get(k)} != {ours.get(k)}" for k in ours if theirs.get(k) != ours.get(k))
        raise UserError(
            f"checkpoint {latest.path} was trained with a different model config ({diff}); "
            "use another name= or the old config"
        )
    device = next(s.unet.parameters()).device
    s.unet.load_state_dict(latest.tensors("unet"))
    ema = latest.tensors("ema")
    s.ema.shadow = [ema[n].to(device) for n in s.param_names()]
    s.ema.steps = latest.state["ema_step"]
    if s.profiles is not None and s.profiles.sigma_rels:
        _restore_profiles(s, latest, device)
    s.optimizer.load_state_dict(latest.torch_state("optimizer"))
    if s.scaler is not None and latest.has("scaler.pt"):
        s.scaler.load_state_dict(latest.torch_state("scaler"))
    rng_file = latest.path / f"rng-rank{rank}.pt"
    same_layout = latest.state["world_size"] == world and latest.state.get("device_type") == device.type
    if rng_file.is_file() and same_layout:
        rng = load_plain(rng_file)
        s.generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])
    else:
        log.warning(
            "resuming on %d %s process(es) from a checkpoint of %d %s: random streams restart from the seed",
            world,
            device.type,
            latest.state["world_size"],
            latest.state.get("device_type"),
        )
    step, epoch, batch = latest.step, latest.state["epoch"], latest.state["batch"]
    if latest.state["batch_size"] * latest.state["world_size"] != batch_size * world:
        epoch, batch = epoch + (batch > 0), 0
    return {"step": step, "epoch": epoch, "batch": batch, "path": latest.path, "state": latest.state}


def _flat(profiles: dict[float, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{sigma_rel:g}/{name}": w for sigma_rel, ws in profiles.items() for name, w in ws.items()}


def _restore_profiles(s: TrainingState, latest: Checkpoint, device: torch.device) -> None:
    """The profiles of the checkpoint; a checkpoint without these profiles (written before they were added) starts
    them from its weights at its time, which the reconstruction then treats as if they had been tracked all along."""
    p = s.profiles
    if latest.has("phema.safetensors") and tuple(latest.state.get("phema_sigma_rels", ())) == p.sigma_rels:
        flat = latest.tensors("phema")
        p.shadows = [[flat[f"{sr:g}/{n}"].to(device) for n in s.param_names()] for sr in p.sigma_rels]
        p.t = latest.state["phema_t"]
        p.forget_after(p.t)
        return
    log.warning(
        "checkpoint %s has no EMA profiles %s: they start from its weights at step %d (a reconstruction from "
        "this run's snapshots is then approximate)",
        latest.path,
        ", ".join(f"{sr:g}" for sr in p.sigma_rels),
        latest.state["ema_step"],
    )
    p.reset(s.unet.parameters(), latest.state["ema_step"])
