"""Training images: decoded and resized once into a memory-mapped uint8 cache, then served as batches.

Sources: the embedded digits (scikit-learn's 1,797 handwritten 8x8 digits, no network), a local
folder of images in any format PIL reads, or a Hugging Face dataset (hub name or save_to_disk
folder). Each source is decoded once (ddpm.images) into `<cache>/<key>/shard-*.npy`, (N, H, W, C)
uint8 with C = 1 (grey) or 3 (RGB), where the key hashes the source, the resolution, the channels
and the preprocessing; later epochs and runs memory-map the shards, so a dataset larger than RAM
streams from disk and a rank reads only its own batches (ddpm.batches: the order, the loader, and
flip and scaling on the training device).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile
from tqdm.auto import tqdm

from ddpm.config import DataConfig
from ddpm.errors import UserError
from ddpm.files import unique_suffix
from ddpm.images import BadImageError, decode_image

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when decoding or resizing changes, so old caches are not reused
IMAGE_SUFFIXES = {
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".pbm",
    ".tga",
    ".ico",
}


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("DDPM_CACHE", Path.home() / ".cache" / "ddpm")) / "datasets"


# --------------------------------------------------------------------------------------
# Sources: each yields (name, read) pairs; read() opens the image lazily.


def _digits_source() -> tuple[dict, list[tuple[str, Callable[[], Image.Image]]]]:
    from sklearn.datasets import load_digits

    digits = load_digits().images  # (1797, 8, 8) floats in 0..16, shipped inside scikit-learn
    # Ink is dark on white, as on paper; the 8x8 digits are bold strokes with a blank border.
    pixels = (255 - np.clip(digits * 16, 0, 255)).astype(np.uint8)
    items = [(f"digits[{i}]", (lambda a=a: Image.fromarray(a, "L"))) for i, a in enumerate(pixels)]
    return {"source": "digits", "count": len(items)}, items


def _folder_source(path: str) -> tuple[dict, list[tuple[str, Callable[[], Image.Image]]]]:
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"data.path: folder {root} does not exist")
    if not root.is_dir():
        raise UserError(f"data.path: {root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"data.path: folder {root} has no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    # The fingerprint changes when a file is added, removed or rewritten, so the cache is rebuilt.
    fingerprint = hashlib.sha256()
    for p in files:
        st = p.stat()
        fingerprint.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    spec = {"source": "folder", "path": str(root.resolve()), "files": fingerprint.hexdigest()}
    return spec, [(str(p), (lambda p=p: Image.open(p))) for p in files]


def _hf_source(cfg: DataConfig) -> tuple[dict, list[tuple[str, Callable[[], Image.Image]]]]:
    import datasets

    local = Path(cfg.path).expanduser()
    try:
        if local.is_dir():
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise UserError(f"data.split: {cfg.split!r} is not in {local} (splits: {', '.join(ds)})")
                ds = ds[cfg.split]
            spec = {"source": "hf", "path": str(local.resolve()), "fingerprint": ds._fingerprint}
        else:
            ds = datasets.load_dataset(cfg.path, split=cfg.split)
            spec = {"source": "hf", "path": cfg.path, "split": cfg.split, "fingerprint": ds._fingerprint}
    except UserError:
        raise
    except FileNotFoundError as e:
        raise UserError(f"data.path: dataset {cfg.path!r} not found locally or on the Hub ({e})") from None
    except Exception as e:  # datasets raises many types: offline, missing split, bad repo id
        raise UserError(
            f"data.path: cannot load dataset {cfg.path!r} split {cfg.split!r} "
            f"({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    if cfg.image_column not in ds.column_names:
        raise UserError(
            f"data.image_column: {cfg.image_column!r} is not a column of {cfg.path} "
            f"(columns: {', '.join(ds.column_names)})"
        )
    if len(ds) == 0:
        raise UserError(f"data.path: dataset {cfg.path!r} split {cfg.split!r} is empty")
    spec["split"], spec["column"] = cfg.split, cfg.image_column
    feature = ds.features[cfg.image_column]
    if isinstance(feature, datasets.Image):  # decode ourselves, so a corrupt row is named and handled
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))

    def reader(i: int) -> Callable[[], Image.Image]:
        def read() -> Image.Image:
            value = ds[i][cfg.image_column]
            if isinstance(value, Image.Image):
                return value
            if isinstance(value, dict):
                return Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
            raise BadImageError(f"column {cfg.image_column!r} holds {type(value).__name__}, not images")

        return read

    return spec, [(f"{cfg.path}[{cfg.split}][{i}]", reader(i)) for i in range(len(ds))]


def _source(cfg: DataConfig) -> tuple[dict, list[tuple[str, Callable[[], Image.Image]]]]:
    if cfg.source == "digits":
        return _digits_source()
    if cfg.source == "folder":
        return _folder_source(cfg.path)
    return _hf_source(cfg)


# --------------------------------------------------------------------------------------
# The cache.


@dataclass
class ImageCache:
    """Memory-mapped (N, H, W, C) uint8 shards (C = 1 grey or 3 RGB); `take` gathers any set of rows."""

    path: Path
    shards: list[np.ndarray]
    meta: dict

    def __len__(self) -> int:
        return self.meta["count"]

    @property
    def resolution(self) -> int:
        return self.meta["resolution"]

    @property
    def channels(self) -> int:
        return self.meta.get("channels", 3)

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Rows in the given order; each shard is read with sorted indices, touching only those pages."""
        size = self.meta["shard_size"]
        out = np.empty((len(indices), self.resolution, self.resolution, self.channels), dtype=np.uint8)
        shard_of = indices // size
        for s in np.unique(shard_of):
            where = np.nonzero(shard_of == s)[0]
            rows = indices[where] - s * size
            order = np.argsort(rows)
            out[where[order]] = self.shards[s][rows[order]]
        return out


