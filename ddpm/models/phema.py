"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2,
section 3 and appendix C): the power-function EMA profiles, their snapshots on disk, and the least-squares
reconstruction of an EMA of any length from them.

Time is counted in optimizer steps (the profile's own count of averaged steps, which a rollback rewinds), where
EDM2 counts images: with a fixed batch every formula below is the same up to that scale, which cancels out.

A snapshot is `<run>/ema-snapshots/step-00001234.safetensors`: every profile's weights at that step in fp16 or
bf16 (keys `<sigma_rel>/<parameter>`), the step, the profile time and the sigma_rels in its metadata. It is
written beside its name and renamed into place, so a kill leaves the whole file or none; checkpoint pruning never
touches them, since the reconstruction needs them all.

Why a port and not `ema-pytorch`'s PostHocEMA: that package solves the same least squares (its
`solve_weights` builds the same Gram matrix of power-function profiles; the coefficients agree to 4e-8) but
would be a new dependency, keeps its own copies of the model, its snapshots as `torch.save` files and its own
step counter, none of which fits the checkpoint contract here (safetensors, resume exact, rollbacks), and by
default updates its profiles every 100 steps only; the solver itself is a few lines of numpy. docs/benchmarks.md
("Min-SNR weighting and post-hoc EMA") compares the two numerically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ddpm.errors import UserError
from ddpm.files import unique_suffix

SNAPSHOT_DIR = "ema-snapshots"
PREFIX = "step-"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
MAX_SIGMA_REL = 0.289  # sqrt(1/12): the sigma_rel of gamma = 0, a uniform average of the whole run (eq. 123)


# ---------------------------------------------------------------------------------------------------------------
# The equations.


def sigma_rel_of(gamma: float) -> float:
    """The relative standard deviation of the power-function profile of exponent gamma (EDM2 eq. 123)."""
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def gamma_of(sigma_rel: float) -> float:
    """The exponent gamma of the profile of width sigma_rel: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0 (EDM2 eq. 126, Algorithm 2)."""
    s2 = float(sigma_rel) ** -2
    return float(np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2]).real.max())


def profile_beta(gamma: float, t: int) -> float:
    """The decay of the update at step t (1-based) that tracks the profile exactly: (1 - 1/t)^(gamma + 1), EDM2
    eq. 127 with one step per update; at t = 1 it is 0, so the average starts as the weights."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def profile_inner_products(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """<p_a, p_b> for power-function profiles p(tau) = (g + 1) tau^g / t^(g + 1) on [0, t] (EDM2 eq. 151,
    Algorithm 3): the integral up to min(t_a, t_b) of their product, broadcast over the arrays."""
    m = np.minimum(t_a, t_b)
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * (m / t_a) ** (g_a + 1) * (m / t_b) ** (g_b + 1) / m


def solve_coefficients(
    in_t: np.ndarray, in_sigma: np.ndarray, out_t: float, out_sigma: np.ndarray
) -> np.ndarray:  # [in, out]
    """The least-squares combination of the snapshot profiles that best matches each wanted profile (EDM2
    Algorithm 3): the normal equations A x = b with A the Gram matrix of the snapshots' profiles and b their inner
    products with the target; each column renormalised to sum to 1, so the result is an average."""
    in_t, in_sigma = np.broadcast_arrays(np.float64(in_t), np.float64(in_sigma))
    out_sigma = np.float64(np.atleast_1d(out_sigma))
    in_g = np.array([gamma_of(s) for s in in_sigma])
    out_g = np.array([gamma_of(s) for s in out_sigma])
    col, row = (lambda x: x.reshape(-1, 1)), (lambda x: x.reshape(1, -1))
    a = profile_inner_products(col(in_t), col(in_g), row(in_t), row(in_g))
    b = profile_inner_products(col(in_t), col(in_g), np.full((1, len(out_g)), float(out_t)), row(out_g))
    x = np.linalg.solve(a, b)
    return x / x.sum(axis=0, keepdims=True)


# ---------------------------------------------------------------------------------------------------------------
# Snapshots on disk.


@dataclass
class Snapshot:
    path: Path
    step: int  # the training step it was written at
    t: int  # the profiles' time: optimizer steps averaged (a rollback rewinds it, the step goes on)
    sigma_rels: tuple[float, ...]

    def weights(self, sigma_rel: float) -> dict[str, torch.Tensor]:
        """One profile's weights in fp32."""
        prefix = _key(sigma_rel, "")
        with safe_open(self.path, framework="pt") as f:
            return {k[len(prefix) :]: f.get_tensor(k).float() for k in f.keys() if k.startswith(prefix)}


def _key(sigma_rel: float, name: str) -> str:
    return f"{sigma_rel:g}/{name}"


def snapshot_dir(run_dir: Path) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR


