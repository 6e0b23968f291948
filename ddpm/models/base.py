"""The pretrained base a run starts from (`model.init_from`): a Hub id, a pipeline directory, or a run's
checkpoint or export, resolved to its UNet's config, its noise schedule, its weights and a hash that names them.

The base's config is the model: the run's `model.*` and `schedule.*` keys default to the base's, and one given
beside `init_from` that disagrees with it is a one-line error naming both values; `data.resolution` defaults to
the UNet's `sample_size` (another size works for these convolutional UNets, with a warning), and the data's
channels must be the UNet's. The hash (Hub commit, or the SHA-256 of the weights file) goes into the run's config,
so the run says what it started from and every later launch loads exactly that.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddpm.config import DataConfig, ModelConfig, ScheduleConfig
from ddpm.errors import ConfigError, UserError
from ddpm.typed_config import build_config

log = logging.getLogger(__name__)

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SCHEDULE_KEYS = tuple(f for f in ScheduleConfig.__dataclass_fields__)
# Keys of a diffusers scheduler config that this project's schedule cannot express when set.
_INEXPRESSIBLE_SCHEDULE = ("trained_betas",)


@dataclass
class Base:
    source: str  # the Hub id, or the absolute path of the pipeline or checkpoint directory
    kind: str  # "hub", "pipeline" or "checkpoint"
    path: Path  # the local directory it was read from: the Hub snapshot, the pipeline, the checkpoint
    unet_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    hash: str  # the Hub commit, or the SHA-256 of the weights file

    def describe(self) -> str:
        if self.kind == "hub":
            return f"{self.source} at commit {self.hash}"
        return f"{self.source} (weights SHA-256 {self.hash})"


def split_init_from(init_from: str, revision: str = "") -> tuple[str, str]:
    """(source, revision): a local path as an absolute path and no revision; a Hub id without its `@revision`, and
    the revision from there or from model.init_revision (both given and different: a one-line error)."""
    path = Path(init_from).expanduser()
    # A Hub id is owner/name: anything else that names a path is one, even where it is gone (a resume needs no base).
    if path.exists() or init_from.startswith(("/", ".", "~")) or init_from.partition("@")[0].count("/") > 1:
        if revision:
            raise ConfigError(f"model.init_revision={revision!r}: model.init_from={init_from!r} is a local path")
        return str(path.resolve()), ""
    repo_id, _, at = init_from.partition("@")
    if at and revision and at != revision:
        raise ConfigError(
            f"model.init_from={init_from!r} names revision {at!r} but model.init_revision={revision!r}: give one"
        )
    if repo_id.count("/") != 1 or not all(repo_id.split("/")) or not (path.is_absolute() or repo_id[0].isalnum()):
        raise ConfigError(
            f"model.init_from={init_from!r} is neither a local directory nor a Hub id (owner/name[@revision])"
        )
    return repo_id, at or revision


def resolve_base(init_from: str, revision: str = "", expect_hash: str = "", weights: bool = False) -> Base:
    """The base `init_from` names, read without loading its weights. A Hub id is fetched into (or, offline, read
    from) the Hugging Face cache: model_index.json and the unet's and scheduler's configs, and with `weights` the
    unet's weights too. expect_hash: the hash a run recorded; a Hub id is then fetched at that commit, and a local
    base whose weights changed is a one-line error."""
    source, revision = split_init_from(init_from, revision)
    if Path(source).is_dir() and (Path(source) / "manifest.json").is_file():
        base = _checkpoint_base(Path(source))
    elif Path(source).is_dir():
        base = _pipeline_base(Path(source), "pipeline", source, _weights_sha256)
    elif Path(source).exists():
        raise ConfigError(f"model.init_from={init_from!r}: a file, not a pipeline or checkpoint directory")
    elif Path(source).is_absolute():
        raise ConfigError(f"model.init_from={init_from!r}: no such directory")
    else:
        snapshot = _fetch(source, expect_hash or revision, weights)
        base = _pipeline_base(snapshot, "hub", source, lambda unet_dir: snapshot.name)
    if expect_hash and base.hash != expect_hash:
        raise ConfigError(
            f"model.init_hash={expect_hash} but model.init_from={init_from!r} is now {base.hash}: the base changed "
            "since the run recorded it (give the new hash, or another name= for a new run)"
        )
    return base


def _fetch(repo_id: str, revision: str, weights: bool) -> Path:
    """The snapshot of the pipeline's files in the Hugging Face cache, after checking (from model_index.json
    alone) that it is a UNet2DModel pipeline, so a text-to-image model is refused before anything else downloads.
    Without `weights` only the JSON configs: a launch (or --dry-run) resolves its config without the weights."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        index = hf_hub_download(repo_id, "model_index.json", revision=revision or None)
        _check_index(Path(index), repo_id)
        return Path(
            snapshot_download(
                repo_id,
                revision=revision or None,
                allow_patterns=["model_index.json", "scheduler/*", "unet/*" if weights else "unet/config.json"],
            )
        )
    except ConfigError:
        raise
    except Exception as e:  # offline and not cached, unknown repo or revision, no access
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shown = f"{repo_id}@{revision}" if revision else repo_id
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise ConfigError(
                f"model.init_from={shown}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; on a "
                f"machine with network run `hf download {repo_id}` (same HF_HOME), or give a local directory"
            ) from None
        raise ConfigError(f"model.init_from={shown}: cannot fetch it ({type(e).__name__}: {first})") from None


