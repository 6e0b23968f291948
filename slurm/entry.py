"""What runs on the nodes: one callable per job kind, pickled by submitit at submission.

Each task is handed the job's `run(cfg)` (a module-level function such as jobs.train.run): pickle stores it by
reference, so the node imports it from the job's code snapshot; this layer knows nothing of the jobs themselves.

Training handles its own stop signal (ddpm.training.loop.StopRequest: every rank learns of it at the next
log step, the checkpoint is written collectively) and then requeues the job itself; submitit's own
handler only calls `checkpoint()` on global rank 0, before the other ranks know anything. Sweep
shards use submitit's requeue as it is: their unit of work is a cell, and finished cells are skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from ddpm.errors import RunStopped

log = logging.getLogger(__name__)


def _setup_logging() -> None:
    from ddpm.files import no_world_writable_files

    no_world_writable_files()  # every task's first call: nothing it writes is writable by other users
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        stream=sys.stdout,
        force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("submitit").propagate = False  # it has its own handler: once is enough


def requeue(max_requeues: int, reason: str) -> None:
    """Ask SLURM to requeue this job, then wait for it to end this attempt; the next attempt resumes."""
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if restarts >= max_requeues:
        raise RuntimeError(
            f"{reason}; not requeued: this job was requeued {restarts} times already (max_requeues in the "
            f"cluster profile); submit it again to resume from its checkpoint"
        )
    job = os.environ["SLURM_JOB_ID"]
    host_status = os.environ.get("DDPM_REQUEUE_BY_HOST")  # set by slurm/container_task.sh around a container
    if host_status and int(os.environ.get("SLURM_PROCID", "0")) == 0:
        # Inside a container there is no scontrol: leave with the status that asks the host side to requeue.
        # (The checkpoint is written and every rank has left the process group; other ranks wait below.)
        print(f"{reason}; asking the host side to requeue job {job} (attempt {restarts + 1})", flush=True)
        sys.stderr.flush()
        os._exit(int(host_status))
    if int(os.environ.get("SLURM_PROCID", "0")) == 0:
        try:
            r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
            refused = r.stderr.strip() if r.returncode != 0 else ""
        except (OSError, subprocess.TimeoutExpired) as e:  # no scontrol inside the container, a hung controller
            refused = str(e)
        if refused:
            # Fail now rather than sleep into the time limit. (When SLURM is requeueing the job by itself, after a
            # preemption or an `scontrol requeue`, this is refused too, and the job comes back regardless.)
            raise RuntimeError(
                f"{reason}; scontrol requeue {job} failed ({refused}): submit again to resume from the checkpoint"
            )
        print(f"{reason}; requeue of job {job} (attempt {restarts + 1}): accepted", flush=True)
    time.sleep(900)  # SLURM ends this attempt (SIGTERM, which submitit ignores, then SIGKILL after KillWait)
    raise RuntimeError(f"job {job} asked to be requeued but was not stopped by SLURM within 15 minutes")


class TrainTask:
    """One task per GPU (per node on CPUs): torch.distributed from SLURM's variables, then the training job."""

    def __init__(
        self, run: Callable[[Any], Any], cfg, max_requeues: int, dist_timeout_min: int, gpus_per_task: int = 0
    ):
        self.run = run  # the training job's run(cfg), e.g. jobs.train.run: returns the run directory (or None)
        self.cfg, self.max_requeues, self.dist_timeout_min = cfg, max_requeues, dist_timeout_min
        self.gpus_per_task = gpus_per_task  # the profile's gpus_per_node: every task sees its node's GPUs

    def __call__(self, cfg=None) -> str:
        """`cfg`: a training grid's point (an array element's own config); else the one given at submission."""
        import submitit

        from ddpm.environment import require_gpus

        cfg = cfg if cfg is not None else self.cfg

        _setup_logging()
        require_gpus(self.gpus_per_task)  # before any work, on every rank
        # One scheme for devices: every task sees all GPUs of its node and accelerate picks cuda:LOCAL_RANK.
        # (export()'s default would narrow CUDA_VISIBLE_DEVICES to one GPU, and then cuda:LOCAL_RANK would not exist.)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        os.environ["DDPM_DIST_TIMEOUT_MIN"] = str(self.dist_timeout_min)
        print(
            f"task {os.environ['RANK']} of {os.environ['WORLD_SIZE']} on {socket.gethostname()} "
            f"(master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}, "
            f"restart {os.environ.get('SLURM_RESTART_COUNT', '0')})",
            flush=True,
        )
        try:
            path = self.run(cfg)
        except RunStopped as e:
            requeue(self.max_requeues, str(e))
            raise
        return str(path) if path else ""


