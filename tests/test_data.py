"""Specification of ddpm/data/cache.py: the decoded-image cache, its sources, and batch serving.

Every image is generated here with PIL/numpy into tmp_path and every cache lives under tmp_path,
so the tests need no network and leave nothing behind.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from ddpm.config import DataConfig
from ddpm.data.batches import BatchLoader, BatchOrder, to_model_input
from ddpm.data.cache import BadImageError, ImageCache, decode_image, open_cache
from ddpm.errors import UserError

BIG = 10**9  # max_pixels for direct decode_image calls that must not trip the bomb guard


# --------------------------------------------------------------------------------------
# Helpers.


@pytest.fixture(autouse=True)
def _restore_pil_globals():
    """open_cache sets PIL's process-wide limits; keep one test's limits out of the next."""
    pixels, truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    yield
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = pixels, truncated


def folder_cfg(tmp_path, folder, **kw) -> DataConfig:
    kw.setdefault("resolution", 8)
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return DataConfig(source="folder", path=str(folder), **kw)


def open_quiet(cfg: DataConfig) -> ImageCache:
    return open_cache(cfg, show_progress=False)


def solid(color, size=(16, 16), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def make_folder(path, images: dict[str, Image.Image]):
    path.mkdir(parents=True, exist_ok=True)
    for name, im in images.items():
        im.save(path / name)
    return path


def distinct_colors(n: int) -> list[tuple[int, int, int]]:
    return [(17 * i % 256, 255 - 23 * i % 256, 40 + 9 * i % 200) for i in range(n)]


def random_image(rng, size=(12, 12)) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def only_image(
    tmp_path, im: Image.Image, name: str, resolution: int = 8, save_kw: dict | None = None, **kw
) -> np.ndarray:
    """Cache a folder holding this one image and return the cached (res, res, 3) array."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    im.save(folder / name, **(save_kw or {}))
    cache = open_quiet(folder_cfg(tmp_path, folder, resolution=resolution, **kw))
    assert len(cache) == 1
    out = cache.take(np.array([0]))[0]
    assert out.shape == (resolution, resolution, 3) and out.dtype == np.uint8
    return out


def near(pixels: np.ndarray, color, tol: int = 6) -> bool:
    return bool(np.all(np.abs(pixels.reshape(-1, 3).astype(int) - np.array(color)) <= tol))


def png_bytes(tmp_path, name="src.png") -> bytes:
    p = tmp_path / name
    random_image(np.random.default_rng(0), (24, 24)).save(p)
    return p.read_bytes()


# --------------------------------------------------------------------------------------
# 1. The embedded digits.


@pytest.fixture(scope="module")
def digits_cfg(tmp_path_factory) -> DataConfig:
    cfg = DataConfig(source="digits", resolution=8, cache_dir=str(tmp_path_factory.mktemp("digits-cache")))
    open_cache(cfg, show_progress=False)  # built once for the module
    return cfg


def test_digits_cache_has_1797_grey_uint8_images_at_resolution(digits_cfg):
    cache = open_quiet(digits_cfg)
    assert len(cache) == 1797 and cache.meta["count"] == 1797
    assert cache.resolution == 8 and cache.channels == 1  # data.channels 0: the digits' own, grey
    images = cache.take(np.arange(1797))
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
    assert sum(s.shape[0] for s in cache.shards) == 1797
    assert all(s.shape[1:] == (8, 8, 1) and s.dtype == np.uint8 for s in cache.shards)
    # Grey ink on white paper: the blank border white, the strokes dark.
    assert images[:, 0, 0].min() == 255
    assert images.min() == 0


def test_channels_3_caches_the_digits_as_rgb_with_equal_channels_under_another_key(digits_cfg, tmp_path):
    grey = open_quiet(digits_cfg)
    rgb = open_quiet(dataclasses.replace(digits_cfg, channels=3, cache_dir=str(tmp_path)))  # beside it: other tests
    assert rgb.path.name != grey.path.name and rgb.channels == 3  # count the directories of digits_cfg's cache
    images = rgb.take(np.arange(20))
    assert images.shape == (20, 8, 8, 3)
    assert np.array_equal(images[..., 0], images[..., 2]) and np.array_equal(images[..., :1], grey.take(np.arange(20)))


