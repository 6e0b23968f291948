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

from ddpm.errors import UserError


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


# What a write that fails for a reason the user fixes (a path, its permissions, its disk) raises: reported as one
# line naming the path, never as a traceback.
_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}
_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT}  # a write error wherever they come from


def _reason(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


def _within(path: Path, place: Path) -> bool:
    return path == place or place in path.parents


def cannot_write(what: str, path: str | Path, e: OSError) -> UserError:
    """The one-line error for a failed write under `path` ("the run directory", "the report", ...): the path, the
    file that failed when another, and the reason ("Permission denied", "No space left on device", ...)."""
    failed = f" ({e.filename})" if e.filename and Path(os.fsdecode(e.filename)) != Path(path) else ""
    return UserError(f"cannot write {what} {path}{failed}: {_reason(e)}")


def _make_dir(path: Path) -> None:
    """Creates `path` (and its parents) when missing and proves it writable with an empty file, then removed."""
    try:
        path.mkdir(parents=True, exist_ok=True)  # FileExistsError when it is a file
    except FileExistsError:
        if path.is_dir():
            raise
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)) from None
    probe = path / f".write-test-{unique_suffix()}"
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    probe.unlink()


def writable_dir(path: str | Path, what: str) -> Path:
    """`path` as a directory this process can write to, checked before any expensive work: created (with its
    parents) when missing and proven by writing and removing an empty file; else the one-line UserError of
    `cannot_write`. Nothing that exists is changed."""
    path = Path(path).expanduser()
    try:
        _make_dir(path)
    except OSError as e:
        raise cannot_write(what, path, e) from None
    return path


def writable_file(path: str | Path, what: str) -> Path:
    """`path` as a file this process can create or replace: its folder as `writable_dir`, and not a folder itself."""
    path = Path(path).expanduser()
    try:
        _make_dir(path.parent)
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    except OSError as e:
        raise cannot_write(what, path, e) from None
    return path


@contextmanager
def writing(*places: tuple[str, str | Path]) -> Iterator[None]:
    """Turns a failed write under one of `places` ((what, path) pairs, e.g. ("the run directory", run_dir)) into
    the one-line UserError of `cannot_write`, for errors that come after the up-front `writable_dir` check (a
    disk that fills mid-run, a folder removed or made read-only meanwhile). A full or read-only disk is reported
    wherever the file is; other errors outside the places (a dataset that cannot be read, ...) pass unchanged."""
    try:
        yield
    except OSError as e:
        if e.errno not in _PATH_ERRNOS | _DISK_ERRNOS:
            raise
        failed = Path(os.fsdecode(e.filename)).absolute() if e.filename else None
        for what, path in places:
            if failed is None or _within(failed, Path(path).expanduser().absolute()):
                if failed is None and e.errno not in _DISK_ERRNOS:
                    break  # no file named: not surely a write
                raise cannot_write(what, path, e) from None
        if e.errno in _DISK_ERRNOS:
            raise UserError(f"cannot write {failed or 'a file'}: {_reason(e)}") from None
        raise