def _check_index(index: Path, shown: str) -> None:
    """A pipeline whose `unet` is a diffusers UNet2DModel and that has a scheduler; anything else in one line."""
    try:
        meta = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.init_from={shown}: unreadable model_index.json ({e})") from None
    unet = meta.get("unet") or [None, None]
    if list(unet) != ["diffusers", "UNet2DModel"] or "scheduler" not in meta:
        raise ConfigError(
            f"model.init_from={shown} is a {meta.get('_class_name', 'pipeline')} whose unet is {unet[1] or 'absent'}:"
            " only pipelines of an unconditional UNet2DModel (DDPMPipeline, DDIMPipeline, ...) can be trained here"
        )


def _pipeline_base(path: Path, kind: str, source: str, hash_of) -> Base:
    if not (path / "model_index.json").is_file():
        hint = ""
        if (path / "config.yaml").is_file():  # a run directory: its export, or one of its checkpoints
            hint = f"; a training run: give its export {path / 'pipeline'} or a checkpoint in {path / 'checkpoints'}"
        raise ConfigError(
            f"model.init_from={source}: not a pipeline directory (no model_index.json) nor a checkpoint "
            f"(no manifest.json){hint}"
        )
    _check_index(path / "model_index.json", source)
    try:
        unet_config = json.loads((path / "unet" / "config.json").read_text())
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.init_from={source}: unreadable unet or scheduler config ({e})") from None
    return Base(source, kind, path, unet_config, scheduler_config, hash_of(path / "unet"))


def _weights_sha256(unet_dir: Path) -> str:
    from ddpm.models.checkpoint import sha256_file

    for name in WEIGHT_FILES:
        if (unet_dir / name).is_file():
            return sha256_file(unet_dir / name)
    raise ConfigError(f"model.init_from={unet_dir.parent}: no UNet weights in {unet_dir} ({', '.join(WEIGHT_FILES)})")


def _checkpoint_base(path: Path) -> Base:
    """A run's checkpoint: its EMA weights (what its export would hold) on its run's model and schedule."""
    from ddpm.errors import UserError
    from ddpm.models.checkpoint import sha256_file
    from ddpm.models.export import pipeline_from_checkpoint

    try:
        pipe = pipeline_from_checkpoint(path)
    except UserError as e:
        raise ConfigError(f"model.init_from: {e}") from None
    unet = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    scheduler = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    return Base(str(path), "checkpoint", path, unet, scheduler, sha256_file(path / "ema.safetensors"))


def base_values(base: Base) -> dict[str, dict[str, Any]]:
    """The base's config as the run's keys: {"model": ..., "schedule": ..., "data": {resolution, channels}}. Keys
    its config.json leaves out take UNet2DModel's (and the scheduler's) defaults, as diffusers loads them."""
    from diffusers import DDPMScheduler, UNet2DModel

    from ddpm.models.unet import UNET_KEYS

    u, shown = base.unet_config, base.source
    unet_defaults = {k: p.default for k, p in inspect.signature(UNet2DModel.__init__).parameters.items()}
    if u.get("num_class_embeds") is not None:
        raise ConfigError(
            f"model.init_from={shown} is class-conditional (num_class_embeds={u['num_class_embeds']}): "
            "start from an unconditional UNet"
        )
    channels, out = u.get("in_channels", 3), u.get("out_channels", 3)
    if channels != out or channels not in (1, 3):
        raise ConfigError(
            f"model.init_from={shown}: its UNet takes {channels} and predicts {out} channels; "
            "training here needs 1 (grey) or 3 (RGB) in and out"
        )
    model = {k: u.get(k, unet_defaults[k]) for k in UNET_KEYS}
    model.update(init_from=base.source, init_hash=base.hash)
    for key in _INEXPRESSIBLE_SCHEDULE:
        if base.scheduler_config.get(key) is not None:
            raise ConfigError(f"model.init_from={shown}: its scheduler sets {key}, which schedule.* cannot express")
    sched_defaults = {k: p.default for k, p in inspect.signature(DDPMScheduler.__init__).parameters.items()}
    schedule = {k: base.scheduler_config.get(k, sched_defaults[k]) for k in SCHEDULE_KEYS}
    data: dict[str, Any] = {"channels": channels}
    size = u.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ConfigError(f"model.init_from={shown}: its sample_size {size} is not square")
        size = size[0]
    if size:
        data["resolution"] = size
    return {"model": model, "schedule": schedule, "data": data}