def test_a_folder_of_colour_images_cached_grey_is_the_luma(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(folder / "red.png")
    cfg = DataConfig(source="folder", path=str(folder), resolution=8, channels=1, cache_dir=str(tmp_path / "c"))
    images = open_quiet(cfg).take(np.arange(1))
    assert images.shape == (1, 8, 8, 1) and images[0, 0, 0, 0] == 76  # ITU-R 601: 0.299 * 255
    assert open_quiet(dataclasses.replace(cfg, channels=0)).channels == 3  # a folder's own: RGB


def test_digits_second_open_reuses_cache_dir_without_rewriting_memmapped_shards(digits_cfg):
    first = open_quiet(digits_cfg)
    shard_files = sorted(first.path.glob("shard-*.npy"))
    assert len(shard_files) == first.meta["num_shards"] >= 1
    mtimes = {p: p.stat().st_mtime_ns for p in shard_files}
    meta_mtime = (first.path / "meta.json").stat().st_mtime_ns

    second = open_quiet(digits_cfg)
    assert second.path == first.path
    assert {p: p.stat().st_mtime_ns for p in sorted(second.path.glob("shard-*.npy"))} == mtimes
    assert (second.path / "meta.json").stat().st_mtime_ns == meta_mtime
    assert all(isinstance(s, np.memmap) for s in second.shards)
    assert np.array_equal(first.take(np.arange(0, 1797, 97)), second.take(np.arange(0, 1797, 97)))
    # Only the one cache directory exists: nothing was built beside it.
    assert [p for p in first.path.parent.iterdir() if p.is_dir()] == [first.path]


# --------------------------------------------------------------------------------------
# 2. The cache key.


@pytest.fixture
def three_images(tmp_path):
    return make_folder(tmp_path / "three", {f"{i}.png": solid(c, (16, 12)) for i, c in enumerate(distinct_colors(3))})


def test_same_config_opens_same_cache_dir(tmp_path, three_images):
    assert open_quiet(folder_cfg(tmp_path, three_images)).path == open_quiet(folder_cfg(tmp_path, three_images)).path


def test_cache_key_changes_with_resolution(tmp_path, three_images):
    a = open_quiet(folder_cfg(tmp_path, three_images, resolution=8))
    b = open_quiet(folder_cfg(tmp_path, three_images, resolution=4))
    assert a.path != b.path
    assert a.take(np.arange(3)).shape == (3, 8, 8, 3) and b.take(np.arange(3)).shape == (3, 4, 4, 3)


def test_cache_key_changes_with_center_crop(tmp_path, three_images):
    a = open_quiet(folder_cfg(tmp_path, three_images, center_crop=True))
    b = open_quiet(folder_cfg(tmp_path, three_images, center_crop=False))
    assert a.path != b.path
    assert a.meta["center_crop"] is True and b.meta["center_crop"] is False


def test_adding_a_file_to_folder_changes_cache_key_and_rebuilds(tmp_path, three_images):
    before = open_quiet(folder_cfg(tmp_path, three_images))
    assert len(before) == 3
    solid((1, 2, 3)).save(three_images / "9.png")
    after = open_quiet(folder_cfg(tmp_path, three_images))
    assert after.path != before.path
    assert len(after) == 4
    assert near(after.take(np.array([3]))[0], (1, 2, 3), tol=0)


def test_a_file_rewritten_in_place_is_seen_with_data_refresh_only(tmp_path, three_images):
    """The warm start checks folders, not files (the documented trade): a file rewritten in place keeps its folder's
    time; data.refresh=true lists the source again and decodes the new content."""
    before = open_quiet(folder_cfg(tmp_path, three_images))
    solid((200, 100, 0), (20, 20)).save(three_images / "1.png")  # new size and content, same folder entry
    assert open_quiet(folder_cfg(tmp_path, three_images)).path == before.path
    after = open_quiet(folder_cfg(tmp_path, three_images, refresh=True))
    assert after.path != before.path
    assert near(after.take(np.array([1]))[0], (200, 100, 0), tol=0)
    assert near(before.take(np.array([1]))[0], distinct_colors(3)[1], tol=0)  # the old content is untouched


def test_a_file_replaced_by_rename_is_seen_at_the_next_start(tmp_path, three_images):
    """Writing a new file and renaming it over the old one (what careful tools do) changes the folder's time."""
    before = open_quiet(folder_cfg(tmp_path, three_images))
    solid((0, 200, 100), (20, 20)).save(three_images / "new.png")
    (three_images / "new.png").rename(three_images / "2.png")
    after = open_quiet(folder_cfg(tmp_path, three_images))
    assert after.path != before.path and len(after) == 3
    assert near(after.take(np.array([2]))[0], (0, 200, 100), tol=0)


def test_a_change_in_a_subfolder_is_seen(tmp_path):
    folder = make_folder(tmp_path / "nested" / "a" / "b", {"x.png": solid((10, 20, 30))}).parents[1]
    before = open_quiet(folder_cfg(tmp_path, folder))
    solid((90, 80, 70)).save(folder / "a" / "b" / "y.png")
    after = open_quiet(folder_cfg(tmp_path, folder))
    assert (len(before), len(after)) == (1, 2)


def test_warm_start_does_no_per_file_work_on_the_source(tmp_path, monkeypatch):
    """With a complete cache, a start stats the source's folders only: no listing, no stat or open of any image."""
    import builtins
    import os

    rng = np.random.default_rng(0)
    folder = make_folder(tmp_path / "many", {f"{i:03d}.png": random_image(rng) for i in range(60)})
    make_folder(folder / "sub", {f"{i:03d}.png": random_image(rng) for i in range(40)})
    cold = open_quiet(folder_cfg(tmp_path, folder))
    assert len(cold) == 100

    touched: list[str] = []
    real_stat, real_scandir, real_open, real_listdir = os.stat, os.scandir, builtins.open, os.listdir

    def watch(real):
        def call(path, *args, **kwargs):
            if str(path).startswith(str(folder)):
                touched.append(f"{real.__name__} {path}")
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "stat", watch(real_stat))
    monkeypatch.setattr(os, "scandir", watch(real_scandir))
    monkeypatch.setattr(os, "listdir", watch(real_listdir))
    monkeypatch.setattr(builtins, "open", watch(real_open))
    warm = open_quiet(folder_cfg(tmp_path, folder))
    monkeypatch.undo()
    assert warm.path == cold.path and len(warm) == 100
    # the two folders' times, and no file: independent of the number of images
    assert set(touched) == {f"stat {folder}", f"stat {folder / 'sub'}"}


