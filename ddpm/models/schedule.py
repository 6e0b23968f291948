"""The forward (noising) process and the training target, from the schedule section of the config."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from ddpm.config import ScheduleConfig


def build_scheduler(cfg: ScheduleConfig) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        variance_type=cfg.variance_type,
        clip_sample=cfg.clip_sample,
    )


class NoiseProcess:
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho et al. 2020, eq. 4), with the
    square roots precomputed on the training device so a step does no host work."""

    def __init__(self, scheduler: DDPMScheduler, device: torch.device):
        abar = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        self.sqrt_abar = abar.sqrt()
        self.sqrt_one_minus_abar = (1.0 - abar).sqrt()
        self.num_timesteps = len(abar)
        self.prediction_type = scheduler.config.prediction_type

    def sample_timesteps(self, batch_size: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.sqrt_abar[t].view(-1, 1, 1, 1)
        s = self.sqrt_one_minus_abar[t].view(-1, 1, 1, 1)
        return a * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet learns to predict: the noise (eq. 14), or v = sqrt(abar) eps - sqrt(1-abar) x0
        (Salimans & Ho 2022)."""
        if self.prediction_type == "epsilon":
            return noise
        a = self.sqrt_abar[t].view(-1, 1, 1, 1)
        s = self.sqrt_one_minus_abar[t].view(-1, 1, 1, 1)
        return a * noise - s * x0
