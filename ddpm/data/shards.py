"""WebDataset tar shards: written by `ddpm prepare --format webdataset`, streamed by training (data.source=webdataset).

The format is WebDataset's: each shard is a plain POSIX tar in which the files of one sample share a key (the name
up to the first dot); here one image per sample, `<index:09d>.<ext>`, holding the bytes the source stored (no
re-encoding), and with data.labels its class as `<index:09d>.cls`, the decimal index in ASCII (WebDataset's
convention for class labels). `shards.json` beside the shards lists each with its sample count (and the class
names), so a reader knows the data's size without opening a shard; shards written by other tools get it from one
pass over their tar headers.

Why our own reader rather than the webdataset package's: training needs an order that is a pure function of
(seed, epoch, rank) so that a requeued job continues at the exact sample, with any number of nodes. Here epoch e
permutes the shards with the seed, rank r of w reads the shards at positions r, r + w, ... of that permutation,
each shard in its own seeded order; batch b of an epoch is that rank's samples [b*B, (b+1)*B). A resume skips whole
shards by their counts and, in the shard it lands in, the samples before its position: no state but (epoch, batch).
Shards are read whole (one sequential read, what parallel file systems serve best) and decoded and resized by
background threads, ahead of the training step.
"""

from __future__ import annotations

import io
import json
import logging
import queue
import tarfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpm.config import DataConfig
from ddpm.data.images import BadImageError, decode_image, pil_limits_lifted
from ddpm.data.sources import IMAGE_SUFFIXES
from ddpm.errors import UserError

log = logging.getLogger(__name__)

INDEX = "shards.json"
_IMAGE_EXTENSIONS = {s.lstrip(".") for s in IMAGE_SUFFIXES}


@dataclass
class ShardSet:
    root: Path
    names: list[str]  # shard file names, sorted
    counts: list[int]  # samples per shard
    class_names: list[str] | None = None  # from shards.json; None: unlabelled, or labels without names

    def __len__(self) -> int:
        return sum(self.counts)


def open_shards(cfg: DataConfig) -> ShardSet:
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise UserError(f"data.path: {root} is not a folder of WebDataset .tar shards")
    index = root / INDEX
    class_names = None
    if index.is_file():
        written = json.loads(index.read_text())
        entries, class_names = written["shards"], written.get("class_names")
    else:  # shards from elsewhere: count their samples once, from the tar headers
        tars = sorted(p.name for p in root.glob("*.tar"))
        if not tars:
            raise UserError(
                f"data.path: {root} holds no .tar shards (write them with ddpm prepare --format webdataset)"
            )
        log.info("%s has no %s: counting the samples of %d shards", root, INDEX, len(tars))
        entries = [{"name": t, "count": len(_read_samples(root / t, headers_only=True))} for t in tars]
    if cfg.labels and class_names is None:
        raise UserError(
            f"data.path: {root} has no class names in {INDEX}: a class-conditional run needs shards with .cls "
            "labels (ddpm prepare --format webdataset with model.num_classes or data.labels=true)"
        )
    return ShardSet(root, [e["name"] for e in entries], [e["count"] for e in entries], class_names)


def _split_name(member: str) -> tuple[str, str]:
    """WebDataset's key and extension: the base name splits at its first dot, the folder belongs to the key."""
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _read_samples(path: Path, headers_only: bool = False) -> list[tuple[str, bytes, int | None]]:
    """(member name, bytes, class from the sample's .cls member or None) of each sample's image, in the shard's
    order."""
    try:
        samples: dict[str, tuple[str, bytes]] = {}
        classes: dict[str, int] = {}
        # headers only: tarfile seeks past each member's data; else one sequential read of the whole shard
        source = {"name": path} if headers_only else {"fileobj": io.BytesIO(path.read_bytes())}
        with tarfile.open(**source, mode="r:") as tar:
            for m in tar:
                key, ext = _split_name(m.name)
                if m.isfile() and ext in _IMAGE_EXTENSIONS and key not in samples:
                    samples[key] = (m.name, b"" if headers_only else tar.extractfile(m).read())
                elif m.isfile() and ext == "cls" and not headers_only:
                    text = tar.extractfile(m).read().decode("ascii", "replace").strip()
                    if not text.isdigit():
                        raise BadImageError(f"shard {path}: {m.name} holds {text[:20]!r}, not a class index")
                    classes[key] = int(text)
    except (OSError, tarfile.TarError) as e:
        raise BadImageError(f"shard {path}: cannot read it as a tar file ({type(e).__name__}: {e})") from None
    return [(name, data, classes.get(key)) for key, (name, data) in samples.items()]


