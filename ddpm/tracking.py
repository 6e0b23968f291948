"""Run tracking: a local JSON-lines metrics file always, Weights & Biases when enabled.

W&B runs offline when no API key is set (WANDB_MODE, when set, wins). The run id is stored in
the run directory, so a resumed or requeued run continues the same W&B run.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import secrets
import socket
import string
import subprocess
from pathlib import Path
from typing import Any

from ddpm.config import TrackingConfig

log = logging.getLogger(__name__)


def wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
        if netrc.netrc().authenticators(host):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


def run_metadata() -> dict[str, Any]:
    """Where and from what code a run ran: goes into the W&B config so runs line up in comparisons."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return {
        "git_sha": os.environ.get("DDPM_GIT_SHA", sha),
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "slurm_nodelist": os.environ.get("SLURM_JOB_NODELIST", ""),
    }


class Tracker:
    """Logs from the main process only; other ranks get a tracker that does nothing."""

    def __init__(
        self,
        cfg: TrackingConfig,
        run_dir: Path,
        run_name: str,
        config: dict,
        job_type: str = "train",
        group: str = "",
        enabled: bool = True,
        resume_step: int = 0,
    ):
        self.enabled = enabled
        self.run = None
        self.metrics_path = run_dir / "metrics.jsonl"
        if not enabled:
            return
        _truncate_after(self.metrics_path, resume_step)  # a resumed run rewrites the steps after its checkpoint
        if not cfg.wandb:
            return
        import wandb

        id_path = run_dir / "wandb_run_id"
        run_id = id_path.read_text().strip() if id_path.is_file() else _new_run_id()
        id_path.write_text(run_id)
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity or None,
            group=cfg.group or group or None,
            job_type=job_type,
            name=run_name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
            tags=list(cfg.tags),
            mode=wandb_mode(),
            settings=wandb.Settings(console="off", quiet=True),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def alert(self, title: str, text: str) -> None:
        """A W&B alert (e-mail or Slack, as the user set it up) where the run is online; the log has the line
        already. Offline runs have no alerts, and a failing alert never stops training."""
        if self.run is not None and getattr(self.run.settings, "mode", "") == "online":
            try:
                self.run.alert(title=title, text=text)
            except Exception as e:  # the network, the W&B service: the warning in the log is what matters
                log.warning("W&B alert %r not sent: %s", title, e)

    def define_best(self, keys: list[str]) -> None:
        """The run summary keeps the lowest value of these keys (not the last): the W&B project table then sorts
        runs by their best score."""
        if self.run is not None:
            for key in keys:
                self.run.define_metric(key, summary="min")

    def log_against(self, x_key: str, x: int, metrics: dict[str, float]) -> None:
        """Metrics plotted against `x_key` (e.g. the training step of an evaluated checkpoint) instead of this run's
        own step: a rerun that logs the same x again is kept, where W&B drops a step that does not increase."""
        if self.run is not None:
            for key in metrics:
                self.run.define_metric(key, step_metric=x_key)
            self.run.log({x_key: x, **metrics})

    def log_image(self, key: str, path: Path, step: int, caption: str = "") -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path), caption=caption)}, step=step)

    def log_table(
        self,
        key: str,
        columns: list[str],
        rows: list[list[Any]],
        row_images: dict[int, Path] | None = None,
        images: dict[str, Path] | None = None,
    ) -> None:
        """A W&B Table (`row_images` maps a row index to a picture in an extra "grid" column) and
        named pictures, in one entry with no step, so a resumed run appends rather than rewrites."""
        if self.run is None:
            return
        import wandb

        if row_images is not None:
            columns = [*columns, "grid"]
            rows = [[*row, wandb.Image(str(row_images[i])) if i in row_images else None] for i, row in enumerate(rows)]
        self.run.log(
            {
                key: wandb.Table(columns=columns, data=rows),
                **{k: wandb.Image(str(p)) for k, p in (images or {}).items()},
            }
        )

    def summarize(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits  # W&B's own id alphabet
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return

    def step_of(line: str) -> int | None:
        try:
            return json.loads(line).get("step", 0)
        except ValueError:  # a line half-written when the process was killed
            return None

    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if (s := step_of(line)) is not None and s <= step]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))
