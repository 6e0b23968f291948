"""EMA job: reconstruct the post-hoc EMA of any length from a run's snapshots and export it as a pipeline.

    ddpm ema --run runs/digits-16px --sigma-rel 0.1 [--step N] [--out DIR] [--check]

The run must have trained with EMA profiles (optim.ema_profiles) and snapshots (train.ema_snapshot_every): the
least-squares solution of Karras et al. 2024 (EDM2, ddpm/models/phema.py) combines every snapshot up to the step.
The export is a plain DDPMPipeline (a class-conditional run's: its conditional pipeline, with the class names), with
ema.json beside its files saying its sigma_rel and step; `ddpm sample`, `ddpm evaluate`, sweeps and `ddpm upload`
(its model card says the sigma_rel) take it as any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ddpm.errors import ConfigError


@dataclass
class EmaConfig:
    run: str = ""  # the training run directory (runs/<name>) whose ema-snapshots/ to reconstruct from
    sigma_rel: float = 0.10  # the EMA length: the averaging profile's width relative to training time (EDM2)
    step: int = 0  # the snapshot step to reconstruct at; 0: the newest
    out: str = ""  # the pipeline directory; "": <run>/ema-reconstructions/step-<N>-sigma_rel-<sigma_rel>
    check: bool = False  # also rebuild each tracked profile without its own snapshot, against the checkpoint's

    def validate(self) -> None:
        if not self.run:
            raise ConfigError("--run is required (a directory written by ddpm train, e.g. runs/digits-16px)")
        if not 0 < self.sigma_rel < 0.289:
            raise ConfigError(f"--sigma-rel must be in (0, 0.289), got {self.sigma_rel}")
        if self.step < 0:
            raise ConfigError(f"--step must be non-negative, got {self.step}")


CONFIG = EmaConfig


def run(cfg: EmaConfig) -> Path:
    from ddpm.files import writable_dir, writing
    from ddpm.models.phema import export_reconstruction, reconstruction_error, reconstruction_settings

    cfg.validate()
    step = cfg.step or None
    if cfg.out:
        out = Path(cfg.out)
        writable_dir(out.parent, "the output folder")
        if (out / "model_index.json").is_file() and reconstruction_settings(out) is None:
            raise ConfigError(f"--out {out} holds a pipeline that is not a post-hoc EMA export; give a new directory")
    # The check first: it needs a checkpoint of the step (pruned ones are gone), and a refusal after the export
    # would leave the user unsure which of the two had worked.
    rows = reconstruction_error(Path(cfg.run), step) if cfg.check else []
    with writing(("the output folder", Path(cfg.out or cfg.run).parent)):
        out = export_reconstruction(Path(cfg.run), cfg.sigma_rel, step, Path(cfg.out) if cfg.out else None)
    print(f"pipeline: {out} (post-hoc EMA, sigma_rel {cfg.sigma_rel:g})")
    if cfg.check:
        for row in rows:
            print(
                f"check: sigma_rel {row['sigma_rel']:g} at step {row['step']} rebuilt from {row['profiles_used']} "
                f"other snapshot profiles: |rebuilt - tracked| = {row['relative_error']:.4f} x the distance to the "
                f"other tracked profile ({row['error_over_norm']:.2e} of the weights' norm)"
            )
    return out
