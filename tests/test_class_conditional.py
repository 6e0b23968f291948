"""Class-conditional models with classifier-free guidance, end to end: labels from every source, training with label
dropout that resumes exactly, the guidance arithmetic, sampling per seed and label, the export that plain diffusers
loads, scores keyed by guidance scale and labels, a guidance sweep, and the bad inputs in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ddpm.config import DataConfig, load_config
from ddpm.data.cache import open_cache
from ddpm.data.shard_writer import write_shards
from ddpm.data.shards import ShardLoader, ShardOrder, open_shards
from ddpm.errors import UserError
from ddpm.sampling.guidance import guide, predict
from ddpm.training.loop import train
from tests.conftest import cli, tiny_overrides

COLORS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "emu": (40, 40, 200)}


def class_folder(root: Path, per_class: int = 3) -> Path:
    """ImageFolder layout: root/<class>/<image>, one colour per class (a nested folder belongs to its class)."""
    for name, colour in COLORS.items():
        (root / name / "more").mkdir(parents=True)
        for i in range(per_class):
            sub = root / name / ("more" if i == 0 else "")
            Image.new("RGB", (10, 10), colour).save(sub / f"{i}.png")
    return root


def quiet(cfg: DataConfig):
    return open_cache(cfg, show_progress=False)


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory, shared_cache) -> Path:
    """A 6-step class-conditional run of the tiny UNet on the digits (read-only)."""
    runs = tmp_path_factory.mktemp("cond") / "runs"
    cfg = load_config(None, tiny_overrides(runs, shared_cache, "model.num_classes=auto", name="cond"))
    train(cfg)
    return cfg.run_dir


# --------------------------------------------------------------------------------------
# Labels from every source.


def test_digits_cache_carries_the_ten_digit_labels_under_its_own_key(tmp_path):
    from sklearn.datasets import load_digits

    plain = quiet(DataConfig(resolution=8, cache_dir=str(tmp_path)))
    labelled = quiet(DataConfig(resolution=8, cache_dir=str(tmp_path), labels=True))
    assert plain.labels is None and plain.class_names is None
    assert labelled.path != plain.path, "the labels are part of the cache key"
    assert labelled.class_names == [str(d) for d in range(10)]
    assert labelled.labels.dtype == np.int32 and np.array_equal(labelled.labels, load_digits().target)
    assert np.array_equal(labelled.take(np.arange(5)), plain.take(np.arange(5)))


def test_a_split_build_and_the_batch_order_carry_the_labels(tmp_path):
    from ddpm.data.batches import BatchLoader, BatchOrder
    from ddpm.data.cache import build_parts, finish_build, load_cache, plan_cache

    whole = quiet(DataConfig(resolution=8, cache_dir=str(tmp_path / "one"), labels=True, shard_size=500))
    cfg = DataConfig(resolution=8, cache_dir=str(tmp_path / "two"), labels=True, shard_size=500)
    root = tmp_path / "two"
    plan = plan_cache(cfg, root)
    for rank in (1, 0):  # two processes' parts (0, 2 and 1, 3), in either order
        build_parts(cfg, root / plan["build"], rank, 2, show_progress=False)
    assert finish_build(cfg, root, plan)
    split = load_cache(root / plan["content"])
    assert np.array_equal(split.labels, whole.labels) and split.meta["num_shards"] == 4
    order = BatchOrder(len(split), 16, seed=3)
    loader = BatchLoader(split, order, epoch=0, batch=5, pin_memory=False)
    try:
        position, images, labels = next(loader)
    finally:
        loader.close()
    assert position == (0, 5) and labels.dtype == torch.int64
    assert labels.tolist() == whole.labels[BatchOrder(len(split), 16, seed=3).indices(0, 5)].tolist()


def test_a_class_folder_layout_gives_sorted_class_names_and_labels_and_a_warm_start_lists_nothing(
    tmp_path, monkeypatch
):
    folder = class_folder(tmp_path / "pets")
    cfg = DataConfig(source="folder", path=str(folder), resolution=4, cache_dir=str(tmp_path / "c"), labels=True)
    cache = quiet(cfg)
    assert cache.class_names == ["cat", "dog", "emu"]
    images = cache.take(np.arange(len(cache)))
    for image, label in zip(images, cache.labels):  # each label names the colour of its class
        assert np.abs(image.astype(int) - COLORS[cache.class_names[label]]).max() <= 1
    assert sorted(np.bincount(cache.labels).tolist()) == [3, 3, 3]
    import ddpm.data.cache as cache_module

    monkeypatch.setattr(cache_module, "list_source", lambda cfg: pytest.fail("a warm start listed the source"))
    warm = quiet(cfg)
    assert warm.path == cache.path and np.array_equal(warm.labels, cache.labels)


def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path):
    """Jupyter's .ipynb_checkpoints copies and macOS's ._ files beside the classes are left out, with or without
    labels (they stopped a labelled run with a KeyError, and an unlabelled one trained on the copies)."""
    folder = class_folder(tmp_path / "pets")
    for hidden in (folder / ".ipynb_checkpoints", folder / "cat" / ".ipynb_checkpoints"):
        hidden.mkdir()
        Image.new("RGB", (4, 4), (9, 9, 9)).save(hidden / "0-checkpoint.png")
    Image.new("RGB", (4, 4), (9, 9, 9)).save(folder / "dog" / "._0.png")
    labelled = quiet(
        DataConfig(source="folder", path=str(folder), resolution=4, cache_dir=str(tmp_path / "c"), labels=True)
    )
    assert labelled.class_names == ["cat", "dog", "emu"] and len(labelled) == 9
    plain = quiet(DataConfig(source="folder", path=str(folder), resolution=4, cache_dir=str(tmp_path / "c")))
    assert len(plain) == 9


def test_hf_label_column_with_class_label_names(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "kind": datasets.ClassLabel(names=["red", "green"])})
    ds = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (255, 0, 0))], "kind": [0, 1, 0]},
        features=features,
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(
        source="hf", path=str(tmp_path / "ds"), resolution=8, cache_dir=str(tmp_path / "c"), labels=True,
        label_column="kind",
    )  # fmt: skip
    cache = quiet(cfg)
    assert cache.class_names == ["red", "green"] and cache.labels.tolist() == [0, 1, 0]


def test_prepare_writes_cls_members_and_the_stream_carries_them(tmp_path):
    folder = class_folder(tmp_path / "pets", per_class=4)
    conf = tmp_path / "train.yaml"
    conf.write_text(
        yaml.safe_dump(
            {"data": {"source": "folder", "path": str(folder), "shard_size": 3}, "model": {"num_classes": 3}}
        )
    )
    r = cli("prepare", "--config", str(conf), "--format", "webdataset", "--out", str(tmp_path / "shards"))
    assert r.returncode == 0, r.stderr
    index = json.loads((tmp_path / "shards" / "shards.json").read_text())
    assert index["class_names"] == ["cat", "dog", "emu"]
    import tarfile

    with tarfile.open(tmp_path / "shards" / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert names[:2] == ["000000000.png", "000000000.cls"]  # WebDataset: one key, an image and its class
        assert tar.extractfile("000000000.cls").read() == b"0"
    cfg = DataConfig(source="webdataset", path=str(tmp_path / "shards"), resolution=4, labels=True)
    shards = open_shards(cfg)
    loader = ShardLoader(shards, ShardOrder(shards.counts, 4, seed=0), cfg, 0, 0, pin_memory=False)
    try:
        for _ in range(3):
            _, images, labels = next(loader)
            for image, label in zip(images.numpy(), labels.tolist()):
                assert np.abs(image.astype(int) - COLORS[index["class_names"][label]]).max() <= 1
    finally:
        loader.close()


# --------------------------------------------------------------------------------------
# Training.


def test_a_conditional_run_resumes_to_the_same_weights_labels_and_dropout_included(tiny):
    from safetensors.torch import load_file

    extra = ("model.num_classes=10", "train.label_dropout=0.5")
    straight = load_config(None, tiny(*extra, name="straight"))
    train(straight)
    resumed = load_config(None, tiny(*extra, "train.stop_after=3", name="resumed"))
    assert train(resumed) is None
    train(load_config(None, tiny(*extra, name="resumed")))
    for name in ("unet", "ema"):
        a = load_file(straight.run_dir / "checkpoints" / "step-00000006" / f"{name}.safetensors")
        b = load_file(resumed.run_dir / "checkpoints" / "step-00000006" / f"{name}.safetensors")
        assert "class_embedding.weight" in a and all(torch.equal(a[k], b[k]) for k in a)
    assert load_config(straight.run_dir / "config.yaml").model.num_classes == 10


def test_label_dropout_uses_the_null_class_at_the_given_rate():
    from ddpm.training.labels import drop_labels

    labels = torch.arange(10).repeat(1000)
    dropped = drop_labels(labels, 10, 0.1, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert set(dropped[dropped != labels].tolist()) == {10}
    assert abs((dropped == 10).float().mean().item() - 0.1) < 0.01
    assert torch.equal(drop_labels(labels, 10, 0.0, torch.device("cpu"), torch.Generator()), labels)


# --------------------------------------------------------------------------------------
# Guidance and sampling.


class Recorder(torch.nn.Module):
    """A stand-in UNet whose prediction is its class label (broadcast), recording each call's labels."""

    def __init__(self):
        super().__init__()
        self.calls: list[list[int]] = []

    def forward(self, x, t, class_labels=None):
        self.calls.append(class_labels.tolist())
        return type("Out", (), {"sample": class_labels.float().view(-1, 1, 1, 1).expand_as(x).clone()})()


