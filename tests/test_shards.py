"""Specification of ddpm/data/shards.py and `ddpm prepare`: WebDataset shards written from any source, streamed in a
deterministic, resumable order, bad members named; the prepare job's cache is the cache training opens."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.config import DataConfig, load_config
from ddpm.data.images import BadImageError
from ddpm.data.shard_writer import write_shards
from ddpm.data.shards import ShardLoader, ShardOrder, open_shards
from ddpm.errors import UserError
from ddpm.training.loop import train
from tests.conftest import cli


def make_images(folder, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def shards_of(tmp_path, count: int = 20, shard_size: int = 4, **kw) -> DataConfig:
    folder = make_images(tmp_path / "imgs", count)
    write_shards(
        DataConfig(source="folder", path=str(folder), shard_size=shard_size), tmp_path / "shards", show_progress=False
    )
    return DataConfig(source="webdataset", path=str(tmp_path / "shards"), resolution=8, **kw)


def read_all(loader: ShardLoader, n: int) -> list:
    out = [next(loader) for _ in range(n)]
    loader.close()
    return out


def test_shards_hold_the_source_files_bytes_under_webdataset_keys_with_an_index(tmp_path):
    cfg = shards_of(tmp_path, count=10, shard_size=4)
    index = json.loads((tmp_path / "shards" / "shards.json").read_text())
    assert [(s["name"], s["count"]) for s in index["shards"]] == [
        ("shard-000000.tar", 4),
        ("shard-000001.tar", 4),
        ("shard-000002.tar", 2),
    ]
    with tarfile.open(tmp_path / "shards" / "shard-000001.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["000000004.png", "000000005.png", "000000006.png", "000000007.png"]
        assert tar.extractfile(members[0]).read() == (tmp_path / "imgs" / "004.png").read_bytes()
    shards = open_shards(cfg)
    assert shards.counts == [4, 4, 2] and len(shards) == 10


def test_shards_written_by_two_tasks_equal_those_of_one(tmp_path):
    folder = make_images(tmp_path / "imgs", 11)
    data = DataConfig(source="folder", path=str(folder), shard_size=3)
    assert write_shards(data, tmp_path / "one", show_progress=False)
    assert not write_shards(data, tmp_path / "two", part=1, parts=2, show_progress=False)  # shards 1, 3 only
    assert not (tmp_path / "two" / "shards.json").exists()
    assert write_shards(data, tmp_path / "two", part=0, parts=2, show_progress=False)
    names = sorted(p.name for p in (tmp_path / "one").glob("*.tar"))
    assert len(names) == 4 and names == sorted(p.name for p in (tmp_path / "two").glob("*.tar"))
    for name in [*names, "shards.json"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_shards_without_an_index_are_counted_from_their_headers(tmp_path):
    cfg = shards_of(tmp_path, count=9, shard_size=4)
    (tmp_path / "shards" / "shards.json").unlink()
    assert open_shards(cfg).counts == [4, 4, 1]


def test_ranks_read_disjoint_shards_and_epochs_differ():
    counts = [5] * 8
    a, b = ShardOrder(counts, 4, seed=0, rank=0, world_size=2), ShardOrder(counts, 4, seed=0, rank=1, world_size=2)
    for epoch in range(3):
        assert set(a.shards(epoch)).isdisjoint(b.shards(epoch))
        assert sorted([*a.shards(epoch), *b.shards(epoch)]) == list(range(8))
    assert list(a.shards(0)) != list(a.shards(1))
    assert a.batches_per_epoch == b.batches_per_epoch == 20 // 4
    with pytest.raises(UserError, match="3 shards for 4 processes"):
        ShardOrder([5, 5, 5], 4, seed=0, rank=0, world_size=4)


def test_a_loader_started_mid_epoch_continues_exactly(tmp_path):
    cfg = shards_of(tmp_path, count=20, shard_size=4)
    shards = open_shards(cfg)
    order = ShardOrder(shards.counts, 3, seed=7)
    assert order.batches_per_epoch == 6
    straight = read_all(ShardLoader(shards, order, cfg, 0, 0, pin_memory=False), 14)  # into the third epoch
    assert [p for p, _, _ in straight][:8] == [(0, b) for b in range(6)] + [(1, 0), (1, 1)]
    resumed = read_all(ShardLoader(shards, order, cfg, 1, 4, pin_memory=False), 4)
    for (p, x, labels), (q, y, _) in zip(straight[10:], resumed):
        assert p == q and torch.equal(x, y) and labels is None
    # every image of an epoch is distinct and all come from the source
    epoch0 = torch.cat([x for p, x, _ in straight if p[0] == 0])
    assert epoch0.shape == (18, 8, 8, 3) and len({bytes(row.numpy()) for row in epoch0}) == 18


def _corrupt_member(tmp_path) -> None:
    """Rewrites shard 1 with its second member replaced by bytes that are not an image."""
    path = tmp_path / "shards" / "shard-000001.tar"
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for i, (m, data) in enumerate(members):
            data = b"not an image" if i == 1 else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def test_a_corrupt_member_is_named_with_its_shard_or_skipped_and_counted(tmp_path, caplog):
    cfg = shards_of(tmp_path, count=8, shard_size=4)
    _corrupt_member(tmp_path)
    shards = open_shards(cfg)
    order = ShardOrder(shards.counts, 4, seed=0)
    with pytest.raises(BadImageError, match=r"shard-000001\.tar:000000005\.png: cannot decode image.*on_bad_image"):
        read_all(ShardLoader(shards, order, cfg, 0, 0, pin_memory=False), 2)
    skip = DataConfig(**{**cfg.__dict__, "on_bad_image": "skip"})
    with caplog.at_level("WARNING"):
        loader = ShardLoader(shards, order, skip, 0, 0, pin_memory=False)
        sizes = sorted(len(next(loader)[1]) for _ in range(2))
        loader.close()
    assert sizes == [3, 4]  # the bad image is left out of its batch
    # ... and counted. The count itself is read from the first warning: the loader reads ahead on its own thread
    # and may already have met the same image again in the next epoch.
    first = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped"))
    assert first.startswith("skipped 1 bad images (1 so far); first: ") and "000000005.png" in first
    assert loader.skipped >= 1


def test_a_truncated_shard_is_named(tmp_path):
    cfg = shards_of(tmp_path, count=8, shard_size=4)
    path = tmp_path / "shards" / "shard-000000.tar"
    path.write_bytes(path.read_bytes()[:700])
    shards = open_shards(cfg)
    with pytest.raises(BadImageError, match="shard-000000.tar"):
        read_all(ShardLoader(shards, ShardOrder(shards.counts, 4, seed=0), cfg, 0, 0, pin_memory=False), 2)


def tiny_stream(tiny, tmp_path, *extra: str, name: str) -> list[str]:
    write_shards(DataConfig(source="digits", shard_size=300), tmp_path / "digit-shards", show_progress=False)
    return tiny("data.source=webdataset", f"data.path={tmp_path / 'digit-shards'}", *extra, name=name)


def test_streamed_training_resumes_to_the_same_weights_as_a_straight_run(tiny, tmp_path):
    from tests.test_train import final_weights

    straight = load_config(None, tiny_stream(tiny, tmp_path, name="straight"))
    train(straight)
    cfg = load_config(None, tiny_stream(tiny, tmp_path, "train.stop_after=3", name="resumed"))
    assert train(cfg) is None
    assert train(load_config(None, tiny_stream(tiny, tmp_path, name="resumed"))) == cfg.run_dir / "pipeline"
    for a, b in zip(final_weights(straight.run_dir, 6), final_weights(cfg.run_dir, 6)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prepare_builds_the_cache_that_training_opens_without_decoding(tmp_path, monkeypatch):
    folder = make_images(tmp_path / "imgs", 24)
    config = tmp_path / "train.yaml"
    config.write_text(
        f"data:\n  source: folder\n  path: {folder}\n  resolution: 8\n  cache_dir: {tmp_path / 'cache'}\n"
        "  shard_size: 5\nmodel:\n  layers_per_block: 1\noptim:\n  lr: 1.0e-3\n"
    )
    for part in ("1/2", "0/2"):
        r = cli("prepare", "--config", str(config), "--part", part)
        assert r.returncode == 0, r.stderr
    assert "prepared: " in r.stdout
    content = [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(content) == 1 and json.loads((content[0] / "meta.json").read_text())["count"] == 24

    from ddpm.data import cache as data_module
    from ddpm.data.cache import open_cache

    monkeypatch.setattr(data_module, "decode_image", lambda *a, **k: pytest.fail("decoded again"))
    cfg = load_config(str(config))
    assert open_cache(cfg.data, show_progress=False).path == content[0]


def test_prepare_refuses_bad_options_in_one_line(tmp_path):
    r = cli("prepare", "--format", "webdataset")
    assert r.returncode == 2 and "--out is required with --format webdataset" in r.stderr
    r = cli("prepare", "--part", "2/2")
    assert r.returncode == 2 and "--part '2/2'" in r.stderr
    r = cli("prepare", "data.source=folder", f"data.path={tmp_path / 'missing'}")
    assert r.returncode == 2 and f"folder {tmp_path / 'missing'} does not exist" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