def test_the_cache_built_by_two_processes_is_byte_identical_to_one_process(tmp_path):
    """Each process decodes the parts p % 2 == rank; the last writes meta.json: the same files as one process."""
    from ddpm.data.cache import build_parts, cache_root, finish_build, plan_cache

    rng = np.random.default_rng(3)
    folder = make_folder(tmp_path / "imgs", {f"{i:02d}.png": random_image(rng, (10 + i % 5, 12)) for i in range(23)})
    one = folder_cfg(tmp_path, folder, shard_size=4, cache_dir=str(tmp_path / "one"))
    single = open_quiet(one)

    two = dataclasses.replace(one, cache_dir=str(tmp_path / "two"))
    root = cache_root(two)
    plan = plan_cache(two, root)
    build_parts(two, root / plan["build"], rank=1, world=2, show_progress=False)
    assert finish_build(two, root, plan) is False  # rank 0's parts are missing: not complete yet
    assert not (root / plan["content"]).exists()
    build_parts(two, root / plan["build"], rank=0, world=2, show_progress=False)
    assert finish_build(two, root, plan) is True
    split = open_quiet(two)

    assert split.path.name == single.path.name
    files = sorted(p.name for p in single.path.iterdir())
    assert files == sorted(p.name for p in split.path.iterdir()) and len(files) == 6 + 2  # 6 shards, meta, listing
    for name in files:
        assert (single.path / name).read_bytes() == (split.path / name).read_bytes(), name


def test_a_stopped_build_keeps_its_finished_parts(tmp_path, monkeypatch):
    from ddpm.data import cache as data_module
    from ddpm.data.cache import build_parts, cache_root, plan_cache

    rng = np.random.default_rng(4)
    folder = make_folder(tmp_path / "imgs", {f"{i:02d}.png": random_image(rng) for i in range(9)})
    cfg = folder_cfg(tmp_path, folder, shard_size=3)
    root = cache_root(cfg)
    plan = plan_cache(cfg, root)
    build_parts(cfg, root / plan["build"], rank=1, world=3, show_progress=False)  # part 1 only
    written = (root / plan["build"] / "shard-00001.npy").stat().st_mtime_ns

    decoded: list[str] = []
    real = data_module.decode_image
    monkeypatch.setattr(
        data_module, "decode_image", lambda read, name, *a: decoded.append(name) or real(read, name, *a)
    )
    cache = open_quiet(cfg)
    assert len(cache) == 9 and len(decoded) == 6  # parts 0 and 2 only
    assert (cache.path / "shard-00001.npy").stat().st_mtime_ns == written


BUILD_TOGETHER = """
import json, sys, time
from pathlib import Path
from ddpm.data import cache as data
from ddpm.config import DataConfig

cfg, gate = DataConfig(**json.loads(sys.argv[1])), Path(sys.argv[2])
real, decoded = data.decode_image, []

def slow(read, name, *rest):
    time.sleep(0.05)  # long enough for the two jobs to overlap on every part
    decoded.append(name)
    return real(read, name, *rest)

data.decode_image = slow
(gate / sys.argv[3]).touch()
while not (gate / "go").exists():
    time.sleep(0.01)
cache = data.open_cache(cfg, show_progress=False)
print(json.dumps({"decoded": len(decoded), "path": str(cache.path), "count": len(cache)}))
"""


def test_two_jobs_building_the_same_cache_at_once_decode_each_image_once(tmp_path):
    """The runs of a grid start together on one source: they share the parts (a part held by one job is waited for
    by the other), neither fails when the other moves the finished build into place, and nothing is left over."""
    import json
    import subprocess
    import sys
    import time

    rng = np.random.default_rng(5)
    folder = make_folder(tmp_path / "imgs", {f"{i:02d}.png": random_image(rng) for i in range(24)})
    cfg = folder_cfg(tmp_path, folder, shard_size=4, workers=1)
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}
    gate = tmp_path / "gate"
    gate.mkdir()
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD_TOGETHER, json.dumps(fields), str(gate), f"ready-{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.time() + 120
    while not all((gate / f"ready-{i}").exists() for i in range(2)):
        assert time.time() < deadline and all(j.poll() is None for j in jobs), [j.communicate() for j in jobs]
        time.sleep(0.05)
    (gate / "go").touch()
    results = []
    for job in jobs:
        out, err = job.communicate(timeout=120)
        assert job.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))

    assert sum(r["decoded"] for r in results) == 24, results  # each of the 6 parts decoded by one job
    assert results[0]["path"] == results[1]["path"] and results[0]["count"] == 24
    from ddpm.data.cache import cache_root

    root = cache_root(cfg)
    assert not list(root.glob(".build-*"))
    assert sorted(p.name for p in Path(results[0]["path"]).iterdir()) == sorted(
        [f"shard-{p:05d}.npy" for p in range(6)] + ["meta.json", "listing.json"]
    )