def write_snapshot(
    directory: Path, step: int, t: int, profiles: dict[float, dict[str, torch.Tensor]], dtype: str
) -> Path:
    """Whole or absent: written to a temporary name, flushed to disk, then renamed into place."""
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob(".tmp-*"):  # from a write that a kill interrupted
        leftover.unlink(missing_ok=True)
    final = directory / f"{PREFIX}{step:08d}.safetensors"
    tmp = directory / f".tmp-{final.name}-{unique_suffix()}"
    tensors = {
        _key(s, name): w.detach().to(DTYPES[dtype]).contiguous().cpu()
        for s, ws in profiles.items()
        for name, w in ws.items()
    }
    meta = {"step": str(step), "t": str(t), "sigma_rels": json.dumps(list(profiles)), "dtype": dtype}
    save_file(tensors, tmp, metadata=meta)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    return final


def list_snapshots(directory: Path) -> list[Snapshot]:
    """The complete snapshots in `directory`, oldest first (temporary files of an interrupted write are not)."""
    found = []
    if not Path(directory).is_dir():
        return found
    for path in Path(directory).glob(f"{PREFIX}*.safetensors"):
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
            found.append(Snapshot(path, int(meta["step"]), int(meta["t"]), tuple(json.loads(meta["sigma_rels"]))))
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise UserError(f"EMA snapshot {path} is unreadable ({type(e).__name__}: {e}); move it aside") from None
    return sorted(found, key=lambda s: s.step)


def remove_snapshots_after(directory: Path, t: int) -> list[str]:
    """Deletes the snapshots of profile times after `t`: after a resume or a rollback to time t, they belong to a
    trajectory the run no longer follows (an exact resume writes them again, the same)."""
    removed = []
    for s in list_snapshots(directory):
        if s.t > t:
            s.path.unlink(missing_ok=True)
            removed.append(s.path.name)
    return removed


def snapshot_bytes(num_params: int, num_profiles: int, dtype: str) -> int:
    """A snapshot's size on disk, without its small header: 2 bytes per parameter per profile."""
    return num_params * num_profiles * torch.finfo(DTYPES[dtype]).bits // 8


# ---------------------------------------------------------------------------------------------------------------
# Reconstruction.


@dataclass
class Reconstruction:
    weights: dict[str, dict[str, torch.Tensor]]  # sigma_rel (as asked) -> fp32 weights by parameter name
    step: int  # the snapshot step it is reconstructed at
    t: int  # that snapshot's profile time
    inputs: list[tuple[int, float]]  # the (step, sigma_rel) of every snapshot profile used
    coefficients: np.ndarray  # [inputs, sigma_rels]


def reconstruct(
    snapshots: list[Snapshot], sigma_rels: list[float], step: int | None = None, exclude: tuple = ()
) -> Reconstruction:
    """The EMA of each sigma_rel at snapshot `step` (None: the newest), from every snapshot profile up to it (EDM2's
    reconstruct_phema), streamed one snapshot at a time. `exclude`: (step, sigma_rel) pairs left out, for the
    check that rebuilds a tracked profile without its own snapshot."""
    if not snapshots:
        raise UserError("no EMA snapshots to reconstruct from (train with optim.ema_profiles and ema_snapshot_every)")
    for s in sigma_rels:
        if not 0 < s < MAX_SIGMA_REL:
            raise UserError(f"sigma_rel {s} is not in (0, {MAX_SIGMA_REL})")
    steps = [s.step for s in snapshots]
    step = max(steps) if step is None else step
    if step not in steps:
        raise UserError(f"no EMA snapshot at step {step}; the snapshots are at steps {_ranges(steps)}")
    t_out = next(s.t for s in snapshots if s.step == step)
    used = [s for s in snapshots if 0 < s.t <= t_out and s.step <= step]
    inputs = [(s.step, sr) for s in used for sr in s.sigma_rels if (s.step, sr) not in set(exclude)]
    t_of = {s.step: s.t for s in used}
    coefs = solve_coefficients([t_of[st] for st, _ in inputs], [sr for _, sr in inputs], t_out, sigma_rels)
    out: dict[str, dict[str, torch.Tensor]] = {}
    i = 0
    for snap in used:
        for sr in snap.sigma_rels:
            if (snap.step, sr) in set(exclude):
                continue
            w = snap.weights(sr)
            for j, target in enumerate(sigma_rels):
                acc = out.setdefault(target, {n: torch.zeros_like(v) for n, v in w.items()})
                for n, v in w.items():
                    acc[n].add_(v, alpha=float(coefs[i, j]))
            i += 1
    return Reconstruction(out, step, t_out, inputs, coefs)


