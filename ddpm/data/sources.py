"""Where training images come from: the embedded digits, an image folder, or a Hugging Face dataset.

A source is listed once (`list_source`: its items in a fixed order, a fingerprint of their content, and the
folders whose modification times tell cheaply whether it changed since); after that any process reads any share
of its items by position (`item_readers`) without listing it again. Listing is the only per-file work: a warm
start (ddpm.data.cache) skips it when `unchanged(listing.folders)`, which stats folders, not files.

Class labels (`data.labels`, set by a class-conditional model) are read at listing too, one small integer per item
with the class names: the digits' own 0-9; a folder's first-level subfolders (torchvision's ImageFolder convention,
sorted names); a dataset's `data.label_column` (with a ClassLabel feature's names). WebDataset shards carry theirs
in `.cls` members (ddpm.data.shards).
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
    labels: list[int] | None = None  # the class of each item, in `names` order; None when data.labels is off
    class_names: list[str] | None = None  # class index -> name


def source_spec(cfg: DataConfig) -> dict:
    """What the source is, without reading it: part of the cache's key."""
    if cfg.source == "digits":
        return {"source": "digits"}
    local = Path(cfg.path).expanduser()
    if cfg.source == "folder":
        return {"source": "folder", "path": str(local.resolve())}
    path = str(local.resolve()) if local.is_dir() else cfg.path
    return {"source": "hf", "path": path, "split": cfg.split, "column": cfg.image_column}


def label_spec(cfg: DataConfig) -> str:
    """Where the labels come from, "" when none are read: part of the cache's key (absent when "", so the caches of
    unconditional runs keep the keys they had)."""
    if not cfg.labels:
        return ""
    return {"digits": "digit", "folder": "subfolders", "hf": f"column:{cfg.label_column}"}.get(cfg.source, "cls")


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
        listing = Listing(source_spec(cfg), "sklearn-digits-1797", [str(i) for i in range(1797)], {})
        if cfg.labels:
            listing.labels, listing.class_names = _digit_labels(), [str(d) for d in range(10)]
        return listing
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


def _digit_labels() -> list[int]:
    from sklearn.datasets import load_digits

    return [int(y) for y in load_digits().target]


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
        # Hidden folders and files are not data: .ipynb_checkpoints holds Jupyter's copies of the images, ._x.png
        # macOS's resource forks. They are neither images nor classes.
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        folders[folder] = os.stat(folder).st_mtime_ns
        for f in sorted(files):
            if Path(f).suffix.lower() in IMAGE_SUFFIXES and not f.startswith("."):
                path = os.path.join(folder, f)
                st = os.stat(path)
                rel = os.path.relpath(path, root)
                names.append(rel)
                fingerprint.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if not names:
        raise UserError(f"data.path: folder {root} has no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    # os.walk visits a folder before its subfolders: sorting the relative names gives the same order on every walk.
    order = sorted(range(len(names)), key=lambda i: Path(names[i]).parts)
    listing = Listing(source_spec(cfg), fingerprint.hexdigest(), [names[i] for i in order], folders)
    if cfg.labels:
        listing.labels, listing.class_names = _folder_labels(root, listing.names)
    return listing


def _folder_labels(root: Path, names: list[str]) -> tuple[list[int], list[str]]:
    """ImageFolder's convention: the first-level subfolders are the classes, in sorted order; an image of a
    subfolder's subfolders belongs to it."""
    loose = [n for n in names if len(Path(n).parts) == 1]
    if loose:
        raise UserError(
            f"data.path: {root / loose[0]} lies at the top level of a labelled folder "
            f"({len(loose)} image{'s' if len(loose) > 1 else ''} there); a class-conditional model (model.num_classes) "
            f"or data.labels needs every image inside a class subfolder"
        )
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    used = {Path(n).parts[0] for n in names}
    empty = [c for c in classes if c not in used]
    if empty:
        raise UserError(f"data.path: the class folder {root / empty[0]} holds no image files")
    index = {c: i for i, c in enumerate(classes)}
    return [index[Path(n).parts[0]] for n in names], classes


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
    if cfg.labels and not cfg.label_column:
        raise UserError(f"data.label_column: a class-conditional run on {cfg.path} needs the column of its labels")
    if cfg.labels and cfg.label_column not in ds.column_names:
        raise UserError(
            f"data.label_column: {cfg.label_column!r} is not a column of {cfg.path} "
            f"(columns: {', '.join(ds.column_names)})"
        )
    if isinstance(ds.features[cfg.image_column], datasets.Image):  # decode ourselves: a corrupt row is named
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    return ds, ds._fingerprint, folders


def _list_hf(cfg: DataConfig) -> Listing:
    ds, fingerprint, folders = _load_hf(cfg)
    listing = Listing(source_spec(cfg), fingerprint, [str(i) for i in range(len(ds))], folders)
    if cfg.labels:
        listing.labels, listing.class_names = _hf_labels(ds, cfg)
    return listing


def _hf_labels(ds, cfg: DataConfig) -> tuple[list[int], list[str]]:
    """The label column as class indices; the names of a ClassLabel feature, else the indices as names."""
    import datasets

    feature = ds.features[cfg.label_column]
    values = ds[cfg.label_column]
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    for row, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (names is not None and v >= len(names)):
            raise UserError(
                f"data.label_column: row {row} of {cfg.path} holds {v!r}, not a class index"
                + (f" in 0..{len(names) - 1}" if names else " (a non-negative integer)")
            )
    return list(values), names or [str(i) for i in range(max(values) + 1)]


def _hf_reader(ds, i: int, column: str) -> Reader:
    def read() -> Image.Image:
        value = ds[i][column]
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict):
            return Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        raise BadImageError(f"column {column!r} holds {type(value).__name__}, not images")

    return read
