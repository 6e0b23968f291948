"""Writing WebDataset shards (`ddpm prepare --format webdataset`), split over the tasks of a job; the format and the
reader are in ddpm.data.shards."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from ddpm.config import DataConfig
from ddpm.data.images import BadImageError
from ddpm.data.shards import INDEX
from ddpm.data.sources import Items, list_source
from ddpm.files import exclusive, unique_suffix, write_json


def write_shards(
    cfg: DataConfig, out: Path, part: int = 0, parts: int = 1, listed_after: float = 0.0, show_progress: bool = True
) -> bool:
    """Write this task's shards (j % parts == part) of `data.shard_size` samples each, in source order, from the
    source's stored bytes; the task that finds every shard written writes shards.json. True when complete."""
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out / ".listing.lock"):  # the tasks of one job list the source once
        listing_file = out / ".listing.json"
        listing = json.loads(listing_file.read_text()) if listing_file.is_file() else None
        stale = listing is not None and (listing.get("labels") is not None) != cfg.labels  # labels asked or dropped
        if listing is None or stale or listing["listed_at"] < listed_after:
            started = time.time()
            found = list_source(cfg)
            listing = {"spec": found.spec, "names": found.names, "listed_at": started,
                       "labels": found.labels, "class_names": found.class_names}  # fmt: skip
            write_json(listing_file, listing)
    names, size, labels = listing["names"], cfg.shard_size, listing.get("labels")
    num = max(1, -(-len(names) // size))
    items = Items(cfg, listing["spec"])
    mine = [j for j in range(num) if j % parts == part and not (out / f".shard-{j:06d}.json").is_file()]
    total = sum(len(names[j * size : (j + 1) * size]) for j in mine)
    with tqdm(
        total=total, desc=f"writing shards to {out}", unit="img", disable=not show_progress, mininterval=1.0
    ) as bar:
        for j in mine:
            tmp = out / f".shard-{j:06d}.tar.{unique_suffix()}.tmp"
            count, skipped = 0, []
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                for i, name in enumerate(names[j * size : (j + 1) * size], start=j * size):
                    bar.update(1)
                    try:
                        data, ext = items.encoded(name)
                    except (OSError, BadImageError) as e:
                        if cfg.on_bad_image == "error":
                            raise BadImageError(f"{items.display_name(name)}: cannot read it ({e})") from None
                        skipped.append(items.display_name(name))
                        continue
                    info = tarfile.TarInfo(f"{i:09d}.{ext or 'img'}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644  # no times: the same bytes every time
                    tar.addfile(info, io.BytesIO(data))
                    if labels is not None:  # WebDataset's class label: the index as ASCII, beside the image
                        cls = str(labels[i]).encode()
                        info = tarfile.TarInfo(f"{i:09d}.cls")
                        info.size, info.mtime, info.mode = len(cls), 0, 0o644
                        tar.addfile(info, io.BytesIO(cls))
                    count += 1
            tmp.rename(out / f"shard-{j:06d}.tar")
            write_json(out / f".shard-{j:06d}.json", {"count": count, "skipped": skipped})
    with exclusive(out / ".listing.lock"):
        if (out / INDEX).is_file() and all((out / f"shard-{j:06d}.tar").is_file() for j in range(num)):
            return True
        records = [out / f".shard-{j:06d}.json" for j in range(num)]
        if not all(r.is_file() for r in records):
            return False
        entries = [{"name": f"shard-{j:06d}.tar", **json.loads(r.read_text())} for j, r in enumerate(records)]
        write_json(
            out / INDEX,
            {
                "format": "webdataset",
                "source": listing["spec"],
                "count": sum(e["count"] for e in entries),
                "shards": [{"name": e["name"], "count": e["count"]} for e in entries],
                "skipped": [s for e in entries for s in e["skipped"]],
                **({"class_names": listing["class_names"]} if labels is not None else {}),
            },
        )
    return True