def test_guidance_scale_one_is_the_conditional_pass_alone_and_zero_the_unconditional_one():
    x, labels = torch.zeros(2, 1, 2, 2), torch.tensor([3, 7])
    unet = Recorder()
    assert torch.equal(predict(unet, x, 0, labels, 1.0, null=10)[:, 0, 0, 0], torch.tensor([3.0, 7.0]))
    assert unet.calls == [[3, 7]]  # one pass, no unconditional half
    unet.calls.clear()
    assert torch.equal(predict(unet, x, 0, labels, 0.0, null=10)[:, 0, 0, 0], torch.tensor([10.0, 10.0]))
    assert unet.calls == [[10, 10]]
    unet.calls.clear()
    guided = predict(unet, x, 0, labels, 3.0, null=10)[:, 0, 0, 0]
    assert unet.calls == [[3, 7, 10, 10]], "both halves in one batched forward"
    assert torch.allclose(guided, 10 + 3.0 * (torch.tensor([3.0, 7.0]) - 10))
    assert torch.equal(guide(torch.tensor(2.0), torch.tensor(1.0), 1.5), torch.tensor(2.5))


def test_an_image_is_a_function_of_its_seed_label_and_scale_whatever_the_batch(cond_run):
    from ddpm.models.export import load_pipeline
    from ddpm.sampling.sample import generate, make_sampler

    pipe = load_pipeline(cond_run / "pipeline")
    for name in ("sde-dpmsolver++", "heun"):
        sampler = make_sampler(name, pipe.scheduler)
        together = generate(pipe.unet, sampler, [5, 6, 7], 3, 3, labels=[1, 2, 1], guidance_scale=2.0)
        alone = [generate(pipe.unet, sampler, [s], 3, 1, labels=[c], guidance_scale=2.0) for s, c in
                 ((5, 1), (6, 2), (7, 1))]  # fmt: skip
        assert np.abs(together.astype(int) - np.concatenate(alone).astype(int)).max() <= 1
        other_label = generate(pipe.unet, sampler, [5], 3, 1, labels=[2], guidance_scale=2.0)
        other_scale = generate(pipe.unet, sampler, [5], 3, 1, labels=[1], guidance_scale=1.0)
        assert not np.array_equal(other_label, alone[0]) and not np.array_equal(other_scale, alone[0])


