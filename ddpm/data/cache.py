"""Training images: decoded and resized once into a memory-mapped uint8 cache, then served as batches.

Long because the index, the split build and its locks are one protocol between jobs: read together, they show
why a cache directory is always complete or absent, whichever job or rank stops where.

Sources (ddpm.data.sources): the embedded digits, a local image folder, or a Hugging Face dataset. A source is decoded
once (ddpm.data.images) into `<cache>/<content>/shard-*.npy`, (N, H, W, C) uint8 with C = 1 (grey) or 3 (RGB), and
with `data.labels` the class of each image beside it in `labels-*.npy` (N,) int32, the names in meta.json; later
epochs and runs memory-map the shards, so a dataset larger than RAM streams from disk and a rank reads only its
own batches (ddpm.data.batches: the order, the loader, and flip and scaling on the training device). WebDataset shards
are streamed instead (ddpm.data.shards).

A warm start does no per-file work. `<cache>/<source>-<res>px-<key>.json`, the index of one source at one
preprocessing, names the complete content directory and the source's folders with their modification times; a
start stats those folders (rank 0 only, in training) and opens the content. Only a changed folder, or
`data.refresh=true`, lists the source again, and only changed content is decoded, into a new content directory
named by the listing's fingerprint, so a job still reading the old one is not disturbed.

The decode is split in parts of `data.shard_size` images in source order: every process of a job (the training
ranks, or the tasks of `ddpm prepare`) decodes the parts p with p % processes == rank, each written whole; the last
step writes meta.json and renames the build into place. The cache is the same, byte for byte, for any number of
processes, and a build that was stopped keeps its finished parts. Each part is built under its own lock, so
independent jobs that start on the same source together (the runs of a grid) share the parts too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ddpm.config import DataConfig
from ddpm.data.images import BadImageError, decode_image, pil_limits_lifted
from ddpm.data.sources import IMAGE_SUFFIXES, Items, label_spec, list_source, source_spec, unchanged
from ddpm.errors import UserError
from ddpm.files import claimed, exclusive, unique_suffix, write_json

__all__ = ["IMAGE_SUFFIXES", "BadImageError", "ImageCache", "Processes", "decode_image", "open_cache"]

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when decoding, resizing or the layout changes, so old caches are not reused


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("DDPM_CACHE", Path.home() / ".cache" / "ddpm")) / "datasets"


@dataclass
class Processes:
    """The processes that open a cache together: this one's rank among them, and how they meet. One process by
    default; training passes its ranks (a barrier, and a broadcast of rank 0's value to all)."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = field(default=lambda: None)
    broadcast: Callable[[Any], Any] = field(default=lambda value: value)


@dataclass
class ImageCache:
    """Memory-mapped (N, H, W, C) uint8 shards (C = 1 grey or 3 RGB); `take` gathers any set of rows."""

    path: Path
    shards: list[np.ndarray]
    meta: dict
    labels: np.ndarray | None = None  # (N,) int32 class of each image, in cache order; None when unlabelled

    def __post_init__(self) -> None:
        self.starts = np.concatenate([[0], np.cumsum([len(s) for s in self.shards])]).astype(np.int64)

    def __len__(self) -> int:
        return self.meta["count"]

    @property
    def resolution(self) -> int:
        return self.meta["resolution"]

    @property
    def channels(self) -> int:
        return self.meta.get("channels", 3)

    @property
    def class_names(self) -> list[str] | None:
        return self.meta.get("class_names")

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Rows in the given order; each shard is read with sorted indices, touching only those pages."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.resolution, self.resolution, self.channels), dtype=np.uint8)
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        for s in np.unique(shard_of):
            where = np.nonzero(shard_of == s)[0]
            rows = indices[where] - self.starts[s]
            order = np.argsort(rows)
            out[where[order]] = self.shards[s][rows[order]]
        return out


def open_cache(
    cfg: DataConfig, show_progress: bool = True, processes: Processes | None = None, listed_after: float = 0.0
) -> ImageCache:
    """Open the cache of this source and preprocessing, building it first (split over `processes`) where it is
    missing or the source changed. `listed_after`: a listing taken before this time is taken again (a prepare
    array's submission time; `data.refresh` means now)."""
    procs = processes or Processes()
    root = cache_root(cfg)
    if cfg.refresh:
        listed_after = max(listed_after, time.time())
    plan = procs.broadcast(plan_cache(cfg, root, listed_after) if procs.rank == 0 else None)
    if plan["build"]:
        build_parts(cfg, root / plan["build"], procs.rank, procs.world, show_progress and procs.rank == 0)
        procs.barrier()
        if procs.rank == 0:
            finish_build(cfg, root, plan)
        procs.barrier()
    path = root / plan["content"]
    if cfg.stage_dir:
        from ddpm.data.staging import stage

        path = stage(path, cfg.stage_dir, show_progress)
    return load_cache(path)


def load_cache(path: Path) -> ImageCache:
    meta = json.loads((path / "meta.json").read_text())
    shards = [
        np.load(path / f"shard-{i:05d}.npy", mmap_mode="r") if n else np.empty((0,), dtype=np.uint8)
        for i, n in enumerate(meta["shard_counts"])
    ]
    labels = None
    if meta.get("class_names") is not None:  # 4 bytes per image, a handful of files: read whole, not per image
        labels = np.concatenate(
            [np.load(path / f"labels-{i:05d}.npy") for i in range(len(shards))] or [np.empty(0, np.int32)]
        )
    return ImageCache(path=path, shards=shards, meta=meta, labels=labels)


# --------------------------------------------------------------------------------------
# Which cache: the index, checked without touching the source's files.


def _key_fields(cfg: DataConfig) -> dict:
    labels = label_spec(cfg)
    return dict(
        source_spec(cfg),
        **({"labels": labels} if labels else {}),
        resolution=cfg.resolution,
        channels=cfg.image_channels,
        center_crop=cfg.center_crop,
        on_bad_image=cfg.on_bad_image,
        max_image_pixels=cfg.max_image_pixels,
        shard_size=cfg.shard_size,
        version=CACHE_VERSION,
    )


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def plan_cache(cfg: DataConfig, root: Path, listed_after: float = 0.0) -> dict:
    """{"content": directory name, "build": "" when complete, else the build directory's name}. The source is
    listed only when its index is missing, older than `listed_after`, or a folder of it changed."""
    key_fields = _key_fields(cfg)
    name = _index_name(cfg)
    index_file = root / f"{name}.json"
    with exclusive(root / f".{name}.lock"):  # tasks starting together list the source once
        index = _read_json(index_file)
        fresh = index is not None and index["listed_at"] >= listed_after and unchanged(index["folders"])
        if fresh:
            if (root / index["content"] / "meta.json").is_file():
                return {"content": index["content"], "build": ""}
            if (root / _build_name(index["content"]) / "listing.json").is_file():
                return {"content": index["content"], "build": _build_name(index["content"])}
        started = time.time()
        listing = list_source(cfg)  # the only per-file work on the source
        content = f"{name.rsplit('-', 1)[0]}-{_hash([key_fields, listing.fingerprint])}"
        if index is not None and index["content"] != content:  # an unfinished build of content that is gone
            shutil.rmtree(root / _build_name(index["content"]), ignore_errors=True)
        build = ""
        if not (root / content / "meta.json").is_file():
            build = _build_name(content)
            listing_file = root / build / "listing.json"
            if not listing_file.is_file():
                write_json(
                    listing_file,
                    {"spec": listing.spec, "fingerprint": listing.fingerprint, "names": listing.names,
                     "labels": listing.labels, "class_names": listing.class_names},
                )  # fmt: skip
        write_json(
            index_file, {"config": key_fields, "content": content, "folders": listing.folders, "listed_at": started}
        )
        log.info(
            "listed %s: %d images in %.1f s",
            key_fields.get("path", "digits"),
            len(listing.names),
            time.time() - started,
        )
        return {"content": content, "build": build}


def _index_name(cfg: DataConfig) -> str:
    key_fields = _key_fields(cfg)
    return f"{key_fields['source']}-{cfg.resolution}px-{_hash(key_fields)}"


def _build_name(content: str) -> str:
    return f".build-{content}"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------
# Building: parts decoded by every process, then one meta.json.


def build_parts(cfg: DataConfig, build_dir: Path, rank: int = 0, world: int = 1, show_progress: bool = True) -> None:
    """Decode this process's parts (p % world == rank) that are not written yet.

    Each part is decoded and written under its own lock, so independent jobs building the same content at once
    (the runs of a grid, two sweeps) share the parts instead of each decoding all of them: a part another job holds
    is skipped, then waited for, and decoded here only if that job stopped before writing it."""
    listing = json.loads((build_dir / "listing.json").read_text())
    names, size, labels = listing["names"], cfg.shard_size, listing.get("labels")
    parts = [p for p in range(_num_parts(len(names), size)) if p % world == rank]
    todo = [p for p in parts if not (build_dir / f"part-{p:05d}.json").is_file()]
    if not todo:
        return
    items = Items(cfg, listing["spec"])
    res, channels = cfg.resolution, cfg.image_channels

    def decode(name: str) -> tuple[np.ndarray | None, bool | str]:
        shown = items.display_name(name)
        try:
            return decode_image(items.reader(name), shown, res, cfg.center_crop, cfg.max_image_pixels, channels)
        except BadImageError as e:
            return None, str(e)

    def build(p: int, pool: ThreadPoolExecutor) -> None:
        arrays, kept, skipped, upsampled = [], [], [], 0
        for i, (array, status) in enumerate(pool.map(decode, names[p * size : (p + 1) * size]), start=p * size):
            progress.update(1)
            if array is None:
                if cfg.on_bad_image == "error":
                    pool.shutdown(wait=False, cancel_futures=True)  # report now, not after the rest
                    raise BadImageError(f"{status} (set data.on_bad_image=skip to skip bad files)")
                skipped.append(status)
                continue
            upsampled += bool(status)
            arrays.append(array)
            kept.append(i)
        rows = np.stack(arrays) if arrays else np.empty((0, res, res, channels), dtype=np.uint8)
        _save_whole(build_dir / f"shard-{p:05d}.npy", lambda f: np.save(f, rows))
        if labels is not None:  # the labels of the images kept, in the same order
            classes = np.asarray([labels[i] for i in kept], dtype=np.int32)
            _save_whole(build_dir / f"labels-{p:05d}.npy", lambda f: np.save(f, classes))
        # the part's record comes last: a part with a record is complete
        record = {"count": len(rows), "skipped": skipped, "upsampled": upsampled}
        _save_whole(build_dir / f"part-{p:05d}.json", lambda f: f.write(json.dumps(record, indent=1).encode()))

    source = listing["spec"].get("path", listing["spec"]["source"])
    total = sum(len(names[p * size : (p + 1) * size]) for p in todo)
    progress = tqdm(
        total=total, desc=f"caching {source} at {res}px", unit="img", disable=not show_progress, mininterval=1.0
    )
    try:
        # Threads: PIL releases the GIL while decoding and resizing.
        with pil_limits_lifted(), ThreadPoolExecutor(max_workers=cfg.decode_threads) as pool:
            held_elsewhere = [p for p in todo if _build_part(build_dir, p, False, build, pool) == "held"]
            for p in held_elsewhere:
                _build_part(build_dir, p, True, build, pool)
    except _BuildMoved:
        pass  # another job finished this content and moved it into place meanwhile
    finally:
        progress.close()


class _BuildMoved(Exception):
    pass


def _build_part(
    build_dir: Path, p: int, wait: bool, build: Callable[[int, ThreadPoolExecutor], None], pool: ThreadPoolExecutor
) -> str:
    """ "held" when another process is building part p (and `wait` is False), else "done" once it is written."""
    try:
        with claimed(build_dir / f".part-{p:05d}.lock", wait) as mine:
            if not mine:
                return "held"
            if not build_dir.is_dir():  # moved into place while this process waited for the part
                raise _BuildMoved
            if not (build_dir / f"part-{p:05d}.json").is_file():
                build(p, pool)
            return "done"
    except FileNotFoundError:
        if build_dir.is_dir():
            raise
        raise _BuildMoved from None


def finish_build(cfg: DataConfig, root: Path, plan: dict) -> bool:
    """Write meta.json and move the build into place once every part is written; True when the cache is complete
    (by this call or an earlier one). Safe to call from every task: the first that sees all parts finishes."""
    content, build_dir = root / plan["content"], root / plan["build"]
    with exclusive(root / f".{_index_name(cfg)}.lock"):
        if (content / "meta.json").is_file():
            return True
        listing = json.loads((build_dir / "listing.json").read_text())
        n = _num_parts(len(listing["names"]), cfg.shard_size)
        records = [_read_json(build_dir / f"part-{p:05d}.json") for p in range(n)]
        if any(r is None for r in records):
            return False
        count = sum(r["count"] for r in records)
        skipped = [s for r in records for s in r["skipped"]]
        upsampled = sum(r["upsampled"] for r in records)
        if count == 0:
            raise UserError(
                f"data: no usable image in {listing['spec'].get('path', 'the source')} ({len(skipped)} skipped as bad)"
            )
        meta = dict(
            _key_fields(cfg),
            fingerprint=listing["fingerprint"],
            count=count,
            num_shards=n,
            shard_counts=[r["count"] for r in records],
            skipped=skipped,
            upsampled=upsampled,
            **({"class_names": listing["class_names"]} if listing.get("labels") is not None else {}),
        )
        (build_dir / "meta.json").write_text(json.dumps(meta, indent=1))
        build_dir.rename(content)  # atomic: a content directory is complete or absent
        # the records and part locks go only now: a job still at work sees them until the build has moved
        for p in range(n):
            (content / f"part-{p:05d}.json").unlink()
            (content / f".part-{p:05d}.lock").unlink(missing_ok=True)
    if upsampled:
        log.warning("%d of %d images are smaller than %dpx and were upsampled", upsampled, count, cfg.resolution)
    if skipped:
        log.warning("skipped %d bad images (listed in %s/meta.json); first: %s", len(skipped), content, skipped[0])
    return True


def _num_parts(count: int, size: int) -> int:
    return max(1, -(-count // size))


def _save_whole(path: Path, write: Callable[[Any], None]) -> None:
    tmp = path.with_name(f".{path.name}.{unique_suffix()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)