class SweepShardTask:
    """Array task i runs shard i/n of the sweep; on the time-limit signal submitit requeues it and done cells are
    skipped."""

    def __init__(self, run: Callable[..., Any], cfg, num_shards: int, cells: list):
        self.run = run  # the sweep job's run(cfg, cells=...), e.g. jobs.sweep.run
        self.cfg, self.num_shards, self.cells = cfg, num_shards, cells  # the cells travel with the job

    def __call__(self, shard: int) -> str:
        _setup_logging()
        if os.environ.get("DDPM_REQUEUE_BY_HOST"):
            _requeue_from_host_on(os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
        self.run(dataclasses.replace(self.cfg, shard=f"{shard}/{self.num_shards}"), cells=self.cells)
        return f"shard {shard}/{self.num_shards} done"

    def checkpoint(self, shard: int):
        import submitit

        return submitit.helpers.DelayedSubmission(self, shard)


class PrepareTask:
    """Array task i of n decodes parts i, i+n, ... of the data (the prepare job's run, given `part`); the task that
    finds every part written finishes the cache. On the time-limit signal submitit requeues it, and the written parts
    are kept."""

    def __init__(self, run: Callable[[Any], Any], cfg, num_tasks: int):
        self.run = run  # the prepare job's run(cfg), e.g. jobs.prepare.run: the finished folder, or None
        self.cfg, self.num_tasks = cfg, num_tasks

    def __call__(self, task: int) -> str:
        _setup_logging()
        if os.environ.get("DDPM_REQUEUE_BY_HOST"):
            _requeue_from_host_on(os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))
        done = self.run(dataclasses.replace(self.cfg, part=f"{task}/{self.num_tasks}"))
        return f"part {task}/{self.num_tasks} done" + (f"; complete: {done}" if done else "")

    def checkpoint(self, task: int):
        import submitit

        return submitit.helpers.DelayedSubmission(self, task)


def _requeue_from_host_on(signal_name: str) -> None:
    """Inside a container, submitit's own requeue (`scontrol requeue` from the task) has no SLURM client: on the
    warning signal, leave at once with the status that asks slurm/container_task.sh to requeue. Finished cells
    are on disk (each written whole), and the requeued shard skips them."""
    import signal

    def leave(signum, frame):
        print(f"signal {signal_name}: asking the host side to requeue job {os.environ.get('SLURM_JOB_ID')}", flush=True)
        os._exit(int(os.environ["DDPM_REQUEUE_BY_HOST"]))

    signal.signal(getattr(signal, f"SIG{signal_name}"), leave)


class SweepMergeTask:
    """After the array: the results table, plot and W&B run from the cells the shards wrote."""

    def __init__(self, run: Callable[..., Any], cfg, cells: list):
        self.run = run  # the sweep job's run(cfg, cells=...), e.g. jobs.sweep.run
        self.cfg, self.cells = cfg, cells

    def __call__(self) -> str:
        _setup_logging()
        files = self.run(dataclasses.replace(self.cfg, merge=True), cells=self.cells)
        return str(files["csv"])


class JobTask:
    """Any job's `run(cfg)` as a SLURM job (an upload after training, ...): the typed config travels, not a command
    line. A UserError fails the job with its one line."""

    def __init__(self, run: Callable[[Any], Any], cfg: Any):
        self.run, self.cfg = run, cfg  # a job module's run, e.g. jobs.upload.run (pickled by reference)

    def __call__(self) -> str:
        _setup_logging()
        self.run(self.cfg)
        return f"{self.run.__module__}.run done"
