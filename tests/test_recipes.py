"""Recipes of published models: configs/ddpm-cifar10.yaml builds the network of google/ddpm-cifar10-32 exactly,
held to a copy of its published config.json and scheduler config (tests/data/ddpm-cifar10-32/, README there)."""

from __future__ import annotations

import json

import pytest

from ddpm.config import load_config
from ddpm.errors import ConfigError
from ddpm.models.schedule import build_scheduler
from ddpm.models.unet import build_unet
from tests.conftest import ROOT

PUBLISHED = ROOT / "tests" / "data" / "ddpm-cifar10-32"


def test_the_cifar10_recipe_is_the_published_network_with_35_7_m_parameters():
    cfg = load_config(ROOT / "configs" / "ddpm-cifar10.yaml")
    unet = build_unet(cfg.model, cfg.data.resolution, cfg.data.image_channels, cfg.schedule.num_train_timesteps)
    assert sum(p.numel() for p in unet.parameters()) == 35_746_307  # "35.7 million parameters" (appendix B)
    published = json.loads((PUBLISHED / "config.json").read_text())
    for key, value in published.items():
        if not key.startswith("_"):
            ours = unet.config[key]
            assert (list(ours) if isinstance(ours, tuple) else ours) == value, key
    assert unet.mid_block.attentions[0].heads == 1  # attention_head_dim null: the original's single head
    scheduler = build_scheduler(cfg.schedule).config
    for key, value in json.loads((PUBLISHED / "scheduler_config.json").read_text()).items():
        if not key.startswith("_"):
            assert scheduler[key] == value, key
    # and the paper's training recipe (appendix B)
    o, t = cfg.optim, cfg.train
    assert (o.lr, o.weight_decay, o.warmup_steps, o.lr_schedule, o.grad_clip, o.ema_decay) == (
        2e-4, 0.0, 5000, "constant", 1.0, 0.9999
    )  # fmt: skip
    assert (t.batch_size, t.max_steps, cfg.model.dropout, cfg.data.random_flip) == (128, 800_000, 0.1, True)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.norm_eps=0", "model.norm_eps must be positive"),
        ("model.attention_head_dim=0", "model.attention_head_dim must be positive or null"),
        ("model.attn_norm_num_groups=7", "model.attn_norm_num_groups=7 does not divide"),
        ("model.downsample_padding=-1", "model.downsample_padding must be non-negative"),
        ("model.time_embedding_type=sinusoid", "model.time_embedding_type: 'sinusoid' is not one of"),
        ("model.class_embed_type=timestep", "model.class_embed_type='timestep' embeds class labels"),
        ("model.init_revision=main", "model.init_revision='main' needs model.init_from"),
    ],
)
def test_the_model_section_is_validated_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, [override])


def test_every_unet_argument_builds_what_it_says():
    cfg = load_config(
        None,
        [
            "model.attention_head_dim=null",
            "model.resnet_time_scale_shift=scale_shift",
            "model.time_embedding_type=learned",
            "model.time_embedding_dim=64",
            "model.downsample_type=resnet",
            "model.upsample_type=resnet",
            "model.mid_block_type=null",
            "model.act_fn=mish",
        ],
    )
    unet = build_unet(cfg.model, 16, 1, num_train_timesteps=500)
    assert unet.time_embedding.linear_1.out_features == 64 and unet.time_proj.num_embeddings == 500
    assert unet.mid_block is None and unet.config.act_fn == "mish"
    assert type(unet.down_blocks[1].downsamplers[0]).__name__ == "ResnetBlock2D"  # AttnDownBlock2D honours it
    assert unet.config.resnet_time_scale_shift == "scale_shift"


def test_fine_tuning_google_s_cifar10_model_takes_the_recipe_s_network_and_schedule():
    """model.init_from=google/ddpm-cifar10-32 reads these two files: the run's model and schedule are the recipe's."""
    from pathlib import Path

    from ddpm.models.base import Base, apply_base, base_values
    from ddpm.typed_config import build_config
    from jobs.train import TrainJobConfig

    base = Base(
        "google/ddpm-cifar10-32",
        "hub",
        Path("."),
        json.loads((PUBLISHED / "config.json").read_text()),
        json.loads((PUBLISHED / "scheduler_config.json").read_text()),
        "c" * 40,
    )
    tree = {"model": {"init_from": "google/ddpm-cifar10-32"}, "data": {"source": "hf", "path": "uoft-cs/cifar10"}}
    cfg = build_config(TrainJobConfig, apply_base(tree, base_values(base), base.source))
    recipe = load_config(ROOT / "configs" / "ddpm-cifar10.yaml")
    for key in ("block_out_channels", "down_block_types", "up_block_types", "attention_head_dim", "norm_eps",
                "flip_sin_to_cos", "freq_shift", "downsample_padding", "layers_per_block"):  # fmt: skip
        assert getattr(cfg.model, key) == getattr(recipe.model, key), key
    assert cfg.schedule == recipe.schedule and (cfg.data.resolution, cfg.data.channels) == (32, 3)
