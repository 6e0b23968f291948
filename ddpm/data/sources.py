"""Where training images come from: the embedded digits, an image folder, or a Hugging Face dataset.

A source is listed once (`list_source`: its items in a fixed order, a fingerprint of their content, and the
folders whose modification times tell cheaply whether it changed since); after that any process reads any share
of its items by position (`item_readers`) without listing it again. Listing is the only per-file work: a warm
start (ddpm.data.cache) skips it when `unchanged(listing.folders)`, which stats folders, not files.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ddpm.config import DataConfig
from ddpm.data.images import BadImageError
from ddpm.errors import UserError

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

Reader = Callable[[], Image.Image]


@dataclass
class Listing:
    spec: dict  # what the source is (kind, path, split, column): no per-item data
    fingerprint: str  # changes when the content changes (files' names, sizes, mtimes; a dataset's fingerprint)
    names: list[str]  # the items in cache order: file paths relative to the folder, or row numbers
    folders: dict[str, int]  # folder -> st_mtime_ns when listed (see `unchanged`)


def source_spec(cfg: DataConfig) -> dict:
    """What the source is, without reading it: part of the cache's key."""
    if cfg.source == "digits":
        return {"source": "digits"}
    local = Path(cfg.path).expanduser()
    if cfg.source == "folder":
        return {"source": "folder", "path": str(local.resolve())}
    path = str(local.resolve()) if local.is_dir() else cfg.path
    return {"source": "hf", "path": path, "split": cfg.split, "column": cfg.image_column}


def unchanged(folders: dict[str, int]) -> bool:
    """Whether every folder still has the modification time it had when listed: adding, removing or renaming an
    entry changes its folder's time on every POSIX file system (Lustre and GPFS included). A file rewritten in
    place keeps its folder's time: `data.refresh=true` lists the source again."""
    for folder, mtime_ns in folders.items():
        try:
            if os.stat(folder).st_mtime_ns != mtime_ns:
                return False
        except OSError:
            return False
    return True


def list_source(cfg: DataConfig) -> Listing:
    if cfg.source == "digits":
        return Listing(source_spec(cfg), "sklearn-digits-1797", [str(i) for i in range(1797)], {})
    if cfg.source == "folder":
        return _list_folder(cfg)
    return _list_hf(cfg)


class Items:
    """Reads a listed source's items by name, in any share, without listing it again; one per process."""

    def __init__(self, cfg: DataConfig, listing_spec: dict):
        self.cfg, self.spec = cfg, listing_spec
        self._digits: np.ndarray | None = None
        self._dataset = None

    def display_name(self, name: str) -> str:
        """What an error message calls the item: the file's path, or the dataset row."""
        if self.cfg.source == "folder":
            return str(Path(self.spec["path"]) / name)
        if self.cfg.source == "digits":
            return f"digits[{name}]"
        return f"{self.cfg.path}[{self.cfg.split}][{name}]"

    def reader(self, name: str) -> Reader:
        if self.cfg.source == "folder":
            return lambda p=Path(self.spec["path"]) / name: Image.open(p)
        if self.cfg.source == "digits":
            return lambda a=self.digits[int(name)]: Image.fromarray(a, "L")
        return _hf_reader(self.dataset, int(name), self.cfg.image_column)

    def encoded(self, name: str) -> tuple[bytes, str]:
        """The item's bytes as stored (a file's own bytes, a dataset's encoded image) and its format's suffix,
        for writing shards without decoding; the digits are encoded as PNG."""
        if self.cfg.source == "folder":
            path = Path(self.spec["path"]) / name
            return path.read_bytes(), path.suffix.lower().lstrip(".")
        if self.cfg.source == "digits":
            buf = io.BytesIO()
            Image.fromarray(self.digits[int(name)], "L").save(buf, format="PNG")
            return buf.getvalue(), "png"
        value = self.dataset[int(name)][self.cfg.image_column]
        if isinstance(value, dict) and value.get("bytes"):
            try:
                fmt = (Image.open(io.BytesIO(value["bytes"])).format or "png").lower()
            except Exception:
                fmt = "png"  # unreadable: written as is, and named by the reader of the shard
            return value["bytes"], {"jpeg": "jpg"}.get(fmt, fmt)
        if isinstance(value, dict) and value.get("path"):
            return Path(value["path"]).read_bytes(), Path(value["path"]).suffix.lower().lstrip(".")
        raise BadImageError(f"{self.display_name(name)}: column {self.cfg.image_column!r} holds no encoded image")

    @property
    def digits(self) -> np.ndarray:
        if self._digits is None:
            self._digits = _digit_pixels()
        return self._digits

    @property
    def dataset(self):
        if self._dataset is None:
            self._dataset = _load_hf(self.cfg)[0]
        return self._dataset


# --------------------------------------------------------------------------------------


def _digit_pixels() -> np.ndarray:
    from sklearn.datasets import load_digits

    digits = load_digits().images  # (1797, 8, 8) floats in 0..16, shipped inside scikit-learn
    # Ink is dark on white, as on paper; the 8x8 digits are bold strokes with a blank border.
    return (255 - np.clip(digits * 16, 0, 255)).astype(np.uint8)


def _list_folder(cfg: DataConfig) -> Listing:
    root = Path(cfg.path).expanduser()
    if not root.exists():
        raise UserError(f"data.path: folder {root} does not exist")
    if not root.is_dir():
        raise UserError(f"data.path: {root} is not a folder")
    root = root.resolve()
    names: list[str] = []
    folders: dict[str, int] = {}
    fingerprint = hashlib.sha256()
    # One walk: every folder's time (the warm start's check) and every image's name, size and time (the content).
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        folders[folder] = os.stat(folder).st_mtime_ns
        for f in sorted(files):
            if Path(f).suffix.lower() in IMAGE_SUFFIXES:
                path = os.path.join(folder, f)
                st = os.stat(path)
                rel = os.path.relpath(path, root)
                names.append(rel)
                fingerprint.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if not names:
        raise UserError(f"data.path: folder {root} has no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    # os.walk visits a folder before its subfolders: sorting the relative names gives the same order on every walk.
    order = sorted(range(len(names)), key=lambda i: Path(names[i]).parts)
    return Listing(source_spec(cfg), fingerprint.hexdigest(), [names[i] for i in order], folders)


def _load_hf(cfg: DataConfig):
    """(dataset with undecoded images, fingerprint, folders to watch)."""
    import datasets

    local = Path(cfg.path).expanduser()
    try:
        if local.is_dir():
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise UserError(f"data.split: {cfg.split!r} is not in {local} (splits: {', '.join(ds)})")
                ds = ds[cfg.split]
            # save_to_disk writes new files into these folders: their times change with the dataset.
            folders = {d: os.stat(d).st_mtime_ns for d, _, _ in os.walk(local.resolve())}
        else:
            ds = datasets.load_dataset(cfg.path, split=cfg.split)
            folders = {}  # a Hub dataset is listed again on data.refresh=true only
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
    if isinstance(ds.features[cfg.image_column], datasets.Image):  # decode ourselves: a corrupt row is named
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    return ds, ds._fingerprint, folders


def _list_hf(cfg: DataConfig) -> Listing:
    ds, fingerprint, folders = _load_hf(cfg)
    return Listing(source_spec(cfg), fingerprint, [str(i) for i in range(len(ds))], folders)


def _hf_reader(ds, i: int, column: str) -> Reader:
    def read() -> Image.Image:
        value = ds[i][column]
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict):
            return Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        raise BadImageError(f"column {column!r} holds {type(value).__name__}, not images")

    return read
