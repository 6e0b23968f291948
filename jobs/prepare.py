"""Prepare job: decode a dataset into the training cache, or write it as WebDataset shards, before any GPU waits.

ddpm prepare --config configs/butterflies-64.yaml        # the cache that `ddpm train` with this config opens
ddpm prepare ... --part 0/4                               # parts 0, 4, 8, ... only (array task 0 of 4)
ddpm prepare --format webdataset --out /data/shards ...   # tar shards; then train with data.source=webdataset
ddpm submit prepare --cluster PROFILE --tasks 8 ...       # an array of CPU tasks; train with --after JOB_ID

Reads a training config (only its `data` section counts; the rest is ignored), so the same file prepares and
trains. A stopped job keeps its finished parts; run it again to finish.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ddpm.config import Config, DataConfig, validate_config
from ddpm.errors import ConfigError
from ddpm.typed_config import build_config, read_tree


@dataclass
class PrepareConfig:
    data: DataConfig = field(default_factory=DataConfig)  # the dataset, as in the training config
    format: Literal["cache", "webdataset"] = "cache"  # cache: what ddpm train opens; webdataset: tar shards to stream
    out: str = ""  # webdataset: the folder to write the shards to
    part: str = ""  # I/N: only parts I, I+N, ... of the work (task I of a SLURM array); "" all
    listed_after: float = 0.0  # list the source again if its listing is older than this Unix time (set by submit)

    def validate(self) -> None:
        if self.format == "webdataset" and not self.out:
            raise ConfigError("--out is required with --format webdataset: the folder to write the shards to")
        if self.format == "cache" and self.out:
            raise ConfigError("--out is for --format webdataset; the cache goes to data.cache_dir")
        if self.data.source == "webdataset":
            raise ConfigError("data.source=webdataset is streamed as it is: there is nothing to prepare")
        validate_config(Config(data=self.data))  # the data section's checks, as training makes them
        self.share()

    def share(self) -> tuple[int, int]:
        if not self.part:
            return 0, 1
        i, sep, n = self.part.partition("/")
        if not (sep and i.isdigit() and n.isdigit() and int(i) < int(n)):
            raise ConfigError(f"--part {self.part!r}: expected I/N with 0 <= I < N, e.g. 0/4")
        return int(i), int(n)


CONFIG = PrepareConfig


def load(path: str | None, overrides: list[str] = (), values: dict | None = None) -> PrepareConfig:
    tree = read_tree(path, overrides, values)
    known = {"data", "format", "out", "part", "listed_after"}
    # A training config's other sections (model, optim, train, ...) are not this job's business.
    cfg = build_config(PrepareConfig, {k: v for k, v in tree.items() if k in known})
    if (tree.get("model") or {}).get("num_classes", 0) != 0:
        cfg.data.labels = True  # a class-conditional training config prepares the labelled data it trains on
    cfg.validate()
    return cfg


def describe(cfg: PrepareConfig) -> str:
    d = cfg.data
    where = d.path or "the embedded digits"
    target = cfg.out if cfg.format == "webdataset" else "the cache"
    return f"# prepare {where} ({d.source}) as {cfg.format} -> {target}, part {cfg.part or 'all'}"


def run(cfg: PrepareConfig) -> Path | None:
    """Returns the cache or shard folder when complete, None when other tasks' parts are still missing."""
    from ddpm.data.cache import build_parts, cache_root, finish_build, plan_cache
    from ddpm.data.shard_writer import write_shards
    from ddpm.files import writable_dir, writing

    part, parts = cfg.share()
    listed_after = max(cfg.listed_after, time.time() if cfg.data.refresh else 0.0)
    start = time.perf_counter()
    if cfg.format == "webdataset":
        out = writable_dir(Path(cfg.out).expanduser(), "the shard folder")  # before listing or reading the source
        with writing(("the shard folder", out)):
            done = write_shards(cfg.data, out, part, parts, listed_after)
        result = out
    else:
        root = writable_dir(cache_root(cfg.data), "the data cache directory")
        with writing(("the data cache directory", root)):
            plan = plan_cache(cfg.data, root, listed_after)
            done = True
            if plan["build"]:
                build_parts(cfg.data, root / plan["build"], part, parts)
                done = finish_build(cfg.data, root, plan)
        result = root / plan["content"]
    took = time.perf_counter() - start
    if done:
        print(f"prepared: {result} ({took:.1f} s)", flush=True)
        return result
    print(f"part {part}/{parts} done in {took:.1f} s; the other parts are still being written to {result.parent}")
    return None
