"""The denoiser: a diffusers UNet2DModel built from the model section of the config."""

from __future__ import annotations

import inspect

import torch
from diffusers import UNet2DModel

from ddpm.config import ModelConfig

# The model section's keys that are UNet2DModel arguments of the same name: the whole network, as a published
# config.json writes it, but for sample_size, in_channels and out_channels (the data's) and num_class_embeds.
UNET_KEYS = (
    "block_out_channels",
    "down_block_types",
    "up_block_types",
    "layers_per_block",
    "attention_head_dim",
    "norm_num_groups",
    "dropout",
    "mid_block_type",
    "add_attention",
    "attn_norm_num_groups",
    "norm_eps",
    "act_fn",
    "resnet_time_scale_shift",
    "time_embedding_type",
    "time_embedding_dim",
    "flip_sin_to_cos",
    "freq_shift",
    "center_input_sample",
    "mid_block_scale_factor",
    "downsample_padding",
    "downsample_type",
    "upsample_type",
    "class_embed_type",
)
# The entries architecture() has always recorded: checkpoints written before the others existed hold these only.
_SHAPE_KEYS = (
    "sample_size",
    "in_channels",
    "out_channels",
    "layers_per_block",
    "block_out_channels",
    "down_block_types",
    "up_block_types",
    "attention_head_dim",
    "norm_num_groups",
)


def unet_kwargs(cfg: ModelConfig, resolution: int, channels: int, num_train_timesteps: int | None = None) -> dict:
    """UNet2DModel's arguments for this model section; num_train_timesteps sizes a "learned" time embedding.

    A class-conditional model (cfg.num_classes, resolved to a number by then) gets UNet2DModel's class embedding,
    added to the timestep embedding, with one more entry than classes: the last is the null class that stands for
    "no label" (classifier-free guidance)."""
    if not isinstance(cfg.num_classes, int):
        raise ValueError("model.num_classes must be resolved to a number before the UNet is built")
    kwargs = {k: getattr(cfg, k) for k in UNET_KEYS}
    kwargs.update(sample_size=resolution, in_channels=channels, out_channels=channels)
    if cfg.num_classes:
        kwargs["num_class_embeds"] = cfg.num_classes + 1
    if cfg.time_embedding_type == "learned":
        kwargs["num_train_timesteps"] = num_train_timesteps or 1000
    return kwargs


def build_unet(
    cfg: ModelConfig, resolution: int, channels: int = 3, num_train_timesteps: int | None = None
) -> UNet2DModel:
    """channels: 1 for grey images (data.channels), 3 for RGB."""
    return UNet2DModel(**unet_kwargs(cfg, resolution, channels, num_train_timesteps))


def num_classes_of(unet: UNet2DModel) -> int:
    """The classes a UNet was trained on (its class embedding less the null class); 0 for an unconditional one."""
    embeds = unet.config.get("num_class_embeds")
    return embeds - 1 if embeds else 0


def architecture(unet: UNet2DModel) -> dict:
    """The config entries that decide what the network computes: what a checkpoint must match. The entries added
    since the first checkpoints appear only where they differ from UNet2DModel's defaults (num_class_embeds where it
    is set), so those checkpoints (which had the defaults) still match."""
    signature = inspect.signature(UNet2DModel.__init__).parameters
    out = {}
    for k, v in unet.config.items():
        changed = k in UNET_KEYS and k != "dropout" and v != signature[k].default
        if k in _SHAPE_KEYS or changed or (k == "num_class_embeds" and v is not None):
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


def add_class_embedding(unet: UNet2DModel, num_classes: int) -> UNet2DModel:
    """The same network with a class embedding (num_classes + 1 rows; the last is the null class, for
    classifier-free guidance), every row zero: the embedding is added to the time embedding, so at the first step
    the model computes exactly what `unet` did, for any label, and training moves the rows apart from there.

    `unet` is unconditional; a new UNet2DModel is returned (its config says num_class_embeds), `unet` is unchanged."""
    if unet.config.num_class_embeds is not None or unet.config.class_embed_type is not None:
        raise ValueError("the UNet already has a class embedding")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    conditional = UNet2DModel(**{**config, "num_class_embeds": num_classes + 1})
    missing, unexpected = conditional.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"class_embedding.weight"}, (missing, unexpected)
    with torch.no_grad():
        conditional.class_embedding.weight.zero_()
    return conditional.to(device=unet.device, dtype=unet.dtype)
