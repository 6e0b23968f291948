"""The labels of a class-conditional run: the number of classes the model gets, and the labels dropped to the null
class so that one network also learns the unconditional prediction (classifier-free guidance, Ho & Salimans 2022)."""

from __future__ import annotations

import torch

from ddpm.config import ModelConfig
from ddpm.errors import UserError


def resolve_num_classes(model: ModelConfig, class_names: list[str] | None, labels_max: int) -> int:
    """model.num_classes as a number: 0 stays unconditional, auto is the data's number of classes; a given number
    must cover every label of the data."""
    if model.num_classes == 0:
        return 0
    if class_names is None:
        raise UserError("model.num_classes: the data has no class labels (data.labels); see README, class-conditional")
    n = len(class_names) if model.num_classes == "auto" else model.num_classes
    if labels_max >= n:
        raise UserError(
            f"model.num_classes={n}: label {labels_max} is out of range; the data has {len(class_names)} classes "
            f"({', '.join(class_names[:10])}{', ...' if len(class_names) > 10 else ''}): use model.num_classes=auto"
        )
    return n


def drop_labels(
    labels: torch.Tensor, num_classes: int, dropout: float, device: torch.device, generator: torch.Generator
) -> torch.Tensor:
    """The batch's labels on the device, each replaced by the null class (index num_classes) with probability
    `dropout` (k-diffusion's cond_dropout_rate, 0.1 by default as in DiT). The mask comes from the rank's seeded
    stream that also draws the noise, saved in every checkpoint, so a resumed run drops the same labels."""
    labels = labels.to(device, non_blocking=True)
    drop = torch.rand(labels.shape[0], device=device, generator=generator) < dropout
    return torch.where(drop, torch.full_like(labels, num_classes), labels)
