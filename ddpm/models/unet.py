"""The denoiser: a diffusers UNet2DModel built from the model section of the config."""

from __future__ import annotations

from diffusers import UNet2DModel

from ddpm.config import ModelConfig


def build_unet(cfg: ModelConfig, resolution: int, channels: int = 3) -> UNet2DModel:
    """channels: 1 for grey images (data.channels), 3 for RGB. A class-conditional model (cfg.num_classes, resolved
    to a number by then) gets UNet2DModel's class embedding, added to the timestep embedding, with one more entry
    than classes: the last is the null class that stands for "no label" (classifier-free guidance)."""
    if not isinstance(cfg.num_classes, int):
        raise ValueError("model.num_classes must be resolved to a number before the UNet is built")
    return UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=cfg.block_out_channels,
        down_block_types=cfg.down_block_types,
        up_block_types=cfg.up_block_types,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
        dropout=cfg.dropout,
        num_class_embeds=cfg.num_classes + 1 if cfg.num_classes else None,
    )


def num_classes_of(unet: UNet2DModel) -> int:
    """The classes a UNet was trained on (its class embedding less the null class); 0 for an unconditional one."""
    embeds = unet.config.get("num_class_embeds")
    return embeds - 1 if embeds else 0


def architecture(unet: UNet2DModel) -> dict:
    """The config entries that decide the shapes of the weights: what a checkpoint must match."""
    keys = (
        "sample_size",
        "in_channels",
        "out_channels",
        "layers_per_block",
        "block_out_channels",
        "down_block_types",
        "up_block_types",
        "attention_head_dim",
        "norm_num_groups",
        "num_class_embeds",
    )
    # None (an unconditional model) is left out, so that the checkpoints of earlier versions still match
    return {k: list(v) if isinstance(v, tuple) else v for k, v in unet.config.items() if k in keys and v is not None}
