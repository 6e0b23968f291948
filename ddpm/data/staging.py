"""Node-local staging (`data.stage_dir`): a complete cache copied once per node to local disk, where reads are
fastest and the shared file system is left alone during training."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from pathlib import Path

from tqdm.auto import tqdm

from ddpm.errors import UserError
from ddpm.files import exclusive, unique_suffix

log = logging.getLogger(__name__)


def stage(path: Path, stage_dir: str, show_progress: bool = True) -> Path:
    """A copy of the complete cache `path` under `stage_dir` (node-local disk), made once per node: the first
    process of the node copies under a lock, the others find it complete."""
    base = Path(os.path.expandvars(stage_dir)).expanduser()
    if "$" in str(base):
        raise UserError(f"data.stage_dir: {stage_dir!r} names a variable that is not set on {socket.gethostname()}")
    dest_root = base / "ddpm-cache"
    dest = dest_root / path.name
    try:
        dest_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"data.stage_dir: cannot create {dest_root} on {socket.gethostname()} ({e})") from None
    with exclusive(dest_root / f".{path.name}.lock"):
        if (dest / "meta.json").is_file():
            return dest
        files = sorted(path.iterdir(), key=lambda p: p.name == "meta.json")  # meta.json last
        need = sum(f.stat().st_size for f in files)
        free = shutil.disk_usage(dest_root).free
        if need > free:
            raise UserError(
                f"data.stage_dir: the cache needs {need / 2**30:.1f} GiB, {dest_root} on {socket.gethostname()} has "
                f"{free / 2**30:.1f} GiB free"
            )
        tmp = dest_root / f".tmp-{path.name}-{unique_suffix()}"
        tmp.mkdir()
        start = time.perf_counter()
        try:
            with tqdm(
                total=need,
                desc=f"staging the cache to {dest_root}",
                unit="B",
                unit_scale=True,
                disable=not show_progress,
                mininterval=1.0,
            ) as bar:
                for f in files:
                    shutil.copyfile(f, tmp / f.name)
                    bar.update(f.stat().st_size)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("staged %s to %s: %.1f GiB in %.1f s", path.name, dest_root, need / 2**30, time.perf_counter() - start)
    return dest
