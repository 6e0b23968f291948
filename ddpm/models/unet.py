"""The denoiser: a diffusers UNet2DModel built from the model section of the config."""

from __future__ import annotations

from diffusers import UNet2DModel

from ddpm.config import ModelConfig


def build_unet(cfg: ModelConfig, resolution: int, channels: int = 3) -> UNet2DModel:
    """channels: 1 for grey images (data.channels), 3 for RGB."""
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
    )


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
    )
    return {k: list(v) if isinstance(v, tuple) else v for k, v in unet.config.items() if k in keys}