def recorded_values(run_config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What a run recorded of its base in config.yaml, in the shape of base_values: a resume reads these instead of
    the base, so it works where the base is gone and never loads the base's weights."""
    from ddpm.models.unet import UNET_KEYS

    model = {k: run_config["model"][k] for k in (*UNET_KEYS, "init_from", "init_hash") if k in run_config["model"]}
    data = {k: run_config["data"][k] for k in ("resolution", "channels")}
    return {"model": model, "schedule": dict(run_config.get("schedule", {})), "data": data}


# The keys a run may set to something else than its base: dropout regularises training and is absent at
# sampling; model.init_from/init_revision are how the base is named.
_FREE = {("model", "dropout"), ("model", "init_from"), ("model", "init_revision"), ("data", "resolution")}
_SECTIONS = {"model": ModelConfig, "schedule": ScheduleConfig, "data": DataConfig}


def apply_base(tree: dict[str, Any], values: dict[str, dict[str, Any]], shown: str) -> dict[str, Any]:
    """The config tree with the base's values where the tree leaves them out; a key it gives that disagrees with
    the base is a one-line error naming both values. `shown`: the base as the messages name it."""
    out = copy.deepcopy(tree)
    for section, base in values.items():
        given_tree = out.setdefault(section, {})
        if not isinstance(given_tree, dict):
            continue  # build_config names the mistake
        cls = _SECTIONS[section]
        given = build_config(cls, {k: v for k, v in given_tree.items() if k in base}, prefix=f"{section}.")
        theirs = build_config(cls, base, prefix=f"{shown}: ")
        for key in base:
            if key not in given_tree:
                given_tree[key] = base[key]
                continue
            mine, its = getattr(given, key), getattr(theirs, key)
            if (section, key) == ("data", "resolution") and mine != its:
                log.warning(
                    "data.resolution=%s: %s was trained at %s px; its convolutions run at any size, but expect a "
                    "few hundred steps of adaptation",
                    mine,
                    shown,
                    its,
                )
            elif (section, key) == ("model", "init_hash") and mine and mine != its:
                raise ConfigError(f"model.init_hash={mine} but {shown} is {its}: the base changed since it was given")
            elif (section, key) == ("model", "init_hash") and not mine:
                given_tree[key] = base[key]
            elif (section, key) == ("data", "channels") and mine not in (0, its):
                raise ConfigError(f"data.channels={mine} but {shown}'s UNet takes {its} channels")
            elif (section, key) == ("data", "channels"):
                given_tree[key] = its
            elif (section, key) not in _FREE and mine != its:
                raise ConfigError(f"{section}.{key}={mine!r} disagrees with {shown}'s {key}={its!r}; leave it out")
    return out


def load_base_weights(model: ModelConfig) -> dict[str, torch.Tensor]:
    """The UNet weights of the base a resolved config names (model.init_from at model.init_hash), on the CPU:
    through diffusers for pipelines (which converts the attention names of old checkpoints such as Google's),
    the EMA weights of a checkpoint."""
    from diffusers import UNet2DModel
    from safetensors import SafetensorError

    base = resolve_base(model.init_from, model.init_revision, expect_hash=model.init_hash, weights=True)
    try:
        if base.kind == "checkpoint":
            from safetensors.torch import load_file

            return load_file(base.path / "ema.safetensors")
        return UNet2DModel.from_pretrained(base.path / "unet").state_dict()
    except (OSError, ValueError, SafetensorError) as e:  # a truncated or damaged weights file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.init_from={model.init_from}: cannot read the weights of {base.path}: {reason}") from e


def resolve_init(tree: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """The config tree of a run with model.init_from filled in from its base (apply_base), the base named as
    recorded: a Hub id without @revision (the revision in model.init_revision) or an absolute path, and its hash.
    A run that has checkpoints takes the values its config.yaml recorded and does not touch the base."""
    import yaml

    model = tree.get("model")
    if not isinstance(model, dict) or not model.get("init_from"):
        return tree
    source, revision = split_init_from(str(model["init_from"]), str(model.get("init_revision") or ""))
    checkpoints = run_dir / "checkpoints"
    if (run_dir / "config.yaml").is_file() and checkpoints.is_dir() and any(checkpoints.glob("step-*")):
        recorded = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        started = (recorded.get("model") or {}).get("init_from", "")
        if started != source:
            raise ConfigError(
                f"model.init_from={model['init_from']!r}, but the run {run_dir} was started from "
                f"{started or 'random weights'!r} and has checkpoints: give that, or another name="
            )
        values = recorded_values(recorded)
    else:
        values = base_values(resolve_base(source, revision, expect_hash=str(model.get("init_hash") or "")))
    out = apply_base(tree, values, source)
    out["model"]["init_from"] = source
    if revision:
        out["model"]["init_revision"] = revision
    return out