@pytest.mark.parametrize("name", ["ddpm", "euler-ancestral", "dpmsolver-singlestep", "kdpm2", "pndm", "unipc"])
def test_guided_sampling_runs_with_every_kind_of_sampler(cond_run, name):
    from ddpm.models.export import load_pipeline
    from ddpm.sampling.sample import generate, make_sampler

    pipe = load_pipeline(cond_run / "pipeline")
    images = generate(pipe.unet, make_sampler(name, pipe.scheduler), [0, 1], 3, 2, labels=[0, 9], guidance_scale=2.0)
    assert images.shape == (2, 8, 8, 3)


def test_sample_cli_takes_names_and_ids_and_writes_a_row_per_class(cond_run, tmp_path):
    out = tmp_path / "s"
    r = cli("sample", "--pipeline", str(cond_run / "pipeline"), "--steps", "2", "--num-images", "4",
            "--label", "3", "--label", "7", "--guidance-scale", "2", "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    settings = json.loads((out / "settings.json").read_text())
    assert settings["image_labels"] == [3, 7, 3, 7] and settings["guidance_scale"] == 2.0
    r = cli("sample", "--pipeline", str(cond_run / "pipeline"), "--steps", "2", "--num-images", "20",
            "--out", str(tmp_path / "grid"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "grid" / "settings.json").read_text())["image_labels"][:11] == [*range(10), 0]
    grid = Image.open(tmp_path / "grid" / "grid.png")
    assert grid.height > grid.width  # ten rows (one per class) of two images


# --------------------------------------------------------------------------------------
# The export, in plain diffusers, and the model card's code.


def test_the_export_loads_and_samples_with_plain_diffusers_as_the_model_card_says(cond_run, tmp_path):
    from diffusers import DiffusionPipeline

    from ddpm.models.export import load_pipeline
    from ddpm.publishing.hub import check_pipeline, model_card, pipeline_files
    from ddpm.sampling.sample import generate

    export = cond_run / "pipeline"
    assert json.loads((export / "model_index.json").read_text())["_class_name"] == [
        "pipeline",
        "ClassConditionalDDPMPipeline",
    ]
    assert Path("pipeline.py") in pipeline_files(export) and check_pipeline(export) == "ClassConditionalDDPMPipeline"
    card = model_card(export, "someone/tiny-digits-cond")
    assert "10 classes, `0`, `1`" in card and "class-conditional" in card
    code = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert "trust_remote_code=True" in code
    scope: dict = {}
    exec(code.replace('"someone/tiny-digits-cond"', repr(str(export))), scope)  # plain diffusers, as a user runs it
    assert len(scope["images"]) == 4 and scope["images"][0].mode == "L"
    # the same seeds, labels and scale give this project's images
    pipe = DiffusionPipeline.from_pretrained(export, trust_remote_code=True)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    theirs = pipe(class_labels=["4", 2], guidance_scale=2.0, num_inference_steps=3, generator=gens, output_type="np")
    ours = load_pipeline(export)
    mine = generate(ours.unet, ours.scheduler, [0, 1], 3, 2, labels=[4, 2], guidance_scale=2.0)
    assert np.abs(np.round(theirs.images[..., 0] * 255).astype(int) - mine[..., 0].astype(int)).max() <= 1


def test_an_unconditional_export_stays_a_plain_ddpm_pipeline(tiny_run):
    index = json.loads((tiny_run / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and not (tiny_run / "pipeline" / "pipeline.py").exists()


# --------------------------------------------------------------------------------------
# Evaluation, sweeps, compare.


def test_evaluate_scores_class_balanced_samples_with_class_accuracy_keyed_by_scale(cond_run, tmp_path, monkeypatch):
    import shutil

    from ddpm.evaluation.scores import read_scores

    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "ddpm"))
    run = tmp_path / "runs" / "cond"
    shutil.copytree(cond_run, run)
    for scale in ("1", "2"):
        r = cli("evaluate", "--pipeline", str(run / "pipeline"), "--metric", "digitsnet", "--num-images", "20",
                "--steps", "2", "--guidance-scale", scale, "--no-wandb")  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert "class_accuracy:" in r.stdout and f"guidance {scale}" in r.stdout
    rows = [r for r in read_scores(run) if r.get("source") == "evaluate"]
    assert sorted(r["guidance_scale"] for r in rows) == [1.0, 2.0], "two scores: the scale is part of the key"
    assert all(r["labels"] == "balanced" and 0 <= r["class_accuracy"] <= 1 for r in rows)
    page = tmp_path / "compare.html"
    assert cli("compare", str(run), "--out", str(page)).returncode == 0
    assert "Class-conditional scores" in page.read_text() and "class accuracy" in page.read_text()


def test_a_guidance_sweep_has_a_cell_per_scale_and_plots_the_score_against_it(cond_run, tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "ddpm"))
    conf = tmp_path / "guidance.yaml"
    conf.write_text(yaml.safe_dump({
        "models": [{"pipeline": str(cond_run / "pipeline")}], "schedulers": ["ddim"], "steps": [2],
        "class_guidance_scales": [1.0, 3.0], "num_images": 20, "metric": "digitsnet", "reference": "digits",
        "out_dir": str(tmp_path / "sweeps"), "tracking": {"wandb": False},
    }))  # fmt: skip
    r = cli("sweep", "--config", str(conf))
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "sweeps" / "guidance" / "results.json").read_text())
    assert [r["cell"].rsplit("-", 1)[1] for r in rows] == ["cfg1", "cfg3"]
    assert [r["guidance_scale"] for r in rows] == [1.0, 3.0] and all("class_accuracy" in r for r in rows)
    assert (tmp_path / "sweeps" / "guidance" / "guidance-plot.png").is_file()


