"""Writing files that other processes, on this node or another, may read or write at the same time."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def unique_suffix() -> str:
    """For temporary names beside their target: pids repeat across the nodes of a shared filesystem."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_json(path: Path, data: Any) -> None:
    """Whole or not at all: written to a temporary file, then renamed over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{unique_suffix()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def no_world_writable_files() -> None:
    """Whatever a job writes (run directories, checkpoints, locks, pipelines) is never writable by other users of a
    shared machine, whatever umask the job was started with; group write stays the user's choice."""
    os.umask(os.umask(0) | 0o002)


@contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Held by one process at a time, on this node or another: an fcntl lock of `lock_file` (fcntl locks hold
    across NFS and Lustre clients mounted with locking; where they are node-local, callers must stay correct,
    only slower, when two holders overlap)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with claimed(lock_file, wait=True):
        yield


@contextmanager
def claimed(lock_file: Path, wait: bool) -> Iterator[bool]:
    """`exclusive` for one piece of work that several jobs may offer to do: yields True when this process holds it;
    without `wait`, yields False at once while another process holds it. The lock file's folder must exist: one
    that has gone raises FileNotFoundError (the work was finished and moved meanwhile)."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except OSError as e:  # EAGAIN or EACCES: held elsewhere
            if wait or e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            held = False
        yield held
    finally:
        os.close(fd)  # closing releases the lock
