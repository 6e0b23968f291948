"""Starting from a pretrained pipeline (model.init_from): its weights, config, schedule and provenance; the
conflicts and mismatches as one-line errors; resume without the base; an unconditional base made conditional."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import load_file

from ddpm.data.batches import BatchLoader, BatchOrder, to_model_input
from ddpm.data.cache import open_cache
from ddpm.errors import ConfigError
from ddpm.models.checkpoint import sha256_file
from ddpm.models.schedule import NoiseProcess
from ddpm.models.unet import add_class_embedding
from ddpm.training.ema import EMA
from ddpm.training.loop import train
from jobs.train import load
from tests import tiny_pipelines
from tests.conftest import TINY_MODEL, cli

FREE_OF_MODEL = [  # tiny_overrides without its model keys: a fine-tuning run takes the base's
    "train.max_steps=2",
    "train.log_every=1",
]


def finetune(tiny, base: Path | str, *extra: str, name: str = "ft") -> list[str]:
    """A fine-tuning run's overrides: the tiny run's, without model.* (the base's config is the model)."""
    return [o for o in tiny(*FREE_OF_MODEL, name=name) if o not in TINY_MODEL] + [f"model.init_from={base}", *extra]


def test_the_base_config_is_the_model_and_the_run_records_it(tiny, tiny_run):
    base = tiny_run / "pipeline"
    cfg = load(None, [*finetune(tiny, base), "data.resolution=16"])  # the resolution is free (with a warning)
    base_unet = json.loads((base / "unet" / "config.json").read_text())
    for key in ("block_out_channels", "down_block_types", "layers_per_block", "attention_head_dim", "norm_eps"):
        assert (list if isinstance(base_unet[key], list) else type(base_unet[key]))(getattr(cfg.model, key)) == (
            base_unet[key]
        )
    assert cfg.model.init_from == str(base.resolve())
    assert cfg.model.init_hash == sha256_file(base / "unet" / "diffusion_pytorch_model.safetensors")
    assert cfg.data.channels == 1 and cfg.data.resolution == 16
    assert load(None, finetune(tiny, base)).data.resolution == 8, "the resolution defaults to the UNet's sample_size"


def test_the_schedule_comes_from_the_base_scheduler(tiny, tmp_path):
    base = tiny_pipelines.unconditional(tmp_path / "base")  # 3 channels, 8 px, the linear DDPM schedule
    cfg = load(None, [o for o in finetune(tiny, base) if not o.startswith("data.")] + [f"data.cache_dir={tmp_path}"])
    assert (cfg.schedule.beta_schedule, cfg.schedule.num_train_timesteps) == ("linear", 1000)
    assert cfg.data.image_channels == 3 and cfg.data.resolution == 8


@pytest.mark.parametrize(
    "extra, message",
    [
        (["model.layers_per_block=2"], "model.layers_per_block=2 disagrees with {base}'s layers_per_block=1"),
        (["schedule.beta_schedule=linear"], "schedule.beta_schedule='linear' disagrees with {base}'s beta_schedule"),
        (["data.channels=3"], "data.channels=3 but {base}'s UNet takes 1 channels"),
        (["model.init_revision=main"], "model.init_revision='main': model.init_from="),
        (["model.init_hash=deadbeef"], "model.init_hash=deadbeef but model.init_from="),
    ],
    ids=["model", "schedule", "channels", "revision-of-a-path", "hash"],
)
def test_conflicts_with_the_base_are_one_line_errors(tiny, tiny_run, extra, message):
    base = tiny_run / "pipeline"
    result = cli("train", "--dry-run", *finetune(tiny, base, *extra))
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("ddpm train: error: ") and message.format(base=base.resolve()) in error, error


def test_a_text_to_image_pipeline_is_refused(tiny, tmp_path):
    base = tiny_pipelines.text_to_image(tmp_path / "sd")
    result = cli("train", "--dry-run", *finetune(tiny, base))
    assert result.returncode == 2
    assert "is a StableDiffusionPipeline whose unet is UNet2DConditionModel" in result.stderr.strip().splitlines()[-1]


def fake_hub_cache(cache: Path, repo_id: str, pipeline: Path, commit: str = "ab" * 20) -> str:
    """The Hugging Face cache's layout for one snapshot of `repo_id` (what `hf download` leaves)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(pipeline, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return commit


def test_a_hub_id_from_the_offline_cache_records_its_commit(tiny, tiny_run, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    commit = fake_hub_cache(tmp_path / "hub", "me/tiny-digits", tiny_run / "pipeline")
    cfg = load(None, finetune(tiny, "me/tiny-digits@main"))
    assert (cfg.model.init_from, cfg.model.init_revision, cfg.model.init_hash) == ("me/tiny-digits", "main", commit)
    assert train(cfg) == cfg.run_dir / "pipeline"
    recorded = yaml.safe_load((cfg.run_dir / "config.yaml").read_text())["model"]
    assert (recorded["init_from"], recorded["init_hash"]) == ("me/tiny-digits", commit)
    from ddpm.publishing.hub import model_card

    card = model_card(cfg.run_dir / "pipeline", "me/tiny-letters")
    assert "base_model: me/tiny-digits" in card
    assert f"Fine-tuned from [me/tiny-digits](https://huggingface.co/me/tiny-digits) at commit `{commit}`" in card
    # not cached, offline: the one-line error that says how to fill the cache
    result = cli("train", "--dry-run", *finetune(tiny, "me/elsewhere", name="other"))
    assert result.returncode == 2
    assert "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in result.stderr
    assert "`hf download me/elsewhere`" in result.stderr.strip().splitlines()[-1]


def first_batch_loss(cfg, unet: UNet2DModel) -> float:
    """The loss the loop's first step computes, with `unet`: the same batch, noise and timesteps (rank 0's stream
    of ddpm.training.loop, one process, fp32)."""
    from ddpm.models.schedule import build_scheduler

    cache = open_cache(cfg.data)
    loader = BatchLoader(cache, BatchOrder(len(cache), cfg.train.batch_size, cfg.seed, 0, 1), 0, 0, False)
    try:
        _, images, _ = next(loader)
    finally:
        loader.close()
    device = torch.device("cpu")
    generator = torch.Generator(device).manual_seed(int(np.random.SeedSequence([cfg.seed, 0]).generate_state(1)[0]))
    noise = NoiseProcess(build_scheduler(cfg.schedule), device)
    x0 = to_model_input(images, device, cfg.data.random_flip, generator)
    eps = torch.randn(x0.shape, device=device, generator=generator)
    t = noise.sample_timesteps(x0.shape[0], device, generator)
    with torch.no_grad():
        return F.mse_loss(unet(noise.add_noise(x0, eps, t), t).sample, noise.target(x0, eps, t)).item()


def test_a_fine_tuning_run_starts_from_the_base_weights(tiny, tiny_run):
    cfg = load(None, finetune(tiny, tiny_run / "pipeline", "train.max_steps=1"))
    train(cfg)
    logged = json.loads((cfg.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    base = DDPMPipeline.from_pretrained(tiny_run / "pipeline").unet.eval()
    assert logged["step"] == 1
    assert logged["loss"] == pytest.approx(first_batch_loss(cfg, base), rel=1e-5)
    torch.manual_seed(0)
    scratch = UNet2DModel(**{k: v for k, v in base.config.items() if not k.startswith("_")}).eval()
    assert abs(first_batch_loss(cfg, scratch) - logged["loss"]) > 1e-3, "random weights would score another loss"


def test_the_ema_starts_from_the_base_and_a_class_embedding_from_zero(tiny_run):
    from ddpm.config import load_config
    from ddpm.training.setup import start_from_base

    cfg = load_config(tiny_run / "config.yaml")
    base = DDPMPipeline.from_pretrained(tiny_run / "pipeline").unet
    cfg.model.init_from, cfg.model.init_hash = str(tiny_run / "pipeline"), ""
    config = {k: v for k, v in base.config.items() if not k.startswith("_")}
    # the seam of class-conditional fine-tuning: the run's UNet has a class embedding, its base has none
    unet = UNet2DModel(**{**config, "num_class_embeds": 4})
    ema = EMA(unet.parameters(), max_decay=0.999, power=0.75)
    start_from_base(unet, ema, cfg.model)
    by_name = dict(zip([n for n, _ in unet.named_parameters()], ema.shadow))
    assert all(torch.equal(by_name[n], p) for n, p in base.named_parameters())
    assert not by_name["class_embedding.weight"].any()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([1, 10, 100, 999])
    unet.eval()  # as the base: train mode may take another attention kernel, equal only to ~1e-6
    with torch.no_grad():
        assert torch.equal(unet(x, t, class_labels=torch.tensor([0, 1, 2, 3])).sample, base(x, t).sample)


def test_add_class_embedding_computes_what_the_base_did_at_step_0(tiny_run):
    base = DDPMPipeline.from_pretrained(tiny_run / "pipeline").unet.eval()
    conditional = add_class_embedding(base, num_classes=10).eval()
    assert conditional.config.num_class_embeds == 11  # the null class (for guidance) is the last index, 10
    assert conditional.class_embedding.weight.shape[0] == 11 and not conditional.class_embedding.weight.any()
    x, t = torch.randn(11, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(0, 1000, 91)
    with torch.no_grad():
        expected = base(x, t).sample
        assert torch.equal(conditional(x, t, class_labels=torch.arange(11)).sample, expected)
    with pytest.raises(ValueError, match="already has a class embedding"):
        add_class_embedding(conditional, 10)


def test_resume_restores_its_own_checkpoint_without_the_base(tiny, tiny_run, tmp_path):
    base = shutil.copytree(tiny_run / "pipeline", tmp_path / "base")
    overrides = finetune(tiny, base, "train.max_steps=4", "train.checkpoint_every=2")
    cfg = load(None, [*overrides, "train.stop_after=2"])
    assert train(cfg) is None
    shutil.rmtree(base)  # gone: a resume reads the run's own config.yaml and checkpoint
    resumed = load(None, overrides)
    assert resumed.model == cfg.model and resumed.schedule == cfg.schedule
    assert train(resumed) == cfg.run_dir / "pipeline"
    straight = load(None, finetune(tiny, tiny_run / "pipeline", "train.max_steps=4", name="straight"))
    train(straight)
    for name in ("unet", "ema"):  # 2 steps + resume + 2 steps == 4 steps straight
        a, b = (load_file(r.run_dir / "checkpoints" / "step-00000004" / f"{name}.safetensors") for r in (cfg, straight))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    other = cli("train", "--dry-run", *finetune(tiny, tiny_run / "pipeline", "train.max_steps=4"))
    assert other.returncode == 2 and "was started from" in other.stderr.strip().splitlines()[-1]


def test_a_checkpoint_of_a_run_is_a_base_with_its_ema_weights(tiny, tiny_run):
    ckpt = tiny_run / "checkpoints" / "step-00000003"
    cfg = load(None, finetune(tiny, ckpt))
    assert cfg.model.init_hash == sha256_file(ckpt / "ema.safetensors")
    from safetensors.torch import load_file

    from ddpm.models.base import load_base_weights

    weights, ema = load_base_weights(cfg.model), load_file(ckpt / "ema.safetensors")
    assert weights.keys() == ema.keys() and all(torch.equal(weights[k], ema[k]) for k in ema)


def test_a_base_with_an_inexpressible_schedule_or_channels_is_refused(tiny, tmp_path):
    from ddpm.models.base import base_values, resolve_base

    path = tiny_pipelines.unconditional(tmp_path / "base")
    config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "trained_betas": [0.1] * 1000}))
    with pytest.raises(ConfigError, match="its scheduler sets trained_betas"):
        base_values(resolve_base(str(path)))
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8,), norm_num_groups=8,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",))  # fmt: skip
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "latent")
    with pytest.raises(ConfigError, match="takes 4 and predicts 4 channels"):
        base_values(resolve_base(str(tmp_path / "latent")))


def test_the_glyphs_of_the_fine_tuning_measurement_are_the_same_for_the_same_seed(tmp_path):
    from PIL import Image

    from bench.glyphs import render_glyphs

    a, b = render_glyphs(tmp_path / "a", count=3, seed=1), render_glyphs(tmp_path / "b", count=3, seed=1)
    images = [np.asarray(Image.open(p)) for p in a]
    assert all(im.shape == (16, 16) and im.min() < 100 < 200 < im.max() for im in images)  # dark letter, light ground
    assert all(np.array_equal(x, np.asarray(Image.open(y))) for x, y in zip(images, b))


def test_an_unconditional_base_fine_tunes_into_a_class_conditional_model(tiny, tiny_run):
    """model.init_from + model.num_classes: the base's weights, a zero class embedding, so the first step's loss is
    the base's on the same batch, noise and timesteps (whatever labels, dropped or not); the export is conditional."""
    cfg = load(None, finetune(tiny, tiny_run / "pipeline", "model.num_classes=10", "train.max_steps=1"))
    train(cfg)
    logged = json.loads((cfg.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    base = DDPMPipeline.from_pretrained(tiny_run / "pipeline").unet.eval()
    assert logged["loss"] == pytest.approx(first_batch_loss(cfg, base), rel=1e-5)
    unet = json.loads((cfg.run_dir / "pipeline" / "unet" / "config.json").read_text())
    assert unet["num_class_embeds"] == 11


def test_a_base_with_damaged_weights_is_a_one_line_error(tiny, tiny_run, tmp_path):
    base = tmp_path / "damaged"
    shutil.copytree(tiny_run / "pipeline", base)
    weights = base / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # a download or copy cut short
    result = cli("train", *finetune(tiny, base))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert f"model.init_from={base.resolve()}: cannot read the weights of" in error, error


def test_a_run_directory_as_the_base_names_its_export_and_checkpoints(tiny, tiny_run):
    result = cli("train", "--dry-run", *finetune(tiny, tiny_run))
    error = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and f"give its export {tiny_run.resolve() / 'pipeline'}" in error, error