def test_sweep_labels_go_to_the_class_conditional_models_only_and_are_checked_before_any_cell(
    cond_run, tiny_run, tmp_path, monkeypatch
):
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "ddpm"))
    conf = tmp_path / "mixed.yaml"
    tree = {
        "models": [{"pipeline": str(tiny_run / "pipeline")}, {"pipeline": str(cond_run / "pipeline")}],
        "schedulers": ["ddim"], "steps": [2], "num_images": 4, "metric": "none", "labels": ["zz"],
        "out_dir": str(tmp_path / "sweeps"), "name": "mixed", "tracking": {"wandb": False},
    }  # fmt: skip
    conf.write_text(yaml.safe_dump(tree))
    r = cli("sweep", "--config", str(conf))
    one_line_error(r, "labels (model", "'zz' is not a class of the model")
    assert not (tmp_path / "sweeps" / "mixed" / "cells").exists()  # refused at planning, before the first cell
    conf.write_text(yaml.safe_dump({**tree, "labels": ["3"]}))
    r = cli("sweep", "--config", str(conf))
    assert r.returncode == 0, r.stderr  # the unconditional model was swept too, without labels
    rows = json.loads((tmp_path / "sweeps" / "mixed" / "results.json").read_text())
    assert len(rows) == 2 and [r.get("labels") for r in rows] == [None, "3"]