def test_a_job_whose_build_another_job_finished_meanwhile_opens_that_cache(tmp_path, monkeypatch):
    """Where locks do not reach (a filesystem without them), another job can finish and move the build while this
    one is decoding a part: this one stops building and opens the finished cache instead of failing."""
    from ddpm.data import cache as data_module
    from ddpm.data.cache import build_parts, cache_root, finish_build, plan_cache

    rng = np.random.default_rng(6)
    folder = make_folder(tmp_path / "imgs", {f"{i:02d}.png": random_image(rng) for i in range(9)})
    cfg = folder_cfg(tmp_path, folder, shard_size=3, workers=1)
    root = cache_root(cfg)
    plan = plan_cache(cfg, root)
    real, finished = data_module.decode_image, []

    def other_job_finishes_first(read, name, *rest):
        if not finished:
            finished.append(name)
            build_parts(cfg, root / plan["build"], show_progress=False)
            assert finish_build(cfg, root, plan)
        return real(read, name, *rest)

    monkeypatch.setattr(data_module, "decode_image", other_job_finishes_first)
    cache = open_quiet(cfg)
    assert finished and len(cache) == 9 and cache.path == root / plan["content"]
    assert not (root / plan["build"]).exists()
    assert sorted(p.name for p in cache.path.iterdir()) == sorted(
        [f"shard-{p:05d}.npy" for p in range(3)] + ["meta.json", "listing.json"]
    )