def open_cache(cfg: DataConfig, show_progress: bool = True) -> ImageCache:
    """Open the cache for this source and preprocessing, building it first if it is missing."""
    spec, items = _source(cfg)
    key_fields = dict(
        spec,
        resolution=cfg.resolution,
        channels=cfg.image_channels,
        center_crop=cfg.center_crop,
        on_bad_image=cfg.on_bad_image,
        max_image_pixels=cfg.max_image_pixels,
        version=CACHE_VERSION,
    )
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root(cfg) / f"{spec['source']}-{cfg.resolution}px-{key}"
    if not (path / "meta.json").is_file():
        # decode_image checks the size against data.max_image_pixels itself, on the header, with a message
        # naming the setting; PIL's own guard would fire first with its own limit, so it is lifted meanwhile.
        saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        # a truncated file is an error, not a grey band
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
        try:
            _build_cache(path, items, cfg, key_fields, show_progress)
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved
    meta = json.loads((path / "meta.json").read_text())
    shards = [np.load(path / f"shard-{i:05d}.npy", mmap_mode="r") for i in range(meta["num_shards"])]
    return ImageCache(path=path, shards=shards, meta=meta)


def _build_cache(path: Path, items: list, cfg: DataConfig, key_fields: dict, show_progress: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{unique_suffix()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    res, size = cfg.resolution, cfg.shard_size
    buffer = np.empty((min(size, len(items)), res, res, cfg.image_channels), dtype=np.uint8)
    filled, count, num_shards, upsampled = 0, 0, 0, 0
    skipped: list[str] = []

    def decode(item: tuple[str, Callable]) -> tuple[str, np.ndarray | None, bool | str]:
        name, read = item
        try:
            array, up = decode_image(read, name, res, cfg.center_crop, cfg.max_image_pixels, cfg.image_channels)
            return name, array, up
        except BadImageError as e:
            return name, None, str(e)

    def flush() -> None:
        nonlocal filled, num_shards
        np.save(tmp / f"shard-{num_shards:05d}.npy", buffer[:filled])
        num_shards, filled = num_shards + 1, 0

    try:
        # Threads: PIL releases the GIL while decoding and resizing.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            progress = tqdm(
                pool.map(decode, items),
                total=len(items),
                desc=f"caching {key_fields['source']} at {res}px",
                unit="img",
                disable=not show_progress,
                mininterval=1.0,
            )
            for _name, array, status in progress:
                if array is None:
                    if cfg.on_bad_image == "error":
                        pool.shutdown(wait=False, cancel_futures=True)  # report now, not after decoding the rest
                        raise BadImageError(f"{status} (set data.on_bad_image=skip to skip bad files)")
                    skipped.append(status)
                    continue
                upsampled += bool(status)
                buffer[filled] = array
                filled, count = filled + 1, count + 1
                if filled == size:
                    flush()
        if filled:
            flush()
        if count == 0:
            raise UserError(
                f"data: no usable image in {key_fields.get('path', key_fields['source'])} "
                f"({len(skipped)} skipped as bad)"
            )
        meta = dict(
            key_fields, count=count, shard_size=size, num_shards=num_shards, skipped=skipped, upsampled=upsampled
        )
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(path)  # atomic: a cache directory is complete or absent
        except OSError:
            if not (path / "meta.json").is_file():  # another process won the race with a complete cache: use it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if upsampled:
        log.warning("%d of %d images are smaller than %dpx and were upsampled", upsampled, count, res)
    if skipped:
        log.warning("skipped %d bad images (listed in %s/meta.json); first: %s", len(skipped), path, skipped[0])
