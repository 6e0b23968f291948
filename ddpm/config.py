"""One typed config tree, loaded from YAML and overridden by dotted `key=value` arguments.

Precedence: command line > YAML > the defaults below. An unknown key, a wrong type or an
out-of-range value raises ConfigError naming the key before any work starts. The dataclass
defaults are the default run: the embedded digits dataset at 16 px, small enough to train
to recognisable samples on a 2-core CPU in minutes.

Long because it is the one place every key of a run is written, with its comment and its validation: the model
section alone is every argument of diffusers' UNet2DModel, so that a published architecture can be written down.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ddpm.errors import ConfigError
from ddpm.typed_config import build_config, dump_yaml, read_tree, to_dict

# The sampler every entry point uses unless told otherwise: the best measured in docs/benchmarks.md (1,000 images,
# two models, 5-50 steps): DDPM-1000's FD-digitsnet or better at 40x fewer model evaluations, where DDIM-25 is 5x
# worse. Stochastic: fresh noise at every step corrects the model's errors that an ODE solver integrates. The one
# place these defaults are written.
DEFAULT_SAMPLER, DEFAULT_STEPS = "sde-dpmsolver++", 25
# The samplers' names, for validating configs without importing diffusers; what each one is:
# ddpm.sampling.sample.SAMPLERS (a test keeps the two in step).
SAMPLER_NAMES = (
    "ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++", "dpmsolver-singlestep", "unipc", "deis", "euler",
    "euler-ancestral", "heun", "lms", "pndm", "kdpm2", "kdpm2-ancestral",
)  # fmt: skip
# "auto" means what ddpm.device.resolve_placement picks: one meaning for training, sampling and generation.
Precision = Literal["auto", "fp32", "bf16", "fp16"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]

__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "ScheduleConfig",
    "OptimConfig",
    "TrainConfig",
    "TrackingConfig",
    "load_config",
    "validate_config",
    "dump_yaml",
    "to_dict",
]


@dataclass
class DataConfig:
    source: Literal["digits", "folder", "hf", "webdataset"] = "digits"  # digits, image folder, HF dataset, or shards
    path: str = ""  # folder path, hub dataset name, a dataset saved with save_to_disk, or a folder of .tar shards
    split: str = "train"  # split of a Hugging Face dataset
    image_column: str = "image"  # column holding the images in a Hugging Face dataset
    resolution: int = 16  # side of the square training images, in pixels
    channels: Literal[0, 1, 3] = 0  # 1: grey, 3: RGB; 0: the source's (1 for the digits, 3 for folders and datasets)
    center_crop: bool = True  # crop to a centred square before resizing (else squash)
    random_flip: bool = False  # random horizontal flip per batch (off for digits: mirrored digits are not digits)
    on_bad_image: Literal["error", "skip"] = "error"  # corrupt file: stop naming it, or skip and count it
    cache_dir: str = ""  # decoded-image cache; "" means $DDPM_CACHE or ~/.cache/ddpm
    shard_size: int = 8192  # images per memory-mapped cache shard (and per part of a split cache build)
    refresh: bool = False  # list the source again although its folders' times are unchanged (a file rewritten in place)
    stage_dir: str = (
        ""  # node-local disk (e.g. $TMPDIR) to copy the cache to once per node at start; "" reads it in place
    )
    workers: int = 0  # decoding threads of the cache build and the stream per process; 0: the CPUs this process may use
    max_image_pixels: int = 89_478_485  # larger images are refused undecoded (PIL's decompression-bomb limit)
    # Class labels, one per image, beside the pixels in the cache: the digits' 0-9, a folder's first-level
    # subfolders (ImageFolder), a dataset's label_column, shards' .cls members. A class-conditional model
    # (model.num_classes) turns this on itself.
    labels: bool = False  # read the class labels of the source
    label_column: str = ""  # column holding the class labels in a Hugging Face dataset (a ClassLabel names them)

    @property
    def image_channels(self) -> int:
        """1 or 3: what the cache stores and the UNet takes and predicts."""
        return self.channels or (1 if self.source == "digits" else 3)

    @property
    def decode_threads(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))  # SLURM's --cpus-per-task binding, not the node's CPUs


@dataclass
class ModelConfig:
    # A pretrained UNet to start from (ddpm.models.base): its weights, its architecture (the keys below, which
    # then default to the base's and may only repeat them), its noise schedule and its sample_size as the default
    # data.resolution. "" starts from random weights.
    init_from: str = ""  # Hub id (owner/name or owner/name@revision), a pipeline directory, or a run's checkpoint
    init_revision: str = ""  # Hub branch, tag or commit of init_from; "" is main (or the @revision in init_from)
    init_hash: str = ""  # recorded at launch: the base's Hub commit, or the SHA-256 of its weights; given, must match
    # The rest are diffusers' UNet2DModel arguments under their own names and with its defaults, but for the first
    # six, which are this project's default model (1.7 M parameters at 16 px).
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # channels per level; all levels but the last halve the size
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")  # input side
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")  # output side
    layers_per_block: int = 2  # ResNet layers per UNet block
    attention_head_dim: int | None = 8  # channels per attention head; null: one head over all channels (Ho et al.)
    norm_num_groups: int = 32  # GroupNorm groups; must divide every entry of block_out_channels
    dropout: float = 0.0  # dropout in the ResNet blocks (a training setting: may differ from init_from's)
    mid_block_type: Literal["UNetMidBlock2D"] | None = "UNetMidBlock2D"  # null: no middle block (ResNets+attention)
    add_attention: bool = True  # attention in the middle block
    attn_norm_num_groups: int | None = None  # GroupNorm groups of the middle block's attention; null: see diffusers
    norm_eps: float = 1e-5  # GroupNorm epsilon (Google's DDPM checkpoints: 1e-6, as the TensorFlow original)
    act_fn: Literal["silu", "swish", "mish", "gelu", "relu"] = "silu"  # activation in the ResNet blocks
    resnet_time_scale_shift: Literal["default", "scale_shift"] = "default"  # scale_shift: FiLM (iDDPM, ADM)
    time_embedding_type: Literal["positional", "fourier", "learned"] = "positional"  # how t becomes a vector
    time_embedding_dim: int | None = None  # width of the time embedding; null: 4 x block_out_channels[0]
    flip_sin_to_cos: bool = True  # cos before sin in the sinusoidal embedding (Google's DDPM: false)
    freq_shift: int = 0  # frequency shift of the sinusoidal embedding (Google's DDPM: 1)
    center_input_sample: bool = False  # rescale the input x to 2x - 1 inside the model
    mid_block_scale_factor: float = 1.0  # output scale of the middle block's ResNets
    downsample_padding: int = 1  # padding of the downsampling convolutions (Google's DDPM: 0, padded asymmetrically)
    downsample_type: Literal["conv", "resnet"] = "conv"  # downsampling by strided convolution or a ResNet block (ADM)
    upsample_type: Literal["conv", "resnet"] = "conv"  # upsampling by interpolation + convolution or a ResNet block
    class_embed_type: Literal["timestep", "identity"] | None = None  # embedding of class labels added to the time
    # Class-conditional (classifier-free guidance, Ho & Salimans 2022): UNet2DModel's class embedding with
    # num_classes + 1 entries, the last the null class of an unconditional prediction (k-diffusion's convention).
    num_classes: int | Literal["auto"] = 0  # 0: unconditional; auto: the number of classes the data has


@dataclass
class ScheduleConfig:
    num_train_timesteps: int = 1000  # diffusion steps T of the forward process
    beta_schedule: BetaSchedule = "squaredcos_cap_v2"  # squaredcos_cap_v2: cosine (Nichol & Dhariwal 2021)
    beta_start: float = 0.0001  # first beta (linear schedules only)
    beta_end: float = 0.02  # last beta (linear schedules only)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"  # what the UNet predicts: the noise, or v
    variance_type: Literal["fixed_small", "fixed_large"] = "fixed_small"  # DDPM sampling: beta-tilde, or beta
    clip_sample: bool = True  # DDPM sampling clips the predicted x_0 to [-1, 1]


@dataclass
class OptimConfig:
    lr: float = 4e-4  # peak learning rate (AdamW), the tutorial's; 1.6e-3 diverged on its UNet over colour photos
    # at batch 16 (docs/benchmarks.md, "Divergence"); the digits demo (configs/digits-16px.yaml) takes 1.6e-3
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moment decays
    eps: float = 1e-8  # AdamW denominator epsilon
    warmup_steps: int = 100  # optimizer steps of linear warm-up
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # after warm-up
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    ema_decay: float = 0.9999  # upper bound of the EMA decay
    ema_power: float = 0.75  # EMA warm-up: decay = 1 - (1 + step) ** -power, capped at ema_decay
    # Post-hoc EMA (Karras et al. 2024, EDM2): power-function EMA profiles tracked beside the classic EMA, snapshotted
    # every train.ema_snapshot_every steps, from which `ddpm ema` reconstructs an EMA of any length after training.
    ema_profiles: tuple[float, ...] = (0.05, 0.10)  # their relative standard deviations sigma_rel; () turns them off
    loss_weighting: Literal["none", "min_snr"] = "none"  # min_snr: Hang et al. 2023's weight per timestep, from the
    # trained schedule: min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v prediction
    snr_gamma: float = 5.0  # gamma of min_snr (5, as the paper and diffusers' examples recommend)


@dataclass
class TrainConfig:
    batch_size: int = 64  # images per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    epochs: int = 80  # passes over the data; ignored when max_steps > 0
    max_steps: int = 0  # optimizer steps; 0 means epochs decide
    stop_after: int = 0  # leave (with a checkpoint) after this many steps in this launch; 0: run to the end
    mixed_precision: Precision = "auto"  # see ddpm.device.resolve_placement: bf16 where the hardware computes in it
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, ~30% slower
    compile: bool = False  # torch.compile the UNet
    log_every: int = 50  # optimizer steps between host syncs for loss/grad-norm logging
    checkpoint_every: int = 500  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    ema_snapshot_every: int = 500  # optimizer steps between snapshots of optim.ema_profiles (and one at the end);
    # never pruned: the reconstruction needs them all; 0: no snapshots
    ema_snapshot_dtype: Literal["fp16", "bf16"] = "fp16"  # snapshots' precision: fp16 keeps 3 more mantissa bits
    sample_every: int = 1000  # optimizer steps between sample grids; 0: only at the end
    sample_images: int = 64  # images in a sample grid (fixed seeds 0..n-1)
    sample_scheduler: str = DEFAULT_SAMPLER  # sampler for the grids (see ddpm.sampling.sample.SAMPLERS)
    sample_steps: int = DEFAULT_STEPS  # sampler steps for the grids
    # In-training evaluation: the EMA weights sampled with sample_scheduler/sample_steps and seeds 0..n-1 (the seeds
    # of `ddpm evaluate --seed 0`, so the two agree) and scored against the training data; logged as eval/<metric>.
    eval_every: int = 1000  # optimizer steps between evaluations (and one at the end); 0: off
    eval_images: int = 500  # images per evaluation, spread over all processes
    eval_metric: Literal["auto", "inception", "digitsnet"] = "auto"  # auto: FID/KID when the Inception weights are
    # on this machine (cache, DDPM_INCEPTION_WEIGHTS or the image's copy), else the offline FD/KD-digitsnet
    eval_reference_images: int = 10_000  # training images in the reference statistics (a fixed random subset)
    # When training breaks (ddpm.training.divergence; README, "When training diverges"): a loss that leaves its own
    # level and stays there, or a collapse to predicting zero noise.
    on_divergence: Literal["rollback", "stop", "warn"] = "rollback"  # rollback: back to the last good checkpoint,
    # past the batches that led there, at a lower learning rate; stop: a one-line error, exit status 2; warn: log it
    max_rollbacks: int = 3  # rollbacks in one run before on_divergence=rollback stops instead
    rollback_lr_factor: float = 0.5  # the learning rate is multiplied by this at each rollback
    max_nonfinite_steps: int = 10  # optimizer steps in a row with NaN/inf gradients (each skipped) that stop the run
    # A class-conditional model learns the unconditional prediction too, from the images whose label is replaced
    # by the null class: k-diffusion and DiT drop 10 %.
    label_dropout: float = 0.1  # fraction of training labels replaced by the null class
    sample_guidance_scale: float = 1.0  # classifier-free guidance of the grids and evaluations of a conditional model


@dataclass
class TrackingConfig:
    wandb: bool = True  # log to Weights & Biases (offline when no API key is set)
    project: str = "ddpm"  # W&B project
    entity: str = ""  # W&B team or user; "" uses the account default
    group: str = ""  # W&B group (the experiment); "" uses the run name
    tags: tuple[str, ...] = ()  # W&B tags


@dataclass
class Config:
    name: str = ""  # run directory name under runs_dir; "" derives it from the data and resolution
    runs_dir: str = "runs"  # parent of the run directories
    seed: int = 0  # seeds model init, data order, noise and timesteps
    data: DataConfig = field(default_factory=DataConfig)  # the dataset and its cache
    model: ModelConfig = field(default_factory=ModelConfig)  # the UNet
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # the noise schedule
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer, learning rate and EMA
    train: TrainConfig = field(default_factory=TrainConfig)  # the loop: batch, length, precision, outputs
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # Weights & Biases

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        base = {
            "digits": "digits",
            "folder": Path(self.data.path).name,
            "hf": self.data.path.rstrip("/").split("/")[-1],
            "webdataset": Path(self.data.path).name,
        }
        return f"{base[self.data.source] or 'data'}-{self.data.resolution}px"

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run_name


# --------------------------------------------------------------------------------------
# Loading and validating (the loading mechanism itself is ddpm.typed_config, shared by every job).


def is_guidance_scale(value: float) -> bool:
    """A classifier-free guidance scale: finite and non-negative (NaN or inf would sample black images and write
    NaN into the scores; a negative scale pushes away from the class asked for)."""
    return math.isfinite(value) and value >= 0


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), values: dict[str, Any] | None = None
) -> Config:
    """Build the training config from an optional YAML file, dotted `key=value` overrides and flag values, then
    validate it."""
    cfg = build_config(Config, read_tree(path, overrides, values))
    validate_config(cfg)
    return cfg


DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D", "AttnDownsampleBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D", "AttnUpsampleBlock2D")


def _validate_unet_extras(m: ModelConfig) -> None:
    """The UNet2DModel arguments beyond the shape of the levels: what diffusers would reject later, or silently
    build into something else, stopped here naming the key."""
    groups = m.attn_norm_num_groups
    need_mid = m.mid_block_type is not None and m.add_attention and groups is not None
    if need_mid and (groups < 1 or m.block_out_channels[-1] % groups):
        raise ConfigError(
            f"model.attn_norm_num_groups={groups} does not divide the middle block's "
            f"{m.block_out_channels[-1]} channels"
        )
    if m.norm_eps <= 0:
        raise ConfigError(f"model.norm_eps must be positive, got {m.norm_eps}")
    if m.time_embedding_dim is not None and m.time_embedding_dim < 1:
        raise ConfigError(f"model.time_embedding_dim must be positive or null, got {m.time_embedding_dim}")
    if m.downsample_padding < 0:
        raise ConfigError(f"model.downsample_padding must be non-negative, got {m.downsample_padding}")
    if m.mid_block_scale_factor <= 0:
        raise ConfigError(f"model.mid_block_scale_factor must be positive, got {m.mid_block_scale_factor}")
    # A class embedding needs class labels at every call; a run has them only when the model is class-conditional
    # (model.num_classes).
    if m.class_embed_type is not None and not m.num_classes:
        raise ConfigError(
            f"model.class_embed_type={m.class_embed_type!r} embeds class labels, but the model is unconditional "
            "(no class labels to embed)"
        )
    if m.init_revision and not m.init_from:
        raise ConfigError(f"model.init_revision={m.init_revision!r} needs model.init_from (the Hub id it revises)")


def validate_config(cfg: Config) -> None:
    """Range and consistency checks that the types alone cannot express; and the one key that follows another: a
    class-conditional model trains on labels, so model.num_classes turns data.labels on (it need not be said twice)."""
    if cfg.model.num_classes != 0:
        cfg.data.labels = True

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    d, m, o, t, s = cfg.data, cfg.model, cfg.optim, cfg.train, cfg.schedule
    need(d.source == "digits" or bool(d.path), f"data.path is required when data.source is {d.source!r}")
    need(d.resolution >= 8, f"data.resolution must be at least 8, got {d.resolution}")
    need(d.shard_size > 0, f"data.shard_size must be positive, got {d.shard_size}")
    need(d.workers >= 0, f"data.workers must be non-negative, got {d.workers}")
    levels = len(m.block_out_channels)
    need(levels >= 1, "model.block_out_channels needs at least one entry")
    need(
        len(m.down_block_types) == levels,
        f"model.down_block_types has {len(m.down_block_types)} entries, block_out_channels {levels}",
    )
    need(
        len(m.up_block_types) == levels,
        f"model.up_block_types has {len(m.up_block_types)} entries, block_out_channels {levels}",
    )
    for name in m.down_block_types:
        need(name in DOWN_BLOCKS, f"model.down_block_types: {name!r} is not one of {', '.join(DOWN_BLOCKS)}")
    for name in m.up_block_types:
        need(name in UP_BLOCKS, f"model.up_block_types: {name!r} is not one of {', '.join(UP_BLOCKS)}")
    for c in m.block_out_channels:
        need(
            c > 0 and c % m.norm_num_groups == 0,
            f"model.block_out_channels: {c} is not a positive multiple of model.norm_num_groups={m.norm_num_groups}",
        )
    factor = 2 ** (levels - 1)  # every level but the last halves the resolution
    need(
        d.resolution % factor == 0,
        f"data.resolution={d.resolution} is not divisible by {factor}, "
        f"the UNet's downsampling factor ({levels} levels)",
    )
    need(m.layers_per_block >= 1, f"model.layers_per_block must be at least 1, got {m.layers_per_block}")
    heads = m.attention_head_dim
    need(heads is None or heads >= 1, f"model.attention_head_dim must be positive or null, got {heads}")
    for c, name in zip(m.block_out_channels, m.down_block_types):
        need(
            "Attn" not in name or heads is None or heads <= c,
            f"model.attention_head_dim={m.attention_head_dim} exceeds the {c} channels of an attention level "
            "(no head would fit)",
        )
    need(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    need(
        m.num_classes == "auto" or m.num_classes >= 0,
        f"model.num_classes must be 0 (unconditional), a number of classes or auto, got {m.num_classes}",
    )
    _validate_unet_extras(m)
    need(s.num_train_timesteps >= 2, f"schedule.num_train_timesteps must be at least 2, got {s.num_train_timesteps}")
    need(
        0 < s.beta_start < s.beta_end < 1,
        f"schedule.beta_start and beta_end must satisfy 0 < start < end < 1, got {s.beta_start}, {s.beta_end}",
    )
    need(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    need(o.weight_decay >= 0, f"optim.weight_decay must be non-negative, got {o.weight_decay}")
    need(all(0 <= b < 1 for b in o.betas), f"optim.betas must lie in [0, 1), got {o.betas}")
    need(o.eps > 0, f"optim.eps must be positive, got {o.eps}")
    need(o.warmup_steps >= 0, f"optim.warmup_steps must be non-negative, got {o.warmup_steps}")
    need(o.grad_clip >= 0, f"optim.grad_clip must be non-negative, got {o.grad_clip}")
    need(0 <= o.ema_decay < 1, f"optim.ema_decay must be in [0, 1), got {o.ema_decay}")
    need(o.ema_power > 0, f"optim.ema_power must be positive, got {o.ema_power}")
    for sigma_rel in o.ema_profiles:  # EDM2 eq. 123: a power function's sigma_rel lies below sqrt(1/12) = 0.289
        need(0 < sigma_rel < 0.289, f"optim.ema_profiles: {sigma_rel} is not in (0, 0.289)")
    need(len(set(o.ema_profiles)) == len(o.ema_profiles), f"optim.ema_profiles has duplicates: {o.ema_profiles}")
    need(o.snr_gamma > 0, f"optim.snr_gamma must be positive, got {o.snr_gamma}")
    need(t.batch_size > 0, f"train.batch_size must be positive, got {t.batch_size}")
    need(t.grad_accum > 0, f"train.grad_accum must be positive, got {t.grad_accum}")
    need(t.epochs > 0 or t.max_steps > 0, "train.epochs or train.max_steps must be positive")
    need(t.max_steps >= 0, f"train.max_steps must be non-negative, got {t.max_steps}")
    need(t.stop_after >= 0, f"train.stop_after must be non-negative, got {t.stop_after}")
    for key in ("log_every", "checkpoint_every", "keep_checkpoints", "sample_images", "sample_steps"):
        need(getattr(t, key) > 0, f"train.{key} must be positive, got {getattr(t, key)}")
    need(t.sample_every >= 0, f"train.sample_every must be non-negative, got {t.sample_every}")
    need(t.ema_snapshot_every >= 0, f"train.ema_snapshot_every must be non-negative, got {t.ema_snapshot_every}")
    need(t.eval_every >= 0, f"train.eval_every must be non-negative, got {t.eval_every}")
    need(
        t.eval_every == 0 or t.eval_images >= 2,
        f"train.eval_images: FID/KID need at least 2 images, got {t.eval_images}",
    )
    need(t.max_rollbacks >= 0, f"train.max_rollbacks must be non-negative, got {t.max_rollbacks}")
    need(0 < t.rollback_lr_factor <= 1, f"train.rollback_lr_factor must be in (0, 1], got {t.rollback_lr_factor}")
    need(0.0 <= t.label_dropout < 1.0, f"train.label_dropout must be in [0, 1), got {t.label_dropout}")
    need(
        is_guidance_scale(t.sample_guidance_scale),
        f"train.sample_guidance_scale must be a non-negative number, got {t.sample_guidance_scale}",
    )
    need(
        m.num_classes != 0 or t.sample_guidance_scale == 1.0,
        f"train.sample_guidance_scale={t.sample_guidance_scale}: guidance needs a class-conditional model "
        "(model.num_classes)",
    )
    need(
        t.label_dropout > 0 or t.sample_guidance_scale == 1.0,
        f"train.sample_guidance_scale={t.sample_guidance_scale} with train.label_dropout=0: guidance mixes in the "
        "unconditional prediction, which a model trained without dropped labels never learns",
    )
    need(t.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps must be at least 1, got {t.max_nonfinite_steps}")
    need(t.eval_reference_images >= 2, f"train.eval_reference_images must be at least 2, got {t.eval_reference_images}")
    need(
        t.sample_scheduler in SAMPLER_NAMES,
        f"train.sample_scheduler: {t.sample_scheduler!r} is not one of {', '.join(SAMPLER_NAMES)}",
    )
    need(
        "/" not in cfg.run_name and cfg.run_name not in (".", ".."),
        f"name: {cfg.run_name!r} is not a valid directory name",
    )