def test_stage_dir_copies_the_cache_once_and_names_an_unset_variable(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    folder = make_folder(tmp_path / "imgs", {f"{i}.png": random_image(rng) for i in range(5)})
    monkeypatch.setenv("NODE_LOCAL", str(tmp_path / "local"))
    cached = open_quiet(folder_cfg(tmp_path, folder))
    staged = open_quiet(folder_cfg(tmp_path, folder, stage_dir="$NODE_LOCAL/job"))
    assert staged.path == tmp_path / "local" / "job" / "ddpm-cache" / cached.path.name
    assert np.array_equal(staged.take(np.arange(5)), cached.take(np.arange(5)))
    mtime = (staged.path / "shard-00000.npy").stat().st_mtime_ns
    again = open_quiet(folder_cfg(tmp_path, folder, stage_dir="$NODE_LOCAL/job"))
    assert (again.path / "shard-00000.npy").stat().st_mtime_ns == mtime  # copied once
    monkeypatch.delenv("NODE_LOCAL")
    with pytest.raises(UserError, match=r"data.stage_dir: '\$NODE_LOCAL/job' names a variable that is not set"):
        open_quiet(folder_cfg(tmp_path, folder, stage_dir="$NODE_LOCAL/job"))


# --------------------------------------------------------------------------------------
# 3. Sharding.


def test_take_across_shards_matches_direct_decode_for_unsorted_indices(tmp_path):
    rng = np.random.default_rng(1)
    folder = make_folder(tmp_path / "ten", {f"img{i:02d}.png": random_image(rng, (12 + i, 10)) for i in range(10)})
    cache = open_quiet(folder_cfg(tmp_path, folder, shard_size=3))
    assert len(cache) == 10
    assert cache.meta["num_shards"] == 4 > 1
    assert [s.shape[0] for s in cache.shards] == cache.meta["shard_counts"] == [3, 3, 3, 1]
    assert len(list(cache.path.glob("shard-*.npy"))) == 4

    files = sorted(folder.iterdir())
    direct = np.stack([decode_image(lambda p=p: Image.open(p), str(p), 8, True, BIG)[0] for p in files])
    assert len(np.unique(direct.reshape(10, -1), axis=0)) == 10  # the check below can tell rows apart
    indices = np.array([9, 0, 5, 3, 8, 1, 4, 9, 2, 7, 6])  # unsorted, every shard, one repeat
    assert np.array_equal(cache.take(indices), direct[indices])
    assert np.array_equal(cache.take(np.arange(10)), direct)
    assert np.array_equal(cache.take(np.array([7])), direct[[7]])


# --------------------------------------------------------------------------------------
# 4. Image formats: every mode becomes RGB uint8 at the resolution.


def test_rgba_png_transparent_areas_become_white(tmp_path):
    a = np.zeros((16, 16, 4), dtype=np.uint8)  # left half transparent black
    a[:, 8:] = (255, 0, 0, 255)  # right half opaque red
    out = only_image(tmp_path, Image.fromarray(a, "RGBA"), "rgba.png")
    assert near(out[:, :3], (255, 255, 255))
    assert near(out[:, 5:], (255, 0, 0))


def test_grayscale_png_becomes_grey_rgb(tmp_path):
    out = only_image(tmp_path, solid(77, mode="L"), "gray.png")
    assert near(out, (77, 77, 77), tol=0)


def test_palette_png_uses_palette_colours_and_transparent_index_is_white(tmp_path):
    im = Image.new("P", (16, 16), 0)
    im.putpalette([10, 200, 30, 200, 10, 30, 0, 0, 0] + [0] * (256 * 3 - 9))
    px = np.array(im)
    px[:, 8:] = 1  # right half: palette colour 1
    px[12:, :] = 2  # bottom band: the transparent index
    im = Image.fromarray(px, "P")
    im.putpalette([10, 200, 30, 200, 10, 30, 0, 0, 0] + [0] * (256 * 3 - 9))
    out = only_image(tmp_path, im, "pal.png", save_kw={"transparency": 2})
    assert Image.open(tmp_path / "imgs" / "pal.png").mode == "P"
    assert near(out[:4, :3], (10, 200, 30))
    assert near(out[:4, 5:], (200, 10, 30))
    assert near(out[7:], (255, 255, 255))


def test_16bit_grayscale_ramp_is_rescaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (32, 1))
    im = Image.fromarray(ramp)
    assert im.mode == "I;16"
    out = only_image(tmp_path, im, "g16.png", resolution=32)
    assert Image.open(tmp_path / "imgs" / "g16.png").mode.startswith("I")
    row = out[16, :, 0].astype(int)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    assert row[0] <= 3, "the darkest pixel maps near 0"
    assert row[-1] >= 252, "the brightest pixel maps near 255"
    assert 110 <= row[16] <= 145, "the middle of the ramp maps near 128 (clipping would give 255)"
    assert np.all(np.diff(row) >= 0) and len(np.unique(row)) >= 30


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    out = only_image(tmp_path, solid((0, 255, 255, 0), mode="CMYK"), "cmyk.jpg", save_kw={"quality": 95})
    assert Image.open(tmp_path / "imgs" / "cmyk.jpg").mode == "CMYK"
    assert near(out, (255, 0, 0), tol=12)


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [solid(c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    folder = tmp_path / "imgs"
    folder.mkdir()
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert getattr(Image.open(folder / "anim.gif"), "n_frames", 1) == 3
    cache = open_quiet(folder_cfg(tmp_path, folder))
    out = cache.take(np.array([0]))[0]
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert near(out, (255, 0, 0), tol=3)


def _wide_image() -> Image.Image:
    a = np.zeros((16, 48, 3), dtype=np.uint8)
    a[:, :16] = (255, 0, 0)
    a[:, 16:32] = (0, 0, 255)  # centre third
    a[:, 32:] = (255, 0, 0)
    return Image.fromarray(a, "RGB")


def test_non_square_image_is_center_cropped(tmp_path):
    out = only_image(tmp_path, _wide_image(), "wide.png", center_crop=True)
    assert near(out, (0, 0, 255), tol=2)


def test_non_square_image_is_squashed_without_center_crop(tmp_path):
    out = only_image(tmp_path, _wide_image(), "wide.png", center_crop=False)
    assert near(out[:, 0], (255, 0, 0), tol=2) and near(out[:, -1], (255, 0, 0), tol=2)
    assert near(out[:, 3:5], (0, 0, 255), tol=40)


def test_mixed_formats_in_one_folder_all_become_rgb_uint8(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    solid((0, 0, 0, 0), mode="RGBA").save(folder / "a.png")
    solid(50, mode="L").save(folder / "b.bmp")
    solid((0, 255, 255, 0), mode="CMYK").save(folder / "c.jpg")
    solid((1, 2, 3), (20, 30)).save(folder / "d.tiff")
    solid((9, 9, 9)).save(folder / "e.webp", lossless=True)
    (folder / "notes.txt").write_text("not an image")
    cache = open_quiet(folder_cfg(tmp_path, folder, resolution=6))
    assert len(cache) == 5
    out = cache.take(np.arange(5))
    assert out.shape == (5, 6, 6, 3) and out.dtype == np.uint8
    assert near(out[0], (255, 255, 255), tol=0) and near(out[1], (50, 50, 50), tol=0)
    assert near(out[3], (1, 2, 3), tol=0) and near(out[4], (9, 9, 9), tol=0)


# --------------------------------------------------------------------------------------
# 5. Bad inputs.


def test_missing_folder_raises_user_error_naming_it(tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(UserError, match="does not exist") as e:
        open_quiet(folder_cfg(tmp_path, missing))
    assert str(missing) in str(e.value)


def test_folder_path_that_is_a_file_raises_user_error(tmp_path):
    f = tmp_path / "image.png"
    solid((1, 1, 1)).save(f)
    with pytest.raises(UserError, match="not a folder") as e:
        open_quiet(folder_cfg(tmp_path, f))
    assert str(f) in str(e.value)


@pytest.mark.parametrize("content", ["empty", "only_txt"])
def test_folder_without_images_raises_user_error(tmp_path, content):
    folder = tmp_path / "data"
    folder.mkdir()
    if content == "only_txt":
        (folder / "readme.txt").write_text("hello")
    with pytest.raises(UserError, match="no image files") as e:
        open_quiet(folder_cfg(tmp_path, folder))
    assert str(folder) in str(e.value)


def _write_bad(tmp_path, kind: str, folder):
    if kind == "corrupt":
        p = folder / "corrupt.png"
        p.write_bytes(np.random.default_rng(5).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        p = folder / "truncated.png"
        data = png_bytes(tmp_path)
        p.write_bytes(data[: len(data) // 2])
    else:
        p = folder / "empty.jpg"
        p.write_bytes(b"")
    return p


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "zero_byte"])
def test_bad_image_raises_bad_image_error_naming_file(tmp_path, kind):
    folder = make_folder(tmp_path / "data", {"good.png": solid((5, 6, 7))})
    bad = _write_bad(tmp_path, kind, folder)
    with pytest.raises(BadImageError) as e:
        open_quiet(folder_cfg(tmp_path, folder))
    assert isinstance(e.value, UserError)
    assert str(bad) in str(e.value)
    assert "on_bad_image=skip" in str(e.value)
    # A failed build leaves no cache (a cache is complete or absent) and no part that holds the bad image; once the
    # file is gone, the next start decodes what is there.
    cache_root = tmp_path / "cache"
    assert not [p for p in cache_root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert not list(cache_root.rglob("meta.json")) and not list(cache_root.rglob("shard-*.npy"))
    bad.unlink()
    cache = open_quiet(folder_cfg(tmp_path, folder))
    assert len(cache) == 1 and near(cache.take(np.array([0]))[0], (5, 6, 7), tol=0)
    assert len([p for p in cache_root.iterdir() if p.name.startswith(".build-")]) == 0  # the failed build is gone


def test_skip_mode_skips_bad_files_and_lists_them(tmp_path, caplog):
    folder = make_folder(tmp_path / "data", {"a_good.png": solid((10, 20, 30)), "z_good.png": solid((40, 50, 60))})
    bad = [_write_bad(tmp_path, kind, folder) for kind in ["corrupt", "truncated", "zero_byte"]]
    with caplog.at_level(logging.WARNING, logger="ddpm.data.cache"):
        cache = open_quiet(folder_cfg(tmp_path, folder, on_bad_image="skip"))
    assert len(cache) == 2 and cache.meta["count"] == 2
    assert len(cache.meta["skipped"]) == 3
    for p in bad:
        assert sum(str(p) in entry for entry in cache.meta["skipped"]) == 1, p
    assert not any("good" in entry for entry in cache.meta["skipped"])
    out = cache.take(np.arange(2))
    assert near(out[0], (10, 20, 30), tol=0) and near(out[1], (40, 50, 60), tol=0)
    assert any("skipped 3 bad images" in r.getMessage() for r in caplog.records)


def test_skip_mode_with_only_bad_files_raises_user_error(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for kind in ["corrupt", "truncated", "zero_byte"]:
        _write_bad(tmp_path, kind, folder)
    with pytest.raises(UserError, match="no usable image") as e:
        open_quiet(folder_cfg(tmp_path, folder, on_bad_image="skip"))
    assert str(folder) in str(e.value)


# --------------------------------------------------------------------------------------
# 6. The decompression-bomb guard.


# 300x300 is over twice the limit (PIL's own hard error); 120x120 is between one and two times it.
@pytest.mark.parametrize("side", [300, 120])
def test_image_over_max_image_pixels_is_refused_naming_file_and_setting(tmp_path, side):
    folder = make_folder(tmp_path / "data", {"small.png": solid((1, 2, 3)), "huge.png": solid((9, 9, 9), (side, side))})
    with pytest.raises(BadImageError) as e:
        open_quiet(folder_cfg(tmp_path, folder, max_image_pixels=10_000))
    message = str(e.value)
    assert str(folder / "huge.png") in message
    assert "max_image_pixels" in message
    assert "10000" in message.replace("_", "")


@pytest.mark.parametrize("side", [300, 120])
def test_image_over_max_image_pixels_is_skipped_in_skip_mode(tmp_path, side):
    folder = make_folder(tmp_path / "data", {"small.png": solid((1, 2, 3)), "huge.png": solid((9, 9, 9), (side, side))})
    cache = open_quiet(folder_cfg(tmp_path, folder, max_image_pixels=10_000, on_bad_image="skip"))
    assert len(cache) == 1
    assert len(cache.meta["skipped"]) == 1 and str(folder / "huge.png") in cache.meta["skipped"][0]
    assert near(cache.take(np.array([0]))[0], (1, 2, 3), tol=0)


def test_image_within_max_image_pixels_is_accepted(tmp_path):
    folder = make_folder(tmp_path / "data", {"ok.png": solid((9, 9, 9), (100, 100))})  # exactly the limit
    cache = open_quiet(folder_cfg(tmp_path, folder, max_image_pixels=10_000))
    assert len(cache) == 1 and cache.meta["skipped"] == []


# --------------------------------------------------------------------------------------
# 7. Small images.


def test_image_smaller_than_resolution_is_upsampled_with_a_warning_counting_it(tmp_path, caplog):
    folder = make_folder(
        tmp_path / "data",
        {
            "a.png": solid((200, 0, 0), (4, 4)),
            "b.png": solid((0, 200, 0), (16, 16)),
            "c.png": solid((0, 0, 200), (5, 12)),
        },
    )
    with caplog.at_level(logging.WARNING, logger="ddpm.data.cache"):
        cache = open_quiet(folder_cfg(tmp_path, folder, resolution=8))
    assert len(cache) == 3 and cache.meta["upsampled"] == 2
    out = cache.take(np.arange(3))
    assert out.shape == (3, 8, 8, 3)
    assert near(out[0], (200, 0, 0), tol=0) and near(out[2], (0, 0, 200), tol=0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("2 of 3" in m and "upsampled" in m for m in warnings), warnings


def test_no_upsampling_warning_when_all_images_are_large_enough(tmp_path, caplog):
    folder = make_folder(tmp_path / "data", {"a.png": solid((1, 1, 1), (8, 8)), "b.png": solid((2, 2, 2), (30, 9))})
    with caplog.at_level(logging.WARNING, logger="ddpm.data.cache"):
        cache = open_quiet(folder_cfg(tmp_path, folder, resolution=8))
    assert cache.meta["upsampled"] == 0
    assert not any("upsampled" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------
# 8. Hugging Face datasets.

HF_COLORS = distinct_colors(6)


def _hf_dataset(colors, size=(10, 14)):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict(
        {"image": [solid(c, size) for c in colors], "label": list(range(len(colors)))}, features=features
    )


def hf_cfg(tmp_path, path, **kw) -> DataConfig:
    kw.setdefault("resolution", 8)
    return DataConfig(source="hf", path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def test_hf_dataset_saved_to_disk_is_cached_in_order(tmp_path):
    path = tmp_path / "ds"
    _hf_dataset(HF_COLORS).save_to_disk(str(path))
    cache = open_quiet(hf_cfg(tmp_path, path, split="train", image_column="image"))
    assert len(cache) == len(HF_COLORS)
    out = cache.take(np.arange(len(HF_COLORS)))
    assert out.shape == (len(HF_COLORS), 8, 8, 3) and out.dtype == np.uint8
    for image, color in zip(out, HF_COLORS):
        assert near(image, color, tol=0)
    assert open_quiet(hf_cfg(tmp_path, path)).path == cache.path


def test_hf_dataset_dict_saved_to_disk_uses_the_requested_split(tmp_path):
    import datasets

    path = tmp_path / "dd"
    datasets.DatasetDict({"train": _hf_dataset(HF_COLORS[:4]), "test": _hf_dataset(HF_COLORS[4:])}).save_to_disk(
        str(path)
    )
    train = open_quiet(hf_cfg(tmp_path, path, split="train"))
    assert len(train) == 4
    for image, color in zip(train.take(np.arange(4)), HF_COLORS[:4]):
        assert near(image, color, tol=0)
    test = open_quiet(hf_cfg(tmp_path, path, split="test"))
    assert len(test) == 2 and test.path != train.path
    assert near(test.take(np.array([1]))[0], HF_COLORS[5], tol=0)


def test_hf_wrong_image_column_names_it_and_lists_columns(tmp_path):
    path = tmp_path / "ds"
    _hf_dataset(HF_COLORS[:2]).save_to_disk(str(path))
    with pytest.raises(UserError) as e:
        open_quiet(hf_cfg(tmp_path, path, image_column="picture"))
    message = str(e.value)
    assert "'picture'" in message and "image" in message and "label" in message


def test_hf_wrong_split_of_dataset_dict_names_the_split(tmp_path):
    import datasets

    path = tmp_path / "dd"
    datasets.DatasetDict({"train": _hf_dataset(HF_COLORS[:2])}).save_to_disk(str(path))
    with pytest.raises(UserError) as e:
        open_quiet(hf_cfg(tmp_path, path, split="validation"))
    assert "'validation'" in str(e.value) and "train" in str(e.value)


def test_hf_missing_hub_dataset_offline_raises_user_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so the name cannot resolve to a local folder
    name = "no-such-user-ddpm-test/no-such-dataset-xyz"
    with pytest.raises(UserError) as e:
        open_quiet(hf_cfg(tmp_path, name))
    assert type(e.value) in (UserError, BadImageError)
    assert name in str(e.value)


# --------------------------------------------------------------------------------------
# 9. Batch order.


def _epoch_indices(order: BatchOrder, epoch: int) -> np.ndarray:
    return np.concatenate([order.indices(epoch, b) for b in range(order.batches_per_epoch)])


def test_batch_order_is_deterministic_for_a_seed():
    a, b = BatchOrder(100, 8, seed=3), BatchOrder(100, 8, seed=3)
    assert a.batches_per_epoch == 12
    for epoch in (0, 1):
        assert np.array_equal(_epoch_indices(a, epoch), _epoch_indices(b, epoch))
    # Lookup order does not matter: a later epoch read first gives the same batches.
    c = BatchOrder(100, 8, seed=3)
    later = c.indices(1, 5).copy()
    assert np.array_equal(c.indices(0, 2), a.indices(0, 2)) and np.array_equal(later, a.indices(1, 5))
    assert not np.array_equal(_epoch_indices(a, 0), _epoch_indices(BatchOrder(100, 8, seed=4), 0))


def test_batch_order_epochs_are_different_permutations():
    order = BatchOrder(100, 10, seed=0)
    e0, e1 = _epoch_indices(order, 0), _epoch_indices(order, 1)
    assert len(e0) == len(set(e0.tolist())) == 100 and len(set(e1.tolist())) == 100
    assert not np.array_equal(e0, e1)
    assert all(len(order.indices(0, b)) == 10 for b in range(order.batches_per_epoch))


def test_batch_order_ranks_read_disjoint_images():
    r0, r1 = BatchOrder(50, 4, seed=7, rank=0, world_size=2), BatchOrder(50, 4, seed=7, rank=1, world_size=2)
    assert r0.batches_per_epoch == r1.batches_per_epoch == 6  # 50 // (4 * 2), drop_last
    for epoch in (0, 3):
        s0, s1 = set(_epoch_indices(r0, epoch).tolist()), set(_epoch_indices(r1, epoch).tolist())
        assert len(s0) == len(s1) == 6 * 4
        assert not s0 & s1
        assert len(s0 | s1) == r0.batches_per_epoch * 4 * 2 == 48
        assert all(0 <= i < 50 for i in s0 | s1)


def test_batch_order_positions_resume_exactly_at_the_given_position():
    order = BatchOrder(30, 5, seed=0)  # 6 batches per epoch
    from_start = order.positions(0, 0)
    everything = [next(from_start) for _ in range(20)]
    assert everything[:7] == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (1, 0)]
    resumed = order.positions(2, 3)
    got = [next(resumed) for _ in range(5)]
    assert got == [(2, 3), (2, 4), (2, 5), (3, 0), (3, 1)]
    assert got == everything[everything.index((2, 3)) :][:5]  # no earlier batch is replayed


@pytest.mark.parametrize("num_images, world_size", [(7, 1), (15, 2)])
def test_batch_order_with_fewer_images_than_one_batch_raises_user_error(num_images, world_size):
    with pytest.raises(UserError, match="fewer than one batch"):
        BatchOrder(num_images, 8, seed=0, rank=0, world_size=world_size)


# --------------------------------------------------------------------------------------
# 10. Model input.


def test_to_model_input_scales_to_minus_one_one_channels_first_float32():
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 5, 4, 3), dtype=np.uint8))
    batch[0] = 0
    batch[1] = 255
    x = to_model_input(batch, torch.device("cpu"), random_flip=False, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 3, 5, 4) and x.dtype == torch.float32
    assert torch.all(x[0] == -1.0) and torch.all(x[1] == 1.0)
    expected = batch.permute(0, 3, 1, 2).double() / 127.5 - 1.0
    assert torch.allclose(x.double(), expected, atol=1e-6)
    assert x.min() >= -1.0 and x.max() <= 1.0


def _flipped_mask(x: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    plain = batch.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    same = (x - plain).abs().amax(dim=(1, 2, 3)) < 1e-6
    flipped = (x - plain.flip(3)).abs().amax(dim=(1, 2, 3)) < 1e-6
    assert torch.all(same ^ flipped), "every image is either unchanged or mirrored left-right"
    return flipped


def test_to_model_input_random_flip_is_per_image_and_seeded():
    batch = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (64, 4, 6, 3), dtype=np.uint8))
    run = lambda seed: to_model_input(batch, torch.device("cpu"), True, torch.Generator().manual_seed(seed))  # noqa: E731
    a, b = run(123), run(123)
    flips = _flipped_mask(a, batch)
    assert 0 < int(flips.sum()) < 64, "some images are flipped and some are not"
    assert torch.equal(a, b), "the same generator seed gives the same flips"
    assert not torch.equal(_flipped_mask(run(124), batch), flips)
    no_flip = to_model_input(batch, torch.device("cpu"), False, torch.Generator().manual_seed(123))
    assert int(_flipped_mask(no_flip, batch).sum()) == 0


# --------------------------------------------------------------------------------------
# 11. The background loader.


def test_batch_loader_yields_cached_batches_in_order_from_the_given_position(tmp_path):
    folder = make_folder(
        tmp_path / "data", {f"{i:02d}.png": solid(c, (6, 6)) for i, c in enumerate(distinct_colors(20))}
    )
    cache = open_quiet(folder_cfg(tmp_path, folder, resolution=4, shard_size=7))
    assert cache.meta["num_shards"] == 3
    order = BatchOrder(len(cache), 4, seed=1)  # 5 batches per epoch
    expected_order = BatchOrder(len(cache), 4, seed=1)  # the loader's thread uses `order`
    threads_before = threading.active_count()
    loader = BatchLoader(cache, order, epoch=1, batch=2, pin_memory=False)
    try:
        got = [next(loader) for _ in range(6)]
    finally:
        loader.close()
    positions = [p for p, _, _ in got]
    assert positions == [(1, 2), (1, 3), (1, 4), (2, 0), (2, 1), (2, 2)]
    for position, batch, labels in got:
        assert labels is None  # an unlabelled folder
        assert isinstance(batch, torch.Tensor) and batch.dtype == torch.uint8 and batch.shape == (4, 4, 4, 3)
        assert np.array_equal(batch.numpy(), cache.take(expected_order.indices(*position)))
    assert all(not t.is_alive() for t in loader._pool._threads)
    assert threading.active_count() <= threads_before
    assert iter(loader) is loader
