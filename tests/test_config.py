"""The config: YAML < dotted overrides, strict keys and types, range checks that name the key."""

from __future__ import annotations

import pytest
import yaml

from ddpm.config import Config, dump_yaml, load_config
from ddpm.errors import ConfigError
from tests.conftest import ROOT


def test_defaults_are_the_embedded_default_run():
    cfg = load_config()
    assert cfg.data.source == "digits"
    assert cfg.run_name == "digits-16px"
    assert str(cfg.run_dir) == "runs/digits-16px"


def test_the_digits_demo_is_the_defaults_at_its_own_learning_rate():
    """make train's config: the defaults but optim.lr, which is the demo's and not every run's (docs/benchmarks.md,
    "Divergence": 1.6e-3 diverged on the tutorial UNet over colour photographs, the default 4e-4 did not)."""
    demo = load_config(ROOT / "configs" / "digits-16px.yaml")
    assert demo == load_config(None, ["optim.lr=1.6e-3"]) and demo.run_name == "digits-16px"
    assert load_config().optim.lr == 4e-4
    assert "CONFIG ?= configs/digits-16px.yaml" in (ROOT / "Makefile").read_text()


def test_yaml_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\ntrain:\n  batch_size: 8\n  epochs: 2\noptim:\n  lr: 1e-4\n")
    cfg = load_config(path, ["train.batch_size=4", "model.block_out_channels=[32,64,64]", "optim.betas=[0.9,0.99]"])
    assert cfg.seed == 3 and cfg.train.epochs == 2
    assert cfg.train.batch_size == 4
    assert cfg.optim.lr == pytest.approx(1e-4)  # YAML reads "1e-4" as a string; the float field takes it
    assert cfg.model.block_out_channels == (32, 64, 64)
    assert cfg.optim.betas == (0.9, 0.99)


def test_dump_round_trips():
    cfg = load_config(None, ["train.batch_size=4", "tracking.tags=[a,b]"])
    again = load_config(None, [])
    tree = yaml.safe_load(dump_yaml(cfg))
    assert tree["train"]["batch_size"] == 4 and tree["tracking"]["tags"] == ["a", "b"]
    assert again != cfg


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("train.batchsize=4", "unknown key 'train.batchsize'"),
        ("trian.batch_size=4", "'trian'"),
        ("train.batch_size=four", "train.batch_size"),
        ("train.batch_size=1.5", "train.batch_size"),
        ("train.compile=yes please", "train.compile"),
        ("optim.lr=fast", "optim.lr"),
        ("schedule.beta_schedule=cosine", "schedule.beta_schedule"),
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("model.block_out_channels=32", "model.block_out_channels"),
        ("train", "key=value"),
        ("train=3", "train is a section"),
    ],
)
def test_unknown_keys_and_wrong_types_name_the_key(override, culprit):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert culprit in str(e.value)


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="valid keys: .*batch_size"):
        load_config(None, ["train.batchsize=4"])


def test_choices_are_listed():
    with pytest.raises(ConfigError, match="'linear'.*'squaredcos_cap_v2'"):
        load_config(None, ["schedule.beta_schedule=cosine"])


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("optim.lr=-1e-4", "optim.lr"),
        ("optim.lr=0", "optim.lr"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.grad_accum=0", "train.grad_accum"),
        ("data.resolution=18", "divisible by 4"),
        ("model.block_out_channels=[32,48,64]", "norm_num_groups"),
        ("model.down_block_types=[DownBlock2D,AttnDownBlock2D]", "model.down_block_types"),
        ("model.up_block_types=[UpBlock2D,Nope2D,UpBlock2D]", "'Nope2D'"),
        ("data.source=folder", "data.path"),
        ("train.sample_scheduler=magic", "train.sample_scheduler"),
        ("optim.ema_decay=1.5", "optim.ema_decay"),
        ("optim.eps=0", "optim.eps"),
        ("model.attention_head_dim=128", "model.attention_head_dim"),
        ("schedule.beta_start=0.5", "schedule.beta_start"),
        ("train.log_every=0", "train.log_every"),
        ("name=a/b", "name"),
    ],
)
def test_out_of_range_values_fail_before_work(override, culprit):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert culprit in str(e.value)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


@pytest.mark.parametrize("name", ["butterflies-32.yaml", "butterflies-64.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert isinstance(cfg, Config)
    assert cfg.data.source == "hf" and cfg.data.path == "huggan/smithsonian_butterflies_subset"


def test_butterflies_32_is_the_tutorial_recipe():
    cfg = load_config(ROOT / "configs" / "butterflies-32.yaml")
    assert (cfg.data.resolution, cfg.train.batch_size, cfg.train.epochs, cfg.optim.lr) == (32, 64, 30, 4e-4)
    assert cfg.schedule.beta_schedule == "squaredcos_cap_v2" and cfg.schedule.num_train_timesteps == 1000
    assert cfg.model.block_out_channels == (64, 128, 128, 256) and cfg.model.layers_per_block == 2
    assert cfg.model.down_block_types == ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    assert cfg.model.up_block_types == ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D")


def test_butterflies_64_is_the_larger_recipe():
    cfg = load_config(ROOT / "configs" / "butterflies-64.yaml")
    assert (cfg.data.resolution, cfg.train.batch_size, cfg.train.epochs, cfg.optim.lr) == (64, 32, 50, 1e-4)
    assert cfg.optim.warmup_steps == 500 and cfg.schedule.beta_schedule == "linear"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_name_their_run_after_the_file(path):
    """`make train CONFIG=configs/x.yaml` writes runs/x/, the directory the docs (and a queued upload) name."""
    assert load_config(path).run_name == path.stem