def _ranges(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 6 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"


# ---------------------------------------------------------------------------------------------------------------
# A reconstruction as a pipeline, and the reconstruction's own check.

RECONSTRUCTIONS = "ema-reconstructions"  # <run>/ema-reconstructions/step-N-sigma_rel-S/: a plain DDPMPipeline
SETTINGS = "ema.json"  # beside the pipeline's own files: what EMA its weights are


def reconstruction_dir(run_dir: Path, step: int, sigma_rel: float) -> Path:
    return Path(run_dir) / RECONSTRUCTIONS / f"step-{step:08d}-sigma_rel-{sigma_rel:g}"


def reconstruction_settings(path: Path) -> dict | None:
    """The ema.json of an exported reconstruction, or None for any other model."""
    try:
        return json.loads((Path(path) / SETTINGS).read_text())
    except (OSError, ValueError):
        return None


def export_reconstruction(run_dir: Path, sigma_rel: float, step: int | None = None, out: Path | None = None) -> Path:
    """The post-hoc EMA of `sigma_rel` at snapshot `step` (None: the newest) as a pipeline in `out` (default
    reconstruction_dir), with ema.json saying what it is; an export already there from the same snapshots is kept
    as it is (a sweep that resumes samples the same files)."""
    from ddpm.config import load_config
    from ddpm.models.export import export_pipeline, make_pipeline, run_class_names
    from ddpm.models.schedule import build_scheduler
    from ddpm.models.unet import build_unet

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a training run (no config.yaml)")
    snapshots = list_snapshots(snapshot_dir(run_dir))
    step = max((s.step for s in snapshots), default=0) if step is None else step
    out = Path(out) if out else reconstruction_dir(run_dir, step, sigma_rel)
    inputs = [s.path.name for s in snapshots if s.step <= step]
    existing = reconstruction_settings(out)
    if existing and existing.get("sigma_rel") == sigma_rel and existing.get("snapshots") == inputs:
        return out
    rec = reconstruct(snapshots, [sigma_rel], step)
    cfg = load_config(run_dir / "config.yaml")
    unet = build_unet(cfg.model, cfg.data.resolution, cfg.data.image_channels)
    weights = rec.weights[sigma_rel]
    params = dict(unet.named_parameters())
    if set(weights) != set(params):
        raise UserError(f"the EMA snapshots of {run_dir} do not match the model in its config.yaml")
    for name, p in params.items():
        p.data.copy_(weights[name])
    # A class-conditional run exports as its training export does: the conditional pipeline with its class names.
    export_pipeline(make_pipeline(unet.eval(), build_scheduler(cfg.schedule), run_class_names(run_dir)), out)
    settings = {
        "ema": "post-hoc",
        "sigma_rel": sigma_rel,
        "step": rec.step,
        "profile_time": rec.t,
        "method": "least squares over the snapshots' power-function profiles (Karras et al. 2024, Algorithm 3)",
        "run": str(run_dir.resolve()),
        "snapshots": inputs,
        "profiles_used": len(rec.inputs),
    }
    (out / SETTINGS).write_text(json.dumps(settings, indent=1))
    return out


def reconstruction_error(run_dir: Path, step: int | None = None) -> list[dict]:
    """EDM2's check of the method, per tracked profile: rebuild it at `step` (None: the newest snapshot) from every
    snapshot but its own, and compare with the same profile tracked directly in fp32 (the checkpoint of that
    step). `relative_error` is |rebuilt - tracked| / |tracked - the other tracked profile|: the error against the
    distance the reconstruction has to cover, over all weights."""
    from ddpm.models.checkpoint import verified_checkpoints

    snapshots = list_snapshots(snapshot_dir(run_dir))
    step = max((s.step for s in snapshots), default=0) if step is None else step
    checkable = [c for c in verified_checkpoints(Path(run_dir) / "checkpoints") if c.has("phema.safetensors")]
    ckpt = next((c for c in checkable if c.step == step), None)
    if ckpt is None:  # checkpoints are pruned (train.keep_checkpoints), snapshots are not
        steps = ", ".join(str(c.step) for c in checkable) or "none"
        raise UserError(
            f"{run_dir} has no checkpoint with EMA profiles at step {step} to check against (steps that can be "
            f"checked: {steps})"
        )
    tracked = ckpt.tensors("phema")
    sigma_rels = tuple(ckpt.state["phema_sigma_rels"])
    rows = []
    for sr in sigma_rels:
        rec = reconstruct(snapshots, [sr], step, exclude=((step, sr),))
        w = rec.weights[sr]
        other = next((o for o in sigma_rels if o != sr), None)
        err = sum(float((w[n] - tracked[_key(sr, n)]).square().sum()) for n in w) ** 0.5
        norm = sum(float(tracked[_key(sr, n)].square().sum()) for n in w) ** 0.5
        gap = (
            sum(float((tracked[_key(other, n)] - tracked[_key(sr, n)]).square().sum()) for n in w) ** 0.5
            if other is not None
            else float("nan")
        )
        rows.append(
            {
                "sigma_rel": sr,
                "step": step,
                "relative_error": err / gap,
                "error_over_norm": err / norm,
                "profiles_used": len(rec.inputs),
            }  # fmt: skip
        )
    return rows
