"""The forward (noising) process and the training target, from the schedule section of the config."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The signal-to-noise ratio of x_t per timestep, abar_t / (1 - abar_t) (diffusers' training_utils.compute_snr)."""
    abar = alphas_cumprod.double()
    return abar / (1.0 - abar)


def min_snr_weights(alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weight per timestep (Hang et al. 2023, eq. 9 and its v form): min(SNR, gamma) / SNR on the
    noise, min(SNR, gamma) / (SNR + 1) on v, as diffusers' examples (--snr_gamma, v form after its PR #5238). The
    epsilon form is written gamma / SNR capped at 1, which stays finite where the cosine schedule's SNR reaches 0."""
    s = snr(alphas_cumprod)
    if prediction_type == "epsilon":
        weights = (gamma / s).clamp(max=1.0)
    elif prediction_type == "v_prediction":
        weights = s.clamp(max=gamma) / (s + 1.0)
    else:
        raise ValueError(f"min-SNR weighting has no form for prediction type {prediction_type!r}")
    return weights.float()


class NoiseProcess:
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho et al. 2020, eq. 4), with the
    square roots (and the loss weights, if any) precomputed on the training device so a step does no host work."""

    def __init__(
        self, scheduler: DDPMScheduler, device: torch.device, loss_weighting: str = "none", snr_gamma: float = 5.0
    ):
        abar = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        self.sqrt_abar = abar.sqrt()
        self.sqrt_one_minus_abar = (1.0 - abar).sqrt()
        self.num_timesteps = len(abar)
        self.prediction_type = scheduler.config.prediction_type
        self.loss_weights = (
            None
            if loss_weighting == "none"
            else min_snr_weights(scheduler.alphas_cumprod, snr_gamma, self.prediction_type).to(device)
        )

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

    def loss(self, pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The mean squared error against the target, in fp32; with a loss weighting each image's error is weighted
        by its timestep's weight before the batch mean."""
        target = self.target(x0, noise, t)
        if self.loss_weights is None:
            return F.mse_loss(pred.float(), target)
        per_image = (pred.float() - target).square().mean(dim=tuple(range(1, pred.ndim)))
        return (per_image * self.loss_weights[t]).mean()