class ShardOrder:
    """Deterministic, resumable order over shards (see the module's docstring)."""

    def __init__(self, counts: list[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.counts, self.batch_size, self.seed = counts, batch_size, seed
        self.rank, self.world_size = rank, world_size
        if len(counts) < world_size:
            raise UserError(
                f"data.path: {len(counts)} shards for {world_size} processes; every process reads whole shards: "
                "write more, smaller shards (ddpm prepare --format webdataset data.shard_size=...)"
            )
        # Every rank takes the same number of batches: what the rank with the smallest shards surely has.
        surely = sum(sorted(counts)[: len(counts) // world_size])
        self.batches_per_epoch = surely // batch_size
        if self.batches_per_epoch == 0:
            raise UserError(
                f"data.path: a process reads {surely} samples per epoch, fewer than one batch of "
                f"train.batch_size={batch_size}"
            )

    def shards(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))[self.rank :: self.world_size]

    def samples(self, epoch: int, shard: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, shard, 1]).permutation(self.counts[shard])


class ShardLoader:
    """Yields ((epoch, batch), uint8 (B, H, W, C) tensor, int64 labels or None) from (epoch, batch) on, like
    ddpm.data.batches.BatchLoader:
    shards are read and their images decoded by background threads, a few batches ahead. A bad image is an
    error naming the shard and member, or with data.on_bad_image=skip is left out of its batch and counted."""

    def __init__(
        self,
        shards: ShardSet,
        order: ShardOrder,
        cfg: DataConfig,
        epoch: int,
        batch: int,
        pin_memory: bool,
        prefetch: int = 4,
    ):
        self.shards, self.order, self.cfg, self.pin_memory = shards, order, cfg, pin_memory
        self.skipped = 0
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=cfg.decode_threads)
        self._thread = threading.Thread(target=self._produce, args=(epoch, batch), daemon=True, name="shard-loader")
        self._thread.start()

    def __iter__(self) -> ShardLoader:
        return self

    def __next__(self) -> tuple[tuple[int, int], torch.Tensor, torch.Tensor | None]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._pool.shutdown(wait=True, cancel_futures=True)

    # The background thread.

    def _produce(self, epoch: int, batch: int) -> None:
        try:
            while not self._stop.is_set():
                self._epoch(epoch, batch)
                epoch, batch = epoch + 1, 0
        except BaseException as e:  # handed to the training loop, which raises it
            self._put(e)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _epoch(self, epoch: int, batch: int) -> None:
        size, last = self.order.batch_size, self.order.batches_per_epoch
        pending: list[tuple[str, bytes, int | None]] = []
        for named in self._samples(epoch, skip=batch * size):
            pending.append(named)
            if len(pending) == size:
                if not self._put(((epoch, batch), *self._decode(pending))):
                    return
                pending, batch = [], batch + 1
                if batch == last:
                    return

    def _samples(self, epoch: int, skip: int) -> Iterator[tuple[str, bytes, int | None]]:
        """This rank's samples of the epoch in order, after the first `skip`; whole shards are skipped unread, and
        the next shard is read while this one is decoded."""
        names, counts = self.shards.names, self.order.counts
        todo = []
        for s in self.order.shards(epoch):
            if skip >= counts[s]:
                skip -= counts[s]
                continue
            todo.append((int(s), skip))
            skip = 0
        reads = [self._pool.submit(_read_samples, self.shards.root / names[s]) for s, _ in todo[:1]]
        for i, (s, first) in enumerate(todo):
            if i + 1 < len(todo):
                reads.append(self._pool.submit(_read_samples, self.shards.root / names[todo[i + 1][0]]))
            try:
                samples = reads[i].result()
            except BadImageError:
                if self.cfg.on_bad_image == "error":
                    raise
                samples = []
            shard = self.shards.root / names[s]
            if len(samples) != counts[s]:
                message = f"shard {shard}: holds {len(samples)} images, its index says {counts[s]}"
                if self.cfg.on_bad_image == "error":
                    raise BadImageError(f"{message} (set data.on_bad_image=skip to skip what is missing)")
                log.warning("%s; the missing ones are skipped", message)
            for j in self.order.samples(epoch, s)[first:]:
                if j < len(samples):
                    yield f"{shard.name}:{samples[j][0]}", samples[j][1], samples[j][2]
                else:
                    yield f"{shard}:#{j}", b"", None

    def _decode(self, named: list[tuple[str, bytes, int | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        cfg = self.cfg

        def decode(item: tuple[str, bytes, int | None]) -> np.ndarray | str:
            name, data, label = item
            try:
                if not data:
                    raise BadImageError(f"{name}: missing from the shard")
                if cfg.labels and label is None:
                    raise BadImageError(f"shard {self.shards.root}/{name}: the sample has no .cls label")
                return decode_image(
                    lambda: Image.open(io.BytesIO(data)),
                    f"shard {self.shards.root}/{name}",
                    cfg.resolution,
                    cfg.center_crop,
                    cfg.max_image_pixels,
                    cfg.image_channels,
                )[0]
            except BadImageError as e:
                return str(e)

        with pil_limits_lifted():
            results = list(self._pool.map(decode, named))
        arrays = [r for r in results if not isinstance(r, str)]
        labels = None
        if cfg.labels:  # the good images' classes, in the same order
            labels = torch.tensor([n[2] for n, r in zip(named, results) if not isinstance(r, str)], dtype=torch.int64)
        bad = [r for r in results if isinstance(r, str)]
        if bad:
            if cfg.on_bad_image == "error":
                raise BadImageError(f"{bad[0]} (set data.on_bad_image=skip to skip bad images)")
            self.skipped += len(bad)
            log.warning("skipped %d bad images (%d so far); first: %s", len(bad), self.skipped, bad[0])
            if not arrays:
                raise BadImageError(f"every image of a batch is bad; first: {bad[0]}")
        batch = torch.from_numpy(np.stack(arrays))
        return (batch.pin_memory() if self.pin_memory else batch), labels


def first_images(cfg: DataConfig, count: int) -> np.ndarray:
    """The first `count` good images of the shards in name order, decoded (the reference of the metrics)."""
    shards = open_shards(cfg)
    out: list[np.ndarray] = []
    with pil_limits_lifted():
        for name in shards.names:
            for member, data, _ in _read_samples(shards.root / name):
                try:
                    out.append(
                        decode_image(
                            lambda d=data: Image.open(io.BytesIO(d)),
                            f"{name}:{member}",
                            cfg.resolution,
                            cfg.center_crop,
                            cfg.max_image_pixels,
                            cfg.image_channels,
                        )[0]
                    )
                except BadImageError:
                    if cfg.on_bad_image == "error":
                        raise
                if len(out) == count:
                    return np.stack(out)
    if not out:
        raise UserError(f"data.path: no usable image in the shards of {shards.root}")
    return np.stack(out)
