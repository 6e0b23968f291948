"""One live run per run directory: `<run>/lock.json`, taken before training and refreshed while it runs."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from ddpm.errors import UserError

log = logging.getLogger(__name__)


class RunLock:
    """`<run>/lock.json` holds the owner's host, pid and SLURM job. A second launch is refused with
    the owner named, unless the owner is gone: its pid is dead on this host, it is an earlier
    attempt of the same SLURM job (a requeue), or it stopped refreshing the lock for `stale_after` s."""

    def __init__(self, run_dir: Path, stale_after: float = 900.0):
        self.path = run_dir / "lock.json"
        self.stale_after = stale_after
        self.owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The owner is written to a private file first and hard-linked into place: the link fails if a
        # lock exists, and a lock that exists is always complete (no window where it is empty).
        mine = self.path.with_name(f".lock-{self.owner['host']}-{self.owner['pid']}")
        mine.write_text(json.dumps(self.owner))
        try:
            self._acquire(mine)
        finally:
            mine.unlink(missing_ok=True)

    def _acquire(self, mine: Path) -> None:
        for _ in range(2):
            try:
                os.link(mine, self.path)
            except FileExistsError:
                holder = self._holder()
                stale = self._stale_reason(holder)
                if stale is None:
                    raise UserError(
                        f"run directory {self.path.parent} is in use by pid {holder.get('pid')} "
                        f"on {holder.get('host')} "
                        f"since {holder.get('started')} (lock {self.path}); stop that run, or choose another name="
                    ) from None
                log.warning("taking over the lock of %s: %s", self.path.parent, stale)
                self.path.unlink(missing_ok=True)
                continue
            return
        raise UserError(f"cannot take the lock {self.path}: another launch is racing for it")

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _stale_reason(self, holder: dict) -> str | None:
        if not holder:
            return "the lock file is empty or unreadable"
        if holder.get("host") == self.owner["host"]:
            if holder.get("pid") == self.owner["pid"]:
                return "held by this process"
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return f"pid {holder['pid']} on this host has exited"
            except (PermissionError, ValueError, KeyError):
                pass
            else:
                return None  # alive on this host: held, however long since it refreshed the lock
        if self.owner["slurm_job_id"] and holder.get("slurm_job_id") == self.owner["slurm_job_id"]:
            return f"held by an earlier attempt of SLURM job {holder['slurm_job_id']} (requeued)"
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "the lock vanished"
        if age > self.stale_after:
            return f"not refreshed for {age:.0f} s"
        return None

    def refresh(self) -> None:
        """Heartbeat: the holder touches the lock so other hosts can tell it is alive."""
        try:
            os.utime(self.path)
        except OSError:
            pass

    def release(self) -> None:
        if self._holder().get("pid") == self.owner["pid"] and self._holder().get("host") == self.owner["host"]:
            self.path.unlink(missing_ok=True)
