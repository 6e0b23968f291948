"""Classifier-free guidance (Ho & Salimans 2022) for a class-conditional UNet2DModel, and the labels to sample.

The model has one class embedding more than classes: the last, index `num_classes`, is the null class that training
puts in place of a dropped label (k-diffusion's convention), so one network predicts both ways.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from ddpm.errors import UserError


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Ho & Salimans (2022), eq. 6 with w = scale - 1: (1 + w) eps(z, c) - w eps(z) = uncond + scale (cond - uncond);
    k-diffusion's `uncond + (cond - uncond) * cfg_scale`."""
    return uncond + (cond - uncond) * scale


def predict(
    unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, scale: float, null: int
) -> torch.Tensor:
    """The model's prediction for `x` at `t`, guided with `scale` towards `labels` (None: an unconditional model).
    Scale 1 is the conditional prediction alone and 0 the unconditional one, each one pass; any other scale runs the
    conditional and the unconditional halves in one batched forward (one call, twice the batch)."""
    if labels is None:
        return unet(x, t).sample
    if scale == 1.0:
        return unet(x, t, class_labels=labels).sample
    if scale == 0.0:
        return unet(x, t, class_labels=torch.full_like(labels, null)).sample
    both = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, torch.full_like(labels, null)])).sample
    cond, uncond = both.chunk(2)
    return guide(cond, uncond, scale)


def round_robin(count: int, num_classes: int, first: int = 0) -> list[int]:
    """Image i gets class (first + i) % num_classes: a grid with num_classes columns has a class per column and
    every class appears as often as any other (up to one)."""
    return [(first + i) % num_classes for i in range(count)]


def parse_labels(spec: tuple[str, ...] | list[str], class_names: list[str], what: str = "--label") -> list[int]:
    """Class indices from ids or names ("3", "cat"); a name wins over an id that reads the same. One-line errors
    name the culprit and the valid choices."""
    index = {name: i for i, name in enumerate(class_names)}
    out = []
    for item in spec:
        item = str(item).strip()
        if item in index:
            out.append(index[item])
        elif item.lstrip("-").isdigit():
            i = int(item)
            if not 0 <= i < len(class_names):
                n = len(class_names)
                raise UserError(f"{what}: label {i} is out of range: the model has {n} classes (0..{n - 1})")
            out.append(i)
        else:
            shown = ", ".join(class_names[:20]) + (", ..." if len(class_names) > 20 else "")
            raise UserError(f"{what}: {item!r} is not a class of the model (classes: {shown})")
    return out


def sampling_labels(
    unet: UNet2DModel,
    count: int,
    spec: tuple[str, ...] | list[str],
    class_names: list[str] | None,
    scale: float,
    what: str = "--label",
) -> list[int] | None:
    """The label of each of `count` images: the given ones repeated over the images, by default round robin over
    the classes; None for an unconditional model, which refuses labels and guidance in one line."""
    from ddpm.models.unet import num_classes_of

    n = num_classes_of(unet)
    if n == 0:
        if spec:
            raise UserError(f"{what}: the model is unconditional (it has no class embedding); leave the labels out")
        if scale != 1.0:
            raise UserError(
                f"--guidance-scale {scale:g}: guidance needs a class-conditional model; this one is unconditional"
            )
        return None
    names = class_names if class_names and len(class_names) == n else [str(i) for i in range(n)]
    chosen = parse_labels(spec, names, what) if spec else list(range(n))
    return [chosen[i % len(chosen)] for i in range(count)]