# --------------------------------------------------------------------------------------
# Bad input: one line naming the culprit, exit status 2.


def one_line_error(r, *needles):
    assert r.returncode == 2, (r.stdout, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert all(n in last for n in needles), last


def test_bad_labels_and_guidance_fail_in_one_line(cond_run, tiny_run, tmp_path):
    sample = ("sample", "--steps", "2", "--num-images", "2", "--out", str(tmp_path / "x"))
    one_line_error(cli(*sample, "--pipeline", str(cond_run / "pipeline"), "--label", "cat"), "'cat'", "classes: 0, 1")
    one_line_error(cli(*sample, "--pipeline", str(cond_run / "pipeline"), "--label", "12"), "label 12", "out of range")
    one_line_error(cli(*sample, "--pipeline", str(tiny_run / "pipeline"), "--guidance-scale", "2"), "unconditional")
    one_line_error(cli(*sample, "--pipeline", str(tiny_run / "pipeline"), "--label", "3"), "unconditional")
    cond = str(cond_run / "pipeline")
    scores = cond_run / "scores.jsonl"
    scored = scores.read_text() if scores.exists() else ""
    for scale in ("nan", "inf", "-1"):  # NaN sampled black images, exited 0 and wrote NaN into scores.jsonl
        one_line_error(cli(*sample, "--pipeline", cond, "--guidance-scale", scale), "--guidance-scale", "non-negative")
        evaluate = ("evaluate", "--pipeline", cond, "--num-images", "2", "--guidance-scale", scale, "--no-wandb")
        one_line_error(cli(*evaluate), "--guidance-scale", "non-negative")
        one_line_error(cli("generate", "--model", cond, "--guidance-scale", scale), "--guidance-scale", "non-negative")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
    assert (scores.read_text() if scores.exists() else "") == scored  # no score was added


def test_bad_label_sources_fail_in_one_line(tiny, tmp_path):
    folder = class_folder(tmp_path / "pets")
    Image.new("RGB", (10, 10)).save(folder / "loose.png")
    base = ("train", *tiny("model.num_classes=auto", "data.source=folder", f"data.path={folder}"))
    one_line_error(cli(*base), "loose.png", "top level")
    (folder / "loose.png").unlink()
    (folder / "fox").mkdir()
    one_line_error(cli(*base), f"{folder / 'fox'}", "holds no image")
    (folder / "fox").rmdir()
    one_line_error(cli("train", *tiny("model.num_classes=2", "data.source=folder", f"data.path={folder}",
                                      "train.batch_size=4")),
                   "model.num_classes=2", "label 2 is out of range")  # fmt: skip
    import datasets

    datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 2}).save_to_disk(str(tmp_path / "ds"))
    hf = ("model.num_classes=auto", "data.source=hf", f"data.path={tmp_path / 'ds'}")
    one_line_error(cli("train", *tiny(*hf)), "data.label_column")
    one_line_error(cli("train", *tiny(*hf, "data.label_column=kind")), "'kind' is not a column")
    one_line_error(
        cli("train", *tiny("train.sample_guidance_scale=2")), "train.sample_guidance_scale", "class-conditional model"
    )
    no_dropout = ("model.num_classes=10", "train.label_dropout=0", "train.sample_guidance_scale=2")
    one_line_error(cli("train", "--dry-run", *tiny(*no_dropout)), "train.label_dropout=0", "never learns")
    with pytest.raises(UserError, match="no class names"):
        write_shards(
            DataConfig(source="folder", path=str(folder), shard_size=4), tmp_path / "plain", show_progress=False
        )
        open_shards(DataConfig(source="webdataset", path=str(tmp_path / "plain"), labels=True))
